"""The multi-GPU benchmark driver, smoke-tested on CPU (gloo, fp32, tiny model): every variant runs in its
own torchrun job and lands in the table and the JSON; a dispatcher that cannot run here is reported with
its reason instead of stopping the others. Timings on CPU mean nothing: only their bookkeeping is checked."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.distributed
def test_ep_train_driver_on_cpu(tmp_path):
    out = tmp_path / "ep.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_PATCH")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "ep_train.py"), "--device", "cpu",
           "--shape", "tiny:qwen3_moe", "--layers", "2", "--seq", "16", "--batch", "2", "--steps", "1",
           "--warmup", "1", "--variants", "stock_fsdp,auto,te_ep", "--routing", "balanced", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"stock_fsdp", "auto", "te_ep"}
    for name in ("stock_fsdp", "auto"):
        assert "error" not in results[name], results[name]
        assert len(results[name]["losses"]) == 2 and results[name]["tokens_per_s_per_gpu"] > 0
    assert results["auto"]["dispatcher"] == "all_to_all"  # no CUDA here
    # the same rank's losses (fp32, same weights and data): stock and moe_patch's first loss agree
    assert abs(results["stock_fsdp"]["losses"][0] - results["auto"]["losses"][0]) < 1e-4
    assert "te_ep" in results["te_ep"]["error"] and "cannot run here" in results["te_ep"]["error"]
    assert "vs FSDP2" in run.stdout


@pytest.mark.distributed
def test_ep_train_8_ranks_2d_mesh_full_depth(tmp_path):
    """The 8-GPU run's path on CPU: 8 gloo processes, the full 48-layer depth (tiny widths), moe_patch's experts
    on a ("dp_shard", "ep") = (2, 4) mesh; rank 0's first loss equals the stock model's on rank 0's batch."""
    from transformers import AutoModelForCausalLM

    from moe_patch.shapes import tiny_config

    out = tmp_path / "ep8.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_PATCH")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "ep_train.py"), "--device", "cpu", "--gpus", "8",
           "--ep", "4", "--shape", "tiny:qwen3_moe", "--layers", "48", "--seq", "16", "--batch", "1", "--steps", "1",
           "--warmup", "1", "--variants", "all_to_all", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = json.loads(out.read_text())["results"]
    assert "error" not in result, result
    assert (result["gpus"], result["ep"], result["dispatcher"]) == (8, 4, "all_to_all")
    torch.manual_seed(0)  # the benchmark's model and rank 0's batch (generator seed 10 + rank)
    config = tiny_config("qwen3_moe", num_hidden_layers=48)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ids = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        stock = model(input_ids=ids, labels=ids).loss.item()
    assert abs(result["losses"][0] - stock) <= 1e-5 * abs(stock), (result["losses"], stock)


@pytest.mark.parametrize("sync_phases", [False, True])
def test_timed_steps_phases_add_up(sync_phases):
    """The training-step timer of every benchmark: each step's phases lie within its wall time, every
    step's loss is kept, the model trains."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from steps import timed_steps
    from util import build

    model = build("qwen3_moe")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (2, 16))
    t = timed_steps(model, opt, ids, warmup=1, steps=1, sync_phases=sync_phases)  # one timed step: no medians
    assert len(t["losses"]) == 2 and t["losses"][1] < t["losses"][0]
    phases, step_ms = t["fwd_ms"] + t["bwd_ms"] + t["optim_ms"], t["step_s"] * 1e3
    # the phases are milliseconds of the same step: within its wall time, and most of it (all but loss.item())
    assert 0 < min(t["fwd_ms"], t["bwd_ms"], t["optim_ms"]) and 0.5 * step_ms <= phases <= step_ms


def test_fp8_experts_quantiser_and_cpu_refusal():
    """fp8_experts.py's rowwise e4m3 cast round-trips within e4m3's precision, each row's largest value lands on
    e4m3's largest; without a GPU the script says what it needs instead of failing somewhere inside."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from fp8_experts import E4M3_MAX, _rowwise

    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 3
    data, scale = _rowwise(x)
    assert data.dtype == torch.float8_e4m3fn and scale.shape == (64,)
    back = data.float() * scale[:, None]
    # half an e4m3 step: 2^-4 relative for normal values, 2^-10 (scaled) in the subnormal range
    assert ((back - x.float()).abs() <= x.float().abs() * 2 ** -4 + scale[:, None] * 2 ** -10).all()
    assert torch.allclose(data.float().abs().amax(-1), torch.full((64,), E4M3_MAX))
    if not torch.cuda.is_available():
        run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "fp8_experts.py")],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
        assert run.returncode != 0 and "needs a CUDA GPU" in run.stderr


def test_layer_timeline_marks_every_layer_in_order_and_removes_its_hooks():
    """train_step.py --timeline: the host's time at each decoder layer's start (and its attention / MLP), then the
    ends of forward, backward and optimizer, in step order; on CPU no GPU column; the model keeps no hook."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from steps import format_timeline, layer_timeline
    from util import build

    model = build("qwen3_moe")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rows = layer_timeline(model, opt, torch.randint(0, 256, (2, 16)), steps=2)
    layers = len(model.model.layers)
    expected = ["step start"] + [f"layer {i}{part}" for i in range(layers) for part in ("", " self_attn", " mlp")] + \
        ["forward end", "backward end", "optimizer end"]
    assert [r["mark"] for r in rows] == expected
    hosts = [r["host_ms"] for r in rows]
    assert hosts[0] == 0 and all(a <= b for a, b in zip(hosts, hosts[1:])) and hosts[-1] > 0
    assert all(r["gpu_ms"] is None for r in rows) and "optimizer end" in format_timeline(rows)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_kind_timing_host_mode_on_cpu(tmp_path):
    """kind_timing.py --host (host time per training-forward call) runs without a GPU and reports each
    replaced kind once, stock and patched."""
    out = tmp_path / "kinds.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "kind_timing.py"), "--host", "--device", "cpu",
           "--shape", "tiny:qwen3_moe", "--repeats", "5", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["kind"] for r in rows} == {"attention", "rmsnorm", "experts", "router"}
    assert all(r["stock_us"] > 0 and r["patched_us"] > 0 for r in rows)


def test_kernel_breakdown_of_a_profiled_step():
    """The step breakdown printed with --profile: per-category time over streams, idle time, and the
    communication no compute kernel overlaps, on a hand-made trace (us): a GEMM 0-100 beside an all-gather
    50-150, TE's dispatch 200-260 alone, attention 260-300."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from steps import format_breakdown, kernel_breakdown

    kernels = [dict(name="nvjet_sm90_tst_256x128", ts=0, dur=100),
               dict(name="ncclDevKernel_AllGather_RING", ts=50, dur=100),
               dict(name="nccl_ep_jit_ht_dispatch_kernel", ts=200, dur=60),
               dict(name="cudnn_generated_fort_native_sdpa_sm90_flash_fprop", ts=260, dur=40)]
    b = kernel_breakdown(kernels)
    assert b["categories_ms"] == {"GEMM": 0.1, "collectives": 0.1, "expert dispatch/combine": 0.06,
                                  "attention": 0.04}
    assert abs(b["span_ms"] - 0.3) < 1e-9 and abs(b["idle_ms"] - 0.05) < 1e-9  # 150-200 empty
    assert abs(b["exposed_comm_ms"] - 0.11) < 1e-9  # all-gather 100-150 and all of the dispatch
    assert "communication not overlapped by compute 0.1 ms" in format_breakdown(b)


def test_timed_steps_gradient_accumulation_is_one_optimizer_step_per_k_micro_batches():
    """--grad-accum K: K forward + backward passes, then one optimizer step on the summed gradients (the
    weights afterwards equal a hand-written accumulation's); the step's loss is the micro-batches' mean."""
    import copy

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from steps import timed_steps
    from util import build

    model = build("qwen3_moe")
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 256, (3, 2, 16))
    t = timed_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), ids, warmup=0, steps=1, grad_accum=3)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    losses = []
    for batch in ids:
        loss = ref(input_ids=batch, labels=batch).loss
        loss.backward()
        losses.append(loss.item())
    opt.step()
    assert abs(t["losses"][0] - sum(losses) / 3) < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert 0 < min(t["fwd_ms"], t["bwd_ms"], t["optim_ms"])


def test_fp8_loss_corpus_and_comparison():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from fp8_loss import compare, corpus_ids

    ids = corpus_ids(5000)
    assert len(ids) == 5000 and max(ids) < 256 and len(set(ids)) > 40  # real text, byte tokens
    r = compare([2.0, 4.0, 1.0], [2.01, 4.0, 1.03])
    assert r["max_rel_diff_step"] == 2 and abs(r["max_rel_diff"] - 0.03) < 1e-12


def test_rounds_report_each_variants_median_run_and_every_run():
    """train_step.py --rounds R: each variant's row is its median-throughput run (lower middle of an even count),
    with every successful run's tokens/s in run order; a variant that never ran keeps its error."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from train_step import median_runs

    def ok(v, tps, tag):
        return v, dict(variant=v.split("@")[0], tokens_per_s=tps, tag=tag)

    runs = [ok("stock", 100.0, "s1"), ok("patched@4", 150.0, "p1"), dict(variant="x", error="boom"),
            ok("stock", 98.0, "s2"), ok("patched@4", 155.0, "p2"), ok("stock", 103.0, "s3"),
            ok("patched@4", 149.0, "p3"), ok("patched@4", 152.0, "p4")]
    runs[2] = ("x", runs[2])
    merged = median_runs(runs)
    assert [r["variant"] for r in merged] == ["stock", "patched", "x"]
    stock, patched, failed = merged
    assert stock["tag"] == "s1" and stock["round_tokens_per_s"] == [100.0, 98.0, 103.0]
    assert patched["tag"] == "p1" and patched["round_tokens_per_s"] == [150.0, 155.0, 149.0, 152.0]  # 150 of 4
    assert failed == {"variant": "x", "error": "boom"}


def test_tune_search_narrows_inductors_grouped_gemm_configurations():
    """train_step.py --tune-search N / grouped_gemm.py --search N: inductor's grouped-GEMM search list holds the N
    configurations of the tiles that won on an H200 (BLOCK_M 128); fails if torch drops or renames that private
    list (the benchmark's flag would then fail on the GPU)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import torch._inductor.kernel.mm_grouped as mg
    from grouped_gemm import narrow_search

    saved = list(mg._NV_CONFIGS)
    try:
        narrow_search(4)
        assert len(mg._NV_CONFIGS) == 4
        assert {c.kwargs["BLOCK_M"] for c in mg._NV_CONFIGS} == {128}
        assert {c.kwargs["BLOCK_N"] for c in mg._NV_CONFIGS} == {128}
    finally:
        mg._NV_CONFIGS[:] = saved
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), "--help"],
                         capture_output=True, text=True, cwd=os.path.join(ROOT, "benchmarks"))
    assert out.returncode == 0 and "--tune-search" in out.stdout


def test_largest_fitting_batch_stops_at_the_first_out_of_memory():
    """steps.largest_fitting_batch: tries start + 1 upwards, one training step each, and stops at the first CUDA
    out-of-memory error (gradients cleared after it); the search's cap is the answer when everything fits."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from steps import largest_fitting_batch

    class Model(torch.nn.Module):
        def __init__(self, fails_above):
            super().__init__()
            self.w, self.fails_above, self.seen = torch.nn.Parameter(torch.ones(3)), fails_above, []

        def forward(self, input_ids, labels):
            self.seen.append(tuple(input_ids.shape))
            if input_ids.shape[0] > self.fails_above:
                (self.w * 2).sum().backward()  # a gradient left half-way, as an OOM in the backward leaves it
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return type("Out", (), {"loss": (self.w * input_ids.shape[0]).sum()})()

    model = Model(fails_above=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    assert largest_fitting_batch(model, opt, vocab=11, seq=5, start=4, limit=12) == 6
    assert model.seen == [(5, 5), (6, 5), (7, 5)] and model.w.grad is None
    assert largest_fitting_batch(Model(fails_above=99), opt, vocab=11, seq=5, start=4, limit=8) == 8
    assert largest_fitting_batch(Model(fails_above=0), opt, vocab=11, seq=5, start=4, limit=8) == 4


def test_sweep_rounds_keep_each_variants_median_and_the_first_rounds_fit(monkeypatch, tmp_path, capsys):
    """train_step.py --shapes S --rounds R --fit F: each variant runs R times interleaved; its row is its median
    run, with every run's tokens/s; the largest-micro-batch search runs in the first round only (later rounds get
    --fit 0) and its answer is on the row; the table marks a search that stopped at its cap with '>='."""
    import argparse

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import train_step

    calls = []
    speeds = {"stock": [100.0, 104.0, 98.0], "patched": [150.0, 149.0, 160.0]}

    def fake_child(variant, extra):
        calls.append((variant, extra))
        n = sum(1 for v, _ in calls if v == variant) - 1
        fit = int(extra[len(extra) - 1 - extra[::-1].index("--fit") + 1]) if "--fit" in extra else 3
        r = dict(variant=variant, tokens_per_s=speeds[variant][n], tflops=1.0, peak_gib=2.0, batch=4, layers=4,
                 attention="sdpa", losses=[1.0, 0.9], gpu="cpu", run=n)
        if fit:
            r["fits_batch"] = {"stock": 9, "patched": 12}[variant]
        return r

    monkeypatch.setattr(train_step, "run_child", fake_child)
    args = argparse.Namespace(shapes="deepseek-v3-style", rounds=3, fit=3, profile=0, json=str(tmp_path / "s.json"),
                              png=None, seq=4096, steps=8, warmup=3)
    train_step.sweep(args)
    assert [v for v, _ in calls] == ["stock", "patched"] * 3
    assert all(extra.count("--fit") == (1 if i >= 2 else 0) for i, (_, extra) in enumerate(calls))
    rows = {r["variant"]: r for r in json.loads((tmp_path / "s.json").read_text())["results"]}
    assert rows["stock"]["run"] == 0 and rows["stock"]["round_tokens_per_s"] == [100.0, 104.0, 98.0]
    assert rows["patched"]["run"] == 0 and rows["patched"]["round_tokens_per_s"] == [150.0, 149.0, 160.0]
    assert rows["stock"]["fits_batch"] == 9 and rows["patched"]["fits_batch"] == 12
    out = capsys.readouterr().out
    table = [ln for ln in out.splitlines() if ln.startswith("deepseek-v3-style (4)")]
    assert table[0].split()[-1] == "9" and table[1].split()[-1] == ">=12" and "1.50x" in table[1], table
