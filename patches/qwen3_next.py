"""Qwen3-Next / Qwen3.5-MoE: (1 + weight) norms; the gated norm of the linear-attention mixer is left alone."""
MODEL_TYPES = ("qwen3_next", "qwen3_5_moe")
RMSNORM = {"Qwen3NextRMSNorm": "offset", "Qwen3_5MoeRMSNorm": "offset"}
SKIP = {"Qwen3NextRMSNormGated": "gated norm (takes the gate as a second input)"}
