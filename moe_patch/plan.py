"""Plan: walk the model, match each module to a kind, choose a backend. Touches nothing.

Every module that a kind could apply to gets exactly one Row: patched (with the backend), fallback
(patched, but not by the backend that was preferred, with the reason) or skipped (with the reason).
The Actions carry what swap.py needs; building them can fail, mutating the model cannot happen here.
"""
from __future__ import annotations

import fnmatch
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import backends, config, probe
from .errors import PatchError
from .families import tables
from .ops import attention, compiled, experts, gated_rmsnorm, loss, mamba_ssd, mla, mlp, rmsnorm, router, \
    sink_attention
from .ops.base import Replacement


@dataclass
class Row:
    path: str
    kind: str
    original: str
    replacement: str
    backend: str
    status: str  # "patched" | "fallback" | "skipped"
    reason: str = ""


@dataclass
class Action:
    row: Row
    module: nn.Module
    factory: Callable[[nn.Module], nn.Module] | None = None  # module swaps
    attention_impl: str | None = None  # attention: the implementation it had
    rope: bool = False  # attention: RoPE calls go to the proven fused kernel (ops/rope.py)
    mla: bool = False  # attention: MLA's q / k / v assembly on the proven fused forward (ops/mla.py)
    loss_backend: str | None = None  # loss: the root model's forward gets the fused loss
    loss_step: str = "compiled"  # loss, chunked: the kernel of each chunk's softmax gradient (ops/loss.py STEPS)
    install: Callable[[nn.Module], list] | None = None  # routes the module's kernel; returns removable handles


@dataclass
class Options:
    attention: bool = True
    rmsnorm: bool = True
    linear: bool = True
    experts: bool = True
    router: bool = True
    loss: bool = True
    mamba: bool = True
    mlp: bool = True
    skip: tuple | Callable = ()
    backend: str | dict = "auto"
    fp8: str | None = None

    def enabled(self, kind: str) -> bool:
        return getattr(self, kind)


@dataclass
class Plan:
    actions: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    supports_sdpa: bool = True
    attention_later: list = field(default_factory=list)  # (row, module): on another implementation at apply()


def _device(module: nn.Module) -> torch.device:
    for t in module.parameters():  # first parameter, children included (attention holds none itself)
        if t.device.type == "meta":  # planning a meta model: report what this machine would do
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return t.device
    return torch.device("cpu")


def _user_stacklevel() -> int:
    """warnings.warn's stacklevel (as seen from the caller of this function) of the first frame outside
    moe_patch: the user's apply() / plan_report() line, however deep the call came from."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _warn_unmatched_skip(model: nn.Module, skip) -> None:
    """A skip glob that matches no module path is most likely a typo ('model.layer.*'): say so once."""
    if callable(skip):
        return
    paths = [p for p, _ in model.named_modules() if p]  # the root's path '' is never matched (_skipped_by_user)
    for pattern in skip:
        if not any(fnmatch.fnmatchcase(p, pattern) for p in paths):
            warnings.warn(f"moe_patch: skip pattern {pattern!r} matches no module of {type(model).__name__} "
                          "(globs match module paths such as 'model.layers.0.mlp')", UserWarning, stacklevel=_user_stacklevel())


def _skipped_by_user(path: str, module: nn.Module, skip) -> str | None:
    if callable(skip):
        try:
            skipped = skip(path, module)
        except Exception as exc:  # the user's function: say which call failed, in one line (nothing changed yet)
            raise PatchError(f"skip callable failed on ({path!r}, {type(module).__name__}); it is called as "
                             f"skip(path, module) -> bool: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}") from exc
        return "skip callable returned True" if skipped else None
    parts = path.split(".")
    ancestors = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in skip:
        if any(fnmatch.fnmatchcase(p, pattern) for p in ancestors):
            return f"matched skip pattern {pattern!r}"
    return None


# --- rules: (module) -> kind or None -------------------------------------------------------------------

def _three_d_params(module):
    return {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3}


def _per_expert_modules(module) -> bool:
    """An MoE block whose `experts` is an nn.ModuleList / nn.ModuleDict of one module per expert (Switch
    Transformers, NLLB-MoE, ...): not Transformers' fused 3-D layout, so no grouped GEMM here."""
    held = module._modules.get("experts")
    return isinstance(held, (nn.ModuleList, nn.ModuleDict)) and len(held) > 1


def _recognised_experts(module) -> bool:
    if hasattr(module, "has_gate") and hasattr(module, "is_transposed") or type(module).__name__ in tables().experts:
        return True
    if _per_expert_modules(module):
        return True  # an MoE block of the older layout: reported (it stays stock), not silently absent
    params3d = _three_d_params(module)
    # fused 3D experts found structurally, whatever the class is called
    return len(params3d) >= 2 and len({p.shape[0] for p in params3d.values()}) == 1


# the names Transformers gives experts modules and MoE blocks (DbrxExperts, JetMoeMoE, JetMoeMoA, DogeCDMoE, ...)
_EXPERTS_NAME = re.compile(r"(Experts|MoE|Moe|MoA)$")


def _unrecognised_experts(module) -> bool:
    """An experts module or MoE block (by its class name) with no experts layout known here anywhere inside it
    (DBRX's stacked 2-D GLU weights, JetMoE's one-3-D-weight-per-projection experts, Longcat-Flash's zero
    experts, Doge's embedding experts): reported as left stock rather than silently absent from the report."""
    return bool(_EXPERTS_NAME.search(type(module).__name__)) and not any(
        _recognised_experts(m) for m in module.modules())


def _weights(module, linear: bool = False) -> str:
    """'name [shape], ...' of the matrices (2-D or more) in an unrecognised experts module or router; with
    linear=False not those of its nn.Linear children (an experts block's shared expert, router)."""
    skipped = set() if linear else {f"{path}.weight" for path, m in module.named_modules() if isinstance(m, nn.Linear)}
    return ", ".join(f"{n} {list(p.shape)}" for n, p in module.named_parameters()
                     if p.dim() >= 2 and n not in skipped) or "no weight tensors of its own"


def _router_layout(module) -> bool:
    """A router in the layout TopKRouter replaces: its own 2-D weight [experts, hidden] and a top_k."""
    weight = module._parameters.get("weight")
    return "router" in type(module).__name__.lower() and weight is not None and weight.dim() == 2 and \
        hasattr(module, "top_k")


# the names Transformers gives routers (DbrxRouter, LongcatFlashTopkRouter, NllbMoeTop2Router, JetMoeTopKGating, ...);
# "...Gate" is also a forget or residual gate's name, so a Gate counts only with a top_k (HunYuanMoEV1Gate)
_ROUTER_NAME = re.compile(r"(Router|Gating)$")


def _unrecognised_router(module) -> bool:
    """A router by its class name in no layout known here (its weight in a child nn.Linear: LongCat-Flash, JetMoE,
    DBRX, Switch Transformers, ...): reported as left stock rather than silently absent from the report."""
    name = type(module).__name__
    named = bool(_ROUTER_NAME.search(name)) or name.endswith("Gate") and hasattr(module, "top_k")
    return named and not _router_layout(module)


def kind_of(module: nn.Module) -> str | None:
    cls = type(module)
    if cls.__name__ in tables().mamba:
        return "mamba"
    if cls.__name__ in tables().mlp:
        return "mlp"
    if _recognised_experts(module) or _unrecognised_experts(module):
        return "experts"
    weight = module._parameters.get("weight")
    name = cls.__name__.lower()
    if _router_layout(module) or _unrecognised_router(module):
        return "router"
    if "rmsnorm" in name and weight is not None and weight.dim() == 1:
        return "rmsnorm"
    if cls is nn.Linear:
        return "linear"
    if attention.dispatches_through_interface(cls) and getattr(module, "config", None) is not None:
        return "attention"
    return None


# --- per-kind proposals: (module) -> (factory or None, replacement name, reason) ----------------------

def _propose_rmsnorm(module, backend, opts):
    name = type(module).__name__
    if isinstance(module, nn.RMSNorm):
        return None, "", "already torch.nn.RMSNorm"
    if name in tables().skip:
        return None, "", tables().skip[name]
    if not probe.single_input(module):
        return None, "", "forward takes more than the hidden states (gated norm): not a plain RMSNorm"
    if rmsnorm.eps_of(module) is None:
        return None, "", "no float eps attribute (variance_epsilon / eps) found"
    declared = tables().rmsnorm.get(name)
    reasons, proven = [], []
    for variant in ([declared] if declared else list(rmsnorm.SEARCHED)):
        why = probe.proven_equal(module, lambda m, v=variant: rmsnorm.TorchRMSNorm.build(m, v),
                                 module.weight.shape[0], ("rmsnorm", variant), row_scales=rmsnorm.PROBE_ROW_SCALES)
        if why is None:
            proven.append(variant)
        else:
            reasons.append(f"{variant}: {why}")
    if not proven:
        return None, "", "not proven equal to F.rms_norm (" + "; ".join(reasons) + ")"
    # several proven (weight * norm(x) rounded two ways): the one rounding as the class does
    variant = proven[0] if len(proven) == 1 else rmsnorm.closest_rounding(module, proven)
    return (lambda m, v=variant: rmsnorm.make(m, v, backend)), rmsnorm.label(backend, variant, module), ""


def _propose_router(module, backend, opts):
    name = type(module).__name__
    if name in tables().skip:
        return None, "", tables().skip[name]
    spec = tables().router.get(name)
    if _unrecognised_router(module):  # TopKRouter replaces a router holding its own weight (_router_layout)
        declared = "its patches/ spec needs its own [experts, hidden] weight and a top_k" if spec else \
            "declared in no patches/ file"
        return None, "", (f"left stock: a router in a layout of its own ({_weights(module, linear=True)}), "
                          f"{declared}: no router replacement is proven for it")
    if spec is None:
        return None, "", f"no router spec for {name} in patches/: stock router kept"
    key = repr(sorted(spec.items()))
    why_not_te = ""
    if backend == "te":  # TE's fused kernel, proven on the GPU against the family's router
        why = probe.proven_equal(module, lambda m: router.TERouter.build(m, spec), module.weight.shape[1],
                                 ("te router", key), device=_device(module), canon=router.canonical,
                                 rows=router.untied_rows)
        if why is None:
            return (lambda m: router.TERouter.build(m, spec)), f"TERouter({spec['score']}, fused)", ""
        why_not_te = f"TE fused router not proven equal: {why}"
    why = probe.proven_equal(module, lambda m: router.TopKRouter.build(m, spec), module.weight.shape[1],
                             ("router", key), canon=router.canonical)
    if why is not None:
        return None, "", "; ".join(r for r in (why_not_te, f"router spec not proven equal: {why}") if r)
    return (lambda m: router.TopKRouter.build(m, spec)), f"TopKRouter({spec['score']})", why_not_te


def _propose_experts(module, backend, opts, expert_parallel=False):
    name = type(module).__name__
    if getattr(module, "_is_expert_parallel", False):
        raise PatchError(f"{name} is already sharded by Transformers' own expert parallelism; "
                         "build the model without DistributedConfig(ep_size=...) and pass mesh= instead")
    if name in tables().skip:
        return None, "", tables().skip[name]
    if _per_expert_modules(module):
        count = getattr(module.experts, "num_experts", None) or len(module.experts)  # NLLB's also holds a Dropout
        return None, "", (f"{count} experts as separate modules ({type(module.experts).__name__}), "
                          "not Transformers' fused 3-D expert weights: no grouped GEMM, the block stays stock")
    if _unrecognised_experts(module):
        return None, "", (f"experts in a layout of their own ({_weights(module)}): no grouped-GEMM "
                          "replacement is proven for it, the block stays stock")
    flags = experts_flags(module)
    if flags is None:
        return None, "", ("fused 3D expert weights without v5 layout flags (@use_experts_implementation); "
                          "add an EXPERTS entry in patches/")
    up = "gate_up_proj" if flags["has_gate"] else "up_proj"
    if not isinstance(getattr(module, up, None), nn.Parameter) or not isinstance(getattr(module, "down_proj", None),
                                                                              nn.Parameter):
        return None, "", f"expected 3D parameters {up} and down_proj"
    if flags["has_gate"] and not hasattr(module, "_apply_gate"):
        return None, "", "gated experts without _apply_gate"
    if not flags["has_gate"] and not hasattr(module, "act_fn"):
        return None, "", "non-gated experts without act_fn"
    key = _experts_key(module, flags)
    from .ops import tuned_gemm

    # the bf16 grouped GEMMs on inductor's autotuned kernels (opt-in; each kernel proves itself on its first call)
    tuned = tuned_gemm.enabled() and _device(module).type == "cuda"
    gemm = "grouped_mm autotuned" if tuned else "grouped_mm"
    why_not_te = ""
    if backend == "te":
        gate, why_gate = None, ""
        if flags["has_gate"]:
            from .ops.te_gate import fused_swiglu  # lazy: only reached with TE usable on a GPU

            gate, why_gate = fused_swiglu(module, _gate_width(module, flags), _device(module))
            if gate is None:  # the family's own gate compiled, where TE's SwiGLU is not it (GPT-OSS)
                gate, why_compiled = _compiled_gate(module, flags)
                why_gate = "" if gate is not None else "; ".join(r for r in (why_gate, why_compiled) if r)
        label = f"GroupedExperts(te permute, {_gate_label(gate)}{gemm})"
        te_factory = (lambda m: experts.GroupedExperts.build(m, flags, "te", gate, tuned=tuned))
        why = probe.experts_proven(module, te_factory, ("te", key, _gate_label(gate)), device=_device(module))
        if why is None:
            return _fp8_experts(module, flags, key, opts, expert_parallel, te_factory, label, why_gate,
                                lambda m: experts.GroupedExperts.build(m, flags, "te", gate, fp8=True, tuned=tuned))
        why_not_te = f"TE grouped experts not proven equal to {name}: {why}"
    # proven on a small throw-away copy, as the model's own experts module computes it (probe.py)
    gate, why_gate = _compiled_gate(module, flags) if flags["has_gate"] else (None, "")
    if _device(module).type != "cuda":
        why_gate = ""  # nothing to compile off a GPU: not a fallback
    extra = {"fused_gate": gate} if gate is not None else {}
    factory = (lambda m: experts.GroupedExperts.build(m, flags, tuned=tuned, **extra))
    why = probe.experts_proven(module, factory, ("torch", key, _gate_label(gate)), device=_device(module))
    if why is not None:
        return None, "", "; ".join(r for r in (why_not_te, f"GroupedExperts not proven equal to {name}: {why}") if r)
    return _fp8_experts(module, flags, key, opts, expert_parallel, factory, f"GroupedExperts({_gate_label(gate)}"
                        f"{gemm})", "; ".join(r for r in (why_not_te, why_gate) if r),
                        lambda m: experts.GroupedExperts.build(m, flags, fp8=True, tuned=tuned, **extra))


def experts_flags(module) -> dict | None:
    """The experts' layout flags (has_gate, is_transposed, has_bias, ...): patches/' EXPERTS entry for the class,
    else the module's own v5 attributes; None where neither says."""
    flags = tables().experts.get(type(module).__name__)
    if flags is None and hasattr(module, "has_gate"):
        flags = {f: getattr(module, f, False) for f in experts.FLAG_NAMES}
    return flags


def _gate_width(module, flags) -> int:
    gate_up = module.gate_up_proj  # [E, 2 x width, hidden], or [E, hidden, 2 x width] when transposed
    return gate_up.shape[-1 if flags["is_transposed"] else -2]


def _gate_label(gate) -> str:
    return "" if gate is None else f"{getattr(gate, 'label', 'te swiglu')}, "


def _compiled_gate(module, flags):
    """The family's own _apply_gate compiled (with the bias add where the experts have biases), where proven on
    this GPU (ops/compiled_gate.py); (None, why) elsewhere."""
    from .ops.compiled_gate import compiled_gate

    return compiled_gate(module, _gate_width(module, flags), _device(module), bool(flags["has_bias"]))


def _fp8_experts(module, flags, key, opts, expert_parallel, factory, label, reason, fp8_factory):
    """Under fp8=: the FP8 grouped GEMMs (ops/fp8_experts.py) where they can run here and are proven against
    the family's module in bf16 within FP8's bound (fp8_experts.FP8_TOL); else the proven bf16 replacement,
    with the reason. Without fp8 the bf16 replacement as it is."""
    if not opts.fp8:
        return factory, label, reason
    from .ops import fp8_experts

    up = "gate_up_proj" if flags["has_gate"] else "up_proj"
    why = fp8_experts.why_not([getattr(module, up), module.down_proj], _device(module), expert_parallel, opts.fp8)
    if why is None:
        why = probe.experts_proven(module, fp8_factory, ("fp8", label, key), device=_device(module),
                                   fp8_tol=fp8_experts.FP8_TOL)
        if why is None:
            head = label[:label.rindex("grouped_mm")]  # "... grouped_mm[ autotuned])": the bf16 weight gradient's
            return fp8_factory, head + "fp8 rowwise grouped_mm, weights quantised once per change" + \
                label[label.rindex("grouped_mm") + len("grouped_mm"):], reason
        why = f"FP8 experts not proven within {fp8_experts.FP8_TOL} of bf16: {why}; bf16"
    return factory, label, "; ".join(r for r in (reason, why) if r)


def _experts_key(module, flags) -> str:
    """What the experts proof depends on besides the class: the layout flags, the scalar attributes (clamp
    limits, activation names, the experts implementation in use) and the widths."""
    scalars = sorted((k, v) for k, v in vars(module).items()
                     if isinstance(v, (bool, int, float, str)) and not k.startswith("_"))
    impl = getattr(getattr(module, "config", None), "_experts_implementation", None)
    widths = [tuple(p.shape[1:]) for p in module.parameters(recurse=False)]
    act = type(getattr(module, "act_fn", None)).__name__
    return repr((sorted(flags.items()), scalars, impl, widths, act))


def _propose_linear(module, backend, opts):
    if backend != "te":
        return None, "", "torch backend keeps nn.Linear (cuBLAS already)"
    fp8 = opts.fp8
    if fp8 is None and backends.for_kind(opts.backend, "linear") == "auto":
        # measured on H200 (CHANGELOG 0.4.0): TE's bf16 Linear is slower than nn.Linear's cuBLAS call at the
        # attention projections (0.93x, q_proj of the Qwen3-30B-A3B shape); TE pays off with FP8 only
        return None, "", "auto keeps nn.Linear in bf16 (TE's bf16 Linear measured slower); TE runs linear under fp8="
    from .ops import te as te_ops  # lazy: only reached with TE usable on a GPU

    if fp8 and (module.in_features % 16 or module.out_features % 16):
        return (lambda m: te_ops.TELinear.build(m)), "TELinear(bf16)", \
            "fp8 needs both dimensions divisible by 16: runs in bf16"
    label = f"TELinear(fp8 {fp8})" if fp8 else "TELinear(bf16)"
    return (lambda m: te_ops.TELinear.build(m, te_ops.make_recipe(fp8))), label, ""


PROPOSE = {"rmsnorm": _propose_rmsnorm, "router": _propose_router, "experts": _propose_experts,
           "linear": _propose_linear}


def _plan_loss(model, opts, plan) -> None:
    if not hasattr(model, "lm_head"):
        return  # not a causal LM: no loss to fuse
    row = Row("", "loss", type(model).__name__, "", "", "skipped")
    plan.rows.append(row)
    if not opts.loss:
        row.reason = "loss=False"
        return
    # globs match the head's path; a callable is asked about the model itself (path "")
    user_skip = _skipped_by_user("", model, opts.skip) if callable(opts.skip) else \
        _skipped_by_user("lm_head", model.lm_head, opts.skip)
    if user_skip:
        row.reason = user_skip
        return
    why = loss.why_not(model)  # fast path: what is known not to fit, without building anything
    if why is None:  # the gate: the class's own forward, run against the fused path (probe.py)
        why = probe.fused_loss_unproven(model, loss.FusedLossForward.for_proof)
    if why:
        row.reason = why
        return
    device = _device(model.lm_head)
    backend, fallback_reason = backends.choose(backends.for_kind(opts.backend, "loss"), "loss", device)
    step, label = "compiled", "liger" if backend == "liger" else "torch, chunked"
    if backend == "torch" and device.type == "cuda" and backends.capabilities().liger:
        # each chunk's softmax gradient in Liger's cross-entropy kernel, where proven equal on this GPU
        why = loss.liger_step_unproven(device)
        if why is None:
            step, label = "liger", "torch, chunked, liger CE kernel"
        else:
            fallback_reason = "; ".join(r for r in (fallback_reason, why) if r)
    row.replacement, row.backend = f"FusedLinearCrossEntropy({label})", backend
    row.status, row.reason = ("fallback", fallback_reason) if fallback_reason else ("patched", "")
    plan.actions.append(Action(row, model, loss_backend=backend, loss_step=step))


def _plan_sink_attention(model, module, row, backend, fallback_reason, plan) -> None:
    """Attention with learned sinks (GPT-OSS, ...): flex_attention (opt-in: cuDNN's attention for full layers in
    half precision on a GPU) + the sinks where proven on this device
    against the family's own eager function (ops/sink_attention.py), and Liger's RoPE where proven (as for SDPA
    attention); the implementation name stays."""
    impl = getattr(module.config, "_attn_implementation", None)
    if impl != "eager":
        row.reason = f"model uses {impl!r} attention (chosen by the user); kept"
        return
    why = sink_attention.prove(module, _device(module))
    if why:
        row.reason = f"{sink_attention.NAME} not proven equal to the family's eager attention: {why}"
        return
    window = getattr(module, "sliding_window", None)
    kernel = sink_attention.kernel_name(module, _device(module))  # the one prove() ran and install() records
    row.replacement = f"{kernel}[{f'window {window}' if window else 'causal'}]"
    row.backend = "torch"
    rope_label, fallback_reason = _plan_rope(model, module, backend, row, fallback_reason)
    row.status, row.reason = ("fallback", fallback_reason) if fallback_reason else ("patched", "")
    install = sink_attention.install
    if rope_label:
        from .ops import rope  # lazy: Liger only where it runs

        install = _installs(sink_attention.install, rope.install)
    plan.actions.append(Action(row, module, install=install))


def _installs(*installs):
    """One Action.install running each of `installs` on the module, their handles together."""
    def install(module) -> list:
        return [h for each in installs for h in each(module)]

    return install


def _plan_rope(model, module, backend, row, fallback_reason) -> tuple[str | None, str]:
    """(Liger RoPE label or None, fallback reason): with the liger backend, the family's RoPE calls in this
    attention module go to Liger's kernel where ops/rope.py proves it the family's function (row.replacement
    and row.backend say so); where it does not, the reason joins fallback_reason."""
    if backend != "liger":
        return None, fallback_reason
    from .ops import rope  # lazy: only reached with Liger usable on a GPU

    rope_label, why = rope.prove(model, module)
    if rope_label:
        row.replacement, row.backend = f"{row.replacement} + {rope_label}", "liger"
        return rope_label, fallback_reason
    return None, "; ".join(r for r in (fallback_reason, why) if r)


def _plan_mamba(module, row, plan) -> None:
    """A Mamba2 mixer: its chunked scan on mamba-ssm's Triton SSD kernel where proven on this device against the
    mixer's own forward (ops/mamba_ssd.py); the mixer module and its forward stay."""
    fn_name = tables().mamba[type(module).__name__]
    device = _device(module)
    why = mamba_ssd.why_not(module, fn_name, device)
    if why:
        row.reason = why
        return
    proven = mamba_ssd.prove(module, fn_name, device)
    own = next(module.parameters()).dtype
    if own not in proven or proven[own] is not None:
        row.reason = f"{mamba_ssd.NAME} not proven equal to the mixer's own scan in {own}: " \
                     f"{proven.get(own, 'not probed')}"
        return
    ok = [d for d, why in proven.items() if why is None]
    others = [f"{str(d).replace('torch.', '')} calls run the family's scan: {why}" for d, why in proven.items() if why]
    row.replacement = f"{mamba_ssd.NAME}[chunk {module.chunk_size}]"
    row.backend, row.status, row.reason = "mamba_ssm", "patched", "; ".join(others)
    plan.actions.append(Action(row, module, install=mamba_ssd.installer(fn_name, ok)))


def _plan_mlp(module, row, plan) -> None:
    """A gated MLP a family declares (patches/: MLP): GatedMLP where proven equal to the module on its device
    (fp32 and bf16, outputs and input gradients, the module's widths); its projections stay its own children."""
    if not config.flag(mlp.SWITCH, default=True):
        row.reason = f"{mlp.SWITCH}={os.environ.get(mlp.SWITCH, '')!r} (off): the family's module kept"
        return
    why = mlp.why_not(module)
    if why is None:
        widths = tuple((getattr(module, n).in_features, getattr(module, n).out_features)
                       for n in ("gate_proj", "up_proj", "down_proj"))
        why = probe.proven_equal(module, mlp.GatedMLP.build, module.gate_proj.in_features, ("mlp", widths),
                                 device=_device(module))
    if why is not None:
        row.reason = f"{mlp.NAME} not proven equal to {type(module).__name__}: {why}"
        return
    compiled_here = _device(module).type == "cuda" and compiled.enabled()
    row.replacement = mlp.NAME + ("" if compiled_here else " (eager: no compiler on this device)")
    row.backend, row.status = "torch", "patched"
    plan.actions.append(Action(row, module, factory=mlp.GatedMLP.build))


def _plan_gated_rmsnorm(module, row, plan) -> None:
    """A Mamba2 mixer's gated, grouped RMSNorm (patches/ GATED_RMSNORM): the module swapped for GatedRMSNorm,
    which runs mamba-ssm's Triton kernel for the dtype cases proven on this device against the family's own
    forward (ops/gated_rmsnorm.py), else that forward. No backend choice: one kernel, or the family's norm."""
    spec = tables().gated_rmsnorm[type(module).__name__]
    device = _device(module)
    why = gated_rmsnorm.why_not(module, device)
    if why:
        row.reason = why
        return
    proven = gated_rmsnorm.prove(module, spec["norm_before_gate"], device)
    own = module.weight.dtype
    ok = [case for case, why in proven.items() if why is None]
    if not any(case[2] == own for case in ok):
        row.reason = f"{gated_rmsnorm.NAME} not proven equal to {type(module).__name__} with {own} weights: " + \
            "; ".join(why for case, why in proven.items() if case[2] == own)
        return
    others = [f"{gated_rmsnorm.case_name(c)} calls run the family's norm: {why}" for c, why in proven.items() if why]
    row.replacement = f"GatedRMSNorm(mamba-ssm rmsnorm_fn, group {module.group_size})"
    row.backend, row.status, row.reason = "mamba_ssm", "patched", "; ".join(others)
    plan.actions.append(Action(row, module, factory=lambda m: gated_rmsnorm.GatedRMSNorm.build(
        m, spec["norm_before_gate"], ok)))


def without_rope_kernel_reason(reason: str | None, device, caps=None) -> str | None:
    """An attention row's fallback reason under the fused MLA: under "auto" the attention backend picks the RoPE
    kernel only (Liger's), which the fused MLA does not call (it applies the family's RoPE itself), so why Liger is
    unavailable is not that row's; any other reason (a backend asked for by name with no attention kernel) is.
    `caps`: another machine's capabilities (the GPU preview, preview.py)."""
    return None if reason and reason == backends.unavailable("liger", device, caps) else reason


def _plan_attention(model, module, row, backend, fallback_reason, plan) -> None:
    if sink_attention.has_sinks(module):
        _plan_sink_attention(model, module, row, backend, fallback_reason, plan)
        return
    impl = getattr(module.config, "_attn_implementation", None)
    if impl != "sdpa" or not plan.supports_sdpa:
        row.reason = f"model uses {impl!r} attention (chosen by the user or required by the family); kept"
        if plan.supports_sdpa:  # set_attn_implementation("sdpa") later: proven and patched then (swap.replan)
            plan.attention_later.append((row, module))
        return
    why = attention.prove(model, module)  # the hooks against the family's own module, on its switches
    if why is not None:
        row.reason = f"stock sdpa kept: kernel priority not proven equal ({why})"
        return
    device = _device(module)
    row.replacement, row.backend = f"{attention.describe(device)} (kernel priority set by the module)", "torch"
    fused_mla = False
    # MLA (DeepSeek-V3): q / k / v assembled by fused compiled kernels (ops/mla.py); MOE_PATCH_FUSED_MLA=0: off
    if type(module).__name__ in tables().mla and not config.flag(mla.SWITCH, default=True):
        row.replacement += f" ({mla.NAME} off: {mla.SWITCH}=0)"
    elif type(module).__name__ in tables().mla:
        why = mla.prove(model, module)
        if why is None:
            row.replacement, fused_mla = f"{row.replacement} + {mla.NAME}{mla.describe(device)}", True
            fallback_reason = without_rope_kernel_reason(fallback_reason, device)
        else:
            fallback_reason = "; ".join(r for r in (fallback_reason, f"{mla.NAME} not proven: {why}") if r)
    rope_label = None
    if not fused_mla:  # SDPA + Liger RoPE (not under the fused MLA forward: that applies the RoPE itself)
        rope_label, fallback_reason = _plan_rope(model, module, backend, row, fallback_reason)
    row.status, row.reason = ("fallback", fallback_reason) if fallback_reason else ("patched", "")
    plan.actions.append(Action(row, module, attention_impl=impl, rope=rope_label is not None, mla=fused_mla))


def _fused_loss_head(model: nn.Module, plan: Plan):
    """The output embedding the planned fused loss will read, or None when the loss is not patched."""
    if not any(r.kind == "loss" and r.status != "skipped" for r in plan.rows):
        return None
    try:
        return model.get_output_embeddings()
    except Exception:  # not a PreTrainedModel, or a family without output embeddings
        return getattr(model, "lm_head", None)


def make_plan(model: nn.Module, opts: Options, supports_sdpa: bool, expert_parallel: bool = False) -> Plan:
    plan = Plan(supports_sdpa=supports_sdpa)
    _warn_unmatched_skip(model, opts.skip)
    _plan_loss(model, opts, plan)
    fused_head = _fused_loss_head(model, plan)
    claimed: list[str] = []  # replaced modules' paths: their children belong to them
    experts_rows: list[str] = []  # every experts row's path: one row per MoE block
    for path, module in model.named_modules():
        if isinstance(module, Replacement) or any(path.startswith(c + ".") for c in claimed):
            continue
        kind = kind_of(module)
        if kind is None:
            continue
        if kind == "experts" and any(path.startswith(p + ".") for p in experts_rows) and _unrecognised_experts(module):
            continue  # inside an MoE block already reported (NLLB's NllbMoeExperts, JetMoE's JetMoeParallelExperts)
        if kind == "experts":
            experts_rows.append(path)
        cls_name = type(module).__name__
        row = Row(path, kind, cls_name, "", "", "skipped")
        plan.rows.append(row)
        if not opts.enabled(kind):
            row.reason = f"{kind}=False"
            continue
        user_skip = _skipped_by_user(path, module, opts.skip)
        if user_skip:
            row.reason = user_skip
            continue
        if kind == "mamba":  # mamba-ssm's kernel or the family's own scan: no backend choice
            _plan_mamba(module, row, plan)
            continue
        if kind == "mlp":  # the compiled product or the family's module: no backend choice
            _plan_mlp(module, row, plan)
            continue
        if kind == "rmsnorm" and cls_name in tables().gated_rmsnorm:  # likewise: mamba-ssm's kernel or stock
            _plan_gated_rmsnorm(module, row, plan)
            continue
        backend, fallback_reason = backends.choose(backends.for_kind(opts.backend, kind), kind, _device(module))

        if kind == "attention":
            _plan_attention(model, module, row, backend, fallback_reason, plan)
            continue
        if kind == "linear" and module is fused_head:
            # the fused loss runs only while lm_head is the plain nn.Linear it proved (ops/loss.py): a TELinear
            # there would switch it off at the first forward while the report said "patched"
            row.reason = "lm_head feeds the fused loss, which reads its weight: kept nn.Linear"
            continue

        propose = PROPOSE[kind]
        if kind == "experts":
            factory, replacement, reason = propose(module, backend, opts, expert_parallel)
        else:
            factory, replacement, reason = propose(module, backend, opts)
        if factory is None:
            row.reason = reason
            continue
        if kind == "experts":
            claimed.append(path)
        row.replacement, row.backend = replacement, backend
        fallback_reason = "; ".join(r for r in (fallback_reason, reason) if r)
        row.status, row.reason = ("fallback", fallback_reason) if fallback_reason else ("patched", "")
        plan.actions.append(Action(row, module, factory=factory))
    return plan
