"""The fused linear-cross-entropy loss: exact against stock, and the documented effect on outputs."""
import copy

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
        assert rel_err(lp.loss, ls.loss) < 1e-5
        ls.loss.backward()
        lp.loss.backward()
    g = dict(stock.named_parameters())
    for n, p in patched.named_parameters():
        assert rel_err(p.grad, g[n].grad) < 1e-4, n


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
