"""benchmarks/paper.py end to end on a fake CIFAR-10 (tests/fakes.py write_fake_cifar), --launcher local, and its
table's published reference rows.

Run: .venv/bin/python -m pytest tests/integration/test_paper.py -q   (about a minute on 2 cores: 4 subprocesses)
"""
import json
import re
import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import paper  # noqa: E402
from fakes import write_fake_cifar  # noqa: E402
from runs import TINY  # noqa: E402

# tests/runs.py TINY without the keys paper.py sets from its flags (ipc, eval.epochs, eval.repeats, device)
TINY_EXTRA = [t for t in TINY if t.split("=")[0] not in paper.OWNED]
FLAGS = ["--steps", "2", "--eval-epochs", "1", "--repeats", "1", "--ipc", "10", "--if", "10", "--methods", "random",
         "csdm", "--device", "cpu"]


def mtimes(out: Path) -> dict:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("results.json"))}


def test_paper_table_reuse_stale_config_and_resume(tmp_path, capsys):
    raw = tmp_path / "raw"
    write_fake_cifar(raw, num_classes=10, n_per_class=30)  # IF 10 of 30: 30, 23, ..., 3 training images per class
    out = tmp_path / "paper"
    common = ["--raw-root", str(raw), "--data-root", str(tmp_path / "data"), "--out-dir", str(out), *FLAGS]
    extra = ["dataset.n_max=null", "dataset.val_per_class=0", *TINY_EXTRA]

    report = paper.main([*common, "--", *extra])
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["random", "csdm"] and report["reused_cells"] == 0
    for r in rows.values():
        assert (r["dataset"], r["imbalance_factor"], r["ipc"], r["labels"]) == ("cifar10", 10, 10, "hard")
        assert r["seeds"] == [0] and len(r["accuracy"]) == 1 and r["mean"] == r["accuracy"][0]
        assert {"many", "medium", "few", "std"} <= r.keys()
        s = r["settings"]
        assert (s["iterations"], s["eval"]["epochs"], s["eval"]["repeats"], s["eval"]["split"], s["eval"]["arch"]) == \
            (2, 1, 1, "test", "convnet")
        assert r["eval_depth"] == 2 and r["world_sizes"] == [1]  # TINY's extractor.depth=2, read back
    run_dir = out / "cifar10" / "if10" / "ipc10" / "csdm" / "seed0"
    assert Path(rows["csdm"]["run_dirs"][0]) == run_dir
    saved = json.loads((out / "paper.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["random", "csdm"]
    assert {r["method"] for r in saved["published"] if r["dataset"] == "cifar10"} == {"random", "IDM", "DATM", "DAMED"}
    table = (out / "paper.md").read_text()
    assert "## CIFAR-10-LT" in table and "| method | IF 10, IPC 10 |" in table
    assert f"| csdm | {rows['csdm']['mean']:.2f} +- {rows['csdm']['std']:.2f} |" in table
    assert "| published: DAMED [1] | 58.1 +- 0.3 |" in table and "not by this script" in table
    first = capsys.readouterr().out
    assert "cifar10 IF 10 IPC 10 csdm seed 0: running" in first and "done in" in first

    before = mtimes(out)
    assert len(before) == 2
    again = paper.main([*common, "--", *extra])  # every cell reused: nothing runs
    printed = capsys.readouterr().out
    assert again["reused_cells"] == 2 and mtimes(out) == before
    assert printed.count(": reusing ") == 2 and "running" not in printed and "data_prep.build" not in printed
    assert [r["mean"] for r in again["rows"]] == [r["mean"] for r in report["rows"]]

    changed = [e.replace("method.kernel.num_freqs=64", "method.kernel.num_freqs=32") for e in extra]
    assert changed != extra
    with pytest.raises(SystemExit, match=r"(?s)method\.kernel\.num_freqs differ.*--fresh") as stop:
        paper.main([*common, "--", *changed])
    assert "2 cell(s)" in str(stop.value) and mtimes(out) == before  # stopped before anything ran
    args, more = paper.parse_args([*common, "--fresh", "--", *changed])
    args.raw_root, args.data_root, args.out_dir = raw, args.data_root.resolve(), out
    cells = paper.make_cells(args, *paper.split_extra(more, "local")[:2], out)
    paper.plan(cells, fresh=True)  # --fresh would rerun both (each moved aside by overwrite=true)
    assert [c["action"] for c in cells] == ["redo", "redo"] and cells[0]["differ"] == ["method.kernel.num_freqs"]

    # an interrupted cell: its run directory without results.json is resumed from its checkpoint, not deleted
    created = json.loads((run_dir / "run.json").read_text())["created"]
    (run_dir / "results.json").unlink()
    resumed = paper.main([*common, "--", *extra])
    printed = capsys.readouterr().out
    assert f"csdm seed 0: resuming {run_dir}" in printed and printed.count(": reusing ") == 1
    assert json.loads((run_dir / "run.json").read_text())["created"] == created
    assert "resumed from" in (run_dir / "distill-rank0.log").read_text()
    assert (run_dir / "checkpoints" / "step-000002" / "meta.json").is_file()
    assert json.loads((run_dir / "results.json").read_text())["timing"]["steps"] == 2
    after = mtimes(out)
    random = "cifar10/if10/ipc10/random/seed0/results.json"
    assert after[random] == before[random] and resumed["reused_cells"] == 1
    assert not list(run_dir.parent.glob("seed0.old-*"))  # nothing was moved aside


def fake_rows(datasets, ifs, ipcs, methods) -> list[dict]:
    settings = {"iterations": 200, "factor": 1, "init": "real", "lr": 0.03, "lr_schedule": "constant",
                "extractor": "random", "eval": {"protocol": "dm", "arch": "convnet", "epochs": 1000, "repeats": 5,
                                                 "split": "test"}}
    return [{"dataset": ds, "imbalance_factor": imb, "ipc": ipc, "method": m, "mean": 40.0 + k, "std": 0.5,
             "many": 50.0, "medium": 40.0, "few": 30.0, "distill_s": 1.0, "eval_depth": 3, "settings": settings}
            for ds in datasets for imb in ifs for ipc in ipcs for k, m in enumerate(methods)]


def test_markdown_marks_published_rows_and_holds_only_cells_of_the_dict():
    args = Namespace(datasets=["cifar10", "cifar100"], ifs=[10.0, 20.0, 50.0, 100.0, 200.0], ipc=[10, 20, 50],
                     methods=list(paper.METHODS), seeds=[0], repeats=5)
    table = paper.markdown(fake_rows(args.datasets, args.ifs, args.ipc, args.methods), args, [])
    columns = [(imb, ipc) for imb in args.ifs for ipc in args.ipc]
    sections = table.split("\n## ")[1:]
    assert [s.splitlines()[0] for s in sections] == ["CIFAR-10-LT", "CIFAR-100-LT"]
    for ds, section in zip(args.datasets, sections):
        lines = section.splitlines()
        header = next(line for line in lines if line.startswith("| method |"))
        assert header == "| method | " + " | ".join(f"IF {i:g}, IPC {p}" for i, p in columns) + " |"
        assert "Published rows: copied from the papers named below" in section and "not by this script" in section
        ours = [line for line in lines if line.startswith("| ") and line.split(" | ")[0][2:] in paper.METHODS
                and "IF" not in line]
        assert len(ours) == len(args.methods)  # our rows carry the bare method name, never a published one
        published = [line for line in lines if line.startswith("| published: ")]
        assert len(published) == len(paper.PUBLISHED[ds])
        shown = 0
        for line in published:
            m = re.match(r"\| published: (\S+) \[(\d+)\] \| (.*) \|$", line)
            assert m, line
            ref = paper.PUBLISHED[ds][m.group(1)]
            assert f"[{m.group(2)}] {ref['source']}." in section  # its citation, numbered
            cells = m.group(3).split(" | ")
            assert len(cells) == len(columns)
            for (imb, ipc), text in zip(columns, cells):
                if (imb, ipc) in ref["cells"]:
                    mean, std = ref["cells"][imb, ipc]
                    assert text == f"{mean:.1f} +- {std:.1f}"
                    shown += 1
                else:
                    assert text == "", (ds, m.group(1), imb, ipc, text)  # no number the dict does not hold
        assert shown == sum(len(r["cells"]) for r in paper.PUBLISHED[ds].values())
    assert "arXiv 2603.01698, abstract" in sections[0] and "14.0% improvement" in sections[0]


def test_extra_overrides_are_checked():
    data, runs, cluster = paper.split_extra(["dataset.n_max=null", "synthetic.factor=2", "cluster.nodes=2"], "submit")
    assert (data, runs, cluster) == (["dataset.n_max=null"], ["synthetic.factor=2"], ["cluster.nodes=2"])
    with pytest.raises(SystemExit, match="use --eval-epochs"):
        paper.split_extra(["eval.epochs=5"], "local")
    with pytest.raises(SystemExit, match="needs --launcher submit"):
        paper.split_extra(["cluster.nodes=2"], "torchrun")
    with pytest.raises(SystemExit, match="--nproc-per-node"):
        paper.check_args(paper.parse_args(["--raw-root", "x", "--launcher", "torchrun"])[0])
    cmd = paper.launch_command(["ipc=10"], Namespace(launcher="torchrun", nproc_per_node=4), [])
    assert cmd[1:5] == ["--standalone", "--nproc_per_node=4", "-m", "csdm_dist.distill"] and cmd[-1] == "ipc=10"
    cmd = paper.launch_command(["ipc=10"], Namespace(launcher="submit", cluster="slurm"), ["cluster.nodes=2"])
    assert cmd[1].endswith("launch/submit.py") and cmd[2:] == ["cluster=slurm", "ipc=10", "cluster.nodes=2",
                                                               "cluster.wait=true"]
