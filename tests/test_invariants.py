"""The promises apply() makes about the model object, its weights and its checkpoint."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import moe_patch
from moe_patch.ops.base import Replacement
from util import build, inputs, rel_err


def _state(model):
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def test_type_state_dict_and_shared_parameters():
    model = build("deepseek_v3")
    before_type, before_state = type(model), _state(model)
    before_params = {n: p for n, p in model.named_parameters()}
    moe_patch.apply(model)
    assert type(model) is before_type
    assert _state(model) == before_state
    after_params = dict(model.named_parameters())
    assert after_params.keys() == before_params.keys()
    assert all(after_params[n] is before_params[n] for n in before_params)  # no copies


def test_apply_returns_same_object_and_is_idempotent():
    model = build("qwen3_moe")
    assert moe_patch.apply(model) is model
    swapped = [m for m in model.modules() if isinstance(m, Replacement)]
    assert moe_patch.apply(model) is model
    assert [m for m in model.modules() if isinstance(m, Replacement)] == swapped
    with pytest.raises(moe_patch.PatchError, match="already patched"):
        moe_patch.apply(model, attention=False)


def test_revert_restores_exact_modules():
    model = build("gpt_oss")
    originals = dict(model.named_modules())
    params = dict(model.named_parameters())
    ids = inputs()
    ref = model(ids).logits
    moe_patch.apply(model)
    assert moe_patch.is_patched(model)
    moe_patch.revert(model)
    assert not moe_patch.is_patched(model)
    after = dict(model.named_modules())
    assert after.keys() == originals.keys() and all(after[k] is originals[k] for k in originals)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert model.config._attn_implementation == "eager"
    assert torch.equal(model(ids).logits, ref)


def test_failure_during_planning_leaves_model_untouched(monkeypatch):
    model = build("qwen3_moe")
    modules = dict(model.named_modules())
    from moe_patch import plan

    def boom(module, backend, opts):
        raise moe_patch.PatchError("planned failure")

    monkeypatch.setitem(plan.PROPOSE, "router", boom)
    with pytest.raises(moe_patch.PatchError, match="planned failure"):
        moe_patch.apply(model)
    assert all(a is b for a, b in zip(dict(model.named_modules()).values(), modules.values()))
    assert not moe_patch.is_patched(model) and model.config._attn_implementation == "sdpa"


def test_failure_while_building_replacements_leaves_model_untouched(monkeypatch):
    model = build("mixtral")
    modules = dict(model.named_modules())
    from moe_patch.ops import experts

    # the plan-time proof builds a GroupedExperts too and turns a failure there into "not proven" (stock kept):
    # prove first (cached per class and widths), so that the constructor fails in the swap, which is under test
    moe_patch.plan_report(build("mixtral"))

    def boom(self, original, flags, *args, **kwargs):  # whatever else plan.py passes (backend, gate, tuned, ...)
        raise RuntimeError("constructor failed")

    monkeypatch.setattr(experts.GroupedExperts, "__init__", boom)
    with pytest.raises(RuntimeError, match="constructor failed"):
        moe_patch.apply(model)
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(dict(model.named_modules())[k] is v for k, v in modules.items())
    assert not moe_patch.is_patched(model)


def test_save_pretrained_loads_in_stock_transformers(tmp_path):
    model = build("nemotron_h")
    moe_patch.apply(model)
    ids = inputs()
    patched_logits = model(ids).logits
    model.save_pretrained(tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not moe_patch.is_patched(stock)
    assert rel_err(stock(ids).logits, patched_logits) < 1e-5
    assert stock.config._attn_implementation == "sdpa"


def test_skip_patterns_callable_and_kind_flags():
    model = build("qwen3_moe")
    moe_patch.apply(model, skip=["model.layers.0.*", "model.norm"], router=False)
    rep = moe_patch.report(model)
    for row in rep:
        if row.kind == "router":
            assert row.status == "skipped" and row.reason == "router=False"
        elif row.path.startswith("model.layers.0.") or row.path == "model.norm":
            assert row.status == "skipped" and "skip pattern" in row.reason
    assert type(model.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    assert type(model.model.layers[1].mlp.experts).__name__ == "GroupedExperts[Qwen3MoeExperts]"
    # a skipped attention layer gets no kernel-priority hooks: stock SDPA as Transformers runs it
    assert rep.where(path="model.layers.0.self_attn")[0].status == "skipped"

    model2 = build("qwen3_moe")
    moe_patch.apply(model2, skip=lambda path, module: path.endswith("experts") and ".1." in path)
    assert type(model2.model.layers[1].mlp.experts).__name__ == "Qwen3MoeExperts"
    assert type(model2.model.layers[0].mlp.experts).__name__ == "GroupedExperts[Qwen3MoeExperts]"


def test_partially_skipped_attention_still_matches_stock():
    stock = build("qwen3_moe")
    patched = copy.deepcopy(stock)
    moe_patch.apply(patched, skip=["model.layers.1.self_attn"])
    ids = inputs()
    assert rel_err(patched(ids).logits, stock(ids).logits) < 1e-5


def test_report_rows_and_table():
    model = build("qwen2_moe")
    moe_patch.apply(model)
    rep = moe_patch.report(model)
    row = rep.where(kind="experts")[0]
    assert (row.original, row.backend, row.status) == ("Qwen2MoeExperts", "torch", "patched")
    text = str(rep)
    assert "path" in text.splitlines()[0] and "Qwen2MoeExperts" in text and "experts:" in text
    assert {r.kind for r in rep} == {"attention", "rmsnorm", "linear", "experts", "router", "loss"}
    assert all(r.status in ("patched", "skipped", "fallback") for r in rep)


def test_bad_inputs_are_clear_errors():
    model = build("qwen3_moe")
    with pytest.raises(moe_patch.PatchError, match=r"backend: unknown backend 'cuda-magic'; valid: auto, torch, te, liger"):
        moe_patch.apply(model, backend="cuda-magic")
    with pytest.raises(moe_patch.BackendUnavailableError):
        moe_patch.apply(model, backend="te")  # no TE / no GPU here
    with pytest.raises(moe_patch.PatchError, match="not patched"):
        moe_patch.revert(model)
    with pytest.raises(moe_patch.PatchError, match="not patched"):
        moe_patch.report(model)
    assert not moe_patch.is_patched(model)


class LlamaStyleRMSNorm(torch.nn.Module):
    """A norm class no patches/ file declares, with Llama's formula (norm(x) rounded to the input dtype, then the
    weight); the tests below vary its forward."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n))
        self.variance_epsilon = 1e-6

    def normed(self, x):
        h = x.float()
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    def forward(self, x):
        return self.weight * self.normed(x).to(x.dtype)


def test_undeclared_norms_take_the_variant_that_rounds_as_they_do():
    """Two weight * norm(x) classes no patches/ file declares, one rounding norm(x) to the input dtype first (Llama),
    one rounding the product once (GPT-OSS, AFMoE, FlexOlmo, Gemma 4 ...): both formulas pass the proof's bounds for
    both (equal in float32, within the bf16 bound), and each class gets the one whose bf16 output is its own."""
    from moe_patch.ops import rmsnorm

    class CastLateRMSNorm(LlamaStyleRMSNorm):
        def forward(self, x):
            return (self.weight * self.normed(x)).to(x.dtype)

    model = torch.nn.Sequential(LlamaStyleRMSNorm(64), CastLateRMSNorm(64))
    moe_patch.apply(model)
    rows = {r.path: r.replacement for r in moe_patch.report(model)}
    assert rows == {"0": "TorchRMSNorm(scale)", "1": "TorchRMSNorm(scale_cast)"}, rows
    assert rmsnorm.closest_rounding(CastLateRMSNorm(64), ["scale", "scale_cast"]) == "scale_cast"
    assert rmsnorm.closest_rounding(LlamaStyleRMSNorm(64), ["scale_cast", "scale"]) == "scale"  # not by order


def test_a_norm_returning_a_tuple_stays_stock():
    """A norm returning its output in a 1-tuple: the proof compared the tensors inside and passed a replacement that
    returns a bare tensor (a caller indexing [0] would read the first row); with two variants passing, choosing the
    rounding compared a tensor against the tuple and apply() raised AttributeError. Not proven, left stock."""
    class TupleRMSNorm(LlamaStyleRMSNorm):
        def forward(self, x):
            return (super().forward(x),)

    model = torch.nn.Sequential(TupleRMSNorm(64))
    moe_patch.apply(model)
    (row,) = moe_patch.report(model)
    assert row.status == "skipped" and "structure" in row.reason, row
    assert isinstance(model[0](torch.randn(3, 64)), tuple)


def test_a_norm_with_eps_elsewhere_is_not_proven(monkeypatch):
    """x / (rms(x) + eps) is not RMSNorm: on unit-scale rows it is within 1e-5 of it, on rows of small magnitude far
    from it (30% at 1e-3). The proof's rows span 1e-4 .. 1e2, so such a class stays stock; with unit rows only
    (PROBE_ROW_SCALES None) it was patched."""
    from moe_patch.ops import rmsnorm

    class EpsOutsideRMSNorm(LlamaStyleRMSNorm):
        def forward(self, x):
            h = x.float()
            return self.weight * (h / (h.pow(2).mean(-1, keepdim=True).sqrt() + self.variance_epsilon)).to(x.dtype)

    model = torch.nn.Sequential(EpsOutsideRMSNorm(64))
    x = torch.randn(3, 64) * 1e-3
    ref = model(x)
    moe_patch.apply(model)
    row = next(iter(moe_patch.report(model)))
    assert row.status == "skipped" and "not proven equal" in row.reason, row
    assert torch.equal(model(x), ref)
    moe_patch.revert(model)
    monkeypatch.setattr(rmsnorm, "PROBE_ROW_SCALES", None)
    monkeypatch.setattr(moe_patch.probe, "_CACHE", {})
    moe_patch.apply(model)
    assert next(iter(moe_patch.report(model))).status == "patched"  # what unit rows alone let through
    assert rel_err(model(x), ref) > 1e-2


def test_rmsnorm_variants_are_proven_not_assumed():
    """A (1 + weight) norm is recognised as the offset variant; a norm with other maths is skipped."""
    from torch import nn

    class OffsetRMSNorm(nn.Module):  # Gemma-style, unknown to patches/
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n))
            self.eps = 1e-6

        def forward(self, x):
            y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
            return (y * (1.0 + self.weight.float())).to(x.dtype)

    class WeirdRMSNorm(OffsetRMSNorm):  # centred: a LayerNorm in disguise
        def forward(self, x):
            x = x - x.mean(-1, keepdim=True)
            return super().forward(x)

    model = nn.Sequential(OffsetRMSNorm(32), WeirdRMSNorm(32))
    ref = model(torch.randn(3, 32))
    x = torch.randn(3, 32)
    ref = model(x)
    moe_patch.apply(model)
    rows = {r.path: r for r in moe_patch.report(model)}
    assert rows["0"].replacement == "TorchRMSNorm(offset)"
    assert rows["1"].status == "skipped" and "not proven equal" in rows["1"].reason
    assert rel_err(model(x), ref) < 1e-5


def test_meta_device_plan():

    from moe_patch.shapes import named_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(named_config("qwen3-30b-a3b", layers=2))
    moe_patch.apply(model)
    rep = moe_patch.report(model)
    assert len(rep.where(kind="experts", status="patched")) == 2
    assert len(rep.where(kind="router", status="patched")) == 2


def test_backend_per_kind(monkeypatch):
    model = moe_patch.apply(build("qwen3_moe"), backend={"loss": "torch", "experts": "torch"})
    rep = moe_patch.report(model)
    assert rep.where(kind="loss")[0].backend == "torch" and rep.where(kind="experts")[0].backend == "torch"
    with pytest.raises(moe_patch.PatchError, match="unknown kind"):
        moe_patch.apply(build("qwen3_moe"), backend={"losses": "torch"})
    with pytest.raises(moe_patch.BackendUnavailableError):
        moe_patch.apply(build("qwen3_moe"), backend={"rmsnorm": "liger"})  # no GPU / Liger here
    monkeypatch.setenv("MOE_PATCH_BACKEND", "loss=torch,router=torch")
    from moe_patch import config

    assert config.from_environment()["backend"] == {"loss": "torch", "router": "torch"}
    monkeypatch.setenv("MOE_PATCH_BACKEND", "loss=cuda")
    with pytest.raises(moe_patch.PatchError, match="MOE_PATCH_BACKEND"):
        config.from_environment()


def test_fp8_requests_are_checked_before_anything_changes():
    model = build("qwen3_moe")
    before = list(model.modules())
    with pytest.raises(moe_patch.PatchError, match="fp8 must be one of"):
        moe_patch.apply(model, fp8="fp4-magic")
    with pytest.raises(moe_patch.PatchError, match="linear=True"):
        moe_patch.apply(model, fp8="current", linear=False)
    with pytest.raises(moe_patch.PatchError, match="te backend"):
        moe_patch.apply(model, fp8="delayed", backend="torch")
    if not torch.cuda.is_available():
        with pytest.raises(moe_patch.BackendUnavailableError):
            moe_patch.apply(model, fp8="current")
    assert list(model.modules()) == before and not moe_patch.is_patched(model)


class _OutsideTree(torch.nn.Module):
    """The pattern of the TE replacements: the computing module kept outside the module tree."""

    def __init__(self, linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        object.__setattr__(self, "inner", linear)

    def forward(self, x):
        from moe_patch.ops.base import current_params_into

        current_params_into(self.inner, self)
        return self.inner(x)


def test_outside_tree_module_follows_replaced_parameters():
    """load_state_dict(assign=True) (like FSDP2, see dist_ep.py) puts new Parameter objects on the module: the
    outside-tree module must compute with them and send their gradients there, not to the old ones."""
    module = _OutsideTree(torch.nn.Linear(4, 3))
    old = module.weight
    new_state = {"weight": torch.randn(3, 4), "bias": torch.randn(3)}
    module.load_state_dict(new_state, assign=True)
    assert module.weight is not old
    x = torch.randn(2, 4)
    y = module(x)
    assert rel_err(y, x @ new_state["weight"].t() + new_state["bias"]) < 1e-6
    y.sum().backward()
    assert module.weight.grad is not None and old.grad is None


def test_whole_model_pickle_round_trip(tmp_path):
    """torch.save(model) of a patched model (its classes are made at apply time) loads back, in this process
    and in a fresh one (which must re-register the attention function), computing the same loss."""
    import subprocess
    import sys

    model = moe_patch.apply(build("qwen3_moe"))
    ids = inputs()
    ref = model(input_ids=ids, labels=ids).loss.item()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    torch.save(ids, tmp_path / "ids.pt")
    again = torch.load(path, weights_only=False)
    assert moe_patch.is_patched(again) and abs(again(input_ids=ids, labels=ids).loss.item() - ref) < 1e-6
    code = ("import torch; m = torch.load(%r, weights_only=False); ids = torch.load(%r); "
            "print(m(input_ids=ids, labels=ids).loss.item())") % (str(path), str(tmp_path / "ids.pt"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert abs(float(out.stdout.strip().splitlines()[-1]) - ref) < 1e-6


def test_attention_kernel_priority_is_set_for_the_call_and_put_back():
    """The GPU attention path sets SDPA's kernel order (cuDNN first) only for its call, also on errors."""
    from moe_patch.ops import attention

    before = torch._C._get_sdp_priority_order()
    inside = attention.with_gpu_priority(torch._C._get_sdp_priority_order)
    assert inside[:4] == [int(b) for b in attention.gpu_priority()] and sorted(inside) == sorted(before)
    assert torch._C._get_sdp_priority_order() == before

    def fails():
        raise ValueError("inside")

    with pytest.raises(ValueError):
        attention.with_gpu_priority(fails)
    assert torch._C._get_sdp_priority_order() == before
