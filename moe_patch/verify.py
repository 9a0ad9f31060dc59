"""Check replacements on a real model: record each module's inputs during a stock forward, then run the
stock module and its replacement on exactly those inputs (routing included, so a near-tie in a router
cannot flip an expert choice between the two runs). Used by the GPU tests and benchmarks/kind_timing.py.
"""
from __future__ import annotations

import torch


def tensors(obj):
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in tensors(o)]
    if hasattr(obj, "to_tuple"):
        return tensors(obj.to_tuple())
    return []


def record_inputs(model, paths, **forward_kwargs) -> dict:
    """{path: (args, kwargs)} of the first call of each module during one no-grad forward."""
    modules = dict(model.named_modules())
    captured = {}
    hooks = [modules[p].register_forward_pre_hook(
        lambda m, a, kw, p=p: captured.setdefault(p, (a, kw)), with_kwargs=True) for p in paths]
    try:
        with torch.no_grad():
            model(use_cache=False, **forward_kwargs)
    finally:
        for h in hooks:
            h.remove()
    return captured


def run_module(module, args, kwargs, grad_seed=0, canon=None):
    """Forward + backward with fixed random output gradients; returns (outputs, input grads, param grads).
    `canon` puts the outputs in a canonical form first (a router's (expert, weight) pairs in expert order)."""
    module.zero_grad(set_to_none=True)
    leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) if torch.is_tensor(a) else a for a in args]
    out = module(*leaves, **kwargs)
    outs = tensors(out)
    outs = [t for t in (canon(outs) if canon is not None else outs) if t.is_floating_point()]
    g = torch.Generator(device=outs[0].device).manual_seed(grad_seed)
    with_grad = [t for t in outs if t.requires_grad]
    if with_grad:
        torch.autograd.backward(with_grad, [torch.randn(t.shape, generator=g, device=t.device, dtype=t.dtype)
                                            for t in with_grad])
    input_grads = [a.grad for a in leaves if torch.is_tensor(a) and a.grad is not None]
    param_grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    return [t.detach() for t in outs], input_grads, param_grads
