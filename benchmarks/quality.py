"""Distilled-set quality on Fashion-MNIST-LT: methods x imbalance factors, one evaluation protocol for all.

    .venv/bin/python benchmarks/quality.py --quick            # CPU, under 15 minutes
    .venv/bin/python benchmarks/quality.py                    # full mode (meant for a GPU)
    .venv/bin/python benchmarks/quality.py --methods random dm ncfm csdm --seeds 0 1   # the README's CPU table
    .venv/bin/python benchmarks/quality.py --out-dir DIR --if 10 100 --methods csdm dm -- method.kernel.bandwidth=0.5

For each imbalance factor it builds the long-tailed shards (skipped when they exist), runs
`python -m csdm_dist.distill` once per method (`random` is the IPC-random-real baseline: the starting point of
every other method, the same images), and collects each run's results.json into a Markdown table and a JSON file.
With several `--seeds`, each seed is a separate distillation (and random-real draw); a cell then reports the mean and
std over seeds of each seed's mean over evaluation repeats. `--reuse` keeps a run whose results.json exists.
`csdm-features` is CSDM with real_source=features: it pretrains a pool, extracts feature shards with it (both
skipped when present) and distils against the exact full-data statistics of those fixed extractors.
Every method is evaluated with the same protocol, epochs, repeats and seed. Extra arguments after `--` are Hydra
overrides passed to every distillation (for ablations).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import write_report

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("random", "dm", "ncfm", "csdm", "csdm-features")
MODES = {  # distill iterations, eval epochs, eval repeats
    "quick": {"distill.iterations": 60, "eval.epochs": 100, "eval.repeats": 1},
    "full": {"distill.iterations": 200, "eval.epochs": 300, "eval.repeats": 3},
}
POOL = {"quick": ["extractor.pool_size=1", "extractor.pool_epochs=2"],  # csdm-features: the fixed pool
        "full": ["extractor.pool_size=4", "extractor.pool_epochs=5"]}


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU-sized settings (%s)" % MODES["quick"])
    p.add_argument("--if", dest="ifs", type=float, nargs="+", default=[10, 100, 200], help="imbalance factors")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="distillation seeds; a cell averages them")
    p.add_argument("--reuse", action="store_true", help="keep runs whose results.json exists instead of rerunning")
    p.add_argument("--raw-root", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST idx files")
    p.add_argument("--data-root", default=str(ROOT / "data"))
    p.add_argument("--out-dir", type=Path, default=None, help="default: runs/quality-<mode>")
    p.add_argument("--device", default="auto")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    return args, extra


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n--- {log} ---\n{tail}")


def main(argv=None) -> dict:
    args, extra = parse_args(argv)
    mode = "quick" if args.quick else "full"
    out = args.out_dir or ROOT / "runs" / f"quality-{mode}"
    out.mkdir(parents=True, exist_ok=True)
    data = [f"dataset=fashion_mnist_lt", f"dataset.raw_root={args.raw_root}", f"dataset.data_root={args.data_root}"]
    rows, reused, t_start = [], 0, time.perf_counter()
    for imb in args.ifs:
        run([sys.executable, "-m", "data_prep.build", *data, f"dataset.imbalance_factor={imb:g}"], out / f"build-if{imb:g}.log")
        for method in args.methods:
            seeds = []
            for seed in args.seeds:
                run_dir = out / f"if{imb:g}" / method / f"seed{seed}"
                if args.reuse and (run_dir / "results.json").is_file():
                    reused += 1
                    print(f"[{time.perf_counter() - t_start:6.0f} s] IF {imb:g} {method} seed {seed}: reusing {run_dir}")
                else:
                    print(f"[{time.perf_counter() - t_start:6.0f} s] IF {imb:g} {method} seed {seed} ...", flush=True)
                    if run_dir.exists():  # this benchmark's own cell, rerun from scratch (a run refuses to mix)
                        shutil.rmtree(run_dir)
                    distil(data, imb, method, seed, args, mode, run_dir, extra, out)
                res = json.loads((run_dir / "results.json").read_text())
                acc = res["accuracy"]
                seeds.append({"seed": seed, "mean": acc["mean"], "std": acc["std"], "many": acc["many"],
                              "medium": acc["medium"], "few": acc["few"], "distill_s": res["timing"]["distill_s"],
                              "eval_s": res["timing"]["eval_s"]})
            rows.append({"imbalance_factor": imb, "method": method, **aggregate(seeds), "seeds": seeds})
    table = markdown(rows, args, mode, extra)
    report = {"mode": mode, "settings": MODES[mode], "extra_overrides": extra, "ipc": args.ipc, "seeds": args.seeds,
              "protocol": "dm", "rows": rows, "total_s": time.perf_counter() - t_start,
              "reused_runs": reused}  # total_s excludes the reused runs: their times are in rows[*].seeds
    print(table)
    (out / "quality.md").write_text(table + "\n")
    print(f"\nwrote {out / 'quality.md'} in {report['total_s']:.0f} s")
    write_report(out / "quality.json", report)
    return report


def distil(data: list[str], imb: float, method: str, seed: int, args, mode: str, run_dir: Path, extra: list[str],
           out: Path) -> None:
    """One distillation + evaluation of `method` at imbalance factor `imb` into run_dir."""
    py = sys.executable
    common = [*data, f"dataset.imbalance_factor={imb:g}", f"seed={seed}", f"device={args.device}"]
    source = []
    if method == "csdm-features":
        pool = Path(args.data_root) / "pools" / f"fmnist-if{imb:g}-{mode}-s{seed}.pt"
        source = ["extractor.mode=pool", "extractor.interpolate=false", f"extractor.pool_path={pool}"]
        if not pool.is_file():
            run([py, "-m", "csdm_dist.pretrain", *common, *POOL[mode], f"extractor.pool_path={pool}", *extra],
                out / f"if{imb:g}-s{seed}-pretrain.log")
        run([py, "-m", "data_prep.extract_features", *common, *POOL[mode], *source, *extra],
            out / f"if{imb:g}-s{seed}-extract.log")
        source += ["real_source=features", *POOL[mode]]
    settings = [f"{k}={v}" for k, v in MODES[mode].items()]
    cmd = [py, "-m", "csdm_dist.distill", *common, f"method={method.split('-')[0]}", f"ipc={args.ipc}",
           "baseline=false", f"out_dir={run_dir}", *source, *settings, *extra]
    run(cmd, out / f"if{imb:g}-{method}-s{seed}.log")


def aggregate(seeds: list[dict]) -> dict:
    """One cell from its per-seed results: means over seeds; the std is over the seeds' means when there are
    several seeds, else the evaluation repeats' std of the one seed."""
    n = len(seeds)
    mean = {k: statistics.fmean(s[k] for s in seeds) for k in ("mean", "many", "medium", "few", "distill_s", "eval_s")}
    std = statistics.stdev(s["mean"] for s in seeds) if n > 1 else seeds[0]["std"]
    return {**mean, "std": std, "std_over": "seeds" if n > 1 else "evaluation repeats", "num_seeds": n}


def markdown(rows: list[dict], args, mode: str, extra: list[str]) -> str:
    s, n = MODES[mode], len(args.seeds)
    spread = (f"mean +- std over {n} distillation seeds, each the mean of its evaluation repeats" if n > 1
              else f"seed {args.seeds[0]}, mean +- std over the evaluation repeats")
    lines = [f"Fashion-MNIST-LT, IPC {args.ipc}, {mode} mode: {s['distill.iterations']} distillation steps, dm "
             f"protocol {s['eval.epochs']} epochs x {s['eval.repeats']} repeats; accuracy %, {spread}"
             + (f"; overrides: {' '.join(extra)}" if extra else ""), "",
             "| IF | method | overall | many | medium | few | distil s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['imbalance_factor']:g} | {r['method']} | {r['mean']:.2f} +- {r['std']:.2f} | "
                     f"{r['many']:.2f} | {r['medium']:.2f} | {r['few']:.2f} | {r['distill_s']:.0f} |")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    ifs = list(dict.fromkeys(r["imbalance_factor"] for r in rows))
    cell = {(r["imbalance_factor"], r["method"]): r for r in rows}
    lines += ["", "Overall accuracy:", "", "| IF | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for imb in ifs:
        lines.append(f"| {imb:g} | " + " | ".join(f"{cell[imb, m]['mean']:.2f} +- {cell[imb, m]['std']:.2f}"
                                                   for m in methods) + " |")
    if "csdm" in methods and len(methods) > 1:
        lines += ["", "CSDM against the best other method per IF (overall accuracy, points):", ""]
        lines += [f"- IF {imb:g}: {margin(cell, imb, methods)}" for imb in ifs]
    return "\n".join(lines)


def margin(cell: dict, imb: float, methods: list[str]) -> str:
    """csdm minus the best other method at one IF, overall and per seed (paired: same seed, same real data)."""
    best = max((m for m in methods if m != "csdm"), key=lambda m: cell[imb, m]["mean"])
    ours, theirs = cell[imb, "csdm"], cell[imb, best]
    paired = {s["seed"]: s["mean"] for s in theirs["seeds"]}
    per_seed = [f"{s['mean'] - paired[s['seed']]:+.2f}" for s in ours["seeds"] if s["seed"] in paired]
    return f"csdm - {best} = {ours['mean'] - theirs['mean']:+.2f} (per seed: {', '.join(per_seed)})"

if __name__ == "__main__":
    main()
