"""DeepEP (`deep_ep.Buffer`, normal kernels) as an expert-parallel dispatcher, for users who build DeepEP.

UNVERIFIED: written against DeepEP's training API (deep_ep/buffer.py: get_dispatch_layout, dispatch, combine,
cached dispatch with a handle; intranode and internode alike) but never run by this project: the PyPI
package cannot be built and no GPU machine here has DeepEP. `dispatcher="auto"` never picks it; ask for it
by name. tests/test_expert_parallel.py runs it against the unsharded model wherever `import deep_ep` works.

DeepEP sends each token once per destination rank (not once per expert): a rank receives tokens with their
top-k expert ids (local ids, -1 for experts elsewhere) and weights, groups the (token, k) pairs of its own
experts like LocalDispatcher does, and sums the weighted expert outputs per received token before the
combine adds the ranks' partial sums back onto the source token. Dispatch's backward is a combine and the
combine's backward a dispatch with the same handle, as in DeepEP's own examples.
"""
from __future__ import annotations

import torch

from ..ops.experts import Dispatched, scatter_weighted

_BUFFERS = {}


def _buffer(group, hidden_bytes):
    import deep_ep

    key = (group.group_name, hidden_bytes)
    if key not in _BUFFERS:
        nvl = rdma = 0
        for cfg in (deep_ep.Buffer.get_dispatch_config(group.size()), deep_ep.Buffer.get_combine_config(group.size())):
            nvl = max(nvl, cfg.get_nvl_buffer_size_hint(hidden_bytes, group.size()))
            rdma = max(rdma, cfg.get_rdma_buffer_size_hint(hidden_bytes, group.size()))
        _BUFFERS[key] = deep_ep.Buffer(group, nvl, rdma)
    return _BUFFERS[key]


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, idx, buffer, num_experts):
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, num_experts)
        recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
            x, topk_idx=idx, topk_weights=weights, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        ctx.buffer, ctx.handle = buffer, handle
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_w, recv_idx, handle, counts

    @staticmethod
    def backward(ctx, g_x, g_w, *_):
        g_w = None if g_w is None else g_w.contiguous()  # None when the routing weights need no gradient
        g_x, g_w, _ = ctx.buffer.combine(g_x.contiguous(), ctx.handle, topk_weights=g_w)
        return g_x, g_w, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, buffer, handle):
        ctx.buffer, ctx.handle = buffer, handle
        out, _, _ = buffer.combine(x, handle)
        return out

    @staticmethod
    def backward(ctx, g):
        g_x = ctx.buffer.dispatch(g.contiguous(), handle=ctx.handle)[0]
        return g_x, None, None


class DeepEPDispatcher:
    name = "deepep"

    def __init__(self, group, ep_size: int, num_local: int, permuter=None, **_):
        self.group, self.ep_size, self.num_local = group, ep_size, num_local
        self.last_counts = None

    def dispatch(self, hidden, top_k_index, top_k_weights, num_experts) -> Dispatched:
        buffer = _buffer(self.group, hidden.shape[-1] * max(hidden.element_size(), 2))
        recv_x, recv_w, recv_idx, handle, counts = _Dispatch.apply(
            hidden.contiguous(), top_k_weights.float(), top_k_index.long(), buffer, num_experts)
        # pairs of experts on other ranks (-1) sort last and are cut off; counts is DeepEP's host list
        flat = torch.where(recv_idx >= 0, recv_idx, self.num_local).reshape(-1)
        order = torch.argsort(flat, stable=True)[:sum(counts)]
        k = recv_idx.shape[-1]
        counts = torch.tensor(counts, device=hidden.device)
        self.last_counts = counts
        rows = recv_x[order // k]
        state = (order, recv_w.reshape(-1)[order], recv_x.shape[0], k, buffer, handle)
        return Dispatched(rows, counts, state)

    def combine(self, out, d: Dispatched, hidden_dtype):
        order, weights, received, k, buffer, handle = d.state
        partial = scatter_weighted(out, order, weights, received, k, hidden_dtype)
        return _Combine.apply(partial, buffer, handle)
