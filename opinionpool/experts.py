"""Turning user input (torch distributions) into one family plus a stacked parameter tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributions import Distribution

from ._validation import checks_enabled, validation_enabled
from .families import ExponentialFamily, family_of, params_of

__all__ = ["Experts", "as_experts"]


@dataclass(frozen=True)
class Experts:
    """Experts of one family: ``params`` has shape ``batch_shape + (num_experts,) + family.param_shape``."""

    family: ExponentialFamily
    params: torch.Tensor

    @property
    def expert_dim(self) -> int:
        return self.params.dim() - len(self.family.param_shape) - 1

    @property
    def num_experts(self) -> int:
        return self.params.shape[self.expert_dim]

    @property
    def batch_shape(self) -> torch.Size:
        return self.params.shape[: self.expert_dim]


def as_experts(experts, validate_args: bool | None = None) -> Experts:
    """Accept a list of distributions of one family, or one distribution whose rightmost batch
    dimension indexes the experts (as for ``MixtureSameFamily``)."""
    validate = validation_enabled(validate_args)
    if isinstance(experts, Experts):
        _check_layout(experts)
        if validate:
            experts.family.check_params(experts.params, "experts")
        return experts
    with checks_enabled(validate):
        family, params = _convert(experts)
    if validate:
        family.check_params(params, "experts")
    return Experts(family, params)


def _check_layout(experts: Experts) -> None:
    """``ValueError`` unless ``experts.params`` is a floating tensor of shape ``batch_shape + (num_experts,) +
    family.param_shape`` with at least one expert (an ``Experts`` built by hand skips ``_convert``'s checks)."""
    params, param_shape = experts.params, tuple(experts.family.param_shape)
    if not isinstance(params, torch.Tensor) or not params.is_floating_point():
        raise ValueError(f"experts.params must be a floating-point tensor, got "
                         f"{params.dtype if isinstance(params, torch.Tensor) else type(params).__name__}")
    n = len(param_shape)
    if params.dim() < n + 1 or tuple(params.shape[params.dim() - n:]) != param_shape:
        raise ValueError(f"experts.params must have shape batch_shape + (num_experts,) + {param_shape} (the "
                         f"{experts.family.name} family's parameter shape), got {tuple(params.shape)}")
    if params.shape[params.dim() - n - 1] == 0:
        raise ValueError(f"experts must not be empty: experts.params has shape {tuple(params.shape)}, with no "
                         "experts")


def _convert(experts):
    if isinstance(experts, Distribution):
        family = family_of(experts)
        if len(experts.batch_shape) == 0:
            raise ValueError("a single distribution passed as experts needs a batch dimension indexing the "
                             f"experts (its rightmost batch dimension), got batch_shape={tuple(experts.batch_shape)}")
        if experts.batch_shape[-1] == 0:
            raise ValueError(f"experts must not be empty: the rightmost batch dimension (the experts) of the "
                             f"{type(experts).__name__} has size 0 (batch_shape={tuple(experts.batch_shape)})")
        params = params_of(experts, family)
    elif isinstance(experts, (list, tuple)):
        if len(experts) == 0:
            raise ValueError(f"experts must not be empty, got {experts!r}")
        families = [family_of(d) for d in experts]
        family = families[0]
        for index, other in enumerate(families[1:], start=1):
            if other != family:
                raise ValueError(f"experts must all be of one family with the same fixed parameters; expert 0 is "
                                 f"{family!r} but expert {index} is {other!r}")
        params_list = [params_of(d, family) for d in experts]
        n = len(family.param_shape)
        shapes = [tuple(p.shape[: p.dim() - n]) for p in params_list]
        try:
            batch = torch.broadcast_shapes(*shapes)
        except RuntimeError:
            raise ValueError(f"experts' batch shapes do not broadcast: {shapes}") from None
        dtypes = {p.dtype for p in params_list}
        if len(dtypes) > 1:
            raise ValueError(f"experts must share one dtype, got {sorted(str(d) for d in dtypes)}")
        params = torch.stack([p.expand(batch + family.param_shape) for p in params_list], dim=len(batch))
    else:
        raise ValueError("experts must be a list of torch.distributions objects of one family or one batched "
                         f"distribution, got {type(experts).__name__}")
    return family, params
