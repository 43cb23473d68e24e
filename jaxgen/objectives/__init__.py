"""Objectives: one module per family with host-side example creation and a pure loss.

Modules are imported on demand, so a family whose objective is missing or broken does not stop the
others.
"""

from __future__ import annotations

import importlib
from types import ModuleType

MODULES = {"bert": "mlm_nsp", "gpt": "causal_lm", "t5": "span_corruption"}


def get(family: str) -> ModuleType:
    """Objective module of a family: bert -> mlm_nsp, gpt -> causal_lm, t5 -> span_corruption."""
    if family not in MODULES:
        raise ValueError(f"unknown model family {family!r}; valid families are {sorted(MODULES)}")
    return importlib.import_module(f"{__name__}.{MODULES[family]}")
