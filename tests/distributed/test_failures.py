"""How the command line fails (docs/failures.md), each as a real launch of `python -m csdm_dist.distill` (or
torchrun) in a child process on a tiny fake Fashion-MNIST-LT:

- a configuration or input error is one line on stderr (from rank 0 only under torchrun), exit 2, and no
  traceback unless HYDRA_FULL_ERROR=1; a refused run leaves its out_dir byte for byte as it was;
- Ctrl-C (SIGINT) prints one line naming the step and where the same command resumes, exit 130, and it does;
- a stop on request (SIGUSR1) checkpoints and exits 3, and the same command finishes the run.
"""
from __future__ import annotations

import hashlib
import json
import re
import signal
import time
from pathlib import Path

import pytest

from csdm_dist.config import to_config
from csdm_dist.errors import EXIT_INPUT, EXIT_INTERRUPTED, EXIT_STOPPED
from data_prep.build import build_dataset
from fakes import write_fake_fashion_mnist
from test_distributed import TINY, Launch, compose_cfg, distill_cmd, run_ok, tail

SLOW = ["distill.iterations=100000", "distill.checkpoint_every=2", "distill.keep_checkpoints=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("fmnist")
    write_fake_fashion_mnist(root / "raw", n_per_class=30, num_classes=10, seed=0)
    over = [f"dataset.raw_root={root / 'raw'}", f"dataset.data_root={root / 'data'}", "dataset.imbalance_factor=10",
            "dataset.n_max=null", "dataset.val_per_class=0", "dataset.samples_per_shard=40"]
    build_dataset(to_config(compose_cfg(over)).dataset)
    return over


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def launch_fails(cmd: list[str], log: Path, code: int, env: dict | None = None) -> str:
    launch = Launch(cmd, log, env)
    rc = launch.wait()
    assert rc == code, f"exit status {rc}, expected {code}: {' '.join(cmd)}{tail(log)}"
    return launch.output()


def test_input_errors_are_one_line(data, tmp_path):
    out = tmp_path / "run"
    common = data + TINY + ["distill.iterations=2", f"out_dir={out}"]
    run_ok(distill_cmd(common), tmp_path / "first.log")
    before = snapshot(out)
    text = launch_fails(distill_cmd(common + ["method.kernel.bandwidth=2.0"]), tmp_path / "refused.log", EXIT_INPUT)
    assert snapshot(out) == before  # no .hydra/, no log line, no TensorBoard file
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "another configuration" in errors[0] and "Traceback" not in text, text

    text = launch_fails(distill_cmd(data + TINY + ["ipc=0", f"out_dir={tmp_path / 'bad'}"]), tmp_path / "ipc.log",
                        EXIT_INPUT)
    assert text.strip().splitlines()[-1].startswith("error: invalid config `ipc`") and "Traceback" not in text, text
    assert not (tmp_path / "bad").exists()
    text = launch_fails(distill_cmd(data + TINY + ["ipc=0"]), tmp_path / "full.log", EXIT_INPUT,
                        env={"HYDRA_FULL_ERROR": "1"})
    assert "Traceback" in text and "invalid config `ipc`" in text


def test_input_errors_under_torchrun_print_once(data, tmp_path):
    cmd = distill_cmd(data + TINY + ["+distill.iteratons=5", f"out_dir={tmp_path / 'run'}"], nproc=2)
    text = launch_fails(cmd, tmp_path / "torchrun.log", 1)  # torchrun's own status for a failed worker
    errors = [line for line in text.splitlines() if "error: unknown config key" in line]
    assert len(errors) == 1 and "did you mean `distill.iterations`" in errors[0], text
    assert not re.search(r'File ".*csdm_dist', text), text  # no worker traceback (torchrun prints its own)


def wait_for_checkpoint(out: Path, launch: Launch, timeout: float = 120) -> None:
    t0 = time.time()
    while not list((out / "checkpoints").glob("step-*/meta.json")):
        assert launch.proc.poll() is None, f"exited early{tail(launch.log)}"
        assert time.time() - t0 < timeout, f"no checkpoint after {timeout} s{tail(launch.log)}"
        time.sleep(0.2)


@pytest.mark.parametrize("sig,code,said", [(signal.SIGINT, EXIT_INTERRUPTED, r"interrupted at step (\d+); the same "
                                                                              r"command resumes from step (\d+)"),
                                           (signal.SIGUSR1, EXIT_STOPPED, r"stopped at step (\d+) on request")])
def test_interrupt_and_stop_say_where_to_resume(data, tmp_path, sig, code, said):
    out = tmp_path / "run"
    cmd = distill_cmd(data + TINY + SLOW + [f"out_dir={out}"])
    launch = Launch(cmd, tmp_path / "cut.log")
    wait_for_checkpoint(out, launch)
    launch.proc.send_signal(sig)
    rc = launch.wait()
    text = launch.output()
    assert rc == code, f"exit status {rc}{tail(launch.log)}"
    m = re.search(said, text)
    assert m and "Traceback" not in text, text[-3000:]
    meta = sorted((out / "checkpoints").glob("step-*/meta.json"))[-1]
    resume_at = json.loads(meta.read_text())["step"]
    if sig == signal.SIGINT:
        assert int(m.group(2)) == resume_at  # the step it names is the newest complete checkpoint
    # the same command, with a reachable end, resumes from there
    again = distill_cmd(data + TINY + [f"distill.iterations={resume_at + 2}", "distill.checkpoint_every=2",
                                       "distill.keep_checkpoints=1", "evaluate=false", f"out_dir={out}"])
    run_ok(again, tmp_path / "again.log")
    assert json.loads((out / "results.json").read_text())["timing"]["steps"] == resume_at + 2
    assert "resumed from" in (tmp_path / "again.log").read_text()
