"""The evaluation summary (evaluate.summarise), per-class accuracy and confusions against hand computations."""
import math

import pytest
import torch

from csdm_dist import evaluate
from csdm_dist.evaluate import class_accuracy, summarise, top_confusions


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


def test_class_accuracy_and_top_confusions_by_hand():
    # 3 classes; rows are the true class. Class 0: 6 right, 3 taken for 2, 1 for 1; class 1: all right;
    # class 2: 2 right, 2 taken for 0; a class with no test images (row of zeros) scores 0 and confuses nothing
    conf = torch.tensor([[6.0, 1.0, 3.0], [0.0, 5.0, 0.0], [2.0, 0.0, 2.0]])
    assert class_accuracy(conf).tolist() == pytest.approx([0.6, 1.0, 0.5])
    top = top_confusions(conf, k=3)
    assert top[0] == [[2, pytest.approx(30.0)], [1, pytest.approx(10.0)]]  # largest first, the diagonal left out
    assert top[1] == []  # never wrong
    assert top[2] == [[0, pytest.approx(50.0)]]
    assert top_confusions(conf, k=1)[0] == [[2, pytest.approx(30.0)]]
    empty = torch.zeros(2, 2)
    assert class_accuracy(empty).tolist() == [0.0, 0.0] and top_confusions(empty) == [[], []]


class _Fixed(torch.nn.Module):
    """Predicts the class stored in the image's first pixel: a network whose mistakes are known."""

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].round().long(), 3).float()


def test_confusion_counts_every_test_image_once_across_batches():
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = torch.tensor([0, 2, 2, 1, 0, 2, 2, 1, 2])
    x = pred.view(-1, 1, 1, 1).repeat(1, 1, 2, 2).to(torch.uint8)
    conf = evaluate.test_confusion(_Fixed(), x, y, lambda t: t.float(), 3, batch=4, device=torch.device("cpu"))
    want = torch.zeros(3, 3)
    for t, p in zip(y.tolist(), pred.tolist()):
        want[t, p] += 1
    assert torch.equal(conf, want)
    assert evaluate.test_accuracy(_Fixed(), x, y, lambda t: t.float(), 3, 4, torch.device("cpu")).tolist() == \
        pytest.approx([1 / 3, 1 / 2, 3 / 4])
