"""Per-step time of distillation, broken down by phase, for 1 and 2 processes on the CPU.

    .venv/bin/python benchmarks/distributed.py --out benchmarks/results/distributed_cpu.json

The parent launches this same file under torchrun once per configuration NxT (N processes x T threads; gloo, a
free local port). The main runs use T = cores // N, so N processes share the cores instead of oversubscribing
them; a 1x1 run is the per-core reference. Each rank builds a Distiller on random tensors shaped and counted like
the dataset (common.build_distiller) with its PhaseTimer on, and calls `train_step`: warm-up steps, then measured
steps. Per phase the table gives the median ms per step, max over ranks (the slowest rank sets the pace).
The host allocator needs no setting here: init_distributed() keeps freed memory in the heap (dist.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (PHASES, ROOT, OtherLoad, build_distiller, compose, cores_available, machine_info, timed_step,
                    wait_idle, write_report)

KEYS = (*PHASES, "real", "step")  # real = real_features + real_statistics; step = wall time of train_step
NOTE = ("On 2 cores one process already uses both cores through its 2 threads, so the 1 -> 2 process speed-up "
        "of the real-data phase (1x2 -> 2x1) is bounded near 1x; per-core scaling 1x1 -> 2x1 is the meaningful "
        "number (measured earlier at ~1.94-2.0x).")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2], help="process counts to measure")
    p.add_argument("--steps", type=int, default=10, help="measured steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (allocation, first-call costs)")
    p.add_argument("--dataset", default="cifar10_lt", help="dataset config group (shape and class counts only)")
    p.add_argument("--real-per-class", type=int, default=128, help="distill.real_per_class")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    p.add_argument("--no-reference", action="store_true", help="skip the 1 process x 1 thread reference run")
    p.add_argument("--wait-idle", type=float, default=120,
                   help="before each launch, wait up to this many seconds for the CPU to be idle (< 10%% busy)")
    p.add_argument("--retries", type=int, default=1,
                   help="relaunch a run during which other processes used > 0.25 cores, at most this many times")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per torchrun launch")
    p.add_argument("--worker-result", type=Path, default=None, help=argparse.SUPPRESS)  # set by the parent
    return p.parse_args(argv)


def overrides(args: argparse.Namespace) -> list[str]:
    return [f"dataset={args.dataset}", "device=cpu", f"ipc={args.ipc}",
            f"distill.real_per_class={args.real_per_class}", *args.override]


def worker(args: argparse.Namespace) -> None:
    """One rank under torchrun; rank 0 writes the run's result to --worker-result."""
    import resource

    import torch
    import torch.distributed as dist

    from csdm_dist.dist import close_distributed, init_distributed

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count() or 1)
    cfg = compose(overrides(args))
    rt = init_distributed("cpu")
    try:
        with tempfile.TemporaryDirectory(prefix="csdm-bench-") as tmp:
            distiller = build_distiller(cfg, rt, Path(tmp), timer=True)
            for step in range(args.warmup):
                distiller.train_step(step)
            dist.barrier()
            per_step: dict[str, list[float]] = {k: [] for k in KEYS}
            real_images = []
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
            for step in range(args.warmup, args.warmup + args.steps):
                wall, took, out = timed_step(distiller, step)
                per_step["step"].append(wall)
                for k in PHASES:
                    per_step[k].append(took[k])
                per_step["real"].append(per_step["real_features"][-1] + per_step["real_statistics"][-1])
                real_images.append(float(out["real_images"]))  # the global real batch of the step
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            medians = torch.tensor([statistics.median(per_step[k]) for k in KEYS], dtype=torch.float64)
            slowest = medians.clone()
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            if rt.is_main:
                result = {
                    "nprocs": rt.world_size, "torch_num_threads": torch.get_num_threads(),
                    "max_over_ranks_median_s": dict(zip(KEYS, slowest.tolist())),
                    "rank0_median_s": dict(zip(KEYS, medians.tolist())),
                    "rank0_per_step_s": per_step,
                    "rank0_usage_per_step": {"minor_page_faults": (ru1.ru_minflt - ru0.ru_minflt) / args.steps,
                                             "user_s": (ru1.ru_utime - ru0.ru_utime) / args.steps,
                                             "system_s": (ru1.ru_stime - ru0.ru_stime) / args.steps},
                    "real_images_per_step_median": statistics.median(real_images),
                    "real_class_counts": distiller.real.counts.tolist(),
                    "synthetic_images_per_rank": len(distiller.syn.ids),
                    "allreduce_bytes_per_step": distiller.allreduce_bytes,
                    "untracked_phases": sorted(set(distiller.timer.totals) - set(PHASES)),
                }
                args.worker_result.write_text(json.dumps(result, indent=1))
            dist.barrier()
    finally:
        close_distributed()


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, nprocs: int, threads: int, result: Path) -> dict:
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nnodes=1", f"--nproc_per_node={nprocs}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(Path(__file__).resolve()),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--dataset", args.dataset,
           "--real-per-class", str(args.real_per_class), "--ipc", str(args.ipc), "--worker-result", str(result)]
    for o in args.override:
        cmd += ["--override", o]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    busy = wait_idle(args.wait_idle)
    print(f"[bench] {nprocs} process(es) x {threads} thread(s); CPU busy before: "
          f"{'?' if busy is None else f'{100 * busy:.0f}%'} ...", flush=True)
    with OtherLoad() as load:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0 or not result.is_file():
        sys.stderr.write(proc.stdout[-6000:] + "\n" + proc.stderr[-6000:] + "\n")
        raise SystemExit(f"torchrun with {nprocs} process(es) failed (exit {proc.returncode})")
    out = json.loads(result.read_text())
    out.update(threads_per_process=threads, cpu_busy_before_launch=busy, other_processes_cores=load.cores)
    print(f"[bench]   done; other processes used {'?' if load.cores is None else f'{load.cores:.2f}'} cores",
          flush=True)
    return out


def main() -> None:
    args = parse_args()
    if args.worker_result is not None:
        worker(args)
        return
    cores = cores_available()
    main_runs = [(n, max(1, cores // n)) for n in sorted(set(args.nprocs))]
    plan = main_runs + ([(1, 1)] if not args.no_reference and (1, 1) not in main_runs else [])
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="csdm-bench-") as tmp:
        for n, t in plan:
            for attempt in range(args.retries + 1):
                r = launch(args, n, t, Path(tmp) / f"{n}x{t}-{attempt}.json")
                if (r["other_processes_cores"] or 0) <= 0.25 or attempt == args.retries:
                    break
                print("[bench]   the machine was shared: running it again", flush=True)
            r["attempts"] = attempt + 1
            runs[f"{n}x{t}"] = r

    # speed-ups: the first main run to each other main run, and 1x1 to each Nx1 run (per-core scaling)
    base = f"{main_runs[0][0]}x{main_runs[0][1]}"
    pairs = [(base, f"{n}x{t}") for n, t in main_runs[1:]]
    if "1x1" in runs and base != "1x1":
        pairs += [("1x1", f"{n}x{t}") for n, t in main_runs[1:] if t == 1]
    med = {name: r["max_over_ranks_median_s"] for name, r in runs.items()}
    speedups = {f"{a}->{b}": {k: med[a][k] / med[b][k] if med[b][k] > 0 else None for k in KEYS} for a, b in pairs}

    r0 = runs[base]
    print(f"\n{args.dataset}, ipc {args.ipc}, real_per_class {args.real_per_class} (global real batch "
          f"{r0['real_images_per_step_median']:.0f} images/step); {args.warmup} warm-up + {args.steps} measured "
          f"steps; median ms per step, max over ranks; {cores} cores; NxT = N processes x T threads.")
    print("| phase | " + " | ".join(runs) + " | " + " | ".join(f"speed-up {p}" for p in speedups) + " |")
    print("|" + "---|" * (1 + len(runs) + len(speedups)))
    for k in KEYS:
        cells = [f"{1000 * m[k]:.1f}" for m in med.values()]
        cells += ["-" if s[k] is None else f"{s[k]:.2f}x" for s in speedups.values()]
        print(f"| {({'real': 'real (features + statistics)', 'step': 'step (wall)'}).get(k, k)} | "
              + " | ".join(cells) + " |")
    for p, s in speedups.items():
        kind = "per-core scaling" if p.startswith("1x1->") else "process speed-up at equal cores"
        print(f"real-data phase, {kind} {p}: {s['real']:.2f}x")
    for name, r in runs.items():
        u = r["rank0_usage_per_step"]
        print(f"  {name}: rank 0 per step {u['minor_page_faults'] / 1000:.0f}k page faults, user {u['user_s']:.2f} s, "
              f"system {u['system_s']:.2f} s; other processes {r['other_processes_cores'] or 0:.2f} cores")
    print(f"all-reduce payload per step: {r0['allreduce_bytes_per_step']} bytes; the all_reduce phase includes "
          f"waiting for the slower rank.\nNote: {NOTE}")

    if args.out is not None:
        result = {"benchmark": "distributed_cpu", "command": " ".join([Path(sys.executable).name, *sys.argv]),
                  "machine": machine_info(), "config_overrides": overrides(args), "warmup_steps": args.warmup,
                  "steps": args.steps, "statistic": "median over measured steps of each rank, then max over ranks",
                  "note": NOTE,
                  "phases_ms_per_step": {n: {k: 1000 * v for k, v in m.items()} for n, m in med.items()},
                  "speedups": speedups, "runs": runs}
        write_report(args.out, result)


if __name__ == "__main__":
    main()
