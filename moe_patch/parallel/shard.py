"""Expert parallelism: keep this rank's contiguous block of experts, install the token dispatcher.

EP rank r keeps experts [r*E/ep, (r+1)*E/ep) as the first dimension of the same Parameter objects (their
storage is replaced by the block, the rest is freed). state_dict() of an expert-parallel model gathers the
full expert tensors (a collective: call it, or save_pretrained, on every rank; pass
is_main_process=rank == 0 so one process writes), and load_state_dict() accepts full tensors and keeps the
local block, so a standard Hugging Face checkpoint goes in and out unchanged.

Gradients: an expert's gradient is that of the mean of the per-rank losses, like the dense parameters' under
DDP / FSDP. With a 1-D ("ep",) mesh, DDP works (the expert parameters are on DDP's ignore list: they are not
replicas); meshes with a dp_shard dimension need moe_patch.parallel.fsdp.fully_shard_moe.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import MeshError, PatchError
from ..ops.experts import GroupedExperts
from . import clip, dispatch, overlap


def _ep_mesh(mesh):
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if "ep" not in names:
        raise MeshError(f"the mesh needs an 'ep' dimension (mesh_dim_names={tuple(names)}); "
                        "e.g. init_device_mesh('cuda', (n,), mesh_dim_names=('ep',))")
    return mesh["ep"]


def _expert_count(module) -> int | None:
    for name in ("gate_up_proj", "up_proj"):
        p = getattr(module, name, None)
        if isinstance(p, torch.nn.Parameter) and p.dim() == 3:
            return p.shape[0]
    return None


def validate(model, mesh, dispatcher: str = "auto", max_tokens_per_rank: int | None = None,
             shared_overlap: bool = True) -> dict:
    """Check the mesh against the model and resolve the dispatcher; returns the options for shard()."""
    if not isinstance(shared_overlap, bool):
        raise PatchError(f"shared_overlap must be True or False, got {shared_overlap!r}")
    if dispatcher not in dispatch.NAMES:
        raise PatchError(f"dispatcher must be one of {list(dispatch.NAMES)}, got {dispatcher!r}")
    if max_tokens_per_rank is not None and (not isinstance(max_tokens_per_rank, int) or max_tokens_per_rank < 1):
        raise PatchError(f"max_tokens_per_rank must be a positive int, got {max_tokens_per_rank!r}")
    if not hasattr(mesh, "get_group"):  # checked first: a str or a size is not a mesh, initialised or not
        raise MeshError(f"mesh must be a torch.distributed DeviceMesh with an 'ep' dimension "
                         f"(init_device_mesh(...)), got {type(mesh).__name__} {mesh!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise MeshError("expert parallelism needs torch.distributed initialised (torchrun + init_process_group)")
    ep_mesh = _ep_mesh(mesh)
    ep, dtype = ep_mesh.size(), None
    for path, module in model.named_modules():
        if hasattr(module, "has_gate") and hasattr(module, "is_transposed"):
            n = _expert_count(module)
            if n is not None and n % ep:
                raise MeshError(f"{path}: {n} experts cannot be split evenly over ep={ep} ranks")
            dtype = dtype or next(module.parameters()).dtype
    name, why = dispatch.choose(dispatcher, ep_mesh.get_group(), dtype)
    return dict(dispatcher=name, why=why, max_tokens_per_rank=max_tokens_per_rank, shared_overlap=shared_overlap)


def check_plan(plan, mesh) -> None:
    # experts left unpatched run replicated: correct, but a user passing a mesh must be told
    for r in plan.rows:
        if r.kind == "experts" and r.status == "skipped":
            r.reason += " (kept whole on every rank: not expert-parallel)"


def _block(tensor, rank, size):
    n = tensor.shape[0] // size
    return tensor[rank * n:(rank + 1) * n]


def shard(model, mesh, record, dispatcher: str, why: str, max_tokens_per_rank=None, shared_overlap=True):
    ep_mesh = _ep_mesh(mesh)
    group, rank, size = ep_mesh.get_group(), ep_mesh.get_local_rank(), ep_mesh.size()
    experts = [m for _, _, m in record.swaps if isinstance(m, GroupedExperts)]
    # two phases, so that a failure (out of memory) cannot leave some experts cut and others whole:
    # first every local block is copied out, then the Parameters are pointed at them (cannot fail)
    blocks = []
    rows = [r for r in record.rows if r.kind == "experts" and r.status != "skipped"]
    choice = dispatch.FirstForwardChoice(group, rows) if dispatcher == "auto" else None
    with torch.no_grad():
        for module in experts:
            names = [n for n, p in module.named_parameters(recurse=False)
                     if p.dim() >= 2 and p.shape[0] == module.num_experts]
            blocks.append((module, names, [_block(module._parameters[n].data, rank, size).clone() for n in names]))
    for module, names, local in blocks:
        for name, data in zip(names, local):
            module._parameters[name].data = data  # same Parameter object, only this rank's experts kept
        module.num_global_experts = module.num_experts
        module.num_experts = module.num_experts // size
        # the module's local permuter (torch, or TE's fused permute) keeps sorting tokens on their own rank
        if choice is not None:  # "auto" decided at the first forward
            module.dispatcher = dispatch.DeferredDispatcher(choice, group, size, module.num_experts, module.dispatcher,
                                                            max_tokens_per_rank)
        else:
            cls = dispatch.DISPATCHERS[dispatcher]()
            extra = dict(max_tokens_per_rank=max_tokens_per_rank) if dispatcher == "te_ep" else {}
            module.dispatcher = cls(group, size, module.num_experts, permuter=module.dispatcher, **extra)
        module._ep = (group, rank, size, tuple(names))
        module._register_state_dict_hook(_gather_on_save)
        module._register_load_state_dict_pre_hook(_slice_on_load, with_module=True)
        clip.register(module)  # torch's clip_grad_norm_ gives the global norm over every rank's experts
        # the all-to-all backward sums every rank's loss into an expert's gradient; DDP and FSDP average
        # the dense gradients, so the experts' are averaged too (scaled where the module takes its weights)
        module.grad_factor = 1.0 / size
    _ignore_in_ddp(model, blocks)
    _install_ddp_ignore()
    from . import fsdp  # torch's own fully_shard of these experts refused (fsdp.install_refusal)

    fsdp.install_refusal()
    from . import trainer  # Trainer's own clipping, saving and resuming with these experts (trainer.py)

    trainer.install()
    from . import lora  # PEFT LoRA on these experts' weights: saved whole, loaded per rank, clipped globally

    lora.install()
    pairs = overlap.install(model, record) if shared_overlap else {}
    for row in rows:
        row.replacement += f" + ep{size}/{dispatcher}"
        extra = f"shared expert {pairs[row.path].name} computed beside the dispatch" if row.path in pairs else ""
        row.reason = "; ".join(x for x in (row.reason, f"dispatcher {dispatcher}: {why}", extra) if x)
    return experts


def _ignore_in_ddp(model, blocks):
    """Each rank holds other experts under the same names: DDP (e.g. Trainer under torchrun) would overwrite
    them with rank 0's at wrap time and then average different experts. DDP skips the names listed here."""
    paths = {id(m): path for path, m in model.named_modules()}
    names = {f"{paths[id(module)]}.{n}" for module, local_names, _ in blocks for n in local_names}
    model._ddp_params_and_buffers_to_ignore = sorted(set(getattr(model, "_ddp_params_and_buffers_to_ignore", ())) | names)


def _ddp_init(wrapped, instance, args, kwargs):
    """DistributedDataParallel.__init__, with the expert-parallel parameters inside the wrapped module on its ignore
    list under their names there. DDP reads that list from the module it wraps, by name, so the list _ignore_in_ddp
    put on the model misses when DDP wraps something holding it (a value head beside it, PEFT's PeftModel, which
    Trainer wraps for LoRA): DDP then broadcast rank 0's experts over every other rank's and averaged different
    experts' gradients."""
    module = args[0] if args else kwargs.get("module")
    if isinstance(module, torch.nn.Module) and clip._EP_MODULES:
        ep_params = {id(m._parameters[n]) for m in list(clip._EP_MODULES) for n in m._ep[3]}
        names = {n for n, p in module.named_parameters() if id(p) in ep_params}
        if names:
            _refuse_adapters_on_experts(module, ep_params)
            replicas = _dp_replicas(module)  # checked before anything changes
            from torch.nn.parallel import DistributedDataParallel
            from .launch import _average_over_dp

            known = set(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
            # DDP's reducer names a parameter f"{module_name}.{param_name}": one of the wrapped module's own (module
            # name "") is ".name" there, while its other checks use "name". torch's composable replicate() wraps a
            # ParameterList of every parameter, all of them its own: listed as "name" only, the experts were
            # all-reduced with the other ranks' experts (gradients 74-83% off, qwen3_moe, 2 ranks).
            names |= {f".{n}" for n in names if "." not in n}
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, sorted(known | names))
            for model, dp_mesh in replicas:
                _average_over_dp(model, dp_mesh.get_group(), dp_mesh.size())
    return wrapped(*args, **kwargs)


def _refuse_adapters_on_experts(module, ep_params):
    """A PEFT adapter on the experts' own weights (LoraConfig(target_parameters=["mlp.experts.gate_up_proj"]), and
    target_modules="all-linear" in PEFT 0.21, which adds the fused experts' 3-D weights by itself) wraps
    the experts module (its `base_layer`) with weights per local expert: no replicas, which DDP would broadcast from
    rank 0 and average over different experts (logits 6e-1 off stock on qwen3_moe, 2 ranks). Refused before DDP
    changes anything. Without DDP they are saved whole and clipped over the ep ranks (lora.py)."""
    from . import lora

    adapters = {id(p) for w in list(lora.WRAPPERS) for p in lora.parameters(w)}
    for path, m in module.named_modules():
        base = m.__dict__.get("_modules", {}).get("base_layer")
        if (base in clip._EP_MODULES and any(id(p) not in ep_params for p in m.parameters())) \
                or any(id(p) in adapters for p in m.parameters(recurse=False)):
            # (the second test: the adapters' weights without their wrapper, as in the ParameterList torch's
            # composable replicate() hands DDP)
            raise MeshError(f"{path or type(m).__name__}: {type(m).__name__} adapts expert-parallel experts (PEFT "
                            "target_parameters, which target_modules='all-linear' includes), or holds such adapters' "
                            "weights; they are per local expert, which DDP would treat as replicas: not supported "
                            "under DDP (a loop without DDP is); adapt other modules (e.g. q_proj)")


def _dp_replicas(module) -> list:
    """[(model, its mesh's dp dimension)] for the expert-parallel models in `module` whose experts have replicas.
    DDP averages the dense gradients over its ranks but not the ignored experts: on a (dp, ep) mesh each expert block
    has a replica on every rank of the other dimension, whose gradients differed (each rank's own, about 100% off the
    mean) when the model was patched on such a mesh by hand. _ddp_init averages them over it, as the launcher does
    (launch._average_over_dp, once per model)."""
    found = []
    for m in module.modules():
        record = m.__dict__.get("_moe_patch")
        mesh = getattr(record, "mesh", None)
        if mesh is None or not record.sharded:
            continue
        others = [n for n in mesh.mesh_dim_names if n != "ep" and mesh[n].size() > 1]
        if len(others) > 1:
            raise MeshError(f"DDP of a model expert-parallel on a mesh of {mesh.mesh_dim_names}: its experts have "
                            f"replicas over {others}; use a 1-D ('ep',) or 2-D (dp, ep) mesh, or fully_shard_moe")
        if others:
            found.append((m, mesh[others[0]]))
    return found


def _install_ddp_ignore():
    """Wrap DistributedDataParallel.__init__ (wrapt, once per process) with _ddp_init."""
    from torch.nn.parallel import distributed

    from . import wrap_once

    wrap_once(distributed, "DistributedDataParallel.__init__", _ddp_init)


def gather_experts(local, group, size, num_global=None):
    """All ranks' expert blocks of one tensor (this rank's `local`) as one whole [experts, ...] tensor, in rank
    order. A collective over the ep group. Under fully_shard_moe `local` is a DTensor: sharded over the ep ranks
    (1-D mesh: its full tensor is already whole) or over dp_shard (then gathered over ep as well)."""
    if hasattr(local, "full_tensor"):
        local = local.full_tensor()
        if local.shape[0] == num_global:
            return local
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts)


def local_experts(full, param, rank, size):
    """This rank's block of a whole [experts, ...] tensor, in the layout of `param`: a plain tensor, or under
    fully_shard_moe a DTensor like the parameter (each rank takes its part of the whole tensor it holds)."""
    if hasattr(param, "device_mesh") and not hasattr(full, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        whole = param.shape[0] == full.shape[0]  # sharded over the ep ranks: the DTensor's global shape is whole
        return distribute_tensor(full if whole else _block(full, rank, size).contiguous(), param.device_mesh,
                                 param.placements, src_data_rank=None)
    return _block(full, rank, size).contiguous()


def _gather_on_save(module, state_dict, prefix, local_metadata):
    group, rank, size, names = module._ep
    for name in names:
        state_dict[prefix + name] = gather_experts(state_dict[prefix + name], group, size, module.num_global_experts)
    return state_dict


def _slice_on_load(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    group, rank, size, names = module._ep
    for name in names:
        key = prefix + name
        full = state_dict.get(key)
        if full is not None and full.shape[0] == module.num_global_experts != module.num_experts:
            # e.g. torch's set_state_dict after a DCP load under fully_shard_moe: the parameter's DTensor layout
            state_dict[key] = local_experts(full, module._parameters[name], rank, size)
