"""Nemotron-H (hybrid Mamba2 / MoE / attention): its Mamba2 mixer's chunked scan on mamba-ssm's Triton SSD kernel
(ops/mamba_ssd.py) and the mixer's gated, grouped RMSNorm on mamba-ssm's Triton gated norm (ops/gated_rmsnorm.py);
optional extra moe_patch[mamba]. Its router and plain norms are DeepSeek's (patches/deepseek.py)."""
MAMBA = {"NemotronHMamba2Mixer": "mamba2_chunk_scan"}
# out = weight * rms_norm over groups of group_size (y * silu(gate)): the gate before the norm
GATED_RMSNORM = {"NemotronHRMSNormGated": {"norm_before_gate": False}}
