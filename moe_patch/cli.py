"""`moe-patch` (also `python -m moe_patch`).

  moe-patch env                      what this machine offers (paste it into bug reports)
  moe-patch report <dir | config.json | model_type> [--backend B] [--disable K,..] [--skip GLOB,..]
                                     build the model on the meta device and print what apply() would do
  moe-patch demo [--model-type T] [--steps N]
                                     tiny random MoE: patch it, print the report, train a few steps
"""
from __future__ import annotations

import argparse
import os
import sys


def _config_for(target: str):
    from transformers import AutoConfig

    if os.path.isdir(target) or target.endswith(".json"):
        path = os.path.dirname(target) if target.endswith(".json") else target
        return AutoConfig.from_pretrained(path)
    return AutoConfig.for_model(target)


def cmd_env(args) -> int:
    from .backends import capabilities

    print(capabilities())
    return 0


def cmd_report(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from . import plan_report

    config = _config_for(args.target)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    flags = {k: False for k in (args.disable.split(",") if args.disable else [])}
    from .config import parse_backend

    skip = tuple(args.skip.split(",")) if args.skip else ()
    rows = plan_report(model, backend=parse_backend(args.backend, "--backend"), skip=skip, **flags)
    print(f"{type(model).__name__} ({config.model_type}), planned on meta; nothing was changed\n")
    print(rows if args.all else _without_linear(rows))
    return 0


def _without_linear(rows):
    from .records import Report

    kept = [r for r in rows if r.kind != "linear"]
    linear = len(rows) - len(kept)
    text = str(Report(kept))
    return text + (f"\n({linear} nn.Linear rows hidden; --all shows them)" if linear else "")


def cmd_demo(args) -> int:
    import copy
    import time

    import torch
    from transformers import AutoModelForCausalLM

    import moe_patch
    from moe_patch.shapes import tiny_config

    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(tiny_config(args.model_type))
    model = moe_patch.apply(copy.deepcopy(stock))
    print(moe_patch.report(model).summary(), "\n")
    print(_without_linear(moe_patch.report(model)), "\n")
    ids = torch.randint(0, stock.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    for name, m in (("stock", stock), ("moe_patch", model)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        t0, losses = time.perf_counter(), []
        for _ in range(args.steps):
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        print(f"{name:>9}: loss " + " ".join(f"{x:.4f}" for x in losses) + f"   ({time.perf_counter() - t0:.2f}s)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moe-patch", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="what this machine offers").set_defaults(fn=cmd_env)
    rep = sub.add_parser("report", help="plan a model on the meta device and print the report")
    rep.add_argument("target", help="model directory, config.json or model_type (e.g. qwen3_moe)")
    rep.add_argument("--backend", default="auto", help="auto | torch | te | liger, or per kind: loss=torch,experts=te")
    rep.add_argument("--disable", default="", help="comma-separated kinds to leave alone")
    rep.add_argument("--skip", default="", help="comma-separated module-path globs to leave alone")
    rep.add_argument("--all", action="store_true", help="also list every nn.Linear")
    rep.set_defaults(fn=cmd_report)
    demo = sub.add_parser("demo", help="patch a tiny random MoE and train a few steps")
    demo.add_argument("--model-type", default="qwen3_moe")
    demo.add_argument("--steps", type=int, default=5)
    demo.set_defaults(fn=cmd_demo)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except Exception as exc:
        from .errors import PatchError

        if isinstance(exc, PatchError):
            print(f"moe-patch: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
