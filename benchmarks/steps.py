"""Shared by the benchmarks: the timed training loop (fwd / bwd / optimizer wall times) and the bar chart."""
from __future__ import annotations

import statistics
import sys
import time

import torch


def timed_steps(model, opt, ids, warmup: int, steps: int) -> dict:
    """Run warmup + steps training steps on `ids`; medians (ms) over the timed steps, all losses, peak GiB
    (peak 0 off CUDA: the CPU path exists to smoke-test the benchmark scripts, not to time anything)."""
    fwd, bwd, step, losses = [], [], [], []
    cuda = ids.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        losses.append(loss.item())
        if i >= warmup:
            fwd.append(t1 - t0), bwd.append(t2 - t1), step.append(t3 - t2)
    total = statistics.median([a + b + c for a, b, c in zip(fwd, bwd, step)])
    return dict(step_s=total, fwd_ms=statistics.median(fwd) * 1e3, bwd_ms=statistics.median(bwd) * 1e3,
                optim_ms=statistics.median(step) * 1e3, losses=losses,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)


def profile_step(model, opt, ids, rows: int) -> str:
    """One more training step under torch.profiler: the top `rows` GPU kernels by total time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)


def write_results(args, results, chart=None):
    """--json: the arguments and every result; --png (where the script draws one): its chart."""
    import json

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), results=results), f, indent=1)
    if chart is not None and getattr(args, "png", None):
        chart(results, args.png)


def bar_charts(path, labels, panels, title=None):
    """One PNG of bar panels over the same labels: panels = [(panel title, values), ...]."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 2.5, 3.5), squeeze=False)
    for ax, (name, values) in zip(axes[0], panels):
        ax.bar(labels, values)
        ax.set_title(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
