"""Checkpoints: `<run>/checkpoints/step-NNNNNN/` holds one `rank-RRR.pt` per rank and `meta.json`, written by
rank 0 after every rank has saved, so a folder with `meta.json` is complete. Only complete folders are resumed.
Rank 0 keeps the newest `keep` folders.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def save(root: Path, step: int, rank: int, state: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    path = step_dir(root, step)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f"rank-{rank:03d}.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(path / f"rank-{rank:03d}.pt")
    dist.barrier()
    if rank == 0:
        (path / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=1))
        for old in complete_steps(root)[:-keep]:
            shutil.rmtree(step_dir(root, old))
    dist.barrier()
    return path


def complete_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "meta.json").is_file()]
    return sorted(steps)


def latest(root: Path) -> Optional[int]:
    steps = complete_steps(root)
    return steps[-1] if steps else None


def load(root: Path, step: int, rank: int, expect: dict[str, Any]) -> dict[str, Any]:
    """This rank's state at `step`, after checking the run metadata matches (`expect`: key -> value)."""
    path = step_dir(root, step)
    meta = json.loads((path / "meta.json").read_text())
    for key, want in expect.items():
        if meta.get(key) != want:
            raise ValueError(f"checkpoint {path} has {key}={meta.get(key)!r} but this run has {want!r}; resume with "
                             f"the same settings, or start afresh with resume=false or another out_dir")
    return torch.load(path / f"rank-{rank:03d}.pt", map_location="cpu", weights_only=True)
