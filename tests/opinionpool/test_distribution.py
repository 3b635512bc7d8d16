"""Pools are torch distributions: shapes, validation, cdf/icdf/interval, entropy, KL, rsample, expand, checked
against independent float64 computations (scipy quadrature of the pooled density written out here, exact sums)."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats
from torch.distributions import Beta, Distribution, Exponential, Gamma, Normal, Poisson, kl_divergence

import opinionpool
from opinionpool import CustomFamily

WEIGHTS = [0.3, 0.7]


def pooled_log_density(log_pdfs, weights, alpha, support=(-np.inf, np.inf)):
    """The normalised Hölder pool of hand-written log-densities, normalised by scipy quadrature (independent of the
    library)."""
    log_w = np.log(weights)

    def log_u(z):
        ell = np.array([f(z) for f in log_pdfs])
        if alpha == 0:
            return float(np.dot(weights, ell))
        return float(special.logsumexp(log_w + alpha * ell) / alpha)

    log_mass = math.log(integrate.quad(lambda z: math.exp(log_u(z)), *support, limit=200, epsabs=0, epsrel=1e-12)[0])
    return lambda z: log_u(z) - log_mass


def scipy_cdf(log_density, x, lower=-np.inf):
    return integrate.quad(lambda z: math.exp(log_density(z)), lower, x, limit=200, epsabs=1e-14, epsrel=1e-12)[0]


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def normal(m, s):
    return lambda z: -0.5 * ((z - m) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)


def gamma(a, b):
    return lambda z: a * math.log(b) + (a - 1) * math.log(z) - b * z - math.lgamma(a) if z > 0 else -math.inf


def beta(a, b):
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    return lambda z: log_norm + (a - 1) * math.log(z) + (b - 1) * math.log1p(-z) if 0 < z < 1 else -math.inf


NORMALS = ([Normal(t(0.0), t(1.0)), Normal(t(2.0), t(0.5))], [normal(0, 1), normal(2, 0.5)], (-np.inf, np.inf))
GAMMAS = ([Gamma(t(2.0), t(1.0)), Gamma(t(5.0), t(2.5))], [gamma(2, 1), gamma(5, 2.5)], (0, np.inf))
BETAS = ([Beta(t(2.0), t(5.0)), Beta(t(4.0), t(1.5))], [beta(2, 5), beta(4, 1.5)], (0, 1))


def test_pools_are_torch_distributions_with_torch_shapes():
    experts = Gamma(torch.tensor([[2.0, 5.0], [3.0, 1.0]]), torch.tensor([[1.0, 2.5], [2.0, 0.5]]))
    for alpha in (0.5, 2.0):
        pool = opinionpool.holder(experts, alpha, weights=WEIGHTS)
        assert isinstance(pool, Distribution)
        assert pool.batch_shape == (2,) and pool.event_shape == ()
        assert pool.support.check(torch.tensor([0.5, -1.0])).tolist() == [True, False]
        assert pool.arg_constraints == {}
        assert pool.sample((4, 3)).shape == (4, 3, 2)
        assert pool.log_prob(torch.ones(5, 1)).shape == (5, 2)  # broadcast against the batch
        with pytest.raises(ValueError, match="support"):
            pool.log_prob(torch.tensor(-1.0))
        with pytest.raises(ValueError):  # torch's shape check: (3,) does not broadcast with batch (2,)
            pool.log_prob(torch.ones(3))
        expanded = pool.expand((3, 2))
        assert expanded.batch_shape == (3, 2)
        z = torch.tensor([0.7, 3.0])
        torch.testing.assert_close(expanded.log_prob(z), pool.log_prob(z).expand(3, 2))
        torch.testing.assert_close(expanded.mean, pool.mean.expand(3, 2))


@pytest.mark.parametrize("case, alpha", [(NORMALS, 0.5), (NORMALS, 2.0), (GAMMAS, 1.0), (GAMMAS, -1.0),
                                         (BETAS, 0.5)])
def test_cdf_icdf_and_interval_match_scipy_quadrature_of_the_pooled_density(case, alpha):
    experts, pdfs, support = case
    pool = opinionpool.holder(experts, alpha, weights=WEIGHTS)
    density = pooled_log_density(pdfs, WEIGHTS, alpha, support)
    mean = float(pool.mean)
    xs = [mean - 1.0, mean, mean + 0.8] if support[0] == -np.inf else [0.3 * mean, mean, min(1.5 * mean, 0.99)]
    expected = torch.tensor([scipy_cdf(density, x, support[0]) for x in xs])
    torch.testing.assert_close(pool.cdf(torch.tensor(xs)), expected, rtol=1e-8, atol=1e-10)
    levels = [0.05, 0.5, 0.9]
    quantiles = pool.icdf(torch.tensor(levels))
    # the quantile's cdf (by scipy) is the level, to within the density there times float64 resolution of z
    for q, x in zip(levels, quantiles.tolist()):
        assert scipy_cdf(density, x, support[0]) == pytest.approx(q, abs=1e-9)
    low, high = pool.interval(0.9)
    assert scipy_cdf(density, float(high), support[0]) - scipy_cdf(density, float(low), support[0]) == \
        pytest.approx(0.9, abs=1e-7)


@pytest.mark.parametrize("alpha", [0.7, 0.5])  # the quadrature's bisection, and an exact pool's on its cdf
def test_quantiles_next_to_a_singular_end_at_zero(alpha):
    """Pools of identical Gamma(0.1, 2) experts are that Gamma: its quantiles down to 1e-29 (at 2e-291), against
    scipy's inverse incomplete gamma. Between nodes orders of magnitude apart the quadrature's
    quantile of 1e-5 was 2.0e-51 (not 3.0e-51) and those from 1e-8 down stopped at one node (3.6e-67); bisected in
    z, the exact pool's stopped at 1e-30."""
    experts = Gamma(torch.tensor([0.1, 0.1], dtype=torch.float64), torch.tensor([2.0, 2.0], dtype=torch.float64))
    pool = opinionpool.holder(experts, alpha, weights=torch.tensor(WEIGHTS, dtype=torch.float64))
    levels = [1e-2, 1e-5, 1e-8, 1e-20, 1e-29]
    expected = special.gammaincinv(0.1, levels) / 2
    assert pool.icdf(torch.tensor(levels, dtype=torch.float64)).tolist() == pytest.approx(expected.tolist(), rel=1e-11,
                                                                                           abs=0)


def test_gaussian_mixture_cdf_and_quantiles_far_in_the_lower_tail():
    """The exact mixture of N(0, 2) and N(1, 3) (alpha = 1) against scipy's ndtr: torch's Normal cdf, (1 + erf) / 2,
    is 0 below 1e-16, so the cdf at -20 was 0 and the quantile of 1e-30 stopped at -19."""
    experts = Normal(torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([2.0, 3.0], dtype=torch.float64))
    pool = opinionpool.holder(experts, 1.0, weights=torch.tensor(WEIGHTS, dtype=torch.float64))
    x = np.array([-20.0, -60.0, -100.0])
    expected = WEIGHTS[0] * special.ndtr(x / 2) + WEIGHTS[1] * special.ndtr((x - 1) / 3)
    assert pool.cdf(torch.tensor(x)).tolist() == pytest.approx(expected.tolist(), rel=1e-12, abs=0)
    assert pool.icdf(torch.tensor(expected)).tolist() == pytest.approx(x.tolist(), rel=1e-12, abs=0)


@pytest.mark.parametrize("alpha", [0.7, 0.5])  # the quadrature's bisection, and an exact pool's on its cdf
def test_quantiles_far_in_an_infinite_tail(alpha):
    """Pools of identical experts are that expert: quantiles of N(1, 2) and Gamma(2.5, 1.5) down to levels of 1e-300
    and up to 1 - 2^-52, against scipy's ndtri and inverse incomplete gamma of the exact tail 1 - q. Read from
    ``F = 1 - S`` the upper quantiles kept only the digits of 1 (1 - 1e-15: 1e-3 off), and between the quadrature's
    wide far-tail nodes a 32-point rule put the quantile of 1e-300 2.5e-9 off."""
    weights = torch.tensor(WEIGHTS, dtype=torch.float64)
    normal = opinionpool.holder(Normal(t([1.0, 1.0]), t([2.0, 2.0])), alpha, weights=weights)
    low = np.array([1e-300, 1e-100, 1e-12])
    levels = 1 - np.array([1e-15, 2.0**-52])
    high = 1 - levels  # the levels' tails, exact in float64 (1 - 1e-15 rounds to 1 - 9.99e-16)
    assert normal.icdf(torch.tensor(low)).tolist() == pytest.approx((1 + 2 * special.ndtri(low)).tolist(), rel=1e-14,
                                                                    abs=0)
    assert normal.icdf(torch.tensor(levels)).tolist() == pytest.approx((1 - 2 * special.ndtri(high)).tolist(),
                                                                         rel=1e-14, abs=0)
    gamma = opinionpool.holder(Gamma(t([2.5, 2.5]), t([1.5, 1.5])), alpha, weights=weights)
    assert gamma.icdf(torch.tensor(levels)).tolist() == pytest.approx((special.gammainccinv(2.5, high) / 1.5).tolist(),
                                                                        rel=1e-14, abs=0)


def test_quantiles_next_to_a_singular_end_at_one():
    """A pool of identical Beta(0.2, 0.2) experts (the quadrature's icdf): quantiles down to 1e-60 against scipy's
    inverse incomplete beta, and next to 1, where a float's step moves the cdf by 7e-4 of the tail, the smallest
    float whose cdf (mpmath's incomplete beta) reaches the level: 1 - 2.5e-14 for 1 - 1e-3 (it was 1 - 2^-44, the
    end panel's nearest point, whose cdf is 0.9988); a level above the cdf of the last float below 1 has the
    quantile 1."""
    import mpmath as mp

    shape = 0.2
    experts = Beta(torch.tensor([shape, shape], dtype=torch.float64), torch.tensor([shape, shape], dtype=torch.float64))
    pool = opinionpool.holder(experts, -1.0, weights=torch.tensor(WEIGHTS, dtype=torch.float64))
    low = [1e-8, 1e-20, 1e-60]
    assert pool.icdf(torch.tensor(low, dtype=torch.float64)).tolist() == pytest.approx(
        special.betaincinv(shape, shape, low).tolist(), rel=1e-9, abs=0)
    with mp.workdps(40):
        def cdf(z):
            return mp.betainc(shape, shape, 0, mp.mpf(z), regularized=True)
        for q in (1 - 1e-3, 0.99966):
            z = pool.icdf(torch.tensor(q, dtype=torch.float64)).item()
            assert cdf(z) >= q > cdf(math.nextafter(z, 0)), (q, z)
        last = math.nextafter(1.0, 0)
        assert pool.icdf(torch.tensor(float(cdf(last)) + 1e-6, dtype=torch.float64)).item() == 1.0


def test_discrete_cdf_icdf_and_entropy_are_exact_sums():
    rates, alpha = (2.0, 7.0), 0.5
    pool = opinionpool.holder(Poisson(torch.tensor(rates)), alpha, weights=WEIGHTS)
    k = np.arange(200)
    u = np.dot(WEIGHTS, np.stack([stats.poisson(r).pmf(k) for r in rates]) ** alpha) ** (1 / alpha)
    pmf = u / u.sum()
    cumulative = np.cumsum(pmf)
    torch.testing.assert_close(pool.cdf(torch.tensor([0.0, 3.5, 9.0])),
                               torch.tensor([cumulative[0], cumulative[3], cumulative[9]]), rtol=1e-12, atol=1e-14)
    levels = np.array([0.1, 0.5, 0.95])
    expected = [float(np.argmax(cumulative >= q)) for q in levels]
    assert pool.icdf(torch.tensor(levels)).tolist() == expected
    entropy = -np.sum(pmf[pmf > 0] * np.log(pmf[pmf > 0]))
    assert float(pool.entropy()) == pytest.approx(entropy, rel=1e-12)


def test_discrete_quantiles_are_the_smallest_points_whose_cdf_reaches_the_level():
    """icdf(q) of a discrete pool is the smallest support point k with cdf(k) >= q, to the last bit: it compared
    against q (1 - 1e-12), so that 1 - 1e-13 (tail mass 3e-13 above 37) gave 37 and F(8) (1 + 4e-13) gave 8."""
    f64 = torch.float64
    pool = opinionpool.holder(Poisson(torch.tensor([5.0, 9.0], dtype=f64)), 0.5, weights=torch.tensor(WEIGHTS, dtype=f64))
    support = torch.arange(80, dtype=f64)
    cdf = pool.cdf(support)
    assert float(1 - cdf[37]) > 1e-13  # the level below lies above F(37)
    levels = torch.cat([torch.tensor([1 - 1e-13, 0.0, 1.0], dtype=f64), cdf[[3, 8, 30, 33]],
                        torch.nextafter(cdf[[3, 8, 30, 33]], torch.tensor(1.0, dtype=f64)), cdf[[8]] * (1 + 4e-13)])
    quantiles = pool.icdf(levels)
    expected = torch.stack([support[(cdf >= q).nonzero()[0, 0]] for q in levels])
    torch.testing.assert_close(quantiles, expected, rtol=0, atol=0)
    assert quantiles[0] == 38 and (pool.cdf(quantiles) >= levels).all()
    # the cdf between support points, below the first and beyond the enumerated support
    torch.testing.assert_close(pool.cdf(torch.tensor([8.5, -0.5, 1e9], dtype=f64)),
                               torch.tensor([float(cdf[8]), 0.0, 1.0], dtype=f64), rtol=0, atol=0)


@pytest.mark.parametrize("experts, alpha", [
    (Poisson(torch.tensor([5.0, 9.0], dtype=torch.float64)), 0.5),  # enumeration
    (Normal(torch.tensor([0.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 0.5], dtype=torch.float64)), 0.5),
    (Normal(torch.tensor([0.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 0.5], dtype=torch.float64)), -1.0),
    (Gamma(torch.tensor([2.0, 3.0], dtype=torch.float64), torch.tensor([1.0, 0.5], dtype=torch.float64)), -2.0)])
def test_cdf_and_icdf_of_nan_without_validation_are_nan(experts, alpha):
    """With validate_args=False a NaN value or level gives NaN, as log_prob does (the quadrature's cdf returned 0
    and its icdf 1310.7; the enumeration's icdf 0), and leaves the other entries' results as they are."""
    pool = opinionpool.holder(experts, alpha, weights=torch.tensor(WEIGHTS, dtype=torch.float64), validate_args=False)
    checked = opinionpool.holder(experts, alpha, weights=torch.tensor(WEIGHTS, dtype=torch.float64))
    with_nan = torch.tensor([math.nan, 0.3, 0.8], dtype=torch.float64)
    for method in ("cdf", "icdf"):
        got = getattr(pool, method)(with_nan)
        assert torch.isnan(got[0]), method
        torch.testing.assert_close(got[1:], getattr(checked, method)(with_nan[1:]), rtol=0, atol=0)
        with pytest.raises(ValueError, match="value"):
            getattr(checked, method)(with_nan)


@pytest.mark.parametrize("case, alpha", [(NORMALS, 0.5), (GAMMAS, 2.0), (BETAS, -1.0)])
def test_entropy_and_kl_match_scipy_quadrature(case, alpha):
    experts, pdfs, support = case
    pool = opinionpool.holder(experts, alpha, weights=WEIGHTS)
    density = pooled_log_density(pdfs, WEIGHTS, alpha, support)

    def integrand(f):
        return lambda z: math.exp(density(z)) * f(z) if density(z) > -math.inf else 0.0

    entropy = integrate.quad(integrand(lambda z: -density(z)), *support, limit=200)[0]
    estimate = pool.entropy_estimate()
    assert float(estimate.value) == pytest.approx(entropy, abs=1e-8)
    assert float(estimate.error) < 1e-8
    other, other_pdf = experts[1], pdfs[1]
    kl = integrate.quad(integrand(lambda z: density(z) - other_pdf(z)), *support, limit=200)[0]
    assert float(kl_divergence(pool, other)) == pytest.approx(kl, abs=1e-8)


@pytest.mark.parametrize(("second", "weights", "alpha"), [((4.0, 0.5), [0.01, 0.99], 8.0), ((10.0, 1.0), [0.5, 0.5], -1.0)])
def test_importance_errors_of_entropy_and_kl_are_calibrated(second, weights, alpha):
    """log Z_hat and E_hat[log u] come from the same draws; their errors were added as independent: the z-scores of
    80 seeds had a spread of 1.4 (82 % coverage of a 95 % interval) in the first case and 0.5 in the second. Against
    the adaptive quadrature's values (errors below 1e-10), the spread of the z-scores lies within 0.75-1.3 and
    the coverage of |z| < 1.96 above 85 %."""
    experts = [Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)),
               Normal(*(torch.tensor(v, dtype=torch.float64) for v in second))]
    pool = opinionpool.holder(experts, alpha, weights=weights)
    other = Normal(torch.tensor(1.0, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64))
    entropy, kl = pool.entropy_estimate(method="quadrature"), pool.kl_estimate(other, method="quadrature")
    assert entropy.error < 1e-10 and kl.error < 1e-10
    for reference, estimate in ((entropy.value, lambda seed: pool.entropy_estimate("importance", 20_000, seed)),
                                (kl.value, lambda seed: pool.kl_estimate(other, "importance", 20_000, seed))):
        z = np.array([(float(e.value) - float(reference)) / float(e.error) for e in map(estimate, range(80))])
        assert 0.75 < z.std() < 1.3 and np.mean(np.abs(z) < 1.96) > 0.85, (z.std(), np.mean(np.abs(z) < 1.96))


def test_float32_entropy_and_kl_state_their_rounding():
    """A float32 entropy or KL computed in float64 came back rounded to float32 with the float64 rule's error
    (1.69368827 +- 3.8e-12 for 1.69368823: 11 000 stated errors; a KL against Normal(5, 0.01) 1.5 of them, its
    float32 log-density rounding missing). The same experts in float64 (the float32 parameters cast) give the
    reference."""
    def pools(dtype):
        t = lambda *x: torch.tensor(x if len(x) > 1 else x[0], dtype=torch.float32).to(dtype)  # noqa: E731
        return [(opinionpool.holder(Normal(t(0.0, 3.0), t(1.0, 0.5)), 2.0), Normal(t(5.0), t(0.01))),
                (opinionpool.holder(Gamma(t(200.0, 300.0), t(1e-3, 1e-3)), 2.0), None)]

    # (a float32 Gamma's log-density cancels terms of thousands to about -12: the KL's rounding by other's
    # log-density is counted at the size of the cross-entropy, which such cancellation exceeds; not tested)
    (normal32, other32), (gamma32, _) = pools(torch.float32)
    (normal64, other64), (gamma64, _) = pools(torch.float64)
    for got, expected in ((normal32.entropy_estimate(), normal64.entropy_estimate()),
                          (gamma32.entropy_estimate(), gamma64.entropy_estimate()),
                          (normal32.kl_estimate(other32), normal64.kl_estimate(other64))):
        assert got.value.dtype == torch.float32
        assert abs(got.value.double() - expected.value).item() <= got.error.item(), (got, expected)


def test_log_linear_pool_has_closed_form_entropy_kl_and_mode():
    # prod_j Gamma(a_j, b_j)^(w_j) is Gamma(sum_j w_j (a_j - 1) + 1, sum_j w_j b_j)
    shapes, rates = np.array([2.0, 5.0]), np.array([1.0, 2.5])
    w = np.array(WEIGHTS)
    shape, rate = w @ (shapes - 1) + 1, w @ rates
    pool = opinionpool.holder(Gamma(torch.tensor(shapes), torch.tensor(rates)), 0, weights=WEIGHTS)
    assert float(pool.mode) == pytest.approx((shape - 1) / rate, rel=1e-12)
    assert float(pool.entropy()) == pytest.approx(stats.gamma(shape, scale=1 / rate).entropy(), rel=1e-12)
    q = Gamma(torch.tensor(3.0), torch.tensor(1.5))
    kl = integrate.quad(lambda z: stats.gamma(shape, scale=1 / rate).pdf(z) * (
        stats.gamma(shape, scale=1 / rate).logpdf(z) - stats.gamma(3, scale=1 / 1.5).logpdf(z)), 0, np.inf)[0]
    assert float(kl_divergence(pool, q)) == pytest.approx(kl, rel=1e-9)
    with pytest.raises(NotImplementedError, match="mode"):
        _ = opinionpool.holder(Gamma(torch.tensor(shapes), torch.tensor(rates)), 0.5).mode


def test_kl_divergence_between_custom_family_members_reaches_the_bregman_form():
    family = CustomFamily(log_normalizer=lambda eta: -torch.log(-eta[..., 0]),
                          sufficient_statistic=lambda z: z.unsqueeze(-1),
                          log_base_measure=lambda z: torch.zeros_like(z), num_params=1,
                          natural_domain=lambda eta: eta[..., 0] < 0, name="user Exponential")
    p, q = family.expert(torch.tensor([-0.5])), family.expert(torch.tensor([-2.0]))
    torch.testing.assert_close(kl_divergence(p, q), kl_divergence(Exponential(0.5), Exponential(2.0)))


@pytest.mark.parametrize("batch, expanded", [((), (3,)), ((2,), (4, 2))])
def test_a_differentiable_numerical_pool_expands_after_its_summary(batch, expanded):
    """expand() grew the summary's nodes (P,) + batch + rest by expanding on the left, which cannot add axes after
    P: a pool with gradients whose summary was computed (its nodes kept for the backward pass) raised."""
    loc = (torch.tensor([0.0, 2.0]) + torch.zeros(batch + (1,))).requires_grad_()
    pool = opinionpool.holder(Normal(loc, torch.tensor([1.0, 0.5])), alpha=2.0)
    mean = pool.mean
    copies = torch.Size(expanded).numel() // torch.Size(batch).numel()
    by_hand = copies * torch.autograd.grad(mean.sum(), loc, retain_graph=True)[0]
    grown = pool.expand(expanded)
    assert grown.batch_shape == expanded
    torch.testing.assert_close(grown.mean, mean.expand(expanded))
    torch.testing.assert_close(grown.variance, pool.variance.expand(expanded))
    grown.mean.sum().backward()
    torch.testing.assert_close(loc.grad, by_hand)


def test_rsample_is_reparameterised_within_components():
    loc = torch.tensor([0.0, 2.0], requires_grad=True)
    scale = torch.tensor([1.0, 0.5])
    # alpha = 0: one Normal with precision-weighted mean, so d E[z] / d loc_j = w_j tau_j / sum_k w_k tau_k
    pool = opinionpool.holder(Normal(loc, scale), 0, weights=WEIGHTS)
    assert pool.has_rsample
    z = pool.rsample((20_000,))
    z.mean().backward()
    tau = np.array(WEIGHTS) / scale.numpy() ** 2
    torch.testing.assert_close(loc.grad, torch.tensor(tau / tau.sum()), rtol=1e-10, atol=1e-12)
    mixture = opinionpool.holder(Normal(loc, scale), 0.5, weights=WEIGHTS)
    # but not the gradient of an expectation: the path through the component weights, which depend on loc, is
    # missing (torch's MixtureSameFamily has no rsample for that reason), so a call with a gradient warns
    with pytest.warns(UserWarning, match=r"alpha=0.5 pool, a mixture of 3 components.*biased"):
        samples = mixture.rsample((3,))
    assert samples.shape == (3,) and samples.requires_grad
    assert not mixture.has_rsample
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mixture.rsample((0,)).shape == (0,) == mixture.sample((0,)).shape
        # no gradient, no bias to warn of: under no_grad, or with experts that need none, or at alpha = 0
        with torch.no_grad():
            mixture.rsample((2,))
        opinionpool.holder(Normal(loc.detach(), scale), 0.5, weights=WEIGHTS).rsample((2,))
        # weights requiring grad: the components do not depend on them, nor do the samples
        weights = torch.tensor(WEIGHTS, requires_grad=True)
        assert not opinionpool.holder(Normal(loc.detach(), scale), 0.5, weights=weights).rsample((2,)).requires_grad
        pool.rsample((2,))
    numerical = opinionpool.holder(Normal(loc, scale), 2.0)
    assert not numerical.has_rsample
    with pytest.raises(NotImplementedError, match=r"alpha=2.0 .*no reparameterised sampler.*sample\(\)"):
        numerical.rsample((3,))


@pytest.mark.parametrize("separation", [0.7, 40.0])
def test_gaussian_mixture_moments_entropy_bounds_and_torch_distribution(separation):
    from opinionpool.functional import GaussianMixture

    w, loc, sd = np.array([0.2, 0.5, 0.3]), np.array([0.0, separation, -1.5 * separation]), np.array([1.0, 0.4, 2.0])
    mixture = GaussianMixture(torch.tensor(np.log(w)), torch.tensor(loc)[:, None], torch.tensor(2 * np.log(sd))[:, None])
    mean = w @ loc
    torch.testing.assert_close(mixture.mean, torch.tensor([mean]))
    torch.testing.assert_close(mixture.variance, torch.tensor([w @ (sd**2 + loc**2) - mean**2]))

    def log_density(z):
        return float(special.logsumexp(np.log(w) + stats.norm(loc, sd).logpdf(z)))

    dist = mixture.to_distribution()
    assert dist.event_shape == (1,) and dist.batch_shape == ()
    z = torch.tensor([[-1.0], [0.3], [separation]])
    torch.testing.assert_close(dist.log_prob(z), torch.tensor([log_density(float(x)) for x in z]))
    edges = sorted(set(loc.tolist()))
    pieces = [-np.inf] + edges + [np.inf]
    entropy = sum(integrate.quad(lambda x: -math.exp(log_density(x)) * log_density(x), a, b, limit=200)[0]
                  for a, b in zip(pieces[:-1], pieces[1:]))
    lower, upper = mixture.entropy_bounds()
    assert float(lower) <= entropy <= float(upper)
    if separation > 10:  # far-apart components: H = sum_k w_k H_k + H(w), the upper bound
        assert float(upper) == pytest.approx(w @ stats.norm(0, sd).entropy() - w @ np.log(w), rel=1e-12)
        assert entropy == pytest.approx(float(upper), abs=1e-8)


@pytest.mark.parametrize("separation", [0.7, 40.0])
def test_gaussian_mixture_kl_upper_bound_against_quadrature_and_the_textbook_kl(separation):
    from opinionpool.functional import GaussianMixture

    w, loc, sd = np.array([0.2, 0.5, 0.3]), np.array([0.0, separation, -1.5 * separation]), np.array([1.0, 0.4, 2.0])
    mixture = GaussianMixture(torch.tensor(np.log(w)), torch.tensor(loc)[:, None], torch.tensor(2 * np.log(sd))[:, None])
    q_loc, q_sd = np.array([0.3, separation, 5.0]), np.array([0.8, 0.4, 3.0])  # the second is component 1 itself
    got = mixture.kl_upper_bound(torch.tensor(q_loc)[:, None], torch.tensor(2 * np.log(q_sd))[:, None])
    assert got.shape == (3,)
    exact = []
    for i in range(3):
        textbook = np.log(sd / q_sd[i]) + (q_sd[i] ** 2 + (q_loc[i] - loc) ** 2) / (2 * sd**2) - 0.5
        assert float(got[i]) == pytest.approx(w @ textbook, rel=1e-12)
        q = stats.norm(q_loc[i], q_sd[i])
        exact.append(integrate.quad(lambda z, q=q: q.pdf(z) * (q.logpdf(z) - special.logsumexp(np.log(w) + stats.norm(
            loc, sd).logpdf(z))), q_loc[i] - 12 * q_sd[i], q_loc[i] + 12 * q_sd[i], limit=200, points=[q_loc[i]])[0])
        assert exact[i] <= float(got[i]) + 1e-9
    if separation > 10:  # q = component 1, far from the others: the KL is -log w_1, the bound grows with distance
        assert exact[1] == pytest.approx(-math.log(w[1]), rel=1e-6) and float(got[1]) > 100
    # a component of weight zero adds nothing, however far away (its KL alone would overflow to inf) or undefined,
    # to the bound or to its gradients
    q_loc_t = torch.tensor(q_loc)[:, None].requires_grad_()
    got = mixture.kl_upper_bound(q_loc_t, torch.tensor(2 * np.log(q_sd))[:, None])
    (grad,) = torch.autograd.grad(got.sum(), q_loc_t)
    for far, far_logvar in ((1e300, -700.0), (float("nan"), float("nan"))):
        padded_loc = torch.tensor([*loc, far])[:, None].requires_grad_()
        padded_logvar = torch.tensor([*(2 * np.log(sd)), far_logvar])[:, None].requires_grad_()
        padded = GaussianMixture(torch.tensor([*np.log(w), -np.inf]), padded_loc, padded_logvar)
        bound = padded.kl_upper_bound(q_loc_t, torch.tensor(2 * np.log(q_sd))[:, None])
        torch.testing.assert_close(bound, got)
        padded_grads = torch.autograd.grad(bound.sum(), (q_loc_t, padded_loc, padded_logvar))
        torch.testing.assert_close(padded_grads[0], grad)
        assert (padded_grads[1][-1] == 0).all() and (padded_grads[2][-1] == 0).all()
        assert all(torch.isfinite(g).all() for g in padded_grads)
    # a single component: the bound is the KL itself
    single = GaussianMixture(torch.zeros(1, dtype=torch.float64), torch.tensor([[loc[2]]]),
                             torch.tensor([[2 * np.log(sd[2])]]))
    assert float(single.kl_upper_bound(torch.tensor([q_loc[0]]), torch.tensor([2 * np.log(q_sd[0])]))) == pytest.approx(
        float(np.log(sd[2] / q_sd[0]) + (q_sd[0] ** 2 + (q_loc[0] - loc[2]) ** 2) / (2 * sd[2] ** 2) - 0.5), rel=1e-12)


@pytest.mark.parametrize("expert_level, query_level", [(90.0, 90.0), (0.0, -90.0), (0.0, 0.0)])
def test_gaussian_mixture_kl_upper_bound_ignores_weight_zero_components_whatever_the_query(expert_level,
                                                                                          query_level):
    """A masked expert's component has weight zero: a query far from it or from N(0, I) (log-variances of +-90 in
    float32, where exp(90) overflows) gets the bound and gradients of the mixture without it."""
    import opinionpool.functional as opf

    f32 = torch.float32
    mu = torch.tensor([[0.5, -1.0], [2.0, 0.3], [0.0, 0.0]], dtype=f32)[:, None]  # (M = 3, B = 1, D = 2)
    logvar = torch.full((3, 1, 2), expert_level, dtype=f32)
    query_loc = torch.tensor([[1.0, 2.0]], dtype=f32, requires_grad=True)
    query_logvar = torch.full((1, 2), query_level, dtype=f32, requires_grad=True)
    masked = opf.moe(mu, logvar, mask=torch.tensor([[True], [True], [False]])).kl_upper_bound(query_loc, query_logvar)
    masked_grads = torch.autograd.grad(masked.sum(), (query_loc, query_logvar))
    two = opf.moe(mu[:2], logvar[:2]).kl_upper_bound(query_loc, query_logvar)
    assert torch.isfinite(two).all()
    torch.testing.assert_close(masked, two)
    for got, expected in zip(masked_grads, torch.autograd.grad(two.sum(), (query_loc, query_logvar))):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected)


def test_exact_order_past_max_components_warns_with_the_count():
    experts = Normal(torch.tensor([0.0, 1.0, 3.0]), torch.tensor([1.0, 0.5, 2.0]))
    with pytest.warns(UserWarning, match="5151 mixture components"):  # binom(100 + 2, 2)
        pool = opinionpool.holder(experts, 1 / 100, max_components=10)
    assert isinstance(pool, opinionpool.NumericalHolderPool)


def test_torch_conventions_a_user_relies_on():
    """A pickled numerical pool whose estimate was computed failed on every method (an identity test of alpha,
    which pickling breaks); unbounded supports were intervals with infinite ends (transform_to gave NaN, inf);
    the alpha = 0 closed-form KL refused an other of another dtype; the estimated KL and entropy carried no gradient
    without a word."""
    import pickle

    from torch.distributions import transform_to

    f64 = torch.float64
    pool = opinionpool.holder(Normal(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0])), 0.7)
    value = pool.log_prob(torch.tensor(0.3))
    assert torch.equal(pickle.loads(pickle.dumps(pool)).log_prob(torch.tensor(0.3)), value)
    normal = opinionpool.holder(Normal(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0])), 0.5)
    gamma = opinionpool.holder(Gamma(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 2.0])), 0.5)
    point = torch.tensor([-2.0, 0.0, 3.0])
    assert torch.equal(transform_to(normal.support)(point), point)
    torch.testing.assert_close(transform_to(gamma.support)(point), point.exp())
    assert gamma.support.check(torch.tensor(0.0)) and not gamma.support.check(torch.tensor(-1e-30))
    # the closed form in the wider dtype, against torch's KL of the pool's one member
    product = opinionpool.holder(Normal(torch.tensor([0.0, 1.0], dtype=f64), torch.tensor([1.0, 2.0], dtype=f64)), 0.0)
    other = Normal(torch.tensor(0.5), torch.tensor(1.5))
    member = Normal(product.mean, product.stddev)
    expected = kl_divergence(member, Normal(torch.tensor(0.5, dtype=f64), torch.tensor(1.5, dtype=f64)))
    torch.testing.assert_close(kl_divergence(product, other), expected)
    loc = torch.tensor([0.0, 1.0], dtype=f64, requires_grad=True)
    pooled = opinionpool.holder(Normal(loc, torch.tensor([1.0, 2.0], dtype=f64)), 0.5)
    prior = Normal(torch.tensor(0.0, dtype=f64), torch.tensor(1.0, dtype=f64))
    with torch.no_grad():  # no gradient wanted: none
        assert not kl_divergence(pooled, prior).requires_grad and not pooled.entropy().requires_grad


def _central_difference(function, at, step=1e-5):
    """Central differences of the scalar ``function`` at every entry of ``at``."""
    grad = torch.zeros_like(at)
    for index in range(at.numel()):
        shift = torch.zeros(at.numel(), dtype=at.dtype)
        shift[index] = step
        shift = shift.reshape(at.shape)
        grad.view(-1)[index] = (function(at + shift) - function(at - shift)) / (2 * step)
    return grad


@pytest.mark.parametrize("alpha", [0.5, 2.0, -1.0])
def test_entropy_and_kl_of_estimated_pools_carry_their_gradients(alpha):
    """entropy() and kl_divergence(pool, other) of pools without a closed form were detached (with a warning): a
    loss adding them got no gradient. They now carry the gradient of the estimate over the engine's weighted points,
    Cov_pool(log u - log r, grad log u) - E_pool[grad log r]: against central differences of the estimates (adaptive
    quadrature to 1e-11, exact sums, the grid), to the experts' parameters, the weights and other's parameters."""
    f64 = torch.float64
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=f64)
    scale = torch.tensor([1.0, 0.5, 2.0], dtype=f64)
    other = Normal(torch.tensor(0.3, dtype=f64), torch.tensor(1.7, dtype=f64))
    cases = {
        "normal loc": (lambda x: opinionpool.holder(Normal(x, scale), alpha, weights=weights),
                       torch.tensor([0.0, 2.0, -1.0], dtype=f64)),
        "normal weights": (lambda x: opinionpool.holder(Normal(torch.tensor([0.0, 2.0, -1.0], dtype=f64), scale),
                                                        alpha, weights=x), weights),
        # a shape below 1: the quadrature's end panel stands for points nearer 0 than its nodes
        "gamma shape": (lambda x: opinionpool.holder(Gamma(x, torch.tensor([1.0, 2.0, 0.5], dtype=f64)), alpha,
                                                     weights=weights), torch.tensor([0.7, 3.0, 2.0], dtype=f64)),
        "poisson rate": (lambda x: opinionpool.holder(Poisson(x), alpha, weights=weights),
                         torch.tensor([1.0, 4.0, 9.0], dtype=f64)),
    }
    for name, (make, at) in cases.items():
        x = at.clone().requires_grad_(True)
        pool = make(x)
        (entropy,) = torch.autograd.grad(pool.entropy(), x)
        want = _central_difference(lambda p, make=make: make(p).entropy_estimate().value, at)
        torch.testing.assert_close(entropy, want, rtol=0, atol=1e-8, msg=name)
        assert entropy.abs().max() > 1e-3
        if name.startswith("normal"):
            (kl,) = torch.autograd.grad(kl_divergence(make(x), other), x)
            want = _central_difference(lambda p, make=make: make(p).kl_estimate(other).value, at)
            torch.testing.assert_close(kl, want, rtol=0, atol=1e-8, msg=name)
    # float32 experts and other: other at the float64 nodes (rounded to float32, nodes next to 0 landed on it, where
    # a Gamma of shape 2 has log-density -inf: a NaN gradient), through its float64 copy
    shape = torch.tensor([1.0, 4.0])
    grads = []
    for dtype in (torch.float32, f64):
        x = shape.to(dtype).requires_grad_(True)
        pool = opinionpool.holder(Gamma(x, torch.ones(2, dtype=dtype)), alpha)
        target = Gamma(torch.tensor(2.0, dtype=dtype), torch.tensor(1.0, dtype=dtype))
        grads.append(torch.autograd.grad(kl_divergence(pool, target), x)[0])
    assert grads[0].dtype == torch.float32
    torch.testing.assert_close(grads[0].double(), grads[1], rtol=1e-5, atol=1e-6)
    # other's parameters: -E_pool[d log r / d m] = (m - E z) / s^2
    m = torch.tensor(0.3, dtype=f64, requires_grad=True)
    pool = cases["normal loc"][0](torch.tensor([0.0, 2.0, -1.0], dtype=f64))
    (grad_m,) = torch.autograd.grad(kl_divergence(pool, Normal(m, torch.tensor(1.7, dtype=f64))), m)
    assert float(grad_m) == pytest.approx(float((0.3 - pool.mean) / 1.7**2), rel=1e-9, abs=0)


def test_entropy_gradient_of_a_grid_and_an_importance_sampled_pool():
    """The grid's weighted points (Gaussians in two dimensions) give the exact gradient of its estimate; importance
    samples (Dirichlet experts) the self-normalised one, against central differences of the pool's entropy on a
    dense grid of the simplex (integrated here)."""
    from scipy import special
    from torch.distributions import Dirichlet, MultivariateNormal

    f64 = torch.float64
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=f64)
    cov = torch.tensor([[[1.0, 0.3], [0.3, 1.0]], [[0.5, 0.0], [0.0, 2.0]], [[2.0, -0.5], [-0.5, 1.0]]], dtype=f64)
    loc = torch.tensor([[0.0, 0.0], [1.0, 2.0], [-1.0, 0.5]], dtype=f64)

    def gaussian(x):
        return opinionpool.holder(MultivariateNormal(x, cov), 2.0, weights=weights)

    x = loc.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gaussian(x).entropy(), x)
    torch.testing.assert_close(grad, _central_difference(lambda p: gaussian(p).entropy_estimate().value, loc),
                               rtol=0, atol=1e-8)
    concentration = torch.tensor([[2.0, 3.0, 4.0], [5.0, 2.0, 2.0], [3.0, 3.0, 3.0]], dtype=f64)
    x = concentration.clone().requires_grad_(True)
    pool = opinionpool.holder(Dirichlet(x), 2.0, weights=weights)
    assert isinstance(pool, opinionpool.NumericalHolderPool) and pool.summary.method == "importance"
    (grad,) = torch.autograd.grad(pool.entropy(), x)
    size = 1000
    cell = (np.arange(size) + 0.5) / size
    first, second = np.meshgrid(cell, cell, indexing="ij")
    inside = first + second < 1
    points = np.stack([first[inside], second[inside], 1 - first[inside] - second[inside]], -1)

    def grid_entropy(c):
        c = c.numpy()
        log_b = special.gammaln(c.sum(1)) - special.gammaln(c).sum(1)
        log_q = log_b + ((c - 1) * np.log(points[:, None, :])).sum(-1)
        log_u = 0.5 * special.logsumexp(2 * log_q, b=weights.numpy(), axis=1)
        u = np.exp(log_u)
        return np.log(u.sum() / size**2) - (u * log_u).sum() / u.sum()

    want = _central_difference(grid_entropy, concentration, step=1e-4)
    # 1e5 self-normalised samples: about 1e-3 here (a 1 % relative bias would be 1e-3 too, at the largest entry)
    torch.testing.assert_close(grad, want, rtol=0, atol=5e-3)
    assert grad.abs().max() > 0.05


def test_gradients_of_estimated_kl_and_entropy_at_their_edges():
    """(a review helper) other's parameters inside a distribution it is built from (a LogNormal's base_dist) got no
    gradient where the pool needed none; one infinite KL in a batch took the gradient from every element; second
    derivatives (create_graph=True) missed every term through the pool's masses: an entropy's Hessian entry 1.40 for
    -0.031. Against central differences."""
    from torch.distributions import LogNormal, Uniform

    f64 = torch.float64
    pool = opinionpool.holder(Gamma(torch.tensor([1.5, 3.0, 2.0], dtype=f64), torch.tensor([1.0, 2.0, 0.5], dtype=f64)),
                              2.0, weights=torch.tensor([0.2, 0.5, 0.3], dtype=f64))
    m = torch.tensor(0.7, dtype=f64, requires_grad=True)
    (grad,) = torch.autograd.grad(kl_divergence(pool, LogNormal(m, torch.tensor(1.0, dtype=f64))), m)
    want = _central_difference(lambda x: pool.kl_estimate(LogNormal(x, torch.tensor(1.0, dtype=f64))).value,
                               m.detach())
    assert grad.item() == pytest.approx(want.item(), rel=1e-7)
    shapes = torch.tensor([[1.5, 3.0], [2.0, 2.5]], dtype=f64, requires_grad=True)
    rates = torch.tensor([1.0, 2.0], dtype=f64)
    uniform = Uniform(torch.tensor([0.0, 0.0], dtype=f64), torch.tensor([1e3, 5.0], dtype=f64))
    kl = kl_divergence(opinionpool.holder(Gamma(shapes, rates), 2.0), uniform)
    assert math.isfinite(kl[0].item()) and kl[1].item() == math.inf
    (grad,) = torch.autograd.grad(kl[0], shapes, retain_graph=True)
    (alone,) = torch.autograd.grad(kl_divergence(opinionpool.holder(Gamma(shapes[0], rates), 2.0),
                                                 Uniform(torch.tensor(0.0, dtype=f64), torch.tensor(1e3, dtype=f64))),
                                   shapes)
    torch.testing.assert_close(grad, alone, rtol=1e-12, atol=0)
    assert grad[0].abs().min() > 0 and bool(torch.isnan(torch.autograd.grad(kl[1], shapes)[0][1]).all())
    scale = torch.tensor([1.0, 0.5, 2.0], dtype=f64)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=f64)
    target = Normal(torch.tensor(0.3, dtype=f64), torch.tensor(1.7, dtype=f64))
    loc = torch.tensor([0.0, 2.0, -1.0], dtype=f64)
    for what in ("entropy", "kl"):
        def first(at, what=what):
            at = at.clone().requires_grad_(True)
            pool = opinionpool.holder(Normal(at, scale), 2.0, weights=weights)
            value = pool.entropy() if what == "entropy" else kl_divergence(pool, target)
            return torch.autograd.grad(value, at, create_graph=True)[0]

        x = loc.clone().requires_grad_(True)
        pool = opinionpool.holder(Normal(x, scale), 2.0, weights=weights)
        value = pool.entropy() if what == "entropy" else kl_divergence(pool, target)
        (gradient,) = torch.autograd.grad(value, x, create_graph=True)
        hessian = torch.stack([torch.autograd.grad(gradient[i], x, retain_graph=True)[0] for i in range(3)])
        central = torch.stack([(first(loc + 1e-5 * e) - first(loc - 1e-5 * e)) / 2e-5 for e in torch.eye(3, dtype=f64)])
        torch.testing.assert_close(hessian, central.detach(), rtol=0, atol=1e-6, msg=what)
        # and of the normaliser, through the same masses
        log_z = lambda at: opinionpool.holder(Normal(at, scale), 2.0, weights=weights).log_normalizer  # noqa: E731
        torch.testing.assert_close(torch.autograd.functional.hessian(log_z, loc),
                                   _central_difference_jacobian(log_z, loc), rtol=0, atol=1e-6)


def _central_difference_jacobian(function, at, step=1e-5):
    """Central differences of the gradient of the scalar ``function``."""
    def gradient(point):
        point = point.clone().requires_grad_(True)
        return torch.autograd.grad(function(point), point)[0]

    return torch.stack([(gradient(at + step * e) - gradient(at - step * e)) / (2 * step)
                        for e in torch.eye(at.numel(), dtype=at.dtype)])
