"""The distillation loop. Per step: draws, real statistics (all-reduced), synthetic statistics (global value,
local gradient; the stored images are decoded on their rank first, formation.decode), loss, backward, the
step's lr (engine.lr_at), optimizer step, then maybe log and checkpoint. Every random draw is keyed by
(seed, step, ...), so a resumed run needs only the step and the optimizer state to continue exactly.
"""
from __future__ import annotations

import contextlib
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint
from torchvision.utils import make_grid
from tqdm import tqdm

from . import checkpoint, formation, rng
from . import spectral as S
from .augment import NUM_UNIFORMS, augment, pick_op
from .config import Config
from .dist import ParallelLayout, Runtime, all_reduce_sum, global_sum_local_grad
from .engine import build_engine, load_engine, lr_at, save_engine, set_lr
from .data.features import FeatureData
from .extractors import Extractor
from .preempt import StopSignal
from .runinfo import config_hash
from .synthetic import SyntheticSet
from .tblog import NullLogger

log = logging.getLogger(__name__)


@dataclass
class Normalizer:
    mean: Tensor  # [1, C, 1, 1]
    std: Tensor

    @classmethod
    def build(cls, mean: list[float], std: list[float], device: torch.device) -> "Normalizer":
        def column(v: list[float]) -> torch.Tensor:
            return torch.tensor(v, device=device).view(1, -1, 1, 1)
        return cls(column(mean), column(std))

    def __call__(self, x_uint8: Tensor) -> Tensor:
        return (x_uint8.float() / 255.0 - self.mean) / self.std

    def to_unit(self, x: Tensor) -> Tensor:
        return (x * self.std + self.mean).clamp(0, 1)


@dataclass
class RealData:
    """This rank's share of the real training set, on the device, plus the global per-class counts."""
    images: Tensor  # uint8 [N, C, H, W]
    labels: Tensor
    ids: Tensor
    counts: Tensor  # [num_classes] over the whole set (manifest)
    features: FeatureData | None = None  # real_source=features: precomputed [K, A, N', d] (its own labels, ids)


class Distiller:
    def __init__(self, cfg: Config, rt: Runtime, layout: ParallelLayout, real: RealData, syn: SyntheticSet,
                 norm: Normalizer, logger: NullLogger, run_dir: Path, teacher: nn.Module | None = None):
        self.cfg, self.rt, self.layout, self.real, self.syn, self.norm = cfg, rt, layout, real, syn, norm
        self.logger, self.run_dir = logger, run_dir
        # labels.teacher_ce > 0: the frozen teacher whose cross-entropy on the synthetic images joins the loss
        self.teacher = teacher if cfg.labels.teacher_ce > 0 else None
        if cfg.labels.teacher_ce > 0 and teacher is None:
            raise ValueError("labels.teacher_ce > 0 needs the teacher network (csdm_dist.teacher.load_teacher)")
        d = cfg.dataset
        self.num_classes = d.num_classes
        self.extractor = Extractor(cfg.extractor, d.channels, d.num_classes, d.image_size, rt.device,
                                   normalize=cfg.method.normalize_features, precision=cfg.precision)
        self.kernel = k = cfg.method.kernel
        # per-class bandwidth s_c: frequencies are drawn at bandwidth s_head and class c's scaled by s_head / s_c
        self.freq_scale = None if k.bandwidth_tail is None else \
            (k.bandwidth / S.loglinear_in_counts(real.counts, k.bandwidth, k.bandwidth_tail)).to(rt.device)
        self.alpha = S.alpha_schedule(real.counts, cfg.method.weighting.alpha_head, cfg.method.weighting.alpha_tail,
                                      cfg.method.weighting.schedule).to(rt.device)
        # expected real images per class per step: each image is kept with probability p_c
        self.keep_prob = (cfg.distill.real_per_class / real.counts.float()).clamp(max=1.0).to(rt.device)
        # multi-formation: each stored image decodes into f^2 samples of its class, keyed by their own global ids
        self.factor = f = cfg.synthetic.factor
        self.decoded_ids = formation.decoded_ids(syn.ids, f)
        self.decoded_labels = formation.decoded_labels(syn.labels, f)
        self.engine = build_engine(syn.images, cfg, layout, rt)  # owns the live synthetic images
        self.timer = PhaseTimer(enabled=False, device=rt.device)
        feat = 2 * self.kernel.num_freqs if self.kernel.name != "linear" else self.extractor.feature_dim
        # real (sums + counts) and synthetic (sums, counts) statistics, fp32, every step
        self.allreduce_bytes = 4 * self.num_classes * (2 * feat + 2)
        log.info("all-reduce payload per step: %d bytes (%d classes x %d statistics x 2 sides, fp32)",
                 self.allreduce_bytes, self.num_classes, feat + 1)
        self.step = 0
        self.step_times: list[float] = []  # every step's wall time, over every segment of the run (checkpointed)
        self.segment_steps = 0  # steps taken by this process (0: a finished run resumed to be evaluated again)
        self.elapsed_s = 0.0  # distillation wall time over every segment of the run (kept in the checkpoints)
        self.ckpt_root = run_dir / "checkpoints"
        self.check_resumable()  # before the run writes its records: a refused resume leaves the folder as it was

    # ---- one step ------------------------------------------------------------------------------------------
    def real_batch(self, step: int) -> tuple[Tensor, Tensor, Tensor]:
        r = self.real
        u = rng.sample_uniforms(r.ids, self.cfg.seed, step, rng.REAL_PICK).squeeze(1).to(r.labels.device)
        keep = u < self.keep_prob[r.labels]
        idx = keep.nonzero().squeeze(1)  # host sync: the batch size is data dependent
        return self.norm(r.images[idx]), r.labels[idx], r.ids[idx]

    def augmented(self, x: Tensor, ids: Tensor, op: str | None, stream: int, step: int) -> Tensor:
        """The step's augmentation op on `x`, its parameters keyed by image id (the same draws in any chunking)."""
        return x if op is None else augment(x, op, rng.sample_uniforms(ids, self.cfg.seed, step, stream, NUM_UNIFORMS))

    def embed(self, x: Tensor, ids: Tensor, op: str | None, stream: int, step: int, chunk: int | None = None) -> Tensor:
        """Augmented, embedded features; `chunk` splits the forward (real side, no grad) to bound memory."""
        x = self.augmented(x, ids, op, stream, step)
        if chunk is None or len(x) <= chunk:
            return self.extractor.embed(x)
        return torch.cat([self.extractor.embed(x[i:i + chunk]) for i in range(0, len(x), chunk)])

    def syn_statistics(self, decoded: Tensor, freqs: Tensor | None, op: str | None,
                       step: int) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's synthetic class sums and counts, differentiable in `decoded`, and the sum of the teacher's
        cross-entropies on the same augmented views (0 without labels.teacher_ce). With distill.syn_chunk, chunk by
        chunk under activation checkpointing: the graph keeps each chunk's input and [C, F] sums, and the backward
        recomputes one chunk's forward at a time (augmentation uniforms are keyed by image id: the same draws)."""
        labels, ids, chunk = self.decoded_labels, self.decoded_ids, self.cfg.distill.syn_chunk

        def sums_of(x: Tensor, y: Tensor, i: Tensor) -> tuple[Tensor, Tensor]:
            x = self.augmented(x, i, op, rng.SYN_AUG, step)
            sums = S.class_statistics(self.extractor.embed(x), y, self.num_classes, freqs,
                                      freq_scale=self.freq_scale)[0]
            if self.teacher is None:
                return sums, sums.new_zeros(())
            return sums, F.cross_entropy(self.teacher(x).float(), y, reduction="sum")

        if chunk is None or len(decoded) <= chunk:
            sums, ce = sums_of(decoded, labels, ids)
        else:
            sums = ce = 0
            for i in range(0, len(decoded), chunk):
                s, e = activation_checkpoint(sums_of, decoded[i:i + chunk], labels[i:i + chunk], ids[i:i + chunk],
                                             use_reentrant=False)
                sums, ce = sums + s, ce + e
        return sums, torch.bincount(labels, minlength=self.num_classes).to(sums.dtype), ce

    def loss(self, real: tuple[Tensor, Tensor], syn: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        w = self.cfg.method.weighting
        if self.kernel.name == "linear":
            return S.mean_matching_loss(real, syn, w.loss_scale)
        return S.spectral_loss(real, syn, self.alpha, w.form, w.loss_scale)

    def train_step(self, step: int) -> dict[str, Tensor]:
        cfg, group, t = self.cfg, self.layout.shard_group, self.timer
        with t("draws"):
            g = rng.generator(cfg.seed, step, rng.EXTRACTOR, self.layout.replica)  # shared by the replica's ranks
            member = self.extractor.prepare(g)
            freqs = None
            if self.kernel.name != "linear":
                freqs = S.sample_frequencies(self.kernel.name, self.kernel.num_freqs, self.extractor.feature_dim,
                                             self.kernel.bandwidth, g, self.kernel.nu, self.rt.device)
            op = pick_op(g) if cfg.distill.augment else None

        with torch.no_grad():
            with t("real_features"):
                if self.real.features is None:
                    x, y, ids = self.real_batch(step)
                    z = self.embed(x, ids, op, rng.REAL_AUG, step, cfg.distill.real_chunk)
                else:  # every real feature of this rank, at this step's extractor and view: exact full-data stats
                    f = self.real.features
                    view = int(torch.randint(f.feats.shape[1], (1,), generator=g)) if f.feats.shape[1] > 1 else 0
                    z, y = self.extractor.finish(f.feats[member, view]), f.labels
            with t("real_statistics"):
                sums, n = S.class_statistics(z, y, self.num_classes, freqs, freq_scale=self.freq_scale)
            with t("all_reduce"):
                packed = all_reduce_sum(torch.cat([sums, n.unsqueeze(1)], 1), group)
                real = (packed[:, :-1], packed[:, -1])

        with t("syn_forward"):
            decoded = formation.decode(self.engine().float(), self.factor)
            s_sums, s_n, s_ce = self.syn_statistics(decoded, freqs, op, step)
        with t("all_reduce"):
            syn = (global_sum_local_grad(s_sums, group), all_reduce_sum(s_n, group))
            if self.teacher is not None:  # the mean over every rank's decoded images; the gradient stays local
                s_ce = global_sum_local_grad(s_ce, group) / syn[1].sum()
        with t("syn_backward"):
            out = self.loss(real, syn)
            if self.teacher is not None:
                out["teacher_ce"] = s_ce.detach()
                out["loss"] = out["loss"] + cfg.labels.teacher_ce * s_ce
            self.engine.backward(out["loss"])
        with t("optimizer"):
            lr = lr_at(step, cfg.distill.iterations, cfg.distill)
            set_lr(self.engine, lr)
            self.engine.step()
        out["real_images"] = real[1].sum()
        out["lr"] = torch.tensor(lr)
        return out

    # ---- the loop ------------------------------------------------------------------------------------------
    def run(self, stop: StopSignal | None = None, after_step=None) -> bool:
        """Distil up to distill.iterations; False if `stop` was requested (a checkpoint is saved first).
        `after_step(step)`, if given, is called on every rank after each step (collectives allowed)."""
        cfg = self.cfg.distill
        self.maybe_resume()
        if after_step is not None and 0 < self.step < cfg.iterations:
            after_step(self.step)  # a run resumed at a step whose hook had not finished
        self.logger.scalar("distill/allreduce_bytes_per_step", self.allreduce_bytes, self.step)
        bar = tqdm(range(self.step, cfg.iterations), initial=self.step, total=cfg.iterations, desc="distil",
                   disable=not self.rt.is_main, dynamic_ncols=True)
        for step in bar:
            t0 = time.perf_counter()
            out = self.train_step(step)
            self.step = step + 1
            self.step_times.append(time.perf_counter() - t0)
            self.elapsed_s += self.step_times[-1]
            self.segment_steps += 1
            if self.step % cfg.log_every == 0 or self.step == cfg.iterations:
                vals = {k: float(v.detach()) for k, v in out.items()}  # host sync, only when logging
                for k, v in vals.items():
                    self.logger.scalar(f"distill/{k}", v, self.step)
                bar.set_postfix(loss=f"{vals['loss']:.4g}")
            if cfg.image_every and self.step % cfg.image_every == 0:
                self.log_images(self.step)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.iterations:
                self.save()
            if after_step is not None:
                after_step(self.step)
            if stop is not None and self.step < cfg.iterations and stop.requested():
                bar.close()
                self.save()
                log.warning("stopped at step %d on request; resume continues from here", self.step)
                return False
        bar.close()
        if checkpoint.latest(self.ckpt_root) != self.step:  # a resumed, already final run has its checkpoint
            self.save()
        return True

    def step_ms_median(self) -> float:
        return 1000 * statistics.median(self.step_times) if self.step_times else 0.0

    # ---- images, checkpoints -------------------------------------------------------------------------------
    def images(self) -> Tensor:
        """This rank's live synthetic images (read through the engine, so ZeRO-3 gathers them)."""
        with torch.no_grad():
            return self.engine().detach().float()

    def gather(self) -> Tensor:
        return self.syn.gather(self.images(), self.layout)

    def log_images(self, step: int, full: Tensor | None = None) -> None:
        full = self.gather() if full is None else full
        if not self.rt.is_main:
            return
        imgs = self.norm.to_unit(full).cpu()
        ipc = self.syn.ipc
        self.logger.image("synthetic/all", make_grid(imgs[: min(self.num_classes, 20) * ipc], nrow=ipc), step)
        for c in range(min(self.num_classes, 10)):
            self.logger.image(f"synthetic/class_{c:03d}", make_grid(imgs[c * ipc:(c + 1) * ipc], nrow=ipc), step)

    def meta(self) -> dict:
        """What a checkpoint must share with the run that resumes it, beyond the config: the world size (the
        layout) and the precision `precision=auto` resolved to on this machine (a requeued job on another kind of
        node would otherwise go on in another precision)."""
        return {"config_hash": config_hash(self.cfg), "world_size": self.rt.world_size,
                "precision": self.extractor.precision}

    def save(self) -> None:
        state = {"step": self.step, "ids": self.syn.ids.cpu().tolist(), "elapsed_s": self.elapsed_s,
                 "step_times": self.step_times}
        checkpoint.save(self.ckpt_root, self.step, self.rt.rank,
                        lambda path: save_engine(self.engine, self.ckpt_root, path.name, state),
                        self.meta(), self.cfg.distill.keep_checkpoints)

    def check_resumable(self) -> int | None:
        """The newest checkpoint's step to resume from (None: start afresh); RunDirError when it was made with
        another world size or precision."""
        step = checkpoint.latest(self.ckpt_root) if self.cfg.resume else None
        if step is not None:
            checkpoint.check_meta(self.ckpt_root, step, self.meta(), recorded_later=("precision",))  # since 2026-12-07
        return step

    def maybe_resume(self) -> None:
        step = self.check_resumable()
        if step is None:
            return
        state = load_engine(self.engine, self.ckpt_root, checkpoint.tag(step))
        if state["ids"] != self.syn.ids.cpu().tolist():
            raise ValueError(f"checkpoint step {step} holds other synthetic ids than this rank's; the layout changed")
        self.step = state["step"]
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.step_times = [float(t) for t in state.get("step_times", [])]  # checkpoints from before: this segment's
        log.info("resumed from %s at step %d", checkpoint.step_dir(self.ckpt_root, step), self.step)


class PhaseTimer:
    """Wall time per named phase of a step, for the benchmark; a no-op context unless enabled.

    When enabled it synchronises CUDA at each phase boundary, which is why it is off in normal runs.
    """

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled, self.device = enabled, device
        self.totals: dict[str, float] = {}  # seconds per phase, summed over steps
        self._null = contextlib.nullcontext()

    def __call__(self, name: str):
        return self._measure(name) if self.enabled else self._null

    @contextlib.contextmanager
    def _measure(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0
