"""moe_patch: fast Mixture-of-Experts training for stock Hugging Face Transformers v5 models, in place.

    import moe_patch
    moe_patch.apply(model)            # same object back, patched
    print(moe_patch.report(model))    # what was replaced, by what, and why anything was not
    moe_patch.revert(model)           # the original modules back
"""
from .engine import apply, is_patched, plan_report, report, revert
from .errors import BackendUnavailableError, MeshError, PatchError, UnsupportedModelError

__version__ = "0.1.0"
__all__ = ["apply", "revert", "report", "is_patched", "plan_report", "PatchError", "BackendUnavailableError",
           "MeshError", "UnsupportedModelError", "__version__"]
