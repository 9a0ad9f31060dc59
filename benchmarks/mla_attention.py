"""DeepSeek-V3's MLA attention kernels (query / key head width 192, value 128, causal), forward + backward, one GPU.

    python benchmarks/mla_attention.py --batch 4 --seq 4096 --heads 16 --json mla_attention.json

Candidates: SDPA on cuDNN (what the family's SDPA path and moe_patch's kernel priority run), on the memory-efficient
kernel, on FlashAttention with the value padded to 192 (Transformers' own flash path for MLA pads so), cuDNN with
the padded value, and TransformerEngine's DotProductAttention with separate query / key and value widths. Times are
CUDA-event medians of one forward + backward on the [batch, seq, heads, dim] layout the projections write; each
candidate's output and q / k / v gradients are compared with SDPA-on-cuDNN's (relative error). TE is skipped when
not installed.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from steps import median_cuda_ms


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def sdpa(q, k, v, grad, backend, pad: bool):
    dq, dv = q.shape[-1], v.shape[-1]

    def run():
        qq, kk, vv = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))  # [B, H, S, D] views
        value = F.pad(vv, (0, dq - dv)) if pad else vv
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(qq, kk, value, is_causal=True, scale=dq ** -0.5)
        out = out[..., :dv] if pad else out
        out.backward(grad.transpose(1, 2))
        return out.transpose(1, 2), qq.grad.transpose(1, 2), kk.grad.transpose(1, 2), vv.grad.transpose(1, 2)

    return run


def te_attention(q, k, v, grad):
    import transformer_engine.pytorch as te

    b, s, h, dq = q.shape
    dv = v.shape[-1]
    dpa = te.DotProductAttention(h, (dq, dv), attn_mask_type="causal", qkv_format="bshd", softmax_scale=dq ** -0.5)

    def run():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = dpa(qq, kk, vv)
        out.backward(grad.reshape(b, s, h * dv))
        return out.view(b, s, h, dv), qq.grad, kk.grad, vv.grad

    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--qk-dim", type=int, default=192)
    p.add_argument("--v-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (args.batch, args.seq, args.heads)
    q, k = (torch.randn(*shape, args.qk_dim, device="cuda", generator=g).bfloat16() for _ in range(2))
    v, grad = (torch.randn(*shape, args.v_dim, device="cuda", generator=g).bfloat16() for _ in range(2))
    candidates = {
        "sdpa cudnn": sdpa(q, k, v, grad, SDPBackend.CUDNN_ATTENTION, pad=False),
        "sdpa efficient": sdpa(q, k, v, grad, SDPBackend.EFFICIENT_ATTENTION, pad=False),
        "sdpa flash (value padded)": sdpa(q, k, v, grad, SDPBackend.FLASH_ATTENTION, pad=True),
        "sdpa cudnn (value padded)": sdpa(q, k, v, grad, SDPBackend.CUDNN_ATTENTION, pad=True),
    }
    try:
        candidates["te DotProductAttention"] = te_attention(q, k, v, grad)
    except ImportError as exc:
        print(f"te DotProductAttention: skipped ({exc})")
    reference = candidates["sdpa cudnn"]()
    results = []
    for name, run in candidates.items():
        try:
            ms = median_cuda_ms(run, args.repeats)
            errors = [rel(a, b) for a, b in zip(run(), reference)]
        except Exception as exc:  # a kernel that refuses the shape: say so, time the others
            results.append(dict(name=name, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
            print(f"{name:28s} not run: {results[-1]['error']}")
            continue
        results.append(dict(name=name, ms=ms, rel_err_vs_cudnn=dict(zip(("out", "dq", "dk", "dv"), errors))))
        print(f"{name:28s} {ms:7.2f} ms forward + backward; rel. error vs cuDNN (out, dq, dk, dv): "
              + ", ".join(f"{e:.1e}" for e in errors))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                           results=results), f, indent=1)


if __name__ == "__main__":
    main()
