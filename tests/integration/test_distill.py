"""End to end on a tiny fake Fashion-MNIST-LT: build shards, distil, evaluate, resume, pretrain a pool.

Every run goes through the real Hydra configs (compose) and `csdm_dist.distill.run` in this process, as a world
of one. Run: .venv/bin/python -m pytest tests/integration -q
"""
import json

import pytest
import torch

from csdm_dist.config import ConfigError, to_config
from csdm_dist.dist import close_distributed, init_distributed
from csdm_dist.distill import run
from csdm_dist.evaluate import evaluate_file
from csdm_dist.files import file_sha256
from csdm_dist.pretrain import pretrain
from runs import TINY, compose_cfg, distil

def test_end_to_end_writes_every_output(data_overrides, tmp_path):
    out = tmp_path / "run"
    cfg, res = distil(data_overrides + TINY + ["distill.iterations=4", f"out_dir={out}"])
    saved = json.loads((out / "results.json").read_text())
    for key in ("config", "config_hash", "git_commit", "seed", "world_size", "hardware", "class_counts", "accuracy",
                "baseline_random", "timing", "peak_memory"):
        assert key in saved, key
    assert saved["class_counts"] == [30, 23, 17, 13, 10, 8, 6, 5, 3, 3]
    acc = saved["accuracy"]
    assert 0 <= acc["mean"] <= 100 and len(acc["per_class"]) == 10
    assert {"many", "medium", "few"} <= acc.keys() and saved["timing"]["steps"] == 4
    blob = torch.load(out / "distilled.pt", weights_only=False)
    assert blob["images"].shape == (20, 1, 28, 28) and blob["labels"].tolist() == [c for c in range(10) for _ in "ab"]
    assert saved["distilled_sha256"] == file_sha256(out / "distilled.pt")  # the set these results describe
    assert (out / "synthetic.png").stat().st_size > 0
    assert any((out / "tb").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "step-000004" / "meta.json").is_file()
    assert res["accuracy"]["mean"] == acc["mean"]


def test_resumed_run_matches_uninterrupted(data_overrides, tmp_path):
    common = data_overrides + TINY + ["evaluate=false", "distill.checkpoint_every=3"]
    _, _ = distil(common + ["distill.iterations=6", f"out_dir={tmp_path / 'full'}"])
    _, _ = distil(common + ["distill.iterations=3", f"out_dir={tmp_path / 'cut'}"])
    at_3 = torch.load(tmp_path / "cut" / "distilled.pt", weights_only=False)["images"]
    _, res = distil(common + ["distill.iterations=6", f"out_dir={tmp_path / 'cut'}"])
    assert res["timing"]["steps"] == 6
    full = torch.load(tmp_path / "full" / "distilled.pt", weights_only=False)["images"]
    resumed = torch.load(tmp_path / "cut" / "distilled.pt", weights_only=False)["images"]
    assert torch.equal(full, resumed)
    assert not torch.equal(at_3, full)  # the resumed steps did change the images: equality is not trivial


def test_resume_refuses_a_changed_config(data_overrides, tmp_path):
    common = data_overrides + TINY + ["evaluate=false", "distill.iterations=2", f"out_dir={tmp_path}"]
    distil(common)
    with pytest.raises(ValueError, match="another configuration"):
        distil(common + ["method.kernel.bandwidth=2.0", "distill.iterations=3"])


def test_resume_refuses_a_checkpoint_made_in_another_precision(data_overrides, tmp_path, monkeypatch):
    """precision=auto is one config on every machine, but resolves per machine: a run resumed where it resolves
    otherwise (a requeued job on another kind of node) is refused instead of mixing precisions."""
    from csdm_dist import extractors

    common = data_overrides + TINY + ["evaluate=false", "distill.checkpoint_every=1", "precision=auto",
                                      f"out_dir={tmp_path}"]
    _, res = distil(common + ["distill.iterations=1"])
    made = res["precision"]
    other = {"bf16": "fp32", "fp32": "bf16"}[made]
    monkeypatch.setattr(extractors, "resolve_precision", lambda precision, device: other)
    before = {q: q.read_bytes() for q in tmp_path.rglob("*") if q.is_file()}
    with pytest.raises(ValueError, match=rf"checkpoint .* has precision='{made}' but this run has '{other}'"):
        distil(common + ["distill.iterations=2"])
    assert {q: q.read_bytes() for q in tmp_path.rglob("*") if q.is_file()} == before  # refused before writing
    monkeypatch.undo()
    from csdm_dist import checkpoint

    meta = checkpoint.step_dir(tmp_path / "checkpoints", 1) / "meta.json"
    old = {k: v for k, v in json.loads(meta.read_text()).items() if k != "precision"}
    meta.write_text(json.dumps(old))  # a checkpoint from before the precision was recorded: not checked
    _, res = distil(common + ["distill.iterations=2"])  # where it resolves as before, it resumes
    assert res["timing"]["steps"] == 2 and res["precision"] == made


@pytest.mark.parametrize("method", ["dm", "ncfm", "random"])
def test_baseline_methods_run(data_overrides, tmp_path, method):
    cfg, res = distil(data_overrides + TINY + [f"method={method}", "distill.iterations=2", "eval.repeats=1",
                                               f"out_dir={tmp_path}"])
    assert res["timing"]["steps"] == (0 if method == "random" else 2)
    assert "baseline_random" in res or method == "random"
    images = torch.load(tmp_path / "distilled.pt", weights_only=False)["images"]
    assert torch.isfinite(images).all()


def test_evaluate_entry_on_a_distilled_file(data_overrides, tmp_path):
    distil(data_overrides + TINY + ["distill.iterations=1", "evaluate=false", f"out_dir={tmp_path}"])
    acc = evaluate_file(tmp_path / "distilled.pt", {"protocol": "ncfm", "epochs": 2, "repeats": 2}, "cpu")
    assert acc["repeats"] == 2 and len(acc["per_class"]) == 10
    assert (tmp_path / "eval-ncfm-2ep-x2.json").is_file()


def test_pool_extractor_pretrain_then_distil(data_overrides, tmp_path):
    pool = tmp_path / "pool.pt"
    cfg = to_config(compose_cfg(data_overrides + TINY + ["extractor.pool_size=2", "extractor.pool_epochs=2",
                                                         f"extractor.pool_path={pool}"], name="pretrain"))
    rt = init_distributed("cpu")
    try:
        pretrain(cfg, rt.rank, rt.world_size, rt.device)
    finally:
        close_distributed()
    members = torch.load(pool, weights_only=True)["members"]
    assert len(members) == 2
    name = next(iter(members[0]["init"]))
    assert not torch.equal(members[0]["init"][name], members[0]["trained"][name])
    for m in members:  # each member's training curve, to tell whether pool_epochs was enough
        assert [h["epoch"] for h in m["history"]] == [1, 2]
        assert all(h["loss"] > 0 and 0 <= h["accuracy"] <= 100 for h in m["history"])
        assert m["history"][1]["loss"] < m["history"][0]["loss"]
    _, res = distil(data_overrides + TINY + ["extractor.mode=pool", f"extractor.pool_path={pool}",
                                            "distill.iterations=2", "evaluate=false", f"out_dir={tmp_path / 'r'}"])
    assert res["timing"]["steps"] == 2

    # the pool records what it was made from; a pool of another build or network, or one that records nothing,
    # is refused at start-up, naming the key, before anything is written
    blob = torch.load(pool, weights_only=True)
    prov = blob["provenance"]
    assert prov["dataset"] == "fashion_mnist_lt" and prov["counts"] == [30, 23, 17, 13, 10, 8, 6, 5, 3, 3]
    assert prov["norm"] == "instancenorm" and len(prov["data_config_hash"]) > 0

    def refused(edit, match):
        bad = tmp_path / "bad.pt"
        torch.save(edit(dict(blob)), bad)
        out = tmp_path / "refused"
        with pytest.raises(ConfigError, match=match):
            distil(data_overrides + TINY + ["extractor.mode=pool", f"extractor.pool_path={bad}",
                                            "distill.iterations=2", "evaluate=false", f"out_dir={out}"])
        assert not out.exists()

    refused(lambda b: {**b, "provenance": {**prov, "data_config_hash": "another"}},
            r"`extractor\.pool_path`: .* another dataset build \(data_config_hash: pool 'another'")
    refused(lambda b: {**b, "provenance": {**prov, "counts": [1] * 10}}, r"another dataset build \(counts")
    refused(lambda b: {**b, "provenance": {**prov, "norm": "batchnorm"}},
            r"`extractor\.norm`: the pool .* norm='batchnorm'")
    refused(lambda b: {k: v for k, v in b.items() if k != "provenance"}, r"does not record the dataset build")
    # a finished run needs no pool: it reports its results even when its pool is gone
    pool.unlink()
    _, again = distil(data_overrides + TINY + ["extractor.mode=pool", f"extractor.pool_path={pool}",
                                              "distill.iterations=2", "evaluate=false", f"out_dir={tmp_path / 'r'}"])
    assert again["timing"] == res["timing"]


@pytest.mark.parametrize("override,key", [("method.kernel.name=rbf", "method.kernel.name"),
                                          ("method.weighting.alpha_head=1.0", "method.weighting.alpha_head"),
                                          ("method.weighting.alpha_tail=0", "method.weighting.alpha_tail"),
                                          ("method.kernel.bandwidth_tail=0", "method.kernel.bandwidth_tail"),
                                          ("ipc=0", "ipc"),
                                          ("extractor.mode=pool", "extractor.pool_path")])
def test_invalid_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_config(compose_cfg([override]))


def test_missing_dataset_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_prep.build"):
        distil([f"dataset.data_root={tmp_path}", f"out_dir={tmp_path / 'r'}"] + TINY)


def test_stop_request_saves_and_resume_matches(data_overrides, tmp_path):
    """A scheduler signal (SIGUSR1) stops at the next step boundary with a checkpoint; resuming finishes the same."""
    import os
    import signal

    from csdm_dist.preempt import StopSignal

    common = data_overrides + TINY + ["evaluate=false", "distill.iterations=5", "distill.checkpoint_every=0"]
    distil(common + [f"out_dir={tmp_path / 'full'}"])
    cfg = to_config(compose_cfg(common + [f"out_dir={tmp_path / 'cut'}"]))
    rt = init_distributed("cpu")
    stop = StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        res = run(cfg, rt, stop)
    finally:
        stop.restore()
        close_distributed()
    assert res == {"preempted": True, "step": 1}
    assert (tmp_path / "cut" / "checkpoints" / "step-000001" / "meta.json").is_file()
    _, res = distil(common + [f"out_dir={tmp_path / 'cut'}"])
    assert res["timing"]["steps"] == 5
    full = torch.load(tmp_path / "full" / "distilled.pt", weights_only=False)["images"]
    assert torch.equal(full, torch.load(tmp_path / "cut" / "distilled.pt", weights_only=False)["images"])


def test_ipc_larger_than_a_class_follows_the_policy(data_overrides, tmp_path, caplog):
    """The two tail classes hold 3 real images; ipc=4 repeats them at init (logged) or fails under `error`."""
    over = data_overrides + TINY + ["ipc=4", "distill.iterations=0", "evaluate=false"]
    with caplog.at_level("WARNING"):
        distil(over + [f"out_dir={tmp_path / 'repeat'}"])
    warned = [r.getMessage() for r in caplog.records if "repeating their real images" in r.getMessage()]
    assert len(warned) == 1 and "class 8 has 3, class 9 has 3" in warned[0]  # once, naming every short class
    images = torch.load(tmp_path / "repeat" / "distilled.pt", weights_only=False)["images"]
    assert torch.equal(images[8 * 4], images[8 * 4 + 3])  # slot 3 cycles back to the first image
    assert not torch.equal(images[0], images[3])  # a large class gets 4 distinct images
    with pytest.raises(ValueError, match="small_class_policy"):
        distil(over + ["distill.small_class_policy=error", f"out_dir={tmp_path / 'error'}"])
