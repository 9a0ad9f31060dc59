"""Attention with learned sinks (ops/sink_attention.py) against the family's own eager attention, CPU fp32.

flex_attention has a CPU forward but no CPU backward: the forward is checked with torch's flex_attention itself;
the gradients (q, k, v and the sinks, through the log-sum-exp) with a dense stand-in for flex_attention that returns
the same (output, lse), which checks the sink rescale and its gradient. The kernel's own gradients are proven on
the GPU at apply() and in tests/test_gpu.py."""
import copy
from types import SimpleNamespace

import pytest
import torch

import moe_patch
from moe_patch.ops import sink_attention
from util import build, rel_err


def _module_and_masks(seq=37):
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    model = build("gpt_oss")  # layer 0 sliding (window 8), layer 1 full attention, eager
    emb = torch.zeros(2, seq, model.config.hidden_size)
    pos = torch.arange(seq)[None].expand(2, seq)
    kw = dict(config=model.config, inputs_embeds=emb, attention_mask=None, cache=None, position_ids=pos)
    masks = {"sliding_attention": create_sliding_window_causal_mask(**kw), "full_attention": create_causal_mask(**kw)}
    return model, masks


def _inputs(module, seq, generator):
    heads, kv = module.config.num_attention_heads, module.config.num_key_value_heads
    d = module.head_dim
    q = torch.randn(2, heads, seq, d, generator=generator) * 3
    k, v = torch.randn(2, kv, seq, d, generator=generator), torch.randn(2, kv, seq, d, generator=generator)
    with torch.no_grad():
        module.sinks.copy_(torch.randn(heads, generator=generator) * 2)
    return q, k, v


def _eager(module):
    from transformers.models.gpt_oss import modeling_gpt_oss

    return sink_attention.family_eager(module)[1] or modeling_gpt_oss.eager_attention_forward


@pytest.mark.parametrize("layer", [0, 1])
def test_forward_equals_eager_fp32_cpu(layer):
    model, masks = _module_and_masks()
    module = model.model.layers[layer].self_attn
    mask = masks[module.layer_type]
    assert sink_attention.mask_window(mask, 37, 37, module.sliding_window)[0] == "causal"
    g = torch.Generator().manual_seed(layer)
    for _ in range(2):  # fresh inputs each time
        q, k, v = _inputs(module, 37, g)
        kw = dict(scaling=module.scaling, dropout=0.0, sliding_window=module.sliding_window, s_aux=module.sinks)
        with torch.no_grad():
            ref, _ = _eager(module)(module, q, k, v, mask, **kw)
            out, weights = sink_attention.sink_attention_forward(module, q, k, v, mask, compiled=False, **kw)
        assert weights is None and out.shape == ref.shape
        assert rel_err(out, ref) < 1e-5


def _dense_flex(mask):
    """(output, aux.lse) of plain softmax attention under an additive mask: flex_attention's contract."""
    def flex(q, k, v, block_mask=None, scale=None, enable_gqa=False, return_aux=None):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = q @ k.transpose(-1, -2) * scale + mask
        lse = torch.logsumexp(scores, -1)
        return torch.softmax(scores, -1) @ v, SimpleNamespace(lse=lse)
    return flex


@pytest.mark.parametrize("layer", [0, 1])
def test_sink_rescale_gradients_equal_eager_fp32_cpu(layer):
    model, masks = _module_and_masks()
    module = model.model.layers[layer].self_attn
    mask = masks[module.layer_type]
    g = torch.Generator().manual_seed(10 + layer)
    q, k, v = _inputs(module, 37, g)
    w = torch.randn(2, 37, module.config.num_attention_heads, module.head_dim, generator=g)
    kw = dict(scaling=module.scaling, dropout=0.0, sliding_window=module.sliding_window, s_aux=module.sinks)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, _ = _eager(module)(module, *leaves, mask, **kw)
    ref_grads = torch.autograd.grad((ref * w).sum(), leaves + [module.sinks])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = sink_attention.attend(*leaves, module.sinks, None, module.scaling, flex=_dense_flex(mask))
    grads = torch.autograd.grad((out * w).sum(), leaves + [module.sinks])
    assert rel_err(out, ref) < 1e-5
    for name, a, b in zip(("q", "k", "v", "sinks"), grads, ref_grads):
        assert rel_err(a, b) < 1e-4, name


def test_mask_check_refuses_padding_and_other_windows():
    from transformers.masking_utils import create_causal_mask

    model, masks = _module_and_masks()
    sliding, full = masks["sliding_attention"], masks["full_attention"]
    assert sink_attention.mask_window(full, 37, 37, None) == ("causal", None)
    assert sink_attention.mask_window(sliding, 37, 37, 8) == ("causal", 8)
    assert sink_attention.mask_window(sliding, 37, 37, None)[0] is None  # a window the kwarg does not name
    assert sink_attention.mask_window(full, 37, 37, 8)[0] is None
    pad = torch.ones(2, 37, dtype=torch.long)
    pad[0, :5] = 0  # left padding
    padded = create_causal_mask(config=model.config, inputs_embeds=torch.zeros(2, 37, model.config.hidden_size),
                                attention_mask=pad, cache=None, position_ids=torch.arange(37)[None])
    assert sink_attention.mask_window(padded, 37, 37, None)[0] is None
    assert sink_attention.mask_window(None, 37, 37, None) == ("none", None)
    assert sink_attention.mask_window(full[:, :, :30], 30, 37, None)[0] is None


def test_dispatcher_routes_marked_modules_only_and_is_removed():
    from transformers.models.gpt_oss import modeling_gpt_oss

    original = modeling_gpt_oss.eager_attention_forward
    model, masks = _module_and_masks()
    marked, unmarked = model.model.layers[1].self_attn, copy.deepcopy(model.model.layers[1].self_attn)
    handles = sink_attention.install(marked)
    try:
        assert modeling_gpt_oss.eager_attention_forward is not original
        q, k, v = _inputs(marked, 37, torch.Generator().manual_seed(3))
        unmarked.sinks.data = marked.sinks.data.clone()
        kw = dict(scaling=marked.scaling, dropout=0.0, sliding_window=None, s_aux=marked.sinks)
        with torch.no_grad():
            _, probs = modeling_gpt_oss.eager_attention_forward(unmarked, q, k, v, masks["full_attention"], **kw)
            assert probs is not None  # the original eager function ran: it returns the probabilities
            before = dict(sink_attention.FALLBACKS)
            _, none = modeling_gpt_oss.eager_attention_forward(marked, q, k, v, masks["full_attention"], **kw)
            assert none is None and sink_attention.FALLBACKS == before  # the fused path ran
            # a padded mask is not what the proof covered: the original function runs, and the reason is kept
            bad = masks["full_attention"].clone()
            bad[0, :, :, 0] = torch.finfo(bad.dtype).min
            _, probs = modeling_gpt_oss.eager_attention_forward(marked, q, k, v, bad, **kw)
            assert probs is not None and any("padding" in r for r in sink_attention.FALLBACKS)
    finally:
        for h in handles:
            h.remove()
    assert modeling_gpt_oss.eager_attention_forward is original
    assert not hasattr(marked, sink_attention._MARK)


def test_masks_built_by_the_family_are_checked_when_built_and_builders_restored(monkeypatch):
    """install() wraps the family module's mask builders: each mask's check is launched when it is built (on a GPU
    read later behind an event, without a stream sync), each verdict is the one its own mask gets alone, and a
    verdict is never used for a mask changed in place since, or for another window."""
    from transformers.models.gpt_oss import modeling_gpt_oss

    model, _ = _module_and_masks()
    originals = modeling_gpt_oss.create_causal_mask, modeling_gpt_oss.create_sliding_window_causal_mask
    handles = sink_attention.install(model.model.layers[1].self_attn)
    checks = []
    real = sink_attention._expected_mask
    monkeypatch.setattr(sink_attention, "_expected_mask", lambda *a: checks.append(a) or real(*a))
    try:
        assert modeling_gpt_oss.create_causal_mask.__wrapped__ is originals[0]
        emb = torch.zeros(2, 37, model.config.hidden_size)
        pad = torch.ones(2, 37, dtype=torch.long)
        for attention_mask, expect in ((None, "causal"), (pad.index_fill(1, torch.tensor([0]), 0), None)):
            kw = dict(config=model.config, inputs_embeds=emb, attention_mask=attention_mask, cache=None,
                      position_ids=torch.arange(37)[None])
            checks.clear()
            full = modeling_gpt_oss.create_causal_mask(**kw)
            sliding = modeling_gpt_oss.create_sliding_window_causal_mask(**kw)
            assert len(checks) == 2  # both checks launched at build time, for the window each was built for
            assert sink_attention.mask_window(sliding, 37, 37, 8)[0] == expect
            assert sink_attention.mask_window(full, 37, 37, None)[0] == expect
            assert len(checks) == 2  # read, not computed again
            assert sink_attention.mask_window(full, 37, 37, 8)[0] is None  # another window: checked again
            assert len(checks) == 3
        # a plain mask changed in place after it was built: its launched verdict is stale and not used
        full = modeling_gpt_oss.create_causal_mask(**{**kw, "attention_mask": None})
        full[1, :, :, :3] = torch.finfo(full.dtype).min
        assert sink_attention.mask_window(full, 37, 37, None)[0] is None
        # ... or given other storage through .data (no version bump): also checked again
        full = modeling_gpt_oss.create_causal_mask(**{**kw, "attention_mask": None})
        padded = full.clone()
        padded[1, :, :, :3] = torch.finfo(full.dtype).min
        full.data = padded
        assert sink_attention.mask_window(full, 37, 37, None)[0] is None
    finally:
        for h in handles:
            h.remove()
    assert (modeling_gpt_oss.create_causal_mask, modeling_gpt_oss.create_sliding_window_causal_mask) == originals


def test_functions_set_while_installed_stay_after_the_last_removal(monkeypatch):
    """A family function the user (or another library) sets while moe_patch routes it (eager_attention_forward, the
    mask builders) is what the model calls, and the last handle's removal leaves it there: only what install() set
    is put back (it overwrote the user's function with the one from before)."""
    from transformers.models.gpt_oss import modeling_gpt_oss

    model, _ = _module_and_masks()
    for name in ("eager_attention_forward", "create_causal_mask"):  # undone last: the family's own functions back
        monkeypatch.setattr(modeling_gpt_oss, name, getattr(modeling_gpt_oss, name))
    handles = sink_attention.install(model.model.layers[1].self_attn)
    try:
        def users_eager(*args, **kwargs):
            return sink_attention._ORIGINAL["transformers.models.gpt_oss.modeling_gpt_oss"](*args, **kwargs)

        def users_mask(*args, **kwargs):
            return None

        monkeypatch.setattr(modeling_gpt_oss, "eager_attention_forward", users_eager)
        monkeypatch.setattr(modeling_gpt_oss, "create_causal_mask", users_mask)
        sliding = modeling_gpt_oss.create_sliding_window_causal_mask  # still moe_patch's wrapper
        assert sliding.__wrapped__ is not None
    finally:
        for h in handles:
            h.remove()
    assert modeling_gpt_oss.eager_attention_forward is users_eager
    assert modeling_gpt_oss.create_causal_mask is users_mask
    assert modeling_gpt_oss.create_sliding_window_causal_mask is sliding.__wrapped__  # not replaced: put back


def test_plan_on_cpu_keeps_eager_with_reason_and_names_nothing_new():
    model = build("gpt_oss")
    patched = moe_patch.apply(model)
    rows = moe_patch.report(patched).where(kind="attention")
    assert len(rows) == 2 and all(r.status == "skipped" and "no backward on CPU" in r.reason for r in rows)
    assert model.config._attn_implementation == "eager"


def test_kernel_failure_runs_eager_once_tried(monkeypatch):
    from transformers.models.gpt_oss import modeling_gpt_oss

    model, masks = _module_and_masks()
    module = model.model.layers[1].self_attn
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setattr(sink_attention, "attend", broken)
    handles = sink_attention.install(module)
    try:
        q, k, v = _inputs(module, 37, torch.Generator().manual_seed(4))
        kw = dict(scaling=module.scaling, dropout=0.0, sliding_window=None, s_aux=module.sinks)
        with pytest.warns(UserWarning, match="no kernel for this shape"), torch.no_grad():
            _, probs = modeling_gpt_oss.eager_attention_forward(module, q, k, v, masks["full_attention"], **kw)
        assert probs is not None and len(calls) == 1  # eager ran
        with torch.no_grad():
            _, probs = modeling_gpt_oss.eager_attention_forward(module, q, k, v, masks["full_attention"], **kw)
        assert probs is not None and len(calls) == 1  # not tried again for the same call shape
    finally:
        for h in handles:
            h.remove()
        sink_attention._BROKEN.clear()


def test_forward_under_inference_mode_equals_stock():
    """Masks built under torch.inference_mode() are inference tensors, which have no version counter (`_version`
    raises): their verdicts are checked at each use, never launched at build time nor cached. Before, the mask
    builder raised RuntimeError in the model's forward (pipelines run under inference_mode); and a verdict cached
    for such a mask could not see it changed in place."""
    from transformers.models.gpt_oss import modeling_gpt_oss

    stock = build("gpt_oss")
    patched = copy.deepcopy(stock)
    handles = [h for layer in patched.model.layers for h in sink_attention.install(layer.self_attn)]
    sink_attention.FALLBACKS.clear()
    try:
        ids = torch.randint(0, stock.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(7))
        pad = torch.ones(2, 37, dtype=torch.long)
        pad[0, :5] = 0
        with torch.inference_mode():
            for attention_mask, fused in ((None, True), (pad, False)):
                sink_attention.FALLBACKS.clear()
                assert rel_err(patched(input_ids=ids, attention_mask=attention_mask).logits,
                               stock(input_ids=ids, attention_mask=attention_mask).logits) < 1e-5
                assert (not sink_attention.FALLBACKS) == fused
            # a plain mask used once, then padded in place (no version counter to see it): checked again
            kw = dict(config=stock.config, inputs_embeds=torch.zeros(2, 37, stock.config.hidden_size),
                      attention_mask=None, cache=None, position_ids=torch.arange(37)[None])
            masks = {"full_attention": modeling_gpt_oss.create_causal_mask(**kw),
                     "sliding_attention": modeling_gpt_oss.create_sliding_window_causal_mask(**kw)}
            assert rel_err(patched(input_ids=ids, attention_mask=masks).logits,
                           stock(input_ids=ids, attention_mask=masks).logits) < 1e-5
            for mask in masks.values():
                mask[0, :, :, :5] = torch.finfo(mask.dtype).min
            sink_attention.FALLBACKS.clear()
            assert rel_err(patched(input_ids=ids, attention_mask=masks).logits,
                           stock(input_ids=ids, attention_mask=masks).logits) < 1e-5
            assert any("not the plain causal" in why for why in sink_attention.FALLBACKS)
    finally:
        for h in handles:
            h.remove()


def test_statistics_folded_sink_attention_equals_eager_fp32_cpu():
    """The full layers' kernel (cudnn_attend: the sink folded into the row statistics the fused backward is given)
    against the family's eager attention: forward and the q / k / v / sinks gradients. On CPU it runs torch's flash
    kernel for CPU in cuDNN's place (same contract: output + log-sum-exp forward, the backward recomputing from
    them), so this checks the algebra; the GPU proof and tests/test_gpu.py check cuDNN itself. No GQA on CPU."""
    model, masks = _module_and_masks()
    module = model.model.layers[1].self_attn  # full attention
    assert module.sliding_window is None
    heads, d = module.config.num_attention_heads, module.head_dim
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 37, heads, d, generator=g).transpose(1, 2) * 3  # the family's [B, S, H, D] storage
    k, v = (torch.randn(2, 37, heads, d, generator=g).transpose(1, 2) for _ in range(2))
    with torch.no_grad():
        module.sinks.copy_(torch.randn(heads, generator=g) * 2)
    w = torch.randn(2, 37, heads, d, generator=g)
    module.num_key_value_groups = 1  # k / v with every head (eager reads this to repeat them)
    kw = dict(scaling=module.scaling, dropout=0.0, sliding_window=None, s_aux=module.sinks)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, _ = _eager(module)(module, *leaves, masks["full_attention"], **kw)
    ref_grads = torch.autograd.grad((ref * w).sum(), leaves + [module.sinks])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = sink_attention.cudnn_attend(*leaves, module.sinks, module.scaling)
    grads = torch.autograd.grad((out * w).sum(), leaves + [module.sinks])
    assert out.shape == ref.shape and out.is_contiguous()
    assert rel_err(out, ref) < 1e-5
    for name, a, b in zip(("q", "k", "v", "sinks"), grads, ref_grads):
        assert rel_err(a, b) < 1e-4, name


def test_cudnn_kernel_opt_in_and_only_for_square_full_layers_in_half_precision(monkeypatch):
    q = torch.zeros(1, 4, 16, 64, dtype=torch.bfloat16)
    kv = torch.zeros(1, 2, 16, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))  # the conditions alone, on CPU tensors
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    assert sink_attention._cudnn_applies(q, kv, kv, "causal", None)
    assert not sink_attention._cudnn_applies(q, kv, kv, "causal", 128)  # sliding window: flex
    assert not sink_attention._cudnn_applies(q.float(), kv.float(), kv.float(), "causal", None)  # float32: flex
    assert not sink_attention._cudnn_applies(q, kv[:, :, :8], kv[:, :, :8], "causal", None)  # q / k lengths apart
    monkeypatch.setattr(sink_attention, "_CUDNN_FAILED", {(q.dtype, tuple(q.shape))})
    assert not sink_attention._cudnn_applies(q, kv, kv, "causal", None)  # raised once for this shape: flex


def test_cudnn_choice_is_made_at_plan_time_and_kept_on_the_module(monkeypatch):
    """The switch is read when the module is planned: the mark install() leaves names the kernel prove() ran, and
    only that mark (not the environment at call time) lets a call take cuDNN's kernel."""
    model = build("gpt_oss", dtype=torch.bfloat16)
    full = model.model.layers[1].self_attn
    monkeypatch.setattr(sink_attention, "kernel_name", lambda module, device: sink_attention.CUDNN_NAME)
    handles = sink_attention.install(full)
    try:
        assert getattr(full, sink_attention._MARK) == sink_attention.CUDNN_NAME
    finally:
        for h in handles:
            h.remove()
    monkeypatch.setattr(sink_attention, "kernel_name", lambda module, device: sink_attention.NAME)
    handles = sink_attention.install(full)
    calls = []
    monkeypatch.setattr(sink_attention, "_cudnn_applies", lambda *a: calls.append(a) or False)
    try:
        assert getattr(full, sink_attention._MARK) == sink_attention.NAME
        monkeypatch.setenv("MOE_PATCH_CUDNN_SINKS", "1")  # set after planning: no effect on this module
        q = torch.randn(1, 4, 8, full.head_dim)
        kv = torch.randn(1, full.config.num_key_value_heads, 8, full.head_dim)
        full.float()
        with torch.no_grad():  # compiled="run" on CPU runs flex_attention eagerly
            sink_attention.sink_attention_forward(full, q, kv, kv, None, sliding_window=None)
            assert not calls  # not even asked: the module was planned for flex_attention
            sink_attention.sink_attention_forward(full, q, kv, kv, None, cudnn=True, sliding_window=None)
            assert len(calls) == 1  # asked when the choice allows it (here: declined, flex ran)
    finally:
        for h in handles:
            h.remove()


def test_report_names_the_kernel_each_layer_takes(monkeypatch):
    model = build("gpt_oss", dtype=torch.bfloat16)
    sliding, full = (model.model.layers[i].self_attn for i in (0, 1))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("MOE_PATCH_CUDNN_SINKS", raising=False)
    assert sink_attention.kernel_name(full, cuda) == sink_attention.NAME  # opt-in
    monkeypatch.setenv("MOE_PATCH_CUDNN_SINKS", "1")
    assert sink_attention.kernel_name(full, cuda) == sink_attention.CUDNN_NAME
    assert sink_attention.kernel_name(sliding, cuda) == sink_attention.NAME
    assert sink_attention.kernel_name(full, cpu) == sink_attention.NAME
    monkeypatch.setenv("MOE_PATCH_CUDNN_SINKS", "off")
    assert sink_attention.kernel_name(full, cuda) == sink_attention.NAME


def test_copies_of_a_patched_model_keep_the_mark_and_revert_on_their_own(monkeypatch):
    """copy.deepcopy / pickling a model whose sink attention is installed: the copy's modules carry the same mark
    (the kernel planned), and each model's revert() takes off its own marks only; the family's eager function
    comes back once, when the last model routed through it is reverted, in either order, without an error
    (before: reverting the copy put the original's function back under the patched original, and reverting the
    original then raised KeyError)."""
    import pickle

    monkeypatch.setattr(sink_attention, "prove", lambda module, device: None)  # on CPU: the routing alone
    model = build("gpt_oss", dtype=torch.bfloat16)
    family = __import__(type(model.model.layers[0].self_attn).__module__, fromlist=["_"])
    eager = family.eager_attention_forward

    def marks(m):
        return [getattr(a, sink_attention._MARK, None) for a in m.modules() if sink_attention.has_sinks(a)]

    moe_patch.apply(model)
    assert marks(model) == [sink_attention.NAME] * 2 and family.eager_attention_forward is not eager
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert marks(clone) == marks(model)
        moe_patch.revert(clone)
        assert marks(clone) == [None, None]
        assert marks(model) == [sink_attention.NAME] * 2 and family.eager_attention_forward is not eager
    for first in ("original", "copy"):
        clone = copy.deepcopy(model)
        pair = (model, clone) if first == "original" else (clone, model)
        moe_patch.revert(pair[0])
        assert marks(pair[1]) == [sink_attention.NAME] * 2
        assert family.eager_attention_forward is not eager  # the other model still routed
        moe_patch.revert(pair[1])
        assert family.eager_attention_forward is eager
        if first == "original":
            moe_patch.apply(model)  # patched again for the other order
