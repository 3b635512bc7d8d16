"""Backward passes of custom autograd functions: analytic ones that are not themselves differentiable, and the
implicit function theorem's, which is.

``torch.autograd.function.once_differentiable`` raises only where the incoming gradients require grad; under
``create_graph=True`` with plain incoming gradients (``torch.autograd.grad(y.sum(), x, create_graph=True)``,
``torch.autograd.functional.hessian``) it hands back gradients detached from the graph, so second derivatives
came out zero or partial without a word.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["ImplicitSolution", "first_order_only", "second_order_requested"]


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


class ImplicitSolution(torch.autograd.Function):
    """``ImplicitSolution.apply(x, y, vjp)``: the root ``y`` of ``F(y, x) = 0``, found without a graph (a Newton
    solve), as a function of ``x``. The backward pass is ``vjp(y, g) = -(dF/dx)^T (dF/dy)^-T g``, which must be
    written in differentiable operations of ``y`` and ``g``: under ``create_graph=True`` the saved ``y`` carries
    this function's graph, so second derivatives differentiate the product through the solution again (one Newton
    step with the solution detached gives the first derivative, but second derivatives of zero or partial ones)."""

    @staticmethod
    def forward(ctx, x, y, vjp):
        solution = y.detach().clone()
        ctx.vjp = vjp
        ctx.save_for_backward(solution)
        return solution

    @staticmethod
    def backward(ctx, grad):
        (solution,) = ctx.saved_tensors
        return ctx.vjp(solution, grad), None, None
