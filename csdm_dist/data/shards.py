"""WebDataset shards of a long-tailed dataset: writing a split, reading a rank's share of it, the manifest.

A built dataset folder holds `manifest.json` (see manifest.py) and `{split}-{i:06d}.tar` shards. Each sample has
`__key__` = its 9-digit global id, `png` (grey or RGB), `cls` and `id` (ascii ints). Rank r of S reads shards
r, r+S, r+2S, ... A reader of a whole split checks its labels against the manifest's counts and ids_hash.
"""
from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from csdm_dist.config import DataConfig, order_tag
from csdm_dist.data.manifest import (MANIFEST, ManifestError, ShardError, check_counts, check_ids,
                                     check_split_entry, check_total, load_manifest, rebuild_hint, split_names)

__all__ = ["MANIFEST", "ManifestError", "ShardData", "ShardError", "dataset_dir", "encode_png", "load_manifest",
           "read_split", "scan_shard", "shard_sizes", "stream_shards", "verify_dataset", "write_split"]
PROGRESS_MIN_SAMPLES = 20000  # show a progress bar when reading a split larger than this


@dataclass
class ShardData:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    ids: torch.Tensor  # int64 [N], global sample id within the split


def dataset_dir(cfg: DataConfig) -> Path:
    """Folder of the built dataset: one per (name, imbalance factor, seed, class order), `-order<8-hex hash of the
    order>` appended for a non-natural dataset.class_order; `-ifnatural-` for imbalance_factor null (natural
    counts); ImageNet-LT is fixed by its lists."""
    if cfg.source == "imagenet_lt":
        return Path(cfg.data_root) / cfg.name
    order = cfg.class_permutation()
    suffix = f"-order{order_tag(order)}" if order is not None else ""
    return Path(cfg.data_root) / f"{cfg.name}-if{cfg.imbalance_tag()}-seed{cfg.seed}{suffix}"


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 1 or 3] -> PNG bytes (grey or RGB)."""
    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def write_split(out_dir: Path, split: str, images: np.ndarray, labels: np.ndarray, ids: np.ndarray,
                samples_per_shard: int, seed: int) -> list[str]:
    """Write images [N, H, W, C] in a seeded random order (classes mixed) to `{split}-{i:06d}.tar`; return the names."""
    if not len(images) == len(labels) == len(ids):
        raise ValueError(f"images, labels and ids differ in length: {len(images)}, {len(labels)}, {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(images))
    names = []
    for shard, start in enumerate(range(0, len(order), samples_per_shard)):
        names.append(f"{split}-{shard:06d}.tar")
        with wds.TarWriter(str(Path(out_dir) / names[-1]), encoder=False, mtime=0) as sink:  # mtime 0: reproducible
            for i in order[start:start + samples_per_shard]:
                sink.write({"__key__": f"{int(ids[i]):09d}", "png": encode_png(images[i]),
                            "cls": str(int(labels[i])).encode(), "id": str(int(ids[i])).encode()})
    return names


def shard_sizes(num_samples: int, samples_per_shard: int) -> list[int]:
    """Samples in each shard written by write_split."""
    return [min(samples_per_shard, num_samples - s) for s in range(0, num_samples, samples_per_shard)]


def stream_shards(folder: Path, shards: list[str], sizes: list[int], shard_rank: int, num_shards: int,
                  rebuild: str, desc: str, progress: bool) -> Iterator[dict]:
    """Yield the raw samples of shards shard_rank, shard_rank + num_shards, ... of `shards`, checking that each
    holds exactly its manifest count; any unreadable or inconsistent shard raises ShardError naming it."""
    if not 0 <= shard_rank < num_shards:
        raise ValueError(f"need 0 <= shard_rank < num_shards, got shard_rank={shard_rank}, num_shards={num_shards}")
    expected = dict(zip(shards, sizes))
    mine = shards[shard_rank::num_shards]
    if not mine:  # a rank past the last shard holds nothing (webdataset rejects an empty url list)
        return
    seen = dict.fromkeys(mine, 0)
    current = [""]  # the shard being streamed, for error messages

    def split_by_rank(src):  # webdataset's default nodesplitter raises under torchrun: always pass one
        for item in islice(src, shard_rank, None, num_shards):
            current[0] = item["url"]
            yield item

    urls = [str(Path(folder) / name) for name in shards]
    ds = wds.WebDataset(urls, nodesplitter=split_by_rank, workersplitter=None, shardshuffle=False, empty_check=False)
    try:
        for sample in tqdm(ds, total=sum(expected[m] for m in mine), desc=desc, unit="sample", disable=not progress):
            name = Path(sample["__url__"]).name
            seen[name] += 1
            if seen[name] > expected[name]:
                raise ShardError(f"shard {sample['__url__']} holds more samples than the manifest's "
                                 f"{expected[name]}; {rebuild}")
            yield sample
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:  # unreadable tar, missing file, bad int
        raise ShardError(f"cannot read shard {current[0]} ({type(e).__name__}: {e}); {rebuild}") from e
    short = [f"{name} ({seen[name]} of {expected[name]})" for name in mine if seen[name] != expected[name]]
    if short:
        raise ShardError(f"shard(s) {', '.join(str(Path(folder) / x) for x in short)} hold fewer samples than the "
                         f"manifest says (truncated?); {rebuild}")


def read_split(dataset_dir: Path, split: str, shard_rank: int = 0, num_shards: int = 1,
               cfg: DataConfig | None = None) -> ShardData:
    """Read shards shard_rank, shard_rank + num_shards, ... of a split ("train", "test", "val") into memory
    (decoded, [N, C, H, W]). Pass the run's dataset `cfg` for exact rebuild commands in errors and to refuse a
    build made from another config. A single reader (num_shards=1) checks the labels it read against the
    manifest's per-class counts and ids_hash; a rank of several checks sum(counts) == num_samples only (check
    the all-reduced bincount with manifest.check_counts)."""
    dataset_dir = Path(dataset_dir)
    manifest = load_manifest(dataset_dir, cfg)
    path, rebuild = dataset_dir / MANIFEST, rebuild_hint(dataset_dir, cfg, manifest=manifest)
    entry = check_split_entry(manifest, split, path, rebuild)
    whole = num_shards == 1
    if not whole:
        check_total(entry, split, path, rebuild)
    c, s, num_classes = manifest["channels"], manifest["image_size"], len(manifest["class_names"])
    sizes = dict(zip(entry["shards"], entry["shard_sizes"]))
    n = sum(sizes[name] for name in entry["shards"][shard_rank::num_shards])
    images, labels, ids = np.empty((n, s, s, c), np.uint8), np.empty(n, np.int64), np.empty(n, np.int64)
    samples = stream_shards(dataset_dir, entry["shards"], entry["shard_sizes"], shard_rank, num_shards, rebuild,
                            f"read {split}", entry["num_samples"] > PROGRESS_MIN_SAMPLES)
    for k, sample in enumerate(samples):
        images[k], labels[k], ids[k] = _parse_sample(sample, c, s, num_classes, rebuild)
    if whole:
        check_counts(entry["counts"], np.bincount(labels, minlength=num_classes), manifest_path=path,
                     rebuild=rebuild, split=split, class_names=manifest["class_names"])
        check_ids(entry, ids, labels, manifest_path=path, rebuild=rebuild, split=split)
    return ShardData(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                     torch.from_numpy(labels), torch.from_numpy(ids))


def scan_shard(path: Path, rebuild: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, ids) of every sample of a shard from its tar headers and small `cls` / `id` members, without
    decoding images; a missing, cut or malformed shard raises ShardError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard {path} is missing; {rebuild}")
    size, samples = path.stat().st_size, {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.offset_data + member.size > size:
                    raise ShardError(f"shard {path} is cut short inside {member.name}; {rebuild}")
                key, _, ext = member.name.partition(".")
                fields = samples.setdefault(key, {})
                fields[ext] = tar.extractfile(member).read() if ext in ("cls", "id") else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"cannot read shard {path} ({type(e).__name__}: {e}); {rebuild}") from e
    labels, ids = np.empty(len(samples), np.int64), np.empty(len(samples), np.int64)
    for k, (key, fields) in enumerate(samples.items()):
        missing = [f for f in ("png", "cls", "id") if f not in fields]
        if missing:
            raise ShardError(f"shard {path}, sample {key!r} lacks the field(s) {missing}; {rebuild}")
        try:
            labels[k], ids[k] = int(fields["cls"]), int(fields["id"])
        except ValueError as e:
            raise ShardError(f"shard {path}, sample {key!r} has a non-integer cls or id ({e}); {rebuild}") from e
    return labels, ids


def verify_dataset(dataset_dir: Path, cfg: DataConfig | None = None, config_choice: str | None = None) -> int:
    """Check a built dataset without decoding images: the manifest (valid JSON, built from `cfg` when given,
    consistent sizes), every listed shard (present, readable, exactly its sample count), and per split the
    labels against the per-class counts and ids_hash. Returns the number of shards checked."""
    dataset_dir = Path(dataset_dir)
    manifest = load_manifest(dataset_dir, cfg, config_choice)
    path = dataset_dir / MANIFEST
    rebuild = rebuild_hint(dataset_dir, cfg, config_choice, manifest)
    num_classes, checked = len(manifest.get("class_names", [])), 0
    for split in split_names(manifest):
        entry = check_split_entry(manifest, split, path, rebuild)
        parts = []
        for name, expected in zip(entry["shards"], entry["shard_sizes"]):
            labels, ids = scan_shard(dataset_dir / name, rebuild)
            if len(labels) != expected:
                raise ShardError(f"shard {dataset_dir / name} holds {len(labels)} samples, the manifest says "
                                 f"{expected}; {rebuild}")
            outside = labels[(labels < 0) | (labels >= num_classes)]
            if len(outside):
                raise ShardError(f"shard {dataset_dir / name} has label {int(outside[0])}, outside the manifest's "
                                 f"label map of {num_classes} classes; {rebuild}")
            parts.append((labels, ids))
        labels = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int64)
        ids = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.int64)
        check_counts(entry["counts"], np.bincount(labels, minlength=num_classes), manifest_path=path,
                     rebuild=rebuild, split=split, class_names=manifest.get("class_names"))
        check_ids(entry, ids, labels, manifest_path=path, rebuild=rebuild, split=split)
        checked += len(entry["shards"])
    return checked


def _parse_sample(sample: dict, channels: int, size: int, num_classes: int, rebuild: str):
    """One webdataset sample -> (image [H, W, C] uint8, label, id), checked against the manifest."""
    where = f"shard {sample['__url__']}, sample {sample['__key__']!r}"
    missing = [f for f in ("png", "cls", "id") if f not in sample]
    if missing:
        raise ShardError(f"{where} lacks the field(s) {missing}; {rebuild}")
    label, sample_id = int(sample["cls"]), int(sample["id"])
    if not 0 <= label < num_classes:
        raise ShardError(f"{where} has label {label}, outside the manifest's label map of {num_classes} classes; "
                         f"{rebuild}")
    return _decode_png(sample["png"], channels, size, where, rebuild), label, sample_id


def _decode_png(data: bytes, channels: int, size: int, where: str, rebuild: str) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        mode = "L" if channels == 1 else "RGB"
        if img.mode != mode or img.size != (size, size):
            raise ShardError(f"{where} is a {img.mode} {img.size} image, the manifest says {mode} "
                             f"{(size, size)}; {rebuild}")
        arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if channels == 1 else arr
