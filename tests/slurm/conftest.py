"""Fixtures for tests/slurm: a real two-node SLURM cluster on this machine, a tiny built dataset, and a runner for
`launch/submit.py` as a user types it.

The cluster (local_slurm.LocalSlurm) is started once per session in a fresh temporary folder, installing the Debian
packages first when they are missing; if that or the start fails, the tests that need it are skipped with the
reason. The daemons are stopped by PID at the end, whatever the tests did.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_slurm import LocalSlurm, ensure_installed  # noqa: E402
from slurm_helpers import ROOT  # noqa: E402


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = ensure_installed()
    if reason:
        pytest.skip(f"no SLURM on this machine: {reason}")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        t0 = time.monotonic()
        try:
            cluster.start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            pytest.skip(f"the local SLURM cluster did not start: {e}")
        print(f"\nlocal SLURM up in {time.monotonic() - t0:.1f} s ({cluster.root})")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> list[str]:
    """A built fake Fashion-MNIST-LT (10 classes, IF 10, 16 samples per shard: 8 train shards); its overrides."""
    from hydra import compose, initialize_config_dir

    from csdm_dist.config import register_configs, to_config
    from data_prep.build import build_dataset
    from fakes import write_fake_fashion_mnist

    root = tmp_path_factory.mktemp("fmnist")
    write_fake_fashion_mnist(root / "raw", n_per_class=30, num_classes=10, seed=0)
    over = [f"dataset.raw_root={root / 'raw'}", f"dataset.data_root={root / 'data'}", "dataset.imbalance_factor=10",
            "dataset.samples_per_shard=16", "dataset.n_max=null", "dataset.val_per_class=0"]
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        build_dataset(to_config(compose(config_name="config", overrides=over)).dataset)
    return over


