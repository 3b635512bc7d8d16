r"""opinionpool: probabilistic opinion pooling of exponential-family experts.

The Hölder pool :math:`q(z) \propto (\sum_j \lambda_j q_j(z)^\alpha)^{1/\alpha}` interpolates between the
product of experts (:math:`\alpha \to 0`) and the mixture of experts (:math:`\alpha = 1`);
:math:`\alpha = 1/2` is the Hellinger pool of HELVAE.

>>> import torch, opinionpool
>>> from torch.distributions import Normal
>>> experts = [Normal(torch.tensor(0.0), torch.tensor(1.0)), Normal(torch.tensor(2.0), torch.tensor(0.5))]
>>> opinionpool.holder(experts, alpha=0.5).moment_match()  # doctest: +ELLIPSIS
Normal(loc: ..., scale: ...)
"""

from . import functional
from ._validation import set_validate_args
from .affinities import (
    amari_alpha_divergence,
    bhattacharyya_coefficient,
    hellinger_distance,
    kl_divergence,
    log_bhattacharyya_coefficient,
    log_chernoff_coefficient,
    log_multi_chernoff_coefficient,
    renyi_divergence,
)
from .experts import Experts, as_experts
from .families import CustomFamily, ExponentialFamily, ExponentialFamilyDistribution, family_of
from .forecast import CoverageTable, Disagreement, FitResult, coverage, crps, disagreement, fit_weights, pit
from .numerical import Estimate, PoolEstimate, log_power_mean
from .pool import DEFAULT_MAX_COMPONENTS, HolderPool, NumericalHolderPool, exact_order, hellinger, holder, moe, poe
from .wasserstein import wasserstein_barycenter

__version__ = "0.1.0"

__all__ = [
    "holder", "HolderPool", "NumericalHolderPool", "PoolEstimate", "Estimate", "log_power_mean",
    "poe", "moe", "hellinger", "functional", "set_validate_args",
    "log_chernoff_coefficient", "log_multi_chernoff_coefficient", "log_bhattacharyya_coefficient",
    "bhattacharyya_coefficient", "hellinger_distance", "kl_divergence", "renyi_divergence",
    "amari_alpha_divergence", "ExponentialFamily", "CustomFamily", "ExponentialFamilyDistribution",
    "family_of", "Experts", "as_experts", "DEFAULT_MAX_COMPONENTS", "wasserstein_barycenter", "exact_order",
    "crps", "pit", "coverage", "CoverageTable", "disagreement", "Disagreement", "fit_weights", "FitResult",
]
