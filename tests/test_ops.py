"""Each replacement against the stock module on fresh random inputs, including awkward routings."""
import copy

import pytest
import torch

import moe_patch
from moe_patch.ops.experts import GroupedExperts
from util import MOE_FAMILIES, RowWeightingDispatcher, build, inputs, rel_err


def _experts_pairs(model_type):
    stock = build(model_type)
    patched = copy.deepcopy(stock)
    moe_patch.apply(patched)
    pairs = []
    for (name, s), (_, p) in zip(stock.named_modules(), patched.named_modules()):
        if isinstance(p, GroupedExperts):
            pairs.append((s, p))
    return pairs


ROUTINGS = {
    "random": lambda t, e, k, g: torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]),
    "all_to_one": lambda t, e, k, g: torch.arange(k).repeat(t, 1),  # experts >= k get no token
    "last_expert_only": lambda t, e, k, g: torch.stack([torch.arange(e - k, e)] * t),
}


@pytest.mark.parametrize("model_type", MOE_FAMILIES)
@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("weighs", ["combine", "module"])
def test_experts_match_stock_module(model_type, routing, weighs, monkeypatch):
    """weighs="module": the routing weights travel with the rows and the experts module applies them (before
    the down projection where that is the same map, else after it), as under te_ep."""
    from moe_patch.ops import experts

    (stock, patched), *_ = _experts_pairs(model_type)
    widths = []
    if weighs == "module":
        patched.dispatcher = RowWeightingDispatcher()
        weigh = experts.weigh_rows
        monkeypatch.setattr(experts, "weigh_rows", lambda out, w: widths.append(out.shape[-1]) or weigh(out, w))
        add_weigh = experts.add_bias_and_weigh  # biased experts: the bias add and the weighing in one call
        monkeypatch.setattr(experts, "add_bias_and_weigh",
                            lambda out, b, ids, w: widths.append(out.shape[-1]) or add_weigh(out, b, ids, w))
    g = torch.Generator().manual_seed(3)
    e, k, t = patched.num_experts, 2, 11
    hidden_dim = (stock.gate_up_proj if patched.has_gate else stock.up_proj).shape[1 if patched.is_transposed else 2]
    x = torch.randn(t, hidden_dim, generator=g)
    idx = ROUTINGS[routing](t, e, k, g)
    w = torch.rand(t, k, generator=g)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    out_s, out_p = stock(x1, idx, w1), patched(x2, idx, w2)
    assert rel_err(out_p, out_s) < 1e-5
    if weighs == "module":  # weighed once; the narrower rows unless a bias or a norm follows the down projection
        folds = not patched.has_bias and not patched.has_post_expert_norm
        assert widths == [patched.down_proj.shape[1 if patched.is_transposed else 2] if folds else hidden_dim]
    probe = torch.randn(out_s.shape, generator=g)
    (out_s * probe).sum().backward()
    (out_p * probe).sum().backward()
    assert rel_err(x2.grad, x1.grad) < 1e-4 and rel_err(w2.grad, w1.grad) < 1e-4
    grads_s = {n: q.grad for n, q in stock.named_parameters()}
    for name, q in patched.named_parameters():
        gs = grads_s[name] if grads_s[name] is not None else torch.zeros_like(q)
        gp = q.grad if q.grad is not None else torch.zeros_like(q)
        assert rel_err(gp, gs) < 1e-4, name


def test_experts_with_no_tokens():
    (stock, patched), *_ = _experts_pairs("qwen3_moe")
    x = torch.zeros(0, 64, requires_grad=True)
    out = patched(x, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert out.shape == (0, 64)
    out.sum().backward()
    assert patched.gate_up_proj.grad is not None and patched.gate_up_proj.grad.abs().sum() == 0


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "granitemoe", "glm4_moe"])
def test_router_matches_stock_module(model_type):
    stock = build(model_type)
    patched = copy.deepcopy(stock)
    moe_patch.apply(patched)
    (row, *_) = moe_patch.report(patched).where(kind="router", status="patched")
    s_mod = dict(stock.named_modules())[row.path]
    p_mod = dict(patched.named_modules())[row.path]
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(13, 64, dtype=dtype)
        a, b = s_mod.to(dtype)(x), p_mod.to(dtype)(x)
        for u, v in zip(a, b):
            assert u.dtype == v.dtype
            if u.is_floating_point():
                assert rel_err(v, u) < (1e-5 if dtype == torch.float32 else 2e-2)
            else:
                assert torch.equal(u.sort(-1).values, v.sort(-1).values)


@pytest.mark.parametrize("model_type", MOE_FAMILIES + ["llama"])
def test_every_replaced_module_on_its_real_inputs(model_type):
    """Each swapped module against the stock one on the inputs a forward really gives it (fp32)."""
    from moe_patch.verify import record_inputs, run_module

    stock = build(model_type)
    patched = moe_patch.apply(copy.deepcopy(stock))
    rows = [r for r in moe_patch.report(patched) if r.status != "skipped" and r.path]
    captured = record_inputs(stock, [r.path for r in rows], input_ids=torch.randint(0, 256, (2, 10)))
    s_mods, p_mods = dict(stock.named_modules()), dict(patched.named_modules())
    assert {r.path for r in rows} <= set(captured)
    for r in rows:
        args, kwargs = captured[r.path]
        out_s, in_s, par_s = run_module(s_mods[r.path], args, kwargs)
        out_p, in_p, par_p = run_module(p_mods[r.path], args, kwargs)
        assert all(rel_err(a, b) < 1e-5 for a, b in zip(out_p, out_s)), r.path
        assert all(rel_err(a, b) < 1e-4 for a, b in zip(in_p, in_s)), r.path
        assert all(rel_err(par_p[n], g) < 1e-4 for n, g in par_s.items()), r.path


def test_fused_rope_routing_is_per_model(monkeypatch):
    """The fused-RoPE mechanism (ops/rope.py) on CPU with a stand-in kernel (Liger's needs a GPU): proven
    against the family's function on the model's own cos/sin, used only inside the patched model's attention
    (a stock model of the same family in the process keeps the stock function), gone after the hooks are
    removed; a kernel that is not the family's RoPE is refused with the reason."""
    import sys

    from moe_patch.ops import rope

    stock = build("qwen3_moe")
    patched = moe_patch.apply(copy.deepcopy(stock))
    attn = [m for m in patched.modules() if type(m).__name__.endswith("Attention")]
    original = sys.modules[type(attn[0]).__module__].apply_rotary_pos_emb  # the global the hooks must put back
    family = getattr(original, "__wrapped__", original)
    calls = []

    def spy(q, k, cos, sin):
        calls.append(q.shape)
        return family(q, k, cos, sin)

    def wrong(q, k, cos, sin):  # rotates the other way
        return family(q, k, cos, -sin)

    _fresh_rope(monkeypatch)
    monkeypatch.setattr(rope, "_liger_candidates", lambda: [("wrong rope", wrong, lambda w: w)])
    label, why = rope.prove(patched, attn[0])
    assert label is None and "not the family's" in why and "wrong rope" in why
    monkeypatch.setattr(rope, "_CACHE", {})
    monkeypatch.setattr(rope, "_liger_candidates", lambda: [("spy rope", spy, lambda w: w)])
    assert rope.prove(patched, attn[0]) == ("spy rope", "")
    handles = [h for m in attn for h in rope.install(m)]
    ids = inputs()
    try:
        calls.clear()
        with torch.no_grad():
            ref = stock(input_ids=ids).logits
        assert not calls  # the stock model of the same family: its own RoPE
        with torch.no_grad():
            out = patched(input_ids=ids).logits
        assert len(calls) == len(attn) and rel_err(out, ref) < 1e-5
        # torch.compile: dynamo reads the global before the hook's switch takes effect, so it traces the
        # family's RoPE (inductor fuses it itself); the point is that it compiles (a wrapper object on the
        # global made dynamo's guards fail) and gives the same result
        with torch.no_grad():
            out = torch.compile(patched, backend="eager")(input_ids=ids).logits
        assert rel_err(out, ref) < 1e-5
        module = sys.modules[type(attn[0]).__module__]
        assert module.apply_rotary_pos_emb is original  # the family's function, put back after each forward
        # a second model of the family with another head width: both call shapes are proven and used
        other = moe_patch.apply(build("qwen3_moe", head_dim=8))
        other_attn = [m for m in other.modules() if type(m).__name__.endswith("Attention")]
        assert rope.prove(other, other_attn[0]) == ("spy rope", "")
        handles += [h for m in other_attn for h in rope.install(m)]
        calls.clear()
        with torch.no_grad():
            other(input_ids=ids), patched(input_ids=ids)
        assert sorted(c[-1] for c in calls) == [8] * len(other_attn) + [16] * len(attn)
    finally:
        for h in handles:
            h.remove()
    calls.clear()
    with torch.no_grad():
        patched(input_ids=ids)
    assert not calls


def _fresh_rope(monkeypatch):
    """ops/rope.py with empty proof tables for the test (restored after it)."""
    from moe_patch.ops import rope

    for name in ("_CACHE", "_PROVEN", "_RESTORE", "_SHAPES"):
        monkeypatch.setattr(rope, name, {})
    monkeypatch.setattr(rope, "_WARNED", set())
    return rope


def _rope_model():
    """(stock, patched, patched attention modules, the family's modeling module, its apply_rotary_pos_emb): Qwen3-MoE."""
    import sys

    stock = build("qwen3_moe")
    patched = moe_patch.apply(copy.deepcopy(stock))
    attn = [m for m in patched.modules() if type(m).__name__.endswith("Attention")]
    module = sys.modules[type(attn[0]).__module__]
    return stock, patched, attn, module, module.apply_rotary_pos_emb


def test_fused_rope_follows_a_family_function_replaced_after_apply(monkeypatch):
    """A family's apply_rotary_pos_emb replaced after apply() (by the user, or another library's patch) runs as the
    model would run it, with one warning, and stays in place after the forward (the hooks put back only what they
    installed); apply() on a model after that proves the new function itself, not the earlier verdict. Before,
    the kernel proven for the old function ran and the forward hook put the old function back."""
    rope = _fresh_rope(monkeypatch)
    stock, patched, attn, module, family = _rope_model()
    kernel_calls, replaced_calls = [], []

    def spy(q, k, cos, sin):
        kernel_calls.append(q.shape)
        return family(q, k, cos, sin)

    def replacement(q, k, cos, sin, *args, **kwargs):  # a different RoPE: rotates the other way
        replaced_calls.append(q.shape)
        return family(q, k, cos, -sin, *args, **kwargs)

    monkeypatch.setattr(rope, "_liger_candidates", lambda: [("spy rope", spy, lambda w: w)])
    assert rope.prove(patched, attn[0]) == ("spy rope", "")
    handles = [h for m in attn for h in rope.install(m)]
    ids = inputs()
    try:
        kernel_calls.clear()  # (the proof's own calls)
        with torch.no_grad():
            patched(input_ids=ids)
        assert len(kernel_calls) == len(attn) and not replaced_calls
        monkeypatch.setattr(module, "apply_rotary_pos_emb", replacement)
        kernel_calls.clear()
        with pytest.warns(RuntimeWarning, match="replaced after apply"):
            with torch.no_grad():
                out = patched(input_ids=ids).logits
        assert not kernel_calls and len(replaced_calls) == len(attn)
        assert module.apply_rotary_pos_emb is replacement  # not reverted by the forward hook
        stock_out = copy.deepcopy(stock)
        with torch.no_grad():
            ref = stock_out(input_ids=ids).logits  # stock with the replacement in place
        assert rel_err(out, ref) < 1e-5
        # a model patched now: the replacement is what is proven (it is not the family's RoPE: refused)
        label, why = rope.prove(patched, attn[0])
        assert label is None and "not the family's" in why
    finally:
        for h in handles:
            h.remove()


def test_an_unhashable_rope_callable_is_called_not_a_crash(monkeypatch):
    """The proofs are keyed by the family function: a callable object without __hash__ set as the family's
    apply_rotary_pos_emb (after apply(), or before it) runs as the model would run it, with one warning after
    apply(), and prove() refuses it with the reason; nothing raises TypeError in the forward hooks."""
    rope = _fresh_rope(monkeypatch)
    stock, patched, attn, module, family = _rope_model()
    monkeypatch.setattr(rope, "_liger_candidates", lambda: [("same rope", family, lambda w: w)])
    assert rope.prove(patched, attn[0]) == ("same rope", "")
    handles = [h for m in attn for h in rope.install(m)]

    class Rope:  # __eq__ without __hash__: unhashable
        calls = 0

        def __eq__(self, other):
            return self is other

        def __call__(self, *args, **kwargs):
            Rope.calls += 1
            return family(*args, **kwargs)

    unhashable = Rope()
    monkeypatch.setattr(module, "apply_rotary_pos_emb", unhashable)
    try:
        with torch.no_grad(), pytest.warns(RuntimeWarning, match="replaced after apply"):
            out = patched(input_ids=inputs()).logits
        assert Rope.calls == len(attn) and module.apply_rotary_pos_emb is unhashable
        with torch.no_grad():
            assert rel_err(out, stock(input_ids=inputs()).logits) < 1e-5
        label, why = rope.prove(patched, attn[0])
        assert label is None and "unhashable" in why
    finally:
        for h in handles:
            h.remove()


def test_replaced_rope_warning_gives_advice_that_works(monkeypatch):
    """The warning for a family RoPE function replaced after apply() says how to get the fused kernel proven for the
    replacement, and that advice works. apply() again on the patched model is a no-op (same options: the model is
    returned as it is, nothing is proven), so "apply() again" alone left the kernel off; revert, then apply, proves it.
    Through apply() itself on CPU: the attention backend is taken as Liger's and the kernel is a stand-in."""
    import sys
    import warnings

    from moe_patch import backends

    rope = _fresh_rope(monkeypatch)
    choose = backends.choose
    monkeypatch.setattr(backends, "choose", lambda names, kind, device, caps=None: (
        ("liger", "") if kind == "attention" else choose(names, kind, device, caps)))
    stock = build("qwen3_moe")
    attn_cls = next(type(m) for m in stock.modules() if type(m).__name__.endswith("Attention"))
    module = sys.modules[attn_cls.__module__]
    family = module.apply_rotary_pos_emb
    kernel_calls = []

    def spy(q, k, cos, sin):
        kernel_calls.append(q.shape)
        return family(q, k, cos, sin)

    def replacement(q, k, cos, sin, *args, **kwargs):  # e.g. another library's wrapper: the same RoPE
        return family(q, k, cos, sin, *args, **kwargs)

    monkeypatch.setattr(rope, "_liger_candidates", lambda: [("spy rope", spy, lambda w: w)])
    patched = moe_patch.apply(copy.deepcopy(stock))
    n_attn = sum(isinstance(m, attn_cls) for m in patched.modules())
    assert all("spy rope" in r.replacement for r in moe_patch.report(patched).where(kind="attention"))
    monkeypatch.setattr(module, "apply_rotary_pos_emb", replacement)
    ids = inputs()
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="replaced after apply") as record:
        patched(input_ids=ids)
    (message,) = [str(w.message) for w in record if "replaced after apply" in str(w.message)]
    assert "revert" in message, message  # the way to prove the replacement, not a no-op
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert moe_patch.apply(patched) is patched  # apply() again: the same options, nothing proven anew
        kernel_calls.clear()
        with torch.no_grad():
            patched(input_ids=ids)
        assert not kernel_calls
        moe_patch.apply(moe_patch.revert(patched))  # what the warning says: the replacement is proven and used
        kernel_calls.clear()
        with torch.no_grad():
            out = patched(input_ids=ids).logits
            ref = stock(input_ids=ids).logits
    assert len(kernel_calls) == n_attn and rel_err(out, ref) < 1e-5
    assert module.apply_rotary_pos_emb is replacement


def test_expert_counts_match_bincount_without_a_host_read():
    """Rows per expert are summed on the device (torch.bincount reads its maximum on the host: a sync per
    MoE layer); under deterministic algorithms bincount itself is used. Experts nobody picked count 0."""
    from moe_patch.ops.experts import expert_counts

    idx = torch.randint(0, 12, (64, 4))
    idx[idx == 5] = 6  # an expert with no rows
    ref = torch.bincount(idx.reshape(-1), minlength=16)
    assert torch.equal(expert_counts(idx, 16), ref)
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(expert_counts(idx, 16), ref)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_offsets_and_expert_ids_are_repeat_interleave(device):
    """grouped_mm's offsets and each row's expert (biased experts gather their bias by it) from the counts, in one
    compiled call on CUDA: the same integers as cumsum and repeat_interleave(arange(E), counts), with experts that
    got no rows (first, middle, last) and no rows at all."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from moe_patch.ops.experts import Dispatched

    for counts in ([0, 3, 0, 0, 5, 1, 0], [4], [0, 0, 0], [2, 0, 7, 0]):
        c = torch.tensor(counts, dtype=torch.int64, device=device)
        d = Dispatched(torch.zeros(int(c.sum()), 8, device=device), c, None)
        offs, ids = d.offsets_and_expert_ids()
        assert offs.dtype == torch.int32 and torch.equal(offs.cpu(), torch.cumsum(c, 0).int().cpu())
        ref = torch.repeat_interleave(torch.arange(len(counts), device=device), c)
        assert ids.dtype == torch.int64 and torch.equal(ids.cpu(), ref.cpu()), counts
        assert torch.equal(d.offsets().cpu(), offs.cpu())


@pytest.mark.parametrize("model_type", MOE_FAMILIES)
def test_compiled_rmsnorm_formula_is_the_familys(model_type):
    """The forward and backward formulas compiled on GPU (ops/rmsnorm.py), run eagerly here: equal to each
    family's RMSNorm in fp32, outputs and gradients, for whichever variant the plan proved for it."""
    from moe_patch.ops import rmsnorm

    model = build(model_type)
    patched = moe_patch.apply(copy.deepcopy(model))
    row = next(r for r in moe_patch.report(patched).where(kind="rmsnorm") if r.status == "patched")
    stock = model.get_submodule(row.path)
    variant = row.replacement.split("(")[1].split(")")[0].split(",")[0]
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        stock.weight.copy_(torch.randn(stock.weight.shape, generator=g) * 0.1 + (0.0 if variant == "offset" else 1.0))
    x = torch.randn(3, 7, stock.weight.shape[0], generator=g)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w2 = stock.weight.detach().clone().requires_grad_()
    ref = stock(x1)
    out = rmsnorm.compiled_norm(x2, w2, rmsnorm.eps_of(stock), variant)
    assert rel_err(out, ref) < 1e-5
    dy = torch.randn(ref.shape, generator=g)
    gx1, gw1 = torch.autograd.grad(ref, (x1, stock.weight), dy)
    gx2, gw2 = torch.autograd.grad(out, (x2, w2), dy)
    assert rel_err(gx2, gx1) < 1e-4 and rel_err(gw2, gw1) < 1e-4


def test_rmsnorm_preference_without_the_compiler(monkeypatch):
    from moe_patch import backends

    assert backends.preference("rmsnorm")[0] == "torch"
    monkeypatch.setenv("MOE_PATCH_COMPILE", "0")
    assert backends.preference("rmsnorm")[0] == "liger"  # torch's uncompiled GPU RMSNorm is the slowest


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_compiled_rmsnorm_dtypes_follow_the_family(x_dtype, w_dtype):
    """Output and gradient dtypes as the stock module's (bf16 model; bf16 activations over fp32 weights),
    values within bf16 rounding."""
    from moe_patch.ops import rmsnorm

    stock = next(m for m in build("qwen3_moe").modules() if type(m).__name__.endswith("RMSNorm")).to(w_dtype)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, stock.weight.shape[0], generator=g).to(x_dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w2 = stock.weight.detach().clone().requires_grad_()
    ref, out = stock(x1), rmsnorm.compiled_norm(x2, w2, rmsnorm.eps_of(stock), "scale")
    assert out.dtype == ref.dtype and rel_err(out, ref) < 1e-2
    dy = torch.randn(ref.shape, generator=g).to(ref.dtype)
    gx1, gw1 = torch.autograd.grad(ref, (x1, stock.weight), dy)
    gx2, gw2 = torch.autograd.grad(out, (x2, w2), dy)
    assert (gx2.dtype, gw2.dtype) == (gx1.dtype, gw1.dtype)
    assert rel_err(gx2, gx1) < 2e-2 and rel_err(gw2, gw1) < 2e-2


def test_gpt_oss_norm_rounds_once_as_the_family_does():
    """GPT-OSS's RMSNorm forms weight * norm(x) in float32 and rounds once ((w * h).to(input dtype)); Llama's rounds
    norm(x) first. The plan takes GPT-OSS's "scale_cast" variant, whose formula gives the family's bf16 output
    bit for bit; the Llama form ("scale") does not (so this test can tell them apart)."""
    from moe_patch.ops import rmsnorm

    stock = build("gpt_oss", dtype=torch.bfloat16)
    patched = moe_patch.apply(copy.deepcopy(stock))
    rows = list(moe_patch.report(patched).where(kind="rmsnorm"))
    assert rows and all(r.replacement.startswith("TorchRMSNorm(scale_cast") for r in rows), rows
    norm = stock.model.layers[0].input_layernorm
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=g) * 0.3 + 1.0)
    x = torch.randn(4, 9, norm.weight.shape[0], generator=g).to(torch.bfloat16)
    ref = norm(x)
    ours = rmsnorm.compiled_norm(x, norm.weight, rmsnorm.eps_of(norm), "scale_cast")
    assert ours.dtype == ref.dtype and torch.equal(ours, ref)
    assert not torch.equal(rmsnorm.compiled_norm(x, norm.weight, rmsnorm.eps_of(norm), "scale"), ref)


def test_nemotron_h_norm_rounds_once_as_the_family_does():
    """Nemotron-H's RMSNorm is (weight.float() * norm(x)).to(input dtype), as GPT-OSS's, not Llama's: declared
    "scale" it was patched with the Llama form, whose bf16 output differs on about a quarter of the elements and which
    returns the weight's dtype where the weight is wider than the input (float32 out of a float32 norm_f in a bf16
    model, float64 out of a float64 one in a float32 model: the next linear raised a dtype error)."""
    from moe_patch.ops import rmsnorm

    stock = build("nemotron_h", dtype=torch.bfloat16)
    patched = moe_patch.apply(copy.deepcopy(stock))
    rows = [r for r in moe_patch.report(patched).where(kind="rmsnorm") if r.original == "NemotronHRMSNorm"]
    assert rows and all(r.replacement.startswith("TorchRMSNorm(scale_cast") for r in rows), rows
    norm = stock.model.norm_f
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=g) * 0.3 + 1.0)
    x = torch.randn(4, 9, norm.weight.shape[0], generator=g).to(torch.bfloat16)
    eps = rmsnorm.eps_of(norm)
    assert torch.equal(rmsnorm.compiled_norm(x, norm.weight, eps, "scale_cast"), norm(x))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    for dtype, wide in ((torch.bfloat16, torch.float32), (torch.float32, torch.float64)):
        stock = build("nemotron_h", dtype=dtype)
        patched = moe_patch.apply(copy.deepcopy(stock))
        for m in (stock, patched):
            m.model.norm_f.to(wide)
        with torch.no_grad():
            ref, out = stock(input_ids=ids).logits, patched(input_ids=ids).logits
        assert out.dtype == ref.dtype and rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_llama_style_norm_without_the_compiler_rounds_as_the_family(dtype):
    """The uncompiled path (CPU; a GPU with MOE_PATCH_COMPILE=0 and backend torch) of a "scale" norm whose weight has
    the activations' dtype: norm(x) rounded first, then the product, as Llama / Qwen: the patched module's bf16 / fp16
    output is the family's bit for bit (the weighted F.rms_norm rounded once: 25-30% of the elements differed)."""
    stock = build("qwen3_moe", dtype=dtype)
    patched = moe_patch.apply(copy.deepcopy(stock))
    g = torch.Generator().manual_seed(4)
    s_norm, p_norm = stock.model.layers[0].input_layernorm, patched.model.layers[0].input_layernorm
    with torch.no_grad():
        s_norm.weight.copy_(torch.randn(s_norm.weight.shape, generator=g) * 0.3 + 1.0)
        p_norm.weight.copy_(s_norm.weight)
    x = torch.randn(8, 5, s_norm.weight.shape[0], generator=g).to(dtype)
    assert type(p_norm).__name__.startswith("TorchRMSNorm") and torch.equal(p_norm(x), s_norm(x))


def test_gpt_oss_norm_with_a_float64_weight_runs_as_stock():
    """A float64 norm weight in a float32 GPT-OSS (`layer.input_layernorm.double()`): stock casts the product back to
    float32; the patched norm did not (float64 out, and the next float32 linear raised a dtype error)."""
    stock = build("gpt_oss")
    patched = moe_patch.apply(copy.deepcopy(stock))
    for m in (stock, patched):
        m.model.layers[0].input_layernorm.double()
        m.model.layers[0].post_attention_layernorm.double()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = stock(input_ids=ids).logits, patched(input_ids=ids).logits
    assert out.dtype == ref.dtype == torch.float32 and rel_err(out, ref) < 1e-5
    loss_s = stock(input_ids=ids, labels=ids).loss
    loss_p = patched(input_ids=ids, labels=ids).loss
    loss_s.backward()
    loss_p.backward()
    w_s = stock.model.layers[0].input_layernorm.weight
    w_p = patched.model.layers[0].input_layernorm.weight
    assert w_p.grad.dtype == torch.float64 and rel_err(w_p.grad, w_s.grad) < 1e-4


@pytest.mark.parametrize("out_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float32)])
def test_weighted_rows_match_the_broadcast_multiply(out_dtype, w_dtype):
    """weigh_rows (compiled on GPU, eager here) against autograd of out * weights[:, None], the families'
    formula: output dtype and value, both gradients (rows' and weights') with their dtypes."""
    from moe_patch.ops.experts import weigh_rows

    g = torch.Generator().manual_seed(11)
    out = torch.randn(37, 24, generator=g).to(out_dtype)
    w = torch.rand(37, generator=g).to(w_dtype)
    o1, w1 = out.clone().requires_grad_(), w.clone().requires_grad_()
    o2, w2 = out.clone().requires_grad_(), w.clone().requires_grad_()
    ref, got = o1 * w1.unsqueeze(-1), weigh_rows(o2, w2)
    assert got.dtype == ref.dtype and rel_err(got, ref) < 1e-5
    dy = torch.randn(ref.shape, generator=g).to(ref.dtype)
    go1, gw1 = torch.autograd.grad(ref, (o1, w1), dy)
    go2, gw2 = torch.autograd.grad(got, (o2, w2), dy)
    assert (go2.dtype, gw2.dtype) == (go1.dtype, gw1.dtype)
    tol = 1e-4 if out_dtype == w_dtype == torch.float32 else 1e-2  # bf16 products: rounding order
    assert rel_err(go2, go1) < tol and rel_err(gw2, gw1) < tol


@pytest.mark.parametrize("variant", ["scale", "offset", "scale_cast"])
@pytest.mark.parametrize("frozen", [None, "x", "weight"])
def test_compiled_rmsnorm_second_derivative_is_the_formulas(variant, frozen):
    """The compiled RMSNorm (on CUDA; its Function runs eager here) computes its backward from a saved rstd,
    a constant to autograd: a backward with create_graph=True (Hessian-vector products) differentiated through it
    missed rstd's dependence on x (rel. error 0.35 before). It now gives the eager formula's second derivative."""
    from moe_patch.ops import rmsnorm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, generator=g).requires_grad_(frozen != "x")
    w = torch.randn(16, generator=g).requires_grad_(frozen != "weight")
    probe = torch.randn(4, 16, generator=g)
    wanted = [t for t in (x, w) if t.requires_grad]

    def hvp(norm):
        grads = torch.autograd.grad((norm(x, w) * probe).pow(2).sum(), wanted, create_graph=True)
        return torch.autograd.grad(sum(d.sum() for d in grads), wanted)

    ref = hvp(lambda x, w: rmsnorm._FORWARD[variant](x, w, 1e-6)[0])
    out = hvp(lambda x, w: rmsnorm._CompiledRMSNorm.apply(x, w, 1e-6, variant))
    for a, b in zip(out, ref):
        assert rel_err(a, b) < 1e-4
