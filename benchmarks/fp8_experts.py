"""Would FP8 expert GEMMs pay off? bf16 grouped GEMM against FP8 (rowwise-scaled) grouped GEMM, quantisation
included, at a model's expert shapes (one GPU, Hopper or newer).

    python benchmarks/fp8_experts.py --shape qwen3-30b-a3b --seq 4096 --batch 4 --json fp8_experts.json

Per MoE layer and training step, the four expert GEMMs that FP8 would take (forward and input-gradient
GEMMs of the up and down projections; weight gradients stay bf16, as in every FP8 MoE recipe) are timed
in bf16 (`torch.nn.functional.grouped_mm`) and in FP8 (`torch._scaled_grouped_mm`, e4m3, one scale per row
of each operand). FP8 needs every operand quantised each step: the four activations, and the two weights
twice (each GEMM contracts a weight along a different dimension: one row-major and one transposed copy).
Quantisation is timed as torch.compile'd rowwise casts, and bounded from below by the bytes it must move
(read bf16, write e4m3) at this GPU's measured copy bandwidth, i.e. by any kernel. Tokens are routed to
the top-k of random logits (close to balanced). The verdict: GEMM time saved against quantisation cost.
"""
from __future__ import annotations

import argparse
import sys

from steps import add_shape_arguments, median_cuda_ms, write_results

E4M3_MAX = 448.0


def _rowwise(x):
    """e4m3 data and per-row dequantisation scales (amax over the last dimension)."""
    import torch

    amax = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12)
    scale = E4M3_MAX / amax
    data = (x.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return data, (1.0 / scale).squeeze(-1)


def measure(args):
    import torch
    import torch.nn.functional as F

    from moe_patch.shapes import named_config

    config = named_config(args.shape, layers=1)
    experts = getattr(config, "num_experts", None) or getattr(config, "n_routed_experts")
    top_k = config.num_experts_per_tok
    hidden, width = config.hidden_size, config.moe_intermediate_size
    rows = args.batch * args.seq * top_k
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    picks = torch.randn(args.batch * args.seq, experts, device=dev, generator=g).topk(top_k, dim=-1).indices
    offs = torch.bincount(picks.reshape(-1), minlength=experts).cumsum(0).to(torch.int32)
    quant = torch.compile(_rowwise, dynamic=True)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, device=dev, generator=g, dtype=torch.float32).mul_(scale).to(bf16)

    # weights in the v5 layout [E, out, in]
    w_up, w_down = rand(experts, 2 * width, hidden, scale=0.02), rand(experts, hidden, width, scale=0.02)
    # (name, left operand [rows, K], weight as [E, N, K] row-major: the column-major [E, K, N] both GEMMs take)
    gemms = [("up forward", rand(rows, hidden), w_up),
             ("down forward", rand(rows, width), w_down),
             ("down input-grad", rand(rows, hidden), w_down.transpose(-2, -1).contiguous()),
             ("up input-grad", rand(rows, 2 * width), w_up.transpose(-2, -1).contiguous())]
    copy_src = rand(256 * 1024 * 1024 // 2)  # 256 MiB: this GPU's copy bandwidth, read + write
    copy_ms = median_cuda_ms(lambda: copy_src.clone(), args.repeats)
    bytes_per_ms = 2 * copy_src.numel() * 2 / copy_ms

    table = []
    for name, a, w_nk in gemms:
        w_t = w_nk.transpose(-2, -1)  # [E, K, N], column-major
        bf16_ms = median_cuda_ms(lambda: F.grouped_mm(a, w_t, offs=offs), args.repeats)
        (a8, sa), (w8, sw) = quant(a), quant(w_nk)
        fp8_ms = median_cuda_ms(lambda: torch._scaled_grouped_mm(a8, w8.transpose(-2, -1), sa, sw, offs,
                                                             out_dtype=bf16, use_fast_accum=True), args.repeats)
        # for the input-grad GEMMs the weight's transposed copy already exists here: the compiled time leaves
        # the transpose out, the bound counts one read + one write per element either way
        quant_a_ms = median_cuda_ms(lambda: quant(a), args.repeats)
        quant_w_ms = median_cuda_ms(lambda: quant(w_nk), args.repeats)
        moved = (a.numel() + w_nk.numel()) * 3  # read 2 bytes, write 1, per element of both operands
        # correctness of the FP8 path against the dequantised operands in fp32 (first expert only)
        n0 = int(offs[0])
        ref = (a8[:n0].float() * sa[:n0, None]) @ (w8[0].float() * sw[0][:, None]).t()
        out = torch._scaled_grouped_mm(a8, w8.transpose(-2, -1), sa, sw, offs, out_dtype=bf16, use_fast_accum=True)
        err = ((out[:n0].float() - ref).norm() / ref.norm()).item()
        table.append(dict(gemm=name, bf16_ms=bf16_ms, fp8_gemm_ms=fp8_ms, quant_compiled_ms=quant_a_ms + quant_w_ms,
                          quant_bound_ms=moved / bytes_per_ms, fp8_rel_err=err))
    return dict(shape=args.shape, rows=rows, experts=experts, top_k=top_k, hidden=hidden, width=width,
                gpu=torch.cuda.get_device_name(), torch=torch.__version__, copy_gb_per_s=bytes_per_ms / 1e6,
                gemms=table)


def measure_paths(args):
    """Forward + backward of the experts' two projections per layer and step, as training runs them: bf16
    grouped_mm (moe_patch's bf16 path), moe_patch's FP8 path (ops/fp8_experts.py: rowwise FP8 forward and
    input-grad GEMMs, bf16 weight grad) with its weight copies cached (a later micro-batch) and made afresh (the
    first micro-batch after a step), and TE's GroupedLinear under its blockwise recipe (1x128 activation tiles,
    128x128 weight blocks; Float8BlockScaling) and per-tensor current scaling with is_first_microbatch True / False,
    each expert's rows padded to the recipe's alignment by TE's Fp8Padding (TE refuses unaligned groups). ms per layer
    and step."""
    import torch
    import torch.nn.functional as F

    from moe_patch.ops import fp8_experts
    from moe_patch.shapes import named_config

    config = named_config(args.shape, layers=1)
    experts = getattr(config, "num_experts", None) or getattr(config, "n_routed_experts")
    top_k, hidden, width = config.num_experts_per_tok, config.hidden_size, config.moe_intermediate_size
    rows = args.batch * args.seq * top_k
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    picks = torch.randn(args.batch * args.seq, experts, device=dev, generator=g).topk(top_k, dim=-1).indices
    counts = torch.bincount(picks.reshape(-1), minlength=experts)
    offs = counts.cumsum(0).to(torch.int32)
    projections = [(hidden, 2 * width), (width, hidden)]  # (in, out) of up and down
    weights = [torch.nn.Parameter(torch.randn(experts, o, i, device=dev, dtype=bf16) * 0.02) for i, o in projections]
    xs = [torch.randn(rows, i, device=dev, dtype=bf16).requires_grad_() for i, _ in projections]
    gs = [torch.randn(rows, o, device=dev, dtype=bf16) for _, o in projections]
    out = {}

    def bf16_step():
        for x, w, go in zip(xs, weights, gs):
            F.grouped_mm(x, w.transpose(-2, -1), offs=offs).backward(go)

    caches = [fp8_experts.FP8WeightCache() for _ in weights]

    def fp8_step(fresh):
        for x, w, go, cache in zip(xs, weights, gs, caches):
            if fresh:
                cache.clear()
            fp8_experts.grouped_linear_fp8(x, w, offs, w, cache, "w", False).backward(go)

    out["bf16 grouped_mm"] = median_cuda_ms(bf16_step, args.repeats)
    out["fp8 rowwise, weights cached"] = median_cuda_ms(lambda: fp8_step(False), args.repeats)
    out["fp8 rowwise, weights quantised"] = median_cuda_ms(lambda: fp8_step(True), args.repeats)
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common import recipe as te_recipe

        splits = counts.tolist()
        mods = []
        for i, o in projections:
            m = te.GroupedLinear(experts, i, o, bias=False, params_dtype=bf16, device="cuda")
            mods.append(m)
        for name, recipe in (("te blockwise", te_recipe.Float8BlockScaling()),
                             ("te current (per-tensor)", te_recipe.Float8CurrentScaling())):
            # TE's grouped FP8 GEMMs need each expert's row count a multiple of the recipe's alignment (16 for
            # these), which routed counts are not: each group is padded with zero rows and unpadded after, by
            # TE's own Fp8Padding / Fp8Unpadding (their cost is in the figure); alignment from the active recipe
            pads = [(te.Fp8Padding(experts), te.Fp8Unpadding(experts)) for _ in mods]
            for first in (True, False):
                def te_step():
                    with te.autocast(enabled=True, recipe=recipe):
                        for x, m, go, (pad, unpad) in zip(xs, mods, gs, pads):
                            padded, padded_splits = pad(x, splits)
                            unpad(m(padded, padded_splits, is_first_microbatch=first), splits).backward(go)
                try:
                    out[f"{name}, is_first_microbatch={first}"] = median_cuda_ms(te_step, args.repeats)
                except Exception as exc:  # noqa: BLE001 - a recipe this TE / GPU refuses: say so
                    out[f"{name}, is_first_microbatch={first}"] = f"failed: {type(exc).__name__}: {exc}"[:200]
    except ImportError as exc:
        out["te"] = f"not available: {exc}"
    print(f"\nexperts forward + backward per layer and step ({rows:,} rows, {experts} experts, hidden {hidden}, "
          f"width {width}); ms")
    for k, v in out.items():
        print(f"  {k:<45} {v:.3f}" if isinstance(v, float) else f"  {k:<45} {v}")
    return out


def print_table(r):
    print(f"\n{r['shape']}: {r['rows']:,} routed rows, {r['experts']} experts, hidden {r['hidden']}, expert width "
          f"{r['width']} ({r['gpu']}, copy bandwidth {r['copy_gb_per_s']:.0f} GB/s); ms per layer and step")
    head = (f"{'GEMM':<16}{'bf16':>8}{'fp8 GEMM':>10}{'saved':>8}{'quant (compiled)':>18}{'quant (bound)':>15}"
            f"{'fp8 err':>9}")
    print(head + "\n" + "-" * len(head))
    totals = dict(bf16_ms=0.0, fp8_gemm_ms=0.0, quant_compiled_ms=0.0, quant_bound_ms=0.0)
    for row in r["gemms"]:
        saved = row["bf16_ms"] - row["fp8_gemm_ms"]
        print(f"{row['gemm']:<16}{row['bf16_ms']:8.3f}{row['fp8_gemm_ms']:10.3f}{saved:8.3f}"
              f"{row['quant_compiled_ms']:18.3f}{row['quant_bound_ms']:15.3f}{row['fp8_rel_err']:9.1e}")
        for key in totals:
            totals[key] += row[key]
    saved = totals["bf16_ms"] - totals["fp8_gemm_ms"]
    print(f"{'total':<16}{totals['bf16_ms']:8.3f}{totals['fp8_gemm_ms']:10.3f}{saved:8.3f}"
          f"{totals['quant_compiled_ms']:18.3f}{totals['quant_bound_ms']:15.3f}")
    net = saved - totals["quant_bound_ms"]
    print(f"FP8 saves {saved:.3f} ms of GEMM per layer and step; quantising its operands costs at least "
          f"{totals['quant_bound_ms']:.3f} ms (torch.compile'd casts: {totals['quant_compiled_ms']:.3f} ms): "
          f"net {net:+.3f} ms at best.")
    r["totals"] = dict(totals, saved_ms=saved, net_at_best_ms=net)


def main():
    parser = argparse.ArgumentParser()
    add_shape_arguments(parser)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--paths", action="store_true",
                        help="also time whole forward + backward paths: bf16, moe_patch's FP8 (weights cached / "
                             "quantised), TE GroupedLinear blockwise and per-tensor FP8")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available() or not hasattr(torch, "_scaled_grouped_mm"):
        sys.exit("fp8_experts.py needs a CUDA GPU (Hopper or newer) and torch._scaled_grouped_mm")
    result = measure(args)
    print_table(result)
    if args.paths:
        result["paths_ms"] = measure_paths(args)
    write_results(args, [result])


if __name__ == "__main__":
    main()
