"""`launch/submit.py cluster=slurm` on a real SLURM: a 2-node x 1-task CPU distillation end to end, and the same job
preempted mid-run, which checkpoints, is requeued, resumes and ends with the very images of the uninterrupted job.

The cluster (conftest.py: slurmctld + slurmd n1, n2 on this machine) is skipped with the reason when it cannot start.
Both tasks share this machine, so device=cpu (gloo) and the rendezvous is cluster.master_addr=127.0.0.1 (the node
names do not resolve). Run: .venv/bin/python -m pytest tests/slurm -q -rs
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from slurm_helpers import TINY, job_id_of, run_submit, submit_env

ITERATIONS = 20
# no cluster.partition, as the mission writes `submit.py cluster=slurm ...`: the job goes to the cluster's default
# partition (local_slurm.py's `debug`, Default=YES), with no --partition line in the sbatch script
JOB = TINY + ["cluster=slurm", "cluster.nodes=2", "cluster.gpus_per_node=1",
              "cluster.request_gpus=false", "cluster.cpus_per_task=1", "cluster.master_addr=127.0.0.1",
              "cluster.time_min=10", "cluster.max_requeues=3", f"distill.iterations={ITERATIONS}",
              "distill.checkpoint_every=2"]
RUN = Path("fashion_mnist_lt") / "csdm-ipc2-if10-f2-seed0"
FAILED_GRACE_S = 5
RELAUNCH_AFTER_S = 2
FAILED = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def submit_job(cluster, tiny_dataset, root: Path) -> tuple[str, Path]:
    out = run_submit(JOB + tiny_dataset + [f"cluster.output_root={root}"], cwd=root.parent,
                     env=submit_env({"SLURM_CONF": str(cluster.conf)}), timeout=60)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return job_id_of(out), root / RUN


def logs(run: Path, job_id: str, tail: int | None = 4000) -> str:
    """The job's task logs (the last `tail` characters of each; None: all)."""
    return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-(tail or 0):]
                     for p in sorted((run / "submitit").glob(f"{job_id}_*_log.*")))


def wait_until(cluster, job_id: str, run: Path, done, what: str, timeout: float = 90) -> list[str]:
    """Poll until done(); fail with the job's logs and the states it went through if the job ends badly or time runs
    out. SLURM holds a requeued batch job back for about two minutes (Reason=BeginTime); the test lets it start
    once it has been held RELAUNCH_AFTER_S seconds."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    failed_since = None
    held_since: dict[str | None, float] = {}  # restart count -> when the test first saw it held back
    states: list[str] = []  # each change of (JobState, Reason, Restarts), with the time since the wait began
    last = None

    def why(headline: str) -> str:
        return (f"{headline}\nstates: {'; '.join(states)}\n{logs(run, job_id)}\n"
                f"--- slurmctld on job {job_id}\n{cluster.controller_log(job_id)}\n{cluster.logs()}")

    while time.monotonic() < deadline:
        if done():
            return states
        info = cluster.job(job_id)
        state = f"{info.get('JobState')} ({info.get('Reason')}, restarts {info.get('Restarts')})"
        if state != last:
            states.append(f"{time.monotonic() - t0:.1f} s {state}")
            last = state
        # a job that requeues itself can show FAILED for a moment (its batch step ends before the requeue is
        # processed): only a state that stays failed for FAILED_GRACE_S seconds ends the wait
        if info.get("JobState") in FAILED:
            failed_since = failed_since or time.monotonic()
            if time.monotonic() - failed_since > FAILED_GRACE_S:
                pytest.fail(why(f"job {job_id} ended {info.get('JobState')} while waiting for {what}"))
        else:
            failed_since = None
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            # not at once: a batch job relaunched within the second in which its nodes revoked its credential (the
            # kill that requeued it) is refused there ("Job credential revoked") and ends FAILED. StartTime=now (not
            # now+N) so that the scheduler runs at once rather than at its next periodic pass.
            held = held_since.setdefault(info.get("Restarts"), time.monotonic())
            if time.monotonic() - held >= RELAUNCH_AFTER_S:
                cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
        time.sleep(0.05)
    pytest.fail(why(f"timed out after {timeout} s waiting for {what} of job {job_id} ({cluster.job(job_id)})"))


def finished(cluster, job_id: str, run: Path):
    return lambda: (run / "results.json").is_file() and cluster.job(job_id).get("JobState") == "COMPLETED"


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted") / "runs"
    t0 = time.monotonic()
    job_id, run = submit_job(slurm_cluster, tiny_dataset, root)
    wait_until(slurm_cluster, job_id, run, finished(slurm_cluster, job_id, run), "the results")
    print(f"\nuninterrupted 2-node job {job_id}: {time.monotonic() - t0:.1f} s")
    return job_id, run


def test_two_node_job_runs_end_to_end(slurm_cluster, uninterrupted):
    job_id, run = uninterrupted
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["timing"]["steps"] == ITERATIONS
    assert torch.load(run / "distilled.pt", weights_only=False)["images"].shape == (20, 1, 28, 28)
    assert any((run / "tb").glob("events.out.tfevents.*"))
    for name in ("config.yaml", "config_resolved.yaml", "git_commit.txt"):
        assert (run / name).is_file(), name
    script = (run / "submitit" / f"{job_id}_submission.sh").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script and "--gpus" not in script
    assert "--partition" not in script
    info = slurm_cluster.job(job_id)
    assert info["Partition"] == slurm_cluster.partition == "debug"  # the default partition took it
    assert info["NumNodes"] == "2" and info["NodeList"] in ("n[1-2]", "n1,n2") and info["Restarts"] == "0"
    task_logs = [(run / "submitit" / f"{job_id}_{t}_log.err").read_text() for t in (0, 1)]
    for t, text in enumerate(task_logs):  # one task per node, each a rank of the same world of two
        assert f"node={t}(2), global_rank={t}(2)" in text and f"rank {t} of 2" in text


@pytest.mark.parametrize("how", ["signal", "requeue"])
def test_preempted_job_resumes_with_the_same_result(slurm_cluster, tiny_dataset, uninterrupted, tmp_path, how):
    """`signal`: the SIGUSR2 that --signal=USR2@120 sends before the time limit (here by scancel --signal): the job
    checkpoints at the next step and requeues itself through submitit. `requeue`: `scontrol requeue` from outside
    (SIGTERM to the tasks): the job checkpoints at the next step and SLURM requeues it. Either way the requeued job
    resumes from that checkpoint; every random draw is keyed by (seed, step, rank), so the images must be identical."""
    t0 = time.monotonic()
    job_id, run = submit_job(slurm_cluster, tiny_dataset, tmp_path / "runs")
    first = run / "checkpoints" / "step-000002" / "meta.json"
    wait_until(slurm_cluster, job_id, run, first.is_file, "the first checkpoint")
    if how == "signal":
        slurm_cluster.run("scancel", "--signal=USR2", job_id)
    else:
        slurm_cluster.run("scontrol", "requeue", job_id)
    states = wait_until(slurm_cluster, job_id, run, finished(slurm_cluster, job_id, run),
                        "the results after requeueing")
    print(f"\npreempted ({how}) 2-node job {job_id}: {time.monotonic() - t0:.1f} s; states {'; '.join(states)}")

    text = logs(run, job_id, tail=None)
    assert slurm_cluster.job(job_id)["Restarts"] == "1", text
    stopped = {int(s) for s in re.findall(r"stopped at step (\d+) on request", text)}
    resumed = {int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", text)}
    assert len(stopped) == 1 and stopped == resumed and 2 <= min(stopped) < ITERATIONS, text
    if how == "signal":
        assert "Requeued job" in text and "Calling checkpoint method" in text, text  # submitit's path
    else:
        assert "stopped by SIGTERM" in text, text
    results = json.loads((run / "results.json").read_text())
    assert results["timing"]["steps"] == ITERATIONS and results["world_size"] == 2
    want = torch.load(uninterrupted[1] / "distilled.pt", weights_only=False)["images"]
    got = torch.load(run / "distilled.pt", weights_only=False)["images"]
    assert torch.equal(want, got)
