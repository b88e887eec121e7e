"""The process environment and the parallel layout, in one place.

`init_distributed()` reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), else
those of a SLURM job step (srun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the rendezvous address from
MASTER_ADDR if set, else the job's first node; the port from MASTER_PORT if set, else derived from the job id),
and, when neither is there, makes a world of one: a process group of size 1 over an in-memory store, so the code below
takes one path at every scale. world = replicas x shards (DESIGN.md section 4): ranks
[r * shards, (r + 1) * shards) form replica r's shard group, which splits the real data and the synthetic images
and all-reduces statistics; ranks with the same shard index form a replica group (DeepSpeed's data-parallel group).
"""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _slurm_rank_world(env) -> tuple[str, str] | None:
    """(rank, world size) of a process started by srun, or None outside a SLURM job step."""
    if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        return None  # not inside srun (a batch script's own shell must not join a process group)
    return env["SLURM_PROCID"], env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))


def launch_rank_world(env=os.environ) -> tuple[int, int]:
    """(rank, world size) as the launcher set them (torchrun's RANK / WORLD_SIZE, else a SLURM job step's; a
    process alone: (0, 1)), read before or without joining the process group."""
    if "RANK" in env:
        return int(env["RANK"]), int(env.get("WORLD_SIZE", "1"))
    rank, world = _slurm_rank_world(env) or ("0", "1")
    return int(rank), int(world)


def slurm_environment(env: dict[str, str]) -> dict[str, str] | None:
    """torchrun-style variables for a process started by srun, or None outside a SLURM job step."""
    slurm = _slurm_rank_world(env)
    if slurm is None:
        return None
    out = {"RANK": slurm[0], "WORLD_SIZE": slurm[1], "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    nodes = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", ""))
    out["MASTER_ADDR"] = env.get("MASTER_ADDR") or _first_node(nodes)
    out["MASTER_PORT"] = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return out


def _first_node(nodelist: str) -> str:
    if not nodelist:
        raise RuntimeError("SLURM job step without a node list; set MASTER_ADDR to the rendezvous host")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def keep_freed_host_memory() -> bool:
    """Ask glibc's malloc to keep freed memory instead of returning it to the OS (mallopt).

    A step allocates and frees hundreds of MB to GB of activations; by default glibc serves such blocks with mmap
    and unmaps (or trims) them on free, so every step page-faults them in again (measured on the 2-core CPU:
    millions of faults and over half the step time). No mmap for large blocks, and no trimming of the heap.
    Returns False where the C library is not glibc (nothing to tune there).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("not glibc: host allocator left as it is")
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, -1))  # -1: never trim


def init_distributed(device: str = "auto") -> Runtime:
    """Join (or make) the process group; the device is cuda:LOCAL_RANK when CUDA is used, else the CPU."""
    keep_freed_host_memory()
    if "RANK" not in os.environ and (slurm := slurm_environment(dict(os.environ))) is not None:
        os.environ.update(slurm)  # DeepSpeed and webdataset read these too
    present = [v for v in _TORCHRUN_VARS if v in os.environ]
    if present and len(present) != len(_TORCHRUN_VARS) and "RANK" in present:
        missing = sorted(set(_TORCHRUN_VARS) - set(present))
        raise RuntimeError(f"partial distributed environment: {present} are set but {missing} are not; "
                           "launch with torchrun, or unset them to run as a single process")
    present = present if "RANK" in present else []
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but CUDA is not available; use device=cpu or device=auto")
    backend = "nccl" if use_cuda else "gloo"
    if present:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    else:
        rank, world, local = 0, 1, 0
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        if present:
            dist.init_process_group(backend, rank=rank, world_size=world)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Runtime(rank=rank, world_size=world, local_rank=local, device=dev)


def close_distributed() -> None:
    if dist.is_initialized():
        # objects in reference cycles (a DeepSpeed engine, the distiller) can hold process groups; left to the
        # interpreter's exit, their C++ worker threads were torn down after Python's and aborted a finished run now
        # and then (`terminate called without an active exception`, 3 of 44 two-rank runs on a loaded CPU, 0 of 44
        # with this collection, 2026-12-07)
        gc.collect()
        dist.destroy_process_group()


@dataclass(frozen=True)
class ParallelLayout:
    """Who shares what. Also DeepSpeed's `mpu`: data parallel = the replicas of one synthetic slice."""

    world_size: int
    replicas: int
    shards: int
    replica: int  # which replica group this rank is in
    shard_rank: int  # index of this rank's data / synthetic slice within its replica
    shard_group: object
    replica_group: object

    @classmethod
    def from_world(cls, replicas: int, rank: int, world_size: int) -> "ParallelLayout":
        if world_size % replicas:
            raise ValueError(f"parallel.replicas={replicas} does not divide the world size {world_size}: "
                             f"world = replicas x shards must hold")
        shards = world_size // replicas
        shard_groups = [dist.new_group(list(range(r * shards, (r + 1) * shards))) for r in range(replicas)]
        replica_groups = [dist.new_group(list(range(s, world_size, shards))) for s in range(shards)]
        return cls(world_size, replicas, shards, rank // shards, rank % shards,
                   shard_groups[rank // shards], replica_groups[rank % shards])

    # --- the mpu interface DeepSpeed asks for -----------------------------------------------------------
    def get_data_parallel_group(self):
        return self.replica_group

    def get_data_parallel_world_size(self) -> int:
        return self.replicas

    def get_data_parallel_rank(self) -> int:
        return self.replica

    def get_model_parallel_group(self):
        return self.shard_group

    def get_model_parallel_world_size(self) -> int:
        return self.shards

    def get_model_parallel_rank(self) -> int:
        return self.shard_rank


def all_reduce_sum(t: Tensor, group) -> Tensor:
    """Sum over the group, returned as a new tensor (no autograd)."""
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def global_sum_local_grad(t: Tensor, group) -> Tensor:
    """Value: the sum of `t` over the group. Gradient: flows to the local `t` only (straight-through).

    With the loss evaluated identically on every rank, each rank gets the exact gradient for its own inputs, so
    no gradient is communicated.
    """
    return t + (all_reduce_sum(t, group) - t.detach())
