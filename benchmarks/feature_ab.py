"""A/B of one moe_patch kernel choice in one process: the patched model with it, then without it (one GPU).

    python benchmarks/feature_ab.py --feature rope --shape qwen3-30b-a3b --layers 8 --batch 4 --json ab.json

Features: rope (Liger's fused RoPE: its switching hooks removed for B), gate (TE's fused SwiGLU in the
experts: the family's own gate for B). Same model, weights, optimizer and tokens for both halves, so the
difference is the feature (the optimizer state carries over; the second half runs after the first's
warm-up). Random weights, bf16, fused AdamW; prints tokens/s, fwd / bwd ms and peak GiB of each half.
"""
from __future__ import annotations

import argparse
import sys

from steps import add_step_arguments


def switch(model, feature: str):
    """(off, on) callables for the feature in this patched model, or None if the model does not use it."""
    record = model._moe_patch
    if feature == "rope":
        if not record.hooks:
            return None
        from moe_patch.ops import rope

        def off():
            for h in record.hooks:
                h.remove()

        def on():  # (from a clean state: the hooks apply() installed are removed first)
            off()
            record.hooks[:] = [h for m in record.attention_modules for h in rope.install(m)]
        return off, on
    experts = [m for _, _, m in record.swaps if getattr(m, "_fused_gate", None) is not None]
    if not experts:
        return None
    gates = [m._fused_gate for m in experts]

    def set_gates(values):
        for m, g in zip(experts, values):
            object.__setattr__(m, "_fused_gate", g)
    return (lambda: set_gates([None] * len(experts))), (lambda: set_gates(gates))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--feature", choices=("rope", "gate"), required=True)
    add_step_arguments(parser, steps=4, warmup=1)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import moe_patch
    from moe_patch.shapes import named_config
    from steps import timed_steps, write_results

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = named_config(args.shape, layers=args.layers)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    moe_patch.apply(model)
    toggles = switch(model, args.feature)
    if toggles is None:
        sys.exit(f"{args.feature}: not used by this patched model here (see moe_patch.report(model))")
    off, on = toggles
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    shape = (args.batch, args.seq) if args.grad_accum == 1 else (args.grad_accum, args.batch, args.seq)
    ids = torch.randint(0, config.vocab_size, shape, device="cuda")
    tokens = args.grad_accum * args.batch * args.seq
    rows = []
    for label, prepare in ((f"with {args.feature}", on), (f"without {args.feature}", off)):
        prepare()
        t = timed_steps(model, opt, ids, args.warmup, args.steps, args.sync_phases, args.grad_accum)
        rows.append(dict(variant=label, tokens_per_s=tokens / t.pop("step_s"), **t))
    print(f"\n{args.shape}, {args.layers} layers, seq {args.seq}, micro-batch {args.batch}, bf16 "
          f"({torch.cuda.get_device_name()})")
    for r in rows:
        print(f"{r['variant']:<16} {r['tokens_per_s']:>9,.0f} tokens/s  fwd {r['fwd_ms']:6.1f} ms  "
              f"bwd {r['bwd_ms']:6.1f} ms  peak {r['peak_gib']:5.1f} GiB")
    print(f"gain: {rows[0]['tokens_per_s'] / rows[1]['tokens_per_s'] - 1:+.1%}")
    write_results(args, rows)


if __name__ == "__main__":
    main()
