"""The generic dataset machinery of the multimodal VAE application, the missing-modality mask and subsets.

Every dataset is a ``MultimodalDataset``: a description of each modality (``Modality``: an image ``(C, H, W)`` or
a token sequence ``(L,)`` over a vocabulary), one stored tensor per modality (uint8 images, int64 tokens) and the
labels; ``gather(index)`` returns a batch as one model input per modality (images as floats in [0, 1]). Modalities
have their own shapes, so a batch is a list, not one stacked tensor. Decoded image files are cached next to them as
one uint8 tensor file (``cached_tensors``, rebuilt if the file list changes).
"""

from __future__ import annotations

import hashlib
import numbers
import operator
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

import opinionpool.functional as opf

from ..files import UnreadableFile, load_checked, remove_orphaned_temporaries, save_checked

__all__ = ["LayoutError", "load_tensor_file", "Modality", "MultimodalDataset", "batches", "cached_tensors", "decode_images",
           "modality_mask", "read_rgb", "reconstruction_weights", "source_listing", "subset_mask", "subset_tuples"]


class LayoutError(ValueError):
    """A dataset folder that is not in the layout the loader expects."""


def load_tensor_file(path: Path) -> torch.Tensor:
    """The tensor a user's ``.pt`` file holds (``weights_only``: loading runs no code), or a ``LayoutError`` naming
    the file where it cannot be read or holds something else (a list gave an ``AttributeError`` naming nothing)."""
    try:
        value = torch.load(path, weights_only=True)
    except Exception as error:  # (torch raises RuntimeError, pickle's UnpicklingError, EOFError, ...)
        first_line = (str(error).splitlines() or [""])[0]  # (torch's refusals run to a page)
        raise LayoutError(f"{path}: not a readable tensor file ({type(error).__name__}: {first_line})") from error
    if not isinstance(value, torch.Tensor):
        raise LayoutError(f"{path}: expected a tensor, got a {type(value).__name__}")
    return value


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
        """Its data dimension for the reconstruction weights: the number of pixel values of an image, of tokens of
        a text (MoPoE's text modalities have ``data_size = [len_sequence]``, MMVAE+'s captions ``maxSentLen``), not
        of its one-hot array."""
        size = 1
        for n in self.shape:
            size *= n
        return size


def reconstruction_weights(modalities) -> torch.Tensor:
    """Likelihood weights by relative dimensionality, as the HELVAE paper states its setting (appendix B: "the
    dominant modality is fixed to 1.0 and the others are scaled proportionally to their data dimensions"): the
    largest modality gets 1 and every other one ``largest size / its size``, so each counts as much as the largest.
    On MNIST-SVHN-Text these are MoPoE's ``rec_weights``; on CelebA MoPoE divides them all by 3 (its reference is
    one image channel), on CUB MMVAE+ gives the captions 5 times more (``llik_scaling_sent``)."""
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

    #: the number of modalities every copy of the dataset has, or ``None`` where it is read from the files
    NUM_MODALITIES: int | None = None

    def __init__(self, modalities, arrays, labels: torch.Tensor, rows=None, num_classes: int | None = None):
        self.modalities = tuple(modalities)
        self.num_classes = num_classes
        self.arrays = list(arrays)
        self.labels = labels
        self.rows = list(rows) if rows is not None else [None] * len(self.arrays)
        if not len(self.modalities) == len(self.arrays) == len(self.rows):
            raise ValueError(f"{len(self.modalities)} modalities, {len(self.arrays)} arrays and {len(self.rows)} row "
                             "maps; they must pair up")
        for modality, array, rows in zip(self.modalities, self.arrays, self.rows):
            # (a short array surfaced as an IndexError in the middle of training, at the first batch that reached it)
            count, what = (array.shape[0], "rows") if rows is None else (rows.shape[0], "entries in its row map")
            if count != labels.shape[0]:
                raise ValueError(f"modality {getattr(modality, 'name', modality)!r} has {count} {what} for "
                                 f"{labels.shape[0]} labels; each tuple needs one")

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
        """The tuples ``index`` (integer positions) as a dataset sharing the stored tensors (no copy)."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool or index.is_floating_point():  # a mask would become positions 0 and 1
            raise TypeError(f"index must hold integer positions, got {index.dtype} (for a mask, pass "
                            "mask.nonzero().squeeze(-1))")
        index = index.long()
        rows = [index.to(a.device) if r is None else r[index.to(r.device)] for a, r in zip(self.arrays, self.rows)]
        return MultimodalDataset(self.modalities, self.arrays, self.labels[index.to(self.labels.device)], rows,
                                 self.num_classes)

    def head(self, n: int) -> "MultimodalDataset":
        """The first ``n`` tuples (all where there are fewer)."""
        _check_size(n)
        return self.select(torch.arange(min(n, len(self))))

    def choose(self, n: int, seed: int = 0) -> "MultimodalDataset":
        """``n`` tuples (all where there are fewer) chosen at random by ``seed``, in stored order: a spread of the
        data where the first ``n`` would not be one (MNIST-SVHN-Text's pairs and CUB's captions are stored class by
        class, so their first tuples are all of the first class)."""
        _check_size(n)
        if n >= len(self):
            return self
        chosen = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return self.select(chosen.sort().values)


def read_rgb(path):
    """The image file at ``path`` decoded to RGB (a PIL image); a file PIL cannot decode (cut short by an interrupted
    copy: "image file is truncated", without the path) is a ``LayoutError`` naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:  # (PIL's UnidentifiedImageError is one)
        raise LayoutError(f"{path}: cannot decode the image ({error})") from None


def source_listing(recipe: str, root: Path, names) -> str:
    """What a decoded cache is keyed on: ``recipe`` (how the files are decoded, with a version) and every source
    file's name (relative to ``root``), size and modification time, so that a changed recipe or a rewritten file
    rebuilds the cache (a missing file is listed as such: the decoding names it)."""
    lines = [recipe]
    for name in names:
        try:
            stat = os.stat(Path(root) / name)
            lines.append(f"{name} {stat.st_size} {stat.st_mtime_ns}")
        except FileNotFoundError:
            lines.append(f"{name} missing")
    return "\n".join(lines)


def cached_tensors(folder: Path, key: str, listing: str, build) -> dict:
    """``build()`` (a dict of tensors) cached in ``folder`` as ``.decoded-<key>-<hash of listing>.pt``, written
    atomically with its SHA-256; a changed ``listing`` (``source_listing``) rebuilds it, and so does a cache that is
    truncated, corrupted or holds more than tensors (with a warning naming it); a read-only folder goes without the
    cache. ``key`` (letters, digits, ``_``) names what is cached, one cache per key and folder: the caches of the
    key's earlier listings are removed (a rewritten tree would otherwise leave a copy of itself per listing), and so
    are those named before keys were added (``.decoded-<hash>.pt``), which nothing reads."""
    if not re.fullmatch(r"\w+", key, re.ASCII):
        raise ValueError(f"key must be letters, digits and '_', got {key!r}")
    cache = Path(folder) / f".decoded-{key}-{hashlib.sha256(listing.encode()).hexdigest()[:16]}.pt"
    remove_orphaned_temporaries(folder, [cache.name])  # of a process killed while writing it
    if cache.exists():
        try:
            stored = load_checked(cache)
            if stored and all(isinstance(v, torch.Tensor) for v in stored.values()):
                _remove_stale_caches(folder, key, cache)
                return stored
            problem = f"{cache} holds {sorted(stored)}, not a dict of tensors"
        except UnreadableFile as error:
            problem = str(error)
        warnings.warn(f"{problem}; rebuilding it", stacklevel=2)
    tensors = build()
    try:
        save_checked(cache, tensors)
    except OSError:
        return tensors
    _remove_stale_caches(folder, key, cache)
    return tensors


def _remove_stale_caches(folder: Path, key: str, current: Path) -> None:
    stale = re.compile(rf"\.decoded-({re.escape(key)}-)?[0-9a-f]{{16}}\.pt")
    for path in Path(folder).glob(".decoded-*.pt"):
        if path != current and stale.fullmatch(path.name):
            try:
                path.unlink()
            except FileNotFoundError:  # another process removed it first
                continue
            except OSError:  # a read-only folder keeps them
                return


def decode_images(paths, size: int, crop: int | None = None, progress=None, desc: str = "decoding",
                  listed_in: str = "the file list", resample: str = "bilinear") -> torch.Tensor:
    """uint8 ``(N, 3, size, size)`` from image files: RGB, optionally a centred ``crop x crop`` square first, then a
    resize by PIL's ``resample`` filter (``"bilinear"``, torchvision's ``Resize`` default, or ``"bicubic"``). A
    missing file is a ``LayoutError`` naming it and the list (``listed_in``) it came from."""
    from PIL import Image

    images = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    for k, path in enumerate(progress(paths, desc=desc, unit="image") if progress else paths):
        if not Path(path).is_file():
            raise LayoutError(f"{path} is listed in {listed_in} but missing")
        image = read_rgb(path)
        if crop is not None:
            left, top = (image.width - crop) // 2, (image.height - crop) // 2
            image = image.crop((left, top, left + crop, top + crop))
        image = image.resize((size, size), {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[resample])
        images[k] = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    return images


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


def _check_size(n) -> None:
    """A number of tuples: a non-negative integer (a negative one took all but the last tuples, or raised an
    unrelated error)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be a non-negative integer (a number of tuples), got {n!r}")


def subset_tuples(num_modalities: int) -> list[tuple[int, ...]]:
    """Non-empty subsets of the modalities as tuples of indices, in ``opinionpool.functional.all_subsets``'s order
    (by size, then lexicographically; that function returns them as a boolean mask)."""
    return [tuple(row.nonzero().squeeze(-1).tolist()) for row in opf.all_subsets(num_modalities)]


def subset_mask(subset, num_modalities: int, batch: int, device=None) -> torch.Tensor:
    """Boolean ``(num_modalities, batch)`` mask of present modalities: those of ``subset`` (a non-empty collection of
    distinct indices in ``[0, num_modalities)``) in every sample."""
    subset = list(subset)
    indices = [_modality_index(t) for t in subset]
    if not indices or None in indices or len(set(indices)) != len(indices) or any(
            not 0 <= t < num_modalities for t in indices):
        # (a negative index marked the last modalities, an empty subset no modality at all, 1.5 modality 1)
        raise ValueError(f"subset must hold distinct modality indices in [0, {num_modalities}), got {subset}")
    present = torch.zeros(num_modalities, batch, dtype=torch.bool, device=device)
    present[indices] = True
    return present


def _modality_index(value) -> int | None:
    """``value`` as an integer index (a Python or NumPy integer, a 0-d integer tensor); ``None`` for anything else
    (a float, a boolean)."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def batches(data, batch_size: int, device, shuffle: torch.Generator | None = None):
    """``(index, x)`` for consecutive (or, with ``shuffle``, random) batches of ``data``; ``x`` on ``device``."""
    if batch_size < 1:  # a negative size gave no batch at all
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    order = torch.randperm(len(data), generator=shuffle) if shuffle is not None else torch.arange(len(data))
    for start in range(0, len(data), batch_size):
        index = order[start:start + batch_size]
        yield index, [x.to(device) for x in data.gather(index)]
