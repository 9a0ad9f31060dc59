"""Shared helpers for the tests: tiny models, relative errors, stock-vs-patched runs."""
from __future__ import annotations

import copy
import logging

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from moe_patch.shapes import TINY, tiny_config

hf_logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)

FAMILIES = list(TINY)
MOE_FAMILIES = [f for f in FAMILIES if f != "llama"]


def build(model_type: str, seed: int = 0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).to(dtype)
    with torch.no_grad():  # non-trivial values everywhere (some inits are zeros: routers, biases)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "router" in name or ".gate." in name or name.endswith("gate.weight"):
                p.normal_(0, 0.2)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.05)
    return model


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    denom = b.norm()
    if denom == 0:
        return (a - b).norm().item()
    return ((a - b).norm() / denom).item()


def run(model, input_ids, labels=None):
    """Logits from a forward without labels; loss and gradients from a training forward with labels
    (where a patched model takes the fused-loss path and returns no logits)."""
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    out = model(input_ids=input_ids, labels=labels if labels is not None else input_ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits, out.loss.detach(), grads


def assert_runs_match(stock, patched, input_ids):
    """run() on both: logits and loss within 1e-5 (fp32), the same parameters with gradients, each within 1e-4.
    Returns stock's (logits, loss, grads)."""
    logits_s, loss_s, grads_s = run(stock, input_ids)
    logits_p, loss_p, grads_p = run(patched, input_ids)
    assert rel_err(logits_p, logits_s) < 1e-5 and rel_err(loss_p, loss_s) < 1e-5
    assert grads_p.keys() == grads_s.keys()
    for name, g in grads_s.items():
        assert rel_err(grads_p[name], g) < 1e-4, name
    return logits_s, loss_s, grads_s


def stock_and_patched(model_type: str, **apply_kwargs):
    import moe_patch

    stock = build(model_type)
    patched = copy.deepcopy(stock)
    moe_patch.apply(patched, **apply_kwargs)
    return stock, patched


def inputs(vocab=256, batch=2, seq=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


class RowWeightingDispatcher:
    """LocalDispatcher's rows, handed to the experts module with their routing weights (Dispatched.weights,
    as te_ep does); the combine then only sums."""

    name = "row_weighting"

    def __init__(self):
        from moe_patch.ops.experts import LocalDispatcher

        self.local = LocalDispatcher()

    def dispatch(self, hidden, top_k_index, top_k_weights, num_experts):
        from moe_patch.ops.experts import Dispatched

        d = self.local.dispatch(hidden, top_k_index, top_k_weights, num_experts)
        return Dispatched(d.x, d.counts, d.state, weights=d.state[1])

    def combine(self, out, d, hidden_dtype):
        order, weights, num_tokens, top_k = d.state
        slots = out.new_zeros(num_tokens * top_k, out.shape[-1]).index_put((order,), out)
        return slots.view(num_tokens, top_k, out.shape[-1]).sum(dim=1).to(hidden_dtype)
