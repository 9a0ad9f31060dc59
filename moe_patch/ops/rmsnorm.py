"""RMSNorm through torch.nn.functional.rms_norm (one fused kernel on GPU, forward and backward).

Two variants exist among v5 families: `weight * norm(x)` (Llama, Qwen, DeepSeek, GPT-OSS, Nemotron-H;
they differ only in where the bf16 rounding happens) and `(1 + weight) * norm(x)` (Gemma-style, Qwen3-Next).
Which one a class is gets proven numerically at plan time (see probe.py), never assumed from a name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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


def make(original, variant: str, backend: str):
    if backend == "te":
        from .te import TERMSNorm  # lazy: TransformerEngine only on GPU machines

        return TERMSNorm.build(original, variant)
    if backend == "liger":
        from .liger import LigerRMSNorm  # lazy: triton / liger only on GPU machines

        return LigerRMSNorm.build(original, variant)
    return TorchRMSNorm.build(original, variant)
