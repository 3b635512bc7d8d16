"""Gamma, Beta and Dirichlet take their concentrations as natural parameters (base measure 1 / z): tiny
concentrations keep their digits in float32 and float64, and products with weights not summing to one carry the
base measure's extra powers. References: scipy.stats densities, torch's KL, quadrature of the product."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch.distributions import Bernoulli, Beta, Binomial, Dirichlet, Gamma, Poisson

import opinionpool
from opinionpool import CustomFamily
from tests.opinionpool.test_symbolic import symbolic_gamma

POINT = 0.3
DIRICHLET_POINT = (0.3, 0.5, 0.2)


def tensor(x, dtype):
    return torch.tensor(x, dtype=dtype)


def gamma(a, dtype):
    return Gamma(tensor(a, dtype), tensor(2.0, dtype))


def beta(a, dtype):
    return Beta(tensor(a, dtype), tensor(0.5, dtype))


def dirichlet(a, dtype):
    return Dirichlet(tensor([a, 0.5, 2.0], dtype))


def reference_log_density(name, a):
    """scipy's log density, in float64, of the expert the test builds with concentration ``a``."""
    if name == "gamma":
        return stats.gamma(a, scale=0.5).logpdf(POINT)
    if name == "beta":
        return stats.beta(a, 0.5).logpdf(POINT)
    return stats.dirichlet([a, 0.5, 2.0]).logpdf(DIRICHLET_POINT)


BUILDERS = {"gamma": gamma, "beta": beta, "dirichlet": dirichlet}


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("dtype, a, tolerance", [(torch.float32, 1e-8, 2e-6), (torch.float32, 1e-5, 2e-6),
                                                 (torch.float32, 0.1, 2e-6), (torch.float64, 1e-8, 1e-13),
                                                 (torch.float64, 1e-17, 1e-13), (torch.float64, 1e-300, 1e-13)])
def test_pools_of_tiny_concentrations_keep_their_digits(name, dtype, a, tolerance):
    """The pool of two identical experts is the expert: its moment-matched log density equals scipy's in float64.
    With concentration - 1 as the natural parameter, float32 stored 1e-8 as -1 (an expert outside the family) and
    1e-5 lost 1.4e-3 of its log density; float64 lost half the digits of 1e-8 and rejected 1e-17."""
    expert = BUILDERS[name](a, dtype)
    point = tensor(DIRICHLET_POINT if name == "dirichlet" else POINT, dtype)
    reference = reference_log_density(name, a)
    scale = max(1.0, abs(reference))
    for alpha in (0.5, 0.0, 1.0):
        matched = opinionpool.holder([expert, expert], alpha=alpha, weights=[0.3, 0.7]).moment_match()
        got = float(matched.log_prob(point))
        assert abs(got - reference) <= tolerance * scale, (alpha, got, reference)
    product = opinionpool.poe([expert, expert], weights=[0.3, 0.7])
    assert abs(float(product.log_prob(point)) - reference) <= tolerance * scale


@pytest.mark.parametrize("a", [1e-10, 1e-17, 1e-200])
def test_kl_and_chernoff_of_tiny_concentrations(a):
    """Against torch's closed-form KL (from the concentrations) and the Beta-function form of the Chernoff
    coefficient, written here from scipy's gammaln."""
    from scipy.special import gammaln

    p, q = Gamma(tensor(a, torch.float64), tensor(1.0, torch.float64)), Gamma(tensor(3 * a, torch.float64),
                                                                               tensor(2.0, torch.float64))
    expected = float(torch.distributions.kl_divergence(p, q))
    assert float(opinionpool.kl_divergence(p, q)) == pytest.approx(expected, rel=1e-12)
    # int p^s q^(1-s) = Gamma(u) / (s r_p + (1 - s) r_q)^u * r_p^(s a_p) r_q^((1-s) a_q) / (Gamma(a_p)^s Gamma(a_q)^(1-s))
    s, (ap, rp), (aq, rq) = 0.3, (a, 1.0), (3 * a, 2.0)
    u = s * ap + (1 - s) * aq
    log_c = (gammaln(u) - u * math.log(s * rp + (1 - s) * rq) + s * ap * math.log(rp) + (1 - s) * aq * math.log(rq)
             - s * gammaln(ap) - (1 - s) * gammaln(aq))
    assert float(opinionpool.log_chernoff_coefficient(p, q, s)) == pytest.approx(log_c, rel=1e-12, abs=1e-14)
    b1, b2 = Beta(tensor(a, torch.float64), tensor(0.5, torch.float64)), Beta(tensor(2 * a, torch.float64),
                                                                              tensor(0.5, torch.float64))
    expected = float(torch.distributions.kl_divergence(b1, b2))
    assert float(opinionpool.kl_divergence(b1, b2)) == pytest.approx(expected, rel=1e-12)


def log_quadrature_product(experts, weights, lower, upper):
    """``log prod_j q_j(z)^(w_j)`` at POINT minus the log of its integral, by scipy quad on the support (scipy
    densities, split at the point so the singular ends are each integrated by an endpoint-aware rule)."""
    def log_unnormalised(z):
        return sum(w * d.logpdf(z) for w, d in zip(weights, experts))

    peak = log_unnormalised(POINT)
    total = sum(integrate.quad(lambda z: math.exp(log_unnormalised(z) - peak), lo, hi, epsabs=0, epsrel=1e-12,
                               limit=200)[0] for lo, hi in ((lower, POINT), (POINT, upper)))
    return -math.log(total)


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.5, 2.0], [0.25, 0.5]])
def test_products_with_unnormalised_weights(weights):
    """``poe`` with weights summing to s has the base measure h^s: the Gamma and Beta products are the normalised
    products of the densities (quadrature), and the Dirichlet product has concentration sum_j w_j (alpha_j - 1) + 1."""
    gammas = [Gamma(tensor(2.0, torch.float64), tensor(1.0, torch.float64)),
              Gamma(tensor(3.5, torch.float64), tensor(2.0, torch.float64))]
    reference = log_quadrature_product([stats.gamma(2.0, scale=1.0), stats.gamma(3.5, scale=0.5)], weights, 0,
                                       math.inf)
    assert float(opinionpool.poe(gammas, weights=weights).log_prob(tensor(POINT, torch.float64))) == pytest.approx(
        reference, rel=1e-9)
    betas = [Beta(tensor(2.0, torch.float64), tensor(3.0, torch.float64)),
             Beta(tensor(1.5, torch.float64), tensor(4.0, torch.float64))]
    reference = log_quadrature_product([stats.beta(2.0, 3.0), stats.beta(1.5, 4.0)], weights, 0, 1)
    assert float(opinionpool.poe(betas, weights=weights).log_prob(tensor(POINT, torch.float64))) == pytest.approx(
        reference, rel=1e-9)
    concentrations = np.array([[2.0, 1.5, 1.0], [3.0, 1.2, 4.0]])
    product = opinionpool.poe([Dirichlet(torch.from_numpy(c)) for c in concentrations], weights=weights)
    expected = (np.array(weights)[:, None] * (concentrations - 1)).sum(0) + 1
    np.testing.assert_allclose(product.concentration.numpy(), expected, rtol=1e-14)


def test_products_leaving_the_family_raise_and_normalised_ones_do_not():
    """Poisson's 1 / z! and the binomial coefficient are not exp(<c, T(z)>): the product with weights not summing to
    one is not a Poisson or Binomial (Conway-Maxwell-Poisson for two Poissons), so poe says so; weights summing to one
    cancel the base measure and give the log-linear pool."""
    poissons = [Poisson(tensor(2.0, torch.float64)), Poisson(tensor(5.0, torch.float64))]
    with pytest.raises(ValueError, match=r"the product of these Poisson experts with weights \[1, 1\] is not a "
                                         "Poisson distribution"):
        opinionpool.poe(poissons)
    product = opinionpool.poe(poissons, weights=[0.1, 0.9])
    assert float(product.rate) == pytest.approx(2.0 ** 0.1 * 5.0 ** 0.9, rel=1e-14)
    # rounding in the sum of the weights is not an excess
    assert float(opinionpool.poe([poissons[0]] * 3, weights=[0.1, 0.2, 0.7]).rate) == pytest.approx(2.0, rel=1e-14)
    with pytest.raises(ValueError, match="Binomial"):
        opinionpool.poe([Binomial(3, tensor(0.2, torch.float64)), Binomial(3, tensor(0.4, torch.float64))])
    # a Bernoulli's base measure is constant: p1 p2 / (p1 p2 + (1 - p1)(1 - p2))
    both = opinionpool.poe([Bernoulli(tensor(0.2, torch.float64)), Bernoulli(tensor(0.4, torch.float64))])
    assert float(both.probs) == pytest.approx(0.08 / (0.08 + 0.48), rel=1e-13)


def custom_gamma(base_measure_natural):
    """Gamma with the concentration as natural parameter and h(z) = 1 / z, as the builtin one."""
    return CustomFamily(lambda eta: torch.lgamma(eta[..., 0]) - eta[..., 0] * torch.log(-eta[..., 1]),
                        lambda z: torch.stack((torch.log(z), z), -1), lambda z: -torch.log(z), num_params=2,
                        natural_domain=lambda eta: (eta[..., 0] > 0) & (eta[..., 1] < 0),
                        base_measure_natural=base_measure_natural, name="user Gamma")


def test_custom_and_symbolic_families_products():
    """A custom family's products with unit weights need its base measure's c; without it (unknown) poe raises.
    A symbolic family with a constant base measure (h = 1, natural parameter concentration - 1) knows it."""
    params = torch.tensor([[2.0, -1.0], [3.5, -2.0]], dtype=torch.float64)
    builtin = opinionpool.poe([Gamma(tensor(2.0, torch.float64), tensor(1.0, torch.float64)),
                               Gamma(tensor(3.5, torch.float64), tensor(2.0, torch.float64))])
    known = custom_gamma([-1.0, 0.0])
    product = opinionpool.poe([known.expert(p) for p in params])
    assert torch.allclose(product.params, torch.stack((builtin.concentration, -builtin.rate)), rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="user Gamma experts with weights"):
        unknown = custom_gamma(None)
        opinionpool.poe([unknown.expert(p) for p in params])
    with pytest.raises(ValueError, match=r"base_measure_natural must have num_params=2 entries, got \(-1.0,\)"):
        custom_gamma([-1.0])
    family = symbolic_gamma()
    product = opinionpool.poe([family.expert(p - torch.tensor([1.0, 0.0], dtype=torch.float64)) for p in params])
    assert torch.allclose(product.params, torch.stack((builtin.concentration - 1, -builtin.rate)), rtol=1e-12, atol=0)


def test_the_products_weight_gradient_counts_the_base_measure():
    """d concentration / d w_j = a_j - 1 also where the weights sum to one (the base measure's term has no value there
    but keeps its gradient); gradcheck's finite differences are the reference."""
    a, rate = torch.tensor([2.0, 3.5, 0.7], dtype=torch.float64), torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(opinionpool.poe(Gamma(a, rate), weights=weights).concentration, weights)
    np.testing.assert_allclose(grad.numpy(), (a - 1).numpy(), rtol=1e-14)
    point = tensor(0.7, torch.float64)
    assert torch.autograd.gradcheck(lambda w: opinionpool.poe(Gamma(a, rate), weights=w).log_prob(point), (weights,))
    betas = Beta(torch.tensor([2.0, 1.5], dtype=torch.float64), torch.tensor([3.0, 4.0], dtype=torch.float64))
    pair = torch.tensor([0.25, 0.75], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: opinionpool.poe(betas, weights=w).log_prob(point), (pair,))


def test_a_small_real_excess_of_float32_weights_is_not_rounding():
    """100 float32 weights summing to 1.0001: the excess is the product's, not the sum's rounding."""
    weights = torch.full((100,), 1.0001 / 100, dtype=torch.float32)  # (the library tests' default is float64)
    experts = Gamma(torch.full((100,), 0.01, dtype=torch.float32), torch.ones(100, dtype=torch.float32))
    got = opinionpool.poe(experts, weights=weights).concentration
    expected = float((weights.double() * (0.01 - 1)).sum() + 1)  # sum_j w_j (a_j - 1) + 1
    # a few float32 steps of the O(1) terms it sums; taking the excess (1e-4) for rounding is 1 % off
    assert got.dtype == torch.float32 and float(got) == pytest.approx(expected, abs=4 * torch.finfo(torch.float32).eps)


def test_kl_that_float64_cannot_give_raises():
    """Concentrations 1e-200 and 1.0000000001e-200: KL 5e-21 (mpmath), but the direct form cancels (it gave -4e-14)
    and the curvature 1 / a^2 overflows; a clear error instead of a wrong number."""
    p = Gamma(tensor(1e-200, torch.float64), tensor(1.0, torch.float64))
    q = Gamma(tensor(1.0000000001e-200, torch.float64), tensor(1.0, torch.float64))
    with pytest.raises(ValueError, match=r"Gamma KL divergence: neither form is accurate in torch.float64 .*1e-200"):
        opinionpool.kl_divergence(p, q)


@pytest.mark.parametrize("concentration", [2e3, 1e4, 1e6])
def test_kl_of_a_concentrated_expert_against_a_diffuse_one(concentration):
    """KL(Beta(c, c) || Beta(1, 1)) and its Gamma, Dirichlet and von Mises twins: the direct form keeps 12 digits
    but falls below 1e-3 of its terms, and the remainder's 16-point rule on so long a path (the curvature changes
    by orders of magnitude) gave 3.19 for 3.42 at c = 2000, 3.34 for 4.23 at 1e4. References: torch's KL (its own
    formula), and quadrature of p log(p / q) for the von Mises."""
    from torch.distributions import VonMises, kl_divergence

    c, one = tensor(concentration, torch.float64), tensor(1.0, torch.float64)
    # both forms subtract terms of about c: the machine epsilon times c, relative to a KL of a few units
    tolerance = max(1e-10, 100 * torch.finfo(torch.float64).eps * concentration)
    for p, q in ((Beta(c, c), Beta(one, one)), (Gamma(c, c), Gamma(one, one)),
                 (Dirichlet(c.expand(3)), Dirichlet(one.expand(3)))):
        assert float(opinionpool.kl_divergence(p, q)) == pytest.approx(float(kl_divergence(p, q)), rel=tolerance)
    # scipy's von Mises density (torch's normaliser is a polynomial approximation, about 1e-7 off); the concentrated
    # density lives within a few 1 / sqrt(c) of its mode: integrated there (the rest is below 1e-300)
    width = 40 / math.sqrt(concentration)

    def integrand(z):
        log_p, log_q = stats.vonmises.logpdf(z, concentration, loc=1.0), stats.vonmises.logpdf(z, 1.0, loc=0.0)
        return math.exp(log_p) * (log_p - log_q)

    expected = integrate.quad(integrand, 1 - width, 1 + width, epsabs=0, epsrel=1e-12, limit=200)[0]
    got = opinionpool.kl_divergence(VonMises(one, c), VonMises(0 * one, one))
    assert float(got) == pytest.approx(expected, rel=max(tolerance, 1e-9))


@pytest.mark.parametrize("rate", [1e160, 1e200, 1e300])
def test_kl_whose_curvature_underflows_is_not_zero(rate):
    """Exponentials of rates 1e200 and 1.5e200: the curvature rate^-2 underflows to 0 on the whole path, and the
    remainder 0 was taken for a KL of 0.0945 (at 1e160 it was 2e-5 off); the direct form serves. Exact: KL =
    log(rate_p / rate_q) + rate_q / rate_p - 1."""
    from torch.distributions import Exponential

    p, q = Exponential(tensor(rate, torch.float64)), Exponential(tensor(1.5 * rate, torch.float64))
    assert float(opinionpool.kl_divergence(p, q)) == pytest.approx(math.log(1 / 1.5) + 0.5, rel=1e-10)


@pytest.mark.parametrize("scale", [1e-50, 1e-110, 1e-150])
def test_kl_gradient_of_tiny_concentrations_is_analytic(scale):
    """KL(Gamma(a, 1) || Gamma(b, 1)) = (a - b) psi(a) - log Gamma(a) + log Gamma(b): d/da = (a - b) psi'(a) and
    d/db = psi(b) - psi(a). Autograd through the remainder form needed third derivatives of log Gamma, which
    overflow below about 1e-103 (NaN and -inf beside a right value)."""
    a = tensor(scale, torch.float64).requires_grad_(True)
    b = tensor(1.3 * scale, torch.float64).requires_grad_(True)
    kl = opinionpool.kl_divergence(Gamma(a, tensor(1.0, torch.float64)), Gamma(b, tensor(1.0, torch.float64)))
    grad_a, grad_b = torch.autograd.grad(kl, (a, b))
    with torch.no_grad():
        assert float(grad_a) == pytest.approx(float((a - b) * torch.polygamma(1, a)), rel=1e-12)
        assert float(grad_b) == pytest.approx(float(torch.digamma(b) - torch.digamma(a)), rel=1e-12)


def test_kl_gradient_that_overflows_raises():
    """Below about 1e-154 the curvature 1 / a^2 is infinite in float64: the value is still right (direct form),
    its gradient cannot be, and the backward pass says so rather than returning NaN."""
    a = tensor(1e-160, torch.float64).requires_grad_(True)
    kl = opinionpool.kl_divergence(Gamma(a, tensor(1.0, torch.float64)), Gamma(tensor(1.3e-160, torch.float64),
                                                                              tensor(1.0, torch.float64)))
    assert math.isfinite(float(kl))
    with pytest.raises(ValueError, match=r"Gamma KL divergence: its gradient overflows in torch.float64 .*1e-160"):
        kl.backward()


def mpmath_moment_match(concentrations, weights):
    """The Dirichlet (or Beta: two categories) whose E[log z] is the mixture's, by mpmath's findroot at 50 digits."""
    import mpmath

    mpmath.mp.dps = 50
    rows = [[mpmath.mpf(c) for c in row] for row in concentrations]
    weights = [mpmath.mpf(w) for w in weights]
    target = [sum(w * (mpmath.digamma(row[k]) - mpmath.digamma(sum(row))) for w, row in zip(weights, rows))
              for k in range(len(rows[0]))]

    def equations(*alpha):
        return [mpmath.digamma(alpha[k]) - mpmath.digamma(sum(alpha)) - target[k] for k in range(len(alpha))]

    start = [sum(w * row[k] for w, row in zip(weights, rows)) for k in range(len(rows[0]))]
    return [float(x) for x in mpmath.findroot(equations, start, tol=mpmath.mpf(10) ** -40, maxsteps=200)]


@pytest.mark.parametrize(("rate", "value"), [(1e8, 1e8), (1e12, 1e12 + 1e6), (1e15, 1e15), (1e20, 1e20 + 3e10),
                                             (3.0, 0.0), (3.0, 7.0), (0.5, 40.0), (1e-8, 3.0), (50.0, 10.0)])
def test_poisson_log_prob_at_large_rates_against_mpmath(rate, value):
    """z log r - r - log z! has terms of r log r: float64 kept 7 digits at a rate of 1e8 and none at 1e15 (-18.875
    for -18.188). Loader's deviance form keeps them all; its stated term size bounds the error; the gradient in the
    rate is z / r - 1."""
    import mpmath

    mpmath.mp.dps = 40
    expected = mpmath.mpf(value) * mpmath.log(rate) - rate - mpmath.loggamma(mpmath.mpf(value) + 1)
    family = opinionpool.families.PoissonFamily()
    params = torch.tensor([rate], dtype=torch.float64, requires_grad=True)
    got = family.log_prob(params, torch.tensor(value, dtype=torch.float64))
    assert float(got) == pytest.approx(float(expected), rel=1e-14, abs=1e-300)
    size = family.log_prob_term_size(params.detach(), torch.tensor(value, dtype=torch.float64))
    assert abs(float(got) - float(expected)) <= 4 * torch.finfo(torch.float64).eps * float(size)
    (gradient,) = torch.autograd.grad(got, params)
    assert float(gradient) == pytest.approx(float(mpmath.mpf(value) / rate - 1), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize(("count", "probability", "value"), [
    (10**12, 0.3, 3 * 10**11 + 5 * 10**5), (10**8, 0.5, 5 * 10**7), (10**15, 1e-12, 1000), (10, 0.3, 0), (10, 0.3, 10),
    (10, 0.3, 4), (1000, 1e-9, 2), (1000, 1 - 1e-9, 998), (2, 0.5, 1)])
def test_binomial_log_prob_at_large_counts_against_mpmath(count, probability, value):
    """The binomial coefficient's log-gammas are of size n log n: float64 kept 3 digits at n = 1e12 (-14.5502 for
    -14.5494). Loader's form keeps them, up to the rounding of p (from the parameters, which are exact), to which the
    log-probability is sensitive by z - n p. The reference takes p from the float64 parameters themselves."""
    import mpmath

    mpmath.mp.dps = 40
    params = torch.tensor([math.log1p(-probability), math.log(probability)], dtype=torch.float64)
    log_q, log_p = (mpmath.mpf(float(x)) for x in params)
    p = mpmath.exp(log_p) / (mpmath.exp(log_p) + mpmath.exp(log_q))
    expected = mpmath.log(mpmath.binomial(count, value)) + value * mpmath.log(p) + (count - value) * mpmath.log1p(-p)
    got = opinionpool.families.BinomialFamily(count).log_prob(params, torch.tensor(float(value), dtype=torch.float64))
    tolerance = 1e-14 * abs(float(expected)) + 4 * torch.finfo(torch.float64).eps * abs(float(value - count * p))
    assert abs(float(got) - float(expected)) <= tolerance


def test_entropy_of_poisson_and_binomial_pools_against_scipy_sums():
    """The log-linear pool of Poissons is one Poisson, whose torch entropy raises NotImplementedError (it has no
    carrier measure): the pool's entropy raised too instead of falling back to the numerical estimate. Mixtures with
    a rate of 1e4 (or 10 000 trials) raised from the bracket check: the enumeration stated an error of 0 while its
    log u rounds by 1e-13 there. References: scipy's Poisson entropy and -sum p log p over scipy's pmfs."""
    f64 = torch.float64
    got = opinionpool.holder([Poisson(tensor(1.0, f64)), Poisson(tensor(3.0, f64))], alpha=0).entropy()
    assert float(got) == pytest.approx(stats.poisson(math.sqrt(3.0)).entropy(), rel=1e-12)
    for experts, pmf, support in (
            ([Poisson(tensor(1.0, f64)), Poisson(tensor(1e4, f64))],
             lambda k: 0.5 * stats.poisson(1.0).pmf(k) + 0.5 * stats.poisson(1e4).pmf(k), np.arange(40_000)),
            ([Binomial(10_000, tensor(0.3, f64)), Binomial(10_000, tensor(0.6, f64))],
             lambda k: 0.5 * stats.binom(10_000, 0.3).pmf(k) + 0.5 * stats.binom(10_000, 0.6).pmf(k),
             np.arange(10_001))):
        p = pmf(support)
        p = p[p > 0]
        assert float(opinionpool.holder(experts, alpha=1).entropy()) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-10)


def test_von_mises_moment_matching_at_location_zero():
    """E[sin z] is exactly 0 at location 0: the Newton solve's residual relative to it was 0/0, every trial step was
    accepted and the iterates diverged to a singular Jacobian. The mixture of VonMises(0, 1) and VonMises(0, 100)
    matches the VonMises(0, kappa) with I1/I0(kappa) the mixture's mean resultant (scipy's brentq)."""
    from scipy import optimize, special
    from torch.distributions import VonMises

    f64 = torch.float64
    for k1, k2 in ((1.0, 100.0), (0.1, 1000.0), (0.01, 1e5)):
        pool = opinionpool.holder([VonMises(tensor(0.0, f64), tensor(k1, f64)),
                                   VonMises(tensor(0.0, f64), tensor(k2, f64))], alpha=1)
        target = sum(0.5 * special.i1e(k) / special.i0e(k) for k in (k1, k2))
        expected = optimize.brentq(lambda k, t=target: special.i1e(k) / special.i0e(k) - t, 1e-6, 1e6, xtol=1e-15,
                                   rtol=1e-15)
        assert float(pool.moment_match().concentration) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("large", [1e6, 1e8])
def test_moment_matching_large_concentrations_against_mpmath(large):
    """Beta(3, 1e8) and Beta(5, 1e8): the Newton solve's line search compared the objective A(eta) - eta . m, about
    1, whose log-gammas of 1e8 round by 1e-8, with a slack of 1e-12 of it, refused every step and raised (at
    alpha = 1 with 1e8, alpha = 1/2 with 1e6); a step that lowers the relative residual is taken as well."""
    rows, weights = [[3.0, large], [5.0, large]], [0.3, 0.7]
    experts = Beta(torch.tensor([r[0] for r in rows], dtype=torch.float64),
                   torch.tensor([r[1] for r in rows], dtype=torch.float64))
    matched = opinionpool.holder(experts, alpha=1, weights=weights).moment_match()
    np.testing.assert_allclose([float(matched.concentration1), float(matched.concentration0)],
                               mpmath_moment_match(rows, weights), rtol=1e-8)
    # alpha = 1/2: the matched Beta's E[log z], E[log(1 - z)] are the pool's (its components from its own weights)
    pool = opinionpool.holder(experts, alpha=0.5, weights=weights)
    components = pool.component_params
    component_rows = [[float(components[c, 0]), float(components[c, 1])] for c in range(components.shape[0])]
    matched = pool.moment_match()
    np.testing.assert_allclose([float(matched.concentration1), float(matched.concentration0)],
                               mpmath_moment_match(component_rows, pool.mixture_weights.tolist()), rtol=1e-8)


@pytest.mark.parametrize("small", [1e-8, 1e-13, 1e-17])
def test_moment_matching_tiny_concentrations_against_mpmath(small):
    """E[log(1 - z)] = psi(b) - psi(a + b) of a Beta(1e-13, 0.5) is a difference of digammas near -2 equal to -5e-13:
    it kept 4 digits (1e-15: none; 1e-17: the Newton solve failed); a Taylor series keeps them. The same for a
    Dirichlet whose other concentrations are tiny. The mixture (alpha = 1) is moment-matched; the rest of the
    error is the Newton solve's tolerance."""
    beta_rows, weights = [[small, 0.5], [3 * small, 0.7]], [0.3, 0.7]
    matched = opinionpool.holder(Beta(torch.tensor([r[0] for r in beta_rows], dtype=torch.float64),
                                      torch.tensor([r[1] for r in beta_rows], dtype=torch.float64)),
                                 alpha=1, weights=weights).moment_match()
    expected = mpmath_moment_match(beta_rows, weights)
    np.testing.assert_allclose([float(matched.concentration1), float(matched.concentration0)], expected, rtol=1e-9)
    dirichlet_rows = [[0.5, small, 2 * small], [0.7, 3 * small, small]]
    matched = opinionpool.holder(Dirichlet(torch.tensor(dirichlet_rows, dtype=torch.float64)), alpha=1,
                                 weights=weights).moment_match()
    np.testing.assert_allclose(matched.concentration.numpy(), mpmath_moment_match(dirichlet_rows, weights), rtol=1e-9)


@pytest.mark.parametrize("alpha", [2.0, 0.3, -1.0])
def test_float32_pools_of_small_concentrations_sample_in_float64(alpha):
    """torch's float32 Dirichlet sampler clamps coordinates below 1.2e-38 to it: at concentrations 0.03-0.05 about
    one draw in a hundred, whose weights biased log Z (float32 pools sampled in float32). Importance sampling of
    non-Gaussian pools now draws in float64. Reference: the float64 pool's estimate from other draws (seed 1), which
    clamps nothing here; the two must agree within three combined standard errors, for log Z and the mean."""
    concentrations = [[0.03, 0.05, 0.4], [0.04, 0.3, 0.035]]
    estimates = []
    for dtype, seed in ((torch.float32, 0), (torch.float64, 1)):
        pool = opinionpool.holder(Dirichlet(torch.tensor(concentrations, dtype=dtype)), alpha, [0.4, 0.6],
                                  method="importance")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no draw clamped, in either
            estimates.append(pool.estimate(["mean"], method="importance", num_samples=50_000, seed=seed))
    single, double = estimates
    assert single.log_normalizer.value.dtype == torch.float32 and single.mean.value.dtype == torch.float32
    for name in ("log_normalizer", "mean"):
        got, want = getattr(single, name), getattr(double, name)
        spread = 3 * (got.error.double() ** 2 + want.error ** 2).sqrt()
        assert bool(((got.value.double() - want.value).abs() <= spread).all()), (name, got, want)


def test_the_float64_copy_follows_parameters_changed_in_place():
    """The float64 copy importance sampling draws from was rebuilt only for a new batch shape: after an in-place
    step on the float32 concentrations the pool returned the old log Z (93 stated errors off) and an entropy 95 off.
    Reference: a fresh pool of the new concentrations, same seed (the same draws)."""
    concentrations = torch.tensor([[0.5, 1.5, 2.0], [2.0, 0.7, 1.1]], dtype=torch.float32)
    pool = opinionpool.holder(Dirichlet(concentrations), 2.0, [0.4, 0.6], method="importance")
    pool.estimate(method="importance", num_samples=20_000, seed=0)
    with torch.no_grad():
        concentrations.mul_(4.0)
    fresh = opinionpool.holder(Dirichlet(concentrations.clone()), 2.0, [0.4, 0.6], method="importance")
    for name in ("estimate", "entropy_estimate"):
        got, want = (getattr(p, name)(method="importance", num_samples=20_000, seed=0) for p in (pool, fresh))
        got, want = (e.log_normalizer if name == "estimate" else e for e in (got, want))
        assert torch.equal(got.value, want.value) and torch.equal(got.error, want.error), name


def test_importance_sampling_flags_draws_torch_clamped_to_the_smallest_float():
    """torch's Dirichlet sampler clamps coordinates below the smallest normal float to it: at concentrations of
    0.002-0.05 a third of float32 coordinates and some float64 ones, and the importance estimate (log Z 0.11 for
    0.22 by a log-space reference, 270 stated errors off) was returned silently. It now warns; ordinary
    concentrations do not."""
    concentrations = torch.tensor([[0.005, 0.01, 0.02], [0.03, 0.002, 0.05]])
    pool = opinionpool.holder(Dirichlet(concentrations), 2.0, [0.4, 0.6], num_samples=20_000)
    with pytest.warns(RuntimeWarning, match=r"proposals were clamped to the smallest normal"):
        pool.log_normalizer
    ordinary = opinionpool.holder(Dirichlet(concentrations + 1.0), 2.0, [0.4, 0.6], num_samples=20_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.isfinite(ordinary.log_normalizer)


@pytest.mark.parametrize("dtype, shape, gap", [(torch.float64, 1e5, 1e-6), (torch.float32, 1e5, 1e-4),
                                               (torch.float64, 3e6, 1e-4)])
def test_moment_matching_nearly_equal_gammas_of_large_shape(dtype, shape, gap):
    """The two-parameter Newton solve stopped at the rounding of E[log x] - log E[x] (about -1/(2a), beside terms of
    11.5) and raised "did not converge" for Gamma(1e5) experts 1e-6 apart. Reference: the mixture's E[x] and E[log
    x] from the experts' own (E[log x] = psi(a) - log b), and the shape solving log a - psi(a) = log E[x] - E[log
    x] by mpmath's root finder at 40 digits."""
    import mpmath

    experts = [Gamma(tensor(shape, dtype), tensor(shape, dtype)), Gamma(tensor(shape * (1 + gap), dtype),
                                                                        tensor(shape, dtype))]
    weights = [0.3, 0.7]
    matched = opinionpool.holder(experts, alpha=1, weights=weights).moment_match()
    with mpmath.workdps(40):
        shapes = [mpmath.mpf(float(e.concentration)) for e in experts]
        rate = mpmath.mpf(float(experts[0].rate))
        mean = sum(w * a / rate for w, a in zip(weights, shapes))
        mean_log = sum(w * (mpmath.digamma(a) - mpmath.log(rate)) for w, a in zip(weights, shapes))
        s = mpmath.log(mean) - mean_log
        a = mpmath.findroot(lambda x: mpmath.log(x) - mpmath.digamma(x) - s, shapes[1])
    # float64: the mean parameters' own rounding (terms of 11.5 for a difference of 5e-6) bounds the shape's digits
    assert float(matched.concentration) == pytest.approx(float(a), rel=1e-9 if dtype == torch.float64 else 1e-4)
    assert float(matched.rate) == pytest.approx(float(a / mean), rel=1e-9 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("dtype, a, b", [(torch.float32, 1e-25, 1e-25), (torch.float32, 1e13, 1e13),
                                         (torch.float32, 1e13, 1.0), (torch.float64, 1e-170, 1e-170),
                                         (torch.float64, 1e8, 1e-9), (torch.float64, 2.0, 3.0)])
def test_beta_and_dirichlet_variances_at_extreme_concentrations(dtype, a, b):
    """torch's a b / (t^2 (t + 1)) overflowed or underflowed: NaN for float32 Beta(1e-25, 1e-25) (1/4), 0 for
    Beta(1e13, 1e13) (1.25e-14); the Dirichlet covariance's diagonal m (1 - m) / (t + 1) cancelled (0 for 1e-25).
    Reference: the exact value at 40 digits."""
    import mpmath

    with mpmath.workdps(40):
        ca, cb = mpmath.mpf(a), mpmath.mpf(b)
        exact = float(ca * cb / ((ca + cb) ** 2 * (ca + cb + 1)))
    beta = opinionpool.holder(Beta(tensor([a, a], dtype), tensor([b, b], dtype)), 0.5)  # the expert itself
    assert float(beta.experts.family.variance(beta.experts.params)[0]) == pytest.approx(exact, rel=1e-6)
    assert float(beta.variance) == pytest.approx(exact, rel=1e-5 if dtype == torch.float32 else 1e-10)
    dirichlet = opinionpool.holder(Dirichlet(tensor([[a, b], [a, b]], dtype)), 0.5)
    family, params = dirichlet.experts.family, dirichlet.experts.params
    assert family.variance(params)[0].tolist() == pytest.approx([exact, exact], rel=1e-6)
    covariance = family.mixture_covariance(torch.zeros(1, dtype=dtype), params[:1])
    assert covariance.flatten().tolist() == pytest.approx([exact, -exact, -exact, exact], rel=1e-6)


def test_gamma_variance_of_tiny_rates():
    """a / rate^2 with rate^2 underflowing: inf for float32 Gamma(1e-30, 1e-23), whose variance is 1e16."""
    pool = opinionpool.holder(Gamma(tensor([1e-30, 1e-30], torch.float32), tensor([1e-23, 1e-23], torch.float32)), 0.5)
    assert float(pool.experts.family.variance(pool.experts.params)[0]) == pytest.approx(1e16, rel=1e-6)


def test_moment_matching_far_apart_experts_of_large_concentration_is_quick():
    """The Newton solve's line search evaluated the log-normaliser at its full first step, far outside the natural
    domain (concentrations of -1e10 for Betas of 1e5), where torch's polygamma costs minutes per call: 496 s for
    this pool. Experts hundreds of standard deviations apart pool to the mixture with weights proportional to the
    squared weights, whose E[log z], E[log(1 - z)] (digammas) the matched Beta must have."""
    import time

    from scipy.special import digamma

    shapes = ((1e5, 2e5), (3e5, 1e5))
    experts = [Beta(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)) for a, b in shapes]
    start = time.perf_counter()
    matched = opinionpool.holder(experts, alpha=0.5, weights=[0.3, 0.7]).moment_match()
    assert time.perf_counter() - start < 20
    mix = np.array([0.3**2, 0.7**2]) / (0.3**2 + 0.7**2)
    expected = [float(sum(w * (digamma(own) - digamma(a + b)) for w, own, (a, b) in zip(mix, column, shapes)))
                for column in ([a for a, _ in shapes], [b for _, b in shapes])]
    a, b = float(matched.concentration1), float(matched.concentration0)
    assert [digamma(a) - digamma(a + b), digamma(b) - digamma(a + b)] == pytest.approx(expected, rel=1e-10)


def mpmath_mean_log(concentrations):
    """E[log z_k] of a Dirichlet (a Beta: two categories) at 50 digits."""
    import mpmath

    mpmath.mp.dps = 50
    row = [mpmath.mpf(c) for c in concentrations]
    return [mpmath.digamma(c) - mpmath.digamma(mpmath.fsum(row)) for c in row]


@pytest.mark.parametrize(("rows", "weights"), [
    ([[1e-6, 1e-9], [1e-9, 1e6], [1.0, 1e-9]], [0.01, 0.01, 1e-8]),
    ([[1e-9, 1e9], [1e3, 1e-9], [1e-6, 1e-6]], [0.5, 1e-8, 1.0]),
    ([[1e-6, 1e-3], [1e-3, 1e-9], [1e9, 1e-6]], [0.01, 1e-8, 0.5]),
    ([[1e-9, 1e9, 1.0, 1e-3], [1e-6, 1e9, 10.0, 1.0]], [1.0, 0.5]),
    ([[1e9, 1e-9], [1e3, 0.1]], [1.0, 1e-8]),
])
def test_moment_matching_mixtures_of_extreme_concentrations(rows, weights):
    """The Newton solve stepped in the concentrations: from the average start (5e5) towards a target of 1e-9 its
    step was 1e26, which 60 halvings left outside the positive orthant, and the solve raised after 100 iterations
    (10 of 600 random pools of concentrations in 1e-9 .. 1e9). It steps in their logarithms now. The matched
    Dirichlet's E[log z] must be the mixture's, both at 50 digits."""
    import mpmath

    matched = opinionpool.holder(Dirichlet(torch.tensor(rows, dtype=torch.float64)), alpha=1,
                                 weights=weights).moment_match()
    target = [mpmath.fsum(mpmath.mpf(w) * mpmath_mean_log(row)[k] for w, row in zip(weights, rows))
              / mpmath.fsum(mpmath.mpf(w) for w in weights) for k in range(len(rows[0]))]
    got = mpmath_mean_log(matched.concentration.tolist())
    assert max(float(abs(g - t) / abs(t)) for g, t in zip(got, target)) < 1e-9
    if len(rows[0]) == 2:  # the Beta path, the same solve
        beta = opinionpool.holder(Beta(torch.tensor([r[0] for r in rows], dtype=torch.float64),
                                       torch.tensor([r[1] for r in rows], dtype=torch.float64)), alpha=1,
                                  weights=weights).moment_match()
        got = mpmath_mean_log([float(beta.concentration1), float(beta.concentration0)])
        assert max(float(abs(g - t) / abs(t)) for g, t in zip(got, target)) < 1e-9


@pytest.mark.parametrize(("kappa_1", "kappa_2", "gap", "weight", "alpha"),
                         [(30.0, 3.0, 1.0, 0.3, 1.0), (300.0, 0.5, 4.9, 0.9, 1.0), (1e4, 10.0, 3.0, 0.5, 0.5),
                          (30.0, 0.5, 2.0, 0.3, 1 / 3), (3.0, 3.0, 4.9, 0.5, 0.5)])
def test_von_mises_moment_matching_of_ordinary_pools(kappa_1, kappa_2, gap, weight, alpha):
    """The mean-to-natural Newton solve accepted steps that lowered its residual while the convex objective rose
    (3 to 1e88 for VonMises(2, 30) and VonMises(1, 3) mixed 0.3 / 0.7) until the Jacobian was singular: about a fifth
    of an ordinary grid of pools raised. The matched member's E[cos z], E[sin z] against the pool's, by scipy
    quadrature of the pooled density on the circle."""
    from scipy import integrate
    from scipy import special as sp
    from scipy import stats as st
    from torch.distributions import VonMises

    f64 = torch.float64
    locs, kappas, weights = (2.0, 2.0 - gap), (kappa_1, kappa_2), (weight, 1 - weight)
    densities = [st.vonmises(k, loc=m) for m, k in zip(locs, kappas)]

    def pooled(z):
        return sum(w * d.pdf(z) ** alpha for w, d in zip(weights, densities)) ** (1 / alpha)

    # (a narrow expert: the quadrature is split at the experts' locations on the circle)
    breaks = sorted(((m + math.pi) % (2 * math.pi)) - math.pi for m in locs)
    total, cos_z, sin_z = (integrate.quad(lambda z, f=f: f(z) * pooled(z), -math.pi, math.pi, points=breaks,
                                          limit=500, epsabs=0, epsrel=1e-11)[0]
                           for f in (lambda z: 1.0, math.cos, math.sin))
    experts = [VonMises(torch.tensor(m, dtype=f64), torch.tensor(k, dtype=f64)) for m, k in zip(locs, kappas)]
    matched = opinionpool.holder(experts, alpha=alpha, weights=torch.tensor(weights, dtype=f64)).moment_match()
    kappa = float(matched.concentration)
    resultant = sp.ive(1, kappa) / sp.ive(0, kappa)
    assert resultant * math.cos(float(matched.loc)) == pytest.approx(cos_z / total, abs=1e-8)
    assert resultant * math.sin(float(matched.loc)) == pytest.approx(sin_z / total, abs=1e-8)
