"""Every listed family: patched vs stock logits (rel. error < 1e-5) and every gradient (< 1e-4), fp32 CPU."""
import pytest
import torch

import moe_patch
from util import FAMILIES, build, inputs, rel_err, run, stock_and_patched


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
    from moe_patch.ops import attention
    from moe_patch.ops.router import TopKRouter

    _, patched = stock_and_patched("qwen3_moe")
    layer = patched.model.layers[0]
    assert isinstance(layer.mlp.experts, GroupedExperts)
    assert isinstance(layer.mlp.gate, TopKRouter)
    assert isinstance(layer.input_layernorm, TorchRMSNorm)
    assert patched.config._attn_implementation == "sdpa"  # the name the user asked for, unchanged
    assert all(attention.is_patched(layer.self_attn) for layer in patched.model.layers)  # the kernel-priority hooks


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


def test_undecorated_experts_declared_in_a_family_file(monkeypatch):
    """A custom 3D-experts class without v5's decorator is patched once patches/ declares its layout."""
    from torch import nn

    from moe_patch import families

    class MyExperts(nn.Module):  # v5 layout, no @use_experts_implementation
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.gate_up_proj = nn.Parameter(torch.randn(4, 2 * 6, 8, generator=g))
            self.down_proj = nn.Parameter(torch.randn(4, 8, 6, generator=g))
            self.act_fn = nn.SiLU()

        def _apply_gate(self, h):
            gate, up = h.chunk(2, dim=-1)
            return self.act_fn(gate) * up

        def forward(self, x, idx, w):
            out = torch.zeros_like(x)
            for t in range(x.shape[0]):
                for k in range(idx.shape[1]):
                    e = idx[t, k]
                    h = self._apply_gate(x[t] @ self.gate_up_proj[e].T)
                    out[t] += w[t, k] * (h @ self.down_proj[e].T)
            return out

    flags = dict(has_gate=True, has_bias=False, is_transposed=False, has_post_expert_norm=False)
    monkeypatch.setitem(families.tables().experts, "MyExperts", flags)
    model = nn.Sequential(MyExperts())
    x, idx, w = torch.randn(5, 8), torch.randint(0, 4, (5, 2)), torch.rand(5, 2)
    ref = model[0](x, idx, w)
    moe_patch.apply(model)
    assert moe_patch.report(model).where(kind="experts")[0].status == "patched"
    assert type(model[0]).__name__ == "GroupedExperts[MyExperts]"
    assert rel_err(model[0](x, idx, w), ref) < 1e-5


def test_router_probe_allows_other_tie_breaks_only():
    """A router kernel may break a tie at the k-th logit its own way (both experts are right answers) and
    order each token's k pairs its own way: the probe checks it on tie-free rows, pairs in expert order.
    A router with different arithmetic (no renormalisation) is still refused."""
    from moe_patch import probe
    from moe_patch.ops import router

    stock = build("qwen3_moe").model.layers[0].mlp.gate
    spec = dict(score="softmax", renorm="norm_topk_prob")

    class OtherOrder(router.TopKRouter):  # prefers the higher expert index on ties, returns pairs reversed
        def route(self, logits):
            e = logits.shape[-1]
            flipped = torch.argsort(logits.float().flip(-1), dim=-1, descending=True, stable=True)
            idx = (e - 1 - flipped[:, :self.top_k]).flip(-1)
            weights = torch.softmax(logits.float(), -1).gather(1, idx)
            return weights / weights.sum(-1, keepdim=True), idx

    width = stock.weight.shape[1]
    assert probe.proven_equal(stock, lambda m: OtherOrder.build(m, spec), width, "other order",
                              canon=router.canonical, rows=router.untied_rows) is None
    assert probe.proven_equal(stock, lambda m: OtherOrder.build(m, spec), width, "other order, raw") is not None
    unnormalised = dict(spec, renorm=False)
    why = probe.proven_equal(stock, lambda m: router.TopKRouter.build(m, unnormalised), width, "no renorm",
                             canon=router.canonical, rows=router.untied_rows)
    assert why is not None and "rel. error" in why


def test_untied_rows_drops_only_ties_at_the_kth_logit():
    """A tie inside the top-k leaves the chosen set unique (kept); a tie between the k-th and the next
    logit does not (dropped): there two tie-breaking rules choose different, equally right, sets."""
    from moe_patch.ops.router import untied_rows

    logits = torch.tensor([[3.0, 3.0, 1.0, 0.0],   # tie inside the top-2: the set {0, 1} either way
                           [3.0, 2.0, 2.0, 0.0],   # tie at the 2nd place: {0, 1} or {0, 2}
                           [0.0, 1.0, 2.0, 3.0]])  # no tie
    router = type("Router", (), {"top_k": 2, "__call__": lambda self, x: (x,)})()  # returns the logits
    keep = untied_rows(router, logits)
    assert keep.tolist() == [True, False, True]
    low_first = torch.argsort(logits, dim=-1, descending=True, stable=True)[:, :2].sort(-1).values
    high_first = (3 - torch.argsort(logits.flip(-1), dim=-1, descending=True, stable=True)[:, :2]).sort(-1).values
    assert torch.equal(low_first[keep], high_first[keep]) and not torch.equal(low_first, high_first)
