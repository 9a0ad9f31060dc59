"""Expert parallelism from the launcher with an unmodified Trainer script (tests/trainer_script.py), against the
stock single-process run on the concatenated batch: losses and gradient norms step for step (Trainer's own
max_grad_norm clipping active), Trainer's own checkpoints, and resume_from_checkpoint continuing exactly."""
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

HERE = os.path.dirname(__file__)
SCRIPT = os.path.join(HERE, "trainer_script.py")
MAX_GRAD_NORM = 0.5  # trainer_script.py's


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_PATCH")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


# A gloo process that has finished its work (history and final model written) aborts now and then at interpreter
# exit with this C++ message (a std::thread left joinable: 1 of 52 accelerate launches under MOE_PATCH_EP on a CPU
# machine, not seen in 9 stock launches; destroying the process group at exit did not remove it; cause not found,
# see CHANGELOG). Such a launch is repeated, at most twice, with a warning, so that the numbers are still checked
# and the abort stays visible in the test report; any other failure fails at once.
TEARDOWN_ABORT = "terminate called without an active exception"


def _aborted_after_the_work(result, out) -> bool:
    return (result.returncode != 0 and TEARDOWN_ABORT in result.stderr
            and os.path.exists(os.path.join(out, "history.json")) and os.path.isdir(os.path.join(out, "final")))


def run(out, *args, nproc=1, script=SCRIPT, launcher=None, **env):
    prefix = [sys.executable, script] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script]
    if launcher is not None:
        prefix = [*launcher, script]
    for attempt in range(3):
        shutil.rmtree(out, ignore_errors=True)  # a repeated launch starts from nothing
        result = subprocess.run([*prefix, str(out), *map(str, args)], capture_output=True, text=True,
                                env=_env(**env), timeout=600)
        if attempt == 2 or not _aborted_after_the_work(result, out):
            break
        warnings.warn(f"launch aborted at exit after its work ({TEARDOWN_ABORT!r}); repeated", RuntimeWarning)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    with open(os.path.join(out, "history.json")) as f:
        history = json.load(f)
    steps = {h["step"]: h for h in history["log"] if "loss" in h}
    return steps, history["local_experts"], result


def weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def rel(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm()).item()


def same_run(got, ref, loss_tol, norm_tol):
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert rel(got[step]["loss"], ref[step]["loss"]) < loss_tol, (step, got[step], ref[step])
        assert rel(got[step]["grad_norm"], ref[step]["grad_norm"]) < norm_tol, (step, got[step], ref[step])


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    """The reference: stock Transformers, one process, the whole batch (4 sequences per step)."""
    out = tmp_path_factory.mktemp("stock")
    steps, experts, _ = run(out, "--batch", 4, "--steps", 4)
    assert experts == 8 and any(s["grad_norm"] > MAX_GRAD_NORM for s in steps.values())  # clipping is active
    return out, steps


@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [2, 4])
def test_trainer_under_torchrun_expert_parallel(stock, tmp_path, nproc):
    """MOE_PATCH=1 MOE_PATCH_EP=2 torchrun: 2 ranks (mesh ("ep",)) or 4 (mesh (dp=2, ep=2)), each with
    4 / nproc sequences per step, equal to the stock run; its checkpoint-2 resumes into the same steps 3-4
    (2 ranks)."""
    stock_out, ref = stock
    out = tmp_path / "ep"
    steps, experts, result = run(out, "--batch", 4 // nproc, "--steps", 4, "--save-steps", 2, nproc=nproc,
                                 MOE_PATCH="1", MOE_PATCH_EP="2")
    assert experts == 4  # 8 experts over ep=2
    # the fused loss stays on under EP, also after Trainer changes the config (its proof once counted this
    # rank's 4 experts where the aux loss counts the config's 8, and fell back to the stock loss)
    assert "fused loss is not used" not in result.stderr, result.stderr[-2000:]
    same_run(steps, ref, 1e-5, 1e-4)  # the gradient norm is the global one: Trainer clipped by it
    final, expected = weights(out / "final"), weights(stock_out / "final")  # trainer.save_model() under EP
    assert final.keys() == expected.keys()
    for name, value in expected.items():
        assert rel(final[name], value) < 1e-4, name

    # Trainer's own checkpoint: the standard format, and the optimizer state of every expert
    ckpt = out / "checkpoint-2"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ckpt)  # stock Transformers loads it
    optim = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
    assert sorted({v["exp_avg"].shape[0] for v in optim.values() if v["exp_avg"].dim() == 3}) == [8]

    if nproc == 4:  # resuming is the same code path on any mesh: 2 ranks test it (CI time)
        return
    resumed_out = tmp_path / "resumed"
    resumed, _, _ = run(resumed_out, "--batch", 4 // nproc, "--steps", 4, "--resume", ckpt, nproc=nproc,
                        MOE_PATCH="1", MOE_PATCH_EP="2")
    same_run(resumed, steps, 1e-6, 1e-6)  # the run it resumes: the same processes, so the same numbers
    resumed_final = weights(resumed_out / "final")
    for name, value in final.items():
        assert rel(resumed_final[name], value) < 1e-6, name


ACCELERATE_FSDP2 = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
use_cpu: true
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
"""


@pytest.mark.distributed
def test_trainer_under_accelerate_launch_fsdp2_config_on_cpu(stock, tmp_path):
    """`MOE_PATCH=1 MOE_PATCH_EP=2 accelerate launch --config_file fsdp2.yaml train.py` with the unmodified Trainer
    script. On CPU accelerate runs an FSDP config as DDP (FSDP needs an accelerator there), and moe_patch follows
    it (it sharded with FSDP2 and accelerate's DDP then failed): equal to the stock run, its checkpoint resumes
    exactly. The FSDP2 composition itself needs GPUs (not run here)."""
    _, ref = stock
    config = tmp_path / "fsdp2.yaml"
    config.write_text(ACCELERATE_FSDP2)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    steps, experts, _ = run(tmp_path / "a", "--batch", 2, "--steps", 4, "--save-steps", 2, launcher=launcher,
                            MOE_PATCH="1", MOE_PATCH_EP="2")
    assert experts == 4
    same_run(steps, ref, 1e-5, 1e-4)
    resumed, _, _ = run(tmp_path / "b", "--batch", 2, "--steps", 4, "--resume", tmp_path / "a" / "checkpoint-2",
                        launcher=launcher, MOE_PATCH="1", MOE_PATCH_EP="2")
    same_run(resumed, steps, 1e-6, 1e-6)


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_trainer_under_accelerate_launch_fsdp2_on_two_gpus(tmp_path):
    """The same unmodified Trainer script under `accelerate launch` with the FSDP2 config on 2 GPUs (NCCL), fp32:
    equal to the stock single-GPU run on the concatenated batch, and its checkpoint resumes exactly."""
    # one GPU visible: a plain `python` Trainer run sees every GPU and splits its batch over them (DataParallel)
    ref, _, _ = run(tmp_path / "stock", "--batch", 4, "--steps", 4, "--cuda", CUDA_VISIBLE_DEVICES="0")
    config = tmp_path / "fsdp2.yaml"
    config.write_text(ACCELERATE_FSDP2.replace("use_cpu: true", "use_cpu: false"))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    steps, experts, _ = run(tmp_path / "a", "--batch", 2, "--steps", 4, "--save-steps", 2, "--cuda",
                            launcher=launcher, MOE_PATCH="1", MOE_PATCH_EP="2")
    assert experts == 4
    same_run(steps, ref, 1e-5, 1e-4)
    resumed, _, _ = run(tmp_path / "b", "--batch", 2, "--steps", 4, "--resume", tmp_path / "a" / "checkpoint-2",
                        "--cuda", launcher=launcher, MOE_PATCH="1", MOE_PATCH_EP="2")
    same_run(resumed, steps, 1e-6, 1e-6)


def test_trainer_resume_one_process_exact(stock, tmp_path):
    """Stock Trainer's resume does not restore fused experts (the checkpoint holds them per expert); with
    moe_patch active (MOE_PATCH=1) it continues exactly as the uninterrupted run."""
    _, ref = stock
    steps, _, _ = run(tmp_path / "a", "--batch", 4, "--steps", 4, "--save-steps", 2, MOE_PATCH="1")
    same_run(steps, ref, 1e-5, 1e-4)
    resumed, _, _ = run(tmp_path / "b", "--batch", 4, "--steps", 4, "--resume", tmp_path / "a" / "checkpoint-2",
                        MOE_PATCH="1")
    same_run(resumed, steps, 1e-6, 1e-6)


def test_ep_size_errors_before_any_change(monkeypatch):
    """A size that cannot work is a one-line MeshError naming the value, and the model is left as it was."""
    from moe_patch.errors import MeshError
    from moe_patch.parallel import launch
    from util import build

    model = build("qwen3_moe")  # 8 experts per layer
    before = list(model.modules())
    for ep, world, words in (("3", "4", "does not divide the world size 4"), ("3", "6", "does not divide the 8 experts"),
                             ("two", "2", "expected a positive integer"), ("0", "2", "expected a positive integer")):
        monkeypatch.setenv("MOE_PATCH_EP", ep)
        monkeypatch.setenv("WORLD_SIZE", world)
        with pytest.raises(MeshError, match=words) as info:
            launch.apply(model)
        assert "\n" not in str(info.value) and f"MOE_PATCH_EP={ep}" in str(info.value).replace("'", "")
        assert list(model.modules()) == before and not hasattr(model, "_moe_patch")


def test_load_state_dict_of_saved_checkpoint_every_family(tmp_path):
    """What Trainer's resume does: torch's load_state_dict() of the file save_pretrained() wrote (the family's
    checkpoint format, experts per expert; stock Transformers 5.24 leaves fused experts out): a patched model
    takes it whole."""
    import glob

    import moe_patch
    from safetensors.torch import load_file
    from util import MOE_FAMILIES, build, rel_err

    for family in MOE_FAMILIES:
        saved = moe_patch.apply(build(family))
        out = tmp_path / family
        saved.save_pretrained(out)
        state = {k: v for f in glob.glob(str(out / "*.safetensors")) for k, v in load_file(f).items()}
        model = moe_patch.apply(build(family, seed=3))
        result = model.load_state_dict(state, strict=False)
        assert not result.unexpected_keys, (family, result.unexpected_keys[:3])
        expected = saved.state_dict()
        for name, value in model.state_dict().items():
            assert rel_err(value, expected[name]) == 0, (family, name)


def test_bad_ep_size_from_the_environment_is_one_line_exit_2():
    """`MOE_PATCH=1 MOE_PATCH_EP=3` with 2 processes: the script stops at model creation with one line on stderr
    and exit status 2 (a traceback from every rank before)."""
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from util import build\n"
            "build('qwen3_moe')\n"
            "print('not reached')\n") % HERE
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=_env(MOE_PATCH="1", MOE_PATCH_EP="3", WORLD_SIZE="2"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "not reached" not in result.stdout
    lines = [x for x in result.stderr.splitlines() if "MOE_PATCH_EP=3" in x]
    assert len(lines) == 1 and "does not divide the world size 2" in lines[0], result.stderr
