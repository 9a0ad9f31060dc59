"""Plan: walk the model, match each module to a kind, choose a backend. Touches nothing.

Every module that a kind could apply to gets exactly one Row: patched (with the backend), fallback
(patched, but not by the backend that was preferred, with the reason) or skipped (with the reason).
The Actions carry what swap.py needs; building them can fail, mutating the model cannot happen here.
"""
from __future__ import annotations

import fnmatch
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import backends, config, probe
from .errors import PatchError
from .families import tables
from .ops import attention, compiled, experts, loss, mamba_ssd, mla, mlp, rmsnorm, router, sink_attention
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
        return "skip callable returned True" if skip(path, module) else None
    parts = path.split(".")
    ancestors = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in skip:
        if any(fnmatch.fnmatchcase(p, pattern) for p in ancestors):
            return f"matched skip pattern {pattern!r}"
    return None


# --- rules: (module) -> kind or None -------------------------------------------------------------------

def _three_d_params(module):
    return {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3}


def kind_of(module: nn.Module) -> str | None:
    cls = type(module)
    if cls.__name__ in tables().mamba:
        return "mamba"
    if cls.__name__ in tables().mlp:
        return "mlp"
    if hasattr(module, "has_gate") and hasattr(module, "is_transposed") or cls.__name__ in tables().experts:
        return "experts"
    params3d = _three_d_params(module)
    if len(params3d) >= 2 and len({p.shape[0] for p in params3d.values()}) == 1:
        return "experts"  # fused 3D experts found structurally, whatever the class is called
    weight = module._parameters.get("weight")
    name = cls.__name__.lower()
    if "router" in name and weight is not None and weight.dim() == 2 and hasattr(module, "top_k"):
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
    reasons = []
    for variant in ([declared] if declared else list(rmsnorm.VARIANTS)):
        why = probe.proven_equal(module, lambda m, v=variant: rmsnorm.TorchRMSNorm.build(m, v),
                                 module.weight.shape[0], ("rmsnorm", variant))
        if why is None:
            return (lambda m, v=variant: rmsnorm.make(m, v, backend)), rmsnorm.label(backend, variant, module), ""
        reasons.append(f"{variant}: {why}")
    return None, "", "not proven equal to F.rms_norm (" + "; ".join(reasons) + ")"


def _propose_router(module, backend, opts):
    name = type(module).__name__
    if name in tables().skip:
        return None, "", tables().skip[name]
    spec = tables().router.get(name)
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
    flags = tables().experts.get(name)
    if flags is None and hasattr(module, "has_gate"):
        flags = {f: getattr(module, f, False) for f in experts.FLAG_NAMES}
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
    why_not_te = ""
    if backend == "te":
        gate, why_gate = None, ""
        if flags["has_gate"]:
            from .ops.te_gate import fused_swiglu  # lazy: only reached with TE usable on a GPU

            gate_up = module.gate_up_proj  # [E, 2 x width, hidden], or [E, hidden, 2 x width] when transposed
            gate, why_gate = fused_swiglu(module, gate_up.shape[-1 if flags["is_transposed"] else -2],
                                          _device(module))
        label = "GroupedExperts(te permute, te swiglu, grouped_mm)" if gate is not None else \
            "GroupedExperts(te permute, grouped_mm)"
        te_factory = (lambda m: experts.GroupedExperts.build(m, flags, "te", gate))
        why = probe.experts_proven(module, te_factory, ("te", key, gate is not None), device=_device(module))
        if why is None:
            return _fp8_experts(module, flags, key, opts, expert_parallel, te_factory, label, why_gate,
                                lambda m: experts.GroupedExperts.build(m, flags, "te", gate, fp8=True))
        why_not_te = f"TE grouped experts not proven equal to {name}: {why}"
    # proven on a small throw-away copy, as the model's own experts module computes it (probe.py)
    factory = (lambda m: experts.GroupedExperts.build(m, flags))
    why = probe.experts_proven(module, factory, ("torch", key), device=_device(module))
    if why is not None:
        return None, "", "; ".join(r for r in (why_not_te, f"GroupedExperts not proven equal to {name}: {why}") if r)
    return _fp8_experts(module, flags, key, opts, expert_parallel, factory, "GroupedExperts(grouped_mm)", why_not_te,
                        lambda m: experts.GroupedExperts.build(m, flags, fp8=True))


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
            return fp8_factory, label.replace("grouped_mm)", "fp8 rowwise grouped_mm, weights quantised once per "
                                                             "change)"), reason
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
    user_skip = _skipped_by_user("lm_head", model.lm_head, opts.skip) if not callable(opts.skip) else (
        "skip callable returned True" if opts.skip("", model) else None)
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


def _plan_sink_attention(module, row, plan) -> None:
    """Attention with learned sinks (GPT-OSS, ...): flex_attention + sink rescale where proven on this device
    against the family's own eager function (ops/sink_attention.py); the implementation name stays."""
    impl = getattr(module.config, "_attn_implementation", None)
    if impl != "eager":
        row.reason = f"model uses {impl!r} attention (chosen by the user); kept"
        return
    why = sink_attention.prove(module, _device(module))
    if why:
        row.reason = f"{sink_attention.NAME} not proven equal to the family's eager attention: {why}"
        return
    window = getattr(module, "sliding_window", None)
    row.replacement = f"{sink_attention.NAME}[{f'window {window}' if window else 'causal'}]"
    row.backend, row.status = "torch", "patched"
    plan.actions.append(Action(row, module, install=sink_attention.install))


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
    if not config.flag(mlp.OPT_IN):
        row.reason = f"opt-in ({mlp.OPT_IN}=1): {mlp.NAME} is proven equal but not measured faster on its own yet"
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


def _plan_attention(model, module, row, backend, fallback_reason, plan) -> None:
    if sink_attention.has_sinks(module):
        _plan_sink_attention(module, row, plan)
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
    # MLA (DeepSeek-V3): q / k / v assembled by one fused kernel each way; opt-in (ops/mla.py: not faster yet)
    if type(module).__name__ in tables().mla and config.flag(mla.OPT_IN):
        why = mla.prove(model, module)
        if why is None:
            row.replacement, fused_mla = f"{row.replacement} + {mla.NAME}{mla.describe(device)}", True
        else:
            fallback_reason = "; ".join(r for r in (fallback_reason, f"{mla.NAME} not proven: {why}") if r)
    rope_label = None
    # SDPA plus Liger's fused RoPE, where it is the family's RoPE (not under the fused MLA forward: it applies the RoPE)
    if backend == "liger" and not fused_mla:
        from .ops import rope  # lazy: only reached with Liger usable on a GPU

        rope_label, why = rope.prove(model, module)
        if rope_label:
            row.replacement, row.backend = f"{row.replacement} + {rope_label}", "liger"
        else:
            fallback_reason = "; ".join(r for r in (fallback_reason, why) if r)
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
    for path, module in model.named_modules():
        if isinstance(module, Replacement) or any(path.startswith(c + ".") for c in claimed):
            continue
        kind = kind_of(module)
        if kind is None:
            continue
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
