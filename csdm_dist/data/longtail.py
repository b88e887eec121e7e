"""Long-tailed subsets: per-class counts n_c = floor(n_max * IF^(-c/(C-1))) and a pinned random choice of images."""
from __future__ import annotations

import hashlib
import math

import numpy as np

_EPS = 1e-6  # absorbs float error so that e.g. 6000 * 100^0 or 6000 * 100^-1 = 60 do not floor one too low


def longtail_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Exponential profile from n_max (class 0) down to n_max / IF (class C-1)."""
    if n_max < 1 or num_classes < 2 or imbalance_factor < 1:
        raise ValueError(f"need n_max >= 1, num_classes >= 2 and imbalance_factor >= 1, "
                         f"got {n_max}, {num_classes}, {imbalance_factor}")
    last = num_classes - 1
    counts = [math.floor(n_max * imbalance_factor ** (-c / last) + _EPS) for c in range(num_classes)]
    if counts[-1] < 1:
        raise ValueError(f"imbalance_factor {imbalance_factor:g} with n_max {n_max} leaves class {last} empty; "
                         f"use dataset.imbalance_factor <= dataset.n_max")
    return counts


def select_longtail(labels: np.ndarray, counts: list[int], seed: int) -> np.ndarray:
    """Sorted indices into `labels` holding counts[c] images of class c, drawn uniformly with a seeded Generator."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for c, n in enumerate(counts):
        pool = np.flatnonzero(labels == c)
        if len(pool) < n:
            raise ValueError(f"class {c} has {len(pool)} raw training images but the long-tail profile asks for {n} "
                             f"(head count {counts[0]}); lower dataset.n_max so every class has enough images")
        chosen.append(rng.choice(pool, size=n, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def index_hash(indices) -> str:
    """sha256 hex digest of the indices as little-endian int64 bytes."""
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()
