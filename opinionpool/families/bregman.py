r"""The Bregman divergence of a family's log-normaliser, :math:`A(\eta_q) - A(\eta_p) - \langle\eta_q - \eta_p,
\nabla A(\eta_p)\rangle`, accurate for nearly equal parameters: the KL divergence between two experts and, summed
with weights, the log of a geometric combination's normaliser (``ExponentialFamily.combine``)."""

from __future__ import annotations

import numpy
import torch

from .._validation import describe

__all__ = ["bregman_divergence", "bregman_divergence_and_rounding"]


#: Gauss-Legendre rule on [0, 1] for the integral form of Taylor's remainder in ``bregman_divergence``
_NODES, _WEIGHTS = (torch.from_numpy(x) for x in numpy.polynomial.legendre.leggauss(16))
_NODES, _WEIGHTS = (_NODES + 1) / 2, _WEIGHTS / 2
#: below this fraction of the terms it is computed from, the direct Bregman form has lost too many digits
_CANCELLATION = 1e-3


def bregman_divergence(family, eta_p: torch.Tensor, eta_q: torch.Tensor, delta: torch.Tensor | None = None,
                       strict: bool = True) -> torch.Tensor:
    r""":math:`A(\eta_q) - A(\eta_p) - \langle\eta_q - \eta_p, \nabla A(\eta_p)\rangle`, accurate also for nearly
    equal experts.

    The direct form subtracts terms of the size of :math:`A` to get a second-order quantity, so for nearly equal
    experts it keeps few digits or turns negative. Where it falls below ``1e-3`` of its terms, the integral form
    of Taylor's remainder :math:`\int_0^1 (1-t)\,\delta^\top\nabla^2A(\eta_p + t\delta)\,\delta\,dt`
    (:math:`\delta = \eta_q - \eta_p`; the curvature by double differentiation of :math:`A`) is computed too: a
    positive integrand, no cancellation. Its Gauss-Legendre rule (16 points on the path and on each half of it)
    is exact to rounding on a short path, not on a long one where the curvature changes by orders of magnitude
    (Beta(2000, 2000) against Beta(1, 1): 3.19 for a KL of 3.42), so it is taken only where the two rules agree
    better than the direct form's rounding (the machine epsilon times its terms), and where no curvature on the
    path underflows (a Gamma of rate 1e200: the remainder 0 for a KL of 0.09).

    The gradients are the analytic ones, :math:`\nabla A(\eta_q) - \nabla A(\eta_p)` in :math:`\eta_q` (on short
    paths :math:`\int_0^1 \nabla^2A(\eta_p + t\delta)\,\delta\,dt`, again free of cancellation) and
    :math:`-\nabla^2A(\eta_p)\,\delta` in :math:`\eta_p`: second derivatives of :math:`A` only, where autograd
    through the remainder form needs third ones, which overflow first (a Gamma concentration below about 1e-103 gave NaN
    gradients beside a right value). A gradient that still overflows raises rather than turning into NaN.

    ``delta``: :math:`\eta_q - \eta_p` where the caller knows it better than the difference of the rounded natural
    parameters (``ExponentialFamily.natural_difference``); the value takes it, the gradients the difference.
    ``strict=False``: where neither form is accurate, the direct form instead of a ``ValueError``, for a caller that
    checks its rounding (:func:`bregman_divergence_and_rounding`) against a larger sum the divergence enters."""
    return _Bregman.apply(family, eta_p, eta_q, delta, strict)[0]


def bregman_divergence_and_rounding(family, eta_p: torch.Tensor, eta_q: torch.Tensor,
                                    delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``bregman_divergence(..., strict=False)`` and, without a graph, its error where neither form is accurate
    (the rounding of the direct form: the machine epsilon times its terms), 0 elsewhere; one evaluation of both
    forms for the two."""
    return _Bregman.apply(family, eta_p, eta_q, delta, False)


def _forms(family, eta_p, eta_q, delta):
    """``_both_forms``, where ``shift_invariant`` families retry the rows of neither form with the shift taken out
    of ``eta_q`` (only there: elsewhere the shift's own rounding would cost digits of nearly equal experts)."""
    value, short, lost, rounding = _both_forms(family, eta_p, eta_q, delta)
    if family.shift_invariant and bool(lost.any()):
        shifted, shifted_short, still_lost, shifted_rounding = _both_forms(family, eta_p,
                                                                           _without_shift(family, eta_p, eta_q))
        value, short = torch.where(lost, shifted, value), torch.where(lost, shifted_short, short)
        rounding = torch.where(lost, shifted_rounding, rounding)
        lost = lost & still_lost
    return value, short, lost, torch.where(lost, rounding, 0)


def _bregman_value(family, eta_p: torch.Tensor, eta_q: torch.Tensor, strict: bool = True, delta=None):
    """The divergence (no graph), where it took the remainder form and the direct form's rounding where neither
    form is accurate (0 elsewhere); there a ``ValueError`` if ``strict``, else the direct form. ``delta``: as
    ``bregman_divergence``'s."""
    value, short, lost, rounding = _forms(family, eta_p, eta_q, delta)
    if strict and bool(lost.any()):
        raise ValueError(f"{family.name} KL divergence: neither form is accurate in {value.dtype} for these "
                         "experts (the direct form cancels, and the curvature of the log-normaliser overflows, "
                         "underflows or changes too much along the path for the remainder's rule) "
                         f"(first natural parameter of p: {describe(eta_p[..., 0], lost)})")
    return value, short, rounding


def _both_forms(family, eta_p: torch.Tensor, eta_q: torch.Tensor, delta=None):
    """The divergence by the direct form or, where that cancels, the remainder form, where it took the remainder
    form, where neither is accurate (the direct form there), and the direct form's rounding."""
    # a category p gives probability zero (eta_p = -inf, mean parameter 0) adds nothing to the linear term: inf * 0
    # would be NaN (and -inf - -inf for KL(p || p)); where only q gives it zero, delta stays -inf (KL = inf)
    delta = torch.where(torch.isneginf(eta_p), 0, eta_q - eta_p if delta is None else delta)
    direct, scale = _direct_form(family, eta_p, eta_q, delta)
    if family.splits_log_normalizer:  # the form of the smaller rounding, row by row
        split, split_scale = _split_direct_form(family, eta_p, eta_q, delta)
        better = split_scale < scale
        direct, scale = torch.where(better, split, direct), torch.where(better, split_scale, scale)
    cancelled = direct.abs() < _CANCELLATION * scale
    rounding = torch.finfo(direct.dtype).eps * scale
    if not bool(cancelled.any()):
        return direct, cancelled, cancelled, rounding
    remainder, error, underflowed = _taylor_remainder(family, eta_p, delta)
    # the remainder where its rule has converged to better than the direct form's rounding; not where the
    # curvature overflows (a Gamma concentration of 1e-200: 1 / a^2 is infinite in float64) or underflows
    short = cancelled & torch.isfinite(remainder) & ~underflowed & (error <= rounding)
    # elsewhere the direct form serves where it is a million times its rounding (six digits), and nowhere else: a KL
    # of 5e-21 between concentrations 1e-200 and 1.0000000001e-200 came out -4e-14
    lost = cancelled & ~short & (direct.abs() < 1e6 * rounding)
    return torch.where(short, remainder, direct), short, lost, rounding


def _without_shift(family, eta_p, eta_q):
    """``eta_q`` less the common shift of its difference from ``eta_p`` (``shift_invariant`` families, whose divergence
    it does not change): the mean difference under ``p``. Along the shift the log-normaliser has no curvature, so the
    remainder form of a difference that is (nearly) a shift read as underflowed, and the divergence of two
    representatives of one distribution (logits 0 and 5 for both categories) raised instead of giving 0."""
    mean_p = family.mean_parameters(eta_p)
    difference = torch.where(torch.isneginf(eta_p), 0, eta_q - eta_p)
    shift = (difference * mean_p).sum(-1, keepdim=True) / mean_p.sum(-1, keepdim=True)
    # (q ruling out a category p gives mass: KL = inf, which no shift changes)
    return eta_q - torch.where(torch.isfinite(shift), shift, 0)


def _direct_form(family, eta_p, eta_q, delta):
    """``A(q) - A(p) - <delta, grad A(p)>`` and the size of its terms (its rounding is a few ulps of it)."""
    log_normalizer_p, log_normalizer_q = family.log_normalizer(eta_p), family.log_normalizer(eta_q)
    mean_p = family.mean_parameters(eta_p)
    linear_terms = delta * mean_p
    direct = log_normalizer_q - log_normalizer_p - linear_terms.sum(-1)
    # the size of the terms, not of their sums: log-normalisers that vanish (a Bernoulli's (log(1 - p), log p) gives
    # A = 0) and a linear term whose entries cancel made the scale of 1e-8 experts apart about 1e-16, so the direct
    # form's rounding (3e-16 for a KL of 2.4e-16) passed for the value
    scale = log_normalizer_q.abs() + log_normalizer_p.abs() + linear_terms.abs().sum(-1)
    # and the size of the terms inside the log-normalisers: a Bernoulli's A = log(e^log(1 - p) + e^log p) is 0 up to
    # the rounding of terms of about 0.6, which the direct form of experts 1e-10 apart took for a divergence
    # (-1.2e-16 against 2e-21); <eta, mu> measures them (a category of probability zero adds nothing)
    for eta, mean in ((eta_p, mean_p), (eta_q, family.mean_parameters(eta_q))):
        scale = scale + torch.where(torch.isneginf(eta), 0, eta * mean).abs().sum(-1)
    return direct, scale


def _split_direct_form(family, eta_p, eta_q, delta):
    """The direct form of a log-normaliser split into ``H + R`` (``ExponentialFamily.splits_log_normalizer``): ``H``'s
    divergence as the family computes it, plus ``R(q) - R(p) - <delta, grad R(p)>``, whose terms are of the size of
    ``log eta``, not of ``eta`` (the whole ``A`` of Beta(1e16, 1e16) is -1.4e16: its direct form kept no digit of a
    KL divergence of 17)."""
    with torch.enable_grad():
        point = eta_p.detach().requires_grad_(True)
        remainder_p, size_p = family.log_normalizer_remainder(point)
        (slope_p,) = torch.autograd.grad(remainder_p.sum(), point)
    remainder_q, size_q = family.log_normalizer_remainder(eta_q)
    linear_terms = delta * slope_p
    value, size = family.homogeneous_divergence(eta_p, eta_q)
    direct = value + remainder_q - remainder_p.detach() - linear_terms.sum(-1)
    return direct, size + size_p.detach() + size_q + linear_terms.abs().sum(-1)


class _Bregman(torch.autograd.Function):
    """The Bregman divergence with its analytic gradients (see :func:`bregman_divergence`); twice differentiable
    through autograd of the backward's own operations. Its second output, the rounding where neither form is
    accurate, carries no gradient."""

    @staticmethod
    def forward(ctx, family, eta_p, eta_q, delta, strict):
        with torch.no_grad():
            value, short, rounding = _bregman_value(family, eta_p, eta_q, strict=strict, delta=delta)
        ctx.family = family
        ctx.save_for_backward(eta_p, eta_q, value, short)
        ctx.mark_non_differentiable(rounding)
        return value, rounding

    @staticmethod
    def backward(ctx, grad, _rounding_grad):
        eta_p, eta_q, value, short = ctx.saved_tensors
        family, create = ctx.family, torch.is_grad_enabled()
        delta = torch.where(torch.isneginf(eta_p), 0, eta_q - eta_p)
        with torch.enable_grad():
            mean_q = family.mean_parameters(eta_q)
            change = mean_q - family.mean_parameters(eta_p)
            if bool(short.any()):
                along = _curvature_times(family, eta_p + _NODES.to(eta_p).reshape((-1,) + (1,) * eta_p.dim()) * delta,
                                         delta, create)
                path = (_WEIGHTS.to(eta_p).reshape((-1,) + (1,) * eta_p.dim()) * along).sum(0)
                change = torch.where(short.unsqueeze(-1), path, change)
            grad_p = -_curvature_times(family, eta_p, delta, create)
        # an entry nothing depends on (upstream gradient zero) gets zero, whatever its own gradient; the product with
        # the upstream gradient is kept, so that the second derivative through it is the divergence's gradient (a
        # zero constant there gave d^2 (w KL) / dw dtheta = 0 at w = 0, for dKL / dtheta)
        upstream = grad.unsqueeze(-1)
        used = upstream != 0
        broken = (torch.isfinite(value).unsqueeze(-1) & used) & ~(torch.isfinite(grad_p) & torch.isfinite(change))
        grad_p = upstream * torch.where(used | torch.isfinite(grad_p), grad_p, 0.0)
        grad_q = upstream * torch.where(used | torch.isfinite(change), change, 0.0)
        if bool(broken.any()):
            raise ValueError(f"{family.name} KL divergence: its gradient overflows in {eta_p.dtype} for these experts "
                             "(the curvature of the log-normaliser is infinite) (first natural parameter of p: "
                             f"{describe(eta_p[..., 0], broken.any(-1))})")
        return None, grad_p, grad_q, None, None


def _curvature_times(family, eta: torch.Tensor, direction: torch.Tensor, create: bool) -> torch.Tensor:
    r""":math:`\nabla^2A(\eta)\,d` row by row (``eta`` and ``d`` broadcast), as the derivative of
    :math:`\nabla A(\eta)` along ``d`` (``eta`` and ``d`` may carry graphs, kept where ``create``: ``d`` enters as
    the direction, not as a function of ``eta``)."""
    shape = torch.broadcast_shapes(eta.shape, direction.shape)
    point = eta.expand(shape) if eta.requires_grad else eta.detach().expand(shape).clone().requires_grad_(True)
    (slope,) = torch.autograd.grad(family.log_normalizer(point).sum(), point, create_graph=True)
    (product,) = torch.autograd.grad(slope, point, grad_outputs=direction.expand(shape), create_graph=create)
    return product


def _taylor_remainder(family, eta_p: torch.Tensor, delta: torch.Tensor):
    """The integral form of Taylor's remainder by the 16-point rule on each half of the path, the difference from
    the rule on the whole path (its error estimate), and where a curvature on the path underflowed (``|d^2 A| <``
    the smallest normal number along a ``delta`` that is not zero: the remainder would be too small, or 0)."""
    halves = torch.cat((_NODES / 2, (1 + _NODES) / 2)).to(eta_p)
    # the halves' 32 nodes and the whole path's 16, in one batch of evaluations of A
    points = torch.cat((halves, _NODES.to(eta_p)))
    nodes = points.reshape((-1,) + (1,) * eta_p.dim())
    with torch.enable_grad():
        step = torch.zeros(nodes.shape[:1] + eta_p.shape[:-1] + (1,), dtype=eta_p.dtype, device=eta_p.device,
                           requires_grad=True)
        along = family.log_normalizer(eta_p + (nodes + step) * delta)  # A on the path, moved by `step` along delta
        (slope,) = torch.autograd.grad(along.sum(), step, create_graph=True)
        (curvature,) = torch.autograd.grad(slope.sum(), step)
    curvature = curvature.squeeze(-1)
    weights = _WEIGHTS.to(eta_p)
    shape = (-1,) + (1,) * (eta_p.dim() - 1)
    half_weights = (torch.cat((weights, weights)) / 2 * (1 - halves)).reshape(shape)
    whole_weights = (weights * (1 - _NODES.to(eta_p))).reshape(shape)
    split = (half_weights * curvature[:len(halves)]).sum(0)
    whole = (whole_weights * curvature[len(halves):]).sum(0)
    moving = (delta != 0).any(-1)
    underflowed = moving & (curvature.abs() < torch.finfo(curvature.dtype).tiny).any(0)
    return split, (split - whole).abs(), underflowed
