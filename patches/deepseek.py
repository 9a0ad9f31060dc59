"""DeepSeek-V2/V3 and the families that reuse its router (GLM-4-MoE, Nemotron-H, ...):
sigmoid scores, correction bias for the choice only, group-limited top-k, routed scaling factor."""
MODEL_TYPES = ("deepseek_v3", "glm4_moe", "nemotron_h")
_SIGMOID_GROUPED = dict(score="sigmoid", order="score_topk", renorm="norm_topk_prob", grouped=True,
                        fp32_logits=True, weights_dtype="logits")
RMSNORM = {"DeepseekV3RMSNorm": "scale", "Glm4MoeRMSNorm": "scale", "NemotronHRMSNorm": "scale"}
ROUTER = {"DeepseekV3TopkRouter": _SIGMOID_GROUPED, "Glm4MoeTopkRouter": _SIGMOID_GROUPED,
          "NemotronHTopkRouter": _SIGMOID_GROUPED}
