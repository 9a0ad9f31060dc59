"""Attention through Transformers' own AttentionInterface.

Attention modules are not swapped (their forward holds each family's RoPE, q/k norms, sinks, caches):
moe_patch registers one attention function, "moe_patch_sdpa", that runs Transformers' SDPA path under
an explicit kernel priority (cuDNN > Flash > memory-efficient > math on GPU), and marks which modules
use it. An unmarked module (skipped by the user) keeps the implementation the model had before.
"""
from __future__ import annotations

import inspect
from functools import lru_cache

import torch

NAME = "moe_patch_sdpa"
_MARK = "_moe_patch_attention"  # on each attention module: (original implementation, patched?)


def gpu_priority():
    from torch.nn.attention import SDPBackend

    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.MATH]


def describe(device: torch.device) -> str:
    return "sdpa[cudnn>flash>efficient>math]" if device.type == "cuda" else "sdpa[cpu]"


def moe_patch_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    original, patched = getattr(module, _MARK, ("sdpa", False))
    if not patched:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        fn = ALL_ATTENTION_FUNCTIONS.get_interface(original, sdpa_attention_forward)
        return fn(module, query, key, value, attention_mask, **kwargs)
    if query.device.type == "cuda":
        return with_gpu_priority(sdpa_attention_forward, module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@lru_cache(maxsize=8)
def _order(previous: tuple) -> list:
    """gpu_priority() first, then the rest of the current order (as sdpa_kernel(set_priority=True) does)."""
    first = [int(b) for b in gpu_priority()]
    return first + [b for b in previous if b not in first]


def with_gpu_priority(fn, *args, **kwargs):
    """fn under gpu_priority()'s kernel order. Only the order is set and put back: torch's public
    sdpa_kernel(..., set_priority=True) also rewrites every backend's enable flag twice, about 140 us of host
    time per call on an H200 host, and a training forward is host-bound (CHANGELOG 0.5.0). Backends the user
    disabled stay disabled."""
    get, set_ = getattr(torch._C, "_get_sdp_priority_order", None), getattr(torch._C, "_set_sdp_priority_order", None)
    if get is None or set_ is None:  # another torch: the public context manager
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(gpu_priority(), set_priority=True):
            return fn(*args, **kwargs)
    previous = get()
    order = _order(tuple(previous))
    if order == list(previous):
        return fn(*args, **kwargs)
    set_(order)
    try:
        return fn(*args, **kwargs)
    finally:
        set_(previous)


def register() -> None:
    """Idempotent: adds NAME to Transformers' attention and mask registries."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, moe_patch_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


@lru_cache(maxsize=None)
def dispatches_through_interface(cls) -> bool:
    """Structural test: the module's forward looks its kernel up in ALL_ATTENTION_FUNCTIONS."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


def mark(module, original: str, patched: bool) -> None:
    setattr(module, _MARK, (original, patched))


def unmark(module) -> None:
    if hasattr(module, _MARK):
        delattr(module, _MARK)
