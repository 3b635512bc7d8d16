"""Gamma, Beta and Dirichlet experts of huge concentrations (1e4 to 1e16): their log-normalisers are of the size of
the concentrations (-1.4e16 for Beta(1e16, 1e16)), so densities, KL divergences and pool normalisers written as
their differences kept no digit (a density of 70 for 18.54, a positive log normaliser for a pool of order 0).
References: the same closed forms at 50 digits in mpmath (log-gammas and digammas), not the library's forms."""

import math

import mpmath
import pytest
import torch
from torch.distributions import Beta, Dirichlet, Gamma

import opinionpool
from opinionpool.families import BetaFamily, DirichletFamily, GammaFamily

EPS = torch.finfo(torch.float64).eps


@pytest.fixture(autouse=True)
def fifty_digits():
    with mpmath.workdps(50):
        yield


def mp(x):
    """``x`` at 50 digits: a float's exact binary value, an mpmath number as it is."""
    return x if isinstance(x, mpmath.mpf) else mpmath.mpf(float(x))


def log_beta(*concentrations):
    return sum(mpmath.loggamma(mp(c)) for c in concentrations) - mpmath.loggamma(sum(mp(c) for c in concentrations))


def dirichlet_log_density(concentrations, point):
    return sum((mp(c) - 1) * mpmath.log(mp(z)) for c, z in zip(concentrations, point)) - log_beta(*concentrations)


def gamma_log_density(shape, rate, z):
    shape, rate, z = mp(shape), mp(rate), mp(z)
    return (shape - 1) * mpmath.log(z) - rate * z - mpmath.loggamma(shape) + shape * mpmath.log(rate)


def dirichlet_kl(p, q):
    total = sum(mp(c) for c in p)
    return (log_beta(*q) - log_beta(*p)
            + sum((mp(a) - mp(b)) * (mpmath.digamma(mp(a)) - mpmath.digamma(total)) for a, b in zip(p, q)))


def gamma_kl(p, q):
    a, r = mp(p[0]), mp(p[1])
    b, s = mp(q[0]), mp(q[1])
    return ((a - b) * mpmath.digamma(a) - mpmath.loggamma(a) + mpmath.loggamma(b) + b * (mpmath.log(r) - mpmath.log(s))
            + a * (s - r) / r)


def check_density(family, params, point, reference):
    params, point = torch.tensor(params), torch.tensor(point)
    value = float(family.log_prob(params, point))
    size = float(family.log_prob_term_size(params, point))
    error = abs(value - float(reference))
    assert error <= 1e-12 * max(1.0, abs(float(reference))), (value, float(reference))
    assert error <= 8 * EPS * size  # the stated rounding covers the error


@pytest.mark.parametrize("a, b, z", [
    (1e16, 1e16, 0.5), (1e16, 3e16, 0.25), (1e10, 2.5, 1 - 2**-30), (1e5, 3e5, 0.25), (1e4, 1e-3, 0.999),
    (2e4, 1.0, 0.3), (1e5, 9.999, 0.9999), (1e5, 10.0, 0.9999), (1e12, 1e12, 0.5 + 2**-22),
])
def test_beta_densities(a, b, z):
    reference = dirichlet_log_density((a, b), (z, 1 - mpmath.mpf(z)))
    check_density(BetaFamily(), [a, b], z, reference)


@pytest.mark.parametrize("shape, rate, z", [
    (1e16, 1e16, 1.0), (1e16, 2.0, 5e15), (1e6, 1e-3, 1.001e9), (1e4, 1e200, 1e-196), (3e8, 3e8, 1 + 2**-14),
])
def test_gamma_densities(shape, rate, z):
    check_density(GammaFamily(), [shape, -rate], z, gamma_log_density(shape, rate, z))


@pytest.mark.parametrize("concentrations", [(1e16, 3e15, 0.5), (1e6, 2e6, 3e6, 4e6), (5e4, 1e-3, 7.0)])
def test_dirichlet_densities_at_points_that_sum_to_one_only_to_rounding(concentrations):
    point = torch.tensor(concentrations) / sum(concentrations)
    reference = dirichlet_log_density(concentrations, point.tolist())  # the density's formula at the point given
    family = DirichletFamily(len(concentrations))
    value = float(family.log_prob(torch.tensor(concentrations), point))
    assert abs(value - float(reference)) <= 1e-12 * max(1.0, abs(float(reference))), (value, float(reference))


def test_density_gradients_of_large_concentrations():
    a, b, z = 1e12, 3e12, 0.25
    params = torch.tensor([a, b], requires_grad=True)
    (gradient,) = torch.autograd.grad(BetaFamily().log_prob(params, torch.tensor(z)), params)
    total = mpmath.digamma(mp(a) + mp(b))
    expected = [mpmath.log(mp(z)) - mpmath.digamma(mp(a)) + total, mpmath.log(1 - mp(z)) - mpmath.digamma(mp(b)) + total]
    for got, want in zip(gradient.tolist(), expected):
        assert abs(got - float(want)) <= 1e-13, (got, float(want))


@pytest.mark.parametrize("a, b, z", [(5e3, 5e3, 1e-200), (10.0, 9990.0, 1e-160), (1e8, 1e8, 1e-300)])
def test_density_gradients_deep_in_a_tail(a, b, z):
    """``d/da log p = log z - psi(a) + psi(a + b)``, ``d/dz = (a - 1) / z - (b - 1) / (1 - z)``: the deviance's
    ``log(x / y)`` gave autograd ``-x / y^2``, infinite for ``y`` below 1e-154."""
    params, point = torch.tensor([a, b], requires_grad=True), torch.tensor(z, requires_grad=True)
    grads = torch.autograd.grad(BetaFamily().log_prob(params, point), (params, point))
    total = mpmath.digamma(mp(a) + mp(b))
    expected = [mpmath.log(mp(z)) - mpmath.digamma(mp(a)) + total, mpmath.log(1 - mp(z)) - mpmath.digamma(mp(b)) + total]
    for got, want in zip(grads[0].tolist(), expected):
        assert abs(got - float(want)) <= 1e-12 * max(1.0, abs(float(want))), (got, float(want))
    want = (mp(a) - 1) / mp(z) - (mp(b) - 1) / (1 - mp(z))
    assert abs(grads[1].item() - float(want)) <= 1e-12 * abs(float(want))
    shape = torch.tensor([1e4, -1.0], requires_grad=True)
    (gradient,) = torch.autograd.grad(GammaFamily().log_prob(shape, torch.tensor(1e-300)), shape)
    assert gradient[1].item() == pytest.approx(-1e4, rel=1e-12)  # d/d(-rate) = z - a / rate


@pytest.mark.parametrize("a, b, z", [(1e22, 9e22, 0.1), (3e20, 7e20, 0.3), (1.4069374005134007e36, 1.038148362282746e36,
                                                                          0.5754143359390624),
                                     (3.281740607239377e39, 3.687959287055253e39, 0.470858237371999)])
def test_densities_of_enormous_concentrations_within_their_stated_rounding(a, b, z):
    """``t z`` (and ``t``, and ``1 - z``) round: the deviance of ``c`` from the rounded ``t z`` was off by about
    ``eps^2 t z`` (9e-11 at 1e22; 2048 at 1e36 with the error corrected after the series); the exact errors now
    enter the series. Within the stated rounding, and far below the density's own sensitivity to ``z``'s last bit."""
    params, point = torch.tensor([a, b]), torch.tensor(z)
    error = abs(float(BetaFamily().log_prob(params, point)) - float(dirichlet_log_density((a, b), (z, 1 - mp(z)))))
    assert error <= 8 * EPS * float(BetaFamily().log_prob_term_size(params, point))
    assert error <= 1e-8


@pytest.mark.parametrize("family, params, z, reference", [
    (GammaFamily(), (1e5, -1.0), 1e-304, lambda: gamma_log_density(1e5, 1.0, 1e-304)),
    (GammaFamily(), (1e4, -3.0), 1e-305, lambda: gamma_log_density(1e4, 3.0, 1e-305)),
    (BetaFamily(), (1e4, 1e4), 1e-309, lambda: dirichlet_log_density((1e4, 1e4), (1e-309, 1 - mp(1e-309)))),
])
def test_densities_where_the_ratio_of_the_deviance_overflows(family, params, z, reference):
    """``c / (t z)`` beyond the largest float: the correction for ``t z``'s rounding divided by it (NaN or -inf where
    the log density is -7e7; a review)."""
    value = float(family.log_prob(torch.tensor(params), torch.tensor(z)))
    assert value == pytest.approx(float(reference()), rel=1e-13)


@pytest.mark.parametrize("family, params, z", [
    (GammaFamily(), (1e5, -2.0), 1e-306), (GammaFamily(), (1e5, -0.5), 1e-305), (BetaFamily(), (1e5, 1e5), 1e-309),
    (DirichletFamily(3), (1e5, 3e4, 2.5), (1e-309, 0.6, None)),
])
def test_gradients_where_the_ratio_of_the_deviance_overflows(family, params, z):
    """There ``-c / (t z)``, the deviance's slope in ``y = t z``, overflows before autograd multiplies it by ``z``:
    the gradients with respect to the rate and the concentrations came out infinite. Against ``d/d(-rate) = z -
    a / rate``, ``d/da = log(rate z) - psi(a)`` and ``d/dc_k = log z_k - psi(c_k) + psi(sum c)``, in mpmath."""
    params = torch.tensor(params, requires_grad=True)
    if isinstance(z, tuple):
        z = z[:-1] + (1 - mp(z[0]) - mp(z[1]),)
    point = torch.tensor([float(c) for c in z]) if isinstance(z, tuple) else torch.tensor(z)
    (gradient,) = torch.autograd.grad(family.log_prob(params, point), params)
    values = [mp(float(c)) for c in params.detach().tolist()]
    if isinstance(family, GammaFamily):
        shape, rate = values[0], -values[1]
        expected = [mpmath.log(rate * mp(z)) - mpmath.digamma(shape), mp(z) - shape / rate]
    else:
        points = [mp(float(c)) for c in point.tolist()] if point.dim() else [mp(z), 1 - mp(z)]
        total = mpmath.digamma(sum(values))
        expected = [mpmath.log(p) - mpmath.digamma(c) + total for c, p in zip(values, points)]
    for got, want in zip(gradient.tolist(), expected):
        assert abs(got - float(want)) <= 1e-12 * max(1.0, abs(float(want))), (got, float(want))


def test_gamma_density_of_an_enormous_shape():
    shape, rate, z = 1.7702269785759908e39, 44522947.95804508, 3.9759877990202117e31
    params, point = torch.tensor([shape, -rate]), torch.tensor(z)
    error = abs(float(GammaFamily().log_prob(params, point)) - float(gamma_log_density(shape, rate, z)))
    assert error <= 8 * EPS * float(GammaFamily().log_prob_term_size(params, point))
    assert error <= 1e-8  # (8.4e6 before rate z's rounding error entered the deviance)


@pytest.mark.parametrize("p, q, rtol", [
    ((1e16, 1e16), (2.0, 2.0), 1e-13), ((2.0, 2.0), (1e16, 1e16), 1e-13), ((1e16, 3e16), (1e16 + 1e8, 3e16), 1e-13),
    ((1e14, 2.5), (3.0, 7e13), 1e-13), ((1e16, 3e15, 0.5), (2e15, 7e15, 4.0), 1e-13),
    # nearby experts, whose divergence of the means rounds in its argument p_k t_q / t_p (a review: 8 digits lost)
    ((1e12, 1e10), (1e12, 1.00001e10), 1e-13), ((1e17, 4e15), (1e17 + 2.4e7, 4e15 + 4e8), 1e-13),
    ((1e-7, 9.9), (500.0, 2.6e16), 1e-12),
])
def test_beta_and_dirichlet_kl(p, q, rtol):
    make = (lambda c: Beta(torch.tensor(c[0]), torch.tensor(c[1]))) if len(p) == 2 else (
        lambda c: Dirichlet(torch.tensor(c)))
    value = float(opinionpool.kl_divergence(make(p), make(q)))
    reference = float(dirichlet_kl(p, q))
    assert abs(value - reference) <= rtol * reference, (value, reference)


@pytest.mark.parametrize("p, q", [((1e16, 1e16), (2.0, 3.0)), ((4.0, 1e-3), (1e15, 1e15)), ((1e16, 5.0), (1.1e16, 5.0)),
                                  ((1e16, 1.0), (1e16, 1.00000001)), ((0.0027, 1.3e16), (9.99, 1e-300))])
def test_gamma_kl(p, q):
    value = float(opinionpool.kl_divergence(Gamma(torch.tensor(p[0]), torch.tensor(p[1])),
                                            Gamma(torch.tensor(q[0]), torch.tensor(q[1]))))
    reference = float(gamma_kl(p, q))
    assert abs(value - reference) <= 1e-13 * reference, (value, reference)


#: dyadic weights, exact in float64 and normalised exactly: a pool's log normaliser moves with its weights by the
#: experts' KL divergence from the combination, about 1e15 here, so weights 0.3 and 0.7 would fix it only to 0.1
WEIGHTS = (0.375, 0.625)


def beta_pair(a, b, weights):
    return [Beta(torch.tensor(a[0]), torch.tensor(a[1])), Beta(torch.tensor(b[0]), torch.tensor(b[1]))], weights


@pytest.mark.parametrize("huge", [1e4, 1e8, 1e12, 1e16])
@pytest.mark.parametrize("other", [(2.0, 3.0), (1.0, 1.00000002)], ids=["far", "near"])
def test_log_linear_pool_normaliser(huge, other):
    """Order 0: ``log Z = log B(sum_j w_j c_j) - sum_j w_j log B(c_j)`` (concentrations are natural parameters, the
    base measures cancel), at most 0; it came out +1.0 at 1e16 (beside Beta(2, 2) with equal weights, for -8.72)."""
    (a, b), w = ((huge, huge), tuple(huge * x if x < 2 else x for x in other)), WEIGHTS
    experts, weights = beta_pair(a, b, list(w))
    pool = opinionpool.holder(experts, alpha=0.0, weights=weights)
    combined = [w[0] * mp(x) + w[1] * mp(y) for x, y in zip(a, b)]
    reference = log_beta(*combined) - mp(w[0]) * log_beta(*a) - mp(w[1]) * log_beta(*b)
    assert abs(float(pool.log_normalizer) - float(reference)) <= 1e-12 * abs(float(reference))


@pytest.mark.parametrize("huge", [1e8, 1e16])
def test_hellinger_pool_normaliser_and_density(huge):
    """Order 1/2: ``Z = w1^2 + w2^2 + 2 w1 w2 BC`` with the Bhattacharyya coefficient ``BC = B((a + c) / 2, (b + d)
    / 2) / sqrt(B(a, b) B(c, d))``; it was +0.54 for -0.54 at 1e16 (weights 0.3 and 0.7)."""
    (a, b), w = ((huge, 2 * huge), (2.0, 3.0)), WEIGHTS
    experts, weights = beta_pair(a, b, list(w))
    pool = opinionpool.holder(experts, alpha=0.5, weights=weights)
    log_bc = log_beta(*[(mp(x) + mp(y)) / 2 for x, y in zip(a, b)]) - (log_beta(*a) + log_beta(*b)) / 2
    reference = mpmath.log(mp(w[0]) ** 2 + mp(w[1]) ** 2 + 2 * mp(w[0]) * mp(w[1]) * mpmath.exp(log_bc))
    assert abs(float(pool.log_normalizer) - float(reference)) <= 1e-12 * abs(float(reference))
    z = 1 / 3  # the first expert's mean
    densities = [dirichlet_log_density(c, (z, 1 - mp(z))) for c in (a, b)]
    mixed = (mp(w[0]) * mpmath.exp(densities[0] / 2) + mp(w[1]) * mpmath.exp(densities[1] / 2)) ** 2
    expected = mpmath.log(mixed) - reference
    value = float(pool.log_prob(torch.tensor(z)))
    assert abs(value - float(expected)) <= 1e-11 * abs(float(expected)), (value, float(expected))


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1 / 3, 0.5, 1.0])
@pytest.mark.parametrize("huge", [1e6, 1e10, 1e14, 1e17])
def test_pool_normalisers_of_order_at_most_one_are_at_most_one(alpha, huge):
    """``Z = int (sum_j w_j q_j^alpha)^(1/alpha) <= int sum_j w_j q_j = 1`` for alpha <= 1 (the power mean grows with
    its order), for experts near and far apart."""
    for other in ((huge * 1.0001, huge * 0.9999), (3.0, 2.0), (huge, 1.0)):
        experts, weights = beta_pair((huge, huge), other, [0.4, 0.6])
        log_z = float(opinionpool.holder(experts, alpha=alpha, weights=weights).log_normalizer)
        assert math.isfinite(log_z) and log_z <= 1e-12, (other, log_z)
