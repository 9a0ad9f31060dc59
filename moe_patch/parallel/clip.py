"""Gradient-norm clipping for an expert-parallel model, by the global norm over every rank's experts.

torch.nn.utils.clip_grad_norm_ does not fit: under DDP it counts only the local experts (each rank would clip
by a different factor and the dense replicas drift apart), and under fully_shard_moe the experts and the
rest are DTensors on different meshes, which it refuses to stack.

    loss.backward()
    moe_patch.parallel.clip.clip_grad_norm_(model, max_norm=1.0)
    optimizer.step()
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import PatchError


def _squares(grads, device):
    if not grads:
        return torch.zeros((), device=device, dtype=torch.float32)
    return torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()


def clip_grad_norm_(model, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """Scale every gradient of `model` (patched by moe_patch.apply(model, mesh); bare, inside DDP, or under
    fully_shard_moe) so that their global L2 norm is at most max_norm; returns that norm, equal on all ranks."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    record = getattr(inner, "_moe_patch", None)
    if record is None or not record.sharded:
        raise PatchError("clip_grad_norm_ is for models patched with expert parallelism (apply(model, mesh=...))")
    grads = [p.grad for p in inner.parameters() if p.grad is not None]
    if not grads:
        raise PatchError("no gradients to clip (call it after backward)")
    sharded = [hasattr(g, "to_local") for g in grads]
    if any(sharded):
        # FSDP2: every rank holds distinct shards of the dense and expert gradients, so the squares of the
        # local shards, summed over all ranks, are the squared global norm
        if not all(sharded) or record.mesh.size() != dist.get_world_size():
            raise PatchError("clip_grad_norm_ under FSDP2 needs every parameter sharded by fully_shard_moe over "
                             "a mesh of all ranks")
        local = [g.to_local() for g in grads]
        total = _squares(local, local[0].device)
        dist.all_reduce(total)
    else:
        # DDP or a bare loop: the dense gradients are replicas (count them once), the experts differ per rank
        experts = {id(p) for m in record.sharded for p in m.parameters(recurse=False) if p.dim() >= 2}
        params = [p for p in inner.parameters() if p.grad is not None]
        local = grads
        dense = _squares([p.grad for p in params if id(p) not in experts], grads[0].device)
        spread = _squares([p.grad for p in params if id(p) in experts], grads[0].device)
        dist.all_reduce(spread, group=record.sharded[0]._ep[0])
        total = dense + spread
    total = total.sqrt()
    scale = (max_norm / (total + eps)).clamp(max=1.0)
    for g in local:
        g.mul_(scale.to(g.dtype))
    return total
