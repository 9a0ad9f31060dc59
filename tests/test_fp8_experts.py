"""FP8 experts (ops/fp8_experts.py) on CPU: the weight cache's invalidation, the autograd wiring of the two
FP8 GEMMs and the bf16 weight gradient against a reference, the fallback reasons and the plan row. The CUDA
kernel itself is held to the bf16 module in tests/test_gpu.py (gpu marker)."""
import copy
import pickle

import pytest
import torch

from moe_patch.ops import fp8_experts
from moe_patch.ops.fp8_experts import FP8WeightCache, grouped_linear_fp8, quantize_rowwise
from moe_patch.plan import Options, make_plan
from util import build, rel_err


def _weight(e=3, out=32, inn=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(e, out, inn, generator=g))


def test_rowwise_quantisation_round_trips_within_e4m3():
    x = torch.randn(64, 96) * torch.logspace(-2, 2, 64)[:, None]
    data, scale = quantize_rowwise(x)
    assert data.dtype == torch.float8_e4m3fn and scale.shape == (64,) and scale.dtype == torch.float32
    back = data.float() * scale[:, None]
    assert ((back - x).abs() <= x.abs().amax(-1, keepdim=True) * 2 ** -4).all()  # half an e4m3 step at most
    assert torch.allclose(data.float().abs().amax(-1), torch.full((64,), 448.0))  # each row's largest hits 448


def test_cache_serves_a_copy_until_the_weight_changes():
    w = _weight()
    cache = FP8WeightCache()
    first = cache.get("w", w, w, "forward")
    assert cache.get("w", w, w, "forward") is first and cache.quantisations == 1  # micro-batches reuse it
    cache.get("w", w, w, "input_grad")
    assert cache.quantisations == 2
    with torch.no_grad():
        w.mul_(2.0)  # an in-place change bumps _version
    second = cache.get("w", w, w, "forward")
    assert second is not first and cache.quantisations == 3
    assert torch.allclose(second[1], first[1] * 2)  # the scales follow the new values: not stale
    other = _weight()  # another Parameter object under the same name (load_state_dict(assign=True), FSDP)
    assert cache.get("w", other, other, "forward") is not second and cache.quantisations == 4


@pytest.mark.parametrize("fused", [True, False])
def test_cache_is_invalidated_by_every_optimizer_step(fused):
    """torch's fused AdamW updates the weights without bumping _version: the step hook catches it."""
    fp8_experts.install_step_hook()
    w = _weight()
    cache = FP8WeightCache()
    first = cache.get("w", w, w, "forward")
    w.grad = torch.randn_like(w)
    torch.optim.AdamW([w], lr=0.1, fused=fused).step()
    second = cache.get("w", w, w, "forward")
    assert second is not first and not torch.equal(second[1], first[1])
    assert torch.equal(second[0].float() * second[1][..., None], quantize_rowwise(w.detach())[0].float()
                       * quantize_rowwise(w.detach())[1][..., None])


def test_weights_changed_invalidates_after_a_data_write():
    w = _weight()
    cache = FP8WeightCache()
    first = cache.get("w", w, w, "forward")
    w.data.add_(1.0)  # not seen by _version
    assert cache.get("w", w, w, "forward") is first  # documented: .data writes need weights_changed()
    fp8_experts.weights_changed()
    assert cache.get("w", w, w, "forward") is not first


def _reference(x, weight, offs, transposed):
    """The FP8 arithmetic spelled out: rowwise-quantised operands, fp32 products, per expert."""
    w_nk = weight.transpose(-2, -1) if transposed else weight
    deq = lambda t: (lambda d, s: d.float() * s[..., None])(*quantize_rowwise(t.contiguous()))  # noqa: E731
    xq, wq = deq(x), deq(w_nk)
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):
        out.append(xq[start:end] @ wq[e].t())
        start = end
    return torch.cat(out)


@pytest.mark.parametrize("transposed", [False, True])
def test_fp8_grouped_linear_forward_and_gradients(transposed):
    g = torch.Generator().manual_seed(3)
    weight = torch.nn.Parameter(_weight(out=32, inn=48).detach().transpose(-2, -1).contiguous()
                                if transposed else _weight(out=32, inn=48).detach())
    counts = torch.tensor([5, 0, 7])  # an empty expert too
    offs = torch.cumsum(counts, 0).to(torch.int32)
    x = torch.randn(12, 48, generator=g, requires_grad=True)
    cache = FP8WeightCache()
    out = grouped_linear_fp8(x, weight, offs, weight, cache, "w", transposed)
    assert rel_err(out, _reference(x.detach(), weight.detach(), offs, transposed)) < 1e-6
    # against full precision: FP8's error, well under FP8_TOL, far above a wrong layout's
    exact = _reference_exact(x.detach(), weight.detach(), offs, transposed)
    assert 1e-3 < rel_err(out, exact) < 0.06
    gout = torch.randn(out.shape, generator=g)
    out.backward(gout)
    w_nk = weight.detach().transpose(-2, -1) if transposed else weight.detach()
    # input gradient: g [S, out] @ W_e, both rowwise-quantised along `out`
    gq = (lambda d, s: d.float() * s[:, None])(*quantize_rowwise(gout))
    wtq = (lambda d, s: d.float() * s[..., None])(*quantize_rowwise(w_nk.transpose(-2, -1).contiguous()))
    ref_dx = torch.cat([gq[a:b] @ wtq[e].t() for e, (a, b) in enumerate(zip([0, 5, 5], [5, 5, 12]))])
    assert rel_err(x.grad, ref_dx) < 1e-6
    # weight gradient: plain precision, g_e^T x_e
    ref_dw = torch.stack([gout[a:b].t() @ x.detach()[a:b] for a, b in zip([0, 5, 5], [5, 5, 12])])
    assert rel_err(weight.grad, ref_dw.transpose(-2, -1) if transposed else ref_dw) < 1e-6
    assert cache.quantisations == 2  # one copy per layout


def _reference_exact(x, weight, offs, transposed):
    w_nk = weight.transpose(-2, -1) if transposed else weight
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):
        out.append(x[start:end] @ w_nk[e].t())
        start = end
    return torch.cat(out)


def test_fallback_reasons():
    w = torch.zeros(2, 32, 48)
    assert "CUDA GPU" in fp8_experts.why_not([w], "cpu")
    assert "fp8='current'" in fp8_experts.why_not([w], "cuda", recipe="delayed")
    assert "expert parallelism" in fp8_experts.why_not([w], "cpu", expert_parallel=True)
    if torch.cuda.is_available():
        assert "divisible by 16" in fp8_experts.why_not([torch.zeros(2, 30, 48)], "cuda")


def test_fp8_plan_on_cpu_keeps_bf16_experts_with_the_reason():
    model = build("qwen3_moe")
    plain = {r.path: r for r in make_plan(model, Options(), True).rows if r.kind == "experts"}
    rows = [r for r in make_plan(model, Options(fp8="current"), True).rows if r.kind == "experts"]
    assert rows
    for r in rows:
        assert r.replacement == plain[r.path].replacement == "GroupedExperts(grouped_mm)"
        assert r.status == "fallback" and "FP8 experts need a CUDA GPU" in r.reason
    for r in (r for r in make_plan(model, Options(fp8="delayed"), True).rows if r.kind == "experts"):
        assert r.replacement == "GroupedExperts(grouped_mm)" and "run under fp8='current'" in r.reason


def test_fp8_module_copies_and_pickles_without_its_cache():
    from moe_patch.ops.experts import FLAG_NAMES, GroupedExperts

    model = build("qwen3_moe")
    original = next(m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "gate_up_proj"))
    flags = {f: getattr(original, f, False) for f in FLAG_NAMES}
    module = GroupedExperts.build(original, flags, fp8=True)
    module._fp8_cache.get("down_proj", module.down_proj, module.down_proj, "forward")
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert clone._fp8_cache is not module._fp8_cache and clone._fp8_cache.quantisations == 0
        assert not clone._fp8_cache._entries
    assert "fp8" not in " ".join(module.state_dict())
    # CPU rows run the bf16 path: the same numbers as the module without fp8
    x = torch.randn(6, original.down_proj.shape[-2])
    idx = torch.randint(0, original.down_proj.shape[0], (6, 2))
    w = torch.rand(6, 2)
    plain = GroupedExperts.build(original, flags)
    assert torch.equal(module(x, idx, w), plain(x, idx, w))
