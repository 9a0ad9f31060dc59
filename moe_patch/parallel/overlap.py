"""Shared experts computed while the routed tokens are in flight (expert parallelism).

Families with shared experts run a dense MLP on the MoE block's input beside the routed experts; its result
does not depend on the dispatch. Where the block calls the routed experts first (DeepSeek-V3, GLM-4-MoE,
Nemotron-H without a latent projection: `experts(...)` then `shared_experts(residuals)`), the experts
module runs the shared expert itself while its tokens travel, and the block's own later call gets that
result back. With the all-to-all dispatcher the shared expert's kernels are queued on the compute stream
between the launch of the rows' all-to-all (NCCL's stream) and the wait for it, so the two run together;
dispatchers without such a window (te_ep: TE's kernels run on the compute stream) get it queued first.
Everything stays on the streams torch's collectives already use: no extra stream, no cross-stream memory
to guard (a version on a side stream changed the training trajectory on an H200 and was dropped).

A result is handed over only for the very tensor it was computed from (storage, offset, size, version: the
experts get a flat view of the block's input); anything else and the shared expert runs as usual and the
handover is switched off for that block, with a warning. Blocks that call the shared expert before routing
(Qwen2-MoE, Qwen3-Next, Ernie-4.5) keep their order: the router needs it done first, nothing to overlap.
"""
from __future__ import annotations

import warnings

import torch

from .dispatch import dispatch_with

SHARED_NAMES = ("shared_experts", "shared_expert", "shared_mlp")  # the blocks' attribute, by family


def _key(t: torch.Tensor):
    return t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t._version


class SharedExpertOverlap:
    """One MoE block's shared expert, run by its experts module beside the dispatch."""

    def __init__(self, block, shared, name: str):
        self.shared, self.name = shared, name
        self.forward = shared.forward  # the module's own forward (bound), run for real
        self.block_input = None  # key of the block's input in the current block forward
        self.kept = None  # (key, output) computed by the experts module, for the block's call
        self.ran = None  # key of an input the block already ran the shared expert on
        self.off = None  # why the handover is off for this block (None: on)
        self.handed = 0  # results handed over so far (what the tests check)
        shared.forward = self.shared_forward  # instance attribute: the class is untouched
        self.handles = [block.register_forward_pre_hook(self._enter, with_kwargs=True),
                        block.register_forward_hook(self._leave, always_call=True)]

    def _enter(self, block, args, kwargs):
        self.kept = self.ran = None
        x = args[0] if args else kwargs.get("hidden_states")
        self.block_input = _key(x) if torch.is_tensor(x) else None

    def _leave(self, block, args, output):
        self.kept = self.ran = self.block_input = None  # never hand over across block calls

    def shared_forward(self, x, *args, **kwargs):
        if self.kept is not None:
            key, out = self.kept
            self.kept = None
            if key == _key(x) and not args and not kwargs:
                self.handed += 1
                return out.view(*x.shape[:-1], out.shape[-1])
            self.off = "the block calls its shared expert on another tensor than the experts' input"
            warnings.warn(f"moe_patch: {self.name}: {self.off}; shared-expert overlap switched off for it",
                          RuntimeWarning, stacklevel=2)
        if torch.is_tensor(x):
            self.ran = _key(x)
        return self.forward(x, *args, **kwargs)

    def dispatch(self, dispatcher, hidden, top_k_index, top_k_weights, num_experts):
        """dispatcher.dispatch(...), with the block's shared expert computed while the tokens travel."""
        key = _key(hidden)
        routed = (hidden, top_k_index, top_k_weights, num_experts)
        if self.off is not None or self.ran == key or self.block_input != key:
            # handover off, the block already ran it (Qwen2-MoE order), or the experts' input is not the
            # block's (Nemotron-H's latent projection): the block runs its shared expert itself
            return dispatcher.dispatch(*routed)

        def in_flight():
            self.kept = (key, self.forward(hidden))

        return dispatch_with(dispatcher, in_flight, *routed)

    def remove(self, experts) -> None:
        del self.shared.forward  # back to the class's forward
        for h in self.handles:
            h.remove()
        experts._overlap = None


def install(model, record) -> dict:
    """Pair each swapped experts module with its block's shared expert: {experts path: SharedExpertOverlap}."""
    from ..ops.experts import GroupedExperts

    pairs = {}
    paths = {id(m): p for p, m in model.named_modules()}
    for parent, child, new in record.swaps:
        if not isinstance(new, GroupedExperts):
            continue
        for name in SHARED_NAMES:
            shared = getattr(parent, name, None)
            if isinstance(shared, torch.nn.Module):
                block = paths.get(id(parent), "")
                new._overlap = SharedExpertOverlap(parent, shared, f"{block}.{name}".lstrip("."))
                pairs[f"{block}.{child}".lstrip(".")] = new._overlap
                break
    return pairs
