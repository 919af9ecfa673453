"""decide() against a straightforward reference: full sorts, brute-force keep ratio.

The reference ranks every unit's whole domain with one sort (score descending, ties by
the same seeded hash of the flat index), takes c = min over units of (rank+1)/|D_u|,
tries every value of c for the keep ratio, and adds each parameter's floor by a stable
sort of its c. decide() must give the very same masks, task masks and keep ratio.
"""
import math
import random

import pytest
import torch

from disparse_fx.config import CompressConfig
from disparse_fx.decision import _hash32, _normalise_, _rank_descending, decide, layer_floor
from disparse_fx.importance import TaskScores


def reference(scores: TaskScores, prunable, shapes, config):
    offsets, total = {}, 0
    for p in prunable:
        offsets[p] = (total, total + math.prod(shapes[p]))
        total = offsets[p][1]
    c = torch.full((total,), math.inf, dtype=torch.float64)
    best = torch.full((total,), -1, dtype=torch.int64)
    unit_c = {}
    for ui, (u, dom) in enumerate(scores.domains.items()):
        norm = _normalise_({p: scores.scores[u][p].clone() for p in dom}, dom, set())
        s = torch.cat([norm[p].reshape(-1) for p in dom])
        idx = torch.cat([torch.arange(*offsets[p]) for p in dom])
        by_hash = torch.argsort(_hash32(idx, config.seed + ui), descending=True)
        order = by_hash[torch.argsort(s[by_hash], descending=True, stable=True)]
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(s))
        cu = torch.full((total,), math.inf, dtype=torch.float64)
        cu[idx] = (rank + 1).double() / len(s)
        unit_c[u] = cu
        better = cu < c
        c = torch.where(better, cu, c)
        best = torch.where(better, ui, best)
    floors = {p: layer_floor(hi - lo, config.min_layer_density) for p, (lo, hi) in offsets.items()}
    target = max(round((1.0 - config.sparsity) * total), 1)

    def kept(r):
        return sum(max(int((c[lo:hi] <= r).sum()), floors[p]) for p, (lo, hi) in offsets.items())

    r = next(float(v) for v in torch.sort(c).values if kept(v) >= target)
    keep = c <= r
    extra = torch.zeros(total, dtype=torch.bool)
    for p, (lo, hi) in offsets.items():
        if int(keep[lo:hi].sum()) < floors[p]:
            top = torch.argsort(c[lo:hi], stable=True)[: floors[p]] + lo
            extra[top] = ~keep[top]
            keep[top] = True
    masks = {p: keep[lo:hi].view(shapes[p]) for p, (lo, hi) in offsets.items()}
    task_masks = {}
    for ui, (u, dom) in enumerate(scores.domains.items()):
        k = (unit_c[u] <= r) | (extra & (best == ui))
        task_masks[u] = {p: k[slice(*offsets[p])].view(shapes[p]) for p in dom}
    return masks, task_masks, r


def random_case(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n_params = rng.randint(1, 7)
    prunable = [f"p{i}" for i in range(n_params)]
    shapes = {p: torch.Size([rng.randint(1, 9), rng.randint(1, 12)]) for p in prunable}
    tasks = [f"t{i}" for i in range(rng.randint(1, 4))]
    owners = {p: [t for t in tasks if rng.random() < 0.6] or [rng.choice(tasks)] for p in prunable}
    domains = {t: tuple(p for p in prunable if t in owners[p]) for t in tasks}
    domains = {t: d for t, d in domains.items() if d}
    levels = rng.choice([2, 3, 10, 1000])  # few levels: many ties
    scores = {}
    for t, dom in domains.items():
        scores[t] = {}
        for p in dom:
            x = torch.randint(0, levels, shapes[p], generator=gen).float()
            if rng.random() < 0.2:
                x.zero_()  # a layer no unit ranks high: its floor comes from deep ranks
            scores[t][p] = x
        if all(float(x.sum()) == 0 for x in scores[t].values()):
            scores[t][dom[0]][(0,) * 2] = 1.0
    sparsity = rng.choice([0.0, 0.3, 0.5, 0.8, 0.9, 0.99])
    floor = rng.choice([0.0, 0.01, 0.1, 0.3]) * (1 - sparsity)
    config = CompressConfig(sparsity=sparsity, min_layer_density=floor, seed=rng.randint(0, 5))
    return TaskScores(scores, domains, 1), prunable, shapes, domains, config


def _clone(scores):
    return TaskScores({u: {p: s.clone() for p, s in per.items()} for u, per in scores.scores.items()},
                      scores.domains, scores.batches)


def check_against_reference(scores, prunable, shapes, domains, config):
    masks, task_masks, r = reference(_clone(scores), prunable, shapes, config)
    got = decide(scores, prunable=prunable, shapes=shapes, task_domains=domains, config=config)
    assert got.keep_ratio == r
    for p in prunable:
        assert torch.equal(got.masks[p], masks[p]), p
    for t in domains:
        for p in domains[t]:
            assert torch.equal(got.task_masks[t][p], task_masks[t][p]), (t, p)
    return got


@pytest.mark.parametrize("seed", range(300))
def test_decide_matches_reference(seed):
    check_against_reference(*random_case(seed))


def test_decide_deterministic_and_exact_with_ties():
    """All scores tied: the hash decides, the count is exact, the same seed repeats."""
    shapes = {"a": torch.Size([64, 32]), "b": torch.Size([300])}
    domains = {"x": ("a", "b"), "y": ("a",)}

    def run(seed):
        scores = TaskScores({t: {p: torch.ones(shapes[p]) for p in d} for t, d in domains.items()}, domains, 1)
        return decide(scores, prunable=["a", "b"], shapes=shapes, task_domains=domains,
                      config=CompressConfig(sparsity=0.9, min_layer_density=0.0, seed=seed))

    one, again, other = run(3), run(3), run(4)
    kept = sum(int(m.sum()) for m in one.masks.values())
    assert kept == round(0.1 * (64 * 32 + 300))
    assert all(torch.equal(one.masks[p], again.masks[p]) for p in shapes)
    assert any(not torch.equal(one.masks[p], other.masks[p]) for p in shapes)


def test_rank_descending_contract():
    s = torch.tensor([0.5, 2.0, 0.5, 1.0, 0.5])
    rank = _rank_descending(s, seed=0)
    assert sorted(rank.tolist()) == list(range(5))
    assert rank[1] == 0 and rank[3] == 1
    assert sorted(rank[[0, 2, 4]].tolist()) == [2, 3, 4]
    assert torch.equal(rank, _rank_descending(s, seed=0))


def test_scores_in_one_buffer_are_read_without_a_copy():
    """Importance accumulates each unit's scores as views of one buffer; the decision
    reads that buffer as is, and falls back to a copy for anything else."""
    from disparse_fx.importance import flat_scores, joined

    parts = flat_scores({"a": (2, 3), "b": (4,), "c": (1, 1, 5)}, "cpu")
    for i, p in enumerate(parts.values()):
        p.fill_(i + 1)
    assert joined(parts, ["a", "b", "c"]) is parts["a"]._base
    assert joined(parts, ["b", "a", "c"]).tolist() == [2.0] * 4 + [1.0] * 6 + [3.0] * 5  # other order: a copy
    assert joined(parts, ["a", "b"]).tolist() == [1.0] * 6 + [2.0] * 4  # part of the buffer: a copy
    loose = {"a": torch.ones(2, 3), "b": torch.zeros(4)}
    assert joined(loose, ["a", "b"]).tolist() == [1.0] * 6 + [0.0] * 4


@pytest.mark.parametrize("seed", range(0, 300, 3))
def test_decide_matches_reference_on_bfloat16_scores(seed):
    """score_dtype="bfloat16": the decision ranks the 16-bit patterns; same answer as the
    reference on the same bfloat16 values (which round the integer levels: more ties)."""
    scores, prunable, shapes, domains, config = random_case(seed)
    scores = TaskScores({u: {p: s.bfloat16() for p, s in per.items()} for u, per in scores.scores.items()},
                        scores.domains, scores.batches)
    got = check_against_reference(scores, prunable, shapes, domains, config)
    assert all(s.dtype == torch.bfloat16 for per in got.task_scores.values() for s in per.values())


def test_bfloat16_histogram_has_one_bucket_per_value():
    from disparse_fx.decision import _bits, _histogram

    s = torch.zeros(40_000, dtype=torch.bfloat16)  # 2**15 values or more: the full resolution
    s[:5] = torch.tensor([0.0, 1.0, 1.0, 2.0, 3.5])
    cum, shift = _histogram(_bits(s))
    assert shift == 0 and len(cum) == 1 << 15
    assert int(cum[-1]) == 40_000
    one = int(_bits(s)[1])
    assert int(cum[one] - cum[one - 1]) == 2


def test_other_score_dtypes_are_refused_by_the_bit_view():
    from disparse_fx.decision import _bits

    with pytest.raises(TypeError, match="float32 or bfloat16"):
        _bits(torch.ones(3, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deep_floors_in_a_large_tied_domain_match_the_reference(dtype):
    """A layer no unit ranks high needs its floor from deep ranks, counted by _RankCounter;
    with bfloat16 scores on a domain of 2**15 elements or more its buckets split each
    score value by the tie hash's top bits. Same masks as the reference either way."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": torch.Size([200, 200]), "b": torch.Size([64, 64]), "c": torch.Size([300])}
    domains = {"x": ("a", "b", "c"), "y": ("a", "c")}
    scores = {u: {p: torch.randint(1, 50, shapes[p], generator=gen).to(dtype) for p in dom}
              for u, dom in domains.items()}
    scores["x"]["b"].zero_()  # b's floor comes from the deep ranks of x
    config = CompressConfig(sparsity=0.99, min_layer_density=0.005, seed=1)
    got = check_against_reference(TaskScores(scores, domains, 1), list(shapes), shapes, domains, config)
    assert int(got.masks["b"].sum()) == layer_floor(64 * 64, 0.005)
