"""Each raw source loads from fake files in its real on-disk format, with the right shapes, labels and errors."""
import gzip
import pickle
import shutil

import numpy as np
import pytest

from csdm_dist.config import ConfigError
from csdm_dist.data.sources import DatasetNotFoundError, RawDataError, load_source, read_idx
from fakes import (fake_config, fake_wnids, write_fake_cifar, write_fake_fashion_mnist, write_fake_imagenet,
                   write_fake_imagenet_lt, write_fake_tiny_imagenet)


def _idx_gz(path):
    with gzip.open(path) as f:
        data = f.read()
    return data


def test_fashion_mnist_gz(tmp_path):
    write_fake_fashion_mnist(tmp_path, n_per_class=4, num_classes=10, seed=1)
    cfg = fake_config("fashion_mnist", tmp_path, tmp_path / "data")
    raw = load_source(cfg, "train")
    assert raw.images.shape == (40, 28, 28, 1) and raw.images.dtype == np.uint8
    assert raw.labels.dtype == np.int64 and np.bincount(raw.labels).tolist() == [4] * 10
    assert raw.class_names[0] == "T-shirt/top" and raw.class_names[9] == "Ankle boot"
    # pixels and labels are exactly those in the idx files
    assert np.array_equal(raw.images[:, :, :, 0], read_idx(tmp_path / "train-images-idx3-ubyte.gz"))
    assert np.array_equal(raw.labels, read_idx(tmp_path / "train-labels-idx1-ubyte.gz"))
    assert load_source(cfg, "test").images.shape == (40, 28, 28, 1)


def test_fake_fashion_mnist_classes_are_separable(tmp_path):
    write_fake_fashion_mnist(tmp_path, n_per_class=20, num_classes=10, seed=0)
    cfg = fake_config("fashion_mnist", tmp_path, tmp_path)
    train, test = load_source(cfg, "train"), load_source(cfg, "test")
    x_train, x_test = (r.images.reshape(len(r.labels), -1).astype(np.float64) for r in (train, test))
    means = np.stack([x_train[train.labels == c].mean(0) for c in range(10)])
    predicted = ((x_test[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == test.labels).mean() > 0.95  # nearest class mean


def test_fashion_mnist_torchvision_layout_plain_files_and_resize(tmp_path):
    src = write_fake_fashion_mnist(tmp_path / "src", n_per_class=2, num_classes=3)
    raw_dir = tmp_path / "root" / "FashionMNIST" / "raw"
    raw_dir.mkdir(parents=True)
    for gz in src.glob("*.gz"):
        (raw_dir / gz.stem).write_bytes(_idx_gz(gz))
    cfg = fake_config("fashion_mnist", tmp_path / "root", tmp_path, num_classes=3)
    raw = load_source(cfg, "train")
    assert raw.images.shape == (6, 28, 28, 1) and raw.class_names == ["T-shirt/top", "Trouser", "Pullover"]
    cfg = fake_config("fashion_mnist", tmp_path / "root", tmp_path, num_classes=3, channels=3, image_size=32)
    rgb = load_source(cfg, "train").images
    assert rgb.shape == (6, 32, 32, 3)
    assert np.array_equal(rgb[..., 0], rgb[..., 2])  # grey replicated


def test_fashion_mnist_missing_names_path_and_fix(tmp_path):
    cfg = fake_config("fashion_mnist", tmp_path / "nowhere", tmp_path)
    with pytest.raises(DatasetNotFoundError) as e:
        load_source(cfg, "train")
    assert isinstance(e.value, FileNotFoundError)
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "train-images-idx3-ubyte" in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg and "/usr/share/datasets/fashion-mnist" in msg


def test_fashion_mnist_truncated_file_is_named(tmp_path):
    write_fake_fashion_mnist(tmp_path, n_per_class=2)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = _idx_gz(path)
    path.write_bytes(gzip.compress(data[:-100]))  # valid gzip, short idx payload
    cfg = fake_config("fashion_mnist", tmp_path, tmp_path)
    with pytest.raises(RawDataError, match="train-images-idx3-ubyte.gz .*truncated"):
        load_source(cfg, "train")
    path.write_bytes(gzip.compress(data)[:-30])  # broken gzip stream
    with pytest.raises(RawDataError, match="train-images-idx3-ubyte.gz"):
        load_source(cfg, "train")
    path.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + data[4:]))  # float idx: wrong magic
    with pytest.raises(RawDataError, match="magic"):
        load_source(cfg, "train")


def test_num_classes_mismatch_is_a_config_error(tmp_path):
    write_fake_fashion_mnist(tmp_path, n_per_class=2, num_classes=10)
    with pytest.raises(ConfigError, match=r"dataset.num_classes.*has 10 classes"):
        load_source(fake_config("fashion_mnist", tmp_path, tmp_path, num_classes=7), "train")


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar(tmp_path, hundred):
    written = write_fake_cifar(tmp_path, num_classes=3, n_per_class=5, seed=2, hundred=hundred)
    cfg = fake_config("cifar100" if hundred else "cifar10", tmp_path, tmp_path, num_classes=3, image_size=32)
    for split in ("train", "test"):
        raw = load_source(cfg, split)
        images, labels = written[split]
        assert raw.images.shape == (15, 32, 32, 3)
        assert np.array_equal(raw.images, images) and np.array_equal(raw.labels, labels)
        assert raw.class_names == written["names"]
    grey = load_source(fake_config("cifar10" if not hundred else "cifar100", tmp_path, tmp_path, num_classes=3,
                                   channels=1, image_size=16), "test")
    assert grey.images.shape == (15, 16, 16, 1)


def test_cifar_missing_and_bad_label(tmp_path):
    cfg = fake_config("cifar10", tmp_path, tmp_path, num_classes=3, image_size=32)
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "cifar-10-batches-py" / "batches.meta")):
        load_source(cfg, "train")
    write_fake_cifar(tmp_path, num_classes=4, n_per_class=2)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b", b"c"]}))  # 3 names, labels 0..3
    with pytest.raises(RawDataError, match=r"label 3 is outside \[0, 3\)"):
        load_source(cfg, "train")


def test_tiny_imagenet(tmp_path):
    write_fake_tiny_imagenet(tmp_path, num_classes=3, n_per_class=3, val_per_class=2)
    cfg = fake_config("tiny_imagenet", tmp_path, tmp_path, num_classes=3, image_size=8)
    train, test = load_source(cfg, "train"), load_source(cfg, "test")
    assert train.images.shape == (9, 8, 8, 3) and test.images.shape == (6, 8, 8, 3)
    assert train.class_names == fake_wnids(3)  # sorted, although wnids.txt lists them reversed
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and test.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_tiny_imagenet_missing(tmp_path):
    cfg = fake_config("tiny_imagenet", tmp_path, tmp_path, num_classes=3, image_size=8)
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "tiny-imagenet-200" / "wnids.txt")):
        load_source(cfg, "test")


def test_imagenet_crops_non_square_and_labels_by_sorted_folder(tmp_path):
    write_fake_imagenet(tmp_path, num_classes=3, n_per_class=2, val_per_class=1)
    cfg = fake_config("imagenet", tmp_path, tmp_path, num_classes=3, image_size=8)
    train = load_source(cfg, "train")
    assert train.images.shape == (6, 8, 8, 3) and train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert train.class_names == sorted(fake_wnids(3))
    assert load_source(cfg, "test").labels.tolist() == [0, 1, 2]
    grey = load_source(fake_config("imagenet", tmp_path, tmp_path, num_classes=3, image_size=12, channels=1), "test")
    assert grey.images.shape == (3, 12, 12, 1)


def test_imagenet_empty_class_and_missing_root(tmp_path):
    write_fake_imagenet(tmp_path, num_classes=3, n_per_class=2)
    (tmp_path / "train" / "n09999999").mkdir()
    cfg = fake_config("imagenet", tmp_path, tmp_path, num_classes=4, image_size=8)
    with pytest.raises(RawDataError, match=r"classes \[3\].*no images"):
        load_source(cfg, "train")
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "elsewhere" / "train")):
        load_source(fake_config("imagenet", tmp_path / "elsewhere", tmp_path, num_classes=3, image_size=8), "train")


def test_imagenet_lt_uses_the_lists(tmp_path):
    entries = write_fake_imagenet_lt(tmp_path / "imagenet", tmp_path / "lists", counts=(4, 2, 1), val_per_class=2)
    cfg = fake_config("imagenet_lt", tmp_path / "imagenet", tmp_path, num_classes=3, image_size=8,
                      split_lists=str(tmp_path / "lists"))
    train = load_source(cfg, "train")
    assert train.images.shape == (7, 8, 8, 3)
    assert train.labels.tolist() == [label for _, label in entries]  # list order kept
    assert train.class_names == fake_wnids(3)
    assert np.bincount(load_source(cfg, "test").labels).tolist() == [2, 2, 2]
    # an image named in the list but absent from disk
    shutil.rmtree(tmp_path / "imagenet" / "val" / fake_wnids(3)[1])
    with pytest.raises(DatasetNotFoundError, match="val_n"):
        load_source(cfg, "test")
    # a test label with no class in the train list
    (tmp_path / "lists" / "ImageNet_LT_test.txt").write_text(f"train/{fake_wnids(3)[0]}/{fake_wnids(3)[0]}_0.JPEG 7\n")
    with pytest.raises(RawDataError, match=r"label 7 is outside \[0, 3\)"):
        load_source(cfg, "test")
