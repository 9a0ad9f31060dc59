"""The timed training loop shared by the benchmarks: fwd / bwd / optimizer wall times per step."""
from __future__ import annotations

import statistics
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
