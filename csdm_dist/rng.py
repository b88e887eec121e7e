"""Randomness as a function of (seed, step, stream, ...): resuming needs only the step, and no state is global.

- `generator(seed, step, stream, index)`: a torch.Generator for draws shared by a group of ranks (the extractor,
  the frequencies, the augmentation op), keyed by the replica index.
- `sample_uniforms(ids, seed, step, stream, k)`: k uniforms per sample, a pure function of the sample's global id.
  Per-sample draws (which real images a step uses, each image's augmentation parameters) therefore do not depend
  on which rank holds the sample, so 1 rank and N ranks take exactly the same steps.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# streams: fixed small integers so a key never collides across uses
INIT, EXTRACTOR, FREQS, AUG_OP, REAL_PICK, REAL_AUG, SYN_AUG, EVAL, DATA, FEATURE_VIEW = range(10)
TEACHER, TEACHER_AUG, TEACHER_BN = range(10, 13)  # teacher training: init and batches, augmentation, BN pass

_M31 = (1 << 31) - 1


def seed_of(*key: int) -> int:
    """A 63-bit seed from integers, mixed by numpy's SeedSequence (well spread, platform independent)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(2, np.uint64)[0] >> 1)


def generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed_of(*key))


def _mix(x: Tensor) -> Tensor:
    """One round of a 31-bit integer hash on int64 tensors (products stay below 2^62: no overflow)."""
    x = (x ^ (x >> 16)) & _M31
    x = (x * 0x45D9F3B) & _M31
    x = (x ^ (x >> 15)) & _M31
    x = (x * 0x2C1B3C6D) & _M31
    return (x ^ (x >> 16)) & _M31


def sample_uniforms(ids: Tensor, seed: int, step: int, stream: int, k: int = 1) -> Tensor:
    """[len(ids), k] uniforms in [0, 1), each a hash of (seed, step, stream, id, column): counter-based."""
    base = seed_of(seed, step, stream) & _M31
    ids = ids.long().unsqueeze(1) * k + torch.arange(k, device=ids.device)
    x = _mix(_mix(ids & _M31) ^ base)
    x = _mix(x ^ ((ids >> 31) & _M31))
    return (x >> 7).float() / float(1 << 24)  # 24 bits: exact in fp32 and strictly below 1
