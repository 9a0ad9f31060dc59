"""Attention: Transformers' own SDPA path, with the GPU kernel priority set by the attention module itself.

Attention modules are not swapped (their forward holds each family's RoPE, q/k norms, sinks, indexers,
caches) and nothing Transformers reads is renamed: `config._attn_implementation` stays "sdpa", so every
branch Transformers keys on that string (the sparse indexer's key mask of DeepSeek-V3.2-style attention,
continuous batching, mask creation, user checks) is taken exactly as in the stock model. What moe_patch
adds lives on each patched attention module: a forward pre-hook puts SDPA's kernel priority at
cuDNN > Flash > memory-efficient > math, and a forward hook (always called, also on errors) puts the
previous order back. The backward of `F.scaled_dot_product_attention` runs the backward of the kernel its
forward chose, so the order set around the forward covers it; under activation checkpointing the
recomputed forward calls the module again and so runs under the same order.

The hooks act only while the module's config still names "sdpa": a model switched to another
implementation after apply (`set_attn_implementation`, continuous batching) runs that implementation
untouched. On CPU torch's SDPA takes its own fixed order (flash, then math) and ignores the priority list,
so there the hooks change nothing; they run anyway, so that the code proven on CPU at plan time (prove())
is the code that runs on a GPU. The GPU kernels themselves (cuDNN / Flash) cannot be exercised on CPU:
on a GPU the same proof runs on the GPU, on the module's own dtype.
"""
from __future__ import annotations

import copy
import inspect
import threading
from functools import lru_cache

import torch

from .. import probe

IMPLEMENTATION = "sdpa"  # the only implementation the hooks act under (and the name the config keeps)
# config attributes whose integer value changes which keys a query sees: the proof's sequence exceeds them
SWITCH_WORDS = ("topk", "window", "chunk", "block")
# the longest proof sequence per device type: a longer switch (e.g. a 128k sliding window) cannot be exercised
# cheaply there and is reported unproven (on CPU a real-width module at 4k tokens takes seconds already)
MAX_PROBE_SEQ = {"cpu": 4096, "cuda": 16384}


def gpu_priority():
    from torch.nn.attention import SDPBackend

    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.MATH]


def describe(device: torch.device) -> str:
    return "sdpa[cudnn>flash>efficient>math]" if device.type == "cuda" else "sdpa[cpu]"


@lru_cache(maxsize=8)
def _order(previous: tuple) -> list:
    """gpu_priority() first, then the rest of the current order (as sdpa_kernel(set_priority=True) does)."""
    first = [int(b) for b in gpu_priority()]
    return first + [b for b in previous if b not in first]


def _private_api():
    get, set_ = getattr(torch._C, "_get_sdp_priority_order", None), getattr(torch._C, "_set_sdp_priority_order", None)
    return (get, set_) if get is not None and set_ is not None else None


def with_gpu_priority(fn, *args, **kwargs):
    """fn under gpu_priority()'s kernel order. Only the order is set and put back: torch's public
    sdpa_kernel(..., set_priority=True) also rewrites every backend's enable flag twice, about 140 us of host
    time per call on an H200 host, and a training forward is host-bound (CHANGELOG 0.5.0). Backends the user
    disabled stay disabled."""
    token = _set_priority()
    try:
        return fn(*args, **kwargs)
    finally:
        _restore(token)


def _set_priority():
    api = _private_api()
    if api is None:  # another torch: the public context manager, entered here and left in _restore
        from torch.nn.attention import sdpa_kernel

        manager = sdpa_kernel(gpu_priority(), set_priority=True)
        manager.__enter__()
        return ("manager", manager)
    get, set_ = api
    previous = get()
    order = _order(tuple(previous))
    if order == list(previous):
        return None
    set_(order)
    return ("order", previous)


def _restore(token) -> None:
    if token is None:
        return
    what, value = token
    if what == "manager":
        value.__exit__(None, None, None)
    else:
        _private_api()[1](value)


# hooks: the order each patched module's forward set, per thread (continuous batching runs the model in a
# thread of its own), so that nested or interleaved calls each put back what they found
_LOCAL = threading.local()


def _stack() -> list:
    if not hasattr(_LOCAL, "stack"):
        _LOCAL.stack = []
    return _LOCAL.stack


def _enter(module, args):
    config = getattr(module, "config", None)
    _stack().append(_set_priority() if getattr(config, "_attn_implementation", None) == IMPLEMENTATION else None)


def _leave(module, args, output):
    stack = _stack()
    if stack:
        _restore(stack.pop())


def install(module) -> list:
    """Run `module`'s forward (and so its SDPA backward) under gpu_priority(); returns the hook handles."""
    return [module.register_forward_pre_hook(_enter), module.register_forward_hook(_leave, always_call=True)]


def is_patched(module) -> bool:
    """True while install()'s hooks are on `module`."""
    return any(h is _enter for h in module._forward_pre_hooks.values())


@lru_cache(maxsize=None)
def dispatches_through_interface(cls) -> bool:
    """Structural test: the module's forward looks its kernel up in ALL_ATTENTION_FUNCTIONS."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


# --- the proof -----------------------------------------------------------------------------------------

_PROOFS: dict = {}


def switches(module) -> dict:
    """{name: value} of the integer config attributes that limit which keys a query attends to (index_topk,
    sliding_window, attention_chunk_size, ...). A window the layer does not use (the module's own
    `sliding_window` is None, as on Qwen3's full-attention layers) is left out."""
    config = module.config
    out = {}
    for name in dir(config):
        if name.startswith("_") or not any(w in name.lower() for w in SWITCH_WORDS):
            continue
        try:
            value = getattr(config, name)
        except Exception:
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            out[name] = value
    if "sliding_window" in out and hasattr(module, "sliding_window") and not module.sliding_window:
        del out["sliding_window"]
    # block-sparse indexers count blocks (MiniMax-M3's index_topk_blocks x index_block_size tokens): in tokens,
    # one block more
    sizes = [v for n, v in out.items() if n.endswith("block_size")]
    for name, value in list(out.items()):
        if name.endswith("blocks") and sizes:
            out[f"{name} x {max(sizes)}"] = (value + 1) * max(sizes)
    return out


def _rotary(model):
    for name, module in model.named_modules():
        if type(module).__name__.endswith("RotaryEmbedding") and ".layers." not in f".{name}.":
            return module
    return None


def _mask(module, embeds, padding):
    """The mask the model itself would build for this layer (Transformers' own mask functions, which read
    the same config): causal, sliding-window or chunked by the layer's type."""
    from transformers import masking_utils as mu

    config = module.config
    layer_types = getattr(config, "layer_types", None) or []
    idx = getattr(module, "layer_idx", None)
    layer_type = layer_types[idx] if isinstance(idx, int) and idx < len(layer_types) else ""
    make = mu.create_causal_mask
    if "sliding" in layer_type or (not layer_type and getattr(module, "sliding_window", None)):
        make = mu.create_sliding_window_causal_mask
    elif "chunk" in layer_type:
        make = mu.create_chunked_causal_mask
    positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
    kwargs = dict(config=config, inputs_embeds=embeds, attention_mask=padding, cache=None, position_ids=positions)
    if padding is None:
        kwargs["allow_is_causal_skip"] = True
    else:  # a materialised mask, as the indexer families always build
        kwargs["allow_is_causal_skip"] = False
    return make(**kwargs)


def _inputs(model, module, seq, device, dtype):
    """Keyword inputs of the module's forward for a batch of 2 x seq: random hidden states, the model's own
    rotary position embeddings and the mask the model builds. Two variants: with a left-padded row (a
    materialised mask) and without padding (the mask a model may skip)."""
    params = inspect.signature(module.forward).parameters
    names = [n for n in params if n != "self"]
    hidden_name = names[0]
    known = {hidden_name, "position_embeddings", "attention_mask", "position_ids", "cache", "past_key_values",
             "past_key_value", "cache_position", "kwargs"}
    needed = [n for n, p in params.items() if n not in known and p.default is p.empty
              and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if needed:
        raise ValueError(f"forward needs {', '.join(needed)}, which the proof cannot build")
    hidden_size = getattr(module.config, "hidden_size", None)
    if not isinstance(hidden_size, int):
        raise ValueError("config has no integer hidden_size")
    g = torch.Generator().manual_seed(2)
    embeds = torch.randn(2, seq, hidden_size, generator=g).to(device, dtype)
    positions = torch.arange(seq, device=device)[None].expand(2, -1)
    common = {}
    if "position_embeddings" in params:
        rotary = _rotary(model)
        if rotary is None:
            raise ValueError("forward takes position_embeddings but the model has no rotary embedding module")
        if any(b.device.type == "meta" for b in rotary.buffers()):  # a model planned on meta: build it again
            with torch.device("cpu"):
                rotary = type(rotary)(rotary.config)
        rotary = copy.deepcopy(rotary).to(device)
        common["position_embeddings"] = rotary(embeds, positions)
    if "position_ids" in params:
        common["position_ids"] = positions
    padding = torch.ones(2, seq, dtype=torch.long, device=device)
    padding[0, :3] = 0
    variants = []
    for pad in (padding, None):
        kwargs = dict(common)
        if "attention_mask" in params:
            kwargs["attention_mask"] = _mask(module, embeds, pad)
        variants.append((embeds, hidden_name, kwargs, pad is not None))
    return variants


def _fresh(module, device, dtype):
    """A throw-away copy with fresh weights at a trained model's scale (fan-in scaled; norms around 1)."""
    clone = copy.deepcopy(module).to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in list(clone.parameters()) + list(clone.buffers()):
            if t.is_floating_point():
                if t.dim() >= 2:
                    t.copy_(torch.randn(t.shape, generator=g) * t.shape[-1] ** -0.5)
                else:
                    t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
    clone._forward_pre_hooks.clear()  # (deepcopy carried any hooks: the copy runs the bare module)
    clone._forward_hooks.clear()
    return clone.to(device=device, dtype=dtype).train(False)  # eval: no dropout, same draws both ways


def _first(result):
    return result[0] if isinstance(result, tuple) else result


def _run(module, embeds, hidden_name, kwargs, hooked):
    x = embeds.clone().requires_grad_()
    handles = install(module) if hooked else []
    try:
        out = _first(module(**{hidden_name: x}, **kwargs))
    finally:
        for h in handles:
            h.remove()
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device, out.dtype)
    (grad,) = torch.autograd.grad((out.float() * weight.float()).sum(), x)
    return out.detach(), grad


def prove(model, module) -> str | None:
    """None if `module` under install()'s hooks computes what it computes without them (outputs and the
    gradient of the hidden states), else the reason. A throw-away copy of the module (fresh weights) runs
    on the module's device in its dtype (CPU fp32 for a meta model), batch 2, on a sequence longer than
    every top-k / window / chunk switch of its config (e.g. DeepSeek-V3.2's index_topk, sliding_window),
    with a left-padded row and without padding, the model's own rotary embeddings and the mask
    Transformers builds for the layer. One proof per (class, switches, shape, device, dtype) per process."""
    device = probe_device(module)
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    if device.type == "cpu" and dtype not in (torch.float32, torch.float64):
        dtype = torch.float32  # CPU half-precision SDPA is slow and not what a GPU runs
    found = switches(module)
    seq = max([16] + [v + 8 for v in found.values()])
    # the module's own weight shapes, not config fields: per-layer (heterogeneous) configs raise on global reads
    shape = tuple(tuple(p.shape) for p in module.parameters())
    key = (type(module), tuple(sorted(found.items())), str(device), dtype, shape, getattr(module, "head_dim", None))
    if key in _PROOFS:
        return _PROOFS[key]
    limit = MAX_PROBE_SEQ.get(device.type, MAX_PROBE_SEQ["cpu"])
    if seq > limit:
        reason = (f"switch {max(found, key=found.get)}={max(found.values())} needs a probe sequence over "
                  f"{limit} tokens on {device.type}: not proven")
        _PROOFS[key] = reason
        return reason
    reason = None
    try:
        clone = _fresh(module, device, dtype)
        for embeds, hidden_name, kwargs, padded in _inputs(model, clone, seq, device, dtype):
            what = f"seq {seq}, {'padded' if padded else 'unpadded'}, {str(dtype).replace('torch.', '')}"
            try:
                ref, ref_grad = _run(clone, embeds, hidden_name, kwargs, hooked=False)
            except Exception:
                if padded:
                    raise
                continue  # a family that always builds a mask cannot take the unpadded variant: not its input
            out, grad = _run(clone, embeds, hidden_name, kwargs, hooked=True)
            tol, grad_tol = probe.TOL.get(dtype, 1e-5), probe.GRAD_TOL.get(dtype, 1e-4)
            if out.shape != ref.shape or not torch.isfinite(ref).all():
                reason = f"outputs differ in shape or are not finite ({what})"
            elif probe.rel_err(out, ref) > tol:
                reason = f"output rel. error {probe.rel_err(out, ref):.1e} > {tol:.0e} ({what})"
            elif probe.rel_err(grad, ref_grad) > grad_tol:
                reason = f"input-gradient rel. error {probe.rel_err(grad, ref_grad):.1e} ({what})"
            if reason:
                break
    except Exception as exc:  # a proof never takes the host program down: the stock module stays
        reason = f"proof could not run: {type(exc).__name__}: {str(exc)[:200]}"
    _PROOFS[key] = reason
    return reason


def probe_device(module) -> torch.device:
    for t in module.parameters():
        return torch.device("cpu") if t.device.type == "meta" else t.device
    return torch.device("cpu")
