"""Multi-formation (DESIGN.md section 3): one stored image holds f x f tiles, each decoded to a full-size sample.

Tile grid. For a stored image of H x W pixels and factor f the tiles are th = H // f by tw = W // f pixels, laid
out row-major from the top-left corner: tile k = r * f + c (row r, column c) covers rows [r * th, (r + 1) * th)
and columns [c * tw, (c + 1) * tw). When f does not divide the size (28 px at f = 3: 9 px tiles), the last
H - f * th rows and W - f * tw columns (1 px at 28 / 3) belong to no tile: decoding ignores them, so they receive
no gradient and keep their initial values. `encode` (the init=mix assembly) leaves them at 0, which in
normalised pixel space is the dataset's mean colour.

Decoding upsamples each tile bilinearly (align_corners=False) to H x W; decoded image k of stored image i has
index i * f^2 + k, the label of stored image i and the global id stored_id * f^2 + k (the key of its per-sample
augmentation draws, rng.sample_uniforms). f = 1 is the identity. Every function here is pure and differentiable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ConfigError

MIN_TILE = 4  # pixels: the smallest tile side synthetic.factor may give


def tile_size(size: int, factor: int) -> int:
    """Side of one tile of a `size` px image at `factor`; ConfigError (naming synthetic.factor) below MIN_TILE."""
    if factor < 1:
        raise ConfigError(f"invalid config `synthetic.factor`: must be >= 1, got {factor}")
    t = size // factor
    if t < MIN_TILE:
        raise ConfigError(f"invalid config `synthetic.factor`: {factor} cuts {size} px images into {t} px tiles; "
                          f"tiles need >= {MIN_TILE} px, so factor <= {size // MIN_TILE} at this image size")
    return t


def decode(images: Tensor, factor: int) -> Tensor:
    """[n, C, H, W] stored images -> [n * f^2, C, H, W]: every tile upsampled to H x W (bilinear)."""
    if factor == 1:
        return images
    n, ch, h, w = images.shape
    th, tw = tile_size(h, factor), tile_size(w, factor)
    tiles = images[:, :, :factor * th, :factor * tw].reshape(n, ch, factor, th, factor, tw)
    tiles = tiles.permute(0, 2, 4, 1, 3, 5).reshape(n * factor * factor, ch, th, tw)  # index i * f^2 + r * f + c
    return F.interpolate(tiles, size=(h, w), mode="bilinear", align_corners=False)


def decoded_labels(labels: Tensor, factor: int) -> Tensor:
    """The label of each decoded image: its stored image's label, repeated f^2 times in place."""
    return labels.repeat_interleave(factor * factor)


def decoded_ids(ids: Tensor, factor: int) -> Tensor:
    """Global ids of the decoded images: stored_id * f^2 + k for k = 0..f^2-1 (distinct over the whole set)."""
    k = factor * factor
    return (ids.long().unsqueeze(1) * k + torch.arange(k, device=ids.device)).flatten()


def decode_set(images: Tensor, labels: Tensor, factor: int) -> tuple[Tensor, Tensor]:
    """(decoded images, their labels) of a stored set: what the evaluation trains on."""
    return decode(images, factor), decoded_labels(labels, factor)


def downsample(images: Tensor, factor: int) -> Tensor:
    """[m, C, H, W] -> [m, C, H // f, W // f] (bilinear with antialiasing): full images shrunk to tiles."""
    if factor == 1:
        return images
    h, w = images.shape[2:]
    size = (tile_size(h, factor), tile_size(w, factor))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def as_decoded(images: Tensor, factor: int) -> Tensor:
    """[m, C, H, W] full images as a factor-f set shows them: shrunk to a tile and decoded (upsampled) back.
    decode(encode(downsample(x))) of every image; what a teacher must label in a multi-formation set."""
    if factor == 1:
        return images
    return F.interpolate(downsample(images, factor), size=images.shape[2:], mode="bilinear", align_corners=False)


def encode(tiles: Tensor, factor: int, size: tuple[int, int]) -> Tensor:
    """[n * f^2, C, th, tw] tiles -> [n, C, H, W] stored images, tile k of image i from row i * f^2 + k.

    The inverse layout of `decode`: decode(encode(t)) is every tile of t upsampled. Pixels outside the grid are 0.
    """
    h, w = size
    th, tw = tile_size(h, factor), tile_size(w, factor)
    m, ch = tiles.shape[:2]
    k = factor * factor
    if m % k or tiles.shape[2:] != (th, tw):
        raise ValueError(f"encode at factor {factor} into {h}x{w} needs [n * {k}, C, {th}, {tw}] tiles, "
                         f"got {list(tiles.shape)}")
    n = m // k
    grid = tiles.reshape(n, factor, factor, ch, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(n, ch, factor * th,
                                                                                           factor * tw)
    if (factor * th, factor * tw) == (h, w):
        return grid
    out = tiles.new_zeros((n, ch, h, w))
    out[:, :, :factor * th, :factor * tw] = grid
    return out


def mix(images: Tensor, factor: int) -> Tensor:
    """[n * f^2, C, H, W] full-size images -> [n, C, H, W]: images i * f^2 .. i * f^2 + f^2 - 1, each shrunk to
    a tile, form stored image i (distill.init=mix). f = 1: the images themselves."""
    if factor == 1:
        return images
    return encode(downsample(images, factor), factor, tuple(images.shape[2:]))
