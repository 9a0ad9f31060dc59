"""`F.linear(x.float(), w.float())` for bfloat16 x and a bfloat16 or float32 w, on bfloat16 tensor cores instead
of float32 GEMMs.

Where it is used: the routers of the DeepSeek family (DeepSeek-V3, GLM-4-MoE, Nemotron-H; patches/deepseek.py
`fp32_logits`) compute their logits in float32 from the bfloat16 hidden states and their weight. torch runs those
three GEMMs (forward, input gradient, weight gradient) on float32 kernels (no tensor cores unless TF32 is allowed,
which changes the numbers) and makes float32 copies of the operands: on an H200 at the deepseek-v3-style shape
(16,384 tokens, hidden 2,048, 64 experts) ~0.4 ms per MoE layer and step for 12 GFLOP. As Transformers builds these
models in bfloat16, the router weight stays float32 (`_keep_in_fp32_modules_strict`): the float32-weight case
below is the one a bfloat16 model takes; a weight cast to bfloat16 (`model.to(torch.bfloat16)`) takes the first.

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
A float32 w is split the same way, w = w1 + w2 + w3 (bfloat16 terms, exact), and then ("bf16x6" for the product of
two float32 operands, same paper):
  forward   logits = x @ w1.T + x @ w2.T + x @ w3.T: every product exact, as above; ONE GEMM against the terms
            stacked along the output dimension ([3E, H]), the three [T, E] blocks summed in float32.
  dx        g @ w needs the nine products gi @ wj; the six with i + j <= 4 are kept (g1w1, g1w2, g2w1, g1w3, g2w2,
            g3w1), ONE GEMM contracted over 6E. Each dropped one is below 2^-24 of |g| |w| (g2w3, g3w2: 2^-8 *
            2^-16 relative; g3w3 2^-32): float32's own rounding of a product. Rounded to bfloat16 once.
  dw        g.T @ x as for a bfloat16 w (x is exact in bfloat16), kept in float32: w's dtype.

Shapes: x [T, H] bfloat16, w [E, H] bfloat16 or float32 -> logits [T, E] float32; gradients dx [T, H] and dw [E, H]
in their inputs' dtypes. CUDA only (torch's mm with out_dtype has no CPU kernel); `usable()` says where.
The router calls it only outside autocast (under autocast stock's float32 linear runs in bfloat16: the stock
formula runs there). Proven with the router at plan time (the router's proof runs on the module's device and
dtype); tests/test_bf16x3_linear.py checks the split and the GEMMs' algebra on CPU in float32 arithmetic.
"""
from __future__ import annotations

import torch


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """x bfloat16 and w bfloat16 or float32, on CUDA, outside autocast: where `linear` computes
    F.linear(x.float(), w.float())."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and w.dtype in (torch.bfloat16, torch.float32) and x.dim() == 2
            and w.is_cuda and not torch.is_autocast_enabled(x.device.type))


def terms3(g: torch.Tensor) -> tuple:
    """float32 g -> (g1, g2, g3) bfloat16, same shape (module docstring): g1 + g2 + g3 == g exactly for
    |g| >= 2^-110; an inf / NaN g is g1, with g2 = g3 = 0."""
    finite = torch.isfinite(g)
    top = torch.finfo(torch.bfloat16).max  # exact in float32; clamping to it keeps a finite g1 finite
    g1 = torch.where(finite, g.clamp(-top, top), g).to(torch.bfloat16)
    r = torch.where(finite, g - g1.float(), 0.0)  # exact: g minus its own rounding (or clamp); inf / NaN: in g1
    g2 = r.to(torch.bfloat16)
    g3 = (r - g2.float()).to(torch.bfloat16)
    return g1, g2, g3


def split3(g: torch.Tensor) -> torch.Tensor:
    """float32 [..., N] -> bfloat16 [..., 3N]: terms3(g) side by side along the last dimension."""
    return torch.cat(terms3(g), dim=-1)


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
        if w.dtype == torch.bfloat16:
            return _mm32(x, w.t())
        e = w.shape[0]
        stacked = torch.cat(terms3(w), dim=0)  # [3E, H]: w1; w2; w3
        return _mm32(x, stacked.t()).view(-1, 3, e).sum(1)  # x @ w1.T + x @ w2.T + x @ w3.T, float32

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
        if need_x and w.dtype == torch.bfloat16:
            dx = _mm32(terms, torch.cat([w, w, w], dim=0)).to(x.dtype)  # contracted over 3E
        elif need_x:  # float32 w: the six leading products gi @ wj, i + j <= 4 (module docstring)
            e = w.shape[0]
            g1, g2, g3 = terms[:, :e], terms[:, e:2 * e], terms[:, 2 * e:]
            w1, w2, w3 = terms3(w)
            dx = _mm32(torch.cat([g1, g1, g2, g1, g2, g3], dim=1),
                       torch.cat([w1, w2, w1, w3, w2, w1], dim=0)).to(x.dtype)  # contracted over 6E
        if need_w:
            e = w.shape[0]
            dw = _mm32(terms.t(), x).view(3, e, -1).sum(0).to(w.dtype)  # [3E, H] -> sum of the three [E, H]
        return dx, dw


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x.float(), w.float()) with the same forward and gradients (module docstring); x [T, H] bfloat16,
    w [E, H] bfloat16 or float32 -> [T, E] float32. Callers use it where `usable(x, w)`; on CPU it runs the same
    algebra in float32 arithmetic (the tests' reference)."""
    return _Linear.apply(x, w)
