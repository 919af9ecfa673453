"""The unanimous decision, with the requested sparsity hit exactly.

Each ranking unit ``u`` (a task when disentangled, the summed loss otherwise) ranks the
elements of its domain ``D_u`` by its normalised score, ties broken by a seeded hash of
the element's flat index (a bijection of 32-bit integers, so the order is total and
every top-k has exactly k elements). Keeping the top ``r * |D_u|`` of every unit for
one common keep ratio ``r`` (the paper's ``keep_ratio``) means:

    unit u keeps element e  <=>  c_u(e) = (rank_u(e) + 1) / |D_u|  <=  r

and the final mask keeps e iff ANY unit owning e keeps it (a shared element is removed
only when every task agrees; a task-specific one follows its task):

    keep(e)  <=>  c(e) = min over owning u of c_u(e)  <=  r

The per-layer floor ``min_layer_density``: a parameter keeps at least
``floor_p = max(1, ceil(min_layer_density * numel))`` elements, the extra ones being
those with the smallest c (ties by flat index), credited to the unit that ranks them
best (so ``masks == OR of task_masks`` still holds element by element). The keep
ratio is the smallest value of c with ``sum_p max(#{e in p: c(e) <= r}, floor_p) >=
target``. Writing pos_p(e) for e's position in p's c-order, that sum is
``F + #{e : c(e) <= r, pos_p(e) >= floor_p}`` (F = sum of floors), so r is simply the
(target - F)-th smallest c among the elements past their layer's floor - a selection,
no bisection.

Algorithm and cost (N prunable elements, T units, k = target kept elements):

1. r <= r_hi = k / max_u |D_u| (at r_hi the largest unit alone keeps k), so each unit
   only needs the exact ranks of its top ``k_u(r_hi) <= k`` elements. Per unit: one
   histogram of the score's bits (float32: up to 2**23 buckets; bfloat16: one per value;
   ``torch.bincount`` a chunk at a time) gives the
   bucket holding the k_u-th largest score; one pass collects the elements from that
   bucket up, a ``kthvalue`` among them finds the k_u-th score, the hash picks among the
   elements tied with it, and the k_u selected elements are sorted: O(N_u + k log k).
2. The union of the T prefixes is one dense table over the flat index (int32 while
   (T*k + 1) * T < 2**31): each unit scatters (``scatter_reduce`` amin) code * T + u,
   where code is the rank of its c among all prefix values (the number of prefix
   entries (v, i) with c_v(i) < c, counted in integers: equal c, equal code; see
   :func:`_codes`), so the table holds every element's c(e) and its best unit. The
   union is read back in flat-index order (parameters are contiguous), each parameter's
   floor is a ``kthvalue`` over its entries (:func:`_in_floor`, one Python step per
   parameter, no host sync), and r is one ``kthvalue`` over the codes past the floors:
   O(N + T k), no sort. The table is freed once the union is read: from there on the
   decision holds O(T k) integers (int32 where they fit), not O(N).
3. Floors beyond the prefixes (a layer that no unit ranks high) choose among a few
   candidates (per owner, the layer's best not yet chosen, by the same bucket-then-
   ``kthvalue`` selection over the parameter). Their ranks are bounded by the unit's
   histogram (counted again, not held from step 1: T tables of 32 MiB would raise the
   peak for a case that is rare); exact ranks are counted only for candidates the bounds leave
   undecided (at the d-th place, or two owners close), by sorting the few elements that
   share their buckets. Only when such a floor binds. (Counting every candidate exactly,
   by a binary search of all N_u elements among them, took 48 of decide()'s 72 s on a
   3-task resnet50 with deep floors.)

Everything runs on the scores' device with float32 scores and integer codes for c
(exact: for |D_u|, |D_v| < 2**26, i.e. fewer than 67M elements a unit, the integer order
of the rationals (i + 1) / |D_v| is the order of their float64 quotients, which the
returned keep ratio is; beyond that the integers keep two c that float64 would round
together apart), and a handful of host syncs per unit, none inside loops over
parameters or search steps.
Scores are normalised IN PLACE (each unit keeps one score tensor per parameter) and
become ``Decision.task_scores``.

Compared with the implementation before (ac93687: the union by ``torch.unique`` and two
argsorts, a 15 + 16-bit radix select, deep-floor candidates by int64 keys and ``topk`` over
whole parameters, a second 2**23-bucket histogram per unit): identical masks, task masks and
keep ratio (``benchmarks/decision_parity.py --rev ac93687``) on all 8 zoo and 11 cnn_zoo
models (snip and random), the 3-task resnet18 trunk (snip, random) and the scores of the
3- and 5-task resnet50 trunk of ``benchmarks/compress_cost.py`` (2 batches, 90% element).
decide() on the resnet50 scores, same process, on this 2-core machine while other work
ran (load 5-7): 27.3 -> 12.2 s (3 tasks), 47.3 -> 25.7 s (5 tasks); unloaded (3 tasks,
first half of the change) 16.0 -> 10.0 s. Large gathers use ``index_select`` (5x faster
than advanced indexing on CPU) and ``index_fill_``.

The implementation before that (full argsort of every domain, randperm tie order,
bisection with per-parameter sorts; 75e2af8~1) gave identical masks wherever the scores
have no ties; with ties the tied elements are chosen in a different (hash) order, the
counts being the same: on the 3-task resnet18 trunk (64 px, 2x2 batches) final masks
differed in 0 (snip) and 2 (random) of 11,758,656 elements, and decide() took 16.2 s
(snip) / 22.0 s (random) against 72.7 s / 64.1 s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Hashable, Mapping, Sequence

import torch

from .config import CompressConfig
from .importance import SUMMED, TaskScores, joined

__all__ = ["Decision", "decide", "layer_floor", "normalise_scores_", "task_scores_of"]


@dataclass(frozen=True)
class Decision:
    """task_masks: {task: {param: bool}}; masks: {param: bool}; keep_ratio: the r found;
    task_scores: {task: {param: score normalised to sum 1 over the task's domain}}, float32
    (bfloat16 with ``score_dtype="bfloat16"``)."""

    task_masks: Mapping[Hashable, Mapping[str, torch.Tensor]]
    masks: Mapping[str, torch.Tensor]
    keep_ratio: float
    task_scores: Mapping[Hashable, Mapping[str, torch.Tensor]]


def layer_floor(numel: int, min_layer_density: float) -> int:
    """Elements a parameter keeps at least: one, and its min_layer_density share."""
    return min(numel, max(1, math.ceil(min_layer_density * numel - 1e-9)))


def decide(
    scores: TaskScores,
    *,
    prunable: Sequence[str],
    shapes: Mapping[str, torch.Size],
    task_domains: Mapping[Hashable, Sequence[str]],
    config: CompressConfig,
) -> Decision:
    """Turn per-unit scores into per-task masks and the final mask at the target sparsity.

    The scores are normalised in place and returned as ``Decision.task_scores``.
    """
    numel = {p: math.prod(shapes[p]) for p in prunable}
    starts: Dict[str, int] = {}
    total = 0
    for p in prunable:
        starts[p], total = total, total + numel[p]
    if total >= 1 << 31:  # products (j + 1) * |D_v| in _codes stay below 2**62
        raise ValueError(f"the element decision supports fewer than 2**31 prunable elements, got {total}")
    units = list(scores.scores)
    domains = {u: tuple(scores.domains[u]) for u in units}
    device = next(iter(next(iter(scores.scores.values())).values())).device
    normalised = normalise_scores_(scores)
    sizes = {u: sum(numel[p] for p in domains[u]) for u in units}
    floors = [layer_floor(numel[p], config.min_layer_density) for p in prunable]
    target_kept = max(round((1.0 - config.sparsity) * total), 1)
    n_max = max(sizes.values())
    r_hi = target_kept / n_max if target_kept <= n_max else 1.0  # the largest unit alone keeps enough
    g_starts = torch.tensor([starts[p] for p in prunable], dtype=torch.int32, device=device)

    # 1. Each unit's best-ranked elements (those with c_u <= r_hi), in rank order; flat
    #    indices held as int32 (total < 2**31), widened where an index op needs int64.
    orders = [_top_in_order(normalised[u], domains[u], starts, _count_le(r_hi, sizes[u]), config.seed + ui,
                            device).int() for ui, u in enumerate(units)]

    # 2. Their union in one dense table over the flat index: enc(e) = code(e) * T + best(e),
    #    code = the rank of c(e) among all prefix values (equal c, equal code), best = the
    #    first unit attaining it; elements in no prefix hold INF.
    n_units = len(units)
    lens = [len(o) for o in orders]
    wide = (sum(lens) + 1) * n_units >= 1 << 31
    codes = [_codes(ui, lens, [sizes[u] for u in units], device, torch.int64 if wide else torch.int32)
             for ui in range(n_units)]
    inf = torch.iinfo(torch.int64 if wide else torch.int32).max
    enc = torch.full((total,), inf, dtype=torch.int64 if wide else torch.int32, device=device)
    for ui, (o, code) in enumerate(zip(orders, codes)):
        enc.scatter_reduce_(0, o.long(), (code * n_units + ui).to(enc.dtype), "amin")
    # the union, by flat index (int32; nonzero's int64 a chunk at a time)
    uniq = torch.cat([(part != inf).nonzero().squeeze(1).int() + start for start, part in _chunks(enc)])
    e = enc.index_select(0, uniq)  # (index_select: a plain gather, several times faster on CPU)
    del enc  # the union's arrays hold all that is read from here on
    best = (e % n_units).to(torch.int8 if n_units < 128 else torch.int32)
    c = e.div_(n_units, rounding_mode="floor")  # int32 unless wide: the union is up to T * k entries
    del e
    pid = torch.searchsorted(g_starts, uniq, right=True, out_int32=True) - 1
    in_union = torch.bincount(pid, minlength=len(prunable))

    # 3. Floors within the union: per parameter its floor_p smallest (code, flat index);
    #    r: the (target - F)-th smallest code past its layer's floor.
    in_floor = _in_floor(c, in_union.tolist(), floors)
    need = target_kept - sum(floors)
    past_floor = c[~in_floor]
    if need <= 0:
        r_code = int(c.min()) if len(c) else None
    elif len(past_floor) >= need:
        r_code = int(torch.kthvalue(past_floor, need).values)
    else:  # only when some prunable parameter has no owner: keep everything, as c = inf there
        r_code = None
    del past_floor
    if r_code is None:
        r = math.inf
    else:  # r as a float: (j + 1) / |D_u| of a prefix entry holding that code
        ui = int(best[c == r_code][0])
        j = int(torch.searchsorted(codes[ui], r_code))
        r = (j + 1) / sizes[units[ui]]

    # 4. Floors: the parameter's next best elements by c, credited to their best unit.
    kept = c <= r_code if r_code is not None else torch.ones_like(in_floor)
    extra = ~kept & in_floor
    extra_idx, extra_best = [uniq[extra].long()], [best[extra].long()]
    deep = [(p, floors[i] - n) for i, (p, n) in enumerate(zip(prunable, in_union.tolist())) if floors[i] > n]
    if deep and math.isfinite(r):
        idx, who = _deep_floor_extras(deep, uniq, pid, normalised, domains, starts, numel, sizes,
                                      {p: i for i, p in enumerate(prunable)}, config.seed, device)
        extra_idx.append(idx)
        extra_best.append(who)
    extra_idx, extra_best = torch.cat(extra_idx), torch.cat(extra_best)

    if math.isfinite(r):
        flat = torch.zeros(total, dtype=torch.bool, device=device)
        flat.index_fill_(0, uniq[kept].long(), True)
        flat.index_fill_(0, extra_idx, True)
    else:
        flat = torch.ones(total, dtype=torch.bool, device=device)
    del uniq, c, best, pid, kept, extra, in_floor
    masks = {p: flat[starts[p]:starts[p] + numel[p]].view(shapes[p]).clone() for p in prunable}
    del flat
    task_masks: Dict[Hashable, Dict[str, torch.Tensor]] = {}
    if config.disentangle:
        for ui, u in enumerate(units):
            kept_u = torch.zeros(total, dtype=torch.bool, device=device)
            m_u = lens[ui] if r_code is None else int(torch.searchsorted(codes[ui], r_code, right=True))
            kept_u.index_fill_(0, orders[ui][:m_u].long(), True)
            kept_u.index_fill_(0, extra_idx[extra_best == ui], True)
            task_masks[u] = {p: kept_u[starts[p]:starts[p] + numel[p]].view(shapes[p]).clone() for p in domains[u]}
            del kept_u
    else:  # one global decision: every task sees the final mask over its domain
        task_masks = {t: {p: masks[p] for p in dom} for t, dom in task_domains.items()}
    task_scores = task_scores_of(normalised, task_domains, config.disentangle)
    return Decision(task_masks=task_masks, masks=masks, keep_ratio=float(r), task_scores=task_scores)


def normalise_scores_(scores: TaskScores) -> Dict[Hashable, Dict[str, torch.Tensor]]:
    """Each unit's scores divided by their sum over its domain, in place: {unit: {param:
    score}} summing to 1 per unit (a unit whose scores are all zero stays zero). The
    score tensors are compress's own (made by the importance pass), so no copy of every
    score is made; a tensor that appears twice is copied before its second division."""
    seen: set = set()
    return {u: _normalise_(parts, tuple(scores.domains[u]), seen) for u, parts in scores.scores.items()}


def task_scores_of(normalised: Mapping[Hashable, Dict[str, torch.Tensor]],
                   task_domains: Mapping[Hashable, Sequence[str]], disentangle: bool
                   ) -> Dict[Hashable, Dict[str, torch.Tensor]]:
    """Plan.task_scores from the units' normalised scores: the units themselves when they
    are the tasks, else the summed score seen over each task's domain."""
    if disentangle:
        return dict(normalised)
    summed = normalised[SUMMED]
    return {t: {p: summed[p] for p in dom} for t, dom in task_domains.items()}


def _normalise_(parts: Mapping[str, torch.Tensor], dom: Sequence[str], seen: set) -> Dict[str, torch.Tensor]:
    """{p: score / sum over the domain}, divided in place (a tensor met before is copied);
    float32 and bfloat16 scores keep their dtype (dividing by a positive number rounds
    monotonically: the order is kept, ties can only appear), others become float32."""
    out = {}
    for p in dom:
        x = parts[p]
        if x.dtype not in _SCORE_BITS or id(x) in seen:
            x = x.float() if x.dtype not in _SCORE_BITS else x.clone()
        seen.add(id(x))
        out[p] = x
    total = torch.stack([x.sum(dtype=torch.float64) for x in out.values()]).sum().float()
    total = total.clamp_min(torch.finfo(torch.float32).tiny)
    for x in out.values():
        x.div_(total)
    return out


def _count_le(r: float, n: int) -> int:
    """#{j in [0, n): (j + 1) / n <= r}, with the float64 division that defines c."""
    if r >= 1.0:
        return n
    k = min(n, max(0, int(r * n)))
    while k < n and (k + 1) / n <= r:
        k += 1
    while k > 0 and k / n > r:
        k -= 1
    return k


def _codes(ui: int, lens: Sequence[int], sizes: Sequence[int], device, dtype=torch.int64) -> torch.Tensor:
    """code of unit ui's j-th prefix entry, c = (j + 1) / n_ui: the number of prefix entries
    (v, i), i < lens[v], of all units with c_v(i) < c, compared exactly in integers:
    #{i : (i + 1) / n_v < (j + 1) / n_u} = ((j + 1) * n_v - 1) // n_u (equal c, equal code).
    In float64 while (j + 1) * n_v < 2**52: the numerator is exact and the quotient's
    rounding (relative 2**-53) cannot cross an integer, whose distance is >= 1 / n_u.
    Returned as ``dtype`` (int32 when every code fits)."""
    n_u = sizes[ui]
    exact_float = lens[ui] * max(sizes) < 1 << 52
    kind = torch.float64 if exact_float else torch.int64
    a = torch.arange(1, lens[ui] + 1, dtype=kind, device=device)
    code = torch.zeros(lens[ui], dtype=kind, device=device)
    for k_v, n_v in zip(lens, sizes):
        if n_v == n_u:
            code += torch.clamp_max(a - 1, k_v)
        elif exact_float:
            code += torch.floor_((a * n_v - 1) / n_u).clamp_max_(k_v)
        else:
            code += torch.clamp_max((a * n_v - 1) // n_u, k_v)
    return code.to(dtype)


def _in_floor(c: torch.Tensor, counts: Sequence[int], floors: Sequence[int]) -> torch.Tensor:
    """Per parameter (contiguous runs of ``counts`` entries, by flat index), whether an entry
    is among the parameter's floor_p smallest (c, position)."""
    out = torch.ones(len(c), dtype=torch.bool, device=c.device)
    lo = 0
    for m, f in zip(counts, floors):
        if m > f:
            seg = c[lo:lo + m]
            if f == 0:
                out[lo:lo + m] = False
            else:
                tau = torch.kthvalue(seg, f).values
                lt = seg < tau
                eq = seg == tau
                out[lo:lo + m] = lt | (eq & (torch.cumsum(eq, 0) <= f - lt.sum()))
        lo += m
    return out


_M32 = 0xFFFFFFFF
_MAX_BUCKET_BITS = 23  # at most 2**23 buckets of 2**8 consecutive float32 bit patterns (scores >= 0)
_HISTOGRAM_CHUNK = 1 << 22  # elements shifted and counted at a time
_KEY_CHUNK = 1 << 20  # elements whose int64 keys are built at a time (about ten 8 MiB temporaries)


_SCORE_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def _bits(s: torch.Tensor) -> torch.Tensor:
    """The bit patterns of non-negative float32 / bfloat16 scores as int32 / int16: the
    integer order is the scores' order (sign bit clear), so ranks, selections and
    histograms run on integers."""
    if s.dtype not in _SCORE_BITS:
        raise TypeError(f"scores must be float32 or bfloat16, got {s.dtype}")
    return s.view(_SCORE_BITS[s.dtype])


def _seed_word(seed: int) -> int:
    """32 well-mixed bits of the seed (splitmix64's finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & _M32


def _hash32(index: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded bijection of [0, 2**32) applied to int64 indices, on their device.

    xor with a constant, xorshift and multiplication by an odd constant modulo 2**32 are
    each bijective, so distinct indices below 2**32 get distinct hashes (a total order).
    """
    x = (index & _M32) ^ _seed_word(seed)
    for _ in range(2):
        x = x ^ (x >> 16)
        x = (x * 0x45D9F3B) & _M32  # < 2**59: no int64 overflow
    return x ^ (x >> 16)


def _keys(s: torch.Tensor, flat_index: torch.Tensor, seed: int) -> torch.Tensor:
    """int64 sort keys: the float32 score's bits (monotone for s >= 0), then the hash."""
    return (_bits(s.reshape(-1)).long() << 32) | _hash32(flat_index, seed)


def _top_in_order(parts, dom, starts, k: int, seed: int, device):
    """Flat indices of the unit's k best-ranked elements, best first (int64)."""
    if k == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    s = joined(parts, dom)
    bits = _bits(s)
    sizes = [parts[p].numel() for p in dom]
    d_starts = torch.tensor([0] + sizes[:-1], device=device).cumsum(0)
    shift = torch.tensor([starts[p] for p in dom], device=device) - d_starts

    def flat_index(pos):
        return pos + shift[torch.searchsorted(d_starts, pos, right=True) - 1]

    if k >= len(s):
        chosen = torch.arange(len(s), device=device)
    else:
        cum = _histogram(bits)
        b, _ = _bucket_of(cum[0], len(bits), k)  # the bucket holding the k-th largest
        chosen = _select(bits, int(b) << cum[1], k, lambda pos: _hash32(flat_index(pos), seed))
    index = flat_index(chosen)
    key = (bits.index_select(0, chosen).long() << 32) | _hash32(index, seed)
    return index.index_select(0, torch.argsort(-key))  # keys are distinct; ascending sorts run faster


def _select(bits: torch.Tensor, low: int, k: int, tie_hash) -> torch.Tensor:
    """Positions of the k largest ``bits`` (unordered), given ``low`` <= the k-th largest:
    all above the k-th largest v, and of those equal to v the ones with the largest
    ``tie_hash(positions)``. ``low`` is a Python int: a 1-element int64 tensor would make
    the CPU comparison cast the whole domain to int64 first (a copy of 8 bytes an element)."""
    chosen = (bits >= low).nonzero().squeeze(1)  # one pass: the k best and a few more
    if len(chosen) > k:
        vals = bits.index_select(0, chosen)
        v = torch.kthvalue(vals, len(chosen) - k + 1).values
        chosen, vals = chosen[vals >= v], vals[vals >= v]
        if len(chosen) > k:  # ties at v: the largest hashes
            tie = vals == v
            ties = chosen[tie]
            ties = ties[torch.topk(tie_hash(ties), k - (len(chosen) - len(ties))).indices]
            chosen = torch.cat([chosen[~tie], ties])
    return chosen


def _histogram(bits: torch.Tensor):
    """(cumulative counts, shift) of non-negative score bits (:func:`_bits`) in buckets of
    2**shift consecutive values: 2**min(23, bit length of n, bit width) buckets for n
    values (a fixed cost that stays small for small domains; 16-bit scores reach one
    bucket per value from 2**15 values on), int32 counts when they fit (32 MiB a table
    at most). Counted a chunk at a time by ``index_add_`` into the table, so neither a shifted copy of the
    whole domain nor an int64 table per chunk is made (24M float32 scores, 2**23
    buckets, one thread: 0.16 s against 0.21 s for one ``bincount`` and 0.49 s for
    chunked ones). The counts themselves are differences of the cumulative ones
    (:func:`_bucket_size`)."""
    width = 8 * bits.element_size() - 1
    shift = max(0, width - min(_MAX_BUCKET_BITS, max(8, len(bits).bit_length())))
    buckets = ((part >> shift).int() for _, part in _chunks(bits))
    return _cumulative_counts(1 << (width - shift), buckets, bits), shift


def _chunks(x: torch.Tensor, size: int = _HISTOGRAM_CHUNK):
    """(start, x[start:start + size]) over a 1-D tensor."""
    for start in range(0, len(x), size):
        yield start, x[start:start + size]


def _cumulative_counts(n_buckets: int, bucket_chunks, of: torch.Tensor) -> torch.Tensor:
    """Cumulative counts over ``n_buckets`` of the int32 bucket ids of the elements of
    ``of``, given a chunk at a time, by ``index_add_`` into one table (int32 counts while
    they fit: below 2**31 elements)."""
    kind = torch.int32 if len(of) < 1 << 31 else torch.int64
    hist = torch.zeros(n_buckets, dtype=kind, device=of.device)
    for ids in bucket_chunks:
        hist.index_add_(0, ids, torch.ones(len(ids), dtype=kind, device=of.device))
    return torch.cumsum(hist, 0, dtype=kind)


def _bucket_size(cum: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Counts of buckets ``b`` from the cumulative counts."""
    return cum[b] - torch.where(b > 0, cum[(b - 1).clamp_min(0)], 0)


def _bucket_of(cum: torch.Tensor, n: int, k):
    """(the bucket holding the k-th largest of n values, #values in higher buckets), as
    tensors, from the cumulative counts: the first bucket b with cum[b] > n - k."""
    b = torch.searchsorted(cum, torch.as_tensor(n - k, dtype=cum.dtype, device=cum.device).reshape(1), right=True)
    return b, n - cum[b].long()


def _deep_floor_extras(deep, uniq, pid, normalised, domains, starts, numel, sizes, pid_of, seed, device):
    """Floor elements of parameters whose floor exceeds what the units' prefixes hold.

    For a parameter p needing d more elements: the d with the smallest c (ties by flat
    index) among those outside the prefixes lie among each owner's d best of p (any
    other element is beaten by d elements on its best unit). Their ranks
    rank_u(e) = #{f in D_u : key_u(f) > key_u(e)} are first bounded by a histogram
    (:class:`_RankCounter`); a candidate gets its exact ranks only when the bounds leave
    open whether it is among the d (its c-interval straddles the d-th place) or which
    owner ranks it best. Returns (flat indices, best unit) of the extras.
    """
    units = list(domains)
    owners_of = {p: [ui for ui, u in enumerate(units) if p in set(domains[u])] for p, _ in deep}
    queries: Dict[int, list] = {}  # ui -> [(p, candidate flat indices)]
    cands = {}
    out_idx, out_best = [], []
    for p, d in deep:
        lo = starts[p]
        local_taken = uniq[pid == pid_of[p]].long() - lo
        owners = owners_of[p]
        if not owners:  # no unit ranks p: c = inf everywhere, first elements by index
            out_idx.append(torch.arange(lo, lo + d, device=device))
            out_best.append(torch.full((d,), -1, dtype=torch.int64, device=device))
            continue
        picks = []
        for ui in owners:
            bits = _bits(normalised[units[ui]][p].reshape(-1)).clone()
            bits.index_fill_(0, local_taken, -1)
            # a lower bound of the d-th largest: 2**15 buckets of the high bits (-1: bucket 0, less them)
            high = 8 * bits.element_size() - 16
            hist = torch.bincount((bits >> high).clamp_min_(0), minlength=1 << 15)
            hist[0] -= len(local_taken)
            b, _ = _bucket_of(hist.cumsum(0), numel[p] - len(local_taken), d)
            picks.append(_select(bits, int(b) << high, d, lambda pos: _hash32(pos + lo, seed + ui)))
        cands[p] = torch.unique(torch.cat(picks)) + lo
        for ui in owners:
            queries.setdefault(ui, []).append(p)
    counters = {ui: _RankCounter(normalised[units[ui]], domains[units[ui]], starts, seed + ui)
                for ui in queries}

    def keys_of(p, ui, idx):
        return _keys(normalised[units[ui]][p].reshape(-1)[idx - starts[p]], idx, seed + ui)

    # c-bounds of every candidate from the histograms; exact ranks only where the bounds
    # cannot decide the selection (at the d-th place) or the best unit
    plans = []
    requests: Dict[int, list] = {}  # ui -> [flat indices whose exact rank is needed]
    for p, d in deep:
        if p not in cands:
            continue
        owners, idx = owners_of[p], cands[p]
        lo, hi = zip(*(counters[ui].bounds(keys_of(p, ui, idx)) for ui in owners))
        clo = torch.stack([(r + 1).double() / sizes[units[ui]] for r, ui in zip(lo, owners)])
        chi = torch.stack([(r + 1).double() / sizes[units[ui]] for r, ui in zip(hi, owners)])
        c_lo, c_hi = clo.min(0).values, chi.min(0).values
        if len(idx) <= d:
            out, sure_in = torch.zeros_like(c_lo, dtype=torch.bool), torch.ones_like(c_lo, dtype=torch.bool)
        else:
            out = c_lo > torch.kthvalue(c_hi, d).values
            # at most d - 1 others can come first: among the d smallest whatever the exact values
            sure_in = torch.searchsorted(torch.sort(c_lo).values, c_hi, right=True) - 1 < d
        best_hi = chi.argmin(0)
        rival = (clo <= c_hi.unsqueeze(0)) & (torch.arange(len(owners), device=device).unsqueeze(1) != best_hi)
        refine = ~out & (~sure_in | rival.any(0))
        for ui in owners:
            requests.setdefault(ui, []).append(idx[refine])
        plans.append((p, d, owners, idx, chi, best_hi, out, sure_in, refine))
    exact: Dict[tuple, torch.Tensor] = {}
    for ui, parts in requests.items():
        plans_u = [pl for pl in plans if ui in pl[2]]
        keys = torch.cat([keys_of(pl[0], ui, part) for pl, part in zip(plans_u, parts)])
        ranks = counters[ui].exact(keys) if len(keys) else keys
        for pl, r in zip(plans_u, ranks.split([len(part) for part in parts])):
            exact[(pl[0], ui)] = r
    for p, d, owners, idx, chi, best_hi, out, sure_in, refine in plans:
        n_ref = int(refine.sum())
        c_ref = torch.full((n_ref,), math.inf, dtype=torch.float64, device=device)
        who_ref = torch.full((n_ref,), -1, dtype=torch.int64, device=device)
        for ui in owners:
            cu = (exact[(p, ui)] + 1).double() / sizes[units[ui]]
            better = cu < c_ref
            c_ref = torch.where(better, cu, c_ref)
            who_ref = torch.where(better, ui, who_ref)
        who = torch.tensor(owners, device=device)[best_hi]
        who[refine] = who_ref
        chosen = sure_in.clone()
        undecided = (~out & ~sure_in)[refine]  # refined candidates whose place is open
        n_open = d - int(sure_in.sum())
        if n_open > 0:
            ref_pos = refine.nonzero().squeeze(1)
            open_pos = ref_pos[undecided]
            first = torch.argsort(c_ref[undecided], stable=True)[:n_open]  # by index on ties
            chosen[open_pos[first]] = True
        out_idx.append(idx[chosen])
        out_best.append(who[chosen])
    return torch.cat(out_idx), torch.cat(out_best)




class _RankCounter:
    """Ranks in one unit's domain, rank(q) = #{f in the domain : key(f) > q}, for keys q of
    elements of the domain (key = score bits << 32 | seeded hash, :func:`_keys`).

    A histogram of the keys' top bits (up to 2**23 buckets: for float32 scores a relative
    width of 3e-5 of the score; for bfloat16 ones, whose 2**15 values hold thousands of
    elements each, the value and the hash's top 8 bits) bounds every rank at once: the
    elements in higher buckets come first, the others of q's bucket may or may not
    (:meth:`bounds`, O(N) once). :meth:`exact` streams the domain once and looks closer
    only at elements that share a bucket with one of its queries.
    """

    def __init__(self, parts: Mapping[str, torch.Tensor], dom: Sequence[str], starts: Mapping[str, int], seed: int):
        self.seed = seed
        self.bits = _bits(joined(parts, dom))
        sizes = torch.tensor([parts[p].numel() for p in dom], device=self.bits.device)
        self.d_starts = torch.cumsum(sizes, 0) - sizes
        self.to_flat = torch.tensor([starts[p] for p in dom], device=self.bits.device) - self.d_starts
        key_bits = 8 * self.bits.element_size() - 1 + 32
        self.shift = key_bits - min(_MAX_BUCKET_BITS, max(8, len(self.bits).bit_length()))  # of the key
        # counted here rather than kept from the selection: only deep floors need it, and
        # holding T tables (32 MiB each) through the union would raise the decision's peak
        self.cum = _cumulative_counts(1 << (key_bits - self.shift), (
            self._buckets(start, part) for start, part in _chunks(self.bits, _KEY_CHUNK)), self.bits)

    def _buckets(self, start: int, part: torch.Tensor) -> torch.Tensor:
        """Bucket (int32) of the keys of ``part`` = bits[start:start + len(part)]."""
        if self.shift >= 32:  # the score bits alone
            return (part >> (self.shift - 32)).int()
        pos = torch.arange(start, start + len(part), device=part.device)
        hashed = _hash32(self._flat(pos), self.seed)
        return ((part.long() << (32 - self.shift)) | (hashed >> self.shift)).int()

    def _flat(self, pos: torch.Tensor) -> torch.Tensor:
        return pos + self.to_flat[torch.searchsorted(self.d_starts, pos, right=True) - 1]

    def higher(self, b: torch.Tensor) -> torch.Tensor:
        """#elements in buckets above b."""
        return len(self.bits) - self.cum[b].long()

    def bounds(self, qkeys: torch.Tensor):
        """(lowest, highest) possible rank of each query."""
        b = qkeys >> self.shift
        higher = self.higher(b)
        return higher, higher + _bucket_size(self.cum, b) - 1

    def exact(self, qkeys: torch.Tensor) -> torch.Tensor:
        """Exact ranks: the elements in higher buckets, plus those of the query's own bucket
        with a greater key. The domain is streamed a chunk at a time; each element f of a
        query bucket beats the sorted queries from the first of its bucket up to the last
        below key(f) - a contiguous range, added to a difference array - so memory stays
        O(chunk + queries)."""
        order = torch.argsort(qkeys)
        queries = qkeys.index_select(0, order)
        is_query_bucket = torch.zeros(len(self.cum), dtype=torch.bool, device=qkeys.device)
        is_query_bucket[queries >> self.shift] = True
        beaten = torch.zeros(len(queries) + 1, dtype=torch.int64, device=qkeys.device)
        for start, part in _chunks(self.bits, _KEY_CHUNK):
            near = is_query_bucket.index_select(0, self._buckets(start, part)).nonzero().squeeze(1) + start
            if not len(near):
                continue
            keys = (self.bits.index_select(0, near).long() << 32) | _hash32(self._flat(near), self.seed)
            first = torch.searchsorted(queries, (keys >> self.shift) << self.shift)  # first query of f's bucket
            past = torch.searchsorted(queries, keys)  # queries with a key below key(f)
            ones = torch.ones_like(first)
            beaten.index_add_(0, first, ones)
            beaten.index_add_(0, past, -ones)
        greater = torch.cumsum(beaten, 0)[:-1]
        ranks = torch.empty_like(greater)
        ranks[order] = self.higher(queries >> self.shift) + greater
        return ranks


def _rank_descending(s: torch.Tensor, seed: int) -> torch.Tensor:
    """rank[i] = position of element i when sorted by decreasing score, ties in seeded order.

    The tie order is that of a seeded hash of i (larger first), computed on s's device.
    """
    index = torch.arange(len(s), device=s.device)
    by_hash = torch.argsort(_hash32(index, seed), descending=True)
    order = by_hash[torch.argsort(s[by_hash], descending=True, stable=True)]
    rank = torch.empty_like(order)
    rank[order] = index
    return rank
