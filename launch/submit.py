"""Submit a distillation to SLURM, or run it here, through submitit: one task per GPU, requeue on preemption.

    python launch/submit.py cluster=slurm cluster.partition=gpu cluster.nodes=2 dataset=cifar10_lt ipc=50
    python launch/submit.py cluster=slurm cluster.partition=gpu -m ipc=10,50 dataset.imbalance_factor=10,100
    python launch/submit.py cluster=imagenet_lt cluster.partition=gpu -m ipc=10,50
    python launch/submit.py cluster=local ...            # the same job, as submitit subprocesses on this machine
    python launch/submit.py ... cluster.dry_run=true     # print the memory estimate and the sbatch script only

Every distillation key of configs/config.yaml works here too (configs/submit.yaml = that config + `cluster`).
Before anything is submitted the config is validated, the built dataset is looked up and the memory per rank is
printed. Each sweep point is one job with its own run directory
`<cluster.output_root>/<dataset>/<method>-ipc<IPC>-if<IF>-seed<seed>/` holding config.yaml, config_resolved.yaml,
git_commit.txt, submitit/ (sbatch script, logs, pickles), tb/, checkpoints/ and results.json.

Inside the job every task runs `DistillJob`: init_distributed (SLURM variables; MASTER_ADDR from
cluster.master_addr when set), `csdm_dist.distill.run` with a stop signal, close. While distilling, the job takes
SIGUSR1/SIGUSR2 (SLURM's `--signal=USR2@signal_delay_s` before the time limit is submitit's signal) and SIGTERM
(scancel, `scontrol requeue`, preemption): every rank stops at the next step boundary with a checkpoint. After a
USR signal rank 0 hands the signal back to submitit's own handler, which calls `DistillJob.checkpoint()` (a fresh
instance, or None after cluster.max_requeues restarts) and runs `scontrol requeue`; after SIGTERM alone the tasks
just exit and SLURM decides (a requeued job restarts, a cancelled one ends). A restarted job resumes from the newest
complete checkpoint (resume=true).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import submitit
from omegaconf import DictConfig, OmegaConf
from submitit.core.job_environment import SignalHandler

from csdm_dist import files
from csdm_dist.cluster import (ClusterConfig, multirun_flag_first, register_cluster_configs, split_submit_config,
                               to_cluster_config)
from csdm_dist.config import Config, ConfigError, register_configs, run_steps
from csdm_dist.preempt import StopSignal

log = logging.getLogger("csdm_dist.submit")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # absolute: works as a script and as `launch.submit`

# Raw training-set size per source, for the memory estimate of a dataset that is not built yet (dry runs).
_RAW_N_MAX = {"fashion_mnist": 6000, "cifar10": 5000, "cifar100": 500, "tiny_imagenet": 500, "imagenet": 1300}
_IMAGENET_LT_TRAIN = 115846


# ---- the job (runs in every task) ------------------------------------------------------------------------------
class DistillJob(submitit.helpers.Checkpointable):
    """One distillation, run by every task of the job. Holds plain dicts only, so requeueing pickles no model."""

    def __init__(self, cfg: dict[str, Any], cluster: dict[str, Any]):
        self.cfg = cfg
        self.cluster = cluster

    def __call__(self) -> dict:
        import torch

        from csdm_dist.config import to_config
        from csdm_dist.dist import close_distributed, init_distributed
        from csdm_dist.distill import run

        cfg, cluster = to_config(self.cfg), to_cluster_config(self.cluster)
        env = submitit.JobEnvironment()
        _setup_logging(env.global_rank)
        _export_rendezvous(env, cluster)
        torch.manual_seed(cfg.seed)
        rt = init_distributed(cfg.device)
        log.info("%s: rank %d of %d on %s, run directory %s", env, rt.rank, rt.world_size, env.hostname, cfg.out_dir)
        stop = JobStop()
        try:
            if rt.is_main:
                log.info("\n%s", memory_table(cfg, cluster, rt.world_size))
            result = run(cfg, rt, stop)
            requeue = bool(result.get("preempted")) and stop.any_rank_asked_to_requeue()
        except Exception:
            log.exception("rank %d failed", rt.rank)
            raise
        finally:
            stop.restore()  # submitit's own handlers are back
            close_distributed()
        if result.get("preempted"):
            if requeue:
                _requeue(rt.rank, result["step"])
            else:  # SIGTERM only: scancel, or SLURM preempting/requeueing the job itself
                log.warning("stopped by SIGTERM at step %d with a checkpoint; exiting without a result (a requeued "
                            "job resumes from it; after scancel, resubmit the same run to resume)", result["step"])
                raise SystemExit(0)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        """Called by submitit's signal handler on rank 0: what the requeued job runs (None: do not requeue)."""
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        limit = self.cluster.get("max_requeues", 0)
        if restarts >= limit:
            log.error("not requeueing: the job already restarted %d times (cluster.max_requeues=%d)", restarts, limit)
            return None
        log.warning("requeueing (restart %d of at most %d); the job resumes from its newest checkpoint",
                    restarts + 1, limit)
        return submitit.helpers.DelayedSubmission(type(self)(self.cfg, self.cluster))


def requeue_signals() -> tuple[int, ...]:
    """SIGUSR1 and submitit's preemption signal (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    return tuple(dict.fromkeys((signal.SIGUSR1, submitit.JobEnvironment._usr_sig())))


class JobStop(StopSignal):
    """StopSignal for the job: SIGUSR1/SIGUSR2 (time limit, preemption notice: checkpoint, then requeue) and SIGTERM
    (scancel, `scontrol requeue`, SLURM preemption: checkpoint, then exit and let SLURM decide). Remembers which."""

    def __init__(self) -> None:
        self.received: set[int] = set()
        super().__init__(requeue_signals() + (signal.SIGTERM,))

    def _handle(self, signum, frame) -> None:
        self.received.add(signum)
        super()._handle(signum, frame)

    def any_rank_asked_to_requeue(self) -> bool:
        """Collective: did any rank get a requeue signal (not only SIGTERM)?"""
        import torch
        import torch.distributed as dist

        t = torch.tensor([1.0 if self.received & set(requeue_signals()) else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def _requeue(rank: int, step: int) -> None:
    """After a stop at `step` (checkpoint saved on every rank): requeue through submitit's signal handler."""
    sig = submitit.JobEnvironment._usr_sig()
    if not isinstance(getattr(signal.getsignal(sig), "__self__", None), SignalHandler):
        log.warning("stopped at step %d outside a submitit job with a requeue handler; rerun to resume", step)
        return
    if rank != 0:  # rank 0 requeues the whole job; this task leaves no result behind
        log.info("stopped at step %d; rank 0 requeues the job", step)
        raise SystemExit(0)
    log.warning("stopped at step %d: handing the signal to submitit to requeue the job", step)
    signal.raise_signal(sig)  # checkpoint() -> `scontrol requeue` -> exit; raises if the job may not requeue


def _export_rendezvous(env: submitit.JobEnvironment, cluster: ClusterConfig) -> None:
    """SLURM tasks: dist.py reads SLURM_* itself, MASTER_ADDR only overridden here. Local tasks: torchrun's vars."""
    if cluster.master_addr:
        os.environ["MASTER_ADDR"] = cluster.master_addr
    if env.cluster == "local" and env.num_tasks > 1:
        os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
                          MASTER_ADDR=cluster.master_addr or "127.0.0.1",
                          MASTER_PORT=str(20000 + int(env.job_id) % 20000))


def _setup_logging(rank: int) -> None:
    """Log to stderr (submitit's <job>_<task>_log.err) in a job process; keep the handlers of an in-process run."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[%(asctime)s][rank {rank}][%(name)s][%(levelname)s] %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)


# ---- before submitting -----------------------------------------------------------------------------------------
def memory_table(cfg: Config, cluster: ClusterConfig, world_size: int | None = None) -> str:
    from csdm_dist.memory import estimate_memory

    counts, note = real_class_counts(cfg)
    real_batch = sum(min(n, cfg.distill.real_per_class) for n in counts) if counts else None  # expected per step
    num_real = sum(counts) if counts else (_IMAGENET_LT_TRAIN if cfg.dataset.source == "imagenet_lt" else 0)
    est = estimate_memory(cfg, world_size or cluster.world_size, num_real, real_batch)
    return est.table(cluster.gpus_per_node) + (f"\n  ({note})" if note else "")


def real_class_counts(cfg: Config) -> tuple[list[int] | None, str]:
    """Per-class training counts of the built dataset (its manifest), else the expected ones, with a note."""
    from csdm_dist.data.longtail import longtail_counts
    from csdm_dist.data.shards import MANIFEST, dataset_dir, load_manifest

    ddir = dataset_dir(cfg.dataset)
    if (ddir / MANIFEST).is_file():
        return [int(n) for n in load_manifest(ddir)["train"]["counts"]], ""
    d = cfg.dataset
    if d.source == "imagenet_lt":
        return None, "dataset not built yet: ImageNet-LT's 115,846 training images assumed"
    if d.imbalance_factor is None:
        return None, "dataset not built yet: its natural counts (dataset.imbalance_factor=null) are unknown"
    n_max = d.n_max or _RAW_N_MAX.get(d.source, 0)
    if not n_max:
        return None, "dataset not built yet: real-data store unknown"
    return longtail_counts(n_max, d.num_classes, d.imbalance_factor), \
        f"dataset not built yet: {n_max} images in the head class, IF {d.imbalance_factor:g} assumed"


def check_dataset(cfg: Config, dataset_choice: str) -> dict:
    """The built dataset's manifest, or a FileNotFoundError naming the path and the build command."""
    from csdm_dist.data.manifest import build_command
    from csdm_dist.data.shards import MANIFEST, dataset_dir, load_manifest

    root, ddir = Path(cfg.dataset.data_root), dataset_dir(cfg.dataset)
    build = build_command(cfg.dataset, dataset_choice)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset.data_root={root} does not exist. Point it at the shared folder holding the "
                                f"built datasets (every node must see the same path), or build into it with `{build}`")
    if not (ddir / MANIFEST).is_file():
        raise FileNotFoundError(f"no built dataset at {ddir} ({MANIFEST} missing). Build it first on a machine that "
                                f"sees the shared filesystem: `{build}`")
    return load_manifest(ddir, cfg.dataset, dataset_choice)


def check_layout(cfg: Config, cluster: ClusterConfig, manifest: dict | None) -> None:
    world, replicas = cluster.world_size, cfg.parallel.replicas
    if world % replicas:
        raise ConfigError(f"invalid config `parallel.replicas`: {replicas} does not divide the job's "
                          f"{cluster.nodes} nodes x {cluster.gpus_per_node} tasks = {world} ranks")
    shards = world // replicas
    if manifest is not None and len(manifest["train"]["shards"]) < shards:
        raise ConfigError(f"invalid config `cluster.nodes`/`cluster.gpus_per_node`: {shards} ranks share the real data "
                          f"but the dataset has only {len(manifest['train']['shards'])} train shard files; use fewer "
                          f"ranks or rebuild with a smaller dataset.samples_per_shard")
    if cfg.device == "cuda" and cluster.name == "slurm" and not cluster.request_gpus:
        raise ConfigError("invalid config `cluster.request_gpus`: device=cuda needs GPUs; set it to true")


def absolute_paths(job: dict[str, Any]) -> dict[str, Any]:
    """Paths the job reads or writes, made absolute on the submitting machine (the job may start elsewhere)."""
    job["out_dir"] = str(Path(job["out_dir"]).absolute())
    job["dataset"]["data_root"] = str(Path(job["dataset"]["data_root"]).absolute())
    if job["extractor"].get("pool_path"):
        job["extractor"]["pool_path"] = str(Path(job["extractor"]["pool_path"]).absolute())
    return job


def slurm_parameters(cluster: ClusterConfig, job_name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (sbatch names): one task per GPU on every node."""
    params: dict[str, Any] = dict(job_name=job_name, time=cluster.time_min,
                                  nodes=cluster.nodes, ntasks_per_node=cluster.gpus_per_node,
                                  cpus_per_task=cluster.cpus_per_task, signal_delay_s=cluster.signal_delay_s,
                                  additional_parameters={"requeue": True, **cluster.sbatch_extra})
    if cluster.request_gpus:
        params["gpus_per_node"] = cluster.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):  # unset: no line, the cluster's default
        if getattr(cluster, key):
            params[key] = getattr(cluster, key)
    if cluster.mem_gb is not None:
        gb = cluster.mem_gb
        params["mem"] = f"{int(gb)}G" if float(gb).is_integer() else f"{int(gb * 1024)}M"
    if cluster.setup:
        params["setup"] = list(cluster.setup)
    return params


class _DryRunSlurmExecutor(submitit.SlurmExecutor):
    """Builds the same sbatch script as SlurmExecutor on a machine without SLURM (dry runs)."""

    @classmethod
    def affinity(cls) -> int:
        return 2


def make_executor(cluster: ClusterConfig, folder: Path, job_name: str) -> submitit.Executor:
    if cluster.name == "slurm":
        cls = _DryRunSlurmExecutor if cluster.dry_run else submitit.SlurmExecutor
        ex = cls(folder=folder, max_num_timeout=cluster.max_requeues)
        ex.update_parameters(**slurm_parameters(cluster, job_name))
        return ex
    if cluster.name == "local":
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=cluster.max_requeues)
        ex.update_parameters(timeout_min=cluster.time_min, tasks_per_node=cluster.gpus_per_node,
                             gpus_per_node=cluster.gpus_per_node if cluster.request_gpus and _cuda_count() else 0,
                             signal_delay_s=cluster.signal_delay_s)
        return ex
    return submitit.DebugExecutor(folder=folder)


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def sbatch_script(executor: submitit.SlurmExecutor) -> str:
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def claim_run_dir(cfg: Config, job: dict[str, Any], logger: logging.Logger) -> None:
    """Refuse before submitting what the job would refuse (csdm_dist/rundir.py); under overwrite=true move the old
    run aside here, so that the job, and every requeue of it, resumes its own run only."""
    from csdm_dist import rundir
    from csdm_dist.runinfo import config_hash

    rundir.claim(Path(cfg.out_dir), config_hash(cfg), cfg.resume, cfg.overwrite, run_steps(cfg), logger)
    job["overwrite"], job["resume"] = False, True


def write_run_record(run_dir: Path, dcfg: DictConfig, job: dict[str, Any], cluster: ClusterConfig) -> None:
    from csdm_dist.runinfo import git_commit

    run_dir.mkdir(parents=True, exist_ok=True)
    files.write_text(run_dir / "config.yaml", OmegaConf.to_yaml(dcfg))  # as composed, interpolations kept
    files.write_text(run_dir / "config_resolved.yaml", OmegaConf.to_yaml({**job, "cluster": asdict(cluster)}))
    files.write_text(run_dir / "git_commit.txt", git_commit() + "\n")


def submit(dcfg: DictConfig, dataset_choice: str | None = None) -> submitit.Job | str:
    """Validate, check the data, print the memory estimate, then submit (or print the sbatch script on a dry run).
    Returns the job, or the dry run's text."""
    from csdm_dist.data.normalization import resolve_normalization
    from csdm_dist.data.shards import dataset_dir

    cfg, cluster, job = split_submit_config(dcfg)
    job = absolute_paths(job)
    cfg.out_dir, cfg.dataset.data_root = job["out_dir"], job["dataset"]["data_root"]
    choice = dataset_choice or cfg.dataset.name
    try:
        manifest = check_dataset(cfg, choice)
        # as the job does (csdm_dist/distill.py): empty dataset.mean/std are the build's, so the run hash agrees
        cfg.dataset = resolve_normalization(cfg.dataset, manifest, dataset_dir(cfg.dataset))
    except FileNotFoundError as e:
        if not cluster.dry_run:
            raise
        manifest = None
        print(f"WARNING (dry run): {e}\n")
    check_layout(cfg, cluster, manifest)
    run_dir = Path(cfg.out_dir)
    job_name = cluster.job_name or f"csdm-{run_dir.parent.name}-{run_dir.name}"
    print(f"run directory: {run_dir}\n{cluster.name}: {cluster.nodes} node(s) x {cluster.gpus_per_node} task(s)")
    print(memory_table(cfg, cluster), flush=True)
    if cluster.dry_run:
        executor = make_executor(cluster, run_dir / "submitit", job_name)
        text = sbatch_script(executor) if cluster.name == "slurm" else \
            f"(cluster={cluster.name}: submitit runs {cluster.gpus_per_node} task(s) on this machine)"
        print(f"\n--- dry run: nothing submitted; the sbatch script would be ---\n{text}" if cluster.name == "slurm"
              else f"\n--- dry run: nothing submitted {text} ---")
        return text
    from csdm_dist import rundir

    with rundir.exclusive(run_dir, log):  # a job of this out_dir still running refuses the submission
        claim_run_dir(cfg, job, log)  # before anything is written into run_dir (submitit's folder included)
        write_run_record(run_dir, dcfg, job, cluster)
    executor = make_executor(cluster, run_dir / "submitit", job_name)
    submitted = executor.submit(DistillJob(job, asdict(cluster)))
    print(f"submitted job {submitted.job_id}\n  logs:        {submitted.paths.stdout} (task 0; %t = task)"
          f"\n  TensorBoard: tensorboard --logdir {Path(cluster.output_root).absolute()}", flush=True)
    if cluster.name == "slurm":
        print(f"  status:      squeue -j {submitted.job_id}    cancel: scancel {submitted.job_id}", flush=True)
    if cluster.wait:
        result = submitted.results()[0]
        print(f"job {submitted.job_id} finished: {run_dir / 'results.json'}"
              + (f"\naccuracy: {result['accuracy']['mean']:.2f}" if result.get("accuracy") else ""), flush=True)
    return submitted


@hydra.main(version_base=None, config_path=str(CONFIGS), config_name="submit")
def main(dcfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from csdm_dist.errors import one_line_errors

    with one_line_errors(log):
        submit(dcfg, HydraConfig.get().runtime.choices.get("dataset"))


def cli() -> None:
    sys.argv = multirun_flag_first(sys.argv)
    register_configs()
    register_cluster_configs()
    main()


if __name__ == "__main__":
    # Run as `launch.submit`, not `__main__`, so the job pickles `launch.submit.DistillJob` by reference.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from launch.submit import cli as _cli

    _cli()
