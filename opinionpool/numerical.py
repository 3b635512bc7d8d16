r"""The numerical engine: Hölder pools for every :math:`\alpha`, with stated errors.

For :math:`\alpha \notin \{0, 1/n\}` the pool :math:`(\sum_j \lambda_j q_j^\alpha)^{1/\alpha}` has no
closed form. Every method here reduces to integrals of the unnormalised pooled density
:math:`u(z) = M_\alpha(q_1(z), \dots, q_M(z))` (the weighted power mean, :func:`log_power_mean`):

* ``"enumeration"``: discrete families, an exact sum over the support (Poisson truncated where the
  stated tail bound is negligible);
* ``"quadrature"``: scalar continuous families, ``scipy.integrate.quad_vec`` on the standardised
  variable, to about 1e-11 relative;
* ``"grid"``: Gaussians of dimension up to 3, tensor-product Gauss–Legendre panels on a box adapted
  to the experts; the error is the difference from a lower-order rule on the same panels;
* ``"importance"``: any dimension, importance sampling from a *normalised* exact pool :math:`p` whose
  scaled density bounds :math:`u \le B p` (the envelopes are chosen in :mod:`opinionpool.pool`).
  The weights :math:`u/p \le B` are bounded, so the normaliser estimate has finite variance and
  the same envelope gives an exact rejection sampler (acceptance probability :math:`u / (B p)`).

Results are returned as :class:`PoolEstimate`: each quantity with its error (a standard error for
importance sampling, an error estimate for quadrature, a bound for a truncated sum).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from scipy import integrate

from .families import ExponentialFamily

#: below this ``|alpha|`` the power mean is evaluated as ``log1p(sum w expm1(alpha l)) / alpha``
SMALL_ALPHA = 1e-3
METHODS = ("enumeration", "quadrature", "grid", "importance")
#: Gaussian pools up to this dimension are integrated on a grid by default
MAX_GRID_DIM = 3
_GRID_NODES_PER_DIM = {1: 4000, 2: 800, 3: 140}
_GRID_CHUNK = 1 << 16
#: the refined panels span the pool's mean +- this many of its standard deviations
_CORE_WIDTH = 12.0


def log_power_mean(log_values: torch.Tensor, log_weights: torch.Tensor, alpha: float) -> torch.Tensor:
    r"""``log (sum_j w_j exp(alpha l_j))^(1/alpha)`` over the last dimension, for log-weights summing to one.

    ``alpha = 0`` is the weighted geometric mean, ``+inf`` / ``-inf`` the maximum / minimum over
    experts with positive weight. For ``0 < |alpha| < SMALL_ALPHA`` the form
    ``log1p(sum_j w_j expm1(alpha l_j)) / alpha`` keeps the ``O(alpha)`` terms that ``logsumexp``
    would round away, so the pool tends continuously to the log-linear pool.
    """
    present = log_weights > -math.inf
    if alpha == 0:
        w = log_weights.exp()
        return torch.where(present, w * log_values, torch.zeros_like(log_values)).sum(-1)
    if math.isinf(alpha):
        fill = torch.full_like(log_values, -math.inf if alpha > 0 else math.inf)
        masked = torch.where(present, log_values, fill)
        return masked.amax(-1) if alpha > 0 else masked.amin(-1)
    scaled = alpha * log_values
    general = torch.logsumexp(log_weights + scaled, dim=-1) / alpha
    if abs(alpha) >= SMALL_ALPHA:
        return general
    bounded = scaled.clamp(-0.5, 0.5)  # where |alpha l| is larger the general form is accurate
    terms = torch.where(present, log_weights.exp() * torch.expm1(bounded), torch.zeros_like(bounded))
    series = torch.log1p(terms.sum(-1)) / alpha
    use_series = ((scaled.abs() <= 0.5) | ~present).all(-1)
    return torch.where(use_series, series, general)


def expert_log_probs(family: ExponentialFamily, params: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``log q_j(value)`` for experts ``params`` (``batch + (M,) + param_shape``) at ``value``
    (``sample + batch + event_shape``), shape ``sample + batch + (M,)``."""
    return family.log_prob(params, value.unsqueeze(value.dim() - len(family.event_shape)))


class Estimate(NamedTuple):
    """A quantity and its error: a standard error (importance sampling), a quadrature error estimate,
    or a truncation bound (enumeration), as :attr:`PoolEstimate.error_kind` says."""

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


def check_quantities(family: ExponentialFamily, quantities) -> frozenset:
    known = {"mean", "variance", "covariance", "expected_statistic"}
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
    if seed is None and generator is None:
        yield
        return
    if generator is not None:
        seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------- weighted point sets
def _point_statistics(family, points, log_w, wanted, standard_errors: bool):
    """Normaliser and moments of the measure ``sum_i exp(log_w_i) delta(points_i)``.

    ``points``: ``(P,) + batch + event``; ``log_w``: ``(P,) + batch``. With ``standard_errors`` the
    errors are the self-normalised importance-sampling (delta-method) standard errors for i.i.d.
    points; otherwise they are zero (the caller supplies them).
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
        mean_stat = (pi_s * stat).sum(0)
        err = ((pi_s**2 * (stat - mean_stat) ** 2).sum(0)).sqrt() if standard_errors else zeros(mean_stat)
        out["expected_statistic"] = Estimate(mean_stat, err)
    if family.circular and wanted & {"mean", "variance"}:
        # circular mean atan2(E sin, E cos) and variance 1 - |E exp(iz)|, as for torch's VonMises
        m, e = out["expected_statistic"]
        length = torch.linalg.vector_norm(m, dim=-1)
        out["mean"] = Estimate(torch.atan2(m[..., 1], m[..., 0]), torch.linalg.vector_norm(e, dim=-1) / length)
        out["variance"] = Estimate(1 - length, torch.linalg.vector_norm(e, dim=-1))
        return log_total, out
    if wanted & {"mean", "variance", "covariance"}:
        mean = (pi_e * points).sum(0)
        dev = points - mean
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


def _finish(method, error_kind, log_z, log_z_err, stats, wanted, **extra) -> PoolEstimate:
    return PoolEstimate(method=method, error_kind=error_kind, log_normalizer=Estimate(log_z, log_z_err),
                        **{name: stats.get(name) for name in ("mean", "variance", "covariance", "expected_statistic")
                           if name in wanted}, **extra)


# --------------------------------------------------------------------------- enumeration
def enumerate_support(family, params, log_weights, alpha):
    """The discrete support: its ``values`` ``(K,) + event_shape``, the same broadcast to points
    ``(K,) + batch + event_shape``, the pool's unnormalised log-density there ``(K,) + batch``, and the
    family's tail bound (see ``support_values``)."""
    values, tail_bound = family.support_values(params)
    batch = params.shape[: params.dim() - len(family.param_shape) - 1]
    points = values.reshape(values.shape[:1] + (1,) * len(batch) + values.shape[1:])
    points = points.expand(values.shape[:1] + batch + values.shape[1:])
    log_u = log_power_mean(expert_log_probs(family, params, points), log_weights, alpha)
    return values, points, log_u, tail_bound


def enumeration_estimate(family, params, log_weights, alpha, wanted) -> PoolEstimate:
    _, points, log_u, tail_bound = enumerate_support(family, params, log_weights, alpha)
    log_z, stats = _point_statistics(family, points.to(params.dtype), log_u, wanted, standard_errors=False)
    # u <= max_j q_j <= sum_j q_j, so the left-out mass, mean and second moment are within the bound
    relative = tail_bound / log_z.exp()
    spread = (1 + stats["mean"].value.abs()) ** 2 if "mean" in stats else 1
    for name, est in stats.items():
        bound = relative * spread if name in ("mean", "variance") else relative
        extra = est.value.dim() - bound.dim()
        stats[name] = Estimate(est.value, bound.reshape(bound.shape + (1,) * extra).expand(est.value.shape))
    kind = "truncation bound" if bool((tail_bound > 0).any()) else "exact"
    return _finish("enumeration", kind, log_z, relative, stats, wanted)


# ---------------------------------------------------------------------------- quadrature
def _each_pool(family, params, log_weights):
    """The batch shape and the ``(params, log_weights)`` of every pool in it, for methods that work one pool at a time."""
    batch = params.shape[: params.dim() - len(family.param_shape) - 1]
    flat_params = params.reshape((-1,) + params.shape[len(batch):])
    flat_lw = log_weights.expand(batch + log_weights.shape[-1:]).reshape(-1, log_weights.shape[-1])
    return batch, list(zip(flat_params, flat_lw))


def _stack_pools(method, rows, batch, wanted) -> PoolEstimate:
    """One ``PoolEstimate`` from per-pool dictionaries of ``Estimate`` s (quadrature-type errors)."""
    def stack(name, field):
        values = torch.stack([getattr(r[name], field) for r in rows])
        return values.reshape(batch + values.shape[1:])

    stats = {name: Estimate(stack(name, "value"), stack(name, "error")) for name in rows[0] if name != "log_normalizer"}
    return _finish(method, "quadrature error estimate", stack("log_normalizer", "value"),
                   stack("log_normalizer", "error"), stats, wanted)


def quadrature_estimate(family, params, log_weights, alpha, wanted, rtol: float = 1e-11) -> PoolEstimate:
    """Adaptive quadrature (``scipy.integrate.quad_vec``), one pool at a time."""
    batch, pools = _each_pool(family, params, log_weights)

    def as_tensors(row):
        return {name: Estimate(*(torch.tensor(v, dtype=params.dtype, device=params.device) for v in pair))
                for name, pair in row.items()}

    rows = [as_tensors(_quadrature_one(family, p, lw, alpha, wanted, rtol)) for p, lw in pools]
    return _stack_pools("quadrature", rows, batch, wanted)


def _quadrature_one(family, params, log_weights, alpha, wanted, rtol):
    lower, upper = family.support_interval
    present = log_weights > -math.inf
    mu, var = _expert_moments(family, params[present])
    finite = math.isfinite(lower) and math.isfinite(upper)
    if finite:
        center, scale = 0.5 * (lower + upper), 0.5 * (upper - lower)
    else:
        w = log_weights[present].exp()
        center = float((w * mu).sum())
        scale = float((w * (var + (mu - center) ** 2)).sum().sqrt())
    points = sorted({min(max(m, lower), upper) for m in mu.tolist()} - {lower, upper})

    def log_u(z: float) -> float:
        value = torch.tensor(z, dtype=params.dtype, device=params.device)
        return float(log_power_mean(expert_log_probs(family, params, value), log_weights, alpha))

    shift = max(log_u(p) for p in points) if points else log_u(center)
    if not math.isfinite(shift):
        raise ValueError("the pooled density vanishes at every expert's mean; the experts do not overlap "
                         f"(alpha={alpha!r}), so the pool is not normalisable numerically")

    def integrate_terms(terms, center, scale):
        def f(z):
            value = terms((z - center) / scale, z)
            if not lower < z < upper:  # an endpoint (measure zero) where a density may be infinite
                return np.zeros_like(value)
            return math.exp(log_u(z) - shift) / scale * value
        result, error = integrate.quad_vec(f, lower, upper, epsabs=0, epsrel=rtol, points=points or None,
                                           norm="max", limit=2000)
        return result, error

    out = {}
    # pass 1 around the experts' centre; pass 2 centred at the pool's mean and rescaled to its spread,
    # so that the variance is not a difference of nearly equal numbers
    (i0, i1, i2), err = integrate_terms(lambda u, z: np.array([1.0, u, u * u]), center, scale)
    out["log_normalizer"] = (shift + math.log(scale) + math.log(i0), err / i0)
    if wanted & {"mean", "variance"} and not family.circular:
        mean = center + scale * i1 / i0
        rough = scale * scale * (i2 / i0 - (i1 / i0) ** 2)
        scale2 = math.sqrt(rough) if rough > 0 else scale
        (j0, j1, j2), err2 = integrate_terms(lambda u, z: np.array([1.0, u, u * u]), mean, scale2)
        offset = j1 / j0
        out["mean"] = (mean + scale2 * offset, scale2 * err2 / j0 * (1 + abs(offset)))
        out["variance"] = (scale2**2 * (j2 / j0 - offset**2), scale2**2 * err2 / j0 * (2 + j2 / j0))
    if family.circular or "expected_statistic" in wanted:
        def statistic(u, z):
            return family.sufficient_statistic(torch.tensor(z, dtype=params.dtype)).cpu().numpy()

        stat, err_t = integrate_terms(statistic, center, scale)
        value, error = stat / i0, np.full_like(stat, err_t / i0 * (1 + np.abs(stat / i0).max()))
        out["expected_statistic"] = (value.tolist(), error.tolist())
        if family.circular:
            length = float(np.hypot(value[0], value[1]))
            out["mean"] = (math.atan2(value[1], value[0]), float(error[0]) / length)
            out["variance"] = (1 - length, float(error[0]))
    return {k: v for k, v in out.items() if k == "log_normalizer" or k in wanted}


def _expert_moments(family, params):
    """Means and variances of scalar experts ``(M,) + param_shape``: the family's, or by quadrature of each
    expert's density for families that do not provide them (e.g. a ``CustomFamily`` without ``mean``)."""
    if family.has_numeric_moments and not family.circular:
        return family.mean(params), family.variance(params)
    lower, upper = family.support_interval
    moments = []
    for p in params:
        def density(z, k, p=p):
            value = torch.tensor(z, dtype=p.dtype, device=p.device)
            return z**k * math.exp(float(family.log_prob(p, value)))

        mass, first, second = (integrate.quad(density, lower, upper, args=(k,), limit=200)[0] for k in range(3))
        mean = first / mass
        moments.append((mean, max(second / mass - mean * mean, 0.0)))
    return (torch.tensor([m for m, _ in moments], dtype=params.dtype),
            torch.tensor([v for _, v in moments], dtype=params.dtype))


# ---------------------------------------------------------------------------------- grid
def grid_estimate(family, params, log_weights, alpha, wanted, nodes_per_panel: int = 10) -> PoolEstimate:
    """Tensor-product Gauss–Legendre quadrature for Gaussian pools of dimension <= 3, one pool at a time.

    The box spans every present expert's mean +- 12 marginal standard deviations (outside it the
    pool, bounded by ``max_j q_j`` for ``alpha > 0`` and by ``min_j q_j`` below, has mass < 1e-30).
    A first pass on panels about two expert standard deviations wide locates the pool; the second
    pass adds panels across the pool's own core (+-10 of its standard deviations), which matters
    for ``alpha < 0`` pools, narrower than every expert. The reported error is the difference from
    the rule with ``nodes_per_panel - 4`` nodes on the same panels.
    """
    batch, pools = _each_pool(family, params, log_weights)
    rows = []
    for p, lw in pools:
        first = _grid_one(family, p, lw, alpha, {"mean", "variance"}, nodes_per_panel, _grid_edges(family, p, lw),
                          core_width=_CORE_WIDTH)
        # all panels on the pool's core when the first pass puts (numerically) no mass outside it
        core_only = bool(first["log_mass_outside_core"] - first["log_normalizer"] < math.log(1e-16))
        edges = _grid_edges(family, p, lw, first["mean"], first["variance"].sqrt(), core_only=core_only)
        fine = _grid_one(family, p, lw, alpha, wanted, nodes_per_panel, edges)
        coarse = _grid_one(family, p, lw, alpha, wanted, nodes_per_panel - 4, edges)
        rows.append({name: Estimate(fine[name], (fine[name] - coarse[name]).abs()) for name in fine})
    return _stack_pools("grid", rows, batch, wanted)


def _grid_edges(family, params, log_weights, centre=None, spread=None, nodes_per_panel: int = 10,
                core_only: bool = False):
    """Panel edges per dimension: uniform over the experts' box, plus a refined block over the pool's core
    (``centre +- _CORE_WIDTH spread``); only the core block with ``core_only``."""
    present = log_weights > -math.inf
    loc = family.mean(params)[present]
    sd = family.variance(params)[present].sqrt()
    if loc.dim() == 1:  # scalar Normal experts
        loc, sd = loc.unsqueeze(-1), sd.unsqueeze(-1)
    dim = loc.shape[-1]
    max_panels = max(2, _GRID_NODES_PER_DIM[dim] // nodes_per_panel)
    all_edges = []
    for d in range(dim):
        lower = float((loc[:, d] - 12 * sd[:, d]).min())
        upper = float((loc[:, d] + 12 * sd[:, d]).max())
        budget = max_panels if centre is None else max_panels // 2
        count = max(1, min(budget, math.ceil((upper - lower) / (2 * float(sd[:, d].min())))))
        edges = np.linspace(lower, upper, count + 1)
        if centre is not None:
            c, s = float(centre.reshape(-1)[d]), float(spread.reshape(-1)[d])
            core_lower, core_upper = max(lower, c - _CORE_WIDTH * s), min(upper, c + _CORE_WIDTH * s)
            if core_only:
                edges = np.linspace(core_lower, core_upper, max_panels + 1)
            else:
                edges = np.union1d(edges, np.linspace(core_lower, core_upper, max(2, max_panels - count) + 1))
        all_edges.append(edges)
    return all_edges


def _grid_one(family, params, log_weights, alpha, wanted, nodes_per_panel, edges_per_dim, core_width=None):
    """The rule on the given panels; with ``core_width`` also the log-mass outside mean +- core_width sd."""
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
    log_w = torch.cat([
        log_power_mean(expert_log_probs(family, params, chunk.reshape(chunk.shape[:1] + value_shape)),
                       log_weights, alpha)
        for chunk in grid.split(_GRID_CHUNK)
    ]) + log_node_w
    points = grid.reshape(grid.shape[:1] + value_shape)
    log_z, stats = _point_statistics(family, points, log_w, wanted, standard_errors=False)
    out = {"log_normalizer": log_z, **{name: est.value for name, est in stats.items() if name in wanted}}
    if core_width is not None:
        spread = core_width * stats["variance"].value.sqrt().reshape(-1)
        outside = ((grid - stats["mean"].value.reshape(-1)).abs() > spread).any(-1)
        out["log_mass_outside_core"] = torch.logsumexp(torch.where(outside, log_w, -math.inf), dim=0)
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
                        chunk_size: int = 8192) -> PoolEstimate:
    """Importance sampling from the envelope's proposal: ``Z = E_p[u/p]`` (unbiased, bounded weights)
    and self-normalised moments, each with its delta-method standard error."""
    with torch.no_grad():
        z = envelope.proposal.sample((num_samples,))
        _, log_ratio = _log_target_and_ratio(family, params, log_weights, alpha, envelope, z, chunk_size)
        log_w = log_ratio + envelope.log_bound  # log(u / p)
        log_z = torch.logsumexp(log_w, dim=0) - math.log(num_samples)
        w = torch.exp(log_w - log_w.amax(0))
        rel_se = w.std(0) / (w.mean(0) * math.sqrt(num_samples))
        ess = w.sum(0) ** 2 / (w * w).sum(0)
        _, stats = _point_statistics(family, z.to(params.dtype), log_w, wanted, standard_errors=True)
    return _finish("importance", "standard error", log_z, rel_se, stats, wanted,
                   effective_sample_size=ess, num_samples=num_samples)


def rejection_sample(family, params, log_weights, alpha, envelope: Envelope, num_samples: int,
                     max_rounds: int = 1000, chunk_size: int = 8192) -> torch.Tensor:
    """Exact samples ``(num_samples,) + batch + event`` by rejection from the envelope.

    Raises ``RuntimeError`` if a proposal violates the envelope bound (which would bias the
    samples) or if ``max_rounds`` rounds of ``num_samples`` proposals leave some slots empty.
    """
    batch = params.shape[: params.dim() - len(family.param_shape) - 1]
    out, filled = None, None
    for _ in range(max_rounds):
        z = envelope.proposal.sample((num_samples,))
        log_u, log_ratio = _log_target_and_ratio(family, params, log_weights, alpha, envelope, z, chunk_size)
        slack = 1e3 * torch.finfo(log_u.dtype).eps * (1 + log_u.abs())
        if bool((log_ratio > slack).any()):
            worst = float((log_ratio - slack).max())
            raise RuntimeError(f"rejection sampler: the envelope ({envelope.description}) is exceeded by a factor "
                               f"exp({worst:.3g}) at a proposed point; the samples would be biased")
        accept = torch.rand_like(log_ratio).log() < log_ratio
        if out is None:
            out, filled = z.clone(), accept
        else:
            take = accept & ~filled
            mask = take.reshape(take.shape + (1,) * (z.dim() - take.dim()))
            out = torch.where(mask, z, out)
            filled = filled | take
        if bool(filled.all()):
            return out
    rate = float(filled.to(log_ratio.dtype).mean())
    raise RuntimeError(f"rejection sampler: after {max_rounds} rounds only {rate:.1%} of the {num_samples} x "
                       f"{math.prod(batch)} requested samples were accepted; the envelope ({envelope.description}) "
                       "is too loose for these experts")
