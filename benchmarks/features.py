"""Real side of a step, images against precomputed features: step times, the crossover and the memory per rank.

    .venv/bin/python benchmarks/features.py --device cpu --out benchmarks/results/features_cpu.json
    .venv/bin/python benchmarks/features.py --device cuda --out benchmarks/results/features_cuda.json

Case A, CIFAR-10-LT IF 100 at the speed benchmark's setting (32 px, 3 channels, ConvNet depth 3 width 128,
d = 2048, IPC 10, M = 4096, 12,406 real images; random pixels, common.build_distiller). Whole
`Distiller.train_step`s of three configurations:
  images-1024  real_source=images, distill.real_per_class=1024 (speed.py's batch, 5632 images per step);
  features     real_source=features: every one of the 12,406 real features each step (exact full-data
               statistics). RealData.features holds random fp16 [K=1, A=1, N, d]; the extractor is a one-member
               pool written to a temporary file (extractor.mode=pool, interpolate=false), as such a run needs;
  images-64    real_source=images, distill.real_per_class=64 (a typical small batch, 562 images per step).
Per configuration: warm-up steps, a pass with the PhaseTimer off (step time), then a pass with it on (phases).

Case B, an ImageNet-LT-sized feature set: 1000 classes, 115,846 random fp16 features of d = 512 and 2048 dims,
M = 4096 and 1024. Timed directly, not as a Distiller step (the synthetic side at ImageNet scale is another
matter): the real side of a features step, `Extractor.finish` (fp16 -> fp32, L2 normalisation) then
`spectral.class_statistics` over all features at fresh gaussian frequencies (drawn before the clock). The images
source at ImageNet-LT's setting is not run: its cost is estimated from a measured per-image forward at 64 px
(extractor.embed under no_grad on normalised random images: ConvNet depth 4 width 128, d = 2048; ResNet-18,
d = 512), without augmentation.

Crossover: per real sample, c_img = the images source's real side (forward + statistics) per image and c_feat
= the features source's real side per feature. Featurising a batch of B images costs as much as the
statistics over all N features at B* = N c_feat / c_img; for larger batches the features source is cheaper.
Case A measures both in its steps (PhaseTimer: real_features + real_statistics); case B takes c_feat from its
statistics and c_img = forward per image + statistics per feature (an estimate).

Memory per rank: analytic bytes (world of one; with S shards divide N by S) of the feature and image stores,
of the features source's statistics intermediates (class_statistics builds [N, M] projections, cos and sin,
their [N, 2M] concatenation and a [C, N] one-hot, all fp32, at once) and of an images batch, beside the
measured host peak RSS of each job (own process; ru_maxrss) and, on CUDA, torch.cuda.max_memory_allocated.
Every job runs in its own process, so peaks do not mix. CUDA is synchronised before every clock reading.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (PHASES, OtherLoad, class_counts, compose, cores_available, devices_for, distiller_for_source,
                    machine_info, timed_step, wait_idle, write_report)
from speed import setting as speed_setting

GB = 1e9
IMAGENET_LT = {"num_features": 115846, "num_classes": 1000, "head": 1280, "tail": 5, "image_size": 64, "channels": 3}
# (warm-up, measured) steps of case A; (warm-up, measured) repetitions of case B's statistics and forwards
DEFAULT_A = {"cpu": (1, 3), "cuda": (3, 10)}
DEFAULT_B = {"cpu": (0, 1), "cuda": (1, 5)}  # CPU: the warm-up of the statistics runs on a slice (8192 rows)
FORWARD_BATCH = {"cpu": {"convnet": 128, "resnet18": 32}, "cuda": {"convnet": 2048, "resnet18": 512}}
A_CONFIGS = (("images-1024", "images", 1024), ("features", "features", None), ("images-64", "images", 64))


# ---------------------------------------------------------------------------------------------------------------
# settings and analytic memory
# ---------------------------------------------------------------------------------------------------------------

def imagenet_lt_like_counts() -> list[int]:
    """1000 per-class counts from 1280 down to 5 that sum to 115,846, ImageNet-LT's totals (not its split lists:
    n_c = 1280 * 256^(-(c / 999)^g), g found by bisection, the remainder spread over the middle classes).
    Timing does not depend on the labels; only the estimate of an images batch at a real_per_class does."""
    import math

    s = IMAGENET_LT
    c_n, head, tail, total = s["num_classes"], s["head"], s["tail"], s["num_features"]
    ratio = head / tail

    def profile(g: float) -> list[int]:
        return [max(tail, math.floor(head * ratio ** (-((c / (c_n - 1)) ** g)) + 1e-6)) for c in range(c_n)]

    lo, hi = 0.05, 1.0  # the sum falls as g falls
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(profile(mid)) < total else (lo, mid)
    counts = profile(hi)
    rest, c = sum(counts) - total, c_n // 2
    while rest != 0:  # +-1 on middle classes, keeping the profile non-increasing
        step = -1 if rest > 0 else 1
        if counts[c - 1] >= counts[c] + step >= counts[c + 1]:
            counts[c] += step
            rest += step
        c = c + 1 if c < c_n - 2 else 1
    return counts


def batch_at(counts: list[int], real_per_class: int) -> int:
    """Expected real images per step under Bernoulli subsampling p_c = min(1, r / n_c)."""
    return sum(min(n, real_per_class) for n in counts)


def per_class_for(counts: list[int], batch: float) -> int | None:
    """The smallest real_per_class whose expected batch reaches `batch` (None: beyond the whole set)."""
    if batch > sum(counts):
        return None
    return next(r for r in range(1, max(counts) + 1) if batch_at(counts, r) >= batch)


def statistics_bytes(n: int, m: int, c: int) -> int:
    """Peak intermediates of spectral.class_statistics over n rows (csdm_dist.memory's), plus the [C, 2M] sums."""
    from csdm_dist.memory import statistics_bytes as chunk_bytes

    return chunk_bytes(n, m) + c * 2 * m * 4


def memory_features(n: int, d: int, m: int, c: int, k: int = 1, a: int = 1) -> dict:
    """Bytes of the features source on one rank holding n features: store and statistics intermediates."""
    return {
        "feature_store_fp16": n * k * a * d * 2,
        "finished_features_fp32": n * d * 4,  # Extractor.finish: [N, d] fp32
        "statistics_peak": statistics_bytes(n, m, c),
    }


def memory_images(n: int, batch: int, chunk: int, channels: int, size: int, width: int, d: int, m: int,
                  c: int) -> dict:
    """Bytes of the images source on one rank holding n images, for a real batch of `batch` images."""
    return {
        "image_store_uint8": n * channels * size * size,
        "batch_fp32": batch * channels * size * size * 4,
        # first conv block: the conv output and the norm output, [chunk, width, H, W] fp32 each
        "activations_per_chunk_fp32": 2 * min(batch, chunk) * width * size * size * 4,
        "batch_statistics_peak": statistics_bytes(batch, m, c),
    }


# ---------------------------------------------------------------------------------------------------------------
# jobs (each in its own process)
# ---------------------------------------------------------------------------------------------------------------

def _clock(device):
    import torch

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
    return clock


def _peaks(device, base_rss_mb: float | None = None) -> dict:
    import resource

    import torch

    out = {"host_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if base_rss_mb is not None:
        out["host_rss_before_mb"] = base_rss_mb
    if device.type == "cuda":
        out["device_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def job_a_step(device: str, spec: dict) -> dict:
    """Case A: whole train_steps of one configuration."""
    import resource

    import torch

    from csdm_dist.dist import close_distributed, init_distributed
    from csdm_dist.distiller import PhaseTimer

    rt = init_distributed(device)
    clock = _clock(rt.device)
    base = [*speed_setting(device)]
    if spec["real_per_class"] is not None:
        base.append(f"distill.real_per_class={spec['real_per_class']}")
    try:
        with tempfile.TemporaryDirectory(prefix="csdm-features-bench-") as tmp, OtherLoad() as load:
            d = distiller_for_source(base, Path(tmp), rt, spec["source"])
            if rt.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(rt.device)
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            warm, steps = spec["warmup"], spec["steps"]
            for s in range(warm):
                d.train_step(s)
            timed = range(warm, warm + steps)
            step_s, batch = [], []
            for s in timed:
                t0 = clock()
                out = d.train_step(s)
                step_s.append(clock() - t0)
                batch.append(float(out["real_images"]))
            d.timer = PhaseTimer(enabled=True, device=rt.device)
            phases: dict[str, list[float]] = {k: [] for k in PHASES}
            for s in timed:
                took = timed_step(d, s, clock)[1]
                for k in PHASES:
                    phases[k].append(took[k])
            peaks = _peaks(rt.device, rss0)
    finally:
        close_distributed()
    phase_ms = {k: 1000 * statistics.median(v) for k, v in phases.items()}
    real_ms = phase_ms["real_features"] + phase_ms["real_statistics"]
    n_real = statistics.median(batch)
    return {"case": "A", "name": spec["name"], "source": spec["source"], "real_per_class": spec["real_per_class"],
            "device": str(rt.device), "torch_num_threads": torch.get_num_threads(), "warmup_steps": warm,
            "steps": steps, "step_s": statistics.median(step_s), "step_s_all": step_s,
            "real_samples_per_step": n_real, "phases_ms": phase_ms, "real_side_ms": real_ms,
            "real_side_us_per_sample": 1000 * real_ms / n_real, "peak_memory": peaks,
            "other_processes_cores": load.cores}


def job_b_forward(device: str, spec: dict) -> dict:
    """Case B: the per-image forward cost of the images source at 64 px (no augmentation)."""
    import torch

    from csdm_dist.dist import close_distributed, init_distributed
    from csdm_dist.distiller import Normalizer
    from csdm_dist.extractors import Extractor

    rt = init_distributed(device)
    clock = _clock(rt.device)
    try:
        with OtherLoad() as load:
            cfg = compose(["dataset=imagenet_lt", f"device={device}", f"extractor.arch={spec['arch']}",
                           "extractor.width=128", "extractor.depth=4"])
            dset = cfg.dataset
            ex = Extractor(cfg.extractor, dset.channels, dset.num_classes, dset.image_size, rt.device, normalize=True,
                           precision=cfg.precision)
            ex.prepare(torch.Generator().manual_seed(0))
            norm = Normalizer.build(dset.mean, dset.std, rt.device)
            b = spec["batch"]
            x8 = torch.randint(0, 256, (b, dset.channels, dset.image_size, dset.image_size), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(1)).to(rt.device)
            if rt.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(rt.device)
            times = []
            with torch.no_grad():
                for i in range(spec["warmup"] + spec["reps"]):
                    x = norm(x8)
                    t0 = clock()
                    z = torch.cat([ex.embed(x[j:j + cfg.distill.real_chunk])
                                   for j in range(0, b, cfg.distill.real_chunk)])
                    dt = clock() - t0
                    if i >= spec["warmup"]:
                        times.append(dt)
            peaks = _peaks(rt.device)
    finally:
        close_distributed()
    med = statistics.median(times)
    return {"case": "B", "name": f"forward-{spec['arch']}", "arch": spec["arch"], "feature_dim": int(z.shape[1]),
            "depth": cfg.extractor.depth_at(dset.image_size) if spec["arch"] == "convnet" else None,
            "device": str(rt.device), "torch_num_threads": torch.get_num_threads(), "batch": b,
            "warmup": spec["warmup"], "reps": spec["reps"], "forward_s": med, "forward_s_all": times,
            "forward_ms_per_image": 1000 * med / b, "peak_memory": peaks, "other_processes_cores": load.cores}


def job_b_stats(device: str, spec: dict) -> dict:
    """Case B: the features source's real side over an ImageNet-LT-sized set."""
    import resource

    import torch

    from csdm_dist import spectral as S
    from csdm_dist.dist import close_distributed, init_distributed
    from csdm_dist.extractors import Extractor

    rt = init_distributed(device)
    dev, clock = rt.device, _clock(rt.device)
    n, c, dim, m = IMAGENET_LT["num_features"], IMAGENET_LT["num_classes"], spec["dim"], spec["num_freqs"]
    try:
        with OtherLoad() as load:
            cfg = compose(["dataset=imagenet_lt", f"device={device}", "extractor.width=128", "extractor.depth=4"])
            # only its finish() is used
            ex = Extractor(cfg.extractor, 3, c, 64, dev, normalize=True, precision=cfg.precision)
            counts = torch.tensor(imagenet_lt_like_counts())
            labels = torch.repeat_interleave(torch.arange(c), counts).to(dev)
            g = torch.Generator().manual_seed(11)
            feats = torch.empty((1, 1, n, dim), dtype=torch.float16, device=dev)
            for i in range(0, n, 16384):  # no full fp32 copy on the way
                rows = min(16384, n - i)
                feats[0, 0, i:i + rows] = torch.randn((rows, dim), generator=g).to(torch.float16).to(dev)

            def freqs_of(rep: int):  # fresh frequencies, as a step draws them (before the clock)
                return S.sample_frequencies("gaussian", m, dim, 1.0, torch.Generator().manual_seed(100 + rep),
                                            device=dev)

            warm, reps = spec["warmup"], spec["reps"]
            warm_rows = n if dev.type == "cuda" else 8192
            with torch.no_grad():
                f0 = freqs_of(-1)
                for _ in range(max(1, warm)):  # kernels and allocator warm, on a slice on the CPU
                    zw = ex.finish(feats[0, 0, :warm_rows])
                    S.class_statistics(zw, labels[:warm_rows], c, f0)
                del zw
                rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                finish_s, stats_s = [], []
                for rep in range(reps):
                    fr = freqs_of(rep)
                    t0 = clock()
                    z = ex.finish(feats[0, 0])
                    t1 = clock()
                    sums, cnt = S.class_statistics(z, labels, c, fr)
                    t2 = clock()
                    finish_s.append(t1 - t0)
                    stats_s.append(t2 - t1)
                    del z, sums
                lib_peak = _peaks(dev, rss0)
    finally:
        close_distributed()
    fin, st = statistics.median(finish_s), statistics.median(stats_s)
    return {"case": "B", "name": f"stats-d{dim}-M{m}", "feature_dim": dim, "num_freqs": m, "num_features": n,
            "num_classes": c, "device": str(dev), "torch_num_threads": torch.get_num_threads(),
            "warmup": warm, "warmup_rows": warm_rows, "reps": reps,
            "finish_s": fin, "class_statistics_s": st, "real_side_s": fin + st,
            "real_side_us_per_feature": 1e6 * (fin + st) / n, "finish_s_all": finish_s,
            "class_statistics_s_all": stats_s,
            "peak_memory": lib_peak, "memory_bytes": memory_features(n, dim, m, c),
            "other_processes_cores": load.cores}


JOBS = {"a_step": job_a_step, "b_forward": job_b_forward, "b_stats": job_b_stats}


# ---------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------

def plan(device: str, args) -> list[tuple[str, dict]]:
    wa, sa = DEFAULT_A[device]
    wb, rb = DEFAULT_B[device]
    wa, sa = (wa if args.warmup is None else args.warmup), (sa if args.steps is None else args.steps)
    rb = rb if args.reps is None else args.reps
    jobs: list[tuple[str, dict]] = []
    if "A" in args.cases:
        jobs += [("a_step", {"name": name, "source": src, "real_per_class": rpc, "warmup": wa, "steps": sa})
                 for name, src, rpc in A_CONFIGS]
    if "B" in args.cases:
        jobs += [("b_forward", {"arch": arch, "batch": FORWARD_BATCH[device][arch], "warmup": 1, "reps": max(2, rb)})
                 for arch in ("convnet", "resnet18")]
        jobs += [("b_stats", {"dim": dim, "num_freqs": m, "warmup": wb, "reps": rb})
                 for m in args.freqs for dim in args.dims]
    return jobs


def run_job(kind: str, device: str, spec: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="csdm-features-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--device", device, "--worker", kind,
               "--worker-spec", json.dumps(spec), "--worker-out", str(out)]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def summarise(device: str, results: list[dict]) -> dict:
    """Crossovers and memory per rank from one device's jobs."""
    cfg = compose(speed_setting("cpu"))
    a_counts = class_counts(cfg)
    a_n = sum(a_counts)
    by = {r["name"]: r for r in results}
    out: dict = {"device": device, "crossovers": [], "memory_per_rank_bytes": {}}
    d_a, m_a, c_a = 2048, cfg.method.kernel.num_freqs, cfg.dataset.num_classes
    if "images-1024" in by and "features" in by:
        img, ft = by["images-1024"], by["features"]
        c_img, c_feat = img["real_side_us_per_sample"], ft["real_side_us_per_sample"]
        b_star = a_n * c_feat / c_img
        out["crossovers"].append({
            "case": "A", "num_features": a_n, "c_feat_us": c_feat, "c_img_us": c_img, "c_img_from": "images-1024",
            "batch_star": b_star, "real_per_class_star": per_class_for(a_counts, b_star),
            "features_real_side_ms": ft["real_side_ms"], "images_1024_real_side_ms": img["real_side_ms"],
            "images_64_real_side_ms": by.get("images-64", {}).get("real_side_ms")})
        mem = memory_features(a_n, d_a, m_a, c_a)
        mem.update(memory_images(a_n, int(img["real_samples_per_step"]), cfg.distill.real_chunk, 3, 32, 128, d_a,
                                 m_a, c_a))
        out["memory_per_rank_bytes"]["A"] = mem
    lt = imagenet_lt_like_counts()
    fwd = {r["feature_dim"]: r for r in results if r["name"].startswith("forward-")}
    for r in results:
        if not r["name"].startswith("stats-") or r["feature_dim"] not in fwd:
            continue
        f = fwd[r["feature_dim"]]
        c_feat = r["real_side_us_per_feature"]
        c_img = 1000 * f["forward_ms_per_image"] + 1e6 * r["class_statistics_s"] / r["num_features"]
        b_star = r["num_features"] * c_feat / c_img
        b64 = batch_at(lt, 64)
        out["crossovers"].append({
            "case": "B", "feature_dim": r["feature_dim"], "num_freqs": r["num_freqs"], "arch": f["arch"],
            "num_features": r["num_features"], "c_feat_us": c_feat, "c_img_us_estimate": c_img,
            "batch_star": b_star, "real_per_class_star": per_class_for(lt, b_star),
            "features_real_side_s": r["real_side_s"],
            "images_64_batch": b64, "images_64_real_side_s_estimate": b64 * c_img / 1e6})
        key = f"B-d{r['feature_dim']}-M{r['num_freqs']}"
        mem = dict(r["memory_bytes"])
        mem.update(memory_images(r["num_features"], b64, cfg.distill.real_chunk, 3, 64, 128, r["feature_dim"],
                                 r["num_freqs"], IMAGENET_LT["num_classes"]))
        out["memory_per_rank_bytes"][key] = mem
    return out


def report(device: str, results: list[dict], summary: dict) -> None:
    def gb(b: float | None) -> str:
        return "-" if b is None else f"{b / GB:.2f}"

    def peak(r: dict, key: str = "peak_memory") -> str:
        p = r.get(key) or {}
        s = f"{p.get('host_peak_rss_mb', 0) / 1024:.1f}"
        if "device_max_allocated_mb" in p:
            s += f" / {p['device_max_allocated_mb'] / 1024:.1f}"
        return s

    a = [r for r in results if r["case"] == "A"]
    if a:
        print(f"\n### Case A on {device}: CIFAR-10-LT IF 100, ConvNet-3 w128 (d = 2048), IPC 10, M = 4096; medians")
        print("| config | real samples/step | step (s) | real_features (ms) | real_statistics (ms) | real side per "
              "sample (us) | host peak RSS (GB)" + (" / device peak (GB)" if device == "cuda" else "") + " |")
        print("|---|---|---|---|---|---|---|")
        for r in a:
            p = r["phases_ms"]
            print(f"| {r['name']} | {r['real_samples_per_step']:.0f} | {r['step_s']:.3f} | {p['real_features']:.0f} | "
                  f"{p['real_statistics']:.0f} | {r['real_side_us_per_sample']:.0f} | {peak(r)} |")
    fw = [r for r in results if r["name"].startswith("forward-")]
    if fw:
        print(f"\n### Case B on {device}: images-source forward at 64 px (no augmentation), for the estimate")
        print("| extractor | d | batch | forward (s) | per image (ms) |\n|---|---|---|---|---|")
        for r in fw:
            name = f"ConvNet-{r['depth']} w128" if r["arch"] == "convnet" else "ResNet-18"
            print(f"| {name} | {r['feature_dim']} | {r['batch']} | {r['forward_s']:.2f} | "
                  f"{r['forward_ms_per_image']:.2f} |")
    st = [r for r in results if r["name"].startswith("stats-")]
    if st:
        print(f"\n### Case B on {device}: features-source real side, 115,846 features, 1000 classes; medians")
        print("| d | M | finish (s) | class_statistics (s) | per feature (us) | host peak RSS (GB) | "
              "statistics intermediates (GB) |\n|---|---|---|---|---|---|---|")
        for r in st:
            print(f"| {r['feature_dim']} | {r['num_freqs']} | {r['finish_s']:.2f} | {r['class_statistics_s']:.2f} | "
                  f"{r['real_side_us_per_feature']:.0f} | {peak(r)} | {gb(r['memory_bytes']['statistics_peak'])} |")
    if summary["crossovers"]:
        print(f"\n### Crossover on {device}: B* = N c_feat / c_img (featurising B* images costs the statistics "
              "over all N features)")
        print("| case | N | c_feat (us) | c_img (us) | B* (images) | as real_per_class | features real side | "
              "images real side |\n|---|---|---|---|---|---|---|---|")
        for x in summary["crossovers"]:
            rpc = "> all" if x["real_per_class_star"] is None else str(x["real_per_class_star"])
            if x["case"] == "A":
                print(f"| A (d 2048, M 4096) | {x['num_features']} | {x['c_feat_us']:.0f} | {x['c_img_us']:.0f} | "
                      f"{x['batch_star']:.0f} | {rpc} | {x['features_real_side_ms']:.0f} ms | "
                      f"{x['images_1024_real_side_ms']:.0f} ms (rpc 1024), "
                      f"{x['images_64_real_side_ms'] or 0:.0f} ms (rpc 64) |")
            else:
                print(f"| B (d {x['feature_dim']}, M {x['num_freqs']}, {x['arch']}) | {x['num_features']} | "
                      f"{x['c_feat_us']:.0f} | {x['c_img_us_estimate']:.0f} (est.) | {x['batch_star']:.0f} | {rpc} | "
                      f"{x['features_real_side_s']:.1f} s | {x['images_64_real_side_s_estimate']:.1f} s est. "
                      f"(rpc 64: {x['images_64_batch']} images) |")
    mem = summary["memory_per_rank_bytes"]
    if mem:
        print("\n### Memory per rank (analytic, world of one, GB)")
        keys = ["feature_store_fp16", "finished_features_fp32", "statistics_peak", "image_store_uint8",
                "activations_per_chunk_fp32", "batch_statistics_peak"]
        print("| setting | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1))
        for k, v in mem.items():
            print(f"| {k} | " + " | ".join(gb(v.get(x)) for x in keys) + " |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                   help="auto: the CPU, and CUDA too when present")
    p.add_argument("--cases", nargs="+", choices=("A", "B"), default=["A", "B"])
    p.add_argument("--steps", type=int, default=None, help="case A measured steps (default 3 on CPU, 10 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="case A warm-up steps (default 1 on CPU, 3 on CUDA)")
    p.add_argument("--reps", type=int, default=None, help="case B repetitions (default 1 on CPU, 5 on CUDA)")
    p.add_argument("--dims", type=int, nargs="+", default=[512, 2048], help="case B feature dims")
    p.add_argument("--freqs", type=int, nargs="+", default=[4096, 1024], help="case B frequency counts M")
    p.add_argument("--wait-idle", type=float, default=60, help="wait up to this many seconds for an idle CPU first")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    p.add_argument("--worker", choices=tuple(JOBS), default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    devices = devices_for(args.device, "features.py")
    if args.worker is not None:
        r = JOBS[args.worker](args.device, json.loads(args.worker_spec))
        args.worker_out.write_text(json.dumps(r))
        return
    t_start = time.perf_counter()
    per_device = []
    for dev in devices:
        busy = wait_idle(args.wait_idle)
        print(f"[features] {dev}: CPU busy before: {'?' if busy is None else f'{100 * busy:.0f}%'}", flush=True)
        results = []
        for kind, spec in plan(dev, args):
            t0 = time.perf_counter()
            r = run_job(kind, dev, spec)
            print(f"[features]   {dev} {r['name']}: {time.perf_counter() - t0:.0f} s (other processes "
                  f"{r['other_processes_cores'] or 0:.2f} cores)", flush=True)
            results.append(r)
        summary = summarise(dev, results)
        report(dev, results, summary)
        per_device.append({"device": dev, "results": results, **summary})
    lt = imagenet_lt_like_counts()
    payload = {
        "benchmark": "features", "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(), "cores_available": cores_available(),
        "wall_s": time.perf_counter() - t_start,
        "settings": {
            "case_a": {"overrides": speed_setting("<device>"), "configs": [list(c) for c in A_CONFIGS],
                       "feature_dim": 2048, "features": "random fp16 [K=1, A=1, N, d], one-member pool file",
                       "class_counts": class_counts(compose(speed_setting("cpu")))},
            "case_b": {**IMAGENET_LT, "dims": args.dims, "num_freqs": args.freqs, "kernel": "gaussian",
                       "labels": "imagenet_lt_like_counts(): 1280 .. 5 per class, sum 115,846 (not the split lists)",
                       "batch_at_real_per_class_64": batch_at(lt, 64),
                       "forward_batch": FORWARD_BATCH},
        },
        "notes": [
            "step_s: train_step with the PhaseTimer off; phases_ms: a second pass over the same steps with it on",
            "real side = real_features + real_statistics (case A phases); case B: finish + class_statistics",
            "case B images source is an estimate: forward per image (no augmentation) + statistics per feature",
            "crossover B* = N c_feat / c_img; larger real batches make the features source cheaper",
            "memory: analytic bytes per rank (world of one); host peak RSS is per job (own process, ru_maxrss)",
        ],
        "devices": per_device,
    }
    write_report(args.out, payload)


if __name__ == "__main__":
    main()
