"""The synthetic set: class-major global ids (id = c * ipc + j, label = c), sharded round-robin over the shard
group (rank s holds ids s, s + shards, ...). Initialisation picks, per class, the ipc real images with the
smallest hash keys over the whole real set, wherever they live, so every world size starts from the same images.

With multi-formation (synthetic.factor f > 1, csdm_dist/formation.py) the set still holds ipc stored images per
class, and these ids, labels and slices are the stored ones; each rank decodes its own stored images into f^2
samples (ids stored_id * f^2 + k) before the extractor. distill.init=mix picks ipc * f^2 real images per class
with the same global rule and `mix_order` assigns them to tiles.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from . import rng
from .config import ConfigError
from .dist import ParallelLayout, all_reduce_sum

log = logging.getLogger(__name__)

_NO_KEY = 2.0  # larger than any uniform key: an empty slot


@dataclass
class SyntheticSet:
    """This rank's slice of the synthetic set. `images` is the starting point; once distillation starts, the
    DeepSpeed engine owns the live images (engine.py)."""
    images: Tensor  # [n_local, C, H, W] float, normalised pixel space
    labels: Tensor  # [n_local]
    ids: Tensor  # [n_local] global ids
    num_classes: int
    ipc: int

    @classmethod
    def from_full(cls, full: Tensor, num_classes: int, ipc: int, layout: ParallelLayout) -> "SyntheticSet":
        ids = torch.arange(layout.shard_rank, num_classes * ipc, layout.shards, device=full.device)
        return cls(full[ids].clone(), ids // ipc, ids, num_classes, ipc)

    def gather(self, local: Tensor, layout: ParallelLayout) -> Tensor:
        """The whole set [C * ipc, ...] from every rank's `local` slice, on every rank of the shard group."""
        full = torch.zeros((self.num_classes * self.ipc, *local.shape[1:]), device=local.device)
        full[self.ids] = local.detach().float()
        return all_reduce_sum(full, layout.shard_group)


def pick_real_init(images: Tensor, labels: Tensor, ids: Tensor, num_classes: int, ipc: int, seed: int,
                   layout: ParallelLayout, policy: str, need: str | None = None) -> Tensor:
    """uint8 images [C * ipc, ...] chosen from the real set spread over the shard group; the same on every rank.

    Per class, the images in ascending key order: the first m of a pick of ipc >= m are a pick of m. A class with
    fewer than ipc real images follows `policy`: `repeat` cycles its images (logged), `error` raises. `need` names
    the count in those messages (default `ipc=<ipc>`).
    """
    need = need or f"ipc={ipc}"
    dev = images.device
    keys = rng.sample_uniforms(ids, seed, 0, rng.INIT).squeeze(1).to(dev)
    order = torch.argsort(labels.double() * 4 + keys.double())  # by class, then by key
    sorted_labels = labels[order]
    per_class = torch.bincount(labels, minlength=num_classes)
    starts = torch.cumsum(per_class, 0) - per_class
    pos = torch.arange(len(order), device=dev) - starts[sorted_labels]
    take = pos < ipc
    cand_key = torch.full((num_classes, ipc), _NO_KEY, device=dev)
    cand_idx = torch.full((num_classes, ipc), -1, dtype=torch.long, device=dev)
    cand_key[sorted_labels[take], pos[take]] = keys[order[take]]
    cand_idx[sorted_labels[take], pos[take]] = order[take]

    # every rank's best ipc candidates per class -> the global best ipc per class
    gathered = [torch.empty_like(cand_key) for _ in range(layout.shards)]
    dist.all_gather(gathered, cand_key, group=layout.shard_group)
    all_keys = torch.cat(gathered, dim=1)  # [C, shards * ipc]; column = shard * ipc + j
    best_key, best_col = torch.sort(all_keys, dim=1)
    best_key, best_col = best_key[:, :ipc], best_col[:, :ipc]
    available = (best_key < _NO_KEY).sum(1)  # host sync: once, at init
    short = [(c, int(n)) for c, n in enumerate(available.tolist()) if n < ipc]
    for c, n in short:
        if n == 0:
            raise ValueError(f"class {c} has no real images; rebuild the dataset or drop the class")
        if policy == "error":
            raise ConfigError(f"invalid config `ipc`: class {c} has {n} real images but {need}; lower ipc or set "
                              "distill.small_class_policy=repeat")
    if short:  # one warning for all of them
        log.warning("%d of %d classes have fewer real images than %s: %s; repeating their real images at init "
                    "(distill.small_class_policy=repeat)", len(short), num_classes, need,
                    ", ".join(f"class {c} has {n}" for c, n in short))
    slot = torch.arange(ipc, device=dev).unsqueeze(0) % available.clamp_min(1).unsqueeze(1)  # cycle short classes
    col = torch.gather(best_col, 1, slot)
    owner, j = col // ipc, col % ipc

    out = torch.zeros((num_classes, ipc, *images.shape[1:]), dtype=torch.int32, device=dev)
    mine = owner == layout.shard_rank
    rows = torch.arange(num_classes, device=dev).unsqueeze(1).expand_as(j)
    out[mine] = images[cand_idx[rows[mine], j[mine]]].to(torch.int32)
    dist.all_reduce(out, group=layout.shard_group)  # each slot is filled by exactly one rank
    return out.flatten(0, 1).to(torch.uint8)


def mix_order(picks: Tensor, num_classes: int, ipc: int, factor: int) -> Tensor:
    """[C * ipc * f^2, ...] per-class picks (pick_real_init with ipc * f^2) -> the same images in the order that
    formation.mix turns into [C * ipc] stored images: tile k of stored image j of class c is pick k * ipc + j of
    class c. Tile 0 of each stored image is thus the image a `real` init (a pick of ipc) starts that image from."""
    k = factor * factor
    per = picks.reshape(num_classes, k, ipc, *picks.shape[1:])
    return per.transpose(1, 2).reshape(num_classes * ipc * k, *picks.shape[1:])
