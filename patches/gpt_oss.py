"""GPT-OSS: router with bias, top-k of the logits then softmax; experts are transposed, biased and use
the clamped, interleaved SwiGLU of the family's own _apply_gate. Attention has sinks: only the
implementations GPT-OSS itself supports are used (sdpa is not one of them)."""
MODEL_TYPES = ("gpt_oss",)
# (weight * norm(x)).to(input dtype): the product before the rounding, unlike Llama's (ops/rmsnorm.py)
RMSNORM = {"GptOssRMSNorm": "scale_cast"}
ROUTER = {"GptOssTopKRouter": dict(score="softmax", order="topk_score", weights_dtype="logits")}
