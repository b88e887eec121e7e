"""The run directory: what it holds, whether this run may use it, and the records a started run writes.

Rules (docs/failures.md):
- a folder without a run in it (no run.json, results.json, distilled.pt, checkpoints/ or tb/) is used as it is;
- a run of the same configuration (config hash) is resumed (`resume=true`), or reported as finished when it is;
- a run of another configuration, or any run under `resume=false`, is refused, unless `overwrite=true`, which
  moves the old run aside to `<out_dir>.old-<time>` (nothing is deleted);
- nothing is written into the folder before that decision, and the records (run.json, config.yaml,
  overrides.yaml, the log) only once the run has started, so a refused or failed start leaves the folder as it was;
- one process at a time: rank 0 holds a lock beside the folder (`.<name>.lock`, an flock) from the decision to
  the end of the run, so a second process given the same out_dir is refused rather than writing into the same
  files or moving the live run aside. The OS drops the lock when its process dies; the file goes with the run.

Only rank 0 looks and acts; the others take its decision (one broadcast).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist

from . import checkpoint, files
from .errors import RunDirError, read_json_record

RUN_RECORD = "run.json"
RESULTS = "results.json"
_RUN_MARKERS = (RUN_RECORD, RESULTS, "distilled.pt", "checkpoints", "tb")

FRESH, RESUME, FINISHED = "fresh", "resume", "finished"


@dataclass(frozen=True)
class RunDirState:
    """What a run directory holds (rank 0's view of the filesystem)."""
    is_run: bool
    config_hash: Optional[str]  # of the run in it (run.json, else results.json, else its newest checkpoint)
    steps: Optional[int]  # newest complete checkpoint
    results: Optional[dict]  # results.json, if the run finished


def _read_json(path: Path) -> Optional[dict]:
    return read_json_record(path, "the run directory is damaged: move it away or pass overwrite=true to move it "
                                  "aside", RunDirError)


def inspect(run_dir: Path) -> RunDirState:
    if not run_dir.is_dir() or not any((run_dir / m).exists() for m in _RUN_MARKERS):
        return RunDirState(False, None, None, None)
    record, results = _read_json(run_dir / RUN_RECORD), _read_json(run_dir / RESULTS)
    steps = checkpoint.latest(run_dir / "checkpoints")
    ckpt = _read_json(checkpoint.step_dir(run_dir / "checkpoints", steps) / "meta.json") if steps is not None else None
    found = [d.get("config_hash") for d in (record, results, ckpt) if d]
    return RunDirState(True, next((h for h in found if h), None), steps, results)


def aside_path(run_dir: Path, now: Optional[float] = None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    path = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    k = 1
    while path.exists():
        path, k = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{k}"), k + 1
    return path


def decide(run_dir: Path, state: RunDirState, config_hash: str, resume: bool, overwrite: bool,
           iterations: int) -> str:
    """FRESH, RESUME or FINISHED for this run in `run_dir`, or a RunDirError saying why not and what to do.
    FRESH with `state.is_run` means: move the old run aside first (overwrite=true)."""
    if not state.is_run:
        return FRESH
    what = ("a finished run" if state.results is not None else
            f"a run at step {state.steps}" if state.steps is not None else "a started run")
    if state.config_hash != config_hash or not resume:
        if overwrite:
            return FRESH
        aside = f"pass overwrite=true to move it aside to {run_dir}.old-<time> and start afresh"
        if state.config_hash != config_hash:
            theirs = state.config_hash or "unknown"
            raise RunDirError(f"out_dir {run_dir} holds {what} of another configuration (config hash {theirs}, this "
                              f"run {config_hash}); nothing was written. Choose another out_dir, or {aside}")
        raise RunDirError(f"out_dir {run_dir} holds {what} of this configuration and resume=false would start "
                          f"afresh in it; nothing was written. Drop resume=false to continue it, or {aside}")
    if state.steps is not None and state.steps > iterations:
        raise RunDirError(f"out_dir {run_dir} holds a run at step {state.steps}, past distill.iterations="
                          f"{iterations}; pass distill.iterations>={state.steps}, or use another out_dir")
    if state.results is not None and state.results.get("timing", {}).get("steps") == iterations:
        return FINISHED
    return RESUME


def lock_path(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.lock"


@contextlib.contextmanager
def exclusive(run_dir: Path, log: logging.Logger | None = None):
    """Hold run_dir's lock (lock_path) while the block runs, or raise RunDirError naming the process that holds it
    (or why the lock cannot be taken). The file is removed on the way out, and so are the folders above run_dir
    that this made when the run never started; a file left by a killed process holds no lock and is taken over.
    On a file system without flock (Lustre mounted without it, say) the run goes on unguarded, and says so."""
    path = lock_path(run_dir)
    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]  # deepest first
    fd = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _lock(path, run_dir)
        if fd is None:
            (log or logging.getLogger(__name__)).warning(
                "cannot lock %s (the file system has no flock): a second process given out_dir %s would not be "
                "refused; run one at a time", path, run_dir)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    except (OSError, RunDirError) as e:
        _release(path, fd, run_dir, made)
        if isinstance(e, RunDirError):
            raise
        raise RunDirError(f"cannot take the lock {path} of out_dir {run_dir} ({type(e).__name__}: {e}); the folder "
                          "that holds out_dir must be writable and have space: fix that, or choose another "
                          "out_dir") from e
    try:
        yield path if fd is not None else None
    finally:
        _release(path, fd, run_dir, made)


def _release(path: Path, fd: int | None, run_dir: Path, made: list[Path]) -> None:
    if fd is not None:
        if _holds(path, fd):  # never another process's file
            path.unlink(missing_ok=True)
        os.close(fd)
    if not run_dir.exists():
        for d in made:  # a start that went no further leaves no folders behind
            try:
                d.rmdir()
            except OSError:
                break


def _holds(path: Path, fd: int) -> bool:
    """Whether `path` is still the file open at `fd` (not removed, nor replaced by another's)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _lock(path: Path, run_dir: Path) -> int | None:
    """An open descriptor of `path` holding its flock; None where the file system has no flock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(f"out_dir {run_dir} is in use by another process (pid {holder}, which holds {path}); "
                              "nothing was written. Wait for that run to end (or stop it), or choose another "
                              f"out_dir. If that process is gone (its node failed, and a network file system kept "
                              f"its lock), delete {path}") from None
        except OSError as e:
            os.close(fd)  # the file stays: a process on a mount with flock may hold it
            if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                return None
            raise
        if _holds(path, fd):
            return fd
        os.close(fd)  # its last holder removed the file between our open and our lock: lock the new one


def prepare(run_dir: Path, config_hash: str, resume: bool, overwrite: bool, iterations: int, rank: int,
            log: logging.Logger, held: contextlib.ExitStack) -> tuple[str, RunDirState]:
    """Rank 0 takes run_dir's lock (kept in `held` until the caller's run ends), inspects and decides (moving an
    old run aside under overwrite=true); every rank gets the decision or the same RunDirError. Collective over the
    default group."""
    payload: list[Any] = [None]
    if rank == 0:
        try:
            held.enter_context(exclusive(run_dir, log))
            payload[0] = claim(run_dir, config_hash, resume, overwrite, iterations, log)
        except RunDirError as e:
            payload[0] = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], str):
        raise RunDirError(payload[0])
    action, state = payload[0]
    return action, state


def write_records(run_dir: Path, config: dict, config_hash: str, overrides: list[str], status: str) -> None:
    """run.json (identity and status), config.yaml (the resolved config) and overrides.yaml (the command line)."""
    from omegaconf import OmegaConf

    run_dir.mkdir(parents=True, exist_ok=True)
    write_status(run_dir, config_hash, status)
    files.write_text(run_dir / "config.yaml", OmegaConf.to_yaml(config))
    files.write_text(run_dir / "overrides.yaml", OmegaConf.to_yaml(list(overrides)))


def write_status(run_dir: Path, config_hash: str, status: str) -> None:
    path = run_dir / RUN_RECORD
    old = _read_json(path) or {}
    record = {"config_hash": config_hash, "status": status, "created": old.get("created", time.time()),
              "updated": time.time()}
    files.write_json(path, record)


def claim(run_dir: Path, config_hash: str, resume: bool, overwrite: bool, iterations: int,
          log: logging.Logger) -> tuple[str, RunDirState]:
    """Inspect and decide; a FRESH start over an old run (overwrite=true) moves that run aside first."""
    state = inspect(run_dir)
    action = decide(run_dir, state, config_hash, resume, overwrite, iterations)
    if action == FRESH and state.is_run:
        aside = aside_path(run_dir)
        run_dir.rename(aside)
        log.warning("overwrite=true: moved the old run in %s aside to %s", run_dir, aside)
        state = RunDirState(False, None, None, None)
    return action, state
