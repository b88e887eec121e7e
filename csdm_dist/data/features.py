"""Feature shards: real features precomputed by a fixed extractor pool (`python -m data_prep.extract_features`).

A features folder holds `features.json` and `features-rRRR-NNNNNN.tar` shards (written by rank R of the
extraction job). Each sample is one real image: `__key__` = its 9-digit global id, `feat` = raw bytes of a
[K, A, d] array (K pool members, A views, d feature dims; dtype in the manifest), `cls` and `id` (ascii ints).
The manifest names the dataset build (config hash), the pool file (sha256) and the augmentation of the views,
so distillation can refuse features made by another extractor.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from .shards import ShardError, stream_shards

FEATURES_MANIFEST = "features.json"


@dataclass
class FeatureData:
    feats: torch.Tensor  # [K, A, N, d] (fp16 or fp32 as stored)
    labels: torch.Tensor  # int64 [N]
    ids: torch.Tensor  # int64 [N]


def load_features_manifest(folder: Path) -> dict:
    path = Path(folder) / FEATURES_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no feature shards at {folder} ({FEATURES_MANIFEST} missing); extract them with "
                                "`python -m data_prep.extract_features` (same dataset and extractor settings), or "
                                "set features.dir")
    return json.loads(path.read_text())


def write_features(folder: Path, rank: int, feats: np.ndarray, labels: np.ndarray, ids: np.ndarray,
                   samples_per_shard: int) -> tuple[list[str], list[int]]:
    """feats [N, K, A, d] -> shards `features-r{rank}-{i}.tar`; returns (names, sizes)."""
    names, sizes = [], []
    for shard, start in enumerate(range(0, len(ids), samples_per_shard)):
        names.append(f"features-r{rank:03d}-{shard:06d}.tar")
        rows = range(start, min(start + samples_per_shard, len(ids)))
        sizes.append(len(rows))
        with wds.TarWriter(str(Path(folder) / names[-1]), encoder=False, mtime=0) as sink:
            for i in rows:
                sink.write({"__key__": f"{int(ids[i]):09d}", "feat": np.ascontiguousarray(feats[i]).tobytes(),
                            "cls": str(int(labels[i])).encode(), "id": str(int(ids[i])).encode()})
    return names, sizes


def read_features(folder: Path, shard_rank: int = 0, num_shards: int = 1) -> FeatureData:
    """This rank's share (shards shard_rank, shard_rank + num_shards, ...) of a features folder, in memory."""
    folder = Path(folder)
    m = load_features_manifest(folder)
    shape, dtype = (m["members"], m["views"], m["feature_dim"]), np.dtype(m["dtype"])
    rebuild = f"extract again with `python -m data_prep.extract_features` into {folder}"
    n = sum(m["shard_sizes"][shard_rank::num_shards])
    feats = np.empty((n, *shape), dtype)
    labels, ids = np.empty(n, np.int64), np.empty(n, np.int64)
    for k, sample in enumerate(stream_shards(folder, m["shards"], m["shard_sizes"], shard_rank, num_shards,
                                             rebuild, "read features", m["num_samples"] > 20000)):
        where = f"shard {sample['__url__']}, sample {sample['__key__']!r}"
        if any(f not in sample for f in ("feat", "cls", "id")):
            raise ShardError(f"{where} lacks a field (feat, cls, id); {rebuild}")
        if len(sample["feat"]) != feats[k].nbytes:
            raise ShardError(f"{where} holds {len(sample['feat'])} feature bytes, the manifest says "
                             f"{feats[k].nbytes} ({shape} {dtype}); {rebuild}")
        feats[k] = np.frombuffer(sample["feat"], dtype).reshape(shape)
        labels[k], ids[k] = int(sample["cls"]), int(sample["id"])
    return FeatureData(torch.from_numpy(feats).permute(1, 2, 0, 3).contiguous(), torch.from_numpy(labels),
                       torch.from_numpy(ids))


def features_dir(cfg) -> Path:
    """Where a run's feature shards live: features.dir, else <dataset dir>/features/<pool>-v<views>-<dtype>."""
    from .shards import dataset_dir

    if cfg.features.dir:
        return Path(cfg.features.dir)
    if not cfg.extractor.pool_path:
        raise ValueError("feature shards need extractor.pool_path (the fixed pool that made them) or features.dir")
    stem = Path(cfg.extractor.pool_path).stem
    return dataset_dir(cfg.dataset) / "features" / f"{stem}-v{cfg.features.views}-{cfg.features.dtype}"


def provenance(cfg, data_manifest: dict, pool_sha256: str | None) -> dict:
    """What a features folder must have been made with to serve this config (checked key by key)."""
    e = cfg.extractor
    return {"dataset": data_manifest["name"], "data_config_hash": data_manifest["config_hash"],
            "pool_sha256": pool_sha256, "arch": e.arch, "width": e.width, "depth": e.depth_at(cfg.dataset.image_size),
            "norm": e.norm, "views": cfg.features.views, "dtype": cfg.features.dtype, "view_seed": cfg.seed}


def check_provenance(folder: Path, manifest: dict, want: dict) -> None:
    wrong = {k: (manifest.get(k), v) for k, v in want.items() if manifest.get(k) != v}
    if wrong:
        lines = ", ".join(f"{k}: shards {a!r} vs config {b!r}" for k, (a, b) in wrong.items())
        raise ValueError(f"the feature shards in {folder} were made with another extractor or dataset ({lines}); "
                         "extract them again for this config (python -m data_prep.extract_features) or point "
                         "features.dir at matching shards")
