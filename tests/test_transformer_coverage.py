"""Every torchvision vision transformer, as a 3-task model, compresses and slims exactly.

The models: every ``vit_*``, ``swin_t/s/b``, ``swin_v2_t/s/b`` and ``maxvit_t``
(``weights=None``, the smallest input each accepts: 224 for ViTs and MaxViT, whose
sizes are fixed, 64 for Swin), wrapped as in the CNN sweep
(tests/test_torchvision_coverage.py): the trunk's tokens or feature map feed a dense
head, a pooled classification head and a regression MLP. For each model and each
attention policy ("heads": whole heads; "head_dims": per-head dimensions):

- ``dfx.compress`` at 50% channel sparsity (DiSparse, snip, one batch, each task's own
  loss) -> ``dfx.slim`` (which checks parity with the masked model in code) ->
  parameters down by at least 30%, every task output shape unchanged;
- the lower layer alone with a random 50% keep per group (slim parity inside);
- the slim model exports to ONNX and matches onnxruntime (``dfx.export_onnx`` raises
  on a mismatch).

The default run checks four quick models; the full sweep is marked ``long``
(``make test-all``). A model that fails would be listed in ``KNOWN_FAILURES`` as a
strict xfail with its reason; there are none. ``vit_h_14`` (632M parameters) peaks at
21.8 GB: it runs only where the machine has 64 GB (two test workers side by side).
"""
from __future__ import annotations

import pytest
import torchvision
from torchvision.models import list_models

from .test_torchvision_coverage import _enough_memory, check_compress_slims, check_onnx_parity, check_slims

TRANSFORMERS = [n for n in list_models(module=torchvision.models) if n.startswith(("vit_", "swin", "maxvit"))]
QUICK = ["swin_t", "swin_v2_t", "maxvit_t", "vit_b_32"]
POLICIES = ("heads", "head_dims")

#: model name -> reason, for models that do not pass (strict xfail).
KNOWN_FAILURES: dict = {}

#: models too large for this machine: name -> reason
TOO_LARGE = {"vit_h_14": "632M parameters: compress + slim peak at 21.8 GB resident (measured alone on a 24 GB "
                         "machine: heads policy, 52.4% fewer parameters, parity held, 97 s); two test workers "
                         "side by side need a machine with 64 GB"}


def _param(name: str, policy: str):
    marks = []
    if name in TOO_LARGE:
        marks.append(pytest.mark.skipif(not _enough_memory(64), reason=TOO_LARGE[name]))
    if name in KNOWN_FAILURES:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[name]))
    return pytest.param(name, policy, marks=marks, id=f"{name}-{policy}")


QUICK_CASES = [_param(n, p) for n in QUICK for p in POLICIES]
LONG_CASES = [_param(n, p) for n in TRANSFORMERS if n not in QUICK for p in POLICIES]


def test_the_sweep_covers_every_transformer():
    assert sorted(TRANSFORMERS) == sorted(["vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14", "swin_t",
                                           "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b", "maxvit_t"])


@pytest.mark.parametrize("name,policy", QUICK_CASES)
def test_quick_transformers_compress_and_slim(name, policy, record_property):
    reduction, sparsity = check_compress_slims(name, attention=policy)
    record_property("param_reduction", f"{reduction:.4f}")
    record_property("plan_sparsity", f"{sparsity:.4f}")


@pytest.mark.parametrize("name,policy", QUICK_CASES)
def test_quick_transformers_slim_exactly(name, policy):
    check_slims(name, attention=policy)


@pytest.mark.parametrize("name,policy", [_param(n, p) for n in QUICK[:2] for p in POLICIES])
def test_quick_transformer_slim_models_export_to_onnx(name, policy, tmp_path):
    check_onnx_parity(name, tmp_path, attention=policy)


@pytest.mark.long
@pytest.mark.parametrize("name,policy", LONG_CASES)
def test_every_transformer_compresses_and_slims(name, policy, record_property):
    reduction, sparsity = check_compress_slims(name, attention=policy)
    record_property("param_reduction", f"{reduction:.4f}")
    record_property("plan_sparsity", f"{sparsity:.4f}")


@pytest.mark.long
@pytest.mark.parametrize("name,policy", LONG_CASES)
def test_every_transformer_slims_exactly(name, policy):
    check_slims(name, attention=policy)


@pytest.mark.long
@pytest.mark.parametrize("name,policy", [_param(n, p) for n in TRANSFORMERS if n not in QUICK[:2] for p in POLICIES])
def test_every_transformer_slim_model_exports_to_onnx(name, policy, tmp_path):
    check_onnx_parity(name, tmp_path, attention=policy)
