"""The experts' gate compiled from the family's own `_apply_gate` (with the bias add), the per-expert bias rows
with a one-GEMM gradient, and the fused bias add + row weighting (moe_patch/ops/compiled_gate.py): float32 on
CPU (the same functions run eagerly there) and bfloat16 / float32 on a CUDA GPU (compiled)."""
import copy

import pytest
import torch

import moe_patch
from moe_patch.ops import compiled_gate as cg
from util import build, rel_err

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpt_oss_experts(**config):
    return build("gpt_oss", **config).model.layers[0].mlp.experts


@pytest.mark.parametrize("experts,rows", [(5, 40), (3, 0), (8, 3)])
def test_expert_bias_gradient_is_the_indexing_gradient(experts, rows):
    """out + bias[ids] (add_expert_bias): the same sum, and the bias' one-GEMM gradient equals indexing's."""
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(experts, 24, generator=g, dtype=torch.float64)
    out = torch.randn(rows, 24, generator=g, dtype=torch.float64)
    ids = torch.randint(0, experts, (rows,), generator=g)
    grad = torch.randn(rows, 24, generator=g, dtype=torch.float64)
    b1, b2 = bias.clone().requires_grad_(), bias.clone().requires_grad_()
    o1, o2 = out.clone().requires_grad_(), out.clone().requires_grad_()
    y1, y2 = o1 + b1[ids], cg.add_expert_bias(o2, b2, ids)
    assert torch.equal(y1, y2)
    y1.backward(grad), y2.backward(grad)
    assert torch.equal(o2.grad, o1.grad)
    assert rel_err(b2.grad, b1.grad) < 1e-12 if rows else torch.equal(b2.grad, torch.zeros_like(bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_bias_and_weigh_is_the_family_arithmetic(dtype):
    """(out + bias[ids]) * weights[:, None] with every gradient, bias' included, as autograd gives the family's
    eager arithmetic (CPU: the same functions run eagerly, the backward through torch.func.vjp)."""
    g = torch.Generator().manual_seed(1)
    out, bias, w = torch.randn(30, 16, generator=g), torch.randn(4, 16, generator=g), torch.rand(30, generator=g)
    ids = torch.randint(0, 4, (30,), generator=g)
    ins1 = [t.to(dtype).requires_grad_() for t in (out, bias, w)]
    ins2 = [t.to(dtype).requires_grad_() for t in (out, bias, w)]
    ref = (ins1[0] + ins1[1][ids]) * ins1[2][:, None]
    new = cg.add_bias_and_weigh(ins2[0], ins2[1], ids, ins2[2])
    assert new.dtype == ref.dtype and rel_err(new, ref) < 1e-6
    probe = torch.randn(ref.shape, generator=g).to(dtype)
    (ref * probe).sum().backward(), (new * probe).sum().backward()
    for a, b in zip(ins2, ins1):
        assert rel_err(a.grad, b.grad) < 1e-6


def test_not_used_off_cuda():
    gate, why = cg.compiled_gate(_gpt_oss_experts(), 2 * 96, torch.device("cpu"), True)
    assert gate is None and "CUDA" in why


def test_proof_accepts_the_family_gate_and_rejects_another():
    """The proof itself, run on CPU (where the gate runs eagerly): the family's gate passes; a gate whose clamp
    limit differs from the module's (a stale copy) is refused with the reason."""
    experts = _gpt_oss_experts()
    width = experts.gate_up_proj.shape[-1]
    assert cg.prove(experts, cg.CompiledGate(cg._owner(experts)), width, "cpu", has_bias=True) is None
    assert cg.prove(experts, cg.CompiledGate(cg._owner(experts)), width, "cpu", has_bias=False) is None
    stale = cg._owner(experts)
    stale.limit = experts.limit / 4  # inputs are drawn beyond it: the outputs differ
    why = cg.prove(experts, cg.CompiledGate(stale), width, "cpu", has_bias=True)
    assert why is not None and "not the family's gate" in why


def test_gate_pickles_and_copies():
    """A patched model is saved whole with torch.save: the gate (kept on the experts module) must pickle."""
    import pickle

    experts = _gpt_oss_experts()
    gate = cg.CompiledGate(cg._owner(experts))
    x, b, ids = torch.randn(7, 2 * 96), torch.randn(3, 2 * 96), torch.tensor([0, 2, 2, 1, 0, 1, 2])
    for clone in (pickle.loads(pickle.dumps(gate)), copy.deepcopy(gate)):
        assert torch.equal(clone(x, b, ids), experts._apply_gate(x + b[ids]))
        assert torch.equal(clone(x), experts._apply_gate(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["te", "torch"])
@pytest.mark.gpu
@needs_gpu
def test_gpt_oss_experts_on_the_compiled_gate(dtype, backend):
    """GPT-OSS at its own expert width (2 x 2880): the compiled gate is proven and used (reported), and the experts
    module matches the stock module on random routings (outputs, hidden / routing-weight / every parameter gradient,
    the biases' included); float32 < 1e-5 / 1e-4, bfloat16 < 2e-2. A clamp limit set after apply() sends the rows
    to the family's own gate, which the result then follows."""
    from moe_patch.backends import capabilities

    if backend == "te" and not capabilities().te:
        pytest.skip("TransformerEngine not installed")
    stock = build("gpt_oss", hidden_size=128, intermediate_size=2880, num_local_experts=8).to(dtype).cuda()
    patched = moe_patch.apply(copy.deepcopy(stock), backend=backend, attention=False, loss=False)
    row = moe_patch.report(patched).where(kind="experts")[0]
    assert row.status == "patched" and "compiled gate" in row.replacement, (row.replacement, row.reason)
    experts, ref = patched.get_submodule(row.path), stock.get_submodule(row.path)
    tol, grad_tol = (1e-5, 1e-4) if dtype == torch.float32 else (2e-2, 2e-2)
    g = torch.Generator().manual_seed(5)
    for limit in (None, 3.0):
        if limit is not None:  # changed after apply(): the family's gate on the module runs
            experts.limit = ref.limit = limit
        t, k = 300, 4
        x = (torch.randn(t, 128, generator=g) * 4).to(dtype).cuda()
        idx = torch.stack([torch.randperm(8, generator=g)[:k] for _ in range(t)]).cuda()
        w = torch.rand(t, k, generator=g).softmax(-1).to(dtype).cuda()
        ins_s = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        ins_p = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        ref.zero_grad(), experts.zero_grad()
        out_s, out_p = ref(ins_s[0], idx, ins_s[1]), experts(ins_p[0], idx, ins_p[1])
        assert out_p.dtype == out_s.dtype and rel_err(out_p, out_s) < tol
        probe = torch.randn(out_s.shape, generator=g).to(dtype).cuda()
        (out_s.float() * probe).sum().backward()
        (out_p.float() * probe).sum().backward()
        for a, b in zip(ins_p, ins_s):
            assert rel_err(a.grad, b.grad) < grad_tol
        grads = dict(ref.named_parameters())
        for name, p in experts.named_parameters():
            assert rel_err(p.grad, grads[name].grad) < grad_tol, (limit, name)
    moe_patch.revert(patched)
    assert type(patched.get_submodule(row.path)) is type(ref)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_fused_gate_kept_across_train_and_eval(family):
    """from_pretrained returns eval mode: a model patched then and put in train() keeps its fused gate (the mode
    is not one of the gate's switches); a real switch changed after apply() still sends the rows to the family's
    gate. The fused gate here is a recording stand-in for TE's SwiGLU / the compiled gate (GPU only)."""
    model = build(family).eval()
    moe_patch.apply(model, attention=False, loss=False)
    experts = moe_patch.report(model).where(kind="experts")[0]
    module = model.get_submodule(experts.path)
    calls = []

    def recording_gate(h, bias=None, expert_ids=None):
        calls.append(h.shape)
        return module._apply_gate(h + bias[expert_ids]) if bias is not None else module._apply_gate(h)

    object.__setattr__(module, "_fused_gate", recording_gate)
    object.__setattr__(module, "_gate_proven", module._gate_switches())  # as if proven at apply(), in eval mode
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids)
    assert calls, "train() after apply() switched the fused gate off"
    if family == "gpt_oss":  # GPT-OSS's clamp limit is a gate switch: changed, the family's gate runs
        calls.clear()
        module.limit = module.limit / 2
        model(input_ids=ids)
        assert not calls
