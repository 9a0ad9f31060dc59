"""Per-kind timings: each replaced module against the stock one, at the model's real shapes (one GPU).

    python benchmarks/kind_timing.py --shape qwen3-30b-a3b --seq 4096 --batch 4 --json kinds.json

Builds a one-layer model of the shape, records every module's real inputs during one stock forward,
then times forward + backward of the stock module and of its replacement on those inputs (median of
--repeats, CUDA events). Attention compares the stock kernel choice with moe_patch's.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch


def time_module(module, args, kwargs, repeats):
    from moe_patch.verify import run_module

    for _ in range(3):
        run_module(module, args, kwargs)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run_module(module, args, kwargs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-30b-a3b")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import moe_patch
    from moe_patch.shapes import named_config
    from moe_patch.verify import record_inputs
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = named_config(args.shape, layers=1)
    with torch.device("cuda"):
        stock = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    patched = moe_patch.apply(copy.deepcopy(stock), backend=args.backend)
    rows, seen = [], set()
    for r in moe_patch.report(patched):
        if r.status != "skipped" and r.path and (r.kind, r.original) not in seen:
            seen.add((r.kind, r.original))  # one row per kind and class: the others have the same shapes
            rows.append(r)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device="cuda")
    captured = record_inputs(stock, [r.path for r in rows], input_ids=ids)
    stock_modules, patched_modules = dict(stock.named_modules()), dict(patched.named_modules())
    print(f"{args.shape}, seq {args.seq}, micro-batch {args.batch}, bf16, fwd+bwd per call "
          f"({torch.cuda.get_device_name()})")
    print(f"{'kind':<10} {'module':<26} {'replacement':<44} {'stock ms':>9} {'patched ms':>10} {'speed-up':>8}")
    results = []
    for r in rows:
        a, kw = captured[r.path]
        t_stock = time_module(stock_modules[r.path], a, kw, args.repeats)
        t_new = time_module(patched_modules[r.path], a, kw, args.repeats)
        results.append(dict(kind=r.kind, path=r.path, original=r.original, replacement=r.replacement,
                            stock_ms=t_stock, patched_ms=t_new))
        print(f"{r.kind:<10} {r.original[:26]:<26} {r.replacement[:44]:<44} {t_stock:>9.3f} {t_new:>10.3f} "
              f"{t_stock / t_new:>7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), gpu=torch.cuda.get_device_name(), rows=results), f, indent=1)


if __name__ == "__main__":
    main()
