"""Evaluation of the multimodal VAE application: classifiers and the conditional-coherence bookkeeping."""

import torch
from torch import nn

from applications.multimodal_vae.evaluation import (
    DigitClassifier,
    accuracy,
    coherence_summary,
    conditional_coherence,
)


def test_classifier_shape_and_eval_mode_is_deterministic():
    classifier = DigitClassifier()
    x = torch.rand(4, 3, 28, 28)
    assert classifier(x).shape == (4, 10)
    classifier.eval()
    assert torch.equal(classifier(x), classifier(x))  # dropout off


class PixelCode(nn.Module):
    """Reads the digit written as the brightest of ten pixels of row 0 (a stand-in classifier)."""

    def forward(self, x):
        return x[:, 0, 0, :10] * 10


class StubModel(nn.Module):
    """Posterior mean = one-hot digit read from the conditioning modality; modality 1 is 'broken' (reads nothing)."""

    num_modalities = 3

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.decoders = nn.ModuleList(DecodeCode() for _ in range(3))

    def posterior(self, x, present):
        source = int(present[:, 0].nonzero()[0])
        code = x[:, source, 0, 0, :10]
        if source == 1:
            code = torch.zeros_like(code)
            code[:, 0] = 1
        return code, torch.zeros_like(code)


class DecodeCode(nn.Module):
    def forward(self, mu):
        image = torch.zeros(mu.shape[0], 3, 28, 28)
        image[:, 0, 0, :10] = mu
        return image


def coded_images(labels, modalities=3):
    images = torch.zeros(modalities, len(labels), 3, 28, 28, dtype=torch.uint8)
    images[:, torch.arange(len(labels)), 0, 0, labels] = 255
    return images


def test_conditional_coherence_counts_source_target_pairs():
    labels = torch.arange(100) % 10
    images = coded_images(labels)
    classifiers = nn.ModuleList(PixelCode() for _ in range(3))
    assert torch.equal(accuracy(classifiers, images, labels), torch.ones(3))
    matrix = conditional_coherence(StubModel(), classifiers, images, labels, batch_size=30)
    assert torch.allclose(matrix[0], torch.ones(3)) and torch.allclose(matrix[2], torch.ones(3))
    assert torch.allclose(matrix[1], torch.full((3,), 0.1))  # the broken source always says 0
    summary = coherence_summary(matrix)
    assert abs(summary["cross_modal"] - (4 * 1 + 2 * 0.1) / 6) < 1e-6
    assert abs(summary["all"] - (6 + 0.3) / 9) < 1e-6
