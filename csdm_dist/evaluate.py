"""Evaluate a distilled set: train fresh networks on it, test on the balanced test set.

Protocols (DESIGN.md section 7):
- `dm`: SGD lr 0.01, momentum 0.9, weight decay 5e-4, lr x0.1 at half the epochs, differentiable augmentation.
- `ncfm`: AdamW lr 1e-3, lr x0.5 at 20/40/60/80 % of the epochs, augmentation + CutMix.
Repeats are spread over all ranks (repeat r on rank r mod world) and gathered. Reported: mean and std over
repeats of the last-epoch accuracy (the population std, numpy's default, as DM's evaluation reports it), the best
tested epoch, per-class accuracy, the classes each class is mistaken for (top_confusions) and many / medium / few
groups.

Entry point: `python -m csdm_dist.evaluate distilled=<run>/distilled.pt [eval.repeats=...]`. A distilled.pt
stores its images as they are kept (multi-formation: f x f tiles each, key "factor"; absent in older files,
which are factor 1); they are decoded (formation.decode_set) before training.

Label tracks (eval.labels, reported apart): `hard` trains on cross-entropy with each image's class; `soft` on
T^2 KL(softmax(teacher logits / T) || softmax(student / T)) with the set's stored `soft_labels` at its stored
`temperature` (read by distilled.soft_probabilities, the one reader of stored soft labels), CutMix mixing the
targets with the image's lambda; with
eval.relabel=online the teacher labels every augmented batch afresh instead (csdm_dist/teacher.py). eval.arch
picks the network (convnet, resnet18, vgg11, alexnet: models.build_network) for cross-architecture evaluation.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import typing
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from . import files, rng
from .augment import NUM_UNIFORMS, OPS, augment
from .config import ConfigError, EvalConfig, ExtractorConfig, to_config
from .errors import UserError
from .models import build_network, reinit_
from .softlabels import kd_loss, soft_targets

if typing.TYPE_CHECKING:
    from .distilled import DecodedSet

log = logging.getLogger(__name__)


def class_groups(counts: list[int]) -> dict[str, list[int]]:
    """many / medium / few classes: by real count (>100, 20-100, <20) with >= 100 classes, else by thirds."""
    c = len(counts)
    if c >= 100:
        return {"many": [i for i, n in enumerate(counts) if n > 100],
                "medium": [i for i, n in enumerate(counts) if 20 <= n <= 100],
                "few": [i for i, n in enumerate(counts) if n < 20]}
    order = sorted(range(c), key=lambda i: -counts[i])
    third = round(c / 3)
    return {"many": sorted(order[:third]), "medium": sorted(order[third:c - third]), "few": sorted(order[c - third:])}


def _schedule(protocol: str, epochs: int) -> tuple[list[int], float]:
    if protocol == "dm":
        return [epochs // 2], 0.1
    return [int(epochs * f) for f in (0.2, 0.4, 0.6, 0.8)], 0.5


def _cutmix(x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor, float]:
    lam = float(torch.rand((), generator=g))  # Beta(1, 1)
    perm = torch.randperm(x.shape[0], generator=g).to(x.device)
    h, w = x.shape[2:]
    rh, rw = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
    cy, cx = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
    y0, y1, x0, x1 = max(cy - rh // 2, 0), min(cy + rh // 2, h), max(cx - rw // 2, 0), min(cx + rw // 2, w)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return x, y, y[perm], lam


@torch.no_grad()
def test_confusion(net: torch.nn.Module, test_x: Tensor, test_y: Tensor, norm, num_classes: int, batch: int,
                   device: torch.device) -> Tensor:
    """Confusion counts [num_classes, num_classes] on the (uint8) test set: row = true class, column = predicted."""
    net.eval()
    counts = torch.zeros(num_classes * num_classes, device=device)
    for i in tqdm(range(0, len(test_y), batch), desc=f"test ({len(test_y)} images)", unit="batch", leave=False,
                  dynamic_ncols=True):
        x = norm(test_x[i:i + batch].to(device))
        y = test_y[i:i + batch].to(device)
        counts += torch.bincount(y * num_classes + net(x).argmax(1), minlength=num_classes * num_classes).float()
    net.train()
    return counts.view(num_classes, num_classes)


def class_accuracy(confusion: Tensor) -> Tensor:
    """Per-class accuracy (recall) [C] of confusion counts [C, C]; 0 for a class with no test images."""
    return confusion.diagonal() / confusion.sum(1).clamp_min(1)


def test_accuracy(net: torch.nn.Module, test_x: Tensor, test_y: Tensor, norm, num_classes: int, batch: int,
                  device: torch.device) -> Tensor:
    """Per-class accuracy [num_classes] on the (uint8) test set."""
    return class_accuracy(test_confusion(net, test_x, test_y, norm, num_classes, batch, device))


def top_confusions(confusion: Tensor, k: int = 3) -> list[list[list]]:
    """For each true class, the (at most k) other classes its test images were most often predicted as, as
    [class, % of that class's test images], largest first; classes never predicted are left out. confusion: [C, C]
    counts (summed over networks, which the row sums then include)."""
    rate = 100 * confusion / confusion.sum(1, keepdim=True).clamp_min(1)
    rate.fill_diagonal_(0)
    top = rate.topk(min(k, rate.shape[1]), dim=1)
    return [[[int(j), float(v)] for v, j in zip(vals, idx) if v > 0] for vals, idx in zip(top.values, top.indices)]


def train_and_test(images: Tensor, labels: Tensor, test_x: Tensor, test_y: Tensor, norm, num_classes: int,
                   cfg: EvalConfig, net_cfg: ExtractorConfig, image_size: int, seed: int, repeat: int,
                   device: torch.device, desc: str, soft_probs: Optional[Tensor] = None,
                   temperature: Optional[float] = None,
                   relabel: Optional[Callable[[Tensor], Tensor]] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One repeat: (per-class accuracy at the last epoch, at the best tested epoch, the last epoch's confusion
    counts [C, C], the per-class accuracy at every tested epoch [test_points, C] in order: test_epochs(cfg)).

    Soft track: `soft_probs` [N, C] the images' target probabilities (softmax of the teacher's logits at
    `temperature`; KD at `temperature`), or `relabel(x)` -> the teacher's logits of each augmented batch; neither:
    hard labels. The random draws are the same on every track."""
    g = rng.generator(seed, repeat, rng.EVAL)
    net = build_network(cfg.arch, images.shape[1], num_classes, image_size, net_cfg.width, net_cfg.depth_at(image_size),
                        net_cfg.norm)
    net = reinit_(net, g).to(device).train()
    if cfg.protocol == "dm":
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    milestones, gamma = _schedule(cfg.protocol, cfg.epochs)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma)
    images, labels = images.to(device), labels.to(device)
    probs = None if soft_probs is None else soft_probs.to(device)
    soft_track = probs is not None or relabel is not None
    test_at = test_epochs(cfg)
    curve = []
    for epoch in tqdm(range(1, cfg.epochs + 1), desc=desc, leave=False, dynamic_ncols=True):
        perm = torch.randperm(len(labels), generator=g).to(device)
        for i in range(0, len(labels), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            x, y = images[idx], labels[idx]
            if soft_track:  # [soft-label probabilities | one-hot class], mixed alike by CutMix
                onehot = F.one_hot(y, num_classes).float()
                target = torch.cat([onehot if probs is None else probs[idx], onehot], 1)
            else:
                target = y  # class labels
            if cfg.augment:
                op = OPS[int(torch.randint(len(OPS), (1,), generator=g))]
                x = augment(x, op, torch.rand(len(idx), NUM_UNIFORMS, generator=g))
            mixed = cfg.protocol == "ncfm" and float(torch.rand((), generator=g)) < 0.5
            ya = yb = lam = None
            if mixed:  # CutMix: targets (labels or soft probabilities) mixed with the pixels' lambda
                x, ya, yb, lam = _cutmix(x, target, g)
            logits = net(x)
            if soft_track:
                t = lam * ya + (1 - lam) * yb if mixed else target
                if relabel is not None:  # the teacher labels the (mixed) batch as the student sees it
                    loss = kd_loss(logits, soft_targets(relabel(x), temperature), temperature)
                else:
                    loss = kd_loss(logits, t[:, :num_classes], temperature)
                if cfg.hard_weight > 0:
                    loss = (1 - cfg.hard_weight) * loss + cfg.hard_weight * F.cross_entropy(logits, t[:, num_classes:])
            elif mixed:
                loss = lam * F.cross_entropy(logits, ya) + (1 - lam) * F.cross_entropy(logits, yb)
            else:
                loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if epoch in test_at:
            confusion = test_confusion(net, test_x, test_y, norm, num_classes, cfg.test_batch_size, device)
            curve.append(class_accuracy(confusion))
    curve = torch.stack(curve)
    return curve[-1], curve[int(curve.mean(1).argmax())], confusion, curve  # the last, the first best


def test_epochs(cfg: EvalConfig) -> list[int]:
    """The epochs a network is tested after: eval.test_points of them, evenly spaced, the last at the final one."""
    return sorted({round(cfg.epochs * (k + 1) / cfg.test_points) for k in range(cfg.test_points)})


def evaluate_set(images: Tensor, labels: Tensor, test_x: Tensor, test_y: Tensor, norm, counts: list[int],
                 cfg: EvalConfig, net_cfg: ExtractorConfig, image_size: int, seed: int, rank: int, world: int,
                 device: torch.device, name: str, soft_probs: Optional[Tensor] = None,
                 temperature: Optional[float] = None, relabel: Optional[Callable[[Tensor], Tensor]] = None) -> dict:
    """Train cfg.repeats networks (spread over the world) and summarise their accuracy. eval.labels=soft needs
    `soft_probs` (the images' target probabilities, at `temperature`) or, with eval.relabel=online, `relabel`
    (see train_and_test)."""
    track = cfg.labels or "hard"
    online = cfg.relabel == "online"
    if (track == "soft") != (soft_probs is not None or relabel is not None) or online != (relabel is not None):
        raise ValueError(f"eval.labels={track}, eval.relabel={cfg.relabel} but given soft labels: "
                         f"{soft_probs is not None}, a relabelling teacher: {relabel is not None}")
    if track == "soft" and not (temperature is not None and temperature > 0):
        raise ValueError(f"soft labels need a temperature > 0, got {temperature!r}")
    if soft_probs is not None and tuple(soft_probs.shape) != (len(labels), len(counts)):
        raise ValueError(f"soft labels of shape {list(soft_probs.shape)} for {len(labels)} images of {len(counts)} "
                         f"classes")
    c = len(counts)
    acc = torch.zeros(2, cfg.repeats, c, device=device)
    tested = test_epochs(cfg)
    curves = torch.zeros(cfg.repeats, len(tested), c, device=device)
    confusion = torch.zeros(c, c, device=device)  # summed over the repeats
    for r in range(rank, cfg.repeats, world):
        last, best, conf, curves[r] = train_and_test(images, labels, test_x, test_y, norm, c, cfg, net_cfg,
                                                     image_size, seed, r, device,
                                                     desc=f"eval {name} {r + 1}/{cfg.repeats}", soft_probs=soft_probs,
                                                     temperature=temperature, relabel=relabel)
        acc[0, r], acc[1, r] = last, best
        confusion += conf
    if dist.is_initialized() and world > 1:
        dist.all_reduce(acc)  # each repeat was filled by exactly one rank
        dist.all_reduce(curves)
        dist.all_reduce(confusion)
    out = summarise(acc[0].cpu(), acc[1].cpu(), counts)
    # the overall accuracy after each tested epoch, averaged over the networks: how long the networks need
    out["at_epochs"] = {str(e): (100 * curves[:, k].mean(1)).mean().item() for k, e in enumerate(tested)}
    out["confused_with"] = top_confusions(confusion.cpu())
    out["train_images"] = len(labels)  # what the networks trained on (the decoded count under multi-formation)
    out["labels"], out["relabel"], out["arch"] = track, cfg.relabel, cfg.arch  # the track and network, reported apart
    out["hard_weight"] = cfg.hard_weight if track == "soft" else None
    return out


def summarise(last: Tensor, best: Tensor, counts: list[int]) -> dict:
    """last, best: [repeats, C] per-class accuracies -> the results.json `accuracy` block (in %)."""
    overall = 100 * last.mean(1)
    groups = class_groups(counts)
    out = {"mean": overall.mean().item(), "std": overall.std(unbiased=False).item(),
           "best_mean": (100 * best.mean(1)).mean().item(), "repeats": last.shape[0],
           "per_repeat": overall.tolist(),  # each network's overall accuracy: what mean and std summarise
           "per_class": (100 * last.mean(0)).tolist()}
    for g, idx in groups.items():
        out[g] = (100 * last[:, idx].mean()).item() if idx else float("nan")
    out["groups"] = groups
    return out




def stored_soft_targets(s: DecodedSet) -> tuple[Tensor, float]:
    """(the target probabilities [n_decoded, C] of a decoded distilled.pt, the temperature to train at); ConfigError
    naming eval.labels when the set has none, UserError when they come without a temperature."""
    if s.soft is None:
        raise ConfigError(f"invalid config `eval.labels`: soft trains on the set's soft labels, but {s.path} has none "
                          "(it was distilled with labels.kind=hard); pass eval.labels=hard, or eval.relabel=online "
                          "(fresh labels from the teacher file, labels.teacher), or distil again with labels.kind=soft")
    if s.temperature is None or not s.temperature > 0:  # probabilities need it too: the KD loss is taken at T
        raise UserError(f"{s.path}: soft_labels come without a temperature > 0 (got {s.temperature!r}); distil it "
                        "again")
    return s.soft, s.temperature


# eval_record_name's suffixes, in order: (EvalConfig key, its tag for a value; "" adds nothing). Every key but
# repeats is tagged only where it differs from the default; labels is resolved (hard or soft), so only soft is named
RECORD_TAGS = (("batch_size", lambda v: f"bs{v}"), ("augment", lambda v: "aug" if v else "noaug"),
               ("test_points", lambda v: f"tp{v}"), ("split", str), ("arch", str),
               ("labels", lambda v: "soft" if v == "soft" else ""), ("relabel", str),
               ("hard_weight", lambda v: f"hw{short_float(v)}"))


def short_float(v: float) -> str:
    """`v:g` (6 significant digits, "0.5"), or every digit where six would name two weights alike."""
    return f"{v:g}" if float(f"{v:g}") == v else repr(float(v))


def eval_record_name(ev: EvalConfig) -> str:
    """eval-<protocol>-<epochs>ep-x<repeats>[-bs<n>][-noaug][-tp<n>][-<split>][-<arch>][-soft[-online][-hw<w>]].json:
    one file per protocol, budget (epochs, networks, and the batch size, augmentation and test points where they
    differ from the defaults), split (named unless test), network and label track (with its class-term weight), so
    that no evaluation overwrites the record of another (a quick one-network check leaves a 3-network record be)."""
    d = EvalConfig()
    tags = [tag(getattr(ev, k)) for k, tag in RECORD_TAGS if getattr(ev, k) != getattr(d, k)]
    return f"eval-{ev.protocol}-{ev.epochs}ep-x{ev.repeats}" + "".join(f"-{t}" for t in tags if t) + ".json"


def evaluate_file(path: Path, overrides: dict, device: str = "auto", teacher: Optional[str] = None) -> dict:
    """Evaluate any distilled.pt with its own config's eval settings, updated by `overrides` (eval keys).
    `teacher`: the teacher file of eval.relabel=online (None: the one of the set's config, labels.teacher or the
    default path of its teacher.* settings); its provenance is checked against the set's config all the same."""
    from omegaconf import OmegaConf

    from .data.shards import dataset_dir, read_split
    from .dist import close_distributed, init_distributed
    from .distiller import Normalizer
    from .distilled import decoded_set

    t0 = time.perf_counter()
    s = decoded_set(path)  # the reader load_distilled uses; a missing or damaged file: its own message
    cfg = to_config(s.config)
    ev = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cfg.eval), overrides))
    if len(s.real_counts) != cfg.dataset.num_classes:  # the many / medium / few groups are drawn from them
        raise UserError(f"{path} stores class_counts {s.real_counts}, not one count per class of its "
                        f"{cfg.dataset.num_classes} classes; the file is damaged or not from csdm_dist.distill")
    if teacher is not None:
        if ev.relabel != "online":
            raise UserError(f"teacher={teacher}: a teacher file labels the batches of eval.relabel=online only (this "
                            f"evaluation has eval.relabel={ev.relabel}); pass eval.labels=soft eval.relabel=online, "
                            "or leave teacher out")
        cfg = dataclasses.replace(cfg, labels=dataclasses.replace(cfg.labels, teacher=str(teacher)))
    soft_probs = temperature = None
    if ev.labels == "soft" and ev.relabel == "none":  # checked before anything starts
        soft_probs, temperature = stored_soft_targets(s)
    rt = init_distributed(device)
    try:
        relabel, used = None, None
        if ev.relabel == "online":  # SRe2L: the teacher labels every augmented batch
            from .data.shards import load_manifest
            from .teacher import load_teacher

            labeller = load_teacher(cfg, load_manifest(dataset_dir(cfg.dataset)), rt.device)
            temperature = cfg.labels.temperature
            used = {"path": str(labeller.path), "sha256": labeller.sha256}

            def online(x: Tensor) -> Tensor:
                return labeller.logits(x, cfg.labels.prior_adjust)
            relabel = online
        test = read_split(dataset_dir(cfg.dataset), ev.split, 0, 1, cfg=cfg.dataset)
        norm = Normalizer.build(s.mean, s.std, rt.device)
        acc = evaluate_set(s.images.to(rt.device), s.labels, test.images, test.labels, norm,
                           s.real_counts, ev, cfg.extractor, cfg.dataset.image_size, cfg.seed, rt.rank,
                           rt.world_size, rt.device, name=cfg.method.name, soft_probs=soft_probs,
                           temperature=temperature, relabel=relabel)
        if rt.is_main:
            out = path.parent / eval_record_name(ev)
            files.write_json(out, {"distilled": str(path), "distilled_sha256": s.sha256, "eval": vars(ev),
                                   "labels": ev.labels, "temperature": temperature, "teacher": used, "accuracy": acc,
                                   "eval_s": time.perf_counter() - t0})
            track = ev.labels + (" (online relabelling)" if relabel is not None else "")
            print(f"{path}: {cfg.method.name}, {ev.protocol} protocol, {ev.epochs} epochs x {ev.repeats} repeats, "
                  f"labels: {track}, {ev.arch}\n"
                  f"overall {acc['mean']:.2f} +- {acc['std']:.2f} (best tested epoch {acc['best_mean']:.2f}), "
                  f"many {acc['many']:.2f}, medium {acc['medium']:.2f}, few {acc['few']:.2f}, "
                  f"on the {ev.split} split in {time.perf_counter() - t0:.0f} s\nwrote {out}")
        return acc
    finally:
        close_distributed()


def cli_schema() -> type:
    """The schema of `python -m csdm_dist.evaluate`: distilled, device, and every EvalConfig key as an optional
    override (None: keep the value the set was made with), so `eval.protocol=ncfm` works without a `+`."""
    hints = typing.get_type_hints(EvalConfig)
    overrides = dataclasses.make_dataclass("EvalOverrides", [
        (f.name, Optional[hints[f.name]], dataclasses.field(default=None)) for f in dataclasses.fields(EvalConfig)])
    return dataclasses.make_dataclass("EvaluateCli", [
        ("distilled", str, dataclasses.field(default="???")), ("device", str, dataclasses.field(default="auto")),
        ("teacher", Optional[str], dataclasses.field(default=None)),
        ("eval", overrides, dataclasses.field(default_factory=overrides))])


def _hydra_main() -> None:
    import hydra
    from hydra.core.config_store import ConfigStore
    from omegaconf import DictConfig, OmegaConf

    from .errors import one_line_errors

    ConfigStore.instance().store(name="base_evaluate", node=cli_schema())

    @hydra.main(version_base=None, config_path="../configs", config_name="evaluate")
    def main(dcfg: DictConfig) -> None:
        with one_line_errors(log):
            given = {k: v for k, v in OmegaConf.to_container(dcfg.eval).items() if v is not None}
            evaluate_file(Path(dcfg.distilled), given, dcfg.device, dcfg.teacher)

    main()


if __name__ == "__main__":
    _hydra_main()
