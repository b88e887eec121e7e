"""Entry point: `python -m csdm_dist.export run=<run dir> format=imagefolder|webdataset|npz [out=...]`.

Writes a run's distilled set as ordinary files: the decoded images it trains on (multi-formation sets decoded at
their factor), de-normalised with the stored mean/std to uint8, with their hard labels and, when the distilled.pt
has them, soft labels (as probabilities). Formats (docs/export.md):
- imagefolder: <out>/<class dir>/<key>.png, one folder per class (the dataset's class names, made file-system safe;
  class_<k> without a dataset manifest), plus soft_labels.npy [N, C] (row i: the image named <key of i>.png);
- webdataset: <out>/distilled-000000.tar, ... with <key>.png, <key>.cls, <key>.id and <key>.soft.npy, classes mixed
  in a seeded order as data_prep's shards are;
- npz: <out>/distilled.npz with images uint8 [N, H, W, C], labels int64 [N], soft_labels float32 [N, C].
Every format writes <out>/manifest.json (csdm_dist.distilled.EXPORT_KIND): provenance, class names, counts, mean/std.
Key of decoded image i: its 9-digit index. `csdm_dist.load_distilled(out)` reads any of them back.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import hydra
import numpy as np
import torch
import webdataset as wds
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from . import rundir
from .config import ExportConfig, check_keys, register_configs, to_config
from .data.shards import encode_png
from .distilled import (EXPORT_KIND, EXPORT_MANIFEST, EXPORT_VERSION, NPZ, SHARD_PREFIX, SOFT_NPY, DecodedSet,
                        clipped_fraction, dataset_info, decoded_set, distilled_path, folder_names, sample_key,
                        to_uint8)
from .errors import UserError, one_line_errors, read_json_record
from .runinfo import config_hash, git_commit

log = logging.getLogger("csdm_dist.export")
PROGRESS_MIN_FILES = 500  # show a progress bar when writing more images than this


def to_export_config(dcfg: DictConfig | dict) -> ExportConfig:
    """Refuse unknown keys and build the validated ExportConfig."""
    if not isinstance(dcfg, DictConfig):
        dcfg = OmegaConf.create(dcfg)
    check_keys(dcfg, ExportConfig)
    obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExportConfig), dcfg))
    assert isinstance(obj, ExportConfig)
    return obj


# ---------------------------------------------------------------------------------------------------- provenance

def _read_json(path: Path) -> Optional[dict]:
    return read_json_record(path, "the run directory is damaged: repair or remove it")


def run_provenance(run_dir: Path, config: dict) -> dict:
    """Config hash and git commit of the run: from results.json, else run.json (hash only), else computed here
    (the commit then is this checkout's, said so in `git_commit_from`)."""
    results, record = _read_json(run_dir / rundir.RESULTS), _read_json(run_dir / rundir.RUN_RECORD)
    out: dict = {}
    for name, d in ((rundir.RESULTS, results), (rundir.RUN_RECORD, record)):
        if d and d.get("config_hash") and "config_hash" not in out:
            out.update(config_hash=d["config_hash"], config_hash_from=name)
        if d and d.get("git_commit") and "git_commit" not in out:
            out.update(git_commit=d["git_commit"], git_commit_from=name)
    if "config_hash" not in out:
        out.update(config_hash=config_hash(to_config(config)), config_hash_from="computed from distilled.pt's config")
    if "git_commit" not in out:
        out.update(git_commit=git_commit(), git_commit_from="this checkout, at export time (the run recorded none)")
    return out



def export_manifest(s: DecodedSet, fmt: str, names: list[str], dataset: dict, provenance: dict, files: list[str],
                    extra: dict) -> dict:
    """manifest.json of an export: what it holds and where it comes from."""
    cfg = s.config
    c = len(names)
    soft = None if s.soft is None else {"from": s.soft_from, "temperature": s.temperature, "stored_as": "probabilities",
                                        "teacher": s.teacher, "prior_adjust": s.prior_adjust}
    return {"kind": EXPORT_KIND, "export_version": EXPORT_VERSION, "format": fmt,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "distilled": {"path": str(s.path.resolve()), "sha256": s.sha256},
            **provenance, "method": cfg.get("method", {}).get("name"), "seed": cfg.get("seed"),
            "dataset": dataset, "factor": s.factor, "ipc": cfg.get("ipc"),
            "num_images": len(s.labels), "shape": list(s.images.shape[1:]), "num_classes": c, "class_names": names,
            "counts": torch.bincount(s.labels, minlength=c).tolist(), "real_counts": s.real_counts,
            "mean": s.mean, "std": s.std, "clipped_fraction": clipped_fraction(s.images, s.mean, s.std),
            "soft_labels": soft, "files": files, **extra}


# ---------------------------------------------------------------------------------------------------- writers

def hwc(images: torch.Tensor) -> np.ndarray:
    """uint8 [N, C, H, W] tensor -> [N, H, W, C] array."""
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def progress(n: int, desc: str):
    return tqdm(total=n, desc=desc, unit="image", disable=n <= PROGRESS_MIN_FILES, dynamic_ncols=True)


def write_npz(folder: Path, u8: torch.Tensor, s: DecodedSet, names: list[str], cfg: ExportConfig
              ) -> tuple[list[str], dict]:
    arrays = {"images": hwc(u8), "labels": s.labels.numpy().astype(np.int64)}
    if s.soft is not None:
        arrays["soft_labels"] = s.soft.numpy().astype(np.float32)
    np.savez(folder / NPZ, **arrays)
    return [NPZ], {}


def write_imagefolder(folder: Path, u8: torch.Tensor, s: DecodedSet, names: list[str], cfg: ExportConfig
                      ) -> tuple[list[str], dict]:
    dirs = folder_names(names)
    for d in dirs:
        (folder / d).mkdir()
    images, labels = hwc(u8), s.labels.tolist()
    with progress(len(labels), "write png") as bar:
        for i, label in enumerate(labels):
            (folder / dirs[label] / f"{sample_key(i)}.png").write_bytes(encode_png(images[i]))
            bar.update()
    files = [f"{d}/" for d in dirs]
    if s.soft is not None:
        np.save(folder / SOFT_NPY, s.soft.numpy().astype(np.float32), allow_pickle=False)
        files.append(SOFT_NPY)
    return files, {"class_dirs": dirs}


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def write_webdataset(folder: Path, u8: torch.Tensor, s: DecodedSet, names: list[str], cfg: ExportConfig
                     ) -> tuple[list[str], dict]:
    """Shards as data.shards.write_split writes them (key, png, cls, id, mtime 0, seeded order), plus soft.npy."""
    images, labels = hwc(u8), s.labels.numpy()
    soft = None if s.soft is None else s.soft.numpy().astype(np.float32)
    order = np.random.default_rng(int(s.config.get("seed", 0))).permutation(len(labels))
    names_out = []
    with progress(len(order), "write shards") as bar:
        for shard, start in enumerate(range(0, len(order), cfg.samples_per_shard)):
            names_out.append(f"{SHARD_PREFIX}-{shard:06d}.tar")
            with wds.TarWriter(str(folder / names_out[-1]), encoder=False, mtime=0) as sink:
                for i in order[start:start + cfg.samples_per_shard]:
                    sample = {"__key__": sample_key(i), "png": encode_png(images[i]),
                              "cls": str(int(labels[i])).encode(), "id": str(int(i)).encode()}
                    if soft is not None:
                        sample["soft.npy"] = npy_bytes(soft[i])
                    sink.write(sample)
                    bar.update()
    return list(names_out), {"shards": names_out, "samples_per_shard": cfg.samples_per_shard}


WRITERS = {"npz": write_npz, "imagefolder": write_imagefolder, "webdataset": write_webdataset}


# ---------------------------------------------------------------------------------------------------- the job

def default_out(src: Path, fmt: str) -> Path:
    """<run dir>/export-<format>."""
    return src.parent / f"export-{fmt}"


def check_out(out: Path, src: Path, overwrite: bool) -> None:
    """UserError unless `out` is absent or an empty folder, or overwrite=true (then it is moved aside later);
    never a folder holding the distilled set itself (overwrite would move the run aside)."""
    if out.is_file():
        raise UserError(f"out={out} is a file; pass out=<a folder> (absent or empty)")
    if out == src.parent or out in src.parents:
        raise UserError(f"out={out} holds the distilled set being exported ({src}); choose another out= (the "
                        f"default is <run dir>/export-<format>)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"out={out} is not empty; nothing was written. Pass overwrite=true to move it aside to "
                        f"{out}.old-<time> (nothing is deleted), or choose another out=")


def snippet(out: Path) -> str:
    """Three lines of Python that load the export."""
    return ("from torch.utils.data import DataLoader\n"
            "from csdm_dist import load_distilled\n"
            f"loader = DataLoader(load_distilled({str(out)!r}), batch_size=256, shuffle=True)")


def export(cfg: ExportConfig) -> Path:
    """Write the export of cfg.run into cfg.out (default <run dir>/export-<format>); return the folder.

    The export is written into <out>.tmp-<pid> and renamed into place: a failed export leaves `out` as it was."""
    src = distilled_path(Path(cfg.run)).resolve()
    out = Path(cfg.out).resolve() if cfg.out else default_out(src, cfg.format)
    check_out(out, src, cfg.overwrite)
    s = decoded_set(src)
    names, dataset, note = dataset_info(s.config, cfg.data_root)
    if note:
        print(f"note: {note}", file=sys.stderr, flush=True)
    provenance = run_provenance(src.parent, s.config)
    u8 = to_uint8(s.images, s.mean, s.std)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir()
        files, extra = WRITERS[cfg.format](tmp, u8, s, names, cfg)
        manifest = export_manifest(s, cfg.format, names, dataset, provenance, files, extra)
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out.is_dir() and any(out.iterdir()):  # overwrite=true (check_out refused it otherwise)
            aside = rundir.aside_path(out)
            out.rename(aside)
            print(f"overwrite=true: moved the old {out} aside to {aside}", file=sys.stderr, flush=True)
        elif out.is_dir():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    labels = "hard and soft labels" if s.soft is not None else "hard labels"
    print(f"wrote {len(s.labels)} images ({len(names)} classes, factor {s.factor}, {labels}) as {cfg.format} to "
          f"{out} (manifest.json); load them with:\n{snippet(out)}")
    return out


@hydra.main(version_base=None, config_path="../configs", config_name="export")
def main(dcfg: DictConfig) -> None:
    with one_line_errors(log):
        export(to_export_config(dcfg))


if __name__ == "__main__":
    register_configs()
    main()
