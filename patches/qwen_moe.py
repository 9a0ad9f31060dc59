"""Qwen2-MoE, Qwen3-MoE, Qwen3-VL-MoE / Omni text towers: softmax top-k, optional renormalisation."""
MODEL_TYPES = ("qwen2_moe", "qwen3_moe", "qwen3_vl_moe", "qwen3_omni_moe")
_SOFTMAX = dict(score="softmax", order="score_topk", renorm="norm_topk_prob", weights_dtype="logits")
RMSNORM = {"Qwen2MoeRMSNorm": "scale", "Qwen3MoeRMSNorm": "scale", "Qwen3VLMoeTextRMSNorm": "scale"}
# Qwen3-VL-MoE's text router has no norm_topk_prob switch: it always renormalises (the proof checks this)
ROUTER = {"Qwen2MoeTopKRouter": _SOFTMAX, "Qwen3MoeTopKRouter": _SOFTMAX,
          "Qwen3VLMoeTextTopKRouter": dict(_SOFTMAX, renorm=True)}
