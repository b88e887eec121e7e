"""Helpers for tests/slurm: the tiny distillation overrides and `launch/submit.py` run as a user types it."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUBMIT = ROOT / "launch" / "submit.py"
# A distillation small enough for seconds on a CPU (as tests/integration).
TINY = ["ipc=2", "extractor.width=16", "extractor.depth=2", "method.kernel.num_freqs=64", "distill.real_per_class=8",
        "distill.log_every=2", "distill.image_every=0", "evaluate=false", "device=cpu"]
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def submit_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS and not k.startswith("SLURM_")}
    env.update(extra or {})
    return env


def run_submit(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120,
               multirun: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SUBMIT), *(["-m"] if multirun else []), *args]
    return subprocess.run(cmd, env=env or submit_env(), cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout)


def job_id_of(out: subprocess.CompletedProcess) -> str:
    m = re.search(r"submitted job (\d+)", out.stdout)
    assert m, f"no job id in the submit output:\n{out.stdout}\n{out.stderr}"
    return m.group(1)
