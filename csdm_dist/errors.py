"""How the entry points fail: input errors as one line, exit codes that tell a stopped run from a finished one.

Exit codes (docs/failures.md):
- 0: finished;
- 1: an unexpected error (its traceback is printed once, by each failing rank);
- 2: a configuration or input error (one line, from rank 0 when every rank has the same error; the other ranks
  wait QUIET_RANK_GRACE_S for it, and print it themselves if rank 0 has not);
- 3: stopped on request (SIGUSR1) at a step boundary, with a checkpoint: the same command resumes;
- 130: interrupted (Ctrl-C): the same command resumes from the newest complete checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

EXIT_ERROR, EXIT_INPUT, EXIT_STOPPED, EXIT_INTERRUPTED = 1, 2, 3, 130
# How long a rank other than 0 waits, on an error every rank meets, before it exits: a launcher (torchrun, srun)
# stops the other ranks as soon as one exits, so a rank that left first would cut rank 0 off before its one line.
# Rank 0 normally fails within this time and the launcher stops the waiting rank; if it has not, the waiting rank
# prints the line itself, so the message is never lost.
QUIET_RANK_GRACE_S = 20.0


class UserError(Exception):
    """Something the user can fix (a config value, a missing or damaged input, a run directory in the way).

    The message says what is wrong and what to do. `same_on_every_rank`: every rank meets it (so only rank 0
    prints it); a rank-local problem, such as one damaged shard, is printed by the rank that meets it."""

    same_on_every_rank = True


class RunDirError(UserError, ValueError):
    """The run directory holds something this run must not touch or mix with."""


def read_json_record(path: Path, what_to_do: str, error: type[UserError] = UserError) -> Optional[dict]:
    """A JSON record a run wrote (results.json, run.json, ...): None when absent; `error` naming the file and
    `what_to_do` when it does not parse."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON ({e}); {what_to_do}") from None


class Interrupted(Exception):
    """Ctrl-C during a run; carries what to tell the user."""

    def __init__(self, message: str):
        super().__init__(message)


def _user_error_types() -> tuple[type[BaseException], ...]:
    from .data.shards import ShardError

    return UserError, ShardError, FileNotFoundError


def _rank_world() -> tuple[int, int]:
    from .dist import launch_rank_world  # torch only once an entry point has failed

    return launch_rank_world()


@contextlib.contextmanager
def one_line_errors(log: logging.Logger) -> Iterator[None]:
    """Around an entry point's body: input errors -> one line on stderr and exit 2 (the traceback only with
    HYDRA_FULL_ERROR=1); Ctrl-C -> one line and exit 130; anything else -> its traceback once, exit 1."""
    try:
        yield
    except (Interrupted, KeyboardInterrupt) as e:
        msg = str(e) if isinstance(e, Interrupted) else "interrupted"
        if _rank_world()[0] == 0:
            print(f"\n{msg}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except _user_error_types() as e:
        full = os.environ.get("HYDRA_FULL_ERROR") == "1"
        every_rank = getattr(e, "same_on_every_rank", False)
        rank, world = _rank_world()
        if full:
            log.exception("rank %d: %s", rank, e)
        else:
            if rank != 0 and every_rank and world > 1:
                time.sleep(QUIET_RANK_GRACE_S)  # let rank 0 say it; the launcher stops this rank when rank 0 exits
            where = "" if rank == 0 else f"(rank {rank}) "
            print(f"error: {where}{e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INPUT) from None
    except Exception:
        log.exception("rank %d failed", _rank_world()[0])
        raise SystemExit(EXIT_ERROR) from None
