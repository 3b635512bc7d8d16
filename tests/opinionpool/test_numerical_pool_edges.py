"""Edges of the numerical pool against independent float64 computations (scipy quadrature, exact sums, a dense
grid): weights with a batch shape of their own, zero-weight experts of zero probability, and the projection of
diagonal-Gaussian pools onto their own family."""

import functools
import math

import mpmath as mp
import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch.distributions import Beta, Categorical, Exponential, Gamma, Independent, MultivariateNormal, Normal

import opinionpool
from opinionpool.numerical import log_power_mean


def power_mean(densities, weights, alpha):
    """``(sum_j w_j q_j^alpha)^(1/alpha)`` over the last axis, weights normalised to one (finite alpha != 0)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    with np.errstate(divide="ignore"):  # a density that underflows to 0 gives u = 0 for alpha < 0 (0^alpha = inf)
        return (np.asarray(densities, dtype=np.float64) ** alpha @ w) ** (1 / alpha)


# ------------------------------------------------------------------ batched weights
BATCHED_WEIGHTS = [[1.0, 1.0], [1.0, 3.0], [3.0, 1.0]]


@pytest.mark.parametrize("alpha", [0.3, -0.7, 2.5])
def test_batched_weights_give_one_pool_per_row(alpha):
    locs, scales = [0.0, 2.0], [1.0, 0.5]
    experts = [Normal(torch.tensor(m), torch.tensor(s)) for m, s in zip(locs, scales)]
    pool = opinionpool.holder(experts, alpha=alpha, weights=BATCHED_WEIGHTS)
    assert isinstance(pool, opinionpool.NumericalHolderPool)
    assert pool.batch_shape == (3,)
    z = torch.tensor([-1.0, 0.5, 2.0, 3.5])
    log_prob = pool.log_prob(z.unsqueeze(-1))  # (4, 3): every point under every pool
    assert log_prob.shape == (4, 3)
    for row, weights in enumerate(BATCHED_WEIGHTS):
        def u(x, k=0, weights=weights):
            return x**k * power_mean([stats.norm.pdf(x, m, s) for m, s in zip(locs, scales)], weights, alpha)

        opts = dict(points=locs, limit=200, epsabs=0, epsrel=1e-13)
        mass = integrate.quad(u, -40, 40, **opts)[0]
        mean = integrate.quad(u, -40, 40, args=(1,), **opts)[0] / mass
        second = integrate.quad(u, -40, 40, args=(2,), **opts)[0] / mass
        assert float(pool.log_normalizer[row]) == pytest.approx(math.log(mass), abs=1e-9)
        assert float(pool.mean[row]) == pytest.approx(mean, abs=1e-9)
        assert float(pool.variance[row]) == pytest.approx(second - mean**2, rel=1e-8)
        expected = [math.log(u(float(x))) - math.log(mass) for x in z]
        np.testing.assert_allclose(log_prob[:, row].numpy(), expected, rtol=0, atol=1e-9)


def test_batched_weights_broadcast_with_batched_experts():
    locs = torch.tensor([[0.0, 2.0], [1.0, -1.0]])  # batch (2,) of two experts
    experts = Normal(locs, torch.ones(2, 2))
    weights = torch.tensor([[[1.0, 1.0]], [[1.0, 4.0]], [[2.0, 1.0]]])  # batch (3, 1)
    pool = opinionpool.holder(experts, alpha=-0.7, weights=weights)
    assert pool.batch_shape == (3, 2)
    for i in range(3):
        for j in range(2):
            def u(x, i=i, j=j):
                return power_mean([stats.norm.pdf(x, float(m), 1.0) for m in locs[j]], weights[i, 0].numpy(), -0.7)

            mass = integrate.quad(u, -40, 40, points=locs[j].tolist(), limit=200, epsabs=0, epsrel=1e-13)[0]
            assert float(pool.log_normalizer[i, j]) == pytest.approx(math.log(mass), abs=1e-9)


# ------------------------------------------------------- zero-weight experts of zero probability
ZERO_PROBS = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
OTHER_PROBS = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)


@pytest.mark.parametrize("alpha", [-1.0, -0.5, 0.0, 1e-5, -1e-5, 0.5, 2.0, math.inf, -math.inf])
def test_power_mean_ignores_an_absent_expert_of_zero_density(alpha):
    # expert 0 is absent (weight zero) and has density zero: the power mean is expert 1's value exactly
    log_values = torch.tensor([[-math.inf, -1.3], [-math.inf, 0.4]])
    log_weights = torch.tensor([-math.inf, 0.0])
    a = torch.tensor(alpha, requires_grad=True)
    values = log_values.clone().requires_grad_(True)
    got = log_power_mean(values, log_weights, a)
    np.testing.assert_allclose(got.detach().numpy(), [-1.3, 0.4], rtol=0, atol=1e-15)
    got.sum().backward()
    assert torch.isfinite(values.grad).all()
    assert a.grad is None or torch.isfinite(a.grad).all()  # at 0 and +-inf the mean does not depend on alpha


@pytest.mark.parametrize("alpha", [-1.0, -0.5, 0.0, 0.5, 2.0])
def test_zero_weight_expert_of_zero_probability_is_absent(alpha):
    # weights (0, 1): the pool is the second expert, whatever the first one's zeros
    probs = ZERO_PROBS.clone().requires_grad_(True)
    weights = torch.tensor([0.0, 1.0], requires_grad=True)
    pool = opinionpool.holder([Categorical(probs=probs), Categorical(probs=OTHER_PROBS)], alpha=alpha,
                              weights=weights)
    support = torch.arange(3)
    log_prob = pool.log_prob(support)
    assert float(pool.log_normalizer.detach()) == pytest.approx(math.log(float(OTHER_PROBS.sum())), abs=1e-14)
    np.testing.assert_allclose(log_prob.detach().numpy(), np.log(OTHER_PROBS.numpy()), rtol=0, atol=1e-14)
    (pool.log_normalizer + log_prob.sum()).backward()
    assert torch.isfinite(probs.grad).all() and torch.isfinite(weights.grad).all()


@pytest.mark.parametrize("alpha", [-1.0, -0.5, 2.0])
def test_batched_rows_with_and_without_the_zero_probability_expert(alpha):
    rows = [[0.0, 1.0], [1.0, 1.0], [1.0, 3.0]]
    pool = opinionpool.holder([Categorical(probs=ZERO_PROBS), Categorical(probs=OTHER_PROBS)], alpha=alpha,
                              weights=rows)
    assert pool.batch_shape == (3,)
    densities = np.stack([ZERO_PROBS.numpy(), OTHER_PROBS.numpy()], -1).astype(np.float64)
    for row, weights in enumerate(rows):
        w = np.asarray(weights) / sum(weights)
        present = w > 0
        u = power_mean(densities[:, present], w[present], alpha)  # 0^alpha = inf for alpha < 0: u = 0 there
        assert float(pool.log_normalizer[row]) == pytest.approx(math.log(u.sum()), abs=1e-14)


# ------------------------------------------------------------- moment matching onto the family
def _diagonal_experts():
    return [Independent(Normal(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.6])), 1),
            Independent(Normal(torch.tensor([1.5, -0.5]), torch.tensor([0.5, 1.5])), 1)]


@pytest.mark.parametrize("alpha", [2.5, -0.5])
def test_diagonal_gaussian_moment_match_stays_diagonal(alpha):
    weights = [0.3, 0.7]
    pool = opinionpool.holder(_diagonal_experts(), alpha=alpha, weights=weights)
    assert isinstance(pool, opinionpool.NumericalHolderPool)
    matched = pool.moment_match()
    assert type(matched) is Independent and type(matched.base_dist) is Normal
    assert matched.event_shape == (2,)
    # the pool's marginal moments by the trapezoid rule on a dense grid (exponentially accurate for these smooth,
    # fast-decaying densities)
    h = 0.01
    x = np.arange(-12.0, 14.0 + h / 2, h)
    y = np.arange(-16.0, 16.0 + h / 2, h)
    gx, gy = np.meshgrid(x, y, indexing="ij")
    densities = np.stack([stats.norm.pdf(gx, 0.0, 1.0) * stats.norm.pdf(gy, 1.0, 0.6),
                          stats.norm.pdf(gx, 1.5, 0.5) * stats.norm.pdf(gy, -0.5, 1.5)], -1)
    u = power_mean(densities, weights, alpha)
    mass = u.sum()
    mean = np.array([(gx * u).sum(), (gy * u).sum()]) / mass
    variance = np.array([(gx**2 * u).sum(), (gy**2 * u).sum()]) / mass - mean**2
    np.testing.assert_allclose(matched.mean.detach().numpy(), mean, rtol=0, atol=1e-8)
    np.testing.assert_allclose(matched.variance.detach().numpy(), variance, rtol=1e-8)
    assert float(pool.log_normalizer) == pytest.approx(math.log(mass * h * h), abs=1e-8)
    # the exact pool projects onto the same family
    assert type(opinionpool.holder(_diagonal_experts(), alpha=0.5, weights=weights).moment_match()) is Independent


def test_full_covariance_and_scalar_moment_match_keep_their_families():
    full = [MultivariateNormal(torch.zeros(2), torch.tensor([[1.0, 0.3], [0.3, 2.0]])),
            MultivariateNormal(torch.ones(2), torch.eye(2))]
    assert type(opinionpool.holder(full, alpha=2.5).moment_match()) is MultivariateNormal
    scalar = [Normal(torch.tensor(0.0), torch.tensor(1.0)), Normal(torch.tensor(2.0), torch.tensor(0.5))]
    assert type(opinionpool.holder(scalar, alpha=2.5).moment_match()) is Normal


# ------------------------------------------------------------------ scale families at tiny and huge scales
# Gamma(2.5, 1.3) and Gamma(0.7, 0.2), Exponential(1.3) and Exponential(0.2), weights 0.6 and 0.4: multiplying every
# rate by s divides z by s, so log Z of the pool is unchanged and its mean times s too
SCALE_EXPERTS = {"Gamma": ((2.5, 1.3), (0.7, 0.2)), "Exponential": ((1.0, 1.3), (1.0, 0.2))}
SCALE_WEIGHTS = (0.6, 0.4)


@functools.lru_cache(maxsize=None)
def _unscaled_reference(family, alpha):
    """``(log Z, mean)`` of the unscaled pool by mpmath at 30 digits (``z = t^10`` on ``[0, 1]``, where a shape below
    one is singular)."""
    with mp.workdps(30):
        alpha = mp.mpf(alpha)

        def u(z):
            terms = [mp.mpf(w) * mp.exp(alpha * ((a - 1) * mp.log(z) - r * z + a * mp.log(r) - mp.loggamma(a)))
                     for w, (a, r) in zip(SCALE_WEIGHTS, (tuple(map(mp.mpf, e)) for e in SCALE_EXPERTS[family]))]
            return mp.fsum(terms) ** (1 / alpha)

        def integral(k):
            head = mp.quad(lambda t: 10 * t**9 * (t**10) ** k * u(t**10), [0, mp.mpf(0.5), 1])
            return head + mp.quad(lambda z: z**k * u(z), [1, 3, 10, 30, 100, mp.inf])

        mass = integral(0)
        return float(mp.log(mass)), float(integral(1) / mass)


@pytest.mark.parametrize("family", ["Gamma", "Exponential"])
@pytest.mark.parametrize("alpha", [-1.0, 0.7, 2.0])
@pytest.mark.parametrize("scale", [1.0, 1e-34, 1e-30, 1e34, 1e40])
def test_scale_family_pools_are_scale_invariant(family, alpha, scale):
    """Rates times ``scale`` (the pool near ``1 / scale``): log Z and ``mean * scale`` against mpmath on the unscaled
    pool, within the stated errors. The panels were placed with the experts' standard deviations floored at an
    absolute 1e-12: below scales of about 1e-33 the scan and the bisection for the pool's drop-offs resolved nothing
    finer than 5e-29, one panel from the mean out to 1e5 scales had no node where the pool has mass, and its rules
    agreed at 0: Gamma experts at 1e34 gave log Z -0.3728 for -0.2103 at alpha = -1 (1e-12 stated) and raised at 0.7
    and 2 (outside the certified bracket), Exponential ones likewise."""
    experts = [(Gamma(torch.tensor(a, dtype=torch.float64), torch.tensor(r * scale, dtype=torch.float64))
                if family == "Gamma" else Exponential(torch.tensor(r * scale, dtype=torch.float64)))
               for a, r in SCALE_EXPERTS[family]]
    pool = opinionpool.holder(experts, alpha=alpha, weights=torch.tensor(SCALE_WEIGHTS, dtype=torch.float64))
    assert isinstance(pool, opinionpool.NumericalHolderPool)
    log_z, mean = _unscaled_reference(family, alpha)
    est = pool.summary
    value, error = float(est.log_normalizer.value), float(est.log_normalizer.error)
    assert error < 1e-10
    assert abs(value - log_z) <= error + 4 * np.finfo(np.float64).eps * (1 + abs(log_z)), (value, log_z, error)
    scaled_mean, scaled_error = float(est.mean.value) * scale, float(est.mean.error) * scale
    assert scaled_error < 1e-10
    assert abs(scaled_mean - mean) <= scaled_error + 8 * np.finfo(np.float64).eps * abs(mean), \
        (scaled_mean, mean, scaled_error)


@pytest.mark.parametrize("alpha", [-1.0, 0.7, 2.0])
@pytest.mark.parametrize("scale", [1e34, 1e40])
def test_beta_pools_near_zero_follow_their_gamma_limit(alpha, scale):
    """Beta(a, r s) tends to Gamma(a, r s) as s grows (the densities differ by O(1 / s), 1e-34 here): the same end at
    0, in the family on [0, 1], which took the same absolute floor (log Z -0.3728 for -0.2103 at alpha = -1). The
    stated error counted the rounding of lgamma terms of size b log b that the log-normaliser no longer subtracts
    (1e21 here); it counts the terms it adds now."""
    experts = [Beta(torch.tensor(a, dtype=torch.float64), torch.tensor(r * scale, dtype=torch.float64))
               for a, r in SCALE_EXPERTS["Gamma"]]
    pool = opinionpool.holder(experts, alpha=alpha, weights=torch.tensor(SCALE_WEIGHTS, dtype=torch.float64))
    log_z, mean = _unscaled_reference("Gamma", alpha)
    est = pool.summary
    assert float(est.log_normalizer.value) == pytest.approx(log_z, abs=1e-11)
    assert float(est.mean.value) * scale == pytest.approx(mean, rel=1e-11)
    assert float(est.log_normalizer.error) < 1e-10


def test_kl_to_a_float64_other_counts_the_rounding_of_its_log_density():
    """torch's float64 Beta log-density loses what lgamma's terms of 1.6e9 cancel (about 3e-7 at a concentration of
    9e7); a float64 other was charged no error, and the KL's stated 3e-8 missed the truth by 1.9e-7. Truth: mpmath
    quadrature at 30 digits of the pool's density and both log-densities from loggamma."""
    double = torch.float64
    pool = opinionpool.holder(Beta(torch.tensor([2.0, 3.0], dtype=double), torch.tensor([1e8, 1e8], dtype=double)),
                              alpha=2.0, weights=torch.tensor([0.3, 0.7], dtype=double))
    other = Beta(torch.tensor(2.2, dtype=double), torch.tensor(90000003.3, dtype=double))
    estimate = pool.kl_estimate(other)
    with mp.workdps(30):
        def log_beta(x, a, b):
            return ((a - 1) * mp.log(x) + (b - 1) * mp.log1p(-x)
                    - (mp.loggamma(a) + mp.loggamma(b) - mp.loggamma(a + b)))

        b = mp.mpf(10) ** 8

        def u(x):
            return mp.sqrt(mp.mpf("0.3") * mp.exp(2 * log_beta(x, 2, b))
                               + mp.mpf("0.7") * mp.exp(2 * log_beta(x, 3, b)))

        edges = [0] + [k * mp.mpf(10) ** -8 for k in (1, 2, 4, 8, 16, 32, 64, 128, 256)] + [1]
        z = mp.quad(u, edges)
        truth = float(mp.quad(lambda x: u(x) / z * (mp.log(u(x) / z)
                                                        - log_beta(x, mp.mpf("2.2"), mp.mpf("90000003.3"))),
                                  edges))
    assert abs(float(estimate.value) - truth) <= float(estimate.error) < 1e-6
