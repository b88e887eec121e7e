"""Per-channel normalisation: the training split's mean and std (computed by the build, kept in the manifest) and
the values a run uses, the config's when it gives them, else the manifest's (source=imagefolder, `mean: []`)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

import numpy as np

from csdm_dist.config import ConfigError, DataConfig
from csdm_dist.data.manifest import ManifestError

_VALUES_PER_CHUNK = 1 << 22  # pixel values summed at once: bounds the int64 temporaries (32 MiB)


def channel_stats(images: np.ndarray, indices: Optional[np.ndarray] = None) -> tuple[list[float], list[float]]:
    """(mean, std) per channel, on the 0-1 pixel scale, of uint8 images [N, H, W, C] (only images[indices] when
    given), over every pixel of every image. Exact integer sums, so the result does not depend on the chunking."""
    idx = np.arange(len(images)) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(idx) == 0:
        raise ValueError("channel_stats needs at least one image")
    c = images.shape[-1]
    per_image = int(np.prod(images.shape[1:]))
    step = max(1, _VALUES_PER_CHUNK // per_image)
    s1, s2 = np.zeros(c, np.int64), np.zeros(c, np.int64)
    for start in range(0, len(idx), step):
        x = images[idx[start:start + step]].reshape(-1, c).astype(np.int64)
        s1 += x.sum(0)
        s2 += (x * x).sum(0)
    n = len(idx) * per_image // c
    mean = s1 / (n * 255.0)
    var = np.maximum(s2 / (n * 255.0 ** 2) - mean ** 2, 0.0)
    return [float(m) for m in mean], [float(math.sqrt(v)) for v in var]


def effective_mean_std(cfg: DataConfig, manifest: dict, where: Path | str) -> tuple[list[float], list[float]]:
    """The normalisation a run uses: dataset.mean/std when set, else the training split's from the manifest of the
    build in `where` (ManifestError when it has none; ConfigError when a channel's std is 0)."""
    if cfg.mean and cfg.std:
        return [float(m) for m in cfg.mean], [float(s) for s in cfg.std]
    mean, std = manifest.get("mean"), manifest.get("std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == cfg.channels):
        raise ManifestError(f"dataset.mean/std are empty, so the run takes them from {Path(where) / 'manifest.json'}, "
                            f"which records no {cfg.channels}-channel mean and std (built by an older version?); "
                            f"rebuild the dataset with force=true, or set dataset.mean=[...] dataset.std=[...]")
    flat = [c for c, s in enumerate(std) if not s > 0]
    if flat:
        raise ConfigError(f"invalid config `dataset.std`: the training images of {where} have std 0 in channel(s) "
                          f"{flat} (every pixel the same), so they cannot be normalised by it; set dataset.mean=[...] "
                          f"and dataset.std=[...] (std > 0) by hand")
    return [float(m) for m in mean], [float(s) for s in std]


def resolve_normalization(cfg: DataConfig, manifest: dict, where: Path | str) -> DataConfig:
    """`cfg` with mean/std set to effective_mean_std (the same object when the config gives them): done once at
    start-up, so that every consumer reads cfg.mean / cfg.std as before."""
    if cfg.mean and cfg.std:
        return cfg
    mean, std = effective_mean_std(cfg, manifest, where)
    return dataclasses.replace(cfg, mean=mean, std=std)
