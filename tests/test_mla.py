"""DeepSeek-V3's MLA attention on the fused q / k / v forward (moe_patch/ops/mla.py), against the family's own
forward in float32 on CPU (where the assembly runs eagerly: the same function the GPU compiles)."""
import copy
import inspect
import pickle

import pytest
import torch

import moe_patch
from moe_patch.ops import mla
from moe_patch.shapes import named_config
from util import assert_runs_match, build, rel_err


@pytest.fixture(autouse=True)
def opted_in(monkeypatch):
    """The fused MLA forward is on by default; these tests say so explicitly (a user's environment may not)."""
    monkeypatch.setenv(mla.SWITCH, "1")


def _assert_fused_equals_family(module, x, cos_sin, mask, tol: float, grad_tol: float):
    """The fused forward against the class's: output within tol, the hidden states' and every parameter's gradient
    within grad_tol (relative error)."""
    ref, ref_gx, ref_gp = _forward_and_grads(module, x, cos_sin, mask, fused=False)
    out, gx, gp = _forward_and_grads(module, x, cos_sin, mask, fused=True)
    assert rel_err(out, ref) < tol
    assert rel_err(gx, ref_gx) < grad_tol
    for name, g in ref_gp.items():
        assert rel_err(gp[name], g) < grad_tol, name


def _attention_pair(config):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    module = DeepseekV3Attention(config, layer_idx=0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape) * p.shape[-1] ** -0.5 if p.dim() > 1 else 1 + 0.1 * torch.randn(p.shape))
    return module, DeepseekV3RotaryEmbedding(config)


def _forward_and_grads(module, x, cos_sin, mask, fused):
    x = x.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    call = mla.fused_forward if fused else type(module).forward
    out = call(module, hidden_states=x, position_embeddings=cos_sin, attention_mask=mask)[0]
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    (out * w).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("q_lora_rank", [1536, None])
@pytest.mark.parametrize("padded", [False, True])
def test_fused_forward_matches_the_family_at_deepseek_v3_widths(interleave, q_lora_rank, padded):
    """One attention layer at the deepseek-v3-style widths (hidden 2048, 16 heads, q/k 128 + 64 rotary, v 128,
    kv rank 512), both RoPE layouts, with and without q's low-rank projection, causal and with a padding mask:
    output, hidden-state and every parameter gradient (fp32: < 1e-5 / < 1e-4)."""
    from transformers import masking_utils

    config = named_config("deepseek-v3-style", layers=1, rope_interleave=interleave, q_lora_rank=q_lora_rank)
    module, rotary = _attention_pair(config)
    x = torch.randn(2, 24, config.hidden_size, generator=torch.Generator().manual_seed(2))
    positions = torch.arange(24)[None].expand(2, -1)
    cos_sin = rotary(x, positions)
    mask = None
    if padded:
        pad = torch.ones(2, 24, dtype=torch.long)
        pad[0, :5] = 0
        mask = masking_utils.create_causal_mask(config=config, inputs_embeds=x, attention_mask=pad, cache=None,
                                                position_ids=positions, allow_is_causal_skip=False)
    _assert_fused_equals_family(module, x, cos_sin, mask, 1e-5, 1e-4)


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("layout", ["batch, seq, heads, dim", "batch, heads, seq, dim"])
def test_backward_is_the_forwards_gradient_in_either_gradient_layout(interleave, layout):
    """_backward (q's, kv's and k_rot's gradients, three functions) against autograd through _forward and the
    family's RoPE function, fp32, random cos / sin (the adjoint is exact for any), with the output gradients in
    the storage `assemble` returns ([batch, seq, heads, dim]: flattened as views) and in SDPA's usual one
    ([batch, heads, seq, dim]: flattened by a copy)."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as family

    b, s, heads, nope, rope, v = 2, 7, 3, 6, 4, 5
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, s, heads * (nope + rope), generator=g, requires_grad=True)
    kv = torch.randn(b, s, heads * (nope + v), generator=g, requires_grad=True)
    k_rot = torch.randn(b, s, rope, generator=g, requires_grad=True)
    cos, sin = torch.randn(1, s, rope, generator=g), torch.randn(1, s, rope, generator=g)
    fn = family.apply_rotary_pos_emb_interleave if interleave else family.apply_rotary_pos_emb
    outs = mla._forward(q, kv, k_rot, cos, sin, fn, nope)
    grads = [torch.randn(o.shape, generator=g) for o in outs]  # [batch, seq, heads, dim]
    if layout == "batch, heads, seq, dim":
        grads = [d.transpose(1, 2).contiguous().transpose(1, 2) for d in grads]
    ref = torch.autograd.grad(outs, (q, kv, k_rot), grads)
    got = mla._backward(*grads, cos, sin, nope, interleave)
    for name, a, r in zip(("q", "kv", "k_rot"), got, ref):
        assert a.shape == r.shape and rel_err(a, r) < 1e-5, name


def test_apply_fuses_mla_and_the_model_equals_stock():
    """apply() proves and installs the fused forward on every DeepSeek-V3 attention module; the whole model's
    logits, loss and every gradient equal stock's (fp32); revert() removes it; a patched model deep-copies and
    pickles with the forward pointing at its own module."""
    stock = build("deepseek_v3")
    patched = moe_patch.apply(copy.deepcopy(stock))
    rows = moe_patch.report(patched).where(kind="attention")
    assert rows and all(mla.NAME in r.replacement and r.status == "patched" for r in rows), rows
    attn = [m for m in patched.modules() if type(m).__name__ == "DeepseekV3Attention"]
    assert attn and all(mla.is_installed(m) for m in attn)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    mla.FALLBACKS.clear()
    assert_runs_match(stock, patched, ids)
    # the training forward (fused loss: no cache) took the fused path; the logits forward (a cache) did not
    assert set(mla.FALLBACKS) == {mla._GENERATION}
    for clone in (copy.deepcopy(patched), pickle.loads(pickle.dumps(patched))):
        for m in clone.modules():
            if type(m).__name__ == "DeepseekV3Attention":
                assert mla.is_installed(m) and vars(m)["forward"].module is m
    assert inspect.signature(attn[0].forward) == inspect.signature(type(attn[0]).forward.__get__(attn[0]))
    moe_patch.revert(patched)
    assert not any(mla.is_installed(m) for m in attn)
    assert all("forward" not in vars(m) for m in attn)


def test_generation_with_a_cache_runs_the_familys_forward():
    stock = build("deepseek_v3").eval()
    patched = moe_patch.apply(copy.deepcopy(stock)).eval()
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    mla.FALLBACKS.clear()
    kwargs = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(patched.generate(ids, **kwargs), stock.generate(ids, **kwargs))
    assert mla.FALLBACKS.get(mla._GENERATION, 0) > 0


def test_a_cache_in_training_is_warned_once_and_generation_is_not(recwarn):
    """A training forward that gets a KV cache (no labels, or packed position_ids without a mask: Transformers builds
    one unless use_cache=False) runs the class's forward, equal to stock, and says so once; generation's cached
    calls stay quiet. Both are counted by reason."""
    stock = build("deepseek_v3")
    patched = moe_patch.apply(copy.deepcopy(stock))
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(6), torch.arange(4)]).expand(2, -1)
    mla.FALLBACKS.clear()
    for m in (stock, patched):
        m.train()
    with pytest.warns(UserWarning, match="KV cache in a training forward"):
        loss_p = patched(input_ids=ids, labels=ids, position_ids=pos).loss
    loss_s = stock(input_ids=ids, labels=ids, position_ids=pos).loss
    assert rel_err(loss_p, loss_s) < 1e-5
    recwarn.clear()
    patched(input_ids=ids, labels=ids, position_ids=pos)  # once per reason
    assert not [w for w in recwarn if "KV cache" in str(w.message)]
    assert mla.FALLBACKS.get(mla._TRAINING_CACHE, 0) > 0
    with torch.no_grad():
        patched.eval().generate(ids[:1, :4], max_new_tokens=2, do_sample=False)
    assert mla.FALLBACKS.get(mla._GENERATION, 0) > 0
    assert not [w for w in recwarn if "generation" in str(w.message)]


def test_on_by_default_and_off_by_its_variable(monkeypatch):
    monkeypatch.delenv(mla.SWITCH)
    patched = moe_patch.apply(build("deepseek_v3"))
    rows = list(moe_patch.report(patched).where(kind="attention"))
    assert rows and all(r.status == "patched" and mla.NAME in r.replacement for r in rows)
    assert any(mla.is_installed(m) for m in patched.modules())
    monkeypatch.setenv(mla.SWITCH, "0")
    patched = moe_patch.apply(build("deepseek_v3"))
    rows = list(moe_patch.report(patched).where(kind="attention"))
    assert rows and all(r.status == "patched" and r.replacement.endswith(f"({mla.NAME} off: {mla.SWITCH}=0)")
                        for r in rows)
    assert not any(mla.is_installed(m) for m in patched.modules())


def test_row_does_not_carry_the_rope_backends_reason(monkeypatch):
    """The attention backend picks the RoPE kernel only; the fused MLA applies the family's RoPE itself. So on a GPU
    without Liger the DeepSeek row is patched with no fallback reason (it read "fallback: liger_kernel is not
    installed" while the fused MLA ran), and a family that does use that kernel (Qwen3) still says why not."""
    from moe_patch import backends

    choose = backends.choose
    liger_why = backends.unavailable("liger", torch.device("cuda"), backends.Capabilities(
        cuda=True, device_name="", compute_capability=(9, 0), torch_version="", transformers_version="",
        grouped_mm=True, te=False, liger=False, deep_ep=False))  # what "auto" says on a GPU without Liger
    monkeypatch.setattr(backends, "choose", lambda names, kind, device, caps=None: (
        ("torch", liger_why) if kind == "attention" else choose(names, kind, device, caps)))
    rows = list(moe_patch.report(moe_patch.apply(build("deepseek_v3"))).where(kind="attention"))
    assert rows and all(r.status == "patched" and mla.NAME in r.replacement and not r.reason for r in rows)
    monkeypatch.setenv(mla.SWITCH, "0")
    rows = list(moe_patch.report(moe_patch.apply(build("deepseek_v3"))).where(kind="attention"))
    assert rows and all(r.status == "fallback" and "liger_kernel is not installed" in r.reason for r in rows)


def test_row_keeps_a_named_backends_fallback_reason(monkeypatch):
    """Only Liger's unavailability (the RoPE kernel "auto" looks for) is dropped from the fused MLA's row: a backend
    asked for by name that has no attention kernel (backend="te" on a GPU with TE) is a fallback from what the user
    asked, and the row still says so, as Qwen3's does."""
    from moe_patch import backends

    choose = backends.choose
    why = "te has no attention implementation in moe_patch yet"  # choose("te", "attention", cuda) with TE installed
    monkeypatch.setattr(backends, "choose", lambda names, kind, device, caps=None: (
        ("torch", why) if kind == "attention" else choose(names, kind, device, caps)))
    for family in ("deepseek_v3", "qwen3_moe"):
        rows = list(moe_patch.report(moe_patch.apply(build(family))).where(kind="attention"))
        assert rows and all(r.status == "fallback" and why in r.reason for r in rows), (family, rows)


def test_switching_attention_implementation_turns_it_off_and_on():
    patched = moe_patch.apply(build("deepseek_v3"))
    attn = [m for m in patched.modules() if type(m).__name__ == "DeepseekV3Attention"]
    patched.set_attn_implementation("eager")
    assert not any(mla.is_installed(m) for m in attn)
    patched.set_attn_implementation("sdpa")
    assert all(mla.is_installed(m) for m in attn)


def test_a_wrong_kernel_is_refused_with_its_reason(monkeypatch):
    """The proof rejects an assembly that is off by 0.1% in the key; the module keeps the family's forward and
    the report says why."""
    original = mla._forward

    def wrong(*args):
        query, key, value = original(*args)
        return query, key * 1.001, value

    monkeypatch.setattr(mla, "_forward", wrong)
    monkeypatch.setattr(mla, "_PROOFS", {})
    patched = moe_patch.apply(build("deepseek_v3"))
    rows = moe_patch.report(patched).where(kind="attention")
    assert all(r.status == "fallback" and f"{mla.NAME} not proven" in r.reason and "rel. error" in r.reason
               for r in rows), rows
    assert not any(mla.is_installed(m) for m in patched.modules())


def test_calls_outside_the_proof_run_the_familys_forward():
    """Positional arguments, another implementation: the class's forward runs, counted by reason."""
    stock = build("deepseek_v3")
    patched = moe_patch.apply(copy.deepcopy(stock))
    s_attn, p_attn = stock.model.layers[1].self_attn, patched.model.layers[1].self_attn
    x = torch.randn(1, 8, stock.config.hidden_size)
    cos_sin = stock.model.rotary_emb(x, torch.arange(8)[None])
    mla.FALLBACKS.clear()
    out = p_attn(x, cos_sin, None)[0]
    assert torch.equal(out, s_attn(x, cos_sin, None)[0])
    assert mla.FALLBACKS == {"positional arguments": 1}


def test_code_changed_between_two_applies_is_proven_again(monkeypatch):
    """A proof is kept per process for the code it ran: a rotate_half changed after one model's apply() is proven
    (and found unequal to the hand-written backward) for the next model, not taken from the first one's proof."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as family

    assert mla.is_installed(moe_patch.apply(build("deepseek_v3")).model.layers[1].self_attn)
    original = family.rotate_half
    monkeypatch.setattr(family, "rotate_half", lambda x: 2 * original(x))  # another rotation
    patched = moe_patch.apply(build("deepseek_v3"))
    assert not any(mla.is_installed(m) for m in patched.modules())
    rows = list(moe_patch.report(patched).where(kind="attention"))
    assert rows and all(r.status == "fallback" and f"{mla.NAME} not proven" in r.reason for r in rows), rows


def test_code_changed_after_apply_or_autocast_runs_the_class_forward(monkeypatch):
    """The fused forward and its backward are written for the code the proof ran: a RoPE function, rotate_half,
    expand_kv (class or instance) or class forward put in its place after apply() sends the calls to the class's
    forward, which runs it with autograd's own gradients; so does autocast, which the proof does not run."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as family

    stock = build("deepseek_v3")
    patched = moe_patch.apply(copy.deepcopy(stock))
    p_attn = patched.model.layers[1].self_attn
    assert mla.is_installed(p_attn)
    x = torch.randn(1, 8, stock.config.hidden_size)
    cos_sin = stock.model.rotary_emb(x, torch.arange(8)[None])
    seen = []
    for name in ("apply_rotary_pos_emb", "apply_rotary_pos_emb_interleave"):
        original = getattr(family, name)

        def doubled(q, k, cos, sin, *args, _original=original, **kwargs):  # a different RoPE: twice the angle
            seen.append(1)
            return _original(q, k, cos * cos - sin * sin, 2 * sin * cos, *args, **kwargs)

        monkeypatch.setattr(family, name, doubled)
    mla.FALLBACKS.clear()
    x.requires_grad_()
    out = p_attn(hidden_states=x, position_embeddings=cos_sin, attention_mask=None)[0]
    assert seen and len(mla.FALLBACKS) == 1 and "apply_rotary_pos_emb" in next(iter(mla.FALLBACKS))
    monkeypatch.undo()
    for target, name in ((type(p_attn), "forward"), (type(p_attn), "expand_kv"), (p_attn, "expand_kv"),
                         (family, "rotate_half")):
        monkeypatch.setattr(target, name, lambda *a, **k: None)  # never called by the fused path: it must not run
        mla.FALLBACKS.clear()
        try:
            p_attn(hidden_states=x, position_embeddings=cos_sin, attention_mask=None)
        except Exception:
            pass  # the class's forward ran the stand-in
        assert len(mla.FALLBACKS) == 1 and "changed after apply()" in next(iter(mla.FALLBACKS)), name
        monkeypatch.undo()
    mla.FALLBACKS.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p_attn(hidden_states=x, position_embeddings=cos_sin, attention_mask=None)
    assert list(mla.FALLBACKS) and "autocast" in next(iter(mla.FALLBACKS))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("interleave", [True, False])
def test_compiled_fused_forward_on_cuda_matches_the_family_in_bf16(interleave):
    """The compiled kernels (CUDA) at the deepseek-v3-style widths, bf16, causal (the training call): output,
    hidden-state and every parameter gradient within 2e-2 of the family's own forward; both directions ran
    compiled (no eager fallback)."""
    from moe_patch.ops import compiled

    config = named_config("deepseek-v3-style", layers=1, rope_interleave=interleave)
    module, rotary = _attention_pair(config)
    module, rotary = module.to("cuda", torch.bfloat16), rotary.to("cuda")
    x = torch.randn(2, 512, config.hidden_size, device="cuda").to(torch.bfloat16)
    cos_sin = rotary(x, torch.arange(512, device="cuda")[None])
    _assert_fused_equals_family(module, x, cos_sin, None, 2e-2, 2e-2)
    for fn in (mla._forward, mla._q_grad, mla._kv_grad, mla._k_rot_grad):  # compiled, and did not fall back
        entries = [v for (f, _widths), v in compiled._CACHE.items() if f is fn]
        assert entries and fn not in entries, fn.__name__
