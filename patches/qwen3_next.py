"""Qwen3-Next / Qwen3.5-MoE: (1 + weight) norms, Qwen's softmax top-k router; the gated norm of the
linear-attention mixer is left alone."""
MODEL_TYPES = ("qwen3_next", "qwen3_5_moe")
_SOFTMAX = dict(score="softmax", order="score_topk", renorm="norm_topk_prob", weights_dtype="logits")
RMSNORM = {"Qwen3NextRMSNorm": "offset", "Qwen3_5MoeRMSNorm": "offset"}
ROUTER = {"Qwen3NextTopKRouter": _SOFTMAX, "Qwen3_5MoeTopKRouter": _SOFTMAX}
SKIP = {"Qwen3NextRMSNormGated": "gated norm (takes the gate as a second input)"}
