"""`python -m csdm_dist.evaluate` as a user types it, on a tiny distilled set.

Run: .venv/bin/python -m pytest tests/integration/test_evaluate_cli.py -q
"""
import json
import subprocess
import sys
from pathlib import Path

from runs import TINY, distil

ROOT = Path(__file__).resolve().parents[2]


def evaluate(*overrides):
    return subprocess.run([sys.executable, "-m", "csdm_dist.evaluate", *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_eval_keys_override_without_plus_and_typos_are_refused(data_overrides, tmp_path):
    distil(data_overrides + TINY + ["distill.iterations=1", "evaluate=false", f"out_dir={tmp_path}"])
    path = tmp_path / "distilled.pt"
    proc = evaluate(f"distilled={path}", "eval.protocol=ncfm", "eval.repeats=1", "eval.epochs=1", "device=cpu")
    assert proc.returncode == 0, proc.stderr
    assert "ncfm protocol, 1 epochs x 1 repeats" in proc.stdout and "on the test split in" in proc.stdout
    written = json.loads((tmp_path / "eval-ncfm-1ep-x1.json").read_text())
    assert written["eval"]["protocol"] == "ncfm" and written["eval"]["epochs"] == 1
    assert written["eval"]["batch_size"] == 256  # keys not given keep the set's own values

    typo = evaluate(f"distilled={path}", "eval.protocl=ncfm")
    assert typo.returncode != 0 and "protocl" in typo.stderr
    bad = evaluate(f"distilled={path}", "eval.protocol=sgd", "device=cpu")
    assert bad.returncode == 2 and "eval.protocol" in bad.stderr and "Traceback" not in bad.stderr
    missing = evaluate(f"distilled={tmp_path / 'nothing.pt'}", "device=cpu")
    assert missing.returncode == 2 and "not found" in missing.stderr
