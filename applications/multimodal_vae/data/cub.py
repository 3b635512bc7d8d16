"""CUB image-captions (the MMVAE / MMVAE+ version) from the files as those papers release them:

    {root}/text_trainvalclasses.txt, {root}/text_testclasses.txt   (one caption per line, ten per image)
    {root}/train/{class}/{image}.jpg, {root}/test/{class}/{image}.jpg (an image folder per class)

Caption ``k`` belongs to image ``k // 10`` of its split, images in sorted class-then-file order (torchvision's
``ImageFolder`` order, which the released caption files follow); the counts must agree. A tuple is one caption
and its image, so each image appears in ten tuples. Images are resized to 64x64; captions are word ids over a
vocabulary built from the training captions (words seen more than 3 times, MMVAE's ``<exc>``, ``<pad>``, ``<eos>``),
at most 32 tokens with the end mark, tokenised by a regular expression (no downloaded tokenizer data).
``labels`` are the image indices (CUB has no shared label; its coherence needs another protocol).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .core import LayoutError, Modality, MultimodalDataset, cached_tensors, decode_images, source_listing
from .text import build_vocabulary, encode_words

__all__ = ["CUB", "image_files", "read_captions"]

IMAGE_SIZE = 64
CAPTION_LENGTH = 32
CAPTIONS_PER_IMAGE = 10
CAPTION_FILES = {"train": "text_trainvalclasses.txt", "test": "text_testclasses.txt"}


def read_captions(path: Path) -> list[str]:
    if not path.is_file():
        raise LayoutError(f"CUB: expected the caption file {path} (MMVAE's layout: text_trainvalclasses.txt, "
                          f"text_testclasses.txt, train/, test/); {path.parent} contains "
                          f"{sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else 'nothing'}")
    return [line.strip() for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise LayoutError(f"CUB: expected an image folder {folder} with one sub-folder per class")
    return sorted(p for p in folder.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


class CUB(MultimodalDataset):
    """Caption-image tuples; ``vocabulary`` the word list (from the training captions, whatever the split)."""

    #: image and caption
    NUM_MODALITIES = 2

    def __init__(self, root, split: str = "train", progress=None):
        if split not in CAPTION_FILES:
            raise ValueError(f"split must be one of {sorted(CAPTION_FILES)}, got {split!r}")
        root = Path(root)
        self.vocabulary = build_vocabulary(read_captions(root / CAPTION_FILES["train"]))
        captions = read_captions(root / CAPTION_FILES[split])
        files = image_files(root / split)
        if len(captions) != CAPTIONS_PER_IMAGE * len(files):
            raise LayoutError(f"CUB: {root / CAPTION_FILES[split]} has {len(captions)} captions but {root / split} "
                              f"has {len(files)} images; expected {CAPTIONS_PER_IMAGE} captions per image")

        def build():
            return {"images": decode_images(files, IMAGE_SIZE, progress=progress, desc=f"decoding CUB {split}")}

        listing = source_listing(f"CUB {split}: bilinear resize to {IMAGE_SIZE}, v2", root,
                                 (str(p.relative_to(root)) for p in files))
        images = cached_tensors(root / split, "cub", listing, build)["images"]
        index = {w: i for i, w in enumerate(self.vocabulary)}
        tokens = torch.stack([encode_words(c, index, CAPTION_LENGTH) for c in captions])
        image_of = torch.arange(len(captions)) // CAPTIONS_PER_IMAGE
        super().__init__([Modality("image", (3, IMAGE_SIZE, IMAGE_SIZE)),
                          Modality("caption", (CAPTION_LENGTH,), self.vocabulary)],
                         [images, tokens], image_of, rows=[image_of, None])
