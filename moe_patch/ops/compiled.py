"""Small pointwise / row-reduction functions (today: RMSNorm's forward and backward, the chunked loss's
softmax-gradient step where Liger's kernel is not used, and its gradient scaling) run torch.compile'd on
CUDA (fused kernels instead of a chain of elementwise ones), eagerly elsewhere (CPU: the exact reference).

MOE_PATCH_COMPILE=0 keeps them eager everywhere (e.g. where Triton cannot build kernels); a compiler
failure at run time also falls back to the eager function, with one warning: training never stops on it.
"""
from __future__ import annotations

import os
import warnings

import torch

_CACHE = {}


def enabled() -> bool:
    from ..config import FALSE  # the same off words as every MOE_PATCH_* variable

    return os.environ.get("MOE_PATCH_COMPILE", "1").strip().lower() not in FALSE


def active(t: torch.Tensor) -> bool:
    """Whether run() compiles for this tensor (CUDA, compiler enabled)."""
    return t.is_cuda and enabled()


def run(fn, *args):
    """fn(*args), compiled (dynamic shapes: one compilation for every row count) when args[0] is on CUDA."""
    if not active(args[0]):
        return fn(*args)
    compiled = _CACHE.get(fn)
    if compiled is None:
        compiled = _CACHE[fn] = torch.compile(fn, dynamic=True)
    if compiled is fn:
        return fn(*args)
    try:
        return compiled(*args)
    except Exception as exc:  # noqa: BLE001 - any compiler error: the eager function is exact
        warnings.warn(f"moe_patch: torch.compile of {fn.__name__} failed ({type(exc).__name__}: {exc}); "
                      "running it eagerly", RuntimeWarning, stacklevel=2)
        _CACHE[fn] = fn
        return fn(*args)
