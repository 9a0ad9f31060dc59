"""The experts' gate as the family wrote it (`_apply_gate`), with the up-projection's bias add, compiled into one
kernel each way on CUDA; and the per-expert bias adds, with a one-GEMM gradient for the bias.

Where TransformerEngine's SwiGLU is not the family's gate (te_gate.py: GPT-OSS's clamped, interleaved SwiGLU with
alpha and limit), eager PyTorch runs the gate as a chain of strided elementwise kernels over the [rows, 2 x width]
activations each way, and the bias add before it as one more pass: 4.2 ms per layer forward + backward over the
32,768 x 5,760 rows of a GPT-OSS-20B layer (micro-batch 2 x 4096 tokens, top-4) on an H200. torch.compile of the
family's *own* function (no re-implementation of its quirks) fuses the bias gather and add, the de-interleave, the
clamps and the sigmoid into one kernel forward and one backward (its vector-Jacobian product). It is proven equal
to the eager function on the model's width before use (`prove`), and runs eagerly wherever compiled.py does not
compile (CPU, MOE_PATCH_COMPILE=0, a compiler failure).

Every bias add here takes the bias [E, N] and each row's expert id, not the gathered rows bias[expert_ids]: the
gather happens inside the compiled kernel, and the bias' gradient sums each expert's rows as one GEMM,
onehot(expert_ids)^T @ grad (float32 accumulation; per_expert_sum), instead of the indexing backward's sort-based
accumulation (indexing_backward_kernel: 1.9 ms per call over those rows, 15 ms of a 4-layer GPT-OSS step on an H200).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from . import compiled

NAME = "compiled gate"
_CACHE: dict = {}


def per_expert_sum(grad: torch.Tensor, expert_ids: torch.Tensor, experts: int) -> torch.Tensor:
    """grad [S, N], expert_ids [S] int64 (< experts) -> [experts, N], each expert's rows summed: one GEMM,
    onehot(expert_ids)^T @ grad (float32 accumulation), in grad's dtype: the gradient of bias[expert_ids]."""
    onehot = F.one_hot(expert_ids, experts).to(grad.dtype)  # [S, E], exact 0 / 1 in any float dtype
    return onehot.t() @ grad


def _add_rows(out, bias, expert_ids):
    return out + bias[expert_ids]


class _AddExpertBias(torch.autograd.Function):
    """out + bias[expert_ids], compiled forward (the bias rows never written out); backward: the output's gradient
    for out, its per-expert sum for bias."""

    @staticmethod
    def forward(ctx, out, bias, expert_ids):
        ctx.save_for_backward(expert_ids)
        ctx.experts, ctx.bias_dtype = bias.shape[0], bias.dtype
        return compiled.run(_add_rows, out, bias, expert_ids)

    @staticmethod
    def backward(ctx, grad):
        (expert_ids,) = ctx.saved_tensors
        d_bias = per_expert_sum(grad, expert_ids, ctx.experts).to(ctx.bias_dtype) if ctx.needs_input_grad[1] else None
        return grad, d_bias, None


def add_expert_bias(out: torch.Tensor, bias: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """out [S, N] + bias [E, N] gathered by expert_ids [S] (int64, < E): each row plus its expert's bias, in the
    promoted dtype, as `h @ W[e] + b[e]` of a biased family's expert (GPT-OSS)."""
    return _AddExpertBias.apply(out, bias, expert_ids)


def _add_weigh(out, bias, expert_ids, weights):
    return (out + bias[expert_ids]) * weights.unsqueeze(-1)


def _add_weigh_grad(out, bias, expert_ids, weights, grad):
    return torch.func.vjp(lambda o, w: _add_weigh(o, bias, expert_ids, w), out, weights)[1](grad)


class _AddBiasAndWeigh(torch.autograd.Function):
    """_add_weigh forward, its vector-Jacobian product backward, each compiled on its own (compiled.run); the
    bias' gradient is the per-expert sum of the output's (per_expert_sum)."""

    @staticmethod
    def forward(ctx, out, bias, expert_ids, weights):
        ctx.save_for_backward(out, bias, expert_ids, weights)
        return compiled.run(_add_weigh, out, bias, expert_ids, weights)

    @staticmethod
    def backward(ctx, grad):
        out, bias, expert_ids, weights = ctx.saved_tensors
        d_out, d_weights = compiled.run(_add_weigh_grad, out, bias, expert_ids, weights, grad.contiguous())
        d_bias = per_expert_sum(d_out, expert_ids, bias.shape[0]).to(bias.dtype) if ctx.needs_input_grad[1] else None
        return d_out, d_bias, None, d_weights


def add_bias_and_weigh(out: torch.Tensor, bias: torch.Tensor, expert_ids: torch.Tensor,
                       weights: torch.Tensor) -> torch.Tensor:
    """(out + bias[expert_ids]) * weights[:, None], as a biased family adds its down-projection's bias and then
    weighs the row (GPT-OSS: `out = h @ W + b; out * routing_weights`); one compiled kernel each way on CUDA, the
    bias rows never written out. out [S, H]; bias [E, H]; expert_ids [S] int64; weights [S]; result in the
    promoted dtype."""
    return _AddBiasAndWeigh.apply(out, bias, expert_ids, weights)


def switches(module, leave_out=frozenset({"training"})) -> tuple:
    """The module's plain attributes (bool / int / float / str) but `leave_out`: what a family's gate reads
    besides its input (GPT-OSS: alpha, limit). nn.Module's `training` is not one (no family gate reads it; see
    experts._MANAGED). GroupedExperts._gate_switches is this with its own attributes left out too."""
    return tuple((k, v) for k, v in vars(module).items()
                 if isinstance(v, (bool, int, float, str)) and not k.startswith("_") and k not in leave_out)


class CompiledGate:
    """gate(h, bias=None, expert_ids=None) = owner._apply_gate(h + bias[expert_ids]) (or owner._apply_gate(h)),
    the forward and the backward each one compiled kernel on CUDA (compiled.run).

    h [S, 2 x width] (the up-projection's rows, grouped by expert), bias [E, 2 x width] (one row per local expert),
    expert_ids [S] int64 -> [S, width] in the promoted dtype. The forward is the family's own function; the backward
    is its vector-Jacobian product (torch.func.vjp of the same function), recomputing h + bias[expert_ids] instead
    of keeping it; the bias' gradient sums each expert's rows in one GEMM (per_expert_sum). The two directions
    are compiled separately (not one function under autograd): under AOTAutograd the bias rows and the biased input
    were written in the forward and read back in the backward, extra passes over [S, 2 x width] every step.

    owner: a shallow copy of the family's experts module without its parameters (the gate reads the switches
    and, in some families, an activation child), one per (class, switches), so every layer with the same switches
    shares one compiled function. GroupedExperts runs it only while the module's switches are the proven ones."""

    takes_bias = True
    label = NAME

    def __init__(self, owner):
        self.owner = owner

        def gate(h):
            return owner._apply_gate(h)

        def gate_grad(h, grad):
            return _pairwise_vjp(owner._apply_gate, h, grad)

        def gate_with_bias(h, bias, expert_ids):
            return owner._apply_gate(h + bias[expert_ids])

        def gate_with_bias_grad(h, bias, expert_ids, grad):
            return _pairwise_vjp(owner._apply_gate, h + bias[expert_ids], grad)

        # dynamo keeps at most 8 compiled variants per code object, then runs it uncompiled: each gate gets its own
        # code objects, so that gates of other families (or models) in the process do not use up this one's
        tag = f"{type(owner).__name__}_{id(self):x}"
        self._fns = tuple(compiled.own_code(fn, f"{fn.__name__}_{tag}")
                          for fn in (gate, gate_grad, gate_with_bias, gate_with_bias_grad))

    def __reduce__(self):  # torch.save(model) / pickle: rebuilt from its owner (the closures do not pickle)
        return CompiledGate, (self.owner,)

    def __call__(self, h: torch.Tensor, bias: torch.Tensor | None = None,
                 expert_ids: torch.Tensor | None = None) -> torch.Tensor:
        if bias is None:
            return _Gate.apply(self._fns[0], self._fns[1], h)
        return _Gate.apply(self._fns[2], self._fns[3], h, bias, expert_ids)


def _pairwise_vjp(fn, x, grad):
    """d(sum(fn(x) * grad)) / dx for x [..., 2n], through the columns' even / odd halves: x is rebuilt as
    stack((x[..., 0::2], x[..., 1::2]), -1).flatten(-2), which is x itself for any fn, so this is exactly fn's
    gradient. Written so, the gradient comes out as one [..., n, 2] stack, for inductor to write in one pass: the
    gradient of a gate reading x[..., ::2] and x[..., 1::2] (GPT-OSS) taken through x itself is two full-width
    strided scatters and their sum, two kernels on the GPU (H200 profile). One kernel was seen in inductor's CPU
    code for this form; its GPU kernels were not inspected (only the whole step was timed)."""
    pairs = x.unflatten(-1, (-1, 2))

    def of_halves(even, odd):
        return fn(torch.stack((even, odd), -1).flatten(-2))

    d_even, d_odd = torch.func.vjp(of_halves, pairs[..., 0], pairs[..., 1])[1](grad)
    return torch.stack((d_even, d_odd), -1).flatten(-2)


class _Gate(torch.autograd.Function):
    """forward_fn(*inputs), with backward_fn(*inputs, grad) the gradient with respect to the first input, h. With
    inputs (h, bias, expert_ids) that is also the bias rows' gradient, summed per expert in one GEMM:
    onehot(expert_ids)^T @ grad."""

    @staticmethod
    def forward(ctx, forward_fn, backward_fn, *inputs):
        ctx.backward_fn = backward_fn
        ctx.save_for_backward(*inputs)
        return compiled.run(forward_fn, *inputs)

    @staticmethod
    def backward(ctx, grad):
        inputs = ctx.saved_tensors
        d_h = compiled.run(ctx.backward_fn, *inputs, grad.contiguous())
        if len(inputs) == 1:
            return None, None, d_h
        bias, expert_ids = inputs[1:]
        d_bias = None
        if ctx.needs_input_grad[3]:
            d_bias = per_expert_sum(d_h, expert_ids, bias.shape[0]).to(bias.dtype)
        return None, None, d_h, d_bias, None


def _owner(module):
    owner = copy.copy(module)
    owner.__dict__ = dict(module.__dict__)  # its own attribute dict: later changes to the module do not leak in
    owner._parameters, owner._buffers = {}, {}
    return owner


def compiled_gate(module, width: int, device: torch.device, has_bias: bool):
    """(CompiledGate, "") where the compiled `module._apply_gate` (with the bias add where `has_bias`) equals the
    eager one on [rows, width] inputs on `device`, else (None, why). Off CUDA or with the compiler off there is
    nothing to gain: (None, reason). Cached per (class, width, switches, device, has_bias)."""
    if torch.device(device).type != "cuda":
        return None, "the compiled gate needs a CUDA device"
    if not compiled.enabled():
        return None, "MOE_PATCH_COMPILE=0: the family's gate runs eagerly"
    key = (type(module), width, switches(module), str(device), has_bias)
    if key not in _CACHE:
        gate = CompiledGate(_owner(module))
        why = prove(module, gate, width, device, has_bias)
        _CACHE[key] = (None, why) if why else (gate, "")
    return _CACHE[key]


def prove(module, gate, width: int, device, has_bias: bool) -> str | None:
    """None if gate(h, bias, ids) equals module._apply_gate(h + bias[ids]) (eager, autograd) on random [rows, width]
    inputs at a trained scale (beyond GPT-OSS's clamp limit), float32 (rel. error < 1e-5 output, < 1e-4 input and
    bias gradients) and bfloat16 (< 2e-2); else the reason."""
    from .. import probe

    try:
        g = torch.Generator(device=device).manual_seed(0)
        rows, experts = 300, 3
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(rows, width, device=device, generator=g) * 4).to(dtype)
            bias = torch.randn(experts, width, device=device, generator=g).to(dtype)
            ids = torch.randint(0, experts, (rows,), device=device, generator=g)
            w = torch.randn(rows, width // 2, device=device, generator=g)
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            b1, b2 = bias.clone().requires_grad_(), bias.clone().requires_grad_()
            ref = module._apply_gate(x1 + b1[ids] if has_bias else x1)
            out = gate(x2, b2, ids) if has_bias else gate(x2)
            if ref.shape != out.shape or ref.dtype != out.dtype:
                return f"{NAME} output {tuple(out.shape)} {out.dtype} differs from the family's gate"
            err = probe.rel_err(out, ref)
            if not err < probe.TOL[dtype]:
                return f"{NAME} is not the family's gate (rel. error {err:.1e}, {dtype})"
            inputs = ((x1, b1), (x2, b2)) if has_bias else ((x1,), (x2,))
            ga = torch.autograd.grad((ref.float() * w).sum(), inputs[0])
            gb = torch.autograd.grad((out.float() * w).sum(), inputs[1])
            for name, a, b in zip(("input", "bias"), ga, gb):
                err = probe.rel_err(b, a)
                if not err < probe.GRAD_TOL[dtype]:
                    return f"{NAME} {name} gradient differs from the family's gate (rel. error {err:.1e}, {dtype})"
    except Exception as exc:  # a probe never takes the program down: the family's gate stays
        return f"{NAME} probe failed: {type(exc).__name__}: {str(exc)[:300]}"
    return None
