"""Build a long-tailed dataset as WebDataset shards plus manifest.json (atomic, idempotent).

Usage: python -m data_prep.build dataset=cifar10_lt dataset.raw_root=/path/to/raw [force=true]
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from csdm_dist.config import DataConfig, register_configs
from csdm_dist.data.longtail import index_hash, longtail_counts, select_longtail
from csdm_dist.data.shards import MANIFEST, dataset_dir, shard_sizes, write_split
from csdm_dist.data.sources import load_source

log = logging.getLogger(__name__)
FORMAT_VERSION = 1  # bump when the shard or manifest layout changes, so old builds are not mistaken for new ones


def config_hash(cfg: DataConfig) -> str:
    """sha256 of the fields that define the built data (not where it lives, nor the normalisation)."""
    fields = {"format": FORMAT_VERSION, "name": cfg.name, "source": cfg.source, "num_classes": cfg.num_classes,
              "channels": cfg.channels, "image_size": cfg.image_size, "seed": cfg.seed,
              "samples_per_shard": cfg.samples_per_shard}
    if cfg.source != "imagenet_lt":  # ImageNet-LT's subset comes from its lists, not the IF formula
        fields.update(imbalance_factor=float(cfg.imbalance_factor), n_max=cfg.n_max)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _built_hash(target: Path) -> str | None:
    path = target / MANIFEST
    return json.loads(path.read_text()).get("config_hash") if path.is_file() else None


def build_dataset(cfg: DataConfig, force: bool = False) -> Path:
    """Write the long-tailed train split and the balanced test split of `cfg` under dataset_dir(cfg)."""
    target, want = dataset_dir(cfg), config_hash(cfg)
    if target.exists() and not force:
        if _built_hash(target) == want:
            log.info("already built: %s", target)
            return target
        raise FileExistsError(f"{target} exists but was not built from this dataset config (or is incomplete); "
                              f"delete it or rerun with force=true")

    train, test = load_source(cfg, "train"), load_source(cfg, "test")
    raw_counts = np.bincount(train.labels, minlength=cfg.num_classes)
    if cfg.source == "imagenet_lt":  # the list is the long-tailed subset
        indices = np.arange(len(train.labels), dtype=np.int64)
        counts = raw_counts.tolist()
        n_max, imbalance = max(counts), max(counts) / min(counts)
    else:
        n_max, imbalance = cfg.n_max or int(raw_counts.max()), cfg.imbalance_factor
        counts = longtail_counts(n_max, cfg.num_classes, imbalance)
        indices = select_longtail(train.labels, counts, cfg.seed)
    test_counts = np.bincount(test.labels, minlength=cfg.num_classes).tolist()
    log.info("%s: %d train images (IF %.4g, n_max %d), %d test images", cfg.name, len(indices), imbalance, n_max,
             len(test.labels))
    for c, name in enumerate(train.class_names):
        log.info("  class %4d %-24s train %6d (of %d raw)  test %6d", c, name, counts[c], raw_counts[c], test_counts[c])

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{target.name}.tmp-{os.getpid()}"
    old = target.parent / f"{target.name}.old-{os.getpid()}"
    try:
        tmp.mkdir()
        splits = {}
        jobs = (("train", train, indices, counts, cfg.seed),
                ("test", test, np.arange(len(test.labels)), test_counts, cfg.seed + 1))
        for split, raw, idx, per_class, seed in jobs:
            ids = np.arange(len(idx), dtype=np.int64)
            shards = write_split(tmp, split, raw.images[idx], raw.labels[idx], ids, cfg.samples_per_shard, seed)
            splits[split] = {"counts": list(per_class), "num_samples": len(idx), "shards": shards,
                             "shard_sizes": shard_sizes(len(idx), cfg.samples_per_shard)}
        splits["train"]["index_hash"] = index_hash(indices)
        manifest = {"name": cfg.name, "source": cfg.source, "image_size": cfg.image_size, "channels": cfg.channels,
                    "num_classes": cfg.num_classes, "imbalance_factor": imbalance, "n_max": n_max, "seed": cfg.seed,
                    "samples_per_shard": cfg.samples_per_shard, "class_names": train.class_names, **splits,
                    "config_hash": want, "format_version": FORMAT_VERSION}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if target.exists():  # force: move the old build aside, put the new one in place, then delete the old one
            os.replace(target, old)
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
    build_dataset(data_cfg, force=cfg.force)


if __name__ == "__main__":
    register_configs()
    main()
