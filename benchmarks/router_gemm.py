"""The float32 router logits of the DeepSeek family (F.linear(x.float(), w.float()) on bf16 hidden states and
weight), forward + backward, one GPU: torch's float32 GEMMs (what the family and stock run) against moe_patch's
bf16 tensor-core form (moe_patch/ops/bf16x3_linear.py: exact products, the gradient split into three bf16 terms).

    python benchmarks/router_gemm.py --tokens 16384 --hidden 2048 --experts 64 --json router_gemm.json

Times are CUDA-event medians of one forward + backward (input and weight gradients) on fresh random bf16 inputs;
the relative errors of the logits and both gradients are against the float32 form's.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from steps import median_cuda_ms


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def candidate(fn, x, w, grad):
    def run():
        xx, ww = x.detach().requires_grad_(), w.detach().requires_grad_()
        out = fn(xx, ww)
        out.backward(grad)
        return out, xx.grad, ww.grad

    return run


def main():
    from moe_patch.ops import bf16x3_linear

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(args.experts, args.hidden, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    grad = torch.randn(args.tokens, args.experts, device="cuda", generator=g) * 1e-3
    runs = {"float32 F.linear (stock)": candidate(lambda a, b: F.linear(a.float(), b.float()), x, w, grad),
            "bf16x3 (moe_patch)": candidate(bf16x3_linear.linear, x, w, grad)}
    ref = runs["float32 F.linear (stock)"]()
    rows = []
    for name, run in runs.items():
        out = run()
        rows.append(dict(kernel=name, ms=median_cuda_ms(run, args.repeats),
                         **{f"err_{k}": rel(a, b) for k, a, b in zip(("logits", "dx", "dw"), out, ref)}))
    print(f"router logits fwd+bwd, tokens {args.tokens}, hidden {args.hidden}, experts {args.experts} "
          f"({torch.cuda.get_device_name()})")
    print(f"{'kernel':28s} {'ms':>7s} {'logits err':>11s} {'dx err':>9s} {'dw err':>9s}")
    for r in rows:
        print(f"{r['kernel']:28s} {r['ms']:7.3f} {r['err_logits']:11.1e} {r['err_dx']:9.1e} {r['err_dw']:9.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f,
                      indent=1)


if __name__ == "__main__":
    main()
