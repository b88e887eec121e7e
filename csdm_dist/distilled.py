"""A distilled set as data: `load_distilled(path)` reads a run's distilled.pt, or an export of it
(`python -m csdm_dist.export`, docs/export.md), into a torch Dataset of the images the evaluation trains on.

A distilled.pt stores ipc images per class as they are kept (multi-formation: f x f tiles each, key "factor"),
normalised with the stored mean/std. Read here it is decoded (formation.decode_set): ipc * f^2 images per class,
still normalised. Optional soft labels: key "soft_labels", float [N, C] logits or probabilities, N the stored or
the decoded count, with "temperature"; rows that are non-negative and sum to 1 are probabilities, any other rows
are logits, turned into probabilities by softmax(logits / temperature).

An export holds the decoded images as uint8 (de-normalised, clipped to [0, 1], rounded) and `manifest.json`
(EXPORT_KIND, its format, class names, counts, mean/std, provenance); loading one normalises the images again, so
they equal the distilled.pt's up to the uint8 rounding and the clipping (the manifest's `clipped_fraction`).
"""
from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from . import formation
from .errors import UserError
from .files import load_torch

log = logging.getLogger(__name__)
PT = "distilled.pt"
EXPORT_MANIFEST = "manifest.json"
EXPORT_KIND = "csdm_dist distilled-set export"
EXPORT_VERSION = 1
NPZ = "distilled.npz"
SOFT_NPY = "soft_labels.npy"  # imagefolder: soft labels [N, C], row i for the image named sample_key(i)
SHARD_PREFIX = "distilled"
LABEL_MODES = ("hard", "soft", "auto")
PROB_ATOL = 1e-4  # rows summing to 1 within this (and non-negative) are probabilities, not logits


@dataclass
class DecodedSet:
    """A distilled.pt decoded: what the evaluation trains on, with what is known about it."""
    images: Tensor  # float [N, C, H, W], normalised with mean/std
    labels: Tensor  # int64 [N]
    soft: Optional[Tensor]  # float [N, C] probabilities, or None
    soft_from: Optional[str]  # "logits" or "probabilities": what the file held
    temperature: Optional[float]
    factor: int
    mean: list[float]
    std: list[float]
    config: dict  # the run's config (asdict), as stored
    real_counts: list[int]  # the real images per class the set was distilled from
    path: Path
    sha256: str  # of the very bytes decoded (a record names the set it used, even if the file is replaced later)
    teacher: Optional[dict] = None  # soft labels: {"path", "sha256"} of the teacher that made them, and its
    prior_adjust: Optional[float] = None  # tau' (stored logits = the teacher's - tau' log pi_c); None: not recorded


class DistilledDataset(Dataset):
    """(image, label) pairs: image float [C, H, W] normalised with `mean`/`std`; label int64 (hard) or float [C]
    probabilities (soft). `hard_labels` and `soft_labels` (None without) hold both; `label_kind` says which one
    the items carry."""

    def __init__(self, images: Tensor, hard: Tensor, soft: Optional[Tensor], label_kind: str, class_names: list[str],
                 mean: list[float], std: list[float], factor: int, source: Path):
        self.images, self.hard_labels, self.soft_labels = images, hard, soft
        self.label_kind = label_kind
        self.labels = soft if label_kind == "soft" else hard
        self.class_names, self.mean, self.std, self.factor = list(class_names), list(mean), list(std), int(factor)
        self.num_classes = len(self.class_names)
        self.source = Path(source)

    def __len__(self) -> int:
        return len(self.hard_labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i], self.labels[i]

    def __repr__(self) -> str:
        return (f"DistilledDataset({len(self)} images {list(self.images.shape[1:])}, {self.num_classes} classes, "
                f"factor {self.factor}, {self.label_kind} labels, from {self.source})")


# ---------------------------------------------------------------------------------------------------- distilled.pt

def distilled_path(run: Path) -> Path:
    """`run` (a run directory, or a distilled.pt itself) -> the distilled.pt; UserError when there is none."""
    run = Path(run)
    if run.is_file():
        return run
    path = run / PT if run.is_dir() or run.name != PT else run
    if not path.is_file():
        where = f"{path} does not exist" if run.exists() else f"{run} does not exist"
        raise UserError(f"no distilled set: {where}; distilled.pt is written by a finished distillation "
                        f"(`python -m csdm_dist.distill out_dir=<run dir>`); pass its run directory or its "
                        f"distilled.pt")
    return path


def read_pt(path: Path) -> tuple[dict, str]:
    """The dict a distillation saved (distilled.pt) and the sha256 of the file it was loaded from (hashed in blocks,
    so the file's bytes are never held beside its tensors); UserError when it is absent or not one."""
    if not Path(path).is_file():
        raise UserError(f"distilled set {path} not found; run `python -m csdm_dist.distill` first")
    try:
        blob, sha256 = load_torch(path, weights_only=False)
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e}): it is unreadable, damaged or not a "
                        "distilled.pt") from e
    missing = [k for k in ("images", "labels", "mean", "std", "config") if not isinstance(blob, dict) or k not in blob]
    if missing:
        raise UserError(f"{path} is not a distilled set written by csdm_dist.distill: it lacks {missing}")
    return blob, sha256


def soft_probabilities(soft: Tensor, temperature: Optional[float], n_stored: int, factor: int, num_classes: int,
                       path: Path) -> tuple[Tensor, str]:
    """soft_labels [n_stored or n_stored * f^2, C] logits or probabilities -> ([n_stored * f^2, C] probabilities,
    "logits" or "probabilities"); a stored row stands for each of its f^2 decoded images."""
    soft = torch.as_tensor(soft).detach().float().cpu()
    n_decoded = n_stored * factor * factor
    if soft.ndim != 2 or soft.shape[1] != num_classes or soft.shape[0] not in (n_stored, n_decoded):
        raise UserError(f"{path}: soft_labels has shape {list(soft.shape)}; it must be [N, {num_classes}] with N "
                        f"the {n_stored} stored or the {n_decoded} decoded images")
    if not torch.isfinite(soft).all():
        raise UserError(f"{path}: soft_labels holds non-finite values; the file is damaged")
    if (soft >= 0).all() and torch.allclose(soft.sum(1), torch.ones(len(soft)), atol=PROB_ATOL):
        probs, kind = soft, "probabilities"
    else:
        if temperature is None or not float(temperature) > 0:
            raise UserError(f"{path}: soft_labels are logits (rows do not sum to 1) but the file has no temperature "
                            f"> 0 (got {temperature!r}) to turn them into probabilities; save `temperature` with them")
        probs, kind = torch.softmax(soft / float(temperature), dim=1), "logits"
    if len(probs) == n_stored:
        probs = probs.repeat_interleave(factor * factor, dim=0)
    return probs, kind


def decoded_set(path: Path) -> DecodedSet:
    """Read a distilled.pt and decode it: the same images and labels evaluate.evaluate_file trains on."""
    blob, sha256 = read_pt(path)
    factor = int(blob.get("factor", 1))  # absent in files from before multi-formation: factor 1
    stored, labels = blob["images"].detach().float().cpu(), blob["labels"].long().cpu()
    images, hard = formation.decode_set(stored, labels, factor)
    soft = soft_from = temperature = None
    if "soft_labels" in blob:
        temperature = None if blob.get("temperature") is None else float(blob["temperature"])
        soft, soft_from = soft_probabilities(blob["soft_labels"], temperature, len(labels), factor,
                                             num_classes(blob), path)
    mean, std = [float(m) for m in blob["mean"]], [float(v) for v in blob["std"]]
    if not len(mean) == len(std) == stored.shape[1] or not all(v > 0 for v in std):
        raise UserError(f"{path} stores mean {mean} and std {std}, not {stored.shape[1]} values each (std > 0) for "
                        f"its {stored.shape[1]}-channel images; the file is damaged or not from csdm_dist.distill")
    teacher = prior_adjust = None
    if soft is not None:  # which teacher made the soft labels, and the prior shift of its logits (when recorded)
        teacher = blob.get("teacher")
        prior_adjust = None if blob.get("prior_adjust") is None else float(blob["prior_adjust"])
    return DecodedSet(images, hard, soft, soft_from, temperature, factor, mean, std, blob["config"],
                      list(blob.get("class_counts") or []), path, sha256, teacher, prior_adjust)


def num_classes(blob: dict) -> int:
    return int(blob["config"]["dataset"]["num_classes"])


# ---------------------------------------------------------------------------------------------------- class names

def dataset_info(config: dict, data_root: Optional[str] = None) -> tuple[list[str], dict, Optional[str]]:
    """(class names, what is known of the dataset build, a note when the names are not the dataset's).

    The names come from the manifest of the dataset the set was distilled from (dataset_dir of its config, under
    `data_root` when given) when that build is of the same dataset config; else they are class_<k>."""
    from omegaconf import OmegaConf

    from .config import DataConfig
    from .data.manifest import MANIFEST, ManifestError, config_hash, read_manifest_file
    from .data.shards import dataset_dir

    d = dict(config["dataset"])
    if data_root is not None:
        d["data_root"] = data_root
    dcfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), d))
    ddir = dataset_dir(dcfg)
    generic = [f"class_{k}" for k in range(dcfg.num_classes)]
    info = {"name": dcfg.name, "dir": str(ddir.resolve()), "manifest": None, "config_hash": config_hash(dcfg)}
    path = ddir / MANIFEST
    if not path.is_file():
        return generic, info, (f"no dataset manifest at {path}, so the classes are named class_<k>; run from the "
                               f"directory the set was distilled in or pass data_root=<folder of the built datasets>")
    try:
        manifest = read_manifest_file(path, "rebuild it with data_prep.build")
    except ManifestError as e:
        return generic, info, f"{e}; so the classes are named class_<k>"
    if manifest.get("config_hash") != info["config_hash"]:
        return generic, info, (f"the dataset at {ddir} was built from another dataset config than this set was "
                               f"distilled from (its config hash {manifest.get('config_hash')}), so its class names "
                               f"are not used: the classes are named class_<k>")
    names = [str(n) for n in manifest.get("class_names", [])]
    if len(names) != dcfg.num_classes:
        return generic, info, f"{path} names {len(names)} classes, not {dcfg.num_classes}: classes named class_<k>"
    info.update(manifest=str(path.resolve()), train_ids_hash=manifest.get("train", {}).get("ids_hash"),
                build_overrides=manifest.get("build_overrides"))
    return names, info, None


def folder_names(names: list[str]) -> list[str]:
    """File-system-safe folder names led by the zero-padded label, "T-shirt/top" (label 0) -> "000_T-shirt_top":
    distinct, and sorted in label order, so torchvision's ImageFolder numbers the classes as our labels."""
    width = max(3, len(str(len(names) - 1)))
    return [f"{k:0{width}d}_" + (re.sub(r"[^\w.-]+", "_", str(name)).strip("._")[:100] or "class")
            for k, name in enumerate(names)]


def sample_key(i: int) -> str:
    """The key (file stem) of decoded image i: 9 digits, as the project's shards name their samples."""
    return f"{int(i):09d}"


# ---------------------------------------------------------------------------------------------------- pixels

def to_uint8(images: Tensor, mean: list[float], std: list[float]) -> Tensor:
    """Normalised float [N, C, H, W] -> uint8 [N, C, H, W]: de-normalised, clipped to [0, 1], rounded."""
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return ((images.float() * s + m).clamp(0, 1) * 255).round().to(torch.uint8)


def clipped_fraction(images: Tensor, mean: list[float], std: list[float]) -> float:
    """The fraction of pixel values outside [0, 1] once de-normalised (to_uint8 clips them)."""
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    unit = images.float() * s + m
    return float(((unit < 0) | (unit > 1)).float().mean()) if unit.numel() else 0.0


def normalise(images_uint8: Tensor, mean: list[float], std: list[float]) -> Tensor:
    """uint8 [N, C, H, W] -> float, as the distillation normalises real images (distiller.Normalizer)."""
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return (images_uint8.float() / 255.0 - m) / s


def decode_png(data: bytes, channels: int, where: str) -> np.ndarray:
    """PNG bytes -> uint8 [H, W, C]; UserError naming `where` when it is not a `channels`-channel image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img, dtype=np.uint8)
    except OSError as e:
        raise UserError(f"{where} is not a readable PNG ({e}); the export is damaged: export again") from e
    want = "L" if channels == 1 else "RGB"
    if mode != want:
        raise UserError(f"{where} is a {mode} image, the export's manifest says {want}; export again")
    return arr[:, :, None] if channels == 1 else arr


# ---------------------------------------------------------------------------------------------------- exports

def read_export_manifest(folder: Path) -> Optional[dict]:
    """The export manifest in `folder`, None when it has no manifest.json; UserError for a manifest.json that is
    not an export's (e.g. a built dataset's)."""
    path = Path(folder) / EXPORT_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); the export is damaged: export again") from e
    if not isinstance(manifest, dict) or manifest.get("kind") != EXPORT_KIND:
        raise UserError(f"{path} is not the manifest of a csdm_dist.export folder (no kind {EXPORT_KIND!r}); pass a "
                        f"run directory, a distilled.pt or a folder written by `python -m csdm_dist.export`")
    if manifest.get("export_version", 0) > EXPORT_VERSION:
        raise UserError(f"{path} is of export version {manifest.get('export_version')}, newer than this code "
                        f"reads ({EXPORT_VERSION}); update csdm_dist")
    return manifest


def _check_read(manifest: dict, folder: Path, index: np.ndarray, hard: np.ndarray) -> None:
    """The images read against the manifest: every index 0..N-1 once, the per-class counts."""
    n, c = int(manifest["num_images"]), len(manifest["class_names"])
    if len(index) != n or not np.array_equal(np.sort(index), np.arange(n)):
        raise UserError(f"{folder} holds {len(index)} images, not the images 0..{n - 1} its manifest lists; the "
                        f"export is incomplete or was changed: export again")
    counts = np.bincount(hard, minlength=c).tolist() if len(hard) else [0] * c
    if counts != list(manifest["counts"]):
        raise UserError(f"{folder}: the per-class counts read, {counts}, are not its manifest's {manifest['counts']}; "
                        f"the export was changed: export again")


def read_npz(folder: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(uint8 [N, H, W, C], int64 [N], float [N, C] or None) from distilled.npz."""
    path = folder / NPZ
    if not path.is_file():
        raise UserError(f"{path} is missing although {folder / EXPORT_MANIFEST} lists it; export again")
    with np.load(path, allow_pickle=False) as z:
        images, hard = z["images"], z["labels"].astype(np.int64)
        soft = z["soft_labels"] if "soft_labels" in z.files else None
    _check_read(manifest, folder, np.arange(len(hard)), hard)
    return images, hard, soft


def read_imagefolder(folder: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """The images of <folder>/<class dir>/<key>.png, in key order, and soft_labels.npy when the export has it."""
    found: list[tuple[int, int, Path]] = []
    for label, name in enumerate(manifest["class_dirs"]):
        for png in (folder / name).glob("*.png"):
            if not png.stem.isdigit():
                raise UserError(f"{png} is not named <index>.png as the export writes; remove it or export again")
            found.append((int(png.stem), label, png))
    found.sort()
    index = np.array([i for i, _, _ in found], np.int64)
    hard = np.array([label for _, label, _ in found], np.int64)
    _check_read(manifest, folder, index, hard)
    channels = int(manifest["shape"][0])
    images = np.stack([decode_png(p.read_bytes(), channels, str(p)) for _, _, p in found]) if found else \
        np.zeros((0, *manifest["shape"][1:], channels), np.uint8)
    soft = np.load(folder / SOFT_NPY, allow_pickle=False) if manifest.get("soft_labels") else None
    return images, hard, soft


def read_webdataset(folder: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """The samples of the export's tar shards (`<key>.png`, `<key>.cls`, `<key>.soft.npy`), in key order."""
    samples: dict[str, dict[str, bytes]] = {}
    for name in manifest["shards"]:
        path = folder / name
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise UserError(f"cannot read shard {path} ({type(e).__name__}: {e}); export again") from e
    keys = sorted(samples, key=int)
    want = ("png", "cls") + (("soft.npy",) if manifest.get("soft_labels") else ())
    for key in keys:
        missing = [e for e in want if e not in samples[key]]
        if missing:
            raise UserError(f"{folder}: sample {key!r} lacks {missing}; the export is damaged: export again")
    index = np.array([int(k) for k in keys], np.int64)
    hard = np.array([int(samples[k]["cls"]) for k in keys], np.int64)
    _check_read(manifest, folder, index, hard)
    channels = int(manifest["shape"][0])
    images = np.stack([decode_png(samples[k]["png"], channels, f"{folder}: sample {k}.png") for k in keys])
    soft = (np.stack([np.load(io.BytesIO(samples[k]["soft.npy"]), allow_pickle=False) for k in keys])
            if manifest.get("soft_labels") else None)
    return images, hard, soft


READERS = {"npz": read_npz, "imagefolder": read_imagefolder, "webdataset": read_webdataset}


# ---------------------------------------------------------------------------------------------------- loading

def pick_labels(soft: Optional[Tensor], labels: str, where: Path) -> str:
    """The label kind the items carry: `hard`, `soft` (UserError when the set has none), `auto` (soft if any)."""
    if labels == "soft" and soft is None:
        raise UserError(f"labels='soft' but {where} has hard labels only (its distilled.pt has no soft_labels); "
                        f"use labels='hard' or 'auto'")
    return "hard" if labels == "hard" or soft is None else "soft"


def load_distilled(path, labels: str = "auto", data_root: Optional[str] = None) -> DistilledDataset:
    """A distilled set as a Dataset of (normalised float [C, H, W] image, label).

    `path`: a run directory, a distilled.pt, an export folder (`python -m csdm_dist.export`) or a file in one
    (distilled.npz, a shard). `labels`: `hard` (int64), `soft` (float [C] probabilities) or `auto` (soft when the
    set has them). `data_root`: where the built datasets are, for the class names of a distilled.pt (exports keep
    theirs)."""
    if labels not in LABEL_MODES:
        raise UserError(f"labels={labels!r} is not one of {LABEL_MODES}")
    path = Path(path)
    if path.is_file() and path.suffix != ".pt":
        path = path.parent  # a file of an export: the export folder
    manifest = read_export_manifest(path) if path.is_dir() and not (path / PT).is_file() else None
    if manifest is None:
        if path.is_dir() and not (path / PT).is_file():
            raise UserError(f"{path} holds neither a distilled.pt nor an export's {EXPORT_MANIFEST}; pass a run "
                            f"directory of a finished distillation, its distilled.pt, or a folder written by "
                            f"`python -m csdm_dist.export`")
        src = distilled_path(path)
        s = decoded_set(src)
        names, _, note = dataset_info(s.config, data_root)
        if note:
            log.warning("%s", note)
        kind = pick_labels(s.soft, labels, src)
        return DistilledDataset(s.images, s.labels, s.soft, kind, names, s.mean, s.std, s.factor, src)
    fmt = manifest.get("format")
    if fmt not in READERS:
        raise UserError(f"{path / EXPORT_MANIFEST} names format {fmt!r}, not one of {tuple(READERS)}; export again")
    images, hard, soft = READERS[fmt](path, manifest)
    hard_t = torch.from_numpy(hard)
    soft_t = None if soft is None else torch.from_numpy(np.asarray(soft, np.float32))
    kind = pick_labels(soft_t, labels, path)
    x = normalise(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2), manifest["mean"],
                  manifest["std"])
    return DistilledDataset(x.contiguous(), hard_t, soft_t, kind, manifest["class_names"], manifest["mean"],
                            manifest["std"], manifest["factor"], path)
