"""Attributes a user sets on a patched model's modules after apply() are what it computes with, as stock:
every replacement reads the module's own attributes at each forward (issue 17), and revert() keeps them."""
import copy

import pytest
import torch

import moe_patch
from util import build, inputs, rel_err, run


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
