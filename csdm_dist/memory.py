"""Memory per rank of a distillation, estimated from the config alone, so node counts can be chosen before submitting.

Counted (bytes per rank; world = replicas x shards, DESIGN.md section 4):
- synthetic slice: C * ipc * ch * H * W * 4 / shards (fp32 pixels; bf16: 2 bytes plus a 4-byte master copy)
- gradients of the slice: the same size (ZeRO >= 2 partitions them over the replicas); without ZeRO, DeepSpeed
  reduces them through a flat copy of the same size (measured: benchmarks/scale.py at IPC 50)
- optimizer state: Adam 2x the fp32 slice, SGD with momentum 1x; divided by the replicas under ZeRO >= 1
- spectral statistics: C x (2M + 1) x 4 bytes per side (real, synthetic), x 2 sides (linear kernel: D + 1 for M)
- real-data store: N / shards x ch x H x W bytes (uint8, held in memory for the whole run)
- the full synthetic set, briefly at init and at the final gather: C * ipc * ch * H * W * 4
- real_source=features: the feature store (N / shards x members x views x D, fp16 or fp32)
Then the working set of the largest of a step's phases, which follow one another (measured at ImageNet-LT shapes
on the CPU: benchmarks/scale.py):
- real forward (real_source=images): the real batch in fp32, normalised and augmented (2 copies), and one
  distill.real_chunk of the no-grad forward (a block's input and output)
- real statistics: spectral.class_statistics over the real batch or every feature of the rank (with the finished
  fp32 features [N / shards, D]), STATS_CHUNK rows at a time, each holding the projection, cos, sin and their
  concatenation ([rows, 5M] fp32)
- synthetic pass: the activations kept for the backward (about 4 fp32 maps per ConvNet block, 12 per ResNet
  stage) of the whole slice, or of one distill.syn_chunk under activation checkpointing plus the decoded images;
  the statistics of the same rows (unchunked: every row's projection [n_syn, M] kept for the backward too);
  with labels.teacher_ce > 0, the teacher's activations kept for the same rows' backward (counted in a forward of
  one image through the teacher.* network on the CPU)
Not counted: the extractor pool, frequencies, CUDA/DeepSpeed workspace, the evaluation and the process itself
(libraries: about 0.7 GB of host memory for torch on the CPU). Treat the total as an estimate, not a bound.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import Config
from .spectral import STATS_CHUNK


@dataclass(frozen=True)
class MemoryEstimate:
    rows: tuple[tuple[str, int, str], ...]  # (item, bytes per rank, how it was computed)
    world_size: int
    replicas: int
    shards: int
    # item -> the phase of a step it lives in (absent: held all along). Phases follow one another, so the total
    # counts the largest phase only
    phases: tuple[tuple[str, str], ...] = ()

    def phase_bytes(self) -> dict[str, int]:
        """Bytes of each phase's working set."""
        of, out = dict(self.phases), {}
        for name, b, _ in self.rows:
            if name in of:
                out[of[name]] = out.get(of[name], 0) + b
        return out

    @property
    def total(self) -> int:
        of = dict(self.phases)
        return sum(b for name, b, _ in self.rows if name not in of) + max(self.phase_bytes().values(), default=0)

    def table(self, ranks_per_node: int = 1) -> str:
        of = dict(self.phases)
        width = max(len(name) + (len(of[name]) + 3 if name in of else 0) for name, _, _ in self.rows)
        lines = [f"memory estimate per rank (world {self.world_size} = {self.replicas} replicas x "
                 f"{self.shards} shards):"]
        lines += [f"  {name:<{width}}  {human(b):>10}   {how}" for name, b, how in self.rows if name not in of]
        if of:
            per = self.phase_bytes()
            lines.append(f"  one phase of a step at a time (the largest, {max(per, key=per.get)}, counts):")
            lines += [f"  {'[' + of[name] + '] ' + name:<{width}}  {human(b):>10}   {how}"
                      for name, b, how in self.rows if name in of]
        lines.append(f"  {'total (estimate)':<{width}}  {human(self.total):>10}   + workspace, extractor pool")
        if ranks_per_node > 1:
            lines.append(f"  {'per node':<{width}}  {human(self.total * ranks_per_node):>10}   "
                         f"x {ranks_per_node} ranks per node")
        return "\n".join(lines)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def feature_dim(cfg: Config) -> int:
    """Width of the extractor's features (what the linear kernel's statistics sum)."""
    if cfg.extractor.arch == "resnet18":
        return 512
    size = cfg.dataset.image_size
    for _ in range(cfg.extractor.depth_at(size)):
        size //= 2
    return cfg.extractor.width * max(size, 1) ** 2


def activation_bytes(cfg: Config) -> tuple[int, int]:
    """(bytes kept per image for the backward, peak bytes per image of a forward without gradient), fp32."""
    ch, size = cfg.dataset.channels, cfg.dataset.image_size
    if cfg.extractor.arch == "resnet18":
        maps = [(64 * 2 ** s) * (size // 2 ** s) ** 2 for s in range(4)]
        return 4 * (3 * maps[0] + 12 * sum(maps)), 4 * (ch * size * size + 2 * max(maps))
    width, depth = cfg.extractor.width, cfg.extractor.depth_at(size)
    maps = [width * max(size // 2 ** i, 1) ** 2 for i in range(depth)]
    return 4 * 4 * sum(maps), 4 * (ch * size * size + 2 * max(maps))


def teacher_kept_bytes(cfg: Config) -> int:
    """Bytes the frozen teacher (teacher.* keys, eval mode, no parameter gradients) keeps per image for the backward
    to its input: the tensors autograd saves in a forward of one image on the CPU (untrained weights: the sizes do
    not depend on them), each storage counted once; the weights it saves are the model's own, not counted."""
    import torch

    from .teacher import teacher_network  # a heavy import (hydra, the evaluation): only for this row

    d = cfg.dataset
    net = teacher_network(cfg).eval().requires_grad_(False)
    x = torch.zeros(1, d.channels, d.image_size, d.image_size, requires_grad=True)
    saved: dict[tuple, int] = {}  # a tensor saved by two ops (a block's output, the next op's input) is kept once
    own = {p.untyped_storage().data_ptr() for p in [*net.parameters(), *net.buffers()]}

    def pack(v: torch.Tensor) -> torch.Tensor:
        if v.untyped_storage().data_ptr() not in own:
            saved[v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)] = v.numel() * v.element_size()
        return v

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
        net(x)
    return sum(saved.values())


def statistics_bytes(rows: int, num_freqs: int, chunk: int = STATS_CHUNK) -> int:
    """Peak intermediates of spectral.class_statistics over `rows` rows: one chunk's projection [rows, M], cos and
    sin [rows, M] each and their concatenation [rows, 2M], fp32."""
    return min(rows, chunk) * 5 * num_freqs * 4


def estimate_memory(cfg: Config, world_size: int, num_real: int, real_batch: int | None = None) -> MemoryEstimate:
    """Bytes per rank for `cfg` on `world_size` ranks, with `num_real` real training images in the dataset and
    `real_batch` real images drawn per step over all ranks (default: min(num_real, classes x real_per_class))."""
    replicas = cfg.parallel.replicas
    if world_size % replicas:
        raise ValueError(f"parallel.replicas={replicas} does not divide the world size {world_size}")
    shards = world_size // replicas
    c, ipc, d = cfg.dataset.num_classes, cfg.ipc, cfg.dataset
    ch_hw = d.channels * d.image_size * d.image_size
    pixels = math.ceil(c * ipc / shards) * ch_hw  # this rank's synthetic pixels
    zero, bf16 = cfg.deepspeed.zero_stage, cfg.deepspeed.bf16
    rows: list[tuple[str, int, str]] = []
    fmt = f"{c} x {ipc} x {d.channels} x {d.image_size} x {d.image_size}"
    if bf16:
        rows.append(("synthetic slice (bf16)", pixels * 2, f"{fmt} x 2 B / {shards} shards"))
        rows.append(("fp32 master copy", pixels * 4 // (replicas if zero >= 1 else 1),
                     f"{fmt} x 4 B / {shards} shards" + (f" / {replicas} replicas (ZeRO {zero})" if zero >= 1 else "")))
    else:
        rows.append(("synthetic slice", pixels * 4, f"{fmt} x 4 B / {shards} shards"))
    grad_div = replicas if zero >= 2 else 1
    grads = pixels * (2 if bf16 else 4) // grad_div
    rows.append(("gradients", grads,
                 "same as the slice" + (f" / {replicas} replicas (ZeRO {zero})" if grad_div > 1 else "")))
    if zero == 0:  # DeepSpeed's non-ZeRO reduction flattens the gradients into one buffer (even over one rank)
        rows.append(("gradient all-reduce copy", grads, "DeepSpeed (ZeRO 0) flattens the gradients to reduce them"))
    states = 2 if cfg.distill.optimizer == "adam" else (1 if cfg.distill.momentum else 0)
    if states:
        opt_div = replicas if zero >= 1 else 1
        where = " (host memory: offload)" if cfg.deepspeed.offload_optimizer else ""
        rows.append(("optimizer state", pixels * 4 * states // opt_div,
                     f"{cfg.distill.optimizer}: {states} x fp32 slice" +
                     (f" / {replicas} replicas (ZeRO {zero})" if opt_div > 1 else "") + where))
    m = feature_dim(cfg) if cfg.method.kernel.name == "linear" else cfg.method.kernel.num_freqs
    per_class = (m + 1) if cfg.method.kernel.name == "linear" else (2 * m + 1)
    rows.append(("spectral statistics", c * per_class * 4 * 2,
                 f"{c} classes x {per_class} x 4 B x 2 sides" +
                 (" (linear: D + 1)" if cfg.method.kernel.name == "linear" else f" (2M + 1, M = {m})")))
    rows.append(("real-data store", math.ceil(num_real / shards) * ch_hw,
                 f"{num_real} images / {shards} shards x {d.channels} x {d.image_size} x {d.image_size} uint8"))
    rows.append(("full set (init, final gather)", c * ipc * ch_hw * 4, f"{fmt} x 4 B, briefly"))
    if cfg.real_source == "features":  # every feature of this rank, every step; no real forward
        n_feat = math.ceil(num_real / shards)
        dim, k, v = feature_dim(cfg), cfg.extractor.pool_size, cfg.features.views
        size = 2 if cfg.features.dtype == "float16" else 4
        rows.append(("feature store", n_feat * k * v * dim * size,
                     f"{n_feat} features x {k} members x {v} views x {dim} x {size} B ({cfg.features.dtype})"))

    # the working sets of a step's phases, one after the other: the real forward (images), the real statistics,
    # the synthetic forward and backward
    phases: list[tuple[str, str]] = []

    def during(phase: str, name: str, b: int, how: str) -> None:
        rows.append((name, b, how))
        phases.append((name, phase))

    kept, peak = activation_bytes(cfg)
    m = cfg.method.kernel.num_freqs if cfg.method.kernel.name != "linear" else 0
    if real_batch is None:
        real_batch = min(num_real, c * cfg.distill.real_per_class)
    if cfg.real_source == "features":
        n_stat = n_feat
        during("real statistics", "finished features", n_feat * dim * 4, f"{n_feat} x {dim} fp32")
    else:
        n_stat = n_real = math.ceil(real_batch / shards)
        n_live = min(n_real, cfg.distill.real_chunk)  # the real forward runs in chunks of distill.real_chunk
        during("real forward", "real batch (fp32)", 2 * n_real * ch_hw * 4,
               f"~{n_real} images per step x {d.channels} x {d.image_size} x {d.image_size} x 4 B, normalised and "
               "augmented")
        during("real forward", "activations, real (no grad)", n_live * peak,
               f"{n_live} at a time (distill.real_chunk) x {human(peak)} peak")
    if m:
        during("real statistics", "statistics, real side", statistics_bytes(n_stat, m),
               f"min({n_stat}, {STATS_CHUNK}) rows x 5M x 4 B (projection, cos, sin, both)")
    f2 = cfg.synthetic.factor ** 2  # multi-formation: every stored image is decoded into f^2 images
    n_syn = math.ceil(c * ipc / shards) * f2
    chunk = cfg.distill.syn_chunk
    decoded = f"{n_syn} images" + (f" (x{f2} decoded)" if f2 > 1 else "")
    whole = chunk is None or chunk >= n_syn
    if whole:
        during("synthetic pass", "activations, synthetic", n_syn * kept,
               f"{decoded} x {human(kept)} kept for the backward")
    else:  # activation checkpointing: one chunk's activations live at a time, plus the decoded images it keeps
        during("synthetic pass", "activations, synthetic", chunk * kept + n_syn * ch_hw * 4,
               f"{chunk} of {decoded} at a time (distill.syn_chunk) x {human(kept)} + the decoded fp32 images")
    rows_syn = n_syn if whole else chunk  # the rows of one chunk's statistics (and teacher cross-entropy)
    if m:
        during("synthetic pass", "statistics, synthetic side",
               statistics_bytes(rows_syn, m) + (n_syn * m * 4 if whole else 0),
               f"min({rows_syn}, {STATS_CHUNK}) rows x 5M x 4 B" +
               (f" + {n_syn} x M x 4 B projections kept for the backward" if whole else ""))
    if cfg.labels.teacher_ce > 0:  # the teacher's cross-entropy runs on the same rows as the statistics
        per = teacher_kept_bytes(cfg)
        during("synthetic pass", "activations, teacher (labels.teacher_ce)", rows_syn * per,
               f"{rows_syn} images x {human(per)} kept for the backward ({cfg.teacher.arch}, teacher.* keys)")
    return MemoryEstimate(tuple(rows), world_size, replicas, shards, tuple(phases))


def estimate_from_counts(cfg: Config, world_size: int, counts: list[int]) -> MemoryEstimate:
    """The estimate for a dataset with these per-class real counts (its manifest's): the real store holds them all,
    and a step draws min(n_c, real_per_class) images of class c in expectation."""
    real_batch = sum(min(int(n), cfg.distill.real_per_class) for n in counts)
    return estimate_memory(cfg, world_size, int(sum(counts)), real_batch)


def available_bytes(device_type: str, device_index: int | None = None) -> int:
    """Memory free for this run now: host memory available (CPU), or free memory on the CUDA device."""
    if device_type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device_index)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def check_fits(est: MemoryEstimate, ranks_here: int, available: int) -> None:
    """ConfigError when `ranks_here` ranks of this estimate do not fit in `available` bytes."""
    from .config import ConfigError

    need = est.total * ranks_here
    if need > available:
        per = f" ({human(est.total)} per rank x {ranks_here} ranks here)" if ranks_here > 1 else ""
        top = max(est.rows, key=lambda r: r[1])
        hint = {"activations, synthetic": "set distill.syn_chunk (e.g. 1024: activation checkpointing holds one chunk)",
                "activations, real (no grad)": "lower distill.real_chunk",
                "statistics, real side": "lower method.kernel.num_freqs",
                "statistics, synthetic side": "set distill.syn_chunk or lower method.kernel.num_freqs"}.get(
            top[0], "lower ipc (or the settings behind that item)")
        raise ConfigError(f"invalid config `force_memory`: the memory estimate {human(need)}{per} exceeds the "
                          f"{human(available)} available; the largest item is {top[0]} ({human(top[1])}: {top[2]}). "
                          f"{hint[0].upper() + hint[1:]}, use more ranks, or pass force_memory=true to start anyway "
                          f"(the estimate is not a bound)")
