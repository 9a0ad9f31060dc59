"""One-GPU training-step benchmark: stock Transformers vs moe_patch, each in its own process.

    python benchmarks/train_step.py --shape qwen3-30b-a3b --layers 8 --seq 4096 --batch 4 \
        --variants stock,patched --json train_step.json --png train_step.png
    python benchmarks/train_step.py --shapes all --seq 4096 --json sweep.json --png sweep.png

--shapes (all, or a comma list of shape names) runs every shape of SWEEP at its layers and micro-batch, each with
stock (the family's default attention), stock-best (stock with the fastest attention Transformers offers the
family, where that is not the default: BEST_ATTENTION) and patched, and prints one table over all shapes; with
--rounds R each shape's variants run R times, interleaved, each row its variant's median run; with --fit F the
"fits mb" column gives each variant's largest micro-batch up to F x the shape's (first round only).
For a family with Mamba2 mixers (MAMBA_FAMILIES) where mamba-ssm is installed, stock-nomamba runs stock with
mamba-ssm and causal-conv1d hidden from Transformers, so the table shows both stock rows: what a pip install of
those libraries gives stock by itself, and what moe_patch adds. The "scan" column says which scan stock ran.

--timeline N: N more steps, each marked at every decoder layer's start (and its attention / MLP) with the host's
time and the GPU's (CUDA events): where the GPU waits for the host's launches (GPU behind host near zero) and where
the host leads (steps.layer_timeline); printed per variant and kept in the JSON.

--grad-accum K: K micro-batches (each --batch x --seq, different random tokens) per optimizer step, for
every variant; tokens/s counts all K.

Random weights, bf16, fused AdamW, the same random tokens for every variant. Prints tokens/s, TFLOP/s
(6 x active parameters per token + causal attention), peak GiB and fwd / bwd / optimizer ms (medians).
Variants: stock | stock-nomamba (stock, mamba-ssm / causal-conv1d not importable) | stock-best (BEST_ATTENTION's implementation) | patched (moe_patch.apply, backend auto) | patched-torch (backend="torch") |
patched-noloss (backend auto, loss=False: the stock lm_head + cross-entropy) |
patched-torchloss (backend auto, the loss on moe_patch's chunked torch kernel, as auto picks on GPU) |
patched-ligerloss (backend auto, but the loss on Liger's fused linear cross-entropy) |
patched-telinear (backend auto, but the linear layers on TE's bf16 te.Linear) |
patched-torchrouter (backend auto, but the routers on moe_patch's torch router instead of TE's fused one) |
patched-ligernorm / patched-tenorm (backend auto, but RMSNorm on Liger's / TE's kernel) |
patched-compiledce (backend auto, but the chunked loss's softmax-gradient step torch.compile'd instead of
Liger's kernel) |
patched-fp8-delayed / patched-fp8-current (backend auto, fp8=<recipe>: linear layers on TE in FP8 with that
recipe, every weight quantised once per optimizer step; experts bf16) | patched-fp8-current-experts (the same
with MOE_PATCH_FP8_EXPERTS=1: the experts' forward and input-gradient grouped GEMMs in FP8 rowwise too) |
patched-fp8-current-percall (fp8="current", but TE's linear layers quantise their weight at every forward: what
deriving is_first_microbatch saves) |
patched-nofusedmlp (MOE_PATCH_FUSED_MLP=0: declared gated MLPs keep the family's silu(gate) * up) |
patched-eager (MOE_PATCH_COMPILE=0: moe_patch's compiled helpers, the loss' gradient scaling and, where
Liger's kernel is not used, its softmax-gradient step, run eagerly) | patched-tuned (MOE_PATCH_TUNED_GEMM=1: the
experts' grouped GEMMs on inductor's autotuned kernels; the tuning runs in the warm-up steps and takes minutes the
first time on a machine: give the command time, or narrow the search with --tune-search 16).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from steps import add_step_arguments, write_results

# shape -> (layers, micro-batch): the layers a benchmark keeps and the micro-batch that fits one H200 (141 GB)
# at seq 4096 for the stock model (issue 18's table)
SWEEP = {"qwen3-30b-a3b": (8, 4), "deepseek-v3-style": (4, 4), "nemotron-3-nano-style": (6, 2),
         "gpt-oss-20b": (4, 2)}
# model type -> the fastest attention implementation stock Transformers supports for it on a GPU, where that is
# not its default (GPT-OSS defaults to eager: SDPA cannot apply its sinks; flex_attention can)
BEST_ATTENTION = {"gpt_oss": "flex_attention"}
# model type -> (python module of the family, its Mamba2 scan function): families whose stock path changes with
# mamba-ssm installed
MAMBA_FAMILIES = {"nemotron_h": ("transformers.models.nemotron_h.modeling_nemotron_h", "mamba2_chunk_scan")}
MAMBA_LIBRARIES = ("mamba_ssm", "causal_conv1d")


# variant -> environment its process runs with (the moe_patch switch it measures)
VARIANT_ENV = {"patched-eager": {"MOE_PATCH_COMPILE": "0"}, "patched-nofusedmlp": {"MOE_PATCH_FUSED_MLP": "0"}}


def mamba_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("mamba_ssm") is not None


def scan_in_use(model_type: str) -> str | None:
    """Which chunked scan the family's stock mixer calls here: 'mamba-ssm' where Transformers bound it to the
    package, 'pytorch' for its reference scan; None for a family without Mamba2 mixers."""
    if model_type not in MAMBA_FAMILIES:
        return None
    import importlib

    from moe_patch.ops import mamba_ssd

    modname, fn_name = MAMBA_FAMILIES[model_type]
    fn = getattr(importlib.import_module(modname), fn_name)
    fn = mamba_ssd._ORIGINAL.get((modname, fn_name), fn)  # under moe_patch: what stock had
    return "mamba-ssm" if mamba_ssd.stock_uses_package(fn) else "pytorch"


def active_params(model, config) -> float:
    """Matmul parameters a token goes through: everything but embeddings, experts scaled by top_k / E."""
    total = 0.0
    for name, p in model.named_parameters():
        if "embed" in name:
            continue
        if p.dim() == 3:  # fused experts [E, ...]
            total += p.numel() * config.num_experts_per_tok / p.shape[0]
        else:
            total += p.numel()
    return total


def attention_flops_per_token(config, seq) -> float:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    # QK^T and PV: 2 matmuls x 2 flops x seq x (heads x head_dim); causal halves it; training = 3x forward
    return 3 * 2 * 2 * seq * heads * head_dim * config.num_hidden_layers / 2


def child(args) -> dict:
    if args.child == "stock-nomamba":  # before Transformers is imported: it looks the libraries up at import
        for name in MAMBA_LIBRARIES:
            sys.modules[name] = None  # `import mamba_ssm` raises ImportError
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from moe_patch.shapes import named_config
    from steps import format_timeline, largest_fitting_batch, layer_timeline, profile_step, timed_steps

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = named_config(args.shape, layers=args.layers)
    attn = BEST_ATTENTION.get(config.model_type) if args.child == "stock-best" else None
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                 **({"attn_implementation": attn} if attn else {}))
    info = {"attention": model.config._attn_implementation, "shape": args.shape, "layers": args.layers,
            "batch": args.batch, "scan": scan_in_use(config.model_type)}
    if args.child.startswith("patched"):
        import moe_patch

        backend = {"patched-torch": "torch", "patched-torchloss": {"loss": "torch"},
                   "patched-ligerloss": {"loss": "liger"}, "patched-telinear": {"linear": "te"},
                   "patched-torchrouter": {"router": "torch"}, "patched-ligernorm": {"rmsnorm": "liger"},
                   "patched-tenorm": {"rmsnorm": "te"}}.get(args.child, "auto")
        fp8 = args.child.split("patched-fp8-")[1].split("-")[0] if args.child.startswith("patched-fp8-") else None
        if args.child.endswith("-experts"):
            os.environ["MOE_PATCH_FP8_EXPERTS"] = "1"
        if args.child == "patched-tuned":
            os.environ["MOE_PATCH_TUNED_GEMM"] = "1"
            if args.tune_search:
                from grouped_gemm import narrow_search

                narrow_search(args.tune_search)
        if args.child.endswith("-percall"):
            from moe_patch.ops.te import TELinear

            TELinear.reuse_fp8_weights = False
        import time

        start = time.perf_counter()
        moe_patch.apply(model, backend=backend, loss=args.child != "patched-noloss", fp8=fp8)
        info["apply_s"] = time.perf_counter() - start  # the plan-time proofs (and their compiles) included
        if args.child == "patched-compiledce":
            model.forward.step = "compiled"
        info["report"] = moe_patch.report(model).summary()
        info["attention_rows"] = sorted({f"{r.status}: {r.replacement or r.reason}"
                                         for r in moe_patch.report(model).where(kind="attention")})
        info["experts_rows"] = sorted({f"{r.status}: {r.replacement or ''} {r.reason}".strip()
                                       for r in moe_patch.report(model).where(kind="experts")})
        info["mamba_rows"] = sorted({f"{r.status}: {r.replacement} {r.reason}".strip()
                                     for r in moe_patch.report(model).where(kind="mamba")} |
                                    {f"{r.status}: {r.replacement} {r.reason}".strip()  # the mixers' gated norms
                                     for r in moe_patch.report(model).where(kind="rmsnorm") if "Gated" in r.original})
        info["mlp_rows"] = sorted({f"{r.status}: {r.replacement} {r.reason}".strip()
                                   for r in moe_patch.report(model).where(kind="mlp")})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    shape = (args.batch, args.seq) if args.grad_accum == 1 else (args.grad_accum, args.batch, args.seq)
    ids = torch.randint(0, config.vocab_size, shape, device="cuda", generator=g)
    t = timed_steps(model, opt, ids, args.warmup, args.steps, args.sync_phases, args.grad_accum)
    total = t.pop("step_s")
    tokens = args.grad_accum * args.batch * args.seq
    info["grad_accum"] = args.grad_accum
    if args.profile:  # one more step under the profiler: where the GPU time goes
        ids = ids if args.grad_accum == 1 else ids[0]
        trace = f"{args.trace}.{args.child}.json" if args.trace else None
        print(profile_step(model, opt, ids, args.profile, trace), file=sys.stderr)
    if args.timeline:
        ids = ids if args.grad_accum == 1 else ids[0]
        info["timeline"] = layer_timeline(model, opt, ids, args.timeline)
        print(format_timeline(info["timeline"]), file=sys.stderr)
    if args.fit:  # last: the larger steps change the weights and the allocator's state
        info["fits_batch"] = largest_fitting_batch(model, opt, config.vocab_size, args.seq, args.batch,
                                                   args.fit * args.batch)
    flops = (6 * active_params(model, config) + attention_flops_per_token(config, args.seq)) * tokens
    if args.child.startswith("patched") and config.model_type in MAMBA_FAMILIES:
        from moe_patch.ops import mamba_ssd

        info["scan"] = f"mamba-ssm ({mamba_ssd.CALLS['kernel']} calls)" if mamba_ssd.CALLS["kernel"] else info["scan"]
        info["mamba_fallbacks"] = dict(mamba_ssd.FALLBACKS)  # scan calls that ran the family's own scan, by reason
        from moe_patch.ops import gated_rmsnorm

        info["gated_norm_calls"] = gated_rmsnorm.CALLS["kernel"]  # the mixers' gated norms on mamba-ssm's kernel
        info["mamba_fallbacks"].update({f"gated norm: {k}": v for k, v in gated_rmsnorm.FALLBACKS.items()})
        info["proof_errors"] = {str(k): v for k, v in {**mamba_ssd.ERRORS, **gated_rmsnorm.ERRORS}.items()}
    if args.child.startswith("patched"):
        from moe_patch.ops import mla

        info["mla_fallbacks"] = dict(mla.FALLBACKS)  # MLA attention calls that ran the family's forward, by reason
    return dict(variant=args.child, tokens_per_s=tokens / total, tflops=flops / total / 1e12,
                gpu=torch.cuda.get_device_name(), torch=torch.__version__, **t, **info)


def main():
    parser = argparse.ArgumentParser()
    add_step_arguments(parser, steps=10, warmup=3)
    parser.add_argument("--variants", default="stock,patched",
                        help="comma list; VARIANT@MB runs that variant at micro-batch MB instead of --batch")
    parser.add_argument("--png", default=None)
    parser.add_argument("--profile", type=int, default=0, help="print the top-N GPU kernels of one step")
    parser.add_argument("--trace", default=None,
                        help="with --profile: also write a Chrome trace of that step to TRACE.<variant>.json")
    parser.add_argument("--timeline", type=int, default=0,
                        help="N more steps with the host's and the GPU's time at each decoder layer's start (and its "
                             "attention / MLP), medians: where the GPU waits for the host (steps.layer_timeline)")
    parser.add_argument("--shapes", default=None,
                        help="'all' or a comma list of SWEEP's shapes: stock, stock-best, patched for each")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the variant list (with --shapes: each shape's) R times, interleaved (a, b, a, b, ...), "
                             "each run its own process; "
                             "each variant's row is its median-throughput run, with every run's tokens/s listed: a "
                             "difference smaller than the spread between one variant's runs is not a difference")
    parser.add_argument("--tune-search", type=int, default=0,
                        help="patched-tuned only: narrow inductor's grouped-GEMM search to N Triton configurations "
                             "(grouped_gemm.narrow_search: a private torch list, for a quicker first step; 0: torch's "
                             "own search, what a user gets)")
    parser.add_argument("--fit", type=int, default=0,
                        help="after the timed steps, find each variant's largest micro-batch up to FIT x --batch that "
                             "runs a training step (steps.largest_fitting_batch): the table's 'fits' column")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    if args.shapes:
        sweep(args)
        return
    # VARIANT@MB runs that variant at micro-batch MB (each system at its largest fitting micro-batch)
    runs = []  # (variant as given, result), in run order
    for _ in range(max(1, args.rounds)):
        for v in args.variants.split(","):
            runs.append((v, run_child(v.split("@")[0], ["--batch", v.split("@")[1]] if "@" in v else [])))
            print(json.dumps({k: runs[-1][1].get(k) for k in ("variant", "tokens_per_s", "peak_gib", "error")}),
                  flush=True)
            results = median_runs(runs)
            write_results(args, [{k: x for k, x in r.items() if k != "stderr"} for r in results])  # a run cut short
            # keeps what it measured
    if args.profile or args.timeline:
        what = " and ".join(w for w, on in (("GPU kernels of one step", args.profile),
                                            ("host / GPU timeline", args.timeline)) if on)
        for r in results:
            print(f"--- {r['variant']}: {what}\n" + r.pop("stderr", ""))
    print_table(results, args)
    write_results(args, [{k: v for k, v in r.items() if k != "stderr"} for r in results], chart)


def median_runs(runs: list) -> list:
    """[(variant as given, result)] in run order -> one result per variant, in first-seen order: the run with the
    median tokens/s (the lower middle one of an even count), with `round_tokens_per_s` (every successful run's, in
    run order); a variant with no successful run keeps its last failed result."""
    order = list(dict.fromkeys(v for v, _ in runs))
    out = []
    for v in order:
        mine = [r for name, r in runs if name == v]
        ok = [r for r in mine if "error" not in r]
        if not ok:
            out.append(mine[-1])
            continue
        ranked = sorted(ok, key=lambda r: r["tokens_per_s"])
        out.append(dict(ranked[(len(ranked) - 1) // 2], round_tokens_per_s=[r["tokens_per_s"] for r in ok]))
    return out


def run_child(variant: str, extra: list) -> dict:
    """One variant in its own process (a fresh CUDA context and allocator); extra overrides the arguments."""
    cmd = [sys.executable, __file__, *sys.argv[1:], *extra, "--child", variant]
    env = dict(os.environ, **VARIANT_ENV.get(variant, {}))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        print(f"{variant}: failed\n{out.stderr[-4000:]}", file=sys.stderr)
        return dict(variant=variant, error=out.stderr[-2000:])
    return dict(json.loads(line[0][7:]), stderr=out.stderr[-12000:])


def sweep(args):
    from moe_patch.shapes import NAMED

    names = list(SWEEP) if args.shapes == "all" else args.shapes.split(",")
    results = []  # one row per (shape, variant): its median run over the rounds
    for name in names:
        layers, batch = SWEEP[name]
        model_type = NAMED[name][0]
        variants = (["stock-nomamba"] if model_type in MAMBA_FAMILIES and mamba_installed() else []) + ["stock"] + \
            (["stock-best"] if model_type in BEST_ATTENTION else []) + ["patched"]
        runs = []  # this shape's runs, interleaved over the rounds (a, b, c, a, b, c, ...)
        for round_ in range(max(1, args.rounds)):
            for variant in variants:
                extra = ["--shape", name, "--layers", str(layers), "--batch", str(batch)]
                if variant != "patched" or round_:
                    extra += ["--profile", "0"]  # --profile: where the patched step's time goes (its first run)
                if round_:
                    extra += ["--fit", "0"]  # the largest micro-batch: found in the first round
                r = run_child(variant, extra)
                r.setdefault("shape", name)
                profile = r.pop("stderr", "")
                runs.append((variant, r))
                print(json.dumps({k: r.get(k) for k in ("shape", "variant", "tokens_per_s", "peak_gib", "fits_batch",
                                                        "error")}), flush=True)
                if args.profile and variant == "patched" and not round_ and "error" not in r:
                    print(f"--- {name} {variant}: GPU kernels of one step\n{profile}", flush=True)
                shape_rows = median_runs(runs)
                for row in shape_rows:  # the fit ran in the first round only
                    first = next((x for v, x in runs if v == row["variant"]), {})
                    if "fits_batch" in first:
                        row["fits_batch"] = first["fits_batch"]
                write_results(args, results + shape_rows)  # after every child: a run cut short keeps what it measured
        results += shape_rows
    print_sweep(results, args)
    write_results(args, results, sweep_chart)


def print_sweep(results, args):
    ok = [r for r in results if "error" not in r]
    print(f"\nseq {args.seq}, bf16, fused AdamW, {args.steps} timed steps after {args.warmup} "
          f"({ok[0]['gpu'] if ok else '?'}); speed-up and memory against stock's best attention for the family")
    head = f"{'shape (layers)':<28} {'mb':>3} {'variant':<13} {'attention':<15} {'scan':<10} {'tokens/s':>9} " \
           f"{'TFLOP/s':>8} {'peak GiB':>9} {'speed-up':>8} {'memory':>7} {'vs default':>10} {'fits mb':>7}"
    print(head + "\n" + "-" * len(head))
    for r in results:
        same = [x for x in ok if x["shape"] == r["shape"]]
        default = next((x for x in same if x["variant"] == "stock"), None)
        best = next((x for x in same if x["variant"] == "stock-best"), default)
        label = f"{r['shape']} ({r.get('layers', SWEEP[r['shape']][0])})"
        if "error" in r:
            print(f"{label:<28} {'':>3} {r['variant']:<13} FAILED (see stderr)")
            continue
        up = r["tokens_per_s"] / best["tokens_per_s"] if best else float("nan")
        mem = r["peak_gib"] / best["peak_gib"] if best else float("nan")
        vs_default = r["tokens_per_s"] / default["tokens_per_s"] if default else float("nan")
        scan = (r.get("scan") or "-").split(" (")[0]
        fits = r.get("fits_batch")
        fits = "" if fits is None else f"{'>=' if fits == args.fit * r['batch'] else ''}{fits}"
        print(f"{label:<28} {r['batch']:>3} {r['variant']:<13} {r['attention']:<15} {scan:<10} "
              f"{r['tokens_per_s']:>9,.0f} {r['tflops']:>8.0f} {r['peak_gib']:>9.1f} {up:>7.2f}x {mem:>6.2f}x "
              f"{vs_default:>9.2f}x {fits:>7}")
    for r in ok:
        rounds = r.get("round_tokens_per_s", [])
        if len(rounds) > 1:
            print(f"{r['shape']:<22} {r['variant']:<13} runs " + ", ".join(f"{x:,.0f}" for x in rounds) +
                  f" tokens/s (spread {max(rounds) / min(rounds) - 1:.1%}; the row is the median run)")
    for r in ok:
        stock = next((x for x in ok if x["shape"] == r["shape"] and x["variant"] == "stock"), None)
        diff = f"  (max |loss - stock| over {len(r['losses'])} steps: " \
               f"{max(abs(a - b) for a, b in zip(r['losses'], stock['losses'])):.1e})" if stock and r is not stock else ""
        print(f"{r['shape']:<22} {r['variant']:<13} loss " + " ".join(f"{x:.4f}" for x in r["losses"][:8]) + diff)
    for r in ok:
        if r.get("mamba_rows"):
            print(f"{r['shape']:<22} mamba: " + "; ".join(r["mamba_rows"])[:600]
                  + (f"; gated norm kernel calls {r['gated_norm_calls']}" if "gated_norm_calls" in r else "")
                  + (f"; fallbacks {r['mamba_fallbacks']}" if r.get("mamba_fallbacks") else ""))
    for r in ok:
        if r.get("attention_rows"):
            print(f"{r['shape']:<22} attention: " + "; ".join(r["attention_rows"])[:300]
                  + (f"; MLA calls on the family's forward: {r['mla_fallbacks']}" if r.get("mla_fallbacks") else ""))
        if r.get("experts_rows"):
            print(f"{r['shape']:<22} experts: " + "; ".join(r["experts_rows"])[:300])
        if r.get("mlp_rows"):
            print(f"{r['shape']:<22} mlp: " + "; ".join(r["mlp_rows"])[:300])


def sweep_chart(results, path):
    from steps import bar_charts

    ok = [r for r in results if "error" not in r]
    short = {"qwen3-30b-a3b": "qwen3", "deepseek-v3-style": "dsv3", "nemotron-3-nano-style": "nemo-h",
             "gpt-oss-20b": "gpt-oss"}
    bar_charts(path, [f"{short.get(r['shape'], r['shape'])}\n{r['variant'].replace('stock-best', 'best')}" for r in ok],
               [("tokens/s", [r["tokens_per_s"] for r in ok]), ("peak GiB", [r["peak_gib"] for r in ok])])


def print_table(results, args):
    ok = [r for r in results if "error" not in r]
    # speed-up against stock's default; against stock's best attention where only that stock row ran
    base = next((r for r in ok if r["variant"] == "stock"), None) or \
        next((r for r in ok if r["variant"] == "stock-best"), None)
    print(f"\n{args.shape}, {args.layers} layers, seq {args.seq}, micro-batch {args.batch}, grad-accum "
          f"{args.grad_accum}, bf16 master weights, fused AdamW"
          f" ({ok[0]['gpu'] if ok else '?'})" + (f"; speed-up and memory against {base['variant']}" if base else ""))
    head = f"{'variant':<27} {'mb':>3} {'tokens/s':>9} {'TFLOP/s':>8} {'peak GiB':>9} {'fwd ms':>7} {'bwd ms':>7} " \
           f"{'optim ms':>8} {'speed-up':>8} {'memory':>7}"
    print(head + "\n" + "-" * len(head))
    for r in ok:
        up = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        mem = r["peak_gib"] / base["peak_gib"] if base else float("nan")
        print(f"{r['variant']:<27} {r['batch']:>3} {r['tokens_per_s']:>9,.0f} {r['tflops']:>8.0f} {r['peak_gib']:>9.1f} "
              f"{r['fwd_ms']:>7.1f} {r['bwd_ms']:>7.1f} {r['optim_ms']:>8.1f} {up:>7.2f}x {mem:>6.2f}x")
    for r in ok:
        rounds = r.get("round_tokens_per_s", [])
        if len(rounds) > 1:
            spread = max(rounds) / min(rounds) - 1
            print(f"{r['variant']:<27} runs " + ", ".join(f"{x:,.0f}" for x in rounds) + f" tokens/s (spread "
                  f"{spread:.1%}; the row is the median run)")
    for r in ok:
        print(f"{r['variant']:<27} loss " + " ".join(f"{x:.4f}" for x in r["losses"][:8]))
    for r in ok:
        if r.get("experts_rows"):
            print(f"{r['variant']:<27} experts: " + "; ".join(r["experts_rows"])[:300]
                  + (f" (apply() {r['apply_s']:.0f} s)" if "apply_s" in r else ""))
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<27} FAILED (see stderr)")


def chart(results, path):
    from steps import bar_charts

    ok = [r for r in results if "error" not in r]
    bar_charts(path, [r["variant"] for r in ok],
               [("tokens/s", [r["tokens_per_s"] for r in ok]), ("peak GiB", [r["peak_gib"] for r in ok])])


if __name__ == "__main__":
    main()
