"""Expert families: the built-in exponential families and user-defined ones."""

from __future__ import annotations

from .base import ExponentialFamily
from .continuous import BetaFamily, DirichletFamily, ExponentialDistFamily, GammaFamily, VonMisesFamily
from .custom import CustomFamily, ExponentialFamilyDistribution
from .discrete import BernoulliFamily, BinomialFamily, CategoricalFamily, PoissonFamily
from .gaussian import DiagonalNormalFamily, MultivariateNormalFamily, NormalFamily

BUILTIN_FAMILIES = (
    NormalFamily, DiagonalNormalFamily, MultivariateNormalFamily, ExponentialDistFamily, GammaFamily,
    BetaFamily, DirichletFamily, VonMisesFamily, PoissonFamily, BernoulliFamily, BinomialFamily,
    CategoricalFamily,
)


def family_of(dist) -> ExponentialFamily:
    """The family of an expert distribution, or a ``ValueError`` naming the unsupported type."""
    if isinstance(dist, ExponentialFamilyDistribution):
        return dist.family
    for family_class in BUILTIN_FAMILIES:
        family = family_class.match(dist)
        if family is not None:
            return family
    raise ValueError(
        f"experts of type {type(dist).__name__} are not supported; supported are Normal, "
        "Independent(Normal, 1), MultivariateNormal, Exponential, Gamma, Beta, Dirichlet, VonMises, "
        "Poisson, Bernoulli, Binomial, Categorical and ExponentialFamilyDistribution (CustomFamily experts)"
    )


def params_of(dist, family: ExponentialFamily):
    if isinstance(dist, ExponentialFamilyDistribution):
        return dist.params
    return family.params_from_distribution(dist)


__all__ = [
    "ExponentialFamily", "CustomFamily", "ExponentialFamilyDistribution", "family_of", "params_of",
    "BUILTIN_FAMILIES", "NormalFamily", "DiagonalNormalFamily", "MultivariateNormalFamily",
    "ExponentialDistFamily", "GammaFamily", "BetaFamily", "DirichletFamily", "VonMisesFamily",
    "PoissonFamily", "BernoulliFamily", "BinomialFamily", "CategoricalFamily",
]
