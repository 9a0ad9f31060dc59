"""Gated MLPs a family declares (DeepSeek-V3's dense layer and shared experts) on GatedMLP (moe_patch/ops/mlp.py):
silu(gate) * up fused, against the family's module."""
import copy

import pytest
import torch

import moe_patch
from moe_patch.ops import mlp
from util import assert_runs_match, build, rel_err


def _pair():
    stock = build("deepseek_v3")
    patched = moe_patch.apply(copy.deepcopy(stock))
    return stock, patched


def test_dense_and_shared_expert_mlps_are_replaced_and_equal_stock():
    """fp32 CPU: every declared MLP is replaced (the dense layer's and each shared expert), its output, input and
    weight gradients equal the family's module (< 1e-5 / < 1e-4); revert() gives the family's modules back with
    the same children."""
    stock, patched = _pair()
    rows = list(moe_patch.report(patched).where(kind="mlp"))
    assert [r.path for r in rows] == ["model.layers.0.mlp", "model.layers.1.mlp.shared_experts",
                                      "model.layers.2.mlp.shared_experts"]
    assert all(r.status == "patched" and r.replacement.startswith(mlp.NAME) for r in rows)
    named_s, named_p = dict(stock.named_modules()), dict(patched.named_modules())
    for row in rows:
        s, p = named_s[row.path], named_p[row.path]
        assert isinstance(p, mlp.GatedMLP) and isinstance(p, type(s))
        x = torch.randn(3, 7, stock.config.hidden_size, generator=torch.Generator().manual_seed(0))
        xs, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys, yp = s(xs), p(xp)
        assert rel_err(yp, ys) < 1e-5
        w = torch.randn(ys.shape, generator=torch.Generator().manual_seed(1))
        (ys * w).sum().backward()
        (yp * w).sum().backward()
        assert rel_err(xp.grad, xs.grad) < 1e-4
        for (name, a), b in zip(s.named_parameters(), p.parameters()):
            assert rel_err(b.grad, a.grad) < 1e-4, name
    children = {n: m for n, m in named_p.items() if n.startswith("model.layers.0.mlp.")}
    moe_patch.revert(patched)
    assert type(patched.model.layers[0].mlp).__name__ == "DeepseekV3MLP"
    assert all(dict(patched.named_modules())[n] is m for n, m in children.items())


def test_silu_mul_backward_formula_matches_autograd():
    g = torch.Generator().manual_seed(0)
    gate, up, dy = (torch.randn(64, 48, generator=g) * 3 for _ in range(3))
    a, b = gate.clone().requires_grad_(), up.clone().requires_grad_()
    (torch.nn.functional.silu(a) * b).backward(dy)
    dg, du = mlp._silu_mul_backward(dy, gate, up)
    assert dg.dtype == du.dtype == torch.float32
    assert rel_err(dg, a.grad) < 1e-6 and rel_err(du, b.grad) < 1e-6


def test_another_activation_keeps_the_familys_module():
    patched = moe_patch.apply(build("deepseek_v3", hidden_act="gelu"))
    rows = list(moe_patch.report(patched).where(kind="mlp"))
    assert rows and all(r.status == "skipped" and "is not SiLU" in r.reason for r in rows), rows
    assert not any(isinstance(m, mlp.GatedMLP) for m in patched.modules())


def test_a_wrong_kernel_is_refused(monkeypatch):
    class Wrong(mlp.GatedMLP):
        def forward(self, x):
            return super().forward(x) * 1.001

    monkeypatch.setattr(mlp.GatedMLP, "build", Wrong.build)
    monkeypatch.setattr(moe_patch.probe, "_CACHE", {})
    patched = moe_patch.apply(build("deepseek_v3"))
    rows = list(moe_patch.report(patched).where(kind="mlp"))
    assert rows and all(r.status == "skipped" and "not proven equal" in r.reason for r in rows), rows


def test_switched_off_with_the_reason(monkeypatch):
    monkeypatch.setenv(mlp.SWITCH, "0")
    patched = moe_patch.apply(build("deepseek_v3"))
    rows = list(moe_patch.report(patched).where(kind="mlp"))
    assert rows and all(r.status == "skipped" and r.reason.startswith(f"{mlp.SWITCH}='0' (off)") for r in rows), rows
    assert not any(isinstance(m, mlp.GatedMLP) for m in patched.modules())


def test_mlp_false_leaves_them():
    patched = moe_patch.apply(build("deepseek_v3"), mlp=False)
    assert all(r.reason == "mlp=False" for r in moe_patch.report(patched).where(kind="mlp"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_silu_mul_on_cuda(dtype):
    """The compiled kernels at the deepseek-v3-style dense width (10,944): output and both gradients against the
    family's two ops (bf16 < 2e-2; fp32 < 1e-5 / 1e-4), compiled both ways."""
    from moe_patch.ops import compiled

    g = torch.Generator(device="cuda").manual_seed(0)
    gate, up = (torch.randn(4096, 10944, device="cuda", generator=g).to(dtype) * 2 for _ in range(2))
    dy = torch.randn(4096, 10944, device="cuda", generator=g).to(dtype)
    a, b = gate.clone().requires_grad_(), up.clone().requires_grad_()
    c, d = gate.clone().requires_grad_(), up.clone().requires_grad_()
    ref, out = torch.nn.functional.silu(a) * b, mlp.silu_mul(c, d)
    ref.backward(dy)
    out.backward(dy)
    tol, grad_tol = (2e-2, 2e-2) if dtype == torch.bfloat16 else (1e-5, 1e-4)
    assert out.dtype == ref.dtype and rel_err(out, ref) < tol
    assert rel_err(c.grad, a.grad) < grad_tol and rel_err(d.grad, b.grad) < grad_tol
    for fn in (mlp._silu_mul, mlp._silu_mul_backward):  # compiled (per widths), and did not fall back
        entries = [v for (f, _widths), v in compiled._CACHE.items() if f is fn]
        assert entries and fn not in entries, fn.__name__


def test_a_child_swapped_inside_a_replaced_mlp_goes_into_the_replacement(monkeypatch):
    """A projection replaced by the linear kind (TELinear under fp8 on a GPU; here a stand-in) lands in GatedMLP,
    which is what runs and what state_dict() reads; revert() gives every original module back in place."""
    from moe_patch import plan
    from moe_patch.ops.base import Replacement

    class MarkedLinear(Replacement):
        kind = "linear"

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight, self._parameters.get("bias"))

    monkeypatch.setitem(plan.PROPOSE, "linear", lambda module, backend, opts: (MarkedLinear.build, "Marked", ""))
    stock = build("deepseek_v3")
    patched = moe_patch.apply(copy.deepcopy(stock))
    dense = patched.model.layers[0].mlp
    assert isinstance(dense, mlp.GatedMLP)
    assert all(isinstance(getattr(dense, n), MarkedLinear) for n in ("gate_proj", "up_proj", "down_proj"))
    assert stock.state_dict().keys() == patched.state_dict().keys()
    x = torch.randn(2, 5, stock.config.hidden_size)
    assert rel_err(dense(x), stock.model.layers[0].mlp(x)) < 1e-5
    moe_patch.revert(patched)
    assert [type(m) for m in patched.modules()] == [type(m) for m in stock.modules()]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a preview only where there is no GPU")
def test_gpu_preview_names_the_compiled_mlp():
    """`moe-patch report --device cuda` (no backend choice for kind mlp): the GPU preview names the compiled
    GatedMLP, proven there at apply(); the CPU plan names the eager one. It raised KeyError: 'mlp' before."""
    from moe_patch.cli import _build_on_meta
    from moe_patch.plan import Options
    from moe_patch.preview import preview
    from moe_patch.shapes import tiny_config

    model = _build_on_meta(tiny_config("deepseek_v3"))
    rows = [r for r in moe_patch.plan_report(model).rows if r.kind == "mlp"]
    assert rows and all(r.status == "patched" and r.replacement.endswith("(eager: no compiler on this device)")
                        for r in rows), rows
    gpu = [r for r in preview(model, rows, Options(), "cuda", {"te", "liger"}) if r.kind == "mlp"]
    assert len(gpu) == len(rows)
    assert all(r.status == "patched" and r.replacement == mlp.NAME and "where proven on the GPU" in r.reason
               for r in gpu), gpu


def test_an_activation_set_after_apply_is_honoured():
    """act_fn set on the MLPs after apply() (adopted, read at each forward, as on the other replacements): GatedMLP
    hard-wires SiLU, so a module whose act_fn is no longer SiLU runs the family's forward. It computed SiLU before
    (logits 1.3e-2, gradients 9.7e-2 off stock)."""
    stock, patched = _pair()
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    before = stock(input_ids=ids).logits
    for model in (stock, patched):
        for module in model.modules():
            if isinstance(module, type(stock.model.layers[0].mlp)):
                module.act_fn = torch.nn.GELU()
    assert any(isinstance(m, mlp.GatedMLP) for m in patched.modules())
    assert rel_err(stock(input_ids=ids).logits, before) > 1e-4  # the switch changes stock: the test can fail
    assert_runs_match(stock, patched, ids)



class _ScaledSiLU(torch.nn.SiLU):
    def forward(self, x):
        return 1.5 * torch.nn.functional.silu(x)


def _forward_hook(dense):
    return dense.act_fn.register_forward_hook(lambda module, args, out: out * 0.5)


def _pre_hook(dense):
    return dense.act_fn.register_forward_pre_hook(lambda module, args: (args[0] * 2,))


def _global_hook(dense):
    from torch.nn.modules.module import register_module_forward_hook

    act = dense.act_fn
    return register_module_forward_hook(lambda module, args, out: out * 0.5 if module is act else None)


def _instance_forward(dense):
    dense.act_fn.forward = torch.nn.functional.gelu


def _silu_subclass(dense):
    dense.act_fn = _ScaledSiLU()


@pytest.mark.parametrize("change", [_forward_hook, _pre_hook, _global_hook, _instance_forward, _silu_subclass],
                         ids=lambda f: f.__name__.strip("_"))
def test_what_act_fn_computes_is_honoured(change):
    """GatedMLP computes SiLU itself, without calling act_fn: that is the family's forward only while calling act_fn
    would be F.silu and nothing else. A hook on act_fn (activation capture, steering, ablation; also a global module
    hook), a forward set on the instance or an nn.SiLU subclass with a forward of its own:
    the family's forward runs. Each was ignored before, the report saying patched (logits 7.2e-2, 1.5e-1, 2.2e-2,
    9.2e-3 and 1.0e-1 off stock)."""
    stock, patched = _pair()
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    before = stock(input_ids=ids).logits
    handles = [change(model.model.layers[0].mlp) for model in (stock, patched)]
    try:
        assert isinstance(patched.model.layers[0].mlp, mlp.GatedMLP)
        assert rel_err(stock(input_ids=ids).logits, before) > 1e-4  # the change changes stock: the test can fail
        assert_runs_match(stock, patched, ids)
    finally:
        for handle in handles:
            if handle is not None:
                handle.remove()


def test_a_silu_subclass_set_before_apply_is_not_planned_after_a_proof():
    """The proof is cached per class and widths: a model whose act_fn is an nn.SiLU subclass with a forward of its
    own, planned after a stock model of the same class was proven, was reported patched and computed plain SiLU
    (logits 1.0e-1 off stock). It is refused at plan time now."""
    _pair()  # the class proven (cached) on a stock model
    stock = build("deepseek_v3")
    for module in stock.modules():
        if type(module).__name__ == "DeepseekV3MLP":
            module.act_fn = _ScaledSiLU()
    patched = moe_patch.apply(copy.deepcopy(stock))
    rows = list(moe_patch.report(patched).where(kind="mlp"))
    assert rows and all(r.status == "skipped" and "_ScaledSiLU is not SiLU" in r.reason for r in rows), rows
    assert_runs_match(stock, patched, torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1)))


def test_float64_keeps_float64_precision():
    """A float64 module (gradcheck, a float64 reference): silu_mul's backward computed in float32 and rounded back
    to float64 (input and weight gradients 7e-8 off stock, gradcheck failed). It computes in the inputs' dtype
    where that is wider than float32."""
    stock, patched = _pair()
    s, p = stock.model.layers[0].mlp.double(), patched.model.layers[0].mlp.double()
    assert isinstance(p, mlp.GatedMLP)
    x = torch.randn(3, 4, stock.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    xs, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yp = s(xs), p(xp)
    ys.sum().backward()
    yp.sum().backward()
    assert yp.dtype == torch.float64 and rel_err(yp, ys) < 1e-12
    assert rel_err(xp.grad, xs.grad) < 1e-12
    for (name, a), b in zip(s.named_parameters(), p.parameters()):
        assert rel_err(b.grad, a.grad) < 1e-12, name
    assert torch.autograd.gradcheck(p, (x[0, :2].clone().requires_grad_(),))
