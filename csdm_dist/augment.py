"""Differentiable siamese augmentation (DSA): one op per step for real and synthetic batches alike, with
per-sample parameters given as uniforms (see rng.sample_uniforms), so the same image gets the same transform on
whichever rank holds it. Every op is differentiable in the pixels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
NUM_UNIFORMS = 3  # columns of `u` an op may read


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def augment(x: Tensor, op: str, u: Tensor) -> Tensor:
    """Apply `op` to images x [N, C, H, W] with per-sample uniforms u [N, NUM_UNIFORMS] in [0, 1)."""
    n = x.shape[0]
    u = u.to(x.device, x.dtype)
    if n == 0:
        return x
    if op == "color":  # brightness +-0.5, saturation x[0.5, 1.5] (RGB only), contrast x[0.5, 1.5]
        x = x + (u[:, 0] - 0.5).view(n, 1, 1, 1)
        if x.shape[1] > 1:
            mean = x.mean(1, keepdim=True)
            x = (x - mean) * (u[:, 1] + 0.5).view(n, 1, 1, 1) + mean
        mean = x.mean((1, 2, 3), keepdim=True)
        return (x - mean) * (u[:, 2] + 0.5).view(n, 1, 1, 1) + mean
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    if op == "crop":  # translate up to 1/8 of the side, zero padded
        theta[:, :, 2] = (u[:, :2] - 0.5) * 0.25 * 2
        return _affine(x, theta)
    if op == "flip":
        theta[:, 0, 0] = torch.where(u[:, 0] < 0.5, -1.0, 1.0)
        return _affine(x, theta)
    if op == "scale":  # each axis x[0.8, 1.2]
        theta[:, 0, 0] = 0.8 + 0.4 * u[:, 0]
        theta[:, 1, 1] = 0.8 + 0.4 * u[:, 1]
        return _affine(x, theta)
    if op == "rotate":  # +-15 degrees
        a = (u[:, 0] - 0.5) * 2 * math.radians(15)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
        return _affine(x, theta)
    if op == "cutout":  # zero a square of half the side at a random centre
        h, w = x.shape[2:]
        cy = (u[:, 0] * h).long().view(n, 1, 1)
        cx = (u[:, 1] * w).long().view(n, 1, 1)
        ys = torch.arange(h, device=x.device).view(1, h, 1)
        xs = torch.arange(w, device=x.device).view(1, 1, w)
        keep = ((ys - cy).abs() >= h // 4) | ((xs - cx).abs() >= w // 4)
        return x * keep.unsqueeze(1).to(x.dtype)
    raise ValueError(f"unknown augmentation op {op!r}; choose from {OPS}")


def pick_op(generator: torch.Generator, ops: tuple[str, ...] = OPS) -> str:
    return ops[int(torch.randint(len(ops), (1,), generator=generator))]
