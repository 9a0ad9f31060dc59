"""Multi-GPU training step: stock Transformers + FSDP2 vs moe_patch expert parallelism (+ FSDP2).

    torchrun --nproc_per_node 2 benchmarks/ep_train.py --mode stock_fsdp --json stock.json
    torchrun --nproc_per_node 2 benchmarks/ep_train.py --mode moe_patch_ep --json ep.json

Qwen3-MoE-shaped model (random weights, bf16, fused AdamW), each rank its own micro-batch of random
tokens. Prints tokens/s per GPU, peak memory, fwd / bwd / optimizer ms (medians over --steps), and for
moe_patch the tokens each expert received per layer in the last step (load balance).
"""
from __future__ import annotations

import argparse
import json
import os
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from steps import timed_steps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("stock_fsdp", "moe_patch_ep"), required=True)
    parser.add_argument("--shape", default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import moe_patch
    from moe_patch.parallel.fsdp import fully_shard_moe
    from moe_patch.shapes import named_config
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("ep",))
    torch.manual_seed(0)
    config = named_config(args.shape, layers=args.layers)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if args.mode == "moe_patch_ep":
        moe_patch.apply(model, mesh=mesh, backend=args.backend)
        fully_shard_moe(model, mesh)
    else:
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    g = torch.Generator(device="cuda").manual_seed(10 + rank)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device="cuda", generator=g)
    t = timed_steps(model, opt, ids, args.warmup, args.steps)
    losses = t["losses"]
    result = dict(mode=args.mode, gpus=world, tokens_per_s_per_gpu=args.batch * args.seq / t.pop("step_s"),
                  gpu=torch.cuda.get_device_name(), args=vars(args), **t)
    if args.mode == "moe_patch_ep":
        balance = []
        for module in model._moe_patch.sharded:
            counts = module.dispatcher.last_counts
            parts = [torch.empty_like(counts) for _ in range(world)]
            dist.all_gather(parts, counts)
            balance.append(torch.cat(parts).tolist())
        result["tokens_per_expert"] = balance
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        print(f"\n{args.mode}: {args.shape}, {args.layers} layers, seq {args.seq}, micro-batch {args.batch}/GPU, "
              f"{world} x {result['gpu']}")
        print(f"{'rank':>4} {'tokens/s/GPU':>13} {'peak GiB':>9} {'fwd ms':>7} {'bwd ms':>7} {'optim ms':>8}")
        for r, res in enumerate(gathered):
            print(f"{r:>4} {res['tokens_per_s_per_gpu']:>13,.0f} {res['peak_gib']:>9.1f} {res['fwd_ms']:>7.1f} "
                  f"{res['bwd_ms']:>7.1f} {res['optim_ms']:>8.1f}")
        if "tokens_per_expert" in result:
            for layer, counts in enumerate(result["tokens_per_expert"]):
                c = torch.tensor(counts, dtype=torch.float)
                print(f"layer {layer}: tokens/expert min {c.min():.0f} mean {c.mean():.0f} max {c.max():.0f} "
                      f"(max/mean {c.max() / c.mean():.2f})")
        print("loss", " ".join(f"{x:.4f}" for x in losses))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(ranks=gathered), f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
