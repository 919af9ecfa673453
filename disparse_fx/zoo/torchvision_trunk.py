"""Multitask models from torchvision classification backbones.

:func:`multitask_from_torchvision` keeps a torchvision model's feature extractor as a
shared trunk (``self.trunk``) and puts one head per task on it (``self.heads``):

- ``"dense"``: per-pixel, ``conv3x3 -> ReLU -> conv1x1`` to ``out_dim`` channels,
  upsampled (bilinear) to the input size;
- ``"classify"``: global average pool -> ``Linear`` to ``out_dim``;
- ``"regress"``: global average pool -> ``Linear -> ReLU -> Linear`` to ``out_dim``.

How the trunk is found (one rule for every model, no per-family table): the model is
traced in eval mode with torchvision's ``NodePathTracer`` and run once on a dummy
batch (shape propagation). The graph is cut at the first node of the classifier:
a global pooling or flatten (module, function or method), any node producing a
batch-first ``(N, C)`` vector, or a node under a
top-level submodule named like a classifier (``fc``, ``classifier``, ``head``,
``heads``, ``avgpool``, ``flatten``, ``AuxLogits``, ``aux1``, ``aux2``). Before the
cut, the trunk output is the last batch-first 4-D tensor ``(N, C, H, W)``; when a
3-D tensor ``(N, L, C)`` comes after it (vision transformers: the encoder's
tokens), the trunk is a *token trunk* and its output is that tensor.

Token trunks (ViT): pooled heads average over all tokens; dense heads drop the
leading non-patch tokens (the class token), lay the patch tokens out on their grid
``(N, C, H/p, W/p)`` and proceed as for a conv trunk. The number of leading tokens
and the grid are found from the dummy run (the smallest ``k`` such that ``L - k`` is
a square grid dividing the input size).

The trunk is built with ``torchvision.models.feature_extraction.create_feature_extractor``;
it keeps the backbone's module hierarchy, so parameter names stay readable
(``trunk.layer4.1.conv2.weight``). When the backbone traces alike in train and eval
mode the trunk is one plain ``GraphModule``; otherwise (swin_*, maxvit_t: functional
dropout with ``training=self.training``) it keeps both graphs and swaps them on
``train()`` / ``eval()``, and a deep copy keeps its mode (torchvision's own
DualGraphModule comes back from ``copy.deepcopy`` in train mode). Inception-v3 and
GoogLeNet are built with ``aux_logits=False``. The model traces with
``torch.fx.symbolic_trace``; all 80 classifiers of torchvision 0.29 were checked
(``tests/test_zoo.py``, marker ``long``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "TaskHeadSpec",
    "TrunkInfo",
    "MultiTaskTorchvision",
    "multitask_from_torchvision",
    "find_trunk_output",
    "default_input_size",
    "HEAD_KINDS",
]

log = logging.getLogger(__name__)

HEAD_KINDS = ("dense", "classify", "regress")

#: Top-level submodule names that belong to a classifier, never to the trunk.
CLASSIFIER_PREFIXES = frozenset(
    {"fc", "classifier", "head", "heads", "avgpool", "AuxLogits", "aux1", "aux2", "flatten"}
)
_POOL_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)
_POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.flatten}
_POOL_METHODS = {"flatten"}

#: Smallest sensible square input per model where 64 does not work.
_MIN_INPUT = {"inception_v3": 75, "maxvit_t": 224}


@dataclass(frozen=True)
class TaskHeadSpec:
    """One task head: ``kind`` in :data:`HEAD_KINDS`, ``out_dim`` outputs (channels for
    ``"dense"``), and ``hidden`` width (``None``: the model's ``head_width``)."""

    kind: str
    out_dim: int
    hidden: Optional[int] = None

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"kind must be one of {HEAD_KINDS}, but got {self.kind!r}")
        if not isinstance(self.out_dim, int) or isinstance(self.out_dim, bool) or self.out_dim < 1:
            raise ValueError(f"out_dim must be an int >= 1, but got {self.out_dim!r}")
        if self.hidden is not None and self.hidden < 1:
            raise ValueError(f"hidden must be >= 1 or None, but got {self.hidden!r}")

    @classmethod
    def of(cls, spec: Union["TaskHeadSpec", Tuple[str, int], int]) -> "TaskHeadSpec":
        """Accept a spec, a ``(kind, out_dim)`` tuple, or an int (a dense task)."""
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, int) and not isinstance(spec, bool):
            return cls("dense", spec)
        if isinstance(spec, (tuple, list)) and len(spec) in (2, 3):
            return cls(*spec)
        raise ValueError(f"a task head must be a TaskHeadSpec, (kind, out_dim) or int, but got {spec!r}")


@dataclass(frozen=True)
class TrunkInfo:
    """Where the trunk ends: the ``NodePathTracer`` node name, the layout
    (``"NCHW"`` or ``"NLC"``), the output shape on the dummy input and its size."""

    node: str
    layout: str
    shape: Tuple[int, ...]
    input_size: int
    prefix_tokens: int = 0
    grid: Optional[Tuple[int, int]] = None

    @property
    def channels(self) -> int:
        return self.shape[1] if self.layout == "NCHW" else self.shape[2]


def default_input_size(name: str, model: Optional[nn.Module] = None) -> int:
    """The square dummy-input size used to probe ``name``: 64 unless the model needs more
    (ViTs have a fixed ``image_size``; inception_v3 75; maxvit_t 224)."""
    size = getattr(model, "image_size", None)
    if isinstance(size, int):
        return size
    return _MIN_INPUT.get(name, 64)


def _is_classifier_node(node: fx.Node, qualname: str, root: nn.Module, batch: int) -> bool:
    if qualname.split(".")[0] in CLASSIFIER_PREFIXES:
        return True
    shape = tuple(getattr(node.meta.get("tensor_meta"), "shape", ()))
    if len(shape) == 2 and shape[0] == batch:  # a pooled (N, C) vector
        return True
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), _POOL_MODULES)
    if node.op == "call_function":
        return node.target in _POOL_FUNCTIONS
    if node.op == "call_method":
        return node.target in _POOL_METHODS
    return False


def _token_grid(length: int, size: int) -> Optional[Tuple[int, Tuple[int, int]]]:
    for k in range(length):
        g = math.isqrt(length - k)
        if g > 0 and g * g == length - k and size % g == 0:
            return k, (g, g)
    return None


def find_trunk_output(model: nn.Module, input_size: int = 64, batch: int = 2) -> TrunkInfo:
    """Locate the trunk output of a torchvision classifier (see the module docstring).

    Runs ``model`` once in eval mode on a ``(batch, 3, input_size, input_size)`` dummy;
    the model's training mode is restored afterwards.
    """
    from torch.fx.passes.shape_prop import ShapeProp
    from torchvision.models import feature_extraction as fe

    was_training = model.training
    model.eval()
    try:
        tracer = fe.NodePathTracer(**fe._set_default_tracer_kwargs(None))
        graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph)
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros(batch, 3, input_size, input_size))
    finally:
        model.train(was_training)

    last4: Optional[Tuple[str, Tuple[int, ...]]] = None
    last3_after: Optional[Tuple[str, Tuple[int, ...]]] = None
    for node in gm.graph.nodes:
        qualname = tracer.node_to_qualname.get(node)
        if qualname is None:
            continue
        if _is_classifier_node(node, qualname, gm, batch):
            log.debug("trunk cut at node %s (%s)", qualname, node.target)
            break
        meta = node.meta.get("tensor_meta")
        shape = tuple(getattr(meta, "shape", ()))
        if not shape or shape[0] != batch:
            continue
        if len(shape) == 4:
            last4, last3_after = (qualname, shape), None
        elif len(shape) == 3:
            last3_after = (qualname, shape)
    if last3_after is not None:
        name, shape = last3_after
        found = _token_grid(shape[1], input_size)
        prefix, grid = found if found is not None else (0, None)
        return TrunkInfo(name, "NLC", shape, input_size, prefix, grid)
    if last4 is None:
        raise ValueError(
            f"{type(model).__name__}: no (N, C, H, W) or (N, L, C) tensor before the classifier; "
            f"cannot find a trunk output"
        )
    return TrunkInfo(last4[0], "NCHW", last4[1], input_size)


class GlobalAvgPool(nn.Module):
    """Mean over the spatial dims (``NCHW``) or the tokens (``NLC``) -> ``(N, C)``."""

    def __init__(self, layout: str):
        super().__init__()
        self.dims = (2, 3) if layout == "NCHW" else (1,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(self.dims)


class TokensToMap(nn.Module):
    """``(N, k + h*w, C)`` tokens -> ``(N, C, h, w)`` map of the patch tokens."""

    def __init__(self, prefix_tokens: int, grid: Tuple[int, int]):
        super().__init__()
        self.prefix_tokens = prefix_tokens
        self.grid = tuple(grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = x[:, self.prefix_tokens :]
        return patches.transpose(1, 2).reshape(x.shape[0], x.shape[2], self.grid[0], self.grid[1])


def _make_head(spec: TaskHeadSpec, channels: int, hidden: int, layout: str) -> nn.Module:
    if spec.kind == "dense":
        return nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(hidden, spec.out_dim, 1)
        )
    if spec.kind == "classify":
        return nn.Sequential(GlobalAvgPool(layout), nn.Linear(channels, spec.out_dim))
    return nn.Sequential(
        GlobalAvgPool(layout), nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, spec.out_dim)
    )


class MultiTaskTorchvision(nn.Module):
    """A torchvision trunk (``self.trunk``, a ``GraphModule`` returning
    ``{"features": tensor}``) shared by per-task heads (``self.heads``).

    ``forward(x)`` returns ``{task: Tensor}``: dense tasks ``(N, out_dim, H, W)``,
    classify/regress tasks ``(N, out_dim)``.
    """

    def __init__(
        self,
        trunk: nn.Module,
        info: TrunkInfo,
        tasks: Mapping[str, Union[TaskHeadSpec, Tuple[str, int], int]],
        head_width: int = 64,
    ):
        super().__init__()
        if not tasks:
            raise ValueError("tasks must hold at least one task, but got none")
        specs = {}
        for name, spec in tasks.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"task names must be Python identifiers, but got {name!r}")
            specs[name] = TaskHeadSpec.of(spec)
        self.task_specs: Dict[str, TaskHeadSpec] = specs
        self.info = info
        self.trunk = trunk
        needs_map = any(s.kind == "dense" for s in specs.values())
        self.to_map: Optional[nn.Module] = None
        if info.layout == "NLC" and needs_map:
            if info.grid is None:
                raise ValueError(
                    f"the trunk output {info.node} {info.shape} is a token sequence without a square "
                    f"patch grid, so it cannot feed a dense head; use 'classify' or 'regress' heads"
                )
            self.to_map = TokensToMap(info.prefix_tokens, info.grid)
        self.heads = nn.ModuleDict(
            {t: _make_head(s, info.channels, s.hidden or head_width, info.layout) for t, s in specs.items()}
        )

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.trunk(x)["features"]
        fmap = features if self.to_map is None else self.to_map(features)
        out = {}
        for task, head in self.heads.items():
            if self.task_specs[task].kind == "dense":
                out[task] = F.interpolate(head(fmap), size=x.shape[-2:], mode="bilinear", align_corners=False)
            else:
                out[task] = head(features)
        return out


def _dual_trunk_class():
    """torchvision's DualGraphModule, except that a deep copy keeps the training mode
    (torchvision's comes back in train mode whatever the source's mode). Built lazily
    so that importing this module does not need torchvision."""
    global _DUAL_TRUNK
    if _DUAL_TRUNK is None:
        from torchvision.models.feature_extraction import DualGraphModule

        class DualTrunk(DualGraphModule):
            def _deepcopy_init(self):
                return DualGraphModule.__init__

            def __deepcopy__(self, memo):
                res = super().__deepcopy__(memo)
                res.train(self.training)
                return res

        _DUAL_TRUNK = DualTrunk
    return _DUAL_TRUNK


_DUAL_TRUNK = None


def _single_graph_trunk(dual: fx.GraphModule, class_name: str) -> fx.GraphModule:
    """A plain GraphModule when the train and eval graphs are the same code, else a
    DualTrunk that swaps graphs on ``train()`` / ``eval()``."""
    train_src = dual.train_graph.python_code("self").src
    eval_src = dual.eval_graph.python_code("self").src
    if train_src == eval_src:
        return fx.GraphModule(dual, dual.eval_graph, class_name=class_name)
    log.info("%s: train and eval graphs differ; the trunk swaps graphs on train()/eval()", class_name)
    cls = _dual_trunk_class()
    trunk = cls.__new__(cls)
    # DualGraphModule.__init__ renames its class to class_name: keep the name stable.
    cls.__init__(trunk, dual, dual.train_graph, dual.eval_graph, class_name=cls.__name__)
    return trunk


def multitask_from_torchvision(
    name: Union[str, nn.Module],
    tasks: Mapping[str, Union[TaskHeadSpec, Tuple[str, int], int]],
    *,
    input_size: Optional[int] = None,
    head_width: int = 64,
    **model_kwargs,
) -> MultiTaskTorchvision:
    """Build torchvision model ``name`` (``weights=None``) and turn it into a multitask model.

    Args:
        name: a name of ``torchvision.models.list_models(module=torchvision.models)``,
            or a classifier module already built (e.g. a small ``VisionTransformer``);
            its modules are shared, not copied.
        tasks: task name -> :class:`TaskHeadSpec`, ``(kind, out_dim)`` or ``out_dim``
            (dense).
        input_size: side of the square dummy input used to find the trunk (default
            :func:`default_input_size`); conv trunks then accept any size, ViTs only
            their ``image_size``.
        head_width: hidden width of dense and regress heads.
        **model_kwargs: passed to ``torchvision.models.get_model`` (e.g. ``image_size=64``
            for a ViT).

    >>> import torch
    >>> m = multitask_from_torchvision("resnet18", {"seg": ("dense", 5), "cls": ("classify", 3)})
    >>> {k: tuple(v.shape) for k, v in m(torch.randn(2, 3, 64, 64)).items()}
    {'seg': (2, 5, 64, 64), 'cls': (2, 3)}
    >>> m.info.node, m.info.channels
    ('layer4.1.relu_1', 512)
    """
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    if isinstance(name, nn.Module):
        if model_kwargs:
            raise TypeError(f"model_kwargs are for building a model by name, but got a module and {sorted(model_kwargs)}")
        model, name = name, type(name).__name__
    else:
        model_kwargs.setdefault("weights", None)
        if name in ("inception_v3", "googlenet"):  # no auxiliary classifiers in the trunk
            model_kwargs.setdefault("aux_logits", False)
            model_kwargs.setdefault("init_weights", True)
        model = torchvision.models.get_model(name, **model_kwargs)
    size = input_size if input_size is not None else default_input_size(name, model)
    info = find_trunk_output(model, size)
    dual = create_feature_extractor(model, return_nodes={info.node: "features"}, suppress_diff_warning=True)
    trunk = _single_graph_trunk(dual, f"{name}_trunk")
    trunk.train(model.training)
    log.debug("%s: trunk ends at %s, %s %s", name, info.node, info.layout, info.shape)
    return MultiTaskTorchvision(trunk, info, tasks, head_width=head_width)
