"""FP8 grouped GEMMs for the experts, each weight quantised once per weight change (not once per GEMM).

The expert MLP's forward and input-gradient GEMMs run in FP8 e4m3 with fine-grained (rowwise) scaling through
torch's scaled grouped GEMM (`torch._scaled_grouped_mm`, CUTLASS, Hopper / sm90): one scale per row of the
left operand (per token: activations, and the output gradient in the backward) and one per output row of each
expert's weight (along the contracted dimension, as DeepSeek-V3's fine-grained recipe and torchao's rowwise
MoE recipe do). The weight gradient stays bf16 (`F.grouped_mm`, fp32 accumulation in the kernel): it is the
GEMM most sensitive to quantisation, and the master weights and their gradients stay bf16 / fp32 as before.

Per GEMM, a weight [E, out, in] must be quantised along the dimension that GEMM contracts:
    forward      x [S, in] @ W_e^T      -> rows of W along `in`   : e4m3 [E, out, in], scales [E, out]
    input grad   g [S, out] @ W_e       -> rows of W^T along `out`: e4m3 [E, in, out], scales [E, in]
Both copies are made once per *weight version* and kept (FP8WeightCache): the micro-batches of gradient
accumulation and the backward reuse them. A copy is served only while the parameter is the same object, its
storage is the same, its autograd `_version` counter is unchanged (any in-place change through autograd's
view of it, `load_state_dict`, `p.add_()` under no_grad bumps it) AND no torch optimizer has stepped since it
was made: torch's fused optimizers (AdamW / Adam / SGD with fused=True, the default fastest path) update the
weights in place without bumping `_version` (checked with torch 2.13 on CPU), so every `Optimizer.step()` (a
global post-step hook) also invalidates every copy. Changes made through `p.data` outside an optimizer are
invisible to both; call `weights_changed()` after such a change.

Speed (one H200, Qwen3-30B-A3B experts, 131k routed rows per layer; benchmarks/fp8_experts.py --paths): the
FP8 GEMMs alone save 1.2 ms of the 4.1 ms forward + input-grad GEMM time per layer and micro-batch, but the
whole forward + backward measured 9.8 ms against bf16's 7.5 ms with the weight copies cached (14.6 ms
quantising them every time): FP8 experts are slower than bf16 at this shape today (CHANGELOG, Unreleased).

Memory: the two FP8 copies together take the bytes of the bf16 weight (2 x 1 byte against 2 bytes per element),
kept between steps (about 1.2 GB per Qwen3-30B-A3B layer).

Accuracy: FP8 e4m3 has 3 mantissa bits; against the same module in bf16, the expert MLP's outputs and
gradients differ by several percent (relative Frobenius error). The plan-time proof (probe.experts_proven
with FP8_TOL) bounds outputs by FP8_TOL[0] and gradients by FP8_TOL[1]; the bounds were chosen from the
error measured on the proof's own inputs (see FP8_TOL), not loosened to pass.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .. import config
from . import compiled

E4M3_MAX = 448.0
# (outputs, gradients): relative error bounds of the FP8 experts against the family's module in bf16, on the
# experts proof's inputs (tokens at scales 0.1 to 10, weights ~ N(0.02, 0.3^2)). Chosen from the error of
# e4m3 rowwise rounding measured on CPU (the same operands rounded to e4m3, fp32 products: outputs 0.062-0.069
# relative on 5 draws at the Qwen3-30B-A3B widths, 2048 x 768); the kernel on an H200 stays under both bounds
# and above 1e-3 (tests/test_gpu.py, passed; its exact figures were not recorded). A wrong scale, layout or
# transposition gives errors of order 1, far above these.
FP8_TOL = (0.1, 0.15)

# torch optimizer steps seen (a global post-step hook, installed with the first FP8 module): part of every
# cached copy's key, since fused optimizers do not bump the parameters' _version
_STEPS = [0]
_HOOK = []


def weights_changed() -> None:
    """Invalidate every cached FP8 weight copy (after changing weights through `p.data`, which neither
    autograd's version counter nor an optimizer step records)."""
    _STEPS[0] += 1


def _count_step(optimizer, args, kwargs) -> None:
    _STEPS[0] += 1


def install_step_hook() -> None:
    if not _HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _HOOK.append(register_optimizer_step_post_hook(_count_step))


def why_not(weights: list, device, expert_parallel: bool = False, recipe: str = "current") -> str | None:
    """None if the FP8 experts can run here on these (3D, [E, a, b]) weights under apply(fp8=recipe), else why
    not. They quantise with current (per-row amax) scaling, so fp8="current" runs them; fp8="delayed" /
    "mxfp8" keep the experts bf16 (FP8 linear layers only, as before). Opt-in (MOE_PATCH_FP8_EXPERTS=1): they
    measured slower than the bf16 experts on an H200 (CHANGELOG.md)."""
    if recipe != "current":
        return f"FP8 experts use current (rowwise) scaling and run under fp8='current'; fp8={recipe!r}: bf16"
    if expert_parallel:
        return "FP8 experts are not implemented under expert parallelism (mesh=): bf16"
    if torch.device(device).type != "cuda":
        return f"FP8 experts need a CUDA GPU (module on {torch.device(device).type}): bf16"
    if not hasattr(torch, "_scaled_grouped_mm"):
        return "this torch has no torch._scaled_grouped_mm: bf16"
    cc = torch.cuda.get_device_capability(torch.device(device))
    if cc[0] != 9:  # torch's rowwise FP8 grouped GEMM is the sm90 CUTLASS kernel (Blackwell: MXFP8 instead)
        return f"FP8 experts run on Hopper (sm90) only, this GPU is sm{cc[0]}{cc[1]}: bf16"
    for w in weights:
        if w.shape[-1] % 16 or w.shape[-2] % 16:
            return f"FP8 grouped GEMMs need widths divisible by 16, got {tuple(w.shape[1:])}: bf16"
    if not config.flag("MOE_PATCH_FP8_EXPERTS"):
        # measured (one H200, Qwen3-30B-A3B shape, 8 layers, micro-batch 4, grad-accum 4): 76,629 tokens/s with
        # FP8 experts against 84,428 with bf16 ones; the plan does not pick a slower path by itself
        return ("FP8 experts are opt-in (MOE_PATCH_FP8_EXPERTS=1): measured slower than the bf16 grouped GEMM "
                "on an H200 (rowwise FP8 grouped GEMM at ~1,000 rows per expert): bf16")
    return None


def _rowwise(x: torch.Tensor):
    """x [..., K] -> (e4m3 [..., K], fp32 dequantisation scales [...]): amax over the last dimension, mapped
    to e4m3's largest value (448)."""
    amax = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    data = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return data, scale.squeeze(-1)


_TRITON = []  # the Triton kernel, built on first CUDA use ([] not tried yet, [None] unavailable)


def _triton_rowwise():
    """One program per row: amax, scale, e4m3 cast in one pass over the row held in registers (rows up to
    16,384 wide). Written here because the torch.compile'd _rowwise measured 2.4-2.7 ms per activation of the
    Qwen3-30B-A3B layer on an H200 (131k x 2048 rows; the bytes bound is 0.5 ms): it made the FP8 path slower
    than bf16 (benchmarks/fp8_experts.py --paths). torchao's MoE training ships such kernels; torchao is not
    a dependency here."""
    if _TRITON:
        return _TRITON[0]
    try:
        import triton
        import triton.language as tl
    except ImportError:
        _TRITON.append(None)
        return None

    @triton.jit
    def kernel(x_ptr, y_ptr, s_ptr, K, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < K
        v = tl.load(x_ptr + row * K + cols, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(v), axis=0), 1e-12)
        scale = amax / 448.0
        q = tl.clamp(v / scale, -448.0, 448.0)
        tl.store(y_ptr + row * K + cols, q.to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr + row, scale)

    def run(x):
        k = x.shape[-1]
        rows = x.numel() // k
        data = torch.empty(x.shape, device=x.device, dtype=torch.float8_e4m3fn)
        scale = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
        if rows:
            block = triton.next_power_of_2(k)
            kernel[(rows,)](x, data, scale, k, BLOCK=block, num_warps=max(1, min(16, block // 256)))
        return data, scale

    _TRITON.append(run)
    return run


def quantize_rowwise(x: torch.Tensor):
    """Rowwise e4m3 quantisation: amax over the last dimension mapped to 448 (e4m3's largest value). x must be
    contiguous; returns (data e4m3, fp32 dequantisation scales) with data.shape == x.shape, scales.shape ==
    x.shape[:-1]. CUDA: one Triton kernel (_triton_rowwise; rows up to 16,384 wide), else torch.compile'd;
    CPU: the torch formula (_rowwise)."""
    if x.is_cuda and x.shape[-1] <= 16384 and not torch.compiler.is_compiling():
        run = _triton_rowwise()
        if run is not None:
            return run(x)
    return compiled.run(_rowwise, x)


def _dequantize(data, scale):
    return data.float() * scale.unsqueeze(-1)


def scaled_grouped_mm(a8, sa, b8, sb, offs, out_dtype, fast_accum: bool = False):
    """sum_k a[s, k] * b[e(s), n, k], dequantised: a8 [S, K] e4m3 row-major with sa [S]; b8 [E, N, K] e4m3
    (contiguous) with sb [E, N]; offs [E] int32 cumulative row ends -> [S, N] out_dtype.

    CUDA: torch._scaled_grouped_mm; fast_accum=True (Hopper's fast FP8 accumulation, without the periodic fp32
    promotion) for the forward only, as torchao's float8 training configures its output GEMM; the input
    gradient accumulates in full fp32. Elsewhere: the same arithmetic on dequantised operands in fp32 (the CPU
    reference the tests hold the autograd wiring to; never a production path, why_not() refuses CPU)."""
    if a8.is_cuda:
        return torch._scaled_grouped_mm(a8, b8.transpose(-2, -1), sa, sb, offs=offs, out_dtype=out_dtype,
                                        use_fast_accum=fast_accum)
    a, b = _dequantize(a8, sa), _dequantize(b8, sb)
    outs, start = [], 0
    for g, end in enumerate(offs.tolist()):
        outs.append(a[start:end] @ b[g].t())
        start = end
    return torch.cat(outs).to(out_dtype)


def _weight_grad(g, x, offs, transposed: bool):
    """bf16 weight gradient of out = x @ W_e^T: [E, out, in] (or [E, in, out] for weights stored
    transposed), from g [S, out] and x [S, in] grouped by offs (F.grouped_mm over the token dimension)."""
    a, b = (x, g) if transposed else (g, x)
    if a.is_cuda:
        return F.grouped_mm(a.t(), b, offs=offs)
    outs, start = [], 0
    for end in offs.tolist():
        outs.append(a[start:end].t() @ b[start:end])
        start = end
    return torch.stack(outs)


class FP8WeightCache:
    """Per weight name: its two FP8 copies (forward: rows along `in`; input-grad: rows along `out`), each
    made on first use and served while the key (parameter identity, storage, `_version`, optimizer steps
    seen) is unchanged. `quantisations` counts the copies made (the tests read it)."""

    def __init__(self):
        self._entries = {}  # name -> (weakref to the parameter, key, {layout: (data, scales)})
        self.quantisations = 0

    def __deepcopy__(self, memo):  # a copied module computes with other Parameter objects: start empty
        return FP8WeightCache()

    def __getstate__(self):  # pickled: the copies are transient, never saved
        return {"_entries": {}, "quantisations": 0}

    @staticmethod
    def key(p: torch.Tensor) -> tuple:
        return (p._version, p.data_ptr(), tuple(p.shape), tuple(p.stride()), p.dtype, _STEPS[0])

    def get(self, name: str, param: torch.Tensor, weight_nk: torch.Tensor, layout: str):
        """FP8 copy of weight_nk ([E, out, in], a view of `param`) for `layout`: "forward" ([E, out, in],
        scales [E, out]) or "input_grad" ([E, in, out], scales [E, in])."""
        key = self.key(param)
        entry = self._entries.get(name)
        if entry is None or entry[0]() is not param or entry[1] != key:
            entry = (weakref.ref(param), key, {})
            self._entries[name] = entry  # the stale copies are released here
        copies = entry[2]
        if layout not in copies:
            with torch.no_grad():
                src = weight_nk if layout == "forward" else weight_nk.transpose(-2, -1)
                copies[layout] = quantize_rowwise(src.contiguous())
            self.quantisations += 1
        return copies[layout]

    def clear(self) -> None:
        self._entries.clear()


class _FP8GroupedLinear(torch.autograd.Function):
    """out [S, out] = x [S, in] @ W_e^T per expert group, forward and input gradient in FP8 (rowwise scales),
    weight gradient in bf16. `weight` is the tensor autograd differentiates (the parameter or its view);
    the FP8 copies come from `cache` under `name`."""

    @staticmethod
    def forward(ctx, x, weight, offs, param, cache, name, transposed):
        weight_nk = weight.transpose(-2, -1) if transposed else weight
        w8, sw = cache.get(name, param, weight_nk, "forward")
        x8, sx = quantize_rowwise(x.contiguous())
        out = scaled_grouped_mm(x8, sx, w8, sw, offs, x.dtype, fast_accum=True)
        # weight saved (a reference, no copy): autograd then refuses a backward after an in-place change of it,
        # as it does for the bf16 GEMM
        ctx.save_for_backward(x, weight, offs)
        ctx.cache, ctx.name, ctx.param, ctx.transposed = cache, name, param, transposed
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, offs = ctx.saved_tensors
        g = g.contiguous()
        d_x = d_w = None
        if ctx.needs_input_grad[0]:
            weight_nk = weight.transpose(-2, -1) if ctx.transposed else weight
            wt8, swt = ctx.cache.get(ctx.name, ctx.param, weight_nk, "input_grad")
            g8, sg = quantize_rowwise(g)
            d_x = scaled_grouped_mm(g8, sg, wt8, swt, offs, g.dtype)
        if ctx.needs_input_grad[1]:
            d_w = _weight_grad(g, x, offs, ctx.transposed).to(weight.dtype)
        return d_x, d_w, None, None, None, None, None


def grouped_linear_fp8(x, weight, offs, param, cache: FP8WeightCache, name: str, transposed: bool):
    """FP8 version of experts.grouped_linear (no bias: the caller adds it). x [S, in] bf16 grouped by expert,
    weight [E, out, in] (or [E, in, out] with transposed=True), offs [E] int32 -> [S, out] bf16."""
    return _FP8GroupedLinear.apply(x, weight, offs, param, cache, name, transposed)


def runs_fp8(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this call takes the FP8 kernels: bf16 rows on CUDA (fp32 / fp16 rows, an empty batch and
    torch.compile tracing run the bf16 / fp32 grouped GEMM as without fp8)."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.shape[0] > 0
            and not torch.compiler.is_compiling())
