"""Datasets of the multimodal VAE application: the generic machinery (``core``: ``Modality``,
``MultimodalDataset``, caches, the missing-modality mask), one module per dataset (``polymnist``,
``mnist_svhn_text``, ``celeba``, ``cub``; ``text`` tokenises their texts), the offline PolyMNIST builder
(``build_polymnist``), and ``DATASETS``, the loader of each dataset by name."""

from __future__ import annotations

from .celeba import CelebA
from .core import (
    LayoutError,
    Modality,
    MultimodalDataset,
    cached_tensors,
    decode_images,
    modality_mask,
    reconstruction_weights,
)
from .cub import CUB
from .mnist_svhn_text import MNISTSVHNText
from .polymnist import (
    PolyMNIST,
    detect_layout,
    polymnist_modalities,
    read_png_tree,
    read_tensor_files,
    store_decoded_png_tree,
)

__all__ = ["CUB", "DATASETS", "CelebA", "LayoutError", "MNISTSVHNText", "Modality", "MultimodalDataset",
           "PolyMNIST", "cached_tensors", "decode_images", "detect_layout", "modality_mask", "open_dataset",
           "polymnist_modalities", "read_png_tree", "read_tensor_files", "reconstruction_weights",
           "store_decoded_png_tree"]

#: dataset name -> its loader, a ``MultimodalDataset`` class taking ``(root, split)``
DATASETS = {"polymnist": PolyMNIST, "mnist_svhn_text": MNISTSVHNText, "celeba": CelebA, "cub": CUB}


def open_dataset(name: str, root, split: str, progress=None) -> MultimodalDataset:
    """The ``split`` of dataset ``name`` (a key of ``DATASETS``) read from ``root``."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    loader = DATASETS[name]
    # MNIST-SVHN-Text decodes nothing, so it takes no progress bar
    return loader(root, split) if loader is MNISTSVHNText else loader(root, split, progress=progress)
