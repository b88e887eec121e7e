"""Entry point: `python -m csdm_dist.distill [dataset=...] [method=...] [ipc=...]`, or the same under torchrun.

Parses the config, joins the process group, loads this rank's real shards, initialises the synthetic set,
distils, evaluates against the random-real baseline, and writes results.json, distilled.pt, synthetic.png and
TensorBoard logs into out_dir.
"""
from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torchvision.utils import save_image

from . import checkpoint, files, formation, rng, rundir
from .cluster import multirun_flag_first
from .config import Config, ConfigError, register_configs, run_steps, to_config
from .errors import EXIT_STOPPED, Interrupted, one_line_errors, read_json_record
from .data.features import (FeatureData, check_provenance, features_dir, load_features_manifest, provenance,
                            read_features)
from .data.manifest import check_counts, rebuild_hint, split_names
from .data.normalization import resolve_normalization
from .data.shards import MANIFEST, dataset_dir, load_manifest, read_split
from .dist import ParallelLayout, Runtime, all_reduce_sum, close_distributed, init_distributed
from .distiller import Distiller, Normalizer, RealData
from .evaluate import evaluate_set
from .extractors import Extractor, resolve_precision
from .memory import available_bytes, check_fits, estimate_from_counts, human
from .runinfo import config_hash, git_commit, hardware, peak_memory_mb
from .softlabels import FP32_BYTES, soft_targets
from .pretrain import check_pool
from .teacher import Teacher, load_teacher
from .preempt import StopSignal
from .synthetic import SyntheticSet, mix_order, pick_real_init
from .tblog import NullLogger, make_logger

log = logging.getLogger("csdm_dist.distill")


def load_real(cfg: Config, layout: ParallelLayout, device: torch.device, manifest: dict) -> RealData:
    ddir = dataset_dir(cfg.dataset)
    shard = read_split(ddir, "train", layout.shard_rank, layout.shards, cfg=cfg.dataset)
    counts = torch.tensor(manifest["train"]["counts"], dtype=torch.long)
    # the shards against the manifest: every rank of the shard group read other shards, together the whole split
    read = all_reduce_sum(torch.bincount(shard.labels, minlength=cfg.dataset.num_classes), layout.shard_group)
    check_counts(counts, read, manifest_path=ddir / MANIFEST, rebuild=rebuild_hint(ddir, cfg.dataset))
    real = RealData(shard.images.to(device), shard.labels.to(device), shard.ids.to(device), counts)
    log.info("rank %d holds %d of %d real images", layout.shard_rank, len(shard.labels), int(counts.sum()))
    if cfg.real_source == "features":  # checked against the loaded pool by check_features
        folder = features_dir(cfg)
        f = read_features(folder, layout.shard_rank, layout.shards)
        real.features = FeatureData(f.feats.to(device), f.labels.to(device), f.ids.to(device))
        log.info("rank %d holds %d real feature vectors x %d members x %d views from %s", layout.shard_rank,
                 f.feats.shape[2], f.feats.shape[0], f.feats.shape[1], folder)
    return real


def check_features(cfg: Config, manifest: dict, extractor: Extractor, features: FeatureData) -> None:
    """The feature shards against this dataset build and the pool the extractor holds: its sha256 is of the very
    bytes the extractor loaded, so the check and the run see one pool file however it is replaced meanwhile."""
    folder = features_dir(cfg)
    check_provenance(folder, load_features_manifest(folder), provenance(cfg, manifest, extractor.pool_sha256))
    if features.feats.shape[0] != len(extractor.pool):
        raise ValueError("the feature shards hold another number of pool members than extractor.pool_path")


def check_dataset(cfg: Config, manifest: dict, ddir: Path) -> None:
    n = len(manifest["train"]["counts"])
    if n != cfg.dataset.num_classes:
        raise ConfigError(f"invalid config `dataset.num_classes`: {ddir} has {n} classes but dataset.num_classes="
                          f"{cfg.dataset.num_classes}")
    if cfg.evaluate and cfg.eval.split not in split_names(manifest):
        raise ConfigError(f"invalid config `eval.split`: {ddir} has no {cfg.eval.split} split (it has "
                          f"{split_names(manifest)}); rebuild it with dataset.val_per_class=N, or use eval.split=test")


def check_memory(cfg: Config, rt: Runtime, counts: list[int]) -> None:
    """Refuse (unless force_memory=true) a run whose memory estimate exceeds what this machine has free."""
    est = estimate_from_counts(cfg, rt.world_size, counts)
    here = 1 if rt.device.type == "cuda" else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    available = available_bytes(rt.device.type, rt.device.index)
    log.info("memory estimate per rank %s, %s available", human(est.total), human(available))
    if not cfg.force_memory:
        check_fits(est, here, available)


def initial_images(cfg: Config, real: RealData, layout: ParallelLayout,
                   norm: Normalizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(the synthetic set's start, the random-real baseline), both ipc stored images per class.

    The same images unless distill.init=noise or mix. `mix`: the f^2 tiles of each stored image are f^2 different
    real images of its class (ipc * f^2 picked per class by the same global rule; tile 0 is the image `real` starts
    from); with f = 1 it is `real`. The baseline is always ipc real images per class, undecoded: with
    synthetic.factor f > 1 the distilled set trains on ipc * f^2 decoded images but stores only ipc per class, the
    same budget as the baseline, which so stays the honest lower baseline at equal storage.
    """
    c, ipc, f = cfg.dataset.num_classes, cfg.ipc, cfg.synthetic.factor
    mix = cfg.distill.init == "mix"
    if cfg.method.name == "random" and f > 1 and not mix:
        raise ConfigError("invalid config `synthetic.factor`: method=random stores real images as they are; with "
                          f"synthetic.factor={f} their tiles would be decoded as crops. Set distill.init=mix (f^2 "
                          "shrunk real images per stored image) or synthetic.factor=1")
    k = ipc * f * f if mix else ipc
    picks = pick_real_init(real.images, real.labels, real.ids, c, k, cfg.seed, layout, cfg.distill.small_class_policy,
                           need=f"ipc * synthetic.factor^2={k} (distill.init=mix)" if k > ipc else None)
    picked = norm(picks.reshape(c, k, *picks.shape[1:])[:, :ipc].flatten(0, 1))  # the first ipc: a pick of ipc
    if mix:
        return formation.mix(norm(mix_order(picks, c, ipc, f)), f), picked
    if cfg.distill.init == "noise" and cfg.method.name != "random":
        noise = torch.randn(picked.shape, generator=rng.generator(cfg.seed, 0, rng.INIT)).to(picked.device)
        return noise, picked
    return picked, picked


def run(cfg: Config, rt: Runtime, stop: StopSignal | None = None, overrides: list[str] | tuple = ()) -> dict:
    """The whole job on this rank. Returns the results; {"preempted": True, ...} if `stop` cut it short.

    Nothing is written to out_dir until the dataset, the memory estimate and the run directory have been checked
    and the run has started (csdm_dist/rundir.py); the log lines until then are kept and written with the rest."""
    with run_log(Path(cfg.out_dir), rt.rank) as started, contextlib.ExitStack() as held:  # held: the out_dir lock
        return _run(cfg, rt, stop, overrides, started, held)


def _run(cfg: Config, rt: Runtime, stop: StopSignal | None, overrides, started, held: contextlib.ExitStack) -> dict:
    layout = ParallelLayout.from_world(cfg.parallel.replicas, rt.rank, rt.world_size)
    run_dir = Path(cfg.out_dir)
    ddir = dataset_dir(cfg.dataset)
    manifest = load_manifest(ddir, cfg.dataset)
    cfg.dataset = resolve_normalization(cfg.dataset, manifest, ddir)  # empty dataset.mean/std: the build's, hashed
    check_dataset(cfg, manifest, ddir)
    counts = manifest["train"]["counts"]
    check_memory(cfg, rt, counts)
    log.info("extractor forward in %s (precision=%s on %s)", resolve_precision(cfg.precision, rt.device),
             cfg.precision, rt.device.type)  # bf16 where it is not native: refused here, before anything is written
    # soft labels (labels.kind=soft) or online relabelling need the teacher: checked before anything is written
    needs_teacher = cfg.labels.kind == "soft" or (cfg.evaluate and cfg.eval.relabel == "online")
    teacher = load_teacher(cfg, manifest, rt.device) if needs_teacher else None
    chash = config_hash(cfg)
    action, state = rundir.prepare(run_dir, chash, cfg.resume, cfg.overwrite, run_steps(cfg), rt.rank, log, held)
    if action == rundir.FINISHED and not cfg.reevaluate:
        return report_finished(cfg, rt, run_dir, state.results)
    if cfg.extractor.mode == "pool":  # a pool of this build and network, checked before the run writes anything
        check_pool(Path(cfg.extractor.pool_path), cfg, manifest)

    real = load_real(cfg, layout, rt.device, manifest)
    norm = Normalizer.build(cfg.dataset.mean, cfg.dataset.std, rt.device)
    init, picked = initial_images(cfg, real, layout, norm)
    syn = SyntheticSet.from_full(init, cfg.dataset.num_classes, cfg.ipc, layout)
    distiller = Distiller(cfg, rt, layout, real, syn, norm, NullLogger(), run_dir,
                          teacher=None if teacher is None else teacher.net)
    if real.features is not None:
        check_features(cfg, manifest, distiller.extractor, real.features)
        real.images = real.images[:0]  # the images served the initialisation; statistics come from the features

    # the run has started: its records, its log file and TensorBoard
    if rt.is_main:
        rundir.write_records(run_dir, asdict(cfg), chash, list(overrides), "running")
    started()
    # on resume, drop the events an interrupted segment logged past the checkpoint it resumes from
    purge = None if action == rundir.FRESH else (0 if state.steps is None else state.steps + 1)
    distiller.logger = logger = make_logger(run_dir / "tb", rt.is_main, purge_step=purge)
    try:
        results = distil_and_evaluate(cfg, rt, distiller, picked, counts, manifest["class_names"], logger, stop,
                                      teacher)
    finally:
        logger.close()
    if rt.is_main and not results.get("preempted"):
        rundir.write_status(run_dir, chash, "finished")
    return results


def distil_and_evaluate(cfg: Config, rt: Runtime, distiller: Distiller, picked: torch.Tensor, counts: list[int],
                        class_names: list[str], logger, stop: StopSignal | None,
                        teacher: Teacher | None = None) -> dict:
    run_dir = Path(cfg.out_dir)
    logger.text("run/real_source", cfg.real_source, 0)
    labels = torch.arange(cfg.dataset.num_classes * cfg.ipc) // cfg.ipc
    evaluate = evaluator(cfg, rt, distiller, counts, teacher)
    at_steps = AtSteps(cfg, rt, distiller, labels, evaluate, logger)
    try:
        if cfg.method.name != "random" and not distiller.run(stop, after_step=at_steps):
            return {"preempted": True, "step": distiller.step}
    except KeyboardInterrupt:
        done = checkpoint.latest(distiller.ckpt_root)
        raise Interrupted(f"interrupted at step {distiller.step}; the same command resumes from step {done or 0}"
                          + ("" if done else " (no checkpoint yet)")) from None
    final = distiller.gather()
    every = cfg.distill.image_every
    took_steps = distiller.segment_steps > 0  # a finished run resumed for reevaluate takes none
    if distiller.step == 0 or (took_steps and not (every and distiller.step % every == 0)):
        distiller.log_images(distiller.step, final)  # the loop has not logged the final images already
    soft = None
    if cfg.labels.kind == "soft":  # the teacher's logits of every decoded image, in decoded order, prior-shifted
        soft = teacher.logits(formation.decode(final, cfg.synthetic.factor), cfg.labels.prior_adjust).cpu()
    written = None  # the sha256 of the distilled.pt this run wrote (rank 0)
    if rt.is_main:  # the stored images (ipc per class) and their factor: formation.decode_set gives the samples
        written = files.save_torch({"images": final.cpu(), "labels": labels, "factor": cfg.synthetic.factor,
                                   "class_counts": counts, "config": asdict(cfg),
                                   "mean": cfg.dataset.mean, "std": cfg.dataset.std,
                                   **soft_label_record(cfg, soft, teacher)}, run_dir / "distilled.pt")
        save_image(distiller.norm.to_unit(final), run_dir / "synthetic.png", nrow=cfg.ipc)

    results = {"config": asdict(cfg), "config_hash": config_hash(cfg), "git_commit": git_commit(), "seed": cfg.seed,
               "real_source": cfg.real_source, "labels": cfg.eval.labels, "relabel": cfg.eval.relabel,
               "world_size": rt.world_size, "hardware": hardware(rt.device), "class_counts": counts,
               "class_names": class_names, "precision": distiller.extractor.precision,
               "timing": {"distill_s": distiller.elapsed_s, "step_ms_median": distiller.step_ms_median(),
                          "steps": distiller.step}}
    if soft is not None:
        results["soft_labels"] = {"bytes": soft.numel() * FP32_BYTES, "shape": list(soft.shape),
                                  "temperature": cfg.labels.temperature, "prior_adjust": cfg.labels.prior_adjust,
                                  "teacher": str(teacher.path), "teacher_sha256": teacher.sha256}
    if cfg.evaluate:
        t1 = time.perf_counter()
        try:
            # the distilled set trains on its decoded samples (ipc * f^2 per class); the baseline on its ipc images
            results["accuracy"] = evaluate(*formation.decode_set(final, labels, cfg.synthetic.factor),
                                           name=cfg.method.name, soft=soft)
            if cfg.baseline and cfg.method.name != "random":
                results["baseline_random"] = evaluate(picked, labels, name="random")
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted while evaluating; distillation is complete (step {distiller.step}) and "
                              f"the same command evaluates it again") from None
        results["timing"]["eval_s"] = time.perf_counter() - t1
        for key, tag in (("accuracy", "eval"), ("baseline_random", "eval_random")):
            if key in results:
                for g in ("mean", "many", "medium", "few"):
                    logger.scalar(f"{tag}/{'accuracy' if g == 'mean' else g}", results[key][g], distiller.step)
    if at_steps.done:
        results["accuracy_at_steps"] = {**at_steps.done, **({str(distiller.step): results["accuracy"]}
                                                            if "accuracy" in results else {})}
        results["timing"]["eval_at_steps_s"] = at_steps.seconds
    results["peak_memory"] = peak_memory_mb(rt.device)
    if rt.is_main:  # the set these results describe (a run distilled further since has another distilled.pt)
        results["distilled_sha256"] = written
        files.write_json(run_dir / "results.json", results)
        print(results_table(results, cfg))
        print(f"\nrun directory: {run_dir}\nTensorBoard:   {tensorboard_command(run_dir)}")
    return results


def soft_label_record(cfg: Config, soft: torch.Tensor | None, teacher: Teacher | None) -> dict:
    """The distilled.pt keys of soft labels (none for hard labels): `soft_labels` [N_decoded, C] fp32 logits after
    the prior shift, `temperature`, `prior_adjust` and the teacher file (path, sha256)."""
    if soft is None:
        return {}
    return {"soft_labels": soft.float(), "temperature": float(cfg.labels.temperature),
            "prior_adjust": float(cfg.labels.prior_adjust),
            "teacher": {"path": str(teacher.path), "sha256": teacher.sha256}}


def evaluator(cfg: Config, rt: Runtime, distiller: Distiller, counts: list[int], teacher: Teacher | None = None):
    """evaluate(images, labels, name, soft=None) -> the accuracy block, on cfg.eval.split (read once, on first
    use). On the soft track the images are trained on `soft` (their logits), else on the teacher's logits of them
    (prior-shifted), or on fresh teacher labels per batch (eval.relabel=online)."""
    split = {}
    lab = cfg.labels

    def relabel(x: torch.Tensor) -> torch.Tensor:
        return teacher.logits(x, lab.prior_adjust)

    def evaluate(images: torch.Tensor, labels: torch.Tensor, name: str, soft: torch.Tensor | None = None) -> dict:
        if not split:
            split["data"] = read_split(dataset_dir(cfg.dataset), cfg.eval.split, 0, 1, cfg=cfg.dataset)
        data = split["data"]
        track = {}
        if cfg.eval.labels == "soft" and cfg.eval.relabel == "online":
            track = {"relabel": relabel, "temperature": lab.temperature}
        elif cfg.eval.labels == "soft":
            logits = teacher.logits(images, lab.prior_adjust) if soft is None else soft
            track = {"soft_probs": soft_targets(logits, lab.temperature), "temperature": lab.temperature}
        return evaluate_set(images, labels, data.images, data.labels, distiller.norm, counts, cfg.eval,
                            cfg.extractor, cfg.dataset.image_size, cfg.seed, rt.rank, rt.world_size, rt.device,
                            name=name, **track)
    return evaluate


class AtSteps:
    """eval.at_steps: evaluates the set after each listed step. Results are kept in `accuracy_at_steps.json` in
    the run directory as they come, so a resumed run keeps the ones it has and evaluates the step it resumes at
    when that one is listed and missing. Each result records the eval settings it was made with (`eval`: every
    eval.* key but at_steps, which are not in the config hash): a run resumed with other ones evaluates those steps
    again rather than mix two protocols in one curve. Called on every rank (evaluation spreads its repeats over
    the world)."""

    FILE = "accuracy_at_steps.json"

    def __init__(self, cfg: Config, rt: Runtime, distiller: Distiller, labels: torch.Tensor, evaluate, logger):
        self.cfg, self.rt, self.distiller, self.labels, self.evaluate, self.logger = (
            cfg, rt, distiller, labels, evaluate, logger)
        self.path = Path(cfg.out_dir) / self.FILE
        self.settings = {k: v for k, v in asdict(cfg.eval).items() if k != "at_steps"}
        kept = read_json_record(self.path, "delete it: the steps it held are evaluated again") or {}
        self.done = {k: v for k, v in kept.items() if int(k) in cfg.eval.at_steps and v.get("eval") == self.settings}
        if len(self.done) < len(kept):
            log.info("%s: evaluating again the steps %s, made with other eval settings (or not listed now)",
                     self.path, ", ".join(sorted(set(kept) - set(self.done), key=int)))
        self.seconds = 0.0

    def __call__(self, step: int) -> None:
        if step not in self.cfg.eval.at_steps or str(step) in self.done or not self.cfg.evaluate:
            return
        t0 = time.perf_counter()
        images = formation.decode_set(self.distiller.gather(), self.labels, self.cfg.synthetic.factor)
        acc = self.evaluate(*images, name=f"{self.cfg.method.name}@{step}")
        self.seconds += time.perf_counter() - t0
        self.done[str(step)] = {**acc, "eval": self.settings}
        for g in ("mean", "many", "medium", "few"):
            self.logger.scalar(f"eval/{'accuracy' if g == 'mean' else g}", acc[g], step)
        if self.rt.is_main:
            files.write_json(self.path, self.done)
            log.info("step %d: %s accuracy %.2f %% (%s split)", step, self.cfg.method.name, acc["mean"],
                     self.cfg.eval.split)


def report_finished(cfg: Config, rt: Runtime, run_dir: Path, results: dict) -> dict:
    """A finished run of this configuration: say so and print its table; evaluate nothing."""
    if rt.is_main:
        print(f"{run_dir} holds this finished run ({results['timing']['steps']} steps); nothing to do. Its results "
              f"({run_dir / 'results.json'}):")
        stored = results.get("config", {}).get("eval")
        if stored is not None and stored != asdict(cfg.eval):
            print("note: the eval settings differ from the ones these results were made with; pass "
                  "reevaluate=true to evaluate with the new ones")
        if "accuracy" not in results and cfg.evaluate:
            print("note: this run was not evaluated; pass reevaluate=true to evaluate it")
        print(results_table(results, to_config(results["config"]) if "config" in results else cfg))
        print(f"\nrun directory: {run_dir}\nTensorBoard:   {tensorboard_command(run_dir)}")
    return results


def tensorboard_command(run_dir: Path) -> str:
    """A TensorBoard command that works as printed: the venv's own script when it is not on PATH."""
    exe = shutil.which("tensorboard") or str(Path(sys.executable).with_name("tensorboard"))
    return f"{exe if Path(exe).is_file() else 'tensorboard'} --logdir {run_dir / 'tb'}"


@contextlib.contextmanager
def run_log(run_dir: Path, rank: int):
    """This rank's log file `distill-rank<R>.log` in the run directory. Records are held in memory until the
    yielded `started()` is called, which opens the file and writes them; a run that never starts writes none."""
    root = logging.getLogger()
    console = next((h for h in root.handlers if h.formatter is not None), None)
    held = logging.handlers.MemoryHandler(capacity=10**6, flushLevel=logging.CRITICAL + 1)  # no target yet: holds
    root.addHandler(held)

    def started() -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(run_dir / f"distill-rank{rank}.log")
        file.setFormatter(console.formatter if console else
                          logging.Formatter(f"[%(asctime)s][rank {rank}][%(name)s][%(levelname)s] %(message)s"))
        held.setTarget(file)
        held.capacity = 1  # from now on every record goes straight to the file
        held.flush()

    try:
        yield started
    finally:
        root.removeHandler(held)
        if held.target is not None:
            held.flush()
            held.target.close()
        held.close()


def results_table(results: dict, cfg: Config) -> str:
    rows = [("random-real", results.get("baseline_random"), 0.0)] if "baseline_random" in results else []
    rows.append((cfg.method.name, results.get("accuracy"), results["timing"]["distill_s"]))
    track = results.get("labels", "hard") + (" (online relabelling)" if results.get("relabel") == "online" else "")
    lines = [f"\n{cfg.dataset.name} (IF {cfg.dataset.imbalance_tag()}), IPC {cfg.ipc}, "
             f"{cfg.eval.protocol} protocol, {cfg.eval.epochs} epochs x {cfg.eval.repeats} repeats, labels: {track}"
             + ("" if cfg.eval.arch == "convnet" else f", {cfg.eval.arch}"),
             "| method | overall | many | medium | few | distil time |", "|---|---|---|---|---|---|"]
    for name, acc, secs in rows:
        if acc is None:
            lines.append(f"| {name} | (not evaluated) | | | | {secs:.0f} s |")
            continue
        lines.append(f"| {name} | {acc['mean']:.2f} +- {acc['std']:.2f} | {acc['many']:.2f} | {acc['medium']:.2f} | "
                     f"{acc['few']:.2f} | {secs:.0f} s |")
    t = results["timing"]
    if "eval_s" in t:
        lines.append(f"\nevaluated on the {cfg.eval.split} split in {t['eval_s']:.0f} s"
                     + (f" (+ {t['eval_at_steps_s']:.0f} s at steps {', '.join(map(str, cfg.eval.at_steps))})"
                        if "eval_at_steps_s" in t else "") + f"; distilled in {t['distill_s']:.0f} s")
    return "\n".join(lines)


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def main(dcfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    with one_line_errors(log):
        cfg = to_config(dcfg)
        torch.manual_seed(cfg.seed)
        rt = init_distributed(cfg.device)
        stop = StopSignal()
        try:
            result = run(cfg, rt, stop, overrides=list(HydraConfig.get().overrides.task))
        finally:
            stop.restore()
            close_distributed()
    if result.get("preempted"):
        raise SystemExit(EXIT_STOPPED)


if __name__ == "__main__":
    sys.argv = multirun_flag_first(sys.argv)
    register_configs()
    main()
