"""`moe-patch` as a user runs it: a fresh interpreter per command; a mistake is one line on stderr, exit 2."""
import json
import os
import subprocess
import sys

import pytest
import torch

import moe_patch
from moe_patch.shapes import tiny_config


def cli(*args, cwd=None, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MOE_PATCH", "HF_"))}
    full.update(HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-m", "moe_patch", *args], capture_output=True, text=True, env=full,
                          cwd=cwd, timeout=300)


def one_line_error(out, *fragments):
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """A folder holding a Mixtral config file next to another family's config.json (the issue's case)."""
    folder = tmp_path_factory.mktemp("cfgs")
    tiny_config("mixtral").to_json_file(str(folder / "mixtral.json"))
    tiny_config("olmoe").to_json_file(str(folder / "config.json"))
    return folder


def test_report_reads_that_very_config_file(configs):
    out = cli("report", str(configs / "mixtral.json"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("MixtralForCausalLM (mixtral) from config file") and "Olmoe" not in out.stdout
    inside = cli("report", "config.json", cwd=configs)  # a bare file name inside a model folder
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.startswith("OlmoeForCausalLM (olmoe) from config file config.json")
    folder = cli("report", str(configs), "--disable", "router")
    assert folder.returncode == 0 and folder.stdout.startswith("OlmoeForCausalLM (olmoe) from model folder")
    assert "router=False" in folder.stdout and "GroupedExperts" in folder.stdout


def test_report_follows_the_environment_unless_a_flag_says_otherwise(configs):
    """MOE_PATCH_DISABLE / MOE_PATCH_SKIP / MOE_PATCH_BACKEND shape the report as they shape MOE_PATCH=1: --skip
    replaces its variable, --disable adds kinds as apply()'s flags do; a bad value there is the same one-line
    error."""
    path = str(configs / "mixtral.json")
    env = dict(MOE_PATCH_DISABLE="router", MOE_PATCH_SKIP="model.layers.0.*")
    out = cli("report", path, **env)
    assert out.returncode == 0, out.stderr
    assert "from the environment: MOE_PATCH_DISABLE=router MOE_PATCH_SKIP=model.layers.0.* (" in out.stdout
    # switches count too, MOE_PATCH_COMPILE's included (rows name it: the experts' gate, RMSNorm on a GPU)
    features = cli("report", path, MOE_PATCH_TUNED_GEMM="1", MOE_PATCH_FUSED_MLA="0", MOE_PATCH_COMPILE="0", **env)
    assert "from the environment: MOE_PATCH_DISABLE=router MOE_PATCH_SKIP=model.layers.0.* MOE_PATCH_FUSED_MLA=0 " \
           "MOE_PATCH_TUNED_GEMM=1 MOE_PATCH_COMPILE=0 (" in features.stdout, features.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith("model.layers.")]
    assert all("router=False" in r for r in rows if " router " in r) and any(" router " in r for r in rows)
    assert all("skipped" in r for r in rows if r.startswith("model.layers.0."))
    assert any("patched" in r for r in rows if r.startswith("model.layers.1."))
    flags = cli("report", path, "--disable", "experts", "--skip", "", **env)  # --disable adds, as apply() does
    assert flags.returncode == 0 and "from the environment: MOE_PATCH_DISABLE=router (" in flags.stdout
    assert "router=False" in flags.stdout and "experts=False" in flags.stdout
    assert "matched skip pattern" not in flags.stdout
    one_line_error(cli("report", path, MOE_PATCH_BACKEND="mamba=torch"),  # no backend choice for mamba
                   "MOE_PATCH_BACKEND: in 'mamba=torch', kind 'mamba' has no backend to choose")
    one_line_error(cli("report", path, MOE_PATCH_DISABLE="routr"), "MOE_PATCH_DISABLE: unknown kind 'routr'",
                   "(did you mean 'router'?)")


def test_report_reads_a_hub_config_through_the_huggingface_cache(tmp_path):
    snapshot = tmp_path / "models--someorg--tiny-moe" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    tiny_config("qwen3_moe").to_json_file(str(snapshot / "config.json"))
    (tmp_path / "models--someorg--tiny-moe" / "refs").mkdir()
    (tmp_path / "models--someorg--tiny-moe" / "refs" / "main").write_text("0" * 40)
    out = cli("report", "someorg/tiny-moe", HF_HUB_CACHE=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Qwen3MoeForCausalLM (qwen3_moe) from Hub repository someorg/tiny-moe")
    one_line_error(cli("report", "someorg/not-cached", HF_HUB_CACHE=str(tmp_path)),
                   "someorg/not-cached", "not in the Hugging Face cache", "cannot be reached")


def test_report_previews_a_gpu_from_a_cpu_machine(configs):
    out = cli("report", str(configs / "mixtral.json"), "--device", "cuda", "--with", "te,liger")
    assert out.returncode == 0, out.stderr
    assert "PREVIEW for cuda with liger, te" in out.stdout
    rows = {line.split()[1]: " ".join(line.split()) for line in out.stdout.splitlines()
            if line.startswith("model.layers.0.")}
    assert "GroupedExperts(te permute, te swiglu, grouped_mm) te patched" in rows["experts"]
    assert "TERouter(softmax, fused)" in rows["router"] and "else TopKRouter(softmax)" in rows["router"]
    assert "sdpa[cudnn>flash>efficient>math] + Liger RoPE liger patched" in rows["attention"]
    one_line_error(cli("report", str(configs / "mixtral.json"), "--device", "cuda", "--backend", "te"),
                   "transformer_engine is not installed", "--with te")


@pytest.mark.parametrize("args, fragments", [
    (("report", "mixtrl"), ("unknown model type 'mixtrl' (did you mean 'mixtral'?)", "qwen3_moe", "jetmoe",
                            "nllb-moe", "switch_transformers")),
    (("report", "qwen3_moe", "--disable", "bogus"), ("--disable: unknown kind 'bogus'", "router, loss")),
    (("report", "qwen3_moe", "--disable", "routr"), ("(did you mean 'router'?)",)),
    (("report", "qwen3_moe", "--backend", "loss=tee"), ("unknown backend 'tee' (did you mean 'te'?)",)),
    (("report", "qwen3_moe", "--with", "ligr"), ("unknown package 'ligr' (did you mean 'liger'?)",)),
    (("report", "./missing/config.json"), ("./missing/config.json: no such file or folder",)),
    (("demo", "--model-type", "bogus"), ("invalid choice 'bogus'", "qwen3_moe, qwen2_moe")),
    (("demo", "--model-type", "mixtrl"), ("(did you mean 'mixtral'?)",)),
    (("reprot", "qwen3_moe"), ("invalid choice 'reprot' (did you mean 'report'?)",)),
])
def test_mistakes_are_one_line_exit_2(args, fragments):
    one_line_error(cli(*args), *fragments)


def test_report_names_every_moe_family_the_matrix_checks():
    """The "MoE ones" an unknown model type is answered with are the families tests/matrix.py checks (those with
    decorated experts, found in the modeling files, and those whose configuration declares experts), one model type
    each: not the demo's few tiny shapes."""
    import matrix
    from moe_patch.cli import _moe_types

    listed = _moe_types()
    families = matrix.families()
    assert not [pkg for pkg in families if not set(listed) & set(matrix.catalog.model_types(pkg))]
    assert len(listed) == len(set(listed)) == len(families)


def test_report_bad_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"hidden_size": 8}))
    (tmp_path / "alien.json").write_text(json.dumps({"model_type": "qwen3_moee"}))
    one_line_error(cli("report", str(tmp_path / "bad.json")), "not a readable JSON config")
    one_line_error(cli("report", str(tmp_path / "other.json")), "no 'model_type' field")
    one_line_error(cli("report", str(tmp_path / "alien.json")), "unknown model_type 'qwen3_moee' (did you mean "
                                                                "'qwen3_moe'?)")
    one_line_error(cli("report", str(tmp_path)), "a folder without config.json")


def test_env_and_version():
    out = cli("env", MOE_PATCH_DISABLE="router", MOE_PATCH_DISABLED="x")
    assert out.returncode == 0, out.stderr
    assert f"moe_patch           {moe_patch.__version__}" in out.stdout
    for name in ("start-up hook", "grouped_mm", "transformer_engine", "liger_kernel", "mamba_ssm", "torch",
                 "transformers"):
        assert f"\n{name} " in out.stdout, name
    assert "MOE_PATCH_DISABLE   'router'" in out.stdout
    assert "MOE_PATCH_DISABLED  'x'  <- not a moe_patch variable: ignored (did you mean 'MOE_PATCH_DISABLE'?)" \
        in out.stdout
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"moe_patch {moe_patch.__version__}"
    assert "qwen3_moe" in cli("demo", "--help").stdout


def test_env_says_whether_each_variable_is_accepted():
    """`moe-patch env` reads each MOE_PATCH_* variable set as moe_patch would, says whether it is accepted (a
    refused one with the one-line error the run would stop on) and exits 0 either way."""
    out = cli("env", MOE_PATCH_BACKEND="attention=tourch,", MOE_PATCH_DISABLE="router, ", MOE_PATCH_EP="0",
              MOE_PATCH_QUIET="1", MOE_PATCH_COMPILE="0", MOE_PATCH_SKIP="lm_head", MOE_PATCH_FP8_EXPERTS="maybe",
              MOE_PATCH_TUNED_GEMM="1")
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith("MOE_PATCH")}
    assert rows["MOE_PATCH_BACKEND"].endswith("<- refused: MOE_PATCH_BACKEND: in 'attention=tourch', unknown "
                                              "backend 'tourch' (did you mean 'torch'?); valid for attention: auto, "
                                              "torch, liger (te: no attention kernel, falls back to torch)")
    assert rows["MOE_PATCH_EP"].endswith("<- refused: MOE_PATCH_EP='0': expected a positive integer (the "
                                         "expert-parallel size)")
    assert "<- refused: MOE_PATCH_FP8_EXPERTS='maybe' is not understood" in rows["MOE_PATCH_FP8_EXPERTS"]
    assert rows["MOE_PATCH_DISABLE"].endswith("'router, '  <- accepted")
    assert rows["MOE_PATCH_SKIP"].endswith("<- accepted")
    assert rows["MOE_PATCH_QUIET"].endswith("<- accepted (on)") and rows["MOE_PATCH_COMPILE"].endswith("(off)")
    # accepted, but MOE_PATCH_COMPILE=0 keeps the experts on F.grouped_mm: env says so, not a bare "(on)"
    assert "<- accepted (on); but MOE_PATCH_COMPILE=0 turns it off" in rows["MOE_PATCH_TUNED_GEMM"], out.stdout


def test_env_says_when_an_accepted_value_still_stops_the_run():
    """What env calls accepted is what the run does: a refused variable under MOE_PATCH=1 turns auto-patching off
    (the hook line says so, not only "ran"); a backend this machine cannot run is flagged; set-but-empty
    MOE_PATCH_COMPILE is on (as unset); a non-ASCII digit in MOE_PATCH_EP is refused, not a crash."""
    from moe_patch import auto, backends

    out = cli("env", MOE_PATCH="1", MOE_PATCH_QUIET="2", MOE_PATCH_COMPILE="", MOE_PATCH_EP="\u00b2")
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith("MOE_PATCH")}
    assert "<- refused: MOE_PATCH_EP='\u00b2': expected a positive integer" in rows["MOE_PATCH_EP"], out.stdout
    assert rows["MOE_PATCH_COMPILE"].endswith("<- accepted (on) (any value but 0 / false / no / off is on)")
    hook = next(line for line in out.stdout.splitlines() if line.startswith("start-up hook"))
    if auto.hook_files():  # the hook is installed here (pip install .): it ran, and turned auto-patching off
        assert "ran in this process: auto-patch is OFF: MOE_PATCH_QUIET='2'" in hook, hook
    out = cli("env", MOE_PATCH_BACKEND="attention=te")
    why = backends.unavailable("te", torch.device("cuda"))
    flagged = "but here te: " in out.stdout and "apply() would refuse it" in out.stdout
    assert flagged == (why is not None), out.stdout


def test_demo_trains_on_real_text_and_the_losses_match():
    out = cli("demo", "--steps", "3")
    assert out.returncode == 0, out.stderr
    assert "Python standard library's docstrings" in out.stdout and "Same losses" in out.stdout
    table = [line.split() for line in out.stdout.splitlines() if line.split()[:1] in (["1"], ["3"])]
    assert [row[0] for row in table] == ["1", "3"] and all(row[1] == row[2] for row in table), out.stdout
    assert float(table[1][1]) < float(table[0][1])  # learning: the loss falls
    assert out.stdout.count("attention: 2 patched") == 1  # the summary once


def test_stdlib_text_is_real_text():
    from moe_patch.cli import stdlib_text

    text = stdlib_text()
    assert len(text) > 20_000 and text.count(" the ") > 100


def test_report_names_experts_it_leaves_stock():
    """An MoE block with one module per expert (Switch Transformers) is reported with its reason, not absent."""
    out = cli("report", "switch_transformers")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if " experts " in line and "SparseMLP" in line]
    assert rows and all("skipped" in r and "experts as separate modules" in r for r in rows), out.stdout[-2000:]


# experts in a layout of their own, per family: (the row's module class, a weight the reason names)
OWN_LAYOUT = {"jetmoe": ("JetMoeMoE", "input_linear.weight [8, 192, 64]"),
              "dbrx": ("DbrxExperts", "mlp.w1 [768, 64]"), "longcat_flash": ("LongcatFlashMoE", "experts.gate_up_proj"),
              "doge": ("DogeCDMoE", "down_embed.weight [16, 64]")}


@pytest.mark.parametrize("family", sorted(OWN_LAYOUT))
def test_report_names_experts_of_a_layout_of_their_own(family):
    """An MoE block whose experts are in no layout known here (DBRX, JetMoE, Longcat-Flash, Doge) gets one experts
    row per block, left stock with the reason; nothing inside it is reported twice."""
    import matrix
    from moe_patch.cli import _build_on_meta

    config = matrix.tiny_config(family)
    if family == "doge":  # Doge's default configuration is dense
        config.is_moe, config.num_experts, config.num_experts_per_tok = True, 16, 2
    model = _build_on_meta(config)
    rows = [r for r in moe_patch.plan_report(model) if r.kind == "experts"]
    cls, weight = OWN_LAYOUT[family]
    blocks = [p for p, m in model.named_modules() if type(m).__name__ == cls]
    assert blocks and [r.path for r in rows if r.original == cls] == blocks, rows
    assert all(r.status == "skipped" and weight in r.reason and "the block stays stock" in r.reason
               for r in rows if r.original == cls), rows
    if family == "jetmoe":  # its mixture-of-attention experts too, and never the projections inside either block
        assert {r.original for r in rows} == {"JetMoeMoE", "JetMoeMoA"}, rows


# routers declared in no patches/ file, their weight in a child nn.Linear: (the router class, the weight its row names)
OWN_ROUTER = {"longcat_flash": ("LongcatFlashTopkRouter", "classifier.weight [264, 64]"),
              "jetmoe": ("JetMoeTopKGating", "layer.weight [8, 64]"), "dbrx": ("DbrxRouter", "layer.weight [8, 64]"),
              "hunyuan_v1_moe": ("HunYuanMoEV1Gate", "wg.weight [8, 64]"),
              "switch_transformers": ("SwitchTransformersTop1Router", "classifier.weight [8, 64]"),
              "nllb_moe": ("NllbMoeTop2Router", "classifier.weight [8, 64]")}


@pytest.mark.parametrize("family", sorted(OWN_ROUTER))
def test_report_names_routers_of_a_layout_of_their_own(family):
    """Every router module gets a row: one in no layout known here and in no patches/ file is left stock with the
    reason and its weight (it was absent from the report); a forget gate is no router."""
    import matrix
    from moe_patch.cli import _build_on_meta

    model = _build_on_meta(matrix.tiny_config(family))
    cls, weight = OWN_ROUTER[family]
    routers = [p for p, m in model.named_modules() if type(m).__name__ == cls]
    rows = moe_patch.plan_report(model).where(kind="router")
    assert routers and [r.path for r in rows] == routers, (routers, rows)
    assert all(r.status == "skipped" and r.reason.startswith("left stock: a router in a layout of its own")
               and weight in r.reason for r in rows), rows


def test_a_forget_gate_is_no_router():
    import matrix
    from moe_patch.cli import _build_on_meta

    rows = moe_patch.plan_report(_build_on_meta(matrix.tiny_config("kimi_linear"))).where(kind="router")
    assert rows and {r.original for r in rows} == {"KimiLinearTopkRouter"}, rows  # not KimiLinearForgetGate


def test_report_after_apply_names_experts_of_a_layout_of_their_own():
    """report(model) on an applied model carries those rows (experts and routers), and the experts' and routers'
    weights are the stock objects in the stock modules."""
    import matrix

    model = matrix.build("jetmoe")
    weights = {n: p for n, p in model.named_parameters() if "input_linear" in n or "output_linear" in n
               or "router" in n}
    routers = {p: m for p, m in model.named_modules() if type(m).__name__ == "JetMoeTopKGating"}
    moe_patch.apply(model)
    rows = [r for r in moe_patch.report(model) if r.kind == "experts"]
    assert rows and all(r.status == "skipped" and "layout of their own" in r.reason for r in rows), rows
    rows = moe_patch.report(model).where(kind="router")
    assert [r.path for r in rows] == list(routers) and all(r.status == "skipped" for r in rows), rows
    assert all(model.get_submodule(p) is m for p, m in routers.items())
    assert any("router" in n for n in weights) and all(dict(model.named_parameters())[n] is p
                                                       for n, p in weights.items())


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a preview only where there is no GPU")
def test_gpu_preview_with_mamba_ssm():
    """`--with mamba` previews Nemotron-H's Mamba2 mixers and gated norms as a GPU with mamba-ssm tries them;
    without it (and without mamba-ssm here) the preview says the GPU keeps the family's scan, and why."""
    from moe_patch.backends import capabilities
    from moe_patch.ops import gated_rmsnorm, mamba_ssd

    def rows(*extra):
        out = cli("report", "nemotron_h", "--device", "cuda", *extra)
        assert out.returncode == 0, out.stderr
        return out.stdout, {line.split()[0]: " ".join(line.split()) for line in out.stdout.splitlines()
                            if line.startswith("model.layers.0.mixer")}

    text, with_mamba = rows("--with", "mamba")
    assert "PREVIEW for cuda with mamba" in text
    assert with_mamba["model.layers.0.mixer"].endswith(mamba_ssd.ON_GPU_PREVIEW), with_mamba
    assert with_mamba["model.layers.0.mixer.norm"].endswith(gated_rmsnorm.ON_GPU_PREVIEW), with_mamba
    if not capabilities().mamba_ssm:
        _, bare = rows()
        assert all("mamba-ssm is not installed" in row for row in bare.values()) and len(bare) == 2, bare


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a preview only where there is no GPU")
def test_gpu_preview_of_sink_attention_says_what_the_gpu_does():
    """From a CPU, `--device cuda` previews GPT-OSS's attention as the GPU's apply() would try it (flex_attention
    with the sinks), not with the CPU's reason (no flex backward on CPU)."""
    out = cli("report", "gpt_oss", "--device", "cuda")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if " attention " in line and "GptOssAttention" in line]
    assert rows and all("on a GPU: flex_attention with the learned sinks" in r for r in rows), rows[:2]
    here = cli("report", "gpt_oss")
    assert "flex_attention has no backward on CPU" in here.stdout



@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a preview only where there is no GPU")
def test_gpu_preview_of_sink_attention_names_cudnn_where_the_switch_takes_it(monkeypatch):
    """With MOE_PATCH_CUDNN_SINKS=1 in the shell (the preview counts the environment as apply() does), GPT-OSS's full
    (no window) attention rows name cuDNN's attention, which a GPU's apply() plans for them in bf16 / fp16;
    sliding-window rows keep flex_attention's text, and without the switch every row does."""
    from moe_patch.ops import sink_attention

    monkeypatch.setenv(sink_attention.CUDNN_SWITCH, "1")
    model, rows = _gpu_preview("gpt_oss")
    attn = {p: r for p, r in rows.items() if r.kind == "attention"}
    full = {p for p in attn if not model.get_submodule(p).sliding_window}
    assert full and full != set(attn), attn
    for path, row in attn.items():
        assert ("cuDNN" in row.reason[:80]) == (path in full), row  # early: the table cuts long reasons
    monkeypatch.delenv(sink_attention.CUDNN_SWITCH)
    _, rows = _gpu_preview("gpt_oss")
    assert all(r.reason == sink_attention.ON_GPU_PREVIEW for r in rows.values() if r.kind == "attention"), rows

def _gpu_preview(family, **overrides):
    """{path: row} of `moe-patch report FAMILY --device cuda --with te,liger,mamba`, in this process."""
    from moe_patch.cli import _build_on_meta
    from moe_patch.plan import Options
    from moe_patch.preview import preview

    model = _build_on_meta(tiny_config(family, **overrides))
    rows = moe_patch.plan_report(model)
    return model, {r.path: r for r in preview(model, rows, Options(), "cuda", {"te", "liger", "mamba"})}


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a preview only where there is no GPU")
def test_gpu_preview_claims_no_rope_the_attention_forward_never_calls(monkeypatch):
    """Nemotron-H's attention has no RoPE call, DeepSeek-V3's calls apply_rotary_pos_emb_interleave: rope.prove turns
    Liger's RoPE down for both from the source, and the preview says so (stock SDPA row on torch, a fallback with
    that reason) instead of claiming `+ Liger RoPE`. Qwen3-MoE's keeps the Liger RoPE preview. DeepSeek-V3's fused
    MLA (which applies the family's RoPE itself) is turned off here; by default its row is the fused MLA."""
    from moe_patch.ops import mla, rope

    _, rows = _gpu_preview("deepseek_v3")
    assert all(r.replacement.endswith(f"+ {mla.NAME}") and r.status == "patched" for r in rows.values()
               if r.kind == "attention"), rows
    monkeypatch.setenv(mla.SWITCH, "0")
    for family in ("nemotron_h", "deepseek_v3"):
        model, rows = _gpu_preview(family, **({"rope_interleave": True} if family == "deepseek_v3" else {}))
        attn = [r for r in rows.values() if r.kind == "attention"]
        assert attn, rows
        for row in attn:
            label, why = rope.prove(model, model.get_submodule(row.path))  # the GPU's own answer, before it runs
            assert label is None and why, (family, why)
            assert "Liger RoPE" not in row.replacement and row.replacement.startswith("sdpa["), row
            assert (row.backend, row.status, row.reason) == ("torch", "fallback", why), row
        expected = "calls no apply_rotary_pos_emb" if family == "nemotron_h" else "apply_rotary_pos_emb_interleave"
        assert expected in attn[0].reason, attn[0]
    _, rows = _gpu_preview("qwen3_moe")
    assert any(r.kind == "attention" and r.replacement.endswith("+ Liger RoPE") for r in rows.values()), rows


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a preview only where there is no GPU")
def test_gpu_preview_of_the_fused_mla_row_has_no_rope_backend_reason():
    """`moe-patch report deepseek_v3 --device cuda` without Liger: the fused MLA applies the family's RoPE itself, so
    the row is patched without Liger's unavailability, as apply() on that GPU reports it (it read "fallback:
    liger_kernel is not installed" in the preview only). Qwen3-MoE's row, whose RoPE Liger would run, keeps it."""
    from moe_patch import backends
    from moe_patch.cli import _build_on_meta
    from moe_patch.ops import mla
    from moe_patch.plan import Options
    from moe_patch.preview import capabilities, preview

    if backends.unavailable("liger", torch.device("cuda"), capabilities("cuda", set())) is None:
        pytest.skip("Liger is installed here: no preview without it")
    for family in ("deepseek_v3", "qwen3_moe"):
        model = _build_on_meta(tiny_config(family))
        rows = [r for r in preview(model, moe_patch.plan_report(model), Options(), "cuda", set())
                if r.kind == "attention"]
        assert rows, family
        if family == "deepseek_v3":
            assert all(mla.NAME in r.replacement and r.status == "patched" and "liger" not in r.reason
                       for r in rows), rows
        else:
            assert all(r.status == "fallback" and "liger_kernel is not installed" in r.reason for r in rows), rows


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a preview only where there is no GPU")
def test_gpu_preview_names_the_gate_the_gpu_would_use():
    """TE's SwiGLU only for gated experts whose gate is SwiGLU: none for Nemotron-H's ungated relu^2 experts, the
    compiled family gate for GPT-OSS's clamped one (what plan._propose_experts picks there with TE), TE's SwiGLU for
    Qwen3-MoE's."""
    expected = {"nemotron_h": ("GroupedExperts(te permute, grouped_mm)", ""),
                "gpt_oss": ("GroupedExperts(te permute, compiled gate, grouped_mm)", "is not the family's gate"),
                "qwen3_moe": ("GroupedExperts(te permute, te swiglu, grouped_mm)", "te swiglu where proven")}
    for family, (label, why) in expected.items():
        _, rows = _gpu_preview(family)
        experts = [r for r in rows.values() if r.kind == "experts"]
        assert experts and all(r.replacement == label and r.backend == "te" and r.status == "patched"
                               and why in r.reason for r in experts), (family, experts)
        if family == "nemotron_h":
            assert all("swiglu" not in r.reason for r in experts), experts


def test_report_table_marks_cut_text():
    """A cell cut to its column's width ends in '…' and the table says where the whole text is; the Row keeps it."""
    from moe_patch.plan import Row
    from moe_patch.records import Report

    reason = "because " * 40  # 320 characters: over the reason column's 200
    row = Row("model.layers.0.mlp.experts", "experts", "X" * 70, "", "", "skipped", reason)
    text = str(Report([row]))
    line = next(line for line in text.splitlines() if line.startswith("model.layers.0"))
    assert ("X" * 59 + "…") in line and "X" * 60 not in line
    assert line.endswith("…") and len(line.split("skipped")[-1].strip()) == 200
    assert "… marks text cut to fit" in text and Report([row])[0].reason == reason
    whole = str(Report([Row("a", "loss", "M", "", "", "skipped", "short")]))
    assert "…" not in whole


def test_report_says_why_the_fused_loss_is_not_used_when_its_proof_cannot_run():
    """Doge with is_moe=True: the fused-loss proof cannot run the model's forward; the loss stays stock and the
    reason says so in words before the error."""
    import matrix
    from moe_patch.cli import _build_on_meta

    config = matrix.tiny_config("doge")
    config.is_moe, config.num_experts, config.num_experts_per_tok = True, 16, 2
    (row,) = [r for r in moe_patch.plan_report(_build_on_meta(config)) if r.kind == "loss"]
    assert row.status == "skipped" and not row.replacement, row
    assert row.reason.startswith("fused loss not used: its proof could not run this model's forward"), row.reason
    assert "ValueError" in row.reason and row.reason.endswith("the model's own loss stays"), row.reason
