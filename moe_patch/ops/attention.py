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
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    original, patched = getattr(module, _MARK, ("sdpa", False))
    if not patched:
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(original, sdpa_attention_forward)
        return fn(module, query, key, value, attention_mask, **kwargs)
    if query.device.type == "cuda":
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(gpu_priority(), set_priority=True):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


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
