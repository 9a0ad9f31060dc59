"""One Hugging Face Trainer script on several GPUs: stock FSDP2 against moe_patch expert parallelism from the
launcher (MOE_PATCH=1 MOE_PATCH_EP=<gpus>, Trainer's own DDP), each variant in its own torchrun job.

    python benchmarks/trainer_ep.py --gpus 2 --shape qwen3-30b-a3b --layers 8 --batch 4 --seq 4096 --json out.json
    python benchmarks/trainer_ep.py --device cpu --shape tiny:qwen3_moe --layers 2 --seq 16 --steps 2  # smoke test

The training script (child mode below) is the same for both: a Qwen3-MoE-shaped model of random bf16 weights
(from_config), random tokens, Trainer with fused AdamW, max_grad_norm 1.0 and no checkpointing; only the
launch differs (stock_fsdp: `fsdp="full_shard"`, FSDP2 through accelerate; moe_patch_ep: the environment).
Prints tokens/s per GPU (median step time after --warmup steps, rank 0's clock after a device synchronise)
and the logged losses; --json keeps them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("stock_fsdp", "moe_patch_ep")


def child(args):
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from moe_patch.shapes import named_config, tiny_config

    cuda = args.device == "cuda"
    if cuda:  # before the model is built on the GPU: each rank its own
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    config = (tiny_config(args.shape[5:], num_hidden_layers=args.layers) if args.shape.startswith("tiny:")
              else named_config(args.shape, layers=args.layers))
    dtype = torch.bfloat16 if cuda else torch.float32
    world = int(os.environ.get("WORLD_SIZE", "1"))
    extra = {}
    if args.variant == "stock_fsdp":
        extra = dict(fsdp="full_shard", fsdp_config={"version": 2, "reshard_after_forward": True})
    training = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
        learning_rate=1e-5, max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=not cuda, optim="adamw_torch_fused" if cuda else "adamw_torch", seed=0, disable_tqdm=True,
        dataloader_num_workers=0, **extra)
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # MOE_PATCH=1 patches (and shards) here

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return args.batch * world * (args.warmup + args.steps)

        def __getitem__(self, i):
            ids = torch.randint(0, config.vocab_size, (args.seq,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    class Clock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    clock = Clock()
    trainer = Trainer(model=model, args=training, train_dataset=Tokens(), callbacks=[clock])
    trainer.train()
    if trainer.is_world_process_zero():
        steps = [b - a for a, b in zip(clock.times[args.warmup - 1:], clock.times[args.warmup:])]
        step_s = statistics.median(steps)
        experts = getattr(model, "_moe_patch", None)
        result = dict(variant=args.variant, gpus=world, step_ms=round(step_s * 1e3, 1),
                      tokens_per_s_per_gpu=round(args.batch * args.seq / step_s),
                      peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
                      losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
                      dispatcher=experts.sharded[0].dispatcher.name if experts and experts.sharded else None)
        with open(args.out, "w") as f:
            json.dump(result, f)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--shape", default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", default=None)
    parser.add_argument("--timeout", type=int, default=1200)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.device == "cpu" and args.variants == ",".join(VARIANTS):
        args.variants = "moe_patch_ep"  # accelerate runs FSDP on GPUs only
    results = []
    for variant in args.variants.split(","):
        out = tempfile.mktemp(suffix=".json")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_PATCH")}
        if variant == "moe_patch_ep":
            env.update(MOE_PATCH="1", MOE_PATCH_EP=str(args.gpus))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.gpus),
               os.path.abspath(__file__), "--child", "--variant", variant, "--out", out, "--device", args.device,
               "--shape", args.shape, "--layers", str(args.layers), "--batch", str(args.batch), "--seq",
               str(args.seq), "--warmup", str(args.warmup), "--steps", str(args.steps)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if done.returncode or not os.path.exists(out):
            print(f"{variant}: failed\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}", flush=True)
            continue
        with open(out) as f:
            results.append(json.load(f))
    base = next((r for r in results if r["variant"] == "stock_fsdp"), None)
    print(f"| variant | GPUs | tokens/s per GPU | step ms | peak GiB | dispatcher | vs stock FSDP2 | losses |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.2f}x" if base else "-"
        losses = ", ".join(f"{x:.4f}" for x in r["losses"][:3])
        print(f"| {r['variant']} | {r['gpus']} | {r['tokens_per_s_per_gpu']:,} | {r['step_ms']} | {r['peak_gib']} | "
              f"{r['dispatcher'] or '-'} | {ratio} | {losses} ... |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), results=results), f, indent=1)


if __name__ == "__main__":
    main()
