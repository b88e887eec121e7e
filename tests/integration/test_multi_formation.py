"""Multi-formation and the lr schedule end to end, on the tiny fake Fashion-MNIST-LT of tests/integration/conftest.py.

Run: .venv/bin/python -m pytest tests/integration/test_multi_formation.py -q
"""
import os
import signal

import pytest
import torch
from PIL import Image

from csdm_dist.config import ConfigError, to_config
from csdm_dist.dist import ParallelLayout, close_distributed, init_distributed
from csdm_dist.distill import run
from csdm_dist.engine import build_engine, set_lr
from csdm_dist.evaluate import evaluate_file
from csdm_dist.preempt import StopSignal
from runs import TINY, compose_cfg, distil

FORMATION = ["synthetic.factor=2", "distill.init=mix"]


def test_factor_two_mix_run_stores_tiles_and_evaluates_the_decoded_set(data_overrides, tmp_path):
    out = tmp_path / "run"
    _, res = distil(data_overrides + TINY + FORMATION + ["distill.iterations=2", f"out_dir={out}"])
    blob = torch.load(out / "distilled.pt", weights_only=False)
    assert blob["factor"] == 2
    assert blob["images"].shape == (20, 1, 28, 28)  # ipc=2 stored images per class: the storage budget
    assert blob["labels"].tolist() == [c for c in range(10) for _ in "ab"]
    assert res["accuracy"]["train_images"] == 10 * 2 * 4  # trained on ipc * f^2 decoded images per class
    assert res["baseline_random"]["train_images"] == 10 * 2  # the baseline: ipc real images per class
    acc = res["accuracy"]
    assert len(acc["confused_with"]) == 10  # per true class: the classes its test images were taken for
    for c, (right, wrong) in enumerate(zip(acc["per_class"], acc["confused_with"])):
        assert all(j != c and 0 < rate <= 100 - right + 1e-3 for j, rate in wrong)  # at most what it got wrong
    with Image.open(out / "synthetic.png") as png:  # the stored images, ipc per row: 2 x 10 tiles of 28 + 2 px
        assert png.size == (2 * 30 + 2, 10 * 30 + 2)
    acc = evaluate_file(out / "distilled.pt", {"epochs": 1, "repeats": 1}, "cpu")
    assert acc["train_images"] == 80
    acc = evaluate_file(out / "distilled.pt", {"epochs": 4, "repeats": 2, "test_points": 2}, "cpu")
    assert list(acc["at_epochs"]) == ["2", "4"]  # the tested epochs, each averaged over the networks
    assert acc["at_epochs"]["4"] == pytest.approx(acc["mean"], abs=1e-4)
    assert acc["best_mean"] >= max(acc["at_epochs"].values()) - 1e-4  # each network's best, averaged

    old = {k: v for k, v in blob.items() if k != "factor"}  # a file from before multi-formation: factor 1
    old_path = tmp_path / "old" / "distilled.pt"
    old_path.parent.mkdir()
    torch.save(old, old_path)
    assert evaluate_file(old_path, {"epochs": 1, "repeats": 1}, "cpu")["train_images"] == 20


def test_factor_three_on_28_px_runs(data_overrides, tmp_path):
    """28 / 3: 9 px tiles, the last pixel row and column unused; the run goes through and stays finite."""
    _, res = distil(data_overrides + TINY + ["synthetic.factor=3", "distill.init=mix", "distill.iterations=1",
                                             "evaluate=false", f"out_dir={tmp_path}"])
    images = torch.load(tmp_path / "distilled.pt", weights_only=False)["images"]
    assert images.shape == (20, 1, 28, 28) and torch.isfinite(images).all() and res["timing"]["steps"] == 1


def test_random_method_with_mix_is_the_unoptimised_multi_formation_set(data_overrides, tmp_path):
    _, res = distil(data_overrides + TINY + FORMATION + ["method=random", f"out_dir={tmp_path}"])
    assert res["timing"]["steps"] == 0 and res["accuracy"]["train_images"] == 80
    assert torch.load(tmp_path / "distilled.pt", weights_only=False)["factor"] == 2

def test_tiles_too_small_are_refused_naming_the_key(data_overrides, tmp_path):
    with pytest.raises(ConfigError, match=r"synthetic\.factor.*3 px tiles"):
        distil(data_overrides + TINY + ["synthetic.factor=8", "distill.iterations=1", f"out_dir={tmp_path}"])


@pytest.mark.parametrize("override,key", [("synthetic.factor=0", "synthetic.factor"),
                                          ("distill.init=tiles", "distill.init"),
                                          ("distill.lr_schedule=linear", "distill.lr_schedule")])
def test_invalid_new_keys_are_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_config(compose_cfg([override]))


@pytest.mark.parametrize("stage", [0, 2])
def test_set_lr_reaches_the_optimizer_under_zero(stage):
    """Adam's first steps move each pixel by lr * g / (|g| + eps) ~ lr: the lr written by set_lr is the one used."""
    cfg = to_config(compose_cfg(TINY + [f"deepspeed.zero_stage={stage}"]))
    rt = init_distributed("cpu")
    try:
        layout = ParallelLayout.from_world(1, rt.rank, rt.world_size)
        engine = build_engine(torch.zeros(4, 1, 8, 8), cfg, layout, rt)
        before = engine().detach().clone()
        for lr in (0.25, 0.0625):
            set_lr(engine, lr)
            engine.backward(engine().sum())  # gradient 1 everywhere
            engine.step()
            after = engine().detach().clone()
            torch.testing.assert_close(before - after, torch.full_like(before, lr), rtol=1e-6, atol=0)
            before = after
    finally:
        close_distributed()


def test_cosine_schedule_resumes_exactly(data_overrides, tmp_path):
    """Stopped after step 1 and resumed, a cosine run ends where an uninterrupted one does (the lr of each step is
    a function of the step, not of scheduler state); and the schedule did change the result."""
    common = data_overrides + TINY + ["evaluate=false", "distill.iterations=4", "distill.checkpoint_every=0"]
    cosine = common + ["distill.lr_schedule=cosine"] + FORMATION
    distil(cosine + [f"out_dir={tmp_path / 'full'}"])
    distil(common + FORMATION + [f"out_dir={tmp_path / 'constant'}"])
    cfg = to_config(compose_cfg(cosine + [f"out_dir={tmp_path / 'cut'}"]))
    rt = init_distributed("cpu")
    stop = StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert run(cfg, rt, stop) == {"preempted": True, "step": 1}
    finally:
        stop.restore()
        close_distributed()
    _, res = distil(cosine + [f"out_dir={tmp_path / 'cut'}"])
    assert res["timing"]["steps"] == 4

    def images(name):
        return torch.load(tmp_path / name / "distilled.pt", weights_only=False)["images"]

    assert torch.equal(images("full"), images("cut"))
    assert not torch.equal(images("full"), images("constant"))


def test_at_steps_evaluates_intermediate_sets_without_changing_the_run(data_overrides, tmp_path):
    """eval.at_steps: an accuracy-against-steps curve from one run; the evaluations do not perturb the
    distillation (its randomness is a function of the step), and a listed step past the budget is refused."""
    common = data_overrides + TINY + FORMATION + ["distill.iterations=3", "baseline=false"]
    _, res = distil(common + ["eval.at_steps=[1,2]", f"out_dir={tmp_path / 'curve'}"])
    _, plain = distil(common + [f"out_dir={tmp_path / 'plain'}"])
    curve = res["accuracy_at_steps"]
    assert list(curve) == ["1", "2", "3"] and curve["3"] == res["accuracy"]
    assert all(curve[k]["train_images"] == 80 for k in curve)
    assert "accuracy_at_steps" not in plain
    kept = (tmp_path / "curve" / "accuracy_at_steps.json").read_text()
    assert '"1"' in kept and '"2"' in kept
    assert all(curve[k]["eval"]["epochs"] == 2 for k in ("1", "2"))  # each point names its protocol
    # eval.* is not in the config hash: evaluated again with other settings, the curve keeps no point of the old
    # protocol (the intermediate sets are gone, so there is no curve), and the old points come back with the
    # settings they were made with
    _, other = distil(common + ["eval.at_steps=[1,2]", "eval.epochs=3", "reevaluate=true",
                                f"out_dir={tmp_path / 'curve'}"])
    assert "accuracy_at_steps" not in other and other["config"]["eval"]["epochs"] == 3
    _, again = distil(common + ["eval.at_steps=[1,2]", "reevaluate=true", f"out_dir={tmp_path / 'curve'}"])
    assert list(again["accuracy_at_steps"]) == ["1", "2", "3"] and again["accuracy_at_steps"]["1"] == curve["1"]

    def images(name):
        return torch.load(tmp_path / name / "distilled.pt", weights_only=False)["images"]

    assert torch.equal(images("curve"), images("plain"))
    with pytest.raises(ConfigError, match=r"eval\.at_steps.*below distill\.iterations"):
        to_config(compose_cfg(common + ["eval.at_steps=[3]"]))
    with pytest.raises(ConfigError, match=r"eval\.at_steps.*strictly increasing"):
        to_config(compose_cfg(common + ["eval.at_steps=[2,1]"]))


def test_deepspeed_follows_the_run_device(tmp_path):
    """DeepSpeed picks CUDA whenever it is there; a device=cpu run sets DS_ACCELERATOR=cpu before importing it,
    and an accelerator forced against the device is refused naming the key (in a fresh process: DeepSpeed keeps
    its accelerator for the life of the process)."""
    import subprocess
    import sys

    code = ("import os, torch\nfrom csdm_dist.engine import import_deepspeed\n"
            "ds = import_deepspeed(torch.device('cpu'))\n"
            "from deepspeed.accelerator import get_accelerator\n"
            "print(os.environ['DS_ACCELERATOR'], get_accelerator().device_name())")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    ok = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and ok.stdout.split()[-2:] == ["cpu", "cpu"], ok.stderr[-2000:]
    forced = subprocess.run([sys.executable, "-c", code], env={**env, "DS_ACCELERATOR": "cuda"},
                            capture_output=True, text=True, timeout=300)
    assert forced.returncode != 0 and "invalid config `device`" in forced.stderr and "DS_ACCELERATOR" in forced.stderr
