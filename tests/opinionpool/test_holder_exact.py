"""Exact Hölder pools against independent quadrature / exact sums (float64, asymmetric weights)."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch.distributions import (
    Bernoulli,
    Beta,
    Binomial,
    Categorical,
    Exponential,
    Gamma,
    Independent,
    Normal,
    Poisson,
    VonMises,
)

import opinionpool
from validation.reference import power_mean, quad_moments, sum_moments

WEIGHTS = [0.2, 0.3, 0.5]
ALPHAS = [0, 1 / 4, 1 / 3, 1 / 2, 1]
RTOL = 1e-9

# name: (torch experts, scipy pdfs, integration bounds, sufficient statistic T(z) as numpy columns)
CONTINUOUS = {
    "Normal": (
        lambda: [Normal(torch.tensor(0.0), torch.tensor(1.0)), Normal(torch.tensor(2.0), torch.tensor(0.5)),
                 Normal(torch.tensor(-1.0), torch.tensor(2.0))],
        [stats.norm(0, 1).pdf, stats.norm(2, 0.5).pdf, stats.norm(-1, 2).pdf],
        (-40, 40), lambda z: [z, z * z],
    ),
    "Exponential": (
        lambda: [Exponential(torch.tensor(r)) for r in (0.5, 2.0, 1.3)],
        [stats.expon(scale=1 / r).pdf for r in (0.5, 2.0, 1.3)],
        (0, np.inf), lambda z: [z],
    ),
    "Gamma": (
        lambda: [Gamma(torch.tensor(a), torch.tensor(b)) for a, b in ((2.0, 1.0), (3.5, 2.0), (1.5, 0.7))],
        [stats.gamma(a, scale=1 / b).pdf for a, b in ((2.0, 1.0), (3.5, 2.0), (1.5, 0.7))],
        (0, np.inf), lambda z: [np.log(z), z],
    ),
    "Beta": (
        lambda: [Beta(torch.tensor(a), torch.tensor(b)) for a, b in ((2.0, 3.0), (5.0, 1.5), (1.5, 1.5))],
        [stats.beta(a, b).pdf for a, b in ((2.0, 3.0), (5.0, 1.5), (1.5, 1.5))],
        (0, 1), lambda z: [np.log(z), np.log1p(-z)],
    ),
}


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("name", list(CONTINUOUS))
def test_continuous_pool_matches_quadrature(name, alpha):
    experts, pdfs, (lo, hi), _ = CONTINUOUS[name]
    pool = opinionpool.holder(experts(), alpha=alpha, weights=WEIGHTS)
    log_z, mean, var = quad_moments(pdfs, WEIGHTS, alpha, lo, hi)
    assert pool.log_normalizer.item() == pytest.approx(log_z, rel=RTOL, abs=1e-12)
    assert pool.mean.item() == pytest.approx(mean, rel=RTOL)
    assert pool.variance.item() == pytest.approx(var, rel=RTOL)


@pytest.mark.parametrize("alpha", [0, 1 / 3, 1 / 2, 1])
@pytest.mark.parametrize("name", ["Exponential", "Gamma", "Beta"])
def test_moment_match_matches_expected_statistics(name, alpha):
    """The M-projection has the pool's E[T(z)], each side integrated independently."""
    experts, pdfs, (lo, hi), statistic = CONTINUOUS[name]
    pool = opinionpool.holder(experts(), alpha=alpha, weights=WEIGHTS)
    matched = pool.moment_match()
    assert type(matched) is type(experts()[0])
    log_z = pool.log_normalizer.item()

    def pooled(z):
        return float(power_mean(np.array([f(z) for f in pdfs]), WEIGHTS, alpha)) / math.exp(log_z)

    def matched_pdf(z):
        return math.exp(matched.log_prob(torch.tensor(z)).item())

    for i in range(len(statistic(1.0))):
        want = integrate.quad(lambda z, i=i: statistic(z)[i] * pooled(z), lo, hi, limit=400, epsrel=1e-12)[0]
        got = integrate.quad(lambda z, i=i: statistic(z)[i] * matched_pdf(z), lo, hi, limit=400, epsrel=1e-12)[0]
        assert got == pytest.approx(want, rel=1e-8, abs=1e-10)


@pytest.mark.parametrize("alpha", [0, 1 / 3, 1 / 2, 1])
def test_normal_moment_match_is_mean_and_variance(alpha):
    experts, pdfs, (lo, hi), _ = CONTINUOUS["Normal"]
    matched = opinionpool.holder(experts(), alpha=alpha, weights=WEIGHTS).moment_match()
    _, mean, var = quad_moments(pdfs, WEIGHTS, alpha, lo, hi)
    assert isinstance(matched, Normal)
    assert matched.mean.item() == pytest.approx(mean, rel=RTOL)
    assert matched.variance.item() == pytest.approx(var, rel=RTOL)


@pytest.mark.parametrize("event", ["scalar", "diagonal"])
def test_gaussian_half_pool_moments_build_no_components(event, monkeypatch):
    """At alpha = 1/2 the moments of Normal and diagonal Normal experts come from the pairwise autograd function
    (as in ``functional.hellinger``) without building the mixture's components, and equal the moments that torch's
    ``MixtureSameFamily`` computes from those components once they are asked for (float64, asymmetric weights,
    scales from e^-4 to e^4, one expert 40 away)."""
    built = []
    components = opinionpool.pool.holder_components
    monkeypatch.setattr(opinionpool.pool, "holder_components", lambda *args: built.append(args) or components(*args))
    g = torch.Generator().manual_seed(3)
    loc = torch.randn(4, 3, 6, generator=g, dtype=torch.float64) * 3
    loc[:, 2] += 40
    scale = torch.exp(torch.empty(4, 3, 6, dtype=torch.float64).uniform_(-4, 4, generator=g))
    if event == "scalar":
        loc, scale = loc[..., 0], scale[..., 0]
    loc, scale = loc.requires_grad_(True), scale.requires_grad_(True)
    weights = torch.tensor([0.15, 0.25, 0.6], dtype=torch.float64, requires_grad=True)
    experts = Normal(loc, scale) if event == "scalar" else Independent(Normal(loc, scale), 1)
    pool = opinionpool.holder(experts, alpha=0.5, weights=weights)
    matched, diagonal, mean, variance = pool.moment_match(), pool.moment_match("diag_gaussian"), pool.mean, pool.variance
    expanded = pool.expand((2, 4))
    assert not built
    assert type(matched) is type(experts)
    mixture = pool.as_mixture()
    assert len(built) == 1
    for got in (matched, diagonal):
        torch.testing.assert_close(got.mean, mixture.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.variance, mixture.variance, rtol=1e-12, atol=0)
    torch.testing.assert_close(mean, mixture.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(variance, mixture.variance, rtol=1e-12, atol=0)
    torch.testing.assert_close(expanded.variance, variance.expand(expanded.batch_shape + expanded.event_shape))
    torch.testing.assert_close(pool.expand((2, 4)).log_normalizer, pool.log_normalizer.expand(2, 4))
    fresh = opinionpool.holder(experts, alpha=0.5, weights=weights).expand((2, 4))
    torch.testing.assert_close(fresh.mean, mean.expand(fresh.batch_shape + fresh.event_shape))
    # and the same gradients with respect to the experts and the weights
    probe = torch.linspace(-1, 1, mean.numel(), dtype=torch.float64).reshape(mean.shape)

    def gradients(mean, variance):  # the two share the weights' normalisation: keep its graph for the second
        loss = (mean * probe).sum() + (variance.log() * probe.flip(-1)).sum()
        return torch.autograd.grad(loss, (loc, scale, weights), retain_graph=True)

    for got, want in zip(gradients(mean, variance), gradients(mixture.mean, mixture.variance)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_lazily_built_pool_tensors_keep_the_autograd_mode_of_construction():
    """The Gaussian alpha = 1/2 pool builds its moments and components on first use: a first read under
    ``torch.no_grad`` or ``torch.inference_mode`` still gives later reads their gradients, as when built at once."""
    loc = torch.tensor([[0.0, 1.0], [2.0, -1.0], [0.5, 0.5]], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([[1.0, 0.5], [2.0, 1.0], [0.7, 1.3]], dtype=torch.float64, requires_grad=True)
    z = torch.tensor([0.3, -0.2], dtype=torch.float64)

    def pool():
        return opinionpool.holder(Independent(Normal(loc, scale), 1), alpha=0.5, weights=[0.2, 0.3, 0.5])

    def gradients(p):
        return torch.autograd.grad(p.log_prob(z) + p.moment_match().mean.sum(), (loc, scale))

    want = gradients(pool())
    for mode in (torch.no_grad, torch.inference_mode):
        late = pool()
        with mode():
            late.mean, late.log_normalizer
        for got, expected in zip(gradients(late), want):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        frozen = pool()
    assert not frozen.mean.requires_grad and not frozen.log_normalizer.requires_grad


@pytest.mark.parametrize("alpha", [0, 1 / 3, 1 / 2, 1])
def test_von_mises_pool_circular_moments(alpha):
    params = ((0.3, 2.0), (2.0, 0.5), (-1.5, 4.0))
    experts = [VonMises(torch.tensor(m), torch.tensor(k)) for m, k in params]
    pdfs = [stats.vonmises(k, loc=m).pdf for m, k in params]
    pool = opinionpool.holder(experts, alpha=alpha, weights=WEIGHTS)

    def pooled(z):
        return float(power_mean(np.array([f(z) for f in pdfs]), WEIGHTS, alpha))

    z0 = integrate.quad(pooled, -np.pi, np.pi, limit=400, epsrel=1e-12)[0]
    c = integrate.quad(lambda z: np.cos(z) * pooled(z), -np.pi, np.pi, limit=400, epsrel=1e-12)[0] / z0
    s = integrate.quad(lambda z: np.sin(z) * pooled(z), -np.pi, np.pi, limit=400, epsrel=1e-12)[0] / z0
    assert pool.log_normalizer.item() == pytest.approx(math.log(z0), rel=RTOL, abs=1e-12)
    assert pool.mean.item() == pytest.approx(math.atan2(s, c), rel=RTOL)
    assert pool.variance.item() == pytest.approx(1 - math.hypot(c, s), rel=RTOL)
    matched = pool.moment_match()  # Newton solve of I1/I0(kappa) = |E exp(iz)|
    r = torch.special.i1e(matched.concentration) / torch.special.i0e(matched.concentration)
    assert r.item() == pytest.approx(math.hypot(c, s), rel=1e-8)
    assert matched.loc.item() == pytest.approx(math.atan2(s, c), rel=1e-9)


DISCRETE = {
    "Poisson": (lambda: [Poisson(torch.tensor(r)) for r in (1.5, 4.0, 0.7)],
                [stats.poisson(r).pmf for r in (1.5, 4.0, 0.7)], np.arange(0, 200)),
    "Bernoulli": (lambda: [Bernoulli(torch.tensor(p)) for p in (0.2, 0.7, 0.9)],
                  [stats.bernoulli(p).pmf for p in (0.2, 0.7, 0.9)], np.arange(0, 2)),
    "Binomial": (lambda: [Binomial(7, torch.tensor(p)) for p in (0.2, 0.5, 0.9)],
                 [stats.binom(7, p).pmf for p in (0.2, 0.5, 0.9)], np.arange(0, 8)),
}


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("name", list(DISCRETE))
def test_discrete_pool_matches_exact_sums(name, alpha):
    experts, pmfs, support = DISCRETE[name]
    pool = opinionpool.holder(experts(), alpha=alpha, weights=WEIGHTS)
    log_z, mean, var, probs = sum_moments(pmfs, WEIGHTS, alpha, support)
    assert pool.log_normalizer.item() == pytest.approx(log_z, rel=RTOL, abs=1e-12)
    assert pool.mean.item() == pytest.approx(mean, rel=RTOL)
    assert pool.variance.item() == pytest.approx(var, rel=RTOL)
    pooled_pmf = pool.log_prob(torch.as_tensor(support, dtype=torch.float64)).exp().numpy()
    # relative in the tail too, as far as scipy's pmfs keep their digits (that of rate 0.7 is subnormal from k = 160)
    held = probs > 1e-200
    np.testing.assert_allclose(pooled_pmf[held], probs[held], rtol=1e-9, atol=0)
    assert (pooled_pmf[~held] <= 1e-190).all()
    matched = pool.moment_match()
    assert matched.mean.item() == pytest.approx(mean, rel=1e-9)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_categorical_pool_probabilities(alpha):
    probs = np.array([[0.1, 0.2, 0.3, 0.4], [0.6, 0.1, 0.1, 0.2], [0.05, 0.05, 0.7, 0.2]])
    experts = [Categorical(torch.tensor(p)) for p in probs]
    pool = opinionpool.holder(experts, alpha=alpha, weights=WEIGHTS)
    pooled = power_mean(probs, WEIGHTS, alpha)
    assert pool.log_normalizer.item() == pytest.approx(math.log(pooled.sum()), rel=RTOL, abs=1e-12)
    matched = pool.moment_match()  # a mixture of categoricals is a categorical: exact
    np.testing.assert_allclose(matched.probs.numpy(), pooled / pooled.sum(), rtol=1e-10)
    with pytest.raises(ValueError, match="no numeric mean"):
        pool.mean


def test_log_prob_integrates_to_one_and_matches_mixture_form():
    experts, _, (lo, hi), _ = CONTINUOUS["Gamma"]
    pool = opinionpool.holder(experts(), alpha=1 / 3, weights=WEIGHTS)
    total = integrate.quad(lambda z: math.exp(pool.log_prob(torch.tensor(z)).item()), lo, hi, limit=400)[0]
    assert total == pytest.approx(1.0, rel=1e-9)
    z = torch.linspace(0.05, 8, 50)
    torch.testing.assert_close(pool.log_prob(z), pool.as_mixture().log_prob(z), rtol=1e-10, atol=1e-12)


def test_samples_follow_the_pool_density():
    """Samples from the mixture form against the CDF integrated from the experts' power mean."""
    experts, pdfs, (lo, hi), _ = CONTINUOUS["Normal"]
    pool = opinionpool.holder(experts(), alpha=1 / 2, weights=WEIGHTS)
    torch.manual_seed(11)
    samples = pool.sample((20000,)).numpy()
    log_z = pool.log_normalizer.item()

    def cdf(x):
        return integrate.quad(lambda z: float(power_mean(np.array([f(z) for f in pdfs]), WEIGHTS, 0.5)),
                              lo, x, limit=200)[0] / math.exp(log_z)

    grid = np.linspace(-8, 8, 161)
    table = np.array([cdf(x) for x in grid])
    result = stats.kstest(samples, lambda x: np.interp(x, grid, table))
    assert result.pvalue > 1e-3
    # Monte Carlo mean within 4 standard errors of the closed form
    standard_error = samples.std() / math.sqrt(samples.size)
    assert abs(samples.mean() - pool.mean.item()) < 4 * standard_error
