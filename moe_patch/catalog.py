"""The MoE families of the installed Transformers, found in its sources (nothing hard-coded, so a new release is
picked up by itself): the model packages with a modeling file whose configuration declares experts.

`moe-patch report` lists their model types where it is given an unknown one; tests/matrix.py builds each of them
tiny and checks it patched against stock (with the packages whose experts are decorated with
`@use_experts_implementation`, which it finds in the modeling files).
"""
from __future__ import annotations

import glob
import os
import re
from functools import lru_cache

# a configuration attribute that counts experts or experts per token
EXPERT_COUNT = re.compile(r"\b(num_experts|num_local_experts|n_routed_experts|moe_num_experts|num_experts_per_tok)\b")


def models_dir() -> str:
    """transformers/models of the installed Transformers."""
    import transformers

    return os.path.join(os.path.dirname(transformers.__file__), "models")


@lru_cache(maxsize=1)
def moe_packages() -> tuple[str, ...]:
    """Model packages (folder names: "nllb_moe") with a modeling file and experts in their configuration, sorted."""
    out = []
    for pkg_dir in sorted(glob.glob(os.path.join(models_dir(), "*"))):
        if not glob.glob(os.path.join(pkg_dir, "modeling_*.py")):
            continue
        text = "".join(open(p, encoding="utf-8").read() for p in glob.glob(os.path.join(pkg_dir, "configuration_*.py")))
        if EXPERT_COUNT.search(text):
            out.append(os.path.basename(pkg_dir))
    return tuple(out)


def model_types(pkg: str) -> list[str]:
    """Every model type of a model package ("nllb_moe" -> ["nllb-moe"]; "llama4" -> its text and vision types too)."""
    from transformers.models.auto import configuration_auto as ca

    return [mt for mt in ca.CONFIG_MAPPING_NAMES if ca.model_type_to_module_name(mt) == pkg]


@lru_cache(maxsize=1)
def moe_model_types() -> tuple[str, ...]:
    """One model type per MoE package, as `moe-patch report` takes it: the package's own name where that is a model
    type, else its shortest one ("nllb-moe", "llama4", "qwen3_omni_moe")."""
    out = []
    for pkg in moe_packages():
        types = sorted(model_types(pkg), key=lambda t: (t != pkg, len(t), t))
        if types:
            out.append(types[0])
    return tuple(out)
