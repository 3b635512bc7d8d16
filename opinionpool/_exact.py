"""Error-free transformations: a sum or product of two floats and its rounding error, exactly, for the forms that
must see past one rounding (quadrature nodes' positions, densities of concentrations of 1e20 and more)."""

from __future__ import annotations

import math

import torch

__all__ = ["two_product", "two_sum"]


def two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a + b`` rounded and its rounding error, exactly (Knuth's TwoSum)."""
    total = a + b
    b_part = total - a
    return total, (a - (total - b_part)) + (b - b_part)


def two_product(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a b`` rounded and its rounding error, exactly (Dekker's product, Veltkamp's split, in the dtype's own
    precision). The error is 0 where a factor is too large to split (beyond about 1e300 in float64) or the product is
    not finite."""
    product = a * b
    precision = 1 - math.log2(torch.finfo(product.dtype).eps)  # significand bits: 53 in float64
    splitter = 2.0 ** math.ceil(precision / 2) + 1  # 2^27 + 1 in float64

    def halves(x):
        scaled = splitter * x
        high = scaled - (scaled - x)
        return high, x - high

    (a_high, a_low), (b_high, b_low) = halves(a), halves(b)
    error = ((a_high * b_high - product) + a_high * b_low + a_low * b_high) + a_low * b_low
    splittable = torch.isfinite(splitter * a) & torch.isfinite(splitter * b) & torch.isfinite(product)
    return product, torch.where(splittable, error, 0.0)
