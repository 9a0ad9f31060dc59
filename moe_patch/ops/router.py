"""Top-k routers, described by a small spec instead of one class per family.

The spec (see patches/*.py) says how a family scores and picks experts:
  score:    "softmax" | "sigmoid"
  order:    "score_topk" (score all experts, then top-k) | "topk_score" (top-k logits, then softmax of those)
  renorm:   True | False | name of a boolean attribute on the router (e.g. "norm_topk_prob")
  grouped:  DeepSeek-style: correction bias for the choice, group-limited top-k, routed scaling factor
  fp32_logits: the router matmul runs in fp32 (DeepSeek family; bf16 operands on CUDA: ops/bf16x3_linear.py)
  weights_dtype: "logits" (cast back to the logits dtype), "float" (keep fp32), "input" (hidden dtype)
Every spec is proven against the family's own router at plan time (probe.py) before it is used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import bf16x3_linear
from .base import Replacement

DEFAULTS = dict(score="softmax", order="score_topk", renorm=False, grouped=False, fp32_logits=False,
                weights_dtype="logits")


def topk_route(logits: torch.Tensor, spec: dict, *, top_k: int, renorm: bool, correction_bias=None,
               num_group: int = 1, topk_group: int = 1, scaling: float = 1.0):
    """(logits [T, E]) -> (weights [T, k], indices [T, k]) in the family's exact arithmetic."""
    if spec["order"] == "topk_score":
        top_logits, idx = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(top_logits, dim=-1, dtype=top_logits.dtype), idx
    if spec["score"] == "sigmoid":
        scores = logits.sigmoid()
    else:
        scores = torch.softmax(logits, dim=-1, dtype=torch.float)
    if spec["grouped"]:
        choice = scores + correction_bias
        t, e = choice.shape
        group_scores = choice.view(t, num_group, e // num_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(t, num_group, e // num_group).reshape(t, e)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        idx = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, idx)
        if renorm:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * scaling, idx
    weights, idx = torch.topk(scores, top_k, dim=-1)
    if renorm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, idx


class TopKRouter(Replacement):
    """The family's router in the spec's arithmetic. top_k, the renormalisation switch (spec "renorm" naming
    an attribute), num_group / topk_group / routed_scaling_factor are the module's own attributes (adopted
    from the original, base.py), read at each forward: set after apply(), they are honoured as stock does."""

    kind = "router"

    def __init__(self, original, spec: dict):
        super().__init__(original)
        self.spec = {**DEFAULTS, **spec}
        self.top_k = original.top_k
        self.num_experts = self.weight.shape[0]
        self.hidden_dim = self.weight.shape[1]

    def renorm_now(self) -> bool:
        renorm = self.spec["renorm"]
        return bool(getattr(self, renorm)) if isinstance(renorm, str) else bool(renorm)

    def switches(self) -> tuple:
        """(num_group, topk_group, scaling) as set on the module now (`is None`, not `or`: a user's 0 is a
        value; absent or None means the family has no such switch)."""
        return tuple(d if getattr(self, a, None) is None else getattr(self, a)
                     for a, d in (("num_group", 1), ("topk_group", 1), ("routed_scaling_factor", 1.0)))

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.spec["fp32_logits"] and bf16x3_linear.usable(hidden_states, self.weight):
            logits = bf16x3_linear.linear(hidden_states, self.weight)  # the same float32 GEMM on tensor cores
        elif self.spec["fp32_logits"]:
            logits = F.linear(hidden_states.float(), self.weight.float())
        else:
            logits = F.linear(hidden_states, self.weight, self._parameters.get("bias"))
        if self.spec["weights_dtype"] == "input":  # granite: scores from fp32 logits, cast to the input dtype
            logits = logits.float()
        return logits

    def route(self, logits: torch.Tensor):
        num_group, topk_group, scaling = self.switches()
        return topk_route(
            logits, self.spec, top_k=self.top_k, renorm=self.renorm_now(),
            correction_bias=getattr(self, "e_score_correction_bias", None),
            num_group=num_group, topk_group=topk_group, scaling=scaling,
        )

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = self.logits(hidden_states)
        weights, idx = self.route(logits)
        target = {"logits": logits.dtype, "float": weights.dtype, "input": hidden_states.dtype}
        return logits, weights.to(target[self.spec["weights_dtype"]]), idx

    def extra_repr(self) -> str:
        s = self.spec
        return f"{super().extra_repr()}, {s['score']}/{s['order']}, top_k={self.top_k}, grouped={s['grouped']}"


def te_arguments(spec: dict, renorm: bool) -> dict:
    """The spec in the terms of TE's fused_topk_with_score_function (proven equal by the probe before use).

    Softmax then top-k then renormalisation is softmax over the top-k logits (use_pre_softmax=False), as is
    a family that takes the top-k logits first; without renormalisation the softmax comes first."""
    spec = {**DEFAULTS, **spec}
    pre_softmax = spec["order"] == "score_topk" and spec["score"] == "softmax" and not renorm
    return dict(score_function=spec["score"], use_pre_softmax=pre_softmax)


class TERouter(TopKRouter):
    """Score + top-k (+ renormalisation, group limit, correction bias, scaling) in TE's fused router kernel,
    forward and backward: one kernel each way instead of softmax / topk / sum / div and their gradients."""

    def route(self, logits: torch.Tensor):
        from transformer_engine.pytorch.router import fused_topk_with_score_function

        # fp32 weights ("float" / "input" specs) come from fp32 scores: TE's probs take the logits' dtype
        scores_in = logits.float() if self.spec["weights_dtype"] == "float" else logits
        num_group, topk_group, scaling = self.switches()
        grouped = self.spec["grouped"] and num_group > 1
        # the index buffer makes TE write dense [T, k] indices (no [T, E] routing map)
        idx = torch.empty(logits.shape[0], self.top_k, dtype=torch.int64, device=logits.device)
        probs, idx = fused_topk_with_score_function(
            scores_in, topk=self.top_k, num_groups=num_group if grouped else None,
            group_topk=topk_group if grouped else None,
            scaling_factor=scaling if self.spec["grouped"] else None,
            expert_bias=self.e_score_correction_bias.float() if self.spec["grouped"] else None,
            topk_indices=idx, **te_arguments(self.spec, self.renorm_now()))
        return probs.gather(1, idx), idx  # probs is [T, E], zero off the chosen experts


def canonical(outputs: list) -> list:
    """Router outputs with each token's (expert, weight) pairs in expert order: the experts sum over the
    k pairs, so their order is not part of a router's result (kernels differ in it)."""
    if len(outputs) != 3 or outputs[2].is_floating_point():
        return outputs
    logits, weights, idx = outputs
    idx_sorted, order = idx.sort(dim=-1)
    return [logits, weights.gather(1, order), idx_sorted]


def untied_rows(router, x: torch.Tensor) -> torch.Tensor:
    """Rows of x on which `router`'s top-k is unique: its k-th and (k+1)-th largest logits differ. On a tie
    either expert is a right answer and kernels differ in which one they keep (bf16 logits tie often), so
    routers are compared on the other rows."""
    logits = router(x)[0].float()
    if router.top_k >= logits.shape[-1]:
        return torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    top = logits.topk(router.top_k + 1, dim=-1).values
    return top[:, router.top_k - 1] != top[:, router.top_k]
