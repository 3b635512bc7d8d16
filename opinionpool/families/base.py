r"""The exponential-family interface every expert family implements.

A family is a set of densities :math:`q_\eta(z) = h(z)\exp(\eta^\top T(z) - A(\eta))` with fixed
structure (event shape, a Binomial ``total_count`` ...). Each expert is stored as a *parameter
tensor* of shape ``batch_shape + param_shape``; for most families that tensor is the natural
parameter :math:`\eta` itself, while Gaussian families store ``(loc, log variance)`` or
``(loc, precision)`` so that every pooling formula can be evaluated in log-space without the
catastrophic cancellations of :math:`A(\eta)` differences.

Everything pooling needs is derived from the log-normaliser:

* ``combine`` gives the *geometric* combination :math:`\prod_j q_j^{w_j}` of experts as a family
  member plus the log multi-expert Chernoff coefficient :math:`\log\int\prod_j q_j^{w_j}`;
* ``mean_parameters`` is :math:`\nabla A(\eta) = E[T(z)]` (autograd unless a family overrides it);
* ``natural_from_mean`` inverts it (closed form where one exists, otherwise damped Newton);
* ``moment_match`` projects a mixture of family members back onto the family (the M-projection,
  which matches :math:`E[T(z)]`).
"""

from __future__ import annotations

import functools
import math

import torch
from torch.distributions import biject_to, constraints, transform_to
from torch.distributions.transforms import AffineTransform, ComposeTransform, ExpTransform

from .._autograd import ImplicitSolution
from .bregman import _bregman_value

__all__ = ["ExponentialFamily"]


class _LessThanEq(constraints.less_than):
    """``z <= upper``: the closed half-line torch lacks (its ``less_than`` is open, and a support's finite end
    belongs to it, as ``greater_than_eq``'s and ``interval``'s do)."""

    def check(self, value):
        return value <= self.upper_bound


@biject_to.register(_LessThanEq)
@transform_to.register(_LessThanEq)
def _transform_to_less_than_eq(constraint):
    return ComposeTransform([ExpTransform(), AffineTransform(constraint.upper_bound, -1)])


def _expand_weights(log_weights: torch.Tensor, num_trailing: int) -> torch.Tensor:
    return log_weights.reshape(log_weights.shape + (1,) * num_trailing)


def safe_log(x: torch.Tensor) -> torch.Tensor:
    """``log(x)`` with ``-inf`` for ``x <= 0``, never evaluating ``log(0)`` (whose gradient would be infinite); NaN
    stays NaN (an unvalidated NaN weight read as -inf left its expert out of the pool, a finite result)."""
    positive = x > 0
    return torch.where(positive, torch.log(torch.where(positive, x, torch.ones_like(x))),
                       torch.where(torch.isnan(x), x, -math.inf))


def weighted_sum(log_weights: torch.Tensor, values: torch.Tensor, dim: int) -> torch.Tensor:
    """``sum_k exp(log_weights_k) * values_k`` over ``dim`` of ``values``.

    ``log_weights`` ends with the reduced dimension and broadcasts against ``values`` up to it;
    zero weights contribute exactly zero, even against infinite values.
    """
    dim = dim % values.dim()
    w = _expand_weights(log_weights.exp(), values.dim() - dim - 1)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    # a zero weight times an infinite value (a Categorical category of probability zero) contributes zero; a
    # positive one contributes the infinity itself, added apart: w * inf would give the weight the gradient
    # 0 * inf = NaN wherever nothing downstream depends on that entry
    finite = torch.isfinite(values)
    total = torch.where(w > 0, w * torch.where(finite, values, zero), zero).sum(dim)
    return total + torch.where((w > 0) & ~finite, w.detach() * values, zero).sum(dim)


class ExponentialFamily:
    """Base class of expert families. Subclasses describe one family with fixed structure."""

    name = "exponential family"
    #: whether the family has numeric moments (mean/variance of z), e.g. not Categorical
    has_numeric_moments = True
    #: whether z is a continuous vector whose covariance matrix is meaningful
    multivariate = False
    #: scalar continuous families: the interval carrying the density (used by 1-D quadrature)
    support_interval: tuple[float, float] | None = None
    #: whether z is discrete (the numerical engine then sums over ``support_values``)
    discrete = False
    #: whether the family is Gaussian (a pool is then moment-matched from its mean and covariance)
    gaussian = False
    #: whether z is an angle (mean and variance are then the circular ones, derived from E[T(z)] by
    #: ``moments_from_statistic``)
    circular = False
    #: whether the natural parameters are defined up to a common shift, ``A(eta + c) = A(eta) + c s`` with ``s`` the
    #: sum of the mean parameters (log-probabilities): the log-normaliser has no curvature along the shift
    shift_invariant = False
    #: whether the natural parameter space is the positive orthant (the concentrations of Beta and Dirichlet): the
    #: Newton inverse then steps in their logarithms, which never leave it
    positive_natural = False

    def __init__(self, event_shape=(), param_shape=(1,)):
        self.event_shape = torch.Size(event_shape)
        self.param_shape = torch.Size(param_shape)

    # ----------------------------------------------------------------- identity
    def _key(self) -> tuple:
        return ()

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash((type(self), self._key()))

    def __repr__(self) -> str:
        key = ", ".join(str(k) for k in self._key())
        return f"{type(self).__name__}({key})"

    # ------------------------------------------------------- natural structure
    def to_natural(self, params: torch.Tensor) -> torch.Tensor:
        """Natural parameters, flattened to ``batch_shape + (p,)``."""
        return params

    def from_natural(self, natural: torch.Tensor) -> torch.Tensor:
        return natural

    def log_normalizer(self, natural: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def splits_log_normalizer(self) -> bool:
        """Whether the log-normaliser is ``A = H + R`` with ``H`` homogeneous of degree one, whose Bregman divergence
        the family computes without cancellation (``homogeneous_divergence``), and ``R`` of the size of ``log eta``
        (``log_normalizer_remainder``). Where ``A`` is of the size of the parameters (Gamma, Beta and Dirichlet
        concentrations of 1e16: ``A`` about -1.4e16 for a KL divergence of 17), only the split keeps digits of
        divergences between experts far apart."""
        return type(self).homogeneous_divergence is not ExponentialFamily.homogeneous_divergence

    def homogeneous_divergence(self, eta_p: torch.Tensor, eta_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``H(q) - <q, grad H(p)>`` of ``splits_log_normalizer`` and the size of its terms."""
        raise NotImplementedError(f"{self.name} experts have no homogeneous split of their log-normaliser")

    def log_normalizer_remainder(self, natural: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``R = A - H`` of ``splits_log_normalizer`` and the size of its terms (its rounding is a few ulps of it)."""
        raise NotImplementedError(f"{self.name} experts have no homogeneous split of their log-normaliser")

    def sufficient_statistic(self, value: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log_base_measure(self, value: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def base_measure_natural(self, natural: torch.Tensor) -> torch.Tensor | None:
        """``c``, shaped like ``natural``, with ``h(z)`` proportional to ``exp(<c, T(z)>)``; ``None`` where the base
        measure is not of that form (Poisson's ``1 / z!``). A product of experts with weights summing to ``s`` has the
        base measure ``h^s``, hence the natural parameter ``sum_j w_j eta_j + (s - 1) c``; without a ``c`` it leaves
        the family unless ``s = 1``. By default ``h`` is constant."""
        return torch.zeros_like(natural)

    def natural_domain(self, natural: torch.Tensor) -> torch.Tensor:
        """Boolean mask of natural parameters inside the (open, convex) natural parameter space."""
        return torch.isfinite(self.log_normalizer(natural)) & torch.isfinite(natural).all(-1)

    def mean_parameters(self, natural: torch.Tensor) -> torch.Tensor:
        r""":math:`\nabla A(\eta) = E[T(z)]`, by automatic differentiation of the log-normaliser."""
        with torch.enable_grad():
            eta = natural if natural.requires_grad else natural.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(
                self.log_normalizer(eta).sum(), eta, create_graph=natural.requires_grad
            )
        return grad

    def natural_from_mean(self, mean_params: torch.Tensor, init: torch.Tensor | None = None,
                          tol: float | None = None, max_iter: int = 100) -> torch.Tensor:
        """Inverse of ``mean_parameters`` by damped Newton on the convex ``A(eta) - <eta, m>``.

        ``init`` must lie in the natural parameter space (pools start from the mixture-weighted
        average of their components' natural parameters, which does by convexity). The result is
        differentiable in ``mean_params`` through one final Newton step (implicit function theorem).
        """
        if init is None:
            raise ValueError(f"{self.name}: natural_from_mean needs an initial natural parameter `init`, got init=None")
        return newton_inverse(self, mean_params, init, tol=tol, max_iter=max_iter)

    # -------------------------------------------------------------- densities
    def _log_prob_terms(self, params: torch.Tensor, value: torch.Tensor):
        """``(log h(z), eta * T(z), A(eta))``, the terms of the default ``log_prob``; the products ``(..., p)``."""
        eta = self.to_natural(params)
        stat = self.sufficient_statistic(value)
        return self.log_base_measure(value), edge_product(eta, stat), self.log_normalizer(eta)

    def log_prob(self, params: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        log_h, product, log_normalizer = self._log_prob_terms(params, value)
        return log_h + product.sum(-1) - log_normalizer

    def log_prob_term_size(self, params: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The size of the terms ``log_prob`` adds at ``value`` (shaped like its result): its rounding is a few ulps of
        this, however small the sum (the quadrature of ``numerical`` counts it in its stated error). By default the
        terms of ``log h(z) + <eta, T(z)> - A(eta)``; a family whose ``log_prob`` is written in other terms says so.
        A term that is not finite counts 0: an infinite natural parameter (a Bernoulli of probability 0) with a zero
        statistic adds nothing (its product was NaN), and with another makes ``log_prob`` ``-inf``, which rounds to
        nothing."""
        log_h, product, log_normalizer = self._log_prob_terms(params, value)
        size = log_h.abs() + product.abs().nan_to_num(nan=0.0, posinf=0.0).sum(-1) + log_normalizer.abs()
        return torch.where(torch.isfinite(size), size, torch.zeros_like(size))

    @property
    def support_constraint(self) -> constraints.Constraint:
        """The values ``z`` can take, as a ``torch.distributions`` constraint (by default the closed
        ``support_interval``, or every real vector)."""
        if self.support_interval is not None:
            # torch's own constraint for an infinite end: an interval with one maps through an infinite affine
            # transform (transform_to gave NaN on the real line, inf on the half-line)
            lower, upper = self.support_interval
            if math.isinf(lower) and math.isinf(upper):
                return constraints.real
            if math.isinf(upper):
                return constraints.greater_than_eq(lower)  # (closed, as the interval was; nonnegative at 0)
            if math.isinf(lower):
                return _LessThanEq(upper)
            return constraints.interval(lower, upper)
        return constraints.independent(constraints.real, len(self.event_shape)) if self.event_shape else constraints.real

    def in_support(self, value: torch.Tensor) -> torch.Tensor:
        """Whether each value (``(...) + event_shape``) lies in the support: a boolean tensor of shape ``(...)``."""
        inside = self.support_constraint.check(value)
        extra = inside.dim() - (value.dim() - len(self.event_shape))
        return inside.flatten(-extra).all(-1) if extra > 0 else inside

    def support_fill(self, value: torch.Tensor) -> torch.Tensor:
        """A point of the support, shaped like ``value``, evaluated in place of values outside the support."""
        lower, upper = self.support_interval or (-math.inf, math.inf)
        if math.isfinite(lower) and math.isfinite(upper):
            point = 0.5 * (lower + upper)
        elif math.isfinite(lower) or math.isfinite(upper):
            point = lower + 1.0 if math.isfinite(lower) else upper - 1.0
        else:
            point = 0.0
        return torch.full_like(value, point)

    def distribution(self, params: torch.Tensor, validate_args: bool = False):
        """The ``torch.distributions`` object (or equivalent) for ``params``; with ``validate_args`` it checks
        its parameters and, in ``log_prob``, that values lie in its support."""
        raise NotImplementedError

    def params_from_distribution(self, dist) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def match(cls, dist) -> ExponentialFamily | None:
        """The family instance ``dist`` belongs to, or ``None``."""
        return None

    def check_params(self, params: torch.Tensor, name: str) -> None:
        """Raise ``ValueError`` naming ``name`` if some parameters are outside the family."""
        eta = self.to_natural(params)
        bad = ~self.natural_domain(eta)
        if bool(bad.any()):
            # the whole parameter vector of the first such expert: its first entry alone may be a valid one
            rows = eta.reshape(bad.shape + (-1,)).detach()
            first = tuple(int(i) for i in bad.nonzero()[0].tolist())
            shown = ", ".join(f"{v:.6g}" for v in rows[first].tolist())
            more = int(bad.sum()) - 1
            raise ValueError(f"{name}: natural parameters outside the {self.name} parameter space: [{shown}] at index "
                             f"{first}" + (f" (and {more} more)" if more else ""))

    def natural_difference(self, params_p: torch.Tensor, params_q: torch.Tensor) -> torch.Tensor | None:
        """``to_natural(params_q) - to_natural(params_p)`` where the family computes it more accurately than the
        difference of the rounded natural parameters (Poisson: ``log1p((r_q - r_p) / r_p)``); ``None`` where that
        difference serves."""
        return None

    def _log_normalizer_of_combination(self, combined: torch.Tensor) -> torch.Tensor:
        """``log_normalizer`` of a geometric combination's natural parameters (families whose combinations can be
        empty give it from a stand-in there)."""
        return self.log_normalizer(combined)

    # ---------------------------------------------------------------- pooling
    def combine(self, params: torch.Tensor, log_weights: torch.Tensor):
        r"""Geometric combinations of experts.

        ``params``: ``(..., C, S) + param_shape``, S experts per combination; ``log_weights``:
        ``(..., C, S)``, rows summing to one (``-inf`` for an unused slot). Returns the parameters of
        the normalised family member :math:`\propto \prod_s q_s^{w_s}`, shape
        ``(..., C) + param_shape``, and :math:`\log \int \prod_s q_s^{w_s}`, shape ``(..., C)``.
        """
        # float64 inside (as kl_divergence): log_c is a difference of log-normalisers of the size of the parameters
        # (a Poisson rate of 1e6), so in float32 nearly equal experts got coefficients above one (callers whose
        # weights sum to one pass them in float64: float32 weights sum to one only to 1e-7)
        dtype = params.dtype
        eta = self.to_natural(params.to(torch.float64))
        log_weights = log_weights.to(torch.float64)
        combined = weighted_sum(log_weights, eta, dim=-2)
        log_norm = self.log_normalizer(eta)
        combined_log_norm = self._log_normalizer_of_combination(combined)
        log_c = combined_log_norm - weighted_sum(log_weights, log_norm, dim=-1)
        # where that keeps under 8 digits (log-normalisers of the size of the parameters cancel: two Poisson experts
        # of rate 1e8, 1e-9 apart, gave log C = +1.6e-7, a coefficient above one), its value comes from
        # -sum_s w_s D_A(eta_s, combined) (the linear terms cancel where the weights sum to one), Bregman divergences
        # free of that cancellation; its gradient stays the direct form's
        with torch.no_grad():
            # with the terms of <combined, grad A(combined)>, the rounding of A's own terms: a Bernoulli's natural
            # parameters (log(1 - p), log p) have A = 0, so the log-normalisers alone put the scale of experts 1e-8
            # apart at 1e-16 and log C came out +1e-16 for -5e-17
            terms = combined * self.mean_parameters(combined)
            terms = torch.where(torch.isneginf(combined), torch.zeros((), dtype=terms.dtype, device=terms.device), terms)
            scale = (combined_log_norm.abs() + weighted_sum(log_weights, log_norm.abs(), dim=-1)
                     + terms.abs().flatten(combined.dim() - len(self.param_shape)).sum(-1))
            # families with a homogeneous split have closed-form divergences: kept to 13 digits, not 8 (Beta(1e8, 1e8)
            # beside Beta(2, 3) lost 1.7e-8 of 5.09)
            digits = 1e13 if self.splits_log_normalizer else 1e8
            risky = torch.isfinite(log_c) & (log_c.abs() < digits * torch.finfo(torch.float64).eps * scale)
        if bool(risky.any()):
            with torch.no_grad():
                shape = log_c.shape + log_weights.shape[-1:]  # params and weights broadcast against each other
                rows_eta, rows_log_w = eta.expand(shape + eta.shape[-1:])[risky], log_weights.expand(shape)[risky]
                rows_log_w = rows_log_w - torch.logsumexp(rows_log_w, -1, keepdim=True)
                centre = weighted_sum(rows_log_w, rows_eta, dim=-2)
                # each expert's offset from the centre as sum_t w_t (eta_s - eta_t), not eta_s less the rounded
                # centre, whose rounding (eps |eta|) the divergences squared: at the order a = 1e-12 of two Gamma
                # experts 1e-12 apart, log C -3.9e-32 for -1.5e-36. From the family's differences where it has them
                # (rates' logs of 1e15 rates 1e-9 apart lost 7e-6 of a Bhattacharyya coefficient)
                if type(self).natural_difference is not ExponentialFamily.natural_difference:
                    rows = params.to(torch.float64).expand(shape + params.shape[-1:])[risky]
                    pairwise = self.natural_difference(rows.unsqueeze(-2), rows.unsqueeze(-3))  # [t, s]: eta_s - eta_t
                else:
                    pairwise = rows_eta.unsqueeze(-3) - rows_eta.unsqueeze(-2)
                offsets = weighted_sum(rows_log_w, pairwise, dim=-3)
                # (the rounded centre's where an infinite parameter leaves no difference: a category of probability 0)
                offsets = torch.where(torch.isfinite(offsets), offsets, rows_eta - centre.unsqueeze(-2))
                divergence = _bregman_value(self, centre.unsqueeze(-2).expand(rows_eta.shape), rows_eta, strict=False,
                                            delta=offsets)[0]
                value = -weighted_sum(rows_log_w, divergence, dim=-1)
                accurate = torch.zeros_like(risky)
                accurate[risky] = torch.isfinite(value)  # (not where the experts rule each other out)
                values = torch.zeros_like(log_c)
                values[risky] = torch.where(torch.isfinite(value), value, 0.0)
            log_c = torch.where(accurate, values + (log_c - log_c.detach()), log_c)
        return self.from_natural(combined).to(dtype), log_c.to(dtype)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return self.distribution(params).mean

    def variance(self, params: torch.Tensor) -> torch.Tensor:
        return self.distribution(params).variance

    def _require_numeric_moments(self):
        if not self.has_numeric_moments:
            raise ValueError(f"{self.name} experts have no numeric mean or variance; "
                             "use moment_match() for the pooled distribution")

    def moments_from_statistic(self, expected_statistic: torch.Tensor, error: torch.Tensor):
        """``((mean, mean error), (variance, variance error))`` from ``E[T(z)]`` and its error, for families whose
        mean and variance are functions of ``E[T(z)]`` (``circular``); the numerical engine takes every other
        family's moments from its points directly."""
        raise NotImplementedError(f"{self.name} experts' mean and variance are not functions of E[T(z)]")

    def mixture_mean(self, log_pi: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Mean of the mixture with log-weights ``log_pi`` (``(..., C)``) and components ``params``."""
        self._require_numeric_moments()
        means = self.mean(params)
        return shifted_weighted_mean(log_pi, means, dim=log_pi.dim() - 1)

    def mixture_variance(self, log_pi: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Within-plus-between variance of the mixture, never E[z^2] - E[z]^2."""
        self._require_numeric_moments()
        k = log_pi.dim() - 1
        means = self.mean(params)
        mean = shifted_weighted_mean(log_pi, means, dim=k)
        dev = means - mean.unsqueeze(k)
        return weighted_sum(log_pi, self.variance(params) + dev * dev, dim=k)

    def mixture_covariance(self, log_pi: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{self.name} experts are not multivariate continuous; use mixture_variance")

    def moment_match(self, log_pi: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Parameters of the family member with the mixture's expected sufficient statistics (computed in float64
        whatever the dtype: a float32 Beta(1e-5, 0.5) has E[log(1 - z)] = -5e-5 as the difference of two digammas
        near -2, which float32 leaves 1.2 % off; and with the weights normalised again in float64: float32 weights
        sum to one only to about 1e-8, which two Gamma(1e6) experts' matched concentration amplified to 1e-3)."""
        k = log_pi.dim() - 1
        eta = self.to_natural(params.to(torch.float64))
        log_pi = log_pi.to(torch.float64)
        log_pi = log_pi - torch.logsumexp(log_pi, -1, keepdim=True)
        target = weighted_sum(log_pi, self.mean_parameters(eta), dim=k)
        init = weighted_sum(log_pi, eta, dim=k)
        return self.from_natural(self.natural_from_mean(target, init=init)).to(params.dtype)

    def sample(self, params: torch.Tensor, sample_shape=torch.Size()) -> torch.Tensor:
        return self.distribution(params).sample(sample_shape)

    def support_values(self, params: torch.Tensor):
        """Discrete families: the values ``(K,) + event_shape`` to sum over for experts ``params``,
        and a bound ``(batch)`` on ``sum_j E_j[(1 + |z|)^2; z not listed]`` (zero when nothing is left out)."""
        raise NotImplementedError(f"{self.name} experts are not discrete")


def shifted_weighted_mean(log_pi: torch.Tensor, values: torch.Tensor, dim: int) -> torch.Tensor:
    """``sum_k pi_k values_k`` over ``dim`` of ``values``, for log-weights ``(..., K)`` that end with that dim."""
    dim = dim % values.dim()
    return shifted_mean_along(_expand_weights(log_pi, values.dim() - dim - 1), values, dim)


def shifted_mean_along(log_w: torch.Tensor, values: torch.Tensor, dim: int) -> torch.Tensor:
    """``sum_k w_k values_k / sum_k w_k`` along ``dim``, computed around the entry of largest weight.

    ``log_w`` broadcasts against ``values``. Shifting by a reference value makes a single component
    (or identical components) come out bit-exact, whereas ``sum_k w_k v_k`` rounds through
    ``sum_k w_k != 1``.
    """
    reference = heaviest_along(log_w, values, dim)
    w = log_w.exp()
    return reference.squeeze(dim) + (w * (values - reference)).sum(dim) / w.sum(dim)


def heaviest_along(log_w: torch.Tensor, values: torch.Tensor, dim: int) -> torch.Tensor:
    """The entry of ``values`` of largest weight along ``dim`` (kept, of size one; ``log_w`` broadcasts against
    ``values``): the reference of sums computed as offsets. The first entry served before, and an expert of weight
    zero far away in that slot took the others' digits (a mean of 0.5 came out 0 beside one at 1e20). Ties go to
    the first. The choice carries no gradient; the sums do not depend on it. The argmax runs over ``log_w`` as
    given, not broadcast: weights shared over features cost one small reduction."""
    shape = torch.broadcast_shapes(log_w.shape, values.shape)
    dim = dim - values.dim() if dim >= 0 else dim  # from the right, where log_w and values are aligned
    index = log_w.detach().argmax(dim, keepdim=True)
    return values.expand(shape).gather(dim, index.expand(shape[:dim] + (1,) + shape[dim:][1:]))


#: the Newton inverse's last step is at most this fraction of each natural parameter
_STEP_TOLERANCE = 1e-10
#: the longest step in log eta of a Newton inverse over the positive orthant (a factor e^10 per iteration)
_MAX_LOG_STEP = 10.0


def edge_product(eta: torch.Tensor, stat: torch.Tensor) -> torch.Tensor:
    """``eta * T(z)`` where ``T(z)`` may be infinite at the edge of the support (``log z`` of a Beta at ``z = 0``):
    ``0 * inf = 0`` there, never NaN, and a non-zero parameter's term is ``+-inf`` with no gradient (the density is
    0 or infinite for every nearby parameter; carried through, the gradient ``T(z) = -inf`` met a zero incoming
    gradient and made it NaN). Elsewhere a zero parameter (a concentration of exactly 1, a VonMises loc of 0) keeps
    its gradient, the statistic."""
    infinite = ~torch.isfinite(stat)
    product = eta * torch.where(infinite, torch.zeros((), dtype=stat.dtype, device=stat.device), stat)
    return torch.where(infinite & (eta != 0), eta.detach() * stat, product)


def newton_inverse(family: ExponentialFamily, mean_params: torch.Tensor, init: torch.Tensor,
                   tol: float | None = None, max_iter: int = 100) -> torch.Tensor:
    """Solve ``family.mean_parameters(eta) = mean_params`` by damped (backtracking) Newton, in float64 whatever the
    dtype (a float32 solve stops at a residual of 2e-5, which left a Dirichlet's concentration 0.2 % off)."""
    if mean_params.dtype != torch.float64:
        wide = newton_inverse(family, mean_params.to(torch.float64), init.to(torch.float64), tol, max_iter)
        return wide.to(mean_params.dtype)
    target = mean_params.detach()
    shape = target.shape
    p = shape[-1]
    target = target.reshape(-1, p)
    eta = init.detach().expand(shape).reshape(-1, p).clone()
    if tol is None:
        tol = 1e-11

    def objective(x):
        # A evaluated at in-domain points only: outside, the first full step of a Beta of concentrations 1e5 landed
        # at -1e10, where the log-gammas' polygamma corrections take minutes per call
        inside = family.natural_domain(x)
        x = torch.where(inside.unsqueeze(-1), x, eta)
        value = family.log_normalizer(x) - (x * target).sum(-1)
        return torch.where(inside, value, torch.full_like(value, float("inf")))

    scale = target.abs().clamp_min(torch.finfo(target.dtype).tiny)  # a target of 0 (E[sin z] at loc 0)

    def relative_size(residual):
        return (residual / scale).nan_to_num(nan=math.inf).abs().amax(-1)

    def merit(x):
        """The residual relative to the target, where the objective's own rounding hides a decrease (A built from
        log-gammas of 1e7 rounds by 1e-9 beside a change of 1e-12: every step was refused)."""
        inside = family.natural_domain(x)
        value = relative_size(family.mean_parameters(torch.where(inside.unsqueeze(-1), x, eta)) - target)
        return torch.where(inside, value, torch.full_like(value, math.inf))

    residual = None
    for _ in range(max_iter):
        with torch.enable_grad():
            x = eta.requires_grad_(True)
            grad = family.mean_parameters(x)
            residual = grad - target
            jac = torch.stack([torch.autograd.grad(residual[:, i].sum(), x, retain_graph=True)[0]
                               for i in range(p)], dim=-2)
        residual = residual.detach()
        eta = eta.detach()
        # converged: every component's residual small beside its target, or the residual small beside the largest
        # target and every component's step beside the component (the residual beside the largest target alone let a
        # Dirichlet(0.5, 1e-17, 2e-17) stop with its first concentration at 0.15, not 0.56: the first mean parameter,
        # -4e-17, carries it, beside a second one of -1e17)
        converged = (residual.abs() <= tol * target.abs()).all(-1)
        if bool(converged.all()):
            break
        step = torch.linalg.solve(jac.detach(), residual.unsqueeze(-1)).squeeze(-1)
        settled = ((step.abs() <= _STEP_TOLERANCE * eta.abs()) | (eta == 0)).all(-1)
        if bool((converged | (settled & (residual.abs().amax(-1) <= tol * (1.0 + target.abs().amax(-1))))).all()):
            break
        f0, m0 = objective(eta), relative_size(residual)
        # the objective's rounding, about eps times its terms A and <eta, m> (f0 itself may be far smaller): a step
        # the merit accepts may raise the objective by that much, no more (a merit falling while the convex
        # objective rose let a von Mises solve climb from 3 to 1e88 until its Jacobian was singular)
        rounding = 1e-10 * (family.log_normalizer(eta).abs() + (eta * target).sum(-1).abs())
        slope = (residual * step).sum(-1)
        if family.positive_natural:
            # the same direction in log eta (the descent slope is unchanged), at most _MAX_LOG_STEP long: in eta, a
            # Beta concentration of 5e5 whose target is 1e-9 got a step of 1e26, which 60 halvings left outside
            log_step = step / eta
            shrink = (_MAX_LOG_STEP / log_step.abs().amax(-1)).clamp(max=1.0)
            log_step, slope = log_step * shrink.unsqueeze(-1), slope * shrink
        t = torch.ones(eta.shape[0], dtype=eta.dtype, device=eta.device)
        for _ in range(60):
            if family.positive_natural:
                candidate = eta * torch.exp(-t.unsqueeze(-1) * log_step)
            else:
                candidate = eta - t.unsqueeze(-1) * step
            value = objective(candidate)
            accepted = ((value <= f0 - 1e-4 * t * slope + 1e-12 * f0.abs())
                        | (torch.isfinite(m0) & (merit(candidate) <= (1 - 1e-4 * t) * m0) & (value <= f0 + rounding)))
            if bool(accepted.all()):
                break
            t = torch.where(accepted, t, t / 2)
        eta = torch.where(accepted.unsqueeze(-1), candidate, eta)
    else:
        worst = residual.abs().amax(-1).max().item() if residual is not None else float("nan")
        raise RuntimeError(f"{family.name}: mean-to-natural Newton solve did not converge in {max_iter} "
                           f"iterations (largest residual {worst:.3g})")
    # one more full step from the converged point, kept where it lowers the residual: convergence is quadratic, so
    # it takes the digits the tolerance leaves (a VonMises concentration stopped 4e-11 relative off)
    step, info = torch.linalg.solve_ex(jac.detach(), residual.unsqueeze(-1))
    polished = eta - step.squeeze(-1)
    better = (info == 0) & torch.isfinite(polished).all(-1) & (merit(polished) < relative_size(residual))
    eta = torch.where(better.unsqueeze(-1), polished, eta)
    if not mean_params.requires_grad:
        return eta.reshape(shape)
    # d eta / d m = (Hessian of A)^-1, by the implicit function theorem (twice differentiable)
    return ImplicitSolution.apply(mean_params.reshape(-1, p), eta, functools.partial(_mean_map_vjp, family)).reshape(
        shape)


def _mean_map_vjp(family: ExponentialFamily, eta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``H(eta)^-1 grad`` (``H`` the Hessian of ``A``, symmetric), ``(n, p)``: the mean map's inverse's
    vector-Jacobian product, differentiable in ``eta`` and ``grad`` where a graph is recorded."""
    create = torch.is_grad_enabled()  # (in a backward pass: create_graph=True)
    with torch.enable_grad():
        x = eta if create and eta.requires_grad else eta.detach().requires_grad_(True)
        mean = family.mean_parameters(x)
        hessian = torch.stack([torch.autograd.grad(mean[:, i].sum(), x, retain_graph=True, create_graph=create)[0]
                               for i in range(eta.shape[-1])], dim=-2)
    if not create:
        hessian = hessian.detach()
    return torch.linalg.solve(hessian, grad.unsqueeze(-1)).squeeze(-1)
