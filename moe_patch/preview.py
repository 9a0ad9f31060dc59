"""What apply() would choose on another machine (`moe-patch report --device cuda --with te,liger`).

A plan made here proves every torch path on this machine's CPU (plan.py). The GPU kernels (TE's fused router,
TE's fused SwiGLU, Liger's RoPE and cross-entropy step) are proven on the GPU by apply() itself and cannot be
run here, so this module only re-does the *choice* of backend per row (backends.choose with that machine's
capabilities) and names what the GPU would try, "where proven on the GPU": a preview, not a proof. Rows skipped
for a structural reason (a gated norm, a family on eager attention, a skip pattern) are skipped there too.
"""
from __future__ import annotations

import copy
import dataclasses
import re

import torch

from . import backends
from .ops import attention, compiled, mamba_ssd, mla
from .plan import Options, Row

PACKAGES = {"te": "te", "liger": "liger"}  # --with NAME -> the Capabilities field it turns on


def _proven_there(what: str, otherwise: str) -> str:
    return f"preview: {what} where proven on the GPU at apply(), else {otherwise}"


def capabilities(device: str, with_: set) -> backends.Capabilities:
    """This machine's capabilities with `device` and the packages in `with_` assumed present."""
    here = backends.capabilities()
    cuda = device == "cuda"
    return dataclasses.replace(
        here, cuda=cuda, device_name=here.device_name if here.cuda == cuda else ("a CUDA GPU" if cuda else "cpu"),
        compute_capability=here.compute_capability if here.cuda and cuda else None,
        te=here.te or "te" in with_, liger=here.liger or "liger" in with_)


def _variant(replacement: str) -> str:
    match = re.search(r"\((\w+)", replacement)
    return match.group(1) if match else "?"


def _label(row: Row, backend: str, target: torch.device, caps) -> tuple[str, str]:
    """(replacement, what the GPU proves first) of a row the plan here patches, on the target machine."""
    gpu = target.type == "cuda"
    if row.kind == "attention":
        label = attention.describe(target)  # the kernel priority the module's hooks set there
        if mla.NAME in row.replacement:  # proven here on the eager reference; a GPU proves its compiled kernels
            compiled_there = gpu and compiled.enabled()
            return f"{label} + {mla.NAME}{mla.describe(target)}", \
                _proven_there(f"the compiled {mla.NAME}", "the family's forward") if compiled_there else ""
        if backend == "liger":
            return f"{label} + Liger RoPE", _proven_there("Liger RoPE", "the family's RoPE")
        return label, ""
    if row.kind == "rmsnorm":
        variant = _variant(row.replacement)
        if backend == "torch":
            return f"TorchRMSNorm({variant}{', compiled' if gpu and compiled.enabled() else ''})", ""
        return {"liger": "LigerRMSNorm", "te": "TERMSNorm"}[backend] + f"({variant})", ""
    if row.kind == "experts" and backend == "te":
        return "GroupedExperts(te permute, te swiglu, grouped_mm)", _proven_there("te swiglu", "the family's gate")
    if row.kind == "router" and backend == "te":
        return f"TERouter({_variant(row.replacement)}, fused)", _proven_there("TE's fused router", row.replacement)
    if row.kind == "loss":
        if backend == "liger":
            return "FusedLinearCrossEntropy(liger)", ""
        if gpu and caps.liger:
            return "FusedLinearCrossEntropy(torch, chunked, liger CE kernel)", \
                _proven_there("liger CE kernel", "compiled")
    return row.replacement, ""


def preview(rows, opts: Options, device: str, with_: set) -> list[Row]:
    """The plan's rows as the target machine would choose them (see the module docstring). Raises
    BackendUnavailableError, as apply() would there, for a backend asked for by name that cannot run there."""
    caps = capabilities(device, with_)
    target = torch.device(device)
    out = []
    for row in rows:
        row = copy.copy(row)
        out.append(row)
        if row.kind == "mamba" and target.type == "cuda" and row.reason == mamba_ssd.NOT_ON_CPU:
            row.reason = mamba_ssd.ON_GPU_PREVIEW  # planned here on a CPU: the GPU's own apply() decides
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
        row.replacement, extra = _label(row, backend, target, caps)
        row.backend = backend
        row.status = "fallback" if fallback else "patched"
        row.reason = "; ".join(r for r in (fallback, extra) if r)
    return out


def header(device: str, with_: set) -> str:
    here = backends.capabilities()
    have = [name for name, ok in (("te", here.te), ("liger", here.liger)) if ok]
    there = sorted(set(have) | set(with_))
    return (f"PREVIEW for {device}{' with ' + ', '.join(there) if there else ''} (this machine: "
            f"{'cuda' if here.cuda else 'cpu'}{', ' + ', '.join(have) if have else ''}): the choice of backend a GPU "
            "would make. Torch paths are proven here; GPU kernels are proven by apply() on the GPU itself, and "
            "where such a proof fails there the module keeps the path named in the reason (report(model) says).")
