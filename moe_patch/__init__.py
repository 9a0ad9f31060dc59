"""moe_patch: fast Mixture-of-Experts training for stock Hugging Face Transformers v5 models, in place.

    import moe_patch
    moe_patch.apply(model)            # same object back, patched
    print(moe_patch.report(model))    # what was replaced, by what, and why anything was not
    moe_patch.revert(model)           # the original modules back

Attributes load lazily (PEP 562) so that the start-up bootstrap (moe_patch.auto) never imports torch.
"""
__version__ = "0.8.0"

_ENGINE = ("apply", "is_patched", "plan_report", "report", "revert")
_ERRORS = ("PatchError", "BackendUnavailableError", "MeshError", "UnsupportedModelError")
__all__ = [*_ENGINE, *_ERRORS, "__version__"]


def __getattr__(name):
    if name in _ENGINE:
        from . import engine

        return getattr(engine, name)
    if name in _ERRORS:
        from . import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'moe_patch' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
