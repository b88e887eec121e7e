"""Smoke test of benchmarks/speed.py, so the script cannot silently rot: one tiny step on the CPU, no timing checks.

Run: .venv/bin/python -m pytest tests/unit/test_benchmarks.py -q
"""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import speed  # noqa: E402

TINY = ["extractor.width=16", "distill.real_per_class=8", "method.kernel.num_freqs=32"]


def test_speed_measure_runs_one_tiny_step():
    r = speed.measure("cpu", steps=1, warmup=0, extra=TINY)
    assert r["device"] == "cpu" and r["target_ratio"] == speed.TARGET["cpu"]
    for key in ("step_s", "floor_s", "ratio", "real_images_per_s"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert set(speed.PHASES) <= set(r["phases_ms"])
    assert r["real_images_per_step"][0] > 0
    assert r["peak_memory"]["step"]["host_peak_rss_mb"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_speed_cuda_without_cuda_fails_loudly():
    with pytest.raises(SystemExit, match="CUDA is not available"):
        speed.main(["--device", "cuda", "--wait-idle", "0"])
