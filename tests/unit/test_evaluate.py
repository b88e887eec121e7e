"""The evaluation summary (evaluate.summarise) against a hand computation."""
import math

import pytest
import torch

from csdm_dist.evaluate import summarise


def test_summary_of_two_networks_by_hand():
    # two networks, 4 classes; last-epoch and best-epoch per-class accuracies
    last = torch.tensor([[1.0, 0.5, 0.5, 0.0], [0.5, 0.5, 1.0, 1.0]])
    best = torch.tensor([[1.0, 1.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    out = summarise(last, best, counts=[100, 40, 10, 5])
    assert out["repeats"] == 2
    assert out["per_repeat"] == pytest.approx([50.0, 75.0])  # each network's mean over its classes
    assert out["mean"] == pytest.approx(62.5) and out["std"] == pytest.approx(12.5)  # population std of 50, 75
    assert out["best_mean"] == pytest.approx((75.0 + 75.0) / 2)
    assert out["per_class"] == pytest.approx([75.0, 50.0, 75.0, 50.0])
    for group, idx in out["groups"].items():  # each group: the mean over its classes and both networks
        want = 100 * last[:, idx].mean().item() if idx else math.nan
        assert out[group] == pytest.approx(want, nan_ok=True)


def test_summary_of_one_network_has_zero_std():
    out = summarise(torch.tensor([[0.25, 0.75]]), torch.tensor([[0.25, 0.75]]), counts=[10, 1])
    assert out["per_repeat"] == pytest.approx([50.0]) and out["std"] == 0.0
