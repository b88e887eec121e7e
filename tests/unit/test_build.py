"""data_prep.build: build -> read round trip, manifest, atomicity, idempotence, the Hydra entry point and configs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import data_prep.build as build
from csdm_dist.config import DataConfig, register_configs
from csdm_dist.data.longtail import index_hash, longtail_counts, select_longtail
from csdm_dist.data.shards import load_manifest, read_split
from csdm_dist.data.sources import load_source
from fakes import fake_config, write_fake_fashion_mnist, write_fake_imagenet_lt

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fashion(tmp_path):
    write_fake_fashion_mnist(tmp_path / "raw", n_per_class=12, num_classes=10, seed=0)
    return fake_config("fashion_mnist", tmp_path / "raw", tmp_path / "data", imbalance_factor=6.0,
                       samples_per_shard=16, seed=3)


def test_build_then_read_reproduces_the_subset(fashion):
    path = build.build_dataset(fashion)
    assert path == Path(fashion.data_root) / "fake_fashion_mnist-if6-seed3"
    m = load_manifest(path)
    counts = longtail_counts(12, 10, 6.0)
    assert m["train"]["counts"] == counts and m["train"]["num_samples"] == sum(counts)
    assert m["test"]["counts"] == [12] * 10 and m["n_max"] == 12 and m["class_names"][1] == "Trouser"
    assert (m["channels"], m["image_size"], m["num_classes"]) == (1, 28, 10)
    assert m["train"]["shards"] == [f"train-{i:06d}.tar" for i in range(-(-sum(counts) // 16))]
    assert sorted(p.name for p in path.iterdir()) == sorted(["manifest.json"] + m["train"]["shards"]
                                                             + m["test"]["shards"])

    raw = load_source(fashion, "train")
    idx = select_longtail(raw.labels, counts, seed=3)
    assert m["train"]["index_hash"] == index_hash(idx)
    data = read_split(path, "train")
    order = torch.argsort(data.ids)
    assert torch.equal(data.images[order], torch.from_numpy(raw.images[idx]).permute(0, 3, 1, 2))
    assert torch.equal(data.labels[order], torch.from_numpy(raw.labels[idx]))
    test = read_split(path, "test")
    raw_test = load_source(fashion, "test")
    assert torch.equal(test.images[torch.argsort(test.ids)], torch.from_numpy(raw_test.images).permute(0, 3, 1, 2))


def test_n_max_from_config(fashion):
    cfg = fake_config("fashion_mnist", fashion.raw_root, fashion.data_root, n_max=8, imbalance_factor=4.0)
    m = load_manifest(build.build_dataset(cfg))
    assert m["train"]["counts"] == longtail_counts(8, 10, 4.0) and m["n_max"] == 8


def test_rebuild_same_config_is_a_no_op(fashion, monkeypatch):
    path = build.build_dataset(fashion)
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("a rebuild of an up-to-date dataset must not read the raw data")

    monkeypatch.setattr(build, "load_source", fail)
    assert build.build_dataset(fashion) == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before


def test_rebuild_with_changed_config_errors_unless_forced(fashion):
    path = build.build_dataset(fashion)
    changed = fake_config("fashion_mnist", fashion.raw_root, fashion.data_root, imbalance_factor=6.0, seed=3,
                          samples_per_shard=7)  # same folder, different shards
    with pytest.raises(FileExistsError, match="delete it or rerun with force=true"):
        build.build_dataset(changed)
    assert build.build_dataset(changed, force=True) == path
    m = load_manifest(path)
    assert m["config_hash"] == build.config_hash(changed) and m["samples_per_shard"] == 7
    assert len(list(path.glob("train-*.tar"))) == len(m["train"]["shards"])  # no shards left from the old build
    assert not [p for p in path.parent.iterdir() if p != path]  # no temp or old folders


def test_failing_build_leaves_nothing_behind(fashion, monkeypatch):
    real = build.write_split

    def write_train_then_fail(out_dir, split, *args, **kwargs):
        if split == "test":
            raise OSError("disk full (simulated)")
        return real(out_dir, split, *args, **kwargs)

    monkeypatch.setattr(build, "write_split", write_train_then_fail)
    with pytest.raises(OSError, match="simulated"):
        build.build_dataset(fashion)
    assert list(Path(fashion.data_root).iterdir()) == []


def test_config_hash_ignores_paths_and_normalisation(fashion):
    moved = fake_config("fashion_mnist", "/elsewhere", fashion.data_root, imbalance_factor=6, seed=3,
                        samples_per_shard=16, mean=[0.3], std=[0.4])
    assert build.config_hash(moved) == build.config_hash(fashion)
    assert build.config_hash(fake_config("fashion_mnist", "r", "d", image_size=32)) != \
        build.config_hash(fake_config("fashion_mnist", "r", "d"))


def test_imagenet_lt_counts_come_from_the_list(tmp_path):
    write_fake_imagenet_lt(tmp_path / "imagenet", tmp_path / "lists", counts=(4, 2, 1), val_per_class=2)
    cfg = fake_config("imagenet_lt", tmp_path / "imagenet", tmp_path / "data", num_classes=3, image_size=8,
                      split_lists=str(tmp_path / "lists"), samples_per_shard=3)
    path = build.build_dataset(cfg)
    assert path == tmp_path / "data" / "fake_imagenet_lt"
    m = load_manifest(path)
    assert m["train"]["counts"] == [4, 2, 1] and m["test"]["counts"] == [2, 2, 2]
    assert m["n_max"] == 4 and m["imbalance_factor"] == 4.0
    data = read_split(path, "train")
    assert np.bincount(data.labels.numpy()).tolist() == [4, 2, 1] and sorted(data.ids.tolist()) == list(range(7))


def test_hydra_entry_point_writes_no_outputs_folder(tmp_path):
    write_fake_fashion_mnist(tmp_path / "raw", n_per_class=3, num_classes=10)
    cmd = [sys.executable, "-m", "data_prep.build", "dataset=fashion_mnist_lt", f"dataset.raw_root={tmp_path}/raw",
           f"dataset.data_root={tmp_path}/data", "dataset.imbalance_factor=3"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Trouser" in run.stdout + run.stderr  # per-class counts are logged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "raw"]
    m = load_manifest(tmp_path / "data" / "fashion_mnist_lt-if3-seed0")
    assert m["train"]["counts"] == longtail_counts(3, 10, 3.0)


@pytest.mark.parametrize("name", ["fashion_mnist_lt", "cifar10_lt", "cifar100_lt", "tiny_imagenet_lt",
                                  "imagenet_lt"])
def test_dataset_configs_validate(name):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="build", overrides=[f"dataset={name}"])
    data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), cfg.dataset))
    assert isinstance(data, DataConfig) and data.name == name and cfg.force is False
    assert len(data.mean) == data.channels
