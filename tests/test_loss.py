"""The fused linear-cross-entropy loss: exact against stock, and the documented effect on outputs."""
import copy
import types

import pytest
import torch

import moe_patch
from util import build, inputs, rel_err


def test_training_with_labels_builds_no_logits_and_eval_is_stock():
    stock = build("qwen3_moe")
    patched = moe_patch.apply(copy.deepcopy(stock))
    ids = inputs()
    out = patched(input_ids=ids, labels=ids)
    assert out.logits is None and out.loss is not None
    assert out.past_key_values is None  # no KV cache filled in training, unless asked for:
    assert patched(input_ids=ids, labels=ids, use_cache=True).past_key_values is not None
    patched.eval()
    stock.eval()
    out = patched(input_ids=ids, labels=ids)  # eval: stock path, logits present
    ref = stock(input_ids=ids, labels=ids)
    assert rel_err(out.logits, ref.logits) < 1e-5 and rel_err(out.loss, ref.loss) < 1e-5


def _assert_stock_loss_and_gradients(patched, loss, stock, stock_loss):
    """loss within 1e-5 of stock's; after both backward passes every parameter gradient within 1e-4."""
    assert rel_err(loss, stock_loss) < 1e-5
    loss.backward()
    stock_loss.backward()
    grads = dict(stock.named_parameters())
    for name, p in patched.named_parameters():
        assert rel_err(p.grad, grads[name].grad) < 1e-4, name


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("use_cache", [None, False])
def test_packed_position_ids_give_stock_loss_and_gradients(family, use_cache):
    """position_ids restarting inside a row (packed sequences) without an attention_mask: Transformers masks the
    sequences apart only without a KV cache, and stock builds one in training (config.use_cache): the fused path
    must not drop it there, or its mask, loss and gradients differ from stock's."""
    stock = build(family)
    patched = moe_patch.apply(copy.deepcopy(stock))
    ids = inputs()
    cut = ids.shape[1] // 2
    pos = torch.cat([torch.arange(cut), torch.arange(ids.shape[1] - cut)])[None].expand(ids.shape[0], -1)
    kw = dict(input_ids=ids, labels=ids, position_ids=pos, **({} if use_cache is None else {"use_cache": use_cache}))
    out, ref = patched(**kw), stock(**kw)
    assert out.logits is None  # the fused path ran
    _assert_stock_loss_and_gradients(patched, out.loss, stock, ref.loss)


def test_router_aux_loss_and_ignored_labels_and_num_items():
    stock = build("mixtral", output_router_logits=True, router_aux_loss_coef=0.02)
    patched = moe_patch.apply(copy.deepcopy(stock))
    ids = inputs()
    labels = ids.clone()
    labels[:, :4] = -100
    for kw in ({}, {"num_items_in_batch": torch.tensor(9)}):
        ls = stock(input_ids=ids, labels=labels, **kw)
        lp = patched(input_ids=ids, labels=labels, **kw)
        assert lp.aux_loss is not None
        _assert_stock_loss_and_gradients(patched, lp.loss, stock, ls.loss)  # gradients accumulate over both calls


@pytest.mark.parametrize("case", ["all ignored", "one token", "num_items 0", "num_items 0 int", "num_items 7"])
def test_a_batch_with_no_label_to_learn_gives_stock_loss_and_gradients(case):
    """No valid label (every label -100; a one-token sequence, shifted away; Trainer's num_items_in_batch=0 for a
    masked window): stock's loss is 0 / 0 = nan with zero gradients. The fused loss must give the same zeros, not
    nan gradients that poison the weights at the next optimizer step; with num_items_in_batch > 0 the loss is 0."""
    stock = build("qwen3_moe")
    patched = moe_patch.apply(copy.deepcopy(stock))
    ids = inputs()
    labels, kw = torch.full_like(ids, -100), {}
    if case == "one token":
        ids = labels = ids[:1, :1]
    if case.startswith("num_items"):
        n = int(case.split()[1])
        kw = dict(num_items_in_batch=n if case.endswith("int") else torch.tensor(n))
    losses = []
    for model in (stock, patched):
        model.train()
        out = model(input_ids=ids, labels=labels, **kw)
        out.loss.backward()
        losses.append(out.loss.detach())
    assert torch.isnan(losses[0]) == torch.isnan(losses[1]), losses
    if not torch.isnan(losses[0]):
        assert losses[1] == losses[0] == 0, losses
    grads = dict(stock.named_parameters())
    for name, p in patched.named_parameters():
        if p.grad is not None or grads[name].grad is not None:
            assert torch.isfinite(p.grad).all() and torch.equal(p.grad, grads[name].grad), name


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_router_logits_recorded_when_the_model_ran_before_apply(model_type):
    """Transformers installs its output recorders at the first forward, on the stock router modules: the
    replacements must keep them firing, or output_router_logits (the aux loss) breaks after apply()."""
    stock = build(model_type, output_router_logits=True)
    ids = inputs()
    ref = stock(input_ids=ids, labels=ids)  # installs the recorder hooks
    patched = moe_patch.apply(copy.deepcopy(stock))
    out = patched(input_ids=ids, labels=ids)
    assert len(out.router_logits) == len(ref.router_logits) > 0
    assert rel_err(out.aux_loss, ref.aux_loss) < 1e-5 and rel_err(out.loss, ref.loss) < 1e-5
    moe_patch.revert(patched)
    assert rel_err(patched(input_ids=ids, labels=ids).aux_loss, ref.aux_loss) < 1e-5


def test_families_with_logit_transforms_keep_the_stock_loss():
    model = moe_patch.apply(build("granitemoe", logits_scaling=4.0))
    (row,) = moe_patch.report(model).where(kind="loss")
    assert row.status == "skipped" and "logits_scaling" in row.reason
    ids = inputs()
    assert model(input_ids=ids, labels=ids).logits is not None


def test_loss_opt_out_and_revert():
    model = build("qwen3_moe")
    moe_patch.apply(model, loss=False)
    assert "forward" not in vars(model)
    moe_patch.revert(model)
    moe_patch.apply(model)
    assert "forward" in vars(model)
    moe_patch.revert(model)
    assert "forward" not in vars(model)
    ids = inputs()
    assert model(input_ids=ids, labels=ids).logits is not None


@pytest.mark.parametrize("rows", [1, 3])
def test_chunking_covers_every_row(monkeypatch, rows):
    """Many chunks, the last one partial: the loss and the accumulated lm_head / hidden gradients."""
    from moe_patch.ops import loss

    stock = build("olmoe")
    monkeypatch.setattr(loss, "CHUNK_BYTES", rows * stock.config.vocab_size * 4)  # fp32 logits: `rows` rows
    assert loss.chunk_rows(stock.config.vocab_size, 4) == rows
    patched = moe_patch.apply(copy.deepcopy(stock))
    ids = inputs(seq=7)
    ls, lp = stock(input_ids=ids, labels=ids).loss, patched(input_ids=ids, labels=ids).loss
    assert rel_err(lp, ls) < 1e-5
    ls.backward(), lp.backward()
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        assert rel_err(patched.get_parameter(name).grad, stock.get_parameter(name).grad) < 1e-4, name


@pytest.mark.parametrize("vocab,total", [(201088, 8190), (102400, 16380), (151936, 16380), (131072, 8190),
                                         (201088, 2600), (201088, 100), (50000, 1)])
def test_chunks_are_as_few_and_as_equal_as_the_byte_cap_allows(vocab, total):
    """The chunked loss covers `total` rows in as many chunks as full CHUNK_BYTES chunks would take, of equal size
    (whole 256-row tiles), not full ones and a small remainder (GPT-OSS-20B's 8,190 rows: 4 x 2,048, not
    3 x 2,560 + 510); one chunk never holds more than a tile of rows over the cap."""
    from moe_patch.ops import loss

    cap = loss.chunk_rows(vocab, 2)
    rows = loss.chunk_rows(vocab, 2, total)
    chunks = -(-total // rows)
    assert chunks == -(-total // cap) and rows <= cap + 255
    last = total - (chunks - 1) * rows
    assert 0 < last <= rows and (chunks == 1 or rows - last < 256 * chunks), (rows, last)


@pytest.mark.parametrize("gpu_bytes,cap", [(150_000_000_000, 4 << 30), (85_000_000_000, 85_000_000_000 // 32),
                                           (24_000_000_000, 1 << 30), (None, 1 << 30)])
def test_chunk_cap_grows_with_the_gpus_memory(monkeypatch, gpu_bytes, cap):
    """chunk_bytes: 1/32 of the GPU's memory between 1 and 4 GiB (an H200: 4 GiB, GPT-OSS-20B's 8,192 rows in one
    chunk); CHUNK_BYTES off CUDA (None: the CPU)."""
    from moe_patch.ops import loss

    props = types.SimpleNamespace(total_memory=gpu_bytes)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    device = "cpu" if gpu_bytes is None else "cuda:0"
    assert loss.chunk_bytes(device) == cap
    rows = loss.chunk_rows(201088, 2, 8192, device)
    assert rows * 201088 * 2 <= cap + 255 * 201088 * 2 and (rows >= 8192) == (cap >= 8192 * 201088 * 2)


def test_tuple_outputs_keep_their_positions():
    """return_dict=False gives (loss, logits, ...) exactly as stock (the fused path would drop the logits)."""
    stock = build("qwen3_moe")
    patched = moe_patch.apply(copy.deepcopy(stock))
    ids = inputs()
    ref, out = stock(input_ids=ids, labels=ids, return_dict=False), patched(input_ids=ids, labels=ids, return_dict=False)
    assert isinstance(out, tuple) and len(out) == len(ref)
    assert rel_err(out[0], ref[0]) < 1e-5 and rel_err(out[1], ref[1]) < 1e-5


def test_fused_loss_under_autocast_over_fp32_weights():
    """Mixed precision by autocast (fp32 weights, bf16 matmuls): the fused loss takes its mixed-dtype path
    and matches stock under the same autocast (bf16 tolerance), gradients in the weights' dtype."""
    stock = build("qwen3_moe")
    patched = moe_patch.apply(copy.deepcopy(stock))
    stock.train(), patched.train()
    ids = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ls, lp = stock(input_ids=ids, labels=ids).loss, patched(input_ids=ids, labels=ids).loss
    ls.backward(), lp.backward()
    assert abs(lp.item() - ls.item()) < 2e-2 * abs(ls.item())
    g_s, g_p = stock.lm_head.weight.grad, patched.lm_head.weight.grad
    assert g_p.dtype == torch.float32 and rel_err(g_p, g_s) < 2e-2
    assert rel_err(patched.model.embed_tokens.weight.grad, stock.model.embed_tokens.weight.grad) < 2e-2


# --- issue 17: the fused loss is proven on the model's own head path, and again wherever it can change ----

def _loss_and_grads(model, ids, labels, **kwargs):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(stock, patched, ids, labels, **kwargs):
    """The patched model's loss (< 1e-5 relative) and every gradient (< 1e-4 relative) are stock's."""
    ls, gs = _loss_and_grads(stock, ids, labels, **kwargs)
    lp, gp = _loss_and_grads(patched, ids, labels, **kwargs)
    assert rel_err(lp, ls) < 1e-5, (lp.item(), ls.item())
    assert gp.keys() == gs.keys()
    for name, g in gs.items():
        err = rel_err(gp[name], g) if g.norm() > 0 else gp[name].norm().item()
        assert err < 1e-4, (name, err)
    return ls, gs


def _labels(ids):
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, 5:7] = -100
    return labels


INKLING = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, swa_head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2, vocab_size=256,
               max_position_embeddings=128, layer_types=["hybrid_sliding", "hybrid"],
               mlp_layer_types=["sparse", "sparse"], n_routed_experts=8, num_experts_per_tok=2,
               moe_intermediate_size=32, n_shared_experts=1, sliding_window_size=8)


def _inkling(**overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("inkling_text", **{**INKLING, **overrides}))


LOSS_ONLY = dict(attention=False, rmsnorm=False, linear=False, experts=False, router=False)


def test_a_logit_transform_under_a_name_no_list_knows_is_found_by_the_proof():
    """Inkling divides the hidden states by config.logits_mup_width_multiplier before lm_head: no name list
    holds it, the proof on the class's own forward finds it, and the stock loss stays (reported)."""
    from moe_patch.ops import loss

    stock = _inkling(logits_mup_width_multiplier=24.0)
    assert loss.why_not(stock) is None  # not the fast path: the proof decides
    patched = moe_patch.apply(copy.deepcopy(stock), **LOSS_ONLY)
    (row,) = moe_patch.report(patched).where(kind="loss")
    assert row.status == "skipped" and "differs from the model's own forward" in row.reason
    ids = inputs(batch=2, seq=10)
    _assert_same(stock, patched, ids, _labels(ids))


def test_a_switch_flipped_after_apply_is_proven_again():
    """Proven with a multiplier of 1 (exact), then set to 24 on the config: the next forward proves the new
    config, finds the difference, warns once and runs the model's own loss."""
    stock = _inkling(logits_mup_width_multiplier=1.0)
    patched = moe_patch.apply(copy.deepcopy(stock), **LOSS_ONLY)
    assert moe_patch.report(patched).where(kind="loss")[0].status == "patched"
    ids = inputs(batch=2, seq=10)
    _assert_same(stock, patched, ids, _labels(ids))
    assert patched.forward.stock_reason is None  # the fused path ran
    stock.config.logits_mup_width_multiplier = patched.config.logits_mup_width_multiplier = 24.0
    with pytest.warns(RuntimeWarning, match="differs from the model's own forward"):
        _assert_same(stock, patched, ids, _labels(ids))
    stock.config.logits_mup_width_multiplier = patched.config.logits_mup_width_multiplier = 1.0
    _assert_same(stock, patched, ids, _labels(ids))
    assert patched.forward.stock_reason is None  # proven config again: fused


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss"])
@pytest.mark.parametrize("when", ["before_apply", "after_apply"])
def test_aux_loss_coefficient_set_to_zero_on_the_model_is_honoured(model_type, when):
    """Built with router_aux_loss_coef=0.5 and output_router_logits=True, then model.router_aux_loss_coef =
    0.0 (how recipes turn the aux term off): cross-entropy only, as stock, with the router gradients."""
    stock = build(model_type, router_aux_loss_coef=0.5, output_router_logits=True)
    if when == "before_apply":
        stock.router_aux_loss_coef = 0.0
    patched = moe_patch.apply(copy.deepcopy(stock))
    if when == "after_apply":
        stock.router_aux_loss_coef = patched.router_aux_loss_coef = 0.0
    ids = inputs(batch=2, seq=10)
    ls, gs = _assert_same(stock, patched, ids, _labels(ids))
    assert any("gate" in n or "router" in n for n in gs)  # the routers are in the comparison
    stock.router_aux_loss_coef = patched.router_aux_loss_coef = 0.5  # and back on: the aux term returns
    ls_on, _ = _assert_same(stock, patched, ids, _labels(ids))
    assert ls_on > ls


def test_output_router_logits_switched_on_the_config_after_apply():
    stock = build("qwen3_moe", router_aux_loss_coef=0.3)
    patched = moe_patch.apply(copy.deepcopy(stock))
    ids = inputs(batch=2, seq=10)
    _assert_same(stock, patched, ids, _labels(ids))
    stock.config.output_router_logits = patched.config.output_router_logits = True
    _assert_same(stock, patched, ids, _labels(ids))
    assert patched(input_ids=ids, labels=ids).aux_loss is not None


def _same_adapter_weights(src, dst):
    own = dict(dst.named_parameters())
    with torch.no_grad():
        for name, p in src.named_parameters():
            if p.requires_grad:
                own[name].copy_(p)


def _peft_pair(peft, config):
    """The same adapter (same initial weights) on a stock model and on a patched copy, added after apply()."""
    stock = build("qwen3_moe")
    patched = moe_patch.apply(copy.deepcopy(stock))
    torch.manual_seed(3)
    stock_peft, patched_peft = peft.get_peft_model(stock, config), peft.get_peft_model(patched, config)
    _same_adapter_weights(stock_peft, patched_peft)
    return stock_peft, patched_peft, patched


def test_lora_on_lm_head_added_after_apply():
    """Patch, then PEFT LoRA on q_proj and lm_head: the fused loss is not the model's loss any more (it
    would read lm_head.weight and skip the adapter), so the stock path runs, with one warning; the lm_head
    LoRA weights get stock's (non-zero) gradients."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    stock_lora, patched_lora, _ = _peft_pair(peft, config)
    ids = inputs(batch=2, seq=10)
    with pytest.warns(RuntimeWarning, match="lm_head is now"):
        _, grads = _assert_same(stock_lora, patched_lora, ids, _labels(ids))
    head_lora = [n for n in grads if "lm_head" in n and "lora" in n]
    assert len(head_lora) == 2 and all(grads[n].norm() > 0 for n in head_lora)
    assert any("q_proj" in n and "lora" in n for n in grads)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per reason, not one per step
        _assert_same(stock_lora, patched_lora, ids, _labels(ids))


@pytest.mark.parametrize("how", ["modules_to_save", "trainable_tokens"])
def test_other_adapters_on_the_head(how):
    peft = pytest.importorskip("peft")
    if how == "modules_to_save":
        config = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    else:
        config = peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices={"lm_head": [3, 7, 11]},
                                 init_lora_weights=False)
    stock_peft, patched_peft, _ = _peft_pair(peft, config)
    ids = inputs(batch=2, seq=10)
    with pytest.warns(RuntimeWarning, match="lm_head"):
        _assert_same(stock_peft, patched_peft, ids, _labels(ids))


def test_lora_on_attention_only_keeps_the_fused_loss():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    stock_lora, patched_lora, patched = _peft_pair(peft, config)
    ids = inputs(batch=2, seq=10)
    _assert_same(stock_lora, patched_lora, ids, _labels(ids))
    assert patched.forward.stock_reason is None
    assert patched_lora(input_ids=ids, labels=ids).logits is None  # fused: no logits built


def test_a_hook_on_lm_head_sends_the_loss_back_to_stock():
    stock = build("olmoe")
    patched = moe_patch.apply(copy.deepcopy(stock))
    for m in (stock, patched):
        m.lm_head.register_forward_hook(lambda mod, inp, out: out * 0.5)
    ids = inputs(batch=2, seq=10)
    with pytest.warns(RuntimeWarning, match="forward hooks"):
        _assert_same(stock, patched, ids, _labels(ids), num_items_in_batch=torch.tensor(13))


def test_the_proof_runs_on_a_multimodal_model_with_a_nested_text_config():
    """Qwen3-VL-MoE: vocab_size lives in config.text_config; the proof shrinks it there, passes, and the fused
    loss then equals stock on text input (loss and every gradient)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    text = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, vocab_size=256, max_position_embeddings=128, moe_intermediate_size=32, num_experts=8,
                num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0])
    cfg = AutoConfig.for_model("qwen3_vl_moe", text_config=text, vision_config=vision, image_token_id=250,
                               video_token_id=251, vision_start_token_id=252, vision_end_token_id=253)
    torch.manual_seed(0)
    stock = AutoModelForImageTextToText.from_config(cfg)
    patched = moe_patch.apply(copy.deepcopy(stock), attention=False)
    assert moe_patch.report(patched).where(kind="loss")[0].status == "patched"
    ids = inputs(vocab=240, batch=2, seq=10)
    _assert_same(stock, patched, ids, _labels(ids))
    assert patched.forward.stock_reason is None


def test_a_backward_hook_on_lm_head_still_fires():
    stock = build("qwen3_moe")
    patched = moe_patch.apply(copy.deepcopy(stock))
    seen = {"stock": 0, "patched": 0}
    for key, m in (("stock", stock), ("patched", patched)):
        m.lm_head.register_full_backward_hook(lambda mod, gi, go, key=key: seen.__setitem__(key, seen[key] + 1))
    ids = inputs(batch=2, seq=10)
    with pytest.warns(RuntimeWarning, match="backward hooks"):
        _assert_same(stock, patched, ids, _labels(ids))
    assert seen["patched"] == seen["stock"] == 1


def test_lm_head_feeding_the_fused_loss_is_kept_nn_linear():
    """The fused loss runs only while lm_head is the plain nn.Linear it proved: the plan never swaps that
    module for another kind (TE's Linear under fp8= would switch the loss off at run time while the report
    said patched). With the loss off, lm_head is an ordinary linear row again."""
    import moe_patch
    from util import build

    rows = moe_patch.plan_report(build("qwen3_moe"))
    (head,) = [r for r in rows if r.path == "lm_head"]
    assert head.kind == "linear" and head.status == "skipped" and "fused loss" in head.reason
    (head,) = [r for r in moe_patch.plan_report(build("qwen3_moe"), loss=False) if r.path == "lm_head"]
    assert "fused loss" not in head.reason


def _hessian_vector_product(model, ids):
    """d/dparams <d loss/d params, v> with v = 0.01 everywhere (backward with create_graph=True, then again)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, params, create_graph=True, allow_unused=True)
    dot = sum((g * 0.01).sum() for g in grads if g is not None)
    return torch.autograd.grad(dot, params, allow_unused=True)


def test_second_derivative_is_an_error_not_a_wrong_number():
    """The fused loss computes its gradients in the forward: they are constants to autograd, so a backward with
    create_graph=True (Hessian-vector products, gradient penalties, AdaHessian) differentiated them as zero.
    Before, the Hessian-vector product came out wrong silently (rel. error 1e-2 to 7e-2 on every parameter, None
    for lm_head); now it is a one-line error naming apply(loss=False), with which it equals stock's."""
    stock = build("qwen3_moe")
    stock.set_attn_implementation("eager")  # CPU SDPA has no double backward, in stock either
    patched = moe_patch.apply(copy.deepcopy(stock))
    ids = inputs(seq=8)
    with pytest.raises(RuntimeError, match="loss=False"):
        _hessian_vector_product(patched, ids)
    patched = moe_patch.apply(copy.deepcopy(stock), loss=False)
    ref = _hessian_vector_product(stock, ids)
    out = _hessian_vector_product(patched, ids)
    for (name, _), a, b in zip(stock.named_parameters(), out, ref):
        assert (a is None) == (b is None), name
        assert a is None or rel_err(a, b) < 1e-4, name


def test_logits_to_keep_with_labels_is_stock_behaviour():
    """Stock computes its loss from the logits it keeps: with labels, logits_to_keep=3 fails on the length mismatch
    (a causal LM). The fused path, which scores every position, would instead return a loss the unpatched model
    never gives: such a call runs the stock forward (one warning naming it). logits_to_keep=0 (every position) is
    the fused loss, equal to stock's."""
    stock = build("qwen3_moe")
    patched = moe_patch.apply(copy.deepcopy(stock))
    ids = inputs()
    with pytest.raises(ValueError) as expected:
        stock(input_ids=ids, labels=ids, logits_to_keep=3)
    with pytest.warns(RuntimeWarning, match="logits_to_keep=3 given with labels"), \
            pytest.raises(ValueError) as got:
        patched(input_ids=ids, labels=ids, logits_to_keep=3)
    assert str(got.value) == str(expected.value)
    out = patched(input_ids=ids, labels=ids, logits_to_keep=0)
    assert out.logits is None  # the fused path
    assert rel_err(out.loss, stock(input_ids=ids, labels=ids, logits_to_keep=0).loss) < 1e-5
