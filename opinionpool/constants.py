"""Numerical constants the library writes once (and applications may reuse)."""

from __future__ import annotations

import math

__all__ = ["LOG_2PI", "LOG_HALF"]

#: ``log(2 pi)``, in every Gaussian (and the von Mises) normaliser
LOG_2PI = math.log(2 * math.pi)
#: ``log(1/2)``, the weight of each of two experts in a Bhattacharyya coefficient
LOG_HALF = math.log(0.5)
