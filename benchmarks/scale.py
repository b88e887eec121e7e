"""Memory and time per rank at ImageNet-LT's shapes on this CPU: IPC x world size x real source.

    .venv/bin/python benchmarks/scale.py --out benchmarks/results/scale_cpu.json      # 12 runs, ~30 min on 2 cores
    .venv/bin/python benchmarks/scale.py --ipc 10 --world 1 2 --sources images          # a subset
    .venv/bin/python benchmarks/scale.py --reestimate benchmarks/results/scale_cpu.json  # new memory model, same runs

Setting: 1000 classes, 64 px, 3 channels, ConvNet depth 4, random uint8 images counted like ImageNet-LT's training
split (features.imagenet_lt_like_counts: 1280 down to 5 per class, 115,846 in all; the split lists themselves are
not on this machine), M = 4096 frequencies (the default). Reduced to fit 2 cores: extractor width --width
(default 16 instead of 128), synthetic.factor=1, distill.real_per_class=8 (about 7,500 real images per step over
all ranks), --warmup + --steps steps. distill.syn_chunk=1024: the synthetic side's forward in checkpointed chunks
(without it, IPC 50 holds 50,000 images' activations: tens of GB).

Each (ipc, world, source) is one `torchrun --nproc_per_node=<world>` launch of this file's worker (gloo, one thread
per rank, OMP_NUM_THREADS=1), the ranks sharing this machine's cores: step times at world > 1 are those of N ranks
on 2 cores, not of N machines. Per rank the worker records
- peak RSS (ru_maxrss) and the RSS after `import torch` and the process group (the baseline: libraries, no data);
- csdm_dist.memory's estimate for that world size (estimate_mb) and its synthetic terms (synthetic_mb: slice,
  gradients, optimizer state, synthetic activations), to be compared with peak - baseline;
- the bytes all-reduced per step, counted by wrapping torch.distributed.all_reduce during one measured step;
- the median step time and the time per phase (the PhaseTimer reads the clock only: no synchronisation on a CPU).
A launch whose estimate times its ranks exceeds 90 % of the memory available is not run (the report says so).
real_source=features holds random fp16 features [1 member, 1 view, N / world, D] of a fixed one-member pool, as
feature shards would give; the real images are held too (a features run initialises from them).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (PHASES, ROOT, compose, distiller_for_source, features_overrides, machine_info, timed_step,
                    write_report)
from features import IMAGENET_LT, imagenet_lt_like_counts

MB = 2**20
TIMEOUT_S = 1800  # one launch; a hang fails the run instead of the benchmark
# a launch runs only when world x estimate x MARGIN fits in the memory available: measured peaks reached 1.3x the
# estimate here (glibc keeps freed blocks, csdm_dist.dist.keep_freed_host_memory, so a phase's blocks fragment the
# heap), and an IPC 50 world 1 run estimated at 18 GiB was killed by the kernel at 22.9 GB
MARGIN = 1.4


class LaunchFailed(Exception):
    """A launch exited non-zero (the record says how, with the largest RSS its ranks reached)."""

    def __init__(self, record: dict):
        super().__init__(record["reason"])
        self.record = record


def tree_rss_mb(pid: int) -> float:
    """RSS of the process `pid` and its descendants (the torchrun agent and its ranks), in MB."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            total += p.memory_info().rss / MB
        except psutil.NoSuchProcess:
            pass
    return total


def setting(ipc: int, width: int, overrides: list[str] = ()) -> list[str]:
    """The launch's config overrides; `overrides` (--override) come last."""
    return ["dataset=imagenet_lt", "device=cpu", f"ipc={ipc}", "extractor.depth=4", f"extractor.width={width}",
            "synthetic.factor=1", "distill.init=real", "distill.real_per_class=8", "distill.syn_chunk=1024", *overrides]


def estimate(ipc: int, world: int, source: str, width: int, overrides: list[str] = ()):
    """csdm_dist.memory's estimate per rank for one launch (a pure function of the config: recomputable)."""
    from csdm_dist.memory import estimate_from_counts

    extra = features_overrides(Path("pool.pt")) if source == "features" else []
    return estimate_from_counts(compose(setting(ipc, width, overrides) + extra), world, imagenet_lt_like_counts())


def estimate_fields(est, peak_minus_baseline_mb: float) -> dict:
    return {"estimate_mb": est.total / MB, "estimate_rows_mb": {n: b / MB for n, b, _ in est.rows},
            "synthetic_mb": sum(synthetic_rows(est).values()) / MB,
            "measured_over_estimate": peak_minus_baseline_mb / (est.total / MB)}


def synthetic_rows(est) -> dict[str, int]:
    """The estimate's rows that scale with the synthetic set (bytes per rank)."""
    keep = ("synthetic slice", "fp32 master copy", "gradients", "optimizer state", "activations, synthetic")
    return {name: b for name, b, _ in est.rows if name.startswith(keep)}


def count_all_reduce() -> dict[str, list[int]]:
    """Wrap torch.distributed.all_reduce; returns {"communicated": [...], "local": [...]}, the payload sizes (bytes)
    of the calls over groups of several ranks and over one-rank groups (DeepSpeed's gradient reduction over a
    rank's own data-parallel group: no communication)."""
    import torch.distributed as dist

    sizes: dict[str, list[int]] = {"communicated": [], "local": []}
    inner = dist.all_reduce

    def counted(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        kind = "communicated" if dist.get_world_size(group) > 1 else "local"
        sizes[kind].append(tensor.numel() * tensor.element_size())
        return inner(tensor, op=op, group=group, async_op=async_op)

    dist.all_reduce = counted
    return sizes


# ---- the worker: one rank of one launch ----------------------------------------------------------------------------
def worker(args) -> None:
    import torch

    from csdm_dist.dist import close_distributed, init_distributed
    from csdm_dist.distiller import PhaseTimer
    ipc = args.ipc[0]  # the driver passes one
    rt = init_distributed("cpu")
    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    counts = imagenet_lt_like_counts()
    sizes = count_all_reduce()
    try:
        with tempfile.TemporaryDirectory(prefix="csdm-scale-") as tmp:
            t0 = time.perf_counter()
            d = distiller_for_source(setting(ipc, args.width, args.override), Path(tmp), rt, args.source, counts)
            build_s = time.perf_counter() - t0
            for s in range(args.warmup):
                d.train_step(s)
            # the PhaseTimer only reads the clock on the CPU (no synchronisation): the same steps give both
            d.timer = PhaseTimer(enabled=True, device=rt.device)
            step_s, payload, local = [], [], []
            phases: dict[str, list[float]] = {k: [] for k in PHASES}
            for s in range(args.warmup, args.warmup + args.steps):
                for v in sizes.values():
                    del v[:]
                wall, took, _ = timed_step(d, s)
                step_s.append(wall)
                payload.append(sum(sizes["communicated"]))
                local.append(sum(sizes["local"]))
                for k in PHASES:
                    phases[k].append(took[k])
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            out = {"rank": rt.rank, "world": rt.world_size, "ipc": ipc, "real_source": args.source,
                   "threads": torch.get_num_threads(), "baseline_rss_mb": baseline_mb, "peak_rss_mb": peak_mb,
                   "synthetic_images": len(d.decoded_ids), "real_images_held": len(d.real.ids),
                   "allreduce_bytes": statistics.median(payload), "allreduce_bytes_all": payload,
                   "local_allreduce_bytes": statistics.median(local),
                   "build_s": build_s, "step_s": statistics.median(step_s), "step_s_all": step_s,
                   "phases_ms": {k: 1000 * statistics.median(v) for k, v in phases.items()}}
    finally:
        close_distributed()
    Path(args.worker_out, f"rank{out['rank']}.json").write_text(json.dumps(out))


# ---- the driver ----------------------------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ipc: int, world: int, source: str, args) -> dict:
    """One torchrun launch; the ranks' records combined (max peak over ranks, rank 0's phases)."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    with tempfile.TemporaryDirectory(prefix="csdm-scale-run-") as tmp:
        cmd = [torchrun, f"--nproc_per_node={world}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               str(Path(__file__).resolve()), "--worker-out", tmp, "--ipc", str(ipc), "--source", source,
               "--width", str(args.width), "--steps", str(args.steps), "--warmup", str(args.warmup),
               *[a for o in args.override for a in ("--override", o)]]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        log = Path(tmp) / "log.txt"
        t0 = time.perf_counter()
        top_rss = 0.0  # sampled every second: a rank the kernel kills reports nothing itself
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
            while proc.poll() is None:
                top_rss = max(top_rss, tree_rss_mb(proc.pid))
                if time.perf_counter() - t0 > TIMEOUT_S:
                    proc.kill()
                time.sleep(1)
        if proc.returncode != 0:
            text = log.read_text()
            killed = "SIGKILL" in text or "Signal 9" in text
            raise LaunchFailed({"ipc": ipc, "world": world, "real_source": source, "exit": proc.returncode,
                                "largest_tree_rss_mb": top_rss, "reason": (
                                    "a rank was killed (SIGKILL: out of memory?)" if killed else
                                    f"exit {proc.returncode}") + f" at up to {top_rss:.0f} MB RSS in all",
                                "log_tail": text[-2000:]})
        ranks = sorted((json.loads(p.read_text()) for p in Path(tmp).glob("rank*.json")), key=lambda r: r["rank"])
    if len(ranks) != world:
        raise SystemExit(f"scale.py: IPC {ipc} world {world} {source}: {len(ranks)} of {world} ranks reported")
    top = max(ranks, key=lambda r: r["peak_rss_mb"])
    net = top["peak_rss_mb"] - top["baseline_rss_mb"]
    return {"ipc": ipc, "world": world, "real_source": source,
            "peak_rss_mb": top["peak_rss_mb"], "baseline_rss_mb": top["baseline_rss_mb"], "peak_minus_baseline_mb": net,
            "overrides": list(args.override), **estimate_fields(estimate(ipc, world, source, args.width,
                                                                            args.override), net),
            "allreduce_bytes": ranks[0]["allreduce_bytes"], "local_allreduce_bytes": ranks[0]["local_allreduce_bytes"],
            "step_s": max(r["step_s"] for r in ranks), "phases_ms": ranks[0]["phases_ms"],
            "wall_s": time.perf_counter() - t0, "per_rank": ranks}


def report(runs: list[dict]) -> None:
    print("\n| IPC | world | real source | peak RSS (MB) | baseline (MB) | peak - baseline | estimate (MB) | "
          "measured / estimate | synthetic (MB, estimate) | all-reduce (MB/step) | step (s) |\n|" + "---|" * 11)
    for r in runs:
        print(f"| {r['ipc']} | {r['world']} | {r['real_source']} | {r['peak_rss_mb']:.0f} | "
              f"{r['baseline_rss_mb']:.0f} | {r['peak_minus_baseline_mb']:.0f} | {r['estimate_mb']:.0f} | "
              f"{r['measured_over_estimate']:.2f} | "
              f"{r['synthetic_mb']:.0f} | {r['allreduce_bytes'] / MB:.1f} | {r['step_s']:.1f} |")
    print("\nphases (rank 0, median ms per step):\n| IPC | world | source | " + " | ".join(PHASES) + " |\n|"
          + "---|" * (3 + len(PHASES)))
    for r in runs:
        print(f"| {r['ipc']} | {r['world']} | {r['real_source']} | "
              + " | ".join(f"{r['phases_ms'][k]:.0f}" for k in PHASES) + " |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ipc", type=int, nargs="+", default=[10, 50])
    p.add_argument("--world", type=int, nargs="+", default=[1, 2, 4], help="ranks (processes on this machine)")
    p.add_argument("--sources", nargs="+", choices=("images", "features"), default=["images", "features"])
    p.add_argument("--width", type=int, default=16, help="extractor width (ImageNet-LT's configs use 128)")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override of every launch")
    p.add_argument("--append", action="store_true",
                   help="keep the --out file's other runs (those of another IPC, world, source or overrides)")
    p.add_argument("--steps", type=int, default=1, help="measured steps")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    p.add_argument("--reestimate", type=Path, default=None, metavar="JSON",
                   help="recompute the estimates of a results file with the current memory model, measure nothing")
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)  # set by the driver: this is a rank
    p.add_argument("--source", default="images", help=argparse.SUPPRESS)  # the worker's real source
    return p.parse_args(argv)


def reestimate(path: Path) -> dict:
    """Recompute every run's estimate in a results file with the current csdm_dist.memory (the measurements stay)."""
    from csdm_dist.runinfo import git_commit

    payload = json.loads(path.read_text())
    for r in payload["runs"]:
        r.update(estimate_fields(estimate(r["ipc"], r["world"], r["real_source"], payload["width"],
                                          r.get("overrides", [])),
                                 r["peak_minus_baseline_mb"]))
    payload["estimate_recomputed"] = {"date": time.strftime("%Y-%m-%d"), "git_commit": git_commit()}
    report(payload["runs"])
    write_report(path, payload)
    return payload


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.worker_out is not None:
        return worker(args) or None
    if args.reestimate is not None:
        return reestimate(args.reestimate)
    from csdm_dist.memory import available_bytes, human

    runs, not_run, failed = [], [], []
    for ipc in args.ipc:
        for world in args.world:
            for source in args.sources:
                est = estimate(ipc, world, source, args.width, args.override)
                free = available_bytes("cpu")
                if world * est.total * MARGIN > free:
                    why = (f"{world} ranks x {human(est.total)} estimated x {MARGIN} (scale.MARGIN) exceed the "
                           f"{human(free)} available on this machine")
                    print(f"[scale] IPC {ipc}, world {world}, {source}: not run: {why}", flush=True)
                    not_run.append({"ipc": ipc, "world": world, "real_source": source, "reason": why,
                                    "estimate_mb": est.total / MB, "overrides": list(args.override)})
                    continue
                print(f"[scale] IPC {ipc}, world {world}, {source} ...", flush=True)
                try:
                    runs.append(launch(ipc, world, source, args))
                except LaunchFailed as e:
                    print(f"[scale]   failed: {e}", flush=True)
                    failed.append({**e.record, "estimate_mb": est.total / MB, "overrides": list(args.override)})
                    continue
                finally:  # every finished launch is on disk at once
                    write_report(args.out, payload(args, runs, not_run, failed), quiet=True)
                r = runs[-1]
                print(f"[scale]   peak RSS {r['peak_rss_mb']:.0f} MB (baseline {r['baseline_rss_mb']:.0f}), estimate "
                      f"{r['estimate_mb']:.0f} MB, all-reduce {r['allreduce_bytes'] / MB:.1f} MB/step, step "
                      f"{r['step_s']:.1f} s, {r['wall_s']:.0f} s in all", flush=True)
    report(runs)
    for r in not_run + failed:
        print(f"not run or failed: IPC {r['ipc']}, world {r['world']}, {r['real_source']}: {r['reason']}")
    out = payload(args, runs, not_run, failed)
    write_report(args.out, out)
    return out


def key(r: dict) -> tuple:
    return r["ipc"], r["world"], r["real_source"], tuple(r.get("overrides", []))


def payload(args, runs: list[dict], not_run: list[dict], failed: list[dict]) -> dict:
    if args.append and args.out is not None and args.out.is_file():  # the file's other runs stay
        prior, new = json.loads(args.out.read_text()), {key(r) for r in runs + not_run + failed}
        runs, not_run, failed = ([r for r in prior.get(k, []) if key(r) not in new] + mine
                                 for k, mine in (("runs", runs), ("not_run", not_run), ("failed", failed)))
    return {"benchmark": "scale", "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": time.strftime("%Y-%m-%d"), "machine": machine_info(),
            "setting": [o for o in setting(0, args.width) if not o.startswith("ipc=")],
            "imagenet_lt": IMAGENET_LT, "width": args.width,
            "warmup_steps": args.warmup, "steps": args.steps,
            "notes": ["random uint8 images with ImageNet-LT-like counts (1280 ... 5, 115,846 images)",
                      "ranks share this machine's 2 cores (one thread each): step times at world > 1 are not "
                      "those of N machines",
                      "measured_over_estimate = (peak RSS - baseline RSS) / estimate; the baseline is the RSS "
                      "after import torch and the process group",
                      "allreduce_bytes: bytes passed to torch.distributed.all_reduce over groups of more than "
                      "one rank in a measured step; local_allreduce_bytes: over one-rank groups (DeepSpeed's "
                      "gradient reduction within a rank's own data-parallel group, no communication)",
                      "synthetic_mb: the estimate's synthetic terms per rank (slice, gradients, optimizer "
                      "state, synthetic activations)"],
            "runs": runs, "not_run": not_run, "failed": failed}


if __name__ == "__main__":
    main()
