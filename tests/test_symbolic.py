"""Sympy derivations of the closed forms evaluated at random parameters against the torch
implementation (float64, 1e-10 relative), and symbolic families end to end."""

import math

import mpmath
import numpy as np
import pytest
import sympy as sp
import torch
from torch.distributions import Beta, Exponential, Gamma, Normal, Poisson

import opinionpool
from opinionpool import derivations
from opinionpool.families import NormalFamily
from opinionpool.pool import compositions
from opinionpool.symbolic import SymbolicFamily

RTOL = 1e-10


def evaluate(symbols, expr, values):
    with mpmath.workdps(30):
        return float(sp.lambdify(symbols, expr, modules="mpmath")(*[mpmath.mpf(v) for v in values]))


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


# ------------------------------------------------------------------------ symbolic families
def symbolic_gamma():
    z = sp.Symbol("z", positive=True)
    e1, e2 = sp.symbols("eta1 eta2", real=True)
    return SymbolicFamily(z, [e1, e2], [sp.log(z), z], sp.loggamma(e1 + 1) - (e1 + 1) * sp.log(-e2),
                          support=(0, sp.oo), domain=[e1 > -1, e2 < 0], name="symbolic Gamma")


def test_symbolic_family_gradient_matches_autograd_and_verifies():
    family = symbolic_gamma()
    eta = torch.tensor([[1.0, -2.0], [-0.5, -0.3], [4.0, -7.0]])
    builtin = opinionpool.families.GammaFamily()
    assert torch.allclose(family.mean_parameters(eta), builtin.mean_parameters(eta), rtol=1e-12, atol=0)
    assert torch.allclose(family.log_normalizer(eta), builtin.log_normalizer(eta), rtol=1e-12, atol=0)
    report = family.verify([(1, -2), (-0.5, -0.3)], symbolic=False)
    assert report.passed and len(report.checks) == 6
    assert all(c.method.startswith("mpmath") for c in report.checks)


def test_symbolic_verify_tries_sympy_first():
    z, eta = sp.symbols("z eta", real=True)
    family = SymbolicFamily(z, [eta], [z], -sp.log(-eta), support=(0, sp.oo), domain=[eta < 0])
    report = family.verify([(-2,), (-sp.Rational(1, 3),)])
    assert report.passed and all(c.method == "symbolic" for c in report.checks)


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
