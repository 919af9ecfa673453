"""Rules for torchvision's fx-wrapped functions (registered only if torchvision imports).

    stochastic_depth(x, p, mode, training)   # drops whole samples (or the batch): every
                                             # channel kept, like dropout
"""
from __future__ import annotations

from . import register_channel_rule
from .elementwise import first_operand

try:  # torchvision is optional for the library
    from torchvision.ops import stochastic_depth as _stochastic_depth
except Exception:  # noqa: BLE001 - any import problem means: no torchvision rules
    _stochastic_depth = None

if _stochastic_depth is not None:
    register_channel_rule(_stochastic_depth)(first_operand)
