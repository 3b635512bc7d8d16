"""Bad input raises a ValueError naming the argument and the value, before any work is done."""

import math

import pytest
import torch
from torch.distributions import Binomial, Exponential, Gamma, Independent, Normal, Poisson

import opinionpool
import opinionpool.functional as opf


def normals(m=3):
    return [Normal(torch.tensor(float(j)), torch.tensor(1.0 + j)) for j in range(m)]


def test_bad_scales_and_means():
    with pytest.raises(ValueError, match=r"Normal scale must be positive.*-1"):
        opinionpool.holder([Normal(torch.tensor(0.0), torch.tensor(-1.0), validate_args=False)] + normals(1))
    with pytest.raises(ValueError, match=r"Normal scale.*nan"):
        opinionpool.holder([Normal(torch.tensor(0.0), torch.tensor(math.nan), validate_args=False)] + normals(1))
    with pytest.raises(ValueError, match=r"Normal loc must be finite.*inf"):
        opinionpool.holder([Normal(torch.tensor(math.inf), torch.tensor(1.0))] + normals(1))
    with pytest.raises(ValueError, match=r"Gamma rate.*0"):
        opinionpool.holder([Gamma(torch.tensor(1.0), torch.tensor(0.0), validate_args=False)] * 2)
    with pytest.raises(ValueError, match=r"Exponential rate"):
        opinionpool.holder([Exponential(torch.tensor(-2.0), validate_args=False)] * 2)


def test_bad_weights():
    with pytest.raises(ValueError, match=r"weights must be non-negative.*-0.5"):
        opinionpool.holder(normals(), weights=[1.0, -0.5, 1.0])
    with pytest.raises(ValueError, match=r"weights must be non-negative.*nan"):
        opinionpool.holder(normals(), weights=[1.0, math.nan, 1.0])
    with pytest.raises(ValueError, match="all zero"):
        opinionpool.holder(normals(), weights=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"3 entries.*shape \(2,\)"):
        opinionpool.holder(normals(), weights=[0.5, 0.5])


def test_bad_alpha():
    with pytest.raises(ValueError, match="alpha must be a real number"):
        opinionpool.holder(normals(), alpha=math.nan)
    with pytest.raises(ValueError, match="alpha must be a real number"):
        opinionpool.holder(normals(), alpha="half")
    for alpha in (0.3, 2.0, -1.0, math.inf, -math.inf):
        with pytest.raises(NotImplementedError, match=f"alpha={alpha!r}.*opinionpool.holder"):
            opinionpool.HolderPool(normals(), alpha=alpha)
        assert isinstance(opinionpool.holder(normals(), alpha=alpha), opinionpool.NumericalHolderPool)


def test_mixed_families_and_fixed_parameters():
    with pytest.raises(ValueError, match=r"expert 0 is NormalFamily\(\) but expert 1 is PoissonFamily"):
        opinionpool.holder([Normal(torch.tensor(0.0), torch.tensor(1.0)), Poisson(torch.tensor(2.0))])
    with pytest.raises(ValueError, match=r"BinomialFamily\(5\) but expert 1 is BinomialFamily\(7\)"):
        opinionpool.holder([Binomial(5, torch.tensor(0.3)), Binomial(7, torch.tensor(0.3))])
    with pytest.raises(ValueError, match="share one non-negative integer total_count"):
        opinionpool.holder(Binomial(torch.tensor([5.0, 7.0]), torch.tensor([0.3, 0.4])))
    with pytest.raises(ValueError, match="not supported"):
        opinionpool.holder([torch.distributions.Laplace(0.0, 1.0)] * 2)


def test_shapes():
    with pytest.raises(ValueError, match=r"do not broadcast: \[\(3,\), \(4,\)\]"):
        opinionpool.holder([Normal(torch.zeros(3), torch.ones(3)), Normal(torch.zeros(4), torch.ones(4))])
    with pytest.raises(ValueError, match=r"mu \(3, 2, 4\) and logvar \(3, 2, 5\)"):
        opf.hellinger(torch.zeros(3, 2, 4), torch.zeros(3, 2, 5))
    with pytest.raises(ValueError, match="needs a batch dimension"):
        opinionpool.holder(Normal(torch.tensor(0.0), torch.tensor(1.0)))
    with pytest.raises(ValueError, match="must not be empty"):
        opinionpool.holder([])
    with pytest.raises(ValueError, match="mask must be a boolean tensor of shape"):
        opf.hellinger(torch.zeros(3, 2, 4), torch.zeros(3, 2, 4), mask=torch.ones(2, 3, dtype=torch.bool))


def test_functional_non_finite_inputs():
    mu, logvar = torch.zeros(3, 2, 4), torch.zeros(3, 2, 4)
    with pytest.raises(ValueError, match=r"logvar must be finite.*nan"):
        opf.hellinger(mu, logvar.index_fill(2, torch.tensor([1]), math.nan))
    with pytest.raises(ValueError, match=r"mu must be finite.*inf"):
        opf.poe(mu.index_fill(0, torch.tensor([2]), math.inf), logvar)


def test_validation_can_be_switched_off():
    opinionpool.set_validate_args(False)
    try:
        opf.hellinger(torch.zeros(3, 2, 4), torch.full((3, 2, 4), math.nan))  # no error: checks are off
    finally:
        opinionpool.set_validate_args(True)
    with pytest.raises(ValueError):
        opf.hellinger(torch.zeros(3, 2, 4), torch.full((3, 2, 4), math.nan))


def test_unnormalisable_product_and_moments():
    with pytest.raises(ValueError, match="not normalisable"):
        opinionpool.poe([Gamma(torch.tensor(0.5), torch.tensor(1.0))] * 2)
    pool = opinionpool.holder([Normal(torch.tensor(0.0), torch.tensor(1.0))] * 2)
    with pytest.raises(ValueError, match="covariance_matrix needs multivariate"):
        pool.covariance_matrix
    with pytest.raises(ValueError, match="family must be None"):
        pool.moment_match("laplace")
    diag = Independent(Normal(torch.zeros(2, 3), torch.ones(2, 3)), 1)
    assert opinionpool.holder(diag).covariance_matrix.shape == (3, 3)


def test_switching_validation_off_skips_distribution_checks():
    bad = Normal(torch.tensor(0.0), torch.tensor(-1.0), validate_args=False)
    with pytest.raises(ValueError, match="Normal scale"):
        opinionpool.holder([bad] + normals(1))
    pool = opinionpool.holder([bad] + normals(1), validate_args=False)  # the caller took responsibility
    assert torch.isnan(pool.mean)
    with pytest.raises(ValueError, match="Normal scale"):
        opinionpool.holder([bad] + normals(1))  # the switch was local to that call
