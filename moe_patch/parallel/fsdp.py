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

torch's own `fully_shard` on an expert-parallel model (instead of fully_shard_moe) is refused: FSDP2 would take each
rank's experts for replicas of one tensor, shard and all-gather them as such and compute with a mix of the ranks'
experts (logits ~5e-2 off stock on a tiny Qwen3-MoE), silently. See install_refusal.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from ..errors import MeshError, PatchError

# set while fully_shard_moe calls torch's fully_shard itself (the only calls that may wrap expert-parallel experts)
_BY_FULLY_SHARD_MOE = contextvars.ContextVar("moe_patch_fully_shard_moe", default=False)


@contextlib.contextmanager
def _inside_fully_shard_moe():
    token = _BY_FULLY_SHARD_MOE.set(True)
    try:
        yield
    finally:
        _BY_FULLY_SHARD_MOE.reset(token)


def refusal(path: str, api: str = "fully_shard") -> MeshError:
    return MeshError(f"{path}: torch's {api} on an expert-parallel model would take each rank's experts for "
                     "replicas of one tensor and compute with a mix of them (wrong numbers); use "
                     "moe_patch.parallel.fsdp.fully_shard_moe(model, mesh) instead")


def _decoder_layers(model):
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def fully_shard_moe(model, mesh, **fsdp_kwargs):
    record = getattr(model, "_moe_patch", None)
    if record is None or record.mesh is None:
        raise PatchError("call moe_patch.apply(model, mesh=mesh) before fully_shard_moe(model, mesh)")
    from . import lora

    for path, m in model.named_modules():  # their adapters are per local expert plain tensors FSDP2 would replicate
        if m in lora.WRAPPERS:
            raise MeshError(f"{path}: PEFT LoRA on the expert-parallel experts' {m.parameter_name} "
                            "(target_parameters) under fully_shard_moe: not supported; adapt other modules "
                            "(e.g. q_proj), or train without fully_shard_moe")
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
    with _inside_fully_shard_moe():
        ignored = set()
        for experts in record.sharded:
            experts._fsdp_by_moe_patch = True  # FSDP2 may manage these experts (GroupedExperts.forward checks)
            if expert_dp.size() == 1:
                ignored |= _as_ep_dtensors(experts, all_ranks)
            else:  # FSDP2 averages over dp_shard; the experts module divided by ep already (expert_weight)
                fully_shard(experts, mesh=expert_dp, **fsdp_kwargs)
        if ignored:
            fsdp_kwargs = dict(fsdp_kwargs, ignored_params=ignored | set(fsdp_kwargs.get("ignored_params") or ()))
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=all_ranks, **fsdp_kwargs)
        fully_shard(model, mesh=all_ranks, **fsdp_kwargs)
    return model


def _unmanaged_ep_experts(roots):
    """(path, module) of the first experts module split over more than one ep rank that a fully_shard of `roots`
    would manage (those under an already fully_shard-ed module are that module's, and left alone), else None."""
    from torch.distributed.fsdp import FSDPModule

    for root in roots:
        stack = [("", root)]
        while stack:
            path, m = stack.pop()
            if m is not root and isinstance(m, FSDPModule):
                continue
            ep = m.__dict__.get("_ep")
            if ep is not None and ep[2] > 1:
                return path or type(m).__name__, m
            stack.extend((f"{path}.{n}" if path else n, c) for n, c in reversed(list(m.named_children())))
    return None


def _fsdp_state_init(wrapped, instance, args, kwargs):
    """FSDPState.init, which every torch fully_shard call runs first on the modules it wraps, however fully_shard
    was imported (a user's `from torch.distributed.fsdp import fully_shard` before apply() included): refused there
    for expert-parallel experts outside fully_shard_moe. Only the state torch's contract registered on the modules
    exists yet; it is removed, so the model is as it was (and fully_shard_moe can still wrap it). (torch 2.13 has
    already moved the parameters to the mesh's device, in place: the same Parameter objects.)"""
    modules = args[0] if args else kwargs["modules"]
    found = None if _BY_FULLY_SHARD_MOE.get() else _unmanaged_ep_experts(modules)
    if found is not None:
        # the API whose state this is: fully_shard, or replicate (torch's FSDP2-based replicate, whose state
        # subclasses FSDPState); its registry item is keyed by that name
        apis = {getattr(k, "__name__", None) for module in modules for key in module.__dict__
                if key.startswith("__composable_api_state_key") for k, v in module.__dict__[key].items()
                if v is instance} - {None} or {"fully_shard"}
        for module in modules:
            for key in [k for k in module.__dict__ if k.startswith("__composable_api_state_key")]:
                entries = module.__dict__[key]  # {api: this state} and {"api": its registry item}
                for k in [k for k, v in entries.items() if v is instance or k in apis]:
                    del entries[k]
                if not entries:
                    del module.__dict__[key]
        raise refusal(found[0], "/".join(sorted(apis)))
    return wrapped(*args, **kwargs)


def install_refusal():
    """Wrap torch's FSDPState.init (wrapt, once per process) with _fsdp_state_init; shard.py calls it. Wrapping
    fully_shard itself would miss the callers that imported it before. GroupedExperts.forward checks as well, in
    case torch's fully_shard ever stops going through FSDPState.init."""
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_state
    except ImportError:  # a torch that moved its private module: GroupedExperts.forward still refuses, at the call
        return
    from . import wrap_once

    wrap_once(_fsdp_state, "FSDPState.init", _fsdp_state_init)


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
