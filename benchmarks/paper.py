"""The long-tailed dataset-distillation protocol's table on CIFAR-10-LT and CIFAR-100-LT, one command away.

    .venv/bin/python benchmarks/paper.py --raw-root /data/cifar                        # CIFAR-10-LT, every cell
    .venv/bin/python benchmarks/paper.py --raw-root /data/cifar --datasets cifar10 cifar100 --device cuda \\
        --launcher torchrun --nproc-per-node 8                                      # each cell on 8 GPUs
    .venv/bin/python benchmarks/paper.py --raw-root /shared/cifar --launcher submit --cluster slurm \\
        -- cluster.partition=gpu cluster.gpus_per_node=4                            # each cell one SLURM job

The grid: datasets (`--datasets`, CIFAR-10-LT; CIFAR-100-LT too with `cifar100`) x imbalance factors (`--if`,
10 50 100 200) x images per class (`--ipc`, 10 20 50) x methods (`--methods`: random, dm, ncfm, csdm) x seeds
(`--seeds`, 0). Every cell is one `python -m csdm_dist.distill` run with the same protocol: evaluation network
ConvNet (eval.arch=convnet at the project's depth for 32 px, 3), the `--protocol` (dm: SGD, step decay, DSA),
`--eval-epochs` (1000) x `--repeats` (5) fresh networks, the balanced test split, hard labels, no random-real
baseline inside a run (`random` is its own method). The distillation budget is `--steps`; by default the config's
distill.iterations (1000 since the validation ablations of 2026-12-02). Extra arguments after `--` are Hydra
overrides for every run (e.g. `-- synthetic.factor=2 distill.init=mix`): `dataset.*` ones go to the builds too,
`cluster.*` ones only to `--launcher submit`. Keys this script sets from its flags are refused there.

Launchers (`--launcher`): `local` runs each cell as one process; `torchrun` runs the cells one after another, each
as `torchrun --standalone --nproc_per_node=N -m csdm_dist.distill ...` (`--nproc-per-node N`); `submit` runs
`python launch/submit.py cluster=<--cluster> ... cluster.wait=true` per cell, so each cell is one job (SLURM, or
`--cluster local` as submitit subprocesses) and the script waits for it.

Data: before the first cell of a (dataset, IF) runs, `python -m data_prep.build dataset=cifar10_lt
dataset.raw_root=<--raw-root> dataset.imbalance_factor=<IF>` builds its shards (the builder verifies and keeps a
build that exists). `--raw-root` holds torchvision's `cifar-10-batches-py/` and `cifar-100-python/` folders.

Resumable cell by cell. Each cell is its own run directory, `<--out-dir>/<dataset>/if<IF>/ipc<IPC>/<method>/
seed<s>` (default out-dir runs/paper):
- a cell whose results.json was made with exactly the config this invocation would run (benchmarks/quality.py's
  `differences`, up to where it ran) is kept and not run again ("reusing");
- a cell whose run directory exists without results.json (interrupted, preempted, failed) is run again with
  resume=true: the distillation resumes from its newest checkpoint and evaluates; nothing is deleted;
- a cell with results.json of another config stops the script before anything runs, naming the cells and the
  keys that differ. `--fresh` runs such cells again instead: the distillation moves the old run aside to
  `<dir>.old-<time>` (overwrite=true) and starts afresh.

Output: `<out-dir>/paper.json` (one row per dataset x IF x IPC x method: accuracy per seed, mean, std, many /
medium / few, the settings read back from each run's results.json) and `<out-dir>/paper.md`: per dataset, methods
x (IF, IPC) as mean +- std, and beside them PUBLISHED reference rows copied from other papers (PUBLISHED below),
which were measured under their authors' protocols, not here.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from common import CONFIGS, machine_info, write_report
from csdm_dist import files
from csdm_dist.config import DistillConfig
from quality import cell_row, differences, seed_result, settings_line

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {"cifar10": "cifar10_lt", "cifar100": "cifar100_lt"}  # --datasets -> configs/dataset/<name>.yaml
TITLES = {"cifar10": "CIFAR-10-LT", "cifar100": "CIFAR-100-LT"}
RAW_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
METHODS = ("random", "dm", "ncfm", "csdm")
LAUNCHERS = ("local", "torchrun", "submit")
CLUSTERS = sorted(p.stem for p in (CONFIGS / "cluster").glob("*.yaml"))
# keys the flags set: an extra override may not set them too (say which flag does)
OWNED = {"dataset": "--datasets", "dataset.raw_root": "--raw-root", "dataset.data_root": "--data-root",
         "dataset.imbalance_factor": "--if", "ipc": "--ipc", "method": "--methods", "seed": "--seeds",
         "device": "--device", "out_dir": "--out-dir", "resume": "(always true; --fresh)",
         "overwrite": "--fresh", "distill.iterations": "--steps", "eval.epochs": "--eval-epochs",
         "eval.repeats": "--repeats", "eval.protocol": "--protocol", "eval.split": "(the protocol: test)",
         "eval.arch": "(the protocol: convnet)", "eval.labels": "(the protocol: hard labels)",
         "labels.kind": "(the protocol: hard labels)", "evaluate": "(always true)", "baseline": "(always false)",
         "cluster": "--cluster"}

# ---------------------------------------------------------------------------------------------------------------
# Published numbers from other papers, under THEIR protocols (not measured here). Only the cells that were found
# and read are listed; a cell that is not here is left out of the table. (imbalance factor, IPC) -> (mean, std).
# ---------------------------------------------------------------------------------------------------------------
_CUI = ("Cui et al., \"Rethinking Long-tailed Dataset Distillation: A Uni-Level Framework with Unbiased Recovery "
        "and Relabeling\", AAAI 2026, arXiv 2511.18858")
_FROM_DAMED = ("that table's caption: these rows \"are taken from DAMED (Zhao et al. 2025)\", i.e. \"Distilling "
               "Long-tailed Datasets\", CVPR 2025, arXiv 2408.14506")
PUBLISHED = {
    "cifar10": {
        "random": {"source": f"{_CUI}, Table 1 (CIFAR-10-LT); {_FROM_DAMED}", "cells": {
            (10, 10): (32.5, 2.2), (10, 20): (39.6, 0.9), (10, 50): (51.9, 1.5),
            (50, 10): (33.2, 0.4), (50, 20): (42.0, 1.3), (50, 50): (51.6, 1.3),
            (100, 10): (34.4, 2.0), (100, 20): (41.4, 0.7), (100, 50): (52.6, 0.5)}},
        "IDM": {"source": f"{_CUI}, Table 1 (CIFAR-10-LT); {_FROM_DAMED}", "cells": {
            (10, 10): (54.8, 0.4), (10, 20): (57.1, 0.3), (10, 50): (60.1, 0.3),
            (50, 10): (51.9, 0.7), (50, 20): (53.3, 0.6), (50, 50): (56.1, 0.4),
            (100, 10): (49.8, 0.6), (100, 20): (50.9, 0.5), (100, 50): (53.1, 0.4)}},
        "DATM": {"source": f"{_CUI}, Table 1 (CIFAR-10-LT); {_FROM_DAMED}", "cells": {
            (10, 10): (57.2, 0.4), (10, 20): (60.4, 0.2), (10, 50): (66.7, 0.6),
            (50, 10): (41.6, 0.2), (50, 20): (43.4, 0.3), (50, 50): (50.3, 0.2),
            (100, 10): (37.3, 0.2), (100, 20): (38.9, 0.1), (100, 50): (44.3, 0.1)}},
        "DAMED": {"source": f"{_CUI}, Table 1 (CIFAR-10-LT); {_FROM_DAMED}", "cells": {
            (10, 10): (58.1, 0.3), (10, 20): (63.0, 1.0), (10, 50): (70.5, 0.4),
            (50, 10): (54.2, 1.0), (50, 20): (59.4, 0.7), (50, 50): (65.8, 0.2),
            (100, 10): (53.4, 0.1), (100, 20): (58.2, 0.6), (100, 50): (64.0, 0.9)}},
    },
    "cifar100": {  # that paper's Table 2 has IF 10, 20 and 50, and no IDM row
        "random": {"source": f"{_CUI}, Table 2 (CIFAR-100-LT); {_FROM_DAMED}", "cells": {
            (10, 10): (14.2, 0.6), (10, 20): (21.7, 0.6), (10, 50): (32.1, 0.6),
            (20, 10): (15.0, 0.3), (20, 20): (21.6, 0.5), (20, 50): (30.5, 0.5),
            (50, 10): (13.4, 0.5), (50, 20): (20.6, 0.6), (50, 50): (26.9, 0.5)}},
        "DATM": {"source": f"{_CUI}, Table 2 (CIFAR-100-LT); {_FROM_DAMED}", "cells": {
            (10, 10): (28.2, 0.4), (10, 20): (34.1, 0.2), (10, 50): (31.6, 0.1),
            (20, 10): (25.3, 0.3), (20, 20): (27.2, 0.1), (20, 50): (27.1, 0.1),
            (50, 10): (22.2, 0.4), (50, 20): (19.8, 0.4), (50, 50): (22.9, 0.4)}},
        "DAMED": {"source": f"{_CUI}, Table 2 (CIFAR-100-LT); {_FROM_DAMED}", "cells": {
            (10, 10): (31.5, 0.2), (10, 20): (37.5, 0.4), (10, 50): (40.0, 0.1),
            (20, 10): (31.4, 0.5), (20, 20): (35.1, 0.4), (20, 50): (37.0, 0.7),
            (50, 10): (29.8, 0.3), (50, 20): (31.9, 0.5), (50, 50): (33.2, 0.5)}},
    },
}
# Claims in words, where no table cell was found: quoted, with where they are from.
CLAIMS = {
    "cifar10": [{
        "method": "csdm",
        "quote": "On CIFAR-10-LT, with 10 images per class, CSDM achieves a 14.0% improvement over state-of-the-art "
                 "DD methods, with only a 5.7% performance drop when the number of images in tail classes "
                 "decreases from 500 to 25, demonstrating strong stability on long-tailed data.",
        "source": "Wu et al., \"Towards Principled Dataset Distillation: A Spectral Distribution Perspective\" "
                  "(CSDM), arXiv 2603.01698, abstract",
        "reading": "the abstract names neither the imbalance factor of the +14.0 nor the prior method; with CIFAR-10's "
                   "5000 head images, 500 and 25 tail images are IF 10 and IF 200. Its tables were not read "
                   "here, so no CSDM cell is listed."}],
}
PROTOCOL_NOTE = ("Published rows: copied from the papers named below, measured under those papers' protocols "
                 "(their authors' code, networks and label tracks; DATM and DAMED learn soft labels, DAMED's "
                 "abstract: \"initialize reliable soft labels\"), not by this script. Cui et al. describe their "
                 "evaluation as ConvNet-3 students trained 1000 epochs, 5 repeats. They are context, not a paired "
                 "comparison.")
MISSING_NOTE = {
    "cifar10": "No published cell was found for IF 200 (the table read has IF 10, 50, 100) or for a CSDM row.",
    "cifar100": "No published cell was found for IF 100 or 200 (the table read has IF 10, 20, 50), for IDM, or for "
                "a CSDM row.",
}


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--raw-root", default=None, help="folder with cifar-10-batches-py/ and cifar-100-python/")
    p.add_argument("--datasets", nargs="+", default=["cifar10"], choices=list(DATASETS))
    p.add_argument("--if", dest="ifs", type=float, nargs="+", default=[10, 50, 100, 200], help="imbalance factors")
    p.add_argument("--ipc", type=int, nargs="+", default=[10, 20, 50], help="images per class (stored)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="distillation seeds; a cell averages them")
    p.add_argument("--steps", type=int, default=None,
                   help=f"distillation steps (default: the config's distill.iterations, {DistillConfig().iterations})")
    p.add_argument("--eval-epochs", type=int, default=1000, help="epochs of each evaluation network")
    p.add_argument("--repeats", type=int, default=5, help="evaluation networks per run")
    p.add_argument("--protocol", choices=("dm", "ncfm"), default="dm", help="evaluation protocol (eval.protocol)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="local")
    p.add_argument("--nproc-per-node", type=int, default=None, help="--launcher torchrun: processes per cell")
    p.add_argument("--cluster", choices=CLUSTERS, default="slurm", help="--launcher submit: cluster=<this>")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--fresh", action="store_true",
                   help="rerun cells whose results were made with another config (moved aside, not deleted)")
    p.add_argument("--data-root", type=Path, default=ROOT / "data")
    p.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "paper")
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    return args, extra


# ---- checks before anything runs -----------------------------------------------------------------------------
def split_extra(extra: list[str], launcher: str) -> tuple[list[str], list[str], list[str]]:
    """(overrides for builds and runs, for runs only, for the submit command only); SystemExit on what cannot be."""
    data, runs, cluster = [], [], []
    for o in extra:
        if o.startswith("-") or "=" not in o:
            raise SystemExit(f"extra argument {o!r} after `--` is not a Hydra override key=value; flags of "
                             "paper.py go before `--`")
        key = o.split("=", 1)[0].lstrip("+~")
        if key in OWNED:
            raise SystemExit(f"override {o!r}: paper.py sets `{key}` itself; use {OWNED[key]}")
        if key.startswith("cluster."):
            if launcher != "submit":
                raise SystemExit(f"override {o!r} is a cluster key: it needs --launcher submit")
            cluster.append(o)
        elif key.startswith("dataset."):
            data.append(o)
        else:
            runs.append(o)
    return data, runs, cluster


def check_args(args) -> None:
    import torch

    if args.raw_root is None:
        raise SystemExit("pass --raw-root: the folder holding torchvision's cifar-10-batches-py/ (and "
                         "cifar-100-python/ for --datasets cifar100)")
    if args.launcher == "torchrun" and (args.nproc_per_node is None or args.nproc_per_node < 1):
        raise SystemExit("--launcher torchrun needs --nproc-per-node N (processes per cell, e.g. the GPUs of the node)")
    if args.launcher != "torchrun" and args.nproc_per_node is not None:
        raise SystemExit("--nproc-per-node is for --launcher torchrun; with submit pass -- cluster.gpus_per_node=N")
    if args.device == "cuda" and args.launcher != "submit" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here (torch.cuda.is_available() is False); use "
                         "--device cpu or auto, or --launcher submit to run on a cluster")
    for name, value in (("--eval-epochs", args.eval_epochs), ("--repeats", args.repeats)):
        if value < 1:
            raise SystemExit(f"{name} must be >= 1, got {value}")
    if args.steps is not None and args.steps < 0:
        raise SystemExit(f"--steps must be >= 0, got {args.steps}")


def check_raw(raw_root: Path, datasets: list[str], data_extra: list[str]) -> None:
    if "dataset.download=true" in data_extra:
        return  # the builder fetches them with torchvision
    for ds in datasets:
        if not (raw_root / RAW_FOLDERS[ds]).is_dir():
            raise SystemExit(f"--raw-root {raw_root} has no {RAW_FOLDERS[ds]}/ (torchvision's {TITLES[ds][:-3]} "
                             "python folder): point --raw-root at the folder that holds it, or add "
                             "`-- dataset.download=true` to fetch it with torchvision")


# ---- cells ---------------------------------------------------------------------------------------------------
def data_overrides(ds: str, imb: float, args, data_extra: list[str]) -> list[str]:
    return [f"dataset={DATASETS[ds]}", f"dataset.raw_root={args.raw_root}", f"dataset.data_root={args.data_root}",
            f"dataset.imbalance_factor={imb:g}", *data_extra]


def protocol_overrides(args) -> list[str]:
    steps = [] if args.steps is None else [f"distill.iterations={args.steps}"]
    return [*steps, f"eval.epochs={args.eval_epochs}", f"eval.repeats={args.repeats}",
            f"eval.protocol={args.protocol}", "eval.arch=convnet", "eval.split=test", "eval.labels=hard",
            "labels.kind=hard", "evaluate=true", "baseline=false"]


def cell_overrides(data: list[str], method: str, ipc: int, seed: int, args, run_dir: Path,
                   run_extra: list[str]) -> list[str]:
    """The distillation's overrides of one cell: what the reuse check composes and every launcher passes."""
    return [*data, f"method={method}", f"ipc={ipc}", f"seed={seed}", f"device={args.device}",
            f"out_dir={run_dir}", *protocol_overrides(args), *run_extra]


def wanted_config(overrides: list[str]) -> dict:
    """The config a cell would run with: configs/config.yaml composed with its overrides (as a dict)."""
    from hydra import compose, initialize_config_dir

    from csdm_dist.config import register_configs, to_config

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return asdict(to_config(compose(config_name="config", overrides=overrides)))


def cell_state(run_dir: Path) -> str:
    """finished (results.json), started (a run directory without results), or new."""
    if (run_dir / "results.json").is_file():
        return "finished"
    return "started" if run_dir.is_dir() and any(run_dir.iterdir()) else "new"


def plan(cells: list[dict], fresh: bool) -> None:
    """Decide each cell's action: reuse, resume, fresh (new), or redo (--fresh over another config); stop, naming
    the cells and keys, when finished cells were made with another config and --fresh is not given."""
    stale = []
    for c in cells:
        state = cell_state(c["run_dir"])
        c["action"] = {"new": "fresh", "started": "resume"}.get(state, "reuse")
        if state == "finished":
            stored = json.loads((c["run_dir"] / "results.json").read_text()).get("config", {})
            diff = sorted(differences(wanted_config(c["overrides"]), stored))
            if diff:
                c["action"], c["differ"] = "redo", diff
                stale.append(c)
    if stale and not fresh:
        lines = [f"  {c['name']}: {c['run_dir']} ({', '.join(c['differ'][:6])}"
                 f"{' ...' if len(c['differ']) > 6 else ''} differ)" for c in stale]
        raise SystemExit(f"{len(stale)} cell(s) hold results made with another config than this command would "
                         "run; nothing was run:\n" + "\n".join(lines) + "\nPass --fresh to run them again (each "
                         "old run is moved aside to <dir>.old-<time>, nothing is deleted), run with the settings "
                         "they were made with, or pass another --out-dir.")


def launch_command(overrides: list[str], args, cluster_extra: list[str]) -> list[str]:
    py = sys.executable
    if args.launcher == "local":
        return [py, "-m", "csdm_dist.distill", *overrides]
    if args.launcher == "torchrun":
        torchrun = Path(py).with_name("torchrun")
        if not torchrun.is_file():
            raise SystemExit(f"--launcher torchrun: {torchrun} does not exist (torchrun is installed with torch "
                             "next to this Python)")
        return [str(torchrun), "--standalone", f"--nproc_per_node={args.nproc_per_node}", "-m", "csdm_dist.distill",
                *overrides]
    return [py, str(ROOT / "launch" / "submit.py"), f"cluster={args.cluster}", *overrides, *cluster_extra,
            "cluster.wait=true"]


def run_logged(cmd: list[str], log: Path, what: str, hint: str = "") -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{what} failed (exit {proc.returncode})\ncommand: {shlex.join(cmd)}\n"
                         f"--- end of {log} ---\n{tail}{hint}")


def resume_hint(c: dict) -> str:
    """For a failed resume: the keys in which the run's own config.yaml differs from this cell's, if any."""
    path = c["run_dir"] / "config.yaml"
    if c["action"] != "resume" or not path.is_file():
        return ""
    from omegaconf import OmegaConf

    have = OmegaConf.to_container(OmegaConf.load(path))
    diff = sorted(differences(wanted_config(c["overrides"]), have)) if isinstance(have, dict) else []
    return (f"\n{c['name']} resumed the unfinished run in {c['run_dir']}"
            + (f", whose config.yaml differs in {', '.join(diff[:6])}" if diff else "")
            + "; if it was made with other settings, --fresh moves it aside to <dir>.old-<time> and starts afresh")


def run_cell(c: dict, args, cluster_extra: list[str], t0: float) -> None:
    extra = {"fresh": [], "resume": ["resume=true"] + (["overwrite=true"] if args.fresh else []),
             "redo": ["resume=false", "overwrite=true"]}[c["action"]]
    words = {"fresh": "running", "resume": f"resuming {c['run_dir']}"}.get(c["action"]) or \
        f"--fresh: moving {c['run_dir']} aside ({', '.join(c['differ'][:3])} differ) and running"
    print(f"[{time.perf_counter() - t0:6.0f} s] {c['name']}: {words}", flush=True)
    cmd = launch_command([*c["overrides"], *extra], args, cluster_extra)
    started = time.perf_counter()
    run_logged(cmd, c["log"], c["name"], resume_hint(c))
    if not (c["run_dir"] / "results.json").is_file():
        raise SystemExit(f"{c['name']}: the run ended without {c['run_dir'] / 'results.json'} (stopped or "
                         f"preempted?); see {c['log']}. The same command resumes it.")
    acc = json.loads((c["run_dir"] / "results.json").read_text())["accuracy"]
    print(f"[{time.perf_counter() - t0:6.0f} s] {c['name']}: done in {time.perf_counter() - started:.0f} s, "
          f"{acc['mean']:.2f} +- {acc['std']:.2f} %", flush=True)


def build(ds: str, imb: float, args, data_extra: list[str], out: Path, t0: float) -> None:
    cmd = [sys.executable, "-m", "data_prep.build", *data_overrides(ds, imb, args, data_extra)]
    print(f"[{time.perf_counter() - t0:6.0f} s] {TITLES[ds]} IF {imb:g}: data_prep.build (kept if built)", flush=True)
    run_logged(cmd, out / "logs" / f"build-{ds}-if{imb:g}.log", f"building {TITLES[ds]} IF {imb:g}")


def make_cells(args, data_extra: list[str], run_extra: list[str], out: Path) -> list[dict]:
    cells = []
    for ds in args.datasets:
        for imb in args.ifs:
            data = data_overrides(ds, imb, args, data_extra)
            for ipc in args.ipc:
                for method in args.methods:
                    for seed in args.seeds:
                        run_dir = out / ds / f"if{imb:g}" / f"ipc{ipc}" / method / f"seed{seed}"
                        cells.append({"dataset": ds, "imbalance_factor": imb, "ipc": ipc, "method": method,
                                      "seed": seed, "run_dir": run_dir,
                                      "name": f"{ds} IF {imb:g} IPC {ipc} {method} seed {seed}",
                                      "log": out / "logs" / f"{ds}-if{imb:g}-ipc{ipc}-{method}-s{seed}.log",
                                      "overrides": cell_overrides(data, method, ipc, seed, args, run_dir, run_extra)})
    return cells


# ---- rows ----------------------------------------------------------------------------------------------------
def rows_of(cells: list[dict], args) -> list[dict]:
    """One row per (dataset, IF, IPC, method): quality.py's cell_row over its seeds' results.json."""
    rows = []
    for ds in args.datasets:
        for imb in args.ifs:
            for ipc in args.ipc:
                for method in args.methods:
                    part = [c for c in cells if (c["dataset"], c["imbalance_factor"], c["ipc"], c["method"]) ==
                            (ds, imb, ipc, method)]
                    results = [json.loads((c["run_dir"] / "results.json").read_text()) for c in part]
                    labels = {r.get("labels") for r in results}
                    if labels != {"hard"}:
                        raise SystemExit(f"{ds} IF {imb:g} IPC {ipc} {method}: its results are on label track(s) "
                                         f"{sorted(map(str, labels))}, not hard")
                    row = cell_row(ds, imb, ipc, method, "hard", results[0]["config"]["eval"]["arch"],
                                   [seed_result(c["seed"], r) for c, r in zip(part, results)])
                    row = {"dataset": row.pop("order"), "dataset_config": DATASETS[ds], **row,
                           "eval_depth": eval_depth(results[0]["config"]),
                           "world_sizes": [r["world_size"] for r in results],
                           "run_dirs": [str(c["run_dir"]) for c in part]}
                    rows.append(row)
    return rows


def eval_depth(config: dict) -> int:
    """The depth of the ConvNet each evaluation trained (the extractor's depth rule at the image size)."""
    from csdm_dist.config import to_config

    cfg = to_config(config)
    return cfg.extractor.depth_at(cfg.dataset.image_size)


def published_rows(ds: str) -> list[dict]:
    """PUBLISHED[ds] as JSON-able rows: one per (method, IF, IPC) cell found."""
    return [{"dataset": ds, "method": m, "imbalance_factor": imb, "ipc": ipc, "mean": mean, "std": std,
             "published": True, "source": ref["source"]}
            for m, ref in PUBLISHED.get(ds, {}).items() for (imb, ipc), (mean, std) in ref["cells"].items()]


def markdown(rows: list[dict], args, extra: list[str]) -> str:
    n = len(args.seeds)
    spread = (f"mean +- std over {n} distillation seeds ({', '.join(map(str, args.seeds))})" if n > 1 else
              f"seed {args.seeds[0]}, mean +- std over the {args.repeats} evaluation networks")
    out = [f"Accuracy in % on the balanced test set, {spread}; hard labels"
           + (f"; overrides for every run: `{' '.join(extra)}`" if extra else "") + "."]
    columns = [(imb, ipc) for imb in args.ifs for ipc in args.ipc]
    for ds in args.datasets:
        part = [r for r in rows if r["dataset"] == ds]
        if not part:
            continue
        depth = sorted({r["eval_depth"] for r in part})
        out += ["", f"## {TITLES[ds]}", "", *settings_line(part)[:1],
                f"Evaluation network: ConvNet-{'/'.join(map(str, depth))}.", "",
                "| method | " + " | ".join(f"IF {imb:g}, IPC {ipc}" for imb, ipc in columns) + " |",
                "|---" * (len(columns) + 1) + "|"]
        cell = {(r["imbalance_factor"], r["ipc"], r["method"]): r for r in part}
        for m in args.methods:
            out.append(f"| {m} | " + " | ".join(
                f"{cell[imb, ipc, m]['mean']:.2f} +- {cell[imb, ipc, m]['std']:.2f}" if (imb, ipc, m) in cell else "-"
                for imb, ipc in columns) + " |")
        refs = list(PUBLISHED.get(ds, {}).items())
        sources = list(dict.fromkeys(ref["source"] for _, ref in refs))
        for m, ref in refs:
            out.append(f"| published: {m} [{sources.index(ref['source']) + 1}] | " + " | ".join(
                f"{ref['cells'][imb, ipc][0]:.1f} +- {ref['cells'][imb, ipc][1]:.1f}"
                if (imb, ipc) in ref["cells"] else "" for imb, ipc in columns) + " |")
        out += ["", PROTOCOL_NOTE + " An empty published cell: no number was found for it. "
                + MISSING_NOTE.get(ds, "No published numbers were found for this dataset.")]
        out += [""] + [f"- [{k}] {s}." for k, s in enumerate(sources, 1)]
        for claim in CLAIMS.get(ds, []):
            out += ["", f"Published claim ({claim['method']}), {claim['source']}: \"{claim['quote']}\" "
                        f"({claim['reading']})"]
        out += ["", "Per group (many / medium / few classes by real count), measured here:", "",
                "| IF | IPC | method | overall | many | medium | few | distil s |", "|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['imbalance_factor']:g} | {r['ipc']} | {r['method']} | {r['mean']:.2f} +- {r['std']:.2f} | "
                f"{r['many']:.2f} | {r['medium']:.2f} | {r['few']:.2f} | {r['distill_s']:.0f} |" for r in part]
    return "\n".join(out)


def main(argv=None) -> dict:
    args, extra = parse_args(argv)
    check_args(args)
    args.raw_root = Path(args.raw_root).resolve()
    args.data_root, out = args.data_root.resolve(), args.out_dir.resolve()
    data_extra, run_extra, cluster_extra = split_extra(extra, args.launcher)
    check_raw(args.raw_root, args.datasets, data_extra)
    t0 = time.perf_counter()
    cells = make_cells(args, data_extra, run_extra, out)
    wanted_config(cells[0]["overrides"])  # a bad override stops here, before anything runs
    plan(cells, args.fresh)
    todo = [c for c in cells if c["action"] != "reuse"]
    print(f"{len(cells)} cells: {len(cells) - len(todo)} reused, {len(todo)} to run "
          f"({args.launcher} launcher); run directories under {out}", flush=True)
    built = set()
    for c in cells:
        if c["action"] == "reuse":
            print(f"[{time.perf_counter() - t0:6.0f} s] {c['name']}: reusing {c['run_dir']}", flush=True)
            continue
        key = (c["dataset"], c["imbalance_factor"])
        if key not in built:
            build(*key, args, data_extra, out, t0)
            built.add(key)
        run_cell(c, args, cluster_extra, t0)
    rows = rows_of(cells, args)
    table = markdown(rows, args, extra)
    report = {"datasets": args.datasets, "imbalance_factors": args.ifs, "ipc": args.ipc, "methods": args.methods,
              "seeds": args.seeds, "labels": "hard", "split": "test",
              "protocol": {"eval": args.protocol, "arch": "convnet", "epochs": args.eval_epochs,
                           "repeats": args.repeats, "steps": "config default" if args.steps is None else args.steps},
              "launcher": args.launcher, "extra_overrides": extra, "date": datetime.date.today().isoformat(),
              "machine": machine_info(), "rows": rows,
              "published": [r for ds in args.datasets for r in published_rows(ds)],
              "claims": [dict(c, dataset=ds) for ds in args.datasets for c in CLAIMS.get(ds, [])],
              "total_s": time.perf_counter() - t0, "reused_cells": len(cells) - len(todo)}
    files.write_text(out / "paper.md", table + "\n")
    write_report(out / "paper.json", report)
    print(table)
    return report


if __name__ == "__main__":
    main()
