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
from .checks import check_counts, check_not_empty
from .classifiers import classifier_input

__all__ = ["coherence", "cross_coherence", "latent_probe", "posterior_means", "private_latent_probe", "private_means",
           "summarise_coherence", "unconditional_coherence"]


@torch.no_grad()
def coherence(model, classifiers: nn.ModuleList, data, subsets: list[tuple[int, ...]] | None = None,
              batch_size: int = 500, seed: int = 0) -> dict:
    """``accuracy[i, t]``: how often modality ``t`` generated from ``subsets[i]`` shows the true label of the
    tuple of ``data`` (targets inside the subset are reconstructions)."""
    check_counts(batch_size=batch_size)
    check_not_empty(data)
    m = model.num_modalities
    subsets = subset_tuples(m) if subsets is None else [tuple(subset) for subset in subsets]
    for subset in subsets:  # before the first batch is encoded
        subset_mask(subset, m, 0)
    classifiers.eval()
    device = model.device
    generator = torch.Generator(device=device).manual_seed(seed)
    hits = torch.zeros(len(subsets), m)
    with evaluating(model):
        for index, x in batches(data, batch_size, device):
            y = data.labels[index].to(device)
            mu, logvar, private = model.encode_with_private(x)
            for i, subset in enumerate(subsets):
                given = subset_mask(subset, m, len(index), device)
                z = model.conditional_posterior(mu, logvar, given).sample(generator=generator)
                for t in range(m):
                    output = model.decode(z, t, given, private, generator)
                    predicted = classifiers[t](classifier_input(data.modalities[t], output)).argmax(-1)
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
    rows = {tuple(s): r for s, r in zip(result["subsets"], result["accuracy"])}
    missing = [(s,) for s in range(num_modalities) if (s,) not in rows]
    if missing:
        raise ValueError(f"the coherence result has no row for the one-input subsets {missing}: compute it with "
                         "subsets that include every single modality")
    return torch.stack([rows[(s,)] for s in range(num_modalities)])


@torch.no_grad()
def unconditional_coherence(model, classifiers: nn.ModuleList, modalities, latent_dim: int, num_samples: int = 1000,
                            batch_size: int = 500, seed: int = 0) -> float:
    """Fraction of prior samples whose generated modalities all get the same predicted label."""
    check_counts(latent_dim=latent_dim, num_samples=num_samples, batch_size=batch_size)
    classifiers.eval()
    device = model.device
    generator = torch.Generator(device=device).manual_seed(seed)
    agree = 0
    with evaluating(model):
        for start in range(0, num_samples, batch_size):
            z = model.latent.prior_sample((min(batch_size, num_samples - start), latent_dim), generator=generator,
                                          device=device)
            predicted = torch.stack([classifiers[t](classifier_input(modalities[t], model.decode(
                z, t, generator=generator))).argmax(-1) for t in range(model.num_modalities)])
            agree += int((predicted == predicted[0]).all(0).sum())
    return agree / num_samples


@torch.no_grad()
def posterior_means(model, data, subsets, batch_size: int = 500) -> dict:
    """``subset -> (N, D)`` moment-matched posterior means given that subset, on the CPU."""
    device = model.device
    means = {s: [] for s in subsets}
    with evaluating(model):
        for index, x in batches(data, batch_size, device):
            mu, logvar = model.encode(x)
            for s in subsets:
                given = subset_mask(s, model.num_modalities, len(index), device)
                mean, _ = model.conditional_posterior(mu, logvar, given).moments()
                means[s].append(mean.cpu())
    return {s: torch.cat(v) for s, v in means.items()}


@torch.no_grad()
def private_means(model, data, batch_size: int = 500) -> list[torch.Tensor]:
    """The posterior means ``(N, private_dim)`` of each modality's modality-specific latent, on the CPU; for
    Hölder++, whose ``q(w | x, z)`` depends on the shared latent, given the mean of the joint posterior of ``z``."""
    means = []
    with evaluating(model):
        for _, x in batches(data, batch_size, device=model.device):
            shared_mu, shared_logvar, private = model.encode_with_private(x)
            mu = private[0]
            if model.top_down is not None:
                everything = torch.ones(shared_mu.shape[:2], dtype=torch.bool, device=model.device)
                z = model.conditional_posterior(shared_mu, shared_logvar, everything).mean
                mu = torch.stack([model.private_given(private, m, z)[0] for m in range(model.num_modalities)])
            means.append(mu.cpu())
    return list(torch.cat(means, 1).unbind(0))


def _probe_training_tuples(train_data, examples: int, seed: int):
    n = len(train_data)
    if examples != -1 and not 10 <= examples <= n:
        raise ValueError(f"probe examples must be -1 (all) or between 10 and {n}, got {examples}")
    generator = torch.Generator().manual_seed(seed)
    return train_data.select(torch.arange(n) if examples == -1 else torch.randperm(n, generator=generator)[:examples])


def _probe_scores(train_features: dict, test_features: dict, train_labels, test_labels) -> dict:
    from sklearn.linear_model import LogisticRegression

    scores = {}
    for key, features in train_features.items():
        probe = LogisticRegression(max_iter=2000)
        probe.fit(features.double().numpy(), train_labels.cpu().numpy())
        scores[key] = float(probe.score(test_features[key].double().numpy(), test_labels.cpu().numpy()))
    return scores


def latent_probe(model, train_data, test_data, subsets, examples: int = 500, seed: int = 0) -> dict:
    """Test accuracy of a logistic regression on posterior means, per subset (``examples=-1``: all training)."""
    train_data = _probe_training_tuples(train_data, examples, seed)
    return _probe_scores(posterior_means(model, train_data, subsets), posterior_means(model, test_data, subsets),
                         train_data.labels, test_data.labels)


def private_latent_probe(model, train_data, test_data, examples: int = 500, seed: int = 0) -> dict:
    """The latent probe of ``latent_probe`` (same training tuples) on each modality's modality-specific latent:
    ``modality index -> test accuracy``. The Hölder++ paper's decoupling measure: the label is a shared factor, so
    a model whose private latents hold no shared information scores high on ``z`` and near chance on ``w``."""
    train_data = _probe_training_tuples(train_data, examples, seed)
    train_means, test_means = private_means(model, train_data), private_means(model, test_data)
    return _probe_scores(dict(enumerate(train_means)), dict(enumerate(test_means)), train_data.labels,
                         test_data.labels)
