"""Datasets of the multimodal VAE application, and the missing-modality mask.

Every dataset is a ``MultimodalDataset``: a description of each modality (``Modality``: an image ``(C, H, W)`` or
a token sequence ``(L,)`` over a vocabulary), one stored tensor per modality (uint8 images, int64 tokens) and the
labels; ``gather(index)`` returns a batch as one model input per modality (images as floats in [0, 1]). Modalities
have their own shapes, so a batch is a list, not one stacked tensor. The other datasets (MNIST-SVHN-Text, bimodal
CelebA, CUB image-captions) live in their own modules; ``load`` picks one by name.

PolyMNIST is read from either layout in circulation, detected from what is on disk:

* PNG tree: ``{root}/{split}/m{k}/{index}.{digit}.png`` (the original release, and this project's offline build);
* tensor files: ``{root}/{split}/m{k}.pt`` (``(N, 3, 28, 28)``, uint8 or float in [0, 1]) and ``labels.pt``.

PNG files are paired by their integer index after sorting (never by the order of a directory listing), and the
digit in every file name must agree across modalities; a mismatch is an error naming the files. Decoded PNG
trees are cached next to the images as one uint8 tensor file (rebuilt if the file list changes).
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..files import UnreadableFile, load_checked, remove_orphaned_temporaries, save_checked

_PNG_NAME = re.compile(r"^(\d+)\.(\d)\.png$")


class LayoutError(ValueError):
    """A dataset folder that is not in the layout the loader expects."""


@dataclass(frozen=True)
class Modality:
    """One modality: ``shape`` ``(C, H, W)`` for an image; ``(L,)`` for a token sequence with ``vocabulary_size``
    tokens (``vocabulary``: their strings, to render text)."""

    name: str
    shape: tuple[int, ...]
    vocabulary: tuple[str, ...] | None = None

    @property
    def is_text(self) -> bool:
        return self.vocabulary is not None

    @property
    def size(self) -> int:
        """Its data dimension, a text as its one-hot array (as MoPoE counts it for reconstruction weights)."""
        size = 1
        for n in self.shape:
            size *= n
        return size * (len(self.vocabulary) if self.is_text else 1)


def reconstruction_weights(modalities) -> torch.Tensor:
    """Likelihood weights by relative dimensionality: the largest modality gets 1 and every other one
    ``largest size / its size`` (MoPoE's ``rec_weights``), so each modality counts as much as the largest."""
    sizes = torch.tensor([float(m.size) for m in modalities])
    return sizes.max() / sizes


class MultimodalDataset(Dataset):
    """Aligned tuples of modalities.

    Args:
        modalities: a ``Modality`` per modality.
        arrays: a stored tensor per modality, uint8 images ``(N_m, C, H, W)`` or int64 tokens ``(N_m, L)``.
        labels: ``(N, ...)``, one per tuple.
        rows: per modality, ``None`` (row ``i`` of tuple ``i``) or an int64 ``(N,)`` map from tuple to stored row
            (CUB: ten captions share an image).
        num_classes: when ``labels`` is one class per tuple shared by every modality (a digit), the number of
            classes; what coherence and the latent probe need. ``None`` otherwise (CelebA's attributes, CUB).
    """

    def __init__(self, modalities, arrays, labels: torch.Tensor, rows=None, num_classes: int | None = None):
        self.modalities = tuple(modalities)
        self.num_classes = num_classes
        self.arrays = list(arrays)
        self.labels = labels
        self.rows = list(rows) if rows is not None else [None] * len(self.arrays)
        if not len(self.modalities) == len(self.arrays) == len(self.rows):
            raise ValueError(f"{len(self.modalities)} modalities, {len(self.arrays)} arrays and {len(self.rows)} row "
                             "maps; they must pair up")

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device) -> "MultimodalDataset":
        """The stored tensors moved to ``device`` (in place; batches are then gathered there)."""
        self.arrays = [a.to(device) for a in self.arrays]
        self.rows = [None if r is None else r.to(device) for r in self.rows]
        return self

    def gather(self, index: torch.Tensor) -> list[torch.Tensor]:
        """The model inputs of tuples ``index``: float images in [0, 1], int64 tokens."""
        batch = []
        for array, rows in zip(self.arrays, self.rows):
            values = array[index if rows is None else rows[index.to(rows.device)]]
            batch.append(values.float() / 255 if values.dtype == torch.uint8 else values)
        return batch

    def __getitem__(self, index):
        return [x[0] for x in self.gather(torch.tensor([index]))], self.labels[index]

    def select(self, index: torch.Tensor) -> "MultimodalDataset":
        """The tuples ``index`` as a dataset sharing the stored tensors (no copy)."""
        index = torch.as_tensor(index, dtype=torch.long)
        rows = [index.to(a.device) if r is None else r[index.to(r.device)] for a, r in zip(self.arrays, self.rows)]
        return MultimodalDataset(self.modalities, self.arrays, self.labels[index.to(self.labels.device)], rows,
                                 self.num_classes)

    def head(self, n: int) -> "MultimodalDataset":
        return self.select(torch.arange(min(n, len(self))))


def _png_index(folder: Path) -> dict[int, tuple[int, str]]:
    """``index -> (digit, file name)`` for the PNG files of one modality folder."""
    entries = {}
    for name in os.listdir(folder):
        match = _PNG_NAME.match(name)
        if match is None:
            if name.endswith(".png"):
                raise LayoutError(f"{folder / name}: PNG name not of the form '{{index}}.{{digit}}.png'")
            continue
        entries[int(match.group(1))] = (int(match.group(2)), name)
    return entries


def _modality_folders(split_dir: Path, kind: str) -> list[Path]:
    found = sorted((p for p in split_dir.glob("m*") if re.fullmatch(r"m\d+" + (r"\.pt" if kind == "pt" else ""), p.name)),
                   key=lambda p: int(re.sub(r"\D", "", p.stem)))
    expected = [split_dir / (f"m{k}.pt" if kind == "pt" else f"m{k}") for k in range(len(found))]
    if found != expected:
        raise LayoutError(f"{split_dir}: modality entries must be numbered m0, m1, ... without gaps, found "
                          f"{[p.name for p in found]}")
    return found


def detect_layout(root: Path, split: str) -> str:
    """``"png"`` or ``"pt"``; a ``LayoutError`` saying what was expected and what was found otherwise."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        found = sorted(p.name for p in Path(root).iterdir()) if Path(root).is_dir() else "nothing (no such folder)"
        raise LayoutError(f"PolyMNIST: expected a folder {split_dir} holding m0/ ... (PNG layout) or m0.pt ... and "
                          f"labels.pt (tensor layout); {root} contains {found}")
    if (split_dir / "m0").is_dir():
        return "png"
    if (split_dir / "m0.pt").is_file() and (split_dir / "labels.pt").is_file():
        return "pt"
    raise LayoutError(f"PolyMNIST: {split_dir} has neither m0/ (PNG layout: m{{k}}/{{index}}.{{digit}}.png) nor "
                      f"m0.pt + labels.pt (tensor layout); it contains {sorted(p.name for p in split_dir.iterdir())}")


def read_png_tree(split_dir: Path, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``(M, N, 3, 28, 28)`` and labels ``(N,)`` from a PNG tree, paired by sorted index (``progress``: a
    tqdm-like wrapper for the decoding loop)."""
    from PIL import Image

    folders = _modality_folders(split_dir, "png")
    indexes = [_png_index(folder) for folder in folders]
    reference = indexes[0]
    for folder, index in zip(folders[1:], indexes[1:]):
        if index.keys() != reference.keys():
            missing = sorted(reference.keys() - index.keys())[:5]
            extra = sorted(index.keys() - reference.keys())[:5]
            raise LayoutError(f"{folder}: indices differ from {folders[0]} (missing {missing}, extra {extra})")
        for i, (digit, name) in index.items():
            if digit != reference[i][0]:
                raise LayoutError(f"label mismatch at index {i}: {folders[0] / reference[i][1]} says digit "
                                  f"{reference[i][0]} but {folder / name} says {digit}")
    order = sorted(reference)
    names = [[index[i][1] for i in order] for index in indexes]
    images = torch.empty((len(folders), len(order), 3, 28, 28), dtype=torch.uint8)
    for m, folder in enumerate(folders):
        files = enumerate(names[m])
        for n, name in progress(files, total=len(order), desc=f"decoding {split_dir.name}/{folder.name}",
                                unit="png") if progress else files:
            array = torch.from_numpy(np.asarray(Image.open(folder / name).convert("RGB")).copy())
            if array.shape != (28, 28, 3):
                raise LayoutError(f"{folder / name}: expected a 28x28 RGB image, got shape {tuple(array.shape)}")
            images[m, n] = array.permute(2, 0, 1)
    labels = torch.tensor([reference[i][0] for i in order], dtype=torch.long)
    return images, labels


def cached_tensors(folder: Path, listing: str, build) -> dict:
    """``build()`` (a dict of tensors) cached in ``folder`` as ``.decoded-<hash of listing>.pt``, written atomically
    with its SHA-256; a changed ``listing`` (the source files) rebuilds it, and so does a cache that is truncated,
    corrupted or holds more than tensors (with a warning naming it); a read-only folder goes without the cache."""
    cache = Path(folder) / f".decoded-{hashlib.sha256(listing.encode()).hexdigest()[:16]}.pt"
    remove_orphaned_temporaries(folder, [cache.name])  # of a process killed while writing it
    if cache.exists():
        try:
            stored = load_checked(cache)
            if stored and all(isinstance(v, torch.Tensor) for v in stored.values()):
                return stored
            problem = f"{cache} holds {sorted(stored)}, not a dict of tensors"
        except UnreadableFile as error:
            problem = str(error)
        warnings.warn(f"{problem}; rebuilding it", stacklevel=2)
    tensors = build()
    try:
        save_checked(cache, tensors)
    except OSError:
        pass
    return tensors


def decode_images(paths, size: int, crop: int | None = None, progress=None, desc: str = "decoding",
                  listed_in: str = "the file list") -> torch.Tensor:
    """uint8 ``(N, 3, size, size)`` from image files: RGB, optionally a centred ``crop x crop`` square first, then a
    bilinear resize. A missing file is a ``LayoutError`` naming it and the list (``listed_in``) it came from."""
    from PIL import Image

    images = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    for k, path in enumerate(progress(paths, desc=desc, unit="image") if progress else paths):
        if not Path(path).is_file():
            raise LayoutError(f"{path} is listed in {listed_in} but missing")
        image = Image.open(path).convert("RGB")
        if crop is not None:
            left, top = (image.width - crop) // 2, (image.height - crop) // 2
            image = image.crop((left, top, left + crop, top + crop))
        image = image.resize((size, size), Image.BILINEAR)
        images[k] = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    return images


def _png_listing(split_dir: Path) -> str:
    return "\n".join(f"{folder.name}/{name}" for folder in _modality_folders(split_dir, "png")
                     for name in sorted(os.listdir(folder)))


def _cached_png_tree(split_dir: Path, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    def build():
        images, labels = read_png_tree(split_dir, progress)
        return {"images": images, "labels": labels}

    stored = cached_tensors(split_dir, _png_listing(split_dir), build)
    return stored["images"], stored["labels"]


def store_decoded_png_tree(split_dir: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Cache ``images`` uint8 ``(M, N, 3, 28, 28)`` and ``labels`` ``(N,)`` as the decoding of the PNG tree at
    ``split_dir``, which must have been written from exactly them (PNG is lossless): the offline builder saves the
    loader its first decoding."""
    cached_tensors(split_dir, _png_listing(split_dir), lambda: {"images": images, "labels": labels.long()})


def read_tensor_files(split_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    files = _modality_folders(split_dir, "pt")
    labels = torch.load(split_dir / "labels.pt", weights_only=True).long().reshape(-1)
    modalities = []
    for path in files:
        tensor = torch.load(path, weights_only=True)
        if tensor.dim() != 4 or tuple(tensor.shape[1:]) != (3, 28, 28) or tensor.shape[0] != labels.shape[0]:
            raise LayoutError(f"{path}: expected shape ({labels.shape[0]}, 3, 28, 28) to match labels.pt, "
                              f"got {tuple(tensor.shape)}")
        if tensor.is_floating_point():
            tensor = (tensor.clamp(0, 1) * 255).round().to(torch.uint8)
        modalities.append(tensor)
    return torch.stack(modalities), labels


def polymnist_modalities(num_modalities: int) -> list[Modality]:
    return [Modality(f"m{k}", (3, 28, 28)) for k in range(num_modalities)]


class PolyMNIST(MultimodalDataset):
    """PolyMNIST tuples of ``M`` images ``(3, 28, 28)`` sharing a digit; ``images`` holds all of them as uint8
    ``(M, N, 3, 28, 28)``; an item is ``(images, label)`` with ``images`` a float tensor ``(M, 3, 28, 28)`` in [0, 1].

    Args:
        root: folder holding ``train/`` and ``test/`` in either layout.
        split: ``"train"`` or ``"test"``.
        num_modalities: if given, must equal the number of modalities on disk.
        progress: a tqdm-like wrapper showing the first decoding of a PNG tree (later loads hit the cache).
    """

    def __init__(self, root, split: str = "train", num_modalities: int | None = None, progress=None):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.root = Path(root)
        self.layout = detect_layout(self.root, split)
        split_dir = self.root / split
        images, labels = (_cached_png_tree(split_dir, progress) if self.layout == "png"
                          else read_tensor_files(split_dir))
        if num_modalities is not None and images.shape[0] != num_modalities:
            raise LayoutError(f"{split_dir} holds {images.shape[0]} modalities but the model expects "
                              f"{num_modalities}")
        super().__init__(polymnist_modalities(images.shape[0]), images.unbind(0), labels, num_classes=10)
        self.images = images

    def to(self, device) -> "PolyMNIST":
        self.images = self.images.to(device)
        self.arrays = list(self.images.unbind(0))
        return self

    def __getitem__(self, index):
        return self.images[:, index].float() / 255, self.labels[index]


#: dataset name -> (module, class) of its loader
DATASETS = {"polymnist": ("core", "PolyMNIST"), "mnist_svhn_text": ("mnist_svhn_text", "MNISTSVHNText"),
            "celeba": ("celeba", "CelebA"), "cub": ("cub", "CUB")}


def open_dataset(name: str, root, split: str, progress=None) -> MultimodalDataset:
    """The ``split`` of dataset ``name`` (a key of ``DATASETS``) read from ``root``."""
    import importlib

    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    module, cls = DATASETS[name]
    loader = getattr(importlib.import_module(f"{__package__}.{module}"), cls)
    return loader(root, split) if name == "mnist_svhn_text" else loader(root, split, progress=progress)


def modality_mask(batch_size: int, num_modalities: int, drop_rate: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean ``(num_modalities, batch_size)`` mask of present modalities: each modality is dropped with
    probability ``drop_rate``, independently, but every sample keeps at least one (chosen uniformly)."""
    if not 0 <= drop_rate < 1:
        raise ValueError(f"drop_rate must lie in [0, 1), got {drop_rate!r}")
    present = torch.rand(num_modalities, batch_size, generator=generator) >= drop_rate
    keep = torch.randint(num_modalities, (batch_size,), generator=generator)
    present[keep, torch.arange(batch_size)] = True
    return present
