"""Tiny in-process runs for the integration tests: the real Hydra configs (compose) and `csdm_dist.distill.run`
as a world of one."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from csdm_dist.config import register_configs, to_config
from csdm_dist.dist import close_distributed, init_distributed
from csdm_dist.distill import run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["ipc=2", "extractor.width=16", "extractor.depth=2", "method.kernel.num_freqs=64",
        "distill.real_per_class=8", "distill.log_every=2", "distill.image_every=3", "eval.epochs=2",
        "eval.repeats=1", "eval.test_batch_size=256", "device=cpu"]


def compose_cfg(overrides, name="config"):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name=name, overrides=overrides)


def distil(overrides):
    cfg = to_config(compose_cfg(overrides))
    rt = init_distributed(cfg.device)
    try:
        return cfg, run(cfg, rt)
    finally:
        close_distributed()
