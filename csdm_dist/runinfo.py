"""What a run records about itself: config hash, git commit, hardware, peak memory."""
from __future__ import annotations

import hashlib
import json
import platform
import resource
import subprocess
from dataclasses import asdict
from pathlib import Path

import torch

from .config import Config

# keys that change neither the data nor the distilled images: excluded from the hash that resume checks
_NOT_HASHED = {"resume", "overwrite", "reevaluate", "force_memory", "evaluate", "baseline", "eval", "device", "out_dir"}
_NOT_HASHED_DISTILL = {"iterations", "log_every", "image_every", "checkpoint_every", "keep_checkpoints", "syn_chunk"}


def config_hash(cfg: Config) -> str:
    d = {k: v for k, v in asdict(cfg).items() if k not in _NOT_HASHED}
    if cfg.labels.kind == "hard":  # the soft-label keys change nothing of a hard-label run (its hash as before them)
        for key in ("labels", "teacher"):
            d.pop(key)
    # a schedule makes the lr of every step depend on the budget: then `iterations` shapes the result too
    skip = _NOT_HASHED_DISTILL - ({"iterations"} if cfg.distill.lr_schedule != "constant" else set())
    d["distill"] = {k: v for k, v in d["distill"].items() if k not in skip}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    return out.stdout.strip() if out.returncode == 0 else "unknown (not a git checkout)"


def hardware(device: torch.device) -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def peak_memory_mb(device: torch.device) -> dict:
    out = {"host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["device_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out
