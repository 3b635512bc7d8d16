r"""Closed-form affinities and divergences between experts of one exponential family.

For :math:`a \in (0, 1)` the Chernoff coefficient is
:math:`C_a(p, q) = \int p^a q^{1-a} = \exp(A(a\eta_p + (1-a)\eta_q) - aA(\eta_p) - (1-a)A(\eta_q))`,
computed by each family's ``combine`` (Gaussians analytically cancel the large terms; the other families, where
the log-normalisers cancel to fewer than 8 digits, as :math:`-\sum_j w_j D_A(\eta_j, \sum_k w_k\eta_k)`, Bregman
divergences of :mod:`opinionpool.families.bregman`), except that two Gaussians take their closed form in means
and log-variance differences (diagonal) or the eigenvalues of one covariance whitened by the other (full) for
every order (about the expert of the larger weight, accurate as the order approaches 0 or 1). Outside
:math:`[0, 1]`, where the weights have opposite signs, the other families
:math:`-a\,KL(r\|p) - (1-a)\,KL(r\|q)`, :math:`r` the member at :math:`a\eta_p + (1-a)\eta_q`. Everything
is returned in log-space where it can underflow, batched over the experts' batch shapes, and
differentiable.
"""

from __future__ import annotations

import torch
from torch.distributions import Distribution, register_kl
from torch.distributions import kl_divergence as torch_kl

from ._validation import check_real, check_weights, describe, real_tensor, validation_enabled
from .experts import as_experts
from .families import ExponentialFamilyDistribution, MultivariateNormalFamily, family_of, params_of
from .families.bregman import _curvature_times, bregman_divergence, bregman_divergence_and_rounding
from .families.gaussian import (
    _DiagonalGaussianBase,
    _log_variance_ratio,
    log_det_of_factor,
    log_det_whitened,
    normal_kl,
    whitened_eigenvalues,
    with_derivatives_of,
)
from .pool import HolderPool, NumericalHolderPool, geometric_combination, log_of_weights


def _pair(p, q):
    experts = as_experts([p, q])
    return experts.family, experts.params, experts.expert_dim


def log_multi_chernoff_coefficient(experts, weights, validate_args=None) -> torch.Tensor:
    r""":math:`\log\int\prod_j q_j^{w_j}` for weights :math:`w_j \ge 0` summing to one."""
    experts = as_experts(experts, validate_args)
    params = experts.params
    w = real_tensor("weights", weights, dtype=params.dtype, device=params.device)
    if validation_enabled(validate_args):
        check_weights("weights", w, experts.num_experts)
        total = w.sum(-1)
        if not bool(torch.allclose(total, torch.ones_like(total), atol=1e-6)):
            raise ValueError(f"weights must sum to one, got sums {total.detach().flatten()[:4].tolist()}")
    # renormalised in float64: the non-Gaussian families combine in float64, where float32 weights summing to one
    # only to 1e-7 would shift log-normalisers of the size of the parameters (a Poisson rate of 1e6) by 0.1
    # (by a constant: the gradient in the weights stays the formula's, scaled by 1 / sum = 1 within 1e-6)
    w = w.to(torch.float64)
    w = w / w.sum(-1, keepdim=True).detach()
    return geometric_combination(experts, log_of_weights(w))[1].to(params.dtype)


def _order(a):
    """``(a as a float, a to compute with)``: the tensor itself where one requiring grad is given (its gradient is
    then carried), else the float. An infinite order is refused: every formula here gave NaN for it."""
    value = check_real("a", a)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"a must be finite, got {value}")
    return value, (a.reshape(()) if isinstance(a, torch.Tensor) and a.requires_grad else value)


def _affine(a, eta_p, eta_q):
    """``a eta_p + (1 - a) eta_q`` for any real ``a``, -inf where both are (an outcome neither expert can give, such
    as a category of probability zero in both: a (-inf) + (1 - a) (-inf) is NaN once the weights' signs differ)."""
    combined = a * eta_p + (1 - a) * eta_q
    return torch.where(torch.isneginf(eta_p) & torch.isneginf(eta_q), -torch.inf, combined)


def log_chernoff_coefficient(p, q, a: float = 0.5) -> torch.Tensor:
    r""":math:`\log\int p^a q^{1-a}`. For ``a`` outside ``[0, 1]`` the integral may diverge, which raises. A tensor
    ``a`` that requires grad receives its gradient, at 0 and 1 too (-KL(q || p) and KL(p || q), where the value is
    exactly 0)."""
    value, a = _order(a)
    experts = as_experts([p, q])  # validates p and q (unless validation is off)
    params, k = experts.params, experts.expert_dim
    if value in (0.0, 1.0):
        zero = torch.zeros(params.shape[:k], dtype=params.dtype, device=params.device)
        if not (isinstance(a, torch.Tensor) and torch.is_grad_enabled()):
            return zero
        return with_derivatives_of(zero, _log_chernoff_at_end(experts, value, a))
    return _log_chernoff(experts, value, a)


def _log_chernoff_at_end(experts, value: float, a: torch.Tensor) -> torch.Tensor:
    """What carries the derivatives of ``log C_a(p, q)`` at ``a = value``, 0 or 1 (the value itself is exactly 0):
    ``_log_chernoff``'s forms where every natural parameter is finite (0 there only to rounding, such as the
    Gaussians' ``log1p(expm1(d)) - d`` at 1); where an expert gives some outcome probability zero (whose natural
    parameter, -inf, those forms multiply by 0), the first-order term ``(a - value) dC`` with ``dC`` ``-KL(q || p)``
    at 0 and ``KL(p || q)`` at 1, which exists where that divergence is finite (else ``log C_a`` jumps there)."""
    family, params, k = experts.family, experts.params, experts.expert_dim
    if bool(torch.isfinite(family.to_natural(params.detach())).all()):
        return _log_chernoff(experts, value, a)
    p, q = family.distribution(params.select(k, 0)), family.distribution(params.select(k, 1))
    slope = kl_divergence(p, q) if value == 1.0 else -kl_divergence(q, p)
    if not bool(torch.isfinite(slope).all()):
        raise ValueError(f"log_chernoff_coefficient has no derivative in a at a={value}: "
                         f"{'p' if value == 1.0 else 'q'} gives positive probability to outcomes of probability zero "
                         f"under the other expert, so log C_a jumps there")
    return (a - value) * slope


def _log_chernoff(experts, value: float, a) -> torch.Tensor:
    """``log_chernoff_coefficient`` of the two ``experts`` (validated) at the order ``a`` (``value`` its float)."""
    family, params, k = experts.family, experts.params, experts.expert_dim
    if isinstance(family, _DiagonalGaussianBase):
        return _diagonal_gaussian_log_chernoff(family, params.select(k, 0), params.select(k, 1), value, a)
    if isinstance(family, MultivariateNormalFamily) and 0 < value < 1:
        # the closed form, about the expert of the larger weight: the geometric combination's log-determinants are
        # relative to one expert's precision, and rounded the other's eigenvalues to -1 where the covariances differ
        # by 1e8 (float32) or 1e16 (float64): NaN, or 10 % off
        if value > 0.5:
            return _mvn_log_chernoff(family, params.select(k, 1), params.select(k, 0), 1 - a)
        return _mvn_log_chernoff(family, params.select(k, 0), params.select(k, 1), a)
    if 0 < value < 1:  # the weights (a, 1 - a) are valid by construction
        if (isinstance(a, torch.Tensor) and a.requires_grad
                and bool(torch.isfinite(family.to_natural(params.detach())).all())):
            # the value and the parameters' derivatives at the order held fixed; the order's first, second and
            # mixed derivatives from the quadratic in a - a0 that has them, its slope from the Bregman form
            # KL(r || q) - KL(r || p): through the log-normalisers it cancels terms of their size (Gamma(5, 2)
            # against Gamma(5.000005, 2) at a = 1/2: -4.4e-16 for -2.5e-19). Not where an expert gives an outcome
            # probability zero: its natural parameter -inf has no curvature
            fixed = torch.stack((a.detach(), 1 - a.detach())).to(params.dtype)
            log_c = log_multi_chernoff_coefficient(experts, fixed, validate_args=False)
            slope, curvature = _order_slope(family, params.select(k, 0), params.select(k, 1), a.detach())
            step = (a - a.detach()).to(log_c.dtype)
            return log_c + step * slope.to(log_c.dtype) + 0.5 * step**2 * curvature.to(log_c.dtype)
        weights = torch.stack((a, 1 - a)).to(params.dtype) if isinstance(a, torch.Tensor) else [a, 1 - a]
        return log_multi_chernoff_coefficient(experts, weights, validate_args=False)
    eta = family.to_natural(params)
    eta_p, eta_q = eta.select(k, 0), eta.select(k, 1)
    combined = _affine(a, eta_p, eta_q)
    if not bool(family.natural_domain(combined).all()):
        raise _divergent(value, family)
    # outside [0, 1] (here also at its ends, for their derivatives) the weights (a, 1 - a) have opposite signs, so
    # the log-normalisers' form A(combined) - a A(eta_p) - (1 - a) A(eta_q) cancels terms of their size (two
    # Gaussians at 1e8 gave a Rényi divergence of -0.5 for 0.022): Gaussians take the closed form without such
    # terms, the other families -a KL(r || p) - (1 - a) KL(r || q), r the member at `combined` (the Bregman form,
    # valid for any affine weights)
    params_p, params_q = params.select(k, 0), params.select(k, 1)
    if isinstance(family, MultivariateNormalFamily):
        return _mvn_log_chernoff(family, params_p, params_q, a)
    eta_p, eta_q, combined, _, to_p, to_q = _bregman_legs(family, params_p, params_q, a)
    wide = combined.dtype
    # a divergence that neither of its forms computes accurately (its remainder's curvature underflows: r of
    # probability e^-920 beside a Bernoulli of 1e-200, KL(r || p) about 1e-200) is an error only where its rounding
    # matters to the sum: log C of that pair at a = 2 is log 2 (it raised); six digits, as bregman_divergence asks
    to_p_value, to_p_rounding = bregman_divergence_and_rounding(family, combined, eta_p, to_p)
    to_q_value, to_q_rounding = bregman_divergence_and_rounding(family, combined, eta_q, to_q)
    log_c = -(a * to_p_value + (1 - a) * to_q_value)
    rounding = abs(a) * to_p_rounding + abs(1 - a) * to_q_rounding
    lost = rounding > 1e-6 * log_c.detach().abs()
    if bool(lost.any()):
        raise ValueError(f"log_chernoff_coefficient of order a={value} of these {family.name} experts: neither form "
                         f"of its divergences is accurate in {wide} (first natural parameter of p: "
                         f"{describe(eta_p[..., 0], lost)})")
    return log_c.to(params.dtype)


def _order_slope(family, params_p, params_q, a: torch.Tensor):
    """``(d log C_a(p, q) / da, d^2 log C_a(p, q) / da^2)`` at the order ``a`` (a constant): ``KL(r || q) - KL(r ||
    p)``, ``r`` the member at ``a eta_p + (1 - a) eta_q``, in float64 from the Bregman form (each divergence from its
    own natural difference, without terms of the log-normalisers' size), with its graph to the parameters; and
    ``d^T (grad^2 A)(eta_r) d``, ``d = eta_q - eta_p``, without one."""
    eta_p, eta_q, combined, d, to_p, to_q = _bregman_legs(family, params_p, params_q, a.to(torch.float64))
    slope = bregman_divergence(family, combined, eta_q, to_q) - bregman_divergence(family, combined, eta_p, to_p)
    direction = (eta_q - eta_p if d is None else d).detach()
    curvature = (direction * _curvature_times(family, combined.detach(), direction, False)).sum(-1)
    return slope, curvature


def _bregman_legs(family, params_p, params_q, a):
    """``(eta_p, eta_q, combined, d, to_p, to_q)`` in float64: the experts' natural parameters, their combination
    ``a eta_p + (1 - a) eta_q`` (the member ``r``), ``d = eta_q - eta_p`` from the family where it knows it better
    (``None`` where it does not, and then ``to_p``, ``to_q`` too), and ``eta_p - combined = -(1 - a) d`` and
    ``eta_q - combined = a d``, for ``bregman_divergence(family, combined, eta_x, to_x) = KL(r || x)``."""
    wide = torch.float64
    eta_p, eta_q = family.to_natural(params_p.to(wide)), family.to_natural(params_q.to(wide))
    d = family.natural_difference(params_p.to(wide), params_q.to(wide))
    to_p, to_q = (None, None) if d is None else (-(1 - a) * d, a * d)
    return eta_p, eta_q, _affine(a, eta_p, eta_q), d, to_p, to_q


def _diagonal_gaussian_log_chernoff(family, params_p, params_q, value, a):
    """``log int p^a q^(1 - a)`` of two diagonal Gaussians for any order ``a`` (``value`` its float; at 0 and 1 for the
    derivatives only), by the closed form of ``_gaussian_log_chernoff``. For ``a`` in ``(0, 1)`` about the expert of the
    larger weight (``C_a(p, q) = C_(1 - a)(q, p)``), so that the small weight multiplies ``expm1``: through the
    geometric combination, the log-determinant cancelled two terms of order one to order ``a`` (``a = 1e-20`` gave a
    negative Amari divergence). Outside ``[0, 1]`` the integral converges where the combined variance ``v_p (1 + a
    expm1(d))`` is positive; that is checked on the log-variances, not on the natural parameters, which overflow for
    scales of 1e-170 (float64) or 1e-20 (float32)."""
    (loc_p, logvar_p), (loc_q, logvar_q) = family.split(params_p), family.split(params_q)
    if not 0 < value < 1 and not bool((a * torch.expm1(logvar_q - logvar_p) > -1).all()):
        raise _divergent(value, family)
    if 0.5 < value < 1:
        log_c = _gaussian_log_chernoff(loc_q, logvar_q, loc_p, logvar_p, 1 - a)
    else:
        log_c = _gaussian_log_chernoff(loc_p, logvar_p, loc_q, logvar_q, a)
    return log_c.sum(-1) if family.num_features else log_c


def _divergent(value: float, family) -> ValueError:
    # (a finite parameter whose log-normaliser overflows looks the same: Poisson(1e-300) against Poisson(1) at a = -2
    # converges to about e^1381)
    return ValueError(f"the Chernoff integral of order a={value} diverges for these {family.name} experts, or its "
                      "value overflows: the log-normaliser at a * eta_p + (1 - a) * eta_q is not finite (outside the "
                      "natural parameter space, or beyond the dtype's range)")


def _gaussian_log_chernoff(loc_p, logvar_p, loc_q, logvar_q, a):
    """Elementwise ``log int N(loc_p, v_p)^a N(loc_q, v_q)^(1 - a)`` for any order ``a`` where it converges:
    ``-a (1 - a) Delta^2 / (2 v_a) - (log1p(a expm1(d)) - a d) / 2`` with ``d = logvar_q - logvar_p`` and
    ``v_a = a v_q + (1 - a) v_p = v_p (1 + a expm1(d))``: no term of the size of the log-variances, and none that
    overflows where the variances lie far apart (``_log_variance_ratio``)."""
    d = logvar_q - logvar_p
    log_ratio = _log_variance_ratio(d, a)  # log(v_a / v_p)
    # (loc_p - loc_q)^2 / v_a, through v_a^(-1/4) twice: v_a^(-1/2) overflows float32 below v_a = 1e-77
    root = torch.exp(-0.25 * (logvar_p + log_ratio))
    quad = ((loc_p - loc_q) * root * root) ** 2
    return -0.5 * (a * (1 - a) * quad + log_ratio - a * d)


def _mvn_log_chernoff(family, params_p, params_q, a):
    """The full-covariance counterpart of ``_gaussian_log_chernoff``: with ``Sigma_p = L L^T`` and
    ``E = L^-1 (Sigma_q - Sigma_p) L^-T`` (from the difference of the covariances), the log-determinant term is
    ``sum_i log1p(a e_i) - a log1p(e_i)`` over the eigenvalues ``e_i`` of ``E``, and the quadratic one
    ``a (1 - a) Delta^T Sigma_a^-1 Delta`` with ``Sigma_a = Sigma_p + a (Sigma_q - Sigma_p)``. ``sum_i log1p(e_i)``
    is ``log_det_whitened``'s, which keeps its digits where ``Sigma_q`` is far below ``Sigma_p`` (there ``log1p(e_i)``
    gave NaN, or +inf for 46)."""
    cov_p, cov_q = family.covariance(params_p), family.covariance(params_q)
    delta = (family.mean(params_p) - family.mean(params_q)).unsqueeze(-1)
    change = cov_q - cov_p
    chol_p = torch.linalg.cholesky(cov_p)
    e = whitened_eigenvalues(chol_p.detach(), change.detach())
    chol_a = torch.linalg.cholesky(cov_p + a * change)
    scaled = torch.linalg.solve_triangular(chol_a, delta, upper=False)
    quad = (scaled * scaled).sum((-2, -1))
    log_det_q = log_det_whitened(chol_p, cov_q, e)  # log det Sigma_q - log det Sigma_p
    # log det Sigma_a - log det Sigma_p, with the derivatives of the Cholesky factors (not of the eigen-solver)
    log_det_a = with_derivatives_of(torch.log1p(a * e).sum(-1), log_det_of_factor(chol_a) - log_det_of_factor(chol_p))
    return -0.5 * (a * (1 - a) * quad + log_det_a - a * log_det_q)


def _mvn_kl(family, params_p, params_q):
    """The full-covariance counterpart of ``normal_kl``: with ``Sigma_q = L L^T`` and the eigenvalues ``e_i`` of
    ``L^-1 (Sigma_p - Sigma_q) L^-T`` (from the difference of the covariances), ``KL = (sum_i e_i - log1p(e_i) +
    Delta^T Sigma_q^-1 Delta) / 2`` with ``e - log1p(e)`` from its series for small ``e``: torch's formula (trace,
    dimension and log-determinants apart) gave 0 for the KL of nearly equal experts (1.1e-20) and negative values
    (-6.7e-16). Its derivatives are torch's formula's (``with_derivatives_of``)."""
    with torch.no_grad():
        cov_p, cov_q = family.covariance(params_p), family.covariance(params_q)
        chol_q = torch.linalg.cholesky(cov_q)
        delta = (family.mean(params_p) - family.mean(params_q)).unsqueeze(-1)
        scaled = torch.linalg.solve_triangular(chol_q, delta, upper=False)
        e = whitened_eigenvalues(chol_q, cov_p - cov_q)
        if bool((e.abs() <= _SERIES_BELOW).all()):
            excess = _minus_log1p_excess(e).sum(-1)
        else:  # terms of at least 5e-4 among them: the others' rounding is below its digits
            excess = e.sum(-1) - log_det_whitened(chol_q, cov_p, e)
        value = 0.5 * (excess + (scaled * scaled).sum((-2, -1)))
    if not torch.is_grad_enabled() or not (params_p.requires_grad or params_q.requires_grad):
        return value
    return with_derivatives_of(value, torch_kl(family.distribution(params_p), family.distribution(params_q)))


#: ``e - log1p(e)`` is summed from its series where ``|e|`` is at most this (16 terms: to rounding)
_SERIES_BELOW = 0.05


def _minus_log1p_excess(e: torch.Tensor) -> torch.Tensor:
    """``e - log1p(e) = sum_{k >= 2} (-e)^k / k`` for small ``|e|`` (Horner): the direct difference cancels (for
    ``e = 1e-10``, 5e-21 from two terms of 1e-10)."""
    x = -e
    total = torch.full_like(e, 1 / 17)
    for k in range(16, 1, -1):  # x^2 (1/2 + x (1/3 + ... + x / 17))
        total = 1 / k + x * total
    return x * x * total


def log_bhattacharyya_coefficient(p, q) -> torch.Tensor:
    r"""Log Hellinger affinity :math:`\log\int\sqrt{pq}`."""
    return log_chernoff_coefficient(p, q, 0.5)


def bhattacharyya_coefficient(p, q) -> torch.Tensor:
    return log_bhattacharyya_coefficient(p, q).exp()


def hellinger_distance(p, q) -> torch.Tensor:
    r""":math:`H(p, q) = \sqrt{1 - \int\sqrt{pq}}` (so that :math:`0 \le H \le 1`); between identical experts
    its gradient is zero (``H`` is not differentiable there, like a norm at 0)."""
    return hellinger_of(log_bhattacharyya_coefficient(p, q))


def hellinger_of(log_bc: torch.Tensor) -> torch.Tensor:
    """The Hellinger distance ``sqrt(1 - BC)`` from ``log BC``. Where ``BC = 1`` its gradient is zero: the square
    root's infinite slope at 0 times a zero would be NaN, and NaN spreads to every input sharing the backward
    pass (the diagonal of a pairwise matrix made all its gradients NaN)."""
    gap = _one_minus_exp(log_bc).clamp_min(0)
    positive = gap > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, gap, 1.0)), 0.0)


def kl_divergence(p, q) -> torch.Tensor:
    r""":math:`KL(p\|q)` in Bregman form :math:`A(\eta_q) - A(\eta_p) - \langle\eta_q-\eta_p, \nabla A(\eta_p)\rangle`
    (Gaussians, diagonal and full, use algebraically equal forms without large cancelling terms)."""
    family, params, k = _pair(p, q)
    params_p, params_q = params.select(k, 0), params.select(k, 1)
    if isinstance(family, _DiagonalGaussianBase):
        loc_p, lv_p = family.split(params_p)
        loc_q, lv_q = family.split(params_q)
        kl = normal_kl(loc_p, lv_p, loc_q, lv_q)
        return kl.sum(-1) if family.num_features else kl
    if isinstance(family, MultivariateNormalFamily):
        return _mvn_kl(family, params_p, params_q)
    # float64 inside: the natural parameters of nearly equal float32 experts would differ by rounding noise
    wide = params.dtype if params.dtype == torch.float64 else torch.float64
    eta_p, eta_q = family.to_natural(params_p.to(wide)), family.to_natural(params_q.to(wide))
    delta = family.natural_difference(params_p.to(wide), params_q.to(wide))
    return bregman_divergence(family, eta_p, eta_q, delta).to(params.dtype)


def renyi_divergence(p, q, a: float) -> torch.Tensor:
    r"""Rényi divergence of order ``a``: :math:`\frac{1}{a-1}\log\int p^a q^{1-a}` (``a = 1`` is KL; a tensor ``a``
    that requires grad receives its gradient away from 1)."""
    value, a = _order(a)
    if value == 1.0:
        return kl_divergence(p, q)
    if not value > 0:
        raise ValueError(f"the Rényi order a must be positive, got a={value!r}")
    return log_chernoff_coefficient(p, q, a) / (a - 1)


def amari_alpha_divergence(p, q, a: float) -> torch.Tensor:
    r"""Amari :math:`\alpha`-divergence :math:`\frac{1 - \int p^a q^{1-a}}{a(1-a)}`; ``a=1`` is
    :math:`KL(p\|q)` and ``a=0`` is :math:`KL(q\|p)`; ``a=1/2`` is four times the squared Hellinger distance. A
    tensor ``a`` that requires grad receives its gradient away from 0 and 1."""
    value, a = _order(a)
    if value == 1.0:
        return kl_divergence(p, q)
    if value == 0.0:
        return kl_divergence(q, p)
    return _one_minus_exp(log_chernoff_coefficient(p, q, a)) / (a * (1 - a))


def _one_minus_exp(x: torch.Tensor) -> torch.Tensor:
    """``1 - e^x`` (``-expm1(x)``, exact next to 0) with the derivatives ``-e^x``: torch's ``expm1`` differentiates as
    ``expm1(x) + 1``, which keeps no digit where ``e^x`` is far below one (the Hellinger distance of two unit Normals
    20 apart had the gradient 0 for 4.8e-22, and lost digits from 15 apart)."""
    exp = torch.exp(x)
    return (-torch.expm1(x)).detach() - (exp - exp.detach())


def _same_family(p, q) -> bool:
    try:
        return family_of(p) == family_of(q)
    except ValueError:
        return False


# torch.distributions.kl_divergence reaches the closed forms above through these registrations
@register_kl(ExponentialFamilyDistribution, ExponentialFamilyDistribution)
def _kl_custom(p, q):
    if p.family != q.family:
        raise NotImplementedError(f"no KL divergence between {p.family.name} and {q.family.name} experts")
    return kl_divergence(p, q)


@register_kl(HolderPool, Distribution)
@register_kl(NumericalHolderPool, Distribution)
def _kl_pool(p, q):
    """Closed form for the log-linear pool (one family member) against an expert of its family; otherwise the
    estimate of :meth:`HolderPool.kl_estimate` (its error there) with the gradient of the engine's weighted points
    for it (:meth:`HolderPool.kl_divergence_to`)."""
    if isinstance(p, HolderPool) and p.num_components == 1:
        params = p.component_params.select(len(p.batch_shape), 0)
        if _same_family(p.family.distribution(params), q):
            # in the wider of the two dtypes, as torch's KL divergences promote (the experts of one pool must share
            # one, which a float32 other beside a float64 pool was refused for)
            other = params_of(q, p.family)
            wide = torch.promote_types(params.dtype, other.dtype)
            return kl_divergence(p.family.distribution(params.to(wide)), p.family.distribution(other.to(wide)))
    return p.kl_divergence_to(q)


__all__ = [
    "log_multi_chernoff_coefficient", "log_chernoff_coefficient", "log_bhattacharyya_coefficient",
    "bhattacharyya_coefficient", "hellinger_distance", "kl_divergence", "renyi_divergence",
    "amari_alpha_divergence",
]
