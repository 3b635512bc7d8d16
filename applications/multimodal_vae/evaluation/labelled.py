"""The metrics that need a class label shared by the modalities: conditional coherence (every subset to every
modality), the one-input cross-coherence matrix, unconditional coherence and the latent probe (see the conventions
in ``evaluation``)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..data import batches, subset_mask, subset_tuples
from ..models import evaluating
from .classifiers import classifier_input

__all__ = ["coherence", "cross_coherence", "latent_probe", "posterior_means", "summarise_coherence",
           "unconditional_coherence"]

@torch.no_grad()
def coherence(model, classifiers: nn.ModuleList, data, subsets: list[tuple[int, ...]] | None = None,
              batch_size: int = 500, seed: int = 0) -> dict:
    """``accuracy[i, t]``: how often modality ``t`` generated from ``subsets[i]`` shows the true label of the
    tuple of ``data`` (targets inside the subset are reconstructions)."""
    classifiers.eval()
    m = model.num_modalities
    subsets = subset_tuples(m) if subsets is None else subsets
    device = model.device
    generator = torch.Generator(device=device).manual_seed(seed)
    hits = torch.zeros(len(subsets), m)
    with evaluating(model):
        for index, x in batches(data, batch_size, device):
            y = data.labels[index].to(device)
            mu, logvar = model.encode(x)
            for i, subset in enumerate(subsets):
                z = model.pool(mu, logvar, subset_mask(subset, m, len(index), device)).sample(generator=generator)
                for t, decoder in enumerate(model.decoders):
                    predicted = classifiers[t](classifier_input(data.modalities[t], decoder(z))).argmax(-1)
                    hits[i, t] += (predicted == y).sum().cpu()
    return {"subsets": subsets, "accuracy": hits / len(data)}


def summarise_coherence(result: dict, num_modalities: int) -> dict:
    """Per subset (mean over targets outside it), per subset size (mean, std) and overall (all (S, t) pairs)."""
    per_subset, pairs = {}, []
    for subset, row in zip(result["subsets"], result["accuracy"].tolist()):
        outside = [row[t] for t in range(num_modalities) if t not in subset]
        if outside:
            per_subset[subset] = float(np.mean(outside))
            pairs += outside
    per_size = {}
    for k in sorted({len(s) for s in per_subset}):
        values = [v for s, v in per_subset.items() if len(s) == k]
        per_size[k] = (float(np.mean(values)), float(np.std(values)))
    return {"per_subset": per_subset, "per_size": per_size, "overall": float(np.mean(pairs)) if pairs else math.nan}


def cross_coherence(result: dict, num_modalities: int) -> torch.Tensor:
    """The one-input ``(M, M)`` matrix ``[source, target]`` from a coherence result."""
    rows = {s: r for s, r in zip(result["subsets"], result["accuracy"])}
    return torch.stack([rows[(s,)] for s in range(num_modalities)])


@torch.no_grad()
def unconditional_coherence(model, classifiers: nn.ModuleList, modalities, latent_dim: int, num_samples: int = 1000,
                            batch_size: int = 500, seed: int = 0) -> float:
    """Fraction of prior samples whose generated modalities all get the same predicted label."""
    device = model.device
    generator = torch.Generator(device=device).manual_seed(seed)
    agree = 0
    with evaluating(model):
        for start in range(0, num_samples, batch_size):
            z = torch.randn(min(batch_size, num_samples - start), latent_dim, generator=generator, device=device)
            predicted = torch.stack([classifiers[t](classifier_input(modalities[t], decoder(z))).argmax(-1)
                                     for t, decoder in enumerate(model.decoders)])
            agree += int((predicted == predicted[0]).all(0).sum())
    return agree / num_samples


@torch.no_grad()
def posterior_means(model, data, subsets, batch_size: int = 500) -> dict:
    """``subset -> (N, D)`` moment-matched posterior means given that subset, on the CPU."""
    device = model.device
    means = {s: [] for s in subsets}
    for index, x in batches(data, batch_size, device):
        mu, logvar = model.encode(x)
        for s in subsets:
            mixture = model.pool(mu, logvar, subset_mask(s, model.num_modalities, len(index), device))
            mean, _ = mixture.moments()
            means[s].append(mean.cpu())
    return {s: torch.cat(v) for s, v in means.items()}


def latent_probe(model, train_data, test_data, subsets, examples: int = 500, seed: int = 0) -> dict:
    """Test accuracy of a logistic regression on posterior means, per subset (``examples=-1``: all training)."""
    from sklearn.linear_model import LogisticRegression

    n = len(train_data)
    if examples != -1 and not 10 <= examples <= n:
        raise ValueError(f"probe examples must be -1 (all) or between 10 and {n}, got {examples}")
    generator = torch.Generator().manual_seed(seed)
    index = torch.arange(n) if examples == -1 else torch.randperm(n, generator=generator)[:examples]
    train_data = train_data.select(index)
    train_means = posterior_means(model, train_data, subsets)
    test_means = posterior_means(model, test_data, subsets)
    scores = {}
    for s in subsets:
        probe = LogisticRegression(max_iter=2000)
        probe.fit(train_means[s].double().numpy(), train_data.labels.cpu().numpy())
        scores[s] = float(probe.score(test_means[s].double().numpy(), test_data.labels.cpu().numpy()))
    return scores
