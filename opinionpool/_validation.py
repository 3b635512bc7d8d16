"""Argument checks shared by the whole library.

Every public entry point validates its inputs before doing any work, raising ``ValueError`` with a
message that names the argument and shows the offending value. Checks synchronise with the device
(they read tensor values), so they can be switched off globally for speed, as with
``torch.distributions.Distribution.set_default_validate_args``.
"""

from __future__ import annotations

import contextlib
import numbers
import threading

import torch

__all__ = [
    "set_validate_args", "validation_enabled", "checks_enabled", "describe", "all_finite", "check_finite", "check_positive",
    "check_in_open_unit_interval", "check_probabilities", "check_log_probabilities", "check_weights",
    "check_weights_length", "check_real", "check_alpha", "check_num_samples", "check_positive_int", "check_sample_shape",
    "check_seed", "real_tensor",
]

_VALIDATE = True
_SKIP = threading.local()


def set_validate_args(value: bool) -> None:
    """Switch argument validation on or off for every call that does not set ``validate_args``."""
    global _VALIDATE
    _VALIDATE = bool(value)


def validation_enabled(validate_args: bool | None = None) -> bool:
    return _VALIDATE if validate_args is None else bool(validate_args)


@contextlib.contextmanager
def checks_enabled(enabled: bool):
    """Within the block, the ``check_*`` functions do nothing unless ``enabled`` (used around the
    conversion of distributions, whose parameter checks live in each family)."""
    previous = getattr(_SKIP, "value", False)
    _SKIP.value = not enabled
    try:
        yield
    finally:
        _SKIP.value = previous


def _skipped() -> bool:
    return getattr(_SKIP, "value", False)


def describe(value: torch.Tensor, mask: torch.Tensor | None = None) -> str:
    """A short description of the offending entries of ``value`` (``mask`` marks them; all by default)."""
    value = value.detach()
    bad = value.flatten() if mask is None else value[mask]
    shown = ", ".join(f"{v:.6g}" for v in bad.flatten()[:4].tolist())
    extra = f" (and {bad.numel() - 4} more)" if bad.numel() > 4 else ""
    where = ""
    if mask is not None and value.dim() > 0:
        first = tuple(int(i) for i in mask.nonzero()[0].tolist())
        where = f" first at index {first}"
    return f"[{shown}]{extra}{where}"


def all_finite(value: torch.Tensor) -> bool:
    """Whether every entry of ``value`` is finite. A finite sum implies it (an infinity or a NaN makes the sum
    non-finite) and costs one pass with no temporary; a sum that is not finite (or overflows) is checked entry by
    entry."""
    if (value.is_floating_point() or value.is_complex()) and bool(torch.isfinite(value.sum())):
        return True
    return bool(torch.isfinite(value).all())


def check_finite(name: str, value: torch.Tensor) -> None:
    if _skipped() or all_finite(value):
        return
    bad = ~torch.isfinite(value)
    raise ValueError(f"{name} must be finite, got non-finite values {describe(value, bad)}")


def check_log_probabilities(name: str, value: torch.Tensor) -> None:
    """Normalised log-probabilities: finite or ``-inf`` (a probability of zero; a row of them all is NaN once
    normalised, as torch's are)."""
    if _skipped():
        return
    bad = torch.isnan(value) | torch.isposinf(value)
    if bool(bad.any()):
        # torch normalises logits as it builds the distribution: a +inf logit given becomes NaN (inf - inf)
        hint = " (a +inf logit becomes NaN in torch's normalisation)" if bool(torch.isnan(value).any()) else ""
        raise ValueError(f"{name} must be finite or -inf, got {describe(value, bad)}{hint}")


def check_positive(name: str, value: torch.Tensor) -> None:
    if _skipped():
        return
    bad = ~(value > 0) | torch.isinf(value)
    if bool(bad.any()):
        raise ValueError(f"{name} must be positive and finite, got {describe(value, bad)}")


def check_in_open_unit_interval(name: str, value: torch.Tensor) -> None:
    if _skipped():
        return
    bad = ~((value > 0) & (value < 1))
    if bool(bad.any()):
        raise ValueError(f"{name} must lie in (0, 1), got {describe(value, bad)}")


def check_probabilities(name: str, value: torch.Tensor) -> None:
    if _skipped():
        return
    bad = ~((value >= 0) & (value <= 1))
    if bool(bad.any()):
        raise ValueError(f"{name} must lie in [0, 1], got {describe(value, bad)}")


def check_weights(name: str, weights: torch.Tensor, num_experts: int, entries: str = "one per expert") -> None:
    """Non-negative, finite weights over the last dimension, not all zero, of the right length (``entries`` says
    what they stand for)."""
    check_weights_length(name, weights, num_experts, entries)
    bad = ~(weights >= 0) | torch.isinf(weights)
    if bool(bad.any()):
        raise ValueError(f"{name} must be non-negative and finite, got {describe(weights, bad)}")
    all_zero = (weights == 0).all(dim=-1)
    if bool(all_zero.any()):
        first = tuple(int(i) for i in all_zero.nonzero()[0].tolist()) if all_zero.dim() else ()
        raise ValueError(f"{name} must not be all zero (all-zero weight vector at batch index {first})")


def check_weights_length(name: str, weights: torch.Tensor, num_experts: int, entries: str = "one per expert") -> None:
    """``num_experts`` entries in the last dimension (a shape check: no values are read)."""
    if weights.dim() == 0 or weights.shape[-1] != num_experts:
        raise ValueError(f"{name} must have {num_experts} entries in its last dimension ({entries}), "
                         f"got shape {tuple(weights.shape)}")


def check_real(name: str, value) -> float:
    """A real number (or +-inf) as a float: bools, complex numbers, strings and NaN are rejected."""
    given = value
    if not isinstance(value, (torch.Tensor, numbers.Number)) and hasattr(value, "__array__"):
        with contextlib.suppress(TypeError, ValueError, RuntimeError):  # a numpy array, as a tensor
            value = torch.as_tensor(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() \
            and value.dtype != torch.bool:
        number = float(value.detach())
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    else:
        raise ValueError(f"{name} must be a real number, got {given!r} of type {type(given).__name__}")
    if number != number:
        raise ValueError(f"{name} must be a real number, got {given!r}")
    return number


def check_alpha(alpha) -> float:
    """Hölder exponents are real numbers or +-inf; NaN and non-numbers are rejected."""
    return check_real("alpha", alpha)


def check_seed(seed) -> int | None:
    """A seed is an integer (numpy's included) or None; a float was truncated and a string failed inside
    ``torch.manual_seed`` without naming the argument."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer or None, got {seed!r} of type {type(seed).__name__}")
    if not -(2**63) <= seed < 2**64:  # torch.manual_seed's range (it raised "Overflow when unpacking long long")
        raise ValueError(f"seed must lie in [-2**63, 2**64), got {seed!r}")
    return int(seed)


def check_num_samples(value) -> int:
    """The number of importance samples: at least two, which a standard error needs (one gave a NaN error)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 2:
        raise ValueError(f"num_samples must be an integer of at least 2 (a standard error needs two draws), "
                         f"got {value!r}")
    return int(value)


def check_positive_int(name: str, value) -> int:
    """A positive integer (bools are rejected, though Python counts them as integers)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_sample_shape(sample_shape) -> torch.Size:
    """``torch.Size(sample_shape)``, whose sizes must be non-negative integers: ``torch.Size`` takes -1, and a
    negative count failed inside the sampler ("cannot sample n_sample <= 0 samples") without naming the argument."""
    try:
        shape = torch.Size(sample_shape)
    except (TypeError, ValueError):
        raise ValueError(f"sample_shape must be a sequence of non-negative integers, got {sample_shape!r}") from None
    if any(size < 0 for size in shape):
        raise ValueError(f"sample_shape must be a sequence of non-negative integers, got {sample_shape!r}")
    return shape


def real_tensor(name: str, value, *, dtype=None, device=None) -> torch.Tensor:
    """``torch.as_tensor(value, dtype, device)``, refusing complex input, whose imaginary part the cast
    would drop with only a warning (a dtype check: no device synchronisation), and values that are no numbers
    (``None``, strings, ragged lists), whose errors from torch name no argument."""
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) and v.requires_grad for v in value):
        # torch.as_tensor would detach them, with only a warning: stacked, they keep their gradient
        try:
            value = torch.stack([torch.as_tensor(v) for v in value])
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"{name}: a sequence of tensors that require grad must stack into one tensor, got "
                            f"{value!r}: {error}") from error
    try:
        raw = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{name} must be real numbers (a tensor or a sequence of numbers), got {value!r}: "
                        f"{error}") from error
    if raw.is_complex():
        imaginary = raw.imag != 0
        shown = describe(raw, imaginary) if bool(imaginary.any()) else describe(raw)
        raise ValueError(f"{name} must be real, got a {raw.dtype} tensor {shown}")
    return torch.as_tensor(value, dtype=dtype, device=device)
