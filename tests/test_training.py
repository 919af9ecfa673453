"""Dynamic DiSparse (DynamicSparsity) and finetune: invariants over the zoo and toy models."""
import copy
import dataclasses
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import disparse_fx as dfx
from disparse_fx.importance import default_inputs
from disparse_fx.channel_decision import prunable_sparsity
from disparse_fx.training import DynamicSparsity, erk_densities, finetune
from disparse_fx.passes.insert_channel_masks import MASK_MODULE, mask_plan
from disparse_fx.passes.insert_masks import masked_params

from .zoo import ZOO, ZOO_BY_NAME, outputs_by_task

HYPOTHESIS_EXAMPLES = 12 if os.environ.get("HYPOTHESIS_PROFILE", "default") == "default" else 100


def compressed(entry, sparsity=0.8, criterion="snip", **cfg):
    model = entry.build()
    config = dfx.CompressConfig(sparsity=sparsity, criterion=criterion, num_batches=2, progress=False, **cfg)
    return dfx.compress(model, entry.task_losses, entry.batches(2), config, inputs=entry.inputs)


def make_optimizer(kind, params, lr=1e-2):
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=1e-3)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-3)


def train_step(entry, model, opt, batch, weights=None):
    out = outputs_by_task(model((entry.inputs or default_inputs)(batch)))
    loss = sum((weights or {}).get(t, 1.0) * entry.task_losses[t](out[t], batch) for t in out)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def stored_weights(sched):
    return {p: sched._weights[p].detach() for p in sched.prunable}


# ---------------------------------------------------------------- ERK
def test_erk_densities_match_a_hand_computation():
    shapes = {"conv": (8, 3, 3, 3), "fc": (4, 8), "big": (32, 64)}
    n = {"conv": 216, "fc": 32, "big": 2048}
    raw = {"conv": (17 / 216) ** 0.9, "fc": (12 / 32) ** 0.9, "big": (96 / 2048) ** 0.9}
    budget = 0.25 * (216 + 32 + 2048)
    # First pass: fc would exceed density 1, so it is made dense and the rest rescaled.
    eps = budget / sum(raw[p] * n[p] for p in n)
    assert eps * raw["fc"] > 1 and eps * raw["conv"] < 1 and eps * raw["big"] < 1
    eps = (budget - n["fc"]) / (raw["conv"] * n["conv"] + raw["big"] * n["big"])
    expected = {"conv": eps * raw["conv"], "fc": 1.0, "big": eps * raw["big"]}

    got = erk_densities(shapes, 0.25)
    assert got.keys() == expected.keys()
    for p in expected:
        assert got[p] == pytest.approx(expected[p], rel=1e-12), p
    assert sum(got[p] * n[p] for p in n) == pytest.approx(budget, rel=1e-12)
    assert erk_densities(shapes, 1.0) == {"conv": 1.0, "fc": 1.0, "big": 1.0}


@pytest.mark.parametrize("entry", [ZOO_BY_NAME["two_heads_dict"], ZOO_BY_NAME["concat_list"]], ids=lambda e: e.name)
def test_erk_init_counts_are_exact_and_masks_seeded(entry):
    result = compressed(entry, sparsity=0.85)
    shapes = {p: result.plan.shapes[p] for p in result.plan.prunable}
    dens = erk_densities(shapes, 0.15)
    total = sum(math.prod(s) for s in shapes.values())

    def build(seed):
        r = dataclasses.replace(result, model=copy.deepcopy(result.model))
        return DynamicSparsity(r, entry.task_losses, torch.optim.SGD(r.model.parameters(), lr=0.1),
                               end_step=100, inputs=entry.inputs, seed=seed)

    a, b, c = build(0), build(0), build(1)
    kept = {p: int(m.sum()) for p, m in a.masks.items()}
    assert sum(kept.values()) == round(0.15 * total)
    assert abs(a.sparsity - 0.85) <= 0.0025
    for p, s in shapes.items():
        assert abs(kept[p] - dens[p] * math.prod(s)) < 1 + 1e-9 or kept[p] == 1, p
    assert all(torch.equal(a.masks[p], b.masks[p]) for p in shapes)
    assert any(not torch.equal(a.masks[p], c.masks[p]) for p in shapes)
    for p, m in a.masks.items():  # live weights all drawn (non-zero), pruned ones zero
        w = a._weights[p].detach()
        assert torch.all(w[~m] == 0) and torch.all(w[m] != 0), p
        bound = 1 / math.sqrt(math.prod(w.shape[1:]))
        fresh = m & ~result.plan.masks[p]
        assert torch.all(w[fresh].abs() <= bound), p


def test_init_plan_keeps_the_plans_masks_and_weights():
    entry = ZOO_BY_NAME["residual_tuple"]
    result = compressed(entry)
    before = {k: v.clone() for k, v in result.model.state_dict().items()}
    sched = DynamicSparsity(result, entry.task_losses, torch.optim.Adam(result.model.parameters()),
                            end_step=10, init="plan")
    assert all(torch.equal(sched.masks[p], result.plan.masks[p]) for p in result.plan.prunable)
    assert sched.sparsity == pytest.approx(result.plan.sparsity)
    assert all(torch.equal(v, before[k]) for k, v in result.model.state_dict().items())
    assert sched.history[0]["step"] == 0 and sched.history[0]["regrown"] == 0


# ---------------------------------------------------------------- invariants through training
@pytest.mark.parametrize("entry, optimizer", [(e, "adam") for e in ZOO] + [
    (ZOO_BY_NAME["two_heads_dict"], "sgd"), (ZOO_BY_NAME["tied_heads"], "sgd")],
    ids=lambda v: getattr(v, "name", v))
def test_sparsity_and_zeros_hold_through_training(entry, optimizer):
    result = compressed(entry, sparsity=0.8)
    model = result.model.train()
    opt = make_optimizer(optimizer, model.parameters())
    sched = DynamicSparsity(result, entry.task_losses, opt, update_every=10, end_step=150,
                            inputs=entry.inputs, init="erk", seed=3)
    counts = {p: int(m.sum()) for p, m in sched.masks.items()}
    data = entry.batches(10, seed=1)
    ever_changed = False
    for step in range(1, 201):
        batch = data[step % len(data)]
        train_step(entry, model, opt, batch)
        entry_ = sched.step(batch)
        for p, m in sched.masks.items():
            assert torch.all(sched._weights[p].detach()[~m] == 0), (step, p)
        if entry_ is not None:
            assert step % 10 == 0 and step < 150
            assert entry_["sparsity"] == sched.target_sparsity
            assert abs(entry_["sparsity"] - 0.8) <= 0.0025
            assert {p: int(m.sum()) for p, m in sched.masks.items()} == counts
            assert entry_["prune_fraction"] == pytest.approx(0.25 * (1 + math.cos(math.pi * step / 150)))
            ever_changed |= entry_["regrown"] > 0
            assert entry_["regrown"] == entry_["pruned"]
    assert ever_changed
    assert [h["step"] for h in sched.history] == list(range(0, 150, 10))
    # The stored weights are exactly the effective ones: mask multiplies change nothing.
    with torch.no_grad():
        x = (entry.inputs or default_inputs)(data[0])
        model.eval()
        masked = outputs_by_task(model(x))
        ones = {n: torch.ones_like(b) for n, b in masked_params(model).items()}
        bufs = {n + "_mask": b for n, b in ones.items()}
        unmasked = outputs_by_task(torch.func.functional_call(model, bufs, (x,), strict=False))
    for t in masked:
        assert torch.equal(masked[t], unmasked[t]), t


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_regrown_weights_start_at_zero_with_fresh_optimizer_state(optimizer):
    entry = ZOO_BY_NAME["mid_trunk_branch"]
    result = compressed(entry)
    model = result.model.train()
    opt = make_optimizer(optimizer, model.parameters())
    sched = DynamicSparsity(result, entry.task_losses, opt, update_every=7, end_step=100, init="plan")
    data = entry.batches(7, seed=2)
    for step in range(1, 7):
        train_step(entry, model, opt, data[step])
        assert sched.step(data[step]) is None
    train_step(entry, model, opt, data[0])
    keys = ("exp_avg", "exp_avg_sq") if optimizer == "adam" else ("momentum_buffer",)
    before_w = {p: w.clone() for p, w in stored_weights(sched).items()}
    before_s = {p: {k: opt.state[sched._weights[p]][k].clone() for k in keys} for p in sched.prunable}
    assert sched.step(data[0]) is not None
    rec = sched.last_update
    assert sum(int(g.sum()) for g in rec.grown.values()) > 0
    for p in sched.prunable:
        w, shape = sched._weights[p].detach(), sched._weights[p].shape
        grown = rec.grown.get(p, torch.zeros(w.numel(), dtype=torch.bool)).view(shape)
        pruned = rec.pruned.get(p, torch.zeros(w.numel(), dtype=torch.bool)).view(shape)
        same = ~(grown | pruned)
        assert torch.all(w[grown] == 0) and torch.all(w[pruned] == 0), p
        assert torch.equal(w[same], before_w[p][same]), p
        for k in keys:
            s = opt.state[sched._weights[p]][k]
            assert torch.all(s[grown | pruned] == 0), (p, k)
            assert torch.equal(s[same], before_s[p][k][same]), (p, k)
    # Regrown weights then learn: after one more step some of them are non-zero.
    train_step(entry, model, opt, data[1])
    assert any(bool((sched._weights[p].detach().reshape(-1)[g] != 0).any()) for p, g in rec.grown.items())


def test_regrowth_scores_are_the_dense_per_task_gradients():
    """The all-masks-one trick gives the gradient each weight would get if unmasked."""
    entry = ZOO_BY_NAME["two_heads_dict"]
    result = compressed(entry)
    model = result.model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = DynamicSparsity(result, entry.task_losses, opt, update_every=1, end_step=10, init="plan")
    batch = entry.batches(1, seed=5)[0]
    train_step(entry, model, opt, batch)
    ref = copy.deepcopy(model)
    sched.step(batch)
    with torch.no_grad():
        for buf in masked_params(ref).values():
            buf.fill_(1.0)
    plan = result.plan
    for t in plan.tasks:
        ref.zero_grad()
        entry.task_losses[t](ref(batch["input"])[t], batch).backward()
        dom = [p for p in plan.prunable if t in plan.owners[p]]
        total = sum(float(ref.get_parameter(p).grad.abs().sum()) for p in dom)
        for p in dom:
            if p in sched.last_update.scores:
                expected = ref.get_parameter(p).grad.abs().reshape(-1) / total
                torch.testing.assert_close(sched.last_update.scores[p][t], expected, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------- the union rule (hypothesis)
class ToyMultitask(nn.Module):
    """An MLP trunk; each task's head branches off after trunk layer ``branch[t]``."""

    def __init__(self, width, depth, branch, head_hidden):
        super().__init__()
        self.trunk = nn.ModuleList(nn.Linear(6 if i == 0 else width, width) for i in range(depth))
        self.branch = list(branch)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(width, h), nn.Tanh(), nn.Linear(h, 2)) if h else nn.Linear(width, 2)
            for h in head_hidden)

    def forward(self, x):
        feats, h = [], x
        for layer in self.trunk:
            h = torch.tanh(layer(h))
            feats.append(h)
        return {f"t{i}": head(feats[self.branch[i]]) for i, head in enumerate(self.heads)}


@st.composite
def toy_setups(draw):
    depth = draw(st.integers(1, 3))
    n_tasks = draw(st.integers(2, 3))
    return dict(
        width=draw(st.integers(3, 10)), depth=depth,
        branch=[draw(st.integers(0, depth - 1)) for _ in range(n_tasks)],
        head_hidden=[draw(st.sampled_from([0, 3, 5])) for _ in range(n_tasks)],
        sparsity=draw(st.floats(0.3, 0.9)), prune_rate=draw(st.floats(0.1, 1.0)),
        init=draw(st.sampled_from(["erk", "plan"])), seed=draw(st.integers(0, 10_000)),
    )


@settings(max_examples=HYPOTHESIS_EXAMPLES)
@given(toy_setups())
def test_regrowth_follows_the_union_rule(setup):
    torch.manual_seed(setup["seed"])
    model = ToyMultitask(setup["width"], setup["depth"], setup["branch"], setup["head_hidden"])
    tasks = [f"t{i}" for i in range(len(setup["branch"]))]
    gen = torch.Generator().manual_seed(setup["seed"])
    batch = {"input": torch.randn(8, 6, generator=gen), **{t: torch.randn(8, 2, generator=gen) for t in tasks}}
    losses = {t: (lambda t: lambda p, b: F.mse_loss(p, b[t]))(t) for t in tasks}
    result = dfx.compress(model, losses, [batch], dfx.CompressConfig(
        sparsity=setup["sparsity"], criterion="magnitude", num_batches=1, progress=False, seed=setup["seed"]))
    gm = result.model
    opt = torch.optim.Adam(gm.parameters(), lr=1e-2)
    sched = DynamicSparsity(result, losses, opt, update_every=1, end_step=10, prune_rate=setup["prune_rate"],
                            init=setup["init"], seed=setup["seed"])
    counts = {p: int(m.sum()) for p, m in sched.masks.items()}
    out = gm(batch["input"])
    opt.zero_grad()
    sum(losses[t](out[t], batch) for t in tasks).backward()
    opt.step()
    masks_before = {p: m.reshape(-1).clone() for p, m in sched.masks.items()}
    weights_before = {p: w.clone().reshape(-1) for p, w in stored_weights(sched).items()}
    assert sched.step(batch) is not None
    rec = sched.last_update
    owners = result.plan.owners
    for p in sched.prunable:
        live = masks_before[p]
        if p not in rec.dropped:  # nothing to move: dense layer or zero drop count
            assert torch.equal(sched.masks[p].reshape(-1), live)
            continue
        dropped, regrow, picks = rec.dropped[p], rec.regrow[p], rec.task_picks[p]
        k = int(dropped.sum())
        assert k == int(rec.prune_fraction * int(live.sum()))
        # Drop: the k live weights of smallest magnitude.
        w = weights_before[p].abs()
        assert bool((dropped <= live).all())
        if k < int(live.sum()):
            assert float(w[dropped].max()) <= float(w[live & ~dropped].min())
        candidates = ~(live & ~dropped)
        assert set(picks) == set(owners[p])
        for t, pick in picks.items():  # each task: its top-k candidates by its own score
            s = rec.scores[p][t]
            assert int(pick.sum()) == k and bool((pick <= candidates).all())
            rest = candidates & ~pick
            if rest.any():
                assert float(s[pick].min()) >= float(s[rest].max())
        assert int(regrow.sum()) == k
        if len(owners[p]) > 1:  # shared: inside the union, trimmed by the best normalised score
            union = torch.stack(list(picks.values())).any(0)
            assert bool((regrow <= union).all())
            best = torch.stack([rec.scores[p][t] for t in picks]).amax(0)
            rest = union & ~regrow
            if rest.any():
                assert float(best[regrow].min()) >= float(best[rest].max())
        else:
            assert torch.equal(regrow, next(iter(picks.values())))
        new = sched.masks[p].reshape(-1)
        assert torch.equal(new, (live & ~dropped) | regrow)
        assert int(new.sum()) == counts[p]
        assert torch.all(sched._weights[p].detach().reshape(-1)[rec.grown[p]] == 0)


# ---------------------------------------------------------------- guards
def test_channel_granularity_needs_a_channel_plan_and_refuses_erk():
    entry = ZOO_BY_NAME["two_heads_dict"]
    result = compressed(entry)
    cfg = dataclasses.replace(result.plan.config, granularity="channel")
    channel = dataclasses.replace(result, plan=dataclasses.replace(result.plan, config=cfg))
    with pytest.raises(dfx.DisparseValueError, match=r"no channel plan \(plan.channels is None\)"):
        DynamicSparsity(channel, entry.task_losses, torch.optim.Adam(result.model.parameters()), end_step=10)
    real = channel_compressed(entry)
    with pytest.raises(dfx.DisparseValueError, match="channel groups starts from the plan's channel keep"):
        DynamicSparsity(real, entry.task_losses, torch.optim.Adam(real.model.parameters()), end_step=10, init="erk")


# ---------------------------------------------------------------- channel granularity
def channel_compressed(entry, sparsity=0.5):
    config = dfx.CompressConfig(sparsity=sparsity, granularity="channel", num_batches=2, progress=False)
    return dfx.compress(entry.build(), entry.task_losses, entry.batches(2), config, inputs=entry.inputs)


def check_channel_state(sched, result, sparsity, kept):
    """Live counts, sparsity after slimming, plan and mask buffers all agree with the keep."""
    groups = result.plan.channels.groups
    keep = sched.channel_keep
    assert {g: int(k.sum()) for g, k in keep.items()} == kept
    assert all(int(k.sum()) >= 1 for k in keep.values())
    shapes = {p: result.plan.shapes[p] for p in result.plan.prunable}
    assert abs(prunable_sparsity(groups, keep, result.plan.prunable, shapes) - sparsity) <= 1e-12
    assert abs(sched.sparsity - sparsity) <= 1e-12 and result.plan is sched.plan
    assert all(torch.equal(result.plan.channels.keep[g], keep[g]) for g in keep)
    flat = groups.keep_vector(keep)
    holder = result.model.get_submodule(MASK_MODULE)
    for (arg, dim), flags in mask_plan(groups, flat).items():
        assert torch.equal(getattr(holder, f"{arg}_dim{dim}").reshape(-1) != 0, flags)
    for p, m in result.plan.masks.items():  # element view: OR over owners of the task masks
        owners = [t for t in result.plan.task_masks if p in result.plan.task_masks[t]]
        assert torch.equal(m, torch.stack([result.plan.task_masks[t][p] for t in owners]).any(0)), p


def test_channel_dynamic_sparsity_conserves_counts_regrows_and_slims():
    entry = ZOO_BY_NAME["residual_tuple"]
    result = channel_compressed(entry)
    sparsity0 = result.plan.sparsity
    slim_params0 = sum(p.numel() for p in dfx.slim(result).parameters())
    opt = torch.optim.Adam(result.model.parameters(), lr=1e-2)
    sched = DynamicSparsity(result, entry.task_losses, opt, update_every=2, end_step=40, inputs=entry.inputs)
    assert sched.init == "plan" and sched.history[0]["sparsity"] == sparsity0
    kept = {g: int(k.sum()) for g, k in result.plan.channels.keep.items()}
    data = entry.batches(6)
    scores = sched._channel_scores(data[0])  # the regrowth signal: normalised per task
    for t, per in scores.items():
        assert sum(float(v.sum()) for v in per.values()) == pytest.approx(1.0, abs=1e-9)
    assert set(scores[2]) == {0, 2, 5} and set(scores[0]) == {0, 2}  # 5 is task 2's head group
    start = sched.channel_keep
    changed = 0
    for step in range(12):
        batch = data[step % len(data)]
        train_step(entry, result.model, opt, batch)
        before = {n: q.detach().clone() for n, q in result.model.named_parameters()}
        entry_ = sched.step(batch)
        if entry_ is None:
            continue
        check_channel_state(sched, result, sparsity0, kept)
        rec = sched.last_update
        assert entry_["pruned"] == entry_["regrown"] == sum(int(g.sum()) for g in rec.grown.values())
        changed += entry_["regrown"]
        zeroed = {n: torch.zeros_like(q, dtype=torch.bool) for n, q in before.items()}
        for gid, grown in rec.grown.items():
            for name, param, dim, idx in sched._members[gid]:
                sel = (idx >= 0) & grown[idx.clamp_min(0)]
                view = [1] * param.dim()
                view[dim] = param.shape[dim]
                where = sel.view(view).expand(param.shape)
                zeroed[name] |= where
                assert bool((param.detach()[where] == 0).all()), (gid, name)
                for value in opt.state[param].values():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        assert bool((value[where] == 0).all()), (gid, name)
        for n, q in result.model.named_parameters():  # nothing else moves (BN beta, biases included)
            assert torch.equal(q.detach()[~zeroed[n]], before[n][~zeroed[n]]), n
    assert changed > 0 and any(not torch.equal(start[g], k) for g, k in sched.channel_keep.items())
    assert [h["step"] for h in sched.history] == [0, 2, 4, 6, 8, 10, 12]

    slim = dfx.slim(result)  # parity with the masked model is checked inside
    assert sum(p.numel() for p in slim.parameters()) == slim_params0
    x = entry.inputs(data[0]) if entry.inputs else data[0]["input"]
    result.model.eval()
    with torch.no_grad():
        for a, b in zip(result.model(x), slim.eval()(x)):
            torch.testing.assert_close(b, a, atol=1e-4 * max(1.0, float(a.abs().max())), rtol=0)
    result.model.train()

    resumed = DynamicSparsity(result, entry.task_losses, opt, update_every=2, end_step=40, inputs=entry.inputs)
    resumed.load_state_dict(sched.state_dict())
    assert resumed.step_count == 12 and all(torch.equal(resumed.channel_keep[g], k)
                                            for g, k in sched.channel_keep.items())
    history = finetune(result, entry.task_losses, data, 4, inputs=entry.inputs, dynamic=resumed, progress=False)
    assert [s for _, s in history["sparsity"]] == [sparsity0, sparsity0]
    check_channel_state(resumed, result, sparsity0, kept)


def test_channel_regrowth_union_rule_on_shared_group_and_head_group(monkeypatch):
    # residual_tuple: group 2 (block1's 8 channels) is reached by tasks 0, 1, 2; group 5
    # (h2's 6 hidden units) by task 2 alone. Scores and magnitudes are fixed by hand.
    entry = ZOO_BY_NAME["residual_tuple"]
    result = channel_compressed(entry)
    keep0 = {g: k.clone() for g, k in result.plan.channels.keep.items()}
    assert keep0[2].tolist() == [False, True, True, False, False, True, True, False]
    assert keep0[5].tolist() == [True, True, False, True, False, True]
    opt = torch.optim.Adam(result.model.parameters(), lr=1e-2)
    sched = DynamicSparsity(result, entry.task_losses, opt, update_every=1, end_step=10_000,
                            prune_rate=1.0, inputs=entry.inputs)
    assert sched._reach == {0: (0, 2), 1: (0, 2), 2: (0, 2, 5)}

    def vec(n, values):
        v = torch.zeros(n, dtype=torch.float64)
        for i, x in values.items():
            v[i] = x
        return v

    mags = {0: torch.arange(8, dtype=torch.float64) + 1,
            2: vec(8, {1: 0.1, 2: 0.2, 5: 0.3, 6: 9.0}),      # drop 1, 2, 5 (k = 3 of 4 live)
            5: vec(6, {0: 0.1, 1: 0.2, 3: 0.3, 5: 9.0})}      # drop 0, 1, 3
    scores = {0: {0: torch.zeros(8), 2: vec(8, {0: 0.5, 3: 0.3, 4: 0.1})},
              1: {0: torch.zeros(8), 2: vec(8, {7: 0.6, 4: 0.2, 1: 0.15})},
              2: {0: torch.zeros(8), 2: vec(8, {5: 0.05, 2: 0.04, 1: 0.03}),
                  5: vec(6, {2: 0.9, 4: 0.8, 0: 0.7, 1: 0.6})}}
    monkeypatch.setattr(sched, "_magnitudes", lambda: mags)
    monkeypatch.setattr(sched, "_channel_scores", lambda batch: scores)
    before = {n: q.detach().clone() for n, q in result.model.named_parameters()}
    sched.step(entry.batches(1)[0])
    rec = sched.last_update
    # Shared group: tasks pick {0,3,4}, {7,4,1}, {5,2,1}; the union trimmed by the best
    # per-task score keeps 7 (0.6), 0 (0.5), 3 (0.3) - no single task's pick.
    assert {t: torch.nonzero(p).flatten().tolist() for t, p in rec.task_picks[2].items()} == \
        {0: [0, 3, 4], 1: [1, 4, 7], 2: [1, 2, 5]}
    assert torch.nonzero(rec.regrow[2]).flatten().tolist() == [0, 3, 7]
    assert sched.channel_keep[2].tolist() == [True, False, False, True, False, False, True, True]
    # Head group: its task's pick, as is.
    assert list(rec.task_picks[5]) == [2]
    assert torch.nonzero(rec.regrow[5]).flatten().tolist() == [0, 2, 4]
    assert sched.channel_keep[5].tolist() == [True, False, True, False, True, True]
    assert torch.nonzero(rec.grown[5]).flatten().tolist() == [2, 4]  # 0 was dropped and re-picked
    # Regrown slices start at zero; the re-picked channel 0 of group 5 keeps its weights.
    w = result.model.get_parameter("h2.0.weight")
    cols = ~rec.grown.get(0, torch.zeros(8, dtype=torch.bool))  # its input columns are group 0's channels
    assert bool((w.detach()[[2, 4]] == 0).all()) and torch.equal(w.detach()[0, cols], before["h2.0.weight"][0, cols])
    assert bool((result.model.get_parameter("h2.2.weight").detach()[:, [2, 4]] == 0).all())
    assert torch.equal(result.model.get_parameter("h2.0.bias").detach(), before["h2.0.bias"])
    for name, dim in (("block1.weight", 0), ("block2.weight", 1)):
        sl = result.model.get_parameter(name).detach().index_select(dim, torch.tensor([0, 3, 7]))
        assert bool((sl == 0).all()), name
    # task votes: each task keeps its old live votes plus what it picked and grew
    assert result.plan.channels.task_keep[1][2].tolist() == [False, False, False, False, False, False, True, True]
    check_channel_state(sched, result, sched.target_sparsity, {g: int(k.sum()) for g, k in keep0.items()})
    dfx.slim(result)


def test_state_dict_resumes_the_schedule():
    entry = ZOO_BY_NAME["tied_heads"]
    result = compressed(entry)
    opt = torch.optim.Adam(result.model.parameters(), lr=1e-2)
    sched = DynamicSparsity(result, entry.task_losses, opt, update_every=3, end_step=20, inputs=entry.inputs)
    data = entry.batches(4)
    for step in range(4):
        train_step(entry, result.model, opt, data[step])
        sched.step(data[step])
    resumed = DynamicSparsity(result, entry.task_losses, opt, update_every=3, end_step=20, inputs=entry.inputs,
                              init="plan")
    resumed.load_state_dict(sched.state_dict())
    assert resumed.step_count == 4 and [h["step"] for h in resumed.history] == [0, 3]
    assert all(torch.equal(resumed.masks[p], sched.masks[p]) for p in sched.prunable)
    assert resumed.step(data[0]) is None and resumed.step(data[1]) is not None  # steps 5, 6


@pytest.mark.parametrize("kwargs, match", [
    (dict(update_every=0), r"update_every must be an integer >= 1, got 0"),
    (dict(end_step=-5), r"end_step must be an integer >= 1, got -5"),
    (dict(end_step=2.5), r"end_step must be an integer >= 1, got 2.5"),
    (dict(prune_rate=1.5), r"prune_rate must be a number in \[0, 1\], got 1.5"),
    (dict(init="dense"), r"init must be one of \('erk', 'plan'\), got 'dense'"),
    (dict(seed="0"), r"seed must be an integer, got '0'"),
    (dict(inputs=3), r"inputs must be a callable batch -> model input\(s\), got int"),
    (dict(optimizer="adam"), r"optimizer must be a torch.optim.Optimizer .*got str"),
    (dict(optimizer="other"), r"optimizer does not update parameter 'stem.weight'"),
    (dict(result="model"), r"result must be the CompressionResult returned by compress\(\), got str"),
    (dict(task_losses={"seg": None}), r"task_losses names tasks \['seg'\] but the model outputs"),
])
def test_dynamic_sparsity_rejects_bad_arguments(kwargs, match):
    entry = ZOO_BY_NAME["two_heads_dict"]
    result = compressed(entry)
    args = dict(result=result, task_losses=entry.task_losses,
                optimizer=torch.optim.Adam(result.model.parameters()), end_step=10)
    if kwargs.get("optimizer") == "other":
        kwargs = dict(optimizer=torch.optim.Adam(result.model.cls.parameters()))
    args.update(kwargs)
    with pytest.raises(dfx.DisparseValueError, match=match):
        DynamicSparsity(args.pop("result"), args.pop("task_losses"), args.pop("optimizer"), **args)


# ---------------------------------------------------------------- finetune
@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd", "factory"])
def test_finetune_cycles_data_keeps_pruned_weights_zero_and_learns(optimizer):
    entry = ZOO_BY_NAME["tied_heads"]
    result = compressed(entry, sparsity=0.5)
    made = []

    def factory(params):
        made.append(torch.optim.RMSprop(params, lr=3e-3))
        return made[-1]

    data = entry.batches(3, seed=4)
    hist = finetune(result, entry.task_losses, data, 60, optimizer=factory if optimizer == "factory" else optimizer,
                    lr=1e-2 if optimizer != "sgd" else 5e-2, inputs=entry.inputs, progress=False)
    assert hist["step"] == list(range(1, 61)) and len(hist["loss"]) == 60
    assert set(hist["task_losses"]) == {"a", "b", "c"}
    assert sum(hist["loss"][-3:]) < 0.8 * sum(hist["loss"][:3])
    assert len(made) == (optimizer == "factory")
    params = dict(result.model.named_parameters())
    for p, m in result.plan.masks.items():
        assert torch.all(params[p].detach()[~m] == 0), p
    assert result.model.training  # mode restored (it was in train mode)


def test_finetune_eval_callback_and_task_weights():
    entry = ZOO_BY_NAME["two_heads_dict"]
    result = compressed(entry)
    model = result.model.eval()
    cls_before = {n: p.clone() for n, p in model.cls.named_parameters()}
    seen = []

    def eval_fn(m):
        seen.append((m.training, torch.is_grad_enabled()))
        return {"n": len(seen)}

    hist = finetune(result, entry.task_losses, entry.batches(4), 10, eval_fn=eval_fn, eval_every=4,
                    task_weights={"seg": 1.0, "cls": 0.0}, progress=False)
    assert [s for s, _ in hist["eval"]] == [4, 8, 10]
    assert seen == [(False, False)] * 3
    assert not model.training
    for n, p in model.cls.named_parameters():  # task weight 0: the cls head never moves (Adam, no decay)
        assert torch.equal(p, cls_before[n]), n


def test_finetune_cosine_schedule_anneals_each_group_to_zero_and_gives_the_lr_back():
    entry = ZOO_BY_NAME["two_heads_dict"]
    model = entry.build()
    opt = torch.optim.SGD([{"params": model.cls.parameters(), "lr": 0.1},
                           {"params": [p for n, p in model.named_parameters() if not n.startswith("cls.")],
                            "lr": 0.02}])
    seen = []
    real_step = opt.step

    def step(*a, **k):  # the lr each optimizer step is taken with
        seen.append([g["lr"] for g in opt.param_groups])
        return real_step(*a, **k)

    opt.step = step
    finetune(model, entry.task_losses, entry.batches(2), 4, optimizer=opt, lr_schedule="cosine", progress=False)
    factors = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]  # 1, 0.854, 0.5, 0.146
    assert [x for lrs in seen for x in lrs] == pytest.approx([x for f in factors for x in (0.1 * f, 0.02 * f)])
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.02]  # the caller's optimizer is as it was
    seen.clear()
    finetune(model, entry.task_losses, entry.batches(2), 2, optimizer=opt, progress=False)
    assert seen == [[0.1, 0.02]] * 2  # constant (the default)


def test_finetune_drives_dynamic_sparsity_and_works_on_a_plain_module():
    entry = ZOO_BY_NAME["residual_tuple"]
    result = compressed(entry)
    opt = torch.optim.Adam(result.model.parameters(), lr=1e-2)
    sched = DynamicSparsity(result, entry.task_losses, opt, update_every=5, end_step=20)
    hist = finetune(result, entry.task_losses, entry.batches(4), 25, dynamic=sched, progress=False)
    assert [s for s, _ in hist["sparsity"]] == [5, 10, 15]
    assert all(v == sched.target_sparsity for _, v in hist["sparsity"])
    assert sched.step_count == 25
    plain = entry.build()
    hist = finetune(plain, entry.task_losses, entry.batches(2), 3, optimizer="sgd", progress=False)
    assert len(hist["loss"]) == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), r"steps must be an integer >= 1, got 0"),
    (dict(optimizer="rmsprop"), r"optimizer must be one of \('adam', 'adamw', 'sgd'\).*got 'rmsprop'"),
    (dict(optimizer=lambda ps: None), r"optimizer factory must return a torch.optim.Optimizer, returned NoneType"),
    (dict(lr=0), r"lr must be a number > 0, got 0"),
    (dict(weight_decay=-1.0), r"weight_decay must be a number >= 0, got -1.0"),
    (dict(eval_every=0), r"eval_every must be an integer >= 1, got 0"),
    (dict(eval_fn=5), r"eval_fn must be a callable model -> metrics, got int"),
    (dict(lr_schedule="step"), r"lr_schedule must be one of \('constant', 'cosine'\), got 'step'"),
    (dict(task_weights={"seg": 1.0}), r"task_weights must be a dict with one number per task \['seg', 'cls'\]"),
    (dict(task_weights={"seg": 1.0, "cls": -2}), r"task_weights\['cls'\] must be a finite number >= 0, got -2"),
    (dict(result_or_model="x"), r"result_or_model must be a CompressionResult or an nn.Module, got str"),
    (dict(dynamic="x"), r"dynamic must be a DynamicSparsity or None, got str"),
    (dict(data=[]), r"data yielded no batch; finetune needs at least one"),
    (dict(data="exhausted"), r"data yielded no batch on re-iteration"),
])
def test_finetune_rejects_bad_arguments(kwargs, match):
    entry = ZOO_BY_NAME["two_heads_dict"]
    result = compressed(entry)
    args = dict(result_or_model=result, task_losses=entry.task_losses, data=entry.batches(1), steps=2,
                progress=False)
    if kwargs.get("data") == "exhausted":  # an iterator: one batch, then nothing on the second pass
        kwargs = dict(data=iter(entry.batches(1)))
    args.update(kwargs)
    with pytest.raises(dfx.DisparseValueError, match=match):
        finetune(**args)


def test_finetune_rejects_a_scheduler_of_another_model_or_a_second_optimizer():
    entry = ZOO_BY_NAME["two_heads_dict"]
    result, other = compressed(entry), compressed(entry)
    opt = torch.optim.Adam(other.model.parameters())
    sched = DynamicSparsity(other, entry.task_losses, opt, end_step=10)
    with pytest.raises(dfx.DisparseValueError, match="dynamic was built for another model"):
        finetune(result, entry.task_losses, entry.batches(1), 1, dynamic=sched, progress=False)
    with pytest.raises(dfx.DisparseValueError, match="optimizer must be left out"):
        finetune(other, entry.task_losses, entry.batches(1), 1, dynamic=sched, optimizer="sgd", progress=False)


def test_slim_after_element_dynamic_training_uses_the_live_masks():
    """DynamicSparsity moves the mask buffers; slim must read them, not the plan's."""
    entry = ZOO_BY_NAME["two_heads_dict"]
    result = dfx.compress(entry.build(), entry.task_losses, entry.batches(2),
                          dfx.CompressConfig(sparsity=0.9, num_batches=2, progress=False))
    # empty a whole input channel of `body` in the live masks only: the plan still keeps it
    live = masked_params(result.model)
    live["body.weight"][:, 2] = 0
    with torch.no_grad():
        result.model.body.weight[:, 2] = 0
    slim = dfx.slim(result)
    assert slim.body.weight.shape[1] < 8  # the emptied channel left; planned masks would keep it
    x = torch.randn(4, 3, 8, 8)
    for t, v in result.model.eval()(x).items():
        torch.testing.assert_close(slim.eval()(x)[t], v, atol=1e-6, rtol=0)


def test_channel_dynamic_sparsity_moves_attention_heads_and_layernorm_channels():
    """On a ViT, drop/regrow reaches the heads (MultiheadAttention head masks) and the
    residual channels (masked LayerNorm keep masks) as well as the masks in front of
    linears; the masked model keeps computing what dfx.slim builds."""
    import torch.nn.functional as F
    from torchvision.models.vision_transformer import VisionTransformer

    from disparse_fx.zoo import multitask_from_torchvision
    from disparse_fx.passes.attention import MultiheadAttention as Slimmable

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=4, hidden_dim=16, mlp_dim=32)
    model = multitask_from_torchvision(vit, {"seg": ("dense", 2), "cls": ("classify", 3)}, head_width=8)
    gen = torch.Generator().manual_seed(0)
    data = [{"input": torch.randn(2, 3, 16, 16, generator=gen), "seg": torch.randn(2, 2, 16, 16, generator=gen),
             "cls": torch.randn(2, 3, generator=gen)} for _ in range(4)]
    losses = {t: (lambda key: lambda p, b: F.mse_loss(p, b[key]))(t) for t in ("seg", "cls")}
    result = dfx.compress(model, losses, data, dfx.CompressConfig(
        sparsity=0.5, granularity="channel", num_batches=2, progress=False))
    groups = result.plan.channels.groups
    opt = torch.optim.SGD(result.model.parameters(), lr=1e-2)
    sched = DynamicSparsity(result, losses, opt, update_every=1, end_step=20, prune_rate=0.5)
    kinds = {k[0] for k in sched._buffers if isinstance(k[0], str)}
    assert {"norm", "internal"} <= kinds  # LayerNorm keep masks and head masks are moved too
    nodes = {n.name: n for n in result.model.graph.nodes}
    moved = 0
    for step in range(4):
        batch = data[step % len(data)]
        opt.zero_grad()
        out = result.model(batch["input"])
        sum(losses[t](out[t], batch) for t in losses).backward()
        opt.step()
        before = sched.channel_keep
        if sched.step(batch) is None:
            continue
        moved += sum(int((before[g] != k).sum()) for g, k in sched.channel_keep.items())
        flat = groups.keep_vector(sched.channel_keep)
        for name, internal in groups.internal_channels.items():
            mha = result.model.get_submodule(nodes[name].target)
            if not bool(flat[internal["heads"]].all()):
                assert isinstance(mha, Slimmable) and torch.equal(mha.head_keep != 0, flat[internal["heads"]])
        for c in groups.normalizations:
            gids = groups.node_channels[c.arg][c.dim]
            if not bool(flat[gids].all()):
                buf = result.model.get_buffer(f"{MASK_MODULE}.{c.consumer}_norm")
                assert torch.equal(buf != 0, flat[gids])
    assert moved > 0
    slim = dfx.slim(result)  # parity with the masked model checked inside
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("kw, member, key", [
    ({}, "rnn.weight_hh_l0", "hidden"),
    ({"num_layers": 2, "bidirectional": True, "proj_size": 16}, "rnn.weight_hr_l0", "proj"),
], ids=["case09", "projected"])
def test_channel_dynamic_sparsity_moves_an_lstms_units(kw, member, key):
    """case09's model (conv1d -> LSTM -> linear -> two heads): drop/regrow reaches the
    LSTM's hidden units (the MaskedLSTM's hidden_keep buffer; with proj_size, its projected
    units and proj_keep), and the masked model keeps computing what dfx.slim builds."""
    from .rnn_zoo import LOSSES, SeqNet, compress_channels, seq_data

    torch.manual_seed(0)
    data = seq_data(6)
    result = compress_channels(SeqNet("LSTM", **kw), data[:3])
    groups = result.plan.channels.groups
    (units, _), = [gm for gm in groups.members_of(member) if gm[1].dim == 0]
    slim_params0 = sum(p.numel() for p in dfx.slim(result).parameters())
    opt = torch.optim.Adam(result.model.parameters(), lr=1e-2)
    sched = DynamicSparsity(result, LOSSES, opt, update_every=1, end_step=20, prune_rate=0.5)
    assert ("internal", "rnn", key) in sched._buffers
    start = sched.channel_keep[units.id]
    finetune(result, LOSSES, data, 4, dynamic=sched, progress=False)  # an update after every step
    assert [h["step"] for h in sched.history] == [0, 1, 2, 3, 4]
    buffer = getattr(result.model.rnn, f"{key}_keep")
    assert torch.equal(buffer != 0, sched.channel_keep[units.id])
    assert not torch.equal(start, sched.channel_keep[units.id])  # units moved
    assert torch.equal(result.plan.channels.keep[units.id], sched.channel_keep[units.id])
    slim = dfx.slim(result)  # parity with the masked model is checked inside
    assert getattr(slim.rnn, f"{key}_size") == int(start.sum())
    assert sum(p.numel() for p in slim.parameters()) == slim_params0
    x = data[0]["input"]
    with torch.no_grad():
        want, got = result.model.eval()(x), slim.eval()(x)
    for t in want:
        torch.testing.assert_close(got[t], want[t], atol=1e-5 * max(1.0, float(want[t].abs().max())), rtol=0)


def test_finetune_and_dynamic_sparsity_reuse_the_inputs_given_to_compress():
    """Batches whose input sits under 'image': compress's inputs= is remembered by the
    result, so finetune and DynamicSparsity need not be told again (#16)."""
    from .zoo import ZOO_BY_NAME

    entry = ZOO_BY_NAME["two_heads_dict"]
    data = [{("image" if k == "input" else k): v for k, v in b.items()} for b in entry.batches(2)]
    pick = lambda batch: batch["image"]  # noqa: E731
    for granularity in ("element", "channel"):
        result = dfx.compress(entry.build(), entry.task_losses, data, dfx.CompressConfig(
            sparsity=0.5, granularity=granularity, num_batches=2, progress=False), inputs=pick)
        assert result.inputs is pick
        history = dfx.finetune(result, entry.task_losses, data, steps=2, progress=False)
        assert len(history["loss"]) == 2
        opt = torch.optim.SGD(result.model.parameters(), lr=1e-3)
        dynamic = dfx.DynamicSparsity(result, entry.task_losses, opt, end_step=4, update_every=2)
        assert dynamic.inputs is pick
        dfx.finetune(result, entry.task_losses, data, steps=2, progress=False, dynamic=dynamic)
    with pytest.raises(dfx.DisparseError):  # without it the default reads batch["input"]: not there
        dfx.finetune(dfx.CompressionResult(result.model, result.plan), entry.task_losses, data, steps=1,
                     progress=False)
