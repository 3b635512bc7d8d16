"""Every family and alpha in {0, 1/4, 1/3, 1/2, 1, 2, -1}: the library's normaliser, mean, variance,
moment-matched statistics and log density against (a) independent quadrature or exact sums and (b) Monte
Carlo; the affinities between two experts against the same two references.

The references never call opinionpool: densities come from scipy.stats, quadrature from scipy, and the
Monte Carlo draws from the equal-weight mixture of the experts (numpy), reweighted to the pool by the power
mean of the experts' densities. The power mean is at most M times that mixture for every alpha, so the
weights are bounded and the standard errors are honest.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import integrate, stats
from torch.distributions import (
    Bernoulli,
    Beta,
    Binomial,
    Categorical,
    Dirichlet,
    Exponential,
    Gamma,
    Independent,
    MultivariateNormal,
    Normal,
    Poisson,
    VonMises,
)

import opinionpool

from .reference import log_power_mean
from .report import Z_TOLERANCE, Check, compare

__all__ = ["ALPHAS", "WEIGHTS", "Case", "cases", "quadrature_reference", "monte_carlo_reference", "run",
           "affinity_reference", "affinity_checks", "laplace_affinity_checks", "stated_error_checks",
           "pooled_stated_error_check"]

ALPHAS = (0.0, 0.25, 1 / 3, 0.5, 1.0, 2.0, -1.0)
WEIGHTS = np.array([0.2, 0.3, 0.5])
QUAD_TOLERANCE = 1e-8
#: the Monte Carlo reference draws more until its effective sample size reaches this
MIN_ESS = 10_000
#: seeds of the engine's importance estimates whose spread checks their stated standard errors: the log ratio's
#: standard error is then 0.05, so a tolerance of 4.5 of them fails an error stated 1.25 times too large or small
#: (at 30 seeds a check passed one stated 1.5 times too large 89 % of the time; a case takes about 25 s)
STATED_ERROR_REPEATS = 200
#: (mean, standard deviation) of experts far apart and of very different scales
FAR_APART = ((0.0, 1e-3), (25.0, 8.0), (-1.0, 1.0))


@dataclass
class Case:
    """One family: torch experts, the same experts in scipy, and how to integrate over their support."""

    name: str
    experts: Callable[[], list]
    scipy: list
    domain: str  # "real", "positive", "unit", "circle", "discrete", "plane", "simplex"
    support: np.ndarray | None = None  # discrete support
    statistic: Callable | None = None  # T(z) for the moment-matching check (numpy)
    #: reference statistics the library does not report for this family (any other one it lacks fails a check)
    unreported: tuple = ()

    def logpdf(self, z):
        if self.domain == "discrete":
            return np.array([d.logpmf(z) for d in self.scipy])
        if self.domain == "simplex":
            return np.array([d.logpdf(z.T) for d in self.scipy])
        return np.array([d.logpdf(z) for d in self.scipy])

    def sample_mixture(self, n, rng):
        which = rng.integers(len(self.scipy), size=n)
        draws = [np.asarray(d.rvs(size=n, random_state=rng)) for d in self.scipy]
        z = np.choose(which, draws) if draws[0].ndim == 1 else np.stack(draws)[which, np.arange(n)]
        if self.domain == "circle":
            z = np.mod(z + np.pi, 2 * np.pi) - np.pi
        return z


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def cases() -> list[Case]:
    mvn_cov = [np.array([[1.0, 0.4], [0.4, 0.5]]), np.array([[0.3, -0.1], [-0.1, 0.8]]),
               np.array([[2.0, 0.0], [0.0, 0.2]])]
    mvn_loc = [np.array([0.0, 0.5]), np.array([1.5, -0.5]), np.array([-1.0, 1.0])]
    diag_loc, diag_sd = np.array([[0.0, 0.0], [1.0, 0.2], [4.0, 0.0]]), np.array([[0.7, 0.9], [0.8, 0.5], [0.45, 1.2]])
    return [
        Case("Normal", lambda: [Normal(_t(m), _t(s)) for m, s in ((0.0, 1.0), (2.0, 0.5), (-1.0, 2.0))],
             [stats.norm(m, s) for m, s in ((0.0, 1.0), (2.0, 0.5), (-1.0, 2.0))], "real"),
        # experts far apart, of scales 1e-3 to 8: the pools sit where no expert's mass is (alpha < 0) or stretch
        # across the gap
        Case("Normal, far apart", lambda: [Normal(_t(m), _t(s)) for m, s in FAR_APART],
             [stats.norm(m, s) for m, s in FAR_APART], "real"),
        Case("Exponential", lambda: [Exponential(_t(r)) for r in (0.5, 2.0, 5.0)],
             [stats.expon(scale=1 / r) for r in (0.5, 2.0, 5.0)], "positive", statistic=lambda z: [z]),
        Case("Gamma", lambda: [Gamma(_t(a), _t(b)) for a, b in ((2.0, 1.0), (5.0, 3.0), (1.5, 0.5))],
             [stats.gamma(a, scale=1 / b) for a, b in ((2.0, 1.0), (5.0, 3.0), (1.5, 0.5))], "positive",
             statistic=lambda z: [np.log(z), z]),
        Case("Beta", lambda: [Beta(_t(a), _t(b)) for a, b in ((2.0, 3.0), (5.0, 1.5), (30.0, 40.0))],
             [stats.beta(a, b) for a, b in ((2.0, 3.0), (5.0, 1.5), (30.0, 40.0))], "unit",
             statistic=lambda z: [np.log(z), np.log1p(-z)]),
        Case("VonMises", lambda: [VonMises(_t(m), _t(k)) for m, k in ((0.5, 2.0), (-2.0, 4.0), (2.8, 0.7))],
             [stats.vonmises(k, loc=m) for m, k in ((0.5, 2.0), (-2.0, 4.0), (2.8, 0.7))], "circle",
             statistic=lambda z: [np.cos(z), np.sin(z)]),
        Case("Poisson", lambda: [Poisson(_t(r)) for r in (3.0, 10.0, 0.5)],
             [stats.poisson(r) for r in (3.0, 10.0, 0.5)], "discrete", np.arange(400), statistic=lambda z: [z]),
        Case("Binomial", lambda: [Binomial(12, _t(p)) for p in (0.2, 0.7, 0.45)],
             [stats.binom(12, p) for p in (0.2, 0.7, 0.45)], "discrete", np.arange(13),
             statistic=lambda z: [12 - z, z]),
        Case("Bernoulli", lambda: [Bernoulli(_t(p)) for p in (0.2, 0.7, 0.45)],
             [stats.bernoulli(p) for p in (0.2, 0.7, 0.45)], "discrete", np.arange(2),
             statistic=lambda z: [1 - z, z]),
        Case("Categorical", lambda: [Categorical(probs=_t(p)) for p in ((0.1, 0.6, 0.3), (0.5, 0.2, 0.3),
                                                                        (0.05, 0.15, 0.8))],
             [stats.rv_discrete(values=(np.arange(3), p)) for p in ((0.1, 0.6, 0.3), (0.5, 0.2, 0.3),
                                                                   (0.05, 0.15, 0.8))],
             # the categories are labels: the library reports no numeric mean or variance (E[T] is checked)
             "discrete", np.arange(3), statistic=lambda z: [z == 0, z == 1, z == 2], unreported=("mean", "variance")),
        # its moment-matched Gaussian is diagonal: the pool's covariance (not 0 for alpha != 0) is not reported
        Case("Independent(Normal) 2-D", lambda: [Independent(Normal(_t(m), _t(s)), 1) for m, s in zip(diag_loc, diag_sd)],
             [stats.multivariate_normal(m, np.diag(s**2)) for m, s in zip(diag_loc, diag_sd)], "plane",
             unreported=("covariance",)),
        Case("MultivariateNormal 2-D", lambda: [MultivariateNormal(_t(m), _t(c)) for m, c in zip(mvn_loc, mvn_cov)],
             [stats.multivariate_normal(m, c) for m, c in zip(mvn_loc, mvn_cov)], "plane"),
        Case("Dirichlet K=3", lambda: [Dirichlet(_t(c)) for c in ((2.0, 3.0, 4.0), (6.0, 2.0, 2.0), (3.0, 3.0, 9.0))],
             [stats.dirichlet(c) for c in ((2.0, 3.0, 4.0), (6.0, 2.0, 2.0), (3.0, 3.0, 9.0))], "simplex",
             statistic=lambda z: list(np.log(z).T)),
    ]


# ----------------------------------------------------------------------------- references
def _nodes(case: Case):
    """Points and weights of the rule over a discrete, planar or simplex support (``None`` for 1-D supports, which
    ``scipy.integrate.quad`` integrates): exact sums; a dense trapezoid grid on a box 12 standard deviations
    beyond every expert (the integrands vanish on its edges); a tensor Gauss-Legendre rule on the square mapped
    onto the simplex (z1 = u, z2 = (1 - u) v, z3 = (1 - u)(1 - v), Jacobian 1 - u; the Dirichlet experts'
    concentrations are at least 2, so the integrands are smooth and vanish on the edges)."""
    if case.domain == "discrete":
        return case.support, np.ones(len(case.support))
    if case.domain == "plane":
        sd = np.array([np.sqrt(np.diag(d.cov)) for d in case.scipy])
        loc = np.array([d.mean for d in case.scipy])
        lo, hi = (loc - 12 * sd).min(0), (loc + 12 * sd).max(0)
        x, y = np.meshgrid(np.linspace(lo[0], hi[0], 1201), np.linspace(lo[1], hi[1], 1201), indexing="ij")
        cell = (x[1, 0] - x[0, 0]) * (y[0, 1] - y[0, 0])
        return np.stack((x.ravel(), y.ravel()), -1), np.full(x.size, cell)
    if case.domain == "simplex":
        t, w = np.polynomial.legendre.leggauss(400)  # KL's p log(p / q) ~ z log z at the edges: error ~ nodes^-4
        t, w = (t + 1) / 2, w / 2
        u, v = np.meshgrid(t, t, indexing="ij")
        cell = np.outer(w, w) * (1 - u)
        return np.stack((u, (1 - u) * v, (1 - u) * (1 - v)), -1).reshape(-1, 3), cell.ravel()
    return None


def _quadrature_setup(case: Case):
    """Limits and options of ``scipy.integrate.quad`` over a 1-D support: breakpoints at the experts' means and, on
    the real line, at up to 32 of their standard deviations from them, which it is cut at 64 of them beyond every
    expert (finite, so that quad takes the breakpoints): an expert of scale 1e-3 beside one of scale 8 was sampled
    too coarsely by breakpoints at the means alone (log Z 1.4e-6 off at alpha = 1/2, 0.7 at alpha = -1)."""
    lower, upper = {"real": (-np.inf, np.inf), "positive": (0, np.inf), "unit": (0, 1), "circle": (-np.pi, np.pi)}[
        case.domain]
    points = [float(d.mean()) for d in case.scipy] if case.domain in ("real", "unit") else None
    if case.domain == "real":
        mean, sd = (np.array([float(f(d)) for d in case.scipy]) for f in (lambda d: d.mean(), lambda d: d.std()))
        lower, upper = float((mean - 64 * sd).min()), float((mean + 64 * sd).max())
        offsets = np.array([-32, -16, -8, -4, -2, -1, -0.5, 0, 0.5, 1, 2, 4, 8, 16, 32])
        points = sorted(set((mean[:, None] + sd[:, None] * offsets).ravel().tolist()))
    return lower, upper, dict(epsabs=0, epsrel=1e-12, limit=max(400, 50 * len(points or ())), points=points)


def _reference_allowance(case: Case, reference: float) -> float:
    """How far ``quadrature_reference``'s value may itself be off: scipy's adaptive quadrature at a relative
    tolerance of 1e-12, the 1201 x 1201 grid of the plane and the 400 x 400 rule of the simplex to about 1e-10 of
    their values' size, exact sums to their rounding."""
    rule = _nodes(case)
    if case.domain == "discrete":
        size = 1e-13
    elif rule is None:
        size = 1e-11
    else:
        size = 1e-10
    return size * (1 + abs(reference))


def quadrature_reference(case: Case, alpha: float):
    """log Z, mean, variance (E[T] where the case has a statistic; the covariance in the plane) of the pool by
    quadrature or exact sums."""
    rule = _nodes(case)
    if rule is not None:
        z, cell = rule
        mass = np.exp(log_power_mean(case.logpdf(z), WEIGHTS, alpha)) * cell
        total = mass.sum()
        p = mass / total
        mean = p @ z
        out = {"log Z": math.log(total), "mean": mean, "variance": p @ (z - mean) ** 2}
        if case.domain == "plane":
            out["covariance"] = p @ ((z[:, 0] - mean[0]) * (z[:, 1] - mean[1]))
        if case.statistic is not None:
            out["E[T]"] = [p @ t for t in case.statistic(z)]
        return out
    lower, upper, opts = _quadrature_setup(case)

    def pooled(z):
        return float(np.exp(log_power_mean(case.logpdf(np.array([z]))[:, 0], WEIGHTS, alpha)))

    z0 = integrate.quad(pooled, lower, upper, **opts)[0]
    out = {"log Z": math.log(z0)}
    if case.domain != "circle":
        mean = integrate.quad(lambda z: z * pooled(z), lower, upper, **opts)[0] / z0
        out["mean"] = mean
        out["variance"] = integrate.quad(lambda z: (z - mean) ** 2 * pooled(z), lower, upper, **opts)[0] / z0
    if case.statistic is not None:
        out["E[T]"] = [integrate.quad(lambda z, k=k: case.statistic(z)[k] * pooled(z), lower, upper, **opts)[0] / z0
                       for k in range(len(case.statistic(0.5)))]
    return out


def _integrals(case: Case, integrands) -> list[float]:
    """The integrals over the case's support of each ``integrand(log_densities)``, a function of the experts' log
    densities (M, N) at N points, by the rule of ``quadrature_reference`` (the densities at its nodes computed
    once)."""
    rule = _nodes(case)
    if rule is not None:
        z, cell = rule
        log_q = case.logpdf(z)
        return [float(integrand(log_q) @ cell) for integrand in integrands]
    lower, upper, opts = _quadrature_setup(case)
    return [integrate.quad(lambda z, f=integrand: float(f(case.logpdf(np.array([z])))[0]), lower, upper, **opts)[0]
            for integrand in integrands]


def _kl_integrand(log_q):
    """p log(p / q) of the first two experts, 0 where p is (p log p -> 0)."""
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(log_q[0]), np.exp(log_q[0]) * (log_q[0] - log_q[1]), 0.0)


def affinity_reference(case: Case) -> dict:
    """Bhattacharyya coefficient int sqrt(p q), KL(p || q) and log Chernoff(0.7) log int p^0.7 q^0.3 between the
    case's first two experts p and q, by the rule of ``quadrature_reference``."""
    coefficient, kl, chernoff = _integrals(case, (lambda log_q: np.exp(0.5 * (log_q[0] + log_q[1])), _kl_integrand,
                                                   lambda log_q: np.exp(0.7 * log_q[0] + 0.3 * log_q[1])))
    return {"Bhattacharyya coefficient": coefficient, "KL(p || q)": kl, "log Chernoff(0.7)": math.log(chernoff)}


def monte_carlo_reference(case: Case, alpha: float, num_samples: int, seed: int):
    """Importance sampling from the experts' equal-weight mixture: estimates with standard errors. Where the pool
    lies away from the mixture (alpha < 0) few draws carry the weight, and the standard errors themselves come out
    too small (at an effective sample size of 1 % of 20 000 draws the z-scores had a standard deviation of 1.4):
    draws are added, up to 16 times ``num_samples``, until the effective sample size reaches ``MIN_ESS``; where it
    does not, the returned ``"ESS"`` says so (the checks against these estimates carry it in their note)."""
    rng = np.random.default_rng(seed)
    draws, weights = [], []
    for _ in range(16):
        z = case.sample_mixture(num_samples, rng)
        log_q = case.logpdf(z)  # (M, N)
        log_mix = np.logaddexp.reduce(log_q, axis=0) - math.log(len(case.scipy))
        log_u = log_power_mean(log_q, WEIGHTS, alpha)
        draws.append(z)
        weights.append(np.exp(log_u - log_mix))
        w = np.concatenate(weights)
        if w.sum() ** 2 / (w**2).sum() >= MIN_ESS:
            break
    z = np.concatenate(draws)
    num_samples = len(w)
    z_hat = w.mean()
    out = {"log Z": (math.log(z_hat), w.std(ddof=1) / (z_hat * math.sqrt(num_samples))),
           "ESS": (w.sum() ** 2 / (w**2).sum(), 0.0)}
    p = w / w.sum()
    zz = z.astype(float)
    pw = p if zz.ndim == 1 else p[:, None]
    if case.domain != "circle":
        mean = (pw * zz).sum(0)
        dev2 = (zz - mean) ** 2
        var = (pw * dev2).sum(0)
        out["mean"] = (mean, np.sqrt((pw**2 * dev2).sum(0)))
        out["variance"] = (var, np.sqrt((pw**2 * (dev2 - var) ** 2).sum(0)))
    if case.domain == "circle":
        stats_t = [np.cos(zz), np.sin(zz)]
        out["E[T]"] = [((p * t).sum(), np.sqrt((p**2 * (t - (p * t).sum()) ** 2).sum())) for t in stats_t]
    return out


# --------------------------------------------------------------------------------- checks
def _library(case: Case, alpha: float, points: np.ndarray):
    """The library's values (its log density at ``points`` among them), and the standard errors of those that are
    themselves Monte Carlo estimates."""
    pool = opinionpool.holder(case.experts(), alpha=alpha, weights=WEIGHTS.tolist())
    family = pool.family
    out = {"log Z": float(pool.log_normalizer)}
    value = torch.as_tensor(points, dtype=torch.long if case.name == "Categorical" else torch.float64)
    out["log density"] = pool.log_prob(value).detach().numpy()
    if family.has_numeric_moments and not family.circular:
        out["mean"] = pool.mean.detach().numpy()
        out["variance"] = pool.variance.detach().numpy()
        if family.multivariate:  # the pool's own, not only the matched Gaussian's (exact pools: another code path)
            out["covariance"] = pool.covariance_matrix.detach().numpy()[..., 0, 1]
    matched = pool.moment_match()
    if family.gaussian:  # the moment-matched Gaussian (the Hellinger aggregator at alpha = 1/2) has the pool's moments
        out["matched mean"] = matched.mean.detach().numpy()
        out["matched variance"] = matched.variance.detach().numpy()
        if hasattr(matched, "covariance_matrix"):
            out["matched covariance"] = matched.covariance_matrix.detach().numpy()[0, 1]
    else:
        params = family.params_from_distribution(matched) if not hasattr(matched, "params") else matched.params
        out["E[T]"] = family.mean_parameters(family.to_natural(params)).detach().numpy()
        if family.name == "Categorical":
            out["E[T]"] = matched.probs.detach().numpy()
    errors = {}
    summary = getattr(pool, "summary", None)
    if summary is not None:  # the engine's stated errors: standard errors, or bounds (quadrature, grid, sums)
        errors = {"log Z": summary.log_normalizer.error.numpy()}
        for name in ("mean", "variance"):
            if getattr(summary, name) is not None:
                errors[name] = errors[f"matched {name}"] = getattr(summary, name).error.numpy()
        if summary.covariance is not None:
            errors["covariance"] = errors["matched covariance"] = summary.covariance.error.numpy()[..., 0, 1]
        # log q(z) = log of the power mean - log Z: the estimate of log Z carries the error at every point
        errors["log density"] = np.full(len(points), float(errors["log Z"]))
        if "E[T]" in out:  # the moment-matched statistic is the estimate's own expected statistic
            statistic = summary.expected_statistic or pool.estimate(["expected_statistic"],
                                                                    seed=0).expected_statistic
            errors["E[T]"] = statistic.error.numpy()
    kind = None if summary is None else summary.error_kind
    return out, errors, kind, "HolderPool" if summary is None else f"numerical engine ({summary.method})"


def stated_error_checks(case: Case, alpha: float, group: str, note: str = "",
                        repeats: int = STATED_ERROR_REPEATS) -> list[Check]:
    """The engine's stated standard errors (its importance estimates') against the spread of its estimates over
    ``repeats`` seeds: the checks against quadrature and Monte Carlo divide by the stated error, so an error stated
    too large would pass them all. ``log(spread / stated)`` has about the standard error ``1 / sqrt(2 (repeats -
    1))`` where the estimates are about normal (the stated error taken as the root mean square of the seeds')."""
    pool = opinionpool.holder(case.experts(), alpha=alpha, weights=WEIGHTS.tolist())
    # what _library compares: the moments where the family has them, E[T] where it is not Gaussian
    quantities = (("mean", "variance") if pool.family.has_numeric_moments else ()) \
        + (() if pool.family.gaussian else ("expected_statistic",))
    start = time.perf_counter()
    estimates = [pool.estimate(quantities, seed=seed) for seed in range(1, repeats + 1)]
    seconds = (time.perf_counter() - start) / repeats
    checks = []
    for label, field in (("log Z", "log_normalizer"), ("mean", "mean"), ("variance", "variance"),
                         ("E[T]", "expected_statistic")):
        if getattr(estimates[0], field) is None:
            continue
        values = np.stack([np.ravel(getattr(e, field).value.numpy()) for e in estimates])
        errors = np.stack([np.ravel(getattr(e, field).error.numpy()) for e in estimates])
        for i in range(values.shape[1]):
            name = f"{label}[{i}]" if values.shape[1] > 1 else label
            checks.append(compare(group, f"{name}: spread over {repeats} seeds vs its stated standard error",
                                  values[:, i].std(ddof=1), math.sqrt(np.mean(errors[:, i] ** 2)), "log ratio",
                                  Z_TOLERANCE, standard_error=1 / math.sqrt(2 * (repeats - 1)), seconds=seconds,
                                  note=note))
    return checks


def run(num_samples: int = 200_000, seed: int = 0, families=None, alphas=ALPHAS, progress=None) -> tuple[list, list]:
    """All closed-form checks; returns the checks and the per-case z-scores (for the figure)."""
    checks, zscores = [], []
    selected = [c for c in cases() if families is None or c.name in families]
    jobs = [(case, alpha) for case in selected for alpha in alphas]
    for case, alpha in (progress(jobs) if progress else jobs):
        group = f"{case.name}, alpha={alpha:.4g}"
        points = case.sample_mixture(5, np.random.default_rng(seed))  # where the log density is compared
        start = time.perf_counter()
        lib, lib_errors, error_kind, note = _library(case, alpha, points)
        lib_seconds = time.perf_counter() - start
        quad = quadrature_reference(case, alpha)
        quad["log density"] = log_power_mean(case.logpdf(points), WEIGHTS, alpha) - quad["log Z"]
        mc = {name: (np.array([v for v, _ in entry]), np.array([e for _, e in entry])) if name == "E[T]"
              else tuple(np.atleast_1d(v) for v in entry) for name, entry in
              monte_carlo_reference(case, alpha, num_samples, seed).items()}  # name -> (values, standard errors)
        ess = float(mc.pop("ESS")[0][0])
        # (standard errors from fewer effective draws come out too small: said beside every z-score they give)
        mc_note = note if ess >= MIN_ESS else f"{note}; Monte Carlo ESS {ess:.0f} < {MIN_ESS}: its errors optimistic"
        if error_kind == "standard error":  # checked against its value's spread, not only divided by
            checks += stated_error_checks(case, alpha, group, note)
        reported = {name.removeprefix("matched ") for name in lib}
        for name in sorted(set(quad) - reported - set(case.unreported)):  # a statistic the library lost fails
            checks.append(compare(group, f"{name}: not reported by the library", math.nan,
                                  np.ravel(quad[name])[0], "absolute", QUAD_TOLERANCE, note=note))
        for name, value in lib.items():
            got = np.atleast_1d(value)
            reference_name = name.removeprefix("matched ")  # the moment-matched Gaussian against the pool's moments
            if reference_name in quad:
                ref = np.atleast_1d(quad[reference_name])
                if len(ref) != len(got):  # a shape the library got wrong fails (zip would compare the overlap)
                    checks.append(compare(group, f"{name}: {len(got)} values for quadrature's {len(ref)}", math.nan,
                                          math.nan, "absolute", QUAD_TOLERANCE, note=note))
                for i, (g, r) in enumerate(zip(got, ref)):
                    label = f"{name}[{i}]" if len(got) > 1 else name
                    stated = float(np.atleast_1d(lib_errors[name])[i]) if name in lib_errors else None
                    if error_kind == "standard error":  # the library's value is itself a Monte Carlo estimate
                        checks.append(compare(group, f"{label} vs quadrature", g, r, "z-score", Z_TOLERANCE,
                                              standard_error=stated, seconds=lib_seconds, note=note))
                        continue
                    rel_kind = "relative" if reference_name == "variance" else "absolute"
                    tolerance = QUAD_TOLERANCE if name != "E[T]" else 1e-7
                    if name == "log density":  # far from every expert, -1e8: a few of its ulps are 1e-8
                        tolerance *= max(1.0, abs(float(r)))
                    checks.append(compare(group, f"{label} vs quadrature", g, r, rel_kind, tolerance,
                                          seconds=lib_seconds, note=note))
                    if stated is not None:  # a bound the engine states: the reference must lie within it
                        checks.append(compare(group, f"{label} within its stated {error_kind}", g, r, "absolute",
                                              stated + _reference_allowance(case, r), seconds=lib_seconds,
                                              note=note))
            if name in mc:
                ref, se = mc[name]
                if len(ref) != len(got):
                    checks.append(compare(group, f"{name}: {len(got)} values for Monte Carlo's {len(ref)}", math.nan,
                                          math.nan, "absolute", QUAD_TOLERANCE, note=note))
                # an importance-sampling library value carries its own standard error: combine both
                if error_kind == "standard error":
                    se = np.hypot(se, np.atleast_1d(lib_errors.get(name, 0.0)))
                for i, (g, r, s) in enumerate(zip(got, ref, se)):
                    label = f"{name}[{i}]" if len(got) > 1 else name
                    check = compare(group, f"{label} vs Monte Carlo", g, r, "z-score", Z_TOLERANCE,
                                    standard_error=float(s), seconds=lib_seconds, note=mc_note)
                    checks.append(check)
                    zscores.append((case.name, alpha, label, check.error))
    return checks + pooled_stated_error_check(checks), zscores


def pooled_stated_error_check(checks) -> list[Check]:
    """The stated-error checks' log ratios pooled over cases, for a misstatement common to every case that each
    check alone passes (one of 1.2 at ``STATED_ERROR_REPEATS`` seeds). A case's quantities share their seeds'
    draws, so each case counts once, by its mean z-score (a unit variance at most); the cases' draws are
    independent. Empty for fewer than two cases."""
    by_case: dict[str, list[Check]] = {}
    for check in checks:
        if check.kind == "log ratio" and "spread over" in check.name:
            by_case.setdefault(check.group, []).append(check)
    if len(by_case) < 2:
        return []
    means = [float(np.mean([c.error for c in case])) for case in by_case.values()]
    log_ratio = float(np.mean([np.mean([math.log(c.got / c.reference) for c in case]) for case in by_case.values()]))
    return [Check("stated errors, pooled", f"spread vs stated standard error, mean over {len(means)} cases",
                  math.exp(log_ratio), 1.0, "log ratio", float(np.sum(means) / math.sqrt(len(means))), Z_TOLERANCE)]


# ----------------------------------------------------------------------------- affinities
def affinity_checks(num_samples: int = 200_000, seed: int = 1) -> list[Check]:
    """Bhattacharyya coefficient, KL and log Chernoff(0.7) between the first two experts of each family against
    (a) quadrature or exact sums (``affinity_reference``) and (b) Monte Carlo under the first expert."""
    checks = []
    rng = np.random.default_rng(seed)
    for case in cases():
        experts = case.experts()
        p, q = experts[0], experts[1]
        start = time.perf_counter()
        library = {
            "Bhattacharyya coefficient": float(opinionpool.bhattacharyya_coefficient(p, q)),
            "KL(p || q)": float(opinionpool.kl_divergence(p, q)),
            "log Chernoff(0.7)": float(opinionpool.log_chernoff_coefficient(p, q, 0.7)),
        }
        seconds = time.perf_counter() - start
        group = f"affinities, {case.name}"
        for name, reference in affinity_reference(case).items():
            checks.append(compare(group, f"{name} vs quadrature", library[name], reference, "absolute",
                                  QUAD_TOLERANCE, seconds=seconds))
        z = np.asarray(case.scipy[0].rvs(size=num_samples, random_state=rng))
        if case.domain == "circle":
            z = np.mod(z + np.pi, 2 * np.pi) - np.pi
        log_q = case.logpdf(z)
        log_ratio = log_q[1] - log_q[0]
        samples = {"Bhattacharyya coefficient": np.exp(0.5 * log_ratio), "KL(p || q)": -log_ratio,
                   "log Chernoff(0.7)": np.exp(0.3 * log_ratio)}
        for name, values in samples.items():
            mean, se = values.mean(), values.std(ddof=1) / math.sqrt(num_samples)
            got = library[name]
            if name.startswith("log"):  # delta method on the log of a mean
                mean, se = math.log(mean), se / mean
            checks.append(compare(group, f"{name} vs Monte Carlo", got, mean, "z-score", Z_TOLERANCE,
                                  standard_error=se, seconds=seconds))
    return checks + laplace_affinity_checks(num_samples, rng)


#: three 3-D diagonal Laplace experts (locations, log-variances log(2 b^2)) of unequal scales, and weights
LAPLACE_LOC = np.array([[0.0, 1.0, -0.5], [0.8, -0.4, 0.3], [2.5, 0.0, 1.5]])
LAPLACE_LOGVAR = np.array([[0.0, -1.0, 0.5], [1.0, 0.3, -0.7], [-0.5, 0.8, 0.0]])
LAPLACE_WEIGHTS = np.array([0.5, 0.3, 0.2])


def laplace_affinity_checks(num_samples: int, rng: np.random.Generator) -> list[Check]:
    """The diagonal Laplace experts of the MMVAE code (``functional``'s ``family="laplace"``): the Bhattacharyya
    coefficient of the first two, and the Hellinger pool's pairwise mass ``1 - sum_j w_j^2 / Z``,
    ``Z = int (sum_j w_j sqrt(q_j))^2 = sum_ij w_i w_j BC_ij``, against (a) quadrature (each ``BC_ij`` a product
    over coordinates of 1-D integrals of scipy's Laplace densities) and (b) Monte Carlo under the first expert
    and ``Z`` by importance sampling from the experts' equal-weight mixture (the integrand is at most 3 times
    that mixture's density)."""
    loc, logvar = torch.tensor(LAPLACE_LOC), torch.tensor(LAPLACE_LOGVAR)
    start = time.perf_counter()
    log_bc = float(opinionpool.functional.log_bhattacharyya(loc[0], logvar[0], loc[1], logvar[1], family="laplace"))
    mass = float(opinionpool.functional.hellinger_pairwise_mass(loc.unsqueeze(1), logvar.unsqueeze(1),
                                                                weights=torch.tensor(LAPLACE_WEIGHTS),
                                                                family="laplace"))
    seconds = time.perf_counter() - start
    experts = [stats.laplace(loc=LAPLACE_LOC[j], scale=np.sqrt(np.exp(LAPLACE_LOGVAR[j]) / 2)) for j in range(3)]
    scales = np.sqrt(np.exp(LAPLACE_LOGVAR) / 2)

    def coefficient(i, j):  # int sqrt(q_i q_j) over R^3, coordinate by coordinate, kinks at both locations
        return math.prod(integrate.quad(
            lambda z, d=d: math.sqrt(stats.laplace.pdf(z, LAPLACE_LOC[i, d], scales[i, d])
                                     * stats.laplace.pdf(z, LAPLACE_LOC[j, d], scales[j, d])),
            -80.0, 80.0, points=sorted({LAPLACE_LOC[i, d], LAPLACE_LOC[j, d]}), epsabs=0, epsrel=1e-12, limit=400)[0]
            for d in range(3))

    pairs = {(i, j): coefficient(i, j) for i in range(3) for j in range(i, 3)}  # BC_ij = BC_ji
    quad_z = sum(LAPLACE_WEIGHTS[i] * LAPLACE_WEIGHTS[j] * pairs[min(i, j), max(i, j)] for i in range(3) for j in range(3))

    def log_densities(z):  # (3, n): each expert's log-density at the draws z (n, 3)
        return np.stack([e.logpdf(z).sum(-1) for e in experts])

    z = experts[0].rvs(size=(num_samples, 3), random_state=rng)
    log_q = log_densities(z)
    ratio = np.exp(0.5 * (log_q[1] - log_q[0]))
    bc, bc_se = ratio.mean(), ratio.std(ddof=1) / math.sqrt(num_samples)
    which = rng.integers(3, size=num_samples)
    z = np.stack([e.rvs(size=(num_samples, 3), random_state=rng) for e in experts])[which, np.arange(num_samples)]
    log_q = log_densities(z)
    mixture = np.exp(log_q).mean(0)
    values = (LAPLACE_WEIGHTS @ np.exp(0.5 * log_q)) ** 2 / mixture
    total, total_se = values.mean(), values.std(ddof=1) / math.sqrt(num_samples)
    self_mass = float((LAPLACE_WEIGHTS**2).sum())
    return [compare("affinities, diagonal Laplace (3-D)", "Bhattacharyya coefficient vs quadrature", math.exp(log_bc),
                    pairs[0, 1], "absolute", QUAD_TOLERANCE, seconds=seconds),
            compare("affinities, diagonal Laplace (3-D)", "Hellinger pool's pairwise mass vs quadrature", mass,
                    1 - self_mass / quad_z, "absolute", QUAD_TOLERANCE, seconds=seconds),
            compare("affinities, diagonal Laplace (3-D)", "Bhattacharyya coefficient vs Monte Carlo", math.exp(log_bc),
                    bc, "z-score", Z_TOLERANCE, standard_error=bc_se, seconds=seconds),
            # delta method: d(1 - s / Z) = s / Z^2 dZ
            compare("affinities, diagonal Laplace (3-D)", "Hellinger pool's pairwise mass vs importance sampling",
                    mass, 1 - self_mass / total, "z-score", Z_TOLERANCE, standard_error=self_mass / total**2 * total_se,
                    seconds=seconds)]
