"""The mixture of diagonal Laplace experts (``moe(..., family="laplace")``, the MMVAE code's posteriors) against
scipy's Laplace in float64: densities, the moment-matched Gaussian, draws and their gradients."""

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

import opinionpool.functional as opf

# three experts of unequal scales and far-apart locations, asymmetric weights, a batch of 2, latent 3
LOC = torch.tensor([[[0.3, -1.0, 4.0], [2.0, 0.0, -3.0]],
                    [[-2.5, 1.5, 0.0], [1e3, -7.0, 0.5]],
                    [[0.0, 0.2, -40.0], [-1e3, 3.0, 2.0]]], dtype=torch.float64)
LOGVAR = torch.tensor([[[0.0, -3.0, 2.0], [1.0, -8.0, 0.5]],
                       [[-1.0, 4.0, 0.0], [2.0, 0.0, -2.0]],
                       [[3.0, 0.5, -5.0], [-1.0, 1.0, 6.0]]], dtype=torch.float64)
WEIGHTS = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)


def scipy_component_logpdf(z, loc, logvar):
    """log of the product over the latent of Laplace densities of scale b = sqrt(var / 2), textbook
    ``-log(2 b) - |z - loc| / b`` in numpy (scipy 1.17's ``laplace.logpdf`` is -inf beyond about 745 scales),
    checked against scipy where scipy is finite."""
    scale = np.sqrt(np.exp(logvar) / 2)
    terms = -np.log(2 * scale) - np.abs(z - loc) / scale
    by_scipy = stats.laplace.logpdf(z, loc=loc, scale=scale)
    finite = np.isfinite(by_scipy)
    np.testing.assert_allclose(terms[finite], by_scipy[finite], rtol=1e-13)
    return terms.sum(-1)


def scipy_mixture_logpdf(z, weights, loc, logvar, present):
    """(S, B) from z (S, B, D); loc, logvar (M, B, D); weights (M,); present (M, B)."""
    out = np.empty(z.shape[:2])
    for b in range(z.shape[1]):
        members = [j for j in range(loc.shape[0]) if present[j, b]]
        w = weights[members] / weights[members].sum()
        terms = np.stack([np.log(w[i]) + scipy_component_logpdf(z[:, b], loc[j, b], logvar[j, b])
                          for i, j in enumerate(members)])
        out[:, b] = special.logsumexp(terms, axis=0)
    return out


def test_diag_laplace_log_prob_is_scipys_summed_density_at_tiny_and_huge_scales():
    z = torch.tensor([[0.5, -2.0, 1e-3, 3e4], [0.0, 0.0, -1e-90, 1e90]], dtype=torch.float64)
    loc = torch.tensor([[0.0, 1.0, 0.0, -2e4], [0.0, 0.5, 0.0, 0.0]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, -4.0, -20.0, 30.0], [-400.0, 3.0, -200.0, 400.0]], dtype=torch.float64)
    expected = scipy_component_logpdf(z.numpy(), loc.numpy(), logvar.numpy())
    got = opf.diag_laplace_log_prob(z, loc, logvar)
    assert np.all(np.isfinite(expected))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-13)


def test_standard_laplace_draws_as_torch_distributions_does_and_has_its_law():
    torch.manual_seed(4)
    reference = torch.distributions.Laplace(torch.tensor(0.0, dtype=torch.float64), 1.0).rsample((1000,))
    torch.manual_seed(4)
    assert torch.equal(opf.standard_laplace((1000,), dtype=torch.float64), reference)
    draws = opf.standard_laplace((200_000,), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    again = opf.standard_laplace((200_000,), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    assert stats.kstest(draws.numpy(), stats.laplace.cdf).pvalue > 1e-3
    # variance 2 with its standard error (fourth moment 24: var of x^2 is 24 - 4 = 20)
    assert abs(float((draws**2).mean()) - 2.0) < 5 * math.sqrt(20 / draws.numel())
    assert torch.isfinite(opf.standard_laplace((10**6,), dtype=torch.float32)).all()


def test_laplace_mixture_density_with_weights_and_a_missing_expert_is_scipys():
    present = torch.tensor([[True, True], [True, False], [True, True]])
    mixture = opf.moe(LOC, LOGVAR, weights=WEIGHTS, mask=present, family="laplace")
    assert isinstance(mixture, opf.LaplaceMixture) and not isinstance(mixture, opf.GaussianMixture)
    z = torch.randn(5, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    z[0, 1] = torch.tensor([1e3, -7.0, 0.5])  # at the far expert, masked in that row
    z[1, 1] = torch.tensor([-1e3, 3.0, 2.0])  # at the far expert present there
    expected = scipy_mixture_logpdf(z.numpy(), WEIGHTS.numpy(), LOC.numpy(), LOGVAR.numpy(), present.numpy())
    np.testing.assert_allclose(mixture.log_prob(z).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(mixture.to_distribution().log_prob(z).numpy(), expected, rtol=1e-12)


def test_laplace_mixture_moments_are_the_law_of_total_variance():
    mixture = opf.moe(LOC, LOGVAR, weights=WEIGHTS, family="laplace")
    mean, logvar = mixture.moments()
    w = WEIGHTS.numpy()[:, None, None]
    loc, var = LOC.numpy(), np.exp(LOGVAR.numpy())
    expected_mean = (w * loc).sum(0)
    expected_var = (w * (var + (loc - expected_mean) ** 2)).sum(0)
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(logvar.exp().numpy(), expected_var, rtol=1e-12)


def test_laplace_mixture_draws_have_its_law_and_moments():
    loc = torch.tensor([[[-2.0]], [[1.0]], [[4.0]]], dtype=torch.float64)
    logvar = torch.tensor([[[-1.0]], [[0.5]], [[-3.0]]], dtype=torch.float64)
    mixture = opf.moe(loc, logvar, weights=WEIGHTS, family="laplace")
    draws = mixture.sample((100_000,), generator=torch.Generator().manual_seed(2))[:, 0, 0].numpy()
    w, b = WEIGHTS.numpy(), np.sqrt(np.exp(logvar.numpy().ravel()) / 2)

    def cdf(x):
        return sum(w[k] * stats.laplace.cdf(x, loc=loc.numpy().ravel()[k], scale=b[k]) for k in range(3))

    assert stats.kstest(draws, cdf).pvalue > 1e-3
    mean, matched_logvar = (t[0, 0].item() for t in mixture.moments())
    variance = math.exp(matched_logvar)
    assert abs(draws.mean() - mean) < 5 * math.sqrt(variance / draws.size)
    # the sample variance's standard error from the sample's fourth central moment (heavy tails: not 2 var^2 / n)
    fourth = ((draws - draws.mean()) ** 4).mean()
    assert abs(draws.var() - variance) < 5 * math.sqrt((fourth - draws.var() ** 2) / draws.size)


def test_laplace_draws_are_reparameterised_within_their_component():
    loc = torch.tensor([[[0.5, -1.0]]], dtype=torch.float64, requires_grad=True)
    logvar = torch.tensor([[[0.3, -2.0]]], dtype=torch.float64, requires_grad=True)
    z = opf.moe(loc, logvar, family="laplace").sample((7,), generator=torch.Generator().manual_seed(3))
    z.sum().backward()
    assert torch.equal(loc.grad, torch.full_like(loc, 7.0))
    # d z / d logvar = (z - loc) / 2 for a location-scale family
    torch.testing.assert_close(logvar.grad, 0.5 * (z.detach() - loc.detach()).sum(0, keepdim=True), rtol=1e-13, atol=0)


def test_laplace_mixture_log_prob_gradients():
    loc = LOC.clone().requires_grad_()
    logvar = LOGVAR.clone().requires_grad_()
    weights = WEIGHTS.clone().requires_grad_()
    z = torch.randn(4, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.3
    assert torch.autograd.gradcheck(
        lambda a, b, c: opf.moe(a, b, weights=c, family="laplace").log_prob(z), (loc, logvar, weights))


def test_laplace_prior_expert_is_the_standard_laplace():
    mixture = opf.moe(LOC[:1], LOGVAR[:1], prior_expert=True, family="laplace")
    z = torch.tensor([[[0.2, -0.4, 1.0], [3.0, 0.0, -1.0]]], dtype=torch.float64)
    expert = scipy_component_logpdf(z.numpy()[0], LOC.numpy()[0], LOGVAR.numpy()[0])
    prior = stats.laplace.logpdf(z.numpy()[0]).sum(-1)  # Laplace(0, 1)
    expected = special.logsumexp(np.stack([expert, prior]), axis=0) - math.log(2)
    np.testing.assert_allclose(mixture.log_prob(z)[0].numpy(), expected, rtol=1e-13)


def test_moe_names_an_unknown_family():
    with pytest.raises(ValueError, match=r"family must be one of \('normal', 'laplace'\), got 'cauchy'"):
        opf.moe(LOC, LOGVAR, family="cauchy")


@pytest.mark.slow
def test_laplace_mixture_density_compiles_without_a_graph_break():
    torch._dynamo.reset()

    def density(loc, logvar, z):
        return opf.moe(loc, logvar, weights=WEIGHTS, family="laplace", validate_args=False).log_prob(z)

    z = torch.randn(4, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    compiled = torch.compile(density, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(LOC, LOGVAR, z), density(LOC, LOGVAR, z), rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()
