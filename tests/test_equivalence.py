"""Every listed family: patched vs stock logits (rel. error < 1e-5) and every gradient (< 1e-4), fp32 CPU."""
import pytest
import torch

import moe_patch
from util import FAMILIES, inputs, rel_err, run, stock_and_patched


@pytest.mark.parametrize("model_type", FAMILIES)
def test_patched_matches_stock(model_type):
    stock, patched = stock_and_patched(model_type)
    report = moe_patch.report(patched)
    if model_type != "llama":
        assert report.where(kind="experts", status="patched"), str(report)
    assert report.where(kind="rmsnorm").rows and all(r.status != "skipped" or r.reason for r in report)
    for seed in (1, 2):  # fresh random inputs each time
        ids = inputs(seed=seed)
        logits_s, loss_s, grads_s = run(stock, ids)
        logits_p, loss_p, grads_p = run(patched, ids)
        assert rel_err(logits_p, logits_s) < 1e-5
        assert abs(loss_p.item() - loss_s.item()) <= 1e-5 * abs(loss_s.item())
        assert grads_s.keys() == grads_p.keys()
        worst = max(grads_s, key=lambda n: rel_err(grads_p[n], grads_s[n]))
        assert rel_err(grads_p[worst], grads_s[worst]) < 1e-4, worst


def test_patched_families_use_our_modules():
    """The matrix above would pass vacuously if nothing were swapped: check what actually runs."""
    from moe_patch.ops.experts import GroupedExperts
    from moe_patch.ops.rmsnorm import TorchRMSNorm
    from moe_patch.ops.router import TopKRouter

    _, patched = stock_and_patched("qwen3_moe")
    layer = patched.model.layers[0]
    assert isinstance(layer.mlp.experts, GroupedExperts)
    assert isinstance(layer.mlp.gate, TopKRouter)
    assert isinstance(layer.input_layernorm, TorchRMSNorm)
    assert patched.config._attn_implementation == "moe_patch_sdpa"


def test_unknown_fused_experts_detected_structurally():
    """A custom class with 3D expert weights but no v5 flags is found and reported, not silently ignored."""
    from torch import nn

    class MyExperts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w_in = nn.Parameter(torch.randn(4, 8, 16))
            self.w_out = nn.Parameter(torch.randn(4, 16, 8))

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Module()
            self.block.moe = MyExperts()

    model = Toy()
    rows = moe_patch.plan_report(model)
    (row,) = [r for r in rows if r.kind == "experts"]
    assert row.path == "block.moe" and row.status == "skipped" and "layout flags" in row.reason
