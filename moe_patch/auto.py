"""Zero-code activation: `MOE_PATCH=1 python train.py` patches every model Transformers builds.

The package installs `moe_patch_auto.pth` into site-packages; Python runs its one line at start-up. With
MOE_PATCH unset that line costs one environment lookup and imports nothing. With it set, bootstrap()
registers a wrapt post-import hook on transformers.modeling_utils, so the wrappers land whether
Transformers is imported before or after this (as OpenTelemetry / ddtrace auto-instrumentation do):

  PreTrainedModel.from_pretrained / _from_config   patch the outermost model once its weights are loaded
  PreTrainedModel.post_init                         patch a model built directly (`Qwen3MoeForCausalLM(cfg)`)
                                                    when it is the outermost model under construction

Every model patched here is said once on stderr, one line (MOE_PATCH_QUIET=1 silences it). Nothing here may
break the host program: every failure becomes a logged warning and the model is returned as Transformers
built it. instrument() / uninstrument() do the same by hand. bootstrap() runs once per process even where
site-packages is read twice (a .pth file can be executed twice in some virtual environments).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import threading

logger = logging.getLogger("moe_patch.auto")
_state = threading.local()
_installed = False
_bootstrapped = False
_outcome = ""  # what the start-up hook decided in this process (moe-patch env says it)
PTH = "moe_patch_auto.pth"
_TARGETS = ("PreTrainedModel.from_pretrained", "PreTrainedModel._from_config", "PreTrainedModel.post_init")


def _depth() -> int:
    return getattr(_state, "depth", 0)


def say(message: str) -> None:
    """One line on stderr unless MOE_PATCH_QUIET=1 (an unreadable MOE_PATCH_QUIET was reported at start-up)."""
    from . import config

    try:
        if config.quiet():
            return
    except Exception:
        pass
    print(message, file=sys.stderr, flush=True)


def patch_built_model(model) -> None:
    """The one place where a model Transformers has just built is handed to moe_patch (options from the
    MOE_PATCH_* variables), with the launcher's expert parallelism where MOE_PATCH_EP asks for it."""
    from . import engine
    from .parallel import launch

    launch.apply(model)
    getattr(model, engine.RECORD).auto = True  # an explicit apply() later may re-plan it (explicit wins)


@contextlib.contextmanager
def suspended():
    """Models built inside are not patched: moe_patch's own throw-away instances (the fused loss's proof
    builds one of the model's class, which would otherwise be patched, and prove again, without end)."""
    _state.depth = _depth() + 1
    try:
        yield
    finally:
        _state.depth = _depth() - 1


def _patch(model):
    from .parallel import launch

    try:
        launch.check(model)  # MOE_PATCH_EP: a size that cannot work stops here, before any change
    except Exception as exc:  # the user's launch setting: one line and exit status 2, not a traceback per rank
        print(f"moe_patch: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    try:
        import moe_patch

        if not moe_patch.is_patched(model):
            patch_built_model(model)
            say(f"moe_patch: patched {type(model).__name__} ({moe_patch.report(model).summary()}) "
                "[MOE_PATCH=1; moe_patch.report(model) has the details, MOE_PATCH_QUIET=1 silences this]")
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
    """Called by moe_patch_auto.pth at interpreter start-up when MOE_PATCH is set; once per process."""
    global _bootstrapped, _outcome
    if _bootstrapped:
        return
    _bootstrapped = True
    try:
        from . import config
        from .errors import PatchError

        for name, _, note in config.in_force():
            if note:
                logger.warning("moe_patch: %s: %s", name, note)
        try:
            if not config.enabled():
                _outcome = "auto-patch off (MOE_PATCH is off)"
                return
            config.quiet()
            config.from_environment()  # bad values: say so once, at start-up
        except PatchError as exc:
            _outcome = f"auto-patch is OFF: {str(exc).splitlines()[0]}"
            logger.warning("moe_patch: auto-patch is off: %s", exc)
            return
        instrument()
        _outcome = "models are patched as Transformers builds them"
    except Exception as exc:  # never break the host program
        _outcome = f"auto-patch is OFF: {type(exc).__name__}: {exc}"
        logger.warning("moe_patch: auto-patch is off: %s: %s", type(exc).__name__, exc)


def hook_files() -> list[str]:
    """The start-up hook files Python will read at start-up (site-packages, user site), in that order."""
    import os
    import site

    dirs = list(getattr(site, "getsitepackages", lambda: [])())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [os.path.join(d, PTH) for d in dict.fromkeys(dirs) if os.path.isfile(os.path.join(d, PTH))]


def hook_state() -> str:
    """One line for `moe-patch env`: where the start-up hook is, whether it ran here, how to get it."""
    import os
    import sysconfig

    from . import config

    files = hook_files()
    on = os.environ.get("MOE_PATCH", "").strip().lower() not in config.FALSE
    ran = f"ran in this process: {_outcome}" if _bootstrapped else "MOE_PATCH is off" if not on else \
        "did NOT run in this process"
    if files:
        return f"installed ({', '.join(files)}); {ran}"
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), PTH)
    return (f"NOT installed: MOE_PATCH=1 does nothing in this environment; reinstall (pip install . or, with "
            f"setuptools>=64, pip install -e .) or copy it: cp {source} {sysconfig.get_paths()['purelib']}/")
