"""The classifiers that coherence reads generations with: one per modality, trained by the application on the
training split and cached beside the data with its test accuracy (see the conventions in ``evaluation``)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch import nn

from ..data import batches
from ..files import UnreadableFile, load_checked, remove_orphaned_temporaries, save_checked, sha256
from ..networks import make_networks
from .checks import check_not_empty

__all__ = ["CLASSIFIER_EPOCHS", "DigitClassifier", "EncoderClassifier", "accuracy", "classifier_input",
           "classifiers_for", "make_classifier", "train_classifiers"]

CLASSIFIER_EPOCHS = 5
#: stored rows per modality that the classifier cache's fingerprint of the data reads
_FINGERPRINT_ROWS = 64


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


def train_classifiers(data, epochs: int = CLASSIFIER_EPOCHS, batch_size: int = 128, lr: float = 3e-3, seed: int = 0,
                      progress=None) -> nn.ModuleList:
    """One classifier per modality of ``data`` for its labels (Adam, one-cycle learning rate peaking at ``lr``);
    returned in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only, the one forked (torch.manual_seed reseeded every CUDA device too, for good)
        torch.default_generator.manual_seed(seed)
        classifiers = nn.ModuleList(make_classifier(m, data.num_classes) for m in data.modalities)
        optimizer = torch.optim.Adam(classifiers.parameters(), lr=lr)
        total = epochs * math.ceil(len(data) / batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total)
        bar = progress(total=total, desc="digit classifiers", unit="batch") if progress else None
        for _ in range(epochs):
            for index, x in batches(data, batch_size, "cpu", shuffle=generator):
                y = data.labels[index]
                loss = sum(nn.functional.cross_entropy(c(x_m), y) for x_m, c in zip(x, classifiers))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the digit classifiers diverged: non-finite loss {loss.item()} at "
                                             f"step {schedule.last_epoch + 1} of {total} (lr {lr:g})")
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                if bar is not None:
                    bar.update()
        if bar is not None:
            bar.close()
    if not all(bool(torch.isfinite(w).all()) for w in classifiers.parameters()):
        raise FloatingPointError(f"the digit classifiers diverged: non-finite weights after training (lr {lr:g})")
    return classifiers.eval()


@torch.no_grad()
def accuracy(classifiers: nn.ModuleList, data, batch_size: int = 1000) -> torch.Tensor:
    """Per-modality accuracy of the classifiers on ``data`` (at least one tuple)."""
    check_not_empty(data)
    classifiers.eval()
    correct = torch.zeros(len(classifiers))
    for index, x in batches(data, batch_size, "cpu"):
        for m, classifier in enumerate(classifiers):
            correct[m] += (classifier(x[m]).argmax(-1) == data.labels[index]).sum()
    return correct / len(data)


def classifiers_for(root, dataset: str, train_data, test_data, progress=None) -> tuple[nn.ModuleList, list[float]]:
    """The digit classifiers for the dataset at ``root`` and their test accuracies, trained once and cached
    beside the data (atomically) with a fingerprint of the data they were trained and scored on (``_fingerprint``):
    a cache of other data is trained again."""
    m = train_data.num_modalities
    name = f".digit-classifiers-v3-{m}m.pt" if dataset == "polymnist" else f".digit-classifiers-{dataset}-v1.pt"
    cache = Path(root) / name
    classifiers = nn.ModuleList(make_classifier(modality, train_data.num_classes) for modality in train_data.modalities)
    remove_orphaned_temporaries(root, [name])  # of a process killed while writing the cache
    data = _fingerprint(train_data, test_data)
    if cache.exists():
        try:  # a truncated, corrupted or unsafe cache is trained again, and so is one trained on other data
            stored = load_checked(cache)
            if stored.get("data") != data:
                raise KeyError(f"trained on other data (fingerprint {stored.get('data')}, this data's {data})")
            classifiers.load_state_dict(stored["state"])
            return classifiers.eval(), list(stored["test_accuracy"])
        except (UnreadableFile, KeyError, TypeError, RuntimeError) as error:
            problem = str(error) if isinstance(error, UnreadableFile) else f"{cache} does not hold them ({error})"
            warnings.warn(f"{problem}; training the classifiers again", stacklevel=2)
    classifiers = train_classifiers(train_data, progress=progress)
    test_accuracy = accuracy(classifiers, test_data).tolist()
    try:
        save_checked(cache, {"state": classifiers.state_dict(), "test_accuracy": test_accuracy, "data": data})
    except OSError:  # a read-only data folder: keep the classifiers in memory only
        pass
    return classifiers, test_accuracy


def _fingerprint(*datasets) -> str:
    """What the classifier cache is keyed on besides its name: per dataset, each stored tensor's shape and evenly
    spaced rows of it, and the multiset of labels, so that files replaced at the same root (another build's seed,
    the original backgrounds) retrain the classifiers rather than score generations with stale ones, and shuffling
    or selecting tuples of the same stored tensors (the evaluation shuffles the test split by its seed) does not."""
    parts = []
    for data in datasets:
        for array in data.arrays:
            rows = torch.linspace(0, array.shape[0] - 1, min(_FINGERPRINT_ROWS, array.shape[0])).long()
            parts += [repr((tuple(array.shape), str(array.dtype))).encode(),
                      array[rows.to(array.device)].cpu().contiguous().numpy().tobytes()]
        labels, counts = torch.unique(data.labels.cpu().reshape(len(data), -1), dim=0, return_counts=True)
        parts += [labels.contiguous().numpy().tobytes(), counts.numpy().tobytes()]
    return sha256(b"".join(parts))
