"""Zero-code activation: `MOE_PATCH=1 python train.py` patches every model Transformers builds.

The package installs `moe_patch_auto.pth` into site-packages; Python runs its one line at start-up. With
MOE_PATCH unset that line costs one environment lookup and imports nothing. With it set, bootstrap()
registers a wrapt post-import hook on transformers.modeling_utils, so the wrappers land whether
Transformers is imported before or after this (as OpenTelemetry / ddtrace auto-instrumentation do):

  PreTrainedModel.from_pretrained / _from_config   patch the outermost model once its weights are loaded
  PreTrainedModel.post_init                         patch a model built directly (`Qwen3MoeForCausalLM(cfg)`)
                                                    when it is the outermost model under construction

Nothing here may break the host program: every failure becomes a logged warning and the model is returned
as Transformers built it. instrument() / uninstrument() do the same by hand.
"""
from __future__ import annotations

import logging
import sys
import threading

logger = logging.getLogger("moe_patch.auto")
_state = threading.local()
_installed = False
_TARGETS = ("PreTrainedModel.from_pretrained", "PreTrainedModel._from_config", "PreTrainedModel.post_init")


def _depth() -> int:
    return getattr(_state, "depth", 0)


def _patch(model):
    from .parallel import launch

    launch.check(model)  # MOE_PATCH_EP: a size that cannot work raises here (one line), before any change
    try:
        import moe_patch

        if not moe_patch.is_patched(model):
            launch.apply(model)  # moe_patch.apply(model), with the launcher's expert parallelism (MOE_PATCH_EP)
            logger.info("moe_patch: patched %s (%s)", type(model).__name__, moe_patch.report(model).summary())
    except Exception as exc:  # never break the host program
        logger.warning("moe_patch: left %s unpatched: %s: %s", type(model).__name__, type(exc).__name__, exc)
    return model


def _loader(wrapped, instance, args, kwargs):
    _state.depth = _depth() + 1
    try:
        result = wrapped(*args, **kwargs)
    finally:
        _state.depth = _depth() - 1
    if _depth() == 0:
        model = result[0] if isinstance(result, tuple) else result  # output_loading_info=True
        _patch(model)
    return result


def _outermost(model) -> bool:
    """False while `model` is being built inside another PreTrainedModel's __init__ (a sub-model)."""
    from transformers import PreTrainedModel

    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "__init__":
            owner = frame.f_locals.get("self")
            if owner is not model and isinstance(owner, PreTrainedModel):
                return False
        frame = frame.f_back
    return True


def _post_init(wrapped, instance, args, kwargs):
    result = wrapped(*args, **kwargs)
    if _depth() == 0 and _outermost(instance):
        _patch(instance)
    return result


def _install(module) -> None:
    global _installed
    if _installed:
        return
    import wrapt

    try:
        for target, wrapper in zip(_TARGETS, (_loader, _loader, _post_init)):
            wrapt.wrap_function_wrapper(module, target, wrapper)
        _installed = True
    except Exception as exc:
        logger.warning("moe_patch: could not hook Transformers (%s: %s); models will not be auto-patched",
                       type(exc).__name__, exc)


def instrument() -> None:
    """Hook Transformers now if it is imported, else as soon as it is."""
    import wrapt

    wrapt.register_post_import_hook(_install, "transformers.modeling_utils")


def uninstrument() -> None:
    global _installed
    if not _installed:
        return
    from transformers import modeling_utils

    cls = modeling_utils.PreTrainedModel
    for target in _TARGETS:
        name = target.split(".")[1]
        wrapper = cls.__dict__[name]
        cls_attr = getattr(wrapper, "__wrapped__", None)
        if cls_attr is not None:
            setattr(cls, name, cls_attr)
    _installed = False


def bootstrap() -> None:
    """Called by moe_patch_auto.pth at interpreter start-up when MOE_PATCH is set."""
    try:
        from . import config

        if config.enabled():
            config.from_environment()  # bad values: say so once, at start-up
            instrument()
    except Exception as exc:
        logger.warning("moe_patch: auto-patch disabled: %s: %s", type(exc).__name__, exc)
