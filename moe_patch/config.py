"""apply() options from the environment. Precedence: explicit apply() arguments > environment > defaults.

MOE_PATCH=1                       patch every model Transformers builds (see auto.py)
MOE_PATCH_DISABLE=router,linear   kinds to leave alone
MOE_PATCH_SKIP=lm_head,model.layers.0.*   module-path globs to leave alone
MOE_PATCH_BACKEND=auto|torch|te|liger
"""
from __future__ import annotations

import os

from .errors import PatchError

KINDS = ("attention", "rmsnorm", "linear", "experts", "router", "loss")
BACKENDS = ("auto", "torch", "te", "liger")
DEFAULTS = dict(attention=True, rmsnorm=True, linear=True, experts=True, router=True, loss=True, skip=(),
                backend="auto")


def _list(var: str) -> list[str]:
    return [item.strip() for item in os.environ.get(var, "").split(",") if item.strip()]


def from_environment() -> dict:
    """Only the options the environment sets; unknown values raise PatchError naming the variable."""
    out = {}
    disabled = _list("MOE_PATCH_DISABLE")
    unknown = [k for k in disabled if k not in KINDS]
    if unknown:
        raise PatchError(f"MOE_PATCH_DISABLE: unknown kind(s) {unknown}; expected a comma-separated subset of {KINDS}")
    for kind in disabled:
        out[kind] = False
    skip = _list("MOE_PATCH_SKIP")
    if skip:
        out["skip"] = tuple(skip)
    backend = os.environ.get("MOE_PATCH_BACKEND", "").strip()
    if backend:
        out["backend"] = parse_backend(backend)
    return out


def parse_backend(value: str, source: str = "MOE_PATCH_BACKEND"):
    """"te" for every kind, or per kind: "loss=torch,experts=te" (other kinds: auto). Errors name `source`."""
    if "=" not in value:
        if value not in BACKENDS:
            raise PatchError(f"{source}: unknown backend {value!r}; expected one of {BACKENDS}")
        return value
    per_kind = {}
    for item in value.split(","):
        kind, _, name = item.partition("=")
        kind, name = kind.strip(), name.strip()
        if kind not in KINDS or name not in BACKENDS:
            raise PatchError(f"{source}: bad entry {item!r}; expected kind=backend with kind in {KINDS} "
                             f"and backend in {BACKENDS}")
        per_kind[kind] = name
    return per_kind


def resolve(explicit: dict) -> dict:
    """explicit: apply()'s arguments, None meaning 'not given'."""
    env = from_environment()
    return {k: explicit[k] if explicit.get(k) is not None else env.get(k, DEFAULTS[k]) for k in DEFAULTS}


def enabled() -> bool:
    return os.environ.get("MOE_PATCH", "").strip().lower() not in ("", "0", "false", "no", "off")
