"""Measurements shared by the benchmark scripts: saved-for-backward memory, where a run came from, and targets."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
from pathlib import Path

import torch

from applications.multimodal_vae.files import check_page, code_commit

__all__ = ["saved_tensor_bytes", "quartiles", "provenance", "verdict", "positive_int", "non_negative_int",
           "device_arg", "check_docs_page"]

_TARGET = re.compile(r"\s*(<=|>=)\s*([0-9.eE+-]+)\s*")


def saved_tensor_bytes(forward, exclude=()) -> int:
    """Bytes of the tensors autograd saves for the backward pass of ``forward()`` (each storage counted once; the
    activation memory, which the CPU allocator cannot report as a peak), leaving out the storages of the tensors
    ``exclude`` (a model's weights and its input, which layers save too but which exist whatever the batch).
    ``forward`` returns a scalar, which is then backpropagated so the graph is freed."""
    storages = {}
    excluded = {tensor.untyped_storage().data_ptr() for tensor in exclude}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    if isinstance(output, torch.Tensor) and output.requires_grad:
        output.sum().backward()
    return sum(storages.values())


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """First quartile, median and third quartile by ``statistics``' default (exclusive) method, which keeps them
    within the values from 3 values on; all three the value itself for one value, and the two values and their mean
    for two (where the method put the interquartile range outside the measured values)."""
    if len(values) == 1:
        return (values[0],) * 3
    if len(values) == 2:
        return min(values), statistics.fmean(values), max(values)
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, q2, q3


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: str = "cpu") -> str:
    """One line saying when, at which commit and on what a table was measured, so that no prose has to retype it:
    the date (UTC), the commit (``code_commit``: marked when tracked files outside docs/ differ from it, or as
    stated by the environment's ``OPINIONPOOL_COMMIT`` for a copy of the tree without its repository), the
    processor and its core count, or the GPU for a CUDA device, and torch's version."""
    commit = code_commit()
    machine = (torch.cuda.get_device_name() if str(device).startswith("cuda")
               else f"{_processor()}, {os.cpu_count()} cores")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return f"run of {date} at commit {commit} on {machine}, torch {torch.__version__}"


def verdict(value: float, target: str) -> str:
    """``target`` ("<= 4", ">= 0.9") followed by whether ``value`` meets it: "<= 4: met" or "<= 4: missed". A value
    that the tables' two decimals print as the bound says by how much it missed ("<= 2: missed by 0.003"): the
    table's 2.00 would read as met."""
    match = _TARGET.fullmatch(target)
    if match is None:
        raise ValueError(f"target must read '<= number' or '>= number', got {target!r}")
    bound = float(match.group(2))
    met = value <= bound if match.group(1) == "<=" else value >= bound
    if not met and f"{value:.2f}" == f"{bound:.2f}":
        return f"{target}: missed by {abs(value - bound):.1g}"
    return f"{target}: {'met' if met else 'missed'}"


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer of at least 1 (rounds, repeats, threads, sizes), refused by its text before
    any work (0 rounds failed after the warm-up, 0 threads in torch)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An ``argparse`` type: an integer of at least 0 (warm-up rounds)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def device_arg(text: str) -> str:
    """An ``argparse`` type: a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``), refused by its text
    before any work (a typo, or CUDA without a GPU, raised a traceback from the first tensor moved)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"must be a torch device such as cpu or cuda, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu or cuda, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: torch sees no CUDA device here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return text


def check_docs_page(parser: argparse.ArgumentParser, page, name: str) -> None:
    """``parser.error`` unless ``--docs`` ``page`` (if given) can take the table ``name``: checked before the work,
    not after it (a missing page or marker lost a whole run's measurements)."""
    if page is None:
        return
    try:
        check_page(page, name)
    except (OSError, ValueError) as error:
        parser.error(f"--docs {str(page)!r}: {error}")
