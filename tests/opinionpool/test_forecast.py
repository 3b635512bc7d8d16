"""The forecaster's toolkit (opinionpool.forecast) against independent float64 computations: scipy quadrature of the
CRPS integrand, the closed form of a Normal's CRPS, scipy's cdfs, quadrature of sqrt(pq), statistical tests with
fixed seeds."""

import math
import warnings

import numpy as np
import pytest
import scipy.integrate
import scipy.optimize
import scipy.special
import scipy.stats
import torch
from torch.distributions import (
    AffineTransform,
    Beta,
    Categorical,
    Cauchy,
    Exponential,
    ExpTransform,
    Gamma,
    Laplace,
    LogNormal,
    MixtureSameFamily,
    Normal,
    Pareto,
    Poisson,
    StudentT,
    TransformedDistribution,
    Uniform,
    VonMises,
    Weibull,
)

import opinionpool as op

LOCS = [[-1.0, 0.5, 2.0], [0.3, -0.4, 1.1]]
SCALES = [[0.7, 1.3, 0.5], [1.0, 2.0, 0.8]]
WEIGHTS = [0.5, 0.3, 0.2]
OBS = [0.4, -2.5]


def _f64(*values):
    """float64 tensors of ``values``."""
    return [torch.tensor(v, dtype=torch.float64) for v in values]


def _normal_experts():
    return Normal(torch.tensor(LOCS, dtype=torch.float64), torch.tensor(SCALES, dtype=torch.float64))


def _holder_density(pdfs, weights, alpha):
    """The unnormalised Hölder pool density from the experts' pdfs (a list of callables) by hand."""
    def u(x):
        values = np.stack([pdf(x) for pdf in pdfs])
        w = np.asarray(weights)[:, None] / np.sum(weights)
        if alpha == 0:
            with np.errstate(divide="ignore"):  # pdfs underflowing far in the tails: log 0 = -inf, exp(-inf) = 0
                return np.exp((w * np.log(values)).sum(0))
        return ((w * values ** alpha).sum(0)) ** (1 / alpha)
    return u


def _crps_by_scipy(density, y, lower, upper, points=200_001):
    """CRPS = int (F - 1{x >= y})^2 from a density on [lower, upper]: F by scipy's cumulative Simpson rule on a fine
    grid through y, normalised by the total, the squared difference by Simpson's rule on each side of y."""
    left, right = np.linspace(lower, y, points), np.linspace(y, upper, points)
    x = np.concatenate((left, right[1:]))
    f = scipy.integrate.cumulative_simpson(density(x), x=x, initial=0)
    f = f / f[-1]
    return (scipy.integrate.simpson(f[:points] ** 2, x=left)
            + scipy.integrate.simpson((1 - f[points - 1:]) ** 2, x=right)), f[points - 1]


# ---------------------------------------------------------------------------------------------------------- CRPS
def test_crps_of_a_normal_matches_its_closed_form():
    loc, scale = torch.tensor([0.0, 1.5, -2.0], dtype=torch.float64), torch.tensor([1.0, 0.3, 4.0], dtype=torch.float64)
    y = np.array([0.2, 3.0, -9.0])
    z = (y - loc.numpy()) / scale.numpy()
    norm = scipy.stats.norm
    expected = scale.numpy() * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / math.sqrt(math.pi))
    got = op.crps(Normal(loc, scale), torch.tensor(y))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_crps_of_tiny_and_huge_normal_scales_and_its_gradient(dtype):
    """The closed form squared the scales (a float32 scale of 1e-25 gave 0 / 0, one of 1e30 inf - inf: NaN and
    -inf) and divided by them (a scale of 1e-20 at 1e20 from the mean: NaN gradients). Against the closed form in
    float64 (scipy) and its derivatives -(2 Phi(z) - 1) in the mean and 2 phi(z) - 1/sqrt(pi) in the scale; a
    two-component mixture of such scales against its limit, computed by hand."""
    norm = scipy.stats.norm
    for scale, y in ((1e-20, 1e20), (1e-25, 1.0), (1e-25, 0.0), (1e-30, 3e-30), (1e30, 1.0), (1.0, -0.3)):
        loc, sd = (torch.tensor(v, dtype=dtype, requires_grad=True) for v in (0.0, scale))
        got = op.crps(Normal(loc, sd), torch.tensor(y, dtype=dtype))
        grad_loc, grad_scale = torch.autograd.grad(got, (loc, sd))
        z = y / scale
        expected = scale * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / math.sqrt(math.pi))
        rel = 1e-6 if dtype == torch.float32 else 1e-12
        assert got.item() == pytest.approx(expected, rel=rel, abs=0), (scale, y)
        assert grad_loc.item() == pytest.approx(-(2 * norm.cdf(z) - 1), rel=rel, abs=1e-7), (scale, y)
        assert grad_scale.item() == pytest.approx(2 * norm.pdf(z) - 1 / math.sqrt(math.pi), rel=rel, abs=1e-7)
    mixture = MixtureSameFamily(Categorical(torch.tensor([0.4, 0.6], dtype=dtype)),
                                Normal(torch.tensor([0.0, 1.0], dtype=dtype), torch.tensor([1e-25, 2e-25], dtype=dtype)))
    # E|X - y| - E|X - X'| / 2 of point masses 0.4 at 0 and 0.6 at 1: 0.4 |y| + 0.6 |y - 1| - 0.4 * 0.6
    got = op.crps(mixture, torch.tensor([1.0, 0.0, 0.5], dtype=dtype))
    assert got.tolist() == pytest.approx([0.16, 0.36, 0.26], rel=1e-6, abs=0)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 0.0])
def test_crps_of_an_exact_gaussian_pool_matches_scipy_quadrature(alpha):
    pool = op.holder(_normal_experts(), alpha, WEIGHTS)
    got = op.crps(pool, torch.tensor(OBS, dtype=torch.float64))
    for t, y in enumerate(OBS):
        pdfs = [scipy.stats.norm(loc, scale).pdf for loc, scale in zip(LOCS[t], SCALES[t])]
        expected, _ = _crps_by_scipy(_holder_density(pdfs, WEIGHTS, alpha), y, -20, 20)
        assert float(got[t]) == pytest.approx(expected, rel=1e-8, abs=1e-10)


def test_crps_of_a_numerical_pool_and_its_pit_match_scipy_quadrature():
    alpha = 0.3
    pool = op.holder(_normal_experts(), alpha, WEIGHTS)
    y = torch.tensor(OBS, dtype=torch.float64)
    got, u = op.crps(pool, y), op.pit(pool, y)
    for t, obs in enumerate(OBS):
        pdfs = [scipy.stats.norm(loc, scale).pdf for loc, scale in zip(LOCS[t], SCALES[t])]
        expected, cdf = _crps_by_scipy(_holder_density(pdfs, WEIGHTS, alpha), obs, -20, 20)
        assert float(got[t]) == pytest.approx(expected, rel=1e-7)
        assert float(u[t]) == pytest.approx(cdf, abs=1e-8)


def test_crps_of_a_gamma_pool_with_an_observation_beyond_the_bulk():
    """Positive support (the panels start at 0) and an observation far in the right tail (the length term)."""
    shapes, rates = [[3.0, 6.0]], [[1.0, 0.8]]
    pool = op.holder(Gamma(torch.tensor(shapes, dtype=torch.float64), torch.tensor(rates, dtype=torch.float64)), 2.0,
                     [0.7, 0.3])
    for obs in (4.2, 120.0):
        got = float(op.crps(pool, torch.tensor([obs], dtype=torch.float64))[0])
        pdfs = [scipy.stats.gamma(a, scale=1 / b).pdf for a, b in zip(shapes[0], rates[0])]
        expected, _ = _crps_by_scipy(_holder_density(pdfs, [0.7, 0.3], 2.0), obs, 0.0, obs + 60.0)
        assert got == pytest.approx(expected, rel=1e-7)


def test_crps_of_a_plain_torch_distribution_by_quadrature_of_scipy_cdf():
    """torch's Gamma has no cdf: the density path, against scipy.integrate.quad of (F - 1{x >= y})^2 with scipy's
    own Gamma cdf."""
    dist = Gamma(torch.tensor([2.5, 9.0], dtype=torch.float64), torch.tensor([1.5, 2.0], dtype=torch.float64))
    y = [0.3, 6.0]
    got = op.crps(dist, torch.tensor(y, dtype=torch.float64))
    for t, (a, b) in enumerate([(2.5, 1.5), (9.0, 2.0)]):
        cdf = scipy.stats.gamma(a, scale=1 / b).cdf
        expected = (scipy.integrate.quad(lambda x, cdf=cdf: cdf(x) ** 2, 0, y[t], epsabs=1e-13)[0]
                    + scipy.integrate.quad(lambda x, cdf=cdf: (1 - cdf(x)) ** 2, y[t], np.inf, epsabs=1e-13)[0])
        assert float(got[t]) == pytest.approx(expected, rel=1e-8)


def test_crps_of_a_gaussian_mixture_is_differentiable_with_the_right_gradient():
    loc = torch.tensor(LOCS, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(SCALES, dtype=torch.float64)
    y = torch.tensor(OBS, dtype=torch.float64)
    torch.autograd.gradcheck(lambda m: op.crps(op.holder(Normal(m, scale), 0.5, WEIGHTS), y), (loc,))


def _uniform_crps_by_quad(a, b, y):
    """int (F(x) - 1{x >= y})^2 dx for Uniform(a, b) by scipy quadrature, y inside [a, b]."""
    return (scipy.integrate.quad(lambda x: ((x - a) / (b - a)) ** 2, a, y, epsabs=1e-14)[0]
            + scipy.integrate.quad(lambda x: (1 - (x - a) / (b - a)) ** 2, y, b, epsabs=1e-14)[0])


def test_crps_with_batched_support_bounds_matches_quadrature_and_closed_form():
    """Uniform(a, b) has a support that depends on its batched parameters; its CRPS inside the support is
    ((y - a)^3 + (b - y)^3) / (3 (b - a)^2): 1/12 and 1/6 for the first two."""
    a, b, y = [0.0, 1.0, -2.0], [1.0, 3.0, 0.5], [0.5, 2.0, 0.1]
    got = op.crps(Uniform(torch.tensor(a), torch.tensor(b)), torch.tensor(y))
    np.testing.assert_allclose(got.numpy(), [_uniform_crps_by_quad(*args) for args in zip(a, b, y)], rtol=1e-9)
    np.testing.assert_allclose(got[:2].numpy(), [1 / 12, 1 / 6], rtol=1e-9)


def test_crps_rejects_circular_forecasts():
    experts = VonMises(torch.tensor([0.3, -1.0]), torch.tensor([2.0, 5.0]))
    mixture = MixtureSameFamily(Categorical(torch.tensor([0.5, 0.5])), experts)
    for forecast in (experts, op.holder(experts, 0.5), op.NumericalHolderPool(experts, 0.3), mixture):
        with pytest.raises(ValueError, match=f"forecast must not be circular.*{type(forecast).__name__}"):
            op.crps(forecast, torch.tensor(0.75))


# --------------------------------------------------------------------------------------------------- calibration
def test_pit_of_a_correctly_specified_forecast_is_uniform_and_has_power():
    """Kolmogorov-Smirnov at level 0.01 with a fixed seed: a calibrated forecast passes, one with twice the spread
    fails (so the test can tell)."""
    generator = torch.Generator().manual_seed(7)
    n = 2000
    loc = torch.randn(n, generator=generator, dtype=torch.float64) * 3
    scale = torch.rand(n, generator=generator, dtype=torch.float64) + 0.5
    y = loc + scale * torch.randn(n, generator=generator, dtype=torch.float64)
    calibrated = op.pit(Normal(loc, scale), y)
    np.testing.assert_allclose(calibrated.numpy(), scipy.stats.norm.cdf(y.numpy(), loc.numpy(), scale.numpy()),
                               atol=1e-14)
    assert scipy.stats.kstest(calibrated.numpy(), "uniform").pvalue > 0.01
    assert scipy.stats.kstest(op.pit(Normal(loc, 2 * scale), y).numpy(), "uniform").pvalue < 0.01


def _vonmises_pdf(x, loc, kappa):
    """The von Mises density in a form that neither overflows nor underflows at large concentration."""
    return np.exp(kappa * (np.cos(x - loc) - 1)) / (2 * np.pi * scipy.special.i0e(kappa))


def _circular_pit_by_quad(density, y, points=()):
    """The mass of [-pi, y) (y taken modulo 2 pi into [-pi, pi)) over the mass of [-pi, pi), by scipy quadrature."""
    y = (y + math.pi) % (2 * math.pi) - math.pi
    inside = [p for p in points if -math.pi < p < math.pi]
    total = scipy.integrate.quad(density, -math.pi, math.pi, points=inside, epsabs=1e-14, limit=200)[0]
    below = [p for p in inside if p < y]
    return scipy.integrate.quad(density, -math.pi, y, points=below or None, epsabs=1e-14, limit=200)[0] / total


def test_pit_of_a_von_mises_forecast_is_the_mass_of_one_period_up_to_the_angle():
    """Angles: F(y) is the mass of [-pi, y) with y modulo 2 pi, including a forecast whose mass wraps past pi and a
    concentrated one (standard deviation 0.003, far below a fifth of the period's panels)."""
    loc, kappa = [0.3, 2.8, -1.0, 3.0], [2.0, 0.5, 1e5, 40.0]
    angles = np.array([0.75, -3.0, -0.999, -3.1])
    forecast = VonMises(torch.tensor(loc), torch.tensor(kappa))
    expected = [_circular_pit_by_quad(lambda x, m=m, k=k: _vonmises_pdf(x, m, k), y, points=[m, m - 2 * math.pi])
                for m, k, y in zip(loc, kappa, angles)]
    for turns in (0, 1, -2):
        got = op.pit(forecast, torch.tensor(angles + 2 * math.pi * turns))
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)
    # the period is [-pi, pi): pi is the angle -pi, the start
    ends = op.pit(VonMises(torch.tensor(0.3), torch.tensor(2.0)), torch.tensor([-math.pi, math.pi]))
    assert ends.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_pit_of_a_von_mises_pool_matches_quadrature_of_the_pooled_density(alpha):
    loc, kappa = [0.3, 2.9, -2.0], [2.0, 6.0, 1.0]
    experts = VonMises(torch.tensor(loc), torch.tensor(kappa))
    forecast = op.holder(experts, alpha, WEIGHTS)
    density = _holder_density([lambda x, m=m, k=k: _vonmises_pdf(x, m, k) for m, k in zip(loc, kappa)], WEIGHTS, alpha)
    angles = np.array([0.75, -3.0, 3.1, -1.2, 7.0])
    expected = [_circular_pit_by_quad(lambda x: float(density(np.atleast_1d(x))[0]), y, points=loc) for y in angles]
    np.testing.assert_allclose(op.pit(forecast, torch.tensor(angles)).numpy(), expected, rtol=1e-8, atol=1e-10)


def test_coverage_of_a_calibrated_pool_matches_nominal_within_binomial_error():
    """Observations drawn from the alpha = 1/2 pool itself; the table against intervals from scipy's quantiles of
    the same mixture (found with brentq), and every level within 4 binomial standard errors."""
    n = 3000
    loc = torch.stack((torch.zeros(n), torch.full((n,), 2.0)), -1).to(torch.float64)
    scale = torch.tensor([1.0, 0.5], dtype=torch.float64).expand(n, 2)
    pool = op.holder(Normal(loc, scale), 0.5, [0.6, 0.4])
    torch.manual_seed(11)
    y = pool.sample()
    table = op.coverage(pool, y)
    assert table.count == n and table.levels == (0.5, 0.8, 0.9, 0.95)
    for level, empirical, se in table.rows():
        assert se == pytest.approx(math.sqrt(level * (1 - level) / n))
        assert abs(empirical - level) < 4 * se
    # the same table from the central intervals themselves, quantiles by brentq on the mixture cdf by hand
    weights = pool.mixture_weights[0].numpy()
    locs, logvars = pool.component_params[0, :, 0].numpy(), pool.component_params[0, :, 1].numpy()

    def cdf(x):
        return float((weights * scipy.stats.norm.cdf(x, locs, np.exp(0.5 * logvars))).sum())
    for level, empirical, _ in table.rows():
        lo = scipy.optimize.brentq(lambda x, p=(1 - level) / 2: cdf(x) - p, -20, 20, xtol=1e-13)
        hi = scipy.optimize.brentq(lambda x, p=(1 + level) / 2: cdf(x) - p, -20, 20, xtol=1e-13)
        assert empirical == pytest.approx(float(((y >= lo) & (y <= hi)).double().mean()))
    assert "nominal" in str(table)


# -------------------------------------------------------------------------------------------------- disagreement
def test_disagreement_matches_quadrature_of_sqrt_pq():
    result = op.disagreement(_normal_experts(), weights=WEIGHTS)
    assert result.bhattacharyya.shape == (2, 3, 3) and result.pairwise_mass.shape == (2,)
    lam = np.asarray(WEIGHTS)
    for t in range(2):
        dists = [scipy.stats.norm(loc, scale) for loc, scale in zip(LOCS[t], SCALES[t])]
        bc = np.eye(3)
        for i in range(3):
            for j in range(i + 1, 3):
                bc[i, j] = bc[j, i] = scipy.integrate.quad(lambda x, p=dists[i], q=dists[j]: math.sqrt(p.pdf(x) * q.pdf(x)),
                                                           -np.inf, np.inf, epsabs=1e-13)[0]
        np.testing.assert_allclose(result.bhattacharyya[t].numpy(), bc, rtol=1e-9)
        np.testing.assert_allclose(result.hellinger[t].numpy(), np.sqrt(1 - bc), rtol=1e-8)
        cross = sum(2 * lam[i] * lam[j] * bc[i, j] for i in range(3) for j in range(i + 1, 3))
        assert float(result.pairwise_mass[t]) == pytest.approx(cross / (cross + (lam ** 2).sum()), rel=1e-10)


def test_disagreement_of_gamma_experts_matches_quadrature():
    shapes, rates = [2.0, 5.0], [1.0, 0.5]
    result = op.disagreement(Gamma(torch.tensor(shapes, dtype=torch.float64), torch.tensor(rates, dtype=torch.float64)))
    p, q = (scipy.stats.gamma(a, scale=1 / b) for a, b in zip(shapes, rates))
    bc = scipy.integrate.quad(lambda x: math.sqrt(p.pdf(x) * q.pdf(x)), 0, np.inf, epsabs=1e-13)[0]
    assert float(result.bhattacharyya[0, 1]) == pytest.approx(bc, rel=1e-9)
    assert float(result.pairwise_mass) == pytest.approx(2 * 0.25 * bc / (0.5 + 2 * 0.25 * bc), rel=1e-10)


def test_disagreement_of_more_experts_than_the_pools_component_limit():
    """100 Normal experts (unequal scales, asymmetric weights): their alpha = 1/2 pool has 5050 components, more
    than ``DEFAULT_MAX_COMPONENTS``, which ``disagreement`` does not take and never builds (from 91 experts on it
    raised about that limit). Against the closed form BC = sqrt(2 s_i s_j / (s_i^2 + s_j^2))
    exp(-(m_i - m_j)^2 / (4 (s_i^2 + s_j^2))) and the pairs' share of the mass in NumPy."""
    m = 100
    assert m * (m + 1) // 2 > op.DEFAULT_MAX_COMPONENTS
    rng = np.random.default_rng(5)
    loc, scale, lam = rng.uniform(0, 8, m), rng.uniform(0.5, 2, m), rng.uniform(0.1, 1, m)
    lam = lam / lam.sum()
    result = op.disagreement(Normal(torch.tensor(loc), torch.tensor(scale)), weights=torch.tensor(lam))
    var = scale[:, None] ** 2 + scale[None, :] ** 2
    bc = np.sqrt(2 * scale[:, None] * scale[None, :] / var) * np.exp(-((loc[:, None] - loc[None, :]) ** 2) / (4 * var))
    np.testing.assert_allclose(result.bhattacharyya.numpy(), bc, rtol=1e-12)
    weighted = lam[:, None] * lam[None, :] * bc
    cross = weighted.sum() - np.trace(weighted)
    assert float(result.pairwise_mass) == pytest.approx(cross / weighted.sum(), rel=1e-12)


def test_disagreement_of_one_expert_has_no_pairwise_mass():
    """One expert has no pairs: 1 - sum lambda^2 = 0, with or without batch axes."""
    for loc, scale in (([0.3], [1.2]), ([[0.3], [-1.0]], [[1.2], [0.5]])):
        result = op.disagreement(Normal(torch.tensor(loc), torch.tensor(scale)))
        assert torch.equal(result.pairwise_mass, torch.zeros(result.pairwise_mass.shape, dtype=torch.float64))
        assert result.pairwise_mass.shape == torch.tensor(loc).shape[:-1]
        assert torch.allclose(result.bhattacharyya, torch.ones(1, 1, dtype=torch.float64))


def test_hellinger_gradients_are_finite_off_and_on_the_diagonal():
    """sqrt(1 - BC) has an infinite slope where BC = 1 (the diagonal, identical experts): its NaN used to reach every
    input. Off the diagonal the gradient is the finite difference of the closed form
    BC = sqrt(2 s1 s2 / (s1^2 + s2^2)) exp(-(m1 - m2)^2 / (4 (s1^2 + s2^2)))."""
    loc = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([1.0, 2.0], dtype=torch.float64)
    (gradient,) = torch.autograd.grad(op.disagreement(Normal(loc, scale)).hellinger[0, 1], loc)

    def closed_form(m1, m2, s1=1.0, s2=2.0):
        bc = math.sqrt(2 * s1 * s2 / (s1**2 + s2**2)) * math.exp(-((m1 - m2) ** 2) / (4 * (s1**2 + s2**2)))
        return math.sqrt(1 - bc)

    h = 1e-6
    expected = [(closed_form(h, 1.0) - closed_form(-h, 1.0)) / (2 * h),
                (closed_form(0.0, 1 + h) - closed_form(0.0, 1 - h)) / (2 * h)]
    assert gradient.tolist() == pytest.approx(expected, rel=1e-6)
    same = Normal(loc[0], scale[0])
    (zero,) = torch.autograd.grad(op.hellinger_distance(same, Normal(loc[0] * 1, scale[0])), loc)
    assert torch.equal(zero, torch.zeros(2, dtype=torch.float64))


def test_crps_of_skewed_and_heavy_tailed_forecasts_with_an_icdf():
    """Forecasts with an icdf get panels at their quantiles: LogNormal against the closed form of Baran and Lerch
    (2015), Cauchy (no mean, finite CRPS) against scipy. Equal panels over mean +- 12 sd missed a LogNormal(0, 2.5)
    by 9 %."""
    from torch.distributions import Cauchy, LogNormal

    def lognormal_crps(sigma, y):
        z = math.log(y) / sigma
        phi = scipy.stats.norm.cdf
        return y * (2 * phi(z) - 1) - 2 * math.exp(sigma**2 / 2) * (phi(z - sigma) + phi(sigma / math.sqrt(2)) - 1)

    for sigma, y in ((1.0, 1.0), (2.5, 5.0), (3.0, 0.1)):
        forecast = LogNormal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64))
        assert float(op.crps(forecast, torch.tensor(y, dtype=torch.float64))) == pytest.approx(lognormal_crps(sigma, y),
                                                                                            rel=1e-10)
    cauchy = Cauchy(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    expected = (scipy.integrate.quad(lambda x: scipy.stats.cauchy.cdf(x) ** 2, -np.inf, 0.5, limit=500)[0]
                + scipy.integrate.quad(lambda x: scipy.stats.cauchy.sf(x) ** 2, 0.5, np.inf, limit=500)[0])
    assert float(op.crps(cauchy, torch.tensor(0.5, dtype=torch.float64))) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("shape, y", [(0.05, 1e-8), (0.05, 0.5), (0.3, 2.0), (50.0, 45.0)])
def test_crps_of_gamma_forecasts_singular_at_zero_and_skewed(shape, y):
    """torch's Gamma has no icdf: the panels over mean +- 12 sd start at 0, where a shape below one is singular
    (log-distance panels there), and a thousandth of a Gamma(0.05)'s mass lies beyond 12 sd (panels of doubling
    width). Reference: scipy's gamma cdf, integrated in log z below 1. The CRPS of Gamma(0.05) at 0.5 was off by
    0.51 (with 0.6 of the mass missed)."""
    reference = scipy.stats.gamma(shape)

    def quad(f, a, b):
        return scipy.integrate.quad(f, a, b, limit=1000, epsabs=1e-15)[0]

    below = quad(lambda s: reference.cdf(math.exp(s)) ** 2 * math.exp(s), -745, math.log(y))
    above = quad(lambda s: reference.sf(math.exp(s)) ** 2 * math.exp(s), math.log(y), 0) if y < 1 else 0.0
    expected = below + above + quad(lambda x: reference.sf(x) ** 2, max(1.0, y), np.inf)
    forecast = Gamma(torch.tensor(shape, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    assert float(op.crps(forecast, torch.tensor(y, dtype=torch.float64))) == pytest.approx(expected, rel=1e-10)
    # the PIT is torch's own Gamma cdf (igamma), good to about 1e-9
    assert float(op.pit(forecast, torch.tensor(y, dtype=torch.float64))) == pytest.approx(reference.cdf(y), rel=1e-8)


def test_forecasts_the_quadrature_cannot_place_fail_or_warn_clearly():
    """A Student t of 1.5 degrees of freedom has no standard deviation and torch gives it no icdf: a clear error
    (it was a NaN CRPS, and a PIT of 0). Narrow modes far apart in a mixture of more components than get panels of
    their own: a warning that the panels missed the mass."""
    from torch.distributions import StudentT

    with pytest.raises(ValueError, match=r"StudentT\) has no finite mean and standard deviation .*inf"):
        op.crps(StudentT(torch.tensor(1.5, dtype=torch.float64)), torch.tensor(0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="no finite mean and standard deviation"):
        op.pit(StudentT(torch.tensor(1.5, dtype=torch.float64), validate_args=False),
               torch.tensor(0.5, dtype=torch.float64))
    # Gammas have no icdf, and 65 components are more than get panels each: equal panels about 4.7e3 / 128 wide
    concentration = torch.cat((torch.full((64,), 4.0), torch.tensor([1e10]))).double()
    rate = torch.cat((torch.full((64,), 4e-3), torch.tensor([1e7]))).double()
    narrow = MixtureSameFamily(Categorical(probs=torch.full((65,), 1 / 65, dtype=torch.float64)),
                               Gamma(concentration, rate))
    with pytest.warns(UserWarning, match="MixtureSameFamily forecast found a total mass off 1"):
        op.crps(narrow, torch.tensor(3.0, dtype=torch.float64))


def test_a_narrow_component_of_a_mixture_without_an_icdf_keeps_its_mass():
    """A mixture of Gammas (torch gives them no icdf, so no quantile panels) with a component of sd 0.1 beside one of
    sd 71: the equal panels over the mixture's mean +- 12 sd, 5 wide, missed the narrow one. Against scipy's Gamma
    cdfs, the CRPS by scipy quadrature of (F - 1{x >= y})^2."""
    shapes, rates, weights = np.array([1e6, 2.0]), np.array([1e4, 0.02]), np.array([0.4, 0.6])
    forecast = MixtureSameFamily(Categorical(probs=torch.tensor(weights)), Gamma(torch.tensor(shapes),
                                                                                  torch.tensor(rates)))

    def cdf(x):
        return float(np.dot(weights, scipy.stats.gamma.cdf(x, shapes, scale=1 / rates)))

    for y in (99.95, 100.2, 300.0):
        points = sorted({99.0, 99.5, 100.0, 100.5, 101.0, y})
        lower = [0.0] + [x for x in points if x <= y]
        upper = [x for x in points if x >= y] + [np.inf]
        expected = (sum(scipy.integrate.quad(lambda x: cdf(x) ** 2, a, b, epsabs=0, epsrel=1e-12, limit=400)[0]
                        for a, b in zip(lower[:-1], lower[1:]))
                    + sum(scipy.integrate.quad(lambda x: (1 - cdf(x)) ** 2, a, b, epsabs=0, epsrel=1e-12, limit=400)[0]
                          for a, b in zip(upper[:-1], upper[1:])))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = float(op.crps(forecast, torch.tensor(y, dtype=torch.float64)))
        assert got == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("alpha", [0.3, 0.7, 2.0, -1.0])
def test_a_narrow_expert_beside_a_broad_one_keeps_its_mass(alpha):
    """Every expert gets equal panels of its own: a pool of N(0, 0.01) and N(50, 5) at alpha = 0.3 took equal panels
    about 5 wide over its own mean +- 12 sd, which missed the narrow expert between their nodes (CRPS 0.29 for 13.9,
    PIT 0.26 for 0.76, with a warning). Against scipy quadrature of the Hölder formula: the PIT directly, the CRPS
    as the integral of (F - 1{x >= y})^2 with F from a cumulative Simpson rule on a grid refined at the narrow
    expert."""
    locs, scales, weights = np.array([0.0, 50.0]), np.array([0.01, 5.0]), np.array([0.35, 0.65])

    def unnormalised(z):
        z = np.asarray(z, dtype=np.float64)[..., None]
        log_q = -0.5 * ((z - locs) / scales) ** 2 - np.log(scales * math.sqrt(2 * math.pi))
        return np.exp(scipy.special.logsumexp(alpha * log_q, b=weights, axis=-1) / alpha)

    pool = op.holder(Normal(torch.tensor(locs), torch.tensor(scales)), alpha, torch.tensor(weights))
    assert isinstance(pool, op.NumericalHolderPool)
    for y in (0.005, 50.3, 80.0):
        # the observation a grid point, where the integrand jumps
        grid = np.unique(np.concatenate((np.linspace(-0.2, 0.2, 40001), np.linspace(-60.0, 110.0, 170001), [y])))
        cumulative = scipy.integrate.cumulative_simpson(unnormalised(grid), x=grid, initial=0.0)
        cdf = cumulative / cumulative[-1]
        below, above = grid <= y, grid >= y
        expected_crps = (scipy.integrate.simpson(cdf[below] ** 2, x=grid[below])
                         + scipy.integrate.simpson((1 - cdf[above]) ** 2, x=grid[above]))
        expected_pit = cdf[grid == y][0]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no mass missed
            got_crps = float(op.crps(pool, torch.tensor(y, dtype=torch.float64)))
            got_pit = float(op.pit(pool, torch.tensor(y, dtype=torch.float64)))
        assert got_pit == pytest.approx(expected_pit, abs=1e-7)
        assert got_crps == pytest.approx(expected_crps, rel=1e-5)


def test_pit_of_plain_torch_forecasts_outside_their_support_and_without_a_mean():
    """F is 0 below the support and 1 above it (torch's cdf rejected such observations, while crps took them), and a
    TransformedDistribution, which has no mean, uses its cdf (it raised an empty NotImplementedError)."""
    from torch.distributions import Exponential, ExpTransform, TransformedDistribution

    uniform = Uniform(torch.tensor(0.0, dtype=torch.float32), torch.tensor(1.0, dtype=torch.float32))
    assert op.pit(uniform, torch.tensor([1.5, -0.5, 0.25], dtype=torch.float32)).tolist() == [1.0, 0.0, 0.25]
    y = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    assert op.pit(Exponential(torch.tensor(1.0, dtype=torch.float64)), y).tolist() == pytest.approx(
        [0.0, 0.0, 1 - math.exp(-1)], rel=1e-12)
    standard = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    lognormal = TransformedDistribution(standard, [ExpTransform()])
    expected = scipy.stats.lognorm(1.0).cdf(2.0)
    assert float(op.pit(lognormal, torch.tensor(2.0, dtype=torch.float64))) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("concentration", [50.0, 1e3, 5e3, 1e4, 1e5, 1e6])
def test_pit_of_a_concentrated_float32_von_mises(concentration):
    """torch's float32 circular variance rounds to 0 from a concentration of about 5e3 (the panels had no width and
    the PIT was NaN), and its float32 log density loses the concentration times float32's rounding (the PIT at the
    mean of a concentration 1e6 was 0.57; at 50 the total mass was off 1 by 2e-6, which warned): a float32 von Mises
    is integrated in float64. Reference: scipy quadrature of the density at the float32 angle."""
    loc, y = torch.tensor(-1.0, dtype=torch.float32), torch.tensor([-0.99, -1.0, 1.0], dtype=torch.float32)
    forecast = VonMises(loc, torch.tensor(concentration, dtype=torch.float32))
    expected = [_circular_pit_by_quad(lambda x: _vonmises_pdf(x, -1.0, concentration), angle, points=[-1.0])
                for angle in y.double().tolist()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = op.pit(forecast, y)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-6, atol=1e-7)


def test_pit_of_a_circular_mixture_keeps_a_far_or_diffuse_component():
    """The panels covered the mean +- 12 sd of the mixture or pool, which holds one von Mises's mass but not that of a
    small component at the far side of the circle (1 % at pi: PIT 0 or 1 for 0.0042 and 0.9958) or of a diffuse one
    beside a concentrated one (0.0135 for 0.0170). The whole period is integrated where the window misses mass."""
    weights = torch.tensor([0.99, 0.01], dtype=torch.float64)
    components = VonMises(torch.tensor([0.0, math.pi], dtype=torch.float64), torch.tensor([100.0, 100.0],
                                                                                             dtype=torch.float64))
    angles = np.array([-3.0, -1.0, 2.0, 3.0])
    density = lambda x: 0.99 * _vonmises_pdf(x, 0.0, 100.0) + 0.01 * _vonmises_pdf(x, math.pi, 100.0)  # noqa: E731
    expected = [_circular_pit_by_quad(density, y, points=[0.0]) for y in angles]
    for forecast in (op.holder(components, 1.0, weights), MixtureSameFamily(Categorical(weights), components)):
        np.testing.assert_allclose(op.pit(forecast, torch.tensor(angles)).numpy(), expected, rtol=1e-8, atol=1e-12)
    weights = torch.tensor([0.05, 0.95], dtype=torch.float64)
    diffuse = MixtureSameFamily(Categorical(weights), VonMises(torch.zeros(2, dtype=torch.float64),
                                                               torch.tensor([0.01, 1000.0], dtype=torch.float64)))
    density = lambda x: 0.05 * _vonmises_pdf(x, 0.0, 0.01) + 0.95 * _vonmises_pdf(x, 0.0, 1000.0)  # noqa: E731
    expected = [_circular_pit_by_quad(density, y, points=[0.0]) for y in angles]
    # (torch's von Mises normaliser, good to about 1e-7, weighs the two components slightly differently)
    np.testing.assert_allclose(op.pit(diffuse, torch.tensor(angles)).numpy(), expected, rtol=1e-6, atol=1e-12)


def test_circular_pit_far_in_the_tails_is_exactly_zero_or_one():
    """The cumulative mass was clamped to 1 before it was divided by the total (torch's von Mises integrates to
    1 + 3e-7 at concentration 50): F(3) came out 1 - 3e-7 for 1 - 1e-40."""
    forecast = VonMises(torch.tensor(0.0, dtype=torch.float64), torch.tensor(50.0, dtype=torch.float64))
    got = op.pit(forecast, torch.tensor([3.0, -3.0], dtype=torch.float64))
    assert 1 - got[0].item() <= 1e-15 and got[1].item() <= 1e-15


# --------------------------------------------------------------------------------------------------- fit_weights
def _misspecified_panel(n, seed):
    generator = torch.Generator().manual_seed(seed)
    loc = torch.randn(n, generator=generator, dtype=torch.float64)
    y = loc + torch.randn(n, generator=generator, dtype=torch.float64)
    locs = torch.stack((loc, loc + 2.0, loc - 1.5), -1)
    scales = torch.tensor([1.0, 1.0, 3.0], dtype=torch.float64).expand(n, 3)
    return locs, scales, y


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_fit_weights_finds_the_data_generating_expert(alpha):
    locs, scales, y = _misspecified_panel(400, 5)
    result = op.fit_weights(Normal(locs, scales), y, alpha=alpha)
    assert float(result.weights[0]) > 0.9 and float(result.weights.sum()) == pytest.approx(1.0)
    single = scipy.stats.norm.logpdf(y.numpy()[:, None], locs.numpy(), scales.numpy()).mean(0)
    assert result.log_score >= single.max() - 1e-6
    if alpha == 1.0:  # the linear pool's log score by hand from the fitted weights, and its standard error
        scores = scipy.special.logsumexp(scipy.stats.norm.logpdf(y.numpy()[:, None], locs.numpy(), scales.numpy()),
                                         b=result.weights.numpy(), axis=-1)
        assert result.log_score == pytest.approx(scores.mean(), rel=1e-10)
        assert result.standard_error == pytest.approx(scores.std(ddof=1) / math.sqrt(len(scores)), rel=1e-8)


def test_fit_weights_prefers_the_mixture_when_the_truth_is_one():
    """Data from a 50/50 mixture of two experts: the linear pool's weights are near (1/2, 1/2), and the pool scores
    above each single expert by more than its standard error."""
    generator = torch.Generator().manual_seed(1)
    n = 600
    pick = torch.rand(n, generator=generator) < 0.5
    y = torch.where(pick, -2.0, 2.0).to(torch.float64) + 0.5 * torch.randn(n, generator=generator, dtype=torch.float64)
    experts = Normal(torch.tensor([-2.0, 2.0], dtype=torch.float64).expand(n, 2),
                     torch.tensor([0.5, 0.5], dtype=torch.float64).expand(n, 2))
    result = op.fit_weights(experts, y, alpha=1.0)
    assert abs(float(result.weights[0]) - 0.5) < 4 * 0.5 / math.sqrt(n)
    single = scipy.stats.norm.logpdf(y.numpy()[:, None], [-2.0, 2.0], 0.5).mean(0)
    assert result.log_score > single.max() + result.standard_error


def test_fit_weights_is_never_worse_than_the_best_single_expert():
    """alpha = -1, experts far apart relative to their scales, the data from the third: the log score is not concave
    in the weights there, and L-BFGS from equal weights ended at the first expert (mean log score -3330); the fit must
    score at least as well as every expert alone (scipy's log densities), here by choosing the third."""
    generator = torch.Generator().manual_seed(3)
    locs = torch.tensor([0.774, -3.245, 2.428], dtype=torch.float64)
    scales = torch.tensor([0.0202, 0.0475, 0.062], dtype=torch.float64)
    y = 2.428 + 0.02 * torch.randn(34, generator=generator, dtype=torch.float64)
    result = op.fit_weights(Normal(locs, scales), y, alpha=-1.0)
    single = scipy.stats.norm.logpdf(y.numpy()[:, None], locs.numpy(), scales.numpy()).mean(0)
    assert result.log_score >= single.max() - 1e-9
    assert float(result.weights[2]) > 0.99


def test_fit_weights_survives_line_search_steps_past_float64():
    """alpha = -2: the best weights put 5e-47 on an expert (at alpha < 0 a tiny weight still lowers the pool where
    that expert is small), and L-BFGS's curvature there sent a trial step to NaN logits, which raised a numpy error
    from inside the quadrature. Such a step now counts as infinitely bad and the fit keeps the best point it
    evaluated. Reference: the mean log score at the fitted weights from scipy's normal log densities, the pooled
    density's normaliser by scipy's quad, and every expert alone."""
    y = torch.tensor([0.1423, 2.223, 1e-300, 0.3387, 1e-300, 3.192, 9.653, 1e-300, 1e-300, 1e-300, 1e-300, 10.15,
                      1e-300, 0.2836, 6.484, 8.165, 5.726, 0.1878, 1e-300, 1e-300, 0.888, 4.421, 0.9674, 0.6013, 15.35,
                      2.611, 0.2023, 0.5449, 2.0, 1e-300], dtype=torch.float64)
    locs, scales = np.array([0.8019, 0.9023, 0.0769]), np.array([7.9398, 0.5903, 1.4532])
    experts = Normal(torch.tensor(locs, dtype=torch.float64), torch.tensor(scales, dtype=torch.float64))
    # the score rises as a weight falls to 0 without reaching its limit there: no maximum, and the fit says so
    with pytest.warns(RuntimeWarning, match="gradient of the mean log score is not finite at the result"):
        result = op.fit_weights(experts, y, alpha=-2.0)
    assert not result.converged
    log_w = np.log(result.weights.numpy())

    def log_u(z):  # (sum_j w_j q_j^-2)^(-1/2) in log space
        return -0.5 * scipy.special.logsumexp(log_w - 2 * scipy.stats.norm.logpdf(np.asarray(z)[..., None], locs, scales),
                                              axis=-1)

    log_z = math.log(scipy.integrate.quad(lambda z: math.exp(log_u(z)), -np.inf, np.inf, limit=500,
                                          epsabs=0, epsrel=1e-12)[0])
    assert result.log_score == pytest.approx(float(np.mean(log_u(y.numpy()))) - log_z, rel=1e-9)
    single = scipy.stats.norm.logpdf(y.numpy()[:, None], locs, scales).mean(0)
    assert result.log_score >= single.max()


def test_fit_weights_reaches_an_optimum_next_to_a_vertex():
    """alpha = 0, Normal experts: the pool is the Normal of precision sum_j w_j / s_j^2 and mean
    sum_j w_j m_j / s_j^2 over it, so scipy's SLSQP on the simplex finds the best weights of that closed form
    independently. The optimum lies next to a vertex (a weight of 9e-4): L-BFGS on the logits from equal weights stopped
    at the vertex itself, 2.6e-5 below it."""
    generator = torch.Generator().manual_seed(3)
    locs = torch.tensor([-0.0258, -0.0792, -0.0002, -0.1477], dtype=torch.float64)
    scales = torch.tensor([0.0106, 2.2007, 0.0142, 0.0130], dtype=torch.float64)
    y = -0.0258 + 0.012 * torch.randn(45, generator=generator, dtype=torch.float64)
    m, s, obs = locs.numpy(), scales.numpy(), y.numpy()

    def minus_score(w):
        precision = (w / s**2).sum()
        return -scipy.stats.norm.logpdf(obs, (w * m / s**2).sum() / precision, precision**-0.5).mean()

    best = scipy.optimize.minimize(minus_score, np.full(4, 0.25), method="SLSQP", bounds=[(0, 1)] * 4,
                                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
                                   options={"ftol": 1e-14, "maxiter": 500})
    result = op.fit_weights(Normal(locs, scales), y, alpha=0.0)
    assert result.log_score >= -best.fun - 1e-8


def test_fit_weights_learns_alpha_within_its_bounds_and_improves_the_score():
    locs, scales, y = _misspecified_panel(30, 2)
    start = op.holder(Normal(locs, scales), 0.5).log_prob(y).mean()
    result = op.fit_weights(Normal(locs, scales), y, alpha=0.5, learn_alpha=True, alpha_bounds=(-2.0, 3.0), max_iter=3)
    assert -2.0 < result.alpha < 3.0 and isinstance(result.pool, op.NumericalHolderPool)
    assert result.log_score > float(start)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_fit_weights_says_when_max_iter_stopped_it_short(alpha):
    """A search cut short by max_iter returned its weights as any other, unreported. Judged by the gradient of the
    score at the result (at a vertex, the slope of moving weight off it), not by the optimizer's stop."""
    locs, scales, y = _misspecified_panel(400, 5)
    with pytest.warns(RuntimeWarning, match=r"gradient of the mean log score at the result is .*, above sqrt\(tol\) = "
                                            r"3.16e-05, after max_iter=1 iterations"):
        short = op.fit_weights(Normal(locs, scales), y, alpha=alpha, max_iter=1)
    assert not short.converged
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        full = op.fit_weights(Normal(locs, scales), y, alpha=alpha)
    assert full.converged and full.log_score > short.log_score


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_input_errors_name_the_argument_and_value():
    experts = _normal_experts()
    pool = op.holder(experts, 0.5)
    with pytest.raises(TypeError, match="forecast must be a torch.distributions.Distribution.*list"):
        op.crps([1.0], torch.zeros(2))
    with pytest.raises(ValueError, match=r"observations must be finite, got \[nan\]"):
        op.crps(pool, torch.tensor([0.0, math.nan]))
    with pytest.raises(ValueError, match=r"observations of shape \(3,\) do not broadcast.*\(2,\)"):
        op.pit(pool, torch.zeros(3))
    with pytest.raises(TypeError, match="observations must be a tensor of real numbers, got str"):
        op.pit(pool, "1.0")
    with pytest.raises(ValueError, match="forecast must be a continuous distribution.*Poisson"):
        op.crps(Poisson(torch.tensor([1.0])), torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"levels must be probabilities in \(0, 1\), got 1.5"):
        op.coverage(pool, torch.zeros(2), levels=(0.5, 1.5))
    with pytest.raises(ValueError, match=r"alpha must lie inside alpha_bounds=\(-1.0, 1.0\).*alpha=2.0"):
        op.fit_weights(experts, torch.zeros(2), alpha=2.0, learn_alpha=True, alpha_bounds=(-1.0, 1.0))
    with pytest.raises(ValueError, match=r"alpha_bounds must be two finite numbers.*\(1.0, 0.0\)"):
        op.fit_weights(experts, torch.zeros(2), alpha_bounds=(1.0, 0.0))
    with pytest.raises(ValueError, match="max_iter must be a positive integer, got 0"):
        op.fit_weights(experts, torch.zeros(2), max_iter=0)
    for tol in (0.0, math.inf, math.nan):  # inf stopped the optimiser at once, returning the starting weights
        with pytest.raises(ValueError, match=f"tol must be a positive finite number, got {tol}"):
            op.fit_weights(experts, torch.zeros(2), tol=tol)
    with pytest.raises(ValueError, match="alpha must be a real number"):
        op.fit_weights(experts, torch.zeros(2), alpha=math.nan)
    with pytest.raises(ValueError, match="alpha must be finite to fit weights.*alpha=inf"):
        op.fit_weights(experts, torch.zeros(2), alpha=math.inf)
    # a column of observations against a row of occasions scored every observation under every pool, silently
    with pytest.raises(ValueError, match=r"observations of shape \(2, 1\) must hold one observation per occasion.*\(2,\)"):
        op.fit_weights(experts, torch.zeros(2, 1, dtype=torch.float64))


def test_pit_of_a_float64_beta_reaches_one_at_its_upper_end():
    """torch's Beta has no cdf and keeps its parameters inside a Dirichlet: its dtype was read as the default
    float32, so nodes within 6e-8 of 1 rounded to 1 and the PIT at 1 was 0.9607. The 0.3% of its mass within
    2^-44 of 1, where the log-distance panels stop, comes from their power law (it was missed, with a warning):
    the PIT at 1 - 2^-50 lies in it. Reference: scipy's beta survival function."""
    forecast = Beta(torch.tensor(3.0, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64))
    y = torch.tensor([1.0, 0.5, 1 - 1e-9, 1 - 2.0**-50], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = op.pit(forecast, y)
        score = op.crps(forecast, y[1:3])
    assert got.dtype == torch.float64
    survival = scipy.stats.beta(3.0, 0.2).sf(y.numpy())
    assert (1 - got).tolist() == pytest.approx(survival.tolist(), rel=1e-8, abs=0)
    # CRPS: int_0^y F^2 + int_y^1 (1 - F)^2, above 1/2 in log(1 - x), where F is smooth
    reference = scipy.stats.beta(3.0, 0.2)

    def quad(f, a, b):
        return scipy.integrate.quad(f, a, b, limit=1000, epsabs=1e-15, epsrel=1e-12)[0]

    for obs, value in zip(y[1:3].tolist(), score.tolist()):
        below = (quad(lambda x: reference.cdf(x) ** 2, 0, 0.5)
                 + quad(lambda s: reference.cdf(1 - math.exp(s)) ** 2 * math.exp(s), math.log1p(-obs), math.log(0.5)))
        above = quad(lambda s: reference.sf(1 - math.exp(s)) ** 2 * math.exp(s), -745, math.log1p(-obs))
        assert value == pytest.approx(below + above, rel=1e-9)


def test_float32_crps_next_to_an_end_other_than_zero():
    """Float32 panels next to 1 stop at 2^-15 from it, where a Beta(3, 0.2) has 16% of its mass: its CRPS
    integrand there (5.9e-7) comes from the power law of the stretch (without it the CRPS was 1.2e-5 off at 0.9 and
    1e-3 at 1 - 1e-5). A float32 pool (two equal experts: that Beta) is integrated in float32; a float32
    torch Beta as its float64 copy. Reference: the Beta CRPS's closed form (Taillardat et al. 2016) at the float32
    values."""
    experts = Beta(torch.tensor([3.0, 3.0], dtype=torch.float32), torch.tensor([0.2, 0.2], dtype=torch.float32))
    forecasts = [op.NumericalHolderPool(experts, 1.0, [0.4, 0.6]),
                 Beta(torch.tensor(3.0, dtype=torch.float32), torch.tensor(0.2, dtype=torch.float32))]
    y = torch.tensor([0.9, 1 - 1e-5], dtype=torch.float32)  # (the library tests' default dtype is float64)
    a, b, x = 3.0, 0.2, y.double().numpy()
    expected = x * (2 * scipy.special.betainc(a, b, x) - 1) + a / (a + b) * (
        1 - 2 * scipy.special.betainc(a + 1, b, x)
        - 2 * np.exp(scipy.special.betaln(2 * a, 2 * b) - np.log(a) - 2 * scipy.special.betaln(a, b)))
    for forecast in forecasts:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = op.crps(forecast, y)
        assert got.dtype == torch.float32
        assert got.double().tolist() == pytest.approx(expected.tolist(), rel=2e-6, abs=0)  # a few float32 ulps


def test_crps_of_a_density_singular_at_zero_with_a_heavy_tail_and_of_its_mirror_image():
    """A Weibull of shape 0.1 (density ~ x^-0.9 at 0, a stretched-exponential tail): its quantile panels span a
    decade or more each, where 16 nodes equal in x met a density falling by 10^9 across a panel (1.8e-4 of the mass
    lost, with a warning, and the CRPS at 50 3.7e-6 off); nodes in log |x| make it smooth. The mirror image (the
    Weibull of -X: panels below 0) gives the same scores at -y. Reference: scipy's cdf integrated in log x."""
    forecast = Weibull(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64))
    mirror = TransformedDistribution(forecast, [AffineTransform(torch.tensor(0.0, dtype=torch.float64),
                                                                torch.tensor(-1.0, dtype=torch.float64))])
    y = torch.tensor([1e-3, 1.0, 50.0], dtype=torch.float64)
    reference = scipy.stats.weibull_min(0.1)

    def quad(f, a, b):
        return scipy.integrate.quad(f, a, b, limit=2000, epsabs=1e-16, epsrel=1e-13)[0]

    expected = [quad(lambda s: reference.cdf(math.exp(s)) ** 2 * math.exp(s), -745, math.log(obs))
                + quad(lambda s: reference.sf(math.exp(s)) ** 2 * math.exp(s), math.log(obs), 700) for obs in y.tolist()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, mirrored = op.crps(forecast, y), op.crps(mirror, -y)
        mirrored_pit = op.pit(mirror, -y)
    assert got.tolist() == pytest.approx(expected, rel=1e-10, abs=0)
    assert mirrored.tolist() == pytest.approx(expected, rel=1e-10, abs=0)
    assert (1 - mirrored_pit).tolist() == pytest.approx(reference.cdf(y.numpy()).tolist(), rel=1e-10, abs=0)


def test_a_density_smooth_at_zero_keeps_its_nodes_in_x_on_a_panel_from_next_to_zero():
    """A panel from a point next to 0 (an observation at 1e-40, or a quantile edge at a location of 1e-40) spans
    dozens of decades, but a density smooth at 0 is flat there: 16 nodes equal in log |x| put 15 of them in the
    stretch next to 0 that holds no mass (a StudentT(3)'s CRPS at 1e-40 was 1.2e-4 off with a warning, a Laplace's
    with its location at 1e-40 4.3e-4, at 1e-100 1.3e-2). References: a Laplace's closed form
    |y - m| + b exp(-|y - m| / b) - 3 b / 4, and scipy's Student t cdf integrated in log |x|."""
    for location in (0.0, 1e-40, 1e-100):
        forecast = Laplace(*_f64(location, 1.0))
        y = torch.tensor([0.0, 1e-30, 1e-40, 0.3], dtype=torch.float64)
        expected = ((y - location).abs() + torch.exp(-(y - location).abs()) - 0.75).tolist()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert op.crps(forecast, y).tolist() == pytest.approx(expected, rel=1e-12, abs=0)
    reference = scipy.stats.t(3)

    def quad(f, a, b):
        return scipy.integrate.quad(f, a, b, limit=2000, epsabs=0, epsrel=1e-13)[0]

    def in_log(f, a, b):  # int_a^b f over 0 < a < b, in log x
        return quad(lambda s: f(math.exp(s)) * math.exp(s), math.log(a), math.log(b))

    y = torch.tensor([1e-40, 1e-10], dtype=torch.float64)
    expected = [quad(lambda x: reference.cdf(x) ** 2, -np.inf, 0.0) + in_log(lambda x: reference.cdf(x) ** 2, 1e-300, obs)
                + in_log(lambda x: reference.sf(x) ** 2, obs, 1e300) for obs in y.tolist()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, pits = op.crps(StudentT(*_f64(3.0)), y), op.pit(StudentT(*_f64(3.0)), y)
    assert got.tolist() == pytest.approx(expected, rel=1e-10, abs=0)
    assert pits.tolist() == pytest.approx(reference.cdf(y.numpy()).tolist(), rel=1e-11, abs=0)


def test_crps_of_a_mixture_on_a_positive_support():
    """A MixtureSameFamily's support wraps its components' (``MixtureSameFamilyConstraint``), whose bounds the
    quadrature did not see: a mixture of LogNormals was integrated over the whole line and its density's
    validation raised below 0. Reference: scipy's mixture cdf integrated in log x."""
    weights, locs, scales = [0.3, 0.7], [0.0, 1.0], [0.5, 1.0]
    components = LogNormal(torch.tensor(locs, dtype=torch.float64), torch.tensor(scales, dtype=torch.float64))
    forecast = MixtureSameFamily(Categorical(torch.tensor(weights, dtype=torch.float64)), components)
    parts = [scipy.stats.lognorm(s, scale=math.exp(m)) for m, s in zip(locs, scales)]

    def cdf(x):
        return sum(w * part.cdf(x) for w, part in zip(weights, parts))

    def quad(f, a, b):
        return scipy.integrate.quad(f, a, b, limit=2000, epsabs=1e-16, epsrel=1e-13)[0]

    y = torch.tensor([0.5, 2.0, 10.0], dtype=torch.float64)
    expected = [quad(lambda s: cdf(math.exp(s)) ** 2 * math.exp(s), -745, math.log(obs))
                + quad(lambda s: (1 - cdf(math.exp(s))) ** 2 * math.exp(s), math.log(obs), 700) for obs in y.tolist()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = op.crps(forecast, y)
    assert got.tolist() == pytest.approx(expected, rel=1e-10, abs=0)


def _mixture(weights, components):
    return MixtureSameFamily(Categorical(torch.tensor(weights, dtype=torch.float64)), components,
                             validate_args=components._validate_args)


def _scipy_mixture_crps(weights, parts, y, log_x=False, points=()):
    """int F^2 below y and (1 - F)^2 above, F the scipy components' weighted cdf; in log x for a positive support."""
    def cdf(x):
        return sum(w * part.cdf(x) for w, part in zip(weights, parts))

    def survival(x):
        return sum(w * part.sf(x) for w, part in zip(weights, parts))

    def quad(f, a, b):
        inner = [p for p in points if a < p < b] or None
        return scipy.integrate.quad(f, a, b, points=inner, limit=4000, epsabs=1e-15, epsrel=1e-13)[0]

    if log_x:
        return (quad(lambda s: cdf(math.exp(s)) ** 2 * math.exp(s), -745, math.log(y))
                + quad(lambda s: survival(math.exp(s)) ** 2 * math.exp(s), math.log(y), 700))
    low, high = (-math.inf, math.inf) if not points else (min(points) - 1, max(points) + 1)
    return quad(lambda x: cdf(x) ** 2, min(low, y), y) + quad(lambda x: survival(x) ** 2, y, max(high, y))


@pytest.mark.parametrize("case", ["uniforms-apart", "cauchys", "wide-lognormals", "sixteen-lognormals"])
def test_crps_of_a_mixture_on_its_components_quantile_panels(case):
    """A ``MixtureSameFamily`` whose components have an icdf is integrated on every component's quantile panels:
    on panels over its mean +- 12 standard deviations, two Uniforms apart (their density's jumps inside panels) were
    1e-3 off with a warning, a mixture of Cauchys (no mean) raised, and LogNormals of scales 0.3 and 2.5 were 2.6e-6
    off with a warning. Sixteen components keep every fourth level each. Against scipy's quadrature of the
    components' cdfs, observations inside and outside."""
    weights = [0.3, 0.7]
    if case == "uniforms-apart":  # torch validates a mixture's points against every component's support: off
        components = Uniform(*_f64([0.0, 2.0], [1.0, 3.0]), validate_args=False)
        parts, observations = [scipy.stats.uniform(0, 1), scipy.stats.uniform(2, 1)], [-1.0, 0.5, 1.5, 2.5, 4.0]
        expected = [_scipy_mixture_crps(weights, parts, y, points=(0.0, 1.0, 2.0, 3.0)) for y in observations]
    elif case == "cauchys":
        components = Cauchy(*_f64([-3.0, 2.0], [0.5, 2.0]))
        parts, observations = [scipy.stats.cauchy(-3.0, 0.5), scipy.stats.cauchy(2.0, 2.0)], [-30.0, -3.0, 0.0, 10.0]
        expected = [_scipy_mixture_crps(weights, parts, y) for y in observations]
    else:
        locs, scales = ([0.0, 1.0], [0.3, 2.5]) if case == "wide-lognormals" else \
            (np.linspace(-2, 2, 16).tolist(), np.linspace(0.2, 2.2, 16).tolist())
        weights = weights if case == "wide-lognormals" else (np.arange(1, 17) / 136).tolist()
        components = LogNormal(*_f64(locs, scales))
        parts = [scipy.stats.lognorm(s, scale=math.exp(m)) for m, s in zip(locs, scales)]
        observations = [0.05, 0.5, 2.0, 50.0]
        expected = [_scipy_mixture_crps(weights, parts, y, log_x=True) for y in observations]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = op.crps(_mixture(weights, components), torch.tensor(observations, dtype=torch.float64))
    assert got.tolist() == pytest.approx(expected, rel=1e-12, abs=0)


def test_a_mixture_of_many_components_keeps_the_equal_panels(monkeypatch):
    """Beyond 64 components the merged quantile panels (two ends kept per component, every component evaluated at
    every node) cost as the square of the count: such a mixture is integrated on the equal panels, as accurate for
    light tails (65 LogNormals against scipy), and 64 components still get the quantile panels."""
    import opinionpool.forecast as forecast_module

    calls = []
    merged = forecast_module._component_quantile_edges
    monkeypatch.setattr(forecast_module, "_component_quantile_edges", lambda *a: calls.append(a) or merged(*a))
    for count in (64, 65):
        locs, scales = np.linspace(-0.5, 0.5, count).tolist(), np.linspace(0.2, 0.6, count).tolist()
        weights = (np.arange(1, count + 1) / (count * (count + 1) / 2)).tolist()
        parts = [scipy.stats.lognorm(s, scale=math.exp(m)) for m, s in zip(locs, scales)]
        before = len(calls)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = op.crps(_mixture(weights, LogNormal(*_f64(locs, scales))), torch.tensor(1.5, dtype=torch.float64))
        assert len(calls) - before == (1 if count == 64 else 0)
        assert float(got) == pytest.approx(_scipy_mixture_crps(weights, parts, 1.5, log_x=True), rel=1e-12)


def test_a_mixture_of_many_components_without_a_mean_gets_the_merged_panels():
    """Beyond 64 components equal panels are used where they can be placed; a mixture of 80 Cauchys has no mean to
    place them by (it raised): it is integrated on the merged quantile panels. Against scipy."""
    count = 80
    locs, scales = np.linspace(-4.0, 4.0, count).tolist(), np.linspace(0.1, 2.0, count).tolist()
    weights = (np.arange(1, count + 1) / (count * (count + 1) / 2)).tolist()
    parts = [scipy.stats.cauchy(m, s) for m, s in zip(locs, scales)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = op.crps(_mixture(weights, Cauchy(*_f64(locs, scales))), torch.tensor([-10.0, 0.5], dtype=torch.float64))
    expected = [_scipy_mixture_crps(weights, parts, y) for y in (-10.0, 0.5)]
    assert got.tolist() == pytest.approx(expected, rel=1e-12, abs=0)


def test_crps_of_batched_mixtures_on_their_components_quantile_panels():
    """Two mixtures of Cauchys in one batch, observations broadcast against it, and the float32 mixture (integrated
    as its float64 copy): each occasion's CRPS as the lone mixture's."""
    locs, scales = torch.tensor([[-3.0, 2.0], [0.0, 0.1]]), torch.tensor([[0.5, 2.0], [1.0, 3.0]])
    weights = torch.tensor([[0.25, 0.75], [0.6, 0.4]])
    y = torch.tensor([[-1.0, 4.0], [7.0, 0.0], [0.5, -20.0]])
    for dtype in (torch.float64, torch.float32):
        batched = MixtureSameFamily(Categorical(weights.to(dtype)), Cauchy(locs.to(dtype), scales.to(dtype)))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = op.crps(batched, y.to(dtype))
        assert got.shape == (3, 2) and got.dtype == dtype
        for row in range(3):
            for b in range(2):
                parts = [scipy.stats.cauchy(float(m), float(s)) for m, s in zip(locs[b], scales[b])]
                expected = _scipy_mixture_crps(weights[b].tolist(), parts, float(y[row, b]))
                assert float(got[row, b]) == pytest.approx(expected, rel=1e-12 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("case", ["laplaces-small-weight", "exponentials-small-weight", "cauchys-of-one-scale",
                                  "paretos-alike", "paretos-a-thousandth-apart", "paretos-of-two-scales"])
def test_crps_of_a_mixture_beyond_its_components_quantile_panels(case):
    """Beyond the merged panels each component's tail follows its own power law, from its exact levels at its own
    two outermost edges, and the masses there too. From the mixture's cdf at the two outermost merged edges (which may
    be two components' a float apart, their levels rounded near 1), Laplaces 10 apart with weights 0.999 and 0.001,
    Exponentials of rates 1 and 0.1 with those weights and Cauchys of one scale 10 apart scored inf; two alike
    Paretos of shape 0.6 (the same edge twice) lost the CRPS beyond the panels, 5e-5 of it, and Paretos of scales 1
    and 1.001 1.6e-8 to ``1 - F`` rounded. Paretos of scales 1 and 5 (validation off, as torch's mixture validation
    rejects a point outside any component's support) were 160 times their CRPS: torch's Pareto has a density below
    its scale there, each component's is now 0 outside its support. Against scipy's quadrature."""
    weights, kind = [0.5, 0.5], {}
    if case == "laplaces-small-weight":
        weights, components = [0.999, 0.001], Laplace(*_f64([0.0, 10.0], [1.0, 1.0]))
        parts, observations = [scipy.stats.laplace(0, 1), scipy.stats.laplace(10, 1)], [-3.0, 0.5, 10.0, 50.0]
    elif case == "exponentials-small-weight":
        weights, components, kind = [0.999, 0.001], Exponential(*_f64([1.0, 0.1])), {"log_x": True}
        parts, observations = [scipy.stats.expon(scale=1), scipy.stats.expon(scale=10)], [0.1, 1.0, 50.0, 500.0]
    elif case == "cauchys-of-one-scale":
        components = Cauchy(*_f64([0.0, 10.0], [1.0, 1.0]))
        parts, observations = [scipy.stats.cauchy(0, 1), scipy.stats.cauchy(10, 1)], [-20.0, 0.5, 10.0, 50.0]
    else:
        scales, shapes = {"paretos-alike": ([1.0, 1.0], [0.6, 0.6]),
                          "paretos-a-thousandth-apart": ([1.0, 1.001], [0.6, 0.6]),
                          "paretos-of-two-scales": ([1.0, 5.0], [3.0, 1.5])}[case]
        # breakpoints in log x: at the scales, where the density jumps, and every 5 out to e^700
        breaks = tuple(sorted({math.log(m) for m in scales} | set(range(5, 700, 5))))
        components, kind = Pareto(*_f64(scales, shapes), validate_args=False), {"log_x": True, "points": breaks}
        parts = [scipy.stats.pareto(a, scale=m) for m, a in zip(scales, shapes)]
        observations = [0.5, 1.5, 3.0, 6.0, 100.0]
    expected = [_scipy_mixture_crps(weights, parts, y, **kind) for y in observations]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = op.crps(_mixture(weights, components), torch.tensor(observations, dtype=torch.float64))
    assert got.tolist() == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize("count", [5, 50])
def test_crps_of_a_mixture_of_alike_components(count):
    """Beyond four components each keeps every ``ceil(count / 4)``-th level, staggered across the components, so
    that alike components share all levels between them: with the same levels for all, fifty alike LogNormals were
    integrated on 11 levels' panels, 1.5e-7 off the lone LogNormal's CRPS (twenty Laplaces 0.01 apart, their kinks
    inside panels, 9e-4 off with a warning, fifty inf)."""
    y = torch.tensor([0.05, 1.0, 30.0], dtype=torch.float64)
    lone = LogNormal(*_f64(0.3, 1.2))
    mixture = _mixture([1 / count] * count, LogNormal(*_f64([0.3] * count, [1.2] * count)))
    assert op.crps(mixture, y).tolist() == pytest.approx(op.crps(lone, y).tolist(), rel=1e-12, abs=0)


@pytest.mark.parametrize("base, observations", [
    (Gamma(torch.tensor(2.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)), [0.3, 1.0, 5.0]),
    (Gamma(torch.tensor(0.3, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)), [1e-3, 0.5, 4.0]),
    (Beta(torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)), [0.01, 0.5, 0.99]),
    (StudentT(*(torch.tensor(v, dtype=torch.float64) for v in (3.0, 0.5, 2.0))), [-3.0, 0.5, 10.0]),
    (Weibull(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)), [0.01, 1.0, 30.0])],
    ids=["gamma", "gamma-singular", "beta", "student-t", "weibull"])
def test_an_affine_transform_of_a_forecast_scores_as_the_forecast(base, observations):
    """``TransformedDistribution(base, AffineTransform(2, -3))``: torch gives it the real line as support and the
    base's missing cdf or icdf as its own, so a mirrored Gamma's density was evaluated outside its support (a
    validation error), a mirrored Beta's or Student t's ``icdf``/``cdf`` raised ``NotImplementedError``, and the
    PIT beyond the support was NaN. Its CRPS is 3 times the base's at the mapped observation, its PIT 1 minus the
    base's (to 1e-7 and 1e-8: the image's finite end is 2, which the panels resolve to 2^-44 of its size, where the
    base's end at 0 goes down to 1e-300); beyond its support the PIT is 0 or 1."""
    forecast = TransformedDistribution(base, [AffineTransform(torch.tensor(2.0, dtype=torch.float64),
                                                              torch.tensor(-3.0, dtype=torch.float64))])
    y = torch.tensor(observations, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(op.crps(forecast, 2 - 3 * y), 3 * op.crps(base, y), rtol=1e-7, atol=0)
        torch.testing.assert_close(op.pit(forecast, 2 - 3 * y), 1 - op.pit(base, y), rtol=0, atol=1e-8)
    if isinstance(base, (Gamma, Weibull, Beta)):  # support [0, ...): the image's upper end is 2
        assert op.pit(forecast, torch.tensor([2.5, 1e9], dtype=torch.float64)).tolist() == [1.0, 1.0]
    if isinstance(base, Beta):  # and its lower end -1
        assert op.pit(forecast, torch.tensor([-1.5], dtype=torch.float64)).tolist() == [0.0]


def test_float32_pit_through_the_forecasts_cdf_keeps_small_values():
    """A float32 torch forecast's own cdf loses the digits of a small PIT (a Normal's ``0.5 (1 + erf)`` at -5 kept
    a few, a Gamma's near 0 likewise): the PIT comes from its float64 copy's cdf, in float32 to its rounding.
    Reference: scipy's cdfs at the float32 values."""
    cases = [(Normal(torch.tensor(0.0, dtype=torch.float32), torch.tensor(1.0, dtype=torch.float32)),
              [-5.0, -3.0, 0.0, 2.0], scipy.stats.norm.cdf),
             (Gamma(torch.tensor(2.0, dtype=torch.float32), torch.tensor(1.0, dtype=torch.float32)),
              [1e-4, 0.01, 1.0, 5.0], scipy.stats.gamma(2.0).cdf)]
    for forecast, observations, cdf in cases:
        y = torch.tensor(observations, dtype=torch.float32)
        got = op.pit(forecast, y)
        assert got.dtype == torch.float32
        assert got.double().tolist() == pytest.approx(cdf(y.double().numpy()).tolist(), rel=3e-7, abs=0)


def test_float32_torch_forecasts_are_integrated_as_their_float64_copies():
    """A float32 LogNormal(0, 6)'s CRPS was 1.3e-4 relative off from its own float32 density and quantiles (the
    float64 one: 2e-12); its float64 copy (the same parameters) gives the float64 value to float32's rounding, as
    does a LogNormal built on a float32 TransformedDistribution of a Normal. The PIT likewise."""
    y = torch.tensor([0.5, 3.0, 100.0], dtype=torch.float64)
    wide = LogNormal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(6.0, dtype=torch.float64))
    narrow = LogNormal(torch.tensor(0.0, dtype=torch.float32), torch.tensor(6.0, dtype=torch.float32))
    built = TransformedDistribution(Normal(torch.tensor(0.0, dtype=torch.float32),
                                           torch.tensor(6.0, dtype=torch.float32)), [ExpTransform()])
    for forecast in (narrow, built):
        got = op.crps(forecast, y.float())
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), op.crps(wide, y), rtol=3e-7, atol=0)
    assert narrow.loc.dtype == torch.float32  # the forecast itself is left as it is


def test_a_float32_forecast_whose_float64_copy_fails_is_integrated_as_it_is():
    """The float64 copy converts the tensors of the distributions and transforms a forecast is built from, not those
    of other objects it holds: a density from a float32 network (a torch Module) would multiply float64 points by
    float32 weights and raise. Such a forecast is integrated as it is, in float32, as before the copies: against
    the Exponential its network leaves unchanged (zero weights), to float32's rounding."""
    from torch.distributions import Exponential, constraints

    class Networked(torch.distributions.Distribution):
        arg_constraints, support = {}, constraints.positive

        def __init__(self, rate):
            self.rate, self.net = rate, torch.nn.Linear(1, 1, dtype=torch.float32)
            with torch.no_grad():
                self.net.weight.zero_()
                self.net.bias.zero_()
            super().__init__(torch.Size(), validate_args=False)

        def log_prob(self, x):
            return Exponential(self.rate).log_prob(x) + self.net(x.unsqueeze(-1)).squeeze(-1)

        mean = property(lambda self: 1 / self.rate)
        stddev = property(lambda self: 1 / self.rate)

    forecast = Networked(torch.tensor(0.5, dtype=torch.float32))
    y = torch.tensor([0.5, 3.0, 20.0], dtype=torch.float32)
    exact = y + 4 * torch.exp(-y / 2) - 3  # an Exponential of mean m: y + 2 m exp(-y / m) - 3 m / 2
    got = op.crps(forecast, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, exact, rtol=2e-5, atol=0)
    torch.testing.assert_close(op.pit(forecast, y), 1 - torch.exp(-y / 2), rtol=2e-5, atol=0)


@pytest.mark.parametrize("shape", [0.01, 0.003, 0.001])
def test_crps_and_pit_count_the_mass_below_the_smallest_floats(shape):
    """The log-distance panels next to 0 stop at 1e-300, below which a Gamma of shape 0.01 has a thousandth of its
    mass and one of shape 0.001 half: the CRPS of Gamma(0.001) at 0.5 was 24.6 against 0.499 (the cdf never
    reached 1), with a warning. That mass now comes from the forecast's cdf, or, for a numerical pool without
    mass worth a cdf evaluation there, from the panels' power law. References: the Gamma CRPS's closed form
    (Scheuerer & Möller 2015, "Probabilistic wind speed forecasting on a grid based on ensemble model output
    statistics"), and for a mixture pool integrated as a numerical one, scipy's gamma cdfs integrated in log x.
    Float32 forecasts to their own precision."""
    y = torch.tensor([1e-305, 1e-5, 0.5, 3.0], dtype=torch.float64)
    x = y.numpy()
    expected = (x * (2 * scipy.special.gammainc(shape, x) - 1) - shape * (2 * scipy.special.gammainc(shape + 1, x) - 1)
                - 1 / scipy.special.beta(0.5, shape))
    forecast = Gamma(torch.tensor(shape, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = op.crps(forecast, y)
        # a float32 pool's panels stop at 2^-101 (they stopped at 1e-300, which float32 flushes to 0: 38.8 for
        # 0.49); a float32 torch Gamma is integrated as its float64 copy
        single = op.crps(op.NumericalHolderPool(Gamma(torch.tensor([shape, shape], dtype=torch.float32),
                                                      torch.tensor([1.0, 1.0], dtype=torch.float32)), 1.0, [0.5, 0.5]),
                         y.float())
        copied = op.crps(Gamma(torch.tensor(shape, dtype=torch.float32), torch.tensor(1.0, dtype=torch.float32)),
                         y.float())
    assert got.tolist() == pytest.approx(expected.tolist(), rel=1e-9, abs=0)
    assert single[1:].tolist() == pytest.approx(expected[1:].tolist(), rel=1e-4, abs=0)  # 1e-305 is 0 in float32
    assert copied[1:].tolist() == pytest.approx(expected[1:].tolist(), rel=1e-6, abs=0)

    shapes, rates, weights = [shape, 10 * shape], [1.0, 3.0], [0.3, 0.7]
    experts = Gamma(torch.tensor(shapes, dtype=torch.float64), torch.tensor(rates, dtype=torch.float64))
    pool = op.NumericalHolderPool(experts, 1.0, weights)

    def cdf(z):
        return sum(w * scipy.special.gammainc(k, r * z) for w, k, r in zip(weights, shapes, rates))

    def quad(f, a, b):
        return scipy.integrate.quad(f, a, b, limit=1000, epsabs=1e-16)[0]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, transforms = op.crps(pool, y), op.pit(pool, y)
    for obs, value, transform in zip(x, got.tolist(), transforms.tolist()):
        below = quad(lambda s: cdf(math.exp(s)) ** 2 * math.exp(s), -745, math.log(obs))
        above = quad(lambda s: (1 - cdf(math.exp(s))) ** 2 * math.exp(s), math.log(obs), 0) if obs < 1 else 0.0
        expected = below + above + quad(lambda z: (1 - cdf(z)) ** 2, max(1.0, obs), np.inf)
        assert value == pytest.approx(expected, rel=1e-9, abs=0)
        assert transform == pytest.approx(cdf(obs), rel=1e-9, abs=0)


def test_crps_sums_the_upper_tail_from_the_right():
    """F was summed from the left across the whole line, so mass the panels missed at the lower end (a Weibull of
    shape 0.1, singular at 0) was carried up an upper tail spanning 5e14: a CRPS of 1.85e7 for 3544, 378.6 for
    256.8 at shape 0.12, and a LogNormal(0, 6) 0.8 % high with no warning. References: at y = 0 a Weibull's CRPS
    is the closed form int_0^inf exp(-2 (x / lam)^k) dx = lam Gamma(1 + 1/k) / 2^(1/k); the LogNormal's is
    Baran and Lerch's closed form, evaluated by mpmath at 40 digits."""
    import mpmath
    from torch.distributions import LogNormal, Weibull

    def t(x):
        return torch.tensor(x, dtype=torch.float64)

    for k in (0.1, 0.12, 0.15, 0.5, 2.0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the lost mass at 0 still warns; it no longer reaches the CRPS
            got = float(op.crps(Weibull(t(1.3), t(k)), t(0.0)))
        assert got == pytest.approx(1.3 * math.gamma(1 + 1 / k) / 2 ** (1 / k), rel=1e-8), k

    def crps_lognormal(mu, s, y):
        with mpmath.workdps(40):
            mu, s, y = mpmath.mpf(mu), mpmath.mpf(s), mpmath.mpf(y)
            w = (mpmath.log(y) - mu) / s
            return float(y * (2 * mpmath.ncdf(w) - 1)
                         - 2 * mpmath.exp(mu + s**2 / 2) * (mpmath.ncdf(w - s) + mpmath.ncdf(s / mpmath.sqrt(2)) - 1))

    for s, y in ((6.0, 1.0), (4.0, 1.0), (2.0, 0.3)):
        assert float(op.crps(LogNormal(t(0.0), t(s)), t(y))) == pytest.approx(crps_lognormal(0, s, y),
                                                                                        rel=1e-7), s


def test_pit_of_a_transformed_forecast_far_in_its_tails():
    """A Gumbel's cdf is its base Uniform's at the transformed point, which rounds onto the Uniform's open ends 6
    standard deviations out: pit and coverage raised torch's support error (y <= -7, or >= 37) instead of giving 0
    and 1. Reference: scipy's Gumbel cdf; the forecast keeps its own validation setting."""
    import scipy.stats
    from torch.distributions import Gumbel

    forecast = Gumbel(torch.tensor(0.5, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64),
                      validate_args=True)
    y = torch.tensor([-40.0, -12.0, 0.0, 3.0, 80.0, 120.0], dtype=torch.float64)
    expected = scipy.stats.gumbel_r.cdf(y.numpy(), loc=0.5, scale=2.0)
    np.testing.assert_allclose(op.pit(forecast, y).numpy(), expected, rtol=1e-12, atol=1e-200)
    assert op.coverage(forecast, y).count == 6
    assert forecast._validate_args and forecast.base_dist._validate_args
    with pytest.raises(ValueError):  # validation itself still works for the user's own calls
        forecast.base_dist.cdf(torch.tensor(2.0, dtype=torch.float64))


def test_crps_of_heavy_tails_beyond_the_quantile_panels():
    """The CRPS beyond the last panel (1 - F = 1e-13 there) was dropped: a Pareto of shape 0.5 or 0.3, whose CRPS
    diverges, gave 57 and 1.5e17 with no warning, one of shape 0.55 9.94 for 10, and the 1e-13 left out of 1 - F
    cost 2e-13 E[X] over the panels. References: at the scale, the closed form int_1^inf x^(-2a) dx = 1 / (2a - 1);
    elsewhere scipy's quad of (F - 1{x >= y})^2 with Pareto's cdf."""
    from torch.distributions import Cauchy, Pareto

    def t(x):
        return torch.tensor(x, dtype=torch.float64)

    for a in (0.55, 0.6, 1.0, 2.0):
        assert float(op.crps(Pareto(t(1.0), t(a)), t(1.0))) == pytest.approx(1 / (2 * a - 1), rel=1e-10), a
    for a in (0.3, 0.5):
        assert float(op.crps(Pareto(t(1.0), t(a)), t(1.0))) == math.inf, a
    a, y = 0.7, 3.0
    below = scipy.integrate.quad(lambda x: (1 - x**-a) ** 2, 1, y, epsabs=0, epsrel=1e-13)[0]
    above = y ** (1 - 2 * a) / (2 * a - 1)  # int_y^inf x^(-2a) dx
    assert float(op.crps(Pareto(t(1.0), t(a)), t(y))) == pytest.approx(below + above, rel=1e-10)
    # both tails of a Cauchy: the integral of its closed-form cdf
    cdf = scipy.stats.cauchy(0.2, 1.5).cdf
    reference = sum(scipy.integrate.quad(f, lo, hi, epsabs=0, epsrel=1e-12, limit=200)[0]
                    for f, lo, hi in ((lambda x: cdf(x) ** 2, -np.inf, 0.9), (lambda x: (1 - cdf(x)) ** 2, 0.9, np.inf)))
    assert float(op.crps(Cauchy(t(0.2), t(1.5)), t(0.9))) == pytest.approx(reference, rel=1e-9)


def test_float64_observations_of_a_float32_forecast_keep_their_digits():
    """Observations were rounded to the forecast's dtype first: 1e6 + 0.002 became 1e6 under a float32
    N(1e6, 1e-3) (float32's spacing there is 0.0625), a PIT of 0.5 instead of 0.977 and a CRPS 6 times too small;
    the same for the Laplace's quadrature. They are scored in the wider dtype now. References: the closed forms at the
    float32 parameters' values (Normal: s (z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi)); Laplace: b (|z| + e^-|z| -
    3/4), F = 1 - e^-z / 2 for z > 0)."""
    from torch.distributions import Laplace

    y = torch.tensor(1e6 + 0.002, dtype=torch.float64)
    loc, scale = torch.tensor(1e6, dtype=torch.float32), torch.tensor(1e-3, dtype=torch.float32)
    z = (y.item() - loc.item()) / scale.item()
    normal_crps = scale.item() * (z * (2 * scipy.stats.norm.cdf(z) - 1) + 2 * scipy.stats.norm.pdf(z)
                                  - 1 / math.sqrt(math.pi))
    laplace_crps = scale.item() * (abs(z) + math.exp(-abs(z)) - 0.75)
    # (the quadrature's nodes lie on float64's grid at 1e6, 1.2e-7 of the scale apart)
    for forecast, crps, pit, rel in ((Normal(loc, scale), normal_crps, scipy.stats.norm.cdf(z), 1e-12),
                                     (Laplace(loc, scale), laplace_crps, 1 - 0.5 * math.exp(-z), 1e-6)):
        got_crps, got_pit = op.crps(forecast, y), op.pit(forecast, y)
        assert got_crps.dtype == got_pit.dtype == torch.float64
        assert got_crps.item() == pytest.approx(crps, rel=rel) and got_pit.item() == pytest.approx(pit, rel=rel)
    # and under exact pools (the pool's cdf rounded the observation to its float32: 0.5; coverage 1 for 0); the
    # pool keeps its float32 experts in its own parameters, whose rounding moves z by about 1e-7
    pool = op.holder(Normal(torch.stack((loc, loc)).unsqueeze(0), torch.stack((scale, scale)).unsqueeze(0)), 1.0)
    assert op.pit(pool, y.reshape(1)).item() == pytest.approx(scipy.stats.norm.cdf(z), rel=1e-7)
    assert op.coverage(pool, y.expand(10, 1), levels=(0.9,)).empirical == (0.0,)
    assert op.crps(pool, y.reshape(1)).item() == pytest.approx(normal_crps, rel=1e-6)
    # a finite float64 observation beyond float32's range is scored, not reported as infinite
    assert op.pit(Normal(loc, scale), torch.tensor(1e39, dtype=torch.float64)).item() == 1.0
    # integer observations take the forecast's dtype
    assert op.crps(Normal(loc, scale), torch.tensor(1000000)).dtype == torch.float32


def test_coverage_of_no_observations_is_refused():
    with pytest.raises(ValueError, match="observations must hold at least one observation"):
        op.coverage(Normal(0.0, 1.0), torch.tensor([]))


def test_a_transformed_discrete_forecast_is_refused_up_front():
    """torch gives a TransformedDistribution the real line as support whatever its base: an affine map of a Poisson
    passed the check and failed inside the quadrature with torch's message about values like 3.7e-301."""
    forecast = TransformedDistribution(Poisson(torch.tensor(3.0)), [AffineTransform(0.0, 2.0)])
    for score in (op.crps, op.pit):
        with pytest.raises(ValueError, match="forecast must be a continuous distribution.*TransformedDistribution"
                                             ".*discrete support"):
            score(forecast, torch.tensor(2.0))
    # the check looks through the base, not past a continuous one
    continuous = TransformedDistribution(Normal(torch.tensor(1.0), torch.tensor(2.0)), [AffineTransform(3.0, 0.5)])
    assert op.pit(continuous, torch.tensor(3.5)).item() == pytest.approx(scipy.stats.norm(3.5, 1.0).cdf(3.5))


def test_coverage_takes_numpy_and_torch_levels():
    """Levels as numpy scalars of any float width, a numpy array or a torch vector give the table of plain floats
    (a numpy float32 level was refused as not a probability); a numpy boolean is still refused."""
    torch.manual_seed(3)
    y = torch.randn(200, dtype=torch.float64)
    forecast = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    expected = op.coverage(forecast, y, levels=(0.5, 0.875))
    for levels in ((np.float32(0.5), np.float64(0.875)), np.array([0.5, 0.875], dtype=np.float32),
                   torch.tensor([0.5, 0.875]), [torch.tensor(0.5), torch.tensor(0.875, dtype=torch.float64)]):
        table = op.coverage(forecast, y, levels=levels)
        assert table.levels == (0.5, 0.875) and table.empirical == expected.empirical
    assert op.coverage(forecast, y, levels=np.float32(0.5)).empirical == expected.empirical[:1]
    with pytest.raises(ValueError, match="levels must be probabilities in \\(0, 1\\), got np.True_"):
        op.coverage(forecast, y, levels=(np.True_,))
    with pytest.raises(ValueError, match="levels must be probabilities in \\(0, 1\\), got tensor\\(True\\)"):
        op.coverage(forecast, y, levels=[torch.tensor(True)])


def test_numpy_scalar_observations_and_bounds_are_numbers():
    """np.float32 and np.int64 observations raised 'must be a tensor of real numbers' (np.float64 passed only as a
    subclass of float), and np.float32 alpha bounds 'must be two finite numbers'."""
    forecast = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    for y in (np.float32(0.25), np.int64(1), np.float16(-2.0)):
        assert float(op.crps(forecast, y)) == float(op.crps(forecast, float(y)))
        assert float(op.pit(forecast, y)) == pytest.approx(scipy.stats.norm.cdf(float(y)), rel=1e-12)
    with pytest.raises(TypeError, match="observations must be a tensor of real numbers, got bool"):
        op.pit(forecast, np.True_)
    experts = Normal(torch.tensor([0.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 1.5], dtype=torch.float64))
    y = torch.tensor([0.1, 1.9, -0.4, 2.6, 1.0], dtype=torch.float64)
    fitted = op.fit_weights(experts, y, 0.5, learn_alpha=True, alpha_bounds=(np.float32(-2), np.float32(2)))
    reference = op.fit_weights(experts, y, 0.5, learn_alpha=True, alpha_bounds=(-2.0, 2.0))
    assert fitted.log_score == reference.log_score


def test_fit_weights_names_observations_where_the_density_is_unbounded():
    """A Gamma of shape 0.5 has an infinite density at 0: the log score there is +inf, which the fit took as the best
    point there is and then reported as 'an observation outside the support of every pool'."""
    experts = Gamma(torch.tensor([0.5, 3.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"log score is \+inf at observations \[0\] .*density is unbounded"):
        op.fit_weights(experts, torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64), 0.5)


@pytest.mark.parametrize("forecast, cdf", [(Gamma(torch.tensor(2.0), torch.tensor(1.0)), scipy.stats.gamma(2).cdf),
                                           (Laplace(torch.tensor(0.0), torch.tensor(1.0)), scipy.stats.laplace.cdf),
                                           (LogNormal(torch.tensor(0.0), torch.tensor(1.0)), scipy.stats.lognorm(1).cdf),
                                           (Gamma(torch.tensor(0.5), torch.tensor(1.0)), scipy.stats.gamma(0.5).cdf)])
@pytest.mark.parametrize("y", [1e-3, 0.3, 2.5])
def test_the_quadrature_crps_has_the_gradient_in_the_observation(forecast, cdf, y):
    """d CRPS / dy = 2 F(y) - 1. The observation is a panel edge of the quadrature: its gradient through the nodes
    was NaN (no cdf short-cut) or off (a Gamma of shape 0.5 at 1e-6: -0.9908 for -0.9977). The PIT has none."""
    observed = torch.tensor(y, requires_grad=True)
    (gradient,) = torch.autograd.grad(op.crps(forecast, observed), observed)
    assert gradient.item() == pytest.approx(2 * cdf(y) - 1, rel=1e-9, abs=1e-12)
    assert not op.pit(forecast, observed).requires_grad


def test_the_crps_of_laplace_mixtures_of_more_than_four_components_against_quadrature():
    """Beyond four components each kept a quarter of its quantile levels, most not their median, where a Laplace's
    density has its kink: 6e-6 (five) and 3e-5 (ten) relative error, with a warning whose advice did not apply."""
    for count in (5, 10):
        locs = torch.linspace(-2.0, 2.0, count)
        scales = torch.linspace(0.3, 1.2, count)
        weights = torch.linspace(1.0, 2.0, count)
        forecast = MixtureSameFamily(Categorical(weights), Laplace(locs, scales))
        y = 0.3
        p = (weights / weights.sum()).tolist()

        def cdf(x, parts=tuple(zip(p, locs.tolist(), scales.tolist()))):
            return sum(w * scipy.stats.laplace.cdf(x, m, s) for w, m, s in parts)

        kinks = sorted(locs.tolist() + [y])
        below = scipy.integrate.quad(lambda x: cdf(x) ** 2, -60, y, points=[k for k in kinks if k < y], limit=500,
                                     epsabs=0, epsrel=1e-13)[0]
        above = scipy.integrate.quad(lambda x: (1 - cdf(x)) ** 2, y, 60, points=[k for k in kinks if k > y], limit=500,
                                     epsabs=0, epsrel=1e-13)[0]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert op.crps(forecast, torch.tensor(y)).item() == pytest.approx(below + above, rel=1e-10)
