"""FSDP2 with expert parallelism: the recipe, as one call.

    mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("ep",))   # or (dp_shard, ep)
    moe_patch.apply(model, mesh=mesh)
    moe_patch.parallel.fsdp.fully_shard_moe(model, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)

- non-expert parameters are sharded over every rank of the mesh (as plain FSDP2 would do);
- experts, already split over `ep`, are sharded over `dp_shard` (size 1 for a 1-D mesh: nothing to split,
  but they become DTensors like the rest, so one optimizer handles everything);
- gradients: FSDP averages the non-expert gradients over all ranks; an expert's gradient arrives summed
  over its ep group (the all-to-all backward), so its FSDP group divides by the whole world size instead:
  every parameter ends up with the gradient of the mean of the per-rank losses.
"""
from __future__ import annotations

from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ..errors import PatchError


def _decoder_layers(model):
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def fully_shard_moe(model, mesh, **fsdp_kwargs):
    record = getattr(model, "_moe_patch", None)
    if record is None or record.mesh is None:
        raise PatchError("call moe_patch.apply(model, mesh=mesh) before fully_shard_moe(model, mesh)")
    names = tuple(mesh.mesh_dim_names or ())
    world = mesh.size()
    if names == ("ep",):
        all_ranks = mesh
        expert_dp = init_device_mesh(mesh.device_type, (1, world), mesh_dim_names=("dp_shard", "ep"))["dp_shard"]
    elif set(names) == {"dp_shard", "ep"} and len(names) == 2:
        all_ranks = mesh._flatten("moe_patch_dp_ep")
        expert_dp = mesh["dp_shard"]
    else:
        raise PatchError(f"fully_shard_moe supports meshes ('ep',) and ('dp_shard', 'ep'), got {names}")
    for experts in record.sharded:
        for hook in experts._ep_grad_hooks:  # FSDP's divide factor below does the averaging instead
            hook.remove()
        fully_shard(experts, mesh=expert_dp, **fsdp_kwargs)
        experts.set_gradient_divide_factor(float(world))
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=all_ranks, **fsdp_kwargs)
    fully_shard(model, mesh=all_ranks, **fsdp_kwargs)
    return model
