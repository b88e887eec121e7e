"""Entry point: `python -m csdm_dist.distill [dataset=...] [method=...] [ipc=...]`, or the same under torchrun.

Parses the config, joins the process group, loads this rank's real shards, initialises the synthetic set,
distils, evaluates against the random-real baseline, and writes results.json, distilled.pt, synthetic.png and
TensorBoard logs into out_dir.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torchvision.utils import save_image

from . import checkpoint, rng
from .config import Config, register_configs, to_config
from .data.features import (FeatureData, check_provenance, features_dir, load_features_manifest, provenance,
                            read_features)
from .data.shards import dataset_dir, load_manifest, read_split
from .dist import ParallelLayout, Runtime, close_distributed, init_distributed
from .distiller import Distiller, Normalizer, RealData
from .evaluate import evaluate_set
from .extractors import file_sha256
from .runinfo import config_hash, git_commit, hardware, peak_memory_mb
from .preempt import StopSignal
from .synthetic import SyntheticSet, pick_real_init
from .tblog import make_logger

log = logging.getLogger("csdm_dist.distill")


def load_real(cfg: Config, layout: ParallelLayout, device: torch.device) -> tuple[RealData, dict]:
    ddir = dataset_dir(cfg.dataset)
    manifest = load_manifest(ddir)
    shard = read_split(ddir, "train", layout.shard_rank, layout.shards)
    counts = torch.tensor(manifest["train"]["counts"], dtype=torch.long)
    if len(counts) != cfg.dataset.num_classes:
        raise ValueError(f"{ddir} has {len(counts)} classes but dataset.num_classes={cfg.dataset.num_classes}")
    real = RealData(shard.images.to(device), shard.labels.to(device), shard.ids.to(device), counts)
    log.info("rank %d holds %d of %d real images", layout.shard_rank, len(shard.labels), int(counts.sum()))
    if cfg.real_source == "features":
        folder = features_dir(cfg)
        fm = load_features_manifest(folder)
        check_provenance(folder, fm, provenance(cfg, manifest, file_sha256(Path(cfg.extractor.pool_path))))
        f = read_features(folder, layout.shard_rank, layout.shards)
        real.features = FeatureData(f.feats.to(device), f.labels.to(device), f.ids.to(device))
        log.info("rank %d holds %d real feature vectors x %d members x %d views from %s", layout.shard_rank,
                 f.feats.shape[2], f.feats.shape[0], f.feats.shape[1], folder)
    return real, manifest


def initial_images(cfg: Config, real: RealData, layout: ParallelLayout, norm: Normalizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(the synthetic set's start, the random-real baseline): the same images unless distill.init=noise."""
    c, ipc = cfg.dataset.num_classes, cfg.ipc
    picked = norm(pick_real_init(real.images, real.labels, real.ids, c, ipc, cfg.seed, layout,
                                 cfg.distill.small_class_policy))
    if cfg.distill.init == "noise" and cfg.method.name != "random":
        noise = torch.randn(picked.shape, generator=rng.generator(cfg.seed, 0, rng.INIT)).to(picked.device)
        return noise, picked
    return picked, picked


def run(cfg: Config, rt: Runtime, stop: StopSignal | None = None) -> dict:
    """The whole job on this rank. Returns the results; {"preempted": True, ...} if `stop` cut it short."""
    layout = ParallelLayout.from_world(cfg.parallel.replicas, rt.rank, rt.world_size)
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    real, manifest = load_real(cfg, layout, rt.device)
    norm = Normalizer.build(cfg.dataset.mean, cfg.dataset.std, rt.device)
    init, picked = initial_images(cfg, real, layout, norm)
    syn = SyntheticSet.from_full(init, cfg.dataset.num_classes, cfg.ipc, layout)
    resume_step = checkpoint.latest(run_dir / "checkpoints") if cfg.resume else None
    logger = make_logger(run_dir / "tb", rt.is_main, purge_step=resume_step)
    distiller = Distiller(cfg, rt, layout, real, syn, norm, logger, run_dir)
    if real.features is not None:
        if real.features.feats.shape[0] != len(distiller.extractor.pool):
            raise ValueError("the feature shards hold another number of pool members than extractor.pool_path")
        real.images = real.images[:0]  # the images served the initialisation; statistics come from the features
    logger.text("run/real_source", cfg.real_source, 0)

    t0 = time.perf_counter()
    if cfg.method.name != "random" and not distiller.run(stop):
        logger.close()
        return {"preempted": True, "step": distiller.step}
    distill_s = time.perf_counter() - t0
    final = distiller.gather()
    distiller.log_images(distiller.step, final)
    labels = torch.arange(cfg.dataset.num_classes * cfg.ipc) // cfg.ipc
    counts = manifest["train"]["counts"]
    if rt.is_main:
        torch.save({"images": final.cpu(), "labels": labels, "class_counts": counts, "config": asdict(cfg),
                    "mean": cfg.dataset.mean, "std": cfg.dataset.std}, run_dir / "distilled.pt")
        save_image(norm.to_unit(final), run_dir / "synthetic.png", nrow=cfg.ipc)

    results = {"config": asdict(cfg), "config_hash": config_hash(cfg), "git_commit": git_commit(), "seed": cfg.seed,
               "real_source": cfg.real_source,
               "world_size": rt.world_size, "hardware": hardware(rt.device), "class_counts": counts,
               "timing": {"distill_s": distill_s, "step_ms_median": distiller.step_ms_median(),
                          "steps": distiller.step}}
    if cfg.evaluate:
        t1 = time.perf_counter()
        test = read_split(dataset_dir(cfg.dataset), "test", 0, 1)
        args = (test.images, test.labels, norm, counts, cfg.eval, cfg.extractor, cfg.dataset.image_size, cfg.seed,
                rt.rank, rt.world_size, rt.device)
        results["accuracy"] = evaluate_set(final, labels, *args, name=cfg.method.name)
        if cfg.baseline and cfg.method.name != "random":
            results["baseline_random"] = evaluate_set(picked, labels, *args, name="random")
        results["timing"]["eval_s"] = time.perf_counter() - t1
        logger.scalar("eval/accuracy", results["accuracy"]["mean"], distiller.step)
        for g in ("many", "medium", "few"):
            logger.scalar(f"eval/{g}", results["accuracy"][g], distiller.step)
    results["peak_memory"] = peak_memory_mb(rt.device)
    if rt.is_main:
        (run_dir / "results.json").write_text(json.dumps(results, indent=1))
        print(results_table(results, cfg))
        print(f"\nrun directory: {run_dir}\nTensorBoard:   tensorboard --logdir {run_dir / 'tb'}")
    logger.close()
    return results


def results_table(results: dict, cfg: Config) -> str:
    rows = [("random-real", results.get("baseline_random"), 0.0)] if "baseline_random" in results else []
    rows.append((cfg.method.name, results.get("accuracy"), results["timing"]["distill_s"]))
    lines = [f"\n{cfg.dataset.name} (IF {cfg.dataset.imbalance_factor:g}), IPC {cfg.ipc}, "
             f"{cfg.eval.protocol} protocol, {cfg.eval.epochs} epochs x {cfg.eval.repeats} repeats",
             "| method | overall | many | medium | few | distil time |", "|---|---|---|---|---|---|"]
    for name, acc, secs in rows:
        if acc is None:
            lines.append(f"| {name} | (not evaluated) | | | | {secs:.0f} s |")
            continue
        lines.append(f"| {name} | {acc['mean']:.2f} +- {acc['std']:.2f} | {acc['many']:.2f} | {acc['medium']:.2f} | "
                     f"{acc['few']:.2f} | {secs:.0f} s |")
    return "\n".join(lines)


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def main(dcfg: DictConfig) -> None:
    cfg = to_config(dcfg)
    torch.manual_seed(cfg.seed)
    rt = init_distributed(cfg.device)
    stop = StopSignal()
    try:
        run(cfg, rt, stop)
    except Exception:
        log.exception("rank %d failed", rt.rank)
        raise
    finally:
        stop.restore()
        close_distributed()


if __name__ == "__main__":
    register_configs()
    main()
