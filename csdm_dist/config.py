"""Typed configuration: one dataclass per concern, values in `configs/` YAML groups.

Every field has a comment saying what it means. `__post_init__` checks run when Hydra's DictConfig is turned
into these objects (`to_config`), so a bad value fails at start-up with the key named in the message.
Nothing is registered on import: entry points call `register_configs()`.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from .errors import UserError

SOURCES = ("fashion_mnist", "cifar10", "cifar100", "tiny_imagenet", "imagenet", "imagenet_lt", "imagefolder")
KERNELS = ("gaussian", "laplacian", "cauchy", "matern", "linear")
METHODS = ("csdm", "ncfm", "dm", "random")
LR_SCHEDULES = ("constant", "cosine", "step")
# soft-label track (issue #11): networks, teacher losses, label kinds, evaluation relabelling
ARCHS = ("convnet", "resnet18", "vgg11", "alexnet")
TEACHER_LOSSES = ("logit_adjusted", "balanced_softmax", "ce")
LABEL_KINDS = ("hard", "soft")
RELABEL_MODES = ("none", "online")
PRECISIONS = ("auto", "fp32", "bf16")  # the extractor forward's precision (extractors.resolve_precision)


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the key and says what is allowed."""


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config `{key}`: {msg}")


@dataclass
class DataConfig:
    name: str = MISSING  # dataset id, e.g. fashion_mnist_lt; also the folder name under data_root
    source: str = MISSING  # raw format: one of SOURCES
    raw_root: str = MISSING  # folder holding the raw dataset files (see README, "Datasets")
    data_root: str = "data"  # where the long-tailed WebDataset shards are written and read
    num_classes: int = MISSING  # classes in the raw dataset
    channels: int = MISSING  # 1 (grey) or 3 (RGB)
    image_size: int = MISSING  # images are square, resized to this on build when the source differs
    # IF = n_max / n_min; n_c = floor(n_max * IF^(-c/(C-1))). None (null): keep the natural counts, every
    # training image of every class (for data that is already long-tailed; folder names say `ifnatural`)
    imbalance_factor: Optional[float] = 100.0
    n_max: Optional[int] = None  # head-class count; None: the largest class of the raw training split
    download: bool = False  # fetch fashion_mnist / cifar10 / cifar100 into raw_root with torchvision first
    split_lists: Optional[str] = None  # imagenet_lt only: folder with ImageNet_LT_{train,test}.txt
    samples_per_shard: int = 2000  # samples per WebDataset tar shard
    seed: int = 0  # pinned seed choosing which images form the long-tailed subset
    # raw class indices in long-tailed order: class_order[k] becomes label k (k = 0 is the head, n_max images);
    # None: the natural order 0..C-1. Not for imagenet_lt (its lists fix the classes and counts)
    class_order: Optional[list[int]] = None
    # balanced validation split: this many images per class from the raw training images the long-tailed subset
    # did not take (split `val`); 0: no validation split. Not for imagenet_lt
    val_per_class: int = 0
    # imagefolder only: no test/ folder under raw_root -> hold out this many images per class from train/ as
    # the balanced test split, before the long-tailed draw (required then; 0 with a test/ folder)
    test_per_class: int = 0
    # imagefolder only: skip files PIL cannot read (a warning counts them) instead of stopping at the first one
    skip_bad_files: bool = False
    # per-channel normalisation mean and std (0-1 pixel scale). imagefolder may leave both empty ([]): the build
    # computes them on the long-tailed training split and records them in the manifest, where runs read them
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(self.source in SOURCES, "dataset.source", f"{self.source!r} is not one of {SOURCES}")
        _check(self.num_classes >= 2, "dataset.num_classes", f"needs at least 2 classes, got {self.num_classes}")
        _check(self.channels in (1, 3), "dataset.channels", f"must be 1 or 3, got {self.channels}")
        _check(self.image_size >= 8, "dataset.image_size", f"must be >= 8, got {self.image_size}")
        _check(self.imbalance_factor is None or self.imbalance_factor >= 1, "dataset.imbalance_factor",
               f"must be >= 1, or null for the natural counts, got {self.imbalance_factor}")
        _check(self.imbalance_factor is not None or self.n_max is None or self.source == "imagenet_lt",
               "dataset.n_max", f"is {self.n_max}, but dataset.imbalance_factor=null keeps every training image "
               "(natural counts); set dataset.n_max=null, or give dataset.imbalance_factor a number")
        _check(self.imbalance_factor is not None or self.val_per_class == 0, "dataset.val_per_class",
               f"is {self.val_per_class}, but dataset.imbalance_factor=null keeps every training image, so none is "
               "left for a val split; set dataset.val_per_class=0, or give dataset.imbalance_factor a number")
        _check(self.n_max is None or self.n_max >= 1, "dataset.n_max", f"must be >= 1 or null, got {self.n_max}")
        _check(self.samples_per_shard >= 1, "dataset.samples_per_shard", "must be >= 1")
        computed = self.source == "imagefolder" and not self.mean and not self.std
        _check(computed or (len(self.mean) == self.channels and len(self.std) == self.channels), "dataset.mean/std",
               f"need {self.channels} values each, got {len(self.mean)} and {len(self.std)}"
               + ("; or both empty ([]) to use the training split's, computed by the build"
                  if self.source == "imagefolder" else ""))
        _check(all(s > 0 for s in self.std), "dataset.std", "values must be > 0")
        _check(self.source != "imagenet_lt" or bool(self.split_lists), "dataset.split_lists",
               "imagenet_lt needs the folder holding ImageNet_LT_train.txt and ImageNet_LT_test.txt")
        if self.class_order is not None:
            _check(sorted(self.class_order) == list(range(self.num_classes)), "dataset.class_order",
                   f"must list every raw class index 0..{self.num_classes - 1} exactly once (a permutation), got "
                   f"{list(self.class_order)}; or set it to null for the natural order")
            _check(self.source != "imagenet_lt" or self.class_permutation() is None, "dataset.class_order",
                   "imagenet_lt's classes and counts come from its split lists; set it to null")
        _check(self.val_per_class >= 0, "dataset.val_per_class", f"must be >= 0 (0: no val split), got "
               f"{self.val_per_class}")
        _check(self.source != "imagenet_lt" or self.val_per_class == 0, "dataset.val_per_class",
               "imagenet_lt's lists take every training image it reads, none is left for a val split; set it to 0")
        _check(self.test_per_class >= 0, "dataset.test_per_class", f"must be >= 0, got {self.test_per_class}")
        _check(self.source == "imagefolder" or self.test_per_class == 0, "dataset.test_per_class",
               f"holds out test images from an image folder without test/; {self.source} has its own test split, "
               "set it to 0")
        _check(self.source == "imagefolder" or not self.skip_bad_files, "dataset.skip_bad_files",
               f"applies to source=imagefolder only; {self.source} files are checked as they are, set it to false")

    def imbalance_tag(self) -> str:
        """The imbalance factor in folder and run names: `100`, `12.5`, or `natural` (imbalance_factor null)."""
        return "natural" if self.imbalance_factor is None else f"{self.imbalance_factor:g}"

    def class_permutation(self) -> Optional[list[int]]:
        """class_order as a list, or None when it is unset or the natural order 0..C-1 (builds stay the same)."""
        if self.class_order is None or list(self.class_order) == list(range(self.num_classes)):
            return None
        return [int(r) for r in self.class_order]


@dataclass
class KernelConfig:
    name: str = "gaussian"  # one of KERNELS; `linear` matches feature means (DM)
    bandwidth: float = 1.0  # s in the kernel; frequencies scale as 1/s
    # None: every class uses `bandwidth`. Set: class c's bandwidth is log-linear in its real count n_c, from
    # bandwidth_tail (smallest class) to `bandwidth` (largest class)
    bandwidth_tail: Optional[float] = None
    nu: float = 1.5  # matern smoothness; 2*nu must be a positive integer (Student-t dof)
    num_freqs: int = 4096  # M, frequencies drawn fresh every step

    def __post_init__(self) -> None:
        _check(self.name in KERNELS, "method.kernel.name", f"unknown kernel {self.name!r}; choose from {KERNELS}")
        _check(self.bandwidth > 0, "method.kernel.bandwidth", f"must be > 0, got {self.bandwidth}")
        _check(self.bandwidth_tail is None or self.bandwidth_tail > 0, "method.kernel.bandwidth_tail",
               f"must be > 0 (or null: one bandwidth for every class), got {self.bandwidth_tail}")
        _check(self.bandwidth_tail is None or self.name != "linear", "method.kernel.bandwidth_tail",
               "the linear kernel has no bandwidth; set it to null")
        _check(self.nu > 0 and float(2 * self.nu).is_integer(), "method.kernel.nu",
               f"2*nu must be a positive integer (0.5, 1.5, 2.5, ...), got {self.nu}")
        _check(self.num_freqs >= 1, "method.kernel.num_freqs", f"must be >= 1, got {self.num_freqs}")


@dataclass
class WeightingConfig:
    schedule: str = "loglinear"  # alpha_c: `loglinear` in the class count n_c, or `constant` (= alpha_head)
    alpha_head: float = 0.8  # alpha of the largest class: weight of the amplitude (diversity) term
    alpha_tail: float = 0.2  # alpha of the smallest class; 1 - alpha weighs the phase (realism) term
    form: str = "mmd2"  # `mmd2`: E_t[...]; `sqrt`: E_t sqrt(...) as in NCFM
    loss_scale: float = 1.0  # multiplies the loss (NCFM uses 300)

    def __post_init__(self) -> None:
        _check(self.schedule in ("loglinear", "constant"), "method.weighting.schedule",
               f"{self.schedule!r} is not `loglinear` or `constant`")
        for key in ("alpha_head", "alpha_tail"):
            v = getattr(self, key)
            _check(0.0 < v < 1.0, f"method.weighting.{key}", f"must lie strictly inside (0, 1), got {v}")
        _check(self.form in ("mmd2", "sqrt"), "method.weighting.form", f"{self.form!r} is not `mmd2` or `sqrt`")
        _check(self.loss_scale > 0, "method.weighting.loss_scale", "must be > 0")


@dataclass
class MethodConfig:
    name: str = "csdm"  # one of METHODS
    kernel: KernelConfig = field(default_factory=KernelConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    normalize_features: bool = True  # L2-normalise features before the statistics (False for DM)

    def __post_init__(self) -> None:
        _check(self.name in METHODS, "method.name", f"unknown method {self.name!r}; choose from {METHODS}")


@dataclass
class ExtractorConfig:
    arch: str = "convnet"  # `convnet` or `resnet18`
    width: int = 128  # ConvNet channels
    depth: Optional[int] = None  # ConvNet blocks; None: by image size (3 at 28-32 px, 4 at 64 px, 5 at 128 px)
    norm: str = "instancenorm"  # `instancenorm`, `batchnorm` or `none`
    mode: str = "random"  # `random`: fresh init every step; `pool`: interpolate a pretrained pool
    pool_path: Optional[str] = None  # pool file written by `python -m csdm_dist.pretrain` (mode=pool)
    interpolate: bool = True  # pool: theta = l theta_init + (1 - l) theta_trained, l ~ U(0,1); false: trained as is
    pool_size: int = 4  # networks in the pool (pretrain)
    pool_epochs: int = 10  # epochs of pre-training per pool network (pretrain)

    def __post_init__(self) -> None:
        _check(self.arch in ("convnet", "resnet18"), "extractor.arch", f"{self.arch!r} is not convnet or resnet18")
        _check(self.norm in ("instancenorm", "batchnorm", "none"), "extractor.norm", f"{self.norm!r} is unknown")
        _check(self.mode in ("random", "pool"), "extractor.mode", f"{self.mode!r} is not `random` or `pool`")
        _check(self.mode != "pool" or bool(self.pool_path), "extractor.pool_path",
               "mode=pool needs the pool file: run `python -m csdm_dist.pretrain` and pass extractor.pool_path=...")
        _check(self.width >= 1 and (self.depth is None or self.depth >= 1), "extractor.width/depth", "must be >= 1")

    def depth_at(self, image_size: int) -> int:
        """The ConvNet depth used for `image_size` px images."""
        return self.depth if self.depth is not None else max(1, round(math.log2(image_size)) - 2)


@dataclass
class FeaturesConfig:
    """real_source=features: real features precomputed by a fixed extractor pool (data_prep.extract_features)."""
    dir: Optional[str] = None  # feature shards; None: <dataset dir>/features/<pool file name without .pt>
    views: int = 1  # views per image: view 0 is the image itself, views 1.. are augmented copies (extraction)
    dtype: str = "float16"  # storage precision of the shards: float16 or float32 (statistics are always fp32)

    def __post_init__(self) -> None:
        _check(self.views >= 1, "features.views", f"must be >= 1, got {self.views}")
        _check(self.dtype in ("float16", "float32"), "features.dtype", f"{self.dtype!r} is not float16 or float32")


@dataclass
class DistillConfig:
    # optimisation steps of the synthetic set. 1000 with factor 2 and mix: chosen on the validation split
    # (docs/benchmarks.md; csdm IF 100, seed 0, 2 evaluation networks: 82.99 / 83.98 / 84.67 / 85.00 % at
    # 200 / 500 / 1000 / 2000 steps): the smallest budget within one evaluation std (0.66) of 2000 steps
    iterations: int = 1000
    real_per_class: int = 64  # expected real images per class per step (Bernoulli subsampling)
    real_chunk: int = 2048  # real images per extractor forward pass: bounds activation memory
    # synthetic (decoded) images per extractor forward with gradient; null: all of this rank's at once. Set, the
    # forward and statistics run chunk by chunk under activation checkpointing: only one chunk's activations are
    # held, each recomputed in the backward (about 1/3 more synthetic compute). Same maths (sums of chunks), so it
    # is not hashed: a run may resume with another value. Needed at ImageNet-LT scale (docs/distributed.md)
    syn_chunk: Optional[int] = None
    # synthetic init: `real` images, gaussian `noise`, or `mix`: each stored image's f x f tiles hold f^2
    # different real images of its class, shrunk to the tile size (synthetic.factor; with f = 1, mix == real)
    init: str = "mix"
    small_class_policy: str = "repeat"  # IPC > n_c: `repeat` real images at init (logged) or `error`
    optimizer: str = "adam"  # `adam` or `sgd`, on the synthetic pixels
    lr: float = 0.03  # learning rate of the synthetic pixels (normalised pixel space)
    # lr at step s (0-based) of `iterations`: `constant` lr; `cosine` lr * (1 + cos(pi * s / iterations)) / 2
    # (reaching 0 at s = iterations); `step` lr * lr_gamma^k, k = milestones with s / iterations >= fraction.
    # A pure function of (s, iterations, these keys) set before every optimizer step: resumes exactly
    lr_schedule: str = "constant"
    lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # lr_schedule=step: fractions
    lr_gamma: float = 0.1  # lr_schedule=step: factor applied at each milestone
    momentum: float = 0.5  # sgd momentum
    augment: bool = True  # differentiable siamese augmentation on real and synthetic batches
    log_every: int = 10  # TensorBoard scalars every this many steps
    image_every: int = 100  # TensorBoard image grids every this many steps
    checkpoint_every: int = 100  # checkpoint every this many steps (0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept

    def __post_init__(self) -> None:
        _check(self.iterations >= 0, "distill.iterations", f"must be >= 0, got {self.iterations}")
        _check(self.real_per_class >= 1, "distill.real_per_class", "must be >= 1")
        _check(self.real_chunk >= 1, "distill.real_chunk", "must be >= 1")
        _check(self.syn_chunk is None or self.syn_chunk >= 1, "distill.syn_chunk", "must be >= 1 or null")
        _check(self.init in ("real", "noise", "mix"), "distill.init", f"{self.init!r} is not `real`, `noise` or `mix`")
        _check(self.small_class_policy in ("repeat", "error"), "distill.small_class_policy",
               f"{self.small_class_policy!r} is not `repeat` or `error`")
        _check(self.optimizer in ("adam", "sgd"), "distill.optimizer", f"{self.optimizer!r} is not adam or sgd")
        _check(self.lr > 0, "distill.lr", "must be > 0")
        _check(self.lr_schedule in LR_SCHEDULES, "distill.lr_schedule",
               f"{self.lr_schedule!r} is not one of {LR_SCHEDULES}")
        m = list(self.lr_milestones)
        _check(all(0 < f < 1 for f in m) and all(a < b for a, b in zip(m, m[1:])), "distill.lr_milestones",
               f"must be strictly increasing fractions of distill.iterations inside (0, 1), got {m}")
        _check(0 < self.lr_gamma <= 1, "distill.lr_gamma", f"must lie in (0, 1], got {self.lr_gamma}")
        _check(self.checkpoint_every >= 0 and self.keep_checkpoints >= 1, "distill.checkpoint_every",
               "checkpoint_every must be >= 0 and keep_checkpoints >= 1")


@dataclass
class SyntheticConfig:
    """How the synthetic set is stored (DESIGN.md section 3, multi-formation; csdm_dist/formation.py)."""
    # f: each stored image is an f x f grid of (image_size // f) px tiles, each decoded (upsampled) to a full
    # image, so the ipc stored images per class give ipc * f^2 training images. Tiles must be >= 4 px. When f
    # does not divide image_size, the last image_size - f * (image_size // f) pixel rows and columns are unused.
    # 2 (with distill.init=mix): chosen on the validation split, +2.3 points over f = 1 for csdm at IF 100
    factor: int = 2

    def __post_init__(self) -> None:
        _check(self.factor >= 1, "synthetic.factor", f"must be >= 1, got {self.factor}")

    def check(self, image_size: int) -> None:
        """ConfigError naming synthetic.factor when the tiles of `image_size` px images would be under 4 px."""
        _check(image_size // self.factor >= 4, "synthetic.factor",
               f"{self.factor} cuts {image_size} px images into {image_size // self.factor} px tiles; tiles need "
               f">= 4 px, so factor <= {image_size // 4} at this image size")


@dataclass
class EvalConfig:
    protocol: str = "dm"  # `dm` (SGD, step decay) or `ncfm` (AdamW, halvings, CutMix)
    epochs: int = 300  # training epochs on the distilled set
    repeats: int = 2  # fresh networks trained per evaluation
    batch_size: int = 256
    arch: str = "convnet"  # evaluation network: one of ARCHS (models.build_network; cross-architecture evaluation)
    augment: bool = True  # differentiable augmentation while training
    test_batch_size: int = 1000
    test_points: int = 1  # test this many times, evenly spaced (the last at the final epoch); best = max
    # the split evaluated on: `test` for reported tables, `val` (dataset.val_per_class > 0) to choose defaults
    split: str = "test"
    # also evaluate the set as it stands after these distillation steps (each below distill.iterations): the
    # accuracy-against-steps curve of one run, in results.json `accuracy_at_steps` and TensorBoard eval/*
    at_steps: list[int] = field(default_factory=list)
    # label track, reported apart: `hard` (cross-entropy on each image's class) or `soft` (T^2-scaled KL to the
    # teacher's soft labels at their temperature: the set's stored soft_labels, or fresh ones with relabel=online);
    # None: the track of labels.kind
    labels: Optional[str] = None
    # soft track: `none` trains on the stored soft labels; `online`: the teacher labels every augmented batch
    # afresh (SRe2L's relabelling; needs the teacher file, labels.teacher)
    relabel: str = "none"
    # soft track: w in [0, 1], the loss (1 - w) * KD + w * cross-entropy on each image's class (Hinton et al.'s mix;
    # CutMix mixes both targets alike); 0: KD alone. Teacher labels of distilled images are often far from their
    # class (docs/soft-labels.md), and the class term keeps it
    hard_weight: float = 0.0

    def __post_init__(self) -> None:
        _check(self.protocol in ("dm", "ncfm"), "eval.protocol", f"{self.protocol!r} is not `dm` or `ncfm`")
        _check(0.0 <= self.hard_weight <= 1.0, "eval.hard_weight",
               f"is the class term's weight in the soft track's loss and must be in [0, 1], got {self.hard_weight}")
        _check(self.labels is None or self.labels in LABEL_KINDS, "eval.labels",
               f"{self.labels!r} is not one of {LABEL_KINDS}")
        _check(self.relabel in RELABEL_MODES, "eval.relabel", f"{self.relabel!r} is not one of {RELABEL_MODES}")
        self.check_track()
        s = [int(x) for x in self.at_steps]
        _check(all(x >= 1 for x in s) and all(a < b for a, b in zip(s, s[1:])), "eval.at_steps",
               f"must be strictly increasing steps >= 1, got {s}")
        _check(self.epochs >= 1, "eval.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.repeats >= 1, "eval.repeats", f"must be >= 1, got {self.repeats}")
        _check(1 <= self.test_points <= self.epochs, "eval.test_points", "must be between 1 and eval.epochs")
        _check(self.arch in ARCHS, "eval.arch", f"{self.arch!r} is not one of {ARCHS}; pass eval.arch=<one of them>")
        _check(self.split in ("test", "val"), "eval.split", f"{self.split!r} is not `test` or `val` (the balanced "
               "validation split of dataset.val_per_class)")

    def check_track(self) -> None:
        """The soft track's keys need the soft track (labels None: not resolved yet; Config resolves it, then
        calls this again)."""
        _check(self.relabel == "none" or self.labels != "hard", "eval.relabel",
               "online relabelling trains on teacher labels, a soft-label track; set eval.labels=soft too")
        _check(self.hard_weight == 0.0 or self.labels != "hard", "eval.hard_weight",
               "weighs the class term against the teacher's soft labels; set eval.labels=soft too, or leave it 0")


@dataclass
class LabelsConfig:
    """What a distillation stores besides its images (issue #11): `soft` adds the teacher's logits of every
    decoded image to distilled.pt (`soft_labels`, [N_decoded, C] fp32, and `temperature`)."""
    kind: str = "hard"  # one of LABEL_KINDS: `hard` (class labels only) or `soft` (also the teacher's logits)
    # the teacher file, written by `python -m csdm_dist.teacher` (to this path); None: its default path,
    # <dataset dir>/teachers/<teacher settings>-s<seed>.pt (csdm_dist.teacher.default_teacher_path)
    teacher: Optional[str] = None
    temperature: float = 4.0  # T: the student matches softmax(logits / T), the KL scaled by T^2
    # tau' >= 0: the stored logits are the teacher's minus tau' * log pi_c (pi: the real class frequencies), a
    # shift toward the tail before the softmax (ADSA); 0: the teacher's logits as they are
    prior_adjust: float = 0.0
    # lambda >= 0: adds lambda * (mean over decoded synthetic images of the teacher's cross-entropy on their class,
    # on the step's augmented views) to the matching loss, so the images become ones the teacher labels as their
    # class (SRe2L's recovery term); needs labels.kind=soft. 0: the matching loss alone
    teacher_ce: float = 0.0

    def __post_init__(self) -> None:
        _check(self.kind in LABEL_KINDS, "labels.kind", f"{self.kind!r} is not one of {LABEL_KINDS}")
        _check(self.teacher_ce >= 0 and math.isfinite(self.teacher_ce), "labels.teacher_ce",
               f"is the weight of the teacher cross-entropy term and must be >= 0 (0: none), got {self.teacher_ce}")
        _check(self.teacher_ce == 0 or self.kind == "soft", "labels.teacher_ce",
               f"{self.teacher_ce} shapes the images with the teacher, which is the soft track's; set labels.kind=soft "
               "(needs a teacher: python -m csdm_dist.teacher) or labels.teacher_ce=0")
        _check(self.temperature > 0 and math.isfinite(self.temperature), "labels.temperature",
               f"must be a finite number > 0, got {self.temperature}")
        _check(self.prior_adjust >= 0 and math.isfinite(self.prior_adjust), "labels.prior_adjust",
               f"is the tau' of the prior shift and must be >= 0 (0: no shift), got {self.prior_adjust}")


@dataclass
class TeacherConfig:
    """`python -m csdm_dist.teacher`: a network trained on the long-tailed training set with a long-tail
    correction; its logits become soft labels (labels.kind=soft, eval.relabel=online). Written to labels.teacher."""
    arch: str = "convnet"  # one of ARCHS
    width: int = 128  # ConvNet channels
    depth: Optional[int] = None  # ConvNet blocks; None: by image size (the rule of extractor.depth)
    norm: str = "batchnorm"  # `batchnorm` (statistics re-estimated on a class-balanced pass), `instancenorm`, `none`
    # `logit_adjusted`: cross-entropy on logits + tau * log pi_c (Menon et al. 2021); `balanced_softmax`: logits +
    # log pi_c (tau = 1, its own name); `ce`: plain cross-entropy. Predictions use the plain logits
    loss: str = "logit_adjusted"
    tau: float = 1.0  # logit_adjusted only: tau >= 0
    epochs: int = 30  # passes over the training set
    lr: float = 0.05  # SGD (momentum 0.9), cosine decay to 0 over the epochs
    batch_size: int = 256  # the global batch, split over the ranks
    weight_decay: float = 5e-4
    augment: bool = True  # one differentiable augmentation op per batch (csdm_dist/augment.py)
    # multi-formation factors the teacher learns to label: each batch is shown as a factor-f set decodes it
    # (shrunk to an f x f tile and upsampled back, formation.as_decoded), f drawn uniformly from this list; 1: as it
    # is. [1, 2] labels 2x-decoded test images better (80.9 against 77 %) but its soft labels of a csdm set scored
    # lower (75.8 against 78.0, docs/soft-labels.md): sharp images alone stay the default
    tile_factors: list[int] = field(default_factory=lambda: [1])
    bn_per_class: Optional[int] = None  # images per class in the balanced batch-norm pass; None: train size // C

    def __post_init__(self) -> None:
        _check(self.arch in ARCHS, "teacher.arch", f"{self.arch!r} is not one of {ARCHS}")
        _check(self.norm in ("instancenorm", "batchnorm", "none"), "teacher.norm", f"{self.norm!r} is unknown")
        _check(self.width >= 1 and (self.depth is None or self.depth >= 1), "teacher.width/depth", "must be >= 1")
        _check(self.loss in TEACHER_LOSSES, "teacher.loss", f"{self.loss!r} is not one of {TEACHER_LOSSES}")
        _check(self.tau >= 0 and math.isfinite(self.tau), "teacher.tau",
               f"must be >= 0 (0: plain cross-entropy), got {self.tau}")
        _check(self.epochs >= 1, "teacher.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.lr > 0, "teacher.lr", f"must be > 0, got {self.lr}")
        _check(self.batch_size >= 1, "teacher.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.weight_decay >= 0, "teacher.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(len(self.tile_factors) > 0 and all(isinstance(f, int) and f >= 1 for f in self.tile_factors),
               "teacher.tile_factors", f"must be a non-empty list of factors >= 1 (1: sharp images), got "
               f"{self.tile_factors}")
        _check(self.bn_per_class is None or self.bn_per_class >= 1, "teacher.bn_per_class",
               f"must be >= 1 or null, got {self.bn_per_class}")

    def depth_at(self, image_size: int) -> int:
        """The ConvNet depth used for `image_size` px images (same rule as ExtractorConfig.depth_at)."""
        return self.depth if self.depth is not None else max(1, round(math.log2(image_size)) - 2)


@dataclass
class ParallelConfig:
    replicas: int = 1  # replica groups; world = replicas x shards

    def __post_init__(self) -> None:
        _check(self.replicas >= 1, "parallel.replicas", f"must be >= 1, got {self.replicas}")


@dataclass
class DeepSpeedConfig:
    """How DeepSpeed runs the synthetic images' optimizer (the optimizer itself is distill.optimizer / lr)."""
    zero_stage: int = 0  # ZeRO stage 0-3; partitions optimizer state (1), gradients (2), images (3) over replicas
    bf16: bool = False  # keep the images in bf16 with fp32 master weights (fp16 is refused on the CPU)
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state in host memory (needs zero_stage >= 1)
    gradient_clipping: float = 0.0  # global gradient-norm clip; 0 disables (DeepSpeed's own default is 1.0)
    extra: dict[str, Any] = field(default_factory=dict)  # raw DeepSpeed config keys, merged last

    def __post_init__(self) -> None:
        _check(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"must be 0-3, got {self.zero_stage}")
        _check(not self.offload_optimizer or self.zero_stage >= 1, "deepspeed.offload_optimizer",
               "needs deepspeed.zero_stage >= 1")
        _check(self.gradient_clipping >= 0, "deepspeed.gradient_clipping", "must be >= 0 (0 disables)")
        _check("fp16" not in self.extra, "deepspeed.extra.fp16", "fp16 is not supported; use deepspeed.bf16=true")


@dataclass
class Config:
    dataset: DataConfig = MISSING
    method: MethodConfig = MISSING
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)  # hard or soft labels stored with the set
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # the teacher of soft labels (csdm_dist.teacher)
    real_source: str = "images"  # `images`: featurise real batches every step; `features`: precomputed shards
    ipc: int = 10  # synthetic images per class
    seed: int = 0  # seeds every random draw of the run
    out_dir: Optional[str] = None  # the run directory; None: runs/<dataset>/<run_name> (see run_name())
    device: str = "auto"  # `auto` (cuda if present, else cpu), `cpu` or `cuda`
    # the extractor's forward pass (matching, feature shards): `bf16` autocast, `fp32`, or `auto` = bf16 where the
    # device computes it natively (CUDA with bf16; a CPU with AVX512-BF16 or AMX), else fp32. Statistics, losses
    # and the images stay fp32 (extractors.resolve_precision); evaluation networks always train in fp32
    precision: str = "auto"
    resume: bool = True  # continue the run of this configuration in out_dir; false: refused if out_dir holds a run
    overwrite: bool = False  # out_dir holds another run (or resume=false): move it aside to <out_dir>.old-<time>
    reevaluate: bool = False  # out_dir holds this finished run: evaluate it again instead of printing its table
    force_memory: bool = False  # start even when the memory estimate exceeds the memory available
    evaluate: bool = True  # evaluate the distilled set at the end of distillation
    baseline: bool = True  # also evaluate the random-real baseline and print both in the results table

    def __post_init__(self) -> None:
        _check(self.ipc >= 1, "ipc", f"must be >= 1, got {self.ipc}")
        _check(self.device in ("auto", "cpu", "cuda"), "device", f"{self.device!r} is not auto, cpu or cuda")
        _check(self.precision in PRECISIONS, "precision", f"{self.precision!r} is not one of {', '.join(PRECISIONS)}")
        _check(self.real_source in ("images", "features"), "real_source",
               f"{self.real_source!r} is not `images` or `features`")
        _check(self.real_source == "images" or (self.extractor.mode == "pool" and not self.extractor.interpolate),
               "real_source", "features need a fixed extractor: set extractor.mode=pool extractor.interpolate=false "
               "(the features were computed by the pool's trained networks)")
        self.synthetic.check(self.dataset.image_size)
        late = [x for x in self.eval.at_steps if x >= self.distill.iterations]
        _check(not late, "eval.at_steps", f"{late} are not below distill.iterations={self.distill.iterations} "
               "(the final set is always evaluated)")
        if self.eval.labels is None:  # the evaluation's label track follows what the set stores
            self.eval.labels = self.labels.kind
        _check(self.eval.labels == "hard" or self.labels.kind == "soft" or self.eval.relabel == "online",
               "eval.labels", "soft trains on the set's soft labels, but labels.kind=hard stores none; set "
               "labels.kind=soft (needs a teacher: python -m csdm_dist.teacher), eval.relabel=online (fresh teacher "
               "labels per batch), or eval.labels=hard")
        self.eval.check_track()
        if self.out_dir is None:
            self.out_dir = default_out_dir(self)


def run_steps(cfg: Config) -> int:
    """The steps a finished run of cfg has taken: distill.iterations, or 0 for method=random (real images)."""
    return 0 if cfg.method.name == "random" else cfg.distill.iterations


def run_name(cfg: Config) -> str:
    """The run's folder name: what a user sweeps (method, IPC, imbalance factor, seed, and the rest only when it
    differs from the default), so two such runs never share a folder. launch/submit.py uses the same rule."""
    parts = [cfg.method.name, f"ipc{cfg.ipc}"]
    if cfg.dataset.source != "imagenet_lt":  # ImageNet-LT's imbalance comes from its lists
        parts.append(f"if{cfg.dataset.imbalance_tag()}")
    if cfg.synthetic.factor != 1:
        parts.append(f"f{cfg.synthetic.factor}")
    order = cfg.dataset.class_permutation()
    if order is not None:  # another class order is another dataset
        parts.append(f"order{order_tag(order)}")
    parts.append(f"seed{cfg.seed}")
    return "-".join(parts)


def order_tag(class_order: list[int]) -> str:
    """Short stable hash of a class order, for folder names (`-order<tag>`: datasets and runs)."""
    return hashlib.sha256(json.dumps([int(r) for r in class_order]).encode()).hexdigest()[:8]


def default_out_dir(cfg: Config, root: str = "runs") -> str:
    return str(Path(root) / cfg.dataset.name / run_name(cfg))


def register_configs() -> None:
    """Store the schemas so that YAML files can start from them (`defaults: [base_dataset, _self_]`)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="dataset", name="base_dataset", node=DataConfig)
    cs.store(group="method", name="base_method", node=MethodConfig)
    cs.store(group="deepspeed", name="base_deepspeed", node=DeepSpeedConfig)
    cs.store(name="base_export", node=ExportConfig)


def unknown_keys(node: Any, schema: type, prefix: str = "") -> list[tuple[str, Optional[str]]]:
    """Keys of `node` (a mapping) that the dataclass `schema` does not have, recursively: (dotted key, the closest
    valid key or None). Free-form dict fields (e.g. deepspeed.extra) are not looked into."""
    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    out: list[tuple[str, Optional[str]]] = []
    for key in node.keys():
        if key == "hydra" and not prefix:  # Hydra's own node, in a composed config
            continue
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            out.append((prefix + str(key), prefix + close[0] if close else None))
            continue
        sub = hints[key]
        if dataclasses.is_dataclass(sub) and hasattr(node[key], "keys"):
            out += unknown_keys(node[key], sub, f"{prefix}{key}.")
    return out


def check_keys(node: Any, schema: type, prefix: str = "") -> None:
    """ConfigError naming every key the schema does not know, with the closest valid one."""
    bad = unknown_keys(node, schema, prefix)
    if bad:
        said = "; ".join(f"`{k}`" + (f" (did you mean `{near}`?)" if near else "") for k, near in bad)
        raise ConfigError(f"unknown config key{'s' if len(bad) > 1 else ''} {said}. `--cfg job` on the command line "
                          f"prints every valid key")


def to_config(cfg: DictConfig | dict[str, Any]) -> Config:
    """Refuse unknown keys, resolve interpolations and build the typed (validated) Config."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    check_keys(cfg, Config)
    merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, Config)
    return obj


EXPORT_FORMATS = ("imagefolder", "webdataset", "npz")


@dataclass
class ExportConfig:
    """`python -m csdm_dist.export`: a distilled set as ordinary files (csdm_dist/export.py, docs/export.md)."""
    run: Optional[str] = None  # the run directory of a finished distillation (its out_dir), or its distilled.pt
    format: Optional[str] = None  # one of EXPORT_FORMATS
    out: Optional[str] = None  # the folder written; None: <run dir>/export-<format>
    overwrite: bool = False  # out is not empty: move it aside to <out>.old-<time> (nothing is deleted)
    samples_per_shard: int = 2000  # webdataset: samples per tar shard
    # where the built datasets live (their manifests give the class names); None: the distilled set's
    # dataset.data_root, as it was when the set was distilled (relative paths: to the current directory)
    data_root: Optional[str] = None

    def __post_init__(self) -> None:
        _check(bool(self.run), "run", "missing; pass run=<run dir> (a finished distillation's out_dir) or "
               "run=<path>/distilled.pt")
        _check(self.format in EXPORT_FORMATS, "format", f"{self.format!r} is not one of {EXPORT_FORMATS}; pass "
               f"format={'|'.join(EXPORT_FORMATS)}")
        _check(self.samples_per_shard >= 1, "samples_per_shard", f"must be >= 1, got {self.samples_per_shard}")
