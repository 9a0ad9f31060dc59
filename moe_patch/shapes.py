"""Model shapes by name: tiny ones for tests and the demo, real ones for benchmarks (random weights)."""
from __future__ import annotations

# Tiny: a few hundred thousand parameters, every family-specific switch kept on.
_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=128)
TINY = {
    "qwen3_moe": dict(moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen2_moe": dict(moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=False),
    # hybrid: Gated DeltaNet linear attention + full attention, shared expert with its own gate
    "qwen3_next": dict(moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
                       num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                       layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                       linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                       linear_conv_kernel_dim=4),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "deepseek_v3": dict(num_key_value_heads=4, head_dim=8, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                        topk_group=1, n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3,
                        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                        routed_scaling_factor=2.5, norm_topk_prob=True),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
                    sliding_window=8),
    "glm4_moe": dict(moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                     n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3, norm_topk_prob=True),
    "ernie4_5_moe": dict(moe_intermediate_size=32, moe_num_experts=8, moe_k=2, moe_num_shared_experts=1,
                         moe_layer_start_index=0),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "nemotron_h": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                       moe_shared_expert_intermediate_size=48, n_group=1, topk_group=1, num_hidden_layers=4,
                       layers_block_type=["mamba", "moe", "attention", "moe"], mamba_num_heads=4,
                       mamba_head_dim=16, ssm_state_size=16, n_groups=2, mamba_chunk_size=8, expand=1),
    "llama": dict(),
}

# Real shapes, cut to `layers` layers by the benchmarks.
NAMED = {
    "qwen3-30b-a3b": ("qwen3_moe", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                        num_experts=128, num_experts_per_tok=8, num_attention_heads=32,
                                        num_key_value_heads=4, head_dim=128, vocab_size=151936,
                                        norm_topk_prob=True, num_hidden_layers=48)),
    "deepseek-v3-style": ("deepseek_v3", dict(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                                              n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=3,
                                              n_shared_experts=2, first_k_dense_replace=1, num_attention_heads=16,
                                              num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=1536,
                                              qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                                              vocab_size=102400, num_hidden_layers=27)),
    "gpt-oss-20b": ("gpt_oss", dict(hidden_size=2880, intermediate_size=2880, num_local_experts=32,
                                    num_experts_per_tok=4, num_attention_heads=64, num_key_value_heads=8,
                                    head_dim=64, vocab_size=201088, num_hidden_layers=24, sliding_window=128)),
    # Nemotron-3-Nano-like hybrid (Mamba2 + MoE + a few attention layers); approximate public shape
    "nemotron-3-nano-style": ("nemotron_h", dict(hidden_size=2688, n_routed_experts=128, num_experts_per_tok=6,
                                                 moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712,
                                                 n_group=1, topk_group=1, num_attention_heads=32,
                                                 num_key_value_heads=2, head_dim=128, vocab_size=131072,
                                                 mamba_num_heads=64, mamba_head_dim=64, ssm_state_size=128,
                                                 n_groups=8, num_hidden_layers=52)),
}
_HYBRID_PATTERN = ("mamba", "moe", "mamba", "moe", "attention", "moe")


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    kwargs = {**_COMMON, **TINY[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def named_config(name: str, layers: int | None = None, **overrides):
    from transformers import AutoConfig

    model_type, kwargs = NAMED[name]
    kwargs = dict(kwargs)
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    if model_type == "nemotron_h":
        n = kwargs.pop("num_hidden_layers")
        kwargs["layers_block_type"] = [_HYBRID_PATTERN[i % len(_HYBRID_PATTERN)] for i in range(n)]
    if model_type == "gpt_oss":
        n = kwargs["num_hidden_layers"]
        kwargs["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    return AutoConfig.for_model(model_type, **{**kwargs, **overrides})
