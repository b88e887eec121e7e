"""Run directories you can trust (in-process): a refused run changes nothing, starting afresh never mixes two runs,
the default out_dir names what a user sweeps, a finished run is reported rather than redone, typos and runs that
cannot fit are refused at start-up, and a failed start leaves nothing behind. docs/failures.md lists the rules."""
import hashlib
import json
import math
import os
import socket
import statistics
from pathlib import Path

import pytest
import torch

from csdm_dist import checkpoint
from csdm_dist.cluster import register_cluster_configs, split_submit_config
from csdm_dist.config import ConfigError, run_name, to_config
from csdm_dist.errors import RunDirError
from runs import TINY, compose_cfg, distil


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` -> sha256 of its bytes (and so: nothing added, removed or changed)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_refused_run_writes_nothing(data_overrides, tmp_path):
    out = tmp_path / "run"
    common = data_overrides + TINY + ["distill.iterations=3", f"out_dir={out}"]
    distil(common)
    before = snapshot(out)
    assert "run.json" in before and "config.yaml" in before and "distill-rank0.log" in before
    with pytest.raises(RunDirError, match="another configuration .*nothing was written.*overwrite=true"):
        distil(common + ["method.kernel.bandwidth=2.0"])
    assert snapshot(out) == before


def test_an_out_dir_in_use_by_another_process_is_refused(data_overrides, tmp_path):
    """Two processes given one out_dir (a command started twice, a job submitted again while the first runs): the
    second is refused, even with overwrite=true, which would move the live run aside under its feet."""
    from csdm_dist import rundir

    out = tmp_path / "run"
    common = data_overrides + TINY + ["distill.iterations=2", "evaluate=false", f"out_dir={out}"]
    distil(common)
    before = snapshot(out)
    lock = rundir.lock_path(out)
    assert not lock.exists()  # the finished run took its lock file with it
    with rundir.exclusive(out):  # what a live run holds (flock: per open file, so it refuses this process too)
        me = f"{os.getpid()} on {socket.gethostname()}"
        assert lock.read_text() == f"{me}\n"
        for extra in ([], ["distill.iterations=3"], ["resume=false", "overwrite=true"]):
            with pytest.raises(RunDirError, match=rf"out_dir {out} is in use by another process \(pid {me}, "
                                                   rf".*nothing was written.*another out_dir.*delete {lock}"):
                distil(common + extra)
        assert snapshot(out) == before and not list(tmp_path.glob("run.old-*"))
    lock.write_text("12345\n")  # left by a killed process: no one holds it, so it does not block
    _, res = distil(common + ["distill.iterations=3"])
    assert res["timing"]["steps"] == 3 and not lock.exists()


def test_a_file_system_without_locks_runs_unguarded_and_says_so(tmp_path, monkeypatch, caplog):
    import errno
    import logging

    from csdm_dist import rundir

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "flock", no_flock)
    with caplog.at_level(logging.WARNING), rundir.exclusive(tmp_path / "run") as held:
        assert held is None
    assert "cannot lock" in caplog.text and "would not be refused" in caplog.text


def test_a_lock_that_cannot_be_taken_is_a_refusal_and_leaves_no_folders(tmp_path, monkeypatch):
    from csdm_dist import rundir

    deep = tmp_path / "a" / "b" / "run"
    with rundir.exclusive(deep) as held:
        assert held == rundir.lock_path(deep) and held.is_file()
    assert not (tmp_path / "a").exists()  # the run never started: the folders made for the lock go too

    def unwritable(path, run_dir):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(rundir, "_lock", unwritable)  # an out_dir whose parent this user cannot write
    with pytest.raises(RunDirError, match=r"cannot take the lock .*PermissionError.*must be writable"):
        with rundir.exclusive(deep):
            pass
    assert not (tmp_path / "a").exists()


def test_starting_afresh_moves_the_old_run_aside(data_overrides, tmp_path):
    out = tmp_path / "run"
    common = data_overrides + TINY + ["evaluate=false", "distill.checkpoint_every=2", "distill.keep_checkpoints=1",
                                      f"out_dir={out}"]
    distil(common + ["distill.iterations=4"])
    old = snapshot(out)
    with pytest.raises(RunDirError, match="resume=false would start afresh"):
        distil(common + ["distill.iterations=3", "resume=false"])
    assert snapshot(out) == old
    _, res = distil(common + ["distill.iterations=3", "resume=false", "overwrite=true", "seed=1"])
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and snapshot(aside[0]) == old  # the old run, whole and untouched
    assert res["timing"]["steps"] == 3 and checkpoint.complete_steps(out / "checkpoints") == [3]
    assert json.loads((out / "results.json").read_text())["seed"] == 1


def test_pruning_keeps_another_runs_checkpoints(tmp_path):
    import torch.distributed as dist

    from csdm_dist.dist import close_distributed, init_distributed

    def write(meta_hash, step):
        d = checkpoint.step_dir(tmp_path, step)
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"config_hash": meta_hash, "step": step}))

    write("other", 100)
    write("other", 200)
    init_distributed("cpu")
    try:
        assert dist.is_initialized()
        for step in (1, 2, 3):
            checkpoint.save(tmp_path, step, 0, lambda p: p.mkdir(parents=True), {"config_hash": "mine"}, keep=1)
    finally:
        close_distributed()
    assert checkpoint.complete_steps(tmp_path) == [3, 100, 200]
    assert checkpoint.complete_steps(tmp_path, "mine") == [3]


def test_a_saved_step_is_not_rewritten_and_another_runs_step_loses_its_mark_first(tmp_path):
    """A stop request at a checkpoint step saves that step twice; rewriting it in place would leave meta.json over
    half-written files if the second save were killed (then resumed from as complete)."""
    from csdm_dist.dist import close_distributed, init_distributed

    calls = []

    def write(p):
        calls.append(p.name)
        p.mkdir(parents=True, exist_ok=True)
        (p / "model.pt").write_text(f"state {len(calls)}")

    def killed(p):
        (p / "model.pt").write_text("half")
        raise KeyboardInterrupt  # killed mid-write

    init_distributed("cpu")
    try:
        checkpoint.save(tmp_path, 5, 0, write, {"config_hash": "mine"}, keep=1)
        checkpoint.save(tmp_path, 5, 0, killed, {"config_hash": "mine"}, keep=1)  # same run, same step: skipped
        assert calls == ["step-000005"] and (tmp_path / "step-000005" / "model.pt").read_text() == "state 1"
        assert checkpoint.latest(tmp_path) == 5
        with pytest.raises(KeyboardInterrupt):  # another run's step 5: unmarked before it is written
            checkpoint.save(tmp_path, 5, 0, killed, {"config_hash": "other"}, keep=1)
    finally:
        close_distributed()
    assert checkpoint.latest(tmp_path) is None  # half-written: never resumed from


def test_default_out_dir_names_what_is_swept():
    dirs = {to_config(compose_cfg(o)).out_dir for o in
            ([], ["dataset.imbalance_factor=10"], ["ipc=50"], ["seed=1"], ["method=dm"])}
    assert len(dirs) == 5
    cfg = to_config(compose_cfg(["dataset.imbalance_factor=10"]))
    assert cfg.out_dir == "runs/fashion_mnist_lt/csdm-ipc10-if10-f2-seed0" == f"runs/fashion_mnist_lt/{run_name(cfg)}"
    f1 = to_config(compose_cfg(["dataset.imbalance_factor=10", "synthetic.factor=1"]))
    assert f1.out_dir == "runs/fashion_mnist_lt/csdm-ipc10-if10-seed0"  # factor 1 adds nothing
    register_cluster_configs()
    job, _, _ = split_submit_config(compose_cfg(["dataset.imbalance_factor=10", "cluster.output_root=/x"],
                                                name="submit"))
    assert job.out_dir == f"/x/fashion_mnist_lt/{run_name(cfg)}"  # launch/submit.py: the same rule


def test_a_finished_run_is_reported_not_redone(data_overrides, tmp_path, capsys):
    out = tmp_path / "run"
    common = data_overrides + TINY + ["distill.iterations=3", f"out_dir={out}"]
    _, first = distil(common)
    before = snapshot(out)
    capsys.readouterr()
    _, again = distil(common)
    text = capsys.readouterr().out
    assert "finished run" in text and "| csdm |" in text
    assert snapshot(out) == before and again["accuracy"] == first["accuracy"]
    _, redone = distil(common + ["reevaluate=true", "eval.epochs=1"])  # re-evaluate only when asked
    assert redone["timing"]["distill_s"] == first["timing"]["distill_s"]  # the distillation time is the run's
    assert redone["timing"]["step_ms_median"] == first["timing"]["step_ms_median"] > 0  # and so is its step time
    assert redone["config"]["eval"]["epochs"] == 1
    # random real images take no step: their finished run is finished too (it was evaluated again before)
    baseline = data_overrides + TINY + ["method=random", f"out_dir={tmp_path / 'random'}"]
    _, first = distil(baseline)
    before = snapshot(tmp_path / "random")
    capsys.readouterr()
    _, again = distil(baseline + ["eval.epochs=1"])
    text = capsys.readouterr().out
    assert "finished run (0 steps)" in text and "reevaluate=true" in text and "| random |" in text
    assert snapshot(tmp_path / "random") == before and again["accuracy"] == first["accuracy"]


def test_distillation_time_adds_up_over_resumed_segments(data_overrides, tmp_path):
    out = tmp_path / "run"
    common = data_overrides + TINY + ["evaluate=false", "distill.checkpoint_every=3", f"out_dir={out}"]
    distil(common + ["distill.iterations=3"])
    state = torch.load(out / "checkpoints" / "step-000003" / "mp_rank_00_model_states.pt", weights_only=False)
    first = state["client_state"]["elapsed_s"] if "client_state" in state else state["elapsed_s"]
    _, res = distil(common + ["distill.iterations=6"])
    assert res["timing"]["steps"] == 6 and res["timing"]["distill_s"] > first > 0
    state = torch.load(out / "checkpoints" / "step-000006" / "mp_rank_00_model_states.pt", weights_only=False)
    times = (state["client_state"] if "client_state" in state else state)["step_times"]
    assert len(times) == 6 and math.isclose(sum(times), res["timing"]["distill_s"])  # every step of both segments
    assert res["timing"]["step_ms_median"] == pytest.approx(1000 * statistics.median(times))


@pytest.mark.parametrize("override,message", [
    ("+foo=1", "unknown config key `foo`"),
    ("+distill.iteratons=5", r"`distill.iteratons` \(did you mean `distill.iterations`\?\)"),
    ("+method.kernel.bandwith=2", r"did you mean `method.kernel.bandwidth`"),
])
def test_unknown_keys_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        to_config(compose_cfg([override]))


def test_free_form_keys_stay_free():
    cfg = to_config(compose_cfg(["+deepspeed.extra.wall_clock_breakdown=true"]))
    assert cfg.deepspeed.extra == {"wall_clock_breakdown": True}


def test_a_run_that_cannot_fit_is_refused_before_anything(data_overrides, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"memory estimate .* exceeds the .* available.*force_memory=true"):
        distil(data_overrides + TINY + ["ipc=100000", f"out_dir={out}"])
    assert not out.exists()


@pytest.mark.parametrize("bad", [["dataset.data_root=/nonexistent/data"],
                                 ["extractor.mode=pool", "extractor.pool_path=/nonexistent/pool.pt"]])
def test_a_failed_start_leaves_nothing(data_overrides, tmp_path, bad):
    out = tmp_path / "run"
    with pytest.raises((FileNotFoundError, OSError, ValueError)):
        distil(data_overrides + TINY + ["distill.iterations=2", f"out_dir={out}"] + bad)
    assert not out.exists()


def test_tensorboard_holds_the_baseline_and_one_final_grid(data_overrides, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    distil(data_overrides + TINY + ["distill.iterations=3", "distill.image_every=3", f"out_dir={out}"])
    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert {"eval/accuracy", "eval_random/accuracy", "eval_random/few"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Images("synthetic/all")] == [3]
