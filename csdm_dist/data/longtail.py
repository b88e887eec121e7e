"""Long-tailed subsets: per-class counts n_c = floor(n_max * IF^(-c/(C-1))), a pinned random choice of images, the
relabelling of a class order, a balanced validation split from the images the subset did not take, and a balanced
test split held out from the training images before the subset is drawn (image folders without test/)."""
from __future__ import annotations

import hashlib
import math

import numpy as np

_EPS = 1e-6  # absorbs float error so that e.g. 6000 * 100^0 or 6000 * 100^-1 = 60 do not floor one too low
VAL_STREAM = 1  # second word of the val split's seed, [seed, VAL_STREAM]: independent of the subset's draw
HELDOUT_STREAM = 2  # second word of the held-out test split's seed, [seed, HELDOUT_STREAM]


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
                             f"(head count {counts[0]}); lower dataset.n_max so every class has enough images, "
                             f"or put the largest classes first with dataset.class_order")
        chosen.append(rng.choice(pool, size=n, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def index_hash(indices) -> str:
    """sha256 hex digest of the indices as little-endian int64 bytes."""
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def relabel(labels: np.ndarray, class_order: list[int]) -> np.ndarray:
    """Raw labels -> long-tailed labels: raw class class_order[k] becomes label k (class_order a permutation)."""
    order = np.asarray(class_order, dtype=np.int64)
    if sorted(order.tolist()) != list(range(len(order))):
        raise ValueError(f"class_order must be a permutation of 0..{len(order) - 1}, got {order.tolist()}")
    table = np.empty(len(order), np.int64)
    table[order] = np.arange(len(order))
    return table[np.asarray(labels, dtype=np.int64)]


def select_val(labels: np.ndarray, taken: np.ndarray, per_class: int, num_classes: int, seed: int,
               class_names: list[str] | None = None) -> np.ndarray:
    """Sorted indices into `labels` of per_class images of each class 0..num_classes-1, drawn with the pinned seed
    [seed, VAL_STREAM] from the indices not in `taken` (the long-tailed subset)."""
    labels = np.asarray(labels)
    free = np.ones(len(labels), bool)
    free[np.asarray(taken, dtype=np.int64)] = False
    rng = np.random.default_rng([seed, VAL_STREAM])
    chosen = []
    for c in range(num_classes):
        pool = np.flatnonzero(free & (labels == c))
        if len(pool) < per_class:
            name = f" ({class_names[c]})" if class_names and c < len(class_names) else ""
            raise ValueError(f"class {c}{name} has {len(pool)} raw training images left after the long-tailed "
                             f"subset took {int(np.sum(labels[~free] == c))}, fewer than dataset.val_per_class="
                             f"{per_class}; use a smaller dataset.val_per_class or dataset.n_max")
        chosen.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.empty(0, np.int64)


def select_heldout(labels: np.ndarray, per_class: int, num_classes: int, seed: int,
                   class_names: list[str] | None = None) -> np.ndarray:
    """Sorted indices into `labels` of per_class images of each class, drawn with the pinned seed
    [seed, HELDOUT_STREAM]: a balanced test split taken out of the training images before anything else, so
    that every class keeps at least one training image."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, HELDOUT_STREAM])
    chosen = []
    for c in range(num_classes):
        pool = np.flatnonzero(labels == c)
        if len(pool) <= per_class:
            name = f" ({class_names[c]})" if class_names and c < len(class_names) else ""
            raise ValueError(f"class {c}{name} has {len(pool)} training images; holding out dataset.test_per_class="
                             f"{per_class} of them for the test split would leave {max(0, len(pool) - per_class)} "
                             f"for training (at least 1 needed); lower dataset.test_per_class, or add a test/ "
                             f"folder with the same class folders")
        chosen.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.empty(0, np.int64)
