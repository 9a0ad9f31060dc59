"""from_pretrained(..., distributed_config=DistributedConfig(ep_size=2, fsdp_size=N)) with moe_patch active runs
moe_patch's expert parallelism (tests/dist_config.py under torchrun, gloo): logits, loss and every gradient equal to
the stock single-process model on the concatenated batch; save_pretrained writes the checkpoint it loaded."""
import os
import subprocess
import sys
import warnings

import pytest

HERE = os.path.dirname(__file__)
SCRIPT = os.path.join(HERE, "dist_config.py")


def _run(out, mode, nproc, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MOE_PATCH")}
    environ.update(OMP_NUM_THREADS="1", **env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), SCRIPT,
           str(out), mode, "2"]
    from test_launch import TEARDOWN_ABORT

    for attempt in range(3):  # repeated only for the abort at exit after the work (see test_launch.py)
        if (out / "ok").exists():
            (out / "ok").unlink()
        result = subprocess.run(cmd, capture_output=True, text=True, env=environ, timeout=600)
        if attempt == 2 or result.returncode == 0 or not ((out / "ok").exists() and TEARDOWN_ABORT in result.stderr):
            break
        warnings.warn(f"launch aborted at exit after its work ({TEARDOWN_ABORT!r}); repeated", RuntimeWarning)
    assert result.returncode == 0 and (out / "ok").exists(), result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [2, 4])
def test_apply_after_from_pretrained_distributed_config(tmp_path, nproc):
    """moe_patch.apply(model) after loading: 2 ranks (ep over every rank), 4 ranks (2 copies of each expert block,
    Transformers' efsdp=2); a MOE_PATCH_EP that disagrees with ep_size is one line and changes nothing."""
    _run(tmp_path, "apply", nproc)


@pytest.mark.distributed
def test_moe_patch_env_takes_distributed_config_models(tmp_path):
    """MOE_PATCH=1, no moe_patch call in the script: the model from_pretrained returns is moe_patch's."""
    result = _run(tmp_path, "auto", 2, MOE_PATCH="1")
    assert result.stderr.count("moe_patch: patched") == 2, result.stderr[-3000:]  # one line per rank


@pytest.mark.distributed
def test_trainer_with_distributed_config_model(tmp_path):
    """An unmodified Trainer script whose model comes from from_pretrained(distributed_config=
    DistributedConfig(ep_size=2, fsdp_size=2)), under MOE_PATCH=1 torchrun: losses and gradient norms (Trainer's
    max_grad_norm clipping active) equal to the stock single-process run on the concatenated batch, and its
    saved model equal to stock's. Trainer itself checkpoints such models without optimizer state
    (save_only_model=True), so there is no resume to test."""
    sys.path.insert(0, HERE)
    from test_launch import rel, run, same_run, weights

    ref, _, _ = run(tmp_path / "stock", "--batch", 4, "--steps", 4)
    steps, experts, result = run(tmp_path / "ep", "--batch", 2, "--steps", 4, "--save-steps", 2,
                                 "--distributed-config", 2, nproc=2, MOE_PATCH="1")
    assert experts == 4 and result.stderr.count("moe_patch: patched FSDP") == 2, result.stderr[-3000:]
    same_run(steps, ref, 1e-5, 1e-4)
    expected, final = weights(tmp_path / "stock" / "final"), weights(tmp_path / "ep" / "final")
    assert final.keys() == expected.keys()
    for name, value in expected.items():
        assert rel(final[name], value) < 1e-4, name
