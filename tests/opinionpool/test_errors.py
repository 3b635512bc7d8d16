"""Bad input raises a ValueError naming the argument and the value, before any work is done."""

import math
import re

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
    for mask in (torch.ones(2, dtype=torch.bool), torch.ones(1, 2, 3, dtype=torch.bool)):  # an IndexError before
        with pytest.raises(ValueError, match=rf"mask must be a boolean tensor of shape \(2, 3\) .* of shape "
                                             rf"{re.escape(str(tuple(mask.shape)))}"):
            opf.hellinger(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), dim=1, mask=mask)


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


def test_experts_built_by_hand_are_checked():
    """An ``Experts`` passed in skipped every check, even with validate_args=True: a NaN gave a NaN mean, and
    parameters of the wrong shape pooled silently."""
    family = opinionpool.as_experts(normals(2)).family
    nan = opinionpool.Experts(family, torch.tensor([[0.0, 0.0], [math.nan, 0.0]]))
    with pytest.raises(ValueError, match=r"experts loc must be finite.*nan"):
        opinionpool.holder(nan, alpha=0.5, validate_args=True)
    assert torch.isnan(opinionpool.holder(nan, alpha=0.5, validate_args=False).mean)  # the caller's choice
    with pytest.raises(ValueError, match=r"experts.params must have shape .*\(2,\).*got \(2, 3\)"):
        opinionpool.holder(opinionpool.Experts(family, torch.zeros(2, 3)), alpha=0.5)
    with pytest.raises(ValueError, match=r"experts must not be empty.*\(0, 2\)"):
        opinionpool.holder(opinionpool.Experts(family, torch.zeros(0, 2)), alpha=0.5)
    with pytest.raises(ValueError, match=r"floating-point tensor, got torch.int64"):
        opinionpool.holder(opinionpool.Experts(family, torch.zeros(2, 2, dtype=torch.long)), alpha=0.5)


def test_functional_weights_of_the_wrong_shape_are_named():
    """Scalar weights raised an IndexError, weights of another batch a broadcasting error from torch, in
    ``hellinger``, ``poe`` and ``moe`` alike; integer means failed inside torch (or, for ``poe``, passed)."""
    mu, logvar = torch.randn(3, 4, 2), torch.zeros(3, 4, 2)
    for pool in (opf.hellinger, opf.poe, opf.moe):
        with pytest.raises(ValueError, match=r"weights must have 3 entries.*got shape \(\)"):
            pool(mu, logvar, weights=torch.tensor(1.0))
        with pytest.raises(ValueError, match=r"weights with batch shape \(5,\) do not broadcast.*\(4,\)"):
            pool(mu, logvar, weights=torch.rand(5, 3))
        with pytest.raises(ValueError, match=r"4 entries.*prior expert"):
            pool(mu, logvar, weights=torch.rand(4, 3), prior_expert=True)
        with pytest.raises(ValueError, match=r"mu and logvar must be floating-point.*torch.int64"):
            pool(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long))
    assert opf.poe(mu, logvar, weights=torch.rand(4, 3))[0].shape == (4, 2)  # per-sample weights still work


def test_scalar_arguments_are_checked_as_numbers():
    """``log_power_mean`` took NaN (a NaN result), True (as 1) and a string (a TypeError); ``interval`` refused a
    numpy or tensor level that ``coverage`` accepts; ``quantities="mean"`` was split into letters and
    ``kl_estimate`` of a number failed with an AttributeError."""
    import numpy as np

    log_values, log_weights = torch.tensor([-1.0, -3.0]), torch.log(torch.tensor([0.3, 0.7]))
    for alpha in (math.nan, True, "0.5"):
        with pytest.raises(ValueError, match="alpha must be a real number"):
            opinionpool.log_power_mean(log_values, log_weights, alpha)
    pool = opinionpool.holder([Normal(torch.tensor(0.0), torch.tensor(1.0)),
                               Normal(torch.tensor(2.0), torch.tensor(0.5))], alpha=0.5)
    expected = pool.interval(0.9)
    for level in (np.float32(0.9), torch.tensor(0.9), np.float64(0.9)):
        got = pool.interval(level)
        assert all(torch.allclose(a, b, rtol=1e-6) for a, b in zip(got, expected))
    for level in (1.5, True, "0.9", torch.tensor([0.5, 0.9])):
        with pytest.raises(ValueError, match="level must be a probability in"):
            pool.interval(level)
    with pytest.raises(ValueError, match=r"the string 'mean'"):
        pool.estimate(quantities="mean")
    with pytest.raises(ValueError, match=r"other must be a distribution with a log_prob method, got 3.0"):
        pool.kl_estimate(3.0)


def test_weights_given_as_tensors_keep_their_gradient():
    """A list of tensors that require grad was converted with ``torch.as_tensor``, which detached them: the pool
    carried no gradient to the weights."""
    experts = [Normal(torch.tensor(0.0), torch.tensor(1.0)), Normal(torch.tensor(2.0), torch.tensor(0.5))]
    first, second = torch.tensor(1.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    from_list = opinionpool.holder(experts, alpha=0.5, weights=[first, second]).mean
    (grad_list,) = torch.autograd.grad(from_list, first)
    stacked = torch.stack([first, second])
    (grad_stacked,) = torch.autograd.grad(opinionpool.holder(experts, alpha=0.5, weights=stacked).mean, first)
    assert grad_list.abs() > 0 and torch.equal(grad_list, grad_stacked)
    mu, logvar = torch.tensor([[0.0], [2.0]]), torch.tensor([[0.0], [-1.0]])
    (grad_functional,) = torch.autograd.grad(opf.hellinger(mu, logvar, weights=[first, second])[0].sum(), second)
    assert grad_functional.abs() > 0


def test_a_gaussian_projection_that_has_no_meaning_is_refused():
    """A von Mises pool's Gaussian took the circular variance 1 - R as the angle's variance (about half of it under
    the pooled density); a Dirichlet pool's full-covariance Gaussian failed torch's positive-definite check (its
    coordinates sum to one) or, without validation, in a Cholesky factorisation. Both are refused by name; the
    Dirichlet's marginal Gaussian stays."""
    from torch.distributions import Dirichlet, VonMises

    angles = [VonMises(torch.tensor(0.2, dtype=torch.float64), torch.tensor(100.0, dtype=torch.float64)),
              VonMises(torch.tensor(-0.1, dtype=torch.float64), torch.tensor(50.0, dtype=torch.float64))]
    for alpha in (0.5, 0.3):
        for family in ("gaussian", "diag_gaussian"):
            with pytest.raises(ValueError, match=rf"family='{family}' is not defined for circular \(VonMises\)"):
                opinionpool.holder(angles, alpha, weights=[0.3, 0.7]).moment_match(family)
    simplex = [Dirichlet(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)),
               Dirichlet(torch.tensor([3.0, 0.5, 1.0], dtype=torch.float64))]
    for validate in (True, False):
        pool = opinionpool.holder(simplex, 0.5, weights=[0.3, 0.7], validate_args=validate)
        with pytest.raises(ValueError, match="family='gaussian' has no density for Dirichlet experts"):
            pool.moment_match("gaussian")
        assert torch.allclose(pool.moment_match("diag_gaussian").mean, pool.mean)


@pytest.mark.parametrize("pool", ["poe", "hellinger", "holder", "wasserstein_barycenter", "moe",
                                  "hellinger_pairwise_mass", "poe with prior"])
def test_an_unvalidated_nan_weight_reaches_the_outputs(pool):
    """With validation off a NaN weight compared as not positive: its expert was left out and the pool came out
    finite, the pool of the other experts. NaN in, NaN out, as a NaN mean or a subset mixture's weights give."""
    mu = torch.tensor([[5.0], [0.0], [1.0]], dtype=torch.float64)
    logvar = torch.zeros(3, 1, dtype=torch.float64)
    weights = torch.tensor([math.nan, 1.0, 1.0], dtype=torch.float64)
    if pool == "poe with prior":
        outputs = opf.poe(mu, logvar, weights=torch.tensor([1.0, 1.0, 1.0, math.nan], dtype=torch.float64),
                          prior_expert=True, validate_args=False)
    elif pool == "holder":
        outputs = opf.holder(mu, logvar, alpha=1 / 3, weights=weights, validate_args=False)[:1]
    elif pool == "moe":
        outputs = (opf.moe(mu, logvar, weights=weights, validate_args=False).log_weights,)
    else:
        outputs = getattr(opf, pool)(mu, logvar, weights=weights, validate_args=False)
    for output in outputs if isinstance(outputs, tuple) else (outputs,):
        assert bool(torch.isnan(output).all()), output
    with pytest.raises(ValueError, match="weights"):
        opf.poe(mu, logvar, weights=weights)


@pytest.mark.parametrize("alpha", [1 / 3, 1 / 4, 1 / 2, 1.0])
@pytest.mark.parametrize("where", ["mu", "logvar"])
def test_an_unvalidated_nan_expert_gives_a_nan_log_variance(alpha, where):
    """At alpha = 1/3 and 1/4 a NaN mean or log-variance gave the pool a NaN mean beside a log-variance of -inf: the
    mixture's moments read components of NaN weight as absent."""
    mu, logvar = torch.zeros(3, 1, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64)
    {"mu": mu, "logvar": logvar}[where][0, 0] = math.nan
    mean, log_variance = opf.holder(mu, logvar, alpha=alpha, validate_args=False)
    assert bool(torch.isnan(log_variance).all())
    # (the mixture's mean, sum_j w_j mu_j, does not depend on the variances)
    assert bool(torch.isnan(mean).all()) or (alpha == 1.0 and where == "logvar")
