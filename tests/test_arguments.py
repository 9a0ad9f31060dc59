"""apply()'s arguments: a mistake is one PatchError line naming the bad value and the valid ones, the model
left as it was; a model compiled after apply() is recognised as patched."""
import pytest
import torch

import moe_patch
from util import build


def _modules(model):
    return [(name, type(m)) for name, m in model.named_modules()]


@pytest.mark.parametrize("kwargs, message", [
    (dict(atention=False), "unknown argument 'atention' (did you mean 'attention'?); valid: mesh, attention,"),
    (dict(expert=False), "unknown argument 'expert' (did you mean 'experts'?)"),
    (dict(experts="no"), "experts must be True or False"),
    (dict(loss=0), "loss must be True or False"),
    (dict(skip=3), "skip must be a glob, a list of globs or a callable"),
    (dict(dispatcher="all_to_all"), "dispatcher: expert-parallel option(s) that need a mesh"),
    (dict(backend="tee"), "backend: unknown backend 'tee' (did you mean 'te'?); valid: auto, torch, te, liger"),
    (dict(backend={"routr": "torch"}), "unknown kind 'routr' (did you mean 'router'?)"),
    # the kind, the value and what that kind can take
    (dict(backend={"loss": "trch"}), "backend: in {'loss': 'trch'}, unknown backend 'trch' (did you mean 'torch'?); "
                                     "valid for loss: auto, torch, liger (te: no loss kernel, falls back to torch)"),
    (dict(backend="experts=torch,loss=trch"), "backend: in 'loss=trch', unknown backend 'trch'"),
    (dict(backend=["torch"]), "backend must be a backend name (auto, torch, te, liger), per kind as"),
    (dict(backend="mamba=torch"), "backend: in 'mamba=torch', kind 'mamba' has no backend to choose"),
])
def test_bad_arguments_are_one_line_and_change_nothing(kwargs, message):
    model = build("qwen3_moe")
    before = _modules(model)
    with pytest.raises(moe_patch.PatchError) as info:
        moe_patch.apply(model, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert _modules(model) == before and not moe_patch.is_patched(model)


def test_apply_on_a_model_compiled_after_apply():
    patched = moe_patch.apply(build("qwen3_moe"))
    compiled = torch.compile(patched)  # compiles lazily, at the first call: nothing runs here
    assert moe_patch.apply(compiled) is compiled  # already patched so: nothing to do
    with pytest.raises(moe_patch.PatchError, match=r"compiled after apply\(\) with other options \(router: True -> "
                                                   r"False\)"):
        moe_patch.apply(compiled, router=False)
    with pytest.raises(moe_patch.UnsupportedModelError, match="patch the model first"):
        moe_patch.apply(torch.compile(build("qwen3_moe")))


def test_explicit_apply_twice_with_other_options_names_them():
    model = moe_patch.apply(build("qwen3_moe"))
    with pytest.raises(moe_patch.PatchError, match=r"already patched with other options \(skip: \(\) -> "
                                                   r"\('lm_head',\)\)"):
        moe_patch.apply(model, skip=["lm_head"])


def test_plan_report_checks_its_arguments_like_apply():
    model = build("qwen3_moe")
    with pytest.raises(moe_patch.PatchError, match=r"plan_report\(\) got an unknown argument 'atention' \(did you "
                                                   r"mean 'attention'\?\)"):
        moe_patch.plan_report(model, atention=False)
    with pytest.raises(moe_patch.PatchError, match="router must be True or False"):
        moe_patch.plan_report(model, router="off")
    assert moe_patch.plan_report(model, skip="lm_head").where(kind="loss")[0].reason == "matched skip pattern 'lm_head'"


@pytest.mark.parametrize("pattern", ["[", "model.layer.*"])
def test_a_skip_glob_matching_no_module_warns_once(pattern):
    model = build("qwen3_moe")
    with pytest.warns(UserWarning, match=r"skip pattern .* matches no module of Qwen3MoeForCausalLM") as record:
        moe_patch.apply(model, skip=[pattern, "model.layers.0.*"])
    warned = [w for w in record if "matches no module" in str(w.message)]
    assert len(warned) == 1 and warned[0].filename == __file__  # the matching glob is quiet; the user's line named
    assert moe_patch.report(model).where(path="model.layers.0.mlp.experts")[0].status == "skipped"


def test_an_empty_skip_glob_warns():
    with pytest.warns(UserWarning, match=r"skip pattern '' matches no module"):
        moe_patch.plan_report(build("qwen3_moe"), skip=[""])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_plan_report_refuses_fp8_like_apply_on_cpu():
    model = build("qwen3_moe")
    for call in (moe_patch.plan_report, moe_patch.apply):
        with pytest.raises(moe_patch.BackendUnavailableError, match=r"fp8='current' cannot be used: FP8 needs a CUDA "
                                                                    r"GPU"):
            call(model, fp8="current")
    assert not moe_patch.is_patched(model)


def test_a_distributed_config_model_without_expert_parallelism_is_refused_with_what_to_do():
    """from_pretrained(distributed_config=DistributedConfig(ep_size=1, fsdp_size=2)) wraps the model in FSDP2 (its
    class becomes FSDP<class>): the user cannot 'patch before wrapping', so the message says what to do."""
    from types import SimpleNamespace

    model = build("qwen3_moe")
    model.config.distributed_config = SimpleNamespace(ep_size=1, fsdp_size=2)
    model.__class__ = type("FSDP" + type(model).__name__, (type(model),), {})
    with pytest.raises(moe_patch.UnsupportedModelError, match=r"DistributedConfig\(ep_size=1, fsdp_size=2\): moe_patch "
                                                              r"takes over such models only with ep_size > 1") as info:
        moe_patch.apply(model)
    assert "\n" not in str(info.value) and not moe_patch.is_patched(model)


def test_plan_report_follows_the_environment_like_apply(monkeypatch):
    """plan_report shows what apply() would do in this process: MOE_PATCH_DISABLE / SKIP count for flags left
    out; a flag given overrides its own kind only, as apply()'s do."""
    monkeypatch.setenv("MOE_PATCH_DISABLE", "router")
    monkeypatch.setenv("MOE_PATCH_SKIP", "model.layers.0.*")
    planned = moe_patch.plan_report(build("qwen3_moe"))
    applied = moe_patch.report(moe_patch.apply(build("qwen3_moe")))
    assert [(r.path, r.status, r.reason) for r in planned] == [(r.path, r.status, r.reason) for r in applied]
    assert all(r.reason == "router=False" for r in planned.where(kind="router"))
    assert all(r.status == "skipped" for r in planned if r.path.startswith("model.layers.0."))
    mixed = moe_patch.plan_report(build("qwen3_moe"), router=True, experts=False)
    assert all(r.status == "patched" for r in mixed.where(kind="router") if not r.path.startswith("model.layers.0."))
    reasons = {r.reason for r in mixed.where(kind="experts")}
    assert reasons == {"experts=False"}, reasons  # the kind flag is checked before the skip globs


@pytest.mark.parametrize("variable, value, expected", [
    ("MOE_PATCH_BACKEND", "attention=torch,", {"backend": {"attention": "torch"}}),
    ("MOE_PATCH_BACKEND", " loss=torch, ,router=torch ", {"backend": {"loss": "torch", "router": "torch"}}),
    ("MOE_PATCH_BACKEND", "torch, ", {"backend": "torch"}),
    ("MOE_PATCH_BACKEND", " , ", {}),
    ("MOE_PATCH_DISABLE", "router, ", {"router": False}),
    ("MOE_PATCH_SKIP", "lm_head, ,", {"skip": ("lm_head",)}),
])
def test_environment_lists_ignore_empty_items(monkeypatch, variable, value, expected):
    """A trailing comma or a blank item in MOE_PATCH_BACKEND / DISABLE / SKIP is no item."""
    from moe_patch import config

    monkeypatch.setenv(variable, value)
    assert config.from_environment() == expected


@pytest.mark.parametrize("variable, value, expected", [
    ("MOE_PATCH_DISABLE", "Loss,ROUTER", {"loss": False, "router": False}),
    ("MOE_PATCH_BACKEND", "loss=Torch,Experts=TE", {"backend": {"loss": "torch", "experts": "te"}}),
    ("MOE_PATCH_BACKEND", "Torch", {"backend": "torch"}),
])
def test_environment_names_are_read_in_any_case(monkeypatch, variable, value, expected):
    """Kinds and backends are lower-case names: any other case of one is that name."""
    from moe_patch import config

    monkeypatch.setenv(variable, value)
    assert config.from_environment() == expected


def test_backend_argument_takes_the_environment_form_and_any_case(monkeypatch):
    """apply(backend=...) takes MOE_PATCH_BACKEND's string form and names in any case, read by the same parser: the
    same options, so the same plan, as the dict or the variable give."""
    monkeypatch.delenv("MOE_PATCH_BACKEND", raising=False)
    want = {"loss": "torch", "router": "torch"}
    for backend in ("loss=torch,router=torch", {"Loss": "Torch", "router": "TORCH"}, " LOSS=torch, router=torch, "):
        model = moe_patch.apply(build("qwen3_moe"), backend=backend)
        assert model._moe_patch.options.backend == want, backend
        planned = moe_patch.plan_report(build("qwen3_moe"), backend=backend)
        assert [(r.path, r.backend, r.status) for r in planned] == \
            [(r.path, r.backend, r.status) for r in moe_patch.report(model)]
    assert moe_patch.apply(build("qwen3_moe"), backend="Torch")._moe_patch.options.backend == "torch"
    monkeypatch.setenv("MOE_PATCH_BACKEND", "loss=torch,router=torch")
    assert moe_patch.apply(build("qwen3_moe"))._moe_patch.options.backend == want
    with pytest.raises(moe_patch.PatchError, match=r"kind 'loss' given two backends \('torch' and 'te'\)"):
        moe_patch.apply(build("qwen3_moe"), backend={"loss": "torch", "Loss": "te"})


@pytest.mark.parametrize("variable, value, message", [
    ("MOE_PATCH_BACKEND", "attention=torch,loss=tee", "MOE_PATCH_BACKEND: in 'loss=tee', unknown backend 'tee'"),
    ("MOE_PATCH_BACKEND", "torch,te", "MOE_PATCH_BACKEND: unknown backend 'torch,te'"),
    ("MOE_PATCH_BACKEND", "attention=", "MOE_PATCH_BACKEND: in 'attention=', unknown backend ''"),
    ("MOE_PATCH_DISABLE", "router, routr,", "MOE_PATCH_DISABLE: unknown kind 'routr' (did you mean 'router'?)"),
])
def test_environment_bad_items_are_still_one_line_errors(monkeypatch, variable, value, message):
    from moe_patch import config

    monkeypatch.setenv(variable, value)
    with pytest.raises(moe_patch.PatchError) as caught:
        config.from_environment()
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value), caught.value


@pytest.mark.parametrize("variable", ["MOE_PATCH_FUSED_MLA", "MOE_PATCH_FUSED_MLP", "MOE_PATCH_FP8_EXPERTS"])
def test_a_bad_feature_flag_is_refused_for_every_family(monkeypatch, variable):
    """Yes/no variables read deep in the plan for some families only (the fused MLA: DeepSeek-V3) are refused by
    apply() for any model, as MOE_PATCH_BACKEND is, not accepted silently where no family reads them."""
    monkeypatch.setenv(variable, "junk")
    model = build("qwen3_moe")
    before = _modules(model)
    with pytest.raises(moe_patch.PatchError) as info:
        moe_patch.apply(model)
    assert str(info.value).startswith(f"{variable}='junk' is not understood") and "\n" not in str(info.value)
    assert _modules(model) == before and not moe_patch.is_patched(model)


def test_explicit_argument_wins_over_a_bad_variable(monkeypatch):
    """Explicit apply() arguments take precedence over the environment: a bad MOE_PATCH_BACKEND does not stop
    apply(backend=...), while a call that leaves the backend to it still gets the one-line error."""
    monkeypatch.setenv("MOE_PATCH_BACKEND", "trch")
    model = moe_patch.apply(build("qwen3_moe"), backend="torch")
    assert moe_patch.report(model).where(kind="experts")[0].status == "patched"
    with pytest.raises(moe_patch.PatchError, match="MOE_PATCH_BACKEND: unknown backend 'trch'"):
        moe_patch.apply(build("qwen3_moe"))


def test_misused_arguments_are_one_line_errors_and_leave_the_model(monkeypatch):
    """A skip callable of the wrong signature, a mesh that is not a DeviceMesh and a kind given two backends in
    MOE_PATCH_BACKEND: each a one-line PatchError naming it, the model as it was."""
    model = build("qwen3_moe")
    before = [(n, type(m)) for n, m in model.named_modules()]
    for kwargs, fragment in ((dict(skip=lambda path: False), "skip callable failed on"),
                             (dict(mesh="ep"), "mesh must be a torch.distributed DeviceMesh")):
        with pytest.raises(moe_patch.PatchError) as caught:
            moe_patch.apply(model, **kwargs)
        assert fragment in str(caught.value) and "\n" not in str(caught.value), caught.value
        assert [(n, type(m)) for n, m in model.named_modules()] == before
    monkeypatch.setenv("MOE_PATCH_BACKEND", "loss=torch,loss=te")
    with pytest.raises(moe_patch.PatchError, match="kind 'loss' given two backends"):
        moe_patch.apply(model)
    monkeypatch.setenv("MOE_PATCH_BACKEND", "loss=torch,loss=torch")  # the same twice: no conflict
    moe_patch.apply(model)
