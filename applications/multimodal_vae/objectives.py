"""Likelihoods and the ELBO variants of the multimodal VAEs.

Every objective returns per-sample terms; the pooling itself always comes from ``opinionpool.functional``
(passed in as ``aggregate`` functions), never from a copy here. Conventions: images have a Laplace likelihood
with fixed scale 0.75 on the raw decoder output (as in the MoPoE and HELVAE code; a fixed-scale normal is the
alternative, see ``Likelihood``), text a categorical one; ``beta`` weights the KL (or, for MMVAE, the
``log p(z) - log q(z|X)`` part); modalities are weighted by relative dimensionality. ``x`` is a sequence with one
tensor per modality (``(B, ...)`` each). The objectives draw, decode and score every modality and mask the absent
ones afterwards: their ``mu`` and ``logvar`` must be finite, as ``MultimodalVAE.forward`` makes them (N(0, I)).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import nn

import opinionpool.functional as opf
from opinionpool.constants import LOG_2PI

__all__ = ["ESTIMATORS", "LAPLACE_SCALE", "LATENT_FAMILIES", "NORMAL", "LatentFamily", "Likelihood", "Terms",
           "categorical_log_likelihood", "full_precision", "holder_plus_objective", "joint_elbo",
           "kl_to_standard_normal", "laplace_log_likelihood", "mixture_elbo", "mmvae_objective", "mmvae_plus_objective",
           "mmvm_objective", "mvae_elbo", "normal_image_log_likelihood", "reparameterise", "standard_normal_log_prob",
           "stratified_mixture_elbo", "subset_mixture_elbo"]

LAPLACE_SCALE = 0.75


class Terms(NamedTuple):
    """Per-sample ``reconstruction`` (weighted log-likelihood of the present modalities) and ``kl``; the loss to
    minimise is ``-objective`` averaged over the batch, with ``objective = reconstruction - beta * kl`` unless the
    objective gives its own."""

    reconstruction: torch.Tensor
    kl: torch.Tensor
    #: the per-sample objective to maximise when it is not ``reconstruction - beta * kl`` (IWAE, DReG)
    objective: torch.Tensor | None = None


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when autocast produced a half-precision tensor; float32 and float64 are kept."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def laplace_log_likelihood(x: torch.Tensor, loc: torch.Tensor, scale: float = LAPLACE_SCALE) -> torch.Tensor:
    """``log Laplace(x; loc, scale)`` summed over the three image axes."""
    return (-(x - loc).abs() / scale - math.log(2 * scale)).flatten(-3).sum(-1)


def normal_image_log_likelihood(x: torch.Tensor, loc: torch.Tensor, scale: float) -> torch.Tensor:
    """``log N(x; loc, scale^2)`` summed over the three image axes."""
    return (-0.5 * ((x - loc) / scale) ** 2 - math.log(scale) - 0.5 * LOG_2PI).flatten(-3).sum(-1)


def categorical_log_likelihood(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``log Cat(ids; softmax(logits))`` summed over the sequence: ``ids`` ``(B, L)``, ``logits`` ``(..., B, L, V)``."""
    log_probs = torch.log_softmax(logits, -1)
    return log_probs.gather(-1, ids.expand(log_probs.shape[:-1]).unsqueeze(-1)).squeeze(-1).sum(-1)


class Likelihood(nn.Module):
    """The decoders' likelihood: ``sum_m w_m [m present] log p(x_m | z)``. Images have a fixed-scale ``family`` on
    the raw decoder output, ``"laplace"`` (the papers' choice, scale 0.75) or ``"normal"``; text modalities
    (``text[m]``) a categorical over the vocabulary at every position (the decoder gives logits).

    Why the normal alternative: under a Laplace likelihood the optimal output is a per-pixel *median*, which
    ignores a digit stroke wherever the latent does not yet make it more likely than not; the digit is learned
    slowly (on PolyMNIST, a unimodal VAE's self-coherence is 0.13-0.27 after 2 000 steps). A normal likelihood's
    *mean* shows the stroke from the start (0.74 after 2 000 steps), which is what a CPU budget needs."""

    FAMILIES = {"laplace": laplace_log_likelihood, "normal": normal_image_log_likelihood}

    def __init__(self, weights: torch.Tensor, family: str = "laplace", scale: float = LAPLACE_SCALE, text=None):
        super().__init__()
        self.check(family, scale)
        self.family, self.scale = family, float(scale)
        self.register_buffer("weights", torch.as_tensor(weights, dtype=torch.float32))
        self.text = tuple(bool(t) for t in text) if text is not None else (False,) * self.weights.numel()
        if len(self.text) != self.weights.numel():
            raise ValueError(f"{self.weights.numel()} weights but {len(self.text)} text flags; they must pair up")

    @classmethod
    def check(cls, family: str, scale: float) -> None:
        if family not in cls.FAMILIES:
            raise ValueError(f"likelihood must be one of {sorted(cls.FAMILIES)}, got {family!r}")
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < scale < math.inf:
            raise ValueError(f"likelihood scale must be a positive finite number, got {scale!r}")

    def log_prob(self, x: torch.Tensor, output: torch.Tensor, modality: int = 0) -> torch.Tensor:
        """``log p(x_m | decoder output)`` summed over the modality's axes."""
        if self.text[modality]:
            return categorical_log_likelihood(x, full_precision(output))
        return self.FAMILIES[self.family](x, full_precision(output), self.scale)

    def forward(self, x, present: torch.Tensor, z, decoders, weighted: bool = True) -> torch.Tensor:
        """``x`` a tensor per modality ``(B, ...)``, ``present`` ``(M, B)``, ``z`` ``(..., B, D)`` -> ``(..., B)``;
        ``z`` may instead be a list with each decoder's arguments (a tuple), as MMVAE+ decodes with
        modality-specific latents. ``weighted=False`` drops the training weights ``w_m``: ``log p(X_present | z)``
        itself, a normalised density (what evaluation scores)."""
        inputs = z if isinstance(z, list) else [(z,)] * len(decoders)
        first = inputs[0][0]
        total = torch.zeros(first.shape[:-1], dtype=full_precision(first).dtype, device=first.device)
        for m, decoder in enumerate(decoders):
            total = total + self.modality(x, present, inputs[m], decoder, m, weighted)
        return total

    def modality(self, x, present: torch.Tensor, inputs: tuple, decoder: nn.Module, m: int,
                 weighted: bool = True) -> torch.Tensor:
        """Modality ``m``'s term ``w_m [m present] log p(x_m | decoder(*inputs))`` ``(..., B)`` (``w_m = 1`` unless
        ``weighted``): one decoder pass."""
        log_lik = self.log_prob(x[m], decoder(*inputs), m)
        log_lik = torch.where(present[m], log_lik, torch.zeros_like(log_lik))
        return self.weights[m] * log_lik if weighted else log_lik


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))`` summed over the latent axis."""
    zero = mu.new_zeros(())
    return opf.diag_gaussian_kl(mu, logvar, zero, zero)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` summed over the latent axis (the prior)."""
    zero = z.new_zeros(())
    return opf.diag_gaussian_log_prob(z, zero, zero)


def reparameterise(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


#: the families of the latent posteriors and prior (``model.latent_family``)
LATENT_FAMILIES = opf.MIXTURE_FAMILIES


class LatentFamily:
    """The family of the latent posteriors and of the prior: ``"normal"`` (posteriors ``N(mu, exp(logvar))``,
    prior ``N(0, I)``) or ``"laplace"`` (the MMVAE and MMVAE+ code's: diagonal Laplace posteriors, ``logvar``
    their log-variances, and the fixed prior ``Laplace(0, 1)``, of variance 2 per coordinate). A *scale* is the
    unit in which that code states its posteriors' and auxiliary distributions' spreads: the standard deviation
    of a normal, ``b`` of a Laplace."""

    def __init__(self, name: str = "normal"):
        if name not in LATENT_FAMILIES:
            raise ValueError(f"latent_family must be one of {LATENT_FAMILIES}, got {name!r}")
        self.name = name
        self._log_prob = opf.diag_gaussian_log_prob if name == "normal" else opf.diag_laplace_log_prob
        # log(variance / scale^2): 0 for a normal, log 2 for a Laplace
        self._log_variance_per_scale = 0.0 if name == "normal" else math.log(2.0)

    def __repr__(self) -> str:
        return f"LatentFamily({self.name!r})"

    def log_prob(self, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """The posterior's log-density, summed over the latent axis; the arguments broadcast."""
        return self._log_prob(z, mu, logvar)

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """The prior's log-density, summed over the latent axis."""
        return self._log_prob(z, z.new_zeros(()), z.new_full((), self._log_variance_per_scale))

    def prior_sample(self, shape, *, dtype=None, device=None, generator: torch.Generator | None = None):
        """Draws of the prior (of scale 1) of ``shape``."""
        if self.name == "normal":
            return torch.randn(shape, dtype=dtype, device=device, generator=generator)
        return opf.standard_laplace(shape, dtype=dtype, device=device, generator=generator)

    def rsample(self, mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None):
        """A reparameterised draw of the posterior of the shape of ``mu``."""
        noise = self.prior_sample(mu.shape, dtype=mu.dtype, device=mu.device, generator=generator)
        return mu + torch.exp(0.5 * (logvar - self._log_variance_per_scale)) * noise

    def log_variance(self, log_scale: torch.Tensor) -> torch.Tensor:
        """The log-variance of a posterior of scale ``exp(log_scale)``."""
        return 2 * log_scale + self._log_variance_per_scale


#: the default family: the normal posteriors and the ``N(0, I)`` prior of every model
NORMAL = LatentFamily("normal")


def joint_elbo(x, present, mu, logvar, decoders, likelihood, aggregate, private_dim=0,
               private_kl_weights=None) -> Terms:
    """HELVAE, the moment-matched Hölder VAEs and WB-VAE: one ELBO with the aggregated Gaussian posterior.

    With ``private_dim`` (the last coordinates of each posterior, as in MMVAE+) every present modality ``n`` is
    reconstructed from ``(z, w_n)`` with ``w_n ~ q(w_n | x_n)``, and ``kl`` adds ``KL(q(w_n | x_n) || N(0, I))``
    of the present modalities (times ``private_kl_weights[n]`` if given). ``z`` is sampled after aggregation, from
    every present modality at once, so each private latent only ever reconstructs its own modality: nothing stops
    ``w_n`` from carrying all of ``x_n`` (the shortcut the Hölder++ paper names; a missing modality is not
    reconstructed, so ``r_n`` is never used)."""
    shared = mu.shape[-1] - private_dim
    joint_mu, joint_logvar = aggregate(mu[..., :shared], logvar[..., :shared], mask=present)
    z = reparameterise(joint_mu, joint_logvar)
    kl = kl_to_standard_normal(joint_mu, joint_logvar)
    if not private_dim:
        return Terms(likelihood(x, present, z, decoders), kl)
    return _with_own_private_latents(x, present, z, kl, mu[..., shared:], logvar[..., shared:], decoders, likelihood,
                                     private_kl_weights)


def _with_own_private_latents(x, present, z, kl, own_mu, own_logvar, decoders, likelihood,
                              private_kl_weights=None) -> Terms:
    """Every present modality ``n`` reconstructed from ``(z, w_n)``, ``w_n ~ q(w_n | x_n)`` (its own posterior
    ``own_mu``, ``own_logvar`` ``(M, B, P)``), and ``KL(q(w_n | x_n) || N(0, I))`` of the present modalities added
    to ``kl``, each times ``private_kl_weights[n]`` (``(M,)``; default 1: MoPoE's ``style_weights``)."""
    w = reparameterise(own_mu, own_logvar)
    kl_private = torch.where(present, kl_to_standard_normal(own_mu, own_logvar), 0)
    if private_kl_weights is not None:
        kl_private = kl_private * private_kl_weights.to(kl_private.dtype).unsqueeze(-1)
    kl_private = kl_private.sum(0)
    return Terms(likelihood(x, present, [(z, w[n]) for n in range(len(decoders))], decoders), kl + kl_private)


def mixture_elbo(x, present, mu, logvar, decoders, likelihood, aggregate) -> Terms:
    """The Hölder VAE with the exact pool as its posterior (``aggregate`` = ``opinionpool.functional.holder_mixture``):
    ``z`` is sampled by component (a component by its weight, reparameterised within it; the choice itself carries
    no gradient), and ``kl`` is the single-sample estimate ``log q(z|X) - log p(z)`` with the exact mixture density.
    The value is unbiased, the gradient in the mixture weights is not: with the choice detached, their only path is
    ``log q(z|X)``, whose expected gradient in them is zero, so they train as if stopped
    (``stratified_mixture_elbo`` gives them their exact gradient)."""
    mixture = aggregate(mu, logvar, mask=present)
    z = mixture.sample()
    log_p = standard_normal_log_prob(z)
    return Terms(likelihood(x, present, z, decoders), mixture.log_prob(z) - log_p)


def mvae_elbo(x, present, mu, logvar, decoders, likelihood, aggregate) -> Terms:
    """MVAE: the joint ELBO of the product with a prior expert plus, for each present modality, the ELBO of its
    own posterior (times the prior) reconstructing that modality alone: only its decoder runs (M + M decoder passes a
    step, not M + M^2). The unimodal terms take no reconstruction weight (MoPoE's ``calc_elbo``: ``rec_weight_mod =
    1.0``), the joint one the modalities' weights."""
    terms = joint_elbo(x, present, mu, logvar, decoders, likelihood, aggregate)
    rec, kl = terms.reconstruction, terms.kl
    for m in range(mu.shape[0]):
        only = torch.zeros_like(present)
        only[m] = present[m]
        uni_mu, uni_logvar = aggregate(mu, logvar, mask=only)
        z = reparameterise(uni_mu, uni_logvar)
        rec = rec + likelihood.modality(x, present, (z,), decoders[m], m, weighted=False)
        kl = kl + torch.where(present[m], kl_to_standard_normal(uni_mu, uni_logvar), torch.zeros_like(kl))
    return Terms(rec, kl)


def subset_mixture_elbo(x, present, mu, logvar, decoders, likelihood, aggregate, private_dim=0,
                        private_kl_weights=None) -> Terms:
    """MoPoE, MoHELVAE, MWB-VAE: the uniform mixture over modality subsets, ``aggregate(mu, logvar, mask=,
    subsets=)`` (``MultimodalVAE.pool_subsets``: ``opinionpool.functional.subset_mixture`` of the model's
    aggregator, MoPoE's with a standard-normal expert in the subset of all modalities). Stratified as in MoPoE: the
    batch is cut into contiguous chunks, one subset per chunk (a sample whose subset has no present modality draws
    from its non-empty subsets instead); the KL is the average of the subset KLs. Chunks hold the floor or the
    ceiling of ``B / K`` samples, spread evenly (at batch 128 and 31 subsets, four chunks of 5 and 27 of 4): the
    same subsets' reconstructions weigh 25 % more in every batch's term. MoPoE's ``mixture_component_selection``
    gives each subset the floor and the last, the subset of all modalities, the remainder (8 at batch 128: twice
    the others' weight). Both are fixed biases of the stratification, which the published models trained with
    (theirs the larger); a random offset per batch would remove them.

    With ``private_dim`` (the last coordinates of each posterior), MoPoE's modality-specific latents: ``z`` from
    the chosen subset reconstructs each present modality ``n`` from ``(z, w_n)`` with ``w_n ~ q(w_n | x_n)``
    whether or not ``n`` is in the subset, and ``kl`` adds ``KL(q(w_n | x_n) || N(0, I))`` of every present
    modality in full, times ``private_kl_weights[n]`` if given (MoPoE's ``BaseMMVae.forward`` and
    ``calc_style_kld`` with its ``style_weights``, which the official HELVAE code keeps on CelebA; not MMVAE+'s
    auxiliary ``r_n`` for the modalities outside the subset)."""
    shared = mu.shape[-1] - private_dim
    subsets = opf.all_subsets(mu.shape[0], mu.device)  # (K, M), the order of the mixture's components
    mixture = aggregate(mu[..., :shared], logvar[..., :shared], mask=present, subsets=subsets)
    batch, num_subsets = mixture.log_weights.shape
    chosen = torch.arange(batch, device=mu.device) * num_subsets // batch
    valid = torch.isfinite(mixture.log_weights)
    fallback = torch.distributions.Categorical(logits=mixture.log_weights).sample()
    chosen = torch.where(valid.gather(1, chosen[:, None])[:, 0], chosen, fallback)
    rows = torch.arange(batch, device=mu.device)
    z = reparameterise(mixture.loc[rows, chosen], mixture.logvar[rows, chosen])
    subset_kl = kl_to_standard_normal(mixture.loc, mixture.logvar)  # (B, K)
    kl = (mixture.log_weights.exp() * torch.where(valid, subset_kl, torch.zeros_like(subset_kl))).sum(-1)
    if not private_dim:
        return Terms(likelihood(x, present, z, decoders), kl)
    return _with_own_private_latents(x, present, z, kl, mu[..., shared:], logvar[..., shared:], decoders, likelihood,
                                     private_kl_weights)


ESTIMATORS = ("elbo", "iwae", "dreg", "dreg_unbiased")


def mmvae_objective(x, present, mu, logvar, decoders, likelihood, aggregate, beta=1.0, num_samples=1,
                    estimator="elbo", latent=NORMAL) -> Terms:
    """MMVAE, stratified: for every present modality ``m``, ``K = num_samples`` draws ``z_k ~ q_m`` reconstruct all
    present modalities, with log-weights ``log w_k = log p(X|z_k) + beta (log p(z_k) - log q(z_k|X))`` where
    ``q(z|X)`` is the mixture of the present unimodal posteriors (``aggregate`` = ``opinionpool.functional.moe``).
    The per-modality bounds are averaged over the present modalities (outside the log, as in MMVAE):

    - ``"elbo"``: ``mean_k log w_k``;
    - ``"iwae"``: ``log mean_k w_k``;
    - ``"dreg"``: the doubly reparameterised IWAE gradient (Tucker et al., 2019) as the MMVAE code computes it:
      every posterior's parameters are detached inside ``log q``, the decoder gradient is weighted by the
      normalised weights ``w~`` and the path through ``z`` by ``(1 - beta) w~ + beta w~^2`` (their square at
      ``beta = 1``: the score term of ``beta log q``, which DReG turns into path terms, is ``beta`` times that of
      ``log q``). With two or more present modalities and ``K >= 2`` its mean is not the bound's gradient: the
      draws of stratum ``m`` come from ``q_m``, not from the mixture whose score it turns into path terms.
    - ``"dreg_unbiased"``: DReG for these strata. Of the score of ``log q(z|X)`` at a draw ``z_k ~ q_m``, only
      ``q_m``'s part, ``rho_m(z) d log q_m(z)`` with ``rho_m = pi_m q_m(z) / q(z|X)``, has the draws' density, and
      DReG's identity turns ``sum_k w~_k rho_m(z_k)`` times it into path terms: the path of ``log w_k`` weighted by
      ``w~_k (1 - beta rho_m(z_k) (1 - w~_k))``, less ``beta w~_k`` times the path of ``rho_m(z_k)``. The other
      posteriors' parameters stay live inside ``log q(z|X)`` (their score is kept as it is). The private
      latents of MMVAE+ have their own posterior as density and weight ``w~_k (1 - beta (1 - w~_k))``. Its mean is
      the gradient of the bound (tested by Monte Carlo against ``"iwae"``); at one modality it is ``"dreg"``.

      Either DReG's ``objective`` is a surrogate with that gradient; ``reconstruction`` and ``kl`` are the sample
      means of ``log p(X|z)`` and ``log q(z|X) - log p(z)`` in every case.

    ``latent``: the posteriors' and prior's ``LatentFamily`` (``aggregate`` must pool that family).
    """
    return mmvae_plus_objective(x, present, mu, logvar, decoders, likelihood, aggregate, beta, num_samples, estimator,
                                private_dim=0, latent=latent)


def _check_estimator(estimator: str, num_samples: int) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")


def _detached(mixture):
    return mixture._replace(log_weights=mixture.log_weights.detach(), loc=mixture.loc.detach(),
                            logvar=mixture.logvar.detach())


def _log_prob_own_stopped(mixture, z: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """The mixture's log-density at ``z`` with the parameters of the components where ``own`` (boolean, broadcasting
    against ``(..., C)``: the components each draw comes from) stopped, the others' and the weights live."""
    components = torch.where(own, _detached(mixture).component_log_probs(z), mixture.component_log_probs(z))
    return torch.logsumexp(mixture.log_weights + components, -1)


def _path_copy(draw: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``draw`` of a location-scale posterior (scale proportional to ``exp(logvar / 2)``) anew from its noise, a
    tensor of the same value whose gradient reaches ``mu`` and ``logvar`` without passing ``draw``'s hooks (no
    division by the scale, which a tiny variance would make 0 / 0)."""
    return mu + (draw - mu).detach() * torch.exp(0.5 * (logvar - logvar.detach()))


def _share_path(log_w: torch.Tensor, rho: torch.Tensor, beta: float) -> torch.Tensor:
    """``dreg_unbiased``'s second path term, ``- beta sum_k w~_k rho(z_k)`` with only ``rho``'s path live, as a
    term of value zero to add to the surrogate."""
    path = (torch.softmax(log_w, 0).detach() * rho).sum(0)
    return -beta * (path - path.detach())


def _bound(log_w: torch.Tensor, estimator: str, latents, beta: float = 1.0, shares=None) -> torch.Tensor:
    """The per-sample bound from log-weights ``(K, ...)`` whose ``log p(z) - log q(z | X)`` is weighted by
    ``beta``; for DReG, the IWAE bound's value with the gradient of the surrogate ``sum_k w~_k log w_k`` (``w~`` the
    normalised weights, detached), whose path gradient hooks on the reparameterised ``latents`` multiply by
    ``1 - beta share (1 - w~)``: the IWAE path term ``w~`` less ``beta`` times the score term of ``log q`` that has
    the draws' density, which DReG's identity makes ``share (w~ - w~^2)`` in the path. ``shares``, one per latent
    (``None``, the default, for one): that density's share of the score, ``rho`` of ``"dreg_unbiased"`` (whose
    remaining path term the caller adds); at one, ``(1 - beta) + beta w~`` (``w~^2`` in all at ``beta = 1``;
    ``w~``, the plain reparameterised gradient, at ``beta = 0``)."""
    if estimator == "elbo":
        return log_w.mean(0)
    if estimator == "iwae":
        return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])
    normalised = torch.softmax(log_w, 0).detach()
    others = (1 - normalised).unsqueeze(-1)  # (w~ - w~^2 = w~ (1 - w~))
    for latent, share in zip(latents, shares or [None] * len(latents)):
        factor = ((1 - beta) + beta * normalised).unsqueeze(-1) if share is None else 1 - beta * share.detach() * others
        if latent.requires_grad:
            latent.register_hook(lambda grad, w=factor: grad * w)
    # the value is the IWAE bound (the surrogate lies above it by up to log K), the gradient the surrogate's
    surrogate = (normalised * log_w).sum(0)
    return (torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])).detach() + surrogate - surrogate.detach()


def _responsibilities(mixture, z: torch.Tensor) -> torch.Tensor:
    """``pi_c q_c(z) / q(z)`` ``(..., C)`` at ``z`` ``(..., D)``, the mixture's parameters stopped (``z``'s path
    live)."""
    stopped = _detached(mixture)
    return torch.softmax(stopped.log_weights + stopped.component_log_probs(z), -1)


def mmvae_plus_objective(x, present, mu, logvar, decoders, likelihood, aggregate, beta=1.0, num_samples=1,
                         estimator="elbo", private_dim=1, auxiliary_scale=None, latent=NORMAL) -> Terms:
    """MMVAE+ (Palumbo et al., 2023): every posterior is over a shared ``z`` (the first ``D - private_dim``
    coordinates) and a modality-specific ``w_m`` (the last ``private_dim``). For every present modality ``m``,
    ``K`` draws ``(z, w_m) ~ q_m`` reconstruct ``x_m`` from ``(z, w_m)`` and every other present ``x_d`` from
    ``(z, w~_d)`` with ``w~_d`` drawn from the learnable auxiliary distribution, the prior's family of scales
    ``auxiliary_scale[d]``; the log-weights are ``log p(X | ...) + beta (log p(z) + log p(w_m) - log q(z|X) -
    log q(w_m|x_m))`` with ``q(z|X)`` the mixture of the present unimodal ``q(z|x_d)`` (``aggregate`` =
    ``opinionpool.functional.moe`` on the shared coordinates), bounded as in ``mmvae_objective``. ``latent``: the
    ``LatentFamily`` of posteriors, prior and auxiliary distributions (the MMVAE+ code's: ``"laplace"``). With
    ``private_dim=0`` it is ``mmvae_objective``: the decoders get ``z`` alone."""
    _check_estimator(estimator, num_samples)
    shared = mu.shape[-1] - private_dim
    mixture = aggregate(mu[..., :shared], logvar[..., :shared], mask=present)
    own_mu, own_logvar = mu[..., shared:], logvar[..., shared:]
    unbiased = estimator == "dreg_unbiased"
    if estimator.startswith("dreg"):  # a private latent's density is its draws' own: stopped in both DReGs
        own_mu, own_logvar = own_mu.detach(), own_logvar.detach()
    # in the posteriors' dtype: float32 accumulators cost a float64 model 1e-8 of its bound
    count = present.sum(0).clamp_min(1).to(mu.dtype)
    rec, kl, objective = (torch.zeros(mu.shape[1], dtype=mu.dtype, device=mu.device) for _ in range(3))
    for m in range(mu.shape[0]):
        u = latent.rsample(mu[m].expand(num_samples, *mu[m].shape), logvar[m].expand(num_samples, *mu[m].shape))
        z, w = u[..., :shared], u[..., shared:]
        inputs = z if not private_dim else [
            (z, w) if d == m else (z, latent.prior_sample(w.shape, dtype=w.dtype, device=w.device) * auxiliary_scale[d])
            for d in range(mu.shape[0])]
        shares = None
        if unbiased:  # q_m's score becomes path terms, the other posteriors' stays (these draws are not theirs)
            own = torch.arange(mu.shape[0], device=mu.device) == m
            log_q_z = _log_prob_own_stopped(mixture, z, own)
            rho = (_responsibilities(mixture, _path_copy(u, mu[m], logvar[m])[..., :shared]) * own).sum(-1)  # (K, B)
            shares = [torch.cat((rho.unsqueeze(-1).expand(z.shape), torch.ones_like(w)), -1)]
        else:
            log_q_z = (_detached(mixture) if estimator == "dreg" else mixture).log_prob(z)
        log_q = log_q_z + latent.log_prob(w, own_mu[m], own_logvar[m])
        log_p = latent.prior_log_prob(z) + latent.prior_log_prob(w)
        log_lik = likelihood(x, present, inputs, decoders)  # (K, B)
        log_w = log_lik + beta * (log_p - log_q)
        here = present[m].to(mu.dtype) / count
        rec = rec + here * log_lik.mean(0)
        kl = kl + here * (log_q - log_p).mean(0)
        bound = _bound(log_w, estimator, (u,), beta, shares)
        if unbiased:
            bound = bound + _share_path(log_w, rho, beta)
        objective = objective + here * bound
    return Terms(rec, kl, objective)


def _component_weights(mixture) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixture's weights ``pi`` as ``(C, B)`` (they carry their gradient) and which are positive (components
    of absent modalities have weight zero and are skipped)."""
    log_weights = mixture.log_weights.movedim(-1, 0)
    return log_weights.exp(), torch.isfinite(log_weights)


def _weighted_sum(weights: torch.Tensor, valid: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    """``sum_c pi_c terms_c`` over the components ``(C, B)``; a weight-zero component's term is replaced by 0
    before the product, so an infinite one gives neither a NaN value nor a NaN gradient."""
    return (weights * torch.where(valid, terms, torch.zeros_like(terms))).sum(0)


def _component_draws(mixture, num_samples: int) -> torch.Tensor:
    """``(K, C, B, D)``: ``K`` reparameterised draws from every component of the mixture (noise drawn in that
    shape)."""
    loc, logvar = mixture.loc.movedim(-2, 0), mixture.logvar.movedim(-2, 0)
    noise = torch.randn((num_samples,) + loc.shape, dtype=loc.dtype, device=loc.device)
    return loc + torch.exp(0.5 * logvar) * noise


def stratified_mixture_elbo(x, present, mu, logvar, decoders, likelihood, aggregate) -> Terms:
    """The Hölder VAE as the Hölder++ paper trains it (``aggregate`` = ``opinionpool.functional.holder_mixture``,
    exact ``alpha`` = 0 or 1/n), stratified over the mixture's components: every sample draws one ``z_c`` from every
    component ``c`` (reparameterised within it) and the terms are the weighted sums

        ``reconstruction = sum_c pi_c log p(X | z_c)``,  ``kl = sum_c pi_c (log q(z_c | X) - log p(z_c))``

    with ``q(z | X)`` the exact mixture density. It is the ELBO in expectation, as ``mixture_elbo`` (one component
    drawn by its weight) is, but the weights ``pi_c`` (for ``alpha = 1/2``: ``c`` for the experts, ``2 c S_ij``
    for the pairs, set by the encoders through the Bhattacharyya coefficients ``S_ij``) get their exact gradient
    through the sum, where ``mixture_elbo``'s draw of a component carries none. Components of weight zero (those
    of absent modalities) are skipped. Cost: ``C`` decoder passes per modality and sample (``C = M + M(M-1)/2``
    for ``alpha = 1/2``)."""
    mixture = aggregate(mu, logvar, mask=present)
    weights, valid = _component_weights(mixture)
    z = _component_draws(mixture, 1)[0]  # (C, B, D)
    log_lik = likelihood(x, present, z, decoders)
    kl = mixture.log_prob(z) - standard_normal_log_prob(z)
    return Terms(_weighted_sum(weights, valid, log_lik), _weighted_sum(weights, valid, kl))


def _detached_call(module: nn.Module, *args):
    """``module(*args)`` with its parameters detached (DReG scores a density with its parameters stopped)."""
    detached = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, detached, args)


def holder_plus_objective(x, present, mu, logvar, decoders, likelihood, aggregate, beta=1.0, num_samples=1,
                          estimator="elbo", private_dim=1, auxiliary_scale=None, members=None,
                          top_down=None, weight_gradient=True) -> Terms:
    """Hölder+ and Hölder++ (the Hölder++ paper): a shared ``z`` (the first ``D - private_dim`` coordinates of the
    encoders' posteriors) pooled by the exact Hölder mixture (``aggregate`` = ``opinionpool.functional.
    holder_mixture``), and a private ``w_n`` per modality (the last ``private_dim``), stratified over the mixture's
    components as ``stratified_mixture_elbo``. For every component ``c`` (``members[c]``: its experts, from
    ``opinionpool.functional.holder_mixture_members``), ``K = num_samples`` draws ``z ~ q_c`` reconstruct every
    present ``x_n`` from ``(z, w_n)`` with

    - ``w_n ~ q(w_n | x_n)`` (Hölder+) or ``q(w_n | x_n, z)`` (Hölder++: ``top_down[n]`` maps the encoder's
      private statistics and ``z`` to it) if modality ``n`` is one of the component's experts (self-reconstruction:
      ``n = j`` for the unimodal component ``j``, ``n in {i, j}`` for the pair ``(i, j)``),
    - ``w_n ~ r_n = N(0, diag(auxiliary_scale[n])^2)`` otherwise (cross-reconstruction; MMVAE+'s auxiliary
      distribution, which keeps the private latents from carrying what the shared one should).

    Log-weights ``log w_k = log p(X | z, w) + beta (log p(z) + sum_{n in c} log p(w_n) - log q(z | X) -
    sum_{n in c} log q(w_n | ...))``: the exact mixture density of ``z`` and the private latents drawn from their
    posteriors (``p`` standard normal). Per component the bound is, as in ``mmvae_objective``, ``"elbo"``
    (``mean_k log w_k``), ``"iwae"`` (``log mean_k w_k``) or ``"dreg"`` (the IWAE value with the doubly
    reparameterised gradient: the posteriors' parameters stopped inside ``log q``, every path gradient of a
    draw weighted by ``(1 - beta) w~ + beta w~^2``, ``w~`` the normalised weights (their square at ``beta = 1``);
    in Hölder++ the draws of ``w`` reach ``z`` through ``top_down``, and each path is weighted once), biased with
    ``K >= 2`` as ``mmvae_objective``'s, or (Hölder+ only) ``"dreg_unbiased"``, the draws of component ``c``
    weighted by its share ``rho_c`` as there; the objective is ``sum_c pi_c bound_c``, so the weights
    ``pi_c`` get their exact gradient. ``reconstruction`` and ``kl`` are the ``pi``-weighted sample means of
    ``log p(X | z, w)`` and ``log q - log p``. ``weight_gradient=False`` stops the gradient of the weights
    ``pi_c`` in that sum (they still enter ``log q(z | X)``): a pair's bound reconstructs two modalities through
    their posterior private latents and can be far above a unimodal component's, and then the weights' gradient
    rewards the encoders for raising the Bhattacharyya coefficients, i.e. for moving their shared posteriors
    together whatever the data (docs/results.md: the ablation's reason). Cost: ``C K`` decoder passes per
    modality and sample."""
    _check_estimator(estimator, num_samples)
    unbiased = estimator == "dreg_unbiased"
    if unbiased and top_down is not None:
        raise ValueError("estimator='dreg_unbiased' does not apply to Hölder++ (top_down), whose private posteriors "
                         "depend on the shared draw: use 'dreg' or 'iwae'")
    dreg = estimator.startswith("dreg")
    shared = mu.shape[-1] - private_dim
    mixture = aggregate(mu[..., :shared], logvar[..., :shared], mask=present)
    weights, valid = _component_weights(mixture)  # (C, B)
    if not weight_gradient:
        weights = weights.detach()
    members = members.to(mu.device)
    own_mu, own_logvar = mu[..., shared:], logvar[..., shared:]  # (M, B, P)
    z = _component_draws(mixture, num_samples)  # (K, C, B, Ds)
    # DReG: the log-weights see a copy of z whose gradient is weighted (once); w's parameters see z itself
    z_in = z.clone() if dreg else z
    shares = None
    if unbiased:  # the draws of component c: its parameters' score becomes path terms, the others' (and the
        # weights') stays, as in mmvae_plus_objective
        components = mixture.log_weights.shape[-1]
        own = torch.eye(components, dtype=torch.bool, device=mu.device).unsqueeze(1)  # (C, 1, C')
        log_q = _log_prob_own_stopped(mixture, z_in, own)  # (K, C, B)
        loc, lv = mixture.loc.movedim(-2, 0), mixture.logvar.movedim(-2, 0)  # (C, B, Ds)
        rho = (_responsibilities(mixture, _path_copy(z, loc, lv)) * own).sum(-1)  # (K, C, B): rho_c at z_c
        shares = [rho.unsqueeze(-1)] + [None] * mu.shape[0]
    else:
        log_q = (_detached(mixture) if dreg else mixture).log_prob(z_in)  # (K, C, B)
    log_p = standard_normal_log_prob(z_in)
    inputs, draws = [], [z_in]
    for n in range(mu.shape[0]):
        if top_down is None:
            post_mu, post_logvar = own_mu[n], own_logvar[n]
        else:
            post_mu, post_logvar = top_down[n](own_mu[n], own_logvar[n], z)
        shape = z.shape[:-1] + (private_dim,)
        w = post_mu + torch.exp(0.5 * post_logvar) * torch.randn(shape, dtype=mu.dtype, device=mu.device)
        auxiliary = torch.randn(shape, dtype=mu.dtype, device=mu.device) * auxiliary_scale[n]
        if dreg and top_down is None:
            post_mu, post_logvar = post_mu.detach(), post_logvar.detach()
        elif dreg:
            post_mu, post_logvar = _detached_call(top_down[n], own_mu[n].detach(), own_logvar[n].detach(), z_in)
        # (C, B): modality n is one of component c's experts, and present (alpha = 0's one component lists every
        # modality; an absent one's private posterior through the top-down net is not the prior, as Hölder+'s is)
        member = members[:, n].view(-1, 1) & present[n]
        zero = torch.zeros((), dtype=mu.dtype, device=mu.device)
        log_q = log_q + torch.where(member, opf.diag_gaussian_log_prob(w, post_mu, post_logvar), zero)
        log_p = log_p + torch.where(member, standard_normal_log_prob(w), zero)
        inputs.append((z_in, torch.where(member.unsqueeze(-1), w, auxiliary)))
        draws.append(w)
    log_lik = likelihood(x, present, inputs, decoders)  # (K, C, B)
    log_w = log_lik + beta * (log_p - log_q)
    bound = _bound(log_w, estimator, draws, beta, shares)  # (C, B)
    if unbiased:
        bound = bound + _share_path(log_w, rho, beta)
    return Terms(_weighted_sum(weights, valid, log_lik.mean(0)), _weighted_sum(weights, valid, (log_q - log_p).mean(0)),
                 _weighted_sum(weights, valid, bound))


def mmvm_objective(x, present, mu, logvar, decoders, likelihood, aggregate, normal_prior_weight=0.0) -> Terms:
    """MMVM (Sutter et al., "Unity by Diversity: Improved Representation Learning in Multimodal VAEs", NeurIPS
    2024): one latent ``z_m`` per modality, each decoded by its own decoder, tied by the data-dependent prior
    ``h(z | X) = aggregate`` of the present unimodal posteriors (``opinionpool.functional.moe``: the paper's
    ``(1/M) sum_m q(z | x_m)``; ``holder_mixture(alpha)`` for the Hölder priors). Per sample,
    ``reconstruction = sum_m [m present] w_m log p(x_m | z_m)`` with one reparameterised ``z_m ~ q(z_m | x_m)``,
    and ``kl = sum_m [m present] sum_c pi_c KL(q(z_m | x_m) || h_c)`` over h's components ``h_c`` (weights
    ``pi_c``; ``GaussianMixture.kl_upper_bound``), the convexity bound of ``KL(q(z_m | x_m) || h)`` that the
    authors' code minimises (github.com/thomassutter/mmvmvae, ``MVMixedPriorVAE``). For ``moe`` it is
    ``(1/|P|) sum_{k in P} KL(q(z_m | x_m) || q(z_m | x_k))`` over the present modalities ``P``; for the Hölder
    pools the components are the experts and their geometric combinations (pairs at alpha = 1/2), and at alpha = 0
    h is one Gaussian and the bound the KL itself. For ``moe`` and alpha = 1/n, ``q(z_m | x_m)`` is a component of
    h, so the exact KL is at most ``-log pi_m`` and stops pulling far-apart posteriors together; each term of the
    bound grows with the distance, so it keeps aligning the unimodal latent spaces. With learnt pool weights the
    bound is linear in them at alpha = 1 and favours putting the weight on the posterior the others are closest to.
    Missing modalities neither get a term nor enter h; a sample with one present modality has ``h = q(z_m | x_m)``
    and no KL.

    ``normal_prior_weight`` ``a`` mixes ``N(0, I)`` into the prior, ``a N(0, I) + (1 - a) h``, whose KL is bounded
    by ``a KL(q(z_m | x_m) || N(0, I)) + (1 - a)`` times the bound above, as the MMVM code's ``MVMixedPriorVAE``
    weights them (its ``alpha``: 0 is the mixture prior, ``1/(M + 1)`` its ``mixedpriorstdnorm``, 1 unimodal VAEs)."""
    prior = aggregate(mu, logvar, mask=present)
    z = reparameterise(mu, logvar)  # (M, B, D): z_m for every modality
    bound = prior.kl_upper_bound(mu, logvar)
    if normal_prior_weight:
        bound = (1 - normal_prior_weight) * bound + normal_prior_weight * kl_to_standard_normal(mu, logvar)
    kl = torch.where(present, bound, 0).sum(0)
    return Terms(likelihood(x, present, [(z[m],) for m in range(len(decoders))], decoders), kl)
