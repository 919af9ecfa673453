"""passes.attention: MultiheadAttention with free sizes and Swin window attention with explicit sizes.

The references are torch's ``nn.MultiheadAttention`` and torchvision's
``shifted_window_attention``: the new code must compute what they compute when the
sizes are torch's, and a masked module must compute what the physically sliced one does.
"""
from __future__ import annotations

import copy
import itertools
import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st
from torchvision.models import swin_transformer as tv_swin

import disparse_fx.passes.attention as attention
from disparse_fx.passes.attention import MultiheadAttention, shifted_window_attention


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5, msg: str = "") -> None:
    """allclose with an absolute tolerance relative to the expected tensor's scale."""
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach(), expected.detach()
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=1e-5, msg=lambda m: f"{msg}\n{m}")


def randomize_biases(module: nn.Module, generator: torch.Generator) -> None:
    """torch initialises the projection biases to zero; random ones test their routing."""
    with torch.no_grad():
        for name in ("in_proj_bias", "bias_k", "bias_v"):
            p = getattr(module, name)
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=generator))
        if module.out_proj.bias is not None:
            module.out_proj.bias.copy_(torch.randn(module.out_proj.bias.shape, generator=generator))


def make_torch_mha(embed_dim: int, num_heads: int, *, separate: bool, bias: bool, add_bias_kv: bool,
                   add_zero_attn: bool, batch_first: bool, seed: int = 0) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    kdim, vdim = (embed_dim + 2, embed_dim + 3) if separate else (None, None)
    m = nn.MultiheadAttention(embed_dim, num_heads, bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn,
                              kdim=kdim, vdim=vdim, batch_first=batch_first)
    randomize_biases(m, torch.Generator().manual_seed(seed + 1))
    return m.eval()


def make_bool_key_padding(bsz: Optional[int], src_len: int, g: torch.Generator) -> torch.Tensor:
    """Random padding with the first key never padded (no fully masked rows: torch's fast
    and slow paths disagree on those, and they are NaN anyway)."""
    shape = (src_len,) if bsz is None else (bsz, src_len)
    mask = torch.rand(shape, generator=g) < 0.4
    mask[..., 0] = False
    return mask


def make_bool_attn_mask(shape: Tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    mask = torch.rand(shape, generator=g) < 0.4
    mask[..., 0] = False
    return mask


def to_float_mask(mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape).masked_fill(mask, float("-inf")) + 0.1 * (~mask).float()


def make_inputs(m: nn.Module, *, batched: bool, self_attention: bool, tgt_len: int, src_len: int, bsz: int,
                g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    def shaped(length: int, width: int) -> torch.Tensor:
        if not batched:
            return torch.randn(length, width, generator=g)
        if m.batch_first:
            return torch.randn(bsz, length, width, generator=g)
        return torch.randn(length, bsz, width, generator=g)

    query = shaped(tgt_len, m.embed_dim)
    if self_attention:
        return query, query, query
    return query, shaped(src_len, m.kdim), shaped(src_len, m.vdim)


MASK_KINDS = ("none", "2d_bool", "2d_float", "3d_bool", "3d_float", "causal")


def make_masks(kpm_kind: str, mask_kind: str, *, batched: bool, bsz: int, num_heads: int, tgt_len: int,
               src_len: int, g: torch.Generator) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], bool]:
    key_padding_mask = None
    if kpm_kind != "none":
        key_padding_mask = make_bool_key_padding(bsz if batched else None, src_len, g)
        if kpm_kind == "float":
            key_padding_mask = to_float_mask(key_padding_mask)
    attn_mask, is_causal = None, False
    lead = (bsz * num_heads,) if batched else (num_heads,)
    if mask_kind.startswith("2d"):
        attn_mask = make_bool_attn_mask((tgt_len, src_len), g)
    elif mask_kind.startswith("3d"):
        attn_mask = make_bool_attn_mask(lead + (tgt_len, src_len), g)
    elif mask_kind == "causal":
        attn_mask = torch.ones(tgt_len, src_len, dtype=torch.bool).triu(1)
        is_causal = True
    if attn_mask is not None and mask_kind.endswith("float"):
        attn_mask = to_float_mask(attn_mask)
    return key_padding_mask, attn_mask, is_causal


# ----------------------------------------------------------------------------- from_torch parity
CONFIGS = list(itertools.product([False, True], [False, True], [False, True], [False, True], [False, True]))


@pytest.mark.filterwarnings("ignore:Support for mismatched")
@pytest.mark.parametrize("batch_first,separate,bias,add_bias_kv,add_zero_attn", CONFIGS,
                         ids=["bf{:d}-sep{:d}-bias{:d}-bkv{:d}-zero{:d}".format(*c) for c in CONFIGS])
def test_from_torch_matches_torch_over_flag_grid(batch_first, separate, bias, add_bias_kv, add_zero_attn):
    embed_dim, num_heads, bsz = 8, 2, 2
    torch_mha = make_torch_mha(embed_dim, num_heads, separate=separate, bias=bias, add_bias_kv=add_bias_kv,
                               add_zero_attn=add_zero_attn, batch_first=batch_first)
    ours = MultiheadAttention.from_torch(torch_mha)
    g = torch.Generator().manual_seed(3)
    checked = 0
    for batched, kpm_kind, mask_kind, need_weights, average in itertools.product(
            [True, False], ["none", "bool", "float"], MASK_KINDS, [False, True], [True, False]):
        if not need_weights and not average:
            continue  # average_attn_weights only matters with need_weights
        # self-attention (the fused projection) when the module allows it, else cross-attention
        self_attention = not separate
        tgt_len = 4
        src_len = tgt_len if self_attention else 5
        query, key, value = make_inputs(torch_mha, batched=batched, self_attention=self_attention, tgt_len=tgt_len,
                                        src_len=src_len, bsz=bsz, g=g)
        key_padding_mask, attn_mask, is_causal = make_masks(kpm_kind, mask_kind, batched=batched, bsz=bsz,
                                                            num_heads=num_heads, tgt_len=tgt_len, src_len=src_len,
                                                            g=g)
        kwargs = dict(key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
                      average_attn_weights=average, is_causal=is_causal)
        case = f"batched={batched} kpm={kpm_kind} mask={mask_kind} need_weights={need_weights} average={average}"
        with torch.no_grad():  # also lets torch take its fast path where it can
            expected_out, expected_w = torch_mha(query, key, value, **kwargs)
            out, weights = ours(query, key, value, **kwargs)
        assert_close_scaled(out, expected_out, msg=case)
        if need_weights:
            assert_close_scaled(weights, expected_w, msg=case)
        else:
            assert weights is None and expected_w is None, case
        checked += 1
    assert checked == 2 * 3 * len(MASK_KINDS) * 3


def test_from_torch_shares_parameters_and_training_flag():
    torch_mha = nn.MultiheadAttention(8, 2, add_bias_kv=True, kdim=5, vdim=6).train()
    ours = MultiheadAttention.from_torch(torch_mha)
    assert ours.training and ours.out_proj.training
    for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k", "bias_v"):
        assert getattr(ours, name) is getattr(torch_mha, name), name
    assert ours.in_proj_weight is None and not ours._qkv_same_embed_dim
    assert ours.out_proj.weight is torch_mha.out_proj.weight and ours.out_proj.bias is torch_mha.out_proj.bias
    assert type(ours.out_proj) is nn.Linear
    assert (ours.embed_dim, ours.kdim, ours.vdim, ours.num_heads, ours.head_dim, ours.v_head_dim, ours.out_dim) == \
        (8, 5, 6, 2, 4, 4, 8)
    assert ours.scale == pytest.approx(0.5)
    assert not MultiheadAttention.from_torch(torch_mha.eval()).training
    # a gradient step through ours moves torch's weights: the same Parameter objects
    before = torch_mha.q_proj_weight.detach().clone()
    x = torch.randn(3, 2, 8)
    ours(x, torch.randn(4, 2, 5), torch.randn(4, 2, 6))[0].sum().backward()
    with torch.no_grad():
        for p in ours.parameters():
            p -= 0.1 * p.grad
    assert not torch.equal(before, torch_mha.q_proj_weight)


@pytest.mark.parametrize("need_weights", [True, False])
def test_training_dropout_draws_the_same_random_numbers_as_torch(need_weights):
    torch_mha = make_torch_mha(8, 2, separate=False, bias=True, add_bias_kv=False, add_zero_attn=False,
                               batch_first=True)
    torch_mha.dropout = 0.5
    torch_mha.train()
    ours = MultiheadAttention.from_torch(torch_mha)
    x = torch.randn(2, 4, 8)
    torch.manual_seed(7)
    expected = torch_mha(x, x, x, need_weights=need_weights)
    torch.manual_seed(7)
    got = ours(x, x, x, need_weights=need_weights)
    assert_close_scaled(got[0], expected[0])
    if need_weights:
        assert_close_scaled(got[1], expected[1])


@given(
    embed_dim_per_head=st.integers(1, 4),
    num_heads=st.integers(1, 4),
    separate=st.booleans(),
    bias=st.booleans(),
    add_bias_kv=st.booleans(),
    add_zero_attn=st.booleans(),
    batch_first=st.booleans(),
    batched=st.booleans(),
    lengths=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    bsz=st.integers(1, 3),
    kpm_kind=st.sampled_from(["none", "bool", "float"]),
    mask_kind=st.sampled_from(MASK_KINDS),
    need_weights=st.booleans(),
    average=st.booleans(),
    seed=st.integers(0, 2 ** 16),
)
def test_from_torch_matches_torch_property(embed_dim_per_head, num_heads, separate, bias, add_bias_kv, add_zero_attn,
                                           batch_first, batched, lengths, bsz, kpm_kind, mask_kind, need_weights,
                                           average, seed):
    embed_dim = embed_dim_per_head * num_heads
    torch_mha = make_torch_mha(embed_dim, num_heads, separate=separate, bias=bias, add_bias_kv=add_bias_kv,
                               add_zero_attn=add_zero_attn, batch_first=batch_first, seed=seed)
    ours = MultiheadAttention.from_torch(torch_mha)
    g = torch.Generator().manual_seed(seed)
    self_attention = not separate
    tgt_len, src_len = lengths
    if self_attention:
        src_len = tgt_len
    query, key, value = make_inputs(torch_mha, batched=batched, self_attention=self_attention, tgt_len=tgt_len,
                                    src_len=src_len, bsz=bsz, g=g)
    key_padding_mask, attn_mask, is_causal = make_masks(kpm_kind, mask_kind, batched=batched, bsz=bsz,
                                                        num_heads=num_heads, tgt_len=tgt_len, src_len=src_len, g=g)
    kwargs = dict(key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
                  average_attn_weights=average, is_causal=is_causal)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Support for mismatched")
        expected_out, expected_w = torch_mha(query, key, value, **kwargs)
        out, weights = ours(query, key, value, **kwargs)
    # a fully masked row is NaN in torch's slow path (and ours); compare where defined
    defined = ~expected_out.isnan()
    assert torch.equal(defined, ~out.isnan())
    assert_close_scaled(out[defined], expected_out[defined])
    if need_weights:
        assert torch.equal(expected_w.isnan(), weights.isnan())
        assert_close_scaled(weights.nan_to_num(), expected_w.nan_to_num())
    else:
        assert weights is None


def test_default_construction_matches_torch_sizes_and_initialisation():
    torch.manual_seed(0)
    ours = MultiheadAttention(12, 3, bias=True, add_bias_kv=True)
    assert ours.in_proj_weight.shape == (36, 12) and ours.q_proj_weight is None
    assert ours.bias_k.shape == (1, 1, 12) and ours.out_proj.weight.shape == (12, 12)
    assert ours.scale == pytest.approx(0.5) and ours.head_dim == ours.v_head_dim == 4
    assert torch.count_nonzero(ours.in_proj_bias) == 0
    free = MultiheadAttention(6, 2, head_dim=5, v_head_dim=3, out_dim=7, kdim=4, vdim=9, scale=0.25,
                              batch_first=True)
    assert free.q_proj_weight.shape == (10, 6) and free.k_proj_weight.shape == (10, 4)
    assert free.v_proj_weight.shape == (6, 9) and free.in_proj_bias.shape == (26,)
    assert free.out_proj.weight.shape == (7, 6) and free.scale == 0.25
    out, weights = free(torch.randn(2, 3, 6), torch.randn(2, 4, 4), torch.randn(2, 4, 9))
    assert out.shape == (2, 3, 7) and weights.shape == (2, 3, 4)
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(7, 2)
    assert MultiheadAttention(7, 2, head_dim=3).in_proj_weight.shape == (18, 7)


# ----------------------------------------------------------------------------- masks == slicing
def kept_rows(num_heads: int, per_head: int, heads: Sequence[int], dims: Sequence[int]) -> torch.Tensor:
    return torch.tensor([h * per_head + d for h in heads for d in dims], dtype=torch.long)


def sliced_copy(m: MultiheadAttention, heads: List[int], qk_dims: List[int], v_dims: List[int]) -> MultiheadAttention:
    """``m`` with the unkept heads and dims cut out of its parameters, rebuilt around them."""
    holder = copy.deepcopy(m)
    holder.set_masks()
    qk_width, v_width = m.num_heads * m.head_dim, m.num_heads * m.v_head_dim
    q_rows = kept_rows(m.num_heads, m.head_dim, heads, qk_dims)
    v_rows = kept_rows(m.num_heads, m.v_head_dim, heads, v_dims)
    in_rows = torch.cat([q_rows, qk_width + q_rows, 2 * qk_width + v_rows])

    def param(t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t.detach().clone())

    if m._qkv_same_embed_dim:
        holder.in_proj_weight = param(m.in_proj_weight[in_rows])
    else:
        holder.q_proj_weight = param(m.q_proj_weight[q_rows])
        holder.k_proj_weight = param(m.k_proj_weight[q_rows])
        holder.v_proj_weight = param(m.v_proj_weight[v_rows])
    if m.in_proj_bias is not None:
        holder.in_proj_bias = param(m.in_proj_bias[in_rows])
    if m.bias_k is not None:
        holder.bias_k = param(m.bias_k[..., q_rows])
        holder.bias_v = param(m.bias_v[..., v_rows])
    holder.out_proj.weight = param(m.out_proj.weight[:, v_rows])
    return MultiheadAttention.rebuild(holder, num_heads=len(heads), head_dim=len(qk_dims), v_head_dim=len(v_dims),
                                      scale=m.scale)


def random_keep(size: int, g: torch.Generator) -> torch.Tensor:
    keep = (torch.rand(size, generator=g) < 0.5).float()
    keep[int(torch.randint(size, (1,), generator=g))] = 1.0  # at least one kept
    return keep


@given(
    num_heads=st.integers(1, 4),
    head_dim=st.integers(1, 4),
    v_head_dim=st.integers(1, 4),
    separate=st.booleans(),
    bias=st.booleans(),
    add_bias_kv=st.booleans(),
    add_zero_attn=st.booleans(),
    batch_first=st.booleans(),
    batched=st.booleans(),
    kpm_kind=st.sampled_from(["none", "bool", "float"]),
    mask_kind=st.sampled_from(MASK_KINDS),
    which=st.sampled_from(["heads", "qk", "v", "all"]),
    seed=st.integers(0, 2 ** 16),
)
def test_masked_module_equals_sliced_module(num_heads, head_dim, v_head_dim, separate, bias, add_bias_kv,
                                            add_zero_attn, batch_first, batched, kpm_kind, mask_kind, which, seed):
    torch.manual_seed(seed)
    embed_dim = 5
    kdim, vdim = (3, 4) if separate else (None, None)
    m = MultiheadAttention(embed_dim, num_heads, head_dim=head_dim, v_head_dim=v_head_dim, out_dim=6, kdim=kdim,
                           vdim=vdim, bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn,
                           batch_first=batch_first, scale=0.7).eval()
    g = torch.Generator().manual_seed(seed)
    randomize_biases(m, g)
    ones = torch.ones
    head_keep = random_keep(num_heads, g) if which in ("heads", "all") else ones(num_heads)
    qk_keep = random_keep(head_dim, g) if which in ("qk", "all") else ones(head_dim)
    v_keep = random_keep(v_head_dim, g) if which in ("v", "all") else ones(v_head_dim)
    masked = copy.deepcopy(m)
    masked.set_masks(head_keep=head_keep, qk_dim_keep=qk_keep, v_dim_keep=v_keep)
    heads = head_keep.nonzero().flatten().tolist()
    sliced = sliced_copy(m, heads, qk_keep.nonzero().flatten().tolist(), v_keep.nonzero().flatten().tolist())
    assert sliced.scale == m.scale and sliced.num_heads == len(heads)

    bsz, tgt_len = 2, 3
    src_len = tgt_len if not separate else 4
    query, key, value = make_inputs(m, batched=batched, self_attention=not separate, tgt_len=tgt_len,
                                    src_len=src_len, bsz=bsz, g=g)
    key_padding_mask, attn_mask, is_causal = make_masks(kpm_kind, mask_kind, batched=batched, bsz=bsz,
                                                        num_heads=num_heads, tgt_len=tgt_len, src_len=src_len, g=g)
    sliced_attn_mask = attn_mask
    if attn_mask is not None and attn_mask.dim() == 3:  # a per-head mask loses the removed heads' slices
        lead = bsz if batched else 1
        sliced_attn_mask = attn_mask.view(lead, num_heads, tgt_len, src_len)[:, heads].reshape(
            lead * len(heads), tgt_len, src_len)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Support for mismatched")
        for need_weights, average in ((False, True), (True, True), (True, False)):
            kwargs = dict(key_padding_mask=key_padding_mask, need_weights=need_weights,
                          average_attn_weights=average, is_causal=is_causal)
            out_masked, w_masked = masked(query, key, value, attn_mask=attn_mask, **kwargs)
            out_sliced, w_sliced = sliced(query, key, value, attn_mask=sliced_attn_mask, **kwargs)
            case = f"need_weights={need_weights} average={average}"
            assert_close_scaled(out_masked, out_sliced, msg=case)
            if not need_weights:
                assert w_masked is None and w_sliced is None
            elif average:
                assert_close_scaled(w_masked, w_sliced, msg=case)
            else:
                head_dim_of_weights = 1 if batched else 0
                assert_close_scaled(w_masked.index_select(head_dim_of_weights, torch.tensor(heads)), w_sliced,
                                    msg=case)
                removed = [h for h in range(num_heads) if h not in heads]
                if removed:
                    assert not w_masked.index_select(head_dim_of_weights, torch.tensor(removed)).any()


def test_head_mask_gives_zero_gradient_to_removed_head_rows():
    m = MultiheadAttention(8, 2, add_bias_kv=True)
    m.set_masks(head_keep=torch.tensor([0.0, 1.0]), qk_dim_keep=torch.tensor([1.0, 0.0, 1.0, 1.0]))
    x = torch.randn(3, 2, 8)
    m(x, x, x)[0].square().sum().backward()
    grad = m.in_proj_weight.grad
    assert not grad[0:4].any() and not grad[8:12].any() and not grad[16:20].any()  # head 0's q, k, v rows
    assert not grad[4 + 1].any() and not grad[12 + 1].any()  # the removed qk dim of head 1 (q and k)
    assert grad[4].any() and grad[20:24].any()
    assert not m.out_proj.weight.grad[:, :4].any() and not m.bias_k.grad[..., 5].any()


def test_set_masks_buffers_validation_and_removal():
    m = MultiheadAttention(8, 2, head_dim=3, v_head_dim=5)
    assert "head_keep" not in m.state_dict()
    m.set_masks(head_keep=[1, 0], qk_dim_keep=torch.tensor([True, True, False]))
    state = m.state_dict()
    assert state["head_keep"].dtype == torch.float32 and state["head_keep"].tolist() == [1.0, 0.0]
    assert state["qk_dim_keep"].tolist() == [1.0, 1.0, 0.0] and "v_dim_keep" not in state
    assert "head_keep" in dict(m.named_buffers())
    with pytest.raises(ValueError, match=r"v_dim_keep must have shape \(5,\)"):
        m.set_masks(v_dim_keep=torch.ones(3))
    with pytest.raises(ValueError, match="only 0 and 1"):
        m.set_masks(head_keep=torch.tensor([0.5, 1.0]))
    m.set_masks()
    assert m.head_keep is None and m.qk_dim_keep is None and "head_keep" not in m.state_dict()


# ----------------------------------------------------------------------------- rebuild
def test_rebuild_reuses_parameters_and_reads_sizes_off_shapes():
    m = MultiheadAttention(6, 2, head_dim=4, v_head_dim=3, out_dim=5, kdim=7, vdim=2, add_bias_kv=True).train()
    m.set_masks(head_keep=torch.tensor([1.0, 0.0]))
    again = MultiheadAttention.rebuild(m, num_heads=2, head_dim=4, v_head_dim=3, scale=0.3)
    assert again.training and again.head_keep is None and again.scale == 0.3
    assert (again.embed_dim, again.kdim, again.vdim, again.out_dim) == (6, 7, 2, 5)
    for (name, p), (name2, p2) in zip(m.named_parameters(), again.named_parameters()):
        assert name == name2 and p is p2
    # the layout follows the source, even when the sliced widths happen to coincide
    torch_mha = nn.MultiheadAttention(4, 2, kdim=4, vdim=4)
    assert torch_mha._qkv_same_embed_dim
    separate = nn.MultiheadAttention(4, 2, kdim=3, vdim=3)
    with torch.no_grad():
        separate.k_proj_weight = nn.Parameter(torch.randn(4, 4))
        separate.v_proj_weight = nn.Parameter(torch.randn(4, 4))
    rebuilt = MultiheadAttention.rebuild(separate, num_heads=2, head_dim=2, v_head_dim=2, scale=0.5)
    assert not rebuilt._qkv_same_embed_dim and rebuilt.in_proj_weight is None and rebuilt.kdim == 4


@pytest.mark.parametrize("change,name", [
    (lambda m: setattr(m, "in_proj_weight", nn.Parameter(torch.randn(23, 8))), "in_proj_weight"),
    (lambda m: setattr(m, "in_proj_bias", nn.Parameter(torch.randn(23))), "in_proj_bias"),
    (lambda m: setattr(m.out_proj, "weight", nn.Parameter(torch.randn(8, 7))), "out_proj.weight"),
    (lambda m: setattr(m, "bias_k", nn.Parameter(torch.randn(1, 1, 9))), "bias_k"),
    (lambda m: setattr(m, "bias_v", nn.Parameter(torch.randn(1, 1, 7))), "bias_v"),
])
def test_rebuild_names_the_parameter_whose_shape_does_not_fit(change, name):
    m = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    change(m)
    with pytest.raises(ValueError) as info:
        MultiheadAttention.rebuild(m, num_heads=2, head_dim=4, v_head_dim=4, scale=0.5)
    message = str(info.value)
    assert message.startswith(name + " has shape"), message
    assert "expected" in message


def test_rebuild_names_separate_projection_weights():
    m = nn.MultiheadAttention(8, 2, kdim=3, vdim=5)
    m.q_proj_weight = nn.Parameter(m.q_proj_weight[:6].detach())  # q sliced to 2 heads x 3 dims, k not yet
    with pytest.raises(ValueError, match=r"k_proj_weight has shape \(8, 3\), expected \(6, 3\)"):
        MultiheadAttention.rebuild(m, num_heads=2, head_dim=3, v_head_dim=4, scale=0.5)
    m.k_proj_weight = nn.Parameter(m.k_proj_weight[:6].detach())
    with pytest.raises(ValueError, match=r"v_proj_weight has shape \(8, 5\), expected \(6, 5\)"):
        MultiheadAttention.rebuild(m, num_heads=2, head_dim=3, v_head_dim=3, scale=0.5)


# ----------------------------------------------------------------------------- deepcopy, fx, plain attributes
class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attn = MultiheadAttention(8, 2, head_dim=3, v_head_dim=2, out_dim=6, batch_first=True)
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        out, _ = self.attn(h, h, h, key_padding_mask=padding, need_weights=False)
        return self.head(out.relu())


class AttentionLeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, MultiheadAttention) or super().is_leaf_module(m, module_qualified_name)


def test_module_is_an_fx_leaf_and_deep_copyable():
    model = TinyEncoder().eval()
    model.attn.set_masks(head_keep=torch.tensor([1.0, 0.0]))
    graph = AttentionLeafTracer().trace(model)
    gm = fx.GraphModule(model, graph)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "attn"]
    assert len(calls) == 1
    assert not any(n.op == "call_module" and n.target.startswith("attn.") for n in gm.graph.nodes)
    x, padding = torch.randn(2, 4, 3), torch.tensor([[False] * 4, [False, False, True, True]])
    assert torch.equal(gm(x, padding), model(x, padding))

    twin = copy.deepcopy(model)
    assert twin.attn.in_proj_weight is not model.attn.in_proj_weight
    assert torch.equal(twin.attn.head_keep, model.attn.head_keep)
    assert torch.equal(twin(x, padding), model(x, padding))
    gm_twin = copy.deepcopy(gm)
    assert torch.equal(gm_twin(x, padding), model(x, padding))


def test_attributes_are_plain_data():
    m = MultiheadAttention(6, 2, head_dim=4, kdim=3, add_bias_kv=True)
    m.set_masks(head_keep=torch.ones(2))
    plain = {k: v for k, v in vars(m).items() if not k.startswith("_") or k == "_qkv_same_embed_dim"}
    plain.pop("training")
    assert set(plain) == {"embed_dim", "kdim", "vdim", "num_heads", "head_dim", "v_head_dim", "out_dim", "dropout",
                          "batch_first", "add_zero_attn", "scale", "_qkv_same_embed_dim"}
    assert all(type(v) in (int, float, bool) for v in plain.values()), plain
    assert type(m.scale) is float and type(m.dropout) is float


# ----------------------------------------------------------------------------- Swin window attention
def swin_weights(dim: int, num_heads: int, window: Sequence[int], *, v2: bool, seed: int,
                 head_dim: Optional[int] = None, out_dim: Optional[int] = None) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    head_dim = dim // num_heads if head_dim is None else head_dim
    inner = num_heads * head_dim
    out_dim = dim if out_dim is None else out_dim
    tokens = window[0] * window[1]
    weights = {
        "qkv_weight": torch.randn(3 * inner, dim, generator=g) / math.sqrt(dim),
        "proj_weight": torch.randn(out_dim, inner, generator=g) / math.sqrt(inner),
        "relative_position_bias": torch.randn(1, num_heads, tokens, tokens, generator=g),
        "qkv_bias": torch.randn(3 * inner, generator=g),
        "proj_bias": torch.randn(out_dim, generator=g),
    }
    if v2:
        weights["logit_scale"] = torch.log(10 * torch.ones(num_heads, 1, 1)) + 0.3 * torch.randn(
            num_heads, 1, 1, generator=g)
    return weights


def call_swin(fn, x: torch.Tensor, w: Dict[str, torch.Tensor], window: List[int], num_heads: int,
              shift: List[int], **extra) -> torch.Tensor:
    return fn(x, w["qkv_weight"], w["proj_weight"], w["relative_position_bias"], window, num_heads, shift,
              qkv_bias=w["qkv_bias"], proj_bias=w["proj_bias"], logit_scale=w.get("logit_scale"), training=False,
              **extra)


SWIN_CASES = [  # (height, width, window, shift)
    (7, 7, [7, 7], [0, 0]),
    (9, 11, [7, 7], [0, 0]),
    (9, 11, [7, 7], [3, 3]),
    (14, 14, [7, 7], [3, 3]),
    (6, 10, [3, 5], [1, 2]),
    (5, 5, [7, 7], [3, 3]),  # window larger than the map: no shift
]


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("height,width,window,shift", SWIN_CASES)
def test_swin_defaults_match_torchvision(v2, height, width, window, shift):
    dim, num_heads = 12, 3
    w = swin_weights(dim, num_heads, window, v2=v2, seed=height * width)
    x = torch.randn(2, height, width, dim, generator=torch.Generator().manual_seed(1))
    expected = call_swin(tv_swin.shifted_window_attention, x, w, window, num_heads, shift)
    got = call_swin(shifted_window_attention, x, w, window, num_heads, shift)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    explicit = call_swin(shifted_window_attention, x, w, window, num_heads, shift, head_dim=4, scale=0.5)
    torch.testing.assert_close(explicit, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("module_cls", [tv_swin.ShiftedWindowAttention, tv_swin.ShiftedWindowAttentionV2],
                         ids=["v1", "v2"])
def test_swin_matches_torchvision_blocks_including_dropout(module_cls):
    torch.manual_seed(0)
    block = module_cls(12, [7, 7], [3, 3], 3, attention_dropout=0.2, dropout=0.1)
    with torch.no_grad():
        block.qkv.bias.normal_()
    x = torch.randn(1, 9, 11, 12)

    def ours(training: bool) -> torch.Tensor:
        return shifted_window_attention(
            x, block.qkv.weight, block.proj.weight, block.get_relative_position_bias(), block.window_size,
            block.num_heads, block.shift_size, attention_dropout=block.attention_dropout, dropout=block.dropout,
            qkv_bias=block.qkv.bias, proj_bias=block.proj.bias, logit_scale=getattr(block, "logit_scale", None),
            training=training)

    for training in (False, True):
        block.train(training)
        torch.manual_seed(5)
        expected = block(x)
        torch.manual_seed(5)
        torch.testing.assert_close(ours(training), expected, atol=1e-6, rtol=1e-6)


def swin_rows(num_heads: int, head_dim: int, heads: Sequence[int], dims: Sequence[int]) -> torch.Tensor:
    """Rows of the q, k and v blocks of a qkv weight for the kept heads and dims."""
    inner = num_heads * head_dim
    one_block = kept_rows(num_heads, head_dim, heads, dims)
    return torch.cat([one_block, inner + one_block, 2 * inner + one_block])


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("shift", [[0, 0], [3, 3]])
def test_swin_pruned_heads_equal_torchvision_with_the_heads_projection_zeroed(v2, shift):
    dim, num_heads, head_dim, window = 12, 3, 4, [7, 7]
    w = swin_weights(dim, num_heads, window, v2=v2, seed=11)
    x = torch.randn(2, 9, 11, dim, generator=torch.Generator().manual_seed(2))
    heads, removed = [0, 2], 1
    # reference: every head computed; the removed head's output meets zero projection columns
    reference = dict(w)
    reference["proj_weight"] = w["proj_weight"].clone()
    reference["proj_weight"][:, removed * head_dim:(removed + 1) * head_dim] = 0.0
    expected = call_swin(tv_swin.shifted_window_attention, x, reference, window, num_heads, shift)

    rows = swin_rows(num_heads, head_dim, heads, range(head_dim))
    columns = kept_rows(num_heads, head_dim, heads, range(head_dim))
    pruned = {
        "qkv_weight": w["qkv_weight"][rows], "qkv_bias": w["qkv_bias"][rows],
        "proj_weight": w["proj_weight"][:, columns], "proj_bias": w["proj_bias"],
        "relative_position_bias": w["relative_position_bias"][:, heads],
    }
    if v2:
        pruned["logit_scale"] = w["logit_scale"][heads]
    got = call_swin(shifted_window_attention, x, pruned, window, len(heads), shift, head_dim=head_dim,
                    scale=head_dim ** -0.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the output width is the projection's: pruning output channels too
    out_keep = torch.tensor([0, 3, 4, 7, 11])
    narrow = dict(pruned, proj_weight=pruned["proj_weight"][out_keep], proj_bias=pruned["proj_bias"][out_keep])
    got_narrow = call_swin(shifted_window_attention, x, narrow, window, len(heads), shift, head_dim=head_dim,
                           scale=head_dim ** -0.5)
    assert got_narrow.shape == (2, 9, 11, 5)
    torch.testing.assert_close(got_narrow, expected[..., out_keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("shift", [[0, 0], [3, 3]])
def test_swin_pruned_head_dims_equal_torchvision_with_those_rows_zeroed(v2, shift):
    dim, num_heads, head_dim, window = 12, 3, 4, [7, 7]
    w = swin_weights(dim, num_heads, window, v2=v2, seed=13)
    x = torch.randn(2, 9, 11, dim, generator=torch.Generator().manual_seed(3))
    dims = [0, 2, 3]
    removed_dims = [1]
    # reference: the removed dims' q, k and v rows (and bias entries) zeroed in every head. A
    # zero q (or k) dim adds nothing to a logit, and with q and k both zeroed the v2 cosine
    # normalises over the kept dims only; a zero v dim makes that output dim zero.
    zeroed = swin_rows(num_heads, head_dim, range(num_heads), removed_dims)
    reference = dict(w, qkv_weight=w["qkv_weight"].clone(), qkv_bias=w["qkv_bias"].clone())
    reference["qkv_weight"][zeroed] = 0.0
    reference["qkv_bias"][zeroed] = 0.0
    expected = call_swin(tv_swin.shifted_window_attention, x, reference, window, num_heads, shift)

    rows = swin_rows(num_heads, head_dim, range(num_heads), dims)
    columns = kept_rows(num_heads, head_dim, range(num_heads), dims)
    pruned = dict(w, qkv_weight=w["qkv_weight"][rows], qkv_bias=w["qkv_bias"][rows],
                  proj_weight=w["proj_weight"][:, columns])
    got = call_swin(shifted_window_attention, x, pruned, window, num_heads, shift, head_dim=len(dims),
                    scale=head_dim ** -0.5)  # the original scale, not len(dims) ** -0.5
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if not v2:  # v1 depends on the scale; v2's cosine attention ignores it, as torchvision's does
        wrong = call_swin(shifted_window_attention, x, pruned, window, num_heads, shift, head_dim=len(dims))
        assert not torch.allclose(wrong, expected, atol=1e-4)


class SwinAttentionCaller(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(12, 2 * 3 * 5)
        self.proj = nn.Linear(2 * 5, 7)
        self.relative_position_bias = nn.Parameter(torch.zeros(1, 2, 9, 9))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return attention.shifted_window_attention(
            x, self.qkv.weight, self.proj.weight, self.relative_position_bias, [3, 3], 2, [1, 1],
            qkv_bias=self.qkv.bias, proj_bias=self.proj.bias, training=False, head_dim=5, scale=0.3)


def test_swin_function_stays_one_fx_node():
    model = SwinAttentionCaller()
    gm = fx.symbolic_trace(model)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls] == [shifted_window_attention]
    assert calls[0].kwargs["head_dim"] == 5 and calls[0].kwargs["scale"] == 0.3
    x = torch.randn(1, 5, 4, 12)
    out = gm(x)
    assert out.shape == (1, 5, 4, 7)
    assert torch.equal(out, model(x))
