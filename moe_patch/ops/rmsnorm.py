"""RMSNorm in torch: the family's formula torch.compile'd on GPU, torch.nn.functional.rms_norm elsewhere.

On GPU the formula compiled by inductor is the fastest RMSNorm measured on an H200 at the Qwen3-30B-A3B
shapes (forward + backward GPU time, profiler; CHANGELOG 0.5.0): 108 / 206 / 51 us over 2048-wide rows /
q-norm / k-norm rows (128 wide), against Liger 197 / 497 / 71, TE 94 / 294 / 107 and torch's fused
F.rms_norm 166 / 798 / 280 (its backward is slow over narrow rows). Liger's backward also zero-fills its
output first. Without a compiler (MOE_PATCH_COMPILE=0, CPU) F.rms_norm is used.

The forward and backward formulas are compiled separately, without autograd, inside one autograd.Function:
a training forward is host-bound on an H200 machine, and a compiled function called with autograd on
(AOTAutograd's runtime wrapper) costs noticeably more host time per call than one called without.

Variants among v5 families: `weight * norm(x)` ("scale": Llama, Qwen, DeepSeek: norm(x) rounded to x's
dtype, then the product), `(weight * norm(x)).to(x.dtype)` ("scale_cast": GPT-OSS, Nemotron-H: the product in
the promoted dtype, float32 for a bf16 or float32 weight, rounded once; a float64 weight on float32 activations
gives float32 out) and `(1 + weight) * norm(x)` ("offset": Gemma-style, Qwen3-Next). Which one a class is gets proven numerically at plan
time (see probe.py), never assumed from a name. "scale" and "scale_cast" are the same in float32 and both within the
proof's bf16 bound, so where a class no family file declares passes both, closest_rounding() picks the one whose
bf16 output equals the class's own on more elements (AFMoE, FlexOlmo, DeepSeek-V4 ... round as GPT-OSS does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import compiled
from .base import Replacement

VARIANTS = ("scale", "offset", "scale_cast")
SEARCHED = ("scale", "scale_cast", "offset")  # tried for a norm class no patches/ file declares
# the proof's input rows span 1e-4 .. 1e2 in magnitude: where rms(x)^2 is near or below eps (1e-6 .. 1e-5 in the
# families) a formula with eps elsewhere (x / (rms + eps), another eps than the attribute read) differs, where unit
# rows alone pass it
PROBE_ROW_SCALES = torch.logspace(-4, 2, 10)


def eps_of(module) -> float | None:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, float):
            return value
    return None


_ROUNDING: dict = {}  # (class, variants) -> the variant closest_rounding() chose


def closest_rounding(module, variants) -> str:
    """Of `variants` (each already proven within the bounds), the one whose formula (the compiled path's, _FORWARD,
    run eagerly on CPU) gives the module's own bf16 output on the most elements, for a bf16 copy of the module with
    fresh random weights on random inputs; the first on a tie. Cached per class."""
    from .. import probe

    key = (type(module), tuple(variants))
    if key not in _ROUNDING:
        copy_ = probe._fresh_copy(module, torch.bfloat16)
        g = torch.Generator().manual_seed(2)
        x = torch.randn(64, copy_.weight.shape[0], generator=g).to(torch.bfloat16)
        with torch.no_grad():
            ref = copy_(x)
            same = [(_FORWARD[v](x, copy_.weight, eps_of(copy_))[0] == ref).sum().item() for v in variants]
        _ROUNDING[key] = variants[same.index(max(same))]
    return _ROUNDING[key]


class TorchRMSNorm(Replacement):
    kind = "rmsnorm"

    def __init__(self, original, variant: str = "scale"):
        super().__init__(original)
        if variant not in VARIANTS:
            raise ValueError(f"unknown RMSNorm variant {variant!r}")
        self.variant = variant

    @property
    def eps_value(self) -> float:
        """The module's own eps attribute (variance_epsilon / eps / epsilon, adopted from the original), read
        at each forward: a value set after apply() is honoured."""
        return eps_of(self)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch_rms_norm(hidden_states, self.weight, self.eps_value, self.variant)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, variant={self.variant}, eps={self.eps_value}"


def torch_rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float, variant: str) -> torch.Tensor:
    """The family's RMSNorm (`variant` "scale" or "offset") over the last dim: compiled on CUDA, else
    F.rms_norm with the family's roundings. Same shape and dtype as hidden_states."""
    if compiled.active(hidden_states):
        return compiled_norm(hidden_states, weight, eps, variant)
    shape = (hidden_states.shape[-1],)
    if variant == "offset":
        y = F.rms_norm(hidden_states.float(), shape, eps=eps) * (1.0 + weight.float())
        return y.to(hidden_states.dtype)
    if variant == "scale_cast":
        return (weight * F.rms_norm(hidden_states.float(), shape, eps=eps)).to(hidden_states.dtype)
    if hidden_states.dtype == weight.dtype:
        # norm(x) in x's dtype (statistics in fp32 inside the kernel), then the product: Llama's two roundings (the
        # weighted F.rms_norm rounds once: off the family's bf16 output on ~26% of the elements)
        return weight * F.rms_norm(hidden_states, shape, eps=eps)
    y = F.rms_norm(hidden_states.float(), shape, eps=eps)
    return weight * y.to(hidden_states.dtype)


class _CompiledRMSNorm(torch.autograd.Function):
    """RMSNorm with both directions compiled (on CUDA; eager elsewhere: the reference for the tests)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, variant: str):
        y, rstd = compiled.run(_FORWARD[variant], x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.variant, ctx.eps = variant, eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            # backward(create_graph=True): the compiled backward takes rstd as a constant, so differentiated again it
            # would miss rstd's dependence on x (second derivative off by 35% on a random case). The forward's eager
            # formula under autograd instead: its gradient is differentiable
            with torch.enable_grad():
                wanted = [t for t, n in zip((x, weight), ctx.needs_input_grad) if n]
                y, _ = _FORWARD[ctx.variant](x, weight, ctx.eps)
                found = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True))
            dx, dw = (next(found) if n else None for n in ctx.needs_input_grad[:2])
            return dx, dw, None, None
        dx, dw = compiled.run(_BACKWARD[ctx.variant], dy, x, weight, rstd)
        return dx, dw, None, None


def _scale_forward(x, weight, eps: float):
    """weight * norm(x): statistics in fp32, normalised x rounded to x's dtype (Llama / Qwen / DeepSeek)."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


def _scale_cast_forward(x, weight, eps: float):
    """(weight * norm(x)).to(x.dtype): the product in the promoted dtype, one rounding (GPT-OSS)."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * (x32 * rstd)).to(x.dtype), rstd


def _offset_forward(x, weight, eps: float):
    """(1 + weight) * norm(x), all in fp32 (Gemma-style)."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * rstd * (1.0 + weight.float())).to(x.dtype), rstd


def _input_grad(g, x_hat, rstd):
    """d norm(x) given g = dL/d norm(x): rstd * (g - x_hat * mean(g * x_hat)), all fp32."""
    return rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))


def _scale_backward(dy, x, weight, rstd):
    x_hat = x.float() * rstd
    dx = _input_grad(dy.float() * weight.float(), x_hat, rstd)
    dw = (dy.float() * x_hat.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0)  # the rounded x_hat, as forward
    return dx.to(x.dtype), dw.to(weight.dtype)


def _scale_cast_backward(dy, x, weight, rstd):
    x_hat = x.float() * rstd
    dx = _input_grad(dy.float() * weight.float(), x_hat, rstd)
    dw = (dy.float() * x_hat).reshape(-1, x.shape[-1]).sum(0)  # x_hat unrounded, as the forward's product
    return dx.to(x.dtype), dw.to(weight.dtype)


def _offset_backward(dy, x, weight, rstd):
    x_hat = x.float() * rstd
    dx = _input_grad(dy.float() * (1.0 + weight.float()), x_hat, rstd)
    dw = (dy.float() * x_hat).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


_FORWARD = {"scale": _scale_forward, "offset": _offset_forward, "scale_cast": _scale_cast_forward}
_BACKWARD = {"scale": _scale_backward, "offset": _offset_backward, "scale_cast": _scale_cast_backward}


def compiled_norm(x, weight, eps: float, variant: str):
    """The compiled path's function (eager off CUDA): what TorchRMSNorm runs on a GPU."""
    return _CompiledRMSNorm.apply(x, weight, eps, variant)


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
