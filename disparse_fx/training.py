"""Training a compressed model: dynamic DiSparse (sparse training) and fine-tuning.

:class:`DynamicSparsity` is a callback for the user's own loop (method.md, "Dynamic
variant"): masks start from ERK per-layer densities with random positions (or from
the plan), and every ``update_every`` steps until ``end_step`` each layer drops the
fraction ``p`` (cosine-decayed from ``prune_rate`` to 0) of its live weights with the
smallest magnitude, then regrows as many pruned positions by per-task gradient
magnitude. A shared layer regrows the union of its tasks' picks, trimmed back to the
layer's budget by the best per-task normalised score; a task-specific layer regrows its
task's pick. Per-layer live counts are conserved, so the sparsity never moves.

::

    result = dfx.compress(model, task_losses, data, dfx.CompressConfig(sparsity=0.9))
    opt = torch.optim.Adam(result.model.parameters(), lr=1e-3)
    sched = DynamicSparsity(result, task_losses, opt, end_step=15_000)
    for batch in loader:
        loss = ...; opt.zero_grad(); loss.backward(); opt.step()
        sched.step(batch)

On a result compressed with ``granularity="channel"`` the same call builds a
:class:`ChannelDynamicSparsity`: the units are the channels of the plan's removable
channel groups, training starts from the plan's channel keep, channels are dropped by
magnitude and regrown by ``|dL_t / d channel mask|`` with the same union rule, per-group
live counts (hence the sparsity after slimming) are conserved, and ``result.plan`` follows
the live channels so ``dfx.slim(result)`` slims what was trained.

:func:`finetune` is the loop for users without one.

Under ``torch.distributed`` (e.g. the model wrapped in DistributedDataParallel) every
rank takes the same decisions: magnitudes are identical because DDP keeps parameters
in sync, the regrowth gradients are averaged across ranks before ranking, and ties are
broken by a seeded order that depends only on (seed, step, layer).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm

from disparse_fx.passes.insert_channel_masks import MASK_MODULE, mask_plan, norm_mask_name
from disparse_fx.passes.insert_masks import masked_params

from . import distributed
from .channel_decision import _element_masks, prunable_sparsity
from .decision import layer_floor
from .errors import DisparseValueError, LossError, NotEnoughBatchesError, PostconditionError
from .importance import _forked_rng, _losses, default_inputs
from .result import CompressionResult
from .validate import to_device

__all__ = ["DynamicSparsity", "ChannelDynamicSparsity", "UpdateRecord",
           "erk_densities", "finetune", "ERK_POWER", "INITS", "OPTIMIZERS", "LR_SCHEDULES"]

log = logging.getLogger(__name__)

#: Exponent of the ERK rule (method.md): density ~ (sum of dims / product of dims) ** ERK_POWER.
ERK_POWER = 0.9
INITS = ("erk", "plan")
OPTIMIZERS = ("adam", "adamw", "sgd")
#: Learning-rate schedules of finetune(): the optimizer's lr throughout, or cosine
#: annealing from it to 0 over the steps (Loshchilov & Hutter, SGDR, ICLR 2017).
LR_SCHEDULES = ("constant", "cosine")

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


# ---------------------------------------------------------------- ERK
def erk_densities(shapes: Mapping[str, Sequence[int]], density: float, *,
                  power: float = ERK_POWER) -> Dict[str, float]:
    """Erdos-Renyi-Kernel per-layer densities whose element-weighted mean is ``density``.

    ``raw[l] = (sum(shape[l]) / prod(shape[l])) ** power`` and ``density[l] = eps * raw[l]``
    with ``eps`` solved so that ``sum_l density[l] * numel[l] == density * sum_l numel[l]``;
    a layer whose density would exceed 1 is made dense and ``eps`` is solved again over
    the others.

    >>> erk_densities({"small": (4, 4), "big": (16, 16)}, 0.5, power=1.0)
    {'small': 1.0, 'big': 0.46875}
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise DisparseValueError(f"density must be a number in (0, 1], got {density!r}")
    numel = {p: math.prod(s) for p, s in shapes.items()}
    raw = {p: (sum(s) / numel[p]) ** power for p, s in shapes.items()}
    total = sum(numel.values())
    dense: set = set()
    eps = 0.0
    while True:
        budget = density * total - sum(numel[p] for p in dense)
        divisor = sum(raw[p] * numel[p] for p in numel if p not in dense)
        if divisor <= 0.0:
            break
        eps = budget / divisor
        # Making the largest offenders dense only raises eps, so every layer over 1 now
        # stays over 1: they can all be made dense at once.
        over = [p for p in numel if p not in dense and eps * raw[p] > 1.0]
        if not over:
            break
        dense.update(over)
    return {p: 1.0 if p in dense else eps * raw[p] for p in shapes}


def _apportion(ideal: Mapping[str, float], lower: Mapping[str, int], upper: Mapping[str, int],
               target: int) -> Dict[str, int]:
    """Integer counts within [lower, upper], summing to ``target``, closest to ``ideal``.

    Largest-remainder rounding: start from the floors, then add (or remove) one element
    at a time where the rounding error is largest.
    """
    counts = {p: min(max(math.floor(x), lower[p]), upper[p]) for p, x in ideal.items()}
    diff = target - sum(counts.values())
    while diff != 0:
        step = 1 if diff > 0 else -1
        room = [p for p in counts if (counts[p] < upper[p] if step > 0 else counts[p] > lower[p])]
        if not room:
            raise DisparseValueError(
                f"cannot keep {target} elements with per-layer bounds summing to "
                f"[{sum(lower.values())}, {sum(upper.values())}]")
        room.sort(key=lambda p: (ideal[p] - counts[p]) * step, reverse=True)
        for p in room[: abs(diff)]:
            counts[p] += step
        diff = target - sum(counts.values())
    return counts


# ---------------------------------------------------------------- dynamic sparsity
@dataclass(frozen=True)
class UpdateRecord:
    """What one mask update decided (kept for inspection; element masks are flat).

    ``dropped``: positions removed by magnitude; ``task_picks``: {param: {task: positions
    that task would regrow}}; ``regrow``: positions regrown (the task's pick, or the
    union trimmed to the budget for shared layers; it may re-pick just-dropped
    positions, which then keep their value); ``grown`` / ``pruned``: net changes of the
    mask; ``scores``: {param: {task: |grad| normalised to sum 1 over the task's domain}}.
    At channel granularity every mapping is keyed by channel group id instead of
    parameter name and holds one flag (or score) per channel of the group.
    """

    step: int
    prune_fraction: float
    dropped: Mapping[str, torch.Tensor]
    task_picks: Mapping[str, Mapping[Hashable, torch.Tensor]]
    regrow: Mapping[str, torch.Tensor]
    grown: Mapping[str, torch.Tensor]
    pruned: Mapping[str, torch.Tensor]
    scores: Mapping[str, Mapping[Hashable, torch.Tensor]]


class DynamicSparsity:
    """Dynamic DiSparse: prune by magnitude and regrow by per-task gradient, in place.

    ``result``: a :class:`CompressionResult` whose ``model`` is trained (wrap it in
    DistributedDataParallel if you like: the scheduler edits its parameters and mask
    buffers in place). ``task_losses``: as for :func:`compress`. ``optimizer``: the
    optimizer stepping the model's parameters; its per-element state (Adam moments,
    SGD momentum, ...) is reset where the mask changes.

    Call :meth:`step` with the batch after every ``optimizer.step()``. On steps that are
    multiples of ``update_every`` and below ``end_step`` the masks are updated:
    the drop fraction is ``prune_rate * (1 + cos(pi * step / end_step)) / 2``.

    ``init="erk"`` (the default; channel results take ``"plan"`` and refuse ``"erk"``,
    see :class:`ChannelDynamicSparsity`): ERK per-layer densities (:func:`erk_densities`) at the plan's target
    sparsity with seeded random positions - training from scratch. Live positions that
    ``compress`` had zeroed are redrawn from PyTorch's default conv/linear init,
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (seeded); the others keep their values.
    ``init="plan"``: keep the plan's masks and the weights as they are.

    Regrown weights start at exactly zero with zero optimizer state; pruned weights are
    zero in the stored tensor (and re-zeroed after every optimizer step), not only
    masked. ``masks``, ``sparsity``, ``history`` and ``last_update`` describe the state.
    """

    def __init__(
        self,
        result: CompressionResult,
        task_losses: Union[Mapping[Hashable, LossFn], Sequence[LossFn]],
        optimizer: torch.optim.Optimizer,
        *,
        end_step: int,
        update_every: int = 50,
        prune_rate: float = 0.5,
        inputs: Optional[Callable[[Any], Any]] = None,
        init: Optional[str] = None,
        seed: int = 0,
    ):
        plan = self._setup(result, task_losses, optimizer, end_step=end_step, update_every=update_every,
                           prune_rate=prune_rate, inputs=inputs, init="erk" if init is None else init, seed=seed)
        init = self.init
        if plan.config.granularity == "channel" or plan.channels is not None:
            raise DisparseValueError(  # only reachable by calling DynamicSparsity.__init__ directly
                "a channel-granularity result needs the channel scheduler: call DynamicSparsity(...)")
        self._gm_names = _resolve_mask_names(self.model, self.prunable)
        bufs = masked_params(self.model)
        self._weights = {p: self.model.get_parameter(self._gm_names[p]) for p in self.prunable}
        self._masks = {p: bufs[self._gm_names[p]] for p in self.prunable}
        in_opt = {id(q) for g in optimizer.param_groups for q in g["params"]}
        for p in self.prunable:
            if id(self._weights[p]) not in in_opt:
                raise DisparseValueError(
                    f"optimizer does not update parameter {p!r} of result.model; build it from "
                    "result.model.parameters() (or the DDP wrapper's, which are the same tensors)")

        if init == "erk":
            self._init_erk()
        mismatches = self._sync_masks()
        self._kept = {p: int(self._masks[p].count_nonzero()) for p in self.prunable}
        self.target_sparsity = self.sparsity
        self._record(0, 0.0, 0, 0, mismatches)
        log.info("DynamicSparsity: init=%s, %d layers, sparsity %.4f, update every %d steps until %d",
                 init, len(self.prunable), self.sparsity, update_every, end_step)

    def __new__(cls, result: Any = None, *args: Any, **kwargs: Any):
        # A channel-granularity result gets the channel-group scheduler (same API).
        plan = getattr(result, "plan", None)
        if cls is DynamicSparsity and (getattr(getattr(plan, "config", None), "granularity", None) == "channel"
                                       or getattr(plan, "channels", None) is not None):
            cls = ChannelDynamicSparsity
        return super().__new__(cls)

    def _setup(self, result, task_losses, optimizer, *, end_step, update_every, prune_rate, inputs, init, seed):
        """Argument checks and the state both granularities share; returns the plan."""
        if not (hasattr(result, "model") and hasattr(result, "plan")):
            raise DisparseValueError(
                f"result must be the CompressionResult returned by compress(), got {type(result).__name__}")
        plan = result.plan
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise DisparseValueError(
                f"optimizer must be a torch.optim.Optimizer over the model's parameters, got "
                f"{type(optimizer).__name__}")
        _check_int("update_every", update_every, 1)
        _check_int("end_step", end_step, 1)
        _check_int("seed", seed, None)
        if isinstance(prune_rate, bool) or not isinstance(prune_rate, (int, float)) or not 0.0 <= prune_rate <= 1.0:
            raise DisparseValueError(f"prune_rate must be a number in [0, 1], got {prune_rate!r}")
        if init not in INITS:
            raise DisparseValueError(f"init must be one of {INITS}, got {init!r}")
        if inputs is not None and not callable(inputs):
            raise DisparseValueError(
                f"inputs must be a callable batch -> model input(s), got {type(inputs).__name__}")
        from .api import _match_task_losses  # api imports this module's siblings only

        self.model = result.model
        self.plan = plan
        self.optimizer = optimizer
        self.task_losses = _match_task_losses(task_losses, plan.tasks)
        self.update_every, self.end_step = update_every, end_step
        self.prune_rate, self.init, self.seed = float(prune_rate), init, seed
        self.inputs = inputs or result.inputs or default_inputs  # compress's inputs= unless given
        self.prunable: Tuple[str, ...] = tuple(plan.prunable)

        self.domains = {t: tuple(p for p in self.prunable if t in plan.owners[p]) for t in plan.tasks}
        self.domains = {t: d for t, d in self.domains.items() if d}

        self.step_count = 0
        self.history: List[Dict[str, Any]] = []
        self.last_update: Optional[UpdateRecord] = None
        return plan

    # -------------------------------------------------------- state
    @property
    def masks(self) -> Dict[str, torch.Tensor]:
        """{param: bool keep-mask} (original parameter names, copies)."""
        return {p: self._masks[p] != 0 for p in self.prunable}

    @property
    def sparsity(self) -> float:
        kept = sum(int(m.count_nonzero()) for m in self._masks.values())
        return 1.0 - kept / sum(m.numel() for m in self._masks.values())

    def densities(self) -> Dict[str, float]:
        return {p: float(self._masks[p].count_nonzero()) / self._masks[p].numel() for p in self.prunable}

    def prune_fraction(self, step: int) -> float:
        """Cosine decay from ``prune_rate`` at step 0 to 0 at ``end_step``."""
        if step >= self.end_step:
            return 0.0
        return self.prune_rate * (1.0 + math.cos(math.pi * step / self.end_step)) / 2.0

    def state_dict(self) -> Dict[str, Any]:
        """The scheduler's own state (masks live in the model's state_dict)."""
        return {"step_count": self.step_count, "history": list(self.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.history = list(state["history"])

    # -------------------------------------------------------- the callback
    def step(self, batch: Any) -> Optional[Dict[str, Any]]:
        """Call after each ``optimizer.step()``; returns the history entry when masks changed."""
        self.step_count += 1
        self._apply_masks_()
        if self.step_count % self.update_every == 0 and self.step_count < self.end_step:
            return self.update(batch)
        return None

    @torch.no_grad()
    def _apply_masks_(self) -> None:
        """Re-zero pruned weights: whatever the optimizer did (decay, momentum), they stay 0."""
        for p in self.prunable:
            self._weights[p].mul_(self._masks[p])

    def update(self, batch: Any) -> Dict[str, Any]:
        """Prune and regrow now (``step`` calls this on schedule), using ``batch`` for gradients."""
        t0 = time.perf_counter()
        step = self.step_count
        frac = self.prune_fraction(step)
        scores = self._regrowth_scores(batch)
        rec = dict(dropped={}, task_picks={}, regrow={}, grown={}, pruned={}, scores={})
        n_grown = n_pruned = 0
        for li, p in enumerate(self.prunable):
            mask = self._masks[p]
            live = (mask != 0).reshape(-1)
            n_live, numel = int(live.sum()), live.numel()
            k = int(frac * n_live)
            if k == 0 or n_live == numel:
                continue
            order = self._tie_order(step, li, numel, live.device)
            w = self._weights[p].detach().reshape(-1).abs().float()
            dropped = _top_k(-w, live, k, order)
            candidates = ~(live & ~dropped)
            layer_scores = {t: scores[t][p].reshape(-1) for t in self.plan.tasks
                            if t in scores and p in scores[t]}
            picks = {t: _top_k(s, candidates, k, order) for t, s in layer_scores.items()}
            if len(picks) > 1:  # shared: union of the tasks' picks, trimmed by the best score
                union = torch.stack(list(picks.values())).any(0)
                best = torch.stack(list(layer_scores.values())).amax(0)
                regrow = _top_k(best, union, k, order)
            else:
                regrow = next(iter(picks.values()))
            new_live = (live & ~dropped) | regrow
            grown, pruned = new_live & ~live, live & ~new_live
            self._set_mask(p, new_live, grown | pruned)
            n_grown += int(grown.sum())
            n_pruned += int(pruned.sum())
            rec["dropped"][p], rec["task_picks"][p], rec["regrow"][p] = dropped, picks, regrow
            rec["grown"][p], rec["pruned"][p], rec["scores"][p] = grown, pruned, layer_scores
        mismatches = self._sync_masks()
        self._check_counts()
        self.last_update = UpdateRecord(step=step, prune_fraction=frac, **rec)
        entry = self._record(step, frac, n_pruned, n_grown, mismatches)
        log.debug("step %d: drop fraction %.4f, %d pruned / %d regrown, sparsity %.4f (%.3fs)",
                 step, frac, n_pruned, n_grown, entry["sparsity"], time.perf_counter() - t0)
        return entry

    # -------------------------------------------------------- internals
    def _tie_order(self, step: int, layer: int, numel: int, device) -> torch.Tensor:
        """A seeded permutation: the same on every rank for a given (seed, step, layer)."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 10_007 + layer)
        return torch.randperm(numel, generator=gen).to(device)

    def _regrowth_scores(self, batch: Any) -> Dict[Hashable, Dict[str, torch.Tensor]]:
        """Per task: |dense gradient| over its domain, normalised to sum 1 (rank-averaged).

        One forward with every mask buffer replaced by ones (pruned weights are exactly
        zero, so the output is unchanged) and one ``autograd.grad`` per task with respect
        to detached copies of the weights: the gradient a weight WOULD get if unmasked.
        Buffers are passed as clones, so BatchNorm statistics are not updated.
        """
        gm = self.model
        device = self._weights[self.prunable[0]].device
        mask_names = {self._gm_names[p] + "_mask" for p in self.prunable}
        buffers = {n: (torch.ones_like(b) if n in mask_names else b.detach().clone())
                   for n, b in gm.named_buffers()}
        leaves = {self._gm_names[p]: self._weights[p].detach().requires_grad_(True) for p in self.prunable}
        batch = to_device(batch, device)
        args = self.inputs(batch)
        args = args if isinstance(args, tuple) else (args,)
        with _forked_rng(device, self.seed + self.step_count):
            outputs = torch.func.functional_call(gm, (leaves, buffers), args, strict=False)
        losses = _losses(outputs, self.task_losses, batch, self.step_count)
        tasks = list(self.domains)
        grads: Dict[Hashable, Dict[str, torch.Tensor]] = {}
        for i, t in enumerate(tasks):
            dom = self.domains[t]
            g = torch.autograd.grad(losses[t], [leaves[self._gm_names[p]] for p in dom],
                                    retain_graph=i < len(tasks) - 1, allow_unused=True)
            grads[t] = {p: (torch.zeros(self._weights[p].shape, device=device) if gi is None else gi.float())
                        for p, gi in zip(dom, g)}
        del outputs, losses
        for t in tasks:  # signed gradients averaged: the gradient of the global batch
            distributed.all_reduce_mean_([grads[t][p] for p in self.domains[t]])
        scores = {}
        for t in tasks:
            mags = {p: g.abs() for p, g in grads[t].items()}
            total = sum(float(m.sum()) for m in mags.values())
            scores[t] = {p: (m / total if total > 0 else m) for p, m in mags.items()}
        return scores

    @torch.no_grad()
    def _set_mask(self, p: str, keep_flat: torch.Tensor, changed_flat: torch.Tensor) -> None:
        mask, weight = self._masks[p], self._weights[p]
        keep = keep_flat.view(mask.shape)
        changed = changed_flat.view(mask.shape)
        mask.copy_(keep.to(mask.dtype))
        weight.masked_fill_(changed, 0.0)  # pruned: zero; grown: starts at zero
        _reset_optimizer_state(self.optimizer, weight, changed)

    @torch.no_grad()
    def _init_erk(self) -> None:
        shapes = {p: tuple(self._weights[p].shape) for p in self.prunable}
        numel = {p: math.prod(s) for p, s in shapes.items()}
        total = sum(numel.values())
        density = 1.0 - float(self.plan.config.sparsity)
        dens = erk_densities(shapes, density)
        floors = {p: layer_floor(numel[p], self.plan.config.min_layer_density) for p in self.prunable}
        counts = _apportion({p: dens[p] * numel[p] for p in self.prunable}, floors, numel,
                            max(round(density * total), 1))
        gen = torch.Generator().manual_seed(self.seed)
        init_gen = torch.Generator().manual_seed(self.seed + 1)
        for p in self.prunable:
            weight, mask = self._weights[p], self._masks[p]
            old = (mask != 0).reshape(-1)
            new = torch.zeros(numel[p], dtype=torch.bool)
            new[torch.randperm(numel[p], generator=gen)[: counts[p]]] = True
            new = new.to(old.device)
            fresh = (new & ~old).view(mask.shape)
            bound = 1.0 / math.sqrt(_fan_in(shapes[p]))
            draw = (torch.rand(shapes[p], generator=init_gen) * 2 - 1) * bound
            self._set_mask(p, new, (new != old))
            weight.copy_(torch.where(fresh, draw.to(weight.device, weight.dtype), weight))

    def _sync_masks(self) -> int:
        """Under torch.distributed: adopt rank 0's masks; returns how many elements differed here."""
        if not distributed.is_active():
            return 0
        flat = torch.cat([self._masks[p].reshape(-1).float() for p in self.prunable])  # gloo: no bf16
        local = flat.clone()
        distributed.broadcast_([flat], src=0)
        mismatches = int((flat != local).sum())
        if mismatches:
            log.warning("rank %d: %d mask elements differed from rank 0's; adopting rank 0's",
                        distributed.rank(), mismatches)
            offset = 0
            for p in self.prunable:
                n = self._masks[p].numel()
                self._set_mask(p, flat[offset:offset + n] != 0,
                               (flat[offset:offset + n] != local[offset:offset + n]))
                offset += n
        return mismatches

    def _check_counts(self) -> None:
        for p in self.prunable:
            kept = int(self._masks[p].count_nonzero())
            if kept != self._kept[p]:
                raise PostconditionError(
                    f"DynamicSparsity: layer {p!r} keeps {kept} elements after the update at step "
                    f"{self.step_count}, {self._kept[p]} before (prune and regrow counts must match)")

    def _record(self, step, frac, n_pruned, n_grown, mismatches) -> Dict[str, Any]:
        entry = {"step": step, "sparsity": self.sparsity, "prune_fraction": frac, "pruned": n_pruned,
                 "regrown": n_grown, "densities": self.densities(), "mask_mismatches": mismatches}
        self.history.append(entry)
        return entry


# The mask buffers a module gets for its internal channels: attention heads and head dims
# (passes.attention), an RNN's hidden and projected units (passes.rules.rnn's masked RNNs).
_INTERNAL_MASK_BUFFERS = {"heads": "head_keep", "qk_dims": "qk_dim_keep", "v_dims": "v_dim_keep",
                          "hidden": "hidden_keep", "proj": "proj_keep"}


def _mask_buffers(model: fx.GraphModule, groups, flat: torch.Tensor, *, check: bool = True
                  ) -> Dict[Any, Tuple[str, torch.Tensor, torch.Tensor]]:
    """Every mask buffer of a channel-masked model that the keep ``flat`` needs:
    ``{key: (buffer path, buffer, global channel id of each element)}`` - the masks in
    front of contractions, the keep masks of masked LayerNorms, and attention modules'
    head (or head-dim) masks. ``check``: raise if one is missing."""
    holder = getattr(model, MASK_MODULE, None)
    present = dict(holder.named_buffers()) if holder is not None else {}
    wanted: Dict[Any, Tuple[str, Optional[torch.Tensor], torch.Tensor]] = {}
    for (arg, dim) in mask_plan(groups, flat):
        name = f"{arg}_dim{dim}"
        wanted[(arg, dim)] = (f"{MASK_MODULE}.{name}", present.get(name), groups.node_channels[arg][dim].long())
    for c in groups.normalizations:
        gids = groups.read_channels(c).long()
        if not bool(flat[gids].all()):
            name = norm_mask_name(c.consumer)
            wanted[("norm", c.consumer)] = (f"{MASK_MODULE}.{name}", present.get(name), gids)
    nodes = {n.name: n for n in model.graph.nodes}
    for node_name, internal in groups.internal_channels.items():
        node = nodes.get(node_name)
        if node is None or node.op != "call_module" or all(bool(flat[g].all()) for g in internal.values()):
            continue
        module = model.get_submodule(node.target)
        for key, gids in internal.items():
            attr = _INTERNAL_MASK_BUFFERS.get(key)
            if attr is not None and hasattr(module, attr):
                wanted[("internal", node_name, key)] = (f"{node.target}.{attr}", getattr(module, attr), gids.long())
    missing = [path for path, buf, _ in wanted.values() if buf is None]
    if check and missing:
        raise DisparseValueError(
            f"result.model lacks the channel mask(s) {missing[:3]} that result.plan.channels.keep needs; "
            "pass the CompressionResult that compress() (or a DynamicSparsity) left, unmodified")
    return wanted


# ---------------------------------------------------------------- dynamic sparsity on channel groups
class ChannelDynamicSparsity(DynamicSparsity):
    """Dynamic DiSparse on channel groups: what ``DynamicSparsity(result, ...)`` builds when
    ``result`` was compressed with ``granularity="channel"`` (same arguments and API).

    The units are the channels of the removable groups in ``result.plan.channels.keep``;
    the live set is the channel keep, held in ``channel_keep`` ({group id: bool}) and in
    the masked model's ``channel_masks`` buffers, so the masked model always computes
    what ``dfx.slim(result)`` computes. Training starts from the plan's keep
    (``init="plan"``, the default here; ``"erk"`` is refused).

    Every ``update_every`` steps until ``end_step``, per group:

    - **drop** the fraction ``p`` (cosine-decayed from ``prune_rate``) of the live
      channels with the smallest magnitude: the L2 norm of the channel's prunable member
      slices (every slice of a prunable parameter that the channel owns: the producing
      conv's output rows, the reading conv's / linear's input columns or blocks)
      divided by the number of those slices;
    - **regrow** as many channels (a just-dropped channel may be picked again and is then
      left untouched) by per-task gradient magnitude. The signal is ``|dL_t / dm_c|``,
      the derivative of task ``t``'s loss with respect to the channel's mask, taken with
      every channel mask at 1 (one forward, one ``autograd.grad`` per task, with respect
      to the mask buffers only; signed gradients summed over all the buffers that hold
      channel ``c``, averaged across ranks, then the absolute value), normalised to sum 1
      over the channels of the groups ``t`` reaches. It is the first-order change of
      ``L_t`` when channel ``c`` is switched on - the channel-level decision itself -
      one number per channel whatever the channel's members (depthwise, concat, linear
      blocks after a flatten), and it needs no weight-sized gradient. It is evaluated
      with the channel's current weights (dropped channels keep theirs; the plan's
      removed channels keep the trained ones), so it ranks dead channels by what they
      last contributed.
    - A group reached by several tasks (plan.channels.task_keep) regrows the union of
      its tasks' picks trimmed back to the budget by the best per-task normalised score;
      a group reached by one task (a head group) regrows that task's pick.

    Drop and regrow run separately within each set of a group's channels that own the
    same number of slices of every member (usually the whole group), so the slimmed
    size of every parameter - and the plan's sparsity after slimming
    (:func:`~disparse_fx.channel_decision.prunable_sparsity`) - never moves, and each
    group keeps as many channels as before (at least one). A group whose update would
    empty a split piece (``keep_one_of``) is left as it was.

    A regrown channel starts at zero: every slice of a prunable parameter it owns (the
    producer's output rows, the consumers' input columns) is set to 0 and the optimizer's
    per-element state (Adam moments, momentum) there is reset, so the model's outputs do
    not change at the update. Its non-prunable members (conv bias, BatchNorm gamma/beta,
    running statistics) are left as they are. Dropped channels are masked, not zeroed.

    After every update ``result.plan`` is replaced (``dataclasses.replace``; the old Plan
    object is not modified) by a plan with the new ``channels.keep`` / ``task_keep``,
    ``masks`` and ``task_masks`` (a task's vote: its old votes that stay live plus the
    channels it picked for regrowth), so ``dfx.slim(result)`` slims what was trained.
    ``last_update`` records are keyed by group id.
    """

    def __init__(
        self,
        result: CompressionResult,
        task_losses: Union[Mapping[Hashable, LossFn], Sequence[LossFn]],
        optimizer: torch.optim.Optimizer,
        *,
        end_step: int,
        update_every: int = 50,
        prune_rate: float = 0.5,
        inputs: Optional[Callable[[Any], Any]] = None,
        init: Optional[str] = None,
        seed: int = 0,
    ):
        if init == "erk":
            raise DisparseValueError(
                "init='erk' is for granularity='element': dynamic sparsity on channel groups starts from "
                "the plan's channel keep (compress chose which channels stay); pass init='plan' or leave "
                "init out")
        plan = self._setup(result, task_losses, optimizer, end_step=end_step, update_every=update_every,
                           prune_rate=prune_rate, inputs=inputs, init="plan" if init is None else init, seed=seed)
        if plan.channels is None:
            raise DisparseValueError(
                "result.plan has granularity='channel' but no channel plan (plan.channels is None); pass "
                "the CompressionResult that compress(..., CompressConfig(granularity='channel')) returned")
        self.result = result
        self.groups = plan.channels.groups
        groups = self.groups
        self._gids: Tuple[int, ...] = tuple(sorted(int(g) for g in plan.channels.keep
                                                   if groups.groups[int(g)].removable))
        self._keep: Dict[int, torch.Tensor] = {g: plan.channels.keep[g].detach().cpu().bool().clone()
                                               for g in self._gids}
        self._task_keep = {t: {int(g): k.detach().cpu().bool().clone() for g, k in per.items()}
                           for t, per in plan.channels.task_keep.items()}
        gid_set = set(self._gids)
        self._reach = {t: tuple(g for g in sorted(self._task_keep.get(t, {})) if g in gid_set)
                       for t in plan.tasks}
        self._reach = {t: r for t, r in self._reach.items() if r}

        # The mask buffers: {key: (buffer path, buffer, global channel id of each slice)}.
        flat = groups.keep_vector(self._keep)
        self._buffers = _mask_buffers(self.model, groups, flat)
        for path, buf, gids in self._buffers.values():
            if not torch.equal(buf.detach().reshape(-1).cpu() != 0, flat[gids]):
                raise DisparseValueError(
                    f"result.model's channel mask {path} does not match result.plan.channels.keep; "
                    "pass the CompressionResult that compress() (or a DynamicSparsity) left, unmodified")

        # Prunable members of each group and channel classes (same slice counts everywhere).
        prunable_set = set(self.prunable)
        in_opt = {id(q) for g in optimizer.param_groups for q in g["params"]}
        self._members: Dict[int, List[Tuple[str, torch.Tensor, int, torch.Tensor]]] = {}
        self._classes: Dict[int, torch.Tensor] = {}
        for gid in self._gids:
            g = groups.groups[gid]
            members = []
            counts = []
            for m in g.members:
                idx = m.index.long().cpu()
                counts.append(torch.bincount(idx[idx >= 0], minlength=g.size))
                if m.is_buffer or m.param_name not in prunable_set:
                    continue
                param = self.model.get_parameter(m.param_name)
                if id(param) not in in_opt:
                    raise DisparseValueError(
                        f"optimizer does not update parameter {m.param_name!r} of result.model; build it from "
                        "result.model.parameters() (or the DDP wrapper's, which are the same tensors)")
                members.append((m.param_name, param, m.dim, idx))
            self._members[gid] = members
            signature = torch.stack(counts, 1) if counts else torch.zeros(g.size, 1, dtype=torch.long)
            self._classes[gid] = torch.unique(signature, dim=0, return_inverse=True)[1]
        self._shapes = {p: tuple(s) for p, s in plan.shapes.items()}

        mismatches = self._sync_masks()
        self._kept = {g: int(self._keep[g].sum()) for g in self._gids}
        self.target_sparsity = self.sparsity
        self._record(0, 0.0, 0, 0, mismatches)
        log.info("DynamicSparsity (channels): %d groups, %d channels live of %d, sparsity %.4f, update every "
                 "%d steps until %d", len(self._gids), sum(self._kept.values()),
                 sum(groups.groups[g].size for g in self._gids), self.sparsity, update_every, end_step)

    # -------------------------------------------------------- state
    @property
    def channel_keep(self) -> Dict[int, torch.Tensor]:
        """{group id: bool per channel} (True = live), copies."""
        return {g: k.clone() for g, k in self._keep.items()}

    @property
    def masks(self) -> Dict[str, torch.Tensor]:
        """{param: bool element mask} of the live channels (the plan's ``masks``), copies."""
        return {p: m.clone() for p, m in self.plan.masks.items()}

    @property
    def sparsity(self) -> float:
        """Fraction of the prunable parameters' elements that slimming removes."""
        return prunable_sparsity(self.groups, self._keep, self.prunable, self._shapes)

    def densities(self) -> Dict[str, float]:
        """{param: fraction of its elements left after slimming}."""
        after = self.groups.params_after(self._keep)
        return {p: after.get(p, math.prod(self._shapes[p])) / math.prod(self._shapes[p]) for p in self.prunable}

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["channel_keep"] = self.channel_keep
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if "channel_keep" in state:
            keep = {int(g): torch.as_tensor(k).bool().cpu() for g, k in state["channel_keep"].items()}
            if set(keep) != set(self._gids) or any(int(keep[g].sum()) != self._kept[g] for g in self._gids):
                raise DisparseValueError("state['channel_keep'] does not fit this plan's channel groups")
            old = self._keep
            self._keep = keep
            self._write_masks(grown={})
            self._update_plan({g: keep[g] & ~old[g] for g in self._gids}, {})

    @torch.no_grad()
    def _apply_masks_(self) -> None:
        """Nothing to re-zero: dead channels are cut at the masks, their weights are never read."""

    # -------------------------------------------------------- the update
    def update(self, batch: Any) -> Dict[str, Any]:
        """Drop and regrow channels now (``step`` calls this on schedule)."""
        t0 = time.perf_counter()
        step = self.step_count
        frac = self.prune_fraction(step)
        scores = self._channel_scores(batch)
        mags = self._magnitudes()
        rec = dict(dropped={}, task_picks={}, regrow={}, grown={}, pruned={}, scores={})
        new_keep = dict(self._keep)
        grown_all: Dict[int, torch.Tensor] = {}
        picks_all: Dict[int, Dict[Hashable, torch.Tensor]] = {}
        n_grown = n_pruned = 0
        for gid in self._gids:
            live = self._keep[gid]
            size = live.numel()
            tasks = [t for t in self._reach if gid in self._reach[t]]
            if not tasks:
                continue
            group_scores = {t: scores[t][gid] for t in tasks}
            order = self._tie_order(step, gid, size, torch.device("cpu"))
            cls = self._classes[gid]
            dropped = torch.zeros(size, dtype=torch.bool)
            regrow = torch.zeros(size, dtype=torch.bool)
            picks_g = {t: torch.zeros(size, dtype=torch.bool) for t in tasks}
            for c in torch.unique(cls).tolist():
                in_c = cls == c
                live_c = live & in_c
                n_live, n_c = int(live_c.sum()), int(in_c.sum())
                k = int(frac * n_live)
                if k == 0 or n_live == n_c:
                    continue
                drop_c = _top_k(-mags[gid], live_c, k, order)
                candidates = in_c & ~(live_c & ~drop_c)
                picks = {t: _top_k(s, candidates, k, order) for t, s in group_scores.items()}
                if len(picks) > 1:  # shared: union of the tasks' picks, trimmed by the best score
                    union = torch.stack(list(picks.values())).any(0)
                    best = torch.stack(list(group_scores.values())).amax(0)
                    grow_c = _top_k(best, union, k, order)
                else:
                    grow_c = next(iter(picks.values()))
                dropped |= drop_c
                regrow |= grow_c
                for t in tasks:
                    picks_g[t] |= picks[t]
            new_live = (live & ~dropped) | regrow
            if any(not bool(new_live[piece].any()) for piece in self.groups.groups[gid].keep_one_of):
                log.debug("step %d: group %d left as it was (the update would empty a split piece)", step, gid)
                continue
            grown, pruned = new_live & ~live, live & ~new_live
            new_keep[gid] = new_live
            grown_all[gid] = grown
            picks_all[gid] = picks_g
            n_grown += int(grown.sum())
            n_pruned += int(pruned.sum())
            rec["dropped"][gid], rec["task_picks"][gid], rec["regrow"][gid] = dropped, picks_g, regrow
            rec["grown"][gid], rec["pruned"][gid], rec["scores"][gid] = grown, pruned, group_scores
        self._keep = new_keep
        self._write_masks(grown_all)
        self._update_plan(grown_all, picks_all)
        mismatches = self._sync_masks()
        self._check_counts()
        self.last_update = UpdateRecord(step=step, prune_fraction=frac, **rec)
        entry = self._record(step, frac, n_pruned, n_grown, mismatches)
        log.debug("step %d: drop fraction %.4f, %d channels pruned / %d regrown, sparsity %.4f (%.3fs)",
                  step, frac, n_pruned, n_grown, entry["sparsity"], time.perf_counter() - t0)
        return entry

    # -------------------------------------------------------- internals
    @torch.no_grad()
    def _magnitudes(self) -> Dict[int, torch.Tensor]:
        """{group: L2 norm of each channel's prunable slices / number of those slices} (CPU float64)."""
        out = {}
        for gid in self._gids:
            size = self.groups.groups[gid].size
            sq = torch.zeros(size, dtype=torch.float64)
            n = torch.zeros(size, dtype=torch.float64)
            for _, param, dim, idx in self._members[gid]:
                w = param.detach().float()
                dims = [d for d in range(w.dim()) if d != dim]
                per = (w.square().sum(dim=dims) if dims else w.square()).cpu().double()  # no float64 on MPS
                sel = idx >= 0
                sq.index_add_(0, idx[sel], per[sel])
                n.index_add_(0, idx[sel], torch.ones(int(sel.sum()), dtype=torch.float64))
            out[gid] = sq.sqrt() / n.clamp_min(1.0)
        return out

    def _channel_scores(self, batch: Any) -> Dict[Hashable, Dict[int, torch.Tensor]]:
        """Per task: ``|dL_t / d channel mask|`` over the groups it reaches, normalised to sum 1.

        One forward with every channel-mask buffer replaced by a ones leaf (parameters
        detached, other buffers cloned so BatchNorm statistics are not updated) and one
        ``autograd.grad`` per task with respect to those leaves; the signed gradients are
        summed per global channel over the buffers holding it and averaged across ranks.
        """
        gm = self.model
        num = self.groups.num_channels
        tasks = list(self._reach)
        if not self._buffers or not tasks:
            return {t: {g: torch.zeros(self.groups.groups[g].size) for g in self._reach.get(t, ())} for t in tasks}
        names = [n for n, _, _ in self._buffers.values()]
        leaves = {n: torch.ones_like(b, requires_grad=True) for n, b, _ in self._buffers.values()}
        tensors = {n: p.detach() for n, p in gm.named_parameters()}
        tensors.update({n: b.detach().clone() for n, b in gm.named_buffers() if n not in leaves})
        tensors.update(leaves)
        device = next(iter(leaves.values())).device
        batch = to_device(batch, device)
        args = self.inputs(batch)
        args = args if isinstance(args, tuple) else (args,)
        with _forked_rng(device, self.seed + self.step_count):
            outputs = torch.func.functional_call(gm, tensors, args, strict=False)
        # a task whose output no channel mask reaches (its layers lost no channel) has no
        # gradient to give: zero scores, not a loss "without an autograd graph"
        reached = [t for t in tasks if getattr(outputs[t], "requires_grad", True)]
        losses = _losses(outputs, {t: self.task_losses[t] for t in reached}, batch, self.step_count)
        grads = []
        for t in tasks:
            acc = torch.zeros(num, dtype=torch.float32, device=device)
            if t not in losses:
                grads.append(acc)
                continue
            g = torch.autograd.grad(losses[t], [leaves[n] for n in names],
                                    retain_graph=t != reached[-1], allow_unused=True)
            for gi, (_, _, gids) in zip(g, self._buffers.values()):
                if gi is not None:
                    acc.index_add_(0, gids.to(device), gi.detach().float().reshape(-1))
            grads.append(acc)
        del outputs, losses
        distributed.all_reduce_mean_(grads)  # signed: the gradient of the global batch
        scores = {}
        for t, acc in zip(tasks, grads):
            mag = acc.abs().cpu().double()
            per = {g: mag[self.groups.offsets[g]:self.groups.offsets[g] + self.groups.groups[g].size]
                   for g in self._reach[t]}
            total = float(sum(float(v.sum()) for v in per.values()))
            scores[t] = {g: (v / total if total > 0 else v) for g, v in per.items()}
        return scores

    @torch.no_grad()
    def _write_masks(self, grown: Mapping[int, torch.Tensor]) -> None:
        """Mask buffers from ``_keep``; zero the prunable slices (and optimizer state) of ``grown``."""
        flat = self.groups.keep_vector(self._keep)
        if set(_mask_buffers(self.model, self.groups, flat, check=False)) != set(self._buffers):
            raise PostconditionError(
                f"DynamicSparsity: the channel keep at step {self.step_count} needs other mask buffers than "
                "the model holds (a group became fully kept or lost its last mask)")
        for _, buf, gids in self._buffers.values():
            buf.copy_(flat[gids.cpu()].to(device=buf.device, dtype=buf.dtype).view(buf.shape))
        for gid, g in grown.items():
            if not bool(g.any()):
                continue
            for _, param, dim, idx in self._members[gid]:
                sel = (idx >= 0) & g[idx.clamp_min(0)]
                if not bool(sel.any()):
                    continue
                view = [1] * param.dim()
                view[dim] = param.shape[dim]
                where = sel.to(param.device).view(view).expand(param.shape)
                param.masked_fill_(where, 0.0)
                _reset_optimizer_state(self.optimizer, param, where)

    def _update_plan(self, grown: Mapping[int, torch.Tensor],
                     picks: Mapping[int, Mapping[Hashable, torch.Tensor]]) -> None:
        """Replace ``result.plan`` by one describing the live channels."""
        plan = self.plan
        task_keep = {}
        for t, per in self._task_keep.items():
            task_keep[t] = {}
            for g, vote in per.items():
                if g not in self._keep:
                    task_keep[t][g] = vote
                elif not plan.config.disentangle:
                    task_keep[t][g] = self._keep[g].clone()
                else:
                    mine = picks.get(g, {}).get(t)
                    task_keep[t][g] = (vote & self._keep[g]) | ((mine & grown[g]) if mine is not None else False)
        self._task_keep = task_keep
        domains = {t: tuple(p for p in self.prunable if t in plan.owners[p]) for t in plan.tasks}
        domains = {t: d for t, d in domains.items() if d}
        keep = dict(plan.channels.keep)
        keep.update({g: k.clone() for g, k in self._keep.items()})
        masks, task_masks = _element_masks(self.groups, keep, task_keep, self.prunable, self._shapes,
                                           plan.owners, domains)
        channels = dataclasses.replace(plan.channels, keep=keep, task_keep=task_keep)
        self.plan = dataclasses.replace(plan, masks=masks, task_masks=task_masks, channels=channels,
                                        sparsity=self.sparsity)
        object.__setattr__(self.result, "plan", self.plan)  # CompressionResult is a frozen dataclass

    def _sync_masks(self) -> int:
        """Under torch.distributed: adopt rank 0's channel keep; returns how many channels differed here."""
        if not distributed.is_active() or not self._gids:
            return 0
        flat = torch.cat([self._keep[g].float() for g in self._gids])
        device = next(iter(self._buffers.values()))[1].device if self._buffers else torch.device("cpu")
        local = flat.clone()
        shipped = flat.to(device)
        distributed.broadcast_([shipped], src=0)
        flat = shipped.cpu()
        mismatches = int((flat != local).sum())
        if mismatches:
            log.warning("rank %d: %d channels differed from rank 0's keep; adopting rank 0's",
                        distributed.rank(), mismatches)
            grown, offset = {}, 0
            for g in self._gids:
                n = self._keep[g].numel()
                new = flat[offset:offset + n] != 0
                grown[g] = new & ~self._keep[g]
                self._keep[g] = new
                offset += n
            self._write_masks(grown)
            self._update_plan(grown, {})
        return mismatches

    def _check_counts(self) -> None:
        for g in self._gids:
            kept = int(self._keep[g].sum())
            if kept != self._kept[g]:
                raise PostconditionError(
                    f"DynamicSparsity: channel group {g} keeps {kept} channels after the update at step "
                    f"{self.step_count}, {self._kept[g]} before (drop and regrow counts must match)")
        if abs(self.sparsity - self.target_sparsity) > 1e-12:
            raise PostconditionError(
                f"DynamicSparsity: sparsity after slimming moved from {self.target_sparsity} to {self.sparsity} "
                f"at step {self.step_count}")


def _top_k(score: torch.Tensor, allowed: torch.Tensor, k: int, order: torch.Tensor) -> torch.Tensor:
    """Bool mask of the ``k`` allowed positions with the highest score; ties in ``order``."""
    s = score.float()[order].masked_fill(~allowed[order], -math.inf)
    chosen = order[torch.argsort(s, descending=True, stable=True)[:k]]
    out = torch.zeros_like(allowed)
    out[chosen] = True
    return out


def _fan_in(shape: Sequence[int]) -> int:
    """PyTorch's fan_in of a weight: shape[1] * receptive field (shape[0] for 1-D)."""
    if len(shape) < 2:
        return max(int(shape[0]), 1)
    return max(int(shape[1]) * math.prod(shape[2:]), 1)


def _reset_optimizer_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, where: torch.Tensor) -> None:
    """Zero every per-element state tensor of ``param`` (Adam moments, momentum, ...) at ``where``."""
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value.masked_fill_(where, 0)


def _resolve_mask_names(gm: nn.Module, prunable: Sequence[str]) -> Dict[str, str]:
    """{plan name: name of the masked parameter in gm} (they differ only for tied weights)."""
    masked = masked_params(gm)
    by_id = {id(gm.get_parameter(n)): n for n in masked}
    out = {}
    for p in prunable:
        try:
            obj = gm.get_parameter(p)
        except AttributeError:
            obj = None
        name = p if p in masked else by_id.get(id(obj))
        if name is None:
            raise DisparseValueError(
                f"result.model has no mask buffer for prunable parameter {p!r}; pass the "
                "CompressionResult returned by compress() (its model holds '<param>_mask' buffers)")
        out[p] = name
    return out


def _check_int(name: str, value: Any, minimum: Optional[int]) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        must = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise DisparseValueError(f"{name} must be {must}, got {value!r}")


# ---------------------------------------------------------------- finetune
def finetune(
    result_or_model: Union[CompressionResult, nn.Module],
    task_losses: Union[Mapping[Hashable, LossFn], Sequence[LossFn]],
    data: Iterable,
    steps: int,
    *,
    optimizer: Union[str, Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
                     torch.optim.Optimizer, None] = None,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    inputs: Optional[Callable[[Any], Any]] = None,
    progress: bool = True,
    eval_fn: Optional[Callable[[nn.Module], Any]] = None,
    eval_every: Optional[int] = None,
    dynamic: Optional[DynamicSparsity] = None,
    task_weights: Optional[Mapping[Hashable, float]] = None,
    lr_schedule: str = "constant",
) -> Dict[str, Any]:
    """Train ``steps`` optimizer steps on ``data`` (cycled as needed); returns the history.

    ``result_or_model``: a CompressionResult (its masked model is trained in place) or
    any nn.Module with dict / tuple outputs (e.g. the DDP-wrapped masked model).
    ``optimizer``: "adam" (default), "adamw", "sgd" (momentum 0.9), a factory
    ``params -> Optimizer``, or an Optimizer; with ``dynamic`` the scheduler's optimizer
    is used. ``task_weights``: {task: weight} of the summed loss (default 1 each).
    ``lr_schedule``: "constant" (default) or "cosine": each parameter group's lr annealed
    from its value to 0 over ``steps`` (SGDR, Loshchilov & Hutter 2017, without restarts);
    a model trained to the end of a cosine schedule has settled, so two runs that differ
    only in seed end closer together than at a constant lr.
    ``inputs``: batch -> model input(s); default: the scheduler's, else the ``inputs=``
    compress() was given (``CompressionResult.inputs``), else api.md's default.
    ``eval_fn(model)`` runs under ``torch.no_grad()`` in eval mode every ``eval_every``
    steps and after the last step. Pruned weights get zero gradient, so they stay zero.

    The history: ``step``, ``loss``, ``task_losses`` {task: list}, ``eval`` [(step,
    value)], ``sparsity`` [(step, value)] when masks are dynamic, ``seconds``.
    """
    model = result_or_model.model if isinstance(result_or_model, CompressionResult) else result_or_model
    if not isinstance(model, nn.Module):
        raise DisparseValueError(
            f"result_or_model must be a CompressionResult or an nn.Module, got {type(result_or_model).__name__}")
    _check_int("steps", steps, 1)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise DisparseValueError(f"lr must be a number > 0, got {lr!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise DisparseValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if eval_every is not None:
        _check_int("eval_every", eval_every, 1)
    if lr_schedule not in LR_SCHEDULES:
        raise DisparseValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    if eval_fn is not None and not callable(eval_fn):
        raise DisparseValueError(f"eval_fn must be a callable model -> metrics, got {type(eval_fn).__name__}")
    if inputs is not None and not callable(inputs):
        raise DisparseValueError(f"inputs must be a callable batch -> model input(s), got {type(inputs).__name__}")
    if dynamic is not None:
        if not isinstance(dynamic, DynamicSparsity):
            raise DisparseValueError(f"dynamic must be a DynamicSparsity or None, got {type(dynamic).__name__}")
        if getattr(model, "module", model) is not dynamic.model:
            raise DisparseValueError(
                "dynamic was built for another model: pass the CompressionResult (or its DDP-wrapped "
                "model) that the DynamicSparsity was built from")
        if optimizer is not None and optimizer is not dynamic.optimizer:
            raise DisparseValueError(
                "optimizer must be left out (or be dynamic.optimizer) when dynamic is given: the "
                "DynamicSparsity resets that optimizer's state where masks change")
        opt = dynamic.optimizer
    else:
        opt = _make_optimizer(optimizer, model, lr, weight_decay)
    # the inputs= given here, else the scheduler's, else compress's (kept in the result)
    if inputs is None and dynamic is not None:
        inputs = dynamic.inputs
    if inputs is None and isinstance(result_or_model, CompressionResult):
        inputs = result_or_model.inputs
    inputs = inputs or default_inputs
    base_lrs = [group["lr"] for group in opt.param_groups]

    history: Dict[str, Any] = {"step": [], "loss": [], "task_losses": {}, "eval": [], "sparsity": []}
    losses_by_task: Optional[Dict[Hashable, LossFn]] = None
    weights: Dict[Hashable, float] = {}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    t0 = time.perf_counter()
    bar = tqdm(total=steps, desc="finetune", unit="step", disable=not progress or distributed.rank() != 0)
    try:
        model.train()
        batches = _cycle(data)
        for step in range(1, steps + 1):
            batch = to_device(next(batches), device)
            args = inputs(batch)
            outputs = model(*(args if isinstance(args, tuple) else (args,)))
            if losses_by_task is None:
                losses_by_task = _match_losses_to_outputs(task_losses, outputs)
                weights = _task_weights(task_weights, losses_by_task)
                history["task_losses"] = {t: [] for t in losses_by_task}
            losses = _losses(outputs, losses_by_task, batch, step - 1)
            total = sum(weights[t] * losses[t] for t in losses_by_task)
            if not torch.isfinite(total.detach()):
                raise LossError(f"the weighted sum of the task losses is {float(total)} at step {step}")
            opt.zero_grad(set_to_none=True)
            total.backward()
            if lr_schedule == "cosine":
                factor = 0.5 * (1.0 + math.cos(math.pi * (step - 1) / steps))
                for group, base in zip(opt.param_groups, base_lrs):
                    group["lr"] = base * factor
            opt.step()
            if dynamic is not None:
                if dynamic.step(batch) is not None:
                    history["sparsity"].append((step, dynamic.sparsity))
            history["step"].append(step)
            history["loss"].append(float(total.detach()))
            for t in losses_by_task:
                history["task_losses"][t].append(float(losses[t].detach()))
            bar.update(1)
            bar.set_postfix({str(t): f"{history['task_losses'][t][-1]:.3g}" for t in losses_by_task},
                            refresh=False)
            if eval_fn is not None and ((eval_every and step % eval_every == 0) or step == steps):
                history["eval"].append((step, _evaluate(model, eval_fn)))
                log.info("finetune step %d: eval %s", step, history["eval"][-1][1])
    finally:
        bar.close()
        model.train(was_training)
        if lr_schedule != "constant":  # a caller's optimizer gets its lr back
            for group, base in zip(opt.param_groups, base_lrs):
                group["lr"] = base
    history["seconds"] = time.perf_counter() - t0
    log.info("finetune: %d steps in %.1fs, final loss %.4g", steps, history["seconds"], history["loss"][-1])
    return history


def _make_optimizer(optimizer, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if optimizer is None or isinstance(optimizer, str):
        name = "adam" if optimizer is None else optimizer.lower()
        if name == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        if name == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        if name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    elif callable(optimizer):
        opt = optimizer(params)
        if isinstance(opt, torch.optim.Optimizer):
            return opt
        raise DisparseValueError(
            f"optimizer factory must return a torch.optim.Optimizer, returned {type(opt).__name__}")
    raise DisparseValueError(
        f"optimizer must be one of {OPTIMIZERS}, a factory params -> torch.optim.Optimizer, or an "
        f"Optimizer, got {optimizer!r}")


def _match_losses_to_outputs(task_losses, outputs) -> Dict[Hashable, LossFn]:
    from .api import _match_task_losses

    if isinstance(outputs, Mapping):
        tasks = tuple(outputs)
    elif isinstance(outputs, (tuple, list)):
        tasks = tuple(range(len(outputs)))
    else:
        raise DisparseValueError(
            f"the model must return a dict {{task: Tensor}} or a tuple/list of Tensors, got "
            f"{type(outputs).__name__}")
    return _match_task_losses(task_losses, tasks)


def _task_weights(task_weights, losses: Mapping[Hashable, LossFn]) -> Dict[Hashable, float]:
    if task_weights is None:
        return {t: 1.0 for t in losses}
    if not isinstance(task_weights, Mapping) or set(task_weights) != set(losses):
        got = sorted(map(repr, task_weights)) if isinstance(task_weights, Mapping) else type(task_weights).__name__
        raise DisparseValueError(
            f"task_weights must be a dict with one number per task {list(losses)}, got {got}")
    for t, w in task_weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise DisparseValueError(f"task_weights[{t!r}] must be a finite number >= 0, got {w!r}")
    return {t: float(task_weights[t]) for t in losses}


def _cycle(data: Iterable):
    """Yield batches forever, re-iterating ``data`` (and advancing a DistributedSampler's epoch)."""
    epoch = 0
    while True:
        sampler = getattr(data, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        n = 0
        for batch in data:
            n += 1
            yield batch
        if n == 0:
            raise NotEnoughBatchesError(
                "data yielded no batch" + (" on re-iteration (an exhausted iterator? pass a list or a "
                                           "DataLoader)" if epoch else "") + "; finetune needs at least one")
        epoch += 1


def _evaluate(model: nn.Module, eval_fn) -> Any:
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            return eval_fn(model)
    finally:
        model.train(was_training)
