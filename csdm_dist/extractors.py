"""Feature extractors for matching: a fresh random network per step (DM), or an interpolated pretrained pool.

One working network lives on the device; `prepare(generator)` rewrites its weights in place for the step:
`random` re-draws them, `pool` picks member k and sets theta = l * theta_init + (1 - l) * theta_trained with
l ~ U(0, 1). The pool's weights are loaded once and kept on the device; nothing is reloaded per step.
"""
from __future__ import annotations

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
        if cfg.mode == "pool":
            self.pool = load_pool(Path(cfg.pool_path), self.net, device)
        self.autocast = device.type == "cuda"  # bf16 convolutions on CUDA; statistics stay fp32 (spectral.py)

    @torch.no_grad()
    def prepare(self, generator: torch.Generator) -> None:
        if not self.pool:
            reinit_(self.net, generator)
            return
        k = int(torch.randint(len(self.pool), (1,), generator=generator))
        lam = float(torch.rand((), generator=generator))
        init, trained = self.pool[k]
        params = list(self.net.parameters())
        torch._foreach_copy_(params, trained)
        torch._foreach_lerp_(params, init, lam)  # trained + lam * (init - trained)

    def embed(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            z = self.net.embed(x)
        z = z.float()
        return nn.functional.normalize(z, dim=1) if self.normalize else z

    @property
    def feature_dim(self) -> int:
        return self.net.feature_dim


def load_pool(path: Path, net: nn.Module, device: torch.device) -> list[tuple[list[Tensor], list[Tensor]]]:
    """Read a pool written by `csdm_dist.pretrain` and check it fits the configured network."""
    if not path.is_file():
        raise FileNotFoundError(f"extractor pool {path} not found; build it with `python -m csdm_dist.pretrain` "
                                "(same dataset and extractor settings) or use extractor.mode=random")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    names = [n for n, _ in net.named_parameters()]
    pool = []
    for i, member in enumerate(blob["members"]):
        if list(member["init"].keys()) != names:
            raise ValueError(f"pool {path} member {i} was trained for another network (parameter names differ); "
                             "rebuild it with the current extractor settings")
        pool.append(([member["init"][n].to(device) for n in names], [member["trained"][n].to(device) for n in names]))
    return pool
