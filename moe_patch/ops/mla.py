"""Multi-head latent attention (DeepSeek-V2/V3 MLA): query, key and value assembled by fused compiled kernels.

What the family computes between its projections and the attention kernel (transformers'
modeling_deepseek_v3.py, `DeepseekV3Attention.forward` and `expand_kv`), on tensors laid out
[batch, heads, seq, dim] (transposed views of the projections' [batch, seq, heads x dim] outputs):

    q_pass, q_rot = split(q, [nope, rope]);  k_rot = the last `rope` columns of kv_a_proj_with_mqa's output
    q_rot, k_rot  = apply_rotary_pos_emb[_interleave](q_rot, k_rot, cos, sin)      (the family's own function)
    query = cat(q_pass, q_rot);  key = cat(k_nope, k_rot expanded to every head);  value = a view of kv_b_proj's
    output

In eager PyTorch that is a chain of strided elementwise kernels and copies each way (the RoPE's slices, products
and cat, the query cat, the key copies, and in the backward the cats of the gradient halves and the copies that
make them contiguous for the projections' GEMMs). `assemble()` computes the same numbers with the same family
RoPE function, but on the [batch, seq, heads, dim] layout the projections produce (the RoPE function's
`unsqueeze_dim=2`), and returns query / key / value as [batch, heads, seq, dim] views of [batch, seq, heads,
dim] storage: torch's SDPA (cuDNN, flash) takes that layout as is and writes its output in it, so the
transpose back after attention is free as well. The backward is written out (`_rope_adjoint`: the transpose of
each RoPE rotation, in float32) as three functions: q's gradient and kv_b_proj output's (key and value halves
together), each a pointwise pass, and k_rot's, a sum over the heads. On CUDA the forward and each of those run
torch.compile'd without autograd (compiled.run: widths static, row counts dynamic); elsewhere eagerly: the
reference the CPU tests check.

On by default (MOE_PATCH_FUSED_MLA=0 turns it off): on an H200 at the deepseek-v3-style shape (4 layers,
micro-batch 4 x 4096) the step runs 131,611 tokens/s with it against 125,264 without (the GPU's "other" kernels
22.3 -> 15.1 ms; CHANGELOG.md). Before compiled.run kept widths static and before the backward was split, its
backward was one Triton kernel of 1.03 ms per layer and the step was slower with it.

How it is wired: the attention module keeps its class and its own forward; install() sets an instance
attribute `forward` (MLAForward, a plain object so the model still pickles and deep-copies) that runs the
family's forward with only that assembly replaced, on the call shapes the proof covered: no cache, the
"sdpa" implementation, the module's own widths. Any other call (generation with a cache, another attention
implementation, positional arguments) runs the class's forward untouched. Proven at plan time (`prove`): a
throw-away copy of the module with fresh weights, its output and the gradients of its input and of every
parameter against its own forward, with and without a padding mask, on the module's device and dtype.
"""
from __future__ import annotations

import copy
import inspect
import sys

import torch

from . import compiled

NAME = "fused MLA q/k/v"
SWITCH = "MOE_PATCH_FUSED_MLA"  # on unless set to an off word (module docstring)
# the attribute names of the family's MLA module that the fused forward reads (DeepseekV3Attention's)
ATTRIBUTES = ("q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "kv_lora_rank",
              "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj", "scaling", "config")
FALLBACKS: dict = {}  # reason -> calls of a marked module that ran the class's forward (warned once per reason)
_GENERATION = "a KV cache (generation)"
# a cache in a training forward (module in training mode, gradients on): Transformers builds one unless use_cache=False
# is passed (a forward without labels, or packed position_ids with no attention_mask, where the fused loss leaves
# stock's cache: dropping it would change the mask). Warned once: such a user silently loses the fused MLA otherwise.
_TRAINING_CACHE = ("a KV cache in a training forward (Transformers builds one unless use_cache=False is passed; "
                   "moe_patch's fused loss leaves it on where dropping it would change the mask: packed position_ids "
                   "without an attention_mask)")


def _family(module):
    return sys.modules[type(module).__module__]


def _rope(module):
    """The family's RoPE function the class's forward would call now (read at each call, as the forward does)."""
    mod = _family(module)
    return mod.apply_rotary_pos_emb_interleave if module.config.rope_interleave else mod.apply_rotary_pos_emb


_PROVEN_NAMES = ("the class's forward", "expand_kv", "the family's apply_rotary_pos_emb",
                 "the family's apply_rotary_pos_emb_interleave", "the family's rotate_half")


def _proven_code(module) -> tuple:
    """The code the fused forward stands for, as it is now (names in _PROVEN_NAMES): the class's forward, the
    module's expand_kv (an instance attribute or the class's), the family module's RoPE functions and rotate_half."""
    mod = _family(module)
    expand = getattr(module, "expand_kv", None)
    return (type(module).forward, getattr(expand, "__func__", expand), getattr(mod, "apply_rotary_pos_emb", None),
            getattr(mod, "apply_rotary_pos_emb_interleave", None), getattr(mod, "rotate_half", None))


def _forward(q, kv, k_rot, cos, sin, rope, nope: int):
    """query, key, value, each [batch, seq, heads, dim] in its own storage, from q [batch, seq, heads x (nope +
    rope)], kv [batch, seq, heads x (nope + v)], k_rot [batch, seq, rope] and the model's cos / sin [batch or 1,
    seq, rope]. `rope` is the family's RoPE function: unsqueeze_dim=2 puts cos / sin on this layout's heads axis."""
    b, s = q.shape[:2]
    width = k_rot.shape[-1]
    q = q.view(b, s, -1, nope + width)
    kv = kv.view(b, s, q.shape[2], -1)
    q_rot, k_rot = rope(q[..., nope:], k_rot.unsqueeze(2), cos, sin, unsqueeze_dim=2)
    query = torch.cat((q[..., :nope], q_rot), dim=-1)
    key = torch.cat((kv[..., :nope], k_rot.expand(-1, -1, q.shape[2], -1)), dim=-1)
    return query, key, kv[..., nope:].contiguous()


def _rope_adjoint(g, cos, sin, interleave: bool):
    """The transpose of the family's RoPE map x -> y (a rotation per frequency pair), applied to the gradient g
    of y ([..., heads or 1, rope]); cos / sin [batch or 1, seq, 1, rope]. Exact for any cos / sin:

    rotate-half layout (apply_rotary_pos_emb): y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2 (halves of the last dim), so
      dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1;
    interleaved layout (apply_rotary_pos_emb_interleave): y = cat(xe c - xo s, xo c + xe s) with xe / xo the even /
      odd columns of x and c / s the first halves of cos / sin, so dxe = g1 c + g2 s, dxo = g2 c - g1 s, and
      dx holds dxe / dxo in the even / odd columns again."""
    half = g.shape[-1] // 2
    g1, g2 = g[..., :half], g[..., half:]
    if interleave:
        c, s = cos[..., :half], sin[..., :half]
        return torch.stack((g1 * c + g2 * s, g2 * c - g1 * s), dim=-1).flatten(-2)
    c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    return torch.cat((g1 * c1 + g2 * s2, g2 * c2 - g1 * s1), dim=-1)


def _q_grad(d_query, cos, sin, nope: int, interleave: bool):
    """q's gradient [batch, seq, heads x (nope + rope)] from query's, d_query [batch, seq, heads x (nope + rope)]
    (a [batch, seq, heads, dim] gradient with its heads flattened into the width, so that compiled.run compiles
    every width static): the pass columns as they are, the rotary ones through `_rope_adjoint` in float32, one
    rounding to d_query's dtype. Pointwise: one pass over the gradient."""
    b, s = d_query.shape[:2]
    d = d_query.view(b, s, -1, nope + cos.shape[-1])
    cos, sin = cos.float().unsqueeze(2), sin.float().unsqueeze(2)
    dq_rot = _rope_adjoint(d[..., nope:].float(), cos, sin, interleave)
    return torch.cat((d[..., :nope], dq_rot.to(d.dtype)), dim=-1).view(b, s, -1)


def _kv_grad(d_key, d_value, nope: int, heads: int):
    """kv_b_proj output's gradient [batch, seq, heads x (nope + v)]: per head the key's pass columns, then the
    value's; d_key [batch, seq, heads x (nope + rope)], d_value [batch, seq, heads x v]. A pointwise copy; the
    key's rotary columns go to k_rot (`_k_rot_grad`)."""
    b, s = d_key.shape[:2]
    d_value = d_value.view(b, s, heads, -1).to(d_key.dtype)
    return torch.cat((d_key.view(b, s, heads, -1)[..., :nope], d_value), dim=-1).view(b, s, -1)


def _k_rot_grad(d_key, cos, sin, nope: int, interleave: bool):
    """k_rot's gradient [batch, seq, rope]: the key's rotary columns summed over the heads (k_rot is expanded to
    every head), in float32, then through `_rope_adjoint` (the same rotation for every head, so the sum may come
    first); one rounding to d_key's dtype. A reduction over the heads, compiled on its own."""
    b, s = d_key.shape[:2]
    width = cos.shape[-1]
    d = d_key.view(b, s, -1, nope + width)[..., nope:].float().sum(dim=2, keepdim=True)
    cos, sin = cos.float().unsqueeze(2), sin.float().unsqueeze(2)
    return _rope_adjoint(d, cos, sin, interleave).squeeze(2).to(d_key.dtype)


def _backward(d_query, d_key, d_value, cos, sin, nope: int, interleave: bool):
    """Gradients of q, kv ([batch, seq, heads x dim]) and k_rot ([batch, seq, rope]) from those of query, key,
    value ([batch, seq, heads, dim]); arithmetic in float32, one rounding to the gradients' dtype. Three
    functions, each compiled on its own on CUDA (compiled.run): q's and kv's gradients pointwise, k_rot's a
    reduction over the heads (this file's first form, one kernel for all three compiled with every size dynamic,
    took 1.03 ms per layer at the deepseek-v3-style shape on an H200: CHANGELOG.md). The heads go into the width
    so that compiled.run compiles every width static (flatten: a view where each position's heads lie together,
    as in the [batch, seq, heads, dim] storage `assemble` returns; else a copy)."""
    heads = d_query.shape[2]
    d_query, d_key, d_value = d_query.flatten(2), d_key.flatten(2), d_value.flatten(2)
    dq = compiled.run(_q_grad, d_query, cos, sin, nope, interleave)
    dkv = compiled.run(_kv_grad, d_key, d_value, nope, heads)
    dk_rot = compiled.run(_k_rot_grad, d_key, cos, sin, nope, interleave)
    return dq, dkv, dk_rot


class _Assemble(torch.autograd.Function):
    """_forward compiled without autograd on CUDA (compiled.run: no AOTAutograd runtime around it), _backward's
    three functions likewise; eager elsewhere. Saves only cos / sin."""

    @staticmethod
    def forward(ctx, q, kv, k_rot, cos, sin, rope, nope: int, interleave: bool):
        ctx.save_for_backward(cos, sin)
        ctx.nope, ctx.interleave, ctx.k_rot_dtype = nope, interleave, k_rot.dtype
        return compiled.run(_forward, q, kv, k_rot, cos, sin, rope, nope)

    @staticmethod
    def backward(ctx, d_query, d_key, d_value):
        cos, sin = ctx.saved_tensors
        dq, dkv, dk_rot = _backward(d_query, d_key, d_value, cos, sin, ctx.nope, ctx.interleave)
        return dq, dkv, dk_rot.to(ctx.k_rot_dtype), None, None, None, None, None


def assemble(module, q, kv, k_rot, cos, sin):
    """query, key, value as [batch, heads, seq, dim] views of [batch, seq, heads, dim] storage (what SDPA takes
    and writes back in the same layout), with the module's RoPE function and widths."""
    interleave = bool(module.config.rope_interleave)
    query, key, value = _Assemble.apply(q, kv, k_rot, cos, sin, _rope(module), module.qk_nope_head_dim, interleave)
    return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)


def why_not(module) -> str | None:
    """Why the fused forward cannot serve this module's class, seen without running anything (None: the proof
    decides)."""
    missing = [a for a in ATTRIBUTES if not hasattr(module, a)]
    if missing:
        return f"not the MLA layout this kernel knows (no {', '.join(missing)})"
    mod = _family(module)
    if not hasattr(mod, "apply_rotary_pos_emb") or not hasattr(mod, "apply_rotary_pos_emb_interleave"):
        return "the family module has no apply_rotary_pos_emb / apply_rotary_pos_emb_interleave"
    if not hasattr(mod, "ALL_ATTENTION_FUNCTIONS"):
        return "the family module does not dispatch through ALL_ATTENTION_FUNCTIONS"
    return None


class MLAForward:
    """Set as the attention module's `forward` (an instance attribute; the class keeps its own). A plain object,
    not a closure: the model still pickles and deep-copies (the copy's attribute points at the copy)."""

    def __init__(self, module):
        self.module = module
        # what the proof ran: the class's forward and expand_kv (the fused forward is their copy) and the family's
        # RoPE functions (the forward calls the current one; the backward is written for these); a later change
        # runs the class's forward
        self.proven = _proven_code(module)

    @property
    def __signature__(self):
        """The class forward's signature (bound): callers that inspect `module.forward` see what they saw."""
        return inspect.signature(type(self.module).forward.__get__(self.module))

    def __call__(self, *args, **kwargs):
        module = self.module
        why = self.why_stock(args, kwargs)
        if why is not None:
            if why not in FALLBACKS and why != _GENERATION:  # generation's cached calls are routine, not news
                import warnings

                warnings.warn(f"moe_patch: {NAME} not used for this call, the class's forward ran: {why}", stacklevel=2)
            FALLBACKS[why] = FALLBACKS.get(why, 0) + 1
            return type(module).forward(module, *args, **kwargs)
        return fused_forward(module, **kwargs)

    def why_stock(self, args, kwargs) -> str | None:
        """None when this call is one the proof covered, else the reason the class's forward runs."""
        module = self.module
        if args:
            return "positional arguments"
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            return _TRAINING_CACHE if module.training and torch.is_grad_enabled() else _GENERATION
        if module.config._attn_implementation != "sdpa":
            return f"attention implementation {module.config._attn_implementation!r}"
        now = _proven_code(module)
        if now != self.proven:
            changed = [name for name, a, b in zip(_PROVEN_NAMES, now, self.proven) if a is not b]
            return f"{', '.join(changed)} changed after apply() (the fused forward and backward are the proven code's)"
        hidden = kwargs.get("hidden_states")
        pos = kwargs.get("position_embeddings")
        if hidden is None or hidden.dim() != 3 or not isinstance(pos, (tuple, list)) or len(pos) != 2:
            return "not the decoder layer's call (hidden_states, position_embeddings=(cos, sin))"
        if torch.is_autocast_enabled(hidden.device.type):
            return "autocast (the fused assembly is proven in the parameters' dtype, without autocast)"
        if pos[0].dim() != 3 or pos[0].shape[-1] != module.qk_rope_head_dim:
            return f"cos / sin of shape {tuple(pos[0].shape)}"
        return None


def fused_forward(module, hidden_states, position_embeddings, attention_mask=None, cache=None,
                  past_key_values=None, **kwargs):
    """The family's forward (DeepseekV3Attention.forward, no cache) with q / k / v from `assemble`.
    Returns (attention output [batch, seq, hidden], attention weights or None), as the class's forward."""
    b, s = hidden_states.shape[:-1]
    if module.q_lora_rank is None:
        q = module.q_proj(hidden_states)
    else:
        q = module.q_b_proj(module.q_a_layernorm(module.q_a_proj(hidden_states)))
    compressed_kv = module.kv_a_proj_with_mqa(hidden_states)
    kv_nope, k_rot = torch.split(compressed_kv, [module.kv_lora_rank, module.qk_rope_head_dim], dim=-1)
    kv = module.kv_b_proj(module.kv_a_layernorm(kv_nope))
    cos, sin = position_embeddings
    query, key, value = assemble(module, q, kv, k_rot, cos, sin)
    family = _family(module)
    interface = family.ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation,
                                                             family.eager_attention_forward)
    attn_output, attn_weights = interface(module, query, key, value, attention_mask,
                                          dropout=0.0 if not module.training else module.attention_dropout,
                                          scaling=module.scaling, **kwargs)
    attn_output = attn_output.reshape(b, s, -1).contiguous()
    return module.o_proj(attn_output), attn_weights


class _Handle:
    """Removes the instance attribute again (the handles' interface of torch hooks: remove())."""

    def __init__(self, module):
        self.module = module
        # what the proof ran: the class's forward and expand_kv (the fused forward is their copy) and the family's
        # RoPE functions (the forward calls the current one; the backward is written for these); a later change
        # runs the class's forward
        self.proven = _proven_code(module)

    def remove(self) -> None:
        if isinstance(vars(self.module).get("forward"), MLAForward):
            del self.module.forward


def install(module) -> list:
    """Route `module`'s calls through MLAForward; returns [handle] whose remove() undoes it."""
    module.forward = MLAForward(module)
    return [_Handle(module)]


def is_installed(module) -> bool:
    return isinstance(vars(module).get("forward"), MLAForward)


# --- the proof ------------------------------------------------------------------------------------------------

_PROOFS: dict = {}


def prove(model, module) -> str | None:
    """None if the fused forward equals the module's own forward on a throw-away copy (fresh weights at a
    trained scale), else the reason: output, and the gradients of the hidden states and of every parameter,
    batch 2, with a left-padded row (a materialised mask) and without padding (the causal kernel), both RoPE
    layouts the config can select (rope_interleave True / False), on the module's device and dtype (CPU fp32
    for a model on meta). Tolerances: probe.TOL / GRAD_TOL of the dtype (fp32 1e-5 / 1e-4, bf16 2e-2).
    One proof per (class, parameter shapes, device, dtype, the code it stands for: _proven_code) per process."""
    from .. import probe
    from .attention import _fresh, _inputs, probe_device

    why = why_not(module)
    if why:
        return why
    device = probe_device(module)
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    if device.type == "cpu" and dtype not in (torch.float32, torch.float64):
        dtype = torch.float32
    key = (type(module), tuple(tuple(p.shape) for p in module.parameters()), str(device), dtype, _proven_code(module))
    if key in _PROOFS:
        return _PROOFS[key]
    reason = None
    try:
        clone = _fresh(module, device, dtype)
        vars(clone).pop("forward", None)  # (a copy of an installed module: the proof runs the class's forward)
        clone.config = copy.copy(module.config)  # the proof flips rope_interleave on its own copy
        tol, grad_tol = probe.TOL.get(dtype, 1e-5), probe.GRAD_TOL.get(dtype, 1e-4)
        for interleave in (True, False):
            clone.config.rope_interleave = interleave
            for embeds, hidden_name, kwargs, padded in _inputs(model, clone, 24, device, dtype):
                what = f"{'padded' if padded else 'unpadded'}, rope_interleave={interleave}, " \
                       f"{str(dtype).replace('torch.', '')}"
                ref = _run(clone, embeds, kwargs, fused=False)
                out = _run(clone, embeds, kwargs, fused=True)
                for name in ref:
                    err = probe.rel_err(out[name], ref[name])
                    bound = tol if name == "output" else grad_tol
                    if out[name].shape != ref[name].shape or not err <= bound:
                        reason = f"{name} rel. error {err:.1e} > {bound:.0e} ({what})"
                        break
                if reason:
                    break
            if reason:
                break
    except Exception as exc:  # a proof never takes the host program down: the family's forward stays
        reason = f"proof could not run: {type(exc).__name__}: {str(exc)[:200]}"
    _PROOFS[key] = reason
    return reason


def _run(module, embeds, kwargs, fused: bool) -> dict:
    """Output and gradients (hidden states, every parameter) of one forward + backward of `module`."""
    x = embeds.clone().requires_grad_()
    params = dict(module.named_parameters())
    for p in params.values():
        p.grad = None
    call = fused_forward if fused else type(module).forward
    out = call(module, hidden_states=x, **kwargs)[0]
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device, out.dtype)
    grads = torch.autograd.grad((out.float() * weight.float()).sum(), [x, *params.values()], allow_unused=True)
    result = {"output": out.detach(), "hidden-state gradient": grads[0]}
    for (name, p), g in zip(params.items(), grads[1:]):
        result[f"{name} gradient"] = torch.zeros_like(p) if g is None else g
    return result


def describe(device: torch.device) -> str:
    """The report's suffix: where the kernel is compiled, and where it is the eager reference."""
    return "" if device.type == "cuda" and compiled.enabled() else " (eager: no compiler on this device)"
