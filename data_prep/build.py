"""Build a long-tailed dataset as WebDataset shards plus manifest.json (atomic, idempotent, verified on reuse).

Usage: python -m data_prep.build dataset=cifar10_lt dataset.raw_root=/path/to/raw [force=true]

Splits: `train` (the long-tailed subset), `test` (balanced, the official test set) and, with
dataset.val_per_class > 0, `val` (balanced, from the raw training images the subset did not take). With
dataset.class_order, raw class class_order[k] becomes label k in every split. dataset.imbalance_factor=null keeps
every training image (natural counts). An image folder without test/ gives its test split by holding out
dataset.test_per_class training images per class first; they are never in train or val. The manifest records the
training split's per-channel mean and std.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
import numpy as np
from omegaconf import DictConfig, OmegaConf

from csdm_dist.config import ConfigError, DataConfig, register_configs
from csdm_dist.data.longtail import (index_hash, longtail_counts, relabel, select_heldout, select_longtail,
                                     select_val)
from csdm_dist.data.manifest import (FORMAT_VERSION, build_command, build_overrides, config_fields, config_hash,
                                     ids_hash, read_manifest_file)
from csdm_dist.data.shards import MANIFEST, dataset_dir, shard_sizes, verify_dataset, write_split
from csdm_dist.data.normalization import channel_stats
from csdm_dist.data.sources import RawSplit, has_split, load_source

__all__ = ["FORMAT_VERSION", "build_dataset", "config_hash"]
log = logging.getLogger(__name__)
# what a build writes into its folder; anything else there (pools/, teachers/, features/, a user's files) is not
# the build's, and a forced rebuild carries it over instead of deleting it
_BUILD_FILE = re.compile(r"^(manifest\.json|(train|val|test)-\d{6}\.tar)$")


def _old_config_hash(target: Path) -> str | None:
    """The config hash of the build in `target`; None when its manifest is missing or damaged (a forced rebuild
    is often what mends it)."""
    try:
        manifest = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):  # missing, unreadable, not JSON, not UTF-8
        return None
    return manifest.get("config_hash") if isinstance(manifest, dict) else None


def _carry_over(old: Path, new: Path, old_hash: str | None, want: str) -> list[str]:
    """Move every entry of the old build folder that the build did not write into the new one (before the swap);
    return their names. When the build config changed they were made from other data: say so (teachers and
    feature shards and pools are then refused at start-up by their provenance check)."""
    kept = sorted(p.name for p in old.iterdir() if not _BUILD_FILE.match(p.name))
    for name in kept:
        os.replace(old / name, new / name)
    if kept:
        log.info("kept %s from the previous build of %s", ", ".join(kept), old)
        if old_hash != want:
            log.warning("%s were made from the previous build (config hash %s, now %s): teachers, pools and feature "
                        "shards of it will be refused; make them again for this build", ", ".join(kept), old_hash,
                        want)
    return kept


def _check_existing(target: Path, cfg: DataConfig, want: str, config_choice: str | None) -> None:
    """An existing target must hold a build of this config whose shards are intact; else raise saying what to do."""
    command = f"{build_command(cfg, config_choice)} force=true"
    if not (target / MANIFEST).is_file():
        raise FileExistsError(f"{target} exists but holds no {MANIFEST} (an incomplete build?); delete it or rerun "
                              f"with force=true: `{command}`")
    built = read_manifest_file(target / MANIFEST, f"rebuild with `{command}`").get("config_hash")
    if built != want:
        raise FileExistsError(f"{target} exists but was not built from this dataset config; delete it or rerun "
                              f"with force=true: `{command}`")
    shards = verify_dataset(target, cfg, config_choice)
    log.info("already built: %s (%d shards verified)", target, shards)


def _subset(cfg: DataConfig, labels: np.ndarray) -> tuple[np.ndarray, list[int], int, float]:
    """(indices of the long-tailed subset, per-class counts, n_max, imbalance factor) of the relabelled train split;
    labels -1 (held-out test images) are never taken."""
    raw_counts = np.bincount(labels[labels >= 0], minlength=cfg.num_classes)
    if cfg.source == "imagenet_lt" or cfg.imbalance_factor is None:  # the list / the natural counts: every image
        counts = raw_counts.tolist()
        return np.flatnonzero(labels >= 0).astype(np.int64), counts, max(counts), max(counts) / min(counts)
    n_max = cfg.n_max or int(raw_counts.max())
    counts = longtail_counts(n_max, cfg.num_classes, cfg.imbalance_factor)
    return select_longtail(labels, counts, cfg.seed), counts, n_max, cfg.imbalance_factor


def _check_test_choice(cfg: DataConfig) -> bool:
    """Whether the test split is held out of the training images (an image folder without test/); a test/ folder
    together with dataset.test_per_class, or neither, raises ConfigError saying what to do."""
    held_out = not has_split(cfg, "test")
    test = Path(cfg.raw_root) / "test"
    if held_out and cfg.test_per_class < 1:
        raise ConfigError(f"invalid config `dataset.test_per_class`: {cfg.raw_root} has no test/ folder, so the test "
                          f"split is held out of train/: set dataset.test_per_class=N (N images per class, balanced), "
                          f"or add {test}/<class>/ folders with the same classes as train/")
    if not held_out and cfg.test_per_class > 0:
        raise ConfigError(f"invalid config `dataset.test_per_class`: it is {cfg.test_per_class} but {test} exists "
                          f"and is the test split; set dataset.test_per_class=0 to use it, or remove test/ to hold "
                          f"out test images from train/")
    return held_out


def _write(out: Path, split: str, raw: RawSplit, labels: np.ndarray, idx: np.ndarray, cfg: DataConfig,
           shuffle_seed: int) -> dict:
    """Write raw.images[idx] with `labels[idx]` as ids 0..N-1; return the split's manifest entry."""
    ids = np.arange(len(idx), dtype=np.int64)
    shards = write_split(out, split, raw.images[idx], labels[idx], ids, cfg.samples_per_shard, shuffle_seed)
    return {"counts": np.bincount(labels[idx], minlength=cfg.num_classes).tolist(), "num_samples": len(idx),
            "shards": shards, "shard_sizes": shard_sizes(len(idx), cfg.samples_per_shard),
            "ids_hash": ids_hash(ids, labels[idx])}


def build_dataset(cfg: DataConfig, force: bool = False, config_choice: str | None = None) -> Path:
    """Write the long-tailed train split, the balanced test split and (val_per_class > 0) the balanced val split of
    `cfg` under dataset_dir(cfg). An existing build of the same config is verified and reused unless `force`.
    config_choice: the dataset YAML's name, for the rebuild commands in messages (default cfg.name)."""
    target, want = dataset_dir(cfg), config_hash(cfg)
    if target.exists() and not force:
        _check_existing(target, cfg, want, config_choice)
        return target

    held_out = _check_test_choice(cfg)
    train = load_source(cfg, "train")
    order = cfg.class_permutation() or list(range(cfg.num_classes))
    names = [train.class_names[r] for r in order]
    train_labels = relabel(train.labels, order)
    if held_out:  # the test split: test_per_class training images per class, taken out before anything else
        test, test_labels = train, train_labels
        test_idx = select_heldout(train_labels, cfg.test_per_class, cfg.num_classes, cfg.seed, names)
    else:
        test = load_source(cfg, "test")
        test_labels = relabel(test.labels, order)
        test_idx = np.arange(len(test_labels), dtype=np.int64)
    drawable = train_labels.copy()
    if held_out:
        drawable[test_idx] = -1  # never in train or val
    raw_counts = np.bincount(drawable[drawable >= 0], minlength=cfg.num_classes)
    indices, counts, n_max, imbalance = _subset(cfg, drawable)
    taken = np.concatenate([indices, test_idx]) if held_out else indices
    val_idx = (select_val(train_labels, taken, cfg.val_per_class, cfg.num_classes, cfg.seed, names)
               if cfg.val_per_class > 0 else None)
    test_counts = np.bincount(test_labels[test_idx], minlength=cfg.num_classes).tolist()
    mean, std = channel_stats(train.images, indices)
    counts_from = ("split lists" if cfg.source == "imagenet_lt" else
                   "natural" if cfg.imbalance_factor is None else "formula")
    log.info("%s: %d train images (IF %.4g, n_max %d, counts: %s), %d val, %d test images (%s)", cfg.name,
             len(indices), imbalance, n_max, counts_from, 0 if val_idx is None else len(val_idx), len(test_idx),
             "held out of train/" if held_out else "test split")
    log.info("  training split mean %s, std %s", [round(m, 4) for m in mean], [round(s, 4) for s in std])
    for c, name in enumerate(names):
        log.info("  class %4d (raw %4d) %-24s train %6d (of %d raw)  val %5d  test %6d", c, order[c], name,
                 counts[c], raw_counts[c], cfg.val_per_class, test_counts[c])

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{target.name}.tmp-{os.getpid()}"
    old = target.parent / f"{target.name}.old-{os.getpid()}"
    try:
        tmp.mkdir()
        splits = {"train": _write(tmp, "train", train, train_labels, indices, cfg, cfg.seed),
                  "test": _write(tmp, "test", test, test_labels, test_idx, cfg, cfg.seed + 1)}
        splits["train"]["index_hash"] = index_hash(indices)
        if held_out:
            splits["test"]["index_hash"] = index_hash(test_idx)
        if val_idx is not None:
            splits["val"] = _write(tmp, "val", train, train_labels, val_idx, cfg, cfg.seed + 2)
            splits["val"]["index_hash"] = index_hash(val_idx)
        manifest = {"name": cfg.name, "source": cfg.source, "image_size": cfg.image_size, "channels": cfg.channels,
                    "num_classes": cfg.num_classes, "imbalance_factor": imbalance, "n_max": n_max, "seed": cfg.seed,
                    "samples_per_shard": cfg.samples_per_shard, "val_per_class": cfg.val_per_class,
                    "test_per_class": cfg.test_per_class, "class_names": names, "class_order": order,
                    "counts_from": counts_from, "test_from": "held out" if held_out else "test split",
                    "mean": mean, "std": std, **splits, "config_hash": want,
                    "config_fields": config_fields(cfg), "build_overrides": build_overrides(cfg, config_choice),
                    "format_version": FORMAT_VERSION}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if target.exists():  # force: move the old build aside, put the new one in place, then delete the old one,
            _carry_over(target, tmp, _old_config_hash(target), want)
            os.replace(target, old)  # ... keeping what the build did not write (pools, teachers, features)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    if old.exists():
        shutil.rmtree(old)
    log.info("wrote %s", target)
    return target


@hydra.main(version_base=None, config_path="../configs", config_name="build")
def main(cfg: DictConfig) -> None:
    data_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), cfg.dataset))
    assert isinstance(data_cfg, DataConfig)
    build_dataset(data_cfg, force=cfg.force, config_choice=HydraConfig.get().runtime.choices.get("dataset"))


if __name__ == "__main__":
    register_configs()
    main()
