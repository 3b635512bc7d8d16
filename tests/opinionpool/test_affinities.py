"""Affinities and divergences against quadrature, with unequal scales and both argument orders."""

import functools
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch.distributions import Beta, Exponential, Gamma, Independent, Normal, Poisson

import opinionpool as op
from validation.reference import log_bc_diag_gauss

PAIRS = {
    "Normal": (lambda: (Normal(torch.tensor(0.3), torch.tensor(0.7)), Normal(torch.tensor(-1.2), torch.tensor(1.9))),
               (stats.norm(0.3, 0.7).pdf, stats.norm(-1.2, 1.9).pdf), (-40, 40)),
    "Gamma": (lambda: (Gamma(torch.tensor(2.5), torch.tensor(1.5)), Gamma(torch.tensor(4.0), torch.tensor(0.8))),
              (stats.gamma(2.5, scale=1 / 1.5).pdf, stats.gamma(4.0, scale=1 / 0.8).pdf), (0, np.inf)),
    "Beta": (lambda: (Beta(torch.tensor(2.0), torch.tensor(5.0)), Beta(torch.tensor(3.0), torch.tensor(1.5))),
             (stats.beta(2.0, 5.0).pdf, stats.beta(3.0, 1.5).pdf), (0, 1)),
    "Exponential": (lambda: (Exponential(torch.tensor(0.4)), Exponential(torch.tensor(2.5))),
                    (stats.expon(scale=1 / 0.4).pdf, stats.expon(scale=1 / 2.5).pdf), (0, np.inf)),
}


def quad(f, lo, hi):
    return integrate.quad(f, lo, hi, limit=400, epsabs=0, epsrel=1e-12)[0]


@pytest.mark.parametrize("a", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("name", list(PAIRS))
def test_chernoff_and_divergences_against_quadrature(name, a):
    make, (fp, fq), (lo, hi) = PAIRS[name]
    p, q = make()
    c = quad(lambda z: fp(z) ** a * fq(z) ** (1 - a), lo, hi)
    assert op.log_chernoff_coefficient(p, q, a).item() == pytest.approx(math.log(c), rel=1e-9)
    # swapped arguments give the coefficient of order 1 - a, not of order a
    c_swapped = quad(lambda z: fq(z) ** a * fp(z) ** (1 - a), lo, hi)
    assert op.log_chernoff_coefficient(q, p, a).item() == pytest.approx(math.log(c_swapped), rel=1e-9)
    assert op.renyi_divergence(p, q, a).item() == pytest.approx(math.log(c) / (a - 1), rel=1e-9)
    assert op.amari_alpha_divergence(p, q, a).item() == pytest.approx((1 - c) / (a * (1 - a)), rel=1e-9)


@pytest.mark.parametrize("name", list(PAIRS))
def test_kl_hellinger_bhattacharyya_against_quadrature(name):
    make, (fp, fq), (lo, hi) = PAIRS[name]
    p, q = make()

    def kl_integrand(z):
        a, b = fp(z), fq(z)
        return a * (math.log(a) - math.log(b)) if a > 0 and b > 0 else 0.0

    kl = quad(kl_integrand, lo, hi)
    bc = quad(lambda z: math.sqrt(fp(z) * fq(z)), lo, hi)
    assert op.kl_divergence(p, q).item() == pytest.approx(kl, rel=1e-9)
    assert op.bhattacharyya_coefficient(p, q).item() == pytest.approx(bc, rel=1e-9)
    assert op.hellinger_distance(p, q).item() == pytest.approx(math.sqrt(1 - bc), rel=1e-9)
    assert op.amari_alpha_divergence(p, q, 1.0).item() == pytest.approx(kl, rel=1e-9)
    assert op.renyi_divergence(p, q, 1.0).item() == pytest.approx(kl, rel=1e-9)


def test_renyi_order_above_one_and_divergent_orders():
    p = Normal(torch.tensor(0.3), torch.tensor(0.7))
    q = Normal(torch.tensor(-1.2), torch.tensor(1.9))
    c = quad(lambda z: stats.norm(0.3, 0.7).pdf(z) ** 2 / stats.norm(-1.2, 1.9).pdf(z), -40, 40)
    assert op.renyi_divergence(p, q, 2.0).item() == pytest.approx(math.log(c), rel=1e-9)
    with pytest.raises(ValueError, match="diverges"):
        op.renyi_divergence(q, p, 2.0)  # the wider expert over the narrower one is not integrable


def test_poisson_affinity_by_exact_sum():
    p, q = Poisson(torch.tensor(1.5)), Poisson(torch.tensor(6.0))
    k = np.arange(0, 300)
    c = np.sum(stats.poisson(1.5).pmf(k) ** 0.3 * stats.poisson(6.0).pmf(k) ** 0.7)
    kl = np.sum(stats.poisson(1.5).pmf(k) * (stats.poisson(1.5).logpmf(k) - stats.poisson(6.0).logpmf(k)))
    assert op.log_chernoff_coefficient(p, q, 0.3).item() == pytest.approx(math.log(c), rel=1e-10)
    assert op.kl_divergence(p, q).item() == pytest.approx(kl, rel=1e-10)


def test_multi_expert_chernoff_against_quadrature():
    locs, scales, w = (0.0, 2.0, -1.0), (1.0, 0.5, 2.0), (0.2, 0.3, 0.5)
    experts = [Normal(torch.tensor(m), torch.tensor(s)) for m, s in zip(locs, scales)]
    value = quad(lambda z: np.prod([stats.norm(m, s).pdf(z) ** wi for m, s, wi in zip(locs, scales, w)]), -40, 40)
    assert op.log_multi_chernoff_coefficient(experts, w).item() == pytest.approx(math.log(value), rel=1e-10)
    with pytest.raises(ValueError, match="sum to one"):
        op.log_multi_chernoff_coefficient(experts, [0.2, 0.3, 0.6])


def test_high_dimensional_bhattacharyya_stays_in_log_space():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(512, generator=g), torch.randn(512, generator=g) + 2.0
    var1, var2 = torch.rand(512, generator=g) + 0.1, torch.rand(512, generator=g) + 0.1
    p, q = Independent(Normal(mu1, var1.sqrt()), 1), Independent(Normal(mu2, var2.sqrt()), 1)
    log_bc = op.log_bhattacharyya_coefficient(p, q)
    expected = log_bc_diag_gauss(mu1.numpy(), var1.numpy(), mu2.numpy(), var2.numpy())
    assert expected < math.log(1e-300)  # the coefficient itself underflows float64
    assert log_bc.item() == pytest.approx(expected, rel=1e-12)
    fn = op.functional.log_bhattacharyya(mu1, var1.log(), mu2, var2.log())
    assert fn.item() == pytest.approx(expected, rel=1e-12)
    assert op.bhattacharyya_coefficient(p, q).item() == 0.0
    assert op.hellinger_distance(p, q).item() == 1.0


def test_full_gaussian_affinities_against_closed_forms():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(3, 3, generator=g), torch.randn(3, 3, generator=g)
    s1, s2 = a @ a.T + 0.5 * torch.eye(3), b @ b.T + 0.5 * torch.eye(3)
    m1, m2 = torch.randn(3, generator=g), torch.randn(3, generator=g)
    from torch.distributions import MultivariateNormal
    p, q = MultivariateNormal(m1, s1), MultivariateNormal(m2, s2)
    # Bhattacharyya distance of two Gaussians, the textbook form with the averaged covariance
    s = (s1 + s2) / 2
    d = (m1 - m2)
    db = d @ torch.linalg.solve(s, d) / 8 + 0.5 * torch.log(torch.det(s) / torch.sqrt(torch.det(s1) * torch.det(s2)))
    assert op.log_bhattacharyya_coefficient(p, q).item() == pytest.approx(-db.item(), rel=1e-10)
    kl = 0.5 * (torch.trace(torch.linalg.solve(s2, s1)) + (m2 - m1) @ torch.linalg.solve(s2, m2 - m1) - 3
                + torch.logdet(s2) - torch.logdet(s1))
    assert op.kl_divergence(p, q).item() == pytest.approx(kl.item(), rel=1e-10)


def test_kl_of_nearly_equal_experts_keeps_its_digits_and_gradient():
    """The Bregman form cancels for nearly equal experts (it gave a negative KL); the remainder form does not."""
    import mpmath

    r1, r2 = 100.0, 100.001
    with mpmath.workdps(40):
        exact = float(mpmath.mpf(r1) * mpmath.log(mpmath.mpf(r1) / mpmath.mpf(r2)) - r1 + mpmath.mpf(r2))
    rate = torch.tensor(r2, dtype=torch.float64, requires_grad=True)
    kl = op.kl_divergence(Poisson(torch.tensor(r1, dtype=torch.float64)), Poisson(rate))
    assert float(kl.detach()) == pytest.approx(exact, rel=1e-8, abs=0)  # exact is 5e-9
    kl.backward()
    assert float(rate.grad) == pytest.approx(1 - r1 / r2, rel=1e-8, abs=0)  # d/dr2 of r1 log(r1/r2) - r1 + r2
    # float32 experts: computed in float64 from the float32 parameters, so positive and close to their KL
    low = op.kl_divergence(Poisson(torch.tensor(r1, dtype=torch.float32)), Poisson(torch.tensor(r2, dtype=torch.float32)))
    assert low.dtype == torch.float32 and 0 < float(low) == pytest.approx(exact, rel=0.05)
    # far apart the direct form is kept: equal to the closed form
    far = op.kl_divergence(Gamma(torch.tensor(2.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)),
                           Gamma(torch.tensor(5.0, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)))
    closed = ((2.0 - 5.0) * float(torch.digamma(torch.tensor(2.0, dtype=torch.float64))) - math.lgamma(2.0)
              + math.lgamma(5.0) + 5.0 * (math.log(1.0) - math.log(3.0)) + 2.0 * (3.0 - 1.0) / 1.0)
    assert float(far) == pytest.approx(closed, rel=1e-12)


@pytest.mark.parametrize("gap", [1e-6, 0.7])
def test_kl_gradients_and_hessians_match_torch_in_both_forms(gap):
    """Nearly equal experts (the remainder form) and distant ones (the direct form): the gradient, also when the
    graph is kept for a second derivative, and the Hessian against torch's own Gamma KL. (With the graph kept, the
    direction of the curvature product once entered as a function of the expert: the gradient in p was off by
    grad A(eta_p), and gradgradcheck, which differentiates that same gradient, passed.)"""
    from torch.distributions import kl_divergence as torch_kl

    rate_p = torch.tensor([1.5, 2.0], dtype=torch.float64)
    rate_q = rate_p * torch.tensor([1 + gap, 1 - gap], dtype=torch.float64)
    shape_p = torch.tensor([2.0, 0.3], dtype=torch.float64)
    shape_q = shape_p * torch.tensor([1 - gap, 1 + 2 * gap], dtype=torch.float64)

    def ours(a):
        return op.kl_divergence(Gamma(a, rate_p), Gamma(shape_q, rate_q)).sum()

    def reference(a):
        return torch_kl(Gamma(a, rate_p), Gamma(shape_q, rate_q)).sum()

    start = shape_p.clone().requires_grad_(True)
    want = torch.autograd.grad(reference(start), start)[0]
    for keep in (False, True):
        got = torch.autograd.grad(ours(start), start, create_graph=keep)[0]
        torch.testing.assert_close(got.detach(), want, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(torch.autograd.functional.hessian(ours, shape_p),
                               torch.autograd.functional.hessian(reference, shape_p), rtol=1e-7, atol=1e-12)


def test_bregman_gradient_of_one_expert_against_several():
    """One eta_p against a batch of eta_q: each row's curvature product is its own (they were summed over the rows
    before the upstream gradients weighted them), checked against autograd of the direct form; and a row that
    nothing depends on gets gradient zero, even where its own would overflow."""
    from opinionpool.families import GammaFamily
    from opinionpool.families.bregman import bregman_divergence

    family = GammaFamily()
    eta_p = torch.tensor([1.0, -1.5], dtype=torch.float64, requires_grad=True)
    eta_q = torch.tensor([[0.5, -1.0], [2.0, -2.0], [1.2, -0.7]], dtype=torch.float64)
    weights = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)

    def direct(eta):
        wide = eta.expand_as(eta_q)
        (mean,) = torch.autograd.grad(family.log_normalizer(wide).sum(), wide, create_graph=True)
        return family.log_normalizer(eta_q) - family.log_normalizer(wide) - ((eta_q - wide) * mean).sum(-1)

    got = torch.autograd.grad((bregman_divergence(family, eta_p, eta_q) * weights).sum(), eta_p)[0]
    want = torch.autograd.grad((direct(eta_p) * weights).sum(), eta_p)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    shapes = torch.tensor([1e-160, 2.0], dtype=torch.float64, requires_grad=True)
    kl = op.kl_divergence(Gamma(shapes, torch.ones(2, dtype=torch.float64)),
                          Gamma(torch.tensor([1.3e-160, 2.5], dtype=torch.float64), torch.ones(2, dtype=torch.float64)))
    grad = torch.autograd.grad(kl[1], shapes)[0]
    # d/da KL(Gamma(a, 1) || Gamma(b, 1)) = (a - b) psi'(a)
    expected = (2.0 - 2.5) * float(torch.polygamma(1, torch.tensor(2.0, dtype=torch.float64)))
    assert grad[0] == 0 and float(grad[1]) == pytest.approx(expected, rel=1e-12)


def test_kl_of_categoricals_with_zero_probabilities_by_exact_sum():
    """A category p gives probability zero adds nothing to KL(p || q) (its natural parameter is -inf: inf * 0 was
    NaN), KL(p || p) is 0, and KL(q || p) is inf where q puts mass that p does not; the gradient in q's logits
    is softmax - p."""
    from torch.distributions import Categorical

    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    q_logits = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64).log().requires_grad_(True)
    kl = op.kl_divergence(Categorical(probs=p), Categorical(logits=q_logits))
    q = torch.softmax(q_logits.detach(), -1)
    assert kl.item() == pytest.approx(sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()) if pi),
                                      rel=1e-12)
    kl.backward()
    torch.testing.assert_close(q_logits.grad, q - p, rtol=1e-12, atol=1e-14)
    assert op.kl_divergence(Categorical(probs=p), Categorical(probs=p)).item() == 0
    assert op.kl_divergence(Categorical(probs=q), Categorical(probs=p)).item() == math.inf


@pytest.mark.parametrize("a", [0.3, 1.7])
def test_a_tensor_order_receives_its_gradient(a):
    """A tensor ``a`` that requires grad was read as a float, its gradient silently dropped: Chernoff, Rényi and
    Amari against central differences in a, Gaussian (closed form), Gamma (log-normaliser) and full-covariance
    Gaussian experts (whose log-determinant's derivative in ``a`` was counted twice; ``p`` the narrower, so that
    the integral converges at 1.7)."""
    from torch.distributions import MultivariateNormal

    f64 = torch.float64
    pairs = [(Normal(torch.tensor(0.3), torch.tensor(0.8)), Normal(torch.tensor(-0.5), torch.tensor(1.3))),
             (Gamma(torch.tensor(2.0), torch.tensor(1.5)), Gamma(torch.tensor(3.5), torch.tensor(2.5))),
             (MultivariateNormal(torch.tensor([0.0, 1.0], dtype=f64), torch.tensor([[1.0, 0.2], [0.2, 0.6]], dtype=f64)),
              MultivariateNormal(torch.tensor([1.0, -1.0], dtype=f64), torch.tensor([[2.0, 0.5], [0.5, 1.5]], dtype=f64)))]
    for p, q in pairs:
        for f in (op.log_chernoff_coefficient, op.renyi_divergence, op.amari_alpha_divergence):
            order = torch.tensor(a, dtype=torch.float64, requires_grad=True)
            value = f(p, q, order)
            (grad,) = torch.autograd.grad(value, order)
            h = 1e-6
            central = (f(p, q, a + h) - f(p, q, a - h)).item() / (2 * h)
            assert value.item() == pytest.approx(f(p, q, a).item(), rel=1e-14)
            assert grad.item() == pytest.approx(central, rel=1e-6, abs=1e-9), (type(p).__name__, f.__name__)


@pytest.mark.parametrize("a", [0.0, 1.0])
def test_chernoff_order_at_its_ends_receives_its_gradient(a):
    """log C_a(p, q) is 0 at a = 0 and 1 whatever the experts, but its derivative in ``a`` is -KL(q || p) at 0 and
    KL(p || q) at 1; a tensor ``a`` requiring grad there got a constant without gradient (autograd raised). The
    value stays exactly 0; the derivatives against torch's own KL divergences."""
    from torch.distributions import MultivariateNormal, kl_divergence

    f64 = torch.float64
    pairs = [(Normal(torch.tensor(0.3, dtype=f64), torch.tensor(0.8, dtype=f64)),
              Normal(torch.tensor(-0.5, dtype=f64), torch.tensor(1.3, dtype=f64))),
             (Gamma(torch.tensor(2.0, dtype=f64), torch.tensor(1.0, dtype=f64)),
              Gamma(torch.tensor(0.5, dtype=f64), torch.tensor(3.0, dtype=f64))),
             (MultivariateNormal(torch.tensor([0.0, 1.0], dtype=f64), torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=f64)),
              MultivariateNormal(torch.tensor([1.0, -1.0], dtype=f64),
                                 torch.tensor([[1.0, -0.3], [-0.3, 0.5]], dtype=f64)))]
    for p, q in pairs:
        order = torch.tensor(a, dtype=f64, requires_grad=True)
        value = op.log_chernoff_coefficient(p, q, order)
        assert value.item() == 0
        (grad,) = torch.autograd.grad(value, order)
        expected = kl_divergence(p, q) if a == 1 else -kl_divergence(q, p)
        assert grad.item() == pytest.approx(expected.item(), rel=1e-10), type(p).__name__
    # a category of probability zero under one expert: the derivative exists where the other expert gives that
    # category no mass at the end taken (the Bregman form had given NaN), else log C_a jumps there and it raises
    from torch.distributions import Categorical

    zero = Categorical(probs=torch.tensor([0.5, 0.5, 0.0], dtype=f64))
    full = Categorical(probs=torch.tensor([0.2, 0.3, 0.5], dtype=f64))
    smooth, jump = ((zero, full), (full, zero)) if a == 1 else ((full, zero), (zero, full))
    order = torch.tensor(a, dtype=f64, requires_grad=True)
    (grad,) = torch.autograd.grad(op.log_chernoff_coefficient(*smooth, order), order)
    expected = kl_divergence(*smooth) if a == 1 else -kl_divergence(smooth[1], smooth[0])
    assert grad.item() == pytest.approx(expected.item(), rel=1e-12)
    with pytest.raises(ValueError, match="no derivative in a"):
        op.log_chernoff_coefficient(*jump, order)


def test_chernoff_coefficients_of_nearly_equal_experts_with_large_parameters():
    """log C = A(sum_j w_j eta_j) - sum_j w_j A(eta_j) cancelled log-normalisers of the size of the parameters: two
    Poisson experts of rate 1e8, 1e-9 apart, had log BC = +1.6e-7 (a coefficient above one) for -1.25e-11, two
    Gamma(1e6) +1.9e-9, and the alpha = 1/3 pool of two identical Poisson(1e6) experts log Z = 8.7e-11 for 0. The
    value is now the weighted sum of Bregman divergences from the combination. References: 50-digit mpmath."""
    import mpmath

    mpmath.mp.dps = 50
    f64 = torch.float64
    r1, r2 = 1e8, 1e8 * (1 + 1e-9)
    got = float(op.log_bhattacharyya_coefficient(Poisson(torch.tensor(r1, dtype=f64)),
                                                 Poisson(torch.tensor(r2, dtype=f64))))
    assert got == pytest.approx(float(-(mpmath.sqrt(r1) - mpmath.sqrt(r2)) ** 2 / 2), rel=1e-7, abs=0)
    a1, a2, b = 1e8, 1e8 * (1 + 1e-9), 1e8
    expected = (mpmath.log(mpmath.beta((mpmath.mpf(a1) + a2) / 2, b))
                - (mpmath.log(mpmath.beta(a1, b)) + mpmath.log(mpmath.beta(a2, b))) / 2)
    got = float(op.log_bhattacharyya_coefficient(Beta(torch.tensor(a1, dtype=f64), torch.tensor(b, dtype=f64)),
                                                 Beta(torch.tensor(a2, dtype=f64), torch.tensor(b, dtype=f64))))
    assert got == pytest.approx(float(expected), rel=1e-9, abs=0)
    k1, k2 = 1e6, 1e6 * (1 + 1e-7)
    expected = mpmath.loggamma((mpmath.mpf(k1) + k2) / 2) - (mpmath.loggamma(k1) + mpmath.loggamma(k2)) / 2
    got = float(op.log_bhattacharyya_coefficient(Gamma(torch.tensor(k1, dtype=f64), torch.tensor(1.0, dtype=f64)),
                                                 Gamma(torch.tensor(k2, dtype=f64), torch.tensor(1.0, dtype=f64))))
    assert got == pytest.approx(float(expected), rel=1e-9, abs=0)
    same = op.holder([Poisson(torch.tensor(1e6, dtype=f64)), Poisson(torch.tensor(1e6, dtype=f64))], alpha=1 / 3)
    assert abs(float(same.log_normalizer)) < 1e-14


@pytest.mark.parametrize("a", [1e-12, 1e-6, 0.5, 1 - 1e-6])
def test_chernoff_coefficients_of_nearly_equal_discrete_experts(a):
    """Bernoulli, Binomial and Categorical experts 1e-10 apart: their log-normalisers are 0 up to the rounding of
    terms of about 1, which the direct form took for the divergence (log C = +1.2e-16 at a = 1e-6, a coefficient
    above one, for -2.4e-26). References: 50-digit mpmath sums of p^a q^(1-a)."""
    import mpmath
    from torch.distributions import Bernoulli, Binomial, Categorical

    mpmath.mp.dps = 50
    f64 = torch.float64

    def log_sum(ps, qs):
        order = mpmath.mpf(a)  # (1 - a in float64 is rounded: the exponents would not sum to one)
        return float(mpmath.log(mpmath.fsum(p ** order * q ** (1 - order) for p, q in zip(ps, qs))))

    p1, p2 = 0.3, 0.3 + 1e-10
    bernoulli = [[1 - mpmath.mpf(x), mpmath.mpf(x)] for x in (p1, p2)]
    binomial = [[mpmath.binomial(17, k) * mpmath.mpf(x) ** k * (1 - mpmath.mpf(x)) ** (17 - k) for k in range(18)]
                for x in (p1, p2)]
    probs = ([0.2, 0.5, 0.3], [0.2, 0.5 - 1e-10, 0.3 + 1e-10])
    categorical = [[mpmath.mpf(x) / mpmath.fsum(map(mpmath.mpf, row)) for x in row] for row in probs]
    cases = [(Bernoulli(torch.tensor(p1, dtype=f64)), Bernoulli(torch.tensor(p2, dtype=f64)), bernoulli),
             (Binomial(17, torch.tensor(p1, dtype=f64)), Binomial(17, torch.tensor(p2, dtype=f64)), binomial),
             (Categorical(torch.tensor(probs[0], dtype=f64)), Categorical(torch.tensor(probs[1], dtype=f64)),
              categorical)]
    for p, q, (ps, qs) in cases:
        expected = log_sum(ps, qs)
        got = float(op.log_chernoff_coefficient(p, q, a))
        # (abs: the combination a eta_p + (1 - a) eta_q is stored in float64, a rounding of about eps |eta| in
        # each of its offsets, whose square scales the divergence: 1e-32 at the order 1e-12)
        assert got <= 0 and got == pytest.approx(expected, rel=1e-4, abs=1e-31), type(p).__name__


def test_full_gaussian_kl_of_nearly_equal_experts_keeps_its_digits():
    """torch's formula (trace, dimension and log-determinants apart) gave 0 for the KL of 3-D experts 1e-10 apart and
    negative values for 90 of 300 nearly equal pairs. References: 50-digit mpmath of the same formula from the float64
    matrices; for separated experts torch's own KL; gradients are torch's formula's."""
    import mpmath
    from torch.distributions import MultivariateNormal
    from torch.distributions import kl_divergence as torch_kl

    mpmath.mp.dps = 50
    f64 = torch.float64
    g = torch.Generator().manual_seed(0)

    def reference(p, q):
        cov_p, cov_q = mpmath.matrix(p.covariance_matrix.tolist()), mpmath.matrix(q.covariance_matrix.tolist())
        delta = mpmath.matrix((p.loc - q.loc).tolist())
        inverse = cov_q ** -1
        trace = sum((inverse * cov_p)[i, i] for i in range(cov_p.rows))
        return float((trace - cov_p.rows + mpmath.log(mpmath.det(cov_q) / mpmath.det(cov_p))
                      + (delta.T * inverse * delta)[0, 0]) / 2)

    for trial in range(20):
        factor = torch.randn(3, 3, generator=g, dtype=f64)
        cov = factor @ factor.T + 0.5 * torch.eye(3, dtype=f64)
        loc = torch.randn(3, generator=g, dtype=f64)
        nudge = 1e-9 * torch.randn(3, 3, generator=g, dtype=f64)
        p = MultivariateNormal(loc, cov)
        q = MultivariateNormal(loc + 1e-10 * torch.randn(3, generator=g, dtype=f64), cov + nudge @ nudge.T)
        got, expected = float(op.kl_divergence(p, q)), reference(p, q)
        assert got >= 0 and got == pytest.approx(expected, rel=1e-5, abs=1e-30), trial
    far = MultivariateNormal(loc + 0.5, 2 * cov)
    assert float(op.kl_divergence(p, far)) == pytest.approx(float(torch_kl(p, far)), rel=1e-12)
    loc_p = loc.clone().requires_grad_(True)
    tril = torch.linalg.cholesky(cov).requires_grad_(True)
    ours = op.kl_divergence(MultivariateNormal(loc_p, scale_tril=tril), far)
    theirs = torch_kl(MultivariateNormal(loc_p, scale_tril=tril), far)
    (loc_grad, tril_grad), (torch_loc_grad, torch_tril_grad) = (torch.autograd.grad(kl, (loc_p, tril))
                                                                for kl in (ours, theirs))
    torch.testing.assert_close(loc_grad, torch_loc_grad, rtol=1e-10, atol=1e-12)
    # (the factor's upper triangle is no parameter: torch's formula reads the lower one only)
    torch.testing.assert_close(tril_grad.tril(), torch_tril_grad.tril(), rtol=1e-10, atol=1e-12)


def test_a_singular_full_gaussian_expert_is_refused_by_name():
    """A MultivariateNormal of singular scale_tril reached torch's raw _LinAlgError ("cholesky_inverse: ...")."""
    from torch.distributions import MultivariateNormal

    f64 = torch.float64
    singular = MultivariateNormal(torch.zeros(2, dtype=f64), scale_tril=torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=f64),
                                  validate_args=False)
    other = MultivariateNormal(torch.zeros(2, dtype=f64), torch.eye(2, dtype=f64))
    with pytest.raises(ValueError, match="a MultivariateNormal expert's covariance is singular"):
        op.kl_divergence(singular, other)


def test_a_chernoff_coefficient_beyond_float64_is_not_called_divergent_only():
    """Poisson(1e-300) against Poisson(1) at a = -2: sum_k p^-2 q^3 converges (to about e^(e^1381)), but its log
    overflows float64; the error said only that the integral diverges."""
    f64 = torch.float64
    with pytest.raises(ValueError, match="diverges for these Poisson experts, or its value overflows"):
        op.log_chernoff_coefficient(Poisson(torch.tensor(1e-300, dtype=f64)), Poisson(torch.tensor(1.0, dtype=f64)), -2.0)


def _log_sum_of_powers(p, q, a):
    """log sum_z p(z)^a q(z)^(1 - a) over a finite support, term by term (0^a = 0 for a > 0)."""
    p, q = np.asarray(p, dtype=float), np.asarray(q, dtype=float)
    with np.errstate(divide="ignore"):
        terms = np.where(p > 0, p ** a * q ** (1 - a), 0.0)
    return math.log(terms.sum())


def _binomial_pmf(n, p):
    return stats.binom(n, p).pmf(np.arange(n + 1))


def test_log_probability_experts_that_differ_by_a_shift_have_divergence_zero():
    """Categorical, Bernoulli and Binomial natural parameters are log-probabilities up to a common shift, along
    which the log-normaliser has no curvature: KL between two representatives of one distribution (logits 0 and 5)
    raised "neither form is accurate", and so did Chernoff and Rényi orders above 1 where an expert has a
    probability of zero (the member r at the combined parameters is then a shift of p on p's support). Against exact
    sums."""
    from torch.distributions import Bernoulli, Binomial, Categorical

    t = functools.partial(torch.tensor, dtype=torch.float64)
    inf = math.inf
    for p, q in (([0.0, 0.0], [5.0, 5.0]), ([-inf, 0.0, 1.0], [-inf, 3.0, 4.0]), ([0.5, 0.0, 1.0], [3.5, 3.0, 4.0])):
        assert float(op.kl_divergence(Categorical(logits=t(p)), Categorical(logits=t(q)))) == 0.0
    p, q = [0.0, 0.5, 0.5], [0.2, 0.4, 0.4]
    for a in (1.5, 2.0, 3.0):
        log_c = op.log_chernoff_coefficient(Categorical(probs=t(p)), Categorical(probs=t(q)), a)
        assert float(log_c) == pytest.approx(_log_sum_of_powers(p, q, a), rel=1e-14, abs=1e-15)
        renyi = op.renyi_divergence(Categorical(probs=t(p)), Categorical(probs=t(q)), a)
        assert float(renyi) == pytest.approx(_log_sum_of_powers(p, q, a) / (a - 1), rel=1e-14)
    for probability in (0.0, 1.0):
        bernoulli = op.log_chernoff_coefficient(Bernoulli(probs=t(probability)), Bernoulli(probs=t(0.3)), 1.5)
        exact = _log_sum_of_powers([1 - probability, probability], [0.7, 0.3], 1.5)
        assert float(bernoulli) == pytest.approx(exact, rel=1e-14)
        binomial = op.log_chernoff_coefficient(Binomial(5, probs=t(probability)), Binomial(5, probs=t(0.3)), 1.5)
        exact = _log_sum_of_powers(_binomial_pmf(5, probability), _binomial_pmf(5, 0.3), 1.5)
        assert float(binomial) == pytest.approx(exact, rel=1e-13)
    # the gradient is the same as before the shift was taken out (it has no component along the shift)
    logits_p = t([0.5, 0.0, 1.0]).requires_grad_(True)
    logits_q = t([3.5, 3.0, 4.1]).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: op.kl_divergence(Categorical(logits=x), Categorical(logits=y)),
                                    (logits_p, logits_q))


def test_poisson_affinities_of_nearly_equal_large_rates_keep_their_digits():
    """The natural parameters' difference log r_q - log r_p of rates 1e15 apart by 1e-9 kept only the digits the
    logs' rounding (about 35 eps) leaves: KL, Bhattacharyya and Chernoff 7e-6 off (the problem's conditioning allows
    about 2e-7). The Poisson family gives the difference as log1p((r_q - r_p) / r_p). Against 60-digit mpmath."""
    import mpmath

    mpmath.mp.dps = 60
    f64 = torch.float64
    for rate in (1e6, 1e15, 1e100):
        p, q = rate, rate * (1 + 1e-9)
        rp, rq = mpmath.mpf(p), mpmath.mpf(q)
        order = mpmath.mpf(1.5)
        expected = {"kl": rp * mpmath.log(rp / rq) - rp + rq, "bc": -(mpmath.sqrt(rp) - mpmath.sqrt(rq)) ** 2 / 2,
                    "chernoff": rp**order * rq ** (1 - order) - order * rp - (1 - order) * rq}
        experts = Poisson(torch.tensor(p, dtype=f64)), Poisson(torch.tensor(q, dtype=f64))
        got = {"kl": op.kl_divergence(*experts), "bc": op.log_bhattacharyya_coefficient(*experts),
               "chernoff": op.log_chernoff_coefficient(*experts, 1.5)}
        for name, value in got.items():
            assert float(value) == pytest.approx(float(expected[name]), rel=1e-12), (rate, name)
        # the alpha = 1/2 pool's normaliser, lambda_1^2 + lambda_2^2 + 2 lambda_1 lambda_2 BC, through combine (its
        # log-sum-exp of terms summing to about one rounds to about eps: absolute)
        pool = op.holder(list(experts), alpha=0.5, weights=[0.25, 0.75])
        log_z = mpmath.log(mpmath.mpf(0.25) ** 2 + mpmath.mpf(0.75) ** 2
                           + 2 * mpmath.mpf(0.25) * mpmath.mpf(0.75) * mpmath.exp(expected["bc"]))
        assert abs(float(pool.log_normalizer) - float(log_z)) < 1e-15


@pytest.mark.parametrize("rates", [(1.0, 1e-300), (1.0, 1e-15), (1e8, 1e-8), (1e-8, 1e8), (3.0, 1.4)])
def test_poisson_affinities_of_rates_far_apart_against_mpmath(rates):
    """log1p((r_q - r_p) / r_p) of a ratio r_q / r_p far below 1 rounds its argument to -1 + eps: KL(P(1) || P(1e-15))
    came out 33.5396 for 33.5388, KL(P(1) || P(1e-300)) inf for 689.78 (a review helper). Against 60-digit mpmath, with
    the gradient of the KL."""
    import mpmath

    mpmath.mp.dps = 60
    rp, rq = (mpmath.mpf(r) for r in rates)
    kl = rp * mpmath.log(rp / rq) - rp + rq
    order = mpmath.mpf("1e-9")
    chernoff = rp**order * rq ** (1 - order) - order * rp - (1 - order) * rq
    p = torch.tensor(rates[0], dtype=torch.float64, requires_grad=True)
    q = torch.tensor(rates[1], dtype=torch.float64, requires_grad=True)
    got = op.kl_divergence(Poisson(p), Poisson(q))
    assert got.item() == pytest.approx(float(kl), rel=1e-13)
    assert op.log_chernoff_coefficient(Poisson(p), Poisson(q), 1e-9).item() == pytest.approx(float(chernoff), rel=1e-9)
    got.backward()
    assert float(p.grad) == pytest.approx(float(mpmath.log(rp / rq)), rel=1e-13)
    assert float(q.grad) == pytest.approx(float(1 - rp / rq), rel=1e-13)


@pytest.mark.parametrize(("probability", "a"), [(1e-200, 2.0), (1e-300, 1.5), (1e-300, 3.0), (1e-100, 2.0)])
def test_orders_above_one_with_a_tiny_probability_against_mpmath(probability, a):
    """Bernoulli(1e-200) against Bernoulli(0.5) at a = 2 raised "neither form is accurate" (a review helper): the
    member r at 2 eta_p - eta_q has probability e^-920, whose curvature underflows, so KL(r || p), about 1e-200,
    has neither form; but its rounding is nothing beside log C = log 2. Categorical too; against 50-digit mpmath.
    A divergence whose rounding does matter still raises."""
    import mpmath
    from torch.distributions import Bernoulli, Categorical

    mpmath.mp.dps = 50
    t = functools.partial(torch.tensor, dtype=torch.float64)
    small, half = mpmath.mpf(probability), mpmath.mpf(0.5)
    want = mpmath.log(small**a * half ** (1 - a) + (1 - small) ** a * half ** (1 - a))
    got = op.log_chernoff_coefficient(Bernoulli(probs=t(probability)), Bernoulli(probs=t(0.5)), a)
    assert float(got) == pytest.approx(float(want), rel=1e-14)
    renyi = op.renyi_divergence(Bernoulli(probs=t(probability)), Bernoulli(probs=t(0.5)), a)
    assert float(renyi) == pytest.approx(float(want / (a - 1)), rel=1e-14)
    p = [small, (1 - small) / 2, (1 - small) / 2]
    want = mpmath.log(sum(x**a * mpmath.mpf(1 / 3) ** (1 - a) for x in p))
    got = op.log_chernoff_coefficient(Categorical(probs=t([probability, 0.5, 0.5])), Categorical(probs=t([1 / 3] * 3)), a)
    assert float(got) == pytest.approx(float(want), rel=1e-13)
    close = Gamma(t(1e-200), t(1.0)), Gamma(t(1.0000000001e-200), t(1.0))  # log C about 1e-21: every digit lost
    with pytest.raises(ValueError, match=r"order a=2.0 of these Gamma experts: neither form .* torch.float64"):
        op.log_chernoff_coefficient(*close, 2.0)


@pytest.mark.parametrize("a", [1e-12, 1e-6, 0.3, 1 - 1e-12])
def test_orders_near_zero_and_one_of_nearly_equal_experts_against_mpmath(a):
    """The geometric combination's Bregman form took each expert's offset as eta_s less the rounded centre
    a eta_p + (1 - a) eta_q, whose rounding (eps |eta|) the divergences squared: log C of Gamma experts 1e-12 apart
    at a = 1e-12 came out -3.9e-32 for -1.5e-36, Beta 3 000x off, and the Amari divergence with them (a review
    helper). The offsets are now sums of the experts' differences. Against 80-digit mpmath."""
    import mpmath

    mpmath.mp.dps = 80
    t = functools.partial(torch.tensor, dtype=torch.float64)
    order = mpmath.mpf(a)

    def combined(log_normalizer, p, q):
        mixed = [order * x + (1 - order) * y for x, y in zip(p, q)]
        return log_normalizer(*mixed) - order * log_normalizer(*p) - (1 - order) * log_normalizer(*q)

    def gamma_a(k, r):  # log Gamma(k) - k log r
        return mpmath.loggamma(k) - k * mpmath.log(r)

    def beta_a(x, y):
        return mpmath.loggamma(x) + mpmath.loggamma(y) - mpmath.loggamma(x + y)

    def dirichlet_a(*c):
        return sum(mpmath.loggamma(x) for x in c) - mpmath.loggamma(sum(c))

    cases = [(Gamma, (3.0, 1.0), (3.0, 1 + 1e-12), gamma_a), (Gamma, (1e5, 1.0), (1e5, 1 + 1e-10), gamma_a),
             (Beta, (0.5, 0.5), (0.5 + 1e-12, 0.5), beta_a)]
    for family, p, q, log_normalizer in cases:
        want = combined(log_normalizer, [mpmath.mpf(x) for x in p], [mpmath.mpf(x) for x in q])
        got = op.log_chernoff_coefficient(family(*map(t, p)), family(*map(t, q)), a)
        # (Beta's curvature, torch's trigamma, holds about ten digits)
        assert float(got) == pytest.approx(float(want), rel=1e-9, abs=0), (family.__name__, p)
        amari = op.amari_alpha_divergence(family(*map(t, p)), family(*map(t, q)), a)
        assert float(amari) == pytest.approx(float(-mpmath.expm1(want) / (order * (1 - order))), rel=1e-9, abs=0)
    from torch.distributions import Dirichlet

    p, q = [2.0, 3.0, 0.7], [2.0, 3.0 + 1e-12, 0.7]
    want = combined(dirichlet_a, [mpmath.mpf(x) for x in p], [mpmath.mpf(x) for x in q])
    got = op.log_chernoff_coefficient(Dirichlet(t(p)), Dirichlet(t(q)), a)
    assert float(got) == pytest.approx(float(want), rel=1e-9, abs=0)


@pytest.mark.parametrize("gap", [3.0, 15.0, 20.0, 30.0])
def test_hellinger_and_amari_gradients_of_experts_far_apart(gap):
    """Both are ``1 - e^x`` of a log-coefficient, whose torch ``expm1`` differentiates as ``expm1(x) + 1``: no digit
    where the coefficient is far below one (the Hellinger distance of unit Normals 20 apart had the gradient 0 for
    4.8e-22, and 3e-5 of it off at 15). Closed forms: ``BC = exp(-d^2 / 8)``, ``C_a = exp(-a (1 - a) d^2 / 2)``;
    second derivatives through gradgradcheck."""
    loc = torch.tensor(gap, dtype=torch.float64, requires_grad=True)

    def experts(m):
        return Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)), \
            Normal(m, torch.tensor(1.0, dtype=torch.float64))

    a = 0.3
    (hellinger,) = torch.autograd.grad(op.hellinger_distance(*experts(loc)), loc)
    (amari,) = torch.autograd.grad(op.amari_alpha_divergence(*experts(loc), a), loc)
    bc = math.exp(-gap**2 / 8)
    assert float(hellinger) == pytest.approx(bc * gap / 4 / (2 * math.sqrt(-math.expm1(-gap**2 / 8))), rel=1e-12)
    assert float(amari) == pytest.approx(math.exp(-a * (1 - a) * gap**2 / 2) * gap, rel=1e-12)
    if gap < 10:
        assert torch.autograd.gradgradcheck(lambda m: op.hellinger_distance(*experts(m)), (loc,))
        assert torch.autograd.gradgradcheck(lambda m: op.amari_alpha_divergence(*experts(m), a), (loc,))


@pytest.mark.parametrize("make", [lambda t: Gamma(t, torch.tensor(1.0, dtype=torch.float64)),
                                  lambda t: Beta(t, torch.tensor(0.7, dtype=torch.float64))])
def test_second_derivatives_of_kl_through_a_zero_upstream_gradient(make):
    """The Bregman divergence's backward gave an entry of zero upstream gradient a zero constant, so that the
    derivative of its gradient in whatever made the upstream zero was lost: d^2 (w KL) / dw dtheta at w = 0 came out
    0 for dKL / dtheta. Reference: torch's own KL of the same family."""
    theta = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    other = make(torch.tensor(3.0, dtype=torch.float64))
    (expected,) = torch.autograd.grad(torch.distributions.kl_divergence(make(theta), other), theta)
    for weight in (0.0, 0.5):
        w = torch.tensor(weight, dtype=torch.float64, requires_grad=True)
        (gradient,) = torch.autograd.grad(w * op.kl_divergence(make(theta), other), theta, create_graph=True)
        (mixed,) = torch.autograd.grad(gradient, w)
        assert float(mixed) == pytest.approx(float(expected), rel=1e-10)


@pytest.mark.parametrize("a", [0.2, 0.5, 0.8])
def test_chernoff_derivative_in_its_order_for_nearly_equal_experts(a):
    """``d log C_a / da`` of nearly equal Gamma experts went through the log-normalisers, whose terms of order one
    cancel: 1700 times too large at a = 1/2 (-4.4e-16 for -2.5e-19). Exact: mpmath's derivative of the closed form
    at 50 digits; second derivatives (in a and the parameters) by gradgradcheck on experts apart."""
    import mpmath as mp

    k1, r1, k2, r2 = 5.0, 2.0, 5.0 * (1 + 1e-6), 2.0

    def log_c(order):
        b = 1 - order
        k, r = order * k1 + b * k2, order * r1 + b * r2
        return (mp.loggamma(k) - order * mp.loggamma(k1) - b * mp.loggamma(k2) + order * k1 * mp.log(r1)
                + b * k2 * mp.log(r2) - k * mp.log(r))

    order = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    value = op.log_chernoff_coefficient(Gamma(torch.tensor(k1, dtype=torch.float64), torch.tensor(r1)),
                                        Gamma(torch.tensor(k2, dtype=torch.float64), torch.tensor(r2)), order)
    (got,) = torch.autograd.grad(value, order)
    with mp.workdps(50):
        exact = float(mp.diff(log_c, mp.mpf(a)))
    assert float(got) == pytest.approx(exact, rel=1e-6)

    def apart(order, shape):
        return op.log_chernoff_coefficient(Gamma(shape, torch.tensor(1.0, dtype=torch.float64)),
                                           Gamma(torch.tensor(3.0, dtype=torch.float64), torch.tensor(2.0)), order)

    shape = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(apart, (order, shape))
    assert torch.autograd.gradgradcheck(apart, (order, shape))


def test_chernoff_derivative_in_its_order_where_an_outcome_has_probability_zero():
    """Categorical experts giving an outcome probability zero (natural parameter -inf) keep the log-normaliser
    form: log C_a = log sum_i p_i^a q_i^(1 - a) over the outcomes both allow, its derivative the mean of
    log(p_i / q_i) under the weights p_i^a q_i^(1 - a)."""
    from torch.distributions import Categorical

    order = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    p, q = np.array([0.2, 0.8, 0.0]), np.array([0.3, 0.3, 0.4])
    value = op.log_chernoff_coefficient(Categorical(torch.tensor(p)), Categorical(torch.tensor(q)), order)
    (slope,) = torch.autograd.grad(value, order)
    both = p > 0
    terms = p[both] ** 0.3 * q[both] ** 0.7
    assert float(value) == pytest.approx(math.log(terms.sum()), rel=1e-12)
    assert float(slope) == pytest.approx(float((terms * np.log(p[both] / q[both])).sum() / terms.sum()), rel=1e-10)
