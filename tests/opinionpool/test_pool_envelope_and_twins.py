"""The rejection envelope at alpha > 1 with one small weight, and KL estimates against float32 Hölder pools."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal, Poisson

import opinionpool
from opinionpool import Experts


def test_the_envelope_above_one_takes_the_better_bound():
    """At alpha = 20 with weights (1e-6, 1 - 1e-6) the bound lambda_min^(1/alpha - 1) M_1 is e^13, and the weighted
    mixture puts almost nothing where the pool has half its mass: importance log Z was 0.18 +- 0.017 for the grid's
    0.385 (12 stated errors), and sample() raised after 1000 rounds. The bound max_j q_j <= sum_j q_j (log 2 here)
    with the uniform mixture is used where it is the better one."""
    experts = MultivariateNormal(torch.tensor([[0.0, 0.0], [4.0, 0.0]], dtype=torch.float64),
                                 torch.eye(2, dtype=torch.float64).expand(2, 2, 2))
    pool = opinionpool.holder(experts, alpha=20.0, weights=torch.tensor([1e-6, 1 - 1e-6], dtype=torch.float64))
    envelope = pool.envelope()
    assert float(envelope.log_bound) == pytest.approx(math.log(2), rel=1e-12)
    grid = pool.estimate(method="grid")
    for seed in range(3):
        sampled = pool.estimate(method="importance", seed=seed)
        spread = math.hypot(float(sampled.log_normalizer.error), float(grid.log_normalizer.error))
        assert abs(float(sampled.log_normalizer.value - grid.log_normalizer.value)) <= 4.5 * spread
    draws = pool.sample((2000,), seed=0)
    # the pool's mean by the grid against the draws' mean, within 4.5 of its standard errors
    mean = grid.mean.value
    standard_error = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - mean).abs() <= 4.5 * standard_error + grid.mean.error).all()


@pytest.mark.parametrize("alpha", [0.5, 0.0, 0.7])
def test_kl_against_a_float32_pool_is_within_its_stated_error(alpha):
    """The float64 copy of a float32 Hölder pool kept its float32 experts (a frozen dataclass the copy did not look
    into) and its caches (the float32 log-normaliser), and was charged at float64's rounding: KL off by 5.5e-8 with
    1.2e-11 stated. The reference: the same pool, its natural parameters exactly converted to float64."""
    pooled = opinionpool.holder(Normal(torch.tensor([0.0, 3.0], dtype=torch.float64),
                                       torch.tensor([1.0, 0.5], dtype=torch.float64)), alpha=0.3,
                                weights=torch.tensor([0.3, 0.7], dtype=torch.float64))
    low = opinionpool.holder(Normal(torch.tensor([0.1, 3.1], dtype=torch.float32),
                                    torch.tensor([1.3, 0.65], dtype=torch.float32)), alpha=alpha)
    assert low.experts.params.dtype == torch.float32
    same = opinionpool.holder(Experts(low.family, low.experts.params.to(torch.float64)), alpha=alpha,
                              weights=low.log_weights.to(torch.float64).exp())
    estimate, reference = pooled.kl_estimate(low), pooled.kl_estimate(same)
    assert abs(float(estimate.value) - float(reference.value)) <= float(estimate.error) + float(reference.error)


def test_the_cdf_at_the_ends_of_the_support_is_exact():
    """A mixture's weights need not sum to one to the bit: an exact pool's cdf(+inf) was 1 - 2e-16."""
    from torch.distributions import Gamma

    normal = opinionpool.holder(Normal(torch.tensor([0.0, 3.0], dtype=torch.float64),
                                       torch.tensor([1.0, 0.5], dtype=torch.float64)), alpha=0.5,
                                weights=torch.tensor([0.3, 0.7], dtype=torch.float64))
    assert normal.cdf(torch.tensor([-math.inf, math.inf], dtype=torch.float64)).tolist() == [0.0, 1.0]
    gamma = opinionpool.holder(Gamma(torch.tensor([2.0, 3.0], dtype=torch.float64),
                                     torch.tensor([1.0, 0.5], dtype=torch.float64)), alpha=0.7)
    assert gamma.cdf(torch.tensor([-1.0, 0.0, math.inf], dtype=torch.float64)).tolist() == [0.0, 0.0, 1.0]


def test_a_seed_and_a_generator_together_are_refused():
    """The seed was silently ignored when a generator was given too."""
    pool = opinionpool.holder(Normal(torch.tensor([0.0, 3.0], dtype=torch.float64),
                                     torch.tensor([1.0, 0.5], dtype=torch.float64)), alpha=0.7)
    with pytest.raises(ValueError, match="seed or generator, not both"):
        pool.sample((3,), seed=1, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 0.7])
def test_every_pool_samples_from_a_seed_or_a_generator(alpha):
    """The exact pools (alpha = 0, 1/n) took no seed: code seeding its samples broke exactly there. Every pool's
    ``sample`` (and the exact pool's ``rsample``) now draws the same values from the same seed, on a forked RNG."""
    experts = Normal(torch.tensor([0.0, 3.0, -1.0], dtype=torch.float64),
                     torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64))
    discrete = Poisson(torch.tensor([[1.0, 4.0], [0.5, 9.0]], dtype=torch.float64))
    discrete_pool = opinionpool.holder(discrete, alpha)
    for pool in (opinionpool.holder(experts, alpha, weights=[0.2, 0.5, 0.3]), discrete_pool):
        # (torch's Poisson has no rsample)
        exact = isinstance(pool, opinionpool.HolderPool) and pool is not discrete_pool
        samplers = [pool.sample] + ([pool.rsample] if exact else [])
        for draw in samplers:
            torch.manual_seed(11)
            first = draw((500,), seed=3)
            after = torch.rand(())
            torch.manual_seed(11)
            assert torch.rand(()) == after  # the global stream untouched
            torch.testing.assert_close(draw((500,), seed=3), first, rtol=0, atol=0)
            assert not torch.equal(draw((500,), seed=4), first)
            twins = [draw((500,), generator=torch.Generator().manual_seed(5)) for _ in range(2)]
            torch.testing.assert_close(*twins, rtol=0, atol=0)
            with pytest.raises(ValueError, match="seed or generator, not both"):
                draw((3,), seed=1, generator=torch.Generator())
            with pytest.raises(ValueError, match="seed must be an integer or None"):
                draw((0,), seed=1.5)
        # seeded draws are draws of the pool: the sample mean within 5 standard errors of the pool's
        samples = pool.sample((4000,), seed=0)
        error = (pool.variance / 4000).sqrt()
        assert bool(((samples.mean(0) - pool.mean).abs() < 5 * error).all())


@pytest.mark.parametrize("seed", range(3))
def test_kl_against_a_numerical_pool_counts_its_normaliser_error(seed):
    """A numerical pool's log-density is log u less its estimated log Z: against one estimated from 2000 importance
    samples the KL's error left that estimate's error out (a standard error: the difference is judged at 4.5 of
    them, as validation/ judges z-scores). The reference: the same other pool by quadrature."""
    experts = Normal(torch.tensor([0.0, 2.0, -1.0], dtype=torch.float64),
                     torch.tensor([1.0, 0.7, 1.5], dtype=torch.float64))
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    pooled = opinionpool.holder(experts, alpha=0.5, weights=weights)
    sampled = opinionpool.NumericalHolderPool(experts, -1.0, weights, method="importance", num_samples=2000, seed=seed)
    exact = opinionpool.NumericalHolderPool(experts, -1.0, weights, method="quadrature")
    estimate, reference = pooled.kl_estimate(sampled), pooled.kl_estimate(exact)
    assert float(estimate.error) >= float(sampled.summary.log_normalizer.error)
    assert abs(float(estimate.value) - float(reference.value)) <= 4.5 * float(estimate.error) + float(reference.error)
