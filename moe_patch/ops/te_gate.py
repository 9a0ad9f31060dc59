"""TransformerEngine's fused SwiGLU as the experts' gate, where it is the family's gate (GPU, TE installed).

Families write their gate in Python (`_apply_gate`: chunk into gate / up halves, silu(gate) * up): on the
[rows, 2 x width] expert activations that is a chain of strided elementwise kernels each way plus a cat of
the two gradient halves in the backward. TE's `ops.SwiGLU` does it in one kernel each way and writes the
[rows, 2 x width] gradient directly. Rather than a flag per family, TE's op is proven equal to the
family's own `_apply_gate` on random inputs (fp32 and bf16, outputs and input gradients, on the GPU) before
it is used; a family whose gate differs (GPT-OSS's clamped, interleaved one) keeps its own, with the reason.

TE's `ops.ScaledSwiGLU` also multiplies each row by its routing weight, in the same kernel each way (and
its backward gives the weights' gradient). Applied before the down projection instead of after it (the
same sum: the projection is linear), it lets the unpermute be a plain gather-sum whose backward is a plain
permute: on the Qwen3-30B-A3B shape TE's unpermute backward with weights takes 324 us a layer, without
them 153 us. Proven equal to `_apply_gate(x) * w` the same way before it is used.
"""
from __future__ import annotations

import torch

from .. import probe

_CACHE: dict = {}


def fused_swiglu(module, width: int, device: torch.device, scaled: bool = False):
    """(gate function, "") if TE's SwiGLU equals `module._apply_gate` on [rows, width] inputs, else (None, why).
    scaled: TE's ScaledSwiGLU, called as gate(x, row_weights), against `module._apply_gate(x) * row_weights`.

    One probe per (class, width, scaled) per process. The TE op is kept out of the module tree: it would add
    an `_extra_state` entry to the model's state_dict.
    """
    key = (type(module), width, scaled)
    if key not in _CACHE:
        _CACHE[key] = _probe(module, width, device, scaled)
    return _CACHE[key]


def _probe(module, width, device, scaled):
    name = "TE ScaledSwiGLU" if scaled else "TE SwiGLU"
    try:
        import transformer_engine.pytorch as te

        op = te.ops.ScaledSwiGLU() if scaled else te.ops.SwiGLU()
        g = torch.Generator(device=device).manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(64, width, device=device, generator=g) * 2).to(dtype)
            s = torch.rand(64, device=device, generator=g).to(dtype)
            w = torch.randn(64, width // 2, device=device, generator=g).to(dtype)
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
            ref = module._apply_gate(x1) * s1[:, None] if scaled else module._apply_gate(x1)
            out = op(x2, s2) if scaled else op(x2)
            if ref.shape != out.shape or ref.dtype != out.dtype:
                return None, f"{name} output {tuple(out.shape)} {out.dtype} differs from the family's gate"
            err = probe.rel_err(out, ref)
            if err > probe.TOL[dtype]:
                return None, f"{name} is not the family's gate (rel. error {err:.1e}, {dtype})"
            inputs = ((x1, s1), (x2, s2)) if scaled else ((x1,), (x2,))
            grads_ref = torch.autograd.grad((ref * w).float().sum(), inputs[0])
            grads = torch.autograd.grad((out * w).float().sum(), inputs[1])
            err = max(probe.rel_err(b, a) for a, b in zip(grads_ref, grads))
            if err > probe.GRAD_TOL[dtype]:
                return None, f"{name} gradient differs from the family's gate (rel. error {err:.1e}, {dtype})"
    except Exception as exc:  # a probe never takes the program down: the family's gate stays
        return None, f"{name} probe failed: {type(exc).__name__}: {exc}"
    return op, ""
