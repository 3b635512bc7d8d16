"""MNIST-SVHN-Text (MMVAE's MNIST-SVHN pairs with MoPoE's text modality), from the files as released:

    {root}/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]   (MNIST as torchvision downloads it)
    {root}/SVHN/{train,test}_32x32.mat                                     (SVHN cropped digits)
    {root}/{train,test}-ms-{mnist,svhn}-idx.pt                             (MMVAE's pairing indices)

Tuple ``i`` is MNIST image ``mnist_idx[i]``, SVHN image ``svhn_idx[i]`` and the digit's English name as characters
(length 8) starting at a random position, as in the MoPoE code; the position is drawn once per tuple from a seeded
generator (MoPoE redraws it on every access). The pairing files must pair equal digits: a mismatch is an error
naming the file and the first offending tuples. Modalities: ``mnist`` (1, 28, 28), ``svhn`` (3, 32, 32), ``text``.
MMVAE's pairing files hold 30 pairs per example (its ``make-mnist-svhn-idx.py``, ``dm = 30``); MoPoE draws its own
with 20 (``data_multiplications``), so an epoch here is 1.5 of MoPoE's.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from .core import LayoutError, Modality, MultimodalDataset, load_tensor_file
from .text import ALPHABET, encode_characters

__all__ = ["DIGIT_NAMES", "MNISTSVHNText", "digit_texts", "read_idx", "read_svhn"]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEXT_LENGTH = 8
_MNIST_FILES = {"train": "train", "test": "t10k"}


def _open_maybe_gz(path: Path) -> bytes:
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            data = candidate.read_bytes()
            return gzip.decompress(data) if candidate.suffix == ".gz" else data
    found = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else "no such folder"
    raise LayoutError(f"MNIST-SVHN-Text: expected {path} (or {path.name}.gz) in the torchvision MNIST layout "
                      f"MNIST/raw/; found {found}")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format: big-endian magic, dimensions, uint8 data), optionally gzipped."""
    data = _open_maybe_gz(path)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise LayoutError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    rank = data[3]
    if len(data) < 4 + 4 * rank:
        raise LayoutError(f"{path}: cut short inside its header ({len(data)} bytes for {rank} dimensions)")
    shape = tuple(int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(rank))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank)
    if body.size != int(np.prod(shape)):
        raise LayoutError(f"{path}: header says {shape} but holds {body.size} bytes")
    return body.reshape(shape)


def read_svhn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 3, 32, 32)`` uint8 images and digits ``(N,)`` (SVHN stores the digit 0 as 10)."""
    import scipy.io

    if not path.is_file():
        raise LayoutError(f"MNIST-SVHN-Text: expected the SVHN file {path}")
    mat = scipy.io.loadmat(path)
    images, labels = mat["X"], mat["y"].reshape(-1).astype(np.int64)
    if images.shape[:3] != (32, 32, 3) or images.shape[3] != labels.shape[0]:
        raise LayoutError(f"{path}: expected X of shape (32, 32, 3, N) matching y, got {images.shape}")
    bad = (labels < 1) | (labels > 10)
    if bad.any():  # (% 10 read an 11 as the digit 1)
        raise LayoutError(f"{path}: y must hold digits 1..10 (10 for 0), found {labels[bad][:5].tolist()}")
    return np.ascontiguousarray(images.transpose(3, 2, 0, 1)), labels % 10


def digit_texts(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``(N, 8)`` character ids: each digit's name at a seeded random start (0 .. 8 - 1 - len(name), MoPoE's)."""
    generator = torch.Generator().manual_seed(seed)
    texts = torch.zeros(labels.shape[0], TEXT_LENGTH, dtype=torch.long)
    for digit, name in enumerate(DIGIT_NAMES):
        rows = (labels == digit).nonzero().squeeze(-1)
        starts = torch.randint(TEXT_LENGTH - len(name), (rows.shape[0],), generator=generator)
        encoded = encode_characters(name, len(name))
        for offset in range(len(name)):
            texts[rows, starts + offset] = encoded[offset]
    return texts


class MNISTSVHNText(MultimodalDataset):
    """The tuples of one split; ``labels`` are the digits."""

    #: MNIST, SVHN and text
    NUM_MODALITIES = 3

    def __init__(self, root, split: str = "train", text_seed: int = 0):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        root = Path(root)
        prefix = _MNIST_FILES[split]
        mnist = read_idx(root / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte")
        mnist_labels = read_idx(root / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte").astype(np.int64)
        for name, array, rank, what in ((f"{prefix}-images-idx3-ubyte", mnist, 3, "(N, 28, 28) images"),
                                        (f"{prefix}-labels-idx1-ubyte", mnist_labels, 1, "(N,) digits")):
            if array.ndim != rank or (rank == 3 and array.shape[1:] != (28, 28)):
                raise LayoutError(f"{root / 'MNIST' / 'raw' / name}: expected {what}, got shape {array.shape}")
        if mnist_labels.size and mnist_labels.max() > 9:
            raise LayoutError(f"{root / 'MNIST' / 'raw'}/{prefix}-labels-idx1-ubyte: digits must lie in 0..9, found "
                              f"{int(mnist_labels.max())}")
        svhn, svhn_labels = read_svhn(root / "SVHN" / f"{split}_32x32.mat")
        if len(mnist) != len(mnist_labels):  # an index past the images would fail mid-training, in some batch
            raise LayoutError(f"{root / 'MNIST' / 'raw'}: {prefix}-images-idx3-ubyte holds {len(mnist)} images but "
                              f"{prefix}-labels-idx1-ubyte {len(mnist_labels)} labels")
        pairs = []
        for name, size in (("mnist", len(mnist_labels)), ("svhn", len(svhn_labels))):
            path = root / f"{split}-ms-{name}-idx.pt"
            if not path.is_file():
                raise LayoutError(f"MNIST-SVHN-Text: expected MMVAE's pairing file {path}; {root} contains "
                                  f"{sorted(p.name for p in root.iterdir())}")
            index = load_tensor_file(path)
            # row numbers: floats were truncated (2.9 read as 2), booleans read as 0 and 1, a matrix flattened
            if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool or index.dim() != 1:
                raise LayoutError(f"{path}: expected a 1-D tensor of integer row numbers, got {index.dtype} of shape "
                                  f"{tuple(index.shape)}")
            index = index.long()
            if index.numel() and (index.min() < 0 or index.max() >= size):
                raise LayoutError(f"{path}: indices must lie in [0, {size}), found {int(index.min())}..{int(index.max())}")
            pairs.append(index)
        if pairs[0].shape != pairs[1].shape:
            raise LayoutError(f"{root}: {split}-ms-mnist-idx.pt has {pairs[0].numel()} pairs but "
                              f"{split}-ms-svhn-idx.pt has {pairs[1].numel()}")
        labels = torch.from_numpy(mnist_labels)[pairs[0]]
        other = torch.from_numpy(svhn_labels)[pairs[1]]
        wrong = (labels != other).nonzero().squeeze(-1)
        if wrong.numel():
            first = [(int(i), int(labels[i]), int(other[i])) for i in wrong[:5]]
            raise LayoutError(f"{root / f'{split}-ms-svhn-idx.pt'}: {wrong.numel()} pairs join different digits "
                              f"(tuple, MNIST digit, SVHN digit): {first}")
        modalities = [Modality("mnist", (1, 28, 28)), Modality("svhn", (3, 32, 32)),
                      Modality("text", (TEXT_LENGTH,), ALPHABET)]
        arrays = [torch.from_numpy(mnist.copy()).unsqueeze(1), torch.from_numpy(svhn), digit_texts(labels, text_seed)]
        super().__init__(modalities, arrays, labels, rows=[pairs[0], pairs[1], None], num_classes=10)
