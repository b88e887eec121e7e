"""Tiny fake raw datasets in each source's on-disk format, for tests (all CPU, milliseconds).

`write_fake_fashion_mnist` makes classes that a small network can tell apart (class-dependent band and brightness
plus noise), so it can back an end-to-end distillation test.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from csdm_dist.config import DataConfig

MEAN_STD = {1: ([0.5], [0.25]), 3: ([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])}


def fake_config(source: str, raw_root: Path, data_root: Path, **overrides) -> DataConfig:
    """A valid DataConfig for a fake dataset; overrides win (e.g. num_classes=3, image_size=8)."""
    kw = dict(name=f"fake_{source}", source=source, raw_root=str(raw_root), data_root=str(data_root),
              num_classes=10, channels=1 if source == "fashion_mnist" else 3, image_size=28, imbalance_factor=10.0,
              samples_per_shard=16, seed=0)
    kw.update(overrides)
    kw.setdefault("mean", MEAN_STD[kw["channels"]][0])
    kw.setdefault("std", MEAN_STD[kw["channels"]][1])
    return DataConfig(**kw)


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write a uint8 array as an idx file (magic 0x0000 08 <ndim>, big-endian dims), gzipped if compress."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path = Path(str(path) + ".gz") if compress else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def fashion_like_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [N, 28, 28]: noise, plus a bright horizontal band whose row and brightness depend on the class."""
    images = rng.normal(30, 12, size=(len(labels), 28, 28))
    for i, c in enumerate(labels):
        images[i, 2 + 2 * c: 8 + 2 * c, 4:24] += 120 + 10 * c
    return np.clip(images, 0, 255).astype(np.uint8)


def write_fake_fashion_mnist(root, n_per_class=20, num_classes=10, seed=0) -> Path:
    """Fashion-MNIST idx .gz files in `root` (the Debian package layout): train and test each hold n_per_class
    28x28 grey images of every class 0..num_classes-1, in shuffled order. Returns root."""
    if not 2 <= num_classes <= 10:
        raise ValueError(f"Fashion-MNIST has at most 10 classes, got num_classes={num_classes}")
    root, rng = Path(root), np.random.default_rng(seed)
    for prefix in ("train", "t10k"):
        labels = rng.permutation(np.repeat(np.arange(num_classes), n_per_class)).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", fashion_like_images(labels, rng))
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def write_fake_cifar(root, num_classes=3, n_per_class=5, seed=0, hundred=False) -> dict:
    """torchvision's CIFAR-10 (or, if hundred, CIFAR-100) pickle folders under root. Returns the written arrays:
    {"train": (images [N, 32, 32, 3], labels), "test": (...), "names": [...]} for exact comparisons."""
    root, rng = Path(root), np.random.default_rng(seed)
    names = [f"class_{c}" for c in range(num_classes)]
    out = {"names": names}
    for split in ("train", "test"):
        labels = rng.permutation(np.repeat(np.arange(num_classes), n_per_class))
        images = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
        out[split] = (images, labels)
    flat = {s: out[s][0].transpose(0, 3, 1, 2).reshape(-1, 3072) for s in ("train", "test")}
    if hundred:
        folder = root / "cifar-100-python"
        for s in ("train", "test"):
            _pickle(folder / s, {b"data": flat[s], b"fine_labels": out[s][1].tolist(),
                                 b"coarse_labels": (out[s][1] // 5).tolist()})
        _pickle(folder / "meta", {b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": []})
    else:
        folder = root / "cifar-10-batches-py"
        for b, part in enumerate(np.array_split(np.arange(len(out["train"][1])), 5), 1):
            labels = out["train"][1][part].tolist()
            _pickle(folder / f"data_batch_{b}", {b"data": flat["train"][part], b"labels": labels})
        _pickle(folder / "test_batch", {b"data": flat["test"], b"labels": out["test"][1].tolist()})
        _pickle(folder / "batches.meta", {b"label_names": [n.encode() for n in names]})
    return out


def _write_jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path, format="JPEG")


def fake_wnids(num_classes: int) -> list[str]:
    return [f"n{9000000 + 37 * c:08d}" for c in range(num_classes)]


def write_fake_tiny_imagenet(root, num_classes=3, n_per_class=3, val_per_class=2, seed=0) -> Path:
    """root/tiny-imagenet-200 with wnids.txt (unsorted on purpose), train/<wnid>/images/*.JPEG (12x12) and
    val/images + val_annotations.txt. Returns the tiny-imagenet-200 folder."""
    rng, folder = np.random.default_rng(seed), Path(root) / "tiny-imagenet-200"
    wnids = fake_wnids(num_classes)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")
    lines = []
    for wnid in wnids:
        for i in range(n_per_class):
            _write_jpeg(folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", rng, (12, 12))
        for i in range(val_per_class):
            name = f"val_{len(lines)}.JPEG"
            _write_jpeg(folder / "val" / "images" / name, rng, (12, 12))
            lines.append(f"{name}\t{wnid}\t0\t0\t11\t11")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


def write_fake_imagenet(root, num_classes=3, n_per_class=3, val_per_class=2, seed=0) -> Path:
    """ImageFolder layout root/{train,val}/<wnid>/*.JPEG with non-square 16x12 images. Returns root."""
    rng, root = np.random.default_rng(seed), Path(root)
    for wnid in fake_wnids(num_classes):
        for i in range(n_per_class):
            _write_jpeg(root / "train" / wnid / f"{wnid}_{i}.JPEG", rng, (16, 12))
        for i in range(val_per_class):
            _write_jpeg(root / "val" / wnid / f"val_{wnid}_{i}.JPEG", rng, (16, 12))
    return root


def write_fake_imagenet_lt(root, lists, counts=(4, 2, 1), val_per_class=2, seed=0) -> list[tuple[str, int]]:
    """A fake ImageNet under root plus ImageNet_LT_{train,test}.txt in `lists` taking counts[c] train images of
    class c (and all val images). Returns the train list entries."""
    num_classes = len(counts)
    write_fake_imagenet(root, num_classes, n_per_class=max(counts) + 1, val_per_class=val_per_class, seed=seed)
    train, test = [], []
    for c, wnid in enumerate(fake_wnids(num_classes)):
        train += [(f"train/{wnid}/{wnid}_{i}.JPEG", c) for i in range(counts[c])]
        test += [(f"val/{wnid}/val_{wnid}_{i}.JPEG", c) for i in range(val_per_class)]
    order = np.random.default_rng(seed).permutation(len(train))
    train = [train[i] for i in order]
    lists = Path(lists)
    lists.mkdir(parents=True, exist_ok=True)
    for name, entries in (("ImageNet_LT_train.txt", train), ("ImageNet_LT_test.txt", test)):
        (lists / name).write_text("".join(f"{rel} {label}\n" for rel, label in entries))
    return train
