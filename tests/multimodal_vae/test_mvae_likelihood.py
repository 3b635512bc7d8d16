"""Importance-sampled log-likelihoods on a linear-Gaussian model whose marginal likelihood is known exactly."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch import nn

from applications.multimodal_vae.evaluation.likelihood import log_likelihood, nested_log_likelihoods
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


def model(name, shift=0.0, **kwargs):
    return MultimodalVAE(nn.ModuleList([ExactFactor(0, shift), ExactFactor(1, -shift)]),
                         nn.ModuleList([LinearDecoder(0), LinearDecoder(1)]), name, likelihood="normal",
                         likelihood_scale=SIGMA, **kwargs)


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


def test_subset_mixtures_propose_from_their_full_subset():
    """MoPoE's full subset (the product of the exact factors and its prior expert) is the exact posterior: as the
    proposal of the joint, as in MoPoE's code, every weight is the marginal likelihood (the mixture over all
    subsets, the training posterior, missed it by up to 0.5 nats either way at K = 3 here)."""
    x = data()
    estimate = log_likelihood(model("mopoe"), x, num_samples=3, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(estimate, exact_joint(x), rtol=0, atol=1e-9)


def test_training_weights_of_unequal_modalities_do_not_enter_the_likelihood():
    """Modalities of different sizes are balanced in training by weights w_m (MNIST-SVHN-Text: 3.92, 1, 6.74);
    p(x_m | z)^(w_m) is not a density, so log p(X) stays the exact marginal likelihood (with the weights 3.92 and 1
    it came out -14.65 for an exact -10.50)."""
    x = data()
    weighted = model("mvae")
    weighted.likelihood.weights.copy_(torch.tensor([3.92, 1.0]))
    generator = torch.Generator().manual_seed(1)
    assert torch.allclose(log_likelihood(weighted, x, num_samples=3, generator=generator), exact_joint(x), rtol=0,
                          atol=1e-9)
    assert torch.allclose(log_likelihood(weighted, x, condition=torch.tensor([[True], [False]]).expand(2, 5),
                                         targets=torch.tensor([[False], [True]]).expand(2, 5), num_samples=4000,
                                         generator=generator), exact_conditional(x), atol=0.05)


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


def test_nested_estimates_are_those_of_the_first_draws():
    """Each row is log-mean-exp of the first n importance weights of one sequence of draws, across chunk
    boundaries; the weights here are written out for MVAE (the proposal is the product of the shifted factors and
    N(0, I)) with the proposal's own draws."""
    x, mvae = data(), model("mvae", shift=0.4)
    counts, chunk = (6, 12, 17, 1), 5
    got = nested_log_likelihoods(mvae, x, counts, chunk_size=chunk, generator=torch.Generator().manual_seed(5))
    mu, logvar, _ = mvae.encode_with_private(x.unbind(1))
    precision = 1 + torch.exp(-logvar).sum(0)
    proposal = torch.distributions.Normal((mu * torch.exp(-logvar)).sum(0) / precision, precision.rsqrt())
    generator = torch.Generator().manual_seed(5)
    pool = mvae.conditional_posterior(mu, logvar, torch.ones(2, 5, dtype=torch.bool))
    z = torch.cat([pool.sample((min(chunk, 17 - start),), generator=generator) for start in range(0, 17, chunk)])
    decoded = [torch.distributions.Normal(z @ W[m].T + B[m], SIGMA).log_prob(x[:, m].reshape(5, 4)).sum(-1)
               for m in range(2)]
    log_weight = (sum(decoded) + torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
                  - proposal.log_prob(z).sum(-1))
    expected = torch.stack([torch.logsumexp(log_weight[:n], 0) - math.log(n) for n in counts])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(got[2], log_likelihood(mvae, x, num_samples=17, chunk_size=chunk,
                                                      generator=torch.Generator().manual_seed(5)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_samples must be a positive integer, got 0"):
        nested_log_likelihoods(mvae, x, (0, 4))
    with pytest.raises(ValueError, match="counts must hold at least one number of samples"):
        nested_log_likelihoods(mvae, x, ())


@pytest.mark.parametrize("name, shift", [("helvae", 0.3), ("mvae", 0.5)])
def test_the_rise_from_half_the_draws_estimates_the_bias_at_k(name, shift):
    """Where the bias falls as 1/K, E[L_K] - E[L_(K/2)] = log p(X) - E[L_K]: checked against the exact marginal
    likelihood at K = 64 over 20 000 independent estimates of one tuple (within four standard errors and 15 %, the
    higher-order terms' share at this K)."""
    x = data(1).expand(20_000, -1, -1, -1, -1)
    nested = nested_log_likelihoods(model(name, shift), x, (32, 64), generator=torch.Generator().manual_seed(6))
    rise, bias = nested[1] - nested[0], exact_joint(x[:1]) - nested[1]
    errors = (rise.var() + bias.var()).sqrt() / math.sqrt(len(x))
    assert rise.mean() > 10 * errors  # the check has something to detect
    assert abs(rise.mean() - bias.mean()) < 4 * errors + 0.15 * bias.mean(), (rise.mean(), bias.mean(), errors)


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
    for name, value in (("num_samples", 5.0), ("chunk_size", 2.0)):  # 5.0 passed the check, then range() raised
        with pytest.raises(ValueError, match=f"{name} must be a positive integer, got {value}"):
            log_likelihood(model("mvae"), x, **{name: value})
    both = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="condition and targets must be disjoint"):
        log_likelihood(model("mvae"), x, condition=both, targets=torch.tensor([[True] * 5, [False] * 5]))
    first = torch.tensor([[True] * 5, [False] * 5])
    none = torch.zeros(2, 5, dtype=torch.bool)
    # no observed modality looked like a diverged model (a non-finite estimate); no target gave log p = 0
    with pytest.raises(ValueError, match=r"condition must mark at least one modality of every sample; samples "
                                         r"\[0, 1, 2, 3, 4\] have none"):
        log_likelihood(model("mvae"), x, condition=none, targets=~first)
    with pytest.raises(ValueError, match="targets must mark at least one modality of every sample"):
        log_likelihood(model("mvae"), x, condition=first, targets=none)
    with pytest.raises(ValueError, match=r"condition must be a boolean tensor of shape \(2, 5\)"):
        log_likelihood(model("mvae"), x, condition=first.float(), targets=~first)
    assert math.isfinite(float(log_likelihood(model("mvae"), x, num_samples=1).sum()))


# modality-specific latents: each modality has 6 "pixels", the first 4 driven by the shared z (W), the last 2 by
# its own w_m (V_m); the generative model is linear-Gaussian, so log p(X) is known exactly
V = [torch.tensor([3.0, 1.5], dtype=torch.float64), torch.tensor([-2.0, 2.5], dtype=torch.float64)]
C = [torch.tensor([0.2, -0.4], dtype=torch.float64), torch.tensor([1.0, 0.3], dtype=torch.float64)]


class PrivateFactor(nn.Module):
    """Shared part: modality m's likelihood factor in z with twice its precision (modality 0 also takes the
    prior's), so that the geometric mean of the two (``holder`` at alpha = 0) is the exact p(z | X); private part:
    the exact p(w_m | x_m) (standard deviation 0.15), its mean moved by ``shift`` / 8."""

    def __init__(self, m, shift=0.0):
        super().__init__()
        self.m, self.shift = m, shift

    def forward(self, x):
        x = x.reshape(x.shape[0], 6)
        gram = (W[self.m] ** 2).sum(0)
        precision = gram / SIGMA**2 + (1.0 if self.m == 0 else 0.0)
        mean = (x[:, :4] - B[self.m]) @ W[self.m] / SIGMA**2 / precision
        w_precision = 1 + (V[self.m] ** 2).sum() / SIGMA**2
        w_mean = (x[:, 4:] - C[self.m]) @ V[self.m] / SIGMA**2 / w_precision
        mu = torch.cat([mean, (w_mean + self.shift / 8).unsqueeze(-1)], -1)
        logvar = torch.cat([(-torch.log(2 * precision)).expand_as(mean),
                            (-torch.log(w_precision)).expand(x.shape[0], 1)], -1)
        return mu, logvar


class PrivateDecoder(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, u):  # u = [z (2), w (1)]
        shared = u[..., :2] @ W[self.m].T + B[self.m]
        own = u[..., 2:] * V[self.m] + C[self.m]
        return torch.cat([shared, own], -1).reshape(u.shape[:-1] + (1, 1, 6))


def private_model(name, shift=0.0, **kwargs):
    return MultimodalVAE(nn.ModuleList([PrivateFactor(0, shift), PrivateFactor(1, -shift)]),
                         nn.ModuleList([PrivateDecoder(0), PrivateDecoder(1)]), name, likelihood="normal",
                         likelihood_scale=SIGMA, private_dim=1, **kwargs)


def private_data(n=5):
    g = torch.Generator().manual_seed(4)
    z, w = torch.randn(n, 2, generator=g), torch.randn(2, n, 1, generator=g)
    x = [torch.cat([z @ W[m].T + B[m], w[m] * V[m] + C[m]], -1) + SIGMA * torch.randn(n, 6, generator=g)
         for m in range(2)]
    return torch.stack(x, 1).reshape(n, 2, 1, 1, 6)


def exact_private_joint(x):
    shared = torch.zeros(12, 2, dtype=torch.float64)
    own = torch.zeros(12, 2, dtype=torch.float64)
    for m in range(2):
        shared[6 * m:6 * m + 4] = W[m]
        own[6 * m + 4:6 * m + 6, m] = V[m]
    mean = torch.cat([torch.cat([B[m], C[m]]) for m in range(2)])
    covariance = shared @ shared.T + own @ own.T + SIGMA**2 * torch.eye(12, dtype=torch.float64)
    return torch.distributions.MultivariateNormal(mean, covariance).log_prob(x.reshape(x.shape[0], 12))


def test_modality_specific_latents_are_sampled_from_their_posteriors():
    """With the exact posteriors of z and of every w_m, each importance weight is p(X) exactly (drawing w_m from
    its prior, the estimate was neither exact nor, at K = 3, close); with shifted ones the estimate converges."""
    x = private_data()
    exact = exact_private_joint(x)
    estimate = log_likelihood(private_model("holder", alpha=0.0), x, num_samples=3,
                              generator=torch.Generator().manual_seed(5))
    assert torch.allclose(estimate, exact, rtol=0, atol=1e-9), (estimate, exact)
    for name, kwargs in (("mmvaeplus", {}), ("holderplusplus", {"latent_dim": 2})):
        model = private_model(name, shift=0.4, **kwargs)
        if model.top_down is not None:  # a proposal q(w_m | x_m, z) that depends on z
            torch.manual_seed(6)
            for layer in model.top_down:
                nn.init.normal_(layer.net[-1].weight, std=0.02)
            model.double()
        many = log_likelihood(model, x, num_samples=40_000, chunk_size=10_000,
                              generator=torch.Generator().manual_seed(7))
        assert torch.allclose(many, exact, atol=0.05), (name, many, exact)


class Tuples:
    """The evaluation's view of a dataset: ``len`` and ``gather`` of a stacked ``(N, M, ...)`` tensor."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return self.x.shape[0]

    def gather(self, index):
        return list(self.x[index].unbind(1))


def test_one_tuple_reports_no_standard_error_rather_than_nan():
    """``eval.likelihood_examples=1``: the spread over tuples does not exist (it was NaN in metrics.json, not valid
    strict JSON, and "± nan" in the report); with two tuples it is their sample standard error."""
    import json
    import types

    from applications.multimodal_vae.evaluation import _likelihoods, format_std_error

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 1, 1, 4, generator=g)
    settings = types.SimpleNamespace(seed=0, likelihood_samples=12)
    one = _likelihoods(model("helvae", 0.3), Tuples(x[:1]), settings)
    assert one["joint_std_error"] is None and format_std_error(one) == "n/a"
    json.dumps(one, allow_nan=False)
    two = _likelihoods(model("helvae", 0.3), Tuples(x), settings)["joint_std_error"]
    assert math.isfinite(two) and two > 0


def test_the_evaluation_reports_the_rise_from_half_the_draws():
    """metrics.json's ``bias_check`` and the report's sentence: the rise from K // 2 to K draws (scaled by
    (K // 2) / (K - K // 2) for odd K, where the step in 1/K is not 1/K), none for K = 1."""
    import types

    from applications.multimodal_vae.evaluation import _likelihoods, describe_bias

    x, shifted = Tuples(data(100)), model("helvae", 1.0)  # a poor proposal: a rise well above its noise
    for k in (12, 5):
        result = _likelihoods(shifted, x, types.SimpleNamespace(seed=0, likelihood_samples=k))
        nested = nested_log_likelihoods(shifted, x.x, (k // 2, k),
                                        generator=torch.Generator().manual_seed(0))
        check = result["bias_check"]
        assert check["from_samples"] == k // 2 and result["joint"] == pytest.approx(float(nested[1].mean()), abs=1e-9)
        assert check["rise"] == pytest.approx(float((nested[1] - nested[0]).mean()), abs=1e-9) and check["rise"] > 0
        assert check["bias_at_k"] == pytest.approx(check["rise"] * (k // 2) / (k - k // 2), rel=1e-12)
        assert check["rise_std_error"] == pytest.approx(float((nested[1] - nested[0]).std()) / math.sqrt(100), rel=1e-9)
        assert f"from the first {k // 2} of the same draws it is {check['rise']:.1f} ± " in describe_bias(result)
        assert "the bound lies about" in describe_bias(result)
    one = _likelihoods(model("helvae", 0.3), x, types.SimpleNamespace(seed=0, likelihood_samples=1))
    assert "bias_check" not in one and describe_bias(one) == ""
    # the estimate is a lower bound in expectation: a rise within two standard errors of zero is noise
    for rise, error, words in ((-0.3, 0.6, "within two standard errors of zero"), (1.1, 0.6, "within two"),
                               (2.0, None, "from one tuple")):
        noisy = {"num_samples": 3, "bias_check": {"from_samples": 1, "rise": rise, "rise_std_error": error,
                                                  "bias_at_k": rise / 2}}
        assert words in describe_bias(noisy) and "no bias of the bound is detectable at K = 3" in describe_bias(noisy)
        assert "lies about" not in describe_bias(noisy)


def laplace_prior_log_marginal(x, loadings, offsets):
    """``log p(x)`` for pixels ``x = A u + c + N(0, SIGMA^2)`` with ``u ~ Laplace(0, 1)`` per coordinate, where
    every row of the loadings ``A`` has one non-zero entry, so that the integral is one per coordinate of ``u``:
    scipy's ``quad`` of each, about its peak, in float64. ``x`` ``(n, P)``, ``A`` ``(P, L)``, ``c`` ``(P,)``."""
    x, loadings, offsets = x.numpy(), loadings.numpy(), offsets.numpy()
    assert ((loadings != 0).sum(1) == 1).all()
    out = np.zeros(x.shape[0])
    for i, row in enumerate(x):
        for a in loadings.T:
            on = a != 0

            def log_integrand(u, a=a[on], c=offsets[on], pixels=row[on]):
                return -math.log(2) - abs(u) + stats.norm.logpdf(pixels, a * u + c, SIGMA).sum()

            peak = ((row[on] - offsets[on]) @ a[on]) / (a[on] @ a[on])
            top = max(log_integrand(peak), log_integrand(0.0))
            value, error = integrate.quad(lambda u, top=top: math.exp(log_integrand(u) - top), -40, 40,
                                          points=[0.0, peak], limit=200, epsabs=0, epsrel=1e-12)
            assert error < 1e-9 * value
            out[i] += top + math.log(value)
    return torch.from_numpy(out)


@pytest.mark.parametrize("name", ["mmvae", "mmvaeplus"])
def test_laplace_latents_converge_to_the_marginal_likelihood_under_their_laplace_prior(name):
    """MMVAE's and MMVAE+'s Laplace latents: the importance weights use the prior Laplace(0, 1) and the Laplace
    posteriors (shared mixture, private draws), so the estimate converges to the marginal likelihood under that
    prior, computed by quadrature, which differs from the normal prior's by more than five times the tolerance."""
    if name == "mmvae":
        x = data()
        loadings, offsets = torch.cat(W), torch.cat(B)
        laplace, normal = model(name, shift=0.3, latent_family="laplace"), exact_joint(x)
    else:
        x = private_data()
        loadings = torch.zeros(12, 4, dtype=torch.float64)
        for m in range(2):
            loadings[6 * m:6 * m + 4, :2] = W[m]
            loadings[6 * m + 4:6 * m + 6, 2 + m] = V[m]
        offsets = torch.cat([torch.cat([B[m], C[m]]) for m in range(2)])
        laplace, normal = private_model(name, shift=0.4, latent_family="laplace"), exact_private_joint(x)
    exact = laplace_prior_log_marginal(x.reshape(x.shape[0], -1), loadings, offsets)
    assert (exact - normal).abs().max() > 0.25  # five times the tolerance below
    many = log_likelihood(laplace, x, num_samples=40_000, chunk_size=10_000,
                          generator=torch.Generator().manual_seed(8))
    assert torch.allclose(many, exact, atol=0.05), (many, exact)
