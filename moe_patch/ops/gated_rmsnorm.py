"""Gated, grouped RMSNorm of Mamba2 mixers on mamba-ssm's Triton kernel (optional extra: pip install "moe_patch[mamba]").

What the family computes (e.g. transformers' NemotronHRMSNormGated, called by its mixer as `norm(y, gate)` after
the chunked scan), over the last dimension split into groups of `group_size`:

    norm_before_gate=False:  out = weight * rms_norm_g(y * silu(gate))          (Nemotron-H, Mamba2's default)
    norm_before_gate=True:   out = weight * rms_norm_g(y) * silu(gate)
    rms_norm_g(v) = v / sqrt(mean over the group of v^2 + eps)

Transformers runs it as a float32 elementwise chain (upcast, silu, product, square, mean, rsqrt, product, round,
weight product), about ten passes over [batch, seq, heads x head_dim] float32 tensors forward and more backward,
and saves float32 intermediates for the backward. mamba-ssm's `rmsnorm_fn`
(mamba_ssm/ops/triton/layernorm_gated.py, Tri Dao; the `RMSNormGated` of Mamba2's reference module) computes
the same thing in one Triton kernel per direction, float32 inside, one rounding at the end, and saves only its
inputs and 1/rms per group (gradients to the input, the gate and the weight). The module is Triton only and is
imported without `import mamba_ssm` (see mamba_ssd.load_bare: a build without CUDA extensions cannot run that
package's __init__).

Which semantics a class has (`norm_before_gate`) is declared per family in patches/ (GATED_RMSNORM) and proven,
never assumed: a stand-in copy of the family's module at the model's widths (group size included), fresh random
weights, random input and gate, runs its own forward in float32 against the kernel, for each dtype case the
mixer produces (CASES): the output, and the gradients of the input, the gate and the weight, each within the
tolerance of its own dtype (probe.TOL / GRAD_TOL: 1e-5 / 1e-4 for float32, 2e-2 for bfloat16). Only the cases
with the module's own weight dtype are proven (the others cannot occur without changing the weights, which
moves the call outside the proof and back to the family's forward).

At call time the replacement runs the kernel only for what was proven (a gate given, CUDA tensors, a proven
(input, gate, weight) dtype case, the proven group size), else the family's own forward, counting the reason in
FALLBACKS (one warning per reason).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from . import mamba_ssd
from .base import Replacement
from .rmsnorm import eps_of

NAME = "rmsnorm_fn (mamba-ssm Triton gated RMSNorm)"
KERNEL_MODULE = "mamba_ssm.ops.triton.layernorm_gated"
KERNEL_NAME = "rmsnorm_fn"
KERNEL_DEVICES = ("cuda",)  # where the kernel runs (Triton); CPU tests stand a reference in for it on "cpu"
NOT_ON_CPU = "mamba-ssm's gated RMSNorm kernel is Triton (CUDA only): the family's norm stays on this device"
ON_GPU_PREVIEW = ("on a GPU with mamba-ssm installed (moe_patch[mamba]): mamba-ssm's Triton gated RMSNorm where "
                  "apply() proves it there, else the family's norm")
# (input, gate, weight) dtypes the mixer hands its norm: the scan's output in the model dtype (mamba-ssm's kernel),
# the family's PyTorch scan's float32 output with the model's bf16 gate and weight, and an all-float32 model
CASES = ((torch.float32, torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16, torch.bfloat16),
         (torch.float32, torch.bfloat16, torch.bfloat16))
FALLBACKS: dict = {}  # reason -> calls of a replaced norm that ran the family's own forward
CALLS = {"kernel": 0}  # calls that ran the kernel (the proof checks that it did)
ERRORS: dict = {}  # (class name, width, group size, case) -> {"output": rel. error, "input": ..., ...}
_KERNEL: dict = {}  # cache of load_kernel()
_PROOFS: dict = {}


def load_kernel():
    """(rmsnorm_fn, "") or (None, why not). Cached."""
    if "result" not in _KERNEL:
        _KERNEL["result"] = mamba_ssd.load_function(KERNEL_MODULE, KERNEL_NAME, "Triton gated RMSNorm")
    return _KERNEL["result"]


def case_name(case) -> str:
    x, g, w = (str(d).replace("torch.", "") for d in case)
    return x if x == g == w else f"{x} input, {g} gate, {w} weight"


def _fell_back(reason: str) -> None:
    if reason not in FALLBACKS:
        import warnings

        warnings.warn(f"moe_patch: {NAME} not used for this call, the family's own norm ran: {reason}", stacklevel=3)
    FALLBACKS[reason] = FALLBACKS.get(reason, 0) + 1


class GatedRMSNorm(Replacement):
    """The family's gated, grouped RMSNorm module with its forward on mamba-ssm's `rmsnorm_fn` where proven.

    forward(hidden_states [..., N], gate [..., N] or None) -> [..., N] in the family's output dtype (that of
    `weight * hidden_states`). Reads the module's own `weight`, eps (`variance_epsilon` / `eps`) and `group_size`
    at each call. Raises nothing of its own: an unproven call runs the family's forward (counted in FALLBACKS)."""

    kind = "rmsnorm"

    def __init__(self, original, norm_before_gate: bool, cases, strict: bool = False):
        super().__init__(original)
        # private (underscore) so they are not handed to the original on revert, nor read by Transformers
        self._moe_patch_gated = {"norm_before_gate": bool(norm_before_gate), "cases": frozenset(cases),
                                 "group_size": original.group_size, "strict": strict}

    def _why_not_here(self, x, gate) -> str | None:
        spec = self._moe_patch_gated
        if gate is None:
            return "no gate (the proof covers the gated call)"
        if not isinstance(x, torch.Tensor) or x.device.type not in KERNEL_DEVICES:
            return "tensors not on a CUDA device (the kernel is Triton)"
        case = (x.dtype, gate.dtype, self.weight.dtype)
        if case not in spec["cases"]:
            return f"{case_name(case)} not proven at plan time"
        if gate.shape != x.shape or x.shape[-1] != self.weight.shape[0] or gate.device != x.device:
            return "gate or weight shape differs from the input's"
        if self.group_size != spec["group_size"]:
            return "group_size differs from what was proven"
        return None

    def forward(self, hidden_states, gate=None):
        why = self._why_not_here(hidden_states, gate)
        if why is None:
            kernel, _ = load_kernel()
            CALLS["kernel"] += 1
            return kernel(hidden_states, self.weight, None, z=gate, eps=eps_of(self), group_size=self.group_size,
                          norm_before_gate=self._moe_patch_gated["norm_before_gate"])
        if self._moe_patch_gated["strict"]:
            raise RuntimeError(f"proof call not routed to the kernel: {why}")
        _fell_back(why)
        return type(self.original).forward(self, hidden_states, gate)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, " \
               f"norm_before_gate={self._moe_patch_gated['norm_before_gate']}"


# --- plan-time checks and the proof -------------------------------------------------------------------------

def why_not(module, device) -> str | None:
    """Why the kernel cannot apply to this norm at all (before any proof), or None."""
    for attr in ("weight", "group_size"):
        if getattr(module, attr, None) is None:
            return f"norm has no {attr}"
    if eps_of(module) is None:
        return "no float eps attribute (variance_epsilon / eps / epsilon) found"
    if torch.device(device).type not in KERNEL_DEVICES:
        return NOT_ON_CPU
    return load_kernel()[1] or None


def _stand_in(module: nn.Module) -> nn.Module:
    """A float32 CPU copy of the family's norm with weight ~ 1 + N(0, 0.5) (its init is ones), no hooks."""
    clone = copy.deepcopy(module).to_empty(device="cpu").float()
    clone._forward_hooks.clear()
    clone._forward_pre_hooks.clear()
    with torch.no_grad():
        clone.weight.copy_(1 + torch.randn(clone.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    return clone


def prove(module, norm_before_gate: bool, device) -> dict:
    """{case: reason or None} for each (input, gate, weight) dtype case in CASES with the module's weight dtype:
    whether GatedRMSNorm with `norm_before_gate` on `device` equals the family's own forward in float32 on the
    same values (see the module docstring). Cached per (class, width, group size, eps, semantics, device, weight
    dtype)."""
    from .. import probe

    eps = eps_of(module)
    width = module.weight.shape[0]
    key = (type(module), width, module.group_size, eps, bool(norm_before_gate), str(device), module.weight.dtype)
    if key in _PROOFS:
        return _PROOFS[key]
    g = torch.Generator().manual_seed(1)
    x0, z0 = torch.randn(2, 37, width, generator=g), torch.randn(2, 37, width, generator=g) * 2
    w = torch.randn(2, 37, width, generator=g)
    ref = _stand_in(module)
    result = {}
    for case in (c for c in CASES if c[2] == module.weight.dtype):
        try:
            xd, gd, wd = case
            mine = copy.deepcopy(ref).to(device, wd)
            stock = copy.deepcopy(mine).float()  # the family's forward, float32, on the same (rounded) values
            new = GatedRMSNorm.build(mine, norm_before_gate, [case], strict=True)
            x, z = x0.to(device, xd).requires_grad_(), z0.to(device, gd).requires_grad_()
            x_ref, z_ref = x.detach().float().requires_grad_(), z.detach().float().requires_grad_()
            a = stock(x_ref, z_ref)
            before = CALLS["kernel"]
            b = new(x, z)
            if CALLS["kernel"] == before:
                result[case] = "the replacement did not reach the kernel"
                continue
            own = type(module).forward(new, x.detach(), z.detach())  # the family's output dtype for this case
            if b.shape != a.shape or b.dtype != own.dtype:
                result[case] = f"output {tuple(b.shape)} {b.dtype} != the family's {tuple(a.shape)} {own.dtype}"
                continue
            errors = ERRORS[(type(module).__name__, width, module.group_size, case_name(case))] = {
                "output": probe.rel_err(b, a)}
            result[case] = None if errors["output"] < probe.TOL[b.dtype] else \
                f"output rel. error {errors['output']:.1e} > {probe.TOL[b.dtype]:.0e} ({case_name(case)})"
            if result[case]:
                continue
            ga = torch.autograd.grad((a * w.to(device)).sum(), [x_ref, z_ref, stock.weight])
            gb = torch.autograd.grad((b.float() * w.to(device)).sum(), [x, z, new.weight])
            for name, p, q in zip(("input", "gate", "weight"), ga, gb):
                errors[name] = probe.rel_err(q, p)
                if not errors[name] < probe.GRAD_TOL[q.dtype]:
                    result[case] = f"gradient of the {name}: rel. error {errors[name]:.1e} > " \
                                   f"{probe.GRAD_TOL[q.dtype]:.0e} ({case_name(case)})"
                    break
        except Exception as exc:  # a proof never takes the host program down: reported instead
            result[case] = f"probe failed: {type(exc).__name__}: {str(exc)[:300]}"
    _PROOFS[key] = result
    return result
