"""DeepSeek-V2/V3 and the families that reuse its router (GLM-4-MoE, Nemotron-H, ...):
sigmoid scores, correction bias for the choice only, group-limited top-k, routed scaling factor."""
MODEL_TYPES = ("deepseek_v3", "glm4_moe", "nemotron_h")
_SIGMOID_GROUPED = dict(score="sigmoid", order="score_topk", renorm="norm_topk_prob", grouped=True,
                        fp32_logits=True, weights_dtype="logits")
# Nemotron-H's norm forms weight.float() * norm(x) and rounds once, as GPT-OSS's (ops/rmsnorm.py "scale_cast")
RMSNORM = {"DeepseekV3RMSNorm": "scale", "Glm4MoeRMSNorm": "scale", "NemotronHRMSNorm": "scale_cast"}
ROUTER = {"DeepseekV3TopkRouter": _SIGMOID_GROUPED, "Glm4MoeTopkRouter": _SIGMOID_GROUPED,
          "NemotronHTopkRouter": _SIGMOID_GROUPED}
# The dense layers' MLP and the shared experts: silu(gate) * up in one compiled kernel each way (moe_patch/ops/mlp.py;
# MOE_PATCH_FUSED_MLP=0 turns it off).
MLP = {"DeepseekV3MLP": "silu"}
# Multi-head latent attention: the RoPE of the rotary columns, the query / key cats and the value split between the
# projections and SDPA, fused (moe_patch/ops/mla.py; MOE_PATCH_FUSED_MLA=0 turns it off). Only classes whose forward is
# DeepSeek-V3's: sparse-indexer variants (DeepSeek-V3.2, GLM-5 DSA) select keys in between and are not listed.
MLA = {"DeepseekV3Attention": "q / k / v assembly (RoPE of the rotary columns, query and key cats, value split)"}
