"""The spectral core against closed forms: samplers, SDD = MMD^2, the amplitude-phase identity, additivity.

Run: .venv/bin/python -m pytest tests/unit/test_spectral.py -q
"""
import math

import pytest
import torch

from csdm_dist import spectral as S


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kernel,nu", [("gaussian", 1.5), ("laplacian", 1.5), ("cauchy", 1.5),
                                       ("matern", 0.5), ("matern", 1.5), ("matern", 2.5)])
def test_sampler_characteristic_function_matches_kernel(kernel, nu):
    # E_t[cos(t.delta)] over t ~ Lambda must equal psi(delta) (Bochner), within Monte-Carlo error.
    dim, bandwidth, n = 3, 0.7, 400_000
    t = S.sample_frequencies(kernel, n, dim, bandwidth, gen(1), nu=nu).double()
    deltas = torch.randn(6, dim, generator=gen(2)).double() * 0.6
    empirical = torch.cos(deltas @ t.t()).mean(1)
    exact = S.kernel_value(kernel, deltas, bandwidth, nu=nu)
    # std of a mean of cosines is at most 1/sqrt(n) ~ 0.0016: 5 sigma
    torch.testing.assert_close(empirical, exact, atol=8e-3, rtol=0)


def test_sampler_is_deterministic_given_generator():
    a = S.sample_frequencies("matern", 100, 4, 1.0, gen(5), nu=1.5)
    b = S.sample_frequencies("matern", 100, 4, 1.0, gen(5), nu=1.5)
    c = S.sample_frequencies("matern", 100, 4, 1.0, gen(6), nu=1.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gaussian_sdd_converges_to_closed_form_mmd2():
    x = torch.randn(200, 5, generator=gen(3)).double() * 0.5
    y = torch.randn(150, 5, generator=gen(4)).double() * 0.5 + 0.3
    labels_x, labels_y = torch.zeros(200, dtype=torch.long), torch.zeros(150, dtype=torch.long)
    exact = S.gaussian_mmd2(x, y, bandwidth=1.0).item()
    estimates = []
    for m in (64, 262_144):
        t = S.sample_frequencies("gaussian", m, 5, 1.0, gen(7)).double()
        px = S.characteristic_function(*S.class_statistics(x, labels_x, 1, t))
        py = S.characteristic_function(*S.class_statistics(y, labels_y, 1, t))
        estimates.append(S.sdd(*px, *py).item())
    assert exact > 0.01
    assert abs(estimates[1] - exact) < 0.03 * exact
    assert abs(estimates[1] - exact) < abs(estimates[0] - exact) + 1e-4


def test_amplitude_phase_identity_exact():
    g = gen(8)
    p = torch.randn(4, 50, 2, generator=g).double()
    q = torch.randn(4, 50, 2, generator=g).double()
    amp, pha = S.amplitude_phase(p[..., 0], p[..., 1], q[..., 0], q[..., 1])
    total = (p - q).square().sum(-1)
    torch.testing.assert_close(amp + pha, total, atol=1e-9, rtol=1e-9)
    # the phase term is the angle part: 2|p||q|(1 - cos(arg p - arg q))
    ang = torch.atan2(p[..., 1], p[..., 0]) - torch.atan2(q[..., 1], q[..., 0])
    ref = 2 * p.norm(dim=-1) * q.norm(dim=-1) * (1 - torch.cos(ang))
    torch.testing.assert_close(pha, ref, atol=1e-9, rtol=1e-6)


def test_statistics_of_a_partition_add_up_to_the_union():
    g = gen(9)
    z = torch.randn(300, 8, generator=g)
    y = torch.randint(0, 5, (300,), generator=g)
    t = S.sample_frequencies("gaussian", 32, 8, 1.0, g)
    whole = S.class_statistics(z, y, 5, t)
    parts = [S.class_statistics(z[i::3], y[i::3], 5, t) for i in range(3)]
    torch.testing.assert_close(sum(p[0] for p in parts), whole[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sum(p[1] for p in parts), whole[1])
    lin = S.class_statistics(z, y, 5, None)
    torch.testing.assert_close(lin[0][2], z[y == 2].sum(0), atol=1e-4, rtol=1e-5)
    assert lin[1].tolist() == torch.bincount(y, minlength=5).float().tolist()


def test_weighted_loss_is_zero_only_for_equal_statistics():
    g = gen(10)
    z = torch.randn(100, 6, generator=g)
    y = torch.arange(100) % 4
    t = S.sample_frequencies("gaussian", 64, 6, 1.0, g)
    counts = torch.tensor([80.0, 40.0, 10.0, 5.0])
    alpha = S.alpha_schedule(counts, 0.8, 0.2)
    stats = S.class_statistics(z, y, 4, t)
    for form in ("mmd2", "sqrt"):
        same = S.spectral_loss(stats, stats, alpha, form=form)["loss"].item()
        assert same < (1e-4 if form == "sqrt" else 1e-6)
        # moving a single class's samples makes the loss positive, by any alpha in (0, 1)
        z2 = z.clone()
        z2[y == 3] += 0.5
        other = S.class_statistics(z2, y, 4, t)
        for a in (1e-3, 0.5, 1 - 1e-3):
            moved = S.spectral_loss(stats, other, torch.full((4,), a), form=form)["loss"].item()
            assert moved > 20 * max(same, 1e-6)


def test_alpha_schedule_loglinear_endpoints_and_order():
    counts = torch.tensor([6000.0, 600.0, 60.0])
    a = S.alpha_schedule(counts, alpha_head=0.9, alpha_tail=0.1)
    torch.testing.assert_close(a, torch.tensor([0.9, 0.5, 0.1]))
    assert S.alpha_schedule(counts, 0.3, 0.7).tolist()[0] == pytest.approx(0.3)
    assert torch.all(S.alpha_schedule(counts, 0.6, 0.2, "constant") == 0.6)


def test_loss_terms_and_mean_matching():
    g = gen(11)
    z, y = torch.randn(50, 4, generator=g), torch.arange(50) % 2
    zs, ys = torch.randn(10, 4, generator=g), torch.arange(10) % 2
    out = S.mean_matching_loss(S.class_statistics(z, y, 2, None), S.class_statistics(zs, ys, 2, None))
    ref = sum((z[y == c].mean(0) - zs[ys == c].mean(0)).square().sum() for c in range(2))
    torch.testing.assert_close(out["loss"], ref)
    t = S.sample_frequencies("gaussian", 16, 4, 1.0, g)
    half = torch.full((2,), 0.5)
    r, s = S.class_statistics(z, y, 2, t), S.class_statistics(zs, ys, 2, t)
    spec = S.spectral_loss(r, s, half)
    sdd = S.sdd(*S.characteristic_function(*r), *S.characteristic_function(*s)).sum()
    torch.testing.assert_close(spec["loss"], 0.5 * sdd, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(spec["amplitude"] + spec["phase"], sdd, atol=1e-5, rtol=1e-4)


def test_missing_class_contributes_nothing_and_gradient_is_finite():
    g = gen(12)
    z, y = torch.randn(30, 4, generator=g), torch.zeros(30, dtype=torch.long)
    zs = torch.zeros(5, 4, requires_grad=True)
    t = S.sample_frequencies("gaussian", 16, 4, 1.0, g)
    syn = S.class_statistics(zs, torch.zeros(5, dtype=torch.long), 3, t)
    out = S.spectral_loss(S.class_statistics(z, y, 3, t), syn, torch.full((3,), 0.5), form="sqrt")
    out["loss"].backward()
    assert math.isfinite(out["loss"].item()) and torch.isfinite(zs.grad).all()


def test_per_class_bandwidth_equals_each_class_with_its_own_frequencies():
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.arange(40) % 3
    t = S.sample_frequencies("gaussian", 16, 6, 1.0, g).double()
    counts = torch.tensor([1000, 100, 10])
    s_c = S.loglinear_in_counts(counts, at_head=0.5, at_tail=2.0)
    assert torch.allclose(s_c.double(), torch.tensor([0.5, 1.25, 2.0], dtype=torch.float64))
    sums, n = S.class_statistics(z, y, 3, t, freq_scale=0.5 / s_c)
    for c in range(3):  # class c alone, with the frequencies of bandwidth s_c
        alone, _ = S.class_statistics(z[y == c], torch.zeros_like(y[y == c]), 1, t * 0.5 / s_c[c].item())
        assert torch.allclose(sums[c], alone[0])
    assert n.tolist() == [14, 13, 13]


def test_sdd_with_a_class_bandwidth_matches_that_bandwidths_mmd2():
    g = torch.Generator().manual_seed(4)
    x, z = torch.randn(30, 3, generator=g), torch.randn(20, 3, generator=g) + 0.7
    feats, labels = torch.cat([x, z]), torch.cat([torch.zeros(30), torch.ones(20)]).long()
    t = S.sample_frequencies("gaussian", 200_000, 3, 1.0, g)
    scale = torch.tensor([1 / 2.0, 1 / 2.0])  # both sides of "class" 0 vs 1 at bandwidth 2
    sums, n = S.class_statistics(feats, labels, 2, t, freq_scale=scale)
    p_re, p_im = S.characteristic_function(sums[:1], n[:1])
    q_re, q_im = S.characteristic_function(sums[1:], n[1:])
    assert abs(S.sdd(p_re, p_im, q_re, q_im).item() - S.gaussian_mmd2(x, z, 2.0).item()) < 3e-3
