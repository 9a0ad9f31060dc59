"""Small pointwise / row-reduction functions (today: RMSNorm's forward and backward, the experts' gate and row
weighting, the chunked loss's softmax-gradient step where Liger's kernel is not used, and its gradient scaling;
DeepSeek-V3's MLA q / k / v assembly, ops/mla.py; the gated-MLP product, ops/mlp.py) run torch.compile'd
on CUDA (fused kernels instead of a chain of elementwise ones), eagerly elsewhere (CPU: the exact reference).

Shapes: the row dimensions (every dimension but the last of a tensor argument with two or more; a 1-D argument
unless its length is one of those last dimensions, i.e. unless it is a per-feature vector such as a norm's
weight) are compiled dynamic, the feature widths static. A kernel compiled with dynamic widths computes every
element's row and column with 64-bit divisions by runtime values: GPT-OSS's gate backward ran at ~0.75 TB/s
that way on an H200, a few times below the same kernel with its widths known. Each (function, widths) pair gets
its own code object (so that torch.compile's per-code-object limit of compiled variants is never shared between
widths, and a width seen later never turns an earlier one dynamic): one compilation per width and dtype.

MOE_PATCH_COMPILE=0 keeps them eager everywhere (e.g. where Triton cannot build kernels); a compiler
failure at run time also falls back to the eager function, with one warning: training never stops on it.
"""
from __future__ import annotations

import os
import types
import warnings

import torch

_CACHE = {}


def enabled() -> bool:
    from ..config import FALSE  # the same off words as every MOE_PATCH_* variable

    value = os.environ.get("MOE_PATCH_COMPILE", "").strip().lower()
    return not value or value not in FALSE  # unset or empty: on; only an off word (0, false, no, off) turns it off


def active(t: torch.Tensor) -> bool:
    """Whether run() compiles for this tensor (CUDA, compiler enabled)."""
    return t.is_cuda and enabled()


def widths(args) -> tuple:
    """The last dimension of every tensor argument with two or more dimensions: what run() compiles static."""
    return tuple(a.shape[-1] for a in args if torch.is_tensor(a) and a.dim() >= 2)


def _mark_rows_dynamic(args, static: tuple) -> None:
    for a in args:
        if not torch.is_tensor(a) or isinstance(a, torch.nn.Parameter):  # a parameter's shape never changes (and
            continue  # the mark is an attribute on the tensor: a user's parameters are left as they were)
        rows = range(a.dim() - 1) if a.dim() >= 2 else ([0] if a.dim() == 1 and a.shape[0] not in static else [])
        for dim in rows:
            torch._dynamo.maybe_mark_dynamic(a, dim)  # "maybe": a size 0 / 1 may still be specialised


def run(fn, *args):
    """fn(*args), compiled (row counts dynamic, widths static: see the module docstring) when args[0] is on
    CUDA, else eager. Same results as fn up to the compiled kernels' float rounding (each user proves its
    function at plan time)."""
    if not active(args[0]):
        return fn(*args)
    static = widths(args)
    key = (fn, static)
    compiled = _CACHE.get(key)
    if compiled is None:
        compiled = _CACHE[key] = torch.compile(own_code(fn, f"{fn.__name__}_w{'_'.join(map(str, static))}"),
                                               options={"emulate_precision_casts": True})
    if compiled is fn:
        return fn(*args)
    if not torch.compiler.is_compiling():  # inside a user's torch.compile of the model, its trace decides
        _mark_rows_dynamic(args, static)
    try:
        return compiled(*args)
    except Exception as exc:  # noqa: BLE001 - any compiler error: the eager function is exact
        warnings.warn(f"moe_patch: torch.compile of {fn.__name__} failed ({type(exc).__name__}: {exc}); "
                      "running it eagerly", RuntimeWarning, stacklevel=2)
        _CACHE[key] = fn
        return fn(*args)


def own_code(fn, name: str):
    """fn with a code object of its own (same body, globals and closure): torch.compile keeps its compiled
    variants per code object, at most torch._dynamo.config.recompile_limit (8) of them."""
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
