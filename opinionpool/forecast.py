r"""The forecaster's toolkit: scoring, calibration, disagreement and fitted pooling weights for scalar events.

A forecast here is a distribution (a pool, or any ``torch.distributions`` object) with one batch axis of forecast
occasions; ``experts`` are given as the pools take them (a list of distributions, or one distribution whose rightmost
batch dimension indexes the experts), with the occasions on the batch axes before the experts' axis.

* :func:`crps`: the continuous ranked probability score :math:`\int (F(x) - 1\{x \ge y\})^2\,dx` (lower is better);
  closed form for Normal forecasts and Gaussian mixtures (exact Hölder pools of Normal experts, ``MixtureSameFamily``
  of Normals; Grimit et al. 2006, "The continuous ranked probability score for circular variables and its
  application to mesoscale forecast ensemble verification"), otherwise by quadrature of the density.
* :func:`pit` and :func:`coverage`: probability integral transforms and a table of central-interval coverage
  (angles, for circular forecasts such as VonMises, on the period ``[-pi, pi)``).
* :func:`disagreement`: pairwise Bhattacharyya and Hellinger matrices and the share of the ``alpha = 1/2`` pool's
  mass in its pairwise components.
* :func:`fit_weights`: simplex weights (and optionally alpha) maximising the mean log score.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributions import (
    AffineTransform,
    Distribution,
    Independent,
    MixtureSameFamily,
    Normal,
    TransformedDistribution,
    VonMises,
    constraints,
)

from ._validation import check_alpha, check_positive_int, describe, real_tensor, validation_enabled
from .affinities import hellinger_of, log_multi_chernoff_coefficient
from .experts import Experts, as_experts
from .families import NormalFamily, family_of
from .numerical import DEFAULT_RTOL, _interior_point
from .pool import (
    HolderPool,
    NumericalHolderPool,
    _Pool,
    _rebuilt,
    _working_dtype,
    check_batches_broadcast,
    holder,
    normalized_log_weights,
)

__all__ = ["crps", "pit", "coverage", "CoverageTable", "disagreement", "Disagreement", "fit_weights", "FitResult"]

#: panels and Gauss-Legendre nodes per panel of the density quadrature behind the numerical CRPS and PIT
_PANELS, _NODES = 128, 16
#: the quadrature covers mean +- this many standard deviations (and the observation)
_WIDTH = 12.0
#: or, for forecasts with an icdf, the quantiles of log-odds +- this (levels 1e-13 and 1 - 1e-13)
_LOG_ODDS = 30.0
#: a total mass off 1 by more than this (or 100 rounding units of a float32 forecast's density) warns that the panels
#: missed part of the density
_MASS_TOLERANCE = 1e-6
#: the panels beyond the equal ones towards an infinite end: their far edges, in units of the equal ones' span
_TAIL_STEPS = torch.tensor([(2.0**k - 1) / 16 for k in range(1, 13)], dtype=torch.float64)
#: a MixtureSameFamily of at most this many components (with an icdf and a cdf) gets every component's quantile
#: panels; beyond, the nodes (every component evaluated at each, two ends kept per component) cost as the square of
#: the count (300 LogNormals: 7 times the equal panels' time, which are as accurate for light tails), and only a
#: mixture without a finite mean, for which equal panels cannot be placed, gets them
_QUANTILE_PANEL_COMPONENTS = 64
#: equal panels over each component's (a pool's expert's, a mixture's component's) mean +- ``_WIDTH`` standard
#: deviations, beside the forecast's own equal panels: a narrow component far from the mean fell between the
#: nodes of panels as wide as the forecast's spread
_COMPONENT_PANELS = 32
#: elements per block of the temporaries over components (a mixture's log density at every node, its tails' pairs)
_BLOCK_ELEMENTS = 2**22
#: a panel on one side of 0 whose ends' magnitudes are at least this ratio apart places its nodes in log |x|
_LOG_PANEL_RATIO = 4.0
#: ... unless its log density changes by at most this much between the panel's outermost nodes in x: flat there,
#: it is smooth in x (a density regular at 0), not a power law
_FLAT_LOG_DENSITY = 1.0
#: how far each panel next to a finite end of the support reaches down in the log of the distance to it
_LADDER_STEPS = torch.tensor([0.0] + [2.0**k for k in range(10)], dtype=torch.float64)
#: beyond the lowest of those panels, a numerical pool's mass by the power law of the panel above if below this,
#: else by its cdf (a pool of Gamma experts of shapes 0.002 and 0.02 has 0.075 there; the power law missed 6e-5)
_EXTRAPOLATED_MASS = 1e-9


# ------------------------------------------------------------------------------------------------ input checks
def _check_distribution(name: str, dist) -> None:
    if not isinstance(dist, Distribution):
        raise TypeError(f"{name} must be a torch.distributions.Distribution (a pool or a forecast), got "
                        f"{type(dist).__name__}")
    discrete = _discrete(dist)
    if dist.event_shape != torch.Size() or discrete:
        raise ValueError(f"{name} must be a continuous distribution of scalar events, got {type(dist).__name__} with "
                         f"event_shape {tuple(dist.event_shape)}{' and a discrete support' if discrete else ''}")


def _discrete(dist: Distribution) -> bool:
    """Whether ``dist`` has a discrete support: a pool's family's, else its own, else (torch gives a
    TransformedDistribution the real line as support whatever its base) its base distribution's."""
    if isinstance(dist, _Pool):
        return dist.family.discrete
    if isinstance(dist, (TransformedDistribution, Independent)) and _discrete(dist.base_dist):
        return True
    return bool(getattr(dist.support, "is_discrete", False))


def _circular(dist: Distribution) -> bool:
    """Whether ``dist`` is a forecast of angles (its family is ``circular``, as VonMises is)."""
    if isinstance(dist, _Pool):
        return dist.family.circular
    if isinstance(dist, MixtureSameFamily):
        return _circular(dist.component_distribution)
    try:
        return family_of(dist).circular
    except ValueError:  # not one of the library's families: a distribution on the real line
        return False


def _observations(observations, batch_shape: torch.Size, dtype) -> torch.Tensor:
    """``observations`` as a finite real tensor broadcasting against ``batch_shape`` (its shape kept for errors), in
    the forecast's ``dtype`` or the observations' own floating dtype where that is wider: a float64 observation of a
    float32 forecast keeps its digits (rounded to float32, 1e6 + 0.002 was 1e6, a PIT of 0.5 instead of 0.977 under
    N(1e6, 1e-3))."""
    if not isinstance(observations, (torch.Tensor, np.ndarray, list, tuple, numbers.Real)) \
            or isinstance(observations, (bool, np.bool_)):
        raise TypeError(f"observations must be a tensor of real numbers, got {type(observations).__name__}")
    y = real_tensor("observations", observations)
    if not (y.is_floating_point() or y.dtype in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)):
        raise TypeError(f"observations must be real numbers, got a tensor of dtype {y.dtype}")
    y = y.to(torch.promote_types(dtype, y.dtype) if y.is_floating_point() else dtype)
    bad = ~torch.isfinite(y)
    if bool(bad.any()):
        raise ValueError(f"observations must be finite, got {describe(y, bad)}")
    try:
        torch.broadcast_shapes(y.shape, batch_shape)
    except RuntimeError:
        raise ValueError(f"observations of shape {tuple(y.shape)} do not broadcast against the forecasts' batch_shape "
                         f"{tuple(batch_shape)}") from None
    return y


def _dtype(dist: Distribution) -> torch.dtype:
    """The forecast's floating dtype: a pool's experts', else its mean's, else (a ``TransformedDistribution`` has no
    mean) its first floating parameter's."""
    if isinstance(dist, _Pool):
        return dist.experts.params.dtype
    with contextlib.suppress(NotImplementedError):
        return dist.mean.dtype
    for value in vars(dist).values():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.dtype
    if isinstance(dist, (TransformedDistribution, Independent)):
        return _dtype(dist.base_dist)
    if isinstance(dist, MixtureSameFamily):
        return _dtype(dist.component_distribution)
    return torch.get_default_dtype()


def _implements(dist: Distribution, method: str) -> bool:
    """Whether ``dist`` has a ``method`` of its own: a TransformedDistribution's ``cdf`` and ``icdf`` are its
    base's (a mirrored Beta's cdf raised ``NotImplementedError``)."""
    own = getattr(type(dist), method)
    if own is getattr(Distribution, method):
        return False
    if method in ("cdf", "icdf") and own is getattr(TransformedDistribution, method):
        return _implements(dist.base_dist, method)
    return True


# --------------------------------------------------------------------------------------------------------- CRPS
def _gaussian_mixture(dist: Distribution):
    """``(weights, locs, scales)`` with components on the last axis if ``dist`` is a Gaussian mixture, else None."""
    if isinstance(dist, Normal):
        return torch.ones_like(dist.loc).unsqueeze(-1), dist.loc.unsqueeze(-1), dist.scale.unsqueeze(-1)
    if isinstance(dist, HolderPool) and isinstance(dist.family, NormalFamily):
        loc, logvar = dist.family.split(dist.component_params)
        return dist.mixture_weights, loc, torch.exp(0.5 * logvar)
    if isinstance(dist, MixtureSameFamily) and type(dist.component_distribution) is Normal:
        components = dist.component_distribution
        return dist.mixture_distribution.probs, components.loc, components.scale
    return None


def _a(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    r""":math:`E|X|` for :math:`X \sim N(m, s^2)`: :math:`m(2\Phi(m/s) - 1) + 2s\varphi(m/s)`, which is ``|m|``
    (to ``exp(-800)``) where ``|m| > 40 s``: taken as such there, so ``m / s`` never overflows (a float32 scale of
    1e-20 and ``m`` of 1e20 made its gradient NaN)."""
    far = m.abs() > 40 * s
    z = torch.where(far, 0.0, m) / s
    near = m * torch.erf(z / math.sqrt(2)) + 2 * s * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return torch.where(far, m.abs(), near)


def _mixture_crps(weights, locs, scales, y):
    r"""Grimit et al. (2006): :math:`\sum_i w_i A(y - \mu_i, \sigma_i^2) - \frac12\sum_{ij} w_i w_j
    A(\mu_i - \mu_j, \sigma_i^2 + \sigma_j^2)` with :math:`A` the mean absolute value of a Normal."""
    # hypot: the squared scales under- or overflow (a float32 scale of 1e-25 gave 0 / 0, one of 1e30 inf - inf)
    spread = _a(locs.unsqueeze(-1) - locs.unsqueeze(-2), torch.hypot(scales.unsqueeze(-1), scales.unsqueeze(-2)))
    pairs = (weights.unsqueeze(-1) * weights.unsqueeze(-2) * spread).sum((-1, -2))
    return (weights * _a(y.unsqueeze(-1) - locs, scales)).sum(-1) - 0.5 * pairs


@torch.no_grad()
def _integration_matrix():
    """Gauss-Legendre nodes ``t`` and weights on [-1, 1] and ``S`` with ``S @ f(t) = (int_{-1}^{t_i} f)_i``, exact
    for polynomials of degree below the number of nodes (integrating the interpolating polynomial)."""
    t, w = np.polynomial.legendre.leggauss(_NODES)
    vander = np.polynomial.legendre.legvander(t, _NODES - 1)
    antiderivative = np.stack([np.polynomial.legendre.legval(t, np.polynomial.legendre.legint(np.eye(_NODES)[m],
                                                                                           lbnd=-1))
                               for m in range(_NODES)], axis=1)
    return (torch.from_numpy(x) for x in (t, w, antiderivative @ np.linalg.inv(vander)))


def _affine_maps(dist: Distribution):
    """``[(loc, scale), ...]`` in float64 of a TransformedDistribution of affine maps only (torch gives it the real
    line as support and no mean), else None."""
    if type(dist) is not TransformedDistribution or not all(isinstance(t, AffineTransform) for t in dist.transforms):
        return None
    return [tuple(torch.as_tensor(v).detach().to(torch.float64) for v in (t.loc, t.scale)) for t in dist.transforms]


def _support(dist: Distribution):
    """float64 ``(lower, upper)`` bounds of the support, tensors broadcasting against ``batch_shape`` (a Uniform's
    depend on its batched parameters)."""
    maps = _affine_maps(dist)
    if maps is not None:  # the image of its base's (a mirrored Gamma's density was evaluated above 0)
        lower, upper = _support(dist.base_dist)
        for loc, scale in maps:
            ends = [torch.where(scale == 0, loc, loc + scale * end) for end in (lower, upper)]
            lower, upper = torch.minimum(*ends), torch.maximum(*ends)
        return lower, upper
    support = dist.support
    # a MixtureSameFamily's support wraps its components' (it had no bounds, and points below a mixture of
    # LogNormals' 0 failed its validation): the widest of theirs
    mixed = isinstance(support, constraints.MixtureSameFamilyConstraint)
    support = support.base_constraint if mixed else support
    lower, upper = (torch.as_tensor(getattr(support, name, default)).detach().to(torch.float64)
                    for name, default in (("lower_bound", -math.inf), ("upper_bound", math.inf)))
    if mixed:  # bounds batched like the components reach over the component axis
        lower, upper = (bound if bound.dim() == 0 else reduce(-1)
                        for bound, reduce in ((lower, lower.amin), (upper, upper.amax)))
    return lower, upper


@torch.no_grad()
def _in_float64(dist: Distribution) -> Distribution:
    """A torch forecast of a lower floating dtype as a float64 copy of itself (``pool._rebuilt``: its parameters
    are the same numbers, so it is the same distribution without the lower dtype's rounding in its density,
    quantiles and moments); a pool, a float64 forecast, and one whose copy still computes in a lower dtype or
    cannot be made, as they are. The float32 LogNormal(0, 6)'s CRPS was 1.3e-4 off from its own density's
    rounding; torch's float32 VonMises variance rounds to 0 from a concentration of about 5e3, and its float32
    density ``kappa (cos(z - loc) - 1)`` loses kappa times float32's rounding (the PIT at the mean of a
    concentration 1e6 came out 0.57)."""
    if isinstance(dist, _Pool) or _working_dtype(dist, torch.float64) == torch.float64:
        return dist
    if isinstance(dist, VonMises):
        return VonMises(dist.loc.double(), dist.concentration.double(), validate_args=False)
    try:
        twin = _rebuilt(dist, lambda t: t.double() if t.is_floating_point() else t)
        if _working_dtype(twin, torch.float64) != torch.float64:
            return dist
        # the copy converts the tensors of the distributions and transforms it is built from, not those of other
        # objects it holds (a float32 torch Module's weights, which float64 points would meet): its density at a
        # point inside the support must come out in float64, or the forecast stays as it is
        probe = _interior_point(*_support(twin)).expand(twin.batch_shape)
        with _without_validation(twin):  # a mixture's support has no bounds to find its inside by
            dtype = twin.log_prob(probe).dtype
        if dtype != torch.float64:
            return dist
    except (RuntimeError, TypeError, ValueError, AttributeError, NotImplementedError):
        return dist
    return twin


def _mean_and_sd(dist: Distribution) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 mean and standard deviation (a float32 VonMises's from the float64 one; a TransformedDistribution
    of affine maps, which torch gives none, from its base's)."""
    dist = _in_float64(dist)
    try:
        maps = _affine_maps(dist)
        if maps is not None:
            mean, sd = _mean_and_sd(dist.base_dist)
            for loc, scale in maps:
                mean, sd = loc + scale * mean, scale.abs() * sd
            return mean, sd
        return dist.mean.detach().to(torch.float64), dist.stddev.detach().to(torch.float64)
    except NotImplementedError:
        raise ValueError(f"the forecast ({type(dist).__name__}) implements neither icdf nor mean and stddev, which "
                         "the quadrature needs to place its panels") from None


def _quantile_levels(dtype: torch.dtype) -> torch.Tensor:
    """The levels of quantile panels' edges in ``dtype``: the logistic of ``_PANELS + 1`` equally spaced log-odds
    from ``-_LOG_ODDS`` to ``_LOG_ODDS``, fewer where ``1 -`` the top level would not be representable."""
    reach = min(_LOG_ODDS, -math.log(4 * torch.finfo(dtype).eps))
    return torch.sigmoid(torch.linspace(-reach, reach, _PANELS + 1, dtype=torch.float64)).to(dtype)


def _component_quantile_edges(dist: MixtureSameFamily, shape: torch.Size, lower: torch.Tensor, upper: torch.Tensor):
    """``(edges, tails)`` of a ``MixtureSameFamily`` whose components have an ``icdf`` and a ``cdf``: every
    component's quantile panel edges, merged in order (each component's panels follow its own skew and tails, and
    a component's finite ends, where the mixture's density jumps, fall within 1e-13 of its mass of an edge), and
    ``tails`` as in :func:`_panel_edges`: each component's tail law from its own two outermost levels, exact (the
    mixture's levels at the two outermost merged edges, from cdfs rounded near 1 at edges of different components
    that may lie a float apart, made Laplaces 10 apart with weights 0.999 and 0.001 score inf), and the mixture's
    ``F`` at the first edge and ``1 - F`` at the last summed from those laws (from the components' cdfs for a
    component whose law does not apply). Beyond four components every component keeps its two ends, its median and every
    ``ceil(count / 4)``-th level, staggered across the components (component ``j`` the levels congruent to ``j``
    modulo that step), so that the panels stay at most about four times a single distribution's plus two per
    component, and components alike still share every level between them (the same levels for all put twenty
    Laplaces 0.01 apart on panels at 11 levels, 9e-4 off). None where an edge is not finite."""
    components = dist.component_distribution
    count = components.batch_shape[-1]
    levels = _quantile_levels(_dtype(dist))
    index, step = torch.arange(len(levels)), -(-count // 4)
    # (and its median, where a Laplace's density has its kink: five Laplaces were 6e-6 off without it)
    kept = ((index % step == torch.arange(count).unsqueeze(-1) % step) | (index == 0) | (index == len(levels) - 1)
            | (index == len(levels) // 2))
    probe = levels.reshape((-1,) + (1,) * (len(shape) + 1)).expand((-1,) + shape + (count,))
    points = components.icdf(probe).detach().to(torch.float64).movedim(0, -1)  # shape + (count, levels)
    points = torch.maximum(torch.minimum(points, upper.unsqueeze(-1).unsqueeze(-1)), lower.unsqueeze(-1).unsqueeze(-1))
    if not bool(torch.isfinite(points).all()):
        return None
    edges = torch.sort(points[..., kept], dim=-1).values  # shape + (kept levels of all components,)
    # F at the lowest and highest edges, summed over the components, each 0 below and 1 above its own support (with
    # validation off, a Pareto's cdf is negative below its scale)
    outer = torch.stack((edges[..., 0], edges[..., -1])).unsqueeze(-1)
    low, high = _support(components)
    with _without_validation(components):
        parts = components.cdf(outer.to(_dtype(dist))).detach().to(torch.float64).clamp(0, 1)
    parts = torch.where(outer <= low, 0.0, torch.where(outer >= high, 1.0, parts))
    weights = dist.mixture_distribution.probs.detach().to(torch.float64)
    levels = levels.to(torch.float64)
    laws = ((weights, levels[0], levels[1], points[..., 0], points[..., 1]),
            (weights, 1 - levels[-1], 1 - levels[-2], points[..., -1], points[..., -2]))
    # the masses beyond the outer edges from the components' tail laws where they apply: 1 - F from the cdfs rounds
    # by 1e-16 on masses of 1e-13, an error the survival summed from the right carries up the whole upper tail
    # (Paretos of shape 0.6 and scales 1 and 1.001: 1.6e-8 of the CRPS)
    masses = []
    for sign, law, edge, cdf in ((-1.0, laws[0], edges[..., :1], parts[0]), (1.0, laws[1], edges[..., -1:], 1 - parts[1])):
        usable, _, level = _tail_law(law, sign, sign * edge)
        masses.append(torch.where(usable, level, weights * cdf).sum(-1).clamp(0, 1))
    return edges, tuple(masses) + laws


def _merged_quantile_edges(dist: MixtureSameFamily, shape: torch.Size, lower: torch.Tensor, upper: torch.Tensor):
    """:func:`_component_quantile_edges`, or None where a component's icdf or cdf raises ``NotImplementedError``
    (a TransformedDistribution of a base without them)."""
    try:
        return _component_quantile_edges(dist, shape, lower, upper)
    except NotImplementedError:
        return None


def _node_quantile_edges(dist: _Pool, shape: torch.Size, lower: torch.Tensor, upper: torch.Tensor):
    """``(edges, tails)`` as :func:`_panel_edges` gives them for a pool without a finite mean or standard deviation
    (experts with power-law tails), or None where its quadrature has no nodes or an edge is not finite: the quantile
    panels' levels placed at the quadrature's own nodes, the first node whose cumulative weight reaches each level
    (below the median; above it, counted from the top), so that the panels follow the pool's mass out along its tails at
    the cost of one batched quadrature (the pool's own ``icdf`` bisects adaptive masses one level at a time: over ten
    minutes for the 129 levels). A finite end of the support is the first or last edge (its ladder then takes over
    there). The tails beyond the outer edges, whose levels the node sums give only to about a node's weight, follow the
    power law of ``|x|`` through the density at the two outermost distinct edges (``1 - F = x f / a`` for ``f`` falling
    as ``x^-(a + 1)``; exact for a power law, and vanishing for a light tail, whose ``a`` is large), or the node sums
    where that does not apply (edges on both sides of 0, a density not falling outwards)."""
    pi, points, _, _ = dist._node_expectation("quadrature", 1, 0, DEFAULT_RTOL)  # (its errors name their cause)
    batch = pi.shape[1:]
    pi, points = pi.reshape(pi.shape[0], -1).T, points.reshape(points.shape[0], -1).T  # (pools, nodes)
    if pi.shape[-1] == 0:
        return None
    # nodes without mass (padding, or a density that underflows) sort to the end, out of every count
    points = torch.where(pi > 0, points, math.inf)
    points, order = torch.sort(points, -1)
    pi = pi.gather(-1, order)
    below = torch.cumsum(pi, -1)  # the weight up to and including each node
    beyond = pi.flip(-1).cumsum(-1).flip(-1)  # from each node up
    # (a float32 pool's levels stop at 2.4e-7: at 1e-13 the edges of a tail of index 0.6 lay where its float32
    # density is 0, and the tail beyond them was dropped)
    levels = _quantile_levels(_dtype(dist)).to(torch.float64)
    low, high = levels <= 0.5, levels > 0.5
    count = (pi > 0).sum(-1, keepdim=True).clamp_min(1)
    first = torch.searchsorted(below.contiguous(), levels[low].expand(len(pi), -1).contiguous())
    # the last node whose weight from it up is at least 1 - level
    last = beyond.shape[-1] - 1 - torch.searchsorted(beyond.flip(-1).contiguous(),
                                                       (1 - levels[high]).expand(len(pi), -1).contiguous())
    index = torch.minimum(torch.cat((first, last), -1).clamp_min(0), count - 1)
    edges = torch.sort(points.gather(-1, index), -1).values
    edges = edges.reshape(batch + edges.shape[-1:])
    edges = torch.maximum(torch.minimum(edges, upper.unsqueeze(-1)), lower.unsqueeze(-1))
    edges = edges.expand(shape + edges.shape[-1:]).clone()
    edges[..., 0] = torch.where(torch.isfinite(lower), lower, edges[..., 0])
    edges[..., -1] = torch.where(torch.isfinite(upper), upper, edges[..., -1])
    if not bool(torch.isfinite(edges).all()):
        return None
    # the node sums beyond the outer edges
    nodes = points.reshape(batch + points.shape[-1:])
    weights = pi.reshape(batch + pi.shape[-1:])
    node_low = torch.where(nodes < edges[..., :1], weights, 0.0).sum(-1)
    node_high = torch.where(nodes > edges[..., -1:], weights, 0.0).sum(-1)
    one, masses, laws = torch.ones(1, dtype=torch.float64), [], []
    for sign, outer, rest, nodes_beyond in ((-1.0, edges[..., 0], edges, node_low),
                                            (1.0, edges[..., -1], edges.flip(-1), node_high)):
        # the outermost edge distinct from the outer one
        inner = rest.gather(-1, (rest != outer.unsqueeze(-1)).to(torch.int64).argmax(-1, keepdim=True)).squeeze(-1)
        log_f = _log_density(dist, torch.stack((outer, inner)).to(_dtype(dist))).detach().to(torch.float64)
        far, near = sign * outer, sign * inner
        fits = (near > 0) & (far > near) & torch.isfinite(log_f).all(0)
        ratio = torch.where(fits, far / torch.where(fits, near, 1.0), 2.0).log()
        index = -(log_f[0] - log_f[1]) / ratio - 1  # f falls as |x|^-(index + 1)
        fits = fits & (index > 0)
        safe = torch.where(fits, index, 1.0)
        level_out = torch.where(fits, (log_f[0] + far.clamp_min(1e-300).log()).exp() / safe, 0.0)
        level_in = torch.where(fits, (log_f[1] + near.clamp_min(1e-300).log()).exp() / safe, 0.0)
        masses.append(torch.where(fits, level_out, nodes_beyond).clamp(0, 1))
        laws.append((one, level_out.unsqueeze(-1), level_in.unsqueeze(-1), outer.unsqueeze(-1), inner.unsqueeze(-1)))
    return edges, tuple(masses) + tuple(laws)


@torch.no_grad()
def _panel_edges(dist: Distribution, shape: torch.Size) -> tuple[torch.Tensor, tuple | None]:
    """``(edges, tails)``: panel edges ``shape + (K + 1,)`` in float64 covering the forecast's mass: at the
    quantiles of equally spaced log-odds from 1e-13 to 1 - 1e-13 (float32: 2.4e-7) where it has an ``icdf`` (the
    panels follow a skewed or heavy-tailed density, finer towards its tails), else equally spaced over its mean +-
    12 standard deviations, cut to its support, and panels of doubling width beyond, out to 256 times that span or
    to a finite end, merged with each expert's or component's own equal panels (:func:`_component_edges`) (a pool
    without a finite mean or standard deviation: :func:`_node_quantile_edges`). ``tails``:
    for quantile panels, ``F`` at the first edge, ``1 - F`` at the last, and the laws of
    the lower and upper tails beyond them for ``_beyond_panels``, ``(weights, level_out, level_in, outer, inner)``
    with a component axis on the right (one component here: the levels at the first two edges, or at the last
    two), else ``None``."""
    lower, upper = _support(dist)
    if _implements(dist, "icdf") and not isinstance(dist, _Pool):
        levels = _quantile_levels(_dtype(dist)).reshape((-1,) + (1,) * len(shape))
        with contextlib.suppress(NotImplementedError):  # a TransformedDistribution of a base without an icdf
            edges = dist.icdf(levels.expand((-1,) + shape)).detach().to(torch.float64).movedim(0, -1)
            edges = torch.maximum(torch.minimum(edges, upper.unsqueeze(-1)), lower.unsqueeze(-1))
            if bool(torch.isfinite(edges).all()):
                levels, one = levels.flatten().to(torch.float64), torch.ones(1, dtype=torch.float64)
                laws = ((one, levels[0], levels[1], edges[..., :1], edges[..., 1:2]),
                        (one, 1 - levels[-1], 1 - levels[-2], edges[..., -1:], edges[..., -2:-1]))
                return edges, (levels[0], 1 - levels[-1]) + laws
    merged = isinstance(dist, MixtureSameFamily) and _implements(dist.component_distribution, "icdf") \
        and _implements(dist.component_distribution, "cdf")
    many = merged and dist.component_distribution.batch_shape[-1] > _QUANTILE_PANEL_COMPONENTS
    if merged and not many:
        found = _merged_quantile_edges(dist, shape, lower, upper)
        if found is not None:
            return found
    with warnings.catch_warnings():
        if isinstance(dist, _Pool):
            # a pool whose mean is undefined says so; its panels come from its nodes below, and nobody asked for it
            warnings.filterwarnings("ignore", "the pool's mean is undefined", RuntimeWarning)
        mean, sd = _mean_and_sd(dist)
    bad = ~(torch.isfinite(mean) & torch.isfinite(sd))
    if bool(bad.any()):
        # more components than the limit, but equal panels need a mean (a mixture of Cauchys): merged panels at
        # their cost; a pool of experts with power-law tails: panels at its quadrature's nodes
        found = _merged_quantile_edges(dist, shape, lower, upper) if many else None  # (the others were tried)
        if found is None and isinstance(dist, _Pool):
            found = _node_quantile_edges(dist, shape, lower, upper)
        if found is not None:
            return found
        mean, sd = mean.expand(bad.shape), sd.expand(bad.shape)
        raise ValueError(f"the forecast ({type(dist).__name__}) has no finite mean and standard deviation (mean "
                         f"{describe(mean, bad)}, standard deviation {describe(sd, bad)}) "
                         "and no icdf, which the quadrature needs to place its panels (a Student t of 2 degrees of "
                         "freedom or fewer)")
    lo, hi = torch.maximum(mean - _WIDTH * sd, lower).expand(shape), torch.minimum(mean + _WIDTH * sd, upper).expand(shape)
    steps = torch.linspace(0, 1, _PANELS + 1, dtype=torch.float64)
    span = (hi - lo).unsqueeze(-1)
    grid = lo.unsqueeze(-1) + steps * span
    # beyond, panels of doubling width out to 256 spans, cut at a finite end: a skewed forecast keeps its tail (a
    # Gamma of shape 0.05 has a thousandth of its mass beyond 12 standard deviations, a Beta(2, 0.005) 0.2% below them)
    beyond = span * _TAIL_STEPS
    edges = torch.cat((torch.maximum(lo.unsqueeze(-1) - beyond.flip(-1), lower.unsqueeze(-1)), grid,
                       torch.minimum(hi.unsqueeze(-1) + beyond, upper.unsqueeze(-1))), -1)
    components = _component_edges(dist, shape, lo, hi, lower, upper)
    if components is not None:
        edges = torch.sort(torch.cat((edges, components), -1), -1).values
    return edges, None


def _component_edges(dist: Distribution, shape: torch.Size, lo: torch.Tensor, hi: torch.Tensor, lower: torch.Tensor,
                     upper: torch.Tensor) -> torch.Tensor | None:
    """Edges ``shape + (C * (_COMPONENT_PANELS + 1),)`` of equal panels over each component's mean +- ``_WIDTH``
    standard deviations cut to the support, for a pool's experts or a ``MixtureSameFamily``'s components (at most
    ``_QUANTILE_PANEL_COMPONENTS`` of them), else None: a pool of N(0, 0.01) and N(50, 5) at alpha = 0.3 lost half
    its mass between the nodes of equal panels about 5 wide (CRPS 0.29 for 13.9). A component without a finite mean
    and standard deviation adds edges at the forecast's own ``lo`` and ``hi``."""
    try:
        if isinstance(dist, _Pool):
            params = dist.experts.params.detach().to(torch.float64)
            mean, sd = dist.family.mean(params), dist.family.variance(params).sqrt()
        elif isinstance(dist, MixtureSameFamily):
            mean, sd = (dist.component_distribution.mean.detach().to(torch.float64),
                        dist.component_distribution.stddev.detach().to(torch.float64))
        else:
            return None
    except (NotImplementedError, ValueError):
        return None
    if mean.shape[-1] > _QUANTILE_PANEL_COMPONENTS:
        return None
    mean, sd = mean.expand(shape + mean.shape[-1:]), sd.expand(shape + mean.shape[-1:])
    known = torch.isfinite(mean) & torch.isfinite(sd)
    start = torch.where(known, torch.maximum(mean - _WIDTH * sd, lower.unsqueeze(-1)), lo.unsqueeze(-1))
    stop = torch.where(known, torch.minimum(mean + _WIDTH * sd, upper.unsqueeze(-1)), hi.unsqueeze(-1))
    steps = torch.linspace(0, 1, _COMPONENT_PANELS + 1, dtype=torch.float64)
    return (start.unsqueeze(-1) + steps * (stop - start).unsqueeze(-1)).flatten(-2)


def _end_ladder(bound: torch.Tensor, sign: float, near: torch.Tensor, active: torch.Tensor, y: torch.Tensor,
                dtype: torch.dtype):
    """Log-distance edges ``shape + (J + 1,)`` (increasing) of the panels between a finite end ``bound`` of the
    support and the edge ``near`` of the first equal panel, where ``active``: ``s = log(sign (x - bound))`` from
    ``log(sign (near - bound))`` down by 1, 2, 4, ... to the nearest point the forecast's ``dtype`` resolves well
    (from 0 ``2^25`` times its smallest normal number, float64 ``2^-997``, about 1e-300, float32 ``2^-101``;
    elsewhere 256 of its spacings at 1, ``2^-44 |bound|`` in float64), with the observation's own ``s`` as an edge
    when it lies there. Zero-width where not ``active``."""
    info = torch.finfo(dtype)
    top = torch.log((sign * (near - bound)).clamp_min(info.tiny * 2.0**25))
    floor = torch.log(torch.clamp(256 * info.eps * bound.abs(), min=info.tiny * 2.0**25)).expand(top.shape)
    reach = (top - floor).clamp_min(0)
    drops = torch.minimum(_LADDER_STEPS.to(top), reach.unsqueeze(-1))
    edges = top.unsqueeze(-1) - torch.cat((drops, reach.unsqueeze(-1)), -1)
    distance = sign * (y - bound)
    between = active & (distance > 0) & (sign * (near - y) > 0)
    own = torch.where(between, torch.log(distance.clamp_min(1e-300)).clamp(min=floor, max=top), top)
    edges = torch.sort(torch.cat((edges, own.unsqueeze(-1)), -1), dim=-1).values
    return torch.where(active.unsqueeze(-1), edges, top.unsqueeze(-1).expand(edges.shape))


def _beyond_floor(dist: Distribution, sign: float, bound: torch.Tensor, log_edges: torch.Tensor, y: torch.Tensor):
    """``(mass, nearer_than_y, crps)``, float64 of the batch shape, zero where the ladder is inactive: the mass
    between a ladder's floor (its lowest log-distance edge) and the end ``bound`` of the support, the part of it
    between the end and ``y``, and the CRPS integrand's integral over that stretch.

    The log of the density per unit of ``s = log d`` (``d`` the distance to the end) is continued below the floor
    as ``A + p s + c d``, a power law ``d^(p - 1)`` times the smooth factor a Gamma's ``exp(-rate d)`` or a Beta's
    ``(1 - d)^(b - 1)`` is there to first order, fitted at the floor and 1 and 2 above it (a power law alone,
    fitted between the floor and 4 above, put float32 Beta(3, 0.2)'s mass within 2^-15 of 1 0.4% high); zero mass
    where ``p`` is not positive. A sum of power laws is underestimated so (the shallowest dominates further down):
    where the forecast has a cdf, that gives the masses instead, if it is vectorised, or, for a numerical pool (whose
    cdf integrates one pool at a time), if the extrapolated mass exceeds ``_EXTRAPOLATED_MASS``. The CRPS integrand
    takes the mass nearer the end than ``d`` as ``mass (d / d_floor)^p`` (``p = 1`` where the fit failed): in float32
    the stretch within 2^-15 of 1 added 1e-5 of a Beta(3, 0.2)'s CRPS."""
    floor, top = log_edges[..., 0], log_edges[..., -1]
    active = top > floor
    step = torch.where(active, (top - floor).clamp(max=2) / 2, 0.0)
    s = torch.stack([torch.where(active, floor, top) + k * step for k in range(3)])
    points = (bound + sign * s.exp()).to(_dtype(dist))
    distance = sign * (points.to(torch.float64) - bound)  # the distances the rounded points lie at
    to_y = sign * (y - bound)
    log_density = _log_density(dist, points).detach().to(torch.float64) + distance.log()
    ds, dd, dl = (x[1:] - x[:-1] for x in (distance.log(), distance, log_density))
    determinant = ds[0] * dd[1] - ds[1] * dd[0]
    power = (dl[0] * dd[1] - dl[1] * dd[0]) / determinant
    smooth = (ds[0] * dl[1] - ds[1] * dl[0]) / determinant
    valid = active & torch.isfinite(log_density).all(0) & (power > 0) & torch.isfinite(smooth)
    if not _has_cdf(dist) or isinstance(dist, NumericalHolderPool):
        def nearer(d, log_g):  # the mass between the end and distance d, where log g is log_g
            return torch.exp(log_g - power.log()) * (1 - smooth * d / (power + 1))

        mass = torch.where(valid, nearer(distance[0], log_density[0]), 0.0)
        at_y = log_density[0] + power * (to_y.log() - distance[0].log()) + smooth * (to_y - distance[0])
        within = valid & (to_y > 0) & (to_y < distance[0])
        next_to_y = torch.where(within, nearer(to_y, at_y), torch.where(valid & (to_y > 0), mass, 0.0))
        use_cdf = _has_cdf(dist) and bool((mass > _EXTRAPOLATED_MASS).any())
    else:
        use_cdf = True
    if use_cdf:
        between = active & (to_y > 0) & (to_y < distance[0])
        with torch.no_grad():
            cdf = dist.cdf(torch.stack((points[0], torch.where(between, y.to(points.dtype), points[0]))))
        mass, next_to_y = (cdf if sign > 0 else 1 - cdf).to(torch.float64).clamp(0, 1)
        mass = torch.where(active, mass, 0.0)
        next_to_y = torch.where(between, next_to_y, torch.where(to_y > 0, mass, 0.0))
    return mass, next_to_y, _stretch_crps(mass, torch.where(valid, power, 1.0), distance[0], to_y)


def _stretch_crps(mass, power, width, to_y):
    """The CRPS integrand's integral over the stretch of ``width`` next to an end, with ``M(d) = mass (d / width)^p``
    the mass nearer the end than ``d`` (``F`` next to a lower end, ``1 - F`` next to an upper one: the integrand is
    ``M^2`` between the end and ``y`` and ``(1 - M)^2`` beyond, at either end); ``to_y`` is ``y``'s distance to the
    end."""
    def moment(k, a, b):  # int_a^b M^k dd
        return mass**k * width * ((b / width) ** (k * power + 1) - (a / width) ** (k * power + 1)) / (k * power + 1)

    cut = torch.minimum(to_y.clamp_min(0), width)  # y's place in the stretch
    beyond = (width - cut) - 2 * moment(1, cut, width) + moment(2, cut, width)
    return torch.where(mass > 0, moment(2, torch.zeros_like(cut), cut) + beyond, 0.0)


def _rounding_correction(log_p: torch.Tensor, points: torch.Tensor, log_distance: torch.Tensor, ends: torch.Tensor):
    """What to add to the log densities ``log_p`` at a ladder's rounded ``points`` (``(..., panels, nodes)``) for
    them to stand at the exact ``log_distance`` from their ``ends``: next to an end other than 0 a node within a few
    thousand floats of it lies up to a float spacing away from where its weight belongs (Beta(3, 0.2)'s mass
    between 1 - 2^-44 and 1 - 2^-20 was 1.3e-7 short). The correction is the local power law's, ``d log f / d log d``
    by differences over the panel's nodes at their rounded distances; zero off the ladders (``log_distance`` NaN)."""
    actual = (points - ends).abs().log()
    earlier = torch.cat((actual[..., :1], actual[..., :-1]), -1), torch.cat((log_p[..., :1], log_p[..., :-1]), -1)
    later = torch.cat((actual[..., 1:], actual[..., -1:]), -1), torch.cat((log_p[..., 1:], log_p[..., -1:]), -1)
    power = (later[1] - earlier[1]) / (later[0] - earlier[0])
    correction = power * (log_distance - actual)
    return torch.where(torch.isfinite(correction), correction, 0.0)


def _log_density(dist: Distribution, points: torch.Tensor) -> torch.Tensor:
    """``dist.log_prob(points)`` at ``points`` ``(P,) + shape``. A ``MixtureSameFamily``'s as torch sums it, but
    with each component's log density ``-inf`` outside its own support (torch validates a mixture's points against
    every component's support, so components of different supports need validation off, and then a Pareto's density
    below its scale is not 0: Paretos of scales 1 and 5 scored 160 times their CRPS), and a block of points at a
    time (every component's log density at every point: 64 components at a thousand observations' 9000 nodes took
    15 GB)."""
    if type(dist) is not MixtureSameFamily:
        return dist.log_prob(points)
    components = dist.component_distribution
    low, high = _support(components)
    log_weights = torch.log_softmax(dist.mixture_distribution.logits, -1)
    rows = max(1, _BLOCK_ELEMENTS // max(1, points[0].numel() * components.batch_shape[-1]))
    parts = []
    with _without_validation(components):
        for block in points.split(rows):
            x = block.unsqueeze(-1)
            wide = x.to(torch.float64)
            inside = (wide >= low) & (wide <= high)
            parts.append(torch.logsumexp(torch.where(inside, components.log_prob(x), -math.inf) + log_weights, -1))
    return torch.cat(parts)


def _density_quadrature(dist: Distribution, y: torch.Tensor, window=None):
    """``(crps, cdf at y, total mass)`` in float64 by panels of Gauss-Legendre quadrature of the density ``exp(log_prob)``.

    The panels cover ``window`` (float64 ``(lo, hi)`` broadcasting against the batch) in equal steps, by default
    those of :func:`_panel_edges`, with the observation as a panel edge (so the step of the CRPS integrand falls
    between panels); the cdf at each node integrates the density's interpolating polynomial on its panel. Where the
    default panels start at a finite end of the support, the first of them is replaced by panels in the log of the
    distance to that end (:func:`_end_ladder`), on which a power law ``d^(p - 1)``, as a Gamma or Beta of shape
    below one has there, is smooth; the mass beyond its lowest panel is :func:`_beyond_floor`'s, and its nodes'
    rounding is corrected (:func:`_rounding_correction`). Beyond the panels the density is taken as zero; an
    observation outside them adds the exact length term ``(y - hi) * F(hi)^2`` (or ``(lo - y) * (1 - F(lo))^2``).
    By default, a total mass off 1 by more than 1e-6 warns: the panels missed part of the density."""
    t, w, integrate = _integration_matrix()
    dist = _in_float64(dist)
    shape = torch.broadcast_shapes(y.shape, dist.batch_shape)
    y = y.expand(shape).to(torch.float64)
    ladders = []  # (sign, bound, log-distance edges) of the ends the panels start at
    tails = None
    if window is None:
        grid, tails = _panel_edges(dist, shape)
        for sign, bound in zip((1.0, -1.0), _support(dist)):
            bound = bound.expand(shape)
            end = grid[..., 0] if sign > 0 else grid[..., -1]
            active = torch.isfinite(bound) & (end == bound)
            if bool(active.any()):
                # the ladder covers the first panel of positive width, whose far edge is `near`
                inner = sign * (grid - bound.unsqueeze(-1)) > 0
                near = torch.where(inner, sign * grid, math.inf).amin(-1) * sign
                ladders.append((sign, bound, _end_ladder(bound, sign, near, active, y, _dtype(dist))))
                moved = torch.maximum(grid, near.unsqueeze(-1)) if sign > 0 else torch.minimum(grid, near.unsqueeze(-1))
                grid = torch.where(active.unsqueeze(-1), moved, grid)
    else:
        lo, hi = (bound.expand(shape) for bound in window)
        grid = lo.unsqueeze(-1) + torch.linspace(0, 1, _PANELS + 1, dtype=torch.float64) * (hi - lo).unsqueeze(-1)
    lo, hi = grid[..., 0], grid[..., -1]
    inside = y.clamp(torch.minimum(lo, hi), hi)
    edges = torch.sort(torch.cat((grid, inside.unsqueeze(-1)), -1), dim=-1).values  # shape + (K + 2,)
    half, middle = 0.5 * (edges[..., 1:] - edges[..., :-1]), 0.5 * (edges[..., 1:] + edges[..., :-1])
    nodes = middle.unsqueeze(-1) + half.unsqueeze(-1) * t  # shape + (K + 1, G)
    jacobian = half.unsqueeze(-1).expand(nodes.shape)  # dx / dt at each node
    # a panel spanning a ratio of magnitudes on one side of 0 (quantile panels of a heavy tail, or of a density
    # singular at 0, span decades) has its nodes in log |x|, where a power law is smooth: equal in x, a Weibull of
    # shape 0.1's 16 nodes met a density falling by 10^9 across the panel and lost 1.8e-4 of its mass
    low, high = edges[..., :-1], edges[..., 1:]
    side = torch.sign(middle)
    ratio = torch.where(low * high > 0, torch.maximum(low / high, high / low), 1.0)
    logarithmic = (ratio >= _LOG_PANEL_RATIO).unsqueeze(-1)
    if bool(logarithmic.any()):
        # but not where the density is flat across the panel (at its outermost nodes in x, inside the support): a
        # density smooth at 0 on a panel from next to 0 (an observation at 1e-40, a Laplace located at 1e-40) spans
        # dozens of decades with its mass in the top one, which nodes equal in log |x| miss (a StudentT(3)'s CRPS at
        # 1e-40 was 1.2e-4 off, a Laplace's at 1e-100 1.3e-2); a power law steep enough to need them varies by more
        outer = torch.stack((nodes[..., 0], nodes[..., -1]), -1).flatten(-2).movedim(-1, 0).to(_dtype(dist))
        log_f = _log_density(dist, outer).detach().to(torch.float64).movedim(0, -1).unflatten(-1, (-1, 2))
        flat = (log_f[..., 1] - log_f[..., 0]).abs() <= _FLAT_LOG_DENSITY
        logarithmic = logarithmic & ~flat.unsqueeze(-1)
        safe = lambda x: torch.where(logarithmic.squeeze(-1), x.abs(), 1.0).log()  # noqa: E731
        s_low, s_high = safe(low), safe(high)
        s_half, s_middle = (0.5 * (s_high - s_low)).unsqueeze(-1), (0.5 * (s_high + s_low)).unsqueeze(-1)
        magnitude = (s_middle + s_half * t).exp()  # t runs towards larger x: larger |x| above 0, smaller below
        nodes = torch.where(logarithmic, side.unsqueeze(-1) * magnitude, nodes)
        jacobian = torch.where(logarithmic, (s_half * side.unsqueeze(-1)) * magnitude, jacobian)
    # (nodes, dx/dt, panel middles, and for ladder nodes the log-distance to their end they stand for, and that end)
    parts = [(nodes, jacobian, middle, torch.full_like(nodes, math.nan), torch.zeros_like(nodes))]
    for sign, bound, log_edges in ladders:
        s_half = 0.5 * (log_edges[..., 1:] - log_edges[..., :-1])
        s_middle = 0.5 * (log_edges[..., 1:] + log_edges[..., :-1])
        # t runs towards larger x: up in s from the lower end, down in s from the upper one
        s_nodes = s_middle.unsqueeze(-1) + sign * s_half.unsqueeze(-1) * t
        end = bound.unsqueeze(-1).unsqueeze(-1)
        ladder = (end + sign * s_nodes.exp(), s_half.unsqueeze(-1) * s_nodes.exp(),
                  bound.unsqueeze(-1) + sign * s_middle.exp(), s_nodes, end.expand(s_nodes.shape))
        if sign < 0:  # in x order
            ladder = tuple(x.flip(-2 if x.dim() > middle.dim() else -1) for x in ladder)
        parts = [ladder] + parts if sign > 0 else parts + [ladder]
        if sign > 0:
            lo = torch.where(log_edges[..., -1] > log_edges[..., 0], bound, lo)
        else:
            hi = torch.where(log_edges[..., -1] > log_edges[..., 0], bound, hi)
    # the mass the ladders' floors leave between them and their ends, and of it the part between the end and y: a
    # Gamma of shape 0.003 has an eighth of its mass below 1e-300
    beyond_floor, nearer_than_y, stretch_crps = zip(*(_beyond_floor(dist, sign, bound, log_edges, y)
                                                      for sign, bound, log_edges in ladders)) if ladders else ((), (), ())
    floors = {sign: floor for (sign, _, _), floor in zip(ladders, beyond_floor)}  # +1: the lower end, -1: the upper
    # quantile panels leave known masses beyond the ends no ladder reaches (1e-13 each; float32 2.4e-7): F and 1 - F
    # start from them, not from 0 (a Pareto of shape 0.55 lost 2e-13 E[X] to a tail mass left out of 1 - F)
    open_low, open_high = (tails is not None and sign not in floors for sign in (1.0, -1.0))
    tail_low, tail_high = (tails[0] if open_low else 0.0), (tails[1] if open_high else 0.0)
    zero = torch.zeros(shape, dtype=torch.float64)
    below_floor, above_floor = floors.get(1.0, zero) + tail_low, floors.get(-1.0, zero) + tail_high
    nodes, jacobian, middle, log_distance, ends = (torch.cat(group, -1 if k == 2 else -2)
                                                   for k, group in enumerate(zip(*parts)))
    points = nodes.flatten(-2).movedim(-1, 0).to(_dtype(dist))  # (P,) + shape, torch's sample layout for log_prob
    log_p = _log_density(dist, points).detach().to(torch.float64).movedim(0, -1).unflatten(-1, nodes.shape[-2:])
    log_p = log_p + _rounding_correction(log_p, points.to(torch.float64).movedim(0, -1).unflatten(-1, nodes.shape[-2:]),
                                         log_distance, ends)
    density = torch.where(torch.isfinite(log_p), log_p.exp(), torch.zeros_like(log_p))
    mass_density = density * jacobian  # per unit of t
    panel_mass = (mass_density * w).sum(-1)
    start = below_floor.unsqueeze(-1) + torch.cumsum(panel_mass, -1) - panel_mass  # F at each panel's left edge
    within = mass_density @ integrate.T  # each node's mass from its panel's left edge
    cdf = start.unsqueeze(-1) + within
    # above y, 1 - F summed from the right (the mass beyond the last panel beyond every node): summed from the left,
    # mass the panels missed at the lower end (a Weibull of shape 0.1 singular at 0 lost 1.8e-4) was carried up
    # the whole upper tail, whose span (5e14 there) multiplied it: a CRPS of 1.85e7 for 3544
    survival = (above_floor.unsqueeze(-1) + panel_mass.flip(-1).cumsum(-1).flip(-1)).unsqueeze(-1) - within
    above = (middle >= y.unsqueeze(-1)).unsqueeze(-1)
    integrand = torch.where(above, survival, cdf) ** 2
    value = (integrand * jacobian * w).sum((-1, -2)) + sum(stretch_crps, zero)
    total = panel_mass.sum(-1) + below_floor + above_floor
    value = value + (y - hi).clamp_min(0) * total ** 2 + (lo - y).clamp_min(0)
    if tails is not None:
        value = value + _beyond_panels(grid, tails, y, open_low, open_high)
    at_y = (torch.where(middle < y.unsqueeze(-1), panel_mass, torch.zeros_like(panel_mass))).sum(-1) + tail_low
    for (sign, _, _), floor_mass, next_to_end in zip(ladders, beyond_floor, nearer_than_y):
        at_y = at_y + (next_to_end if sign > 0 else floor_mass - next_to_end)
    if window is None:
        defect = (total - 1).abs()
        if not bool((defect <= _mass_tolerance(dist)).all()):
            warnings.warn(f"the density quadrature of the {type(dist).__name__} forecast found a total mass off 1 by "
                          f"up to {float(defect.max()):.3g}: its panels missed part of the density (mass beyond 12 "
                          "standard deviations, or a density much narrower than a panel), so the PIT is off by about "
                          "as much and the CRPS by up to that mass times the distances it spans; a forecast with an "
                          "icdf (a mixture: components with an icdf and a cdf) gets panels at its quantiles",
                          stacklevel=3)
    return value, at_y, total


def _tail_law(law, sign: float, start: torch.Tensor):
    """``(usable, index, level)`` of each component's tail (a component axis on the right) beyond its outer edge, at
    the distance ``start`` from 0 (``sign`` -1: the lower tail, whose ``F`` it gives, 1: the upper, ``1 - F``), by
    the power law of ``|x|`` through its known levels at its outer and inner edge (``law``: ``(weights, level_out,
    level_in, outer, inner)``), times its weight: ``w L (start / |outer|)^-a``. Not usable (level 0) where its
    edges lie on the other side of 0 or do not move outwards, or its weight or outer level is 0."""
    weights, level_out, level_in, outer, inner = (torch.as_tensor(x, dtype=torch.float64) for x in law)
    far, near = sign * outer, sign * inner  # distances from 0 outwards, when the tail lies beyond 0
    usable = (near > 0) & (far > near) & (level_out > 0) & (weights > 0)
    ratio = torch.where(usable, far / torch.where(usable, near, 1.0), 2.0)
    index = torch.log(level_in / torch.where(usable, level_out, 1.0)) / torch.log(ratio)
    level = torch.where(usable, weights * level_out * (start / torch.where(usable, far, 1.0)) ** -index, 0.0)
    return usable, index, level


def _beyond_panels(grid: torch.Tensor, tails, y: torch.Tensor, open_low: bool, open_high: bool) -> torch.Tensor:
    """The CRPS beyond quantile panels, ``int F^2`` below the first edge and ``int (1 - F)^2`` above the last (from
    the observation on where it lies beyond them), for tails that fall as a power of ``|x|``: each component's ``F``
    (or ``1 - F``) beyond its own outer edge as ``w L (x / outer)^-a``, the index ``a`` from its known levels ``L`` at
    its outer and inner edge, and the integral of the square of their sum exact, ``sum_ij w_i w_j F_i(x) F_j(x) |x|
    / (a_i + a_j - 1)`` from the edge or observation ``x``, infinite for ``a_i + a_j <= 1`` (a Pareto of shape 0.5,
    whose CRPS diverges, gave 57; one distribution has ``F(x)^2 |x| / (2 a - 1)``). Light tails give ``a`` in the
    hundreds and nothing that counts; only the ends that are ``open_low`` / ``open_high`` (no ladder reaches them:
    not a finite end of the support) count, and a component whose edges lie on the other side of 0 adds nothing."""
    total = torch.zeros(y.shape, dtype=torch.float64)
    for sign, edge, law, is_open in ((-1.0, grid[..., 0], tails[2], open_low), (1.0, grid[..., -1], tails[3], open_high)):
        if not is_open:
            continue
        start = torch.maximum(sign * edge, sign * y).unsqueeze(-1)  # at or beyond every component's outer edge
        usable, index, level = _tail_law(law, sign, start)
        # pairs of components a block of rows at a time (a thousand components at a thousand observations: 8 GB)
        rows = max(1, _BLOCK_ELEMENTS // max(1, level.numel()))
        for part in range(0, level.shape[-1], rows):
            pair_index = index[..., part:part + rows].unsqueeze(-1) + index.unsqueeze(-2)
            both = usable[..., part:part + rows].unsqueeze(-1) & usable.unsqueeze(-2)
            pair = level[..., part:part + rows].unsqueeze(-1) * level.unsqueeze(-2) * start.unsqueeze(-1)
            # (an index within its estimate's rounding of 1/2 diverges too: 0.5 + 1e-13 gave 9e14 for a Pareto of 0.5)
            pair = torch.where(pair_index > 1 + 2e-9, pair / (pair_index - 1), math.inf)
            total = total + torch.where(both, pair, 0.0).sum((-1, -2))
    return total


def _mass_tolerance(dist: Distribution) -> float:
    """How far the quadrature's total mass may be off 1 before it warns: 1e-6, or 100 rounding units of the
    forecast's dtype (a float32 VonMises of concentration 50 integrates to 1 + 2e-6, a float32 Laplace to 1 + 1e-6)."""
    return max(_MASS_TOLERANCE, 100 * torch.finfo(_dtype(dist)).eps)


def _circular_pit(dist: Distribution, y: torch.Tensor) -> torch.Tensor:
    """The mass of ``[-pi, y)`` (``y`` modulo ``2 pi``) under a circular forecast, by :func:`_density_quadrature`.

    The density is periodic, so the quadrature covers one period ``[mean - pi, mean + pi)`` about the mean, cut to
    ``mean +- 12 sd`` when narrower so that a concentrated forecast keeps its panels; ``-pi`` and ``y`` are mapped into
    that period and the mass between them read off the cumulative mass, wrapping past its end, over the total
    (torch's VonMises normaliser is a polynomial approximation good to about 1e-7). The cut window suits one von
    Mises, not a mixture or pool with a small far or diffuse component (the sd is then a mixture's linear one, or
    small beside the far component's distance): where the window's total mass is off 1 by more than
    :func:`_mass_tolerance`, the whole period is integrated instead, and a total still off (a component much narrower
    than a panel) warns."""
    shape = torch.broadcast_shapes(y.shape, dist.batch_shape)
    dist = _in_float64(dist)
    mean, sd = _mean_and_sd(dist)
    mean, sd = mean.expand(shape), sd.expand(shape)
    start = mean - math.pi
    if not bool((sd > 0).all()):
        raise ValueError(f"the circular forecast's standard deviation is not positive ({describe(sd, ~(sd > 0))}): "
                         "its panels would have no width")
    angles = torch.stack((y.to(torch.float64).expand(shape), torch.full(shape, -math.pi, dtype=torch.float64)))
    angles = start + torch.remainder(angles - start, 2 * math.pi)

    def masses(half):
        _, (at_y, at_start), (total, _) = _density_quadrature(dist, angles, (mean - half, mean + half))
        return at_y, at_start, total

    half, tolerance = (_WIDTH * sd).clamp_max(math.pi), _mass_tolerance(dist)
    at_y, at_start, total = masses(half)
    missed = (half < math.pi) & ((total - 1).abs() > tolerance)
    if bool(missed.any()):
        whole = masses(torch.full_like(half, math.pi))
        at_y, at_start, total = (torch.where(missed, full, cut) for full, cut in zip(whole, (at_y, at_start, total)))
    defect = (total - 1).abs()
    if not bool((defect <= tolerance).all()):
        warnings.warn(f"the density quadrature of the circular {type(dist).__name__} forecast found a total mass off 1 "
                      f"by up to {float(defect.max()):.3g} over its whole period: a component much narrower than a "
                      f"panel (2 pi / {_PANELS}) or the rounding of a float32 density, so the PIT is off by about as "
                      "much", stacklevel=3)
    # decided by the order of the angles, not the sign of the difference, which rounding can flip when y ~ -pi
    mass = torch.where(angles[0] >= angles[1], at_y - at_start, total - at_start + at_y)
    return (mass / total).clamp(0, 1)


def crps(forecast, observations) -> torch.Tensor:
    r"""The continuous ranked probability score :math:`\int (F(x) - 1\{x \ge y\})^2\,dx` of each observation
    under ``forecast`` (lower is better), shape ``broadcast(observations, forecast.batch_shape)``.

    ``forecast`` is a pool or any ``torch.distributions`` object of scalar continuous events. Normal forecasts and
    Gaussian mixtures (exact Hölder pools of Normal experts, ``alpha = 0`` or ``1/n``; ``MixtureSameFamily`` of Normals)
    use the closed form of Grimit et al. (2006), differentiable in their parameters. Everything else is integrated in
    float64 from the density (``log_prob``) on 128 panels of 16-point Gauss-Legendre rules (the observation is a panel
    edge; in ``log |x|`` on a panel whose ends' magnitudes lie 4 or more apart on one side of 0 and whose density is not
    flat across it, where a power law is smooth), with the cdf at each node from the density's interpolating polynomial
    on its panel. The panels lie between the quantiles of equally spaced log-odds (levels 1e-13 to 1 - 1e-13) for a
    torch distribution with an ``icdf`` (a LogNormal or a Cauchy: they follow skew and heavy tails), and between every
    component's for a ``MixtureSameFamily`` of up to 64 components with an ``icdf`` and a ``cdf``, or of more without
    a finite mean (the components' finite ends, where the density jumps, then lie within 1e-13 of their mass of an
    edge), else equally spaced over the forecast's mean +- 12 standard deviations cut to its support, merged with
    32 equal panels over each expert's (pools) or component's (a ``MixtureSameFamily`` of up to 64) own (pools; a
    pool without a finite mean or standard deviation, of experts with power-law tails, gets panels at those levels
    placed at its quadrature's nodes, with the tails beyond them the power laws of the density at the outermost
    edges; any other forecast with neither raises a ``ValueError``).
    Error: for densities smooth on the scale of a panel, about 1e-10 times the scale (LogNormal(0, 3): 6e-12
    relative). A float32 torch forecast is integrated as its float64 copy (the same parameters); float32 pools to
    about 1e-5, their own log density's rounding. Above the observation ``1 - F`` is summed from the right, below it
    ``F`` from the left, so mass a panel misses at one end is not carried across the other. Quantile panels start from
    the masses they leave beyond their ends (1e-13 each), and add the CRPS beyond them as the power law of ``|x|`` their
    last two levels give (``int (1 - F)^2 = (1 - F)^2 x / (2 a - 1)`` for a tail falling as ``x^-a``; infinite for ``a
    <= 1/2``, a Pareto of shape 1/2, whose CRPS diverges; a mixture's from each component's own power law, the square
    of their sum integrated exactly); other panels neglect the mass beyond them. Next to a finite
    end of the support the panels are equal in the log of the distance to it, where a singular density (a Gamma or Beta
    of shape below 1) is a smooth power law, down to about 1e-300 from 0 (2^-44 of the end's size elsewhere; float32
    pools: 2^-101 and 2^-15); the mass nearer the end (half of a Gamma(0.001)'s) comes from the forecast's cdf, or where
    there is none from a power law fitted above it. Narrow modes far apart that no component's panels cover (a
    mixture of more components, without an ``icdf``; much narrower than a panel) are missed: a
    total mass off 1 by more than 1e-6 warns. No gradient in the forecast's parameters on that path; in the
    observations, ``2 F(y) - 1``.

    Circular forecasts (VonMises experts, pools and mixtures) are rejected with a ``ValueError``: the integral over
    the real line counts the periodic density's mass once per period, and a CRPS of angles is a different score.
    """
    _check_distribution("forecast", forecast)
    if _circular(forecast):
        raise ValueError(f"forecast must not be circular: the CRPS integrates over the real line, got a "
                         f"{type(forecast).__name__} forecast of angles; score it with log_prob or pit instead")
    y = _observations(observations, forecast.batch_shape, _dtype(forecast))
    mixture = _gaussian_mixture(forecast)
    if mixture is not None:
        return _mixture_crps(*(part.to(y.dtype) for part in mixture), y)
    # the observation is a panel edge: its gradient through the nodes was NaN or off; d CRPS / dy = 2 F(y) - 1
    value, at_y = _density_quadrature(forecast, y.detach())[:2]
    if y.requires_grad:
        value = value + (2 * at_y.clamp(0, 1) - 1) * (y - y.detach()).to(value.dtype)
    return value.to(y.dtype)


# ------------------------------------------------------------------------------------------------- calibration
def pit(forecast, observations) -> torch.Tensor:
    """Probability integral transforms ``F(y)`` of the observations under ``forecast`` (uniform on ``[0, 1]`` for
    calibrated continuous forecasts), shape ``broadcast(observations, forecast.batch_shape)``.

    The forecast's own ``cdf`` where it is vectorised (Normal, exact mixtures); numerical pools use the density
    quadrature of :func:`crps` (one vectorised pass over all occasions, error as stated there) instead of their
    one-pool-at-a-time adaptive ``cdf``.

    Circular forecasts (VonMises experts, pools and mixtures): ``F(y)`` is the mass of ``[-pi, y)`` with ``y`` taken
    modulo ``2 pi`` into the period ``[-pi, pi)`` (so ``y = pi`` gives 0), by the same quadrature over one
    period.

    No gradient (the quadrature's through the observation, a panel edge, was NaN)."""
    _check_distribution("forecast", forecast)
    y = _observations(observations, forecast.batch_shape, _dtype(forecast)).detach()
    if _circular(forecast):
        return _circular_pit(forecast, y).to(y.dtype)
    if isinstance(forecast, NumericalHolderPool) or not _has_cdf(forecast):
        at_y = _density_quadrature(forecast, y)[1].clamp(0, 1)
        upper = _support(forecast)[1]  # F = 1 there, whatever mass the panels could not reach next to it
        return torch.where(y.to(torch.float64) >= upper, 1.0, at_y).to(y.dtype)
    y = y.expand(torch.broadcast_shapes(y.shape, forecast.batch_shape))
    if isinstance(forecast, _Pool):  # a pool computes in its own dtype: a float32 one's float64 copy takes a float64
        # observation (rounded to float32, 1e6 + 0.002 under a pool of N(1e6, 1e-3) experts had a PIT of 0.5)
        if isinstance(forecast, HolderPool) and y.dtype == torch.float64 and _dtype(forecast) != torch.float64:
            params = forecast.experts.params.detach().to(torch.float64)
            forecast = HolderPool(Experts(forecast.family, params), forecast.alpha,
                                  forecast.log_weights.detach().to(torch.float64).exp(),
                                  max_components=forecast._max_components, validate_args=False)
        with torch.no_grad():
            return forecast.cdf(y.to(_dtype(forecast))).clamp(0, 1).to(y.dtype)
    # a plain torch forecast validates its support: F is 0 below it and 1 above it; a float32 one's cdf from its
    # float64 copy (a float32 Normal's 0.5 (1 + erf) kept a few digits of a PIT of 1e-6)
    wide = _in_float64(forecast)
    points = y.to(_dtype(wide))
    lower, upper = (bound.to(points.dtype) for bound in _support(wide))
    inside = (points > lower) & (points < upper)
    with torch.no_grad(), _without_validation(wide):
        cdf = wide.cdf(torch.where(inside, points, _interior_point(lower, upper).expand(points.shape)))
    return torch.where(inside, cdf, (points >= upper).to(points.dtype)).clamp(0, 1).to(y.dtype)


@contextlib.contextmanager
def _without_validation(forecast: Distribution):
    """``forecast`` and the distributions it is built from (a transformed one's base, a mixture's parts) with
    argument validation off, restored after: a Gumbel's cdf is its base Uniform's at the transformed point, which
    rounds onto the Uniform's open ends 6 standard deviations out, where validation raised instead of giving 0
    or 1."""
    flags, stack = {}, [forecast]  # id -> (distribution, its setting)
    while stack:
        dist = stack.pop()
        if isinstance(dist, Distribution) and id(dist) not in flags:
            flags[id(dist)] = dist, dist._validate_args
            dist._validate_args = False
            stack += [getattr(dist, name, None) for name in ("base_dist", "mixture_distribution",
                                                              "component_distribution")]
    try:
        yield
    finally:
        for dist, flag in flags.values():
            dist._validate_args = flag


def _has_cdf(dist: Distribution) -> bool:
    if isinstance(dist, MixtureSameFamily):
        return _has_cdf(dist.component_distribution)
    if isinstance(dist, HolderPool):
        return dist._component_cdf_available()
    return _implements(dist, "cdf")


@dataclass(frozen=True)
class CoverageTable:
    """Nominal against empirical coverage of central intervals: ``levels``, ``empirical`` (the fraction of
    observations inside), ``standard_error`` (binomial, ``sqrt(level (1 - level) / count)`` under calibration) and
    ``count``."""

    levels: tuple[float, ...]
    empirical: tuple[float, ...]
    standard_error: tuple[float, ...]
    count: int

    def rows(self):
        return list(zip(self.levels, self.empirical, self.standard_error))

    def __str__(self) -> str:
        lines = ["nominal  empirical  binomial s.e."]
        lines += [f"{level:7.3f}  {emp:9.3f}  {se:13.3f}" for level, emp, se in self.rows()]
        return "\n".join(lines)


def coverage(forecast, observations, levels=(0.5, 0.8, 0.9, 0.95)) -> CoverageTable:
    """How often the observations fall in the forecasts' central intervals of each nominal level.

    The central interval of level ``L`` is ``[F^-1((1 - L)/2), F^-1((1 + L)/2)]``, so for a continuous forecast it
    holds ``y`` exactly when ``|F(y) - 1/2| <= L/2``: computed from :func:`pit`, without quantiles.

    For circular forecasts ``F`` starts at ``-pi`` (see :func:`pit`), so the "central" arc is central in that cut,
    not around the forecast's mean direction (for a forecast centred near ``+-pi`` it is the arc of low density).
    Under calibration the PIT is uniform for any cut, so the nominal coverage still holds."""
    if isinstance(levels, (np.ndarray, torch.Tensor)) and levels.ndim <= 1:  # a numpy or torch vector of levels
        levels = tuple(levels.tolist()) if levels.ndim else levels.item()
    if isinstance(levels, numbers.Real):
        levels = (levels,)
    if not isinstance(levels, (tuple, list)) or not levels:
        raise ValueError(f"levels must be a non-empty sequence of probabilities in (0, 1), got {levels!r}")
    # torch scalars in a sequence as a single one is taken (a bool or complex one stays, and is refused)
    levels = tuple(level.item() if isinstance(level, torch.Tensor) and level.ndim == 0 and level.dtype != torch.bool
                   and not level.is_complex() else level for level in levels)
    for level in levels:
        if isinstance(level, (bool, np.bool_)) or not isinstance(level, numbers.Real) or not 0 < level < 1:
            raise ValueError(f"levels must be probabilities in (0, 1), got {level!r} in {levels!r}")
    u = pit(forecast, observations).detach().to(torch.float64).flatten()
    if u.numel() == 0:
        raise ValueError(f"observations must hold at least one observation, got shape {tuple(u.shape)}")
    empirical = tuple(float(((u - 0.5).abs() <= level / 2).to(torch.float64).mean()) for level in levels)
    count = u.numel()
    errors = tuple(math.sqrt(level * (1 - level) / count) for level in levels)
    return CoverageTable(tuple(float(x) for x in levels), empirical, errors, count)


# ------------------------------------------------------------------------------------------------ disagreement
@dataclass(frozen=True)
class Disagreement:
    """``bhattacharyya`` and ``hellinger``: ``batch_shape + (M, M)`` matrices of the experts' pairwise
    Bhattacharyya coefficients :math:`\\int\\sqrt{q_i q_j}` and Hellinger distances :math:`\\sqrt{1 - BC}`;
    ``pairwise_mass``: ``batch_shape``, the share of the weighted ``alpha = 1/2`` pool's mass in its pairwise
    components :math:`2\\lambda_i\\lambda_j\\sqrt{q_iq_j}` (0 for experts that never overlap, where the pool is the
    mixture with weights proportional to :math:`\\lambda_j^2`; ``1 - sum_j lambda_j^2`` for identical experts, so 0
    for one expert)."""

    bhattacharyya: torch.Tensor
    hellinger: torch.Tensor
    pairwise_mass: torch.Tensor


def disagreement(experts, weights=None, validate_args: bool | None = None) -> Disagreement:
    """Pairwise disagreement of the experts (closed forms of :mod:`opinionpool.affinities`) and how much of the
    ``alpha = 1/2`` pool with ``weights`` (equal by default) lies in components that combine two experts."""
    experts = as_experts(experts, validate_args)
    params, k, m = experts.params, experts.expert_dim, experts.num_experts
    tail = params.shape[k + 1:]
    batch = experts.batch_shape
    first = params.unsqueeze(k + 1).expand(batch + (m, m) + tail)
    second = params.unsqueeze(k).expand(batch + (m, m) + tail)
    pairs = Experts(experts.family, torch.stack((first, second), dim=k + 2))
    log_bc = log_multi_chernoff_coefficient(pairs, [0.5, 0.5], validate_args=False).clamp_max(0)
    bhattacharyya = log_bc.exp()
    hellinger = hellinger_of(log_bc)
    # the pool's normalised weights, as HolderPool takes them (its M (M + 1) / 2 components are not needed)
    log_w = normalized_log_weights(weights, m, dtype=params.dtype, device=params.device,
                                   validate=validation_enabled(validate_args))
    check_batches_broadcast(batch, log_w.shape[:-1])
    # the component of experts (i, j) has weight lambda_i lambda_j BC_ij counted for (i, j) and (j, i): its mass is
    # that of the ordered pairs i != j among all ordered pairs (BC_ii = 1)
    terms = log_w.unsqueeze(-1) + log_w.unsqueeze(-2) + log_bc
    off_diagonal = ~torch.eye(m, dtype=torch.bool, device=params.device)
    pairwise = torch.where(off_diagonal, terms, -math.inf).flatten(-2).logsumexp(-1)
    pairwise_mass = (pairwise - terms.flatten(-2).logsumexp(-1)).exp()
    return Disagreement(bhattacharyya, hellinger, pairwise_mass)


# ------------------------------------------------------------------------------------------------- fit weights
def _bounds(alpha_bounds):
    if (not isinstance(alpha_bounds, (tuple, list)) or len(alpha_bounds) != 2
            or not all(isinstance(b, numbers.Real) and not isinstance(b, (bool, np.bool_)) and math.isfinite(b)
                       for b in alpha_bounds)
            or not alpha_bounds[0] < alpha_bounds[1]):
        raise ValueError(f"alpha_bounds must be two finite numbers (low, high) with low < high, got {alpha_bounds!r}")
    return float(alpha_bounds[0]), float(alpha_bounds[1])


@dataclass(frozen=True)
class FitResult:
    """A pool fitted by :func:`fit_weights`: ``pool``, ``weights`` ``(M,)``, ``alpha``, ``log_score`` (the mean log
    score of the observations, higher is better), ``standard_error`` (the standard deviation of the per-occasion
    log scores over ``sqrt(n)``), ``scores`` (per occasion), ``iterations`` (objective evaluations), ``converged``
    (the gradient of the mean log score in the free logits, and alpha's, is at most ``sqrt(tol)`` at the result: the
    optimality condition on the simplex, met also next to a vertex, where a weight's logit gradient carries the
    weight; at a vertex, the largest slope of moving weight off it; False, with a warning, where ``max_iter``
    stopped the search short, or where the gradient is not finite)."""

    pool: Distribution
    weights: torch.Tensor
    alpha: float
    log_score: float
    standard_error: float
    scores: torch.Tensor
    iterations: int
    converged: bool


def fit_weights(experts, observations, alpha=0.5, learn_alpha: bool = False, *, alpha_bounds=(-4.0, 4.0),
                max_iter: int = 100, tol: float = 1e-9, validate_args: bool | None = None) -> FitResult:
    r"""Pooling weights on the simplex (a softmax of free logits), and ``alpha`` too when ``learn_alpha``, that
    maximise the mean log score :math:`\frac1n\sum_t \log q_t(y_t)` of the pooled forecasts, by torch's L-BFGS with
    a strong-Wolfe line search from equal weights and the given ``alpha``. The score is concave in the weights at
    ``alpha`` 0 and 1, not in general: each expert alone is scored too, and where one beats the fit the search starts
    again next to it, so the result never scores below the best single expert; each search keeps the best point it
    evaluated (a trial step past float64 counts as infinitely bad). Optima on the simplex's boundary lie
    at infinite logits, which the search approaches but does not reach (weights of 1e-9 and below are common there).

    ``experts`` have the occasions on their batch axes (``batch_shape = observations.shape``, or one that
    broadcasts to it: experts shared by all occasions) and the experts on the rightmost batch axis; one weight
    vector is shared by all occasions. With ``learn_alpha=False`` the pool is
    :func:`opinionpool.holder` at ``alpha`` (exact at 0 and 1/n, whose gradients in the weights are exact); with
    ``learn_alpha=True`` a :class:`NumericalHolderPool` with a tensor alpha, whose gradients are those of its
    quadrature (the learned alpha is where that estimate's score is largest), kept inside the open interval
    ``alpha_bounds`` by a logistic map (an unbounded line search would step to alphas where the quadrature fails);
    each evaluation integrates every occasion's pool, so this costs about a second per hundreds of occasions per
    step. The returned ``pool`` is rebuilt at
    the fitted weights and alpha, detached; ``standard_error`` is the sampling error of the mean log score, not of
    the weights.
    """
    alpha = check_alpha(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite to fit weights: the pool at alpha = +-inf is the normalised max or min "
                         f"of the experts, whose score does not depend on the weights, got alpha={alpha!r}")
    if not isinstance(learn_alpha, bool):
        raise TypeError(f"learn_alpha must be a bool, got {learn_alpha!r}")
    max_iter = check_positive_int("max_iter", max_iter)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < math.inf:
        # (inf stopped L-BFGS at once: the starting weights came back as fitted)
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    low, high = _bounds(alpha_bounds)
    if learn_alpha and not low < alpha < high:
        raise ValueError(f"alpha must lie inside alpha_bounds={alpha_bounds!r} to start learning it, got "
                         f"alpha={alpha!r}")
    experts = as_experts(experts, validate_args)
    if experts.family.event_shape != torch.Size() or experts.family.discrete:
        raise ValueError(f"experts must be continuous scalar experts, got {experts.family.name} experts")
    dtype = experts.params.dtype
    y = _observations(observations, experts.batch_shape, dtype)
    if torch.broadcast_shapes(y.shape, experts.batch_shape) != y.shape:
        # a (n, 1) column against (n,) occasions would score every observation under every occasion's pool
        raise ValueError(f"observations of shape {tuple(y.shape)} must hold one observation per occasion: the experts' "
                         f"batch_shape {tuple(experts.batch_shape)} (the occasions) must broadcast to it, not enlarge it")
    if y.numel() < 2:
        raise ValueError(f"observations must hold at least two occasions (for a standard error), got shape "
                         f"{tuple(y.shape)}")
    fixed = Experts(experts.family, experts.params.detach())
    logits = torch.zeros(experts.num_experts, dtype=dtype, requires_grad=True)
    # alpha = low + (high - low) * sigmoid(raw_alpha), started at the given alpha
    start = (alpha - low) / (high - low) if learn_alpha else 0.5
    raw_alpha = torch.tensor(math.log(start / (1 - start)), dtype=dtype, requires_grad=True)
    variables = [logits, raw_alpha] if learn_alpha else [logits]

    def current_alpha():
        return low + (high - low) * torch.sigmoid(raw_alpha) if learn_alpha else alpha

    def build(weights, a):
        if learn_alpha:
            return NumericalHolderPool(fixed, a, weights, validate_args=False)
        return holder(fixed, a, weights, validate_args=False)

    evaluations = 0
    lowest = []  # (loss, variables) of the best point the current fit has evaluated

    def objective():
        nonlocal evaluations
        evaluations += 1
        for variable in variables:
            variable.grad = None
        # a trial step past float64 (NaN logits from L-BFGS's curvature at alpha = -2 with a weight below 1e-200,
        # which raised deep inside the quadrature) or one scoring an observation -inf is infinitely bad: the line
        # search steps back, and the fit keeps the best point it evaluated
        if not all(bool(torch.isfinite(variable).all()) for variable in variables):
            return torch.tensor(math.inf, dtype=dtype)
        scores = build(torch.softmax(logits, 0), current_alpha()).log_prob(y)
        loss = -scores.mean()
        if bool(torch.isnan(loss)):
            raise ValueError(f"the mean log score is NaN at weights {torch.softmax(logits, 0).detach().tolist()} and "
                             f"alpha={float(current_alpha())}")
        unbounded = torch.isposinf(scores.detach())
        if bool(unbounded.any()):  # (a loss of -inf read as the best point there is)
            raise ValueError(f"the log score is +inf at observations {describe(y.expand(scores.shape), unbounded)}: "
                             "the forecasts' density is unbounded there (a Gamma or Beta expert of shape below 1 at "
                             "its end), so the mean log score has no maximum")
        if not lowest or float(loss.detach()) < lowest[0]:
            lowest[:] = [float(loss.detach()), [variable.detach().clone() for variable in variables]]
        if bool(torch.isinf(loss)):
            return loss.detach()
        loss.backward()
        return loss

    @torch.no_grad()
    def score(weights, a):
        return float(build(weights, a).log_prob(y).mean())

    def rise_off(vertex, a, alone, step=1e-6):
        """The largest slope of the score moving ``step`` of the weight off ``vertex`` to another expert (0 where
        every move lowers it: the vertex is optimal), the ``steepest`` of a vertex."""
        slopes = [(score((1 - step) * vertex + step * other, a) - alone) / step
                  for other in torch.eye(len(vertex), dtype=dtype) if not bool(torch.equal(other, vertex))]
        return max([0.0, *slopes])

    def fit(start_logits):
        """L-BFGS from ``start_logits`` and the given alpha: ``(score, weights, alpha, steepest)`` of the best point
        it evaluated (where it stopped, or better: it can stop on a step it could not evaluate), ``steepest`` the
        largest gradient of the score in the free variables there (the optimizer's own stop says less: a search
        whose trial steps overflowed runs out of evaluations beside an optimum)."""
        with torch.no_grad():
            logits.copy_(start_logits)
            raw_alpha.fill_(math.log(start / (1 - start)))
        lowest.clear()
        torch.optim.LBFGS(variables, lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=tol * 1e-3,
                          line_search_fn="strong_wolfe").step(objective)
        loss, best_variables = lowest  # the first evaluation, at the finite start, always scores
        with torch.no_grad():
            for variable, value in zip(variables, best_variables):
                variable.copy_(value)
            fitted = float(current_alpha()) if learn_alpha else alpha
        for variable in variables:
            variable.grad = None
        (-build(torch.softmax(logits, 0), current_alpha()).log_prob(y).mean()).backward()
        steepest = max(float(variable.grad.abs().max()) for variable in variables)  # (NaN where any is)
        return -loss, torch.softmax(logits.detach(), 0), fitted, steepest

    best = fit(torch.zeros_like(logits))
    # Away from alpha = 0 and 1 the mean log score need not be concave in the weights, and optima on the simplex's
    # boundary lie at infinite logits: each expert alone (the same pool for any alpha) is scored too, and where one
    # beats the fit, L-BFGS starts again next to it (alpha = -1 with experts far apart ended at the wrong vertex:
    # -3330 against 1.83), from weights of 1e-2 beside it: at 1e-6 the logits' gradients were too small to move them
    # to an optimum next to the vertex (alpha = 0, a weight of 3e-3)
    for vertex in torch.eye(experts.num_experts, dtype=dtype):
        alone = score(vertex, best[2])
        if alone > best[0] - 1e-9 * (1 + abs(best[0])):  # (also a fit that ended at the vertex itself)
            near = torch.log(torch.where(vertex > 0, 1.0, 1e-2))
            best = max(best, (alone, vertex, best[2], None), fit(near), key=lambda candidate: candidate[0])
            if best[3] is None:
                best = best[:3] + (rise_off(vertex, best[2], alone),)
    if not math.isfinite(best[0]):  # every pool tried gives some observation no density
        raise ValueError(f"no weights fit: the mean log score is {best[0]} at every point tried (an observation "
                         "outside the support of every pool of these experts)")
    _, weights, fitted_alpha, steepest = best
    converged = steepest <= math.sqrt(tol)
    if not math.isfinite(steepest):
        warnings.warn(f"fit_weights: the gradient of the mean log score is not finite at the result (weights "
                      f"{weights.tolist()}): next to the simplex's boundary the score may rise without a maximum "
                      "(alpha < 0 and a vanishing weight)", RuntimeWarning, stacklevel=2)
    elif not converged:
        warnings.warn(f"fit_weights: the gradient of the mean log score at the result is {steepest:.3g}, above "
                      f"sqrt(tol) = {math.sqrt(tol):.3g}, after max_iter={max_iter} iterations: the weights may not "
                      "maximise the score; raise max_iter", RuntimeWarning, stacklevel=2)
    with torch.no_grad():
        pool = build(weights, fitted_alpha)
        scores = pool.log_prob(y).detach()
    flat = scores.flatten().to(torch.float64)
    return FitResult(pool, weights, fitted_alpha, float(flat.mean()), float(flat.std() / math.sqrt(flat.numel())),
                     scores, evaluations, converged)
