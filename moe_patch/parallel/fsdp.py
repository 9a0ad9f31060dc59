"""FSDP2 with expert parallelism: the recipe, as one call.

    mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("ep",))   # or (dp_shard, ep)
    moe_patch.apply(model, mesh=mesh)
    moe_patch.parallel.fsdp.fully_shard_moe(model, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)

- non-expert parameters are sharded over every rank of the mesh (as plain FSDP2 would do);
- experts, already split over `ep`, are sharded over `dp_shard` by FSDP2. With one rank on `dp_shard` (a 1-D
  mesh) there is nothing to split, yet FSDP2 would still copy every expert weight at each unshard and every
  expert gradient through a one-rank reduce-scatter (about 0.6 GB per layer each at the Qwen3-30B-A3B
  shape): there the experts only become what they are, DTensors sharded over the ep ranks (Shard(0) on the
  mesh, global shape [E, ...]; the experts module computes with their local tensors). Everything is then a
  DTensor on the one mesh, so torch itself gets the whole model right: clip_grad_norm_ (Trainer's and
  accelerate's clipping) reduces the experts' norms over the ep ranks, torch.distributed.checkpoint saves each
  rank's experts (model and optimizer states) at their offsets, and one fused / foreach optimizer takes all;
- gradients: FSDP averages the non-expert gradients over all ranks; an expert's gradient arrives summed
  over its ep group (the all-to-all backward) and divided by ep (GroupedExperts.expert_weight), and FSDP2
  averages it over dp_shard: every parameter ends up with the gradient of the mean of the per-rank losses.
"""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

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
    ignored = set()
    for experts in record.sharded:
        if expert_dp.size() == 1:
            ignored |= _as_ep_dtensors(experts, all_ranks)
        else:  # FSDP2 averages over dp_shard; the experts module already divided by ep (GroupedExperts.expert_weight)
            fully_shard(experts, mesh=expert_dp, **fsdp_kwargs)
    if ignored:
        fsdp_kwargs = dict(fsdp_kwargs, ignored_params=ignored | set(fsdp_kwargs.get("ignored_params") or ()))
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=all_ranks, **fsdp_kwargs)
    fully_shard(model, mesh=all_ranks, **fsdp_kwargs)
    return model


def _as_ep_dtensors(experts, ep_mesh) -> set:
    """The experts' stacked parameters as DTensors sharded over the ep ranks (same data, no copy); returned for
    FSDP2's ignored_params (it leaves them alone)."""
    params = set()
    for name in experts._ep[3]:
        old = experts._parameters[name]
        new = torch.nn.Parameter(DTensor.from_local(old.data, ep_mesh, [Shard(0)], run_check=False),
                                 requires_grad=old.requires_grad)
        experts._parameters[name] = new
        params.add(new)
    return params
