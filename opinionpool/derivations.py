r"""Symbolic derivations of the library's closed forms, kept as code.

Each function derives a closed form with sympy from the densities themselves (integrating or
summing, never from the library's formulas) and returns the sympy expressions with their symbols.
``tests/opinionpool/test_symbolic.py`` evaluates every result at random parameters and compares it with the
torch implementation in float64; together with the quadrature tests this is what "sympy-verified"
means in the README.

Derivations are cached (each runs sympy once per process).
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import sympy as sp

__all__ = [
    "gaussian_moment_integrals", "gaussian_hellinger_terms", "exponential_hellinger_terms", "gamma_chernoff",
    "beta_chernoff", "poisson_chernoff", "multinomial_expansion", "dirichlet_kernel", "dirichlet_chernoff",
    "von_mises_kernel", "von_mises_chernoff", "bernoulli_chernoff", "categorical_chernoff", "binomial_chernoff",
    "bivariate_gaussian_chernoff", "laplace_chernoff", "gaussian_kl", "gamma_kl", "poisson_kl",
    "gaussian_wasserstein_barycenter",
]


@lru_cache(maxsize=None)
def gaussian_moment_integrals():
    r""":math:`\int z^k e^{-a z^2 + b z + c}\,dz` for ``k = 0, 1, 2`` and ``a > 0``: ``((a, b, c), [I0, I1, I2])``.

    The square is completed by the shift :math:`z = y + b/(2a)`, after which sympy integrates the polynomial
    times :math:`e^{-ay^2}` term by term (integrating the shifted exponential directly is far slower)."""
    z, y = sp.symbols("z y", real=True)
    a = sp.Symbol("a", positive=True)
    b, c = sp.symbols("b c", real=True)
    shift = b / (2 * a)
    exponent = sp.expand((-a * z**2 + b * z + c).subs(z, y + shift))
    quadratic, linear, constant = sp.Poly(exponent, y).all_coeffs()
    if linear != 0 or quadratic != -a:
        raise AssertionError(f"completing the square left {exponent}")
    centred = [sp.integrate(y**j * sp.exp(-a * y**2), (y, -sp.oo, sp.oo)) for j in range(3)]
    integrals = [sp.factor(sum(coef * centred[j] for (j,), coef in sp.Poly((y + shift) ** k, y).terms())
                           * sp.exp(constant)) for k in range(3)]
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
def _gamma_kernel():
    r""":math:`\int_0^\infty z^{t-1}e^{-sz}dz` integrated by sympy: ``((t, s), expr)``."""
    z = sp.Symbol("z", positive=True)
    t, s = sp.symbols("t s", positive=True)
    return (t, s), sp.integrate(z ** (t - 1) * sp.exp(-s * z), (z, 0, sp.oo), conds="none")


@lru_cache(maxsize=None)
def _beta_kernel():
    r""":math:`\int_0^1 z^{u-1}(1-z)^{w-1}dz` integrated by sympy: ``((u, w), expr)`` (a Gauss
    :math:`{}_2F_1` at 1; the Meijer-G method alone finds it several times faster than the default heuristics)."""
    z = sp.Symbol("z", positive=True)
    u, w = sp.symbols("u w", positive=True)
    return (u, w), sp.integrate(z ** (u - 1) * (1 - z) ** (w - 1), (z, 0, 1), conds="none", meijerg=True,
                                risch=False, manual=False)


@lru_cache(maxsize=None)
def gamma_chernoff():
    r""":math:`\log\int q_1^a q_2^{1-a}` for Gamma experts (shape ``k``, rate ``r``), from
    :math:`\int_0^\infty z^{t-1}e^{-sz}dz` integrated by sympy. Returns ``((k1, r1, k2, r2, a), expr)``."""
    z = sp.Symbol("z", positive=True)
    k1, r1, k2, r2 = sp.symbols("k_1 r_1 k_2 r_2", positive=True)
    a = sp.Symbol("a", positive=True)
    log_z = sp.Symbol("log_z")  # stands for log z while the exponent is split into its statistics

    def log_gamma_density(k, r):
        return (k - 1) * log_z - r * z + k * sp.log(r) - sp.loggamma(k)

    (c_log, c_z), constant = _split_exponent(a * log_gamma_density(k1, r1) + (1 - a) * log_gamma_density(k2, r2),
                                             (log_z, z))
    (t, s), kernel = _gamma_kernel()
    return (k1, r1, k2, r2, a), constant + sp.log(kernel.subs({t: c_log + 1, s: -c_z}))


@lru_cache(maxsize=None)
def beta_chernoff():
    r""":math:`\log\int q_1^a q_2^{1-a}` for Beta experts (``p``, ``q``), from :math:`\int_0^1 z^{u-1}(1-z)^{w-1}dz`
    integrated by sympy. Returns ``((p1, q1, p2, q2, a), expr)``."""
    p1, q1, p2, q2 = sp.symbols("p_1 q_1 p_2 q_2", positive=True)
    a = sp.Symbol("a", positive=True)
    log_z, log_1mz = sp.symbols("log_z log_1mz")

    def log_beta_density(p, q):
        return (p - 1) * log_z + (q - 1) * log_1mz - (sp.loggamma(p) + sp.loggamma(q) - sp.loggamma(p + q))

    (c1, c2), constant = _split_exponent(a * log_beta_density(p1, q1) + (1 - a) * log_beta_density(p2, q2),
                                         (log_z, log_1mz))
    (u, w), kernel = _beta_kernel()
    return (p1, q1, p2, q2, a), constant + sp.log(kernel.subs({u: c1 + 1, w: c2 + 1}))


@lru_cache(maxsize=None)
def poisson_chernoff():
    r""":math:`\log\sum_k q_1(k)^a q_2(k)^{1-a}` for Poisson experts with rates ``r1``, ``r2``: the exponent
    split from the two log-pmfs, the series summed by sympy. Returns ``((r1, r2, a), expr)``."""
    k = sp.Symbol("k", integer=True, nonnegative=True)
    r1, r2, a, x = sp.symbols("r_1 r_2 a x", positive=True)
    log_factorial = sp.Symbol("log_factorial")  # log k!, a basis element like k

    def log_poisson_pmf(r):
        return k * sp.log(r) - r - log_factorial

    (c_k, c_factorial), constant = _split_exponent(a * log_poisson_pmf(r1) + (1 - a) * log_poisson_pmf(r2),
                                                   (k, log_factorial))
    # the terms are exp(c_k k) / k!^(-c_factorial): a power series sympy sums once the exponent of k! is -1
    if sp.simplify(c_factorial + 1) != 0:
        raise RuntimeError(f"the Poisson terms carry k!^({-c_factorial}), not 1 / k!: not a power series")
    series = sp.summation(x**k / sp.factorial(k), (k, 0, sp.oo))
    return (r1, r2, a), constant + sp.log(series.subs(x, sp.exp(c_k)))


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


# ------------------------------------------------------------------ Dirichlet
def _beta_integral(integrand, var):
    r""":math:`\int_0^1` of ``integrand`` = :math:`C\,v^{p}(1-v)^{q}` in ``var``, through :func:`_beta_kernel`."""
    log_v, log_1mv = sp.symbols("log_v log_1mv")
    log_integrand = sp.expand_log(sp.log(integrand), force=True).subs({sp.log(1 - var): log_1mv, sp.log(var): log_v})
    (c1, c2), constant = _split_exponent(log_integrand, (log_v, log_1mv))
    (u, w), kernel = _beta_kernel()
    return sp.exp(constant) * kernel.subs({u: c1 + 1, w: c2 + 1})


@lru_cache(maxsize=None)
def dirichlet_kernel():
    r""":math:`\int_{\Delta_2} x_1^{u_1-1}x_2^{u_2-1}x_3^{u_3-1}` over the 2-simplex (the Dirichlet normaliser,
    :math:`K = 3`), integrated by sympy after the change of variables
    :math:`(x, t) \mapsto (x, (1-x)t, (1-x)(1-t))` of :math:`(0, 1)^2` onto the simplex (Jacobian computed by
    sympy), which separates the integral into two Beta integrals (:func:`_beta_kernel`). Returns
    ``((u1, u2, u3), expr)``; the multivariate Beta identity :math:`\prod\Gamma(u_i)/\Gamma(\sum u_i)` is not
    assumed."""
    x, t = sp.symbols("x t", positive=True)
    u = sp.symbols("u_1:4", positive=True)
    coords = (x, (1 - x) * t, (1 - x) * (1 - t))
    if sp.expand(sum(coords)) != 1:
        raise AssertionError("the change of variables does not map onto the simplex")
    jacobian = sp.Matrix(coords[:2]).jacobian([x, t]).det()  # 1 - x > 0
    integrand = jacobian * sp.Mul(*(c ** (ui - 1) for c, ui in zip(coords, u)))
    factors = sp.separatevars(sp.powsimp(sp.expand_power_base(integrand, force=True), force=True), [x, t],
                              dict=True, force=True)
    return u, factors["coeff"] * _beta_integral(factors[x], x) * _beta_integral(factors[t], t)


@lru_cache(maxsize=None)
def dirichlet_chernoff():
    r""":math:`\log\int q_1^a q_2^{1-a}` for Dirichlet experts with 3 categories (concentrations ``c1``, ``c2``),
    the densities normalised by :func:`dirichlet_kernel` itself. Returns ``((c1_1, c1_2, c1_3, c2_1, c2_2, c2_3, a),
    expr)``."""
    c1, c2 = sp.symbols("c1_1:4", positive=True), sp.symbols("c2_1:4", positive=True)
    a = sp.Symbol("a", positive=True)
    log_x = sp.symbols("log_x1:4")
    u, kernel = dirichlet_kernel()

    def log_dirichlet_density(c):
        return sum((ci - 1) * lx for ci, lx in zip(c, log_x)) - sp.log(kernel.subs(dict(zip(u, c))))

    coefficients, constant = _split_exponent(a * log_dirichlet_density(c1) + (1 - a) * log_dirichlet_density(c2),
                                             log_x)
    return (*c1, *c2, a), constant + sp.log(kernel.subs({ui: ci + 1 for ui, ci in zip(u, coefficients)}))


# ------------------------------------------------------------------- von Mises
@lru_cache(maxsize=None)
def von_mises_kernel():
    r""":math:`\int_{-\pi}^{\pi} e^{x\cos\theta + y\sin\theta}d\theta` in closed form, derived with sympy:
    :math:`x\cos\theta + y\sin\theta = (we^{i\theta} + \bar we^{-i\theta})/2` with :math:`w = x - iy` (checked by
    sympy); the product of the two exponential series is integrated term by term, sympy integrating
    :math:`\int_{-\pi}^{\pi} e^{in\theta}d\theta` (:math:`2\pi` for :math:`n = 0`, else 0) and summing the remaining
    diagonal :math:`2\pi\sum_j (|w|^2/4)^j/j!^2` (a Bessel :math:`I_0`). Returns ``((x, y), expr)``."""
    theta, x, y = sp.symbols("theta x y", real=True)
    n = sp.Symbol("n", integer=True)
    j = sp.Symbol("j", integer=True, nonnegative=True)
    r = sp.Symbol("r", positive=True)
    w, w_bar = x - sp.I * y, x + sp.I * y
    exponent = (w * sp.exp(sp.I * theta) + w_bar * sp.exp(-sp.I * theta)) / 2
    if sp.expand(exponent.rewrite(sp.cos) - x * sp.cos(theta) - y * sp.sin(theta)) != 0:
        raise AssertionError("the exponent is not x cos(theta) + y sin(theta)")
    # the term (w/2)^j (w_bar/2)^l / (j! l!) of the double series carries exp(i (j - l) theta)
    fourier = sp.integrate(sp.exp(sp.I * n * theta), (theta, -sp.pi, sp.pi))
    if sp.simplify(fourier.args[0].expr) != 0 or fourier.args[0].cond != sp.Ne(n, 0):
        raise AssertionError(f"unexpected Fourier integral {fourier}")
    diagonal = sp.summation(fourier.subs(n, 0) * r**j / sp.factorial(j) ** 2, (j, 0, sp.oo))  # r = w w_bar / 4
    return (x, y), diagonal.subs(r, sp.expand(w * w_bar) / 4)


@lru_cache(maxsize=None)
def von_mises_chernoff():
    r""":math:`\log\int q_1^a q_2^{1-a}` for von Mises experts (location ``m``, concentration ``k``),
    :math:`q \propto e^{k\cos(\theta - m)}` normalised by :func:`von_mises_kernel`, the exponent split into
    :math:`(\cos\theta, \sin\theta)` by sympy. Returns ``((m1, k1, m2, k2, a), expr)``."""
    theta = sp.Symbol("theta", real=True)
    m1, m2 = sp.symbols("m_1 m_2", real=True)
    k1, k2, a = sp.symbols("k_1 k_2 a", positive=True)
    cos_t, sin_t = sp.symbols("cos_t sin_t")
    (x, y), kernel = von_mises_kernel()

    def log_von_mises_density(m, k):
        log_norm = sp.log(kernel.subs({x: k * sp.cos(m), y: k * sp.sin(m)}))
        return sp.expand_trig(k * sp.cos(theta - m)).subs({sp.cos(theta): cos_t, sp.sin(theta): sin_t}) - log_norm

    (cx, cy), constant = _split_exponent(a * log_von_mises_density(m1, k1) + (1 - a) * log_von_mises_density(m2, k2),
                                         (cos_t, sin_t))
    return (m1, k1, m2, k2, a), constant + sp.log(kernel.subs({x: cx, y: cy}))


@lru_cache(maxsize=None)
def laplace_chernoff():
    r""":math:`\log\int q_p(z)^a q_q(z)^{1-a}\,dz` for Laplace experts :math:`q(z) = e^{-|z - m|/b} / (2b)`, the
    first at 0 and the second at distance ``delta > 0``: sympy integrates the two tails and the stretch between the
    locations, where the absolute values are linear. On that stretch the integrand is ``C e^(-k z)`` with ``k = a /
    b_p - (1 - a) / b_q``, which is 0 for equal scales at ``a = 1/2``: it is integrated for a real ``k`` of either
    sign, a ``Piecewise`` whose ``k = 0`` branch is ``C delta`` (integrated for positive symbols, the result divided
    by ``k`` and was NaN there). Returns ``((b_p, b_q, delta, a), expr)``."""
    z = sp.Symbol("z", real=True)
    b_p, b_q, delta = sp.symbols("b_p b_q delta", positive=True)
    a = sp.Symbol("a", positive=True)
    slope = sp.Symbol("k", real=True)

    def integrand(distance_p, distance_q):  # |z| and |z - delta| on one piece
        return sp.exp(a * (-sp.log(2 * b_p) - distance_p / b_p) + (1 - a) * (-sp.log(2 * b_q) - distance_q / b_q))

    tails = [(integrand(-z, delta - z), (z, -sp.oo, 0)), (integrand(z, z - delta), (z, delta, sp.oo))]
    between = integrand(z, delta - z)
    rate = sp.simplify(-sp.diff(sp.log(between), z))
    if rate.has(z):
        raise AssertionError(f"the integrand between the locations is not exponential in z: rate {rate}")
    stretch = between.subs(z, 0) * sp.integrate(sp.exp(-slope * z), (z, 0, delta)).subs(slope, rate)
    total = sum(sp.integrate(f, bounds, conds="none") for f, bounds in tails) + stretch
    return (b_p, b_q, delta, a), sp.log(total)


# -------------------------------------------------------------------- discrete
def _log_sum_of_powers(log_densities_1, log_densities_2, a):
    """``log sum_z q1(z)^a q2(z)^(1-a)`` over an explicitly listed support."""
    return sp.log(sum(sp.exp(a * l1 + (1 - a) * l2) for l1, l2 in zip(log_densities_1, log_densities_2)))


@lru_cache(maxsize=None)
def bernoulli_chernoff():
    r""":math:`\log\sum_{z\in\{0,1\}} q_1(z)^a q_2(z)^{1-a}` for Bernoulli experts with probabilities ``p1``, ``p2``.
    Returns ``((p1, p2, a), expr)``."""
    p1, p2, a = sp.symbols("p_1 p_2 a", positive=True)

    def log_densities(p):
        return [z * sp.log(p) + (1 - z) * sp.log(1 - p) for z in (0, 1)]

    return (p1, p2, a), _log_sum_of_powers(log_densities(p1), log_densities(p2), a)


@lru_cache(maxsize=None)
def categorical_chernoff(num_categories: int):
    r""":math:`\log\sum_z q_1(z)^a q_2(z)^{1-a}` for Categorical experts with logits ``l1``, ``l2``
    (:math:`q(z) = e^{l_z}/\sum_k e^{l_k}`), summed over the ``num_categories`` categories.
    Returns ``((*l1, *l2, a), expr)``."""
    l1 = sp.symbols(f"l1_1:{num_categories + 1}", real=True)
    l2 = sp.symbols(f"l2_1:{num_categories + 1}", real=True)
    a = sp.Symbol("a", positive=True)

    def log_densities(logits):
        log_total = sp.log(sum(sp.exp(logit) for logit in logits))
        return [logit - log_total for logit in logits]

    return (*l1, *l2, a), _log_sum_of_powers(log_densities(l1), log_densities(l2), a)


@lru_cache(maxsize=None)
def binomial_chernoff(total_count: int):
    r""":math:`\log\sum_{z=0}^{n} q_1(z)^a q_2(z)^{1-a}` for Binomial experts sharing ``n = total_count``, with
    probabilities ``p1``, ``p2``, summed over the support. Returns ``((p1, p2, a), expr)``."""
    p1, p2, a = sp.symbols("p_1 p_2 a", positive=True)

    def log_densities(p):
        return [sp.log(sp.binomial(total_count, z)) + z * sp.log(p) + (total_count - z) * sp.log(1 - p)
                for z in range(total_count + 1)]

    return (p1, p2, a), _log_sum_of_powers(log_densities(p1), log_densities(p2), a)


# ----------------------------------------------------- full-covariance Gaussian
def _log_gaussian_integral(exponent, var):
    r""":math:`\log\int e^{\text{exponent}}\,d\text{var}` for an exponent quadratic in ``var`` (negative leading
    coefficient), through :func:`gaussian_moment_integrals`."""
    quadratic, linear, constant = sp.Poly(exponent, var).all_coeffs()
    (a, b, c), (i0, _, _) = gaussian_moment_integrals()
    return sp.expand_log(sp.log(i0), force=True).subs({a: -quadratic, b: linear, c: constant}, simultaneous=True)


@lru_cache(maxsize=None)
def bivariate_gaussian_chernoff():
    r""":math:`\log\int_{\mathbb R^2} q_1^a q_2^{1-a}` for bivariate Gaussians :math:`N(m_i, S_i)` with symbolic
    :math:`2\times2` covariances ``S_i = [[s_i11, s_i12], [s_i12, s_i22]]``: sympy builds the densities (inverse and
    determinant of ``S_i``), and the quadratic exponent is integrated over :math:`z_2`, then :math:`z_1`, by
    :func:`gaussian_moment_integrals` (done once with generic coefficients, then substituted).
    Returns ``((m1_1, m1_2, s1_11, s1_12, s1_22, m2_1, m2_2, s2_11, s2_12, s2_22, a), expr)``."""
    z1, z2 = sp.symbols("z_1 z_2", real=True)
    # generic exponent -(A11 z1^2 + 2 A12 z1 z2 + A22 z2^2) + b1 z1 + b2 z2 + c
    quad = sp.symbols("A_11 A_12 A_22")
    b1, b2, c = sp.symbols("b_1 b_2 c")
    generic = -(quad[0] * z1**2 + 2 * quad[1] * z1 * z2 + quad[2] * z2**2) + b1 * z1 + b2 * z2 + c
    inner = _log_gaussian_integral(generic, z2)
    log_integral = _log_gaussian_integral(sp.expand(inner), z1)

    experts, exponent = [], 0
    a = sp.Symbol("a", positive=True)
    for i, weight in ((1, a), (2, 1 - a)):
        m = sp.Matrix(sp.symbols(f"m{i}_1:3", real=True))
        s11, s12, s22 = sp.symbols(f"s{i}_11 s{i}_12 s{i}_22", real=True)
        cov = sp.Matrix([[s11, s12], [s12, s22]])
        dev = sp.Matrix([z1, z2]) - m
        log_density = -(dev.T * cov.inv(method="ADJ") * dev)[0, 0] / 2 - sp.log(2 * sp.pi) - sp.log(cov.det()) / 2
        exponent += weight * log_density
        experts += [*m, s11, s12, s22]
    poly = sp.Poly(sp.expand(exponent), z1, z2)
    coefficient = {quad[0]: -poly.coeff_monomial(z1**2), quad[1]: -poly.coeff_monomial(z1 * z2) / 2,
                   quad[2]: -poly.coeff_monomial(z2**2), b1: poly.coeff_monomial(z1), b2: poly.coeff_monomial(z2),
                   c: poly.coeff_monomial(1)}
    return (*experts, a), log_integral.subs(coefficient, simultaneous=True)


# ------------------------------------------------------------------ KL divergences
@lru_cache(maxsize=None)
def gaussian_kl():
    r""":math:`KL(p\|q) = \int p\log(p/q)` for :math:`p = N(\mu_p, v_p)`, :math:`q = N(\mu_q, v_q)`:
    :math:`\log(p/q)` is a quadratic in :math:`z` whose terms are integrated against :math:`p` by
    :func:`gaussian_moment_integrals`. Returns ``((mu_p, v_p, mu_q, v_q), expr)``."""
    z = sp.Symbol("z", real=True)
    mu_p, mu_q = sp.symbols("mu_p mu_q", real=True)
    v_p, v_q = sp.symbols("v_p v_q", positive=True)
    log_p, log_q = _normal_log_density(z, mu_p, v_p), _normal_log_density(z, mu_q, v_q)
    quadratic, linear, constant = sp.Poly(sp.expand(log_p), z).all_coeffs()
    (a, b, c), integrals = gaussian_moment_integrals()
    moments = [i.subs({a: -quadratic, b: linear, c: constant}, simultaneous=True) for i in integrals]
    ratio = sp.Poly(sp.expand(log_p - log_q), z)
    return (mu_p, v_p, mu_q, v_q), sp.simplify(sum(coef * moments[k] for (k,), coef in ratio.terms()))


@lru_cache(maxsize=None)
def gamma_kl():
    r""":math:`KL(p\|q)` for Gamma experts (shape ``k``, rate ``r``): :math:`\log(p/q)` is linear in
    :math:`(\log z, z)`; :math:`\int z^{t-1}e^{-sz}`, :math:`\int z\cdot z^{t-1}e^{-sz}` and
    :math:`\int\log z\; z^{t-1}e^{-sz} = \partial_t\int z^{t-1}e^{-sz}` (differentiation under the integral sign)
    come from the sympy integral :func:`_gamma_kernel`. Returns ``((k1, r1, k2, r2), expr)``."""
    z = sp.Symbol("z", positive=True)
    k1, r1, k2, r2 = sp.symbols("k_1 r_1 k_2 r_2", positive=True)
    log_z = sp.Symbol("log_z")

    def log_gamma_density(k, r):
        return (k - 1) * log_z - r * z + k * sp.log(r) - sp.loggamma(k)

    (t, s), kernel = _gamma_kernel()
    (c_log, c_z), constant = _split_exponent(log_gamma_density(k1, r1), (log_z, z))
    at_p = {t: c_log + 1, s: -c_z}
    expect_one = sp.exp(constant) * kernel.subs(at_p)
    expect_log = sp.exp(constant) * sp.diff(kernel, t).subs(at_p)
    expect_z = sp.exp(constant) * kernel.subs(t, t + 1).subs(at_p)
    (d_log, d_z), d_0 = _split_exponent(log_gamma_density(k1, r1) - log_gamma_density(k2, r2), (log_z, z))
    return (k1, r1, k2, r2), d_0 * expect_one + d_log * expect_log + d_z * expect_z


@lru_cache(maxsize=None)
def poisson_kl():
    r""":math:`KL(p\|q) = \sum_k p(k)\log(p(k)/q(k))` for Poisson rates ``r1``, ``r2`` (the :math:`\log k!` terms
    cancel, the series :math:`\sum_k k^j r^k/k!` are summed by sympy). Returns ``((r1, r2), expr)``."""
    k = sp.Symbol("k", integer=True, nonnegative=True)
    r1, r2, x = sp.symbols("r_1 r_2 x", positive=True)
    log_fact = sp.Symbol("log_fact")  # stands for log k!

    def log_poisson(r):
        return k * sp.log(r) - r - log_fact

    (d_k, d_fact), d_0 = _split_exponent(log_poisson(r1) - log_poisson(r2), (k, log_fact))
    if d_fact != 0:
        raise AssertionError("log k! does not cancel")
    series = [sp.summation(k**j * x**k / sp.factorial(k), (k, 0, sp.oo)).subs(x, r1) for j in (0, 1)]
    return (r1, r2), sp.exp(-r1) * (d_0 * series[0] + d_k * series[1])


# ------------------------------------------------------- Wasserstein barycenter
@lru_cache(maxsize=None)
def gaussian_wasserstein_barycenter(num_experts: int):
    r"""2-Wasserstein barycenter of 1-D Gaussians :math:`N(\mu_j, \sigma_j^2)` with weights :math:`\lambda_j > 0`
    (any scale), derived twice with :math:`x = \Phi^{-1}(u)`:

    * quantile functions: the barycenter's quantile function is :math:`\sum_j\lambda_jQ_j/\sum_j\lambda_j` with
      :math:`Q_j = \mu_j + \sigma_j x`; sympy reads its mean (``quantile_mean``, the value at :math:`x = 0`) and
      standard deviation (``quantile_sd``, the coefficient of :math:`x`);
    * first-order optimality: :math:`W_2^2 = \int_0^1 (Q - Q_j)^2du = \int (m - \mu_j + (s - \sigma_j)x)^2\phi(x)dx`
      (:math:`u = \Phi(x)`) integrated by sympy, and the gradient of ``objective`` :math:`\sum_j\lambda_jW_2^2` in
      :math:`(m, s)` set to zero and solved by sympy (``mean``, ``sd``).

    Returns ``((lambdas, mus, sigmas, (m, s)), {"quantile_mean", "quantile_sd", "objective", "mean", "sd"})``."""
    x = sp.Symbol("x", real=True)
    lambdas = sp.symbols(f"lambda_1:{num_experts + 1}", positive=True)
    mus = sp.symbols(f"mu_1:{num_experts + 1}", real=True)
    sigmas = sp.symbols(f"sigma_1:{num_experts + 1}", positive=True)
    m, s = sp.Symbol("m", real=True), sp.Symbol("s", positive=True)
    quantiles = [mu + sigma * x for mu, sigma in zip(mus, sigmas)]
    barycenter = sp.Poly(sp.expand(sum(lam * q for lam, q in zip(lambdas, quantiles)) / sum(lambdas)), x)
    phi = sp.exp(-x**2 / 2) / sp.sqrt(2 * sp.pi)
    centred = [sp.integrate(x**k * phi, (x, -sp.oo, sp.oo)) for k in range(3)]

    def w2_squared(q):
        return sum(coef * centred[k] for (k,), coef in sp.Poly(sp.expand((m + s * x - q) ** 2), x).terms())

    objective = sum(lam * w2_squared(q) for lam, q in zip(lambdas, quantiles))
    solution = sp.solve([sp.diff(objective, m), sp.diff(objective, s)], [m, s], dict=True)
    if len(solution) != 1:
        raise AssertionError(f"expected one stationary point, got {solution}")
    terms = {"quantile_mean": barycenter.coeff_monomial(1), "quantile_sd": barycenter.coeff_monomial(x),
             "objective": objective, "mean": solution[0][m], "sd": solution[0][s]}
    return (lambdas, mus, sigmas, (m, s)), terms
