"""Mixtral: softmax over fp32 logits, top-k, always renormalised, weights kept in fp32."""
MODEL_TYPES = ("mixtral",)
RMSNORM = {"MixtralRMSNorm": "scale"}
ROUTER = {"MixtralTopKRouter": dict(score="softmax", order="score_topk", renorm=True, weights_dtype="float")}
