"""Attention with learned sinks (GPT-OSS and other families with a `sinks` parameter) on flex_attention.

What the family computes (its own `eager_attention_forward`, e.g. transformers' modeling_gpt_oss.py): one extra
logit per head, the sink s_h, joins every row's softmax and is dropped afterwards,

    p_j = exp(x_j) / (sum_k exp(x_k) + exp(s_h))        x = q.k * scaling + mask

Eager builds the whole [batch, heads, q, k] score matrix for that. The same numbers come from any fused kernel that
returns the row's log-sum-exp L = log(sum_k exp(x_k)):  p_j = softmax(x)_j * sigmoid(L - s_h), so

    out = flex_attention(q, k, v, block_mask) * sigmoid(L - s_h)

with the gradient to q, k, v and to the sink through L (torch's flex_attention differentiates its LSE output).
The window of a sliding-attention layer and the causal mask are a BlockMask, so blocks outside the window are
never computed. L and the rescale stay in float32 (Transformers' own flex path rounds L to the model dtype first).

How it is wired: the module's forward looks its kernel up with
`ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)`, and for "eager"
that is the family module's global `eager_attention_forward`. install() puts a dispatcher in that global which
runs this kernel for the attention modules apply() marked (proven at plan time, `prove`) and the original
function for every other module; the config's implementation name is never changed. The dispatcher checks at
call time what the proof assumed and otherwise runs the original function (reason kept in `FALLBACKS`):
the mask must be the plain causal (or causal + this layer's window) mask eager was given, with no padding or
packing; no attention dropout in training; the tensors on a GPU (flex_attention has no backward on CPU).

Full (no window) layers in bfloat16 / float16 run cuDNN's fused attention instead, the sink folded into the row
statistics its backward is given (`_CudnnSinkAttention`, comment block there), with MOE_PATCH_CUDNN_SINKS=1
(opt-in: see the comment at CUDNN_SWITCH). The switch is read when apply() plans the module: the proof runs the
kernel the module's calls will take, and install() records that choice on the module (its mark).
"""
from __future__ import annotations

import copy
import sys
import types
import weakref
from functools import lru_cache

import torch
from torch import nn

from .base import RouteHandle, restore_global

NAME = "flex_attention+sinks"
_MARK = "_moe_patch_sink_attention"
_ORIGINAL: dict = {}  # python module name -> the eager_attention_forward it had
_USERS: dict = {}  # python module name -> number of marked attention modules
_ORIGINAL_BUILDERS: dict = {}  # python module name -> {name: the mask builder it had} (see _mask_builder)
_INSTALLED: dict = {}  # python module name -> {name: the function set there} (put back only if still there)
FALLBACKS: dict = {}  # reason -> calls that ran the original eager function instead
_BROKEN: set = set()  # (dtype, query shape, key shape, window, grad) where the kernel failed to build
_CUDNN_FAILED: set = set()  # (dtype, query shape) where cuDNN's attention raised: flex_attention runs there


def has_sinks(module: nn.Module) -> bool:
    sinks = getattr(module, "sinks", None)
    return isinstance(sinks, nn.Parameter) and sinks.dim() == 1


# --- the kernel ----------------------------------------------------------------------------------------------

# flex_attention's block sizes / warps / stages where measured faster than inductor's defaults, by (GPU compute
# capability, dtype, head dim, sliding window or not). H200, GPT-OSS-20B's attention (64 query / 8 KV heads, head
# dim 64, batch 2 x 4096, bf16; torch 2.11), forward + backward of attend(), compiled: causal, backward 2.98 ->
# 2.59 ms; 128-token window, backward 0.765 -> 0.609 ms (forward unchanged). Only block sizes and launch
# parameters: the same kernel and arithmetic, so the numbers are the default's up to the order of the sums
# (prove() runs with them). Elsewhere inductor's defaults stay.
_TUNED = {
    ((9, 0), torch.bfloat16, 64, False): dict(BLOCK_M1=64, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=64,
                                              bwd_num_stages=3, bwd_num_warps=4),
    ((9, 0), torch.bfloat16, 64, True): dict(BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32,
                                             bwd_num_stages=3, bwd_num_warps=4),
}


def tuned_options(query: torch.Tensor, window: int | None) -> tuple:
    """The measured kernel options (_TUNED) for this query's GPU, dtype and head dim, as a hashable tuple; () where
    none were measured (CPU, other GPUs, other widths)."""
    if query.device.type != "cuda":
        return ()
    key = (torch.cuda.get_device_capability(query.device), query.dtype, query.shape[-1], bool(window))
    return tuple(sorted(_TUNED.get(key, {}).items()))


def attend(query, key, value, sinks, block_mask, scale: float, flex=None, tuning: tuple = ()):
    """flex_attention(q, k, v) * sigmoid(lse - sinks), transposed to [B, Q, H, Dv]; `flex` defaults to torch's;
    tuning: extra flex kernel options (tuned_options)."""
    options = {}
    if flex is None:
        from torch.nn.attention.flex_attention import flex_attention as flex

        # the training kernel for every call: without grad and under 128 queries flex_attention would take its
        # decoding kernel, which the proof does not run (and which inductor failed to build for small heads)
        options = {"kernel_options": {"FORCE_USE_FLEX_ATTENTION": True, **dict(tuning)}}
    from torch.nn.attention.flex_attention import AuxRequest

    out, aux = flex(query, key, value, block_mask=block_mask, scale=scale,
                    enable_gqa=query.shape[1] != key.shape[1], return_aux=AuxRequest(lse=True), **options)
    keep = torch.sigmoid(aux.lse.float() - sinks.float().view(1, -1, 1))  # [B, H, Q], float32
    out = (out.float() * keep.unsqueeze(-1)).to(query.dtype)
    return out.transpose(1, 2).contiguous()  # [B, Q, H, Dv], as eager returns it


# --- full causal layers in bfloat16 / float16: cuDNN's fused attention, with the sinks folded into its statistics ----
#
# The same identity from the other side: with L' = logaddexp(L, s_h) (the row's log-sum-exp over the keys AND the
# sink), p_j = exp(x_j - L') exactly, and out = attention(q, k, v) * exp(L - L'). The backward of softmax attention
# (FlashAttention-2's algorithm, which cuDNN's backward runs) needs only the row statistics and the output it was
# given: handed L' and the sink-scaled output, it recomputes p_j = exp(x_j - L') and D = rowsum(dO * out), which are
# the sink softmax's own, so dq, dk, dv come out exact; the sink's gradient is -sum_rows exp(s_h - L') * D.
# torch's aten cuDNN attention ops take both from Python (no window parameter: sliding-window layers stay on flex).
# H200, GPT-OSS-20B's full-attention layer (64 query / 8 KV heads, head dim 64, batch 2 x 4096, bf16, torch 2.11):
# forward + backward 3.51 ms on the tuned flex_attention, 3.35 ms this way with eager rescaling (errors against
# float32 eager the same: output 2.6e-3, gradients 2.5e-3 to 3.3e-3); the rescaling and the sink gradient are one
# compiled kernel each (compiled.run).
# Opt-in (MOE_PATCH_CUDNN_SINKS=1): at the tiny GPT-OSS test model (bf16, seq 77, module inputs recorded from the
# model) the q_proj / k_proj weight gradients come out 2.8e-2 to 3.2e-2 from float32 eager, flex_attention's 2.2e-2
# to 2.8e-2, eager bf16's 5e-3 to 8e-3 (head dim 16 and 64 alike): over the 2e-2 bound, where flex is at it.
# At GPT-OSS-20B's widths (seq 1024 / 4096) both are ~3e-3. Measured gain: 60,616 -> 61,294 tokens/s (+1.1%,
# gpt-oss-20b 4 layers, micro-batch 2, one H200). Not on by default until the small-shape error is understood.
CUDNN_SWITCH = "MOE_PATCH_CUDNN_SINKS"  # off unless set to a yes word
CUDNN_NAME = "cuDNN attention+sinks"


def _cudnn_applies(query, key, value, kind: str, window) -> bool:
    """A full causal layer (no window, square: torch's is_causal is the top-left diagonal, eager's mask the
    bottom-right one, equal only when q and k lengths are) in half precision on a GPU with cuDNN's attention
    (whether the module was planned for it is its mark's business: sink_attention_forward)."""
    return (kind == "causal" and not window and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)
            and key.dtype == value.dtype == query.dtype and query.shape[-2] == key.shape[-2]
            and query.shape[-1] == key.shape[-1] and query.shape[-1] % 8 == 0 and query.shape[-1] <= 128
            and value.shape[-1] % 8 == 0 and value.shape[-1] <= 128 and torch.backends.cudnn.is_available()
            and (query.dtype, tuple(query.shape)) not in _CUDNN_FAILED)


def kernel_name(module, device) -> str:
    """The report's name for the kernel this attention module's calls take on `device` (its sinks' dtype is the
    model's): CUDNN_NAME for a full (no window) layer in half precision on a GPU with MOE_PATCH_CUDNN_SINKS=1,
    NAME otherwise. Read at plan time: prove() runs this kernel, install() records it on the module."""
    from .. import config

    full = not getattr(module, "sliding_window", None)
    half = module.sinks.dtype in (torch.bfloat16, torch.float16)
    if full and half and device.type == "cuda" and config.flag(CUDNN_SWITCH):
        return CUDNN_NAME
    return NAME


def _sink_rescale(out, lse, sinks):
    """out [B, H, Q, Dv] (model dtype), lse [B, H, Q, 1] float32, sinks [H] -> (out * sigmoid(lse - s_h) as
    [B, Q, H, Dv] contiguous in out's dtype, L' = logaddexp(lse, s_h) [B, H, Q, 1] float32)."""
    s = sinks.float().view(1, -1, 1, 1)
    scaled = (out.float() * torch.sigmoid(lse - s)).to(out.dtype)
    return scaled.transpose(1, 2).contiguous(), torch.logaddexp(lse, s)


def _sink_grad(grad, out, total, sinks):
    """grad, out [B, Q, H, Dv], total = L' [B, H, Q, 1], sinks [H] -> d sinks [H] float32:
    -sum over batch and rows of exp(s_h - L') * rowsum(grad * out)."""
    delta = (grad.float() * out.float()).sum(-1).transpose(1, 2).unsqueeze(-1)  # [B, H, Q, 1]
    return -(torch.exp(sinks.float().view(1, -1, 1, 1) - total) * delta).sum((0, 2, 3))


def _fused_forward(query, key, value, scale: float):
    """Causal attention with its row log-sum-exp: (out [B, H, Q, Dv], lse, tensors and numbers the backward needs:
    RNG state, sequence offsets, max lengths). cuDNN's kernel
    on CUDA; on CPU torch's flash kernel for CPU (same contract, no GQA: the CPU tests' stand-in for the algebra)."""
    if query.is_cuda:
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(query, key, value, None, True, 0.0, True, False,
                                                               scale=scale)
        return r[0], r[1], (r[6], r[7], r[2], r[3]), (r[4], r[5])
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, True, scale=scale)
    return out, lse, (), ()


def _fused_backward(grad, query, key, value, out, lse, tensors, numbers, scale: float):
    """dq, dk, dv of _fused_forward's attention, given the output gradient and the output / statistics to use."""
    if query.is_cuda:
        (seed, offset, cum_q, cum_k), (max_q, max_k) = tensors, numbers
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(  # None: no bias (an undefined tensor)
            grad, query, key, value, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, True, scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad.contiguous(), query, key, value, out.contiguous(), lse, 0.0, True, scale=scale)


class _CudnnSinkAttention(torch.autograd.Function):
    """query [B, H, Q, D], key [B, Hkv, Q, D], value [B, Hkv, Q, Dv] (any strides cuDNN takes; GQA native),
    sinks [H] -> [B, Q, H, Dv] contiguous: the causal sink attention (comment block above)."""

    @staticmethod
    def forward(ctx, query, key, value, sinks, scale: float):
        from . import compiled

        out, lse, tensors, numbers = _fused_forward(query, key, value, scale)
        final, total = compiled.run(_sink_rescale, out, lse.reshape(*out.shape[:3], 1), sinks)
        ctx.save_for_backward(query, key, value, final, total, sinks, *tensors)
        ctx.meta = (scale, lse.shape, numbers)
        return final

    @staticmethod
    def backward(ctx, grad):
        from . import compiled

        query, key, value, final, total, sinks, *tensors = ctx.saved_tensors
        scale, lse_shape, numbers = ctx.meta
        grad = grad.contiguous()
        d_sinks = compiled.run(_sink_grad, grad, final, total, sinks) if ctx.needs_input_grad[3] else None
        dq, dk, dv = _fused_backward(grad.transpose(1, 2), query, key, value, final.transpose(1, 2),
                                     total.reshape(lse_shape), tensors, numbers, scale)
        return dq, dk, dv, None if d_sinks is None else d_sinks.to(sinks.dtype), None


def cudnn_attend(query, key, value, sinks, scale: float):
    """The full-causal-layer kernel (_CudnnSinkAttention): [B, Q, H, Dv] as attend() returns it."""
    return _CudnnSinkAttention.apply(query, key, value, sinks, scale)


@lru_cache(maxsize=None)
def _compiled(role: str):
    """torch.compile of `attend`, one copy of its code per role ("run": the model's calls, "proof": prove()).
    Dynamo keeps at most 8 compiled variants per code object and then runs the function uncompiled (flex_attention
    unfused: the whole score matrix); the proof's shapes and dtypes must not use up the model's. Shapes are
    static on the first call and dynamic after a second length (torch.compile's default), as Transformers'
    own flex_attention path compiles."""
    code = attend.__code__.replace(co_name=f"attend_{role}")
    fn = types.FunctionType(code, attend.__globals__, f"attend_{role}", attend.__defaults__, attend.__closure__)
    return torch.compile(fn)


@lru_cache(maxsize=32)
def _block_mask(q_len: int, k_len: int, window: int | None, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    if window:
        def mask_mod(b, h, q, k):
            return (k <= q) & (k > q - window)
    else:
        def mask_mod(b, h, q, k):
            return k <= q
    return create_block_mask(mask_mod, None, None, q_len, k_len, device=device)


def _expected_mask(q_len: int, k_len: int, window: int | None, dtype, device) -> torch.Tensor:
    """The additive mask eager receives for causal (window None) or sliding-window causal attention."""
    q = torch.arange(q_len, device=device)[:, None]
    k = torch.arange(k_len, device=device)[None, :]
    allowed = k <= q
    if window:
        allowed &= k > q - window
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


_CHECKED: dict = {}  # id(mask) -> (weakref, (version, data_ptr), window, verdict): one check per mask tensor, not
# per layer
# verdicts of the masks the family's forward built, launched when each was built (_mask_builder) and not read yet:
# _Pending entries, read at the mask's first use without a stream sync (see mask_window)
_PENDING: list = []
_NO_WINDOW = object()  # a builder whose window could not be read: its mask is checked on its own, when used
_MASK_BUILDERS = {"create_causal_mask": lambda kwargs: None,
                  "create_sliding_window_causal_mask": lambda kwargs: getattr(kwargs.get("config"), "sliding_window",
                                                                              _NO_WINDOW)}


def _is_plain(mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """0-dim bool tensor on the mask's device (no host read): the [B, 1, Q, K] additive mask equals the causal
    (+ window) mask eager gets, element for element."""
    return (mask == _expected_mask(mask.shape[-2], mask.shape[-1], window, mask.dtype, mask.device)).all()


class _Pending:
    """A mask's verdict launched when the mask was built, for the mask at that version and the window it was built
    for. On a GPU the verdict is copied to pinned host memory behind an event, so reading it waits for that copy
    only, not for the work queued after it (a stream sync at the first attention layer, as `.item()` would be,
    idles the GPU until the host has launched the layer's kernels again: ~1 ms of a GPT-OSS-20B forward on an H200)."""

    def __init__(self, mask: torch.Tensor, window):
        self.ref, self.version, self.window = weakref.ref(mask), mask._version, window
        self.data_ptr = mask.data_ptr()  # `mask.data = other` swaps the storage without a version bump
        ok = _is_plain(mask, window)
        self.event = None
        if ok.is_cuda:
            ok = ok.to("cpu", non_blocking=True)  # pinned: the copy runs in stream order, on the mask's device
            self.event = torch.cuda.Event()
            # behind the copy on the mask's device's stream, not the current device's: a mask on cuda:1 while
            # cuda:0 is current would otherwise be read before its copy lands (a stale verdict from reused memory)
            self.event.record(torch.cuda.current_stream(mask.device))
        self.ok = ok

    def matches(self, mask: torch.Tensor, window) -> bool:
        return (self.ref() is mask and self.version == mask._version and self.data_ptr == mask.data_ptr()
                and self.window == window)

    def read(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.ok)


def _mask_builder(builder, window_of):
    """The family module's mask builder, launching the check of each 4-D float mask it returns (against the window
    it was built for: _Pending) without reading it; returns the builder's result unchanged."""

    def build(*args, **kwargs):
        mask = builder(*args, **kwargs)
        window = window_of(kwargs) if not args else _NO_WINDOW  # Transformers calls them with keywords
        if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.is_floating_point() and window is not _NO_WINDOW \
                and mask.shape[-1] == mask.shape[-2] and not mask.is_inference() and not torch.compiler.is_compiling() \
                and not (mask.is_cuda and torch.cuda.is_current_stream_capturing()):
            del _PENDING[:-7]  # a few steps' worth at most: a forward builds one or two
            _PENDING.append(_Pending(mask, window))
        return mask

    build.__wrapped__ = builder
    return build


def _verdict(ok: bool, window):
    return ("causal", window) if ok else (None, "attention mask is not the plain causal / sliding-window mask "
                                               "(padding or packed sequences)")


def mask_window(attention_mask, q_len: int, k_len: int, window: int | None):
    """("none", None) for no mask, ("causal", window) if attention_mask is exactly the causal (+window) mask
    eager would get, else (None, reason). Checked once per mask tensor object: a mask the family's builder made
    has its verdict launched at build time (_Pending), read here without a stream sync; any other mask, one built
    for another window or changed in place since, is compared here (one device sync)."""
    if attention_mask is None:
        return "none", None
    if not isinstance(attention_mask, torch.Tensor) or not attention_mask.is_floating_point():
        return None, f"attention mask of type {type(attention_mask).__name__} (not an additive float mask)"
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or tuple(attention_mask.shape[-2:]) != (q_len, k_len) \
            or q_len != k_len:
        return None, "attention mask is not [batch, 1, q, k] with as many queries as keys (a cache, or a query slice)"
    if attention_mask.is_inference():  # no version counter (torch.inference_mode): a verdict could go stale unseen
        return _verdict(bool(_is_plain(attention_mask, window)), window)  # so checked at every use, never cached
    hit = _CHECKED.get(id(attention_mask))
    state = (attention_mask._version, attention_mask.data_ptr())  # `.data = other` bumps no version
    if hit is not None and hit[0]() is attention_mask and hit[1] == state and hit[2] == window:
        return hit[3]
    pending = next((p for p in _PENDING if p.matches(attention_mask, window)), None)
    if pending is not None:
        _PENDING.remove(pending)
        ok = pending.read()
    else:
        ok = bool(_is_plain(attention_mask, window))  # the one device sync
    if len(_CHECKED) > 64:
        _CHECKED.clear()
    _CHECKED[id(attention_mask)] = (weakref.ref(attention_mask), state, window,
                                    _verdict(ok, window))
    return _CHECKED[id(attention_mask)][3]


def sink_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, compiled="run",
                           cudnn=None, **kwargs):
    """Drop-in for a sinks family's eager_attention_forward: query [B, H, Q, D], key / value [B, Hkv, K, D(v)],
    attention_mask the additive [B, 1, Q, K] mask (or None), module.sinks [H]. Returns ([B, Q, H, Dv] in the
    query's dtype, None): no probabilities are materialised. Raises _NotHere(reason) where it does not apply.
    compiled: which compiled copy runs on a GPU ("run", "proof"; see _compiled), False for torch's eager
    flex_attention (CPU tests). cudnn: whether a full half-precision layer may take cuDNN's kernel; None: as the
    module's mark says (install() records kernel_name() there)."""
    if dropout and module.training:
        raise _NotHere("attention dropout in training (flex_attention has none)")
    if _probabilities_requested():
        raise _NotHere("attention probabilities requested (output_attentions): eager returns them")
    if query.requires_grad and query.device.type == "cpu" or key.requires_grad and key.device.type == "cpu":
        raise _NotHere("flex_attention has no backward on CPU")
    window = kwargs.get("sliding_window")
    kind, why = mask_window(attention_mask, query.shape[-2], key.shape[-2], window)
    if kind is None:
        raise _NotHere(why)
    block_mask = _block_mask(query.shape[-2], key.shape[-2], window, str(query.device)) if kind == "causal" else None
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    if cudnn is None:
        cudnn = getattr(module, _MARK, None) == CUDNN_NAME
    if cudnn and compiled and _cudnn_applies(query, key, value, kind, window):
        try:
            return cudnn_attend(query, key, value, module.sinks, scale), None
        except RuntimeError as exc:  # a configuration this cuDNN does not take: flex for these shapes from now on
            import warnings

            _CUDNN_FAILED.add((query.dtype, tuple(query.shape)))
            warnings.warn(f"moe_patch: {CUDNN_NAME} failed for query {tuple(query.shape)} {query.dtype}, "
                          f"flex_attention+sinks runs there instead: {str(exc).splitlines()[0][:160]}", stacklevel=3)
    fn = _compiled(compiled) if compiled and query.device.type == "cuda" else attend
    return fn(query, key, value, module.sinks, block_mask, scale, None, tuned_options(query, window)), None


class _NotHere(Exception):
    pass


def _probabilities_requested() -> bool:
    """True while Transformers collects attention probabilities (output_attentions=True): only eager has them."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collected = _active_collector.get()
    return bool(collected) and "attentions" in collected


# --- routing: a dispatcher in the family module's eager_attention_forward global -----------------------------

def _dispatcher(modname: str):
    original = _ORIGINAL[modname]

    def eager_attention_forward(module, *args, **kwargs):
        if getattr(module, _MARK, False):
            query, key = (list(args) + [kwargs.get("query"), kwargs.get("key")])[:2]
            call = (getattr(query, "dtype", None), getattr(query, "shape", None), getattr(key, "shape", None),
                    kwargs.get("sliding_window"), torch.is_grad_enabled())
            if call not in _BROKEN:
                try:
                    return sink_attention_forward(module, *args, **kwargs)
                except _NotHere as why:
                    _fell_back(str(why))
                except torch.OutOfMemoryError:
                    raise
                except Exception as exc:  # the kernel could not be built for this call: eager computes it
                    _BROKEN.add(call)  # and every later call like it, without trying to build it again
                    _fell_back(f"flex_attention failed: {type(exc).__name__}: {str(exc)[:200]}")
        return original(module, *args, **kwargs)

    eager_attention_forward.__wrapped__ = original
    eager_attention_forward.__doc__ = f"moe_patch: {NAME} for marked modules, else {modname}.eager_attention_forward"
    return eager_attention_forward


def _fell_back(reason: str) -> None:
    """Count a call that ran the family's eager function; warn once per reason."""
    if reason not in FALLBACKS:
        import warnings

        warnings.warn(f"moe_patch: {NAME} not used for this call, the family's eager attention ran: {reason}",
                      stacklevel=3)
    FALLBACKS[reason] = FALLBACKS.get(reason, 0) + 1


class _Handle(RouteHandle):
    def __init__(self, module, modname):
        self.module, self.modname = module, modname

    @property
    def key(self):
        return self.modname

    def _users(self) -> dict:
        return _USERS

    def remove(self):
        if self.module is None:
            return
        if hasattr(self.module, _MARK):
            delattr(self.module, _MARK)
        if not self.counted:
            self.module = None
            return
        _USERS[self.modname] -= 1
        if _USERS[self.modname] == 0:  # the last marked module: the family module gets its functions back
            family, ours = sys.modules[self.modname], _INSTALLED.pop(self.modname)
            restore_global(family, "eager_attention_forward", ours["eager_attention_forward"],
                           _ORIGINAL.pop(self.modname))
            for name, builder in _ORIGINAL_BUILDERS.pop(self.modname, {}).items():
                restore_global(family, name, ours[name], builder)
            del _USERS[self.modname]
        self.module = None


def family_eager(module) -> tuple:
    """(python module name, its original eager_attention_forward) or (name, None)."""
    modname = type(module).__module__
    fn = _ORIGINAL.get(modname) or getattr(sys.modules.get(modname), "eager_attention_forward", None)
    return modname, fn


def install(module) -> list:
    """Mark `module` and route its family's eager function through the dispatcher; returns removable handles."""
    modname, fn = family_eager(module)
    if modname not in _ORIGINAL:
        _ORIGINAL[modname] = fn
        family = sys.modules[modname]
        ours = _INSTALLED[modname] = {"eager_attention_forward": _dispatcher(modname)}
        _ORIGINAL_BUILDERS[modname] = {name: getattr(family, name) for name in _MASK_BUILDERS
                                       if callable(getattr(family, name, None))}
        for name, builder in _ORIGINAL_BUILDERS[modname].items():
            ours[name] = _mask_builder(builder, _MASK_BUILDERS[name])
        for name, fn in ours.items():
            setattr(family, name, fn)
    _USERS[modname] = _USERS.get(modname, 0) + 1
    setattr(module, _MARK, kernel_name(module, module.sinks.device))  # the kernel prove() ran (plan time)
    return [_Handle(module, modname)]


# --- the proof ------------------------------------------------------------------------------------------------

_PROOFS: dict = {}


def _stand_in(module, device, dtype, generator):
    """A shallow copy of the attention module with its own random sinks (trained scale, both signs), which is
    all the eager function reads besides its arguments (num_key_value_groups, training, sinks)."""
    clone = copy.copy(module)
    clone._parameters = {}
    clone._modules = {}
    clone._buffers = {}
    clone.training = False
    sinks = torch.randn(module.sinks.shape[0], generator=generator) * 2.0
    clone.sinks = nn.Parameter(sinks.to(device=device, dtype=dtype))
    return clone


NOT_ON_CPU = "flex_attention has no backward on CPU: the family's eager attention stays"
ON_GPU_PREVIEW = ("on a GPU: flex_attention with the learned sinks (causal, or this layer's sliding window) where "
                  "apply() proves it equal to the family's eager attention there, else eager stays; with Liger, "
                  "the RoPE on Liger's kernel where proven the family's")
ON_GPU_PREVIEW_CUDNN = ("on a GPU: cuDNN's attention with the learned sinks in bf16 / fp16 (MOE_PATCH_CUDNN_SINKS=1), "
                        "flex_attention with them in float32, where apply() proves it equal to the family's eager "
                        "attention there, else eager stays; with Liger, the RoPE on Liger's kernel where proven the "
                        "family's")


def preview_reason(module) -> str:
    """A GPU preview's row for a sinks attention module planned on a CPU (preview.py): what apply() there would try,
    cuDNN's kernel for a full layer where MOE_PATCH_CUDNN_SINKS is on now (kernel_name's choice, but for the
    model's dtype, which a meta model planned from a config does not have)."""
    from .. import config

    full = not getattr(module, "sliding_window", None)
    return ON_GPU_PREVIEW_CUDNN if full and config.flag(CUDNN_SWITCH) else ON_GPU_PREVIEW


def prove(module, device) -> str | None:
    """None if sink_attention_forward equals the family's own eager_attention_forward on `device` (float32:
    rel. error < 1e-5 forward, < 1e-4 gradients of q, k, v and sinks; bfloat16: < 2e-2, against eager in float32
    on the same bf16 values),
    with random q / k / v / sinks, causal and this layer's sliding-window masks, a length beyond the window and
    not a multiple of flex's block. Cached per (class, heads, kv heads, head dim, window, device, kernel)."""
    from .. import probe

    modname, eager = family_eager(module)
    if eager is None:
        return f"{modname} has no eager_attention_forward"
    if device.type != "cuda":
        return NOT_ON_CPU
    heads = module.sinks.shape[0]
    kv_groups = getattr(module, "num_key_value_groups", None)
    head_dim = getattr(module, "head_dim", None)
    window = getattr(module, "sliding_window", None)
    if not isinstance(kv_groups, int) or not isinstance(head_dim, int) or heads % kv_groups:
        return "no integer num_key_value_groups / head_dim on the attention module"
    scaling = getattr(module, "scaling", head_dim ** -0.5)
    cudnn = kernel_name(module, device) == CUDNN_NAME  # the kernel the module's half-precision calls will take
    key = (type(module), heads, kv_groups, head_dim, window, float(scaling), str(device), cudnn)
    if key in _PROOFS:
        return _PROOFS[key]
    reason = None
    try:
        g = torch.Generator().manual_seed(0)
        seq = max(2 * (window or 0), 96) + 37
        batch, kv_heads = 2, heads // kv_groups
        shapes = [(batch, heads, seq, head_dim), (batch, kv_heads, seq, head_dim), (batch, kv_heads, seq, head_dim)]
        base = [torch.randn(s, generator=g) for s in shapes]
        base[0] = base[0] * 3.0  # logits at a trained scale: sharp rows, where the sink matters
        for dtype in (torch.float32, torch.bfloat16):
            # eager runs in float32 on the same (dtype-rounded) values: in bf16 the reference is the function,
            # not eager's own bf16 rounding (its bf16 softmax is further from float64 than this kernel: CHANGELOG)
            new = _stand_in(module, device, dtype, torch.Generator().manual_seed(2))
            stock = _stand_in(module, device, dtype, torch.Generator().manual_seed(2)).float()
            stock.sinks = nn.Parameter(new.sinks.detach().float())
            mask = _expected_mask(seq, seq, window, dtype, device).expand(batch, 1, seq, seq)
            new_in = [t.to(device, dtype).requires_grad_() for t in base]
            ref_in = [t.detach().float().requires_grad_() for t in new_in]
            kw = dict(dropout=0.0, scaling=scaling, sliding_window=window)
            a, _ = eager(stock, *ref_in, mask.float(), **{**kw, "s_aux": stock.sinks})
            b, _ = sink_attention_forward(new, *new_in, mask, compiled="proof", cudnn=cudnn,
                                          **{**kw, "s_aux": new.sinks})
            if a.shape != b.shape:
                reason = f"output shape {tuple(b.shape)} != eager's {tuple(a.shape)}"
                break
            tol = probe.TOL[dtype]
            err = probe.rel_err(b, a)
            if not err < tol:
                reason = f"output rel. error {err:.1e} > {tol:.0e} ({dtype})"
                break
            w = torch.randn(a.shape, generator=g).to(device)
            ga = torch.autograd.grad((a.float() * w).sum(), ref_in + [stock.sinks])
            gb = torch.autograd.grad((b.float() * w).sum(), new_in + [new.sinks])
            for name, p, q in zip(("query", "key", "value", "sinks"), ga, gb):
                err = probe.rel_err(q, p)
                if not err < probe.GRAD_TOL[dtype]:
                    reason = f"{name} gradient rel. error {err:.1e} ({dtype})"
                    break
            if reason:
                break
    except Exception as exc:  # a proof must never take the host program down: report it instead
        reason = f"probe failed: {type(exc).__name__}: {exc}"
    _PROOFS[key] = reason
    return reason
