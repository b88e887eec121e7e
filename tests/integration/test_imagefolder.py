"""source=imagefolder: a folder of class folders (PNG, JPEG, ..., grey and RGB, any size) built into shards with
natural or resampled counts, a held-out or given test split, computed mean/std, clear errors; then distilled.

Run: .venv/bin/python -m pytest tests/integration/test_imagefolder.py -q
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from csdm_dist.config import ConfigError, to_config
from csdm_dist.data.longtail import longtail_counts
from csdm_dist.data.normalization import channel_stats, effective_mean_std
from csdm_dist.data.shards import dataset_dir, load_manifest, read_split
from csdm_dist.data.sources import RawDataError
from data_prep.build import build_dataset
from runs import TINY, compose_cfg, distil

REPO = Path(__file__).resolve().parents[2]
CLASSES = {"cat": 30, "dog": 15, "emu": 8}  # uneven on purpose: a naturally long-tailed folder
SIZES = [(16, 16), (20, 16), (16, 24), (12, 12)]  # (w, h): square, wide, tall, smaller than image_size


def _save(path: Path, k: int, c: int, rng: np.random.Generator) -> None:
    """Image k of class c: its own noise (so no two images are alike) over a class-dependent brightness; the
    size, grey/RGB mode and format cycle with k."""
    w, h = SIZES[k % len(SIZES)]
    grey = k % 3 == 0
    pixels = np.clip(rng.normal(60 + 70 * c, 25, size=(h, w) if grey else (h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if k % 2 == 0 else "JPEG"
    Image.fromarray(pixels).save(path.with_suffix(".png" if fmt == "PNG" else (".JPG" if k % 4 == 1 else ".jpeg")),
                                 format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def write_tree(root: Path, counts: dict[str, int] = CLASSES, split: str = "train", seed: int = 0) -> Path:
    """root/<split>/<class>/<k>.{png,JPG,jpeg} plus files that must be left out: hidden ones and a text file."""
    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(counts.items()):
        for k in range(n):
            _save(root / split / name / f"{k:03d}", k, c, rng)
        (root / split / name / ".DS_Store").write_bytes(b"\x00\x01 not an image")
        (root / split / name / "notes.txt").write_text("ignored: not an image extension")
    hidden = root / split / ".cache"  # a hidden folder is not a class
    hidden.mkdir(exist_ok=True)
    Image.new("RGB", (16, 16)).save(hidden / "x.png")
    return root


def data_overrides(raw: Path, data: Path, *more: str) -> list[str]:
    return ["dataset=imagefolder", f"dataset.raw_root={raw}", f"dataset.data_root={data}", "dataset.num_classes=3",
            "dataset.image_size=16", "dataset.channels=3", "dataset.samples_per_shard=16", *more]


def build(raw: Path, data: Path, *more: str) -> tuple[Path, dict]:
    cfg = to_config(compose_cfg(data_overrides(raw, data, *more))).dataset
    out = build_dataset(cfg)
    return out, load_manifest(out, cfg)


def image_keys(split) -> list[bytes]:
    """A digest per image of a split read from its shards: every written image is distinct noise."""
    return [hashlib.sha256(x.numpy().tobytes()).digest() for x in split.images]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("folder") / "raw")


@pytest.fixture(scope="module")
def natural(raw, tmp_path_factory) -> tuple[Path, dict]:
    """Natural counts (imbalance_factor null), 3 test images per class held out of train/."""
    return build(raw, tmp_path_factory.mktemp("data"), "dataset.test_per_class=3")


def test_natural_counts_class_names_and_folder_name(natural):
    out, m = natural
    assert m["class_names"] == sorted(CLASSES) and m["counts_from"] == "natural" and m["test_from"] == "held out"
    assert m["train"]["counts"] == [n - 3 for n in CLASSES.values()]  # every image but the held-out ones
    assert m["test"]["counts"] == [3, 3, 3]
    assert m["imbalance_factor"] == max(m["train"]["counts"]) / min(m["train"]["counts"])
    assert out.name == "imagefolder-ifnatural-seed0"
    command = m["build_overrides"]  # the exact rebuild command, null included
    assert command[0] == "dataset=imagefolder" and "dataset.imbalance_factor=null" in command
    train = read_split(out, "train")
    assert train.images.shape[1:] == (3, 16, 16) and np.bincount(train.labels.numpy()).tolist() == m["train"]["counts"]


def test_mean_std_computed_on_the_training_split_and_recorded(natural):
    out, m = natural
    train = read_split(out, "train")
    x = train.images.double() / 255
    assert np.allclose(m["mean"], x.mean((0, 2, 3)).tolist(), atol=1e-9)
    assert np.allclose(m["std"], x.std((0, 2, 3), unbiased=False).tolist(), atol=1e-9)
    test = read_split(out, "test").images.double() / 255  # not the test split's
    assert not np.allclose(m["mean"], test.mean((0, 2, 3)).tolist(), atol=1e-4)
    cfg = to_config(compose_cfg(data_overrides("r", "d", "dataset.test_per_class=3"))).dataset
    assert cfg.mean == [] and effective_mean_std(cfg, m, out) == (m["mean"], m["std"])
    given = to_config(compose_cfg(data_overrides("r", "d", "dataset.mean=[0.5,0.5,0.5]",
                                                 "dataset.std=[0.2,0.2,0.2]"))).dataset
    assert effective_mean_std(given, m, out) == ([0.5] * 3, [0.2] * 3)  # the config's win when given


def test_channel_stats_is_exact_and_chunk_free():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(7, 5, 4, 3), dtype=np.uint8)
    mean, std = channel_stats(images, np.array([0, 2, 5]))
    flat = images[[0, 2, 5]].reshape(-1, 3) / 255
    assert np.allclose(mean, flat.mean(0)) and np.allclose(std, flat.std(0))


def test_held_out_test_split_is_balanced_disjoint_and_pinned(raw, natural, tmp_path):
    out, m = natural
    train, test = image_keys(read_split(out, "train")), image_keys(read_split(out, "test"))
    assert len(set(train)) == len(train) and not set(train) & set(test)
    assert len(train) + len(test) == sum(CLASSES.values())  # natural: every readable image is in one of them
    again, _ = build(raw, tmp_path / "again", "dataset.test_per_class=3")
    assert sorted(image_keys(read_split(again, "test"))) == sorted(test)  # the same seed: the same images
    other, _ = build(raw, tmp_path / "other", "dataset.test_per_class=3", "dataset.seed=1")
    assert sorted(image_keys(read_split(other, "test"))) != sorted(test)


def test_resampled_counts_and_val_never_hold_test_images(raw, tmp_path):
    out, m = build(raw, tmp_path / "a", "dataset.test_per_class=2", "dataset.imbalance_factor=5")
    left = [n - 2 for n in CLASSES.values()]  # the draw sees only what the held-out test split left
    assert m["counts_from"] == "formula" and m["train"]["counts"] == longtail_counts(max(left), 3, 5.0)
    assert m["train"]["counts"] != left and m["n_max"] == max(left) and out.name == "imagefolder-if5-seed0"
    out, m = build(raw, tmp_path / "b", "dataset.test_per_class=2", "dataset.imbalance_factor=5", "dataset.n_max=20",
                   "dataset.val_per_class=2")
    assert m["train"]["counts"] == longtail_counts(20, 3, 5.0)
    assert m["val"]["counts"] == [2, 2, 2] and m["test"]["counts"] == [2, 2, 2]
    keys = {s: set(image_keys(read_split(out, s))) for s in ("train", "val", "test")}
    assert not keys["train"] & keys["test"] and not keys["val"] & keys["test"] and not keys["train"] & keys["val"]


def test_another_folder_under_the_same_name_is_not_reused(natural, tmp_path):
    out, _ = natural
    other = write_tree(tmp_path / "other", seed=3)
    with pytest.raises(FileExistsError, match="not built from this dataset config"):
        build(other, out.parent, "dataset.test_per_class=3")


def test_a_test_folder_is_the_test_split(tmp_path):
    raw = write_tree(tmp_path / "raw")
    write_tree(raw, {"cat": 4, "dog": 3, "emu": 2}, split="test", seed=5)
    out, m = build(raw, tmp_path / "data")
    assert m["test_from"] == "test split" and m["test"]["counts"] == [4, 3, 2]
    assert m["train"]["counts"] == list(CLASSES.values())
    with pytest.raises(ConfigError, match="test_per_class=0"):
        build(raw, tmp_path / "data2", "dataset.test_per_class=2")


def test_test_folder_with_other_classes_is_refused(tmp_path):
    raw = write_tree(tmp_path / "raw")
    write_tree(raw, {"cat": 2, "dog": 2, "yak": 2}, split="test")
    with pytest.raises(RawDataError, match=r"missing in test/: emu.*not in train/: yak"):
        build(raw, tmp_path / "data")


def test_no_test_folder_needs_test_per_class(raw, tmp_path):
    with pytest.raises(ConfigError, match=r"dataset\.test_per_class=N.*add .*test"):
        build(raw, tmp_path)
    with pytest.raises(ValueError, match=r"class 2 \(emu\) has 8 training images.*test_per_class=8"):
        build(raw, tmp_path, "dataset.test_per_class=8")


def test_wrong_num_classes_says_what_was_found(raw, tmp_path):
    with pytest.raises(ConfigError, match=r"3 class folders \(cat, dog, emu\); set dataset\.num_classes=3"):
        build(raw, tmp_path, "dataset.test_per_class=2", "dataset.num_classes=5")


def test_corrupt_file_is_named_or_skipped_and_counted(tmp_path, caplog):
    raw = write_tree(tmp_path / "raw")
    bad = raw / "train" / "dog" / "broken.png"
    bad.write_bytes(b"this is not a png")
    cut = raw / "train" / "cat" / "cut.jpg"
    data = (raw / "train" / "cat" / "001.JPG").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(RawDataError, match=r"broken\.png.*skip_bad_files=true|cut\.jpg.*skip_bad_files=true"):
        build(raw, tmp_path / "data", "dataset.test_per_class=2")
    assert not (tmp_path / "data").exists()  # refused before anything was written
    with caplog.at_level(logging.WARNING, logger="csdm_dist.data.sources"):
        out, m = build(raw, tmp_path / "data", "dataset.test_per_class=2", "dataset.skip_bad_files=true")
    warned = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warned) == 1 and "skipped 2 unreadable" in warned[0]
    assert str(bad) in warned[0] and str(cut) in warned[0]
    assert m["train"]["counts"] == [n - 2 for n in CLASSES.values()]  # the two bad files are in no split
    assert m["config_fields"]["skip_bad_files"] is True


def test_empty_class_folder_is_named(tmp_path):
    raw = write_tree(tmp_path / "raw")
    (raw / "train" / "fox").mkdir()
    (raw / "train" / "fox" / "readme.txt").write_text("no images here")
    with pytest.raises(RawDataError, match=r"train/fox holds no image files"):
        build(raw, tmp_path / "data", "dataset.test_per_class=2", "dataset.num_classes=4")
    for f in (raw / "train" / "fox").iterdir():
        f.unlink()
    (raw / "train" / "fox" / "bad.png").write_bytes(b"junk")
    with pytest.raises(RawDataError, match=r"train/fox hold no readable image after skipping"):
        build(raw, tmp_path / "data", "dataset.test_per_class=2", "dataset.num_classes=4",
              "dataset.skip_bad_files=true")


def test_grey_build(raw, tmp_path):
    out, m = build(raw, tmp_path, "dataset.test_per_class=2", "dataset.channels=1")
    assert read_split(out, "train").images.shape[1:] == (1, 16, 16) and len(m["mean"]) == len(m["std"]) == 1


def test_config_checks():
    with pytest.raises(ConfigError, match=r"dataset\.mean/std"):  # only an image folder may leave them empty
        to_config(compose_cfg(["dataset.mean=[]", "dataset.std=[]"]))
    with pytest.raises(ConfigError, match=r"dataset\.n_max"):
        to_config(compose_cfg(data_overrides("r", "d", "dataset.n_max=10")))
    with pytest.raises(ConfigError, match=r"dataset\.val_per_class"):
        to_config(compose_cfg(data_overrides("r", "d", "dataset.val_per_class=2")))
    with pytest.raises(ConfigError, match=r"dataset\.test_per_class"):
        to_config(compose_cfg(["dataset.test_per_class=5"]))
    with pytest.raises(ConfigError, match=r"dataset\.skip_bad_files"):
        to_config(compose_cfg(["dataset.skip_bad_files=true"]))


def test_distil_an_image_folder(raw, natural, tmp_path):
    out, m = natural
    over = data_overrides(raw, out.parent, "dataset.test_per_class=3") + TINY + ["distill.iterations=3",
                                                                                  f"out_dir={tmp_path / 'run'}"]
    cfg, res = distil(over)
    assert cfg.dataset.mean == m["mean"] and cfg.dataset.std == m["std"]  # resolved once, at start-up
    assert res["class_counts"] == m["train"]["counts"] and res["timing"]["steps"] == 3
    assert res["class_names"] == m["class_names"]  # the folder names, in the long-tailed order: tables name them
    assert 0 <= res["accuracy"]["mean"] <= 100 and len(res["accuracy"]["per_class"]) == 3
    blob = torch.load(tmp_path / "run" / "distilled.pt", weights_only=False)
    assert blob["mean"] == m["mean"] and blob["images"].shape == (6, 3, 16, 16)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["config"]["dataset"]["mean"] == m["mean"] and saved["config"]["dataset"]["imbalance_factor"] is None
    default = to_config(compose_cfg(data_overrides(raw, out.parent, "dataset.test_per_class=3") + TINY))
    assert "-ifnatural-" in Path(default.out_dir).name and dataset_dir(default.dataset) == out
    _, again = distil(over)  # the same command finds the finished run: the resolved config hashes the same
    assert again["accuracy"] == res["accuracy"]


def test_the_documented_command_builds(tmp_path):
    """configs/dataset/imagefolder.yaml's example command, through the Hydra entry point."""
    raw = write_tree(tmp_path / "raw", {"a": 5, "b": 3})
    cmd = [sys.executable, "-m", "data_prep.build", "dataset=imagefolder", f"dataset.raw_root={raw}",
           "dataset.num_classes=2", "dataset.image_size=16", "dataset.channels=3", "dataset.test_per_class=1",
           f"dataset.data_root={tmp_path / 'data'}"]
    run = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    m = load_manifest(tmp_path / "data" / "imagefolder-ifnatural-seed0")
    assert m["class_names"] == ["a", "b"] and m["train"]["counts"] == [4, 2] and m["test"]["counts"] == [1, 1]
    assert "ignored 2 file(s)" in run.stdout + run.stderr  # the two notes.txt, named in a warning
