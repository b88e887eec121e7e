"""Files that appear whole or not at all.

Every record a run or a benchmark writes (distilled.pt, results.json, evaluation records, teachers, the
benchmarks' JSON) goes through `write_atomic`: the content is written to a temporary file beside the target and
renamed onto it, so a process killed mid-write (a time limit, a preemption that outlives its grace period, an
out-of-memory kill, Ctrl-C) leaves the previous file or none, never a truncated one that a resumed run, `--reuse`
or `--merge` would then fail on or lose rows to. The rename is atomic on one POSIX file system; there is no
fsync, so this protects against a killed process, not against losing the machine.

The sha256 by which records name a file (a pool, a teacher, a distilled set) is read here too, in blocks, and
`load_torch` reads a file's hash and its contents through one descriptor, so a record never pairs one file's hash
with another's contents (a teacher retrained, a set distilled further while a run reads it).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch


def write_atomic(path: Path | str, write: Callable[[Path], Any]) -> Any:
    """`write(tmp)` writes the whole file at `tmp`, a name beside `path`; then tmp replaces `path`, and what `write`
    returned is returned. If `write` raises (or the process is interrupted), `path` is left as it was and tmp is
    removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # hidden, and one per process
    try:
        result = write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result


def write_text(path: Path | str, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path | str, obj: Any, indent: int | None = 1) -> None:
    """json.dumps first, so an object that does not serialise raises before anything is written."""
    write_text(path, json.dumps(obj, indent=indent))


def save_torch(obj: Any, path: Path | str) -> str:
    """torch.save(obj) to `path` atomically; returns the sha256 of the bytes written, hashed before the rename, so a
    record names the file this process wrote even if another replaces it afterwards."""
    def write(tmp: Path) -> str:
        torch.save(obj, tmp)
        return file_sha256(tmp)

    return write_atomic(path, write)


def stream_sha256(f: BinaryIO) -> str:
    """sha256 of an open binary file from where it stands to its end, read in 1 MiB blocks."""
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file (pools, teachers and distilled sets can be large: read in blocks, never whole)."""
    with open(path, "rb") as f:
        return stream_sha256(f)


def load_torch(path: Path | str, **load_kwargs: Any) -> tuple[Any, str]:
    """torch.load(path, map_location="cpu", **load_kwargs) and the sha256 of the very bytes loaded: hashed in blocks,
    then loaded, through one open descriptor (however the path is replaced meanwhile). torch.load's own errors pass
    through: each caller knows what the file should have been and says so."""
    with open(path, "rb") as f:
        sha256 = stream_sha256(f)
        f.seek(0)
        return torch.load(f, map_location="cpu", **load_kwargs), sha256
