"""Independent reference computations: scipy quadrature and exact enumeration of pooled densities.

Nothing here calls opinionpool: the pooled density is built from scipy.stats densities directly.
"""

from __future__ import annotations

import numpy as np
from scipy import integrate, special, stats

__all__ = ["power_mean", "log_power_mean", "quad_moments", "sum_moments", "gauss_pdf", "log_bc_diag_gauss", "log_binom"]


def power_mean(densities: np.ndarray, weights: np.ndarray, alpha: float) -> np.ndarray:
    """(sum_j w_j q_j^alpha)^(1/alpha) over the first axis (alpha = 0: weighted geometric mean;
    +-inf: max / min over experts with positive weight)."""
    with np.errstate(divide="ignore"):  # q = 0: log q = -inf, which log_power_mean takes
        return np.exp(log_power_mean(np.log(densities), weights, alpha))


def log_power_mean(log_densities: np.ndarray, weights: np.ndarray, alpha: float) -> np.ndarray:
    """``log`` of :func:`power_mean` from the experts' log-densities (first axis), in log space: far from every
    expert the densities underflow to 0 while their logarithms are finite. Experts of weight 0 are left out."""
    weights = np.asarray(weights, dtype=float).ravel()
    # an expert of weight 0 takes no part (at alpha <= 0 its zero density would otherwise give 0 * -inf or
    # inf - inf: NaN)
    present = weights > 0
    log_densities = np.asarray(log_densities)[present]
    w = weights[present].reshape((-1,) + (1,) * (log_densities.ndim - 1))
    w = w / w.sum()
    if np.isinf(alpha):
        return log_densities.max(0) if alpha > 0 else log_densities.min(0)
    if alpha == 0:
        return (w * log_densities).sum(0)
    return special.logsumexp(alpha * log_densities + np.log(w), axis=0) / alpha


def quad_moments(pdfs, weights, alpha, lower, upper, points=None):
    """log Z, mean and variance of a 1-D pool by adaptive quadrature."""
    def pooled(z):
        return float(power_mean(np.array([f(z) for f in pdfs]), weights, alpha))

    opts = dict(limit=400, epsabs=0, epsrel=1e-12, points=points)
    z0 = integrate.quad(pooled, lower, upper, **opts)[0]
    m = integrate.quad(lambda z: z * pooled(z), lower, upper, **opts)[0] / z0
    v = integrate.quad(lambda z: (z - m) ** 2 * pooled(z), lower, upper, **opts)[0] / z0
    return np.log(z0), m, v


def sum_moments(pmfs, weights, alpha, support):
    """The same for a discrete pool, by exact summation over ``support``."""
    q = power_mean(np.array([f(support) for f in pmfs]), weights, alpha)
    z0 = q.sum()
    m = (support * q).sum() / z0
    v = ((support - m) ** 2 * q).sum() / z0
    return np.log(z0), m, v, q / z0


def gauss_pdf(mean, sd):
    return stats.norm(mean, sd).pdf


def log_bc_diag_gauss(mu1, var1, mu2, var2):
    """The HELVAE paper's eq. (11) for diagonal Gaussians, in log form."""
    return float(np.sum(0.5 * np.log(2 * np.sqrt(var1 * var2) / (var1 + var2))
                        - 0.25 * (mu1 - mu2) ** 2 / (var1 + var2)))


def log_binom(n, k):
    return special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)
