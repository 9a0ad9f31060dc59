"""bf16 on a CUDA GPU: every replacement against the stock model (rel. error < 2e-2), per family."""
import copy

import pytest
import torch

import moe_patch
from util import FAMILIES, build, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _run(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    out = model(input_ids=ids, labels=ids)  # patched: fused loss, no logits
    out.loss.backward()
    return logits, out.loss.float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["auto", "torch", "te", "liger"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_bf16_model_matches_stock(model_type, backend):
    stock = build(model_type, dtype=torch.bfloat16).cuda()
    patched = moe_patch.apply(copy.deepcopy(stock), backend=backend)
    ids = torch.randint(0, 256, (2, 64), device="cuda")
    logits_s, loss_s, grads_s = _run(stock, ids)
    logits_p, loss_p, grads_p = _run(patched, ids)
    assert rel_err(logits_p, logits_s) < 2e-2
    assert rel_err(loss_p, loss_s) < 2e-2
    bad = {n: rel_err(grads_p[n], g) for n, g in grads_s.items() if rel_err(grads_p[n], g) >= 2e-2}
    assert not bad, bad


def test_gpu_backends_reported():
    from moe_patch.backends import capabilities

    model = moe_patch.apply(build("qwen3_moe", dtype=torch.bfloat16).cuda())
    rows = moe_patch.report(model)
    experts = rows.where(kind="experts")[0]
    assert experts.status == "patched" and experts.backend == ("te" if capabilities().te else "torch")
    norm = rows.where(kind="rmsnorm")[0]
    assert norm.backend == ("liger" if capabilities().liger else "torch")
    attn = rows.where(kind="attention")[0]
    assert "cudnn" in attn.replacement
