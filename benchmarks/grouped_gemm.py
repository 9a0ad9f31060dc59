"""The experts' grouped GEMMs, forward + backward (input and weight gradients) of one projection, one GPU: torch's
F.grouped_mm (one CUTLASS kernel per layout) against moe_patch's opt-in autotuned path (moe_patch/ops/tuned_gemm.py,
MOE_PATCH_TUNED_GEMM=1: torch inductor's autotuner choosing between its Triton template and that kernel).

    python benchmarks/grouped_gemm.py --shape gpt-oss-20b --batch 2 --json grouped_gemm.json
    python benchmarks/grouped_gemm.py --shape deepseek-v3-style --batch 4 --search 16

Rows = batch x seq x top-k, routed over the shape's experts with random (Dirichlet) counts; the weights in the family's
stored layout. Times are CUDA-event medians; "tune s" is the first call's compile + autotuning wall time (forward
and backward). --search N narrows inductor's grouped-GEMM search to N Triton configurations (BLOCK_M 128; torch has
no public knob for it: this sets a private list, for a quicker look; the default search is what a user gets).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from steps import median_cuda_ms

SHAPES = {  # experts, hidden, expert width, top-k, weights stored [E, in, out] (transposed) or [E, out, in]
    "gpt-oss-20b": (32, 2880, 2880, 4, True),
    "deepseek-v3-style": (64, 2048, 1408, 6, False),
    "qwen3-30b-a3b": (128, 2048, 768, 8, False),
}


def narrow_search(n: int) -> None:
    import torch._inductor.kernel.mm_grouped as mg

    configs = [mg.Config({"BLOCK_M": 128, "BLOCK_N": bn, "BLOCK_K": bk, "NUM_CONSUMER_GROUPS": 1}, num_stages=s,
                         num_warps=w) for bn in (128, 256) for bk in (64, 128) for s in (3, 4) for w in (4, 8)]
    mg._NV_CONFIGS[:] = configs[:n]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="gpt-oss-20b")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--search", type=int, default=0, help="narrow the autotuner's search to N configs (0: torch's)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    os.environ["MOE_PATCH_TUNED_GEMM"] = "1"
    from moe_patch.ops import tuned_gemm

    if args.search:
        narrow_search(args.search)
    experts, hidden, width, top_k, transposed = SHAPES[args.shape]
    rows = args.batch * args.seq * top_k
    g = torch.Generator().manual_seed(0)
    share = torch.distributions.Dirichlet(torch.full((experts,), 8.0)).sample()
    counts = (share * rows).floor().long()
    counts[0] += rows - counts.sum()
    offs = torch.cumsum(counts, 0).to(torch.int32).cuda()
    results = []
    for name, k, n in (("up (gate_up)", hidden, 2 * width), ("down", width, hidden)):
        x = torch.randn(rows, k, generator=g).to("cuda", torch.bfloat16)
        stored = torch.randn((experts, k, n) if transposed else (experts, n, k), generator=g).to("cuda", torch.bfloat16)
        grad = torch.randn(rows, n, generator=g).to("cuda", torch.bfloat16)
        flop = 3 * 2 * rows * k * n
        row = dict(projection=name, rows=rows, k=k, n=n)
        for label, fn in (("cutlass", lambda a, b, o: F.grouped_mm(a, b, offs=o)), ("tuned", tuned_gemm.grouped_mm)):
            def run():
                xx, ww = x.detach().requires_grad_(), stored.detach().requires_grad_()
                out = fn(xx, ww if transposed else ww.transpose(-2, -1), offs)
                out.backward(grad)
                return out, xx.grad, ww.grad

            start = time.perf_counter()
            outs = run()
            torch.cuda.synchronize()
            row[f"{label}_first_s"] = time.perf_counter() - start
            row[f"{label}_ms"] = median_cuda_ms(run, args.repeats)
            row[f"{label}_tflops"] = flop / row[f"{label}_ms"] / 1e9
            row.setdefault("outputs", []).append(outs)
        ref, new = row.pop("outputs")
        row["max_rel_err"] = max(float((a.double() - b.double()).norm() / b.double().norm()) for a, b in zip(new, ref))
        results.append(row)
    print(f"{args.shape}: {experts} experts, {rows} rows, fwd+bwd per projection ({torch.cuda.get_device_name()}, "
          f"search {'torch default' if not args.search else args.search})")
    print(f"{'projection':14s} {'cutlass ms':>10s} {'TF/s':>6s} {'tuned ms':>9s} {'TF/s':>6s} {'tune s':>7s} "
          f"{'err':>8s}")
    for r in results:
        print(f"{r['projection']:14s} {r['cutlass_ms']:10.3f} {r['cutlass_tflops']:6.0f} {r['tuned_ms']:9.3f} "
              f"{r['tuned_tflops']:6.0f} {r['tuned_first_s']:7.1f} {r['max_rel_err']:8.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=args.shape, search=args.search, results=results), f, indent=1)


if __name__ == "__main__":
    main()
