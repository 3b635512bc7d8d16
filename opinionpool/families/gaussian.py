r"""Gaussian families: scalar ``Normal``, diagonal ``Independent(Normal, 1)`` and full ``MultivariateNormal``.

Diagonal Gaussians are stored as ``(loc, log variance)`` and every formula is written in terms of
``log w_j - log var_j`` (a log precision weight), so that precisions of ``exp(30)``, means of
``1e3`` and latent sizes of thousands stay finite and accurate in float32. For a geometric
combination with weights :math:`w_j` (summing to one):

.. math::
    \tau = \sum_j w_j \tau_j,\quad \mu = \sum_j \omega_j \mu_j,\ \omega_j = w_j\tau_j/\tau,\quad
    \log\!\int\!\prod_j q_j^{w_j} = -\tfrac12\sum_j w_j\tau_j(\mu_j-\mu)^2
        - \tfrac12\bigl(\log\tau - \textstyle\sum_j w_j\log\tau_j\bigr)

which is :math:`A(\bar\eta) - \sum_j w_j A(\eta_j)` with the cancellations done analytically.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Independent, MultivariateNormal, Normal

from .._validation import check_finite, check_positive
from ..constants import LOG_2PI
from .base import ExponentialFamily, heaviest_along, shifted_weighted_mean, weighted_sum

__all__ = ["NormalFamily", "DiagonalNormalFamily", "MultivariateNormalFamily"]


def normal_log_density(value: torch.Tensor, loc: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise ``log N(value; loc, exp(logvar))`` (not summed; broadcasting): the one place it is written. The
    deviation is scaled by the standard deviation before squaring: squared first, or with ``exp(-logvar)`` apart,
    a float32 scale of 1e-20 or 1e20 overflowed or underflowed (``-inf``, or ``0 * inf``)."""
    return -0.5 * (((value - loc) * torch.exp(-0.5 * logvar)) ** 2 + logvar + LOG_2PI)


def normal_kl(loc_p: torch.Tensor, logvar_p: torch.Tensor, loc_q: torch.Tensor, logvar_q: torch.Tensor) -> torch.Tensor:
    """Elementwise ``KL(N(loc_p, exp(logvar_p)) || N(loc_q, exp(logvar_q)))`` (not summed; broadcasting), in the
    form without large cancelling terms: the one place it is written. The difference of means is scaled by ``q``'s
    standard deviation before squaring (squared first, a float32 scale of 1e-20 gave ``0 * inf``)."""
    ratio = logvar_p - logvar_q
    return 0.5 * (torch.expm1(ratio) - ratio + ((loc_p - loc_q) * torch.exp(-0.5 * logvar_q)) ** 2)


def _whitened(chol: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``L^-1 M L^-T`` (``chol`` is ``L``), symmetrised against the solves' rounding."""
    half = torch.linalg.solve_triangular(chol, matrix, upper=False)
    whitened = torch.linalg.solve_triangular(chol, half.transpose(-1, -2), upper=False)
    return 0.5 * (whitened + whitened.transpose(-1, -2))


def whitened_eigenvalues(chol: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """The eigenvalues of ``L^-1 M L^-T`` (``chol`` is ``L``), ascending. Raises ``ValueError`` where they are not
    finite: for matrices about the dtype's range apart (covariances 1e-154 and 1e154 in float64) the whitened
    matrix or its eigen-solver overflows, and the eigenvalues came out NaN (``log_det_whitened`` refuses the
    underflow on the other side, which gave infinite log-determinants)."""
    eigenvalues = torch.linalg.eigvalsh(_whitened(chol, matrix))
    if not bool(torch.isfinite(eigenvalues).all()):
        raise ValueError(f"the eigenvalues of the whitened matrix L^-1 M L^-T are not finite in {eigenvalues.dtype}: "
                         f"the experts' covariances are about its range ({torch.finfo(eigenvalues.dtype).max:.1e}) "
                         f"apart or more, or not finite")
    return eigenvalues


def log_det_whitened(chol: torch.Tensor, matrix: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``log det L^-1 M L^-T`` from ``e``, the eigenvalues of ``L^-1 (M - L L^T) L^-T`` in ascending order (from the
    difference: exact for nearby matrices), as ``sum_i log1p(e_i)``, except that those below -1/2 are read as the
    eigenvalues of ``L^-1 M L^-T`` itself (``1 + e_i``, in the same order), which keep their digits where ``M`` is
    far below ``L L^T``: from the difference they are -1 to rounding once ``M`` is 1e-8 (float32) or 1e-16
    (float64) of it, which gave log-determinants of -inf or NaN. The derivatives are those of ``log det M - log det
    L L^T`` from Cholesky factors (``with_derivatives_of``)."""
    with torch.no_grad():
        e = e.detach()
        near = e >= -0.5
        if bool(near.all()):
            value = torch.log1p(e).sum(-1)
        else:
            direct = whitened_eigenvalues(chol.detach(), matrix.detach())
            if not bool((near | (direct > 0)).all()):  # a positive-definite M: zero means it underflowed
                raise ValueError(f"the eigenvalues of the whitened matrix L^-1 M L^-T are not all positive in "
                                 f"{direct.dtype}: the experts' covariances are about its range apart or more, or too "
                                 "ill-conditioned for it (condition numbers of about 1e12 and more in float64, "
                                 "differently oriented: their rounding exceeds the smallest eigenvalues)")
            value = torch.where(near, torch.log1p(e), torch.log(direct)).sum(-1)
    if not (torch.is_grad_enabled() and (chol.requires_grad or matrix.requires_grad)):
        return value
    return with_derivatives_of(value, log_det_of_factor(torch.linalg.cholesky(matrix)) - log_det_of_factor(chol))


def log_det_of_factor(chol: torch.Tensor) -> torch.Tensor:
    """``log det L L^T`` of a Cholesky factor ``L``."""
    return 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)


def with_derivatives_of(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` (computed without gradient) carrying the derivatives of ``surrogate``, an expression equal to it in
    exact arithmetic: the log-determinants are valued from eigenvalues, which keep the digits of small terms, and
    differentiated through Cholesky factors, which need no eigenvectors; the eigen-solver's derivatives divide by
    differences of eigenvalues, and where eigenvalues repeat (a covariance ``4 I`` against ``I``) its second
    derivatives were NaN. ``value`` is detached here: derivatives it carried would be counted twice (an order ``a``
    requiring grad in ``log1p(a e)`` gave the Chernoff coefficient's derivative in ``a`` off by that term)."""
    return value.detach() + (surrogate - surrogate.detach())


def gaussian_combine(loc: torch.Tensor, logvar: torch.Tensor, log_weights: torch.Tensor, num_features: int,
                     need_log_c: bool = True, about_first: bool = False):
    """Geometric combination of diagonal Gaussians along dim ``-1 - num_features``.

    Returns ``(loc, logvar)`` of the combination and the log Chernoff coefficient summed over the
    ``num_features`` trailing feature dimensions (meaningful for weights summing to one; ``None`` unless
    ``need_log_c``). ``about_first``: offsets from slot 0 instead of the heaviest expert, for callers that put a
    stand-in near the others in every slot of weight zero (it saves a gather on the VAE hot path).

    Nothing large cancels: means are taken relative to the expert of largest weight before differences
    are squared, and the log-determinant term ``log sum_j w_j / v_j + sum_j w_j log v_j`` is computed from
    log-variances relative to the sharpest expert, ``log1p(sum_j w_j expm1(-d_j)) + sum_j w_j d_j`` (``d_j >= 0``),
    whose error scales with the spread of the log-variances, not with their size (for two experts of weight 1/2 it
    is ``log cosh((lv_1 - lv_2) / 2)``).
    """
    k = loc.dim() - 1 - num_features
    lw = log_weights.reshape(log_weights.shape + (1,) * num_features)
    log_precision_weight = lw - logvar
    log_precision = torch.logsumexp(log_precision_weight, dim=k)
    log_omega = log_precision_weight - log_precision.unsqueeze(k)
    omega = log_omega.exp()
    # around the expert of largest weight: the offsets are small when the experts nearly coincide
    reference = loc.narrow(k, 0, 1) if about_first else heaviest_along(lw, loc, k)
    offset = loc - reference
    mean_offset = (omega * offset).sum(k) / omega.sum(k)
    mean = reference.squeeze(k) + mean_offset
    if not need_log_c:
        return mean, -log_precision, None
    zero = torch.zeros((), dtype=logvar.dtype, device=logvar.device)
    # the deviations in the pool's standard deviations, scaled by the precision's fourth root twice: its square root
    # alone overflowed float32 for log-variances below -177 (inf * 0 = NaN for coinciding experts); an expert of
    # weight zero contributes no deviation (far away, its square would meet omega = 0 as inf * 0)
    root = torch.exp(0.25 * log_precision).unsqueeze(k)
    dev = torch.where(omega > 0, (offset - mean_offset.unsqueeze(k)) * root * root, zero)
    quad = (omega * dev * dev).sum(k)
    w = lw.exp()
    used = w > 0
    sharpest = torch.where(used, logvar, torch.full((), math.inf, dtype=logvar.dtype, device=logvar.device))
    spread = torch.where(used, logvar - sharpest.amin(k, keepdim=True), zero)
    log_det = torch.log1p((w * torch.expm1(-spread)).sum(k)) + (w * spread).sum(k)
    log_c = -0.5 * (quad + log_det)
    if num_features:
        log_c = log_c.sum(tuple(range(-num_features, 0)))
    return mean, -log_precision, log_c


def gaussian_barycenter(loc: torch.Tensor, logvar: torch.Tensor, log_weights: torch.Tensor, num_features: int):
    """The 2-Wasserstein barycenter of diagonal Gaussians along dim ``-1 - num_features`` (weights summing to one):
    the mean ``sum_j w_j mu_j`` and the standard deviation ``sum_j w_j sigma_j``, the latter as a log-variance
    summed in log-space. Returns ``(loc, logvar)``."""
    k = -1 - num_features  # from the right, so that weights with more batch dimensions than the experts broadcast
    lw = log_weights.reshape(log_weights.shape + (1,) * num_features)
    return (lw.exp() * loc).sum(k), 2 * torch.logsumexp(lw + 0.5 * logvar, dim=k)


def gaussian_mixture_moments(log_pi: torch.Tensor, loc: torch.Tensor, logvar: torch.Tensor, num_features: int):
    """Mean and log variance of a mixture of diagonal Gaussians (components along dim ``log_pi.dim()-1``).

    Variance as within-plus-between, rescaled by the largest of the components' weighted terms, ``log pi + logvar``
    and ``log pi + 2 log |loc - mean|`` (components of weight zero left out), with each component's weight taken
    into its term in log space: neither tiny variances underflow nor deviations of many standard deviations
    overflow, and a component of tiny weight and huge variance keeps its share (weight 1e-200 beside a
    log-variance of 1000: its weight squared, 1e-400, and its variance relative to the others, e^1000, are beyond
    float64 apart, and the variance came out 0, a log-variance of -inf, for 79). The rescaling cancels exactly, so
    it carries no gradient.
    """
    k = log_pi.dim() - 1
    lp = log_pi.reshape(log_pi.shape + (1,) * num_features)
    mean = shifted_weighted_mean(log_pi, loc, dim=k)
    present = lp != -math.inf  # (a NaN weight is present: a NaN input's NaN reaches the log-variance, not -inf)
    offset = loc - mean.unsqueeze(k)
    weighted_logvar = torch.where(present, lp + logvar, -math.inf)
    root_weight = torch.exp(0.5 * lp)  # sqrt(pi), on the weights' own shape
    weighted_offset = torch.where(present, offset.abs() * root_weight, 0.0)
    scale = torch.maximum(weighted_logvar.amax(dim=k, keepdim=True), 2 * torch.log(weighted_offset.amax(dim=k,
                                                                                                     keepdim=True)))
    # (-inf where every present component has variance zero at the mean: the log-variance is then -inf)
    scale = torch.where(torch.isfinite(scale), scale, 0.0).detach()
    # e^(-scale / 2) in two factors, each at most the largest float: one overflows float32 below a scale of -177
    # (standard deviations under e^-88.7, subnormal), where inf * 0 gave NaN; each of two lasts to -355
    quarter = torch.exp(-0.25 * scale).clamp_max(torch.finfo(scale.dtype).max)
    dev = torch.where(present, offset * root_weight * quarter * quarter, 0.0)
    within = torch.exp(weighted_logvar - scale)
    scaled = (within + dev * dev).sum(k)
    return mean, scale.squeeze(k) + torch.log(scaled)


class _DiagonalGaussianBase(ExponentialFamily):
    """Shared implementation of scalar and diagonal Gaussians: params ``(..., 2, *features)``."""

    num_features = 0
    gaussian = True

    def split(self, params):
        return params.select(-1 - self.num_features, 0), params.select(-1 - self.num_features, 1)

    def join(self, loc, logvar):
        return torch.stack((loc, logvar), dim=-1 - self.num_features)

    def to_natural(self, params):
        loc, logvar = self.split(params)
        precision = torch.exp(-logvar)
        eta = torch.stack((loc * precision, -0.5 * precision), dim=-1)
        return eta.flatten(-1 - self.num_features) if self.num_features else eta

    def from_natural(self, natural):
        if self.num_features:
            natural = natural.unflatten(-1, (-1, 2))
        eta1, eta2 = natural[..., 0], natural[..., 1]
        logvar = -torch.log(-2 * eta2)
        return self.join(eta1 * torch.exp(logvar), logvar)

    def log_normalizer(self, natural):
        eta = natural.unflatten(-1, (-1, 2)) if self.num_features else natural.unsqueeze(-2)
        a = -eta[..., 0] ** 2 / (4 * eta[..., 1]) - 0.5 * torch.log(-2 * eta[..., 1])
        return a.sum(-1)

    def natural_domain(self, natural):
        eta = natural.unflatten(-1, (-1, 2)) if self.num_features else natural.unsqueeze(-2)
        return ((eta[..., 1] < 0) & torch.isfinite(eta).all(-1)).all(-1)

    def sufficient_statistic(self, value):
        t = torch.stack((value, value * value), dim=-1)
        return t.flatten(-2) if self.num_features else t

    def log_base_measure(self, value):
        d = value.shape[-1] if self.num_features else 1
        return torch.full(value.shape[: value.dim() - self.num_features], -0.5 * d * LOG_2PI,
                          dtype=value.dtype, device=value.device)

    def mean_parameters(self, natural):
        params = self.from_natural(natural)
        loc, logvar = self.split(params)
        m = torch.stack((loc, loc * loc + torch.exp(logvar)), dim=-1)
        return m.flatten(-2) if self.num_features else m

    def natural_from_mean(self, mean_params, init=None, tol=None, max_iter=100):
        m = mean_params.unflatten(-1, (-1, 2)) if self.num_features else mean_params
        loc = m[..., 0]
        precision = 1 / (m[..., 1] - loc * loc)
        eta = torch.stack((loc * precision, -0.5 * precision), dim=-1)
        return eta.flatten(-2) if self.num_features else eta

    def check_params(self, params, name):
        loc, logvar = self.split(params)
        check_finite(f"{name} loc", loc)
        check_finite(f"{name} log-variance", logvar)

    def combine(self, params, log_weights):
        loc, logvar = self.split(params)
        log_weights = log_weights.to(params.dtype)  # (float64 from callers whose weights sum to one)
        # contiguous copies: the (loc, logvar) slices are strided, which slows every later op severalfold
        mean, logvar_c, log_c = gaussian_combine(loc.contiguous(), logvar.contiguous(), log_weights, self.num_features)
        return self.join(mean, logvar_c), log_c

    def mean(self, params):
        return self.split(params)[0]

    def variance(self, params):
        return torch.exp(self.split(params)[1])

    def mixture_mean(self, log_pi, params):
        return shifted_weighted_mean(log_pi, self.split(params)[0], dim=log_pi.dim() - 1)

    def mixture_variance(self, log_pi, params):
        loc, logvar = self.split(params)
        return torch.exp(gaussian_mixture_moments(log_pi, loc, logvar, self.num_features)[1])

    def moment_match(self, log_pi, params):
        loc, logvar = self.split(params)
        return self.join(*gaussian_mixture_moments(log_pi, loc, logvar, self.num_features))

    def log_prob(self, params, value):
        lp = normal_log_density(value, *self.split(params))
        return lp.sum(-1) if self.num_features else lp

    def log_prob_term_size(self, params, value):
        loc, logvar = self.split(params)
        size = 0.5 * ((value - loc) ** 2 * torch.exp(-logvar) + logvar.abs() + LOG_2PI)  # normal_log_density's terms
        return size.sum(-1) if self.num_features else size


class NormalFamily(_DiagonalGaussianBase):
    """Scalar ``torch.distributions.Normal`` experts; params ``(..., 2)`` = ``(loc, log variance)``."""

    name = "Normal"
    num_features = 0
    support_interval = (-math.inf, math.inf)

    def __init__(self):
        super().__init__(event_shape=(), param_shape=(2,))

    @classmethod
    def match(cls, dist):
        return cls() if type(dist) is Normal else None

    def params_from_distribution(self, dist):
        check_finite("Normal loc", dist.loc)
        check_positive("Normal scale", dist.scale)
        return self.join(dist.loc, 2 * torch.log(dist.scale))

    def distribution(self, params, validate_args: bool = False):
        loc, logvar = self.split(params)
        return Normal(loc, torch.exp(0.5 * logvar), validate_args=validate_args)

    def mixture_covariance(self, log_pi, params):
        raise ValueError("Normal experts are scalar; use variance")


class DiagonalNormalFamily(_DiagonalGaussianBase):
    """``Independent(Normal, 1)`` experts of dimension ``dim``; params ``(..., 2, dim)``."""

    name = "diagonal Normal"
    num_features = 1
    multivariate = True

    def __init__(self, dim: int):
        super().__init__(event_shape=(dim,), param_shape=(2, dim))
        self.dim = dim

    def _key(self):
        return (self.dim,)

    @classmethod
    def match(cls, dist):
        if isinstance(dist, Independent) and type(dist.base_dist) is Normal:
            if dist.reinterpreted_batch_ndims != 1:
                raise ValueError("Independent(Normal) experts must reinterpret exactly one batch dimension "
                                 f"as the event, got reinterpreted_batch_ndims={dist.reinterpreted_batch_ndims}")
            return cls(dist.event_shape[-1])
        return None

    def params_from_distribution(self, dist):
        base = dist.base_dist
        check_finite("Normal loc", base.loc)
        check_positive("Normal scale", base.scale)
        loc, scale = torch.broadcast_tensors(base.loc, base.scale)
        return self.join(loc, 2 * torch.log(scale))

    def distribution(self, params, validate_args: bool = False):
        loc, logvar = self.split(params)
        normal = Normal(loc, torch.exp(0.5 * logvar), validate_args=validate_args)
        return Independent(normal, 1, validate_args=validate_args)

    def mixture_covariance(self, log_pi, params):
        k = log_pi.dim() - 1
        loc, logvar = self.split(params)
        mean = shifted_weighted_mean(log_pi, loc, dim=k)
        dev = loc - mean.unsqueeze(k)
        within = torch.diag_embed(torch.exp(logvar))
        return weighted_sum(log_pi, within + dev.unsqueeze(-1) * dev.unsqueeze(-2), dim=k)


def _symmetric(matrix: torch.Tensor) -> torch.Tensor:
    """Whether each matrix equals its transpose to 1e-6 of its largest entry, about torch's own check (inverses of
    covariances of condition 1e6 are asymmetric by 1e-12 of their entries in float64, and valid)."""
    scale = matrix.abs().amax((-2, -1))
    tolerance = 1e-6 * scale
    return ((matrix - matrix.mT).abs().amax((-2, -1)) <= tolerance) | ~torch.isfinite(scale)


class MultivariateNormalFamily(ExponentialFamily):
    """Full-covariance Gaussians of dimension ``dim``; params ``(..., dim, dim + 1)`` = ``[loc | precision]``."""

    name = "MultivariateNormal"
    multivariate = True
    gaussian = True

    def __init__(self, dim: int):
        super().__init__(event_shape=(dim,), param_shape=(dim, dim + 1))
        self.dim = dim

    def _key(self):
        return (self.dim,)

    @staticmethod
    def split(params):
        return params[..., 0], params[..., 1:]

    @staticmethod
    def join(loc, precision):
        return torch.cat((loc.unsqueeze(-1), precision), dim=-1)

    @classmethod
    def match(cls, dist):
        return cls(dist.event_shape[-1]) if type(dist) is MultivariateNormal else None

    def params_from_distribution(self, dist):
        try:
            precision = dist.precision_matrix
        except torch.linalg.LinAlgError as error:  # torch's own message names no argument
            raise ValueError(f"a MultivariateNormal expert's covariance is singular: its precision matrix cannot be "
                             f"formed ({error})") from None
        loc = dist.loc.expand(precision.shape[:-1])
        return self.join(loc, precision)

    def distribution(self, params, validate_args: bool = False):
        loc, precision = self.split(params)
        return MultivariateNormal(loc, precision_matrix=precision, validate_args=validate_args)

    def check_params(self, params, name):
        loc, precision = self.split(params)
        check_finite(f"{name} loc", loc)
        check_finite(f"{name} precision", precision)
        _, info = torch.linalg.cholesky_ex(precision)
        bad = (info != 0) | ~_symmetric(precision)  # (the factorisation reads the lower triangle only)
        if bool(bad.any()):
            raise ValueError(f"{name}: covariance matrices must be symmetric positive definite; the one at index "
                             f"{tuple(bad.nonzero()[0].tolist())} is not")

    def to_natural(self, params):
        loc, precision = self.split(params)
        h = (precision @ loc.unsqueeze(-1)).squeeze(-1)
        return torch.cat((h, (-0.5 * precision).flatten(-2)), dim=-1)

    def from_natural(self, natural):
        d = self.dim
        h, minus_half_p = natural[..., :d], natural[..., d:].unflatten(-1, (d, d))
        precision = -2 * minus_half_p
        loc = torch.cholesky_solve(h.unsqueeze(-1), torch.linalg.cholesky(precision)).squeeze(-1)
        return self.join(loc, precision)

    def log_normalizer(self, natural):
        loc, precision = self.split(self.from_natural(natural))
        chol = torch.linalg.cholesky(precision)
        quad = (loc.unsqueeze(-2) @ precision @ loc.unsqueeze(-1))[..., 0, 0]
        return 0.5 * quad - torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)

    def natural_domain(self, natural):
        d = self.dim
        precision = -2 * natural[..., d:].unflatten(-1, (d, d))
        _, info = torch.linalg.cholesky_ex(precision)
        return (info == 0) & torch.isfinite(natural).all(-1) & _symmetric(precision)

    def sufficient_statistic(self, value):
        return torch.cat((value, (value.unsqueeze(-1) * value.unsqueeze(-2)).flatten(-2)), dim=-1)

    def log_base_measure(self, value):
        return torch.full(value.shape[:-1], -0.5 * self.dim * LOG_2PI, dtype=value.dtype, device=value.device)

    def mean_parameters(self, natural):
        loc, precision = self.split(self.from_natural(natural))
        cov = torch.cholesky_inverse(torch.linalg.cholesky(precision))
        second = cov + loc.unsqueeze(-1) * loc.unsqueeze(-2)
        return torch.cat((loc, second.flatten(-2)), dim=-1)

    def natural_from_mean(self, mean_params, init=None, tol=None, max_iter=100):
        d = self.dim
        loc = mean_params[..., :d]
        cov = mean_params[..., d:].unflatten(-1, (d, d)) - loc.unsqueeze(-1) * loc.unsqueeze(-2)
        return self.to_natural(self.join(loc, _spd_inverse(cov)))

    def combine(self, params, log_weights):
        """As ``ExponentialFamily.combine``, with nothing large cancelling (the full-covariance counterpart of
        ``gaussian_combine``): means are taken relative to the expert of largest weight, and the log-determinants
        relative to its precision ``P_0 = L L^T``: with ``E_j = L^-1 (P_j - P_0) L^-T``, ``log det sum_j w_j P_j -
        sum_j w_j log det P_j = log det (I + sum_j w_j E_j) - sum_j w_j log det (I + E_j)`` for weights summing to
        one, whose terms vanish as the experts coincide instead of growing with their log-determinants."""
        k = params.dim() - 3  # expert axis of (..., C, S, d, d + 1)
        loc, precision = self.split(params)
        w = log_weights.to(params.dtype).exp()
        used = (w > 0)[..., None, None]
        wp = torch.where(used, w[..., None, None] * precision, torch.zeros_like(precision))
        combined = wp.sum(k)
        chol = torch.linalg.cholesky(combined)
        # shift by the heaviest expert, so that one expert, or identical ones, come out exactly
        reference = heaviest_along(log_weights[..., None], loc, k)
        offset = loc - reference
        shift = torch.cholesky_solve((wp @ offset.unsqueeze(-1)).sum(k), chol).squeeze(-1)
        mean = reference.squeeze(k) + shift
        # the deviations from the mean as mu_j - mean = P^-1 sum_i w_i P_i (mu_j - mu_i), from differences of means
        # (O(S^2), S small): as offset - shift, a far sharper expert of smaller weight had one of pure rounding times its
        # precision (-7.4e11 for -140.1 at standard deviations 1e-22 and 1e22). The symmetric pairwise form
        # 1/2 sum_ij d_ij^T w_i P_i P^-1 w_j P_j d_ij holds only for commuting precisions.
        pair = (w > 0).unsqueeze(-1) & (w > 0).unsqueeze(-2)
        apart = torch.where(pair[..., None], loc.unsqueeze(k) - loc.unsqueeze(k + 1), torch.zeros((), dtype=loc.dtype))
        dev = torch.cholesky_solve((wp.unsqueeze(k + 1) @ apart.unsqueeze(-1)).sum(k), chol.unsqueeze(-3))
        quad = (dev.transpose(-1, -2) @ wp @ dev)[..., 0, 0].sum(-1)
        precision_0 = heaviest_along(log_weights[..., None, None], precision, k)
        chol_0 = torch.linalg.cholesky(precision_0)
        # R_j - I = L^-1 (P_j - P_0) L^-T from the differences of the precisions (exact for nearby experts), and
        # log det (I + E) as sum log1p(eigenvalues of E): both keep the digits of the small terms
        # (valued only: the derivatives come from Cholesky factors, with_derivatives_of)
        with torch.no_grad():
            excess = _whitened(chol_0, precision - precision_0)
            excess = torch.where(used, excess, torch.zeros_like(excess))
            e = torch.linalg.eigvalsh(excess)
            # the weights sum to one (up to the rounding of exp(log w), which is left out, as gaussian_combine does)
            mixed = torch.log1p(torch.linalg.eigvalsh((w[..., None, None] * excess).sum(k))).sum(-1)
        log_det_relative = log_det_whitened(chol_0, torch.where(used, precision, precision_0), e)
        log_det_mixed = with_derivatives_of(mixed, log_det_of_factor(chol) - log_det_of_factor(chol_0).squeeze(-1))
        weighted = torch.where(w > 0, w * log_det_relative, torch.zeros_like(w)).sum(-1)
        log_c = -0.5 * quad - 0.5 * (log_det_mixed - weighted)
        return self.join(mean, combined), log_c

    def log_prob(self, params, value):
        return self.distribution(params).log_prob(value)

    def mean(self, params):
        return self.split(params)[0]

    def covariance(self, params):
        return torch.cholesky_inverse(torch.linalg.cholesky(self.split(params)[1]))

    def variance(self, params):
        return torch.diagonal(self.covariance(params), dim1=-2, dim2=-1)

    def mixture_mean(self, log_pi, params):
        return shifted_weighted_mean(log_pi, self.split(params)[0], dim=log_pi.dim() - 1)

    def mixture_covariance(self, log_pi, params):
        k = log_pi.dim() - 1
        loc = self.split(params)[0]
        mean = shifted_weighted_mean(log_pi, loc, dim=k)
        dev = loc - mean.unsqueeze(k)
        return weighted_sum(log_pi, self.covariance(params) + dev.unsqueeze(-1) * dev.unsqueeze(-2), dim=k)

    def mixture_variance(self, log_pi, params):
        return torch.diagonal(self.mixture_covariance(log_pi, params), dim1=-2, dim2=-1)

    def moment_match(self, log_pi, params):
        mean = self.mixture_mean(log_pi, params)
        return self.join(mean, _spd_inverse(self.mixture_covariance(log_pi, params)))


def _spd_inverse(matrix: torch.Tensor) -> torch.Tensor:
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(matrix))
    return 0.5 * (inverse + inverse.transpose(-1, -2))


def _log_variance_ratio(d, a):
    """``log1p(a expm1(d))`` where ``1 + a expm1(d)`` is positive: for Gaussian Chernoff coefficients the log of
    ``v_a / v_p``, for Laplace ones the log of the weighted mean of the scales over ``b_p``. For ``a > 0`` and
    ``d > 1`` in log space, ``logaddexp(0, log a + d + log(-expm1(-d)))``: ``expm1(d)`` overflows past d = 709
    (float64) or 88 (float32), which gave log Chernoff coefficients of -inf for -199.7 and NaN in float32. (For
    ``a <= 0`` it cannot overflow where the integral converges, ``a expm1(d) > -1``.)"""
    if not (bool(a.detach() > 0) if isinstance(a, torch.Tensor) else a > 0):
        return torch.log1p(a * torch.expm1(d))
    far = d > 1
    d_near, d_far = torch.where(far, 0.0, d), torch.where(far, d, 1.0)  # each branch finite, for the gradient
    log_a = torch.log(torch.as_tensor(a, dtype=d.dtype, device=d.device))
    log_far = torch.logaddexp(torch.zeros_like(d_far), log_a + d_far + torch.log(-torch.expm1(-d_far)))
    return torch.where(far, log_far, torch.log1p(a * torch.expm1(d_near)))
