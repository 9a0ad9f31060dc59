"""PEFT LoRA on the expert-parallel experts' own weights (LoraConfig(target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"]), and target_modules="all-linear" in PEFT 0.21, which adds them by itself).

PEFT's ParamWrapper adapts a 3-D [experts, ...] parameter with one LoRA pair per expert, the expert dimension
folded into the rank dimension of two nn.Linear weights:

    lora_A.<adapter>.weight  [r * E, in]     expert-major rows: expert e is rows e*r .. e*r+r-1
    lora_B.<adapter>.weight  [out, r * E]    expert-minor columns: column j*E + e is rank j of expert e

On an expert-parallel model E is this rank's local expert count, so each rank holds its own experts' adapters
under the same names. As for the experts themselves (shard.py), state_dict() of such a wrapper gathers them whole
over the ep ranks, in the layout of the same adapter on the unsharded model (a collective: PeftModel.save_pretrained
on every rank, is_main_process=rank == 0), and load_state_dict() (PeftModel.from_pretrained, load_adapter) of whole
tensors keeps this rank's block. clip.py counts their gradients over the ep ranks (they differ per rank, as the
experts' do). Their gradients are already those of the mean of the per-rank losses: PEFT computes through the
experts' weight (a parametrization), which the experts module scales by 1 / ep (GroupedExperts.expert_weight).

The wrappers are found when PEFT builds or extends them (ParamWrapper.update_layer, wrapped with wrapt once
peft.tuners.lora.layer is imported); PEFT models are built after apply() (engine.py refuses PEFT models).
"""
from __future__ import annotations

import weakref

from ..errors import MeshError
from . import clip
from .shard import _block, gather_experts

WRAPPERS = weakref.WeakSet()  # ParamWrappers adapting plain-tensor expert-parallel parameters


def _experts_of(wrapper):
    """The expert-parallel experts module a PEFT ParamWrapper adapts (through nested wrappers), else None."""
    base = wrapper.get_base_layer()
    return base if base in clip._EP_MODULES else None


def parameters(wrapper):
    """The LoRA parameters of `wrapper` that hold one block per local expert."""
    return [p for name in ("lora_A", "lora_B") for m in getattr(wrapper, name).values() for p in m.parameters()]


def _gather_on_save(wrapper, state_dict, prefix, local_metadata):
    experts = _experts_of(wrapper)
    group, _, size, _ = experts._ep
    for adapter in sorted(wrapper.lora_A.keys()):
        r = wrapper.r[adapter]
        a_key, b_key = f"{prefix}lora_A.{adapter}.weight", f"{prefix}lora_B.{adapter}.weight"
        if a_key in state_dict:  # rows of the local experts, in order: whole = the ranks' blocks one after another
            state_dict[a_key] = gather_experts(state_dict[a_key], group, size)
        if b_key in state_dict:  # columns j * E_local + e: gather as [out, r, E_local] along the experts
            b = state_dict[b_key]
            local = b.reshape(b.shape[0], r, experts.num_experts).permute(2, 0, 1)  # [E_local, out, r]
            whole = gather_experts(local, group, size)  # [E, out, r]
            state_dict[b_key] = whole.permute(1, 2, 0).reshape(b.shape[0], r * experts.num_global_experts)
    return state_dict


def _slice_on_load(wrapper, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    experts = _experts_of(wrapper)
    _, rank, size, _ = experts._ep
    n_local, n_global = experts.num_experts, experts.num_global_experts
    for adapter in list(wrapper.lora_A.keys()):
        r = wrapper.r[adapter]
        a_key, b_key = f"{prefix}lora_A.{adapter}.weight", f"{prefix}lora_B.{adapter}.weight"
        a, b = state_dict.get(a_key), state_dict.get(b_key)
        if a is not None and a.dim() == 2 and a.shape[0] == r * n_global:
            state_dict[a_key] = _block(a, rank, size).contiguous()
        if b is not None and b.dim() == 2 and b.shape[1] == r * n_global:
            whole = b.reshape(b.shape[0], r, n_global)
            state_dict[b_key] = whole[:, :, rank * n_local:(rank + 1) * n_local].reshape(b.shape[0], r * n_local)


def register(wrapper) -> None:
    """Called after PEFT's ParamWrapper.update_layer: a wrapper of expert-parallel experts gets its hooks (once)."""
    experts = _experts_of(wrapper)
    if experts is None or wrapper in WRAPPERS:
        return
    param = wrapper.get_param()
    if hasattr(param, "device_mesh"):
        raise MeshError(f"PEFT LoRA on the experts' {wrapper.parameter_name} under fully_shard_moe: not supported; "
                        "adapt other modules (e.g. q_proj, v_proj), or train without fully_shard_moe")
    if wrapper.num_experts != experts.num_experts:
        raise MeshError(f"PEFT LoRA on {wrapper.parameter_name}: {wrapper.num_experts} experts, the expert-parallel "
                        f"module holds {experts.num_experts}")
    wrapper._register_state_dict_hook(_gather_on_save)
    wrapper._register_load_state_dict_pre_hook(_slice_on_load, with_module=True)
    WRAPPERS.add(wrapper)


def _update_layer(wrapped, instance, args, kwargs):
    result = wrapped(*args, **kwargs)
    register(instance)
    return result


def _wrap(module) -> None:
    from . import wrap_once

    wrap_once(module, "ParamWrapper.update_layer", _update_layer)


def install() -> None:
    """Wrap PEFT's ParamWrapper.update_layer once peft.tuners.lora.layer is imported (idempotent)."""
    from . import when_imported

    when_imported("peft.tuners.lora.layer", _wrap)
