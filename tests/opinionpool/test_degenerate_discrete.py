"""Bernoulli and Binomial experts with a probability of exactly 0 or 1: the outcomes they rule out get exactly zero
pooled mass where the pool says so (alpha <= 0), and exactly their pooled mass otherwise, in float64 and float32.
torch's logits clamp such a probability to about +-15.9 (float32) or +-36 (float64), which gave the impossible
outcome mass in every pool (P(1) = 0.011 for the log-linear pool of Bernoulli(0) and Bernoulli(0.6) in float32).

References are the pools written out by hand: exact sums over the support in numpy, float64."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, Binomial, Categorical
from torch.distributions import kl_divergence as torch_kl

import opinionpool
from opinionpool.families import BernoulliFamily, BinomialFamily

ALPHAS = [-1.0, 0.0, 0.5, 1.0, 2.0]
DTYPES = [torch.float64, torch.float32]
W = [0.3, 0.7]


def pmf(n, p):
    """The Binomial(n, p) probabilities of z = 0 .. n (Bernoulli: n = 1), exact at p = 0 and 1 (0 ** 0 = 1)."""
    z = np.arange(n + 1)
    return np.array([math.comb(n, k) for k in z]) * np.power(p, z) * np.power(1 - p, n - z)


def by_hand(pmfs, weights, alpha):
    """``(log Z, pooled probabilities, mean, variance)`` of the Hölder pool of the rows of ``pmfs``; experts of zero
    weight are absent."""
    w = np.asarray(weights, dtype=float)
    w = w / w.sum()
    q = np.asarray(pmfs, dtype=float)[w > 0]
    w = w[w > 0]
    with np.errstate(divide="ignore"):
        if alpha == 0:
            u = np.exp((w[:, None] * np.log(q)).sum(0))
        else:
            u = ((w[:, None] * q**alpha).sum(0)) ** (1 / alpha)
    total = u.sum()
    probs = u / total
    z = np.arange(len(probs))
    mean = (probs * z).sum()
    return math.log(total), probs, mean, (probs * (z - mean) ** 2).sum()


def experts_of(n, probs, dtype):
    if n is None:
        return [Bernoulli(torch.tensor(p, dtype=dtype)) for p in probs]
    return [Binomial(n, torch.tensor(p, dtype=dtype)) for p in probs]


def tolerance(dtype):
    return 1e-12 if dtype == torch.float64 else 2e-5


def check_pool(pool, n, probs, weights, alpha, dtype):
    log_z, expected, mean, variance = by_hand([pmf(n or 1, p) for p in probs], weights, alpha)
    support = torch.arange((n or 1) + 1, dtype=dtype)
    got = pool.log_prob(support).exp()
    assert got.dtype == dtype and not torch.isnan(got).any()
    rtol = tolerance(dtype)
    # an outcome of pooled mass zero gets exactly zero, every other one its mass
    assert np.array_equal(got.numpy() == 0, expected == 0), (got, expected)
    np.testing.assert_allclose(got.numpy(), expected, rtol=rtol, atol=0)
    assert float(pool.log_normalizer) == pytest.approx(log_z, rel=rtol, abs=rtol)
    assert float(pool.mean) == pytest.approx(mean, rel=rtol, abs=rtol)
    assert float(pool.variance) == pytest.approx(variance, rel=rtol, abs=rtol * (n or 1) ** 2)
    matched = pool.moment_match()
    assert float(matched.mean) == pytest.approx(mean, rel=rtol, abs=rtol)
    if mean == 0 or mean == (n or 1):  # a point mass stays one
        assert float(matched.probs) == mean / (n or 1)
    return expected


# ------------------------------------------------------------------------------- the reported cases
@pytest.mark.parametrize("dtype", DTYPES)
def test_log_linear_pool_of_a_zero_probability_bernoulli(dtype):
    pool = opinionpool.holder([Bernoulli(torch.tensor(0.0, dtype=dtype)), Bernoulli(torch.tensor(0.6, dtype=dtype))],
                              alpha=0, weights=W)
    assert float(pool.log_prob(torch.tensor(1.0, dtype=dtype)).exp()) == 0.0  # was 0.0110 in float32
    assert float(pool.log_prob(torch.tensor(0.0, dtype=dtype))) == pytest.approx(0.0, abs=tolerance(dtype))
    assert float(pool.mean) == 0.0 and float(pool.variance) == 0.0
    assert float(pool.moment_match().probs) == 0.0
    assert (pool.sample((200,)) == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_linear_pool_of_a_certain_binomial(dtype):
    experts = [Binomial(5, torch.tensor(1.0, dtype=dtype)), Binomial(5, torch.tensor(0.5, dtype=dtype))]
    pool = opinionpool.holder(experts, alpha=0)
    below = pool.log_prob(torch.arange(5, dtype=dtype)).exp()
    assert float(below.sum()) == 0.0  # was 0.0017 in float32
    assert float(pool.log_prob(torch.tensor(5.0, dtype=dtype))) == pytest.approx(0.0, abs=tolerance(dtype))
    assert float(pool.cdf(torch.tensor(4.0, dtype=dtype))) == 0.0
    assert float(pool.mean) == 5.0 and float(pool.variance) == 0.0
    assert float(pool.moment_match().probs) == 1.0
    assert float(pool.log_normalizer) == pytest.approx(2.5 * math.log(0.5), rel=tolerance(dtype))


# ------------------------------------------------------------------------------- every alpha
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("n", [None, 6])
@pytest.mark.parametrize("degenerate", [0.0, 1.0])
def test_pool_with_one_degenerate_expert_matches_exact_sums(degenerate, n, alpha, dtype):
    probs = [degenerate, 0.35]
    pool = opinionpool.holder(experts_of(n, probs, dtype), alpha=alpha, weights=W)
    expected = check_pool(pool, n, probs, W, alpha, dtype)
    ruled_out = pmf(n or 1, degenerate) == 0
    if alpha <= 0:  # a zero of a positive-weight expert is a zero of the pool
        assert (expected[ruled_out] == 0).all()
    else:
        assert (expected > 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("n", [None, 4])
@pytest.mark.parametrize("degenerate", [0.0, 1.0])
def test_experts_degenerate_at_the_same_point_pool_to_that_point(degenerate, n, alpha, dtype):
    pool = opinionpool.holder(experts_of(n, [degenerate, degenerate], dtype), alpha=alpha, weights=W)
    expected = check_pool(pool, n, [degenerate, degenerate], W, alpha, dtype)
    assert expected.max() == 1.0
    assert float(pool.log_normalizer) == pytest.approx(0.0, abs=tolerance(dtype)) and float(pool.variance) == 0.0
    assert float(pool.mean) == degenerate * (n or 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("n", [None, 5])
@pytest.mark.parametrize("degenerate", [0.0, 1.0])
def test_a_zero_weight_degenerate_expert_is_absent(degenerate, n, alpha, dtype):
    probs = [degenerate, 0.35]
    pool = opinionpool.holder(experts_of(n, probs, dtype), alpha=alpha, weights=[0.0, 1.0])
    expected = check_pool(pool, n, probs, [0.0, 1.0], alpha, dtype)
    np.testing.assert_allclose(expected, pmf(n or 1, 0.35), rtol=1e-12)
    assert float(pool.log_normalizer) == pytest.approx(0.0, abs=tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_three_experts_at_alpha_one_third_and_a_disjoint_pair(dtype):
    """The exact pool of order 3 (ten components) with a p = 0 and a p = 1 expert: the combinations of the two
    are empty (log Chernoff coefficient -inf) and drop out; at alpha <= 0 the pool of the two alone has no mass."""
    probs, weights = [0.0, 1.0, 0.6], [0.2, 0.3, 0.5]
    pool = opinionpool.holder(experts_of(5, probs, dtype), alpha=1 / 3, weights=weights)
    check_pool(pool, 5, probs, weights, 1 / 3, dtype)
    assert not torch.isnan(pool.component_params).any()
    with pytest.raises(ValueError, match="not normalisable"):
        opinionpool.poe(experts_of(None, [0.0, 1.0], dtype))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0])
def test_a_batch_of_pools_with_and_without_degenerate_experts(alpha):
    rows = [[0.0, 0.6], [0.2, 0.6], [1.0, 1.0], [1.0, 0.3]]
    pool = opinionpool.holder(Binomial(3, torch.tensor(rows)), alpha=alpha, weights=W)
    got = pool.log_prob(torch.arange(4.0).unsqueeze(-1)).exp().T
    for row, probs in zip(got, rows):
        log_z, expected, mean, _ = by_hand([pmf(3, p) for p in probs], W, alpha)
        assert np.array_equal(row.numpy() == 0, expected == 0)
        np.testing.assert_allclose(row.numpy(), expected, rtol=1e-12, atol=0)
    assert not torch.isnan(pool.mean).any() and not torch.isnan(pool.moment_match().probs).any()


# ------------------------------------------------------------------------------- affinities
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [None, 5])
def test_kl_and_bhattacharyya_with_degenerate_experts(n, dtype):
    def exact_kl(p, q):
        a, b = pmf(n or 1, p), pmf(n or 1, q)
        if ((a > 0) & (b == 0)).any():
            return math.inf
        keep = a > 0
        return float((a[keep] * np.log(a[keep] / b[keep])).sum())

    def exact_log_bc(p, q):
        total = np.sqrt(pmf(n or 1, p) * pmf(n or 1, q)).sum()
        return math.log(total) if total > 0 else -math.inf

    values = [0.0, 1.0, 0.25]
    for p in values:
        for q in values:
            first, second = experts_of(n, [p, q], dtype)
            kl = float(opinionpool.kl_divergence(first, second))
            log_bc = float(opinionpool.log_bhattacharyya_coefficient(first, second))
            expected_kl, expected_bc = exact_kl(p, q), exact_log_bc(p, q)
            assert not (math.isnan(kl) or math.isnan(log_bc)), (p, q)
            for got, expected in ((kl, expected_kl), (log_bc, expected_bc)):
                if math.isinf(expected):
                    assert got == expected, (p, q, got)
                else:
                    assert got == pytest.approx(expected, rel=tolerance(dtype), abs=tolerance(dtype)), (p, q)


def test_kl_of_a_log_linear_pool_that_is_a_point_mass():
    pool = opinionpool.holder([Bernoulli(torch.tensor(0.0)), Bernoulli(torch.tensor(0.6))], alpha=0, weights=W)
    assert float(torch_kl(pool, Bernoulli(torch.tensor(0.25)))) == pytest.approx(-math.log(0.75), rel=1e-14)
    assert float(torch_kl(pool, Bernoulli(torch.tensor(1.0)))) == math.inf


# ------------------------------------------------------------------------------- the family itself
@pytest.mark.parametrize("dtype", DTYPES)
def test_family_log_prob_is_exact_and_never_nan(dtype):
    for family, n in ((BernoulliFamily(), 1), (BinomialFamily(3), 3)):
        for p in (0.0, 1.0, 0.3):
            dist = Bernoulli(torch.tensor(p, dtype=dtype)) if n == 1 else Binomial(n, torch.tensor(p, dtype=dtype))
            params = family.params_from_distribution(dist)
            got = family.log_prob(params, torch.arange(n + 1, dtype=dtype))
            with np.errstate(divide="ignore"):
                expected = np.log(pmf(n, p))
            assert not torch.isnan(got).any()
            np.testing.assert_allclose(got.numpy(), expected, rtol=tolerance(dtype), atol=tolerance(dtype))
            back = family.distribution(params)
            assert float(back.probs) == pytest.approx(p, rel=tolerance(dtype))
            assert torch.equal(family.params_from_distribution(back), params) or p not in (0.0, 1.0)


def test_logits_keep_their_digits():
    """User logits give finite natural parameters, and a pool of finite ones returns logits (float32 would round
    sigmoid(40) to probability 1)."""
    experts = [Bernoulli(logits=torch.tensor(20.0, dtype=torch.float32))] * 2
    product = opinionpool.poe(experts)
    assert float(product.logits) == pytest.approx(40.0, rel=1e-6)
    pool = opinionpool.holder(experts, alpha=0)
    assert float(pool.log_prob(torch.tensor(0.0, dtype=torch.float32))) == pytest.approx(-20.0, rel=1e-6)
    logits = torch.tensor([-3.0, 0.5, 800.0])
    params = BinomialFamily(4).params_from_distribution(Binomial(4, logits=logits))
    assert torch.isfinite(params).all()
    np.testing.assert_allclose(params.exp().sum(-1).numpy(), 1.0, rtol=1e-15)
    with pytest.raises(ValueError, match="logits"):
        opinionpool.holder([Bernoulli(logits=torch.tensor(math.inf)), Bernoulli(logits=torch.tensor(0.0))])


def test_expected_statistic_of_the_numerical_engine():
    pool = opinionpool.holder(experts_of(4, [1.0, 0.3], torch.float64), alpha=2.0, weights=W)
    _, _, mean, _ = by_hand([pmf(4, 1.0), pmf(4, 0.3)], W, 2.0)
    stat = pool.estimate(["expected_statistic"]).expected_statistic.value
    np.testing.assert_allclose(stat.numpy(), [4 - mean, mean], rtol=1e-12)


# ------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0, -1.0])
def test_gradients_in_interior_probabilities(alpha):
    def pooled(p, q):
        pool = opinionpool.holder([Binomial(3, p), Binomial(3, q)], alpha=alpha, weights=W)
        return torch.cat((pool.log_prob(torch.arange(4.0)), pool.mean.reshape(1)))

    p, q = torch.tensor(0.3, requires_grad=True), torch.tensor(0.8, requires_grad=True)
    assert torch.autograd.gradcheck(pooled, (p, q))

    def with_degenerate(q):
        pool = opinionpool.holder([Bernoulli(torch.tensor(0.0)), Bernoulli(q)], alpha=alpha, weights=W)
        mass = pool.log_prob(torch.tensor(0.0)) if alpha <= 0 else pool.log_prob(torch.arange(2.0))
        return torch.cat((mass.reshape(-1), pool.mean.reshape(1), pool.variance.reshape(1)))

    assert torch.autograd.gradcheck(with_degenerate, (q,))
    # the degenerate expert's own probability gets a finite gradient too (the log of zero is never evaluated)
    zero = torch.tensor(0.0, requires_grad=True)
    pool = opinionpool.holder([Bernoulli(zero), Bernoulli(q)], alpha=alpha, weights=W)
    grads = torch.autograd.grad(pool.log_prob(torch.tensor(0.0)) + pool.mean, (zero, q))
    assert all(torch.isfinite(g) for g in grads)


def test_categorical_logits_of_minus_infinity_are_categories_of_probability_zero():
    """torch accepts -inf logits (probability zero), as it accepts probs of 0; the library rejected them. The
    log-linear pool against an exact sum; NaN, +inf and all -inf rows are rejected, naming the argument."""
    from torch.distributions import Categorical

    inf = math.inf
    logits = torch.tensor([0.0, -inf, 1.0], dtype=torch.float64)
    other = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    pooled = opinionpool.holder([Categorical(logits=logits), Categorical(probs=other)], alpha=0.0,
                                weights=[0.4, 0.6]).moment_match()
    p = np.exp([0.0, -inf, 1.0]) / np.exp([0.0, -inf, 1.0]).sum()
    expected = p**0.4 * other.numpy() ** 0.6
    np.testing.assert_allclose(pooled.probs.numpy(), expected / expected.sum(), rtol=1e-12, atol=0)
    assert pooled.probs[1].item() == 0
    for bad, message in (([0.0, math.nan, 1.0], "finite or -inf"), ([0.0, inf, 1.0], "finite or -inf"),
                         ([-inf, -inf, -inf], "finite or -inf")):  # torch's normalisation makes this NaN
        expert = Categorical(logits=torch.tensor(bad, dtype=torch.float64), validate_args=False)
        with pytest.raises(ValueError, match=f"Categorical logits must .*{message}"):
            opinionpool.holder([expert, Categorical(probs=other)], alpha=0.5)


def test_a_degenerate_row_leaves_the_other_rows_their_logits():
    """The returned torch distribution is built from logits row by row: one row of probability 0 made every row
    use probs, which torch clamps to a logit of +-15.9 in float32 (log q(0) -15.94 instead of -16.64)."""
    p = torch.tensor([1 - 2.0**-24, 0.0], dtype=torch.float32)
    experts = Bernoulli(probs=torch.stack((p, torch.full_like(p, 0.5)), -1))
    pool = opinionpool.holder(experts, alpha=0.0)
    matched = pool.moment_match()
    zero = torch.zeros(2, dtype=torch.float32)
    # the log-linear pool of equal weights: q(0) proportional to sqrt((1 - p) / 2), q(1) to sqrt(p / 2)
    exact = [0.5 * math.log(2.0**-24) - math.log(math.sqrt(2.0**-24) + math.sqrt(1 - 2.0**-24)), 0.0]
    np.testing.assert_allclose(matched.log_prob(zero).numpy(), exact, rtol=1e-5)
    np.testing.assert_allclose(pool.log_prob(zero).numpy(), exact, rtol=1e-5)
    assert matched.log_prob(torch.ones(2))[1].item() < -1e37  # p = 0: a logit whose n + 1 multiples stay finite


@pytest.mark.parametrize("dtype", DTYPES)
def test_moment_matched_binomial_of_a_certain_expert_has_a_finite_log_prob(dtype):
    """p = 1 was written as the largest float logit, which torch's Binomial log_prob multiplies by n: inf - inf = NaN
    for the matched pool of Binomial(5, 1) and Binomial(5, 0.5) (a point mass at 5)."""
    matched = opinionpool.holder(Binomial(5, torch.tensor([1.0, 0.5], dtype=dtype)), alpha=0).moment_match()
    assert float(matched.log_prob(torch.tensor(5.0, dtype=dtype))) == 0.0
    impossible = float(matched.log_prob(torch.tensor(4.0, dtype=dtype)))
    assert impossible < -1e30 and math.isfinite(impossible)


def test_moment_matching_keeps_probabilities_that_underflow():
    """In probability space a logit of -800 became exactly 0 and its log -inf (with no gradient), and a mixture of
    Bernoulli(logit 800) and Bernoulli(logit 790) gave log P(0) = -1.8e308. The mixture's log-probabilities by hand:
    log sum_k pi_k p_k(c)."""
    logits = torch.tensor([0.0, -800.0, 5.0], dtype=torch.float64, requires_grad=True)
    matched = opinionpool.holder(Categorical(logits=logits.unsqueeze(0)), alpha=1.0).moment_match()
    log_z = math.log(1 + math.exp(5))
    assert float(matched.log_prob(torch.tensor(1))) == pytest.approx(-800 - log_z, rel=1e-14)
    (gradient,) = torch.autograd.grad(matched.log_prob(torch.tensor(1)), logits)
    expected = [-1 / (1 + math.exp(5)), 1.0, -math.exp(5) / (1 + math.exp(5))]  # d/dlogit of logit_1 - logsumexp
    assert gradient.tolist() == pytest.approx(expected, rel=1e-12)
    mixture = opinionpool.holder(Bernoulli(logits=torch.tensor([800.0, 790.0], dtype=torch.float64)), alpha=1.0)
    expected_log_p0 = math.log(0.5) - 790 + math.log1p(math.exp(-10))  # 0.5 e^-800 + 0.5 e^-790
    assert float(mixture.moment_match().log_prob(torch.tensor(0.0, dtype=torch.float64))) == pytest.approx(
        expected_log_p0, rel=1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
def test_experts_expanded_after_use_keep_their_exact_probabilities(dtype):
    """torch caches the other parameter once read, and expand() makes the logits the parameter: experts given by
    probabilities with exact zeros were read back from torch's clamped logits (the log-linear pool gave the ruled-out
    outcome 4e-4 in float32). Experts given by logits keep them (logit 20 is not probability one)."""
    bernoulli = Bernoulli(probs=torch.tensor([0.0, 0.6], dtype=dtype))
    bernoulli.log_prob(torch.ones(2, dtype=dtype))
    pool = opinionpool.holder(bernoulli.expand((2,)), alpha=0)
    assert float(pool.log_prob(torch.tensor(1.0, dtype=dtype)).exp()) == 0.0
    categorical = Categorical(probs=torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.5, 0.3]], dtype=dtype))
    categorical.log_prob(torch.tensor([1, 1]))
    assert opinionpool.holder(categorical.expand((2,)), alpha=0).moment_match().probs.tolist() == [0.0, 1.0, 0.0]
    logits = Bernoulli(logits=torch.tensor([20.0, -3.0], dtype=dtype))
    logits.probs  # cached, rounded to exactly 1 in float32
    # q(0) proportional to sqrt(sigmoid(-20) sigmoid(3)), q(1) to sqrt(sigmoid(20) sigmoid(-3))
    log0 = 0.5 * (-math.log1p(math.exp(20)) - math.log1p(math.exp(-3)))
    log1 = 0.5 * (-math.log1p(math.exp(-20)) - math.log1p(math.exp(3)))
    expected = log0 - np.logaddexp(log0, log1)
    got = float(opinionpool.holder(logits.expand((2,)), alpha=0).log_prob(torch.tensor(0.0, dtype=dtype)))
    assert got == pytest.approx(expected, rel=1e-5 if dtype == torch.float32 else 1e-12)


def test_moment_matching_gradient_with_a_category_every_expert_rules_out():
    """log-sum-exp over a column of -inf has a NaN backward (exp(-inf - -inf)), which spread to every input of the
    log-space moment matching; against central differences."""
    def matched_log_prob(probs):
        return opinionpool.holder(Categorical(probs=probs), alpha=0.5).moment_match().log_prob(torch.tensor(1))

    probs = torch.tensor([[0.0, 0.3, 0.7], [0.0, 0.6, 0.4]], dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad(matched_log_prob(probs), probs)
    assert torch.isfinite(gradient).all()
    h = 1e-6
    for index in ((0, 1), (0, 2), (1, 1), (1, 2)):
        step = torch.zeros_like(probs)
        step[index] = h
        central = (matched_log_prob(probs.detach() + step) - matched_log_prob(probs.detach() - step)) / (2 * h)
        assert float(gradient[index]) == pytest.approx(float(central), rel=1e-6, abs=1e-9), index


def test_term_sizes_of_experts_with_outcomes_of_probability_zero_are_finite():
    """An infinite natural parameter (probability 0) times a zero statistic made the size of the log density's terms
    NaN where the density itself is exact (log 1 = 0), and inf where it is 0: every error the numerical engine
    derives from them was NaN. Reference: the terms by hand (log(1 - p) for a Bernoulli's 0, log p for its 1)."""
    from opinionpool.experts import as_experts

    experts = as_experts(torch.distributions.Bernoulli(probs=torch.tensor([0.0, 0.3], dtype=torch.float64)))
    values = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    size = experts.family.log_prob_term_size(experts.params, values)
    assert torch.isfinite(size).all()
    # expert 0: nothing to round at 0 (log_prob exactly 0) nor at 1 (-inf); expert 1: |log 0.7| and |logit 0.3| +
    # |log(1 - 0.3)| (its <eta, T> and A), each computed once
    assert size[:, 0].tolist() == [0.0, 0.0]
    assert size[0, 1].item() == pytest.approx(-math.log(0.7), rel=1e-12)
    assert size[1, 1].item() == pytest.approx(abs(math.log(0.3 / 0.7)) - math.log(0.7), rel=1e-12)


@pytest.mark.parametrize("total, value", [(10**6, 300_000), (10**7, 2_999_000), (10**7, 3_000_000)])
def test_float32_binomial_log_densities_of_large_counts(total, value):
    """The binomial coefficient's log-gammas are about 1e7 at n = 1e6: float32 gave -7.31 for -7.05 and -11.0 for
    -8.20. Reference: scipy's log pmf at the probability the float32 expert holds."""
    from scipy import stats

    from opinionpool.experts import as_experts

    experts = as_experts(Binomial(total, probs=torch.tensor([0.3], dtype=torch.float32)))
    # the natural parameters (log(1 - p), log p) as stored, normalised (the family's A does it)
    probability = torch.softmax(experts.params.double(), -1)[..., 1].item()
    got = experts.family.log_prob(experts.params, torch.tensor([float(value)], dtype=torch.float32))
    assert got.dtype == torch.float32
    expected = stats.binom(total, probability).logpmf(value)
    assert got.item() == pytest.approx(expected, rel=3e-7, abs=1e-6)


def test_the_mixture_form_of_categorical_experts_that_rule_out_each_others_categories():
    """The pairwise combination of experts without a common category has every logit -inf (and weight 0): torch
    normalised it to NaN, so the pool's mixture form scored NaN everywhere and could not sample. The alpha = 1/2 pool
    by hand: u = (0.3 q_1^(1/2) + 0.7 q_2^(1/2))^2 = (0.09, 0.245, 0.245), of mass 0.58."""
    experts = [Categorical(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)),
               Categorical(torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64))]
    mixture = opinionpool.holder(experts, 0.5, weights=[0.3, 0.7]).as_mixture()
    values = torch.tensor([0, 1, 2])
    expected = [math.log(0.09 / 0.58), math.log(0.245 / 0.58), math.log(0.245 / 0.58)]
    assert mixture.log_prob(values).tolist() == pytest.approx(expected, rel=1e-14)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        draws = mixture.sample((4000,))
    counts = torch.bincount(draws, minlength=3).to(torch.float64) / 4000
    assert torch.allclose(counts, torch.tensor([0.09, 0.245, 0.245], dtype=torch.float64) / 0.58, atol=0.03)


def test_float32_binomial_experts_beyond_float32s_integers_are_refused():
    """A float32 arange past 2^24 repeats and skips integers: the pools of such Binomials counted points twice or
    not at all (a cdf of 0.049 for 0.066). Refused as float32 Poissons are; float64 experts work."""
    n = 2**24 + 8
    experts = Binomial(n, probs=torch.tensor([1 - 1e-7, 1 - 2e-7], dtype=torch.float32))
    with pytest.raises(ValueError, match=r"Binomial experts in torch.float32 with total_count=16777224: .*use float64"):
        opinionpool.holder(experts, alpha=1.0).cdf(torch.tensor(16777218.0))
    experts64 = Binomial(n, probs=torch.tensor([1 - 1e-7, 1 - 2e-7], dtype=torch.float64))
    assert math.isfinite(float(opinionpool.holder(experts64, alpha=1.0).cdf(torch.tensor(16777218.0, dtype=torch.float64))))


def test_gradients_are_finite_where_a_combination_of_experts_is_empty():
    """Experts that rule out each other's outcomes make an empty geometric combination (weight zero in the pool):
    its log-sum-exp of no finite term had a NaN backward pass, which reached every gradient of the pool beside right
    values. Bernoulli: d mean / d q against a central difference of the two-point formula
    (sum_j lambda_j q_j(z)^(1/3))^3; Categorical: every gradient finite, one entry against a central difference."""
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)

    def exact_mean(q):
        u = [sum(w * p ** (1 / 3) for w, p in zip(weights.tolist(), probs)) ** 3
             for probs in ([1.0, 0.0, 1 - q], [0.0, 1.0, q])]
        return u[1] / (u[0] + u[1])

    q = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    experts = [Bernoulli(torch.tensor(0.0, dtype=torch.float64)), Bernoulli(torch.tensor(1.0, dtype=torch.float64)),
               Bernoulli(q)]
    mean = opinionpool.holder(experts, alpha=1 / 3, weights=weights).mean
    (grad,) = torch.autograd.grad(mean, q)
    assert float(mean) == pytest.approx(exact_mean(0.6), rel=1e-12)
    assert float(grad) == pytest.approx((exact_mean(0.6 + 1e-6) - exact_mean(0.6 - 1e-6)) / 2e-6, rel=1e-6)
    probs = torch.tensor([[0.0, 0.2, 0.8], [0.3, 0.0, 0.7], [0.5, 0.5, 0.0]], dtype=torch.float64)

    def log_z(p):
        return opinionpool.holder([Categorical(probs=p[i]) for i in range(3)], alpha=1 / 3, weights=weights).log_normalizer

    leaf = probs.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(log_z(leaf), leaf)
    assert torch.isfinite(grad).all(), grad
    step = torch.zeros(3, 3, dtype=torch.float64)
    step[0, 1] = 1e-6
    central = (float(log_z(probs + step)) - float(log_z(probs - step))) / 2e-6
    assert float(grad[0, 1]) == pytest.approx(central, rel=1e-6)
