"""TransformerEngine's fused SwiGLU as the experts' gate, where it is the family's gate (GPU, TE installed).

Families write their gate in Python (`_apply_gate`: chunk into gate / up halves, silu(gate) * up): on the
[rows, 2 x width] expert activations that is a chain of strided elementwise kernels each way plus a cat of
the two gradient halves in the backward. TE's `ops.SwiGLU` does it in one kernel each way and writes the
[rows, 2 x width] gradient directly. Rather than a flag per family, TE's op is proven equal to the
family's own `_apply_gate` on random inputs (fp32 and bf16, outputs and input gradients, on the GPU) before
it is used; a family whose gate differs (GPT-OSS's clamped, interleaved one) keeps its own, with the reason.
"""
from __future__ import annotations

import itertools

import torch

from .. import probe

_CACHE: dict = {}


def fused_swiglu(module, width: int, device: torch.device):
    """(gate function, "") if TE's SwiGLU equals `module._apply_gate` on [rows, width] inputs, else (None, why).

    One probe per (class, width) per process. The TE op is kept out of the module tree: it would add an
    `_extra_state` entry to the model's state_dict.
    """
    key = (type(module), width)
    if key not in _CACHE:
        _CACHE[key] = _probe(module, width, device)
    return _CACHE[key]


def _probe(module, width, device):
    was_training = module.training
    try:
        import transformer_engine.pytorch as te

        op = te.ops.SwiGLU()
        g = torch.Generator(device=device).manual_seed(0)
        # in training and in eval mode: the fused gate is kept across model.train() / eval() (GroupedExperts'
        # switches leave `training` out), so a family gate that depended on the mode must fail here
        for dtype, module.training in itertools.product((torch.float32, torch.bfloat16), (True, False)):
            x = (torch.randn(64, width, device=device, generator=g) * 2).to(dtype)
            w = torch.randn(64, width // 2, device=device, generator=g).to(dtype)
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            ref, out = module._apply_gate(x1), op(x2)
            if ref.shape != out.shape or ref.dtype != out.dtype:
                return None, f"TE SwiGLU output {tuple(out.shape)} {out.dtype} differs from the family's gate"
            err = probe.rel_err(out, ref)
            if err > probe.TOL[dtype]:
                return None, f"TE SwiGLU is not the family's gate (rel. error {err:.1e}, {dtype})"
            (ga,) = torch.autograd.grad((ref * w).float().sum(), x1)
            (gb,) = torch.autograd.grad((out * w).float().sum(), x2)
            err = probe.rel_err(gb, ga)
            if err > probe.GRAD_TOL[dtype]:
                return None, f"TE SwiGLU gradient differs from the family's gate (rel. error {err:.1e}, {dtype})"
    except Exception as exc:  # a probe never takes the program down: the family's gate stays
        return None, f"TE SwiGLU probe failed: {type(exc).__name__}: {exc}"
    finally:
        module.training = was_training
    return op, ""


def swiglu_formula(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 x width] -> [..., width]: SiLU(a) * b with a, b the first and second halves of the last dimension,
    the formula TE's `ops.SwiGLU` documents (transformer_engine.pytorch.ops.SwiGLU): the reference the GPU preview
    holds a family's gate against."""
    a, b = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(a) * b


def not_swiglu_on_cpu(module, width: int) -> str | None:
    """Why the family's gate is not TE's SwiGLU, told on this CPU from the formula TE documents (swiglu_formula)
    in fp32: `moe-patch report --device cuda` names the gate the GPU would keep (GPT-OSS's clamped, interleaved
    one fails here, as on the GPU). None where they agree, or where the gate cannot run here (it reads weights on
    the meta device): only the GPU's own proof (fused_swiglu) decides then."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, width, generator=g) * 4  # beyond GPT-OSS's clamp limit (7) in places
    try:
        ref = module._apply_gate(x)
    except Exception:
        return None
    out = swiglu_formula(x)
    if ref.shape != out.shape:
        return f"TE's SwiGLU gives {tuple(out.shape)} where the family's gate gives {tuple(ref.shape)}"
    err = probe.rel_err(out, ref)
    if not err < probe.TOL[torch.float32]:
        return f"TE's SwiGLU (SiLU(first half) x second half) is not the family's gate (rel. error {err:.1e}, fp32)"
    return None
