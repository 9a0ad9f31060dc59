"""Prove a small replacement equal to the module it replaces, before anything is swapped.

Norms and routers are tiny, so for each class we run a throw-away copy of the original (fresh random
weights, on CPU, so it also works for models built on the meta device) against the proposed replacement
on random inputs: fp32 (relative error < 1e-5 on outputs and input gradients) and bf16 (< 2e-2). Results
are cached per (class, spec): one probe per class per process.
"""
from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

_CACHE: dict = {}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # outputs
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _fresh_copy(module: nn.Module, dtype, device="cpu") -> nn.Module:
    clone = copy.deepcopy(module).to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in list(clone.parameters()) + list(clone.buffers()):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.5 + 0.1)
    return clone.to(device=device, dtype=dtype)


def _outputs(result):
    return [t for t in (result if isinstance(result, tuple) else (result,)) if isinstance(t, torch.Tensor)]


def single_input(module: nn.Module) -> bool:
    """True if forward takes exactly one tensor (gated norms take a second one: not a plain norm)."""
    params = list(inspect.signature(module.forward).parameters.values())
    required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    extra = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) == 1 and len(extra) == 1


def proven_equal(module: nn.Module, factory, in_features: int, key, device="cpu", canon=None,
                 rows=None) -> str | None:
    """None if factory(copy) matches copy on random inputs, else the reason it does not. GPU kernels are
    proven on `device`; `canon` maps both output lists to a canonical form first (e.g. router pairs);
    `rows(copy, x)` keeps the input rows on which the result is unique (a router's top-k without a tie)."""
    cache_key = (type(module), key, str(device))
    if cache_key in _CACHE:
        return _CACHE[cache_key]
    reason = None
    try:
        for dtype in (torch.float32, torch.bfloat16):
            stock = _fresh_copy(module, dtype, device)
            new = factory(stock)  # adopts the copy's weights: same weights on both sides
            x = torch.randn(64 if rows else 10, in_features, generator=torch.Generator().manual_seed(1))
            x = x.to(device, dtype)
            if rows is not None:
                with torch.no_grad():
                    x = x[rows(stock, x)][:10]
                if len(x) < 10:
                    reason = f"too few probe rows with a unique result ({len(x)} of 64, {dtype})"
                    break
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            a, b = _outputs(stock(x1)), _outputs(new(x2))
            if canon is not None and len(a) == len(b):
                a, b = canon(a), canon(b)
            if len(a) != len(b) or any(p.dtype != q.dtype or p.shape != q.shape for p, q in zip(a, b)):
                reason = f"outputs differ in number, dtype or shape ({dtype})"
                break
            for p, q in zip(a, b):
                if not p.is_floating_point():
                    if not torch.equal(p, q):
                        reason = f"integer outputs differ ({dtype})"
                    continue
                err = rel_err(q, p)
                if err > TOL[dtype]:
                    reason = f"output rel. error {err:.1e} > {TOL[dtype]:.0e} ({dtype})"
            if reason:
                break
            loss_a = sum((t.float() * 0.37).sum() for t in a if t.is_floating_point())
            loss_b = sum((t.float() * 0.37).sum() for t in b if t.is_floating_point())
            (ga,) = torch.autograd.grad(loss_a, x1)
            (gb,) = torch.autograd.grad(loss_b, x2)
            err = rel_err(gb, ga)
            if err > GRAD_TOL[dtype]:
                reason = f"input-gradient rel. error {err:.1e} ({dtype})"
                break
    except Exception as exc:  # a probe must never take the host program down: report it instead
        reason = f"probe failed: {type(exc).__name__}: {exc}"
    _CACHE[cache_key] = reason
    return reason
