"""Rounding the quadrature's stated errors must cover, against mpmath at 50 digits: inside the experts' ``log q``
(``ExponentialFamily.log_prob_term_size`` times ``numerical._TERM_ROUNDING``, where the terms are large and cancel;
each family's size follows the terms its ``log_prob`` is written in); and of the rule's own nodes, where a panel
spans few float64 spacings (experts far narrower than their distance from zero, an interval narrow next to its
ends), which the rule corrects for."""

from __future__ import annotations

import mpmath as mp
import numpy as np
import pytest
import torch
from torch.distributions import Beta, Exponential, Gamma, Normal, VonMises

import opinionpool
from opinionpool import numerical


@pytest.fixture(autouse=True)
def _fifty_digits():
    """The references are mpmath's at 50 digits (set per test: the session's tests start at the default)."""
    mp.mp.dps = 50
    yield


def _exact_gamma(a, rate, z):
    return (a - 1) * mp.log(z) - rate * z + a * mp.log(rate) - mp.loggamma(a)


def _exact_beta(a, b, z):
    return (a - 1) * mp.log(z) + (b - 1) * mp.log1p(-z) - (mp.loggamma(a) + mp.loggamma(b) - mp.loggamma(a + b))


def _exact_normal(loc, scale, z):
    return -((z - loc) ** 2) / (2 * scale**2) - mp.log(scale) - mp.log(2 * mp.pi) / 2


def _exact_von_mises(loc, kappa, z):
    return kappa * mp.cos(z - loc) - mp.log(2 * mp.pi * mp.besseli(0, kappa))


def _exact_exponential(rate, z):
    return mp.log(rate) - rate * z


# (distribution, its parameters as Python floats, exact log density, points around its mass)
CASES = [
    (Gamma, (1e4, 1e-5), _exact_gamma, [9.8e8, 1e9, 1.02e9]),
    (Gamma, (2.5e6, 3.0), _exact_gamma, [8.3e5, 8.333e5, 8.34e5]),
    (Beta, (1e5, 3e4), _exact_beta, [0.768, 0.7692, 0.771]),
    (Normal, (1e6, 1e-3), _exact_normal, [1e6 - 2e-3, 1e6 + 1e-4, 1e6 + 3e-3]),
    (VonMises, (0.3, 1e6), _exact_von_mises, [0.299, 0.3, 0.3012]),
    (Exponential, (1e-8,), _exact_exponential, [1e7, 1e8, 5e8]),
]


@pytest.mark.parametrize("dist, params, exact, points", CASES, ids=lambda case: getattr(case, "__name__", None))
def test_log_prob_rounding_is_within_the_allowance_for_its_terms(dist, params, exact, points):
    experts = dist(*(torch.tensor([value], dtype=torch.float64) for value in params))
    experts = opinionpool.as_experts(experts)
    family, natural = experts.family, experts.params
    value = torch.tensor(points, dtype=torch.float64).unsqueeze(-1)
    computed = family.log_prob(natural, value)
    size = family.log_prob_term_size(natural, value)
    reference = np.array([float(exact(*(mp.mpf(p) for p in params), mp.mpf(z))) for z in points])
    error = np.abs(computed.squeeze(-1).numpy() - reference)
    allowance = numerical._TERM_ROUNDING * size.squeeze(-1).numpy()
    assert (error <= allowance).all(), (error, allowance)


def test_term_sizes_follow_each_family_s_own_terms():
    """A Gaussian far from zero is written in (z - loc): its terms are its log density's, not those of
    <eta, T(z)> = loc z / sigma^2 - z^2 / (2 sigma^2), which would state errors a million times too large here."""
    experts = opinionpool.as_experts(Normal(torch.tensor([1e6], dtype=torch.float64),
                                            torch.tensor([1.0], dtype=torch.float64)))
    family, natural = experts.family, experts.params
    value = torch.tensor([[1e6 + 0.5]], dtype=torch.float64)
    size = float(family.log_prob_term_size(natural, value))
    assert size == pytest.approx(0.5 * (0.25 + float(np.log(2 * np.pi))), rel=1e-12)
    generic = float(opinionpool.families.base.ExponentialFamily.log_prob_term_size(family, natural, value))
    assert generic > 1e11


@pytest.mark.parametrize("lower, width", [(0.2, 1e-3), (0.2, 1e-7), (0.7, 3e-8), (0.7, 1e-10), (0.7, 1e-12),
                                          (0.9, 1e-6), (0.3, 0.4), (1 - 1e-9, 5e-10), (0.999, 1e-4), (0.0, 1e-12)])
def test_mass_of_an_interval_narrow_next_to_its_ends_is_within_a_tight_stated_error(lower, width):
    """``quadrature_log_mass`` on intervals narrow relative to their ends (against mpmath on the float64 ends). An
    end inside the support used to get the end panel of a support's end, whose exact reach and rounded edge
    disagreed by up to half an ulp of the end (1e-4 off on (0.7, 0.7 + 1e-12) with 1e-12 stated, then covered by
    an allowance of 16 such ulps, 2.5e-3 there); near 1 the nodes rounded by 1e-7 of their distance to it."""
    upper = lower + width
    experts = opinionpool.as_experts(Beta(torch.tensor([0.5, 3.0], dtype=torch.float64),
                                          torch.tensor([0.5, 2.0], dtype=torch.float64)))
    log_weights = torch.log(torch.tensor([0.3, 0.7], dtype=torch.float64))
    value, error = numerical.quadrature_log_mass(experts.family, experts.params, log_weights, 0.5, lower, upper)

    def root_u(z):  # the square root of the pool's unnormalised density
        return sum(w * mp.sqrt(z ** (a - 1) * (1 - z) ** (b - 1) / mp.beta(a, b))
                   for w, a, b in ((mp.mpf(0.3), 0.5, 0.5), (mp.mpf(0.7), 3, 2)))

    reference = float(mp.log(mp.quad(lambda z: root_u(z) ** 2, [mp.mpf(lower), mp.mpf(upper)])))
    assert abs(value - reference) <= error <= 1e-10, (value, reference, error)


@pytest.mark.parametrize("location, scale", [(0.7, 1e-9), (0.7, 1e-12), (0.7, 1e-13), (-3e3, 1e-10), (1e6, 1e-6)])
def test_experts_narrow_for_float64_at_their_place(location, scale):
    """Gaussian experts whose scale spans few float64 spacings at their location (1e-13 at 0.7: a thousand): the
    rule's nodes round by a visible part of a panel. Uncorrected, log Z of scale 1e-9 at 0.7 was 1.1e-11 off with
    3.7e-12 stated, of scale 1e-13 4.3e-5 off with 7.4e-6 stated. Reference: mpmath at 50 digits on the float64
    parameters, in the standardised variable."""
    loc = torch.tensor([location, location + 1.5 * scale], dtype=torch.float64)
    sd = torch.tensor([scale, 2 * scale], dtype=torch.float64)
    weights = [0.3, 0.7]
    pool = opinionpool.holder(Normal(loc, sd), alpha=0.5, weights=torch.tensor(weights, dtype=torch.float64))
    est = pool.estimate(method="quadrature")
    origin, unit = mp.mpf(float(loc[0])), mp.mpf(float(sd[0]))

    def u(s):  # the pool's unnormalised density in z = origin + unit s, times dz / ds
        z = origin + unit * s
        root = sum(mp.mpf(w) * mp.exp(_exact_normal(mp.mpf(float(m)), mp.mpf(float(v)), z) / 2)
                   for w, m, v in zip(weights, loc, sd))
        return root**2 * unit

    breaks = [-60, -10, -3, 0, 1.5, 3, 10, 60]
    mass = mp.quad(u, breaks)
    first = mp.quad(lambda s: s * u(s), breaks) / mass
    second = mp.quad(lambda s: (s - first) ** 2 * u(s), breaks) / mass
    reference = {"log_normalizer": mp.log(mass), "mean": origin + unit * first, "variance": unit**2 * second}
    for name, truth in reference.items():
        value, error = float(getattr(est, name).value), float(getattr(est, name).error)
        assert abs(value - float(truth)) <= error, (name, value, float(truth), error)
        assert error <= 1e-6 * (1 if name == "log_normalizer" else abs(float(truth))), (name, error)


@pytest.mark.parametrize("distance", [2.0**-20, 2.0**-29, 2.0**-35, 2.0**-40, 2.0**-44, 2.0**-48, 2.0**-52, 2.0**-53])
def test_mass_of_an_interval_narrow_next_to_a_singular_end(distance):
    """The mass of Beta(0.26, 0.28) on (1 - d, 1), singular at 1, against mpmath's regularised incomplete beta.
    The end panel's edge left up to half a spacing of 1 between it and the ladder (1.1e-8 off at d = 2^-29, with
    1.5e-12 stated); at d = 2^-35 its probes rounded onto the end, so there was no end panel (2.6e-2 off with
    1.2e-2 stated); where the interval spans a few thousand floats, the nearest point moves closer to the end, down
    to four floats, so that the power law below it can still be fitted (2^-44: 0.16 off with 0.08 stated); a node on
    the interval's own end took its slope from a neighbour outside the interval, where u was -inf, and went
    uncorrected (2^-40: 1.5e-9 off with 9.5e-10 stated). Within four nearest points of 1 (2^-42) the interval is
    all end panel, on power laws fitted on the support outside it: fitted within the interval, 16 floats (2^-48) had
    a stated error of 8 % and two floats (2^-52) were 2 nats off with 4 % stated; one float (2^-53) had no mass."""
    a, b = 0.2604652623112795, 0.2821494739751566
    experts = opinionpool.as_experts(Beta(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)))
    log_weights = torch.zeros(1, dtype=torch.float64)
    value, error = numerical.quadrature_log_mass(experts.family, experts.params, log_weights, 1.0, 1 - distance, 1.0)
    reference = float(mp.log(mp.betainc(b, a, 0, mp.mpf(distance), regularized=True)))
    assert abs(value - reference) <= error, (value, reference, error)
    assert error <= (1e-11 if distance >= 2.0**-35 else 2e-9), error


def test_node_residuals_are_exact_minus_rounded_nodes():
    """``numerical._node_residual`` against exact rational arithmetic: panels from a float step to 1e12 of them
    wide, at places from 1e-3 to 1e6, at the rule's own nodes."""
    from fractions import Fraction

    generator = np.random.default_rng(7)
    place = 10.0 ** generator.uniform(-3, 6, 40)
    a = place * (1 + generator.uniform(-1e-3, 1e-3, 40))
    b = a + np.spacing(a) * np.round(10.0 ** generator.uniform(0, 12, 40))
    t = np.polynomial.legendre.leggauss(10)[0]
    residual = numerical._node_residual(torch.tensor(a), torch.tensor(b), torch.tensor(t)).numpy()
    for i in range(len(a)):
        for j in range(len(t)):
            rounded = 0.5 * (a[i] + b[i]) + 0.5 * (b[i] - a[i]) * t[j]  # as the rules compute their nodes
            exact = (Fraction(a[i]) + Fraction(b[i])) / 2 + (Fraction(b[i]) - Fraction(a[i])) / 2 * Fraction(t[j])
            # to a trillionth of a float step there (the residual itself is a sum of rounded error terms)
            assert abs(Fraction(residual[i, j]) - (exact - Fraction(rounded))) <= Fraction(1e-12 * np.spacing(rounded))
