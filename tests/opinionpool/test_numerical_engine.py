"""The numerical engine against independent computations: scipy quadrature of scipy.stats densities,
exact sums, closed forms reduced to one dimension, and Monte Carlo calibration over seeds."""

import itertools
import math

import mpmath
import numpy as np
import pytest
import torch
from scipy import integrate, stats
from scipy.special import logsumexp
from torch.distributions import (
    Bernoulli,
    Beta,
    Binomial,
    Categorical,
    Exponential,
    Gamma,
    Independent,
    MultivariateNormal,
    Normal,
    Poisson,
    VonMises,
)

import opinionpool
from opinionpool.numerical import Envelope, log_power_mean, rejection_sample
from validation.reference import power_mean, quad_moments, sum_moments

WEIGHTS = [0.2, 0.3, 0.5]
NON_EXACT = [2.0, -1.0, 0.3, 3.7, -0.01, math.inf, -math.inf]


def rel(a, b):
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-300)


# ------------------------------------------------------------------------- power mean
@pytest.mark.parametrize("alpha", [2.0, -1.0, 0.3, 1e-5, -1e-5, 1e-9, 0.0, math.inf, -math.inf])
def test_log_power_mean_matches_high_precision(alpha):
    rng = np.random.default_rng(3)
    logs = rng.normal(0, 3, size=(7, 3))
    w = np.array(WEIGHTS)
    got = log_power_mean(torch.tensor(logs), torch.tensor(w).log(), alpha)
    for row, g in zip(logs, got):
        with mpmath.workdps(50):
            if alpha == 0:
                ref = sum(mpmath.mpf(wi) * mpmath.mpf(li) for wi, li in zip(w, row))
            elif math.isinf(alpha):
                ref = max(row) if alpha > 0 else min(row)
            else:
                a = mpmath.mpf(alpha)
                ref = mpmath.log(sum(mpmath.mpf(wi) * mpmath.exp(a * mpmath.mpf(li)) for wi, li in zip(w, row))) / a
        assert abs(float(g) - float(ref)) <= 1e-13 * (1 + abs(float(ref)))


def test_small_alpha_pool_tends_to_the_log_linear_pool():
    experts = [Normal(torch.tensor(0.0), torch.tensor(1.0)), Normal(torch.tensor(3.0), torch.tensor(0.4))]
    log_linear = opinionpool.holder(experts, alpha=0, weights=[0.3, 0.7])
    z = torch.linspace(-3, 5, 9)
    for alpha in (1e-7, -1e-7):
        pool = opinionpool.holder(experts, alpha=alpha, weights=[0.3, 0.7])
        assert abs(float(pool.log_normalizer - log_linear.log_normalizer)) < 1e-5
        assert torch.allclose(pool.log_prob(z), log_linear.log_prob(z), atol=1e-5)
    # the bracket from the neighbouring exact pools certifies the side: Z is non-decreasing in alpha
    up = opinionpool.holder(experts, alpha=1e-7, weights=[0.3, 0.7])
    down = opinionpool.holder(experts, alpha=-1e-7, weights=[0.3, 0.7])
    assert float(down.log_normalizer) < float(log_linear.log_normalizer) < float(up.log_normalizer)


# ----------------------------------------------------------------------- 1-D accuracy
NORMAL_MU, NORMAL_SD = [0.0, 2.0, -1.0], [1.0, 0.5, 2.0]


@pytest.mark.parametrize("alpha", NON_EXACT)
def test_normal_pools_match_scipy_quadrature(alpha):
    experts = [Normal(torch.tensor(m), torch.tensor(s)) for m, s in zip(NORMAL_MU, NORMAL_SD)]
    pool = opinionpool.holder(experts, alpha=alpha, weights=WEIGHTS)
    assert isinstance(pool, opinionpool.NumericalHolderPool) and pool.summary.method == "quadrature"
    pdfs = [stats.norm(m, s).pdf for m, s in zip(NORMAL_MU, NORMAL_SD)]
    log_z, mean, var = quad_moments(pdfs, WEIGHTS, alpha, -60, 60, points=NORMAL_MU)
    assert rel(pool.log_normalizer, log_z) < 1e-8
    assert rel(pool.mean, mean) < 1e-8
    assert rel(pool.variance, var) < 1e-8
    assert float(pool.summary.log_normalizer.error) < 1e-9


CONTINUOUS_1D = {  # experts (built inside the test, in float64), scipy densities, support, alpha
    "exponential": (lambda: [Exponential(torch.tensor(r)) for r in (0.5, 2.0, 5.0)],
                    [stats.expon(scale=1 / r).pdf for r in (0.5, 2.0, 5.0)], (0, np.inf), 3.0),
    "gamma": (lambda: [Gamma(torch.tensor(a), torch.tensor(b)) for a, b in ((2.0, 1.0), (5.0, 3.0), (0.8, 0.5))],
              [stats.gamma(a, scale=1 / b).pdf for a, b in ((2.0, 1.0), (5.0, 3.0), (0.8, 0.5))], (0, np.inf), 2.0),
    "beta": (lambda: [Beta(torch.tensor(a), torch.tensor(b)) for a, b in ((2.0, 3.0), (5.0, 1.5), (30.0, 40.0))],
             [stats.beta(a, b).pdf for a, b in ((2.0, 3.0), (5.0, 1.5), (30.0, 40.0))], (0, 1), -1.0),
}


@pytest.mark.parametrize("name", CONTINUOUS_1D)
def test_positive_support_pools_match_scipy_quadrature(name):
    make_experts, pdfs, support, alpha = CONTINUOUS_1D[name]
    experts = make_experts()
    pool = opinionpool.holder(experts, alpha=alpha, weights=WEIGHTS)
    means = [float(e.mean) for e in experts]
    log_z, mean, var = quad_moments(pdfs, WEIGHTS, alpha, *support, points=means if np.isfinite(support[1]) else None)
    assert rel(pool.log_normalizer, log_z) < 1e-8
    assert rel(pool.mean, mean) < 1e-8
    assert rel(pool.variance, var) < 1e-8


def test_von_mises_pool_statistics_match_quadrature():
    locs, kappas = [0.5, -2.0, 2.8], [2.0, 4.0, 0.7]
    experts = [VonMises(torch.tensor(m), torch.tensor(k)) for m, k in zip(locs, kappas)]
    pool = opinionpool.holder(experts, alpha=0.7, weights=WEIGHTS)
    pdfs = [stats.vonmises(k, loc=m).pdf for m, k in zip(locs, kappas)]

    def pooled(z):
        return float(power_mean(np.array([f(z) for f in pdfs]), WEIGHTS, 0.7))

    opts = dict(epsabs=0, epsrel=1e-12, limit=400)
    z0 = integrate.quad(pooled, -np.pi, np.pi, **opts)[0]
    e_cos = integrate.quad(lambda z: np.cos(z) * pooled(z), -np.pi, np.pi, **opts)[0] / z0
    e_sin = integrate.quad(lambda z: np.sin(z) * pooled(z), -np.pi, np.pi, **opts)[0] / z0
    assert rel(pool.log_normalizer, np.log(z0)) < 1e-8
    assert torch.allclose(pool.summary.expected_statistic.value, torch.tensor([e_cos, e_sin]), rtol=1e-8, atol=0)
    assert rel(pool.mean, math.atan2(e_sin, e_cos)) < 1e-8
    assert rel(pool.variance, 1 - math.hypot(e_cos, e_sin)) < 1e-8
    # moment matching onto the family reproduces E[T(z)]
    matched = pool.moment_match()
    assert isinstance(matched, VonMises)
    assert rel(torch.special.i1e(matched.concentration) / torch.special.i0e(matched.concentration),
               math.hypot(e_cos, e_sin)) < 1e-7


def test_von_mises_quadrature_of_the_expected_statistic_alone():
    """Asking only for E[T(z)] (no mean or variance) from the quadrature of a circular pool."""
    locs, kappas = [0.5, -2.0], [2.0, 0.7]
    pool = opinionpool.holder([VonMises(torch.tensor(m), torch.tensor(k)) for m, k in zip(locs, kappas)], alpha=2.0)
    pdfs = [stats.vonmises(k, loc=m).pdf for m, k in zip(locs, kappas)]

    def pooled(z):
        return float(power_mean(np.array([f(z) for f in pdfs]), [0.5, 0.5], 2.0))

    opts = dict(epsabs=0, epsrel=1e-12, limit=400)
    z0 = integrate.quad(pooled, -np.pi, np.pi, **opts)[0]
    expected = [integrate.quad(lambda z, f=f: f(z) * pooled(z), -np.pi, np.pi, **opts)[0] / z0 for f in (np.cos, np.sin)]
    estimate = pool.estimate(["expected_statistic"], method="quadrature")
    assert torch.allclose(estimate.expected_statistic.value, torch.tensor(expected), rtol=1e-9, atol=1e-12)


def test_gamma_moment_match_reproduces_expected_statistic():
    experts = [Gamma(torch.tensor(a), torch.tensor(b)) for a, b in ((2.0, 1.0), (5.0, 3.0), (0.8, 0.5))]
    pool = opinionpool.holder(experts, alpha=2.0, weights=WEIGHTS)
    pdfs = [stats.gamma(a, scale=1 / b).pdf for a, b in ((2.0, 1.0), (5.0, 3.0), (0.8, 0.5))]

    def pooled(z):
        return float(power_mean(np.array([f(z) for f in pdfs]), WEIGHTS, 2.0))

    z0 = integrate.quad(pooled, 0, np.inf, epsabs=0, epsrel=1e-12, limit=400)[0]
    e_log = integrate.quad(lambda z: np.log(z) * pooled(z), 0, np.inf, epsabs=0, epsrel=1e-12, limit=400)[0] / z0
    matched = pool.moment_match()
    assert isinstance(matched, Gamma)
    assert rel(torch.digamma(matched.concentration) - torch.log(matched.rate), e_log) < 1e-7
    assert rel(matched.mean, pool.mean) < 1e-7


# ------------------------------------------------------------------------------ discrete
def test_discrete_pools_match_exact_sums():
    rates = [3.0, 10.0, 0.5]
    pool = opinionpool.holder([Poisson(torch.tensor(r)) for r in rates], alpha=2.0, weights=WEIGHTS)
    support = np.arange(400)
    log_z, mean, var, _ = sum_moments([stats.poisson(r).pmf for r in rates], WEIGHTS, 2.0, support)
    assert pool.summary.method == "enumeration" and pool.summary.error_kind == "truncation bound"
    assert abs(float(pool.log_normalizer) - log_z) <= float(pool.summary.log_normalizer.error) < 1e-4
    assert rel(pool.log_normalizer, log_z) < 1e-6
    assert rel(pool.mean, mean) < 1e-12
    assert rel(pool.variance, var) < 1e-12
    # float32 experts (the library tests' default dtype is float64): the stated error (truncation, and the rounding
    # of each point's log u) covers the sum's
    pool = opinionpool.holder([Poisson(torch.tensor(r, dtype=torch.float32)) for r in rates], alpha=2.0,
                              weights=WEIGHTS)
    assert pool.log_normalizer.dtype == torch.float32
    assert abs(float(pool.log_normalizer) - log_z) <= float(pool.summary.log_normalizer.error) < 1e-4
    assert rel(pool.mean, mean) < 1e-6 and rel(pool.variance, var) < 1e-6

    probs = [0.2, 0.7, 0.45]
    pool = opinionpool.holder([Binomial(12, torch.tensor(p)) for p in probs], alpha=-1.0, weights=WEIGHTS)
    log_z, mean, var, _ = sum_moments([stats.binom(12, p).pmf for p in probs], WEIGHTS, -1.0, np.arange(13))
    assert pool.summary.error_kind == "rounding bound"
    assert rel(pool.log_normalizer, log_z) < 1e-12 and rel(pool.mean, mean) < 1e-12 and rel(pool.variance, var) < 1e-12

    pool = opinionpool.holder([Bernoulli(torch.tensor(p)) for p in probs], alpha=math.inf, weights=WEIGHTS)
    q = np.array([[1 - p, p] for p in probs]).max(0)
    assert rel(pool.log_normalizer, np.log(q.sum())) < 1e-12 and rel(pool.mean, q[1] / q.sum()) < 1e-12

    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0], [2.0, 0.0, -1.0, 0.5], [-3.0, 0.0, 0.0, 4.0]])
    pool = opinionpool.holder(Categorical(logits=logits), alpha=3.0, weights=WEIGHTS)
    p = torch.softmax(logits, -1).numpy()
    pooled = power_mean(p, WEIGHTS, 3.0)
    assert rel(pool.log_normalizer, np.log(pooled.sum())) < 1e-12
    matched = pool.moment_match()
    assert torch.allclose(matched.probs, torch.tensor(pooled / pooled.sum()), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="no numeric mean"):
        pool.mean


def test_discrete_sampler_follows_the_enumerated_probabilities():
    probs = [0.2, 0.7, 0.45]
    pool = opinionpool.holder([Binomial(6, torch.tensor(p)) for p in probs], alpha=2.0, weights=WEIGHTS)
    samples = pool.sample((20000,), seed=1)
    counts = torch.bincount(samples.long(), minlength=7).numpy()
    _, _, _, expected = sum_moments([stats.binom(6, p).pmf for p in probs], WEIGHTS, 2.0, np.arange(7))
    assert stats.chisquare(counts, expected * counts.sum()).pvalue > 1e-3


# ------------------------------------------------------------------------ grid (2-D, 3-D)
def diag_experts(dim, seed=0, count=3):
    g = torch.Generator().manual_seed(seed)
    loc = 2 * torch.randn(count, dim, generator=g)
    scale = 0.4 + torch.rand(count, dim, generator=g)
    return Independent(Normal(loc, scale), 1), loc, scale


@pytest.mark.parametrize("dim,tolerance", [(2, 1e-9), (3, 1e-7)])
def test_grid_matches_exact_pools(dim, tolerance):
    experts, _, _ = diag_experts(dim)
    for alpha in (0.5, 1 / 3, 0.0):
        exact = opinionpool.holder(experts, alpha=alpha, weights=WEIGHTS)
        est = exact.estimate(method="grid")
        assert est.method == "grid"
        error = abs(float(est.log_normalizer.value - exact.log_normalizer))
        assert error < tolerance
        assert error <= float(est.log_normalizer.error) + 1e-12  # the reported error is not optimistic
        assert torch.allclose(est.mean.value, exact.mean, rtol=0, atol=tolerance)
        assert torch.allclose(est.variance.value, exact.variance, rtol=tolerance, atol=0)
        assert bool(((est.variance.value - exact.variance).abs() <= est.variance.error + 1e-12).all())


def test_grid_non_exact_alpha_matches_dense_trapezoid():
    """Reference: the trapezoid rule on a dense uniform numpy grid (spectrally accurate for these
    smooth, rapidly decaying integrands), built from scipy.stats densities."""
    experts, loc, scale = diag_experts(2, seed=4)
    pool = opinionpool.holder(experts, alpha=2.0, weights=WEIGHTS)
    assert pool.summary.method == "grid"
    lo, hi = float((loc - 12 * scale).min()), float((loc + 12 * scale).max())
    axis = np.linspace(lo, hi, 1601)
    x, y = np.meshgrid(axis, axis, indexing="ij")
    dens = np.array([stats.norm(loc[j, 0], scale[j, 0]).pdf(x) * stats.norm(loc[j, 1], scale[j, 1]).pdf(y)
                     for j in range(3)])
    pooled = power_mean(dens, WEIGHTS, 2.0)
    cell = (axis[1] - axis[0]) ** 2
    z0 = pooled.sum() * cell  # the integrand vanishes at the box edges, so the trapezoid rule is this sum
    mx, my = (x * pooled).sum() * cell / z0, (y * pooled).sum() * cell / z0
    cxy = ((x - mx) * (y - my) * pooled).sum() * cell / z0
    assert rel(pool.log_normalizer, np.log(z0)) < 1e-9
    assert np.allclose(pool.mean.numpy(), [mx, my], rtol=0, atol=1e-9)
    assert abs(float(pool.covariance_matrix[0, 1]) - cxy) < 1e-9
    # the two coordinates of a non-exact pool are correlated even though every expert is diagonal
    assert abs(cxy) > 1e-3


def test_grid_full_covariance_matches_exact_pool():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 2, 2, generator=g)
    cov = a @ a.transpose(-1, -2) + 0.3 * torch.eye(2)
    experts = MultivariateNormal(torch.randn(3, 2, generator=g), covariance_matrix=cov)
    exact = opinionpool.holder(experts, alpha=0.5, weights=WEIGHTS)
    est = exact.estimate(["mean", "covariance"], method="grid")
    assert abs(float(est.log_normalizer.value - exact.log_normalizer)) < 1e-9
    assert torch.allclose(est.covariance.value, exact.covariance_matrix, rtol=1e-8, atol=1e-10)


# -------------------------------------------------------------------- importance sampling
def common_covariance_truth(alpha, delta_sq, weights):
    """Two Gaussians sharing one covariance: q2/q1 = exp(s) with s ~ N(-delta^2/2, delta^2) under q1, so
    Z = E_q1[(w1 + w2 exp(alpha s))^(1/alpha)] is a 1-D integral whatever the dimension."""
    w1, w2 = weights
    sd = math.sqrt(delta_sq)

    def f(s):
        return stats.norm(-delta_sq / 2, sd).pdf(s) * (w1 + w2 * np.exp(alpha * s)) ** (1 / alpha)

    return math.log(integrate.quad(f, -delta_sq / 2 - 40 * sd, -delta_sq / 2 + 40 * sd, epsabs=0, epsrel=1e-12,
                                   limit=400)[0])


@pytest.mark.parametrize("alpha", [2.0, -1.0])
def test_importance_sampling_is_calibrated_in_16_dimensions(alpha):
    """log Z within 1% and the reported standard error covering the truth (2 SE) for >= 90 of 100 seeds."""
    dim, weights = 16, [0.35, 0.65]
    g = torch.Generator().manual_seed(11)
    scale = 0.5 + torch.rand(dim, generator=g)  # unequal scales across coordinates
    loc1 = torch.randn(dim, generator=g)
    loc2 = loc1 + 0.45 * scale * torch.randn(dim, generator=g)
    experts = Independent(Normal(torch.stack((loc1, loc2)), scale.expand(2, dim)), 1)
    delta_sq = float((((loc2 - loc1) / scale) ** 2).sum())
    truth = common_covariance_truth(alpha, delta_sq, weights)
    pool = opinionpool.holder(experts, alpha=alpha, weights=weights)
    covered = 0
    for seed in range(100):
        est = pool.estimate(method="importance", num_samples=30_000, seed=seed)
        value, se = float(est.log_normalizer.value), float(est.log_normalizer.error)
        assert abs(value - truth) < 0.01
        covered += abs(value - truth) <= 2 * se
    assert covered >= 90, covered


@pytest.mark.parametrize("alpha", [-1.0, -0.5])
def test_importance_sampling_of_negative_orders_with_experts_far_apart(alpha):
    """For alpha < 0 the proposal was the log-linear pool of the pool's own weights, which sits on the heavier
    expert's side while the pool lies where the experts' tails cross: 4-D experts 30 sd apart gave an effective
    sample size of 1.3 and log Z 28 nats off with 0.9 stated. The proposal is now the log-linear pool whose weights
    minimise the bound u <= prod_j (lambda_j^(1/alpha) q_j)^(beta_j). Reference: with identity covariances the pool
    factorises, its first coordinate the 1-D pool of N(0, 1) and N(30, 1), by scipy quadrature; the certified upper
    bound of log Z is above it, far below the log-linear pool's, and its gradient in the means is that of finite
    differences."""
    delta, weights = 30.0, [0.3, 0.7]

    def log_u(x):
        log_q = np.stack([stats.norm.logpdf(x, 0, 1), stats.norm.logpdf(x, delta, 1)])
        return logsumexp(np.log(weights)[:, None] + alpha * log_q, axis=0) / alpha

    xs = np.linspace(-10, delta + 10, 200_001)
    top, peak = log_u(xs).max(), xs[np.argmax(log_u(xs))]
    moments = [integrate.quad(lambda x, k=k: x**k * np.exp(log_u(np.atleast_1d(x))[0] - top), peak - 5, peak + 5,
                              points=[peak], limit=200, epsabs=0, epsrel=1e-12)[0] for k in range(2)]
    log_z, mean = top + math.log(moments[0]), moments[1] / moments[0]
    loc = torch.zeros(2, 4, dtype=torch.float64)
    loc[1, 0] = delta
    loc.requires_grad_(True)
    pool = opinionpool.holder(Independent(Normal(loc, torch.ones(2, 4, dtype=torch.float64)), 1), alpha, weights)
    summary = pool.summary
    assert summary.method == "importance" and float(summary.effective_sample_size) > 1000
    assert abs(summary.log_normalizer.value.item() - log_z) < 4 * summary.log_normalizer.error.item()
    assert abs(summary.mean.value[0].item() - mean) < 4 * summary.mean.error[0].item()
    lower, upper = pool.normalizer_bounds()
    log_linear = opinionpool.holder(Independent(Normal(loc, torch.ones(2, 4, dtype=torch.float64)), 1), 0.0,
                                    weights).log_normalizer
    assert log_z <= upper.item() < log_linear.item() - 10
    (gradient,) = torch.autograd.grad(upper, loc)
    step = 1e-5
    for expert, d in ((0, 0), (1, 0), (1, 2)):
        moved = []
        for sign in (1, -1):
            shifted = loc.detach().clone()
            shifted[expert, d] += sign * step
            moved.append(opinionpool.holder(Independent(Normal(shifted, torch.ones(2, 4, dtype=torch.float64)), 1),
                                            alpha, weights).normalizer_bounds()[1].item())
        assert gradient[expert, d].item() == pytest.approx((moved[0] - moved[1]) / (2 * step), rel=1e-5, abs=1e-7)


def test_importance_sampling_agrees_with_grid_and_is_reproducible():
    experts, _, _ = diag_experts(2, seed=2)
    pool = opinionpool.holder(experts, alpha=-1.0, weights=WEIGHTS)
    grid = pool.estimate(["mean", "variance", "covariance"], method="grid")
    est = pool.estimate(["mean", "variance", "covariance"], method="importance", num_samples=200_000, seed=3)
    for name in ("mean", "variance", "covariance"):
        truth, got = getattr(grid, name).value, getattr(est, name)
        assert bool(((got.value - truth).abs() <= 4.5 * got.error + 1e-12).all()), name
    assert abs(float(est.log_normalizer.value - grid.log_normalizer.value)) <= 4.5 * float(est.log_normalizer.error)
    assert 0 < float(est.effective_sample_size) <= 200_000
    again = pool.estimate(method="importance", num_samples=50_000, seed=3)
    same = pool.estimate(method="importance", num_samples=50_000, seed=3)
    other = pool.estimate(method="importance", num_samples=50_000, seed=4)
    assert torch.equal(again.mean.value, same.mean.value)
    assert not torch.equal(again.mean.value, other.mean.value)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(pool.estimate(method="importance", num_samples=1000, generator=g1).mean.value,
                       pool.estimate(method="importance", num_samples=1000, generator=g2).mean.value)


# --------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("alpha", [2.0, -1.0, 0.3, math.inf])
def test_rejection_sampler_matches_the_quadrature_cdf(alpha):
    experts = [Normal(torch.tensor(m), torch.tensor(s)) for m, s in zip(NORMAL_MU, NORMAL_SD)]
    pool = opinionpool.holder(experts, alpha=alpha, weights=WEIGHTS)
    samples = pool.sample((4000,), seed=0).numpy()
    pdfs = [stats.norm(m, s).pdf for m, s in zip(NORMAL_MU, NORMAL_SD)]

    def pooled(z):
        return float(power_mean(np.array([f(z) for f in pdfs]), WEIGHTS, alpha))

    z0 = integrate.quad(pooled, -60, 60, points=NORMAL_MU, limit=400)[0]
    grid = np.linspace(-12, 12, 2401)
    cdf_values = integrate.cumulative_trapezoid([pooled(z) for z in grid], grid, initial=0) / z0
    assert stats.kstest(samples, lambda x: np.interp(x, grid, cdf_values)).pvalue > 1e-3


def test_the_negative_alpha_envelope_is_fitted_once_per_pool(monkeypatch):
    """The envelope of an alpha < 0 pool and the bracket an estimate is checked against share one fit of the
    log-linear bound's weights (L-BFGS, about 0.1 s for a batch): an importance estimate ran it twice. An expanded
    pool fits its own; the bound and the estimate are the same either way."""
    import opinionpool.pool as pool_module

    calls = []
    minimize = pool_module.optimize.minimize

    def counted(*args, **kwargs):
        calls.append(1)
        return minimize(*args, **kwargs)

    monkeypatch.setattr(pool_module.optimize, "minimize", counted)
    experts = MultivariateNormal(torch.tensor([[0.0, 0.0], [6.0, 1.0]], dtype=torch.float64),
                                 torch.eye(2, dtype=torch.float64).expand(2, 2, 2))
    pool = opinionpool.holder(experts, alpha=-1.0, weights=torch.tensor([0.3, 0.7], dtype=torch.float64))
    first = pool.estimate(method="importance", num_samples=4000, seed=0)
    assert len(calls) == 1
    again = pool.estimate(method="importance", num_samples=4000, seed=0)
    assert len(calls) == 1 and torch.equal(first.log_normalizer.value, again.log_normalizer.value)
    wide = pool.expand((3,))
    bound = wide.envelope().log_bound
    assert len(calls) == 2
    assert torch.allclose(bound, pool.envelope().log_bound.expand(3), rtol=1e-9, atol=0)


def test_the_negative_alpha_envelope_under_inference_mode():
    """The fit of an alpha < 0 envelope differentiates its bound: under torch.inference_mode it raised ("element 0
    of tensors does not require grad"), for pools built inside or outside the mode. The bound and bracket must be
    those computed outside it, and the estimate must lie within that bracket."""
    def pool():
        experts = MultivariateNormal(torch.tensor([[0.0, 0.0], [6.0, 1.0]], dtype=torch.float64),
                                     torch.eye(2, dtype=torch.float64).expand(2, 2, 2))
        return opinionpool.holder(experts, alpha=-1.0, weights=torch.tensor([0.3, 0.7], dtype=torch.float64))

    outside = pool()
    want_bound, (want_low, want_high) = outside.envelope().log_bound, outside.normalizer_bounds()
    built_outside = pool()
    with torch.inference_mode():
        for inside in (pool(), built_outside):
            bound, (low, high) = inside.envelope().log_bound, inside.normalizer_bounds()
            assert torch.allclose(bound, want_bound, rtol=1e-12, atol=0)
            assert float(low) == float(want_low) and torch.allclose(high, want_high, rtol=1e-12, atol=0)
            estimate = inside.estimate(method="importance", num_samples=4000, seed=0).log_normalizer.value
            assert float(want_low) <= float(estimate) <= float(want_high)


def test_pools_the_envelope_cannot_sample_invert_their_cdf():
    """Alpha = -1 with experts far apart relative to their scales: the pool's mass lies between them, where every
    expert's is tiny, and the log-linear envelope accepts e^-667 of its proposals. Sampling raised after 1000
    rounds; scalar pools now invert their cdf there. Reference: the pooled density on a dense grid (scipy's normal
    log-densities), a Kolmogorov-Smirnov test; the same seed gives the same samples."""
    locs, scales, weights = [-10.3777, 7.6499, 4.8634], [0.2376, 0.1289, 0.3548], [0.2069, 0.6648, 0.1283]
    experts = Normal(torch.tensor(locs, dtype=torch.float64), torch.tensor(scales, dtype=torch.float64))
    pool = opinionpool.holder(experts, alpha=-1.0, weights=weights)
    # the fitted log-linear envelope accepts 1.4 % (the pool's own weights' accepted e^-667): below the 5 % share
    # from which the pool samples by rejection
    assert float(pool.log_normalizer - pool.envelope().log_bound) < math.log(0.05)
    samples = pool.sample((150,), seed=1)
    assert torch.equal(samples, pool.sample((150,), seed=1))
    grid = np.linspace(-15, 12, 2_000_001)
    log_q = stats.norm(np.array(locs)[:, None], np.array(scales)[:, None]).logpdf(grid)
    log_u = -logsumexp(np.log(weights)[:, None] - log_q, axis=0)  # the weighted harmonic mean
    cdf_values = integrate.cumulative_trapezoid(np.exp(log_u - log_u.max()), grid, initial=0)
    cdf_values /= cdf_values[-1]
    assert stats.kstest(samples.numpy(), lambda x: np.interp(x, grid, cdf_values)).pvalue > 1e-3


def test_rejection_sampler_fills_every_slot_from_any_accepted_proposal():
    """An envelope accepting 6e-3 of its proposals gives 1e4 samples (each slot waited for its own proposal: 1000
    rounds of 1e4 proposals accepted 58 500 draws yet left 0.2 % of the slots empty and raised), and every pool of a
    batch keeps its own law: sample means within 4.5 standard errors of the means by quadrature, and the first half
    of the slots distributed as the second (two-sample Kolmogorov-Smirnov test per coordinate): the order in which
    slots fill does not matter. The pools' own envelopes accept 25 % and 35 %; their bounds raised by 4 nats (still
    bounds) 0.5 % and 0.7 %."""
    loc = torch.tensor([[[0.0, 0.0], [5.0, 0.0]], [[0.0, 0.0], [2.0, 1.0]]], dtype=torch.float64)
    covariance = torch.stack([torch.eye(2), 0.01 * torch.eye(2)]).double().expand(2, 2, 2, 2)
    pool = opinionpool.holder(MultivariateNormal(loc, covariance), alpha=-1.0, weights=[0.5, 0.5])
    envelope = pool.envelope()
    loose = Envelope(envelope.proposal, envelope.log_bound + 4.0, "a loose bound")
    assert (pool.log_normalizer - loose.log_bound < math.log(1e-2)).all()
    torch.manual_seed(0)
    samples = rejection_sample(pool.family, pool.experts.params, pool.log_weights, -1.0, loose, 10_000)
    assert samples.shape == (10_000, 2, 2)
    error = (pool.variance / 10_000).sqrt()
    assert ((samples.mean(0) - pool.mean).abs() < 4.5 * error).all(), ((samples.mean(0) - pool.mean) / error)
    for b, d in itertools.product(range(2), range(2)):
        first, second = samples[:5000, b, d].numpy(), samples[5000:, b, d].numpy()
        assert stats.ks_2samp(first, second).pvalue > 1e-4


def test_sampler_errors_are_reported():
    experts = [Normal(torch.tensor(m), torch.tensor(s)) for m, s in zip(NORMAL_MU, NORMAL_SD)]
    pool = opinionpool.holder(experts, alpha=2.0, weights=WEIGHTS)
    params, lw = pool.experts.params, pool.log_weights
    envelope = pool.envelope()
    too_tight = Envelope(envelope.proposal, envelope.log_bound - 1.0, "a deliberately wrong bound")
    with pytest.raises(RuntimeError, match="envelope .*exceeded"):
        rejection_sample(pool.family, params, lw, 2.0, too_tight, 1000)
    too_loose = Envelope(envelope.proposal, envelope.log_bound + 40.0, "a deliberately loose bound")
    with pytest.raises(RuntimeError, match="after 2 rounds"):
        rejection_sample(pool.family, params, lw, 2.0, too_loose, 100, max_rounds=2)
    assert pool.sample((0,)).shape == (0,)  # empty, as torch.distributions sample (it raised before)


# -------------------------------------------------------------------------- bounds
@pytest.mark.parametrize("alpha", NON_EXACT + [0.5, 0.0, 1.0])
def test_normalizer_bounds_bracket_the_estimate(alpha):
    experts, _, _ = diag_experts(2, seed=7)
    pool = opinionpool.holder(experts, alpha=alpha, weights=WEIGHTS)
    lower, upper = pool.normalizer_bounds()
    log_z = pool.estimate(method="grid").log_normalizer.value
    assert float(lower) - 1e-9 <= float(log_z) <= float(upper) + 1e-9
    if opinionpool.pool.exact_order(alpha) is not None:
        assert float(upper - lower) == 0


def test_infinite_alpha_ignores_positive_weights():
    experts = [Normal(torch.tensor(m), torch.tensor(s)) for m, s in zip(NORMAL_MU, NORMAL_SD)]
    for alpha in (math.inf, -math.inf):
        a = opinionpool.holder(experts, alpha=alpha, weights=WEIGHTS)
        b = opinionpool.holder(experts, alpha=alpha, weights=[0.6, 0.1, 0.3])
        assert rel(a.log_normalizer, b.log_normalizer) < 1e-12
        # a zero weight removes the expert
        c = opinionpool.holder(experts, alpha=alpha, weights=[0.5, 0.5, 0.0])
        d = opinionpool.holder(experts[:2], alpha=alpha)
        assert rel(c.log_normalizer, d.log_normalizer) < 1e-12


# ---------------------------------------------------------------------------- errors
def test_sample_budgets_are_checked_like_every_other_count():
    """num_samples is an integer of at least 2 (one draw gave a NaN standard error): numpy integers count, bools do
    not; entropy_estimate and kl_estimate check it on every path (the quadrature's took 0 silently); a seed outside
    torch's range is named (it raised "Overflow when unpacking long long")."""
    experts = [Normal(torch.tensor(m), torch.tensor(s)) for m, s in zip(NORMAL_MU, NORMAL_SD)]
    pool = opinionpool.holder(experts, alpha=2.0, weights=WEIGHTS)
    estimate = pool.estimate(method="importance", num_samples=np.int64(1000), seed=0)
    assert estimate.num_samples == 1000
    for bad in (True, 1000.0, -3, 1):
        with pytest.raises(ValueError, match=f"num_samples must be an integer of at least 2.*got {bad!r}"):
            pool.estimate(method="importance", num_samples=bad)
    for call in (lambda: pool.entropy_estimate(num_samples=0), lambda: pool.kl_estimate(experts[0], num_samples=0)):
        with pytest.raises(ValueError, match="num_samples must be an integer of at least 2.*got 0"):
            call()
    with pytest.raises(ValueError, match=r"seed must lie in \[-2\*\*63, 2\*\*64\), got 1180591620717411303424"):
        pool.estimate(method="importance", seed=2**70)


def test_engine_errors_name_the_problem():
    experts = [Normal(torch.tensor(m), torch.tensor(s)) for m, s in zip(NORMAL_MU, NORMAL_SD)]
    pool = opinionpool.holder(experts, alpha=2.0, weights=WEIGHTS)
    with pytest.raises(ValueError, match="num_samples must be an integer of at least 2.*0"):
        pool.estimate(method="importance", num_samples=0)
    with pytest.raises(ValueError, match="num_samples must be an integer of at least 2"):
        opinionpool.holder(experts, alpha=2.0, method="importance", num_samples=0)
    with pytest.raises(ValueError, match="method must be 'auto' or one of"):
        pool.estimate(method="magic")
    with pytest.raises(ValueError, match="'enumeration' needs discrete experts, got Normal"):
        pool.estimate(method="enumeration")
    with pytest.raises(ValueError, match="covariance needs multivariate"):
        pool.estimate(["covariance"])
    with pytest.raises(ValueError, match="quantities must be among"):
        pool.estimate(["median"])
    with pytest.raises(ValueError, match="covariance_matrix needs multivariate"):
        pool.covariance_matrix
    poisson = opinionpool.holder([Poisson(torch.tensor(2.0)), Poisson(torch.tensor(4.0))], alpha=2.0)
    with pytest.raises(ValueError, match="'importance' is for continuous experts"):
        poisson.estimate(method="importance")
    categorical = opinionpool.holder([Categorical(logits=torch.zeros(3)), Categorical(logits=torch.ones(3))],
                                     alpha=2.0)
    with pytest.raises(ValueError, match="Categorical experts have no numeric mean"):
        categorical.estimate(["mean"])


def test_batched_experts_match_one_pool_at_a_time():
    g = torch.Generator().manual_seed(8)
    loc, scale = torch.randn(2, 3, generator=g), 0.5 + torch.rand(2, 3, generator=g)
    batched = opinionpool.holder(Normal(loc, scale), alpha=-1.0, weights=WEIGHTS)
    assert batched.batch_shape == (2,) and batched.sample((5,), seed=0).shape == (5, 2)
    loc2, scale2 = torch.randn(2, 3, 2, generator=g), 0.5 + torch.rand(2, 3, 2, generator=g)
    grid = opinionpool.holder(Independent(Normal(loc2, scale2), 1), alpha=2.0, weights=WEIGHTS)
    for b in range(2):
        single = opinionpool.holder(Normal(loc[b], scale[b]), alpha=-1.0, weights=WEIGHTS)
        assert rel(batched.log_normalizer[b], single.log_normalizer) < 1e-12
        assert rel(batched.variance[b], single.variance) < 1e-12
        single = opinionpool.holder(Independent(Normal(loc2[b], scale2[b]), 1), alpha=2.0, weights=WEIGHTS)
        assert rel(grid.log_normalizer[b], single.log_normalizer) < 1e-12
        assert torch.allclose(grid.covariance_matrix[b], single.covariance_matrix, rtol=1e-12, atol=1e-15)
