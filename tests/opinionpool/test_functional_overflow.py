"""The functional pools where an intermediate leaves the float range though every result is representable: subset
mixtures of float64 experts whose squared offsets, in units of their standard deviations, overflow float64, and
Bhattacharyya coefficients of means whose difference overflows. Found by a review."""

import math

import torch

import opinionpool.functional as opf


def test_float64_subset_mixture_of_experts_whose_scaled_offsets_overflow():
    """Experts 1e10 apart of standard deviation e^-350: the shared subset paths square offsets of 1e162 standard
    deviations (inf in float64) and gave the full subset a log-variance of inf and the mixture NaN moments; each
    subset is the Hellinger pool of its experts, of variance (1e10)^2 / 4 (equal weights, no shared mass)."""
    mu = torch.tensor([[0.0], [1e10]], dtype=torch.float64)
    logvar = torch.full((2, 1), -700.0, dtype=torch.float64)
    mixture = opf.subset_mixture(opf.hellinger, mu, logvar)
    expected = math.log(0.25e20)
    full = mixture.logvar[..., -1, :]
    assert math.isclose(float(full), expected, rel_tol=1e-12), float(full)
    assert math.isclose(float(opf.hellinger(mu, logvar)[1]), expected, rel_tol=1e-12)
    mean, log_variance = mixture.moments()
    assert torch.isfinite(mean).all() and torch.isfinite(log_variance).all(), (mean, log_variance)


def test_log_bhattacharyya_of_means_whose_difference_overflows_is_minus_infinity():
    """Means -3e38 and 3e38 in float32 share no mass: -inf (as the Laplace form gives), not NaN, and a zero
    gradient; beside them a finite pair keeps its value and gradient."""
    mu1 = torch.tensor([[-3e38], [0.0]], dtype=torch.float32, requires_grad=True)
    mu2 = torch.tensor([[3e38], [2.0]], dtype=torch.float32)
    zero = torch.zeros(2, 1, dtype=torch.float32)
    value = opf.log_bhattacharyya(mu1, zero, mu2, zero)
    assert float(value[0]) == -math.inf
    assert math.isclose(float(value[1]), -0.5, rel_tol=1e-6)  # -(mu1 - mu2)^2 / 8 at unit variances
    (value[1] + torch.where(torch.isinf(value[0]), 0.0, value[0])).backward()
    assert mu1.grad[0].item() == 0.0
    assert math.isclose(mu1.grad[1].item(), 0.5, rel_tol=1e-6)  # d/dmu1 of -(mu1 - 2)^2 / 8 at 0
    laplace = opf.log_bhattacharyya(mu1.detach(), zero, mu2, zero, family="laplace")
    assert float(laplace[0]) == -math.inf
