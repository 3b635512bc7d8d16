"""Sympy derivations of the closed forms evaluated at random parameters against the torch
implementation (float64, 1e-10 relative), and symbolic families end to end."""

import functools
import math
import warnings

import mpmath
import numpy as np
import pytest
import sympy as sp
import torch
from torch.distributions import (
    Bernoulli,
    Beta,
    Binomial,
    Categorical,
    Dirichlet,
    Exponential,
    Gamma,
    MultivariateNormal,
    Normal,
    Poisson,
    VonMises,
)

import opinionpool
from opinionpool import derivations
from opinionpool.families import NormalFamily
from opinionpool.functional import _laplace_log_chernoff
from opinionpool.pool import compositions
from opinionpool.symbolic import SymbolicFamily, to_torch

RTOL = 1e-10


@functools.lru_cache(maxsize=None)
def lambdified(symbols, expr):
    return sp.lambdify(symbols, expr, modules="mpmath")


def evaluate(symbols, expr, values):
    with mpmath.workdps(30):
        return float(lambdified(tuple(symbols), expr)(*[mpmath.mpf(v) for v in values]))


def close(got, expected, rtol=RTOL):
    got = float(got)
    assert abs(got - expected) <= rtol * max(abs(expected), 1e-300), (got, expected)


def random_points(count, seed, *ranges):
    rng = np.random.default_rng(seed)
    return [tuple(float(rng.uniform(lo, hi)) for lo, hi in ranges) for _ in range(count)]


@pytest.mark.parametrize("mu_i,mu_j,v_i,v_j", random_points(5, 0, (-3, 3), (-3, 3), (0.05, 4), (0.05, 4)))
def test_gaussian_hellinger_terms(mu_i, mu_j, v_i, v_j):
    symbols, terms = derivations.gaussian_hellinger_terms()
    sym = {name: evaluate(symbols, expr, (mu_i, mu_j, v_i, v_j)) for name, expr in terms.items()}
    p = Normal(torch.tensor(mu_i), torch.tensor(v_i).sqrt())
    q = Normal(torch.tensor(mu_j), torch.tensor(v_j).sqrt())
    close(opinionpool.log_bhattacharyya_coefficient(p, q), math.log(sym["S"]))
    close(opinionpool.log_bhattacharyya_coefficient(q, p), math.log(sym["S"]))
    # the normalised sqrt(q_i q_j): the family's geometric combination with weights (1/2, 1/2)
    family = NormalFamily()
    params = torch.stack((family.params_from_distribution(p), family.params_from_distribution(q)))
    combined, log_c = family.combine(params.unsqueeze(0), torch.full((1, 2), math.log(0.5)))
    close(combined[0, 0], sym["mean"])
    close(combined[0, 1].exp(), sym["variance"])
    close(log_c[0], math.log(sym["S"]))
    # the alpha = 1/2 pool with asymmetric weights, written with the symbolic S, M and V (paper eqs. 16, 20)
    lam = (0.3, 0.7)
    pool = opinionpool.holder([p, q], alpha=0.5, weights=lam)
    z = lam[0] ** 2 + lam[1] ** 2 + 2 * lam[0] * lam[1] * sym["S"]
    mean = (lam[0] ** 2 * mu_i + lam[1] ** 2 * mu_j + 2 * lam[0] * lam[1] * sym["M"]) / z
    second = (lam[0] ** 2 * (mu_i**2 + v_i) + lam[1] ** 2 * (mu_j**2 + v_j) + 2 * lam[0] * lam[1] * sym["V"]) / z
    close(pool.log_normalizer, math.log(z))
    close(pool.mean, mean, rtol=1e-9)
    close(pool.variance, second - mean**2, rtol=1e-8)


@pytest.mark.parametrize("r_i,r_j", random_points(5, 1, (0.1, 5), (0.1, 5)))
def test_exponential_example_of_the_paper(r_i, r_j):
    symbols, terms = derivations.exponential_hellinger_terms()
    sym = {name: evaluate(symbols, expr, (r_i, r_j)) for name, expr in terms.items()}
    p, q = Exponential(torch.tensor(r_i)), Exponential(torch.tensor(r_j))
    close(opinionpool.log_bhattacharyya_coefficient(p, q), math.log(sym["S"]))
    lam = (0.25, 0.75)
    pool = opinionpool.holder([p, q], alpha=0.5, weights=lam)
    z = lam[0] ** 2 + lam[1] ** 2 + 2 * lam[0] * lam[1] * sym["S"]
    mean = (lam[0] ** 2 / r_i + lam[1] ** 2 / r_j + 2 * lam[0] * lam[1] * sym["M"]) / z
    second = (lam[0] ** 2 * 2 / r_i**2 + lam[1] ** 2 * 2 / r_j**2 + 2 * lam[0] * lam[1] * sym["V"]) / z
    close(pool.log_normalizer, math.log(z))
    close(pool.mean, mean)
    close(pool.variance, second - mean**2, rtol=1e-9)


@pytest.mark.parametrize("point", random_points(4, 2, (0.3, 6), (0.2, 4), (0.3, 6), (0.2, 4), (0.05, 0.95)))
def test_gamma_and_beta_chernoff(point):
    k1, r1, k2, r2, a = point
    symbols, expr = derivations.gamma_chernoff()
    got = opinionpool.log_chernoff_coefficient(Gamma(torch.tensor(k1), torch.tensor(r1)),
                                               Gamma(torch.tensor(k2), torch.tensor(r2)), a)
    close(got, evaluate(symbols, expr, point))
    symbols, expr = derivations.beta_chernoff()
    got = opinionpool.log_chernoff_coefficient(Beta(torch.tensor(k1), torch.tensor(r1)),
                                               Beta(torch.tensor(k2), torch.tensor(r2)), a)
    close(got, evaluate(symbols, expr, point))


@pytest.mark.parametrize("point", random_points(4, 3, (0.1, 20), (0.1, 20), (0.05, 0.95)))
def test_poisson_chernoff(point):
    r1, r2, a = point
    symbols, expr = derivations.poisson_chernoff()
    got = opinionpool.log_chernoff_coefficient(Poisson(torch.tensor(r1)), Poisson(torch.tensor(r2)), a)
    close(got, evaluate(symbols, expr, point))


@pytest.mark.parametrize("order,num_experts", [(2, 3), (3, 3), (4, 2), (3, 4)])
def test_multinomial_expansion_matches_the_pool_components(order, num_experts):
    (lambdas, _), coefficients = derivations.multinomial_expansion(order, num_experts)
    index, counts, log_multinomial = compositions(order, num_experts, dtype=torch.float64)
    lam = np.random.default_rng(order).dirichlet(np.ones(num_experts))
    library = {}
    for idx, cnt, log_coef in zip(index.tolist(), counts.tolist(), log_multinomial.tolist()):
        k = [0] * num_experts
        for i, c in zip(idx, cnt):
            k[i] += c
        library[tuple(k)] = math.exp(log_coef) * math.prod(lam**k)
    assert set(library) == set(coefficients)
    for k, expr in coefficients.items():
        close(library[k], float(expr.subs(dict(zip(lambdas, lam)))), rtol=1e-12)


@pytest.mark.parametrize("point", random_points(3, 4, *[(0.3, 5)] * 6, (0.05, 0.95)))
def test_dirichlet_chernoff(point):
    u, kernel = derivations.dirichlet_kernel()
    c1, c2, a = point[:3], point[3:6], point[6]
    # the simplex integral is the multivariate Beta function, which the derivation did not assume
    close(math.log(evaluate(u, kernel, c1)), sum(map(math.lgamma, c1)) - math.lgamma(sum(c1)), rtol=1e-12)
    symbols, expr = derivations.dirichlet_chernoff()
    got = opinionpool.log_chernoff_coefficient(Dirichlet(torch.tensor(c1)), Dirichlet(torch.tensor(c2)), a)
    close(got, evaluate(symbols, expr, point))


@pytest.mark.parametrize("point", random_points(4, 5, (-math.pi, math.pi), (0.1, 8), (-math.pi, math.pi), (0.1, 8),
                                                (0.05, 0.95)))
def test_von_mises_chernoff(point):
    (x, y), kernel = derivations.von_mises_kernel()
    m1, k1, m2, k2, a = point
    with mpmath.workdps(30):  # the symbolic kernel against quadrature of its definition
        quad = mpmath.quad(lambda t: mpmath.exp(k1 * mpmath.cos(t) + k2 * mpmath.sin(t)), [-mpmath.pi, mpmath.pi])
    close(evaluate((x, y), kernel, (k1, k2)), float(quad), rtol=1e-13)
    symbols, expr = derivations.von_mises_chernoff()
    p = VonMises(torch.tensor(m1), torch.tensor(k1))
    q = VonMises(torch.tensor(m2), torch.tensor(k2))
    close(opinionpool.log_chernoff_coefficient(p, q, a), evaluate(symbols, expr, point))


@pytest.mark.parametrize("point", random_points(4, 6, (0.02, 0.98), (0.02, 0.98), (0.05, 0.95)))
def test_bernoulli_and_binomial_chernoff(point):
    p1, p2, a = point
    symbols, expr = derivations.bernoulli_chernoff()
    got = opinionpool.log_chernoff_coefficient(Bernoulli(probs=torch.tensor(p1)), Bernoulli(probs=torch.tensor(p2)), a)
    close(got, evaluate(symbols, expr, point))
    symbols, expr = derivations.binomial_chernoff(7)
    got = opinionpool.log_chernoff_coefficient(Binomial(7, probs=torch.tensor(p1)), Binomial(7, probs=torch.tensor(p2)),
                                               a)
    close(got, evaluate(symbols, expr, point))


@pytest.mark.parametrize("point", random_points(4, 7, *[(-4, 4)] * 6, (0.05, 0.95)))
def test_categorical_chernoff(point):
    symbols, expr = derivations.categorical_chernoff(3)
    p, q = Categorical(logits=torch.tensor(point[:3])), Categorical(logits=torch.tensor(point[3:6]))
    close(opinionpool.log_chernoff_coefficient(p, q, point[6]), evaluate(symbols, expr, point))


@pytest.mark.parametrize("point", random_points(6, 9, (0.1, 5), (0.1, 5), (0.01, 8), (0.05, 0.95)))
def test_laplace_chernoff(point):
    """Laplace experts at -delta / 3 and 2 delta / 3 (only the distance matters), scales ``b`` given as
    log-variances ``log(2 b^2)``."""
    b_p, b_q, delta, a = point
    symbols, expr = derivations.laplace_chernoff()
    got = _laplace_log_chernoff(torch.tensor(-delta / 3), torch.tensor(math.log(2 * b_p**2)),
                                torch.tensor(2 * delta / 3), torch.tensor(math.log(2 * b_q**2)), a)
    close(got, evaluate(symbols, expr, point))


@pytest.mark.parametrize("point", [(1.0, 1.0, 2.0, 0.5), (0.6, 0.4, 1.0, 0.6), (1.3, 0.7, 2.5, 0.3)])
def test_laplace_chernoff_where_the_stretch_between_the_locations_is_flat(point):
    """Where ``a / b_p = (1 - a) / b_q`` (equal scales at ``a = 1/2``, the Hellinger case) the integrand is constant
    between the two locations; integrated for positive symbols the expression divided by that difference and was NaN
    there. Against mpmath's quadrature of ``q_p^a q_q^(1 - a)``, and a generic point beside them."""
    b_p, b_q, delta, a = point
    symbols, expr = derivations.laplace_chernoff()

    def integrand(z):
        return ((mpmath.exp(-abs(z) / b_p) / (2 * b_p)) ** a * (mpmath.exp(-abs(z - delta) / b_q) / (2 * b_q)) ** (1 - a))

    expected = float(mpmath.log(mpmath.quad(integrand, [-mpmath.inf, 0, delta, mpmath.inf])))
    assert float(evaluate(symbols, expr, point)) == pytest.approx(expected, rel=1e-12, abs=1e-14)


def random_bivariate_gaussian(rng):
    factor = rng.normal(size=(2, 2))
    return rng.uniform(-3, 3, size=2), factor @ factor.T + rng.uniform(0.05, 1) * np.eye(2)


@pytest.mark.parametrize("seed", range(4))
def test_bivariate_gaussian_chernoff(seed):
    rng = np.random.default_rng(100 + seed)
    (m1, s1), (m2, s2) = random_bivariate_gaussian(rng), random_bivariate_gaussian(rng)
    a = float(rng.uniform(0.05, 0.95))
    symbols, expr = derivations.bivariate_gaussian_chernoff()

    def point(a):
        return (*m1, s1[0, 0], s1[0, 1], s1[1, 1], *m2, s2[0, 0], s2[0, 1], s2[1, 1], a)

    p = MultivariateNormal(torch.tensor(m1), covariance_matrix=torch.tensor(s1))
    q = MultivariateNormal(torch.tensor(m2), covariance_matrix=torch.tensor(s2))
    close(opinionpool.log_chernoff_coefficient(p, q, a), evaluate(symbols, expr, point(a)))
    log_s = evaluate(symbols, expr, point(0.5))
    close(opinionpool.log_bhattacharyya_coefficient(q, p), log_s)
    lam = (0.3, 0.7)  # the pairwise term of the alpha = 1/2 pool's normaliser
    pool = opinionpool.holder([p, q], alpha=0.5, weights=lam)
    close(pool.log_normalizer, math.log(lam[0] ** 2 + lam[1] ** 2 + 2 * lam[0] * lam[1] * math.exp(log_s)))


@pytest.mark.parametrize("seed", range(4))
def test_kl_divergences(seed):
    rng = np.random.default_rng(200 + seed)
    mu_p, mu_q = rng.uniform(-3, 3, size=2)
    v_p, v_q = rng.uniform(0.05, 4, size=2)
    symbols, expr = derivations.gaussian_kl()
    got = opinionpool.kl_divergence(Normal(torch.tensor(mu_p), torch.tensor(v_p).sqrt()),
                                    Normal(torch.tensor(mu_q), torch.tensor(v_q).sqrt()))
    close(got, evaluate(symbols, expr, (mu_p, v_p, mu_q, v_q)))
    k1, r1, k2, r2 = rng.uniform(0.3, 6), rng.uniform(0.2, 4), rng.uniform(0.3, 6), rng.uniform(0.2, 4)
    symbols, expr = derivations.gamma_kl()
    got = opinionpool.kl_divergence(Gamma(torch.tensor(k1), torch.tensor(r1)), Gamma(torch.tensor(k2), torch.tensor(r2)))
    close(got, evaluate(symbols, expr, (k1, r1, k2, r2)))
    r1, r2 = rng.uniform(0.1, 20, size=2)
    symbols, expr = derivations.poisson_kl()
    got = opinionpool.kl_divergence(Poisson(torch.tensor(r1)), Poisson(torch.tensor(r2)))
    close(got, evaluate(symbols, expr, (r1, r2)))


@pytest.mark.parametrize("name,point", [
    ("gaussian", (0.3, 1.7, 0.3 + 1e-5, 1.7 * (1 + 1e-6))),
    ("poisson", (100.0, 100.001)),
    ("poisson", (100.0, 100.0 * (1 + 1e-9))),
    ("gamma", (50.0, 2.0, 50.0001, 2.0)),
    ("gamma", (3.0, 0.5, 7.0, 2.5)),
])
def test_kl_divergence_of_nearly_equal_experts(name, point):
    symbols, expr = getattr(derivations, f"{name}_kl")()
    if name == "gaussian":
        p, q = Normal(torch.tensor(point[0]), torch.tensor(point[1]).sqrt()), Normal(torch.tensor(point[2]),
                                                                                    torch.tensor(point[3]).sqrt())
    elif name == "poisson":
        p, q = Poisson(torch.tensor(point[0])), Poisson(torch.tensor(point[1]))
    else:
        p, q = Gamma(torch.tensor(point[0]), torch.tensor(point[1])), Gamma(torch.tensor(point[2]), torch.tensor(point[3]))
    close(opinionpool.kl_divergence(p, q), evaluate(symbols, expr, point), rtol=1e-8)


def test_wasserstein_barycenter_of_normals():
    (lambdas, mus, sigmas, (m, s)), terms = derivations.gaussian_wasserstein_barycenter(3)
    # the quantile-function barycenter is the stationary point of sum_j lambda_j W2^2, and a minimum
    assert sp.simplify(terms["mean"] - terms["quantile_mean"]) == 0
    assert sp.simplify(terms["sd"] - terms["quantile_sd"]) == 0
    assert sp.simplify(sp.hessian(terms["objective"], (m, s)) - 2 * sum(lambdas) * sp.eye(2)) == sp.zeros(2)
    rng = np.random.default_rng(8)
    lam = rng.uniform(0.2, 3, size=3)  # unnormalised on purpose
    mu, sd = rng.uniform(-3, 3, size=(3, 2)), rng.uniform(0.05, 3, size=(3, 2))
    loc, logvar = opinionpool.functional.wasserstein_barycenter(torch.tensor(mu), torch.tensor(2 * np.log(sd)),
                                                                weights=torch.tensor(lam))
    for feature in range(2):
        values = (*lam, *mu[:, feature], *sd[:, feature])
        mean = evaluate((*lambdas, *mus, *sigmas), terms["mean"], values)
        std = evaluate((*lambdas, *mus, *sigmas), terms["sd"], values)
        barycenter = opinionpool.wasserstein_barycenter(
            [Normal(torch.tensor(mu[j, feature]), torch.tensor(sd[j, feature])) for j in range(3)], weights=lam)
        close(barycenter.loc, mean, rtol=1e-12)
        close(barycenter.scale, std, rtol=1e-12)
        close(loc[feature], mean, rtol=1e-12)
        close((0.5 * logvar[feature]).exp(), std, rtol=1e-12)


# ------------------------------------------------------------------------ symbolic families
def symbolic_gamma():
    z = sp.Symbol("z", positive=True)
    e1, e2 = sp.symbols("eta1 eta2", real=True)
    return SymbolicFamily(z, [e1, e2], [sp.log(z), z], sp.loggamma(e1 + 1) - (e1 + 1) * sp.log(-e2),
                          support=(0, sp.oo), domain=[e1 > -1, e2 < 0], name="symbolic Gamma")


def test_symbolic_family_mean_parameters_match_the_builtin_gamma_and_verify():
    family = symbolic_gamma()
    eta = torch.tensor([[1.0, -2.0], [-0.5, -0.3], [4.0, -7.0]])
    # the builtin Gamma takes the concentration itself (with base measure 1 / z), this one concentration - 1: the same
    # densities, so the same normaliser and E[T(z)]
    builtin, builtin_eta = opinionpool.families.GammaFamily(), eta + torch.tensor([1.0, 0.0])
    assert torch.allclose(family.mean_parameters(eta), builtin.mean_parameters(builtin_eta), rtol=1e-12, atol=0)
    assert torch.allclose(family.log_normalizer(eta), builtin.log_normalizer(builtin_eta), rtol=1e-12, atol=0)
    report = family.verify([(1, -2), (-0.5, -0.3)], symbolic=False)
    # per point: the normalisation, E[T] and the torch gradient for each statistic (5); the torch A, and log h and
    # both statistics at three points of the support (10); the mean and variance of z and their torch values (4)
    assert report.passed and len(report.checks) == 38
    assert all(c.method.startswith("mpmath") for c in report.checks if not c.name.startswith("torch"))


def test_symbolic_verify_tries_sympy_first():
    z, eta = sp.symbols("z eta", real=True)
    family = SymbolicFamily(z, [eta], [z], -sp.log(-eta), support=(0, sp.oo), domain=[eta < 0])
    report = family.verify([(-2,), (-sp.Rational(1, 3),)])
    assert report.passed and all(c.method == "symbolic" for c in report.checks if not c.name.startswith("torch"))


def test_bessel_functions_of_higher_order_reach_torch_and_fractional_orders_raise():
    """A cosine family on (-pi, pi) (von Mises with mean direction 0): A = log(2 pi I_0(eta)), whose second
    derivative brings in I_2. Orders were truncated to int (I_(1/2) ran as I_0) and order 2 raised a KeyError.
    References: scipy's iv and quadrature of the density."""
    import scipy.integrate
    import scipy.special

    from opinionpool.symbolic import to_torch

    x = sp.Symbol("x", positive=True)
    point = torch.tensor(1.3, dtype=torch.float64)
    for order in (2, 3, -2):
        assert float(to_torch([x], sp.besseli(order, x))(point)) == pytest.approx(scipy.special.iv(order, 1.3), rel=1e-13)
    with pytest.raises(ValueError, match="besseli of order 1/2 has no torch counterpart"):
        to_torch([x], sp.besseli(sp.Rational(1, 2), x))
    # next to 0 (the upward recurrence from I_0 and I_1 cancelled: I_2(1e-5) 3.5e-4 off, I_2(1e-7) 6.6 %) and on both
    # sides of where the power series hands over to the recurrence (|x| = n + 20); the gradient is (I_n-1 + I_n+1) / 2
    points = torch.tensor([1e-7, 1e-5, 0.3, 21.9, 22.1, 25.0, 60.0, -3.0], dtype=torch.float64, requires_grad=True)
    for order in (2, 3, 5):
        function = to_torch([x], sp.besseli(order, x))
        values = function(points)
        expected = scipy.special.iv(order, points.detach().numpy())
        assert values.tolist() == pytest.approx(expected.tolist(), rel=1e-13)
        (gradient,) = torch.autograd.grad(values.sum(), points)
        where = points.detach().numpy()
        slope = (scipy.special.iv(order - 1, where) + scipy.special.iv(order + 1, where)) / 2
        assert gradient.tolist() == pytest.approx(slope.tolist(), rel=1e-12)
    z, eta = sp.Symbol("z", real=True), sp.Symbol("eta", positive=True)
    family = SymbolicFamily(z, [eta], [sp.cos(z)], sp.log(2 * sp.pi * sp.besseli(0, eta)), support=(-sp.pi, sp.pi),
                            domain=[eta > 0], name="cosine")
    assert family.verify([(sp.Rational(13, 10),)], symbolic=False).passed

    def moment(k):
        density = lambda t: math.exp(1.3 * math.cos(t)) / (2 * math.pi * scipy.special.i0(1.3))  # noqa: E731
        return scipy.integrate.quad(lambda t: math.cos(t) ** k * density(t), -math.pi, math.pi, epsabs=1e-14)[0]

    assert float(family.mean_parameters(torch.tensor([1.3], dtype=torch.float64))) == pytest.approx(moment(1), rel=1e-12)
    curvature = to_torch([eta], family.hessian[0, 0])  # Var[cos z], with I_2 in it
    assert float(curvature(point)) == pytest.approx(moment(2) - moment(1) ** 2, rel=1e-12)


def test_symbolic_verify_says_where_a_normaliser_is_wrong():
    z = sp.Symbol("z", positive=True)
    e1, e2 = sp.symbols("eta1 eta2", real=True)
    wrong = SymbolicFamily(z, [e1, e2], [sp.log(z), z], sp.loggamma(e1 + 1) - e1 * sp.log(-e2),
                           support=(0, sp.oo), domain=[e1 > -1, e2 < 0], name="wrong Gamma")
    with pytest.raises(ValueError, match=r"wrong Gamma: verification failed:\n  normalisation at eta=\(1, -2\)"):
        wrong.verify([(1, -2)], symbolic=False)
    report = wrong.verify([(1, -2)], symbolic=False, raise_on_failure=False)
    assert not report.passed
    with pytest.raises(ValueError, match="outside the natural parameter space"):
        wrong.verify([(-2, -1)])


def test_symbolic_verify_refuses_a_point_where_the_normaliser_is_not_real():
    """Without a declared domain, a point outside the natural parameter space reached the integrals: sympy's search
    for the divergent integral of a Gamma's density at eta = -3/2 did not return (and mpmath's was complex)."""
    z, eta = sp.symbols("z eta", real=True)
    family = SymbolicFamily(z, [eta], [sp.log(z)], sp.loggamma(eta + 1), log_base_measure=-z, support=(0, sp.oo))
    with pytest.raises(ValueError, match=r"eta=\(-3/2,\) is outside the natural parameter space: the log-normaliser "
                                         r"loggamma\(eta \+ 1\) is .*I there"):
        family.verify([(-sp.Rational(3, 2),)])
    assert family.verify([(sp.Rational(1, 2),)], symbolic=False).passed  # inside it, the same family verifies


def test_symbolic_experts_pool_like_builtin_ones():
    family = symbolic_gamma()
    shapes, rates = (2.0, 4.0, 0.7), (2.0, 1.0, 0.5)
    symbolic = [family.expert(torch.tensor([k - 1, -r])) for k, r in zip(shapes, rates)]
    builtin = [Gamma(torch.tensor(k), torch.tensor(r)) for k, r in zip(shapes, rates)]
    weights = [0.2, 0.3, 0.5]
    for alpha in (0.0, 0.5, 1 / 3, 2.0):
        a = opinionpool.holder(symbolic, alpha=alpha, weights=weights)
        b = opinionpool.holder(builtin, alpha=alpha, weights=weights)
        close(a.log_normalizer, float(b.log_normalizer), rtol=1e-9)
        close(a.mean, float(b.mean), rtol=1e-9)
        close(a.variance, float(b.variance), rtol=1e-9)
        matched_a, matched_b = a.moment_match(), b.moment_match()
        assert torch.allclose(matched_a.params, torch.stack((matched_b.concentration - 1, -matched_b.rate)),
                              rtol=1e-7, atol=0)
    close(opinionpool.log_bhattacharyya_coefficient(symbolic[0], symbolic[2]),
          float(opinionpool.log_bhattacharyya_coefficient(builtin[0], builtin[2])))
    close(opinionpool.kl_divergence(symbolic[0], symbolic[1]), float(opinionpool.kl_divergence(builtin[0], builtin[1])))


def test_symbolic_family_declaration_errors():
    z, e = sp.symbols("z eta", real=True)
    with pytest.raises(ValueError, match="sufficient_statistic has 2 entries but natural_params has 1"):
        SymbolicFamily(z, [e], [z, z**2], -sp.log(-e))
    with pytest.raises(ValueError, match=r"log_normalizer may only depend on natural_params, but uses \['z'\]"):
        SymbolicFamily(z, [e], [z], -sp.log(-e) + z)


def test_symbolic_families_with_constants_bessel_and_gamma_run_in_torch_and_verify_their_translation():
    """Constant sub-expressions (log(2 pi), sqrt(2), 2 / sqrt(pi)) printed as torch.log(6.28...) raised at first use,
    besseli of a non-trivial argument was left as text (NameError: sqrt), and gamma named a torch.special.gamma that
    does not exist; verify checked only the gradient's translation, so such families passed it. References: scipy."""
    import scipy.special
    import scipy.stats

    from opinionpool.symbolic import to_torch

    z, e1, e2 = sp.symbols("z eta1 eta2", real=True)
    normal = SymbolicFamily(z, [e1, e2], [z, z**2], -e1**2 / (4 * e2) - sp.log(-2 * e2) / 2,
                            log_base_measure=-sp.log(2 * sp.pi) / 2, domain=[e2 < 0], name="normal")
    value = normal.expert(torch.tensor([0.5, -0.5], dtype=torch.float64)).log_prob(torch.tensor(0.3, dtype=torch.float64))
    assert value.item() == pytest.approx(scipy.stats.norm(0.5, 1).logpdf(0.3), rel=1e-13)
    assert normal.verify([(0.5, -0.5)], symbolic=False).passed
    log_normalizer = sp.log(2 * sp.pi * sp.besseli(0, sp.sqrt(e1**2 + e2**2)))
    von_mises = SymbolicFamily(z, [e1, e2], [sp.cos(z), sp.sin(z)], log_normalizer, support=(-sp.pi, sp.pi),
                               name="von Mises")
    value = von_mises.expert(torch.tensor([1.0, 0.5], dtype=torch.float64)).log_prob(torch.tensor(0.3, dtype=torch.float64))
    expected = scipy.stats.vonmises(math.hypot(1.0, 0.5), loc=math.atan2(0.5, 1.0)).logpdf(0.3)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    assert von_mises.verify([(1, 0.5)], symbolic=False).passed
    points = torch.tensor([2.5, 0.3, -0.5, -1.5, -2.5], dtype=torch.float64)
    np.testing.assert_allclose(to_torch([z], sp.gamma(z))(points).numpy(), scipy.special.gamma(points.numpy()), rtol=1e-13)
    error_function = to_torch([z], 2 * sp.exp(-z**2) / sp.sqrt(sp.pi) + sp.sqrt(2) * sp.erf(z))(points)
    want = 2 * np.exp(-points.numpy() ** 2) / math.sqrt(math.pi) + math.sqrt(2) * scipy.special.erf(points.numpy())
    np.testing.assert_allclose(error_function.numpy(), want, rtol=1e-14)
    # a translation that cannot run fails verify (here: A replaced by one that raises)
    normal._log_normalizer_fn = lambda *eta: torch.log(3.0)
    report = normal.verify([(0.5, -0.5)], symbolic=False, raise_on_failure=False)
    assert [c.name.split(" (")[0] for c in report.checks if not c.passed] == ["torch A"]


def test_custom_experts_refuse_values_outside_their_support_and_statistics_of_the_wrong_shape():
    """An expert's log_prob extended the formula past the support (a truncated exponential on (0, 1) gave 2.84 at
    z = 2), a statistic without its last axis summed every value's statistic into each log_prob, and a parameter
    outside the space was reported by its first (valid) entry."""
    z, t, e1, e2 = sp.symbols("z t eta1 eta2", real=True)
    truncated = SymbolicFamily(z, [t], [z], sp.log((sp.exp(t) - 1) / t), support=(0, 1), name="truncated exponential")
    values = torch.tensor([0.5, 2.0, -3.0, math.nan], dtype=torch.float64)
    eta = torch.tensor([2.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"value must lie in the support of the truncated exponential.*\[2, -3, nan\]"):
        truncated.expert(eta, validate_args=True).log_prob(values)
    got = truncated.expert(eta, validate_args=False).log_prob(values)
    inside = 2.0 * 0.5 - math.log((math.exp(2.0) - 1) / 2.0)
    assert got[0].item() == pytest.approx(inside, rel=1e-14) and got[1:3].tolist() == [-math.inf, -math.inf]
    assert math.isnan(got[3].item())
    rayleigh = opinionpool.CustomFamily(lambda n: -torch.log(-2 * n[..., 0]), lambda v: v * v, torch.log, num_params=1,
                                        support_interval=(0, math.inf), name="Rayleigh")
    with pytest.raises(ValueError, match=r"Rayleigh: sufficient_statistic must map values of shape \(3,\) to shape "
                                         r"\(3, 1\).*got shape \(3,\)"):
        rayleigh.expert(torch.tensor([-0.5], dtype=torch.float64)).log_prob(torch.tensor([0.5, 1.0, 2.0]))
    wide = opinionpool.CustomFamily(lambda n: -torch.log(-2 * n), lambda v: (v * v).unsqueeze(-1), torch.log,
                                    num_params=1, support_interval=(0, math.inf), name="Rayleigh")
    with pytest.raises(ValueError, match=r"log_normalizer must map natural parameters of shape \(1,\) to shape \(\), "
                                         r"got shape \(1,\)"):
        wide.expert(torch.tensor([-0.5], dtype=torch.float64)).log_prob(torch.tensor(0.5, dtype=torch.float64))
    inverse_gaussian = SymbolicFamily(z, [e1, e2], [z, 1 / z], -2 * sp.sqrt(e1 * e2) - sp.log(-2 * e2) / 2,
                                      support=(0, sp.oo), domain=[e1 < 0, e2 < 0], name="inverse Gaussian")
    with pytest.raises(ValueError, match=r"outside the inverse Gaussian parameter space: \[-0.5, 0\]"):
        inverse_gaussian.expert(torch.tensor([-0.5, 0.0], dtype=torch.float64))


def test_a_density_indeterminate_on_the_end_of_its_support_takes_its_limit_from_inside():
    """An inverse Gaussian's log h(z) = -3/2 log z is +inf at z = 0 and <eta, T(z)> = eta_2 / z is -inf: the formula
    gave NaN there, for the expert and its pools (the support is closed). The density there is its limit from
    inside, 0 (scipy's logpdf at 0 is -inf); the pool's gradient in the natural parameters carries no NaN."""
    import scipy.stats

    z, e1, e2 = sp.Symbol("z", positive=True), *sp.symbols("e1 e2")
    family = SymbolicFamily(z, [e1, e2], [z, 1 / z], -2 * sp.sqrt(e1 * e2) - sp.log(-2 * e2) / 2,
                            log_base_measure=-sp.Rational(3, 2) * sp.log(z) - sp.log(2 * sp.pi) / 2,
                            support=(0, sp.oo), domain=[e1 < 0, e2 < 0], name="inverse Gaussian")
    natural = torch.tensor([[-0.5, -1.0], [-2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    values = torch.tensor([0.0, 1e-3, 1.0], dtype=torch.float64)
    for mean, shape, eta in zip((math.sqrt(2.0), 0.5), (2.0, 1.0), natural.detach()):
        # eta = (-lambda / (2 mu^2), -lambda / 2)
        assert eta.tolist() == pytest.approx([-shape / (2 * mean**2), -shape / 2], rel=1e-15)
        expected = scipy.stats.invgauss(mean / shape, scale=shape).logpdf(values.numpy())
        got = family.expert(eta).log_prob(values)
        assert got[0].item() == -math.inf == expected[0]
        assert got[1:].tolist() == pytest.approx(expected[1:].tolist(), rel=1e-12)
    for alpha in (0.0, 0.5, 1.0, 2.0):
        pool = opinionpool.holder([family.expert(natural[0]), family.expert(natural[1])], alpha=alpha,
                                  weights=torch.tensor([0.3, 0.7], dtype=torch.float64))
        log_p = pool.log_prob(values)
        assert log_p[0].item() == -math.inf and torch.isfinite(log_p[1:]).all(), (alpha, log_p)
        (gradient,) = torch.autograd.grad(log_p[1:].sum(), natural)
        assert torch.isfinite(gradient).all(), (alpha, gradient)


def test_verify_integrates_a_concentrated_density_far_from_zero():
    """mpmath's quadrature over the whole half-line saw no mass in an inverse Gaussian of mean 1e4 and standard
    deviation 100 (normalisation 0, a correct family failed verify); split at its mean and standard deviations it
    integrates to one, and a base measure off by a factor sqrt(2) still fails there."""
    z, e1, e2 = sp.Symbol("z", positive=True), *sp.symbols("e1 e2")
    declaration = dict(support=(0, sp.oo), domain=[e1 < 0, e2 < 0], name="inverse Gaussian")
    log_normalizer = -2 * sp.sqrt(e1 * e2) - sp.log(-2 * e2) / 2
    family = SymbolicFamily(z, [e1, e2], [z, 1 / z], log_normalizer,
                            log_base_measure=-sp.Rational(3, 2) * sp.log(z) - sp.log(2 * sp.pi) / 2, **declaration)
    mean, shape = 1e4, 1e8  # eta = (-lambda / (2 mu^2), -lambda / 2)
    point = (-shape / (2 * mean**2), -shape / 2)
    report = family.verify([point], symbolic=False)
    assert report.passed and {c.method for c in report.checks} >= {"mpmath quadrature (30 digits)"}
    doubled = SymbolicFamily(z, [e1, e2], [z, 1 / z], log_normalizer,
                             log_base_measure=-sp.Rational(3, 2) * sp.log(z) - sp.log(sp.pi) / 2, **declaration)
    failed = [c for c in doubled.verify([point], symbolic=False, raise_on_failure=False).checks if not c.passed]
    assert failed[0].name == "normalisation" and failed[0].value == pytest.approx(math.sqrt(2), rel=1e-12)


def test_symbolic_family_takes_a_mean_and_variance_that_verify_checks():
    """A family whose z is not a statistic (Rayleigh: T = z^2) had no mean, and the numerical engine refused pools
    of its experts far apart ("no numeric mean"), with no way to give one. Given as expressions, they place the
    quadrature: log Z and the mean of the alpha = 2 pool of scales 1 and 1e4 against scipy quadrature of the pooled
    density; verify checks them by integration and fails a wrong one."""
    import scipy.integrate
    import scipy.stats

    z, eta = sp.Symbol("z", positive=True), sp.Symbol("eta", real=True)
    declaration = dict(log_base_measure=sp.log(z), support=(0, sp.oo), domain=[eta < 0], name="Rayleigh")
    family = SymbolicFamily(z, [eta], [z**2], -sp.log(-2 * eta), mean=sp.sqrt(-sp.pi / (4 * eta)),
                            variance=-(4 - sp.pi) / (4 * eta), **declaration)
    assert family.verify([(-0.5,), (-2,)], symbolic=False).passed
    scales, weights = (1.0, 1e4), torch.tensor([0.7, 0.3], dtype=torch.float64)
    experts = [family.expert(torch.tensor([-1 / (2 * s**2)], dtype=torch.float64)) for s in scales]
    pool = opinionpool.holder(experts, 2.0, weights)

    def density(x):
        return (0.7 * scipy.stats.rayleigh(scale=scales[0]).pdf(x) ** 2
                + 0.3 * scipy.stats.rayleigh(scale=scales[1]).pdf(x) ** 2) ** 0.5

    def integral(f):
        return sum(scipy.integrate.quad(f, a, b, limit=500, epsabs=0)[0] for a, b in ((0, 10), (10, 1e6)))

    mass = integral(density)
    assert pool.log_normalizer.item() == pytest.approx(math.log(mass), rel=1e-10)
    assert pool.mean.item() == pytest.approx(integral(lambda x: x * density(x)) / mass, rel=1e-10)
    wrong = SymbolicFamily(z, [eta], [z**2], -sp.log(-2 * eta), mean=sp.sqrt(-1 / (4 * eta)), **declaration)
    report = wrong.verify([(-0.5,)], symbolic=False, raise_on_failure=False)
    assert [c.name for c in report.checks if not c.passed] == ["mean = E[z]"]
    with pytest.raises(ValueError, match=r"mean may only depend on natural_params, but uses \['z'\]"):
        SymbolicFamily(z, [eta], [z**2], -sp.log(-2 * eta), mean=z, **declaration)
    # a mean without a variance: each expert's variance by quadrature about its mean, which for scales 1e-3 and 1e5
    # found no mass (the whole line in z) and raised, telling the user to give the mean they had given
    mean_only = SymbolicFamily(z, [eta], [z**2], -sp.log(-2 * eta), mean=sp.sqrt(-sp.pi / (4 * eta)), **declaration)
    scales = (1e-3, 1e5)
    experts = [mean_only.expert(torch.tensor([-1 / (2 * s**2)], dtype=torch.float64)) for s in scales]
    mass = sum(scipy.integrate.quad(density, a, b, limit=500, epsabs=0)[0]
               for a, b in ((0, 1e-2), (1e-2, 10), (10, 1e7)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's IntegrationWarning from the engine's own quadrature too
        assert opinionpool.holder(experts, 2.0, weights).log_normalizer.item() == pytest.approx(math.log(mass), rel=1e-10)


def test_verify_checks_a_variance_given_alone_and_the_torch_moments():
    """A variance given without a mean was never checked (the check sat under the mean's), so a half-normal family
    declared with a variance of 123 passed and its pools used it; a mean or variance whose torch translation cannot
    run passed too and raised at the pool's first use. The variance is now checked about the density's own mean
    (1/2 - 1/pi at eta = -1/2, ``T = z^2``: a half-normal of scale 1), and the torch moments like A's. ``Max``,
    ``Min`` and ``erfc`` now translate (``torch.max(0, x)`` raised, ``erfc`` was undefined)."""
    z, eta = sp.Symbol("z", real=True), sp.Symbol("eta", real=True)
    declaration = dict(support=(0, sp.oo), domain=[eta < 0], name="half-normal")
    log_normalizer = -sp.log(-eta) / 2 + sp.log(sp.sqrt(sp.pi) / 2)
    wrong = SymbolicFamily(z, [eta], [z**2], log_normalizer, variance=sp.Integer(123), **declaration)
    report = wrong.verify([(-0.5,)], symbolic=False, raise_on_failure=False)
    assert [c.name for c in report.checks if not c.passed] == ["variance = E[(z - mean)^2]"]
    assert [c.expected for c in report.checks if not c.passed] == [123.0]
    right = SymbolicFamily(z, [eta], [z**2], log_normalizer, variance=1 / (-2 * eta) - 1 / (-sp.pi * eta),
                           **declaration)
    assert right.verify([(-0.5,), (-3,)], symbolic=False).passed
    # the right mean, times gamma(1 - eta) / factorial(-eta) = 1, written with a factorial torch has no name for
    untranslatable = SymbolicFamily(z, [eta], [z**2], log_normalizer,
                                    mean=sp.gamma(1 - eta) / (sp.sqrt(-sp.pi * eta) * sp.factorial(-eta)), **declaration)
    report = untranslatable.verify([(-0.5,)], symbolic=False, raise_on_failure=False)
    assert [c.name.split(" (")[0] for c in report.checks if not c.passed] == ["torch mean"]
    clipped = SymbolicFamily(z, [eta], [z**2], log_normalizer, mean=sp.Max(1 / sp.sqrt(-sp.pi * eta), 0),
                             **declaration)
    assert clipped.verify([(-0.5,)], symbolic=False).passed
    x, y = sp.symbols("x y", real=True)
    values = torch.tensor([-0.5, 0.25, 2.0], dtype=torch.float64)
    other = torch.tensor([0.1, 3.0, -1.0], dtype=torch.float64)
    assert torch.equal(to_torch([x, y], sp.Max(x, 0))(values, other), values.clamp_min(0))
    assert torch.equal(to_torch([x, y], sp.Min(x, y, 1))(values, other), torch.minimum(torch.minimum(values, other),
                                                                                        torch.ones(3, dtype=torch.float64)))
    erfc = to_torch([x], sp.erfc(x))(values)
    assert erfc.tolist() == pytest.approx([float(sp.erfc(v)) for v in (-0.5, 0.25, 2.0)], rel=1e-15)
