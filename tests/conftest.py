"""Shared by every test: a fixed seed, float64 defaults, and CUDA tests skipped where there is no device."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    """Every test is seeded and starts from float64 defaults; tests that need float32 say so (the application's
    tests do, in ``multimodal_vae/conftest.py``)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(autouse=True)
def _mpmath_precision():
    """Every test starts at mpmath's default precision (15 digits) and leaves it there: tests that set
    ``mpmath.mp.dps`` (two at import) changed it for every test after them. Tests that need more digits set them
    (a module's own autouse fixture, or ``mpmath.mp.dps`` inside the test)."""
    import mpmath

    mpmath.mp.dps = 15
    yield
    mpmath.mp.dps = 15


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
