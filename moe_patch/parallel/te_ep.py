"""TransformerEngine's NCCL-EP dispatch (`transformer_engine.pytorch.ep`) as an expert-parallel dispatcher.

One fused kernel pair replaces AllToAllDispatcher's sort, count exchange, all-to-all and re-sort: ep_dispatch
sends every (token, k) pair straight to the rank owning its expert and lands the rows grouped by local
expert (order within an expert is TE's, not the source order; the result does not depend on it), with the
routing weight of each row; ep_combine sums the rows back onto their source tokens. The experts module
applies the routing weights to its rows (Dispatched.weights) before the combine, so the router gradient flows
back through dispatch's backward (TE's dispatch backward is a combine and the combine's backward a dispatch,
exact in bf16).

TE's EP group is process-wide (ep_bootstrap once, sized by experts, hidden size, top-k and the most tokens a
rank sends per call). A call's routing handle lives in its EpBuffer and must live until that layer's
backward: every call gets a fresh EpBuffer (a few small tensors), so a second forward before the backward
(gradient accumulation in one graph, activation recomputation) cannot overwrite the handle the first one's
backward needs. Eager mode (no fixed receive capacity) sizes the received rows per call with one host read
per layer. TE's capacity mode has no host read, but it is not used: its public API fails inside autograd on
torch 2.11 (pytorch#176078), and to stay exact under any routing (TE traps or drops rows past the capacity)
the receive buffers would have to hold the worst case, ep x tokens x top-k rows: ep times the rows a
rank receives on average, and the activation and routing-weight kernels would run over all of them.
NCCL-EP payloads are bf16 only.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import MeshError
from ..ops.experts import Dispatched

_SESSION = {}  # the process-wide TE EP group: {"key": what it was set up for, "max_tokens": its token limit}


def unavailable_reason(group, dtype) -> str | None:
    """Why te_ep cannot run in this process (None when it can). Local checks only: no collective."""
    if not torch.cuda.is_available():
        return "needs CUDA"
    if "nccl" not in str(dist.get_backend(group)):
        return f"needs an NCCL process group (the ep group uses {dist.get_backend(group)})"
    if dtype != torch.bfloat16:
        return f"NCCL-EP carries bf16 tokens only (the experts are {str(dtype).replace('torch.', '')})"
    try:
        from transformer_engine.pytorch import ep  # noqa: F401
    except Exception as exc:  # ImportError, or TE's own load errors (missing libraries)
        return f"transformer_engine.pytorch.ep is not importable ({type(exc).__name__}: {exc})"
    try:
        ep._check_nccl_runtime_version()
    except RuntimeError as exc:
        return str(exc)
    return None


def _bootstrap(group, num_experts, hidden, top_k, tokens, max_tokens):
    """Set up (or reuse) the process-wide EP group; returns the most tokens a rank may send per call."""
    from transformer_engine.pytorch import ep

    key = (group.group_name, num_experts, hidden, top_k, max_tokens)
    if ep.is_ep_bootstrapped() and _SESSION.get("key") == key:
        return _SESSION["max_tokens"]
    if ep.is_ep_bootstrapped():
        # another te_ep model shape in this process (run one after the other, as tests do): TE holds one
        # EP group, so the previous one is finalised; every rank switches together since all run the model
        ep.ep_finalize()
    limit = max_tokens
    if limit is None:  # the largest first call over the ranks (one collective, at set-up only)
        n = torch.tensor([tokens], device="cuda")
        dist.all_reduce(n, op=dist.ReduceOp.MAX, group=group)
        limit = max(int(n.item()), 1)
    ep.ep_bootstrap(group, num_experts=num_experts, max_tokens_per_rank=limit, hidden_dim=hidden,
                    num_topk=top_k, recv_capacity_per_rank=None)
    _SESSION.update(key=key, max_tokens=limit)
    _finalize_before_destroy()
    return limit


def finalize() -> None:
    """Tear down TE's EP group (idempotent); the next te_ep call sets it up again."""
    from transformer_engine.pytorch import ep

    ep.ep_finalize()
    _SESSION.clear()


def _finalize_first(wrapped, instance, args, kwargs):
    finalize()
    return wrapped(*args, **kwargs)


def _finalize_before_destroy():
    # TE borrows the process group's NCCL communicator: destroying the group first hangs the process at
    # exit, so dist.destroy_process_group() (which every training script calls) finalises TE's EP first
    if not getattr(dist.destroy_process_group, "_moe_patch_te_ep", False):
        import wrapt

        wrapt.wrap_function_wrapper(dist, "destroy_process_group", _finalize_first)
        dist.destroy_process_group._moe_patch_te_ep = True


class TEEPDispatcher:
    name = "te_ep"

    def __init__(self, group, ep_size: int, num_local: int, permuter=None, max_tokens_per_rank=None):
        self.group, self.ep_size, self.num_local = group, ep_size, num_local
        self.max_tokens = max_tokens_per_rank
        self.last_counts = None

    def _buffer(self, hidden, top_k_index, num_experts):
        from transformer_engine.pytorch import ep

        tokens, top_k = top_k_index.shape
        limit = _bootstrap(self.group, num_experts, hidden.shape[-1], top_k, tokens, self.max_tokens)
        if tokens > limit:
            # raised on this rank only (the others wait in the dispatch): a set-up error, not a routing one
            raise MeshError(f"te_ep was set up for at most {limit} tokens per rank and call, got {tokens}: pass "
                            "apply(..., max_tokens_per_rank=N) with the largest micro-batch (batch x sequence)")
        return ep.EpBuffer(top_k=top_k, max_tokens_per_rank=limit, hidden_dim=hidden.shape[-1],
                           num_local_experts=self.num_local, device=hidden.device)

    def dispatch(self, hidden, top_k_index, top_k_weights, num_experts) -> Dispatched:
        from transformer_engine.pytorch import ep

        if hidden.dtype != torch.bfloat16:  # the same dtype on every rank: all raise, none waits
            raise MeshError(f"te_ep carries bf16 tokens only, got {str(hidden.dtype).replace('torch.', '')}: use bf16 "
                            "weights, a bf16 MixedPrecisionPolicy, or dispatcher='all_to_all'")
        buffer = self._buffer(hidden, top_k_index, num_experts)
        # TE asserts contiguous routing tensors; a router may return slices (e.g. the first k of a sort)
        rows, row_weights, counts = ep.ep_dispatch(buffer, hidden.contiguous(), top_k_index.contiguous(),
                                                   top_k_weights.float().contiguous())
        self.last_counts = counts.detach()
        # the experts module weighs its rows (Dispatched.weights), in the routing weights' own dtype as the
        # reference does (TE carries them as fp32); the combine then only sums
        return Dispatched(rows, counts, (buffer, hidden.shape[0]), weights=row_weights.to(top_k_weights.dtype))

    def combine(self, out, d: Dispatched, hidden_dtype):
        from transformer_engine.pytorch import ep

        buffer, tokens = d.state
        return ep.ep_combine(buffer, out.to(torch.bfloat16), num_local_tokens=tokens).to(hidden_dtype)
