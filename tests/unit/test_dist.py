"""Where a process stands in its launch, read from the launcher's variables (dist.launch_rank_world, which the
one-line error handler uses before any process group exists, and slurm_environment, which init_distributed uses)."""
from __future__ import annotations

from csdm_dist.dist import launch_rank_world, slurm_environment

STEP = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_LOCALID": "1", "MASTER_ADDR": "node7", "SLURM_JOB_ID": "123"}


def test_rank_and_world_from_torchrun_then_slurm_then_alone():
    assert launch_rank_world({"RANK": "2", "WORLD_SIZE": "5", **STEP}) == (2, 5)  # torchrun's win
    assert launch_rank_world(STEP) == (3, 4)  # the job step's task count, not the job's
    assert launch_rank_world({k: v for k, v in STEP.items() if k != "SLURM_STEP_NUM_TASKS"}) == (3, 8)
    assert launch_rank_world({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) == (0, 1)  # a batch shell, not srun
    assert launch_rank_world({}) == (0, 1)


def test_slurm_environment_agrees_with_launch_rank_world():
    env = slurm_environment(STEP)
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node7",
                   "MASTER_PORT": str(20000 + 123)}
    assert launch_rank_world(env) == launch_rank_world(STEP)
    assert slurm_environment({"SLURM_PROCID": "0"}) is None
