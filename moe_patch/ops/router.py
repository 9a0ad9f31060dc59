"""Top-k routers, described by a small spec instead of one class per family.

The spec (see patches/*.py) says how a family scores and picks experts:
  score:    "softmax" | "sigmoid"
  order:    "score_topk" (score all experts, then top-k) | "topk_score" (top-k logits, then softmax of those)
  renorm:   True | False | name of a boolean attribute on the router (e.g. "norm_topk_prob")
  grouped:  DeepSeek-style: correction bias for the choice, group-limited top-k, routed scaling factor
  fp32_logits: the router matmul runs in fp32 (DeepSeek family)
  weights_dtype: "logits" (cast back to the logits dtype), "float" (keep fp32), "input" (hidden dtype)
Every spec is proven against the family's own router at plan time (probe.py) before it is used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
    kind = "router"

    def __init__(self, original, spec: dict):
        super().__init__(original)
        self.spec = {**DEFAULTS, **spec}
        renorm = self.spec["renorm"]
        self.renorm = bool(getattr(original, renorm)) if isinstance(renorm, str) else bool(renorm)
        self.top_k = original.top_k
        self.num_experts = self.weight.shape[0]
        self.hidden_dim = self.weight.shape[1]
        self.num_group = getattr(original, "num_group", 1) or 1
        self.topk_group = getattr(original, "topk_group", 1) or 1
        self.scaling = getattr(original, "routed_scaling_factor", 1.0) or 1.0

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        bias = self._parameters.get("bias")
        if self.spec["fp32_logits"]:
            logits = F.linear(hidden_states.float(), self.weight.float())
        else:
            logits = F.linear(hidden_states, self.weight, bias)
        if self.spec["weights_dtype"] == "input":  # granite: scores from fp32 logits, cast to the input dtype
            logits = logits.float()
        weights, idx = topk_route(
            logits, self.spec, top_k=self.top_k, renorm=self.renorm,
            correction_bias=getattr(self, "e_score_correction_bias", None),
            num_group=self.num_group, topk_group=self.topk_group, scaling=self.scaling,
        )
        target = {"logits": logits.dtype, "float": weights.dtype, "input": hidden_states.dtype}
        return logits, weights.to(target[self.spec["weights_dtype"]]), idx

    def extra_repr(self) -> str:
        s = self.spec
        return f"{super().extra_repr()}, {s['score']}/{s['order']}, top_k={self.top_k}, grouped={s['grouped']}"
