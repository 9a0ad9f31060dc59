"""ERNIE-4.5-MoE: the router adds a statistics bias for the choice and clamps the renormalisation
(moe_norm_min); no router spec covers it yet, so the stock router is kept and reported."""
MODEL_TYPES = ("ernie4_5_moe",)
RMSNORM = {"Ernie4_5_MoeRMSNorm": "scale"}
SKIP = {"Ernie4_5_MoeTopKRouter": "router with moe_statics bias and norm_min clamp: no spec yet, stock kept"}
