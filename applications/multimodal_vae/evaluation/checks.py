"""Argument checks shared by the metrics: each refuses an input before any model runs, naming the argument and
its value."""

from __future__ import annotations

import numbers

__all__ = ["check_counts", "check_not_empty"]


def check_counts(**counts) -> None:
    """Each count a positive integer, named in the error (a negative batch size gave a coherence of 0, a negative
    number of samples -0.0, zero samples a ZeroDivisionError, a float number of samples a ``range`` TypeError)."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_not_empty(data) -> None:
    """A rate over no tuples (an accuracy, a coherence) is 0 / 0: refused rather than returned as NaN."""
    if len(data) == 0:
        raise ValueError("data must hold at least one tuple, got an empty dataset (a rate over it would be NaN)")
