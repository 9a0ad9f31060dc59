"""Patching leaves every identity Transformers reads as it was (issue 17): the attention implementation name
stays what was asked for, so every branch keyed on it is taken as in the stock model (DeepSeek-V3.2's sparse
indexer, continuous batching); attention is proven at plan time against the family's module; Transformers'
own switches on a patched model re-plan the kind they concern; revert restores everything. fp32 CPU."""
import copy
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV32Config

import moe_patch
from moe_patch.ops import attention
from util import build, inputs, rel_err, run

ATTENTION_ONLY = dict(rmsnorm=False, linear=False, experts=False, router=False, loss=False)


def deepseek_v32(index_topk=8, layers=1):
    """DeepSeek-V3.2 (MLA + DSA sparse indexer), tiny, built from its config class."""
    config = DeepseekV32Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=16,
        q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, head_dim=8, n_group=2,
        topk_group=1, num_experts_per_tok=2, index_topk=index_topk, index_head_dim=16, index_n_heads=2,
        first_k_dense_replace=0, max_position_embeddings=128, attn_implementation="sdpa")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float()


@pytest.mark.parametrize("seq", [8, 9, 24])
def test_sparse_indexer_attention_matches_stock(seq):
    """Issue 17 case 1: past index_topk the indexer's key mask must still be applied (it is, for 'sdpa')."""
    stock = deepseek_v32()
    patched = moe_patch.apply(copy.deepcopy(stock), **ATTENTION_ONLY)
    row = moe_patch.report(patched).where(kind="attention")[0]
    assert row.status == "patched", row
    assert attention.is_patched(patched.model.layers[0].self_attn)
    assert patched.config._attn_implementation == "sdpa"
    ids = inputs(seq=seq, seed=seq)
    assert rel_err(patched(ids).logits, stock(ids).logits) < 1e-5
    stock.train(), patched.train()
    loss_s = stock(input_ids=ids, labels=ids).loss
    loss_p = patched(input_ids=ids, labels=ids).loss
    assert abs(loss_p.item() - loss_s.item()) <= 1e-5 * abs(loss_s.item())
    loss_s.backward(), loss_p.backward()
    grads_s = {n: p.grad for n, p in stock.named_parameters() if p.grad is not None}
    grads_p = {n: p.grad for n, p in patched.named_parameters() if p.grad is not None}
    assert grads_s.keys() == grads_p.keys()
    assert all(rel_err(grads_p[n], grads_s[n]) < 1e-4 for n in grads_s)


def test_attention_proof_runs_past_the_family_switches(monkeypatch):
    """The proof's sequence is longer than index_topk (and any window / chunk); it runs the family's own
    attention module with and without the hooks, padded and unpadded where the family takes both."""
    seen = []
    real_run = attention._run

    def spy(module, embeds, hidden_name, kwargs, hooked):
        seen.append((type(module).__name__, embeds.shape[1], hooked, kwargs.get("attention_mask") is not None))
        return real_run(module, embeds, hidden_name, kwargs, hooked)

    monkeypatch.setattr(attention, "_PROOFS", {})
    monkeypatch.setattr(attention, "_run", spy)
    model = deepseek_v32(index_topk=12)
    assert attention.switches(model.model.layers[0].self_attn)["index_topk"] == 12
    moe_patch.apply(model, **ATTENTION_ONLY)
    # padded (a materialised mask) with and without hooks; the unpadded variant (mask skipped, which the
    # indexer cannot take: DeepSeek-V3.2 always builds its mask) fails on the stock module and is left out
    assert [s for s in seen if s[2]] == [("DeepseekV32Attention", 20, True, True)]
    assert ("DeepseekV32Attention", 20, False, True) in seen

    seen.clear()
    moe_patch.apply(build("qwen3_moe"), **ATTENTION_ONLY)
    assert sorted(s[1:] for s in seen) == [(16, False, False), (16, False, True), (16, True, False), (16, True, True)]


def test_attention_proof_failure_keeps_stock(monkeypatch):
    """A hooked module that computes anything else is not used: stock attention stays, the report says why."""
    def perturbing_leave(module, args, output):
        return (output[0] * (1 + 1e-3),) + tuple(output[1:])

    monkeypatch.setattr(attention, "_PROOFS", {})
    monkeypatch.setattr(attention, "_leave", perturbing_leave)
    stock = build("qwen3_moe")
    patched = moe_patch.apply(copy.deepcopy(stock))
    rows = moe_patch.report(patched).where(kind="attention")
    assert rows.rows and all(r.status == "skipped" and "not proven equal" in r.reason
                             and "output rel. error" in r.reason for r in rows), rows.rows
    assert not any(attention.is_patched(layer.self_attn) for layer in patched.model.layers)
    ids = inputs()
    assert rel_err(patched(ids).logits, stock(ids).logits) < 1e-5
    monkeypatch.setattr(attention, "_PROOFS", {})


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "nemotron_h", "gpt_oss"])
def test_implementation_names_stay_as_asked(model_type):
    """Transformers' own test_sdpa_can_dispatch_non_composite_models asserts the name is "sdpa"."""
    model = build(model_type)
    asked = (model.config._attn_implementation, model.config._experts_implementation)
    moe_patch.apply(model)
    assert (model.config._attn_implementation, model.config._experts_implementation) == asked
    assert asked[0] == ("eager" if model_type == "gpt_oss" else "sdpa")  # GPT-OSS's sinks: eager, kept


def _count_priority_calls(monkeypatch) -> list:
    calls = []
    real = attention._set_priority

    def counting():
        calls.append(1)
        return real()

    monkeypatch.setattr(attention, "_set_priority", counting)
    return calls


def test_continuous_batching_on_a_patched_model_matches_stock(monkeypatch):
    """Issue 17 case 5: generate_batch raised ValueError on the renamed implementation."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    stock = build("qwen3_moe").eval()
    patched = moe_patch.apply(copy.deepcopy(stock)).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    generation = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    batching = ContinuousBatchingConfig(page_size=16, num_blocks=8, max_batch_tokens=32, max_requests_per_batch=4,
                                        use_cuda_graph=False, auto_switch_to_flash=False)

    def generate(model):
        out = model.generate_batch(inputs=prompts, generation_config=generation,
                                   continuous_batching_config=batching, warmup=False)
        return [out[k].generated_tokens for k in sorted(out)]

    expected = generate(stock)
    calls = _count_priority_calls(monkeypatch)
    assert generate(patched) == expected and len(expected[0]) == 4
    assert calls  # the patched attention ran (its hooks set the kernel priority)
    assert patched.config._attn_implementation == "sdpa" and moe_patch.report(patched).where(
        kind="attention", status="patched")


def test_set_experts_implementation_replans_the_experts(caplog):
    stock = build("qwen3_moe")
    patched = moe_patch.apply(copy.deepcopy(stock))
    experts_type = type(patched.model.layers[0].mlp.experts)
    params = dict(patched.named_parameters())
    ids = inputs()
    with caplog.at_level(logging.WARNING, logger="moe_patch"):
        patched.set_experts_implementation("eager")
        patched.model.set_experts_implementation("eager")  # the base model's switch is followed too
    assert patched.config._experts_implementation == "eager"
    assert all(type(layer.mlp.experts).__name__ == "Qwen3MoeExperts" for layer in patched.model.layers)
    assert len([r for r in caplog.records if "experts switched to 'eager'" in r.getMessage()]) == 1  # once
    rows = moe_patch.report(patched).where(kind="experts")
    assert all(r.status == "skipped" and "set_experts_implementation('eager')" in r.reason for r in rows)
    stock.set_experts_implementation("eager")
    assert rel_err(patched(ids).logits, stock(ids).logits) < 1e-5
    assert all(p is params[n] for n, p in patched.named_parameters())  # same Parameter objects throughout

    patched.set_experts_implementation("grouped_mm")  # back (as generate() does on GPU): patched again
    assert all(type(layer.mlp.experts) is experts_type for layer in patched.model.layers)
    assert all(r.status == "patched" for r in moe_patch.report(patched).where(kind="experts"))
    stock.set_experts_implementation("grouped_mm")
    logits_s, loss_s, grads_s = run(stock, ids)
    logits_p, loss_p, grads_p = run(patched, ids)
    assert rel_err(logits_p, logits_s) < 1e-5 and abs(loss_p.item() - loss_s.item()) <= 1e-5 * abs(loss_s.item())
    assert all(rel_err(grads_p[n], grads_s[n]) < 1e-4 for n in grads_s)


def test_set_attn_implementation_replans_the_attention(caplog):
    stock = build("qwen3_moe")
    patched = moe_patch.apply(copy.deepcopy(stock))
    ids = inputs()
    with caplog.at_level(logging.WARNING, logger="moe_patch"):
        patched.set_attn_implementation("eager")
    assert patched.config._attn_implementation == "eager"
    assert not any(attention.is_patched(layer.self_attn) for layer in patched.model.layers)
    assert any("attention switched to 'eager'" in r.getMessage() for r in caplog.records)
    rows = moe_patch.report(patched).where(kind="attention")
    assert all(r.status == "skipped" and "set_attn_implementation('eager')" in r.reason for r in rows)
    stock.set_attn_implementation("eager")
    assert rel_err(patched(ids).logits, stock(ids).logits) < 1e-5

    patched.set_attn_implementation("sdpa")
    stock.set_attn_implementation("sdpa")
    assert all(attention.is_patched(layer.self_attn) for layer in patched.model.layers)
    assert all(r.status == "patched" for r in moe_patch.report(patched).where(kind="attention"))
    assert rel_err(patched(ids).logits, stock(ids).logits) < 1e-5


def test_gradient_checkpointing_stays_exact(monkeypatch):
    """gradient_checkpointing_enable() on a patched model: same loss and gradients as stock with it, and the
    recomputed attention forward runs under the same kernel priority (SDPA's backward uses the kernel its
    forward chose)."""
    stock = build("qwen3_moe")
    patched = moe_patch.apply(copy.deepcopy(stock))
    stock.gradient_checkpointing_enable()
    patched.gradient_checkpointing_enable()
    ids = inputs()
    logits_s, loss_s, grads_s = run(stock, ids)
    calls = _count_priority_calls(monkeypatch)
    logits_p, loss_p, grads_p = run(patched, ids)
    assert rel_err(logits_p, logits_s) < 1e-5 and abs(loss_p.item() - loss_s.item()) <= 1e-5 * abs(loss_s.item())
    assert grads_s.keys() == grads_p.keys()
    assert all(rel_err(grads_p[n], grads_s[n]) < 1e-4 for n in grads_s)
    layers = len(patched.model.layers)
    assert len(calls) == 2 * layers + layers  # no-grad forward, training forward, and its recompute


def test_revert_restores_everything():
    model = build("qwen3_moe")
    modules = dict(model.named_modules())
    asked = (model.config._attn_implementation, model.config._experts_implementation)
    ids = inputs()
    ref = model(ids).logits
    moe_patch.apply(model)
    model.set_experts_implementation("eager")
    model.set_experts_implementation("grouped_mm")
    model.set_attn_implementation("eager")
    model.set_attn_implementation("sdpa")
    moe_patch.revert(model)
    after = dict(model.named_modules())
    assert after.keys() == modules.keys() and all(after[k] is modules[k] for k in modules)
    assert (model.config._attn_implementation, model.config._experts_implementation) == asked
    assert not any(attention.is_patched(m) for m in model.modules())
    assert not any(name in vars(m) for m in model.modules()
                   for name in ("set_attn_implementation", "set_experts_implementation"))
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert torch.equal(model(ids).logits, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_attention_runs_under_the_kernel_priority():
    """On a GPU the proof runs there (bf16, cuDNN first against torch's default order), and inside a patched
    attention module's forward SDPA's priority is cuDNN > Flash > efficient > math. Not run on CPU."""
    stock = build("qwen3_moe", dtype=torch.bfloat16).cuda()
    patched = moe_patch.apply(copy.deepcopy(stock))
    row = moe_patch.report(patched).where(kind="attention")[0]
    assert row.status in ("patched", "fallback") and "cudnn" in row.replacement, row
    seen = []
    handle = patched.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a: seen.append(torch._C._get_sdp_priority_order()[:4]))
    before = torch._C._get_sdp_priority_order()
    ids = inputs().cuda()
    assert rel_err(patched(ids).logits.float(), stock(ids).logits.float()) < 2e-2
    handle.remove()
    assert seen == [[int(b) for b in attention.gpu_priority()]]
    assert torch._C._get_sdp_priority_order() == before


def test_attention_on_eager_at_apply_is_proven_when_switched_to_sdpa():
    """A model built with eager attention is kept at apply(); set_attn_implementation("sdpa") afterwards
    proves the family's module on sdpa and patches it then; switched back, eager runs untouched again."""
    stock = build("qwen3_moe", attn_implementation="eager")
    patched = moe_patch.apply(copy.deepcopy(stock))
    assert patched.config._attn_implementation == "eager"
    rows = moe_patch.report(patched).where(kind="attention")
    assert rows.rows and all(r.status == "skipped" and "model uses 'eager'" in r.reason for r in rows)
    patched.set_experts_implementation(patched.config._experts_implementation)  # no change: rows untouched
    assert all(r.status == "skipped" and "model uses 'eager'" in r.reason for r in rows)
    patched.set_attn_implementation("sdpa")
    stock.set_attn_implementation("sdpa")
    assert all(r.status == "patched" for r in rows), rows.rows
    assert all(attention.is_patched(layer.self_attn) for layer in patched.model.layers)
    ids = inputs()
    assert rel_err(patched(ids).logits, stock(ids).logits) < 1e-5
    patched.set_attn_implementation("eager")
    assert not any(attention.is_patched(layer.self_attn) for layer in patched.model.layers)
    assert all(r.status == "skipped" and "after apply" in r.reason for r in rows)
    moe_patch.revert(patched)
    assert all(not m._forward_pre_hooks for m in patched.modules())


def test_attention_proof_that_cannot_run_keeps_stock(monkeypatch):
    """A window longer than the proof can exercise: not proven, so stock attention stays and the report says why."""
    monkeypatch.setattr(attention, "_PROOFS", {})
    monkeypatch.setitem(attention.MAX_PROBE_SEQ, "cpu", 64)
    stock = build("qwen3_moe", use_sliding_window=True, sliding_window=100)
    patched = moe_patch.apply(copy.deepcopy(stock))
    rows = moe_patch.report(patched).where(kind="attention")
    assert rows.rows and all(r.status == "skipped" and "sliding_window=100" in r.reason and "not proven" in r.reason
                             for r in rows), rows.rows
    assert not any(attention.is_patched(layer.self_attn) for layer in patched.model.layers)
    assert rel_err(patched(inputs()).logits, stock(inputs()).logits) < 1e-5
    monkeypatch.setattr(attention, "_PROOFS", {})


def test_sliding_window_attention_proven_past_the_window(monkeypatch):
    """A sliding window (8) the proof exceeds (sequence 16, sliding mask as Transformers builds it): patched,
    and equal to stock past the window."""
    seen = []
    real_run = attention._run
    monkeypatch.setattr(attention, "_PROOFS", {})
    monkeypatch.setattr(attention, "_run", lambda m, e, h, k, hooked: seen.append(e.shape[1]) or real_run(m, e, h, k, hooked))
    stock = build("qwen3_moe", use_sliding_window=True, sliding_window=8)
    patched = moe_patch.apply(copy.deepcopy(stock))
    assert seen and min(seen) > 8
    assert all(r.status == "patched" for r in moe_patch.report(patched).where(kind="attention"))
    ids = inputs(seq=24)
    assert rel_err(patched(ids).logits, stock(ids).logits) < 1e-5
