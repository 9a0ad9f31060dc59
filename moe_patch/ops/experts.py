"""Fused-3D experts as grouped GEMM, behind a token dispatcher.

forward = dispatcher.dispatch -> grouped up-projection -> gate -> grouped down-projection -> dispatcher.combine

The dispatcher groups each (token, k) pair by expert (one stable sort) and later scatters the expert
outputs back with the routing weights applied. Without a mesh it is LocalDispatcher; with expert
parallelism (moe_patch.parallel) it sends the grouped tokens to the rank owning their expert and back.

The v5 layout flags set by `@use_experts_implementation` are honoured: `is_transposed` (weights stored
[E, in, out]), `has_bias`, `has_gate` (gate_up_proj vs up_proj) and `has_post_expert_norm`. The gate
itself is the family's own `_apply_gate` (plain SwiGLU, GPT-OSS's clamped interleaved SwiGLU, ...), so a
family quirk is never re-implemented here; non-gated experts (Nemotron-H, relu^2) use the family's act_fn.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import compiled, tuned_gemm
from .base import Replacement
from .compiled_gate import add_bias_and_weigh, add_expert_bias, switches

FLAG_NAMES = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm")


def _aligned(t: torch.Tensor) -> bool:
    """grouped_mm needs 16-byte aligned data and strides (odd expert widths are not)."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in t.stride() if s != 1)


# the dtypes torch's grouped_mm takes (CPU included: a float64 model, e.g. after model.double(), runs the loop)
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, tuned: bool = False) -> torch.Tensor:
    """x [S, in] sorted by group, w [G, in, out], offs [G] int32 cumulative ends -> [S, out]. tuned: the experts
    module was planned with MOE_PATCH_TUNED_GEMM=1 (inductor's autotuned kernels where tuned_gemm.usable)."""
    w = w.to(x.dtype) if w.dtype != x.dtype else w
    bf16_only = x.device.type == "cuda" or torch.compiler.is_compiling()  # CUDA kernel / fake kernel
    # the backward runs grouped_mm on the output's gradient [S, out] too: its rows must be aligned as well
    out_aligned = w.shape[-1] * x.element_size() % 16 == 0
    if (hasattr(F, "grouped_mm") and (x.dtype == torch.bfloat16 or not bf16_only) and x.dtype in _GROUPED_MM_DTYPES
            and x.shape[0] > 0 and _aligned(x) and _aligned(w) and out_aligned):
        if tuned and tuned_gemm.usable(x, w):  # the same product on inductor's autotuned kernels (tuned_gemm.py)
            return tuned_gemm.grouped_mm(x, w, offs)
        return F.grouped_mm(x, w, offs=offs)
    # Per-group loop: grouped_mm is bf16-only on CUDA and under torch.compile, has no float64 kernel, needs aligned
    # operands (the output's gradient included: odd expert widths are not), and
    # an empty batch still has to touch the weights so that every rank produces a (zero) gradient for them.
    outs, start = [], 0
    for g, end in enumerate(offs.tolist()):
        outs.append(x[start:end] @ w[g])
        start = end
    out = torch.cat(outs) if outs else x.new_zeros(0, w.shape[-1])
    return out if x.shape[0] > 0 else out + 0.0 * w.sum()


class _GradTimes(torch.autograd.Function):
    """Identity forward (a view, no kernel); backward: the gradient times `factor`."""

    @staticmethod
    def forward(ctx, t, factor: float):
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def grouped_linear(x, weight, offs, bias_rows=None, transposed=False, tuned=False):
    out = grouped_mm(x, weight if transposed else weight.transpose(-2, -1), offs, tuned)
    return out + bias_rows if bias_rows is not None else out


@dataclass
class Dispatched:
    """Tokens grouped by (local) expert, plus what combine() needs to put them back."""

    x: torch.Tensor  # [S, hidden] rows grouped by expert
    counts: torch.Tensor  # [local experts] rows per expert
    state: object  # dispatcher-private
    # [S] routing weight of each row where the experts module applies them itself (the dispatcher's combine
    # then only sums); None where the combine weighs the rows
    weights: torch.Tensor | None = None

    def offsets(self) -> torch.Tensor:
        """[local experts] int32 cumulative row ends: grouped_mm's `offs`."""
        return torch.cumsum(self.counts, 0).to(torch.int32)

    def offsets_and_expert_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """offsets() and [S] int64 local expert of each row (biased experts gather their bias rows by it), in one
        compiled call on CUDA (compiled.run: two kernels, where the eager ops are six kernels behind four
        dispatches, and the forward of a MoE layer is host-bound in its routing stretch); no host sync."""
        return compiled.run(_offsets_and_expert_ids, self.counts, self.x)


def _offsets_and_expert_ids(counts: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """counts [E] int64, rows [S, ...] grouped by expert -> (cumulative ends [E] int32, expert of each row [S]
    int64). Row r is in expert e where ends[e - 1] <= r < ends[e]: the first end greater than r (experts with no
    rows have ends[e - 1] == ends[e] and are passed over), what repeat_interleave(arange(E), counts) gives."""
    ends = torch.cumsum(counts, 0)
    ids = torch.searchsorted(ends, torch.arange(rows.shape[0], device=ends.device), right=True)
    return ends.to(torch.int32), ids


def expert_counts(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Rows per expert, on the device without a host sync (torch.bincount reads its max on the host:
    one sync per MoE layer, which drains the GPU queue)."""
    flat = top_k_index.reshape(-1)
    if torch.are_deterministic_algorithms_enabled():  # index_add_ is flagged (atomics), bincount is not
        return torch.bincount(flat, minlength=num_experts)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int64))


class LocalDispatcher:
    """All experts on this device: sort (token, k) pairs by expert, scatter back with weights applied."""

    name = "local"

    def dispatch(self, hidden, top_k_index, top_k_weights, num_experts) -> Dispatched:
        num_tokens, top_k = top_k_index.shape
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        weights = top_k_weights.reshape(-1)[order]
        counts = expert_counts(flat, num_experts)
        return Dispatched(hidden[order // top_k], counts, (order, weights, num_tokens, top_k))

    def combine(self, out: torch.Tensor, d: Dispatched, hidden_dtype) -> torch.Tensor:
        order, weights, num_tokens, top_k = d.state
        return scatter_weighted(out, order, weights, num_tokens, top_k, hidden_dtype)


def _weigh(out, weights):
    return out * weights.unsqueeze(-1)


def _weigh_backward(g, out, weights):
    return (g * weights.unsqueeze(-1)).to(out.dtype), (g * out).sum(-1).to(weights.dtype)


class _WeightedRows(torch.autograd.Function):
    """out [S, H] * weights [S] per row, both directions compiled on CUDA (compiled.py). Eager, the
    [S, 1] operand broadcasts with stride 0, which sends the multiply to torch's strided (non-vectorised)
    kernel: 0.68 ms per call over the 131k x 2048 rows of a Qwen3-30B-A3B layer on an H200, twice a layer
    (forward, and the rows' gradient), plus a product and a reduction for the weights' gradient."""

    @staticmethod
    def forward(ctx, out, weights):
        ctx.save_for_backward(out, weights)
        return compiled.run(_weigh, out, weights)

    @staticmethod
    def backward(ctx, g):
        out, weights = ctx.saved_tensors
        d_out, d_weights = compiled.run(_weigh_backward, g, out, weights)
        return d_out, d_weights


def weigh_rows(out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out * weights[:, None] in the promoted dtype, as the families' experts weigh their outputs."""
    return _WeightedRows.apply(out, weights)


def scatter_weighted(out, order, weights, num_tokens, top_k, hidden_dtype):
    """Rows back to (token, k) slots through `order` (an index_put, no inverse permutation), weighted,
    summed over k in the promoted dtype as Transformers does (fp32 when the weights are fp32)."""
    weighted = weigh_rows(out, weights)
    slots = weighted.new_zeros(num_tokens * top_k, out.shape[-1])
    slots = slots.index_put((order,), weighted)
    return slots.view(num_tokens, top_k, out.shape[-1]).sum(dim=1).to(hidden_dtype)


# attributes GroupedExperts sets and changes itself (sharding sets the local expert count), and nn.Module's
# `training`: from_pretrained returns eval mode, so a model patched right after loading is put in train() before
# it trains; that must not switch the fused gate off (te_gate proves TE's SwiGLU in both modes; the compiled gate
# runs the family's own _apply_gate, which torch.compile re-traces for the mode)
_MANAGED = frozenset(FLAG_NAMES) | {"up_name", "num_experts", "num_global_experts", "grad_factor", "training"}


class GroupedExperts(Replacement):
    kind = "experts"

    def __init__(self, original, flags: dict, backend: str = "torch", fused_gate=None, fp8: bool = False,
                 tuned: bool = False):
        super().__init__(original)
        # tuned: the bf16 grouped GEMMs on inductor's autotuned kernels (tuned_gemm.py), chosen when apply() planned
        # the module (MOE_PATCH_TUNED_GEMM=1 on a GPU) and shown in its report row; outside the module tree
        object.__setattr__(self, "_tuned_gemm", bool(tuned))
        # fp8: the forward and input-gradient GEMMs in FP8 with each weight quantised once per change
        # (fp8_experts.py); None keeps every GEMM on the bf16 path. Outside the module tree: no state_dict keys
        object.__setattr__(self, "_fp8_cache", None)
        if fp8:
            from . import fp8_experts

            fp8_experts.install_step_hook()
            object.__setattr__(self, "_fp8_cache", fp8_experts.FP8WeightCache())
        # a fused kernel proven equal to the family's _apply_gate (te_gate.py), or None; outside the module tree
        object.__setattr__(self, "_fused_gate", fused_gate)
        # the gate's switches the fused kernel was proven with (e.g. GPT-OSS's alpha / limit): a value set on
        # the module after apply() sends the rows to the family's own gate
        object.__setattr__(self, "_gate_proven", self._gate_switches())
        for name in FLAG_NAMES:
            setattr(self, name, bool(flags[name]))
        self.up_name = "gate_up_proj" if self.has_gate else "up_proj"
        self.num_experts = getattr(self, self.up_name).shape[0]  # local experts once sharded
        self.num_global_experts = self.num_experts
        self._overlap = None  # with expert parallelism, maybe the block's shared expert (parallel/overlap.py)
        self.grad_factor = None  # with expert parallelism: 1 / ep (parallel/shard.py)
        if backend == "te":
            from .te_permute import TEPermuteDispatcher  # lazy: TE only on GPU machines

            self.dispatcher = TEPermuteDispatcher()
        else:
            self.dispatcher = LocalDispatcher()

    def _gate_switches(self) -> tuple:
        return switches(self, _MANAGED)

    def expert_weight(self, name: str) -> torch.Tensor:
        """A stacked expert parameter as the plain local tensor the kernels take (under
        parallel.fsdp.fully_shard_moe's 1-D path it is a DTensor sharded over the ep ranks; to_local is
        differentiable). Under expert parallelism its gradient collects the tokens of every rank (the
        dispatch's backward sums over the ep group), so it is scaled by grad_factor = 1 / ep: the gradient
        of the mean of the per-rank losses, as DDP and FSDP give the dense parameters."""
        p = getattr(self, name)
        p = p.to_local() if hasattr(p, "to_local") else p
        if self.grad_factor is not None and p.requires_grad:
            p = _GradTimes.apply(p, self.grad_factor)
        return p

    def _linear(self, x, name: str, offs, bias_rows):
        weight = self.expert_weight(name)
        if self._fp8_cache is not None:
            from . import fp8_experts

            if fp8_experts.runs_fp8(x, weight):
                out = fp8_experts.grouped_linear_fp8(x, weight, offs, getattr(self, name), self._fp8_cache, name,
                                                     self.is_transposed)
                return out + bias_rows if bias_rows is not None else out
        # (.get: a module pickled by a version without the attribute stays on F.grouped_mm)
        return grouped_linear(x, weight, offs, bias_rows, self.is_transposed, self.__dict__.get("_tuned_gemm", False))

    def compute(self, d: Dispatched):
        """Grouped expert MLP over rows already grouped by local expert."""
        x = d.x
        offs, expert_ids = d.offsets_and_expert_ids() if self.has_bias else (d.offsets(), None)

        def biased(name, x):
            """Projection `name` of the rows x, plus each row's expert bias (compiled_gate.add_expert_bias: the bias
            gathered inside one compiled kernel on CUDA; its gradient sums each expert's rows in one GEMM)."""
            out = self._linear(x, name, offs, None)
            return add_expert_bias(out, self.expert_weight(name + "_bias"), expert_ids) if self.has_bias else out

        # a fused gate (TE's SwiGLU, or the family's own gate compiled: compiled_gate.py) where it was proven to be
        # the family's gate with the switches the module has now, else the family's own gate (or activation) on
        # its original module (the family's code runs on this module: its attributes, adopted from the original,
        # are the ones a user reads and sets after apply())
        fused = self.has_gate and self._fused_gate is not None and self._gate_switches() == self._gate_proven
        if fused and getattr(self._fused_gate, "takes_bias", False):  # the bias add inside the gate's kernels
            h = self._fused_gate(self._linear(x, self.up_name, offs, None), self.expert_weight(self.up_name + "_bias"),
                                 expert_ids)
        else:
            h = biased(self.up_name, x)
            if self.has_gate:
                h = self._fused_gate(h) if fused else self._apply_gate(h)
            else:
                h = self.act_fn(h)
        # rows weighted by the module (d.weights): before the down projection where that is the same linear
        # map ((h * w) @ W == (h @ W) * w without a bias or a norm after it, and no dtype promotion), since
        # the intermediate rows are narrower than the hidden ones (768 against 2048 wide in Qwen3-30B-A3B)
        fold = (d.weights is not None and not self.has_bias and not self.has_post_expert_norm
                and d.weights.dtype == h.dtype)
        if fold:
            h = weigh_rows(h, d.weights)
        if self.has_bias and d.weights is not None and not self.has_post_expert_norm:
            # bias add and row weighting in one compiled kernel each way (compiled_gate.add_bias_and_weigh)
            return add_bias_and_weigh(self._linear(h, "down_proj", offs, None), self.expert_weight("down_proj_bias"),
                                      expert_ids, d.weights)
        out = biased("down_proj", h)
        if self.has_post_expert_norm:
            out = self.post_expert_norm(out)
        if d.weights is not None and not fold:
            out = weigh_rows(out, d.weights)
        return out

    def forward(self, hidden_states, top_k_index=None, top_k_weights=None, **aliases):
        top_k_index = aliases.pop("router_indices", top_k_index)
        top_k_weights = aliases.pop("routing_weights", top_k_weights)
        state = self.__dict__
        ep = state.get("_ep")
        if ep is not None and ep[2] > 1 and state.get("_is_fsdp_managed_module") \
                and not state.get("_fsdp_by_moe_patch"):
            # expert-parallel experts that FSDP2 manages outside fully_shard_moe (torch's own fully_shard): their
            # parameters mix the ranks' experts. fully_shard refuses this already (parallel/fsdp.install_refusal);
            # this holds whatever torch's internals become, at the cost of a dict lookup or two per forward
            from ..parallel.fsdp import refusal

            raise refusal(type(self).__name__)
        routed = (hidden_states, top_k_index, top_k_weights, self.num_global_experts)
        if self._overlap is not None:
            d = self._overlap.dispatch(self.dispatcher, *routed)
        else:
            d = self.dispatcher.dispatch(*routed)
        out = self.compute(d)
        return self.dispatcher.combine(out, d, hidden_states.dtype)

    def extra_repr(self) -> str:
        flags = ", ".join(n for n in FLAG_NAMES if getattr(self, n))
        gate = f", {getattr(self._fused_gate, 'label', 'fused gate')}" if self._fused_gate is not None else ""
        gate += ", fp8 rowwise" if self._fp8_cache is not None else ""
        gate += ", grouped_mm autotuned" if self.__dict__.get("_tuned_gemm") else ""
        return (f"{super().extra_repr()}, experts={self.num_experts}/{self.num_global_experts}, "
                f"dispatcher={self.dispatcher.name}{gate}, {flags or 'no flags'}")
