"""``kl_estimate`` against an ``other`` that computes in float32 while its own terms cancel far beyond the size of
its log-density: ``lgamma`` of a Gamma of shape 1000 (about 5900 for a log-density of about 3), the ``lgamma``
difference of a Student t with 10^4 degrees of freedom. Counting four float32 ulps of the log-density missed that
rounding (a KL 1e-3 off with 1e-6 stated); such an ``other`` is now evaluated through a float64 copy of itself.
References are scipy's float64 densities of the same parameters, integrated by ``scipy.integrate.quad``."""

import math

import numpy as np
import pytest
import scipy.stats as stats
import torch
from scipy import integrate
from scipy.special import digamma, gammaln
from torch.distributions import Gamma, Normal, StudentT, TransformedDistribution
from torch.distributions.transforms import AffineTransform, ExpTransform

import opinionpool

WEIGHTS = torch.tensor([0.3, 0.7], dtype=torch.float64)


def _f32(*values):
    return (torch.tensor(v, dtype=torch.float32) for v in values)


def _kl_by_quadrature(log_u, log_other, low, high, points):
    """``KL(u / Z || other)`` of an unnormalised scalar density ``u`` by scipy's adaptive quadrature over
    ``(low, high)``, split at ``points``, in float64 (within 1e-11 of mpmath's at 30 digits for the Student t
    case)."""
    def u(z):
        return math.exp(log_u(z))

    options = dict(epsabs=0, epsrel=1e-12, limit=400, points=points)
    mass = integrate.quad(u, low, high, **options)[0]
    cross = integrate.quad(lambda z: u(z) * (log_u(z) - log_other(z)), low, high, **options)[0]
    return cross / mass - math.log(mass)


@pytest.mark.parametrize("method", ["quadrature", "importance"])
def test_kl_against_a_float32_gamma_of_large_shape(method):
    """The pool of identical Gamma(1000, 1) experts is the expert, so the reference is the closed form between
    Gammas of one rate. float32's lgamma(1000.5) alone is off by about 5e-4, the size of the KL itself."""
    experts = Gamma(torch.tensor([1000.0, 1000.0], dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    pool = opinionpool.holder(experts, alpha=0.5, weights=WEIGHTS)
    other = Gamma(*_f32(1000.5, 1.0))
    truth = gammaln(1000.5) - gammaln(1000.0) + (1000.0 - 1000.5) * digamma(1000.0)
    result = pool.kl_estimate(other, method=method, seed=0)
    value, error = float(result.value), float(result.error)
    assert abs(value - truth) <= (3 if method == "importance" else 1) * error, (value, truth, error)
    assert error <= (1e-3 if method == "importance" else 1e-8), (value, truth, error)


def test_kl_of_a_pool_against_a_float32_student_t_of_many_degrees_of_freedom():
    """A Hellinger pool of two unequal Normals against Student t with 10^4 degrees of freedom, whose float32
    log-density subtracts lgamma(5000) (about 3.8e4) from lgamma(5000.5): its rounding alone was 1e-3, the KL
    about 0.05."""
    loc, scale = torch.tensor([0.0, 0.4], dtype=torch.float64), torch.tensor([1.0, 1.3], dtype=torch.float64)
    pool = opinionpool.holder(Normal(loc, scale), alpha=0.5, weights=WEIGHTS)
    other = StudentT(*_f32(1e4, 0.25, 1.1))
    df, t_loc, t_scale = (float(t) for t in (other.df, other.loc, other.scale))  # the float32 values (1.1 is not one)
    lam, mus, sds = WEIGHTS.numpy(), loc.numpy(), scale.numpy()

    def log_u(z):
        return 2 * np.logaddexp.reduce(np.log(lam) + 0.5 * stats.norm.logpdf(z, mus, sds))

    truth = _kl_by_quadrature(log_u, lambda z: stats.t.logpdf(z, df, t_loc, t_scale), -40, 40,
                              points=mus)
    result = pool.kl_estimate(other)
    value, error = float(result.value), float(result.error)
    assert abs(value - truth) <= error <= 1e-9, (value, truth, error)


def test_kl_against_a_float32_distribution_built_from_an_inverse_transform():
    """``(X - 0.5) / 2`` for X ~ Student t with 10^4 degrees of freedom in float32, built with the inverse of an
    affine transform (which holds the forward transform and its float32 tensors), and ``log X`` for X ~ Gamma(1000,
    1) through the inverse of ``exp``; the float64 copy must carry every one of them. The pools are of identical
    Normal experts, so they are the expert."""
    cases = [
        (TransformedDistribution(StudentT(*_f32(1e4)), [AffineTransform(*_f32(0.5, 2.0)).inv]), -0.2, 0.6,
         lambda y: stats.t.logpdf(2 * y + 0.5, 1e4) + math.log(2.0)),
        (TransformedDistribution(Gamma(*_f32(1000.0, 1.0)), [ExpTransform().inv]), 6.9, 0.0316,
         lambda y: stats.loggamma.logpdf(y, 1000.0)),
    ]
    for other, loc, scale, log_other in cases:
        experts = Normal(torch.full((2,), loc, dtype=torch.float64), torch.full((2,), scale, dtype=torch.float64))
        pool = opinionpool.holder(experts, alpha=0.5, weights=WEIGHTS)
        truth = _kl_by_quadrature(lambda z, loc=loc, scale=scale: stats.norm.logpdf(z, loc, scale), log_other,
                                  loc - 40 * scale, loc + 40 * scale, points=[loc])
        result = pool.kl_estimate(other)
        value, error = float(result.value), float(result.error)
        assert abs(value - truth) <= error <= 1e-9, (value, truth, error)
        assert other.base_dist.mean.dtype == torch.float32  # the user's other is left as it was


class _Float32OnlyNormal(Normal):
    """A user's distribution that computes only in float32: no float64 copy of it computes."""

    def log_prob(self, value):
        if self.loc.dtype != torch.float32:
            raise TypeError(f"float32 parameters only, got {self.loc.dtype}")
        return super().log_prob(value.to(torch.float32))


def test_an_other_with_no_float64_copy_is_used_as_it_is():
    """Where the float64 copy raises, ``other`` is evaluated as it is and its rounding counted as four of its ulps
    of the log-density; the closed form between Normals is the reference."""
    pool = opinionpool.holder(Normal(torch.tensor([0.3, 0.3], dtype=torch.float64),
                                     torch.tensor([1.2, 1.2], dtype=torch.float64)), alpha=0.5, weights=WEIGHTS)
    other = _Float32OnlyNormal(*_f32(0.0, 1.0))
    truth = math.log(1 / 1.2) + (1.2**2 + 0.3**2) / 2 - 0.5
    result = pool.kl_estimate(other)
    value, error = float(result.value), float(result.error)
    assert abs(value - truth) <= error <= 1e-5, (value, truth, error)
    assert error >= 1e-7  # float32's rounding, not float64's


class _GammaInADict(torch.distributions.Distribution):
    """A user's wrapper keeping its float32 Gamma in a dict, as a registry of parts might."""

    arg_constraints = {}
    support = torch.distributions.constraints.positive

    def __init__(self, concentration, rate):
        self.parts = {"gamma": Gamma(concentration, rate)}
        super().__init__(validate_args=False)

    def log_prob(self, value):
        return self.parts["gamma"].log_prob(value)


def test_kl_against_a_float32_gamma_held_in_a_dict():
    """The float64 copy looks into dicts too: the float32 Gamma of shape 1000.5 held in one, whose lgamma alone is
    5e-4 off, had been evaluated as it is, its error counted as four float32 ulps of the log-density (2.65e-4 +-
    9.5e-5 for 1.25e-4). The reference is the closed form between Gammas of one rate, as above."""
    experts = Gamma(torch.tensor([1000.0, 1000.0], dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    pool = opinionpool.holder(experts, alpha=0.5, weights=WEIGHTS)
    other = _GammaInADict(*_f32(1000.5, 1.0))
    truth = gammaln(1000.5) - gammaln(1000.0) + (1000.0 - 1000.5) * digamma(1000.0)
    result = pool.kl_estimate(other)
    value, error = float(result.value), float(result.error)
    assert abs(value - truth) <= error <= 1e-8, (value, truth, error)
    assert other.parts["gamma"].concentration.dtype == torch.float32  # the copy leaves the user's other as it was
