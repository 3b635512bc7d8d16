"""Multivariate experts (diagonal and full Gaussians, Dirichlet) against dense grids / quadrature."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch.distributions import Dirichlet, Independent, MultivariateNormal, Normal

import opinionpool
from validation.reference import power_mean

WEIGHTS = np.array([0.2, 0.3, 0.5])
GRID = np.linspace(-12, 12, 1201)
STEP = GRID[1] - GRID[0]


def grid_moments(pdfs, alpha):
    """log Z, mean and covariance of a 2-D pool by the trapezoid rule on a wide uniform grid
    (spectrally accurate for smooth, rapidly decaying integrands)."""
    x, y = np.meshgrid(GRID, GRID, indexing="ij")
    points = np.stack([x.ravel(), y.ravel()], -1)
    q = power_mean(np.array([f(points) for f in pdfs]), WEIGHTS, alpha)
    z0 = q.sum() * STEP**2
    mean = (points * q[:, None]).sum(0) * STEP**2 / z0
    dev = points - mean
    cov = (dev[:, :, None] * dev[:, None, :] * q[:, None, None]).sum(0) * STEP**2 / z0
    return math.log(z0), mean, cov


def diag_experts():
    mu = torch.tensor([[0.0, 0.0], [1.0, 0.2], [4.0, 0.0]])
    var = torch.tensor([[0.5, 0.7], [0.6, 0.3], [0.2, 0.9]])
    return Independent(Normal(mu, var.sqrt()), 1), mu.numpy(), var.numpy()


@pytest.mark.parametrize("alpha", [0, 1 / 3, 1 / 2, 1])
def test_diagonal_gaussian_pool_against_grid(alpha):
    experts, mu, var = diag_experts()
    pdfs = [stats.multivariate_normal(mu[j], np.diag(var[j])).pdf for j in range(3)]
    log_z, mean, cov = grid_moments(pdfs, alpha)
    pool = opinionpool.holder(experts, alpha=alpha, weights=WEIGHTS.tolist())
    assert pool.log_normalizer.item() == pytest.approx(log_z, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(pool.mean.numpy(), mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(pool.covariance_matrix.numpy(), cov, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(pool.variance.numpy(), np.diag(cov), rtol=1e-9)
    matched = pool.moment_match()
    assert isinstance(matched, Independent)
    np.testing.assert_allclose(matched.variance.numpy(), np.diag(cov), rtol=1e-9)
    full = pool.moment_match("gaussian")
    np.testing.assert_allclose(full.covariance_matrix.numpy(), cov, rtol=1e-9, atol=1e-12)
    if alpha == 0.5:
        # the exact alpha=1/2 pool correlates the two coordinates although each expert is diagonal
        assert abs(cov[0, 1]) > 1e-3


def random_spd(generator, d):
    a = torch.randn(d, d, generator=generator)
    return a @ a.T / d + 0.3 * torch.eye(d)


@pytest.mark.parametrize("alpha", [0, 1 / 3, 1 / 2, 1])
def test_full_gaussian_pool_against_grid(alpha):
    g = torch.Generator().manual_seed(3)
    locs = torch.tensor([[0.0, 0.5], [1.5, -0.4], [-1.0, 2.0]])
    covs = torch.stack([random_spd(g, 2) for _ in range(3)])
    experts = MultivariateNormal(locs, covariance_matrix=covs)
    pdfs = [stats.multivariate_normal(locs[j].numpy(), covs[j].numpy()).pdf for j in range(3)]
    log_z, mean, cov = grid_moments(pdfs, alpha)
    pool = opinionpool.holder(experts, alpha=alpha, weights=WEIGHTS.tolist())
    assert pool.log_normalizer.item() == pytest.approx(log_z, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(pool.mean.numpy(), mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(pool.covariance_matrix.numpy(), cov, rtol=1e-9, atol=1e-12)
    matched = pool.moment_match()
    assert isinstance(matched, MultivariateNormal)
    np.testing.assert_allclose(matched.covariance_matrix.numpy(), cov, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("alpha", [0, 1 / 2])
def test_dirichlet_pool_against_simplex_quadrature(alpha):
    conc = np.array([[2.0, 3.0, 1.5], [4.0, 1.5, 2.5], [1.5, 1.5, 5.0]])
    experts = Dirichlet(torch.tensor(conc))
    # the pooled density written out in scalar Python, as (log normaliser, exponents) per expert: the integrand runs
    # about 10^5 times per integral (scipy's frozen pdf re-validates its input on every call: minutes here; numpy
    # arrays of three entries: 4x slower than this)
    terms = [(math.lgamma(c.sum()) - sum(math.lgamma(a) for a in c), *(c - 1)) for c in conc]
    w = WEIGHTS / WEIGHTS.sum()

    def pooled(x2, x1):
        x3 = 1 - x1 - x2
        if x3 <= 0:
            return 0.0
        l1, l2, l3 = math.log(x1), math.log(x2), math.log(x3)
        log_q = [n + a1 * l1 + a2 * l2 + a3 * l3 for n, a1, a2, a3 in terms]
        if alpha == 0:
            return math.exp(sum(wj * lq for wj, lq in zip(w, log_q)))
        return sum(wj * math.exp(alpha * lq) for wj, lq in zip(w, log_q)) ** (1 / alpha)

    opts = dict(epsabs=0, epsrel=1e-11)
    z0 = integrate.dblquad(pooled, 0, 1, 0, lambda x1: 1 - x1, **opts)[0]
    m1 = integrate.dblquad(lambda x2, x1: x1 * pooled(x2, x1), 0, 1, 0, lambda x1: 1 - x1, **opts)[0] / z0
    pool = opinionpool.holder(experts, alpha=alpha, weights=WEIGHTS.tolist())
    assert pool.log_normalizer.item() == pytest.approx(math.log(z0), rel=1e-8, abs=1e-11)
    assert pool.mean[0].item() == pytest.approx(m1, rel=1e-8)
    matched = pool.moment_match()
    # the projection matches E[log x]; check it through the digamma identity independently of the library
    from scipy.special import digamma
    a = matched.concentration.numpy()
    e_log_x1 = integrate.dblquad(lambda x2, x1: math.log(x1) * pooled(x2, x1), 0, 1, 0, lambda x1: 1 - x1,
                                 **opts)[0] / z0
    assert digamma(a[0]) - digamma(a.sum()) == pytest.approx(e_log_x1, rel=1e-7)


def test_batched_experts_match_per_element_pools():
    """sample_shape + batch_shape + event_shape semantics: a batch of pools equals pools of each element."""
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(4, 3, 5, generator=g)  # batch 4, 3 experts, latent 5
    sd = torch.rand(4, 3, 5, generator=g) + 0.3
    weights = torch.tensor([0.5, 0.2, 0.3])
    pool = opinionpool.holder(Independent(Normal(mu, sd), 1), alpha=1 / 3, weights=weights)
    assert pool.batch_shape == (4,) and pool.event_shape == (5,)
    for b in range(4):
        single = opinionpool.holder([Independent(Normal(mu[b, j], sd[b, j]), 1) for j in range(3)], alpha=1 / 3,
                                    weights=weights)
        torch.testing.assert_close(pool.mean[b], single.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pool.log_normalizer[b], single.log_normalizer, rtol=1e-12, atol=1e-12)
    assert pool.sample((7,)).shape == (7, 4, 5)
    assert pool.log_prob(pool.sample((7,))).shape == (7, 4)
    # list form with broadcasting batch shapes: a (4, 5)-batched expert and an unbatched one
    listed = opinionpool.holder([Independent(Normal(mu[:, 0], sd[:, 0]), 1),
                                 Independent(Normal(torch.zeros(5), torch.ones(5)), 1)], alpha=0.5)
    assert listed.batch_shape == (4,)


def test_an_asymmetric_precision_and_an_infinite_natural_parameter_are_refused_by_name():
    """The Cholesky check reads the lower triangle only: [[1, 100], [0, 1]] passed as "symmetric positive definite"
    and the pool failed later with a NaN log-normaliser; an Exponential's natural parameter -inf (an infinite rate)
    was in its domain."""
    from opinionpool.experts import Experts
    from opinionpool.families import ExponentialDistFamily, MultivariateNormalFamily

    family = MultivariateNormalFamily(2)
    precision = torch.tensor([[[1.0, 100.0], [0.0, 1.0]], [[2.0, 0.5], [0.5, 1.0]]], dtype=torch.float64)
    params = family.join(torch.zeros(2, 2, dtype=torch.float64), precision)
    with pytest.raises(ValueError, match=r"must be symmetric positive definite; the one at index \(0,\) is not"):
        opinionpool.holder(Experts(family, params), 0.5)
    assert family.natural_domain(family.to_natural(params)).tolist() == [False, True]
    natural = torch.tensor([[-math.inf], [-2.0]], dtype=torch.float64)
    assert ExponentialDistFamily().natural_domain(natural).tolist() == [False, True]


def test_precisions_asymmetric_by_their_inversions_rounding_are_pooled():
    """The symmetry check refused inverses of covariances of condition 1e6 (asymmetric by 1e-12 of their entries in
    float64), which torch's own check accepts."""
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    covariance = basis @ torch.diag(torch.logspace(0, 6, 10, dtype=torch.float64)) @ basis.T
    precision = torch.linalg.inv(covariance)
    assert (precision - precision.T).abs().max() > 0  # the rounding this is about
    experts = MultivariateNormal(torch.zeros(2, 10, dtype=torch.float64),
                                 precision_matrix=precision.expand(2, 10, 10), validate_args=True)
    pool = opinionpool.holder(experts, 0.5)
    torch.testing.assert_close(pool.moment_match().covariance_matrix, covariance, rtol=1e-6, atol=1e-9)
