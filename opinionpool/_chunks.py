"""Eager CPU passes through a batch in slices of rows, so that their temporaries are reused from the allocator.

A fresh temporary of a megabyte or more is faulted in page by page when first written, which makes an elementwise
pass over it several times slower than one over memory the allocator reuses; slices that are too small pay the
fixed cost of each operation more often. ``by_rows`` runs a function of batched tensors slice by slice on the CPU
(one call elsewhere, and while ``torch.compile`` traces).
"""

from __future__ import annotations

import math

import torch

__all__ = ["CPU_CHUNK_BYTES", "by_rows", "flat", "unflat"]

#: the largest temporary of one slice stays near this many bytes (see docs/benchmarks.md)
CPU_CHUNK_BYTES = 1 << 19


def flat(tensors, batch):
    """``tensors`` with the batch axes ``batch`` flattened to one."""
    rows = math.prod(batch)
    return [t.reshape((rows,) + t.shape[len(batch):]) for t in tensors]


def unflat(tensors, batch):
    """The inverse of ``flat``: the first axis of each of ``tensors`` split back into ``batch``."""
    return tuple(t.reshape(batch + t.shape[1:]) for t in tensors)


def by_rows(fn, batch, tensors, *constants, row_elements: int):
    """``fn(*tensors, *constants)``, a tuple of tensors, with the batch axes ``batch`` of ``tensors`` flattened to
    one; on the CPU in slices of rows whose largest temporary (``row_elements`` elements per row) takes about
    ``CPU_CHUNK_BYTES``, the results concatenated. The results get the batch axes back."""
    rows = math.prod(batch)
    flattened = flat(tensors, batch)
    step = max(1, CPU_CHUNK_BYTES // (max(1, row_elements) * tensors[0].element_size()))
    if flattened[0].device.type != "cpu" or step >= rows or torch.compiler.is_compiling():
        results = fn(*flattened, *constants)
    else:
        parts = [fn(*(t[start:start + step] for t in flattened), *constants) for start in range(0, rows, step)]
        results = [torch.cat(part, 0) for part in zip(*parts)]
    return unflat(results, batch)
