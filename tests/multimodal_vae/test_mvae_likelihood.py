"""Importance-sampled log-likelihoods on a linear-Gaussian model whose marginal likelihood is known exactly."""

import math

import pytest
import torch
from torch import nn

from applications.multimodal_vae.evaluation.likelihood import log_likelihood
from applications.multimodal_vae.models import MultimodalVAE

SIGMA = 0.5
# two modalities of 4 "pixels" (shaped (1, 1, 4)), latent 2; orthogonal columns of unequal norms
W = [torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 0.5]], dtype=torch.float64),
     torch.tensor([[0.3, 0.0], [0.0, -1.0], [0.0, 1.0], [-0.6, 0.0]], dtype=torch.float64)]
B = [torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64), torch.tensor([-0.3, 0.2, 1.0, 0.0], dtype=torch.float64)]


class ExactFactor(nn.Module):
    """The likelihood p(x_m | z) as a Gaussian in z: mean (W'W)^-1 W'(x - b), variance sigma^2 / diag(W'W)."""

    def __init__(self, m, shift=0.0):
        super().__init__()
        self.w, self.b, self.shift = W[m], B[m], shift

    def forward(self, x):
        gram = (self.w * self.w).sum(0)
        mean = (x.reshape(x.shape[0], 4) - self.b) @ self.w / gram
        return mean + self.shift, torch.log(SIGMA**2 / gram).expand_as(mean)


class LinearDecoder(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.w, self.b = W[m], B[m]

    def forward(self, z):
        return (z @ self.w.T + self.b).reshape(z.shape[:-1] + (1, 1, 4))


def model(name, shift=0.0):
    return MultimodalVAE(nn.ModuleList([ExactFactor(0, shift), ExactFactor(1, -shift)]),
                         nn.ModuleList([LinearDecoder(0), LinearDecoder(1)]), name, likelihood="normal",
                         likelihood_scale=SIGMA)


def data(n=5):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 2, generator=g)
    x = [z @ W[m].T + B[m] + SIGMA * torch.randn(n, 4, generator=g) for m in range(2)]
    return torch.stack(x, 1).reshape(n, 2, 1, 1, 4)


def exact_joint(x):
    w = torch.cat(W)
    marginal = torch.distributions.MultivariateNormal(torch.cat(B), w @ w.T + SIGMA**2 * torch.eye(8))
    return marginal.log_prob(x.reshape(x.shape[0], 8))


def exact_conditional(x):
    """log p(x_1 | x_0) from the joint Gaussian of (x_0, x_1)."""
    return exact_joint(x) - torch.distributions.MultivariateNormal(
        B[0], W[0] @ W[0].T + SIGMA**2 * torch.eye(4)).log_prob(x[:, 0].reshape(-1, 4))


def test_with_the_exact_posterior_every_importance_weight_is_the_marginal_likelihood():
    # MVAE's product of the exact likelihood factors and the prior expert is the exact posterior
    x = data()
    estimate = log_likelihood(model("mvae"), x, num_samples=3, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(estimate, exact_joint(x), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["helvae", "mopoe", "mmvae"])
def test_approximate_posteriors_converge_to_the_marginal_likelihood(name):
    # a shifted encoder: the proposal is wrong, the estimate still converges (mixture densities are exact)
    x = data()
    exact = exact_joint(x)
    many = log_likelihood(model(name, shift=0.3), x, num_samples=40_000, chunk_size=10_000,
                          generator=torch.Generator().manual_seed(2))
    assert torch.allclose(many, exact, atol=0.05), (many, exact)
    few = torch.stack([log_likelihood(model(name, shift=0.3), x, num_samples=2,
                                      generator=torch.Generator().manual_seed(s)) for s in range(200)])
    assert (few.mean(0) < exact).all()  # a lower bound in expectation, loose for small K


def test_conditional_likelihood_converges_with_the_exact_subset_posterior():
    x = data()
    condition = torch.tensor([[True] * 5, [False] * 5])
    estimate = log_likelihood(model("mvae"), x, condition=condition, targets=~condition, num_samples=40_000,
                              chunk_size=10_000, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(estimate, exact_conditional(x), atol=0.05)


def test_bad_arguments_are_rejected():
    x = data()
    with pytest.raises(ValueError, match="num_samples must be a positive integer, got 0"):
        log_likelihood(model("mvae"), x, num_samples=0)
    both = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="condition and targets must be disjoint"):
        log_likelihood(model("mvae"), x, condition=both, targets=torch.tensor([[True] * 5, [False] * 5]))
    assert math.isfinite(float(log_likelihood(model("mvae"), x, num_samples=1).sum()))
