"""Edges of the public API that a review found wrong, each against an independent reference (mpmath, float64,
finite differences): float32 densities at tiny and huge scales, Chernoff coefficients of orders outside [0, 1],
gradients at the edge of a support, orders of size 1e300, the last digits of moment matching by Newton's method,
seeds and empty samples."""

import math

import mpmath
import pytest
import torch
from torch.distributions import Bernoulli, Beta, Categorical, Gamma, MultivariateNormal, Normal, Poisson, VonMises

import opinionpool as op
from opinionpool.functional import diag_gaussian_log_prob
from opinionpool.numerical import log_power_mean


@pytest.mark.parametrize("scale", [1e-20, 1e-30, 1e20])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0])
def test_float32_densities_at_tiny_and_huge_scales(scale, alpha):
    """The squared deviation times exp(-logvar) left float32's range (-inf at 1e-20, NaN at 1e-30) although the
    log-density is about +-50."""
    loc = torch.tensor([0.0, 0.3 * scale])
    scales = torch.tensor([scale, 2 * scale])
    value = torch.tensor(0.1 * scale)
    got = op.holder(Normal(loc.float(), scales.float()), alpha, torch.tensor([0.6, 0.4])).log_prob(value.float())
    want = op.holder(Normal(loc, scales), alpha, torch.tensor([0.6, 0.4])).log_prob(value)
    assert math.isfinite(got.item()) and got.item() == pytest.approx(want.item(), rel=1e-6)
    z, mu, logvar = value.float().expand(3), loc[:1].float().expand(3), (2 * scales[:1].log()).float().expand(3)
    expected = Normal(loc[:1], scales[:1]).log_prob(value).item() * 3
    assert diag_gaussian_log_prob(z, mu, logvar).item() == pytest.approx(expected, rel=1e-6)


def _mp_gaussian_log_chernoff(mu_p, cov_p, mu_q, cov_q, a):
    """log int N(mu_p, cov_p)^a N(mu_q, cov_q)^(1 - a), in mpmath at 50 digits (matrices as lists of rows)."""
    with mpmath.workdps(50):
        a = mpmath.mpf(a)
        cp, cq = mpmath.matrix(cov_p), mpmath.matrix(cov_q)
        ca = a * cq + (1 - a) * cp
        delta = mpmath.matrix([mpmath.mpf(x) - mpmath.mpf(y) for x, y in zip(mu_p, mu_q)])
        quad = (delta.T * mpmath.inverse(ca) * delta)[0]
        return float(-a * (1 - a) * quad / 2 - mpmath.log(mpmath.det(ca)) / 2
                     + (1 - a) * mpmath.log(mpmath.det(cp)) / 2 + a * mpmath.log(mpmath.det(cq)) / 2)


@pytest.mark.parametrize("a", [2.0, 3.5, -0.5])
@pytest.mark.parametrize("loc", [0.0, 1e8])
def test_chernoff_orders_outside_the_unit_interval_do_not_cancel(a, loc):
    """For a outside [0, 1] the log-normalisers' form cancelled terms of their size: two Gaussians at 1e8 gave a
    Rényi divergence of order 2 of -0.5 for 0.022. Normal, full-covariance and Gamma experts against mpmath."""
    p, q = Normal(torch.tensor(loc + 0.0), torch.tensor(1.0)), Normal(torch.tensor(loc + 0.1), torch.tensor(1.05))
    want = _mp_gaussian_log_chernoff([loc], [[1.0]], [loc + 0.1], [[1.05**2]], a)
    assert op.log_chernoff_coefficient(p, q, a).item() == pytest.approx(want, rel=1e-8)
    if a > 0:  # Rényi orders are positive
        assert op.renyi_divergence(p, q, a).item() == pytest.approx(want / (a - 1), rel=1e-8)
    cov_p = torch.tensor([[1.0, 0.3], [0.3, 0.8]])
    cov_q = torch.tensor([[1.1, 0.25], [0.25, 0.9]])
    mu_p, mu_q = torch.tensor([loc, -loc]), torch.tensor([loc + 0.1, -loc + 0.05])
    want = _mp_gaussian_log_chernoff(mu_p.tolist(), cov_p.tolist(), mu_q.tolist(), cov_q.tolist(), a)
    got = op.log_chernoff_coefficient(MultivariateNormal(mu_p, cov_p), MultivariateNormal(mu_q, cov_q), a)
    assert got.item() == pytest.approx(want, rel=1e-8)
    # Gamma (shape, rate) of p and q; the order-a member has shape and rate a p + (1 - a) q (both natural)
    gamma_p, gamma_q = (3.0 + loc * 1e-6, 2.0), (3.5 + loc * 1e-6, 2.2)
    with mpmath.workdps(50):
        log_z = [mpmath.loggamma(k) - k * mpmath.log(r) for k, r in (gamma_p, gamma_q)]
        k_a, r_a = (a * mpmath.mpf(x) + (1 - a) * mpmath.mpf(y) for x, y in zip(gamma_p, gamma_q))
        want = float(mpmath.loggamma(k_a) - k_a * mpmath.log(r_a) - a * log_z[0] - (1 - a) * log_z[1])
    got = op.log_chernoff_coefficient(Gamma(*map(torch.tensor, gamma_p)), Gamma(*map(torch.tensor, gamma_q)), a)
    assert got.item() == pytest.approx(want, rel=1e-8, abs=1e-12)


def test_gradients_at_the_edge_of_the_support_are_finite():
    """A pool's log-density at z = 0 where one expert's density vanishes (Beta(2, 2), Gamma(3, .)) and another's is
    finite: the value was finite and the gradient NaN (log 0 times a zero incoming gradient). Against central
    differences of the log-density at the same point."""
    weights = torch.tensor([0.6, 0.4])

    def beta_pool(c1, alpha):
        return op.holder(Beta(c1, torch.tensor([2.0, 3.0])), alpha, weights).log_prob(torch.tensor(0.0))

    def gamma_pool(c, alpha):
        return op.holder(Gamma(c, torch.tensor([1.0, 2.0])), alpha, weights).log_prob(torch.tensor(0.0))

    # the expert whose density vanishes at 0 (the other, of exponent 0 there, cannot be moved either way: its
    # density at 0 jumps to 0 or infinity)
    for pool, at, vanishing in ((beta_pool, torch.tensor([2.0, 1.0]), 0), (gamma_pool, torch.tensor([1.0, 3.0]), 1)):
        for alpha in (0.5, 1.0, 2.0, 1 / 3):
            x = at.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(pool(x, alpha), x)
            h = 1e-6 * torch.eye(2)[vanishing]
            central = (pool(at + h, alpha) - pool(at - h, alpha)) / 2e-6
            assert torch.isfinite(grad).all(), (pool.__name__, alpha, grad)
            assert grad[vanishing].item() == pytest.approx(central.item(), rel=1e-6, abs=1e-8), (pool.__name__, alpha)


@pytest.mark.parametrize("alpha", [1e300, -1e300])
def test_orders_of_size_1e300_tend_to_the_max_and_min_pools(alpha):
    """alpha times log-values of -1e9 overflowed: log_prob was -inf where the +-inf pools give -5e9 and -2e10."""
    log_values = torch.tensor([[-1e9, -2e9], [-3.0, -1.0]])
    log_weights = torch.tensor([0.3, 0.7]).log()
    limit = log_values.amax(-1) if alpha > 0 else log_values.amin(-1)
    torch.testing.assert_close(log_power_mean(log_values, log_weights, alpha), limit, rtol=1e-12, atol=1e-12)
    experts = Normal(torch.tensor([0.0, 3.0]), torch.tensor([1.0, 0.5]))
    far = torch.tensor(1e5)
    want = op.holder(experts, math.inf if alpha > 0 else -math.inf, torch.tensor([0.3, 0.7])).log_prob(far)
    got = op.holder(experts, alpha, torch.tensor([0.3, 0.7])).log_prob(far)
    assert math.isfinite(got.item()) and got.item() == pytest.approx(want.item(), rel=1e-9)


def test_moment_matching_by_newton_reaches_float64():
    """The Newton solve stopped at a relative residual of 1e-11: a VonMises concentration 4e-11 off. Reference:
    mpmath's root of I1(k) / I0(k) = R for the mixture's resultant length R."""
    locs, kappas, w = [0.3, 2.8, -2.5], [2.0, 10.0, 0.5], [0.5, 0.3, 0.2]
    pool = op.holder(VonMises(torch.tensor(locs), torch.tensor(kappas)), 1.0, torch.tensor(w))
    with mpmath.workdps(40):
        ratio = [mpmath.besseli(1, k) / mpmath.besseli(0, k) for k in kappas]
        c = sum(wi * r * mpmath.cos(m) for wi, r, m in zip(w, ratio, locs))
        s = sum(wi * r * mpmath.sin(m) for wi, r, m in zip(w, ratio, locs))
        length = mpmath.sqrt(c * c + s * s)
        want = float(mpmath.findroot(lambda k: mpmath.besseli(1, k) / mpmath.besseli(0, k) - length, 0.5))
    assert pool.moment_match().concentration.item() == pytest.approx(want, rel=1e-14)


def test_seeds_are_integers_and_empty_samples_are_empty():
    experts = Normal(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.5]))
    for seed in ("x", 1.5, 1.0, True):
        with pytest.raises(ValueError, match=r"seed must be an integer or None, got .* of type"):
            op.holder(experts, 2.0, method="importance", num_samples=1000, seed=seed)
        with pytest.raises(ValueError, match="seed must be an integer or None"):
            op.holder(experts, 2.0).sample((3,), seed=seed)
    assert op.holder(experts, 2.0, seed=3).seed == 3
    for alpha in (0.5, -1.0):  # the exact pool and the numerical one
        pool = op.holder(experts, alpha)
        assert pool.sample((0,)).shape == (0,) and pool.sample((0, 4)).shape == (0, 4)
    assert op.holder(Poisson(torch.tensor([[1.0, 4.0]])), 0.5).sample((0,)).shape == (0, 1)


@pytest.mark.parametrize("a", [-2.0, 1.5, 2.0])
def test_chernoff_orders_outside_the_unit_interval_for_nearly_equal_variances(a):
    """log(1 + a expm1(d)) lost the O(d^2) term that log1p keeps: 1e-2 relative error at variances 1e-8 apart."""
    p, q = Normal(torch.tensor(0.0), torch.tensor(1.0)), Normal(torch.tensor(1e-7), torch.tensor(1.00000001))
    want = _mp_gaussian_log_chernoff([0.0], [[1.0]], [1e-7], [[1.00000001**2]], a)
    assert op.log_chernoff_coefficient(p, q, a).item() == pytest.approx(want, rel=1e-8)


def test_a_vanishing_expert_leaves_the_order_gradient_finite():
    """A present expert of density zero (log-value -inf): for alpha > 0 its term is 0 and the gradient in a tensor
    alpha was NaN (0 * -inf); for alpha < 0 the pool is 0. Against central differences in alpha."""
    log_values, log_weights = torch.tensor([0.3, -math.inf, 2.0]), torch.tensor([0.2, 0.5, 0.3]).log()
    for a in (1e-3, 0.3, 2.0):
        alpha = torch.tensor(a, requires_grad=True)
        value = log_power_mean(log_values, log_weights, alpha)
        (grad,) = torch.autograd.grad(value, alpha)
        h = 1e-6 * a
        ends = [log_power_mean(log_values, log_weights, a + sign * h) for sign in (1, -1)]
        central = (ends[0] - ends[1]) / (2 * h)
        assert math.isfinite(value.item()) and grad.item() == pytest.approx(central.item(), rel=1e-6)
        # the term is 0: the same as leaving the expert out with its weight (by hand: the function itself takes
        # weights that sum to one)
        kept = math.log(0.2 * math.exp(a * 0.3) + 0.3 * math.exp(a * 2.0)) / a
        assert value.item() == pytest.approx(kept, rel=1e-12)
    assert log_power_mean(log_values, log_weights, -1.5).item() == -math.inf


@pytest.mark.parametrize("a", [0.3, 0.5, 2.0, -1.0])
@pytest.mark.parametrize("p, gap", [(0.3, 1e-8), (0.7, 1e-9), (0.01, 1e-10)])
def test_nearly_equal_discrete_experts_keep_their_chernoff_coefficient(p, gap, a):
    """A Bernoulli's natural parameters (log(1 - p), log p) have log-normaliser 0, so the cancellation checks
    measured their scale by the rounding of the result (1e-16) and took the direct form's rounding for the value:
    log C = +1.3e-16 for -5e-17 (a coefficient above one), 140x off at p = 0.7. Against mpmath for the float64
    inputs; what is left is the rounding of log p (2e-7 relative at p = 0.01, 1e-10 apart)."""
    q = p + gap
    bern_p = Bernoulli(probs=torch.tensor(p, dtype=torch.float64))
    bern_q = Bernoulli(probs=torch.tensor(q, dtype=torch.float64))
    # three categories, two of them moved
    cat_p = Categorical(probs=torch.tensor([p / 2, p / 2, 1 - p], dtype=torch.float64))
    cat_q = Categorical(probs=torch.tensor([q / 2, p / 2, 1 - p / 2 - q / 2], dtype=torch.float64))
    with mpmath.workdps(50):
        mp_p, mp_q, mp_a = mpmath.mpf(p), mpmath.mpf(q), mpmath.mpf(a)
        bernoulli = float(mpmath.log(mp_p**mp_a * mp_q ** (1 - mp_a) + (1 - mp_p) ** mp_a * (1 - mp_q) ** (1 - mp_a)))
        kl = float(mp_p * mpmath.log(mp_p / mp_q) + (1 - mp_p) * mpmath.log((1 - mp_p) / (1 - mp_q)))
        probs_p, probs_q = [list(map(mpmath.mpf, d.probs.tolist())) for d in (cat_p, cat_q)]
        total = sum(x**mp_a * y ** (1 - mp_a) for x, y in zip(probs_p, probs_q))
        # (their sums differ from one by a rounding, which is of the size of the coefficient's logarithm)
        categorical = float(mpmath.log(total / (sum(probs_p) ** mp_a * sum(probs_q) ** (1 - mp_a))))
    assert op.log_chernoff_coefficient(bern_p, bern_q, a).item() == pytest.approx(bernoulli, rel=1e-6, abs=0)
    assert op.kl_divergence(bern_p, bern_q).item() == pytest.approx(kl, rel=1e-6, abs=0)
    assert op.log_chernoff_coefficient(cat_p, cat_q, a).item() == pytest.approx(categorical, rel=1e-6, abs=0)


@pytest.mark.parametrize("kappa", [1e2, 1e5, 1e7, 1e9])
def test_concentrated_von_mises_affinities_keep_their_digits(kappa):
    """The curvature of log I0 by autograd of i1e / i0e subtracted terms of size one to get 1 / (2 kappa^2): the
    Bhattacharyya coefficient of concentrations 1e7 and 2e7 was 1.2e-3 off, their KL 4 % (0.147 for 0.153). Against
    mpmath's Bessel functions; the curvature at eta = 0 is the covariance of (cos z, sin z) under the uniform
    circle, I / 2."""
    p = VonMises(torch.tensor(0.0, dtype=torch.float64), torch.tensor(kappa, dtype=torch.float64))
    q = VonMises(torch.tensor(0.0, dtype=torch.float64), torch.tensor(2 * kappa, dtype=torch.float64))
    turned = VonMises(torch.tensor(0.3, dtype=torch.float64), torch.tensor(2 * kappa, dtype=torch.float64))
    with mpmath.workdps(40):
        k = mpmath.mpf(kappa)
        i0 = lambda x: mpmath.besseli(0, x)  # noqa: E731
        bc = float(i0(1.5 * k) / mpmath.sqrt(i0(k) * i0(2 * k)))
        ratio = mpmath.besseli(1, k) / i0(k)
        kl = float(mpmath.log(i0(2 * k) / i0(k)) + ratio * (k - 2 * k))
        kl_turned = float(mpmath.log(i0(2 * k) / i0(k)) + ratio * (k - 2 * k * mpmath.cos(0.3)))
    # the curvature keeps all but log10(2 kappa) digits (1 - A^2 and A / kappa are both about 1 / kappa)
    tolerance = max(1e-10, 4 * kappa * torch.finfo(torch.float64).eps)
    assert op.bhattacharyya_coefficient(p, q).item() == pytest.approx(bc, rel=tolerance, abs=0)
    assert op.kl_divergence(p, q).item() == pytest.approx(kl, rel=tolerance, abs=0)
    assert op.kl_divergence(p, turned).item() == pytest.approx(kl_turned, rel=1e-12, abs=0)
    family = op.families.VonMisesFamily()
    curvature = torch.autograd.functional.hessian(family.log_normalizer, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(curvature, torch.eye(2, dtype=torch.float64) / 2, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_an_expert_of_weight_zero_far_away_in_the_first_slot_changes_nothing(alpha, dtype):
    """Sums of offsets were taken about the first slot whatever its weight: an expert of weight zero at 1e20 there
    gave the pool of Normal(0.5, 0.01) alone a mean of 0 and a variance of 0.25 (alpha = 1/4 and 1), at 1e4 a mean
    0.04 sd off; a multivariate normal pool's mean [0, 0] for [0.5, 0]. The pool is the remaining expert; the mean's
    gradient in its location is one, in the far expert's zero."""
    far = 1e20 if dtype == torch.float32 else 1e300
    for first in (far, 1e4):
        loc = torch.tensor([first, 0.123456789], dtype=dtype, requires_grad=True)
        pool = op.holder(Normal(loc, torch.tensor([1.0, 0.01], dtype=dtype)), alpha, [0.0, 1.0])
        matched = pool.moment_match()
        expected_mean = torch.tensor(0.123456789, dtype=dtype).item()
        rel = 1e-6 if dtype == torch.float32 else 1e-12
        for got in (pool.mean, matched.loc):
            assert got.item() == pytest.approx(expected_mean, rel=rel, abs=0), (first, got)
        for got in (pool.variance, matched.scale**2):
            assert got.item() == pytest.approx(1e-4, rel=rel, abs=0), (first, got)
        (gradient,) = torch.autograd.grad(pool.mean, loc)
        assert gradient.tolist() == pytest.approx([0.0, 1.0], rel=rel, abs=0)
        covariance = torch.stack([torch.eye(2, dtype=dtype), 1e-4 * torch.eye(2, dtype=dtype)])
        loc2 = torch.tensor([[first, 0.0], [0.123456789, -0.3]], dtype=dtype)
        pool2 = op.holder(MultivariateNormal(loc2, covariance_matrix=covariance), alpha, [0.0, 1.0])
        assert pool2.mean.tolist() == pytest.approx(loc2[1].tolist(), rel=rel, abs=0), (first, pool2.mean)
        assert pool2.covariance_matrix.flatten().tolist() == pytest.approx([1e-4, 0, 0, 1e-4], rel=rel, abs=1e-30)


def test_an_expert_of_tiny_weight_far_away_in_the_first_slot_weighs_by_its_weight():
    """With weight 1e-12 at 1e4 the mixture's mean is (1e-12 1e4 + 0.123456789) / (1 + 1e-12) (float64)."""
    loc = torch.tensor([1e4, 0.123456789], dtype=torch.float64)
    pool = op.holder(Normal(loc, torch.tensor([1.0, 0.01], dtype=torch.float64)), 1.0, [1e-12, 1.0])
    expected = mpmath.mpf(1e-12) * mpmath.mpf(1e4) + mpmath.mpf(0.123456789)
    assert pool.mean.item() == pytest.approx(float(expected / (1 + mpmath.mpf(1e-12))), rel=1e-14, abs=0)


def test_the_log_linear_pool_at_an_end_where_one_expert_is_infinite_and_another_zero():
    """sum_j w_j log q_j is inf - inf at an end of a Beta's support where one expert's density is infinite and the
    other's zero: log_prob gave NaN. The log-linear pool is the Beta at sum_j w_j eta_j (here Beta(1.78, 1.96):
    weights 0.6 and 0.4 of (2.5, 0.6) and (0.7, 4)), whose density vanishes at both ends."""
    experts = [Beta(torch.tensor(2.5), torch.tensor(0.6)), Beta(torch.tensor(0.7), torch.tensor(4.0))]
    pool = op.holder(experts, 0, torch.tensor([0.6, 0.4]))
    z = torch.tensor([0.0, 1.0, 0.3])
    want = Beta(torch.tensor(0.6 * 2.5 + 0.4 * 0.7), torch.tensor(0.6 * 0.6 + 0.4 * 4.0)).log_prob(z[2])
    got = pool.log_prob(z)
    assert got[:2].tolist() == [-math.inf, -math.inf]
    assert got[2].item() == pytest.approx(want.item(), rel=1e-12)


def test_a_failed_numerical_estimate_is_not_cached():
    """The first access raised (the log-normaliser is not finite); the second served the cached NaN mean."""
    pool = op.holder([Bernoulli(torch.tensor(0.0)), Bernoulli(torch.tensor(1.0))], -1.0, torch.tensor([0.7, 0.3]))
    for _ in range(2):
        with pytest.raises(ValueError, match="log-normaliser of the alpha=-1.0 pool is not finite"):
            pool.mean


def test_renyi_divergence_of_order_above_one_with_an_outcome_neither_expert_gives():
    """a (-inf) + (1 - a) (-inf) is NaN for a > 1: a category of probability zero in both experts made the Rényi
    divergence raise 'diverges'."""
    p, q = Categorical(torch.tensor([0.5, 0.5, 0.0])), Categorical(torch.tensor([0.25, 0.75, 0.0]))
    assert op.renyi_divergence(p, q, 2.0).item() == pytest.approx(math.log(0.5**2 / 0.25 + 0.5**2 / 0.75), rel=1e-12)
    assert op.log_chernoff_coefficient(p, q, -1.0).item() == pytest.approx(math.log(1.25), rel=1e-12)
    assert op.renyi_divergence(Bernoulli(torch.tensor(0.0)), Bernoulli(torch.tensor(0.0)), 2.0).item() == 0


def test_von_mises_concentrations_below_1e_154():
    """The norm of the natural parameters squared them: a concentration of 1e-300 came out 0, an invalid kappa."""
    expert = VonMises(torch.tensor(0.5), torch.tensor(1e-300))
    matched = op.holder([expert, expert], 0.5).moment_match()
    assert matched.concentration.item() == pytest.approx(1e-300, rel=1e-12)
    assert matched.loc.item() == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize("concentrations", [(2.5, 1e8), (2.5, 1e10), (1e12, 2.5), (0.3, 7e4), (3.0, 4.0),
                                            (2.5, 1e10, 0.7), (1e9, 2e9, 0.5, 3.0)])
def test_beta_and_dirichlet_log_normalisers_at_large_concentrations(concentrations):
    """lgamma(a) + lgamma(b) - lgamma(a + b) subtracts lgammas of size b log b (2.2e11 at b = 1e10) to give about
    -a log b: four digits were left (-57.27997 for -57.27994), and with them the closed forms built on it (a
    Hellinger distance of 0 between Beta(2.5, 1e10) and Beta(2.5, 1.00001e10), for 5.6e-6). Reference: mpmath."""
    mpmath.mp.dps = 50
    c = [mpmath.mpf(x) for x in concentrations]
    want = float(sum(mpmath.loggamma(x) for x in c) - mpmath.loggamma(sum(c)))
    family = op.families.BetaFamily() if len(c) == 2 else op.families.DirichletFamily(len(c))
    got = family.log_normalizer(torch.tensor(concentrations, dtype=torch.float64))
    assert got.item() == pytest.approx(want, rel=1e-13, abs=1e-13)
    natural = torch.tensor(concentrations, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(family.log_normalizer(natural), natural)
    expected = [float(mpmath.digamma(x) - mpmath.digamma(sum(c))) for x in c]  # dA/dc_k = psi(c_k) - psi(sum c)
    torch.testing.assert_close(grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_hellinger_distance_between_nearly_equal_betas_of_large_concentration():
    mpmath.mp.dps = 50
    log_beta = lambda a, b: mpmath.log(mpmath.beta(mpmath.mpf(a), mpmath.mpf(b)))  # noqa: E731
    log_bc = log_beta(2.5, (1e10 + 1.00001e10) / 2) - (log_beta(2.5, 1e10) + log_beta(2.5, 1.00001e10)) / 2
    got = op.hellinger_distance(Beta(torch.tensor(2.5), torch.tensor(1e10)),
                                Beta(torch.tensor(2.5), torch.tensor(1.00001e10)))
    assert got.item() == pytest.approx(float(mpmath.sqrt(-mpmath.expm1(log_bc))), rel=1e-3)


@pytest.mark.parametrize("experts, other", [(Beta(torch.tensor([2.0, 0.7]), torch.tensor([1.0, 3.0])),
                                             Beta(torch.tensor(1.0), torch.tensor(2.0))),
                                            (Poisson(torch.tensor([2.0, 7.0])), Poisson(torch.tensor(4.0)))],
                         ids=["beta", "poisson"])
def test_exact_pools_whose_weights_carry_a_batch_the_experts_lack(experts, other):
    """One weight row per pool: the log-normaliser was right, while entropy, cdf and kl_estimate raised IndexError
    and icdf and estimate a shape error. Each row must be the pool of that row's weights."""
    weights = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    pool = op.holder(experts, 0.5, weights)
    rows = [op.holder(experts, 0.5, weights[i]) for i in range(2)]
    z = torch.tensor(0.3) if isinstance(other, Beta) else torch.tensor(3.0)
    for method in (lambda p: p.entropy(), lambda p: p.cdf(z), lambda p: p.estimate().mean.value,
                   lambda p: p.kl_estimate(other).value):
        torch.testing.assert_close(method(pool), torch.stack([method(row) for row in rows]), rtol=1e-9, atol=1e-12)
    if isinstance(other, Beta):
        torch.testing.assert_close(pool.icdf(torch.tensor(0.3)), torch.stack([r.icdf(torch.tensor(0.3)) for r in rows]))


def test_a_von_mises_of_concentration_zero_samples_the_uniform_distribution():
    """Concentration 0 (natural parameters 0: in the family's domain, the uniform distribution) went to torch's
    VonMises, whose sampler proposes with scale 1 / kappa and never returned; its validation refused 0. Against
    the uniform distribution on the circle by a Kolmogorov-Smirnov test, and the log-linear pool of two opposite
    experts of equal concentration, which is that uniform distribution."""
    from scipy import stats

    from opinionpool.experts import Experts
    from opinionpool.families.continuous import VonMisesFamily

    torch.manual_seed(0)
    draws = VonMisesFamily().sample(torch.tensor([0.0, 0.0], dtype=torch.float64), torch.Size([4000]))
    assert stats.kstest(draws.numpy(), stats.uniform(-math.pi, 2 * math.pi).cdf).pvalue > 1e-3
    pool = op.holder(Experts(VonMisesFamily(), torch.tensor([[2.0, 0.0], [-2.0, 0.0]], dtype=torch.float64)), 0.0)
    assert pool.sample(torch.Size([5])).shape == (5,)
    assert float(pool.moment_match().concentration) == torch.finfo(torch.float64).tiny


def test_an_unreachable_quadrature_tolerance_and_a_negative_sample_count_are_refused():
    """rtol = 1e-20 ran the refinement to its cap (seconds) and returned the error 1e-15 gives; sample((-1,))
    failed inside torch ("cannot sample n_sample <= 0 samples") without naming sample_shape."""
    from opinionpool.numerical import MIN_RTOL

    experts = Normal(torch.tensor([0.0, 2.0, 5.0]), torch.tensor([1.0, 0.5, 3.0]))
    pool = op.holder(experts, alpha=-0.7, weights=[0.2, 0.3, 0.5])
    for bad in (1e-20, 2e-16):
        with pytest.raises(ValueError, match=r"rtol must be a real number in \[1e-15, 1\)"):
            pool.estimate(rtol=bad)
    assert float(pool.estimate(rtol=MIN_RTOL).log_normalizer.error) < 1e-11
    exact = op.holder(experts, alpha=0.5)
    for distribution in (pool, exact, op.functional.GaussianMixture(torch.zeros(2), torch.zeros(2, 1),
                                                                             torch.zeros(2, 1))):
        with pytest.raises(ValueError, match=r"sample_shape must be a sequence of non-negative integers, got \(-1,\)"):
            distribution.sample((-1,))
        assert distribution.sample((0,)).shape[0] == 0
    with pytest.raises(ValueError, match="sample_shape must be a sequence of non-negative integers"):
        exact.rsample((2, -3))


def test_no_experts_and_weights_beyond_the_batch_are_refused_by_name():
    """Zero experts along dim gave a point mass (barycentre), NaN (pairwise mass) or unrelated errors; weights with
    an axis beyond the experts' batch failed inside subset_mixture's indexing (or blamed a mask nobody passed)."""
    import opinionpool.functional as opf

    none = torch.zeros(0, 2, 2)
    for pool in (opf.poe, opf.moe, opf.hellinger, opf.wasserstein_barycenter, opf.hellinger_pairwise_mass,
                 lambda m, v: opf.holder(m, v, 1 / 3), lambda m, v: opf.subset_mixture(opf.poe, m, v)):
        with pytest.raises(ValueError, match=r"mu has no experts along dim=0 \(shape \(0, 2, 2\)\)"):
            pool(none, none)
    prior_only = opf.poe(none, none, prior_expert=True)  # the prior alone is a pool
    assert torch.equal(prior_only[0], torch.zeros(2, 2)) and torch.equal(prior_only[1], torch.zeros(2, 2))
    mu, logvar = torch.randn(3, 2, 2), torch.randn(3, 2, 2)
    weights = torch.rand(4, 2, 1, 3) + 0.1
    for aggregator in (opf.poe, opf.hellinger, lambda m, v, **k: opf.holder(m, v, 1 / 3, **k)):
        with pytest.raises(ValueError, match=r"weights of shape \(4, 2, 1, 3\) have batch axes beyond the experts' "
                                             r"\(2,\)"):
            opf.subset_mixture(aggregator, mu, logvar, weights=weights)
    per_sample = opf.subset_mixture(opf.poe, mu, logvar, weights=weights[0])  # (B, 1, M) still works
    assert per_sample.loc.shape == (2, 7, 2)
