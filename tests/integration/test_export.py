"""Export a distilled set (`python -m csdm_dist.export`) and read it back (`csdm_dist.load_distilled`), on tiny real
runs (factor 1 and factor 2) of the fake Fashion-MNIST-LT of tests/integration/conftest.py.

Run: .venv/bin/python -m pytest tests/integration/test_export.py -q
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from csdm_dist import formation, load_distilled
from csdm_dist.config import ConfigError, ExportConfig, to_config
from csdm_dist.distilled import folder_names
from csdm_dist.errors import EXIT_INPUT, UserError
from csdm_dist.export import export, to_export_config
from csdm_dist.runinfo import config_hash
from runs import TINY, compose_cfg, distil

FORMATS = ("imagefolder", "webdataset", "npz")
ROOT = Path(__file__).resolve().parents[2]
NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@pytest.fixture(scope="module")
def runs(data_overrides, tmp_path_factory):
    """{factor: run dir} of two finished one-step CSDM runs (ipc 2): factor 1, and factor 2 (init=mix)."""
    root = tmp_path_factory.mktemp("export-runs")
    common = data_overrides + TINY + ["distill.iterations=1", "evaluate=false", "distill.checkpoint_every=0"]
    for f, extra in ((1, ["synthetic.factor=1", "distill.init=real"]), (2, ["synthetic.factor=2", "distill.init=mix"])):
        distil(common + extra + [f"out_dir={root / f'f{f}'}"])
    return {1: root / "f1", 2: root / "f2"}


def reference(run: Path):
    """(decoded normalised images, labels, the distilled.pt dict): what the evaluation trains on."""
    blob = torch.load(run / "distilled.pt", weights_only=False)
    images, labels = formation.decode_set(blob["images"], blob["labels"], blob["factor"])
    return images, labels, blob


def unit_pixels(images, blob):
    """De-normalised and clipped to [0, 1]: what an export stores, before rounding to uint8."""
    m, s = torch.tensor(blob["mean"]).view(1, -1, 1, 1), torch.tensor(blob["std"]).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)


def assert_same_up_to_uint8(loaded, images, blob):
    """loaded (normalised floats read from an export) == images clipped to [0, 1], within half a uint8 step."""
    m, s = torch.tensor(blob["mean"]).view(1, -1, 1, 1), torch.tensor(blob["std"]).view(1, -1, 1, 1)
    expect = (unit_pixels(images, blob) - m) / s
    assert loaded.shape == images.shape and loaded.dtype == torch.float32
    assert (loaded - expect).abs().max() <= 0.5 / 255 / s.min() + 1e-5


@pytest.mark.parametrize("factor", [1, 2])
@pytest.mark.parametrize("fmt", FORMATS)
def test_export_then_load_round_trip(runs, tmp_path, fmt, factor):
    run = runs[factor]
    images, labels, blob = reference(run)
    n = 20 * factor ** 2
    out = export(ExportConfig(run=str(run), format=fmt, out=str(tmp_path / fmt)))
    assert out == (tmp_path / fmt).resolve() and not list(tmp_path.glob("*.tmp-*"))

    manifest = json.loads((out / "manifest.json").read_text())
    results = json.loads((run / "results.json").read_text())
    data_manifest = json.loads((Path(manifest["dataset"]["manifest"])).read_text())
    assert manifest["format"] == fmt and manifest["factor"] == factor and manifest["ipc"] == 2
    assert manifest["num_images"] == n and manifest["counts"] == [2 * factor ** 2] * 10
    assert manifest["class_names"] == NAMES and manifest["real_counts"] == [30, 23, 17, 13, 10, 8, 6, 5, 3, 3]
    assert manifest["config_hash"] == results["config_hash"] and manifest["config_hash_from"] == "results.json"
    assert manifest["git_commit"] == results["git_commit"]
    assert manifest["dataset"]["train_ids_hash"] == data_manifest["train"]["ids_hash"]
    assert manifest["mean"] == blob["mean"] and manifest["std"] == blob["std"] and manifest["soft_labels"] is None
    assert manifest["shape"] == [1, 28, 28] and 0 <= manifest["clipped_fraction"] <= 1

    expect_u8 = unit_pixels(images, blob) * 255  # [N, 1, H, W] before rounding
    if fmt == "imagefolder":
        assert manifest["class_dirs"][0] == "000_T-shirt_top" and manifest["class_dirs"][9] == "009_Ankle_boot"
        for c, d in enumerate(manifest["class_dirs"]):
            pngs = sorted((out / d).glob("*.png"))
            assert len(pngs) == 2 * factor ** 2
            assert all(labels[int(p.stem)] == c for p in pngs)
        first = sorted((out / "001_Trouser").glob("*.png"))[0]
        pixels = torch.from_numpy(np.asarray(Image.open(first), dtype=np.float32))
        assert (pixels - expect_u8[int(first.stem), 0]).abs().max() <= 0.5 + 1e-3
    elif fmt == "webdataset":
        assert manifest["shards"] == ["distilled-000000.tar"]
        samples = list(wds.WebDataset(str(out / "distilled-000000.tar"), shardshuffle=False, empty_check=False))
        assert sorted(s["__key__"] for s in samples) == [f"{i:09d}" for i in range(n)]
        assert {k for s in samples for k in s if not k.startswith("__")} == {"png", "cls", "id"}
        assert all(int(s["cls"]) == labels[int(s["__key__"])] for s in samples)
        assert [int(s["__key__"]) for s in samples] != list(range(n))  # classes mixed, as data_prep's shards
    else:
        with np.load(out / "distilled.npz") as z:
            assert set(z.files) == {"images", "labels"}
            assert z["images"].dtype == np.uint8 and z["images"].shape == (n, 28, 28, 1)
            assert z["labels"].dtype == np.int64 and z["labels"].tolist() == labels.tolist()
            assert np.abs(z["images"][..., 0] - expect_u8[:, 0].numpy()).max() <= 0.5 + 1e-3

    ds = load_distilled(out)
    assert len(ds) == n and ds.label_kind == "hard" and ds.soft_labels is None
    assert torch.equal(ds.labels, labels) and ds.labels.dtype == torch.int64
    assert ds.class_names == NAMES and ds.num_classes == 10 and ds.factor == factor
    assert ds.mean == blob["mean"] and ds.std == blob["std"]
    assert_same_up_to_uint8(ds.images, images, blob)
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and int(y) == int(labels[3])
    inner = out / ("distilled.npz" if fmt == "npz" else "distilled-000000.tar" if fmt == "webdataset" else
                   "manifest.json")
    assert torch.equal(load_distilled(inner).images, ds.images)  # a file of the export reads the whole export


@pytest.mark.parametrize("factor", [1, 2])
def test_load_a_run_gives_what_the_evaluation_trains_on(runs, factor):
    images, labels, blob = reference(runs[factor])
    for path in (runs[factor], runs[factor] / "distilled.pt"):
        ds = load_distilled(path)
        assert torch.equal(ds.images, images) and torch.equal(ds.labels, labels)
        assert len(ds) == 20 * factor ** 2 and ds.factor == factor and ds.class_names == NAMES
        assert ds.mean == blob["mean"] and ds.std == blob["std"] and ds.num_classes == 10


def test_train_one_epoch_on_a_loaded_export(runs, tmp_path):
    out = export(ExportConfig(run=str(runs[2]), format="imagefolder", out=str(tmp_path / "x")))
    ds = load_distilled(out)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
                              torch.nn.Flatten(), torch.nn.Linear(64, ds.num_classes))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    seen, losses = 0, []
    for x, y in DataLoader(ds, batch_size=16, shuffle=True):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen, losses = seen + len(y), losses + [loss.item()]
    assert seen == 80 and len(losses) == 5 and all(np.isfinite(losses))


TEACHER = {"path": "/teachers/t.pt", "sha256": "ab" * 32}


def soft_run(runs, folder: Path, soft, temperature=2.0) -> Path:
    """A distilled.pt of the factor-2 run with soft labels added as a soft-label run stores them (with the teacher
    that made them and the prior adjustment), alone in `folder`."""
    blob = torch.load(runs[2] / "distilled.pt", weights_only=False)
    blob.update(soft_labels=soft, teacher=TEACHER, prior_adjust=0.5)
    if temperature is not None:
        blob["temperature"] = temperature
    folder.mkdir()
    torch.save(blob, folder / "distilled.pt")
    return folder / "distilled.pt"


def test_soft_labels_round_trip(runs, tmp_path):
    logits = torch.randn(20, 10, generator=torch.Generator().manual_seed(0)) * 3
    pt = soft_run(runs, tmp_path / "soft", logits)
    want = torch.softmax(logits / 2.0, 1).repeat_interleave(4, 0)  # one stored row -> its 4 decoded images
    images, labels, blob = reference(runs[2])
    for path in [pt] + [export(ExportConfig(run=str(pt), format=fmt)) for fmt in FORMATS]:
        ds = load_distilled(path, labels="soft")
        assert ds.label_kind == "soft" and ds.labels.dtype == torch.float32 and ds.labels.shape == (80, 10)
        torch.testing.assert_close(ds.labels, want, rtol=0, atol=1e-6)
        assert torch.equal(ds.hard_labels, labels) and torch.equal(ds[5][1], ds.labels[5])
        assert load_distilled(path).label_kind == "soft"  # auto: soft when the set has them
        hard = load_distilled(path, labels="hard")
        assert hard.label_kind == "hard" and torch.equal(hard.labels, labels)
        if path != pt:
            assert path == pt.resolve().parent / f"export-{json.loads((path / 'manifest.json').read_text())['format']}"
            assert_same_up_to_uint8(ds.images, images, blob)
            manifest = json.loads((path / "manifest.json").read_text())
            assert manifest["soft_labels"] == {"from": "logits", "temperature": 2.0, "stored_as": "probabilities",
                                               "teacher": TEACHER, "prior_adjust": 0.5}  # which teacher labelled it
            # no results.json or run.json beside this distilled.pt: the hash is computed from its config
            assert manifest["config_hash"] == config_hash(to_config(blob["config"]))
            assert manifest["config_hash"] == json.loads((runs[2] / "results.json").read_text())["config_hash"]
            assert manifest["config_hash_from"].startswith("computed")
    with np.load(pt.parent / "export-npz" / "distilled.npz") as z:
        assert set(z.files) == {"images", "labels", "soft_labels"} and z["soft_labels"].dtype == np.float32
    shard = pt.parent / "export-webdataset" / "distilled-000000.tar"
    sample = next(iter(wds.WebDataset(str(shard), shardshuffle=False, empty_check=False).decode()))
    torch.testing.assert_close(torch.from_numpy(sample["soft.npy"]), want[int(sample["__key__"])], rtol=0, atol=1e-6)
    ds = load_distilled(pt.parent / "export-imagefolder", labels="soft")  # soft labels train as they are
    loss = F.cross_entropy(torch.zeros(80, 10, requires_grad=True), ds.labels)
    assert torch.isfinite(loss)

    probs = torch.softmax(torch.randn(80, 10, generator=torch.Generator().manual_seed(1)), 1)  # decoded rows, probs
    pt2 = soft_run(runs, tmp_path / "probs", probs, temperature=None)
    ds = load_distilled(export(ExportConfig(run=str(pt2), format="npz")), labels="soft")
    torch.testing.assert_close(ds.labels, probs, rtol=0, atol=1e-6)


def test_missing_distilled_set_is_named(runs, tmp_path):
    for run in (tmp_path / "absent", tmp_path):
        with pytest.raises(UserError, match=r"no distilled set: .*distilled\.pt is written by a finished distill"):
            export(ExportConfig(run=str(run), format="npz"))
    with pytest.raises(UserError, match="neither a distilled.pt nor an export"):
        load_distilled(tmp_path)
    assert not any(tmp_path.iterdir())  # nothing was written


def test_a_non_empty_out_is_refused_unless_overwrite(runs, tmp_path):
    out = tmp_path / "out"
    export(ExportConfig(run=str(runs[1]), format="npz", out=str(out)))
    before = (out / "manifest.json").read_text()
    with pytest.raises(UserError, match=r"is not empty; nothing was written\. Pass overwrite=true to move it aside"):
        export(ExportConfig(run=str(runs[1]), format="webdataset", out=str(out)))
    assert (out / "manifest.json").read_text() == before and not (out / "distilled-000000.tar").exists()
    export(ExportConfig(run=str(runs[1]), format="webdataset", out=str(out), overwrite=True))
    aside = list(tmp_path.glob("out.old-*"))
    assert len(aside) == 1 and (aside[0] / "manifest.json").read_text() == before  # moved aside, not deleted
    assert json.loads((out / "manifest.json").read_text())["format"] == "webdataset"
    assert not (out / "distilled.npz").exists()
    (tmp_path / "empty").mkdir()  # an empty folder is used as it is
    export(ExportConfig(run=str(runs[1]), format="npz", out=str(tmp_path / "empty")))


def test_pixels_outside_the_unit_range_are_clipped(runs, tmp_path):
    blob = torch.load(runs[1] / "distilled.pt", weights_only=False)
    blob["images"] = blob["images"] * 4  # de-normalised, many pixels fall below 0 or above 1
    (tmp_path / "wide").mkdir()
    torch.save(blob, tmp_path / "wide" / "distilled.pt")
    out = export(ExportConfig(run=str(tmp_path / "wide"), format="npz"))
    m, s = blob["mean"][0], blob["std"][0]
    unit = blob["images"][:, 0] * s + m
    outside = float(((unit < 0) | (unit > 1)).float().mean())
    assert 0.05 < outside < 1
    assert json.loads((out / "manifest.json").read_text())["clipped_fraction"] == pytest.approx(outside)
    with np.load(out / "distilled.npz") as z:
        assert np.abs(z["images"][..., 0] - unit.clamp(0, 1).numpy() * 255).max() <= 0.5 + 1e-3
    assert_same_up_to_uint8(load_distilled(out).images, blob["images"], blob)


def test_out_may_not_hold_the_set_itself(runs, tmp_path):
    for out in (runs[1], runs[1].parent):
        with pytest.raises(UserError, match="holds the distilled set being exported"):
            export(ExportConfig(run=str(runs[1]), format="npz", out=str(out), overwrite=True))
    assert (runs[1] / "distilled.pt").is_file()


def test_soft_labels_requested_on_a_hard_only_set(runs, tmp_path):
    out = export(ExportConfig(run=str(runs[1]), format="npz", out=str(tmp_path / "npz")))
    for path in (runs[1], out):
        with pytest.raises(UserError, match="labels='soft' but .* has hard labels only"):
            load_distilled(path, labels="soft")
    with pytest.raises(UserError, match="labels='soft_ish' is not one of"):
        load_distilled(out, labels="soft_ish")
    pt = soft_run(runs, tmp_path / "no-temperature", torch.randn(20, 10), temperature=None)
    with pytest.raises(UserError, match="soft_labels are logits .* no temperature"):
        load_distilled(pt)
    pt = soft_run(runs, tmp_path / "bad-shape", torch.rand(7, 10))
    with pytest.raises(UserError, match=r"soft_labels has shape \[7, 10\]"):
        export(ExportConfig(run=str(pt), format="npz"))


def test_config_is_validated_and_unknown_keys_refused(runs):
    with pytest.raises(ConfigError, match="invalid config `format`"):
        to_export_config(compose_cfg([f"run={runs[1]}", "format=png"], name="export"))
    with pytest.raises(ConfigError, match="invalid config `run`: missing"):
        to_export_config(compose_cfg(["format=npz"], name="export"))
    with pytest.raises(ConfigError, match=r"unknown config key `ovewrite` \(did you mean `overwrite`\?\)"):
        to_export_config(compose_cfg([f"run={runs[1]}", "format=npz", "+ovewrite=true"], name="export"))
    cfg = to_export_config(compose_cfg([f"run={runs[1]}", "format=webdataset", "samples_per_shard=7"], name="export"))
    assert cfg.samples_per_shard == 7 and cfg.out is None and cfg.overwrite is False


def test_folder_names_are_safe_distinct_and_sort_in_label_order():
    names = folder_names(["T-shirt/top", "T-shirt top", "t-shirt_top", "..", "a:b"])
    assert names == ["000_T-shirt_top", "001_T-shirt_top", "002_t-shirt_top", "003_class", "004_a_b"]
    many = folder_names([f"c{k}" for k in range(1200)])
    assert sorted(many) == many and many[-1] == "1199_c1199"


def test_command_line_prints_a_snippet_that_loads(runs, tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "csdm_dist.export", f"run={runs[2]}", "format=webdataset", f"out={out}",
           "samples_per_shard=30"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"wrote 80 images (10 classes, factor 2, hard labels) as webdataset to {out}" in done.stdout
    assert [p.name for p in sorted(out.glob("*.tar"))] == [f"distilled-00000{k}.tar" for k in range(3)]
    lines = done.stdout.strip().splitlines()[-3:]
    scope: dict = {}
    exec("\n".join(lines), scope)  # the three printed lines, as a user would paste them
    assert sum(len(y) for _, y in scope["loader"]) == 80
    assert not (tmp_path / "outputs").exists() and not (out / ".hydra").exists()

    bad = subprocess.run([sys.executable, "-m", "csdm_dist.export", f"run={tmp_path / 'nope'}", "format=npz"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert bad.returncode == EXIT_INPUT and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: no distilled set:"), bad.stderr


def test_torchvision_imagefolder_reads_an_export_with_our_labels(runs, tmp_path):
    """The folders sort in label order: torchvision's ImageFolder gives every image the label we gave it."""
    from torchvision.datasets import ImageFolder

    out = export(ExportConfig(run=str(runs[2]), format="imagefolder", out=str(tmp_path / "tv")))
    ours, theirs = load_distilled(out, labels="hard"), ImageFolder(str(out))
    assert len(theirs) == len(ours)
    assert sorted(theirs.targets) == sorted(int(y) for _, y in ours)
    assert all(int(Path(p).parent.name.split("_")[0]) == y for p, y in theirs.samples)
