"""Raw dataset readers: one small function per source, each returning a RawSplit of uint8 [N, H, W, C] images.

Every reader converts images to cfg.channels (L or RGB) and cfg.image_size (centre crop to square, bicubic resize)
when they differ; `load_source(cfg, split)` then checks labels and the class count against the config.
`has_split(cfg, split)` says whether the raw data has a split (an image folder may lack test/).
"""
from __future__ import annotations

import gzip
import logging
import os
import pickle
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from csdm_dist.config import ConfigError, DataConfig

SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
# source=imagefolder: file name endings read as images (case-insensitive), as torchvision's ImageFolder plus gif
FOLDER_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
BAD_FILES_SHOWN = 5  # paths named in the warning about skipped files
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


log = logging.getLogger(__name__)


class DatasetNotFoundError(FileNotFoundError):
    """The raw dataset is not where the config says; the message names the expected path and how to get it."""


class RawDataError(ValueError):
    """The raw dataset is there but malformed (truncated file, bad label, empty class)."""


@dataclass
class RawSplit:
    images: np.ndarray  # uint8 [N, H, W, C], C = cfg.channels, H = W = cfg.image_size
    labels: np.ndarray  # int64 [N], in [0, num_classes)
    class_names: list[str]  # label map: index -> name


def load_source(cfg: DataConfig, split: str) -> RawSplit:
    """Read one split ("train" or "test"; test is the official val set where there is no test set)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if cfg.download:
        _download(cfg)
    raw = _READERS[cfg.source](cfg, split)
    _check_split(raw, cfg, split)
    return raw


def has_split(cfg: DataConfig, split: str) -> bool:
    """Whether the raw data holds `split`: always, except `test` for an image folder without test/."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return cfg.source != "imagefolder" or split == "train" or (Path(cfg.raw_root) / split).is_dir()


_DOWNLOADABLE = {"fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def _download(cfg: DataConfig) -> None:
    """dataset.download=true: fetch the raw files into raw_root with torchvision (skipped if already there)."""
    if cfg.source not in _DOWNLOADABLE:
        raise ValueError(f"dataset.download=true works for {sorted(_DOWNLOADABLE)}, not {cfg.source!r}; "
                         "place the files in dataset.raw_root by hand (see README, Datasets)")
    import torchvision.datasets as tvd

    getattr(tvd, _DOWNLOADABLE[cfg.source])(root=cfg.raw_root, train=True, download=True)
    getattr(tvd, _DOWNLOADABLE[cfg.source])(root=cfg.raw_root, train=False, download=True)


# ---------------------------------------------------------------------------------------------------- image helpers

def to_square_array(img: Image.Image, channels: int, size: int) -> np.ndarray:
    """PIL image -> uint8 [size, size, channels]: convert to L/RGB, centre-crop to square, bicubic resize."""
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if channels == 1 else arr


def _conform(images: np.ndarray, channels: int, size: int) -> np.ndarray:
    """uint8 [N, H, W, C] from an array source -> cfg channels and size (a no-op when they already match)."""
    n, h, w, c = images.shape
    if c == channels and h == w == size:
        return images
    out = np.empty((n, size, size, channels), np.uint8)
    for i in tqdm(range(n), desc="convert", unit="img", disable=n < 20000):
        out[i] = to_square_array(Image.fromarray(images[i, :, :, 0] if c == 1 else images[i]), channels, size)
    return out


_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what PIL raises on bad files


def _decode_file(path: Path, channels: int, size: int, advice: str) -> np.ndarray:
    """One image file -> uint8 [size, size, channels]; RawDataError naming the file (and `advice`) if unreadable."""
    try:
        with Image.open(path) as img:
            return to_square_array(img, channels, size)
    except FileNotFoundError as e:
        raise DatasetNotFoundError(f"image {path} is missing; check dataset.raw_root") from e
    except _DECODE_ERRORS as e:
        raise RawDataError(f"cannot decode image {path} ({type(e).__name__}: {e}); {advice}") from e


def _decode_files(paths: list[Path], channels: int, size: int, desc: str) -> np.ndarray:
    """Decode image files in parallel threads (PIL releases the GIL while decoding) with a progress bar."""
    return _decode_many(paths, channels, size, desc, "restore it from the original archive", skip_bad=False)[0]


def _decode_many(paths: list[Path], channels: int, size: int, desc: str, advice: str,
                 skip_bad: bool) -> tuple[np.ndarray, list[tuple[Path, str]]]:
    """(images of the readable files in order, [(path, reason)] of the unreadable ones). The first unreadable
    file raises RawDataError (naming it, then `advice`) unless skip_bad."""
    out = np.empty((len(paths), size, size, channels), np.uint8)
    bad: list[str | None] = [None] * len(paths)

    def load(i: int) -> None:
        try:
            out[i] = _decode_file(paths[i], channels, size, advice)
        except RawDataError as e:
            if not skip_bad:
                raise
            bad[i] = f"{type(e.__cause__).__name__}: {e.__cause__}"

    chunk = 4096  # bounds the number of pending futures for million-image folders
    with ThreadPoolExecutor(min(32, os.cpu_count() or 1)) as pool, tqdm(total=len(paths), desc=desc, unit="img") as bar:
        for start in range(0, len(paths), chunk):
            for _ in pool.map(load, range(start, min(start + chunk, len(paths)))):
                bar.update()
    ok = np.array([b is None for b in bad], bool)
    return (out if ok.all() else out[ok]), [(paths[i], b) for i, b in enumerate(bad) if b is not None]


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DatasetNotFoundError(f"{what}: expected the folder {path}, which does not exist")


# ---------------------------------------------------------------------------------------------------- fashion_mnist

_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file of unsigned bytes (optionally gzipped) into an array of the shape its header gives."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise RawDataError(f"{path} is truncated or not valid gzip ({e}); download it again") from e
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise RawDataError(f"{path} is not an idx file of unsigned bytes (magic {data[:4].hex()}); download it again")
    ndim = data[3]
    start = 4 + 4 * ndim
    if len(data) < start:
        raise RawDataError(f"{path} is truncated inside its header; download it again")
    dims = struct.unpack(f">{ndim}I", data[4:start])
    expected = int(np.prod(dims))
    if len(data) - start != expected:
        raise RawDataError(f"{path} holds {len(data) - start} data bytes but its header {dims} says {expected}; "
                           f"the file is truncated or corrupt, download it again")
    return np.frombuffer(data, np.uint8, offset=start).reshape(dims).copy()  # writable


def _find_idx(root: Path, stem: str) -> Path:
    folders = (root, root / "FashionMNIST" / "raw")
    for folder in folders:
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    raise DatasetNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {folders[0]} or {folders[1]}. Install it with "
        f"`apt-get install -y dataset-fashion-mnist` and set dataset.raw_root=/usr/share/datasets/fashion-mnist, "
        f"or download the four idx files (torchvision.datasets.FashionMNIST(raw_root, download=True) puts them "
        f"in raw_root/FashionMNIST/raw) and set dataset.raw_root")


def _fashion_mnist(cfg: DataConfig, split: str) -> RawSplit:
    image_path, label_path = (_find_idx(Path(cfg.raw_root), stem) for stem in _IDX_FILES[split])
    images, labels = read_idx(image_path), read_idx(label_path).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise RawDataError(f"{image_path} {images.shape} and {label_path} {labels.shape} are not N images and N labels")
    if labels.max() >= len(FASHION_CLASSES):
        raise RawDataError(f"{label_path} has label {labels.max()}; Fashion-MNIST labels are 0..9")
    # idx files carry no class list: the classes are 0..max label (all 10 for the real data)
    names = FASHION_CLASSES[: int(labels.max()) + 1]
    return RawSplit(_conform(images[:, :, :, None], cfg.channels, cfg.image_size), labels, names)


# ---------------------------------------------------------------------------------------------------- cifar

_CIFAR = {  # source -> (folder, files per split, meta file, label key, class-names key, torchvision class)
    "cifar10": ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                "batches.meta", b"labels", b"label_names", "CIFAR10"),
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]},
                 "meta", b"fine_labels", b"fine_label_names", "CIFAR100"),
}


def _unpickle(path: Path, tv_class: str) -> dict:
    if not path.is_file():
        raise DatasetNotFoundError(
            f"{path} not found. Put torchvision's python-pickle folder {path.parent.name}/ in dataset.raw_root "
            f"(extract the official python tar.gz there, or run torchvision.datasets.{tv_class}(raw_root, "
            f"download=True) on a machine with internet)")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError) as e:
        raise RawDataError(f"{path} is truncated or not a pickle ({e}); extract it again") from e


def _cifar(cfg: DataConfig, split: str) -> RawSplit:
    folder, files, meta, label_key, names_key, tv_class = _CIFAR[cfg.source]
    root = Path(cfg.raw_root) / folder
    names = [n.decode() for n in _unpickle(root / meta, tv_class)[names_key]]
    batches = [_unpickle(root / name, tv_class) for name in files[split]]
    data = np.concatenate([np.asarray(b[b"data"], np.uint8) for b in batches])
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels = np.concatenate([np.asarray(b[label_key], np.int64) for b in batches])
    return RawSplit(_conform(images, cfg.channels, cfg.image_size), labels, names)


# ---------------------------------------------------------------------------------------------------- folders

def _tiny_imagenet(cfg: DataConfig, split: str) -> RawSplit:
    root = Path(cfg.raw_root) / "tiny-imagenet-200"
    if not (root / "wnids.txt").is_file():
        raise DatasetNotFoundError(f"Tiny-ImageNet: expected {root / 'wnids.txt'}; unzip tiny-imagenet-200.zip "
                                   f"into dataset.raw_root so that {root} holds wnids.txt, train/ and val/")
    wnids = sorted((root / "wnids.txt").read_text().split())
    label_of = {w: i for i, w in enumerate(wnids)}
    paths, labels = [], []
    if split == "train":
        for wnid in wnids:
            folder = root / "train" / wnid / "images"
            _require_dir(folder, "Tiny-ImageNet train class")
            files = _image_files(folder)
            paths += files
            labels += [label_of[wnid]] * len(files)
    else:
        annotations = root / "val" / "val_annotations.txt"
        if not annotations.is_file():
            raise DatasetNotFoundError(f"Tiny-ImageNet: expected {annotations}; unzip tiny-imagenet-200.zip again")
        for n, line in enumerate(annotations.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in label_of:
                raise RawDataError(f"{annotations}:{n}: expected `<file>\\t<wnid from wnids.txt>...`, got {line!r}")
            paths.append(root / "val" / "images" / fields[0])
            labels.append(label_of[fields[1]])
    images = _decode_files(paths, cfg.channels, cfg.image_size, f"tiny-imagenet {split}")
    return RawSplit(images, np.asarray(labels, np.int64), wnids)


def _imagenet(cfg: DataConfig, split: str) -> RawSplit:
    folder = Path(cfg.raw_root) / ("train" if split == "train" else "val")
    _require_dir(folder, "ImageNet (ImageFolder layout raw_root/train/<wnid>/*.JPEG and raw_root/val/<wnid>/*.JPEG, "
                         "val images sorted into wnid folders); set dataset.raw_root")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    paths, labels = [], []
    for label, wnid in enumerate(tqdm(classes, desc=f"list {folder}", unit="class")):
        files = _image_files(folder / wnid)
        paths += files
        labels += [label] * len(files)
    images = _decode_files(paths, cfg.channels, cfg.image_size, f"imagenet {split}")
    return RawSplit(images, np.asarray(labels, np.int64), classes)


def read_split_list(path: Path) -> list[tuple[str, int]]:
    """ImageNet-LT list: lines `train/n01440764/n01440764_10026.JPEG 0` (path relative to the ImageNet root)."""
    if not path.is_file():
        raise DatasetNotFoundError(f"ImageNet-LT list {path} not found; put ImageNet_LT_train.txt and "
                                   f"ImageNet_LT_test.txt in the folder given by dataset.split_lists")
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            raise RawDataError(f"{path}:{n}: expected `<relative path> <label>`, got {line!r}")
        entries.append((fields[0], int(fields[1])))
    return entries


def _imagenet_lt_names(train_list: Path) -> list[str]:
    """Label map from the train list: label -> the wnid folder its images are in."""
    name_of: dict[int, str] = {}
    for rel, label in read_split_list(train_list):
        wnid = Path(rel).parent.name
        if name_of.setdefault(label, wnid) != wnid:
            raise RawDataError(f"{train_list}: label {label} is used for both {name_of[label]} and {wnid}")
    missing = sorted(set(range(max(name_of) + 1)) - set(name_of)) if name_of else [0]
    if missing:
        raise RawDataError(f"{train_list}: labels {missing[:10]} have no image; labels must be 0..C-1")
    return [name_of[i] for i in range(len(name_of))]


def _imagenet_lt(cfg: DataConfig, split: str) -> RawSplit:
    assert cfg.split_lists is not None  # DataConfig.__post_init__ checks this for imagenet_lt
    lists, root = Path(cfg.split_lists), Path(cfg.raw_root)
    names = _imagenet_lt_names(lists / "ImageNet_LT_train.txt")
    entries = read_split_list(lists / f"ImageNet_LT_{split}.txt")
    _require_dir(root, "ImageNet root for the ImageNet-LT lists (set dataset.raw_root)")
    images = _decode_files([root / rel for rel, _ in entries], cfg.channels, cfg.image_size, f"imagenet-lt {split}")
    return RawSplit(images, np.asarray([label for _, label in entries], np.int64), names)


# ---------------------------------------------------------------------------------------------------- imagefolder

def _hidden(name: str) -> bool:
    return name.startswith(".")


def folder_classes(folder: Path) -> list[str]:
    """The class folders of an ImageFolder split (`folder`/<class>/...): sorted names, hidden ones left out."""
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not _hidden(d.name))


def folder_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) anywhere under `folder`, sorted, hidden files and folders left out; an image
    is a file whose name ends in one of FOLDER_EXTENSIONS (any case)."""
    images, others = [], []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not _hidden(d))
        for name in sorted(files):
            if not _hidden(name):
                (images if name.lower().endswith(FOLDER_EXTENSIONS) else others).append(Path(root) / name)
    return sorted(images), sorted(others)


def _names(names: list[str], shown: int = 10) -> str:
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def _imagefolder_classes(cfg: DataConfig, split: str) -> tuple[Path, list[str]]:
    """(the split's folder, the class names from train/), checking the class count and test/'s class folders."""
    root = Path(cfg.raw_root)
    train = root / "train"
    _require_dir(train, f"image folder (dataset.raw_root={root} must hold train/<class>/<images>, optionally "
                        f"test/<class>/<images>)")
    names = folder_classes(train)
    if len(names) < 2:
        raise RawDataError(f"{train} holds {len(names)} class folder(s) ({_names(names) or 'none'}); an image "
                           f"folder needs at least 2, each class's images in its own folder train/<class>/")
    if len(names) != cfg.num_classes:
        raise ConfigError(f"invalid config `dataset.num_classes`: it is {cfg.num_classes} but {train} holds "
                          f"{len(names)} class folders ({_names(names)}); set dataset.num_classes={len(names)}")
    folder = root / split
    if split != "train":
        _require_dir(folder, f"image folder {split} split (or no {split}/ folder and dataset.test_per_class=N)")
        found = folder_classes(folder)
        missing, extra = sorted(set(names) - set(found)), sorted(set(found) - set(names))
        if missing or extra:
            said = "; ".join(part for part in (f"missing in {split}/: {_names(missing)}" if missing else "",
                                               f"not in train/: {_names(extra)}" if extra else "") if part)
            raise RawDataError(f"{folder} must hold the same class folders as {train} ({said}); add or remove "
                               f"folders so they match, or remove {split}/ and set dataset.test_per_class=N to hold "
                               f"out N training images per class instead")
    return folder, names


def _warn_skipped(bad: list[tuple[Path, str]], split: str) -> None:
    shown = "; ".join(f"{p} ({why})" for p, why in bad[:BAD_FILES_SHOWN])
    more = f"; and {len(bad) - BAD_FILES_SHOWN} more" if len(bad) > BAD_FILES_SHOWN else ""
    log.warning("imagefolder %s: skipped %d unreadable file(s) (dataset.skip_bad_files=true): %s%s", split, len(bad),
                shown, more)


def _imagefolder(cfg: DataConfig, split: str) -> RawSplit:
    """raw_root/<split>/<class>/**/<image>: classes = train/'s folder names, sorted; any format PIL reads."""
    folder, names = _imagefolder_classes(cfg, split)
    paths, labels, ignored = [], [], []
    for label, name in enumerate(tqdm(names, desc=f"list {folder}", unit="class")):
        files, others = folder_images(folder / name)
        if not files:
            raise RawDataError(f"class folder {folder / name} holds no image files (names ending in "
                               f"{', '.join(FOLDER_EXTENSIONS)}); add images or remove the folder (and lower "
                               f"dataset.num_classes)")
        paths += files
        labels += [label] * len(files)
        ignored += others
    if ignored:
        log.warning("imagefolder %s: ignored %d file(s) whose names do not end in an image extension (%s): %s",
                    split, len(ignored), ", ".join(FOLDER_EXTENSIONS), _names([str(p) for p in ignored], 5))
    advice = "fix or remove it, or set dataset.skip_bad_files=true to skip unreadable files (with a warning)"
    images, bad = _decode_many(paths, cfg.channels, cfg.image_size, f"imagefolder {split}", advice,
                               cfg.skip_bad_files)
    labels_arr = np.asarray(labels, np.int64)
    if bad:
        _warn_skipped(bad, split)
        skipped = {p for p, _ in bad}
        labels_arr = labels_arr[[p not in skipped for p in paths]]
        left = np.bincount(labels_arr, minlength=len(names))
        empty = [names[c] for c in np.flatnonzero(left == 0)]
        if empty:
            raise RawDataError(f"class folder(s) {_names([str(folder / n) for n in empty])} hold no readable "
                               f"image after skipping unreadable files; add images or remove the folder(s) (and "
                               f"lower dataset.num_classes)")
    return RawSplit(images, labels_arr, names)


_READERS = {"fashion_mnist": _fashion_mnist, "cifar10": _cifar, "cifar100": _cifar,
            "tiny_imagenet": _tiny_imagenet, "imagenet": _imagenet, "imagenet_lt": _imagenet_lt,
            "imagefolder": _imagefolder}


# ---------------------------------------------------------------------------------------------------- checks

def _check_split(raw: RawSplit, cfg: DataConfig, split: str) -> None:
    found = len(raw.class_names)
    if found != cfg.num_classes:
        raise ConfigError(f"invalid config `dataset.num_classes`: it is {cfg.num_classes} but the {cfg.source} "
                          f"{split} split at {cfg.raw_root} has {found} classes; set dataset.num_classes={found}")
    labels = raw.labels
    bad = labels[(labels < 0) | (labels >= found)]
    if len(bad):
        raise RawDataError(f"{cfg.source} {split} split at {cfg.raw_root}: label {int(bad[0])} is outside "
                           f"[0, {found}) ({len(bad)} such labels); the raw files are inconsistent")
    empty = np.flatnonzero(np.bincount(labels, minlength=found) == 0)
    if len(empty):
        raise RawDataError(f"{cfg.source} {split} split at {cfg.raw_root}: classes {empty[:10].tolist()} "
                           f"({[raw.class_names[i] for i in empty[:3]]}...) have no images; the raw data is incomplete")
    expected = (len(labels), cfg.image_size, cfg.image_size, cfg.channels)
    assert raw.images.shape == expected and raw.images.dtype == np.uint8, (raw.images.shape, expected)
