"""Per-step time of distillation, broken down by phase, for 1 and 2 processes on the CPU.

    .venv/bin/python benchmarks/distributed.py --out benchmarks/results/distributed_cpu.json

The parent process launches this same file under torchrun once per process count (gloo, a free local port,
OMP_NUM_THREADS = cores // nprocs so that N processes share the cores instead of oversubscribing them) and
collects what rank 0 of each run writes. A worker composes the real Hydra config (configs/config.yaml with the
overrides below), fills RealData with random uint8 images shaped and counted like the dataset's long-tailed
training split (global ids 0..N-1, rank r holding ids r, r + world, ...; no shards are read), starts from random
synthetic images, builds the Distiller with its PhaseTimer on, and calls `train_step` directly: warm-up steps,
then measured steps. Per phase it reports the median seconds per step (rank 0, and the max over ranks: the
slowest rank sets the pace), the median step wall time, and the all-reduce payload per step.

Besides the runs at cores // nprocs threads, a 1 process x 1 thread run gives the per-core reference. Each set of
runs is made with glibc malloc as is and with it tuned (`--malloc`): as is, the activation buffers of the real
batch (hundreds of MB) are unmapped when freed and faulted in again at the next step, which costs about as much
system time as the convolutions' user time on this machine. The parent waits for an idle CPU before each launch,
measures how many cores other processes used meanwhile, and relaunches a run that was shared (`--retries`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PHASES = ("draws", "real_features", "real_statistics", "all_reduce", "syn_forward", "syn_backward", "optimizer")
DERIVED = ("real", "step")  # real = real_features + real_statistics (per step); step = wall time of train_step
# head-class count of each raw training split, used when dataset.n_max is null (imagenet_lt's counts come from
# its split lists: pass --override dataset.n_max=... for it)
RAW_N_MAX = {"fashion_mnist": 6000, "cifar10": 5000, "cifar100": 500, "tiny_imagenet": 500, "imagenet": 1300}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2], help="process counts to measure")
    p.add_argument("--steps", type=int, default=10, help="measured steps per process count")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (allocation, first-call costs)")
    p.add_argument("--dataset", default="cifar10_lt", help="dataset config group (shape and class counts only)")
    p.add_argument("--real-per-class", type=int, default=128, help="distill.real_per_class: real images per class per step")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the reference run of 1 process on 1 thread (per-core scaling)")
    p.add_argument("--malloc", choices=("default", "tuned", "both"), default="both",
                   help="glibc malloc as is, tuned (MALLOC_MMAP_MAX_=0, a large MALLOC_TRIM_THRESHOLD_: freed "
                        "activation buffers stay in the heap instead of being unmapped and faulted in again "
                        "every step), or both")
    p.add_argument("--wait-idle", type=float, default=120,
                   help="before each launch, wait up to this many seconds for the CPU to be idle (< 10%% busy)")
    p.add_argument("--retries", type=int, default=1,
                   help="relaunch a run during which other processes used > 0.25 cores, at most this many times")
    p.add_argument("--comm-reps", type=int, default=20, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per torchrun launch")
    p.add_argument("--worker-result", type=Path, default=None, help=argparse.SUPPRESS)  # set by the parent
    return p.parse_args(argv)


def overrides(args: argparse.Namespace) -> list[str]:
    return [f"dataset={args.dataset}", "device=cpu", "evaluate=false", f"ipc={args.ipc}",
            f"distill.real_per_class={args.real_per_class}", "distill.log_every=1000000", "distill.image_every=0",
            "distill.checkpoint_every=0", "resume=false", *args.override]


# ---------------------------------------------------------------------------------------------------------------
# worker: one rank under torchrun
# ---------------------------------------------------------------------------------------------------------------

def worker(args: argparse.Namespace) -> None:
    import logging
    import resource

    import torch
    import torch.distributed as dist
    from hydra import compose, initialize_config_dir

    from csdm_dist import rng
    from csdm_dist.config import register_configs, to_config
    from csdm_dist.data.longtail import longtail_counts
    from csdm_dist.dist import ParallelLayout, close_distributed, init_distributed
    from csdm_dist.distiller import Distiller, Normalizer, PhaseTimer, RealData
    from csdm_dist.synthetic import SyntheticSet
    from csdm_dist.tblog import NullLogger

    logging.basicConfig(level=logging.WARNING)
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count() or 1
    torch.set_num_threads(threads)

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        dcfg = compose(config_name="config", overrides=overrides(args))
    rt = init_distributed("cpu")
    try:
        with tempfile.TemporaryDirectory(prefix="csdm-bench-") as tmp:
            out_dir = Path(tmp) / f"rank{rt.rank}"
            dcfg.out_dir = str(out_dir)
            cfg = to_config(dcfg)
            torch.manual_seed(cfg.seed)
            layout = ParallelLayout.from_world(cfg.parallel.replicas, rt.rank, rt.world_size)
            d = cfg.dataset

            # the long-tailed training split, as random pixels: class-major global ids, rank s holds s::shards
            n_max = d.n_max or RAW_N_MAX.get(d.source)
            if n_max is None:
                raise SystemExit(f"no head-class count known for {d.source}: pass --override dataset.n_max=N")
            counts = torch.tensor(longtail_counts(n_max, d.num_classes, d.imbalance_factor), dtype=torch.long)
            all_labels = torch.repeat_interleave(torch.arange(d.num_classes), counts)
            ids = torch.arange(layout.shard_rank, len(all_labels), layout.shards)
            g = torch.Generator().manual_seed(1000 + layout.shard_rank)
            images = torch.randint(0, 256, (len(ids), d.channels, d.image_size, d.image_size), generator=g,
                                   dtype=torch.uint8)
            real = RealData(images, all_labels[ids], ids, counts)

            norm = Normalizer.build(d.mean, d.std, rt.device)
            full = torch.randn((d.num_classes * cfg.ipc, d.channels, d.image_size, d.image_size),
                               generator=torch.Generator().manual_seed(cfg.seed))
            syn = SyntheticSet.from_full(full, d.num_classes, cfg.ipc, layout)
            distiller = Distiller(cfg, rt, layout, real, syn, norm, NullLogger(), out_dir)
            distiller.timer = PhaseTimer(enabled=True, device=rt.device)

            per_step: dict[str, list[float]] = {k: [] for k in (*PHASES, *DERIVED)}
            real_images: list[float] = []
            local_batch: list[int] = []  # this rank's real images per step (computed outside the timed step)
            for step in range(args.warmup):
                distiller.train_step(step)
            dist.barrier()
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
            for step in range(args.warmup, args.warmup + args.steps):
                before = dict(distiller.timer.totals)
                t0 = time.perf_counter()
                out = distiller.train_step(step)
                wall = time.perf_counter() - t0
                after = distiller.timer.totals
                delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in PHASES}
                for k in PHASES:
                    per_step[k].append(delta[k])
                per_step["real"].append(delta["real_features"] + delta["real_statistics"])
                per_step["step"].append(wall)
                real_images.append(float(out["real_images"]))  # global real batch of the step (all ranks)
                u = rng.sample_uniforms(real.ids, cfg.seed, step, rng.REAL_PICK).squeeze(1)
                local_batch.append(int((u < distiller.keep_prob[real.labels]).sum()))
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            usage = {"minor_page_faults": (ru1.ru_minflt - ru0.ru_minflt) / args.steps,
                     "user_s": (ru1.ru_utime - ru0.ru_utime) / args.steps,
                     "system_s": (ru1.ru_stime - ru0.ru_stime) / args.steps}  # rank 0, per measured step
            unknown = sorted(set(distiller.timer.totals) - set(PHASES))

            keys = [*PHASES, *DERIVED]
            local_median = torch.tensor([statistics.median(per_step[k]) for k in keys], dtype=torch.float64)
            local_mean = torch.tensor([statistics.fmean(per_step[k]) for k in keys], dtype=torch.float64)
            max_median = local_median.clone()
            dist.all_reduce(max_median, op=dist.ReduceOp.MAX)
            max_mean = local_mean.clone()
            dist.all_reduce(max_mean, op=dist.ReduceOp.MAX)
            local_real = torch.tensor([float(len(ids))], dtype=torch.float64)  # real images held by this rank
            held = [torch.zeros_like(local_real) for _ in range(rt.world_size)]
            dist.all_gather(held, local_real)
            batches = [torch.zeros(args.steps, dtype=torch.long) for _ in range(rt.world_size)]
            dist.all_gather(batches, torch.tensor(local_batch, dtype=torch.long))
            per_rank = torch.stack(batches).double()  # [world, steps]
            imbalance = (per_rank.max(0).values / per_rank.mean(0)).median().item()

            # the step's three all-reduces alone (real packed sums + counts, synthetic sums, synthetic counts),
            # each repetition after a barrier: communication without the wait for a slower rank
            c = d.num_classes
            f = distiller.allreduce_bytes // (8 * c) - 1
            bufs = [torch.zeros(c, f + 1), torch.zeros(c, f), torch.zeros(c)]
            comm = []
            for _ in range(args.comm_reps):
                dist.barrier()
                t0 = time.perf_counter()
                for b in bufs:
                    dist.all_reduce(b, group=layout.shard_group)
                comm.append(time.perf_counter() - t0)
            comm_max = torch.tensor([statistics.median(comm)], dtype=torch.float64)
            dist.all_reduce(comm_max, op=dist.ReduceOp.MAX)

            if rt.is_main:
                result = {
                    "nprocs": rt.world_size,
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "torch_num_threads": torch.get_num_threads(),
                    "rank0_median_s": dict(zip(keys, local_median.tolist())),
                    "rank0_mean_s": dict(zip(keys, local_mean.tolist())),
                    "max_over_ranks_median_s": dict(zip(keys, max_median.tolist())),
                    "max_over_ranks_mean_s": dict(zip(keys, max_mean.tolist())),
                    "rank0_per_step_s": per_step,
                    "real_images_per_step_median": statistics.median(real_images),
                    "real_images_per_rank_per_step": per_rank.long().tolist(),
                    "real_batch_imbalance_median": imbalance,  # max over ranks / mean over ranks, median over steps
                    "allreduce_comm_only_median_s": comm_max.item(),
                    "rank0_usage_per_step": usage,
                    "real_images_held_per_rank": [int(h.item()) for h in held],
                    "real_class_counts": counts.tolist(),
                    "synthetic_images_per_rank": len(syn.ids),
                    "allreduce_bytes_per_step": distiller.allreduce_bytes,
                    "feature_dim": distiller.extractor.feature_dim,
                    "untracked_phases": unknown,
                }
                args.worker_result.write_text(json.dumps(result, indent=1))
            dist.barrier()
    finally:
        close_distributed()


# ---------------------------------------------------------------------------------------------------------------
# parent: launch, collect, print
# ---------------------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPU time that was busy over `seconds` (from /proc/stat), before a launch: other load."""
    def sample() -> tuple[int, int]:
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        return sum(vals[:8]), idle
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}


def launch(args: argparse.Namespace, nprocs: int, threads: int, extra_env: dict[str, str], result: Path) -> dict:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nnodes=1", f"--nproc_per_node={nprocs}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(Path(__file__).resolve()),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--dataset", args.dataset,
           "--real-per-class", str(args.real_per_class), "--ipc", str(args.ipc), "--worker-result", str(result)]
    for o in args.override:
        cmd += ["--override", o]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", **extra_env}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    busy = cpu_busy()
    deadline = time.monotonic() + args.wait_idle
    while busy is not None and busy > 0.1 and time.monotonic() < deadline:
        busy = cpu_busy(2.0)
    print(f"[bench] {nprocs} process(es) x {threads} thread(s){' ' + str(extra_env) if extra_env else ''}; "
          f"CPU already busy: {'?' if busy is None else f'{100 * busy:.0f}%'} ...", flush=True)
    if busy is not None and busy > 0.2:
        print("[bench]   warning: other processes are using the CPU; the numbers will be skewed", flush=True)
    cpu0, own0, t0 = cpu_seconds(), children_cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result.is_file():
        sys.stderr.write(proc.stdout[-6000:] + "\n" + proc.stderr[-6000:] + "\n")
        raise SystemExit(f"torchrun with {nprocs} process(es) failed (exit {proc.returncode})")
    out = json.loads(result.read_text())
    other = None
    if cpu0 is not None and (cpu1 := cpu_seconds()) is not None:
        other = max(0.0, (cpu1 - cpu0) - (children_cpu_seconds() - own0)) / wall  # cores used by others, mean
    out.update(threads_per_process=threads, env=extra_env, launch_wall_s=wall, cpu_busy_before_launch=busy,
               other_processes_cores_during_launch=other)
    note = f", other processes used {other:.2f} cores meanwhile" if other is not None else ""
    print(f"[bench]   done in {wall:.0f} s{note}", flush=True)
    if other is not None and other > 0.1:
        print("[bench]   warning: the machine was shared during this run; the numbers are skewed", flush=True)
    return out


def cpu_seconds() -> float | None:
    """Busy CPU seconds of the whole machine so far (all processes), from /proc/stat."""
    try:
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    except (OSError, ValueError):
        return None
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def label(nprocs: int, threads: int) -> str:
    return f"{nprocs}x{threads}"


def ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def compare(runs: dict[str, dict], pairs: list[tuple[str, str]]) -> dict[str, dict[str, float | None]]:
    """{phase: {"A->B": median time of A / median time of B}}: > 1 means B is faster."""
    out: dict[str, dict[str, float | None]] = {}
    for k in (*PHASES, *DERIVED):
        out[k] = {f"{a}->{b}": ratio(runs[a]["max_over_ranks_median_s"][k], runs[b]["max_over_ranks_median_s"][k])
                  for a, b in pairs}
    return out


def table(runs: dict[str, dict], speedups: dict, names: dict[str, str], pair_names: dict[str, str]) -> str:
    cols = list(runs)
    head = "| phase | " + " | ".join(f"{names[c]} (ms/step)" for c in cols) + " | "
    head += " | ".join(pair_names[p] for p in pair_names) + " |"
    lines = [head, "|" + "---|" * (1 + len(cols) + len(pair_names))]
    for k in (*PHASES, *DERIVED):
        cells = [f"{1000 * runs[c]['max_over_ranks_median_s'][k]:.1f}" for c in cols]
        cells += [f"{v:.2f}x" if v is not None else "-" for v in speedups[k].values()]
        name = {"real": "real (features + statistics)", "step": "step (wall)"}.get(k, k)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_setting(args: argparse.Namespace, cores: int, extra_env: dict[str, str], tmp: Path) -> dict:
    """Every process count (cores // nprocs threads each) plus the 1x1 reference, under one environment."""
    main_runs = [(n, max(1, cores // n)) for n in sorted(set(args.nprocs))]
    ref = (1, 1)
    plan = main_runs + ([ref] if not args.no_reference and ref not in main_runs else [])
    runs: dict[str, dict] = {}
    for n, t in plan:
        for attempt in range(args.retries + 1):
            r = launch(args, n, t, extra_env, tmp / f"result-{n}x{t}-{len(extra_env)}-{attempt}.json")
            other = r["other_processes_cores_during_launch"]
            if other is None or other <= 0.25 or attempt == args.retries:
                break
            print("[bench]   running it again", flush=True)
        r["attempts"] = attempt + 1
        runs[label(n, t)] = r
    base = label(*main_runs[0])
    names = {label(n, t): f"{n} proc{'s' if n > 1 else ''} x {t} thr" for n, t in plan}
    pair_names = {f"{base}->{label(n, t)}": f"speed-up {base} -> {label(n, t)}" for n, t in main_runs[1:]}
    if label(*ref) in runs and label(*ref) != base:
        pair_names.update({f"{label(*ref)}->{label(n, t)}": f"per-core scaling 1x1 -> {label(n, t)}"
                           for n, t in main_runs[1:] if t == 1})
    speedups = compare(runs, [tuple(p.split("->")) for p in pair_names])
    return {"env": extra_env, "base": base, "names": names, "pair_names": pair_names, "speedups": speedups,
            "runs": runs}


def report(setting: dict, cores: int) -> None:
    runs, base, names, pair_names, speedups = (setting[k] for k in ("runs", "base", "names", "pair_names", "speedups"))
    print(table(runs, speedups, names, pair_names))
    for p, name in pair_names.items():
        n = runs[p.split("->")[1]]["nprocs"]
        aim = " (aim >= 1.7x on 2 cores)" if n == 2 and cores == 2 and p.startswith(base + "->") else ""
        print(f"real-data phase, {name}: {speedups['real'][p]:.2f}x{aim}")
    for key, r in runs.items():
        u = r["rank0_usage_per_step"]
        other = r["other_processes_cores_during_launch"]
        print(f"  {key}: rank 0 per step {u['minor_page_faults'] / 1000:.0f}k page faults, user {u['user_s']:.2f} s, "
              f"system {u['system_s']:.2f} s; rank real batch max/mean {r['real_batch_imbalance_median']:.3f}; "
              f"all-reduces alone {1000 * r['allreduce_comm_only_median_s']:.1f} ms/step; other processes "
              f"{'?' if other is None else f'{other:.2f}'} cores")


def main() -> None:
    args = parse_args()
    if args.worker_result is not None:
        worker(args)
        return
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    envs = {"default": {}, "tuned": TUNED_MALLOC}
    chosen = ["default", "tuned"] if args.malloc == "both" else [args.malloc]
    settings: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="csdm-bench-") as tmp:
        for m in chosen:
            settings[m] = run_setting(args, cores, envs[m], Path(tmp))

    first = settings[chosen[0]]
    payload = first["runs"][first["base"]]["allreduce_bytes_per_step"]
    r0 = first["runs"][first["base"]]
    print()
    print(f"{args.dataset}, ipc {args.ipc}, real_per_class {args.real_per_class} (global real batch "
          f"{r0['real_images_per_step_median']:.0f} images/step, synthetic {r0['synthetic_images_per_rank']}); "
          f"{args.warmup} warm-up + {args.steps} measured steps; median per step, max over ranks; {cores} cores. "
          f"NxT = N processes x T threads: the main runs use OMP_NUM_THREADS = cores // N (no oversubscription), "
          f"1x1 is a per-core reference.")
    for m in chosen:
        print(f"\nmalloc {m}{' ' + str(envs[m]) if envs[m] else ' (glibc as is)'}:")
        report(settings[m], cores)
    print(f"\nall-reduce payload per step: {payload} bytes ({payload / 1024:.1f} KiB)")

    if args.out is not None:
        result = {
            "benchmark": "distributed_cpu",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {"cpu_count": os.cpu_count(), "cores_available": cores, "torch": torch.__version__,
                        "python": platform.python_version(), "platform": platform.platform(),
                        "processor": platform.processor() or platform.machine()},
            "threads_policy": "NxT = N processes x T threads; main runs: T = cores // N (no oversubscription); "
                              "1x1: one process on one thread, a per-core reference",
            "config_overrides": overrides(args),
            "warmup_steps": args.warmup,
            "steps": args.steps,
            "statistic": "median over measured steps of each rank, then the max over ranks",
            "allreduce_bytes_per_step": payload,
            "malloc": {m: {"env": envs[m],
                           "phases_ms_per_step": {key: {k: 1000 * v for k, v in r["max_over_ranks_median_s"].items()}
                                                  for key, r in settings[m]["runs"].items()},
                           "speedups": settings[m]["speedups"],
                           "real_phase_speedup": settings[m]["speedups"]["real"],
                           "runs": settings[m]["runs"]} for m in chosen},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
