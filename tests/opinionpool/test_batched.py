"""A batch of numerical pools is integrated in one vectorised pass (no rule run pool by pool), to the same accuracy
as scipy's quadrature of each pooled density written out here; float32 experts integrate in float64 and come back
in float32."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special
from torch.distributions import Beta, Gamma, Normal

import opinionpool
from opinionpool import numerical

WEIGHTS = [0.2, 0.5, 0.3]


def scipy_pool(logpdfs, alpha, support):
    """``(log Z, mean)`` of the Hölder pool of scipy log-densities, by scipy quadrature."""
    log_w = np.log(WEIGHTS)

    def u(z):
        ell = np.array([f(z) for f in logpdfs])
        return math.exp(special.logsumexp(log_w + alpha * ell) / alpha)

    mass = integrate.quad(u, *support, limit=400, epsabs=0, epsrel=1e-12)[0]
    first = integrate.quad(lambda z: z * u(z), *support, limit=400, epsabs=0, epsrel=1e-12)[0]
    return math.log(mass), first / mass


def gamma(a, b):
    return lambda z: a * math.log(b) + (a - 1) * math.log(z) - b * z - math.lgamma(a) if z > 0 else -math.inf


def beta(a, b):
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    return lambda z: log_norm + (a - 1) * math.log(z) + (b - 1) * math.log1p(-z) if 0 < z < 1 else -math.inf


def normal(m, s):
    return lambda z: -0.5 * ((z - m) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)


def no_pool_by_pool(*args, **kwargs):
    raise AssertionError("the one-pool rule was called")


@pytest.mark.parametrize("alpha", [2.0, -1.0, 0.3])
def test_a_batch_of_gamma_pools_is_one_pass_and_matches_scipy(alpha, monkeypatch):
    g = torch.Generator().manual_seed(3)
    shape = 0.6 + 4 * torch.rand(12, 3, generator=g, dtype=torch.float64)
    rate = 0.3 + 2 * torch.rand(12, 3, generator=g, dtype=torch.float64)
    monkeypatch.setattr(numerical, "_quadrature_one", no_pool_by_pool)
    pool = opinionpool.holder(Gamma(shape, rate), alpha=alpha, weights=WEIGHTS)
    assert pool.batch_shape == (12,)
    log_z, mean = pool.log_normalizer, pool.mean
    for i in (0, 5, 11):
        logpdfs = [gamma(float(shape[i, j]), float(rate[i, j])) for j in range(3)]
        ref_log_z, ref_mean = scipy_pool(logpdfs, alpha, (0, np.inf))
        assert float(log_z[i]) == pytest.approx(ref_log_z, rel=1e-9, abs=1e-10)
        assert float(mean[i]) == pytest.approx(ref_mean, rel=1e-9)


def test_batched_beta_and_normal_pools_match_scipy(monkeypatch):
    monkeypatch.setattr(numerical, "_quadrature_one", no_pool_by_pool)
    a = torch.tensor([[0.5, 2.0, 4.0], [3.0, 1.5, 0.8]], dtype=torch.float64)
    b = torch.tensor([[2.0, 0.7, 4.0], [3.0, 5.0, 1.0]], dtype=torch.float64)
    beta_pool = opinionpool.holder(Beta(a, b), alpha=-1.0, weights=WEIGHTS)
    loc = torch.tensor([[0.0, 3.0, -2.0], [10.0, 10.5, 30.0]], dtype=torch.float64)
    scale = torch.tensor([[1.0, 0.3, 2.0], [0.1, 1.0, 5.0]], dtype=torch.float64)
    normal_pool = opinionpool.holder(Normal(loc, scale), alpha=2.0, weights=WEIGHTS)
    for i in range(2):
        ref = scipy_pool([beta(float(a[i, j]), float(b[i, j])) for j in range(3)], -1.0, (0, 1))
        assert float(beta_pool.log_normalizer[i]) == pytest.approx(ref[0], rel=1e-9, abs=1e-10)
        assert float(beta_pool.mean[i]) == pytest.approx(ref[1], rel=1e-9)
        logpdfs = [normal(float(loc[i, j]), float(scale[i, j])) for j in range(3)]
        ref = scipy_pool(logpdfs, 2.0, (-np.inf, np.inf))
        assert float(normal_pool.log_normalizer[i]) == pytest.approx(ref[0], rel=1e-9, abs=1e-10)
        assert float(normal_pool.mean[i]) == pytest.approx(ref[1], rel=1e-9, abs=1e-9)


def test_float32_experts_integrate_in_float64_and_return_float32():
    loc = torch.tensor([[0.0, 2.0, -1.0], [1.0, 1.5, 4.0]], dtype=torch.float64)
    scale = torch.tensor([[1.0, 0.5, 2.0], [0.3, 1.0, 0.7]], dtype=torch.float64)
    value = torch.tensor([0.3, 1.2], dtype=torch.float64)
    wide = opinionpool.holder(Normal(loc, scale), alpha=2.0, weights=WEIGHTS)
    narrow = opinionpool.holder(Normal(loc.float(), scale.float()), alpha=2.0, weights=WEIGHTS)
    for name in ("log_normalizer", "mean", "variance"):
        got = getattr(narrow, name)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), getattr(wide, name), rtol=2e-7, atol=1e-7)
    got = narrow.log_prob(value.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), wide.log_prob(value), rtol=2e-7, atol=1e-7)
