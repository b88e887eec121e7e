"""Checkpoints: `<run>/checkpoints/step-NNNNNN/` holds what each rank writes (DeepSpeed's per-rank files) and
`meta.json`, written by rank 0 after every rank has saved, so a folder with `meta.json` is complete. Only complete
folders are resumed. Rank 0 keeps the newest `keep` folders.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch.distributed as dist

from . import files
from .errors import RunDirError

_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir(root: Path, step: int) -> Path:
    return root / tag(step)


def tag(step: int) -> str:
    return f"step-{step:06d}"


def save(root: Path, step: int, rank: int, write: Callable[[Path], None], meta: dict[str, Any], keep: int) -> Path:
    """Every rank calls `write(folder)` for its part; then rank 0 marks the folder complete and prunes.

    A step this run has saved already (a stop request at a checkpoint step) is not written again: it holds the
    same state, and rewriting it in place would leave a folder still marked complete over half-written files if
    the process were killed meanwhile. A folder of the step from another run loses its mark before it is written."""
    path = step_dir(root, step)
    if (path / "meta.json").is_file() and _meta(path).get("config_hash") == meta.get("config_hash"):
        return path
    if rank == 0 and (path / "meta.json").exists():
        (path / "meta.json").unlink()
    dist.barrier()  # every rank sees the folder unmarked before any writes into it
    write(path)
    dist.barrier()
    if rank == 0:
        # meta.json marks the folder complete: it must appear whole or not at all
        files.write_json(path / "meta.json", {**meta, "step": step})
        for old in complete_steps(root, meta.get("config_hash"))[:-keep]:  # never another run's
            shutil.rmtree(step_dir(root, old))
    dist.barrier()
    return path


def complete_steps(root: Path, config_hash: Optional[str] = None) -> list[int]:
    """Steps of the complete checkpoint folders under `root`; with `config_hash`, only those of that run."""
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "meta.json").is_file()]
    if config_hash is not None:
        steps = [s for s in steps if _meta(step_dir(root, s)).get("config_hash") == config_hash]
    return sorted(steps)


def _meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def latest(root: Path) -> Optional[int]:
    steps = complete_steps(root)
    return steps[-1] if steps else None


def check_meta(root: Path, step: int, expect: dict[str, Any], recorded_later: tuple[str, ...] = ()) -> None:
    """Refuse to resume from a checkpoint whose run metadata differs (`expect`: key -> value). A key of
    `recorded_later` that the checkpoint lacks (written before the key was recorded) is not checked."""
    path = step_dir(root, step)
    meta = _meta(path)
    for key, want in expect.items():
        if key in recorded_later and key not in meta:
            continue
        if meta.get(key) != want:
            raise RunDirError(f"checkpoint {path} has {key}={meta.get(key)!r} but this run has {want!r}; resume "
                              f"with the same settings, or move the old run aside with overwrite=true, or use "
                              f"another out_dir")
