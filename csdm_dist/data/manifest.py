"""The manifest of a built dataset: reading it, checking it against its shards and config, and the exact command
that (re)builds it.

`manifest.json` records per split (`train`, `test`, optional `val`) the per-class `counts`, `num_samples`, the
`shards` and their `shard_sizes`, and `ids_hash` (sha256 of the split's (id, label) pairs); besides the label
map (`class_names`, `class_order` = the raw class index of every label), the training split's per-channel `mean`
and `std` (0-1 pixel scale; runs with empty dataset.mean/std use them), `counts_from` (`formula`, `natural` or
`split lists`), `test_from` (`test split` or `held out`), the `config_hash` of the build, the hashed
`config_fields` and the `build_overrides` of the command that built it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
from pathlib import Path
from typing import Any, Optional

import numpy as np
from omegaconf import MISSING, OmegaConf

from csdm_dist.config import ConfigError, DataConfig

MANIFEST = "manifest.json"
FORMAT_VERSION = 1  # bump when the shard or manifest layout changes, so old builds are not mistaken for new ones
DATASET_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "dataset"
# dataset keys that decide what is built, in the order build_command writes them (data_root, raw_root always)
BUILD_KEYS = ("name", "source", "num_classes", "channels", "image_size", "imbalance_factor", "n_max", "val_per_class",
              "test_per_class", "skip_bad_files", "class_order", "seed", "samples_per_shard", "data_root", "raw_root",
              "split_lists", "download")
EVAL_SPLITS = {"tune": "val", "report": "test"}  # DESIGN.md section 7: choose on val, report on test


class ShardError(RuntimeError):
    """A shard file is unreadable or inconsistent with the manifest; the message names it and says to rebuild."""


class ManifestError(ShardError):
    """manifest.json is unreadable or malformed, or disagrees with the shards or with the dataset config."""


# ---------------------------------------------------------------------------------------------------- config hash

def config_fields(cfg: DataConfig) -> dict[str, Any]:
    """The fields that define the built data (not where it lives, nor the normalisation). For an image folder its
    raw_root (as an absolute path) is the data itself, so it is one of them: another folder is another dataset."""
    fields: dict[str, Any] = {"format": FORMAT_VERSION, "name": cfg.name, "source": cfg.source,
                              "num_classes": cfg.num_classes, "channels": cfg.channels, "image_size": cfg.image_size,
                              "seed": cfg.seed, "samples_per_shard": cfg.samples_per_shard}
    if cfg.source != "imagenet_lt":  # ImageNet-LT's subset comes from its lists, not the IF formula
        imbalance = None if cfg.imbalance_factor is None else float(cfg.imbalance_factor)  # None: natural counts
        fields.update(imbalance_factor=imbalance, n_max=cfg.n_max)
    if cfg.class_permutation() is not None:  # only then: natural-order builds keep their hash
        fields["class_order"] = cfg.class_permutation()
    if cfg.val_per_class > 0:
        fields["val_per_class"] = cfg.val_per_class
    if cfg.source == "imagefolder":
        fields.update(raw_root=str(Path(cfg.raw_root).expanduser().resolve()), test_per_class=cfg.test_per_class,
                      skip_bad_files=cfg.skip_bad_files)
    return fields


def config_hash(cfg: DataConfig) -> str:
    """sha256 of config_fields(cfg)."""
    return hashlib.sha256(json.dumps(config_fields(cfg), sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------- build command

def _hydra_value(value: Any) -> str:
    """A value as a Hydra override writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    return str(value)


def _yaml_values(choice: str) -> Optional[dict[str, Any]]:
    """The values configs/dataset/<choice>.yaml sets (its dataset parents merged in, interpolations unresolved);
    None when there is no such file (or one of its parents is missing)."""
    path = DATASET_CONFIGS / f"{choice}.yaml"
    if not path.is_file():
        return None
    own = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    assert isinstance(own, dict), path
    defaults = own.pop("defaults", [])
    merged: dict[str, Any] = {}
    for entry in (defaults if "_self_" in defaults else [*defaults, "_self_"]):
        if entry == "_self_":
            merged.update(own)
        elif isinstance(entry, str) and entry != "base_dataset":
            parent = _yaml_values(entry)
            if parent is None:
                return None
            merged.update(parent)
    return merged


def _default_values(choice: str) -> dict[str, Any]:
    """What the dataset keys are when the command does not set them: the YAML's values over the dataclass's."""
    values = {f.name: f.default for f in dataclasses.fields(DataConfig)
              if f.default is not dataclasses.MISSING and f.default != MISSING}
    values.update(_yaml_values(choice) or {})  # no such YAML: its keys are unknown, so all are written out
    return values


def build_overrides(cfg: DataConfig, config_choice: Optional[str] = None) -> list[str]:
    """The Hydra overrides of data_prep.build that build exactly `cfg`: `dataset=<choice>` (default cfg.name),
    then every build-defining dataset key whose value differs from that YAML's, and always data_root, raw_root
    (and imbalance_factor where the IF formula applies)."""
    choice = config_choice or cfg.name
    defaults = _default_values(choice)
    always = {"data_root", "raw_root"} | ({"imbalance_factor"} if cfg.source != "imagenet_lt" else set())
    skip = {"imbalance_factor", "n_max"} if cfg.source == "imagenet_lt" else set()
    out = [f"dataset={choice}"]
    for key in BUILD_KEYS:
        value = cfg.class_permutation() if key == "class_order" else getattr(cfg, key)
        default = defaults.get(key, MISSING)
        if key == "class_order" and default is not None and list(default) == list(range(cfg.num_classes)):
            default = None
        if key in always or (key not in skip and value != default):
            out.append(f"dataset.{key}={_hydra_value(value)}")
    return out


def format_command(overrides: list[str]) -> str:
    """`python -m data_prep.build <overrides>`, shell-quoted where needed."""
    return " ".join(["python -m data_prep.build", *(shlex.quote(o) for o in overrides)])


def build_command(cfg: DataConfig, config_choice: Optional[str] = None) -> str:
    """The exact command that builds the dataset of `cfg` (config_choice: the dataset YAML's name, default
    cfg.name). Append ` force=true` to replace an existing build."""
    return format_command(build_overrides(cfg, config_choice))


def rebuild_hint(ddir: Path, cfg: Optional[DataConfig] = None, config_choice: Optional[str] = None,
                 manifest: Optional[dict] = None) -> str:
    """`rebuild with `<command> force=true``: from cfg when given, else from the manifest's recorded overrides
    (with dataset.data_root = the folder above ddir), else a template naming the data root."""
    ddir = Path(ddir)
    if cfg is not None:
        return f"rebuild with `{build_command(cfg, config_choice)} force=true`"
    root = f"dataset.data_root={ddir.parent}"
    recorded = (manifest or {}).get("build_overrides")
    if recorded:
        overrides = [root if o.startswith("dataset.data_root=") else o for o in recorded]
        return f"rebuild with `{format_command(overrides)} force=true`"
    name = (manifest or {}).get("name") or f"<the dataset config that built {ddir.name}>"
    return (f"rebuild with `{format_command([f'dataset={name}', root])} force=true` plus the other dataset "
            f"overrides it was built with")


# ---------------------------------------------------------------------------------------------------- reading

def read_manifest_file(path: Path, rebuild: str) -> dict:
    """Parse manifest.json; a damaged file (e.g. cut short) raises ManifestError naming it and the fix."""
    try:
        manifest = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): the file is "
                            f"damaged (cut short?); {rebuild}") from e
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path} is not UTF-8 text ({e}): the file is damaged; {rebuild}") from e
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} holds a JSON {type(manifest).__name__}, not the manifest object; {rebuild}")
    return manifest


def _missing_message(ddir: Path, cfg: Optional[DataConfig], config_choice: Optional[str]) -> str:
    root = Path(cfg.data_root) if cfg is not None else ddir.parent
    if cfg is not None:
        command, note = build_command(cfg, config_choice), ""
    else:
        command, note = f"python -m data_prep.build dataset=<name> dataset.data_root={root}", \
            f" (<name>: the dataset config of {ddir.name}, with the overrides it was built with)"
    if not root.is_dir():
        return (f"the data root {root} does not exist (dataset.data_root), so no dataset {ddir.name} is built "
                f"there; point dataset.data_root at the folder holding the built datasets, or build it there with "
                f"`{command}`{note}")
    if ddir.exists():
        return (f"{ddir} exists but has no {MANIFEST} (an interrupted or damaged build); rebuild it with "
                f"`{command} force=true`{note}")
    return f"no dataset manifest at {ddir / MANIFEST}; build the dataset first with `{command}`{note}"


def load_manifest(ddir: Path, cfg: Optional[DataConfig] = None, config_choice: Optional[str] = None) -> dict:
    """The manifest of the dataset built in `ddir`. With `cfg` (the run's dataset config), error messages give
    the exact build command, and a build made from another config is refused (ManifestError)."""
    ddir = Path(ddir)
    path = ddir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(_missing_message(ddir, cfg, config_choice))
    rebuild = rebuild_hint(ddir, cfg, config_choice)
    manifest = read_manifest_file(path, rebuild)
    if cfg is not None:
        check_built_from(manifest, cfg, path, rebuild)
    return manifest


def check_built_from(manifest: dict, cfg: DataConfig, path: Path, rebuild: str) -> None:
    """Refuse a manifest whose config_hash is not that of `cfg`, naming the fields that differ."""
    if manifest.get("config_hash") == config_hash(cfg):
        return
    built, want = manifest.get("config_fields"), config_fields(cfg)
    if isinstance(built, dict):
        diff = ", ".join(f"{k}: built {built.get(k)!r}, config {want.get(k)!r}" for k in sorted(set(built) | set(want))
                         if built.get(k) != want.get(k)) or "same fields, other hash"
    else:
        diff = "its config_hash differs"
    raise ManifestError(f"{path.parent} was built from another dataset config than this one ({diff}); {rebuild}, "
                        f"or pass the dataset overrides it was built with")


# ---------------------------------------------------------------------------------------------------- checks

def split_names(manifest: dict) -> list[str]:
    """The splits a manifest lists (train, test and, when built with dataset.val_per_class > 0, val)."""
    return [k for k, v in manifest.items() if isinstance(v, dict) and "shards" in v]


def eval_split(manifest: dict, purpose: str = "report") -> str:
    """The split to evaluate on: `tune` (choosing defaults, ablations, epochs) -> `val`; `report` (the reported
    tables) -> `test`. `tune` on a build without a val split raises ConfigError saying how to get one."""
    if purpose not in EVAL_SPLITS:
        raise ValueError(f"purpose must be one of {sorted(EVAL_SPLITS)}, got {purpose!r}")
    split = EVAL_SPLITS[purpose]
    if split not in split_names(manifest):
        raise ConfigError(f"invalid config `dataset.val_per_class`: the dataset {manifest.get('name')!r} was built "
                          f"without a {split} split; rebuild it with dataset.val_per_class=N (N images per class "
                          f"from the training images the long-tailed subset did not take) and force=true")
    return split


def check_split_entry(manifest: dict, split: str, path: Path, rebuild: str) -> dict:
    """The manifest's entry of `split`, checked for its keys and that its shard list adds up to num_samples."""
    if split not in split_names(manifest):
        hint = "; build with dataset.val_per_class=N for a val split" if split == "val" else ""
        raise KeyError(f"split {split!r} is not in {path}; it has {split_names(manifest)}{hint}")
    entry = manifest[split]
    missing = [k for k in ("counts", "num_samples", "shards", "shard_sizes") if k not in entry]
    if missing:
        raise ManifestError(f"{path}: the {split} split lacks {missing}; {rebuild}")
    if len(entry["shards"]) != len(entry["shard_sizes"]) or sum(entry["shard_sizes"]) != entry["num_samples"]:
        raise ManifestError(f"{path}: the {split} split lists {len(entry['shards'])} shards of "
                            f"{sum(entry['shard_sizes'])} samples in {len(entry['shard_sizes'])} sizes, but "
                            f"num_samples is {entry['num_samples']}; {rebuild}")
    num_classes = len(manifest.get("class_names", entry["counts"]))
    if len(entry["counts"]) != num_classes:
        raise ManifestError(f"{path}: the {split} split has counts for {len(entry['counts'])} classes, the label "
                            f"map has {num_classes}; {rebuild}")
    return entry


def check_total(entry: dict, split: str, path: Path, rebuild: str) -> None:
    """sum(counts) == num_samples: the check a rank that reads only part of a split can make on its own."""
    if sum(entry["counts"]) != entry["num_samples"]:
        raise ManifestError(f"{path}: the per-class counts of the {split} split sum to {sum(entry['counts'])} but "
                            f"num_samples is {entry['num_samples']} (a count was edited?); {rebuild}")


def check_counts(manifest_counts, counts_read, *, manifest_path: Path, rebuild: str, split: str = "train",
                 class_names: Optional[list[str]] = None) -> None:
    """The manifest's per-class counts of a split against the per-class counts of the labels read from all of
    its shards (a bincount; across ranks, all-reduced). A difference raises ManifestError naming the class."""
    want, got = [int(n) for n in manifest_counts], [int(n) for n in counts_read]
    if len(got) != len(want):
        raise ManifestError(f"{manifest_path} lists {split} counts of {len(want)} classes but the labels read "
                            f"cover {len(got)}; {rebuild}")
    bad = [c for c in range(len(want)) if want[c] != got[c]]
    if bad:
        c = bad[0]
        name = f" ({class_names[c]})" if class_names and c < len(class_names) else ""
        more = f" (and {len(bad) - 1} more classes)" if len(bad) > 1 else ""
        raise ManifestError(f"{manifest_path} says class {c}{name} of the {split} split has {want[c]} images but "
                            f"its shards hold {got[c]}{more}; the manifest or the shards changed after the build; "
                            f"{rebuild}")


def build_provenance(manifest: dict, cfg: DataConfig) -> dict:
    """The dataset build a trained network (a teacher, a pool) learnt from, as its file records it and a run
    checks it: the build's name and config hash, the training split's ids and counts, the input shape and the
    normalisation (cfg's mean / std, resolved against the build)."""
    return {"dataset": manifest["name"], "data_config_hash": manifest["config_hash"],
            "ids_hash": manifest["train"].get("ids_hash"), "counts": [int(n) for n in manifest["train"]["counts"]],
            "channels": cfg.channels, "image_size": cfg.image_size, "mean": [float(v) for v in cfg.mean],
            "std": [float(v) for v in cfg.std]}


def check_provenance(path, recorded: dict, want: dict, *, what: str, key: str, net_keys: dict[str, str],
                     rebuild: str, net_fix: str) -> None:
    """ConfigError naming the config key when the `what` file (a teacher, an extractor pool) in `path` was
    trained on another dataset build than `want` says (a field outside `net_keys` differs: config `key`), or made
    with other network settings (`net_keys`: provenance field -> the config key that sets it). `rebuild` and
    `net_fix` say what to do."""
    data = [k for k in want if k not in net_keys and recorded.get(k) != want[k]]
    if data:
        diff = ", ".join(f"{k}: {what} {recorded.get(k)!r} vs config {want[k]!r}" for k in data)
        raise ConfigError(f"invalid config `{key}`: the {what} {path} was trained on another dataset build "
                          f"({diff}); {rebuild}")
    net = [k for k in net_keys if recorded.get(k) != want[k]]
    if net:
        keys = ", ".join(f"`{net_keys[k]}`" for k in net)
        made = ", ".join(f"{k}={recorded.get(k)!r}" for k in net)
        said = ", ".join(f"{k}={want[k]!r}" for k in net)
        raise ConfigError(f"invalid config {keys}: the {what} {path} was made with {made}, the config says {said}; "
                          f"{net_fix}")


def ids_hash(ids, labels) -> str:
    """sha256 of the (id, label) pairs of a split, sorted by id, as little-endian int64."""
    ids, labels = np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    if ids.shape != labels.shape:
        raise ValueError(f"ids {ids.shape} and labels {labels.shape} differ in shape")
    order = np.argsort(ids, kind="stable")
    return hashlib.sha256(np.stack([ids[order], labels[order]], axis=1).astype("<i8").tobytes()).hexdigest()


def check_ids(entry: dict, ids, labels, *, manifest_path: Path, rebuild: str, split: str) -> None:
    """A whole split's (id, label) pairs against the manifest's ids_hash (builds before it had none: skipped)."""
    if "ids_hash" in entry and ids_hash(ids, labels) != entry["ids_hash"]:
        raise ManifestError(f"the (id, label) pairs of the {split} shards do not match the ids_hash in "
                            f"{manifest_path} (a label or id changed, or shards of another build were copied in); "
                            f"{rebuild}")
