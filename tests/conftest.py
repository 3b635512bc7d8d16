import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    """Every test is seeded and starts from float64 defaults; tests that need float32 say so."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
