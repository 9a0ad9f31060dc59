"""Granite-MoE: top-k of fp32 logits, softmax of those, weights cast to the input dtype."""
MODEL_TYPES = ("granitemoe", "granitemoeshared", "granitemoehybrid")
RMSNORM = {"GraniteMoeRMSNorm": "scale", "GraniteMoeSharedRMSNorm": "scale", "GraniteMoeHybridRMSNorm": "scale"}
ROUTER = {name: dict(score="softmax", order="topk_score", weights_dtype="input")
          for name in ("GraniteMoeTopKRouter", "GraniteMoeSharedTopKRouter", "GraniteMoeHybridTopKRouter")}
