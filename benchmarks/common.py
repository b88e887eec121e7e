"""Shared pieces of the benchmarks: a Distiller built from random tensors, and a check on the machine's load.

`build_distiller` composes the real Hydra config (configs/config.yaml plus overrides), fills RealData with random
uint8 images shaped and counted like the dataset's long-tailed training split (global ids 0..N-1 in class-major
order, shard s holding ids s, s + shards, ...; no shards are read from disk), starts from random synthetic images
and builds the Distiller. Speed does not depend on pixel values, so the timings are those of the real dataset.
"""
from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PHASES = ("draws", "real_features", "real_statistics", "all_reduce", "syn_forward", "syn_backward", "optimizer")
# head-class count of each raw training split, used when dataset.n_max is null (imagenet_lt's counts come from
# its split lists: pass dataset.n_max=... for it)
RAW_N_MAX = {"fashion_mnist": 6000, "cifar10": 5000, "cifar100": 500, "tiny_imagenet": 500, "imagenet": 1300}
# overrides every benchmark uses: no evaluation, logging, images or checkpoints, no resume
QUIET = ["evaluate=false", "resume=false", "distill.log_every=1000000", "distill.image_every=0",
         "distill.checkpoint_every=0"]


def compose(overrides: list[str]):
    """The typed Config of configs/config.yaml with `overrides` (Hydra syntax) applied."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from csdm_dist.config import register_configs, to_config

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return to_config(hydra_compose(config_name="config", overrides=[*QUIET, *overrides]))


def class_counts(cfg) -> list[int]:
    from csdm_dist.data.longtail import longtail_counts

    d = cfg.dataset
    if d.imbalance_factor is None:
        raise SystemExit("the benchmarks draw their class counts from the IF formula: pass dataset.imbalance_factor=N "
                         "(natural counts, imbalance_factor=null, are known only once a dataset is built)")
    n_max = d.n_max or RAW_N_MAX.get(d.source)
    if n_max is None:
        raise SystemExit(f"no head-class count known for {d.source}: pass the override dataset.n_max=N")
    return longtail_counts(n_max, d.num_classes, d.imbalance_factor)


def random_real(cfg, layout, device, counts: list[int] | None = None):
    """This shard's part of the long-tailed training split (class counts `counts`, default the IF formula's), as
    random pixels."""
    import torch

    from csdm_dist.distiller import RealData

    d = cfg.dataset
    counts = torch.tensor(class_counts(cfg) if counts is None else counts, dtype=torch.long)
    all_labels = torch.repeat_interleave(torch.arange(d.num_classes), counts)
    ids = torch.arange(layout.shard_rank, len(all_labels), layout.shards)
    g = torch.Generator().manual_seed(1000 + layout.shard_rank)
    images = torch.randint(0, 256, (len(ids), d.channels, d.image_size, d.image_size), generator=g, dtype=torch.uint8)
    return RealData(images.to(device), all_labels[ids].to(device), ids.to(device), counts)


def build_distiller(cfg, rt, run_dir: Path, timer: bool = False, counts: list[int] | None = None):
    """A Distiller on random real and synthetic images (real class counts `counts`, default the IF formula's);
    `timer` turns its PhaseTimer on. Nothing is written to `run_dir` unless the caller saves a checkpoint."""
    import torch

    from csdm_dist.dist import ParallelLayout
    from csdm_dist.distiller import Distiller, Normalizer, PhaseTimer
    from csdm_dist.synthetic import SyntheticSet
    from csdm_dist.tblog import NullLogger

    torch.manual_seed(cfg.seed)
    layout = ParallelLayout.from_world(cfg.parallel.replicas, rt.rank, rt.world_size)
    d = cfg.dataset
    real = random_real(cfg, layout, rt.device, counts)
    norm = Normalizer.build(d.mean, d.std, rt.device)
    full = torch.randn((d.num_classes * cfg.ipc, d.channels, d.image_size, d.image_size),
                       generator=torch.Generator().manual_seed(cfg.seed)).to(rt.device)
    syn = SyntheticSet.from_full(full, d.num_classes, cfg.ipc, layout)
    distiller = Distiller(cfg, rt, layout, real, syn, norm, NullLogger(), run_dir)
    distiller.timer = PhaseTimer(enabled=timer, device=rt.device)
    return distiller


def fixed_pool_overrides(base: list[str], folder: Path) -> list[str]:
    """The overrides of real_source=features: a fixed one-member pool (the network `base` configures, at its
    random init) saved as `folder`/pool.pt, as csdm_dist.pretrain would write it."""
    import torch

    from csdm_dist.models import build_network

    c0 = compose(base)
    e, d = c0.extractor, c0.dataset
    net = build_network(e.arch, d.channels, d.num_classes, d.image_size, e.width, e.depth_at(d.image_size), e.norm)
    sd = {k: v.detach().clone() for k, v in net.named_parameters()}
    torch.save({"members": [{"init": sd, "trained": sd}]}, Path(folder) / "pool.pt")
    return features_overrides(Path(folder) / "pool.pt")


def features_overrides(pool: Path) -> list[str]:
    """real_source=features with the one-member fixed pool file `pool`."""
    return ["real_source=features", "extractor.mode=pool", "extractor.interpolate=false", "extractor.pool_size=1",
            f"extractor.pool_path={pool}"]


def attach_random_features(distiller, seed: int = 7) -> None:
    """Give the distiller's real data random fp16 features [1 member, 1 view, its samples, D] (feature shards'
    layout), as a real_source=features run holds them; speed and memory do not depend on their values."""
    import torch

    from csdm_dist.data.features import FeatureData

    r, dim = distiller.real, distiller.extractor.feature_dim
    feats = torch.randn((1, 1, len(r.ids), dim), generator=torch.Generator().manual_seed(seed)).to(torch.float16)
    r.features = FeatureData(feats.to(r.labels.device), r.labels, r.ids)


def distiller_for_source(base: list[str], folder: Path, rt, source: str, counts: list[int] | None = None):
    """build_distiller on the config `base` for real_source `source`: `images` (random pixels) or `features` (a
    fixed one-member pool saved in `folder` and random features attached)."""
    features = source == "features"
    cfg = compose(base + (fixed_pool_overrides(base, folder) if features else []))
    d = build_distiller(cfg, rt, folder, counts=counts)
    if features:
        attach_random_features(d)
    return d


def timed_step(distiller, step: int, clock=time.perf_counter) -> tuple[float, dict[str, float], dict]:
    """One train_step: (its wall time by `clock`, the seconds of each PHASES entry from the distiller's PhaseTimer,
    the step's output). The PhaseTimer must be on for the phases to be non-zero."""
    before = dict(distiller.timer.totals)
    t0 = clock()
    out = distiller.train_step(step)
    wall = clock() - t0
    return wall, {k: distiller.timer.totals.get(k, 0.0) - before.get(k, 0.0) for k in PHASES}, out

# ---------------------------------------------------------------------------------------------------------------
# machine load: the benchmarks wait for an idle CPU and report what other processes used while they ran
# ---------------------------------------------------------------------------------------------------------------

def _proc_stat() -> tuple[int, int] | None:
    """(all, idle + iowait) CPU ticks of the whole machine so far, from /proc/stat."""
    try:
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return sum(vals), vals[3] + vals[4]


def wait_idle(max_wait: float, threshold: float = 0.1) -> float | None:
    """Wait up to `max_wait` s until less than `threshold` of the CPU is busy; returns the last busy fraction."""
    deadline = time.monotonic() + max_wait
    while True:
        a = _proc_stat()
        time.sleep(1.0)
        b = _proc_stat()
        if a is None or b is None:
            return None
        busy = 1.0 - (b[1] - a[1]) / max(1, b[0] - a[0])
        if busy <= threshold or time.monotonic() >= deadline:
            return busy


def _own_cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # children that were waited for (torchrun and its ranks)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class OtherLoad:
    """`with OtherLoad() as load: ...`, then `load.cores`: the mean number of cores that processes other than this
    one (and its finished children) kept busy meanwhile; None where /proc/stat is unreadable."""

    def __enter__(self) -> "OtherLoad":
        self.cores: float | None = None
        self._t0, self._stat0, self._own0 = time.perf_counter(), _proc_stat(), _own_cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        stat1, wall = _proc_stat(), time.perf_counter() - self._t0
        if self._stat0 is None or stat1 is None or wall <= 0:
            return
        busy = ((stat1[0] - stat1[1]) - (self._stat0[0] - self._stat0[1])) / os.sysconf("SC_CLK_TCK")
        self.cores = max(0.0, busy - (_own_cpu_seconds() - self._own0)) / wall


def cores_available() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_info() -> dict:
    import torch

    info = {"cpu_count": os.cpu_count(), "cores_available": cores_available(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def devices_for(device: str, script: str) -> list[str]:
    """`--device auto|cpu|cuda` -> the devices to measure; cuda without CUDA stops the script with a clear message."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{script} --device cuda: CUDA is not available here (torch.cuda.is_available() is False); "
                         "use --device cpu or --device auto")
    return {"auto": ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]}.get(device, [device])


def write_report(path: Path | None, payload: dict, quiet: bool = False) -> None:
    """The benchmark's JSON report at `path` (parents created), when one was asked for."""
    if path is not None:
        from csdm_dist.files import write_json  # whole or not at all: --merge rewrites tables built over sessions

        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, payload)
        if not quiet:
            print(f"wrote {path}")
