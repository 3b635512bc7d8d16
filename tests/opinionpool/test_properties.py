"""Structural properties of Hölder pools, checked on random experts (hypothesis)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Gamma, Independent, Normal

import opinionpool

ORDERS = st.sampled_from([0, 1 / 4, 1 / 3, 1 / 2, 1])


@st.composite
def diag_experts(draw, max_experts=4, dim=3):
    m = draw(st.integers(1, max_experts))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    mu = 3 * torch.randn(m, dim, generator=g)
    sd = torch.exp(torch.randn(m, dim, generator=g) * 0.7)
    w = torch.rand(m, generator=g) + 0.05
    return mu, sd, w


@settings(max_examples=25, deadline=None)
@given(diag_experts(), ORDERS)
def test_permutation_invariance(experts, alpha):
    mu, sd, w = experts
    perm = torch.randperm(mu.shape[0])
    a = opinionpool.holder(Independent(Normal(mu, sd), 1), alpha=alpha, weights=w)
    b = opinionpool.holder(Independent(Normal(mu[perm], sd[perm]), 1), alpha=alpha, weights=w[perm])
    torch.testing.assert_close(a.log_normalizer, b.log_normalizer, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a.variance, b.variance, rtol=1e-10, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(diag_experts(), ORDERS, st.floats(1e-3, 1e3))
def test_weight_rescaling_invariance(experts, alpha, scale):
    mu, sd, w = experts
    a = opinionpool.holder(Independent(Normal(mu, sd), 1), alpha=alpha, weights=w)
    b = opinionpool.holder(Independent(Normal(mu, sd), 1), alpha=alpha, weights=w * scale)
    torch.testing.assert_close(a.log_normalizer, b.log_normalizer, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-10, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(diag_experts(), ORDERS)
def test_mixture_weights_sum_to_one_and_normaliser_is_monotone(experts, alpha):
    mu, sd, w = experts
    dist = Independent(Normal(mu, sd), 1)
    pool = opinionpool.holder(dist, alpha=alpha, weights=w)
    assert pool.mixture_weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    z = [opinionpool.holder(dist, alpha=a, weights=w).log_normalizer.item() for a in (0, 1 / 4, 1 / 3, 1 / 2, 1)]
    assert all(lo <= hi + 1e-12 for lo, hi in zip(z, z[1:])), z
    assert z[-1] == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(diag_experts(), ORDERS)
def test_alpha_one_mixture_weights_are_the_pooling_weights(experts, alpha):
    mu, sd, w = experts
    pool = opinionpool.holder(Independent(Normal(mu, sd), 1), alpha=1, weights=w)
    torch.testing.assert_close(pool.mixture_weights, w / w.sum(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("alpha", [0, 1 / 3, 1 / 2, 1])
def test_single_and_identical_experts_are_returned_unchanged(alpha):
    mu, sd = torch.tensor([0.3, -2.0]), torch.tensor([0.5, 3.0])
    one = opinionpool.holder([Independent(Normal(mu, sd), 1)], alpha=alpha)
    assert one.log_normalizer.item() == 0.0
    assert torch.equal(one.mean, mu)
    torch.testing.assert_close(one.variance, sd**2, rtol=1e-15, atol=0)
    same = opinionpool.holder([Independent(Normal(mu, sd), 1)] * 3, alpha=alpha, weights=[0.2, 0.3, 0.5])
    assert same.log_normalizer.abs().item() < 1e-14
    torch.testing.assert_close(same.mean, mu, rtol=1e-15, atol=0)
    torch.testing.assert_close(same.variance, sd**2, rtol=1e-14, atol=0)
    g = opinionpool.holder([Gamma(torch.tensor(2.5), torch.tensor(1.5))] * 2, alpha=alpha).moment_match()
    assert g.concentration.item() == pytest.approx(2.5, rel=1e-10)
    assert g.rate.item() == pytest.approx(1.5, rel=1e-10)


def test_component_counts_and_cap():
    dist = Independent(Normal(torch.zeros(5, 2), torch.ones(5, 2)), 1)
    assert opinionpool.holder(dist, alpha=1 / 2).num_components == 15  # 5 unimodal + 10 pairwise
    assert opinionpool.holder(dist, alpha=1 / 3).num_components == math.comb(7, 4)
    with pytest.raises(ValueError, match="max_components=10"):
        opinionpool.HolderPool(dist, alpha=1 / 3, max_components=10)
    # past the cap, holder() hands the pool to the numerical engine instead, and says so
    with pytest.warns(UserWarning, match="35 mixture components"):
        assert isinstance(opinionpool.holder(dist, alpha=1 / 3, max_components=10), opinionpool.NumericalHolderPool)


def test_hellinger_pairwise_weights_follow_the_paper():
    """alpha=1/2: unimodal weights lambda_j^2 / Z and pairwise weights 2 lambda_i lambda_j S_ij / Z."""
    mu = torch.tensor([[0.0, 0.0], [1.0, 0.2], [4.0, 0.0]])
    var = torch.tensor([0.5, 0.6, 0.2]).unsqueeze(-1).expand(3, 2)
    lam = torch.tensor([0.2, 0.3, 0.5])
    pool = opinionpool.holder(Independent(Normal(mu, var.sqrt()), 1), alpha=0.5, weights=lam)
    from validation.reference import log_bc_diag_gauss
    s = {(i, j): math.exp(log_bc_diag_gauss(mu[i].numpy(), var[i].numpy(), mu[j].numpy(), var[j].numpy()))
         for i in range(3) for j in range(i + 1, 3)}
    z = sum(lam[j].item() ** 2 for j in range(3)) + sum(2 * lam[i].item() * lam[j].item() * v for (i, j), v in s.items())
    assert pool.log_normalizer.item() == pytest.approx(math.log(z), rel=1e-13)
    expected = sorted([lam[j].item() ** 2 / z for j in range(3)]
                      + [2 * lam[i].item() * lam[j].item() * v / z for (i, j), v in s.items()])
    got = sorted(pool.mixture_weights.tolist())
    assert got == pytest.approx(expected, rel=1e-12)
