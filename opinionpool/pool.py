r"""Hölder pooling :math:`q(z) \propto (\sum_j \lambda_j q_j(z)^\alpha)^{1/\alpha}` of exponential-family experts.

Exact cases:

* :math:`\alpha \to 0` (``alpha=0``): the log-linear pool :math:`\propto \prod_j q_j^{\lambda_j}`, one family
  member with :math:`\eta = \sum_j \lambda_j\eta_j`.
* :math:`\alpha = 1/n`: the multinomial expansion
  :math:`(\sum_j \lambda_j q_j^{1/n})^n = \sum_{|k|=n} \binom{n}{k} \prod_j \lambda_j^{k_j}\prod_j q_j^{k_j/n}`
  in which each :math:`\prod_j q_j^{k_j/n}` is the Chernoff coefficient :math:`C_{k/n}` times the normalised
  family member at :math:`\sum_j (k_j/n)\eta_j` (a convex combination, so always a valid parameter).
  The pool is therefore an exact finite mixture with :math:`\binom{n+M-1}{M-1}` components;
  :math:`\alpha = 1` is the mixture of experts.

Every other alpha (and ``+-inf``) goes through the numerical engine of :mod:`opinionpool.numerical`
(:class:`NumericalHolderPool`), whose importance sampler and rejection sampler use the exact pools
above as envelopes.

All mixture weights are handled as log-weights (``log_mixture_weights``) so that Chernoff
coefficients far below the float range (routine at latent size 512) never underflow to zero.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import sys
import warnings
import weakref
from dataclasses import replace
from fractions import Fraction
from functools import lru_cache

import numpy as np
import torch
from scipy import optimize
from torch.distributions import (
    Categorical,
    Distribution,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)
from torch.distributions.transforms import Transform

from ._hellinger import hellinger_moments, standing_in
from ._validation import (
    check_alpha,
    check_num_samples,
    check_positive_int,
    check_real,
    check_sample_shape,
    check_seed,
    check_weights,
    describe,
    real_tensor,
    validation_enabled,
)
from .experts import Experts, as_experts
from .families import DiagonalNormalFamily, ExponentialFamily, NormalFamily, family_of, params_of
from .families.base import safe_log
from .families.continuous import DirichletFamily
from .numerical import (
    DEFAULT_RTOL,
    Envelope,
    Estimate,
    PoolEstimate,
    _in_float64,
    check_method,
    check_other_log_prob,
    check_quantities,
    check_rtol,
    differentiable_estimates,
    divergence_at_nodes,
    enumerate_support,
    enumeration_estimate,
    expert_log_probs,
    grid_estimate,
    importance_estimate,
    in_dtype,
    log_power_mean,
    quadrature_entropy,
    quadrature_estimate,
    quadrature_log_mass,
    rejection_sample,
    rounded,
    seeded,
)

__all__ = [
    "holder", "HolderPool", "NumericalHolderPool", "poe", "moe", "hellinger", "exact_order", "DEFAULT_MAX_COMPONENTS",
]

DEFAULT_MAX_COMPONENTS = 4096
#: estimates are checked against the bracket from exact pools of at most this many components (a quick check)
_CHECK_COMPONENTS = 256
#: a quantile's bracket between quadrature nodes across which the pooled log-density falls by more than this many
#: nats is solved on the tail's adaptive mass instead of a 32-point rule between the nodes
_STEEP_NATS = 30.0
#: the factor by which a quantile's bracket towards an infinite end grows until it holds the quantile
_BRACKET_GROWTH = 2.0**16
#: scalar numerical pools sample by inverting their cdf where the rejection envelope accepts less than this share
#: of its proposals (1000 rounds at 5% leave a slot empty with probability 5e-23)
_MIN_ACCEPTANCE = 0.05


def exact_order(alpha: float) -> int | None:
    """``0`` for the log-linear pool, ``n`` for ``alpha = 1/n``, ``None`` when there is no closed form. An alpha whose
    inverse lies within ``1e-9 n`` of ``n`` counts as ``1/n`` (``1 / 3`` as a float is not exactly a third): its pool
    is the exact ``1/n`` pool, the order off by at most that much."""
    if alpha == 0:
        return 0
    if not (0 < alpha <= 1) or math.isinf(alpha):
        return None
    inverse = 1 / alpha
    if math.isinf(inverse):  # subnormal alpha: 1/alpha overflows a float, but is exactly a (huge) integer
        return round(1 / Fraction(alpha))
    n = round(inverse)
    return n if abs(inverse - n) <= 1e-9 * n else None


def num_components(order: int, num_experts: int) -> int:
    """``binom(order + M - 1, M - 1)``; an exact integer, so bound it first (``within_max_components``)."""
    return 1 if order == 0 else math.comb(order + num_experts - 1, num_experts - 1)


def log_num_components(order: int, num_experts: int) -> float:
    """``log binom(order + M - 1, M - 1)`` in floating point, without forming the integer (``alpha = 1e-12``
    gives ``order = 10**12``, a subnormal alpha ``order = 2**1074``)."""
    k = min(order, num_experts - 1)
    # a list, not a generator: torch.compile traces a list of constants through math.fsum, not a generator
    return math.fsum([math.log(order + num_experts - 1 - i) for i in range(k)]) - math.lgamma(k + 1)


def within_max_components(order: int, num_experts: int, max_components: int) -> bool:
    """Whether the exact pool of order ``order`` has at most ``max_components`` components (decided in
    log-space first, so that a huge order costs nothing)."""
    if log_num_components(order, num_experts) > math.log(max_components) + 1e-9:
        return False
    return num_components(order, num_experts) <= max_components


def _format_count(log_count: float, exact) -> str:
    """An integer in full up to 15 digits, else as ``about 2.02e+323`` (from its natural log)."""
    if log_count < 15 * math.log(10):
        return str(exact())
    exponent = math.floor(log_count / math.log(10))
    return f"about {math.exp(log_count - exponent * math.log(10)):.3g}e+{exponent}"


def check_max_components(alpha, order: int, num_experts: int, max_components: int) -> None:
    """Refuse, before anything is built, an exact pool with more than ``max_components`` components."""
    if within_max_components(order, num_experts, max_components):
        return
    count = _format_count(log_num_components(order, num_experts), lambda: num_components(order, num_experts))
    n = _format_count(math.log(order), lambda: order)
    raise ValueError(f"alpha={alpha!r} is 1/n with n={n}, whose exact pool of {num_experts} experts has "
                     f"binom(n + {num_experts - 1}, {num_experts - 1}) = {count} mixture components, more than "
                     f"max_components={max_components}; raise max_components to allow it")


@lru_cache(maxsize=128)
def _compositions(order: int, num_experts: int):
    """All ``k`` with ``sum k = order`` over ``num_experts`` experts, as (expert index, count) pairs
    padded to ``min(order, num_experts)`` slots (padding has count 0)."""
    slots = min(order, num_experts)
    indices, counts, log_multinomial = [], [], []
    # The count vectors k in decreasing lexicographic order (that of itertools.combinations_with_replacement),
    # each from the previous in O(M): the cost is O(C M), not O(C n) (n runs to max_components for two experts).
    k = [order] + [0] * (num_experts - 1)
    while True:
        items = [(i, c) for i, c in enumerate(k) if c]
        log_multinomial.append(math.lgamma(order + 1) - sum(math.lgamma(c + 1) for _, c in items))
        items += [(0, 0)] * (slots - len(items))
        indices.append([i for i, _ in items])
        counts.append([c for _, c in items])
        last = next((i for i in range(num_experts - 2, -1, -1) if k[i]), None)
        if last is None:
            return indices, counts, log_multinomial
        tail = sum(k[last + 1:])
        k[last] -= 1
        k[last + 1:] = [tail + 1] + [0] * (num_experts - last - 2)


def compositions(order: int, num_experts: int, device=None, dtype=None):
    """``(index, count)`` tensors of shape ``(C, S)`` and the log multinomial coefficients ``(C,)``."""
    indices, counts, log_multinomial = _compositions(order, num_experts)
    return (torch.tensor(indices, dtype=torch.long, device=device),
            torch.tensor(counts, dtype=torch.long, device=device),
            torch.tensor(log_multinomial, dtype=dtype, device=device))


def normalized_log_weights(weights, num_experts: int, *, dtype, device, mask=None,
                           validate: bool = True) -> torch.Tensor:
    """Log of the pooling weights normalised to sum to one over present experts (``-inf`` for absent ones).

    Zero weights become ``-inf`` without ever evaluating ``log(0)``, so gradients stay finite (a zero weight's
    own gradient is zero: the expert is removed, see :func:`holder`).
    """
    if weights is None:
        w = torch.ones(num_experts, dtype=dtype, device=device)
    else:
        w = real_tensor("weights", weights, dtype=dtype, device=device)
        if validate:
            check_weights("weights", w, num_experts)
    log_w = log_of_weights(w, mask)
    return log_w - torch.logsumexp(log_w, dim=-1, keepdim=True)


def check_batches_broadcast(experts_batch: torch.Size, weights_batch: torch.Size) -> None:
    """Weights with batch axes of their own must broadcast against the experts' (one weight vector per row)."""
    try:
        torch.broadcast_shapes(experts_batch, weights_batch)
    except RuntimeError:
        raise ValueError(f"weights with batch shape {tuple(weights_batch)} do not broadcast against the experts' "
                         f"batch_shape {tuple(experts_batch)}") from None


def log_of_weights(weights: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """``log(weights)`` with ``-inf`` for zero weights and absent experts, never evaluating ``log(0)``
    (whose gradient would be infinite)."""
    log_weights = safe_log(weights)
    return log_weights if present is None else torch.where(present, log_weights, -math.inf)


def geometric_combination(experts: Experts, log_weights: torch.Tensor):
    """The family member proportional to ``prod_j q_j^(w_j)`` and ``log int prod_j q_j^(w_j)`` (meaningful
    when the weights sum to one), for log-weights ``(..., M)`` broadcasting against the experts' batch."""
    batch = torch.broadcast_shapes(experts.batch_shape, log_weights.shape[:-1])
    params = experts.params.expand(batch + experts.params.shape[experts.expert_dim:])
    log_weights = log_weights.expand(batch + (experts.num_experts,))
    combined, log_c = experts.family.combine(params.unsqueeze(len(batch)), log_weights.unsqueeze(-2))
    return combined.squeeze(len(batch)), log_c.squeeze(-1)


@lru_cache(maxsize=128)
def _layout_rows(order: int, num_experts: int) -> tuple[tuple[int, ...], int]:
    """The rows of ``_compositions`` with the single-expert ones first (each in its original order), and their
    number: found in Python, so that no tensor is read (``nonzero``, ``int``) where ``torch.compile`` traces."""
    counts = _compositions(order, num_experts)[1]
    single = [row for row, count in enumerate(counts) if count[0] == order]
    return tuple(single + [row for row, count in enumerate(counts) if count[0] != order]), len(single)


def _components_layout(order: int, num_experts: int, device=None, dtype=None):
    """``compositions`` in the order of the exact pool's components: the single-expert ones (each expert itself,
    Chernoff coefficient 1, in expert order) first, then those that combine experts; and the number of the first."""
    indices, counts, log_multinomial = _compositions(order, num_experts)
    rows, num_single = _layout_rows(order, num_experts)
    return (torch.tensor([indices[row] for row in rows], dtype=torch.long, device=device),
            torch.tensor([counts[row] for row in rows], dtype=torch.long, device=device),
            torch.tensor([log_multinomial[row] for row in rows], dtype=dtype, device=device), num_single)


def component_counts(order: int, num_experts: int, device=None) -> torch.Tensor:
    """``(C, M)``: how often each expert enters each component of the exact pool of order ``order`` (``alpha =
    1/order``; ``0``, the log-linear pool, is one component of all experts, each once), in the component order of
    ``holder_components``."""
    if num_experts == 1:
        order = min(order, 1)
    if order == 0:
        return torch.ones(1, num_experts, dtype=torch.long, device=device)
    index, counts, _, _ = _components_layout(order, num_experts, device)
    table = torch.zeros(index.shape[0], num_experts, dtype=torch.long, device=device)
    return table.scatter_add_(1, index, counts)


def _built_order(order: int, num_experts: int) -> int:
    """The order ``holder_components`` builds: one expert is its own pool at every order (a huge order would not
    fit a count tensor)."""
    return min(order, 1) if num_experts == 1 else order


def holder_components(family: ExponentialFamily, params: torch.Tensor, log_weights: torch.Tensor, order: int):
    """Unnormalised log mixture weights ``(..., C)`` and component parameters ``(..., C) + param_shape``
    of the exact Hölder pool of order ``order`` (``alpha = 1/order``; ``0`` is the log-linear pool)."""
    n_param = len(family.param_shape)
    expert_dim = params.dim() - n_param - 1
    num_experts = params.shape[expert_dim]
    batch = torch.broadcast_shapes(params.shape[:expert_dim], log_weights.shape[:-1])
    params = params.expand(batch + params.shape[expert_dim:])
    log_weights = log_weights.expand(batch + (num_experts,))
    order = _built_order(order, num_experts)
    if order == 0:
        # in float64 and renormalised there, as the components below: float32 weights sum to one only to 1e-7, and
        # log Z takes that times the log-normaliser (0.27 for two identical Poisson(1e6) experts, whose pool has 0)
        wide = log_weights.to(torch.float64)
        combined, log_c = geometric_combination(Experts(family, params), wide - torch.logsumexp(wide, -1, keepdim=True))
        return log_c.to(params.dtype).unsqueeze(-1), combined.unsqueeze(len(batch))
    index, counts, log_multinomial, num_single = _components_layout(order, num_experts, params.device, params.dtype)
    singles = params.index_select(len(batch), index[:num_single, 0])
    components, log_c = singles, torch.zeros(batch + (num_single,), dtype=params.dtype, device=params.device)
    if num_single < index.shape[0]:
        multi_index, multi_counts = index[num_single:], counts[num_single:]
        gathered = params.index_select(len(batch), multi_index.flatten()).unflatten(len(batch), tuple(multi_index.shape))
        # in float64: the non-Gaussian families combine in float64, where float32 weights would not sum to one
        log_w = torch.where(multi_counts > 0, torch.log(multi_counts.to(torch.float64) / order), -math.inf)
        combined, combined_log_c = family.combine(gathered, log_w.expand(batch + tuple(multi_index.shape)))
        components = torch.cat((components, combined), dim=len(batch))
        log_c = torch.cat((log_c, combined_log_c), dim=-1)
    picked = log_weights[..., index]
    zero = torch.zeros((), dtype=params.dtype, device=params.device)
    log_lambda_power = torch.where(counts > 0, counts * picked, zero).sum(-1)
    return log_multinomial + log_lambda_power + log_c, components


def _log_smallest_weight(log_weights: torch.Tensor) -> torch.Tensor:
    """``log lambda_min`` over the experts with positive weight."""
    return torch.where(log_weights > -math.inf, log_weights, torch.full_like(log_weights, math.inf)).amin(-1)


class _Pool(Distribution):
    """What every Hölder pool shares: experts, normalised weights, the pooled density and the numerical engine.

    A ``torch.distributions.Distribution``: ``arg_constraints`` is empty because the experts and weights are
    validated when the pool is built (by their family and :func:`check_weights`), not as attributes.
    """

    arg_constraints = {}

    def __init__(self, experts, alpha, weights, validate_args):
        self.alpha = check_alpha(alpha)
        #: the alpha the pooled density is computed with: the tensor itself when one requiring grad is given
        self._alpha = alpha if isinstance(alpha, torch.Tensor) and alpha.requires_grad else self.alpha
        # (a flag, not ``_alpha is not alpha``: pickling makes two objects of one float, and the unpickled pool took
        # the differentiable path its saved summary had no nodes for)
        self._alpha_requires_grad = self._alpha is not self.alpha
        self._validate = validation_enabled(validate_args)
        self.experts: Experts = as_experts(experts, validate_args=self._validate)
        self.family = self.experts.family
        params = self.experts.params
        self.log_weights = normalized_log_weights(weights, self.experts.num_experts, dtype=params.dtype,
                                                  device=params.device, validate=self._validate)
        check_batches_broadcast(self.experts.batch_shape, self.log_weights.shape[:-1])
        #: the logits :meth:`_geometric_bound` fits (alpha < 0), kept: the envelope and the bracket both use them
        #: (any weights give a valid bound, so the fit never makes a result wrong, only tighter)
        self._geometric_logits = None
        #: ``(key, pool)``: the float64 copy the importance sampler draws from (:meth:`_importance_pool`), kept with
        #: its envelope
        self._float64_copy = None

    def _init_distribution(self, batch_shape) -> None:
        """Set torch's shapes; validation follows this pool's own setting (``arg_constraints`` is empty)."""
        Distribution.__init__(self, torch.Size(batch_shape), self.family.event_shape, validate_args=False)
        self._validate_args = self._validate

    @property
    def support(self):
        return self.family.support_constraint

    @property
    def stddev(self) -> torch.Tensor:
        return self.variance.sqrt()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        r""":math:`\frac1\alpha\log\sum_j\lambda_j q_j(z)^\alpha - \log Z`, from the experts' densities
        directly (independent of how ``log Z`` was obtained).

        Values outside the experts' support raise a ``ValueError`` naming them when validation is on (as
        ``torch.distributions`` do) and give ``-inf`` when it is off (as scipy does); NaN values give NaN.
        """
        family = self.family
        value = torch.as_tensor(value, device=self.experts.params.device)
        inside = family.in_support(value)
        if self._validate:
            if not bool(inside.all()):
                bad = inside.reshape(inside.shape + (1,) * len(family.event_shape)).expand(value.shape)
                raise ValueError(f"value must lie in the support {family.support_constraint} of the {family.name} "
                                 f"pool, got {describe(value, ~bad)}")
            self._validate_sample(value)  # torch's checks; only its shape check can fail here
        else:  # evaluate the density at a point of the support instead, so that no NaN (or NaN gradient) appears
            event_dims = len(family.event_shape)
            nan = torch.isnan(value)
            nan = nan.flatten(-event_dims).any(-1) if event_dims else nan
            value = torch.where(inside.reshape(inside.shape + (1,) * event_dims), value, family.support_fill(value))
        log_q = expert_log_probs(family, self.experts.params, value)
        if self._sums_in_float64 and self.alpha != 0:
            # (Bernoulli experts of probability 1e-6 at 0 in float32: -1.40e-6 for -1.32e-6 at alpha = 1/3)
            log_u = log_power_mean(log_q.double(), self.log_weights.double(), self._alpha).to(log_q.dtype)
        else:
            log_u = log_power_mean(log_q, self.log_weights, self._alpha)
        if self.alpha == 0:
            # where one expert's density is infinite and another's zero (a Beta at an end), sum_j w_j log q_j is
            # inf - inf; the log-linear pool is the member at sum_j w_j eta_j, whose density there is 0 or inf
            # (NaN values are no cause: they raised above, or stand at a point of the support)
            unresolved = torch.isnan(log_u)
            if bool(unresolved.any()):
                log_u = torch.where(unresolved, self._log_linear_log_u(value), log_u)
        log_p = log_u - self.log_normalizer
        if self._validate:
            return log_p
        return torch.where(inside, log_p, torch.where(nan, math.nan, -math.inf).to(log_p.dtype))

    def _log_linear_log_u(self, value: torch.Tensor) -> torch.Tensor:
        """``sum_j w_j log q_j(value)`` of the log-linear pool as ``log r(value) + A(eta_r) - sum_j w_j A(eta_j)``, ``r``
        the member at ``eta_r = sum_j w_j eta_j``: finite, or a definite +-inf (the family's own density of ``r``),
        where the experts' log-densities are +inf and -inf."""
        family = self.family
        weights = self.log_weights.exp()
        eta = family.to_natural(self.experts.params)
        eta_r = torch.where((weights > 0).unsqueeze(-1), weights.unsqueeze(-1) * eta, 0).sum(-2)
        log_norms = torch.where(weights > 0, weights * family.log_normalizer(eta), 0).sum(-1)
        return family.log_prob(family.from_natural(eta_r), value) + family.log_normalizer(eta_r) - log_norms

    # ------------------------------------------------------- scalar events: cdf, quantiles, intervals
    def _require_scalar(self, what: str) -> None:
        if self.family.event_shape != torch.Size() or not (self.family.discrete or self.family.support_interval):
            raise ValueError(f"{what} needs scalar experts, got {self.family.name} experts with event_shape "
                             f"{tuple(self.family.event_shape)}")

    def _pools(self):
        """Every pool of the batch as float64 ``(params (M,) + param_shape, log_weights (M,))``, flattened."""
        params, log_weights = _in_float64(self.experts.params, self.log_weights)
        batch = self.batch_shape
        params = params.expand(batch + params.shape[self.experts.expert_dim:]).reshape((-1,) + params.shape[len(batch):])
        log_weights = log_weights.expand(batch + log_weights.shape[-1:]).reshape(-1, log_weights.shape[-1])
        return params, log_weights

    def _component_cdf_available(self) -> bool:
        """Exact pools whose components have a closed-form torch ``cdf`` (Normal, Gamma, Exponential...)."""
        return False

    def cdf(self, value) -> torch.Tensor:
        r"""``P(Z <= value)`` for scalar experts, shape ``broadcast(value, batch_shape)``.

        Exact pools of Normal, Gamma or Exponential experts: the mixture of the components' cdfs (exact).
        Discrete experts: the sum of the enumerated probabilities (exact up to the family's stated truncation
        bound, e.g. the Poisson tail). Every other pool: the mass of ``(lower, value]`` by the adaptive quadrature of
        :mod:`opinionpool.numerical` divided by that of the support, each to relative tolerance 1e-11 (the
        smaller tail is integrated, so the error is relative to ``min(F, 1 - F)``), value by value (one or two
        adaptive integrations each; :func:`opinionpool.forecast.pit` takes many values in one vectorised pass, several
        times faster, to its own stated error). No gradient.
        """
        self._require_scalar("cdf")
        params = self.experts.params
        value = torch.as_tensor(value, dtype=params.dtype, device=params.device)
        shape = torch.broadcast_shapes(value.shape, self.batch_shape)
        nan = torch.isnan(value)
        if self._validate and bool(nan.any()):
            raise ValueError(f"value must not be NaN, got {describe(value, nan)}")
        # without validation a NaN value gets a NaN probability, as log_prob's; the rules see a stand-in
        value = torch.where(nan, 0.0, value).expand(shape)
        with torch.no_grad():
            if self.family.discrete:
                out = self._discrete_cdf(value)
            elif self._component_cdf_available():
                out = self._mixture_cdf(value)
            else:
                out = self._quadrature_cdf(value)
            if not self.family.discrete:
                # at and beyond the support's ends exactly 0 and 1 (a mixture's weights need not sum to 1 to the
                # bit: cdf(+inf) was 1 - 2e-16)
                lower, upper = self.family.support_interval or (-math.inf, math.inf)
                out = torch.where(value >= upper, 1.0, torch.where(value <= lower, 0.0, out))
        return torch.where(nan, math.nan, out)

    def _discrete_cumulative(self, query_dims: int):
        """The support ``(K,)`` in increasing order and the pool's cdf there, ending at exactly 1, shaped ``(K,)`` +
        the batch right-aligned with queries of ``query_dims`` dimensions: one sum that :meth:`cdf` and :meth:`icdf`
        share, so that the quantile of ``q`` is the smallest point whose cdf is at least ``q`` to the last bit
        (separate sums differ in their rounding)."""
        values, _, log_u, _ = enumerate_support(self.family, self.experts.params.detach(), self.log_weights.detach(),
                                                self.alpha)
        running = torch.logcumsumexp(log_u, dim=0)
        cumulative = running.sub(running[-1]).exp()
        return values, cumulative.reshape(cumulative.shape[:1] + (1,) * (query_dims - cumulative.dim() + 1)
                                          + cumulative.shape[1:])

    def _discrete_cdf(self, value):
        values, cumulative = self._discrete_cumulative(value.dim())
        # the cdf at the largest support point at or below the value (none: 0)
        index = (values.reshape(values.shape + (1,) * value.dim()) <= value).sum(0) - 1
        at = cumulative.expand(cumulative.shape[:1] + value.shape).gather(0, index.clamp_min(0).unsqueeze(0)).squeeze(0)
        return torch.where(index >= 0, at, 0.0)

    def _quadrature_cdf(self, value):
        lower, upper = self.family.support_interval
        pools = list(zip(*self._pools()))
        flat = value.detach().to(torch.float64).reshape(-1, max(1, len(pools)))
        out = torch.empty_like(flat)
        for j, (params, log_weights) in enumerate(pools):
            log_z = quadrature_log_mass(self.family, params, log_weights, self.alpha, lower, upper)[0]
            out[:, j] = self._pool_cdf(params, log_weights, flat[:, j].clamp(lower, upper), log_z)
        return out.reshape(value.shape).to(value.dtype)

    def icdf(self, value) -> torch.Tensor:
        """The quantile function for scalar experts: the smallest ``z`` with ``cdf(z) >= value`` (``value`` in
        ``[0, 1]``), shape ``broadcast(value, batch_shape)``. A bracketed bisection on :meth:`cdf`, vectorised over
        the values, to float64 resolution of ``z`` (discrete experts: an exact search over the support). No
        gradient."""
        self._require_scalar("icdf")
        params = self.experts.params
        q = torch.as_tensor(value, dtype=params.dtype, device=params.device)
        if self._validate:
            bad = ~((q >= 0) & (q <= 1))
            if bool(bad.any()):
                raise ValueError(f"value must be a probability in [0, 1], got {describe(q, bad)}")
        q = q.expand(torch.broadcast_shapes(q.shape, self.batch_shape))
        # without validation a NaN level gets a NaN quantile; the search sees a stand-in
        nan = torch.isnan(q)
        q = torch.where(nan, 0.5, q)
        with torch.no_grad():
            if self.family.discrete:
                values, cumulative = self._discrete_cumulative(q.dim())
                out = values[(cumulative < q).sum(0).clamp_max(len(values) - 1)]
            elif self._component_cdf_available():
                out = self._bisect(q)
            else:
                out = self._quadrature_icdf(q)
        return torch.where(nan, math.nan, out)

    def _bisect(self, q):
        """Quantiles by bisection on the exact cdf, or above the median on the exact survival function against
        ``1 - q`` (``1 - cdf`` keeps only the digits of 1: the quantile of 1 - 1e-15 was 1e-3 off): in ``z`` on the
        real line, and in the log of the distance to a finite end of the support (the lower one for ``q <= 1/2``
        where both are finite), where the quantiles of a Gamma of shape 0.1 reach 1e-200 (bisected in ``z``, no
        quantile came out below 1e-30)."""
        lower, upper = self.family.support_interval
        mean, sd = self.mean.detach().expand(q.shape), self.stddev.detach().expand(q.shape)
        # F(z) < q, decided in the smaller tail: S(z) > 1 - q above the median (1 - q is exact there)
        upper_half = q > 0.5
        level = torch.where(upper_half, 1 - q, q)

        def below(z):
            tail = self._mixture_cdf(z, upper_tail=upper_half)
            return torch.where(upper_half, tail > level, tail < level)

        lo = torch.full_like(q, lower) if math.isfinite(lower) else mean - 8 * sd
        hi = torch.full_like(q, upper) if math.isfinite(upper) else mean + 8 * sd
        for _ in range(64):  # widen the bracket until it holds every quantile (a no-op at finite support ends)
            low_bad, high_bad = ~below(lo) & (q > 0), below(hi) & (q < 1)
            if not bool((low_bad | high_bad).any()):
                break
            lo = torch.where(low_bad, mean - 4 * (mean - lo), lo)
            hi = torch.where(high_bad, mean + 4 * (hi - mean), hi)
        # side +1: z = lower + e^t, -1: z = upper - e^t (z falls as t grows), 0: z = t
        side = torch.zeros_like(q)
        if math.isfinite(upper):
            side = torch.full_like(q, -1.0)
        if math.isfinite(lower):
            side = torch.where((q <= 0.5) | (side == 0), 1.0, side)
        end = torch.where(side > 0, lower, torch.where(side < 0, upper, 0.0))
        # from the nearest float to the end to the bracket's far side, in the log of the distance
        nearest = (torch.nextafter(end, end + side) - end).abs().log()
        far = torch.where(side > 0, hi - end, end - lo).log()
        t_lo, t_hi = torch.where(side == 0, lo, nearest), torch.where(side == 0, hi, far)

        def point(t):
            return torch.where(side == 0, t, end + side * t.exp())

        for _ in range(100):
            middle = 0.5 * (t_lo + t_hi)
            up = below(point(middle)) == (side >= 0)  # the quantile lies at larger t
            t_lo, t_hi = torch.where(up, middle, t_lo), torch.where(up, t_hi, middle)
        z = point(torch.where(side >= 0, t_hi, t_lo))
        return torch.where(q <= 0, torch.full_like(q, lower), torch.where(q >= 1, torch.full_like(q, upper), z))

    def _quadrature_icdf(self, q):
        """Quantiles from the quadrature's own nodes: the node where the cumulative mass crosses ``q`` is an anchor
        whose cdf is computed accurately (:meth:`cdf`); from there ``F(z) = F(anchor) + int_anchor^z p`` with a
        32-point Gauss-Legendre rule, solved by bisection between the neighbouring nodes. Where those span more than
        an octave of the distance to a finite end of the support (the nodes of an end panel, its extrapolated mass at
        one point, or none at all), the mass between the end and ``z`` is integrated adaptively instead (the smaller
        tail, against ``q`` or ``1 - q``) and bisected in the log of the distance: next to a Gamma's singular end at
        0 the rule between nodes orders of magnitude apart put the quantile 1e-5 of a shape 0.1 at 2.0e-51, not
        3.0e-51, and those below 1e-8 at the nearest node. The same where the pooled log-density falls by more than
        ``_STEEP_NATS`` across the bracket (far tails, towards an infinite end), and where the quantile lies beyond the
        outermost node with mass (the bracket stops a span of the nodes past it). Above the median all of it runs on
        the upper tail against ``1 - q``, the anchor found by the mass from the top."""
        lower, upper = self.family.support_interval
        pi, points, _, _ = self._node_expectation("quadrature", 1, 0, DEFAULT_RTOL)
        pools = list(zip(*self._pools()))
        pi, points = pi.reshape(pi.shape[0], -1), points.reshape(points.shape[0], -1)
        flat = q.detach().to(torch.float64).reshape(-1, len(pools))
        out = torch.empty_like(flat)
        nodes, weights = (torch.as_tensor(x) for x in np.polynomial.legendre.leggauss(32))
        for j, (params, log_weights) in enumerate(pools):
            # the nodes with mass: the mapped tails' reach far beyond it (1e100 of the experts' scale), and a bracket
            # or bisection step spanning them would lose every digit of the quantile
            order = torch.argsort(points[:, j])
            order = order[pi[order, j] > 0]
            z, cumulative = points[order, j], torch.cumsum(pi[order, j], 0)
            log_z = quadrature_log_mass(self.family, params, log_weights, self.alpha, lower, upper)[0]

            def mass(a, b, logarithmic, params=params, log_weights=log_weights, log_z=log_z):
                """``int_a^b p`` (signed) for tensors ``a``, ``b`` of one shape, where ``logarithmic`` in ``u = log|z|``
                (``a`` and ``b`` then of one sign): ``int p(z) z du``."""
                half = (0.5 * (b - a)).unsqueeze(-1)
                x = (0.5 * (a + b)).unsqueeze(-1) + half * nodes
                sign = torch.where(logarithmic, torch.sign(a), 1.0).unsqueeze(-1)
                log_a, log_b = (torch.where(logarithmic, end.abs(), 1.0).log() for end in (a, b))
                u = (0.5 * (log_a + log_b)).unsqueeze(-1) + (0.5 * (log_b - log_a)).unsqueeze(-1) * nodes
                along = logarithmic.unsqueeze(-1)
                x = torch.where(along, sign * u.exp(), x)
                jacobian = torch.where(along, (0.5 * (log_b - log_a)).unsqueeze(-1) * x, half)
                log_u = log_power_mean(expert_log_probs(self.family, params, x), log_weights, self.alpha)
                return (weights * jacobian * (log_u - log_z).exp()).sum(-1)

            target = flat[:, j].contiguous()  # (searchsorted copies a strided column, with a warning)
            # above the median in the upper tail: S(z) = S(anchor) - int_anchor^z p against 1 - q (exact there),
            # the anchor the node where the mass from the top crosses 1 - q (the total rounds off 1 - q's digits)
            upper_half = target > 0.5
            level = torch.where(upper_half, 1 - target, target)
            from_top = len(z) - 1 - torch.searchsorted(torch.cumsum(pi[order, j].flip(0), 0), level)
            i = torch.where(upper_half, from_top, torch.searchsorted(cumulative, target)).clamp(0, len(z) - 1)
            anchor = z[i]
            # each anchor's cdf (or survival function) once: sampling by quantiles puts many levels on one node
            pairs, inverse = torch.unique(torch.stack((i, upper_half.long()), -1), dim=0, return_inverse=True)
            start = self._pool_cdf(params, log_weights, z[pairs[:, 0]], log_z, upper_tail=pairs[:, 1].bool())[inverse]
            span = z[-1] - z[0]
            lo = torch.where(i >= 2, z[(i - 2).clamp_min(0)], torch.full_like(anchor, max(lower, float(z[0] - span))))
            hi = torch.where(i + 2 < len(z), z[(i + 2).clamp_max(len(z) - 1)],
                             torch.full_like(anchor, min(upper, float(z[-1] + span))))
            # (or reach the outermost node: the extrapolated mass of an end panel sits at one point); also where the
            # density falls by more than _STEEP_NATS across the bracket (a far tail's wide panels, or past the
            # outermost node towards an infinite end): the 32-point rule put a Normal's quantile of 1e-300 2.5e-9 off
            ends = log_power_mean(expert_log_probs(self.family, params, torch.stack((lo, hi), -1)), log_weights,
                                  self.alpha)
            steep = ~((ends[:, 0] - ends[:, 1]).abs() <= _STEEP_NATS)  # (an infinite or NaN difference is steep)
            # and where the quantile lies beyond the outermost node with mass: the rule's bracket stops a span past
            # it (a power law's quantile of 1e-200 at -2.9e100 for -2.9e142)
            steep |= torch.where(upper_half, hi > z[-1], lo < z[0])
            # (not above the median towards an infinite upper end: the lower tail's mass against q would lose the
            # digits of 1 - q where a power-law tail's sparse nodes bracket more than an octave of z - lower)
            near_lower = (steep & ~upper_half) | (math.isfinite(lower) & ~(upper_half & math.isinf(upper))
                                                  & ((lo - lower < 0.5 * (hi - lower)) | (lo <= z[0])))
            near_upper = (steep & upper_half) | (math.isfinite(upper) & ((upper - hi < 0.5 * (upper - lo))
                                                                         | (hi >= z[-1])))
            near_lower &= ~(near_upper & upper_half) & (target > 0)
            near_upper &= ~near_lower & (target < 1)
            bracket = lo.clone(), hi.clone()
            # the rule in log|z| where the bracket spans more than an octave on one side of 0: between nodes decades
            # apart on a power-law tail the rule in z put the quantile 1e-20 of a t of 0.6 degrees of freedom at
            # -1.09e36, not -4.03e32
            logarithmic = (lo * hi > 0) & (torch.maximum(lo.abs(), hi.abs()) > 2 * torch.minimum(lo.abs(), hi.abs()))
            for _ in range(100):
                middle = 0.5 * (lo + hi)
                between = mass(anchor, middle, logarithmic)
                below = torch.where(upper_half, start - between > level, start + between < level)
                lo, hi = torch.where(below, middle, lo), torch.where(below, hi, middle)
            for k in (near_lower | near_upper).nonzero().flatten().tolist():
                side = 1.0 if near_lower[k] else -1.0
                hi[k] = self._tail_quantile(params, log_weights, log_z, float(target[k]), side,
                                            float(bracket[1][k] if side > 0 else bracket[0][k]), float(span))
            out[:, j] = torch.where(target <= 0, lower, torch.where(target >= 1, upper, hi))
        return out.reshape(q.shape).to(q.dtype)

    def _tail_quantile(self, params, log_weights, log_z: float, q: float, side: float, far: float,
                       step: float) -> float:
        """The smallest ``z`` with ``F(z) >= q`` between the support's lower (``side`` +1) or upper (-1) end and
        ``far``, where it lies: bisection on the adaptive quadrature's mass of the tail between the end and ``z``
        (its log against ``log q``, or ``log(1 - q)`` towards the upper end). Towards a finite end in
        ``t = log|z - end|``; towards an infinite one in ``t = log|z - far|``, out to the first of ``step``,
        ``2^16 step``, ``2^32 step``... past the quantile."""
        lower, upper = self.family.support_interval
        end = lower if side > 0 else upper
        target = math.log(q if side > 0 else 1 - q) + log_z if 0 < q < 1 else -math.inf

        def feasible(z):
            """F(z) >= q: the lower tail at least q, or the upper one at most 1 - q."""
            interval = (lower, z) if side > 0 else (z, upper)
            tail = quadrature_log_mass(self.family, params, log_weights, self.alpha, *interval)[0]
            return tail >= target if side > 0 else tail <= target

        if math.isfinite(end):
            def point(t):
                return end + side * math.exp(t)

            t_lo, t_hi = math.log(abs(math.nextafter(end, end + side) - end)), math.log(abs(far - end))
            feasible_far = side > 0  # larger t is further from the end: F grows with it from the lower end
            if side < 0 and not feasible(point(t_lo)):
                return upper  # beyond the last float below the upper end
        else:
            t_lo, t_hi = 0.0, step  # the distance from far, bracketed first
            feasible_far = side < 0  # further towards the end: F grows with it towards the upper end
            # (by factors of 2^16: doubling from the nodes' span, 1e100, took 245 adaptive quadratures to 1e174)
            while feasible(far - side * t_hi) != feasible_far and math.isfinite(far - side * _BRACKET_GROWTH * t_hi):
                t_lo, t_hi = t_hi, _BRACKET_GROWTH * t_hi

            # then bisected in its log: the nodes' span, the first step, reaches 1e65 and more on power-law tails,
            # and halving that in z a hundred times left 1e35 (a quantile of 1e-80 at -1.3e14 for -7.0e15)
            def point(t):
                return far - side * math.exp(t)

            t_lo, t_hi = math.log(t_lo) if t_lo > 0 else math.log(math.ulp(far)), math.log(t_hi)
        for _ in range(100):  # 64 halvings of log distances (at most 1500) reach float64's resolution
            middle = 0.5 * (t_lo + t_hi)
            if middle in (t_lo, t_hi):
                break
            if feasible(point(middle)) == feasible_far:
                t_hi = middle
            else:
                t_lo = middle
        return point(t_hi if feasible_far else t_lo)  # the feasible end of the bracket

    def _pool_cdf(self, params, log_weights, values, log_z, upper_tail=None):
        """One pool's cdf at ``values`` (a 1-D float64 tensor) by adaptive quadrature of the smaller tail; where the
        boolean tensor ``upper_tail`` is set, its survival function ``1 - cdf`` instead, integrated as such."""
        lower, upper = self.family.support_interval

        def mass(a, b):
            return math.exp(quadrature_log_mass(self.family, params, log_weights, self.alpha, a, b)[0] - log_z)

        out = []
        for x, survival in zip(values.tolist(), [False] * len(values) if upper_tail is None else upper_tail.tolist()):
            if survival:
                out.append(min(mass(x, upper), 1.0))
                continue
            left = mass(lower, x)
            if left > 0.5:
                left = 1 - mass(x, upper)
            out.append(min(max(left, 0.0), 1.0))
        return torch.tensor(out, dtype=torch.float64)

    def interval(self, level: float = 0.9):
        """The central interval ``(icdf((1 - level) / 2), icdf((1 + level) / 2))`` of probability ``level``."""
        try:
            probability = check_real("level", level)  # numpy scalars and one-element tensors too
        except ValueError:
            probability = math.nan
        if not 0 < probability < 1:
            raise ValueError(f"level must be a probability in (0, 1), got {level!r}")
        return self.icdf((1 - probability) / 2), self.icdf((1 + probability) / 2)

    # ------------------------------------------------------------------ entropy and expectations
    def _node_expectation(self, method, num_samples, seed, rtol):
        """The engine's weighted points for this pool: ``(pi, points, log_u, estimate)`` with ``pi`` their
        normalised weights ``(P,) + batch`` and ``log_u`` the unnormalised log-density there (float64)."""
        method = check_method(self.family, method)
        if method == "importance":
            num_samples = check_num_samples(num_samples)
        est = self._estimate(frozenset(), method, num_samples, seed, None, check_rtol(rtol), keep_nodes=True)
        points, log_w = est.nodes
        pi = torch.softmax(log_w.to(torch.float64), dim=0)
        points = points.to(torch.float64) if points.is_floating_point() else points
        params, log_weights = _in_float64(self.experts.params, self.log_weights)  # (the weights renormalised, as
        with torch.no_grad():                                                    # the engine's)
            log_u = log_power_mean(expert_log_probs(self.family, params, points), log_weights, self.alpha)
        return pi, points, log_u, est

    @staticmethod
    def _float64_log_normalizer(est: PoolEstimate) -> torch.Tensor:
        """``log Z`` in float64: the deterministic rules' weighted points sum to it before it is rounded to the
        pool's dtype. Entropies and KL divergences subtract ``E[log u]`` of its size from it, and a float32 ``log Z``
        of -86077 rounds by 0.004 (a Poisson pool's entropy of 2.90 came out 2.903)."""
        if est.method != "importance" and est.nodes is not None:
            return torch.logsumexp(est.nodes[1].to(torch.float64), dim=0)
        return est.log_normalizer.value.to(torch.float64)

    def _expectation(self, pi, values, est):
        """``E_pool[values]`` over the weighted points and its error (see :meth:`entropy_estimate`)."""
        values = torch.where(pi > 0, values, torch.zeros_like(values))
        mean = (pi * values).sum(0)
        spread = (pi * (values - mean) ** 2).sum(0)
        log_z_error = est.log_normalizer.error.to(torch.float64)
        if est.method == "importance":
            # log Z_hat - E_hat[f] (and its negative, the KL) from one sample: the delta method over both at once, whose
            # influence per draw is n pi_i (1 - (f_i - E)) - 1; their errors added as independent were too narrow
            # (82 % coverage of a 95 % interval) or 2-3x too wide, as the covariance fell
            n = pi.shape[0]
            error = ((n * pi * (1 - (values - mean)) - 1) ** 2).sum(0).sqrt() / n
        else:
            error = log_z_error * (1 + spread.sqrt())
        return mean, error

    def entropy_estimate(self, method: str = "auto", num_samples: int = 100_000, seed: int = 0,
                         rtol: float = DEFAULT_RTOL) -> Estimate:
        r"""The differential (or, for discrete experts, Shannon) entropy :math:`\log Z - E_{pool}[\log u]` with its
        error (``method`` as in :meth:`estimate`): exact sums for discrete experts; for scalar continuous experts the
        adaptive quadrature with :math:`\int u \log u` among the integrands whose error it controls (an error
        estimate, to ``rtol``); on the grid (Gaussians up to dimension 3) the normaliser's error estimate scaled by
        ``1 + sd_pool(log u)``; importance sampling otherwise, with the delta-method standard error of ``log Z`` and
        ``E[log u]`` together (one set of draws gives both). No gradient: :meth:`entropy` carries one."""
        return self._entropy(method, num_samples, seed, rtol)[0]

    def _entropy(self, method, num_samples, seed, rtol):
        """``(entropy_estimate(...), the engine's weighted points behind it)`` (``None`` for the adaptive quadrature,
        whose entropy controls its own integrand)."""
        dtype = self.experts.params.dtype
        check_num_samples(num_samples)
        if check_method(self.family, method) == "quadrature":
            rows = torch.tensor([quadrature_entropy(self.family, p, lw, self.alpha, check_rtol(rtol))
                                 for p, lw in zip(*self._pools())], dtype=torch.float64)
            return rounded(Estimate(*(rows[:, i].reshape(self.batch_shape).to(dtype) for i in range(2)))), None
        pi, _, log_u, est = self._node_expectation(method, num_samples, seed, rtol)
        mean, error = self._expectation(pi, log_u, est)
        return rounded(Estimate((self._float64_log_normalizer(est) - mean).to(dtype), error.to(dtype))), est

    def entropy(self) -> torch.Tensor:
        """Exact for the log-linear pool (one family member, whose torch entropy is used); otherwise
        ``entropy_estimate().value`` (deterministic: quadrature, grid or exact sums, or importance sampling with
        seed 0) with the gradient of the engine's weighted points for it (:meth:`_with_node_gradient`); call
        :meth:`entropy_estimate` for its error."""
        estimate, est = self._entropy("auto", 100_000, 0, DEFAULT_RTOL)
        return -self._with_node_gradient(-estimate.value, est=est)

    def _with_node_gradient(self, value: torch.Tensor, log_other=None, other_requires_grad: bool = False,
                            est: PoolEstimate | None = None) -> torch.Tensor:
        """``value``, an estimate of ``KL(pool || other)`` or (``log_other=None``) of the negative entropy, with the
        gradient of that quantity over the engine's weighted points for the same arguments (rule weights and nodes
        held fixed; the self-normalised estimate for importance samples): ``Cov_pool(log u - log r, grad log u) -
        E_pool[grad log r]`` (:func:`opinionpool.numerical.divergence_at_nodes`), over ``est``'s points, or, only
        where a gradient is wanted, those of the default estimate (the adaptive quadrature's entropy controls its own
        integrand, not the points)."""
        if not (torch.is_grad_enabled() and (self._differentiable or other_requires_grad)):
            return value
        if est is None:  # a rule refined for E[T] too: the gradient's expectations are of T(z) and log u, linear in
            # T for the families' experts (refined for log Z alone, the nodes' E[log z] of a Gamma pool of shape 0.02
            # was 5e-3 off, and d KL / d shape of other with it)
            est = self._estimate(frozenset({"expected_statistic"}), check_method(self.family, "auto"), 100_000, 0,
                                 None, DEFAULT_RTOL, keep_nodes=True)
        return divergence_at_nodes(self.family, self.experts.params, self.log_weights, self._alpha, est, value,
                                   log_other)

    @property
    def _sums_in_float64(self) -> bool:
        """Discrete pools below float64 sum their densities in float64, cast back: their log-normaliser and
        log-probabilities may lie near 0, where float32 rounds a sum near 1 by 6e-8 (log Z 0 for -8.3e-8 with
        Bernoulli experts of probability 1e-6); continuous log-densities are not pinned near 0."""
        return self.family.discrete and self.experts.params.dtype != torch.float64

    @property
    def _differentiable(self) -> bool:
        return self.experts.params.requires_grad or self.log_weights.requires_grad or self._alpha_requires_grad

    def kl_estimate(self, other: Distribution, method: str = "auto", num_samples: int = 100_000, seed: int = 0,
                    rtol: float = DEFAULT_RTOL) -> Estimate:
        """``KL(pool || other)`` for any distribution ``other`` with a ``log_prob`` defined on the pool's support, as
        ``E_pool[log p - log other]`` over the engine's weighted points (errors as :meth:`entropy_estimate`, plus
        the rounding of ``other``'s log-density where its dtype is below float64: such an ``other`` is evaluated
        through a float64 copy of itself where one computes). ``+inf``, error 0, where ``other``
        has no density on part of the pool's mass; raises where its log-density is NaN or ``+inf`` there. No
        gradient: :meth:`kl_divergence_to` (``torch.distributions.kl_divergence(pool, other)``) carries one."""
        return self._kl(other, method, num_samples, seed, rtol)[0]

    def _kl(self, other, method, num_samples, seed, rtol):
        """``(kl_estimate(...), the engine's weighted points behind it)`` (``None`` for the adaptive quadrature)."""
        if not callable(getattr(other, "log_prob", None)):
            raise ValueError(f"other must be a distribution with a log_prob method, got {other!r} of type "
                             f"{type(other).__name__}")
        dtype = self.experts.params.dtype
        check_num_samples(num_samples)
        batch = self.batch_shape
        other_batch, other_event = (getattr(other, name, None) for name in ("batch_shape", "event_shape"))
        if other_event is not None and tuple(other_event) != tuple(self.event_shape):
            raise ValueError(f"other must have the pool's event shape {tuple(self.event_shape)}, "
                             f"got event_shape={tuple(other_event)}")
        other_batch = torch.Size() if other_batch is None else other_batch
        try:
            fits = torch.broadcast_shapes(other_batch, batch) == batch
        except RuntimeError:
            fits = False
        if not fits:  # one KL per pool: other's batch must broadcast to the pool's, not widen it
            raise ValueError(f"other must have a batch shape that broadcasts to the pool's {tuple(batch)}, "
                             f"got batch_shape={tuple(other_batch)}")
        if check_method(self.family, method) == "quadrature":
            rows = []
            for index, (p, lw) in enumerate(zip(*self._pools())):
                def log_q(z, index=index):
                    """``other``'s log-density and its error at points ``z`` for pool ``index`` of the flattened
                    batch."""
                    # one singleton per pool batch dimension, so that a smaller batch of other's (e.g. (3,) or
                    # (2, 1) for a (2, 3) pool) broadcasts to the pool's before the flattened pool index is taken
                    z = torch.as_tensor(z).reshape((-1,) + (1,) * len(batch))
                    return tuple(v.expand((z.shape[0],) + batch).reshape(z.shape[0], -1)[:, index]
                                 .to(torch.float64).numpy() for v in _other_log_prob(other, z, dtype))

                (entropy, entropy_error), (cross, cross_error) = quadrature_entropy(
                    self.family, p, lw, self.alpha, check_rtol(rtol), log_other=log_q)
                rows.append((-entropy - cross, entropy_error + cross_error))
            rows = torch.tensor(rows, dtype=torch.float64)
            value, error = (rows[:, i].reshape(self.batch_shape) for i in range(2))
            return _infinite_where_outside(rounded(Estimate(value.to(dtype), error.to(dtype)))), None
        pi, points, log_u, est = self._node_expectation(method, num_samples, seed, rtol)
        log_q, log_q_error = _other_log_prob(other, points, dtype)
        log_q = log_q.to(torch.float64)
        check_other_log_prob(log_q, pi)
        outside = ((pi > 0) & (log_q == -math.inf)).any(0)  # other misses some of the pool's mass
        log_q = torch.where(log_q == -math.inf, 0.0, log_q)
        log_z = self._float64_log_normalizer(est)
        mean, error = self._expectation(pi, log_u - log_z - log_q, est)
        error = error + (pi * log_q_error).sum(0)
        mean = torch.where(outside, math.inf, mean)  # its error made 0 by _infinite_where_outside
        return _infinite_where_outside(rounded(Estimate(mean.to(dtype), error.to(dtype)))), est

    def kl_divergence_to(self, other: Distribution) -> torch.Tensor:
        """``kl_estimate(other).value`` with the gradient of the engine's weighted points for it, to the pool's
        parameters and to ``other``'s (through ``other.log_prob`` at those float64 points, or its float64 copy); what
        ``torch.distributions.kl_divergence(pool, other)`` returns away from a closed form."""
        estimate, est = self._kl(other, "auto", 100_000, 0, DEFAULT_RTOL)
        value, dtype = estimate.value, self.experts.params.dtype

        def log_prob(points):
            # at the points the value took it at, through other's float64 copy where it holds a lower dtype, as the
            # value's (rounded to float32, nodes next to a singular end land on it: an infinite log-density, a NaN
            # gradient)
            log_q, points = _other_log_prob_at(other, points, dtype)
            if log_q.dtype != torch.float64:
                twin = _float64_twin(other, points, log_q.shape)
                if twin is not None and (twin.requires_grad or not log_q.requires_grad):
                    return (twin,)
            return (log_q,)

        def log_other(points):
            return _in_support(other, points, log_prob, (0.0,))[0]

        other_requires_grad = torch.is_grad_enabled() and not self._differentiable and _requires_grad(other)
        return self._with_node_gradient(value, log_other, other_requires_grad=other_requires_grad, est=est)

    # ------------------------------------------------------------ numerical engine
    def estimate(self, quantities=None, method: str = "auto", num_samples: int = 100_000, seed: int | None = None,
                 generator: torch.Generator | None = None, rtol: float = DEFAULT_RTOL) -> PoolEstimate:
        """The normaliser and moments by the numerical engine, each with its error (see
        :mod:`opinionpool.numerical`). Works for exact pools too, which is how the engine is validated.

        Args:
            quantities: among ``"mean"``, ``"variance"``, ``"covariance"``, ``"expected_statistic"``
                (``E[T(z)]``); by default mean and variance (``E[T(z)]`` for families without numeric moments).
            method: ``"auto"``, ``"enumeration"``, ``"quadrature"``, ``"grid"`` or ``"importance"``.
            num_samples: importance samples (ignored by the deterministic methods).
            seed, generator: make the sampling reproducible (same seed, same answer); default: the global RNG.
            rtol: relative tolerance of the 1-D adaptive quadrature (reached in float64 whatever the dtype).

        The values carry no gradient. Raises ``RuntimeError`` if the estimated ``log Z`` falls outside the
        certified bracket :meth:`normalizer_bounds` by more than eight times its stated error.
        """
        if quantities is None:
            quantities = ("mean", "variance") if self.family.has_numeric_moments else ("expected_statistic",)
        wanted = check_quantities(self.family, quantities)
        method = check_method(self.family, method)
        rtol = check_rtol(rtol)
        if method == "importance":
            num_samples = check_num_samples(num_samples)
        return self._estimate(wanted, method, num_samples, seed, generator, rtol)

    def _estimate(self, wanted, method, num_samples, seed, generator, rtol, keep_nodes: bool = False) -> PoolEstimate:
        params = self.experts.params
        args = (self.family, params, self.log_weights, self.alpha, wanted)
        with torch.no_grad():
            if method == "enumeration":  # in float64, as the other rules (log Z of tiny probabilities is near 0)
                est = in_dtype(enumeration_estimate(self.family, *_in_float64(params, self.log_weights), self.alpha,
                                                    wanted, keep_nodes=keep_nodes), params.dtype)
            elif method == "quadrature":
                est = quadrature_estimate(*args, rtol=rtol, keep_nodes=keep_nodes)
            elif method == "grid":
                est = grid_estimate(*args, keep_nodes=keep_nodes)
            else:
                pool = self._importance_pool()
                with seeded(seed, generator, params.device):
                    est = importance_estimate(self.family, pool.experts.params, pool.log_weights, self.alpha,
                                              pool.envelope(), wanted, num_samples, keep_nodes=keep_nodes)
                est = in_dtype(est, params.dtype)
            self._check_bounds(est)
        return est

    def _importance_pool(self) -> "_Pool":
        """The pool importance sampling draws from: this one, or, for a family other than the Gaussians in a dtype
        below float64, a float64 copy. torch's Gamma, Beta and Dirichlet samplers clamp draws below the smallest
        normal float to it, in float32 1.2e-38: Dirichlet concentrations of 0.002-0.05 put a third of the
        coordinates there, and log Z came out 0.11 against 0.22 (270 stated errors off). In float64 the clamp is at
        2.2e-308; what the sampler still clamps there is warned of. Gaussian samplers clamp nothing and keep their
        dtype (the applications' large float32 pools)."""
        params = self.experts.params
        if params.dtype == torch.float64 or self.family.gaussian or not params.is_floating_point():
            return self
        # rebuilt when the parameters or weights change, in place too (an optimiser's step): the version counters
        key = tuple((t.data_ptr(), t._version, t.shape) for t in (params, self.log_weights))
        if self._float64_copy is None or self._float64_copy[0] != key:
            experts, weights = self._float64_parts()
            copy = NumericalHolderPool(experts, self.alpha, weights, method="importance",
                                       max_components=self._max_components, validate_args=False)
            self._float64_copy = (key, copy)
        return self._float64_copy[1]

    def _check_bounds(self, est: PoolEstimate) -> None:
        """Never return an estimate that contradicts the certified bracket of ``log Z`` (beyond its error)."""
        value, error = est.log_normalizer
        lower, upper = self._bounds(min(self._max_components, _CHECK_COMPONENTS))
        slack = 8 * error + 64 * torch.finfo(value.dtype).eps * (1 + value.abs())
        bad = (value < lower - slack) | (value > upper + slack)
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0].tolist())
            raise RuntimeError(
                f"the {est.method} estimate of log Z = {float(value[index]):.10g} (stated error {float(error[index]):.3g}) "
                f"lies outside the certified bracket [{float(lower[index]):.10g}, {float(upper[index]):.10g}]"
                f"{f' at batch index {index}' if index else ''}; the {est.method} missed part of the pool's mass "
                "(try another method, or a smaller rtol)")

    def _float64_parts(self):
        """The experts and weights in float64, without gradient: what ``_in_float64`` builds the same pool from."""
        return (Experts(self.family, self.experts.params.detach().to(torch.float64)),
                self.log_weights.detach().to(torch.float64).exp())

    def envelope(self) -> Envelope:
        """A normalised exact pool ``p`` of the same experts and ``B`` with ``u <= B p`` (the power-mean
        inequalities): ``M_alpha <= M_(1/n)`` for ``0 < alpha <= 1``, ``n = floor(1/alpha)`` (or the largest
        ``n`` within ``max_components``); for ``alpha > 1`` the better of ``M_alpha <= lambda_min^(1/alpha - 1) M_1``
        and ``M_alpha <= max_j q_j <= sum_j q_j``, the second alone for ``+inf``; for ``alpha < 0`` the better of
        ``M_alpha <= M_0`` and :meth:`_geometric_bound` (and ``min_j q_j`` for ``-inf``)."""
        a = self.alpha
        lw = self.log_weights
        present = lw > -math.inf
        uniform = present.to(lw.dtype)
        if a == math.inf:
            proposal = HolderPool(self.experts, 1, uniform, validate_args=False)
            return Envelope(proposal, torch.log(uniform.sum(-1)), "max_j q_j <= sum_j q_j")
        if a >= 1:
            # the better of the two, per pool: with one small weight the first bound is huge (lambda_min = 1e-6 at
            # alpha = 20: e^13), and the weighted mixture puts almost nothing where the pool has half its mass
            mixture_bound = (1 / a - 1) * _log_smallest_weight(lw)
            count_bound = torch.log(uniform.sum(-1))
            better = (count_bound < mixture_bound).unsqueeze(-1)
            proposal = HolderPool(self.experts, 1, torch.where(better, uniform, lw.exp()), validate_args=False)
            return Envelope(proposal, torch.minimum(count_bound, mixture_bound),
                            f"M_{a:g} <= min(lambda_min^(1/alpha - 1) M_1, max_j q_j <= sum_j q_j)")
        if a > 0:
            order = self._envelope_order()
            proposal = HolderPool(self.experts, 1 / order, lw.exp(), validate_args=False,
                                  max_components=self._max_components)
            return Envelope(proposal, proposal.log_normalizer, f"M_{a:g} <= M_(1/{order})")
        weights = uniform if a == -math.inf else lw.exp()
        log_bound = HolderPool(self.experts, 0, weights, validate_args=False).log_normalizer
        fitted, fitted_bound = self._geometric_bound()
        better = (fitted_bound < log_bound).unsqueeze(-1)
        proposal = HolderPool(self.experts, 0, torch.where(better, fitted, weights), validate_args=False)
        return Envelope(proposal, torch.minimum(fitted_bound, log_bound),
                        f"M_{a:g} <= min(M_0, min_j lambda_j^(1/alpha) q_j <= fitted log-linear pool)")

    def _geometric_bound(self, steps: int = 30):
        """For ``alpha < 0``: ``u = M_alpha <= min_j c_j q_j`` with ``c_j = lambda_j^(1/alpha)`` (one term of the
        power sum; ``c_j = 1`` for ``-inf``), and a minimum is at most any weighted geometric mean, so ``u <=
        prod_j (c_j q_j)^(beta_j) = exp(B(beta)) p_beta`` with ``p_beta`` the log-linear pool of weights ``beta`` and
        ``B(beta) = sum_j beta_j log c_j + log Z_beta``, convex in ``beta``. Returns the weights ``beta`` that
        minimise ``B`` (L-BFGS over their logits, from the pool's own) and ``B`` there. With the pool's weights the
        proposal ``M_0`` sat on the heavier side of experts far apart while the pool lies where their tails cross
        (4-D experts 30 sd apart: an effective sample size of 1.3 and log Z 28 nats off, its error 0.9)."""
        lw = self.log_weights.detach()
        present = lw > -math.inf
        log_c = torch.zeros_like(self.log_weights) if self.alpha == -math.inf else \
            torch.where(present, self.log_weights / self.alpha, 0.0)
        # the fit differentiates B even under torch.inference_mode, on copies that are not inference tensors
        with torch.inference_mode(False):
            fixed = Experts(self.family, self.experts.params.detach().clone())
            fixed_present, fixed_log_c = present.clone(), log_c.detach().clone()

        def bound_at(logits, experts, log_c, present=present):
            beta = torch.softmax(torch.where(present, logits, -math.inf), -1)
            return beta, (beta * log_c).sum(-1) + HolderPool(experts, 0, beta, validate_args=False).log_normalizer

        def objective(x):
            """B summed over the pools (they are independent: each logit row moves its own) and its gradient."""
            with torch.inference_mode(False), torch.enable_grad():
                logits = torch.as_tensor(x, device=lw.device).reshape(lw.shape).to(lw.dtype).requires_grad_(True)
                value = bound_at(logits, fixed, fixed_log_c, fixed_present)[1].sum()
                (grad,) = torch.autograd.grad(value, logits)
            return float(value.detach()), grad.detach().cpu().to(torch.float64).reshape(-1).numpy()

        if self._geometric_logits is None or self._geometric_logits.shape != lw.shape:
            # scipy's L-BFGS rather than torch.optim's, whose first use imports torch._dynamo (seconds)
            start = torch.where(present, lw, 0.0).cpu().to(torch.float64).reshape(-1).numpy()
            fit = optimize.minimize(objective, start, jac=True, method="L-BFGS-B", options={"maxiter": steps})
            self._geometric_logits = torch.as_tensor(fit.x, device=lw.device).reshape(lw.shape).to(lw.dtype)
        logits = self._geometric_logits
        # B at the minimiser from the pool's own experts and weights: its gradient is min_beta B's (envelope theorem)
        beta, bound = bound_at(logits, self.experts, log_c)
        finite = torch.isfinite(bound.detach())
        return torch.where(finite.unsqueeze(-1), beta, lw.exp()), torch.where(finite, bound, math.inf)

    def _envelope_order(self, max_components: int | None = None) -> int:
        """The largest ``n <= 1/alpha`` whose exact pool has at most ``max_components`` components (1 if none),
        by bisection: ``1/alpha`` may be ``10**12`` or overflow to ``inf``, and no order above ``max_components``
        fits (``binom(n + M - 1, M - 1) > n`` for two experts or more)."""
        cap = self._max_components if max_components is None else max_components
        inverse = 1 / self.alpha
        low, high = 1, cap if inverse >= cap else max(1, math.floor(inverse * (1 + 1e-12)))
        while low < high:
            middle = (low + high + 1) // 2
            if within_max_components(middle, self.experts.num_experts, cap):
                low = middle
            else:
                high = middle - 1
        return low

    def normalizer_bounds(self):
        """A certified bracket ``(lower, upper)`` of ``log Z`` from the neighbouring exact pools
        (``Z`` is non-decreasing in alpha); ``-inf`` where no closed-form lower bound exists (alpha < 0)."""
        return self._bounds(self._max_components)

    def _bounds(self, max_components: int):
        """:meth:`normalizer_bounds` from exact pools of at most ``max_components`` components."""
        a = self.alpha
        lw = self.log_weights
        present = lw > -math.inf
        count = present.sum(-1).to(lw.dtype)
        order = exact_order(a)
        if order is not None and within_max_components(order, self.experts.num_experts, max_components):
            log_z = HolderPool(self.experts, a, lw.exp(), validate_args=False,
                               max_components=max_components).log_normalizer
            return log_z, log_z
        minus_inf = torch.full_like(count, -math.inf)
        if a < 0:
            weights = present.to(lw.dtype) if a == -math.inf else lw.exp()
            log_z_0 = HolderPool(self.experts, 0, weights, validate_args=False).log_normalizer
            return minus_inf, torch.minimum(log_z_0, self._geometric_bound()[1].to(log_z_0.dtype))
        if a > 1:
            log_min = _log_smallest_weight(lw)
            upper = torch.log(count) if a == math.inf else torch.minimum((1 / a - 1) * log_min, torch.log(count))
            return torch.zeros_like(count), upper
        above = self._envelope_order(max_components)
        upper = HolderPool(self.experts, 1 / above, lw.exp(), validate_args=False,
                           max_components=max_components).log_normalizer
        below = above + 1
        if num_components(below, self.experts.num_experts) <= max_components:
            lower = HolderPool(self.experts, 1 / below, lw.exp(), validate_args=False,
                               max_components=max_components).log_normalizer
        else:
            lower = HolderPool(self.experts, 0, lw.exp(), validate_args=False).log_normalizer
        return lower, upper


class HolderPool(_Pool):
    r"""The exact Hölder pool (``alpha = 0`` or ``1/n``; see the module docstring).

    Attributes are tensors with shape ``batch_shape`` (``log_normalizer``) or
    ``batch_shape + event_shape`` (``mean``, ``variance``); the finite-mixture form is available as
    ``log_mixture_weights`` / ``component_params`` and as a ``MixtureSameFamily`` via ``as_mixture()``.
    An order whose pool has more than ``max_components`` components raises ``ValueError`` (with the count)
    before anything is built.
    """

    def __init__(self, experts, alpha=0.5, weights=None, *, max_components: int = DEFAULT_MAX_COMPONENTS,
                 validate_args: bool | None = None):
        order = exact_order(check_alpha(alpha))
        if order is None:
            raise NotImplementedError(
                f"alpha={alpha!r} has no closed form: exact Hölder pools exist for alpha = 0 and alpha = 1/n "
                "(n = 1, 2, ...); use opinionpool.holder, which estimates other alpha numerically")
        check_positive_int("max_components", max_components)
        experts = as_experts(experts, validate_args=validation_enabled(validate_args))
        check_max_components(alpha, order, experts.num_experts, max_components)
        super().__init__(experts, alpha, weights, validate_args)
        if self._alpha is not self.alpha:
            warnings.warn(f"alpha={self.alpha!r} is exactly {'0' if order == 0 else f'1/{order}'}, so the exact pool is "
                          "used, which carries no gradient with respect to alpha; NumericalHolderPool(experts, alpha) "
                          "differentiates in alpha here too", stacklevel=3)
            self._alpha = self.alpha
        self._max_components = max_components
        self.order = order
        # weights with a batch shape of their own give one pool per row: the experts are broadcast to the common
        # batch (views, no copies), as NumericalHolderPool does, so that the estimates' engine sees it too
        batch = torch.broadcast_shapes(self.experts.batch_shape, self.log_weights.shape[:-1])
        if batch != self.experts.batch_shape:
            self.experts = _expand_experts(self.experts, batch)
        if batch != self.log_weights.shape[:-1]:
            self.log_weights = self.log_weights.expand(batch + self.log_weights.shape[-1:])
        self._mixture_cache = None
        self._moments_cache = None
        # what is built later is built as it would have been now: with or without autograd, in inference mode or not
        self._modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        if not self._pairwise_gaussian:  # built (and checked) now; the Gaussian alpha = 1/2 pool waits until asked
            self._mixture()
        self._init_distribution(torch.broadcast_shapes(self.experts.batch_shape, self.log_weights.shape[:-1]))

    # ------------------------------------------------------------ the mixture
    @property
    def _pairwise_gaussian(self) -> bool:
        """Whether the pool's moments come from the alpha = 1/2 autograd function of diagonal Gaussians
        (``functional.hellinger``): Normal or diagonal Normal experts at ``alpha = 1/2``. The same moments as the
        mixture's, without building its ``M (M + 1) / 2`` components (built only when something else asks)."""
        return self.order == 2 and type(self.family) in (NormalFamily, DiagonalNormalFamily)

    @contextlib.contextmanager
    def _built_modes(self):
        """Autograd and inference mode as when the pool was built (a first read under ``torch.no_grad`` must not
        leave later reads without gradients)."""
        grad, inference = self._modes
        with torch.set_grad_enabled(grad), torch.inference_mode(inference):
            yield

    def _mixture(self):
        """``(log_normalizer, log_mixture_weights, component_params)``, built on first use."""
        if self._mixture_cache is None:
            params, log_weights = self.experts.params, self.log_weights
            wide = self._sums_in_float64
            if wide:  # (the weights renormalised there: float32 weights sum to one only to 3e-8)
                params, log_weights = params.double(), log_weights.double()
                log_weights = log_weights - torch.logsumexp(log_weights, -1, keepdim=True)
            with self._built_modes():
                log_mix, params = holder_components(self.family, params, log_weights, self.order)
                log_normalizer = torch.logsumexp(log_mix, dim=-1)
                log_mix = log_mix - log_normalizer.unsqueeze(-1)
            if wide:
                dtype = self.experts.params.dtype
                log_normalizer, log_mix, params = log_normalizer.to(dtype), log_mix.to(dtype), params.to(dtype)
            finite = torch.isfinite(log_normalizer)
            if self._validate and not bool(finite.all()):
                raise ValueError("experts: the pool's log-normaliser is not finite, got "
                                 f"{describe(log_normalizer, ~finite)}; check the experts for extreme parameters")
            self._mixture_cache = (log_normalizer, log_mix, params)
        return self._mixture_cache

    @property
    def log_normalizer(self) -> torch.Tensor:
        return self._mixture()[0]

    @property
    def log_mixture_weights(self) -> torch.Tensor:
        return self._mixture()[1]

    @property
    def component_params(self) -> torch.Tensor:
        return self._mixture()[2]

    def _moments(self):
        """The moment-matched ``(mean, logvar)`` of the alpha = 1/2 pool of Gaussian experts (``_pairwise_gaussian``),
        batch + event shaped."""
        if self._moments_cache is None:
            scalar = not self.family.event_shape  # scalar Normal experts: one latent dimension
            with self._built_modes():
                loc, logvar = self.family.split(self.experts.params)
                if scalar:
                    loc, logvar = loc.unsqueeze(-1), logvar.unsqueeze(-1)
                loc, logvar = standing_in(loc, logvar, (self.log_weights > -math.inf).unsqueeze(-1))
                mean, logvar = hellinger_moments(loc, logvar, self.log_weights)
                self._moments_cache = (mean.squeeze(-1), logvar.squeeze(-1)) if scalar else (mean, logvar)
        return self._moments_cache

    # ------------------------------------------------------------------ shapes
    @property
    def num_components(self) -> int:
        return num_components(_built_order(self.order, self.experts.num_experts), self.experts.num_experts)

    @property
    def mixture_weights(self) -> torch.Tensor:
        return self.log_mixture_weights.exp()

    def _bounds(self, max_components: int):
        """Exact: ``(log_normalizer, log_normalizer)``."""
        return self.log_normalizer, self.log_normalizer

    # ---------------------------------------------------------------- moments
    @property
    def mean(self) -> torch.Tensor:
        if self._pairwise_gaussian:
            return self._moments()[0]
        return self.family.mixture_mean(self.log_mixture_weights, self.component_params)

    @property
    def variance(self) -> torch.Tensor:
        if self._pairwise_gaussian:
            return self._moments()[1].exp()
        return self.family.mixture_variance(self.log_mixture_weights, self.component_params)

    @property
    def covariance_matrix(self) -> torch.Tensor:
        if not self.family.multivariate:
            raise ValueError(f"covariance_matrix needs multivariate experts; {self.family.name} experts are scalar "
                             "(use variance)")
        return self.family.mixture_covariance(self.log_mixture_weights, self.component_params)

    # ------------------------------------------------------ torch.distributions protocol
    def _components(self):
        return self.family.distribution(self.component_params)

    def _component_cdf_available(self) -> bool:
        return _has_method(self._components(), "cdf")

    def _mixture_cdf(self, value, upper_tail=False):
        """The mixture's cdf at ``value``, or where ``upper_tail`` (a bool, or a bool tensor broadcasting against
        ``value``) its survival function ``1 - cdf``, each summed from the components' own tails where they have
        closed forms (Normal, Gamma, Exponential): ``1 - cdf`` next to 1 keeps only the digits of 1 (a tail of 1e-15
        came out 1.1e-15)."""
        components = self._components()
        value = value.unsqueeze(-1).clamp(*self.family.support_interval)
        upper = torch.as_tensor(upper_tail, device=value.device).unsqueeze(-1)
        if isinstance(components, torch.distributions.Normal):
            # torch's Normal cdf, (1 + erf) / 2, is 0 below 1e-16 (8 standard deviations): erfc keeps the lower tail
            standard = (value - components.loc) / (components.scale * math.sqrt(2))
            tail = 0.5 * torch.special.erfc(torch.where(upper, standard, -standard))
        elif isinstance(components, torch.distributions.Gamma):
            x = components.rate * value
            tail = torch.where(upper, torch.special.gammaincc(components.concentration, x),
                               torch.special.gammainc(components.concentration, x))
        elif isinstance(components, torch.distributions.Exponential):
            tail = torch.where(upper, torch.exp(-components.rate * value), -torch.expm1(-components.rate * value))
        else:
            cdf = components.cdf(value)
            tail = torch.where(upper, 1 - cdf, cdf)
        return (self.log_mixture_weights.exp() * tail).sum(-1).clamp(0, 1)

    @property
    def has_rsample(self) -> bool:
        """True for the one-component pool (``alpha = 0``) of a family with ``rsample``: only there is ``rsample``'s
        gradient the gradient of the expectation. A mixture's (``alpha = 1/n``) misses the path through its component
        weights, which depend on the experts' parameters too (as ``MixtureSameFamily``, which has none)."""
        return self.num_components == 1 and self._components().has_rsample

    def rsample(self, sample_shape=torch.Size(), seed: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Samples reparameterised within their component: a component is drawn by its weight (no gradient
        flows through that discrete choice, nor to the mixture weights), then the component's own ``rsample``.
        For ``alpha = 0`` (one component) this is the full reparameterisation gradient; for a mixture the gradient
        of an expectation is biased (the weights' path is missing, and they depend on the experts' parameters), so
        ``has_rsample`` is False there, and a call whose samples carry a gradient warns. ``seed`` or ``generator``
        as in :meth:`sample`."""
        sample_shape = check_sample_shape(sample_shape)
        if sample_shape.numel() == 0:  # as sample() (the categorical draw refuses no samples)
            check_seed(seed)
            return self.component_params.new_empty(sample_shape + self.batch_shape + self.event_shape)
        if self.num_components != 1 and torch.is_grad_enabled() and self.component_params.requires_grad:
            warnings.warn(f"rsample of the alpha={self.alpha!r} pool, a mixture of {self.num_components} components, "
                          "carries only the gradient within the drawn component: the gradient of an expectation "
                          "over its samples is biased, as the component weights depend on the experts' parameters "
                          "too (has_rsample is False). Unbiased: alpha = 0, or moment_match().rsample() for the "
                          "moment-matched pool", stacklevel=2)
        shape = sample_shape + self.batch_shape
        params = self.component_params
        with seeded(seed, generator, params.device):
            index = Categorical(logits=self.log_mixture_weights.detach()).sample(sample_shape)
            param_dims = len(self.family.param_shape)
            params = params.expand(shape + params.shape[len(self.batch_shape):])
            index = index.reshape(shape + (1,) * (param_dims + 1)).expand(shape + (1,) + params.shape[len(shape) + 1:])
            chosen = torch.gather(params, len(shape), index).squeeze(len(shape))
            return self.family.distribution(chosen).rsample()

    @property
    def mode(self) -> torch.Tensor:
        """The log-linear pool's (one family member's) mode; a mixture's mode has no closed form."""
        if self.num_components != 1:
            raise NotImplementedError(f"the alpha={self.alpha!r} pool is a mixture of {self.num_components} "
                                      "components, whose mode has no closed form")
        return self._components().mode.squeeze(len(self.batch_shape))

    def entropy(self) -> torch.Tensor:
        """Exact for ``alpha = 0`` (one family member); otherwise as :meth:`entropy_estimate` states."""
        if self.num_components == 1 and _has_method(self._components(), "entropy"):
            # torch's Poisson inherits ExponentialFamily.entropy, which raises for want of a carrier measure
            with contextlib.suppress(NotImplementedError):
                # in float64, cast back: torch's float32 entropies of concentrated Gamma, Beta and Dirichlet
                # cancel log-gammas of 1e5 (6.0234 for 6.0223 at shapes of 1.5e4)
                params = self.component_params
                wide = self.family.distribution(params.to(torch.promote_types(params.dtype, torch.float64)))
                return wide.entropy().squeeze(-1).to(params.dtype)
        return super().entropy()

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(HolderPool, _instance)
        batch_shape = torch.Size(batch_shape)
        new.__dict__.update(self.__dict__)
        new.experts = _expand_experts(self.experts, batch_shape)
        new.log_weights = self.log_weights.expand(batch_shape + self.log_weights.shape[-1:])
        if self._mixture_cache is not None:
            log_normalizer, log_mix, params = self._mixture_cache
            new._mixture_cache = (log_normalizer.expand(batch_shape), log_mix.expand(batch_shape + log_mix.shape[-1:]),
                                  params.expand(batch_shape + params.shape[len(self.batch_shape):]))
        if self._moments_cache is not None:
            event = self.family.event_shape
            new._moments_cache = tuple(t.expand(batch_shape + event) for t in self._moments_cache)
        new._init_distribution(batch_shape)
        return new

    # -------------------------------------------------------------- densities
    def _in_float64(self) -> HolderPool:
        """The same pool built again from float64 experts and weights (no gradient, no validation)."""
        experts, weights = self._float64_parts()
        return HolderPool(experts, self.alpha, weights, max_components=self._max_components, validate_args=False)

    def as_mixture(self) -> MixtureSameFamily:
        """The pool as a ``torch.distributions.MixtureSameFamily`` (one component for ``alpha=0``)."""
        components = self.family.distribution(self.component_params)
        return MixtureSameFamily(Categorical(logits=self.log_mixture_weights), components, validate_args=False)

    def sample(self, sample_shape=torch.Size(), seed: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Samples ``sample_shape + batch_shape + event_shape``: a component index, then that component. ``seed``
        (or a ``generator`` to draw one from) samples on a forked RNG, leaving the global one untouched, as
        :meth:`NumericalHolderPool.sample` does."""
        sample_shape = check_sample_shape(sample_shape)
        if sample_shape.numel() == 0:  # as torch.distributions do (the categorical draw refuses no samples)
            check_seed(seed)
            return self.component_params.new_empty(sample_shape + self.batch_shape + self.event_shape)
        components = self.component_params.reshape((-1,) + self.component_params.shape[len(self.batch_shape):])
        with seeded(seed, generator, components.device):
            index = Categorical(logits=self.log_mixture_weights).sample(sample_shape)
            chosen = components[torch.arange(components.shape[0], device=index.device),
                                index.reshape(-1, components.shape[0])]
            return self.family.sample(chosen.reshape(sample_shape + self.batch_shape + self.family.param_shape))

    def moment_match(self, family: str | None = None):
        """Project the pool onto one distribution by matching moments (the KL M-projection).

        ``family=None``: onto the experts' own family (match ``E[T(z)]``); ``"gaussian"``: a Gaussian
        with the pool's mean and (co)variance; ``"diag_gaussian"``: a Gaussian with its marginal means
        and variances. The result is a ``torch.distributions`` object.
        """
        if family is None:
            params = self.family.join(*self._moments()) if self._pairwise_gaussian else \
                self.family.moment_match(self.log_mixture_weights, self.component_params)
            return self.family.distribution(params, validate_args=self._validate)
        return gaussian_projection(self, family)

    def __repr__(self) -> str:
        return (f"HolderPool(family={self.family!r}, alpha={self.alpha!r}, num_experts={self.experts.num_experts}, "
                f"num_components={self.num_components}, batch_shape={tuple(self.batch_shape)})")


class NumericalHolderPool(_Pool):
    r"""A Hölder pool for any real alpha or ``+-inf``, by the numerical engine.

    The same interface as :class:`HolderPool`: ``log_normalizer``, ``mean``, ``variance``,
    ``covariance_matrix``, ``log_prob``, ``sample`` (exact: rejection from the envelope, by inverting the cdf
    for scalar experts where the envelope would accept under 5% of its proposals, or the enumerated probabilities
    for discrete experts) and ``moment_match``. Those values come from one
    :meth:`estimate` with this pool's ``method``, ``num_samples`` and ``seed``, computed on first use;
    call :meth:`estimate` directly for their errors.

    ``log_normalizer``, ``log_prob``, ``mean``, ``variance``, ``covariance_matrix`` and ``moment_match()`` are
    differentiable in the experts' parameters, the weights and ``alpha`` when it is given as a tensor that requires
    grad (at ``alpha = 0`` or ``+-inf`` the pool does not depend on it, and it gets no gradient):
    :math:`\nabla\log Z = E_{pool}[\nabla\log u]` and :math:`\nabla E_{pool}[f] = \mathrm{Cov}_{pool}(f, \nabla\log u)`,
    the expectations taken over the estimate's own points (the exact gradient of the quadrature rule, grid or sum;
    the self-normalised estimate from the same samples for importance sampling); see
    :func:`opinionpool.numerical.differentiable_estimates`. A subnormal
    alpha (``0 < |alpha| < 2.2e-308``) is refused: ``alpha * log q_j`` would keep too few digits (use ``alpha=0``).
    """

    def __init__(self, experts, alpha, weights=None, *, method: str = "auto", num_samples: int = 100_000,
                 seed: int = 0, max_components: int = DEFAULT_MAX_COMPONENTS, rtol: float = DEFAULT_RTOL,
                 validate_args: bool | None = None):
        check_positive_int("max_components", max_components)
        if 0 < abs(check_alpha(alpha)) < sys.float_info.min:
            raise ValueError(f"alpha={alpha!r} is subnormal, too small for the numerical engine (alpha * log q_j "
                             "loses its significant digits); this pool differs from the log-linear pool by O(alpha), "
                             "so pass alpha=0")
        super().__init__(experts, alpha, weights, validate_args)
        self.method = check_method(self.family, method)
        if self.method == "importance":
            num_samples = check_num_samples(num_samples)
        self.rtol = check_rtol(rtol)
        self.num_samples = num_samples
        self.seed = check_seed(seed)
        self._max_components = max_components
        self._summary: PoolEstimate | None = None
        # weights with a batch shape of their own give one pool per row, as in HolderPool; the engine takes its batch
        # from the experts' parameters, so both are broadcast to the common batch here (views, no copies)
        batch = torch.broadcast_shapes(self.experts.batch_shape, self.log_weights.shape[:-1])
        if batch != self.experts.batch_shape:
            self.experts = _expand_experts(self.experts, batch)
        if batch != self.log_weights.shape[:-1]:
            self.log_weights = self.log_weights.expand(batch + self.log_weights.shape[-1:])
        self._init_distribution(batch)

    @property
    def summary(self) -> PoolEstimate:
        """The estimate behind this pool's attributes (with errors)."""
        if self._summary is None:
            wanted = set()
            if self.family.has_numeric_moments:
                wanted |= {"mean", "variance"}
                if self.family.multivariate:
                    wanted.add("covariance")
            if not self.family.gaussian:
                wanted.add("expected_statistic")
            summary = self._estimate(frozenset(wanted), self.method, self.num_samples, self.seed, None, self.rtol,
                                     keep_nodes=self._differentiable)
            log_z = summary.log_normalizer.value
            finite = torch.isfinite(log_z)
            if not bool(finite.all()):  # not cached: every later access raises too, none serves its NaNs
                raise ValueError(f"the estimated log-normaliser of the alpha={self.alpha!r} pool is not finite, got "
                                 f"{describe(log_z, ~finite)}; the experts may not overlap enough for a numerical estimate")
            self._summary = summary
        return self._summary

    def _values(self, name: str) -> torch.Tensor:
        """The summary's ``name`` (a field of :class:`PoolEstimate`), with its gradient when one is wanted."""
        if not (self._differentiable and torch.is_grad_enabled()):
            return getattr(self.summary, name).value
        if self.family.circular and name in ("mean", "variance"):  # functions of E[T(z)]
            stat = self._values("expected_statistic")
            moments = self.family.moments_from_statistic(stat, torch.zeros_like(stat))
            return moments[0 if name == "mean" else 1][0]
        return differentiable_estimates(self.family, self.experts.params, self.log_weights, self._alpha, self.summary,
                                        (name,))[name]

    @property
    def log_normalizer(self) -> torch.Tensor:
        return self._values("log_normalizer")

    def _moment(self, name):
        if not self.family.has_numeric_moments:
            raise ValueError(f"{self.family.name} experts have no numeric {name}; use moment_match() "
                             "or estimate(['expected_statistic'])")
        return self._values(name)

    @property
    def mean(self) -> torch.Tensor:
        return self._moment("mean")

    @property
    def variance(self) -> torch.Tensor:
        return self._moment("variance")

    @property
    def covariance_matrix(self) -> torch.Tensor:
        if not self.family.multivariate:
            raise ValueError(f"covariance_matrix needs multivariate experts; {self.family.name} experts are scalar "
                             "(use variance)")
        return self._moment("covariance")

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        raise NotImplementedError(f"a Hölder pool at alpha={self.alpha!r} (the numerical engine) has no reparameterised "
                                  "sampler (has_rsample is False): sample() draws exact samples without a gradient; "
                                  "the exact pools (alpha 0 or 1/n) have rsample")

    def sample(self, sample_shape=torch.Size(), seed: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact samples ``sample_shape + batch_shape + event_shape``."""
        sample_shape = check_sample_shape(sample_shape)
        count = sample_shape.numel()
        params = self.experts.params
        if count == 0:  # as torch.distributions do
            check_seed(seed)
            return params.new_empty(sample_shape + self.batch_shape + self.event_shape)
        with seeded(seed, generator, params.device), torch.no_grad():
            if self.family.discrete:
                values, _, log_u, _ = enumerate_support(self.family, params, self.log_weights, self.alpha)
                index = Categorical(logits=log_u.movedim(0, -1)).sample(sample_shape)
                return values[index]
            envelope = self.envelope()
            if self.family.event_shape == torch.Size():
                acceptance = (self.log_normalizer.detach() - envelope.log_bound).exp()
                if bool((acceptance < _MIN_ACCEPTANCE).any()):
                    # alpha < 0 with experts far apart puts the pool's mass where every expert's is tiny (1.4 % of
                    # the fitted envelope's in one case, e^-667 of the log-linear pool's): rejection would take
                    # long or never finish, the quantiles are exact
                    u = torch.rand(sample_shape + self.batch_shape, dtype=params.dtype, device=params.device)
                    return self.icdf(u.clamp_min(torch.finfo(params.dtype).tiny))
            samples = rejection_sample(self.family, params, self.log_weights, self.alpha, envelope, count)
        return samples.reshape(sample_shape + samples.shape[1:])

    def expand(self, batch_shape, _instance=None):
        """The same pools broadcast to ``batch_shape`` (the estimate behind the attributes, if computed, is
        expanded too rather than recomputed)."""
        new = self._get_checked_instance(NumericalHolderPool, _instance)
        batch_shape = torch.Size(batch_shape)
        new.__dict__.update(self.__dict__)
        new.experts = _expand_experts(self.experts, batch_shape)
        new.log_weights = self.log_weights.expand(batch_shape + self.log_weights.shape[-1:])
        if self._summary is not None:
            new._summary = _expand_estimate(self._summary, self.batch_shape, batch_shape)
        new._init_distribution(batch_shape)
        return new

    def _in_float64(self) -> NumericalHolderPool:
        """The same pool built again from float64 experts and weights (no gradient, no validation)."""
        experts, weights = self._float64_parts()
        return NumericalHolderPool(experts, self.alpha, weights, method=self.method, num_samples=self.num_samples,
                                   seed=self.seed, max_components=self._max_components, rtol=self.rtol,
                                   validate_args=False)

    def moment_match(self, family: str | None = None):
        """As :meth:`HolderPool.moment_match`, from the estimated moments (``E[T(z)]`` for non-Gaussian families)."""
        if family is not None or self.family.gaussian:
            if family is None:  # the experts' own family: diagonal Gaussians stay diagonal, as in HolderPool
                diagonal = isinstance(self.family, (NormalFamily, DiagonalNormalFamily))
                family = "diag_gaussian" if diagonal else "gaussian"
            return gaussian_projection(self, family)
        stat = self._values("expected_statistic")
        dtype = stat.dtype
        if dtype != torch.float64:
            # solved from the float64 estimate's value (with this pool's gradient): the float32 statistic rounds
            # E[log x], about 9.4 for a Gamma of shape 1e4, by 5e-7, the size of the gap log E[x] - E[log x] that
            # the solve inverts (it raised, and lost digits of concentrated Beta and Dirichlet pools)
            wide = self._in_float64().summary.expected_statistic.value.to(stat.device)
            stat = stat.to(torch.float64)
            stat = stat + (wide - stat.detach())
        init = geometric_combination(self.experts, self.log_weights)[0]
        natural = self.family.natural_from_mean(stat, init=self.family.to_natural(init).to(stat.dtype))
        return self.family.distribution(self.family.from_natural(natural).to(dtype), validate_args=self._validate)

    def __repr__(self) -> str:
        return (f"NumericalHolderPool(family={self.family!r}, alpha={self.alpha!r}, "
                f"num_experts={self.experts.num_experts}, method={self.method!r}, batch_shape={tuple(self.batch_shape)})")


def _other_log_prob(other: Distribution, points: torch.Tensor, dtype: torch.dtype):
    """``(log_q, error)`` in float64 of ``other`` at the engine's ``points`` (:func:`_other_log_prob_values`); a
    numerical pool's log-density is its ``log u`` less its estimated ``log Z``, whose error it carries at every point
    (it was left out of a KL against such a pool)."""
    log_q, error = _other_log_prob_values(other, points, dtype)
    if isinstance(other, NumericalHolderPool):
        error = error + other.summary.log_normalizer.error.to(device=error.device, dtype=torch.float64)
    return log_q, error


def _other_log_prob_values(other: Distribution, points: torch.Tensor, dtype: torch.dtype):
    """``(log_q, error)`` in float64 of ``other`` at the engine's ``points`` (:func:`_log_prob_in_support`): ``-inf``
    (exactly) at points outside ``other.support``, where ``other.log_prob`` is not called (with validation it
    raises there, and without it returns what its formula gives: a finite KL where it is infinite)."""
    return _in_support(other, points, lambda z: _log_prob_in_support(other, z, dtype), (-math.inf, 0.0))


def _in_support(other: Distribution, points: torch.Tensor, evaluate, fills):
    """``evaluate(points)`` (a tuple of tensors over the points, batched as ``other``) at the points inside
    ``other.support`` and ``fills`` (one value per tensor) at the others, where ``evaluate`` sees a point of the
    support instead (:func:`_stand_in`); not called where no point is inside."""
    inside = _support_check(other, points)
    if inside is None or bool(inside.all()):
        return evaluate(points)
    if not bool(inside.any()):
        return tuple(torch.full(inside.shape, fill, dtype=torch.float64, device=points.device) for fill in fills)
    event = points.shape[points.dim() - len(other.event_shape):]
    points = points.expand(inside.shape + event)  # (the check broadcasts the points over other's batch)
    safe = torch.where(inside.reshape(inside.shape + (1,) * len(event)), points, _stand_in(other, points, inside))
    return tuple(torch.where(inside, value, fill) for value, fill in zip(evaluate(safe), fills))


def _stand_in(other: Distribution, points: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """For each element of ``other``'s batch (the trailing axes of ``inside``), a point of its support
    (``batch + event``): the first of ``points`` inside it, or, for an element that no point falls inside, one drawn
    from it (the random state restored)."""
    event = points.shape[inside.dim():]
    tail = inside.shape[inside.dim() - len(other.batch_shape):]
    flat_inside, flat_points = inside.reshape((-1,) + tail), points.reshape((-1,) + tail + event)
    first = flat_inside.to(torch.uint8).argmax(0).reshape((1,) + tail + (1,) * len(event))
    anchor = flat_points.gather(0, first.expand((1,) + tail + event))[0]
    covered = flat_inside.any(0)
    if not bool(covered.all()):
        devices = [points.device] if points.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            drawn = other.sample().to(points.dtype).expand(tail + event)
        anchor = torch.where(covered.reshape(tail + (1,) * len(event)), anchor, drawn)
    return anchor


def _support_check(other: Distribution, points: torch.Tensor):
    """Whether ``other.support`` contains each of ``points`` (the batch of its events), or ``None`` where
    ``other`` cannot say."""
    try:
        return torch.as_tensor(other.support.check(points), dtype=torch.bool, device=points.device)
    except (NotImplementedError, AttributeError, RuntimeError, TypeError):
        return None


def _log_prob_in_support(other: Distribution, points: torch.Tensor, dtype: torch.dtype):
    """``(log_q, error)`` in float64: ``other.log_prob`` at the engine's float64 ``points``, or at them rounded to
    the pool's ``dtype`` where ``other`` takes no float64 points (a dtype mismatch in its own arithmetic), and its
    error.

    Rounded to float32, the nodes of a Beta pool within 2^-25 of 1 landed on 1, where a Beta other singular there
    has infinite density; float64 points avoid that. An ``other`` holding parameters of a lower dtype still computes
    in it, and its own terms can cancel far beyond the log-density's size (``lgamma`` of a float32 Gamma of shape
    1000: 3e-4 off for a log-density of about 3). So such an ``other`` is evaluated through a float64 copy of itself
    (:func:`_float64_twin`): the density of the distribution its parameters define, to float64's rounding. Its error
    is four float64 ulps of the log-density, plus the float32 value's distance from it scaled down to float64 (by
    the ratio of the dtypes' epsilons, four times over): the same cancellation, at float64's resolution. Where no
    such copy computes, ``other`` is used as it is, its rounding counted as four of its ulps of the log-density's
    size (torch's float32 log-densities measured within about three, on average over points; this misses their
    internal cancellation), and if it rounds the points to its dtype (torch's Gamma does), those beyond its
    resolution move: see :func:`_extrapolated_beyond_resolution`."""
    with torch.no_grad():
        log_q, points = _other_log_prob_at(other, points, dtype)
        low = min((_working_dtype(other, log_q.dtype), log_q.dtype), key=lambda d: _bits(d))
        log_q = log_q.to(torch.float64)
        if _bits(low) >= 64:
            return log_q, _float64_error(other, points, log_q)
        twin = _float64_twin(other, points, log_q.shape)
        if twin is not None:
            # where other's own value is infinite (a point it rounded onto a singular end), the twin's stands alone
            both = torch.isfinite(log_q) & torch.isfinite(twin)
            scaled = 4 * torch.finfo(torch.float64).eps / torch.finfo(low).eps
            difference = torch.where(both, (twin - log_q).abs(), 0.0)
            return twin, 4 * torch.finfo(torch.float64).eps * twin.abs().nan_to_num(posinf=0.0) + scaled * difference
        error = 4 * torch.finfo(low).eps * log_q.abs().nan_to_num(posinf=0.0)
        if points.is_floating_point() and points.dim() == log_q.dim():  # scalar events: a distance to an end
            exact = points.to(torch.float64).expand(torch.broadcast_shapes(points.shape, log_q.shape))
            log_q, error = _extrapolated_beyond_resolution(other, exact, log_q.expand(exact.shape),
                                                           error.expand(exact.shape), low)
        return log_q, error


def _other_log_prob_at(other: Distribution, points: torch.Tensor, dtype: torch.dtype):
    """``(other.log_prob(z), z)`` at ``z`` the float64 ``points``, or, where ``other`` takes no float64 points (a
    dtype mismatch in its own arithmetic), them rounded to the pool's ``dtype``."""
    if points.is_floating_point():
        wide = points.to(torch.float64)
        with contextlib.suppress(RuntimeError, TypeError):
            return other.log_prob(wide), wide
    points = points.to(dtype)
    return other.log_prob(points), points


def _float64_error(other: Distribution, points: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """The error of a float64 ``other``'s log-density ``log_q`` at ``points``: four ulps of it, and where ``other`` is
    one of the library's families, its distance from the family's own ``log_prob`` there (torch's Beta and Gamma
    lose what ``lgamma``'s large terms cancel: 3e-7 at a Beta's concentration of 1e8, which a KL of 0.01 stated to
    3e-8 did not count)."""
    error = 4 * torch.finfo(torch.float64).eps * log_q.abs().nan_to_num(posinf=0.0)
    try:
        family = family_of(other)
        reference = family.log_prob(params_of(other, family).to(torch.float64), points.to(torch.float64))
    except (ValueError, RuntimeError, TypeError, NotImplementedError, AttributeError):
        return error
    if not isinstance(reference, torch.Tensor) or reference.shape != log_q.shape:
        return error
    both = torch.isfinite(log_q) & torch.isfinite(reference)
    return error + torch.where(both, (reference - log_q).abs(), 0.0)


def _float64_twin(other: Distribution, points: torch.Tensor, shape: torch.Size):
    """``other``'s log-density at ``points`` (float64, of ``shape``) computed by a copy of ``other`` whose floating
    tensors are float64 (:func:`_rebuilt`), or ``None`` where that copy still holds a lower dtype, raises, or
    returns something else: the parameters are the same numbers, so the copy is the same distribution, without the
    lower dtype's rounding."""
    def widened(tensor):
        return tensor.to(torch.float64) if tensor.is_floating_point() and _bits(tensor.dtype) < 64 else tensor

    try:
        # a pool of this library is built again from float64 experts: a copy attribute by attribute would keep its
        # caches, computed in the lower dtype (its log-normaliser, rounded to float32, charged at float64's eps)
        twin = other._in_float64() if isinstance(other, _Pool) else _rebuilt(other, widened)
        if _bits(_working_dtype(twin, torch.float64)) < 64:
            return None
        log_q = twin.log_prob(points.to(torch.float64))
    except (RuntimeError, TypeError, ValueError, AttributeError, NotImplementedError):
        return None
    if not isinstance(log_q, torch.Tensor) or log_q.dtype != torch.float64 or log_q.shape != shape:
        return None
    return log_q


def _bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits if dtype.is_floating_point else 64


#: how deep :func:`_rebuilt` looks into what ``other`` is built from (distributions, transforms, lists, tuples, dicts)
_BUILT_FROM_DEPTH = 6


def _rebuilt(item, convert, depth: int = 0):
    """``item`` with every tensor it holds replaced by ``convert(tensor)``, looking through the distributions and
    transforms it is built from (copied attribute by attribute), lists, tuples, dicts and dataclasses
    (``Experts``), ``_BUILT_FROM_DEPTH`` levels deep; anything else (other containers, objects of other classes),
    and anything ``convert`` leaves unchanged, is kept as it is. A transform's weak reference to its cached inverse
    is dropped, so that a copy builds its own inverse from its own tensors."""
    if isinstance(item, torch.Tensor):
        return convert(item)
    if depth >= _BUILT_FROM_DEPTH:
        return item
    if isinstance(item, (Distribution, Transform)):
        state = {name: None if isinstance(value, weakref.ref) else _rebuilt(value, convert, depth + 1)
                 for name, value in vars(item).items()}
        # a dropped weak reference alone is no change: nothing is copied where no tensor is converted
        if all(state[name] is value for name, value in vars(item).items() if not isinstance(value, weakref.ref)):
            return item
        duplicate = object.__new__(type(item))
        duplicate.__dict__.update(state)
        return duplicate
    if dataclasses.is_dataclass(item) and not isinstance(item, type):  # Experts: its parameters
        values = {f.name: _rebuilt(getattr(item, f.name), convert, depth + 1) for f in dataclasses.fields(item)}
        if all(values[name] is getattr(item, name) for name in values):
            return item
        return dataclasses.replace(item, **values)
    if isinstance(item, (list, tuple)):
        values = [_rebuilt(value, convert, depth + 1) for value in item]
        if all(new is old for new, old in zip(values, item)):
            return item
        return item._make(values) if hasattr(item, "_make") else type(item)(values)
    if isinstance(item, dict):
        values = {key: _rebuilt(value, convert, depth + 1) for key, value in item.items()}
        if all(values[key] is value for key, value in item.items()):
            return item
        rebuilt = copy.copy(item)  # keeps its type (an OrderedDict, a defaultdict's factory)
        rebuilt.update(values)
        return rebuilt
    return item


def _working_dtype(other, default: torch.dtype) -> torch.dtype:
    """The lowest floating dtype among the tensors ``other`` holds: its parameters, and those of the distributions
    and transforms it is built from (a TransformedDistribution of a float32 Gamma returns float64 log-densities,
    its Jacobian's, but computes the Gamma's in float32)."""
    found = []

    def record(tensor):
        if tensor.is_floating_point():
            found.append(tensor.dtype)
        return tensor

    _rebuilt(other, record)
    return min(found, key=_bits, default=default)


def _extrapolated_beyond_resolution(other, exact, log_q, error, low):
    """``(log_q, error)`` at scalar points ``exact`` (float64) that ``other``, computing in ``low``, cannot resolve:
    below ``low``'s smallest normal float they become subnormal (5 % off at 3e-44 in float32) or 0, where a Gamma of
    shape under 1 is infinite; elsewhere they can land on a singular point (``+inf``). There ``other`` is asked at
    three floats of ``low`` going away from the singular point (0, or where the point landed), and its power law in
    the distance (the singularity of every exponential family) is extrapolated to the point; the error is the change
    of slope between the two pairs, plus their rounding, over that distance. A point where ``other`` is ``-inf`` is
    left so unless ``other.support`` contains it: a Uniform from 1e-39 does not have the pool's mass below it."""
    landed = exact.to(low)
    below_normal = exact.abs() < torch.finfo(low).tiny
    on_singular = (log_q == math.inf) & (landed.to(torch.float64) != exact) & ~below_normal
    moved = (below_normal & ((log_q > -math.inf) | _inside_support(other, exact))) | on_singular
    if not bool(moved.any()):
        return log_q, error
    anchor = torch.where(below_normal, 0.0, landed.to(torch.float64))
    side = torch.where(exact > anchor, 1.0, -1.0)
    spacing = torch.where(below_normal, torch.finfo(low).tiny,
                          (torch.nextafter(landed, landed + side.to(low)) - landed).abs().to(torch.float64))
    # three distances 2^step floats apart that stay within 1/256 of a nonzero singular point
    room = torch.where(anchor == 0, 1.0, anchor.abs() / 256) / spacing
    step = (room.log2() / 2).floor().clamp(1, 30)
    distances = [spacing * 2 ** (k * step) for k in range(3)]
    lq = [other.log_prob(torch.where(moved, anchor + side * d, exact).to(low)).to(torch.float64) for d in distances]
    log_d = [d.log() for d in distances]
    slopes = [(lq[k + 1] - lq[k]) / (log_d[k + 1] - log_d[k]) for k in range(2)]
    depth = (exact - anchor).abs().log() - log_d[0]
    extrapolated = lq[0] + slopes[0] * depth
    rounding = 2 * torch.finfo(low).eps * torch.maximum(lq[0].abs(), lq[1].abs()) / (log_d[1] - log_d[0])
    extrapolation_error = (((slopes[0] - slopes[1]).abs() + rounding) * depth.abs()
                           + 4 * torch.finfo(low).eps * extrapolated.abs())
    usable = moved & torch.isfinite(extrapolated) & torch.isfinite(extrapolation_error)
    return torch.where(usable, extrapolated, log_q), torch.where(usable, extrapolation_error, error)


def _inside_support(other, points: torch.Tensor) -> torch.Tensor:
    """Whether ``other.support`` contains the scalar ``points`` (False where it cannot say)."""
    inside = _support_check(other, points)
    return torch.zeros(points.shape, dtype=torch.bool, device=points.device) if inside is None \
        else inside.expand(points.shape)


def _infinite_where_outside(est: Estimate) -> Estimate:
    """A KL estimate whose infinite values (``other`` has no density on part of the pool's mass) are exact."""
    return Estimate(est.value, torch.where(est.value == math.inf, 0.0, est.error))


def _requires_grad(dist: Distribution) -> bool:
    """Whether a tensor ``dist`` holds requires grad, looking through what it is built from as :func:`_rebuilt` does
    (a Beta's parameters live in its ``_dirichlet``, a LogNormal's in its ``base_dist``)."""
    found = []
    _rebuilt(dist, lambda tensor: found.append(tensor.requires_grad) or tensor)
    return any(found)


def _has_method(dist: Distribution, name: str) -> bool:
    """Whether ``dist`` implements ``name`` (torch's base class raises ``NotImplementedError``)."""
    return getattr(type(dist), name) is not getattr(Distribution, name)


def _expand_experts(experts: Experts, batch_shape: torch.Size) -> Experts:
    params = experts.params
    return Experts(experts.family, params.expand(batch_shape + params.shape[experts.expert_dim:]))


def _expand_estimate(est: PoolEstimate, old: torch.Size, new: torch.Size) -> PoolEstimate:
    """Each tensor ``old + rest`` of the estimate as ``new + rest`` (nodes: ``(P,) + old + rest``)."""
    def grow(t, lead=0):  # the new batch axes go in front of the old ones, after the nodes' leading axis
        t = t.reshape(t.shape[:lead] + (1,) * (len(new) - len(old)) + t.shape[lead:])
        return t.expand(t.shape[:lead] + new + t.shape[lead + len(new):])

    fields = {name: Estimate(grow(e.value), grow(e.error)) for name in
              ("log_normalizer", "mean", "variance", "covariance", "expected_statistic")
              if (e := getattr(est, name)) is not None}
    if est.effective_sample_size is not None:
        fields["effective_sample_size"] = grow(est.effective_sample_size)
    if est.nodes is not None:
        fields["nodes"] = tuple(grow(t, 1) for t in est.nodes)
    if est.gradient_nodes is not None:
        fields["gradient_nodes"] = tuple(grow(t, 1) for t in est.gradient_nodes)
    return replace(est, **fields)


def gaussian_projection(pool, family: str):
    """The Gaussian with the pool's mean and (co)variance (``"gaussian"``) or marginal variances (``"diag_gaussian"``)."""
    if family not in ("gaussian", "diag_gaussian"):
        raise ValueError(f"family must be None, 'gaussian' or 'diag_gaussian', got {family!r}")
    if not pool.family.has_numeric_moments:
        raise ValueError(f"family={family!r} needs numeric moments, but {pool.family.name} experts have none")
    if pool.family.circular:  # (the Gaussian had half the angle's variance)
        raise ValueError(f"family={family!r} is not defined for circular ({pool.family.name}) experts: their variance "
                         "is the circular variance 1 - R, not a variance of the angle; moment_match() gives the "
                         "von Mises with the pool's mean resultant")
    if family == "gaussian" and isinstance(pool.family, DirichletFamily):  # (torch's check failed, or cholesky)
        raise ValueError(f"family='gaussian' has no density for {pool.family.name} experts: their coordinates sum to "
                         "one, so the covariance is singular; use 'diag_gaussian', or moment_match() for a Dirichlet")
    mean, validate = pool.mean, pool._validate
    if not pool.family.multivariate:
        return Normal(mean, pool.variance.sqrt(), validate_args=validate)
    if family == "diag_gaussian":
        return Independent(Normal(mean, pool.variance.sqrt(), validate_args=validate), 1, validate_args=validate)
    return MultivariateNormal(mean, covariance_matrix=pool.covariance_matrix, validate_args=validate)


def holder(experts, alpha=0.5, weights=None, *, method: str = "auto", num_samples: int = 100_000, seed: int = 0,
           max_components: int = DEFAULT_MAX_COMPONENTS, rtol: float = DEFAULT_RTOL, validate_args: bool | None = None):
    r"""The Hölder pool :math:`q \propto (\sum_j \lambda_j q_j^\alpha)^{1/\alpha}` with weights normalised to one.

    With ``method="auto"``: exact (:class:`HolderPool`) for ``alpha = 0`` and ``alpha = 1/n`` within
    ``max_components`` mixture components; otherwise, including ``+-inf``, a :class:`NumericalHolderPool`.
    Naming a ``method`` (see :mod:`opinionpool.numerical`) forces the numerical engine, for any alpha;
    ``rtol`` is its 1-D quadrature's relative tolerance.

    A weight of exactly zero removes its expert: its gradient is zero, not the one-sided derivative at the edge of
    the simplex (which can be nonzero). To learn weights that may leave zero, parametrise them, e.g. by a softmax
    of free logits as :func:`opinionpool.fit_weights` does.
    """
    order = exact_order(check_alpha(alpha))
    check_positive_int("max_components", max_components)
    check_rtol(rtol)
    if method == "auto" and order is not None:
        experts = as_experts(experts, validate_args=validate_args)
        if within_max_components(order, experts.num_experts, max_components):
            return HolderPool(experts, alpha=alpha, weights=weights, max_components=max_components,
                              validate_args=validate_args)
        count = _format_count(log_num_components(order, experts.num_experts),
                              lambda: num_components(order, experts.num_experts))
        warnings.warn(f"alpha={alpha!r} = 1/{order} has an exact pool of {count} mixture components, more than "
                      f"max_components={max_components}; using the numerical engine instead (raise max_components "
                      "for the exact pool)", stacklevel=2)
    return NumericalHolderPool(experts, alpha=alpha, weights=weights, method=method, num_samples=num_samples,
                               seed=seed, max_components=max_components, rtol=rtol, validate_args=validate_args)


def moe(experts, weights=None, **kwargs) -> MixtureSameFamily:
    """Mixture of experts (the linear pool, ``alpha = 1``)."""
    return HolderPool(experts, alpha=1, weights=weights, **kwargs).as_mixture()


def hellinger(experts, weights=None, **kwargs):
    """Hellinger aggregation: the ``alpha = 1/2`` Hölder pool moment-matched onto the experts' family."""
    return HolderPool(experts, alpha=0.5, weights=weights, **kwargs).moment_match()


def poe(experts, weights=None, validate_args: bool | None = None):
    r"""Product of experts :math:`\propto \prod_j q_j^{w_j}` with *unnormalised* weights (default 1 each).

    This is the MVAE product (precisions add up for Gaussians). With weights normalised to one it
    equals the log-linear pool ``holder(experts, alpha=0)``. Otherwise the product carries the base measure
    ``h^(sum of weights)``, which stays in the family only where ``h`` is ``exp(<c, T(z)>)`` (constant, or Gamma's
    ``1 / z``); products of Poisson or Binomial(n > 1) experts then raise a ``ValueError``.
    """
    validate = validation_enabled(validate_args)
    experts = as_experts(experts, validate_args=validate)
    params = experts.params
    m = experts.num_experts
    if weights is None:
        w = torch.ones(m, dtype=params.dtype, device=params.device)
    else:
        w = real_tensor("weights", weights, dtype=params.dtype, device=params.device)
        if validate:
            check_weights("weights", w, m)
    combined, _ = geometric_combination(experts, log_of_weights(w))
    family = experts.family
    # the product's base measure is h^(sum of weights), one h more per unit of excess, which the family's natural
    # parameter absorbs where h is exp(<c, T(z)>) (Gamma's 1 / z); elsewhere the product leaves the family
    excess = w.sum(-1, keepdim=True) - 1
    rounding = excess.abs() <= m * torch.finfo(w.dtype).eps  # the rounding of a sum of m weights summing to one
    if not bool(rounding.all()) or w.requires_grad:
        natural = family.to_natural(combined)
        shift = family.base_measure_natural(natural)
        if shift is None and not bool(rounding.all()):
            raise ValueError(f"experts: the product of these {family.name} experts with weights {describe(w)} is not a "
                             f"{family.name} distribution (their base measure does not cancel unless the weights sum "
                             "to one); use weights summing to one, e.g. holder(experts, alpha=0)")
        if shift is not None and bool((shift != 0).any()):
            # an excess within rounding shifts nothing (a concentration of 1e-17 would turn negative) but keeps its
            # gradient, one per weight
            excess = torch.where(rounding, excess - excess.detach(), excess)
            combined = family.from_natural(natural + excess * shift)
    if validate and not bool(family.natural_domain(family.to_natural(combined)).all()):
        raise ValueError(f"experts: the product of these {family.name} experts with weights {describe(w)} is not "
                         "normalisable (its natural parameter leaves the parameter space); use weights summing to one, "
                         "e.g. holder(experts, alpha=0)")
    return family.distribution(combined, validate_args=validate)
