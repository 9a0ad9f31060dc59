"""Swap: build every replacement first (a failing constructor leaves the model untouched), then set them in
place, hook the proven attention modules, and install the fused-loss forward. undo() is the exact inverse.

Nothing Transformers reads is renamed (config implementation names, module classes seen through isinstance).
Transformers' own switches on a patched model re-plan the kind they concern (`follow_switches`): after
`set_attn_implementation(x)` / `set_experts_implementation(x)` what runs is what the config says.
"""
from __future__ import annotations

import dataclasses
import logging

from .ops import attention as attention_op
from .ops import loss as loss_op
from .records import Record

logger = logging.getLogger("moe_patch")

# Transformers' methods that change which implementation a kind runs; on a patched model the method runs as
# stock (the config says what was asked for) and moe_patch then re-plans that kind
SWITCHES = {"set_attn_implementation": "attention", "set_experts_implementation": "experts"}


def build(model, plan) -> list:
    """[(parent, child name, new module)] for every module swap in the plan; the model is not touched."""
    named = dict(model.named_modules())
    out = []
    for action in plan.actions:
        if action.factory is None:
            continue
        parent_path, _, child = action.row.path.rpartition(".")
        out.append((named[parent_path] if parent_path else model, child, action.factory(action.module)))
    return out


def swap(model, plan, built, record: Record) -> None:
    rows = [a.row for a in plan.actions if a.factory is not None]
    replaced = {}  # id(original module) -> its replacement: a child swapped inside a replaced module (a gated
    # MLP's projections under fp8) goes into the replacement, which is what runs and what state_dict() reads
    for (parent, child, new), row in zip(built, rows):
        parent = replaced.get(id(parent), parent)
        replaced[id(getattr(parent, child))] = new
        setattr(parent, child, new)
        new.link()  # a reference to the original taken before apply() reads and writes the live module
        record.swaps.append((parent, child, new))
        impl = getattr(getattr(new.original, "config", None), "_experts_implementation", None)
        if getattr(new, "kind", "") == "experts" and impl is not None:
            # experts that dispatch on config._experts_implementation: set_experts_implementation re-plans them
            record.experts.append([row, parent, child, new, impl, dataclasses.replace(row)])
    for action in plan.actions:
        if action.attention_impl is None:
            continue
        extras = (action.rope, action.mla)
        handles = _hook_attention(action.module, extras, record)
        record.attention_modules.append(action.module)
        record.attention.append([action.row, action.module, extras, handles, dataclasses.replace(action.row)])
    for row, module in plan.attention_later:  # not on sdpa at apply(): proven if switched to it later
        record.attention.append([row, module, (False, False), [], None])
    for action in plan.actions:
        if action.install is not None:  # kernels routed by the module's own hooks (ops/sink_attention.py)
            record.hooks += action.install(action.module)
        if action.loss_backend is not None:
            # an instance attribute: the class keeps its forward
            model.forward = loss_op.FusedLossForward(model, action.loss_backend, action.loss_step)
            record.forward_replaced = True
    follow_switches(model, record)


def _hook_attention(module, extras: tuple, record: Record) -> list:
    """The attention hooks, plus what `extras` = (rope, mla) says was proven: Liger's RoPE (ops/rope.py), MLA's
    fused q / k / v forward (ops/mla.py)."""
    rope, fused_mla = extras
    handles = attention_op.install(module)
    if fused_mla:
        from .ops import mla as mla_op

        handles += mla_op.install(module)
    if rope:
        from .ops import rope as rope_op  # lazy: Liger only where it runs

        rope_handles = rope_op.install(module)
        record.hooks += rope_handles
        handles += rope_handles
    return handles


class Switch:
    """An instance attribute over one of Transformers' SWITCHES on a PreTrainedModel of the patched tree.
    Transformers' own method runs (its checks, its errors, the config it writes); then the kind it concerns
    is re-planned by replan(). A plain object (not a closure), so a patched model still pickles."""

    def __init__(self, root, target, name: str):
        self.root, self.target, self.name = root, target, name

    def __call__(self, *args, **kwargs):
        record = getattr(self.root, "_moe_patch", None)
        if record is not None and SWITCHES[self.name] == "experts" and record.sharded:
            _warn_once(record, "moe_patch owns the experts of an expert-parallel model (each rank holds a shard "
                               "that the stock implementation cannot run): set_experts_implementation(...) is "
                               "ignored and the config keeps its value; revert needs a reload")
            return None
        result = getattr(type(self.target), self.name)(self.target, *args, **kwargs)
        if record is not None:
            replan(self.root, record)
        return result


def follow_switches(model, record: Record) -> None:
    """Put a Switch over each of Transformers' SWITCHES on every PreTrainedModel of the tree (the top model
    and its base model alike: either may be called)."""
    for module in model.modules():
        for name in SWITCHES:
            if callable(getattr(type(module), name, None)):
                object.__setattr__(module, name, Switch(model, module, name))
                record.switched.append((module, name))


def replan(model, record: Record) -> None:
    """Make what runs match what the configs now say: a kind whose implementation was switched away from
    the one it was proven under runs Transformers' stock code (attention hooks off, the stock experts
    module back in place, with the same Parameter objects), and is patched again when switched back (as
    `generate()` does on GPU with grouped_mm -> batched_mm -> grouped_mm). Attention that was on another
    implementation at apply() and is switched to "sdpa" is proven then (attention.prove) and patched if
    proven. The report rows follow."""
    for entry in record.attention:
        row, module, extras, handles, planned = entry
        impl = module.config._attn_implementation
        hooked = attention_op.is_patched(module)
        if impl != attention_op.IMPLEMENTATION:
            if hooked:
                for h in handles:
                    h.remove()
                entry[3] = []
                _warn_once(record, f"moe_patch: attention switched to {impl!r} after apply: moe_patch's attention "
                                   "patch is off while it stays so (report() says so)")
            if hooked or row.reason.startswith("stock sdpa kept"):  # (a row about sdpa: no longer what runs)
                row.status, row.replacement, row.backend = "skipped", "", ""
                row.reason = f"set_attn_implementation({impl!r}) after apply: Transformers' {impl!r} runs, unpatched"
        elif not hooked:
            if planned is None:  # on another implementation at apply(): prove it now, as plan.py would have
                why = attention_op.prove(model, module)
                if why is not None:
                    row.status, row.replacement, row.backend = "skipped", "", ""
                    row.reason = f"stock sdpa kept: kernel priority not proven equal ({why})"
                    continue
                label = f"{attention_op.describe(attention_op.probe_device(module))} (kernel priority set by the module)"
                planned = entry[4] = dataclasses.replace(row, replacement=label, backend="torch", status="patched",
                                                         reason="")
                record.attention_modules.append(module)
            entry[3] = _hook_attention(module, extras, record)
            _restore_row(row, planned)
    for entry in record.experts:
        row, parent, child, new, applied, planned = entry
        impl = new.original.config._experts_implementation
        current = getattr(parent, child)
        if impl != applied and current is new:
            setattr(parent, child, new.give_back())
            record.swaps.remove((parent, child, new))
            row.status, row.replacement, row.backend = "skipped", "", ""
            row.reason = f"set_experts_implementation({impl!r}) after apply: Transformers' {impl!r} runs, unpatched"
            _warn_once(record, f"moe_patch: experts switched to {impl!r} after apply: the stock experts modules "
                               f"run while it stays so (patched again when switched back to {applied!r})")
        elif impl == applied and current is new.original:
            new.take_back()
            setattr(parent, child, new)
            record.swaps.append((parent, child, new))
            _restore_row(row, planned)


def _restore_row(row, planned) -> None:
    for f in dataclasses.fields(row):
        setattr(row, f.name, getattr(planned, f.name))


def _warn_once(record: Record, message: str) -> None:
    if message not in record.warned:
        record.warned.add(message)
        logger.warning(message)


def undo(model, record: Record) -> None:
    for module, name in record.switched:
        if isinstance(vars(module).get(name), Switch):
            delattr(module, name)
    if record.forward_replaced and isinstance(vars(model).get("forward"), loss_op.FusedLossForward):
        del model.forward  # a forward set after apply() (a user's or accelerate's wrapper) stays; the fused
        # loss inside it runs the stock forward from now on (FusedLossForward.__call__: the model is not patched)
    for parent, child, new in reversed(record.swaps):
        original = new.give_back()
        # a module set in its place after apply() is the user's (a LayerNorm, a fresh router, ...): it stays. Only
        # moe_patch's own replacement is swapped back, wherever it is now: in its place, or inside a wrapper set
        # there since (a PEFT adapter around the experts), which keeps its adapter and gets the original
        current = parent._modules.get(child)
        if current is new:
            setattr(parent, child, original)
        elif current is not None:
            for holder in current.modules():
                for name, sub in holder._modules.items():
                    if sub is new:
                        holder._modules[name] = original
    for entry in record.attention:
        for handle in entry[3]:
            handle.remove()
    for handle in record.hooks:
        handle.remove()
