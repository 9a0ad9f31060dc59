"""GPT-OSS kernel candidates at the model's own widths, one GPU: attention with learned sinks (moe_patch's
flex_attention path against TransformerEngine's DotProductAttention with softmax_type="learnable", causal and
sliding-window layers) and the experts' elementwise work (bias adds and the clamped SwiGLU), forward + backward.

    python benchmarks/gpt_oss_kernels.py --batch 2 --seq 4096 --json gpt_oss_kernels.json

Each attention variant is also compared with the family's own eager attention in float32 on the same bf16
values (output and the q / k / v / sinks gradients, relative error). Times are CUDA-event medians of single calls:
host-side launch work (TE's Python, flex's BlockMask lookup) is inside them wherever it exceeds the GPU work, as it
does for the 128-token window; a training step overlaps it. --no-flex skips flex_attention's compile (tens of
seconds), --no-experts the experts' variants (whose compiled one also compiles).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from steps import median_cuda_ms


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def attention_case(args, window, results):
    from transformers.models.gpt_oss import modeling_gpt_oss as m

    from moe_patch.ops import sink_attention as sa

    B, H, Hkv, S, D = args.batch, 64, 8, args.seq, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q = (torch.randn(B, S, H, D, device="cuda", generator=g) * 2).bfloat16().transpose(1, 2)
    k = torch.randn(B, S, Hkv, D, device="cuda", generator=g).bfloat16().transpose(1, 2)
    v = torch.randn(B, S, Hkv, D, device="cuda", generator=g).bfloat16().transpose(1, 2)
    sinks = (torch.randn(H, device="cuda", generator=g) * 2).bfloat16()
    w = torch.randn(B, S, H, D, device="cuda", generator=g)
    scale = D ** -0.5

    class Mod:  # what eager reads off the module
        num_key_value_groups = H // Hkv
        training = False

    ref = None
    if args.check:
        mod = Mod()
        mod.sinks = sinks.float().requires_grad_()
        ins = [t.detach().float().requires_grad_() for t in (q, k, v)]
        mask = sa._expected_mask(S, S, window, torch.float32, "cuda")[None, None]
        out, _ = m.eager_attention_forward(mod, *ins, mask, scale)
        grads = torch.autograd.grad((out * w).sum(), ins + [mod.sinks])
        ref = (out.detach(), grads)
        del out, mask, ins
        torch.cuda.empty_cache()

    def flex_fn():
        ins = [t.detach().requires_grad_() for t in (q, k, v)]
        s = sinks.detach().requires_grad_()
        bm = sa._block_mask(S, S, window, "cuda")
        out = sa._compiled("run")(*ins, s, bm, scale)
        return out, ins + [s]

    te_cache = {}

    def te_fn(qkv_layout_copy=False):
        import transformer_engine.pytorch as te

        key = "dpa"
        if key not in te_cache:
            kw = dict(attn_mask_type="causal", qkv_format="bshd", softmax_type="learnable", softmax_scale=scale,
                      attention_dropout=0.0, num_gqa_groups=Hkv)
            if window:
                kw["window_size"] = (window - 1, 0)
            te_cache[key] = te.DotProductAttention(H, D, **kw)
        dpa = te_cache[key]
        ins = [t.detach().requires_grad_() for t in (q, k, v)]
        s = torch.nn.Parameter(sinks.detach().clone())
        dpa.softmax_offset = s
        qb, kb, vb = (t.transpose(1, 2) for t in ins)  # [B, S, H, D] views: the projections' own layout
        if qkv_layout_copy:
            qb, kb, vb = (t.contiguous() for t in (qb, kb, vb))
        out = dpa(qb, kb, vb).view(B, S, H, D)
        return out, ins + [s]

    variants = {"TE learnable (views)": te_fn, "TE learnable (contiguous bshd)": lambda: te_fn(True)}
    if args.flex:  # compiles flex_attention (tens of seconds)
        variants = {"flex+sinks (moe_patch)": flex_fn, **variants}
    for name, fn in variants.items():
        row = dict(case="attention", window=window, variant=name, batch=B, seq=S)
        try:
            out, ins = fn()
            grads = torch.autograd.grad((out.float() * w).sum(), ins)
            if ref is not None:
                row["err_out"] = rel(out, ref[0])
                for n, a, b in zip(("q", "k", "v", "sinks"), grads, ref[1]):
                    row[f"err_d{n}"] = rel(a, b)

            def fwd():
                with torch.no_grad():
                    fn()

            def fwd_bwd():
                out, ins = fn()
                out.backward(w.to(out.dtype))

            row["fwd_ms"] = median_cuda_ms(fwd, args.repeats)
            row["fwd_bwd_ms"] = median_cuda_ms(fwd_bwd, args.repeats)
        except Exception as exc:  # noqa: BLE001 - report and go on
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        print(json.dumps(row), flush=True)
        results.append(row)


def experts_case(args, results):
    """Per layer: tokens * top_k rows grouped over 32 experts; the bias adds + clamped SwiGLU as stock writes it
    (eager), compiled, and the bias gather's backward."""
    from transformers.models.gpt_oss import modeling_gpt_oss as m
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("gpt_oss", hidden_size=2880, intermediate_size=2880, num_local_experts=32)
    experts = m.GptOssExperts(cfg).cuda().bfloat16()
    rows, E, I = args.batch * args.seq * 4, 32, 2880
    g = torch.Generator(device="cuda").manual_seed(0)
    counts = torch.full((E,), rows // E, device="cuda")
    ids = torch.repeat_interleave(torch.arange(E, device="cuda"), counts, output_size=rows)
    h = (torch.randn(rows, 2 * I, device="cuda", generator=g) * 3).bfloat16()
    bias = torch.randn(E, 2 * I, device="cuda", generator=g).bfloat16()
    dy = torch.randn(rows, I, device="cuda", generator=g).bfloat16()

    def gate_bias(h, bias_rows):
        return experts._apply_gate(h + bias_rows)

    compiled = torch.compile(gate_bias, dynamic=True)  # the family's gate under AOTAutograd, every size dynamic
    from moe_patch.ops.compiled_gate import CompiledGate, _owner

    gate = CompiledGate(_owner(experts))  # what moe_patch runs: forward and vjp backward compiled apart

    def eager_path():
        hh, bb = h.detach().requires_grad_(), bias.detach().requires_grad_()
        out = experts._apply_gate(hh + bb[ids])
        out.backward(dy)

    def compiled_path():
        hh, bb = h.detach().requires_grad_(), bias.detach().requires_grad_()
        out = compiled(hh, bb[ids])
        out.backward(dy)

    def moe_patch_path():
        hh, bb = h.detach().requires_grad_(), bias.detach().requires_grad_()
        out = gate(hh, bb, ids)
        out.backward(dy)

    def gather_only():
        bb = bias.detach().requires_grad_()
        (bb[ids]).backward(h)

    for name, fn in (("gate+bias eager", eager_path), ("gate+bias compiled under autograd, dynamic", compiled_path),
                     ("gate+bias moe_patch", moe_patch_path), ("bias gather fwd+bwd", gather_only)):
        row = dict(case="experts", variant=name, rows=rows)
        try:
            row["fwd_bwd_ms"] = median_cuda_ms(fn, args.repeats)
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        print(json.dumps(row), flush=True)
        results.append(row)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--no-flex", dest="flex", action="store_false")
    p.add_argument("--no-experts", dest="experts", action="store_false")
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    results = []
    for window in (128, None):
        attention_case(args, window, results)
    if args.experts:
        experts_case(args, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), gpu=torch.cuda.get_device_name(), results=results), f, indent=1)
    print(f"\n{'case':<10} {'window':>6} {'variant':<32} {'fwd ms':>7} {'fwd+bwd ms':>10}  errors", file=sys.stderr)
    for r in results:
        errs = " ".join(f"{k[4:]}={v:.1e}" for k, v in r.items() if k.startswith("err_"))
        print(f"{r['case']:<10} {str(r.get('window', '')):>6} {r['variant']:<32} {r.get('fwd_ms', float('nan')):>7.2f} "
              f"{r.get('fwd_bwd_ms', float('nan')):>10.2f}  {errs} {r.get('error', '')}", file=sys.stderr)


if __name__ == "__main__":
    main()
