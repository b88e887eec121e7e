"""Distilled-set quality on Fashion-MNIST-LT: class orders x imbalance factors x IPC x methods x seeds, one
evaluation protocol for all.

    .venv/bin/python benchmarks/quality.py --quick                       # CPU, under 15 minutes
    .venv/bin/python benchmarks/quality.py --split val --if 100 -- synthetic.factor=2 distill.init=mix   # ablation
    .venv/bin/python benchmarks/quality.py --orders natural hardtail --seeds 0 1 2 --reuse \\
        --results benchmarks/results/quality_full_cpu.json --merge      # the README tables (split over --reuse runs)
    .venv/bin/python benchmarks/quality.py --methods dm csdm --archs convnet vgg11 alexnet resnet18 --reuse

For each class order (`natural`: configs/dataset/fashion_mnist_lt.yaml, `hardtail`: the hard classes in the tail,
fashion_mnist_lt_hardtail.yaml) and imbalance factor it builds the long-tailed shards (skipped when they exist),
then runs `python -m csdm_dist.distill` once per IPC, method and seed (`random` is the IPC-random-real baseline:
the starting point of every other method, the same images and the same multi-formation). Every method gets the
same overrides (factor, init, lr schedule, budget), the same evaluation protocol, epochs, repeats and split.
`--split val` evaluates on the balanced validation split (choosing defaults); the tables are made with `test`.
`--at-steps` also evaluates each run's set after those steps (eval.at_steps): accuracy against steps.
`--archs` evaluates every run's set on each of those networks too (cross-architecture: the set is distilled once,
with the extractor of its config; `python -m csdm_dist.evaluate distilled=<run>/distilled.pt eval.arch=<arch>`
writes `eval-<protocol>-<epochs>ep-x<repeats>[-val]-<arch>[-soft].json` beside it, with the run's own protocol,
epochs, repeats, split and label track; `--arch-repeats N` trains N networks per set on the other networks instead
of the run's repeats, which keeps a CPU table affordable). Every row names its `arch`, and the cross-architecture
table says how many networks each column trained per set.

Each cell reports the mean and std over seeds of each seed's mean over evaluation repeats, the many / medium / few
groups, the settings its runs were made with (read back from their results.json), and for csdm its paired
difference to every other method, seed by seed (same seed: same real data, same starting images), their mean over
the seeds both cells have (not the difference of two cells' means, which may be over different seeds), and the
95 % t interval of that mean over two or more paired seeds (`paired_interval`).
`--reuse` keeps a run whose results.json exists, after checking that it was made with exactly the config this
invocation would run (else it stops and says which keys differ) and that distilled.pt is the set it evaluated;
a run without results.json (interrupted) resumes from its last checkpoint. Without `--reuse` a cell whose run
directory exists is distilled again from scratch, the old run moved aside to `<run dir>.old-<time>` (nothing is
deleted). The default `--out-dir` is runs/quality-<mode> for the mode's own budget, test split and no overrides,
else runs/quality-<mode>-<split>-<hash of the settings>.
`--results` refuses an existing file unless `--merge` is given (a table is never replaced by a smaller one); the
out dir's quality.json holds this invocation's cells alone, written before any merge. `--merge` combines this
invocation's cells with those already in `--results`, seed by seed: a table built over sessions whose run
directories are gone (each row and seed has its `date`). Extra arguments after `--` are Hydra overrides passed to
every distillation.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from common import CONFIGS, compose, machine_info, write_report

from csdm_dist import files
from csdm_dist.config import ARCHS, DistillConfig

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("random", "dm", "ncfm", "csdm", "csdm-features")
ORDERS = {"natural": "fashion_mnist_lt", "hardtail": "fashion_mnist_lt_hardtail"}
MODES = {  # distill iterations, eval epochs, eval repeats
    "quick": {"distill.iterations": 60, "eval.epochs": 100, "eval.repeats": 1},
    "full": {"distill.iterations": DistillConfig().iterations, "eval.epochs": 300, "eval.repeats": 3},  # the default
}
POOL = {"quick": ["extractor.pool_size=1", "extractor.pool_epochs=2"],  # csdm-features: the fixed pool
        "full": ["extractor.pool_size=4", "extractor.pool_epochs=5"]}
# config keys a reused run may differ in: where and how it ran, not what it computed
RUN_ONLY = {"out_dir", "device", "resume", "overwrite", "reevaluate", "force_memory"}


LABELS = ("hard", "soft", "soft-online")  # --labels: the label tracks (soft-online: relabel the hard sets)


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU-sized settings (%s)" % MODES["quick"])
    p.add_argument("--orders", nargs="+", default=["natural"], choices=list(ORDERS), help="class orders")
    p.add_argument("--if", dest="ifs", type=float, nargs="+", default=[10, 100, 200], help="imbalance factors")
    p.add_argument("--ipc", type=int, nargs="+", default=[10], help="images per class (stored)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="distillation seeds; a cell averages them")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="evaluation split: val to choose settings, test for the reported tables")
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default: the mode's)")
    p.add_argument("--at-steps", type=int, nargs="+", default=[], help="also evaluate after these steps")
    p.add_argument("--archs", nargs="+", default=None, choices=ARCHS,
                   help="evaluation networks, each a row (default: the run's own eval.arch only)")
    p.add_argument("--arch-repeats", type=int, default=None,
                   help="with --archs: networks trained per set on each network other than the run's own (default: "
                        "the run's eval.repeats); 1 keeps a cross-architecture table affordable on a CPU")
    p.add_argument("--labels", choices=LABELS, default="hard",
                   help="label track; soft: every method's set gets soft labels from one teacher per class order and "
                        "IF (python -m csdm_dist.teacher with the teacher.* and dataset.* overrides after --), stored "
                        "at the end of its distillation; soft-online: the hard track's sets (its run directories, "
                        "distilled once) evaluated with that teacher's labels of every augmented batch "
                        "(eval.labels=soft eval.relabel=online), so each soft row pairs with the hard row of the "
                        "very same images")
    p.add_argument("--teacher-seed", type=int, default=0, help="--labels soft / soft-online: the teacher's seed")
    p.add_argument("--against", type=Path, default=None,
                   help="the results JSON of the other label track (e.g. --labels soft --against the hard table): "
                        "each row's difference to the same cell there, paired by seed")
    p.add_argument("--reuse", action="store_true", help="keep runs whose results.json exists (config checked)")
    p.add_argument("--raw-root", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST idx files")
    p.add_argument("--data-root", default=str(ROOT / "data"))
    p.add_argument("--out-dir", type=Path, default=None,
                   help="default: runs/quality-<mode>, or runs/quality-<mode>-<split>-<hash> for other settings")
    p.add_argument("--results", type=Path, default=None, help="also write the JSON here (and .md beside it)")
    p.add_argument("--merge", action="store_true",
                   help="with --results: combine this invocation's cells with the rows of the JSON already there, "
                        "seed by seed (cells or seeds measured earlier, whose run directories are gone); it must "
                        "have the same mode, split, label track, budget (--steps, epochs, repeats) and overrides "
                        "after --")
    p.add_argument("--device", default="auto")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.merge and args.results is None:
        p.error("--merge keeps the rows of the --results JSON: give --results")
    if args.arch_repeats is not None and (args.arch_repeats < 1 or not args.archs):
        p.error(f"--arch-repeats {args.arch_repeats}: give a count of 1 or more, with --archs")
    for key in ("orders", "ifs", "ipc", "methods", "seeds", "archs"):  # `--seeds 0 0 1` would count seed 0 twice
        if getattr(args, key) is not None:
            setattr(args, key, list(dict.fromkeys(getattr(args, key))))
    return args, extra


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n--- {log} ---\n{tail}")


def settings_overrides(args, mode: str) -> list[str]:
    """The mode's budget and protocol as overrides, with --steps, --split and --at-steps applied."""
    s = dict(MODES[mode])
    if args.steps is not None:
        s["distill.iterations"] = args.steps
    s["eval.split"] = args.split
    if args.at_steps:
        s["eval.at_steps"] = "[" + ",".join(str(x) for x in args.at_steps) + "]"
    return [f"{k}={v}" for k, v in s.items()]


def short_hash(text: str) -> str:
    """The 8-hex-digit tag of some settings in a file or directory name (teachers, pools, ablation out dirs)."""
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def default_out_dir(args, mode: str, extra: list[str]) -> Path:
    """runs/quality-<mode> for the mode's own settings; any other budget, split or overrides get a directory of
    their own (runs/quality-<mode>-<split>-<hash of them>), so an ablation never reruns the table's cells."""
    settings = settings_overrides(args, mode)
    if args.steps is None and args.split == "test" and not extra:
        return ROOT / "runs" / f"quality-{mode}"
    return ROOT / "runs" / f"quality-{mode}-{args.split}-{short_hash(json.dumps([settings, extra]))}"


def main(argv=None) -> dict:
    args, extra = parse_args(argv)
    mode = "quick" if args.quick else "full"
    out = args.out_dir or default_out_dir(args, mode, extra)
    if args.results is not None and args.results.resolve() == (out / "quality.json").resolve():
        raise SystemExit(f"--results {args.results} is the out dir's own quality.json (this invocation's cells "
                         "alone); give the table another path")
    if args.results is not None and args.results.is_file() and not args.merge:  # never replace a table's rows
        raise SystemExit(f"--results {args.results} exists: pass --merge to add this invocation's cells to its rows, "
                         "or give another --results path (or move the file away) to start a new table")
    previous = json.loads(args.results.read_text()) if args.merge and args.results.is_file() else None
    if previous is not None:  # before hours of runs, not after them
        check_mergeable(previous, args, mode, extra)
    out.mkdir(parents=True, exist_ok=True)
    settings = settings_overrides(args, mode)
    rows, reused, t_start = [], 0, time.perf_counter()
    teachers: dict[str, dict] = {}
    for order in args.orders:
        data = [f"dataset={ORDERS[order]}", f"dataset.raw_root={args.raw_root}", f"dataset.data_root={args.data_root}"]
        for imb in args.ifs:
            run([sys.executable, "-m", "data_prep.build", *data, f"dataset.imbalance_factor={imb:g}",
                 *[o for o in extra if o.startswith("dataset.")]], out / f"build-{order}-if{imb:g}.log")
            soft, teacher = [], None
            if args.labels != "hard":  # one teacher for every method and seed of this order and IF
                path = teacher_file(args, order, imb, extra)
                if not path.is_file():
                    print(f"[{time.perf_counter() - t_start:6.0f} s] {order} IF {imb:g}: training the teacher ...",
                          flush=True)
                    run(teacher_command(data, imb, args, path, extra), out / f"teacher-{order}-if{imb:g}.log")
                teachers[f"{order} IF {imb:g}"] = teacher = teacher_record(path)
                if args.labels == "soft":  # stored at the end of every distillation
                    soft = ["labels.kind=soft", f"labels.teacher={path}"]
            relabeller = teacher if args.labels == "soft-online" else None  # labels every batch of the hard sets
            for ipc in args.ipc:
                for method in args.methods:
                    seeds: dict[str, list[dict]] = {}  # arch -> one result per seed
                    for seed in args.seeds:
                        cell = f"{order} IF {imb:g} IPC {ipc} {method} seed {seed}"
                        track = f"{method}-soft" if args.labels == "soft" else method  # soft-online: the hard sets
                        run_dir = out / order / f"if{imb:g}" / f"ipc{ipc}" / track / f"seed{seed}"
                        steps, distil = commands(data, order, imb, ipc, method, seed, args, mode, run_dir,
                                                 settings + extra + soft, out)
                        if args.reuse and (run_dir / "results.json").is_file():
                            check_reusable(run_dir, distil)
                            reused += 1
                            print(f"[{time.perf_counter() - t_start:6.0f} s] {cell}: reusing {run_dir}")
                        else:
                            print(f"[{time.perf_counter() - t_start:6.0f} s] {cell} ...", flush=True)
                            for cmd, log in rerun(steps, run_dir, args.reuse):
                                run(cmd, log)
                        res = json.loads((run_dir / "results.json").read_text())
                        own = res["config"]["eval"]["arch"]
                        for arch in args.archs or [own]:
                            log = out / (f"{order}-if{imb:g}-ipc{ipc}-{track}-s{seed}-eval-{arch}"
                                         f"{'-soft-online' if relabeller else ''}.log")
                            on_arch = res if arch == own and relabeller is None else arch_result(
                                run_dir, res, arch, args.device, log, t_start, cell,
                                args.arch_repeats if arch != own else None, relabeller)
                            seeds.setdefault(arch, []).append(seed_result(seed, on_arch))
                    rows += [cell_row(order, imb, ipc, method, "hard" if args.labels == "hard" else "soft", arch, s)
                             for arch, s in seeds.items()]
    today = datetime.date.today().isoformat()
    for r in rows:
        r["date"] = today
        for seed in r["per_seed"]:
            seed["date"] = today
    other = json.loads(args.against.read_text())["rows"] if args.against else []

    def report_of(rows: list[dict], teachers: dict, merged: dict) -> tuple[str, dict]:
        table = markdown(rows, args, mode, extra) + track_differences(rows, other) + teachers_markdown(teachers)
        return table, {"dataset": "fashion_mnist_lt", "mode": mode, "split": args.split, "labels": args.labels,
                       "protocol": "dm", "seeds": sorted({k for r in rows for k in r["seeds"]}),
                       "extra_overrides": extra, "settings": settings, "date": today, "machine": machine_info(),
                       "rows": rows, **merged,
                       "total_s": time.perf_counter() - t_start,  # excludes the reused runs: their times are in rows
                       "reused_runs": reused, **({"teachers": teachers} if teachers else {}),
                       **({"against": str(args.against)} if args.against else {})}

    def write(path: Path, table: str, report: dict) -> None:
        path.with_suffix(".md").parent.mkdir(parents=True, exist_ok=True)
        files.write_text(path.with_suffix(".md"), table + "\n")
        write_report(path, report)

    # the out dir's quality.json: this invocation's cells, written before a merge that could refuse them
    table, report = report_of(rows, teachers, {})
    write(out / "quality.json", table, report)
    if args.results is not None:
        table, report = write_results(args, rows, teachers, report_of, write, out, mode, extra)
    print(table)
    return report


@contextlib.contextmanager
def results_lock(path: Path):
    """An exclusive POSIX lock on `<results>.lock` beside a results file, held while it is read, merged and
    written, so two invocations that merge into one table (two queues, two SLURM jobs) take turns instead of one
    losing the other's cells. The lock file stays (empty; ignored by git)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def write_results(args, rows: list[dict], teachers: dict, report_of, write, out: Path, mode: str,
                  extra: list[str]) -> tuple[str, dict]:
    """Write this invocation's cells to --results: merged (--merge) with the rows the file holds now, read again
    under results_lock, not as it was when the invocation started hours before (another invocation may have merged
    its cells since); a file that appeared meanwhile without --merge is refused, the cells staying in out."""
    with results_lock(args.results):
        previous = json.loads(args.results.read_text()) if args.results.is_file() else None
        if previous is not None and not args.merge:
            raise SystemExit(f"--results {args.results} was written by another invocation while this one ran; this "
                             f"invocation's cells are in {out / 'quality.json'}: rerun with --reuse --merge to add "
                             "them (every run is reused)")
        if previous is None:
            table, report = report_of(rows, teachers, {})
        else:
            made = len(rows)
            rows = merge_rows(previous, rows, args, mode, extra)
            teachers = {**previous.get("teachers", {}), **teachers}  # the teachers of the cells kept from before
            table, report = report_of(rows, teachers, {"merged_from": str(args.results), "cells_made": made})
        write(args.results, table, report)
    return table, report


def cell_key(row: dict) -> tuple:
    return row["order"], row["imbalance_factor"], row["ipc"], row["method"], row["labels"], row["arch"]


def merge_rows(previous: dict, rows: list[dict], args, mode: str, extra: list[str]) -> list[dict]:
    """--merge: an earlier report's rows combined with this invocation's, cell by cell and seed by seed: a cell
    measured in both gets the union of their seeds (this invocation's result where both have a seed), rebuilt with
    cell_row (which refuses seeds made with other settings); a cell only in one is kept as it is. Each seed keeps
    the date of the report that tabulated its result, a rebuilt row takes today's. The earlier report must share
    the mode, split, label track and overrides that the table's header states, and the budget and protocol
    (`settings`: steps, evaluation epochs, repeats and split; the at-steps points may differ), so that csdm's
    margins never pair cells of two budgets."""
    check_mergeable(previous, args, mode, extra)
    new = {cell_key(r): r for r in rows}
    merged = []
    for r in previous["rows"]:
        date = r.get("date", previous["date"])
        earlier = [{**s, "date": s.get("date", date)} for s in r["per_seed"]]
        mine = new.pop(cell_key(r), None)
        if mine is None:
            merged.append({**r, "date": date, "per_seed": earlier})
            continue
        fresh = {s["seed"] for s in mine["per_seed"]}
        seeds = sorted([s for s in earlier if s["seed"] not in fresh] + mine["per_seed"], key=lambda s: s["seed"])
        merged.append({**cell_row(*cell_key(r), seeds), "date": mine["date"]})
    return merged + list(new.values())


def check_mergeable(previous: dict, args, mode: str, extra: list[str]) -> None:
    """SystemExit unless the earlier report shares the mode, split, label track, overrides and budget (merge_rows)."""
    def budget(settings):
        return None if settings is None else [s for s in settings if not s.startswith("eval.at_steps=")]

    want = {"mode": mode, "split": args.split, "labels": args.labels, "extra_overrides": extra,
            "settings": budget(settings_overrides(args, mode))}
    previous = {**previous, "settings": budget(previous.get("settings"))}
    differ = [f"{k} {previous.get(k)!r} (this run: {v!r})" for k, v in want.items() if previous.get(k) != v]
    if differ:
        raise SystemExit(f"--merge: {args.results} was made with other {', '.join(differ)}; write to another "
                         "--results file, or rerun its cells with these settings")


TEACHER_KEYS = ("teacher.", "dataset.")  # the overrides after -- that shape a teacher


def teacher_file(args, order: str, imb: float, extra: list[str]) -> Path:
    """<data root>/teachers/quality-<order>-if<IF>-<tag>-s<seed>.pt; tag: a hash of the teacher's settings (the
    teacher.* config the overrides give, defaults included) and the dataset.* overrides, so a teacher made with
    other settings, or with other defaults, is never taken for this one."""
    teacher = asdict(compose([o for o in extra if o.startswith("teacher.")]).teacher)
    keys = json.dumps(teacher, sort_keys=True) + " ".join(sorted(o for o in extra if o.startswith("dataset.")))
    return Path(args.data_root) / "teachers" / f"quality-{order}-if{imb:g}-{short_hash(keys)}-s{args.teacher_seed}.pt"


def teacher_command(data: list[str], imb: float, args, path: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "csdm_dist.teacher", *data, f"dataset.imbalance_factor={imb:g}",
            f"seed={args.teacher_seed}", f"device={args.device}", f"labels.teacher={path}",
            *[o for o in extra if o.startswith(TEACHER_KEYS)]]


def teacher_record(path: Path) -> dict:
    """The teacher's file, settings and test accuracy (its results JSON, written by csdm_dist.teacher)."""
    rec = json.loads(path.with_suffix(".json").read_text())
    return {"path": str(path), "sha256": rec["sha256"], "teacher_config": rec["teacher_config"],
            "seed": rec["seed"], "accuracy": {k: rec["accuracy"][k] for k in ("mean", "many", "medium", "few")}}


def teachers_markdown(teachers: dict[str, dict]) -> str:
    if not teachers:
        return ""
    lines = ["", "", "Teachers of the soft labels (test split, one network each):", "",
             "| cell | loss | arch | epochs | overall | many | medium | few |", "|---|---|---|---|---|---|---|---|"]
    for cell, t in teachers.items():
        c, a = t["teacher_config"], t["accuracy"]
        lines.append(f"| {cell} | {c['loss']} | {c['arch']} | {c['epochs']} | {a['mean']:.2f} | {a['many']:.2f} | "
                     f"{a['medium']:.2f} | {a['few']:.2f} |")
    return "\n".join(lines)


POOL_KEYS = ("extractor.", "dataset.")  # the overrides that shape a csdm-features pool


def pool_file(args, order: str, imb: float, mode: str, seed: int, overrides: list[str]) -> Path:
    """<data root>/pools/fmnist-<order>-if<IF>-<mode>[-<tag>]-s<seed>.pt; tag: a hash of the extractor.* and
    dataset.* overrides when there are any, so a pool pretrained with other settings is never reused for these."""
    shaping = sorted(o for o in overrides if o.startswith(POOL_KEYS))
    tag = f"-{short_hash(' '.join(shaping))}" if shaping else ""
    return Path(args.data_root) / "pools" / f"fmnist-{order}-if{imb:g}-{mode}{tag}-s{seed}.pt"


def records_provenance(pool: Path) -> bool:
    """Whether `pool` exists and records the dataset build it was trained on (distill checks that it is this one)."""
    import torch

    return pool.is_file() and "provenance" in torch.load(pool, map_location="cpu", weights_only=True, mmap=True)


def commands(data, order, imb, ipc, method, seed, args, mode, run_dir: Path, overrides: list[str],
             out: Path) -> tuple[list, list[str]]:
    """One run: the (command, log file) steps to execute, and the distillation's overrides (for the reuse check)."""
    py = sys.executable
    common = [*data, f"dataset.imbalance_factor={imb:g}", f"seed={seed}", f"device={args.device}"]
    steps, source = [], []
    if method == "csdm-features":
        pool = pool_file(args, order, imb, mode, seed, overrides)
        source = ["extractor.mode=pool", "extractor.interpolate=false", f"extractor.pool_path={pool}"]
        if not records_provenance(pool):  # missing, or written before pools recorded their build: pretrain it
            steps.append(([py, "-m", "csdm_dist.pretrain", *common, *POOL[mode], f"extractor.pool_path={pool}",
                           *overrides], out / f"{order}-if{imb:g}-s{seed}-pretrain.log"))
        steps.append(([py, "-m", "data_prep.extract_features", *common, *POOL[mode], *source, *overrides],
                      out / f"{order}-if{imb:g}-s{seed}-extract.log"))
        source += ["real_source=features", *POOL[mode]]
    distil = [*common, f"method={method.split('-')[0]}", f"ipc={ipc}", "baseline=false", f"out_dir={run_dir}",
              *source, *overrides]
    track = run_dir.parent.name  # the method, with -soft on the soft track: a log per run directory
    steps.append(([py, "-m", "csdm_dist.distill", *distil], out / f"{order}-if{imb:g}-ipc{ipc}-{track}-s{seed}.log"))
    return steps, distil


def rerun(steps: list, run_dir: Path, reuse: bool) -> list:
    """The steps of a cell to (re)make. An existing run directory without --reuse is distilled again from scratch:
    distill moves the old run aside to <run_dir>.old-<time> (nothing is deleted); with --reuse, one without
    results.json (interrupted) resumes from its last checkpoint, as distill does by default."""
    if not run_dir.exists() or reuse:
        return steps
    cmd, log = steps[-1]
    return [*steps[:-1], ([*cmd, "resume=false", "overwrite=true"], log)]


def arch_result(run_dir: Path, res: dict, arch: str, device: str, log: Path, t_start: float, cell: str,
                repeats: int | None = None, teacher: dict | None = None) -> dict:
    """The run's results.json `res` with its accuracy (and eval timing and settings) from the evaluation of its set
    on `arch` with `repeats` networks (None: the run's own count) and, given a `teacher` (teacher_record), on the
    soft track with that teacher labelling every batch (eval.relabel=online): the record python -m
    csdm_dist.evaluate writes beside distilled.pt, made now unless it exists with exactly those evaluation settings
    for this very distilled.pt (its sha256: a run distilled further since has another set) and teacher file."""
    from csdm_dist.config import EvalConfig
    from csdm_dist.evaluate import eval_record_name
    from csdm_dist.files import file_sha256

    track = {} if teacher is None else {"labels": "soft", "relabel": "online"}
    ev = EvalConfig(**{**res["config"]["eval"], "arch": arch, **({} if repeats is None else {"repeats": repeats}),
                       **track})
    path = run_dir / eval_record_name(ev)
    want = {k: v for k, v in vars(ev).items() if k != "at_steps"}
    have = json.loads(path.read_text()) if path.is_file() else None
    if (have is None or {k: have["eval"].get(k) for k in want} != want or "eval_s" not in have
            # the set's hash as results.json records it (checked against the file by check_reusable), else read
            or have.get("distilled_sha256") != (res.get("distilled_sha256") or file_sha256(run_dir / "distilled.pt"))
            or (teacher is not None and (have.get("teacher") or {}).get("sha256") != teacher["sha256"])):
        where = arch + (" with online teacher labels" if teacher else "")
        print(f"[{time.perf_counter() - t_start:6.0f} s] {cell}: evaluating on {where} ...", flush=True)
        run([sys.executable, "-m", "csdm_dist.evaluate", f"distilled={run_dir / 'distilled.pt'}", f"eval.arch={arch}",
             f"eval.repeats={ev.repeats}", f"device={device}",
             *([] if teacher is None else ["eval.labels=soft", "eval.relabel=online", f"teacher={teacher['path']}"])],
            log)
        have = json.loads(path.read_text())
    config = {**res["config"], "eval": {**res["config"]["eval"], "arch": arch, "repeats": ev.repeats, **track}}
    if teacher is not None:
        config["labels"] = {**config["labels"], "teacher": teacher["path"]}
    timing = {**res["timing"], "eval_s": have["eval_s"]}
    return {**res, "config": config, "accuracy": have["accuracy"], "timing": timing,
            "accuracy_at_steps": {},  # the run's curve was measured on its own network and track, not on this one
            **({} if teacher is None else {"teacher_sha256": teacher["sha256"]})}


def check_reusable(run_dir: Path, overrides: list[str]) -> None:
    """Stop unless run_dir's results were made with the config `overrides` give now (up to where it ran)."""
    from hydra import compose, initialize_config_dir

    from csdm_dist.config import register_configs, to_config

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        want = asdict(to_config(compose(config_name="config", overrides=overrides)))
    res = json.loads((run_dir / "results.json").read_text())
    diff = sorted(differences(want, res.get("config", {})))
    if diff:
        raise SystemExit(f"--reuse: {run_dir} was made with another config ({', '.join(diff[:6])}"
                         f"{' ...' if len(diff) > 6 else ''} differ); drop --reuse to rerun it, or pass another "
                         "--out-dir")
    from csdm_dist.files import file_sha256

    # results.json names the set it evaluated (runs since 2026-12-07); an interrupted run distilled further since
    # has left another distilled.pt beside it, which a cross-architecture row would otherwise evaluate
    if "distilled_sha256" in res and file_sha256(run_dir / "distilled.pt") != res["distilled_sha256"]:
        raise SystemExit(f"--reuse: {run_dir / 'distilled.pt'} is not the set its results.json evaluated (it was "
                         "distilled further or replaced since); drop --reuse to rerun the cell, or pass another "
                         "--out-dir")


def differences(want: dict, have: dict, prefix: str = "") -> list[str]:
    keys = (set(want) | set(have)) - (RUN_ONLY if not prefix else set())
    out = []
    for k in keys:
        a, b = want.get(k), have.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def seed_result(seed: int, res: dict) -> dict:
    acc, cfg = res["accuracy"], res["config"]
    return {"seed": seed, "mean": acc["mean"], "std": acc["std"], "many": acc["many"], "medium": acc["medium"],
            "few": acc["few"], "per_class": acc.get("per_class"), "class_names": res.get("class_names"),
            # which classes each class's test images were taken for (runs from before it was recorded: None)
            "confused_with": acc.get("confused_with"),
            "distill_s": res["timing"]["distill_s"], "eval_s": res["timing"]["eval_s"],
            "at_steps": {k: v["mean"] for k, v in res.get("accuracy_at_steps", {}).items()},
            "settings": settings_of(cfg, res.get("precision")), "setup": setup_of(cfg),
            "git_commit": res.get("git_commit"),  # the code that made the seed (kept for the record; not compared)
            # the soft track: the very teacher file that labelled the set (a teacher trained again at the same path
            # has another); None on the hard track
            # (stored soft labels: results.json's soft_labels; online labels of a hard set: arch_result's)
            "teacher_sha256": res.get("teacher_sha256") or (res.get("soft_labels") or {}).get("teacher_sha256")}


# config keys that differ between the seeds of one cell, or between machines, without changing what a seed measures:
# the seed itself, where files live (paths, the per-seed pool file), and the extra evaluation points along the way
NOT_SETUP = {"seed", *RUN_ONLY, "dataset.raw_root", "dataset.data_root", "extractor.pool_path", "features.dir",
             "labels.teacher", "eval.at_steps"}


def setup_of(cfg: dict) -> dict:
    """A run's whole stored config, flat ("distill.lr": 0.03), less NOT_SETUP and the keys left null: what the
    seeds of one cell must share (setup_differences), beyond the few settings_of lists."""
    flat = {}

    def walk(d: dict, prefix: str = "") -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif v is not None and f"{prefix}{k}" not in NOT_SETUP:
                flat[f"{prefix}{k}"] = v
    walk(cfg)
    return flat


def default_setup() -> dict:
    """setup_of the configs' defaults under this code (what a key meant before it existed, by the rule that a new
    key's default keeps the old behaviour)."""
    return setup_of(asdict(compose([])))


def setup_differences(seeds: list[dict]) -> list[str]:
    """The config keys on which the seeds of one cell disagree: a value that differs, or a key some seeds lack
    (made before it existed) whose value in the others is not its default. Seeds tabulated before setups were
    recorded (2026-12-07) carry none and are checked by their settings only."""
    setups = [s["setup"] for s in seeds if s.get("setup")]
    if len(setups) < 2:
        return []
    absent, defaults, diff = object(), None, []
    for key in sorted(set().union(*setups)):
        values = [u.get(key, absent) for u in setups]
        present = [v for v in values if v is not absent]
        if any(v != present[0] for v in present):
            diff.append(key)
        elif len(present) < len(values):
            defaults = default_setup() if defaults is None else defaults
            if defaults.get(key, absent) != present[0]:
                diff.append(key)
    return diff


def settings_of(cfg: dict, precision: str | None) -> dict:
    """What a row's runs were made with, read back from their stored config and the extractor forward's precision
    (results.json `precision`, what config `precision` resolved to; None: a run from before it was recorded)."""
    d, m, e = cfg["distill"], cfg["method"], cfg["eval"]
    return {"iterations": d["iterations"], "factor": cfg["synthetic"]["factor"], "init": d["init"], "lr": d["lr"],
            "lr_schedule": d["lr_schedule"], "real_per_class": d["real_per_class"],
            "extractor": cfg["extractor"]["mode"], "precision": precision, "kernel": m["kernel"],
            "labels": {"kind": cfg["labels"]["kind"], "temperature": cfg["labels"]["temperature"],
                       "prior_adjust": cfg["labels"]["prior_adjust"], "teacher": cfg["labels"]["teacher"],
                       # the soft track's class-term weight; runs from before the key trained on KD alone (0)
                       "relabel": e["relabel"], "hard_weight": e.get("hard_weight", 0.0)},
            "weighting": m["weighting"],
            "eval": {"protocol": e["protocol"], "epochs": e["epochs"], "repeats": e["repeats"], "split": e["split"],
                     "arch": e["arch"]},
            "dataset": {"name": cfg["dataset"]["name"], "n_max": cfg["dataset"]["n_max"],
                        "class_order": cfg["dataset"]["class_order"]}}


def cell_row(order: str, imb: float, ipc: int, method: str, labels: str, arch: str, seeds: list[dict]) -> dict:
    settings = [s["settings"] for s in seeds]
    if any(s != settings[0] for s in settings):
        raise SystemExit(f"{order} IF {imb:g} IPC {ipc} {method} {arch}: its seeds ran with different settings")
    teachers = sorted({s["teacher_sha256"] for s in seeds if s.get("teacher_sha256")})
    if len(teachers) > 1:
        raise SystemExit(f"{order} IF {imb:g} IPC {ipc} {method} {arch}: its seeds were labelled by different "
                         f"teacher files (sha256 {', '.join(t[:12] for t in teachers)}): the teacher was trained "
                         "again between them; rerun the older seeds with this teacher (quality.py without "
                         "--reuse), or tabulate them in another --results file")
    differ = setup_differences(seeds)
    if differ:
        raise SystemExit(f"{order} IF {imb:g} IPC {ipc} {method} {arch}: its seeds ran with different configs "
                         f"({', '.join(differ[:6])}{' ...' if len(differ) > 6 else ''} differ); rerun the older seeds "
                         "with this code (quality.py without --reuse), or tabulate them in another --results file")
    steps = sorted({k for s in seeds for k in s["at_steps"]}, key=int)
    curve = {k: statistics.fmean(s["at_steps"][k] for s in seeds) for k in steps
             if all(k in s["at_steps"] for s in seeds)}
    return {"order": order, "imbalance_factor": imb, "ipc": ipc, "method": method, "labels": labels, "arch": arch,
            "seeds": [s["seed"] for s in seeds], "accuracy": [s["mean"] for s in seeds], **aggregate(seeds),
            "accuracy_at_steps": curve, "settings": settings[0], "per_seed": seeds}


def aggregate(seeds: list[dict]) -> dict:
    """One cell from its per-seed results: means over seeds; the std is over the seeds' means when there are
    several seeds, else the evaluation repeats' std of the one seed."""
    n = len(seeds)
    mean = {k: statistics.fmean(s[k] for s in seeds) for k in ("mean", "many", "medium", "few", "distill_s", "eval_s")}
    std = statistics.stdev(s["mean"] for s in seeds) if n > 1 else seeds[0]["std"]
    return {**mean, "std": std, "std_over": "seeds" if n > 1 else "evaluation repeats", "num_seeds": n}


def markdown(rows: list[dict], args, mode: str, extra: list[str]) -> str:
    seed_sets = list(dict.fromkeys(tuple(r["seeds"]) for r in rows)) or [tuple(args.seeds)]
    mixed = len(seed_sets) > 1  # a --merge of cells with different seeds: each row names its own
    n = len(seed_sets[0])
    spread = ("mean +- std over each cell's distillation seeds (after its method), each the mean of its evaluation "
              "repeats; the std of a one-seed cell is the population std over its evaluation repeats" if mixed else
              f"mean +- std over {n} distillation seeds ({', '.join(map(str, seed_sets[0]))}), each the mean of its "
              "evaluation repeats" if n > 1 else
              f"seed {seed_sets[0][0]}, mean +- population std over the evaluation repeats")
    track = {"soft-online": "soft labels from the teacher for every batch (eval.relabel=online) on the hard-label "
                            "sets"}.get(args.labels, f"{args.labels} labels")
    lines = [f"Fashion-MNIST-LT, {mode} mode, {track}, "
             f"{args.split} split; accuracy %, {spread}"
             + (f"; overrides for every method: `{' '.join(extra)}`" if extra else "")]
    groups = list(dict.fromkeys((r["order"], r["ipc"], r["arch"]) for r in rows))
    for order, ipc, arch in groups:
        part = [r for r in rows if (r["order"], r["ipc"], r["arch"]) == (order, ipc, arch)]
        lines += ["", f"### {order} class order, IPC {ipc}, evaluated on {arch}", "", *settings_line(part),
                  "| IF | method | overall | many | medium | few | distil s |", "|---|---|---|---|---|---|---|"]
        for r in part:
            name = r["method"] + (f" (seeds {', '.join(map(str, r['seeds']))})" if mixed else "")
            lines.append(f"| {r['imbalance_factor']:g} | {name} | {r['mean']:.2f} +- {r['std']:.2f} | "
                         f"{r['many']:.2f} | {r['medium']:.2f} | {r['few']:.2f} | {r['distill_s']:.0f} |")
        methods = list(dict.fromkeys(r["method"] for r in part))
        ifs = list(dict.fromkeys(r["imbalance_factor"] for r in part))
        cell = {(r["imbalance_factor"], r["method"]): r for r in part}
        lines += ["", "| IF | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for imb in ifs:
            lines.append(f"| {imb:g} | " + " | ".join(
                f"{cell[imb, m]['mean']:.2f} +- {cell[imb, m]['std']:.2f}" if (imb, m) in cell else "-"
                for m in methods) + " |")
        if "csdm" in methods and len(methods) > 1:
            lines += ["", "csdm minus each other method, overall accuracy in points (paired by seed):", ""]
            for label, key in (("", "mean"), (", few group", "few")):
                lines += [f"- IF {imb:g}{label}: {text}" for imb in ifs if (imb, "csdm") in cell
                          for text in [margin(cell, imb, methods, key)] if text]
        lines += per_class_markdown(part)
        curves = [r for r in part if r["accuracy_at_steps"]]
        if curves:
            steps = sorted({k for r in curves for k in r["accuracy_at_steps"]}, key=int)
            lines += ["", "Accuracy against distillation steps:", "", "| IF | method | " + " | ".join(steps) + " |",
                      "|---|---" + "|---" * len(steps) + "|"]
            lines += [f"| {r['imbalance_factor']:g} | {r['method']} | " + " | ".join(
                f"{r['accuracy_at_steps'][k]:.2f}" if k in r["accuracy_at_steps"] else "-" for k in steps) + " |"
                for r in curves]
    return "\n".join(lines + cross_arch_markdown(rows))


def cross_arch_markdown(rows: list[dict]) -> list[str]:
    """Method x evaluation network, per class order, IPC and IF, with csdm's paired margins on each network
    (nothing when every row has one network)."""
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    if len(archs) < 2:
        return []
    lines = ["", "### Cross-architecture: overall accuracy on each evaluation network (sets distilled once)"]
    for order, ipc in dict.fromkeys((r["order"], r["ipc"]) for r in rows):
        part = [r for r in rows if (r["order"], r["ipc"]) == (order, ipc)]
        cell = {(r["imbalance_factor"], r["method"], r["arch"]): r for r in part}
        methods = list(dict.fromkeys(r["method"] for r in part))
        nets = {a: sorted({r["settings"]["eval"]["repeats"] for r in part if r["arch"] == a}) for a in archs}
        heads = [f"{a} (x{'/'.join(map(str, nets[a]))})" if nets[a] else a for a in archs]
        lines += ["", f"{order} class order, IPC {ipc}; (xN): networks trained per set:", "",
                  "| IF | method | " + " | ".join(heads) + " |", "|---|---" + "|---" * len(archs) + "|"]
        ifs = list(dict.fromkeys(r["imbalance_factor"] for r in part))
        for imb in ifs:
            for m in methods:
                lines.append(f"| {imb:g} | {m} | " + " | ".join(
                    f"{cell[imb, m, a]['mean']:.2f} +- {cell[imb, m, a]['std']:.2f}" if (imb, m, a) in cell else "-"
                    for a in archs) + " |")
        if "csdm" in methods and len(methods) > 1:
            lines += ["", "csdm minus each other method on each network (paired by seed):", ""]
            for imb in ifs:
                for a in archs:
                    on_a = {(i, m): r for (i, m, x), r in cell.items() if x == a}
                    text = margin(on_a, imb, methods) if (imb, "csdm") in on_a else ""
                    if text:
                        lines.append(f"- IF {imb:g}, {a}: {text}")
    return lines


def track_differences(rows: list[dict], other: list[dict]) -> str:
    """Each row minus the row of the same cell and network in another label track, over the seeds both have
    (same seed: same real data and the same images before the labels); sets each row's `versus`."""
    def key(r):
        return r["order"], r["imbalance_factor"], r["ipc"], r["method"], r["arch"]

    index = {key(o): o for o in other}
    lines = []
    for r in rows:
        o = index.get(key(r))
        if o is None or o["labels"] == r["labels"]:
            continue
        per_seed = paired(dict(zip(r["seeds"], r["accuracy"])), dict(zip(o["seeds"], o["accuracy"])))
        if not per_seed:
            continue
        differ = sorted(k for k in set(r["settings"]) | set(o["settings"])
                        if k != "labels" and r["settings"].get(k) != o["settings"].get(k))
        r["versus"] = {"labels": o["labels"], "mean": statistics.fmean(per_seed.values()), "per_seed": per_seed,
                       "settings_differ": differ}
        lines.append(f"- {r['order']} IF {r['imbalance_factor']:g} IPC {r['ipc']} {r['arch']}, {r['method']}: "
                     f"{r['labels']} - {o['labels']} = {r['versus']['mean']:+.2f} (per seed: "
                     + ", ".join(f"{s} {d:+.2f}" for s, d in per_seed.items()) + ")"
                     + (f"; the settings also differ in {', '.join(differ)}" if differ else ""))
    if not lines:
        return ""
    return "\n".join(["", "", "Against the other label track (paired by seed):", "", *lines])


def settings_line(part: list[dict]) -> list[str]:
    """The settings the rows were made with, once when they share them."""
    s = [r["settings"] for r in part]
    a = s[0]
    e = a["eval"]
    text = (f"Settings: {a['iterations']} steps, factor {a['factor']}, init {a['init']}, lr {a['lr']:g} "
            f"({a['lr_schedule']}), {a['extractor']} extractors in {a.get('precision') or 'unrecorded precision'}; "
            f"evaluation {e['protocol']} protocol, {e['arch']}, "
            f"{e['epochs']} epochs x {e['repeats']} repeats on {e['split']}")
    same = all((x["iterations"], x["factor"], x["init"], x["lr"], x["lr_schedule"]) ==
               (a["iterations"], a["factor"], a["init"], a["lr"], a["lr_schedule"]) for x in s)
    return [text + ("" if same else " (rows differ: see the JSON)") + ".", ""]


# two-sided 95 % quantiles of Student's t by degrees of freedom (1 to 30); beyond, the normal 1.96
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired_interval(diffs: list[float]) -> tuple[float, float] | None:
    """The 95 % confidence interval of the mean of paired differences (one per seed): mean +- t * sd / sqrt(n),
    t of n - 1 degrees of freedom. None below two seeds. With three seeds t is 4.30: the interval is wide, and an
    interval that excludes 0 is the evidence a margin needs."""
    n = len(diffs)
    if n < 2:
        return None
    half = (T95[n - 2] if n - 1 <= len(T95) else 1.96) * statistics.stdev(diffs) / n ** 0.5
    mean = statistics.fmean(diffs)
    return mean - half, mean + half


def paired(ours: dict[int, float], theirs: dict[int, float]) -> dict[int, float]:
    """seed -> ours - theirs, over the seeds both have, in the order of `ours`."""
    return {s: v - theirs[s] for s, v in ours.items() if s in theirs}


def margin(cell: dict, imb: float, methods: list[str], key: str = "mean") -> str:
    """csdm minus every other method at one IF, in `key` (overall: mean; or a group: many, medium, few), over the
    seeds both cells have (paired: same seed, same real data, same starting images): the mean of the paired
    differences, each one and, over two or more, the 95 % confidence interval of their mean. A method without a
    seed in common with csdm is left out; "" when no method is left."""
    ours, parts = cell[imb, "csdm"], []
    others = sorted((m for m in methods if m != "csdm" and (imb, m) in cell), key=lambda m: -cell[imb, m]["mean"])
    for m in others:
        diffs = paired({s["seed"]: s[key] for s in ours["per_seed"]},
                       {s["seed"]: s[key] for s in cell[imb, m]["per_seed"]})
        if not diffs:
            continue
        ci = paired_interval(list(diffs.values()))
        parts.append(f"csdm - {m} = {statistics.fmean(diffs.values()):+.2f} (per seed: "
                     f"{', '.join(f'{s} {d:+.2f}' for s, d in diffs.items())}"
                     + ("" if ci is None else f"; 95 % CI {ci[0]:+.2f} to {ci[1]:+.2f}") + ")")
    return "; ".join(parts)


def per_class_markdown(part: list[dict]) -> list[str]:
    """Each class's test recall (mean over a row's seeds) for the rows whose every seed recorded it, classes in
    their long-tailed order (head first), named where the runs recorded the names, else by index."""
    rows = [r for r in part if all(s.get("per_class") for s in r["per_seed"])]
    if not rows:
        return []
    names = {tuple(s.get("class_names") or ()) for r in rows for s in r["per_seed"]}
    header = list(names.pop()) if len(names) == 1 and () not in names else None
    n = len(rows[0]["per_seed"][0]["per_class"])
    lines = ["", "Per-class recall, % (mean over each row's seeds; classes in long-tailed order, head first"
             + ("" if header else "; these runs did not record class names: long-tailed indices") + "):", "",
             "| IF | method | " + " | ".join(header or map(str, range(n))) + " |", "|---|---" + "|---" * n + "|"]
    for r in rows:
        mean = [statistics.fmean(s["per_class"][c] for s in r["per_seed"]) for c in range(n)]
        lines.append(f"| {r['imbalance_factor']:g} | {r['method']} | " + " | ".join(f"{v:.1f}" for v in mean) + " |")
    return lines


if __name__ == "__main__":
    main()
