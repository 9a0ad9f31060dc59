"""Multi-GPU training step: stock Transformers + FSDP2, Transformers' own expert parallelism, and moe_patch
expert parallelism (+ FSDP2) with each dispatcher, each variant in its own torchrun job.

    python benchmarks/ep_train.py --gpus 2 --variants stock_fsdp,hf_ep,all_to_all,te_ep --json ep.json --png ep.png
    python benchmarks/ep_train.py --gpus 8 --ep 4 ...   # a ("dp_shard", "ep") = (2, 4) mesh for moe_patch

--ep N (default: every GPU) splits the experts over N ranks; with fewer than --gpus, moe_patch's variants run
on a 2-D ("dp_shard", "ep") mesh (FSDP2 shards each expert group over dp_shard) and hf_ep gets ep_size=N.

Qwen3-MoE-shaped model (random weights, bf16, fused AdamW), each rank its own micro-batch of random
tokens. Prints one table per GPU count: tokens/s per GPU, peak memory, fwd / bwd / optimizer ms (medians
over --steps, slowest rank), and for moe_patch the busiest expert against the mean (load balance); the
JSON also keeps rank 0's losses, comparable between variants.
hf_ep loads a saved copy of the random model with DistributedConfig(ep_size=N, fsdp_size=N)
(Transformers' expert parallelism only exists through from_pretrained); hf_ep+<dispatcher> (e.g. hf_ep+auto,
hf_ep+te_ep) loads it the same way and calls moe_patch.apply(model): moe_patch's expert parallelism and FSDP2
in place of Transformers' (moe_patch/parallel/distributed_config.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
MOE_PATCH_VARIANTS = ("all_to_all", "te_ep", "deepep", "auto")


def config_for(args):
    from moe_patch.shapes import named_config, tiny_config

    if args.shape.startswith("tiny:"):  # e.g. tiny:qwen3_moe, for a CPU smoke run of this script
        return tiny_config(args.shape[5:], num_hidden_layers=args.layers)
    return named_config(args.shape, layers=args.layers)


def build(args, mesh, world, device, dtype):
    import torch
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    import moe_patch
    from moe_patch.parallel.fsdp import fully_shard_moe

    torch.manual_seed(0)
    config = config_for(args)
    if args.variant.startswith("hf_ep"):
        from transformers.distributed import DistributedConfig

        model = AutoModelForCausalLM.from_pretrained(
            args.checkpoint, dtype=dtype,
            distributed_config=DistributedConfig(ep_size=ep_size(args, world), fsdp_size=world))
        if args.variant != "hf_ep":  # hf_ep+<dispatcher>: the same model, then moe_patch.apply(model)
            moe_patch.apply(model, backend=args.backend, dispatcher=args.variant.partition("+")[2])
        return model, config
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if args.variant == "stock_fsdp":
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        moe_patch.apply(model, mesh=mesh, backend=args.backend, dispatcher=args.variant)
        fully_shard_moe(model, mesh)
    return model, config


def ep_size(args, world: int) -> int:
    """The expert-parallel size of this run: --ep, or every rank."""
    ep = args.ep or world
    if world % ep:
        raise SystemExit(f"--ep {ep} does not divide the {world} GPUs of this run")
    return ep


def save_checkpoint(args):
    """The random model of this run, saved once (own process), for hf_ep's from_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda" if args.device == "cuda" else "cpu"):
        model = AutoModelForCausalLM.from_config(config_for(args), dtype=_dtype(args))
    model.save_pretrained(args.checkpoint)


def balance_routing(model):
    """Replace each router's expert choice by a uniformly random one (benchmark only): random weights route
    most tokens to a few experts, which trained routers (with their balancing loss) do not. The routing
    weights stay the router's own."""
    import torch

    def uniform(module, args, out):
        if not (isinstance(out, tuple) and len(out) == 3):
            raise SystemExit(f"--routing balanced: {type(module).__name__} does not return (logits, weights, "
                             "indices); not supported for this family")
        logits, weights, indices = out
        choice = torch.rand(indices.shape[0], logits.shape[-1], device=indices.device).argsort(dim=-1)
        return logits, weights, choice[:, :indices.shape[-1]].to(indices.dtype)

    routers = [m for n, m in model.named_modules() if n.endswith(".mlp.gate") or n.endswith(".mlp.router")]
    if not routers:
        raise SystemExit("--routing balanced: no router modules (…mlp.gate / …mlp.router) in this model")
    for m in routers:
        m.register_forward_hook(uniform)


def _dtype(args):
    import torch

    return torch.bfloat16 if args.device == "cuda" else torch.float32


def child(args):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers.utils import logging as hf_logging

    from steps import profile_step, timed_steps

    hf_logging.set_verbosity_error()
    if args.variant == "save":
        return save_checkpoint(args)
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    ep = ep_size(args, world)
    if ep == world or args.variant == "stock_fsdp" or args.variant.startswith("hf_ep"):
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("ep",))
    else:
        mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("dp_shard", "ep"))
    model, config = build(args, mesh, world, device, _dtype(args))
    model.train()  # as a training script does (from_pretrained returns eval mode: stock loss, logits built)
    if args.routing == "balanced":
        balance_routing(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    g = torch.Generator(device=device).manual_seed(10 + rank)
    shape = (args.batch, args.seq) if args.grad_accum == 1 else (args.grad_accum, args.batch, args.seq)
    ids = torch.randint(0, config.vocab_size, shape, device=device, generator=g)
    t = timed_steps(model, opt, ids, args.warmup, args.steps, args.sync_phases, args.grad_accum)
    t["tokens_per_s_per_gpu"] = args.grad_accum * args.batch * args.seq / t.pop("step_s")
    t["grad_accum"] = args.grad_accum
    if args.profile and cuda:  # every rank steps (collectives); rank 0's kernels are kept
        table = profile_step(model, opt, ids if args.grad_accum == 1 else ids[0], args.profile)
        if rank == 0:
            t["profile"] = table
    if getattr(model, "_moe_patch", None) is not None:
        ratios = []
        for module in model._moe_patch.sharded:
            counts = module.dispatcher.last_counts.float()
            parts = [torch.empty_like(counts) for _ in range(world)]
            dist.all_gather(parts, counts)  # on a 2-D mesh each ep group's counts appear dp_shard times
            c = torch.cat(parts)
            ratios.append(round((c.max() / c.mean()).item(), 2))
        t["busiest_expert_over_mean"] = ratios
        t["dispatcher"] = model._moe_patch.sharded[0].dispatcher.name
    gathered = [None] * world
    dist.all_gather_object(gathered, t)
    if rank == 0:
        # timings of the slowest rank; losses of rank 0 for every variant (each rank has its own data)
        slowest = dict(min(gathered, key=lambda r: r["tokens_per_s_per_gpu"]), profile=t.get("profile"),
                       losses=gathered[0]["losses"])
        slowest.update(variant=args.variant, gpus=world, ep=ep, gpu=torch.cuda.get_device_name() if cuda else "CPU",
                       peak_gib=max(r["peak_gib"] for r in gathered))
        with open(args.out, "w") as f:
            json.dump(slowest, f)
    dist.barrier()  # every rank done with its collectives before any tears the group down
    dist.destroy_process_group()
    # skip the interpreter's teardown: on CPU (gloo + FSDP2) it aborts now and then in a C++ thread destructor
    # ("terminate called without an active exception") after all the work above is done
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def run_child(cmd, out, timeout):
    """One torchrun job in its own session, so a timeout kills its workers too (they hold the GPUs)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        return f"timed out after {timeout} s"
    if proc.returncode == 0 and os.path.exists(out):
        return None
    with open(out + ".stderr", "w") as f:
        f.write(err)
    errors = [x for x in err.splitlines() if re.search(r"\w+(Error|Exception): ", x)]
    first = [x for x in errors if x.startswith("[rank")][:1] or errors[-1:] or err.splitlines()[-1:] or ["no output"]
    return first[0][:300] + f" (full log: {out}.stderr)"


def main():
    from steps import add_step_arguments

    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="stock_fsdp,hf_ep,all_to_all,te_ep",
                        help="stock_fsdp, hf_ep, a moe_patch dispatcher (" + ", ".join(MOE_PATCH_VARIANTS) + "), or "
                        "hf_ep+<dispatcher>: a DistributedConfig(ep_size) model taken over by moe_patch.apply")
    parser.add_argument("--gpus", default="2", help="comma-separated GPU counts")
    parser.add_argument("--ep", type=int, default=0,
                        help="expert-parallel size (default: every GPU); smaller: a (dp_shard, ep) mesh")
    add_step_arguments(parser, steps=8, warmup=3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--routing", choices=("model", "balanced"), default="model",
                        help="balanced: uniformly random expert choice, as trained routers roughly give")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: gloo processes in fp32, to smoke-test this script (no meaningful timings)")
    parser.add_argument("--png", default=None)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per variant")
    parser.add_argument("--error-dir", default=None, help="folder for the stderr of failed variants")
    parser.add_argument("--profile", type=int, default=0,
                        help="print the top-N GPU kernels of one step and where its GPU time goes (rank 0)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return child(args)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = args.variants.split(",")
        if any(v.startswith("hf_ep") for v in variants):
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", "save",
                            "--checkpoint", os.path.join(tmp, "model")], check=True)
        for gpus in map(int, args.gpus.split(",")):
            for variant in variants:
                out = os.path.join(tmp, f"{variant}-{gpus}.json")
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
                       __file__, *sys.argv[1:], "--variant", variant, "--out", out,
                       "--checkpoint", os.path.join(tmp, "model")]
                error = run_child(cmd, out, args.timeout)
                if error and args.error_dir and os.path.exists(out + ".stderr"):
                    os.makedirs(args.error_dir, exist_ok=True)
                    shutil.copy(out + ".stderr", args.error_dir)
                results.append(dict(variant=variant, gpus=gpus, error=error) if error else json.load(open(out)))
                profile = results[-1].pop("profile", None)
                print(f"done: {results[-1]}", flush=True)
                if profile:
                    print(f"--- {variant}, {gpus} GPUs: GPU kernels of one step on rank 0\n{profile}", flush=True)
    print_tables(results, args)
    from steps import write_results

    write_results(args, results, chart)


def print_tables(results, args):
    dtype = "bf16" if args.device == "cuda" else "fp32 (CPU smoke run: timings mean nothing)"
    print(f"\n{args.shape}, {args.layers} layers, seq {args.seq}, micro-batch {args.batch} per GPU, grad-accum "
          f"{args.grad_accum}, {dtype}")
    for gpus in sorted({r["gpus"] for r in results}):
        rows = [r for r in results if r["gpus"] == gpus]
        base = next((r for r in rows if r["variant"] == "stock_fsdp" and "error" not in r), None)
        gpu = next((r["gpu"] for r in rows if "gpu" in r), "?")
        print(f"\n{gpus} x {gpu}")
        hf = next((r for r in rows if r["variant"] == "hf_ep" and "error" not in r), None)
        print(f"{'variant':<16} {'tokens/s/GPU':>13} {'vs FSDP2':>9} {'vs hf_ep':>9} {'peak GiB':>9} {'fwd ms':>7} "
              f"{'bwd ms':>7} {'optim ms':>8}  busiest expert / mean")
        for r in rows:
            if "error" in r:
                print(f"{r['variant']:<16} failed: {r['error']}")
                continue
            speed = f"{r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.2f}x" if base else "-"
            balance = max(r.get("busiest_expert_over_mean", [0]) or [0])
            vs_hf = f"{r['tokens_per_s_per_gpu'] / hf['tokens_per_s_per_gpu']:.2f}x" if hf else "-"
            print(f"{r['variant']:<16} {r['tokens_per_s_per_gpu']:>13,.0f} {speed:>9} {vs_hf:>9} {r['peak_gib']:>9.1f} "
                  f"{r['fwd_ms']:>7.1f} {r['bwd_ms']:>7.1f} {r['optim_ms']:>8.1f}  {balance or '-'}")


def chart(results, path):
    from steps import bar_charts

    ok = [r for r in results if "error" not in r]
    bar_charts(path, [f"{r['variant']}\n{r['gpus']} GPU" for r in ok],
               [("tokens/s per GPU", [r["tokens_per_s_per_gpu"] for r in ok]), ("peak GiB", [r["peak_gib"] for r in ok])],
               title="MoE training step, expert parallelism")


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
