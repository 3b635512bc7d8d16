"""Bimodal CelebA (MoPoE's image + attribute-text version) from the files as CelebA releases them:

    {root}/img_align_celeba/{000001..}.jpg   (the aligned 178x218 crops)
    {root}/list_attr_celeba.txt              (count; the 40 attribute names; "name.jpg  1 -1 ...")
    {root}/list_eval_partition.txt           ("name.jpg 0|1|2": train, validation, test)

Images: centre crop 148x148, bicubic resize to 64x64 (as in the MoPoE code). Text: the names of the attributes a
face has, lowercased with underscores as spaces, joined by ", " (absent attributes are left out, not negated, so an
attribute's position in the text varies), as characters, cut at 256 as MoPoE does, always starting at position 0
(MoPoE's files were made with a random start, ``random_text_startindex``, by code it did not release). Labels: the
40 attributes as 0/1. Splits: ``train`` is partition 0 (162 770 faces) and ``test`` partition 1 (19 867), the sizes
the HELVAE and MoPoE papers report. Decoded images are cached next to the files."""

from __future__ import annotations

from pathlib import Path

import torch

from .core import LayoutError, Modality, MultimodalDataset, cached_tensors, decode_images, source_listing
from .text import ALPHABET, encode_characters

__all__ = ["CelebA", "attribute_text", "read_attributes"]

IMAGE_SIZE, CROP = 64, 148
TEXT_LENGTH = 256
PARTITIONS = {"train": 0, "test": 1}


def read_attributes(path: Path) -> tuple[list[str], list[str], torch.Tensor]:
    """``(attribute names, file names, (N, A) 0/1 attributes)`` from ``list_attr_celeba.txt``."""
    if not path.is_file():
        raise LayoutError(f"CelebA: expected {path} (the released attribute list)")
    lines = path.read_text(encoding="utf-8").split("\n")
    if len(lines) < 2 or not lines[0].strip().isdigit() or not lines[1].split():
        raise LayoutError(f"{path}: expected the count of faces on line 1 and the attribute names on line 2")
    names = lines[1].split()
    files, rows = [], []
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(names) + 1 or any(v not in ("1", "-1") for v in fields[1:]):
            raise LayoutError(f"{path}:{number}: expected a file name and {len(names)} values of 1 or -1, got {line!r}")
        files.append(fields[0])
        rows.append([v == "1" for v in fields[1:]])
    if len(files) != int(lines[0]):  # (a file cut at a line's end lost faces without a malformed line)
        raise LayoutError(f"{path}: line 1 gives {int(lines[0])} faces, the file lists {len(files)}")
    return names, files, torch.tensor(rows, dtype=torch.long)


def attribute_text(names, attributes: torch.Tensor) -> str:
    return ", ".join(name.lower().replace("_", " ") for name, on in zip(names, attributes.tolist()) if on)


class CelebA(MultimodalDataset):
    """Faces and their attribute texts; ``labels`` ``(N, 40)``, ``attribute_names`` their names."""

    #: image and attribute text
    NUM_MODALITIES = 2

    def __init__(self, root, split: str = "train", progress=None):
        if split not in PARTITIONS:
            raise ValueError(f"split must be one of {sorted(PARTITIONS)}, got {split!r}")
        root = Path(root)
        names, files, attributes = read_attributes(root / "list_attr_celeba.txt")
        partition_file = root / "list_eval_partition.txt"
        if not partition_file.is_file():
            raise LayoutError(f"CelebA: expected {partition_file} (the released split list)")
        partition = {}
        for number, line in enumerate(partition_file.read_text(encoding="utf-8").split("\n"), start=1):
            fields = line.split()
            if fields and (len(fields) != 2 or not fields[1].lstrip("-").isdigit()):
                raise LayoutError(f"{partition_file}:{number}: expected a file name and a partition number, got "
                                  f"{line!r}")
            if fields:
                partition[fields[0]] = fields[1]
        missing = [f for f in files if f not in partition][:5]
        if missing:
            raise LayoutError(f"{partition_file} does not list {missing}")
        chosen = [i for i, f in enumerate(files) if int(partition[f]) == PARTITIONS[split]]
        folder = root / "img_align_celeba"
        if not folder.is_dir():
            raise LayoutError(f"CelebA: expected the image folder {folder}; {root} contains "
                              f"{sorted(p.name for p in root.iterdir())}")

        def build():
            return {"images": decode_images([folder / files[i] for i in chosen], IMAGE_SIZE, CROP, progress,
                                            f"decoding CelebA {split}", "list_attr_celeba.txt", resample="bicubic")}

        recipe = f"CelebA {split}: centre crop {CROP}, bicubic resize to {IMAGE_SIZE}, v2"
        # one cache per split: the three share the image folder
        listing = source_listing(recipe, folder, (files[i] for i in chosen))
        images = cached_tensors(folder, f"celeba_{split}", listing, build)["images"]
        labels = attributes[chosen]
        texts = torch.stack([encode_characters(attribute_text(names, row)[:TEXT_LENGTH], TEXT_LENGTH)
                             for row in labels]) if chosen else torch.zeros(0, TEXT_LENGTH, dtype=torch.long)
        self.attribute_names = names
        super().__init__([Modality("image", (3, IMAGE_SIZE, IMAGE_SIZE)), Modality("text", (TEXT_LENGTH,), ALPHABET)],
                         [images, texts], labels)
