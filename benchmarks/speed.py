"""Per-step time at NCFM's CIFAR-10 setting, beside its floor: the bare extractor forward pass over the same real batch.

    .venv/bin/python benchmarks/speed.py --device cpu --out benchmarks/results/speed_cpu.json
    .venv/bin/python benchmarks/speed.py --device cuda --out benchmarks/results/speed_cuda.json
    .venv/bin/python benchmarks/speed.py --device cpu --precision fp32    # one precision only

Each device is measured at each `--precision` (default fp32 and bf16; bf16 only where the device computes it
natively, csdm_dist.extractors.bf16_support), each combination in its own process; the report gives the bf16 / fp32
ratios of step and floor.

Setting: CIFAR-10-LT shapes and counts (32 px, 3 channels, 10 classes, IF 100: 5000 ... 50 images), ConvNet depth
3 width 128, IPC 10, M = 4096 frequencies, distill.real_per_class = 1024. The real batch is Bernoulli-subsampled
with p_c = min(1, 1024 / n_c), so a step sees sum_c min(n_c, 1024) = 5632 real images on average. Pixels are
random (common.build_distiller); speed does not depend on them. One process (a world of one).

Per device: warm-up steps, then
1. step: `Distiller.train_step` with the PhaseTimer off, as in a normal run (median over the measured steps);
2. floor, right after each step: the bare extractor forward under torch.no_grad on x = the same step's
   `distiller.real_batch(step)`, in the step's chunks of distill.real_chunk images (median), without
   augmentation; it includes the L2 normalisation of the features (and bf16 autocast when `precision` is bf16,
   as in a step);
   the batch's indexing and uint8 -> float conversion happen before the clock;
3. phases: the same steps again with the PhaseTimer on (it synchronises CUDA at each phase boundary).
Peak memory: the host's peak RSS of the process so far (ru_maxrss, which cannot be reset, so step and floor
share it) and, on CUDA, torch.cuda.max_memory_allocated of the step and of the floor. The host's minor page
faults and system time per step are recorded too (freed memory given back to the OS and faulted in again).
CUDA is synchronised before every clock reading.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import (PHASES, OtherLoad, build_distiller, class_counts, compose, devices_for, machine_info, wait_idle,
                    write_report)

TARGET = {"cpu": 1.5, "cuda": 1.25}  # the aim for step / floor
DEFAULT_STEPS = {"cpu": (2, 5), "cuda": (5, 20)}  # (warm-up, measured)
NCFM_A100_S = (0.73, 7.22)  # NCFM's reported seconds per iteration on an A100 (range over its settings)


def setting(device: str) -> list[str]:
    return ["dataset=cifar10_lt", f"device={device}", "ipc=10", "distill.real_per_class=1024",
            "extractor.arch=convnet", "extractor.width=128", "extractor.depth=3", "method.kernel.num_freqs=4096"]


def measure(device: str, steps: int, warmup: int, extra: list[str] | tuple[str, ...] = ()) -> dict:
    """Time one device in this process; returns the numbers (seconds, MB)."""
    import resource

    import torch
    import torch.distributed as dist

    from csdm_dist.dist import close_distributed, init_distributed
    from csdm_dist.distiller import PhaseTimer

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("speed.py --device cuda: CUDA is not available here (torch.cuda.is_available() is False); "
                         "use --device cpu or --device auto")
    cfg = compose([*setting(device), *extra])
    owned = not dist.is_initialized()
    rt = init_distributed(device)
    cuda = rt.device.type == "cuda"

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize(rt.device)
        return time.perf_counter()

    def start_peak() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats(rt.device)

    def peak() -> dict:  # host: peak RSS of the process so far (glibc keeps freed memory: no per-pass reset)
        out = {"host_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if cuda:
            out["device_max_allocated_mb"] = torch.cuda.max_memory_allocated(rt.device) / 2**20
        return out

    try:
        with tempfile.TemporaryDirectory(prefix="csdm-speed-") as tmp, OtherLoad() as load:
            d = build_distiller(cfg, rt, Path(tmp))
            for s in range(warmup):
                d.train_step(s)
            timed = range(warmup, warmup + steps)

            # step and floor alternate over the same steps, so that a change in the machine's load or clock
            # affects both alike; peaks are the max over the steps of each
            step_s, floor_s, batch, faults, sys_s = [], [], [], [], []
            step_peak: dict = {}
            floor_peak: dict = {}
            for s in timed:
                start_peak()
                ru0 = resource.getrusage(resource.RUSAGE_SELF)
                t0 = clock()
                out = d.train_step(s)
                step_s.append(clock() - t0)
                ru1 = resource.getrusage(resource.RUSAGE_SELF)
                faults.append(ru1.ru_minflt - ru0.ru_minflt)
                sys_s.append(ru1.ru_stime - ru0.ru_stime)
                batch.append(int(out["real_images"]))
                step_peak = {k: max(v, step_peak.get(k, 0.0)) for k, v in peak().items()}
                with torch.no_grad():
                    x = d.real_batch(s)[0]
                    start_peak()
                    t0 = clock()
                    d.embed(x, None, None, 0, s, chunk=d.cfg.distill.real_chunk)  # forward as the step runs it
                    floor_s.append(clock() - t0)
                    del x
                floor_peak = {k: max(v, floor_peak.get(k, 0.0)) for k, v in peak().items()}

            d.timer = PhaseTimer(enabled=True, device=rt.device)
            phases: dict[str, list[float]] = {k: [] for k in PHASES}
            timed_step = []
            for s in timed:
                before = dict(d.timer.totals)
                t0 = clock()
                d.train_step(s)
                timed_step.append(clock() - t0)
                for k in PHASES:
                    phases[k].append(d.timer.totals.get(k, 0.0) - before.get(k, 0.0))
    finally:
        if owned:
            close_distributed()

    step, floor = statistics.median(step_s), statistics.median(floor_s)
    phase_ms = {k: 1000 * statistics.median(v) for k, v in phases.items()}
    phase_ms["unaccounted"] = 1000 * statistics.median(timed_step) - sum(phase_ms.values())
    return {
        "device": str(rt.device), "gpu": torch.cuda.get_device_name(rt.device) if cuda else None,
        "precision": d.extractor.precision,
        "torch_num_threads": torch.get_num_threads(), "warmup_steps": warmup, "steps": steps,
        "step_s": step, "floor_s": floor, "ratio": step / floor if floor > 0 else None,
        "target_ratio": TARGET.get(rt.device.type),
        "step_s_all": step_s, "floor_s_all": floor_s,
        "step_host_minor_page_faults": faults, "step_host_system_s": sys_s,
        "real_images_per_step": batch, "real_images_per_s": statistics.median(batch) / step,
        "peak_memory": {"step": step_peak, "floor": floor_peak},
        "phases_ms": phase_ms, "phase_pass_step_ms": 1000 * statistics.median(timed_step),
        "real_features_minus_floor_ms": phase_ms["real_features"] - 1000 * floor,
        "other_processes_cores": load.cores,
    }


def report(results: list[dict], cfg, expected_batch: float) -> None:
    d, e = cfg.dataset, cfg.extractor
    print(f"\n{d.name} counts {class_counts(cfg)}, {d.image_size} px x {d.channels}, real_per_class "
          f"{cfg.distill.real_per_class} (expected {expected_batch:.0f} real images/step), {e.arch} depth "
          f"{e.depth_at(d.image_size)} width {e.width}, IPC {cfg.ipc}, M {cfg.method.kernel.num_freqs}, method "
          f"{cfg.method.name}. Medians; floor = the extractor forward (in distill.real_chunk chunks, + L2 "
          f"normalisation) over the step's real batch.")
    print("| device | precision | threads | step (s) | floor (s) | step/floor | target | real img/step | "
          f"host peak RSS (MB) | device peak (MB) | NCFM A100 (s/iter) |\n|{'---|' * 11}")
    for r in results:
        p = r["peak_memory"]["step"]
        dev = p.get("device_max_allocated_mb")
        ok = "met" if r["ratio"] is not None and r["ratio"] <= r["target_ratio"] else "NOT met"
        print(f"| {r['device']}{' (' + r['gpu'] + ')' if r['gpu'] else ''} | {r['precision']} | "
              f"{r['torch_num_threads']} | "
              f"{r['step_s']:.3f} | {r['floor_s']:.3f} | {r['ratio']:.2f}x | <= {r['target_ratio']}x ({ok}) | "
              f"{statistics.median(r['real_images_per_step']):.0f} | {p['host_peak_rss_mb'] or 0:.0f} | "
              f"{'-' if dev is None else f'{dev:.0f}'} | {NCFM_A100_S[0]} - {NCFM_A100_S[1]} |")
    for dev, (fp32, bf16) in precision_ratios(results).items():
        print(f"\n{dev}: bf16 / fp32 step {bf16['step_s'] / fp32['step_s']:.2f} (fp32 {fp32['step_s']:.3f} s, "
              f"bf16 {bf16['step_s']:.3f} s), floor {bf16['floor_s'] / fp32['floor_s']:.2f} "
              f"(fp32 {fp32['floor_s']:.3f} s, bf16 {bf16['floor_s']:.3f} s)")
    for r in results:
        print(f"\nphases on {r['device']} in {r['precision']}, PhaseTimer on (median ms per step; step "
              f"{r['phase_pass_step_ms']:.0f} ms in this pass):")
        print("| " + " | ".join(r["phases_ms"]) + " |\n|" + "---|" * len(r["phases_ms"]))
        print("| " + " | ".join(f"{v:.1f}" for v in r["phases_ms"].values()) + " |")
        print(f"real_features - floor: {r['real_features_minus_floor_ms']:.0f} ms (batch indexing, uint8 -> float, "
              f"augmentation); host per step: {statistics.median(r['step_host_minor_page_faults']) / 1000:.0f}k "
              f"minor page faults, {statistics.median(r['step_host_system_s']):.2f} s system time; other processes "
              f"used {r['other_processes_cores'] or 0:.2f} cores meanwhile")


def precision_ratios(results: list[dict]) -> dict[str, tuple[dict, dict]]:
    """{device: (its fp32 result, its bf16 result)} for the devices measured both ways."""
    by = {(r["device"], r["precision"]): r for r in results}
    return {dev: (by[dev, "fp32"], by[dev, "bf16"]) for dev, p in by if p == "fp32" and (dev, "bf16") in by}


def precisions_for(device: str, wanted: list[str]) -> list[str]:
    """The precisions measured on `device` (cpu or cuda): bf16 only where it is native there, said when skipped."""
    import torch

    from csdm_dist.extractors import bf16_support

    native, found = bf16_support(torch.device(device))
    if "bf16" in wanted and not native:
        print(f"[speed] {device}: bf16 not measured: {found}", flush=True)
        return [p for p in wanted if p != "bf16"]
    return wanted


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                   help="auto: the CPU, and CUDA too when present (each in its own process)")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default: 5 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured steps first (default: 2 on CPU, 5 on CUDA)")
    p.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"],
                   help="the extractor forward's precision(s) to measure (config `precision`)")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    p.add_argument("--wait-idle", type=float, default=60, help="wait up to this many seconds for an idle CPU first")
    p.add_argument("--retries", type=int, default=1,
                   help="measure again when other processes used > 0.25 cores meanwhile, at most this many times")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    p.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)  # one device, for --device auto
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import subprocess

    devices = devices_for(args.device, "speed.py")
    combos = [(dev, prec) for dev in devices for prec in precisions_for(dev, args.precision)]
    results = []
    for dev, prec in combos:
        overrides = [*args.override, f"precision={prec}"]
        warmup, steps = (DEFAULT_STEPS[dev][0] if args.warmup is None else args.warmup,
                         DEFAULT_STEPS[dev][1] if args.steps is None else args.steps)
        for attempt in range(args.retries + 1):
            busy = wait_idle(args.wait_idle)
            print(f"[speed] {dev} {prec}: {warmup} warm-up + {steps} measured steps; CPU busy before: "
                  f"{'?' if busy is None else f'{100 * busy:.0f}%'}", flush=True)
            if len(combos) == 1:
                r = measure(dev, steps, warmup, overrides)
            else:
                with tempfile.TemporaryDirectory(prefix="csdm-speed-") as tmp:  # own process: own peak memory
                    out = Path(tmp) / "result.json"
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", dev, "--steps", str(steps),
                           "--warmup", str(warmup), "--wait-idle", "0", "--retries", "0", "--worker-out", str(out),
                           "--precision", prec]
                    subprocess.run(cmd + [a for o in args.override for a in ("--override", o)], check=True)
                    r = json.loads(out.read_text())["results"][0]
            r["attempts"] = attempt + 1
            if (r["other_processes_cores"] or 0) <= 0.25 or attempt == args.retries:
                break
            print(f"[speed]   other processes used {r['other_processes_cores']:.2f} cores: measuring again", flush=True)
        results.append(r)

    cfg = compose(setting("cpu") + args.override)
    expected = sum(min(n, cfg.distill.real_per_class) for n in class_counts(cfg))
    payload = {"benchmark": "speed", "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "machine": machine_info(), "config_overrides": setting("<device>") + args.override,
               "class_counts": class_counts(cfg), "expected_real_images_per_step": expected,
               "targets_step_over_floor": TARGET, "ncfm_a100_s_per_iteration": NCFM_A100_S,
               "notes": ["random CIFAR-shaped tensors; speed does not depend on pixel values",
                         "step: train_step with the PhaseTimer off; floor: extractor.embed (forward + L2 "
                         "normalisation) under no_grad on the same steps' real batches; medians",
                         "phases_ms: a separate pass over the same steps with the PhaseTimer on",
                         "NCFM's numbers are from an A100 and are not the same hardware"],
               "results": results}
    if args.worker_out is not None:
        args.worker_out.write_text(json.dumps(payload))
        return
    report(results, cfg, expected)
    write_report(args.out, payload)


if __name__ == "__main__":
    main()
