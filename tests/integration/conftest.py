"""A tiny fake Fashion-MNIST-LT (10 classes, 30 to 3 images, IF 10) built once per test session."""
import pytest

from csdm_dist.config import to_config
from data_prep.build import build_dataset
from fakes import write_fake_fashion_mnist
from runs import compose_cfg


@pytest.fixture(scope="session")
def data_overrides(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist")
    write_fake_fashion_mnist(root / "raw", n_per_class=30, num_classes=10, seed=0)
    over = [f"dataset.raw_root={root / 'raw'}", f"dataset.data_root={root / 'data'}", "dataset.imbalance_factor=10",
            "dataset.n_max=null", "dataset.val_per_class=0"]
    build_dataset(to_config(compose_cfg(over)).dataset)
    return over
