"""Evaluation of a trained multimodal VAE: coherence, FID, log-likelihood, latent probes and pooling diagnostics.

Conventions (stated in every report):

* **Which metrics**: every metric needs only the model and the data except coherence and the latent probe, which
  need one class label per tuple shared by all modalities (``MultimodalDataset.num_classes``: PolyMNIST and
  MNIST-SVHN-Text, a digit); for CelebA (40 attributes) and CUB (no label) the report says they are not computed.
  FID is computed for the image modalities.
* **Classifiers**: one digit classifier per modality, trained by the application on the training split and cached
  beside the data with its test accuracy; always used in eval mode (the MoPoE and HELVAE evaluation code leave
  dropout active). PolyMNIST: two stride-2 convolutions (32, 64 channels) and a 128-unit layer, 5 epochs with a
  one-cycle learning rate: 0.976-0.985 test accuracy on the offline PolyMNIST; the MoPoE classifier (10 and 20
  channels) reaches only 0.94-0.96 there in 4 epochs. Other modalities (MNIST, SVHN, text): the modality's
  encoder network with its mean head as the logits. A generated text is classified from its most likely tokens.
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
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import opinionpool.functional as F
from opinionpool.families.gaussian import gaussian_mixture_moments

from .files import UnreadableFile, load_checked, remove_orphaned_temporaries, save_checked, write_text
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


class EncoderClassifier(nn.Module):
    """A modality's encoder network with ``num_classes`` outputs; its mean head gives the logits."""

    def __init__(self, modality, num_classes: int = 10):
        super().__init__()
        from .networks import make_networks

        self.encoder = make_networks([modality], num_classes)[0][0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[0]


def make_classifier(modality, num_classes: int = 10) -> nn.Module:
    if not modality.is_text and tuple(modality.shape) == (3, 28, 28):
        return DigitClassifier()
    return EncoderClassifier(modality, num_classes)


def classifier_input(modality, output: torch.Tensor) -> torch.Tensor:
    """What a classifier reads from a decoder output: the image clamped to [0, 1], or the most likely tokens."""
    return output.argmax(-1) if modality.is_text else output.float().clamp(0, 1)


def _batches(data, batch_size: int, device, shuffle: torch.Generator | None = None):
    """``(index, x)`` for consecutive (or, with ``shuffle``, random) batches of ``data``; ``x`` on ``device``."""
    order = torch.randperm(len(data), generator=shuffle) if shuffle is not None else torch.arange(len(data))
    for start in range(0, len(data), batch_size):
        index = order[start:start + batch_size]
        yield index, [x.to(device) for x in data.gather(index)]


def train_classifiers(data, epochs: int = CLASSIFIER_EPOCHS, batch_size: int = 128, lr: float = 3e-3, seed: int = 0,
                      progress=None) -> nn.ModuleList:
    """One classifier per modality of ``data`` for its labels (Adam, one-cycle learning rate peaking at ``lr``);
    returned in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifiers = nn.ModuleList(make_classifier(m, data.num_classes) for m in data.modalities)
        optimizer = torch.optim.Adam(classifiers.parameters(), lr=lr)
        total = epochs * math.ceil(len(data) / batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total)
        bar = progress(total=total, desc="digit classifiers", unit="batch") if progress else None
        for _ in range(epochs):
            for index, x in _batches(data, batch_size, "cpu", shuffle=generator):
                y = data.labels[index]
                loss = sum(nn.functional.cross_entropy(c(x_m), y) for x_m, c in zip(x, classifiers))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                if bar is not None:
                    bar.update()
        if bar is not None:
            bar.close()
    return classifiers.eval()


@torch.no_grad()
def accuracy(classifiers: nn.ModuleList, data, batch_size: int = 1000) -> torch.Tensor:
    """Per-modality accuracy of the classifiers on ``data``."""
    classifiers.eval()
    correct = torch.zeros(len(classifiers))
    for index, x in _batches(data, batch_size, "cpu"):
        for m, classifier in enumerate(classifiers):
            correct[m] += (classifier(x[m]).argmax(-1) == data.labels[index]).sum()
    return correct / len(data)


def classifiers_for(root, dataset: str, train_data, test_data, progress=None) -> tuple[nn.ModuleList, list[float]]:
    """The digit classifiers for the dataset at ``root`` and their test accuracies, trained once and cached
    beside the data (atomically)."""
    m = train_data.num_modalities
    name = f".digit-classifiers-v3-{m}m.pt" if dataset == "polymnist" else f".digit-classifiers-{dataset}-v1.pt"
    cache = Path(root) / name
    classifiers = nn.ModuleList(make_classifier(modality, train_data.num_classes) for modality in train_data.modalities)
    remove_orphaned_temporaries(root, [name])  # of a process killed while writing the cache
    if cache.exists():
        try:  # a truncated, corrupted or unsafe cache is trained again
            stored = load_checked(cache)
            classifiers.load_state_dict(stored["state"])
            return classifiers.eval(), list(stored["test_accuracy"])
        except (UnreadableFile, KeyError, TypeError, RuntimeError) as error:
            problem = str(error) if isinstance(error, UnreadableFile) else f"{cache} does not hold them ({error})"
            warnings.warn(f"{problem}; training the classifiers again", stacklevel=2)
    classifiers = train_classifiers(train_data, progress=progress)
    test_accuracy = accuracy(classifiers, test_data).tolist()
    try:
        save_checked(cache, {"state": classifiers.state_dict(), "test_accuracy": test_accuracy})
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


@torch.no_grad()
def coherence(model, classifiers: nn.ModuleList, data, subsets: list[tuple[int, ...]] | None = None,
              batch_size: int = 500, seed: int = 0) -> dict:
    """``accuracy[i, t]``: how often modality ``t`` generated from ``subsets[i]`` shows the true label of the
    tuple of ``data`` (targets inside the subset are reconstructions)."""
    classifiers.eval()
    m = model.num_modalities
    subsets = all_subsets(m) if subsets is None else subsets
    device = model.device
    generator = torch.Generator(device=device).manual_seed(seed)
    hits = torch.zeros(len(subsets), m)
    with evaluating(model):
        for index, x in _batches(data, batch_size, device):
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
    for index, x in _batches(data, batch_size, device):
        mu, logvar = model.encode(x)
        for s in subsets:
            mixture = model.pool(mu, logvar, subset_mask(s, model.num_modalities, len(index), device))
            mean, _ = gaussian_mixture_moments(mixture.log_weights, mixture.loc, mixture.logvar, 1)
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


def _subset_name(subset, names) -> str:
    return "{" + ",".join(names[t] for t in subset) + "}"


def training_status(run_dir) -> dict | None:
    """``{"steps", "planned_steps", "stopped_by"}`` of the run's checkpoint: the steps taken and asked for, and the
    limit that stopped training short of them (None: none did); None for a checkpoint from before they were stored,
    or no checkpoint."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.exists():
        return None
    state = load_checked(path, map_location="cpu")
    if "planned_steps" not in state:
        return None
    return {"steps": state["step"], "planned_steps": state["planned_steps"], "stopped_by": state["stopped_by"]}


def training_notice(training: dict | None) -> str | None:
    """What to tell the reader of the metrics when training took fewer steps than planned (None otherwise)."""
    if training is None or training["steps"] >= training["planned_steps"]:
        return None
    reached = f"{training['steps']} of {training['planned_steps']} planned steps"
    why = (f"training stopped early at {training['stopped_by']} (wall-clock limit): {reached}"
           if training["stopped_by"] else f"training did not finish: {reached} (resume it with --resume)")
    return (f"{why}; these metrics are those of a partly trained model, not comparable with those of runs that "
            "completed their steps (such as the figures in docs/results.md)")


def evaluate_run(run_dir, config, model, progress=None) -> dict:
    """Every metric of ``config.eval`` on the test split; writes ``metrics.json`` and ``report.md`` in ``run_dir``.
    ``metrics["training"]`` holds ``training_status(run_dir)`` (when known); the report opens with a notice when
    training stopped short of its planned steps."""
    from .train import load_dataset

    settings = config.eval
    train_data, test_data = load_dataset(config, "train"), load_dataset(config, "test")
    device = model.device
    n = len(test_data) if settings.test_examples is None else min(settings.test_examples, len(test_data))
    evaluated = test_data.head(n)
    m = model.num_modalities
    names = [modality.name for modality in test_data.modalities]
    subsets = all_subsets(m) if settings.subsets == "all" else [(s,) for s in range(m)] + [tuple(range(m))]
    labelled = test_data.num_classes is not None
    images = [t for t, modality in enumerate(test_data.modalities) if not modality.is_text]
    steps = ((["classifiers", "coherence", "unconditional", "probe"] if labelled else []) + ["likelihood", "pooling"]
             + (["fid"] if settings.fid_samples and images else []))
    bar = progress(total=len(steps), desc="evaluation", unit="metric") if progress else None
    metrics = {"test_examples": n, "modalities": names, "protocol": {
        "generations": "samples of q(z|X_S), seeded", "probe_examples": settings.probe_examples,
        "likelihood_samples": settings.likelihood_samples, "subsets": settings.subsets}}
    training = training_status(run_dir)
    if training is not None:
        metrics["training"] = training

    def done():
        if bar is not None:
            bar.update()

    if labelled:
        _label_metrics(metrics, model, config, train_data, test_data, evaluated, subsets, progress, done)
    else:
        metrics["not_computed"] = (f"coherence and the latent probe need one class label per tuple shared by the "
                                   f"modalities; {config.data.dataset} has none")
    metrics["log_likelihood"] = _likelihoods(model, evaluated.head(settings.likelihood_examples), settings)
    done()
    metrics["pooling"] = pooling_diagnostics(model, [x.to(device) for x in evaluated.head(1000).gather(
        torch.arange(min(n, 1000)))])
    done()
    if settings.fid_samples and images:
        from .fid import fid_scores

        cache = Path(config.data.root).parent / ".wheels"
        metrics["fid"] = fid_scores(model, evaluated, test_data, settings, cache, progress)
        done()
    if bar is not None:
        bar.close()
    run_dir = Path(run_dir)
    write_text(run_dir / "metrics.json", json.dumps(metrics, indent=1))
    write_text(run_dir / "report.md", render_report(config, metrics))
    return metrics


def _label_metrics(metrics, model, config, train_data, test_data, evaluated, subsets, progress, done) -> None:
    """Classifier accuracy, conditional, cross-modal and unconditional coherence and the latent probe."""
    settings, m = config.eval, model.num_modalities
    names = metrics["modalities"]
    classifiers, classifier_accuracy = classifiers_for(config.data.root, config.data.dataset, train_data, test_data,
                                                       progress)
    classifiers = classifiers.to(model.device)
    metrics["classifier_accuracy"] = classifier_accuracy
    done()
    result = coherence(model, classifiers, evaluated, subsets, seed=settings.seed)
    summary = summarise_coherence(result, m)
    metrics["coherence"] = {"overall": summary["overall"],
                            "per_size": {str(k): v for k, v in summary["per_size"].items()},
                            "per_subset": {_subset_name(s, names): v for s, v in summary["per_subset"].items()}}
    matrix = cross_coherence(result, m)
    off = ~torch.eye(m, dtype=torch.bool)
    metrics["cross_coherence"] = {"matrix": matrix.tolist(), "cross_modal": float(matrix[off].mean()),
                                  "with_self": float(matrix.mean())}
    done()
    metrics["unconditional_coherence"] = unconditional_coherence(
        model, classifiers, evaluated.modalities, config.model.latent_dim, settings.unconditional_samples,
        seed=settings.seed)
    done()
    probe = latent_probe(model, train_data, evaluated, subsets, settings.probe_examples, settings.seed)
    metrics["latent_probe"] = {_subset_name(s, names): v for s, v in probe.items()}
    done()


def _likelihoods(model, data, settings) -> dict:
    from .marginal_likelihood import log_likelihood

    device = model.device
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    joint, conditional = [], []
    m = model.num_modalities
    for index, x in _batches(data, 100, device):
        b = len(index)
        joint.append(log_likelihood(model, x, num_samples=settings.likelihood_samples, generator=generator))
        given = [log_likelihood(model, x, condition=subset_mask((s,), m, b, device),
                                targets=~subset_mask((s,), m, b, device),
                                num_samples=settings.likelihood_samples, generator=generator) for s in range(m)]
        conditional.append(torch.stack(given).mean(0))
    joint, conditional = torch.cat(joint), torch.cat(conditional)
    return {"joint": float(joint.mean()), "joint_std_error": float(joint.std() / math.sqrt(len(joint))),
            "given_one_modality": float(conditional.mean()), "num_samples": settings.likelihood_samples,
            "examples": len(data)}


def render_report(config, metrics: dict) -> str:
    names = metrics["modalities"]
    ll, pooling = metrics["log_likelihood"], metrics["pooling"]
    nets = config.model.architecture + (f", {config.model.activation}" if config.model.activation else "")
    lines = [
        f"# {config.name}", "",
        f"Model `{config.model.name}` ({nets} nets), latent {config.model.latent_dim}, beta "
        f"{config.model.beta}, image likelihood {config.model.likelihood}({config.model.likelihood_scale}); dataset "
        f"`{config.data.dataset}` at `{config.data.root}` (modalities {', '.join(names)}); {metrics['test_examples']} "
        "test tuples.", ""]
    notice = training_notice(metrics.get("training"))
    if notice:
        lines += [f"**Warning: {notice[0].upper() + notice[1:]}.**", ""]
    if "coherence" in metrics:
        coherence_ = metrics["coherence"]
        matrix = metrics["cross_coherence"]["matrix"]
        rows = ["| from \\ to | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        rows += [f"| {names[s]} | " + " | ".join(f"{v:.3f}" for v in matrix[s]) + " |" for s in range(len(names))]
        sizes = ["| inputs | coherence (mean ± std over subsets) |", "|---|---|"]
        sizes += [f"| {k} | {mean:.3f} ± {std:.3f} |" for k, (mean, std) in coherence_["per_size"].items()]
        probe = ["| subset | probe accuracy |", "|---|---|"]
        probe += [f"| {s} | {v:.3f} |" for s, v in metrics["latent_probe"].items()]
        lines += [
            f"**Conditional coherence** (generations are posterior samples): overall {coherence_['overall']:.3f}; "
            f"one input, cross-modal {metrics['cross_coherence']['cross_modal']:.3f} (with self-reconstruction "
            f"{metrics['cross_coherence']['with_self']:.3f}); chance 0.1.", "",
            *sizes, "", "One input (rows) to each output (columns):", "", *rows, "",
            f"**Unconditional coherence** (all classifiers agree on a prior sample): "
            f"{metrics['unconditional_coherence']:.3f}.", "",
            f"**Latent probe** (logistic regression on posterior means, {metrics['protocol']['probe_examples']} "
            "training tuples; -1 = all):", "", *probe, ""]
    else:
        lines += [f"Not computed: {metrics['not_computed']}.", ""]
    lines += [
        f"**Log-likelihood** (importance sampling, K = {ll['num_samples']}, {ll['examples']} tuples): "
        f"log p(X) = {ll['joint']:.1f} ± {ll['joint_std_error']:.1f}; log p(X_rest | one modality) = "
        f"{ll['given_one_modality']:.1f} (mean over the conditioning modalities).", "",
        f"**Pooling diagnostics** (all modalities): mean log Bhattacharyya coefficient between experts "
        f"{pooling['mean_log_bhattacharyya']:.2f}; Hellinger-pool mass in pairwise components "
        f"{pooling['pairwise_mass']:.3f}.", ""]
    if "fid" in metrics:
        fid = metrics["fid"]
        lines += [f"**FID** ({fid['samples']} samples per image modality, {fid['weights']}): unconditional "
                  f"{fid['unconditional']:.1f}; conditional by number of inputs: "
                  + ", ".join(f"{k}: {v:.1f}" for k, v in fid["per_size"].items()) + ".", ""]
    if "classifier_accuracy" in metrics:
        lines += ["Digit classifiers (eval mode), test accuracy per modality: "
                  + ", ".join(f"{name} {a:.3f}" for name, a in zip(names, metrics["classifier_accuracy"])) + ".", ""]
    lines += ["![samples](samples.png)", ""]
    return "\n".join(lines)
