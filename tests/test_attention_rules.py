"""Channel rules for attention, LayerNorm, embeddings and Swin (passes.rules.attention,
norm, embedding, torchvision_ops): which channels an attention block has under each
head-split policy, where the head split is found, and that the masked model computes
the slim one (``slim_channels`` checks parity itself; the tests compare outputs too)."""
from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import disparse_fx as dfx
from disparse_fx.serialize import load, save
from disparse_fx.passes.attention import MultiheadAttention as SlimMHA
from disparse_fx.passes.attention import shifted_window_attention as slim_swa
from disparse_fx.passes.channel_groups import find_channel_groups
from disparse_fx.passes.errors import DisparseValueError, UnsupportedOpError
from disparse_fx.passes.insert_channel_masks import (fold_channel_masks, insert_channel_masks, is_masked_norm,
                                         masked_layer_norm, masked_rms_norm)
from disparse_fx.passes.rules.attention import find_head_splits
from disparse_fx.passes.slim import channels_emptied_by, slim_channels
from disparse_fx.passes.trace import trace_model

from .test_slim import random_keep

POLICIES = ("heads", "head_dims")


# ----------------------------------------------------------------------------- helpers
def outputs(model, *xs):
    model.eval()
    with torch.no_grad():
        out = model(*xs)
    return dict(out) if isinstance(out, dict) else dict(enumerate(out))


def assert_outputs_close(a, b, tol=1e-4):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        scale = a[k].abs().max().clamp_min(1e-6)
        assert (a[k] - b[k]).abs().max() <= tol * scale, k


def masked_and_slim(gm, groups, keep, *xs):
    """Masked model, slim model (parity checked by slim_channels), and their outputs compared."""
    masked = insert_channel_masks(gm, groups, keep)
    slim = slim_channels(gm, groups, keep)
    assert_outputs_close(outputs(masked, *xs), outputs(slim, *xs))
    return masked, slim


def params_of(module):
    return [(n, tuple(p.shape)) for n, p in module.named_parameters()]


def group_of(groups, param, dim):
    """The single group slicing ``param`` along ``dim``."""
    found = [(g, m) for g, m in groups.members_of(param) if m.dim == dim]
    assert len(found) == 1, (param, dim, found)
    return found[0]


def group_at(groups, gids):
    """The group holding global channel ids ``gids`` (all in one group)."""
    (gid,) = {max(i for i, o in enumerate(groups.offsets) if o <= int(c)) for c in gids}
    return groups.groups[gid]


def traced_groups(model, policy, x=None):
    """(gm, groups) of ``model`` traced and analysed on ``x`` (default X_SEQ) under ``policy``."""
    torch.manual_seed(0)
    gm = trace_model(model)
    return gm, find_channel_groups(gm, (X_SEQ if x is None else x,), attention=policy)


def calls(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


# ----------------------------------------------------------------------------- 1. sdpa
class PackedSDPA(nn.Module):
    """x -> inp -> qkv Linear -> reshape(B, L, 3, H, D) -> permute -> unbind -> sdpa -> merge -> proj,
    with a residual around the attention and two task heads."""

    def __init__(self, c=8, heads=2, mask="none"):
        super().__init__()
        self.heads, self.mask = heads, mask
        self.inp = nn.Linear(c, c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.a, self.b = nn.Linear(c, 2), nn.Linear(c, 3)

    def forward(self, x, attn_mask=None):
        B, L, C = x.shape
        h = self.inp(x)
        qkv = self.qkv(h).reshape(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.mask == "input":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        elif self.mask == "per_head":  # a mask made in forward, one slice per head
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=x.new_zeros(B, self.heads, L, L))
        elif self.mask == "constant":  # a constant tensor: traced as a buffer, sliced with its heads
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.arange(50.0).view(1, 2, 5, 5) / 50)
        else:
            o = F.scaled_dot_product_attention(q, k, v)
        o = o.transpose(1, 2).reshape(B, L, C)
        y = h + self.proj(o)
        return {"a": self.a(y), "b": self.b(y)}


class SeparateSDPA(nn.Module):
    """Separate q, k, v projections (q/k and v head dims are different channel sets)."""

    def __init__(self, c=8, heads=2):
        super().__init__()
        self.heads = heads
        self.inp = nn.Linear(c, c)
        self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.proj = nn.Linear(c, c)
        self.a, self.b = nn.Linear(c, 2), nn.Linear(c, 3)

    def forward(self, x):
        B, L, C = x.shape
        h = self.inp(x)
        q, k, v = (m(h).view(B, L, self.heads, C // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, C)
        y = h + self.proj(o)
        return {"a": self.a(y), "b": self.b(y)}


X_SEQ = torch.randn(2, 5, 8)
H, D = 2, 4


@pytest.mark.parametrize("policy", POLICIES)
def test_sdpa_groups_index_patterns_and_parity(policy):
    gm, groups = traced_groups(PackedSDPA(), policy)
    g, rows = group_of(groups, "qkv.weight", 0)
    assert g.removable, g.reason
    _, cols = group_of(groups, "proj.weight", 1)
    assert group_of(groups, "qkv.bias", 0)[0] is g
    assert group_of(groups, "proj.weight", 1)[0] is g
    if policy == "heads":
        assert g.size == H
        # rows: q block, k block, v block; inside each head-major (D rows per head)
        assert rows.index.tolist() == torch.arange(H).repeat_interleave(D).repeat(3).tolist()
        assert cols.index.tolist() == torch.arange(H).repeat_interleave(D).tolist()
    else:
        assert g.size == D
        assert rows.index.tolist() == torch.arange(D).repeat(3 * H).tolist()
        assert cols.index.tolist() == torch.arange(D).repeat(H).tolist()
    # the residual stream is removable too, and nothing else attention-related is fixed
    res = group_of(groups, "inp.weight", 0)[0]
    assert res.removable and res is group_of(groups, "proj.weight", 0)[0]
    for seed in range(3):
        keep = random_keep(groups, seed=seed)
        masked_and_slim(gm, groups, keep, X_SEQ)
    keep = {g.id: torch.arange(g.size) == 0}  # exactly one head / one head dim left
    _, slim = masked_and_slim(gm, groups, keep, X_SEQ)
    assert slim.qkv.weight.shape == (3 * (D if policy == "heads" else H), 8)
    assert slim.proj.weight.shape == (8, D if policy == "heads" else H)


def _sdpa_scale(slim):
    (node,) = calls(slim, F.scaled_dot_product_attention)
    return node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)


def test_sdpa_head_dims_slim_writes_the_original_scale():
    gm = trace_model(PackedSDPA())
    groups = find_channel_groups(gm, (X_SEQ,), attention="head_dims")
    g = group_of(groups, "qkv.weight", 0)[0]
    _, slim = masked_and_slim(gm, groups, {g.id: torch.tensor([True, False, True, False])}, X_SEQ)
    assert _sdpa_scale(slim) == pytest.approx(D ** -0.5)
    # nothing removed from q/k: the default scale is right, no explicit one
    res = group_of(groups, "inp.weight", 0)[0]
    _, slim = masked_and_slim(gm, groups, {res.id: torch.arange(8) % 3 != 0}, X_SEQ)
    assert _sdpa_scale(slim) is None
    # heads policy: the head width is unchanged, no explicit scale
    groups = find_channel_groups(gm, (X_SEQ,), attention="heads")
    g = group_of(groups, "qkv.weight", 0)[0]
    _, slim = masked_and_slim(gm, groups, {g.id: torch.tensor([False, True])}, X_SEQ)
    assert _sdpa_scale(slim) is None


def test_separate_projections_head_dims_split_qk_from_v():
    gm = trace_model(SeparateSDPA())
    groups = find_channel_groups(gm, (X_SEQ,), attention="head_dims")
    qk = group_of(groups, "q.weight", 0)[0]
    v = group_of(groups, "v.weight", 0)[0]
    assert qk is group_of(groups, "k.weight", 0)[0]
    assert qk is not v and qk.size == v.size == D
    assert v is group_of(groups, "proj.weight", 1)[0]
    assert qk.removable and v.removable
    # only v dims removed: the scale stays implicit
    _, slim = masked_and_slim(gm, groups, {v.id: torch.tensor([True, True, False, True])}, X_SEQ)
    assert _sdpa_scale(slim) is None and slim.v.weight.shape == (6, 8) and slim.q.weight.shape == (8, 8)
    _, slim = masked_and_slim(gm, groups, {qk.id: torch.tensor([False, True, True, True])}, X_SEQ)
    assert _sdpa_scale(slim) == pytest.approx(D ** -0.5) and slim.k.weight.shape == (6, 8)
    for seed in range(3):
        masked_and_slim(gm, groups, random_keep(groups, seed=seed), X_SEQ)
    groups = find_channel_groups(gm, (X_SEQ,), attention="heads")
    heads = group_of(groups, "q.weight", 0)[0]
    assert heads.size == H and heads is group_of(groups, "v.weight", 0)[0]
    for seed in range(3):
        masked_and_slim(gm, groups, random_keep(groups, seed=seed), X_SEQ)


def test_sdpa_broadcast_mask_keeps_heads_removable_and_per_head_mask_pins_them():
    gm = trace_model(PackedSDPA(mask="input"))
    mask = torch.zeros(1, 1, 5, 5)
    mask[..., -1] = float("-inf")
    groups = find_channel_groups(gm, (X_SEQ, mask), attention="heads")
    g = group_of(groups, "qkv.weight", 0)[0]
    assert g.removable and g.size == H
    # a per-head mask given as an input has fixed head slices
    groups = find_channel_groups(gm, (X_SEQ, torch.zeros(1, H, 5, 5)), attention="heads")
    g = group_of(groups, "qkv.weight", 0)[0]
    assert not g.removable and "attn_mask" in g.reason and "fixed" in g.reason
    gm = trace_model(PackedSDPA(mask="per_head"))
    groups = find_channel_groups(gm, (X_SEQ,), attention="heads")
    g = group_of(groups, "qkv.weight", 0)[0]
    assert not g.removable
    assert "scaled_dot_product_attention" in g.reason and "fixed" in g.reason
    # per head dim there is nothing to pin: the mask has no head-dim axis
    groups = find_channel_groups(gm, (X_SEQ,), attention="head_dims")
    assert group_of(groups, "qkv.weight", 0)[0].removable
    masked_and_slim(gm, groups, random_keep(groups, seed=0), X_SEQ)
    # a constant per-head mask is a buffer of the traced module: it goes with its heads
    gm = trace_model(PackedSDPA(mask="constant"))
    groups = find_channel_groups(gm, (X_SEQ,), attention="heads")
    g = group_of(groups, "qkv.weight", 0)[0]
    assert g.removable and g is group_of(groups, "_tensor_constant0", 1)[0]
    for kept in (0, 1):
        _, slim = masked_and_slim(gm, groups, {g.id: torch.arange(H) == kept}, X_SEQ)
        assert torch.equal(slim._tensor_constant0, gm._tensor_constant0[:, kept:kept + 1])


# ----------------------------------------------------------------------------- 2. find_head_splits
class ChunkedQKV(nn.Module):
    def __init__(self, c=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = q.reshape(B, L, self.heads, -1).transpose(1, 2)
        k = k.reshape(B, L, self.heads, -1).transpose(1, 2)
        v = v.reshape(B, L, self.heads, -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, L, C))


class MatmulAttention(nn.Module):
    def __init__(self, c=8, heads=2):
        super().__init__()
        self.heads, self.scale = heads, (c // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.a, self.b = nn.Linear(c, 2), nn.Linear(c, 3)

    def forward(self, x):
        B, L, C = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        o = (attn @ v).transpose(1, 2).reshape(B, L, C)
        y = self.proj(o)
        return {"a": self.a(y), "b": self.b(y)}


class EinsumAttention(nn.Module):
    def __init__(self, c=8, heads=2, eq_logits="b h i d, b h j d -> b h i j", eq_out="bhij,bhjd->bhid"):
        super().__init__()
        self.heads, self.eq_logits, self.eq_out = heads, eq_logits, eq_out
        self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.proj = nn.Linear(c, c)
        self.a, self.b = nn.Linear(c, 2), nn.Linear(c, 3)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = (m(x).view(B, L, self.heads, C // self.heads).permute(0, 2, 1, 3) for m in (self.q, self.k, self.v))
        attn = torch.einsum(self.eq_logits, q, k).softmax(-1)
        o = torch.einsum(self.eq_out, attn, v)
        y = self.proj(o.permute(0, 2, 1, 3).reshape(B, L, C))
        return {"a": self.a(y), "b": self.b(y)}


class ShuffleNoAttention(nn.Module):
    """A channel shuffle (view -> transpose -> reshape) and a weight matmul: no attention."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.w = nn.Parameter(torch.randn(8, 6))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = self.conv(x)
        n, c, hh, ww = h.shape
        h = h.view(n, 2, c // 2, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)
        z = h.flatten(2).transpose(1, 2) @ self.w.view(c, 6)  # weights reshaped with a size
        return {"a": self.head(h), "b": z}


def _reshapes(gm, names):
    by_name = {n.name: n for n in gm.graph.nodes}
    for name in names:
        assert by_name[name].target in ("reshape", "view"), name


def test_find_head_splits_packed_qkv():
    gm = trace_model(PackedSDPA())
    assert find_head_splits(gm) == {"reshape"}  # not the merge reshape_1
    _reshapes(gm, ["reshape", "reshape_1"])


def test_find_head_splits_chunked_qkv():
    gm = trace_model(ChunkedQKV())
    assert find_head_splits(gm) == {"reshape", "reshape_1", "reshape_2"}
    _reshapes(gm, ["reshape_3"])  # the merge is not a split
    groups = find_channel_groups(gm, (X_SEQ,), attention="heads")
    g, rows = group_of(groups, "qkv.weight", 0)
    assert g.size == H and rows.index.tolist() == torch.arange(H).repeat_interleave(D).repeat(3).tolist()
    # head dims: q/k dims (0..D-1) and v dims (D..2D-1) are different channels of the one
    # qkv output vector (so one group)
    groups = find_channel_groups(gm, (X_SEQ,), attention="head_dims")
    g, rows = group_of(groups, "qkv.weight", 0)
    qk, v = torch.arange(D).repeat(H), torch.arange(D, 2 * D).repeat(H)
    assert g.size == 2 * D and rows.index.tolist() == torch.cat([qk, qk, v]).tolist()
    assert group_of(groups, "proj.weight", 1)[1].index.tolist() == v.tolist()


def test_find_head_splits_matmul_and_einsum_attention():
    gm = trace_model(MatmulAttention())
    assert find_head_splits(gm) == {"reshape"}
    gm = trace_model(EinsumAttention())
    assert find_head_splits(gm) == {"view", "view_1", "view_2"}
    _reshapes(gm, ["view", "view_1", "view_2", "reshape"])


def test_find_head_splits_ignores_channel_shuffle_and_weight_products():
    gm = trace_model(ShuffleNoAttention())
    assert find_head_splits(gm) == frozenset()
    x = torch.randn(1, 3, 2, 2)
    for policy in POLICIES:
        groups = find_channel_groups(gm, (x,), attention=policy)
        conv, m = group_of(groups, "conv.weight", 0)
        # the usual shuffle coupling (4 channels of 2 conv channels each), not a head split
        assert conv.size == 4 and m.index.tolist() == [0, 1, 2, 3, 0, 1, 2, 3] and conv.removable
        assert conv is group_of(groups, "w", 0)[0]
        masked_and_slim(gm, groups, {conv.id: torch.tensor([True, False, False, True])}, x)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("model", [MatmulAttention, ChunkedQKV], ids=lambda m: m.__name__)
def test_matmul_and_chunked_attention_slim(model, policy):
    gm = trace_model(model())
    groups = find_channel_groups(gm, (X_SEQ,), attention=policy)
    g = group_of(groups, "qkv.weight", 0)[0]
    assert g.removable and g.size == (H if policy == "heads" else D if model is MatmulAttention else 2 * D)
    for seed in range(2):
        masked_and_slim(gm, groups, random_keep(groups, seed=seed), X_SEQ)


# ----------------------------------------------------------------------------- 3. einsum
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("eqs", [
    ("b h i d, b h j d -> b h i j", "b h i j , b h j d -> b h i d"),
    ("...id,...jd->...ij", "...ij,...jd->...id"),
    ("...id,...jd", "bhij,bhjd->bhid"),  # implicit output: the ellipsis, then letters used once
], ids=["spaces", "ellipsis", "implicit"])
def test_einsum_attention_groups_and_parity(eqs, policy):
    gm = trace_model(EinsumAttention(eq_logits=eqs[0], eq_out=eqs[1]))
    groups = find_channel_groups(gm, (X_SEQ,), attention=policy)
    q, rows = group_of(groups, "q.weight", 0)
    v = group_of(groups, "v.weight", 0)[0]
    assert q.removable and v.removable
    assert q is group_of(groups, "k.weight", 0)[0]
    if policy == "heads":
        assert q is v and q.size == H
        assert rows.index.tolist() == torch.arange(H).repeat_interleave(D).tolist()
    else:
        assert q is not v and q.size == v.size == D
        assert rows.index.tolist() == torch.arange(D).repeat(H).tolist()
    # head dims: the logits sum q over d, a contraction without a weight; heads are a batch dim
    (einsum0, _) = calls(gm, torch.einsum)
    summed = [c for c in groups.contractions if c.consumer == einsum0.name]
    if policy == "head_dims":
        assert [(c.dim, c.weight) for c in summed] == [(3, None)]
    else:
        assert summed == []
    for seed in range(2):
        masked_and_slim(gm, groups, random_keep(groups, seed=seed), X_SEQ)


class GroupedEinsum(nn.Module):
    """Five-dim attention (B, G, H, L, D) with upper-case letters and spaces."""

    def __init__(self, c=8):
        super().__init__()
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.a, self.b = nn.Linear(c, 2), nn.Linear(c, 3)

    def forward(self, x):
        B, L, C = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, 2, 2, 2).permute(2, 0, 3, 4, 1, 5)
        q, k, v = qkv.unbind(0)
        attn = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k).softmax(-1)
        o = torch.einsum("B G H I J, B G H J D -> B G H I D", attn, v)
        y = self.proj(o.permute(0, 3, 1, 2, 4).reshape(B, L, C))
        return {"a": self.a(y), "b": self.b(y)}


@pytest.mark.parametrize("policy", POLICIES)
def test_einsum_five_dims_with_spaces(policy):
    gm = trace_model(GroupedEinsum())
    assert find_head_splits(gm) == {"reshape"}
    groups = find_channel_groups(gm, (X_SEQ,), attention=policy)
    g = group_of(groups, "qkv.weight", 0)[0]
    assert g.removable and g.size == 2
    for seed in range(2):
        masked_and_slim(gm, groups, random_keep(groups, seed=seed), X_SEQ)


class WeightEinsum(nn.Module):
    def __init__(self, implicit=False):
        super().__init__()
        self.implicit = implicit
        self.inp = nn.Linear(8, 6)
        self.w = nn.Parameter(torch.randn(5, 6))
        self.a, self.b = nn.Linear(5, 2), nn.Linear(5, 3)

    def forward(self, x):
        h = self.inp(x)
        if self.implicit:
            y = torch.einsum("ij,jk", h[0], self.w.t()).unsqueeze(0)  # implicit output "ik"
        else:
            y = torch.einsum("bld,ed->ble", h, self.w)
        return {"a": self.a(y), "b": self.b(y)}


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_weight_einsum_joins_input_channels_and_is_the_contraction_weight(implicit):
    gm = trace_model(WeightEinsum(implicit))
    x = torch.randn(1, 3, 8)
    groups = find_channel_groups(gm, (x,))
    d = group_of(groups, "w", 1)[0]
    assert d is group_of(groups, "inp.weight", 0)[0] and d.removable and d.size == 6
    e = group_of(groups, "w", 0)[0]
    assert e is group_of(groups, "a.weight", 1)[0] and e.removable and e.size == 5
    (node,) = calls(gm, torch.einsum)
    (c,) = [c for c in groups.contractions if c.consumer == node.name]
    if not implicit:
        assert c.weight == ("w", 1) and c.dim == 2
    for seed in range(3):
        _, slim = masked_and_slim(gm, groups, random_keep(groups, seed=seed), x)
    # element masks emptying a column of w empty the channel it reads
    if not implicit:
        mask = torch.ones(5, 6, dtype=torch.bool)
        mask[:, 2] = False
        keep = channels_emptied_by(groups, {"w": mask})
        assert keep[d.id].tolist() == [True, True, False, True, True, True]


class SublistEinsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 4)

    def forward(self, x):
        h = self.inp(x)
        return {"a": torch.einsum(h, [0, 1], h, [2, 1], [0, 2])}


def test_einsum_sublist_form_raises_naming_the_node():
    gm = trace_model(SublistEinsum())
    with pytest.raises(UnsupportedOpError, match=r"einsum.*sublist") as info:
        find_channel_groups(gm, (torch.randn(3, 4),))
    assert "'einsum'" in str(info.value)


# ----------------------------------------------------------------------------- 4. gather
class RelPosBias(nn.Module):
    """Matmul attention plus a per-head relative position bias ``table[idx]``."""

    def __init__(self, c=8, heads=2, n=4):
        super().__init__()
        self.heads, self.n = heads, n
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.table = nn.Parameter(torch.randn(2 * n - 1, heads))
        pos = torch.arange(n)
        self.register_buffer("idx", (pos[:, None] - pos[None, :] + n - 1))
        self.a, self.b = nn.Linear(c, 2), nn.Linear(c, 3)

    def forward(self, x):
        B, L, C = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.table[self.idx]                 # (n, n, heads)
        bias = bias.permute(2, 0, 1).unsqueeze(0)   # (1, heads, n, n)
        attn = (q @ k.transpose(-2, -1) + bias).softmax(-1)
        y = self.proj((attn @ v).transpose(1, 2).reshape(B, L, C))
        return {"a": self.a(y), "b": self.b(y)}


def test_gather_maps_the_table_dim_and_slims_per_head_bias():
    gm = trace_model(RelPosBias())
    x = torch.randn(2, 4, 8)
    groups = find_channel_groups(gm, (x,), attention="heads")
    heads, table = group_of(groups, "table", 1)
    assert heads is group_of(groups, "qkv.weight", 0)[0] and heads.removable and heads.size == H
    assert table.index.tolist() == [0, 1]
    (gather,) = [n for n in gm.graph.nodes if n.target is operator.getitem and n.args[0].op == "get_attr"
                 and n.args[0].target == "table"]
    ch = groups.node_channels[gather.name]
    assert sorted(ch) == [2]  # (n, n, heads): the two gathered dims are new, heads moved to dim 2
    assert ch[2].tolist() == [groups.offsets[heads.id], groups.offsets[heads.id] + 1]
    for keep in ({heads.id: torch.tensor([False, True])}, {heads.id: torch.tensor([True, False])}):
        _, slim = masked_and_slim(gm, groups, keep, x)
        assert slim.table.shape == (7, 1)
        kept = int(keep[heads.id].nonzero())
        assert torch.equal(slim.table.detach(), gm.table.detach()[:, kept:kept + 1])
    for seed in range(2):
        masked_and_slim(gm, groups, random_keep(groups, seed=seed), x)
    # head dims: the heads stay, so does the table's head dim; the dims go
    groups = find_channel_groups(gm, (x,), attention="head_dims")
    assert [m.dim for _, m in groups.members_of("table")] == [0]
    assert group_of(groups, "qkv.weight", 0)[0].removable
    masked_and_slim(gm, groups, random_keep(groups, seed=0), x)


def test_gather_on_the_channel_dim_pins_it():
    class Gather(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.out = nn.Linear(4, 6), nn.Linear(3, 2)
            self.register_buffer("idx", torch.tensor([0, 2, 5]))

        def forward(self, x):
            return {"a": self.out(self.inp(x)[:, self.idx])}

    gm = trace_model(Gather())
    groups = find_channel_groups(gm, (torch.randn(2, 4),))
    g = group_of(groups, "inp.weight", 0)[0]
    assert not g.removable and "gathered by a tensor index" in g.reason


# ----------------------------------------------------------------------------- 5. nn.MultiheadAttention
class MHABlock(nn.Module):
    def __init__(self, batch_first=True, separate=False, add_bias_kv=False, weights=False, c=8, heads=2):
        super().__init__()
        self.batch_first, self.separate, self.weights = batch_first, separate, weights
        self.inp = nn.Linear(c, c)
        kdim, vdim = (6, 5) if separate else (None, None)
        if separate:
            self.kin, self.vin = nn.Linear(c, 6), nn.Linear(c, 5)
        self.attn = nn.MultiheadAttention(c, heads, batch_first=batch_first, kdim=kdim, vdim=vdim,
                                          add_bias_kv=add_bias_kv)
        with torch.no_grad():  # torch zeroes the biases; random ones test their routing
            for p in (self.attn.in_proj_bias, self.attn.out_proj.bias, self.attn.bias_k, self.attn.bias_v):
                if p is not None:
                    p.normal_()
        self.a, self.b = nn.Linear(c, 2), nn.Linear(c, 3)

    def forward(self, x):
        h = self.inp(x)
        k, v = (self.kin(x), self.vin(x)) if self.separate else (h, h)
        o, w = self.attn(h, k, v, need_weights=self.weights, average_attn_weights=False)
        y = h + o
        out = {"a": self.a(y), "b": self.b(y)}
        if self.weights:
            out["w"] = w.sum(1)  # per-head weights (N, H, L, S) summed over the kept heads
        return out


MHA_CASES = {
    "batch_first": dict(batch_first=True),
    "seq_first": dict(batch_first=False),
    "kdim_vdim": dict(separate=True),
    "bias_kv": dict(add_bias_kv=True, batch_first=False),
    "weights": dict(weights=True),
}


def module_types(gm):
    return {n: type(m) for n, m in gm.named_modules()}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("case", sorted(MHA_CASES))
def test_multihead_attention_module(case, policy):
    torch.manual_seed(0)
    gm = trace_model(MHABlock(**MHA_CASES[case]))
    before_types, before_params = module_types(gm), params_of(gm)
    before_state = {k: v.clone() for k, v in gm.state_dict().items()}
    groups = find_channel_groups(gm, (X_SEQ,), attention=policy)
    internal = groups.internal_channels["attn"]
    assert sorted(internal) == (["heads"] if policy == "heads" else ["qk_dims", "v_dims"])
    separate = MHA_CASES[case].get("separate")
    w_in = "attn.q_proj_weight" if separate else "attn.in_proj_weight"
    if policy == "heads":
        g, rows = group_of(groups, w_in, 0)
        assert g.size == H and g is group_of(groups, "attn.out_proj.weight", 1)[0]
        assert (internal["heads"] - groups.offsets[g.id]).tolist() == [0, 1]
        if not separate:
            assert rows.index.tolist() == torch.arange(H).repeat_interleave(D).repeat(3).tolist()
        qk = v = g
    else:  # q/k dims one group, v dims another (q, k, v have their own projections)
        qk, v = (group_at(groups, internal[name]) for name in ("qk_dims", "v_dims"))
        assert qk is not v and qk.size == v.size == D
        assert v is group_of(groups, "attn.out_proj.weight", 1)[0]
        if separate:
            assert qk is group_of(groups, "attn.k_proj_weight", 0)[0]
        else:
            qk_rows = [m for gr, m in groups.members_of(w_in) if gr is qk and m.dim == 0][0]
            assert qk_rows.index.tolist() == torch.arange(D).repeat(2 * H).tolist() + [-1] * (H * D)
    for grp in (qk, v):
        assert grp.removable, grp.reason
    # the residual stream feeds q (and k, v): its channels are in_proj's columns
    res = group_of(groups, "inp.weight", 0)[0]
    assert res.removable and res is group_of(groups, w_in, 1)[0]
    for seed in range(2):
        keep = random_keep(groups, seed=seed)
        for grp in (qk, v):
            keep[grp.id] = torch.arange(grp.size) % 2 == seed  # some of the attention's channels go
        masked, slim = masked_and_slim(gm, groups, keep, X_SEQ)
        m = masked.attn
        assert type(m) is SlimMHA
        if policy == "heads":
            assert m.head_keep.tolist() == keep[qk.id].float().tolist()
        else:
            assert m.qk_dim_keep.flatten().tolist() == keep[qk.id].float().tolist()
            assert m.v_dim_keep.flatten().tolist() == keep[v.id].float().tolist()
        s = slim.attn
        assert type(s) is SlimMHA
        assert all(getattr(s, b) is None for b in ("head_keep", "qk_dim_keep", "v_dim_keep"))
        assert s.batch_first == gm.attn.batch_first
        if policy == "heads":
            assert (s.num_heads, s.head_dim, s.v_head_dim) == (1, D, D)
        else:
            assert (s.num_heads, s.head_dim, s.v_head_dim) == (H, D // 2, D // 2)
        assert s.scale == pytest.approx(D ** -0.5)  # the original scale
        assert s.out_proj.weight.shape[1] == s.num_heads * s.v_head_dim
    # the user's model is untouched
    assert module_types(gm) == before_types and params_of(gm) == before_params
    assert type(gm.attn) is nn.MultiheadAttention
    assert all(torch.equal(v, before_state[k]) for k, v in gm.state_dict().items())


class MHAMask(MHABlock):
    def forward(self, x, attn_mask):
        h = self.inp(x)
        o, _ = self.attn(h, h, h, attn_mask=attn_mask, need_weights=False)
        return {"a": self.a(h + o), "b": self.b(o)}


def test_multihead_attention_masks():
    """A 2-D mask is shared by the heads; a 3-D one holds a slice per head (batch * heads)."""
    gm = trace_model(MHAMask())
    mask = torch.zeros(5, 5)
    mask[:, -1] = float("-inf")
    groups = find_channel_groups(gm, (X_SEQ, mask), attention="heads")
    g = group_of(groups, "attn.in_proj_weight", 0)[0]
    assert g.removable
    masked_and_slim(gm, groups, {g.id: torch.tensor([False, True])}, X_SEQ, mask)
    mask3 = mask.expand(2 * H, 5, 5).clone()
    groups = find_channel_groups(gm, (X_SEQ, mask3), attention="heads")
    g = group_of(groups, "attn.in_proj_weight", 0)[0]
    assert not g.removable and "3-D" in g.reason and "'attn'" in g.reason
    groups = find_channel_groups(gm, (X_SEQ, mask3), attention="head_dims")
    for seed in range(2):
        keep = random_keep(groups, seed=seed)
        assert len(keep) >= 3  # residual, q/k dims, v dims
        masked_and_slim(gm, groups, keep, X_SEQ, mask3)


def test_multihead_attention_weights_averaged_over_heads_pin_nothing():
    """average_attn_weights=True: the masked module averages over kept heads only."""
    class Avg(MHABlock):
        def forward(self, x):
            h = self.inp(x)
            o, w = self.attn(h, h, h)
            return {"a": self.a(h + o), "w": w}

    gm = trace_model(Avg())
    groups = find_channel_groups(gm, (X_SEQ,), attention="heads")
    g = group_of(groups, "attn.in_proj_weight", 0)[0]
    assert g.removable
    masked_and_slim(gm, groups, {g.id: torch.tensor([False, True])}, X_SEQ)


# ----------------------------------------------------------------------------- 6. LayerNorm
class NormBlock(nn.Module):
    """Pre-norm MLP block on a residual stream, with a final norm; ``kind`` picks the norm."""

    def __init__(self, kind="module", c=8):
        super().__init__()
        self.kind = kind
        self.stem = nn.Linear(6, c)
        if kind == "module":
            self.norm = nn.LayerNorm(c)
        elif kind == "rms":
            self.norm = nn.RMSNorm(c, eps=1e-6)
        else:
            self.w, self.b0 = nn.Parameter(torch.randn(c)), nn.Parameter(torch.randn(c))
        self.fc1, self.fc2 = nn.Linear(c, 12), nn.Linear(12, c)
        self.final = nn.LayerNorm(c, elementwise_affine=False)
        self.a, self.b = nn.Linear(c, 2), nn.Linear(c, 3)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and m.weight is not None:
                    m.weight.normal_()
                    if getattr(m, "bias", None) is not None:
                        m.bias.normal_()

    def forward(self, x):
        h = self.stem(x)
        if self.kind == "functional":
            n = F.layer_norm(h, (h.shape[-1],), self.w, self.b0, 1e-5)
        elif self.kind == "functional_rms":
            n = F.rms_norm(h, (8,), self.w)
        else:
            n = self.norm(h)
        h = h + self.fc2(F.gelu(self.fc1(n)))
        h = self.final(h)
        return {"a": self.a(h), "b": self.b(h)}


class ConvNeXtBlock(nn.Module):
    """Channels-last block: dwconv, permute to NHWC, LN, Linear, GELU, Linear, layer scale,
    permute back, residual."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.a, self.b = nn.Conv2d(c, 2, 1), nn.Linear(c, 3)

    def forward(self, x):
        h = self.stem(x)
        t = self.dw(h).permute(0, 2, 3, 1)
        t = self.pw2(F.gelu(self.pw1(self.norm(t))))
        t = (self.gamma * t).permute(0, 3, 1, 2)
        h = h + t
        return {"a": self.a(h), "b": self.b(h.mean((2, 3)))}


NORM_MODELS = {
    "module": (lambda: NormBlock("module"), lambda: torch.randn(2, 5, 6)),
    "functional": (lambda: NormBlock("functional"), lambda: torch.randn(2, 5, 6)),
    "rms": (lambda: NormBlock("rms"), lambda: torch.randn(2, 5, 6)),
    "functional_rms": (lambda: NormBlock("functional_rms"), lambda: torch.randn(2, 5, 6)),
    "convnext": (ConvNeXtBlock, lambda: torch.randn(2, 3, 4, 4)),
}


def _norm_nodes(gm):
    names = {"layer_norm", "rms_norm"}
    return {n.name: (n.op, n.target) for n in gm.graph.nodes
            if (n.op == "call_module" and isinstance(gm.get_submodule(n.target), (nn.LayerNorm, nn.RMSNorm)))
            or (n.op == "call_function" and getattr(n.target, "__name__", "") in names)}


@pytest.mark.parametrize("name", sorted(NORM_MODELS))
def test_layer_norm_over_the_last_dim_is_removable_with_masked_statistics(name):
    torch.manual_seed(0)
    build, make_x = NORM_MODELS[name]
    gm, x = trace_model(build()), make_x()
    groups = find_channel_groups(gm, (x,))
    res = group_of(groups, "stem.weight", 0)[0]
    assert res.removable, res.reason
    norms = _norm_nodes(gm)
    assert norms
    recorded = {c.consumer for c in groups.normalizations}
    assert recorded == set(norms)
    for seed in range(3):
        keep = random_keep(groups, seed=seed)
        keep[res.id] = torch.arange(res.size) % 3 != seed  # residual channels go for sure
        masked, slim = masked_and_slim(gm, groups, keep, x)
        rewritten = {n.name for n in masked.graph.nodes if is_masked_norm(n)}
        assert rewritten == set(norms)
        assert "masked_layer_norm" in masked.code or "masked_rms_norm" in masked.code
        folded = copy.deepcopy(masked)
        fold_channel_masks(folded)
        assert _norm_nodes(folded) == norms
        assert_outputs_close(outputs(folded, x), outputs(gm, x), tol=1e-6)
        kept = (int(keep[res.id].sum()),)
        for node in slim.graph.nodes:
            if node.op == "call_module" and isinstance(slim.get_submodule(node.target), (nn.LayerNorm, nn.RMSNorm)):
                assert slim.get_submodule(node.target).normalized_shape == kept
            elif node.name in norms:  # functional: the literal shape, also for (h.shape[-1],)
                assert node.args[1] == kept
    assert not any(is_masked_norm(n) for n in gm.graph.nodes)


def test_masked_model_code_shows_masked_layer_norm(capsys):
    gm = trace_model(NormBlock("module"))
    groups = find_channel_groups(gm, (torch.randn(2, 5, 6),))
    res = group_of(groups, "stem.weight", 0)[0]
    masked = insert_channel_masks(gm, groups, {res.id: torch.arange(8) != 3})
    print(masked.code)
    code = capsys.readouterr().out
    assert "masked_layer_norm(stem, " in code and ", 'norm')" in code  # the module it replaces
    assert "masked_layer_norm(add, " in code and ", 'final')" in code


def test_layer_norm_over_the_last_dim_of_a_head_split_is_per_head_dim():
    """A LayerNorm on q/k per head (qk-norm) normalises the head dims: head_dims stay
    removable (masked statistics), heads too (the norm runs per head)."""
    class QKNorm(PackedSDPA):
        def __init__(self):
            super().__init__()
            self.qn, self.kn = nn.LayerNorm(D), nn.LayerNorm(D)

        def forward(self, x, attn_mask=None):
            B, L, C = x.shape
            h = self.inp(x)
            q, k, v = self.qkv(h).reshape(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            o = F.scaled_dot_product_attention(self.qn(q), self.kn(k), v).transpose(1, 2).reshape(B, L, C)
            y = h + self.proj(o)
            return {"a": self.a(y), "b": self.b(y)}

    gm = trace_model(QKNorm())
    for policy in POLICIES:
        groups = find_channel_groups(gm, (X_SEQ,), attention=policy)
        g = group_of(groups, "qkv.weight", 0)[0]
        assert g.removable
        for seed in range(2):
            masked_and_slim(gm, groups, random_keep(groups, seed=seed), X_SEQ)


@given(n=st.integers(1, 4), c=st.integers(1, 9), data=st.data())
def test_masked_layer_norm_equals_layer_norm_on_kept_channels(n, c, data):
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=c, max_size=c).filter(any)))
    seed = data.draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, c, generator=g) * 3 + 1
    w, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
    k = int(keep.sum())
    got = masked_layer_norm(x, keep.float(), (c,), w, b, 1e-5)
    want = F.layer_norm(x[..., keep], (k,), w[keep], b[keep], 1e-5)
    torch.testing.assert_close(got[..., keep], want, atol=1e-5, rtol=1e-5)
    # removed channels read nothing: their output is their bias alone
    torch.testing.assert_close(got[..., ~keep], b[~keep].expand_as(got[..., ~keep]))
    got = masked_rms_norm(x, keep.float(), (c,), w, 1e-6)
    want = F.rms_norm(x[..., keep], (k,), w[keep], 1e-6)
    torch.testing.assert_close(got[..., keep], want, atol=1e-5, rtol=1e-5)
    got = masked_layer_norm(x, keep.float(), (c,))  # no affine parameters
    torch.testing.assert_close(got[..., keep], F.layer_norm(x[..., keep], (k,)), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- 7. embedding
class EmbeddingNet(nn.Module):
    def __init__(self, functional=False):
        super().__init__()
        self.functional = functional
        if functional:
            self.table = nn.Parameter(torch.randn(10, 6))
        else:
            self.emb = nn.Embedding(10, 6, padding_idx=0)
        self.fc = nn.Linear(6, 4)
        self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 3)

    def forward(self, ids):
        e = F.embedding(ids, self.table) if self.functional else self.emb(ids)
        h = self.fc(e).relu()
        return {"a": self.a(h), "b": self.b(h)}


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_embedding_dim_is_removable(functional):
    gm = trace_model(EmbeddingNet(functional))
    ids = torch.randint(0, 10, (2, 5))
    groups = find_channel_groups(gm, (ids,))
    table = "table" if functional else "emb.weight"
    g, m = group_of(groups, table, 1)
    assert g.removable and g.size == 6 and g is group_of(groups, "fc.weight", 1)[0]
    assert [mm.dim for _, mm in groups.members_of(table)] == [1]  # token rows never go
    keep = {g.id: torch.tensor([True, False, True, True, False, True])}
    masked, slim = masked_and_slim(gm, groups, keep, ids)
    assert_outputs_close(outputs(masked, ids), outputs(slim, ids))
    if functional:
        assert slim.table.shape == (10, 4)
    else:
        assert slim.emb.embedding_dim == 4 and slim.emb.weight.shape == (10, 4)
        assert slim.emb.padding_idx == 0 and slim.emb.num_embeddings == 10
    assert torch.equal(slim.get_parameter(table).detach(), gm.get_parameter(table).detach()[:, keep[g.id]])
    for seed in range(2):
        masked_and_slim(gm, groups, random_keep(groups, seed=seed), ids)


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_embedding_with_max_norm_pins_its_dim(functional):
    """max_norm renormalises each looked-up row over all its columns: they are mixed."""
    class MaxNorm(EmbeddingNet):
        def __init__(self):
            super().__init__(functional)
            if not functional:
                self.emb = nn.Embedding(10, 6, max_norm=1.0)

        def forward(self, ids):
            e = F.embedding(ids, self.table, max_norm=1.0) if functional else self.emb(ids)
            return {"a": self.a(self.fc(e))}

    gm = trace_model(MaxNorm())
    groups = find_channel_groups(gm, (torch.randint(0, 10, (2, 5)),))
    g = group_of(groups, "table" if functional else "emb.weight", 1)[0]
    assert not g.removable and "max_norm" in g.reason


# ----------------------------------------------------------------------------- 8. Swin
class SwinTwoTask(nn.Module):
    def __init__(self, v2=False, c=16):
        super().__init__()
        from torchvision.models.swin_transformer import SwinTransformerBlock, SwinTransformerBlockV2

        block = SwinTransformerBlockV2 if v2 else SwinTransformerBlock
        self.stem = nn.Linear(c, c)
        self.block = block(c, 2, [4, 4], [2, 2], stochastic_depth_prob=0.0)
        self.a, self.b = nn.Linear(c, 2), nn.Linear(c, 3)
        with torch.no_grad():
            for m in self.block.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.normal_()
                    m.bias.normal_()
            if v2:
                self.block.attn.logit_scale.uniform_(0.5, 2.5)

    def forward(self, x):
        h = self.block(self.stem(x))
        return {"a": self.a(h.mean((1, 2))), "b": self.b(h)}


X_SWIN = torch.randn(1, 8, 8, 16)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_block_two_tasks(v2, policy):
    torch.manual_seed(0)
    gm = trace_model(SwinTwoTask(v2))
    groups = find_channel_groups(gm, (X_SWIN,), attention=policy)
    g, rows = group_of(groups, "block.attn.qkv.weight", 0)
    assert g.removable, g.reason
    assert g.size == (2 if policy == "heads" else 8)
    if policy == "heads":
        assert rows.index.tolist() == torch.arange(2).repeat_interleave(8).repeat(3).tolist()
        if v2:
            assert g is group_of(groups, "block.attn.logit_scale", 0)[0]
    else:
        assert rows.index.tolist() == torch.arange(8).repeat(6).tolist()
    res = group_of(groups, "stem.weight", 0)[0]
    assert res.removable and res is group_of(groups, "block.attn.qkv.weight", 1)[0]
    hidden = group_of(groups, "block.mlp.0.weight", 0)[0]
    assert hidden.removable
    for seed in range(2):
        keep = random_keep(groups, seed=seed)
        keep[g.id] = torch.arange(g.size) % 2 == seed % 2
        _, slim = masked_and_slim(gm, groups, keep, X_SWIN)
        (node,) = calls(slim, slim_swa)
        heads, hd = (1, 8) if policy == "heads" else (2, 4)
        assert node.kwargs["head_dim"] == hd and node.args[5] == heads
        assert node.kwargs["scale"] == pytest.approx(8 ** -0.5)
        assert slim.block.attn.qkv.weight.shape[0] == 3 * heads * hd
        assert slim.block.attn.proj.weight.shape[1] == heads * hd
    assert not calls(gm, slim_swa)  # the user's graph still calls torchvision's function


class TinySwin(nn.Module):
    """torchvision's SwinTransformer (two stages: patch merging between them), two tasks."""

    def __init__(self, v2=False):
        super().__init__()
        from torchvision.models.swin_transformer import (PatchMergingV2, SwinTransformer,
                                                         SwinTransformerBlockV2)

        kw = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
        # stochastic depth is traced with training=True (a constant): keep it off
        self.m = SwinTransformer([4, 4], 16, [1, 1], [2, 4], [4, 4], stochastic_depth_prob=0.0,
                                 num_classes=5, **kw)
        self.b = nn.Linear(32, 3)

    def forward(self, x):
        f = self.m.features(x)
        return {"a": self.m.head(self.m.flatten(self.m.avgpool(self.m.permute(self.m.norm(f))))), "b": self.b(f)}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_torchvision_swin_two_stages(v2, policy):
    torch.manual_seed(0)
    gm = trace_model(TinySwin(v2))
    x = torch.randn(1, 3, 32, 32)
    groups = find_channel_groups(gm, (x,), attention=policy)
    for stage, heads in ((1, 2), (3, 4)):
        g = group_of(groups, f"m.features.{stage}.0.attn.qkv.weight", 0)[0]
        assert g.removable and g.size == (heads if policy == "heads" else 8)
    # the patch merging's 4C input features follow the stage-1 channels
    merge = group_of(groups, "m.features.2.reduction.weight", 1)
    assert merge[0] is group_of(groups, "m.features.0.0.weight", 0)[0]
    assert merge[1].index.tolist() == torch.arange(16).repeat(4).tolist()
    masked_and_slim(gm, groups, random_keep(groups, seed=0), x)


# ----------------------------------------------------------------------------- 9. element masks
class TinyTransformer(nn.Module):
    def __init__(self, c=8, heads=2):
        super().__init__()
        self.inp = nn.Linear(6, c)
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.attn = nn.MultiheadAttention(c, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(c, 12), nn.Linear(12, c)
        self.a, self.b = nn.Linear(c, 2), nn.Linear(c, 3)

    def forward(self, x):
        h = self.inp(x)
        n = self.norm1(h)
        h = h + self.attn(n, n, n, need_weights=False)[0]
        h = h + self.fc2(F.gelu(self.fc1(self.norm2(h))))
        return {"a": self.a(h), "b": self.b(h)}


def test_element_masks_never_empty_internal_or_normalised_channels():
    torch.manual_seed(0)
    gm = trace_model(TinyTransformer())
    x = torch.randn(2, 5, 6)
    groups = find_channel_groups(gm, (x,))
    heads = group_of(groups, "attn.in_proj_weight", 0)[0]
    res = group_of(groups, "inp.weight", 0)[0]
    hidden = group_of(groups, "fc1.weight", 0)[0]
    assert heads.removable and res.removable and hidden.removable
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in gm.named_parameters() if p.dim() == 2}
    masks["attn.out_proj.weight"][:, D:] = False  # head 1 reaches nothing through out_proj
    for name in ("attn.in_proj_weight", "fc1.weight", "a.weight", "b.weight"):
        masks[name][:, 3] = False  # residual channel 3 is read by no weight, only by the norms
    masks["fc2.weight"][:, 5] = False  # hidden channel 5: truly dead
    pruned = copy.deepcopy(gm)
    with torch.no_grad():
        for n, m in masks.items():
            pruned.get_parameter(n).mul_(m)
    keep = channels_emptied_by(groups, masks)
    assert heads.id not in keep  # heads are read inside the attention
    assert res.id not in keep  # channel 3 feeds the LayerNorm statistics
    assert keep[hidden.id].tolist() == [i != 5 for i in range(12)]
    slim = slim_channels(pruned, groups, keep)
    assert slim.fc1.weight.shape == (11, 8)
    assert_outputs_close(outputs(pruned, x), outputs(slim, x))


# ----------------------------------------------------------------------------- 10. serialize
def _bitwise(a, b, *xs):
    oa, ob = outputs(a, *xs), outputs(b, *xs)
    assert oa.keys() == ob.keys()
    for k in oa:
        assert torch.equal(oa[k], ob[k]), k


@pytest.mark.parametrize("policy", POLICIES)
def test_serialize_slim_attention_models(policy, tmp_path):
    torch.manual_seed(0)
    for i, (model, x) in enumerate(((MHABlock(), X_SEQ), (SwinTwoTask(), X_SWIN))):
        gm = trace_model(model)
        groups = find_channel_groups(gm, (x,), attention=policy)
        slim = slim_channels(gm, groups, random_keep(groups, seed=i))
        save(slim, tmp_path / f"slim{i}.dfx")
        back = load(tmp_path / f"slim{i}.dfx")
        assert back.code == slim.code
        if i == 0:
            assert type(back.attn) is SlimMHA
            assert (back.attn.num_heads, back.attn.head_dim, back.attn.v_head_dim, back.attn.scale) == \
                (slim.attn.num_heads, slim.attn.head_dim, slim.attn.v_head_dim, slim.attn.scale)
        else:
            assert calls(back, slim_swa)
        _bitwise(slim, back, x)


def test_serialize_masked_model_with_masked_norms_and_attention(tmp_path):
    torch.manual_seed(0)
    gm, x = trace_model(TinyTransformer()), torch.randn(2, 5, 6)
    groups = find_channel_groups(gm, (x,))
    keep = random_keep(groups, seed=1)
    masked = insert_channel_masks(gm, groups, keep)
    assert any(is_masked_norm(n) for n in masked.graph.nodes) and type(masked.attn) is SlimMHA
    save(masked, tmp_path / "masked.dfx")
    back = load(tmp_path / "masked.dfx")
    assert back.code == masked.code
    assert sum(is_masked_norm(n) for n in back.graph.nodes) == sum(is_masked_norm(n) for n in masked.graph.nodes)
    assert torch.equal(back.attn.head_keep, masked.attn.head_keep)
    _bitwise(masked, back, x)
    # the loaded masked model still slims to the same model
    _bitwise(slim_channels(masked, groups, keep), slim_channels(back, groups, keep), x)


# ----------------------------------------------------------------------------- 11. bad input
def test_bad_attention_policy():
    gm = trace_model(PackedSDPA())
    with pytest.raises(DisparseValueError, match=r"attention.*'heads'.*'head_dims'.*'bogus'"):
        find_channel_groups(gm, (X_SEQ,), attention="bogus")
    with pytest.raises(DisparseValueError, match=r"attention.*heads.*head_dims"):
        dfx.CompressConfig(attention="x")
    with pytest.raises(DisparseValueError, match="attention"):
        dfx.CompressConfig(attention=None)
    assert dfx.CompressConfig(attention="head_dims").attention == "head_dims"


# ----------------------------------------------------------------------------- per-head ops on q and k
class RotaryQKNorm(PackedSDPA):
    """Modern attention: per-head LayerNorm on q and k (qk-norm), then rotary position
    embeddings (``x * cos + rotate_half(x) * sin`` with cos/sin buffers, ``rotate_half``
    = ``cat(-x2, x1)`` of the two halves of the head dim)."""

    def __init__(self):
        super().__init__()
        self.qn, self.kn = nn.LayerNorm(D), nn.LayerNorm(D)
        angles = torch.arange(5.0)[:, None] * torch.tensor([1.0, 0.5] * 2)[None]  # (L, D)
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())

    @staticmethod
    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    def forward(self, x, attn_mask=None):
        B, L, C = x.shape
        h = self.inp(x)
        q, k, v = self.qkv(h).reshape(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.qn(q), self.kn(k)
        q = q * self.cos + self.rotate_half(q) * self.sin
        k = k * self.cos + self.rotate_half(k) * self.sin
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, C)
        y = h + self.proj(o)
        return {"a": self.a(y), "b": self.b(y)}


@pytest.mark.parametrize("policy", POLICIES)
def test_qk_norm_and_rotary_embeddings_keep_the_head_policy(policy):
    """The walk from the attention product back to the head split goes through per-head
    norms and rotary embeddings, so "heads" really prunes heads (H=2 < D=4: the fallback
    coupling would have taken head dims) and "head_dims" pairs the rotated halves."""
    torch.manual_seed(0)
    gm = trace_model(RotaryQKNorm())
    reshape = next(n.name for n in gm.graph.nodes if n.op == "call_method" and n.target == "reshape")
    assert reshape in find_head_splits(gm)
    groups = find_channel_groups(gm, (X_SEQ,), attention=policy)
    g, rows = group_of(groups, "qkv.weight", 0)
    assert g.removable, g.reason
    if policy == "heads":
        assert g.size == H
        assert rows.index.tolist() == torch.arange(H).repeat_interleave(D).repeat(3).tolist()
    else:  # dim d and d + D/2 are rotated into each other: one channel
        assert g.size == D // 2
        assert group_of(groups, "qn.weight", 0)[0] is g
    for seed in range(3):
        masked_and_slim(gm, groups, random_keep(groups, seed=seed), X_SEQ)


class GroupedQuery(nn.Module):
    """Grouped-query attention: 4 query heads share 2 key/value heads (sdpa enable_gqa)."""

    def __init__(self, c=8, q_heads=4, kv_heads=2, d=2):
        super().__init__()
        self.hq, self.hkv, self.d = q_heads, kv_heads, d
        self.inp = nn.Linear(c, c)
        self.q = nn.Linear(c, q_heads * d)
        self.kv = nn.Linear(c, 2 * kv_heads * d)
        self.proj = nn.Linear(q_heads * d, c)
        self.a, self.b = nn.Linear(c, 2), nn.Linear(c, 3)

    def forward(self, x):
        B, L, C = x.shape
        h = self.inp(x)
        q = self.q(h).reshape(B, L, self.hq, self.d).transpose(1, 2)
        k, v = self.kv(h).reshape(B, L, 2, self.hkv, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2).reshape(B, L, -1)
        y = h + self.proj(o)
        return {"a": self.a(y), "b": self.b(y)}


@pytest.mark.parametrize("policy", POLICIES)
def test_grouped_query_attention_removes_a_kv_head_with_its_query_heads(policy):
    gm, groups = traced_groups(GroupedQuery(), policy)
    g, rows = group_of(groups, "kv.weight", 0)
    assert g.removable, g.reason
    q_rows = group_of(groups, "q.weight", 0)[1]
    if policy == "heads":  # channel j = kv head j and query heads 2j, 2j+1
        assert g.size == 2 and group_of(groups, "q.weight", 0)[0] is g
        assert q_rows.index.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
        assert rows.index.tolist() == [0, 0, 1, 1] * 2
    else:
        assert g.size == 2 and rows.index.tolist() == [0, 1] * 4
    for seed in range(3):
        _, slim = masked_and_slim(gm, groups, random_keep(groups, seed=seed), X_SEQ)
    keep = {g.id: torch.tensor([False, True])}
    _, slim = masked_and_slim(gm, groups, keep, X_SEQ)
    if policy == "heads":
        assert slim.q.weight.shape[0] == 2 * 2 and slim.kv.weight.shape[0] == 2 * 1 * 2
