"""What this machine offers, and which backend each kind gets.

Order of preference under backend="auto": te > liger > torch. A backend is only a candidate for a kind
if it has an implementation for that kind (see IMPLEMENTED); anything skipped on the way down the list
is recorded as a reason so that report() can say why the faster one was not used.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache

import torch

from . import config
from .errors import BackendUnavailableError, PatchError
from .ops import compiled

BACKENDS = ("auto", "torch", "te", "liger")
KINDS = config.BACKEND_KINDS

# Which kinds each backend implements today. torch implements every kind (for "linear" that means
# keeping nn.Linear, which already is cuBLAS on GPU). te: experts with TE's fused permute / unpermute,
# te.Linear (bf16 or FP8; "auto" takes it only under fp8=), te.RMSNorm and TE's fused router. liger:
# RMSNorm, the fused loss, and for attention its fused RoPE inside moe_patch's SDPA attention (where proven
# equal to the family's RoPE). A backend missing here for a kind is skipped by "auto" with a reason, and is
# an error when asked for by name.
IMPLEMENTED = {
    "torch": frozenset(KINDS),
    "liger": frozenset({"rmsnorm", "loss", "attention"}),
    "te": frozenset({"experts", "linear", "rmsnorm", "router"}),
}
# "auto" tries these in order (those implementing the kind); measured on H200 (CHANGELOG.md): TE's fused
# permute beats torch's sort for experts; moe_patch's chunked loss (few large chunks) beats Liger's (many
# small ones) at 150k-200k vocabularies, within the memory aim; torch's RMSNorm (the family's formula,
# torch.compile'd on GPU) takes about half the GPU time of Liger's or TE's at the Qwen3-30B-A3B shapes and
# is 2% faster end to end (ops/rmsnorm.py, CHANGELOG 0.5.0).
PREFERENCE = {kind: ("te", "liger", "torch") for kind in KINDS}
PREFERENCE["rmsnorm"] = ("torch", "liger", "te")
PREFERENCE["loss"] = ("torch", "liger")


def preference(kind: str) -> tuple[str, ...]:
    if kind == "rmsnorm" and not compiled.enabled():  # uncompiled, torch's GPU RMSNorm is the slowest
        return ("liger", "te", "torch")
    return PREFERENCE[kind]


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class Capabilities:
    cuda: bool
    device_name: str
    compute_capability: tuple[int, int] | None
    torch_version: str
    transformers_version: str
    grouped_mm: bool
    te: bool
    liger: bool
    deep_ep: bool
    mamba_ssm: bool = False  # mamba-ssm's Triton kernels (ops/mamba_ssd.py; kind mamba, gated norms)

    def rows(self):
        return [
            ("torch", self.torch_version),
            ("transformers", self.transformers_version),
            ("cuda", f"{self.cuda} ({self.device_name}, sm{''.join(map(str, self.compute_capability))})"
             if self.cuda and self.compute_capability else str(self.cuda)),
            ("grouped_mm", str(self.grouped_mm)),
            ("transformer_engine", str(self.te)),
            ("liger_kernel", str(self.liger)),
            ("deep_ep", str(self.deep_ep)),
            ("mamba_ssm", str(self.mamba_ssm)),
        ]

    def __str__(self):
        width = max(len(k) for k, _ in self.rows())
        return "\n".join(f"{k:<{width}}  {v}" for k, v in self.rows())


@lru_cache(maxsize=1)
def capabilities() -> Capabilities:
    import transformers

    cuda = torch.cuda.is_available()
    cc = torch.cuda.get_device_capability(0) if cuda else None
    return Capabilities(
        cuda=cuda,
        device_name=torch.cuda.get_device_name(0) if cuda else "cpu",
        compute_capability=cc,
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        grouped_mm=hasattr(torch.nn.functional, "grouped_mm"),
        # find_spec only: importing TE / DeepEP is slow and may fail loudly; they are imported lazily on use.
        te=_has_module("transformer_engine"),
        liger=_has_module("liger_kernel"),
        deep_ep=_has_module("deep_ep"),
        mamba_ssm=_has_module("mamba_ssm"),
    )


def unavailable(backend: str, device: torch.device, caps: Capabilities | None = None) -> str | None:
    """None if `backend` can run on `device` here, else the reason why not (package, GPU). `caps`: another
    machine's capabilities (`moe-patch report --device cuda --with te` previews a GPU from a CPU machine)."""
    caps = caps or capabilities()
    if backend == "torch":
        return None
    if backend == "te" and not caps.te:
        return "transformer_engine is not installed (pip install 'moe_patch[te]')"
    if backend == "liger" and not caps.liger:
        return "liger_kernel is not installed (pip install 'moe_patch[liger]')"
    if device.type != "cuda":
        return f"{backend} needs a CUDA device (module is on {device.type})"
    return None


def check_backend_name(backend) -> None:
    """backend: one name for every kind, or {kind: name} (kinds left out get "auto")."""
    if isinstance(backend, dict):
        for kind in backend:
            if kind not in KINDS:
                raise PatchError("backend dict: " + config.unknown("kind", kind, KINDS))
        for name in backend.values():
            check_backend_name(name)
        return
    if backend not in BACKENDS:
        raise PatchError(f"backend must be one of {BACKENDS} (or a dict kind -> backend), got {backend!r}"
                         + config.did_you_mean(backend, BACKENDS))


def for_kind(backend, kind: str) -> str:
    return backend.get(kind, "auto") if isinstance(backend, dict) else backend


def choose(backend: str, kind: str, device: torch.device, caps: Capabilities | None = None) -> tuple[str, str]:
    """Pick the backend for one module. Returns (backend, reason); reason is '' when nothing fell back.

    Asked by name, a backend that cannot run here at all raises BackendUnavailableError; a kind it has
    no implementation for falls back to torch with the reason. Under "auto", every faster backend
    passed over is named in the reason.
    """
    if backend != "auto":
        why = unavailable(backend, device, caps)
        if why is not None:
            raise BackendUnavailableError(f"backend={backend!r} cannot be used: {why}")
        if kind not in IMPLEMENTED[backend]:
            return "torch", f"{backend} has no {kind} implementation in moe_patch yet"
        return backend, ""
    passed_over = []
    for candidate in preference(kind):
        if kind not in IMPLEMENTED[candidate]:
            continue
        if candidate != "torch" and device.type != "cuda":
            continue  # GPU-only backends are not candidates for a CPU module: nothing fell back
        why = unavailable(candidate, device, caps)
        if why is None:
            return candidate, "; ".join(passed_over)
        passed_over.append(why)
    raise AssertionError("torch implements every kind")  # pragma: no cover


FP8_RECIPES = (None, "delayed", "current", "mxfp8")


def check_fp8(fp8, backend, linear_enabled: bool) -> None:
    """fp8 asks for TE linear layers under an FP8 recipe: refuse clearly what cannot run here."""
    if fp8 not in FP8_RECIPES:
        raise PatchError(f"fp8 must be one of {FP8_RECIPES}, got {fp8!r}")
    if fp8 is None:
        return
    if not linear_enabled:
        raise PatchError("fp8 runs the linear layers on TransformerEngine: it needs linear=True")
    if for_kind(backend, "linear") not in ("auto", "te"):
        raise PatchError(f"fp8 needs the te backend for linear layers, got {for_kind(backend, 'linear')!r}")
    # no GPU first: installing TE would not help there
    why = None if torch.cuda.is_available() else "FP8 needs a CUDA GPU (none found here)"
    if why is None:
        why = unavailable("te", torch.device("cuda"))
    if why is None:
        from .ops.te import fp8_unavailable

        why = fp8_unavailable(fp8)
    if why is not None:
        raise BackendUnavailableError(f"fp8={fp8!r} cannot be used: {why}")
