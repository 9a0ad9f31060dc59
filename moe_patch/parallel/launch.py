"""Expert parallelism from the launcher, with no change to the training script.

    MOE_PATCH=1 MOE_PATCH_EP=2 torchrun --nproc-per-node 4 train.py

When MOE_PATCH=1 patches a model Transformers built (auto.py), `apply(model)` here takes MOE_PATCH_EP from the
environment and the world from the launcher (torchrun and `accelerate launch` set WORLD_SIZE / RANK /
LOCAL_RANK), then:

1. checks the EP size against the world size and the model's expert counts (`check`): a one-line MeshError
   before anything is changed;
2. initialises torch.distributed where the launcher has not yet (Trainer / accelerate reuse that process group;
   default backends: gloo for CPU tensors, NCCL for CUDA ones), and builds one DeviceMesh per process:
   ("ep",) when EP spans every rank, else (dp, ep) with world / EP replicas of each expert block;
3. `moe_patch.apply(model, mesh=mesh)`: this rank's experts, the fastest dispatcher ("auto");
4. composes with the launcher's data parallelism. Under DDP (what Trainer and accelerate use for torchrun
   without an FSDP config) the experts are on DDP's ignore list; with dp > 1 their gradients are averaged over
   the dp ranks holding the same experts (a post-accumulate-grad hook, as DDP does for the rest), so every
   parameter gets the gradient of the mean of all ranks' losses. Under `accelerate launch` with an FSDP2
   config (ACCELERATE_USE_FSDP=true, FSDP_VERSION=2) the mesh is ("ep",) or (dp_shard, ep) and
   fully_shard_moe shards the model with the policy accelerate's own FullyShardedDataParallelPlugin reads
   from that config (reshard_after_forward, mixed precision); accelerate then finds an FSDP2 module and leaves
   it as it is. Left to itself it would shard the expert blocks as if every rank held the same experts.
   This FSDP2 path needs GPUs (accelerate runs FSDP on GPUs only): tested on 2 GPUs (tests/test_launch.py,
   gpu marker), equal to the stock single-GPU run, exact resume. On CPU
   accelerate turns an FSDP config into DDP, and so does moe_patch (tested: tests/test_launch.py).

MOE_PATCH_EP unset (or 1 in a single process): plain `moe_patch.apply(model)`.
"""
from __future__ import annotations

import atexit
import os
import weakref

import torch
import torch.distributed as dist

from ..errors import MeshError

_AVERAGED = weakref.WeakSet()  # models whose expert replicas are averaged over dp (_average_over_dp)
_MESHES = {}  # (device type, world, ep) -> DeviceMesh: one mesh (one set of process groups) per process


def ep_size() -> int | None:
    """MOE_PATCH_EP as an int (None when unset); a bad value is a one-line MeshError."""
    raw = os.environ.get("MOE_PATCH_EP", "").strip()
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:  # (str.isdigit also takes '²', which int() refuses)
        raise MeshError(f"MOE_PATCH_EP={raw!r}: expected a positive integer (the expert-parallel size)")
    return int(raw)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def _expert_counts(model):
    from .shard import _expert_count

    for path, module in model.named_modules():
        if hasattr(module, "has_gate") and hasattr(module, "is_transposed"):
            n = _expert_count(module)
            if n is not None:
                yield path, n


def check(model) -> int | None:
    """The EP size asked for by MOE_PATCH_EP, checked against the world size and every experts module of
    `model`; raises MeshError (one line) before anything is changed."""
    from . import distributed_config

    ep = ep_size()
    cfg = distributed_config.config(model)
    if cfg is not None:  # from_pretrained(distributed_config=...): the config's mesh (distributed_config.py)
        distributed_config.check_environment(cfg)
        return None
    if ep is None:
        return None
    world = _world()
    if world % ep:
        raise MeshError(f"MOE_PATCH_EP={ep} does not divide the world size {world} "
                        "(the number of processes the launcher started)")
    if _accelerate_fsdp2() and ep != world:
        # fully_shard_moe's (dp_shard, ep) mesh leaves the experts on the dp_shard sub-mesh, where Trainer's and
        # accelerate's clipping would take each ep rank's expert norm alone
        raise MeshError(f"MOE_PATCH_EP={ep} under accelerate's FSDP2 must equal the world size {world} "
                        "(expert parallelism over every rank); for ep < world use torchrun / DDP")
    for path, n in _expert_counts(model):
        if n % ep:
            raise MeshError(f"MOE_PATCH_EP={ep} does not divide the {n} experts of {path}")
    return ep


def _accelerate_fsdp2() -> bool:
    """Whether accelerate will shard with FSDP2: an FSDP config of version 2, on an accelerator. On CPU (no GPU, or
    `use_cpu: true`) accelerate ignores the FSDP config and wraps the model in DDP, so moe_patch does the DDP
    composition there (sharding with FSDP2 first made accelerate's DDP fail on the mixed DTensor parameters)."""
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" or not torch.cuda.is_available()
    return (os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
            and os.environ.get("FSDP_VERSION", "1").strip() == "2" and not on_cpu)


def _fsdp2_kwargs() -> dict:
    """fully_shard's reshard_after_forward and mp_policy as accelerate's FSDP plugin reads them from its config."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch sets
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision != "no":
        plugin.set_mixed_precision(precision)
    kwargs = dict(reshard_after_forward=plugin.reshard_after_forward)
    if plugin.mixed_precision_policy is not None:
        kwargs["mp_policy"] = plugin.mixed_precision_policy
    return kwargs


def mesh(ep: int):
    """The process's DeviceMesh for expert parallelism of size `ep` (initialising torch.distributed if needed)."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group()  # the launcher's env:// rendezvous; gloo for CPU tensors, NCCL for CUDA ones
        # created here, so torn down here: Trainer / accelerate scripts never call destroy_process_group(), and a
        # gloo group left to the interpreter's exit aborted now and then after all the work was done
        # ("terminate called without an active exception", SIGABRT; about 1 run in 6-10 of the CPU tests)
        atexit.register(_destroy_process_group)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    world = dist.get_world_size()
    dp = "dp_shard" if _accelerate_fsdp2() else "dp"  # fully_shard_moe's name for the FSDP2 dimension
    key = (device, world, ep, dp)
    if key not in _MESHES:
        if world == ep:
            _MESHES[key] = init_device_mesh(device, (ep,), mesh_dim_names=("ep",))
        else:
            _MESHES[key] = init_device_mesh(device, (world // ep, ep), mesh_dim_names=(dp, "ep"))
    return _MESHES[key]


def _destroy_process_group():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # finalises te_ep first where it ran (te_ep.py)


def _average_over_dp(model, dp_group, dp_size):
    """Each expert block has dp_size replicas (one per dp rank) which DDP does not see: average their gradients.
    Once per model (shard.py calls it too, when DDP wraps a model patched on a (dp, ep) mesh by hand)."""
    if model in _AVERAGED:
        return
    _AVERAGED.add(model)

    def average(param):
        if param.grad is not None:
            param.grad.div_(dp_size)
            dist.all_reduce(param.grad, group=dp_group)

    for module in model._moe_patch.sharded:
        for name in module._ep[3]:
            param = module._parameters[name]
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(average)


def apply(model):
    """moe_patch.apply(model), with expert parallelism when MOE_PATCH_EP asks for it (see the module doc)."""
    import moe_patch

    ep = check(model)
    if ep is None or (ep == 1 and _world() == 1):
        return moe_patch.apply(model)
    device_mesh = mesh(ep)
    moe_patch.apply(model, mesh=device_mesh)
    if _accelerate_fsdp2():
        from .fsdp import fully_shard_moe

        fully_shard_moe(model, device_mesh, **_fsdp2_kwargs())
    elif "dp" in (device_mesh.mesh_dim_names or ()) and device_mesh["dp"].size() > 1:
        _average_over_dp(model, device_mesh["dp"].get_group(), device_mesh["dp"].size())
    return model
