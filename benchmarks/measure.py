"""Measurements shared by the benchmark scripts: saved-for-backward memory, where a run came from, and targets."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

__all__ = ["saved_tensor_bytes", "provenance", "verdict"]

_ROOT = Path(__file__).resolve().parents[1]
_TARGET = re.compile(r"\s*(<=|>=)\s*([0-9.eE+-]+)\s*")


def saved_tensor_bytes(forward) -> int:
    """Bytes of the tensors autograd saves for the backward pass of ``forward()`` (each storage counted once; the
    activation memory, which the CPU allocator cannot report as a peak). ``forward`` returns a scalar, which is
    then backpropagated so the graph is freed."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    if isinstance(output, torch.Tensor) and output.requires_grad:
        output.sum().backward()
    return sum(storages.values())


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=_ROOT, capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


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
    the date (UTC), the commit (marked when tracked files outside docs/ differ from it; the environment's
    ``OPINIONPOOL_COMMIT`` where set, marked as stated, for a copy of the tree without its repository), the
    processor and its core count, or the GPU for a CUDA device, and torch's version."""
    stated = os.environ.get("OPINIONPOOL_COMMIT")
    if stated:  # a copy of the tree whose .git is missing or stale (a GPU machine's copy)
        commit = f"{stated} (as stated by OPINIONPOOL_COMMIT)"
    else:
        commit = _git("rev-parse", "--short", "HEAD")
        # the pages the tables are spliced into do not change what is measured
        if commit and _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs"):
            commit += " with uncommitted changes"
    commit = commit or "unknown commit"
    machine = (torch.cuda.get_device_name() if str(device).startswith("cuda")
               else f"{_processor()}, {os.cpu_count()} cores")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return f"run of {date} at commit {commit} on {machine}, torch {torch.__version__}"


def verdict(value: float, target: str) -> str:
    """``target`` ("<= 4", ">= 0.9") followed by whether ``value`` meets it: "<= 4: met" or "<= 4: missed"."""
    match = _TARGET.fullmatch(target)
    if match is None:
        raise ValueError(f"target must read '<= number' or '>= number', got {target!r}")
    bound = float(match.group(2))
    met = value <= bound if match.group(1) == "<=" else value >= bound
    return f"{target}: {'met' if met else 'missed'}"
