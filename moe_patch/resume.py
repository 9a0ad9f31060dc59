"""load_state_dict() of a checkpoint as save_pretrained() wrote it (what Trainer's resume_from_checkpoint does).

Transformers v5 keeps fused 3-D experts in memory (`mlp.experts.gate_up_proj [E, 2I, H]`) but save_pretrained()
writes the checkpoint format of the family (`mlp.experts.0.gate_proj.weight`, ...), through the conversion
mapping it reverses on save (`transformers.core_model_loading.revert_weight_conversion`). from_pretrained()
converts back; torch's `load_state_dict()`, which Trainer's resume calls, does not: a stock model then reports
the fused experts missing and the per-expert keys unexpected, and training resumes from the initial experts.

apply() registers `convert_on_load` as a load_state_dict pre-hook on the patched model: a state dict whose keys
are not the model's own is converted with the same conversion mapping, forward (the WeightConverter /
WeightRenaming objects Transformers' loader uses), before torch loads it. A state dict in the model's own
format passes through untouched.
"""
from __future__ import annotations

from copy import deepcopy


def _conversions(model):
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    found = getattr(model, "_weight_conversions", None)
    if found is None:  # built by from_config / directly: the family's default mapping, as revert_weight_conversion does
        found = [t for t in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(t, PrefixChange)]
    return found or []


def to_model_format(model, state_dict: dict) -> dict:
    """`state_dict` (checkpoint format, full tensors) with the model's own keys and layouts: the forward of
    revert_weight_conversion. Keys no conversion matches are kept as they are."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    transforms = _conversions(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    pending = {}
    for key, tensor in sorted(state_dict.items(), key=lambda kv: dot_natural_key(kv[0])):
        target, pattern = rename_source_key(key, renamings, converters)
        if pattern is not None:  # each target gets its own converter instance, as the loader does
            transform = pending.setdefault(target, deepcopy(by_pattern[pattern]))
        else:
            transform, pattern = pending.setdefault(target, WeightRenaming(key, target)), key
        transform.add_tensor(target, key, pattern, tensor)
    out = {}
    for target, transform in pending.items():
        for name, value in transform.convert(target, model=model, config=model.config).items():
            out[name] = value[0] if isinstance(value, list) else value
    return out


def _own_keys(model) -> set:
    # the state_dict() keys without calling state_dict() (a collective under expert parallelism)
    keys = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for path, m in model.named_modules(remove_duplicate=False):
        keys |= {f"{path}.{n}" if path else n for n, b in m._buffers.items()
                 if b is not None and n not in m._non_persistent_buffers_set}
    return keys


def convert_on_load(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """load_state_dict pre-hook of the top model: convert a checkpoint-format state dict in place."""
    if prefix or not state_dict:
        return
    own = _own_keys(module)
    foreign = [k for k in state_dict if k not in own]
    if not foreign or not _conversions(module):
        return
    converted = to_model_format(module, state_dict)
    if sum(k in own for k in converted) <= sum(k in own for k in state_dict):
        return  # the conversion does not bring the keys closer to the model's: leave torch to report them
    state_dict.clear()
    state_dict.update(converted)


def install(model):
    """Register the pre-hook on `model`; returns the handle (apply() keeps it for revert())."""
    return model._register_load_state_dict_pre_hook(convert_on_load, with_module=True)
