"""Attention with sinks (GPT-OSS): how far each implementation is from a float64 reference.

    python benchmarks/sink_attention_accuracy.py [--device cuda] [--seq 1024] [--json out.json]

One GPT-OSS attention call (the gpt-oss-20b shape: 64 heads, 8 kv heads, head dim 64, window 128), random
q / k / v and sinks, for the causal and the sliding-window mask Transformers builds. Implementations:
- eager: Transformers' modeling_gpt_oss.eager_attention_forward (the default for GPT-OSS),
- stock flex: Transformers' flex_attention_forward with the BlockMask Transformers builds for
  attn_implementation="flex_attention" (GPU only: Transformers refuses sinks on CPU, so on CPU its arithmetic is
  reproduced: flex_attention, LSE rounded to the model dtype, logsumexp renormalisation),
- moe_patch: moe_patch.ops.sink_attention (flex_attention * sigmoid(lse - sink), float32 LSE).
Prints the relative error of the output against eager in float64, in float32 and in bfloat16: in float32 every
implementation computes the same function (a semantic difference would show here); in bfloat16 the errors are
rounding, and the table says whose is larger.
"""
from __future__ import annotations

import argparse
import json

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from transformers.integrations import flex_attention as hf_flex
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    from transformers.models.gpt_oss import modeling_gpt_oss as gpt_oss

    from moe_patch.ops import sink_attention
    from moe_patch.probe import rel_err
    from moe_patch.shapes import named_config

    dev = torch.device(args.device)
    config = named_config("gpt-oss-20b", layers=2)
    heads, kv, d, b, s = config.num_attention_heads, config.num_key_value_heads, config.head_dim, args.batch, args.seq
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, heads, s, d, generator=g) * 3  # sharp rows, where a sink matters
    k, v = torch.randn(b, kv, s, d, generator=g), torch.randn(b, kv, s, d, generator=g)
    sinks = torch.randn(heads, generator=g) * 2
    emb = torch.zeros(b, s, config.hidden_size, device=dev)
    pos = torch.arange(s, device=dev)[None].expand(b, s)
    rows = []
    for layer in (0, 1):
        window = config.sliding_window if config.layer_types[layer] == "sliding_attention" else None
        make = create_sliding_window_causal_mask if window else create_causal_mask

        def mask_for(impl, dtype):
            config._attn_implementation = impl
            return make(config=config, inputs_embeds=emb.to(dtype), attention_mask=None, cache=None,
                        position_ids=pos)

        module = gpt_oss.GptOssAttention(config, layer).to(dev)
        module.train(False)
        out = {}
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            module.sinks.data = sinks.to(dev, dtype)
            qd, kd, vd = (t.to(dev, dtype) for t in (q, k, v))
            kw = dict(scaling=module.scaling, dropout=0.0, sliding_window=window, s_aux=module.sinks)
            with torch.no_grad():
                out["eager", dtype] = gpt_oss.eager_attention_forward(module, qd, kd, vd, mask_for("eager", dtype), **kw)[0]
                if dtype == torch.float64:
                    continue
                eager_mask = mask_for("eager", dtype)
                out["moe_patch", dtype] = sink_attention.sink_attention_forward(module, qd, kd, vd, eager_mask, **kw)[0]
                block_mask = mask_for("flex_attention", dtype)
                if dev.type == "cuda":
                    out["stock flex", dtype] = hf_flex.flex_attention_forward(module, qd, kd, vd, block_mask, **kw)[0]
                else:  # Transformers' arithmetic, reproduced: its own BlockMask, LSE rounded to the dtype
                    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

                    o, aux = flex_attention(qd, kd, vd, block_mask=block_mask, scale=module.scaling, enable_gqa=True,
                                            return_aux=AuxRequest(lse=True))
                    lse = aux.lse.to(dtype).unsqueeze(-1)
                    sk = module.sinks.view(1, -1, 1, 1).expand(b, heads, s, 1)
                    comb = torch.logsumexp(torch.cat([lse, sk], -1), -1, keepdim=True)
                    out["stock flex", dtype] = (o * torch.exp(lse - comb)).to(dtype).transpose(1, 2).contiguous()
        ref = out["eager", torch.float64]
        for (name, dtype), t in out.items():
            if dtype != torch.float64:
                rows.append(dict(layer=config.layer_types[layer], impl=name, dtype=str(dtype).split(".")[1],
                                 rel_err_vs_fp64=rel_err(t, ref)))
    print(f"GPT-OSS attention, {heads} heads / {kv} kv heads, head dim {d}, seq {s}, batch {b}, {dev}")
    print(f"{'layer':<18} {'implementation':<12} {'dtype':<9} {'rel. error vs eager fp64':>24}")
    for r in rows:
        print(f"{r['layer']:<18} {r['impl']:<12} {r['dtype']:<9} {r['rel_err_vs_fp64']:>24.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(dev), seq=s, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
