"""Attention blocks whose internal sizes can shrink when pruning removes heads or head dims.

``torch.nn.MultiheadAttention`` ties every internal size to ``embed_dim``: the q/k/v
projections and the out-projection input are all ``embed_dim`` wide and
``head_dim = embed_dim // num_heads``. Once a pruning pass removes whole heads, or some
dimensions inside every head, the result cannot be written as a torch module any more.
torchvision's ``shifted_window_attention`` (Swin) has the same problem: it derives the
head width from the input width and reshapes its output to the input width.

This module holds the replacements, which take the sizes explicitly:

- :class:`MultiheadAttention`: a drop-in for ``torch.nn.MultiheadAttention`` (same
  parameter names, same ``forward``) whose number of heads, q/k head width, v head width,
  output width and logit scale are free. :meth:`MultiheadAttention.from_torch` wraps a
  torch module; :meth:`MultiheadAttention.rebuild` wraps parameters a pass has already
  sliced; :meth:`MultiheadAttention.set_masks` gives the *masked model* (keep masks on
  heads and head dims) that computes exactly what the sliced module computes.
- :func:`shifted_window_attention`: torchvision's Swin window attention with an explicit
  ``head_dim`` and ``scale``, and an output as wide as the projection's output.

The module is a plain ``nn.Module`` with int/float/bool attributes only; mark it a leaf
when tracing with torch.fx (``is_leaf_module``), so it stays one ``call_module`` node.

>>> import torch
>>> torch_mha = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
>>> mha = MultiheadAttention.from_torch(torch_mha)
>>> x = torch.randn(3, 5, 8)
>>> torch.allclose(mha(x, x, x)[0], torch_mha(x, x, x)[0], atol=1e-6)
True
>>> mha.set_masks(head_keep=torch.tensor([1.0, 0.0]))  # the masked model: head 1 removed
>>> masked_out, masked_weights = mha(x, x, x)
>>> with torch.no_grad():  # the pruned model: head 1's q/k/v rows and out_proj columns sliced away
...     rows = torch.cat([torch.arange(0, 4), torch.arange(8, 12), torch.arange(16, 20)])
...     torch_mha.in_proj_weight = torch.nn.Parameter(torch_mha.in_proj_weight[rows])
...     torch_mha.in_proj_bias = torch.nn.Parameter(torch_mha.in_proj_bias[rows])
...     torch_mha.out_proj.weight = torch.nn.Parameter(torch_mha.out_proj.weight[:, :4])
>>> small = MultiheadAttention.rebuild(torch_mha, num_heads=1, head_dim=4, v_head_dim=4, scale=mha.scale)
>>> small.in_proj_weight.shape, small.out_proj.weight.shape
(torch.Size([12, 8]), torch.Size([8, 4]))
>>> sliced_out, sliced_weights = small(x, x, x)
>>> torch.allclose(masked_out, sliced_out, atol=1e-6), torch.allclose(masked_weights, sliced_weights, atol=1e-6)
(True, True)
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .errors import DisparseValueError, warn

__all__ = ["MultiheadAttention", "shifted_window_attention", "mha_sizes"]


MaskLike = Union[Tensor, Sequence[float], None]

# Names of the keep-mask buffers, in set_masks' argument order.
_MASK_NAMES = ("head_keep", "qk_dim_keep", "v_dim_keep")


def _canonical_mask(mask: Optional[Tensor], mask_name: str, target_dtype: torch.dtype) -> Optional[Tensor]:
    """A bool mask as an additive float mask (True -> -inf); a float mask as it is (torch's rule)."""
    if mask is None:
        return None
    if mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise DisparseValueError(f"{mask_name} must be a bool or floating tensor, got dtype {mask.dtype}")
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=target_dtype).masked_fill_(mask, float("-inf"))
    return mask


def _check_input_ranks(query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                       attn_mask: Optional[Tensor], num_heads: int) -> bool:
    """Whether the inputs are batched (3-D) or unbatched (2-D); torch's rank rules, as ValueErrors."""
    if query.dim() not in (2, 3):
        raise DisparseValueError(f"query must be unbatched 2-D or batched 3-D; got a {query.dim()}-D tensor")
    batched = query.dim() == 3
    rank, kind = (3, "a batched (3-D)") if batched else (2, "an unbatched (2-D)")
    if key.dim() != rank or value.dim() != rank:
        raise DisparseValueError(f"for {kind} query, key and value must be {rank}-D; got {key.dim()}-D "
                                 f"and {value.dim()}-D")
    if key_padding_mask is not None and key_padding_mask.dim() != rank - 1:
        raise DisparseValueError(f"for {kind} query, key_padding_mask must be None or {rank - 1}-D; got "
                                 f"{key_padding_mask.dim()}-D")
    if attn_mask is not None and attn_mask.dim() not in (2, 3):
        raise DisparseValueError(f"attn_mask must be None, 2-D or 3-D; got {attn_mask.dim()}-D")
    if not batched and attn_mask is not None and attn_mask.dim() == 3:
        expected = (num_heads, query.shape[0], key.shape[0])
        if tuple(attn_mask.shape) != expected:
            raise DisparseValueError(f"for an unbatched query, a 3-D attn_mask must have shape {expected}; "
                                     f"got {tuple(attn_mask.shape)}")
    return batched


def mha_sizes(m: nn.Module) -> Tuple[int, int, int, float]:
    """(heads, q/k head dim, v head dim, logit scale) of torch's ``nn.MultiheadAttention``
    or of :class:`MultiheadAttention`."""
    h = m.num_heads
    dqk = getattr(m, "head_dim", m.embed_dim // h)
    dv = getattr(m, "v_head_dim", dqk)
    scale = getattr(m, "scale", None)
    return h, dqk, dv, float(scale) if scale is not None else float(dqk) ** -0.5


class MultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` with free internal sizes (for pruned heads and head dims).

    Args:
        embed_dim: width of the query input.
        num_heads: number of heads ``H``.
        head_dim: q and k width per head ``Dqk`` (default ``embed_dim // num_heads``).
        v_head_dim: v width per head ``Dv`` (default ``head_dim``).
        out_dim: output width of the out projection (default ``embed_dim``).
        kdim, vdim: widths of the key and value inputs (default ``embed_dim``).
        bias, add_bias_kv, add_zero_attn, dropout, batch_first, device, dtype: as in torch.
        scale: attention logit scale (default ``head_dim ** -0.5``); kept as a float
            attribute so a module whose head dims were pruned can keep the original scale.

    Parameters carry torch's names and layout: ``in_proj_weight``
    ``(2*H*Dqk + H*Dv, embed_dim)`` (rows q, then k, then v; head-major inside each block)
    when ``kdim == vdim == embed_dim``, else ``q_proj_weight (H*Dqk, embed_dim)``,
    ``k_proj_weight (H*Dqk, kdim)``, ``v_proj_weight (H*Dv, vdim)``; ``in_proj_bias``
    ``(2*H*Dqk + H*Dv,)``; ``out_proj = nn.Linear(H*Dv, out_dim)``; ``bias_k (1, 1, H*Dqk)``,
    ``bias_v (1, 1, H*Dv)``.

    Keep masks (:meth:`set_masks`) turn the module into the *masked model* of a pruning
    decision; see :meth:`set_masks` for their exact semantics.
    """

    in_proj_weight: Optional[nn.Parameter]
    q_proj_weight: Optional[nn.Parameter]
    k_proj_weight: Optional[nn.Parameter]
    v_proj_weight: Optional[nn.Parameter]
    in_proj_bias: Optional[nn.Parameter]
    bias_k: Optional[nn.Parameter]
    bias_v: Optional[nn.Parameter]
    head_keep: Optional[Tensor]
    qk_dim_keep: Optional[Tensor]
    v_dim_keep: Optional[Tensor]

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        head_dim: Optional[int] = None,
        v_head_dim: Optional[int] = None,
        out_dim: Optional[int] = None,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        dropout: float = 0.0,
        batch_first: bool = False,
        scale: Optional[float] = None,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise DisparseValueError(f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} "
                                     f"and num_heads={num_heads}")
        if head_dim is None:
            if embed_dim % num_heads:
                raise DisparseValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}; pass "
                                         f"head_dim explicitly")
            head_dim = embed_dim // num_heads
        kdim = embed_dim if kdim is None else kdim
        vdim = embed_dim if vdim is None else vdim
        self._set_sizes(embed_dim=embed_dim, kdim=kdim, vdim=vdim, num_heads=num_heads, head_dim=head_dim,
                        v_head_dim=head_dim if v_head_dim is None else v_head_dim,
                        out_dim=embed_dim if out_dim is None else out_dim,
                        packed=kdim == embed_dim and vdim == embed_dim,
                        dropout=dropout, batch_first=batch_first, add_zero_attn=add_zero_attn, scale=scale)
        factory = {"device": device, "dtype": dtype}
        qk_width, v_width = self.num_heads * self.head_dim, self.num_heads * self.v_head_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty((2 * qk_width + v_width, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.register_parameter("in_proj_weight", None)
            self.q_proj_weight = nn.Parameter(torch.empty((qk_width, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((qk_width, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((v_width, self.vdim), **factory))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(2 * qk_width + v_width, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(v_width, self.out_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, qk_width), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, v_width), **factory))
        else:
            self.register_parameter("bias_k", None)
            self.register_parameter("bias_v", None)
        self._register_empty_masks()
        self._reset_parameters()

    # ------------------------------------------------------------------ construction helpers
    def _set_sizes(self, *, embed_dim: int, kdim: int, vdim: int, num_heads: int, head_dim: int, v_head_dim: int,
                   out_dim: int, packed: bool, dropout: float, batch_first: bool, add_zero_attn: bool,
                   scale: Optional[float]) -> None:
        sizes = {"embed_dim": embed_dim, "kdim": kdim, "vdim": vdim, "num_heads": num_heads, "head_dim": head_dim,
                 "v_head_dim": v_head_dim, "out_dim": out_dim}
        for name, size in sizes.items():
            if int(size) != size or size <= 0:
                raise DisparseValueError(f"{name} must be a positive int, got {size!r}")
        if scale is not None and not math.isfinite(float(scale)):
            raise DisparseValueError(f"scale must be a finite float, got {scale!r}")
        # Plain int/float/bool attributes only: the library's serializer saves them as data.
        self.embed_dim, self.kdim, self.vdim = int(embed_dim), int(kdim), int(vdim)
        self.num_heads, self.head_dim, self.v_head_dim = int(num_heads), int(head_dim), int(v_head_dim)
        self.out_dim = int(out_dim)
        self._qkv_same_embed_dim = bool(packed)
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self.add_zero_attn = bool(add_zero_attn)
        # 1/sqrt(d) as torch's need_weights path computes it (math.sqrt(1.0 / d)).
        self.scale = float(math.sqrt(1.0 / self.head_dim) if scale is None else scale)

    def _register_empty_masks(self) -> None:
        # None buffers are not in the state_dict; set_masks fills them.
        for name in _MASK_NAMES:
            self.register_buffer(name, None)

    def _reset_parameters(self) -> None:
        # torch's initialisation, so a fresh module is distributed like a fresh torch one.
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            nn.init.xavier_normal_(self.bias_v)

    @classmethod
    def _around(cls, source: nn.Module, *, num_heads: int, head_dim: int, v_head_dim: int,
                scale: Optional[float]) -> "MultiheadAttention":
        """A module holding ``source``'s very Parameter objects (no copy), sizes validated."""
        for name in ("in_proj_weight", "in_proj_bias", "bias_k", "bias_v", "out_proj", "dropout", "batch_first",
                     "add_zero_attn"):
            if not hasattr(source, name):
                raise DisparseValueError(f"{type(source).__name__} has no attribute {name!r}; expected a "
                                         f"torch.nn.MultiheadAttention or a passes.attention.MultiheadAttention")
        packed = source.in_proj_weight is not None
        params: Dict[str, Optional[Tensor]] = {
            name: getattr(source, name, None)
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                         "bias_k", "bias_v")}
        out_weight, out_bias = source.out_proj.weight, source.out_proj.bias
        first = params["in_proj_weight"] if packed else params["q_proj_weight"]
        if first is None or first.dim() != 2:
            name = "in_proj_weight" if packed else "q_proj_weight"
            raise DisparseValueError(f"{name} must be a 2-D Parameter, got "
                                     f"{None if first is None else tuple(first.shape)}")
        if out_weight.dim() != 2:
            raise DisparseValueError(f"out_proj.weight must be 2-D, got shape {tuple(out_weight.shape)}")
        embed_dim = first.shape[1]
        if packed:
            kdim = vdim = embed_dim
        else:
            for name in ("k_proj_weight", "v_proj_weight"):
                if params[name] is None or params[name].dim() != 2:
                    raise DisparseValueError(f"{name} must be a 2-D Parameter when q_proj_weight is used, got "
                                             f"{None if params[name] is None else tuple(params[name].shape)}")
            kdim, vdim = params["k_proj_weight"].shape[1], params["v_proj_weight"].shape[1]
        out_dim = out_weight.shape[0]

        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._set_sizes(embed_dim=embed_dim, kdim=kdim, vdim=vdim, num_heads=num_heads, head_dim=head_dim,
                          v_head_dim=v_head_dim, out_dim=out_dim, packed=packed, dropout=source.dropout,
                          batch_first=source.batch_first, add_zero_attn=source.add_zero_attn, scale=scale)
        qk_width, v_width = module.num_heads * module.head_dim, module.num_heads * module.v_head_dim
        expected: Dict[str, Tuple[int, ...]] = {
            "in_proj_weight": (2 * qk_width + v_width, embed_dim),
            "q_proj_weight": (qk_width, embed_dim),
            "k_proj_weight": (qk_width, kdim),
            "v_proj_weight": (v_width, vdim),
            "in_proj_bias": (2 * qk_width + v_width,),
            "bias_k": (1, 1, qk_width),
            "bias_v": (1, 1, v_width),
            "out_proj.weight": (out_dim, v_width),
            "out_proj.bias": (out_dim,),
        }
        present = dict(params, **{"out_proj.weight": out_weight, "out_proj.bias": out_bias})
        for name in (("in_proj_weight",) if packed else ("q_proj_weight", "k_proj_weight", "v_proj_weight")):
            if present[name] is None:
                raise DisparseValueError(f"{name} is None, expected a Parameter of shape {expected[name]}")
        if (params["bias_k"] is None) != (params["bias_v"] is None):
            raise DisparseValueError("bias_k and bias_v must both be set or both be None, got "
                                     f"bias_k={'set' if params['bias_k'] is not None else None}, "
                                     f"bias_v={'set' if params['bias_v'] is not None else None}")
        sizes = (f"num_heads={module.num_heads}, head_dim={module.head_dim}, v_head_dim={module.v_head_dim}, "
                 f"embed_dim={embed_dim}, kdim={kdim}, vdim={vdim}, out_dim={out_dim}")
        for name, tensor in present.items():
            if tensor is not None and tuple(tensor.shape) != expected[name]:
                raise DisparseValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected[name]} for "
                                         f"{sizes}")
            if tensor is not None and not isinstance(tensor, nn.Parameter):
                raise DisparseValueError(f"{name} is a {type(tensor).__name__}, expected an nn.Parameter")

        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                     "bias_k", "bias_v"):
            module.register_parameter(name, params[name])
        # A bare Linear of the right sizes (built on the meta device: nothing is allocated)
        # that then takes the source's own weight and bias objects.
        out_proj = nn.Linear(v_width, out_dim, bias=out_bias is not None, device="meta")
        out_proj.weight = out_weight
        out_proj.bias = out_bias
        module.out_proj = out_proj
        module._register_empty_masks()
        module.train(source.training)
        out_proj.train(source.out_proj.training)
        return module

    @classmethod
    def from_torch(cls, m: nn.MultiheadAttention) -> "MultiheadAttention":
        """A module computing what ``m`` computes, holding the very same Parameter objects."""
        if not isinstance(m, nn.MultiheadAttention):
            raise DisparseValueError(f"from_torch expects a torch.nn.MultiheadAttention, got {type(m).__name__}")
        return cls._around(m, num_heads=m.num_heads, head_dim=m.head_dim, v_head_dim=m.head_dim, scale=None)

    @classmethod
    def rebuild(cls, source: nn.Module, *, num_heads: int, head_dim: int, v_head_dim: int,
                scale: float) -> "MultiheadAttention":
        """A module around the Parameters ``source`` holds now, with the given sizes.

        ``source`` is a ``torch.nn.MultiheadAttention`` or a :class:`MultiheadAttention`
        whose parameters a pruning pass may already have sliced; the same Parameter objects
        are reused. ``embed_dim``, ``kdim``, ``vdim`` and ``out_dim`` are read off the
        parameter shapes; the q/k/v layout (packed ``in_proj_weight`` or separate weights)
        is the source's. Raises ValueError naming the first parameter whose shape does not
        fit the sizes. The training flag is copied; the result has no keep masks.
        """
        return cls._around(source, num_heads=num_heads, head_dim=head_dim, v_head_dim=v_head_dim, scale=scale)

    # ------------------------------------------------------------------ keep masks
    def set_masks(self, head_keep: MaskLike = None, qk_dim_keep: MaskLike = None,
                  v_dim_keep: MaskLike = None) -> None:
        """Set (or, with None, remove) the keep masks of the masked model.

        ``head_keep (H,)``, ``qk_dim_keep (Dqk,)`` and ``v_dim_keep (Dv,)`` are stored as
        persistent float 0/1 buffers of those names. In ``forward``:

        - q (after its projection and bias) is multiplied by ``qk_dim_keep`` along the
          per-head dim of every head: a removed q/k dim contributes nothing to any logit;
        - each head's attention output (``softmax(...) @ v``, linear in v, so this is the
          same as masking v including ``bias_v`` and the zero attention) is multiplied by
          ``v_dim_keep`` along its per-head dim and by ``head_keep[h]``, before the out
          projection;
        - with ``need_weights=True``, averaged weights are the mean over the *kept* heads
          only (``sum_h head_keep[h] * w_h / sum_h head_keep[h]``), and per-head weights
          (``average_attn_weights=False``) are multiplied by ``head_keep`` (removed heads
          give zeros).

        So the masked module computes (up to float rounding) what the same module computes
        after slicing away the masked heads and dims with the same ``scale``
        (:meth:`rebuild`): outputs, averaged weights and the kept heads' per-head weights.
        A 3-D ``attn_mask`` keeps all ``N*H`` heads in the masked model. The equality holds
        in eval mode (with attention dropout the two draw different random numbers). If
        ``head_keep`` keeps no head, the output is the out-projection bias and the
        averaged weights are zero.
        """
        for name, mask, size in zip(_MASK_NAMES, (head_keep, qk_dim_keep, v_dim_keep),
                                    (self.num_heads, self.head_dim, self.v_head_dim)):
            if mask is None:
                self.register_buffer(name, None)
                continue
            reference = self.out_proj.weight
            dtype = reference.dtype if reference.dtype.is_floating_point else torch.float32
            mask = torch.as_tensor(mask).detach().to(device=reference.device, dtype=dtype)
            if tuple(mask.shape) != (size,):
                raise DisparseValueError(f"{name} must have shape ({size},), got {tuple(mask.shape)}")
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise DisparseValueError(f"{name} must hold only 0 and 1, got {mask.tolist()}")
            if not bool(mask.any()):
                warn(f"{name} keeps nothing: every {'head' if name == 'head_keep' else 'dim'} of this "
                     "attention is masked")
            self.register_buffer(name, mask.clone(), persistent=True)

    def _output_keep(self) -> Optional[Tensor]:
        """The (H, 1, Dv) factor applied to every head's attention output, or None."""
        keep: Optional[Tensor] = None
        if self.head_keep is not None:
            keep = self.head_keep.view(self.num_heads, 1, 1)
        if self.v_dim_keep is not None:
            v_keep = self.v_dim_keep.view(1, 1, self.v_head_dim)
            keep = v_keep if keep is None else keep * v_keep
        return keep

    # ------------------------------------------------------------------ forward
    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        qk_width, v_width = self.num_heads * self.head_dim, self.num_heads * self.v_head_dim
        widths = [qk_width, qk_width, v_width]
        bias = self.in_proj_bias
        if self._qkv_same_embed_dim:
            weight = self.in_proj_weight
            if query is key and key is value:
                # self-attention: one matmul for all three
                q, k, v = F.linear(query, weight, bias).split(widths, dim=-1)
                return q, k, v
            w_q, w_k, w_v = weight.split(widths)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.split(widths)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """``torch.nn.MultiheadAttention.forward``'s semantics, with this module's sizes and
        keep masks. Returns ``(attn_output, attn_weights or None)``; the output is
        ``out_dim`` wide."""
        num_heads, qk_dim, v_dim = self.num_heads, self.head_dim, self.v_head_dim
        is_batched = _check_input_ranks(query, key, value, key_padding_mask, attn_mask, num_heads)
        if key_padding_mask is not None and attn_mask is not None and key_padding_mask.dtype != attn_mask.dtype:
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. Use same type for "
                          "both instead.", stacklevel=2)
        key_padding_mask = _canonical_mask(key_padding_mask, "key_padding_mask", query.dtype)
        attn_mask = _canonical_mask(attn_mask, "attn_mask", query.dtype)

        if self.batch_first and is_batched:
            # keep the identities query is key is value: they select the fused projections
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)

        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        if embed_dim != self.embed_dim:
            raise DisparseValueError(f"query is {embed_dim} wide, this attention expects embed_dim={self.embed_dim}")
        if key.shape[:2] != value.shape[:2]:
            raise DisparseValueError(f"key's sequence and batch dims {tuple(key.shape[:2])} do not match value's "
                                     f"{tuple(value.shape[:2])}")

        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                               "method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            # torch's rule: with no padding mask and no weights, the hint replaces the mask
            attn_mask = None
        elif key_padding_mask is not None:
            # the merged mask is no longer causal
            is_causal = False

        q, k, v = self._project(query, key, value)
        if self.qk_dim_keep is not None:
            q = (q.unflatten(-1, (num_heads, qk_dim)) * self.qk_dim_keep).flatten(-2)

        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(tgt_len, src_len)}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if tuple(attn_mask.shape) != (bsz * num_heads, tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(bsz * num_heads, tgt_len, src_len)}.")
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        elif self.bias_k is not None or self.bias_v is not None:
            raise RuntimeError("bias_k and bias_v must both be set or both be None")

        # (L, N, H*D) -> (N*H, L, D)
        q = q.reshape(tgt_len, bsz * num_heads, qk_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * num_heads, qk_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * num_heads, v_dim).transpose(0, 1)

        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros((bsz * num_heads, 1, qk_dim))], dim=1)
            v = torch.cat([v, v.new_zeros((bsz * num_heads, 1, v_dim))], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))

        src_len = k.size(1)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (bsz, src_len):
                raise DisparseValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected "
                                         f"{(bsz, src_len)} (after bias_k / add_zero_attn)")
            key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
                                .reshape(bsz * num_heads, 1, src_len))
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask

        dropout_p = self.dropout if self.training else 0.0
        output_keep = self._output_keep()

        if need_weights:
            q_scaled = q * self.scale
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            attn_output = torch.bmm(weights, v)  # (N*H, L, Dv)
            if output_keep is not None:
                attn_output = (attn_output.view(bsz, num_heads, tgt_len, v_dim) * output_keep).view(
                    bsz * num_heads, tgt_len, v_dim)
            attn_output = attn_output.transpose(0, 1).reshape(tgt_len * bsz, num_heads * v_dim)
            attn_output = F.linear(attn_output, self.out_proj.weight, self.out_proj.bias)
            attn_output = attn_output.view(tgt_len, bsz, attn_output.size(1))

            weights = weights.view(bsz, num_heads, tgt_len, src_len)
            if self.head_keep is not None:
                head_keep = self.head_keep.view(1, num_heads, 1, 1)
                if average_attn_weights:
                    # mean over the kept heads only, so masked == sliced for the weights too
                    weights = (weights * head_keep).sum(dim=1) / self.head_keep.sum().clamp_min(1.0)
                else:
                    weights = weights * head_keep
            elif average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                attn_output = attn_output.squeeze(1)
                weights = weights.squeeze(0)
            elif self.batch_first:
                attn_output = attn_output.transpose(1, 0)
            return attn_output, weights

        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.reshape(bsz, num_heads, tgt_len, qk_dim)
        k = k.reshape(bsz, num_heads, src_len, qk_dim)
        v = v.reshape(bsz, num_heads, src_len, v_dim)
        attn_output = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=self.scale)
        if output_keep is not None:
            attn_output = attn_output * output_keep
        attn_output = attn_output.permute(2, 0, 1, 3).reshape(tgt_len * bsz, num_heads * v_dim)
        attn_output = F.linear(attn_output, self.out_proj.weight, self.out_proj.bias)
        attn_output = attn_output.view(tgt_len, bsz, attn_output.size(1))
        if not is_batched:
            attn_output = attn_output.squeeze(1)
        elif self.batch_first:
            attn_output = attn_output.transpose(1, 0)
        return attn_output, None

    def extra_repr(self) -> str:
        parts = [f"embed_dim={self.embed_dim}", f"num_heads={self.num_heads}", f"head_dim={self.head_dim}",
                 f"v_head_dim={self.v_head_dim}", f"out_dim={self.out_dim}", f"scale={self.scale:.6g}"]
        if not self._qkv_same_embed_dim:
            parts += [f"kdim={self.kdim}", f"vdim={self.vdim}"]
        if self.batch_first:
            parts.append("batch_first=True")
        masks = [name for name in _MASK_NAMES if getattr(self, name) is not None]
        if masks:
            parts.append("masks=" + "+".join(masks))
        return ", ".join(parts)


def shifted_window_attention(
    input: Tensor,
    qkv_weight: Tensor,
    proj_weight: Tensor,
    relative_position_bias: Tensor,
    window_size: List[int],
    num_heads: int,
    shift_size: List[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: Optional[Tensor] = None,
    proj_bias: Optional[Tensor] = None,
    logit_scale: Optional[Tensor] = None,
    training: bool = True,
    *,
    head_dim: Optional[int] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """torchvision's Swin window attention (W-MSA / SW-MSA, v1 and v2) with explicit sizes.

    Identical to ``torchvision.models.swin_transformer.shifted_window_attention`` (padding,
    cyclic shift, shifted-window mask, relative position bias, v2 cosine attention with
    the k part of ``qkv_bias`` zeroed, dropouts, window reversal, unpadding) except that

    - ``head_dim`` (default ``C // num_heads`` of the ``(B, H, W, C)`` input, torchvision's
      rule) is explicit: ``qkv_weight`` has ``3 * num_heads * head_dim`` rows (q, k, v
      blocks, head-major inside each) and ``proj_weight`` ``num_heads * head_dim`` columns;
    - ``scale`` (default ``head_dim ** -0.5``) multiplies q in v1 attention; v2 cosine
      attention (``logit_scale`` given) ignores it, as torchvision does;
    - the output is ``proj_weight.shape[0]`` wide, not necessarily ``C``.

    ``relative_position_bias`` is ``(1, num_heads, Ws*Ws, Ws*Ws)`` and ``logit_scale``
    ``(num_heads, 1, 1)``, as in torchvision. Wrapped for torch.fx: traced calls stay one
    ``call_function`` node.
    """
    B, H, W, C = input.shape
    if head_dim is None:
        head_dim = C // num_heads
    if scale is None:
        scale = head_dim ** -0.5
    inner_dim = num_heads * head_dim
    out_dim = proj_weight.shape[0]
    # pad feature maps to multiples of window size
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape

    shift_size = list(shift_size)
    # a window as large as the feature map needs no shift
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0

    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))

    # partition windows: (B*nW, Ws*Ws, C)
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)

    if logit_scale is not None and qkv_bias is not None:
        # v2: no k bias (it would cancel in the cosine anyway, torchvision zeroes it)
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length: 2 * length].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logit_scale = torch.clamp(logit_scale, max=math.log(100.0)).exp()
        attn = attn * logit_scale
    else:
        q = q * scale
        attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias

    if sum(shift_size) > 0:
        # tokens that came from different regions before the cyclic shift must not attend
        attn_mask = x.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0]: h[1], w[0]: w[1]] = count
                count += 1
        attn_mask = attn_mask.view(pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1])
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))

    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention_dropout, training=training)

    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), inner_dim)
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)

    # reverse windows
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], out_dim)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, out_dim)

    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))

    # unpad features
    x = x[:, :H, :W, :].contiguous()
    return x


torch.fx.wrap("shifted_window_attention")
