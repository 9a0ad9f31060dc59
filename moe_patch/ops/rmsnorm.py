"""RMSNorm in torch: the family's formula torch.compile'd on GPU, torch.nn.functional.rms_norm elsewhere.

On GPU the formula compiled by inductor is the fastest RMSNorm measured on an H200 at the Qwen3-30B-A3B
shapes (forward + backward GPU time, profiler; CHANGELOG 0.5.0): 108 / 206 / 51 us over 2048-wide rows /
q-norm / k-norm rows (128 wide), against Liger 197 / 497 / 71, TE 94 / 294 / 107 and torch's fused
F.rms_norm 166 / 798 / 280 (its backward is slow over narrow rows). Liger's backward also zero-fills its
output first. Without a compiler (MOE_PATCH_COMPILE=0, CPU) F.rms_norm is used.

Two variants exist among v5 families: `weight * norm(x)` (Llama, Qwen, DeepSeek, GPT-OSS, Nemotron-H;
they differ only in where the bf16 rounding happens) and `(1 + weight) * norm(x)` (Gemma-style, Qwen3-Next).
Which one a class is gets proven numerically at plan time (see probe.py), never assumed from a name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import compiled
from .base import Replacement

VARIANTS = ("scale", "offset")


def eps_of(module) -> float | None:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, float):
            return value
    return None


class TorchRMSNorm(Replacement):
    kind = "rmsnorm"

    def __init__(self, original, variant: str = "scale"):
        super().__init__(original)
        if variant not in VARIANTS:
            raise ValueError(f"unknown RMSNorm variant {variant!r}")
        self.variant = variant
        self.eps = eps_of(original)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if compiled.active(hidden_states):
            return compiled.run(_FORMULAS[self.variant], hidden_states, self.weight, self.eps)
        shape = (hidden_states.shape[-1],)
        if self.variant == "offset":
            y = F.rms_norm(hidden_states.float(), shape, eps=self.eps) * (1.0 + self.weight.float())
            return y.to(hidden_states.dtype)
        if hidden_states.dtype == self.weight.dtype:
            # fused: statistics in fp32 inside the kernel, one rounding at the end
            return F.rms_norm(hidden_states, shape, self.weight, eps=self.eps)
        y = F.rms_norm(hidden_states.float(), shape, eps=self.eps)
        return self.weight * y.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, variant={self.variant}, eps={self.eps}"


def _scale_norm(x, weight, eps: float):
    """weight * norm(x): statistics in fp32, normalised x rounded to x's dtype (Llama / Qwen / DeepSeek)."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def _offset_norm(x, weight, eps: float):
    """(1 + weight) * norm(x), all in fp32 (Gemma-style)."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + weight.float())).to(x.dtype)


_FORMULAS = {"scale": _scale_norm, "offset": _offset_norm}


def label(backend: str, variant: str, module) -> str:
    if backend == "torch":
        weight = getattr(module, "weight", None)
        how = ", compiled" if weight is not None and compiled.active(weight) else ""
        return f"TorchRMSNorm({variant}{how})"
    return {"liger": "LigerRMSNorm", "te": "TERMSNorm"}[backend] + f"({variant})"


def make(original, variant: str, backend: str):
    if backend == "te":
        from .te import TERMSNorm  # lazy: TransformerEngine only on GPU machines

        return TERMSNorm.build(original, variant)
    if backend == "liger":
        from .liger import LigerRMSNorm  # lazy: triton / liger only on GPU machines

        return LigerRMSNorm.build(original, variant)
    return TorchRMSNorm.build(original, variant)
