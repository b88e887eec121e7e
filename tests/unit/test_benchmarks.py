"""Smoke tests of benchmarks/speed.py and gpu.sh, so they cannot silently rot: one tiny CPU step, no timing checks.

Run: .venv/bin/python -m pytest tests/unit/test_benchmarks.py -q
"""
import math
import os
import subprocess
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_gpu_script_without_cuda_fails_loudly(tmp_path):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(script), str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "CUDA is not available" in proc.stderr
    assert not (tmp_path / "out" / "speed.json").exists()


def test_quality_aggregate_over_seeds_and_single_seed():
    import quality

    def seed(s, mean, std):
        return {"seed": s, "mean": mean, "std": std, "many": mean + 1, "medium": mean - 1, "few": mean,
                "distill_s": 10.0 * (s + 1), "eval_s": 1.0}

    one = quality.aggregate([seed(0, 80.0, 0.3)])
    assert one["mean"] == 80.0 and one["std"] == 0.3 and one["std_over"] == "evaluation repeats"
    two = quality.aggregate([seed(0, 80.0, 0.3), seed(1, 82.0, 0.1)])
    assert two["mean"] == 81.0 and two["many"] == 82.0 and two["distill_s"] == 15.0
    assert math.isclose(two["std"], math.sqrt(2.0)) and two["std_over"] == "seeds" and two["num_seeds"] == 2


def test_quality_markdown_reports_csdm_margin_per_seed():
    import quality

    def cell(method, means):
        seeds = [{"seed": k, "mean": m, "std": 0.1, "many": m, "medium": m, "few": m, "distill_s": 1.0, "eval_s": 1.0}
                 for k, m in enumerate(means)]
        return {"imbalance_factor": 10.0, "method": method, **quality.aggregate(seeds), "seeds": seeds}

    rows = [cell("dm", [79.0, 79.5]), cell("ncfm", [80.0, 81.0]), cell("csdm", [80.5, 80.9])]
    args = type("Args", (), {"ipc": 10, "seeds": [0, 1]})
    table = quality.markdown(rows, args, "full", [])
    assert "| 10 | 79.25 +- 0.35 | 80.50 +- 0.71 | 80.70 +- 0.28 |" in table
    assert "IF 10: csdm - ncfm = +0.20 (per seed: +0.50, -0.10)" in table
