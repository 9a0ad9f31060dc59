"""TRL's SFTTrainer with an unmodified script (tests/sft_script.py) under expert parallelism
(`MOE_PATCH=1 MOE_PATCH_EP=2 torchrun`): losses and gradient norms step for step equal to stock (SFTTrainer's own
max_grad_norm clipping active), its own checkpoints, and resume_from_checkpoint continuing exactly.

SFTTrainer adds the router's load-balancing loss (router_aux_loss_coef), computed over each rank's own batch, so
stock SFTTrainer itself gives other numbers on 1 process x 4 sequences than on 2 x 2 (measured: the same model
with the coefficient at 0 gives the same numbers within 1e-7). Hence two references: stock on one process with
the coefficient at 0, and stock under the same torchrun (DDP) with the model's coefficient."""
import os
import sys

import pytest
import torch

import trl  # noqa: E402,F401  in the `test` extra (setup.cfg): a missing trl fails here, it never skips
sys.path.insert(0, os.path.dirname(__file__))
from test_launch import MAX_GRAD_NORM, rel, same_run  # noqa: E402
from test_launch import run as run_script  # noqa: E402
from test_launch import weights  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "sft_script.py")


def run(out, *args, **kwargs):
    return run_script(out, *args, script=SCRIPT, **kwargs)


@pytest.mark.distributed
def test_sft_trainer_under_torchrun_expert_parallel(tmp_path):
    ref, _, _ = run(tmp_path / "stock", "--batch", 4, "--steps", 4, "--aux-coef", 0)  # one process, whole batch
    assert any(s["grad_norm"] > MAX_GRAD_NORM for s in ref.values())  # clipping is active
    out = tmp_path / "ep"
    steps, experts, result = run(out, "--batch", 2, "--steps", 4, "--save-steps", 2, "--aux-coef", 0, nproc=2,
                                 MOE_PATCH="1", MOE_PATCH_EP="2")
    assert experts == 4 and "moe_patch: patched" in result.stderr  # 8 experts over ep=2
    same_run(steps, ref, 1e-5, 1e-4)
    expected, final = weights(tmp_path / "stock" / "final"), weights(out / "final")
    assert final.keys() == expected.keys()
    for name, value in expected.items():
        assert rel(final[name], value) < 1e-4, name
    ckpt = out / "checkpoint-2"
    optim = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
    assert sorted({v["exp_avg"].shape[0] for v in optim.values() if v["exp_avg"].dim() == 3}) == [8]
    resumed, _, _ = run(tmp_path / "resumed", "--batch", 2, "--steps", 4, "--resume", ckpt, "--aux-coef", 0, nproc=2,
                        MOE_PATCH="1", MOE_PATCH_EP="2")
    same_run(resumed, steps, 1e-6, 1e-6)


@pytest.mark.distributed
def test_sft_trainer_expert_parallel_with_router_aux_loss(tmp_path):
    """With the router's load-balancing loss on: equal to stock SFTTrainer under the same torchrun (DDP)."""
    ref, _, _ = run(tmp_path / "stock", "--batch", 2, "--steps", 4, nproc=2)
    assert all(s.get("aux_loss", 0) > 0 for s in ref.values())
    steps, _, _ = run(tmp_path / "ep", "--batch", 2, "--steps", 4, nproc=2, MOE_PATCH="1", MOE_PATCH_EP="2")
    same_run(steps, ref, 1e-5, 1e-4)


@pytest.mark.distributed
def test_sft_trainer_under_accelerate_launch(tmp_path):
    """The unmodified SFT script under `MOE_PATCH=1 MOE_PATCH_EP=2 accelerate launch` (the FSDP2 config; on CPU
    accelerate and moe_patch run it as DDP): equal to stock on one process, its checkpoint resuming exactly."""
    from test_launch import ACCELERATE_FSDP2

    ref, _, _ = run(tmp_path / "stock", "--batch", 4, "--steps", 4, "--aux-coef", 0)
    config = tmp_path / "fsdp2.yaml"
    config.write_text(ACCELERATE_FSDP2)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    steps, experts, _ = run(tmp_path / "a", "--batch", 2, "--steps", 4, "--save-steps", 2, "--aux-coef", 0,
                            launcher=launcher, MOE_PATCH="1", MOE_PATCH_EP="2")
    assert experts == 4
    same_run(steps, ref, 1e-5, 1e-4)
    resumed, _, _ = run(tmp_path / "b", "--batch", 2, "--steps", 4, "--resume", tmp_path / "a" / "checkpoint-2",
                        "--aux-coef", 0, launcher=launcher, MOE_PATCH="1", MOE_PATCH_EP="2")
    same_run(resumed, steps, 1e-6, 1e-6)
