"""apply() options from the environment, and the one-line messages for a bad value anywhere.

Precedence: explicit apply() arguments > environment > defaults. The variables (also listed by `moe-patch env`):

MOE_PATCH=1                       patch every model Transformers builds (see auto.py)
MOE_PATCH_DISABLE=router,linear   kinds to leave alone
MOE_PATCH_SKIP=lm_head,model.layers.0.*   module-path globs to leave alone
MOE_PATCH_BACKEND=auto|torch|te|liger     or per kind: loss=torch,experts=te
MOE_PATCH_QUIET=1                 auto-patching does not print its one line per patched model
MOE_PATCH_COMPILE=0               keep the small torch.compile'd helpers eager (ops/compiled.py)
MOE_PATCH_FP8_EXPERTS=1           under fp8="current" the experts' grouped GEMMs run FP8 too (opt-in: slower on H200)
MOE_PATCH_FUSED_MLA=0             DeepSeek-V3's MLA q/k/v assembly back on the family's code (on by default)
MOE_PATCH_FUSED_MLP=0             declared gated MLPs keep the family's silu(gate)*up (on by default: compiled)
MOE_PATCH_CUDNN_SINKS=1           sink attention's full layers (bf16/fp16) on cuDNN's attention (opt-in: see its note)
MOE_PATCH_TUNED_GEMM=1            the experts' grouped GEMMs on inductor's autotuned kernels (opt-in: ops/tuned_gemm.py)

Kind and backend names are read case-insensitively ("Loss=Torch" is "loss=torch": every canonical name is lower
case, so no two names meet); module-path globs (MOE_PATCH_SKIP, skip=) are matched as written.

This module imports neither torch nor Transformers: the start-up hook reads it in every Python process.
"""
from __future__ import annotations

import difflib
import os

from .errors import PatchError

KINDS = ("attention", "rmsnorm", "linear", "experts", "router", "loss", "mamba", "mlp")
# the kinds with a backend choice (mamba runs mamba-ssm's kernel or the family's scan, mlp the compiled product or
# the family's module: nothing to choose)
BACKEND_KINDS = tuple(k for k in KINDS if k not in ("mamba", "mlp"))
BACKENDS = ("auto", "torch", "te", "liger")
# Which kinds each backend implements today (backends.py chooses among these). torch implements every kind (for
# "linear" that means keeping nn.Linear, which already is cuBLAS on GPU). te: experts with TE's fused permute /
# unpermute, te.Linear (bf16 or FP8; "auto" takes it only under fp8=), te.RMSNorm and TE's fused router. liger:
# RMSNorm, the fused loss, and for attention its fused RoPE inside moe_patch's SDPA attention (where proven equal
# to the family's RoPE). A backend missing here for a kind is skipped by "auto" with a reason, and asked for by
# name it falls back to torch with that reason.
IMPLEMENTED = {
    "torch": frozenset(BACKEND_KINDS),
    "liger": frozenset({"rmsnorm", "loss", "attention"}),
    "te": frozenset({"experts", "linear", "rmsnorm", "router"}),
}
DEFAULTS = dict(attention=True, rmsnorm=True, linear=True, experts=True, router=True, loss=True, mamba=True, mlp=True,
                skip=(), backend="auto")
VARIABLES = {
    "MOE_PATCH": "1: patch every model Transformers builds in this process (the start-up hook)",
    "MOE_PATCH_DISABLE": f"comma-separated kinds to leave alone ({', '.join(KINDS)})",
    "MOE_PATCH_SKIP": "comma-separated module-path globs to leave alone (lm_head, model.layers.0.*)",
    "MOE_PATCH_BACKEND": f"{' | '.join(BACKENDS)}, or per kind ({', '.join(BACKEND_KINDS)}): loss=torch,experts=te",
    "MOE_PATCH_QUIET": "1: auto-patching prints nothing on success",
    "MOE_PATCH_COMPILE": "0: keep the small torch.compile'd helpers eager",
    "MOE_PATCH_EP": "expert-parallel size when auto-patching under torchrun",
    "MOE_PATCH_FP8_EXPERTS": "1: under fp8='current' the experts' GEMMs run FP8 too (measured slower on H200)",
    "MOE_PATCH_FUSED_MLA": "0: DeepSeek-V3's MLA q/k/v assembly stays the family's (default: compiled kernels)",
    "MOE_PATCH_FUSED_MLP": "0: gated MLPs declared in patches/ keep the family's silu(gate)*up (default: compiled kernels)",
    "MOE_PATCH_CUDNN_SINKS": "1: sink attention's full causal layers run cuDNN's attention (opt-in: q/k gradient error)",
    "MOE_PATCH_TUNED_GEMM": "1: the experts' grouped GEMMs on inductor's autotuned kernels (opt-in: minutes of tuning)",
}
TRUE = ("1", "true", "yes", "on")
FALSE = ("", "0", "false", "no", "off")


def did_you_mean(value, choices) -> str:
    """' (did you mean 'x'?)' for a close match among `choices` (difflib), else ''."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown(what: str, value, choices) -> str:
    """The one-line message for a bad value: names it, suggests a close match, lists the valid ones."""
    return f"unknown {what} {value!r}{did_you_mean(value, choices)}; valid: {', '.join(map(str, choices))}"


def flag(name: str, default: bool = False) -> bool:
    """A yes/no environment variable; anything but 1/true/yes/on or 0/false/no/off/empty is a PatchError."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise PatchError(f"{name}={raw!r} is not understood; valid: {', '.join(TRUE)} (on) or "
                     f"{', '.join(v for v in FALSE if v)} (off)")


def enabled() -> bool:
    """MOE_PATCH is on (raises PatchError for a value that is neither on nor off)."""
    return flag("MOE_PATCH")


def quiet() -> bool:
    return flag("MOE_PATCH_QUIET")


def _items(value: str) -> list[str]:
    """The comma-separated items of `value`, stripped; empty ones (a trailing comma, ", ,") are no item."""
    return [item.strip() for item in value.split(",") if item.strip()]


def _list(var: str) -> list[str]:
    return _items(os.environ.get(var, ""))


def parse_kinds(items, source: str) -> list[str]:
    """Kind names from a list (MOE_PATCH_DISABLE, --disable), in any case ("Loss" is "loss"): the first unknown
    one is an error."""
    out = []
    for item in items:
        if item.lower() not in KINDS:
            raise PatchError(f"{source}: " + unknown("kind", item, KINDS))
        out.append(item.lower())
    return out


def _disable() -> dict:
    return {kind: False for kind in parse_kinds(_list("MOE_PATCH_DISABLE"), "MOE_PATCH_DISABLE")}


def _skip() -> dict:
    skip = _list("MOE_PATCH_SKIP")
    return {"skip": tuple(skip)} if skip else {}


def _backend() -> dict:
    backend = os.environ.get("MOE_PATCH_BACKEND", "")
    return {"backend": parse_backend(backend)} if _items(backend) else {}


# the variables that set apply()'s options, each with the function reading it (PatchError on a bad value)
OPTION_VARIABLES = {"MOE_PATCH_DISABLE": _disable, "MOE_PATCH_SKIP": _skip, "MOE_PATCH_BACKEND": _backend}
# every variable read here, likewise (`moe-patch env` runs these to say whether a value set is accepted)
READERS = {"MOE_PATCH": enabled, "MOE_PATCH_QUIET": quiet,
           "MOE_PATCH_FP8_EXPERTS": lambda: flag("MOE_PATCH_FP8_EXPERTS"),
           "MOE_PATCH_FUSED_MLA": lambda: flag("MOE_PATCH_FUSED_MLA", default=True),
           "MOE_PATCH_FUSED_MLP": lambda: flag("MOE_PATCH_FUSED_MLP", default=True),
           "MOE_PATCH_CUDNN_SINKS": lambda: flag("MOE_PATCH_CUDNN_SINKS"),
           "MOE_PATCH_TUNED_GEMM": lambda: flag("MOE_PATCH_TUNED_GEMM"), **OPTION_VARIABLES}


# yes/no variables with no apply() argument, read where their replacement is planned
FEATURE_FLAGS = ("MOE_PATCH_FP8_EXPERTS", "MOE_PATCH_FUSED_MLA", "MOE_PATCH_FUSED_MLP", "MOE_PATCH_CUDNN_SINKS",
                 "MOE_PATCH_TUNED_GEMM")


def from_environment() -> dict:
    """Only the options the environment sets; unknown values (of those and of FEATURE_FLAGS) raise PatchError naming
    the variable."""
    out = {}
    for read in OPTION_VARIABLES.values():
        out.update(read())
    for name in FEATURE_FLAGS:
        READERS[name]()
    return out


def parse_backend(value, source: str = "MOE_PATCH_BACKEND"):
    """The backend option in its canonical form: one name for every kind ("te"), or {kind: name} (other kinds:
    auto). `value` is a string as MOE_PATCH_BACKEND takes it, "te" or per kind "loss=torch,experts=te" (empty
    items are ignored: "torch,", "loss=torch, "), or apply()'s dict {"loss": "torch"}. Names are read in any case
    ("Loss=Torch"). A bad value is a one-line PatchError naming `source`, the item, and the valid names."""
    if isinstance(value, dict):
        return _per_kind(((kind, name, f"{{{kind!r}: {name!r}}}") for kind, name in value.items()), source)
    if not isinstance(value, str):
        raise PatchError(f"{source} must be a backend name ({', '.join(BACKENDS)}), per kind as 'loss=torch,"
                         f"experts=te', or a dict kind -> name, got {value!r}")
    items = _items(value)
    if not any("=" in item for item in items):
        name = ",".join(items)  # one name ("torch,te" stays one bad value)
        if name.lower() not in BACKENDS:
            raise PatchError(f"{source}: " + unknown("backend", name, BACKENDS))
        return name.lower()
    pairs = []
    for item in items:
        kind, _, name = item.partition("=")
        pairs.append((kind.strip(), name.strip(), repr(item)))
    return _per_kind(pairs, source)


def _valid_for(kind: str) -> str:
    """'valid for loss: auto, torch, liger (te: no loss kernel, falls back to torch)'."""
    has = [b for b in BACKENDS if b == "auto" or kind in IMPLEMENTED[b]]
    lacks = [b for b in BACKENDS if b not in has]
    return f"valid for {kind}: {', '.join(has)}" + (f" ({', '.join(lacks)}: no {kind} kernel, falls back to torch)"
                                                    if lacks else "")


def _per_kind(pairs, source: str) -> dict:
    """{kind: backend} from (kind, name, the item as the user wrote it) triples, names lower-cased."""
    per_kind = {}
    for kind, name, item in pairs:
        if isinstance(kind, str) and kind.lower() in KINDS and kind.lower() not in BACKEND_KINDS:
            raise PatchError(f"{source}: in {item}, kind {kind.lower()!r} has no backend to choose (one kernel or the "
                             f"family's code); kinds with a backend: {', '.join(BACKEND_KINDS)}")
        if not (isinstance(kind, str) and kind.lower() in BACKEND_KINDS):
            raise PatchError(f"{source}: in {item}, " + unknown("kind", kind, BACKEND_KINDS))
        kind = kind.lower()
        if not (isinstance(name, str) and name.lower() in BACKENDS):
            raise PatchError(f"{source}: in {item}, unknown backend {name!r}{did_you_mean(name, BACKENDS)}; "
                             + _valid_for(kind))
        name = name.lower()
        if kind in per_kind and per_kind[kind] != name:
            raise PatchError(f"{source}: kind {kind!r} given two backends ({per_kind[kind]!r} and {name!r})")
        per_kind[kind] = name
    return per_kind


# the apply() options each variable sets: a variable is read only while one of them is left to it
OPTION_KEYS = {"MOE_PATCH_DISABLE": KINDS, "MOE_PATCH_SKIP": ("skip",), "MOE_PATCH_BACKEND": ("backend",)}


def resolve(explicit: dict) -> dict:
    """explicit: apply()'s arguments, None meaning 'not given'. The environment fills what is not given; a
    variable whose every option is given explicitly is not read (a bad value there cannot stop apply())."""
    given = {k for k, v in explicit.items() if v is not None}
    env = {}
    for name, read in OPTION_VARIABLES.items():
        if not set(OPTION_KEYS[name]) <= given:
            env.update(read())
    for name in FEATURE_FLAGS:  # read deep in the plan, for some families only: a bad value is refused here, for all
        READERS[name]()
    return {k: explicit[k] if k in given else env.get(k, DEFAULTS[k]) for k in DEFAULTS}


def in_force() -> list[tuple[str, str, str]]:
    """(name, value, note) for every MOE_PATCH* variable set here; an unknown name gets a close match."""
    rows = []
    for name in sorted(k for k in os.environ if k.startswith("MOE_PATCH")):
        note = "" if name in VARIABLES else "not a moe_patch variable: ignored" + did_you_mean(name, VARIABLES)
        rows.append((name, os.environ[name], note))
    return rows
