r"""Gaussian 2-Wasserstein barycenters (the WB-VAE aggregator of Qiu et al.).

For Gaussians :math:`\mathcal N(\mu_j, \Sigma_j)` with weights :math:`\lambda_j` the barycenter is
:math:`\mathcal N(\sum_j\lambda_j\mu_j, \Sigma)` where :math:`\Sigma` is the fixed point of
:math:`\Sigma = \sum_j \lambda_j (\Sigma^{1/2}\Sigma_j\Sigma^{1/2})^{1/2}`. Commuting (e.g. diagonal)
covariances give :math:`\Sigma^{1/2} = \sum_j\lambda_j\Sigma_j^{1/2}`: the standard deviations average.
Full covariances use the Álvarez-Esteban et al. (2016) iteration
:math:`\Sigma \leftarrow \Sigma^{-1/2}\big(\sum_j\lambda_j(\Sigma^{1/2}\Sigma_j\Sigma^{1/2})^{1/2}\big)^2\Sigma^{-1/2}`.
"""

from __future__ import annotations

import torch
from torch.distributions import Independent, MultivariateNormal, Normal

from ._autograd import first_order_only
from ._validation import check_positive_int, check_real, check_weights, describe, validation_enabled
from .experts import as_experts
from .families import DiagonalNormalFamily, MultivariateNormalFamily, NormalFamily
from .families.gaussian import gaussian_barycenter
from .pool import check_batches_broadcast, normalized_log_weights

__all__ = ["wasserstein_barycenter", "covariance_barycenter"]


class _PSDSquareRoot(torch.autograd.Function):
    """The symmetric square root ``S = U diag(sqrt(l)) U^T`` of a symmetric positive semi-definite matrix, with the
    backward of ``S dS + dS S = dA``: in ``U``'s basis the gradient is divided by ``s_i + s_j``, never by a
    difference of eigenvalues. ``eigh``'s own backward divides by ``l_i - l_j``, so an expert with a repeated
    eigenvalue (an isotropic covariance, such as the prior's) got NaN gradients."""

    @staticmethod
    def forward(ctx, matrix):
        values, vectors = torch.linalg.eigh(matrix)
        roots = values.clamp_min(0).sqrt()
        ctx.save_for_backward(roots, vectors)
        return (vectors * roots.unsqueeze(-2)) @ vectors.transpose(-1, -2)

    @staticmethod
    @first_order_only("the Wasserstein barycentre's matrix square root")
    def backward(ctx, grad):
        roots, vectors = ctx.saved_tensors
        inner = vectors.transpose(-1, -2) @ (0.5 * (grad + grad.transpose(-1, -2))) @ vectors
        sums = roots.unsqueeze(-1) + roots.unsqueeze(-2)
        inner = torch.where(sums > 0, inner / torch.where(sums > 0, sums, 1.0), 0.0)
        return vectors @ inner @ vectors.transpose(-1, -2)


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    return _PSDSquareRoot.apply(matrix)


def _barycenter_step(sigma, covariances, w):
    """One Álvarez-Esteban step ``Sigma^-1/2 (sum_j w_j (Sigma^1/2 Sigma_j Sigma^1/2)^1/2)^2 Sigma^-1/2``."""
    root = _sqrtm_psd(sigma)
    inner = (w * _sqrtm_psd(root.unsqueeze(-3) @ covariances @ root.unsqueeze(-3))).sum(-3)
    root_inv = torch.linalg.inv(root)
    updated = root_inv @ inner @ inner @ root_inv
    return 0.5 * (updated + updated.transpose(-1, -2))


def _stable_step(lower, factors, w):
    """The same step from Cholesky factors, ``Sigma = L L^T`` (``lower``) and ``Sigma_j = C_j C_j^T``
    (``factors``): the transport maps are ``L^-T (L^T Sigma_j L)^1/2 L^-1`` for any such factor,
    ``(L^T Sigma_j L)^1/2 = V S V^T`` from the singular values of ``C_j^T L`` (never forming ``L^T Sigma_j L``, whose
    eigenvalues keep only ``eps * condition^2`` of the smallest), and the next ``Sigma = X^T X`` with ``X = K L^-1``,
    ``K = sum_j w_j V S V^T``: positive semi-definite by construction. The eigenvalue form lost the smallest
    eigenvalue of covariances of condition 1e8 (it raised, or returned an indefinite matrix at 1e10)."""
    _, values, vh = torch.linalg.svd(factors.transpose(-1, -2) @ lower.unsqueeze(-3))
    inner = (w * (vh.transpose(-1, -2) * values.unsqueeze(-2)) @ vh).sum(-3)
    half = torch.linalg.solve_triangular(lower.transpose(-1, -2), inner, upper=True).transpose(-1, -2)  # K L^-1
    updated = half.transpose(-1, -2) @ half
    return 0.5 * (updated + updated.transpose(-1, -2))


def _whitened_change(new, old, lower, tol):
    """``(change, settled)``: the largest change of ``new`` from ``old`` relative to ``old`` in any direction,
    ``|L^-1 (new - old) L^-T|`` (``old = L L^T``, ``lower``), over ``tol``, the largest over the rows; and whether in
    every row it is within ``tol`` or that change's own rounding, ``64 eps`` times ``old``'s condition number.
    Relative to the largest entry instead, the directions of the smallest eigenvalues converged only to about ``tol``
    times the condition number (2.6e-2 off at condition 1e10)."""
    half = torch.linalg.solve_triangular(lower, new - old, upper=False)
    change = torch.linalg.solve_triangular(lower, half.transpose(-1, -2), upper=False).abs().amax((-1, -2))
    values = torch.linalg.eigvalsh(old)
    rounding = 64 * torch.finfo(old.dtype).eps * values[..., -1] / values[..., 0]
    return float((change / tol).max()), bool((change <= rounding.clamp_min(tol)).all())


def _converged(change: float, previous: float, within_rounding: bool) -> bool:
    """Whether a linearly converging iteration may stop, from its last two changes (in units of ``tol``): within
    ``tol`` with the geometric tail the last two changes predict (``change r / (1 - r)``, ``r = change /
    previous``), or within its own rounding (``within_rounding``) once the change no longer shrinks. Stopping as soon
    as the change fell within its rounding and shrank by less than half left the error of a slow contraction
    behind: at ``r = 0.93`` (a barycenter of condition number 5e8) 13 times the last change, 6e-6 relative in the
    smallest eigenvalue where ``eps`` times the condition number is 1.1e-7."""
    if previous == float("inf"):  # one change, no rate yet
        return change <= 1
    ratio = change / previous
    if ratio >= 1:  # no longer shrinking: rounding, not contraction, makes the change
        return change <= 1 or within_rounding
    return change <= 1 and change * ratio / (1 - ratio) <= 1


def _relative_change(new, old):
    """Each row's largest change relative to its own scale, the largest over the rows: one row of large
    covariances must not stop the others."""
    return ((new - old).abs().amax((-1, -2)) / old.abs().amax((-1, -2)).clamp_min(1e-300)).max()


def covariance_barycenter(covariances: torch.Tensor, weights: torch.Tensor, *, tol: float | None = None,
                          max_iter: int = 500) -> torch.Tensor:
    """Fixed point of the barycenter equation; ``covariances`` ``(..., M, d, d)`` (symmetric positive definite, a
    floating dtype), ``weights`` ``(..., M)`` (non-negative, normalised here to sum to one) broadcasting against
    each other. Computed in float64 whatever the dtype (a float32 iteration lost the smallest eigenvalue of a
    covariance of condition number 1e4 and failed to invert), from Cholesky factors (:func:`_stable_step`): the
    smallest eigenvalue is good to about ``eps`` times the condition number, relative. ``tol``: the largest change
    relative to the current ``Sigma`` in any direction, row by row, that stops the iteration (default 1e-10, float32
    inputs included: 1e-5 left them 1e-5 off), the geometric tail the last two changes predict included; an
    ill-conditioned row whose change falls below its own rounding stops once the change no longer shrinks.

    Gradients are those of the fixed point itself (implicit differentiation): the gradient reaching the output is
    that of one more step from the fixed point, replaced by the solution of ``v = g + J^T v`` (``J`` the step's
    Jacobian in ``Sigma`` there), found by the same iteration. Differentiating through the iterations instead gave
    a gradient of however many steps ran: one, where the commuting start is already the answer (0.13 % off for an
    isotropic expert beside a full one). Not twice differentiable."""
    _check_tolerances(tol, max_iter)
    if not isinstance(covariances, torch.Tensor) or not isinstance(weights, torch.Tensor):
        raise TypeError(f"covariances and weights must be tensors, got {type(covariances).__name__} and "
                        f"{type(weights).__name__}")
    for name, value in (("covariances", covariances), ("weights", weights)):
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must have a real floating dtype, got {value.dtype}")
    if covariances.dim() < 3 or covariances.shape[-1] != covariances.shape[-2]:
        raise ValueError(f"covariances must be (..., M, d, d), got shape {tuple(covariances.shape)}")
    if covariances.shape[-3] == 0:  # (checked before the weights, whose complaint would be that they are all zero)
        raise ValueError(f"covariances must hold at least one expert (M >= 1), got shape {tuple(covariances.shape)}")
    check_weights("weights", weights, covariances.shape[-3])
    try:
        batch = torch.broadcast_shapes(covariances.shape[:-3], weights.shape[:-1])
    except RuntimeError:
        raise ValueError(f"weights of shape {tuple(weights.shape)} do not broadcast against covariances of shape "
                         f"{tuple(covariances.shape)} (batch axes before the last one of weights, the last three of "
                         "covariances)") from None
    dtype = covariances.dtype
    covariances, weights = covariances.to(torch.float64), weights.to(torch.float64)
    factors = _check_covariances(covariances.detach(), dtype)
    tol = 1e-10 if tol is None else tol
    # over the largest first: weights of 1e308 sum to inf (the normalised weights, and their gradient, are the same)
    weights = weights / weights.detach().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    weights = weights / weights.sum(-1, keepdim=True)
    covariances = covariances.expand(batch + covariances.shape[-3:])
    factors = factors.expand(covariances.shape)
    w = weights.expand(batch + weights.shape[-1:]).unsqueeze(-1).unsqueeze(-1)
    if covariances.numel() == 0:  # no rows, or 0 x 0 matrices: nothing to iterate
        return (w * covariances).sum(-3).to(dtype)
    with torch.no_grad():
        sigma = (w * _sqrtm_psd(covariances)).sum(-3)
        sigma = sigma @ sigma  # the commuting-case answer is a good start
        previous = float("inf")
        for _ in range(max_iter):
            lower = torch.linalg.cholesky(sigma)  # for the step and for the change it makes
            updated = _stable_step(lower, factors, w)
            change, settled = _whitened_change(updated, sigma, lower, tol)
            sigma = updated
            if _converged(change, previous, settled):
                break
            previous = change
        else:
            raise RuntimeError(f"Wasserstein barycenter fixed point did not converge in {max_iter} iterations "
                               f"(the last step's relative change was {change:.3g} times tol={tol})")
    if not torch.is_grad_enabled() or not (covariances.requires_grad or w.requires_grad):
        return sigma.to(dtype)
    # the step forms Sigma^1/2 Sigma_j Sigma^1/2, of the covariances' scale squared: it overflowed above 1e154 (a
    # NaN barycenter) and underflowed below 1e-160 (a zero gradient). The step is homogeneous of degree one in
    # (Sigma, Sigma_j) together, so it is taken on them over each row's trace of Sigma and scaled back; its Jacobian
    # in Sigma is the same at both scales.
    scale = sigma.diagonal(dim1=-2, dim2=-1).sum(-1).unsqueeze(-1).unsqueeze(-1)
    scaled = covariances / scale.unsqueeze(-3)
    step = scale * _barycenter_step(sigma / scale, scaled, w)  # its graph reaches the covariances and weights only
    out = sigma + (step - step.detach())  # the fixed point's value, the step's gradient
    fixed = (sigma / scale).requires_grad_()
    step_in_sigma = _barycenter_step(fixed, scaled.detach(), w.detach())  # for J^T v

    def condition_number() -> float:
        values = torch.linalg.eigvalsh(sigma)
        return float((values[..., -1] / values[..., 0]).max())

    def implicit(grad):
        if grad is None:  # no gradient reaches the output
            return None
        v, first, previous, shrinking, allowance = grad, None, float("inf"), 0, None
        for _ in range(max_iter):
            (vjp,) = torch.autograd.grad(step_in_sigma, fixed, v, retain_graph=True)
            updated = grad + vjp
            change = float(_relative_change(updated, v))
            if change <= tol:
                return updated
            first = change if first is None else first
            if change < previous:
                shrinking += 1
                last = change
            # the contraction over the steps that shrank (their geometric mean: one step's ratio at the rounding
            # floor is noise)
            elif shrinking > 1 and (last / first) ** (1 / (shrinking - 1)) <= 0.5:
                # no longer shrinking, after a fast contraction: the Jacobian's products' rounding (eps times the
                # condition number) makes the change, and what is left of the sum is below it (condition 6e5, a
                # contraction of 0.24: the change stalled at 1.3e-10 against tol = 1e-10, and the gradient raised).
                # After a slow contraction the sum's tail is not: at condition 3e7 such a stop left the gradient
                # 2-4 % off, so there the iteration goes on and raises
                allowance = allowance or 64 * torch.finfo(torch.float64).eps * condition_number()
                if change <= allowance:
                    return updated
            previous, v = change, updated
        raise RuntimeError(f"the Wasserstein barycenter's implicit gradient did not converge in {max_iter} "
                           f"iterations (the barycenter's condition number is {condition_number():.2g}: the products "
                           "of its step's Jacobian are too rounded for the iteration where it contracts slowly)")

    out.register_hook(implicit)
    return out.to(dtype)


def _check_covariances(covariances: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cholesky factors of ``covariances`` (float64, given in ``dtype``), which must be finite, symmetric to within
    64 spacings of ``dtype`` at their largest entry, and positive definite; a clear error otherwise (an indefinite
    matrix gave a silent answer, a NaN 500 iterations and a message about convergence)."""
    if covariances.numel() == 0:
        return covariances
    bad = ~torch.isfinite(covariances)
    if bool(bad.any()):
        raise ValueError(f"covariances must be finite, got {describe(covariances, bad)}")
    scale = covariances.abs().amax((-1, -2), keepdim=True)
    asymmetry = (covariances - covariances.transpose(-1, -2)).abs()
    if bool((asymmetry > 64 * torch.finfo(dtype).eps * scale).any()):
        worst = float((asymmetry / scale.clamp_min(1e-300)).max())
        raise ValueError(f"covariances must be symmetric, got one whose entries differ from their transpose by "
                         f"{worst:.3g} of its largest entry")
    factors, info = torch.linalg.cholesky_ex(covariances)
    if bool((info > 0).any()):
        index = tuple(int(i) for i in (info > 0).nonzero()[0].tolist())
        raise ValueError(f"covariances must be positive definite, got a matrix at index {index} that is not "
                         f"(eigenvalues {describe(torch.linalg.eigvalsh(covariances[index]))})")
    return factors


def _check_tolerances(tol, max_iter) -> None:
    check_positive_int("max_iter", max_iter)
    if tol is not None and not 0 < check_real("tol", tol) < float("inf"):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")


def wasserstein_barycenter(experts, weights=None, *, tol: float | None = None, max_iter: int = 500,
                           validate_args: bool | None = None):
    """The 2-Wasserstein barycenter of Gaussian experts, as a ``torch.distributions`` object. ``weights`` are
    normalised in log space as the pools' are: a zero weight removes its expert, and its gradient is 0 there (as a
    pool's; :func:`covariance_barycenter`, given the weights themselves, gives the one-sided derivative)."""
    _check_tolerances(tol, max_iter)
    experts = as_experts(experts, validate_args)
    family, params = experts.family, experts.params
    log_w = normalized_log_weights(weights, experts.num_experts, dtype=params.dtype, device=params.device,
                                   validate=validation_enabled(validate_args))
    check_batches_broadcast(experts.batch_shape, log_w.shape[:-1])
    if isinstance(family, (NormalFamily, DiagonalNormalFamily)):
        mean, logvar = gaussian_barycenter(*family.split(params), log_w, family.num_features)
        base = Normal(mean, torch.exp(0.5 * logvar), validate_args=False)
        return base if family.num_features == 0 else Independent(base, 1)
    w = log_w.exp()
    if isinstance(family, MultivariateNormalFamily):
        loc = family.mean(params)
        mean = (w.unsqueeze(-1) * loc).sum(-2)
        # weights with a batch shape of their own broadcast against the experts' (one barycenter per row)
        cov = covariance_barycenter(family.covariance(params), w, tol=tol, max_iter=max_iter)
        return MultivariateNormal(mean, covariance_matrix=cov, validate_args=False)
    raise ValueError(f"wasserstein_barycenter needs Gaussian experts, got {family.name} experts")
