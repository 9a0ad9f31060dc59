"""Token dispatchers for expert parallelism. All share LocalDispatcher's interface (ops/experts.py):

    dispatch(hidden [T, H], top_k_index [T, k], top_k_weights [T, k], num_global_experts) -> Dispatched
    combine(expert_out [S, H], Dispatched, hidden_dtype) -> [T, H]

AllToAllDispatcher is the exact reference. On the token's own rank, the local permuter (torch sort, or
TransformerEngine's fused moe_permute when the experts run on the te backend) groups the (token, k) rows
by global expert, which also groups them by owning rank (experts are sharded in contiguous blocks).
Counts are exchanged, rows travel with a differentiable all_to_all_single (its backward is the reverse
all-to-all, so an expert's gradient collects every token routed to it from every rank), arrive grouped
by (source rank, local expert) and are re-chunked by local expert; the way back mirrors it, and the
routing weights are applied on the token's own rank (router gradients stay local).
Every rank runs the same collectives in the same order whatever the routing (empty sends included), so
no routing can deadlock it. The one host synchronisation per layer reads the split sizes.

The fused dispatchers (te_ep.py: TransformerEngine NCCL-EP; deepep.py: DeepEP, unverified) have the same
interface; choose() resolves `dispatcher=` ("auto" by default) once per apply(), except where only the
weights' dtype stands in te_ep's way: with fp32 master weights under FSDP2's MixedPrecisionPolicy the
tokens are bf16 anyway, so FirstForwardChoice decides at the first forward, on the tokens' dtype.
"""
from __future__ import annotations

import importlib

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from ..ops.experts import Dispatched, LocalDispatcher


def _wait(tensor):
    # functional collectives return an async tensor; torch.compile overlaps them, eager waits here
    return tensor.wait() if hasattr(tensor, "wait") else tensor


def _sort_chunks(x, sizes_list, sizes, order_list, use_te):
    """Reorder the row chunks of x (chunk i has sizes[i] rows) into the chunk order `order_list`.
    Sizes and order come both as host lists (torch path) and, for TE, as device tensors: no extra sync."""
    if use_te and x.is_cuda and x.shape[0] > 0:
        from transformer_engine.pytorch import moe_sort_chunks_by_index

        order = torch.tensor(order_list, dtype=torch.int32, device=x.device)
        return moe_sort_chunks_by_index(x, sizes.to(torch.int32), order)
    chunks = x.split(sizes_list)
    return torch.cat([chunks[i] for i in order_list]) if chunks else x


class AllToAllDispatcher:
    name = "all_to_all"
    takes_in_flight = True  # dispatch(..., in_flight=fn): fn() runs while the rows travel (overlap.py)

    def __init__(self, group, ep_size: int, num_local: int, permuter=None):
        self.group, self.ep_size, self.num_local = group, ep_size, num_local
        self.permuter = permuter or LocalDispatcher()
        self.use_te = getattr(self.permuter, "name", "") == "te_permute"
        self.last_counts = None  # tokens per local expert in the last forward (load-balance statistics)
        grid = torch.arange(ep_size * num_local).view(ep_size, num_local)
        self._by_expert = grid.t().reshape(-1).tolist()  # (rank, expert) chunks -> expert-major
        self._by_rank = torch.arange(ep_size * num_local).view(num_local, ep_size).t().reshape(-1).tolist()

    def dispatch(self, hidden, top_k_index, top_k_weights, num_experts, in_flight=None) -> Dispatched:
        src = self.permuter.dispatch(hidden, top_k_index, top_k_weights, num_experts)
        counts = src.counts  # [E] rows from here per global expert, grouped by owning rank
        counts_recv = torch.empty_like(counts)  # [R * L]: rows rank r sends to my local expert e
        dist.all_to_all_single(counts_recv, counts, group=self.group)
        both = torch.stack([counts, counts_recv]).tolist()  # the one host sync of the layer
        sent, recv = both[0], both[1]
        L = self.num_local
        send_splits = [sum(sent[r * L:(r + 1) * L]) for r in range(self.ep_size)]
        recv_splits = [sum(recv[r * L:(r + 1) * L]) for r in range(self.ep_size)]
        received = all_to_all_single_autograd(src.x, recv_splits, send_splits, self.group)
        if in_flight is not None:
            in_flight()  # queued on the compute stream while NCCL's stream moves the rows
        received = _wait(received)
        rows = _sort_chunks(received, recv, counts_recv, self._by_expert, self.use_te)
        local_counts = counts_recv.view(self.ep_size, L).sum(0)
        self.last_counts = local_counts.detach()
        recv_by_expert = counts_recv.view(self.ep_size, L).t().reshape(-1)
        state = (src, send_splits, recv_splits, recv_by_expert, [recv[i] for i in self._by_expert])
        return Dispatched(rows, local_counts, state)

    def combine(self, out, d: Dispatched, hidden_dtype):
        src, send_splits, recv_splits, recv_by_expert, recv_by_expert_list = d.state
        back_rows = _sort_chunks(out, recv_by_expert_list, recv_by_expert, self._by_rank, self.use_te)
        back = _wait(all_to_all_single_autograd(back_rows, send_splits, recv_splits, self.group))
        return self.permuter.combine(back, src, hidden_dtype)


def dispatch_with(dispatcher, in_flight, *routed) -> Dispatched:
    """dispatcher.dispatch(*routed) with in_flight() (if given) run while the tokens travel, where the
    dispatcher has such a window (takes_in_flight), else right before."""
    if in_flight is not None and getattr(dispatcher, "takes_in_flight", False):
        return dispatcher.dispatch(*routed, in_flight=in_flight)
    if in_flight is not None:
        in_flight()
    return dispatcher.dispatch(*routed)


def _te_ep():
    from .te_ep import TEEPDispatcher  # lazy: TE only where installed

    return TEEPDispatcher


def _deepep():
    from .deepep import DeepEPDispatcher

    return DeepEPDispatcher


DISPATCHERS = {"all_to_all": lambda: AllToAllDispatcher, "te_ep": _te_ep, "deepep": _deepep}
NAMES = ("auto", *DISPATCHERS)


def _deepep_reason():
    try:
        importlib.import_module("deep_ep")
    except Exception as exc:
        return f"deep_ep is not importable ({type(exc).__name__}: {exc})"
    return None if torch.cuda.is_available() else "needs CUDA"


def _agree(flag: int, group) -> int:
    """The smallest flag over the group's ranks (one tiny all-reduce): every rank takes the same branch."""
    device = "cuda" if "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available() else "cpu"
    t = torch.tensor([flag], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t.item())


def choose(name: str, group, dtype) -> tuple[str, str]:
    """(dispatcher, why) for a requested name; raises when a named fused dispatcher cannot run here.
    "auto" takes te_ep when every rank can run it (one small all-reduce, so that all ranks agree), else
    all_to_all; where only the weights' dtype stands in the way it returns "auto" (FirstForwardChoice
    decides on the tokens). DeepEP is never chosen by "auto": it is unverified (see deepep.py)."""
    from ..errors import MeshError
    from .te_ep import unavailable_reason

    if name == "all_to_all":
        return name, "requested"
    if name in ("te_ep", "deepep"):
        # te_ep by name: everything but the dtype is checked here; fp32 weights are fine when the tokens are
        # bf16 (a mixed-precision policy), and te_ep itself refuses other tokens at the first forward
        why = unavailable_reason(group, torch.bfloat16) if name == "te_ep" else _deepep_reason()
        if why:
            raise MeshError(f"dispatcher {name!r} cannot run here: {why}")
        return name, "requested"
    why = unavailable_reason(group, dtype)
    # 2: te_ep runs here; 1: it would, with bf16 tokens (fp32 weights, e.g. cast by a mixed-precision
    # policy at each forward); 0: it cannot
    deferrable = why is not None and dtype != torch.bfloat16 and unavailable_reason(group, torch.bfloat16) is None
    level = _agree(2 if why is None else 1 if deferrable else 0, group)
    if level == 2:
        return "te_ep", "auto: TransformerEngine NCCL-EP fused dispatch available"
    if level == 1:
        return "auto", (f"auto: {str(dtype).replace('torch.', '')} weights; decided at the first forward: te_ep "
                        "if the tokens are bf16 (e.g. FSDP2 MixedPrecisionPolicy), else all_to_all")
    return "all_to_all", f"auto: te_ep unavailable ({why or 'on another rank'})"


class FirstForwardChoice:
    """The deferred "auto" choice of one model, shared by all its experts modules: made once, at the first
    dispatch (every rank dispatches the same layer together, so the agreeing all-reduce is safe there), and
    written into the report rows."""

    def __init__(self, group, rows):
        self.group, self.rows, self.name = group, rows, None

    def decide(self, dtype) -> str:
        if self.name is None:
            bf16 = _agree(int(dtype == torch.bfloat16), self.group)
            self.name = "te_ep" if bf16 else "all_to_all"
            why = "bf16 tokens" if bf16 else f"{str(dtype).replace('torch.', '')} tokens (on some rank)"
            for row in self.rows:
                row.replacement = row.replacement.replace("/auto", f"/{self.name}")
                row.reason += f"; at the first forward: dispatcher {self.name} ({why})"
        return self.name


class DeferredDispatcher:
    """Stands in for te_ep or all_to_all until FirstForwardChoice has decided, then delegates."""

    def __init__(self, choice: FirstForwardChoice, group, ep_size, num_local, permuter=None, max_tokens_per_rank=None):
        self.choice, self.inner = choice, None
        self._args = (group, ep_size, num_local, permuter, max_tokens_per_rank)

    @property
    def name(self) -> str:
        return self.inner.name if self.inner is not None else "auto"

    takes_in_flight = True

    def dispatch(self, hidden, top_k_index, top_k_weights, num_experts, in_flight=None) -> Dispatched:
        if self.inner is None:
            chosen = self.choice.decide(hidden.dtype)
            group, ep_size, num_local, permuter, max_tokens = self._args
            extra = dict(max_tokens_per_rank=max_tokens) if chosen == "te_ep" else {}
            self.inner = DISPATCHERS[chosen]()(group, ep_size, num_local, permuter=permuter, **extra)
        return dispatch_with(self.inner, in_flight, hidden, top_k_index, top_k_weights, num_experts)

    def combine(self, out, d: Dispatched, hidden_dtype):
        return self.inner.combine(out, d, hidden_dtype)

    @property
    def last_counts(self):
        return self.inner.last_counts if self.inner is not None else None
