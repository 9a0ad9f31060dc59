"""Token dispatchers for expert parallelism. All share LocalDispatcher's interface (ops/experts.py):

    dispatch(hidden [T, H], top_k_index [T, k], top_k_weights [T, k], num_global_experts) -> Dispatched
    combine(expert_out [S, H], Dispatched, hidden_dtype) -> [T, H]

AllToAllDispatcher is the exact reference: (token, k) pairs are sorted by global expert, which also groups
them by owning rank (experts are sharded in contiguous blocks); counts are exchanged, rows travel with a
differentiable all_to_all_single (its backward is the reverse all-to-all, so an expert's gradient collects
every token routed to it from every rank), are regrouped by local expert, and come back the same way.
The routing weights are applied on the token's own rank, so router gradients stay local.
Every rank runs the same collectives in the same order whatever the routing (empty sends included), so
no routing can deadlock it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from ..ops.experts import Dispatched, scatter_weighted


class AllToAllDispatcher:
    name = "all_to_all"

    def __init__(self, group, ep_size: int, num_local: int):
        self.group, self.ep_size, self.num_local = group, ep_size, num_local
        self.last_counts = None  # tokens per local expert in the last forward (load-balance statistics)

    def dispatch(self, hidden, top_k_index, top_k_weights, num_experts) -> Dispatched:
        num_tokens, top_k = top_k_index.shape
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=num_experts)  # [E] sent from here, per global expert
        # counts_recv[r, e]: rows rank r sends to my local expert e
        counts_recv = torch.empty_like(counts)
        dist.all_to_all_single(counts_recv, counts, group=self.group)
        counts_recv = counts_recv.view(self.ep_size, self.num_local)
        send_splits = counts.view(self.ep_size, self.num_local).sum(1).tolist()  # the one host sync
        recv_splits = counts_recv.sum(1).tolist()
        x = hidden[order // top_k]
        received = _wait(all_to_all_single_autograd(x, recv_splits, send_splits, self.group))
        # rows arrive grouped by source rank, then by local expert: regroup by local expert
        local_ids = torch.arange(self.num_local, device=flat.device).repeat(self.ep_size)
        row_expert = torch.repeat_interleave(local_ids, counts_recv.reshape(-1))
        regroup = torch.argsort(row_expert, stable=True)
        local_counts = counts_recv.sum(0)
        self.last_counts = local_counts.detach()
        weights = top_k_weights.reshape(-1)[order]
        state = (order, weights, num_tokens, top_k, regroup, send_splits, recv_splits)
        return Dispatched(received[regroup], local_counts, row_expert[regroup], state)

    def combine(self, out, d: Dispatched, hidden_dtype):
        order, weights, num_tokens, top_k, regroup, send_splits, recv_splits = d.state
        by_source = out.new_zeros(out.shape).index_put((regroup,), out)
        back = _wait(all_to_all_single_autograd(by_source, send_splits, recv_splits, self.group))
        return scatter_weighted(back, order, weights, num_tokens, top_k, hidden_dtype)


def _wait(tensor):
    # functional collectives return an async tensor; torch.compile overlaps them, eager waits here
    return tensor.wait() if hasattr(tensor, "wait") else tensor


DISPATCHERS = {"all_to_all": AllToAllDispatcher}
