"""Gradient-norm clipping for an expert-parallel model, by the global norm over every rank's experts.

Each rank holds other experts under the same parameter names, so a norm over this rank's gradients counts only
its own experts: under DDP every rank would clip by a different factor (the dense replicas drift apart). Two
ways in, one computation:

- `torch.nn.utils.clip_grad_norm_` itself, which Trainer (through accelerate's `clip_grad_norm_`), accelerate
  loops and plain loops call: once an expert-parallel model exists in the process, it is wrapped (wrapt) so
  that a parameter list holding moe_patch's expert-parallel parameters as plain tensors (bare or under DDP) gets
  the global norm; any other call goes to torch unchanged. Under FSDP2 (fully_shard_moe) the experts are
  DTensors sharded over the ep ranks and torch's DTensor reductions already give the global norm.
- `clip_grad_norm_(model, max_norm)` below, by hand (bare, DDP or fully_shard_moe).

    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)     # or moe_patch.parallel.clip.clip_grad_norm_
    optimizer.step()
"""
from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from ..errors import PatchError

_EP_MODULES = weakref.WeakSet()  # every expert-parallel experts module in the process (shard.py registers them)


def register(module) -> None:
    _EP_MODULES.add(module)
    _install()


def _expert_groups(params) -> dict:
    """{id(param): ep process group} for the plain-tensor expert-parallel parameters among `params` (the experts'
    weights, and PEFT LoRA adapters on them: lora.py)."""
    wanted = {id(p) for p in params}
    found = {}
    for module in list(_EP_MODULES):
        group, _, _, names = module._ep
        for name in names:
            p = module._parameters[name]
            if id(p) in wanted and not hasattr(p, "device_mesh"):
                found[id(p)] = group
    from . import lora  # PEFT LoRA on these experts' weights: one adapter block per local expert

    for wrapper in list(lora.WRAPPERS):
        group = wrapper.get_base_layer()._ep[0]
        for p in lora.parameters(wrapper):
            if id(p) in wanted:
                found[id(p)] = group
    return found


def global_norm(params, norm_type: float = 2.0, experts: dict | None = None) -> torch.Tensor:
    """The norm of the gradients of `params` as if the experts of every ep rank were one model: dense gradients
    are replicas (DDP averaged them; counted once), an expert-parallel parameter's gradient differs per ep rank
    (summed over its ep group). Equal on all ranks. norm_type: any p > 0 or inf. A collective."""
    experts = _expert_groups(params) if experts is None else experts
    grads = [(p.grad, experts.get(id(p))) for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = grads[0][0].device
    norm_type = float(norm_type)
    inf = norm_type == float("inf")

    def part(gs):
        if not gs:
            return torch.zeros((), device=device, dtype=torch.float32)
        norms = torch.stack([torch.linalg.vector_norm(g.detach().float(), norm_type) for g in gs])
        return norms.max() if inf else norms.pow(norm_type).sum()

    total = part([g for g, group in grads if group is None])
    groups = {}
    for g, group in grads:
        if group is not None:
            groups.setdefault(group, []).append(g)
    for group, gs in groups.items():
        spread = part(gs)
        dist.all_reduce(spread, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=group)
        total = torch.maximum(total, spread) if inf else total + spread
    return total if inf else total.pow(1.0 / norm_type)


def _clip(params, max_norm, norm_type, error_if_nonfinite, foreach, experts):
    total = global_norm(params, norm_type, experts)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} for gradients is non-finite, so it cannot be clipped")
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=foreach)
    return total


def _torch_clip(wrapped, instance, args, kwargs):
    """torch.nn.utils.clip_grad_norm_ with the global norm where expert-parallel parameters are among those given."""
    if not _EP_MODULES:
        return wrapped(*args, **kwargs)
    names = ("parameters", "max_norm", "norm_type", "error_if_nonfinite", "foreach")
    bound = dict(zip(names, args), **kwargs)
    params = bound.pop("parameters")
    params = [params] if isinstance(params, torch.Tensor) else list(params)  # a generator is read once
    experts = _expert_groups(params)
    if not experts:
        return wrapped(params, **bound)
    return _clip(params, bound["max_norm"], bound.get("norm_type", 2.0), bound.get("error_if_nonfinite", False),
                 bound.get("foreach"), experts)


def _install() -> None:
    import torch.nn.utils
    import torch.nn.utils.clip_grad as clip_grad_module

    if getattr(torch.nn.utils.clip_grad_norm_, "_moe_patch", False):
        return
    import wrapt

    wrapper = wrapt.FunctionWrapper(torch.nn.utils.clip_grad_norm_, _torch_clip)
    wrapper._moe_patch = True
    # the name torch.nn.utils exports and the one in its module: accelerate and most code call the first
    torch.nn.utils.clip_grad_norm_ = wrapper
    clip_grad_module.clip_grad_norm_ = wrapper


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
        total = total.sqrt()
    else:
        # DDP or a bare loop: the dense gradients are replicas (count them once), the experts differ per rank
        params = [p for p in inner.parameters() if p.grad is not None]
        local = [p.grad for p in params]
        total = global_norm(params)
    scale = (max_norm / (total + eps)).clamp(max=1.0)
    for g in local:
        g.mul_(scale.to(g.dtype))
    return total
