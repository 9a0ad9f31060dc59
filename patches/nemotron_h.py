"""Nemotron-H (hybrid Mamba2 / MoE / attention): its Mamba2 mixer's chunked scan on mamba-ssm's Triton SSD kernel
(ops/mamba_ssd.py; optional extra moe_patch[mamba]). Its router and norms are DeepSeek's (patches/deepseek.py)."""
MAMBA = {"NemotronHMamba2Mixer": "mamba2_chunk_scan"}
