"""The maths of CSDM as pure tensor functions (no torch.distributed, Hydra or DeepSpeed in here).

A shift-invariant kernel k(z, z') = psi(z - z') has a spectral measure Lambda with psi(d) = E_{t~Lambda} exp(i t.d)
(Bochner). Per class c and frequencies t_1..t_M the sufficient statistics of a sample set are
S_c = (sum_i cos(t_m.z_i), sum_i sin(t_m.z_i)) and n_c: additive over any partition of the samples, so summing
them over ranks gives exactly the statistics of the union. phi_c(t) = (sum cos + i sum sin) / n_c.

Statistics are one tensor `sums` [C, F] plus `counts` [C]: F = 2M (cos then sin) for spectral kernels, F = d
(the feature sum) for the linear kernel of DM. Every function works on all classes at once.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

EPS = 1e-12


# ---------------------------------------------------------------------------------------------------------------
# Kernels and their spectral measures
# ---------------------------------------------------------------------------------------------------------------

def sample_frequencies(kernel: str, num: int, dim: int, bandwidth: float, generator: torch.Generator,
                       nu: float = 1.5, device: torch.device | str = "cpu") -> Tensor:
    """Draw `num` frequencies t ~ Lambda of the kernel with bandwidth s, as a [num, dim] fp32 tensor.

    gaussian  exp(-|d|^2 / 2s^2)          t ~ N(0, s^-2 I)
    laplacian exp(-|d|_1 / s)             t_i ~ Cauchy(0, 1/s) i.i.d.
    cauchy    prod_i 1 / (1 + d_i^2/s^2)  t_i ~ Laplace(0, 1/s) i.i.d.
    matern    Matern(nu), r = sqrt(2nu)|d|/s   t ~ multivariate Student-t, 2nu dof, scale 1/s
    Draws use `generator` only (on the CPU), so the same generator state gives the same frequencies everywhere.
    """
    shape = (num, dim)
    if kernel == "gaussian":
        t = torch.randn(shape, generator=generator)
    elif kernel == "laplacian":
        u = torch.rand(shape, generator=generator, dtype=torch.float64)
        t = torch.tan(math.pi * (u - 0.5)).float()
    elif kernel == "cauchy":
        u = torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5
        t = (-torch.sign(u) * torch.log1p(-2 * u.abs())).float()
    elif kernel == "matern":
        dof = int(round(2 * nu))
        g = torch.randn(shape, generator=generator)
        chi2 = torch.randn((num, dof), generator=generator).square().sum(1, keepdim=True)
        t = g / torch.sqrt(chi2 / dof)
    else:
        raise ValueError(f"no spectral measure for kernel {kernel!r}; use gaussian, laplacian, cauchy or matern")
    return (t / bandwidth).to(device)


def kernel_value(kernel: str, delta: Tensor, bandwidth: float, nu: float = 1.5) -> Tensor:
    """psi(delta) for delta [..., dim]: the closed forms the samplers above must reproduce."""
    s = bandwidth
    if kernel == "gaussian":
        return torch.exp(-delta.square().sum(-1) / (2 * s * s))
    if kernel == "laplacian":
        return torch.exp(-delta.abs().sum(-1) / s)
    if kernel == "cauchy":
        return (1.0 / (1.0 + delta.square() / (s * s))).prod(-1)
    if kernel == "matern":
        r = math.sqrt(2 * nu) * delta.norm(dim=-1) / s
        if nu == 0.5:
            return torch.exp(-r)
        if nu == 1.5:
            return (1 + r) * torch.exp(-r)
        if nu == 2.5:
            return (1 + r + r.square() / 3) * torch.exp(-r)
        raise ValueError(f"closed-form matern kernel only for nu in (0.5, 1.5, 2.5), got {nu}")
    raise ValueError(f"unknown kernel {kernel!r}")


def gaussian_mmd2(x: Tensor, y: Tensor, bandwidth: float) -> Tensor:
    """Closed-form (V-statistic) MMD^2 for the gaussian kernel: E k(x,x') + E k(y,y') - 2 E k(x,y)."""
    def k(a: Tensor, b: Tensor) -> Tensor:
        return torch.exp(-torch.cdist(a, b).square() / (2 * bandwidth ** 2)).mean()
    return k(x, x) + k(y, y) - 2 * k(x, y)


# ---------------------------------------------------------------------------------------------------------------
# Per-class sufficient statistics
# ---------------------------------------------------------------------------------------------------------------

STATS_CHUNK = 16384  # samples per chunk of class_statistics (csdm_dist/memory.py counts one chunk's intermediates)


def class_statistics(features: Tensor, labels: Tensor, num_classes: int, freqs: Tensor | None,
                     chunk: int = STATS_CHUNK, freq_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-class sums [C, F] and counts [C] of a sample set, for all classes at once.

    `freqs` [M, d] gives F = 2M (sum cos(t.z), then sum sin(t.z)); `freqs=None` is the linear kernel, F = d.
    `freq_scale` [C] (optional) gives class c the frequencies freq_scale[c] * t: a per-class bandwidth
    s_c = s / freq_scale[c], at the cost of one multiply (the projection is still one matrix product).
    Computed in fp32 (fp64 if the features are fp64), whatever the features' dtype (bf16 under autocast), over
    `chunk` samples at a time so the [n, 2M] cos/sin block stays small whatever the set's size. Per-class sums
    use index_add on the CPU and a one-hot product on CUDA (index_add there adds in no fixed order: results would
    not be reproducible).
    """
    z_all = features if features.dtype == torch.float64 else features.float()
    width = 2 * freqs.shape[0] if freqs is not None else z_all.shape[1]
    sums = torch.zeros(num_classes, width, device=z_all.device, dtype=z_all.dtype)
    with torch.autocast(device_type=z_all.device.type, enabled=False):  # the statistics stay in full precision
        for i in range(0, z_all.shape[0], chunk):
            z, y = z_all[i:i + chunk], labels[i:i + chunk]
            if freqs is not None:
                proj = z @ freqs.to(z.dtype).t()
                if freq_scale is not None:  # in place: the matmul's backward needs its inputs, not proj
                    proj.mul_(freq_scale.to(proj.dtype)[y].unsqueeze(1))
                z = torch.cat([torch.cos(proj), torch.sin(proj)], dim=1)
            if z.device.type == "cuda":
                onehot = torch.zeros(num_classes, z.shape[0], device=z.device, dtype=z.dtype)
                onehot[y, torch.arange(z.shape[0], device=z.device)] = 1.0
                sums = sums + onehot @ z
            else:
                sums = sums.index_add(0, y, z)
    counts = torch.bincount(labels, minlength=num_classes).to(sums.dtype)
    return sums, counts


def characteristic_function(sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """(Re phi, Im phi), each [C, M], from spectral sums [C, 2M]; classes with no samples get phi = 0."""
    mean = sums / counts.clamp_min(1).unsqueeze(1)
    re, im = mean.chunk(2, dim=1)
    return re, im


# ---------------------------------------------------------------------------------------------------------------
# Distances and the amplitude-phase split
# ---------------------------------------------------------------------------------------------------------------

def amplitude_phase(p_re: Tensor, p_im: Tensor, q_re: Tensor, q_im: Tensor) -> tuple[Tensor, Tensor]:
    """Split |phi_P - phi_Q|^2 into amplitude (|phi_P| - |phi_Q|)^2 and phase 2|phi_P||phi_Q|(1 - cos(dArg)).

    Uses |p||q| cos(arg p - arg q) = Re(p conj q), so no angle is computed; the eps keeps |q|'s gradient finite
    at q = 0. The two terms add up to |phi_P - phi_Q|^2 exactly (up to the eps).
    """
    p_abs = torch.sqrt(p_re.square() + p_im.square() + EPS)
    q_abs = torch.sqrt(q_re.square() + q_im.square() + EPS)
    amplitude = (p_abs - q_abs).square()
    phase = 2 * (p_abs * q_abs - (p_re * q_re + p_im * q_im))
    return amplitude, phase.clamp_min(0)


def sdd(p_re: Tensor, p_im: Tensor, q_re: Tensor, q_im: Tensor) -> Tensor:
    """Spectral distribution distance per class, [C]: mean over frequencies of |phi_P(t) - phi_Q(t)|^2."""
    return ((p_re - q_re).square() + (p_im - q_im).square()).mean(1)


def alpha_schedule(counts: Tensor, alpha_head: float, alpha_tail: float, schedule: str = "loglinear") -> Tensor:
    """alpha_c per class [C], the weight of the amplitude term; 1 - alpha_c weighs the phase term.

    `loglinear`: alpha_tail at the smallest class count, alpha_head at the largest, linear in log n_c between.
    `constant`: alpha_head for every class. Both stay strictly inside (0, 1) when the end points do.
    """
    if schedule == "constant":
        return torch.full_like(counts.float(), alpha_head)
    if schedule != "loglinear":
        raise ValueError(f"unknown alpha schedule {schedule!r}")
    return loglinear_in_counts(counts, alpha_head, alpha_tail)


def loglinear_in_counts(counts: Tensor, at_head: float, at_tail: float) -> Tensor:
    """Per class [C]: `at_tail` at the smallest count, `at_head` at the largest, linear in log n_c between
    (`at_head` for every class when all counts are equal)."""
    log_n = torch.log(counts.float().clamp_min(1))
    lo, hi = log_n.min(), log_n.max()
    frac = torch.where(hi > lo, (log_n - lo) / (hi - lo).clamp_min(EPS), torch.ones_like(log_n))
    return at_tail + frac * (at_head - at_tail)


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------

def spectral_loss(real: tuple[Tensor, Tensor], syn: tuple[Tensor, Tensor], alpha: Tensor, form: str = "mmd2",
                  scale: float = 1.0) -> dict[str, Tensor]:
    """CSDM loss from (sums, counts) of the real and synthetic sets: sum_c E_t[alpha_c A + (1 - alpha_c) P].

    `form="sqrt"` takes E_t sqrt(alpha A + (1 - alpha) P) per class, as NCFM. Classes with no samples on either
    side contribute nothing. Returns the total and the unweighted amplitude and phase terms (sums over classes)
    for logging.
    """
    (r_sums, r_n), (s_sums, s_n) = real, syn
    p_re, p_im = characteristic_function(r_sums, r_n)
    q_re, q_im = characteristic_function(s_sums, s_n)
    amp, pha = amplitude_phase(p_re, p_im, q_re, q_im)
    a = alpha.unsqueeze(1)
    per_freq = a * amp + (1 - a) * pha
    if form == "sqrt":
        per_class = torch.sqrt(per_freq + EPS).mean(1)
    elif form == "mmd2":
        per_class = per_freq.mean(1)
    else:
        raise ValueError(f"unknown loss form {form!r}")
    present = ((r_n > 0) & (s_n > 0)).float()
    return {
        "loss": scale * (present * per_class).sum(),
        "amplitude": (present * amp.mean(1)).sum().detach(),
        "phase": (present * pha.mean(1)).sum().detach(),
    }


def mean_matching_loss(real: tuple[Tensor, Tensor], syn: tuple[Tensor, Tensor],
                       scale: float = 1.0) -> dict[str, Tensor]:
    """DM: sum_c |mean z_c - mean z~_c|^2 from linear-kernel statistics (sums [C, d], counts [C])."""
    (r_sums, r_n), (s_sums, s_n) = real, syn
    diff = r_sums / r_n.clamp_min(1).unsqueeze(1) - s_sums / s_n.clamp_min(1).unsqueeze(1)
    present = ((r_n > 0) & (s_n > 0)).float()
    loss = scale * (present * diff.square().sum(1)).sum()
    zero = torch.zeros((), device=loss.device)
    return {"loss": loss, "amplitude": zero, "phase": zero}
