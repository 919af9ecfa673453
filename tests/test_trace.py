"""passes/trace.py records each node's user frame itself (torch records and formats the
whole stack, a third of the tracing time): the frame it names must be the one torch's
recording leads :func:`passes.errors.user_frame` to."""
from __future__ import annotations

import gc

import pytest
import torch
import torch.fx as fx

from disparse_fx.passes import trace as trace_pass
from disparse_fx.passes.errors import DisparseWarning, user_frame

from .cnn_zoo import CNN_ZOO
from .cnn_zoo import build as build_cnn
from .transformer_zoo import TRANSFORMER_ZOO
from .transformer_zoo import build as build_transformer
from .zoo import ZOO


class _TorchRecording(trace_pass._Tracer):
    """The same tracer with torch's own stack-trace recording."""

    create_node = fx.Tracer.create_node


def _models():
    for name in sorted(CNN_ZOO):
        yield f"cnn:{name}", lambda name=name: build_cnn(name)[0]
    for name in sorted(TRANSFORMER_ZOO):
        yield f"transformer:{name}", lambda name=name: build_transformer(name)[0]
    for entry in ZOO:
        yield f"zoo:{entry.name}", entry.build
    # torch's transformer layers are traced through by passes/trace.py's stand-ins
    yield "torch:TransformerEncoder", lambda: torch.nn.Sequential(torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2))


@pytest.mark.parametrize("name,build", list(_models()), ids=[n for n, _ in _models()])
def test_recorded_user_frames_match_torch_recording(name, build):
    model = build()
    ours = list(trace_pass._Tracer().trace(model).nodes)
    theirs = list(_TorchRecording().trace(model).nodes)
    assert [n.name for n in ours] == [n.name for n in theirs]
    assert [user_frame(n) for n in ours] == [user_frame(n) for n in theirs]
    if not name.startswith("torch:"):  # there every frame is torch's or the tracer's
        assert any(user_frame(n) is not None for n in ours)


def test_recorded_frame_is_the_user_line():
    class Net(torch.nn.Module):
        def forward(self, x):
            return x.relu()  # the recorded line

    gm = trace_pass.trace_model(Net())
    node = next(n for n in gm.graph.nodes if n.op == "call_method")
    path, line, func, code = user_frame(node)
    assert path == __file__ and func == "forward" and code == "return x.relu()  # the recorded line"
    assert node.stack_trace == f'File "{path}", line {line}, in forward\n    {code}'



def _outputs(out):
    return list(out.values()) if isinstance(out, dict) else list(out)


def test_traced_module_compiles_its_code_on_first_use():
    """trace_model returns a lazily compiled GraphModule: the analyses never pay for the
    generated code, a user who reads .code or calls the module gets it as usual."""
    model, x = build_cnn(sorted(CNN_ZOO)[0])
    gm = trace_pass.trace_model(model)
    assert isinstance(gm, fx.GraphModule)
    assert "def forward" in gm.code
    for want, got in zip(_outputs(model(x)), _outputs(gm(x)), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("enabled", [True, False])
def test_analyses_leave_the_garbage_collector_as_they_found_it(enabled):
    """trace and channel groups pause the cyclic collector (passes/gc_pause.py) and give
    back the state they found, also a caller's disabled collector."""
    from disparse_fx.passes.channel_groups import find_channel_groups

    model, x = build_cnn(sorted(CNN_ZOO)[0])
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        gm = trace_pass.trace_model(model)
        assert gc.isenabled() == enabled
        find_channel_groups(gm, (x,))
        assert gc.isenabled() == enabled
    finally:
        (gc.enable if was else gc.disable)()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning",
                            "ignore:The TorchScript type system:UserWarning")
def test_modules_the_passes_hand_out_are_plain_graph_modules():
    """The lazy class stays with the traced module: the masked and slim copies are plain
    GraphModules, which torch.jit.script accepts and whose forward has its signature."""
    import inspect

    from torch.fx._lazy_graph_module import _LazyGraphModule

    from disparse_fx.passes.channel_groups import find_channel_groups
    from disparse_fx.passes.insert_masks import insert_masks
    from disparse_fx.passes.slim import slim_channels

    from .test_slim import random_keep

    model, x = build_cnn(sorted(CNN_ZOO)[0])
    gm = trace_pass.trace_model(model)
    groups = find_channel_groups(gm, (x,))
    name, weight = next((n, p) for n, p in gm.named_parameters() if p.dim() > 1)
    for out in (slim_channels(gm, groups, random_keep(groups, 0)),
                insert_masks(gm, {name: torch.ones_like(weight, dtype=torch.bool)})):
        assert not isinstance(out, _LazyGraphModule)
        assert list(inspect.signature(out.forward).parameters) == ["x"]
        scripted = torch.jit.script(out)
        for want, got in zip(_outputs(out(x)), _outputs(scripted(x)), strict=True):
            torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- torch.no_grad() in forward
class _Trunk(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 8)
        self.p, self.q = torch.nn.Linear(8, 2), torch.nn.Linear(8, 3)


class _NoGradBlock(_Trunk):
    def forward(self, x):
        with torch.no_grad():
            h = self.b(self.a(x).relu())
        return {"p": self.p(h), "q": self.q(h + x.sum(1, keepdim=True))}


class _SetGradEnabled(_Trunk):
    def forward(self, x):
        h = self.a(x).relu()
        with torch.set_grad_enabled(False):
            frozen = self.b(h)
        return {"p": self.p(h), "q": self.q(frozen)}


class _FrozenSub(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 8)

    @torch.no_grad()
    def forward(self, x):
        return self.lin(x).relu()


class _DecoratedForward(_Trunk):
    def __init__(self):
        super().__init__()
        self.frozen = _FrozenSub()

    def forward(self, x):
        h = self.b(self.frozen(x))
        return {"p": self.p(h), "q": self.q(h)}


class _ChunkOutside(_Trunk):
    def forward(self, x):
        with torch.no_grad():
            parts = self.a(x).chunk(2, 1)
        h = torch.cat([parts[0], self.a(x)[:, 4:]], 1)  # parts[0] is indexed outside the block
        return {"p": self.p(self.b(h)), "q": self.q(self.b(h))}


class _SizesInside(_Trunk):
    """Sizes and numbers computed in the block are not tensors: nothing to detach there;
    a parameter used with the block's value outside it still gets its gradient."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(8))

    def forward(self, x):
        with torch.no_grad():
            h = self.a(x)
            rows = h.size(0) + 1 - 1
            width = h.shape[1]
        y = h.view(rows, width) * self.scale
        return {"p": self.p(y), "q": self.q(self.b(h))}


@pytest.mark.parametrize("cls", [_NoGradBlock, _SetGradEnabled, _DecoratedForward, _ChunkOutside, _SizesInside])
def test_values_computed_under_no_grad_are_detached_where_they_leave_the_block(cls):
    """fx records a no_grad block's ops but not the mode: the traced graph must not
    backpropagate where the user's forward does not (same outputs, same gradients)."""
    torch.manual_seed(0)
    model = cls()
    gm = trace_pass.trace_model(model)
    assert "detach()" in gm.code
    x = torch.randn(3, 4)
    eager, traced = model(x), gm(x)
    for task in eager:
        assert torch.equal(eager[task], traced[task]), task
        assert eager[task].requires_grad == traced[task].requires_grad, task

    def grads(fn):
        model.zero_grad()
        out = fn(x)
        sum(v.sum() for v in out.values() if v.requires_grad).backward()
        return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}

    want, got = grads(model), grads(gm)
    for name in want:
        assert (want[name] is None) == (got[name] is None) or (
            want[name] is None and not got[name].any()), name
        if want[name] is not None:
            assert torch.allclose(want[name], got[name]), name


def test_a_model_without_no_grad_gets_no_detach():
    assert "detach" not in trace_pass.trace_model(ZOO[0].build()).code


class _WithSpares(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.p, self.q = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2), torch.nn.Linear(8, 3)
        self.aux = torch.nn.Linear(8, 5)  # never called
        self.deep = torch.nn.ModuleDict({"x": torch.nn.Linear(2, 2)})
        self.scale = torch.nn.Parameter(torch.ones(3))  # never read
        self.register_buffer("stat", torch.zeros(2))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, x):
        h = self.a(x)
        return {"p": self.p(h), "q": self.q(h)}


def test_tensors_the_graph_never_reads_are_kept():
    """fx copies only what the graph reads; a checkpoint of the user's model must still
    load strictly into the traced (and so the masked) model."""
    model = _WithSpares()
    gm = trace_pass.trace_model(model)
    assert set(gm.state_dict()) == set(model.state_dict())
    assert gm.aux is model.aux and gm.scale is model.scale and gm.get_buffer("scratch") is model.scratch
    assert "scratch" in gm._non_persistent_buffers_set
    gm.load_state_dict(model.state_dict(), strict=True)
    assert trace_pass.keep_unused_tensors(gm, model) == 0  # nothing left to add


class _TupleValues(_Trunk):
    """Tuples leave the block: a torch.return_types value read by attribute, a chunk
    used whole, a reduction with and without a dim."""

    def forward(self, x):
        with torch.no_grad():
            s = self.a(x)
            top = s.topk(2).values
            parts = s.chunk(2, 1)
            peak = s.abs().max()
            best = s.max(1)
        y = torch.cat(parts, 1) / peak
        return {"p": self.p(self.b(y)) + top.sum(1, keepdim=True) + best.values[:, None], "q": self.q(self.b(y))}


def test_tuples_leaving_a_no_grad_block_are_detached_leaf_by_leaf():
    test_values_computed_under_no_grad_are_detached_where_they_leave_the_block(_TupleValues)


@pytest.mark.parametrize("outer", ["no_grad", "inference_mode"])
def test_the_callers_grad_mode_does_not_change_the_trace(outer):
    """Traced under an outer no_grad / inference_mode, the forward's own block is still
    detached and nothing else is."""
    model = _NoGradBlock()
    reference = trace_pass.trace_model(model).code
    with (torch.no_grad() if outer == "no_grad" else torch.inference_mode()):
        assert trace_pass.trace_model(model).code == reference


class _ModeAndNoGrad(_NoGradBlock):
    """Reads self.training (so tracing is checked in the other mode) without a different graph."""

    def forward(self, x):
        out = super().forward(x)
        factor = 1.0 if self.training else 1.0
        return {k: v * factor for k, v in out.items()}


def test_a_no_grad_block_does_not_make_the_graph_look_mode_dependent():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DisparseWarning)
        trace_pass.trace_model(_ModeAndNoGrad())


class _AliasAndHook(_Trunk):
    """A second name for a used block, and an unused head with a hook."""

    def __init__(self):
        super().__init__()
        self.alias = self.a
        self.aux = torch.nn.Linear(8, 5)
        self.aux.register_forward_hook(lambda *args: None)

    def forward(self, x):
        h = self.b(self.a(x))
        return {"p": self.p(h), "q": self.q(h)}


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_unused_aliases_and_hooked_heads_keep_their_tensors_without_harm(granularity, tmp_path):
    import copy

    import disparse_fx as dfx

    model = _AliasAndHook()
    before = copy.deepcopy(model.state_dict())
    data = [{"input": torch.randn(4, 4), "p": torch.randn(4, 2), "q": torch.randn(4, 3)} for _ in range(2)]
    losses = {t: (lambda t: lambda o, b: torch.nn.functional.mse_loss(o, b[t]))(t) for t in "pq"}
    result = dfx.compress(model, losses, data, dfx.CompressConfig(
        sparsity=0.5, granularity=granularity, num_batches=2, progress=False))
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # never mutated
    assert set(model.state_dict()) <= set(result.model.state_dict())
    dfx.save(result, tmp_path / "r.dfx")  # the hook stays on the user's module, not in the result
    dfx.slim(result)
