"""TransformerEngine's fused MoE permute / unpermute as the local dispatcher (GPU, TE installed).

moe_permute (index map) groups the (token, k) rows by expert in one kernel; moe_unpermute scatters the
expert outputs back with the routing weights folded in and sums the k rows of each token in the same
kernel (no (tokens*k, hidden) weighted copy); their backward passes are the mirror kernels, and the
routing-weight gradient comes from unpermute's backward. Expert matmuls stay torch grouped_mm.
"""
from __future__ import annotations

import torch
from transformer_engine.pytorch import moe_permute, moe_unpermute

from .experts import Dispatched, expert_counts


class TEPermuteDispatcher:
    name = "te_permute"

    def dispatch(self, hidden, top_k_index, top_k_weights, num_experts) -> Dispatched:
        index = top_k_index.to(torch.int32)
        rows, row_id_map = moe_permute(hidden, index, num_out_tokens=0, map_type="index")
        counts = expert_counts(top_k_index, num_experts)
        return Dispatched(rows, counts, (row_id_map, top_k_weights))

    def combine(self, out, d: Dispatched, hidden_dtype):
        row_id_map, weights = d.state
        merged = moe_unpermute(out, row_id_map, merging_probs=weights.float(), map_type="index")
        return merged.to(hidden_dtype)
