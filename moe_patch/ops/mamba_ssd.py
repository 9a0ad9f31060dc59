"""Mamba2 mixers' chunked scan on mamba-ssm's Triton SSD kernel (optional extra: pip install "moe_patch[mamba]").

What the family computes: its mixer (e.g. transformers' NemotronHMamba2Mixer) projects, convolves and splits the
hidden states itself, then calls its module-level `mamba2_chunk_scan(x, dt, A, B, C, chunk_size, D=..., dt_bias=...,
dt_softplus=True, dt_limit=...)`: the selective state-space recurrence h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,
y_t = C_t h_t + D x_t with dt_t = clamp(softplus(dt_t + dt_bias), dt_limit), in chunks (the "state space duality"
form, Dao & Gu 2024, arXiv:2405.21060). Without mamba-ssm importable, Transformers binds that name to its reference
PyTorch version, which builds [batch, chunks, chunk, chunk, heads] score tensors in float32.

mamba-ssm's `mamba_chunk_scan_combined` (mamba_ssm/ops/triton/ssd_combined.py) computes the same recurrence in
fused Triton kernels, forward and backward (gradients to x, dt, A, B, C, D, dt_bias). It needs no CUDA extension,
but `import mamba_ssm` does (its __init__ imports selective_scan_cuda): a build with MAMBA_SKIP_CUDA_BUILD=TRUE has
none, so `import mamba_ssm` fails and Transformers keeps its PyTorch scan. load_kernel() imports the Triton module
under a bare package object and takes that object out of sys.modules again, so Transformers' own import check
answers as before.

How it is wired (like ops/sink_attention.py): install() puts a dispatcher in the family module's
`mamba2_chunk_scan` global; the mixer's stock forward stays (projections, convolution, gated norm, cache and
padding handling), and only the scan call of a marked mixer goes to the kernel. A mixer is marked by forward hooks
that set a context variable while it runs, so every other module, and other models in the process, get the
original function. At call time the dispatcher checks what the proof covered (no initial or final state, i.e. no
cache; no packed-sequence index; a proven dtype, chunk size and dt_limit; CUDA tensors) and otherwise runs the
original function, counting the reason in FALLBACKS.

The proof (prove): a stand-in copy of the mixer at the model's widths with fresh random weights at an init-like
scale, in training mode, runs its own stock forward and the same forward with the scan routed to the kernel, on a
length that is not a multiple of the chunk; float32 (relative error < 1e-5 output, < 1e-4 gradients) and bfloat16
(< 2e-2, against the stock forward in float32 on the same bf16 values); gradients of the input and of every
parameter (in_proj, conv1d weight and bias, dt_bias, A_log, D, norm, out_proj). The kernel computes its dot
products in TF32 for float32 inputs (Triton's tl.dot default), so float32 is expected to stay stock: the report
says so with the measured error. Only the dtypes the model hands its mixers are proven (proof_dtypes): its own,
and bfloat16 too for a float32 model (autocast). A bfloat16 model's mixers get no float32 scan calls, and proving
float32 there would compile and autotune every SSD kernel a second time at apply() (minutes on a cold Triton
cache) for a case that stays on the family's scan anyway.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import importlib
import importlib.machinery
import importlib.util
import inspect
import sys
import types
import weakref

import torch
from torch import nn

from .base import RouteHandle, restore_global

NAME = "mamba_chunk_scan_combined (mamba-ssm Triton SSD)"
PACKAGE = "mamba_ssm"
KERNEL_MODULE = "mamba_ssm.ops.triton.ssd_combined"
KERNEL_NAME = "mamba_chunk_scan_combined"
_MARK = "_moe_patch_mamba_ssd"  # on a marked mixer: {"dtypes": frozenset, "chunk_size": int, "dt_limit": tuple}
_ACTIVE = contextvars.ContextVar("moe_patch_mamba_mixer", default=None)  # the marked mixer whose forward runs
_ORIGINAL: dict = {}  # (python module name, function name) -> the function it had
_INSTALLED: dict = {}  # (python module name, function name) -> the dispatcher set there (put back only if still there)
_USERS: dict = {}  # (python module name, function name) -> number of marked mixers
FALLBACKS: dict = {}  # reason -> calls of a marked mixer that ran the family's own scan
CALLS = {"kernel": 0}  # scan calls that ran the kernel (the proof checks that its routed forward used it)
_KERNEL: dict = {}  # cache of load_kernel()
KERNEL_DEVICES = ("cuda",)  # where the kernel runs (Triton); CPU tests stand a reference in for it on "cpu"
NOT_ON_CPU = "mamba-ssm's SSD kernels are Triton (CUDA only): the family's PyTorch scan stays on this device"
ON_GPU_PREVIEW = ("on a GPU with mamba-ssm installed (moe_patch[mamba]): mamba-ssm's Triton SSD scan where apply() "
                  "proves it there, else the family's PyTorch scan")


# --- the kernel ---------------------------------------------------------------------------------------------

def load_bare(package: str, submodule: str):
    """Import `package.submodule` even where `package/__init__.py` fails to import (a missing compiled extension
    that the submodule does not use): the submodule is imported under a bare package object (no __init__ run),
    which is then removed from sys.modules again, so that `import package` afterwards fails exactly as before.
    Returns the submodule; raises ImportError with the reason."""
    try:
        return importlib.import_module(submodule)
    except ImportError as first:
        reason = f"{type(first).__name__}: {first}"
    spec = importlib.util.find_spec(package) if package not in sys.modules else None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{package} not importable ({reason})")
    bare = types.ModuleType(package)
    bare.__path__ = list(spec.submodule_search_locations)
    bare.__spec__ = importlib.machinery.ModuleSpec(package, None, is_package=True)
    bare.__spec__.submodule_search_locations = bare.__path__
    sys.modules[package] = bare
    try:
        return importlib.import_module(submodule)
    except Exception as exc:  # the submodule itself needs what is missing
        raise ImportError(f"{submodule} not importable without {package}'s __init__ ({type(exc).__name__}: {exc}; "
                          f"the package itself: {reason})") from exc
    finally:
        if sys.modules.get(package) is bare:
            del sys.modules[package]


def load_function(submodule: str, name: str, what: str):
    """(`name` from mamba-ssm's `submodule`, "") or (None, why not), without `import mamba_ssm` (load_bare).
    `what` names it in the reason. Not cached: each caller caches its own (load_kernel here, gated_rmsnorm's)."""
    try:
        found = importlib.util.find_spec(PACKAGE) is not None
    except (ImportError, ValueError):  # blocked (sys.modules entry None) or a broken install
        found = False
    if not found:
        return None, ("mamba-ssm is not installed (pip install 'moe_patch[mamba]'; its Triton kernels need no CUDA "
                      "build: MAMBA_SKIP_CUDA_BUILD=TRUE)")
    try:
        return getattr(load_bare(PACKAGE, submodule), name), ""
    except (ImportError, AttributeError) as exc:
        return None, f"mamba-ssm's {what} could not be imported: {exc}"


def load_kernel():
    """(mamba_chunk_scan_combined, "") or (None, why not). Cached."""
    if "result" not in _KERNEL:
        _KERNEL["result"] = load_function(KERNEL_MODULE, KERNEL_NAME, "Triton SSD kernels")
    return _KERNEL["result"]


def stock_uses_package(fn) -> bool:
    """True where Transformers already bound the family's scan function to an installed package's kernel
    (its hub-kernel wrapper keeps `is_new_implementation` in its closure)."""
    try:
        return bool(inspect.getclosurevars(fn).nonlocals.get("is_new_implementation"))
    except (TypeError, ValueError):
        return False


# --- routing: a dispatcher in the family module's scan global -----------------------------------------------

def _fell_back(reason: str) -> None:
    if reason not in FALLBACKS:
        import warnings

        warnings.warn(f"moe_patch: {NAME} not used for this call, the family's own scan ran: {reason}", stacklevel=3)
    FALLBACKS[reason] = FALLBACKS.get(reason, 0) + 1


def _why_not_here(mark, hidden_states, chunk_size, initial_states, dt_limit, dt_softplus, return_final_states,
                  kwargs) -> str | None:
    if initial_states is not None or return_final_states:
        return "initial or final SSM state (a cache): the proof covers training calls without one"
    if kwargs.get("seq_idx") is not None or kwargs.get("cu_seqlens") is not None:
        return "packed sequences (seq_idx / cu_seqlens)"
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.device.type not in KERNEL_DEVICES:
        return "tensors not on a CUDA device (the kernel is Triton)"
    if hidden_states.dtype not in mark["dtypes"]:
        return f"{hidden_states.dtype} not proven at plan time"
    if chunk_size != mark["chunk_size"] or tuple(dt_limit) != mark["dt_limit"] or not dt_softplus:
        return "chunk size, dt_limit or dt_softplus differ from what was proven"
    return None


def _dispatcher(key):
    original = _ORIGINAL[key]

    def mamba2_chunk_scan(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                          dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, **kwargs):
        mixer = _ACTIVE.get()
        mark = getattr(mixer, _MARK, None) if mixer is not None else None
        if mark is not None:
            why = _why_not_here(mark, hidden_states, chunk_size, initial_states, dt_limit, dt_softplus,
                                return_final_states, kwargs)
            if why is None:
                kernel, _ = load_kernel()
                CALLS["kernel"] += 1
                # z stays None: the family's scan takes no gate (its gated norm runs after it)
                return kernel(hidden_states, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True,
                              dt_limit=tuple(dt_limit))
            if mark.get("strict"):
                raise RuntimeError(f"proof call not routed to the kernel: {why}")
            _fell_back(why)
        return original(hidden_states, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_states,
                        dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=return_final_states,
                        **kwargs)

    mamba2_chunk_scan.__wrapped__ = original
    mamba2_chunk_scan.__doc__ = f"moe_patch: {NAME} for marked mixers, else {key[0]}.{key[1]}"
    return mamba2_chunk_scan


def _route(key) -> None:
    modname, fn_name = key
    if key not in _ORIGINAL:
        _ORIGINAL[key] = getattr(sys.modules[modname], fn_name)
        _INSTALLED[key] = _dispatcher(key)
        setattr(sys.modules[modname], fn_name, _INSTALLED[key])
    _USERS[key] = _USERS.get(key, 0) + 1


def _unroute(key) -> None:
    _USERS[key] -= 1
    if _USERS[key] == 0:  # the last user: the family module gets its function back
        restore_global(sys.modules[key[0]], key[1], _INSTALLED.pop(key), _ORIGINAL.pop(key))
        del _USERS[key]


def _enter(module, args, kwargs=None):
    module.__dict__["_moe_patch_mamba_token"] = _ACTIVE.set(module)


def _leave(module, args, output_or_kwargs=None, output=None):
    token = module.__dict__.pop("_moe_patch_mamba_token", None)
    if token is not None:
        try:
            _ACTIVE.reset(token)
        except ValueError:  # set in another context (a checkpoint's recompute thread): clear instead
            _ACTIVE.set(None)


class _Handle(RouteHandle):
    def __init__(self, module, key, hooks):
        self.module, self.key, self.hooks = module, key, hooks

    def _users(self) -> dict:
        return _USERS

    def remove(self):
        if self.module is None:
            return
        for h in self.hooks:
            h.remove()
        self.module.__dict__.pop(_MARK, None)
        if self.counted:
            _unroute(self.key)
        self.module = None


def family_key(module, fn_name: str):
    return (type(module).__module__, fn_name)


def installer(fn_name: str, dtypes):
    """install(module) for apply(): marks the mixer (scan calls in these dtypes go to the kernel) and routes the
    family module's `fn_name` through the dispatcher; returns removable handles."""
    dtypes = frozenset(dtypes)

    def install(module) -> list:
        key = family_key(module, fn_name)
        _route(key)
        module.__dict__[_MARK] = {"dtypes": dtypes, "chunk_size": module.chunk_size,
                                  "dt_limit": tuple(module.time_step_limit)}
        hooks = [module.register_forward_pre_hook(_enter),
                 module.register_forward_hook(_leave, always_call=True)]
        return [_Handle(module, key, hooks)]

    return install


@contextlib.contextmanager
def _routed(module, fn_name: str, dtype):
    """While inside: `module`'s scan calls go to the kernel, strictly (a call that would fall back raises)."""
    key = family_key(module, fn_name)
    _route(key)
    module.__dict__[_MARK] = {"dtypes": frozenset({dtype}), "chunk_size": module.chunk_size,
                              "dt_limit": tuple(module.time_step_limit), "strict": True}
    token = _ACTIVE.set(module)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        module.__dict__.pop(_MARK, None)
        _unroute(key)


# --- plan-time checks and the proof -------------------------------------------------------------------------

def why_not(module, fn_name: str, device) -> str | None:
    """Why the kernel cannot apply to this mixer at all (before any proof), or None."""
    family = sys.modules.get(type(module).__module__)
    fn = _ORIGINAL.get(family_key(module, fn_name)) or getattr(family, fn_name, None)
    if fn is None:
        return f"{type(module).__module__} has no {fn_name}"
    for attr in ("chunk_size", "time_step_limit", "A_log", "D", "dt_bias"):
        if not hasattr(module, attr):
            return f"mixer has no {attr}"
    if stock_uses_package(fn):
        return "Transformers already runs mamba-ssm's kernels for this family (mamba-ssm fully installed): kept"
    if torch.device(device).type not in KERNEL_DEVICES:
        return NOT_ON_CPU
    kernel, why = load_kernel()
    return why or None


_PROOFS: dict = {}
ERRORS: dict = {}  # (mixer class name, widths key, dtype) -> {"output": rel. error, parameter name: rel. error}


def _stand_in(module: nn.Module, dtype, device) -> nn.Module:
    """A copy of the mixer with fresh random weights at an init-like scale (so states carry across chunks):
    linear weights ~ N(0, 1/fan_in), A = -[1..16], dt = softplus(dt_bias) in [0.001, 0.1], D ~ 1 + N(0, 0.5)."""
    clone = copy.deepcopy(module).to_empty(device="cpu").float()
    for m in clone.modules():  # no moe_patch hooks on the copy
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    clone.__dict__.pop(_MARK, None)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if name == "A_log":
                p.copy_(torch.log(torch.rand(p.shape, generator=g) * 15 + 1))
            elif name == "dt_bias":
                dt = torch.exp(torch.rand(p.shape, generator=g) * (torch.log(torch.tensor(0.1)) -
                                                                    torch.log(torch.tensor(1e-3))) + torch.log(torch.tensor(1e-3)))
                p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            elif name == "D" or name.endswith("norm.weight"):
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.5)
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    clone.train()
    return clone.to(device=device, dtype=dtype)


def _stock_own_error(new, x, w, index, reference) -> str:
    """For a failed half-precision proof: the family's own scan's error on the same tensor, in the same dtype
    (context for the report, not a tolerance)."""
    if x.dtype == torch.float32:
        return ""
    try:
        stock = copy.deepcopy(new)
        x = x.detach().clone().requires_grad_()
        grads = torch.autograd.grad((stock(x).float() * w).sum(), [x, *stock.parameters()], allow_unused=True)
        return f"; the family's own scan in {x.dtype}: {rel_err_or_none(grads[index], reference)}"
    except Exception as exc:  # noqa: BLE001 - context only
        return f"; the family's own scan could not be compared: {type(exc).__name__}"


def rel_err_or_none(a, b) -> str:
    from .. import probe

    return "no gradient" if a is None else f"{probe.rel_err(a, b):.1e}"


def proof_dtypes(module) -> tuple:
    """The scan dtypes a model hands this mixer: its own; and bfloat16 too where it is float32 (autocast)."""
    own = next(module.parameters()).dtype
    return (torch.float32, torch.bfloat16) if own == torch.float32 else (own,)


def prove(module, fn_name: str, device) -> dict:
    """{torch.float32: reason or None, torch.bfloat16: reason or None}: whether the mixer's forward with its scan
    on the kernel equals its own stock forward on `device` (see the module docstring); a dtype outside
    proof_dtypes(module) gets the reason it was not probed. Cached per (class, widths, chunk size, dt_limit,
    device, dtypes)."""
    from .. import probe

    dtypes = proof_dtypes(module)
    key = (type(module), tuple((n, tuple(p.shape)) for n, p in module.named_parameters()), module.chunk_size,
           tuple(module.time_step_limit), str(device), dtypes)
    if key in _PROOFS:
        return _PROOFS[key]
    result = {d: f"not probed: the model's weights are {str(dtypes[0]).replace('torch.', '')}, whose mixers get "
                 f"no {str(d).replace('torch.', '')} scan calls" for d in (torch.float32, torch.bfloat16)
              if d not in dtypes}
    hidden = next(p for n, p in module.named_parameters() if n.endswith("in_proj.weight")).shape[1]
    seq = 2 * module.chunk_size + 37  # a partial last chunk, and state carried across two chunk boundaries
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, seq, hidden, generator=g)
    for dtype in dtypes:
        try:
            new = _stand_in(module, dtype, device)
            ref = copy.deepcopy(new).float()  # the family's own forward, in float32 on the same values
            x_new = x0.to(device, dtype).requires_grad_()
            x_ref = x_new.detach().float().requires_grad_()
            a = ref(x_ref)
            before = CALLS["kernel"]
            with _routed(new, fn_name, dtype):
                b = new(x_new)
            if CALLS["kernel"] == before:
                result[dtype] = "the routed forward did not reach the kernel"
                continue
            if a.shape != b.shape:
                result[dtype] = f"output shape {tuple(b.shape)} != stock's {tuple(a.shape)}"
                continue
            err = probe.rel_err(b, a)
            errors = ERRORS[(type(module).__name__, key[1:4], str(dtype))] = {"output": err}
            if not err < probe.TOL[dtype]:
                result[dtype] = f"output rel. error {err:.1e} > {probe.TOL[dtype]:.0e} ({dtype})"
                continue
            w = torch.randn(a.shape, generator=torch.Generator().manual_seed(2)).to(device)
            names = ["hidden states"] + [n for n, _ in ref.named_parameters()]
            ga = torch.autograd.grad((a * w).sum(), [x_ref, *ref.parameters()], allow_unused=True)
            gb = torch.autograd.grad((b.float() * w).sum(), [x_new, *new.parameters()], allow_unused=True)
            result[dtype] = None
            for i, (name, p, q) in enumerate(zip(names, ga, gb)):
                if p is not None and q is not None:
                    errors[name] = probe.rel_err(q, p)
                if (p is None) != (q is None):
                    result[dtype] = f"gradient of {name} {'missing' if q is None else 'unexpected'} ({dtype})"
                    break
                if p is not None and not probe.rel_err(q, p) < probe.GRAD_TOL[dtype]:
                    result[dtype] = f"gradient of {name}: rel. error {probe.rel_err(q, p):.1e} ({dtype}" + \
                        _stock_own_error(new, x_new, w, i, p) + ")"
                    break
        except Exception as exc:  # a proof never takes the host program down: reported instead
            result[dtype] = f"probe failed: {type(exc).__name__}: {str(exc)[:300]}"
    _PROOFS[key] = result
    return result
