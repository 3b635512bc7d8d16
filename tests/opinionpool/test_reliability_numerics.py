"""No silent wrong numbers: the numerical engine finds all of a pool's mass, refuses estimates outside the
certified bracket, differentiates its normaliser correctly, treats values outside the support as torch and
scipy do, gives zero-probability categories zero mass, and computes float32 pools in float64.

References are independent: scipy quadrature split at every expert, mpmath in high precision, finite
differences of fresh pools, and probabilities pooled by hand."""

import math

import mpmath
import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch.distributions import Beta, Categorical, Gamma, Normal, Poisson

import opinionpool
from opinionpool.numerical import PoolEstimate


def rel(a, b):
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-300)


def unit_normals(means, dtype=torch.float64):
    return [Normal(torch.tensor(m, dtype=dtype), torch.tensor(1.0, dtype=dtype)) for m in means]


def split_quad_log_z_and_mean(means, weights, alpha):
    """log Z and mean of a pool of unit Normals by scipy quad on each expert's core (+-40) and the gaps between."""
    w = np.asarray(weights) / np.sum(weights)

    def log_u(z):
        logs = np.array([-0.5 * (z - m) ** 2 - 0.5 * math.log(2 * math.pi) for m in means])
        return float(np.log(np.sum(w * np.exp(alpha * (logs - logs.max())))) / alpha + logs.max())

    shift = max(log_u(m) for m in means)
    edges = sorted({-np.inf, np.inf} | {m + d for m in means for d in (-40.0, 0.0, 40.0)})
    z0 = m1 = 0.0
    for a, b in zip(edges[:-1], edges[1:]):
        z0 += integrate.quad(lambda z: math.exp(log_u(z) - shift), a, b, epsabs=0, epsrel=1e-12, limit=400)[0]
        m1 += integrate.quad(lambda z: z * math.exp(log_u(z) - shift), a, b, epsabs=0, epsrel=1e-12, limit=400)[0]
    return shift + math.log(z0), m1 / z0


# ------------------------------------------------------------------ far-apart experts
@pytest.mark.parametrize("alpha", [2.0, 0.3])
def test_quadrature_finds_every_expert_200_sd_apart(alpha):
    pool = opinionpool.holder(unit_normals([0.0, 200.0]), alpha=alpha)
    assert pool.summary.method == "quadrature"
    assert abs(float(pool.mean) - 100.0) < 1e-8  # by symmetry
    log_z, _ = split_quad_log_z_and_mean([0.0, 200.0], [0.5, 0.5], alpha)
    assert abs(float(pool.log_normalizer) - log_z) < 1e-9
    lower, upper = pool.normalizer_bounds()
    assert float(lower) - 1e-12 <= float(pool.log_normalizer) <= float(upper) + 1e-12
    skewed = opinionpool.holder(unit_normals([0.0, 200.0]), alpha=alpha, weights=[0.3, 0.7])
    log_z, mean = split_quad_log_z_and_mean([0.0, 200.0], [0.3, 0.7], alpha)
    assert abs(float(skewed.log_normalizer) - log_z) < 1e-9
    assert rel(skewed.mean, mean) < 1e-9


def test_an_estimate_outside_the_certified_bracket_raises(monkeypatch):
    pool = opinionpool.holder(unit_normals([0.0, 3.0]), alpha=2.0)
    real = opinionpool.pool.quadrature_estimate

    def missing_mass(*args, **kwargs):  # a quadrature that lost half of the pool's mass
        est = real(*args, **kwargs)
        value, error = est.log_normalizer
        return PoolEstimate(est.method, est.error_kind, type(est.log_normalizer)(value - math.log(2), error))

    monkeypatch.setattr(opinionpool.pool, "quadrature_estimate", missing_mass)
    with pytest.raises(RuntimeError, match="outside the certified bracket"):
        pool.log_normalizer
    with pytest.raises(RuntimeError, match="outside the certified bracket"):
        pool.estimate()


def log_space_pool(means, weights, alpha, crossing):
    """log Z and mean of a pool of unit Normals by scipy quad of exp(log u - log u(crossing)), log u in log-space,
    on panels 0.05 wide across the pool's core (the soft minimum has complex poles ~pi / (40 |alpha|) off the axis)."""
    w = np.asarray(weights) / np.sum(weights)

    def log_u(z):
        scaled = alpha * np.array([-0.5 * (z - m) ** 2 - 0.5 * math.log(2 * math.pi) for m in means])
        top = scaled.max()
        return (top + math.log(np.sum(w * np.exp(scaled - top)))) / alpha

    shift = log_u(crossing)
    edges = [-np.inf, min(means)] + list(crossing + np.linspace(-1, 1, 41)) + [max(means), np.inf]
    z0 = m1 = 0.0
    for a, b in zip(edges[:-1], edges[1:]):
        z0 += integrate.quad(lambda z: math.exp(log_u(z) - shift), a, b, epsabs=0, epsrel=1e-13, limit=400)[0]
        m1 += integrate.quad(lambda z: z * math.exp(log_u(z) - shift), a, b, epsabs=0, epsrel=1e-13, limit=400)[0]
    return shift + math.log(z0), m1 / z0


@pytest.mark.parametrize("weights,alpha", [([0.5, 0.5], -1.0), ([0.3, 0.7], -1.0), ([0.5, 0.5], -3.0)])
def test_negative_alpha_pools_far_from_every_expert(weights, alpha):
    """The pool sits between the experts, 20 sd from each and about 1/20 wide; log Z is about -202.8."""
    pool = opinionpool.holder(unit_normals([0.0, 40.0]), alpha=alpha, weights=weights)
    # where w1 q1^alpha = w2 q2^alpha: 40 z - 800 = log(w1 / w2) / alpha
    crossing = 20 + math.log(weights[0] / weights[1]) / alpha / 40
    log_z, mean = log_space_pool([0.0, 40.0], weights, alpha, crossing)
    if weights == [0.5, 0.5] and alpha == -1.0:
        with mpmath.workdps(30):  # and in high precision, where nothing under- or overflows
            def u(z):
                return 1 / sum(mpmath.exp((z - m) ** 2 / 2) for m in (0, 40)) * 2 / mpmath.sqrt(2 * mpmath.pi)

            points = [-mpmath.inf, 0] + [20 + d for d in (-1, -0.5, -0.1, -0.05, 0, 0.05, 0.1, 0.5, 1)] + [40, mpmath.inf]
            assert abs(float(mpmath.log(mpmath.quad(u, points))) - log_z) < 1e-8
        assert abs(log_z - (-202.773)) < 1e-3
    assert rel(pool.log_normalizer, log_z) < 1e-12
    assert abs(float(pool.mean) - mean) < 1e-9


# ---------------------------------------------------------------------------- gradients
def finite_difference(make_log_prob, theta, h=1e-5):
    grad = torch.zeros_like(theta)
    for i in range(theta.numel()):
        step = torch.zeros_like(theta).flatten()
        step[i] = h
        step = step.reshape(theta.shape)
        grad.view(-1)[i] = (make_log_prob(theta + step) - make_log_prob(theta - step)) / (2 * h)
    return grad


@pytest.mark.parametrize("alpha", [2.0, -1.0])
def test_gradient_of_a_quadrature_pool_matches_finite_differences(alpha):
    z = torch.tensor([0.3, 1.7])

    def log_prob(loc, log_scale, weights):
        experts = Normal(loc, log_scale.exp())
        return opinionpool.holder(experts, alpha=alpha, weights=weights).log_prob(z).sum()

    loc, log_scale, weights = torch.tensor([0.0, 2.0, -1.0]), torch.tensor([0.0, -0.7, 0.7]), torch.tensor(
        [0.2, 0.3, 0.5])
    leaves = [t.clone().requires_grad_(True) for t in (loc, log_scale, weights)]
    value = log_prob(*leaves)
    grads = torch.autograd.grad(value, leaves)
    for index, grad in enumerate(grads):
        def moved(theta, index=index):
            args = [loc, log_scale, weights]
            args[index] = theta
            return float(log_prob(*args))

        reference = finite_difference(moved, [loc, log_scale, weights][index])
        assert torch.allclose(grad, reference, rtol=1e-6, atol=1e-7), (index, grad, reference)


@pytest.mark.parametrize("alpha", [2.0, -1.0])
def test_gradient_of_an_enumerated_pool_matches_finite_differences(alpha):
    z = torch.tensor([0.0, 3.0, 7.0])

    def log_prob(log_rate, weights):
        pool = opinionpool.holder(Poisson(log_rate.exp()), alpha=alpha, weights=weights)
        return pool.log_prob(z).sum()

    log_rate, weights = torch.tensor([1.0, 2.0, -0.5]), torch.tensor([0.2, 0.3, 0.5])
    leaves = [t.clone().requires_grad_(True) for t in (log_rate, weights)]
    grads = torch.autograd.grad(log_prob(*leaves), leaves)
    reference = (finite_difference(lambda t: float(log_prob(t, weights)), log_rate),
                 finite_difference(lambda t: float(log_prob(log_rate, t)), weights))
    for grad, ref in zip(grads, reference):
        assert torch.allclose(grad, ref, rtol=1e-7, atol=1e-9), (grad, ref)


def test_importance_sampling_gradient_is_the_pool_expectation_from_its_samples():
    """Forced importance sampling: the gradient of log Z agrees with the quadrature's within a few standard errors."""
    loc = torch.tensor([0.0, 2.0], requires_grad=True)
    experts = Normal(loc, torch.tensor([1.0, 0.5]))
    exact = torch.autograd.grad(opinionpool.holder(experts, alpha=2.0, weights=[0.4, 0.6]).log_normalizer, loc)[0]
    sampled = opinionpool.holder(experts, alpha=2.0, weights=[0.4, 0.6], method="importance", num_samples=200_000)
    grad = torch.autograd.grad(sampled.log_normalizer, loc)[0]
    assert torch.allclose(grad, exact, rtol=0, atol=0.01), (grad, exact)
    assert not torch.equal(grad, torch.zeros_like(grad))


# ------------------------------------------------------------------------------ support
def support_cases():
    gamma = [Gamma(torch.tensor(2.0), torch.tensor(1.0)), Gamma(torch.tensor(3.0), torch.tensor(2.0))]
    beta = [Beta(torch.tensor(2.0), torch.tensor(3.0)), Beta(torch.tensor(3.0), torch.tensor(2.0))]
    poisson = [Poisson(torch.tensor(2.0)), Poisson(torch.tensor(3.0))]
    return [(gamma, torch.tensor([-1.0, 1.0]), [stats.gamma(2, scale=1).pdf, stats.gamma(3, scale=0.5).pdf]),
            (beta, torch.tensor([1.2, 0.5]), [stats.beta(2, 3).pdf, stats.beta(3, 2).pdf]),
            (poisson, torch.tensor([2.5, 2.0]), [stats.poisson(2).pmf, stats.poisson(3).pmf])]


@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_values_outside_the_support(case, alpha):
    experts, values, pdfs = support_cases()[case]
    strict = opinionpool.holder(experts, alpha=alpha)
    assert isinstance(strict, opinionpool.NumericalHolderPool if alpha == 2.0 else opinionpool.HolderPool)
    with pytest.raises(ValueError, match=rf"support.*{float(values[0]):g}"):
        strict.log_prob(values)
    lenient = opinionpool.holder(experts, alpha=alpha, validate_args=False)
    got = lenient.log_prob(values)
    assert float(got[0]) == -math.inf  # as scipy: the density is zero there
    # inside the support, the pooled density divided by the scipy-pooled one is 1 / Z
    q1, q2 = pdfs[0](float(values[1])), pdfs[1](float(values[1]))
    pooled = (0.5 * q1**alpha + 0.5 * q2**alpha) ** (1 / alpha)
    assert rel(got[1], math.log(pooled) - float(lenient.log_normalizer)) < 1e-10
    assert not bool(torch.isnan(got).any())
    assert torch.isnan(lenient.log_prob(torch.tensor(math.nan)))


def test_moment_matched_distributions_validate_their_values():
    gamma = [Gamma(torch.tensor(2.0), torch.tensor(1.0)), Gamma(torch.tensor(3.0), torch.tensor(2.0))]
    for alpha in (0.5, 2.0):
        with pytest.raises(ValueError, match="support"):
            opinionpool.holder(gamma, alpha=alpha).moment_match().log_prob(torch.tensor(-1.0))
    with pytest.raises(ValueError, match="support"):
        opinionpool.poe(gamma).log_prob(torch.tensor(-1.0))
    normals = unit_normals([0.0, 1.0])
    with pytest.raises(ValueError, match="support"):
        opinionpool.holder(normals, alpha=2.0).moment_match().log_prob(torch.tensor(math.nan))


# -------------------------------------------------------------------------- categorical
P1, P2, W = np.array([0.0, 0.5, 0.5]), np.array([0.2, 0.3, 0.5]), np.array([0.4, 0.6])


def by_hand(alpha, weights=W):
    w = weights / weights.sum()  # the pool normalises its weights
    if alpha == 0:
        with np.errstate(divide="ignore"):
            pooled = np.exp(w[0] * np.log(P1) + w[1] * np.log(P2))
    else:
        with np.errstate(divide="ignore"):
            pooled = (w[0] * P1**alpha + w[1] * P2**alpha) ** (1 / alpha)
    return pooled / pooled.sum()


@pytest.mark.parametrize("alpha", [0.0, -1.0, 2.0, 0.5, 1.0])
def test_a_zero_probability_category_gets_exactly_its_pooled_mass(alpha):
    experts = [Categorical(probs=torch.tensor(P1)), Categorical(probs=torch.tensor(P2))]
    pool = opinionpool.holder(experts, alpha=alpha, weights=W.tolist())
    got = pool.log_prob(torch.arange(3)).exp().numpy()
    expected = by_hand(alpha)
    if alpha <= 0:
        assert got[0] == 0.0 and expected[0] == 0.0
    assert np.allclose(got, expected, rtol=1e-12, atol=0)
    assert np.allclose(pool.moment_match().probs.numpy(), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("alpha", [0.0, -1.0, 2.0, 0.5, 1.0])
def test_weight_gradients_with_a_zero_probability_category(alpha):
    """The pooled probabilities' gradients in the weights, by central differences of the written-out pool: finite
    although a category has probability zero (its natural parameter -inf gave the weights NaN gradients at alpha =
    0, where the pool is the weights' geometric combination)."""
    weights = torch.tensor(W.tolist(), requires_grad=True)
    experts = [Categorical(probs=torch.tensor(P1)), Categorical(probs=torch.tensor(P2))]
    log_probs = opinionpool.holder(experts, alpha=alpha, weights=weights).log_prob(torch.tensor([1, 2]))
    step = 1e-6
    for category, log_prob in zip((1, 2), log_probs):
        (got,) = torch.autograd.grad(log_prob, weights, retain_graph=True)
        expected = [(math.log(by_hand(alpha, W + step * e)[category]) - math.log(by_hand(alpha, W - step * e)[category]))
                    / (2 * step) for e in np.eye(2)]
        assert np.allclose(got.numpy(), expected, rtol=1e-6, atol=1e-9)


def test_weighted_sums_with_infinite_and_nan_values():
    """sum_k w_k v_k: a zero weight hides an infinite or NaN value, a positive one passes it on (NaN stays NaN);
    the values' gradient is w_k, the weights' finite (zero) where the value is infinite."""
    from opinionpool.families.base import weighted_sum

    log_w = torch.log(torch.tensor([0.25, 0.75, 0.0])).requires_grad_()
    values = torch.tensor([[1.0, -math.inf, 2.0], [3.0, 4.0, math.nan], [math.nan, 1.0, 5.0],
                           [math.inf, -math.inf, 0.0]]).T
    values.requires_grad_()
    total = weighted_sum(log_w, values, dim=0).tolist()
    assert total[0] == -math.inf and total[1] == 3.75 and math.isnan(total[2]) and math.isnan(total[3])
    total = weighted_sum(log_w, values, dim=0)
    assert torch.equal(torch.autograd.grad(total[0], values, retain_graph=True)[0][:, 0], torch.tensor([0.25, 0.75, 0.0]))
    (d_log_w,) = torch.autograd.grad(total[0], log_w)
    assert torch.isfinite(d_log_w[:2]).all()


# ------------------------------------------------------------------------ float32, rtol
def test_float32_pools_integrate_in_float64_with_the_same_rule():
    def pool(dtype, **kwargs):
        experts = [Normal(torch.tensor(0.0, dtype=dtype), torch.tensor(1.0, dtype=dtype)),
                   Normal(torch.tensor(2.0, dtype=dtype), torch.tensor(0.5, dtype=dtype))]
        return opinionpool.holder(experts, alpha=2.0, **kwargs)

    double, single = pool(torch.float64), pool(torch.float32)
    assert single.log_normalizer.dtype == torch.float32 and single.mean.dtype == torch.float32
    # the same float64 computation (up to the float32 rounding of the weights): about as many evaluations,
    # and the float64 values to float32 precision
    assert single.summary.num_evaluations <= 1.2 * double.summary.num_evaluations
    for name in ("log_normalizer", "mean", "variance"):
        assert rel(getattr(single, name), getattr(double, name)) < 2e-7, name
    loose = pool(torch.float64, rtol=1e-6)
    assert loose.summary.num_evaluations < double.summary.num_evaluations
    assert abs(float(loose.log_normalizer - double.log_normalizer)) < 1e-6


@pytest.mark.parametrize("bad", [0.0, -1e-3, 1.5, math.nan, math.inf, "tight", None])
def test_rtol_is_validated(bad):
    experts = unit_normals([0.0, 1.0])
    with pytest.raises(ValueError, match="rtol"):
        opinionpool.holder(experts, alpha=2.0, rtol=bad)
    with pytest.raises(ValueError, match="rtol"):
        opinionpool.holder(experts, alpha=0.5).estimate(rtol=bad)
