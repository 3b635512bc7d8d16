"""Statements of docs/theory.md that are not closed forms: the variational characterisation of Hölder pools."""

import numpy as np
import pytest
import torch
from scipy import stats
from torch.distributions import Normal

import opinionpool

GRID = np.linspace(-25, 25, 20001)


def weighted_alpha_divergence(log_q, log_experts, weights, alpha):
    """sum_j w_j D_alpha(q_j || q) on a dense grid (trapezoid), from log-densities (p^alpha q^(1-alpha) in log-space)."""
    total = 0.0
    for w, log_p in zip(weights, log_experts):
        cross = np.exp(alpha * log_p + (1 - alpha) * log_q)
        integrand = (cross - alpha * np.exp(log_p) + (alpha - 1) * np.exp(log_q)) / (alpha * (alpha - 1))
        total += w * np.trapezoid(integrand, GRID)
    return total


@pytest.mark.parametrize("alpha", [-1.0, 0.5, 2.0])
def test_holder_pool_minimises_weighted_alpha_divergence(alpha):
    means, sds, weights = (0.0, 2.5, -1.0), (1.0, 0.6, 1.8), (0.2, 0.3, 0.5)
    pool = opinionpool.holder([Normal(torch.tensor(m), torch.tensor(s)) for m, s in zip(means, sds)],
                              alpha=alpha, weights=list(weights))
    log_q_star = pool.log_prob(torch.tensor(GRID)).numpy()
    experts = [stats.norm(m, s).logpdf(GRID) for m, s in zip(means, sds)]
    best = weighted_alpha_divergence(log_q_star, experts, weights, alpha)
    assert np.isfinite(best)
    for direction in (np.tanh(GRID), np.exp(-((GRID - 1) ** 2)), np.cos(GRID / 2)):
        for eps in (1e-2, -1e-2, 1e-1):
            log_q = log_q_star + eps * direction
            log_q -= np.log(np.trapezoid(np.exp(log_q), GRID))  # stay a density of mass one
            assert weighted_alpha_divergence(log_q, experts, weights, alpha) > best
