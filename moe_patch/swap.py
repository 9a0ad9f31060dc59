"""Swap: build every replacement first (a failing constructor leaves the model untouched), then set them in
place, route the marked attention modules, and install the fused-loss forward. undo() is the exact inverse."""
from __future__ import annotations

from .ops import attention as attention_op
from .ops import loss as loss_op
from .records import Record


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
    for parent, child, new in built:
        setattr(parent, child, new)
        record.swaps.append((parent, child, new))
    attn = [a for a in plan.actions if a.attention_impl is not None]
    if attn:
        attention_op.register()
        for action in attn:
            attention_op.mark(action.module, action.attention_impl, True)
            record.attention_modules.append(action.module)
            if action.rope:
                from .ops import rope  # lazy: Liger only where it runs

                record.hooks += rope.install(action.module)
        for cfg in {id(a.module.config): a.module.config for a in attn}.values():
            record.configs.append((cfg, cfg._attn_implementation))
            cfg._attn_implementation = attention_op.NAME
    for action in plan.actions:
        if action.install is not None:  # kernels routed by the module's own hooks (ops/sink_attention.py)
            record.hooks += action.install(action.module)
        if action.loss_backend is not None:
            # an instance attribute: the class keeps its forward
            model.forward = loss_op.FusedLossForward(model, action.loss_backend, action.loss_step)
            record.forward_replaced = True


def undo(model, record: Record) -> None:
    if record.forward_replaced and "forward" in vars(model):
        del model.forward
    for parent, child, new in reversed(record.swaps):
        setattr(parent, child, new.give_back())
    for module in record.attention_modules:
        attention_op.unmark(module)
    for handle in record.hooks:
        handle.remove()
    for cfg, impl in record.configs:
        cfg._attn_implementation = impl
