"""Smoke tests of benchmarks/speed.py and gpu.sh, so they cannot silently rot: one tiny CPU step, no timing checks.

Run: .venv/bin/python -m pytest tests/unit/test_benchmarks.py -q
"""
import json
import math
import statistics
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import speed  # noqa: E402

TINY = ["extractor.width=16", "distill.real_per_class=8", "method.kernel.num_freqs=32"]


def test_speed_measure_runs_one_tiny_step():
    r = speed.measure("cpu", steps=1, warmup=0, extra=TINY)
    assert r["device"] == "cpu" and r["target_ratio"] == speed.TARGET["cpu"]
    for key in ("step_s", "floor_s", "ratio", "real_images_per_s"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert set(speed.PHASES) <= set(r["phases_ms"])
    assert r["real_images_per_step"][0] > 0
    assert r["peak_memory"]["step"]["host_peak_rss_mb"] > 0


def test_common_distiller_for_each_real_source_and_its_timed_step(tmp_path):
    """The worker pieces of scale.py, features.py and distributed.py: images or features, one timed step."""
    from common import PHASES, distiller_for_source, timed_step

    from csdm_dist.dist import close_distributed, init_distributed

    base = ["dataset=fashion_mnist_lt", "device=cpu", "ipc=2", "extractor.depth=2", *TINY]
    rt = init_distributed("cpu")
    try:
        for source in ("images", "features"):
            (tmp_path / source).mkdir()
            d = distiller_for_source(base, tmp_path / source, rt, source, counts=[12, 6, 4, 3, 2, 2, 2, 1, 1, 1])
            assert d.real.counts.tolist() == [12, 6, 4, 3, 2, 2, 2, 1, 1, 1] and len(d.real.ids) == 34
            assert (d.cfg.real_source == "features") == (source == "features")
            assert (d.real.features is not None) == (source == "features")
            assert (tmp_path / source / "pool.pt").is_file() == (source == "features")
            d.timer.enabled = True
            wall, phases, out = timed_step(d, 0)
            assert wall > 0 and set(phases) == set(PHASES) and all(v >= 0 for v in phases.values())
            assert sum(phases.values()) <= wall * 1.01 and phases["syn_backward"] > 0 and out["real_images"] > 0
    finally:
        close_distributed()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_speed_cuda_without_cuda_fails_loudly():
    with pytest.raises(SystemExit, match="CUDA is not available"):
        speed.main(["--device", "cuda", "--wait-idle", "0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_gpu_script_without_cuda_fails_loudly(tmp_path):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(script), str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "CUDA is not available" in proc.stderr
    assert not (tmp_path / "out" / "speed.json").exists()


def test_quality_aggregate_over_seeds_and_single_seed():
    import quality

    def seed(s, mean, std):
        return {"seed": s, "mean": mean, "std": std, "many": mean + 1, "medium": mean - 1, "few": mean,
                "distill_s": 10.0 * (s + 1), "eval_s": 1.0}

    one = quality.aggregate([seed(0, 80.0, 0.3)])
    assert one["mean"] == 80.0 and one["std"] == 0.3 and one["std_over"] == "evaluation repeats"
    two = quality.aggregate([seed(0, 80.0, 0.3), seed(1, 82.0, 0.1)])
    assert two["mean"] == 81.0 and two["many"] == 82.0 and two["distill_s"] == 15.0
    assert math.isclose(two["std"], math.sqrt(2.0)) and two["std_over"] == "seeds" and two["num_seeds"] == 2


def test_quality_paired_interval_is_the_t_interval_of_the_mean_difference():
    import quality

    assert quality.paired_interval([1.5]) is None  # one paired seed: no interval
    lo, hi = quality.paired_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(2) = 4.303
    assert math.isclose(lo, 2 - 4.303 / math.sqrt(3)) and math.isclose(hi, 2 + 4.303 / math.sqrt(3))
    lo, hi = quality.paired_interval([0.0, 1.0] * 20)  # 39 degrees of freedom: the normal quantile
    assert math.isclose(hi - 0.5, 1.96 * statistics.stdev([0.0, 1.0] * 20) / math.sqrt(40))
    lo, hi = quality.paired_interval([0.7, 0.7, 0.7])  # no spread, no width
    assert math.isclose(lo, 0.7) and lo == hi


SETTINGS = {"iterations": 200, "factor": 2, "init": "mix", "lr": 0.03, "lr_schedule": "constant",
            "extractor": "random", "eval": {"protocol": "dm", "arch": "convnet", "epochs": 300, "repeats": 3,
                                             "split": "val"}}


def test_quality_rows_report_csdm_paired_margins_settings_and_curves():
    import quality

    def cell(method, means, order="hardtail"):
        seeds = [{"seed": k, "mean": m, "std": 0.1, "many": m, "medium": m, "few": m - 5, "distill_s": 1.0,
                  "eval_s": 1.0, "at_steps": {"100": m - 2, "200": m}, "settings": SETTINGS}
                 for k, m in enumerate(means)]
        return quality.cell_row(order, 10.0, 10, method, "hard", "convnet", seeds)

    rows = [cell("dm", [79.0, 79.5]), cell("ncfm", [80.0, 81.0]), cell("csdm", [80.5, 80.9])]
    assert rows[2]["seeds"] == [0, 1] and rows[2]["accuracy"] == [80.5, 80.9] and rows[2]["few"] == 75.7
    assert rows[2]["accuracy_at_steps"] == {"100": 78.7, "200": 80.7} and rows[2]["labels"] == "hard"
    args = type("Args", (), {"seeds": [0, 1], "labels": "hard", "split": "val"})
    table = quality.markdown(rows, args, "full", ["synthetic.factor=2"])
    assert "### hardtail class order, IPC 10, evaluated on convnet" in table and "hard labels, val split" in table
    assert "Cross-architecture" not in table  # one network: no cross-architecture table
    assert "| 10 | 79.25 +- 0.35 | 80.50 +- 0.71 | 80.70 +- 0.28 |" in table
    assert ("IF 10: csdm - ncfm = +0.20 (per seed: 0 +0.50, 1 -0.10; 95 % CI -3.61 to +4.01); "
            "csdm - dm = +1.45 (per seed: 0 +1.50, 1 +1.40; 95 % CI +0.81 to +2.09)" in table)
    assert "200 steps, factor 2, init mix" in table and "| 10 | csdm | 78.70 | 80.70 |" in table
    assert "Per-class recall" not in table  # these seeds recorded no per-class recall: no table
    mixed = [dict(s, settings={**SETTINGS, "factor": 1}) if s["seed"] else s for s in rows[0]["per_seed"]]
    with pytest.raises(SystemExit, match="different settings"):
        quality.cell_row("hardtail", 10.0, 10, "dm", "hard", "convnet", mixed)


def test_quality_refuses_a_cell_whose_seeds_ran_under_different_configs():
    import quality

    cfg = {"seed": 0, "out_dir": "runs/a/seed0", "dataset": {"data_root": "/a", "imbalance_factor": 100.0},
           "distill": {"iterations": 1000, "real_chunk": 2048, "syn_chunk": None},
           "eval": {"at_steps": [], "epochs": 300}}
    same = {**cfg, "seed": 1, "out_dir": "runs/b/seed1", "dataset": {"data_root": "/b", "imbalance_factor": 100.0},
            "eval": {"at_steps": [100], "epochs": 300}}
    # seed, paths, the extra evaluation points and null keys are not part of what a seed measures; any other key is
    assert quality.setup_of(cfg) == quality.setup_of(same) == {
        "dataset.imbalance_factor": 100.0, "distill.iterations": 1000, "distill.real_chunk": 2048, "eval.epochs": 300}
    other = {**cfg, "distill": {"iterations": 1000, "real_chunk": 512}}  # a key settings_of does not list

    def seed(k, c):
        return {"seed": k, "mean": 80.0, "std": 0.1, "many": 80.0, "medium": 80.0, "few": 75.0, "distill_s": 1.0,
                "eval_s": 1.0, "at_steps": {}, "settings": SETTINGS, "setup": None if c is None else
                quality.setup_of(c)}

    row = quality.cell_row("natural", 100.0, 10, "csdm", "hard", "convnet", [seed(0, cfg), seed(1, same)])
    assert row["seeds"] == [0, 1]
    # a seed tabulated before setups were recorded is checked by its settings only
    assert quality.cell_row("natural", 100.0, 10, "csdm", "hard", "convnet", [seed(0, None), seed(1, other)])
    with pytest.raises(SystemExit, match=r"different configs \(distill\.real_chunk differ\); rerun the older seeds"):
        quality.cell_row("natural", 100.0, 10, "csdm", "hard", "convnet", [seed(0, cfg), seed(1, other)])
    # a key that an older seed lacks (made before the key existed) is fine at its default, and not elsewhere
    default = quality.default_setup()["eval.hard_weight"]
    for value, ok in ((default, True), (default + 0.5, False)):
        newer = {**cfg, "eval": {**cfg["eval"], "hard_weight": value}}
        assert quality.setup_differences([seed(0, cfg), seed(1, newer)]) == ([] if ok else ["eval.hard_weight"])
    # the soft track: seeds labelled by two different teacher files (trained again at the same path) do not pool
    soft = [{**seed(k, cfg), "teacher_sha256": t} for k, t in ((0, "a" * 64), (1, "a" * 64), (2, None))]
    assert quality.cell_row("natural", 100.0, 10, "csdm", "soft", "convnet", soft)["seeds"] == [0, 1, 2]
    soft[1]["teacher_sha256"] = "b" * 64
    with pytest.raises(SystemExit, match=r"labelled by different teacher files \(sha256 aaaaaaaaaaaa, bbbbbbbbbbbb\)"):
        quality.cell_row("natural", 100.0, 10, "csdm", "soft", "convnet", soft)


def test_quality_pairs_the_few_group_by_seed_and_tables_per_class_recall_by_name_or_index():
    import quality

    def cell(method, few, recall, names=("Bag", "Coat", "Shirt")):
        seeds = [{"seed": k, "mean": 80.0, "std": 0.1, "many": 90.0, "medium": 80.0, "few": f, "distill_s": 1.0,
                  "eval_s": 1.0, "at_steps": {}, "settings": SETTINGS, "per_class": r, "class_names": names}
                 for k, (f, r) in enumerate(zip(few, recall))]
        return quality.cell_row("hardtail", 100.0, 1, method, "hard", "convnet", seeds)

    rows = [cell("dm", [50.0, 60.0], [[90.0, 70.0, 20.0], [92.0, 66.0, 40.0]]),
            cell("csdm", [56.0, 59.0], [[91.0, 62.0, 50.0], [93.0, 64.0, 45.0]])]
    args = type("Args", (), {"seeds": [0, 1], "labels": "hard", "split": "test"})
    table = quality.markdown(rows, args, "full", [])
    assert "- IF 100, few group: csdm - dm = +2.50 (per seed: 0 +6.00, 1 -1.00; 95 % CI -41.97 to +46.97)" in table
    assert "| IF | method | Bag | Coat | Shirt |" in table
    assert "| 100 | dm | 91.0 | 68.0 | 30.0 |" in table and "| 100 | csdm | 92.0 | 63.0 | 47.5 |" in table
    rows[0]["per_seed"][1]["class_names"] = None  # a run from before names were recorded: indices, said so
    table = quality.markdown(rows, args, "full", [])
    assert "did not record class names" in table and "| IF | method | 0 | 1 | 2 |" in table


def test_quality_merge_combines_cells_seed_by_seed_and_refuses_another_protocol(tmp_path, capsys):
    import quality

    def seed(k, mean, date=None, settings=SETTINGS):
        s = {"seed": k, "mean": mean, "std": 0.1, "many": mean, "medium": mean, "few": mean - 10, "distill_s": 1.0,
             "eval_s": 1.0, "at_steps": {}, "settings": settings}
        return s if date is None else {**s, "date": date}

    def row(order, method, seeds, date=None):
        r = quality.cell_row(order, 100.0, 10, method, "hard", "convnet", seeds)
        return r if date is None else {**r, "date": date}

    results = tmp_path / "quality.json"
    args, extra = quality.parse_args(["--seeds", "1", "2", "--results", str(results), "--merge"])
    budget = quality.settings_overrides(args, "full")
    assert "distill.iterations=1000" in budget and "eval.epochs=300" in budget
    previous = {"mode": "full", "split": "test", "labels": "hard", "extra_overrides": [], "date": "2026-12-01",
                "settings": budget + ["eval.at_steps=[100,200]"],  # an earlier curve: the same budget
                "rows": [row("natural", "csdm", [seed(0, 84.0), seed(1, 83.0)]),
                         row("hardtail", "dm", [seed(0, 82.0), seed(1, 70.0)], date="2026-11-30")]}
    new = [row("hardtail", "dm", [seed(1, 81.0, "2026-12-02"), seed(2, 83.0, "2026-12-02")], date="2026-12-02"),
           row("hardtail", "csdm", [seed(1, 84.0, "2026-12-02")], date="2026-12-02")]
    merged = quality.merge_rows(previous, new, args, "full", extra)
    assert [(r["order"], r["method"], r["seeds"], r["accuracy"]) for r in merged] == [
        ("natural", "csdm", [0, 1], [84.0, 83.0]),  # not remade: kept
        ("hardtail", "dm", [0, 1, 2], [82.0, 81.0, 83.0]),  # seed 1 remade, seeds 0 and 2 from each report
        ("hardtail", "csdm", [1], [84.0])]  # new
    assert merged[1]["mean"] == 82.0 and merged[1]["few"] == 72.0 and merged[1]["std_over"] == "seeds"
    assert [s["date"] for s in merged[1]["per_seed"]] == ["2026-11-30", "2026-12-02", "2026-12-02"]
    assert merged[0]["date"] == "2026-12-01" and merged[1]["date"] == "2026-12-02"
    table = quality.markdown(merged, args, "full", extra)
    assert "| 100 | dm (seeds 0, 1, 2) | 82.00 +- 1.00 |" in table and "each cell's distillation seeds" in table
    assert "IF 100: csdm - dm = +3.00 (per seed: 1 +3.00)" in table  # the mean over the seeds both have
    assert "IF 100: csdm - dm = +3.00 (per seed: 1 +3.00)\n" in table and "- IF 100, few group: csdm" in table
    unpaired = {(100.0, m): quality.cell_row("natural", 100.0, 10, m, "hard", "convnet", [seed(k, 80.0)])
                for m, k in (("csdm", 0), ("dm", 1))}
    assert quality.margin(unpaired, 100.0, ["csdm", "dm"]) == ""  # no seed in common: no margin, no empty line
    for change in [{"split": "val"}, {"labels": "soft"}, {"extra_overrides": ["synthetic.factor=1"]},
                   {"settings": ["distill.iterations=500" if s.startswith("distill.") else s for s in budget]}]:
        with pytest.raises(SystemExit, match=f"--merge: .*{next(iter(change))}"):
            quality.merge_rows({**previous, **change}, new, args, "full", extra)
    other = [seed(0, 82.0, settings={**SETTINGS, "factor": 1})]  # an earlier seed made with other settings
    with pytest.raises(SystemExit, match="different settings"):
        quality.merge_rows({**previous, "rows": [row("hardtail", "dm", other)]}, new, args, "full", extra)
    with pytest.raises(SystemExit):
        quality.parse_args(["--merge"])
    assert "--merge keeps the rows of the --results JSON: give --results" in capsys.readouterr().err


def test_quality_merges_into_the_table_as_it_is_at_the_end_and_takes_turns(tmp_path):
    """The --results file is read again, under a lock, when an invocation ends: cells another invocation merged
    meanwhile are kept, a writer waits for the lock, and a table that appeared meanwhile is refused without
    --merge (the cells stay in the out dir)."""
    import threading

    import quality

    def row(method, seeds):
        return {**quality.cell_row("natural", 100.0, 10, method, "hard", "convnet", [
            {"seed": k, "mean": m, "std": 0.1, "many": m, "medium": m, "few": m, "distill_s": 1.0, "eval_s": 1.0,
             "at_steps": {}, "settings": SETTINGS, "date": "2026-12-07"} for k, m in seeds]), "date": "2026-12-07"}

    results = tmp_path / "results" / "table.json"
    args, extra = quality.parse_args(["--results", str(results), "--merge", "--if", "100"])

    def report_of(rows, teachers, merged):
        return "table", {"mode": "full", "split": "test", "labels": "hard", "extra_overrides": extra,
                         "settings": quality.settings_overrides(args, "full"), "date": "2026-12-07", "rows": rows,
                         **merged}

    def write(path, table, report):
        path.write_text(json.dumps(report))

    # another invocation merged a dm cell after this one started (when the file did not exist yet)
    results.parent.mkdir()
    write(results, *report_of([row("dm", [(0, 82.0)])], {}, {}))
    quality.write_results(args, [row("csdm", [(0, 84.0)])], {}, report_of, write, tmp_path, "full", extra)
    kept = json.loads(results.read_text())
    assert [(r["method"], r["accuracy"]) for r in kept["rows"]] == [("dm", [82.0]), ("csdm", [84.0])]

    # a writer waits while another process holds the lock (POSIX locks are per process), then merges into what
    # that process wrote meanwhile
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.lockf(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
         str(results) + ".lock"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    t = threading.Thread(target=quality.write_results,
                         args=(args, [row("csdm", [(1, 85.0)])], {}, report_of, write, tmp_path, "full", extra))
    t.start()
    t.join(0.5)
    assert t.is_alive() and json.loads(results.read_text()) == kept
    write(results, *report_of(kept["rows"] + [row("ncfm", [(0, 83.0)])], {}, {}))
    holder.stdin.close()
    holder.wait(10)
    t.join(10)
    merged = {r["method"]: r["accuracy"] for r in json.loads(results.read_text())["rows"]}
    assert merged == {"dm": [82.0], "csdm": [84.0, 85.0], "ncfm": [83.0]}

    args.merge = False  # started before the table existed, ends after another invocation wrote it
    with pytest.raises(SystemExit, match=r"written by another invocation while this one ran; .*quality\.json"):
        quality.write_results(args, [row("csdm", [(2, 86.0)])], {}, report_of, write, tmp_path, "full", extra)
    assert {r["method"] for r in json.loads(results.read_text())["rows"]} == {"dm", "csdm", "ncfm"}


def test_quality_never_replaces_a_table_or_deletes_a_run(tmp_path):
    """An existing --results file is refused without --merge, and a --merge into a table of another protocol is
    refused, both before anything is built or run; a cell rerun without --reuse moves its old run aside (distill's
    resume=false overwrite=true), with --reuse an interrupted run resumes; repeated values count once."""
    import quality
    from common import compose

    table = tmp_path / "table.json"
    table.write_text(json.dumps({"mode": "full", "split": "test", "labels": "hard", "extra_overrides": [],
                                 "settings": [], "date": "2026-12-01", "rows": []}))
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"the out dir's own quality\.json"):
        quality.main(["--results", str(tmp_path / "out" / "quality.json"), "--out-dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"--results .*table\.json exists: pass --merge"):
        quality.main(["--results", str(table), "--out-dir", str(out), "--raw-root", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match=r"--merge: .*table\.json was made with other settings"):
        quality.main(["--results", str(table), "--merge", "--out-dir", str(out), "--raw-root", str(tmp_path)])
    assert not out.exists()  # refused before the out dir, the shards or any run
    args, extra = quality.parse_args(["--seeds", "0", "0", "1", "--methods", "dm", "csdm", "dm", "--if", "100", "100"])
    assert args.seeds == [0, 1] and args.methods == ["dm", "csdm"] and args.ifs == [100.0]
    steps = [(["python", "-m", "data_prep.extract_features"], "a.log"),
             (["python", "-m", "csdm_dist.distill"], "b.log")]
    run_dir = tmp_path / "run"
    assert quality.rerun(steps, run_dir, reuse=False) == steps  # nothing there: a fresh run
    run_dir.mkdir()
    assert quality.rerun(steps, run_dir, reuse=True) == steps  # resumes (distill's default resume=true)
    again = quality.rerun(steps, run_dir, reuse=False)
    assert again[0] == steps[0] and again[1] == (steps[1][0] + ["resume=false", "overwrite=true"], "b.log")
    assert compose(["resume=false", "overwrite=true"]).overwrite  # overrides distill takes
    assert quality.default_out_dir(args, "full", []).name == "quality-full"  # the table's own runs
    pool = quality.pool_file(args, "natural", 100.0, "full", 0, ["eval.repeats=2"])
    assert pool.name == "fmnist-natural-if100-full-s0.pt"  # no pool-shaping override: the name as before
    wider = quality.pool_file(args, "natural", 100.0, "full", 0, ["extractor.pool_epochs=20", "eval.repeats=2"])
    assert wider != pool and wider == quality.pool_file(args, "natural", 100.0, "full", 0, ["extractor.pool_epochs=20"])
    # a csdm-features cell pretrains its pool when the file is missing or records no provenance (an old pool)
    args.data_root = str(tmp_path / "data")
    pool = quality.pool_file(args, "natural", 100.0, "full", 0, [])

    def pretrains():
        steps, _ = quality.commands([], "natural", 100.0, 10, "csdm-features", 0, args, "full", run_dir, [], tmp_path)
        return "csdm_dist.pretrain" in steps[0][0]
    assert pretrains()
    pool.parent.mkdir(parents=True)
    torch.save({"members": []}, pool)
    assert pretrains()
    torch.save({"members": [], "provenance": {"dataset": "fashion_mnist_lt"}}, pool)
    assert not pretrains()  # the distillation checks that this provenance is its build's
    ablation = quality.default_out_dir(quality.parse_args(["--split", "val"])[0], "full", ["synthetic.factor=1"])
    assert ablation.name.startswith("quality-full-val-") and ablation != quality.default_out_dir(
        quality.parse_args(["--split", "val"])[0], "full", ["synthetic.factor=3"])


def test_quality_cross_architecture_table_pairs_csdm_with_each_method_on_each_network():
    import quality

    def cell(method, arch, means):
        ev = {**SETTINGS["eval"], "arch": arch, **({"repeats": 1} if arch == "vgg11" else {})}  # --arch-repeats 1
        seeds = [{"seed": k, "mean": m, "std": 0.1, "many": m, "medium": m, "few": m, "distill_s": 1.0,
                  "eval_s": 1.0, "at_steps": {}, "settings": {**SETTINGS, "eval": ev}}
                 for k, m in enumerate(means)]
        return quality.cell_row("natural", 100.0, 10, method, "soft", arch, seeds)

    rows = [cell("dm", "convnet", [80.0, 81.0]), cell("dm", "vgg11", [70.0, 72.0]),
            cell("csdm", "convnet", [82.0, 82.5]), cell("csdm", "vgg11", [71.0, 71.5])]
    assert [r["arch"] for r in rows] == ["convnet", "vgg11"] * 2
    args = type("Args", (), {"seeds": [0, 1], "labels": "soft", "split": "test"})
    table = quality.markdown(rows, args, "full", [])
    assert "### natural class order, IPC 10, evaluated on vgg11" in table and "evaluation dm protocol, vgg11" in table
    assert "| IF | method | convnet (x3) | vgg11 (x1) |" in table  # networks trained per set, per column
    assert "| 100 | csdm | 82.25 +- 0.35 | 71.25 +- 0.35 |" in table
    assert "- IF 100, convnet: csdm - dm = +1.75 (per seed: 0 +2.00, 1 +1.50; 95 % CI -1.43 to +4.93)" in table
    assert "- IF 100, vgg11: csdm - dm = +0.25 (per seed: 0 +1.00, 1 -0.50; 95 % CI -9.28 to +9.78)" in table


def test_quality_arch_result_reuses_a_record_of_these_settings_and_makes_one_otherwise(tmp_path, monkeypatch):
    """--archs with --arch-repeats 1: the set's record on vgg11 with one network is read back, not made again; a
    record of other settings (three networks) or of another distilled.pt is made again, with eval.repeats=1."""
    import time
    from dataclasses import asdict

    import quality
    from common import compose
    from csdm_dist.config import EvalConfig
    from csdm_dist.evaluate import eval_record_name
    from csdm_dist.files import file_sha256

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "distilled.pt").write_bytes(b"a set")
    res = {"config": asdict(compose([])), "accuracy": {"mean": 80.0}, "timing": {"distill_s": 5.0, "eval_s": 6.0}}
    before = dict(res["config"]["eval"])
    ev = EvalConfig(**{**res["config"]["eval"], "arch": "vgg11", "repeats": 1})
    record = run_dir / eval_record_name(ev)
    assert record.name == "eval-dm-300ep-x1-vgg11.json"
    made = []

    def fake_run(cmd, log):  # what python -m csdm_dist.evaluate would write
        made.append(cmd)
        n = int(next(c for c in cmd if c.startswith("eval.repeats=")).split("=")[1])
        done = EvalConfig(**{**vars(ev), "repeats": n})
        (run_dir / eval_record_name(done)).write_text(json.dumps(
            {"eval": vars(done), "eval_s": 9.0, "accuracy": {"mean": 70.0 + n},
             "distilled_sha256": file_sha256(run_dir / "distilled.pt")}))

    monkeypatch.setattr(quality, "run", fake_run)
    out = quality.arch_result(run_dir, res, "vgg11", "cpu", tmp_path / "log", time.perf_counter(), "cell", repeats=1)
    assert len(made) == 1 and {"eval.arch=vgg11", "eval.repeats=1"} <= set(made[0])
    assert record.is_file() and out["accuracy"] == {"mean": 71.0}
    assert out["timing"] == {"distill_s": 5.0, "eval_s": 9.0}
    assert out["config"]["eval"]["arch"] == "vgg11" and out["config"]["eval"]["repeats"] == 1
    own = res["config"]["eval"]["repeats"]
    assert own != 1 and res["config"]["eval"] == before  # the run's own settings untouched
    assert quality.arch_result(run_dir, res, "vgg11", "cpu", tmp_path / "log", 0.0, "cell", repeats=1) == out
    assert len(made) == 1  # read back
    other = quality.arch_result(run_dir, res, "vgg11", "cpu", tmp_path / "log", 0.0, "cell")  # the run's own count
    assert f"eval.repeats={own}" in made[-1] and len(made) == 2 and other["accuracy"] == {"mean": 70.0 + own}
    (run_dir / "distilled.pt").write_bytes(b"distilled further")  # another set: its record is made again
    quality.arch_result(run_dir, res, "vgg11", "cpu", tmp_path / "log", 0.0, "cell", repeats=1)
    assert len(made) == 3
    with pytest.raises(SystemExit):
        quality.parse_args(["--arch-repeats", "1"])  # without --archs
    with pytest.raises(SystemExit):
        quality.parse_args(["--archs", "vgg11", "--arch-repeats", "0"])


def test_quality_against_another_label_track_pairs_by_seed_and_names_other_differences():
    import quality

    def cell(labels, means, seeds=(0, 1), **settings):
        rows = [{"seed": k, "mean": m, "std": 0.1, "many": m, "medium": m, "few": m, "distill_s": 1.0, "eval_s": 1.0,
                 "at_steps": {}, "settings": {**SETTINGS, "labels": {"kind": labels}, **settings}}
                for k, m in zip(seeds, means)]
        return quality.cell_row("natural", 100.0, 10, "csdm", labels, "convnet", rows)

    hard = [cell("hard", [80.0, 81.0, 79.0], seeds=(0, 1, 2))]
    soft = [cell("soft", [84.0, 83.5])]
    text = quality.track_differences(soft, hard)
    assert "natural IF 100 IPC 10 convnet, csdm: soft - hard = +3.25 (per seed: 0 +4.00, 1 +2.50)" in text
    assert soft[0]["versus"] == {"labels": "hard", "mean": 3.25, "per_seed": {0: 4.0, 1: 2.5}, "settings_differ": []}
    longer = [cell("soft", [84.0], seeds=(2,), iterations=1000)]
    assert "soft - hard = +5.00 (per seed: 2 +5.00); the settings also differ in iterations" in (
        quality.track_differences(longer, hard))
    assert quality.track_differences(soft, soft) == "" and quality.track_differences(soft, []) == ""  # nothing to pair


def test_quality_reuse_check_names_the_keys_that_differ():
    import quality

    want = {"out_dir": "a", "seed": 0, "distill": {"iterations": 200, "lr": 0.03}, "eval": {"split": "val"}}
    have = {"out_dir": "b", "seed": 0, "distill": {"iterations": 500, "lr": 0.03}, "eval": {"split": "test"}}
    assert sorted(quality.differences(want, have)) == ["distill.iterations", "eval.split"]
    assert quality.differences(want, {**want, "out_dir": "elsewhere"}) == []


def test_quality_soft_track_has_one_teacher_per_cell_given_to_every_method(tmp_path):
    import quality
    from common import compose

    argv = ["--labels", "soft", "--data-root", str(tmp_path), "--", "teacher.epochs=3", "synthetic.factor=2",
            "dataset.n_max=100"]
    args, extra = quality.parse_args(argv)
    path = quality.teacher_file(args, "natural", 100.0, extra)
    assert path == quality.teacher_file(args, "natural", 100.0, extra[::-1])  # the overrides' order is irrelevant
    assert path != quality.teacher_file(args, "natural", 100.0, ["teacher.epochs=4", "dataset.n_max=100"])
    assert path != quality.teacher_file(args, "hardtail", 100.0, extra) \
        != quality.teacher_file(args, "natural", 10, extra)
    assert quality.teacher_file(args, "natural", 100.0, extra + ["synthetic.factor=3"]) == path  # not a teacher key
    cmd = quality.teacher_command(["dataset=fashion_mnist_lt"], 100.0, args, path, extra)
    assert cmd[1:3] == ["-m", "csdm_dist.teacher"]
    assert {"teacher.epochs=3", "dataset.n_max=100", f"labels.teacher={path}", "seed=0"} <= set(cmd)
    assert "synthetic.factor=2" not in cmd
    cfg = compose(cmd[3:])  # the teacher's overrides make a valid config
    assert cfg.teacher.epochs == 3 and cfg.labels.teacher == str(path)
    steps, distil = quality.commands(["dataset=fashion_mnist_lt"], "natural", 100.0, 10, "dm", 1, args, "full",
                                     tmp_path / "run", ["labels.kind=soft", f"labels.teacher={path}"], tmp_path)
    assert compose(distil).labels.kind == "soft" and compose(distil).eval.labels == "soft"


def test_quality_soft_track_end_to_end(tmp_path):
    """--labels soft on a tiny fake Fashion-MNIST-LT: the build and the teacher get the dataset.* overrides, one
    teacher serves both methods, every set stores soft labels and is evaluated on the soft track."""
    import quality
    from fakes import write_fake_fashion_mnist

    raw = write_fake_fashion_mnist(tmp_path / "raw", n_per_class=30)
    tiny = ["extractor.width=16", "extractor.depth=2", "method.kernel.num_freqs=32", "distill.real_per_class=8",
            "eval.epochs=1", "eval.repeats=1", "ipc=2", "dataset.n_max=null", "dataset.val_per_class=0",
            "teacher.width=16", "teacher.depth=2", "teacher.epochs=1", "teacher.batch_size=32"]
    argv = ["--quick", "--labels", "soft", "--if", "10", "--ipc", "2", "--methods", "random", "csdm", "--steps", "2",
            "--archs", "convnet", "alexnet", "--at-steps", "1", "--raw-root", str(raw), "--data-root",
            str(tmp_path / "data"), "--out-dir", str(tmp_path / "out"), "--device", "cpu", "--", *tiny]
    report = quality.main(argv)
    curves = {(r["method"], r["arch"]): r["per_seed"][0]["at_steps"] for r in report["rows"]}
    assert "1" in curves["csdm", "convnet"] and curves["csdm", "alexnet"] == {}  # no curve of another network
    assert (tmp_path / "out" / "natural-if10-ipc2-csdm-soft-s0.log").is_file()  # a log per run dir (track named)
    (cell, teacher), = report["teachers"].items()
    assert cell == "natural IF 10" and Path(teacher["path"]).is_file() and 0 <= teacher["accuracy"]["mean"] <= 100
    assert [(r["method"], r["arch"]) for r in report["rows"]] == [
        ("random", "convnet"), ("random", "alexnet"), ("csdm", "convnet"), ("csdm", "alexnet")]
    assert report["labels"] == "soft"
    for r in report["rows"][1::2]:  # the alexnet rows: the set's own evaluation settings, on the soft track
        run = tmp_path / "out" / "natural" / "if10" / "ipc2" / f"{r['method']}-soft" / "seed0"
        rec = json.loads((run / "eval-dm-1ep-x1-alexnet-soft.json").read_text())
        assert rec["eval"]["arch"] == "alexnet" and rec["accuracy"]["labels"] == "soft" and rec["eval"]["repeats"] == 1
        assert r["mean"] == rec["accuracy"]["mean"] and r["settings"]["eval"]["arch"] == "alexnet"
    records = sorted((tmp_path / "out").rglob("eval-*-alexnet-soft.json"))
    stamps = [p.stat().st_mtime_ns for p in records]
    again = quality.main(["--reuse", *argv])  # every run and every alexnet record is reused, not made again
    assert again["reused_runs"] == 2 and [p.stat().st_mtime_ns for p in records] == stamps
    assert [r["mean"] for r in again["rows"]] == [r["mean"] for r in report["rows"]]
    # a set that changed since its results (distilled further and interrupted, say): the cell is not reused
    from csdm_dist.files import file_sha256

    changed = tmp_path / "out" / "natural" / "if10" / "ipc2" / "csdm-soft" / "seed0" / "distilled.pt"
    res = json.loads((changed.parent / "results.json").read_text())
    assert res["distilled_sha256"] == file_sha256(changed)  # results.json names the set it evaluated
    blob = torch.load(changed, weights_only=False)
    torch.save({**blob, "images": blob["images"] + 0.01}, changed)
    with pytest.raises(SystemExit, match=r"distilled\.pt is not the set its results\.json evaluated"):
        quality.main(["--reuse", *argv])
    assert [p.stat().st_mtime_ns for p in records] == stamps  # no record made for a set its results do not name
    (changed.parent / "results.json").unlink()  # an interrupted run: --reuse resumes it, nothing is deleted
    resumed = quality.main(["--reuse", *argv])
    assert resumed["reused_runs"] == 1 and (changed.parent / "results.json").is_file()
    rec = {p.parent.parent.name: p for p in records}
    assert rec["random-soft"].stat().st_mtime_ns == stamps[records.index(rec["random-soft"])]
    assert json.loads(rec["csdm-soft"].read_text())["distilled_sha256"] == file_sha256(changed)
    assert not list((tmp_path / "out").rglob("*.old-*"))
    for r in report["rows"][::2]:
        assert r["labels"] == "soft" and r["settings"]["labels"]["teacher"] == teacher["path"]
        run = tmp_path / "out" / "natural" / "if10" / "ipc2" / f"{r['method']}-soft" / "seed0"
        res = json.loads((run / "results.json").read_text())
        assert res["labels"] == "soft" and res["accuracy"]["labels"] == "soft"
        assert "soft_labels" in torch.load(run / "distilled.pt", weights_only=False)
    # soft-online: the hard track's sets (distilled here with hard labels), labelled by the same teacher per batch
    from csdm_dist.errors import UserError
    from csdm_dist.evaluate import evaluate_file

    online = quality.main(["--quick", "--labels", "soft-online", "--if", "10", "--ipc", "2", "--methods", "csdm",
                           "--steps", "2", *argv[argv.index("--raw-root"):]])
    assert online["labels"] == "soft-online" and online["teachers"]["natural IF 10"] == teacher  # not trained again
    (row,) = online["rows"]
    run = tmp_path / "out" / "natural" / "if10" / "ipc2" / "csdm" / "seed0"
    assert json.loads((run / "results.json").read_text())["labels"] == "hard"
    assert "soft_labels" not in torch.load(run / "distilled.pt", weights_only=False)
    rec = json.loads((run / "eval-dm-1ep-x1-soft-online.json").read_text())
    assert rec["teacher"] == {"path": teacher["path"], "sha256": teacher["sha256"]}
    assert (rec["accuracy"]["labels"], rec["accuracy"]["relabel"]) == ("soft", "online")
    assert row["labels"] == "soft" and row["mean"] == rec["accuracy"]["mean"]
    assert row["settings"]["labels"]["relabel"] == "online" and row["settings"]["labels"]["kind"] == "hard"
    assert row["per_seed"][0]["teacher_sha256"] == teacher["sha256"]
    assert "soft labels from the teacher for every batch" in (tmp_path / "out" / "quality.md").read_text()
    with pytest.raises(UserError, match=r"teacher=.*eval\.relabel=online only"):  # a teacher for stored labels
        evaluate_file(run / "distilled.pt", {}, "cpu", teacher=teacher["path"])
