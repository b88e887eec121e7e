"""data_prep.build: build -> read round trip, manifest, atomicity, idempotence and verified reuse, class order, the
val split, the Hydra entry point and configs."""
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import data_prep.build as build
from csdm_dist.config import ConfigError, DataConfig, register_configs
from csdm_dist.data.longtail import index_hash, longtail_counts, relabel, select_longtail, select_val
from csdm_dist.data.manifest import eval_split
from csdm_dist.data.shards import ShardError, dataset_dir, encode_png, load_manifest, read_split
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


def test_forced_rebuild_keeps_what_the_build_did_not_write(fashion, caplog):
    """Pools, teachers and feature shards live in the dataset folder by default; force=true (the fix a damaged
    shard's message gives) must not delete them with the old shards."""
    path = build.build_dataset(fashion)
    (path / "teachers").mkdir()
    (path / "teachers" / "t.pt").write_bytes(b"teacher")
    (path / "pools").mkdir()
    (path / "pools" / "p.pt").write_bytes(b"pool")
    (path / "notes.txt").write_text("mine")
    (path / "train-000000.tar").write_bytes(b"damaged")
    (path / "train-000099.tar").write_bytes(b"a shard the new build does not write")
    with caplog.at_level("INFO"):
        assert build.build_dataset(fashion, force=True) == path
    assert (path / "teachers" / "t.pt").read_bytes() == b"teacher" and (path / "pools" / "p.pt").read_bytes() == b"pool"
    assert (path / "notes.txt").read_text() == "mine"
    assert not (path / "train-000099.tar").exists()  # the old build's own files are not carried over
    assert "kept notes.txt, pools, teachers" in caplog.text and "were made from the previous build" not in caplog.text
    build.build_dataset(fashion)  # the new shards verify
    changed = fake_config("fashion_mnist", fashion.raw_root, fashion.data_root, imbalance_factor=6.0, seed=3,
                          samples_per_shard=7)  # same folder, other shards
    caplog.clear()
    with caplog.at_level("INFO"):
        build.build_dataset(changed, force=True)
    assert (path / "teachers" / "t.pt").is_file() and "were made from the previous build" in caplog.text
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
           f"dataset.data_root={tmp_path}/data", "dataset.imbalance_factor=3", "dataset.n_max=null",
           "dataset.val_per_class=0"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Trouser" in run.stdout + run.stderr  # per-class counts are logged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "raw"]
    m = load_manifest(tmp_path / "data" / "fashion_mnist_lt-if3-seed0")
    assert m["train"]["counts"] == longtail_counts(3, 10, 3.0)
    # the manifest records the exact command (the YAML name from Hydra; keys that differ from the YAML's values)
    assert m["build_overrides"] == ["dataset=fashion_mnist_lt", "dataset.imbalance_factor=3", "dataset.n_max=null",
                                    "dataset.val_per_class=0", f"dataset.data_root={tmp_path}/data",
                                    f"dataset.raw_root={tmp_path}/raw"]


def _compose_data(overrides) -> DataConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="build", overrides=overrides)
    assert cfg.force is False
    data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), cfg.dataset))
    assert isinstance(data, DataConfig)
    return data


@pytest.mark.parametrize("name", ["fashion_mnist_lt", "fashion_mnist_lt_hardtail", "cifar10_lt", "cifar100_lt",
                                  "tiny_imagenet_lt", "imagenet_lt"])
def test_dataset_configs_validate(name):
    data = _compose_data([f"dataset={name}"])
    assert data.name == name and len(data.mean) == data.channels


def test_fashion_mnist_configs_have_a_val_split_and_the_hardtail_order():
    plain, hard = _compose_data(["dataset=fashion_mnist_lt"]), _compose_data(["dataset=fashion_mnist_lt_hardtail"])
    assert (plain.n_max, plain.val_per_class, plain.class_order) == (5000, 500, None)
    assert hard.class_order == [8, 1, 5, 7, 9, 3, 0, 4, 2, 6] and (hard.n_max, hard.val_per_class) == (5000, 500)
    assert hard.raw_root == plain.raw_root and hard.mean == plain.mean
    assert dataset_dir(hard).name.startswith("fashion_mnist_lt_hardtail-if100-seed0-order")


# ---------------------------------------------------------------------------------------------------- class order

ORDER = [3, 0, 9, 1, 8, 2, 7, 4, 6, 5]


def test_class_order_relabels_every_split(fashion):
    cfg = fake_config("fashion_mnist", fashion.raw_root, fashion.data_root, imbalance_factor=6.0, seed=3,
                      class_order=ORDER, n_max=10, val_per_class=2)
    path = build.build_dataset(cfg)
    assert path.name.startswith("fake_fashion_mnist-if6-seed3-order") and path != dataset_dir(fashion)
    m = load_manifest(path, cfg)
    raw = load_source(cfg, "train")
    assert m["class_order"] == ORDER and m["class_names"] == [raw.class_names[r] for r in ORDER]
    counts = longtail_counts(10, 10, 6.0)
    assert m["train"]["counts"] == counts  # label 0 (raw class 3) is the head
    new = np.array([ORDER.index(r) for r in raw.labels])
    idx = select_longtail(new, counts, seed=3)
    assert m["train"]["index_hash"] == index_hash(idx)
    data = read_split(path, "train", cfg=cfg)
    order = torch.argsort(data.ids)
    assert torch.equal(data.labels[order], torch.from_numpy(new[idx]))
    assert torch.equal(data.images[order], torch.from_numpy(raw.images[idx]).permute(0, 3, 1, 2))
    raw_test = load_source(cfg, "test")
    test = read_split(path, "test", cfg=cfg)
    assert torch.equal(test.labels[torch.argsort(test.ids)], torch.from_numpy(relabel(raw_test.labels, ORDER)))
    val = read_split(path, "val", cfg=cfg)
    val_idx = select_val(new, idx, 2, 10, seed=3)
    assert torch.equal(val.labels[torch.argsort(val.ids)], torch.from_numpy(new[val_idx]))


def test_class_order_enters_the_hash_only_when_not_natural(fashion):
    def old_hash(cfg):  # config_hash before class_order and val_per_class existed: natural builds must keep it
        fields = {"format": 1, "name": cfg.name, "source": cfg.source, "num_classes": cfg.num_classes,
                  "channels": cfg.channels, "image_size": cfg.image_size, "seed": cfg.seed,
                  "samples_per_shard": cfg.samples_per_shard, "imbalance_factor": float(cfg.imbalance_factor),
                  "n_max": cfg.n_max}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    natural = fake_config("fashion_mnist", "r", "d", class_order=list(range(10)))
    assert build.config_hash(natural) == build.config_hash(fake_config("fashion_mnist", "r", "d")) == old_hash(natural)
    assert dataset_dir(natural) == dataset_dir(fake_config("fashion_mnist", "r", "d"))
    a, b = (fake_config("fashion_mnist", "r", "d", class_order=o) for o in (ORDER, ORDER[::-1]))
    assert len({build.config_hash(a), build.config_hash(b), old_hash(natural)}) == 3
    assert len({dataset_dir(a), dataset_dir(b), dataset_dir(natural)}) == 3
    assert dataset_dir(a) == dataset_dir(fake_config("fashion_mnist", "r", "d", class_order=list(ORDER)))  # stable
    with_val = fake_config("fashion_mnist", "r", "d", val_per_class=5)
    assert build.config_hash(with_val) != old_hash(natural)
    assert build.config_hash(fake_config("fashion_mnist", "r", "d", val_per_class=0)) == old_hash(natural)


@pytest.mark.parametrize("order", [[0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7, 8, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
def test_class_order_must_be_a_permutation(order):
    with pytest.raises(ConfigError, match=r"dataset\.class_order.*permutation"):
        fake_config("fashion_mnist", "r", "d", class_order=order)


def test_imagenet_lt_refuses_class_order_and_val():
    kw = dict(num_classes=3, image_size=8, split_lists="lists")
    with pytest.raises(ConfigError, match=r"dataset\.class_order"):
        fake_config("imagenet_lt", "r", "d", class_order=[2, 1, 0], **kw)
    with pytest.raises(ConfigError, match=r"dataset\.val_per_class"):
        fake_config("imagenet_lt", "r", "d", val_per_class=2, **kw)
    with pytest.raises(ConfigError, match=r"dataset\.val_per_class"):
        fake_config("fashion_mnist", "r", "d", val_per_class=-1)


# ---------------------------------------------------------------------------------------------------- val split

def test_val_split_is_balanced_disjoint_and_pinned(fashion):
    cfg = fake_config("fashion_mnist", fashion.raw_root, fashion.data_root, imbalance_factor=6.0, seed=3,
                      n_max=9, val_per_class=3)
    path = build.build_dataset(cfg)
    m = load_manifest(path, cfg)
    counts = longtail_counts(9, 10, 6.0)
    raw = load_source(cfg, "train")
    train_idx = select_longtail(raw.labels, counts, seed=3)
    val_idx = select_val(raw.labels, train_idx, 3, 10, seed=3)
    assert not set(val_idx) & set(train_idx)
    assert m["val"]["counts"] == [3] * 10 and m["val"]["num_samples"] == 30 and m["val_per_class"] == 3
    assert m["val"]["shards"] == ["val-000000.tar", "val-000001.tar"] and m["val"]["shard_sizes"] == [16, 14]
    assert m["val"]["index_hash"] == index_hash(val_idx) and m["train"]["index_hash"] == index_hash(train_idx)
    val = read_split(path, "val", cfg=cfg)
    order = torch.argsort(val.ids)
    assert torch.equal(val.images[order], torch.from_numpy(raw.images[val_idx]).permute(0, 3, 1, 2))
    assert torch.equal(val.labels[order], torch.from_numpy(raw.labels[val_idx]))
    assert eval_split(m, "tune") == "val" and eval_split(m, "report") == "test"
    # another seed draws another val split; without val_per_class there is none to tune on
    assert not np.array_equal(select_val(raw.labels, train_idx, 3, 10, seed=4), val_idx)
    elsewhere = fake_config("fashion_mnist", fashion.raw_root, Path(fashion.data_root) / "plain",
                            imbalance_factor=6.0, seed=3)  # the same folder name: another data root
    plain = load_manifest(build.build_dataset(elsewhere))
    assert "val" not in plain
    with pytest.raises(ConfigError, match=r"dataset\.val_per_class.*no|without a val split"):
        eval_split(plain, "tune")
    with pytest.raises(KeyError, match="val_per_class"):
        read_split(dataset_dir(elsewhere), "val")


def test_val_split_too_large_names_the_class(fashion):
    cfg = fake_config("fashion_mnist", fashion.raw_root, fashion.data_root, imbalance_factor=6.0, n_max=10,
                      val_per_class=3)
    with pytest.raises(ValueError, match=r"class 0 \(T-shirt/top\) has 2 raw training images left.*took 10.*"
                                         r"dataset\.val_per_class=3.*smaller dataset\.val_per_class or dataset\.n_max"):
        build.build_dataset(cfg)
    assert not Path(fashion.data_root).exists()


# ---------------------------------------------------------------------------------------------------- reuse checks

def _damage_message(cfg) -> str:
    return re.escape(f"dataset.data_root={cfg.data_root}") + r".*force=true"


@pytest.mark.parametrize("damage", ["missing", "truncated", "short", "manifest_cut", "count_edited", "sizes_edited",
                                    "relabelled"])
def test_reuse_verifies_the_build(fashion, damage):
    path = build.build_dataset(fashion)
    shard = path / "train-000001.tar"
    manifest = path / "manifest.json"
    if damage == "missing":
        shard.unlink()
        what = r"shard .*train-000001\.tar is missing"
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:3000])
        what = r"train-000001\.tar (is cut short|holds \d+ samples)"
    elif damage == "short":
        with wds.TarWriter(str(shard), encoder=False) as sink:
            sink.write({"__key__": "000000000", "png": encode_png(np.zeros((28, 28, 1), np.uint8)), "cls": b"0",
                        "id": b"0"})
        what = r"train-000001\.tar holds 1 samples, the manifest says 16"
    elif damage == "manifest_cut":
        text = manifest.read_text()
        manifest.write_text(text[: len(text) // 2])
        what = r"manifest\.json is not valid JSON"
    elif damage == "count_edited":
        m = json.loads(manifest.read_text())
        m["train"]["counts"][2] += 1
        manifest.write_text(json.dumps(m))
        what = (rf"{re.escape(str(manifest))} says class 2 \(Pullover\) of the train split has "
                rf"{m['train']['counts'][2]} images but its shards hold {m['train']['counts'][2] - 1}")
    elif damage == "sizes_edited":
        m = json.loads(manifest.read_text())
        m["train"]["counts"][2] += 1
        m["train"]["num_samples"] += 1
        m["train"]["shard_sizes"][-1] += 1
        manifest.write_text(json.dumps(m))
        what = r"holds \d+ samples, the manifest says"
    else:  # one sample's label changed: counts of two classes differ
        m = json.loads(manifest.read_text())
        m["train"]["counts"][0] -= 1
        m["train"]["counts"][1] += 1
        manifest.write_text(json.dumps(m))
        what = r"says class 0 \(T-shirt/top\) of the train split has \d+ images but its shards hold \d+"
    with pytest.raises(ShardError, match=what + ".*" + _damage_message(fashion)):
        build.build_dataset(fashion)
    assert build.build_dataset(fashion, force=True) == path  # the command in the message repairs it
    assert build.build_dataset(fashion) == path


def test_reuse_checks_labels_against_ids_hash(fashion):
    path = build.build_dataset(fashion)
    m = json.loads((path / "manifest.json").read_text())
    m["train"]["ids_hash"] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match=r"\(id, label\) pairs of the train shards do not match the ids_hash"):
        build.build_dataset(fashion)
