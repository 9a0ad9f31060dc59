"""Hugging Face Trainer (and TRL's trainers, its subclasses) with an expert-parallel model, through its own options.

What Trainer does by itself, and what moe_patch adds so that it stays right when each rank holds other experts:

- clipping (`max_grad_norm`): Trainer calls accelerate's clip_grad_norm_, which calls torch's; clip.py makes that
  the global norm over every rank's experts.
- saving (`save_strategy`, `save_model()`): under DDP Trainer writes from rank 0 only, but the state_dict() of an
  expert-parallel model is a collective (it gathers the experts; shard.py). `Trainer.save_model` is wrapped so
  that every rank gathers first and rank 0's own save then reads that state dict: Trainer's writer runs as it
  is, and the checkpoint is the standard one (stock Transformers loads it).
- optimizer state: Trainer saves rank 0's `optimizer.state_dict()`, which holds rank 0's experts' moments only.
  `Trainer._save_optimizer_and_scheduler` is wrapped the same way: every rank gathers its experts' states whole
  (each expert once, as a stock model's optimizer would hold them); after
  `Trainer._load_optimizer_and_scheduler`, each rank keeps its experts' block of them.
- resuming (`resume_from_checkpoint`): Trainer loads the weights with `model.load_state_dict()`; resume.py turns
  the checkpoint's format into the model's, shard.py keeps this rank's experts. Scheduler and per-rank RNG states
  are Trainer's own.

The wrappers are installed (wrapt, on the Trainer class, when transformers.trainer is imported) as soon as an
expert-parallel model exists, and do nothing unless the Trainer's model is one with plain-tensor experts in a
multi-process run. Under FSDP2 Trainer's own FSDP path already calls the collectives on every rank.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from .shard import _block, gather_experts



def _ep_model(trainer):
    """The Trainer's expert-parallel model (plain-tensor experts, more than one process), else None."""
    if getattr(trainer, "is_fsdp_enabled", False) or not (dist.is_available() and dist.is_initialized()):
        return None
    model = trainer.model
    for _ in range(3):  # PEFT: PeftModel -> LoraModel -> the patched model
        record = getattr(model, "_moe_patch", None)
        if record is not None:
            break
        model = getattr(model, "base_model", None) or getattr(model, "model", None)
        if model is None:
            return None
    if record is None or not record.sharded:
        return None
    if any(hasattr(m._parameters[n], "device_mesh") for m in record.sharded for n in m._ep[3]):
        return None  # DTensor experts: FSDP2, whose state dicts torch.distributed handles
    return model


@contextlib.contextmanager
def _returning(obj, value):
    """obj.state_dict() returns (a shallow copy of) `value` inside the block."""
    had = "state_dict" in obj.__dict__
    previous = obj.__dict__.get("state_dict")
    obj.state_dict = lambda *args, **kwargs: dict(value)
    try:
        yield
    finally:
        if had:
            obj.state_dict = previous
        else:
            del obj.state_dict


def _expert_params(model):
    """[(param, module)] of the expert-parallel parameters, in a fixed order (the same on every rank)."""
    return [(m._parameters[n], m) for m in model._moe_patch.sharded for n in m._ep[3]]


def _indexed_params(optimizer):
    # torch's Optimizer.state_dict() numbers the parameters in param_groups order
    return [p for group in optimizer.param_groups for p in group["params"]]


def optimizer_state_dict(model, optimizer) -> dict:
    """optimizer.state_dict() with every expert-parallel parameter's states gathered whole over its ep group.
    A collective: call it on every rank."""
    state = optimizer.state_dict()
    index = {id(p): i for i, p in enumerate(_indexed_params(optimizer))}
    gathered = dict(state["state"])
    for param, module in _expert_params(model):
        i = index.get(id(param))
        if i is None or i not in gathered:
            continue
        group, _, size, _ = module._ep
        # new dicts: torch's state dict shares its per-parameter dicts with the optimizer itself
        gathered[i] = {k: gather_experts(v, group, size)
                       if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == module.num_experts else v
                       for k, v in gathered[i].items()}
    return dict(state, state=gathered)


def keep_local_optimizer_state(model, optimizer) -> None:
    """After optimizer.load_state_dict() of a state saved by optimizer_state_dict(): each rank keeps its experts'
    block of every expert-parallel parameter's states."""
    for param, module in _expert_params(model):
        states = optimizer.state.get(param)
        if not states or module.num_global_experts == module.num_experts:
            continue
        _, rank, size, _ = module._ep
        for k, v in list(states.items()):
            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == module.num_global_experts:
                states[k] = _block(v, rank, size).clone()


def _save_model(wrapped, trainer, args, kwargs):
    model = _ep_model(trainer)
    if model is None:
        return wrapped(*args, **kwargs)
    state = model.state_dict()  # every rank takes part in gathering the experts; rank 0 writes it
    with _returning(model, state):
        return wrapped(*args, **kwargs)


def _save_optimizer(wrapped, trainer, args, kwargs):
    model = _ep_model(trainer)
    if model is None or trainer.optimizer is None:
        return wrapped(*args, **kwargs)
    state = optimizer_state_dict(model, trainer.optimizer)
    with _returning(trainer.optimizer, state):
        return wrapped(*args, **kwargs)


def _load_optimizer(wrapped, trainer, args, kwargs):
    result = wrapped(*args, **kwargs)
    model = _ep_model(trainer)
    if model is not None and trainer.optimizer is not None:
        inner = trainer.optimizer
        while hasattr(inner, "optimizer"):  # accelerate's AcceleratedOptimizer
            inner = inner.optimizer
        keep_local_optimizer_state(model, inner)
    return result


def _wrap(module) -> None:
    import wrapt

    for name, wrapper in (("save_model", _save_model), ("_save_optimizer_and_scheduler", _save_optimizer),
                          ("_load_optimizer_and_scheduler", _load_optimizer)):
        if hasattr(module.Trainer, name):
            wrapt.wrap_function_wrapper(module, f"Trainer.{name}", wrapper)


def install() -> None:
    """Wrap Trainer's save / optimizer-state methods once transformers.trainer is imported (idempotent)."""
    from . import when_imported

    when_imported("transformers.trainer", _wrap)


class ExpertParallelCheckpoint(TrainerCallback):
    """Kept for scripts written for 0.7 (model weights saved from every rank, no optimizer state). No longer
    needed: Trainer's own `save_strategy` writes standard checkpoints with the optimizer state (see above)."""

    def __init__(self, every: int, output_dir: str | None = None):
        if every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        self.every, self.output_dir = every, output_dir

    def _save(self, args, state, model):
        path = os.path.join(self.output_dir or args.output_dir, f"checkpoint-{state.global_step}")
        model.save_pretrained(path, is_main_process=state.is_world_process_zero)  # collective: every rank

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._save(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every:  # the last step, unless just saved
            self._save(args, state, model)
