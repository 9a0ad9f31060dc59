"""Expert parallelism: shard experts over a DeviceMesh's `ep` dimension and move tokens between ranks.

shard.py     validate the mesh, choose the dispatcher, keep this rank's experts (apply(model, mesh) calls it)
dispatch.py  the all-to-all dispatcher (exact reference) and the choice among dispatchers (at apply(), or
             at the first forward when only fp32 weights stand in te_ep's way)
te_ep.py     TransformerEngine NCCL-EP fused dispatch;  deepep.py  DeepEP adapter (unverified)
fsdp.py      fully_shard_moe: FSDP2 around an expert-parallel model
clip.py      global-norm gradient clipping (torch's clip_grad_norm_ made exact; by hand: bare, DDP, FSDP2)
trainer.py   Trainer's own save / optimizer-state / resume paths under expert parallelism
launch.py    MOE_PATCH_EP=N under torchrun / accelerate launch: check, mesh, apply, compose with DDP / FSDP2
distributed_config.py  from_pretrained(distributed_config=DistributedConfig(ep_size=N)) models: Transformers'
             distribution undone, moe_patch's expert parallelism + FSDP2 on the config's mesh
checkpoint.py  model + optimizer state for torch.distributed.checkpoint (resuming EP training)
"""

_HOOKED: set = set()


def when_imported(module_name: str, fn) -> None:
    """fn(module) once `module_name` is imported (at once if it already is): wrapt's post-import hook, registered
    once per (module_name, fn) however often this is called (trainer.install, lora.install)."""
    if (module_name, fn) in _HOOKED:
        return
    import wrapt

    wrapt.register_post_import_hook(fn, module_name)
    _HOOKED.add((module_name, fn))


def wrap_once(owner, path: str, wrapper) -> None:
    """wrapt.wrap_function_wrapper(owner, path, wrapper) (path "Class.method" or "function"), once per process: the
    wrapped function is marked, and a second call, or one for a path `owner` does not have, changes nothing
    (shard.py: DDP's __init__; fsdp.py: FSDPState.init; lora.py: PEFT's ParamWrapper.update_layer)."""
    target = owner
    for part in path.split("."):
        target = getattr(target, part, None)
        if target is None or getattr(target, "_moe_patch", False):
            return
    import wrapt

    wrapt.wrap_function_wrapper(owner, path, wrapper)
    target = owner
    for part in path.split("."):
        target = getattr(target, part)
    target._moe_patch = True
