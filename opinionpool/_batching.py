"""Working through a batch in slices on the CPU.

A fresh temporary of a megabyte or more is faulted in page by page when first written, which on the CPU made
elementwise passes several times slower than over memory the allocator reuses; cut into slices of the batch, the
same computation keeps its temporaries small (``docs/benchmarks.md``)."""

from __future__ import annotations

import math

import torch

__all__ = ["in_batch_slices"]


def in_batch_slices(fn, batch: torch.Size, tensors, constants=(), *, row_bytes: int, budget: int):
    """``fn(*tensors, *constants)``, a tuple of tensors, with the batch axes ``batch`` (which every tensor of
    ``tensors`` has in full, leading) flattened to one; on the CPU in slices of ``max(1, budget // row_bytes)``
    rows, the results concatenated. The results get the batch axes back. Elsewhere (a GPU) and while compiling,
    one call."""
    rows = math.prod(batch)
    flat = [t.reshape((rows,) + t.shape[len(batch):]) for t in tensors]
    step = max(1, budget // max(1, row_bytes))
    if flat[0].device.type != "cpu" or step >= rows or torch.compiler.is_compiling():
        results = fn(*flat, *constants)
    else:
        parts = [fn(*(t[start:start + step] for t in flat), *constants) for start in range(0, rows, step)]
        results = [torch.cat(part, 0) for part in zip(*parts)]
    return tuple(r.reshape(batch + r.shape[1:]) for r in results)
