"""Where a distillation runs: the `cluster` config group of `launch/submit.py` (configs/cluster/*.yaml).

`ClusterConfig` holds what the scheduler needs (nodes, one task per GPU, partition, time, memory, ...);
`SubmitConfig` is the submit app's root: the whole distillation `Config` plus `cluster`, so every distillation key
works on the submit command line. Nothing is registered on import: the submit app calls `register_cluster_configs()`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from .config import Config, ConfigError, _check, check_keys, default_out_dir

EXECUTORS = ("local", "debug", "slurm")


@dataclass
class ClusterConfig:
    name: str = "local"  # executor: `slurm` (sbatch + srun), `local` (submitit subprocesses here), `debug` (in-process)
    nodes: int = 1  # nodes of the job (local/debug: 1)
    gpus_per_node: int = 1  # tasks (ranks) per node: one task per GPU
    request_gpus: bool = True  # ask SLURM for gpus_per_node GPUs per node; false: CPU tasks (device=cpu, no GRES)
    cpus_per_task: int = 8  # CPU cores per task (data decoding, host work)
    partition: Optional[str] = None  # SLURM partition (`sinfo -s`); null: the cluster's default, as sbatch does
    account: Optional[str] = None  # SLURM account to charge (--account)
    qos: Optional[str] = None  # SLURM quality of service (--qos)
    time_min: int = 60  # time limit in minutes; the job checkpoints and requeues itself shortly before it
    mem_gb: Optional[float] = None  # memory per node in GB (--mem); null: the partition's default
    constraint: Optional[str] = None  # node features (--constraint), e.g. "a100|h100"
    sbatch_extra: dict[str, Any] = field(default_factory=dict)  # more `#SBATCH --key=value` lines ({key: true}: a flag)
    setup: list[str] = field(default_factory=list)  # shell lines run in the batch script before srun (module load ...)
    signal_delay_s: int = 120  # SLURM signals the job this many seconds before the time limit (--signal)
    max_requeues: int = 10  # times a job may requeue itself (after a signal); then it stops with an error
    master_addr: Optional[str] = None  # rendezvous host; null: the job's first node (must resolve on every node)
    output_root: str = "runs"  # shared folder holding every run directory (must be visible from all nodes)
    job_name: Optional[str] = None  # SLURM job name; null: derived from the run directory
    dry_run: bool = False  # print the sbatch script (and the memory estimate) and submit nothing
    wait: bool = False  # stay until the job ends and print its results

    def __post_init__(self) -> None:
        _check(self.name in EXECUTORS, "cluster.name", f"{self.name!r} is not one of {EXECUTORS}")
        _check(self.nodes >= 1, "cluster.nodes", f"must be >= 1, got {self.nodes}")
        _check(self.gpus_per_node >= 1, "cluster.gpus_per_node",
               f"must be >= 1 (tasks per node), got {self.gpus_per_node}")
        _check(self.cpus_per_task >= 1, "cluster.cpus_per_task", f"must be >= 1, got {self.cpus_per_task}")
        _check(self.time_min >= 1, "cluster.time_min", f"must be >= 1 minute, got {self.time_min}")
        _check(self.mem_gb is None or self.mem_gb > 0, "cluster.mem_gb", f"must be > 0 or null, got {self.mem_gb}")
        _check(0 <= self.signal_delay_s < 60 * self.time_min, "cluster.signal_delay_s",
               f"must be >= 0 and below the time limit ({60 * self.time_min} s), got {self.signal_delay_s}")
        _check(self.max_requeues >= 0, "cluster.max_requeues", f"must be >= 0, got {self.max_requeues}")
        _check(bool(self.output_root), "cluster.output_root", "must name a (shared) folder")
        if self.name != "slurm":
            _check(self.nodes == 1, "cluster.nodes", f"cluster={self.name} runs on this machine only: nodes must be 1, "
                                                     f"got {self.nodes}")
        if self.name == "debug":
            _check(self.gpus_per_node == 1, "cluster.gpus_per_node",
                   "cluster=debug runs one task in this process; use cluster=local for several tasks")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class SubmitConfig(Config):
    cluster: ClusterConfig = MISSING


def register_cluster_configs() -> None:
    """Store the submit app's schemas (`base_submit`, `cluster/base_cluster`) """
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_submit", node=SubmitConfig)
    cs.store(group="cluster", name="base_cluster", node=ClusterConfig)


def split_submit_config(cfg: DictConfig | dict[str, Any]) -> tuple[Config, ClusterConfig, dict[str, Any]]:
    """The submit app's config -> (validated distillation Config, validated ClusterConfig, the job's plain dict).

    Interpolations are resolved here, on the submitting machine, so the job receives plain values."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert isinstance(container, dict)
    cluster_dict = container.pop("cluster", None)
    if cluster_dict is None:
        raise ConfigError("invalid config `cluster`: missing; choose one with cluster=local|debug|slurm|...")
    from .config import to_config

    cluster = to_cluster_config(cluster_dict)
    cfg = to_config(container)
    if container.get("out_dir") is None:  # the same naming rule as a plain run, under cluster.output_root
        cfg.out_dir = container["out_dir"] = default_out_dir(cfg, cluster.output_root)
    return cfg, cluster, container


def to_cluster_config(cfg: DictConfig | dict[str, Any]) -> ClusterConfig:
    check_keys(cfg, ClusterConfig, "cluster.")
    merged = OmegaConf.merge(OmegaConf.structured(ClusterConfig), cfg)
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, ClusterConfig)
    return obj


MULTIRUN_FLAGS = ("-m", "--multirun")


def multirun_flag_first(argv: list[str]) -> list[str]:
    """argv with `-m` / `--multirun` moved before the overrides: Hydra's parser takes it only there, so that
    `submit.py cluster=slurm -m ipc=10,50` works as typed."""
    head, rest = argv[:1], argv[1:]
    flags = [a for a in rest if a in MULTIRUN_FLAGS]
    return head + flags[:1] + [a for a in rest if a not in MULTIRUN_FLAGS] if flags else list(argv)
