"""Loads the declarative family files (patches/*.py, installed as moe_patch.patches)."""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from functools import lru_cache


@dataclass
class FamilyTables:
    model_types: dict = field(default_factory=dict)  # model_type -> family file
    rmsnorm: dict = field(default_factory=dict)
    router: dict = field(default_factory=dict)
    experts: dict = field(default_factory=dict)
    skip: dict = field(default_factory=dict)
    mamba: dict = field(default_factory=dict)  # Mamba2 mixer class -> its module-level chunk-scan function
    mla: dict = field(default_factory=dict)  # MLA attention class -> what the fused q/k/v assembly replaces
    mlp: dict = field(default_factory=dict)  # gated MLP class -> its activation (GatedMLP, ops/mlp.py)
    gated_rmsnorm: dict = field(default_factory=dict)  # gated norm class -> {"norm_before_gate": bool}


def _package():
    try:
        return importlib.import_module("moe_patch.patches")
    except ImportError:  # running from a source checkout without installing
        return importlib.import_module("patches")


@lru_cache(maxsize=1)
def tables() -> FamilyTables:
    pkg = _package()
    out = FamilyTables()
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for model_type in getattr(mod, "MODEL_TYPES", ()):
            out.model_types[model_type] = info.name
        for attr, table in (("RMSNORM", out.rmsnorm), ("ROUTER", out.router), ("EXPERTS", out.experts),
                            ("SKIP", out.skip), ("MAMBA", out.mamba), ("MLA", out.mla), ("MLP", out.mlp),
                            ("GATED_RMSNORM", out.gated_rmsnorm)):
            for cls_name, value in getattr(mod, attr, {}).items():
                if cls_name in table and table[cls_name] != value:
                    raise ValueError(f"{cls_name} declared twice with different values (patches/{info.name}.py)")
                table[cls_name] = value
    return out
