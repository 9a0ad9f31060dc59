"""Fused RoPE: Liger's Triton kernel in place of a family's `apply_rotary_pos_emb` (GPU, Liger installed).

The stock RoPE is a chain of elementwise kernels over q and k each way (slices, a negation, a cat, two
broadcast products, a sum); Liger's kernel rotates q and k in one pass each way. Attention modules are not
swapped (attention.py), and their forward calls the global `apply_rotary_pos_emb` of its modeling module.
So a forward pre-hook on each marked attention module points that global at a plain function that takes
Liger's kernel for the call shape it was proven on (same head and rotary widths, device type, default
unsqueeze_dim) and the family's function otherwise, and a forward hook (always called, also on errors)
points it back: other models of the family in the process keep the stock RoPE. Under torch.compile, dynamo
reads the global before the switch takes effect and traces the family's RoPE, which inductor fuses itself
(a permanent wrapper object on the global instead made dynamo's guards fail). Liger's
kernel (standard half-split rotation, or its form for un-duplicated half-width cos/sin) is proven equal to
the family's function on the model's own cos/sin (fp32 and bf16, outputs and gradients) before it is used.
"""
from __future__ import annotations

import inspect
import re
import sys
import warnings

import torch

from .. import probe

# Everything is keyed by the family function the proof was made against (the module's global at apply() time), not
# by the module alone: a function replaced after a proof (by the user, or by another library's patch) is not
# given the proof of the one it replaced.
_SHAPES: dict = {}  # (modeling module name, family function) -> {(q head width, cos width, device type): fused}
_PROVEN: dict = {}  # (modeling module name, family function) -> the function the hooks install during a forward
_RESTORE: dict = {}  # that installed function -> the family function the forward hook puts back
_CACHE: dict = {}  # (modeling module name, cos width, family function) -> (candidate or None, reason)
_WARNED: set = set()  # (modeling module name, replacement) already warned about


def _liger_candidates():
    from liger_kernel.transformers.rope import liger_rotary_pos_emb, liger_rotary_pos_emb_gpt_oss

    # (name, fused function, q head width for a cos/sin width w)
    return [("liger rope", liger_rotary_pos_emb, lambda w: w),
            ("liger rope (half-width cos/sin)", liger_rotary_pos_emb_gpt_oss, lambda w: 2 * w)]


def _rotary_embedding(model):
    for name, module in model.named_modules():
        if type(module).__name__.endswith("RotaryEmbedding") and not name.count(".layers."):
            return module
    return None


def _modeling_module(attention_module):
    return sys.modules[type(attention_module).__module__]


def why_not_by_source(attention_module) -> str | None:
    """Why Liger's kernel cannot stand in for this attention module's RoPE, read from its modeling module and the
    source of its forward alone (nothing runs, so a model on the meta device will do: `moe-patch report`'s GPU
    preview asks this too), or None where only the numeric proof (prove) can tell. The kernel replaces the
    module's global `apply_rotary_pos_emb` and nothing else, so a forward that calls no RoPE function (Nemotron-H's
    attention) or another one as well (DeepSeek-V3's `apply_rotary_pos_emb_interleave`) keeps its own."""
    mod = _modeling_module(attention_module)
    if getattr(mod, "apply_rotary_pos_emb", None) is None:
        return "no apply_rotary_pos_emb in the family's modeling module: stock RoPE"
    try:
        source = inspect.getsource(type(attention_module).forward)
    except (OSError, TypeError):
        source = ""
    others = sorted(set(re.findall(r"\b(apply_rotary_pos_emb\w+|apply_rotary_emb\w*)\(", source)))
    if "apply_rotary_pos_emb(" not in source and not others:
        return "the attention forward calls no apply_rotary_pos_emb (it applies no RoPE there): no Liger RoPE"
    if others:
        return f"the attention forward calls {', '.join(others)} (Liger's kernel stands in for apply_rotary_pos_emb " \
               "only): stock RoPE"
    return None


def prove(model, attention_module) -> tuple[str | None, str]:
    """(label, "") if a Liger kernel equals this family's apply_rotary_pos_emb on the model's own cos/sin,
    else (None, why not). One probe per modeling module, rotary width and family function per process (a function
    replaced since an earlier proof is proven anew); the model is not changed."""
    why = why_not_by_source(attention_module)
    if why is not None:
        return None, why
    mod = _modeling_module(attention_module)
    stock = mod.apply_rotary_pos_emb
    if not _hashable(stock):  # a callable object without __hash__ set there: it keys every table below
        return None, f"{mod.__name__}.apply_rotary_pos_emb is an unhashable {type(stock).__name__}: stock RoPE"
    stock = _RESTORE.get(stock, stock)  # (proven while a patched forward has the kernel's function installed)
    rotary = _rotary_embedding(model)
    if rotary is None:
        return None, "no rotary embedding module found: stock RoPE"
    buffers = list(rotary.buffers())
    device = buffers[0].device if buffers else torch.device("cpu")
    try:
        x = torch.zeros(1, 1, device=device)
        cos, _ = rotary(x, torch.arange(8, device=device)[None])
    except Exception as exc:  # an unusual rotary signature: not worth a guess
        return None, f"rotary embedding not callable as (x, position_ids) ({type(exc).__name__}): stock RoPE"
    key = (mod.__name__, cos.shape[-1], stock)
    if key not in _CACHE:
        _CACHE[key] = _probe(stock, rotary, cos.shape[-1], device)
    found, why = _CACHE[key]
    if found is None:
        return None, why
    label, fused, q_width = found
    head_dim = getattr(attention_module, "head_dim", q_width)
    if head_dim != q_width:  # the call shape proven would never occur: say so rather than claim the kernel
        return None, f"partial rotary ({q_width} of head dim {head_dim}): stock RoPE"
    # every proven call shape of this family function (two models of one family may differ in head or rotary width)
    _SHAPES.setdefault((mod.__name__, stock), {})[(q_width, cos.shape[-1], device.type)] = fused
    if (mod.__name__, stock) not in _PROVEN:
        call = _PROVEN[(mod.__name__, stock)] = _call(stock, _SHAPES[(mod.__name__, stock)])
        _RESTORE[call] = stock
    return label, ""


def _probe(stock, rotary, cos_width, device):
    try:
        candidates = _liger_candidates()
    except Exception as exc:
        return None, f"Liger's RoPE not importable ({type(exc).__name__}): stock RoPE"
    reasons = []
    for label, fused, width in candidates:
        d = width(cos_width)
        why = _equal(stock, fused, rotary, d, device)
        if why is None:
            return (label, fused, d), ""
        reasons.append(f"{label}: {why}")
    return None, "Liger's RoPE is not the family's (" + "; ".join(reasons) + "): stock RoPE"


def _equal(stock, fused, rotary, head_dim, device) -> str | None:
    g = torch.Generator(device=device).manual_seed(0)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            positions = torch.arange(3, 19, device=device)[None].expand(2, -1)
            cos, sin = rotary(torch.zeros(1, 1, device=device, dtype=dtype), positions)
            q = torch.randn(2, 16, 4, head_dim, device=device, generator=g).to(dtype).transpose(1, 2)  # as HF
            k = torch.randn(2, 16, 2, head_dim, device=device, generator=g).to(dtype).transpose(1, 2)
            inputs = [(q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()) for _ in range(2)]
            ref = stock(*inputs[0], cos, sin)
            out = fused(*(t.clone() for t in inputs[1]), cos, sin)  # Liger rotates in place: give it copies
            for a, b in zip(out, ref):
                if a.shape != b.shape or a.dtype != b.dtype or probe.rel_err(a, b) > probe.TOL[dtype]:
                    return f"outputs differ ({dtype})"
            weights = [torch.randn(t.shape, device=device, generator=g).to(dtype) for t in ref]
            ga = torch.autograd.grad(sum((t * w).float().sum() for t, w in zip(ref, weights)), inputs[0])
            gb = torch.autograd.grad(sum((t * w).float().sum() for t, w in zip(out, weights)), inputs[1])
            if any(probe.rel_err(b, a) > probe.GRAD_TOL[dtype] for a, b in zip(ga, gb)):
                return f"gradients differ ({dtype})"
    except Exception as exc:  # a probe never takes the program down
        return f"probe failed ({type(exc).__name__}: {exc})"
    return None


def _call(stock, shapes):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        fused = shapes.get((q.shape[-1], cos.shape[-1], q.device.type))
        if fused is not None and not args and kwargs.get("unsqueeze_dim", 1) == 1 and q.dim() == 4 \
                and k.shape[-1] == q.shape[-1]:
            return fused(q, k, cos, sin)
        return stock(q, k, cos, sin, *args, **kwargs)

    return apply_rotary_pos_emb


def _hashable(fn) -> bool:
    try:
        hash(fn)
    except TypeError:
        return False
    return True


def _enter(module, args):
    mod = sys.modules[type(module).__module__]
    current = getattr(mod, "apply_rotary_pos_emb", None)
    if not _hashable(current):  # set after apply() (prove() refuses one): the model calls it, as stock would
        current = None
    call = _PROVEN.get((mod.__name__, current))
    if call is not None:
        mod.apply_rotary_pos_emb = call
    elif current not in _RESTORE and any(name == mod.__name__ for name, _ in _PROVEN):
        # the family function was replaced after the proof: the replacement runs (what the model itself would
        # call), not the kernel proven for the function it replaced. (No proof at all, e.g. a process that
        # unpickled the model without proving: stock RoPE, nothing to say.)
        if (mod.__name__, current) not in _WARNED:
            _WARNED.add((mod.__name__, current))
            warnings.warn(f"moe_patch: {mod.__name__}.apply_rotary_pos_emb was replaced after apply(): the "
                          "replacement runs, not the fused RoPE proven for the function it replaced "
                          "(moe_patch.revert(model), then moe_patch.apply(model), to prove the replacement: apply() "
                          "on the patched model alone changes nothing)", RuntimeWarning, stacklevel=2)


def _leave(module, args, output):
    mod = sys.modules[type(module).__module__]
    current = getattr(mod, "apply_rotary_pos_emb", None)
    stock = _RESTORE.get(current) if _hashable(current) else None
    if stock is not None:  # only what _enter installed is put back: a function set since is left as it is
        mod.apply_rotary_pos_emb = stock


def install(attention_module) -> list:
    """Route this attention module's RoPE calls through the proven kernel; returns hook handles for undo."""
    return [attention_module.register_forward_pre_hook(_enter),
            attention_module.register_forward_hook(_leave, always_call=True)]
