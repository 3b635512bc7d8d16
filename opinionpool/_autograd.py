"""Backward passes of custom autograd functions that are analytic and not themselves differentiable.

``torch.autograd.function.once_differentiable`` raises only where the incoming gradients require grad; under
``create_graph=True`` with plain incoming gradients (``torch.autograd.grad(y.sum(), x, create_graph=True)``,
``torch.autograd.functional.hessian``) it hands back gradients detached from the graph, so second derivatives
came out zero or partial without a word.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["first_order_only", "second_order_requested"]


def second_order_requested(*grads) -> bool:
    """Whether the running backward pass records a graph for a second derivative (``create_graph=True``) in plain
    autograd. Under ``torch.func`` transforms (wrapped incoming gradients) the grad mode is on for first
    derivatives too, so they are not counted, nor is a backward pass ``torch.compile`` traces."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return False
    return not any(g is not None and torch._C._functorch.is_functorch_wrapped_tensor(g) for g in grads)


def first_order_only(what: str):
    """Decorates a ``backward``: ``once_differentiable``, and a ``RuntimeError`` naming ``what`` where a second
    derivative is asked for (``second_order_requested``), instead of a gradient without a graph."""
    def decorate(backward):
        once = torch.autograd.function.once_differentiable(backward)

        @functools.wraps(backward)
        def checked(ctx, *grads):
            if second_order_requested(*grads):
                raise RuntimeError(f"{what} has no second derivative here (its backward pass is analytic, not "
                                   "differentiable): create_graph=True would give gradients without a graph, "
                                   "second derivatives of zero")
            return once(ctx, *grads)
        return checked
    return decorate
