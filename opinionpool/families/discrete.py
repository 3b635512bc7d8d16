"""Discrete families; every one has a closed-form inverse mean map.

=============  =================  ============  ====================  ==================
family         natural eta        T(z)          A(eta)                log h(z)
=============  =================  ============  ====================  ==================
Poisson        log rate           z             exp(eta)              -lgamma(z + 1)
Bernoulli      log(1 - p), log p  (1 - z, z)    logsumexp(eta)        0
Binomial(n)    log(1 - p), log p  (n - z, z)    n logsumexp(eta)      log C(n, z)
Categorical    log-probabilities  one-hot(z)    logsumexp(eta)        0
=============  =================  ============  ====================  ==================

Bernoulli, Binomial and Categorical use the (non-minimal) log-probabilities as natural parameters, so that a
probability of zero is an exact ``-inf`` (a logit cannot say p = 0 or 1); the inverse mean map picks the
representative with ``logsumexp(eta) = 0``.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Bernoulli, Binomial, Categorical, Poisson, constraints
from torch.distributions.utils import probs_to_logits

from .._validation import check_finite, check_log_probabilities, check_positive, check_probabilities
from ..constants import LOG_2PI
from .base import ExponentialFamily, safe_log
from .continuous import _deviance, _stirling_remainder

__all__ = ["PoissonFamily", "BernoulliFamily", "BinomialFamily", "CategoricalFamily"]


class _LogProbabilityFamily(ExponentialFamily):
    """Families whose natural parameters are log-probabilities up to a common shift (Categorical, and Bernoulli and
    Binomial through ``(log(1 - p), log p)``): the mean parameters are (multiples of) the probabilities, and moment
    matching mixes them in log space."""

    shift_invariant = True

    def _log_normalizer_of_combination(self, combined):
        # -inf for an empty combination, from a finite stand-in so that its gradient is zero: the log-sum-exp of no
        # finite term has a NaN backward pass, which reached every gradient of the pool through its mixture
        empty = torch.isneginf(combined).all(-1)
        return torch.where(empty, -math.inf, self.log_normalizer(_without_empty(combined)))

    def natural_from_mean(self, mean_params, init=None, tol=None, max_iter=100):
        # the representative with logsumexp(eta) = 0; a zero mean parameter (probability 0) gives an exact -inf
        return safe_log(mean_params / mean_params.sum(-1, keepdim=True))

    def moment_match(self, log_pi, params):
        """The natural parameters (``log`` of the probabilities) of the member whose probabilities are the mixture's,
        ``log sum_k pi_k softmax(eta_k)``, by log-sum-exp in float64: a probability that underflows (a logit of -800)
        keeps its value and its gradient, where the probability-space mean and its ``log`` made it exactly zero. An
        empty combination (every entry ``-inf``, weight zero) contributes nothing, not NaN."""
        log_pi, natural = log_pi.to(torch.float64), params.to(torch.float64)
        log_probs = torch.log_softmax(_without_empty(natural), dim=-1)
        terms = log_pi.unsqueeze(-1) + log_probs
        k = log_pi.dim() - 1
        # a category every expert rules out: logsumexp's backward would compute exp(-inf - -inf) = NaN there
        ruled_out = torch.isneginf(terms).all(k, keepdim=True)
        pooled = torch.logsumexp(torch.where(ruled_out, torch.zeros((), dtype=terms.dtype), terms), dim=k)
        return torch.where(ruled_out.squeeze(k), -math.inf, pooled).to(params.dtype)


def _without_empty(natural: torch.Tensor) -> torch.Tensor:
    """``natural`` with each empty combination (every entry ``-inf``: experts that rule out each other's outcomes,
    whose combination has weight exactly zero in a pool) replaced by the uniform placeholder 0: normalised, it would
    be NaN, which the zero weight does not hide."""
    empty = torch.isneginf(natural).all(-1, keepdim=True)
    return torch.where(empty, torch.zeros((), dtype=natural.dtype, device=natural.device), natural)


def _probs_given(dist, binary: bool) -> bool:
    """Whether ``dist`` was built from ``probs`` (exact zeros and ones) rather than ``logits``. torch caches the
    other parameter once read, and ``expand`` copies both and makes the logits ``_param``: then the probabilities
    were given exactly when the cached logits are torch's (clamped) logits of the cached probabilities."""
    cached = dist.__dict__
    if "probs" not in cached:
        return False
    if "logits" not in cached or cached["probs"] is getattr(dist, "_param", None):
        return True
    return torch.equal(cached["logits"], probs_to_logits(cached["probs"], is_binary=binary))


def _listed(values: torch.Tensor, params: torch.Tensor, param_dims: int = 1):
    """Support values that leave nothing out: the bound is zero for every expert batch."""
    batch = params.shape[: params.dim() - param_dims - 1]
    return values, torch.zeros(batch, dtype=params.dtype, device=params.device)


class _LogProbInFloat64:
    """For a family whose ``log_prob`` computes in float64 (cast back), the size of its terms in units of the result's
    dtype: they round in float64, the result once more when cast."""

    def log_prob_term_size(self, params, value):
        dtype = torch.promote_types(params.dtype, value.dtype) if value.is_floating_point() else params.dtype
        size = self._float64_term_size(params.to(torch.float64), value.to(torch.float64))
        if dtype == torch.float64:
            return size.to(dtype)
        cast = self.log_prob(params, value).abs().to(torch.float64)
        cast = torch.where(torch.isfinite(cast), cast, torch.zeros_like(cast))
        return (cast + size * torch.finfo(torch.float64).eps / torch.finfo(dtype).eps).to(dtype)

    def _float64_term_size(self, params, value):
        """The size of the float64 ``log_prob``'s terms (by default those of ``log h + eta . T - A``)."""
        return super().log_prob_term_size(params, value)


class PoissonFamily(_LogProbInFloat64, ExponentialFamily):
    """Poisson experts, parameterised by their rate (its log, the natural parameter, would lose the digits that
    tell nearly equal large rates apart in float32); the numerical engine truncates the support where the tail is
    below 1e-30."""

    name = "Poisson"
    discrete = True
    support_constraint = constraints.nonnegative_integer

    def __init__(self):
        super().__init__(event_shape=(), param_shape=(1,))

    @classmethod
    def match(cls, dist):
        return cls() if type(dist) is Poisson else None

    def params_from_distribution(self, dist):
        check_positive("Poisson rate", dist.rate)
        return dist.rate.unsqueeze(-1)

    def to_natural(self, params):
        return torch.log(params)

    def from_natural(self, natural):
        return torch.exp(natural)

    def natural_difference(self, params_p, params_q):
        # log(r_q / r_p) from the rates: their logs, of about 35 at 1e15, round to 1e-14, which a difference of 1e-9
        # inherits (a KL divergence of 1e15 rates 1e-9 apart 7e-6 off). Only near a ratio of 1, though: far below
        # it (r_q << r_p) the relative difference rounds to -1 + eps, and log1p gave log(eps) for log(1e-15), -inf
        # for log(1e-300); there, and where it overflows, the logs' difference keeps every digit
        ratio = (params_q - params_p) / params_p
        near = ratio.abs() <= 0.5
        return torch.where(near, torch.log1p(torch.where(near, ratio, 0.0)), torch.log(params_q) - torch.log(params_p))

    def distribution(self, params, validate_args: bool = False):
        return Poisson(params[..., 0], validate_args=validate_args)

    def log_normalizer(self, natural):
        return torch.exp(natural[..., 0])

    def sufficient_statistic(self, value):
        return value.unsqueeze(-1)

    def log_base_measure(self, value):
        return -torch.lgamma(value + 1)

    def base_measure_natural(self, natural):
        return None  # 1 / z! is not exp(c z)

    def mean_parameters(self, natural):
        return torch.exp(natural)

    def natural_from_mean(self, mean_params, init=None, tol=None, max_iter=100):
        return torch.log(mean_params)

    def log_prob(self, params, value):
        """In float64 (cast back), in Loader's form (as R's dpois): ``-bd0(z, r) - log(2 pi z) / 2 - delta(z)``, with
        ``bd0(z, r) = z log(z / r) - z + r`` without cancellation and ``delta`` Stirling's error of ``log z!``, terms
        of the size of the result. ``z log r - r - log z!`` has terms of about ``r log r``: float32 kept none of the
        result's digits at a rate of 3e7 (+22.0 for -9.53), float64 none at 1e15 (-18.875 for -18.188)."""
        dtype = torch.promote_types(params.dtype, value.dtype) if value.is_floating_point() else params.dtype
        return self._loader(params.to(torch.float64), value.to(torch.float64), with_size=False)[0].to(dtype)

    def _float64_term_size(self, params, value):
        return self._loader(params, value)[1]

    @staticmethod
    def _loader(params, value, with_size=True):
        """``(log p(z), the size of its terms)`` in Loader's form; ``-r`` at ``z = 0``, ``-inf`` below."""
        rate, value = torch.broadcast_tensors(params[..., 0], value)
        positive = value > 0
        z = torch.where(positive, value, 1.0)
        deviance, deviance_size = _deviance(z, rate, with_size, y_error=torch.zeros_like(rate))  # (r is exact)
        remainder, remainder_size = _stirling_remainder(z)
        half_log = 0.5 * (LOG_2PI + torch.log(z))
        log_p = torch.where(positive, -deviance - half_log - remainder,
                            torch.where(value == 0, -rate, torch.where(value < 0, -math.inf, value)))  # (NaN stays)
        if not with_size:
            return log_p, None
        size = torch.where(positive, deviance_size + half_log.abs() + remainder_size, rate)
        return log_p, torch.where(torch.isfinite(size), size, torch.zeros_like(size))

    def support_values(self, params):
        rate = params[..., 0]  # (batch, M)
        largest, smallest = float(rate.max()), float(rate.min())
        first = max(0, math.floor(smallest - 50 * math.sqrt(smallest) - 80))
        last = math.ceil(largest + 50 * math.sqrt(largest) + 80)
        if last >= 2 / torch.finfo(params.dtype).eps:  # consecutive integers stop being representable
            raise ValueError(f"Poisson experts in {params.dtype} with a rate of {largest:.4g}: their support reaches "
                             f"{float(last):.4g}, beyond the integers {params.dtype} represents; use float64 experts")
        # E[(1+z)^2; z > K] = P(z > K) + 3 r P(z >= K) + r^2 P(z >= K - 1) <= (1 + 3r + r^2) P(z >= K - 1)
        tail = torch.special.gammainc(torch.full_like(rate, last - 1.0), rate)
        bound = ((1 + 3 * rate + rate * rate) * tail).sum(-1)
        if first > 0:  # and below: E[(1+z)^2; z < first] <= (1 + first)^2 P(z <= first - 1)
            below = torch.special.gammaincc(torch.full_like(rate, float(first)), rate)
            bound = bound + ((1.0 + first) ** 2 * below).sum(-1)
        return torch.arange(first, last + 1, dtype=params.dtype, device=params.device), bound


class _CountFamily(_LogProbInFloat64, _LogProbabilityFamily):
    """Bernoulli (``n = 1``) and Binomial(``n``) experts with the natural parameters ``(log(1 - p), log p)`` and
    ``T(z) = (n - z, z)``, as Categorical: a probability 0 or 1 is an exact ``-inf`` entry (torch's ``logits`` clamp
    it to about +-15.9 in float32, +-36 in float64, which gave the impossible outcome mass in every pool). Natural
    parameters are defined up to a common shift (the pools' combinations are not normalised); ``A`` normalises."""

    discrete = True

    def __init__(self, total_count: int):
        super().__init__(event_shape=(), param_shape=(2,))
        self.total_count = int(total_count)

    def _torch(self, validate_args, **param):
        return Bernoulli(**param, validate_args=validate_args)

    def params_from_distribution(self, dist):
        if not _probs_given(dist, binary=True):
            check_finite(f"{self.name} logits", dist.logits)
            logits = dist.logits
            log_sigmoid = torch.nn.functional.logsigmoid
            params = torch.stack((log_sigmoid(-logits), log_sigmoid(logits)), dim=-1)
            # the largest logit is how distribution() writes p = 0 or 1: read back as the exact -inf
            big = self._largest_logit(logits.dtype)
            return torch.where(torch.stack((logits >= big, logits <= -big), dim=-1), -math.inf, params)
        check_probabilities(f"{self.name} probs", dist.probs)
        probs = dist.probs
        below_one = probs < 1
        log_complement = torch.where(below_one, torch.log1p(-torch.where(below_one, probs, torch.zeros_like(probs))),
                                     -math.inf)
        return torch.stack((log_complement, safe_log(probs)), dim=-1)

    def _probabilities(self, natural):
        """``(1 - p, p)``, exact also where one of them is zero. An empty combination (``eta = (-inf, -inf)``: experts
        that rule out each other's outcomes, whose combination has Chernoff coefficient zero and so weight exactly
        zero in a pool) gets the placeholder ``(1/2, 1/2)`` rather than NaN, which the zero weight would not hide."""
        return torch.softmax(_without_empty(natural), dim=-1)

    def _largest_logit(self, dtype) -> float:
        """How ``distribution`` writes p = 0 or 1: a finite logit whose products with the counts (torch's Binomial
        log_prob multiplies it by ``n`` and by the value) stay finite, so they cannot make inf - inf."""
        return torch.finfo(dtype).max / (2 * (self.total_count + 1))

    def distribution(self, params, validate_args: bool = False):
        # logits, row by row: they keep the digits of a probability near 0 or 1 (float32 rounds sigmoid(20) to 1),
        # and p = 0 or 1 (an infinite logit, whose log_prob torch makes NaN) gets the largest logit n times which is
        # finite: its probs are exactly 0 or 1, the impossible outcome's log_prob about -1e38 in float32 rather than
        # -inf (the family's own log_prob, which the pools use, is exact); an empty combination gets the placeholder 0
        big = self._largest_logit(params.dtype)
        logits = torch.nan_to_num(params[..., 1] - params[..., 0], nan=0.0, posinf=big, neginf=-big)
        return self._torch(validate_args, logits=logits.clamp(-big, big))

    def log_normalizer(self, natural):
        return self.total_count * torch.logsumexp(natural, dim=-1)

    def natural_domain(self, natural):
        return torch.isfinite(torch.logsumexp(natural, dim=-1))

    def sufficient_statistic(self, value):
        if not value.is_floating_point():
            value = value.to(torch.get_default_dtype())
        return torch.stack((self.total_count - value, value), dim=-1)

    def log_prob(self, params, value):
        """``log q(value)``: ``-inf`` where the expert gives the value probability zero, never NaN (an entry of
        ``eta`` that is ``-inf`` enters only where its statistic is positive). In float64 (cast back): the binomial
        coefficient's log-gammas are about 1e7 at ``n = 1e6``, and float32 kept none of the result's digits (-7.31
        for -7.05)."""
        dtype = torch.promote_types(params.dtype, value.dtype) if value.is_floating_point() else params.dtype
        params, value = params.to(torch.float64), value.to(torch.float64)
        stat = self.sufficient_statistic(value)
        product = torch.where(stat != 0, params * stat, torch.zeros((), dtype=params.dtype, device=params.device))
        return (self.log_base_measure(value) + product.sum(-1) - self.log_normalizer(params)).to(dtype)

    def mean_parameters(self, natural):
        return self.total_count * self._probabilities(natural)

    def mean(self, params):
        return self.total_count * self._probabilities(params)[..., 1]

    def variance(self, params):
        # n p (1 - p) from both probabilities: 1 - p of a p near one keeps its digits
        probs = self._probabilities(params)
        return self.total_count * probs[..., 0] * probs[..., 1]

    def support_values(self, params):
        if self.total_count > 2 / torch.finfo(params.dtype).eps:  # consecutive integers stop being representable
            raise ValueError(f"{self.name} experts in {params.dtype} with total_count={self.total_count}: their support "
                             f"reaches beyond the integers {params.dtype} represents; use float64 experts")
        return _listed(torch.arange(self.total_count + 1, dtype=params.dtype, device=params.device), params)


class BernoulliFamily(_CountFamily):
    name = "Bernoulli"
    support_constraint = constraints.boolean

    def __init__(self):
        super().__init__(total_count=1)

    @classmethod
    def match(cls, dist):
        return cls() if type(dist) is Bernoulli else None

    def log_base_measure(self, value):
        return torch.zeros_like(value)


class BinomialFamily(_CountFamily):
    """Binomial experts sharing one ``total_count``."""

    name = "Binomial"

    def _key(self):
        return (self.total_count,)

    def _torch(self, validate_args, **param):
        return Binomial(self.total_count, **param, validate_args=validate_args)

    @property
    def support_constraint(self):
        return constraints.integer_interval(0, self.total_count)

    @classmethod
    def match(cls, dist):
        if type(dist) is not Binomial:
            return None
        counts = torch.as_tensor(dist.total_count)
        first = counts.flatten()[0]
        if not bool((counts == first).all()) or first != first.round() or first < 0:
            raise ValueError("Binomial experts must share one non-negative integer total_count, got "
                             f"total_count={counts.unique().tolist()}")
        return cls(int(first))

    def log_base_measure(self, value):
        n = self.total_count
        return torch.lgamma(torch.full_like(value, n + 1.0)) - torch.lgamma(value + 1) - torch.lgamma(n - value + 1)

    def base_measure_natural(self, natural):
        # the binomial coefficient is not exp(<c, T(z)>) for n > 1 (for n = 1 it is constant)
        return torch.zeros_like(natural) if self.total_count == 1 else None

    def log_prob(self, params, value):
        """In float64 (cast back), in Loader's form (as R's dbinom) for ``0 < z < n``: ``delta(n) - delta(z) -
        delta(n - z) - bd0(z, n p) - bd0(n - z, n (1 - p)) - log(2 pi z (n - z) / n) / 2``, terms of the size of
        the result; the binomial coefficient's log-gammas are of size ``n log n`` (float64 kept 3 digits at
        ``n = 1e12``: -14.5502 for -14.5494). At ``z = 0`` and ``n`` the exact ``n log(1 - p)``, ``n log p``."""
        if self.total_count < 2:
            return super().log_prob(params, value)
        dtype = torch.promote_types(params.dtype, value.dtype) if value.is_floating_point() else params.dtype
        params, value = params.to(torch.float64), value.to(torch.float64)
        edges = super().log_prob(params, value)  # (z = 0 or n, and values outside, as before)
        n = float(self.total_count)
        inside = (value > 0) & (value < n)
        z = torch.where(inside, value, 1.0)
        probs = self._probabilities(params)
        # (a probability of exactly 0 gives bd0 = inf: log p = -inf, as the edge form does)
        first, _ = _deviance(z, n * probs[..., 1], with_size=False)
        second, _ = _deviance(n - z, n * probs[..., 0], with_size=False)
        remainders = _stirling_remainder(torch.tensor(n, dtype=z.dtype, device=z.device))[0] - (
            _stirling_remainder(z)[0] + _stirling_remainder(n - z)[0])
        loader = remainders - first - second - 0.5 * (LOG_2PI + torch.log(z) + torch.log1p(-z / n))
        return torch.where(inside, loader, edges).to(dtype)


class CategoricalFamily(_LogProbabilityFamily):
    name = "Categorical"
    has_numeric_moments = False
    discrete = True

    def __init__(self, num_categories: int):
        super().__init__(event_shape=(), param_shape=(num_categories,))
        self.num_categories = num_categories

    def _key(self):
        return (self.num_categories,)

    @property
    def support_constraint(self):
        return constraints.integer_interval(0, self.num_categories - 1)

    @classmethod
    def match(cls, dist):
        return cls(dist.param_shape[-1]) if type(dist) is Categorical else None

    def params_from_distribution(self, dist):
        if not _probs_given(dist, binary=False):
            # -inf logits are categories of probability zero, as probs of 0 are (torch accepts both)
            check_log_probabilities("Categorical logits", dist.logits)
            return dist.logits
        check_probabilities("Categorical probs", dist.probs)
        # log(probs), -inf for a zero probability (torch's logits clamp it to about 1e-16, which would give the
        # category mass in every pool)
        return safe_log(dist.probs)

    def distribution(self, params, validate_args: bool = False):
        # (torch normalised an empty combination to NaN: the pool's mixture form scored and sampled NaN)
        return Categorical(logits=_without_empty(params), validate_args=validate_args)

    def log_normalizer(self, natural):
        return torch.logsumexp(natural, dim=-1)

    def natural_domain(self, natural):
        return torch.isfinite(self.log_normalizer(natural))

    def sufficient_statistic(self, value):
        return torch.nn.functional.one_hot(value.long(), self.num_categories).to(torch.get_default_dtype())

    def log_base_measure(self, value):
        return torch.zeros(value.shape, dtype=torch.get_default_dtype(), device=value.device)

    def log_prob(self, params, value):
        return self.distribution(params).log_prob(value)

    def mean_parameters(self, natural):
        return torch.softmax(natural, dim=-1)


    def support_values(self, params):
        return _listed(torch.arange(self.num_categories, device=params.device), params)
