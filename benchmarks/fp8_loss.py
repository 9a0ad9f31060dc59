"""FP8 against bf16 training loss on real text (one GPU): the same model, the same initial weights, the same
batches, trained N steps by moe_patch in bf16 and by moe_patch under fp8= (TE's FP8 linear layers; with
--fp8-experts the FP8 experts too), the loss of every step logged, and the largest relative difference reported.

    python benchmarks/fp8_loss.py --shape qwen3-30b-a3b --layers 8 --seq 4096 --batch 1 --steps 300 \
        --fp8 current --json fp8_loss.json [--control]

--control adds a third run, stock Transformers in bf16 without moe_patch: both bf16 runs are valid and differ
only in how their kernels round, so their loss difference is the divergence any perturbation reaches in a
from-scratch run, the yardstick for the FP8 difference.

The text is this machine's Python standard library (its .py files in sorted order, read as bytes), tokenised
byte-level (token id = byte value, 0-255; the model's vocabulary is left as configured, its other rows are
never read), cut into consecutive windows of --seq tokens: real, structured text found on any machine with
Python, no download. AdamW (fused, lr --lr with a 10-step linear warm-up, weight decay 0.1), gradient norm
clipped to 1.0, bf16 master weights. Random initial weights (seed 0), so the run is a model learning the
corpus from scratch, where losses move fastest.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import sysconfig

from steps import add_shape_arguments, write_results


def corpus_ids(tokens: int) -> list:
    """The first `tokens` bytes of the standard library's .py sources (sorted paths), as token ids."""
    root = sysconfig.get_paths()["stdlib"]
    out = bytearray()
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        with open(path, "rb") as f:
            out += f.read()
        if len(out) >= tokens:
            break
    if len(out) < tokens:
        raise SystemExit(f"the standard library at {root} has only {len(out):,} bytes of .py source; "
                         f"{tokens:,} needed: fewer --steps or a smaller --seq")
    return list(out[:tokens])


def compare(bf16: list, fp8: list) -> dict:
    """Per step |fp8 - bf16| / bf16; the largest, the step where it is, and the mean."""
    rel = [abs(a - b) / abs(b) for a, b in zip(fp8, bf16)]
    worst = max(range(len(rel)), key=rel.__getitem__)
    return dict(rel_diff=rel, max_rel_diff=rel[worst], max_rel_diff_step=worst, mean_rel_diff=sum(rel) / len(rel))


def train(args, fp8, ids, patched: bool = True) -> list:
    """One from-scratch run: the loss of every step. patched=False: stock Transformers in bf16 (no apply())."""
    import torch
    from transformers import AutoModelForCausalLM

    import moe_patch
    from moe_patch.shapes import named_config

    torch.manual_seed(0)
    config = named_config(args.shape, layers=args.layers)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    label = f"fp8={fp8}" if patched else "stock"
    if patched:
        moe_patch.apply(model, fp8=fp8)
        rows = [r for r in moe_patch.report(model) if r.kind in ("experts", "linear") and r.status != "skipped"]
        print(f"fp8={fp8}: " + "; ".join(sorted({f'{r.kind}: {r.replacement}' for r in rows})), flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    model.train()
    losses = []
    per_step = args.batch * args.seq
    for step in range(args.steps):
        batch = ids[step * per_step:(step + 1) * per_step].view(args.batch, args.seq)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"{label} step {step:4d} loss {losses[-1]:.4f}", flush=True)
    del model, opt
    torch.cuda.empty_cache()
    return losses


def main():
    parser = argparse.ArgumentParser()
    add_shape_arguments(parser)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--fp8", default="current", help="the fp8= recipe of moe_patch.apply")
    parser.add_argument("--log-every", type=int, default=1)
    parser.add_argument("--fp8-experts", action="store_true",
                        help="the experts' grouped GEMMs in FP8 too (MOE_PATCH_FP8_EXPERTS=1; opt-in, see README)")
    parser.add_argument("--control", action="store_true",
                        help="also train stock Transformers in bf16 (no moe_patch) on the same batches: the loss "
                             "difference two valid bf16 runs reach (kernels that round differently), to read the "
                             "FP8 difference against")
    args = parser.parse_args()
    if args.fp8_experts:
        os.environ["MOE_PATCH_FP8_EXPERTS"] = "1"
    import torch

    if not torch.cuda.is_available():
        sys.exit("fp8_loss.py needs a CUDA GPU with FP8 (Hopper or newer)")
    ids = torch.tensor(corpus_ids(args.steps * args.batch * args.seq), device="cuda")
    bf16 = train(args, None, ids)
    fp8 = train(args, args.fp8, ids)
    result = dict(compare(bf16, fp8), bf16=bf16, fp8=fp8, gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    if args.control:
        stock = train(args, None, ids, patched=False)
        result.update(stock_bf16=stock, control=compare(bf16, stock))
    print(f"\n{args.shape}, {args.layers} layers, seq {args.seq}, batch {args.batch}, {args.steps} steps on the Python "
          f"standard library (byte tokens), fp8={args.fp8} against bf16 ({result['gpu']})")
    control = result.get("control")
    print(f"{'step':>5} {'bf16':>8} {'fp8':>8} {'rel diff':>9}" + (f" {'stock':>8} {'rel diff':>9}" if control else ""))
    marks = [args.steps - 1, result["max_rel_diff_step"]] + ([control["max_rel_diff_step"]] if control else [])
    for s in sorted(set(list(range(0, args.steps, max(1, args.steps // 10))) + marks)):
        print(f"{s:>5} {bf16[s]:>8.4f} {fp8[s]:>8.4f} {result['rel_diff'][s]:>9.2e}"
              + (f" {result['stock_bf16'][s]:>8.4f} {control['rel_diff'][s]:>9.2e}" if control else ""))
    print(f"max relative loss difference {result['max_rel_diff']:.2e} at step {result['max_rel_diff_step']}, "
          f"mean {result['mean_rel_diff']:.2e}")
    if control:
        print(f"control, stock bf16 against moe_patch bf16: max {control['max_rel_diff']:.2e} at step "
              f"{control['max_rel_diff_step']}, mean {control['mean_rel_diff']:.2e}")
    write_results(args, [result])


if __name__ == "__main__":
    main()
