"""Training curves of the four families NVIDIA hand-tunes (Qwen3-MoE, DeepSeek-V3, Nemotron-H, GPT-OSS): 20 AdamW
steps of stock and of the patched model on the same batches, fp32 on CPU (the exact torch paths; on a GPU the bf16
kernels add their own rounding, ~1e-3 run to run, so the curves are compared where they can be exact).

Issue 18 asks for loss curves within 1e-3 of stock over 20 steps. Every few steps a batch is padded (an
attention_mask with zeros and -100 labels there) and one is packed (position_ids restarting, no mask), so the
switches the models branch on are exercised, not just the plain causal batch."""
import copy

import pytest
import torch

import moe_patch
from util import build, rel_err

FAMILIES = ("qwen3_moe", "deepseek_v3", "nemotron_h", "gpt_oss")
STEPS = 20


def _batch(step: int, g: torch.Generator) -> dict:
    ids = torch.randint(0, 256, (2, 12), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if step % 5 == 3:  # right padding on the second row
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0
        batch["labels"][1, 8:] = -100
        batch["attention_mask"] = mask
    elif step % 5 == 4:  # two sequences packed in each row
        batch["position_ids"] = torch.cat([torch.arange(7), torch.arange(5)]).expand(2, -1).clone()
    return batch


def _curves(family: str, optimizer) -> tuple:
    """STEPS optimizer steps of stock and of the patched model on the same five batches, cycled (so that the models
    learn them and the curves fall): (stock, patched, stock losses, patched losses)."""
    stock = build(family)
    patched = moe_patch.apply(copy.deepcopy(stock))
    # the kinds that change training numbers are all replaced: a replacement whose plan-time proof fails stays stock
    # (reported), and the curves would then compare stock with stock there and pass whatever that kernel computes
    report = moe_patch.report(patched)
    for kind in ("experts", "router", "loss"):
        rows = list(report.where(kind=kind))
        assert rows and all(r.status == "patched" for r in rows), (kind, [(r.path, r.status, r.reason) for r in rows])
    opts = [optimizer(m.parameters()) for m in (stock, patched)]
    g = torch.Generator().manual_seed(5)
    batches = [_batch(step, g) for step in range(5)]
    curves = ([], [])
    for step in range(STEPS):
        for model, opt, curve in zip((stock, patched), opts, curves):
            model.train()
            loss = model(**batches[step % 5]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            curve.append(loss.item())
    return stock, patched, *curves


@pytest.mark.parametrize("family", FAMILIES)
def test_twenty_adamw_steps_follow_stock(family):
    """Issue 18's criterion: the loss curves over 20 steps within 1e-3 of stock (measured: 4e-5 or less). The
    parameters are not compared here: Adam's first steps divide each gradient by its own magnitude, so an element
    whose gradient is ~1e-8 (float32 rounding of a sum that is nearly zero) moves by a different fraction of the
    learning rate in two exact implementations; the SGD test below compares them."""
    _, _, ref, out = _curves(family, lambda params: torch.optim.AdamW(params, lr=3e-3))
    worst = max(abs(a - b) for a, b in zip(ref, out))
    assert worst < 1e-3, (worst, ref, out)
    assert ref[-1] < ref[0] - 0.5  # it trains: the comparison is over a falling curve


@pytest.mark.parametrize("family", FAMILIES)
def test_twenty_sgd_steps_give_stock_parameters(family):
    """Plain SGD at a stable learning rate: after 20 steps every parameter is stock's within float32 rounding
    (measured: ~1e-7 relative), so no step's gradient was another function's."""
    stock, patched, ref, out = _curves(family, lambda params: torch.optim.SGD(params, lr=0.05))
    assert max(abs(a - b) for a, b in zip(ref, out)) < 1e-4
    assert len(list(patched.parameters())) == len(list(stock.parameters()))
    for name, p in stock.named_parameters():  # by name: a zip would pass on a prefix, or pair the wrong tensors
        assert rel_err(patched.get_parameter(name).detach(), p.detach()) < 1e-5, name
