"""Liger-Kernel (Triton) RMSNorm. Imported only when the liger backend is chosen (GPU + liger_kernel)."""
from __future__ import annotations

import torch
from liger_kernel.ops.rms_norm import LigerRMSNormFunction

from .rmsnorm import TorchRMSNorm


class LigerRMSNorm(TorchRMSNorm):
    """Same semantics as TorchRMSNorm; Liger's casting modes map onto the variants."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.variant == "offset":  # Gemma: (1 + w) * norm(x), all in fp32
            return LigerRMSNormFunction.apply(hidden_states, self.weight, self.eps_value, 1.0, "gemma", False)
        if self.variant == "scale_cast":  # GPT-OSS: (w * norm(x)) in fp32, one rounding ("gemma" mode, offset 0)
            return LigerRMSNormFunction.apply(hidden_states, self.weight, self.eps_value, 0.0, "gemma", False)
        return LigerRMSNormFunction.apply(hidden_states, self.weight, self.eps_value, 0.0, "llama", False)
