"""Functional Gaussian pooling on ``(mu, logvar)`` tensors: the hot path of multimodal VAEs.

Every function takes unimodal posteriors as tensors ``mu`` and ``logvar`` of equal shape, the experts along ``dim``
and the latent dimension last; optional pooling ``weights`` (along the expert axis, broadcastable, may require grad)
and a boolean ``mask`` of present experts with the shape of ``mu`` minus its last dimension (``False`` = a missing
modality for that sample). ``prior_expert=True`` appends a standard-normal expert that is always present (for
``moe(..., family="laplace")`` the standard Laplace, ``Laplace(0, 1)``), so samples with no observed modality are
allowed. The math is the object API's (``opinionpool.holder``) for diagonal Gaussians, shared
code, without the wrapping. ``moe`` also mixes diagonal Laplace experts (``LaplaceMixture``), the posteriors of the
MMVAE and MMVAE+ code.
"""

from __future__ import annotations

import itertools
import math
import numbers
import warnings
from typing import NamedTuple

import torch
from torch.distributions import Categorical, Independent, Laplace, MixtureSameFamily, Normal

from ._autograd import first_order_only
from ._chunks import by_rows
from ._hellinger import (
    hellinger_moments,
    kept_partners,
    pair_components,
    pairs_of,
    standing_in,
    values_readable,
    weights_underflow,
)
from ._validation import (
    all_finite,
    check_alpha,
    check_finite,
    check_positive_int,
    check_sample_shape,
    check_weights,
    check_weights_length,
    describe,
    real_tensor,
    validation_enabled,
)
from .constants import LOG_2PI, LOG_HALF
from .families.gaussian import (
    DiagonalNormalFamily,
    _log_variance_ratio,
    gaussian_barycenter,
    gaussian_combine,
    gaussian_mixture_moments,
    normal_kl,
    normal_log_density,
)
from .pool import (
    DEFAULT_MAX_COMPONENTS,
    check_batches_broadcast,
    check_max_components,
    component_counts,
    exact_order,
    holder_components,
    log_of_weights,
    normalized_log_weights,
)

__all__ = [
    "GaussianMixture", "LaplaceMixture", "MIXTURE_FAMILIES", "holder", "hellinger", "holder_mixture",
    "holder_mixture_members", "moe", "poe",
    "wasserstein_barycenter",
    "log_bhattacharyya", "hellinger_pairwise_mass", "subset_mixture", "all_subsets", "exact_order",
    "DEFAULT_MAX_COMPONENTS",
    "DEFAULT_MAX_SUBSETS", "OFFSET_ROUNDING", "diag_gaussian_log_prob", "diag_gaussian_kl",
    "diag_laplace_log_prob", "standard_laplace",
]

#: the default cap on the number of subsets of ``subset_mixture`` (``2^M - 1`` for all subsets of ``M`` experts)
DEFAULT_MAX_SUBSETS = 2**16
#: the component families of ``moe``: ``"normal"`` (``GaussianMixture``) and ``"laplace"`` (``LaplaceMixture``)
MIXTURE_FAMILIES = ("normal", "laplace")
# the prior expert's log-variance per family: N(0, 1), and Laplace(0, 1) of variance 2
_PRIOR_LOGVAR = {"normal": 0.0, "laplace": math.log(2.0)}
SQRT_HALF = math.sqrt(0.5)


def diag_gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``log N(z; mu, diag(exp(logvar)))`` summed over the latent (last) axis; the arguments broadcast. Zeros for
    ``mu`` and ``logvar`` give the standard-normal prior."""
    return normal_log_density(z, mu, logvar).sum(-1)


def diag_laplace_log_prob(z: torch.Tensor, loc: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``log Laplace(z; loc, b)`` summed over the latent (last) axis, the scale given by the log-*variance*
    ``logvar = log(2 b^2)``: ``-(log 2 + logvar) / 2 - sqrt(2) |z - loc| exp(-logvar / 2)``, with no ``exp`` of
    ``logvar`` that could overflow before the product. The arguments broadcast."""
    return (-0.5 * (math.log(2.0) + logvar) - math.sqrt(2.0) * (z - loc).abs() * torch.exp(-0.5 * logvar)).sum(-1)


def standard_laplace(shape, *, dtype=None, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draws of ``Laplace(0, 1)`` (variance 2) of ``shape`` by inversion, as ``torch.distributions.Laplace``
    draws them (one uniform on ``[eps - 1, 1)`` per draw, the same stream for the same seed), with a
    ``generator``, which that class does not take."""
    dtype = torch.get_default_dtype() if dtype is None else dtype
    uniform = torch.empty(shape, dtype=dtype, device=device).uniform_(torch.finfo(dtype).eps - 1, 1,
                                                                        generator=generator)
    return -uniform.sign() * torch.log1p(-uniform.abs())


def _laplace_log_chernoff(loc_p, logvar_p, loc_q, logvar_q, a: float):
    """Elementwise ``log int p^a q^(1 - a)`` of Laplace experts (log-*variances* ``logvar = log(2 b^2)``) for an
    order ``0 < a < 1``. With the rates ``r_p = a / b_p``, ``r_q = (1 - a) / b_q`` and ``Delta = |loc_p - loc_q|``
    the integral of ``exp(-r_p |x - loc_p| - r_q |x - loc_q|)`` is ``(e^(-r_p Delta) + e^(-r_q Delta)) / (r_p +
    r_q) + (e^(-r_p Delta) - e^(-r_q Delta)) / (r_q - r_p)`` (the tails and the stretch between the locations).
    With ``R`` the larger rate, ``g = |log r_p - log r_q|``, ``s = R Delta`` and ``t = s (1 - e^-g)`` it is
    ``e^(-s e^-g) / R * ((1 + e^-t) / (1 + e^-g) + s h(t))``, ``h(t) = (1 - e^-t) / t``: positive terms only, in
    log space, so no cancellation where the rates coincide and no overflow of a rate or of ``s``. It is computed as
    ``log C(0) + log(I(Delta) / I(0))``: at ``Delta = 0``, ``log C = a u - log1p(a expm1(u))`` with ``u = log(b_q /
    b_p)`` (the gap of Jensen's inequality, exactly 0 for equal scales), and the ratio's terms of order ``s``
    cancel to its ``O(s^2)`` with a relative error of about ``eps / s``, so nearly equal experts keep the digits of
    their small log C, and log C <= 0 (Hölder's inequality) holds."""
    d = logvar_p - logvar_q
    g = (math.log(a) - math.log1p(-a) - 0.5 * d).abs()  # |log r_p - log r_q|
    # log R as (log r_p + log r_q + g) / 2: where the rates tie, its gradient is split between them as the
    # symmetric integral's is
    log_rate = 0.5 * (math.log(a * (1 - a)) + math.log(2.0) - 0.5 * (logvar_p + logvar_q) + g)
    distance = (loc_p - loc_q).abs()
    # an infinite distance (finite locations whose difference overflows) has log C = -inf (set at the end)
    beyond = torch.isinf(distance)
    distance = torch.where(beyond, 1.0, distance)
    # safe stand-ins where Delta or g is 0, so that no branch torch.where discards has an infinite gradient
    log_s = log_rate + torch.log(torch.where(distance > 0, distance, 1.0))
    # s below the smallest normal number counts as Delta = 0 (log C moves by O(s^2)): there the gradients of the
    # stretch between the locations and of the decay, each about s and cancelling to O(s^2), underflow unevenly
    # (the stretch's rounds to 0, the decay's keeps it), a gradient -R sign(Delta), not ~0
    apart = (distance > 0) & (log_s > math.log(torch.finfo(log_s.dtype).tiny))
    t_positive = apart & (g > 0)
    log_t = torch.where(t_positive, log_s + torch.log(-torch.expm1(-torch.where(g > 0, g, 1.0))), 0.0)
    # t past e^64 changes nothing below (e^-t); capped, it cannot overflow to inf (an inf * 0 gradient)
    t = torch.where(t_positive, torch.exp(log_t.clamp(max=64.0)), 0.0)
    # log h(t) = log(1 - e^-t) - log t: its series below t = 0.001 (error below t^4 / 2880), where the two logs
    # cancel to about -t / 2
    small = t < 0.001
    log_h = torch.where(small, t * (-0.5 + t / 24), torch.log(-torch.expm1(-torch.where(small, 1.0, t))) - log_t)
    # I(Delta) / I(0) with I(0) = 2 / (R (1 + e^-g)): (1 + e^-t + (1 + e^-g) s h(t)) e^(-s e^-g) / 2; for s < 1 by
    # log1p of its small part, else in log space (s h(t) may overflow)
    log_rate_sum = torch.log1p(torch.exp(-g))  # log((r_p + r_q) / R)
    between = torch.where(apart, log_s + log_h + log_rate_sum, -math.inf)
    decay = torch.where(apart, torch.exp(log_s - g), 0.0)  # the smaller rate times Delta
    near = apart & (log_s < 0)
    small_part = 0.5 * (torch.expm1(-t) + torch.exp(torch.where(near, between, 0.0)))
    log_ratio = torch.where(near, torch.log1p(small_part),
                            torch.logaddexp(torch.log1p(torch.exp(-t)), between) - math.log(2.0)) - decay
    u = -0.5 * d  # log(b_q / b_p)
    return torch.where(beyond, -math.inf, (a * u - _log_variance_ratio(u, a) + log_ratio).clamp(max=0.0))


def diag_gaussian_kl(mu_p: torch.Tensor, logvar_p: torch.Tensor, mu_q: torch.Tensor,
                     logvar_q: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu_p, diag(exp(logvar_p))) || N(mu_q, diag(exp(logvar_q))))`` summed over the latent (last) axis; the
    arguments broadcast."""
    return normal_kl(mu_p, logvar_p, mu_q, logvar_q).sum(-1)


class _MixtureParameters(NamedTuple):
    log_weights: torch.Tensor
    loc: torch.Tensor
    logvar: torch.Tensor


class _DiagonalMixture(_MixtureParameters):
    """What mixtures of diagonal location-scale components share: ``log_weights (..., K)`` (normalised: log-sum-exp
    0 over the components, as every function here returns them; from logits, ``torch.log_softmax(logits, -1)``:
    the density, moments and bounds take them as given, while ``sample`` and ``to_distribution`` normalise), each
    component's ``loc`` and log-variance ``logvar`` ``(..., K, D)``, the density by log-sum-exp over components, the
    moment-matched Gaussian (which needs only the components' means and variances) and reparameterised draws
    (``loc + exp(logvar / 2) * noise`` with the family's unit-variance noise). Components with weight zero
    (``log_weights = -inf``, e.g. masked experts) are never sampled and add nothing to the density. A family
    defines ``_component_log_prob(z)`` (every component's log-density at ``z`` ``(..., 1, D)``) and
    ``_unit_noise(shape, dtype, device, generator)``."""

    __slots__ = ()

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log-density at ``z`` ``(sample..., ..., D)`` -> ``(sample..., ...)`` (log-sum-exp over components)."""
        return torch.logsumexp(self.log_weights + self.component_log_probs(z), -1)

    def component_log_probs(self, z: torch.Tensor) -> torch.Tensor:
        """Every component's log-density at ``z`` ``(sample..., ..., D)`` -> ``(sample..., ..., K)`` (without the
        log-weights)."""
        return self._component_log_prob(z.unsqueeze(-2))

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, logvar)`` ``(..., D)`` of the moment-matched diagonal Gaussian: the mixture's mean and its
        variance by the law of total variance (within plus between components), computed in log-space."""
        return gaussian_mixture_moments(self.log_weights, self.loc, self.logvar, 1)

    @property
    def mean(self) -> torch.Tensor:
        """The mixture's mean ``(..., D)``."""
        return self.moments()[0]

    @property
    def variance(self) -> torch.Tensor:
        """The mixture's marginal variances ``(..., D)`` (law of total variance)."""
        return self.moments()[1].exp()

    def sample(self, sample_shape=(), generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised within the chosen component: ``sample_shape + batch + (D,)``."""
        sample_shape = check_sample_shape(sample_shape)
        batch, (k, d) = self.log_weights.shape[:-1], self.loc.shape[-2:]
        count = sample_shape.numel()
        probs = torch.softmax(self.log_weights.detach(), -1).reshape(-1, k)
        if count:  # (multinomial refuses no draws: sample((0,)) failed in the reshape below)
            index = torch.multinomial(probs, count, replacement=True, generator=generator)  # (prod(batch), S)
        else:
            index = torch.zeros(probs.shape[0], 0, dtype=torch.long, device=probs.device)
        index = index.T.reshape(sample_shape + batch)
        gather = index.unsqueeze(-1).unsqueeze(-1).expand(sample_shape + batch + (1, d))
        loc = self.loc.expand(sample_shape + self.loc.shape).gather(-2, gather).squeeze(-2)
        logvar = self.logvar.expand(sample_shape + self.logvar.shape).gather(-2, gather).squeeze(-2)
        noise = self._unit_noise(loc.shape, loc.dtype, loc.device, generator)
        return loc + torch.exp(0.5 * logvar) * noise


class GaussianMixture(_DiagonalMixture):
    """A diagonal-Gaussian mixture: ``log_weights (..., K)``, ``loc`` and ``logvar`` ``(..., K, D)``.

    Components with weight zero (``log_weights = -inf``, e.g. masked experts) are never sampled and add
    nothing to the density."""

    __slots__ = ()

    def _component_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return diag_gaussian_log_prob(z, self.loc, self.logvar)

    @staticmethod
    def _unit_noise(shape, dtype, device, generator) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, device=device, generator=generator)

    def entropy_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``(lower, upper)`` bounds ``(...)`` of the mixture's differential entropy (no closed form exists).

        Lower: the larger of :math:`\sum_k w_k H_k` (concavity) and :math:`-\sum_i w_i \log\sum_j w_j
        \int p_i p_j` (Jensen; Huber et al. 2008, "On entropy approximation for Gaussian mixture random vectors").
        Upper: the smaller of :math:`\sum_k w_k H_k + H(w)` and the entropy of the moment-matched diagonal
        Gaussian (the maximum entropy for the mixture's marginal variances)."""
        present = self.log_weights > -math.inf
        weights = torch.where(present, self.log_weights.exp(), torch.zeros_like(self.log_weights))
        component_entropy = 0.5 * (LOG_2PI + 1 + self.logvar).sum(-1)
        within = (weights * torch.where(present, component_entropy, torch.zeros_like(component_entropy))).sum(-1)
        label_entropy = -(weights * torch.where(present, self.log_weights, torch.zeros_like(self.log_weights))).sum(-1)
        matched = 0.5 * (LOG_2PI + 1 + self.moments()[1]).sum(-1)
        # log int p_i p_j = log N(mu_i; mu_j, var_i + var_j)
        pair_logvar = torch.logaddexp(self.logvar.unsqueeze(-2), self.logvar.unsqueeze(-3))
        log_overlap = diag_gaussian_log_prob(self.loc.unsqueeze(-2), self.loc.unsqueeze(-3), pair_logvar)
        inner = torch.logsumexp(self.log_weights.unsqueeze(-2) + log_overlap, -1)
        jensen = -(weights * torch.where(present, inner, torch.zeros_like(inner))).sum(-1)
        return torch.maximum(within, jensen), torch.minimum(within + label_entropy, matched)

    def kl_upper_bound(self, loc: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        r"""An upper bound ``(...)`` of :math:`KL(N(loc, diag(exp(logvar))) \| p)` for this mixture ``p`` (no closed
        form exists): :math:`\sum_k w_k KL(N \| p_k)`, by convexity of the KL in its second argument. Unlike the
        KL itself (at most :math:`-\log w_k` when ``N`` is component ``k``), each term grows with the distance to
        its component. ``loc`` and ``logvar`` ``(..., D)`` broadcast against the mixture's batch; components of
        weight zero add nothing."""
        present = self.log_weights > -math.inf
        # a weight-zero component's parameters may be anything, and the query anything relative to them: a KL of
        # inf or NaN masked afterwards would still give NaN gradients, so N(0, I) stands in on both sides there
        keep = present.unsqueeze(-1)
        zero = torch.zeros((), dtype=self.loc.dtype, device=self.loc.device)
        loc, logvar = loc.unsqueeze(-2), logvar.unsqueeze(-2)
        terms = diag_gaussian_kl(torch.where(keep, loc, zero), torch.where(keep, logvar, zero),
                                 torch.where(keep, self.loc, zero), torch.where(keep, self.logvar, zero))
        weights = torch.where(present, self.log_weights.exp(), torch.zeros_like(self.log_weights))
        return (weights * terms).sum(-1)

    def to_distribution(self) -> MixtureSameFamily:
        """The mixture as a ``torch.distributions.MixtureSameFamily`` of diagonal Gaussians (event ``(D,)``)."""
        components = Independent(Normal(self.loc, torch.exp(0.5 * self.logvar)), 1)
        return MixtureSameFamily(Categorical(logits=self.log_weights), components)


class LaplaceMixture(_DiagonalMixture):
    """A mixture of diagonal Laplace distributions, parameterised as ``GaussianMixture`` is: ``log_weights
    (..., K)``, each component's location ``loc`` and log-*variance* ``logvar`` ``(..., K, D)`` (a Laplace of
    scale ``b`` has variance ``2 b^2``), so that ``moments`` is the same law of total variance. The MMVAE and
    MMVAE+ code's posteriors are such mixtures (``moe(..., family="laplace")``)."""

    __slots__ = ()

    def _component_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return diag_laplace_log_prob(z, self.loc, self.logvar)

    @staticmethod
    def _unit_noise(shape, dtype, device, generator) -> torch.Tensor:
        return standard_laplace(shape, dtype=dtype, device=device, generator=generator) * SQRT_HALF

    def to_distribution(self) -> MixtureSameFamily:
        """The mixture as a ``torch.distributions.MixtureSameFamily`` of diagonal Laplaces (event ``(D,)``)."""
        components = Independent(Laplace(self.loc, torch.exp(0.5 * self.logvar) * SQRT_HALF), 1)
        return MixtureSameFamily(Categorical(logits=self.log_weights), components)


def _layout(mu, logvar, dim):
    """Shape checks only (no data is read): the expert axis ``dim`` as a non-negative index, and the number of experts."""
    if mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar must have the same shape, got mu {tuple(mu.shape)} and "
                         f"logvar {tuple(logvar.shape)}")
    if mu.dim() < 2:
        raise ValueError(f"mu must have an expert axis and a latent axis, got shape {tuple(mu.shape)}")
    if not (mu.is_floating_point() and logvar.is_floating_point()):
        raise ValueError(f"mu and logvar must be floating-point tensors, got mu {mu.dtype} and logvar {logvar.dtype}")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise ValueError(f"dim must be an integer axis of mu, got {dim!r}")
    if not -mu.dim() <= dim < mu.dim():  # an out-of-range dim would otherwise wrap round onto another axis
        raise ValueError(f"dim={dim} is out of range for mu of shape {tuple(mu.shape)} (dim must lie in "
                         f"[{-mu.dim()}, {mu.dim() - 1}])")
    axis = int(dim) % mu.dim()
    if axis == mu.dim() - 1:
        raise ValueError(f"dim={dim} is the latent (last) axis of mu of shape {tuple(mu.shape)}; the experts must be "
                         "along another axis")
    return axis, mu.shape[axis]


def _check_some_experts(mu, dim, num_experts, prior_expert) -> None:
    """Raises where ``mu`` has no experts along ``dim`` and no prior expert is added: a barycentre of none was a
    point mass, a pairwise mass NaN, the other pools failed inside torch."""
    if not num_experts and not prior_expert:
        raise ValueError(f"mu has no experts along dim={dim} (shape {tuple(mu.shape)}): pool at least one, or pass "
                         "prior_expert=True to pool the prior alone")


#: what the entries of ``weights`` stand for, without and with ``prior_expert``
_WEIGHT_ENTRIES = {False: "one per expert", True: "one per expert, then the prior expert's"}


def _with_prior_expert(mu, logvar, prior_logvar: float = 0.0):
    """``mu``, ``logvar`` ``(..., M, D)`` with a prior expert of mean 0 and log-variance ``prior_logvar`` (0: the
    standard normal) appended as expert M."""
    zeros = torch.zeros(mu.shape[:-2] + (1, mu.shape[-1]), dtype=mu.dtype, device=mu.device)
    return torch.cat((mu, zeros), -2), torch.cat((logvar, zeros + prior_logvar), -2)


def _prepare(mu, logvar, dim, weights, mask, prior_expert, validate,
             empty_hint: str | None = "pass prior_expert=True to fall back on the prior", prior_logvar: float = 0.0):
    """Experts moved to ``(..., M, D)``, stand-ins for the absent ones, the prior expert (log-variance
    ``prior_logvar``) appended: ``(mu, logvar, mask, M)``. With ``validate``, a sample without a present expert is
    an error ending with ``empty_hint`` (``None``: such samples are allowed)."""
    dim, num_experts = _layout(mu, logvar, dim)
    _check_some_experts(mu, dim, num_experts, prior_expert)
    if weights is not None:
        weights = real_tensor("weights", weights)
        # shapes only, before any work, whether or not values are checked
        check_weights_length("weights", weights, num_experts + (1 if prior_expert else 0),
                             _WEIGHT_ENTRIES[prior_expert])
        check_batches_broadcast(torch.Size(n for axis, n in enumerate(mu.shape[:-1]) if axis != dim),
                                weights.shape[:-1])
    if mu.dtype != logvar.dtype:  # as torch's binary operations promote (the fused paths need one dtype)
        common = torch.promote_types(mu.dtype, logvar.dtype)
        mu, logvar = mu.to(common), logvar.to(common)
    mu, logvar = mu.movedim(dim, -2), logvar.movedim(dim, -2)
    if mask is not None:
        mask = torch.as_tensor(mask, device=mu.device)
        expected = tuple(mu.shape[:-2]) + (num_experts,)
        if mask.dtype != torch.bool or mask.dim() != mu.dim() - 1 or tuple(mask.movedim(dim, -1).shape) != expected:
            raise ValueError(f"mask must be a boolean tensor of shape {tuple(mu.movedim(-2, dim).shape[:-1])} "
                             f"(mu without its last axis), got {mask.dtype} of shape {tuple(mask.shape)}")
        mask = mask.movedim(dim, -1)
    # absent experts, and those of weight zero, are no part of the pool (standing_in); an unvalidated NaN weight is
    # (its NaN reaches the outputs instead of a pool without it)
    keep = None if mask is None else mask.unsqueeze(-1)
    if weights is not None:
        weighted = ~(weights.to(mu.device)[..., :num_experts] <= 0).unsqueeze(-1)
        keep = weighted if keep is None else keep & weighted
    if validate:
        for name, value in (("mu", mu), ("logvar", logvar)):
            if not all_finite(value):  # absent experts may hold anything: then only the present ones are checked
                check_finite(name, value if keep is None else torch.masked_select(value, keep))
        if weights is not None:
            check_weights("weights", weights, num_experts + (1 if prior_expert else 0), _WEIGHT_ENTRIES[prior_expert])
    if prior_expert:
        mu, logvar = _with_prior_expert(mu, logvar, prior_logvar)
        if mask is not None:
            mask = torch.cat((mask, torch.ones(mask.shape[:-1] + (1,), dtype=torch.bool, device=mask.device)), -1)
        if keep is not None:  # a prior of weight zero is no part of the pool either (its N(0, 1) beside experts of
            # log-variance -90 overflowed float32)
            prior_kept = (torch.ones((1, 1), dtype=torch.bool, device=mu.device) if weights is None
                          else ~(weights.to(mu.device)[..., num_experts:] <= 0).unsqueeze(-1))
            batch = torch.broadcast_shapes(keep.shape[:-2], prior_kept.shape[:-2])
            keep = torch.cat((keep.expand(*batch, -1, -1), prior_kept.expand(*batch, 1, 1)), -2)
        num_experts += 1
    if keep is not None:
        mu, logvar = standing_in(mu, logvar, keep)
    if validate and empty_hint is not None and mask is not None and not bool(mask.any(-1).all()):
        empty = (~mask.any(-1)).nonzero()[0].tolist()
        raise ValueError(f"mask leaves no present expert for the sample at batch index {tuple(empty)}; {empty_hint}")
    if validate and mask is not None and weights is not None:
        _check_present_weights(weights, mask)
    return mu, logvar, mask, num_experts


def _check_present_weights(weights, present):
    """Every sample needs a present expert of positive weight: otherwise its pool is 0/0 (NaN)."""
    weighted = (weights.to(present.device) > 0) & present
    uncovered = ~weighted.any(-1)
    if bool(uncovered.any()):
        index = tuple(uncovered.nonzero()[0].tolist())
        row = weights.expand(weighted.shape)[index]
        raise ValueError(f"weights {describe(row)} give zero weight to every present expert (mask "
                         f"{present.expand(weighted.shape)[index].tolist()}) of the sample at batch index {index}")


def _log_weights(weights, num_experts, mask, like):
    """Normalised log-weights; the weights were validated by ``_prepare``."""
    return normalized_log_weights(weights, num_experts, dtype=like.dtype, device=like.device, mask=mask,
                                  validate=False)


def _holder_setup(mu, logvar, alpha, dim, weights, mask, prior_expert, max_components, validate):
    """The checks and preparation shared by ``holder_mixture`` and ``holder``: ``(order, mu, logvar, log_weights)``
    with the experts along ``-2``."""
    differentiable = isinstance(alpha, torch.Tensor) and alpha.requires_grad
    alpha = check_alpha(alpha)
    if differentiable:  # its gradient was silently none
        warnings.warn(f"alpha={alpha!r} requires grad, but the exact pools of alpha = 0 and 1/n carry no gradient "
                      "with respect to alpha; opinionpool.NumericalHolderPool(experts, alpha) differentiates in alpha",
                      stacklevel=3)
    check_positive_int("max_components", max_components)
    order = exact_order(alpha)
    if order is None:
        raise NotImplementedError(f"alpha={alpha!r} has no closed form (exact for alpha = 0 and 1/n only)")
    num_experts = _layout(mu, logvar, dim)[1]
    _check_some_experts(mu, dim, num_experts, prior_expert)
    check_max_components(alpha, order, num_experts + (1 if prior_expert else 0), max_components)
    mu, logvar, mask, m = _prepare(mu, logvar, dim, weights, mask, prior_expert, validate)
    return order, mu, logvar, _log_weights(weights, m, mask, mu)


def _components(mu, logvar, log_weights, order):
    family = DiagonalNormalFamily(mu.shape[-1])
    log_mix, components = holder_components(family, torch.stack((mu, logvar), -2), log_weights, order)
    loc, logvar_k = family.split(components)
    # alpha = 0: the one component is the whole pool, even where its Chernoff coefficient underflows to zero
    log_pi = torch.zeros_like(log_mix) if order == 0 else torch.log_softmax(log_mix, -1)
    return GaussianMixture(log_pi, loc, logvar_k)


def holder_mixture_members(num_experts: int, alpha=0.5, *, prior_expert=False,
                           max_components: int = DEFAULT_MAX_COMPONENTS, device=None) -> torch.Tensor:
    """Which experts make each component of ``holder_mixture`` (same ``alpha``, number of experts and
    ``prior_expert``): a boolean ``(C, M)`` tensor, row ``c`` for the mixture's component ``c`` (the prior expert,
    if any, is the last column). For ``alpha = 1/n`` the first ``M`` rows are the experts themselves (the identity);
    for ``alpha = 1/2`` the others are the pairs ``(i, j)``, ``i < j``, in lexicographic order. For ``alpha = 0``
    the one component combines every expert. Absent experts (``mask``) do not change the rows: their components
    have weight zero in the mixture."""
    check_positive_int("num_experts", num_experts)
    alpha = check_alpha(alpha)
    check_positive_int("max_components", max_components)
    order = exact_order(alpha)
    if order is None:
        raise NotImplementedError(f"alpha={alpha!r} has no closed form (exact for alpha = 0 and 1/n only)")
    num_experts += 1 if prior_expert else 0
    check_max_components(alpha, order, num_experts, max_components)
    return component_counts(order, num_experts, device) > 0


def holder_mixture(mu, logvar, alpha=0.5, *, dim=0, weights=None, mask=None, prior_expert=False,
                   max_components: int = DEFAULT_MAX_COMPONENTS, validate_args=None) -> GaussianMixture:
    """The exact Hölder pool (``alpha`` = 0 or 1/n) as a normalised Gaussian mixture. For ``alpha = 1/n`` the
    first ``M`` components are the experts themselves; the others combine two or more experts."""
    order, mu, logvar, log_weights = _holder_setup(mu, logvar, alpha, dim, weights, mask, prior_expert,
                                                   max_components, validation_enabled(validate_args))
    return _components(mu, logvar, log_weights, order)


def holder(mu, logvar, alpha=0.5, *, dim=0, weights=None, mask=None, prior_expert=False,
           max_components: int = DEFAULT_MAX_COMPONENTS, validate_args=None, fused: bool = False):
    """The Hölder pool moment-matched to one diagonal Gaussian: returns ``(mu, logvar)``.

    ``alpha=0.5`` is the Hellinger aggregation of HELVAE; ``alpha=0`` the log-linear pool; ``alpha=1``
    the moment-matched mixture of experts. Same arguments as ``holder_mixture``.

    ``alpha=0.5`` runs as one autograd function (pairs recomputed in the backward pass, nothing of the size of the
    components saved). ``fused=True`` runs it as one fused pass per sample: on the CPU a C++ kernel built on first
    use (then cached per machine), elsewhere its forward and backward bodies through
    ``torch.compile`` (the first call for each number of experts, dtype, device and shape compiles); where neither
    works it warns once and runs eagerly. Other orders ignore ``fused``. Where a present expert's squared weight
    relative to the largest can fall below the dtype's smallest normal number (weight ratios under about 1e-19 in
    float32, 1e-154 in float64), the fast paths would lose that expert's share of the variance, and ``alpha=0.5``
    moment-matches the written-out mixture instead (slower, exact); not under ``torch.compile``, ``torch.func``
    transforms or on the fused CUDA path, which read no values.
    """
    order, mu, logvar, log_weights = _holder_setup(mu, logvar, alpha, dim, weights, mask, prior_expert,
                                                   max_components, validation_enabled(validate_args))
    if order == 2:
        return hellinger_moments(mu, logvar, log_weights, fused=fused)
    # means relative to one expert (of largest weight), so that component means keep the digits of their offsets
    batch = torch.broadcast_shapes(mu.shape[:-2], log_weights.shape[:-1])
    index = log_weights.expand(batch + log_weights.shape[-1:]).argmax(-1)
    reference = mu.expand(batch + mu.shape[-2:]).gather(-2, index[..., None, None].expand(batch + (1, mu.shape[-1])))
    offset, logvar_out = _components(mu - reference, logvar, log_weights, order).moments()
    return reference.squeeze(-2) + offset, logvar_out


def hellinger(mu, logvar, **kwargs):
    """Hellinger aggregation (HELVAE): Hölder ``alpha=1/2`` moment-matched, returns ``(mu, logvar)`` (see
    ``holder``, whose ``fused`` switch it takes)."""
    return holder(mu, logvar, 0.5, **kwargs)


def moe(mu, logvar, *, dim=0, weights=None, mask=None, prior_expert=False, family="normal",
        validate_args=None) -> GaussianMixture | LaplaceMixture:
    """The mixture of experts: components are the present experts with the normalised weights. ``family``: the
    experts' (one of ``MIXTURE_FAMILIES``), ``"normal"`` (a ``GaussianMixture``) or ``"laplace"`` (a
    ``LaplaceMixture``, ``logvar`` the experts' log-variances); the prior expert is the family's standard one,
    ``N(0, 1)`` or ``Laplace(0, 1)`` (of variance 2) per coordinate."""
    _check_family(family)
    validate = validation_enabled(validate_args)
    mu, logvar, mask, m = _prepare(mu, logvar, dim, weights, mask, prior_expert, validate,
                                   prior_logvar=_PRIOR_LOGVAR[family])
    log_weights = _log_weights(weights, m, mask, mu)
    mixture = GaussianMixture if family == "normal" else LaplaceMixture
    return mixture(log_weights.expand(mu.shape[:-1]), mu, logvar)


def poe(mu, logvar, *, dim=0, weights=None, mask=None, prior_expert=False, validate_args=None):
    """Product of experts (precisions add up; weights default to one and are *not* normalised)."""
    validate = validation_enabled(validate_args)
    mu, logvar, mask, m = _prepare(mu, logvar, dim, weights, mask, prior_expert, validate)
    w = torch.ones(m, dtype=mu.dtype, device=mu.device) if weights is None else \
        real_tensor("weights", weights, dtype=mu.dtype, device=mu.device)
    log_w = log_of_weights(w, mask).expand(mu.shape[:-1])
    # _prepare put the first kept expert in every slot of weight zero (N(0, 1) where none is kept): the first slot
    # is as good a reference as any
    loc, logvar_p, _ = gaussian_combine(mu, logvar, log_w, 1, need_log_c=False, about_first=True)
    return loc, logvar_p


def log_bhattacharyya(mu1, logvar1, mu2, logvar2, *, family="normal", validate_args=None):
    """Log Bhattacharyya coefficient ``log int sqrt(p q)`` of two diagonal experts, summed over the last axis.
    ``family``: the experts' (one of ``MIXTURE_FAMILIES``), ``"normal"`` or ``"laplace"`` (``logvar`` the
    Laplace experts' log-*variances*, as in ``LaplaceMixture``); both closed forms are computed in log space."""
    _check_family(family)
    named = {"mu1": mu1, "logvar1": logvar1, "mu2": mu2, "logvar2": logvar2}
    for name, value in named.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            shown = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a tensor with a latent (last) axis, got {shown}")
    try:
        torch.broadcast_shapes(*(value.shape for value in named.values()))
    except RuntimeError:
        shapes = ", ".join(f"{name} {tuple(value.shape)}" for name, value in named.items())
        raise ValueError(f"mu1, logvar1, mu2 and logvar2 must broadcast together, got {shapes}") from None
    if validation_enabled(validate_args):
        for name, value in named.items():
            check_finite(name, value)
    if family == "laplace":
        return _laplace_log_chernoff(mu1, logvar1, mu2, logvar2, 0.5).sum(-1)
    # means whose difference overflows the dtype share no mass (-inf, as the Laplace form gives): their offsets
    # were inf - inf = NaN; a coinciding stand-in keeps the value and gradient finite where it is not taken
    apart = torch.isinf(mu1 - mu2)
    mu = torch.stack(torch.broadcast_tensors(mu1, torch.where(apart, mu1, mu2)), -2)
    logvar = torch.stack(torch.broadcast_tensors(logvar1, logvar2), -2)
    half = torch.full(mu.shape[:-1], LOG_HALF, dtype=mu.dtype, device=mu.device)
    log_c = gaussian_combine(mu, logvar, half, 1)[2]
    return torch.where(apart.expand(mu.shape[:-2] + mu.shape[-1:]).any(-1), -torch.inf, log_c)


def hellinger_pairwise_mass(mu, logvar, *, dim=0, weights=None, mask=None, prior_expert=False, family="normal",
                            validate_args=None) -> torch.Tensor:
    """The fraction of the Hellinger pool's mass in its pairwise components, per sample (the shape of ``mu`` less
    the expert and latent axes). The alpha = 1/2 pool ``(sum_j w_j sqrt(q_j))^2`` expands into the experts ``w_j^2
    q_j`` and the pairs ``w_i w_j sqrt(q_i q_j)``, ``i != j``, of masses ``w_i w_j BC(q_i, q_j)``; the fraction is
    summed from the pairs' own log-masses, so a tiny one keeps its digits (``1 -`` the experts' share would round
    it to 0). Near 0 the experts do not overlap and the pool is the mixture of the experts with weights ``w_j^2``
    (normalised). ``family``: ``"normal"`` or ``"laplace"`` (``log_bhattacharyya``'s); the prior expert is that
    family's standard one, as in ``moe``. Absent experts (``mask``) and those of weight zero take no part."""
    _check_family(family)
    validate = validation_enabled(validate_args)
    mu, logvar, mask, m = _prepare(mu, logvar, dim, weights, mask, prior_expert, validate,
                                   prior_logvar=_PRIOR_LOGVAR[family])
    log_w = _log_weights(weights, m, mask, mu).expand(mu.shape[:-1])
    log_bc = log_bhattacharyya(mu.unsqueeze(-2), logvar.unsqueeze(-2), mu.unsqueeze(-3), logvar.unsqueeze(-3),
                               family=family, validate_args=False)
    log_mass = log_w.unsqueeze(-1) + log_w.unsqueeze(-2) + log_bc
    pairs = log_mass.masked_fill(torch.eye(m, dtype=torch.bool, device=mu.device), -math.inf).flatten(-2)
    # a sample with one weighted present expert has no pair: logsumexp's gradient over entries all -inf is NaN
    # (exp(-inf + inf)), so those samples take a finite stand-in, and their (zero) mass its zero gradient
    paired = (pairs > -math.inf).any(-1, keepdim=True)
    log_pairs = torch.where(paired, torch.logsumexp(torch.where(paired, pairs, 0.0), -1, keepdim=True),
                            -math.inf).squeeze(-1)
    log_experts = torch.logsumexp(2 * log_w, -1)
    return torch.exp(log_pairs - torch.logaddexp(log_pairs, log_experts))


def _check_family(family) -> None:
    if family not in MIXTURE_FAMILIES:
        raise ValueError(f"family must be one of {MIXTURE_FAMILIES}, got {family!r}")


def wasserstein_barycenter(mu, logvar, *, dim=0, weights=None, mask=None, prior_expert=False, validate_args=None):
    """2-Wasserstein barycenter of diagonal Gaussians: mean ``sum w mu``, standard deviation ``sum w sigma``."""
    validate = validation_enabled(validate_args)
    mu, logvar, mask, m = _prepare(mu, logvar, dim, weights, mask, prior_expert, validate)
    return gaussian_barycenter(mu, logvar, _log_weights(weights, m, mask, mu), 1)


def _check_subset_count(name: str, count, max_subsets: int) -> None:
    check_positive_int("max_subsets", max_subsets)
    if count > max_subsets:
        raise ValueError(f"{name} gives {count} subsets, more than max_subsets={max_subsets}; pass a list of "
                         "subsets or raise max_subsets to allow it")


def _check_subset_weights(weights, positive, member, empty, subsets, prior_expert):
    """Every subset with a present expert needs one of positive weight (or a prior expert of positive weight):
    otherwise its pool is 0/0 (NaN)."""
    covered = (member & positive).any(-1) | empty
    if prior_expert:
        covered = covered | (weights.to(positive.device)[..., -1] > 0)  # the prior's weight, per sample
    if not bool(covered.all()):
        index = tuple(int(i) for i in (~covered).nonzero()[0].tolist())
        experts = subsets[index[-1]].nonzero().squeeze(-1).tolist()
        raise ValueError(f"weights {describe(weights)} give zero weight to every present expert of subset {experts} "
                         f"(at batch index {index[:-1]}); drop that subset from subsets or give it a positive weight")


def all_subsets(num_experts: int, device=None, *, max_subsets: int = DEFAULT_MAX_SUBSETS) -> torch.Tensor:
    """The ``2^M - 1`` non-empty subsets of ``M`` experts as a boolean ``(2^M - 1, M)`` tensor, ordered by
    size, then lexicographically (the order of ``itertools.combinations``). Refuses more than ``max_subsets``."""
    num_experts = check_positive_int("num_experts", num_experts)
    _check_subset_count(f"num_experts={num_experts} (2^{num_experts} - 1)", 2**num_experts - 1, max_subsets)
    members = torch.zeros(2**num_experts - 1, num_experts, dtype=torch.bool)
    for row, subset in enumerate(_subset_rows(num_experts)):
        members[row, list(subset)] = True
    return members.to(device)


def _subset_rows(num_experts: int) -> list[tuple[int, ...]]:
    """The experts of each subset of ``all_subsets(num_experts)``, in its order."""
    return [subset for size in range(1, num_experts + 1) for subset in itertools.combinations(range(num_experts), size)]


def subset_mixture(aggregator, mu, logvar, *, dim=0, mask=None, subsets=None, prior_on_full_subset=False,
                   max_subsets: int = DEFAULT_MAX_SUBSETS, validate_args=None, **kwargs) -> GaussianMixture:
    """Uniform mixture over subsets of experts, each aggregated by ``aggregator`` (MoPoE, MoHELVAE, MWB-VAE).

    ``aggregator`` is a function of this module returning ``(mu, logvar)`` (``poe``, ``hellinger``, ``holder``,
    ``wasserstein_barycenter``), called once on all subsets at once. ``subsets`` is a boolean ``(K, M)``
    tensor (default: all non-empty subsets; that none is empty is checked with the other arguments' values, when
    validating). With a per-sample ``mask`` a subset keeps only its present
    experts, and subsets with none present get mixture weight zero (a sample whose subsets all have none is an
    error, when validating). ``prior_on_full_subset=True`` adds a
    standard-normal expert to the subset of all experts only, where every expert is present, as the MoPoE code
    does (it drops the subsets with an absent expert, the full one among them; ``prior_expert=True`` is
    passed on to ``aggregator`` and adds it to every subset). ``weights`` (in ``kwargs``) must give every subset a
    present expert of positive weight; they broadcast against the subsets' pools, whose batch shape ends with the
    subset axis: one weight per expert ``(M,)``, per sample ``(B, 1, M)`` (not ``(B, M)``: refused unless ``B`` is 1
    or the number of subsets, where it reads as per subset) or per subset ``(K, M)``.

    The work and memory grow with the number of subsets, ``2^M - 1`` by default: more than ``max_subsets``
    (default ``DEFAULT_MAX_SUBSETS = 2**16``, i.e. up to 16 experts) raises ``ValueError`` before any work; pass
    fewer ``subsets`` or raise ``max_subsets``.
    """
    validate = validation_enabled(validate_args)
    weights, prior_expert = kwargs.get("weights"), kwargs.get("prior_expert", False)
    _, m = _layout(mu, logvar, dim)
    if subsets is None:
        _check_subset_count(f"subsets=None (all 2^{m} - 1 subsets of the {m} experts)", 2**m - 1, max_subsets)
    if weights is not None:  # checked here: the aggregator is called without checks
        weights = real_tensor("weights", weights)
        if prior_on_full_subset:
            raise ValueError(f"prior_on_full_subset does not combine with pooling weights (one per expert), got "
                             f"weights {describe(weights)}")
        if validate:
            check_weights("weights", weights, m + (1 if prior_expert else 0), _WEIGHT_ENTRIES[prior_expert])
    # a sample without a present expert has no subset to draw from, unless the full subset's prior stands for it
    mu, logvar, mask, m = _prepare(mu, logvar, dim, None, mask, False, validate, None if prior_on_full_subset else
                                   "subset_mixture keeps only the subsets with a present expert: pass "
                                   "prior_on_full_subset=True to fall back on the prior")
    # each subset's experts as Python tuples, for the Hellinger pool's per-subset sums: read from a given tensor
    # unless compiling (not traceable; the sums then visit every component)
    rows = _subset_rows(m) if subsets is None else None
    if subsets is None:
        subsets = all_subsets(m, device=mu.device, max_subsets=max_subsets)
    subsets = torch.as_tensor(subsets, device=mu.device)
    # reading the subsets' values (are they non-empty?) is validation: skipped with it, so that the rest traces
    if subsets.dtype != torch.bool or subsets.dim() != 2 or subsets.shape[1] != m or \
            (validate and not bool(subsets.any(-1).all())):
        raise ValueError(f"subsets must be a boolean (K, {m}) tensor of non-empty subsets, got {subsets.dtype} "
                         f"of shape {tuple(subsets.shape)}")
    _check_subset_count(f"subsets of shape {tuple(subsets.shape)}", subsets.shape[0], max_subsets)
    k = subsets.shape[0]
    if weights is not None and weights.dim() > mu.dim():  # (the subsets' axis stands in for the experts' in mu)
        raise ValueError(f"weights of shape {tuple(weights.shape)} have batch axes beyond the experts' "
                         f"{tuple(mu.shape[:-2])}: subset_mixture takes weights per expert (M,), per sample "
                         f"(B, 1, M) or per subset (K, M), with no axes beyond mu's batch; give mu the extra axis")
    if weights is not None and weights.dim() >= 2 and weights.shape[-2] not in (1, k):
        raise ValueError(f"weights of shape {tuple(weights.shape)} do not broadcast against the {k} subsets' pools "
                         f"(their batch shape ends with the subset axis): per-sample weights are (B, 1, "
                         f"{weights.shape[-1]}), per-subset ones ({k}, {weights.shape[-1]})")
    batch = mu.shape[:-2]
    member = subsets.reshape((1,) * len(batch) + subsets.shape)
    if mask is not None:
        member = member & mask.unsqueeze(-2)
    member = member.expand(batch + (k, m))
    if prior_on_full_subset:  # an extra standard-normal expert, a member of the full subset only
        mu, logvar = _with_prior_expert(mu, logvar)
        full = subsets.all(-1).reshape((1,) * len(batch) + (k, 1)).expand(batch + (k, 1))
        if mask is not None:  # the MoPoE code drops the subsets with an absent expert: no prior where one is (a
            # sample with none present keeps it: its pool is the prior)
            full = full & (mask.all(-1) | ~mask.any(-1)).reshape(batch + (1, 1))
        member = torch.cat((member, full), -1)
        m += 1
    empty = ~member.any(-1)
    if validate and bool(empty.all(-1).any()):  # a mixture of no component: NaN
        index = tuple(empty.all(-1).nonzero()[0].tolist())
        present = "every expert" if mask is None else f"mask {mask[index].tolist()}"
        raise ValueError(f"the {k} subsets hold none of the present experts ({present}) of the sample at batch index "
                         f"{index}: its mixture has no component; add a subset that holds one")
    if weights is not None:
        positive = weights.to(mu.device)[..., :m] > 0
        if validate:
            _check_subset_weights(weights, positive, member, empty, subsets, prior_expert)
    # an empty subset is given a stand-in member so that its discarded aggregate stays finite: a present expert of
    # positive weight where the sample has one (an absent one, N(0, 1) inside, could lie far from the present
    # experts, whose range the shared paths' scaling spans)
    # (candidates (..., 1, m): the subsets' axis, as per-sample weights have it)
    candidates = torch.ones(1, m, dtype=torch.bool, device=mu.device) if weights is None else \
        positive.reshape((1,) * (2 - positive.dim()) + positive.shape)
    if mask is not None:
        prior_column = torch.ones(mask.shape[:-1] + (m - mask.shape[-1],), dtype=torch.bool, device=mu.device)
        candidates = candidates & torch.cat((mask, prior_column), -1).unsqueeze(-2)
        candidates = candidates | ~candidates.any(-1, keepdim=True)  # none: any expert, its aggregate is discarded
    # not one_hot, which reads the indices to check their range (no vmap, no fullgraph compile)
    first = candidates.to(torch.uint8).argmax(-1, keepdim=True) == torch.arange(m, device=mu.device)
    member = torch.where(empty.unsqueeze(-1), first, member)
    if weights is not None:  # an expert of weight zero takes no part, as in the pools themselves
        member = member & positive
    shared = _shared_kind(aggregator, kwargs)
    if shared is not None:
        own_mu, own_logvar, own_member = mu, logvar, member
        if prior_expert:  # the aggregator's own prior expert: a member of every subset but the empty ones, whose
            # discarded aggregates are their stand-in's alone (one component: no spread, which the Hellinger sums
            # rely on, as they visit only each subset's own components)
            own_mu, own_logvar = _with_prior_expert(mu, logvar)
            # (and of an empty subset whose stand-in was of weight zero: a subset of no member is 0 / 0)
            own_member = torch.cat((member, (~empty | ~member.any(-1)).unsqueeze(-1)), -1)
        room = _log_variance_room(own_logvar, own_member)
        # beyond one scale per (sample, dimension) even in float64, or offsets whose squares overflow it (float64
        # experts 1e10 apart of log-variance -700 gave a subset the log-variance inf), or Hellinger weights whose
        # squares can underflow (the shared components lose such an expert's share as hellinger's fast paths do,
        # weights_underflow; per subset, hellinger takes the written-out mixture): every subset on its own
        if room == "none" or _offsets_overflow(own_mu, own_logvar, own_member, torch.float64) or (
                shared == "hellinger" and weights is not None
                and weights_underflow(torch.log(torch.as_tensor(weights, dtype=mu.dtype, device=mu.device)))):
            shared = None
    if shared is None:
        expand = batch + (k,) + mu.shape[-2:]
        loc, lv = aggregator(mu.unsqueeze(-3).expand(expand), logvar.unsqueeze(-3).expand(expand), dim=-2,
                             mask=member, validate_args=False, **kwargs)
    else:
        extra = ()
        if shared == "hellinger":
            if rows is None and not torch.compiler.is_compiling():
                rows = [tuple(e for e, inside in enumerate(row) if inside) for row in subsets.tolist()]
            if rows is not None:  # the added experts: the full subset's prior (column M), then the prior expert
                experts = subsets.shape[1]
                full = (experts,) if prior_on_full_subset else ()
                prior = (own_member.shape[-1] - 1,) if prior_expert else ()
                rows = [row + (full if len(row) == experts else ()) + prior for row in rows]
            extra = (rows,)
        if room == "float64" or _offsets_need_float64(own_mu, own_logvar, own_member):
            wide = (own_mu.double(), own_logvar.double(), own_member, None if weights is None else weights.double(),
                    *extra)
            loc, lv = (t.to(mu.dtype) for t in _SHARED[shared](*wide))
        else:
            loc, lv = _SHARED[shared](own_mu, own_logvar, own_member, weights, *extra)
    log_weights = torch.where(empty, -torch.inf, 0.0).to(mu.dtype)
    return GaussianMixture(torch.log_softmax(log_weights, -1), loc, lv)


def _shared_kind(aggregator, kwargs):
    """Which shared-component computation stands for ``aggregator(**kwargs)`` on every subset, or ``None``."""
    extra = set(kwargs) - {"weights", "prior_expert"}
    if aggregator is hellinger and extra <= {"fused"}:
        return "hellinger"
    if aggregator is holder and extra <= {"alpha", "fused"} and exact_order(check_alpha(kwargs.get("alpha", 0.5))) == 2:
        return "hellinger"
    if aggregator is poe and not extra:
        return "poe"
    if aggregator is wasserstein_barycenter and not extra:
        return "barycenter"
    return None


def _wide(dtype):
    """float64 for the per-subset sums of float32 (or narrower) terms: the standard deviations of
    ``_subset_barycenter`` keep their digits and range."""
    return torch.float64 if torch.finfo(dtype).bits < 64 else dtype


#: the shared subset paths run in float64 where a float32 (or narrower) offset's rounding exceeds this fraction of
#: its expert's standard deviation
OFFSET_ROUNDING = 1e-3


def _log_variance_room(logvar, member) -> str:
    """Where the shared subset paths can take the present experts' log-variances: ``"inputs"`` (their dtype),
    ``"float64"`` where they span more than the inputs' dtype keeps at some (sample, dimension) (``2 _span``, 160
    nats in float32: beyond it the flattest experts are floored, so the subset of such an expert alone got the floor,
    -71.7 for an expert of log-variance -87 beside one of +88) or one lies below ``-2 _span`` (the Hellinger
    subsets of float32 experts of log-variance -200 were NaN), or ``"none"`` where they span more than float64 keeps
    too (1 277 nats: a subset of the flattest expert alone got the floor, or a standard deviation of 0 and NaN
    gradients), and only the aggregator on each subset is right. ``"inputs"`` where the values cannot be read."""
    if not logvar.numel() or not values_readable(logvar):  # (no values: an empty batch)
        return "inputs"
    limit = 2 * _span(logvar.dtype)
    with torch.no_grad():
        low, high = torch.aminmax(logvar)
        tiny = (low < -limit) & (logvar.dtype != torch.float64)
        if bool((high - low <= limit) & ~tiny):  # every expert at once, present or not: the usual case, one read
            return "inputs"
        top, bottom = _present_range(logvar, member.any(-2).unsqueeze(-1))
        if bool((top - bottom > 2 * _span(torch.float64)).any()):
            return "none"
        # (below -limit: standard deviations under e^-80 in float32, whose Hellinger subsets were NaN)
        return "float64" if bool(tiny | (top - bottom > limit).any()) else "inputs"


def _offsets_need_float64(mu, logvar, member):
    """Whether the shared subset paths' offsets from one expert per sample lose what matters: the components' means
    are offsets in the inputs' dtype, so a subset of narrow experts far from that expert got the offsets' rounding
    in its mean and variance (float32 experts of standard deviation 1e-6 some 1e3 away: a one-expert subset's mean
    30 standard deviations off); or whether their squares, in units of the narrowest present expert's standard
    deviation (the Hellinger subsets' spread is scaled by at most it), could overflow (beyond about e^36 in float32:
    experts 4e19 apart, of log-variances -79 and 79, gave a subset a log-variance of inf; ``_offsets_overflow``).
    Not where the values cannot be read (``torch.compile``, ``torch.func``, CUDA-graph capture), nor in float64."""
    if mu.dtype == torch.float64 or not mu.numel() or not values_readable(mu, logvar):
        return False
    eps = torch.finfo(mu.dtype).eps
    with torch.no_grad():
        # first a bound from two reductions (every offset is at most twice the largest |mu|, every standard deviation
        # at least the smallest): it settles the usual case at a fraction of the exact test's passes
        low, high = torch.aminmax(mu)
        if bool(2 * eps * torch.maximum(-low, high) <= OFFSET_ROUNDING * torch.exp(0.5 * logvar.amin())):
            return False
        x, _ = _reference_offsets(mu, member)
        present = member.any(-2).unsqueeze(-1)
        lost = (x.abs() * eps > OFFSET_ROUNDING * torch.exp(0.5 * logvar)) & present
    return bool(lost.any()) or _offsets_overflow(mu, logvar, member, mu.dtype)


def _offsets_overflow(mu, logvar, member, dtype) -> bool:
    """Whether the squares of the offsets from one expert per sample, in units of the narrowest present expert's
    standard deviation (the Hellinger subsets' spread is scaled by at most it), could overflow ``dtype``, with a
    margin of e^8 for the sums over a subset's components. Not where the values cannot be read."""
    if not mu.numel() or not values_readable(mu, logvar):
        return False
    limit = 0.5 * math.log(torch.finfo(dtype).max) - 8
    with torch.no_grad():
        low, high = torch.aminmax(mu)  # first a bound: every offset is at most twice the largest |mu|
        if bool(torch.log(torch.maximum(-low, high)) + math.log(2) - 0.5 * logvar.amin() <= limit):
            return False
        x, _ = _reference_offsets(mu, member)
        present = member.any(-2).unsqueeze(-1)
        return bool(((torch.log(x.abs()) - 0.5 * _present_range(logvar, present)[1] > limit) & present).any())


def _reference_offsets(mu, member):
    """``mu`` relative to the first present expert of each sample: ``(offsets, reference (..., 1, D))``."""
    index = member.any(-2).to(torch.uint8).argmax(-1)[..., None, None].expand(member.shape[:-2] + (1, mu.shape[-1]))
    reference = mu.gather(-2, index)
    return mu - reference, reference


def _subset_weights(weights, member, dtype):
    """Unnormalised pooling weights ``(..., K, M)`` broadcast like the generic path's (normalising within a subset
    cancels in every pool), zero outside each subset."""
    if weights is None:
        return member.to(dtype)
    w = weights.to(dtype=dtype, device=member.device)[..., :member.shape[-1]]
    return torch.where(member, w, torch.zeros((), dtype=dtype, device=member.device))


def _subset_components(rows, num_experts, pairs):
    """Per subset, the indices of the shared components it can hold: its experts ``c < M`` and its pairs ``M + p``
    (``p`` the pair's place in ``pairs``, the shared pairs); ``rows`` lists each subset's experts, or is ``None``
    for all of them."""
    if rows is None:
        return (tuple(range(num_experts + len(pairs))),)
    index = {pair: num_experts + p for p, pair in enumerate(pairs)}
    return tuple(tuple(row) + tuple(index[pair] for pair in itertools.combinations(row, 2) if pair in index)
                 for row in rows)


def _subset_hellinger(mu, logvar, member, weights, rows=None):
    """The order-1/2 pool of every subset from the components of the pool of all experts: a subset's components
    are the experts and pairs inside it, with the same unnormalised weights ``w_i w_j S_ij``; a masked softmax
    over the shared components gives each subset's mixture weights, matrix products its mean and mean variance,
    and ``_SubsetMoments`` the spread of its components about its mean. ``rows``: each subset's experts (a superset
    of ``member``'s, but for the stand-in member of an empty subset), or ``None`` when not known (every component
    is then visited for every subset: the same result, more work)."""
    x, reference = _reference_offsets(mu, member)
    log_w = log_of_weights(_subset_weights(weights, member, mu.dtype))  # (..., K, M), -inf outside the subset
    # a pair is left out where it changes no subset's pool (the criterion reads the pair's weights in each subset
    # that holds both its experts)
    partners = kept_partners(mu, logvar, log_w, pools=True)
    pairs = pairs_of(x.shape[-2], partners)
    i, j = torch.tensor(pairs, dtype=torch.long, device=x.device).reshape(-1, 2).unbind(-1)
    neg_log_s, loc_p, lv_p = pair_components(x, logvar, partners, mu)
    logits = torch.cat((2 * log_w, log_w[..., i] + log_w[..., j] - LOG_HALF - neg_log_s.unsqueeze(-2)), -1)
    components = _subset_components(rows, x.shape[-2], pairs)
    if len(components) == 1:
        components = components * member.shape[-2]
    # a subset of one component has no spread (its mean is that component's, exactly): nothing to visit
    components = tuple(members if len(members) > 1 else () for members in components)
    visited = torch.tensor([[c in members for c in range(logits.shape[-1])] for members in components],
                           dtype=torch.bool, device=mu.device)
    present = member.any(-2)  # the experts some subset holds; a component is present when all its experts are
    present = torch.cat((present, present[..., i] & present[..., j]), -1).unsqueeze(-1)
    return _SubsetMoments.apply(logits, x, logvar, loc_p, lv_p, reference, present, visited, components)[:2]


class _SubsetMoments(torch.autograd.Function):
    """The moment-matched mixture of every subset ``(..., K, D)``, ``mean`` and ``logvar``, from the logits
    ``(..., K, C)`` of the ``C = M + P`` shared components (experts ``x``, ``logvar`` ``(..., M, D)`` given as
    offsets from ``reference (..., 1, D)``; pairs ``loc_p``, ``lv_p`` ``(..., P, D)``), in the inputs' dtype.

    Each subset's variance is its components' mean variance plus their spread ``sum_c pi_c (loc_c - mean)^2``, a sum
    of non-negative terms formed subset by subset over its own ``components`` (a tuple of indices per subset): raw
    second moments would cancel, losing every digit in float32 once a subset's mean lies some 1e3 of its standard
    deviations from the reference. Locations and variances are scaled per (sample, dimension) by ``e^(shift/2)``
    and ``e^shift``, ``shift`` the midpoint of the present experts' log-variance range (at least their largest less
    ``_span``): no scaled variance overflows, and smaller ones are raised to ``e^-_span`` (no gradient there).
    Components of absent experts (``present (..., C, 1)`` false; weight zero in every subset) get variance zero,
    whatever their stand-in parameters.
    The backward pass is analytic (the spread's derivatives revisit the same (subset, component) pairs); fresh
    ``(..., K, D)`` buffers, which cost as much as a pass over them, are kept to the two outputs, the mean in
    scaled units (kept for backward) and one gradient."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, x, logvar, loc_p, lv_p, reference, present, visited, components):
        span = _span(logvar.dtype)
        *_, shift = _present_shift(logvar, present[..., :x.shape[-2], :], span)
        scale = torch.exp2(shift * (-0.5 / _LN2))  # e^(-shift/2); exp2 runs several times faster than exp
        pi = torch.softmax(logits, -1)
        # out of place where the presence (batched under vmap when the weights are) meets unbatched tensors
        loc_c = torch.cat((x, loc_p), -2) * scale
        log_var_c = torch.cat((logvar, lv_p), -2) - shift
        clamped = (log_var_c < -span) | ~present
        var_c = torch.where(present, log_var_c.clamp_min_(-span).mul_(1 / _LN2).exp2_(), 0)
        mean = pi @ loc_c
        var = pi @ var_c
        for k, members in enumerate(components):
            mean_k, var_k = mean[..., k, :], var[..., k, :]
            for c in members:
                var_k.addcmul_((loc_c[..., c, :] - mean_k).square_(), pi[..., k, c:c + 1])
        mean_out = torch.addcdiv(reference, mean, scale)
        return mean_out, var.log_().add_(shift), pi, loc_c, var_c, clamped, mean, shift, scale

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.components = inputs[-1]
        ctx.num_experts = inputs[1].shape[-2]
        ctx.visited = inputs[-2]
        ctx.set_materialize_grads(False)  # no zero-filled (..., K, D) gradients for the extra outputs
        _, logvar_out, pi, loc_c, var_c, clamped, mean, shift, scale = output
        ctx.mark_non_differentiable(pi, loc_c, var_c, clamped, mean, shift, scale)
        ctx.save_for_backward(pi, loc_c, var_c, clamped, mean, logvar_out, shift, scale)

    @staticmethod
    @first_order_only("subset_mixture of the Hellinger pool (its shared components)")
    def backward(ctx, g_mean, g_lv, *_):
        pi, loc_c, var_c, clamped, mean, logvar_out, shift, scale = ctx.saved_tensors
        g_mean, g_lv = _incoming(g_mean, g_lv, mean)
        b = (shift - logvar_out).mul_(1 / _LN2).exp2_().mul(g_lv)  # d loss / d (scaled variance)
        pi_t = pi.transpose(-1, -2)
        # d loss / d (scaled location) c: sum_k pi_kc (a_k + 2 b_k dev_kc), with a_k = d loss / d mean_k (scaled)
        # and dev_kc = loc_c - mean_k; that is sum_k pi_kc (2 u_kc - a_k), u_kc = a_k + b_k dev_kc, over the
        # visited pairs (k, c), and pi_kc a_k over the others (where pi_kc or dev_kc is zero)
        sign = torch.where(ctx.visited, -1.0, 1.0).to(pi.dtype)
        d_loc = ((pi * sign).transpose(-1, -2) @ g_mean).div_(scale)
        # d loss / d pi_kc, less what is common to every c of subset k (which the softmax's Jacobian removes):
        # s_kc = sum_d u_kc dev_kc + b_k var_c over the visited pairs; zero elsewhere, where pi_kc is zero or one
        # (then the softmax's Jacobian gives zero whatever s_kc)
        s_visited = []
        for k, members in enumerate(ctx.components):
            mean_k, b_k = mean[..., k, :], b[..., k, :]
            a_k = g_mean[..., k, :] / scale[..., 0, :]
            for c in members:
                dev = loc_c[..., c, :] - mean_k
                u = torch.addcmul(a_k, dev, b_k)
                d_loc[..., c, :].addcmul_(u, pi[..., k, c:c + 1], value=2)
                s_visited.append(u.mul_(dev).addcmul_(b_k, var_c[..., c, :]).sum(-1))
        # placed out of place: under jacrev the incoming gradients are batched and the saved pi is not
        s = torch.zeros_like(pi).flatten(-2)
        if s_visited:
            s = s.index_copy(-1, ctx.visited.flatten().nonzero().squeeze(-1), torch.stack(s_visited, -1))
        # components of weight zero: their s (which may overflow) changes no gradient, but inf * 0 would
        s = torch.where(pi > 0, s.unflatten(-1, pi.shape[-2:]), 0)
        d_logits = (s - (s * pi).sum(-1, keepdim=True)).mul_(pi)
        d_loc.mul_(scale)
        d_lv_c = (pi_t @ b).mul_(var_c).masked_fill_(clamped, 0)
        m = ctx.num_experts
        return (d_logits, d_loc[..., :m, :], d_lv_c[..., :m, :], d_loc[..., m:, :], d_lv_c[..., m:, :],
                g_mean.sum(-2, keepdim=True), None, None, None)


_LN2 = math.log(2.0)


def _incoming(g_mean, g_lv, like):
    """The incoming gradients of a pool's mean and log-variance (tensors shaped like ``like``), a missing one as
    zeros like the other: under ``jacrev`` or ``vmap`` of one output that is batched like the given one, so the
    in-place updates that mix the two never write a batched tensor into an unbatched one."""
    if g_mean is None and g_lv is None:
        return torch.zeros_like(like), torch.zeros_like(like)
    return (torch.zeros_like(g_lv) if g_mean is None else g_mean), (torch.zeros_like(g_mean) if g_lv is None else g_lv)


def _span(dtype):
    """Half the range of exponents ``_SubsetSums`` allows: about 80 in float32 (normal numbers reach e^(+-87)),
    640 in float64."""
    return 0.9 * math.log(torch.finfo(dtype).max)


def _present_range(values, present):
    """The largest and the smallest of ``values (..., M, D)`` over the present experts (``present`` along ``-2``,
    ``None`` when all are), ``(..., 1, D)`` each."""
    if present is None:  # (two reductions: aminmax along a non-last axis measured twenty times slower)
        return values.amax(-2, keepdim=True), values.amin(-2, keepdim=True)
    hidden = torch.full((), math.inf, dtype=values.dtype, device=values.device)
    return (torch.where(present, values, -hidden).amax(-2, keepdim=True),
            torch.where(present, values, hidden).amin(-2, keepdim=True))


def _present_shift(values, present, span):
    """``(top, bottom, shift)`` of the log-scales ``values (..., M, D)`` of the present experts (``present`` along
    ``-2``, ``None`` when all are): their largest, their smallest and the midpoint of their range, but at least
    ``top - span``, by which the shared subset paths scale each (sample, dimension) so that the present experts'
    scaled values lie within ``e^(+-span)``."""
    top, bottom = _present_range(values, present)
    return top, bottom, torch.maximum(top - span, 0.5 * (top + bottom))


class _SubsetSums(torch.autograd.Function):
    """Per subset, from pooling weights ``w (..., K, M)`` (zero outside the subset), the experts' offsets
    ``x (..., M, D)`` from ``reference (..., 1, D)`` and log-precisions ``log_p (..., M, D)``: the precision-weighted
    mean ``reference + sum_m w p x / sum_m w p`` and ``-log sum_m w p`` ``(..., K, D)``, in the inputs' dtype.

    The precisions are scaled per (sample, dimension) by ``e^-shift``, ``shift`` the midpoint of the present
    log-precisions' range but at least their largest less ``_span``: no scaled precision exceeds ``e^_span``, and when
    the range is under ``2 _span`` (160 nats in float32) none falls below ``e^-_span``, so every subset's sum keeps its
    digits whichever experts it holds (a shift by the largest alone would flush the sums of subsets of flat experts
    to zero once the range passes 87 nats). Log-precisions further below the largest are raised to that floor (no
    gradient there; ``subset_mixture`` sends wider ranges through float64, ``_log_variance_room``). The
    backward pass is analytic and saves the inputs, the mean and the scaled precisions, from which it recomputes
    ``1 / sum`` slice by slice (a matrix product, cheaper than ``exp`` of the log-variance); outputs and temporaries
    are written in place (each fresh ``(..., K, D)`` buffer costs as much as a pass over it, or more where its pages
    are new)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(w, x, log_p, present, reference, uniform):
        span = _span(log_p.dtype)
        top, bottom, shift = _present_shift(log_p, present, span)
        # (raising the values below the floor leaves the shift as it is: it is at least top - span); none is below
        # it where the present values span at most 2 span, the usual case, then known from (..., 1, D) tensors
        clamped = None
        if not values_readable(w, x, log_p) or bool((top - bottom > 2 * span).any()):
            floor = top - 2 * span
            clamped = log_p < floor
            log_p = torch.maximum(log_p, floor)
        # an absent expert's precision is zero, not exp of its stand-in log-precision less the shift (which the
        # present experts set, and which overflows far from it; zero weights would then meet inf)
        p = torch.exp(log_p - shift)
        if present is not None:
            p = torch.where(present, p, 0)
        # weights scaled to a largest of one per subset: the scale cancels in the mean, its log is added back
        w_top = w.amax(-1, keepdim=True)
        wn = w / w_top
        # in one pass, not in slices: its (..., K, D) tensors are the outputs, new memory either way (slices measured
        # slower); the backward pass's temporaries are not. 1 / sum is not kept: a third such tensor, whose fresh
        # pages cost more than recomputing it from the scaled precisions in the backward pass's slices
        # Each pass over them counts: uniform weights (MoPoE's) have the scale 1, whose log is not added. (The
        # passes are in place: fusing them with out= has no batching rule under vmap.)
        total = wn @ p
        mean = (wn @ (p * x)).div_(total).add_(reference)
        log_total = total.log_() if uniform else total.log_().add_(w_top.log())
        logvar = log_total.add_(shift).neg_()
        return mean, logvar, wn, w_top, p, clamped

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, x, _, _, reference, _ = inputs
        mean, _, wn, w_top, p, clamped = output
        ctx.mark_non_differentiable(*(t for t in (wn, w_top, p, clamped) if t is not None))
        ctx.save_for_backward(x, reference, mean, wn, w_top, p, clamped)
        ctx.set_materialize_grads(False)

    @staticmethod
    @first_order_only("subset_mixture of products of experts (its shared sums)")
    def backward(ctx, g_mean, g_lv, *_):
        x, reference, mean, wn, w_top, p, clamped = ctx.saved_tensors
        g_mean, g_lv = _incoming(g_mean, g_lv, mean)
        # in slices of rows on the CPU: fresh (..., K, D) temporaries of many megabytes made every pass several
        # times slower
        batch = mean.shape[:-2]
        tensors = (g_mean, g_lv, x, reference, mean, wn, w_top, p)
        need_w = ctx.needs_input_grad[0]  # MoPoE's membership weights take none: two matrix products fewer
        d_px, d_p, *d_w = by_rows(_subset_sums_backward, batch, tuple(t.expand(batch + t.shape[-2:]) for t in tensors),
                                  need_w, row_elements=mean.shape[-2] * mean.shape[-1])
        d_log_p = d_p.mul_(p) if clamped is None else torch.where(clamped, 0, d_p.mul_(p))
        return d_w[0] if need_w else None, d_px.mul_(p), d_log_p, None, g_mean.sum(-2, keepdim=True), None


def _subset_sums_backward(g_mean, g_lv, x, reference, mean, wn, w_top, p, need_w):
    """``(d (p x), d p)`` of ``_SubsetSums`` from the incoming gradients ``g_mean``, ``g_lv``, then ``d w`` of the
    scaled weights ``wn`` where ``need_w``."""
    # 1 / sum of the scaled precisions, recomputed: a matrix product with the membership costs less than exp of the
    # saved log-variance over (..., K, D)
    r = (wn @ p).reciprocal_()
    d_weighted = g_mean * r
    # -d sum = (g_mean (mean - reference) + g_lv) / sum: its sign is folded into the products with it, which are
    # (..., M, D) or (..., K, M), not (..., K, D)
    minus_d_total = (g_lv * r).addcmul_(d_weighted, mean).addcmul_(d_weighted, reference, value=-1)
    wt = wn.transpose(-1, -2)
    d_px = wt @ d_weighted
    d_p = (wt @ minus_d_total).neg_().addcmul_(d_px, x)
    if not need_w:
        return d_px, d_p
    d_w = (d_weighted @ (p * x).transpose(-1, -2)).sub_(minus_d_total @ p.transpose(-1, -2)).div_(w_top)
    return d_px, d_p, d_w


def _subset_poe(mu, logvar, member, weights):
    """Each subset's product of experts from per-expert precisions: matrix products of the weighted membership
    ``(..., K, M)`` with the scaled precisions and precision-weighted offsets (``_SubsetSums``)."""
    x, reference = _reference_offsets(mu, member)
    w = _subset_weights(weights, member, mu.dtype)
    present = member.any(-2).unsqueeze(-1)
    if values_readable(present) and bool(present.all()):  # no mask or stand-in to apply: one pass fewer each
        present = None
    return _SubsetSums.apply(w, x, -logvar, present, reference, weights is None)[:2]


def _subset_barycenter(mu, logvar, member, weights):
    """Each subset's 2-Wasserstein barycenter: weighted means of the experts' means and standard deviations, so one
    matrix product of the weighted membership with both. The standard deviations are scaled per (sample, dimension)
    as ``_SubsetSums`` scales the precisions (``_present_shift``): float64 log-variances beyond +-1418 gave standard
    deviations of 0 or inf, and log-variances of -inf or inf."""
    x, reference = _reference_offsets(mu, member)
    wide = _wide(mu.dtype)
    w = _subset_weights(weights, member, wide)
    log_sd = 0.5 * logvar.to(wide)
    *_, shift = _present_shift(log_sd.detach(), member.any(-2).unsqueeze(-1), _span(wide))
    sums = w @ torch.cat((x.to(wide), (log_sd - shift).exp()), -1)
    mean, sd = (sums / w.sum(-1, keepdim=True)).chunk(2, -1)
    return reference + mean.to(mu.dtype), (2 * (sd.log() + shift)).to(mu.dtype)


_SHARED = {"hellinger": _subset_hellinger, "poe": _subset_poe, "barycenter": _subset_barycenter}
