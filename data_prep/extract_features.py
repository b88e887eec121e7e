"""Precompute real features with a fixed extractor pool, as WebDataset shards (real_source=features).

    python -m data_prep.extract_features dataset=fashion_mnist_lt extractor.mode=pool extractor.interpolate=false \
        extractor.pool_path=<pool.pt> [features.views=1] [features.dtype=float16]
    torchrun --nproc_per_node=N -m data_prep.extract_features ...   (each rank featurises its own image shards)

Every member of the pool (its trained weights) runs over every long-tailed training image, in `features.views`
views: view 0 is the image itself, view v > 0 an augmented copy (one op per view, per-image parameters keyed by
the image id, seeded by `seed`). The shards go into a temporary folder that is renamed into place once complete;
an existing folder made with the same extractor is kept as it is, one made with another is refused.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from tqdm import tqdm

from csdm_dist import rng
from csdm_dist.augment import NUM_UNIFORMS, augment, pick_op
from csdm_dist.config import Config, register_configs, to_config
from csdm_dist.data.features import (FEATURES_MANIFEST, check_provenance, features_dir, load_features_manifest,
                                     provenance, write_features)
from csdm_dist.data.manifest import MANIFEST, check_counts, rebuild_hint
from csdm_dist.data.normalization import resolve_normalization
from csdm_dist.data.shards import dataset_dir, load_manifest, read_split
from csdm_dist.dist import Runtime, close_distributed, init_distributed
from csdm_dist.distiller import Normalizer
from csdm_dist.extractors import Extractor
from csdm_dist.pretrain import check_pool

log = logging.getLogger("data_prep.extract_features")
CHUNK = 1024  # images per forward pass


def featurise(extractor: Extractor, images: torch.Tensor, ids: torch.Tensor, norm: Normalizer, views: int,
              seed: int, device: torch.device, show: bool) -> np.ndarray:
    """[N, K, A, d] fp32 raw features of uint8 images [N, C, H, W] for every pool member and view."""
    k_total = len(extractor.pool)
    out = np.empty((len(ids), k_total, views, extractor.feature_dim), np.float32)
    chunks = list(range(0, len(ids), CHUNK))
    bar = tqdm(total=k_total * views * len(chunks), desc="extract", disable=not show, dynamic_ncols=True)
    with torch.no_grad():
        for k in range(k_total):
            extractor.use_member(k)
            for v in range(views):
                op = pick_op(rng.generator(seed, v, rng.FEATURE_VIEW)) if v else None
                for i in chunks:
                    x = norm(images[i:i + CHUNK].to(device))
                    if op is not None:
                        x = augment(x, op, rng.sample_uniforms(ids[i:i + CHUNK], seed, v, rng.FEATURE_VIEW,
                                                               NUM_UNIFORMS))
                    out[i:i + CHUNK, k, v] = extractor.raw_embed(x).cpu().numpy()
                    bar.update()
    bar.close()
    return out


def extract(cfg: Config, rt: Runtime) -> Path:
    d = cfg.dataset
    if cfg.extractor.mode != "pool" or cfg.extractor.interpolate:
        raise ValueError("feature extraction needs a fixed pool: extractor.mode=pool extractor.interpolate=false "
                         "extractor.pool_path=<pool from python -m csdm_dist.pretrain>")
    out = features_dir(cfg)
    data_manifest = load_manifest(dataset_dir(d), d)
    d = resolve_normalization(d, data_manifest, dataset_dir(d))  # empty dataset.mean/std: the build's
    check_pool(Path(cfg.extractor.pool_path), replace(cfg, dataset=d), data_manifest)  # a pool of this build
    extractor = Extractor(cfg.extractor, d.channels, d.num_classes, d.image_size, rt.device, normalize=False,
                          precision=cfg.precision)
    want = provenance(cfg, data_manifest, extractor.pool_sha256)
    if (out / FEATURES_MANIFEST).is_file():
        check_provenance(out, load_features_manifest(out), want)
        if rt.is_main:
            print(f"{out} already holds these features")
        return out
    if out.exists():
        raise FileExistsError(f"{out} exists but has no {FEATURES_MANIFEST} (an interrupted extraction?); delete it")
    tmp = out.with_name(out.name + ".tmp")
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    real = read_split(dataset_dir(d), "train", rt.rank, rt.world_size, cfg=d)
    counts = torch.bincount(real.labels, minlength=d.num_classes).to(rt.device)
    dist.all_reduce(counts)  # every rank read other shards: together they read the whole split
    check_counts(data_manifest["train"]["counts"], counts.cpu(), manifest_path=dataset_dir(d) / MANIFEST,
                 rebuild=rebuild_hint(dataset_dir(d), d))
    norm = Normalizer.build(d.mean, d.std, rt.device)
    feats = featurise(extractor, real.images, real.ids, norm, cfg.features.views, cfg.seed, rt.device, rt.is_main)
    names, sizes = write_features(tmp, rt.rank, feats.astype(cfg.features.dtype), real.labels.numpy(),
                                  real.ids.numpy(), d.samples_per_shard)
    parts: list = [None] * rt.world_size
    dist.all_gather_object(parts, (names, sizes))
    if rt.is_main:
        manifest = {**want, "members": len(extractor.pool), "feature_dim": extractor.feature_dim,
                    "precision": extractor.precision,  # the forward's (recorded; fp16 storage is coarser than bf16)
                    "augment_ops": "one per view v > 0, chosen by generator(seed, v)",
                    "num_samples": sum(sum(s) for _, s in parts),
                    "shards": [n for ns, _ in parts for n in ns], "shard_sizes": [x for _, s in parts for x in s]}
        (tmp / FEATURES_MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, out)
        print(f"wrote {manifest['num_samples']} x {manifest['members']} members x {cfg.features.views} views "
              f"x {extractor.feature_dim} features ({cfg.features.dtype}) to {out}\n"
              f"use them with: real_source=features extractor.mode=pool extractor.interpolate=false "
              f"extractor.pool_path={cfg.extractor.pool_path}")
    dist.barrier()
    return out


@hydra.main(version_base=None, config_path="../configs", config_name="extract_features")
def main(dcfg: DictConfig) -> None:
    cfg = to_config(dcfg)
    rt = init_distributed(cfg.device)
    try:
        extract(cfg, rt)
    finally:
        close_distributed()


if __name__ == "__main__":
    register_configs()
    main()
