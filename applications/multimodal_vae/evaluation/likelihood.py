"""Importance-sampled log-likelihoods of a trained multimodal VAE.

Joint: ``log p(X) ~ log (1/K) sum_k p(X | z_k) p(z_k) / q(z_k | X)`` with ``z_k ~ q(z | X)``, the model's own joint
posterior; mixture posteriors (MMVAE, MoPoE, MoHELVAE, MWB-VAE) are sampled by component and their density is
the exact mixture density (``opinionpool.functional.GaussianMixture.log_prob``), not a moment-matched Gaussian.
The estimate is a stochastic lower bound of ``log p(X)`` in expectation that tightens as ``K`` grows (MoPoE used
K = 12, MultiVae 1000).

Conditional: ``log p(X_rest | X_S) ~ log (1/K) sum_k p(X_rest | z_k)`` with ``z_k ~ q(z | X_S)``, the encoder
of the subset standing in for ``p(z | X_S)`` (the MoPoE convention).

Models with modality-specific latents (MMVAE+, ``model.private_dim > 0``): ``z`` is the shared latent; each
decoder draws its modality-specific latent from the prior, one per sample (an unbiased estimate of ``p(X | z)``,
since the modalities' private latents are independent). MMVM has no data-independent prior: its estimate is that
of the generative model ``N(0, I)`` times the decoders, with ``h(z | X)`` as the proposal.

Vectorised over the batch and over chunks of ``K`` (log-sum-exp accumulated across chunks), in float64 sums.
"""

from __future__ import annotations

import math

import torch

from ..models import as_modalities, evaluating
from ..objectives import full_precision, standard_normal_log_prob

__all__ = ["log_likelihood"]


def _check(num_samples: int, chunk_size: int) -> None:
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


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
    _check(num_samples, chunk_size)
    x = as_modalities(x)
    everything = torch.ones(model.num_modalities, x[0].shape[0], dtype=torch.bool, device=x[0].device)
    condition = everything if condition is None else condition
    targets = everything if targets is None else targets
    conditional = not torch.equal(condition, targets)
    if conditional and (condition & targets).any():
        raise ValueError("condition and targets must be disjoint for a conditional likelihood "
                         "(or equal, for the joint likelihood)")
    chunks = []
    with evaluating(model):
        proposal = model.posterior_mixture(x, condition)
        for start in range(0, num_samples, chunk_size):
            count = min(chunk_size, num_samples - start)
            z = proposal.sample((count,), generator=generator)  # (k, B, D)
            log_weight = full_precision(model.likelihood(x, targets, z, model.decoders)).double()
            if not conditional:
                log_weight = log_weight + standard_normal_log_prob(z.double()) - proposal.log_prob(z).double()
            chunks.append(torch.logsumexp(log_weight, 0))
    estimate = torch.logsumexp(torch.stack(chunks), 0) - math.log(num_samples)
    if not torch.isfinite(estimate).all():
        raise FloatingPointError(f"non-finite log-likelihood estimate for {int((~torch.isfinite(estimate)).sum())} "
                                 "samples")
    return estimate
