"""Models loaded by `from_pretrained(..., distributed_config=DistributedConfig(ep_size=N, fsdp_size=M))`: moe_patch's
expert parallelism instead of Transformers' own, with the FSDP2 over the rest that the config asks for.

    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(ep_size=2, fsdp_size=2))
    moe_patch.apply(model)          # or MOE_PATCH=1 (auto.py calls apply() once from_pretrained returns)

Transformers has already sharded such a model when apply() sees it: the experts split over its "ep" mesh
(DTensors, loaded shard by shard), their forward routed through its `EPImplementationInterface`, and FSDP2
(`fully_shard`) over the experts (its "efsdp" mesh) and over the rest ("fsdp" mesh). Why not only register a
dispatcher in that registry: an `EPImplementation` only moves tokens; the experts' FSDP2 wrapping (a copy of every
expert weight at each unshard when efsdp is 1) and every other kernel stay Transformers', and no module can be
swapped under FSDP2 (it writes its gathered parameters into the modules it wrapped). So apply() here:

1. checks what moe_patch can take (`check`: no tensor / pipeline parallelism, no HSDP replicas, no CPU offload,
   no forward run yet, MOE_PATCH_EP unset or equal to ep_size): a one-line MeshError before anything changes;
2. undoes Transformers' distribution (`undistribute`): FSDP2's hooks and state removed, every parameter back to a
   plain whole tensor (all-gathered: for a moment every rank holds every expert), the experts' own forward back;
3. `moe_patch.apply(model, mesh=...)` on a ("ep",) mesh (ep == world) or ("dp_shard", "ep") (world / ep copies of
   each expert block, Transformers' efsdp), with the dispatcher "auto" picks (te_ep on CUDA with NCCL >= 2.30.4,
   else all_to_all; gloo on CPU), then `fully_shard_moe` with the config's FSDP2 policy (`fsdp_mixed_precision`:
   bf16 parameters, fp32 reductions, as Transformers sets it). Every rank sees its own batch and every parameter
   gets the gradient of the mean of the ranks' losses, as under Transformers' EP + FSDP2;
4. on any failure in 3, Transformers' own distribution is put back (`maybe_distribute_model`) and the error raised:
   the model trains as Transformers built it, never half-patched.

`config.distributed_config` and the model's mesh attributes stay (Trainer and save_pretrained read them);
moe_patch.report(model) says which config it came from.
"""
from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist

from ..errors import MeshError, PatchError


_TAKING_OVER = set()  # id() of the models apply() below is patching (its inner moe_patch.apply(model, mesh) call)


def config(model):
    """The DistributedConfig of a model Transformers distributed with expert parallelism, else None."""
    cfg = getattr(getattr(model, "config", None), "distributed_config", None)
    if cfg is None or not getattr(model, "_is_distributed_loading_by_transformers", False) or id(model) in _TAKING_OVER:
        return None
    return cfg if (getattr(cfg, "ep_size", 1) or 1) > 1 else None


def _fsdp_states(model):
    """The FSDP2 states of the modules under `model`, each once, in module order (the same on every rank)."""
    from torch.distributed._composable_state import _get_module_state
    from torch.distributed.fsdp import FSDPModule

    states = {}
    for module in model.modules():
        if isinstance(module, FSDPModule):
            state = _get_module_state(module)
            if state is not None:
                states.setdefault(id(state), state)
    return list(states.values())


def check_environment(cfg) -> None:
    """MOE_PATCH_EP, where set, must agree with the config's ep_size (the launcher's setting vs the script's)."""
    raw = os.environ.get("MOE_PATCH_EP", "").strip()
    if raw and raw != str(cfg.ep_size):
        raise MeshError(f"MOE_PATCH_EP={raw} disagrees with the model's DistributedConfig(ep_size={cfg.ep_size}); "
                        "unset MOE_PATCH_EP (the config's size is used)")


def check(model, cfg) -> None:
    """What moe_patch's expert parallelism can take from this DistributedConfig; one-line MeshError otherwise."""
    what = (f"DistributedConfig(ep_size={cfg.ep_size}, fsdp_size={cfg.fsdp_size}, tp_size={cfg.tp_size}, "
            f"pp_size={cfg.pp_size}, dp_replicate_size={cfg.dp_replicate_size})")
    if cfg.tp_size > 1 or cfg.pp_size > 1:
        raise MeshError(f"{what}: moe_patch's expert parallelism composes with FSDP2 only, not with tensor or "
                        "pipeline parallelism; leave moe_patch off for this model or set tp_size=pp_size=1")
    if cfg.dp_replicate_size > 1:
        raise MeshError(f"{what}: HSDP replicas (dp_replicate_size > 1) are not supported by moe_patch's expert "
                        "parallelism yet; use fsdp_size alone")
    if cfg.fsdp_cpu_offload:
        raise MeshError(f"{what}: fsdp_cpu_offload is not supported by moe_patch's expert parallelism yet")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if cfg.fsdp_size != world or world % cfg.ep_size:
        raise MeshError(f"{what}: moe_patch needs fsdp_size equal to the world size {world} and ep_size dividing it")
    check_environment(cfg)
    for state in _fsdp_states(model):
        if getattr(state, "_is_root", None) is not None:
            raise MeshError("the model has already run a forward under FSDP2: call moe_patch.apply(model) right "
                            "after from_pretrained (or set MOE_PATCH=1), before training or generating")
    for path, module in model.named_modules():
        if getattr(module, "_is_expert_parallel", False) and "forward" not in module.__dict__:
            raise MeshError(f"{path}: experts sharded by Transformers without its token dispatch "
                            "(ep_plan without 'ep_dispatch_experts'): not supported by moe_patch")


def _param_groups(state):
    groups = getattr(state, "_fsdp_param_groups", None)  # torch >= 2.12: several groups per state
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [group] if group is not None else []
    return groups


def undistribute(model) -> None:
    """Undo what Transformers' maybe_distribute_model did to `model` (FSDP2 and its expert parallelism): plain whole
    parameters (new Parameter objects; no optimizer may hold the old ones yet), no FSDP2 hook, class or state left,
    the experts' own forward and expert count back. A collective (all-gathers): call it on every rank."""
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp import FSDPModule

    for state in _fsdp_states(model):
        for group in _param_groups(state):
            for fsdp_param in group.fsdp_params:
                info = fsdp_param._module_info
                sharded = info.module._parameters[info.param_name]
                whole = sharded.full_tensor() if hasattr(sharded, "full_tensor") else sharded.data
                param = torch.nn.Parameter(whole.detach().clone(), requires_grad=sharded.requires_grad)
                for module, name in ((info.module, info.param_name),
                                     *zip(info.shared_modules, info.shared_param_names)):
                    module._parameters[name] = param
                handle = getattr(fsdp_param, "_post_load_hook_handle", None)
                if handle is not None:
                    handle.remove()
        for handle in {id(h): h for h in (state._pre_forward_hook_handle, state._post_forward_hook_handle)}.values():
            handle.remove()
        for module in state._modules:
            _module_state_mapping.pop(module, None)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.__class__ = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
        for key in [k for k in module.__dict__ if k.startswith("__composable_api_state_key")]:  # fully_shard's
            del module.__dict__[key]  # state and registry (torch.distributed._composable.contract)
        for key in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
            module.__dict__.pop(key, None)
        if getattr(module, "_is_expert_parallel", False):  # Transformers' EP: its forward, the local expert count
            module.__dict__.pop("forward", None)
            module._is_expert_parallel = False  # as Transformers' experts __init__ sets it
            module.__dict__.pop("_is_hooked", None)
            module.num_experts = next(p.shape[0] for n, p in module.named_parameters(recurse=False) if p.dim() == 3)
    for module in model.modules():  # plain tensors left as DTensors by Transformers' EP without FSDP2 (dp_size 1)
        for name, p in list(module._parameters.items()):
            if p is not None and hasattr(p, "full_tensor"):
                module._parameters[name] = torch.nn.Parameter(p.full_tensor().detach().clone(),
                                                              requires_grad=p.requires_grad)


def mesh(cfg):
    """moe_patch's mesh for this config: ("ep",) when ep spans every rank, else ("dp_shard", "ep") with
    world / ep copies of each expert block (Transformers' efsdp)."""
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if torch.cuda.is_available() else "cpu"
    world, ep = dist.get_world_size(), cfg.ep_size
    if world == ep:
        return init_device_mesh(device, (ep,), mesh_dim_names=("ep",))
    return init_device_mesh(device, (world // ep, ep), mesh_dim_names=("dp_shard", "ep"))


def _fsdp_kwargs(cfg) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if cfg.fsdp_mixed_precision:  # what Transformers' _get_fsdp_policy_kwargs sets for this flag
        return dict(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    return {}


def apply(model, cfg, **flags):
    """moe_patch.apply(model, **flags) for a model Transformers distributed with `cfg` (see the module doc)."""
    import moe_patch

    from .fsdp import fully_shard_moe

    check(model, cfg)
    undistribute(model)
    gc.collect()  # FSDP2's states reference each other: free their sharded parameters now, not at some later GC
    _TAKING_OVER.add(id(model))
    try:
        device_mesh = mesh(cfg)
        moe_patch.apply(model, mesh=device_mesh, **flags)
    except Exception:
        type(model).maybe_distribute_model(model, cfg, model._mesh_manager)  # Transformers' own, as it was
        raise
    finally:
        _TAKING_OVER.discard(id(model))
    try:
        fully_shard_moe(model, device_mesh, **_fsdp_kwargs(cfg))
    except Exception as exc:
        raise PatchError(f"FSDP2 over the expert-parallel model failed ({type(exc).__name__}: {exc}); the model's "
                         "experts are sharded but its dense part is not: reload it") from exc
    model._is_fsdp_managed_module = True  # as Transformers marks its FSDP2 models (generate's synced_gpus)
    dense = "FSDP2 over the rest on all ranks" + (", bf16 params / fp32 reductions" if cfg.fsdp_mixed_precision else "")
    for row in moe_patch.report(model).where(kind="experts"):
        if "ep" in row.replacement:
            row.reason = "; ".join(x for x in (row.reason, f"from DistributedConfig(ep_size={cfg.ep_size}, "
                                               f"fsdp_size={cfg.fsdp_size}) instead of Transformers' own "
                                               f"expert parallelism; {dense}") if x)
    return model
