"""Attention heads as channels, decided per task.

The transformer zoo (tests/transformer_zoo.py) goes through ``find_channel_groups``,
``compress(granularity="channel")`` and ``slim`` under both attention policies, checked
against the zoo's hand-written facts (which layers each task reaches, heads, head dim).
Two constructed one-layer models give each of two tasks its own heads; their DiSparse
decisions are derived by hand from the decision rule (disparse_fx/channel_decision.py)
and from scores computed here with plain autograd.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import disparse_fx as dfx
from disparse_fx.passes.attention import MultiheadAttention as SlimmableMHA
from disparse_fx.passes.channel_groups import ChannelGroups, find_channel_groups
from disparse_fx.passes.trace import trace_model

from .transformer_zoo import EMBED, HEADS, TRANSFORMER_ZOO, AttentionLayer, HeadRoutedNet, HeadSplitNet, build

MODELS = list(TRANSFORMER_ZOO)
POLICIES = ("heads", "head_dims")


# ----------------------------------------------------------------------------- helpers
def mse_losses(tasks):
    return {t: (lambda t: lambda pred, batch: F.mse_loss(pred, batch[t]))(t) for t in tasks}


def zoo_batch(name: str, seed: int = 0):
    """(model, example input, one batch with random regression targets for every task)."""
    model, x = build(name, seed)
    with torch.no_grad():
        out = model(x)
    gen = torch.Generator().manual_seed(seed + 7)
    return model, x, {"input": x, **{t: torch.randn(v.shape, generator=gen) for t, v in out.items()}}


def channel_config(policy: str, sparsity: float = 0.5, **kw) -> dfx.CompressConfig:
    return dfx.CompressConfig(sparsity=sparsity, granularity="channel", attention=policy, num_batches=1,
                              progress=False, **kw)


_RESULTS: Dict[tuple, object] = {}


def zoo_result(name: str, policy: str, sparsity: float = 0.5):
    """compress() of a zoo model (cached: several tests read the same decision)."""
    key = (name, policy, sparsity)
    if key not in _RESULTS:
        model, x, batch = zoo_batch(name)
        result = dfx.compress(model, mse_losses(batch.keys() - {"input"}), [batch], channel_config(policy, sparsity))
        _RESULTS[key] = (model, x, result)
    return _RESULTS[key]


def head_members(groups: ChannelGroups, param: str):
    """The removable (group, member) pairs that slice ``param`` along dim 0 (its rows):
    an attention layer's head (or head-dim) groups, found from its qkv weight."""
    return [(g, m) for g, m in groups.members_of(param) if m.dim == 0 and g.removable]


def member(group, param: str, dim: int):
    found = [m for m in group.members if m.param_name == param and m.dim == dim]
    assert len(found) == 1, f"{param} dim {dim}: {len(found)} members in {group}"
    return found[0]


def expected_head_index(H: int, D: int, blocks: int = 3) -> Tuple[torch.Tensor, torch.Tensor]:
    """Policy "heads": qkv row ``b*H*D + h*D + d`` -> head h (each of the q, k, v blocks);
    out-projection column ``h*D + d`` -> head h."""
    cols = torch.arange(H).repeat_interleave(D)
    return cols.repeat(blocks), cols


def same_partition(index: torch.Tensor, expected: torch.Tensor) -> bool:
    """``index`` equals ``expected`` up to renaming the channels (a bijection), -1 fixed."""
    if index.shape != expected.shape or not torch.equal(index < 0, expected < 0):
        return False
    pairs = set(zip(index[index >= 0].tolist(), expected[expected >= 0].tolist()))
    return len({a for a, _ in pairs}) == len(pairs) == len({b for _, b in pairs})


def call_node_of(gm: fx.GraphModule, target: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def module_of(layer: AttentionLayer) -> str:
    return layer.qkv.rpartition(".")[0]


def kept_rows(groups: ChannelGroups, keep, param: str) -> torch.Tensor:
    """Rows of ``param`` that slimming keeps: every group slicing dim 0 keeps its channel."""
    rows = torch.ones(groups.param_shapes[param][0], dtype=torch.bool)
    for g, m in groups.members_of(param):
        if m.dim == 0 and g.id in keep:
            sel = m.index >= 0
            rows[sel] &= keep[g.id][m.index[sel]]
    return rows


class AttentionShapes(fx.Interpreter):
    """Runs a GraphModule and records the shapes of q, k, v at every attention product."""

    def __init__(self, gm):
        super().__init__(gm)
        self.sdpa: List[Tuple[torch.Size, ...]] = []
        self.einsum: List[Tuple[str, Tuple[torch.Size, ...]]] = []

    def call_function(self, target, args, kwargs):
        if target is F.scaled_dot_product_attention:
            self.sdpa.append(tuple(a.shape for a in args[:3]))
        elif target is torch.einsum:
            self.einsum.append((args[0], tuple(a.shape for a in args[1:])))
        return super().call_function(target, args, kwargs)


# ----------------------------------------------------------------------------- the zoo: groups
@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_runs_and_traces(name):
    entry = TRANSFORMER_ZOO[name]
    model, x = build(name)
    gm = trace_model(model)
    with torch.no_grad():
        out, traced = model(x), gm(x)
    assert set(out) == set(entry.reach) == set(entry.output_shapes)
    for t, y in out.items():
        assert tuple(y.shape) == (x.shape[0], *entry.output_shapes[t])
        torch.testing.assert_close(traced[t], y)
    params = dict(model.named_parameters())
    for layer in entry.layers:  # the hand-written facts name real parameters of the right shapes
        C = params[layer.qkv].shape[1]
        assert params[layer.qkv].shape == (3 * layer.heads * layer.head_dim, C)
        assert params[layer.out].shape == (C, layer.heads * layer.head_dim)


@pytest.mark.parametrize("name", MODELS)
def test_head_groups_policy_heads(name):
    """One removable group of size H per layer: all q, k, v rows and out-projection columns
    of head h are channel h (head-major order), plus per-head parameters (relative bias)."""
    entry = TRANSFORMER_ZOO[name]
    model, x = build(name)
    gm = trace_model(model)
    groups = find_channel_groups(gm, (x,), attention="heads")
    seen = set()
    for layer in entry.layers:
        found = head_members(groups, layer.qkv)
        assert len(found) == 1, f"{layer.qkv}: {found}"
        g, rows = found[0]
        assert g.id not in seen  # a group per layer
        seen.add(g.id)
        assert g.size == layer.heads and g.keep_one_of == ()
        want_rows, want_cols = expected_head_index(layer.heads, layer.head_dim)
        assert torch.equal(rows.index, want_rows)
        assert torch.equal(member(g, layer.out, 1).index, want_cols)
        if layer.qkv_bias:
            assert torch.equal(member(g, layer.qkv_bias, 0).index, want_rows)
        if layer.bias:
            assert torch.equal(member(g, *layer.bias).index, torch.arange(layer.heads))
        # nothing else: the group holds exactly the layer's own slices
        expected = {(layer.qkv, 0), (layer.out, 1)} | ({(layer.qkv_bias, 0)} if layer.qkv_bias else set()) \
            | ({tuple(layer.bias)} if layer.bias else set())
        assert {(m.param_name, m.dim) for m in g.members} == expected
        if name == "mha":  # the heads live inside the module: internal channels name them
            internal = groups.internal_channels[call_node_of(gm, module_of(layer)).name]
            assert torch.equal(internal["heads"], groups.offsets[g.id] + torch.arange(layer.heads))


@pytest.mark.parametrize("name", MODELS)
def test_head_groups_policy_head_dims(name):
    """Policy "head_dims": a channel is one per-head dim taken in every head; q and k dims go
    together (a channel of size D: row ``b*H*D + h*D + d`` -> dim d for every head h). A
    packed reshape (sdpa) keeps v with them; MultiheadAttention has a separate v-dims group
    that holds the out-projection columns; the einsum layer's chunked q/k/v make one group
    of 2D channels with two split pieces (q/k dims, v dims)."""
    entry = TRANSFORMER_ZOO[name]
    model, x = build(name)
    gm = trace_model(model)
    groups = find_channel_groups(gm, (x,), attention="head_dims")
    for layer in entry.layers:
        H, D = layer.heads, layer.head_dim
        dims = torch.arange(D).repeat(H)  # row h*D + d of one block -> d
        none = torch.full((H * D,), -1)
        found = head_members(groups, layer.qkv)
        if name == "mha":
            assert len(found) == 2
            (gqk, qk), (gv, v) = sorted(found, key=lambda gm_: int((gm_[1].index[:H * D] < 0).sum()))
            assert gqk.size == D and gv.size == D
            assert same_partition(qk.index, torch.cat([dims, dims, none]))
            assert same_partition(v.index, torch.cat([none, none, dims]))
            assert same_partition(member(gv, layer.out, 1).index, dims)
            assert torch.equal(member(gv, layer.out, 1).index, v.index[2 * H * D:])
            assert not any(m.param_name == layer.out for m in gqk.members)
            internal = groups.internal_channels[call_node_of(gm, module_of(layer)).name]
            q_ids = groups.offsets[gqk.id] + qk.index[:H * D]
            v_ids = groups.offsets[gv.id] + v.index[2 * H * D:]
            assert torch.equal(internal["qk_dims"][dims], q_ids)
            assert torch.equal(internal["v_dims"][dims], v_ids)
            continue
        assert len(found) == 1
        g, rows = found[0]
        if name == "einsum":
            assert g.size == 2 * D
            assert same_partition(rows.index, torch.cat([dims, dims, dims + D]))
            out_cols = member(g, layer.out, 1).index
            assert torch.equal(out_cols, rows.index[2 * H * D:])  # v dims = out-projection columns
            pieces = sorted(sorted(p.tolist()) for p in g.keep_one_of)
            assert pieces == sorted([sorted(set(rows.index[:H * D].tolist())),
                                     sorted(set(rows.index[2 * H * D:].tolist()))])
            assert not any(m.param_name == layer.bias[0] for m in g.members)  # heads are not channels here
        else:
            assert g.size == D
            assert same_partition(rows.index, torch.cat([dims, dims, dims]))
            assert torch.equal(member(g, layer.out, 1).index, rows.index[:H * D])
            if layer.qkv_bias:
                assert torch.equal(member(g, layer.qkv_bias, 0).index, rows.index)


# ----------------------------------------------------------------------------- the zoo: decisions
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", MODELS)
def test_compress_slim_union_and_reach(name, policy):
    """compress + slim at 50 %: outputs keep their shapes, parameters shrink; on every head
    group the final keep is the union of the votes of the tasks reaching it, and a task
    that does not reach a layer has no vote on its heads.

    Union (channel_decision.py, disentangle=True): task t votes ``c_t(ch) <= r``; the
    decision keeps ``min_t c_t(ch) <= r`` plus forced channels (the best-ranked channel
    when none passes; the best of every emptied split piece), each forced channel credited
    to the task ranking it best. So ``keep[g] == OR_t task_keep[t][g]`` exactly, and every
    group keeps at least one channel.
    """
    entry = TRANSFORMER_ZOO[name]
    model, x, result = zoo_result(name, policy)
    plan = result.plan.channels
    groups = plan.groups
    for layer in entry.layers:
        for g, _ in head_members(groups, layer.qkv):
            reaching = {t for t, layers in entry.reach.items() if layer.qkv in layers}
            voters = {t for t, votes in plan.task_keep.items() if g.id in votes}
            assert voters == reaching, f"{layer.qkv} group {g.id}"
            assert set(plan.scores) >= reaching and {t for t in plan.scores if g.id in plan.scores[t]} == reaching
            union = torch.zeros(g.size, dtype=torch.bool)
            for t in reaching:
                assert plan.task_keep[t][g.id].dtype == torch.bool and plan.task_keep[t][g.id].shape == (g.size,)
                union |= plan.task_keep[t][g.id]
            assert torch.equal(plan.keep[g.id], union), f"{layer.qkv} group {g.id}"
            assert plan.keep[g.id].any()
            for piece in g.keep_one_of:
                assert plan.keep[g.id][piece].any()
    if "mid" in entry.reach:  # mid branches off block 0: a vote there, none on blocks 1 and 2
        assert all(g.id in plan.task_keep["mid"] for g, _ in head_members(groups, entry.layers[0].qkv))
        assert not any(g.id in plan.task_keep["mid"] for layer in entry.layers[1:]
                       for g, _ in head_members(groups, layer.qkv))
    assert abs(result.plan.sparsity - 0.5) < 0.1
    slim = dfx.slim(result)
    with torch.no_grad():
        out, small = model(x), slim(x)
    assert {t: v.shape for t, v in small.items()} == {t: v.shape for t, v in out.items()}
    n_model = sum(p.numel() for p in model.parameters())
    n_slim = sum(p.numel() for p in slim.parameters())
    assert n_slim < n_model
    # a different batch size runs through the rewritten reshapes, as the masked model does
    x3 = entry.make_input(torch.Generator().manual_seed(11), 3)
    with torch.no_grad():
        masked, small3 = result.model(x3), slim(x3)
    for t in masked:
        torch.testing.assert_close(small3[t], masked[t], atol=1e-5, rtol=1e-4)


def _channel_scores_from_elements(plan, groups: ChannelGroups, task) -> Dict[int, torch.Tensor]:
    """Channel scores by their definition: the sum of the task's element scores over the
    prunable slices of every channel, then normalised to sum 1 over the task's groups."""
    elements = plan.task_scores[task]
    raw = {}
    for g in groups.removable_groups():
        for m in g.members:
            s = elements.get(m.param_name)
            if s is None:
                continue
            dims = [d for d in range(s.dim()) if d != m.dim]
            per = s.double().sum(dims) if dims else s.double()
            sel = m.index >= 0
            acc = raw.setdefault(g.id, torch.zeros(g.size, dtype=torch.float64))
            acc.index_add_(0, m.index[sel], per[sel])
    total = sum(float(v.sum()) for v in raw.values())
    return {gid: v / total for gid, v in raw.items()}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", MODELS)
def test_head_scores_per_task_sum_to_one(name, policy):
    """scores[t][g] >= 0; over the groups t reaches they sum to 1; and the head groups'
    scores are the sums of t's element scores over each head's (or head dim's) slices."""
    entry = TRANSFORMER_ZOO[name]
    _, _, result = zoo_result(name, policy)
    plan = result.plan.channels
    for t, per in plan.scores.items():
        assert all(bool((s >= 0).all()) for s in per.values())
        assert abs(sum(float(s.double().sum()) for s in per.values()) - 1.0) < 1e-5
        expected = _channel_scores_from_elements(result.plan, plan.groups, t)
        assert set(per) == set(expected)
        for layer in entry.layers:
            for g, _ in head_members(plan.groups, layer.qkv):
                if layer.qkv in entry.reach[t]:
                    torch.testing.assert_close(per[g.id].double(), expected[g.id], atol=1e-6, rtol=1e-4)
                    assert float(per[g.id].sum()) > 0


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", MODELS)
def test_slim_head_count_and_head_dim(name, policy):
    """"heads": the slim layers have fewer heads of the same width; "head_dims": the same
    head count, narrower heads. Checked on the slim model's parameters, on the q/k/v
    shapes at its attention products, and on the rebuilt MultiheadAttention."""
    entry = TRANSFORMER_ZOO[name]
    _, x, result = zoo_result(name, policy, 0.8)
    plan = result.plan.channels
    slim = dfx.slim(result)
    params = dict(slim.named_parameters())
    recorder = AttentionShapes(slim)
    with torch.no_grad():
        recorder.run(x)
    B, changed = x.shape[0], 0
    qk_products = [shapes for eq, shapes in recorder.einsum if eq.replace(" ", "") == "bhid,bhjd->bhij"]
    v_products = [shapes for eq, shapes in recorder.einsum if eq.replace(" ", "") == "bhij,bhjd->bhid"]
    for i, layer in enumerate(entry.layers):
        H, D = layer.heads, layer.head_dim
        rows = kept_rows(plan.groups, plan.keep, layer.qkv).view(3, H * D)
        q_rows, v_rows = int(rows[0].sum()), int(rows[2].sum())
        assert int(rows[1].sum()) == q_rows
        if policy == "heads":
            assert q_rows % D == 0 and v_rows == q_rows
            heads, dqk, dv = q_rows // D, D, D
        else:
            assert q_rows % H == 0 and v_rows % H == 0
            heads, dqk, dv = H, q_rows // H, v_rows // H
        changed += (heads, dqk, dv) != (H, D, D)
        assert params[layer.qkv].shape[0] == heads * (2 * dqk + dv)
        assert params[layer.out].shape[1] == heads * dv
        if name == "mha":
            m = slim.get_submodule(module_of(layer))
            if (heads, dqk, dv) != (H, D, D):
                assert isinstance(m, SlimmableMHA)
            assert (m.num_heads, m.head_dim, getattr(m, "v_head_dim", m.head_dim)) == (heads, dqk, dv)
        elif name == "einsum":
            L = x.shape[-1] // 4 * x.shape[-2] // 4
            assert qk_products[i] == ((B, heads, L, dqk), (B, heads, L, dqk))
            assert v_products[i][1] == (B, heads, L, dv)
        else:
            q, k, v = recorder.sdpa[i]
            assert q[:2] == k[:2] == v[:2] == (B, heads)
            assert q[-1] == k[-1] == dqk and v[-1] == dv
    assert changed, "80 % sparsity changes at least one attention layer of every zoo model"
    if name == "mha":
        assert len(recorder.sdpa) == 0  # leaf modules: no product in the graph


# ----------------------------------------------------------------------------- exact per-task heads
def head_snip_scores(model: nn.Module, x: torch.Tensor, loss, H: int, D: int) -> torch.Tensor:
    """Per-head snip score of ``loss(model(x))`` by plain autograd: sum of |grad * w| over
    the head's q, k, v rows of ``qkv.weight`` and its columns of the task projections
    (column j of a projection reading heads ``first..`` belongs to head first + j // D)."""
    named = {"qkv.weight": model.qkv.weight, "proj_a.weight": model.proj_a.weight,
             "proj_b.weight": model.proj_b.weight}
    with torch.enable_grad():
        value = loss(model(x))
        grads = torch.autograd.grad(value, list(named.values()), allow_unused=True)
    per_head = torch.zeros(H, dtype=torch.float64)
    for (name, w), g in zip(named.items(), grads):
        if g is None:
            continue
        s = (g * w).detach().abs().double()
        if name == "qkv.weight":
            per_head += s.sum(1).view(3, H, D).sum((0, 2))
        else:
            cols = s.sum(0)
            first = H // 2 if (name == "proj_b.weight" and cols.numel() < H * D) else 0
            per_head[first:first + cols.numel() // D] += cols.view(-1, D).sum(1)
    return per_head


def exact_case(factory, seed: int = 0, b_weight: float = 1e-3):
    """Model, input, batch and losses; task b's loss is scaled by ``b_weight`` (DiSparse
    ranks each task on its own scores, so the scale cannot matter to it)."""
    torch.manual_seed(seed)
    model = factory().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, 8, EMBED, generator=gen)
    batch = {"input": x, "a": torch.randn(2, 8, 3, generator=gen), "b": torch.randn(2, 8, 3, generator=gen)}
    losses = {"a": lambda p, b: F.mse_loss(p, b["a"]), "b": lambda p, b: b_weight * F.mse_loss(p, b["b"])}
    return model, x, batch, losses


def hand_scores(model, x, batch, losses):
    """(S_a, S_b, S_sum): per-head snip scores of each task and of the summed loss."""
    H, D = HEADS, EMBED // HEADS
    s_a = head_snip_scores(model, x, lambda out: losses["a"](out["a"], batch), H, D)
    s_b = head_snip_scores(model, x, lambda out: losses["b"](out["b"], batch), H, D)
    s_sum = head_snip_scores(model, x, lambda out: losses["a"](out["a"], batch) + losses["b"](out["b"], batch), H, D)
    half = H // 2
    # the construction: each task's gradient is exactly zero on the other task's heads ...
    assert torch.all(s_a[half:] == 0) and torch.all(s_b[:half] == 0)
    assert torch.all(s_a[:half] > 0) and torch.all(s_b[half:] > 0)
    # ... so the summed loss's score is their sum, head by head
    torch.testing.assert_close(s_sum, s_a + s_b, rtol=1e-5, atol=0)
    return s_a, s_b, s_sum


def the_head_group(result):
    plan = result.plan.channels
    removable = plan.groups.removable_groups()
    assert len(removable) == 1  # x is a graph input, outputs are tasks: only the heads can go
    return plan, removable[0]


def as_set(mask: torch.Tensor) -> set:
    return set(torch.nonzero(mask).flatten().tolist())


@pytest.mark.parametrize("factory", [HeadSplitNet, HeadRoutedNet], ids=["split", "routed"])
def test_disparse_keeps_each_tasks_best_head(factory):
    """Heads 0-1 serve only task a, heads 2-3 only task b; every head costs the same
    (3*D*C qkv weights + the projection columns that read it).

    Task a's scores are zero on heads 2-3, so a ranks its heads first: c_a = 1/4 for its
    best head a*, 2/4 for the other, 3/4 and 1 for b's heads (tied zeros, in a seeded
    order); symmetrically for b. c_min over the tasks is 1/4 on {a*, b*} and 2/4 on the
    other two, so the thresholds are {1/4, 2/4}: r = 1/4 removes exactly half the heads
    and half the prunable weights (sparsity 0.5 = the target), r = 2/4 removes none.
    Hence: keep == {a*, b*}; a votes to keep only a* (removing both of b's heads and its
    own second head), b only b*; no task loses all its heads. Task b's loss is scaled by
    1e-3: the per-task ranking does not see it.
    """
    model, x, batch, losses = exact_case(factory)
    s_a, s_b, _ = hand_scores(model, x, batch, losses)
    a_best, b_best = int(torch.argmax(s_a[:2])), 2 + int(torch.argmax(s_b[2:]))
    assert s_a[0] != s_a[1] and s_b[2] != s_b[3]  # no ties among a task's own heads
    result = dfx.compress(model, losses, [batch], channel_config("heads", 0.5))
    plan, g = the_head_group(result)
    assert g.size == HEADS
    assert result.plan.sparsity == pytest.approx(0.5, abs=1e-12)
    assert as_set(plan.keep[g.id]) == {a_best, b_best}
    assert as_set(plan.task_keep["a"][g.id]) == {a_best}
    assert as_set(plan.task_keep["b"][g.id]) == {b_best}
    # the reported scores are the hand-computed ones, normalised per task
    torch.testing.assert_close(plan.scores["a"][g.id].double(), s_a / s_a.sum(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(plan.scores["b"][g.id].double(), s_b / s_b.sum(), rtol=1e-4, atol=1e-7)
    slim = dfx.slim(result)
    assert slim.get_parameter("qkv.weight").shape == (3 * 2 * (EMBED // HEADS), EMBED)


def test_summed_score_may_remove_all_of_a_tasks_heads():
    """disentangle=False ranks the heads once, on the summed loss, whose score is S_a + S_b
    head by head. With task b's loss scaled by 1e-3 both of a's heads outrank both of b's
    (checked below), so the thresholds are c = 1/4..1 and r = 2/4 keeps the top two:
    heads {0, 1}, exactly sparsity 0.5. Task b is left with no head: its slim output no
    longer depends on the input. DiSparse on the same model and losses keeps {a*, b*}
    (test_disparse_keeps_each_tasks_best_head)."""
    model, x, batch, losses = exact_case(HeadRoutedNet)
    _, _, s_sum = hand_scores(model, x, batch, losses)
    assert float(s_sum[:2].min()) > float(s_sum[2:].max())  # the premise
    result = dfx.compress(model, losses, [batch], channel_config("heads", 0.5, disentangle=False))
    plan, g = the_head_group(result)
    assert result.plan.sparsity == pytest.approx(0.5, abs=1e-12)
    assert as_set(plan.keep[g.id]) == {0, 1}
    for t in ("a", "b"):  # one global decision: each task sees the final keep
        assert torch.equal(plan.task_keep[t][g.id], plan.keep[g.id])
    slim = dfx.slim(result)
    other = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y, y_other = slim(x), slim(other)
    torch.testing.assert_close(y["b"], y_other["b"])  # b reads no head: bias only
    assert not torch.allclose(y["a"], y_other["a"])


def test_summed_score_on_split_heads_keeps_a_head_of_each_piece():
    """With the heads split by slicing (o[:, :2] / o[:, 2:]) each slice is a split piece
    that must keep a head. The summed ranking (a's heads above b's, as above) gives
    c = 1/4 to the best head overall, a*; at r = 1/4 piece {2, 3} is empty, so its best
    head by the summed score, b*, is forced: keep {a*, b*}, sparsity 0.5 (r = 2/4 would keep
    three heads: 0.25). The same set as DiSparse, but only by the structural floor."""
    model, x, batch, losses = exact_case(HeadSplitNet)
    s_a, s_b, s_sum = hand_scores(model, x, batch, losses)
    assert float(s_sum[:2].min()) > float(s_sum[2:].max())
    result = dfx.compress(model, losses, [batch], channel_config("heads", 0.5, disentangle=False))
    plan, g = the_head_group(result)
    assert sorted(sorted(p.tolist()) for p in g.keep_one_of) == [[0, 1], [2, 3]]
    assert as_set(plan.keep[g.id]) == {int(torch.argmax(s_sum)), 2 + int(torch.argmax(s_sum[2:]))}
    assert result.plan.sparsity == pytest.approx(0.5, abs=1e-12)


def test_head_dims_policy_on_split_heads_keeps_the_head_count():
    """Under "head_dims" the heads cannot be told apart (a channel is one dim of every
    head): both tasks reach every channel, and the slim layer keeps its 4 heads."""
    model, x, batch, losses = exact_case(HeadSplitNet)
    result = dfx.compress(model, losses, [batch], channel_config("head_dims", 0.5))
    plan, g = the_head_group(result)
    assert g.size == EMBED // HEADS
    assert set(plan.task_keep) == {"a", "b"} and all(g.id in v for v in plan.task_keep.values())
    assert torch.equal(plan.keep[g.id], plan.task_keep["a"][g.id] | plan.task_keep["b"][g.id])
    slim = dfx.slim(result)
    recorder = AttentionShapes(slim)
    with torch.no_grad():
        recorder.run(x)
    (q, k, v), = recorder.sdpa
    kept = int(plan.keep[g.id].sum())
    assert kept < EMBED // HEADS
    assert q == k == v == (2, HEADS, 8, kept)


def test_round_to_holds_with_split_head_pieces():
    """round_to=2 on the 4 heads of HeadSplitNet, summed score (a's heads above b's, as in
    test_summed_score_on_split_heads_keeps_a_head_of_each_piece). At every threshold r < 1
    the summed ranking keeps 1 or 2 of a's heads, rounded up to 2 = {0, 1}; piece {2, 3}
    is then empty and its best head is forced; the count (3) is rounded again, so the
    contract ("kept counts are rounded up to a multiple of N, capped at the group size")
    holds together with "every split piece keeps a channel": 4 heads. Nothing can go then,
    so the target is out of reach: it raises, and best_effort=True accepts the plan."""
    model, x, batch, losses = exact_case(HeadSplitNet)
    with pytest.raises(dfx.TargetUnreachableError, match="removes at most 0.0000"):
        dfx.compress(model, losses, [batch], channel_config("heads", 0.5, round_to=2, disentangle=False))
    result = dfx.compress(model, losses, [batch], channel_config("heads", 0.5, round_to=2, disentangle=False,
                                                                 best_effort=True))
    plan, g = the_head_group(result)
    assert int(plan.keep[g.id].sum()) in (2, 4)
