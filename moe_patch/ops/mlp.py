"""Gated MLPs (a dense layer's MLP, a shared expert): `silu(gate) * up` in one fused kernel each way.

What the family computes (transformers' modeling_deepseek_v3.py, `DeepseekV3MLP.forward`):

    down_proj(act_fn(gate_proj(x)) * up_proj(x))        act_fn = SiLU

Eagerly, the product is a SiLU kernel and a multiply forward, and three kernels backward (the gradient of
each factor and SiLU's backward), with SiLU's output kept for the backward besides both factors: on the
deepseek-v3-style dense layer (intermediate 10,944, 16k tokens) each of those tensors is 358 MB. GatedMLP keeps
the family's three projections (the same modules, whatever they are: nn.Linear, TE's, a LoRA wrapper) and runs
the product in `silu_mul`: one compiled kernel each way on CUDA (compiled.run; the backward recomputes
sigmoid(gate) instead of keeping SiLU's output), and eagerly elsewhere (the exact reference the CPU tests check).

On by default (MOE_PATCH_FUSED_MLP=0 turns it off): on an H200 at the deepseek-v3-style shape (4 layers,
micro-batch 4, seq 4096; benchmarks/train_step.py --variants patched,patched-nofusedmlp --rounds 3) 133,299 /
133,361 / 134,410 tokens/s without it, 133,954 / 135,784 / 136,171 with it (medians +1.8%), 0.6 GiB less peak.

Used only for classes a family file declares (patches/*.py: MLP) and only where proven at plan time: a
throw-away copy of the family's module against GatedMLP on random inputs, fp32 and bf16, output and input
gradient (probe.proven_equal), on the module's device (so a GPU proves the compiled kernel).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules import module as nn_module

from . import compiled
from .base import Replacement

NAME = "GatedMLP(silu*up fused)"
SWITCH = "MOE_PATCH_FUSED_MLP"  # on unless set to an off word (module docstring)


def _wide(t):
    """t in float32, or in its own dtype where that is wider (float64 keeps its precision)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _silu_mul(gate, up):
    """silu(gate) * up in float32 (float64 for float64), one rounding to the inputs' dtype (the compiled forward)."""
    return (F.silu(_wide(gate)) * _wide(up)).to(gate.dtype)


def _silu_mul_backward(grad, gate, up):
    """d gate = grad * up * s * (1 + gate * (1 - s)) with s = sigmoid(gate) (SiLU's derivative, as torch's
    silu_backward); d up = grad * silu(gate). float32 arithmetic (float64 for float64), one rounding each."""
    g, u, d = _wide(gate), _wide(up), _wide(grad)
    s = torch.sigmoid(g)
    return (d * u * s * (1 + g * (1 - s))).to(gate.dtype), (d * g * s).to(up.dtype)


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        if compiled.active(gate):
            return compiled.run(_silu_mul, gate, up)
        return F.silu(gate) * up  # the family's own two ops (the CPU reference)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return compiled.run(_silu_mul_backward, grad, gate, up)  # eager off CUDA (compiled.run)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, same shape and dtype; one fused kernel each way on CUDA (compiled), eager elsewhere."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        return F.silu(gate) * up
    return _SiluMul.apply(gate, up)


_SILU_FORWARDS: set = set()


def _silu_forwards() -> set:
    """The forwards that are F.silu and nothing else: torch's nn.SiLU and Transformers' SiLUActivation (ACT2FN's
    "silu" / "swish"), as defined (a subclass with a forward of its own is not one)."""
    if not _SILU_FORWARDS:
        _SILU_FORWARDS.add(torch.nn.SiLU.forward)
        try:
            from transformers.activations import SiLUActivation

            _SILU_FORWARDS.add(SiLUActivation.forward)
        except ImportError:
            pass
    return _SILU_FORWARDS


def _is_silu(act) -> bool:
    """act is a SiLU module: its class's forward is nn.SiLU's or SiLUActivation's, and none is set on the instance."""
    return (isinstance(act, torch.nn.Module) and type(act).forward in _silu_forwards()
            and "forward" not in vars(act))


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _plain_silu(act) -> bool:
    """Calling act would be F.silu and nothing else: a SiLU module with no hook of its own and no global module
    hook (torch.nn.modules.module.register_module_forward_hook & co.), which would run around it."""
    return _is_silu(act) and not any(getattr(act, h) for h in _HOOKS) and \
        not any(getattr(nn_module, h) for h in _GLOBAL_HOOKS)


class GatedMLP(Replacement):
    """The family's gated MLP with its product in silu_mul; the projections are the module's own children.
    The module's own act_fn (adopted from the original) is read at each forward: SiLU is computed here without
    calling it, so whenever calling it would do anything else (another activation set after apply(), a SiLU
    subclass with a forward of its own, a forward set on it, a hook on it: activation capture or steering, or a
    global module hook) the call goes to the family's forward, which calls it, as stock does."""

    kind = "mlp"

    def forward(self, x):
        if not _plain_silu(getattr(self, "act_fn", None)):
            return type(self.original).forward(self, x)  # the family's forward, on this module's children
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def why_not(module) -> str | None:
    """Why GatedMLP cannot stand in for this module, seen without running anything (None: the proof decides)."""
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not isinstance(getattr(module, name, None), torch.nn.Linear):
            return f"no {name} linear layer: not the gated MLP layout (gate_proj, up_proj, down_proj)"
    if not _is_silu(getattr(module, "act_fn", None)):
        return f"activation {type(getattr(module, 'act_fn', None)).__name__} is not SiLU"
    return None
