"""Shared by the benchmarks: their common arguments, the timed training loop (fwd / bwd / optimizer times),
a CUDA-event timer, the results writer and the bar chart. torch is imported where used: the launching processes stay light."""
from __future__ import annotations

import statistics
import sys
import time


def add_shape_arguments(parser) -> None:
    """Model shape, tokens per micro-batch and the JSON output: the arguments every benchmark takes."""
    parser.add_argument("--shape", default="qwen3-30b-a3b")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", default=None)


def add_step_arguments(parser, steps: int, warmup: int) -> None:
    """The arguments of every training-step benchmark: model shape and size, steps, timing method, JSON."""
    add_shape_arguments(parser)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="micro-batches per optimizer step (gradient accumulation): each step runs K forward + "
                             "backward passes on K different micro-batches, then one optimizer step")
    parser.add_argument("--sync-phases", action="store_true",
                        help="synchronise after forward, backward and optimizer (0.1-0.3's method) instead of "
                             "once per step with CUDA events for the split")


def median_cuda_ms(fn, repeats: int, warmup: int = 3) -> float:
    """Median GPU milliseconds of fn() over `repeats` calls, each between two CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def timed_steps(model, opt, ids, warmup: int, steps: int, sync_phases: bool = False, grad_accum: int = 1) -> dict:
    """Run warmup + steps training steps on `ids`; medians (ms) over the timed steps, all losses, peak GiB
    (peak 0 off CUDA: the CPU path exists to smoke-test the benchmark scripts, not to time anything).

    grad_accum=K: `ids` is [K, batch, seq]; each step runs forward + backward on each of the K micro-batches
    (the gradients accumulate), then one optimizer step; fwd / bwd ms are summed over the micro-batches and the
    step's loss is their mean (as a Trainer logs it).

    On CUDA the host synchronises once per step, reading the loss (as a loop that logs it every step), and
    the forward / backward / optimizer split comes from CUDA events: the CPU queues the backward and the
    optimizer step while the GPU still runs the forward, as in training. sync_phases=True synchronises
    after every phase instead (each phase then also pays its launch latency on an idle GPU; the method of
    the 0.1-0.3 figures in CHANGELOG.md)."""
    import torch

    fwd, bwd, step, total, losses = [], [], [], [], []
    cuda = ids.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        sync()
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if cuda else None

        def mark(n):  # phase boundary n: an event (no wait), or with sync_phases / on CPU a wall time
            if sync_phases:
                sync()
            if cuda and not sync_phases:
                marks[n].record()
            return time.perf_counter()

        micro = [ids] if grad_accum == 1 else list(ids)
        if cuda and grad_accum > 1:
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(2 * grad_accum + 2)]
        walls = [mark(0)]
        step_loss = 0.0
        for k, batch in enumerate(micro):
            loss = model(input_ids=batch, labels=batch).loss
            walls.append(mark(2 * k + 1))
            loss.backward()
            walls.append(mark(2 * k + 2))
            step_loss = step_loss + loss.detach() / len(micro)
        opt.step()
        opt.zero_grad(set_to_none=True)
        walls.append(mark(2 * len(micro) + 1))
        losses.append(float(step_loss))  # the step's host synchronisation
        end = time.perf_counter()
        if i < warmup:
            continue
        n_marks = 2 * len(micro) + 2
        if cuda and not sync_phases:
            spans = [marks[n].elapsed_time(marks[n + 1]) / 1e3 for n in range(n_marks - 1)]
        else:
            spans = [walls[n + 1] - walls[n] for n in range(n_marks - 1)]
        phases = [sum(spans[0:-1:2]), sum(spans[1:-1:2]), spans[-1]]  # forwards, backwards, optimizer
        for out, value in zip((fwd, bwd, step), phases):
            out.append(value)
        total.append(end - walls[0])
    return dict(step_s=statistics.median(total), fwd_ms=statistics.median(fwd) * 1e3,
                bwd_ms=statistics.median(bwd) * 1e3, optim_ms=statistics.median(step) * 1e3, losses=losses,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)


def largest_fitting_batch(model, opt, vocab: int, seq: int, start: int, limit: int) -> int:
    """The largest micro-batch in start + 1 .. limit for which one more training step (forward, backward, optimizer
    step, on random tokens of that many rows of `seq`) runs without a CUDA out-of-memory error, trying upwards and
    stopping at the first that does not fit; `start` if none does. Run after the timed steps, so the optimizer's
    state is already allocated as in training. One step per size: allocator fragmentation over a long run can
    make a size that passed here fail later, so read it as an upper bound."""
    import torch

    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    fits = start
    for batch in range(start + 1, limit + 1):
        try:
            ids = torch.randint(0, vocab, (batch, seq), device=device)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            if cuda:
                torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            ids = None
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.empty_cache()
        fits = batch
    return fits


def profile_step(model, opt, ids, rows: int, trace: str | None = None) -> str:
    """One more training step under torch.profiler: the top `rows` GPU kernels by total time, where the
    step's GPU time goes (kernel_breakdown), and with `trace` a Chrome trace of the step (CPU ops too:
    where the GPU waits on the host, what launched what)."""
    import json
    import os
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if trace else [])
    with profile(activities=activities) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = trace or os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            kernels = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "kernel"]
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)
    return table + "\n" + format_breakdown(kernel_breakdown(kernels))


def layer_timeline(model, opt, ids, steps: int) -> list:
    """Where in a training step the host falls behind the GPU: `steps` more steps (the benchmark's loop: one host
    synchronisation per step), each marked at the start of every decoder layer and of its attention and MLP /
    mixer children, and at the ends of forward, backward and optimizer. Each mark: the host's time since the step
    began (perf_counter) and, on CUDA, the GPU's (an event recorded there, in stream order). Returns rows
    {"mark", "host_ms", "gpu_ms", "gpu_behind_ms"}, medians over the steps; gpu_behind_ms = gpu - host: how far the
    GPU trails the host at that mark (near zero: the GPU is waiting for the host's launches, a host-bound
    stretch; growing: GPU-bound). On CPU gpu_ms is None."""
    import torch

    cuda = ids.is_cuda
    marks, handles = [], []

    def mark(name):
        event = None
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        marks.append((name, time.perf_counter(), event))

    layers = next((m for n, m in model.named_modules() if n.endswith("layers") and isinstance(m, torch.nn.ModuleList)),
                  [])
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: mark(f"layer {i}")))
        for name, child in layer.named_children():
            if name in ("self_attn", "mlp", "mixer", "block_sparse_moe"):
                handles.append(child.register_forward_pre_hook(lambda m, a, i=i, n=name: mark(f"layer {i} {n}")))
    runs = []
    try:
        for _ in range(steps):
            if cuda:
                torch.cuda.synchronize()
            marks.clear()
            mark("step start")
            loss = model(input_ids=ids, labels=ids).loss
            mark("forward end")
            loss.backward()
            mark("backward end")
            opt.step()
            opt.zero_grad(set_to_none=True)
            mark("optimizer end")
            float(loss)  # the step's synchronisation, as in timed_steps
            if cuda:
                torch.cuda.synchronize()
            t0, e0 = marks[0][1], marks[0][2]
            runs.append([(n, (t - t0) * 1e3, e0.elapsed_time(e) if cuda else None) for n, t, e in marks])
    finally:
        for h in handles:
            h.remove()
    rows = []
    for j, (name, _, _) in enumerate(runs[0]):
        host = statistics.median(r[j][1] for r in runs)
        gpu = statistics.median(r[j][2] for r in runs) if cuda else None
        rows.append(dict(mark=name, host_ms=host, gpu_ms=gpu, gpu_behind_ms=None if gpu is None else gpu - host))
    return rows


def format_timeline(rows) -> str:
    lines = [f"{'mark':<26} {'host ms':>8} {'GPU ms':>8} {'GPU behind host':>16}"]
    for r in rows:
        gpu = "" if r["gpu_ms"] is None else f"{r['gpu_ms']:8.2f} {r['gpu_behind_ms']:16.2f}"
        lines.append(f"{r['mark']:<26} {r['host_ms']:8.2f} {gpu}")
    return "\n".join(lines)


# kernel name pieces -> category; the first match wins (TE's NCCL-EP kernels before other NCCL ones)
CATEGORIES = (("expert dispatch/combine", ("nccl_ep",)), ("collectives", ("nccl",)),
              ("attention", ("fmha", "sdpa", "flash", "cudnn", "triton_tem_fused")),  # triton_tem: flex_attention's
              # inductor template (moe_patch compiles no other template)
              ("GEMM", ("nvjet", "gemm", "cutlass", "xmma", "splitkreduce")),
              ("optimizer", ("multi_tensor_apply",)))
COMMUNICATION = ("expert dispatch/combine", "collectives")


def _category(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other")


def _union(spans):
    merged = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def _overlap(a, b) -> float:
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def kernel_breakdown(kernels) -> dict:
    """Where a profiled step's GPU time goes, from Chrome-trace kernel events (name, ts, dur in us): ms per
    category summed over streams, the step's span, the time no kernel runs, and the communication time that
    no compute kernel overlaps (exposed: what hiding communication could still win)."""
    if not kernels:
        return dict(span_ms=0.0, idle_ms=0.0, exposed_comm_ms=0.0, categories_ms={})
    per = {}
    comm, compute = [], []
    for e in kernels:
        cat = _category(e["name"])
        per[cat] = per.get(cat, 0.0) + e["dur"] / 1e3
        (comm if cat in COMMUNICATION else compute).append((e["ts"], e["ts"] + e["dur"]))
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e["dur"] for e in kernels)
    busy = sum(b - a for a, b in _union(comm + compute))
    comm_u, compute_u = _union(comm), _union(compute)
    exposed = sum(b - a for a, b in comm_u) - _overlap(comm_u, compute_u)
    return dict(span_ms=(end - start) / 1e3, idle_ms=(end - start - busy) / 1e3, exposed_comm_ms=exposed / 1e3,
                categories_ms=dict(sorted(per.items(), key=lambda kv: -kv[1])))


def format_breakdown(b: dict) -> str:
    cats = ", ".join(f"{c} {ms:.1f}" for c, ms in b["categories_ms"].items())
    return (f"GPU time of the step ({b['span_ms']:.1f} ms from first to last kernel): {cats} ms (summed over "
            f"streams); communication not overlapped by compute {b['exposed_comm_ms']:.1f} ms; no kernel "
            f"running {b['idle_ms']:.1f} ms")


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
