"""The application's tests: float32 where a module asks for it (the application trains in float32; the modules that
check against float64 computations keep the root's float64) and a tiny dataset on disk."""

import pytest
import torch


@pytest.fixture
def float32_default():
    """For modules that train or evaluate as the application does: ``pytestmark = usefixtures("float32_default")``."""
    torch.set_default_dtype(torch.float32)  # the root conftest restores the previous default afterwards


@pytest.fixture
def tiny_root(tmp_path):
    """A 3-modality PolyMNIST-shaped dataset in the tensor layout (24 train, 10 test tuples) under tmp_path/data."""
    g = torch.Generator().manual_seed(0)
    for name, count in (("train", 24), ("test", 10)):
        split = tmp_path / "data" / name
        split.mkdir(parents=True)
        for m in range(3):
            torch.save(torch.randint(0, 256, (count, 3, 28, 28), dtype=torch.uint8, generator=g), split / f"m{m}.pt")
        torch.save(torch.randint(0, 10, (count,), generator=g), split / "labels.pt")
    return tmp_path
