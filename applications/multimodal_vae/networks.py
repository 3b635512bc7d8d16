"""Encoders and decoders, one pair per modality type.

PolyMNIST: the convolutional nets of the MoPoE code (conv 3->32->64->128, kernel 3, stride 2, padding 1, so
28->14->7->4; flatten 2048 -> linear 512 -> ReLU -> linear heads for the mean and the log-variance), and the
mirrored decoder with transposed convolutions whose raw output is the Laplace location.
"""

from __future__ import annotations

import torch
from torch import nn


class PolyMNISTEncoder(nn.Module):
    """``(B, 3, 28, 28)`` -> ``(mu, logvar)``, each ``(B, latent_dim)``."""

    def __init__(self, latent_dim: int, hidden: int = 512):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(128 * 4 * 4, hidden), nn.ReLU(),
        )
        self.mean = nn.Linear(hidden, latent_dim)
        self.logvar = nn.Linear(hidden, latent_dim)

    def forward(self, x: torch.Tensor):
        h = self.features(x)
        return self.mean(h), self.logvar(h)


class PolyMNISTDecoder(nn.Module):
    """``(..., latent_dim)`` -> Laplace locations ``(..., 3, 28, 28)`` (raw, unbounded, as in the MoPoE code)."""

    def __init__(self, latent_dim: int, hidden: int = 512):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, 128 * 4 * 4), nn.ReLU())
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1), nn.ReLU(),  # 4 -> 7
            nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),  # 7 -> 14
            nn.ConvTranspose2d(32, 3, 3, stride=2, padding=1, output_padding=1),  # 14 -> 28
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        h = self.project(z.reshape(-1, z.shape[-1])).reshape(-1, 128, 4, 4)
        return self.deconv(h).reshape(lead + (3, 28, 28))


NETWORKS = {"polymnist": (PolyMNISTEncoder, PolyMNISTDecoder)}


def make_networks(dataset: str, num_modalities: int, latent_dim: int):
    """``(encoders, decoders)`` as ``nn.ModuleList`` s for ``dataset``."""
    if dataset not in NETWORKS:
        raise ValueError(f"no networks for dataset {dataset!r}; known: {sorted(NETWORKS)}")
    encoder, decoder = NETWORKS[dataset]
    return (nn.ModuleList(encoder(latent_dim) for _ in range(num_modalities)),
            nn.ModuleList(decoder(latent_dim) for _ in range(num_modalities)))
