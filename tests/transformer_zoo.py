"""Small multitask transformers for the attention-head tests.

Each model has a shared embedding and two or three task heads, and exercises one way of
writing attention, so the channel rules of :mod:`passes.rules.attention` see every form:

- ``sdpa``: ViT-like; hand-written attention (packed qkv Linear, one reshape to
  ``(B, L, 3, H, D)``, ``unbind``, ``F.scaled_dot_product_attention``), class token and
  positional embedding as parameters, pre-LayerNorm blocks, MLP with layer scale; a task
  (``mid``) branches off the first block, so it reaches block 0 only.
- ``mha``: the same structure with ``nn.MultiheadAttention`` (a leaf module whose heads
  are internal channels).
- ``einsum``: MaxViT-like attention: separate q, k, v from ``torch.chunk``, logits by
  ``einsum("bhid,bhjd->bhij")`` plus a learned per-head relative-position bias gathered
  with an index buffer, softmax, ``einsum("bhij,bhjd->bhid")``.
- ``tokens``: text-like; ``nn.Embedding`` on integer ids plus a positional embedding,
  two sdpa blocks, a per-token task and a mean-pooled task.

Two single-layer models (``HeadSplitNet``, ``HeadRoutedNet``) give each of two tasks
its own heads of one attention layer, for exact per-task head decisions.

``TRANSFORMER_ZOO`` maps a name to a :class:`TransformerEntry` with the hand-written
facts the tests check: every attention layer (by the name of its qkv / in_proj weight)
with its out projection, head count and head dim, and which layers each task reaches.

>>> model, x = build("sdpa")
>>> {t: tuple(y.shape) for t, y in model(x).items()}
{'tokens': (2, 17, 3), 'pooled': (2, 5), 'mid': (2, 2)}
>>> sorted(TRANSFORMER_ZOO["sdpa"].reach["mid"])
['blocks.0.attn.qkv.weight']
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Mapping, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

EMBED, HEADS, PATCH, IMAGE = 16, 4, 4, 16  # 16x16 images -> 4x4 patches; 4 heads of width 4
VOCAB, SEQ = 11, 8


# ----------------------------------------------------------------------------- attention forms
class SdpaAttention(nn.Module):
    """Hand-written attention over a packed qkv projection and scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, C = x.shape
        H = self.heads
        D = C // H
        qkv = self.qkv(x).reshape(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, L, H * D))


class MhaAttention(nn.Module):
    """``nn.MultiheadAttention`` self-attention (need_weights=False)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def relative_index(side: int) -> torch.Tensor:
    """Index into a ``((2 side - 1)^2, H)`` table for every (query, key) pair of a side x side grid."""
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, L)
    rel = coords[:, :, None] - coords[:, None, :] + side - 1  # (2, L, L), each in [0, 2 side - 2]
    return (rel[0] * (2 * side - 1) + rel[1]).flatten()


class EinsumAttention(nn.Module):
    """MaxViT-like: chunked q/k/v, einsum logits + gathered relative bias, einsum output."""

    def __init__(self, dim: int, heads: int, side: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.rel_bias = nn.Parameter(torch.randn((2 * side - 1) ** 2, heads) * 0.1)
        self.register_buffer("rel_index", relative_index(side), persistent=False)

    def forward(self, x):
        B, L, C = x.shape
        H = self.heads
        q, k, v = torch.chunk(self.to_qkv(x), 3, dim=-1)
        q = q.reshape(B, L, H, C // H).permute(0, 2, 1, 3)
        k = k.reshape(B, L, H, C // H).permute(0, 2, 1, 3)
        v = v.reshape(B, L, H, C // H).permute(0, 2, 1, 3)
        sim = torch.einsum("bhid,bhjd->bhij", q, k) * self.scale
        bias = self.rel_bias[self.rel_index].view(L, L, -1).permute(2, 0, 1)
        attn = (sim + bias).softmax(dim=-1)
        out = torch.einsum("bhij,bhjd->bhid", attn, v)
        return self.to_out(out.permute(0, 2, 1, 3).reshape(B, L, C))


class Block(nn.Module):
    """Pre-LayerNorm transformer block; the MLP branch is scaled per channel (layer scale)."""

    def __init__(self, dim: int, attn: nn.Module, hidden: int = 32):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ls = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ls * self.fc2(F.gelu(self.fc1(self.norm2(x))))


# ----------------------------------------------------------------------------- models
class ViTNet(nn.Module):
    """Patch embedding (strided conv) -> class token + positional embedding -> 3 blocks.

    Tasks: ``tokens`` (per-token Linear on the final tokens, (N, L, 3)), ``pooled`` (mean
    over tokens -> Linear), ``mid`` (block 0's class token -> Linear: reaches block 0 and
    the embedding only). ``kind`` picks the attention form ("sdpa" or "mha").
    """

    def __init__(self, kind: str = "sdpa", dim: int = EMBED, heads: int = HEADS, depth: int = 3):
        super().__init__()
        make = {"sdpa": SdpaAttention, "mha": MhaAttention}[kind]
        self.patch = nn.Conv2d(3, dim, PATCH, stride=PATCH)
        n = (IMAGE // PATCH) ** 2 + 1
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos_embed = nn.Parameter(torch.randn(1, n, dim) * 0.1)
        self.blocks = nn.ModuleList([Block(dim, make(dim, heads)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.tokens_head = nn.Linear(dim, 3)
        self.pooled_head = nn.Linear(dim, 5)
        self.mid_head = nn.Linear(dim, 2)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.blocks[0](x)
        mid = self.mid_head(x[:, 0])
        for blk in self.blocks[1:]:
            x = blk(x)
        x = self.norm(x)
        return {"tokens": self.tokens_head(x), "pooled": self.pooled_head(x.mean(1)), "mid": mid}


class EinsumNet(nn.Module):
    """Patch tokens (no class token) on a 4x4 grid -> 2 MaxViT-like blocks with relative
    bias; tasks ``seg`` (per-token) and ``cls`` (mean-pooled)."""

    def __init__(self, dim: int = EMBED, heads: int = HEADS, depth: int = 2):
        super().__init__()
        side = IMAGE // PATCH
        self.patch = nn.Conv2d(3, dim, PATCH, stride=PATCH)
        self.blocks = nn.ModuleList([Block(dim, EinsumAttention(dim, heads, side)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.seg_head = nn.Linear(dim, 3)
        self.cls_head = nn.Linear(dim, 4)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return {"seg": self.seg_head(x), "cls": self.cls_head(x.mean(1))}


class TextNet(nn.Module):
    """Token embedding + positional embedding -> 2 sdpa blocks; tasks ``tag`` (per token)
    and ``cls`` (mean-pooled)."""

    def __init__(self, dim: int = EMBED, heads: int = 2, depth: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, SEQ, dim) * 0.1)
        self.blocks = nn.ModuleList([Block(dim, SdpaAttention(dim, heads)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.tag_head = nn.Linear(dim, 5)
        self.cls_head = nn.Linear(dim, 3)

    def forward(self, ids):
        x = self.embed(ids) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return {"tag": self.tag_head(x), "cls": self.cls_head(x.mean(1))}


# ----------------------------------------------------------------------------- exact cases
def per_head_attention(qkv: nn.Linear, x: torch.Tensor, heads: int) -> torch.Tensor:
    """sdpa of the packed projection ``qkv(x)`` split into ``heads``: (B, H, L, D), heads not merged."""
    B, L, C = x.shape
    q, k, v = qkv(x).reshape(B, L, 3, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v)


class HeadSplitNet(nn.Module):
    """One sdpa attention layer whose output is split BY HEADS between two tasks: task ``a``
    reads heads 0..H/2-1 (``o[:, :H/2]``), task ``b`` the rest, each through its own
    projection. Each task's gradient is exactly zero on the other task's heads. The input
    is a float tensor (N, L, C) (a graph input: its channels are fixed), so the head group
    is the only removable group; the two slices make it two split pieces, each of which
    must keep a head."""

    def __init__(self, dim: int = EMBED, heads: int = HEADS, out: int = 3):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        half = heads // 2 * (dim // heads)
        self.proj_a = nn.Linear(half, out)
        self.proj_b = nn.Linear(dim - half, out)

    def forward(self, x):
        B, L, C = x.shape
        H, D = self.heads, C // self.heads
        o = per_head_attention(self.qkv, x, H)
        a = o[:, : H // 2].transpose(1, 2).reshape(B, L, H // 2 * D)
        b = o[:, H // 2:].transpose(1, 2).reshape(B, L, (H - H // 2) * D)
        return {"a": self.proj_a(a), "b": self.proj_b(b)}


class HeadRoutedNet(nn.Module):
    """Like :class:`HeadSplitNet`, but each task reads every head through a fixed 0/1 route
    (a buffer over heads): task ``a`` sees heads 0..H/2-1, task ``b`` the rest, the other
    heads multiplied by exactly zero. Nothing structural protects a task's heads here
    (no split piece), so only the decision rule can."""

    def __init__(self, dim: int = EMBED, heads: int = HEADS, out: int = 3):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj_a = nn.Linear(dim, out)
        self.proj_b = nn.Linear(dim, out)
        first = (torch.arange(heads) < heads // 2).float().view(1, heads, 1, 1)
        self.register_buffer("route_a", first)
        self.register_buffer("route_b", 1.0 - first)

    def forward(self, x):
        B, L, C = x.shape
        o = per_head_attention(self.qkv, x, self.heads)
        a = (o * self.route_a).transpose(1, 2).reshape(B, L, C)
        b = (o * self.route_b).transpose(1, 2).reshape(B, L, C)
        return {"a": self.proj_a(a), "b": self.proj_b(b)}


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class AttentionLayer:
    """One attention layer: ``qkv`` is the packed projection weight (rows q, k, v; head-major
    in each block), ``out`` the out projection weight (columns head-major); ``bias`` a
    per-head parameter sliced along ``bias[1]`` by the heads, if any."""

    qkv: str
    out: str
    heads: int
    head_dim: int
    qkv_bias: str = ""
    bias: Tuple[str, int] = ()


@dataclass(frozen=True)
class TransformerEntry:
    name: str
    factory: Callable[[], nn.Module]
    make_input: Callable[[torch.Generator, int], torch.Tensor]
    layers: Tuple[AttentionLayer, ...]
    reach: Mapping[str, FrozenSet[str]]  # task -> the qkv weight names of the layers it reaches
    output_shapes: Mapping[str, Tuple[int, ...]]  # per-sample output shapes (batch dim left out)


def _images(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE, IMAGE, generator=gen)


def _ids(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=gen)


def _sdpa_layers(depth: int, heads: int, dim: int = EMBED):
    return tuple(AttentionLayer(f"blocks.{i}.attn.qkv.weight", f"blocks.{i}.attn.proj.weight", heads, dim // heads,
                                qkv_bias=f"blocks.{i}.attn.qkv.bias") for i in range(depth))


_VIT_TOKENS = (IMAGE // PATCH) ** 2 + 1
_SDPA_LAYERS = _sdpa_layers(3, HEADS)
_MHA_LAYERS = tuple(AttentionLayer(f"blocks.{i}.attn.attn.in_proj_weight", f"blocks.{i}.attn.attn.out_proj.weight",
                                   HEADS, EMBED // HEADS, qkv_bias=f"blocks.{i}.attn.attn.in_proj_bias")
                    for i in range(3))
_EINSUM_LAYERS = tuple(AttentionLayer(f"blocks.{i}.attn.to_qkv.weight", f"blocks.{i}.attn.to_out.weight",
                                      HEADS, EMBED // HEADS, bias=(f"blocks.{i}.attn.rel_bias", 1))
                       for i in range(2))
_TEXT_LAYERS = _sdpa_layers(2, 2)


def _vit_reach(layers):
    every = frozenset(lay.qkv for lay in layers)
    return {"tokens": every, "pooled": every, "mid": frozenset({layers[0].qkv})}


_VIT_SHAPES = {"tokens": (_VIT_TOKENS, 3), "pooled": (5,), "mid": (2,)}

TRANSFORMER_ZOO: Dict[str, TransformerEntry] = {
    "sdpa": TransformerEntry("sdpa", lambda: ViTNet("sdpa"), _images, _SDPA_LAYERS, _vit_reach(_SDPA_LAYERS),
                             _VIT_SHAPES),
    "mha": TransformerEntry("mha", lambda: ViTNet("mha"), _images, _MHA_LAYERS, _vit_reach(_MHA_LAYERS),
                            _VIT_SHAPES),
    "einsum": TransformerEntry("einsum", EinsumNet, _images, _EINSUM_LAYERS,
                               {t: frozenset(lay.qkv for lay in _EINSUM_LAYERS) for t in ("seg", "cls")},
                               {"seg": ((IMAGE // PATCH) ** 2, 3), "cls": (4,)}),
    "tokens": TransformerEntry("tokens", TextNet, _ids, _TEXT_LAYERS,
                               {t: frozenset(lay.qkv for lay in _TEXT_LAYERS) for t in ("tag", "cls")},
                               {"tag": (SEQ, 5), "cls": (3,)}),
}


def build(name: str, seed: int = 0, batch: int = 2) -> Tuple[nn.Module, torch.Tensor]:
    """The zoo model ``name`` in eval mode (weights from ``seed``, global RNG untouched)
    and an example input of ``batch`` samples."""
    entry = TRANSFORMER_ZOO[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.factory()
        for m in model.modules():  # non-trivial LayerNorm affines and attention biases
            if isinstance(m, nn.LayerNorm):
                with torch.no_grad():
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
            if isinstance(m, nn.MultiheadAttention):
                with torch.no_grad():
                    m.in_proj_bias.uniform_(-0.2, 0.2)
                    m.out_proj.bias.uniform_(-0.2, 0.2)
    model.eval()
    return model, entry.make_input(torch.Generator().manual_seed(seed + 1), batch)
