"""WebDataset shards: exact round trip, rank splitting that covers every sample once, and clear errors."""
import json
import re

import numpy as np
import pytest
import torch
import webdataset as wds

from csdm_dist.data.manifest import ManifestError, build_command, check_counts, eval_split, ids_hash
from csdm_dist.data.shards import (MANIFEST, ShardError, dataset_dir, encode_png, load_manifest, read_split,
                                   shard_sizes, write_split)
from fakes import fake_config


def _make(tmp_path, n=25, channels=1, size=8, num_classes=3, per_shard=10, seed=0, with_ids_hash=False):
    """Write a train split of random images plus a minimal manifest; return (images, labels) indexed by id."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
    labels = np.arange(n) % num_classes
    shards = write_split(tmp_path, "train", images, labels, np.arange(n), per_shard, seed=1)
    manifest = {"name": "toy", "channels": channels, "image_size": size,
                "class_names": [f"c{i}" for i in range(num_classes)],
                "train": {"counts": np.bincount(labels, minlength=num_classes).tolist(), "num_samples": n,
                          "shards": shards, "shard_sizes": shard_sizes(n, per_shard)}}
    if with_ids_hash:
        manifest["train"]["ids_hash"] = ids_hash(np.arange(n), labels)
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
    counts = [0] * len(manifest["class_names"])
    counts[0] = 1
    manifest["train"].update(counts=counts, num_samples=1, shards=["train-000000.tar"], shard_sizes=[1])
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


def test_dataset_dir_of_a_class_order():
    natural = fake_config("fashion_mnist", "raw", "/d", class_order=list(range(10)))
    assert str(dataset_dir(natural)) == "/d/fake_fashion_mnist-if10-seed0"
    hard = fake_config("fashion_mnist", "raw", "/d", class_order=[1, 8, 5, 9, 7, 3, 2, 4, 0, 6])
    assert re.fullmatch(r"fake_fashion_mnist-if10-seed0-order[0-9a-f]{8}", dataset_dir(hard).name)
    assert dataset_dir(hard) == dataset_dir(fake_config("fashion_mnist", "raw", "/d",
                                                        class_order=[1, 8, 5, 9, 7, 3, 2, 4, 0, 6]))


def test_manifest_cut_in_half_names_the_file_and_the_rebuild(tmp_path):
    _make(tmp_path, n=5)
    text = (tmp_path / MANIFEST).read_text()
    (tmp_path / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(ManifestError, match=rf"{re.escape(str(tmp_path / MANIFEST))} is not valid JSON.*damaged.*"
                                            rf"dataset\.data_root={re.escape(str(tmp_path.parent))} force=true"):
        load_manifest(tmp_path)
    cfg = fake_config("fashion_mnist", "/raw", tmp_path.parent, name="toy")
    with pytest.raises(ManifestError, match=r"not valid JSON.*`python -m data_prep\.build dataset=toy .*"
                                            rf"dataset\.data_root={re.escape(str(tmp_path.parent))} "
                                            r"dataset\.raw_root=/raw force=true`"):
        load_manifest(tmp_path, cfg)
    with pytest.raises(ShardError, match="not valid JSON"):  # ManifestError is a ShardError
        read_split(tmp_path, "train")


def _edit_count(tmp_path, c, delta):
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["train"]["counts"][c] += delta
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))


def test_edited_class_count_is_refused(tmp_path):
    _make(tmp_path, n=25, per_shard=10, num_classes=3)  # counts [9, 8, 8]
    _edit_count(tmp_path, 1, +1)
    path = re.escape(str(tmp_path / MANIFEST))
    with pytest.raises(ManifestError, match=rf"{path} says class 1 \(c1\) of the train split has 9 images but its "
                                            r"shards hold 8.*rebuild with `python -m data_prep\.build dataset=toy"):
        read_split(tmp_path, "train")
    with pytest.raises(ManifestError, match=rf"{path}: the per-class counts of the train split sum to 26 but "
                                            r"num_samples is 25.*rebuild"):
        read_split(tmp_path, "train", 0, 2)  # one rank of two: only the totals can be checked here


def test_check_counts_of_all_reduced_bincounts(tmp_path):
    check_counts([9, 8, 8], torch.tensor([9, 8, 8]), manifest_path=tmp_path / MANIFEST, rebuild="rebuild with X")
    with pytest.raises(ManifestError, match=r"says class 0 of the val split has 9 images but its shards hold 10 "
                                            r"\(and 1 more classes\).*rebuild with X"):
        check_counts([9, 8, 8], np.array([10, 8, 7]), manifest_path=tmp_path / MANIFEST, rebuild="rebuild with X",
                     split="val")
    with pytest.raises(ManifestError, match="counts of 3 classes but the labels read cover 4"):
        check_counts([9, 8, 8], [9, 8, 8, 0], manifest_path=tmp_path / MANIFEST, rebuild="rebuild with X")


def test_swapped_labels_fail_the_ids_hash(tmp_path):
    images, labels = _make(tmp_path, n=12, per_shard=12, num_classes=3, with_ids_hash=True)
    assert len(read_split(tmp_path, "train").ids) == 12
    swapped = labels.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # the per-class counts stay the same
    write_split(tmp_path, "train", images, swapped, np.arange(12), 12, seed=1)
    with pytest.raises(ManifestError, match=r"\(id, label\) pairs of the train shards do not match the ids_hash"):
        read_split(tmp_path, "train")


def test_missing_manifest_gives_the_exact_build_command(tmp_path):
    cfg = fake_config("fashion_mnist", "/raw", tmp_path / "nowhere", name="fashion_mnist_lt", imbalance_factor=10.0,
                      n_max=None, val_per_class=0, samples_per_shard=2000)
    ddir = dataset_dir(cfg)
    command = (f"python -m data_prep.build dataset=fashion_mnist_lt dataset.imbalance_factor=10 dataset.n_max=null "
               f"dataset.val_per_class=0 dataset.data_root={tmp_path / 'nowhere'} dataset.raw_root=/raw")
    with pytest.raises(FileNotFoundError, match=rf"the data root {re.escape(str(tmp_path / 'nowhere'))} does not "
                                                rf"exist.*`{re.escape(command)}`"):
        load_manifest(ddir, cfg)
    (tmp_path / "nowhere").mkdir()
    with pytest.raises(FileNotFoundError, match=rf"no dataset manifest at .*build the dataset first with "
                                                rf"`{re.escape(command)}`"):
        load_manifest(ddir, cfg)
    hard = fake_config("fashion_mnist", "/raw", "d", name="fashion_mnist_lt_hardtail", seed=2, imbalance_factor=10.0,
                       n_max=5000, val_per_class=500, samples_per_shard=2000,
                       class_order=[8, 1, 5, 7, 9, 3, 0, 4, 2, 6])  # the YAML's values but seed and IF
    assert build_command(hard) == ("python -m data_prep.build dataset=fashion_mnist_lt_hardtail "
                                   "dataset.imbalance_factor=10 dataset.seed=2 dataset.data_root=d "
                                   "dataset.raw_root=/raw")
    other = fake_config("fashion_mnist", "/raw", "d", name="fashion_mnist_lt_hardtail", class_order=list(range(10)),
                        n_max=5000, val_per_class=500, samples_per_shard=2000)
    assert " dataset.class_order=null " in build_command(other, "fashion_mnist_lt_hardtail")  # natural order
    assert "dataset.class_order" not in build_command(other, "fashion_mnist_lt")


def test_another_config_is_refused_naming_the_fields(tmp_path):
    from data_prep.build import build_dataset
    from fakes import write_fake_fashion_mnist

    write_fake_fashion_mnist(tmp_path / "raw", n_per_class=6, num_classes=10)
    cfg = fake_config("fashion_mnist", tmp_path / "raw", tmp_path / "data", imbalance_factor=3.0)
    ddir = build_dataset(cfg)
    other = fake_config("fashion_mnist", tmp_path / "raw", tmp_path / "data", imbalance_factor=3.0, n_max=5)
    assert dataset_dir(other) == ddir
    with pytest.raises(ManifestError, match=r"built from another dataset config.*n_max: built None, config 5.*"
                                            r"force=true"):
        read_split(ddir, "train", cfg=other)
    assert len(read_split(ddir, "train", cfg=cfg).ids) == load_manifest(ddir, cfg)["train"]["num_samples"]
    assert eval_split(load_manifest(ddir), "report") == "test"
