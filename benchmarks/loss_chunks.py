"""The fused loss (lm_head + cross-entropy, forward and backward) by chunk size, one GPU: milliseconds, TFLOP/s and
the transient memory each cap on a chunk's logits costs (moe_patch/ops/loss.py: chunk_bytes()).

    python benchmarks/loss_chunks.py --shapes all --json loss_chunks.json

Per shape: the family's vocabulary and hidden width (moe_patch.shapes), micro-batch x seq rows (the micro-batch
train_step.py's sweep uses), bf16, random weights and labels; each cap in --caps (GiB of logits per chunk) and
"auto" (what chunk_bytes() picks on this GPU). TFLOP/s counts the three lm_head GEMMs (6 x rows x hidden x vocab);
"extra GiB" is the peak allocated above the inputs during one forward + backward.
"""
from __future__ import annotations

import argparse
import sys

from steps import median_cuda_ms, write_results

SHAPES = {"gpt-oss-20b": 2, "deepseek-v3-style": 4, "qwen3-30b-a3b": 4, "nemotron-3-nano-style": 2}  # micro-batch


def measure(shape: str, batch: int, seq: int, caps: list, repeats: int) -> list:
    import torch

    from moe_patch.ops import loss
    from moe_patch.shapes import named_config

    config = named_config(shape, layers=1)
    vocab, hidden, rows = config.vocab_size, config.hidden_size, batch * seq
    g = torch.Generator(device="cuda").manual_seed(0)
    weight = (torch.randn(vocab, hidden, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    x = torch.randn(rows, hidden, device="cuda", generator=g).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (rows,), device="cuda", generator=g)
    step = "liger" if loss.liger_step_unproven(torch.device("cuda")) is None else "compiled"
    out, default = [], (loss.CHUNK_BYTES, loss.MAX_CHUNK_BYTES)
    for cap in caps:
        if cap != "auto":  # floor = cap = this many bytes: chunk_bytes() returns exactly it
            loss.CHUNK_BYTES = loss.MAX_CHUNK_BYTES = int(float(cap) * 2**30)

        def run():
            x.grad = weight.grad = None
            (loss._chunked_sum(x, weight, None, labels, step) / rows).backward()

        try:
            run()
            torch.cuda.synchronize()
            x.grad = weight.grad = None
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            extra = (torch.cuda.max_memory_allocated() - base) / 2**30
            ms = median_cuda_ms(run, repeats)
            chunk = loss.chunk_rows(vocab, 2, rows, "cuda")
        finally:
            loss.CHUNK_BYTES, loss.MAX_CHUNK_BYTES = default
        cap_bytes = loss.chunk_bytes("cuda") if cap == "auto" else int(float(cap) * 2**30)
        out.append(dict(shape=shape, vocab=vocab, hidden=hidden, rows=rows, cap=str(cap), cap_bytes=cap_bytes,
                        rows_per_chunk=chunk, chunks=-(-rows // chunk), ms=ms, tflops=6 * rows * hidden * vocab / ms / 1e9,
                        extra_gib=extra, softmax_step=step))
        r = out[-1]
        print(f"{shape:<22} {r['cap']:>5} {chunk:>8} {r['chunks']:>6} {ms:>8.2f} {r['tflops']:>8.0f} {extra:>9.2f}",
              flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="all", help="all, or a comma list of " + ", ".join(SHAPES))
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--caps", default="0.5,1,2,4,8,auto", help="GiB of logits per chunk, comma list; auto: chunk_bytes()")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    shapes = list(SHAPES) if args.shapes == "all" else args.shapes.split(",")
    print(f"fused loss forward + backward, bf16 ({torch.cuda.get_device_name()})\n"
          f"{'shape':<22} {'cap':>5} {'rows/chunk':>8} {'chunks':>6} {'ms':>8} {'TFLOP/s':>8} {'extra GiB':>9}")
    results = []
    for shape in shapes:
        results += measure(shape, SHAPES[shape], args.seq, args.caps.split(","), args.repeats)
    write_results(args, results)


if __name__ == "__main__":
    main()
