"""Long-tail counts and the pinned choice of images."""
import hashlib

import numpy as np
import pytest

from csdm_dist.data.longtail import index_hash, longtail_counts, select_longtail


def test_counts_match_hand_values():
    # 6000 * 100^(-c/9), floored: e.g. c=1: 6000 / 1.66810 = 3596.9; c=8: 60 * 1.66810 = 100.09
    assert longtail_counts(6000, 10, 100) == [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
    # the CIFAR-10-LT (IF 100) counts used throughout the long-tail literature
    assert longtail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_counts_edge_cases():
    assert longtail_counts(6000, 10, 1) == [6000] * 10
    assert longtail_counts(500, 100, 100)[-1] == 5  # exactly n_max / IF despite float error
    assert longtail_counts(10, 3, 10) == [10, 3, 1]
    counts = longtail_counts(1280, 50, 37.5)
    assert counts == sorted(counts, reverse=True)
    with pytest.raises(ValueError, match="imbalance_factor"):
        longtail_counts(10, 5, 20)  # the last class would get 0 images


def _labels(per_class, seed=0):
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(len(per_class)), per_class))


def test_select_respects_counts_and_is_reproducible():
    labels = _labels([50, 40, 30, 20])
    counts = [20, 10, 5, 2]
    a = select_longtail(labels, counts, seed=3)
    assert np.array_equal(a, select_longtail(labels, counts, seed=3))
    assert np.array_equal(a, np.sort(a)) and len(np.unique(a)) == len(a) and a.dtype == np.int64
    assert np.bincount(labels[a], minlength=4).tolist() == counts
    b = select_longtail(labels, counts, seed=4)
    assert not np.array_equal(a, b)
    assert np.bincount(labels[b], minlength=4).tolist() == counts


def test_select_is_uniform_within_a_class():
    labels = np.zeros(10, np.int64)
    hits = np.zeros(10)
    for seed in range(2000):
        hits[select_longtail(labels, [3], seed)] += 1
    assert np.allclose(hits / 2000, 0.3, atol=0.05)


def test_select_too_few_images_names_class_and_counts():
    labels = _labels([10, 10, 2])
    with pytest.raises(ValueError, match=r"class 2 has 2 raw training images .* asks for 3.*dataset\.n_max"):
        select_longtail(labels, [10, 5, 3], seed=0)


def test_index_hash():
    idx = np.array([3, 1, 4, 1, 5])
    assert index_hash(idx) == hashlib.sha256(idx.astype(np.int64).tobytes()).hexdigest()
    assert index_hash(idx.astype(np.int32)) == index_hash([3, 1, 4, 1, 5])
    assert index_hash(idx) != index_hash(idx[::-1])
