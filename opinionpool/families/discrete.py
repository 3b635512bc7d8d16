"""Discrete families; every one has a closed-form inverse mean map.

=============  =================  ============  ====================  ==================
family         natural eta        T(z)          A(eta)                log h(z)
=============  =================  ============  ====================  ==================
Poisson        log rate           z             exp(eta)              -lgamma(z + 1)
Bernoulli      logit              z             softplus(eta)         0
Binomial(n)    logit              z             n softplus(eta)       log C(n, z)
Categorical    log-probabilities  one-hot(z)    logsumexp(eta)        0
=============  =================  ============  ====================  ==================

Categorical uses the (non-minimal) normalised log-probabilities as natural parameters; the
inverse mean map picks the representative with ``logsumexp(eta) = 0``.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Bernoulli, Binomial, Categorical, Poisson, constraints

from .._validation import check_finite, check_positive, check_probabilities
from .base import ExponentialFamily

__all__ = ["PoissonFamily", "BernoulliFamily", "BinomialFamily", "CategoricalFamily"]


def _listed(values: torch.Tensor, params: torch.Tensor, param_dims: int = 1):
    """Support values that leave nothing out: the bound is zero for every expert batch."""
    batch = params.shape[: params.dim() - param_dims - 1]
    return values, torch.zeros(batch, dtype=params.dtype, device=params.device)


class PoissonFamily(ExponentialFamily):
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

    def distribution(self, params, validate_args: bool = False):
        return Poisson(params[..., 0], validate_args=validate_args)

    def log_normalizer(self, natural):
        return torch.exp(natural[..., 0])

    def sufficient_statistic(self, value):
        return value.unsqueeze(-1)

    def log_base_measure(self, value):
        return -torch.lgamma(value + 1)

    def mean_parameters(self, natural):
        return torch.exp(natural)

    def natural_from_mean(self, mean_params, init=None, tol=None, max_iter=100):
        return torch.log(mean_params)

    def support_values(self, params):
        rate = params[..., 0]  # (batch, M)
        largest = float(rate.max())
        last = math.ceil(largest + 50 * math.sqrt(largest) + 80)
        # E[(1+z)^2; z > K] = P(z > K) + 3 r P(z >= K) + r^2 P(z >= K - 1) <= (1 + 3r + r^2) P(z >= K - 1)
        tail = torch.special.gammainc(torch.full_like(rate, last - 1.0), rate)
        bound = ((1 + 3 * rate + rate * rate) * tail).sum(-1)
        return torch.arange(last + 1, dtype=params.dtype, device=params.device), bound


class BernoulliFamily(ExponentialFamily):
    name = "Bernoulli"
    discrete = True
    support_constraint = constraints.boolean

    def __init__(self):
        super().__init__(event_shape=(), param_shape=(1,))

    @classmethod
    def match(cls, dist):
        return cls() if type(dist) is Bernoulli else None

    def params_from_distribution(self, dist):
        if "logits" in dist.__dict__:
            check_finite("Bernoulli logits", dist.logits)
        else:
            check_probabilities("Bernoulli probs", dist.probs)
        return dist.logits.unsqueeze(-1)

    def distribution(self, params, validate_args: bool = False):
        return Bernoulli(logits=params[..., 0], validate_args=validate_args)

    def log_normalizer(self, natural):
        return torch.nn.functional.softplus(natural[..., 0])

    def sufficient_statistic(self, value):
        return value.unsqueeze(-1)

    def log_base_measure(self, value):
        return torch.zeros_like(value)

    def mean_parameters(self, natural):
        return torch.sigmoid(natural)

    def natural_from_mean(self, mean_params, init=None, tol=None, max_iter=100):
        return torch.logit(mean_params)

    def support_values(self, params):
        return _listed(torch.arange(2, dtype=params.dtype, device=params.device), params)


class BinomialFamily(ExponentialFamily):
    """Binomial experts sharing one ``total_count``."""

    name = "Binomial"
    discrete = True

    def __init__(self, total_count: int):
        super().__init__(event_shape=(), param_shape=(1,))
        self.total_count = int(total_count)

    def _key(self):
        return (self.total_count,)

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

    def params_from_distribution(self, dist):
        if "logits" in dist.__dict__:
            check_finite("Binomial logits", dist.logits)
        else:
            check_probabilities("Binomial probs", dist.probs)
        return dist.logits.unsqueeze(-1)

    def distribution(self, params, validate_args: bool = False):
        return Binomial(self.total_count, logits=params[..., 0], validate_args=validate_args)

    def log_normalizer(self, natural):
        return self.total_count * torch.nn.functional.softplus(natural[..., 0])

    def sufficient_statistic(self, value):
        return value.unsqueeze(-1)

    def log_base_measure(self, value):
        n = self.total_count
        return torch.lgamma(torch.full_like(value, n + 1.0)) - torch.lgamma(value + 1) - torch.lgamma(n - value + 1)

    def mean_parameters(self, natural):
        return self.total_count * torch.sigmoid(natural)

    def natural_from_mean(self, mean_params, init=None, tol=None, max_iter=100):
        return torch.logit(mean_params / self.total_count)

    def support_values(self, params):
        return _listed(torch.arange(self.total_count + 1, dtype=params.dtype, device=params.device), params)


class CategoricalFamily(ExponentialFamily):
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
        # which parameter the user gave (both are cached in __dict__ once read)
        if dist.__dict__.get("probs") is not getattr(dist, "_param", None):
            check_finite("Categorical logits", dist.logits)
            return dist.logits
        check_probabilities("Categorical probs", dist.probs)
        # log(probs), -inf for a zero probability (torch's logits clamp it to about 1e-16, which would give the
        # category mass in every pool); log(0) itself is never evaluated, so gradients stay finite
        probs = dist.probs
        positive = probs > 0
        return torch.where(positive, torch.log(torch.where(positive, probs, torch.ones_like(probs))), -math.inf)

    def distribution(self, params, validate_args: bool = False):
        return Categorical(logits=params, validate_args=validate_args)

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

    def natural_from_mean(self, mean_params, init=None, tol=None, max_iter=100):
        return torch.log(mean_params / mean_params.sum(-1, keepdim=True))

    def support_values(self, params):
        return _listed(torch.arange(self.num_categories, device=params.device), params)
