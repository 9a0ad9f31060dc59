"""The experts' grouped GEMMs on inductor's autotuned kernels (ops/tuned_gemm.py): the same product as
F.grouped_mm forward and backward, each shape compiled once, a compiler failure falling back with one warning,
the switches honoured; on a GPU, the autotuned kernels against torch's CUTLASS one and a patched experts module
taking them against the family's own at a real row count."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import moe_patch
from moe_patch.errors import PatchError
from moe_patch.ops import experts, tuned_gemm
from moe_patch.ops.experts import GroupedExperts
from util import build, rel_err

BF16 = torch.bfloat16


def _operands(rows, ends, layout, device="cpu", k=32, n=48, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    e = len(ends)
    x = torch.randn(rows, k, generator=g, device=device, dtype=BF16).requires_grad_()
    stored = torch.randn((e, k, n) if layout == "kn" else (e, n, k), generator=g, device=device, dtype=BF16)
    stored.requires_grad_()
    offs = torch.tensor(ends, dtype=torch.int32, device=device)
    return x, stored, offs


def _run(fn, x, stored, offs, layout, probe):
    w = stored if layout == "kn" else stored.transpose(-2, -1)  # [E, in, out] as the experts pass it
    out = fn(x, w, offs)
    gx, gw = torch.autograd.grad(out, (x, stored), probe)
    return out, gx, gw


@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_tuned_grouped_mm_is_grouped_mm_and_compiles_once_per_bucket(layout, monkeypatch):
    """CPU, bf16 (what the compiled operator takes): forward and both gradients equal F.grouped_mm's, an expert
    with no rows included; a second row count in the same power-of-two bucket reuses the compiled variant."""
    monkeypatch.setattr(tuned_gemm, "_CACHE", {})
    compiles = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiles.append(fn.__name__) or real(fn, **kw))
    for rows, ends in ((40, [5, 17, 17, 40]), (50, [0, 20, 30, 50])):
        x, stored, offs = _operands(rows, ends, layout)
        probe = torch.randn(rows, 48, dtype=BF16)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback would warn
            new = _run(tuned_gemm.grouped_mm, x, stored, offs, layout, probe)
        ref = _run(lambda a, b, o: F.grouped_mm(a, b, offs=o), x, stored, offs, layout, probe)
        for a, b in zip(new, ref):
            assert rel_err(a.float(), b.float()) < 1e-5
    assert compiles == [f"grouped_mm_k32_n48_e4_{'k' if layout == 'nk' else 'n'}_r6"]
    assert all(fn is not tuned_gemm._grouped_mm for fn in tuned_gemm._CACHE.values())


def test_tuned_grouped_mm_falls_back_on_a_compiler_error(monkeypatch):
    monkeypatch.setattr(tuned_gemm, "_CACHE", {})

    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("no kernel")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    x, stored, offs = _operands(40, [5, 17, 17, 40], "kn")
    probe = torch.randn(40, 48, dtype=BF16)
    with pytest.warns(RuntimeWarning, match="autotuned grouped_mm not used for grouped_mm_k32.*failed.*no kernel"):
        new = _run(tuned_gemm.grouped_mm, x, stored, offs, "kn", probe)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # warned once: later calls go straight to F.grouped_mm
        again = _run(tuned_gemm.grouped_mm, x, stored, offs, "kn", probe)
    ref = _run(lambda a, b, o: F.grouped_mm(a, b, offs=o), x, stored, offs, "kn", probe)
    for a, b, c in zip(new, again, ref):
        assert torch.equal(a, c) and torch.equal(b, c)


class _Off(torch.autograd.Function):
    """A stand-in 'kernel' right in its forward, wrong or failing in its backward."""

    @staticmethod
    def forward(ctx, out, fail):
        ctx.fail = fail
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        if ctx.fail:
            raise RuntimeError("backward kernel failed")
        return g * 1.5, None


@pytest.mark.parametrize("wrong", ["output", "weight gradient", "backward fails"])
def test_a_variant_that_differs_from_grouped_mm_on_its_first_call_is_not_used(wrong, monkeypatch):
    """The first call of each compiled variant compares it with F.grouped_mm on the same operands, backward
    included (so a backward that differs or fails is caught there, not in the user's backward()): such a variant
    is never used, one warning says which, and every result is F.grouped_mm's."""
    monkeypatch.setattr(tuned_gemm, "_CACHE", {})

    def compiled(fn, **kw):
        def run(x, w, offs):
            out = F.grouped_mm(x, w, offs=offs)
            if wrong == "output":
                return out * 1.05
            if wrong == "weight gradient":  # right output and input gradient, wrong weight gradient
                return F.grouped_mm(x, _Off.apply(w, False), offs=offs)
            return _Off.apply(out, True)
        return run

    monkeypatch.setattr(torch, "compile", compiled)
    x, stored, offs = _operands(40, [5, 17, 17, 40], "kn")
    probe = torch.randn(40, 48, dtype=BF16)
    said = {"output": "its output", "weight gradient": "its weight gradient", "backward fails": "backward kernel"}
    with pytest.warns(RuntimeWarning, match=f"autotuned grouped_mm not used.*{said[wrong]}"):
        new = _run(tuned_gemm.grouped_mm, x, stored, offs, "kn", probe)
    ref = _run(lambda a, b, o: F.grouped_mm(a, b, offs=o), x, stored, offs, "kn", probe)
    for a, b in zip(new, ref):
        assert torch.equal(a, b)
    assert list(tuned_gemm._CACHE.values()) == [tuned_gemm._grouped_mm]


@pytest.mark.parametrize("compile_var,tuned_var,on", [(None, None, False), ("0", "1", False), (None, "off", False),
                                                      (None, "1", True), (None, "", False), (None, "yes", True)])
def test_tuned_gemm_switches(compile_var, tuned_var, on, monkeypatch):
    for name, value in (("MOE_PATCH_COMPILE", compile_var), (tuned_gemm.SWITCH, tuned_var)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert tuned_gemm.enabled() is on
    x = torch.zeros(tuned_gemm.MIN_ROWS, 16, dtype=BF16)
    assert not tuned_gemm.usable(x, torch.zeros(2, 16, 16, dtype=BF16))  # CPU rows never take it


def test_the_choice_is_made_when_apply_plans_the_experts(monkeypatch):
    """MOE_PATCH_TUNED_GEMM is read when apply() plans an experts module (on a GPU only: a CPU model's experts are
    planned without it, whatever the switch says) and kept on the module: only a module planned with it calls the
    tuned GEMM (here a stand-in that records the call, the rows made to qualify), whatever the switch says later."""
    monkeypatch.setenv(tuned_gemm.SWITCH, "1")
    stock = build("qwen3_moe")
    patched = moe_patch.apply(copy.deepcopy(stock))
    mods = [m for m in patched.modules() if isinstance(m, GroupedExperts)]
    assert mods and not any(m._tuned_gemm for m in mods)  # planned on the CPU
    assert not any("autotuned" in (r.replacement or "") for r in moe_patch.report(patched).where(kind="experts"))
    calls = []
    monkeypatch.setattr(tuned_gemm, "usable", lambda x, w: True)
    monkeypatch.setattr(tuned_gemm, "grouped_mm", lambda x, w, o: calls.append(x.shape) or F.grouped_mm(x, w, offs=o))
    g = torch.Generator().manual_seed(0)
    m = mods[0]
    x, idx, w = torch.randn(9, 64, generator=g), torch.randint(0, m.num_experts, (9, 2), generator=g), torch.rand(9, 2)
    ref = m(x, idx, w)
    assert calls == []  # not planned with it: never taken, even where it could be
    object.__setattr__(m, "_tuned_gemm", True)  # as plan.py builds it on a GPU with the switch on
    monkeypatch.delenv(tuned_gemm.SWITCH)  # read at apply(), not at the call
    out = m(x, idx, w)
    assert len(calls) == 2 and torch.equal(out, ref)  # up and down projections


def test_the_gpu_preview_says_autotuned_where_the_switch_is_on():
    """`moe-patch report <model> --device cuda` from a CPU shows the experts row a GPU's apply() would plan."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_PATCH")}
    rows = {}
    for value in ("1", "0"):
        out = subprocess.run([sys.executable, "-m", "moe_patch", "report", "qwen3_moe", "--device", "cuda"],
                             capture_output=True, text=True, env=dict(env, MOE_PATCH_TUNED_GEMM=value), timeout=300)
        assert out.returncode == 0, out.stderr
        rows[value] = [line for line in out.stdout.splitlines() if "GroupedExperts(" in line]
    assert rows["1"] and all("grouped_mm autotuned)" in r for r in rows["1"])
    assert rows["0"] and not any("autotuned" in r for r in rows["0"])


def test_apply_refuses_a_bad_tuned_gemm_value(monkeypatch):
    monkeypatch.setenv(tuned_gemm.SWITCH, "maybe")
    model = build("qwen3_moe")
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(PatchError, match="MOE_PATCH_TUNED_GEMM='maybe'"):
        moe_patch.apply(model)
    assert {n: type(m) for n, m in model.named_modules()} == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("shape", [(8, 8192, 512, 1024), (8, 6000, 384, 256)])
def test_autotuned_kernels_match_cutlass_on_gpu(shape, layout, monkeypatch):
    """An expert with no rows, row counts off the tile sizes; forward and both gradients within bf16 rounding of
    torch's CUTLASS kernel (the same product: 1e-2, below the project's 2e-2 bf16 bound)."""
    monkeypatch.setattr(tuned_gemm, "_CACHE", {})
    monkeypatch.setenv(tuned_gemm.SWITCH, "1")
    e, rows, k, n = shape
    cuts = torch.sort(torch.randint(0, rows, (e - 1,), generator=torch.Generator().manual_seed(1))).values
    ends = cuts.tolist() + [rows]
    ends[1] = ends[0]  # an expert with no rows
    x, stored, offs = _operands(rows, ends, layout, device="cuda", k=k, n=n)
    w = stored if layout == "kn" else stored.transpose(-2, -1)
    assert tuned_gemm.usable(x, w)
    probe = torch.randn(rows, n, device="cuda", dtype=BF16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        # the experts' entry point takes it for a module planned with the switch on
        new = _run(lambda a, b, o: experts.grouped_mm(a, b, o, tuned=True), x, stored, offs, layout, probe)
    assert len(tuned_gemm._CACHE) == 1 and next(iter(tuned_gemm._CACHE.values())) is not tuned_gemm._grouped_mm
    ref = _run(lambda a, b, o: F.grouped_mm(a, b, offs=o), x, stored, offs, layout, probe)
    for a, b in zip(new, ref):
        assert rel_err(a.float(), b.float()) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_patched_experts_on_autotuned_kernels_match_stock_on_gpu(model_type, monkeypatch):
    """bf16, 4,096+ rows (the autotuned path): the patched experts module against the family's own, outputs and
    input, routing-weight and parameter gradients (< 2e-2)."""
    monkeypatch.setattr(tuned_gemm, "_CACHE", {})
    monkeypatch.setenv(tuned_gemm.SWITCH, "1")
    stock = build(model_type, dtype=BF16).cuda()
    patched = moe_patch.apply(copy.deepcopy(stock))
    rows = moe_patch.report(patched).where(kind="experts")
    assert rows and all("grouped_mm autotuned" in r.replacement for r in rows), rows
    monkeypatch.delenv(tuned_gemm.SWITCH)  # the module keeps apply()'s choice
    pairs = [(s, p) for s, p in zip(stock.modules(), patched.modules()) if isinstance(p, GroupedExperts)]
    s_mod, p_mod = pairs[0]
    assert p_mod._tuned_gemm
    g = torch.Generator(device="cuda").manual_seed(2)
    e, k = p_mod.num_experts, 2
    t = tuned_gemm.MIN_ROWS // k + 7
    hidden = (s_mod.gate_up_proj if p_mod.has_gate else s_mod.up_proj).shape[1 if p_mod.is_transposed else 2]
    x = torch.randn(t, hidden, generator=g, device="cuda", dtype=BF16)
    idx = torch.stack([torch.randperm(e, generator=g, device="cuda")[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=g, device="cuda", dtype=BF16)
    x1, x2, w1, w2 = (v.clone().requires_grad_() for v in (x, x, w, w))
    out_s, out_p = s_mod(x1, idx, w1), p_mod(x2, idx, w2)
    assert any(fn is not tuned_gemm._grouped_mm for fn in tuned_gemm._CACHE.values())  # took the tuned path
    assert rel_err(out_p.float(), out_s.float()) < 2e-2
    probe = torch.randn(out_s.shape, generator=g, device="cuda", dtype=out_s.dtype)
    (out_s * probe).sum().backward()
    (out_p * probe).sum().backward()
    assert rel_err(x2.grad.float(), x1.grad.float()) < 2e-2 and rel_err(w2.grad.float(), w1.grad.float()) < 2e-2
    grads = {n: q.grad for n, q in s_mod.named_parameters()}
    for name, q in p_mod.named_parameters():
        assert rel_err(q.grad.float(), grads[name].float()) < 2e-2, name
