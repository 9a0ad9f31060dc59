"""Qwen3-Next / Qwen3.5-MoE: (1 + weight) norms, Qwen's softmax top-k router; the gated norm of the
linear-attention mixer is left alone."""
MODEL_TYPES = ("qwen3_next", "qwen3_5_moe")
_SOFTMAX = dict(score="softmax", order="score_topk", renorm="norm_topk_prob", weights_dtype="logits")
RMSNORM = {"Qwen3NextRMSNorm": "offset", "Qwen3_5MoeRMSNorm": "offset"}
# Qwen3.5-MoE's router has no norm_topk_prob switch: it always renormalises (the proof checks this)
ROUTER = {"Qwen3NextTopKRouter": _SOFTMAX, "Qwen3_5MoeTopKRouter": dict(_SOFTMAX, renorm=True)}
SKIP = {"Qwen3NextRMSNormGated": "gated norm (takes the gate as a second input)"}
