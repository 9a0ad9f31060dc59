"""The experts' grouped GEMMs (forward, input gradient, weight gradient) on the fastest of torch's own kernels for
each shape, chosen by torch inductor's GEMM autotuner.

`F.grouped_mm` runs one CUTLASS kernel configuration per layout. torch.compile with `max_autotune` lowers the same
operator (`aten._grouped_mm`, forward and, through AOTAutograd, the two backward products) to the best of inductor's
persistent TMA Triton template in several tile shapes and that CUTLASS kernel itself, timed on the GPU at the first
call of each shape (torch/_inductor/kernel/mm_grouped.py). Measured alone on an H200 (random routing, ms per GEMM,
CUTLASS -> autotuned): GPT-OSS-20B widths (32 experts, 32,768 rows) up 1.747 -> 1.595 forward, 1.845 -> 1.579 input
gradient, 2.049 -> 1.887 weight gradient, down 0.863 -> 0.832, 0.906 -> 0.830, 0.931 -> 0.895; deepseek-v3-style
(64 experts, 98,304 rows) 7.96 -> 7.57 ms for the six (a 16-configuration search; the default one is wider).
`benchmarks/grouped_gemm.py` measures the forward + backward of each projection both ways.

Same arithmetic: a grouped matrix product with float32 accumulation and one rounding to the output dtype; the
choice is a kernel (tile shape, schedule), as cuBLAS picks one per shape for a dense GEMM. Results equal to the
CUTLASS kernel's within bf16 rounding (tests/test_tuned_gemm.py checks forward and both gradients at a real width).

OPT-IN (MOE_PATCH_TUNED_GEMM=1): inductor's default search for a grouped GEMM compiles and times ~70 Triton
configurations per shape (over 20 s per GEMM on an H200), and a patched GPT-OSS-20B benchmark (six GEMM shapes) did
not get through its first steps in 4 minutes (the figures above come from a 16-configuration search, which torch
does not let a caller choose). Inductor keeps
its choices in its on-disk cache, so the cost is paid once per machine and shape; the step-level gain is not
measured yet.

Used on CUDA for problems of at least MIN_ROWS rows (smaller ones, the plan-time proofs' included, take
F.grouped_mm: autotuning them would cost more than it saves), outside a user's own torch.compile (its trace decides
there), unless MOE_PATCH_COMPILE=0; the switch is read when apply() plans the experts (their report row then reads
"grouped_mm autotuned"). Each (widths, layout, dtype, rows bucket) gets its own compiled variant, rows
dynamic within a power-of-two bucket (tuned at the bucket's first size). Each variant's first call also runs
F.grouped_mm on the same operands and compares the output and the gradients that call needs (`mismatch`: the proof
on the model's real shape, which the plan-time proofs' small inputs never reach); a variant that differs or fails
to compile is not used, with one warning, and the experts keep F.grouped_mm.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from . import compiled

SWITCH = "MOE_PATCH_TUNED_GEMM"
MIN_ROWS = 4096  # below this a grouped GEMM of these widths takes tens of microseconds: not worth a tuning pass
_CACHE: dict = {}
TOL = 1e-2  # the same product (bf16 rounding of a float32 accumulation; measured equal); below the 2e-2 bf16 bound
OPTIONS = {"max_autotune": True}  # inductor's GEMM autotuning only (no CUDA graphs: mode="max-autotune" adds them)


def enabled() -> bool:
    """MOE_PATCH_TUNED_GEMM=1 (opt-in) and MOE_PATCH_COMPILE not off: read when apply() plans an experts module
    (plan.py), which keeps the choice and shows it in its report row (a value set afterwards changes nothing until
    a new apply(); apply() refuses a value that is neither on nor off)."""
    from ..config import TRUE

    return compiled.enabled() and os.environ.get(SWITCH, "").strip().lower() in TRUE


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether a module planned with the tuned GEMMs takes them for grouped_mm(x, w, offs) (the caller has checked
    F.grouped_mm's own requirements: bf16, aligned operands): CUDA, MIN_ROWS rows or more, outside a user's own
    torch.compile, and MOE_PATCH_COMPILE not set off since."""
    return (x.is_cuda and x.dim() == 2 and w.dim() == 3 and x.shape[0] >= MIN_ROWS
            and not torch.compiler.is_compiling() and compiled.enabled())


def _grouped_mm(x, w, offs):
    return F.grouped_mm(x, w, offs=offs)


def _layout(t: torch.Tensor) -> str:
    return "n" if t.stride(-1) == 1 else "k"  # [E, in, out] with out (n) or in (k) contiguous: kernels differ


def _needs_grads(x: torch.Tensor, w: torch.Tensor) -> tuple:
    on = torch.is_grad_enabled()
    return (on and x.requires_grad, on and w.requires_grad)


def mismatch(fn, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> str | None:
    """None if fn (a compiled variant) gives F.grouped_mm's output and, where x / w need them, its input and weight
    gradients (a fixed random output gradient) within TOL on these very operands (detached copies), else what
    differs. Running its backward here also compiles and tunes it, so a failure there surfaces now, not in the
    user's backward()."""
    gx, gw = _needs_grads(x, w)
    xs, ws = x.detach().requires_grad_(gx), w.detach().requires_grad_(gw)
    torch._dynamo.maybe_mark_dynamic(xs, 0)
    out, ref = fn(xs, ws, offs), F.grouped_mm(xs, ws, offs=offs)
    pairs = [("output", out, ref)]
    wrt = [(n, t) for n, t in (("input gradient", xs), ("weight gradient", ws)) if t.requires_grad]
    if wrt:
        gen = torch.Generator(device=out.device).manual_seed(0)
        probe = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
        got = torch.autograd.grad(out, [t for _, t in wrt], probe)
        want = torch.autograd.grad(ref, [t for _, t in wrt], probe)
        pairs += [(n, a, b) for (n, _), a, b in zip(wrt, got, want)]
    from ..probe import rel_err  # the plan-time proofs' measure

    for name, a, b in pairs:
        err = rel_err(a.detach(), b.detach())
        if not err < TOL:  # NaN included
            return f"its {name} is {err:.1e} from F.grouped_mm's"
    return None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [S, in] rows grouped by expert, w [E, in, out] (any strides), offs [E] int32 cumulative row ends ->
    [S, out] in x's dtype: F.grouped_mm(x, w, offs=offs), differentiable, on the autotuned kernels (see the module
    docstring). Each compiled variant is checked against F.grouped_mm on its first call's operands (`mismatch`,
    forward and the gradients that call needs); one that differs or fails is not used (one warning), nor is a
    variant whose later call raises."""
    key = (x.shape[-1], w.shape[-1], w.shape[0], _layout(w), x.dtype, x.device, x.shape[0].bit_length(),
           _needs_grads(x, w))
    fn = _CACHE.get(key)
    if fn is None:
        name = f"grouped_mm_k{key[0]}_n{key[1]}_e{key[2]}_{key[3]}_r{key[6]}"
        fn = torch.compile(compiled.own_code(_grouped_mm, name), options=OPTIONS)
        try:
            why = mismatch(fn, x, w, offs)
        except Exception as exc:  # noqa: BLE001 - any compiler / autotuner error: F.grouped_mm is the same product
            why = f"it failed ({type(exc).__name__}: {exc})"
        if why is not None:
            warnings.warn(f"moe_patch: autotuned grouped_mm not used for {name}: {why}; using F.grouped_mm",
                          RuntimeWarning, stacklevel=2)
            fn = _grouped_mm
        _CACHE[key] = fn
    if fn is _grouped_mm:
        return _grouped_mm(x, w, offs)
    torch._dynamo.maybe_mark_dynamic(x, 0)
    try:
        return fn(x, w, offs)
    except Exception as exc:  # noqa: BLE001 - any compiler / autotuner error: the CUTLASS kernel is the same product
        warnings.warn(f"moe_patch: autotuned grouped_mm failed ({type(exc).__name__}: {exc}); using F.grouped_mm",
                      RuntimeWarning, stacklevel=2)
        _CACHE[key] = _grouped_mm
        return _grouped_mm(x, w, offs)
