"""Pre-train the extractor pool: `python -m csdm_dist.pretrain [dataset=...] [extractor.pool_size=4]`.

Each member k starts from weights drawn by generator(seed, k) and trains on the long-tailed training set; the
pool file keeps both the initial and the trained parameters (mode=pool interpolates between them). Members are
spread over the ranks (member k on rank k mod world) and gathered, so the pool trains in parallel under torchrun.
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm import tqdm

from . import files, rng
from .augment import NUM_UNIFORMS, OPS, augment
from .config import Config, ConfigError, register_configs, to_config
from .data.manifest import build_provenance, check_provenance
from .data.normalization import resolve_normalization
from .data.shards import dataset_dir, load_manifest, read_split
from .dist import close_distributed, init_distributed
from .distiller import Normalizer
from .models import build_network, reinit_

log = logging.getLogger("csdm_dist.pretrain")

# the network fields of a pool's provenance, each with the config key that sets it
POOL_NET_KEYS = {"arch": "extractor.arch", "width": "extractor.width", "depth": "extractor.depth",
                 "norm": "extractor.norm"}


def default_pool_path(cfg: Config) -> Path:
    e = cfg.extractor
    name = f"{e.arch}-w{e.width}-d{e.depth_at(cfg.dataset.image_size)}-{e.norm}-k{e.pool_size}-s{cfg.seed}.pt"
    return dataset_dir(cfg.dataset) / "pools" / name


def pool_provenance(cfg: Config, manifest: dict) -> dict:
    """What a pool file must have been made with to serve this config: the dataset build its members trained on
    (a pool of another build may have seen this build's validation images) and the extractor network."""
    e = cfg.extractor
    convnet = e.arch == "convnet"  # width and depth shape a ConvNet only
    return {**build_provenance(manifest, cfg.dataset), "arch": e.arch, "width": e.width if convnet else None,
            "depth": e.depth_at(cfg.dataset.image_size) if convnet else None, "norm": e.norm}


def check_pool(path: Path, cfg: Config, manifest: dict) -> None:
    """Refuse (before a run or a feature extraction writes anything) a pool made from another dataset build or for
    another network, and a pool that does not say what it was made from (written before pools recorded it,
    2026-12-07)."""
    if not path.is_file():
        raise FileNotFoundError(f"extractor pool {path} not found; build it with `python -m csdm_dist.pretrain` "
                                "(same dataset and extractor settings) or use extractor.mode=random")
    blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # the members' tensors stay on disk
    rebuild = ("rebuild it with `python -m csdm_dist.pretrain` and this run's dataset and extractor overrides, or "
               "point extractor.pool_path at a pool of this build")
    recorded = blob.get("provenance") if isinstance(blob, dict) else None
    if recorded is None:
        raise ConfigError(f"invalid config `extractor.pool_path`: the pool {path} does not record the dataset build "
                          f"it was trained on (written before pools recorded it); {rebuild}")
    check_provenance(path, recorded, pool_provenance(cfg, manifest), what="pool", key="extractor.pool_path",
                     net_keys=POOL_NET_KEYS, rebuild=rebuild,
                     net_fix=f"pass the extractor.* settings it was made with, or {rebuild}")


def train_member(cfg: Config, k: int, images: torch.Tensor, labels: torch.Tensor, norm: Normalizer,
                 device: torch.device) -> dict:
    """{"init", "trained": parameters, "history": per epoch, the mean training loss and accuracy (%) over its
    augmented batches, to tell whether pool_epochs trained the member to convergence}."""
    d, e = cfg.dataset, cfg.extractor
    g = rng.generator(cfg.seed, k, rng.EXTRACTOR, 1_000_003)
    net = build_network(e.arch, d.channels, d.num_classes, d.image_size, e.width, e.depth_at(d.image_size), e.norm)
    net = reinit_(net, g)
    net = net.to(device).train()
    init = {n: p.detach().cpu().clone() for n, p in net.named_parameters()}
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    batch = 256
    per_epoch = -(-len(labels) // batch)
    bar = tqdm(total=e.pool_epochs * per_epoch, desc=f"pretrain member {k + 1}/{e.pool_size}", unit="batch",
               dynamic_ncols=True)  # progress inside each epoch: one epoch of a large set takes minutes on a CPU
    history = []
    for epoch in range(e.pool_epochs):
        shown = {"loss": f"{history[-1]['loss']:.3f}"} if history else {}
        bar.set_postfix(epoch=f"{epoch + 1}/{e.pool_epochs}", **shown)
        perm = torch.randperm(len(labels), generator=g).to(device)
        loss_sum = correct = torch.zeros((), device=device)
        for i in range(0, len(labels), batch):
            bar.update()
            idx = perm[i:i + batch]
            op = OPS[int(torch.randint(len(OPS), (1,), generator=g))]
            x = augment(norm(images[idx]), op, torch.rand(len(idx), NUM_UNIFORMS, generator=g))
            logits = net(x)
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum = loss_sum + loss.detach() * len(idx)
            correct = correct + (logits.detach().argmax(1) == labels[idx]).sum()
        history.append({"epoch": epoch + 1, "loss": float(loss_sum) / len(labels),  # host sync once per epoch
                        "accuracy": 100.0 * float(correct) / len(labels)})
    bar.close()
    if history:
        log.info("pool member %d: epoch %d training loss %.4f, accuracy %.2f %% (epoch %d: %.4f)", k,
                 history[-1]["epoch"], history[-1]["loss"], history[-1]["accuracy"], history[0]["epoch"],
                 history[0]["loss"])
    trained = {n: p.detach().cpu().clone() for n, p in net.named_parameters()}
    return {"init": init, "trained": trained, "history": history}


def pretrain(cfg: Config, rank: int, world: int, device: torch.device) -> Path:
    ddir = dataset_dir(cfg.dataset)
    manifest = load_manifest(ddir)
    cfg.dataset = resolve_normalization(cfg.dataset, manifest, ddir)  # empty mean/std: the build's
    data = read_split(ddir, "train", 0, 1)
    images, labels = data.images.to(device), data.labels.to(device)
    norm = Normalizer.build(cfg.dataset.mean, cfg.dataset.std, device)
    k_total = cfg.extractor.pool_size
    members: list[dict | None] = [None] * k_total
    for k in range(rank, k_total, world):
        members[k] = train_member(cfg, k, images, labels, norm, device)
    if world > 1:
        gathered: list[list] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, members)
        members = [next(m[k] for m in gathered if m[k] is not None) for k in range(k_total)]
    path = Path(cfg.extractor.pool_path) if cfg.extractor.pool_path else default_pool_path(cfg)
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.save_torch({"members": members, "dataset": cfg.dataset.name, "extractor": vars(cfg.extractor),
                          "provenance": pool_provenance(cfg, manifest)}, path)
        last = [m["history"][-1] for m in members if m["history"]]
        fit = (f"; last epoch's training loss {min(h['loss'] for h in last):.4f} to "
               f"{max(h['loss'] for h in last):.4f}, "
               f"accuracy {min(h['accuracy'] for h in last):.2f} to {max(h['accuracy'] for h in last):.2f} %"
               if last else "")
        print(f"wrote a pool of {k_total} to {path}{fit}\nuse it with: extractor.mode=pool extractor.pool_path={path}")
    return path


@hydra.main(version_base=None, config_path="../configs", config_name="pretrain")
def main(dcfg: DictConfig) -> None:
    cfg = to_config(dcfg)
    rt = init_distributed(cfg.device)
    try:
        pretrain(cfg, rt.rank, rt.world_size, rt.device)
    finally:
        close_distributed()


if __name__ == "__main__":
    register_configs()
    main()
