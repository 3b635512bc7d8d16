"""Measurements shared by the benchmark scripts."""

from __future__ import annotations

import torch

__all__ = ["saved_tensor_bytes"]


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
