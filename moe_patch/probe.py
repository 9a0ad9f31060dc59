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


# --- experts -------------------------------------------------------------------------------------------------

EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
PROBE_EXPERTS = 4  # experts in the throw-away copy: the map is the same per expert, so a few prove it


def _small_experts_copy(module: nn.Module, device, dtype) -> nn.Module:
    """A copy of an experts module cut to PROBE_EXPERTS experts with fresh random weights (the widths stay:
    an expert's map is what is proven). Never copies the module's own (possibly huge, possibly meta)
    weights: each stacked parameter [E, ...] becomes a new [PROBE_EXPERTS, ...] tensor; submodules (a
    post-expert norm) are deep-copied with fresh values."""
    num = next(iter(_three_d(module).values())).shape[0]
    keep = min(num, PROBE_EXPERTS)
    clone = copy.copy(module)
    clone._parameters, clone._buffers = {}, {}
    clone._modules = {n: _fresh_copy(m, dtype, device) for n, m in module._modules.items()}
    g = torch.Generator().manual_seed(0)
    for name, p in module._parameters.items():
        if p is None:
            clone._parameters[name] = None
            continue
        shape = (keep, *p.shape[1:]) if p.dim() >= 2 and p.shape[0] == num else tuple(p.shape)
        value = torch.randn(shape, generator=g) * 0.3 + 0.02
        clone._parameters[name] = nn.Parameter(value.to(device, dtype), requires_grad=True)
    for name, b in module._buffers.items():
        clone._buffers[name] = None if b is None else torch.zeros(b.shape, dtype=b.dtype).to(device)
    for attr in EXPERT_COUNT_ATTRS:  # the stock forward loops / one-hots over its expert count
        if getattr(module, attr, None) == num:
            object.__setattr__(clone, attr, keep)
    clone.train()
    return clone


def _three_d(module):
    return {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3}


def experts_proven(module: nn.Module, factory, key, device="cpu") -> str | None:
    """None if `factory(copy)` computes what the family's own experts module computes, else the reason.

    The family's module (as configured: Transformers' experts implementation in use included) and the
    replacement run on one small copy (_small_experts_copy) with the same Parameter objects, on routed
    tokens that hit every expert but one (an empty group), top-k without repeats, in fp32 (relative error
    < 1e-5 outputs, < 1e-4 gradients of the hidden states, the routing weights and every parameter) and in
    bf16 with bf16 and with fp32 routing weights (< 2e-2). Cached per (class, key, device)."""
    cache_key = (type(module), "experts", key, str(device))
    if cache_key in _CACHE:
        return _CACHE[cache_key]
    reason = None
    try:
        for dtype, weights_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.bfloat16, torch.float32)):
            stock = _small_experts_copy(module, device, dtype)
            new = factory(stock)  # adopts the copy's parameters
            try:
                reason = _compare_experts(stock, new, dtype, weights_dtype, device)
            except _StockRaised:
                if dtype == weights_dtype:
                    raise
                reason = None  # the family's module takes no fp32 routing weights with bf16 states: not its input
            if reason:
                break
    except Exception as exc:  # a probe must never take the host program down: report it instead
        reason = f"probe failed: {type(exc).__name__}: {exc}"
    _CACHE[cache_key] = reason
    return reason


class _StockRaised(RuntimeError):
    """The family's own experts module raised on the probe's input."""


def _hidden_width(module) -> int:
    down = module._parameters["down_proj"]
    return down.shape[-1] if getattr(module, "is_transposed", False) else down.shape[-2]


def _compare_experts(stock, new, dtype, weights_dtype, device) -> str | None:
    num = next(iter(_three_d(stock).values())).shape[0]
    top_k = min(2, max(num - 1, 1))
    tokens = 16
    g = torch.Generator().manual_seed(1)
    used = max(num - 1, top_k)  # the last expert gets no token where there are enough experts
    idx = torch.stack([torch.randperm(used, generator=g)[:top_k] for _ in range(tokens)])
    x = torch.randn(tokens, _hidden_width(stock), generator=g)
    w = torch.rand(tokens, top_k, generator=g) + 0.1
    x, w, idx = x.to(device, dtype), w.to(device, weights_dtype), idx.to(device)
    params = [p for p in stock.parameters() if p.requires_grad]
    results = []
    for module in (stock, new):
        x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
        try:
            out = _outputs(module(x1, idx, w1))[0]
        except Exception as exc:
            if module is stock:
                raise _StockRaised(f"{type(exc).__name__}: {exc}") from exc
            raise
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device, out.dtype)
        grads = torch.autograd.grad(out, [x1, w1, *params], gout, allow_unused=True)
        results.append((out.detach(), grads))
    (a, ga), (b, gb) = results
    tol, grad_tol = TOL[dtype], GRAD_TOL[dtype]
    tag = f"{dtype}, {weights_dtype} routing weights"
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"output {tuple(b.shape)} {b.dtype} instead of {tuple(a.shape)} {a.dtype} ({tag})"
    err = rel_err(b, a)
    if not err < tol:
        return f"output rel. error {err:.1e} > {tol:.0e} ({tag})"
    names = ["hidden states", "routing weights"] + [n for n, p in stock.named_parameters() if p.requires_grad]
    for name, p, q in zip(names, ga, gb):
        if (p is None) != (q is None):
            return f"gradient of {name} {'missing' if q is None else 'unexpected'} ({tag})"
        if p is not None and not rel_err(q, p) < grad_tol:
            return f"gradient of {name}: rel. error {rel_err(q, p):.1e} ({tag})"
    return None
