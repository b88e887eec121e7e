"""real_source=features: precomputed feature shards give the same statistics and the same synthetic images as
featurising every real image each step, on 1 rank (in-process) and on 2 ranks (torchrun); mismatched shards are
refused. A fixed extractor (a pretrained pool without interpolation) and no augmentation make the two equal.

Run: .venv/bin/python -m pytest tests/integration/test_features.py -q
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from csdm_dist import spectral as S
from csdm_dist.config import ConfigError, to_config
from csdm_dist.data.features import features_dir, read_features
from csdm_dist.data.shards import dataset_dir, read_split
from csdm_dist.dist import close_distributed, init_distributed
from csdm_dist.distiller import Normalizer
from csdm_dist.extractors import Extractor
from csdm_dist.pretrain import pretrain
from data_prep.extract_features import extract
from runs import TINY, compose_cfg, distil

ROOT = Path(__file__).resolve().parents[2]
# the real batch covers every image (p_c = 1) and nothing is augmented: images and features see the same data
EXACT = ["distill.augment=false", "distill.real_per_class=100000", "evaluate=false", "features.dtype=float32"]
# Plain SGD on the pixels, so that an image difference is the gradient difference times lr. Under Adam, whose
# update is close to +-lr for any gradient, float rounding that flips a near-zero gradient (summation order across
# ranks, one batched pass vs the extraction's chunks) moves its pixel by up to 2 lr: observed 0.1 to 0.65 lr after
# 4 steps, so no tolerance both holds and tests anything. With SGD at lr 1 the pixels move by ~0.1 in 4 steps and
# the two paths differ by ~1e-7 (1 vs 2 ranks) or 0 (images vs features), measured 2026-12-03.
SGD = ["distill.iterations=4", "distill.optimizer=sgd", "distill.lr=1"]
ATOL = 1e-4  # 1e3 times below how far the pixels move, 1e3 times above the observed rounding


def initial_and_final(out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.load(out.with_name(out.name + "-init") / "distilled.pt", weights_only=False)["images"],
            torch.load(out / "distilled.pt", weights_only=False)["images"])


def in_world_of_one(fn, *args):
    rt = init_distributed("cpu")
    try:
        return fn(*args, rt)
    finally:
        close_distributed()


@pytest.fixture(scope="module")
def fixed(data_overrides, tmp_path_factory):
    """A one-member pool (trained 1 epoch) and its feature shards; the overrides that select them."""
    root = tmp_path_factory.mktemp("features")
    pools = {}
    for name, seed in (("pool", 0), ("other", 1)):
        pools[name] = root / f"{name}.pt"
        cfg = to_config(compose_cfg(data_overrides + TINY + ["extractor.pool_size=1", "extractor.pool_epochs=1",
                                                             f"seed={seed}", f"extractor.pool_path={pools[name]}"],
                                    name="pretrain"))
        in_world_of_one(lambda c, rt: pretrain(c, rt.rank, rt.world_size, rt.device), cfg)
    over = data_overrides + TINY + EXACT + ["extractor.mode=pool", "extractor.interpolate=false",
                                            f"extractor.pool_path={pools['pool']}"]
    in_world_of_one(extract, to_config(compose_cfg(over, name="extract_features")))
    return over, pools


def test_shards_hold_the_extractor_features(fixed):
    over, _ = fixed
    cfg = to_config(compose_cfg(over))
    f = read_features(features_dir(cfg))
    real = read_split(dataset_dir(cfg.dataset), "train")
    d = cfg.dataset
    ext = Extractor(cfg.extractor, d.channels, d.num_classes, d.image_size, torch.device("cpu"), normalize=True,
                    precision=cfg.precision)
    ext.use_member(0)
    order = torch.argsort(real.ids)
    with torch.no_grad():
        z = ext.raw_embed(Normalizer.build(d.mean, d.std, torch.device("cpu"))(real.images[order]))
    assert f.feats.shape == (1, 1, len(real.ids), ext.feature_dim)
    torch.testing.assert_close(f.feats[0, 0][torch.argsort(f.ids)], z, atol=1e-5, rtol=1e-4)
    # hence the same per-class statistics at any frequencies
    t = S.sample_frequencies("gaussian", 32, ext.feature_dim, 1.0, torch.Generator().manual_seed(0))
    a = S.class_statistics(ext.finish(f.feats[0, 0]), f.labels, d.num_classes, t)
    b = S.class_statistics(ext.finish(z), real.labels[order], d.num_classes, t)
    torch.testing.assert_close(a[0], b[0], atol=1e-3, rtol=1e-4)
    assert torch.equal(a[1], b[1])


def test_features_and_images_give_the_same_synthetic_images(fixed, tmp_path):
    over, _ = fixed
    _, res_i = distil(over + SGD + [f"out_dir={tmp_path / 'images'}"])
    _, res_f = distil(over + SGD + ["real_source=features", f"out_dir={tmp_path / 'features'}"])
    distil(over + SGD + ["distill.iterations=0", f"out_dir={tmp_path / 'images-init'}"])
    assert res_i["real_source"] == "images" and res_f["real_source"] == "features"
    start, a = initial_and_final(tmp_path / "images")
    b = torch.load(tmp_path / "features" / "distilled.pt", weights_only=False)["images"]
    assert (a - start).abs().max() > 100 * ATOL, "the images hardly moved: the comparison would be trivial"
    assert (a - b).abs().max() < ATOL, (a - b).abs().max()


def test_two_ranks_with_features_match_one(fixed, tmp_path):
    over, _ = fixed
    common = over + SGD + ["real_source=features", "device=cpu", "precision=fp32"]  # fp32's sums
    distil(common + [f"out_dir={tmp_path / 'one'}"])
    distil(common + ["distill.iterations=0", f"out_dir={tmp_path / 'one-init'}"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "csdm_dist.distill", *common, f"out_dir={tmp_path / 'two'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    start, a = initial_and_final(tmp_path / "one")
    b = torch.load(tmp_path / "two" / "distilled.pt", weights_only=False)["images"]
    assert (a - start).abs().max() > 100 * ATOL, "the images hardly moved: the comparison would be trivial"
    assert (a - b).abs().max() < ATOL, (a - b).abs().max()  # fp32 summation order across ranks (see SGD)


def test_mismatched_extractor_is_refused(fixed, tmp_path):
    over, pools = fixed
    cfg = to_config(compose_cfg(over))
    other = [o for o in over if not o.startswith("extractor.pool_path")] + [
        f"extractor.pool_path={pools['other']}", f"features.dir={features_dir(cfg)}", "real_source=features",
        "distill.iterations=1", f"out_dir={tmp_path}"]
    with pytest.raises(ValueError, match="pool_sha256"):
        distil(other)


def test_extraction_refuses_a_pool_of_unknown_build(fixed, tmp_path):
    over, pools = fixed
    legacy = tmp_path / "legacy.pt"  # a pool written before pools recorded their dataset build
    torch.save({k: v for k, v in torch.load(pools["pool"], weights_only=True).items() if k != "provenance"}, legacy)
    cfg = to_config(compose_cfg([o for o in over if not o.startswith("extractor.pool_path")] + [
        f"extractor.pool_path={legacy}", f"features.dir={tmp_path / 'features'}"], name="extract_features"))
    with pytest.raises(ConfigError, match=r"`extractor\.pool_path`: .* does not record the dataset build"):
        in_world_of_one(extract, cfg)
    assert not (tmp_path / "features").exists()


def test_features_need_a_fixed_extractor():
    with pytest.raises(ConfigError, match="real_source"):
        to_config(compose_cfg(["real_source=features"]))
