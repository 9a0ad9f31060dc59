"""How long apply() takes (plan + choose + swap) on a full-size model built on the meta device.

    python benchmarks/apply_time.py --shape qwen3-30b-a3b --json apply_time.json
"""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

import moe_patch
from moe_patch.shapes import NAMED, named_config


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(NAMED))
    parser.add_argument("--layers", type=int, default=None, help="default: the real depth")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    rows = []
    for i in range(args.repeats):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(named_config(args.shape, layers=args.layers))
        t0 = time.perf_counter()
        moe_patch.apply(model)
        elapsed = time.perf_counter() - t0
        rep = moe_patch.report(model)
        rows.append(dict(run=i, seconds=elapsed, modules=len(rep), patched=len(rep) - len(rep.where(status="skipped"))))
    print(f"{'run':>3}  {'apply s':>8}  {'rows':>5}  {'swapped':>7}   ({args.shape}, {model.config.num_hidden_layers} layers,"
          f" meta device; run 0 includes the one-off per-class probes)")
    for r in rows:
        print(f"{r['run']:>3}  {r['seconds']:>8.3f}  {r['modules']:>5}  {r['patched']:>7}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=args.shape, layers=model.config.num_hidden_layers, runs=rows), f, indent=1)


if __name__ == "__main__":
    main()
