"""DeepSpeed owns the synthetic images: each rank's slice is the one parameter of a DeepSpeed engine.

The layout goes in as `mpu` (data parallel = the replicas of a slice), so gradients are averaged over replicas
only and ZeRO partitions optimizer state across them; a rank whose replica group is itself applies its own
gradient unaveraged, which the straight-through statistics make exact. Deliberate choices, each against a
DeepSpeed default:
- the optimizer is built here from distill.optimizer / lr and passed in (DeepSpeed's `Adam` + `torch_adam`
  would silently become AdamW with weight decay 0.01);
- gradient clipping comes from deepspeed.gradient_clipping, 0 by default (DeepSpeed's default is 1.0, which
  would also make N ranks differ from 1, since each rank would clip its own slice);
- the C++ shared-memory collective op is not built (`build_shm_op` replaced): plain torch.distributed is used,
  and the first initialize takes no minute of compiling;
- fp16 is refused (config validation); bf16 keeps fp32 master weights;
- no DeepSpeed lr scheduler: the lr of step s is `lr_at(s, ...)`, a pure function, written into the optimizer's
  param groups before every step (`set_lr`), so a resumed run takes the same lrs without scheduler state.
The images are always read through `engine()` (the module's forward), which also works under ZeRO-3.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .config import Config, ConfigError, DistillConfig
from .dist import ParallelLayout, Runtime


class SyntheticImages(nn.Module):
    def __init__(self, images: Tensor):
        super().__init__()
        self.images = nn.Parameter(images.detach().clone())

    def forward(self) -> Tensor:
        return self.images


def ds_config(cfg: Config) -> dict[str, Any]:
    d = cfg.deepspeed
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    out = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": d.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": d.bf16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # the client optimizer runs on offloaded state as it is
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    out.update(d.extra)
    return out


def make_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    o = cfg.distill
    if o.optimizer == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=0.0)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum)


def lr_at(step: int, iterations: int, cfg: DistillConfig) -> float:
    """The learning rate of 0-based step `step` of `iterations` under cfg.lr_schedule (see DistillConfig).

    `constant` is cfg.lr at any step; the others are defined on 0 <= step < iterations only."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if step >= iterations:
        raise ValueError(f"step {step} is past distill.iterations={iterations}, where distill.lr_schedule="
                         f"{cfg.lr_schedule} ends")
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / iterations))
    if cfg.lr_schedule == "step":  # s / iterations is correctly rounded: 7 / 10 >= 0.7 holds
        return cfg.lr * cfg.lr_gamma ** sum(step / iterations >= f for f in cfg.lr_milestones)
    raise ValueError(f"unknown distill.lr_schedule {cfg.lr_schedule!r}")


def set_lr(engine, lr: float) -> None:
    """Write `lr` into every param group of the engine's optimizer (the ZeRO and bf16 wrappers forward
    param_groups to the client optimizer, which is the one that steps)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


@contextlib.contextmanager
def _local_rank_env(local_rank: int) -> Iterator[None]:
    """DeepSpeed insists on LOCAL_RANK; a world of one has none, so lend it for the call only."""
    had = "LOCAL_RANK" in os.environ
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    try:
        yield
    finally:
        if not had:
            del os.environ["LOCAL_RANK"]


def import_deepspeed(device: torch.device):
    """DeepSpeed with the accelerator of the run's device. DeepSpeed picks CUDA whenever it is present, so a
    device=cpu run on a GPU machine would move its images to cuda:LOCAL_RANK: DS_ACCELERATOR is set from the
    device before the first import, and an accelerator that still disagrees is refused. DeepSpeed's C++
    shared-memory op (a minute of g++ on first use) is not built: the run's collectives go through
    torch.distributed."""
    want = "cuda" if device.type == "cuda" else "cpu"
    os.environ.setdefault("DS_ACCELERATOR", want)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    got = get_accelerator().device_name()
    if got != want:
        raise ConfigError(f"invalid config `device`: the run is on {device} but DeepSpeed's accelerator is {got!r} "
                          f"(DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')!r}); unset DS_ACCELERATOR or set it to "
                          f"{want}")
    return deepspeed


def build_engine(images: Tensor, cfg: Config, layout: ParallelLayout, rt: Runtime):
    deepspeed = import_deepspeed(rt.device)

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    module = SyntheticImages(images).to(rt.device)
    with _local_rank_env(rt.local_rank):
        engine, *_ = deepspeed.initialize(model=module, optimizer=make_optimizer(module.parameters(), cfg),
                                          config=ds_config(cfg), mpu=layout,
                                          dist_init_required=False)
    return engine


def save_engine(engine, root: Path, tag: str, client_state: dict) -> None:
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)


def load_engine(engine, root: Path, tag: str) -> dict:
    path, client_state = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint {root / tag}; delete that folder or set resume=false")
    return client_state
