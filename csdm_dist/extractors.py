"""Feature extractors for matching: a fresh random network per step (DM), or an interpolated pretrained pool.

One working network lives on the device; `prepare(generator)` rewrites its weights in place for the step:
`random` re-draws them, `pool` picks member k and sets theta = l * theta_init + (1 - l) * theta_trained with
l ~ U(0, 1) (or the trained weights as they are, `interpolate=false`: a fixed extractor, whose real features can
be precomputed). The pool's weights are loaded once and kept on the device; nothing is reloaded per step.

The forward runs under bf16 autocast when `precision` resolves to bf16 (resolve_precision); its output is cast to
fp32, so the statistics, the loss and the images' gradients are fp32 whatever the precision.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .config import ConfigError, ExtractorConfig
from .files import load_torch
from .models import build_network, reinit_


class Extractor:
    def __init__(self, cfg: ExtractorConfig, channels: int, num_classes: int, image_size: int,
                 device: torch.device, normalize: bool, precision: str):
        self.cfg, self.normalize, self.device = cfg, normalize, device
        self.precision = resolve_precision(precision, device)  # `fp32` or `bf16`
        self.net = build_network(cfg.arch, channels, num_classes, image_size, cfg.width, cfg.depth_at(image_size),
                                 cfg.norm).to(device)
        self.net.eval()  # batchnorm (if chosen) uses batch statistics only in training; extractors are not trained
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.pool: list[tuple[list[Tensor], list[Tensor]]] = []
        self.pool_sha256 = None
        if cfg.mode == "pool":
            self.pool, self.pool_sha256 = load_pool(Path(cfg.pool_path), self.net, device)
        self.autocast = self.precision == "bf16"  # bf16 convolutions; statistics stay fp32 (spectral.py)

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


def bf16_support(device: torch.device) -> tuple[bool, str]:
    """(whether `device` computes bf16 natively, what was found): CUDA's own answer; on a CPU, AVX512-BF16 or AMX
    (without them oneDNN emulates bf16, slower than fp32)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return (True, f"{name} supports bf16") if torch.cuda.is_bf16_supported() else (False, f"{name} lacks bf16")
    found = [name for name, probe in (("AVX512-BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported"))
             if getattr(torch.cpu, probe, lambda: False)()]
    return (True, f"this CPU has {' and '.join(found)}") if found else \
        (False, "this CPU has neither AVX512-BF16 nor AMX (bf16 would be emulated, slower than fp32)")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`, `fp32` or `bf16` (config `precision`) -> the precision the extractor runs in on `device`.
    bf16 where it is not native is refused: a ConfigError naming the key, with the reason."""
    native, found = bf16_support(device)
    if precision == "auto":
        return "bf16" if native else "fp32"
    if precision == "bf16" and not native:
        raise ConfigError(f"invalid config `precision`: bf16 on {device.type}, but {found}; "
                          "use precision=fp32 or precision=auto")
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"invalid config `precision`: {precision!r} is not auto, fp32 or bf16")
    return precision


def load_pool(path: Path, net: nn.Module, device: torch.device) -> tuple[list[tuple[list[Tensor], list[Tensor]]], str]:
    """Read a pool written by `csdm_dist.pretrain`, check it fits the configured network; also its file's sha256."""
    if not path.is_file():
        raise FileNotFoundError(f"extractor pool {path} not found; build it with `python -m csdm_dist.pretrain` "
                                "(same dataset and extractor settings) or use extractor.mode=random")
    blob, sha = load_torch(path, weights_only=True)
    names = [n for n, _ in net.named_parameters()]
    pool = []
    for i, member in enumerate(blob["members"]):
        if list(member["init"].keys()) != names:
            raise ValueError(f"pool {path} member {i} was trained for another network (parameter names differ); "
                             "rebuild it with the current extractor settings")
        pool.append(([member["init"][n].to(device) for n in names], [member["trained"][n].to(device) for n in names]))
    return pool, sha
