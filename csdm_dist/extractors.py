"""Feature extractors for matching: a fresh random network per step (DM), or an interpolated pretrained pool.

One working network lives on the device; `prepare(generator)` rewrites its weights in place for the step:
`random` re-draws them, `pool` picks member k and sets theta = l * theta_init + (1 - l) * theta_trained with
l ~ U(0, 1) (or the trained weights as they are, `interpolate=false`: a fixed extractor, whose real features can
be precomputed). The pool's weights are loaded once and kept on the device; nothing is reloaded per step.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import ExtractorConfig
from .models import build_network, reinit_


class Extractor:
    def __init__(self, cfg: ExtractorConfig, channels: int, num_classes: int, image_size: int,
                 device: torch.device, normalize: bool):
        self.cfg, self.normalize, self.device = cfg, normalize, device
        self.net = build_network(cfg.arch, channels, num_classes, image_size, cfg.width, cfg.depth_at(image_size), cfg.norm).to(device)
        self.net.eval()  # batchnorm (if chosen) uses batch statistics only in training; extractors are not trained
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.pool: list[tuple[list[Tensor], list[Tensor]]] = []
        self.pool_sha256 = None
        if cfg.mode == "pool":
            self.pool, self.pool_sha256 = load_pool(Path(cfg.pool_path), self.net, device)
        self.autocast = device.type == "cuda"  # bf16 convolutions on CUDA; statistics stay fp32 (spectral.py)

    @torch.no_grad()
    def prepare(self, generator: torch.Generator) -> int:
        """Set this step's weights; returns the pool member used (-1 for a random network)."""
        if not self.pool:
            reinit_(self.net, generator)
            return -1
        k = int(torch.randint(len(self.pool), (1,), generator=generator))
        lam = float(torch.rand((), generator=generator)) if self.cfg.interpolate else 0.0
        init, trained = self.pool[k]
        params = list(self.net.parameters())
        torch._foreach_copy_(params, trained)
        if lam:
            torch._foreach_lerp_(params, init, lam)  # trained + lam * (init - trained)
        return k

    @torch.no_grad()
    def use_member(self, k: int) -> None:
        """The trained weights of pool member k (feature extraction)."""
        torch._foreach_copy_(list(self.net.parameters()), self.pool[k][1])

    def embed(self, x: Tensor) -> Tensor:
        return self.finish(self.raw_embed(x))

    def raw_embed(self, x: Tensor) -> Tensor:
        """Penultimate features in fp32 (what feature shards store)."""
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.net.embed(x).float()

    def finish(self, z: Tensor) -> Tensor:
        """The method's feature map on raw features: L2 normalisation when the method asks for it."""
        return nn.functional.normalize(z.float(), dim=1) if self.normalize else z.float()

    @property
    def feature_dim(self) -> int:
        return self.net.feature_dim


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (pools, teachers and distilled sets can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_pool(path: Path, net: nn.Module, device: torch.device) -> tuple[list[tuple[list[Tensor], list[Tensor]]], str]:
    """Read a pool written by `csdm_dist.pretrain`, check it fits the configured network; also its file's sha256."""
    if not path.is_file():
        raise FileNotFoundError(f"extractor pool {path} not found; build it with `python -m csdm_dist.pretrain` "
                                "(same dataset and extractor settings) or use extractor.mode=random")
    sha = file_sha256(path)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    names = [n for n, _ in net.named_parameters()]
    pool = []
    for i, member in enumerate(blob["members"]):
        if list(member["init"].keys()) != names:
            raise ValueError(f"pool {path} member {i} was trained for another network (parameter names differ); "
                             "rebuild it with the current extractor settings")
        pool.append(([member["init"][n].to(device) for n in names], [member["trained"][n].to(device) for n in names]))
    return pool, sha
