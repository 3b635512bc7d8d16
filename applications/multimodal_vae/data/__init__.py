"""Datasets of the multimodal VAE application: the generic machinery (``core``: ``Modality``,
``MultimodalDataset``, caches, the missing-modality mask), one module per dataset (``polymnist``,
``mnist_svhn_text``, ``celeba``, ``cub``; ``text`` tokenises their texts), the offline PolyMNIST builder
(``build_polymnist``), ``DATASETS`` (the loader of each dataset by name) and ``load_dataset`` (a configuration's
dataset); subsets of modalities as tuples (``subset_tuples``) and masks (``subset_mask``, ``modality_mask``)."""

from __future__ import annotations

from pathlib import Path

from .celeba import CelebA
from .core import (
    LayoutError,
    Modality,
    MultimodalDataset,
    batches,
    cached_tensors,
    decode_images,
    modality_mask,
    reconstruction_weights,
    subset_mask,
    subset_tuples,
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
           "PolyMNIST", "batches", "cached_tensors", "decode_images", "detect_layout", "load_dataset", "modality_mask",
           "open_dataset", "polymnist_modalities", "read_png_tree", "read_tensor_files", "reconstruction_weights",
           "store_decoded_png_tree", "subset_mask", "subset_tuples"]

#: dataset name -> its loader, a ``MultimodalDataset`` class taking ``(root, split)``
DATASETS = {"polymnist": PolyMNIST, "mnist_svhn_text": MNISTSVHNText, "celeba": CelebA, "cub": CUB}


def open_dataset(name: str, root, split: str, progress=None, num_modalities: int | None = None) -> MultimodalDataset:
    """The ``split`` of dataset ``name`` (a key of ``DATASETS``) read from ``root``; ``num_modalities``, where
    given, is checked before anything is read or decoded."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    loader = DATASETS[name]
    fixed = loader.NUM_MODALITIES
    if num_modalities is not None and fixed is not None and num_modalities != fixed:
        raise ValueError(f"{name} has {fixed} modalities, not num_modalities = {num_modalities}")
    if loader is PolyMNIST:
        return loader(root, split, num_modalities=num_modalities, progress=progress)
    # MNIST-SVHN-Text decodes nothing, so it takes no progress bar
    return loader(root, split) if loader is MNISTSVHNText else loader(root, split, progress=progress)


def load_dataset(config, split: str = "train") -> MultimodalDataset:
    """``config.data.dataset``'s ``split`` (``config``: the application's ``Config``); the offline PolyMNIST is
    built first when asked and ``data.root`` is missing or an empty folder."""
    from tqdm import tqdm

    root = Path(config.data.root)
    if config.data.dataset not in DATASETS:
        raise ValueError(f"data.dataset must be one of {sorted(DATASETS)}, got {config.data.dataset!r}")
    if config.data.dataset == "polymnist" and config.data.build_offline and \
            (not root.exists() or (root.is_dir() and not any(root.iterdir()))):
        # imported here, not at the top: `python -m ...data.build_polymnist` would otherwise find it loaded
        from .build_polymnist import build

        build(root, progress=tqdm)
    return open_dataset(config.data.dataset, root, split, progress=tqdm, num_modalities=config.data.num_modalities)
