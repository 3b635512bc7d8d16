"""The functional (mu, logvar) API: agreement with the object API, masks, prior expert, gradients."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch.distributions import Independent, Normal

import opinionpool
import opinionpool.functional as opf


def random_experts(m=4, b=3, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, b, d, generator=g) * 2, torch.randn(m, b, d, generator=g)


@pytest.mark.parametrize("alpha", [0, 1 / 3, 1 / 2, 1])
def test_functional_holder_equals_object_moment_match(alpha):
    mu, logvar = random_experts()
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    loc, lv = opf.holder(mu, logvar, alpha, dim=0, weights=w)
    experts = Independent(Normal(mu.movedim(0, 1), (0.5 * logvar).exp().movedim(0, 1)), 1)
    matched = opinionpool.holder(experts, alpha=alpha, weights=w).moment_match()
    torch.testing.assert_close(loc, matched.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lv.exp(), matched.variance, rtol=1e-12, atol=1e-12)


def test_paper_formula_for_hellinger_aggregation():
    """HELVAE eqs. (16) and (20) with uniform weights, written out independently."""
    mu, logvar = random_experts(m=3, b=2, d=4, seed=1)
    var = logvar.exp()
    m = mu.shape[0]
    num, sq, z = mu.sum(0).clone(), (mu**2 + var).sum(0).clone(), torch.full(mu.shape[1:2], float(m))
    for i in range(m):
        for j in range(i + 1, m):
            s = torch.exp((0.5 * torch.log(2 * (var[i] * var[j]).sqrt() / (var[i] + var[j]))
                           - 0.25 * (mu[i] - mu[j]) ** 2 / (var[i] + var[j])).sum(-1, keepdim=True))
            mu_ij = (mu[i] * var[j] + mu[j] * var[i]) / (var[i] + var[j])
            var_ij = 2 * var[i] * var[j] / (var[i] + var[j])
            num = num + 2 * mu_ij * s
            sq = sq + 2 * (mu_ij**2 + var_ij) * s
            z = z + 2 * s.squeeze(-1)
    mean = num / z.unsqueeze(-1)
    variance = sq / z.unsqueeze(-1) - mean**2
    loc, lv = opf.hellinger(mu, logvar)
    torch.testing.assert_close(loc, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lv.exp(), variance, rtol=1e-10, atol=1e-12)


def test_poe_is_the_precision_weighted_product():
    mu, logvar = random_experts()
    loc, lv = opf.poe(mu, logvar, prior_expert=True)
    precision = (-logvar).exp().sum(0) + 1.0
    torch.testing.assert_close(lv, -precision.log(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loc, (mu * (-logvar).exp()).sum(0) / precision, rtol=1e-12, atol=1e-12)
    product = opinionpool.poe(Independent(Normal(mu.movedim(0, 1), (0.5 * logvar).exp().movedim(0, 1)), 1))
    loc2, lv2 = opf.poe(mu, logvar)
    torch.testing.assert_close(product.mean, loc2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha", [0, 1 / 2, 1])
def test_mask_equals_dropping_the_missing_experts(alpha):
    mu, logvar = random_experts()
    mask = torch.tensor([[True, False, True], [True, True, False], [False, True, True], [True, True, True]])
    mu_masked = torch.where(mask.unsqueeze(-1), mu, torch.full_like(mu, float("nan")))  # garbage is ignored
    loc, lv = opf.holder(mu_masked, logvar, alpha, mask=mask, weights=[0.1, 0.2, 0.3, 0.4])
    for b in range(3):
        keep = mask[:, b]
        w = torch.tensor([0.1, 0.2, 0.3, 0.4])[keep]
        ref_loc, ref_lv = opf.holder(mu[keep, b], logvar[keep, b], alpha, weights=w)
        torch.testing.assert_close(loc[b], ref_loc, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lv[b], ref_lv, rtol=1e-12, atol=1e-12)


POOLS = {"hellinger": opf.hellinger, "holder 1/3": lambda m, v, **k: opf.holder(m, v, 1 / 3, **k),
         "holder 0": lambda m, v, **k: opf.holder(m, v, 0.0, **k), "holder 1": lambda m, v, **k: opf.holder(m, v, 1.0, **k),
         "poe": opf.poe, "barycenter": opf.wasserstein_barycenter,
         "moe moments": lambda m, v, **k: opf.moe(m, v, **k).moments(),
         "entropy bounds": lambda m, v, **k: opf.moe(m, v, **k).entropy_bounds(),
         "mixture density": lambda m, v, **k: (opf.holder_mixture(m, v, 0.5, **k).log_prob(torch.zeros_like(m[0])),)}


@pytest.mark.parametrize("name", POOLS)
@pytest.mark.parametrize("level", [90.0, -90.0])
def test_an_expert_of_weight_zero_is_dropped_whatever_it_holds(name, level):
    """Weight zero is absence: in float32 an expert at log-variance 90 (or -90) among experts near 0 changes
    neither the pool nor the gradients of the others, and gets zero gradients itself (it gave NaN ones)."""
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(3, 2, 2, generator=g, dtype=torch.float32)
    logvar = torch.randn(3, 2, 2, generator=g, dtype=torch.float32) * 0.3
    logvar[2] = level
    leaves = [mu.clone().requires_grad_(), logvar.clone().requires_grad_()]
    pooled = POOLS[name](*leaves, weights=torch.tensor([0.3, 0.7, 0.0], dtype=torch.float32))
    grads = torch.autograd.grad(sum(t.sum() for t in pooled), leaves)
    kept = [t[:2].clone().requires_grad_() for t in (mu, logvar)]
    expected = POOLS[name](*kept, weights=torch.tensor([0.3, 0.7], dtype=torch.float32))
    expected_grads = torch.autograd.grad(sum(t.sum() for t in expected), kept)
    for got, want in zip(pooled, expected):
        torch.testing.assert_close(got, want)
    for got, want in zip(grads, expected_grads):
        assert torch.isfinite(got).all() and (got[2] == 0).all()
        torch.testing.assert_close(got[:2], want)


def test_mask_with_no_expert_needs_the_prior():
    mu, logvar = random_experts(m=2, b=2)
    mask = torch.tensor([[True, False], [True, False]])
    with pytest.raises(ValueError, match="no present expert"):
        opf.hellinger(mu, logvar, mask=mask)
    loc, lv = opf.hellinger(mu, logvar, mask=mask, prior_expert=True)
    torch.testing.assert_close(loc[1], torch.zeros(5), rtol=0, atol=0)  # only the prior is left
    torch.testing.assert_close(lv[1], torch.zeros(5), rtol=0, atol=1e-15)


def test_gradcheck_functional_aggregators():
    mu, logvar = random_experts(m=3, b=2, d=3, seed=4)
    w = torch.tensor([0.2, 0.3, 0.5], requires_grad=True)
    mu.requires_grad_(True)
    logvar.requires_grad_(True)
    for alpha in (0, 1 / 3, 1 / 2, 1):
        assert torch.autograd.gradcheck(lambda m, v, w, a=alpha: opf.holder(m, v, a, weights=w), (mu, logvar, w))
    assert torch.autograd.gradcheck(lambda m, v: opf.poe(m, v, prior_expert=True), (mu, logvar))
    mask = torch.tensor([[True, True], [False, True], [True, False]])
    assert torch.autograd.gradcheck(lambda m, v, w: opf.hellinger(m, v, weights=w, mask=mask), (mu, logvar, w))


def test_gradcheck_object_moment_match():
    g = torch.Generator().manual_seed(2)
    loc = torch.randn(3, 2, generator=g).requires_grad_(True)
    scale = (torch.rand(3, 2, generator=g) + 0.5).requires_grad_(True)

    def diag(loc, scale):
        q = opinionpool.holder(Independent(Normal(loc, scale), 1), alpha=0.5, weights=[0.2, 0.3, 0.5]).moment_match()
        return q.mean, q.variance

    assert torch.autograd.gradcheck(diag, (loc, scale))

    def full(loc, scale):
        pool = opinionpool.holder(Independent(Normal(loc, scale), 1), alpha=1 / 3, weights=[0.2, 0.3, 0.5])
        return pool.moment_match("gaussian").covariance_matrix, pool.log_normalizer

    assert torch.autograd.gradcheck(full, (loc, scale))
    from torch.distributions import Gamma
    conc = torch.tensor([2.0, 3.5, 1.5], requires_grad=True)
    rate = torch.tensor([1.0, 2.0, 0.7], requires_grad=True)

    def gamma(conc, rate):  # through the damped-Newton inverse mean map
        q = opinionpool.holder(Gamma(conc, rate), alpha=0.5, weights=[0.2, 0.3, 0.5]).moment_match()
        return q.concentration, q.rate

    assert torch.autograd.gradcheck(gamma, (conc, rate))


def test_learnable_weights_receive_gradients():
    mu, logvar = random_experts()
    raw = torch.zeros(4, requires_grad=True)
    loc, lv = opf.hellinger(mu, logvar, weights=torch.softmax(raw, 0))
    (loc.sum() + lv.sum()).backward()
    assert raw.grad is not None and torch.isfinite(raw.grad).all() and raw.grad.abs().sum() > 0


@pytest.mark.parametrize("pool", [opf.holder, opf.holder_mixture])
def test_an_alpha_that_requires_grad_is_told_it_gets_none(pool):
    """The exact pools take alpha as a number: a learnable alpha's gradient stayed None without a word (the object
    API warns)."""
    mu, logvar = random_experts()
    alpha = torch.tensor(1 / 3, dtype=torch.float64, requires_grad=True)
    with pytest.warns(UserWarning, match=r"alpha=0.333.* requires grad, but the exact pools .* carry no gradient "
                                         r"with respect to alpha; opinionpool.NumericalHolderPool"):
        pool(mu, logvar, alpha=alpha)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pool(mu, logvar, alpha=alpha.detach())  # a tensor without grad: no warning


def test_holder_mixture_is_normalised_and_matches_object_components():
    mu, logvar = random_experts(m=3)
    mix = opf.holder_mixture(mu, logvar, 1 / 2)
    assert mix.log_weights.shape == (3, 6) and mix.loc.shape == (3, 6, 5)
    torch.testing.assert_close(mix.log_weights.exp().sum(-1), torch.ones(3), rtol=0, atol=1e-14)
    experts = Independent(Normal(mu.movedim(0, 1), (0.5 * logvar).exp().movedim(0, 1)), 1)
    pool = opinionpool.holder(experts, alpha=0.5)
    torch.testing.assert_close(mix.log_weights, pool.log_mixture_weights, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mix.loc, pool.component_params[..., 0, :], rtol=1e-12, atol=1e-12)
    moe = opf.moe(mu, logvar)
    torch.testing.assert_close(moe.log_weights.exp(), torch.full((3, 3), 1 / 3), rtol=1e-15, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(dtype):
    mu, logvar = random_experts(m=5, b=8, d=64)
    mu, logvar = mu.to(dtype), logvar.to(dtype)
    cpu = opf.hellinger(mu, logvar)
    gpu = opf.hellinger(mu.cuda(), logvar.cuda())
    torch.testing.assert_close(gpu[0].cpu(), cpu[0])
    torch.testing.assert_close(gpu[1].cpu(), cpu[1])
    pool = opinionpool.holder(Independent(Normal(mu.cuda().movedim(0, 1), (0.5 * logvar.cuda()).exp().movedim(0, 1)), 1),
                              alpha=0.5)
    assert pool.moment_match().mean.device.type == "cuda"


def _mixture():
    log_weights = torch.log(torch.tensor([[0.15, 0.85, 0.0], [0.5, 0.2, 0.3]]))
    loc = torch.tensor([[[-2.0, 0.5], [1.0, 3.0], [500.0, 500.0]], [[0.0, 0.0], [4.0, -1.0], [-3.0, 2.0]]])
    logvar = torch.log(torch.tensor([[[0.3, 2.0], [1.5, 0.1], [1.0, 1.0]], [[1.0, 0.5], [0.2, 3.0], [2.0, 0.7]]]))
    return opf.GaussianMixture(log_weights, loc, logvar)


def test_gaussian_mixture_log_prob_matches_torch_distributions():
    mixture = _mixture()
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=mixture.log_weights),
        torch.distributions.Independent(torch.distributions.Normal(mixture.loc, torch.exp(0.5 * mixture.logvar)), 1))
    z = torch.randn(5, 2, 2) * 3
    assert torch.allclose(mixture.log_prob(z), reference.log_prob(z), rtol=1e-12, atol=1e-12)


def test_mixture_component_log_probs_are_each_components_density():
    """``component_log_probs(z)`` ``(..., K)`` of both families against torch.distributions, component by
    component (the weights left out), and ``log_prob`` their log-sum-exp with the weights."""
    gaussian = _mixture()
    laplace = opf.LaplaceMixture(*gaussian)
    z = torch.randn(5, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3
    for mixture, family in ((gaussian, torch.distributions.Normal), (laplace, torch.distributions.Laplace)):
        scale = torch.exp(0.5 * mixture.logvar) / (math.sqrt(2) if family is torch.distributions.Laplace else 1)
        expected = family(mixture.loc, scale).log_prob(z.unsqueeze(-2)).sum(-1)
        got = mixture.component_log_probs(z)
        assert got.shape == (5, 2, 3)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mixture.log_prob(z), torch.logsumexp(mixture.log_weights + expected, -1))


def test_diag_gaussian_log_prob_is_the_summed_normal_log_density():
    from scipy import stats

    g = torch.Generator().manual_seed(4)
    z, mu, logvar = torch.randn(5, 3, 4, generator=g) * 3, torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    expected = stats.norm.logpdf(z.numpy(), mu.numpy(), np.exp(0.5 * logvar.numpy())).sum(-1)
    got = opf.diag_gaussian_log_prob(z, mu, logvar)
    assert got.shape == (5, 3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-13, atol=1e-13)
    zeros = torch.zeros(())  # the standard-normal prior, by broadcasting
    np.testing.assert_allclose(opf.diag_gaussian_log_prob(z, zeros, zeros).numpy(), stats.norm.logpdf(z.numpy()).sum(-1),
                               rtol=1e-13, atol=1e-13)


def test_diag_gaussian_kl_against_the_textbook_form_in_high_precision_and_by_quadrature():
    """KL(p || q) = log(s_q / s_p) + (s_p^2 + (m_p - m_q)^2) / (2 s_q^2) - 1/2 per axis, summed: in 50-digit mpmath
    (so its cancellation costs nothing), over near-equal, far-apart, tiny and huge scales; one case by quadrature."""
    import mpmath
    from scipy import integrate, stats

    mu_p = torch.tensor([[0.3, -1e3, 5.0], [1e-3, 40.0, 0.0]], dtype=torch.float64)
    logvar_p = torch.tensor([[-0.4, 20.0, -30.0], [1e-9, -25.0, 3.0]], dtype=torch.float64)
    mu_q = torch.tensor([[-0.2, -1e3 + 1e-4, 5.0], [0.0, -40.0, 0.0]], dtype=torch.float64)
    logvar_q = torch.tensor([[0.7, 20.0 + 1e-7, 30.0], [0.0, 25.0, -3.0]], dtype=torch.float64)
    mpmath.mp.dps = 50

    def textbook(mp, lp, mq, lq):
        mp, lp, mq, lq = (mpmath.mpf(float(v)) for v in (mp, lp, mq, lq))
        return (lq - lp) / 2 + (mpmath.exp(lp) + (mp - mq) ** 2) / (2 * mpmath.exp(lq)) - mpmath.mpf(1) / 2

    expected = [float(sum(textbook(*(t[b, d] for t in (mu_p, logvar_p, mu_q, logvar_q))) for d in range(3)))
                for b in range(2)]
    got = opf.diag_gaussian_kl(mu_p, logvar_p, mu_q, logvar_q)
    assert got.shape == (2,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    p, q = stats.norm(0.3, np.exp(-0.2)), stats.norm(-0.2, np.exp(0.35))
    by_quadrature = integrate.quad(lambda u: p.pdf(u) * (p.logpdf(u) - q.logpdf(u)), -np.inf, np.inf, epsabs=1e-13)[0]
    assert float(opf.diag_gaussian_kl(mu_p[0, :1], logvar_p[0, :1], mu_q[0, :1], logvar_q[0, :1])) == pytest.approx(
        by_quadrature, rel=1e-9)
    assert float(opf.diag_gaussian_kl(mu_p, logvar_p, mu_p, logvar_p).abs().max()) == 0  # KL(p || p) = 0 exactly


def test_gaussian_mixture_moments_are_the_law_of_total_variance():
    """Mean sum_k w_k mu_k and variance sum_k w_k (var_k + mu_k^2) - mean^2, written out per coordinate in float64
    (unequal weights; the weight-zero component far away must not count)."""
    weights = [[0.15, 0.85, 0.0], [0.5, 0.2, 0.3]]
    loc = [[[-2.0, 0.5], [1.0, 3.0], [500.0, 500.0]], [[0.0, 0.0], [4.0, -1.0], [-3.0, 2.0]]]
    var = [[[0.3, 2.0], [1.5, 0.1], [1.0, 1.0]], [[1.0, 0.5], [0.2, 3.0], [2.0, 0.7]]]
    mean, logvar = _mixture().moments()
    assert mean.shape == logvar.shape == (2, 2)
    for b in range(2):
        for d in range(2):
            m = sum(weights[b][k] * loc[b][k][d] for k in range(3))
            second = sum(weights[b][k] * (var[b][k][d] + loc[b][k][d] ** 2) for k in range(3))
            assert float(mean[b, d]) == pytest.approx(m, rel=1e-13, abs=1e-13)
            assert float(logvar[b, d].exp()) == pytest.approx(second - m * m, rel=1e-12)


def test_gaussian_mixture_samples_have_the_mixture_moments_and_skip_zero_weights():
    mixture = _mixture()
    n = 200_000
    z = mixture.sample((n,), generator=torch.Generator().manual_seed(3))
    assert z.shape == (n, 2, 2)
    assert (z[:, 0].abs() < 100).all()  # the weight-zero component at 500 is never drawn
    mean, logvar = mixture.moments()
    variance = logvar.exp()
    standard_error = (variance / n).sqrt()
    assert ((z.mean(0) - mean).abs() < 4 * standard_error).all()
    fourth = ((z - mean) ** 4).mean(0)  # standard error of the sample variance from the fourth moment
    assert ((z.var(0) - variance).abs() < 4 * ((fourth - variance**2) / n).sqrt()).all()
    again = mixture.sample((n,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(z, again)


def test_holder_mixture_lists_the_experts_first():
    mu, logvar = torch.randn(3, 4, 2), torch.randn(3, 4, 2)  # experts along dim 0
    for alpha in (0.5, 1 / 3):
        mixture = opf.holder_mixture(mu, logvar, alpha, dim=0, weights=torch.tensor([0.2, 0.5, 0.3]))
        assert torch.allclose(mixture.loc[:, :3], mu.movedim(0, 1)) and torch.allclose(mixture.logvar[:, :3],
                                                                                        logvar.movedim(0, 1))
        assert not torch.allclose(mixture.loc[:, 3], mu[0]) and mixture.loc.shape[1] > 3


@pytest.mark.parametrize("alpha, num_experts", [(1 / 2, 3), (1 / 3, 3), (1 / 2, 4), (0, 3), (1 / 2, 1)])
def test_holder_mixture_members_are_the_experts_each_component_depends_on(alpha, num_experts):
    """Perturbing one expert moves exactly the components the members table gives it."""
    mu, logvar = random_experts(m=num_experts, b=2, d=2)
    members = opf.holder_mixture_members(num_experts, alpha)
    base = opf.holder_mixture(mu, logvar, alpha, dim=0)
    assert members.dtype == torch.bool and members.shape == (base.loc.shape[1], num_experts)
    for j in range(num_experts):
        moved_mu, moved_logvar = mu.clone(), logvar.clone()
        moved_mu[j] += 1.0
        moved_logvar[j] -= 0.5
        moved = opf.holder_mixture(moved_mu, moved_logvar, alpha, dim=0)
        changed = ((moved.loc != base.loc) | (moved.logvar != base.logvar)).any(-1).all(0)
        assert torch.equal(changed, members[:, j]), j
    if alpha == 1 / 2 and num_experts == 3:  # the experts, then the pairs in lexicographic order
        expected = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]]
        assert members.int().tolist() == expected
    with_prior = opf.holder_mixture_members(num_experts, alpha, prior_expert=True)
    assert with_prior.shape[1] == num_experts + 1
    assert with_prior.shape[0] == opf.holder_mixture(mu, logvar, alpha, dim=0, prior_expert=True).loc.shape[1]


def test_holder_mixture_members_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_experts must be a positive integer, got 0"):
        opf.holder_mixture_members(0)
    with pytest.raises(NotImplementedError, match="alpha=0.3 has no closed form"):
        opf.holder_mixture_members(3, 0.3)
    with pytest.raises(ValueError, match="max_components=10"):
        opf.holder_mixture_members(5, 1 / 2, max_components=10)


@pytest.mark.parametrize("dtype, light", [(torch.float32, -400.0), (torch.float64, -3000.0)])
def test_mixture_moments_of_a_point_mass_beside_a_light_broad_component(dtype, light):
    """A component of weight about one and variance zero at the mean, beside one of log-weight ``light`` and unit
    variance: the variance is e^light exactly (to the rounding of the weights). The scaled deviations' factor
    e^(-scale / 2) overflowed and met the point mass's zero deviation as NaN (before the weighted scale: -inf)."""
    mixture = opf.GaussianMixture(torch.tensor([0.0, light], dtype=dtype), torch.zeros(2, 1, dtype=dtype),
                                  torch.tensor([[-math.inf], [0.0]], dtype=dtype))
    mean, logvar = mixture.moments()
    assert mean.item() == 0.0 and logvar.item() == pytest.approx(light, rel=1e-6)
