"""MMVM (and MMVM with a Hölder prior), WB-VAE and the modality-specific latents of the pooled models: each
objective against an independent float64 computation on a tiny linear model, generation with private latents,
the probe on private latents, and every model from the command line (two steps, exact resume, evaluation)."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from scipy import integrate
from tiny_runs import losses
from torch import nn
from torch.distributions import kl_divergence

from applications.multimodal_vae import objectives
from applications.multimodal_vae.__main__ import main
from applications.multimodal_vae.config import load_config
from applications.multimodal_vae.data import MultimodalDataset, polymnist_modalities
from applications.multimodal_vae.evaluation import private_latent_probe
from applications.multimodal_vae.models import MultimodalVAE, PrivateLatent
from applications.multimodal_vae.train import make_model

M, B, D, P = 3, 7, 2, 2  # modalities, batch, shared latent, private latent
SCALE = 0.75
WEIGHTS = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)  # per-modality likelihood weights


class LinearEncoder(nn.Module):
    """``(B, 1, 2, 2)`` -> ``(mu, logvar)``: one linear map of the four pixels."""

    def __init__(self, out: int, generator):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2 * out, 4, generator=generator, dtype=torch.float64) * 0.7)
        self.bias = nn.Parameter(torch.randn(2 * out, generator=generator, dtype=torch.float64) * 0.3)

    def forward(self, x):
        h = x.flatten(1) @ self.weight.T + self.bias
        return h.chunk(2, -1)


class LinearDecoder(nn.Module):
    """``(..., d)`` -> ``(..., 1, 2, 2)``."""

    def __init__(self, latent: int, generator):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, latent, generator=generator, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(4, generator=generator, dtype=torch.float64) * 0.1)

    def forward(self, z):
        return (z @ self.weight.T + self.bias).unflatten(-1, (1, 2, 2))


def linear_model(name, private_dim=0, **kwargs):
    g = torch.Generator().manual_seed(4)
    encoders = nn.ModuleList(LinearEncoder(D + private_dim, g) for _ in range(M))
    decoders = nn.ModuleList(LinearDecoder(D + private_dim, g) for _ in range(M))
    return MultimodalVAE(encoders, decoders, name, beta=2.0, private_dim=private_dim, **kwargs).double()


def inputs():
    g = torch.Generator().manual_seed(2)
    x = [torch.rand(B, 1, 2, 2, generator=g, dtype=torch.float64) for _ in range(M)]
    present = torch.ones(M, B, dtype=torch.bool)
    present[2, 1] = False       # sample 1: {0, 1}
    present[[0, 1], 2] = False  # sample 2: {2} alone
    present[0, 4] = False       # sample 4: {1, 2}
    present[2, 6] = False       # sample 6: {0, 1}
    return x, present


def terms_of(model, x, present, seed=9):
    likelihood = objectives.Likelihood(WEIGHTS)
    mu, logvar = model._encode(x)
    extra = {"auxiliary_scale": model.auxiliary_scale()} if model.auxiliary_logits is not None else {}
    if model.private_kl_weights is not None:
        extra["private_kl_weights"] = model.private_kl_weights
    torch.manual_seed(seed)
    return model.objective(x, present, mu, logvar, model.decoders, likelihood, model.pooling, **extra)


def laplace(x, loc):
    """log Laplace(x; loc, 0.75) summed over a modality, by hand."""
    return (-(x - loc).abs() / SCALE - math.log(2 * SCALE)).flatten(-3).sum(-1)


def normal_log_pdf(z, mu, sd):
    return (-0.5 * ((z - mu) / sd) ** 2 - torch.log(sd) - 0.5 * math.log(2 * math.pi)).sum(-1)


def kl_standard(mu, sd):
    return 0.5 * (mu**2 + sd**2 - 1 - torch.log(sd**2)).sum(-1)


def unimodal(model, x):
    stats_ = [encoder(x_m) for encoder, x_m in zip(model.encoders, x)]
    return torch.stack([s[0] for s in stats_]), torch.stack([s[1] for s in stats_])


def gaussian_pdf(z, mu, sd):
    return np.exp(-0.5 * ((z - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))


def bhattacharyya(mu1, sd1, mu2, sd2):
    """∫ sqrt(q1 q2) of two diagonal Gaussians (torch tensors, last axis the latent): per axis
    sqrt(2 s t / (s² + t²)) exp(-(a - b)² / (4 (s² + t²)))."""
    var = sd1**2 + sd2**2
    return torch.prod(torch.sqrt(2 * sd1 * sd2 / var) * torch.exp(-(mu1 - mu2) ** 2 / (4 * var)), -1)


def test_the_bhattacharyya_closed_form_by_quadrature():
    mu1, sd1, mu2, sd2 = np.array([0.3, -1.0]), np.array([0.7, 1.4]), np.array([-0.5, 0.2]), np.array([1.1, 0.5])
    by_axis = [integrate.quad(lambda u, i=i: math.sqrt(gaussian_pdf(u, mu1[i], sd1[i]) * gaussian_pdf(u, mu2[i], sd2[i])),
                              -np.inf, np.inf, epsabs=1e-13)[0] for i in range(2)]
    got = bhattacharyya(*(torch.tensor(a) for a in (mu1, sd1, mu2, sd2)))
    assert float(got) == pytest.approx(np.prod(by_axis), rel=1e-9)


def hellinger_prior_log_density(z, mu, sd, weights):
    """log h(z) ``(S,)`` at points ``z`` ``(S, D)`` from the definition of the alpha = 1/2 pool of the experts
    ``mu``, ``sd`` ``(J, D)``: h = (sum_j w_j sqrt(q_j))^2 / Z with Z = sum_jk w_j w_k BC_jk."""
    log_q = torch.distributions.Normal(mu, sd).log_prob(z[:, None]).sum(-1)  # (S, J)
    mass = weights @ bhattacharyya(mu[:, None], sd[:, None], mu[None], sd[None]) @ weights
    return 2 * torch.logsumexp(torch.log(weights) + 0.5 * log_q, -1) - torch.log(mass)


def mmvm_draws(model, x, present):
    """By hand, what an MMVM objective draws under ``terms_of``'s seed: the unimodal posteriors' means and
    standard deviations, one z_m from each (M, B, D), and the reconstruction term sum_m w_m [m present]
    log p(x_m | z_m), each modality decoded from its own z_m."""
    mu, logvar = unimodal(model, x)
    sd = torch.exp(0.5 * logvar)
    torch.manual_seed(9)
    z = mu + sd * torch.randn(M, B, D, dtype=torch.float64)
    return mu, sd, z, sum(present[m] * WEIGHTS[m] * laplace(x[m], model.decoders[m](z[m])) for m in range(M))


def hoelder_prior_components(mu, sd, weights, alpha):
    """The exact Hölder pool (alpha 1, 1/2 or 0) of the diagonal Gaussians ``mu``, ``sd`` (J, D) with normalised
    ``weights`` (J,), written out: ``[(pi_c, mean_c, sd_c)]``. alpha = 1: the experts with their weights.
    alpha = 1/2: (sum_j w_j sqrt(q_j))^2 = sum_j w_j^2 q_j + sum_{j<k} 2 w_j w_k BC_jk N_jk, N_jk the normalised
    sqrt(q_j q_k) (mean precision, precision-weighted mean). alpha = 0: one Gaussian, prod_j q_j^w_j normalised."""
    precision = sd**-2
    if alpha == 1:
        return [(weights[j], mu[j], sd[j]) for j in range(len(mu))]
    if alpha == 0:
        total = (weights[:, None] * precision).sum(0)
        return [(torch.ones((), dtype=mu.dtype), (weights[:, None] * precision * mu).sum(0) / total, total**-0.5)]
    components = [(weights[j] ** 2, mu[j], sd[j]) for j in range(len(mu))]
    for j, k in itertools.combinations(range(len(mu)), 2):
        bc = bhattacharyya(mu[j], sd[j], mu[k], sd[k])
        pair_precision = (precision[j] + precision[k]) / 2
        components.append((2 * weights[j] * weights[k] * bc,
                           (precision[j] * mu[j] + precision[k] * mu[k]) / (2 * pair_precision), pair_precision**-0.5))
    mass = sum(c[0] for c in components)
    return [(pi / mass, mean, sd_c) for pi, mean, sd_c in components]


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_mmvm_holder_bounds_the_kl_over_its_priors_components(alpha):
    """mmvm_holder: per sample, sum over present m of sum_c pi_c KL(q_m || h_c) over the components h_c of the
    Hölder pool of the present posteriors (asymmetric learnt pool weights, renormalised over the present ones),
    the components written out by hand and the KLs from torch.distributions; the same gradients (encoders and pool
    weights); above the exact KL to h (Monte Carlo); at alpha = 0 (h one Gaussian) the exact KL itself."""
    model = linear_model("mmvm_holder", alpha=alpha, learnable_weights=True)
    with torch.no_grad():
        model.pool_logits.copy_(torch.tensor([0.4, -0.9, 0.2]))
    x, present = inputs()
    terms = terms_of(model, x, present)
    (terms.reconstruction - 2.0 * terms.kl).sum().backward()
    got = [e.weight.grad.clone() for e in model.encoders] + [model.pool_logits.grad.clone()]
    model.zero_grad()
    mu, sd, z, rec = mmvm_draws(model, x, present)
    bound = torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        members = [j for j in range(M) if present[j, b]]
        weights = torch.softmax(model.pool_logits[members], 0)
        components = hoelder_prior_components(mu[members, b], sd[members, b], weights, alpha)
        for m in members:
            q = torch.distributions.Normal(mu[m, b], sd[m, b])
            for pi, mean, sd_c in components:
                bound[b] = bound[b] + pi * kl_divergence(q, torch.distributions.Normal(mean, sd_c)).sum()
            if alpha == 0.5 and len(members) > 1:  # the exact KL to h by Monte Carlo, with its error bar: below the bound
                draws = q.sample((20_000,)).detach()
                log_h = hellinger_prior_log_density(draws, mu[members, b], sd[members, b], weights).detach()
                by_components = torch.logsumexp(torch.stack([  # the components written out are that density
                    torch.log(pi) + torch.distributions.Normal(mean, sd_c).log_prob(draws).sum(-1)
                    for pi, mean, sd_c in components]), 0)
                torch.testing.assert_close(by_components.detach(), log_h)
                exact = (q.log_prob(draws).sum(-1) - log_h).detach()
                assert exact.mean() - 4 * exact.std() / math.sqrt(len(draws)) <= bound[b]
                assert exact.mean() + 4 * exact.std() / math.sqrt(len(draws)) < bound[b]  # a bound, not the KL
    torch.testing.assert_close(terms.reconstruction, rec.detach())
    torch.testing.assert_close(terms.kl, bound.detach(), rtol=1e-10, atol=1e-12)
    assert terms.kl[2] == 0 and (terms.kl[present.sum(0) > 1] > 0).all()  # one present modality: no KL
    (rec - 2.0 * bound).sum().backward()
    for mine, theirs in zip(got, [e.weight.grad for e in model.encoders] + [model.pool_logits.grad]):
        torch.testing.assert_close(mine, theirs)
        assert mine.abs().sum() > 0
    if alpha == 1.0:  # with equal weights, the paper's mixture prior: mmvm's bound
        torch.testing.assert_close(terms_of(linear_model("mmvm_holder", alpha=1.0), x, present).kl,
                                   terms_of(linear_model("mmvm"), x, present).kl)


def test_mmvm_trains_with_the_authors_pairwise_kl_bound():
    """mmvm: the reconstruction, and per sample (1/|P|) sum over present m, k of KL(q_m || q_k)
    (torch.distributions' closed form), an upper bound of the exact KL to the mixture h (Monte Carlo)."""
    model = linear_model("mmvm", alpha=0.5)  # mmvm's prior is the paper's mixture, whatever model.alpha says
    x, present = inputs()
    terms = terms_of(model, x, present)
    mu, sd, z, rec = mmvm_draws(model, x, present)
    q = [torch.distributions.Normal(mu[m].detach(), sd[m].detach()) for m in range(M)]
    bound = torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        members = [j for j in range(M) if present[j, b]]
        for m in members:
            for k in members:
                bound[b] += kl_divergence(q[m], q[k])[b].sum() / len(members)
            draws = q[m].sample((20_000,))[:, b]  # the exact KL to h, by Monte Carlo: below the bound
            log_h = torch.logsumexp(torch.stack([q[k].log_prob(draws[:, None].expand(-1, B, -1))[:, b].sum(-1)
                                                 for k in members]), 0) - math.log(len(members))
            exact = (q[m].log_prob(draws[:, None].expand(-1, B, -1))[:, b].sum(-1) - log_h)
            assert exact.mean() - 4 * exact.std() / math.sqrt(len(draws)) <= bound[b] + 1e-12
    torch.testing.assert_close(terms.reconstruction, rec.detach())
    torch.testing.assert_close(terms.kl, bound, rtol=1e-10, atol=1e-12)
    assert terms.kl[2] == 0 and (terms.kl[present.sum(0) > 1] > 0).all()  # one present modality: no KL
    terms.kl.sum().backward()
    assert all(e.weight.grad.abs().sum() > 0 for e in model.encoders)


@pytest.mark.parametrize("name", ["mmvm", "mmvm_holder"])
def test_an_n01_component_of_the_mmvm_prior_weights_the_bound_as_the_authors_code(name):
    """normal_prior_weight a = 0.3: per sample, sum over present m of a KL(q_m || N(0, I)) + (1 - a) times the
    bound without it (torch.distributions' KLs; the bound of the model without the component), the convexity bound
    of KL(q_m || a N(0, I) + (1 - a) h) that the MMVM code's MVMixedPriorVAE minimises; a sample with one present
    modality keeps a KL term now. Out-of-range weights and other models are rejected, naming the option."""
    x, present = inputs()
    weighted = terms_of(linear_model(name, normal_prior_weight=0.3), x, present)
    without = terms_of(linear_model(name), x, present)
    mu, sd, _, rec = mmvm_draws(linear_model(name), x, present)
    standard = torch.distributions.Normal(torch.zeros(()), torch.ones(()))
    to_normal = kl_divergence(torch.distributions.Normal(mu, sd), standard).sum(-1)  # (M, B)
    expected = 0.7 * without.kl + 0.3 * (present * to_normal).sum(0)
    torch.testing.assert_close(weighted.kl, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weighted.reconstruction, rec.detach())
    assert weighted.kl[2] > 0 and without.kl[2] == 0
    numpy_weight = terms_of(linear_model(name, normal_prior_weight=np.float32(0.3)), x, present)  # any real number
    torch.testing.assert_close(numpy_weight.kl, weighted.kl, rtol=1e-7, atol=0)
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match=r"normal_prior_weight must be a number in \[0, 1\], got"):
            linear_model(name, normal_prior_weight=bad)
    with pytest.raises(ValueError, match="normal_prior_weight .* goes with the models .*'mmvm'.*model='mmvae'"):
        linear_model("mmvae", normal_prior_weight=0.3)
    # the configuration's option reaches the model a run trains
    config = load_config(f"polymnist-{name.replace('_', '-')}-cpu", ["model.normal_prior_weight=0.3"])
    built = make_model(config, polymnist_modalities(config.data.num_modalities))
    assert built.objective.keywords["normal_prior_weight"] == 0.3


def test_mmvm_generates_from_the_given_modalitys_encoder_and_its_prior_is_opinionpools():
    model = linear_model("mmvm_holder", alpha=0.5)
    x, present = inputs()
    mu, logvar = model.encode(x)
    alone = torch.zeros(M, B, dtype=torch.bool)
    alone[1] = True
    mixture = model.posterior_mixture(x, alone)
    weights = mixture.log_weights.exp()
    assert torch.allclose(weights.sum(-1), torch.ones(B, dtype=torch.float64))
    assert torch.allclose(weights[:, 1], torch.ones(B, dtype=torch.float64))  # encoder 1 alone
    torch.testing.assert_close(mixture.loc[:, 1], mu[1])
    torch.testing.assert_close(mixture.logvar[:, 1], logvar[1])


@pytest.mark.parametrize("learnable", [False, True])
def test_wbvae_elbo_and_weight_gradient_against_an_independent_computation(learnable):
    model = linear_model("wbvae", learnable_weights=learnable)
    if learnable:
        with torch.no_grad():
            model.pool_logits.copy_(torch.tensor([0.3, -0.8, 0.5]))
    x, present = inputs()
    terms = terms_of(model, x, present)
    (terms.reconstruction - 2.0 * terms.kl).sum().backward()
    got = model.pool_logits.grad.clone() if learnable else None
    logits = model.pool_logits if learnable else torch.zeros(M, dtype=torch.float64)
    mu, logvar = unimodal(model, x)
    sd = torch.exp(0.5 * logvar)
    # barycentric weights renormalised over the present modalities; mean sum w mu, standard deviation sum w sd
    w = torch.exp(logits)[:, None] * present
    w = w / w.sum(0)
    joint_mu, joint_sd = (w[..., None] * mu).sum(0), (w[..., None] * sd).sum(0)
    torch.manual_seed(9)
    z = joint_mu + joint_sd * torch.randn(B, D, dtype=torch.float64)
    rec = sum(present[m] * WEIGHTS[m] * laplace(x[m], model.decoders[m](z)) for m in range(M))
    kl = kl_standard(joint_mu, joint_sd)
    torch.testing.assert_close(terms.reconstruction, rec)
    torch.testing.assert_close(terms.kl, kl)
    if learnable:
        model.zero_grad()
        (rec - 2.0 * kl).sum().backward()
        torch.testing.assert_close(got, model.pool_logits.grad)
        assert got.abs().sum() > 0


#: MoPoE's style_weights: one weight per modality of its private latent's KL (None: all 1)
PRIVATE_KL_WEIGHTS = [None, (0.5, 2.0, 0.0)]


def _private_kl_weight(weights, n):
    return 1.0 if weights is None else weights[n]


@pytest.mark.parametrize("private_kl_weights", PRIVATE_KL_WEIGHTS)
def test_joint_elbo_with_private_latents_against_an_independent_computation(private_kl_weights):
    """WB-VAE with modality-specific latents: z after aggregation, each present modality decoded with its own
    posterior's w (no r_n ever), and their KLs added, each times its weight."""
    model = linear_model("wbvae", private_dim=P, private_kl_weights=private_kl_weights)
    assert model.auxiliary_logits is None  # a single Gaussian pool never reconstructs from r_n
    x, present = inputs()
    terms = terms_of(model, x, present)
    mu, logvar = unimodal(model, x)
    sd = torch.exp(0.5 * logvar)
    w = present / present.sum(0)
    joint_mu, joint_sd = (w[..., None] * mu[..., :D]).sum(0), (w[..., None] * sd[..., :D]).sum(0)
    torch.manual_seed(9)
    z = joint_mu + joint_sd * torch.randn(B, D, dtype=torch.float64)
    private = mu[..., D:] + sd[..., D:] * torch.randn(M, B, P, dtype=torch.float64)
    rec = sum(present[m] * WEIGHTS[m] * laplace(x[m], model.decoders[m].decoder(torch.cat([z, private[m]], -1)))
              for m in range(M))
    kl = kl_standard(joint_mu, joint_sd) + sum(_private_kl_weight(private_kl_weights, n) * present[n]
                                               * kl_standard(mu[n, :, D:], sd[n, :, D:]) for n in range(M))
    torch.testing.assert_close(terms.reconstruction, rec.detach())
    torch.testing.assert_close(terms.kl, kl.detach())


@pytest.mark.parametrize("private_kl_weights", PRIVATE_KL_WEIGHTS)
def test_subset_mixture_elbo_with_private_latents_against_an_independent_computation(private_kl_weights):
    """MoPoE with modality-specific latents, as its code has them: z from the sample's subset S (contiguous chunks,
    one subset each); every present modality's w_n from q(w_n | x_n), in S or not; the KL averages the subsets'
    KLs and adds every present modality's private KL in full, times its style weight (calc_style_kld)."""
    model = linear_model("mopoe", private_dim=P, private_kl_weights=private_kl_weights)
    assert model.auxiliary_logits is None  # no r_n: MoPoE decodes every modality with its own posterior's w_n
    x, present = inputs()
    subsets = [s for k in range(1, M + 1) for s in itertools.combinations(range(M), k)]
    chosen = [subsets[b * len(subsets) // B] for b in range(B)]
    # the fixture gives every sample's chunk subset a present modality (no fallback draw decides)
    assert all(any(present[n, b] for n in s) for b, s in enumerate(chosen))
    terms = terms_of(model, x, present)
    mu, logvar = unimodal(model, x)
    sd = torch.exp(0.5 * logvar)

    def poe(s, b):
        """The subset's product of present experts, with a N(0, I) expert in the full subset where every modality
        is present (MoPoE: its code drops the subsets with a missing modality, the full one among them)."""
        members = [n for n in s if present[n, b]]
        precision = sum(1 / sd[n, b, :D] ** 2 for n in members) + (len(members) == M)
        mean = sum(mu[n, b, :D] / sd[n, b, :D] ** 2 for n in members) / precision
        return mean, precision ** -0.5

    torch.manual_seed(9)
    torch.distributions.Categorical(logits=torch.zeros(B, len(subsets))).sample()  # the stratifier's fallback draw
    eps_z = torch.randn(B, D, dtype=torch.float64)
    eps_private = torch.randn(M, B, P, dtype=torch.float64)
    rec, kl = torch.zeros(B, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        mean, std = poe(chosen[b], b)
        z = mean + std * eps_z[b]
        for n in range(M):
            if not present[n, b]:
                continue
            w = mu[n, b, D:] + sd[n, b, D:] * eps_private[n, b]
            loc = model.decoders[n].decoder(torch.cat([z, w]))
            rec[b] += WEIGHTS[n] * laplace(x[n][b:b + 1], loc[None])[0]
        valid = [s for s in subsets if any(present[n, b] for n in s)]
        for s in valid:
            kl[b] += kl_standard(*poe(s, b)) / len(valid)
        kl[b] += sum(_private_kl_weight(private_kl_weights, n) * kl_standard(mu[n, b, D:], sd[n, b, D:])
                     for n in range(M) if present[n, b])
    torch.testing.assert_close(terms.reconstruction, rec.detach())
    torch.testing.assert_close(terms.kl, kl.detach())


def test_forward_passes_the_private_kl_weights_to_the_objective():
    """What ``forward`` reports is the weighted objective's (``terms_of`` calls the objective directly); a model's
    weights are one per modality, and the weights are no part of its state dict (a run's config holds them)."""
    weights = (0.5, 2.0, 0.0)
    model = linear_model("mohelvae", private_dim=P, private_kl_weights=weights)
    x, present = inputs()
    torch.manual_seed(9)
    reported = model(x, present)["kl"]
    torch.testing.assert_close(reported, terms_of(model, x, present).kl.mean())
    unweighted = linear_model("mohelvae", private_dim=P)
    torch.manual_seed(9)
    assert not torch.allclose(unweighted(x, present)["kl"], reported)
    assert "private_kl_weights" not in model.state_dict()
    with pytest.raises(ValueError, match=r"private_kl_weights needs one weight per modality \(3\), got \[1, 2\]"):
        linear_model("mohelvae", private_dim=P, private_kl_weights=[1, 2])


def test_decode_draws_private_latents_from_the_posterior_only_for_given_modalities():
    """Generation as MMVAE+: a given modality's w from its posterior, the others' from N(0, I)."""
    model = linear_model("helvae", private_dim=P)
    model.decoders = nn.ModuleList(PrivateLatent(nn.Identity(), P) for _ in range(M))  # decoder output = (z, w)
    x, _ = inputs()
    mu, logvar = model.private_posterior(x)
    given = torch.zeros(M, B, dtype=torch.bool)
    given[0, :4] = True
    z = torch.zeros(B, D, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    out = model.decode(z, 0, given, (mu, logvar), generator=g)
    g = torch.Generator().manual_seed(1)
    prior = torch.randn(B, P, generator=g, dtype=torch.float64)
    own = mu[0] + torch.exp(0.5 * logvar[0]) * torch.randn(B, P, generator=g, dtype=torch.float64)
    torch.testing.assert_close(out[:, D:], torch.where(given[0, :, None], own, prior))
    means = model.decode(z, 0, given, (mu, logvar), sample=False)
    torch.testing.assert_close(means[:4, D:], mu[0, :4])
    # unconditional (no modality given): every w from the prior, reproducibly
    first = model.decode(z, 1, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, model.decode(z, 1, generator=torch.Generator().manual_seed(3)))


class CodePrivateEncoder(nn.Module):
    """Shared part: the one-hot digit code (times 10); private part: the point of angle 2 pi k / 10 on a circle of
    radius 10, ``k`` read from one background pixel (which carries the digit in one modality only)."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        code = 10 * x[:, 0, 0, :10].float()
        angle = 2 * math.pi * torch.round(x[:, 1, 5, 5].float() * 255 / 25) / 10
        private = 10 * torch.stack([torch.cos(angle), torch.sin(angle)], -1)
        return torch.cat([code, private], -1), torch.full((len(x), 12), -30.0)


@pytest.mark.usefixtures("float32_default")
def test_private_latent_probe_reads_what_the_private_latents_hold():
    g = torch.Generator().manual_seed(0)

    def data(labels):
        images = torch.randint(0, 250, (M, len(labels), 3, 28, 28), dtype=torch.uint8, generator=g)  # noise
        images[:, torch.arange(len(labels)), 0, 0, :10] = 0
        images[:, torch.arange(len(labels)), 0, 0, labels] = 255
        images[2, :, 1, 5, 5] = (labels * 25).to(torch.uint8)  # modality 2's private latent holds the digit
        return MultimodalDataset(polymnist_modalities(M), images.unbind(0), labels, num_classes=10)

    encoders = nn.ModuleList(CodePrivateEncoder() for _ in range(M))
    model = MultimodalVAE(encoders, nn.ModuleList(nn.Identity() for _ in range(M)), "helvae", private_dim=2)
    scores = private_latent_probe(model, data(torch.arange(100) % 10), data(torch.arange(100) % 10), examples=100)
    assert scores[2] == 1.0
    assert scores[0] < 0.3 and scores[1] < 0.3  # noise: near chance (0.1)


# every new model from the command line: two steps, the same two steps after a stop and a resume, an evaluation
CLI_MODELS = {"mmvm": ("polymnist-mmvm-cpu", []), "mmvm-holder": ("polymnist-mmvm-holder-cpu", []),
              "wbvae": ("polymnist-wbvae-cpu", ["model.learnable_weights=true"]),
              "helvae-private": ("polymnist-helvae-cpu", ["model.private_dim=2"]),
              "mopoe-private": ("polymnist-helvae-cpu", ["model.name=mopoe", "model.private_dim=2"]),
              "mmvaeplus-private-laplace": ("polymnist-helvae-cpu", [
                  "model.name=mmvaeplus", "model.private_dim=2", "model.latent_family=laplace",
                  "model.posterior_scale=softmax"])}


@pytest.mark.slow
@pytest.mark.usefixtures("float32_default")
@pytest.mark.parametrize("case", sorted(CLI_MODELS))
def test_new_models_train_resume_exactly_and_evaluate_from_the_command_line(tiny_root, case, capsys):
    preset, extra = CLI_MODELS[case]
    common = ["--set", f"data.root={tiny_root / 'data'}", "data.build_offline=false", "data.num_modalities=3",
              "model.latent_dim=4", "model.hidden=32", "train.batch_size=12", "train.device=cpu",
              "train.evaluate_at_end=false",
              "train.max_minutes=null", "train.tensorboard=false", "train.num_threads=1", "data.drop_rate=0.3",
              f"output_dir={tiny_root / 'runs'}", *extra]
    assert main(["train", "--preset", preset, *common, "train.max_steps=2", "name=full"]) == 0
    assert main(["train", "--preset", preset, *common, "train.max_steps=1", "name=split"]) == 0
    assert main(["train", "--preset", preset, "--resume", *common, "train.max_steps=2", "name=split"]) == 0
    full, split = tiny_root / "runs" / "full", tiny_root / "runs" / "split"
    assert losses(split) == losses(full) and [s for s, _ in losses(full)] == [1, 2]
    assert all(math.isfinite(float(v)) for _, v in losses(full))
    assert main(["evaluate", "--run", str(full), "--set", "eval.subsets=single", "eval.probe_examples=10",
                 "eval.likelihood_samples=2", "eval.likelihood_examples=4", "eval.unconditional_samples=10"]) == 0
    metrics = json.loads((full / "metrics.json").read_text())
    report = (full / "report.md").read_text()
    assert 0 <= metrics["coherence"]["overall"] <= 1 and math.isfinite(metrics["log_likelihood"]["joint"])
    private = "private" in case
    assert ("private_latent_probe" in metrics) == private
    assert ("On each modality's private latent w" in report) == private
    if private:
        assert sorted(metrics["private_latent_probe"]) == ["m0", "m1", "m2"]
    capsys.readouterr()


def test_softmax_posterior_scales_are_the_mmvae_codes():
    """``posterior_scale="softmax"``: the standard deviations of the MMVAE and MMVAE+ code, ``softmax(out) * n +
    1e-6`` over the shared and, separately, the private coordinates (written out here as that code has it); the
    means untouched; "free" leaves the encoders' log-variances as they are; a misspelt option names itself."""
    model = linear_model("mmvaeplus", private_dim=P, posterior_scale="softmax")
    x, _ = inputs()
    mu, logvar = model._encode(x)
    raw_mu, raw = unimodal(model, x)
    shared_sd = torch.softmax(raw[..., :D], -1) * D + 1e-6
    private_sd = torch.softmax(raw[..., D:], -1) * P + 1e-6
    torch.testing.assert_close(torch.exp(0.5 * logvar), torch.cat([shared_sd, private_sd], -1), rtol=1e-12, atol=0)
    torch.testing.assert_close(mu, raw_mu)
    # the mean standard deviation of each part is one (plus the floor): no posterior narrows in every direction
    torch.testing.assert_close(shared_sd.mean(-1), torch.full(shared_sd.shape[:-1], 1 + 1e-6, dtype=torch.float64))
    free = linear_model("mmvaeplus", private_dim=P)
    torch.testing.assert_close(free._encode(x)[1], unimodal(free, x)[1])
    # logits 1e6 apart: the others' softmax underflows, and the log-softmax leaves them the floor's variance
    with torch.no_grad():
        model.encoders[0].weight.mul_(1e7)
        _, logvar = model._encode(x)
    assert torch.isfinite(logvar).all() and float(logvar.min()) == pytest.approx(2 * math.log(1e-6), rel=1e-9)
    with pytest.raises(ValueError, match="posterior_scale must be one of .*'softplus'"):
        linear_model("mmvae", posterior_scale="softplus")
