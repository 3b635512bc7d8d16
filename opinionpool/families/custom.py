"""User-defined exponential families.

A user supplies the log-normaliser (a torch function of the natural parameters), the sufficient
statistic and the log base measure; mean parameters come from autograd of the log-normaliser and
their inverse from the damped Newton solve of the base class. Experts of such a family are
:class:`ExponentialFamilyDistribution` objects, accepted everywhere built-in experts are.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch.distributions import Distribution, constraints

from .._validation import check_finite, describe, validation_enabled
from .base import ExponentialFamily

__all__ = ["CustomFamily", "ExponentialFamilyDistribution"]


class CustomFamily(ExponentialFamily):
    """An exponential family defined by its log-normaliser.

    Args:
        log_normalizer: ``A(eta)``, maps ``(..., p)`` natural parameters to ``(...)``.
        sufficient_statistic: ``T(z)``, maps values ``(...) + event_shape`` to ``(..., p)``.
        log_base_measure: ``log h(z)``, maps values to ``(...)``.
        num_params: ``p``, the length of the natural parameter vector.
        event_shape: shape of one value ``z``.
        natural_domain: optional predicate on ``eta`` (boolean ``(...)``); by default, where ``A`` is finite.
        mean, variance: optional functions of ``eta`` giving the mean and variance of ``z``.
        sampler: optional ``(eta, sample_shape) -> samples``.
        support_interval: for a scalar continuous family, the interval ``(lower, upper)`` carrying the
            density; it lets the numerical engine integrate pools of these experts by quadrature.
        name: used in messages and ``repr``.
        base_measure_natural: the constant ``c`` (``p`` numbers) with ``log h(z) = <c, T(z)> + const``: zeros for a
            constant ``h``. Products of experts with weights not summing to one (``opinionpool.poe``) need it; by
            default ``h`` is taken as unknown and such products raise.
    """

    def __init__(self, log_normalizer: Callable, sufficient_statistic: Callable, log_base_measure: Callable,
                 num_params: int, event_shape=(), natural_domain: Callable | None = None,
                 mean: Callable | None = None, variance: Callable | None = None,
                 sampler: Callable | None = None, support_interval: tuple[float, float] | None = None,
                 name: str = "custom exponential family", base_measure_natural: Sequence[float] | None = None):
        if isinstance(num_params, bool) or not isinstance(num_params, numbers.Integral) or num_params < 1:
            raise ValueError(f"num_params must be a positive integer (the length of the natural parameter vector), "
                             f"got {num_params!r}")
        super().__init__(event_shape=event_shape, param_shape=(int(num_params),))
        self._log_normalizer = log_normalizer
        self._sufficient_statistic = sufficient_statistic
        self._log_base_measure = log_base_measure
        self._natural_domain = natural_domain
        self._mean = mean
        self._variance = variance
        self._sampler = sampler
        if support_interval is not None:
            if tuple(event_shape) != ():
                raise ValueError(f"support_interval is for scalar families, got event_shape={tuple(event_shape)}")
            lower, upper = (float(x) for x in support_interval)
            if not lower < upper:
                raise ValueError(f"support_interval must be (lower, upper) with lower < upper, got {support_interval!r}")
            self.support_interval = (lower, upper)
        self.name = name
        if base_measure_natural is not None:
            base_measure_natural = tuple(float(c) for c in base_measure_natural)
            if len(base_measure_natural) != num_params:
                raise ValueError(f"base_measure_natural must have num_params={num_params} entries, got "
                                 f"{base_measure_natural!r}")
        self._base_measure_natural = base_measure_natural
        self.has_numeric_moments = mean is not None
        #: without it the numerical engine integrates each expert's variance (mean and variance are independent)
        self.has_variance = variance is not None

    def _key(self):
        return (id(self),)

    def __repr__(self):
        return f"CustomFamily(name={self.name!r}, num_params={self.param_shape[0]})"

    def log_normalizer(self, natural):
        out = self._log_normalizer(natural)
        if not isinstance(out, torch.Tensor) or out.shape != natural.shape[:-1]:
            raise ValueError(f"{self.name}: log_normalizer must map natural parameters of shape "
                             f"{tuple(natural.shape)} to shape {tuple(natural.shape[:-1])}, got {_shape_of(out)}")
        return out

    def sufficient_statistic(self, value):
        out = self._sufficient_statistic(value)
        expected = value.shape[: value.dim() - len(self.event_shape)] + self.param_shape
        if not isinstance(out, torch.Tensor) or out.shape != expected:
            # (a statistic without its last axis broadcast against every value and summed them all, silently)
            raise ValueError(f"{self.name}: sufficient_statistic must map values of shape {tuple(value.shape)} to "
                             f"shape {tuple(expected)} (num_params={self.param_shape[0]} last), got {_shape_of(out)}")
        return out

    def log_base_measure(self, value):
        out = self._log_base_measure(value)
        batch = value.shape[: value.dim() - len(self.event_shape)]
        if not isinstance(out, torch.Tensor) or torch.broadcast_shapes(out.shape, batch) != batch:
            raise ValueError(f"{self.name}: log_base_measure must map values of shape {tuple(value.shape)} to shape "
                             f"{tuple(batch)} (or one that broadcasts to it), got {_shape_of(out)}")
        return out

    def log_prob(self, params, value):
        log_p = super().log_prob(params, value)
        if self.support_interval is None:
            return log_p
        # On a finite end of the support log h(z) and <eta, T(z)> can be infinite with opposite signs (an inverse
        # Gaussian at z = 0: NaN); the density there is its limit from inside, evaluated one ulp inside.
        ends = [end for end in self.support_interval if math.isfinite(end)]
        at_end = torch.zeros_like(value, dtype=torch.bool)
        for end in ends:
            at_end |= value == end
        indeterminate = torch.isnan(log_p) & at_end
        if not indeterminate.any():
            return log_p
        lower, upper = self.support_interval
        inward = torch.nextafter(value, torch.where(value == lower, upper, lower).to(value.dtype))
        return super().log_prob(params, torch.where(indeterminate, inward, value))

    def base_measure_natural(self, natural):
        if self._base_measure_natural is None:
            return None
        return torch.tensor(self._base_measure_natural, dtype=natural.dtype, device=natural.device).expand_as(natural)

    def natural_domain(self, natural):
        if self._natural_domain is not None:
            return self._natural_domain(natural)
        return super().natural_domain(natural)

    def expert(self, natural, validate_args=None) -> ExponentialFamilyDistribution:
        """An expert (a ``torch.distributions.Distribution``) with natural parameters ``natural``."""
        return ExponentialFamilyDistribution(self, natural, validate_args=validate_args)

    def distribution(self, params, validate_args: bool = False):
        return ExponentialFamilyDistribution(self, params, validate_args=validate_args)

    def mean(self, params):
        if self._mean is None:
            raise NotImplementedError(f"{self.name}: no `mean` function was given to CustomFamily")
        return self._mean(params)

    def variance(self, params):
        if self._variance is None:
            raise NotImplementedError(f"{self.name}: no `variance` function was given to CustomFamily")
        return self._variance(params)

    def sample(self, params, sample_shape=torch.Size()):
        if self._sampler is None:
            raise NotImplementedError(f"{self.name}: no `sampler` was given to CustomFamily")
        return self._sampler(params, torch.Size(sample_shape))


def _shape_of(out) -> str:
    return f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"


class ExponentialFamilyDistribution(Distribution):
    """A member of any :class:`ExponentialFamily`, as a ``torch.distributions.Distribution``.

    ``log_prob`` is ``log h(z) + <eta, T(z)> - A(eta)``; mean, variance and sampling are those the
    family provides.
    """

    arg_constraints = {"params": constraints.real_vector}
    has_rsample = False

    def __init__(self, family: ExponentialFamily, params: torch.Tensor, validate_args=None):
        if not (isinstance(params, torch.Tensor) and params.is_floating_point()):  # (integer parameters made
            # log_prob round the values it was asked about: 0.5 was read as 0)
            raise ValueError(f"params must be a floating-point tensor, got "
                             f"{params.dtype if isinstance(params, torch.Tensor) else type(params).__name__}")
        self.family = family
        self.params = params
        n = len(family.param_shape)
        if tuple(params.shape[params.dim() - n:]) != tuple(family.param_shape):
            raise ValueError(f"params must end in the family's parameter shape {tuple(family.param_shape)}, "
                             f"got shape {tuple(params.shape)}")
        self._checks_values = validation_enabled(validate_args)
        if self._checks_values:
            check_finite("params", params)
            family.check_params(params, "params")
        super().__init__(batch_shape=params.shape[: params.dim() - n], event_shape=family.event_shape,
                         validate_args=False)

    @property
    def support(self):
        return self.family.support_constraint

    @property
    def natural_params(self):
        return self.family.to_natural(self.params)

    def log_prob(self, value):
        """``log h(z) + <eta, T(z)> - A(eta)`` in the support; outside it a ``ValueError`` naming the value where the
        expert validates its arguments, else ``-inf`` (the formula alone extends the density past the support)."""
        value = torch.as_tensor(value, dtype=self.params.dtype, device=self.params.device)
        inside = self.family.in_support(value)
        if bool(inside.all()):
            return self.family.log_prob(self.params, value)
        if self._checks_values:
            raise ValueError(f"value must lie in the support of the {self.family.name} expert "
                             f"({self.family.support_constraint}), got {describe(value, ~inside)}")
        event = (...,) + (None,) * len(self.family.event_shape)
        log_p = self.family.log_prob(self.params, torch.where(inside[event], value, self.family.support_fill(value)))
        undefined = torch.isnan(value)  # NaN stays NaN, not -inf
        if self.family.event_shape:
            undefined = undefined.flatten(-len(self.family.event_shape)).any(-1)
        outside = torch.where(undefined, torch.nan, -torch.inf).to(log_p.dtype)
        return torch.where(inside, log_p, outside)

    @property
    def mean(self):
        return self.family.mean(self.params)

    @property
    def variance(self):
        return self.family.variance(self.params)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.family.sample(self.params, sample_shape)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ExponentialFamilyDistribution, _instance)
        batch_shape = torch.Size(batch_shape)
        new.family, new.params = self.family, self.params.expand(batch_shape + self.family.param_shape)
        new._checks_values = self._checks_values  # (the parameters were checked already)
        super(ExponentialFamilyDistribution, new).__init__(batch_shape, self.event_shape, validate_args=False)
        return new

    def __repr__(self):
        return f"ExponentialFamilyDistribution(family={self.family!r}, batch_shape={tuple(self.batch_shape)})"
