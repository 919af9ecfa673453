"""Properties of compress() over the zoo: target hit, unanimous rule, top-k, exact masking."""
import copy

import pytest
import torch
from hypothesis import given, strategies as st

import disparse_fx as dfx

from .zoo import ZOO, example_input, outputs_by_task

TOL = 0.0025  # 0.25 percentage points


def tolerance(plan, extra_elements=0):
    """0.25 pp, or the plan's resolution on a tiny model: at the threshold, up to one
    element per task can tie (equal rank ratios), plus elements forced by a floor."""
    numel = sum(m.numel() for m in plan.masks.values())
    return max(TOL, (len(plan.tasks) + extra_elements) / numel)


def run(entry, **cfg):
    model = entry.build()
    cfg.setdefault("num_batches", 2)
    cfg.setdefault("progress", False)
    result = dfx.compress(model, entry.task_losses, entry.batches(cfg["num_batches"]),
                          dfx.CompressConfig(**cfg), inputs=entry.inputs)
    return model, result


zoo_entries = st.sampled_from(ZOO)
criteria = st.sampled_from(["snip", "taylor", "magnitude", "random"])


def check_plan_invariants(plan):
    numel = sum(plan.masks[p].numel() for p in plan.prunable)
    kept = sum(int(plan.masks[p].sum()) for p in plan.prunable)
    assert abs(plan.sparsity - (1 - kept / numel)) < 1e-12
    for p in plan.prunable:
        owners = plan.owners[p]
        assert owners, p
        union = torch.zeros_like(plan.masks[p])
        for t in owners:
            union |= plan.task_masks[t][p]
        # union rule (shared) and follow-your-task rule (task-specific), element by element
        assert torch.equal(plan.masks[p], union), p
        assert int(plan.masks[p].sum()) >= 1, f"{p} pruned to zero"


@given(entry=zoo_entries, sparsity=st.floats(0.0, 0.95), seed=st.integers(0, 2**16), criterion=criteria)
def test_disentangled_plan_hits_target_and_obeys_union_rule(entry, sparsity, seed, criterion):
    _, result = run(entry, sparsity=sparsity, seed=seed, criterion=criterion, min_layer_density=0.0)
    plan = result.plan
    check_plan_invariants(plan)
    # with min_layer_density=0 only the one-element floor can bind; the zoo is big enough
    assert abs(plan.sparsity - sparsity) <= tolerance(plan, extra_elements=len(plan.prunable))


@given(entry=zoo_entries, sparsity=st.floats(0.0, 0.9), seed=st.integers(0, 2**16), criterion=criteria)
def test_target_hit_with_default_floor(entry, sparsity, seed, criterion):
    _, result = run(entry, sparsity=sparsity, seed=seed, criterion=criterion)
    check_plan_invariants(result.plan)
    assert abs(result.plan.sparsity - sparsity) <= tolerance(result.plan)


@given(entry=zoo_entries, sparsity=st.floats(0.1, 0.9), seed=st.integers(0, 100), criterion=criteria)
def test_each_task_mask_is_a_top_k_of_its_scores(entry, sparsity, seed, criterion):
    _, result = run(entry, sparsity=sparsity, seed=seed, criterion=criterion)
    plan = result.plan
    floors = {p: dfx.decision.layer_floor(plan.masks[p].numel(), plan.config.min_layer_density)
              for p in plan.prunable}
    for t, masks in plan.task_masks.items():
        scores = plan.task_scores[t]
        assert set(scores) == set(masks) == {p for p in plan.prunable if t in plan.owners[p]}
        total = sum(float(s.sum()) for s in scores.values())
        assert total == pytest.approx(1.0, rel=1e-4)  # normalised per task
        kept = [scores[p][masks[p]] for p in masks if int(plan.masks[p].sum()) > floors[p]]
        pruned = [scores[p][~masks[p]] for p in masks]
        kept = torch.cat(kept) if kept else torch.empty(0)
        pruned = torch.cat(pruned)
        if len(kept) and len(pruned):
            assert kept.min() >= pruned.max(), t


@given(entry=zoo_entries, sparsity=st.floats(0.0, 0.95), seed=st.integers(0, 2**16), criterion=criteria,
       disentangle=st.booleans())
def test_masked_model_equals_original_with_zeroed_weights(entry, sparsity, seed, criterion, disentangle):
    model, result = run(entry, sparsity=sparsity, seed=seed, criterion=criterion, disentangle=disentangle)
    before = copy.deepcopy(model.state_dict())
    reference = copy.deepcopy(model).eval()
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for p, m in result.plan.masks.items():
            params[p].mul_(m)
    x = example_input(entry)
    masked = result.model.eval()
    got, want = outputs_by_task(masked(x)), outputs_by_task(reference(x))
    assert got.keys() == want.keys()
    for t in want:
        torch.testing.assert_close(got[t], want[t], atol=1e-6, rtol=0)
    # the user's model is bitwise unchanged
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@given(entry=zoo_entries, seed=st.integers(0, 2**16), criterion=criteria, disentangle=st.booleans())
def test_same_seed_same_masks(entry, seed, criterion, disentangle):
    _, r1 = run(entry, sparsity=0.7, seed=seed, criterion=criterion, disentangle=disentangle)
    _, r2 = run(entry, sparsity=0.7, seed=seed, criterion=criterion, disentangle=disentangle)
    for p in r1.plan.masks:
        assert torch.equal(r1.plan.masks[p], r2.plan.masks[p])
    for t in r1.plan.task_masks:
        for p in r1.plan.task_masks[t]:
            assert torch.equal(r1.plan.task_masks[t][p], r2.plan.task_masks[t][p])


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_baseline_plan_is_one_global_top_k(entry):
    _, result = run(entry, sparsity=0.8, criterion="snip", disentangle=False, min_layer_density=0.0)
    plan = result.plan
    check_plan_invariants(plan)
    assert abs(plan.sparsity - 0.8) <= tolerance(plan, extra_elements=len(plan.prunable))
    # every task sees the same global decision over its domain
    for t, masks in plan.task_masks.items():
        for p, m in masks.items():
            assert torch.equal(m, plan.masks[p])


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_plan_covers_every_parameter_and_unused_are_not_pruned(entry):
    model, result = run(entry, sparsity=0.5)
    plan = result.plan
    assert set(plan.owners) == {n for n, _ in model.named_parameters()}
    for p, owners in plan.owners.items():
        if not owners:
            assert p not in plan.masks
    assert plan.config.sparsity == 0.5
    text = result.summary()
    for p in plan.prunable:
        assert p in text
    assert "achieved" in text


def test_disentangled_differs_from_summed_loss_when_tasks_disagree():
    """The reason the library exists: a loud task does not decide for a quiet one."""
    entry = next(e for e in ZOO if e.name == "two_heads_dict")
    loud = {"seg": lambda p, b: 1e4 * torch.nn.functional.cross_entropy(p, b["seg"]),
            "cls": lambda p, b: torch.nn.functional.cross_entropy(p, b["cls"])}
    model = entry.build()
    cfg = dict(sparsity=0.9, num_batches=3, progress=False)
    data = entry.batches(3)
    dis = dfx.compress(model, loud, data, dfx.CompressConfig(disentangle=True, **cfg)).plan
    glob = dfx.compress(model, loud, data, dfx.CompressConfig(disentangle=False, **cfg)).plan
    # the quiet task's own head keeps the same share of its weights in the disentangled
    # plan whatever the loss scale; under the summed loss the loud task takes the budget
    assert dis.density("cls.weight") > glob.density("cls.weight")


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_bfloat16_scores_hit_the_target_and_agree_with_float32(granularity):
    """score_dtype="bfloat16" halves the score memory: same invariants, bfloat16 task
    scores, and masks that differ from float32's only near the threshold."""
    entry = next(e for e in ZOO if e.name == "residual_tuple")  # three tasks, shared trunk
    _, exact = run(entry, sparsity=0.8, granularity=granularity)
    model, half = run(entry, sparsity=0.8, granularity=granularity, score_dtype="bfloat16")
    check_plan_invariants(half.plan)
    assert abs(half.plan.sparsity - exact.plan.sparsity) <= tolerance(half.plan)
    assert all(s.dtype == torch.bfloat16 for per in half.plan.task_scores.values() for s in per.values())
    numel = sum(m.numel() for m in exact.plan.masks.values())
    differ = sum(int((exact.plan.masks[p] != half.plan.masks[p]).sum()) for p in exact.plan.prunable)
    assert differ <= 0.05 * numel, (differ, numel)


def test_score_dtype_is_validated():
    with pytest.raises(dfx.DisparseValueError, match=r"score_dtype must be one of \('float32', 'bfloat16'\)"):
        dfx.CompressConfig(score_dtype="float16")
