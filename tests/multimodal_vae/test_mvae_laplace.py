"""Laplace latents (``latent_family="laplace"``): MMVAE's and MMVAE+'s posteriors, prior and auxiliary
distributions as their code has them, checked against ``torch.distributions.Laplace`` written out independently."""

import itertools
import math

import pytest
import torch
from scipy import integrate

import opinionpool.functional as opf
from applications.multimodal_vae.config import load_config
from applications.multimodal_vae.data import polymnist_modalities
from applications.multimodal_vae.evaluation.diagnostics import pooling_diagnostics
from applications.multimodal_vae.models import MODELS, MultimodalVAE, check_options
from applications.multimodal_vae.networks import make_networks

Laplace = torch.distributions.Laplace
SHARED, PRIVATE = 8, 3


def make(name="mmvaeplus", **kwargs):
    torch.manual_seed(0)
    private = PRIVATE if MODELS[name].private else 0
    encoders, decoders = make_networks(polymnist_modalities(3), SHARED + private)
    return MultimodalVAE(encoders, decoders, name, beta=2.5, private_dim=private, latent_family="laplace",
                         posterior_scale="softmax", **kwargs)


def softmax_scales(model, x):
    """The MMVAE+ code's Laplace scales ``softmax(out) * n + 1e-6`` of the shared and private parts, and the
    locations, straight from the encoders."""
    outputs = [model.encoders[m](x[:, m]) for m in range(x.shape[1])]
    loc, out = torch.stack([o[0] for o in outputs]), torch.stack([o[1] for o in outputs])
    shared = torch.softmax(out[..., :SHARED], -1) * SHARED + 1e-6
    if out.shape[-1] == SHARED:
        return loc, shared
    return loc, torch.cat([shared, torch.softmax(out[..., SHARED:], -1) * PRIVATE + 1e-6], -1)


@pytest.mark.parametrize("name", ["mmvae", "mmvaeplus"])
def test_the_iwae_bound_with_laplace_latents_against_an_independent_computation(name):
    """K = 3 draws per present modality from Laplace posteriors of the code's softmax scales; the shared latent
    scored by the mixture of the present unimodal Laplaces, the private one by its own, the prior Laplace(0, 1)
    and the other modalities decoded with draws of the auxiliary Laplace(0, softmax(logits) * n); in float64."""
    x = torch.rand(6, 3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    present = torch.ones(3, 6, dtype=torch.bool)
    present[0, :2] = False
    present[2, 5] = False
    model = make(name, num_samples=3, estimator="iwae").double()
    private = model.private_dim > 0
    extra = {}
    if private:
        with torch.no_grad():
            model.auxiliary_logits.copy_(torch.linspace(-0.5, 0.4, 9).reshape(3, 3))
        extra["auxiliary_scale"] = model.auxiliary_scale()
    torch.manual_seed(11)
    terms = model.objective(list(x.unbind(1)), present, *model._encode(x), model.decoders, model.likelihood,
                            model.aggregate, **extra)

    loc, scale = softmax_scales(model, x)
    count = present.sum(0).double()
    expected = torch.zeros(6)
    torch.manual_seed(11)
    for m in range(3):
        u = Laplace(loc[m], scale[m]).rsample((3,))  # (K, B, D)
        z, w = u[..., :SHARED], u[..., SHARED:]
        log_q = torch.stack([Laplace(loc[j, :, :SHARED], scale[j, :, :SHARED]).log_prob(z).sum(-1)
                             for j in range(3)])
        log_q = torch.logsumexp(torch.where(present[:, None, :], log_q, -torch.inf), 0) - count.log()
        if private:
            log_q = log_q + Laplace(loc[m, :, SHARED:], scale[m, :, SHARED:]).log_prob(w).sum(-1)
        log_p = Laplace(0.0, 1.0).log_prob(u).sum(-1)
        log_lik = 0
        for d in range(3):
            if private:
                logits = model.auxiliary_logits[d]
                auxiliary = Laplace(torch.zeros_like(w), PRIVATE * logits.exp() / logits.exp().sum())
                out = model.decoders[d].decoder(torch.cat([z, w if d == m else auxiliary.rsample()], -1))
            else:
                out = model.decoders[d](z)
            term = Laplace(out, 0.75).log_prob(x[:, d]).flatten(-3).sum(-1)
            log_lik = log_lik + torch.where(present[d], term, 0)
        log_w = log_lik + 2.5 * (log_p - log_q)
        expected += present[m] * (torch.logsumexp(log_w, 0) - torch.log(torch.tensor(3.0))) / count
    torch.testing.assert_close(terms.objective, expected, rtol=1e-12, atol=1e-9)


def test_generation_draws_private_latents_from_the_laplace_prior_and_posterior():
    """Unconditional: ``w ~ Laplace(0, 1)``; a reconstruction: ``w`` from its Laplace posterior (the prior draw is
    made first and discarded, as ``decode`` draws it for every sample)."""
    model = make().double()
    x = torch.rand(4, 3, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    z = torch.randn(4, SHARED)
    torch.manual_seed(3)
    generated = model.decode(z, 1)
    torch.manual_seed(3)
    w = Laplace(torch.zeros(4, PRIVATE), 1.0).rsample()
    torch.testing.assert_close(generated, model.decoders[1].decoder(torch.cat([z, w], -1)), rtol=1e-12, atol=0)

    _, _, private = model.encode_with_private(x)
    given = torch.ones(3, 4, dtype=torch.bool)
    torch.manual_seed(3)
    reconstructed = model.decode(z, 1, given, private)
    loc, scale = softmax_scales(model, x)
    torch.manual_seed(3)
    Laplace(torch.zeros(4, PRIVATE), 1.0).rsample()
    w = Laplace(loc[1, :, SHARED:], scale[1, :, SHARED:]).rsample()
    torch.testing.assert_close(reconstructed, model.decoders[1].decoder(torch.cat([z, w], -1)), rtol=1e-12,
                               atol=1e-12)
    # the decoder on its own (z alone) draws from the same prior
    torch.manual_seed(3)
    torch.testing.assert_close(model.decoders[1](z), generated, rtol=1e-12, atol=0)


def test_laplace_latents_go_only_with_the_models_that_sample_their_posteriors():
    check_options("mmvae", latent_family="laplace")
    check_options("mmvaeplus", private_dim=2, latent_family="laplace")
    for name in ("helvae", "mopoe", "holderplus", "mmvm", "mvae"):
        with pytest.raises(ValueError, match=rf"latent_family='laplace' goes with the models \('mmvae', "
                                             rf"'mmvaeplus'\) .*model='{name}'"):
            check_options(name, private_dim=2 if MODELS[name].private else 0, latent_family="laplace")
    with pytest.raises(ValueError, match=r"latent_family must be one of \('normal', 'laplace'\), got 'cauchy'"):
        check_options("mmvae", latent_family="cauchy")
    with pytest.raises(ValueError, match=r"invalid model options: latent_family='laplace' goes with .*'helvae'"):
        load_config("polymnist-helvae-cpu", ["model.latent_family=laplace"])


def test_pooling_diagnostics_read_laplace_posteriors_as_laplace():
    """Three Laplace experts (latent 1, a batch of 2) of unequal scales: the mean log Bhattacharyya coefficient and
    the Hellinger pool's pairwise mass by quadrature of the Laplace densities, not those of Gaussians of the same
    moments (which differ by more than the tolerance)."""
    model = make("mmvae")
    loc = [[-1.0, 0.0], [0.4, 2.0], [3.0, 0.1]]
    logvar = [[math.log(0.5), 0.0], [math.log(2.0), 1.0], [math.log(0.1), -0.5]]
    model.encode = lambda x: (torch.tensor(loc).unsqueeze(-1), torch.tensor(logvar).unsqueeze(-1))

    def density(z, m, v):
        b = math.sqrt(math.exp(v) / 2)
        return math.exp(-abs(z - m) / b) / (2 * b)

    def integral(f, points):
        return integrate.quad(f, -60, 60, points=sorted(points), limit=400, epsabs=1e-14, epsrel=1e-12)[0]

    log_bc, mass = [], []
    for b in range(2):
        experts = [(loc[j][b], logvar[j][b]) for j in range(3)]
        points = [m for m, _ in experts]
        log_bc += [math.log(integral(lambda z, p=p, q=q: math.sqrt(density(z, *p) * density(z, *q)), points))
                   for p, q in itertools.combinations(experts, 2)]
        total = integral(lambda z, experts=experts: sum(density(z, *e) ** 0.5 / 3 for e in experts) ** 2, points)
        mass.append(1 - 3 / 9 / total)
    result = pooling_diagnostics(model, torch.zeros(2, 3, 3, 28, 28))
    assert result["mean_log_bhattacharyya"] == pytest.approx(sum(log_bc) / 6, rel=1e-6)
    assert result["pairwise_mass"] == pytest.approx(sum(mass) / 2, rel=1e-6)
    assert result["own_cross_mass"] is None
    # the same experts read as Gaussians of the same moments (the diagnostics before) give another mass
    as_gaussians = opf.hellinger_pairwise_mass(torch.tensor(loc, dtype=torch.float64).unsqueeze(-1),
                                               torch.tensor(logvar, dtype=torch.float64).unsqueeze(-1))
    assert float(as_gaussians.mean()) != pytest.approx(result["pairwise_mass"], rel=1e-3)
