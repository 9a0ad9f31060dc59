"""Per-kind timings: each replaced module against the stock one, at the model's real shapes (one GPU).

    python benchmarks/kind_timing.py --shape qwen3-30b-a3b --seq 4096 --batch 4 --json kinds.json

Builds a one-layer model of the shape, records every module's real inputs during one stock forward,
then times forward + backward of the stock module and of its replacement on those inputs (median of
--repeats, CUDA events). Attention compares the stock kernel choice with moe_patch's.

    python benchmarks/kind_timing.py --host        # host time per training-forward call instead

--host times what the host spends per training-forward call (autograd on), on a one-token batch so that
the GPU never bounds it: a training forward can be host-bound (CHANGELOG 0.5.0), and then this, not the
kernels, is what a replacement costs there. `--device cpu --shape tiny:qwen3_moe` runs it without a GPU.
"""
from __future__ import annotations

import argparse
import copy
import json

import torch

from steps import add_shape_arguments, median_cuda_ms


def time_module(module, args, kwargs, repeats):
    from moe_patch.verify import run_module

    return median_cuda_ms(lambda: run_module(module, args, kwargs), repeats)


def host_us(module, args, kwargs, repeats):
    """Host microseconds per training-forward call (inputs that are activations require grad, as in training)."""
    import time

    args = tuple(a.detach().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def call():
        module(*args, **kwargs)

    for _ in range(5):
        call()
    _sync(args)
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    _sync(args)
    return (time.perf_counter() - start) / repeats * 1e6


def _sync(args):
    if any(torch.is_tensor(a) and a.is_cuda for a in args):
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser()
    add_shape_arguments(parser)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--host", action="store_true", help="host us per training-forward call, one-token batch")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu (with --host: a smoke run)")
    args = parser.parse_args()
    if args.host:
        args.batch, args.seq, args.repeats = 1, 1, max(args.repeats, 300)

    import moe_patch
    from moe_patch.shapes import named_config
    from moe_patch.verify import record_inputs
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.shape.startswith("tiny:"):  # e.g. tiny:qwen3_moe
        from moe_patch.shapes import tiny_config

        config = tiny_config(args.shape[5:], num_hidden_layers=1)
    else:
        config = named_config(args.shape, layers=1)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with torch.device(args.device):
        stock = AutoModelForCausalLM.from_config(config, dtype=dtype)
    patched = moe_patch.apply(copy.deepcopy(stock), backend=args.backend)
    rows, seen = [], set()
    for r in moe_patch.report(patched):
        if r.status != "skipped" and r.path and (r.kind, r.original) not in seen:
            seen.add((r.kind, r.original))  # one row per kind and class: the others have the same shapes
            rows.append(r)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=args.device)
    captured = record_inputs(stock, [r.path for r in rows], input_ids=ids)
    stock_modules, patched_modules = dict(stock.named_modules()), dict(patched.named_modules())
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    what, unit = ("host time per training-forward call", "us") if args.host else ("fwd+bwd per call", "ms")
    print(f"{args.shape}, seq {args.seq}, micro-batch {args.batch}, {str(dtype)[6:]}, {what} ({device})")
    print(f"{'kind':<10} {'module':<26} {'replacement':<44} {'stock ' + unit:>9} {'patched ' + unit:>10} "
          f"{'speed-up':>8}")
    measure = host_us if args.host else time_module
    results = []
    for r in rows:
        if r.path not in captured:
            continue  # a module this forward did not reach
        a, kw = captured[r.path]
        t_stock = measure(stock_modules[r.path], a, kw, args.repeats)
        t_new = measure(patched_modules[r.path], a, kw, args.repeats)
        results.append(dict(kind=r.kind, path=r.path, original=r.original, replacement=r.replacement,
                            **{f"stock_{unit}": t_stock, f"patched_{unit}": t_new}))
        print(f"{r.kind:<10} {r.original[:26]:<26} {r.replacement[:44]:<44} {t_stock:>9.3f} {t_new:>10.3f} "
              f"{t_stock / t_new:>7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), device=device, rows=results), f, indent=1)


if __name__ == "__main__":
    main()
