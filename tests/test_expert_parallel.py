"""Expert parallelism under torchrun with gloo processes (see dist_ep.py for the checks themselves)."""
import os
import subprocess
import sys

import pytest

from util import MOE_FAMILIES

HERE = os.path.dirname(__file__)


def torchrun(nproc, families):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_PATCH")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(HERE, "dist_ep.py"), *families]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    for family in families:
        expected = f"ok fsdp {family[5:]} ep={nproc}" if family.startswith("fsdp:") else f"ok {family} ep={nproc}"
        assert expected in out.stdout


@pytest.mark.distributed
def test_expert_parallel_2_ranks_every_family():
    torchrun(2, MOE_FAMILIES + ["fsdp:qwen3_moe", "fsdp:gpt_oss"])


@pytest.mark.distributed
def test_expert_parallel_4_ranks():
    torchrun(4, ["qwen3_moe", "deepseek_v3", "gpt_oss", "fsdp:deepseek_v3"])
