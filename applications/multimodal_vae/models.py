"""Every model is an aggregator from ``opinionpool.functional`` plus an objective from ``objectives``; ``MODELS``
holds one ``ModelSpec`` per model, the only place a model is described (the table below is rendered from it).

"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
from collections.abc import Callable

import torch
from torch import nn

import opinionpool.functional as opf

from . import objectives
from .data import reconstruction_weights

__all__ = ["MODELS", "POSTERIORS", "POSTERIOR_SCALES", "SOFTMAX_SCALE_FLOOR", "ModelSpec", "MultimodalVAE",
           "PrivateLatent", "TopDownPrivate", "as_modalities", "check_options", "evaluating"]

#: what ``aggregate`` returns and how ``pool`` turns it into the joint posterior
POSTERIORS = ("gaussian", "mixture", "subsets")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model.

    Args:
        aggregator: the pooling of unimodal posteriors ``(mu, logvar, dim=, mask=, ...)``.
        objective: a function of ``objectives`` (``(x, present, mu, logvar, decoders, likelihood, aggregate, ...)``).
        posterior: what the aggregator pools into: ``"gaussian"`` (a mean and log-variance), ``"mixture"`` (a
            ``GaussianMixture``, a ``LaplaceMixture`` for Laplace latents), ``"subsets"`` (a Gaussian per modality
            subset, mixed by ``subset_mixture``).
        aggregator_doc, objective_doc: the model's row in the module's table.
        exact_alpha: the aggregator takes ``alpha``, which must be 0 or 1/n (an exact pool).
        weighted: the aggregator takes (learnable) pooling weights over the modalities.
        multi_sample: the objective takes several importance samples and an estimator.
        private: modality-specific latents beside the shared one (``private_dim > 0`` required).
        optional_private: the model takes modality-specific latents (``private_dim >= 0``), with the networks of
            MMVAE+ (``PrivateLatent``).
        prior_on_full_subset: a standard-normal expert joins the subset of all modalities (``"subsets"`` only).
        components: the objective takes ``members``, which experts make each component of the exact pool
            (``opinionpool.functional.holder_mixture_members``; ``exact_alpha`` models).
        top_down: the private posteriors are ``q(w_m | x_m, z)`` (``TopDownPrivate``; ``private`` models).
        laplace: the model takes ``latent_family="laplace"`` (Laplace posteriors and prior, as in the MMVAE and
            MMVAE+ code): its aggregator takes the experts' ``family`` and its objective the ``latent`` family.
        mixed_prior: the objective's prior of each modality's latent is the aggregate of the others (MMVM's), and
            takes ``normal_prior_weight``, the weight of an ``N(0, I)`` component beside it.
    """

    aggregator: Callable
    objective: Callable
    posterior: str
    aggregator_doc: str
    objective_doc: str
    exact_alpha: bool = False
    weighted: bool = False
    multi_sample: bool = False
    private: bool = False
    prior_on_full_subset: bool = False
    components: bool = False
    top_down: bool = False
    optional_private: bool = False
    laplace: bool = False
    mixed_prior: bool = False

    def __post_init__(self):
        if self.posterior not in POSTERIORS:
            raise ValueError(f"posterior must be one of {POSTERIORS}, got {self.posterior!r}")
        if self.prior_on_full_subset and self.posterior != "subsets":
            raise ValueError(f"prior_on_full_subset needs posterior='subsets', got posterior={self.posterior!r}")
        if self.components and not self.exact_alpha:
            raise ValueError("components needs exact_alpha=True (the components of the exact pool)")
        if self.top_down and not self.private:
            raise ValueError("top_down needs private=True (it conditions the private posteriors on z)")

    @property
    def auxiliary(self) -> bool:
        """With modality-specific latents, the mixture objectives (MMVAE+, Hölder+, Hölder++) reconstruct the
        modalities outside the sampled component with MMVAE+'s auxiliary ``r_n``; a Gaussian pool and the subset
        mixtures (MoPoE's scheme: every modality from its own posterior) never do."""
        return self.posterior == "mixture"

    def make_aggregator(self, alpha: float, latent_family: str = "normal") -> Callable:
        if self.laplace:
            return functools.partial(self.aggregator, family=latent_family)
        return functools.partial(self.aggregator, alpha=alpha) if self.exact_alpha else self.aggregator


MODELS: dict[str, ModelSpec] = {
    "helvae": ModelSpec(opf.hellinger, objectives.joint_elbo, "gaussian",
                        "``hellinger`` (Hölder 1/2, moment-matched)", "``joint_elbo``", weighted=True,
                        optional_private=True),
    "holder": ModelSpec(opf.holder, objectives.joint_elbo, "gaussian",
                        "``holder(alpha)`` (exact alpha = 0 or 1/n)", "``joint_elbo``", exact_alpha=True, weighted=True,
                        optional_private=True),
    "holder_mixture": ModelSpec(opf.holder_mixture, objectives.mixture_elbo, "mixture",
                                "``holder_mixture(alpha)``, the exact pool", "``mixture_elbo``", exact_alpha=True,
                                weighted=True),
    "mohelvae": ModelSpec(opf.hellinger, objectives.subset_mixture_elbo, "subsets",
                          "``hellinger`` on every modality subset", "``subset_mixture_elbo``", weighted=True,
                          optional_private=True),
    "mvae": ModelSpec(functools.partial(opf.poe, prior_expert=True), objectives.mvae_elbo, "gaussian",
                      "``poe`` with a prior expert", "``mvae_elbo``"),
    "mopoe": ModelSpec(opf.poe, objectives.subset_mixture_elbo, "subsets",
                       "``poe`` on every subset (prior on the full one)", "``subset_mixture_elbo``",
                       prior_on_full_subset=True, optional_private=True),
    "mwbvae": ModelSpec(opf.wasserstein_barycenter, objectives.subset_mixture_elbo, "subsets",
                        "``wasserstein_barycenter`` on every subset", "``subset_mixture_elbo``",
                        optional_private=True),
    "mmvae": ModelSpec(opf.moe, objectives.mmvae_objective, "mixture",
                       "``moe``", "``mmvae_objective`` (ELBO, IWAE, DReG)", multi_sample=True, laplace=True),
    "mmvaeplus": ModelSpec(opf.moe, objectives.mmvae_plus_objective, "mixture",
                           "``moe`` on the shared latent", "``mmvae_plus_objective`` (+ private latents)",
                           multi_sample=True, private=True, laplace=True),
    "holder_stratified": ModelSpec(opf.holder_mixture, objectives.stratified_mixture_elbo, "mixture",
                                   "``holder_mixture(alpha)``, the exact pool",
                                   "``stratified_mixture_elbo`` (every component, weighted)", exact_alpha=True,
                                   weighted=True),
    "holderplus": ModelSpec(opf.holder_mixture, objectives.holder_plus_objective, "mixture",
                            "``holder_mixture(alpha)`` on the shared latent",
                            "``holder_plus_objective`` (+ private latents)", exact_alpha=True, weighted=True,
                            multi_sample=True, private=True, components=True),
    "holderplus_detached_weights": ModelSpec(
        opf.holder_mixture, functools.partial(objectives.holder_plus_objective, weight_gradient=False), "mixture",
        "``holder_mixture(alpha)`` on the shared latent",
        "``holder_plus_objective``, the mixture weights' gradient stopped (an ablation of Hölder+)", exact_alpha=True,
        weighted=True, multi_sample=True, private=True, components=True),
    "holderplusplus": ModelSpec(opf.holder_mixture, objectives.holder_plus_objective, "mixture",
                                "``holder_mixture(alpha)`` on the shared latent",
                                "``holder_plus_objective`` (+ private latents given z)", exact_alpha=True,
                                weighted=True, multi_sample=True, private=True, components=True, top_down=True),
    "mmvm": ModelSpec(opf.moe, objectives.mmvm_objective, "mixture",
                      "``moe`` as the prior h(z_m | X) of unimodal latents", "``mmvm_objective``", mixed_prior=True),
    "mmvm_holder": ModelSpec(opf.holder_mixture, objectives.mmvm_objective, "mixture",
                             "``holder_mixture(alpha)`` as the prior h(z_m | X)", "``mmvm_objective``",
                             exact_alpha=True, weighted=True, mixed_prior=True),
    "wbvae": ModelSpec(opf.wasserstein_barycenter, objectives.joint_elbo, "gaussian",
                       "``wasserstein_barycenter`` of the present experts", "``joint_elbo``", weighted=True,
                       optional_private=True),
}


def _models_with(flag: str) -> tuple[str, ...]:
    return tuple(name for name, spec in MODELS.items() if getattr(spec, flag))


def _table() -> str:
    """The models as a reStructuredText table."""
    rows = [("model", "aggregator (``opinionpool.functional``)", "objective")]
    rows += [(name, spec.aggregator_doc, spec.objective_doc) for name, spec in MODELS.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    rule = "  ".join("=" * w for w in widths)
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([rule, lines[0], rule, *lines[1:], rule]) + "\n"


if __doc__ is not None:  # None under python -OO
    __doc__ += _table()


def as_modalities(x) -> list[torch.Tensor]:
    """Model inputs as one tensor per modality, each ``(B, ...)``: a list or tuple as given, a stacked tensor
    ``(B, M, ...)`` (modalities of one shape, like PolyMNIST) split along its second axis."""
    return list(x.unbind(1)) if isinstance(x, torch.Tensor) else list(x)


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """``model`` in eval mode for the block, every submodule back in its own previous mode afterwards (also on an
    error): ``model.train(flag)`` would set them all to the model's, undoing a submodule a caller had put in eval
    mode (a frozen encoder's batch norm statistics would then move in training)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


#: how the encoders' second outputs become posterior log-variances: "free" (they are the log-variances) or
#: "softmax" (MMVAE's and MMVAE+'s code: standard deviations ``softmax(out) * n + 1e-6`` over the n shared and,
#: separately, the n private coordinates, so that no posterior narrows in every direction at once)
POSTERIOR_SCALES = ("free", "softmax")
#: the ``Constants.eta`` the MMVAE and MMVAE+ code add to those standard deviations
SOFTMAX_SCALE_FLOOR = 1e-6


def check_options(model: str, alpha: float = 0.5, learnable_weights: bool = False, num_samples: int = 1,
                  estimator: str = "elbo", likelihood: str = "laplace",
                  likelihood_scale: float = objectives.LAPLACE_SCALE, private_dim: int = 0,
                  posterior_scale: str = "free", private_kl_weights=None, latent_family: str = "normal",
                  normal_prior_weight: float = 0.0) -> None:
    """Raise ``ValueError`` naming the option when the combination is not a model this module builds."""
    objectives.Likelihood.check(likelihood, likelihood_scale)
    objectives.LatentFamily(latent_family)
    if posterior_scale not in POSTERIOR_SCALES:
        raise ValueError(f"posterior_scale must be one of {POSTERIOR_SCALES}, got {posterior_scale!r}")
    if model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    spec = MODELS[model]
    if learnable_weights and not spec.weighted:
        raise ValueError(f"learnable_weights needs one of {_models_with('weighted')}, got model={model!r}")
    if spec.exact_alpha and opf.exact_order(alpha) is None:
        raise ValueError(f"model={model!r} needs alpha = 0 or 1/n (exact pools), got alpha={alpha!r}")
    if not spec.exact_alpha and alpha != 0.5:  # (ignored otherwise: runs of different alphas were one model)
        raise ValueError(f"alpha applies to {_models_with('exact_alpha')} (the others' pools are fixed); "
                         f"model={model!r} got alpha={alpha!r}")
    if estimator not in objectives.ESTIMATORS:
        raise ValueError(f"estimator must be one of {objectives.ESTIMATORS}, got {estimator!r}")
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if isinstance(private_dim, bool) or int(private_dim) != private_dim or private_dim < 0:
        raise ValueError(f"private_dim must be a non-negative integer, got {private_dim!r}")
    if private_dim > 0 and not (spec.private or spec.optional_private):
        raise ValueError(f"private_dim > 0 (modality-specific latents) goes with the models "
                         f"{_models_with('private') + _models_with('optional_private')}; model={model!r} got "
                         f"private_dim={private_dim!r}")
    if spec.private and private_dim == 0:
        raise ValueError(f"private_dim > 0 (modality-specific latents) is required by the models "
                         f"{_models_with('private')}; model={model!r} got private_dim=0")
    if not spec.multi_sample and (num_samples != 1 or estimator != "elbo"):
        raise ValueError(f"num_samples and estimator apply to {_models_with('multi_sample')}; model={model!r} got "
                         f"num_samples={num_samples!r}, estimator={estimator!r}")
    if estimator == "dreg_unbiased" and spec.top_down:
        raise ValueError(f"estimator='dreg_unbiased' does not apply to model={model!r}, whose private posteriors depend "
                         "on the shared draw: use 'dreg' or 'iwae'")
    if latent_family != "normal" and not spec.laplace:
        raise ValueError(f"latent_family={latent_family!r} goes with the models {_models_with('laplace')} (every other "
                         f"model pools or bounds normal posteriors in closed form); model={model!r}")
    if private_kl_weights is not None:
        _check_private_kl_weights(model, spec, private_dim, private_kl_weights)
    if (isinstance(normal_prior_weight, bool) or not isinstance(normal_prior_weight, numbers.Real)
            or not 0 <= normal_prior_weight <= 1):
        raise ValueError(f"normal_prior_weight must be a number in [0, 1], got {normal_prior_weight!r}")
    if normal_prior_weight and not spec.mixed_prior:
        raise ValueError(f"normal_prior_weight (an N(0, I) component of the prior h(z_m | X)) goes with the models "
                         f"{_models_with('mixed_prior')}; model={model!r} got normal_prior_weight={normal_prior_weight!r}")


def _check_private_kl_weights(model: str, spec: ModelSpec, private_dim: int, weights) -> None:
    if not spec.optional_private or private_dim == 0:
        raise ValueError(f"private_kl_weights go with modality-specific latents (private_dim > 0) of the models "
                         f"{_models_with('optional_private')}; model={model!r}, private_dim={private_dim!r} got "
                         f"private_kl_weights={weights!r}")
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise ValueError(f"private_kl_weights must be a list of one number per modality, got {weights!r}")
    for value in weights:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"private_kl_weights must be finite non-negative numbers, got {list(weights)!r}")


def _softmax_log_variance(out: torch.Tensor, latent: objectives.LatentFamily) -> torch.Tensor:
    """The log-variance of posteriors of the MMVAE code's scales ``softmax(out) * n + SOFTMAX_SCALE_FLOOR`` over the
    last axis of ``n`` coordinates (standard deviations of a normal, ``b`` of a Laplace), their log from the
    log-softmax (no ``log`` of an underflowed softmax)."""
    n = out.shape[-1]
    log_scale = torch.logaddexp(torch.log_softmax(out, -1) + math.log(n),
                                torch.full((), math.log(SOFTMAX_SCALE_FLOOR), dtype=out.dtype, device=out.device))
    return latent.log_variance(log_scale)


class PrivateLatent(nn.Module):
    """A decoder of ``(z, w)``: the shared latent and a modality-specific one of size ``private_dim``; given ``z``
    alone (generation), ``w`` is drawn from its prior (of the ``latent`` family, default ``N(0, I)``)."""

    def __init__(self, decoder: nn.Module, private_dim: int, latent: objectives.LatentFamily = objectives.NORMAL):
        super().__init__()
        self.decoder, self.private_dim, self.latent = decoder, private_dim, latent

    def forward(self, z: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        if w is None:
            w = self.latent.prior_sample(z.shape[:-1] + (self.private_dim,), dtype=z.dtype, device=z.device)
        return self.decoder(torch.cat([z, w], -1))


class TopDownPrivate(nn.Module):
    """Hölder++'s private posterior ``q(w | x, z)`` of one modality: the encoder's private statistics of ``x``
    (``mu``, ``logvar``, each of size ``private_dim``) plus a correction computed from them and the shared ``z``
    by a two-layer perceptron (``[mu, logvar, z]`` -> ``hidden`` (leaky ReLU, slope 0.2) -> ``2 private_dim``).
    Its last layer starts at zero, so Hölder++ starts as Hölder+ and learns how ``z`` moves the private
    posterior."""

    def __init__(self, shared_dim: int, private_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = 2 * (shared_dim + private_dim) if hidden is None else hidden
        self.private_dim = private_dim
        self.net = nn.Sequential(nn.Linear(2 * private_dim + shared_dim, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, 2 * private_dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor):
        """``mu``, ``logvar`` ``(B, P)`` and ``z`` ``(..., B, D)`` -> the posterior's ``(mu, logvar)``, ``(..., B, P)``."""
        mu, logvar = mu.expand(z.shape[:-1] + mu.shape[-1:]), logvar.expand(z.shape[:-1] + logvar.shape[-1:])
        delta = self.net(torch.cat([mu, logvar, z], -1))
        return mu + delta[..., :self.private_dim], logvar + delta[..., self.private_dim:]


def _one_component(loc: torch.Tensor, logvar: torch.Tensor) -> opf.GaussianMixture:
    """A Gaussian pool ``(B, D)`` as a mixture of one component, as the mixture posteriors are given."""
    return opf.GaussianMixture(torch.zeros_like(loc[..., :1]), loc.unsqueeze(-2), logvar.unsqueeze(-2))


class MultimodalVAE(nn.Module):
    """Encoders and decoders per modality, an aggregator and an objective.

    Args:
        encoders, decoders: one module per modality (``encoder(x_m) -> (mu, logvar)``, ``decoder(z) -> loc`` for
            an image, logits for a text).
        model: a key of ``MODELS``.
        beta: weight of the KL term.
        alpha: the Hölder exponent of ``model="holder"`` / ``"holder_mixture"`` (0 or 1/n).
        learnable_weights: learn the pooling weights over modalities (the models whose spec is ``weighted``).
        modalities: the ``data.Modality`` of each encoder: its likelihood weight is by relative dimensionality
            (``data.reconstruction_weights``) and text modalities get a categorical likelihood (default: images of
            equal size, all weights 1).
        num_samples, estimator: importance samples per modality and the bound (``"elbo"``, ``"iwae"``,
            ``"dreg"``, ``"dreg_unbiased"`` but for ``holderplusplus``; ``objectives.mmvae_objective``).
        likelihood, likelihood_scale: the decoders' fixed-scale likelihood (``objectives.Likelihood``).
        private_dim: the modality-specific latent size (MMVAE+; optional for the models whose spec is
            ``optional_private``): the encoders' last ``private_dim`` outputs and the decoders' last inputs;
            ``encode`` and the pooling see the shared part only, ``decode`` draws the private part.
        latent_dim: the shared latent size; models with top-down private posteriors (Hölder++) need it for their
            ``TopDownPrivate`` modules.
        posterior_scale: ``"free"`` (the encoders' second outputs are log-variances) or ``"softmax"`` (MMVAE's
            and MMVAE+'s: standard deviations ``softmax(out) * n + 1e-6`` over the shared and, separately, the
            private coordinates; ``POSTERIOR_SCALES``).
        private_kl_weights: one weight per modality of its modality-specific latent's KL (MoPoE's
            ``style_weights``; ``None``: all 1), for the models whose spec is ``optional_private``.
        latent_family: the posteriors' and prior's family (``objectives.LatentFamily``): ``"normal"``, or for the
            models whose spec is ``laplace`` (MMVAE, MMVAE+) ``"laplace"``, their code's Laplace posteriors, prior
            ``Laplace(0, 1)`` and Laplace auxiliary distributions.
        normal_prior_weight: for the models whose spec is ``mixed_prior`` (MMVM), the weight ``a`` of ``N(0, I)``
            in their prior ``a N(0, I) + (1 - a) h(z_m | X)`` (``objectives.mmvm_objective``; 0: none).

    Under autocast the networks run in reduced precision; the aggregation, the KL and the log-likelihoods are
    computed in float32 (or float64 for a float64 model).
    """

    def __init__(self, encoders: nn.ModuleList, decoders: nn.ModuleList, model: str = "helvae", beta: float = 1.0,
                 alpha: float = 0.5, learnable_weights: bool = False, modalities=None,
                 num_samples: int = 1, estimator: str = "elbo", likelihood: str = "laplace",
                 likelihood_scale: float = objectives.LAPLACE_SCALE, private_dim: int = 0,
                 latent_dim: int | None = None, posterior_scale: str = "free", private_kl_weights=None,
                 latent_family: str = "normal", normal_prior_weight: float = 0.0):
        super().__init__()
        check_options(model, alpha, learnable_weights, num_samples, estimator, likelihood, likelihood_scale,
                      private_dim, posterior_scale, private_kl_weights, latent_family, normal_prior_weight)
        self.posterior_scale, self.latent = posterior_scale, objectives.LatentFamily(latent_family)
        if len(encoders) != len(decoders):
            raise ValueError(f"{len(encoders)} encoders but {len(decoders)} decoders; they must pair up")
        if private_kl_weights is not None and len(private_kl_weights) != len(encoders):
            raise ValueError(f"private_kl_weights needs one weight per modality ({len(encoders)}), got "
                             f"{list(private_kl_weights)!r}")
        # not in the state dict: a run's config holds them, and checkpoints from before the option still load
        self.register_buffer("private_kl_weights", None if private_kl_weights is None else
                             torch.tensor([float(w) for w in private_kl_weights]), persistent=False)
        self.private_dim = int(private_dim)
        self.spec = spec = MODELS[model]
        self.auxiliary_logits = None
        if self.private_dim:
            decoders = nn.ModuleList(PrivateLatent(decoder, self.private_dim, self.latent) for decoder in decoders)
            if spec.auxiliary:  # MMVAE+'s auxiliary distributions of the modality-specific latents
                self.auxiliary_logits = nn.Parameter(torch.zeros(len(encoders), self.private_dim))
        self.encoders, self.decoders = encoders, decoders
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 < beta < math.inf:
            raise ValueError(f"beta must be a positive finite number, got {beta!r}")
        self.model, self.beta, self.alpha = model, float(beta), float(alpha)
        self.top_down = None
        if spec.top_down:
            if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
                raise ValueError(f"model={model!r} needs latent_dim (the shared latent size, a positive integer), "
                                 f"got latent_dim={latent_dim!r}")
            self.top_down = nn.ModuleList(TopDownPrivate(latent_dim, self.private_dim) for _ in encoders)
        objective = spec.objective
        if spec.multi_sample:
            objective = functools.partial(objective, beta=self.beta, num_samples=int(num_samples),
                                          estimator=estimator)
        if self.private_dim:
            objective = functools.partial(objective, private_dim=self.private_dim)
        if spec.components:
            objective = functools.partial(objective, members=opf.holder_mixture_members(len(encoders), alpha))
        if spec.laplace:
            objective = functools.partial(objective, latent=self.latent)
        if spec.mixed_prior:
            objective = functools.partial(objective, normal_prior_weight=float(normal_prior_weight))
        self.objective = objective
        self._aggregator = spec.make_aggregator(alpha, latent_family)
        self.pool_logits = nn.Parameter(torch.zeros(len(encoders))) if learnable_weights else None
        if modalities is None:
            weights, text = torch.ones(len(encoders)), None
        else:
            if len(modalities) != len(encoders):
                raise ValueError(f"{len(modalities)} modalities but {len(encoders)} encoders; they must pair up")
            weights, text = reconstruction_weights(modalities), [m.is_text for m in modalities]
        self.likelihood = objectives.Likelihood(weights, likelihood, likelihood_scale, text)

    @property
    def num_modalities(self) -> int:
        return len(self.encoders)

    @property
    def device(self) -> torch.device:
        """Where the model lives: the device of the likelihood weights, a buffer every model has (one without
        parameters too)."""
        return self.likelihood.weights.device

    def aggregate(self, mu, logvar, **kwargs):
        """The model's pooling of unimodal posteriors ``(M, B, D)`` (in float32, also under autocast)."""
        if self.pool_logits is not None:
            kwargs["weights"] = torch.softmax(self.pool_logits, 0)
        kwargs.setdefault("dim", 0)
        kwargs.setdefault("validate_args", False)
        with torch.autocast(mu.device.type, enabled=False):
            return self._aggregator(objectives.full_precision(mu), objectives.full_precision(logvar), **kwargs)

    def _everything(self, x) -> torch.Tensor:
        """All modalities present, ``(M, B)``."""
        first = as_modalities(x)[0]
        return torch.ones(self.num_modalities, first.shape[0], dtype=torch.bool, device=first.device)

    def _modalities(self, x) -> list[torch.Tensor]:
        """``as_modalities(x)``, one per encoder."""
        x = as_modalities(x)
        if len(x) != self.num_modalities:
            raise ValueError(f"x has {len(x)} modalities but the model has {self.num_modalities}")
        return x

    def checked_mask(self, x, mask, name: str = "present") -> torch.Tensor:
        """``mask`` if it is a boolean ``(M, B)`` mask of the batch ``x`` marking a modality of every sample (else a
        ValueError naming it ``name``): a sample of none has no posterior, and the objectives gave NaN losses, a
        finite one or an unrelated error, model by model; a likelihood of no targets was 0."""
        first = as_modalities(x)[0]
        expected = (self.num_modalities, first.shape[0])
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != expected:
            shown = (f"{mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor)
                     else type(mask).__name__)
            raise ValueError(f"{name} must be a boolean tensor of shape {expected} (modalities, batch), got {shown}")
        empty = ~mask.any(0)
        if bool(empty.any()):
            samples = empty.nonzero().flatten().tolist()
            raise ValueError(f"{name} must mark at least one modality of every sample; samples {samples[:5]}"
                             + (f" (and {len(samples) - 5} more)" if len(samples) > 5 else "") + " have none")
        return mask

    def private_posterior(self, x):
        """The encoders' ``(mu, logvar)`` of the modality-specific latents, each ``(M, B, private_dim)`` (None
        without them); Hölder++'s posterior also depends on the shared latent: ``private_given``."""
        return self.encode_with_private(x)[2] if self.private_dim else None

    def encode_with_private(self, x):
        """``(mu, logvar, private)``: ``encode``'s and ``private_posterior``'s results from one pass of the
        encoders (evaluation needs both for the models with modality-specific latents)."""
        mu, logvar = self._encode(x)
        if not self.private_dim:
            return mu, logvar, None
        shared, own = slice(None, -self.private_dim), slice(-self.private_dim, None)
        return mu[..., shared], logvar[..., shared], (mu[..., own], logvar[..., own])

    def private_given(self, private, target: int, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Modality ``target``'s posterior ``(mu, logvar)`` of its modality-specific latent given the shared ``z``
        ``(..., B, D)``, from ``private`` (``private_posterior``): the encoder's, through ``top_down`` for Hölder++
        (``q(w | x, z)``, as it trains), each broadcast to ``(..., B, private_dim)``."""
        mu, logvar = private[0][target], private[1][target]
        if self.top_down is not None:
            mu, logvar = self.top_down[target](mu, logvar, z)
        shape = z.shape[:-1] + mu.shape[-1:]
        return mu.expand(shape), logvar.expand(shape)

    def decode(self, z: torch.Tensor, target: int, given: torch.Tensor | None = None, private=None,
               generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        """Decoder ``target``'s output for the shared latent ``z`` ``(..., B, D)``, modality-specific latents drawn
        as MMVAE+ generates: ``w`` from its posterior ``private`` (``private_posterior``) when ``given[target]``
        (``(M, B)``; a reconstruction), else from its prior (``self.latent``'s) (a cross-modal or unconditional
        generation; ``r_n`` only stands in for it in training). ``sample=False``: the posterior mean instead of a
        draw. Draws use ``generator``. Without modality-specific latents: ``decoders[target](z)``.

        Raises ``FloatingPointError`` on a non-finite output: the metrics built on generations would otherwise read
        it silently (a NaN image classifies as label 0 everywhere, so a diverged model scored unconditional
        coherence 1, and FID saw black images)."""
        output = self._decode(z, target, given, private, generator, sample)
        if not bool(torch.isfinite(output).all()):
            raise FloatingPointError(f"decoder {target} gave {int((~torch.isfinite(output)).sum())} non-finite "
                                     f"outputs (of {output.numel()}): the model has diverged")
        return output

    def _decode(self, z, target, given, private, generator, sample):
        decoder = self.decoders[target]
        if not self.private_dim:
            return decoder(z)
        shape = z.shape[:-1] + (self.private_dim,)
        w = self.latent.prior_sample(shape, generator=generator, dtype=z.dtype, device=z.device)
        if given is not None and private is not None:
            mu, logvar = self.private_given(private, target, z)
            own = self.latent.rsample(mu, logvar, generator) if sample else mu
            w = torch.where(given[target].unsqueeze(-1), own.to(z.dtype), w)
        return decoder(z, w)

    def encode(self, x):
        """Unimodal posteriors ``(mu, logvar)`` of the shared latent, each ``(M, B, D)``, from inputs ``x`` (see
        ``as_modalities``)."""
        return self.encode_with_private(x)[:2]

    def _encode(self, x):
        """Every encoder output, modality-specific latents included."""
        x = self._modalities(x)
        stats = [encoder(x_m) for x_m, encoder in zip(x, self.encoders)]
        mu, logvar = torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats])
        mu, logvar = objectives.full_precision(mu), objectives.full_precision(logvar)
        if self.posterior_scale == "softmax":
            parts = logvar.split([logvar.shape[-1] - self.private_dim, self.private_dim], -1)
            logvar = torch.cat([_softmax_log_variance(part, self.latent) for part in parts if part.shape[-1]], -1)
        return mu, logvar

    def auxiliary_scale(self) -> torch.Tensor:
        """The scales ``(M, private_dim)`` (standard deviations, Laplace ``b``) of the auxiliary ``r_n`` that supply
        the private latents of the modalities a draw does not reconstruct from their posteriors: learnable, but as
        in the MMVAE+ code (``softmax(logits) * private_dim``) their mean over the coordinates is one, the prior's,
        from which the evaluation draws the private latents of the modalities it generates. Free scales shrank in
        training (see docs/results.md), so that the decoders learned private latents near zero and met the prior's
        wider ones at evaluation."""
        return torch.softmax(self.auxiliary_logits, dim=-1) * self.private_dim

    def forward(self, x, present: torch.Tensor | None = None, kl_weight: float = 1.0) -> dict:
        """Loss and its terms for a batch ``x`` (a tensor per modality, or stacked ``(B, M, ...)``) with present
        modalities ``(M, B)`` (default all); the KL term weighted by ``beta * kl_weight`` (a warm-up's
        ``kl_weight < 1``; in the multi-sample objectives, the weight of ``log p(z) - log q(z | X)``)."""
        if isinstance(kl_weight, bool) or not isinstance(kl_weight, numbers.Real) or not 0 <= kl_weight < math.inf:
            raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight!r}")
        x = self._modalities(x)
        present = self._everything(x) if present is None else self.checked_mask(x, present)
        # an absent modality's input is no data: zeros stand in for it before the encoders, so that a NaN placeholder
        # (masked from the loss below) does not make the encoders' weight gradients NaN through 0 * NaN
        x = [torch.where(present[m].reshape((-1,) + (1,) * (x_m.dim() - 1)), x_m,
                         torch.zeros((), dtype=x_m.dtype, device=x_m.device)) for m, x_m in enumerate(x)]
        mu, logvar = self._encode(x)
        # an absent modality's encoder output is no posterior: N(0, I) stands in for it, so that whatever it holds
        # (an overflow) reaches neither the objective, which masks it late (draws, decoders, KLs), nor its gradients
        given = present.unsqueeze(-1)
        mu, logvar = torch.where(given, mu, 0), torch.where(given, logvar, 0)
        beta = self.beta * kl_weight
        extra = {"auxiliary_scale": self.auxiliary_scale()} if self.auxiliary_logits is not None else {}
        if self.spec.multi_sample:
            extra["beta"] = beta
        if self.top_down is not None:
            extra["top_down"] = self.top_down
        if self.private_kl_weights is not None:
            extra["private_kl_weights"] = self.private_kl_weights
        terms = self.objective(as_modalities(x), present, mu, logvar, self.decoders, self.likelihood, self.pooling,
                               **extra)
        objective = terms.reconstruction - beta * terms.kl if terms.objective is None else terms.objective
        loss = -objective.mean()
        return {"loss": loss, "reconstruction": terms.reconstruction.mean().detach(), "kl": terms.kl.mean().detach()}

    def posterior_mixture(self, x, present: torch.Tensor | None = None) -> opf.GaussianMixture:
        """The joint posterior ``q(z | X)`` as a mixture over ``(B, K, D)`` (one component for the Gaussian pools)."""
        return self.pool(*self.encode(x), self._everything(x) if present is None else present)

    @property
    def pooling(self) -> Callable:
        """What the objective pools with: ``pool_subsets`` for the ``"subsets"`` models, else ``aggregate``."""
        return self.pool_subsets if self.spec.posterior == "subsets" else self.aggregate

    def pool_subsets(self, mu: torch.Tensor, logvar: torch.Tensor, mask: torch.Tensor,
                     subsets: torch.Tensor | None = None) -> opf.GaussianMixture:
        """The uniform mixture over modality ``subsets`` (default all) of the model's aggregator (``"subsets"``
        models), in float32 also under autocast. The aggregator itself goes to ``opinionpool.functional.
        subset_mixture``, which then computes the components shared by all subsets once (poe, hellinger,
        wasserstein_barycenter) instead of pooling a copy of the inputs per subset."""
        kwargs = {} if self.pool_logits is None else {"weights": torch.softmax(self.pool_logits, 0)}
        with torch.autocast(mu.device.type, enabled=False):
            return opf.subset_mixture(self._aggregator, objectives.full_precision(mu),
                                      objectives.full_precision(logvar), dim=0, mask=mask, subsets=subsets,
                                      prior_on_full_subset=self.spec.prior_on_full_subset, validate_args=False,
                                      **kwargs)

    def pool(self, mu: torch.Tensor, logvar: torch.Tensor, present: torch.Tensor) -> opf.GaussianMixture:
        """The joint posterior from unimodal posteriors ``(M, B, D)`` and present modalities ``(M, B)``."""
        if self.spec.posterior == "subsets":
            return self.pool_subsets(mu, logvar, present)
        if self.spec.posterior == "mixture":
            return self.aggregate(mu, logvar, mask=present)
        loc, logvar = self.aggregate(mu, logvar, mask=present)
        return _one_component(loc, logvar)

    def conditional_posterior(self, mu: torch.Tensor, logvar: torch.Tensor, given: torch.Tensor) -> opf.GaussianMixture:
        """``q(z | X_S)``, what the evaluation conditions on the modalities ``given`` ``(M, B)`` with (generation,
        coherence, probes, conditional likelihoods): for the subset-mixture models, their aggregator on the given
        modalities alone, with MoPoE's prior expert where every modality is given, as the MoPoE code (and HELVAE's
        fork of it) conditions; not ``pool``'s mixture over the subsets of the given modalities (the training
        posterior of a tuple with modalities missing, which puts most of its mass on fewer inputs). The other
        models: ``pool``."""
        if self.spec.posterior != "subsets":
            return self.pool(mu, logvar, given)
        if self.spec.prior_on_full_subset:
            prior = mu.new_zeros((1,) + mu.shape[1:])
            mu, logvar = torch.cat((mu, prior)), torch.cat((logvar, prior))
            given = torch.cat((given, given.all(0, keepdim=True)))
        loc, logvar = self.aggregate(mu, logvar, mask=given)
        return _one_component(loc, logvar)

    @torch.no_grad()
    def posterior(self, x, present: torch.Tensor | None = None):
        """The posterior given the modalities ``present`` (default all) as the evaluation conditions on them
        (``conditional_posterior``), as a mean and log-variance ``(B, D)`` (mixtures: their moment-matched
        Gaussian)."""
        mixture = self.conditional_posterior(*self.encode(x), self._everything(x) if present is None else present)
        if mixture.loc.shape[-2] == 1:
            return mixture.loc[..., 0, :], mixture.logvar[..., 0, :]
        return mixture.moments()
