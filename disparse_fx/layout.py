"""layout: a layered (Sugiyama-style) layout of a directed acyclic graph whose nodes
are grouped in bands, for :func:`disparse_fx.draw`.

Data flows down: layer 0 is the top row and every edge goes from a lower layer to a
higher one. The steps are the classic ones:

1. layering: longest path from the sources (a source is then pulled down to just above
   its first consumer); ``sinks`` (the task outputs) all go to the last layer;
2. an edge spanning ``k`` layers gets ``k - 1`` dummy points, one per layer it passes;
3. bands: every node belongs to one band (``draw`` makes one per owner set: the shared
   trunk, each task's head). A band takes a column range ``[x0, x1]`` over the layers
   it spans; bands whose layer spans overlap stand side by side in ``band_order``, and
   those that do not stack in tiers (each tier centred on the widest), so two bands
   never share a region. A dummy point lies in the band of its edge's source while it
   is within that band's layers, else in the band of its edge's target;
4. crossing reduction: alternate downward / upward sweeps order every layer of every
   band by the barycentre of its neighbours in the layer before; the ordering with the
   fewest crossings is kept;
5. x coordinates: sweeps pull every node to the mean x of its neighbours (dummy points
   weigh more, so long edges run straight) while keeping the order, the widths plus
   ``gap`` between neighbours and the band's column range (an isotonic regression per
   band and layer).

>>> lay = layered_layout(["x", "a", "b", "out"], [("x", "a"), ("x", "b"), ("a", "out"), ("b", "out")],
...                      band_of={"x": 0, "a": 1, "b": 2, "out": 0}, band_order=[1, 0, 2],
...                      width={"x": 1.0, "a": 1.0, "b": 1.0, "out": 1.0})
>>> lay.layer, lay.crossings
({'x': 0, 'a': 1, 'b': 1, 'out': 2}, 0)
>>> lay.x["a"] < lay.x["b"]
True
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Collection, Dict, Hashable, List, Mapping, Sequence, Tuple

import networkx as nx

from .errors import DisparseValueError

__all__ = ["Layout", "layered_layout", "count_crossings"]

log = logging.getLogger(__name__)

_DUMMY_WEIGHT = 4.0  # dummy points pull harder than boxes: long edges run straight


class _Dummy:
    """The point where edge number ``edge`` passes layer ``layer`` (hashed by identity:
    each is made once, and dense graphs have thousands)."""

    __slots__ = ("edge", "layer")

    def __init__(self, edge: int, layer: int):
        self.edge, self.layer = edge, layer


@dataclass(frozen=True)
class Layout:
    """Where :func:`layered_layout` put things.

    ``layer``: row of each node, 0 = top; ``x``: horizontal centre of each node (the
    units of ``width``); ``routes``: for every edge, its points ``(x, layer)`` from the
    source through one point per layer passed to the target; ``route_bands``: the band of
    each of those points (a dummy point's band: see step 3); ``bands``: per band, its
    column range and layer span ``(x0, x1, first layer, last layer)``; ``crossings``:
    pairs of edge segments between adjacent layers that cross; ``num_layers``.
    """

    layer: Mapping[Hashable, int]
    x: Mapping[Hashable, float]
    routes: Mapping[Tuple[Hashable, Hashable], Tuple[Tuple[float, int], ...]]
    route_bands: Mapping[Tuple[Hashable, Hashable], Tuple[Hashable, ...]]
    bands: Mapping[Hashable, Tuple[float, float, int, int]]
    crossings: int
    num_layers: int


def count_crossings(rows: Sequence[Sequence[Hashable]], segments: Collection[Tuple[Hashable, Hashable]]) -> int:
    """Pairs of segments that cross, for segments joining consecutive rows.

    ``rows``: the nodes of each layer, left to right; ``segments``: ``(upper, lower)``
    pairs whose lower node is in the row after the upper one's. Two segments cross when
    their upper ends and their lower ends are in opposite orders (a shared end is no
    crossing). ``O(m log m)`` for ``m`` segments between two rows.

    >>> count_crossings([["a", "b"], ["c", "d"]], [("a", "d"), ("b", "c")])
    1
    """
    index: Dict[Hashable, Tuple[int, int]] = {n: (r, i) for r, row in enumerate(rows) for i, n in enumerate(row)}
    by_row: Dict[int, List[Tuple[int, int]]] = {}
    for u, v in segments:
        (ru, iu), (rv, iv) = index[u], index[v]
        if rv != ru + 1:
            raise DisparseValueError(f"segment {u!r} -> {v!r} joins rows {ru} and {rv}, not consecutive rows")
        by_row.setdefault(ru, []).append((iu, iv))
    return sum(_inversions(pairs) for pairs in by_row.values())


def _inversions(pairs: List[Tuple[int, int]]) -> int:
    """Pairs ``i < j`` with ``b_i > b_j`` once sorted by ``(a, b)`` (a Fenwick tree over b)."""
    pairs.sort()
    size = 1 + max(b for _, b in pairs)
    tree = [0] * (size + 1)
    total = 0
    for seen, (_, b) in enumerate(pairs):
        i, at_most_b = b + 1, 0
        while i > 0:
            at_most_b += tree[i]
            i -= i & -i
        total += seen - at_most_b
        i = b + 1
        while i <= size:
            tree[i] += 1
            i += i & -i
    return total


def layered_layout(nodes: Sequence[Hashable], edges: Sequence[Tuple[Hashable, Hashable]], *,
                   band_of: Mapping[Hashable, Hashable], band_order: Sequence[Hashable],
                   width: Mapping[Hashable, float], sinks: Collection[Hashable] = (), gap: float = 0.25,
                   band_gap: float = 0.6, dummy_width: float = 0.12, sweeps: int = 16) -> Layout:
    """Lay out a DAG in layers (see the module docstring for the steps).

    ``nodes``: in a stable order (the first ordering of every layer follows it);
    ``edges``: ``(source, target)`` pairs, duplicates ignored; ``band_of``: each node's
    band, every band in ``band_order`` (left to right where bands stand side by side);
    ``width``: each node's width; ``sinks``: nodes put on the last layer; ``gap`` /
    ``band_gap``: least space between neighbours in a band / between bands.

    Raises DisparseValueError when the graph has a cycle or a node lacks a band or a width.
    """
    graph = nx.DiGraph()
    graph.add_nodes_from(nodes)
    graph.add_edges_from(edges)
    if len(graph) != len(nodes):
        raise DisparseValueError(f"layered_layout: edges name nodes that are not in nodes: "
                                 f"{sorted(map(str, set(graph) - set(nodes)))[:5]}")
    if not nx.is_directed_acyclic_graph(graph):
        cycle = nx.find_cycle(graph)
        raise DisparseValueError(f"layered_layout needs an acyclic graph, got the cycle "
                                 f"{' -> '.join(str(u) for u, _ in cycle)} -> {cycle[0][0]}")
    missing = [n for n in nodes if n not in band_of or n not in width]
    if missing:
        raise DisparseValueError(f"layered_layout: no band or no width for {missing[:5]}")
    band_rank = {b: i for i, b in enumerate(band_order)}
    unknown = {band_of[n] for n in nodes} - set(band_rank)
    if unknown:
        raise DisparseValueError(f"layered_layout: bands {sorted(map(str, unknown))} are not in band_order")

    layer = _layers(graph, nodes, set(sinks))
    edge_list = list(dict.fromkeys(edges))
    band, size, segments, chains = _with_dummies(edge_list, layer, band_of, width, dummy_width)
    num_layers = 1 + max(layer.values(), default=0)
    bands = _place_bands(band, size, layer, band_rank, gap, band_gap)

    hint = {n: i for i, n in enumerate(nodes)}
    for k, (u, v) in enumerate(edge_list):
        for d in chains[k][1:-1]:
            hint[d] = hint[v] - 0.5
    rows: List[List[Hashable]] = [[] for _ in range(num_layers)]
    for n in sorted(band, key=lambda n: (bands[band[n]][0], hint[n])):
        rows[layer[n]].append(n)
    above: Dict[Hashable, List[Hashable]] = {n: [] for n in band}
    below: Dict[Hashable, List[Hashable]] = {n: [] for n in band}
    for u, v in segments:
        below[u].append(v)
        above[v].append(u)

    rows, crossings = _order(rows, above, below, band, bands, size, segments, gap, sweeps)
    x = _coordinates(rows, above, below, band, bands, size, gap)
    _straighten(chains, rows, x, band, bands, size, gap)
    routes = {(u, v): tuple((x[p], layer[p]) for p in chains[k]) for k, (u, v) in enumerate(edge_list)}
    route_bands = {(u, v): tuple(band[p] for p in chains[k]) for k, (u, v) in enumerate(edge_list)}
    log.debug("layered layout: %d nodes, %d layers, %d dummy points, %d crossings", len(nodes), num_layers,
              len(band) - len(nodes), crossings)
    return Layout(layer={n: layer[n] for n in nodes}, x={n: x[n] for n in nodes}, routes=routes,
                  route_bands=route_bands, bands=bands, crossings=crossings, num_layers=num_layers)


def _layers(graph: nx.DiGraph, nodes: Sequence[Hashable], sinks: set) -> Dict[Hashable, int]:
    layer: Dict[Hashable, int] = {}
    for n in nx.topological_sort(graph):
        layer[n] = max((layer[p] + 1 for p in graph.predecessors(n)), default=0)
    for n in nodes:  # a source feeding a late node sits just above it, not at the top
        if graph.in_degree(n) == 0 and graph.out_degree(n) > 0 and n not in sinks:
            layer[n] = min(layer[s] for s in graph.successors(n)) - 1
    inner = [layer[n] for n in nodes if n not in sinks]
    if sinks:
        last = 1 + max(inner, default=-1)
        for n in sinks:
            layer[n] = max(last, layer[n])
    return layer


def _with_dummies(edges, layer, band_of, width, dummy_width):
    """Bands and sizes of nodes and dummy points, unit segments, and each edge's chain."""
    band = dict(band_of)
    size = dict(width)
    span: Dict[Hashable, Tuple[int, int]] = {}
    for n, b in band_of.items():
        if n in layer:
            lo, hi = span.get(b, (layer[n], layer[n]))
            span[b] = (min(lo, layer[n]), max(hi, layer[n]))
    segments: List[Tuple[Hashable, Hashable]] = []
    chains: List[List[Hashable]] = []
    for k, (u, v) in enumerate(edges):
        chain: List[Hashable] = [u]
        for lay in range(layer[u] + 1, layer[v]):
            d = _Dummy(k, lay)
            bu = band_of[u]
            band[d] = bu if band_of[v] == bu or span[bu][0] <= lay <= span[bu][1] else band_of[v]
            size[d] = dummy_width
            chain.append(d)
        chain.append(v)
        segments += list(zip(chain, chain[1:]))
        chains.append(chain)
    for n in band:
        if isinstance(n, _Dummy):
            layer[n] = n.layer
    return band, size, segments, chains


def _place_bands(band, size, layer, band_rank, gap, band_gap) -> Dict[Hashable, Tuple[float, float, int, int]]:
    """Column range and layer span of every band: side by side where spans overlap."""
    span: Dict[Hashable, List[int]] = {}
    row_width: Dict[Tuple[Hashable, int], float] = {}
    for n, b in band.items():
        s = span.setdefault(b, [layer[n], layer[n]])
        s[0], s[1] = min(s[0], layer[n]), max(s[1], layer[n])
        key = (b, layer[n])
        row_width[key] = row_width.get(key, -gap) + size[n] + gap
    width = {b: max(w for (bb, _), w in row_width.items() if bb == b) for b in span}
    tiers: List[List[Hashable]] = []
    reach = None
    for b in sorted(span, key=lambda b: (span[b][0], band_rank[b])):
        if reach is None or span[b][0] > reach:
            tiers.append([])
            reach = span[b][1]
        tiers[-1].append(b)
        reach = max(reach, span[b][1])
    widths = [sum(width[b] for b in t) + band_gap * (len(t) - 1) for t in tiers]
    widest = max(widths, default=0.0)
    out: Dict[Hashable, Tuple[float, float, int, int]] = {}
    for tier, tier_width in zip(tiers, widths):
        left = (widest - tier_width) / 2
        for b in sorted(tier, key=band_rank.__getitem__):
            out[b] = (left, left + width[b], span[b][0], span[b][1])
            left += width[b] + band_gap
    return out


def _packed(row, band, bands, size, gap) -> Dict[Hashable, float]:
    """x of a row's nodes packed side by side, centred in their band."""
    x: Dict[Hashable, float] = {}
    by_band: Dict[Hashable, List[Hashable]] = {}
    for n in row:
        by_band.setdefault(band[n], []).append(n)
    for b, members in by_band.items():
        x0, x1 = bands[b][:2]
        total = sum(size[n] for n in members) + gap * (len(members) - 1)
        left = x0 + (x1 - x0 - total) / 2
        for n in members:
            x[n] = left + size[n] / 2
            left += size[n] + gap
    return x


def _order(rows, above, below, band, bands, size, segments, gap, sweeps):
    """Barycentre sweeps within bands; the rows with the fewest crossings and their count."""
    x: Dict[Hashable, float] = {}
    for row in rows:
        x.update(_packed(row, band, bands, size, gap))
    best = [list(r) for r in rows]
    best_crossings = count_crossings(best, segments)
    for sweep in range(sweeps):
        if best_crossings == 0:
            break
        down = sweep % 2 == 0
        for r in (range(1, len(rows)) if down else range(len(rows) - 2, -1, -1)):
            neighbours = above if down else below
            position = {n: i for i, n in enumerate(rows[r])}

            def key(n):
                ns = neighbours[n]
                centre = sum(x[m] for m in ns) / len(ns) if ns else x[n]
                return bands[band[n]][0], centre, position[n]

            rows[r] = sorted(rows[r], key=key)
            x.update(_packed(rows[r], band, bands, size, gap))
        crossings = count_crossings(rows, segments)
        if crossings < best_crossings:
            best, best_crossings = [list(r) for r in rows], crossings
    return best, best_crossings


def _coordinates(rows, above, below, band, bands, size, gap, passes: int = 6) -> Dict[Hashable, float]:
    """Pull every node towards its neighbours' mean x, keeping order, gaps and bands."""
    x: Dict[Hashable, float] = {}
    for row in rows:
        x.update(_packed(row, band, bands, size, gap))
    order = list(range(len(rows)))
    schedule = [(order[1:], (above,)), (order[-2::-1], (below,))] * passes + [(order, (above, below))]
    for layers, sides in schedule:
        for r in layers:
            by_band: Dict[Hashable, List[Hashable]] = {}
            for n in rows[r]:
                by_band.setdefault(band[n], []).append(n)
            for b, members in by_band.items():
                desired = []
                for n in members:
                    ns = [m for side in sides for m in side[n]]
                    desired.append(sum(x[m] for m in ns) / len(ns) if ns else x[n])
                weights = [_DUMMY_WEIGHT if isinstance(n, _Dummy) else 1.0 for n in members]
                placed = _fit_in_order(desired, weights, [size[n] for n in members], bands[b][0], bands[b][1], gap)
                x.update(zip(members, placed))
    return x


def _straighten(chains, rows, x, band, bands, size, gap) -> None:
    """Put the dummy points of each long edge in one column per band when the neighbours
    in their rows leave room: in line with the edge's end in that band (its source, else
    its target), so the edge runs straight and bends once."""
    where = {n: (r, i) for r, row in enumerate(rows) for i, n in enumerate(row)}
    for chain in chains:
        runs: List[List[Hashable]] = []
        for d in chain[1:-1]:
            if runs and band[runs[-1][-1]] == band[d]:
                runs[-1].append(d)
            else:
                runs.append([d])
        for run in runs:
            b = band[run[0]]
            lo, hi = float("-inf"), float("inf")
            for d in run:
                r, i = where[d]
                row = rows[r]
                lo = max(lo, bands[b][0] + size[d] / 2)
                hi = min(hi, bands[b][1] - size[d] / 2)
                if i > 0 and band[row[i - 1]] == b:
                    lo = max(lo, x[row[i - 1]] + (size[row[i - 1]] + size[d]) / 2 + gap)
                if i + 1 < len(row) and band[row[i + 1]] == b:
                    hi = min(hi, x[row[i + 1]] - (size[row[i + 1]] + size[d]) / 2 - gap)
            if lo > hi:
                continue
            anchor = chain[0] if band[chain[0]] == b else chain[-1] if band[chain[-1]] == b else None
            target = x[anchor] if anchor is not None else sum(x[d] for d in run) / len(run)
            for d in run:
                x[d] = min(max(target, lo), hi)


def _fit_in_order(desired: Sequence[float], weights: Sequence[float], widths: Sequence[float], lo: float,
                  hi: float, gap: float) -> List[float]:
    """x closest to ``desired`` (weighted least squares) with ``x[i+1] - x[i] >= (w[i] +
    w[i+1]) / 2 + gap`` and every box inside ``[lo, hi]``: pool-adjacent-violators on
    ``desired - offset`` (an isotonic regression), then clamped to the range.

    >>> _fit_in_order([0.0, 0.0], [1.0, 1.0], [1.0, 1.0], -5.0, 5.0, 0.0)
    [-0.5, 0.5]
    """
    offset = [0.0]
    for a, b in zip(widths, widths[1:]):
        offset.append(offset[-1] + (a + b) / 2 + gap)
    blocks: List[List[float]] = []  # [weighted sum, weight, count]
    for d, c, w in zip(desired, offset, weights):
        blocks.append([w * (d - c), w, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, w2, k = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += w2
            blocks[-1][2] += k
    lowest, highest = lo + widths[0] / 2, hi - widths[-1] / 2 - offset[-1]
    fitted: List[float] = []
    for s, w, k in blocks:
        fitted += [min(max(s / w, lowest), max(lowest, highest))] * int(k)
    return [f + c for f, c in zip(fitted, offset)]
