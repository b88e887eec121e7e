"""launch/submit.py without a cluster: the sbatch script it writes, sweeps, bad input, the memory estimate, and the
same job run locally through submitit (cluster=local, 2 tasks).

Run: .venv/bin/python -m pytest tests/slurm/test_submit.py -q
"""
from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from slurm_helpers import ROOT, TINY, run_submit
from csdm_dist.cluster import multirun_flag_first, register_cluster_configs, split_submit_config
from csdm_dist.config import ConfigError, register_configs, to_config
from csdm_dist.memory import estimate_memory
from launch.submit import DistillJob, submit

CONFIGS = ROOT / "configs"


def compose_submit(overrides, name="submit"):
    register_configs()
    register_cluster_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name=name, overrides=overrides)


def test_sbatch_script_for_two_nodes_of_four_gpus(tmp_path):
    """The dry run's sbatch script: every directive of a 2-node x 4-GPU request, and one srun line starting one
    submitit task per GPU; nothing is written."""
    cfg = compose_submit(["cluster=slurm", "cluster.partition=gpu", "cluster.nodes=2", "cluster.gpus_per_node=4",
                          "cluster.cpus_per_task=6", "cluster.account=proj", "cluster.time_min=90",
                          "cluster.mem_gb=64", "cluster.constraint=a100", "+cluster.sbatch_extra.qos=high",
                          "+cluster.sbatch_extra.exclusive=true", "cluster.dry_run=true",
                          f"cluster.output_root={tmp_path / 'runs'}", f"dataset.data_root={tmp_path / 'data'}"])
    text = submit(cfg)
    run = tmp_path / "runs" / "fashion_mnist_lt" / "csdm-ipc10-if100-f2-seed0"
    folder = run / "submitit"
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    for want in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=6", "--partition=gpu",
                 "--account=proj", "--time=90", "--mem=64G", "--constraint=a100", "--qos=high", "--exclusive",
                 "--requeue", "--signal=USR2@120", "--open-mode=append",
                 "--job-name=csdm-fashion_mnist_lt-csdm-ipc10-if100-f2-seed0",
                 f"--output={folder}/%j_0_log.out", f"--error={folder}/%j_0_log.err"):
        assert f"#SBATCH {want}" in directives, (want, directives)
    commands = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert commands[0] == "export SUBMITIT_EXECUTOR=slurm"
    srun = shlex.split(commands[-1])
    assert [line for line in commands if line.startswith("srun")] == [commands[-1]]
    assert srun == ["srun", "--unbuffered", "--output", f"{folder}/%j_%t_log.out", "--error",
                    f"{folder}/%j_%t_log.err", sys.executable, "-u", "-m", "submitit.core._submit", str(folder)]
    assert not run.exists()  # a dry run writes nothing


def test_cpu_tasks_ask_for_no_gpus(tmp_path):
    cfg = compose_submit(["cluster=slurm", "cluster.partition=cpu", "cluster.nodes=2", "cluster.gpus_per_node=1",
                          "cluster.request_gpus=false", "cluster.dry_run=true", "device=cpu",
                          f"cluster.output_root={tmp_path}", f"dataset.data_root={tmp_path}"])
    text = submit(cfg)
    assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --nodes=2" in text
    assert "--gpus" not in text and "--gres" not in text and "--mem" not in text


def test_cli_sweep_prints_one_job_per_point(tmp_path):
    """`cluster=slurm cluster.partition=gpu -m ipc=10,50 dataset.imbalance_factor=10,100`, with `-m` where README
    writes it (after the first overrides): four jobs, four readable run directories."""
    out = run_submit(["cluster=slurm", "cluster.partition=gpu", "-m", "ipc=10,50", "dataset.imbalance_factor=10,100",
                      "cluster.dry_run=true", f"cluster.output_root={tmp_path}", f"dataset.data_root={tmp_path}"],
                     cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    names = re.findall(r"#SBATCH --job-name=(\S+)", out.stdout)
    assert sorted(names) == sorted(f"csdm-fashion_mnist_lt-csdm-ipc{i}-if{f}-f2-seed0" for i in (10, 50)
                                   for f in (10, 100))
    assert out.stdout.count("nothing submitted") == 4


@pytest.mark.parametrize("override,message", [("cluster=nope", "Could not find 'cluster/nope'"),
                                              ("dataset=nope", "Could not find 'dataset/nope'")])
def test_unknown_cluster_or_dataset_is_refused(tmp_path, override, message):
    out = run_submit([override, f"cluster.output_root={tmp_path}"], cwd=tmp_path, timeout=60)
    assert out.returncode != 0
    assert message in out.stderr and "Available options" in out.stderr
    assert "submitted job" not in out.stdout


@pytest.mark.parametrize("overrides,key", [(["cluster=local", "cluster.nodes=2"], "cluster.nodes"),
                                           (["cluster=slurm", "cluster.partition=p", "cluster.signal_delay_s=600",
                                             "cluster.time_min=5"], "cluster.signal_delay_s")])
def test_invalid_cluster_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(f"`{key}`")):
        split_submit_config(compose_submit(overrides))


def test_missing_data_is_refused_before_submitting(tmp_path, tiny_dataset):
    base = ["cluster=slurm", "cluster.partition=p", f"cluster.output_root={tmp_path / 'runs'}"]
    with pytest.raises(FileNotFoundError, match=r"dataset\.data_root=\S*nowhere does not exist"):
        submit(compose_submit(base + [f"dataset.data_root={tmp_path / 'nowhere'}"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no built dataset at .*python -m data_prep\.build dataset=cifar10_lt"):
        submit(compose_submit(base + ["dataset=cifar10_lt", f"dataset.data_root={tmp_path / 'empty'}"]),
               "cifar10_lt")
    with pytest.raises(ConfigError, match="parallel.replicas"):  # 8 ranks cannot form 3 replicas
        submit(compose_submit(base + tiny_dataset + ["cluster.gpus_per_node=8", "parallel.replicas=3"]))
    with pytest.raises(ConfigError, match="8 train shard files"):  # 16 ranks, 8 shard files
        submit(compose_submit(base + tiny_dataset + ["cluster.nodes=2", "cluster.gpus_per_node=8"]))
    assert not (tmp_path / "runs").exists()


def test_an_out_dir_in_use_refuses_the_submission(tmp_path, tiny_dataset):
    """A job of this out_dir still running (it holds the out_dir's lock): submitting again, even with
    overwrite=true, is refused before the live run is moved aside or any record is rewritten."""
    from csdm_dist import rundir
    from csdm_dist.errors import RunDirError

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config_hash": "live", "status": "running"}))
    with rundir.exclusive(run):
        for extra in ([], ["overwrite=true"]):
            with pytest.raises(RunDirError, match=rf"out_dir {run} is in use by another process"):
                submit(compose_submit(["cluster=local", f"out_dir={run}", *tiny_dataset, *TINY, *extra]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # not moved aside, and the lock file went
    assert [p.name for p in run.iterdir()] == ["run.json"]  # nothing written into it


def test_submit_config_matches_the_main_config():
    """configs/submit.yaml mirrors configs/config.yaml's defaults: the same distillation config but for out_dir."""
    for over in ([], ["dataset=cifar10_lt", "method=dm", "deepspeed=zero2_bf16", "ipc=50"]):
        main = to_config(compose_submit(over, name="config"))
        job, cluster, _ = split_submit_config(compose_submit(over))
        main.out_dir = job.out_dir
        assert main == job, over


def test_imagenet_lt_preset():
    job, cluster, _ = split_submit_config(compose_submit(["cluster=imagenet_lt", "cluster.partition=gpu", "ipc=50"]))
    assert (job.dataset.name, job.dataset.num_classes, job.dataset.image_size) == ("imagenet_lt", 1000, 64)
    assert job.extractor.depth == 4 and job.ipc == 50
    assert cluster.name == "slurm" and cluster.world_size == 16


def test_memory_estimate_formulas():
    job, _, _ = split_submit_config(compose_submit(["cluster=imagenet_lt", "cluster.partition=gpu", "ipc=50",
                                                    "parallel.replicas=2", "deepspeed.zero_stage=1"]))
    est = estimate_memory(job, world_size=16, num_real=115846)
    rows = {name: b for name, b, _ in est.rows}
    slice_ = 1000 * 50 * 3 * 64 * 64 * 4 // 8  # 8 shards (16 ranks / 2 replicas)
    assert rows["synthetic slice"] == slice_ and rows["gradients"] == slice_
    assert rows["optimizer state"] == 2 * slice_ // 2  # Adam, partitioned over 2 replicas by ZeRO 1
    assert rows["spectral statistics"] == 1000 * (2 * 4096 + 1) * 4 * 2
    assert rows["real-data store"] == -(-115846 // 8) * 3 * 64 * 64
    phase = dict(est.phases)  # held items, plus the largest of the step's phases (one after the other)
    held = sum(b for name, b in rows.items() if name not in phase)
    per = {p: sum(b for name, b in rows.items() if phase.get(name) == p) for p in set(phase.values())}
    assert set(per) == {"real forward", "real statistics", "synthetic pass"}
    assert est.total == held + max(per.values()) and "memory estimate per rank" in est.table(8)


def test_checkpoint_stops_requeueing_after_max_requeues(monkeypatch):
    job = DistillJob({"ipc": 1}, {"max_requeues": 2})
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    fresh = job.checkpoint()
    assert fresh is not None and fresh.function is not job and fresh.function.cfg == job.cfg
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert job.checkpoint() is None


def test_local_cluster_runs_two_tasks(tmp_path, tiny_dataset):
    """cluster=local: the SLURM job's code as two submitit subprocesses rendezvousing on 127.0.0.1."""
    out = run_submit(["cluster=local", "cluster.gpus_per_node=2", f"cluster.output_root={tmp_path}",
                      "distill.iterations=3", *tiny_dataset, *TINY], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "fashion_mnist_lt" / "csdm-ipc2-if10-f2-seed0"
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["timing"]["steps"] == 3
    assert "finished" in out.stdout and (run / "config_resolved.yaml").is_file()
    resolved = OmegaConf.load(run / "config_resolved.yaml")
    assert Path(resolved.out_dir) == run and resolved.cluster.name == "local"


def test_without_a_partition_the_job_goes_to_the_default_one(tmp_path):
    """`cluster=slurm` alone, as the mission writes it: no --partition line, so sbatch uses the default."""
    cfg = compose_submit(["cluster=slurm", "cluster.dry_run=true", f"cluster.output_root={tmp_path}",
                          f"dataset.data_root={tmp_path}"])
    text = submit(cfg)
    assert "#SBATCH --nodes=1" in text and "--partition" not in text


def test_multirun_flag_is_moved_first():
    argv = ["submit.py", "cluster=slurm", "-m", "ipc=10,50"]
    assert multirun_flag_first(argv) == ["submit.py", "-m", "cluster=slurm", "ipc=10,50"]
    assert multirun_flag_first(["x", "ipc=1"]) == ["x", "ipc=1"]
