"""The library's tests: float64 first (the root conftest), and argument validation on in every test, whatever an
earlier test switched off globally."""

import pytest

import opinionpool


@pytest.fixture(autouse=True)
def _validation_on():
    opinionpool.set_validate_args(True)
    yield
    opinionpool.set_validate_args(True)
