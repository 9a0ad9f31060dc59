"""TransformerEngine modules behind moe_patch's adopt-don't-copy rule (GPU with TE installed only).

The TE module is kept *outside* the module tree (object.__setattr__), with the replacement's Parameter
objects (the original ones; re-pointed at every forward if FSDP2 or a load replaced them) registered into
it: the model's state_dict keeps Hugging Face's keys and never gains TE's `_extra_state`, and the weights
stay the HF parameters (bf16/fp32 master weights; FP8 copies are TE's transient casts).
FP8: each TE module runs under `transformer_engine.pytorch.autocast` with the chosen recipe.
"""
from __future__ import annotations

import torch
import transformer_engine.pytorch as te
from transformer_engine.common import recipe as te_recipe

from .base import Replacement, current_params_into
from .rmsnorm import eps_of

FP8_RECIPES = ("delayed", "current", "mxfp8")


def make_recipe(name: str | None):
    if name is None:
        return None
    return {"delayed": te_recipe.DelayedScaling, "current": te_recipe.Float8CurrentScaling,
            "mxfp8": te_recipe.MXFP8BlockScaling}[name]()


def fp8_unavailable(name: str) -> str | None:
    """None if this GPU runs the recipe, else why not."""
    ok, reason = te.is_mxfp8_available(return_reason=True) if name == "mxfp8" else \
        te.is_fp8_available(return_reason=True)
    return None if ok else (reason or f"{name} FP8 is not supported on this GPU")


def _inner(make):
    try:  # no allocation: the HF parameters replace TE's right away
        return make("meta")
    except Exception:
        return make("cuda")


class _TEModule(Replacement):
    fp8_recipe = None

    def _run(self, x, **kwargs):
        inner = self._moe_patch_te
        current_params_into(inner, self)  # e.g. FSDP2's unsharded parameters of this forward
        # FP8 GEMMs need the row count divisible by 16 (decoding one token, logits_to_keep=1): run bf16 then
        if self.fp8_recipe is None or (x.numel() // x.shape[-1]) % 16:
            return inner(x)
        with te.autocast(enabled=True, recipe=self.fp8_recipe):
            return inner(x, **kwargs)


class TELinear(_TEModule):
    """te.Linear on the HF weight. Under FP8 the weight's FP8 copy is made once per weight change, not once per
    forward: TE's `is_first_microbatch` is derived here (True when the weight's key changed since the last
    FP8 forward: a new Parameter object or storage, a bumped `_version`, a torch optimizer step, a switch of
    grad mode; fp8_experts.FP8WeightCache.key), so the micro-batches of gradient accumulation reuse TE's
    cached copy without the user passing anything. reuse_fp8_weights=False (class attribute) quantises at
    every forward as before (the benchmark's comparison)."""

    kind = "linear"
    reuse_fp8_weights = True

    def __init__(self, original, fp8_recipe=None):
        super().__init__(original)
        w, b = original.weight, original.bias
        inner = _inner(lambda dev: te.Linear(w.shape[1], w.shape[0], bias=b is not None, params_dtype=w.dtype,
                                             device=dev))
        inner.weight = w
        if b is not None:
            inner.bias = b
        object.__setattr__(self, "_moe_patch_te", inner)
        object.__setattr__(self, "_moe_patch_weight_key", None)  # the weight's key at the last FP8 forward
        self.fp8_recipe = fp8_recipe
        if fp8_recipe is not None:
            from .fp8_experts import install_step_hook

            install_step_hook()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_recipe is None or not self.reuse_fp8_weights or (x.numel() // x.shape[-1]) % 16:
            return self._run(x)
        from .fp8_experts import FP8WeightCache

        key = (id(self.weight), FP8WeightCache.key(self.weight), torch.is_grad_enabled())
        first = key != self._moe_patch_weight_key
        object.__setattr__(self, "_moe_patch_weight_key", key)
        return self._run(x, is_first_microbatch=first)


class TERMSNorm(_TEModule):
    kind = "rmsnorm"

    def __init__(self, original, variant: str = "scale"):
        super().__init__(original)
        w = original.weight
        inner = _inner(lambda dev: te.RMSNorm(w.shape[0], eps=eps_of(original), zero_centered_gamma=variant == "offset",
                                              dtype=w.dtype, device=dev))
        inner.weight = w
        object.__setattr__(self, "_moe_patch_te", inner)
        object.__setattr__(self, "_moe_patch_eps", eps_of(original))  # the eps TE's module was built with
        self.variant = variant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = eps_of(self)  # the module's own attribute, read now: a value set after apply() is honoured
        if eps != self._moe_patch_eps:  # by the torch formula (TE's module keeps the eps it was built with)
            from .rmsnorm import torch_rms_norm

            return torch_rms_norm(x, self.weight, eps, self.variant)
        return self._run(x)
