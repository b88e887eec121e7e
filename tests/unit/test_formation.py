"""Multi-formation (csdm_dist/formation.py), the init=mix assembly and the distill lr schedule, against exact
expectations: hand-made tile grids, F.interpolate, constant images whose value names the real image.

Run: .venv/bin/python -m pytest tests/unit/test_formation.py -q
"""
import math

import pytest
import torch
import torch.nn.functional as F

from csdm_dist import formation
from csdm_dist.config import ConfigError, DistillConfig, SyntheticConfig, to_config
from csdm_dist.dist import ParallelLayout, close_distributed, init_distributed
from csdm_dist.distill import initial_images
from csdm_dist.distiller import Normalizer, RealData
from csdm_dist.engine import lr_at
from csdm_dist.synthetic import mix_order, pick_real_init
from runs import compose_cfg


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def hand_made_grid(tiles: torch.Tensor, factor: int, size: int, fill: float) -> torch.Tensor:
    """Stored images with tile k = r * f + c of image i at rows r*t.., columns c*t..; other pixels = `fill`."""
    m, ch, t, _ = tiles.shape
    n = m // factor**2
    out = torch.full((n, ch, size, size), fill)
    for i in range(n):
        for r in range(factor):
            for c in range(factor):
                out[i, :, r * t:(r + 1) * t, c * t:(c + 1) * t] = tiles[i * factor**2 + r * factor + c]
    return out


# ---- decode ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,factor", [(8, 2), (28, 2), (28, 3), (32, 4), (12, 3)])
def test_decoded_image_is_its_tile_upsampled(size, factor):
    t = size // factor
    tiles = torch.randn(3 * factor**2, 2, t, t, generator=gen(1))
    stored = hand_made_grid(tiles, factor, size, fill=7.0)  # the unused margin (28 / 3: 1 px) holds garbage
    decoded = formation.decode(stored, factor)
    assert decoded.shape == (3 * factor**2, 2, size, size)
    want = F.interpolate(tiles, size=(size, size), mode="bilinear", align_corners=False)
    assert torch.equal(decoded, want)  # index i * f^2 + k: tile k of stored image i, exactly


def test_factor_one_is_the_identity():
    x = torch.randn(4, 3, 8, 8, generator=gen(2))
    assert formation.decode(x, 1) is x
    assert formation.mix(x, 1) is x
    ids, labels = torch.tensor([5, 2, 9]), torch.tensor([1, 0, 3])
    assert torch.equal(formation.decoded_ids(ids, 1), ids) and torch.equal(formation.decoded_labels(labels, 1), labels)


def test_decoded_labels_and_ids():
    labels, ids = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 3])
    assert formation.decoded_labels(labels, 2).tolist() == [0] * 8 + [1] * 4
    assert formation.decoded_ids(ids, 2).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15]
    every = formation.decoded_ids(torch.arange(10), 3)  # a whole set's decoded ids are 0..n f^2 - 1, once each
    assert every.tolist() == list(range(90))
    images, dec_labels = formation.decode_set(torch.zeros(3, 1, 8, 8), labels, 2)
    assert images.shape == (12, 1, 8, 8) and torch.equal(dec_labels, formation.decoded_labels(labels, 2))


def test_decode_is_differentiable_and_local():
    """The gradient of decoded image i * f^2 + k reaches exactly tile k of stored image i (28 / 3: not the margin)."""
    size, f = 28, 3
    stored = torch.randn(2, 1, size, size, generator=gen(3), requires_grad=True)
    i, k = 1, 5  # row 1, column 2
    formation.decode(stored, f)[i * f * f + k].sum().backward()
    g = stored.grad
    t = size // f
    region = torch.zeros_like(g, dtype=torch.bool)
    region[i, :, 1 * t:2 * t, 2 * t:3 * t] = True
    assert (g[region] > 0).all(), "every pixel of the tile feeds the bilinear upsampling"
    assert (g[~region] == 0).all()
    assert g[region].sum().item() == pytest.approx(size * size, rel=1e-5)  # bilinear weights sum to 1 per output


def test_encode_is_the_inverse_layout_of_decode():
    size, f = 28, 3
    tiles = torch.randn(2 * f * f, 3, 9, 9, generator=gen(4))
    stored = formation.encode(tiles, f, (size, size))
    assert torch.equal(stored, hand_made_grid(tiles, f, size, fill=0.0))  # margin 0: the mean colour
    assert torch.equal(formation.decode(stored, f), F.interpolate(tiles, size=(size, size), mode="bilinear",
                                                                  align_corners=False))
    with pytest.raises(ValueError, match="tiles"):
        formation.encode(tiles[:5], f, (size, size))


def test_mix_shrinks_each_image_into_its_tile():
    f, size = 2, 8
    full = torch.randn(2 * f * f, 1, size, size, generator=gen(5))
    stored = formation.mix(full, f)
    assert stored.shape == (2, 1, size, size)
    small = F.interpolate(full, size=(4, 4), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(stored, hand_made_grid(small, f, size, fill=0.0))


@pytest.mark.parametrize("size,factor", [(28, 2), (28, 3), (32, 2)])
def test_as_decoded_is_what_a_set_shows_of_a_real_image(size, factor):
    full = torch.rand(2 * factor**2, 1, size, size, generator=gen(6))
    through_a_set = formation.decode(formation.encode(formation.downsample(full, factor), factor, (size, size)), factor)
    assert torch.allclose(formation.as_decoded(full, factor), through_a_set, atol=1e-6)
    assert torch.equal(formation.as_decoded(full, 1), full)
    flat = torch.full((1, 1, size, size), 0.3)  # a constant image survives the round trip
    assert torch.allclose(formation.as_decoded(flat, factor), flat, atol=1e-6)


def test_tile_size_bounds_name_the_key():
    assert formation.tile_size(28, 7) == 4 and formation.tile_size(28, 3) == 9
    with pytest.raises(ConfigError, match=r"synthetic\.factor.*3 px tiles"):
        formation.tile_size(28, 8)
    with pytest.raises(ConfigError, match=r"synthetic\.factor"):
        SyntheticConfig(factor=0)
    SyntheticConfig(factor=7).check(28)
    with pytest.raises(ConfigError, match=r"synthetic\.factor.*factor <= 7"):
        SyntheticConfig(factor=8).check(28)


# ---- init=mix -------------------------------------------------------------------------------------------------
@pytest.fixture
def world_of_one():
    rt = init_distributed("cpu")
    try:
        yield rt, ParallelLayout.from_world(1, rt.rank, rt.world_size)
    finally:
        close_distributed()


COUNTS = [12, 9, 3]  # class 2 holds fewer than ipc * f^2 = 8 real images: repeated under policy=repeat


def constant_real_set() -> RealData:
    """Real image of global id i is constant at 10 * i + 5 (uint8), so any resampling of it names it back."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])
    perm = torch.randperm(len(labels), generator=gen(6))  # classes mixed, as in the shards
    labels = labels[perm]
    ids = torch.arange(len(labels))
    images = (10 * ids + 5).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    return RealData(images, labels, ids, torch.tensor(COUNTS))


def mix_cfg(*extra):
    return to_config(compose_cfg(["dataset.num_classes=3", "dataset.image_size=8", "ipc=2", "device=cpu",
                                  "distill.init=mix", "synthetic.factor=1", *extra]))


def ids_of(x: torch.Tensor, norm: Normalizer) -> torch.Tensor:
    """The real id each (constant) image shows; asserts it is constant."""
    v = norm.to_unit(x) * 255
    assert (v.amax((1, 2, 3)) - v.amin((1, 2, 3))).max() < 1e-3
    return ((v.mean((1, 2, 3)).round() - 5) / 10).round().long()


def test_mix_init_fills_tiles_with_distinct_real_images_of_the_class(world_of_one, caplog):
    _, layout = world_of_one
    cfg, real = mix_cfg("synthetic.factor=2"), constant_real_set()
    norm = Normalizer.build(cfg.dataset.mean, cfg.dataset.std, torch.device("cpu"))
    with caplog.at_level("WARNING"):
        init, picked = initial_images(cfg, real, layout, norm)
    assert "than ipc * synthetic.factor^2=8 (distill.init=mix): class 2 has 3;" in caplog.text
    assert init.shape == picked.shape == (6, 1, 8, 8)  # the storage budget: ipc stored images per class
    tile_ids = ids_of(formation.decode(init, 2), norm).view(3, 2 * 4)  # [class, stored j * 4 + tile k]
    for c, n in enumerate(COUNTS):
        assert (real.labels[tile_ids[c]] == c).all(), f"class {c} tiles show another class's images"
        assert len(set(tile_ids[c].tolist())) == min(n, 8), f"class {c}: tiles should be distinct real images"
    # the baseline is the undecoded pick of ipc; tile 0 of each stored image is that image, shrunk
    direct = pick_real_init(real.images, real.labels, real.ids, 3, 2, cfg.seed, layout, "repeat")
    assert torch.equal(picked, norm(direct))
    assert torch.equal(tile_ids.view(6, 4)[:, 0], ids_of(picked, norm))


def test_mix_with_factor_one_is_real(world_of_one):
    _, layout = world_of_one
    real = constant_real_set()
    cfg = mix_cfg()
    norm = Normalizer.build(cfg.dataset.mean, cfg.dataset.std, torch.device("cpu"))
    init, picked = initial_images(cfg, real, layout, norm)
    real_init, _ = initial_images(mix_cfg("distill.init=real"), real, layout, norm)
    assert torch.equal(init, picked) and torch.equal(init, real_init)


def test_mix_init_policy_error_names_the_need(world_of_one):
    _, layout = world_of_one
    cfg = mix_cfg("synthetic.factor=2", "distill.small_class_policy=error")
    norm = Normalizer.build(cfg.dataset.mean, cfg.dataset.std, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"class 2 has 3 real images but ipc \* synthetic\.factor\^2=8 .*"
                                         r"small_class_policy"):
        initial_images(cfg, constant_real_set(), layout, norm)


def test_random_method_refuses_decoding_whole_real_images(world_of_one):
    _, layout = world_of_one
    cfg = mix_cfg("synthetic.factor=2", "distill.init=real", "method=random")
    norm = Normalizer.build(cfg.dataset.mean, cfg.dataset.std, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"synthetic\.factor.*distill\.init=mix"):
        initial_images(cfg, constant_real_set(), layout, norm)


def test_mix_order_puts_pick_k_ipc_plus_j_in_tile_k():
    picks = torch.arange(2 * 3 * 4).view(-1, 1)  # 2 classes, ipc 3, f 2: picks c * 12 + p
    out = mix_order(picks, 2, 3, 2).view(2, 3, 4)  # [class, stored j, tile k]
    for c in range(2):
        for j in range(3):
            assert out[c, j].tolist() == [c * 12 + k * 3 + j for k in range(4)]


# ---- lr schedule ----------------------------------------------------------------------------------------------
def test_lr_schedule_values():
    const = DistillConfig(lr=0.5)
    assert [lr_at(s, 10, const) for s in (0, 9, 25)] == [0.5] * 3  # constant: any step (benchmarks run past T)
    cos = DistillConfig(lr=0.5, lr_schedule="cosine")
    assert lr_at(0, 10, cos) == 0.5
    assert lr_at(5, 10, cos) == pytest.approx(0.25, abs=1e-15)
    assert lr_at(9, 10, cos) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)) / 2, rel=1e-15)
    step = DistillConfig(lr=0.5, lr_schedule="step")  # milestones 0.5, 0.75, gamma 0.1
    assert [lr_at(s, 10, step) for s in range(10)] == pytest.approx([0.5] * 5 + [0.05] * 3 + [0.005] * 2, rel=1e-12)
    at_07 = DistillConfig(lr=1.0, lr_schedule="step", lr_milestones=[0.7], lr_gamma=0.5)
    assert [lr_at(s, 10, at_07) for s in (6, 7)] == [1.0, 0.5]  # s / iterations >= 0.7 holds at 7 of 10
    with pytest.raises(ValueError, match="past distill.iterations=10"):
        lr_at(10, 10, cos)


@pytest.mark.parametrize("kwargs,key", [({"lr_schedule": "linear"}, "distill.lr_schedule"),
                                        ({"lr_milestones": [0.75, 0.5]}, "distill.lr_milestones"),
                                        ({"lr_milestones": [0.5, 1.0]}, "distill.lr_milestones"),
                                        ({"lr_gamma": 0.0}, "distill.lr_gamma"),
                                        ({"init": "tiles"}, "distill.init")])
def test_invalid_distill_keys_are_named(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        DistillConfig(**kwargs)
