"""Pools of experts at scales near the ends of float64: the closed forms and the Gamma's moment matching hold at
any scale (a Gamma pool is scale-equivariant), and the numerical engine refuses experts outside the range it
resolves instead of returning NaN error bars or wrong moments."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize, special
from torch.distributions import Gamma, Normal

import opinionpool
from opinionpool.numerical import QUADRATURE_RANGE

CONCENTRATIONS, RATES, WEIGHTS = (2.0, 3.5), (1.0, 0.5), (0.3, 0.7)


def reference_match(alpha):
    """The moment-matched Gamma ``(concentration, rate)`` of the unit-scale pool, from scipy quadrature of the pooled
    density's ``E[x]`` and ``E[log x]`` and a root of ``log a - digamma(a) = log E[x] - E[log x]``."""
    def u(x):
        log_q = [a * math.log(r) - math.lgamma(a) + (a - 1) * math.log(x) - r * x for a, r in zip(CONCENTRATIONS, RATES)]
        if alpha == 0:
            return math.exp(sum(w * v for w, v in zip(WEIGHTS, log_q)))
        return sum(w * math.exp(alpha * v) for w, v in zip(WEIGHTS, log_q)) ** (1 / alpha)

    mass, mean, mean_log = (integrate.quad(lambda x, f=f: f(x) * u(x), 0, np.inf, epsabs=0, epsrel=1e-13, limit=200)[0]
                            for f in (lambda x: 1.0, lambda x: x, math.log))
    mean, mean_log = mean / mass, mean_log / mass
    gap = math.log(mean) - mean_log
    a = optimize.brentq(lambda a: math.log(a) - special.digamma(a) - gap, 1e-3, 1e6, xtol=1e-15, rtol=1e-15)
    return a, a / mean


@pytest.mark.parametrize("alpha", [0.0, 1 / 3, 0.5, 1.0])
@pytest.mark.parametrize("scale", [1e-300, 1e-160, 1e160, 1e300])
def test_gamma_moment_matching_holds_at_any_scale(alpha, scale):
    """Rates times ``scale``: the same concentration and the rate times ``scale`` (beyond rates of about 1e154 the
    Newton solve's Jacobian underflowed and it failed to converge, or found a singular matrix)."""
    experts = Gamma(torch.tensor(CONCENTRATIONS), torch.tensor(RATES) * scale)
    matched = opinionpool.holder(experts, alpha=alpha, weights=torch.tensor(WEIGHTS)).moment_match()
    concentration, rate = reference_match(alpha)
    assert matched.concentration.item() == pytest.approx(concentration, rel=1e-9)
    assert (matched.rate / scale).item() == pytest.approx(rate, rel=1e-9)


@pytest.mark.parametrize("alpha", [2.0, -1.0])
@pytest.mark.parametrize("loc, sd", [(0.0, 1e-160), (0.0, 1e150), (1e150, 1e140), (0.0, 1e-100 / 2)])
def test_the_numerical_engine_refuses_experts_outside_its_range(alpha, loc, sd):
    """Normal experts of standard deviation 1e-160 gave NaN error bars, 1e150 a 'not normalisable' error, a mean of
    1e150 with a scale of 1e140 a pool mean wrong by 10 % with a finite error bar."""
    experts = Normal(loc + torch.tensor([0.0, 1.0]) * sd, torch.tensor([1.0, 2.0]) * sd)
    pool = opinionpool.holder(experts, alpha=alpha, weights=torch.tensor(WEIGHTS))
    with pytest.raises(ValueError, match=r"Normal: an expert of mean .* and standard deviation .* is outside what "
                                         r"the numerical engine resolves"):
        pool.mean


@pytest.mark.parametrize("alpha", [2.0, -1.0])
@pytest.mark.parametrize("sd", [2 * QUADRATURE_RANGE[0], QUADRATURE_RANGE[1] / 4])
def test_the_numerical_engine_is_accurate_at_the_ends_of_its_range(alpha, sd):
    """Inside the range the pool of scaled experts is the unit pool scaled (log Z unchanged, the mean times the
    scale, the variance times its square), with finite error bars that cover the difference."""
    def summary(scale):
        experts = Normal(torch.tensor([0.0, 1.0]) * scale, torch.tensor([1.0, 2.0]) * scale)
        return opinionpool.holder(experts, alpha=alpha, weights=torch.tensor(WEIGHTS)).summary

    unit, scaled = summary(1.0), summary(sd)
    for name, power in (("log_normalizer", 0), ("mean", 1), ("variance", 2)):
        got, expected = getattr(scaled, name), getattr(unit, name)
        assert torch.isfinite(got.error) and got.error >= 0, name
        tolerance = got.error / sd**power + expected.error + 1e-12 * abs(expected.value)
        assert abs(got.value / sd**power - expected.value) <= tolerance, name


@pytest.mark.parametrize("alpha", [0.0, 1 / 3, 0.5, 1.0])
@pytest.mark.parametrize("scale", [1e-300, 1e-160, 1e150, 1e300])
def test_gaussian_closed_forms_hold_at_any_scale(alpha, scale):
    """The exact alpha = 0, 1/n and 1 pools of Normal experts are the unit-scale pool scaled, where the numerical
    engine refuses the experts."""
    def matched(s):
        experts = Normal(torch.tensor([0.0, 1.0]) * s, torch.tensor([1.0, 2.0]) * s)
        return opinionpool.holder(experts, alpha=alpha, weights=torch.tensor(WEIGHTS)).moment_match()

    unit, scaled = matched(1.0), matched(scale)
    assert (scaled.mean / scale).item() == pytest.approx(unit.mean.item(), rel=1e-12, abs=1e-13)
    assert (scaled.stddev / scale).item() == pytest.approx(unit.stddev.item(), rel=1e-12)
