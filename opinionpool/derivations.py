r"""Symbolic derivations of the library's closed forms, kept as code.

Each function derives a closed form with sympy from the densities themselves (integrating or
summing, never from the library's formulas) and returns the sympy expressions with their symbols.
``tests/test_symbolic.py`` evaluates every result at random parameters and compares it with the
torch implementation in float64; together with the quadrature tests this is what "sympy-verified"
means in the README.

Derivations are cached (each runs sympy once per process).
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import sympy as sp


@lru_cache(maxsize=None)
def gaussian_moment_integrals():
    r""":math:`\int z^k e^{-a z^2 + b z + c}\,dz` for ``k = 0, 1, 2`` and ``a > 0``: ``((a, b, c), [I0, I1, I2])``."""
    z = sp.Symbol("z", real=True)
    a = sp.Symbol("a", positive=True)
    b, c = sp.symbols("b c", real=True)
    integrals = [sp.simplify(sp.integrate(z**k * sp.exp(-a * z**2 + b * z + c), (z, -sp.oo, sp.oo))) for k in range(3)]
    return (a, b, c), integrals


def _normal_log_density(z, mean, var):
    return -(z - mean) ** 2 / (2 * var) - sp.log(2 * sp.pi * var) / 2


@lru_cache(maxsize=None)
def gaussian_hellinger_terms():
    r"""The HELVAE paper's pairwise terms for 1-D Gaussians :math:`q_i = N(\mu_i, v_i)`, :math:`q_j = N(\mu_j, v_j)`:

    ``S`` = :math:`\int\sqrt{q_iq_j}` (eq. 11), ``M`` = :math:`\int z\sqrt{q_iq_j}`, ``V`` = :math:`\int z^2\sqrt{q_iq_j}`
    (eqs. 13-19), and the mean and variance of the normalised :math:`\sqrt{q_iq_j}/S` (eqs. 14, 18).
    Returns ``((mu_i, mu_j, v_i, v_j), {"S", "M", "V", "mean", "variance"})``.
    """
    z = sp.Symbol("z", real=True)
    mu_i, mu_j = sp.symbols("mu_i mu_j", real=True)
    v_i, v_j = sp.symbols("v_i v_j", positive=True)
    log_root = sp.expand((_normal_log_density(z, mu_i, v_i) + _normal_log_density(z, mu_j, v_j)) / 2)
    quadratic, linear, constant = sp.Poly(log_root, z).all_coeffs()
    (a, b, c), integrals = gaussian_moment_integrals()
    s, m, v = (sp.simplify(i.subs({a: -quadratic, b: linear, c: constant})) for i in integrals)
    mean = sp.simplify(m / s)
    terms = {"S": s, "M": m, "V": v, "mean": mean, "variance": sp.simplify(v / s - mean**2)}
    return (mu_i, mu_j, v_i, v_j), terms


@lru_cache(maxsize=None)
def exponential_hellinger_terms():
    r"""The paper's Exponential-distribution example (Appendix A.2), :math:`q = r e^{-rz}` on :math:`z \ge 0`:
    ``S``, ``M``, ``V`` as in :func:`gaussian_hellinger_terms`. Returns ``((r_i, r_j), terms)``."""
    z = sp.Symbol("z", positive=True)
    r_i, r_j = sp.symbols("r_i r_j", positive=True)
    root = sp.sqrt(r_i * sp.exp(-r_i * z) * r_j * sp.exp(-r_j * z))
    s, m, v = (sp.simplify(sp.integrate(z**k * root, (z, 0, sp.oo))) for k in range(3))
    mean = sp.simplify(m / s)
    return (r_i, r_j), {"S": s, "M": m, "V": v, "mean": mean, "variance": sp.simplify(v / s - mean**2)}


def _split_exponent(log_density, basis):
    """Coefficients of ``log_density`` (linear in the ``basis`` symbols) and its constant term."""
    poly = sp.Poly(sp.expand(log_density), *basis)
    coefficients = [poly.coeff_monomial(b) for b in basis]
    return coefficients, poly.coeff_monomial(1)


@lru_cache(maxsize=None)
def gamma_chernoff():
    r""":math:`\log\int q_1^a q_2^{1-a}` for Gamma experts (shape ``k``, rate ``r``), from
    :math:`\int_0^\infty z^{t-1}e^{-sz}dz` integrated by sympy. Returns ``((k1, r1, k2, r2, a), expr)``."""
    z = sp.Symbol("z", positive=True)
    t, s = sp.symbols("t s", positive=True)
    k1, r1, k2, r2 = sp.symbols("k_1 r_1 k_2 r_2", positive=True)
    a = sp.Symbol("a", positive=True)
    log_z = sp.Symbol("log_z")  # stands for log z while the exponent is split into its statistics

    def log_gamma_density(k, r):
        return (k - 1) * log_z - r * z + k * sp.log(r) - sp.loggamma(k)

    (c_log, c_z), constant = _split_exponent(a * log_gamma_density(k1, r1) + (1 - a) * log_gamma_density(k2, r2),
                                             (log_z, z))
    kernel = sp.integrate(z ** (t - 1) * sp.exp(-s * z), (z, 0, sp.oo), conds="none")
    return (k1, r1, k2, r2, a), constant + sp.log(kernel.subs({t: c_log + 1, s: -c_z}))


@lru_cache(maxsize=None)
def beta_chernoff():
    r""":math:`\log\int q_1^a q_2^{1-a}` for Beta experts (``p``, ``q``), from :math:`\int_0^1 z^{u-1}(1-z)^{w-1}dz`
    integrated by sympy. Returns ``((p1, q1, p2, q2, a), expr)``."""
    z = sp.Symbol("z", positive=True)
    u, w = sp.symbols("u w", positive=True)
    p1, q1, p2, q2 = sp.symbols("p_1 q_1 p_2 q_2", positive=True)
    a = sp.Symbol("a", positive=True)
    log_z, log_1mz = sp.symbols("log_z log_1mz")

    def log_beta_density(p, q):
        return (p - 1) * log_z + (q - 1) * log_1mz - (sp.loggamma(p) + sp.loggamma(q) - sp.loggamma(p + q))

    (c1, c2), constant = _split_exponent(a * log_beta_density(p1, q1) + (1 - a) * log_beta_density(p2, q2),
                                         (log_z, log_1mz))
    kernel = sp.integrate(z ** (u - 1) * (1 - z) ** (w - 1), (z, 0, 1), conds="none")
    return (p1, q1, p2, q2, a), constant + sp.log(kernel.subs({u: c1 + 1, w: c2 + 1}))


@lru_cache(maxsize=None)
def poisson_chernoff():
    r""":math:`\log\sum_k q_1(k)^a q_2(k)^{1-a}` for Poisson experts with rates ``r1``, ``r2``, summed by sympy.
    Returns ``((r1, r2, a), expr)``."""
    k = sp.Symbol("k", integer=True, nonnegative=True)
    r1, r2, a, x = sp.symbols("r_1 r_2 a x", positive=True)
    constant = -a * r1 - (1 - a) * r2
    series = sp.summation(x**k / sp.factorial(k), (k, 0, sp.oo))  # with x = r1^a r2^(1-a)
    return (r1, r2, a), constant + sp.log(series.subs(x, r1**a * r2 ** (1 - a)))


@lru_cache(maxsize=None)
def multinomial_expansion(order: int, num_experts: int):
    r"""The coefficients of :math:`(\sum_j \lambda_j x_j)^n` (with :math:`x_j = q_j^{1/n}`), the alpha = 1/n
    expansion: ``((lambdas, xs), {k: coefficient})`` over exponent tuples ``k`` with ``sum(k) = n``."""
    lambdas = sp.symbols(f"lambda_1:{num_experts + 1}", positive=True)
    xs = sp.symbols(f"x_1:{num_experts + 1}", positive=True)
    poly = sp.Poly(sp.expand(sum(lam * x for lam, x in zip(lambdas, xs)) ** order), *xs)
    coefficients = {tuple(k): poly.coeff_monomial(sp.Mul(*(x**e for x, e in zip(xs, k))))
                    for k in itertools.product(range(order + 1), repeat=num_experts) if sum(k) == order}
    return (lambdas, xs), coefficients
