"""Nemotron-H's Mamba2 mixer: the chunked scan on mamba-ssm's Triton SSD kernel (moe_patch/ops/mamba_ssd.py).

CPU: the plan keeps the family's PyTorch scan and says why; the loader that imports mamba-ssm's Triton module
without its CUDA extension leaves `import package` failing as before. GPU (marker gpu; skipped without CUDA or
without mamba-ssm): the patched tiny model against stock in bf16 and fp32, forward and every gradient, and the
proof at the Nemotron-3-Nano widths."""
import copy
import importlib
import sys

import pytest
import torch

import moe_patch
from moe_patch.ops import mamba_ssd
from moe_patch.probe import rel_err
from moe_patch.shapes import named_config, tiny_config

FAMILY = "transformers.models.nemotron_h.modeling_nemotron_h"


def _model(dtype=torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("nemotron_h"), dtype=dtype).to(device)
    return model.train()


def test_cpu_keeps_the_family_scan_and_says_why():
    model = _model()
    family = importlib.import_module(FAMILY)
    before = family.mamba2_chunk_scan
    stock = copy.deepcopy(model)
    moe_patch.apply(model)
    rows = list(moe_patch.report(model).where(kind="mamba"))
    assert [r.path for r in rows] == ["model.layers.0.mixer"]
    assert rows[0].status == "skipped" and rows[0].reason  # CPU: NOT_ON_CPU, or mamba-ssm missing
    assert family.mamba2_chunk_scan is before  # nothing routed
    ids = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(0))
    mixer, stock_mixer = model.model.layers[0].mixer, stock.model.layers[0].mixer
    x = torch.randn(2, 21, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mixer(x), stock_mixer(x))
    assert model(input_ids=ids, labels=ids).loss.isfinite()


def test_disabled_by_flag():
    model = _model()
    moe_patch.apply(model, mamba=False)
    (row,) = moe_patch.report(model).where(kind="mamba")
    assert row.status == "skipped" and row.reason == "mamba=False"


def test_load_bare_leaves_the_package_import_failing(tmp_path, monkeypatch):
    pkg = tmp_path / "fakessm"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import fakessm_missing_cuda_extension\n")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "kernel.py").write_text("from fakessm.ops import helper\ndef scan():\n    return helper.VALUE\n")
    (pkg / "ops" / "helper.py").write_text("VALUE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = mamba_ssd.load_bare("fakessm", "fakessm.ops.kernel")
        assert module.scan() == 7
        assert "fakessm" not in sys.modules  # the bare package object is gone again
        with pytest.raises(ImportError):
            importlib.import_module("fakessm")  # as before: Transformers' own check still fails
    finally:
        for name in [n for n in sys.modules if n == "fakessm" or n.startswith("fakessm.")]:
            del sys.modules[name]


def test_load_bare_reports_a_submodule_that_needs_the_extension(tmp_path, monkeypatch):
    pkg = tmp_path / "fakessm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import fakessm2_missing_cuda_extension\n")
    (pkg / "kernel.py").write_text("import fakessm2_missing_cuda_extension\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ImportError, match="fakessm2_missing_cuda_extension"):
            mamba_ssd.load_bare("fakessm2", "fakessm2.kernel")
        assert "fakessm2" not in sys.modules
    finally:
        for name in [n for n in sys.modules if n == "fakessm2" or n.startswith("fakessm2.")]:
            del sys.modules[name]


# --- routing and proof on CPU, with the family's own scan standing in for the kernel ---------------------------

def _stand_in_kernel(drop_d=False):
    """mamba_chunk_scan_combined's signature over the family's PyTorch scan (output in the input's dtype, as the
    kernel returns it); drop_d: a wrong kernel that forgets the D skip connection."""
    family = importlib.import_module(FAMILY)
    scan = mamba_ssd._ORIGINAL.get((FAMILY, "mamba2_chunk_scan"), family.mamba2_chunk_scan)

    def kernel(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
               cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
               return_varlen_states=False):
        assert initial_states is None and not return_final_states and z is None
        return scan(x, dt, A, B, C, chunk_size, D=None if drop_d else D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                    dt_limit=dt_limit).to(x.dtype)

    return kernel


def _kernel_on_cpu(monkeypatch, op):
    """use(kernel): `op` (mamba_ssd or gated_rmsnorm) takes `kernel` as mamba-ssm's, on the CPU too, proofs afresh."""
    monkeypatch.setattr(op, "KERNEL_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(op, "_PROOFS", {})

    def use(kernel):
        monkeypatch.setitem(op._KERNEL, "result", (kernel, ""))

    return use


@pytest.fixture
def cpu_kernel(monkeypatch):
    return _kernel_on_cpu(monkeypatch, mamba_ssd)


def test_routing_only_the_patched_mixer_and_back(cpu_kernel):
    cpu_kernel(_stand_in_kernel())
    family = importlib.import_module(FAMILY)
    original = family.mamba2_chunk_scan
    model = _model()
    stock, other = copy.deepcopy(model), copy.deepcopy(model)
    moe_patch.apply(model)
    (row,) = moe_patch.report(model).where(kind="mamba")
    assert row.status == "patched" and row.backend == "mamba_ssm", row
    assert family.mamba2_chunk_scan is not original
    ids = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(0))
    calls = mamba_ssd.CALLS["kernel"]
    loss = model(input_ids=ids, labels=ids).loss
    assert mamba_ssd.CALLS["kernel"] == calls + 1  # one Mamba2 layer in the tiny model
    assert rel_err(loss, stock(input_ids=ids, labels=ids).loss) < 1e-6
    other(input_ids=ids, labels=ids)  # an unpatched model in the same process: the family's own scan
    assert mamba_ssd.CALLS["kernel"] == calls + 1
    model.gradient_checkpointing_enable()
    model(input_ids=ids, labels=ids).loss.backward()  # the recompute in backward is routed too
    assert mamba_ssd.CALLS["kernel"] == calls + 3
    assert mamba_ssd._ACTIVE.get() is None
    reason = "initial or final SSM state (a cache): the proof covers training calls without one"
    before = mamba_ssd.FALLBACKS.get(reason, 0)
    with torch.no_grad():
        model.eval().generate(ids[:1, :12], max_new_tokens=2, do_sample=False)
    assert mamba_ssd.FALLBACKS.get(reason, 0) > before  # a cache: the family's scan ran, counted with its reason
    moe_patch.revert(model)
    mixer = model.model.layers[0].mixer
    assert family.mamba2_chunk_scan is original
    assert mamba_ssd._MARK not in mixer.__dict__ and not mixer._forward_hooks and not mixer._forward_pre_hooks


def test_a_scan_set_after_apply_stays_after_revert(cpu_kernel):
    """The family's mamba2_chunk_scan set by the user after apply() (moe_patch's router replaced) is left in place by
    revert(): only the function apply() set is put back."""
    cpu_kernel(_stand_in_kernel())
    family = importlib.import_module(FAMILY)
    original = family.mamba2_chunk_scan
    model = moe_patch.apply(_model())
    assert family.mamba2_chunk_scan is not original

    def users_scan(*args, **kwargs):
        return original(*args, **kwargs)

    family.mamba2_chunk_scan = users_scan  # not monkeypatch: its undo would put back the dispatcher it replaced
    try:
        moe_patch.revert(model)
        assert family.mamba2_chunk_scan is users_scan
    finally:
        family.mamba2_chunk_scan = original


def test_proof_rejects_a_wrong_kernel(cpu_kernel):
    cpu_kernel(_stand_in_kernel(drop_d=True))
    family = importlib.import_module(FAMILY)
    original = family.mamba2_chunk_scan
    model = _model()
    moe_patch.apply(model)
    (row,) = moe_patch.report(model).where(kind="mamba")
    assert row.status == "skipped" and "not proven equal" in row.reason and "float32" in row.reason, row
    assert family.mamba2_chunk_scan is original


# --- GPU ------------------------------------------------------------------------------------------------------

def _need_kernel():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    kernel, why = mamba_ssd.load_kernel()
    if kernel is None:
        pytest.skip(why)


def _mixer_grads(model):
    return {n: p.grad for n, p in model.model.layers[0].mixer.named_parameters()}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_patched_mixer_equals_stock(dtype):
    _need_kernel()
    model = _model(dtype, "cuda")
    stock = copy.deepcopy(model)
    moe_patch.apply(model)
    (row,) = moe_patch.report(model).where(kind="mamba")
    print(dtype, row)
    calls = mamba_ssd.CALLS["kernel"]
    tol, grad_tol = (2e-2, 2e-2) if dtype == torch.bfloat16 else (1e-5, 1e-4)
    if dtype == torch.bfloat16:
        assert row.status == "patched", row.reason
    elif row.status != "patched":  # fp32: only where proven (TF32 dot products in the kernel): the reason says why
        assert "float32" in row.reason, row.reason
    g = torch.Generator().manual_seed(3)
    mixer, stock_mixer = model.model.layers[0].mixer, stock.model.layers[0].mixer
    x = (torch.randn(2, 45, 64, generator=g)).to("cuda", dtype)  # 45: a partial last chunk (chunk 8)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = stock_mixer.float()(x1.float())  # stock in fp32 on the same values: the reference
    out = mixer(x2)
    assert rel_err(out.float(), ref) < tol
    w = torch.randn(ref.shape, generator=g).to("cuda")
    (ref * w).sum().backward()
    (out.float() * w).sum().backward()
    assert rel_err(x2.grad.float(), x1.grad) < grad_tol
    names = [n for n, _ in stock_mixer.named_parameters()]
    for name in ("A_log", "D", "dt_bias", "conv1d.weight", "conv1d.bias", "in_proj.weight", "norm.weight",
                 "out_proj.weight"):
        assert name in names
    for (name, p), q in zip(stock_mixer.named_parameters(), mixer.parameters()):
        assert rel_err(q.grad.float(), p.grad) < grad_tol, name
    if row.status == "patched":
        assert mamba_ssd.CALLS["kernel"] > calls  # the kernel ran (a test that cannot pass on the stock scan alone)
    # the whole model: loss within tolerance of stock's
    ids = torch.randint(0, 256, (2, 45), generator=g).to("cuda")
    a = stock.to(dtype)(input_ids=ids, labels=ids).loss
    b = model(input_ids=ids, labels=ids).loss
    assert rel_err(b.float(), a.float()) < tol * 10


@pytest.mark.gpu
def test_gpu_proof_at_nemotron_3_nano_widths():
    _need_kernel()
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    config = named_config("nemotron-3-nano-style", layers=1)
    with torch.device("cuda"):
        mixer = NemotronHMamba2Mixer(config, layer_idx=0).to(torch.bfloat16)
    result = mamba_ssd.prove(mixer, "mamba2_chunk_scan", torch.device("cuda"))
    print({str(k): v for k, v in result.items()})
    for key, errors in mamba_ssd.ERRORS.items():
        print(key[0], key[2], {k: f"{v:.1e}" for k, v in errors.items()})
    assert result[torch.bfloat16] is None, result[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_cache_call_runs_the_family_scan():
    """Generation with a cache passes an initial state: not what was proven, so the family's own scan runs."""
    _need_kernel()
    model = _model(torch.bfloat16, "cuda").eval()
    moe_patch.apply(model)
    reason = "initial or final SSM state (a cache): the proof covers training calls without one"
    before = mamba_ssd.FALLBACKS.get(reason, 0)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0)).to("cuda")
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False)
    assert mamba_ssd.FALLBACKS.get(reason, 0) > before


# --- the mixer's gated RMSNorm on mamba-ssm's Triton rmsnorm_fn (moe_patch/ops/gated_rmsnorm.py) ---------------

from moe_patch.ops import gated_rmsnorm  # noqa: E402


def _stand_in_rmsnorm_fn(gate_after=False):
    """mamba-ssm's rmsnorm_fn(x, weight, bias, z, eps, group_size, norm_before_gate) as documented in its
    layernorm_gated.py (float32 inside, one rounding to x's dtype at the end), in torch, for CPU;
    gate_after: a wrong kernel that always applies the gate after the norm."""
    def rmsnorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
        assert bias is None
        before = norm_before_gate or gate_after
        v = x.float()
        if z is not None and not before:
            v = v * torch.nn.functional.silu(z.float())
        groups = v.unflatten(-1, (-1, group_size or v.shape[-1]))
        out = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * weight.float()
        if z is not None and before:
            out = out * torch.nn.functional.silu(z.float())
        return out.to(x.dtype)

    return rmsnorm_fn


@pytest.fixture
def cpu_norm_kernel(monkeypatch):
    return _kernel_on_cpu(monkeypatch, gated_rmsnorm)


def _norm_row(model):
    (row,) = [r for r in moe_patch.report(model).where(kind="rmsnorm") if r.original == "NemotronHRMSNormGated"]
    return row


def test_gated_norm_stays_on_cpu_and_says_why():
    model = _model()
    moe_patch.apply(model)
    row = _norm_row(model)
    assert row.path == "model.layers.0.mixer.norm" and row.status == "skipped" and row.reason
    assert type(model.model.layers[0].mixer.norm).__name__ == "NemotronHRMSNormGated"


def test_gated_norm_disabled_with_the_rmsnorm_kind():
    model = _model()
    moe_patch.apply(model, rmsnorm=False)
    assert _norm_row(model).reason == "rmsnorm=False"


def test_gated_norm_swapped_equal_and_reverted(cpu_norm_kernel):
    cpu_norm_kernel(_stand_in_rmsnorm_fn())
    model = _model()
    stock = copy.deepcopy(model)
    norm = model.model.layers[0].mixer.norm
    keys = list(model.state_dict())
    moe_patch.apply(model)
    row = _norm_row(model)
    assert row.status == "patched" and row.backend == "mamba_ssm" and "group 32" in row.replacement, row
    new = model.model.layers[0].mixer.norm
    assert isinstance(new, gated_rmsnorm.GatedRMSNorm) and isinstance(new, type(norm))
    assert new.weight is norm.weight and list(model.state_dict()) == keys
    ids = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(0))
    calls = gated_rmsnorm.CALLS["kernel"]
    loss, ref = model(input_ids=ids, labels=ids).loss, stock(input_ids=ids, labels=ids).loss
    assert gated_rmsnorm.CALLS["kernel"] == calls + 1  # one Mamba2 layer
    assert rel_err(loss, ref) < 1e-6
    loss.backward()
    ref.backward()
    for (name, p), q in zip(stock.named_parameters(), model.parameters()):
        assert rel_err(q.grad, p.grad) < 1e-4, name
    model.gradient_checkpointing_enable()
    model(input_ids=ids, labels=ids).loss.backward()  # the recompute runs the kernel too
    assert gated_rmsnorm.CALLS["kernel"] == calls + 3
    moe_patch.revert(model)
    assert model.model.layers[0].mixer.norm is norm and norm.weight is new.weight


def test_gated_norm_bf16_model_proves_its_two_cases(cpu_norm_kernel):
    """A bf16 model: its mixer hands the norm bf16 (mamba-ssm's scan) or float32 (the family's scan, as here on
    CPU) scan outputs with bf16 gate and weight; both cases are proven and run the kernel."""
    cpu_norm_kernel(_stand_in_rmsnorm_fn())
    model = _model(torch.bfloat16)
    stock = copy.deepcopy(model)
    moe_patch.apply(model)
    row = _norm_row(model)
    assert row.status == "patched" and row.reason == "", row
    assert model.model.layers[0].mixer.norm._moe_patch_gated["cases"] == {
        (torch.bfloat16,) * 3, (torch.float32, torch.bfloat16, torch.bfloat16)}
    ids = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(0))
    calls = gated_rmsnorm.CALLS["kernel"]
    loss = model(input_ids=ids, labels=ids).loss
    assert gated_rmsnorm.CALLS["kernel"] == calls + 1
    assert rel_err(loss.float(), stock(input_ids=ids, labels=ids).loss.float()) < 2e-2


def test_gated_norm_unproven_calls_run_the_family_norm(cpu_norm_kernel):
    cpu_norm_kernel(_stand_in_rmsnorm_fn())
    model = _model()
    moe_patch.apply(model)
    norm = model.model.layers[0].mixer.norm
    stock = copy.deepcopy(norm.original)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(4))
    calls, before = gated_rmsnorm.CALLS["kernel"], dict(gated_rmsnorm.FALLBACKS)
    with pytest.warns(UserWarning, match="family's own norm ran"):
        out = norm(x)  # no gate: not what was proven
    assert torch.equal(out, stock(x)) and gated_rmsnorm.CALLS["kernel"] == calls
    gate = torch.randn(2, 5, 64, dtype=torch.float64)
    assert torch.equal(norm(x.double(), gate), stock(x.double(), gate))  # an unproven dtype case
    assert gated_rmsnorm.CALLS["kernel"] == calls
    assert sum(gated_rmsnorm.FALLBACKS.values()) == sum(before.values()) + 2
    assert any("no gate" in r for r in gated_rmsnorm.FALLBACKS) and any("float64" in r for r in gated_rmsnorm.FALLBACKS)


def test_gated_norm_proof_rejects_a_wrong_kernel(cpu_norm_kernel):
    cpu_norm_kernel(_stand_in_rmsnorm_fn(gate_after=True))
    model = _model()
    moe_patch.apply(model)
    row = _norm_row(model)
    assert row.status == "skipped" and "not proven equal" in row.reason and "output rel. error" in row.reason, row
    assert type(model.model.layers[0].mixer.norm).__name__ == "NemotronHRMSNormGated"


def test_gated_norm_proof_rejects_a_wrong_declaration(cpu_norm_kernel):
    """patches/ declares norm_before_gate; a wrong declaration is caught by the proof, not trusted."""
    cpu_norm_kernel(_stand_in_rmsnorm_fn())
    result = gated_rmsnorm.prove(_model().model.layers[0].mixer.norm, True, torch.device("cpu"))
    assert all(why and "output rel. error" in why for why in result.values()), result
    result = gated_rmsnorm.prove(_model().model.layers[0].mixer.norm, False, torch.device("cpu"))
    assert all(why is None for why in result.values()), result


@pytest.mark.gpu
def test_gpu_gated_norm_proof_at_nemotron_3_nano_widths():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    kernel, why = gated_rmsnorm.load_kernel()
    if kernel is None:
        pytest.skip(why)
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    config = named_config("nemotron-3-nano-style", layers=1)
    with torch.device("cuda"):
        norm = NemotronHMamba2Mixer(config, layer_idx=0).norm.to(torch.bfloat16)
    result = gated_rmsnorm.prove(norm, False, torch.device("cuda"))
    result.update(gated_rmsnorm.prove(copy.deepcopy(norm).float(), False, torch.device("cuda")))
    for key, errors in gated_rmsnorm.ERRORS.items():
        print(key, {k: f"{v:.1e}" for k, v in errors.items()})
    print({gated_rmsnorm.case_name(k): v for k, v in result.items()})
    assert len(result) == len(gated_rmsnorm.CASES)
    assert all(why is None for why in result.values()), result  # float32 cases too: the kernel is float32 inside
    wrong = gated_rmsnorm.prove(norm, True, torch.device("cuda"))
    assert all(why for why in wrong.values()), wrong


def test_gated_norm_preview_for_a_gpu_from_a_cpu():
    """`moe-patch report --device cuda` on a CPU machine: the row says what the GPU's apply() will decide."""
    from moe_patch import backends
    from moe_patch.plan import Options
    from moe_patch.preview import preview

    model = _model()
    rows = list(moe_patch.plan_report(model))
    gpu = {r.path: r for r in preview(model, rows, Options(), "cuda", {"mamba"})}  # a GPU with mamba-ssm (--with mamba)
    assert gpu["model.layers.0.mixer.norm"].reason == gated_rmsnorm.ON_GPU_PREVIEW
    if not backends.capabilities().mamba_ssm:  # a GPU without it: the family's norm, and why
        bare = {r.path: r for r in preview(model, rows, Options(), "cuda", set())}
        assert bare["model.layers.0.mixer.norm"].reason == gated_rmsnorm.load_kernel()[1] != ""
    cpu = {r.path: r for r in preview(model, rows, Options(), "cpu", set())}
    assert cpu["model.layers.0.mixer.norm"].reason == gated_rmsnorm.NOT_ON_CPU


def test_a_deep_copy_of_a_patched_model_reverts_on_its_own(cpu_kernel):
    """copy.deepcopy of a patched model: reverting the copy leaves the original routed to the kernel, and reverting
    the original afterwards puts the family's scan back (no error)."""
    cpu_kernel(_stand_in_kernel())
    family = importlib.import_module(FAMILY)
    original = family.mamba2_chunk_scan
    model = moe_patch.apply(_model())
    twin = copy.deepcopy(model)
    moe_patch.revert(twin)
    assert family.mamba2_chunk_scan is not original  # the original model is still patched
    ids = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(0))
    calls = mamba_ssd.CALLS["kernel"]
    model(input_ids=ids, labels=ids)
    assert mamba_ssd.CALLS["kernel"] == calls + 1
    moe_patch.revert(model)
    assert family.mamba2_chunk_scan is original
