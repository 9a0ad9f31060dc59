"""OLMoE: Qwen-style softmax top-k router."""
MODEL_TYPES = ("olmoe",)
RMSNORM = {"OlmoeRMSNorm": "scale"}
ROUTER = {"OlmoeTopKRouter": dict(score="softmax", order="score_topk", renorm="norm_topk_prob")}
