"""Smoke test of benchmarks/class_difficulty.py on a tiny fake Fashion-MNIST: one epoch of a small ConvNet on the CPU.

Run: .venv/bin/python -m pytest tests/unit/test_class_difficulty.py -q
"""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import class_difficulty  # noqa: E402
from fakes import write_fake_fashion_mnist  # noqa: E402


def test_class_difficulty_writes_the_order(tmp_path, capsys):
    write_fake_fashion_mnist(tmp_path / "raw", n_per_class=8, num_classes=10, seed=0)
    out = tmp_path / "results" / "difficulty.json"
    report = class_difficulty.main(["--raw-root", str(tmp_path / "raw"), "--epochs", "1", "--device", "cpu",
                                    "--width", "8", "--depth", "2", "--batch-size", "32", "--repeats", "2",
                                    "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["order_easiest_to_hardest"] == report["order_easiest_to_hardest"]
    order, acc = saved["order_easiest_to_hardest"], saved["per_class_accuracy"]
    assert sorted(order) == list(range(10)) and len(acc) == 10 and all(0 <= a <= 100 for a in acc)
    assert [acc[c] for c in order] == sorted(acc, reverse=True)
    assert saved["train_images"] == saved["test_images"] == 80
    assert len(saved["per_class_accuracy_per_network"]) == 2
    assert saved["class_names"][1] == "Trouser" and saved["order_names"] == [saved["class_names"][c] for c in order]
    assert saved["setting"]["epochs"] == 1 and saved["setting"]["seeds"] == [0, 1]
    printed = capsys.readouterr().out
    assert f"class_order: {order}" in printed and "Trouser" in printed


def test_easiest_first_breaks_ties_by_index():
    assert class_difficulty.easiest_first([50.0, 90.0, 50.0, 99.0]) == [3, 1, 0, 2]


def test_bad_arguments_and_missing_data(tmp_path):
    with pytest.raises(SystemExit):
        class_difficulty.parse_args(["--epochs", "0"])
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST file"):
        class_difficulty.main(["--raw-root", str(tmp_path / "none"), "--device", "cpu", "--out", str(tmp_path / "x")])
