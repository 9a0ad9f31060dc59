"""The float32 router GEMM on bfloat16 tensor cores (moe_patch/ops/bf16x3_linear.py): the three-term split is
exact, and the forward and both gradients equal F.linear(x.float(), w.float())'s. CPU: the same algebra in float32
arithmetic; GPU (gpu marker): torch's bfloat16 GEMMs with float32 output, and the patched DeepSeek router using it."""
import copy

import pytest
import torch
import torch.nn.functional as F

import moe_patch
from moe_patch.ops import bf16x3_linear
from util import build, rel_err


def test_split_into_three_bfloat16_terms_is_exact():
    g = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * torch.logspace(-30, 30, 4096)
    terms = bf16x3_linear.split3(g.view(64, 64))
    assert terms.dtype == torch.bfloat16 and terms.shape == (64, 192)
    g1, g2, g3 = terms.double().split(64, dim=-1)
    assert torch.equal(g1 + g2 + g3, g.view(64, 64).double())
    # two terms are not enough: the test above can tell
    assert not torch.equal(g1 + g2, g.view(64, 64).double())


def _stock_and_split(x, w, g, split_terms: int = 3):
    xs, ws = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.linear(xs.float(), ws.float())
    ref.backward(g)
    xp, wp = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    out = bf16x3_linear.linear(xp, wp)
    if split_terms == 3:
        out.backward(g)
    else:  # a deliberately incomplete split (one term): what the tolerance below must reject
        with torch.no_grad():
            g1 = g.to(torch.bfloat16)
            xp.grad = (g1.float() @ wp.float()).to(xp.dtype)
            wp.grad = (g1.float().t() @ xp.float()).to(wp.dtype)
    return (ref, xs.grad, ws.grad), (out, xp.grad, wp.grad)


@pytest.mark.parametrize("seed", [0, 1])
def test_forward_and_gradients_equal_the_float32_linear(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 256, generator=gen).to(torch.bfloat16)
    w = (torch.randn(64, 256, generator=gen) * 0.05).to(torch.bfloat16)
    g = torch.randn(512, 64, generator=gen) * torch.logspace(-4, 2, 64)  # gradients over 6 decades per row
    (ref, dx_ref, dw_ref), (out, dx, dw) = _stock_and_split(x, w, g)
    assert out.dtype == torch.float32 and dx.dtype == dw.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-5
    assert rel_err(dx, dx_ref) < 1e-4 and rel_err(dw, dw_ref) < 1e-4
    _, (_, dx1, dw1) = _stock_and_split(x, w, g, split_terms=1)
    assert rel_err(dx1, dx_ref) > 1e-4 or rel_err(dw1, dw_ref) > 1e-4  # one bf16 term is measurably wrong


def test_create_graph_backward_is_the_float32_formula(monkeypatch):
    """backward(create_graph=True) through it (Hessian-vector products, gradient penalties): torch's mm with
    out_dtype, which the tensor-core form runs on CUDA, has no derivative, so that backward takes the float32 formula
    instead: differentiable, the first-order gradients stock's, and the Hessian-vector product stock's (bf16 values:
    bf16 tolerance; the leaves' bf16 gradients are summed in a different order)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 32, generator=gen).to(torch.bfloat16)
    w = (torch.randn(8, 32, generator=gen) * 0.1).to(torch.bfloat16)
    vx, vw = torch.randn(64, 32, generator=gen), torch.randn(8, 32, generator=gen)
    results = []
    for fn in (lambda a, b: F.linear(a.float(), b.float()), bf16x3_linear.linear):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(xs, ws)
        with monkeypatch.context() as m:  # the tensor-core GEMMs must not be in a graph that is differentiated again
            m.setattr(bf16x3_linear, "_mm32", lambda *a: pytest.fail("tensor-core GEMM under create_graph"))
            dx, dw = torch.autograd.grad((out ** 2).sum(), (xs, ws), create_graph=True)
        assert dx.grad_fn is not None and dw.grad_fn is not None
        hvp = torch.autograd.grad((dx.float() * vx).sum() + (dw.float() * vw).sum(), (xs, ws))
        results.append((dx, dw) + hvp)
    for name, a, b in zip(("dx", "dw", "hvp x", "hvp w"), *results):
        assert rel_err(a, b) < (1e-4 if name in ("dx", "dw") else 2e-2), name


def test_only_bfloat16_cuda_operands_outside_autocast_are_usable():
    x, w = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(2, 8, dtype=torch.bfloat16)
    assert not bf16x3_linear.usable(x, w)  # CPU: the router keeps the stock formula
    if torch.cuda.is_available():
        xc, wc = x.cuda(), w.cuda()
        assert bf16x3_linear.usable(xc, wc)
        assert not bf16x3_linear.usable(xc.float(), wc)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert not bf16x3_linear.usable(xc, wc)



@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_tensor_core_gemms_equal_the_float32_linear(seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(16384, 2048, device="cuda", generator=gen).to(torch.bfloat16)
    w = (torch.randn(64, 2048, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    g = torch.randn(16384, 64, device="cuda", generator=gen) * 1e-3
    (ref, dx_ref, dw_ref), (out, dx, dw) = _stock_and_split(x, w, g)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(dx, dx_ref) < 1e-3 and rel_err(dw, dw_ref) < 1e-3  # bf16 outputs: a rare 1-ulp rounding flip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_deepseek_router_uses_it_and_equals_stock(monkeypatch):
    calls = []
    real = bf16x3_linear.linear
    monkeypatch.setattr(bf16x3_linear, "linear", lambda x, w: calls.append(x.shape) or real(x, w))
    stock = build("deepseek_v3", dtype=torch.bfloat16).cuda()
    patched = moe_patch.apply(copy.deepcopy(stock))
    route = next(r for r in moe_patch.report(patched) if r.kind == "router" and r.status == "patched")
    router = dict(patched.named_modules())[route.path]
    stock_router = dict(stock.named_modules())[route.path]
    hidden = torch.randn(256, router.weight.shape[1], device="cuda", dtype=torch.bfloat16)
    calls.clear()
    logits = router.logits(hidden)
    assert calls, "the patched DeepSeek router did not take the tensor-core path"
    ref = F.linear(hidden.float(), stock_router.weight.float())
    assert logits.dtype == torch.float32 and rel_err(logits, ref) < 1e-5


def test_infinite_nan_and_largest_gradients_behave_as_the_float32_linear():
    """Non-finite and float32's largest logit gradients give the float32 form's infs and NaNs, where they are: a
    gradient of +-inf is +-inf times the other operand there (not inf - inf = NaN in the split's second term), one
    within half a bfloat16 ulp of float32's largest is finite (not rounded up to inf in the split's first term)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(16, 32, generator=gen).to(torch.bfloat16)
    w = (torch.randn(8, 32, generator=gen) * 0.05).to(torch.bfloat16)
    g = torch.randn(16, 8, generator=gen)
    big = torch.finfo(torch.float32).max
    g[1, 2], g[3, 5], g[5, 0] = float("inf"), -float("inf"), float("nan")
    g[7, 3], g[9, 6] = big, -big * 0.999  # finite: x's gradient stays finite, w's overflows where |x| > ~1
    (ref, dx_ref, dw_ref), (out, dx, dw) = _stock_and_split(x, w, g)
    assert torch.isinf(dx_ref).any() and torch.isnan(dx_ref).any() and torch.isfinite(dx_ref[7]).all()
    for name, a, b in (("dx", dx, dx_ref), ("dw", dw, dw_ref)):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
        assert torch.equal(torch.isposinf(a), torch.isposinf(b)), name
        assert torch.equal(torch.isneginf(a), torch.isneginf(b)), name
        finite = torch.isfinite(b)
        assert rel_err(a[finite], b[finite]) < 1e-4, name
