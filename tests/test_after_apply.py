"""Attributes a user sets on a patched model's modules after apply() are what it computes with, as stock:
every replacement reads the module's own attributes at each forward (issue 17), and revert() keeps them."""
import copy
import io

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


# A reference to a module taken before apply() (the detached original) and the module the model runs agree on
# the module's attributes while patched, both ways, as on a stock model where they are one object. Before,
# `g = model.model.layers[0].mlp.gate; apply(model); g.top_k = 3` changed only the detached object: the model
# kept routing top-2 (logits 1.4e-2 off stock with the same change, silently).
OLD_REFS = [  # (family, path of the module under model.model, attributes set through the old reference)
    ("qwen3_moe", "layers.0.mlp.gate", dict(top_k=3)),
    ("olmoe", "layers.0.input_layernorm", dict(variance_epsilon=0.5)),
    ("gpt_oss", "layers.0.mlp.experts", dict(limit=0.3)),
]


def _sub(model, path):
    return model.model.get_submodule(path)


@pytest.mark.parametrize("family,path,attrs", OLD_REFS, ids=[c[0] for c in OLD_REFS])
def test_write_through_a_reference_taken_before_apply_is_what_the_model_runs(family, path, attrs):
    stock = build(family)
    patched = copy.deepcopy(stock)
    old = _sub(patched, path)
    moe_patch.apply(patched)
    live = _sub(patched, path)
    assert live is not old and live.original is old  # replaced: the reference is to the detached original
    ids = inputs(seq=10)
    before = run(stock, ids)[0]
    for k, v in attrs.items():
        setattr(_sub(stock, path), k, v)
        setattr(old, k, v)
        assert getattr(live, k) == v  # the model's module reads it back
    assert rel_err(run(stock, ids)[0], before) > 1e-4  # the change changes the stock result: the test can fail
    assert_runs_match(stock, patched, ids)
    moe_patch.revert(patched)
    assert _sub(patched, path) is old and type(old) is type(_sub(stock, path))
    assert all(getattr(old, k) == v for k, v in attrs.items())
    assert not [k for k in vars(old) if "moe_patch" in k]
    assert_runs_match(stock, patched, ids)


def test_write_through_the_model_reads_back_on_a_reference_taken_before_apply():
    model = build("qwen3_moe")
    g, norm = model.model.layers[0].mlp.gate, model.model.layers[0].input_layernorm
    moe_patch.apply(model)
    model.model.layers[0].mlp.gate.top_k = 3
    model.model.layers[0].mlp.gate.norm_topk_prob = False
    model.model.layers[0].input_layernorm.variance_epsilon = 0.25
    model.model.layers[0].mlp.gate.eval()
    assert (g.top_k, g.norm_topk_prob, norm.variance_epsilon, g.training) == (3, False, 0.25, False)
    assert isinstance(g, type(build("qwen3_moe").model.layers[0].mlp.gate))
    # code branching on type(g) of the old reference takes the model's module for one of its kind, as before
    assert isinstance(model.model.layers[0].mlp.gate, type(g)) and type(g).__name__ == "Qwen3MoeTopKRouter"
    assert not isinstance(model.model.layers[0].input_layernorm, type(g))
    g.train()  # and through the old reference: the model's module follows
    assert model.model.layers[0].mlp.gate.training is True
    del g.norm_topk_prob  # a delete too
    assert not hasattr(model.model.layers[0].mlp.gate, "norm_topk_prob")
    moe_patch.revert(model)
    assert (g.top_k, norm.variance_epsilon, g.training, hasattr(g, "norm_topk_prob")) == (3, 0.25, True, False)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_copy_of_a_patched_model_keeps_a_value_written_through_an_old_reference(how):
    stock = build("qwen3_moe")
    patched = copy.deepcopy(stock)
    g = patched.model.layers[0].mlp.gate
    moe_patch.apply(patched)
    g.top_k = 3
    stock.model.layers[0].mlp.gate.top_k = 3
    if how == "deepcopy":
        copied = copy.deepcopy(patched)
    else:
        buf = io.BytesIO()
        torch.save(patched, buf)
        buf.seek(0)
        copied = torch.load(buf, weights_only=False)
    ids = inputs(seq=10)
    assert_runs_match(stock, copied, ids)
    old_copy = copied.model.layers[0].mlp.gate.original
    assert old_copy is not g and old_copy.top_k == 3
    old_copy.top_k = 1  # the copy's detached original drives the copy's live module, not the first model's
    assert copied.model.layers[0].mlp.gate.top_k == 1 and patched.model.layers[0].mlp.gate.top_k == 3
    moe_patch.revert(copied)
    assert copied.model.layers[0].mlp.gate is old_copy and old_copy.top_k == 1
    assert type(old_copy) is type(stock.model.layers[0].mlp.gate) and "_moe_patch_live" not in vars(old_copy)
    assert_runs_match(stock, patched, ids)


def test_parameter_assigned_through_a_reference_taken_before_apply_is_what_the_model_trains():
    """An nn.Parameter set through the old reference is forwarded to the live module (as
    load_state_dict(assign=True) on the model would set it): the model computes with it and its gradient
    lands on it. One set on the model's module is what the old reference reads back."""
    stock = build("qwen3_moe")
    patched = copy.deepcopy(stock)
    g = patched.model.layers[0].mlp.gate
    moe_patch.apply(patched)
    torch.manual_seed(3)
    new = torch.nn.Parameter(torch.randn_like(g.weight) * 0.5)
    g.weight = new
    stock.model.layers[0].mlp.gate.weight = torch.nn.Parameter(new.detach().clone())
    assert patched.model.layers[0].mlp.gate.weight is new
    ids = inputs(seq=10)
    _, _, grads = assert_runs_match(stock, patched, ids)
    assert new.grad is not None and rel_err(new.grad, grads["model.layers.0.mlp.gate.weight"]) < 1e-4
    other = torch.nn.Parameter(new.detach().clone())
    patched.model.layers[0].mlp.gate.weight = other
    assert g.weight is other
    moe_patch.revert(patched)
    assert patched.model.layers[0].mlp.gate is g and g.weight is other
    assert_runs_match(stock, patched, ids)


def test_experts_patched_again_after_a_switch_take_the_values_set_meanwhile():
    """set_experts_implementation('eager') puts the original experts back in the model; a value set on them
    then (through any reference) is what the replacement computes with once switched back."""
    stock = build("gpt_oss")
    patched = copy.deepcopy(stock)
    old = patched.model.layers[0].mlp.experts
    moe_patch.apply(patched)
    patched.set_experts_implementation("eager")
    assert patched.model.layers[0].mlp.experts is old
    old.limit = 0.3
    patched.set_experts_implementation("grouped_mm")
    assert patched.model.layers[0].mlp.experts is not old and patched.model.layers[0].mlp.experts.limit == 0.3
    stock.model.layers[0].mlp.experts.limit = 0.3
    assert_runs_match(stock, patched, inputs(seq=10))
    old.limit = 0.2  # linked again
    assert patched.model.layers[0].mlp.experts.limit == 0.2


def test_buffer_replaced_through_a_reference_taken_before_apply_is_what_the_model_runs():
    """nn.Module's methods on the detached original (register_buffer of an existing name, to() / double(), which
    put a new tensor in the module's store) act on the stores the model runs. Before, they changed only the
    detached original's own store: DeepSeek-V3's router kept routing with the old e_score_correction_bias
    (logits 1.5e-1 off stock, silently) and stayed float32 under g.double()."""
    stock = build("deepseek_v3")
    patched = copy.deepcopy(stock)
    g = _sub(patched, "layers.1.mlp.gate")
    moe_patch.apply(patched)
    new = torch.randn(g.e_score_correction_bias.shape, generator=torch.Generator().manual_seed(4)) * 0.5
    for m in (_sub(stock, "layers.1.mlp.gate"), g):
        m.register_buffer("e_score_correction_bias", new.clone())
    assert _sub(patched, "layers.1.mlp.gate").e_score_correction_bias is g.e_score_correction_bias
    ids = inputs(seq=10)
    assert_runs_match(stock, patched, ids)
    g.double()
    assert _sub(patched, "layers.1.mlp.gate").e_score_correction_bias.dtype == torch.float64
    g.float()
    moe_patch.revert(patched)
    assert _sub(patched, "layers.1.mlp.gate") is g and torch.equal(g.e_score_correction_bias, new)
    assert_runs_match(stock, patched, ids)


def test_state_of_a_reference_taken_before_apply_is_the_models():
    """state_dict() / named_parameters() of the detached original are the model's after load_state_dict(assign=True)
    on the model (before: the stale Parameters, 0.67 off); a buffer or Parameter registered through it is in the
    model's state_dict() (before: missing, and revert() raised KeyError); a plain attribute set through the model
    reads back on it (before: AttributeError); type(g)(config) builds a module of the family's class."""
    stock = build("qwen3_moe")
    patched = copy.deepcopy(stock)
    g = patched.model.layers[0].mlp.gate
    family = type(g)
    moe_patch.apply(patched)
    ones = {k: torch.ones_like(v) for k, v in stock.state_dict().items()}
    patched.load_state_dict(ones, assign=True)
    assert torch.equal(g.state_dict()["weight"], torch.ones_like(g.weight))
    assert all(p is patched.model.layers[0].mlp.gate.weight for _, p in g.named_parameters())
    g.register_buffer("extra", torch.arange(3.0))
    g.register_parameter("extra_p", torch.nn.Parameter(torch.ones(2)))
    assert {"model.layers.0.mlp.gate.extra", "model.layers.0.mlp.gate.extra_p"} <= set(patched.state_dict())
    patched.model.layers[0].mlp.gate.my_flag = 7
    assert g.my_flag == 7 and not hasattr(g, "spec")  # (the replacement's own attribute: not the module's)
    assert type(type(g)(stock.config)) is family
    moe_patch.revert(patched)
    assert type(g) is family and torch.equal(g.extra, torch.arange(3.0)) and g.my_flag == 7
    assert not hasattr(g, "spec") and not [k for k in vars(g) if "moe_patch" in k]  # moe_patch's own: not handed back
    assert {"model.layers.0.mlp.gate.extra", "model.layers.0.mlp.gate.extra_p"} <= set(patched.state_dict())
    assert torch.equal(g.weight, torch.ones_like(g.weight))
