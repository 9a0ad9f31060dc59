"""Attributes a user sets on a patched model's modules after apply() are what it computes with, as stock:
every replacement reads the module's own attributes at each forward (issue 17), and revert() keeps them."""
import copy

import pytest
import torch

import moe_patch
from util import assert_runs_match, build, inputs, rel_err, run


def _set(model, cls_suffix, **attrs):
    n = 0
    for module in model.modules():
        if type(module).__name__.rstrip("]").endswith(cls_suffix):  # patched: "Impl[FamilyClass]"
            for k, v in attrs.items():
                assert hasattr(module, k), (type(module).__name__, k)  # read back as on the stock module
                setattr(module, k, v)
            n += 1
    assert n, cls_suffix


# (family, class-name suffix of the modules changed, attributes set after apply, kind that replaced them)
CASES = [
    ("qwen3_moe", "TopKRouter", dict(norm_topk_prob=False), "router"),
    ("qwen3_moe", "TopKRouter", dict(top_k=3), "router"),
    ("deepseek_v3", "TopkRouter", dict(routed_scaling_factor=0.7, topk_group=2), "router"),
    ("olmoe", "RMSNorm", dict(variance_epsilon=0.5), "rmsnorm"),
    ("gpt_oss", "Experts", dict(limit=0.3, alpha=0.9), "experts"),
]


@pytest.mark.parametrize("family,suffix,attrs,kind", CASES, ids=lambda v: str(v) if not isinstance(v, dict) else
                         ",".join(f"{k}={x}" for k, x in v.items()))
def test_attribute_set_after_apply_is_honoured(family, suffix, attrs, kind):
    stock = build(family)
    patched = moe_patch.apply(copy.deepcopy(stock))
    assert moe_patch.report(patched).where(kind=kind, status="patched")
    ids = inputs(seq=10)
    before = run(stock, ids)[0]
    for m in (stock, patched):
        _set(m, suffix, **attrs)
    logits_s, loss_s, grads_s = run(stock, ids)
    logits_p, loss_p, grads_p = run(patched, ids)
    assert rel_err(logits_s, before) > 1e-4  # the switch changes the stock result: the test can fail
    assert rel_err(logits_p, logits_s) < 1e-5 and rel_err(loss_p, loss_s) < 1e-5
    for name, g in grads_s.items():
        assert rel_err(grads_p[name], g) < 1e-4, name


def test_revert_hands_back_attributes_set_while_patched():
    model = moe_patch.apply(build("qwen3_moe"))
    _set(model, "TopKRouter", norm_topk_prob=False)
    _set(model, "RMSNorm", variance_epsilon=0.25)
    moe_patch.revert(model)
    routers = [m for m in model.modules() if type(m).__name__ == "Qwen3MoeTopKRouter"]
    norms = [m for m in model.modules() if type(m).__name__ == "Qwen3MoeRMSNorm"]
    assert routers and all(r.norm_topk_prob is False for r in routers)
    assert norms and all(n.variance_epsilon == 0.25 for n in norms)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_revert_keeps_modules_the_user_replaced_while_patched(family):
    """A module set on the model after apply() (here a norm and a router) is the user's: revert() puts back
    moe_patch's own swaps only. Before, revert() put the original family module back over the user's, and the
    model silently computed with the old one (logits rel. error ~1e-1 against stock doing the same)."""
    stock = build(family)
    patched = moe_patch.apply(copy.deepcopy(stock))
    layer = len(stock.model.layers) - 1  # a MoE layer in both families
    for model in (stock, patched):
        torch.manual_seed(4)
        model.model.layers[layer].input_layernorm = torch.nn.LayerNorm(model.config.hidden_size)
        gate = copy.deepcopy(stock.model.layers[layer].mlp.gate)  # a fresh stock router, other weights
        with torch.no_grad():
            gate.weight.normal_(0, 0.5)
        model.model.layers[layer].mlp.gate = gate
    user_modules = (patched.model.layers[layer].input_layernorm, patched.model.layers[layer].mlp.gate)
    moe_patch.revert(patched)
    assert (patched.model.layers[layer].input_layernorm, patched.model.layers[layer].mlp.gate) == user_modules
    ids = inputs(seq=10)
    assert_runs_match(stock, patched, ids)


def test_revert_puts_the_original_back_inside_a_wrapper_the_user_set_while_patched():
    """A wrapper set around a replaced module after apply() (as PEFT's adapters wrap the experts) stays at
    revert(), and the module inside it is the family's original again, not moe_patch's replacement."""
    class Wrap(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    stock = build("qwen3_moe")
    patched = moe_patch.apply(copy.deepcopy(stock))
    mlp = patched.model.layers[-1].mlp
    replaced = mlp.experts
    assert type(replaced) is not type(stock.model.layers[-1].mlp.experts) and hasattr(replaced, "give_back")
    for model in (stock, patched):
        model.model.layers[-1].mlp.experts = Wrap(model.model.layers[-1].mlp.experts)
    wrapper = mlp.experts
    moe_patch.revert(patched)
    assert mlp.experts is wrapper
    assert type(wrapper.inner) is type(stock.model.layers[-1].mlp.experts.inner)
    assert not any(hasattr(m, "give_back") for m in patched.modules())
    assert_runs_match(stock, patched, inputs(seq=10))


def test_revert_keeps_a_forward_the_user_set_while_patched():
    """A forward set on the model after apply() (a user's wrapper, accelerate's autocast wrapper) wraps the
    fused-loss forward; revert() leaves it in place (before, it was deleted) and the fused loss inside it no
    longer runs: the reverted model computes and returns what stock does (logits in a training forward too)."""
    stock = build("qwen3_moe")
    patched = moe_patch.apply(copy.deepcopy(stock))
    calls = []

    def wrap(forward):
        def wrapper(*args, **kwargs):
            calls.append(1)
            return forward(*args, **kwargs)
        return wrapper

    for model in (stock, patched):
        model.forward = wrap(model.forward)
    user_forward = patched.forward
    moe_patch.revert(patched)
    assert patched.forward is user_forward
    ids = inputs(seq=10)
    stock.train(), patched.train()
    out_s = stock(input_ids=ids, labels=ids)
    out_p = patched(input_ids=ids, labels=ids)
    assert len(calls) == 2
    assert out_p.logits is not None and rel_err(out_p.logits, out_s.logits) < 1e-5
    assert rel_err(out_p.loss, out_s.loss) < 1e-5


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_model_cast_to_float64_after_apply_matches_stock(family):
    """A model on the family's eager experts (which run in float64) cast with .double() after apply(): torch's
    grouped_mm has no float64 kernel, so the patched experts must take their per-expert loop, not raise."""
    stock = build(family, experts_implementation="eager")
    patched = moe_patch.apply(copy.deepcopy(stock))
    assert moe_patch.report(patched).where(kind="experts", status="patched")
    for m in (stock, patched):
        m.double()
    assert_runs_match(stock, patched, inputs(seq=10))
