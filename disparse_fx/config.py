"""CompressConfig: the one frozen, validated configuration of :func:`compress`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .errors import DisparseValueError

__all__ = ["CompressConfig", "CRITERIA", "GRANULARITIES", "ATTENTION", "BUDGETS", "SCORE_DTYPES",
           "DEFAULT_NUM_BATCHES", "default_prunable", "default_round_to"]

CRITERIA = ("snip", "taylor", "magnitude", "random")
GRANULARITIES = ("element", "channel")
ATTENTION = ("heads", "head_dims")
BUDGETS = ("params", "flops", "latency")
#: How the per-task scores are stored while they accumulate (CompressConfig.score_dtype).
SCORE_DTYPES = ("float32", "bfloat16")
#: Batches importance reads when CompressConfig.num_batches is None (the paper's setup
#: scores on 50 batches: docs/method.md).
DEFAULT_NUM_BATCHES = 50


def default_round_to(device: torch.device, dtype: torch.dtype, budget: str = "params") -> int:
    """The channel alignment when ``round_to`` is None: 8 on CUDA (tensor-core GEMMs want
    multiples of 8 in 16-bit types; cuDNN/cuBLAS pick their fast kernels for them), 8 for
    16-bit weights and for a FLOPs or latency budget anywhere (those users buy speed, and
    oneDNN / onnxruntime block channels by 8 on AVX2 and 16 on AVX-512: odd widths ran the
    demo's slim model slower than its dense one in onnxruntime), else 1 (a parameter
    budget is exact at any width)."""
    if torch.device(device).type == "cuda" or dtype in (torch.float16, torch.bfloat16) or budget != "params":
        return 8
    return 1

# Module types whose ``weight`` is prunable by default (method.md: conv/linear only).
_PRUNABLE_MODULES = (
    torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
    torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d,
    torch.nn.Linear,
)


def default_prunable(module: Optional[torch.nn.Module], param_name: str) -> bool:
    """Default rule: weights of Conv/ConvTranspose/Linear modules.

    ``module`` is the module that holds the parameter, or None for a parameter read
    directly by the graph (a functional conv/linear weight through get_attr); the latter
    is prunable when it has at least 2 dimensions (a matrix or a conv kernel).
    """
    leaf = param_name.rpartition(".")[2]
    if module is None:
        return leaf != "bias"
    return isinstance(module, _PRUNABLE_MODULES) and leaf == "weight"


@dataclass(frozen=True)
class CompressConfig:
    """How to compress.

    sparsity: fraction of prunable parameters removed, in [0, 1).
    criterion: "snip" (|g*w|, at initialisation), "taylor" (w^2 * sum|g|, trained
        models), "magnitude" (|w|, data-free) or "random" (seeded baseline).
    disentangle: True = DiSparse (per-task scores, unanimous decision); False = one
        global score on the summed loss (the baseline users compare against).
    granularity: "element" or "channel".
    num_batches: batches used to estimate importance (snip / taylor). None (the
        default): up to :data:`DEFAULT_NUM_BATCHES` (50), or every batch the data has if
        it has fewer - a first experiment on a handful of batches just works. An int:
        exactly that many; data with fewer raises NotEnoughBatchesError (unless
        allow_fewer_batches).
    seed: seeds the random criterion and tie-breaking; same seed -> same masks.
    min_layer_density: floor on each prunable parameter's kept fraction (at least one
        element is always kept), so no layer is pruned to zero.
    allow_fewer_batches: use whatever the data yields when it has fewer than
        num_batches batches, instead of raising NotEnoughBatchesError.
    filter_fn: ``filter_fn(name, param) -> bool`` overrides which parameters are
        prunable (default: Conv/ConvTranspose/Linear weights and functional weights).
    progress: show a tqdm bar over batches (only when stderr is a terminal).
    round_to: channel granularity only; kept channel counts are multiples of it (capped at
        the group size). None (the default) follows the model's device and dtype and the
        budget (:func:`default_round_to`: 8 on CUDA, for 16-bit weights and for a FLOPs or
        latency budget, else 1).
    budget: channel granularity only; what ``sparsity`` counts: "params" (the fraction
        of prunable parameters removed after slimming; the default), "flops" (the
        fraction of the model's FLOPs per sample at the example input's shape removed, as
        passes.flops counts them) or "latency" (the fraction of the forward time at the
        example batch size and dtype on the model's device removed, from a per-layer
        latency table measured once and cached on disk; see disparse_fx.latency_model). With
        "flops" and "latency" each task ranks its channels by importance per unit of
        FLOPs or time saved (disparse_fx.channel_decision).
    best_effort: when the target cannot be reached (channels pinned by the graph hold
        too much of the budget), return the most that can be removed with a warning
        instead of raising TargetUnreachableError.
    latency_time_limit_s: the most seconds the latency table may spend measuring (layers
        not measured by then are scaled by their FLOPs; the plan says so).
    attention: channel granularity only; what a channel of an attention block is:
        "heads" (a whole head, removed only if every task reaching it votes so; the
        head count shrinks) or "head_dims" (one position of the per-head width, in
        every head at once; the heads stay, each gets narrower).
    score_dtype: how each task's scores are stored while they accumulate over the
        batches: "float32" (the default; exact sums) or "bfloat16" (half the memory: T
        score tensors of 2 bytes per prunable element instead of 4, the largest term of
        compress's peak memory on a big trunk with several tasks; each batch's
        contribution is computed in float32 and the running sum rounded to bfloat16, a
        relative error of at most 2**-9 per batch, far below the batch-to-batch spread
        of the estimate itself; masks can differ from float32's among elements whose
        scores lie within that error of the threshold). ``Plan.task_scores`` then holds
        bfloat16 tensors.
    """

    sparsity: float = 0.9
    criterion: str = "snip"
    disentangle: bool = True
    granularity: str = "element"
    num_batches: Optional[int] = None
    seed: int = 0
    min_layer_density: float = 0.01
    allow_fewer_batches: bool = False
    filter_fn: Optional[Callable[[str, torch.nn.Parameter], bool]] = None
    progress: bool = True
    round_to: Optional[int] = None
    attention: str = "heads"
    budget: str = "params"
    best_effort: bool = False
    latency_time_limit_s: float = 120.0
    score_dtype: str = "float32"

    def __post_init__(self):
        def bad(field, must, got):
            raise DisparseValueError(f"CompressConfig.{field} must be {must}, got {got!r}")

        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                or not 0.0 <= float(self.sparsity) < 1.0:
            bad("sparsity", "a number in [0, 1)", self.sparsity)
        if self.criterion not in CRITERIA:
            bad("criterion", f"one of {CRITERIA}", self.criterion)
        if not isinstance(self.disentangle, bool):
            bad("disentangle", "True or False", self.disentangle)
        if self.granularity not in GRANULARITIES:
            bad("granularity", f"one of {GRANULARITIES}", self.granularity)
        if self.num_batches is not None and (isinstance(self.num_batches, bool) or not isinstance(
                self.num_batches, int) or self.num_batches < 1):
            bad("num_batches", "an integer >= 1 or None (up to 50)", self.num_batches)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            bad("seed", "an integer", self.seed)
        if not isinstance(self.min_layer_density, (int, float)) or not 0.0 <= self.min_layer_density <= 1.0:
            bad("min_layer_density", "a number in [0, 1]", self.min_layer_density)
        if self.min_layer_density > 1.0 - self.sparsity:
            raise DisparseValueError(
                f"CompressConfig(sparsity={self.sparsity:g}) keeps {1.0 - self.sparsity:g} of the weights, less than "
                f"the floor every layer keeps, min_layer_density={self.min_layer_density:g}"
                f"{' (the default)' if self.min_layer_density == 0.01 else ''}: lower min_layer_density to at most "
                f"{1.0 - self.sparsity:g} (e.g. CompressConfig(sparsity={self.sparsity:g}, min_layer_density=0)), or "
                "lower the sparsity")
        if self.filter_fn is not None and not callable(self.filter_fn):
            bad("filter_fn", "None or a callable (name, param) -> bool", self.filter_fn)
        if self.round_to is not None and (isinstance(self.round_to, bool) or not isinstance(self.round_to, int)
                                          or self.round_to < 1):
            bad("round_to", "None (follow the device) or an integer >= 1", self.round_to)
        if self.budget not in BUDGETS:
            bad("budget", f"one of {BUDGETS}", self.budget)
        if self.budget != "params" and self.granularity != "channel":
            bad("budget", f"'params' with granularity={self.granularity!r} (FLOPs and latency budgets "
                "remove whole channels: use granularity='channel')", self.budget)
        if not isinstance(self.best_effort, bool):
            bad("best_effort", "True or False", self.best_effort)
        if isinstance(self.latency_time_limit_s, bool) or not isinstance(self.latency_time_limit_s, (int, float)) \
                or not self.latency_time_limit_s > 0:
            bad("latency_time_limit_s", "a number of seconds > 0", self.latency_time_limit_s)
        if self.attention not in ATTENTION:
            bad("attention", f"one of {ATTENTION}", self.attention)
        if self.score_dtype not in SCORE_DTYPES:
            bad("score_dtype", f"one of {SCORE_DTYPES}", self.score_dtype)

    @property
    def batch_limit(self) -> int:
        """The most batches importance reads: num_batches, or DEFAULT_NUM_BATCHES for None."""
        return DEFAULT_NUM_BATCHES if self.num_batches is None else self.num_batches

    @property
    def score_torch_dtype(self) -> torch.dtype:
        """score_dtype as a torch dtype."""
        return getattr(torch, self.score_dtype)

    @property
    def needs_data(self) -> bool:
        """Whether the criterion reads gradients (snip, taylor) rather than weights only."""
        return self.criterion in ("snip", "taylor")
