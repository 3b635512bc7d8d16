"""Evaluation: digit classifiers per modality and conditional coherence.

Classifier: the MoPoE / MMVAE+ PolyMNIST net (conv 3->10 and 10->20, kernel 4, stride 2, dropout 0.5, linear
980->128->10), one per modality, trained on the training split. **It is switched to eval mode while coherence is
measured** (the MoPoE and HELVAE evaluation code leaves dropout active).

Conditional coherence (the convention used here): condition on one modality ``s``, take the joint posterior
mean, decode every modality, and count how often the classifier of modality ``t`` recovers the tuple's digit.
The report gives the full source x target matrix, the cross-modal mean (``s != t``, the MMVAE+ convention) and
the mean including self-reconstruction.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .files import atomic_write, write_text


class DigitClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 10, 4, stride=2, padding=1), nn.Dropout2d(0.5), nn.ReLU(),
            nn.Conv2d(10, 20, 4, stride=2, padding=1), nn.Dropout2d(0.5), nn.ReLU(),
            nn.Flatten(), nn.Linear(980, 128), nn.Dropout(0.5), nn.ReLU(), nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_classifiers(images: torch.Tensor, labels: torch.Tensor, epochs: int = 2, batch_size: int = 256,
                      lr: float = 1e-3, seed: int = 0, progress=None) -> nn.ModuleList:
    """One classifier per modality on uint8 ``images`` ``(M, N, 3, 28, 28)``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifiers = nn.ModuleList(DigitClassifier() for _ in range(images.shape[0]))
        optimizer = torch.optim.Adam(classifiers.parameters(), lr=lr)
        n = images.shape[1]
        starts = [start for _ in range(epochs) for start in range(0, n, batch_size)]
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


@torch.no_grad()
def conditional_coherence(model, classifiers: nn.ModuleList, images: torch.Tensor, labels: torch.Tensor,
                          batch_size: int = 500) -> torch.Tensor:
    """``(M, M)`` matrix: entry ``[s, t]`` is the accuracy of classifying modality ``t`` generated from ``s`` alone."""
    was_training = model.training
    model.eval()
    classifiers.eval()
    m_count = model.num_modalities
    device = next(model.parameters()).device
    hits = torch.zeros(m_count, m_count)
    for start in range(0, images.shape[1], batch_size):
        x = (images[:, start:start + batch_size].float() / 255).transpose(0, 1).to(device)
        y = labels[start:start + batch_size].to(device)
        for s in range(m_count):
            present = torch.zeros(m_count, x.shape[0], dtype=torch.bool, device=device)
            present[s] = True
            mu, _ = model.posterior(x, present)
            for t, decoder in enumerate(model.decoders):
                generated = decoder(mu).clamp(0, 1)
                hits[s, t] += (classifiers[t].to(device)(generated).argmax(-1) == y).sum().cpu()
    model.train(was_training)
    return hits / images.shape[1]


def coherence_summary(matrix: torch.Tensor) -> dict:
    m = matrix.shape[0]
    off = ~torch.eye(m, dtype=torch.bool)
    return {"cross_modal": float(matrix[off].mean()) if m > 1 else float("nan"), "all": float(matrix.mean())}


def classifiers_for(config, train_data, progress=None) -> nn.ModuleList:
    """The digit classifiers for ``config``'s dataset, trained once and cached beside the data (atomically)."""
    cache = Path(config.data.root) / f".digit-classifiers-{train_data.num_modalities}m.pt"
    classifiers = nn.ModuleList(DigitClassifier() for _ in range(train_data.num_modalities))
    if cache.exists():
        classifiers.load_state_dict(torch.load(cache, weights_only=True))
        return classifiers.eval()
    classifiers = train_classifiers(train_data.images, train_data.labels, epochs=3, progress=progress)
    try:
        atomic_write(cache, lambda tmp: torch.save(classifiers.state_dict(), tmp))
    except OSError:  # a read-only data folder: keep the classifiers in memory only
        pass
    return classifiers


def evaluate_run(run_dir, config, model, progress=None) -> dict:
    """Classifier accuracy and conditional coherence on the test split; writes ``report.md`` in ``run_dir``."""
    from .train import load_dataset

    train_data, test_data = load_dataset(config, "train"), load_dataset(config, "test")
    classifiers = classifiers_for(config, train_data, progress)
    device = next(model.parameters()).device
    classifier_accuracy = accuracy(classifiers, test_data.images, test_data.labels)
    matrix = conditional_coherence(model, classifiers.to(device), test_data.images, test_data.labels)
    summary = coherence_summary(matrix)
    header = "| from \\ to | " + " | ".join(f"m{t}" for t in range(matrix.shape[0])) + " |"
    rows = [header, "|---" * (matrix.shape[0] + 1) + "|"]
    rows += [f"| m{s} | " + " | ".join(f"{v:.3f}" for v in matrix[s].tolist()) + " |" for s in range(matrix.shape[0])]
    text = "\n".join([
        f"# {config.name}", "",
        f"Model `{config.model.name}`, latent {config.model.latent_dim}, beta {config.model.beta}, dataset "
        f"`{config.data.dataset}` at `{config.data.root}`.", "",
        f"**Conditional coherence** (test split, one conditioning modality, posterior mean): cross-modal "
        f"{summary['cross_modal']:.3f}, including self-reconstruction {summary['all']:.3f} (chance 0.1).", "",
        *rows, "",
        "Digit classifiers (MoPoE architecture, eval mode), test accuracy per modality: "
        + ", ".join(f"{a:.3f}" for a in classifier_accuracy.tolist()) + ".", "",
        "![samples](samples.png)", ""])
    write_text(Path(run_dir) / "report.md", text)
    return {"coherence": matrix, **summary, "classifier_accuracy": classifier_accuracy}
