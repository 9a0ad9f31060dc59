"""Shared experts computed beside the token dispatch (moe_patch/parallel/overlap.py): the same results as
stock in every family with shared experts, the handover where the block calls its experts first, none (and
no wasted work) where it calls the shared expert first, and a clean fallback when a block feeds its shared
expert another tensor. Installed here without a mesh (one process); dist_ep.py checks it under expert
parallelism, test_gpu.py on CUDA streams."""
import copy

import pytest
import torch

import moe_patch
from moe_patch.engine import RECORD
from moe_patch.parallel import overlap
from util import build, rel_err, run

EXPERTS_FIRST = ["deepseek_v3", "glm4_moe", "nemotron_h"]  # experts(...) then shared_experts(residuals)
SHARED_FIRST = ["qwen2_moe", "qwen3_next", "ernie4_5_moe"]  # shared expert before the router


def with_overlap(model_type, dtype=torch.float32, device="cpu"):
    stock = build(model_type, dtype=dtype).to(device)
    patched = moe_patch.apply(copy.deepcopy(stock))
    pairs = overlap.install(patched, getattr(patched, RECORD))
    return stock, patched, pairs


@pytest.mark.parametrize("model_type", EXPERTS_FIRST + SHARED_FIRST)
def test_same_results_as_stock(model_type):
    stock, patched, pairs = with_overlap(model_type)
    assert pairs, "no shared expert found"
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(3))
    logits_s, loss_s, grads_s = run(stock, ids)
    logits_p, loss_p, grads_p = run(patched, ids)
    assert rel_err(logits_p, logits_s) < 1e-5
    assert rel_err(loss_p, loss_s) < 1e-5
    assert grads_s.keys() == grads_p.keys()
    for name, g in grads_s.items():
        assert rel_err(grads_p[name], g) < 1e-4, name
    handed = sum(p.handed for p in pairs.values())
    if model_type in EXPERTS_FIRST:
        # two forwards in run() (no_grad logits, training loss), each MoE layer hands its result over once
        assert handed == 2 * len(pairs)
    else:
        assert handed == 0
    assert all(p.off is None and p.kept is None for p in pairs.values())


def test_other_input_falls_back_and_switches_off():
    stock, patched, pairs = with_overlap("deepseek_v3")
    path, pair = next(iter(pairs.items()))
    experts = dict(patched.named_modules())[path]
    block = dict(patched.named_modules())[path.rsplit(".", 1)[0]]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, block.shared_experts.gate_proj.in_features, generator=g)
    other = torch.randn(x.shape, generator=g)
    idx = torch.randint(0, experts.num_global_experts, (5, 2), generator=g)
    w = torch.rand(5, 2, generator=g)
    pair._enter(block, (x,), {})  # as the block's pre-hook does
    experts(x, idx, w)
    assert pair.kept is not None
    with pytest.warns(RuntimeWarning, match="another tensor"):
        y = block.shared_experts(other)
    assert torch.equal(y, type(block.shared_experts).forward(block.shared_experts, other))
    assert pair.off and pair.handed == 0
    pair._enter(block, (x,), {})
    experts(x, idx, w)
    assert pair.kept is None  # off: no more work done ahead


def test_remove_restores_the_shared_expert():
    _, patched, pairs = with_overlap("glm4_moe")
    modules = dict(patched.named_modules())
    for path, pair in pairs.items():
        pair.remove(modules[path])
        assert "forward" not in vars(pair.shared) and modules[path]._overlap is None


def test_shared_overlap_flag_is_checked():
    from moe_patch.parallel import shard

    with pytest.raises(moe_patch.PatchError, match="shared_overlap"):
        shard.validate(build("deepseek_v3"), None, shared_overlap="yes")


def test_training_steps_follow_stock():
    """Several optimizer steps: the handover must not let any step see a stale or foreign result."""
    stock, patched, pairs = with_overlap("deepseek_v3")
    g = torch.Generator().manual_seed(9)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (stock, patched)]
    for step in range(4):
        ids = torch.randint(0, 256, (2, 9), generator=g)
        losses = []
        for model, opt in zip((stock, patched), opts):
            model.train()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        assert rel_err(losses[1], losses[0]) < 1e-5, step
    assert sum(p.handed for p in pairs.values()) == 4 * len(pairs)
