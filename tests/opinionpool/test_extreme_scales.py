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
    """Normal experts of standard deviation 1e-160 or 1e150 gave non-finite error bars (1e160 a 'not normalisable'
    error), a mean of 1e150 with a scale of 1e140 a pool mean wrong by 10 % with a finite error bar."""
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


@pytest.mark.parametrize("alpha", [2.0, -1.0])
def test_the_numerical_engine_refuses_experts_narrower_than_its_resolution_at_their_mean(alpha):
    """Identical Normal experts of mean 1e18 and standard deviation 1 (the float64 spacing there is 128) came back
    with log Z = -0.92 +- 2e-16 (true 0) and a variance of 1e7 +- 2e-9 (true 1) for alpha = -1, and a 'certified
    bracket' error for alpha = 2. Now refused below QUADRATURE_MIN_RELATIVE_SD of the mean."""
    from opinionpool.numerical import QUADRATURE_MIN_RELATIVE_SD

    f64 = torch.float64
    for loc in (1e18, -1e15, 2 / QUADRATURE_MIN_RELATIVE_SD):
        pool = opinionpool.holder(Normal(torch.tensor([loc, loc], dtype=f64), torch.tensor([1.0, 1.0], dtype=f64)),
                                  alpha=alpha, weights=torch.tensor(WEIGHTS, dtype=f64))
        with pytest.raises(ValueError, match=r"standard deviations from .* of \|mean\|"):
            pool.summary


@pytest.mark.parametrize("alpha", [2.0, -1.0, 0.3])
def test_a_pool_far_from_zero_is_the_pool_at_zero_shifted_up_to_the_resolution_limit(alpha):
    """Two Normals of unequal scales and weights shifted by up to 2^45.9 of their standard deviation (just inside
    QUADRATURE_MIN_RELATIVE_SD), alone and as rows of one batch, have the unshifted pool's log Z and variance and its
    mean shifted, within the error bars. The variance was taken about the mean rounded to the spacing there, which
    added that rounding squared: at 1e12 the alpha = -1 variance was 1.3 times its stated error off, at 3.5e13 four
    times."""
    from opinionpool.numerical import QUADRATURE_MIN_RELATIVE_SD

    f64 = torch.float64
    shifts = torch.tensor([0.0, 1e12, 1e13, 2.0**45.9], dtype=f64)
    assert float(shifts[-1]) * QUADRATURE_MIN_RELATIVE_SD < 1.0  # the last shift is inside the engine's range

    def summary(shift):  # shift (B, 1): a batch of pools
        experts = Normal(torch.tensor([0.0, 0.5], dtype=f64) + shift, torch.tensor([1.0, 2.0], dtype=f64))
        return opinionpool.holder(experts, alpha=alpha, weights=torch.tensor(WEIGHTS, dtype=f64)).summary

    batch = summary(shifts[:, None])
    alone = [summary(shift.reshape(1, 1)) for shift in shifts]
    for name, offset in (("log_normalizer", 0.0 * shifts), ("mean", shifts), ("variance", 0.0 * shifts)):
        unit = getattr(alone[0], name)
        one_by_one = [getattr(one, name) for one in alone]
        for value, error in ((getattr(batch, name).value.reshape(-1), getattr(batch, name).error.reshape(-1)),
                             (torch.cat([e.value.reshape(-1) for e in one_by_one]),
                              torch.cat([e.error.reshape(-1) for e in one_by_one]))):
            assert torch.isfinite(error).all(), name
            assert ((value - offset - unit.value).abs() <= error + unit.error).all(), (name, value - offset, error)


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


def _gamma_concentration(mean_log, mean):
    """Independent inverse: the root of ``log a - digamma(a) = log E[x] - E[log x]`` (float64, scipy)."""
    gap = math.log(mean) - mean_log
    return optimize.brentq(lambda a: math.log(a) - special.digamma(a) - gap, 1e-6, 1e9, xtol=1e-15, rtol=1e-15)


def test_gamma_matching_of_float32_mean_parameters_is_solved_in_float64():
    """``E[log x] - log E[x]`` cancels to 5e-5 at a concentration of 1e4: formed in float32 it cost the concentration
    1e-3 relative; the solve takes the float32 inputs as they are, in float64."""
    family = opinionpool.families.GammaFamily()
    natural = torch.tensor([1e4, -1e4 / 7], dtype=torch.float64)
    mean_params = family.mean_parameters(natural).to(torch.float32)
    solved = family.natural_from_mean(mean_params, torch.tensor([1.0, -1.0], dtype=torch.float32))
    assert solved.dtype == torch.float32
    expected = _gamma_concentration(*mean_params.double().tolist())
    assert solved[0].item() == pytest.approx(expected, rel=1e-6)
    assert (-solved[1]).item() == pytest.approx(expected / mean_params[1].item(), rel=1e-6)


@pytest.mark.parametrize("scale", [1.0, 1e-150, 1e170, 1e200])
def test_gamma_matching_gradients_scale_as_the_variable(scale):
    """The concentration is a function ``g`` of ``E[log x] - log E[x]`` and the rate is ``g / E[x]``; with the rates
    times ``scale`` (``E[x]`` over it) the Jacobian's entries are the unit ones times 1, ``scale``, ``scale`` and
    ``scale^2`` (infinite where that overflows; where ``E[x]^2`` underflowed, below 1e-154, the division's backward
    gave NaN)."""
    family = opinionpool.families.GammaFamily()
    init = torch.tensor([1.0, -1.0], dtype=torch.float64)

    def jacobian(s):
        mean_params = family.mean_parameters(torch.tensor([2.5, -0.8 * s], dtype=torch.float64)).requires_grad_(True)
        out = family.natural_from_mean(mean_params, init * torch.tensor([1.0, s], dtype=torch.float64))
        return torch.stack([torch.autograd.grad(out[i], mean_params, retain_graph=True)[0] for i in range(2)])

    unit, scaled = jacobian(1.0), jacobian(scale)
    expected = unit * torch.tensor([[1.0, scale], [scale, scale**2 if scale < 1e150 else math.inf]],
                                   dtype=torch.float64)
    assert not scaled.isnan().any()
    torch.testing.assert_close(scaled, expected, rtol=1e-9, atol=0)
    if scale == 1.0:
        mean_params = family.mean_parameters(torch.tensor([2.5, -0.8], dtype=torch.float64)).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda m: family.natural_from_mean(m, init), (mean_params,))


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_gamma_matching_refuses_a_mean_that_is_not_positive_and_finite(bad):
    family = opinionpool.families.GammaFamily()
    with pytest.raises(ValueError, match=r"needs a positive finite mean E\[x\]"):
        family.natural_from_mean(torch.tensor([0.0, bad], dtype=torch.float64), torch.tensor([1.0, -1.0]))


def test_an_absent_expert_outside_the_range_is_not_checked():
    """Only the experts the pool weighs are checked: an expert of weight zero, however narrow, leaves the pool the
    other expert (exactly, for a pool of one)."""
    experts = Normal(torch.tensor([0.0, 5.0]), torch.tensor([1.0, 1e-120]))
    pool = opinionpool.holder(experts, alpha=2.0, weights=torch.tensor([1.0, 0.0]))
    assert pool.mean.item() == pytest.approx(0.0, abs=1e-10) and pool.variance.item() == pytest.approx(1.0, rel=1e-9)


def test_experts_of_infinite_variance_place_the_panels_by_their_own_spread():
    """An inverse-gamma family that states its infinite variance (shape 1.5): its spread is integrated instead (the
    infinite variance placed the panels wrongly, log Z 0.0584 with a stated error of 6e-13 for 0.0606)."""
    mpmath = pytest.importorskip("mpmath")

    def shapes(eta):
        return -eta[..., 0] - 1, -eta[..., 1]

    def mean(eta):
        a, b = shapes(eta)
        return torch.where(a > 1, b / (a - 1), torch.full_like(a, math.inf))

    def variance(eta):
        a, b = shapes(eta)
        return torch.where(a > 2, b**2 / ((a - 1) ** 2 * (a - 2)), torch.full_like(a, math.inf))

    family = opinionpool.CustomFamily(
        lambda eta: torch.lgamma(shapes(eta)[0]) - shapes(eta)[0] * torch.log(shapes(eta)[1]),
        lambda z: torch.stack((torch.log(z), 1 / z), -1), lambda z: torch.zeros_like(z), num_params=2,
        mean=mean, variance=variance, natural_domain=lambda e: (e[..., 0] < -1) & (e[..., 1] < 0),
        support_interval=(0.0, math.inf), name="InverseGamma")
    shape_scale = ((1.5, 1.0), (4.0, 2.0))
    natural = torch.tensor([[-(a + 1), -b] for a, b in shape_scale])
    pool = opinionpool.holder(family.expert(natural), alpha=2.0, weights=torch.tensor(WEIGHTS))

    def u(z):
        densities = [b**a / mpmath.gamma(a) * z ** (-a - 1) * mpmath.exp(-b / z) for a, b in shape_scale]
        return mpmath.sqrt(sum(w * d**2 for w, d in zip(WEIGHTS, densities)))

    mpmath.mp.dps = 30
    expected = float(mpmath.log(mpmath.quad(u, [0, 0.1, 1, 10, mpmath.inf])))
    estimate = pool.summary.log_normalizer
    assert abs(estimate.value.item() - expected) <= max(estimate.error.item(), 1e-10)
