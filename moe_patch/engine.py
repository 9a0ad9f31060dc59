"""apply / revert / report / is_patched: plan -> choose (plan.py, backends.py) -> swap (swap.py) ->
shard (parallel/) -> record (records.py)."""
from __future__ import annotations

from torch import nn

from . import backends, config, swap
from .errors import MeshError, PatchError, UnsupportedModelError
from .plan import Options, make_plan
from .records import Record, Report

RECORD = "_moe_patch"


def _unwrap_check(model) -> None:
    """Refuse wrappers whose forward would bypass or be broken by in-place module swaps."""
    name = type(model).__name__
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch.nn.Module, got {name}")
    if hasattr(model, "_orig_mod"):
        raise UnsupportedModelError("model is wrapped by torch.compile: patch the model first, then compile it "
                                    "(moe_patch.apply(model); model = torch.compile(model))")
    if name in ("DistributedDataParallel", "DataParallel") or hasattr(model, "module") and name.endswith("DataParallel"):
        raise UnsupportedModelError(f"model is wrapped by {name}: patch model.module before wrapping it")
    if name.startswith("FSDP") or name == "FullyShardedDataParallel" or any(
            type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        dist_cfg = getattr(getattr(model, "config", None), "distributed_config", None)
        if dist_cfg is not None:  # from_pretrained(distributed_config=...) wrapped it: the user cannot patch before
            raise UnsupportedModelError(
                f"model was sharded at load by DistributedConfig(ep_size={getattr(dist_cfg, 'ep_size', None)}, "
                f"fsdp_size={getattr(dist_cfg, 'fsdp_size', None)}): moe_patch takes over such models only with "
                "ep_size > 1; without expert parallelism load the model without distributed_config, apply(), then "
                "shard it (moe_patch.parallel.fully_shard_moe or fully_shard)")
        raise UnsupportedModelError("model is wrapped by FSDP: patch it before fully_shard / FSDP wrapping")
    if type(model).__name__.startswith("Peft") or hasattr(model, "peft_config"):
        raise UnsupportedModelError("model is a PEFT model: patch the base model before get_peft_model(); "
                                    "LoRA on attention projections composes with a patched model")
    hooked = sum(hasattr(m, "_hf_hook") for m in model.modules())
    if hooked:
        raise UnsupportedModelError(
            f"model is dispatched by accelerate (device_map with offload or several devices: hooks on {hooked} "
            "modules, which a module swap would drop): load it on one device (device_map='cuda' or .to(device)) "
            "and use expert parallelism (apply(model, mesh=...)) to spread the experts")
    if getattr(model, "hf_quantizer", None) is not None or getattr(getattr(model, "config", None),
                                                                    "quantization_config", None):
        raise UnsupportedModelError("quantized models are not supported: their weights are not plain tensors")


def _supports_sdpa(model) -> bool:
    return bool(getattr(model, "_supports_sdpa", False))


# apply()'s expert-parallel options (only with a mesh) and their defaults (for the idempotence check)
PARALLEL_DEFAULTS = dict(dispatcher="auto", max_tokens_per_rank=None, shared_overlap=True)
ARGUMENTS = ("mesh", *config.KINDS, "skip", "backend", "fp8", *PARALLEL_DEFAULTS)


def _parallel(mesh, options) -> dict:
    """The expert-parallel options as asked for, defaults filled in (for the idempotence check)."""
    return dict(PARALLEL_DEFAULTS, **options) if mesh is not None else dict(options)


def _check_arguments(given: dict, mesh, parallel_options: dict) -> None:
    """Strict types and known names, before anything else: one line naming the bad value and the valid ones."""
    for kind in config.KINDS:
        value = given[kind]
        if value is not None and not isinstance(value, bool):
            raise PatchError(f"{kind} must be True or False (None: from MOE_PATCH_DISABLE or the default True), "
                             f"got {value!r}")
    skip = given["skip"]
    if not (skip is None or callable(skip) or isinstance(skip, str)
            or isinstance(skip, (list, tuple, set, frozenset)) and all(isinstance(p, str) for p in skip)):
        raise PatchError(f"skip must be a glob, a list of globs or a callable (path, module) -> bool, got {skip!r}")
    for name in parallel_options:
        if name not in PARALLEL_DEFAULTS:
            raise PatchError("apply() got an " + config.unknown("argument", name, ARGUMENTS))
    if mesh is None and parallel_options:
        raise PatchError(f"{', '.join(sorted(parallel_options))}: expert-parallel option(s) that need a mesh "
                         "(apply(model, mesh=...)); without one, leave them out")


def _backend(backend):
    """apply()'s backend argument in its canonical form, through MOE_PATCH_BACKEND's own parser (config.parse_backend):
    "te", "loss=torch,experts=te" or {"loss": "torch"}, in any case; None: not given."""
    return None if backend is None else config.parse_backend(backend, "backend")


def _changes(old: Options, new: Options, record=None, mesh=None, requested=None) -> str:
    """'skip: () -> ('lm_head',); loss: True -> False' (the options that differ); given the model's record, the
    mesh and expert-parallel options too (_same() compares them: a refusal must name the one that differs)."""
    fields = [f for f in ("attention", "rmsnorm", "linear", "experts", "router", "loss", "mamba", "mlp", "skip",
                          "backend", "fp8")
              if getattr(old, f) != getattr(new, f)]
    changes = [f"{f}: {getattr(old, f)!r} -> {getattr(new, f)!r}" for f in fields]
    if record is not None and record.mesh is not mesh:
        if record.mesh is not None and mesh is not None and record.mesh == mesh:
            changes.append("mesh: another DeviceMesh object than the one the model was patched with (pass that one)")
        else:
            changes.append(f"mesh: {record.mesh!r} -> {mesh!r}")
    if record is not None and record.mesh is not None and mesh is not None and record.parallel != requested:
        old_parallel, new_parallel = record.parallel, requested
        changes += [f"{k}: {old_parallel.get(k)!r} -> {new_parallel.get(k)!r}"
                    for k in sorted(set(old_parallel) | set(new_parallel)) if old_parallel.get(k) != new_parallel.get(k)]
    return "; ".join(changes) or "the same options"


def is_patched(model) -> bool:
    return getattr(model, RECORD, None) is not None


def report(model) -> Report:
    record = getattr(model, RECORD, None)
    if record is None:
        raise PatchError("model is not patched by moe_patch (call moe_patch.apply(model) first)")
    return Report(record.rows)


def plan_report(model, **flags) -> Report:
    """What apply() would do, without doing it (used by `moe-patch report`); flags as apply()'s, and like apply()
    a flag left out (or None) is taken from MOE_PATCH_DISABLE / MOE_PATCH_SKIP / MOE_PATCH_BACKEND where set
    there, else its default."""
    for name in flags:
        if name not in (*config.KINDS, "skip", "backend", "fp8"):
            raise PatchError("plan_report() got an " + config.unknown("argument", name, ARGUMENTS[1:-3]))
    _check_arguments({k: flags.get(k) for k in (*config.KINDS, "skip")}, None, {})
    fp8 = flags.pop("fp8", None)
    flags = config.resolve(dict(flags, backend=_backend(flags.get("backend"))))
    skip = (flags["skip"],) if isinstance(flags["skip"], str) else flags["skip"]
    flags["skip"] = skip if callable(skip) else tuple(skip)
    opts = Options(**flags, fp8=fp8)
    backends.check_fp8(opts.fp8, opts.backend, opts.linear)  # what apply() would refuse, refused here too
    return Report(make_plan(model, opts, _supports_sdpa(model)).rows)


def apply(model, mesh=None, *, attention=None, rmsnorm=None, linear=None, experts=None, router=None, loss=None,
          mamba=None, mlp=None, skip=None, backend=None, fp8=None, **parallel_options):
    """Rewrite `model` in place for fast MoE training and return it (the same object).

    Every kind flag defaults to True, skip to (), backend to "auto"; an argument left out (None) is taken
    from the environment (MOE_PATCH_DISABLE / MOE_PATCH_SKIP / MOE_PATCH_BACKEND) when set there.
    backend: "auto" | "torch" | "te" | "liger" for every kind, or per kind as {"loss": "torch"} or in
    MOE_PATCH_BACKEND's form "loss=torch,experts=te" (other kinds auto); names in any case.
    fp8: None, "delayed", "current" or "mxfp8": linear layers run on TransformerEngine under that FP8
    recipe (needs TE and a GPU that supports the recipe; the HF weights stay the master weights). With
    MOE_PATCH_FP8_EXPERTS=1 (opt-in: measured slower than bf16 on an H200), fp8="current" also runs the
    fused-3D experts' forward and input-gradient grouped GEMMs in FP8 e4m3 with rowwise (current) scales, each
    weight quantised once per change (ops/fp8_experts.py; Hopper, widths divisible by 16, no mesh); otherwise
    the experts stay bf16, with the reason in the report.
    With a mesh (a DeviceMesh with an "ep" dimension; call apply on every rank): dispatcher="auto" |
    "all_to_all" | "te_ep" | "deepep", max_tokens_per_rank (te_ep's buffer size) and shared_overlap (default
    True: a block's shared expert runs beside the token dispatch where the family allows it), see README.md.
    On any error the model is left exactly as it was. See README.md for the flags.
    """
    given = dict(attention=attention, rmsnorm=rmsnorm, linear=linear, experts=experts, router=router, loss=loss,
                 mamba=mamba, mlp=mlp, skip=skip, backend=_backend(backend))
    from .parallel import distributed_config

    hf_config = distributed_config.config(model)  # from_pretrained(distributed_config=DistributedConfig(ep_size>1))
    _check_arguments(given, mesh if hf_config is None else hf_config, parallel_options)
    if hf_config is not None:
        existing = getattr(model, RECORD, None)
        if mesh is not None:
            raise MeshError(f"the model was loaded with DistributedConfig(ep_size={hf_config.ep_size}): its mesh "
                            "comes from that config; call apply(model) without mesh=")
        if existing is None:
            return distributed_config.apply(model, hf_config, **given, fp8=fp8, **parallel_options)
        mesh = existing.mesh  # patched already (e.g. by MOE_PATCH=1): the same options are a no-op
    flags = config.resolve(given)
    skip = flags["skip"]
    if isinstance(skip, str):
        skip = (skip,)
    flags["skip"] = skip if callable(skip) else tuple(skip)
    opts = Options(**flags, fp8=fp8)
    backends.check_fp8(fp8, opts.backend, opts.linear)
    requested = _parallel(mesh, parallel_options)
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module) and is_patched(inner):  # torch.compile(patched model)
        record = getattr(inner, RECORD)
        if _same(record, opts, mesh, requested):
            return model  # idempotent: patched with these options, then compiled
        raise PatchError(f"model was compiled after apply() with other options "
                         f"({_changes(record.options, opts, record, mesh, requested)}): "
                         "revert and apply on the model itself, then torch.compile it again")
    existing = getattr(model, RECORD, None)
    if hf_config is not None:
        if _same(existing, opts, mesh, requested):
            return model
        raise PatchError(f"model is already patched with expert parallelism from its DistributedConfig and apply() "
                         f"asks for other options ({_changes(existing.options, opts, existing, mesh, requested)}): "
                         "its experts are sharded")
    _unwrap_check(model)
    if existing is not None:
        if _same(existing, opts, mesh, requested):
            return model  # idempotent
        if not existing.auto:
            advice = ("its experts are sharded (no revert): build the model again" if existing.sharded
                      else "call moe_patch.revert(model) first")
            raise PatchError(f"model is already patched with other options "
                             f"({_changes(existing.options, opts, existing, mesh, requested)}); {advice}")
        return _replan(model, existing, mesh, opts, requested, parallel_options)
    return _apply(model, mesh, opts, requested, parallel_options)


def _same(record, opts, mesh, requested) -> bool:
    return record.options == opts and record.mesh is mesh and record.parallel == requested


def _replan(model, existing, mesh, opts, requested, parallel_options):
    """MOE_PATCH=1 patched `model` at build time and the script calls apply() with other arguments: the
    explicit ones win (README). Revert, apply them, and say what changed; on failure the auto-patch is put back."""
    from . import auto

    if existing.sharded:
        raise PatchError(f"model was patched with expert parallelism by MOE_PATCH=1 and apply() asks for other "
                         f"options ({_changes(existing.options, opts, existing, mesh, requested)}): its experts are "
                         "sharded and cannot be re-planned; set them through the MOE_PATCH_* variables instead")
    before = Report(existing.rows).summary()
    revert(model)
    try:
        _apply(model, mesh, opts, requested, parallel_options)
    except Exception:  # put the auto-patch back: the model is left as it was
        _apply(model, existing.mesh, existing.options, existing.parallel, dict(existing.parallel))
        getattr(model, RECORD).auto = True
        raise
    auto.say(f"moe_patch: apply() re-planned {type(model).__name__} (patched at build time by MOE_PATCH=1), "
             f"explicit arguments win: {_changes(existing.options, opts, existing, mesh, requested)}; "
             f"now {report(model).summary()} (was {before})")
    return model


def _apply(model, mesh, opts, requested, parallel_options):
    from .parallel import shard as shard_mod  # parallel validates the mesh before anything is swapped

    if mesh is not None:
        parallel_options = shard_mod.validate(model, mesh, **parallel_options)
    plan = make_plan(model, opts, _supports_sdpa(model), mesh is not None)  # plan + choose: nothing changed yet
    if mesh is not None:
        shard_mod.check_plan(plan, mesh)
    built = swap.build(model, plan)
    record = Record(options=opts, rows=plan.rows, mesh=mesh, parallel=requested)
    swap.swap(model, plan, built, record)
    # load_state_dict() of a checkpoint as save_pretrained() wrote it (Trainer's resume): resume.py
    from . import resume

    record.hooks.append(resume.install(model))
    if mesh is not None:
        try:
            record.sharded = shard_mod.shard(model, mesh, record, **parallel_options)
        except Exception:
            swap.undo(model, record)
            raise
    setattr(model, RECORD, record)
    return model


def revert(model):
    """Put the original module objects back (with the same Parameter objects) and return the model."""
    record = getattr(model, RECORD, None)
    if record is None:
        raise PatchError("model is not patched by moe_patch: nothing to revert")
    if record.sharded:
        raise PatchError("revert of an expert-parallel model is not supported: its experts are sharded; "
                         "save_pretrained() writes the full checkpoint, reload it to get a stock model")
    swap.undo(model, record)
    delattr(model, RECORD)
    return model
