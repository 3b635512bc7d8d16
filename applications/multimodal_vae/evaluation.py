"""Evaluation of a trained multimodal VAE: coherence, FID, log-likelihood, latent probes and pooling diagnostics.

Conventions (stated in every report):

* **Classifiers**: one digit classifier per modality, trained by the application on the training split and cached
  beside the data with its test accuracy; always used in eval mode (the MoPoE and HELVAE evaluation code leave
  dropout active). Architecture: two stride-2 convolutions (32, 64 channels) and a 128-unit layer, 5 epochs with a
  one-cycle learning rate: 0.976-0.985 test accuracy on the offline PolyMNIST; the MoPoE classifier (10 and 20
  channels) reaches only 0.94-0.96 there in 4 epochs.
* **Generations** are samples ``z ~ q(z | X_S)`` of the model's joint posterior given the subset ``S`` (mixture
  posteriors are sampled by component), decoded to the raw decoder output clamped to [0, 1]; seeded.
* **Conditional coherence**: for every non-empty subset ``S`` and every target ``t`` outside it, the fraction of
  generations whose predicted digit is the true one; summarised per subset, per subset size (mean and std over
  the subsets of that size) and overall (mean over all (S, t) pairs). The one-input matrix (MMVAE+ cross-
  coherence) has self-reconstruction on its diagonal; its "cross-modal" mean excludes the diagonal.
* **Unconditional coherence**: the fraction of prior samples ``z ~ N(0, I)`` on which all classifiers agree.
* **Latent probe**: a logistic regression (scikit-learn) on posterior means given each subset, fitted on
  ``probe_examples`` random training tuples (500 as in the HELVAE paper; -1: the whole training split), tested
  on the evaluated test tuples.
* **Pooling diagnostics** (all modalities present): the mean log Bhattacharyya coefficient between pairs of
  unimodal posteriors, and the fraction of the Hellinger pool's mass in its pairwise components (the first M
  components of ``opinionpool.functional.holder_mixture`` are the experts themselves). When the experts stop
  overlapping (large latents), the pairwise mass vanishes and HELVAE becomes a moment-matched mixture.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

import opinionpool.functional as F
from opinionpool.families.gaussian import gaussian_mixture_moments

from .files import atomic_write, write_text
from .models import evaluating

CLASSIFIER_EPOCHS = 5


class DigitClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_classifiers(images: torch.Tensor, labels: torch.Tensor, epochs: int = CLASSIFIER_EPOCHS,
                      batch_size: int = 128, lr: float = 3e-3, seed: int = 0, progress=None) -> nn.ModuleList:
    """One classifier per modality on uint8 ``images`` ``(M, N, 3, 28, 28)`` (Adam, one-cycle learning rate
    peaking at ``lr``); returned in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifiers = nn.ModuleList(DigitClassifier() for _ in range(images.shape[0]))
        optimizer = torch.optim.Adam(classifiers.parameters(), lr=lr)
        n = images.shape[1]
        starts = [start for _ in range(epochs) for start in range(0, n, batch_size)]
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=len(starts))
        order = None
        for start in progress(starts, desc="digit classifiers", unit="batch") if progress else starts:
            if start == 0:
                order = torch.randperm(n, generator=generator)
            index = order[start:start + batch_size]
            x = images[:, index].float() / 255
            loss = sum(nn.functional.cross_entropy(c(x[m]), labels[index]) for m, c in enumerate(classifiers))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return classifiers.eval()


@torch.no_grad()
def accuracy(classifiers: nn.ModuleList, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000):
    """Per-modality accuracy of the classifiers on uint8 ``images`` ``(M, N, ...)``."""
    classifiers.eval()
    correct = torch.zeros(images.shape[0])
    for start in range(0, images.shape[1], batch_size):
        x = images[:, start:start + batch_size].float() / 255
        for m, classifier in enumerate(classifiers):
            correct[m] += (classifier(x[m]).argmax(-1) == labels[start:start + batch_size]).sum()
    return correct / images.shape[1]


def classifiers_for(root, train_data, test_data, progress=None) -> tuple[nn.ModuleList, list[float]]:
    """The digit classifiers for the dataset at ``root`` and their test accuracies, trained once and cached
    beside the data (atomically)."""
    m = train_data.num_modalities
    cache = Path(root) / f".digit-classifiers-v3-{m}m.pt"
    classifiers = nn.ModuleList(DigitClassifier() for _ in range(m))
    if cache.exists():
        stored = torch.load(cache, weights_only=True)
        classifiers.load_state_dict(stored["state"])
        return classifiers.eval(), stored["test_accuracy"]
    classifiers = train_classifiers(train_data.images, train_data.labels, progress=progress)
    test_accuracy = accuracy(classifiers, test_data.images, test_data.labels).tolist()
    try:
        atomic_write(cache, lambda tmp: torch.save({"state": classifiers.state_dict(),
                                                    "test_accuracy": test_accuracy}, tmp))
    except OSError:  # a read-only data folder: keep the classifiers in memory only
        pass
    return classifiers, test_accuracy


def all_subsets(num_modalities: int) -> list[tuple[int, ...]]:
    """Non-empty subsets of the modalities as tuples, in ``opinionpool.functional.all_subsets``'s order (by size,
    then lexicographically)."""
    return [tuple(row.nonzero().squeeze(-1).tolist()) for row in F.all_subsets(num_modalities)]


def subset_mask(subset, num_modalities: int, batch: int, device=None) -> torch.Tensor:
    present = torch.zeros(num_modalities, batch, dtype=torch.bool, device=device)
    present[list(subset)] = True
    return present


def _inputs(images: torch.Tensor, batch_size: int, device):
    """``(start, x)`` for consecutive batches of uint8 ``images`` ``(M, N, ...)``, ``x`` float ``(B, M, ...)``."""
    for start in range(0, images.shape[1], batch_size):
        yield start, (images[:, start:start + batch_size].float() / 255).transpose(0, 1).to(device)


@torch.no_grad()
def coherence(model, classifiers: nn.ModuleList, images: torch.Tensor, labels: torch.Tensor,
              subsets: list[tuple[int, ...]] | None = None, batch_size: int = 500, seed: int = 0) -> dict:
    """``accuracy[i, t]``: how often modality ``t`` generated from ``subsets[i]`` shows the true digit (targets
    inside the subset are reconstructions)."""
    classifiers.eval()
    m = model.num_modalities
    subsets = all_subsets(m) if subsets is None else subsets
    device = model.likelihood.weights.device
    generator = torch.Generator(device=device).manual_seed(seed)
    hits = torch.zeros(len(subsets), m)
    with evaluating(model):
        for start, x in _inputs(images, batch_size, device):
            y = labels[start:start + x.shape[0]].to(device)
            mu, logvar = model.encode(x)
            for i, subset in enumerate(subsets):
                z = model.pool(mu, logvar, subset_mask(subset, m, x.shape[0], device)).sample(generator=generator)
                for t, decoder in enumerate(model.decoders):
                    predicted = classifiers[t](decoder(z).float().clamp(0, 1)).argmax(-1)
                    hits[i, t] += (predicted == y).sum().cpu()
    return {"subsets": subsets, "accuracy": hits / images.shape[1]}


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
def unconditional_coherence(model, classifiers: nn.ModuleList, latent_dim: int, num_samples: int = 1000,
                            batch_size: int = 500, seed: int = 0) -> float:
    """Fraction of prior samples whose generated modalities all get the same predicted digit."""
    device = model.likelihood.weights.device
    generator = torch.Generator(device=device).manual_seed(seed)
    agree = 0
    with evaluating(model):
        for start in range(0, num_samples, batch_size):
            z = torch.randn(min(batch_size, num_samples - start), latent_dim, generator=generator, device=device)
            predicted = torch.stack([classifiers[t](decoder(z).float().clamp(0, 1)).argmax(-1)
                                     for t, decoder in enumerate(model.decoders)])
            agree += int((predicted == predicted[0]).all(0).sum())
    return agree / num_samples


@torch.no_grad()
def posterior_means(model, images: torch.Tensor, subsets, batch_size: int = 500) -> dict:
    """``subset -> (N, D)`` moment-matched posterior means given that subset, on the CPU."""
    device = model.likelihood.weights.device
    means = {s: [] for s in subsets}
    for _, x in _inputs(images, batch_size, device):
        mu, logvar = model.encode(x)
        for s in subsets:
            mixture = model.pool(mu, logvar, subset_mask(s, model.num_modalities, x.shape[0], device))
            mean, _ = gaussian_mixture_moments(mixture.log_weights, mixture.loc, mixture.logvar, 1)
            means[s].append(mean.cpu())
    return {s: torch.cat(v) for s, v in means.items()}


def latent_probe(model, train_images, train_labels, test_images, test_labels, subsets, examples: int = 500,
                 seed: int = 0) -> dict:
    """Test accuracy of a logistic regression on posterior means, per subset (``examples=-1``: all training)."""
    from sklearn.linear_model import LogisticRegression

    n = train_images.shape[1]
    if examples != -1 and not 10 <= examples <= n:
        raise ValueError(f"probe examples must be -1 (all) or between 10 and {n}, got {examples}")
    generator = torch.Generator().manual_seed(seed)
    index = torch.arange(n) if examples == -1 else torch.randperm(n, generator=generator)[:examples]
    train_means = posterior_means(model, train_images[:, index], subsets)
    test_means = posterior_means(model, test_images, subsets)
    scores = {}
    for s in subsets:
        probe = LogisticRegression(max_iter=2000)
        probe.fit(train_means[s].double().numpy(), train_labels[index].numpy())
        scores[s] = float(probe.score(test_means[s].double().numpy(), test_labels.numpy()))
    return scores


@torch.no_grad()
def pooling_diagnostics(model, x) -> dict:
    """Mean log Bhattacharyya coefficient between pairs of unimodal posteriors and the fraction of the Hellinger
    pool's mass in its pairwise components, all modalities of the batch ``x`` (a model input) present."""
    m = model.num_modalities
    pairs = list(itertools.combinations(range(m), 2))
    with evaluating(model):
        mu, logvar = model.encode(x)
    log_bc = sum(F.log_bhattacharyya(mu[i], logvar[i], mu[j], logvar[j]) for i, j in pairs) / len(pairs)
    mixture = F.holder_mixture(mu.double(), logvar.double(), 0.5, dim=0, validate_args=False)
    pairwise = -torch.expm1(torch.logsumexp(mixture.log_weights[..., :m], -1))
    return {"mean_log_bhattacharyya": float(log_bc.mean()), "pairwise_mass": float(pairwise.mean())}


def _subset_name(subset) -> str:
    return "{" + ",".join(f"m{t}" for t in subset) + "}"


def evaluate_run(run_dir, config, model, progress=None) -> dict:
    """Every metric of ``config.eval`` on the test split; writes ``metrics.json`` and ``report.md`` in ``run_dir``."""
    from .config import EVALUATED
    from .train import load_dataset

    if config.data.dataset not in EVALUATED:
        raise ValueError(f"evaluate: the metrics are built for {EVALUATED} (digit classifiers, image FID), not "
                         f"data.dataset={config.data.dataset!r}")
    settings = config.eval
    train_data, test_data = load_dataset(config, "train"), load_dataset(config, "test")
    classifiers, classifier_accuracy = classifiers_for(config.data.root, train_data, test_data, progress)
    device = model.likelihood.weights.device
    classifiers = classifiers.to(device)
    n = test_data.images.shape[1] if settings.test_examples is None else min(settings.test_examples,
                                                                             test_data.images.shape[1])
    images, labels = test_data.images[:, :n], test_data.labels[:n]
    m = model.num_modalities
    subsets = all_subsets(m) if settings.subsets == "all" else [(s,) for s in range(m)] + [tuple(range(m))]
    steps = ["coherence", "unconditional", "probe", "likelihood", "pooling"] + (["fid"] if settings.fid_samples else [])
    bar = progress(total=len(steps), desc="evaluation", unit="metric") if progress else None
    metrics = {"test_examples": n, "classifier_accuracy": classifier_accuracy, "protocol": {
        "generations": "samples of q(z|X_S), seeded", "probe_examples": settings.probe_examples,
        "likelihood_samples": settings.likelihood_samples, "subsets": settings.subsets}}

    def done():
        if bar is not None:
            bar.update()

    result = coherence(model, classifiers, images, labels, subsets, seed=settings.seed)
    summary = summarise_coherence(result, m)
    metrics["coherence"] = {"overall": summary["overall"],
                            "per_size": {str(k): v for k, v in summary["per_size"].items()},
                            "per_subset": {_subset_name(s): v for s, v in summary["per_subset"].items()}}
    matrix = cross_coherence(result, m)
    off = ~torch.eye(m, dtype=torch.bool)
    metrics["cross_coherence"] = {"matrix": matrix.tolist(), "cross_modal": float(matrix[off].mean()),
                                  "with_self": float(matrix.mean())}
    done()
    metrics["unconditional_coherence"] = unconditional_coherence(
        model, classifiers, config.model.latent_dim, settings.unconditional_samples, seed=settings.seed)
    done()
    probe = latent_probe(model, train_data.images, train_data.labels, images, labels, subsets,
                         settings.probe_examples, settings.seed)
    metrics["latent_probe"] = {_subset_name(s): v for s, v in probe.items()}
    done()
    metrics["log_likelihood"] = _likelihoods(model, images[:, :settings.likelihood_examples], settings)
    done()
    metrics["pooling"] = pooling_diagnostics(model, [t.to(device).float() / 255 for t in images[:, :1000]])
    done()
    if settings.fid_samples:
        from .fid import fid_scores

        cache = Path(config.data.root).parent / ".wheels"
        metrics["fid"] = fid_scores(model, images, test_data.images, settings, cache, progress)
        done()
    if bar is not None:
        bar.close()
    run_dir = Path(run_dir)
    write_text(run_dir / "metrics.json", json.dumps(metrics, indent=1))
    write_text(run_dir / "report.md", render_report(config, metrics))
    return metrics


def _likelihoods(model, images, settings) -> dict:
    from .marginal_likelihood import log_likelihood

    device = model.likelihood.weights.device
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    joint, conditional = [], []
    m = model.num_modalities
    for _, x in _inputs(images, 100, device):
        joint.append(log_likelihood(model, x, num_samples=settings.likelihood_samples, generator=generator))
        given = [log_likelihood(model, x, condition=subset_mask((s,), m, x.shape[0], device),
                                targets=~subset_mask((s,), m, x.shape[0], device),
                                num_samples=settings.likelihood_samples, generator=generator) for s in range(m)]
        conditional.append(torch.stack(given).mean(0))
    joint, conditional = torch.cat(joint), torch.cat(conditional)
    return {"joint": float(joint.mean()), "joint_std_error": float(joint.std() / math.sqrt(len(joint))),
            "given_one_modality": float(conditional.mean()), "num_samples": settings.likelihood_samples,
            "examples": int(images.shape[1])}


def render_report(config, metrics: dict) -> str:
    m = config.data.num_modalities
    coherence_ = metrics["coherence"]
    matrix = metrics["cross_coherence"]["matrix"]
    header = "| from \\ to | " + " | ".join(f"m{t}" for t in range(m)) + " |"
    rows = [header, "|---" * (m + 1) + "|"]
    rows += [f"| m{s} | " + " | ".join(f"{v:.3f}" for v in matrix[s]) + " |" for s in range(m)]
    sizes = ["| inputs | coherence (mean ± std over subsets) |", "|---|---|"]
    sizes += [f"| {k} | {mean:.3f} ± {std:.3f} |" for k, (mean, std) in coherence_["per_size"].items()]
    probe = ["| subset | probe accuracy |", "|---|---|"]
    probe += [f"| {s} | {v:.3f} |" for s, v in metrics["latent_probe"].items()]
    ll = metrics["log_likelihood"]
    lines = [
        f"# {config.name}", "",
        f"Model `{config.model.name}`, latent {config.model.latent_dim}, beta {config.model.beta}, likelihood "
        f"{config.model.likelihood}({config.model.likelihood_scale}); dataset `{config.data.dataset}` at "
        f"`{config.data.root}`; {metrics['test_examples']} test tuples.", "",
        f"**Conditional coherence** (generations are posterior samples): overall {coherence_['overall']:.3f}; "
        f"one input, cross-modal {metrics['cross_coherence']['cross_modal']:.3f} (with self-reconstruction "
        f"{metrics['cross_coherence']['with_self']:.3f}); chance 0.1.", "",
        *sizes, "", "One input (rows) to each output (columns):", "", *rows, "",
        f"**Unconditional coherence** (all classifiers agree on a prior sample): "
        f"{metrics['unconditional_coherence']:.3f}.", "",
        f"**Log-likelihood** (importance sampling, K = {ll['num_samples']}, {ll['examples']} tuples): "
        f"log p(X) = {ll['joint']:.1f} ± {ll['joint_std_error']:.1f}; log p(X_rest | one modality) = "
        f"{ll['given_one_modality']:.1f} (mean over the conditioning modalities).", "",
        f"**Latent probe** (logistic regression on posterior means, {metrics['protocol']['probe_examples']} "
        "training tuples; -1 = all):", "", *probe, "",
        f"**Pooling diagnostics** (all modalities): mean log Bhattacharyya coefficient between experts "
        f"{metrics['pooling']['mean_log_bhattacharyya']:.2f}; Hellinger-pool mass in pairwise components "
        f"{metrics['pooling']['pairwise_mass']:.3f}.", ""]
    if "fid" in metrics:
        fid = metrics["fid"]
        lines += [f"**FID** ({fid['samples']} samples per modality, {fid['weights']}): unconditional "
                  f"{fid['unconditional']:.1f}; conditional by number of inputs: "
                  + ", ".join(f"{k}: {v:.1f}" for k, v in fid["per_size"].items()) + ".", ""]
    lines += ["Digit classifiers (eval mode), test accuracy per modality: "
              + ", ".join(f"{a:.3f}" for a in metrics["classifier_accuracy"]) + ".", "",
              "![samples](samples.png)", ""]
    return "\n".join(lines)
