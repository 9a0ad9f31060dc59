"""What apply() would choose on another machine (`moe-patch report --device cuda --with te,liger,mamba`).

A plan made here proves every torch path on this machine's CPU (plan.py). The GPU kernels (TE's fused router,
TE's fused SwiGLU, Liger's RoPE and cross-entropy step, mamba-ssm's SSD scan and gated norm) are proven on the GPU
by apply() itself and cannot be run here, so this module only re-does the *choice* of backend per row
(backends.choose with that machine's capabilities: this machine's packages plus those named by --with) and names
what the GPU would try, "where proven on the GPU": a preview, not a proof. Rows skipped for a structural reason
(a gated norm, a family on eager attention, a skip pattern) are skipped there too. What can be told without a GPU
is told here as apply() would: Liger's RoPE only where the attention forward's source allows it (the check
rope.prove makes first), TE's SwiGLU only for gated experts whose gate is SwiGLU (else the compiled family gate).
"""
from __future__ import annotations

import copy
import dataclasses
import re

import torch

from . import backends, plan
from .ops import attention, compiled, compiled_gate, gated_rmsnorm, mamba_ssd, mla, mlp, rope, sink_attention, \
    te_gate
from .plan import Options, Row

PACKAGES = {"te": "te", "liger": "liger", "mamba": "mamba_ssm"}  # --with NAME -> the Capabilities field it turns on


def _proven_there(what: str, otherwise: str) -> str:
    return f"preview: {what} where proven on the GPU at apply(), else {otherwise}"


def capabilities(device: str, with_: set) -> backends.Capabilities:
    """This machine's capabilities with `device` and the packages in `with_` assumed present."""
    here = backends.capabilities()
    cuda = device == "cuda"
    return dataclasses.replace(
        here, cuda=cuda, device_name=here.device_name if here.cuda == cuda else ("a CUDA GPU" if cuda else "cpu"),
        compute_capability=here.compute_capability if here.cuda and cuda else None,
        **{field: getattr(here, field) or name in with_ for name, field in PACKAGES.items()})


def _variant(replacement: str) -> str:
    match = re.search(r"\((\w+)", replacement)
    return match.group(1) if match else "?"


def _label(row: Row, module, backend: str, target: torch.device, caps) -> tuple[str, str, str, str]:
    """(replacement, backend, why the preferred kernel is not used, what the GPU proves first) of a row the plan
    here patches, on the target machine. `module` is the row's module (on the meta device: read, never run on a
    GPU path). A non-empty third item makes the row a fallback, as at apply()."""
    gpu = target.type == "cuda"
    if row.kind == "attention":
        label = attention.describe(target)  # the kernel priority the module's hooks set there
        if f"+ {mla.NAME}" in row.replacement:  # proven here on the eager reference; a GPU proves its compiled kernels
            compiled_there = gpu and compiled.enabled()
            return f"{label} + {mla.NAME}{mla.describe(target)}", "torch", "", \
                _proven_there(f"the compiled {mla.NAME}", "the family's forward") if compiled_there else ""
        if backend == "liger":
            why = rope.why_not_by_source(module)  # the check rope.prove makes first, before anything runs
            if why:  # apply() keeps the SDPA row on torch and says why, as here
                return label, "torch", why, ""
            return f"{label} + Liger RoPE", backend, "", _proven_there("Liger RoPE", "the family's RoPE")
        return label, backend, "", ""
    if row.kind == "rmsnorm":
        variant = _variant(row.replacement)
        if backend == "torch":
            return f"TorchRMSNorm({variant}{', compiled' if gpu and compiled.enabled() else ''})", backend, "", ""
        return {"liger": "LigerRMSNorm", "te": "TERMSNorm"}[backend] + f"({variant})", backend, "", ""
    if row.kind == "experts":
        return _experts_label(row, module, backend, gpu)
    if row.kind == "router" and backend == "te":
        return f"TERouter({_variant(row.replacement)}, fused)", backend, "", _proven_there(
            "TE's fused router", row.replacement)
    if row.kind == "loss":
        if backend == "liger":
            return "FusedLinearCrossEntropy(liger)", backend, "", ""
        if gpu and caps.liger:
            return "FusedLinearCrossEntropy(torch, chunked, liger CE kernel)", backend, "", \
                _proven_there("liger CE kernel", "compiled")
    return row.replacement, backend, "", ""


def _experts_label(row: Row, module, backend: str, gpu: bool) -> tuple[str, str, str, str]:
    """_gated_experts_label, with the grouped GEMMs autotuned on a GPU where MOE_PATCH_TUNED_GEMM=1 (plan.py)."""
    label, backend, why, note = _gated_experts_label(row, module, backend, gpu)
    from .ops import tuned_gemm

    if gpu and tuned_gemm.enabled() and label.startswith("GroupedExperts(") and "grouped_mm autotuned" not in label \
            and "fp8" not in label:
        label = label.replace("grouped_mm", "grouped_mm autotuned", 1)
    return label, backend, why, note


def _gated_experts_label(row: Row, module, backend: str, gpu: bool) -> tuple[str, str, str, str]:
    """_label of an experts row, with the gate plan._propose_experts tries on a GPU: none for experts without a gate
    (Nemotron-H's relu^2); with TE, TE's SwiGLU where the family's gate is SwiGLU (told here from TE's documented
    formula, te_gate.not_swiglu_on_cpu), else the family's own gate compiled (GPT-OSS), as on the torch path."""
    flags = plan.experts_flags(module) or {}
    te = "te permute, " if backend == "te" else ""
    if not (gpu and flags.get("has_gate")):
        return (f"GroupedExperts({te}grouped_mm)" if te else row.replacement), backend, "", ""
    not_swiglu = ""
    if te:
        not_swiglu = te_gate.not_swiglu_on_cpu(module, plan._gate_width(module, flags)) or ""
        if not not_swiglu:
            return f"GroupedExperts({te}te swiglu, grouped_mm)", backend, "", _proven_there(
                "te swiglu", f"the family's gate ({compiled_gate.NAME} where proven)")
    if not compiled.enabled():  # compiled_gate(): nothing compiled, the family's gate runs eagerly
        why = "; ".join(r for r in (not_swiglu, "MOE_PATCH_COMPILE=0: the family's gate runs eagerly") if r)
        return f"GroupedExperts({te}grouped_mm)", backend, why, ""
    return f"GroupedExperts({te}{compiled_gate.NAME}, grouped_mm)", backend, "", "; ".join(
        r for r in (not_swiglu, _proven_there(compiled_gate.NAME, "the family's gate run eagerly")) if r)


def preview(model, rows, opts: Options, device: str, with_: set) -> list[Row]:
    """The plan's rows of `model` (as plan_report gives them; the model may be on the meta device) as the target
    machine would choose them (see the module docstring). Raises
    BackendUnavailableError, as apply() would there, for a backend asked for by name that cannot run there."""
    caps = capabilities(device, with_)
    target = torch.device(device)
    out = []
    for row in rows:
        row = copy.copy(row)
        out.append(row)
        if row.kind == "mamba" and target.type == "cuda" and row.reason == mamba_ssd.NOT_ON_CPU:
            # planned here on a CPU: the GPU's own apply() decides, where it has mamba-ssm (--with mamba)
            row.reason = mamba_ssd.ON_GPU_PREVIEW if caps.mamba_ssm else mamba_ssd.load_kernel()[1]
            continue
        if row.kind == "attention" and target.type == "cuda" and row.reason.endswith(sink_attention.NOT_ON_CPU):
            # planned on a CPU: the GPU's own apply() proves it
            row.reason = sink_attention.preview_reason(model.get_submodule(row.path))
            continue
        if row.kind == "rmsnorm" and row.reason == gated_rmsnorm.NOT_ON_CPU:
            if target.type == "cuda":  # likewise
                row.reason = gated_rmsnorm.ON_GPU_PREVIEW if caps.mamba_ssm else gated_rmsnorm.load_kernel()[1]
            continue
        if row.kind == "rmsnorm" and row.backend == "mamba_ssm":  # proven on this machine's GPU
            if target.type != "cuda":
                row.replacement, row.backend, row.status, row.reason = "", "", "skipped", gated_rmsnorm.NOT_ON_CPU
            continue
        if row.kind == "mlp":  # no backend choice (plan._plan_mlp): the compiled product on a GPU, where proven
            if row.status == "patched" and target.type == "cuda" and compiled.enabled():
                row.replacement = mlp.NAME
                row.reason = _proven_there(f"the compiled {mlp.NAME}", f"the family's {row.original}")
            elif row.status == "patched":
                row.replacement, row.reason = f"{mlp.NAME} (eager: no compiler on this device)", ""
            continue
        if row.status == "skipped" and row.kind != "linear" or row.reason.endswith("=False") or \
                row.reason.startswith("matched skip pattern") or row.reason.startswith("skip callable"):
            continue  # structural reasons and the user's own switches hold on any machine
        backend, fallback = backends.choose(backends.for_kind(opts.backend, row.kind), row.kind, target, caps)
        if row.kind == "linear":  # plan.py: nn.Linear is kept unless TE is asked for (or fp8, not offered here)
            if backend == "te" and backends.for_kind(opts.backend, "linear") == "te":
                row.replacement, row.backend, row.status, row.reason = "TELinear(bf16)", "te", "patched", ""
            elif backend == "te":
                row.reason = ("auto keeps nn.Linear in bf16 (TE's bf16 Linear measured slower); "
                              "TE runs linear under fp8=")
            continue
        if row.kind == "attention" and f"+ {mla.NAME}" in row.replacement:  # as apply() reports it there
            fallback = plan.without_rope_kernel_reason(fallback, target, caps) or ""
        row.replacement, row.backend, why, extra = _label(row, model.get_submodule(row.path), backend, target, caps)
        row.status = "fallback" if fallback or why else "patched"
        row.reason = "; ".join(r for r in (fallback, why, extra) if r)
    return out


def header(device: str, with_: set) -> str:
    here = backends.capabilities()
    have = [name for name, field in PACKAGES.items() if getattr(here, field)]
    there = sorted(set(have) | set(with_))
    return (f"PREVIEW for {device}{' with ' + ', '.join(there) if there else ''} (this machine: "
            f"{'cuda' if here.cuda else 'cpu'}{', ' + ', '.join(have) if have else ''}): the choice of backend a GPU "
            "would make. Torch paths are proven here; GPU kernels are proven by apply() on the GPU itself, and "
            "where such a proof fails there the module keeps the path named in the reason (report(model) says).")
