"""Likelihoods and the ELBO variants of the multimodal VAEs.

Every objective returns per-sample terms; the pooling itself always comes from ``opinionpool.functional``
(passed in as ``aggregate`` functions), never from a copy here. Conventions: images have a Laplace likelihood
with fixed scale 0.75 on the raw decoder output (as in the MoPoE and HELVAE code); ``beta`` weights the KL (or,
for MMVAE, the ``log p(z) - log q(z|X)`` part); modalities are weighted by relative dimensionality.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from opinionpool.functional import subset_mixture

LAPLACE_SCALE = 0.75
_LOG_2PI = math.log(2 * math.pi)


class Terms(NamedTuple):
    """Per-sample ``reconstruction`` (weighted log-likelihood of the present modalities) and ``kl``; the loss to
    minimise is ``-(reconstruction - beta * kl)`` averaged over the batch."""

    reconstruction: torch.Tensor
    kl: torch.Tensor


def laplace_log_likelihood(x: torch.Tensor, loc: torch.Tensor, scale: float = LAPLACE_SCALE) -> torch.Tensor:
    """``log Laplace(x; loc, scale)`` summed over the three image axes."""
    return (-(x - loc).abs() / scale - math.log(2 * scale)).flatten(-3).sum(-1)


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))`` summed over the latent axis."""
    return 0.5 * (mu * mu + torch.exp(logvar) - 1 - logvar).sum(-1)


def normal_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((z - mu) ** 2 * torch.exp(-logvar) + logvar + _LOG_2PI).sum(-1)


def reparameterise(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def reconstruction(x: torch.Tensor, present: torch.Tensor, z: torch.Tensor, decoders, weights) -> torch.Tensor:
    """``sum_m w_m [m present] log p(x_m | z)`` per sample; ``x`` ``(M, B, ...)``, ``present`` ``(M, B)``."""
    total = torch.zeros(z.shape[:-1], dtype=torch.float32, device=z.device)
    for m, decoder in enumerate(decoders):
        log_lik = laplace_log_likelihood(x[m], decoder(z).float())
        total = total + weights[m] * torch.where(present[m], log_lik, torch.zeros_like(log_lik))
    return total


def joint_elbo(x, present, mu, logvar, decoders, weights, aggregate) -> Terms:
    """HELVAE and the moment-matched Hölder VAEs: one ELBO with the aggregated Gaussian posterior."""
    joint_mu, joint_logvar = aggregate(mu, logvar, mask=present)
    z = reparameterise(joint_mu, joint_logvar)
    return Terms(reconstruction(x, present, z, decoders, weights), kl_to_standard_normal(joint_mu, joint_logvar))


def mvae_elbo(x, present, mu, logvar, decoders, weights, aggregate) -> Terms:
    """MVAE: the joint ELBO of the product with a prior expert plus, for each present modality, the ELBO of its
    own posterior (times the prior) reconstructing that modality alone."""
    terms = joint_elbo(x, present, mu, logvar, decoders, weights, aggregate)
    rec, kl = terms.reconstruction, terms.kl
    for m in range(mu.shape[0]):
        only = torch.zeros_like(present)
        only[m] = present[m]
        uni_mu, uni_logvar = aggregate(mu, logvar, mask=only)
        z = reparameterise(uni_mu, uni_logvar)
        rec = rec + reconstruction(x, only, z, decoders, weights)
        kl = kl + torch.where(present[m], kl_to_standard_normal(uni_mu, uni_logvar), torch.zeros_like(kl))
    return Terms(rec, kl)


def subset_mixture_elbo(x, present, mu, logvar, decoders, weights, aggregate, prior_on_full_subset=False) -> Terms:
    """MoPoE, MoHELVAE, MWB-VAE: the uniform mixture over modality subsets of ``aggregate``. Stratified as in
    MoPoE: the batch is cut into contiguous chunks, one subset per chunk (a sample whose subset has no present
    modality draws from its non-empty subsets instead); the KL is the average of the subset KLs.
    ``prior_on_full_subset``: a standard-normal expert joins the subset of all modalities (MoPoE)."""
    mixture = subset_mixture(aggregate, mu, logvar, dim=0, mask=present, prior_on_full_subset=prior_on_full_subset,
                             validate_args=False)
    batch, num_subsets = mixture.log_weights.shape
    chosen = torch.arange(batch, device=mu.device) * num_subsets // batch
    valid = torch.isfinite(mixture.log_weights)
    fallback = torch.distributions.Categorical(logits=mixture.log_weights).sample()
    chosen = torch.where(valid.gather(1, chosen[:, None])[:, 0], chosen, fallback)
    rows = torch.arange(batch, device=mu.device)
    z = reparameterise(mixture.loc[rows, chosen], mixture.logvar[rows, chosen])
    subset_kl = kl_to_standard_normal(mixture.loc, mixture.logvar)  # (B, K)
    kl = (mixture.log_weights.exp() * torch.where(valid, subset_kl, torch.zeros_like(subset_kl))).sum(-1)
    return Terms(reconstruction(x, present, z, decoders, weights), kl)


def mmvae_elbo(x, present, mu, logvar, decoders, weights, aggregate) -> Terms:
    """MMVAE (stratified, one sample per modality): for every present modality ``m``, ``z ~ q_m`` reconstructs all
    present modalities, and ``kl`` is the single-sample estimate of ``log q(z|X) - log p(z)`` with ``q(z|X)`` the
    mixture of the present unimodal posteriors (``aggregate`` = ``opinionpool.functional.moe``); averaged over m."""
    mixture = aggregate(mu, logvar, mask=present)  # components: the unimodal posteriors, uniform over present
    count = present.sum(0).clamp_min(1).float()
    rec = torch.zeros(mu.shape[1], device=mu.device)
    kl = torch.zeros(mu.shape[1], device=mu.device)
    for m in range(mu.shape[0]):
        z = reparameterise(mu[m], logvar[m])
        log_q = torch.logsumexp(mixture.log_weights + normal_log_prob(z.unsqueeze(-2), mixture.loc, mixture.logvar),
                                dim=-1)
        log_p = normal_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
        here = present[m].float()
        rec = rec + here * reconstruction(x, present, z, decoders, weights) / count
        kl = kl + here * (log_q - log_p) / count
    return Terms(rec, kl)
