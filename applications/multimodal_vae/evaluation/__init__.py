"""Evaluation of a trained multimodal VAE: coherence, FID, log-likelihood, latent probes and pooling diagnostics.

``evaluate_run`` computes them all and writes the report; each lives in its module: ``classifiers`` (what reads
the generations), ``labelled`` (coherence and the latent probe), ``likelihood``, ``fid`` (with ``inception``)
``diagnostics`` (pooling diagnostics; whether training completed) and ``grids`` (the labelled sample grid,
``sample_grid.png``).

Conventions (stated in every report):

* **Which metrics**: every metric needs only the model and the data except coherence and the latent probe, which
  need one class label per tuple shared by all modalities (``MultimodalDataset.num_classes``: PolyMNIST and
  MNIST-SVHN-Text, a digit); for CelebA (40 attributes) and CUB (no label) the report says they are not computed.
  FID is computed for the image modalities.
* **Classifiers**: one digit classifier per modality, trained by the application on the training split and cached
  beside the data with its test accuracy; always used in eval mode (the MoPoE and HELVAE evaluation code leave
  dropout active). PolyMNIST: two stride-2 convolutions (32, 64 channels) and a 128-unit layer, 5 epochs with a
  one-cycle learning rate: 0.976-0.985 test accuracy on the offline PolyMNIST; the MoPoE classifier (10 and 20
  channels) reaches only 0.94-0.96 there in 4 epochs. Other modalities (MNIST, SVHN, text): the modality's
  encoder network with its mean head as the logits. A generated text is classified from its most likely tokens.
* **Generations** are samples ``z ~ q(z | X_S)`` of the model's posterior given the subset ``S``
  (``MultimodalVAE.conditional_posterior``; mixture posteriors are sampled by component), decoded to the raw
  decoder output clamped to [0, 1]; seeded. For the subset-mixture models (MoPoE, MoHELVAE, MWB-VAE) that is
  their aggregator on ``S`` (MoPoE: with the prior expert when ``S`` holds every modality), as the MoPoE and
  HELVAE code condition, not the mixture over the subsets of ``S``.
* **Conditional coherence**: for every non-empty subset ``S`` and every target ``t`` outside it, the fraction of
  generations whose predicted digit is the true one; summarised per subset, per subset size (mean and std over
  the subsets of that size) and overall (mean over all (S, t) pairs). The one-input matrix (MMVAE+ cross-
  coherence) has self-reconstruction on its diagonal; its "cross-modal" mean excludes the diagonal.
* **Unconditional coherence**: the fraction of prior samples ``z ~ p(z)`` (``N(0, I)``, ``Laplace(0, 1)`` for
  Laplace latents) on which all classifiers agree.
* **Latent probe**: a logistic regression (scikit-learn) on the means of ``q(z | X_S)`` for each subset, fitted on
  ``probe_examples`` random training tuples (500 as in the HELVAE paper; -1: the whole training split), tested
  on the evaluated test tuples. Models with modality-specific latents are also probed on each private ``w_m``
  (the posterior mean of ``q(w_m | x_m)``; Hölder++: of ``q(w_m | x_m, z)`` at the joint posterior's mean of
  ``z``; same tuples): the Hölder++ paper's decoupling measure, high on the
  shared latent and near chance on the private ones.
* **Modality-specific latents** in generations: a target inside the conditioning subset (a reconstruction)
  draws its ``w`` from its posterior, any other target (and unconditional generation) from the prior, as
  MMVAE+ generates (``MultimodalVAE.decode``).
* **Pooling diagnostics** (all modalities present): the mean log Bhattacharyya coefficient between pairs of
  unimodal posteriors, and the fraction of the Hellinger pool's mass in its pairwise components
  (``opinionpool.functional.hellinger_pairwise_mass``), both for the model's latent family; for the Hölder VAEs at
  alpha = 1/n, 0 < alpha < 1, also the mass of their own pool in components that combine experts. When the
  experts stop overlapping (large latents), these masses vanish and the pool becomes a (moment-matched) mixture of
  the experts. Training logs them at every checkpoint and every ``train.diagnostics_every`` steps (``pooling.csv``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import load_config
from ..data import batches, load_dataset, subset_mask, subset_tuples
from ..files import remove_orphaned_temporaries, write_text
from .classifiers import (
    CLASSIFIER_EPOCHS,
    DigitClassifier,
    EncoderClassifier,
    accuracy,
    classifier_input,
    classifiers_for,
    make_classifier,
    train_classifiers,
)
from .diagnostics import pooling_diagnostics, training_notice, training_status
from .fid import fid_scores
from .grids import GRID_FILE, draw_sample_grid
from .labelled import (
    coherence,
    cross_coherence,
    latent_probe,
    posterior_means,
    private_latent_probe,
    summarise_coherence,
    unconditional_coherence,
)
from .likelihood import log_likelihood, nested_log_likelihoods

__all__ = ["CLASSIFIER_EPOCHS", "DigitClassifier", "EVALUATION_FILES", "EncoderClassifier", "REEVALUABLE", "accuracy",
           "classifier_input", "classifiers_for", "coherence", "cross_coherence", "describe_bias", "draw_sample_grid",
           "evaluate_run", "fid_scores", "format_std_error", "latent_probe", "log_likelihood", "make_classifier",
           "pooling_diagnostics", "posterior_means", "private_latent_probe", "reevaluate", "render_report",
           "scored_tuples", "summarise_coherence", "train_classifiers", "training_notice", "training_status",
           "unconditional_coherence", "prior_fitted", "UNFITTED_PRIOR_NOTE"]


#: the files ``evaluate_run`` writes in a run folder
EVALUATION_FILES = ("metrics.json", "report.md", GRID_FILE)


def _shuffled(settings, test_data):
    """The test split in a random order seeded by ``settings.seed``: the evaluation scores its first
    ``settings.test_examples`` tuples (``_evaluated``), the log-likelihoods the first ``likelihood_examples`` of
    those, and FID compares against the first ``fid_samples`` real tuples. MNIST-SVHN-Text's pairing files and
    CUB store their test tuples class by class, so the first ones in stored order were all digit 0 or the first
    bird classes (MoPoE's evaluation shuffles its test loaders too)."""
    order = torch.randperm(len(test_data), generator=torch.Generator().manual_seed(settings.seed))
    return test_data.select(order)


def _evaluated(settings, shuffled):
    """The test tuples the evaluation scores: the first ``settings.test_examples`` (all when ``None``) of the
    shuffled test split (``_shuffled``)."""
    n = len(shuffled) if settings.test_examples is None else min(settings.test_examples, len(shuffled))
    return shuffled.head(n)


def scored_tuples(settings, test_data):
    """The test tuples ``evaluate_run`` scores with the evaluation settings ``settings`` (``config.eval``), in the
    order it takes them (its log-likelihoods score the first ``likelihood_examples``)."""
    return _evaluated(settings, _shuffled(settings, test_data))


def _write_metrics(run_dir: Path, config, metrics: dict) -> None:
    """``metrics.json``, then ``report.md`` from it; an earlier evaluation's report is removed first, so that an
    evaluation killed between the two leaves no report beside metrics it does not show (a sweep counts a run with
    both as evaluated, and skipped it for good)."""
    (Path(run_dir) / "report.md").unlink(missing_ok=True)
    write_text(run_dir / "metrics.json", json.dumps(metrics, indent=1))
    write_text(run_dir / "report.md", render_report(config, metrics))


def _subset_name(subset, names) -> str:
    return "{" + ",".join(names[t] for t in subset) + "}"


def evaluate_run(run_dir, config, model, progress=None) -> dict:
    """Every metric of ``config.eval`` on the test split; writes ``metrics.json`` and ``report.md`` in ``run_dir``.
    ``metrics["training"]`` holds ``training_status(run_dir)`` (when known); the report opens with a notice when
    training stopped short of its planned steps."""
    # what an evaluation killed while writing left (training removes its own files' temporaries)
    remove_orphaned_temporaries(Path(run_dir), EVALUATION_FILES)
    settings = config.eval
    train_data, test_data = load_dataset(config, "train"), load_dataset(config, "test")
    device = model.device
    test_data = _shuffled(settings, test_data)
    evaluated = _evaluated(settings, test_data)
    n = len(evaluated)
    m = model.num_modalities
    names = [modality.name for modality in test_data.modalities]
    subsets = subset_tuples(m) if settings.subsets == "all" else [(s,) for s in range(m)] + [tuple(range(m))]
    labelled = test_data.num_classes is not None
    images = [t for t, modality in enumerate(test_data.modalities) if not modality.is_text]
    steps = ((["classifiers", "coherence", "unconditional", "probe"] if labelled else []) + ["likelihood", "pooling"]
             + (["fid"] if settings.fid_samples and images else []) + (["sample grid"] if images else []))
    bar = progress(total=len(steps), desc="evaluation", unit="metric") if progress else None
    metrics = {"test_examples": n, "modalities": names, "protocol": {
        "generations": "samples of q(z|X_S), seeded", "probe_examples": settings.probe_examples,
        "likelihood_samples": settings.likelihood_samples, "subsets": settings.subsets},
        # every setting of the evaluation: a sweep evaluates a run again when its eval settings change
        "eval": asdict(settings), "prior_fitted": prior_fitted(model, config)}
    training = training_status(run_dir)
    if training is not None:
        metrics["training"] = training

    def done():
        if bar is not None:
            bar.update()

    if labelled:
        _label_metrics(metrics, model, config, train_data, test_data, evaluated, subsets, progress, done)
    else:
        metrics["not_computed"] = (f"coherence and the latent probe need one class label per tuple shared by the "
                                   f"modalities; {config.data.dataset} has none")
    metrics["log_likelihood"] = _likelihoods(model, evaluated.head(settings.likelihood_examples), settings)
    done()
    metrics["pooling"] = pooling_diagnostics(model, [x.to(device) for x in evaluated.head(1000).gather(
        torch.arange(min(n, 1000)))])
    done()
    if settings.fid_samples and images:
        metrics["fid"] = _fid(model, config, evaluated, test_data, progress)
        done()
    run_dir = Path(run_dir)
    if images:
        shown = evaluated.gather(torch.arange(min(n, 8)))
        title = f"{config.name}: {config.model.name}, beta {config.model.beta:g}, {n} test tuples"
        draw_sample_grid(model, shown, test_data.modalities, run_dir / GRID_FILE, seed=settings.seed, title=title)
        metrics["sample_grid"] = GRID_FILE
        done()
    if bar is not None:
        bar.close()
    _write_metrics(run_dir, config, metrics)
    return metrics


#: the metrics ``reevaluate`` recomputes alone, each with the eval settings it may change: its own
REEVALUABLE = {"log_likelihood": ("likelihood_examples", "likelihood_samples"),
               "fid": ("fid_samples", "fid_weights", "fid_sizes")}


def reevaluate(run_dir, config, model, metric: str, progress=None) -> dict:
    """Recompute only ``metric`` (a key of ``REEVALUABLE``) of an evaluated run with ``config.eval``, keeping its
    other metrics: after a change to the estimator (e.g. KID's standard error, which runs evaluated before it lack),
    or to compare settings (K, the number of FID samples), without the rest of the evaluation. Rewrites
    ``metrics.json`` and ``report.md``.

    Refused, before any work, where the result would not match the other metrics: other eval settings than those
    the metrics were computed with (the same seeded tuples and generations), or a checkpoint trained further since.
    Metrics from before they recorded their settings are taken to have been computed with the run's ``config.yaml``
    (as a sweep takes them), and only those settings are accepted: nothing would record a change. A run whose
    recorded settings now differ from its sweep's is evaluated again in full by the next sweep: change the
    settings of a sweep's runs through the sweep (``sweep --set eval.KEY=VALUE``)."""
    if metric not in REEVALUABLE:
        raise ValueError(f"metric must be one of {sorted(REEVALUABLE)}, got {metric!r}")
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.json in {run_dir}: evaluate the run in full first")
    metrics = json.loads(path.read_text(encoding="utf-8"))
    settings, changeable = config.eval, REEVALUABLE[metric]
    recorded = metrics.get("eval")  # None: metrics from before they recorded their settings
    known = recorded if recorded is not None else asdict(load_config(path=run_dir / "config.yaml").eval)
    differing = sorted(k for k, v in asdict(settings).items()
                       if known.get(k) != v and (k not in changeable or recorded is None))
    if differing:
        source = "were computed with" if recorded is not None else \
            "record no eval settings (an evaluation from before they were recorded), so only its config.yaml's count:"
        raise ValueError(f"{run_dir}'s metrics {source} other eval settings than these in {differing} "
                         f"(saved {[known.get(k) for k in differing]}, now {[getattr(settings, k) for k in differing]}):"
                         f" the {metric} alone would not match the other metrics; evaluate the run in full")
    trained, evaluated_at = training_status(run_dir), metrics.get("training")
    if trained is not None and evaluated_at is not None and trained["steps"] != evaluated_at["steps"]:
        raise ValueError(f"{run_dir}'s checkpoint stands at step {trained['steps']}, its metrics were computed at step "
                         f"{evaluated_at['steps']}: the {metric} alone would not match the other metrics; evaluate "
                         "the run in full")
    if metric == "fid" and not settings.fid_samples:
        raise ValueError("eval.fid_samples=0: no FID to compute (set eval.fid_samples to a positive number)")
    test_data = _shuffled(settings, load_dataset(config, "test"))
    evaluated = _evaluated(settings, test_data)
    if metric == "fid" and all(modality.is_text for modality in test_data.modalities):
        raise ValueError(f"{config.data.dataset} has no image modality: no FID to compute")
    remove_orphaned_temporaries(run_dir, EVALUATION_FILES)
    if metric == "log_likelihood":
        metrics["log_likelihood"] = _likelihoods(model, evaluated.head(settings.likelihood_examples), settings)
        metrics.setdefault("protocol", {})["likelihood_samples"] = settings.likelihood_samples
    else:
        metrics["fid"] = _fid(model, config, evaluated, test_data, progress)
    if recorded is not None:
        recorded.update({k: getattr(settings, k) for k in changeable})
    _write_metrics(run_dir, config, metrics)
    return metrics


def _fid(model, config, evaluated, test_data, progress) -> dict:
    """``fid_scores`` of the run with the real features cached beside the data (every run of a sweep on it shares
    them) and the default weights beside the data's folder."""
    cache = Path(config.data.root).parent / ".wheels"
    return fid_scores(model, evaluated, test_data, config.eval, cache, progress, feature_cache=Path(config.data.root),
                      source=f"{config.data.dataset} at {Path(config.data.root).resolve()}, test split")


def prior_fitted(model, config) -> bool:
    """Whether the model's objective fits its latents to the N(0, I) prior that unconditional generation samples:
    not MMVM's without an N(0, I) component in its prior (``model.normal_prior_weight = 0``), whose prior of each
    modality's latent is the others' posteriors, so that its prior samples decode from a region it never trains."""
    return not (model.spec.mixed_prior and config.model.normal_prior_weight == 0)


#: beside unconditional metrics of a model whose objective does not fit N(0, I) (:func:`prior_fitted`)
UNFITTED_PRIOR_NOTE = ("prior samples from N(0, I), which this model's objective does not fit (MMVM's prior is the "
                       "other modalities' posteriors; model.normal_prior_weight = 0): not comparable with the other "
                       "models'")


def _label_metrics(metrics, model, config, train_data, test_data, evaluated, subsets, progress, done) -> None:
    """Classifier accuracy, conditional, cross-modal and unconditional coherence and the latent probe."""
    settings, m = config.eval, model.num_modalities
    names = metrics["modalities"]
    classifiers, classifier_accuracy = classifiers_for(config.data.root, config.data.dataset, train_data, test_data,
                                                       progress)
    classifiers = classifiers.to(model.device)
    metrics["classifier_accuracy"] = classifier_accuracy
    done()
    result = coherence(model, classifiers, evaluated, subsets, seed=settings.seed)
    summary = summarise_coherence(result, m)
    metrics["coherence"] = {"overall": summary["overall"],
                            "per_size": {str(k): v for k, v in summary["per_size"].items()},
                            "per_subset": {_subset_name(s, names): v for s, v in summary["per_subset"].items()}}
    matrix = cross_coherence(result, m)
    off = ~torch.eye(m, dtype=torch.bool)
    metrics["cross_coherence"] = {"matrix": matrix.tolist(), "cross_modal": float(matrix[off].mean()),
                                  "with_self": float(matrix.mean())}
    done()
    metrics["unconditional_coherence"] = unconditional_coherence(
        model, classifiers, evaluated.modalities, config.model.latent_dim, settings.unconditional_samples,
        seed=settings.seed)
    done()
    probe = latent_probe(model, train_data, evaluated, subsets, settings.probe_examples, settings.seed)
    metrics["latent_probe"] = {_subset_name(s, names): v for s, v in probe.items()}
    if model.private_dim:
        private = private_latent_probe(model, train_data, evaluated, settings.probe_examples, settings.seed)
        metrics["private_latent_probe"] = {names[t]: v for t, v in private.items()}
    done()


def _likelihoods(model, data, settings) -> dict:
    """log p(X) and log p(X_rest | one modality), means over tuples. The joint's bias diagnostic: the same draws'
    estimate from their first K // 2 (``nested_log_likelihoods``); where the bound's bias falls as 1/K (large K),
    its rise to K is the bias at K (times (K // 2) / (K - K // 2) for odd K)."""
    device = model.device
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    joint, conditional = [], []
    m, k = model.num_modalities, settings.likelihood_samples
    counts = (k // 2, k) if k > 1 else (k,)
    for index, x in batches(data, 100, device):
        b = len(index)
        joint.append(nested_log_likelihoods(model, x, counts, generator=generator))
        given = [log_likelihood(model, x, condition=subset_mask((s,), m, b, device),
                                targets=~subset_mask((s,), m, b, device),
                                num_samples=k, generator=generator) for s in range(m)]
        conditional.append(torch.stack(given).mean(0))
    nested, conditional = torch.cat(joint, 1), torch.cat(conditional)
    joint = nested[-1]
    result = {"joint": float(joint.mean()), "joint_std_error": _std_error(joint),
              "given_one_modality": float(conditional.mean()), "num_samples": k, "examples": len(data)}
    if k > 1:
        rise = nested[1] - nested[0]
        result["bias_check"] = {"from_samples": k // 2, "rise": float(rise.mean()), "rise_std_error": _std_error(rise),
                                "bias_at_k": float(rise.mean()) * (k // 2) / (k - k // 2)}
    return result


def _std_error(values: torch.Tensor) -> float | None:
    """The spread over tuples (n - 1 in the variance): none from a single tuple, where it used to be NaN."""
    return float(values.std() / math.sqrt(len(values))) if len(values) > 1 else None


def format_std_error(likelihood: dict) -> str:
    """The standard error of log p(X) as printed: ``n/a`` for a single tuple."""
    error = likelihood.get("joint_std_error")
    return "n/a" if error is None else f"{error:.1f}"


def describe_bias(likelihood: dict) -> str:
    """The bias check of log p(X) in words, for the report and the command line (empty for K = 1)."""
    check = likelihood.get("bias_check")
    if check is None:
        return ""
    error = check["rise_std_error"]
    rise = (f"from the first {check['from_samples']} of the same draws it is {check['rise']:.1f} ± "
            f"{'n/a' if error is None else f'{error:.1f}'} lower")
    if error is None or check["rise"] < 2 * error:  # a lower bound in expectation: a smaller rise is noise
        return (f"{rise}, {'from one tuple' if error is None else 'within two standard errors of zero'}: no bias "
                f"of the bound is detectable at K = {likelihood['num_samples']}")
    return (f"{rise}; where the bound's bias falls as 1/K, the bound lies about {check['bias_at_k']:.1f} below "
            f"log p(X) at K = {likelihood['num_samples']}, and further where the importance weights are heavy-tailed")


def render_report(config, metrics: dict) -> str:
    names = metrics["modalities"]
    ll, pooling = metrics["log_likelihood"], metrics["pooling"]
    # beside every metric of prior samples (metrics from before the field: fitted)
    unfitted = "" if metrics.get("prior_fitted", True) else f" ({UNFITTED_PRIOR_NOTE})"
    nets = config.model.architecture + (f", {config.model.activation}" if config.model.activation else "")
    lines = [
        f"# {config.name}", "",
        f"Model `{config.model.name}` ({nets} nets), latent {config.model.latent_dim}, beta "
        f"{config.model.beta}, image likelihood {config.model.likelihood}({config.model.likelihood_scale}); dataset "
        f"`{config.data.dataset}` at `{config.data.root}` (modalities {', '.join(names)}); {metrics['test_examples']} "
        "test tuples.", ""]
    notice = training_notice(metrics.get("training"))
    if notice:
        lines += [f"**Warning: {notice[0].upper() + notice[1:]}.**", ""]
    if "coherence" in metrics:
        coherence_ = metrics["coherence"]
        matrix = metrics["cross_coherence"]["matrix"]
        rows = ["| from \\ to | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        rows += [f"| {names[s]} | " + " | ".join(f"{v:.3f}" for v in matrix[s]) + " |" for s in range(len(names))]
        sizes = ["| inputs | coherence (mean ± std over subsets) |", "|---|---|"]
        sizes += [f"| {k} | {mean:.3f} ± {std:.3f} |" for k, (mean, std) in coherence_["per_size"].items()]
        probe = ["| subset | probe accuracy |", "|---|---|"]
        probe += [f"| {s} | {v:.3f} |" for s, v in metrics["latent_probe"].items()]
        if "private_latent_probe" in metrics:
            probe += ["", "On each modality's private latent w (the decoupling measure: high on z, near chance on "
                      "w):", "", "| private latent of | probe accuracy |", "|---|---|"]
            probe += [f"| {t} | {v:.3f} |" for t, v in metrics["private_latent_probe"].items()]
        lines += [
            f"**Conditional coherence** (generations are posterior samples): overall {coherence_['overall']:.3f}; "
            f"one input, cross-modal {metrics['cross_coherence']['cross_modal']:.3f} (with self-reconstruction "
            f"{metrics['cross_coherence']['with_self']:.3f}); chance 0.1.", "",
            *sizes, "", "One input (rows) to each output (columns):", "", *rows, "",
            f"**Unconditional coherence** (all classifiers agree on a prior sample): "
            f"{metrics['unconditional_coherence']:.3f}{unfitted}.", "",
            f"**Latent probe** (logistic regression on posterior means, {metrics['protocol']['probe_examples']} "
            "training tuples; -1 = all), on the shared latent z given each subset:", "", *probe, ""]
    else:
        lines += [f"Not computed: {metrics['not_computed']}.", ""]
    lines += [
        f"**Log-likelihood** (importance sampling, K = {ll['num_samples']}, {ll['examples']} tuples; a stochastic "
        f"lower bound, and the error is the standard error over tuples, which leaves out the bound's bias): "
        f"log p(X) = {ll['joint']:.1f} ± {format_std_error(ll)}"
        + (f" ({describe_bias(ll)})" if describe_bias(ll) else "") + "; the plug-in conditional log p(X_rest | one "
        f"modality) = log E_q(z | x_m) p(X_rest | z) = {ll['given_one_modality']:.1f} (mean over the conditioning "
        "modalities; no bound: the encoder stands in for the posterior).", "",
        f"**Pooling diagnostics** (all modalities): mean log Bhattacharyya coefficient between experts "
        f"{pooling['mean_log_bhattacharyya']:.2f}; Hellinger-pool mass in pairwise components "
        f"{pooling['pairwise_mass']:.3f}"
        + (f"; mass of the model's own pool in components combining experts {pooling['own_cross_mass']:.3f}"
           if pooling.get("own_cross_mass") is not None else "")
        + ".", ""]
    if "fid" in metrics:
        fid = metrics["fid"]
        conditional = ("; conditional by number of inputs (one FID per size over generations each from a random "
                       "subset of that size, not a mean of per-subset FIDs): "
                       + ", ".join(f"{k}: {v:.1f}" for k, v in fid["per_size"].items())
                       if fid["per_size"] else " (conditional generations not scored: eval.fid_sizes)")
        lines += [f"**FID** ({fid['samples']} samples per image modality, {fid['weights']}): unconditional "
                  f"{fid['unconditional']:.1f}{unfitted}{conditional}.", ""]
        if "kid_unconditional" in fid:
            conditional = ("; conditional by number of inputs: "
                           + ", ".join(f"{k}: {1000 * v:.2f}" for k, v in fid["kid_per_size"].items())
                           if fid["kid_per_size"] else "")
            error = fid.get("kid_unconditional_standard_error")
            error = "" if error is None else (f" ± {1000 * error:.2f} (jackknife standard error over the test "
                                              "tuples, each left out in turn with its generations)")
            lines += [f"**KID** (x 1000, same samples): unconditional {1000 * fid['kid_unconditional']:.2f}"
                      f"{error}{unfitted}{conditional}.", ""]
    if "classifier_accuracy" in metrics:
        lines += ["Digit classifiers (eval mode), test accuracy per modality: "
                  + ", ".join(f"{name} {a:.3f}" for name, a in zip(names, metrics["classifier_accuracy"])) + ".", ""]
    if "sample_grid" in metrics:
        lines += ["Samples (rows: inputs, reconstructions from all modalities, generations from each modality alone, "
                  "unconditional generations; columns: test tuples):", "", f"![sample grid]({metrics['sample_grid']})",
                  ""]
    lines += ["![samples](samples.png)", ""]
    return "\n".join(lines)
