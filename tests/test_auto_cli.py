"""Zero-code activation and the command line, each in a fresh interpreter as a user would run them."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

SCRIPT = """
from transformers import AutoModelForCausalLM, Qwen3MoeForCausalLM
from moe_patch.shapes import tiny_config
a = AutoModelForCausalLM.from_config(tiny_config('qwen3_moe'))
b = Qwen3MoeForCausalLM(tiny_config('qwen3_moe'))
for m in (a, b):
    l0, l1 = m.model.layers
    print(type(l0.mlp.experts).__name__.split("[")[0], type(l1.mlp.experts).__name__, type(l0.mlp.gate).__name__,
          hasattr(m, '_moe_patch'), hasattr(m.model, '_moe_patch'))
"""


def _run(code, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("MOE_PATCH")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


def test_pth_bootstrap_is_installed():
    pth = Path(sysconfig.get_paths()["purelib"]) / "moe_patch_auto.pth"
    assert pth.exists(), "install the package (pip install .) so that its start-up hook is in site-packages"


def test_env_auto_patch_without_import():
    out = _run(SCRIPT, MOE_PATCH="1", MOE_PATCH_DISABLE="router", MOE_PATCH_SKIP="model.layers.1.*")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    # outermost model patched once (not its inner model), layer 1 skipped, routers disabled
    assert lines[0] == lines[1] == "GroupedExperts Qwen3MoeExperts Qwen3MoeTopKRouter True False"
    # said once per patched model, on stderr, with what was done
    said = [line for line in out.stderr.splitlines() if line.startswith("moe_patch: patched")]
    assert len(said) == 2 and all("Qwen3MoeForCausalLM" in line and "router: 2 skipped" in line for line in said)
    quiet = _run(SCRIPT, MOE_PATCH="1", MOE_PATCH_QUIET="1")
    assert quiet.returncode == 0 and "moe_patch" not in quiet.stderr, quiet.stderr
    assert quiet.stdout.split("\n")[0].split()[3:] == ["True", "False"]


PTH_TWICE = """
import sys, sysconfig, os
pth = os.path.join(sysconfig.get_paths()["purelib"], "moe_patch_auto.pth")
for line in open(pth):
    exec(line)  # what site.py does with each line, a second time in this process
print("host ran")
"""


def test_hook_runs_once_per_process_and_a_bad_variable_warns_once():
    out = _run(PTH_TWICE, MOE_PATCH="1", MOE_PATCH_DISABLE="routr")
    assert out.returncode == 0 and out.stdout.strip() == "host ran"
    warnings = [line for line in out.stderr.splitlines() if "MOE_PATCH_DISABLE" in line]
    assert warnings == ["moe_patch: auto-patch is off: MOE_PATCH_DISABLE: unknown kind 'routr' (did you mean "
                        "'router'?); valid: attention, rmsnorm, linear, experts, router, loss, mamba, mlp"], out.stderr
    out = _run(PTH_TWICE, MOE_PATCH="maybe")
    assert out.returncode == 0 and out.stderr.count("MOE_PATCH='maybe' is not understood") == 1, out.stderr
    out = _run(PTH_TWICE, MOE_PATCH="1", MOE_PATCH_DISABLED="router")  # a mistyped variable name
    assert out.stderr.count("did you mean 'MOE_PATCH_DISABLE'?") == 1, out.stderr


REPLAN = """
import moe_patch
from transformers import AutoModelForCausalLM
from moe_patch.shapes import tiny_config
model = AutoModelForCausalLM.from_config(tiny_config('qwen3_moe'))   # patched by MOE_PATCH=1
rows = [(r.path, r.kind, r.status) for r in moe_patch.report(model)]
assert moe_patch.apply(model) is model                                 # the same options: nothing to do
moe_patch.apply(model, skip=["lm_head"], router=False)                  # explicit arguments win
after = [(r.path, r.kind, r.status, r.reason) for r in moe_patch.report(model)]
plain = AutoModelForCausalLM.from_config(tiny_config('qwen3_moe'))
moe_patch.revert(plain)
moe_patch.apply(plain, skip=["lm_head"], router=False)
print(after == [(r.path, r.kind, r.status, r.reason) for r in moe_patch.report(plain)])
print(sorted({(k, s) for _, k, s, _ in after if k in ("loss", "router")}))
"""


def test_auto_patch_then_explicit_apply_replans_with_the_explicit_arguments():
    out = _run(REPLAN, MOE_PATCH="1", MOE_PATCH_QUIET="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["True", "[('loss', 'skipped'), ('router', 'skipped')]"]
    said = [line for line in out.stderr.splitlines() if "re-planned" in line]
    assert len(said) == 1 and "skip: () -> ('lm_head',)" in said[0] and "router: True -> False" in said[0], \
        out.stderr


SUSPENDED = """
import moe_patch.auto
from transformers import AutoModelForCausalLM
from moe_patch.shapes import tiny_config
with moe_patch.auto.suspended():  # one rank alone, e.g. to check a saved checkpoint: stock, not sharded
    model = AutoModelForCausalLM.from_config(tiny_config('qwen3_moe'))
print(hasattr(model, '_moe_patch'), flush=True)
AutoModelForCausalLM.from_config(tiny_config('qwen3_moe'))  # outside it, EP 2 in a world of 1 stops the script
print('not reached')
"""


def test_a_model_built_on_one_rank_alone_under_moe_patch_ep_is_left_stock_inside_suspended():
    """README, MOE_PATCH_EP: a model built inside moe_patch.auto.suspended() is neither patched nor sharded; the same
    build outside it shards, here alone, and stops the script with the one-line MeshError."""
    out = _run(SUSPENDED, MOE_PATCH="1", MOE_PATCH_EP="2", WORLD_SIZE="1")
    assert out.stdout.splitlines() == ["False"], (out.stdout, out.stderr)
    assert out.returncode == 2 and "MOE_PATCH_EP" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_without_env_nothing_happens():
    out = _run(SCRIPT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "Qwen3MoeExperts Qwen3MoeExperts Qwen3MoeTopKRouter False False"


def test_bad_env_value_never_breaks_the_host():
    out = _run(SCRIPT, MOE_PATCH="1", MOE_PATCH_BACKEND="cuda-magic")
    assert out.returncode == 0
    assert "MOE_PATCH_BACKEND" in out.stderr


def test_from_pretrained_with_loading_info(tmp_path):
    code = f"""
from transformers import AutoModelForCausalLM
from moe_patch.shapes import tiny_config
AutoModelForCausalLM.from_config(tiny_config('mixtral')).save_pretrained({str(tmp_path)!r})
import moe_patch
m, info = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, output_loading_info=True)
print(moe_patch.is_patched(m), sorted(info))
"""
    out = _run(code, MOE_PATCH="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("True ")


def test_explicit_arguments_beat_environment(monkeypatch):
    import moe_patch
    from util import build

    monkeypatch.setenv("MOE_PATCH_DISABLE", "router,experts")
    model = build("qwen3_moe")
    moe_patch.apply(model, experts=True)
    rep = moe_patch.report(model)
    assert rep.where(kind="router")[0].reason == "router=False"
    assert rep.where(kind="experts")[0].status in ("patched", "fallback")
    monkeypatch.setenv("MOE_PATCH_DISABLE", "routers")
    with pytest.raises(moe_patch.PatchError, match="MOE_PATCH_DISABLE"):
        moe_patch.apply(build("qwen3_moe"))


def test_startup_cost_without_env_is_negligible():
    """The .pth line with MOE_PATCH unset must not import moe_patch, torch or wrapt."""
    out = _run("import sys; print(sorted(m for m in ('moe_patch', 'torch', 'wrapt') if m in sys.modules))")
    assert out.stdout.strip() == "[]"


def test_instrument_and_uninstrument_in_process():
    from transformers import AutoModelForCausalLM

    import moe_patch
    from moe_patch import auto
    from moe_patch.shapes import tiny_config

    auto.instrument()
    try:
        patched = AutoModelForCausalLM.from_config(tiny_config("olmoe"))
        assert moe_patch.is_patched(patched)
    finally:
        auto.uninstrument()
    plain = AutoModelForCausalLM.from_config(tiny_config("olmoe"))
    assert not moe_patch.is_patched(plain)


def test_env_says_how_to_get_a_missing_hook(monkeypatch):
    from moe_patch import auto

    monkeypatch.setattr(auto, "hook_files", lambda: [])
    state = auto.hook_state()
    assert state.startswith("NOT installed: MOE_PATCH=1 does nothing in this environment") and "cp " in state
    source = state.split("cp ")[1].split()[0]
    assert Path(source).is_file() and Path(source).name == "moe_patch_auto.pth"
