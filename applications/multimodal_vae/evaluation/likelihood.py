"""Importance-sampled log-likelihoods of a trained multimodal VAE.

Joint: ``log p(X) ~ log (1/K) sum_k p(X | z_k) p(z_k) / q(z_k | X)`` with ``z_k ~ q(z | X)``, the posterior the
evaluation conditions on given every modality (``MultimodalVAE.conditional_posterior``): the model's own joint
posterior, except for the subset-mixture models (MoPoE, MoHELVAE, MWB-VAE), whose proposal is the aggregate of
the full subset (MoPoE's with its prior expert), as MoPoE's code estimates it; their training posterior, the
mixture over every subset, puts most of its mass on components that see fewer modalities and is a far poorer
proposal at small ``K``. Mixture posteriors (MMVAE, the Hölder mixtures) are sampled by component and their density
is the exact mixture density (``opinionpool.functional.GaussianMixture.log_prob``, ``LaplaceMixture``'s for Laplace
latents, scored against their prior ``Laplace(0, 1)``), not a moment-matched Gaussian. Every proposal gives a
stochastic lower bound of ``log p(X)`` in expectation that tightens as ``K`` grows, by an amount that depends on the
proposal (MoPoE used K = 12, MultiVae 1000): compare models at small ``K`` with that in mind (docs/results.md
measures it).

Conditional: ``log p(X_rest | X_S) ~ log (1/K) sum_k p(X_rest | z_k)`` with ``z_k ~ q(z | X_S)``
(``MultimodalVAE.conditional_posterior``), the encoder of the subset standing in for ``p(z | X_S)``: a plug-in
predictive, not importance-sampled and no bound on ``log p(X_rest | X_S)`` (above or below it, as the encoder
differs from the posterior). This is not the figure MoPoE's code reports per subset
(``calc_log_likelihood_batch``): that is ``log p(X)`` of every modality with ``q(z | X_S)`` as the proposal, so the
two are not to be compared.

Models with modality-specific latents (MMVAE+, Hölder+/++, ``model.private_dim > 0``): ``z`` is the shared
latent, and each target modality's ``w_m`` is sampled from its own posterior ``q(w_m | x_m)`` (Hölder++:
``q(w_m | x_m, z)``) with the weight ``p(w_m) / q(w_m | ...)``, one draw per sample of ``z``: an importance-sampled
``p(x_m | z)``, so the joint estimate integrates over every latent the generative model has. Drawing ``w_m`` from
its prior instead is also unbiased, but a poor proposal: at small ``K`` it biased these models' estimates far
below the others'. MMVM has no data-independent prior: its estimate is that of the generative model ``N(0, I)``
times the decoders, with ``h(z | X)`` as the proposal.

The decoders' likelihoods enter unweighted: the training weights that balance modalities of different sizes
(``Likelihood.weights``) would turn ``p(x_m | z)`` into ``p(x_m | z)^(w_m)``, not a density.

Vectorised over the batch and over chunks of ``K`` (log-sum-exp accumulated across chunks), in float64 sums.
"""

from __future__ import annotations

import math

import torch

from ..models import as_modalities, evaluating
from ..objectives import full_precision
from .checks import check_counts

__all__ = ["log_likelihood", "nested_log_likelihoods"]


@torch.no_grad()
def log_likelihood(model, x, condition: torch.Tensor | None = None,
                   targets: torch.Tensor | None = None, num_samples: int = 1000, chunk_size: int = 100,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample estimates ``(B,)`` for a batch ``x`` (a tensor per modality, or stacked ``(B, M, ...)``).

    Args:
        condition: ``(M, B)`` modalities the proposal sees (default: all); with ``targets`` of the same shape and
            disjoint from it, the conditional ``log p(X_targets | X_condition)``.
        targets: ``(M, B)`` modalities whose likelihood is estimated (default: all, the joint ``log p(X)``).
        num_samples: ``K``; chunk_size: samples decoded at once.
    """
    return nested_log_likelihoods(model, x, (num_samples,), condition, targets, chunk_size, generator)[0]


@torch.no_grad()
def nested_log_likelihoods(model, x, counts, condition: torch.Tensor | None = None,
                           targets: torch.Tensor | None = None, chunk_size: int = 100,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """``(len(counts), B)``: the estimates of ``log_likelihood`` from the first ``n`` of one sequence of
    ``max(counts)`` draws, for each ``n`` in ``counts``. Nested estimates share their draws, so their difference
    has far less noise than that of independent ones: the rise from ``K/2`` to ``K`` samples is the evaluation's
    diagnostic of the bound's bias at ``K`` (``evaluation._likelihoods``)."""
    counts = list(counts)
    check_counts(chunk_size=chunk_size)
    for n in counts:
        check_counts(num_samples=n)
    if not counts:
        raise ValueError("counts must hold at least one number of samples")
    num_samples = max(counts)
    x = as_modalities(x)
    everything = torch.ones(model.num_modalities, x[0].shape[0], dtype=torch.bool, device=x[0].device)
    condition = everything if condition is None else model.checked_mask(x, condition, "condition")
    targets = everything if targets is None else model.checked_mask(x, targets, "targets")
    conditional = not torch.equal(condition, targets)
    if conditional and (condition & targets).any():
        raise ValueError("condition and targets must be disjoint for a conditional likelihood "
                         "(or equal, for the joint likelihood)")
    chunks = [[] for _ in counts]  # per count, the log-sum-exp of each chunk's samples below it
    with evaluating(model):
        # the proposal is q(z | X_S) for a conditional, q(z | X) (the full subset's, for subset mixtures) for the joint
        mu, logvar, private = model.encode_with_private(x)
        proposal = model.conditional_posterior(mu, logvar, condition)
        for start in range(0, num_samples, chunk_size):
            count = min(chunk_size, num_samples - start)
            z = proposal.sample((count,), generator=generator)  # (k, B, D)
            if private is None:
                log_weight = full_precision(model.likelihood(x, targets, z, model.decoders, weighted=False)).double()
            else:
                inputs, log_ratio = _private_draws(model, private, z, targets, generator)
                log_lik = model.likelihood(x, targets, inputs, model.decoders, weighted=False)
                log_weight = full_precision(log_lik).double() + log_ratio
            if not conditional:
                log_weight = log_weight + model.latent.prior_log_prob(z.double()) - proposal.log_prob(z).double()
            for n, kept in zip(counts, chunks):
                if n > start:
                    kept.append(torch.logsumexp(log_weight[:n - start], 0))
    estimate = torch.stack([torch.logsumexp(torch.stack(kept), 0) - math.log(n) for n, kept in zip(counts, chunks)])
    if not torch.isfinite(estimate).all():
        raise FloatingPointError(f"non-finite log-likelihood estimate for {int((~torch.isfinite(estimate)).any(0).sum())} "
                                 "samples")
    return estimate


def _private_draws(model, private, z: torch.Tensor, targets: torch.Tensor, generator) -> tuple[list, torch.Tensor]:
    """Each decoder's ``(z, w_m)`` with ``w_m ~ q(w_m | x_m)`` (given ``z`` for top-down models), and
    ``sum_m [m a target] (log p(w_m) - log q(w_m | ...))`` ``(k, B)`` in float64."""
    inputs, log_ratio = [], torch.zeros(z.shape[:-1], dtype=torch.float64, device=z.device)
    for m in range(model.num_modalities):
        mu, logvar = model.private_given(private, m, z)
        w = model.latent.rsample(mu, logvar, generator)
        inputs.append((z, w.to(z.dtype)))
        w, mu, logvar = w.double(), mu.double(), logvar.double()
        ratio = model.latent.prior_log_prob(w) - model.latent.log_prob(w, mu, logvar)
        log_ratio = log_ratio + torch.where(targets[m], ratio, 0.0)
    return inputs, log_ratio
