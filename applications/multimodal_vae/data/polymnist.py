"""PolyMNIST: tuples of M images (3, 28, 28) sharing an MNIST digit, each on its own background.

PolyMNIST is read from either layout in circulation, detected from what is on disk:

* PNG tree: ``{root}/{split}/m{k}/{index}.{digit}.png`` (the original release, and this project's offline build,
  ``build_polymnist``);
* tensor files: ``{root}/{split}/m{k}.pt`` (``(N, 3, 28, 28)``, uint8 or float in [0, 1]) and ``labels.pt``.

A tuple is the files of one name ``{index}.{digit}.png`` across the modality folders (never the order of a
directory listing): the release numbers the images of each digit from 0, so the name, not the index, identifies
a tuple; every modality must hold the same names, and a difference (a missing file, or a digit that disagrees)
is an error naming the files. Tuples are ordered by index, then digit. Decoded PNG trees are cached next to the
images as one uint8 tensor file, rebuilt when a file is added, removed or rewritten (names, sizes and
modification times: ``core.source_listing``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from .core import LayoutError, Modality, MultimodalDataset, cached_tensors, load_tensor_file, read_rgb, source_listing

__all__ = ["PolyMNIST", "detect_layout", "polymnist_modalities", "read_png_tree", "read_tensor_files",
           "store_decoded_png_tree"]

_PNG_NAME = re.compile(r"^(\d+)\.(\d)\.png$", re.ASCII)  # (\d alone takes other scripts' digits too)


def _png_index(folder: Path) -> dict[tuple[int, int], str]:
    """``(index, digit) -> file name`` for the PNG files of one modality folder. The released PolyMNIST numbers the
    files of each digit from 0 (its generator writes ``m{k}/{i}.{digit}.png`` for the i-th image of that digit), so
    an index alone names up to ten files; the offline build numbers them once over all digits."""
    entries = {}
    for name in os.listdir(folder):
        match = _PNG_NAME.match(name)
        if match is None:
            if name.endswith(".png"):
                raise LayoutError(f"{folder / name}: PNG name not of the form '{{index}}.{{digit}}.png'")
            continue
        key = int(match.group(1)), int(match.group(2))
        if key in entries:  # 1.3.png and 01.3.png: one would be dropped, whichever the listing gave first
            raise LayoutError(f"{folder}: {entries[key]!r} and {name!r} are both image {key[0]} of digit {key[1]}")
        entries[key] = name
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
    """uint8 ``(M, N, 3, 28, 28)`` and labels ``(N,)`` from a PNG tree: a tuple is the files of one name
    ``{index}.{digit}.png`` in every modality folder, which must all hold the same names (``progress``: a tqdm-like
    wrapper for the decoding loop). Tuples are ordered by index, then digit."""
    folders = _modality_folders(split_dir, "png")
    indexes = [_png_index(folder) for folder in folders]
    reference = indexes[0]
    for folder, index in zip(folders[1:], indexes[1:]):
        if index.keys() != reference.keys():
            missing = [reference[k] for k in sorted(reference.keys() - index.keys())[:5]]
            extra = [index[k] for k in sorted(index.keys() - reference.keys())[:5]]
            raise LayoutError(f"{folder}: files differ from {folders[0]} (missing {missing}, extra {extra}): every "
                              "modality must hold the same {index}.{digit}.png names, one per tuple (a file whose "
                              "digit differs from the other modalities' is a label mismatch)")
    order = sorted(reference)
    if not order:  # (an empty dataset fails later, blaming the batch size or giving evaluations of nothing)
        raise LayoutError(f"{folders[0]}: no images named {{index}}.{{digit}}.png; the PNG tree is empty")
    images = torch.empty((len(folders), len(order), 3, 28, 28), dtype=torch.uint8)
    for m, folder in enumerate(folders):
        files = enumerate(indexes[m][key] for key in order)
        for n, name in progress(files, total=len(order), desc=f"decoding {split_dir.name}/{folder.name}",
                                unit="png") if progress else files:
            array = torch.from_numpy(np.asarray(read_rgb(folder / name)).copy())
            if array.shape != (28, 28, 3):
                raise LayoutError(f"{folder / name}: expected a 28x28 RGB image, got shape {tuple(array.shape)}")
            images[m, n] = array.permute(2, 0, 1)
    labels = torch.tensor([digit for _, digit in order], dtype=torch.long)
    return images, labels


#: how a PNG tree is decoded (the cache's key): version 2 pairs the files by their whole name, not by index alone
_PNG_RECIPE = "PolyMNIST PNG tree, tuples by {index}.{digit} name, v2"


def _png_listing(split_dir: Path) -> str:
    return source_listing(_PNG_RECIPE, split_dir, (f"{folder.name}/{name}" for folder in
                                                   _modality_folders(split_dir, "png")
                                                   for name in sorted(os.listdir(folder))))


def _cached_png_tree(split_dir: Path, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    def build():
        images, labels = read_png_tree(split_dir, progress)
        return {"images": images, "labels": labels}

    stored = cached_tensors(split_dir, "polymnist", _png_listing(split_dir), build)
    return stored["images"], stored["labels"]


def store_decoded_png_tree(split_dir: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Cache ``images`` uint8 ``(M, N, 3, 28, 28)`` and ``labels`` ``(N,)`` as the decoding of the PNG tree at
    ``split_dir``, which must have been written from exactly them (PNG is lossless): the offline builder saves the
    loader its first decoding."""
    cached_tensors(split_dir, "polymnist", _png_listing(split_dir), lambda: {"images": images, "labels": labels.long()})


def read_tensor_files(split_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    files = _modality_folders(split_dir, "pt")
    labels = load_tensor_file(split_dir / "labels.pt")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise LayoutError(f"{split_dir / 'labels.pt'}: expected integer digits, got {labels.dtype}")
    if labels.dim() != 1 and not (labels.dim() == 2 and labels.shape[1] == 1):  # (flattened, its count blamed
        # the first modality's file)
        raise LayoutError(f"{split_dir / 'labels.pt'}: expected one digit per tuple, shape (N,) or (N, 1), got "
                          f"{tuple(labels.shape)}")
    labels = labels.long().reshape(-1)
    if not labels.numel():
        raise LayoutError(f"{split_dir / 'labels.pt'}: holds no labels; the dataset is empty")
    if labels.min() < 0 or labels.max() > 9:
        raise LayoutError(f"{split_dir / 'labels.pt'}: digits must lie in 0..9, found {int(labels.min())}.."
                          f"{int(labels.max())}")
    modalities = []
    for path in files:
        tensor = load_tensor_file(path)
        if tensor.dim() != 4 or tuple(tensor.shape[1:]) != (3, 28, 28) or tensor.shape[0] != labels.shape[0]:
            raise LayoutError(f"{path}: expected shape ({labels.shape[0]}, 3, 28, 28) to match labels.pt, "
                              f"got {tuple(tensor.shape)}")
        # uint8 bytes, or floats in [0, 1] (as torchvision's ToTensor gives): floats of 0..255 would be clamped to
        # white, other integer types would reach the model as raw bytes
        if tensor.is_floating_point():
            if tensor.numel() and not bool(((tensor >= 0) & (tensor <= 1)).all()):
                raise LayoutError(f"{path}: float images must lie in [0, 1], found {float(tensor.min()):g}.."
                                  f"{float(tensor.max()):g} (store uint8 bytes, or divide by 255)")
            tensor = (tensor * 255).round().to(torch.uint8)
        elif tensor.dtype != torch.uint8:
            raise LayoutError(f"{path}: expected uint8 bytes or floats in [0, 1], got {tensor.dtype}")
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
        if num_modalities is not None:  # before the decoding, which takes minutes on a fresh PNG tree
            found = len(_modality_folders(split_dir, self.layout))
            if found != num_modalities:
                raise LayoutError(f"{split_dir} holds {found} modalities but num_modalities is {num_modalities}")
        images, labels = (_cached_png_tree(split_dir, progress) if self.layout == "png"
                          else read_tensor_files(split_dir))
        super().__init__(polymnist_modalities(images.shape[0]), images.unbind(0), labels, num_classes=10)
        self.images = images

    def to(self, device) -> "PolyMNIST":
        self.images = self.images.to(device)
        self.arrays = list(self.images.unbind(0))
        return self

    def __getitem__(self, index):
        return self.images[:, index].float() / 255, self.labels[index]
