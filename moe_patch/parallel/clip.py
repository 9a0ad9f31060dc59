"""Gradient-norm clipping for an expert-parallel model whose dense parameters are replicas (DDP, or a loop that
averages them): the norm has to count every rank's experts, or each rank clips by a different factor and the
replicas drift apart. (Under fully_shard_moe every parameter is a DTensor and torch's own clip_grad_norm_
already computes the global norm.)

    loss.backward()
    moe_patch.parallel.clip.clip_grad_norm_(model, max_norm=1.0)
    optimizer.step()
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import PatchError


def clip_grad_norm_(model, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """Scale every gradient of `model` (the module moe_patch.apply(model, mesh) patched, unwrapped or inside DDP)
    so that their global L2 norm is at most max_norm; returns that norm, the same on every rank."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    record = getattr(inner, "_moe_patch", None)
    if record is None or not record.sharded:
        raise PatchError("clip_grad_norm_ is for models patched with expert parallelism (apply(model, mesh=...))")
    group = record.sharded[0]._ep[0]
    sharded = {id(p) for m in record.sharded for p in m.parameters(recurse=False) if p.dim() >= 2}
    dense, experts = [], []
    for p in inner.parameters():
        if p.grad is not None and hasattr(p.grad, "full_tensor"):
            raise PatchError("gradients are DTensors (FSDP): torch.nn.utils.clip_grad_norm_ computes the global "
                             "norm itself there")
        if p.grad is not None:
            (experts if id(p) in sharded else dense).append(p.grad)
    device = (dense or experts)[0].device
    squares = [torch.zeros((), device=device, dtype=torch.float32)] * 2
    for i, grads in enumerate((dense, experts)):
        if grads:
            squares[i] = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()
    dist.all_reduce(squares[1], group=group)  # every rank's experts; the dense replicas count once
    total = (squares[0] + squares[1]).sqrt()
    scale = (max_norm / (total + eps)).clamp(max=1.0)
    for g in dense + experts:
        g.mul_(scale.to(g.dtype))
    return total
