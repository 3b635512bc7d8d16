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

All mixture weights are handled as log-weights (``log_mixture_weights``) so that Chernoff
coefficients far below the float range (routine at latent size 512) never underflow to zero.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from functools import lru_cache

import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, MultivariateNormal, Normal

from ._validation import check_alpha, check_weights, validation_enabled
from .experts import Experts, as_experts
from .families import ExponentialFamily

DEFAULT_MAX_COMPONENTS = 4096


def exact_order(alpha: float) -> int | None:
    """``0`` for the log-linear pool, ``n`` for ``alpha = 1/n``, ``None`` when there is no closed form."""
    if alpha == 0:
        return 0
    if not (0 < alpha <= 1) or math.isinf(alpha):
        return None
    n = round(1 / alpha)
    return n if abs(1 / alpha - n) <= 1e-9 * n else None


def num_components(order: int, num_experts: int) -> int:
    return 1 if order == 0 else math.comb(order + num_experts - 1, num_experts - 1)


@lru_cache(maxsize=128)
def _compositions(order: int, num_experts: int):
    """All ``k`` with ``sum k = order`` over ``num_experts`` experts, as (expert index, count) pairs
    padded to ``min(order, num_experts)`` slots (padding has count 0)."""
    slots = min(order, num_experts)
    indices, counts, log_multinomial = [], [], []
    for combo in itertools.combinations_with_replacement(range(num_experts), order):
        items = sorted(Counter(combo).items())
        log_multinomial.append(math.lgamma(order + 1) - sum(math.lgamma(c + 1) for _, c in items))
        items += [(0, 0)] * (slots - len(items))
        indices.append([i for i, _ in items])
        counts.append([c for _, c in items])
    return indices, counts, log_multinomial


def compositions(order: int, num_experts: int, device=None, dtype=None):
    """``(index, count)`` tensors of shape ``(C, S)`` and the log multinomial coefficients ``(C,)``."""
    indices, counts, log_multinomial = _compositions(order, num_experts)
    return (torch.tensor(indices, dtype=torch.long, device=device),
            torch.tensor(counts, dtype=torch.long, device=device),
            torch.tensor(log_multinomial, dtype=dtype, device=device))


def normalized_log_weights(weights, num_experts: int, *, dtype, device, mask=None,
                           validate: bool = True) -> torch.Tensor:
    """Log of the pooling weights normalised to sum to one over present experts (``-inf`` for absent ones).

    Zero weights become ``-inf`` without ever evaluating ``log(0)``, so gradients stay finite.
    """
    if weights is None:
        w = torch.ones(num_experts, dtype=dtype, device=device)
    else:
        w = torch.as_tensor(weights, dtype=dtype, device=device)
        if validate:
            check_weights("weights", w, num_experts)
    log_w = log_of_weights(w, mask)
    return log_w - torch.logsumexp(log_w, dim=-1, keepdim=True)


def log_of_weights(weights: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """``log(weights)`` with ``-inf`` for zero weights and absent experts, never evaluating ``log(0)``
    (whose gradient would be infinite)."""
    keep = weights > 0 if present is None else (weights > 0) & present
    return torch.where(keep, torch.log(torch.where(keep, weights, torch.ones_like(weights))),
                       torch.full_like(weights, -math.inf))


def geometric_combination(experts: Experts, log_weights: torch.Tensor):
    """The family member proportional to ``prod_j q_j^(w_j)`` and ``log int prod_j q_j^(w_j)`` (meaningful
    when the weights sum to one), for log-weights ``(..., M)`` broadcasting against the experts' batch."""
    batch = torch.broadcast_shapes(experts.batch_shape, log_weights.shape[:-1])
    params = experts.params.expand(batch + experts.params.shape[experts.expert_dim:])
    log_weights = log_weights.expand(batch + (experts.num_experts,))
    combined, log_c = experts.family.combine(params.unsqueeze(len(batch)), log_weights.unsqueeze(-2))
    return combined.squeeze(len(batch)), log_c.squeeze(-1)


def holder_components(family: ExponentialFamily, params: torch.Tensor, log_weights: torch.Tensor, order: int):
    """Unnormalised log mixture weights ``(..., C)`` and component parameters ``(..., C) + param_shape``
    of the exact Hölder pool of order ``order`` (``alpha = 1/order``; ``0`` is the log-linear pool)."""
    n_param = len(family.param_shape)
    expert_dim = params.dim() - n_param - 1
    num_experts = params.shape[expert_dim]
    batch = torch.broadcast_shapes(params.shape[:expert_dim], log_weights.shape[:-1])
    params = params.expand(batch + params.shape[expert_dim:])
    log_weights = log_weights.expand(batch + (num_experts,))
    if order == 0:
        combined, log_c = geometric_combination(Experts(family, params), log_weights)
        return log_c.unsqueeze(-1), combined.unsqueeze(len(batch))
    index, counts, log_multinomial = compositions(order, num_experts, device=params.device, dtype=params.dtype)
    # Compositions on one expert are that expert (Chernoff coefficient 1); only the others are combined.
    single = counts[:, 0] == order
    order_rows = torch.cat((single.nonzero().squeeze(-1), (~single).nonzero().squeeze(-1)))
    index, counts, log_multinomial = index[order_rows], counts[order_rows], log_multinomial[order_rows]
    num_single = int(single.sum())
    singles = params.index_select(len(batch), index[:num_single, 0])
    components, log_c = singles, torch.zeros(batch + (num_single,), dtype=params.dtype, device=params.device)
    if num_single < index.shape[0]:
        multi_index, multi_counts = index[num_single:], counts[num_single:]
        gathered = params.index_select(len(batch), multi_index.flatten()).unflatten(len(batch), tuple(multi_index.shape))
        log_w = torch.where(multi_counts > 0, torch.log(multi_counts.to(params.dtype) / order), -math.inf)
        combined, combined_log_c = family.combine(gathered, log_w.expand(batch + tuple(multi_index.shape)))
        components = torch.cat((components, combined), dim=len(batch))
        log_c = torch.cat((log_c, combined_log_c), dim=-1)
    picked = log_weights[..., index]
    zero = torch.zeros((), dtype=params.dtype, device=params.device)
    log_lambda_power = torch.where(counts > 0, counts * picked, zero).sum(-1)
    return log_multinomial + log_lambda_power + log_c, components


class HolderPool:
    r"""The Hölder pool of a set of experts (see the module docstring for the exact cases).

    Attributes are tensors with shape ``batch_shape`` (``log_normalizer``) or
    ``batch_shape + event_shape`` (``mean``, ``variance``); the finite-mixture form is available as
    ``log_mixture_weights`` / ``component_params`` and as a ``MixtureSameFamily`` via ``as_mixture()``.
    """

    def __init__(self, experts, alpha=0.5, weights=None, *, max_components: int = DEFAULT_MAX_COMPONENTS,
                 validate_args: bool | None = None):
        alpha = check_alpha(alpha)
        validate = validation_enabled(validate_args)
        order = exact_order(alpha)
        if order is None:
            raise NotImplementedError(
                f"alpha={alpha!r} has no closed form: exact Hölder pools exist for alpha = 0 and alpha = 1/n "
                "(n = 1, 2, ...); the numerical engine for other alpha is not implemented yet")
        experts = as_experts(experts, validate_args=validate)
        count = num_components(order, experts.num_experts)
        if count > max_components:
            raise ValueError(f"alpha={alpha!r} with {experts.num_experts} experts gives {count} mixture components, "
                             f"more than max_components={max_components}; raise max_components to allow it")
        self.experts: Experts = experts
        self.family = experts.family
        self.alpha = alpha
        self.order = order
        params = experts.params
        self.log_weights = normalized_log_weights(weights, experts.num_experts, dtype=params.dtype,
                                                  device=params.device, validate=validate)
        log_mix, self.component_params = holder_components(self.family, params, self.log_weights, order)
        self.log_normalizer = torch.logsumexp(log_mix, dim=-1)
        self.log_mixture_weights = log_mix - self.log_normalizer.unsqueeze(-1)
        if validate and not bool(torch.isfinite(self.log_normalizer).all()):
            raise ValueError("the pool's log-normaliser is not finite; check the experts for extreme parameters")

    # ------------------------------------------------------------------ shapes
    @property
    def batch_shape(self) -> torch.Size:
        return self.log_normalizer.shape

    @property
    def event_shape(self) -> torch.Size:
        return self.family.event_shape

    @property
    def num_components(self) -> int:
        return self.log_mixture_weights.shape[-1]

    @property
    def mixture_weights(self) -> torch.Tensor:
        return self.log_mixture_weights.exp()

    # ---------------------------------------------------------------- moments
    @property
    def mean(self) -> torch.Tensor:
        return self.family.mixture_mean(self.log_mixture_weights, self.component_params)

    @property
    def variance(self) -> torch.Tensor:
        return self.family.mixture_variance(self.log_mixture_weights, self.component_params)

    @property
    def stddev(self) -> torch.Tensor:
        return self.variance.sqrt()

    @property
    def covariance_matrix(self) -> torch.Tensor:
        if not self.family.multivariate:
            raise ValueError(f"covariance_matrix needs multivariate experts; {self.family.name} experts are scalar "
                             "(use variance)")
        return self.family.mixture_covariance(self.log_mixture_weights, self.component_params)

    # -------------------------------------------------------------- densities
    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        r""":math:`\frac1\alpha\log\sum_j\lambda_j q_j(z)^\alpha - \log Z`, from the experts' densities
        directly (independent of the mixture expansion)."""
        event_dims = len(self.event_shape)
        expert_log_prob = self.family.log_prob(self.experts.params, value.unsqueeze(value.dim() - event_dims))
        if self.order == 0:
            w = self.log_weights.exp()
            pooled = torch.where(w > 0, w * expert_log_prob, torch.zeros_like(expert_log_prob)).sum(-1)
        else:
            pooled = torch.logsumexp(self.log_weights + self.alpha * expert_log_prob, dim=-1) / self.alpha
        return pooled - self.log_normalizer

    def as_mixture(self) -> MixtureSameFamily:
        """The pool as a ``torch.distributions.MixtureSameFamily`` (one component for ``alpha=0``)."""
        components = self.family.distribution(self.component_params)
        return MixtureSameFamily(Categorical(logits=self.log_mixture_weights), components, validate_args=False)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        if self.order == 0:
            return self.family.sample(self.component_params.squeeze(len(self.batch_shape)), sample_shape)
        return self.as_mixture().sample(sample_shape)

    def moment_match(self, family: str | None = None):
        """Project the pool onto one distribution by matching moments (the KL M-projection).

        ``family=None``: onto the experts' own family (match ``E[T(z)]``); ``"gaussian"``: a Gaussian
        with the pool's mean and (co)variance; ``"diag_gaussian"``: a Gaussian with its marginal means
        and variances. The result is a ``torch.distributions`` object.
        """
        log_pi, components = self.log_mixture_weights, self.component_params
        if family is None:
            return self.family.distribution(self.family.moment_match(log_pi, components))
        if family not in ("gaussian", "diag_gaussian"):
            raise ValueError(f"family must be None, 'gaussian' or 'diag_gaussian', got {family!r}")
        if not self.family.has_numeric_moments:
            raise ValueError(f"{self.family.name} experts have no numeric moments to match with a Gaussian")
        mean = self.mean
        if not self.family.multivariate:
            return Normal(mean, self.variance.sqrt(), validate_args=False)
        if family == "diag_gaussian":
            return Independent(Normal(mean, self.variance.sqrt(), validate_args=False), 1)
        return MultivariateNormal(mean, covariance_matrix=self.covariance_matrix, validate_args=False)

    def __repr__(self) -> str:
        return (f"HolderPool(family={self.family!r}, alpha={self.alpha!r}, num_experts={self.experts.num_experts}, "
                f"num_components={self.num_components}, batch_shape={tuple(self.batch_shape)})")


def holder(experts, alpha=0.5, weights=None, **kwargs) -> HolderPool:
    r"""The Hölder pool :math:`q \propto (\sum_j \lambda_j q_j^\alpha)^{1/\alpha}` with weights normalised to one."""
    return HolderPool(experts, alpha=alpha, weights=weights, **kwargs)


def moe(experts, weights=None, **kwargs) -> MixtureSameFamily:
    """Mixture of experts (the linear pool, ``alpha = 1``)."""
    return HolderPool(experts, alpha=1, weights=weights, **kwargs).as_mixture()


def hellinger(experts, weights=None, **kwargs):
    """Hellinger aggregation: the ``alpha = 1/2`` Hölder pool moment-matched onto the experts' family."""
    return HolderPool(experts, alpha=0.5, weights=weights, **kwargs).moment_match()


def poe(experts, weights=None, validate_args: bool | None = None):
    r"""Product of experts :math:`\propto \prod_j q_j^{w_j}` with *unnormalised* weights (default 1 each).

    This is the MVAE product (precisions add up for Gaussians). With weights normalised to one it
    equals the log-linear pool ``holder(experts, alpha=0)``.
    """
    validate = validation_enabled(validate_args)
    experts = as_experts(experts, validate_args=validate)
    params = experts.params
    m = experts.num_experts
    if weights is None:
        w = torch.ones(m, dtype=params.dtype, device=params.device)
    else:
        w = torch.as_tensor(weights, dtype=params.dtype, device=params.device)
        if validate:
            check_weights("weights", w, m)
    combined, _ = geometric_combination(experts, log_of_weights(w))
    family = experts.family
    if validate and not bool(family.natural_domain(family.to_natural(combined)).all()):
        raise ValueError(f"the product of these {family.name} experts is not normalisable (its natural parameter "
                         "leaves the parameter space); use weights summing to one, e.g. holder(experts, alpha=0)")
    return family.distribution(combined)
