"""The debiased teacher of the soft-label track: `python -m csdm_dist.teacher [dataset=...] [teacher.arch=...]`.

Trains teacher.arch on the long-tailed training shards with teacher.loss (logit_adjusted: cross-entropy on
logits + tau log pi_c; balanced_softmax: tau = 1; ce: plain; csdm_dist/softlabels.py), SGD with momentum 0.9 and
a cosine lr over teacher.epochs. Every rank reads the whole training split (as pretrain does) and the network is
wrapped in DistributedDataParallel over the world (gloo on the CPU, nccl on CUDA; a world of one is a world):
every rank draws the same batch order and takes the share batch[rank::world] of each batch, so the gradient is
that of the whole batch. Augmentation parameters are keyed by the sample id (rng.sample_uniforms).

After training, batch-norm statistics (if the network has any) are estimated again on a class-balanced pass:
teacher.bn_per_class images of every class (drawn with replacement for a class that has fewer), running stats
reset, momentum None (a cumulative average over the pass's batches, spread over the ranks and combined exactly).

The teacher file (labels.teacher, default `<dataset dir>/teachers/<settings>-s<seed>.pt`) holds the weights and
its provenance: the dataset build (name, config hash, ids hash, class counts, image shape, mean/std), the network
(arch, width, depth, norm) and the loss (name, effective tau). A run that uses it (labels.kind=soft,
eval.relabel=online) refuses a teacher made for another build, network or loss, naming the key. Its test accuracy
(overall, many / medium / few) is written beside it, `<same name>.json`.
"""
from __future__ import annotations

import logging
import math
import pickle
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import files, formation, rng
from .augment import NUM_UNIFORMS, augment, pick_op
from .config import Config, ConfigError, register_configs, to_config
from .data.manifest import build_provenance, check_provenance
from .data.normalization import resolve_normalization
from .data.shards import dataset_dir, load_manifest, read_split
from .dist import Runtime, close_distributed, init_distributed
from .distiller import Normalizer
from .errors import UserError, one_line_errors
from .evaluate import summarise, test_accuracy
from .models import build_network, reinit_
from .runinfo import git_commit, hardware
from .softlabels import prior_shifted, teacher_loss, training_tau

log = logging.getLogger("csdm_dist.teacher")

TEACHER_KIND = "csdm_dist teacher"
TEACHER_FORMAT = 1
# the provenance fields of the network and loss, each with the config key that sets it (the others: the build's)
NET_KEYS = {"arch": "teacher.arch", "width": "teacher.width", "depth": "teacher.depth", "norm": "teacher.norm",
            "loss": "teacher.loss", "tau": "teacher.tau", "tile_factors": "teacher.tile_factors"}
LABEL_BATCH = 512  # images per teacher forward when labelling


# ------------------------------------------------------------------------------------------------ paths, provenance

def default_teacher_path(cfg: Config) -> Path:
    """<dataset dir>/teachers/<arch[-w-d]>-<norm>-<loss>-e<epochs>[-f<tile factors>]-s<seed>.pt: one file per
    teacher setting (no -f part for sharp images alone)."""
    t = cfg.teacher
    net = f"{t.arch}-w{t.width}-d{t.depth_at(cfg.dataset.image_size)}" if t.arch == "convnet" else t.arch
    loss = f"la{t.tau:g}" if t.loss == "logit_adjusted" else {"balanced_softmax": "bs", "ce": "ce"}[t.loss]
    factors = tile_factors(t)
    tiles = "" if factors == [1] else "-f" + "".join(map(str, factors))
    return dataset_dir(cfg.dataset) / "teachers" / f"{net}-{t.norm}-{loss}-e{t.epochs}{tiles}-s{cfg.seed}.pt"


def teacher_path(cfg: Config) -> Path:
    """labels.teacher, else the default path of the teacher.* settings."""
    return Path(cfg.labels.teacher) if cfg.labels.teacher else default_teacher_path(cfg)


def results_path(path: Path) -> Path:
    """The teacher's accuracy record, beside it."""
    return Path(path).with_suffix(".json")


def teacher_provenance(cfg: Config, manifest: dict) -> dict:
    """What a teacher file must have been made with to serve this config (checked field by field)."""
    d, t = cfg.dataset, cfg.teacher
    convnet = t.arch == "convnet"
    return {**build_provenance(manifest, d), "arch": t.arch, "width": t.width if convnet else None,
            "depth": t.depth_at(d.image_size) if convnet else None, "norm": t.norm, "loss": t.loss,
            "tau": training_tau(t.loss, t.tau), "tile_factors": tile_factors(t)}


def tile_factors(t) -> list[int]:
    """teacher.tile_factors as a set: sorted, each once."""
    return sorted(set(t.tile_factors))


def check_teacher(path: Path, recorded: dict, want: dict) -> None:
    """ConfigError naming the key when the teacher in `path` was made for another dataset build or network."""
    recorded = {"tile_factors": [1], **recorded}  # files from before the key were trained on sharp images alone
    check_provenance(path, recorded, want, what="teacher", key="labels.teacher", net_keys=NET_KEYS,
                     rebuild="train one on this dataset with `python -m csdm_dist.teacher` and the same dataset "
                             "overrides, or point labels.teacher at a teacher of this build",
                     net_fix="pass the teacher.* settings it was made with (teacher.tau: the loss's tau; ce 0, "
                             "balanced_softmax 1), or train a teacher for these settings with "
                             "`python -m csdm_dist.teacher`")


# ------------------------------------------------------------------------------------------------ loading, labelling

@dataclass
class Teacher:
    net: nn.Module  # eval mode, on the device, frozen
    counts: list[int]  # the real class counts (pi_c) it was trained with
    path: Path
    sha256: str

    @torch.no_grad()
    def logits(self, images: Tensor, prior_adjust: float = 0.0) -> Tensor:
        """float32 [N, C]: the teacher's logits of normalised images, minus prior_adjust * log pi_c."""
        out = [self.net(images[i:i + LABEL_BATCH]).float() for i in range(0, len(images), LABEL_BATCH)]
        logits = torch.cat(out) if out else images.new_zeros((0, len(self.counts)))
        return prior_shifted(logits, self.counts, prior_adjust)


def teacher_network(cfg: Config) -> nn.Module:
    """The untrained teacher.* network for cfg.dataset (on the CPU, in train mode)."""
    d, t = cfg.dataset, cfg.teacher
    return build_network(t.arch, d.channels, d.num_classes, d.image_size, t.width, t.depth_at(d.image_size), t.norm)


def read_teacher(path: Path) -> tuple[dict, str]:
    """The contents of a teacher file and the sha256 of the bytes they were read from; refused (naming what to do)
    when it is not one."""
    try:
        blob, sha256 = files.load_torch(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        # torch's own message (a weights_only advice, several lines) does not help here: a teacher holds tensors
        raise UserError(f"{path} is not a readable teacher file ({type(e).__name__}): it is damaged or was not "
                        "written by `python -m csdm_dist.teacher`; train it again with that command") from e
    if not isinstance(blob, dict) or blob.get("kind") != TEACHER_KIND:
        raise UserError(f"{path} is not a teacher file (written by `python -m csdm_dist.teacher`); set "
                        "labels.teacher to one")
    return blob, sha256


def trained_network(blob: dict, channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The trained network of a teacher file's contents, built as its provenance records (CPU, eval mode, frozen)."""
    p = blob["provenance"]
    net = build_network(p["arch"], channels, num_classes, image_size, p["width"], p["depth"], p["norm"])
    net.load_state_dict(blob["state_dict"])
    for q in net.parameters():
        q.requires_grad_(False)
    return net.eval()


def load_teacher(cfg: Config, manifest: dict, device: torch.device) -> Teacher:
    """The teacher of this config (labels.teacher or the default path), checked against its dataset and network."""
    path = teacher_path(cfg)
    where = "labels.teacher" if cfg.labels.teacher else \
        "labels.teacher=null: the default path of the teacher.* settings"
    if not path.is_file():
        raise FileNotFoundError(f"no teacher at {path} ({where}); train it with `python -m csdm_dist.teacher` and the "
                                "same dataset and teacher overrides, or set labels.teacher=<teacher file>")
    blob, sha256 = read_teacher(path)
    check_teacher(path, blob["provenance"], teacher_provenance(cfg, manifest))  # the network recorded is cfg's
    d, t = cfg.dataset, cfg.teacher
    net = trained_network(blob, d.channels, d.num_classes, d.image_size).to(device)
    log.info("teacher %s (%s, %s loss, tau %g)", path, t.arch, t.loss, training_tau(t.loss, t.tau))
    return Teacher(net, blob["provenance"]["counts"], path, sha256)


# ------------------------------------------------------------------------------------------------ training

def balanced_indices(labels: Tensor, num_classes: int, per_class: int, generator: torch.Generator) -> Tensor:
    """per_class indices of every class (without replacement where the class has as many, else with), shuffled."""
    picks = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        if len(idx) == 0:
            raise ValueError(f"class {c} has no training image; a balanced pass needs every class")
        if len(idx) >= per_class:
            pick = torch.randperm(len(idx), generator=generator)[:per_class]
        else:
            pick = torch.randint(len(idx), (per_class,), generator=generator)
        picks.append(idx[pick])
    order = torch.cat(picks)
    return order[torch.randperm(len(order), generator=generator)]


@torch.no_grad()
def recalibrate_bn(net: nn.Module, images: Tensor, order: Tensor, norm: Normalizer, batch: int, rank: int,
                   world: int, device: torch.device) -> int:
    """Batch-norm running statistics again, as the plain average over the pass `order` (batches of `batch`,
    rank r taking batches r, r + world, ...; combined over the world). Returns the batches used (0: no BN)."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    batches = [order[i:i + batch] for i in range(0, len(order), batch)]
    if len(batches) > 1 and len(batches[-1]) < 2:  # one image: no batch statistics at a 1 px feature map
        batches = batches[:-1]
    mine = batches[rank::world]
    momentum = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = net.training
    net.train()
    for b in tqdm(mine, desc="teacher: balanced batch-norm pass", unit="batch", leave=False, dynamic_ncols=True,
                  disable=rank != 0):
        net(norm(images[b.to(images.device)].to(device)))
    if world > 1:  # each rank's average over its batches -> the average over all batches
        for m in bns:
            for buf in (m.running_mean, m.running_var):
                buf.mul_(len(mine))
                dist.all_reduce(buf)
                buf.div_(len(batches))
            dist.all_reduce(m.num_batches_tracked)
    for m, mom in zip(bns, momentum):
        m.momentum = mom
    net.train(was_training)
    return len(batches)


def cosine_lr(lr: float, step: int, total: int) -> float:
    """lr * (1 + cos(pi * step / total)) / 2."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


def fit(cfg: Config, images: Tensor, labels: Tensor, ids: Tensor, counts: list[int], norm: Normalizer,
        rt: Runtime) -> nn.Module:
    """The trained network (on rt.device); every rank returns the same weights."""
    t = cfg.teacher
    g = rng.generator(cfg.seed, rng.TEACHER)
    net = reinit_(teacher_network(cfg), g).to(rt.device).train()
    ddp = DistributedDataParallel(net, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    n, world = len(labels), rt.world_size
    starts = [i for i in range(0, n, t.batch_size) if min(t.batch_size, n - i) >= 2 * world]  # >= 2 per rank
    if not starts:
        raise ConfigError(f"invalid config `teacher.batch_size`: {n} training images give no batch of at least "
                          f"2 per rank over {world} ranks; lower the world size or raise teacher.batch_size")
    total = t.epochs * len(starts)
    factors = tile_factors(t)
    bar = tqdm(total=total, desc=f"teacher {t.arch} ({t.loss})", unit="batch", dynamic_ncols=True,
               disable=rt.rank != 0)  # progress inside each epoch: one epoch of a large set takes minutes on a CPU
    step = 0
    for epoch in range(t.epochs):
        bar.set_postfix(epoch=f"{epoch + 1}/{t.epochs}")
        perm = torch.randperm(n, generator=g)
        for i in starts:
            batch = perm[i:i + t.batch_size]
            mine = batch[rt.rank::world]
            for group in opt.param_groups:
                group["lr"] = cosine_lr(t.lr, step, total)
            x = norm(images[mine.to(images.device)])
            f = factors[0] if len(factors) == 1 else factors[int(torch.randint(len(factors), (1,), generator=g))]
            x = formation.as_decoded(x, f)  # the same factor on every rank
            if t.augment:
                op = pick_op(g)  # the same op on every rank; per-sample parameters keyed by the sample id
                x = augment(x, op, rng.sample_uniforms(ids[mine], cfg.seed, step, rng.TEACHER_AUG, NUM_UNIFORMS))
            # the sum over this rank's share, scaled so DDP's average over the ranks is the mean over the batch
            summed = teacher_loss(ddp(x), labels[mine].to(rt.device), counts, t.loss, t.tau, reduction="sum")
            opt.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # a 1-channel first conv's weight grad has other (equivalent) strides
                warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
                (summed * world / len(batch)).backward()
            opt.step()
            step += 1
            bar.update()
            bar.set_postfix(epoch=f"{epoch + 1}/{t.epochs}", loss=f"{summed.item() / len(mine):.3f}")
    bar.close()
    return net


def train_teacher(cfg: Config, rt: Runtime) -> Path:
    """Train, re-estimate batch norm on a balanced pass, test, and write the teacher file and its results JSON."""
    t0 = time.perf_counter()
    ddir = dataset_dir(cfg.dataset)
    manifest = load_manifest(ddir, cfg.dataset)
    cfg.dataset = resolve_normalization(cfg.dataset, manifest, ddir)  # empty dataset.mean/std: the build's
    path = teacher_path(cfg)
    prov = teacher_provenance(cfg, manifest)
    train = read_split(ddir, "train", 0, 1, cfg=cfg.dataset)
    counts = prov["counts"]
    norm = Normalizer.build(cfg.dataset.mean, cfg.dataset.std, rt.device)
    images = train.images.to(rt.device)
    net = fit(cfg, images, train.labels, train.ids, counts, norm, rt)
    t1 = time.perf_counter()
    c = cfg.dataset.num_classes
    per_class = cfg.teacher.bn_per_class or max(1, len(train.labels) // c)
    order = balanced_indices(train.labels, c, per_class, rng.generator(cfg.seed, rng.TEACHER_BN))
    bn_batches = recalibrate_bn(net, images, order, norm, cfg.teacher.batch_size, rt.rank, rt.world_size, rt.device)
    net.eval()
    t2 = time.perf_counter()
    if rt.is_main:
        test = read_split(ddir, "test", 0, 1, cfg=cfg.dataset)
        per = test_accuracy(net, test.images, test.labels, norm, c, 1000, rt.device).cpu()
        acc = summarise(per[None], per[None], counts)
        for k in ("std", "best_mean", "repeats"):  # one network, tested once
            acc.pop(k)
        decoded = {}  # the test set as a factor-f set would show it: what the teacher labels there
        for f in [f for f in tile_factors(cfg.teacher) if f > 1]:
            per_f = test_accuracy(net, test.images, test.labels, lambda x, f=f: formation.as_decoded(norm(x), f), c,
                                  1000, rt.device).cpu()
            decoded[str(f)] = {k: summarise(per_f[None], per_f[None], counts)[k]
                               for k in ("mean", "many", "medium", "few")}
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            log.info("replacing the teacher at %s", path)
        sha256 = files.save_torch({"kind": TEACHER_KIND, "format": TEACHER_FORMAT, "provenance": prov,
                                   "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                                   "teacher": asdict(cfg.teacher), "seed": cfg.seed, "accuracy": acc}, path)
        record = {"teacher": str(path), "sha256": sha256, "provenance": prov,
                  "teacher_config": asdict(cfg.teacher), "seed": cfg.seed, "world_size": rt.world_size,
                  "split": "test", "accuracy": acc, "accuracy_decoded": decoded,
                  "bn_pass": {"per_class": per_class, "batches": bn_batches},
                  "timing": {"train_s": t1 - t0, "bn_s": t2 - t1, "test_s": time.perf_counter() - t2},
                  "git_commit": git_commit(), "hardware": hardware(rt.device)}
        files.write_json(results_path(path), record)
        use = f"labels.teacher={path}" if cfg.labels.teacher else "(the default path of these teacher.* settings)"
        print(f"wrote the teacher to {path}\ntest accuracy {acc['mean']:.2f} (many {acc['many']:.2f}, medium "
              f"{acc['medium']:.2f}, few {acc['few']:.2f}); {results_path(path)}\n"
              f"use it with: labels.kind=soft {use}")
    if rt.world_size > 1:
        dist.barrier()  # every rank returns once the file is there
    return path


@hydra.main(version_base=None, config_path="../configs", config_name="teacher")
def main(dcfg: DictConfig) -> None:
    with one_line_errors(log):
        cfg = to_config(dcfg)
        torch.manual_seed(cfg.seed)
        rt = init_distributed(cfg.device)
        try:
            train_teacher(cfg, rt)
        finally:
            close_distributed()


if __name__ == "__main__":
    register_configs()
    main()
