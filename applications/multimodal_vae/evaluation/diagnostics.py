"""Diagnostics of a run: how much the experts overlap (``pooling_diagnostics``, at every checkpoint and in the
report) and whether training completed its planned steps (``training_status``, ``training_notice``)."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

import opinionpool.functional as opf

from ..files import load_checked
from ..models import evaluating

__all__ = ["pooling_diagnostics", "training_notice", "training_status"]

@torch.no_grad()
def pooling_diagnostics(model, x) -> dict:
    """How much the unimodal posteriors of the batch ``x`` (a model input, all modalities present) overlap:

    * ``mean_log_bhattacharyya``: the mean log Bhattacharyya coefficient over pairs of experts;
    * ``pairwise_mass``: the fraction of the Hellinger pool's (alpha = 1/2) mass in its pairwise components;
    * ``own_cross_mass``: for a model pooling with its own exact ``alpha = 1/n``, 0 < alpha < 1 (the Hölder VAEs),
      the fraction of that pool's mass in components combining two or more experts, with the model's pooling
      weights when it learns them (None for other models).

    A mass near 0 means the experts no longer overlap: the pool is then the mixture of the experts with weights
    ``lambda_j^(1/alpha)`` (normalised), whatever ``alpha``. Both affinities are those of the model's latent family:
    Laplace for MMVAE and MMVAE+ with ``latent_family="laplace"``. ``own_cross_mass`` concerns Gaussian models
    only (the Hölder VAEs). ``FloatingPointError`` where the encodings are not finite (a diverged model)."""
    m = model.num_modalities
    family = model.latent.name
    pairs = list(itertools.combinations(range(m), 2))
    with evaluating(model):
        mu, logvar = model.encode(x)
    if not bool(torch.isfinite(mu).all() and torch.isfinite(logvar).all()):
        raise FloatingPointError("the pooling diagnostics found non-finite encodings of the training tuples shown")
    mu, logvar = mu.double(), logvar.double()
    log_bc = sum(opf.log_bhattacharyya(mu[i], logvar[i], mu[j], logvar[j], family=family) for i, j in pairs) / len(pairs)
    weights = None if model.pool_logits is None else torch.softmax(model.pool_logits.double(), 0)
    return {"mean_log_bhattacharyya": float(log_bc.mean()),
            "pairwise_mass": float(opf.hellinger_pairwise_mass(mu, logvar, family=family).mean()),
            "own_cross_mass": (_cross_mass(mu, logvar, model.alpha, weights)
                               if model.spec.exact_alpha and 0 < model.alpha < 1 else None)}


def _cross_mass(mu, logvar, alpha, weights=None) -> float:
    """Mean over the batch of the exact Hölder pool's mass outside its single-expert components (its first M), summed
    from those components' own weights: a tiny mass keeps its digits (``1 - sum`` of the others would round it to
    0, or below)."""
    mixture = opf.holder_mixture(mu, logvar, alpha, dim=0, weights=weights, validate_args=False)
    return float(torch.logsumexp(mixture.log_weights[..., mu.shape[0]:], -1).exp().mean())


def training_status(run_dir) -> dict | None:
    """``{"steps", "planned_steps", "stopped_by"}`` of the run's checkpoint: the steps taken and asked for, and the
    limit that stopped training short of them (None: none did); None for a checkpoint from before they were stored,
    or no checkpoint."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.exists():
        return None
    state = load_checked(path, map_location="cpu")
    if "planned_steps" not in state:
        return None
    return {"steps": state["step"], "planned_steps": state["planned_steps"], "stopped_by": state["stopped_by"]}


def training_notice(training: dict | None) -> str | None:
    """What to tell the reader of the metrics when training took fewer steps than planned (None otherwise)."""
    if training is None or training["steps"] >= training["planned_steps"]:
        return None
    reached = f"{training['steps']} of {training['planned_steps']} planned steps"
    why = (f"training stopped early at {training['stopped_by']} (wall-clock limit): {reached}"
           if training["stopped_by"] else f"training did not finish: {reached} (resume it with --resume)")
    return (f"{why}; these metrics are those of a partly trained model, not comparable with those of runs that "
            "completed their steps (such as the figures in docs/results.md)")
