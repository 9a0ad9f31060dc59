"""`F.linear(x.float(), w.float())` for bfloat16 x and w, on bfloat16 tensor cores instead of float32 GEMMs.

Where it is used: the routers of the DeepSeek family (DeepSeek-V3, GLM-4-MoE, Nemotron-H; patches/deepseek.py
`fp32_logits`) compute their logits in float32 from the bfloat16 hidden states and weight. torch runs those three
GEMMs (forward, input gradient, weight gradient) on float32 kernels (no tensor cores unless TF32 is allowed, which
changes the numbers) and makes float32 copies of both operands: on an H200 at the deepseek-v3-style shape
(16,384 tokens, hidden 2,048, 64 experts) ~0.4 ms per MoE layer and step for 12 GFLOP.

Why the numbers are float32's (up to the order of the sums, as between any two GEMM kernels):
  forward   every product of two bfloat16 numbers (8 significant bits each) is exact in float32 (24 bits), and the
            tensor cores accumulate in float32: mm(x, w.T, out_dtype=float32) is the float32 GEMM of the same values.
  backward  the logits' gradient g is float32. It is split into three bfloat16 terms, g = g1 + g2 + g3 with
            g1 = bf16(g), g2 = bf16(g - g1), g3 = bf16(g - g1 - g2): each rounding keeps the next 8 significant
            bits, so the three carry all 24 and their sum is g exactly (the "bf16x3" split of Henry, Tang and
            Heinecke, "Leveraging the bfloat16 Artificial Intelligence Datatype For Higher-Precision
            Computations", ARITH 2019; exact here because the other operand, x or w, is bfloat16 already).
            Then  dx = [g1 g2 g3] @ [w; w; w]  and  dw = g1.T @ x + g2.T @ x + g3.T @ x, each ONE bfloat16 GEMM
            (the terms stacked along the contracted / the output dimension) with float32 accumulation and float32
            output, rounded to bfloat16 once as the `.float()` casts' backward does. Non-finite ends: a finite
            |g| above bf16's largest (3.39e38), which would round to inf (and inf - inf = NaN in g2), is clamped to
            it in g1; an inf or NaN g is g1 alone (g2 = g3 = 0), so it meets the other operand as in the float32
            GEMM. (An inf in x or w itself still meets the zero terms: NaN where the float32 GEMM gives +-inf.)
            |g| < 2^-110 (7.7e-34) may lose low bits in the split (g3's fall below bf16's smallest subnormal,
            2^-133): far below any router gradient.
            Under backward(create_graph=True) the backward is the float32 formula itself (differentiable, as stock).

Shapes: x [T, H] bfloat16, w [E, H] bfloat16 -> logits [T, E] float32; gradients dx [T, H] and dw [E, H] in
bfloat16 (their inputs' dtype). CUDA only (torch's mm with out_dtype has no CPU kernel); `usable()` says where.
The router calls it only outside autocast (under autocast stock's float32 linear runs in bfloat16: the stock
formula runs there). Proven with the router at plan time (the router's proof runs on the module's device and
dtype); tests/test_bf16x3_linear.py checks the split and the GEMMs' algebra on CPU in float32 arithmetic.
"""
from __future__ import annotations

import torch


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Both operands bfloat16 on CUDA, outside autocast: where `linear` computes F.linear(x.float(), w.float())."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and x.dim() == 2
            and not torch.is_autocast_enabled(x.device.type))


def split3(g: torch.Tensor) -> torch.Tensor:
    """float32 [..., N] -> bfloat16 [..., 3N]: the terms g1, g2, g3 (module docstring) side by side along the last
    dimension; g1 + g2 + g3 == g exactly for |g| >= 2^-110; an inf / NaN g is g1, with g2 = g3 = 0."""
    finite = torch.isfinite(g)
    top = torch.finfo(torch.bfloat16).max  # exact in float32; clamping to it keeps a finite g1 finite
    g1 = torch.where(finite, g.clamp(-top, top), g).to(torch.bfloat16)
    r = torch.where(finite, g - g1.float(), 0.0)  # exact: g minus its own rounding (or clamp); inf / NaN: in g1
    g2 = r.to(torch.bfloat16)
    g3 = (r - g2.float()).to(torch.bfloat16)
    return torch.cat([g1, g2, g3], dim=-1)


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with float32 accumulation and output for bfloat16 a, b (tensor cores on CUDA; float32 arithmetic on
    the same values elsewhere: the CPU tests' reference)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return _mm32(x, w.t())

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        if not (need_x or need_w):
            return None, None
        if torch.is_grad_enabled():  # backward(create_graph=True): the float32 formula, differentiable as stock's
            dx = (g.float() @ w.float()).to(x.dtype) if need_x else None
            dw = (g.float().t() @ x.float()).to(w.dtype) if need_w else None
            return dx, dw
        terms = split3(g.float())  # [T, 3E]
        dx = dw = None
        if need_x:
            dx = _mm32(terms, torch.cat([w, w, w], dim=0)).to(x.dtype)  # contracted over 3E
        if need_w:
            e = w.shape[0]
            dw = _mm32(terms.t(), x).view(3, e, -1).sum(0).to(w.dtype)  # [3E, H] -> sum of the three [E, H]
        return dx, dw


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x.float(), w.float()) with the same forward and gradients (module docstring); x [T, H], w [E, H]
    bfloat16 -> [T, E] float32. Callers use it where `usable(x, w)`; on CPU it runs the same algebra in float32
    arithmetic (the tests' reference)."""
    return _Linear.apply(x, w)
