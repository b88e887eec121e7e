"""WebDataset shards: exact round trip, rank splitting that covers every sample once, and clear errors."""
import json

import numpy as np
import pytest
import torch
import webdataset as wds

from csdm_dist.data.shards import (MANIFEST, ShardError, dataset_dir, encode_png, load_manifest, read_split,
                                   shard_sizes, write_split)
from fakes import fake_config


def _make(tmp_path, n=25, channels=1, size=8, num_classes=3, per_shard=10, seed=0):
    """Write a train split of random images plus a minimal manifest; return (images, labels) indexed by id."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
    labels = np.arange(n) % num_classes
    shards = write_split(tmp_path, "train", images, labels, np.arange(n), per_shard, seed=1)
    manifest = {"name": "toy", "channels": channels, "image_size": size,
                "class_names": [f"c{i}" for i in range(num_classes)],
                "train": {"num_samples": n, "shards": shards, "shard_sizes": shard_sizes(n, per_shard)}}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    return images, labels


@pytest.mark.parametrize("channels", [1, 3])
def test_round_trip_is_exact(tmp_path, channels):
    images, labels = _make(tmp_path, n=25, channels=channels, per_shard=10)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar", "train-000001.tar",
                                                            "train-000002.tar"]
    data = read_split(tmp_path, "train")
    assert data.images.shape == (25, channels, 8, 8) and data.images.dtype == torch.uint8
    assert data.labels.dtype == torch.int64 and data.ids.dtype == torch.int64
    order = torch.argsort(data.ids)
    assert data.ids[order].tolist() == list(range(25))
    assert torch.equal(data.images[order], torch.from_numpy(images).permute(0, 3, 1, 2))
    assert torch.equal(data.labels[order], torch.from_numpy(labels))
    assert not torch.equal(data.ids, torch.arange(25))  # written in shuffled order: classes mixed


def test_write_order_is_seeded(tmp_path):
    images = np.zeros((12, 8, 8, 1), np.uint8)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    write_split(a, "train", images, np.zeros(12), np.arange(12), 100, seed=5)
    write_split(b, "train", images, np.zeros(12), np.arange(12), 100, seed=5)
    assert (a / "train-000000.tar").read_bytes() == (b / "train-000000.tar").read_bytes()
    keys = [s["__key__"] for s in wds.WebDataset(str(a / "train-000000.tar"), shardshuffle=False)]
    assert keys == [f"{i:09d}" for i in np.random.default_rng(5).permutation(12)]


@pytest.mark.parametrize("num_shards", [2, 3])
def test_ranks_cover_every_id_exactly_once(tmp_path, num_shards):
    _make(tmp_path, n=47, per_shard=5)  # 10 shards
    parts = [read_split(tmp_path, "train", r, num_shards) for r in range(num_shards)]
    ids = torch.cat([p.ids for p in parts]).tolist()
    assert sorted(ids) == list(range(47))
    assert all(len(p.ids) > 0 for p in parts)
    # rank r holds exactly the samples of shards r, r + S, ...
    assert [len(p.ids) for p in parts] == [sum(shard_sizes(47, 5)[r::num_shards]) for r in range(num_shards)]


def test_rank_past_last_shard_is_empty_with_right_shapes(tmp_path):
    _make(tmp_path, n=20, channels=3, size=8, per_shard=10)  # 2 shards, 3 ranks
    parts = [read_split(tmp_path, "train", r, 3) for r in range(3)]
    assert [len(p.ids) for p in parts] == [10, 10, 0]
    assert parts[2].images.shape == (0, 3, 8, 8) and parts[2].images.dtype == torch.uint8
    assert parts[2].labels.shape == (0,) and parts[2].ids.dtype == torch.int64
    with pytest.raises(ValueError, match="shard_rank"):
        read_split(tmp_path, "train", 3, 3)


def test_empty_split(tmp_path):
    _make(tmp_path, n=0)
    data = read_split(tmp_path, "train")
    assert data.images.shape == (0, 1, 8, 8) and data.ids.shape == (0,)


def test_truncated_shard_raises_naming_the_file(tmp_path):
    _make(tmp_path, n=20, per_shard=10)
    shard = tmp_path / "train-000001.tar"
    full = shard.read_bytes()
    shard.write_bytes(full[: len(full) // 2 + 100])  # cut inside a member
    with pytest.raises(ShardError, match=r"train-000001\.tar.*data_prep\.build dataset=toy"):
        read_split(tmp_path, "train")
    shard.write_bytes(full[:512 * 6])  # cut on a member boundary
    with pytest.raises(ShardError, match=r"train-000001\.tar"):
        read_split(tmp_path, "train")
    with wds.TarWriter(str(shard), encoder=False) as sink:  # a well-formed tar with fewer samples than listed
        sink.write({"__key__": "000000000", "png": encode_png(np.zeros((8, 8, 1), np.uint8)), "cls": b"0", "id": b"0"})
    with pytest.raises(ShardError, match=r"train-000001\.tar \(1 of 10\).*fewer samples"):
        read_split(tmp_path, "train")
    # the other rank's shard is intact
    assert len(read_split(tmp_path, "train", 0, 2).ids) == 10


def test_missing_shard_file(tmp_path):
    _make(tmp_path, n=20, per_shard=10)
    (tmp_path / "train-000000.tar").unlink()
    with pytest.raises(ShardError, match=r"train-000000\.tar"):
        read_split(tmp_path, "train")


def _rewrite_shard(tmp_path, sample):
    with wds.TarWriter(str(tmp_path / "train-000000.tar"), encoder=False) as sink:
        sink.write(sample)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["train"].update(num_samples=1, shards=["train-000000.tar"], shard_sizes=[1])
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))


def test_sample_missing_a_field(tmp_path):
    _make(tmp_path, n=5)
    _rewrite_shard(tmp_path, {"__key__": "000000000", "png": encode_png(np.zeros((8, 8, 1), np.uint8)), "cls": b"0"})
    with pytest.raises(ShardError, match=r"train-000000\.tar.*lacks the field\(s\) \['id'\].*rebuild"):
        read_split(tmp_path, "train")


def test_label_outside_the_label_map(tmp_path):
    _make(tmp_path, n=5, num_classes=3)
    _rewrite_shard(tmp_path, {"__key__": "000000000", "png": encode_png(np.zeros((8, 8, 1), np.uint8)),
                              "cls": b"3", "id": b"0"})
    with pytest.raises(ShardError, match=r"label 3, outside the manifest's label map of 3 classes"):
        read_split(tmp_path, "train")


def test_image_shape_differs_from_manifest(tmp_path):
    _make(tmp_path, n=5, channels=1)
    _rewrite_shard(tmp_path, {"__key__": "000000000", "png": encode_png(np.zeros((8, 8, 3), np.uint8)),
                              "cls": b"0", "id": b"0"})
    with pytest.raises(ShardError, match="RGB"):
        read_split(tmp_path, "train")


def test_manifest_and_dataset_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m data_prep.build dataset="):
        load_manifest(tmp_path)
    _make(tmp_path, n=3)
    assert load_manifest(tmp_path)["name"] == "toy"
    with pytest.raises(KeyError, match="'test'"):
        read_split(tmp_path, "test")
    cfg = fake_config("fashion_mnist", "raw", "/d", name="fashion_mnist_lt", imbalance_factor=100.0, seed=2)
    assert str(dataset_dir(cfg)) == "/d/fashion_mnist_lt-if100-seed2"
    assert dataset_dir(fake_config("fashion_mnist", "raw", "/d", imbalance_factor=12.5)).name.endswith("-if12.5-seed0")
    lt = fake_config("imagenet_lt", "raw", "/d", name="imagenet_lt", split_lists="lists")
    assert str(dataset_dir(lt)) == "/d/imagenet_lt"
