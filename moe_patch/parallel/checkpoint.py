"""Resumable checkpoints (model and optimizer) of expert-parallel training with torch.distributed.checkpoint.

    from moe_patch.parallel import checkpoint
    dcp.save(checkpoint.state_dict(model, optimizer), checkpoint_id=path)          # every rank
    ...                                                                            # later, same or new run:
    state = checkpoint.state_dict(model, optimizer)    # the template: model / optimizer built as before
    dcp.load(state, checkpoint_id=path)
    checkpoint.load_state_dict(model, optimizer, state)

torch's get_state_dict(model, optimizer) already gives the expert *weights* whole (moe_patch's state-dict
hooks gather them over the ep ranks), but the optimizer's expert states stay per rank: under the same
names every rank holds other experts' moments, and DCP, seeing one name with one shape, would save one
rank's and hand them to every rank on load. Here they are gathered whole as well, so a checkpoint holds
each expert once, like a stock model's, and load_state_dict() gives each rank its block back (as the
DTensor FSDP2 expects under fully_shard_moe). Works bare, under DDP and under fully_shard_moe.
"""
from __future__ import annotations

import torch

from ..errors import MeshError, PatchError
from .shard import gather_experts, local_experts


def _expert_states(model):
    """{fqn: (module, group, rank, size)} of every expert-parallel parameter."""
    record = getattr(model, "_moe_patch", None)
    if record is None or not record.sharded:
        raise PatchError("not an expert-parallel model: call moe_patch.apply(model, mesh=mesh) first")
    paths = {id(m): path for path, m in model.named_modules()}
    out = {}
    for module in record.sharded:
        group, rank, size, names = module._ep
        for name in names:
            out[f"{paths[id(module)]}.{name}"] = (module, group, rank, size)
    return out


def state_dict(model, optimizer) -> dict:
    """{"model": ..., "optim": ...} for dcp.save / dcp.load: torch's get_state_dict with every expert
    tensor (weights and optimizer states) whole. A collective: call it on every rank."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    experts = _expert_states(model)
    _refuse_lora_states(model, optimizer)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    for fqn, (module, group, rank, size) in experts.items():
        if fqn not in optim_sd["state"]:
            continue
        # a new dict: torch's optimizer state dict shares its per-parameter dicts with the optimizer itself
        optim_sd["state"][fqn] = {
            key: gather_experts(value, group, size)
            if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == module.num_experts else value
            for key, value in optim_sd["state"][fqn].items()}
    return {"model": model_sd, "optim": optim_sd}


def _refuse_lora_states(model, optimizer) -> None:
    """PEFT LoRA on the experts' weights (parallel/lora.py): the model's adapters are gathered whole, but their
    optimizer states are per local expert under the same names on every rank, which DCP would keep one rank's of."""
    from . import lora

    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for path, m in model.named_modules():
        if m in lora.WRAPPERS and any(id(p) in held for p in lora.parameters(m)):
            raise MeshError(f"{path}: optimizer states of PEFT LoRA on the expert-parallel experts' "
                            f"{m.parameter_name} (target_parameters) are not supported in checkpoint.state_dict; "
                            "save the adapter with PeftModel.save_pretrained on every rank instead")


def load_state_dict(model, optimizer, state: dict) -> None:
    """Load what state_dict() gave (after dcp.load into it): each rank takes its experts' block."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    params = dict(model.named_parameters())
    for fqn, (module, group, rank, size) in _expert_states(model).items():
        for key, value in state["optim"]["state"].get(fqn, {}).items():
            # (a DTensor sharded over the ep ranks, fully_shard_moe's 1-D mesh, is loaded in place by DCP already)
            if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == module.num_global_experts \
                    and not hasattr(value, "device_mesh"):
                state["optim"]["state"][fqn][key] = local_experts(value, params[fqn], rank, size)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
