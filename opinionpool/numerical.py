r"""The numerical engine: Hölder pools for every :math:`\alpha`, with stated errors.

For :math:`\alpha \notin \{0, 1/n\}` the pool :math:`(\sum_j \lambda_j q_j^\alpha)^{1/\alpha}` has no
closed form. Every method here reduces to integrals of the unnormalised pooled density
:math:`u(z) = M_\alpha(q_1(z), \dots, q_M(z))` (the weighted power mean, :func:`log_power_mean`):

* ``"enumeration"``: discrete families, an exact sum over the support (Poisson truncated where the
  stated tail bound is negligible);
* ``"quadrature"``: scalar continuous families, an adaptive Gauss–Legendre rule split at every expert and
  at the pool's highest point (:func:`_quadrature_one`), in float64 whatever the experts' dtype, to the
  relative tolerance ``rtol`` (1e-11 by default); a batch of pools is integrated in one vectorised pass
  (:func:`_quadrature_batch`) for finite alpha;
* ``"grid"``: Gaussians of dimension up to 3, tensor-product Gauss–Legendre panels on a box adapted
  to the experts; the error is the difference from a lower-order rule on the same panels;
* ``"importance"``: any dimension, importance sampling from a *normalised* exact pool :math:`p` whose
  scaled density bounds :math:`u \le B p` (the envelopes are chosen in :mod:`opinionpool.pool`).
  The weights :math:`u/p \le B` are bounded, so the normaliser estimate has finite variance and
  the same envelope gives an exact rejection sampler (acceptance probability :math:`u / (B p)`).

Results are returned as :class:`PoolEstimate`: each quantity with its error (a standard error for
importance sampling, an error estimate for quadrature, a bound for a truncated sum). Every method is a
weighted point set, so the gradient of ``log Z`` is the pool's expectation of the gradient of ``log u``
over the same points, and that of a moment its covariance with the gradient of ``log u``
(:func:`differentiable_estimates`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import torch
from scipy import integrate, optimize

from ._exact import two_product, two_sum
from ._hellinger import values_readable
from ._validation import check_alpha, check_seed
from .families import ExponentialFamily, MultivariateNormalFamily

__all__ = [
    "Estimate", "PoolEstimate", "Envelope", "log_power_mean", "METHODS", "DEFAULT_RTOL", "MIN_RTOL", "MAX_GRID_DIM",
    "MAX_ENUMERATED",
    "quadrature_log_mass", "quadrature_entropy", "check_other_log_prob", "QUADRATURE_RANGE", "QUADRATURE_MIN_RELATIVE_SD",
    "check_quadrature_range",
]

METHODS = ("enumeration", "quadrature", "grid", "importance")
#: Gaussian pools up to this dimension are integrated on a grid by default
MAX_GRID_DIM = 3
_GRID_NODES_PER_DIM = {1: 4000, 2: 800, 3: 140}
_GRID_CHUNK = 1 << 16
#: the refined panels span the pool's mean +- this many of its standard deviations
_CORE_WIDTH = 12.0
#: at most this many grid passes locate a pool (each on panels split around the last one's core) before the rule
_LOCATING_PASSES = 3
#: the grid's error at alpha = +-inf (kinks where the experts cross) is this many times the rules' largest difference
_KINKED_SAFETY = 3.0
#: grid panels are split until they are at most this many standard deviations of the narrowest expert near them wide
#: (10 Gauss–Legendre nodes integrate a Gaussian on a panel of two standard deviations to about 1e-16 of its mass)
_GRID_PANEL_WIDTH = 2.0
#: default relative tolerance of the 1-D quadrature (reached in float64 whatever the experts' dtype)
DEFAULT_RTOL = 1e-11
#: the most values (support points x pools x experts) a discrete pool enumerates at once: each costs about 100 bytes
#: across the passes (13 GB at the limit); more raises ValueError before the work rather than exhausting the memory
MAX_ENUMERATED = 2**27
_GL_ORDER = 10
_MAX_ROUNDS = 200
_MAX_PANELS = 20_000
#: initial quadrature edges at each expert's mean plus these multiples of its standard deviation (and minus)
_EXPERT_OFFSETS = np.array([0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])
_SCAN_POINTS = 4001
#: and where log u has dropped by these amounts from its highest point
_LEVELS = (0.5, 2.0, 8.0, 32.0, 128.0)
#: beyond the outer edges the tails are mapped logarithmically, ``z = edge +- scale expm1(y)``, up to ``y`` of this
#: many e-folds (1e100 of the experts' largest scale): a power law in ``z`` is an exponential in ``y``, which the
#: rule integrates to its tolerance, and what lies beyond is bounded by the integrands' own power laws there
#: (:func:`_tail_remainders`)
_TAIL_REACH = 100 * math.log(10)
#: no mapped tail reaches beyond this magnitude (squares of the points and of their standardised values stay finite)
_TAIL_LIMIT = 1e150
#: the mapped tails' first panels end at these values of ``y``
_TAIL_EDGES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
#: the integrands' power laws beyond a tail's reach are fitted over its last two steps of this many e-folds
_TAIL_FIT_STEP = 4.0


def log_power_mean(log_values: torch.Tensor, log_weights: torch.Tensor, alpha) -> torch.Tensor:
    r"""``log (sum_j w_j exp(alpha l_j))^(1/alpha)`` over the last dimension, for log-weights summing to one.

    ``alpha = 0`` is the weighted geometric mean, ``+inf`` / ``-inf`` the maximum / minimum over
    experts with positive weight. About the weighted mean ``m`` of the ``l_j``, where every ``|alpha (l_j - m)|`` is
    at most 1/2, the form ``m + log1p(sum_j w_j expm1(alpha (l_j - m))) / alpha`` keeps the ``O(alpha)`` terms that
    ``logsumexp`` rounds away (its rounding is divided by ``alpha``: in float32, 1.5e-5 of a pool's mass at alpha =
    1e-3), so the pool tends continuously to the log-linear pool; where they are at most 1e-4, the cumulant series
    ``m + alpha k2 / 2 + alpha^2 k3 / 6 + alpha^3 k4 / 24`` (exact to rounding there), whose derivative in
    ``alpha`` does not cancel (the other forms' lost eps |l| / alpha: 3e4 for 2 at alpha = 1e-20). ``alpha`` may be a
    one-element tensor, which then carries its gradient: at 0 half the weighted variance of the ``l_j`` (the series' first
    order in ``alpha``), none at +-inf, where the result does not depend on it.
    """
    # the branch; the arithmetic below uses ``alpha`` itself, so that a tensor keeps its gradient
    a = check_alpha(alpha)
    present = log_weights > -math.inf
    # an absent expert contributes nothing: where its q_j = 0, w_j * log q_j (alpha = 0) or log w_j + alpha log q_j
    # (alpha < 0: -inf + inf) would be NaN, and so would their gradients, however masked afterwards
    finite = torch.where(present, log_values, torch.zeros_like(log_values))
    if a == 0:
        w = log_weights.exp()
        geometric = torch.where(present, w * finite, torch.zeros_like(log_values)).sum(-1)
        if not (isinstance(alpha, torch.Tensor) and alpha.requires_grad):
            return geometric
        # d/dalpha at 0 is Var_w(l) / 2: added as alpha times it, which changes no value (a fit of alpha started
        # at 0 saw a gradient of 0 and never moved); left out where some present l is -inf (the mean is -inf)
        usable = present & torch.isfinite(log_values)
        l_kept = torch.where(usable, log_values, torch.zeros_like(log_values))
        mean = torch.where(usable, w * l_kept, torch.zeros_like(l_kept)).sum(-1, keepdim=True)
        variance = torch.where(usable, w * (l_kept - mean) ** 2, torch.zeros_like(l_kept)).sum(-1)
        # (none where the variance is not finite: 0 * inf made the value NaN; its squares overflow float32 beyond
        # spreads of about 1e19)
        variance = torch.where((usable | ~present).all(-1) & torch.isfinite(variance), variance,
                               torch.zeros_like(variance))
        return geometric + alpha.reshape(()).to(log_values.dtype) * 0.5 * variance
    if math.isinf(a):
        fill = torch.full_like(log_values, -math.inf if a > 0 else math.inf)
        masked = torch.where(present, log_values, fill)
        return masked.amax(-1) if a > 0 else masked.amin(-1)
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.reshape(()).to(log_values.dtype)
    # an expert of density zero here (l = -inf): for alpha > 0 its term w e^(alpha l) is 0, left out (with l kept,
    # the gradient in a tensor alpha was 0 * -inf = NaN); for alpha < 0 it makes the pool 0
    vanishing = present & (log_values == -math.inf)
    finite = torch.where(vanishing, torch.zeros_like(finite), finite)
    log_weights_kept = torch.where(vanishing, torch.full_like(log_weights, -math.inf), log_weights) if a > 0 \
        else log_weights
    # relative to the largest (alpha > 0) or smallest (alpha < 0) present value, alpha (l - l*) <= 0: no overflow
    # at |alpha| of 1e300 (the identity holds for any l*, which therefore carries no gradient)
    fill = torch.full_like(log_values, -math.inf if a > 0 else math.inf)
    extreme = torch.where(present & ~vanishing, log_values, fill)
    extreme = (extreme.amax(-1, keepdim=True) if a > 0 else extreme.amin(-1, keepdim=True)).detach()
    extreme = torch.where(torch.isfinite(extreme), extreme, torch.zeros_like(extreme))
    general = extreme.squeeze(-1) + torch.logsumexp(log_weights_kept + alpha * (finite - extreme), dim=-1) / alpha
    if a < 0:
        general = torch.where(vanishing.any(-1), torch.full_like(general, -math.inf), general)
    # about the weighted mean (the weights sum to one: an expert of density zero makes these forms inapplicable)
    w = torch.where(present, log_weights.exp(), torch.zeros_like(log_values))
    mean = (w * finite).sum(-1, keepdim=True)
    deviation = torch.where(present, finite - mean, torch.zeros_like(finite))
    reach = (alpha * deviation).abs().masked_fill(~present, 0).amax(-1).detach()
    applicable = ~vanishing.any(-1)
    # (the quadrature's nodes call this many times: where no element takes the other forms, they are not formed)
    if values_readable(reach) and not bool((applicable & (reach <= 0.5)).any()):
        return general
    terms = w * torch.expm1((alpha * deviation).clamp(-0.5, 0.5))
    series = mean.squeeze(-1) + torch.log1p(terms.sum(-1)) / alpha
    use_cumulants = applicable & (reach <= 1e-4)
    # from deviations zeroed where the series is not used: their powers overflowed float32 there (spreads of 4e9),
    # and inf - inf in an unused branch still made the gradient NaN
    small = torch.where(use_cumulants.unsqueeze(-1), deviation, torch.zeros_like(deviation))
    # each term as products of the deviations d and of alpha d (at most 1e-4 here), never a power of d alone:
    # alpha^3 k4 = E[(alpha d)^3 d] - 3 E[alpha d d] E[(alpha d)^2] (d^4 overflowed float64 at log-densities of
    # 1e78, reached far in a tail at alpha = 1e-100, and made the pool NaN there)
    scaled = alpha * small
    k2, k3 = ((w * scaled ** k * small).sum(-1) for k in (1, 2))
    k4 = (w * scaled ** 3 * small).sum(-1) - 3 * k2 * (w * scaled * scaled).sum(-1)
    cumulants = mean.squeeze(-1) + k2 / 2 + k3 / 6 + k4 / 24
    # (the other forms' derivatives in a tiny alpha divide by alpha^2: 0 / 0 = NaN; not read under torch.func or
    # torch.compile, which cannot branch on values)
    if values_readable(use_cumulants) and bool(use_cumulants.all()):
        return cumulants
    return torch.where(use_cumulants, cumulants, torch.where(applicable & (reach <= 0.5), series, general))


def expert_log_probs(family: ExponentialFamily, params: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``log q_j(value)`` for experts ``params`` (``batch + (M,) + param_shape``) at ``value``
    (``sample + batch + event_shape``), shape ``sample + batch + (M,)``."""
    return family.log_prob(params, value.unsqueeze(value.dim() - len(family.event_shape)))


class _VanishingPool(ValueError):
    """The pooled density underflows wherever the experts put their mass (an interval far in a tail has no mass)."""


class Estimate(NamedTuple):
    """A quantity and its error: a standard error (importance sampling), a quadrature error estimate,
    or a bound on the truncation and rounding of a sum (enumeration), as :attr:`PoolEstimate.error_kind` says."""

    value: torch.Tensor
    error: torch.Tensor


@dataclass(frozen=True)
class PoolEstimate:
    """What :meth:`HolderPool.estimate` returns. Quantities not asked for (or not defined) are ``None``."""

    method: str
    error_kind: str
    log_normalizer: Estimate
    mean: Estimate | None = None
    variance: Estimate | None = None
    covariance: Estimate | None = None
    expected_statistic: Estimate | None = None
    effective_sample_size: torch.Tensor | None = None
    num_samples: int | None = None
    #: evaluations of the pooled density (quadrature)
    num_evaluations: int | None = None
    #: ``(points, log_w)``: the weighted points ``(P,) + batch + event`` behind the estimate, with
    #: ``log_w`` ``(P,) + batch`` proportional to the pool's mass there (kept on request, for gradients)
    nodes: tuple | None = field(default=None, repr=False, compare=False)
    #: ``(points, log_w, t, near, far)``, each ``(P',) + batch``: the weighted points of the gradient
    #: (:func:`differentiable_estimates`) where they are not ``nodes`` (the 1-D quadrature next to a singular end),
    #: with ``log q_j`` at each ``log q_j(point) + t (log q_j(far) - log q_j(near))`` under the power laws the values
    #: use (``t = 0`` where the point stands for itself, :meth:`_EndPanel.laws`)
    gradient_nodes: tuple | None = field(default=None, repr=False, compare=False)


def default_method(family: ExponentialFamily) -> str:
    if family.discrete:
        return "enumeration"
    if family.support_interval is not None:
        return "quadrature"
    if family.gaussian and family.event_shape.numel() <= MAX_GRID_DIM:
        return "grid"
    return "importance"


def check_method(family: ExponentialFamily, method: str) -> str:
    if method == "auto":
        return default_method(family)
    if method not in METHODS:
        raise ValueError(f"method must be 'auto' or one of {METHODS}, got {method!r}")
    if method == "enumeration" and not family.discrete:
        raise ValueError(f"method='enumeration' needs discrete experts, got {family.name}")
    if method == "quadrature" and family.support_interval is None:
        raise ValueError(f"method='quadrature' needs scalar continuous experts with a support interval, "
                         f"got {family.name}")
    if method == "grid" and not (family.gaussian and family.event_shape.numel() <= MAX_GRID_DIM):
        raise ValueError(f"method='grid' needs Gaussian experts of dimension <= {MAX_GRID_DIM}, got {family!r}")
    if method == "importance" and family.discrete:
        raise ValueError(f"method='importance' is for continuous experts; use 'enumeration' for {family.name}")
    return method


#: the smallest relative tolerance the adaptive quadrature takes: below, float64's rounding (1.1e-16 a step) keeps
#: its rules' differences from falling under it, and the refinement ran to its cap (seconds for a 1-D pool) to
#: return the error that 1e-15 gives
MIN_RTOL = 1e-15


def check_rtol(rtol) -> float:
    """A relative tolerance: a real number in [``MIN_RTOL``, 1)."""
    try:
        value = float(rtol)
    except (TypeError, ValueError):
        raise ValueError(f"rtol must be a real number in [{MIN_RTOL:g}, 1), got {rtol!r}") from None
    if isinstance(rtol, bool) or not MIN_RTOL <= value < 1:
        raise ValueError(f"rtol must be a real number in [{MIN_RTOL:g}, 1) (below, float64's rounding keeps the "
                         f"quadrature from reaching it), got {rtol!r}")
    return value


def check_quantities(family: ExponentialFamily, quantities) -> frozenset:
    known = {"mean", "variance", "covariance", "expected_statistic"}
    if isinstance(quantities, str):  # frozenset would split it into its letters
        raise ValueError(f"quantities must be a collection of names among {sorted(known)}, got the string "
                         f"{quantities!r} (write ({quantities!r},))")
    wanted = frozenset(quantities)
    unknown = wanted - known
    if unknown:
        raise ValueError(f"quantities must be among {sorted(known)}, got {sorted(unknown)}")
    if wanted & {"mean", "variance", "covariance"} and not family.has_numeric_moments:
        raise ValueError(f"quantities={sorted(wanted)}: {family.name} experts have no numeric mean, variance or "
                         "covariance; ask for 'expected_statistic' instead")
    if "covariance" in wanted and not family.multivariate:
        raise ValueError(f"quantities={sorted(wanted)}: a covariance needs multivariate continuous experts, got "
                         f"{family.name} (use variance)")
    return wanted


@contextlib.contextmanager
def seeded(seed: int | None, generator: torch.Generator | None, device: torch.device):
    """Run the enclosed sampling on a forked RNG seeded from ``seed`` or drawn from ``generator``
    (``torch.distributions`` samplers take no generator), leaving the global RNG untouched."""
    seed = check_seed(seed)
    if seed is not None and generator is not None:  # (the seed was silently ignored)
        raise ValueError(f"give seed or generator, not both: got seed={seed!r} and a generator")
    if seed is None and generator is None:
        yield
        return
    if generator is not None:
        seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class _NodeExpectations(torch.autograd.Function):
    r"""Passes the engine's values ``outputs`` (``batch + (1 + K,)``: ``log Z``, then ``E_pool[f_k]``) through unchanged
    and gives them the gradient of the weighted point set behind them. With ``pi_i`` the pool's normalised mass at
    node ``i`` (rule weights and nodes held fixed), ``d log Z / d log u_i = pi_i`` and
    ``d E[f_k] / d log u_i = pi_i (f_k(z_i) - E[f_k])``; autograd's chain through ``log u`` then gives
    ``E_pool[d log u]`` and ``Cov_pool(f_k, d log u)``."""

    @staticmethod
    def forward(ctx, log_u, pi, f, outputs):
        ctx.save_for_backward(log_u, pi, f)
        return outputs.clone()

    @staticmethod
    def backward(ctx, grad):
        log_u, pi, f = ctx.saved_tensors
        pi = _live_masses(log_u, pi)
        centred = f - (pi.unsqueeze(-1) * f).sum(0)
        return pi * (grad[..., 0] + (grad[..., 1:] * centred).sum(-1)), None, None, None


def _live_masses(log_u, pi):
    """The normalised masses ``pi`` as functions of ``log u`` (the rule's weights fixed), where a second derivative is
    asked for (``create_graph=True``: ``log_u`` then carries its graph): ``pi_i e^(l_i - l_i) / sum_j ...``, the same
    values. Saved as constants, the backward passes' second derivatives missed every term through ``pi`` (an
    entropy's Hessian entry 1.40 for -0.031)."""
    if not (torch.is_grad_enabled() and log_u.requires_grad):
        return pi
    live = pi * torch.exp(log_u - log_u.detach())
    total = live.sum(0)
    return live / torch.where(total > 0, total, 1.0)  # (no mass: an infinite value's, whose gradient is NaN)


class _WithoutGradient(torch.autograd.Function):
    """The value unchanged, its gradient NaN: for values that have none (infinite moments)."""

    @staticmethod
    def forward(ctx, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.where(grad != 0, math.nan, 0.0)  # (zeros where no gradient arrives: the other elements')


#: the quantities :func:`differentiable_estimates` can give a gradient
DIFFERENTIABLE = ("log_normalizer", "mean", "variance", "covariance", "expected_statistic")


def differentiable_estimates(family, params, log_weights, alpha, est: PoolEstimate, names) -> dict:
    r"""The estimate's values for ``names`` (among :data:`DIFFERENTIABLE`) as tensors carrying their exact gradient
    with respect to ``params``, ``log_weights`` and a tensor ``alpha``: :math:`\nabla\log Z = E_{pool}[\nabla\log u]`
    and :math:`\nabla E_{pool}[f] = \mathrm{Cov}_{pool}(f, \nabla\log u)` (``f`` = ``z``, ``(z - mean)^2``, the
    centred outer product or ``T(z)``), the pool's expectations taken over the estimate's own weighted points
    ``est.nodes``: for a quadrature rule, grid or exact sum this is the exact gradient of the estimate (the rule's
    nodes held fixed); for importance samples, the self-normalised estimate from the same samples. The values are
    the estimate's own, unchanged (in ``params``' dtype); the gradient is computed in float64.

    Next to a singular end the 1-D quadrature's points stand for points nearer the end than themselves
    (``est.gradient_nodes``): the mass the end panel extrapolates below its nearest point, at ``log(d / nearest)`` down
    to hundreds of nats, where the values pool the experts' power laws ``log q_j(nearest) + s_j log(d / nearest)``,
    and, by their rounding, the end panel's other nodes. There ``log u`` and ``T(z)`` are taken under
    those laws, each exponent ``s_j`` the slope of ``log q_j`` (of ``T``) between the two points it was fitted on, so
    that the gradient is the values' own: with ``log u`` at the nearest point, a Beta(0.7, 0.1) expert's
    ``d log Z / d b`` (``E[log(1 - z)]`` there) left out the extrapolated mass's depth, -0.640 for -0.870."""
    high = torch.float64
    pi, points, laws = _nodes_for_gradient(est)
    real = points.to(high)
    with torch.no_grad():
        flat = real.reshape(pi.shape + (-1,))
        mean = (pi.unsqueeze(-1) * flat).sum(0)
        parts, values, shapes = [], [est.log_normalizer.value.to(high).unsqueeze(-1)], []
        for name in names:
            if name == "log_normalizer":
                continue
            if name == "mean":
                f = flat
            elif name == "variance":
                f = (flat - mean) ** 2
            elif name == "covariance":
                dev = flat - mean
                f = (dev.unsqueeze(-1) * dev.unsqueeze(-2)).flatten(-2)
            elif name == "expected_statistic":
                f = _where_nodes_stand(lambda z: family.sufficient_statistic(z).to(high), real, laws)
            else:
                raise ValueError(f"names must be among {DIFFERENTIABLE}, got {name!r}")
            value = getattr(est, name).value
            parts.append(f)
            values.append(value.to(high).reshape(pi.shape[1:] + (-1,)))
            shapes.append((name, value.shape, f.shape[-1]))
    log_u = _log_u_at(family, params, log_weights, alpha, points, laws)
    f = torch.cat(parts, -1) if parts else pi.new_zeros(pi.shape + (0,))
    values = torch.cat(values, -1)
    out = _NodeExpectations.apply(log_u, pi, f, values)
    # an infinite value (a moment whose tail integral diverged) has no gradient: NaN, not the truncated rule's
    out = torch.where(torch.isfinite(values), out, _WithoutGradient.apply(out)).to(params.dtype)
    result = {"log_normalizer": out[..., 0]}
    start = 1
    for name, shape, size in shapes:
        result[name] = out[..., start:start + size].reshape(shape)
        start += size
    return result


def _nodes_for_gradient(est: PoolEstimate):
    """``(pi, points, laws)`` of the estimate's weighted points for a gradient (no graph): ``pi`` their normalised
    weights in float64, the points (float64 where real) with those of zero weight moved to the heaviest one, so that
    ``log u`` and its gradient are finite everywhere, and the power laws of the points next to a singular end that
    stand for points nearer it (``None`` where there are none; see :func:`differentiable_estimates`)."""
    points, log_w = est.nodes if est.gradient_nodes is None else est.gradient_nodes[:2]
    high = torch.float64
    with torch.no_grad():
        pi = torch.softmax(log_w.to(high), dim=0)
        extra = points.dim() - pi.dim()
        heaviest = pi.argmax(0, keepdim=True).reshape((1,) + pi.shape[1:] + (1,) * extra)
        heaviest = torch.gather(points, 0, heaviest.expand((1,) + points.shape[1:]))
        points = torch.where((pi > 0).reshape(pi.shape + (1,) * extra), points, heaviest)
        if points.is_floating_point():
            points = points.to(high)
        laws = None
        if est.gradient_nodes is not None:
            t, near, far = (v.to(high) for v in est.gradient_nodes[2:])
            t = torch.where(pi > 0, t, 0.0)
            if bool((t != 0).any()):  # the laws' anchors, the nodes themselves where they stand for themselves
                laws = (t, torch.where(t != 0, near, points), torch.where(t != 0, far, points))
    return pi, points, laws


def _log_u_at(family, params, log_weights, alpha, points, laws):
    """The pool's unnormalised log-density at the gradient nodes, in float64, with its graph to ``params``,
    ``log_weights`` and a tensor ``alpha``."""
    high = torch.float64
    ell = _where_nodes_stand(lambda z: expert_log_probs(family, params.to(high), z), points, laws)
    return log_power_mean(ell, log_weights.to(high), alpha)


class _NodeDivergence(torch.autograd.Function):
    r"""Passes ``value``, an estimate of ``E_pool[log u - log r] - log Z`` (``KL(pool || r)`` for a density ``r``;
    the negative entropy for ``log r = 0``), through unchanged and gives it the gradient of the weighted point set
    behind it: with ``pi_i`` the pool's normalised mass at node ``i`` (rule weights and nodes held fixed) and
    ``d_i = log u_i - log r_i``, ``d value / d log u_i = pi_i (d_i - E_pool[d])`` and ``d value / d log r_i = -pi_i``."""

    @staticmethod
    def forward(ctx, log_u, log_r, pi, value):
        ctx.save_for_backward(log_u, log_r, pi)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        log_u, log_r, pi = ctx.saved_tensors
        pi = _live_masses(log_u, pi)
        difference = torch.where(pi > 0, log_u - log_r, 0.0)
        centred = difference - (pi * difference).sum(0)
        return grad * pi * centred, -grad * pi, None, None


def divergence_at_nodes(family, params, log_weights, alpha, est: PoolEstimate, value: torch.Tensor,
                        log_other=None) -> torch.Tensor:
    r"""``value``, an estimate of ``KL(pool || other)`` (``log_other`` a function of points giving ``other``'s
    log-density, with its graph) or of the pool's negative entropy (``log_other=None``), carrying the gradient of
    the same quantity over the estimate's weighted points ``est.nodes`` (rule weights and nodes held fixed):
    :math:`\nabla(-H) = \mathrm{Cov}_{pool}(\log u, \nabla\log u)` and :math:`\nabla KL = \mathrm{Cov}_{pool}(\log u -
    \log r, \nabla\log u) - E_{pool}[\nabla\log r]`, as :func:`differentiable_estimates` gives its expectations.
    The value is unchanged (in ``value``'s dtype); the gradient is computed in float64."""
    pi, points, laws = _nodes_for_gradient(est)
    dtype, value = value.dtype, value.to(torch.float64)
    finite = torch.isfinite(value)
    # an infinite value (other without density on part of the pool's mass) has no gradient: NaN, and its points no
    # part in the others' (they are kept finite below)
    pi = torch.where(finite, pi, 0.0)
    log_u = _log_u_at(family, params, log_weights, alpha, points, laws)
    if log_other is None:
        log_r = torch.zeros_like(pi)
    else:  # at the points the nodes stand for, as log u (at the nodes themselves, d KL / d b of Beta(a, b) left out
        # the extrapolated mass's depth below a singular end: 2.790 for 2.982)
        log_r = _where_nodes_stand(lambda z: log_other(z).to(torch.float64).unsqueeze(-1), points, laws).squeeze(-1)
    keep = (pi > 0) & torch.isfinite(log_r.detach())
    log_r = torch.where(keep, log_r, 0.0)
    out = _NodeDivergence.apply(log_u, log_r, pi, value)
    return torch.where(finite, out, _WithoutGradient.apply(out)).to(dtype)


def _where_nodes_stand(function, points, laws):
    """``function`` (of points shaped as the nodes, values with one more dimension) at the points the gradient nodes
    ``points`` stand for: its value at each node, plus, where the nodes' laws ``(t, near, far)`` (``None``: none)
    carry it nearer a singular end, ``t (function(far) - function(near))``, the change of a function linear in the
    log distance to that end; no change where either value is not finite (an expert the laws leave out)."""
    values = function(points)
    if laws is None:
        return values
    t, near, far = laws
    at_near, at_far = function(near), function(far)
    finite = torch.isfinite(at_near) & torch.isfinite(at_far)
    change = torch.where(finite, at_far, 0.0) - torch.where(finite, at_near, 0.0)
    return values + t.unsqueeze(-1) * change


# --------------------------------------------------------------------- weighted point sets
def _point_statistics(family, points, log_w, wanted, standard_errors: bool, residuals=None):
    """Normaliser and moments of the measure ``sum_i exp(log_w_i) delta(points_i)``.

    ``points``: ``(P,) + batch + event``; ``log_w``: ``(P,) + batch``. With ``standard_errors`` the
    errors are the self-normalised importance-sampling (delta-method) standard errors for i.i.d.
    points; otherwise they are zero (the caller supplies them). ``residuals`` (shaped as ``points``): where the
    points stand for ``points + residuals``, beyond float64's resolution there (the mean and variance use them).
    """
    log_total = torch.logsumexp(log_w, dim=0)
    pi = torch.exp(log_w - log_total)
    event_dims = len(family.event_shape)
    pi_e = pi.reshape(pi.shape + (1,) * event_dims)
    zeros = torch.zeros_like
    out = {}
    if family.circular or "expected_statistic" in wanted:
        stat = family.sufficient_statistic(points)
        pi_s = pi.unsqueeze(-1)
        # relative to the heaviest point's statistic, as the mean below: a float32 Poisson pool at rates of 1e6
        # summed E[z] 4690 off (its mean, centred, was right)
        index = log_w.argmax(0, keepdim=True).reshape((1,) + pi.shape[1:] + (1,))
        reference = stat.gather(0, index.expand((1,) + stat.shape[1:]))
        reference = torch.where(torch.isfinite(reference), reference, 0.0)  # (log z at an edge of the support)
        mean_stat = reference[0] + (pi_s * (stat - reference)).sum(0)
        err = ((pi_s**2 * (stat - mean_stat) ** 2).sum(0)).sqrt() if standard_errors else zeros(mean_stat)
        out["expected_statistic"] = Estimate(mean_stat, err)
    if family.circular and wanted & {"mean", "variance"}:
        mean, variance = family.moments_from_statistic(*out["expected_statistic"])
        out["mean"], out["variance"] = Estimate(*mean), Estimate(*variance)
        return log_total, out
    if wanted & {"mean", "variance", "covariance"}:
        # relative to the heaviest point: points far from zero (1e6 +- 1) would otherwise lose to the sum's rounding
        # digits their spread has
        heaviest = points.gather(0, log_w.argmax(0, keepdim=True).reshape((1,) + pi.shape[1:] + (1,) * event_dims)
                                 .expand((1,) + points.shape[1:]))[0]
        shifted = points - heaviest if residuals is None else (points - heaviest) + residuals
        offset = (pi_e * shifted).sum(0)
        mean = heaviest + offset
        # deviations from the mean before its rounding: about the rounded mean the variance gains that rounding
        # squared (2.5e-9 for a pool at 1e12, where the spacing is 1.2e-4, beyond the quadrature's stated error)
        dev = shifted - offset
        sq = dev * dev
        variance = (pi_e * sq).sum(0)
        if standard_errors:
            mean_err = (pi_e**2 * sq).sum(0).sqrt()
            var_err = (pi_e**2 * (sq - variance) ** 2).sum(0).sqrt()
        else:
            mean_err, var_err = zeros(mean), zeros(variance)
        out["mean"] = Estimate(mean, mean_err)
        out["variance"] = Estimate(variance, var_err)
        if "covariance" in wanted:
            scaled = dev * pi_e.sqrt()
            cov = torch.einsum("p...i,p...j->...ij", scaled, scaled)
            if standard_errors:
                a = dev * pi_e
                b = sq * pi_e
                second = torch.einsum("p...i,p...j->...ij", b, b)
                cross = torch.einsum("p...i,p...j->...ij", a, a)
                sum_pi2 = (pi**2).sum(0)[..., None, None]
                cov_err = (second - 2 * cov * cross + cov * cov * sum_pi2).clamp_min(0).sqrt()
            else:
                cov_err = zeros(cov)
            out["covariance"] = Estimate(cov, cov_err)
    return log_total, out


def check_other_log_prob(values, mass) -> None:
    """Raises unless ``other``'s log-density ``values`` is a number or ``-inf`` (outside its support) at every
    point of positive ``mass`` (arrays or tensors of one shape): NaN and ``+inf`` there have no expectation."""
    values, positive = torch.as_tensor(values), torch.as_tensor(mass) > 0
    for bad, what in ((torch.isnan(values), "NaN"), (values == math.inf, "+inf")):
        if bool((bad & positive).any()):
            raise ValueError(f"other.log_prob returned {what} on the pool's support; the expectation needs other's "
                             "log-density (a number, or -inf outside its support) wherever the pool has mass")


def rounded(est: Estimate | None) -> Estimate | None:
    """``est`` with the rounding of its value to its dtype added to its error, an ulp of a finite value: a float32
    result of a float64 computation is off by up to half an ulp, far more than the float64 rule's error, and a
    float64 result whose rules agree exactly is still off by its last rounding (log 2 + 1.1e-16 with error 0 from
    the grid at alpha = inf)."""
    if est is None or not est.value.is_floating_point():
        return est
    value = est.value
    ulp = torch.finfo(value.dtype).eps * torch.where(torch.isfinite(value), value.abs(), 0.0)
    return Estimate(value, est.error + ulp)


def in_dtype(est: PoolEstimate, dtype: torch.dtype) -> PoolEstimate:
    """``est``, computed in float64, with its values and errors in ``dtype`` (each error gaining the rounding,
    :func:`rounded`); the weighted points behind it stay in float64."""
    if est.log_normalizer.value.dtype == dtype:
        return est
    def cast(e):
        return None if e is None else rounded(Estimate(e.value.to(dtype), e.error.to(dtype)))
    fields = ("log_normalizer", "mean", "variance", "covariance", "expected_statistic")
    ess = est.effective_sample_size
    return replace(est, **{name: cast(getattr(est, name)) for name in fields},
                   effective_sample_size=None if ess is None else ess.to(dtype))


def _finish(method, error_kind, log_z, log_z_err, stats, wanted, **extra) -> PoolEstimate:
    """The estimate, each error with the rounding of its value to the dtype it is returned in (:func:`rounded`)."""
    return PoolEstimate(method=method, error_kind=error_kind, log_normalizer=rounded(Estimate(log_z, log_z_err)),
                        **{name: rounded(stats.get(name)) for name in ("mean", "variance", "covariance",
                                                                         "expected_statistic") if name in wanted},
                        **extra)


# --------------------------------------------------------------------------- enumeration
def enumerate_support(family, params, log_weights, alpha):
    """The discrete support: its ``values`` ``(K,) + event_shape``, the same broadcast to points
    ``(K,) + batch + event_shape``, the pool's unnormalised log-density there ``(K,) + batch``, and the
    family's tail bound (see ``support_values``)."""
    values, tail_bound = family.support_values(params)
    batch = params.shape[: params.dim() - len(family.param_shape) - 1]
    pools, experts = math.prod(batch), params.shape[len(batch)]
    if values.shape[0] * pools * experts > MAX_ENUMERATED:
        raise ValueError(f"the pools' support spans {values.shape[0]} points (from {float(values[0].min()):.6g} to "
                         f"{float(values[-1].max()):.6g}), for {pools} pool(s) of {experts} {family.name} experts: "
                         f"{values.shape[0] * pools * experts} values, more than opinionpool.numerical.MAX_ENUMERATED "
                         f"= {MAX_ENUMERATED} (about 100 bytes each); pool fewer at once or raise the limit")
    points = values.reshape(values.shape[:1] + (1,) * len(batch) + values.shape[1:])
    points = points.expand(values.shape[:1] + batch + values.shape[1:])
    log_u = log_power_mean(expert_log_probs(family, params, points), log_weights, alpha)
    return values, points, log_u, tail_bound


def enumeration_estimate(family, params, log_weights, alpha, wanted, keep_nodes: bool = False) -> PoolEstimate:
    _, points, log_u, tail_bound = enumerate_support(family, params, log_weights, alpha)
    log_z, stats = _point_statistics(family, points.to(params.dtype), log_u, wanted, standard_errors=False)
    # u <= max_j q_j <= sum_j q_j, so the left-out mass, mean and second moment are within the bound; and every
    # point's log u rounds by a few ulps of the terms its experts' log q add (of order r log r for a Poisson of
    # rate r: at 1e4 an error of 1e-13 in log Z, which a stated error of 0 made contradict the exact bracket)
    # (an expert of probability zero at a point adds no term there, and a point of u = 0 no rounding: their sizes,
    # inf or NaN, made every error NaN)
    with torch.no_grad():
        event_dims = len(family.event_shape)
        sizes = family.log_prob_term_size(params, points.unsqueeze(points.dim() - event_dims))
        term_size = torch.where((log_weights > -math.inf) & torch.isfinite(sizes), sizes, 0.0).amax(-1)
        precision = torch.finfo(log_u.dtype).eps / torch.finfo(torch.float64).eps
        mass = (log_u - log_z).exp()
        per_point = torch.where(mass > 0, mass * precision * _TERM_ROUNDING * (1 + log_u.abs() + term_size), 0.0)
        rounding = per_point.sum(0)
        # (relative to Z in log space: Z below e^-745 gave 0 / 0, and every stated error NaN)
        tail = torch.where(tail_bound > 0, (torch.log(tail_bound) - log_z).exp(), tail_bound)  # (NaN stays NaN)
        # a relative rounding r_k of point k's weight moves an expectation E f by sum_k pi_k r_k |f_k - E f|, not by
        # the rounding of log Z scaled by (1 + |mean|)^2 (49171 for a true 1.6e-7 at Poisson rates of 1e6; E T was
        # given the bare relative rounding, 3 times too small there)
        deviations = {}
        if "mean" in stats or "variance" in stats:
            values = points.to(params.dtype)
            mean = stats["mean"].value if "mean" in stats else (mass.reshape(mass.shape + (1,) * event_dims)
                                                                 * values).sum(0)
            centred = values - mean
            deviations["mean"] = centred.abs()
            if "variance" in stats:
                deviations["variance"] = (centred ** 2 - stats["variance"].value).abs()
        if "expected_statistic" in stats:
            statistic = family.sufficient_statistic(points.to(params.dtype))
            deviations["expected_statistic"] = (statistic - stats["expected_statistic"].value).abs()
    relative = tail + rounding
    spread = (1 + stats["mean"].value.abs()) ** 2 if "mean" in stats else 1
    for name, est in stats.items():
        if name in deviations:
            weight = per_point.reshape(per_point.shape + (1,) * (deviations[name].dim() - per_point.dim()))
            tail_part = tail.reshape(tail.shape + (1,) * (est.value.dim() - tail.dim()))
            bound = tail_part * (spread if name != "expected_statistic" else (1 + est.value.abs()) ** 2) \
                + torch.where(weight > 0, weight * deviations[name], 0.0).sum(0)
        else:
            bound = relative * spread if name in ("mean", "variance") else relative
        extra = est.value.dim() - bound.dim()
        stats[name] = Estimate(est.value, bound.reshape(bound.shape + (1,) * extra).expand(est.value.shape))
    kind = "truncation bound" if bool((tail_bound > 0).any()) else "rounding bound"
    return _finish("enumeration", kind, log_z, relative, stats, wanted, nodes=(points, log_u) if keep_nodes else None)


# ---------------------------------------------------------------------------- quadrature
def _in_float64(params, log_weights):
    """``params`` and ``log_weights`` in float64 for the deterministic rules, the weights renormalised: a lower
    precision's weights sum to one only to its rounding, which would move ``log Z`` by ``log(sum) / alpha``."""
    log_weights = log_weights.detach().to(torch.float64)
    return params.detach().to(torch.float64), log_weights - torch.logsumexp(log_weights, -1, keepdim=True)


def _each_pool(family, params, log_weights):
    """The batch shape and the ``(params, log_weights)`` of every pool in it, for methods that work one pool at a time."""
    batch = params.shape[: params.dim() - len(family.param_shape) - 1]
    flat_params = params.reshape((-1,) + params.shape[len(batch):])
    flat_lw = log_weights.expand(batch + log_weights.shape[-1:]).reshape(-1, log_weights.shape[-1])
    return batch, list(zip(flat_params, flat_lw))


def _stack_pools(method, rows, batch, wanted, **extra) -> PoolEstimate:
    """One ``PoolEstimate`` from per-pool dictionaries of ``Estimate`` s (quadrature-type errors)."""
    def stack(name, field):
        values = torch.stack([getattr(r[name], field) for r in rows])
        return values.reshape(batch + values.shape[1:])

    stats = {name: Estimate(stack(name, "value"), stack(name, "error")) for name in rows[0] if name != "log_normalizer"}
    return _finish(method, "quadrature error estimate", stack("log_normalizer", "value"),
                   stack("log_normalizer", "error"), stats, wanted, **extra)


#: the standard deviations, and the sums |mean| + standard deviation, of the experts that the scalar quadrature
#: resolves in float64: beyond, the variable's squares over- or underflow in the pool's moments and their error
#: bars, or its nodes cannot resolve an expert far from 0 (NaN error bars from 1e+-150, a mean wrong by 10 % at
#: 1e140, Gamma pools at rates of 1e300 with log Z 25 % off); a margin of 40 orders of magnitude below those
QUADRATURE_RANGE = (1e-100, 1e100)
#: the smallest ratio of an expert's standard deviation to its |mean| that the scalar quadrature resolves: the
#: standard deviation then spans at least 64 float64 spacings at the mean, where the rule's nodes are corrected for
#: their rounding (down to 220 spacings tested). Beyond, the nodes fall on a grid as coarse as the expert: at
#: 1e-18 (a spacing of 128 standard deviations) identical Normal experts came back with log Z -0.92 +- 2e-16 (true 0)
#: for alpha = -1
QUADRATURE_MIN_RELATIVE_SD = 2.0**-46


def check_quadrature_range(family, params, log_weights) -> None:
    """A ``ValueError`` naming the first present expert (``params`` ``(..., M) + param_shape``, of finite
    ``log_weights`` ``(..., M)``) outside ``QUADRATURE_RANGE`` or narrower than ``QUADRATURE_MIN_RELATIVE_SD`` of its
    |mean|, for the scalar families whose moments are known without quadrature; an expert of infinite variance (a
    heavy tail) is not checked: the engine places it by its density at the mean (``_expert_moments``)."""
    if family.circular or not family.has_numeric_moments or not getattr(family, "has_variance", True):
        return
    wide = params.detach().to(torch.float64)
    mean, variance = family.mean(wide), family.variance(wide)
    sd = variance.sqrt()
    smallest, largest = QUADRATURE_RANGE
    checked = torch.isfinite(log_weights.detach()) & (variance != math.inf)
    resolved = (sd >= smallest) & (sd >= QUADRATURE_MIN_RELATIVE_SD * mean.abs()) & (mean.abs() + sd <= largest)
    outside = checked & ~resolved  # NaN is outside
    if bool(outside.any()):
        index = tuple(int(i) for i in outside.nonzero()[0])
        raise ValueError(f"{family.name}: an expert of mean {mean[index].item():.3g} and standard deviation "
                         f"{sd[index].item():.3g} (params={params[index].tolist()!r}) is outside what the numerical "
                         f"engine resolves in float64 (standard deviations from {smallest:g} and from "
                         f"{QUADRATURE_MIN_RELATIVE_SD:.3g} of |mean|, |mean| + standard deviation up to "
                         f"{largest:g}): pool the experts of a rescaled or shifted variable")


def quadrature_estimate(family, params, log_weights, alpha, wanted, rtol: float = DEFAULT_RTOL,
                        keep_nodes: bool = False) -> PoolEstimate:
    """Adaptive Gauss–Legendre quadrature (see :func:`_quadrature_one`) in float64 whatever the experts' dtype (the
    results come back in that dtype): every pool of the batch at once (:func:`_quadrature_batch`) for finite
    ``alpha`` and families with closed-form moments, one pool at a time otherwise. Experts outside
    ``QUADRATURE_RANGE`` are refused (``check_quadrature_range``)."""
    check_quadrature_range(family, params, log_weights)
    batch, pools = _each_pool(family, *_in_float64(params, log_weights))
    if not _batched_supported(family, alpha):
        rows, nodes, gradient_nodes, evaluations = [], [], [], 0
        for p, lw in pools:
            row, points, log_w, count, gradient = _quadrature_one(family, p, lw, alpha, wanted, rtol)
            rows.append({name: Estimate(*(torch.as_tensor(v, dtype=params.dtype, device=params.device) for v in pair))
                         for name, pair in row.items()})
            nodes.append((points, log_w))
            gradient_nodes.append(tuple(v.unsqueeze(1) for v in gradient))
            evaluations += count
        est = _stack_pools("quadrature", rows, batch, wanted, num_evaluations=evaluations)
        if not keep_nodes:
            return est
        return replace(est, nodes=_pad_nodes(nodes, batch, params.device),
                       gradient_nodes=_join_node_sets(gradient_nodes, batch, params.device))
    flat_params = torch.stack([p for p, _ in pools]).cpu()
    flat_lw = torch.stack([lw for _, lw in pools]).cpu()
    parts, nodes, evaluations = [], [], 0
    for start in range(0, len(pools), _BATCH_POOLS):
        chunk = slice(start, start + _BATCH_POOLS)
        log_z, relative, limit, centre, spread, stats, chunk_nodes, count, ok = _quadrature_batch(
            family, flat_params[chunk], flat_lw[chunk], alpha, wanted, rtol)
        if not bool(ok.all()):  # u vanishes numerically: the one-pool rule raises its error
            index = int((~ok).nonzero()[0, 0])
            _quadrature_one(family, flat_params[chunk][index], flat_lw[chunk][index], alpha, wanted, rtol)
        _check_normalisable(limit[:, 0])
        out = {"log_normalizer": Estimate(log_z, relative[:, 0])}
        if "mean" in stats:  # errors as in _quadrature_one, from the integrands' relative errors
            mean, variance = stats["mean"].value, stats["variance"].value
            tbar = ((mean - centre) / spread).abs()
            out["mean"] = Estimate(mean, spread * (relative[:, 1] + tbar * relative[:, 0]))
            out["variance"] = Estimate(variance, spread**2 * (relative[:, 2] + 2 * tbar * relative[:, 1]
                                                              + (tbar**2 + variance / spread**2) * relative[:, 0]))
            out["mean"], out["variance"] = _diverged_moments(out["mean"], out["variance"], limit[:, 1], limit[:, 2])
        if "expected_statistic" in stats:
            value = stats["expected_statistic"].value
            out["expected_statistic"] = _diverged(Estimate(value, relative[:, 3:] + value.abs() * relative[:, :1]),
                                                  limit[:, 3:])
        parts.append(out)
        nodes.append(chunk_nodes)
        evaluations += count

    def joined(name, field):
        value = torch.cat([getattr(part[name], field) for part in parts])
        return value.reshape(batch + value.shape[1:]).to(device=params.device, dtype=params.dtype)

    stats = {name: Estimate(joined(name, "value"), joined(name, "error")) for name in parts[0]}
    log_normalizer = stats.pop("log_normalizer")
    est = _finish("quadrature", "quadrature error estimate", *log_normalizer, stats, wanted,
                  num_evaluations=evaluations)
    if not keep_nodes:
        return est
    size = max(points.shape[0] for points, _, _ in nodes)
    points = torch.cat([torch.cat((z, z[:1].expand(size - len(z), -1)))for z, _, _ in nodes], 1)
    log_w = torch.cat([torch.cat((lw, torch.full((size - len(lw), lw.shape[1]), -math.inf, dtype=lw.dtype)))
                       for _, lw, _ in nodes], 1)
    return replace(est, nodes=(points.reshape((size,) + batch).to(params.device),
                               log_w.reshape((size,) + batch).to(params.device)),
                   gradient_nodes=_join_node_sets([gradient for _, _, gradient in nodes], batch, params.device))


def quadrature_log_mass(family, params, log_weights, alpha, lower: float, upper: float, rtol: float = DEFAULT_RTOL):
    """``log int_lower^upper u`` of one pool (``params`` ``(M,) + param_shape``, float64) and its relative error
    estimate, by the adaptive rule of :func:`_quadrature_one`; ``-inf`` where ``u`` vanishes numerically on the
    whole interval (a tail far beyond the pool's mass). Ends inside the support are ordinary points of ``u``, so an
    interval narrow next to its ends keeps its digits (its weights sum to ``upper - lower``, a difference of floats)."""
    if not upper > lower:
        return -math.inf, 0.0
    try:
        row = _quadrature_one(family, params, log_weights, alpha, frozenset(), rtol, interval=(lower, upper))[0]
    except _VanishingPool:  # u underflows at every point scanned in the interval
        return -math.inf, 0.0
    return row["log_normalizer"]


def _join_node_sets(sets, batch, device):
    """Gradient node sets ``[(points, log_w, t, near, far)]`` of consecutive pools, each tensor ``(P_i, B_i)``, as one
    set of ``(P,) + batch`` tensors, padded as :func:`_pad_nodes` pads (the set's first point, weight zero, ``t = 0``)."""
    size = max(part[0].shape[0] for part in sets)
    joined = []
    for k in range(5):
        pieces = []
        for part in sets:
            extra = size - part[0].shape[0]
            fill = part[0][:1].expand(extra, -1) if k in (0, 3, 4) else \
                torch.full((extra, part[k].shape[1]), -math.inf if k == 1 else 0.0, dtype=part[k].dtype)
            pieces.append(torch.cat((part[k], fill)))
        joined.append(torch.cat(pieces, 1).reshape((size,) + batch).to(device))
    return tuple(joined)


def _pad_nodes(nodes, batch, device):
    """Per-pool node sets ``[(points (P_i,) + event, log_w (P_i,))]`` as one ``(P,) + batch + event`` set, padded
    with each pool's first point at weight zero."""
    size = max(points.shape[0] for points, _ in nodes)
    padded_points, padded_log_w = [], []
    for points, log_w in nodes:
        extra = size - points.shape[0]
        padded_points.append(torch.cat((points, points[:1].expand((extra,) + points.shape[1:]))))
        padded_log_w.append(torch.cat((log_w, torch.full((extra,), -math.inf, dtype=log_w.dtype))))
    points = torch.stack(padded_points, dim=1)
    log_w = torch.stack(padded_log_w, dim=1)
    return (points.reshape((size,) + batch + points.shape[2:]).to(device), log_w.reshape((size,) + batch).to(device))


def _quadrature_one(family, params, log_weights, alpha, wanted, rtol, interval=None, extra=None):
    """One pool's normaliser and moments from a positive rule ``sum_i w_i u(z_i)`` built adaptively (over
    ``interval``, a part ``(lower, upper)`` of the support, when given: the mass there, for the cdf; with
    ``extra``, a function of a float64 array of points returning its values and their absolute errors, also
    ``E_pool[extra]`` as ``"extra"``, its error gaining the values' expected error).

    The line is first split where the pool's mass can be: around every present expert (its mean +- up to
    64 of its standard deviations), where the largest (``alpha = inf``) or smallest (``-inf``) expert
    changes, and around the pool's highest point, found by scanning the experts' span and refining with
    Brent's method (for ``alpha < 0`` the pool can sit far from every expert, narrower than all of them),
    with edges where ``log u`` has dropped by 0.5 ... 128. Infinite tails beyond the outer edges are mapped
    logarithmically onto ``[0, 1]`` (``_TAIL_REACH``), and what lies beyond their reach bounded
    (:func:`_tail_remainders`). Every panel's 10-point Gauss–Legendre rule on its two halves is compared with the 10- and
    7-point rules on the whole panel, and the worst panels bisected until the total difference, for the
    integrands ``u``, ``u t``, ``u t^2`` (``t`` the standardised variable) and ``u T(z)`` when asked, is at
    most ``rtol`` of each integral of ``|.|``. Everything is evaluated in log-space relative to the largest
    ``log u`` seen, so experts hundreds of standard deviations apart neither overflow nor vanish.

    Returns the per-quantity ``(value, error)`` pairs, the final rule's nodes and log-masses
    ``log w_i + log u(z_i)`` (float64 tensors), and the number of evaluations of ``u``.
    """
    lower, upper = family.support_interval if interval is None else interval
    present = log_weights > -math.inf
    mu, var = _expert_moments(family, params[present])
    mu = mu.to(torch.float64).cpu().numpy()
    sd = np.sqrt(np.maximum(var.to(torch.float64).cpu().numpy(), 0.0))
    sd = _placement_scale(mu, sd)
    fill = _interior_point(*torch.tensor([lower, upper], dtype=torch.float64)).item()
    # an end of ``interval`` inside the support is an ordinary point of u: the rule's points may round onto it
    support = family.support_interval or (-math.inf, math.inf)
    lower_closed, upper_closed = support[0] < lower, upper < support[1]
    count = 0

    def log_u(z: np.ndarray, experts: bool = False, whole_support=False):
        """``log u(z)``, ``-inf`` outside the interval (``whole_support``, a flag or one per point: the open
        support); with ``experts`` also the present experts' ``log q_j``."""
        nonlocal count
        z = np.asarray(z, dtype=np.float64)
        in_interval = ((z >= lower) if lower_closed else (z > lower)) & ((z <= upper) if upper_closed else (z < upper))
        inside = (z > support[0]) & (z < support[1]) & (whole_support | in_interval)
        value = torch.as_tensor(np.where(inside, z, fill), device=params.device)
        with torch.no_grad():
            ell = expert_log_probs(family, params, value)
            out = np.where(inside, log_power_mean(ell, log_weights, alpha).cpu().numpy(), -math.inf)
        count += z.size
        return (out, ell[..., present].cpu().numpy()) if experts else out

    edges, shift, outer_switches = _quadrature_edges(log_u, mu, sd, lower, upper, alpha)
    # an end of the support where u is singular (or not negligible) gets a ladder and an end panel, as in
    # _quadrature_batch (given one at an end of the interval inside the support, the panel's exact reach and its
    # rounded edge disagreed by up to half an ulp of the end, and its nearest point dropped the mass below it);
    # a kink of u between the edges and the end splits the ladder there, or the shallow end panel at its variable
    end_of_kind, end_splits = {}, {}
    inner = edges[(edges > lower) & (edges < upper)]
    for sign, end in ((1.0, lower), (-1.0, upper)):
        if end in support and math.isfinite(end):
            # the power laws are fitted on the support, within the experts' distance to the end, however narrow the
            # interval (one of two floats next to a Beta's singular end at 1 had no mass; one within 1e-300 of 0 a
            # law fitted within itself, 0.3 nats off); an interval within four nearest points of the end is all end
            # panel, the rest as far as the nearest edge inside it
            width = sign * ((upper if sign > 0 else lower) - end)
            experts_gap = width
            if interval is not None:  # the experts' span on the support: where the pool can stop following its laws
                span = _expert_points(mu, sd, *support)
                experts_gap = sign * ((span.min() if sign > 0 else span.max()) - end)
            narrow = width <= 4 * _nearest_point(end, torch.tensor([max(width, experts_gap)], dtype=torch.float64))
            nearest_edge = (inner.min() if sign > 0 else inner.max()) if len(inner) and not narrow else end + sign * width
            gap = sign * (nearest_edge - end)
            fit_gap = torch.tensor([max(gap, experts_gap) if interval is not None else gap], dtype=torch.float64)
            geometry, ladder = _end_panel_geometry(
                lambda z: torch.as_tensor(log_u(z.numpy(), whole_support=True)), sign, end,
                torch.tensor([gap], dtype=torch.float64), shift,
                lambda z: torch.as_tensor(log_u(z.numpy(), experts=True, whole_support=True)[1]),
                log_weights[present].unsqueeze(0), alpha, fit_gap=fit_gap)
            kinks = sign * (outer_switches - end)
            kinks = kinks[(kinks > 0) & (kinks < gap)]
            if bool(geometry.steep[0]):
                ladder = ladder[0].numpy()
                edges = edges[sign * (edges - end) >= float(geometry.reach[0])]  # the end panel's part is its own
                edges = np.unique(np.concatenate((edges, ladder[~np.isnan(ladder)])))
                end_of_kind[2 * sign] = end_of_kind[3 * sign] = (end, geometry)
                reach, power = float(geometry.reach[0]), float(geometry.power[0])
                shallow = kinks[(kinks < reach) & (kinks > float(geometry.deep_top()[0]))]
                end_splits[2 * sign] = np.sort((shallow / reach) ** power)
                end_splits[3 * sign] = _deep_kinks(geometry) if math.isinf(alpha) else np.zeros(0)
                kinks = kinks[kinks >= reach]
            edges = np.unique(np.concatenate((edges, end + sign * kinks)))
    expert_weights = np.exp(log_weights[present].cpu().numpy())
    expert_centre = float((expert_weights * mu).sum() / expert_weights.sum())
    # panels in x-space: kind 0 is z = x; kind +-1 the tail z = origin +- scale expm1(reach x), x in [0, 1]; kind
    # +-2 the shallow end panel of the lower (upper) end, x in [shallow_start, 1], and +-3 its deep one, x in [0, 1]
    a, b = edges[:-1], edges[1:]
    kind, origin = np.zeros(a.shape), np.zeros(a.shape)
    tails, tail_map = [], {}  # tail_map: kind -> (scale, reach)
    for sign, bound, end in ((-1.0, lower, edges[0]), (1.0, upper, edges[-1])):
        if math.isinf(bound):
            scale = _tail_scale(*(torch.tensor([v], dtype=torch.float64) for v in (sd.max(), end, expert_centre)))
            reach = _tail_reach(scale)
            tail_x = np.unique(_tail_edges(reach)[0].numpy())
            a = np.concatenate((a, tail_x[:-1]))
            b = np.concatenate((b, tail_x[1:]))
            kind = np.concatenate((kind, np.full(len(tail_x) - 1, sign)))
            origin = np.concatenate((origin, np.full(len(tail_x) - 1, end)))
            tail_map[sign] = (float(scale[0]), float(reach[0]))
            tails.append((torch.tensor([sign], dtype=torch.float64), torch.tensor([end], dtype=torch.float64),
                          scale, reach, torch.tensor([expert_centre], dtype=torch.float64)))
    (lower_scale, lower_reach), (upper_scale, upper_reach) = (tail_map.get(sign, (1.0, 1.0)) for sign in (-1.0, 1.0))
    for end_kind, (end, geometry) in end_of_kind.items():
        start = 0.0 if abs(end_kind) == 3 else float(geometry.shallow_start()[0])
        cuts = np.concatenate(([start], end_splits.get(end_kind, np.zeros(0)), [1.0]))
        a, b = np.append(a, cuts[:-1]), np.append(b, cuts[1:])
        kind, origin = np.append(kind, np.full(len(cuts) - 1, end_kind)), np.append(origin, np.full(len(cuts) - 1, end))

    gl_t, gl_w = np.polynomial.legendre.leggauss(_GL_ORDER)
    low_t, low_w = np.polynomial.legendre.leggauss(_GL_ORDER - 3)
    whole_t, whole_w = np.concatenate((gl_t, low_t)), np.concatenate((gl_w, low_w))
    half_t = np.concatenate((0.5 * gl_t - 0.5, 0.5 * gl_t + 0.5))  # the two halves' nodes on [-1, 1]
    half_w = np.concatenate((0.5 * gl_w, 0.5 * gl_w))
    both_t = np.concatenate((whole_t, half_t))

    def panel_nodes(a, b, kind, origin, t, w, laws=False):
        """The nodes, their log weights and rounding; with ``laws`` instead their :meth:`_EndPanel.laws`."""
        x = 0.5 * (a + b)[:, None] + 0.5 * (b - a)[:, None] * t
        tail = np.abs(kind[:, None]) == 1
        upper_side = kind[:, None] > 0
        scale, reach = np.where(upper_side, upper_scale, lower_scale), np.where(upper_side, upper_reach, lower_reach)
        y = np.where(tail, reach * x, 0.0)
        z = np.where(tail, origin[:, None] + kind[:, None] * scale * np.expm1(y), x)
        log_jac = np.where(tail, np.log(scale * reach) + y, 0.0)
        rounding = np.zeros(x.shape)
        law = [np.zeros(x.shape), z.copy(), z.copy()]
        for end_kind, (end, geometry) in end_of_kind.items():
            at_end = kind == end_kind
            if at_end.any():
                z_end, log_jac_end, rounding_end, law_end = geometry.nodes(
                    torch.zeros(1, dtype=torch.long), end, math.copysign(1.0, end_kind),
                    torch.as_tensor(x[at_end]).unsqueeze(0), deep=abs(end_kind) == 3, laws=True)
                z[at_end], log_jac[at_end], rounding[at_end] = (v[0].numpy() for v in (z_end, log_jac_end, rounding_end))
                for part, value in zip(law, law_end):
                    part[at_end] = value[0].numpy()
        if laws:
            return law
        with np.errstate(divide="ignore"):  # a panel its edges' rounding left empty has no mass
            return z, np.log(0.5 * (b - a))[:, None] + np.log(w) + log_jac, rounding

    end_exponent = {k: float(geometry.exponent[0]) for k, (_, geometry) in end_of_kind.items()}

    def evaluate(a, b, kind, origin):
        z_whole, lw_whole, rounding_whole = panel_nodes(a, b, kind, origin, whole_t, whole_w)
        z_half, lw_half, rounding_half = panel_nodes(a, b, kind, origin, half_t, half_w)
        z = np.concatenate((z_whole, z_half), axis=1)
        # end-panel nodes lie inside the interval or, extrapolated, at the nearest point, which may be outside it
        at_end = np.broadcast_to((np.abs(kind) >= 2)[:, None], z.shape)
        lu = log_u(z.ravel(), whole_support=at_end.ravel()).reshape(z.shape)
        # the neighbouring floats of a node at an end of the interval lie outside it, not outside the support
        log_u_of = lambda p: torch.as_tensor(log_u(p.numpy().ravel(), whole_support=True).reshape(p.shape))  # noqa: E731
        residual = correction = doubt = np.zeros(z.shape)
        found = _rounding_correction(log_u_of, *(torch.as_tensor(v) for v in (a, b, kind, both_t, z, lu)))
        if found is not None:
            residual, correction, doubt = (v.numpy() for v in found)
        per_node = [np.broadcast_to(v[:, None], z.shape) for v in
                    (np.sign(kind), origin, np.array([end_exponent.get(k, 0.0) for k in kind]))]
        end_correction = _end_rounding_correction(
            log_u_of, *(torch.as_tensor(np.ascontiguousarray(v)) for v in
                        (z, lu, np.concatenate((rounding_whole, rounding_half), axis=1), *per_node)))
        if end_correction is not None:
            correction = correction + end_correction.numpy()
        lu = lu + correction
        whole = len(whole_t)
        return (z_whole, lw_whole + lu[:, :whole], z_half, lw_half + lu[:, whole:], residual[:, :whole],
                residual[:, whole:], correction[:, whole:], doubt[:, whole:])

    want_stat = family.circular or "expected_statistic" in wanted
    want_entropy = "entropy" in wanted

    def integrands(z, residual):
        """``(P, n, K)``: 1, t, t^2 (t standardised by the current estimate, at the exact nodes ``z + residual``),
        T(z) and log u(z) when asked."""
        t = ((z - centre) + residual) / spread
        big = np.finfo(np.float64).max  # finite, as in _quadrature_batch
        with np.errstate(over="ignore"):
            parts = [np.stack([np.ones_like(z), np.clip(t, -big, big), np.minimum(t * t, big)], -1)]
        if want_stat:
            stat = family.sufficient_statistic(torch.as_tensor(z.ravel())).reshape(z.shape + (-1,))
            parts.append(stat.to(torch.float64).cpu().numpy())
        if want_entropy:  # log u is singular where u vanishes (z log z at a Gamma's origin): it needs its own control
            lu = log_u(z.ravel()).reshape(z.shape)
            parts.append(np.where(np.isfinite(lu), lu, 0.0)[..., None])
        if extra is not None:  # -inf (outside other's support) is counted below, by the nodes' mass there
            values = extra(z.ravel())[0].reshape(z.shape)
            # NaN or +inf raise after the last round where they have mass (check_other_log_prob); massless, they
            # would only turn the rules' comparisons into NaN
            parts.append(np.where(np.isfinite(values), values, 0.0)[..., None])
        return np.concatenate(parts, -1)

    nodes_state = evaluate(a, b, kind, origin)
    w, centre = expert_weights, expert_centre
    spread = float(np.sqrt((w * (sd**2 + (mu - centre) ** 2)).sum() / w.sum()))
    for round_ in itertools.count():
        z_whole, lm_whole, z_half, lm_half, r_whole, r_half, c_half, doubt_half = nodes_state
        # the nodes' largest log mass, not log u's: an interval of one subnormal float has masses of 1e-84 where u is
        # 1e259, which exp(log mass - max log u) underflows
        largest = max(float(lm_half.max()), float(lm_whole.max()))
        shift = largest if math.isfinite(largest) else shift
        m_whole, m_half = np.exp(lm_whole - shift), np.exp(lm_half - shift)
        total = m_half.sum()
        if not total > 0:
            raise _VanishingPool("the pooled density vanishes numerically wherever the experts put their mass "
                             f"(alpha={alpha!r}); the pool is not normalisable numerically")
        pi = m_half / total
        centre_new = float((pi * (z_half + r_half)).sum())
        spread_sq = float((pi * ((z_half - centre_new) + r_half) ** 2).sum())
        if spread_sq > 0 and math.isfinite(spread_sq):
            centre, spread = centre_new, math.sqrt(spread_sq)
        g_whole, g_half = integrands(z_whole, r_whole), integrands(z_half, r_half)
        i_whole = m_whole[..., None] * g_whole
        i_high, i_low = i_whole[:, :_GL_ORDER].sum(1), i_whole[:, _GL_ORDER:].sum(1)
        i_half = (m_half[..., None] * g_half).sum(1)
        scale = (m_half[..., None] * np.abs(g_half)).sum((0, 1))
        # two comparisons: one alone can agree by accident (e.g. at the kink of a max or min of densities)
        diff = np.maximum(np.abs(i_high - i_half), np.abs(i_low - i_half))
        panel_error = (diff / np.where(scale > 0, scale, 1.0)).max(-1)
        error = panel_error.sum()
        if error <= rtol or len(a) >= _MAX_PANELS or round_ >= _MAX_ROUNDS:
            break
        # bisect the worst panels until the others' errors add up to at most rtol / 4 (panels at the
        # resolution of float64 cannot be split further)
        splittable = (b - a) > 1e-13 * np.maximum(np.abs(a), np.abs(b)) + 1e-300
        order = np.argsort(-np.where(splittable, panel_error, -1.0))
        needed = error - rtol / 4
        chosen = order[: int(np.searchsorted(np.cumsum(panel_error[order]), needed)) + 1]
        chosen = chosen[splittable[chosen]]
        if len(chosen) == 0:
            break
        keep = np.ones(len(a), dtype=bool)
        keep[chosen] = False
        mid = _split_points(a[chosen], b[chosen], kind[chosen])
        na = np.concatenate((a[chosen], mid))
        nb = np.concatenate((mid, b[chosen]))
        nk = np.concatenate((kind[chosen], kind[chosen]))
        no = np.concatenate((origin[chosen], origin[chosen]))
        new = evaluate(na, nb, nk, no)
        a, b, kind, origin = (np.concatenate((x[keep], y)) for x, y in ((a, na), (b, nb), (kind, nk), (origin, no)))
        nodes_state = [np.concatenate((x[keep], y)) for x, y in zip(nodes_state, new)]

    points = torch.as_tensor(z_half.ravel())
    log_mass = torch.as_tensor(lm_half.ravel())
    relative = diff.sum(0) / total  # per integrand, relative to the normaliser
    g = torch.as_tensor(np.abs(g_half)).reshape(1, -1, diff.shape[-1])  # the last round's, at these nodes
    end_geometry = [(math.copysign(1.0, k), end, geometry) for k, (end, geometry) in end_of_kind.items()
                    if abs(k) == 2]
    nodes = torch.as_tensor(z_half.reshape(1, -1))
    unseen, end_shift = _unseen_errors(end_geometry, g, torch.as_tensor(lm_half.reshape(1, -1)),
                                       torch.tensor([shift + math.log(total)], dtype=torch.float64), nodes,
                                       lambda z: torch.as_tensor(integrands(z.numpy(), 0.0)),
                                       _log_q_term_size(family, params, log_weights, alpha, nodes),
                                       torch.as_tensor(doubt_half.reshape(1, -1)),
                                       log_u_column=(-2 if extra is not None else -1) if want_entropy else None)
    log_z = shift + math.log(total)
    remainder, limit = _tail_remainders(tails, lambda z: torch.as_tensor(log_u(z.numpy())),
                                        lambda z: torch.as_tensor(integrands(z.numpy(), 0.0)),
                                        torch.tensor([log_z], dtype=torch.float64), diff.shape[-1])
    relative = relative + unseen[0].numpy() + remainder[0].numpy()
    _check_normalisable(limit[:, 0])
    # the extrapolated mass's shift of the statistic, log u and extra; z and z^2 (mean and variance) shift by about
    # that mass times the nearest point's distance, below their rounding
    end_shift = end_shift[0].numpy()
    out = {"log_normalizer": (log_z, relative[0])}
    _, stats = _point_statistics(family, points, log_mass, wanted, standard_errors=False,
                                 residuals=torch.as_tensor(r_half.ravel()))
    if "mean" in stats and not family.circular:
        mean, variance = float(stats["mean"].value), float(stats["variance"].value)
        tbar = (mean - centre) / spread
        out["mean"] = (mean, spread * (relative[1] + abs(tbar) * relative[0]))
        out["variance"] = (variance, spread**2 * (relative[2] + 2 * abs(tbar) * relative[1]
                                                  + (tbar**2 + variance / spread**2) * relative[0]))
        moments = _diverged_moments(*(Estimate(*(torch.tensor(v, dtype=torch.float64) for v in out[name]))
                                      for name in ("mean", "variance")), limit[0, 1], limit[0, 2])
        out["mean"], out["variance"] = ((float(e.value), float(e.error)) for e in moments)
    if want_stat:
        value = stats["expected_statistic"].value.numpy()
        value = value + end_shift[3:3 + value.size]
        # the statistic's integrands only: the entropy's and extra's follow them
        error = relative[3:3 + value.size] + np.abs(value) * relative[0]
        stat = _diverged(Estimate(torch.as_tensor(value), torch.as_tensor(error)), limit[0, 3:3 + value.size])
        value, error = stat.value.numpy(), stat.error.numpy()
        out["expected_statistic"] = (value.tolist(), error.tolist())
        if family.circular:
            moments = family.moments_from_statistic(torch.as_tensor(value), torch.as_tensor(error))
            out["mean"], out["variance"] = ((float(v), float(e)) for v, e in moments)
    if want_entropy:
        log_z, log_z_error = out["log_normalizer"]
        lu = log_u(z_half.ravel()).reshape(z_half.shape) + c_half
        index = -2 if extra is not None else -1
        mean_log_u = float((pi * np.where(np.isfinite(lu), lu, 0.0)).sum()) + end_shift[index]
        mean_log_u = float(_diverged(Estimate(torch.tensor(mean_log_u), torch.tensor(0.0)), limit[0, index]).value)
        out["entropy"] = (log_z - mean_log_u, log_z_error + relative[index] + abs(mean_log_u) * relative[0])
    if extra is not None:
        values, values_error = (v.reshape(z_half.shape) for v in extra(z_half.ravel()))
        check_other_log_prob(values, pi)
        # where mass was extrapolated below a nearest point, other is asked at the float next to the end too: the
        # nodes all sit at that point (a Uniform(0, 1 - 2^-50) missed a fifth of two Beta(3, 0.05)'s mass there)
        deep = [np.nextafter(end, end + sign) for sign, end, geometry in end_geometry
                if bool((geometry.extrapolated(torch.arange(1), end, sign, nodes)[0].numpy() & (pi.ravel() > 0)).any())]
        if (values[pi > 0] == -np.inf).any() or (deep and (extra(np.array(deep))[0] == -np.inf).any()):
            out["extra"] = (-math.inf, 0.0)  # other misses some of the pool's mass: E[log other] = -inf
        else:
            mean_extra = float((pi * np.where(pi > 0, values, 0.0)).sum()) + end_shift[-1]
            mean_extra = float(_diverged(Estimate(torch.tensor(mean_extra), torch.tensor(0.0)), limit[0, -1]).value)
            out["extra"] = (mean_extra, relative[-1] + abs(mean_extra) * relative[0]
                            + float((pi * np.where(pi > 0, values_error, 0.0)).sum()))
        wanted = wanted | {"extra"}
    out = {k: v for k, v in out.items() if k == "log_normalizer" or k in wanted}
    # the gradient's points: the end panels' nodes with their laws, the deep panels' mass on the depth rule's nodes
    laws = [torch.as_tensor(v.reshape(1, -1)) for v in panel_nodes(a, b, kind, origin, half_t, half_w, laws=True)]
    gradient = _gradient_nodes(end_geometry, nodes, log_mass.unsqueeze(0), laws,
                               torch.as_tensor(np.broadcast_to(kind[:, None], z_half.shape).reshape(1, -1)),
                               torch.tensor([out["log_normalizer"][0]], dtype=torch.float64),
                               {k: end_splits.get(k) for k in end_of_kind if abs(k) == 3})
    return out, points, log_mass, count, tuple(v[0] for v in gradient)


def quadrature_entropy(family, params, log_weights, alpha, rtol: float = DEFAULT_RTOL, log_other=None):
    """``(entropy, error)`` of one scalar pool (``params`` ``(M,) + param_shape``, float64): ``log Z - E[log u]``
    with ``int u log u`` among the integrands the adaptive rule of :func:`_quadrature_one` controls; with
    ``log_other`` (a function of a float64 array returning values and their errors) also
    ``(E_pool[log_other], error)`` from the same rule."""
    check_quadrature_range(family, params, log_weights)
    row = _quadrature_one(family, params, log_weights, alpha, frozenset({"entropy"}), rtol, extra=log_other)[0]
    return row["entropy"] if log_other is None else (row["entropy"], row["extra"])


# ------------------------------------------------------------------- batched quadrature
#: pools integrated together by :func:`_quadrature_batch` (bounds the memory of one pass)
_BATCH_POOLS = 256
_GOLDEN_STEPS = 60
#: the pools' highest point is looked for on this many points across the experts' span (and their own edges)
_BATCH_SCAN_POINTS = 1025
#: edges at these fractions of the distance from a finite end of the support where the pooled density grows
_LADDER = torch.tensor([4.0**-k for k in range(1, 41)], dtype=torch.float64)
_BISECTION_STEPS = 50


#: the smallest distance from an end at 0 (of a Gamma's or Beta's support) at which u is evaluated; log_prob of
#: subnormal points loses digits
_NEAREST_AT_ZERO = 1e-300
#: and from an end elsewhere, relative to it: 256 float64 steps, so a point rounds by at most 1/512 of its distance
_NEAREST_RELATIVE = 2.0**-44
#: and no nearer than this, relative to the end (4 float64 steps), where the gap to the nearest edge is narrow
_NEAREST_FLOOR = 2.0**-50
#: a shallow end panel whose ends are further apart than this ratio is split at their geometric mean
_GEOMETRIC_RATIO = 4.0
#: the rounding floor of the quadrature's error, per unit of |log mass| of a node
_ROUNDING = 256 * np.finfo(np.float64).eps
#: and per unit of the size of the terms of an expert's log q at a node (``log_prob_term_size``): a sum of a few
#: terms, each rounded to an ulp or two, and lgamma's few ulps
_TERM_ROUNDING = 8 * np.finfo(np.float64).eps
#: panels narrower than this many float64 spacings of their place get their nodes' rounding corrected
_ROUNDED_PANEL_SPACINGS = 2.0**32


def _node_residual(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``exact - rounded`` for the panel nodes ``0.5 (a + b) + 0.5 (b - a) t`` as the rules compute them in float64
    (panels ``a``, ``b`` ``(..., P)``, nodes ``t`` ``(n,)`` on ``[-1, 1]``): ``(..., P, n)``."""
    total, total_error = two_sum(a, b)
    width, width_error = two_sum(b, -a)
    step, step_error = two_product((0.5 * width).unsqueeze(-1), t)
    _, node_error = two_sum((0.5 * total).unsqueeze(-1), step)
    return node_error + step_error + (0.5 * total_error).unsqueeze(-1) + (0.5 * width_error).unsqueeze(-1) * t


def _gather_panels(selected, *node_values):
    """The panels ``selected`` ``(..., P)`` first, as many per row as the row with most, so that only their nodes are
    evaluated again: the panel indices ``pick`` ``(..., S)``, the node values ``(..., P, n)`` gathered to
    ``(..., S, n)``, and the function putting values of that shape back in place (zeros elsewhere)."""
    pick = (~selected).to(torch.int8).argsort(dim=-1, stable=True)[..., :int(selected.sum(-1).max())]
    nodes = pick.unsqueeze(-1).expand(pick.shape + node_values[0].shape[-1:])

    def scatter(values):
        return torch.zeros(nodes.shape[:-2] + selected.shape[-1:] + values.shape[-1:],
                           dtype=values.dtype).scatter(-2, nodes, values)

    return pick, [v.gather(-2, nodes) for v in node_values], scatter


def _rounding_correction(log_u, a, b, kind, t, z, lu):
    """The rounding of the nodes ``z`` ``(..., P, n)`` (``lu`` their ``log u``) of the plain panels (``kind`` 0)
    narrower than ``_ROUNDED_PANEL_SPACINGS`` float64 spacings of their place, ``None`` where there is none: there a
    node rounds by a part of the panel the rules see (experts of scale 1e-13 at 0.7 are sampled in steps of a
    thousandth of their scale, which left log Z 4e-5 off with 7e-6 stated). Returns, shaped as ``z``, the residuals
    ``exact - rounded``, ``log u(exact) - log u(rounded)`` to second order in them (slope and curvature from the
    neighbouring floats, by ``log_u`` of points shaped as ``(..., k, n)``), and the size of the second-order term,
    which the stated error counts for what the expansion leaves out; zeros elsewhere."""
    narrow = (kind == 0) & (b - a < _ROUNDED_PANEL_SPACINGS * torch.finfo(torch.float64).eps
                            * torch.maximum(a.abs(), b.abs()))
    if not bool(narrow.any()):
        return None
    pick, (z, lu), scatter = _gather_panels(narrow, z, lu)
    above, below = torch.nextafter(z, z.new_tensor(math.inf)), torch.nextafter(z, z.new_tensor(-math.inf))
    lu_above, lu_below = log_u(above), log_u(below)
    slope = (lu_above - lu_below) / (above - below)
    curvature = 2 * ((lu_above - lu) / (above - z) - (lu - lu_below) / (z - below)) / (above - below)
    residual = _node_residual(a.gather(-1, pick), b.gather(-1, pick), t)
    first, second = slope * residual, 0.5 * curvature * residual**2
    use = narrow.gather(-1, pick).unsqueeze(-1) & torch.isfinite(first + second)
    # where one spacing moves log u by a nat or more (or log u's own rounding swamps its differences, experts of
    # concentration 1e20) the expansion is not trusted: no correction, and the change over the spacing as the doubt
    trusted = first.abs() <= 1
    correction = torch.where(use & trusted, first + second, 0.0)
    doubt = torch.where(use, torch.where(trusted, second.abs(), (lu_above - lu_below).abs()), 0.0)
    return scatter(torch.where(use, residual, 0.0)), scatter(correction), scatter(doubt)


def _end_rounding_correction(log_u, z, lu, rounding, away, end, exponent):
    """The change of ``log u`` at end-panel nodes ``z`` ``(..., P, n)`` (``lu`` their ``log u``) from the end's power
    ``exponent``, which the panel's rounding factor uses, to the local one, measured against the neighbouring float
    away from the end (``away`` +-1, ``end`` and ``exponent`` shaped as ``z``); ``rounding`` is the log of intended
    over rounded distance, nonzero only at such nodes. Above a kink in the end panel the pool follows another expert:
    the minimum of Beta(0.001, 0.004) and Beta(0.26, 0.28), end power -0.72 at 1 and -0.996 above its kink at
    1 - 8e-9, came out 1.6e-11 off with 8e-12 stated. ``None`` where there is no such node; zeros elsewhere."""
    panels = (rounding != 0).any(-1)
    if not bool(panels.any()):
        return None
    _, (z, lu, rounding, away, end, exponent), scatter = _gather_panels(panels, z, lu, rounding, away, end, exponent)
    far = torch.nextafter(z, z + away)
    local = (log_u(far) - lu) / ((away * (far - end)).log() - (away * (z - end)).log())
    correction = torch.where((rounding != 0) & torch.isfinite(local), (local - exponent) * rounding, 0.0)
    return scatter(correction)


#: the end panel's exponent is fitted over blocks of this many octaves above the nearest point
_FIT_OCTAVES = 6.0
#: changes of the fitted exponent below this are rounding: the power law is taken as exact
_EXPONENT_NOISE = 1e-12


@dataclass(frozen=True)
class _EndPanel:
    """How a batch of pools is integrated within ``reach`` of a finite end of the support where it may be singular.

    Near the end, at a distance ``d``, ``u ~ C d^exponent`` with ``exponent > -1`` (a Gamma of shape ``a`` has
    ``a - 1``). The panel's variable ``x = (d / reach)^power`` with ``power = exponent + 1`` (clipped to
    ``[1e-8, 1]``) makes such a power law constant in ``x``: Gauss–Legendre on ``x`` is exact for it and the
    bisection sees what departs from it. Points are evaluated at ``end +- d`` rounded; the rounding (large next to
    an end other than 0, where the representable points are about ``1e-16 |end|`` apart) is undone by the factor
    ``(d / d_rounded)^exponent``, and below ``nearest``, in a deep panel of its own (variable
    ``(d / nearest)^depth_power``), the experts' own power laws are extrapolated from ``nearest`` and pooled there:
    at a Beta's end at 1 the points closer than ``2^-44`` are not distinct, a Gamma of shape 0.01 has a thousandth
    of its mass below 1e-300, and which expert a pool follows can change below ``nearest`` (the minimum of
    Beta(0.01, 0.01) and Beta(0.05, 0.03) switches at 2e-29 from 1: the pool's own law extrapolated put twice the
    mass there). Each exponent (the pool's, for the variable, and each expert's) is the slope of its ``log`` density
    against ``log d`` over the first of three blocks of ``octaves`` octaves above ``nearest`` (six, fewer where the
    pool's nearest expert edge is closer); ``deviation`` bounds the experts' exponents' distance from their limits
    at the end: twice the rest of the geometric series whose first terms are their changes over the next two blocks,
    at a ratio of at least ``2^-octaves`` per block (a smooth factor's converges as ``d``), infinite where they do
    not shrink or cannot be fitted (then the extrapolation takes ``u`` as constant below ``nearest``). The
    extrapolated mass is uncertain by ``2 deviation / power`` of itself, at most all of it.
    """

    reach: torch.Tensor  # (pools,)
    power: torch.Tensor
    exponent: torch.Tensor
    deviation: torch.Tensor
    nearest: float
    steep: torch.Tensor  # whether a pool uses the end panel at all
    # the experts' log-densities at `nearest` and exponents (pools, M), the pools' log-weights and alpha
    expert_log_q: torch.Tensor
    expert_exponent: torch.Tensor
    log_weights: torch.Tensor
    alpha: float
    # at most the pool's local power anywhere below `nearest`: the deep panel's power, and 1 / depth_power bounds
    # the mean depth E[log(nearest / d)] of the extrapolated mass (_depth_power)
    depth_power: torch.Tensor
    # the points (pools, 2) over which the experts' exponents were fitted (the nearest point and the first block's
    # top), and the log of their distances' ratio (pools,), 0 where the exponents were not fitted (taken as 0)
    fit_points: torch.Tensor
    fit_log_ratio: torch.Tensor

    def deep_top(self) -> torch.Tensor:
        """``(pools,)`` where the deep panel ends and the shallow one starts: ``nearest``, or ``reach`` if closer."""
        return self.reach.clamp_max(self.nearest)

    def shallow_start(self) -> torch.Tensor:
        """``(pools,)`` the shallow panel's smallest variable, ``x`` at the deep panel's top."""
        return (self.deep_top() / self.reach) ** self.power

    def log_u_nearest(self) -> torch.Tensor:
        """``(pools,)`` the pools' ``log u`` at the nearest point, from their experts' values there."""
        return log_power_mean(self.expert_log_q, self.log_weights, self.alpha)

    def nodes(self, rows, end, sign: float, x, deep: bool = False, laws: bool = False):
        """Points, ``log`` of (Jacobian times the rounding and extrapolation factor), and the rounding ``log`` of
        (intended over rounded distance to the end; 0 at extrapolated points) at panel variables ``x``
        ``(len(rows), panels, nodes)`` of the pools ``rows``; ``end`` broadcasts against ``x``. The shallow panel
        (``x`` in ``[shallow_start, 1]``) maps ``d = reach x^(1 / power)`` with the pool's own power; the deep one
        (``deep``, ``x`` in ``[0, 1]``) ``d = deep_top x^(1 / depth_power)``, where every point is the nearest one and
        the pool of the experts' extrapolated laws gives ``u``. With ``laws``, also the nodes' :meth:`laws`."""
        source = (self.deep_top(), self.depth_power) if deep else (self.reach, self.power)
        top, power, exponent = (v[rows].reshape(-1, 1, 1) for v in (*source, self.exponent))
        log_x = x.log()
        log_d = top.log() + log_x / power
        z = end + sign * log_d.exp().clamp_min(self.nearest)
        if not deep:
            # the nearest point marks the extrapolated nodes (`extrapolated`): a shallow node rounded onto it takes the
            # next float out (a Beta(3, 0.05) pool's 1e-5 of mass within half a spacing of it was moved 20 nats deeper)
            nearest = torch.as_tensor(end + sign * self.nearest, dtype=z.dtype)
            z = torch.where(z == nearest, torch.nextafter(nearest, torch.as_tensor(end - sign, dtype=z.dtype)), z)
        log_rounded = (sign * (z - end)).log()  # exact: the difference of two nearby floats (Sterbenz)
        factor = exponent * (log_d - log_rounded)
        below = log_d < log_rounded
        if deep and bool(below.any()):
            # u at the nearest point is the pool of the experts' values there: below it, the pool of their laws
            pool_of = torch.arange(len(rows)).reshape(-1, 1, 1).expand(below.shape)[below]
            ell, slope, log_w = (v[rows][pool_of] for v in (self.expert_log_q, self.expert_exponent, self.log_weights))
            depth = (log_d - log_rounded)[below].unsqueeze(-1)  # from the point the experts were evaluated at
            pooled = log_power_mean(ell + slope * depth, log_w, self.alpha) - self.log_u_nearest()[rows][pool_of]
            factor = factor.masked_scatter(below, torch.nan_to_num(pooled, nan=0.0, posinf=0.0))
        rounding = torch.where(below, 0.0, log_d - log_rounded) if deep else log_d - log_rounded
        out = z, (top / power).log() + (1 / power - 1) * log_x + factor, rounding
        return (*out, self.laws(rows, log_d - log_rounded)) if laws else out

    def laws(self, rows, depth):
        """``(t, near, far)``, shaped as ``depth``: nodes at ``log(intended / evaluated distance to the end)`` =
        ``depth`` ``(len(rows), ...)`` stand for points where the experts' ``log q_j`` is, under the power laws the
        values use, ``log q_j(node) + t (log q_j(far) - log q_j(near))``: ``t`` is ``depth`` in units of the log
        ratio of the distances of the points ``near`` and ``far`` the exponents were fitted on (0 where they were not
        fitted, or the pool uses no end panel). At the deep panel's nodes ``depth`` is the extrapolation below the
        nearest point, at the others their rounding (what :func:`differentiable_estimates` needs for the gradient
        at the points the nodes stand for)."""
        extra = (1,) * (depth.dim() - 1)
        ratio = self.fit_log_ratio[rows]
        used = self.steep[rows] & (ratio > 0)
        t = torch.where(used.reshape(-1, *extra), depth / torch.where(used, ratio, 1.0).reshape(-1, *extra), 0.0)
        near, far = (self.fit_points[rows, k].reshape(-1, *extra).expand(depth.shape) for k in (0, 1))
        return t, near, far

    def depth_rule(self, order: int = 16, kinks=None):
        """The rule of :meth:`below_nearest` with ``order`` nodes per panel (and panels split at the deep panel's
        variables ``kinks``, if any): ``(depth, change, log_mass)``, each ``(pools, nodes)``: the nodes' depths
        ``log(nearest / d)``, ``log u(d) - log u(nearest)`` under the experts' pooled laws, and their log-masses up to
        a constant per pool (``-inf`` where there is none)."""
        inner = [2.0**-k for k in range(60, 0, -1)]
        edges = np.array([0.0, *inner, *(1 - v for v in reversed(inner[-20:-1])), 1.0])
        if kinks is not None and len(kinks):
            edges = np.unique(np.concatenate((edges, kinks)))
        t, w = np.polynomial.legendre.leggauss(order)
        half = 0.5 * np.diff(edges)[:, None]
        x = torch.as_tensor((edges[:-1, None] + half * (t + 1)).ravel())
        log_w = torch.as_tensor(np.log(half * w).ravel())
        # (pools, nodes); the deep panel ends at its top, nearer than the nearest point in an interval narrower
        depth = (self.nearest / self.deep_top()).log().unsqueeze(-1) - x.log() / self.depth_power.unsqueeze(-1)
        log_u = log_power_mean(self.expert_log_q.unsqueeze(1) - self.expert_exponent.unsqueeze(1) * depth.unsqueeze(-1),
                               self.log_weights.unsqueeze(1), self.alpha)
        change = log_u - self.log_u_nearest().unsqueeze(-1)
        # the mass per unit of x: u d per unit of log d, and d log d / dx = 1 / (depth_power x)
        return depth, change, torch.nan_to_num(change - depth - x.log() + log_w, nan=-math.inf)

    def below_nearest(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(depth, depth_error, log_u_change, log_u_change_error)``, each ``(pools,)``: over the mass below the
        nearest point, under the experts' laws pooled there (what the deep panel integrates), the mean depth
        ``E[log(nearest / d)]`` and the mean of ``log u(d) - log u(nearest)``. Composite Gauss–Legendre in the deep
        panel's variable on panels crowding towards both its ends (the mass sits near 0 where the pool follows its
        most singular expert deep down, near 1 where a least singular one takes over), 16 nodes against 8."""
        means = []
        for order in (16, 8):
            depth, change, log_mass = self.depth_rule(order)
            share = torch.softmax(log_mass, -1)
            means.append(torch.stack([(share * depth).sum(-1), (share * change).sum(-1)]))
        error = (means[0] - means[1]).abs()
        return means[0][0], error[0], means[0][1], error[1]

    def deep_gradient_nodes(self, end: float, sign: float, kinks=None):
        """The mass below the nearest point on the nodes of :meth:`depth_rule` (16 per panel, split at ``kinks``):
        ``(points, log_share, t, near, far)``, each ``(pools, nodes)``: all at the nearest point, ``log_share`` the log
        of each node's share of that mass, and :meth:`laws` at their depths."""
        depth, _, log_mass = self.depth_rule(16, kinks)
        log_share = torch.nan_to_num(log_mass - torch.logsumexp(log_mass, -1, keepdim=True), nan=-math.inf)
        t, near, far = self.laws(torch.arange(len(depth)), -depth)
        return (torch.full_like(depth, end + sign * self.nearest), log_share, torch.nan_to_num(t, nan=0.0), near, far)

    def extrapolated(self, rows, end, sign: float, z):
        """Which of the points ``z`` ``(len(rows), N)`` were extrapolated (they all sit at the nearest point)."""
        return self.steep[rows].unsqueeze(-1) & (z == end + sign * self.nearest)


#: a deep panel's mass below this share of the pool's keeps its own nodes for the gradient
_NEGLIGIBLE_DEEP_MASS = 1e-20


def _gradient_nodes(end_geometry, points, log_mass, laws, node_kind, log_z, kinks=None):
    """The gradient's weighted points ``(points, log_mass, t, near, far)``, each ``(pools, N')``, from the rule's nodes
    ``points`` and ``log_mass`` ``(pools, N)``, their :meth:`_EndPanel.laws` ``laws`` and their panels' kinds
    ``node_kind``, for the ends ``end_geometry`` (``(sign, end, _EndPanel)``; ``log_z`` ``(pools,)``).

    A deep panel's nodes all sit at the nearest point and stand for points down to hundreds of nats of ``log d``
    below it; in its variable ``x = (d / top)^depth_power`` a power law's mass is uniform, which its few
    Gauss–Legendre nodes integrate exactly, but its depth ``log(nearest / d)`` is ``-log(x) / depth_power``, singular
    at 0, which they do not (the mean depth of a Beta(0.7, 0.1) expert's extrapolated mass came out 9.986 for 10, a
    third of a thousandth of its ``d log Z / d b``). Where such mass is not negligible its nodes give way, for the
    gradient, to the same mass spread over :meth:`_EndPanel.deep_gradient_nodes` (split at ``kinks`` ``{kind:
    variables}``, if given), the rule the values' shifts below the nearest point use."""
    t, near, far = laws
    extra = []
    for sign, end, geometry in end_geometry:
        deep = node_kind == 3 * sign
        if not bool(deep.any()):
            continue
        log_deep = torch.logsumexp(torch.where(deep, log_mass, -math.inf), -1, keepdim=True)
        if not bool((log_deep.squeeze(-1) - log_z > math.log(_NEGLIGIBLE_DEEP_MASS)).any()):
            continue
        rule = geometry.deep_gradient_nodes(end, sign, None if kinks is None else kinks.get(3 * sign))
        log_mass = torch.where(deep, -math.inf, log_mass)
        extra.append((rule[0], log_deep + rule[1], *rule[2:]))
    return tuple(torch.cat(parts, -1) for parts in zip((points, log_mass, t, near, far), *extra))


def _tail_scale(widest: torch.Tensor, edge: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """The scale of a mapped tail from ``edge`` (all ``(pools,)``): the experts' widest standard deviation, or a
    millionth of the edge's distance from their weighted mean where that is larger (the tail of an interval far out,
    for the cdf: from 1e150, one of scale 1 never left the edge's float and its power law could not be fitted)."""
    return torch.maximum(widest, (edge - centre).abs() * 2.0**-20)


def _tail_reach(scale: torch.Tensor) -> torch.Tensor:
    """The ``y`` at which the mapped tails ``z = edge +- scale expm1(y)`` of scales ``scale`` ``(pools,)`` end:
    ``_TAIL_REACH``, or less where they would pass ``_TAIL_LIMIT``."""
    return (_TAIL_LIMIT / scale).log().clamp(1.0, _TAIL_REACH)


def _tail_edges(reach: torch.Tensor) -> torch.Tensor:
    """The mapped tails' first panel edges ``(pools, len(_TAIL_EDGES) + 2)`` in their variable ``x = y / reach``, from
    0 to 1 (edges beyond a pool's reach at 1: empty panels)."""
    y = torch.tensor((0.0,) + _TAIL_EDGES, dtype=reach.dtype)
    x = (y / reach.unsqueeze(-1)).clamp_max(1.0)
    return torch.cat((x, torch.ones_like(x[:, :1])), -1)


def _tail_remainders(tails, log_u, integrands, log_z, count: int):
    """``(remainder, limit)``, each ``(pools, count)``: the integrals of the integrands beyond the mapped tails' reach,
    bounded relative to the normaliser, and where one diverges the value the expectation takes (``+-inf``; NaN where
    both tails diverge with opposite signs), elsewhere 0. ``tails``: ``(sign, origin, scale, reach, centre)``, each
    ``(pools,)`` (``centre`` the experts' weighted mean); ``log_u`` ``(pools, n) -> (pools, n)`` and ``integrands``
    ``(pools, n) -> (pools, n, count)`` at points ``(pools, n)``; ``log_z`` ``(pools,)``.

    Beyond the reach, at distance ``D`` from the experts' centre, an integrand ``g = u f`` is taken to keep decaying as
    the power law ``|g(D)| (d / D)^-q`` it follows there: its integral is ``|g(D)| D / (q - 1)``, infinite for
    ``q <= 1``. ``q`` is fitted over the last step of ``_TAIL_FIT_STEP`` e-folds before ``D`` and, where it is
    smaller than over the step before (a pool of power laws with different exponents, still turning from the
    lighter to the heavier), extrapolated one step further. Tails that decay faster than any power have ``g(D) = 0``
    in float64 there: no remainder. The values leave the remainder out and their errors count it twice, so that the
    truth lies inside them even where the power law is still turning. (A pool of Pareto experts of shape 2.05 has a
    quarter of its variance beyond 1e13 of its scale, where the earlier tail map ``x / (1 - x)`` stopped: 31.3 +-
    0.49 for 37.2.)"""
    remainder = limit = torch.zeros(len(log_z), count, dtype=torch.float64)
    for sign, origin, scale, reach, centre in tails:
        # (steps of a third of the reach where it is shorter than three: experts of scales near _TAIL_LIMIT)
        step = (reach / 3).clamp_max(_TAIL_FIT_STEP).unsqueeze(-1)
        y = reach.unsqueeze(-1) + step * torch.tensor([-2.0, -1.0, 0.0], dtype=reach.dtype)
        z = origin.unsqueeze(-1) + sign.unsqueeze(-1) * scale.unsqueeze(-1) * torch.expm1(y)
        # the power laws in the distance from the experts' centre (from the edge of a tail far out they are not)
        distance = (z - centre.unsqueeze(-1)).abs()
        f = integrands(z)
        # an integrand that overflowed (t^2 of a pool far narrower than its widest expert) as the largest float, and
        # nothing where u itself vanished (-inf + inf is NaN)
        log_u_far = log_u(z).unsqueeze(-1)
        log_g = torch.where(log_u_far == -math.inf, -math.inf,
                            log_u_far + f.abs().log().clamp_max(math.log(torch.finfo(f.dtype).max)))
        log_d = distance.log().unsqueeze(-1)
        near, far = (-log_g.diff(dim=1) / log_d.diff(dim=1)).unbind(1)
        power = torch.minimum(far, 2 * far - near)
        vanished = log_g[:, -1] == -math.inf
        # a power within its own rounding of 1 is 1 (a Cauchy's mean: 1 +- 1.4e-14, a remainder of 1e13 else)
        rounding = 64 * torch.finfo(log_g.dtype).eps * log_g.abs().amax(1) / step
        diverges = ~vanished & ~(power > 1 + rounding)
        beyond = 2 * (log_g[:, -1] + log_d[:, -1] - log_z.unsqueeze(-1)).exp() / torch.where(diverges, 1.0, power - 1)
        remainder = remainder + torch.where(vanished, 0.0, torch.where(diverges, math.inf, beyond))
        limit = limit + torch.where(diverges, f[:, -1].sign() * math.inf, 0.0)
    return remainder, limit


def _diverged(estimate: Estimate, limit: torch.Tensor) -> Estimate:
    """``estimate`` with the value ``limit`` and an infinite error where ``limit`` (of :func:`_tail_remainders`) is
    not 0: there its integral diverged."""
    diverged = limit != 0
    return Estimate(torch.where(diverged, limit, estimate.value), torch.where(diverged, math.inf, estimate.error))


def _diverged_moments(mean: Estimate, variance: Estimate, limit_t: torch.Tensor, limit_t2: torch.Tensor):
    """The mean and variance with the limits of :func:`_tail_remainders` for ``t`` and ``t^2``: a mean whose two tails
    diverge with opposite signs is undefined (NaN, with a warning), the variance infinite where either diverged."""
    if bool(torch.isnan(limit_t).any()):
        warnings.warn("the pool's mean is undefined: both its tails decay too slowly (as z^-q with q <= 2) for "
                      "either half of it to be finite; it is returned as NaN", RuntimeWarning, stacklevel=4)
    return _diverged(mean, limit_t), _diverged(variance, torch.where((limit_t != 0) | (limit_t2 != 0), math.inf, 0.0))


def _check_normalisable(limit: torch.Tensor) -> None:
    """Raises where the normaliser's tail diverged (``limit`` of :func:`_tail_remainders` not 0)."""
    if bool((limit != 0).any()):
        raise ValueError("the pooled density is not normalisable: a tail decays as z^-q with q <= 1 at 1e100 of "
                         "the experts' scale")


def _split_points(a, b, kind):
    """Where panels ``(a, b)`` (numpy arrays or tensors) of kinds ``kind`` are split: at their middle, or, for a
    shallow end panel (kind +-2) reaching from below a quarter of its top towards its variable's 0, at the geometric
    mean of its ends. There the integrand can hold a fractional power of ``x`` (the other experts' power laws
    relative to the one the variable follows), and a panel that starts a small fraction of its width from that
    singular point has halves whose error is not small against the whole's, so their difference understates it (a
    Beta pool at alpha = 0.3 with powers -0.46 and +0.59 at 1: 8.9e-12 off in log Z where it stated 6.6e-12). Split
    geometrically, a panel's ends stay within a fixed ratio, the rule converges on each like a smooth integrand's,
    and the halves' errors are small against the whole's again."""
    mid = 0.5 * (a + b)
    geometric = (abs(kind) == 2) & (b > _GEOMETRIC_RATIO * a) & (a > 0)
    mid[geometric] = a[geometric] ** 0.5 * b[geometric] ** 0.5  # not (a b)^(1/2): a b can underflow
    return mid


def _depth_power(power, expert_exponent, log_weights, alpha: float) -> torch.Tensor:
    """The pools' power below the nearest point at its smallest: the pool's slope in ``log d`` is a weighted average
    of the experts' exponents whose weights move, as ``d`` shrinks, towards the least singular expert for
    ``alpha < 0`` (so the pool's own power at the nearest point is the smallest) and towards the most singular one
    for ``alpha > 0`` (whose power then bounds it; the pool's own power at the nearest point, with an expert's far
    below, mapped an integrand like ``x^-0.98`` onto the panel, which no bisection resolves, while that expert's
    power for the whole end panel crowded every node towards the end, where a regular pool has no mass)."""
    if alpha <= 0:
        return power
    least = torch.where(log_weights > -math.inf, expert_exponent, math.inf).amin(-1)
    return torch.minimum(power, (least + 1).clamp(1e-8, 1.0))


def _exponent_fit(log_values: torch.Tensor, log_distance: torch.Tensor, octaves: torch.Tensor):
    """``(exponent, deviation)`` of densities ``log_values`` ``(pools, 4, ...)`` at the distances ``log_distance``
    ``(pools, 4)`` from an end (four points ``octaves`` octaves apart): the slope over the first block, and the
    bound on its distance from the limit described in :class:`_EndPanel` (infinite where the slopes are not finite or
    do not converge)."""
    extra = (1,) * (log_values.dim() - 2)
    spacing = log_distance.diff(dim=1).reshape(log_distance.shape[:1] + (3,) + extra)
    slopes = log_values.diff(dim=1) / spacing
    near, far = slopes[:, 1] - slopes[:, 0], slopes[:, 2] - slopes[:, 1]  # changes away from the end
    # at least the ratio of a term linear in d (a smooth factor of the density, which a faster-shrinking term can
    # hide in the far block)
    floor = (2.0 ** -octaves.clamp_min(1.0)).reshape(octaves.shape + extra)
    ratio = (near / far).clamp_min(floor)
    converging = (near / far >= 0) & (ratio < 1)
    deviation = torch.where(converging, 2 * near.abs() * ratio / (1 - ratio).clamp_min(1e-300), math.inf)
    deviation = torch.where(torch.maximum(near.abs(), far.abs()) <= _EXPONENT_NOISE, 0.0, deviation)
    deviation = torch.where(torch.isfinite(slopes).all(1), deviation.clamp_min(_EXPONENT_NOISE), math.inf)
    return slopes[:, 0], deviation


def _nearest_point(end: float, fit_gap: torch.Tensor) -> float:
    """The :class:`_EndPanel`'s nearest point to ``end`` for pools whose power laws are fitted within ``fit_gap``
    ``(pools,)`` of it: within a gap of a few thousand floats, nearer than the default, since a fit needs octaves
    (one value for a batch of pools, from its narrowest gap: the panel stores one)."""
    if end == 0:
        return _NEAREST_AT_ZERO
    return torch.clamp(fit_gap * 2.0**-12, min=_NEAREST_FLOOR * abs(end), max=_NEAREST_RELATIVE * abs(end)).min().item()


def _end_panel_geometry(log_u, sign: float, end: float, gap: torch.Tensor, top, expert_log_q, log_weights,
                        alpha, fit_gap: torch.Tensor | None = None) -> tuple[_EndPanel, torch.Tensor]:
    """The :class:`_EndPanel` of the end ``end`` (``sign`` +1 for a lower end, -1 for an upper one) of pools whose
    nearest expert edge lies ``gap`` ``(pools,)`` from it, and its ladder: edges ``(pools, len(_LADDER) + 1)`` in
    geometric progression from that edge down to ``reach``, NaN where unused. ``log_u`` evaluates the pools at points
    ``(pools, n)``, ``expert_log_q`` their experts' log-densities ``(pools, n, M)`` (of log-weights ``log_weights``
    ``(pools, M)``, pooled at ``alpha``); ``top`` is the pools' highest ``log u``. A pool uses the end panel
    (``steep``) where ``u`` grows towards the end or is not negligible next to it (a Gamma or Beta expert of shape
    below one, or of a non-integer shape: a singular derivative). The probes and the exponents' fit lie within
    ``fit_gap`` (by default ``gap``) of the end, which ``log_u`` and ``expert_log_q`` evaluate on the whole support:
    an interval's end panel (``gap`` its width at the end) follows the power laws of the support. An end panel
    within four nearest points of the end (``gap`` at most that) reaches the whole gap."""
    fit_gap = gap if fit_gap is None else fit_gap
    nearest = _nearest_point(end, fit_gap)
    # probes no nearer than the nearest point: within 1e-6 of a gap of 3e-11 from 1 they rounded onto the end, where
    # u is not evaluated, and the end panel was left out (a Beta's mass on (1 - 3e-11, 1) came out 2.6e-2 off)
    probe_distance = (fit_gap.unsqueeze(-1) * torch.tensor([1e-6, 1e-3], dtype=torch.float64)).clamp_min(nearest)
    probe_distance[:, 1] = torch.maximum(probe_distance[:, 1], 2 * probe_distance[:, 0])
    probe = log_u(end + sign * probe_distance)
    steep = (probe[:, 0] > probe[:, 1]) | (probe[:, 0] > top - 50)
    # three blocks of octaves above the nearest point, within a quarter of the gap
    octaves = (torch.log2(0.25 * fit_gap / nearest) / 3).clamp(max=_FIT_OCTAVES)
    z = end + sign * nearest * 2.0 ** (octaves.clamp_min(1.0).unsqueeze(-1) * torch.arange(4, dtype=torch.float64))
    log_distance = (sign * (z - end)).log()
    expert_values = expert_log_q(z)  # (pools, 4, M)
    exponent, _ = _exponent_fit(log_power_mean(expert_values, log_weights.unsqueeze(1), float(alpha)), log_distance,
                                octaves)
    expert_exponent, expert_deviation = _exponent_fit(expert_values, log_distance, octaves)
    fitted = torch.isfinite(exponent) & (octaves >= 1)
    # an expert with no density there neither moves the pool nor bounds its exponent
    counted = (log_weights > -math.inf) & torch.isfinite(expert_values[:, 0])
    expert_exponent = torch.where(counted & fitted.unsqueeze(-1), expert_exponent, 0.0)
    deviation = torch.where(counted, expert_deviation, 0.0).amax(-1)
    # next to an end other than 0 points round by up to 1e-16 |end|: the panel reaches far enough for the rounding
    # outside it to be negligible, its own corrected
    shortest = 256 * nearest if end == 0 else 2.0**-8 * abs(end)
    reach = torch.minimum((gap * _LADDER[-1]).clamp_min(shortest), 0.25 * gap)
    # a gap of a few floats has no float a quarter of the way (the reach rounded to 0 and an interval of two floats
    # at a Beta's singular end had no mass)
    reach = torch.where(gap <= 4 * nearest, gap, reach)
    # the float at that distance, whose distance is exact: the ladder's last edge and the panel then meet exactly
    # (else they left up to half a spacing of the end between them, 1e-8 of the mass next to 1 within 2e-9)
    reach = sign * ((end + sign * reach) - end)
    exponent = torch.where(fitted, exponent, 0.0)
    ladder = torch.cat((gap.unsqueeze(-1) * _LADDER, reach.unsqueeze(-1)), -1)
    ladder = torch.where(steep.unsqueeze(-1) & (ladder >= reach.unsqueeze(-1)), end + sign * ladder, math.nan)
    power = (exponent + 1).clamp(1e-8, 1.0)
    return _EndPanel(reach=reach, power=power, exponent=exponent, deviation=torch.where(fitted, deviation, math.inf),
                     nearest=nearest, steep=steep, expert_log_q=expert_values[:, 0], expert_exponent=expert_exponent,
                     log_weights=log_weights, alpha=float(alpha),
                     depth_power=_depth_power(power, expert_exponent, log_weights, float(alpha)),
                     fit_points=z[:, :2].clone(),
                     fit_log_ratio=torch.where(fitted, log_distance[:, 1] - log_distance[:, 0], 0.0)), ladder


def _log_q_term_size(family, params, log_weights, alpha, points):
    """``(pools, N)``: at the nodes ``points`` ``(pools, N)``, the size of the terms the experts' ``log q_j`` add
    (``ExponentialFamily.log_prob_term_size``), whose rounding each node's mass carries, weighted by how much each
    ``log q_j`` moves ``log u`` there: ``d log u / d log q_j = lambda_j q_j^alpha / sum_k lambda_k q_k^alpha`` (the
    weights at alpha = 0, the largest or smallest expert at +-inf). Unweighted, an expert of scale 1e-20 beside one
    of 1e40 had terms of 1e120 where its density is 0 and moves nothing: log Z = log 1/2 came with an error of
    4e104."""
    present = log_weights > -math.inf
    with torch.no_grad():
        value = points.T.unsqueeze(-1)
        size = torch.where(present, family.log_prob_term_size(params, value), 0.0)  # (N, pools, M)
        ell = family.log_prob(params, value).to(size.dtype)
        if alpha == 0:
            share = torch.where(present, log_weights.exp(), 0.0).expand(size.shape)
        elif math.isinf(alpha):
            extreme = torch.where(present, ell, -alpha)
            pick = extreme.argmax(-1) if alpha > 0 else extreme.argmin(-1)
            share = torch.nn.functional.one_hot(pick, size.shape[-1]).to(size.dtype)
        else:
            # (NaN where u = 0 because an expert vanishes at alpha < 0: that node has no mass to carry it)
            share = torch.softmax(torch.where(present, log_weights + alpha * ell, -math.inf), -1).nan_to_num(0.0)
    return (share * size).sum(-1).T


def _unseen_errors(end_geometry, g, log_mass, log_z, points, integrands, term_size, placement, log_u_column=None):
    """``(error, shift)``: the errors ``(pools, K)``, relative to the normaliser, that comparing rules cannot see,
    and the shift ``(pools, K)`` to add to the integrals (relative to the normaliser) for the mass extrapolated next
    to the ends. The errors: rounding (a few ulps of each node's ``|log mass|`` and of the size ``term_size``
    ``(pools, N)`` of the terms of the experts' ``log q`` there, which cancel to a far smaller log mass where the
    experts' parameters are large; and ``placement`` ``(pools, N)``, what the correction of ``log u`` for the node's
    own rounding leaves out) and the mass extrapolated next to the ends (the ``(sign, end, _EndPanel)`` of
    ``end_geometry``). ``g`` ``(pools, N, K)``: the integrands' absolute values at the nodes ``points``
    ``(pools, N)`` of log-masses ``log_mass``; ``integrands`` gives their signed values ``(pools, n, K)`` at points
    ``(pools, n)``, the column ``log_u_column`` (if any) being ``log u``.

    Below the nearest point ``n`` the rule sees every integrand ``f`` at ``n``, while the mass there (the nodes'
    that were extrapolated) spreads down to the end at a mean depth ``E[log(n / d)]`` (``d`` the distance to the
    end) that :meth:`_EndPanel.below_nearest` integrates. There ``f`` averages ``f(n) - s E[log(n / d)]`` if it is
    ``a + s log d`` (a statistic ``log z``, another log-density), with ``s`` its change over the octave above ``n``
    divided by ``log 2``, and moves by about the mass times ``n`` if it is ``a + c d^k`` (``k > 0``: ``z`` itself);
    ``log u`` follows the experts' pooled laws. The shift is the nodes' mass there times that change. (Counted in
    the error alone, it biased a pool of Beta(3, 0.05) experts, a quarter of whose mass lies within ``2^-44`` of 1,
    by about its stated error: entropy -12.96 +- 4.45 for -17.41.) The errors: that integral's, and the exponents'
    uncertainty, which widens the mass and the depth and adds its share of the mass times ``|f(n)|``; the mass the
    nodes miss, where the pool's own power law puts more, counts at the full change."""
    share = (log_mass - log_z.unsqueeze(-1)).exp().unsqueeze(-1)
    rounding = _ROUNDING * (1 + log_mass.abs()) + _TERM_ROUNDING * term_size + placement
    error = torch.where(share > 0, share * g * rounding.unsqueeze(-1), 0.0).sum(1)
    shift = torch.zeros_like(error)
    rows = torch.arange(len(points))
    for sign, end, geometry in end_geometry:
        flags = geometry.extrapolated(rows, end, sign, points)
        extrapolated = flags.any(-1)
        if bool(extrapolated.any()):
            octave = (end + sign * geometry.nearest * torch.tensor([1.0, 2.0], dtype=points.dtype)).expand(len(points), 2)
            values = integrands(octave)
            slope = (values[:, 1] - values[:, 0]) / math.log(2)
            depth, depth_error, log_u_change, log_u_error = (v.unsqueeze(-1) for v in geometry.below_nearest())
            uncertainty = (2 * geometry.deviation / geometry.depth_power).clamp_max(1.0).unsqueeze(-1)
            # the integrands' mean change below the nearest point: a + s log d's, and log u's from the pooled laws
            change, change_error = -slope * depth, slope.abs() * depth_error
            if log_u_column is not None:
                change[:, log_u_column], change_error[:, log_u_column] = log_u_change[:, 0], log_u_error[:, 0]
            # the nodes' extrapolated mass, or the pool's own power law's below the nearest point if more (exact
            # for a pure power law, which the nodes' sum only approximates)
            mass = torch.where(flags, (log_mass - log_z.unsqueeze(-1)).exp(), 0.0).sum(-1, keepdim=True)
            # (below the deep panel's top: an interval narrower than the nearest point reaches only that far)
            top = geometry.deep_top()
            law = (geometry.log_u_nearest() + geometry.exponent * (top / geometry.nearest).log() - log_z + top.log()
                   - geometry.power.log()).exp().unsqueeze(-1)
            below = torch.maximum(mass, torch.nan_to_num(law, nan=0.0)) * (1 + uncertainty)
            # (an integrand without a finite slope there has an infinite error instead)
            shift = shift + torch.where(extrapolated.unsqueeze(-1) & torch.isfinite(change) & (mass > 0),
                                        mass * change, 0.0)
            part = (below * (values[:, 0].abs() * uncertainty + change_error + slope.abs() * depth * uncertainty)
                    + (below - mass) * change.abs())
            error = error + torch.where(extrapolated.unsqueeze(-1), part, 0.0)
    return error, shift


def _batched_supported(family, alpha) -> bool:
    """Whether :func:`_quadrature_batch` handles these pools (the per-pool rule handles the others: ``+-inf``, whose
    kinks it locates one by one, and families without closed-form moments or with circular ones)."""
    return math.isfinite(alpha) and family.has_numeric_moments and not family.circular


def _quadrature_batch(family, params, log_weights, alpha, wanted, rtol):
    r"""The rule of :func:`_quadrature_one` for a batch of pools at once, every step vectorised over the pools
    (``params`` ``(B, M) + param_shape`` and ``log_weights`` ``(B, M)``, float64; finite ``alpha``).

    The same initial edges (every present expert's mean +- up to 64 of its standard deviations, the pool's highest
    point on a scan of the experts' span refined by golden-section search, the points where ``log u`` has dropped
    by 0.5 ... 128 by bisection, the support's finite ends), the same mapped tails, the same panel comparison (the
    10-point rule on the two halves against the 10- and 7-point rules on the whole) and the same bisection of the
    worst panels until the error for ``u``, ``u t``, ``u t^2`` (and ``u T(z)`` when asked) is at most ``rtol`` of
    each integral of ``|.|``, pool by pool; panels are padded to a common count with empty ones (no mass).

    Returns ``(log_z, relative, centre, spread, stats, (points, log_mass, gradient), count, ok)``: ``relative``
    ``(B, K)`` the per-integrand error relative to the normaliser, ``centre`` and ``spread`` the standardisation of
    the integrands, ``stats`` the :func:`_point_statistics` of the nodes, the nodes ``(P, B)`` and the gradient's
    (:func:`_gradient_nodes`, each ``(P', B)``), and ``ok`` ``(B,)`` false for pools where ``u`` vanished
    numerically (to be handled one by one).
    """
    lower, upper = family.support_interval
    fill = _interior_point(*torch.tensor([lower, upper], dtype=torch.float64)).item()
    pools = params.shape[0]
    high = torch.float64
    count = 0

    rows = torch.arange(pools)  # the pools still being refined

    def log_u(z):
        """``log u`` at points ``z`` ``(len(rows), ...)`` of each pool in ``rows``, ``-inf`` outside the open support."""
        nonlocal count
        flat = z.reshape(len(rows), -1).T
        inside = (flat > lower) & (flat < upper)
        with torch.no_grad():
            ell = expert_log_probs(family, params[rows], torch.where(inside, flat, fill))
            out = torch.where(inside, log_power_mean(ell, log_weights[rows], alpha), -math.inf)
        count += flat.numel()
        return out.T.reshape(z.shape)

    def expert_log_q(z):
        """The experts' ``log q_j`` ``(pools, n, M)`` at points ``z`` ``(pools, n)`` inside the support."""
        with torch.no_grad():
            return expert_log_probs(family, params, z.T).transpose(0, 1)

    present = log_weights > -math.inf
    mu, var = (x.to(high) for x in _expert_moments(family, params))
    sd = var.clamp_min(0).sqrt()
    sd = _placement_scale(mu, sd)
    offsets = torch.as_tensor(np.concatenate((-_EXPERT_OFFSETS[::-1], _EXPERT_OFFSETS[1:])), dtype=high)
    expert_points = (mu.unsqueeze(-1) + sd.unsqueeze(-1) * offsets).reshape(pools, -1)
    valid = ((expert_points > lower) & (expert_points < upper)
             & present.unsqueeze(-1).expand(mu.shape + offsets.shape).reshape(pools, -1))
    # experts far narrower than their distance to a bound: their means, clipped inside the support
    clipped = mu.clamp(math.nextafter(lower, upper), math.nextafter(upper, lower))
    none = ~valid.any(-1, keepdim=True)
    expert_points = torch.where(none, clipped.repeat_interleave(len(offsets), -1), expert_points)
    valid = valid | (none & present.repeat_interleave(len(offsets), -1))
    span_lo = torch.where(valid, expert_points, math.inf).amin(-1, keepdim=True)
    span_hi = torch.where(valid, expert_points, -math.inf).amax(-1, keepdim=True)
    scan = span_lo + (span_hi - span_lo) * torch.linspace(0, 1, _BATCH_SCAN_POINTS, dtype=high)
    points = torch.cat((scan, torch.where(valid, expert_points, span_lo)), -1).sort(-1).values
    values = log_u(points)
    top, best = values.max(-1)
    last = points.shape[-1] - 1

    # the highest point, refined between its neighbours on the scan (golden-section search, maximising)
    lo = points.gather(-1, (best - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1)
    hi = points.gather(-1, (best + 1).clamp_max(last).unsqueeze(-1)).squeeze(-1)
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(_GOLDEN_STEPS):
        c, d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        left = log_u(torch.stack((c, d), -1)).diff(dim=-1).squeeze(-1) < 0  # u(c) > u(d): the peak is left of d
        lo, hi = torch.where(left, lo, c), torch.where(left, d, hi)
    peak = 0.5 * (lo + hi)
    peak_value = log_u(peak.unsqueeze(-1)).squeeze(-1)
    better = peak_value > top
    top = torch.where(better, peak_value, top)
    peak = torch.where(better, peak, points.gather(-1, best.unsqueeze(-1)).squeeze(-1))

    # where log u has dropped by each level on either side of the highest point (bisection between scan points)
    index = torch.arange(points.shape[-1])
    brackets, found = [], []
    for level in _LEVELS:
        below = values < (top - level).unsqueeze(-1)
        right = below & (index > best.unsqueeze(-1))
        left = below & (index < best.unsqueeze(-1))
        first = right.to(torch.int8).argmax(-1)
        final = last - left.flip(-1).to(torch.int8).argmax(-1)
        brackets += [(first - 1, first), ((final + 1).clamp_max(last), final)]
        found += [right.any(-1), left.any(-1)]
    inner = torch.stack([points.gather(-1, i.clamp_min(0).unsqueeze(-1)).squeeze(-1) for i, _ in brackets], -1)
    outer = torch.stack([points.gather(-1, j.unsqueeze(-1)).squeeze(-1) for _, j in brackets], -1)
    targets = (top.unsqueeze(-1) - torch.tensor(_LEVELS, dtype=high).repeat_interleave(2))
    a, b = inner, outer  # log u(a) >= target > log u(b), whichever side
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (a + b)
        above = log_u(middle) >= targets
        a, b = torch.where(above, middle, a), torch.where(above, b, middle)
    crossings = torch.where(torch.stack(found, -1), 0.5 * (a + b), math.nan)

    # A finite end where u is singular (or not negligible) is approached by edges in geometric progression down to
    # `reach` from it (which the bisection would otherwise reach one round, over the whole batch, at a time), and
    # the rest is an end panel (:func:`_end_panel_geometry`).
    end_columns = [(sign, end, nearest) for sign, end, nearest in ((1.0, lower, span_lo.squeeze(-1)),
                                                                   (-1.0, upper, span_hi.squeeze(-1)))
                   if math.isfinite(end)]
    plain_ends, ladders, end_geometry = [], [], []
    for sign, end, nearest in end_columns:
        geometry, ladder = _end_panel_geometry(log_u, sign, end, sign * (nearest - end), top, expert_log_q,
                                               log_weights, alpha)
        ladders.append(ladder)
        plain_ends.append(torch.where(geometry.steep, math.nan, end))
        end_geometry.append((sign, end, geometry))
    ends = torch.stack(plain_ends, -1) if plain_ends else torch.zeros(pools, 0, dtype=high)
    edges = torch.cat((torch.where(valid, expert_points, math.nan), peak.unsqueeze(-1), crossings, ends, *ladders), -1)
    edges = torch.where((edges >= lower) & (edges <= upper), edges, math.nan).sort(-1).values  # NaN sorts last
    a, b = edges[:, :-1], edges[:, 1:]
    panel_valid = b > a  # False at NaN and at repeated edges
    kind = torch.zeros_like(a)
    origin = torch.zeros_like(a)
    widest = torch.where(present, sd, 0).amax(-1)
    expert_weights = torch.where(present, log_weights.exp(), 0)
    expert_centre = (expert_weights * mu).sum(-1) / expert_weights.sum(-1)
    first_edge = edges[:, 0]
    last_edge = torch.where(torch.isnan(edges), -math.inf, edges).amax(-1)
    tails, tail_map = [], {}  # tail_map: kind -> (scale, reach), each (pools,)
    for sign, bound, end in ((-1.0, lower, first_edge), (1.0, upper, last_edge)):
        if math.isinf(bound):
            scale = _tail_scale(widest, end, expert_centre)
            reach = _tail_reach(scale)
            tail_x = _tail_edges(reach)
            a = torch.cat((a, tail_x[:, :-1]), -1)
            b = torch.cat((b, tail_x[:, 1:]), -1)
            count_tail = tail_x.shape[-1] - 1
            kind = torch.cat((kind, torch.full((pools, count_tail), sign, dtype=high)), -1)
            origin = torch.cat((origin, end.unsqueeze(-1).expand(-1, count_tail)), -1)
            panel_valid = torch.cat((panel_valid, tail_x[:, 1:] > tail_x[:, :-1]), -1)
            tail_map[sign] = (scale, reach)
            tails.append((torch.full((pools,), sign, dtype=high), end, scale, reach, expert_centre))
    ones = torch.ones(pools, dtype=high)
    (lower_scale, lower_reach), (upper_scale, upper_reach) = (tail_map.get(sign, (ones, ones)) for sign in (-1.0, 1.0))
    # kind +-2: the shallow end panel of the lower (upper) end, x in [shallow_start, 1]; +-3 its deep one, x in [0, 1]
    end_of_kind = {}
    for sign, end, geometry in end_geometry:
        start = geometry.shallow_start()
        for end_kind, first, valid_panel in ((2 * sign, start, geometry.steep & (start < 1)),
                                             (3 * sign, torch.zeros(pools, dtype=high), geometry.steep)):
            end_of_kind[end_kind] = geometry
            a = torch.cat((a, first.unsqueeze(-1)), -1)
            b = torch.cat((b, torch.ones(pools, 1, dtype=high)), -1)
            kind = torch.cat((kind, torch.full((pools, 1), end_kind, dtype=high)), -1)
            origin = torch.cat((origin, torch.full((pools, 1), end, dtype=high)), -1)
            panel_valid = torch.cat((panel_valid, valid_panel.unsqueeze(-1)), -1)

    gl_t, gl_w = np.polynomial.legendre.leggauss(_GL_ORDER)
    low_t, low_w = np.polynomial.legendre.leggauss(_GL_ORDER - 3)
    whole_t = torch.as_tensor(np.concatenate((gl_t, low_t)), dtype=high)
    whole_w = torch.as_tensor(np.concatenate((gl_w, low_w)), dtype=high)
    half_t = torch.as_tensor(np.concatenate((0.5 * gl_t - 0.5, 0.5 * gl_t + 0.5)), dtype=high)
    half_w = torch.as_tensor(np.concatenate((0.5 * gl_w, 0.5 * gl_w)), dtype=high)
    both_t = torch.cat((whole_t, half_t))

    def panel_nodes(a, b, kind, origin, ok, t, w, laws=False):
        """The nodes, their log weights and rounding; with ``laws`` instead their :meth:`_EndPanel.laws`."""
        x = 0.5 * (a + b).unsqueeze(-1) + 0.5 * (b - a).unsqueeze(-1) * t
        tail = (kind.abs() == 1).unsqueeze(-1)
        upper_side = kind.unsqueeze(-1) > 0
        scale, reach = (torch.where(upper_side, up[rows].reshape(-1, 1, 1), low[rows].reshape(-1, 1, 1))
                        for up, low in ((upper_scale, lower_scale), (upper_reach, lower_reach)))
        y = torch.where(tail, reach * x, 0.0)
        z = torch.where(tail, origin.unsqueeze(-1) + kind.unsqueeze(-1) * scale * torch.expm1(y), x)
        log_jac = torch.where(tail, (scale * reach).log() + y, 0.0)
        rounding = torch.zeros_like(x)
        law = (torch.zeros_like(x), z, z)
        for end_kind, geometry in end_of_kind.items():
            at_end = (kind == end_kind).unsqueeze(-1)
            if bool(at_end.any()):
                z_end, log_jac_end, rounding_end, law_end = geometry.nodes(rows, origin.unsqueeze(-1),
                                                                           math.copysign(1.0, end_kind),
                                                                           torch.where(at_end, x, 1.0),  # 1: far end
                                                                           deep=abs(end_kind) == 3, laws=True)
                z, log_jac = torch.where(at_end, z_end, z), torch.where(at_end, log_jac_end, log_jac)
                rounding = torch.where(at_end, rounding_end, rounding)
                law = tuple(torch.where(at_end, new, old) for new, old in zip(law_end, law))
        width = torch.where(ok, 0.5 * (b - a), 1.0).log().unsqueeze(-1)
        inside = ok.unsqueeze(-1) & (z > lower) & (z < upper)  # a node rounded onto an end has no mass
        z = torch.where(inside, z, fill)
        if laws:
            return torch.where(inside, law[0], 0.0), torch.where(inside, law[1], z), torch.where(inside, law[2], z)
        return z, width + w.log() + log_jac, torch.where(inside, rounding, 0.0)

    def evaluate(a, b, kind, origin, ok):
        a, b = torch.where(ok, a, 0.0), torch.where(ok, b, 1.0)
        z_whole, lw_whole, rounding_whole = panel_nodes(a, b, kind, origin, ok, whole_t, whole_w)
        z_half, lw_half, rounding_half = panel_nodes(a, b, kind, origin, ok, half_t, half_w)
        z = torch.cat((z_whole, z_half), -1)
        lu = log_u(z)
        residual = doubt = torch.zeros_like(z)
        found = _rounding_correction(log_u, a, b, kind, both_t, z, lu)
        if found is not None:
            residual, correction, doubt = found
            lu = lu + correction
        exponent = sum((torch.where(kind == end_kind, geometry.exponent[rows].unsqueeze(-1), 0.0)
                        for end_kind, geometry in end_of_kind.items()), torch.zeros_like(kind))
        end_correction = _end_rounding_correction(
            log_u, z, lu, torch.cat((rounding_whole, rounding_half), -1),
            *(v.unsqueeze(-1).expand(z.shape) for v in (kind.sign(), origin, exponent)))
        if end_correction is not None:
            lu = lu + end_correction
        empty = torch.where(ok, 0.0, -math.inf).unsqueeze(-1)
        whole = len(whole_t)
        return (z_whole, lw_whole + lu[..., :whole] + empty, z_half, lw_half + lu[..., whole:] + empty,
                residual[..., :whole], residual[..., whole:], doubt[..., whole:])

    want_stat = "expected_statistic" in wanted

    def integrands(z, centre, spread, residual=0.0):
        t = ((z - centre.reshape(-1, 1, 1)) + residual) / spread.reshape(-1, 1, 1)
        # (finite: a pool far narrower than its widest expert has t^2 beyond float64 at the mapped tails' far
        # nodes, whose mass is 0, and 0 * inf would make the rule's sums NaN)
        big = torch.finfo(high).max
        parts = [torch.ones_like(z).unsqueeze(-1), t.clamp(-big, big).unsqueeze(-1), (t * t).clamp_max(big).unsqueeze(-1)]
        if want_stat:
            parts.append(family.sufficient_statistic(z.reshape(-1)).reshape(z.shape + (-1,)).to(high))
        return torch.cat(parts, -1)

    pick = (~panel_valid).to(torch.int8).argsort(dim=-1, stable=True)[:, :int(panel_valid.sum(-1).max())]
    a, b, kind, origin, panel_valid = (x.gather(-1, pick) for x in (a, b, kind, origin, panel_valid))
    state = [a, b, kind, origin, panel_valid, *evaluate(a, b, kind, origin, panel_valid)]
    w, centre = expert_weights, expert_centre
    spread = ((w * (sd**2 + (mu - centre.unsqueeze(-1)) ** 2)).sum(-1) / w.sum(-1)).sqrt()
    shift = top
    # (rows, log_z, relative, centre, spread, z_half, lm_half, ok, r_half, doubt_half) of the pools done so far
    finished = []
    for round_ in itertools.count():
        a, b, kind, origin, panel_valid, z_whole, lm_whole, z_half, lm_half, r_whole, r_half, doubt_half = state
        shift = torch.maximum(shift, torch.maximum(lm_half.flatten(1).amax(-1), lm_whole.flatten(1).amax(-1)))
        m_whole = (lm_whole - shift.reshape(-1, 1, 1)).exp()
        m_half = (lm_half - shift.reshape(-1, 1, 1)).exp()
        total = m_half.sum((1, 2))
        ok = total > 0
        pi = m_half / torch.where(ok, total, 1.0).reshape(-1, 1, 1)
        centre_new = (pi * (z_half + r_half)).sum((1, 2))
        spread_sq = (pi * ((z_half - centre_new.reshape(-1, 1, 1)) + r_half) ** 2).sum((1, 2))
        update = ok & (spread_sq > 0) & torch.isfinite(spread_sq)
        centre = torch.where(update, centre_new, centre)
        spread = torch.where(update, spread_sq.clamp_min(0).sqrt(), spread)
        g_whole, g_half = integrands(z_whole, centre, spread, r_whole), integrands(z_half, centre, spread, r_half)
        i_whole = m_whole.unsqueeze(-1) * g_whole
        i_high, i_low = i_whole[:, :, :_GL_ORDER].sum(2), i_whole[:, :, _GL_ORDER:].sum(2)
        i_half = (m_half.unsqueeze(-1) * g_half).sum(2)
        scale = (m_half.unsqueeze(-1) * g_half.abs()).sum((1, 2))
        diff = torch.maximum((i_high - i_half).abs(), (i_low - i_half).abs())
        panel_error = (diff / torch.where(scale > 0, scale, 1.0).unsqueeze(1)).amax(-1)
        error = panel_error.sum(-1)
        done = ~ok | (error <= rtol) | (panel_valid.sum(-1) >= _MAX_PANELS) | (round_ >= _MAX_ROUNDS)
        splittable = panel_valid & ((b - a) > 1e-13 * torch.maximum(a.abs(), b.abs()) + 1e-300)
        key = torch.where(splittable, panel_error, -1.0)
        order = key.argsort(-1, descending=True)
        sorted_error = panel_error.gather(-1, order)
        needed = (error - rtol / 4).unsqueeze(-1)
        chosen_sorted = (sorted_error.cumsum(-1) - sorted_error < needed) & splittable.gather(-1, order)
        # and, unlike the one-pool rule, every panel above its share of rtol: a round costs a pass over the batch
        share = rtol / (4 * panel_valid.sum(-1, keepdim=True))
        chosen = torch.zeros_like(chosen_sorted).scatter(-1, order, chosen_sorted) | (splittable & (panel_error > share))
        done = done | ~chosen.any(-1)  # nothing left to split: the rule stays at its error
        if bool(done.any()):
            total_ok = torch.where(ok, total, 1.0)
            # the end panels' nodes' laws (for the gradient at the points they stand for), as evaluate placed them
            laws = panel_nodes(torch.where(panel_valid, a, 0.0), torch.where(panel_valid, b, 1.0), kind, origin,
                               panel_valid, half_t, half_w, laws=True)
            finished.append((rows[done], (shift + total_ok.log())[done], (diff.sum(1) / total_ok.unsqueeze(-1))[done],
                             centre[done], spread[done], z_half[done].flatten(1), lm_half[done].flatten(1), ok[done],
                             r_half[done].flatten(1), doubt_half[done].flatten(1),
                             *(law[done].flatten(1) for law in laws),
                             torch.where(panel_valid, kind, 0.0).unsqueeze(-1).expand(z_half.shape)[done].flatten(1)))
        if bool(done.all()):
            break
        # the pools still refined: their panels, with the chosen ones split in two
        going = ~done
        rows, shift, centre, spread = rows[going], shift[going], centre[going], spread[going]
        chosen = chosen[going]
        state = [x[going] for x in state]
        a, b, kind, origin, panel_valid = state[:5]
        width = int(chosen.sum(-1).max())
        pick = (~chosen).to(torch.int8).argsort(dim=-1, stable=True)[:, :width]
        ca, cb, ck, co, cv = (x.gather(-1, pick) for x in (a, b, kind, origin, chosen))
        mid = _split_points(ca, cb, ck)
        new = [torch.cat(pair, -1) for pair in ((ca, mid), (mid, cb), (ck, ck), (co, co), (cv, cv))]
        new += list(evaluate(*new))
        merged = [torch.cat((x, y), 1) for x, y in zip(state, new)]
        merged[4] = torch.cat((panel_valid & ~chosen, new[4]), -1)
        alive = merged[4]
        size = int(alive.sum(-1).max())
        pick = (~alive).to(torch.int8).argsort(dim=-1, stable=True)[:, :size]
        state = [x.gather(1, pick if x.dim() == 2 else pick.unsqueeze(-1).expand(-1, -1, x.shape[-1])) for x in merged]
        alive = state[4].unsqueeze(-1)
        state[6] = torch.where(alive, state[6], -math.inf)  # panels that were split carry no mass of their own
        state[8] = torch.where(alive, state[8], -math.inf)

    size = max(part[5].shape[1] for part in finished)
    order = torch.cat([part[0] for part in finished]).argsort()
    log_z, relative, centre, spread = (torch.cat([part[k] for part in finished])[order] for k in range(1, 5))
    ok = torch.cat([part[7] for part in finished])[order]
    z_half = torch.cat([torch.cat((part[5], part[5][:, :1].expand(-1, size - part[5].shape[1])), 1)
                        for part in finished])[order]
    lm_half = torch.cat([torch.nn.functional.pad(part[6], (0, size - part[6].shape[1]), value=-math.inf)
                         for part in finished])[order]
    r_half, doubt_half = (torch.cat([torch.nn.functional.pad(part[k], (0, size - part[k].shape[1]))
                                     for part in finished])[order] for k in (8, 9))
    # padded as z_half: t = 0 at the pool's first node, of no kind
    t_half, node_kind = (torch.cat([torch.nn.functional.pad(part[k], (0, size - part[k].shape[1]))
                                    for part in finished])[order] for k in (10, 13))
    near_half, far_half = (torch.cat([torch.cat((part[k], part[5][:, :1].expand(-1, size - part[k].shape[1])), 1)
                                      for part in finished])[order] for k in (11, 12))
    g = integrands(z_half.unsqueeze(1), centre, spread, r_half.unsqueeze(1)).squeeze(1).abs()
    rows = torch.arange(pools)  # every pool, for log_u
    unseen, end_shift = _unseen_errors(end_geometry, g, lm_half, log_z, z_half,
                                       lambda z: integrands(z.unsqueeze(1), centre, spread).squeeze(1),
                                       _log_q_term_size(family, params, log_weights, alpha, z_half), doubt_half)
    remainder, limit = _tail_remainders(tails, log_u, lambda z: integrands(z.unsqueeze(1), centre, spread).squeeze(1),
                                        log_z, relative.shape[-1])
    gradient = _gradient_nodes(end_geometry, z_half, lm_half, (t_half, near_half, far_half), node_kind, log_z)
    nodes = (z_half.T, lm_half.T, tuple(v.T for v in gradient))
    _, stats = _point_statistics(family, nodes[0], nodes[1], wanted, standard_errors=False, residuals=r_half.T)
    if "expected_statistic" in stats:  # shifted as in _quadrature_one
        value = stats["expected_statistic"].value
        stats["expected_statistic"] = stats["expected_statistic"]._replace(value=value + end_shift[:, 3:])
    return log_z, relative + unseen + remainder, limit, centre, spread, stats, nodes, count, ok


def _interior_point(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """A point strictly inside ``(lower, upper)``, elementwise (bounds possibly infinite), evaluated in place of points
    outside a support: densities and cdfs may raise or be infinite there."""
    both = torch.isfinite(lower) & torch.isfinite(upper)
    return torch.where(both, (lower + upper) / 2, torch.where(torch.isfinite(lower), lower + 1,
                                                              torch.where(torch.isfinite(upper), upper - 1, 0.0)))


def _towards_ends(points, lower, upper) -> list[np.ndarray]:
    """For each finite end, sorted: the outermost of the scanned ``points`` on its side and points beyond it, one per
    octave of the distance to the end down to the nearest point the end panel evaluates (:class:`_EndPanel`)."""
    sides = []
    for sign, end, edge in ((1.0, lower, points.min()), (-1.0, upper, points.max())):
        if math.isfinite(end):
            nearest = _NEAREST_AT_ZERO if end == 0 else _NEAREST_RELATIVE * abs(end)
            distance = sign * (edge - end)
            if distance > 2 * nearest:
                octaves = int(math.log2(distance) - math.log2(nearest))  # the ratio overflows past 1.8e8 at 0
                side = np.append(end + sign * distance * 2.0 ** -np.arange(1, octaves + 1), edge)
                sides.append(np.sort(side))
    return sides


def _switches(log_u, points, ell, alpha):
    """Where the largest (``alpha = inf``) or smallest (``-inf``) of the experts' densities ``ell`` at the sorted
    ``points`` changes hands between neighbouring points: the kinks of ``u``, each located by Brent's method."""
    active = ell.argmax(-1) if alpha > 0 else ell.argmin(-1)
    found = []
    for k in np.nonzero(active[1:] != active[:-1])[0]:
        i, j = active[k], active[k + 1]

        def gap(z, i=i, j=j):
            lp = log_u(np.array([z]), experts=True)[1][0]
            return lp[i] - lp[j]

        if gap(points[k]) * gap(points[k + 1]) <= 0:
            found.append(optimize.brentq(gap, points[k], points[k + 1], xtol=1e-300, rtol=1e-15))
    return found


def _deep_kinks(geometry: _EndPanel) -> np.ndarray:
    """The deep panel's variables (of its one pool, ``alpha = +-inf``) where two experts' power laws extrapolated below
    the nearest point cross: the kinks of their maximum (minimum), which can lie below any float next to the end (at
    1 - 1e-18 for the maximum of Beta(0.10, 0.052) and Beta(0.19, 0.059))."""
    ell, slope = geometry.expert_log_q[0].numpy(), geometry.expert_exponent[0].numpy()
    i, j = np.triu_indices(len(ell), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = (ell[j] - ell[i]) / (slope[i] - slope[j])  # log(d / nearest) where laws i and j meet
    depth = depth[np.isfinite(depth) & (depth < 0)]
    log_top = math.log(float(geometry.deep_top()[0]))
    x = np.exp(float(geometry.depth_power[0]) * (math.log(geometry.nearest) + depth - log_top))
    return np.unique(x[(x > 0) & (x < 1)])


#: an expert's standard deviation, for placing the panels, is at least this fraction of its mean's magnitude
_PLACEMENT_FLOOR = 1e-12
#: the smallest and largest standard deviations whose variance float64 holds (the square roots of the smallest
#: subnormal and of the largest float)
_SD_RANGE = (math.sqrt(math.ulp(0.0)), math.sqrt(np.finfo(np.float64).max))


def _placement_scale(mu, sd):
    """The experts' standard deviations ``sd`` (numpy arrays or tensors, as ``mu``) as the quadrature places its panels
    with them: at least ``_PLACEMENT_FLOOR`` of ``|mu|`` (an expert narrower than that is a few thousand floats wide
    at its place), and at least the smallest normal float where the mean is 0. The floor is relative, so that the
    panels scale with the experts: an absolute one, ``1e-12 (1 + |mu|)``, took Gamma experts of scale 1e-34 as 1e22
    times wider than they are; the scan for the pool's highest point and the bisection for the edges where ``log u``
    drops (1025 points and 50 steps over the experts' 64 such deviations) then resolved nothing finer than 5e-29, and
    a panel from the mean to a drop-off placed 1e5 of the experts' scales out had no node where the pool has mass, so
    its rules agreed at 0 and it was never split (log Z at alpha = -1 0.16 off with 1e-12 stated; at alpha = 0.7 and
    2 outside the certified bracket; experts of scale 1e-30 were still resolved). A variance outside float64's range
    (a Gamma's ``a / rate^2`` is 0 at rates beyond 1e154, inf below 1e-154) says only that the deviation is below
    ``_SD_RANGE[0]`` (above ``_SD_RANGE[1]``): where the floor does not already lie below it, the expert is taken as
    of the width of its mean, as a scale family's."""
    torch_in = isinstance(mu, torch.Tensor)
    m, s = (mu.detach().cpu().numpy(), sd.detach().cpu().numpy()) if torch_in else (mu, sd)
    magnitude = np.abs(m)
    floor = _PLACEMENT_FLOOR * magnitude
    unknown = np.isfinite(m) & (m != 0) & (((s == 0) & (floor < _SD_RANGE[0])) | (s == math.inf))
    out = np.where(unknown, np.where(s == 0, magnitude, np.maximum(magnitude, _SD_RANGE[1])),
                   np.maximum(s, np.maximum(floor, np.finfo(np.float64).tiny)))
    return torch.as_tensor(out, dtype=mu.dtype, device=mu.device) if torch_in else out


def _expert_points(mu: np.ndarray, sd: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """The experts' means +- up to 64 of their standard deviations that lie inside ``(lower, upper)`` (the means
    clipped inside it where none does)."""
    offsets = np.concatenate((-_EXPERT_OFFSETS[::-1], _EXPERT_OFFSETS[1:]))
    points = (mu[:, None] + sd[:, None] * offsets).ravel()
    points = points[(points > lower) & (points < upper)]
    if len(points) == 0:  # experts far narrower than their distance to a bound
        points = np.clip(mu, np.nextafter(lower, upper), np.nextafter(upper, lower))
    return points


def _quadrature_edges(log_u, mu, sd, lower, upper, alpha):
    """The initial panel edges (finite, sorted, inside the support), the largest ``log u`` found, and for ``alpha =
    +-inf`` the kinks of ``u`` between the scanned span and the finite ends (sorted; their place depends on the end
    panels, which the edges decide)."""
    expert_points = _expert_points(mu, sd, lower, upper)
    if not np.nextafter(lower, upper) < upper:  # no float inside: the ends, one of them inside the support
        expert_points = np.array([lower, upper])
    scan = np.linspace(expert_points.min(), expert_points.max(), _SCAN_POINTS)
    points = np.unique(np.concatenate((expert_points, scan)))
    values, ell = log_u(points, experts=True)
    switches, outer_switches = [], np.zeros(0)
    if math.isinf(alpha):  # u = max_j q_j (min_j q_j) has a kink wherever the largest (smallest) expert changes
        switches = _switches(log_u, points, ell, alpha)
        # next to a singular end the experts' power laws can cross far below the span (at 1 - 1.4e-7 for the maximum
        # of Beta(0.59, 0.21) and Beta(0.015, 0.03)), inside the end panel, whose rule missed that kink by 1e-7
        outer_switches = np.sort([kink for side in _towards_ends(points, lower, upper)
                                  for kink in _switches(log_u, side, log_u(side, experts=True)[1], alpha)])
    best = int(np.argmax(values))
    if not math.isfinite(values[best]):
        raise _VanishingPool("the pooled density vanishes numerically wherever the experts put their mass "
                         f"(alpha={alpha!r}); the pool is not normalisable numerically")

    def negative(z):
        value = float(log_u(np.array([z]))[0])
        return -value if math.isfinite(value) else math.inf

    left, right = points[max(best - 1, 0)], points[min(best + 1, len(points) - 1)]
    if right > left:
        refined = optimize.minimize_scalar(negative, bounds=(left, right), method="bounded",
                                           options={"xatol": 1e-12 * max(abs(points[best]), right - left)})
        if -refined.fun > values[best]:
            points = np.append(points, refined.x)
            values = np.append(values, -refined.fun)
            order = np.argsort(points)
            points, values = points[order], values[order]
            best = int(np.argmax(values))
    top = float(values[best])
    crossings = []
    for level in _LEVELS:  # where log u has dropped by `level` on each side of the highest point
        target = top - level
        for step in (-1, 1):
            index = best
            while 0 <= index + step < len(points) and values[index + step] >= target:
                index += step
            outer = index + step
            if not 0 <= outer < len(points):
                continue
            crossings.append(optimize.brentq(lambda z, target=target: max(-negative(z) - target, -1e300),
                                             points[index], points[outer], xtol=1e-300, rtol=1e-13))
    edges = np.concatenate((expert_points, [points[best]], crossings, switches,
                            [x for x in (lower, upper) if math.isfinite(x)]))
    return np.unique(edges[(edges >= lower) & (edges <= upper)]), top, outer_switches


def _expert_moments(family, params):
    """Means and variances of scalar experts ``batch + param_shape``: the family's where it gives them, otherwise (a
    ``CustomFamily`` without ``mean`` or ``variance``, a circular family) by quadrature of each expert's density; a
    family's own mean is kept when only its variance is missing, and where its variance is infinite, the variance of
    a Gaussian of the same density at the mean stands in for it. They place the pool's panels."""
    own_mean = family.has_numeric_moments and not family.circular
    # CustomFamily's mean and variance are optional independently; the built-in families have both
    if own_mean and getattr(family, "has_variance", True):
        mean, variance = family.mean(params), family.variance(params)
        # an infinite variance (a heavy tail) places no panels: a width from the density at the mean, below
        if bool(torch.isfinite(variance).all()):
            return mean, variance
    batch = params.shape[: params.dim() - len(family.param_shape)]
    flat = params.reshape((-1,) + tuple(family.param_shape))
    means = family.mean(flat).tolist() if own_mean else [None] * len(flat)
    infinite = [p for p, m in zip(flat, means) if m is not None and math.isinf(m)]
    if infinite:  # (it was told to give the family a mean, which it has)
        raise ValueError(f"{family.name}: an expert's mean is infinite (params={infinite[0].tolist()!r}): a pool of it "
                         "has no finite mean or variance to place the quadrature's panels by; pool experts with finite "
                         "means")
    own = [m if m is not None and math.isfinite(m) else None for m in means]
    lower, upper = family.support_interval
    moments = []
    for p, hint in zip(flat, own):
        def density(z, p=p):
            return math.exp(float(family.log_prob(p, torch.tensor(z, dtype=p.dtype, device=p.device))))

        centre = hint
        if centre is None:
            with warnings.catch_warnings():  # a first look: the quadrature about the centre below is the one kept
                warnings.simplefilter("ignore", integrate.IntegrationWarning)
                mass, first = (integrate.quad(lambda z, k=k: z**k * density(z), lower, upper, limit=200)[0]
                               for k in range(2))
            centre = first / mass if mass > 0 else math.nan
        if not lower <= centre <= upper:  # quad over the whole line can miss a narrow expert far from 0
            raise ValueError(f"{family.name}: quadrature found no mass in the density of an expert "
                             f"(params={p.tolist()!r}); give the family a `mean` (and `variance`) so that the "
                             "numerical engine can place its panels")
        at_mean = density(hint) if hint is not None else 0.0
        if at_mean > 0:
            # a family's own mean beside an infinite variance: the spread diverges (a quadrature's "finite part" of
            # it was 0 for a Cauchy-like expert at 0, whose tails then reached 2e-208), so the panels are placed by
            # the width of a Gaussian of the same density at the mean (the pool's own quadrature controls its error)
            width = 1 / (math.sqrt(2 * math.pi) * at_mean)
            if not width <= QUADRATURE_RANGE[1]:  # (a variance that overflowed, not a heavy tail: a Normal of scale 1e200)
                raise ValueError(f"{family.name}: an expert (params={p.tolist()!r}) is about {width:.3g} wide at its "
                                 f"mean {hint!r}, outside what the numerical engine resolves in float64 (widths up to "
                                 f"{QUADRATURE_RANGE[1]:g})")
            moments.append((hint, width**2))
            continue
        with warnings.catch_warnings():
            if hint is not None:  # (a family's own mean where its density is 0: the divergent spread's finite part)
                warnings.simplefilter("ignore", integrate.IntegrationWarning)
            mass, offset, spread = _moments_about(density, lower, upper, centre)
        if not mass > 0:
            raise ValueError(f"{family.name}: quadrature found no mass in the density of an expert "
                             f"(params={p.tolist()!r}) about its mean {centre!r}; give the family a `variance`")
        moments.append((centre + offset / mass if hint is None else hint, max(spread / mass - (offset / mass) ** 2, 0.0)))
    mean = torch.tensor([m for m, _ in moments], dtype=params.dtype, device=params.device)
    variance = torch.tensor([v for _, v in moments], dtype=params.dtype, device=params.device)
    return mean.reshape(batch), variance.reshape(batch)


def _moments_about(density, lower: float, upper: float, centre: float) -> tuple[float, float, float]:
    """``int (z - centre)^k density(z) dz`` for ``k = 0, 1, 2`` over ``(lower, upper)``, in the variable ``t = (z -
    centre) / |centre|`` on each side of the centre: the whole line in ``z`` left quad to find an expert of scale 1e5
    (it warned, or found no mass) even given its mean."""
    scale = abs(centre) if centre != 0 else 1.0
    sides = [((lower - centre) / scale, 0.0), (0.0, (upper - centre) / scale)]
    # t^k, scaled afterwards: quad's absolute tolerance (1.5e-8) is then one of the variable t, whatever the scale
    return tuple(scale**k * sum(integrate.quad(lambda t, k=k: t**k * density(centre + scale * t) * scale, a, b,
                                               limit=200)[0] for a, b in sides if a < b)
                 for k in range(3))


# ---------------------------------------------------------------------------------- grid
def grid_estimate(family, params, log_weights, alpha, wanted, nodes_per_panel: int = 10,
                  keep_nodes: bool = False) -> PoolEstimate:
    """Tensor-product Gauss–Legendre quadrature for Gaussian pools of dimension <= 3, one pool at a time, in float64
    whatever the experts' dtype (the results come back in that dtype).

    The box lies along the principal axes of the experts' mean covariance (:func:`_principal_axes`) and spans every
    present expert's mean +- 12 standard deviations along them (outside it the
    pool, bounded by ``max_j q_j`` for ``alpha > 0`` and by ``min_j q_j`` below, has mass < 1e-30), its axes split
    by expert scale (:func:`_grid_edges`). A first pass locates the pool; the rule splits the panels around the
    pool's own core (+-12 of its standard deviations) too, which matters for ``alpha < 0`` pools, narrower than
    every expert; a core narrower than the locating pass's nodes is located again on panels split around it
    (up to ``_LOCATING_PASSES`` passes). The reported error is the difference from the rule with
    ``nodes_per_panel - 4`` nodes on the same panels; at alpha = +-inf, whose kinks cross the panels, the result
    on halved panels, its error the larger of that difference and the one from the unhalved panels (in 3-D, the
    unhalved result, its error the larger difference from ``nodes_per_panel - 4`` and ``- 2`` nodes), and from the
    rule on panels whose edges are shifted (:func:`_shifted_edges`), that error then tripled (``_KINKED_SAFETY``).
    The rule runs on the experts moved by a float near their centre (:func:`_about_their_centre`).
    """
    dtype = params.dtype
    batch, pools = _each_pool(family, *_in_float64(params, log_weights))
    rows, nodes = [], []
    for p, lw in pools:
        p, offset = _about_their_centre(family, p, lw)
        directions = _principal_axes(family, p, lw)
        p_axes = _rotated(family, p, directions)
        edges = _grid_edges(family, p_axes, lw)
        for _ in range(_LOCATING_PASSES):
            located = _grid_one(family, p, lw, alpha, {"mean", "variance"}, nodes_per_panel, edges,
                                core_width=_CORE_WIDTH, directions=directions)
            # a pool narrower than the pass's nodes (alpha < 0 between experts far apart) is located, not resolved:
            # its core is taken at least a few of those nodes wide, and located again on panels split around it
            mean = located["core_mean"].reshape(-1).cpu().numpy()
            spacing = []
            for axis_edges, m in zip(edges, mean):
                index = int(np.clip(np.searchsorted(axis_edges, m), 1, len(axis_edges) - 1))
                spacing.append((axis_edges[index] - axis_edges[index - 1]) / nodes_per_panel)
            sd = located["core_variance"].sqrt()
            spacing = torch.as_tensor(spacing, dtype=p.dtype, device=p.device).reshape(sd.shape)
            spread = torch.maximum(sd, spacing)
            # all panels on the pool's core when the pass puts (numerically) no mass outside it
            core_only = bool(located["log_mass_outside_core"] - located["log_normalizer"] < math.log(1e-16))
            edges = _grid_edges(family, p_axes, lw, located["core_mean"], spread, core_only=core_only)
            if bool((sd > spacing).all()):
                break
        # at alpha = +-inf the integrand has kinks where the experts cross, through the panels, and rules of 10 and
        # 6 nodes can agree by accident (two Gaussians of a common covariance in 2-D: 11 stated errors off): the rule
        # runs on halved panels too, the finer result is kept and the error is the larger difference; in 3-D, where
        # halving costs eight times the nodes (4 GB), a rule of 8 nodes is compared as well. A kink along a panel
        # edge (two experts one above the other cross along the core's centre, an edge) leaves slivers that every
        # rule on those edges misses alike (8.5e8 stated errors off): the rule also runs on edges shifted off them
        rule = functools.partial(_grid_one, family, p, lw, alpha, wanted, offset=offset, directions=directions)

        # beyond [0, 1] the power mean follows the smallest (largest) expert to within 1 / |alpha| nats of their
        # crossing, as sharp as a kink where the experts lie far apart (three Normals 18 of their scales apart at
        # alpha = -1: the 10- and 6-node rules agreed on a mean 31 of their differences off): there the rule also runs
        # on shifted edges, and where that disagrees by more than _KINKED_SAFETY times their difference, the pool is
        # taken as kinked
        panels = _panel_variants(edges)
        done = {}  # (nodes per panel, panels' name) -> the rule's result: none runs twice
        kinked = math.isinf(alpha)
        rules = [(nodes_per_panel, "edges"), (nodes_per_panel - 4, "edges")]
        if not kinked and not 0 <= alpha <= 1:
            for key in rules + [(nodes_per_panel, "shifted")]:
                done[key] = rule(key[0], panels[key[1]])
            fine, coarse, shifted = done.values()
            kinked = any(bool(((fine[name] - shifted[name]).abs()
                               > _KINKED_SAFETY * (fine[name] - coarse[name]).abs() + 1e-12 * fine[name].abs()).any())
                         for name in ("log_normalizer", "mean", "variance") if name in fine)
        if kinked:
            rules = _kinked_rules(len(edges), nodes_per_panel)
        for key in rules:
            if key not in done:
                done[key] = rule(key[0], panels[key[1]])
        results = [done[key] for key in rules]
        fine = results[0]
        nodes.append(fine.pop("nodes"))
        error = {name: torch.zeros_like(value) for name, value in fine.items()}
        for coarse in results[1:]:
            error = {name: torch.maximum(error[name], (fine[name] - coarse[name]).abs()) for name in fine}
        if kinked:
            # where a kink falls within a panel varies from rule to rule, so their differences scatter about the
            # error: over 800 random 2-D pairs 2 % were up to 2.2 times their largest difference off, in 3-D 3 of 50
            # up to 1.5 times
            error = {name: _KINKED_SAFETY * value for name, value in error.items()}
        rows.append({name: Estimate(fine[name].to(dtype), error[name].to(dtype)) for name in fine})
    est = _stack_pools("grid", rows, batch, wanted)
    return replace(est, nodes=_pad_nodes(nodes, batch, params.device)) if keep_nodes else est


def _panel_variants(edges) -> dict:
    """The grid's panel edges by name: as located (``"edges"``), every inner edge shifted (``"shifted"``), halved
    (``"halved"``) and halved then shifted (``"halved, shifted"``)."""
    halved = [np.sort(np.concatenate((e, 0.5 * (e[1:] + e[:-1])))) for e in edges]
    return {"edges": edges, "shifted": [_shifted_edges(e) for e in edges], "halved": halved,
            "halved, shifted": [_shifted_edges(e) for e in halved]}


def _kinked_rules(dim: int, nodes_per_panel: int) -> list:
    """The rules ``(nodes per panel, panels' name)`` of a kinked pool, the first the result: in 2-D the rule on
    halved panels, compared with the unhalved one and with fewer nodes on the halved panels; in 3-D (halving costs
    eight times the nodes) the rule compared with 6 and 8 nodes; and in both with the rule on edges shifted off a
    kink along an edge."""
    if dim <= 2:
        return [(nodes_per_panel, "halved"), (nodes_per_panel, "edges"), (nodes_per_panel - 4, "halved"),
                (nodes_per_panel, "halved, shifted")]
    return [(nodes_per_panel, "edges"), (nodes_per_panel - 4, "edges"), (nodes_per_panel - 2, "edges"),
            (nodes_per_panel, "shifted")]


def _shifted_edges(edges, fraction: float = 0.37):
    """``edges`` with every inner edge moved ``fraction`` of the way to the next (not a dyadic fraction, so that no
    moved edge meets an edge or a halving point of the original)."""
    moved = edges[1:-1] + fraction * (edges[2:] - edges[1:-1])
    return np.concatenate((edges[:1], moved, edges[-1:]))


def _about_their_centre(family, params, log_weights):
    """Gaussian experts' parameters with their locations less ``offset``, a float near their weighted centre, and
    that offset: a pool moves with its experts, and about their centre the rule's nodes keep the digits their place
    would cost (2-D experts of scale 1e-10 at 1e3: log Z 1.9e-4 off with 3e-5 stated; of scale 1e-13 at 0.7, a
    thousand floats per axis, outside its certified bracket). The differences are exact for experts within a factor
    two of it (Sterbenz)."""
    loc, rest = family.split(params)
    weights = torch.softmax(log_weights, -1).reshape((-1,) + (1,) * (loc.dim() - 1))
    offset = (weights * loc).sum(0)
    return family.join(loc - offset, rest), offset


def _principal_axes(family, params, log_weights):
    """For full-covariance experts, the eigenvectors (columns) of their weighted mean covariance: the grid's axes.
    Panels along the coordinate axes, sized by marginal standard deviations, left a pool of experts of correlation
    0.99 (conditional widths a seventh of the marginal ones) under-resolved: log Z 2 nats off at alpha = -1. None
    (the coordinate axes) for scalar and diagonal experts."""
    if not isinstance(family, MultivariateNormalFamily):
        return None
    present = log_weights > -math.inf
    weights = torch.softmax(log_weights[present], -1)
    covariance = (weights[:, None, None] * family.covariance(params[present])).sum(0)
    # equal variances leave the axes free within their plane (correlation 0.999 in 3-D: two at 1e-3), where the
    # pool of experts apart along it is a ridge across the axes, narrower than the nodes (its covariance 8.6 stated
    # errors off): a scatter of the means, a billionth of the covariance's size, turns them towards the ridge
    loc = family.mean(params[present])
    deviation = loc - (weights[:, None] * loc).sum(0)
    scatter = (weights[:, None, None] * deviation[:, :, None] * deviation[:, None, :]).sum(0)
    size, scatter_size = torch.linalg.matrix_norm(covariance, 2), torch.linalg.matrix_norm(scatter, 2)
    if scatter_size > 0:
        covariance = covariance + 1e-9 * size / scatter_size * scatter
    return torch.linalg.eigh(covariance).eigenvectors


def _rotated(family, params, axes):
    """The experts in the coordinates ``u = axes^T z`` (``axes`` orthogonal; None: unchanged): the same densities,
    the Jacobian being one."""
    if axes is None:
        return params
    loc, precision = family.split(params)
    return family.join(loc @ axes, axes.transpose(-1, -2) @ precision @ axes)


def _grid_edges(family, params, log_weights, centre=None, spread=None, nodes_per_panel: int = 10,
                core_only: bool = False):
    """Panel edges per dimension over the experts' box (every present expert's mean +- 12 marginal standard
    deviations), bisected where they are widest relative to the narrowest expert near them (:func:`_split_panels`),
    so that experts of very different scales are each resolved within the node budget; with ``centre`` and
    ``spread`` the pool's core (``centre +- _CORE_WIDTH spread``) counts as one more expert; with ``core_only`` the
    box is cut to the core."""
    present = log_weights > -math.inf
    loc = family.mean(params)[present]
    sd = family.variance(params)[present].sqrt()
    if loc.dim() == 1:  # scalar Normal experts
        loc, sd = loc.unsqueeze(-1), sd.unsqueeze(-1)
    dim = loc.shape[-1]
    max_panels = max(2, _GRID_NODES_PER_DIM[dim] // nodes_per_panel)
    all_edges = []
    for d in range(dim):
        centres, scales = loc[:, d].cpu().numpy(), sd[:, d].cpu().numpy()
        lower, upper = float((centres - 12 * scales).min()), float((centres + 12 * scales).max())
        if centre is not None:
            c, s = float(centre.reshape(-1)[d]), float(spread.reshape(-1)[d])
            if core_only:
                lower, upper = max(lower, c - _CORE_WIDTH * s), min(upper, c + _CORE_WIDTH * s)
            centres, scales = np.append(centres, c), np.append(scales, s * _CORE_WIDTH / 12)
        all_edges.append(_split_panels(lower, upper, centres, scales, max_panels))
    return all_edges


def _split_panels(lower: float, upper: float, centres, scales, max_panels: int):
    """Edges from ``[lower, upper]`` by bisecting, one at a time, the panel widest in units of the narrowest
    standard deviation among the experts (``centres``, ``scales``) whose +-8 standard deviations reach it, until every
    panel is at most ``_GRID_PANEL_WIDTH`` of them wide or there are ``max_panels``."""
    edges = [lower, upper]
    while len(edges) - 1 < max_panels:
        a, b = np.array(edges[:-1]), np.array(edges[1:])
        near = (a[:, None] <= centres + 8 * scales) & (b[:, None] >= centres - 8 * scales)
        widths = (b - a) / np.where(near, scales, np.inf).min(-1)
        worst = int(np.argmax(widths))
        if widths[worst] <= _GRID_PANEL_WIDTH:
            break
        edges.insert(worst + 1, 0.5 * (a[worst] + b[worst]))
    return np.array(edges)


def _grid_one(family, params, log_weights, alpha, wanted, nodes_per_panel, edges_per_dim, core_width=None,
              offset=0.0, directions=None):
    """The rule on the given panels, along ``directions`` (the columns of an orthogonal matrix; None: the coordinate
    axes); with ``core_width`` also the log-mass outside mean +- core_width sd and that mean and variance along the
    directions (``core_mean``, ``core_variance``). With ``offset``, the experts ``params`` are the pool's moved by
    ``-offset``: the mean, the statistics and the nodes returned are the pool's own."""
    gl_nodes, gl_weights = np.polynomial.legendre.leggauss(nodes_per_panel)
    axes, axis_weights = [], []
    for edges in edges_per_dim:
        half = 0.5 * np.diff(edges)
        mid = 0.5 * (edges[1:] + edges[:-1])
        axes.append(torch.tensor((mid[:, None] + half[:, None] * gl_nodes).ravel(), dtype=params.dtype))
        axis_weights.append(torch.tensor((half[:, None] * gl_weights).ravel(), dtype=params.dtype))
    dim = len(edges_per_dim)
    grid = torch.cartesian_prod(*axes).reshape(-1, dim).to(params.device)
    log_node_w = torch.cartesian_prod(*[w.log() for w in axis_weights]).reshape(-1, dim).sum(-1).to(params.device)
    value_shape = () if family.event_shape == () else (dim,)
    along = grid  # the nodes u along the directions, at the points z = directions u
    if directions is not None:
        grid = along @ directions.transpose(-1, -2)
    log_w = torch.cat([
        log_power_mean(expert_log_probs(family, params, chunk.reshape(chunk.shape[:1] + value_shape)),
                       log_weights, alpha)
        for chunk in grid.split(_GRID_CHUNK)
    ]) + log_node_w
    points = grid.reshape(grid.shape[:1] + value_shape)
    log_z, stats = _point_statistics(family, points, log_w, wanted - {"expected_statistic"}, standard_errors=False)
    if "expected_statistic" in wanted:  # of the pool's own points
        stats.update(_point_statistics(family, points + offset, log_w, {"expected_statistic"}, False)[1])
    out = {"log_normalizer": log_z, **{name: est.value for name, est in stats.items() if name in wanted}}
    out["nodes"] = (points + offset, log_w)
    if core_width is not None:
        core = stats if directions is None else \
            _point_statistics(family, along.reshape(points.shape), log_w, {"mean", "variance"}, False)[1]
        out["core_mean"], out["core_variance"] = core["mean"].value, core["variance"].value
        spread = core_width * out["core_variance"].sqrt().reshape(-1)
        outside = ((along - out["core_mean"].reshape(-1)).abs() > spread).any(-1)
        out["log_mass_outside_core"] = torch.logsumexp(torch.where(outside, log_w, -math.inf), dim=0)
    if "mean" in out:
        out["mean"] = out["mean"] + offset
    return out


# ----------------------------------------------------------------------------- importance
@dataclass(frozen=True)
class Envelope:
    """A normalised exact pool ``proposal`` (an object with ``sample``, ``log_weights``, ``alpha`` and
    ``log_normalizer``) of the same experts, with ``u(z) <= exp(log_bound) * proposal(z)``."""

    proposal: object
    log_bound: torch.Tensor
    description: str

    def log_ratio(self, log_u, ell):
        """``log u(z) - log p(z) - log B`` (<= 0) from the experts' log-densities ``ell`` at z."""
        p = self.proposal
        log_p = log_power_mean(ell, p.log_weights, p.alpha) - p.log_normalizer
        return log_u - log_p - self.log_bound


def _log_target_and_ratio(family, params, log_weights, alpha, envelope, z, chunk_size):
    log_u, ratio = [], []
    for chunk in z.split(chunk_size):
        ell = expert_log_probs(family, params, chunk)
        lu = log_power_mean(ell, log_weights, alpha)
        log_u.append(lu)
        ratio.append(envelope.log_ratio(lu, ell))
    return torch.cat(log_u), torch.cat(ratio)


def importance_estimate(family, params, log_weights, alpha, envelope: Envelope, wanted, num_samples: int,
                        chunk_size: int = 8192, keep_nodes: bool = False) -> PoolEstimate:
    """Importance sampling from the envelope's proposal: ``Z = E_p[u/p]`` (unbiased, bounded weights)
    and self-normalised moments, each with its delta-method standard error."""
    with torch.no_grad():
        z = envelope.proposal.sample((num_samples,))
        _warn_if_clamped(z, family)
        log_u, log_ratio = _log_target_and_ratio(family, params, log_weights, alpha, envelope, z, chunk_size)
        log_w = log_ratio + envelope.log_bound  # log(u / p)
        log_z = torch.logsumexp(log_w, dim=0) - math.log(num_samples)
        w = torch.exp(log_w - log_w.amax(0))
        # plus the rounding of the weights' logs and of their sum, which nearly constant weights leave as the whole
        # error (two experts 30 sd apart at alpha = 2: log Z 16 ulps off, a standard error of under 2)
        rounding = _TERM_ROUNDING * (1 + log_u.abs().nan_to_num(posinf=0.0).amax(0)
                                     + log_ratio.abs().nan_to_num(posinf=0.0).amax(0)
                                     + envelope.log_bound.abs() + math.log(num_samples))
        rel_se = w.std(0) / (w.mean(0) * math.sqrt(num_samples)) + rounding
        ess = w.sum(0) ** 2 / (w * w).sum(0)
        _, stats = _point_statistics(family, z.to(params.dtype), log_w, wanted, standard_errors=True)
    return _finish("importance", "standard error", log_z, rel_se, stats, wanted, effective_sample_size=ess,
                   num_samples=num_samples, nodes=(z, log_w) if keep_nodes else None)


def _warn_if_clamped(z, family):
    """torch's Gamma, Beta and Dirichlet samplers clamp draws below the smallest normal float to it: concentrations
    of a few thousandths put a share of a Dirichlet's coordinates there (far more in float32), and the weights and
    statistics (``log z``) at those points bias the estimate far beyond its standard error. Next to a finite upper
    end of the support the floats are too coarse instead: torch's Beta rounds draws within 1.1e-16 of 1 onto the
    largest float below it, where ``log(1 - z)`` keeps no digit (a pool with a Beta(0.7, 0.1) expert put 2.5 % of
    its draws there, and its ``E[log(1 - z)]`` came out 0.09 off, 10 standard errors at 1e6 draws). Draws at the
    clamp, or within 8 ulps of such an end, are flagged, not silently used (the pools of these families draw in
    float64, :meth:`HolderPool._importance_pool`, where concentrations of a few thousandths still reach the
    clamp)."""
    if not z.is_floating_point():
        return
    clamped = int((z == torch.finfo(z.dtype).tiny).sum())
    if clamped:
        warnings.warn(f"importance sampling: {clamped} coordinates of the {z.shape[0]} proposals were clamped to the "
                      f"smallest normal {z.dtype} by torch's sampler (concentrations this small put mass below it); "
                      "the estimate is biased beyond its stated error; a pool of scalar experts can use "
                      "method='quadrature'", RuntimeWarning, stacklevel=4)
    upper = (family.support_interval or (-math.inf, math.inf))[1]
    if math.isfinite(upper):
        rounded = int(((upper - z) <= 8 * torch.finfo(z.dtype).eps * max(abs(upper), 1.0)).sum())
        if rounded:
            warnings.warn(f"importance sampling: {rounded} of the {z.shape[0]} proposals lie within 8 ulps of the "
                          f"support's upper end {upper:g}, where the floats cannot resolve their distance to it "
                          "(torch's sampler rounds draws there onto the largest float below it); the estimate is "
                          "biased beyond its stated error; method='quadrature' resolves that end",
                          RuntimeWarning, stacklevel=4)


def rejection_sample(family, params, log_weights, alpha, envelope: Envelope, num_samples: int,
                     max_rounds: int = 1000, chunk_size: int = 8192) -> torch.Tensor:
    """Exact samples ``(num_samples,) + batch + event`` by rejection from the envelope.

    Accepted draws are independent, so each pool fills its sample slots in order whatever proposal accepted them
    (each slot waiting for its own proposal wasted the surplus: an acceptance rate of 6e-3 failed to give 1e4 samples
    from 1e7 proposals). Raises ``RuntimeError`` if a proposal violates the envelope bound (which would bias the
    samples) or if ``max_rounds`` rounds of ``num_samples`` proposals leave some slots empty.
    """
    batch = params.shape[: params.dim() - len(family.param_shape) - 1]
    out, count = None, None
    for _ in range(max_rounds):
        z = envelope.proposal.sample((num_samples,))
        log_u, log_ratio = _log_target_and_ratio(family, params, log_weights, alpha, envelope, z, chunk_size)
        slack = 1e3 * torch.finfo(log_u.dtype).eps * (1 + log_u.abs())
        if bool((log_ratio > slack).any()):
            worst = float((log_ratio - slack).max())
            raise RuntimeError(f"rejection sampler: the envelope ({envelope.description}) is exceeded by a factor "
                               f"exp({worst:.3g}) at a proposed point; the samples would be biased")
        accept = (torch.rand_like(log_ratio).log() < log_ratio).reshape(num_samples, -1)  # (S, pools)
        draws = z.reshape(accept.shape + (-1,))  # (S, pools, event numel)
        if out is None:
            # one spare slot at the end takes the accepted draws no slot is left for
            out = draws.new_zeros((num_samples + 1,) + draws.shape[1:])
            count = torch.zeros(accept.shape[1], dtype=torch.long, device=accept.device)
        slot = count + accept.cumsum(0) - 1
        slot = torch.where(accept & (slot < num_samples), slot, num_samples)
        out.scatter_(0, slot.unsqueeze(-1).expand(draws.shape), draws)
        count = (count + accept.sum(0)).clamp_max(num_samples)
        if bool((count == num_samples).all()):
            return out[:num_samples].reshape(z.shape)
    rate = float(count.sum()) / (num_samples * count.numel())
    raise RuntimeError(f"rejection sampler: after {max_rounds} rounds only {rate:.1%} of the {num_samples} x "
                       f"{math.prod(batch)} requested samples were accepted; the envelope ({envelope.description}) "
                       "is too loose for these experts")
