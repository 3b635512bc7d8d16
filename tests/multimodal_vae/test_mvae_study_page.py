"""The study page from a sweep's results: verdicts by hand, the alpha study's grouping, figures and the docs copy."""

import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from applications.multimodal_vae.__main__ import main
from applications.multimodal_vae.config import load_config, to_yaml
from applications.multimodal_vae.study import FAILS, HOLDS, NOT_RUN, NOT_SEPARABLE, _show, _verdict_rows, compare
from applications.multimodal_vae.sweep import FIELDS, SCALARS, load_sweep, run_config, write_results


def entry(values, **others):
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return {"coherence": (mean, std), "seeds": len(values), "computed": {"coherence": len(values)}, **others}


def test_verdicts_by_hand():
    summary = {("a", 1.0): entry([0.80, 0.82, 0.84]), ("b", 1.0): entry([0.50, 0.52, 0.54]),
               ("c", 1.0): entry([0.30, 0.60, 0.90]), ("d", 1.0): entry([0.1]),
               ("e", 1.0): {"coherence": (float("nan"), float("nan")), "seeds": 2, "computed": {"coherence": 0}},
               # three runs, one of which computed the metric: one seed, however far apart the means
               ("f", 1.0): {**entry([0.1]), "seeds": 3}}
    assert compare(summary, "a", "b", "coherence", 1.0) == (HOLDS, "0.820 ± 0.020 (3) vs 0.520 ± 0.020 (3)")
    assert compare(summary, "b", "a", "coherence", 1.0)[0] == FAILS
    assert compare(summary, "a", "b", "coherence", 1.0, lower_is_better=True)[0] == FAILS
    assert compare(summary, "b", "c", "coherence", 1.0)[0] == NOT_SEPARABLE  # 0.08 apart, spreads 0.02 + 0.3
    assert compare(summary, "a", "d", "coherence", 1.0)[0] == NOT_SEPARABLE  # one seed: no spread to compare
    assert compare(summary, "a", "e", "coherence", 1.0)[0] == NOT_RUN  # not computed
    # "not worse": holds within the spread, fails only when separably worse
    assert compare(summary, "b", "c", "coherence", 1.0, at_least=True)[0] == HOLDS
    assert compare(summary, "b", "a", "coherence", 1.0, at_least=True)[0] == FAILS
    assert compare(summary, "a", "b", "coherence", 1.0, at_least=True)[0] == HOLDS
    assert compare(summary, "a", "d", "coherence", 1.0, at_least=True)[0] == NOT_SEPARABLE
    assert compare(summary, "a", "b", "coherence", 2.5)[0] == NOT_RUN  # not in the sweep
    assert compare(summary, "a", "f", "coherence", 1.0) == (NOT_SEPARABLE, "0.820 ± 0.020 (3) vs 0.100 (1)")
    # a seed whose metric overflowed: the mean is infinite and the spread unknown (sweep.mean_std), whichever side
    # (it gave "holds" on one side and, inf - inf, "does not hold" on both)
    overflowed = {"coherence": (-math.inf, math.nan), "seeds": 3, "computed": {"coherence": 3}}
    summary.update({("g", 1.0): overflowed, ("h", 1.0): overflowed})
    for first, second in (("a", "g"), ("g", "a"), ("g", "h")):
        for at_least in (False, True):
            assert compare(summary, first, second, "coherence", 1.0, at_least=at_least)[0] == NOT_SEPARABLE
    # seeds that overflowed to +inf and to -inf: a NaN mean of a computed metric is not separable, not "not run"
    both_signs = {"coherence": (math.nan, math.nan), "seeds": 3, "computed": {"coherence": 3}}
    summary[("i", 1.0)] = both_signs
    assert compare(summary, "a", "i", "coherence", 1.0)[0] == NOT_SEPARABLE
    assert compare(summary, "i", "a", "coherence", 1.0, at_least=True)[0] == NOT_SEPARABLE
    assert _show("coherence", both_signs["coherence"], 3) == "not finite"
    assert _show("coherence", (math.nan, math.nan), 0) == "–"
    # masses that fell to nearly nothing keep their size instead of printing as 0.000
    assert _show("pairwise_mass", (4.8e-27, 1.2e-27), 2) == "4.8e-27 ± 1.2e-27"
    assert _show("pairwise_mass", (0.25, 0.01), 2) == "0.250 ± 0.010"
    assert _show("pairwise_mass", (0.003, 0.00047), 3) == "3.0e-03 ± 4.7e-04"  # not 0.003 ± 0.000
    assert _show("own_cross_mass", (0.0, 0.0), 2) == "0.000 ± 0.000"
    # one seed has no spread over seeds to show (not a spread of 0)
    assert _show("kid_unconditional", (0.1851, 0.0), 1) == "185.10"
    assert _show("pairwise_mass", (3e-27, 0.0), 1) == "3.0e-27"


def test_a_model_without_the_metric_neither_supports_nor_refutes_a_claim_over_all_models():
    """"MVAE has the worst coherence of all models" is refuted by a model separably below it; one that did not compute
    coherence made the row "not run" whatever the others showed."""
    nan = (float("nan"), float("nan"))
    kid = {"kid_unconditional": nan}
    without = {"coherence": nan, "kid_unconditional": nan, "seeds": 3, "computed": {"coherence": 0}}

    def row(summary):
        line = next(r for r in _verdict_rows(summary, ["mvae", "below", "above", "without"], [1.0])
                    if r.startswith("| MVAE has the worst coherence of all models |"))
        return line.split(" | ")[3:5]

    refuted = {("mvae", 1.0): entry([0.20, 0.21, 0.22], **kid), ("below", 1.0): entry([0.10, 0.11, 0.12], **kid),
               ("without", 1.0): without}
    assert row(refuted) == [FAILS, "separated from 0 of 1 models |"]
    supported = {("mvae", 1.0): entry([0.20, 0.21, 0.22], **kid), ("above", 1.0): entry([0.50, 0.51, 0.52], **kid),
                 ("without", 1.0): without}
    assert row(supported) == [HOLDS, "separated from 1 of 1 models |"]
    assert row({("mvae", 1.0): without, ("above", 1.0): entry([0.5, 0.6], **kid)})[0] == NOT_RUN


def fake_sweep(folder, runs, overrides=None):
    """``runs``: (label, model name, alpha, beta, seed, metrics, masses through training); ``overrides``: label ->
    settings of a label outside the study's grid."""
    rows = []
    study = load_sweep("polymnist-cpu-study")
    for label, name, alpha, beta, seed, metrics, masses in runs:
        run = folder / f"{label}-beta{beta}-seed{seed}"
        run.mkdir(parents=True)
        # the study's own configuration of the run where the label is in its grid (a summary checks it)
        config = (run_config(study, label, beta, seed) if label in study.models else
                  load_config(study.base, [f"model.name={name}", f"model.alpha={alpha}",
                                           *(overrides or {}).get(label, [])]))
        assert (config.model.name, config.model.alpha) == (name, alpha), label
        (run / "config.yaml").write_text(to_yaml(config))
        (run / "pooling.csv").write_text("epoch,step,mean_log_bhattacharyya,pairwise_mass,own_cross_mass\n"
                                         + "".join(f"0,{100 * (i + 1)},-1,{p},{o}\n" for i, (p, o) in
                                                   enumerate(masses)))
        row = {field: None for field in FIELDS}
        row.update(model=label, beta=beta, seed=seed, coherence_by_inputs=json.dumps({"1": 0.5, "2": 0.6}),
                   fid_by_inputs="{}", seconds_per_batch=0.2, **metrics)
        rows.append(row)
    write_results(folder, rows)


def test_the_study_page(tmp_path, capsys):
    folder = tmp_path / "runs" / "polymnist-cpu-study"
    runs = []
    for seed in range(3):
        for beta in (1.0, 2.5):
            runs += [("helvae", "helvae", 0.5, beta, seed, {"coherence": 0.8 + 0.02 * seed + 0.05 * (beta > 1),
                                                            "kid_unconditional": 0.006 + 0.001 * seed,
                                                            "pairwise_mass": 0.01}, [(0.2, 0.2), (0.01, 0.01)]),
                     ("mopoe", "mopoe", 0.5, beta, seed, {"coherence": 0.5 + 0.02 * seed,
                                                          "kid_unconditional": 0.020 + 0.001 * seed}, [(0.3, ""),
                                                                                                     (0.1, "")]),
                     ("mvae", "mvae", 0.5, beta, seed, {"coherence": 0.2 + 0.02 * seed,
                                                        "kid_unconditional": 0.005 + 0.001 * seed}, [(0.5, ""),
                                                                                                   (0.4, "")])]
        runs += [("holder-a0", "holder", 0.0, 1.0, seed, {"coherence": 0.3}, [(0.9, ""), (0.9, "")]),
                 ("holder_mixture-a0.25", "holder_mixture", 0.25, 1.0, seed, {"coherence": 0.6 + 0.01 * seed},
                  [(0.4, 0.5), (0.2, 0.3)]),
                 ("holder-a0.25", "holder", 0.25, 1.0, seed, {"coherence": 0.61 + 0.005 * seed}, [(0.4, ""), (0.2, "")])]
    runs += [("mmvae-k4", "mmvae", 0.5, 1.0, 0, {"coherence": 0.77}, [(0.0, ""), (0.0, "")])]
    fake_sweep(folder, runs)
    grid = folder / "mopoe-beta2.5-seed1" / "sample_grid.png"  # the first seed's has none: the next one is shown
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (100, 4), dtype=np.uint8)[rng.integers(0, 100, (60, 40))]  # 100 colours
    colours[..., 3] = 255
    Image.fromarray(colours, "RGBA").save(grid)
    assert main(["study", "--sweep", str(folder), "--docs", str(tmp_path / "docs")]) == 0
    page = (tmp_path / "docs" / "study.md").read_text()
    lines = page.splitlines()

    def verdict(claim, beta):
        row = next(line for line in lines if line.startswith(f"| {claim} |") and f"| {beta} |" in line)
        return row.split(" | ")[3]

    assert verdict("HELVAE's conditional coherence is above MoPoE's", "1") == HOLDS
    assert verdict("MoPoE's conditional coherence is above MVAE's", "2.5") == HOLDS
    assert verdict("HELVAE's conditional coherence is above MMVAE+'s", "1") == NOT_RUN
    assert verdict("MVAE has the worst coherence of all models", "1") == HOLDS
    assert verdict("MVAE has the best quality (lowest KID) of all models", "1") == NOT_SEPARABLE  # vs HELVAE
    assert verdict("MVAE's generations are of better quality (KID) than MoPoE's", "1") == HOLDS
    # the front across models: HELVAE at beta 2.5 has the most coherence, MVAE the lowest KID; MoPoE neither
    front = next(line for line in lines if line.startswith("- conditional coherence against KID x 1000: "))
    assert "helvae (β 2.5)" in front and "mvae (β 1)" in front and "mopoe" not in front and "helvae (β 1)" not in front
    assert "| self coherence (one input) |" in lines[lines.index("## Every model") + 4]
    # beta: HELVAE's coherence rises by 0.05 against a spread of 0.02 + 0.02; MoPoE's does not move
    assert ("| helvae: raising β from 1 to 2.5, coherence rises | HELVAE paper §6.3 | 1 → 2.5 | holds | "
            "0.820 ± 0.020 (3) → 0.870 ± 0.020 (3) |") in page  # the evidence reads from beta 1 to 2.5
    assert "| mopoe: raising β from 1 to 2.5, coherence rises | HELVAE paper §6.3 | 1 → 2.5 | not separable" in page
    # the alpha variants are in the alpha study, not among the models; alpha = 0 stands for both pools; another
    # variant (MMVAE with K = 4) has its own row in the table of every model, with what it varies
    assert not any(line.startswith("| holder-a0 |") for line in lines)
    assert "| mmvae-k4 (mmvae, K = 4, dreg) | 1 | 1 | 0.770 |" in page
    assert "| holder | 0 | 3 | 0.300 ± 0.000 |" in page and "| holder_mixture | 0 | 3 | 0.300 ± 0.000 |" in page
    assert "| holder_mixture | 0.25 | 3 | 0.610 ± 0.010 |" in page and "| 0.300 ± 0.000 |" in page
    assert "| holder | 0.5 | 3 | 0.820 ± 0.020 |" in page  # HELVAE at beta 1
    # does alpha change the model: 0.3 against HELVAE's 0.82 is lower; 0.61 against 0.615 is within the spreads
    assert ("| moment-matched alpha = 0 vs 1/2 (HELVAE) | lower: 0.300 ± 0.000 (3) vs 0.820 ± 0.020 (3) | not run | "
            "not run |") in page
    assert "| moment-matched alpha = 0.25 vs 1/2 (HELVAE) | lower: 0.615 ± 0.005 (3) vs 0.820 ± 0.020 (3) |" in page
    assert ("| exact mixture vs moment-matched at alpha = 0.25 | not separable: 0.610 ± 0.010 (3) vs 0.615 ± 0.005 "
            "(3) |") in page
    assert "exact mixture vs moment-matched at alpha = 0 |" not in page  # the same model
    for name in ("study_pareto.png", "study_synergy.png", "study_alpha.png", "study_mass.png"):
        assert (tmp_path / "docs" / "figures" / "study" / name).stat().st_size > 0
        assert f"](figures/study/{name})" in page
    assert (folder / "study.md").exists() and "](mopoe-beta2.5-seed1/sample_grid.png)" in (folder / "study.md").read_text()
    with Image.open(tmp_path / "docs" / "figures" / "study" / "grid_mopoe.png") as published:
        assert published.mode == "P" and published.size == (40, 60)  # 256 colours, the grid's size
        assert np.array_equal(np.asarray(published.convert("RGB")), colours[..., :3])  # up to 256 colours: exact
    assert "![mopoe](figures/study/grid_mopoe.png)" in page and "grid_helvae" not in page
    assert "**Not the papers' setting.**" in page
    assert "sweep --preset polymnist-cpu-study --workers 2; python -m applications.multimodal_vae study --sweep " in page
    # variants' runs: summarised together (none of these fakes is a finished run), the page names each variant
    variants = ["polymnist-cpu-study-quick", "polymnist-cpu-study-alpha"]
    assert main(["study", "--sweep", str(folder), "--preset", *variants]) == 0
    assert ("Command: `python -m applications.multimodal_vae sweep --preset polymnist-cpu-study-quick --workers 2; "
            "python -m applications.multimodal_vae sweep --preset polymnist-cpu-study-alpha --workers 2; "
            f"python -m applications.multimodal_vae study --sweep {folder} --preset {' '.join(variants)}`"
            in (folder / "study.md").read_text())
    assert "mvae-beta2.5-seed2" in (folder / "report.md").read_text()  # listed as not finished
    unfinished = next(line for line in (folder / "study.md").read_text().splitlines()
                      if line.startswith("**Runs of the grid not in these tables**"))
    assert "mvae-beta2.5-seed2" in unfinished and "helvae-beta1.0-seed0" in unfinished
    with pytest.raises(SystemExit):
        main(["study", "--sweep", str(tmp_path / "nothing")])
    assert "holds no results.csv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["study", "--sweep", str(folder), "--preset", "polymnist-cpu", "polymnist-cpu-study-quick"])
    assert "variants of one study" in capsys.readouterr().err
    assert set(SCALARS) <= set(FIELDS)


def test_the_alpha_table_pools_every_label_of_one_alpha_and_counts_the_seeds_that_computed_a_metric(tmp_path):
    """HELVAE's runs and the moment-matched alpha = 1/2 under another label are one model: pooled, each seed once (a
    seed of both was counted twice, as if independent); a run of other settings than HELVAE's is left out, named
    (it was pooled with its alpha's runs)."""
    folder = tmp_path / "runs" / "polymnist-cpu-study"
    masses = [(0.2, ""), (0.1, "")]
    runs = [("holder-a0.5", "holder", 0.5, 1.0, seed, {"coherence": c}, masses) for seed, c in ((0, 0.1), (3, 0.86))]
    runs += [("helvae", "helvae", 0.5, 1.0, seed, {"coherence": 0.8 + 0.02 * seed}, masses) for seed in range(3)]
    runs += [("holder-a0.25", "holder", 0.25, 1.0, seed, {"coherence": 0.5, "kid_unconditional": 0.002 if seed else None},
              masses) for seed in range(3)]
    runs += [("holder-a0.25-big", "holder", 0.25, 1.0, 0, {"coherence": 0.9}, masses)]
    fake_sweep(folder, runs, {"holder-a0.25-big": ["model.latent_dim=64"]})
    assert main(["study", "--sweep", str(folder)]) == 0
    page = (folder / "study.md").read_text()
    assert "| holder | 0.5 | 4 | 0.830 ± 0.026 |" in page  # stdev of 0.80, 0.82, 0.84, 0.86: seed 0 is HELVAE's
    assert ("Left out (2): holder-a0.5-beta1.0-seed0 (seed 0 of the same model as helvae-beta1.0-seed0), "
            "holder-a0.25-big-beta1.0-seed0 (settings other than helvae-beta1.0-seed0's: model.latent_dim 64 "
            "against 32).") in page
    assert "| holder | 0.25 | 3 | 0.500 ± 0.000 |" in page and "| 2.00 ± 0.00 (2) |" in page  # KID of two of three
    assert "| moment-matched alpha = 0.25 vs 1/2 (HELVAE) | lower: 0.500 ± 0.000 (3) vs 0.830 ± 0.026 (4) |" in page


def test_the_page_shows_what_was_run_and_draws_only_what_was_computed(tmp_path, monkeypatch):
    """A variant at a beta the models lack had no row; a beta trend a model cannot show was left out (the claims say
    "not run"); figures got panels for metrics no run computed (the alpha figure read NaN as a value) and a Pareto
    figure without coherence; --docs kept the figures of an earlier page."""
    import matplotlib.pyplot as plt

    folder = tmp_path / "runs" / "polymnist-cpu-study"
    runs = [("helvae", "helvae", 0.5, beta, seed, {"coherence": 0.8 + 0.02 * seed}, [(0.2, ""), (0.1, "")])
            for beta in (1.0, 2.5) for seed in range(2)]
    runs += [("mvae", "mvae", 0.5, 1.0, seed, {"coherence": 0.2 + 0.02 * seed}, [(0.5, ""), (0.4, "")])
             for seed in range(2)]
    runs += [("mmvae-k4", "mmvae", 0.5, 5.0, 0, {"coherence": 0.7}, [(0.0, ""), (0.0, "")])]
    fake_sweep(folder, runs)
    figures = tmp_path / "docs" / "figures" / "study"
    figures.mkdir(parents=True)
    for stale in ("grid_oldmodel.png", "study_old.png"):
        (figures / stale).write_bytes(b"an earlier page's figure")
    (figures / "notes.txt").write_text("not a figure of the page")
    panels = []
    subplots = plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda rows, columns, **kw: panels.append(columns) or
                        subplots(rows, columns, **kw))
    assert main(["study", "--sweep", str(folder), "--docs", str(tmp_path / "docs")]) == 0
    page = (tmp_path / "docs" / "study.md").read_text()
    assert "| mmvae-k4 (mmvae, K = 4, dreg) | 5 | 1 | 0.700 |" in page
    assert "| mvae: raising β from 1 to 2.5, coherence rises | HELVAE paper §6.3 | 1 → 2.5 | not run | – |" in page
    assert "| helvae: raising β from 1 to 2.5, coherence rises | HELVAE paper §6.3 | 1 → 2.5 | not separable" in page
    # no run computed log p(X), KID, FID or masses: no Pareto figure, the alpha figure with coherence alone
    assert "pareto" not in page and not (figures / "study_pareto.png").exists()
    assert panels == [2, 1, 3]  # coherence by inputs at two betas, the alpha figure, the masses in training
    assert sorted(p.name for p in figures.iterdir()) == ["notes.txt", "study_alpha.png", "study_mass.png",
                                                         "study_synergy.png"]


def test_the_alpha_study_counts_options_added_since_a_run_as_their_defaults(tmp_path):
    """A run whose config.yaml predates an option (it resumes as the option's default) was left out of the alpha
    study for "model.posterior_scale None against 'free'"."""
    folder = tmp_path / "runs" / "polymnist-cpu-study"
    masses = [(0.2, ""), (0.1, "")]
    runs = [("helvae", "helvae", 0.5, 1.0, seed, {"coherence": 0.8}, masses) for seed in range(2)]
    runs += [("holder-a0", "holder", 0.0, 1.0, seed, {"coherence": 0.3}, masses) for seed in range(2)]
    fake_sweep(folder, runs)
    saved = folder / "holder-a0-beta1.0-seed0" / "config.yaml"
    lines = saved.read_text().splitlines()
    assert any(line.strip().startswith("posterior_scale:") for line in lines)
    saved.write_text("\n".join(line for line in lines if not line.strip().startswith("posterior_scale:")) + "\n")
    assert main(["study", "--sweep", str(folder)]) == 0
    page = (folder / "study.md").read_text()
    assert "Left out" not in page and "| holder | 0 | 2 |" in page


def test_the_alpha_study_leaves_out_runs_of_another_training_budget(tmp_path, capsys):
    """The settings the alpha study compares dropped everything a resumed run may change, the training budget
    included: a run of 300 epochs was pooled with runs of a few."""
    folder = tmp_path / "runs" / "polymnist-cpu-study"
    masses = [(0.2, ""), (0.1, "")]
    runs = [("helvae", "helvae", 0.5, 1.0, seed, {"coherence": 0.8}, masses) for seed in range(2)]
    runs += [("holder-a0", "holder", 0.0, 1.0, seed, {"coherence": 0.3}, masses) for seed in range(2)]
    runs += [("holder-a0-long", "holder", 0.0, 1.0, 2, {"coherence": 0.9}, masses)]
    fake_sweep(folder, runs, {"holder-a0-long": ["train.epochs=300"]})
    assert main(["study", "--sweep", str(folder)]) == 0
    page = (folder / "study.md").read_text()
    assert re.search(r"Left out \(1\): holder-a0-long-beta1\.0-seed2 \(settings other than helvae-beta1\.0-seed0's: "
                     r"train\.epochs 300 against \d+\)\.", page)
    assert "| holder | 0 | 2 | 0.300 ± 0.000 |" in page
    # a run removed since the summary: a clear error naming it (it was a FileNotFoundError traceback)
    import shutil

    shutil.rmtree(folder / "holder-a0-beta1.0-seed1")
    with pytest.raises(SystemExit):
        main(["study", "--sweep", str(folder)])
    assert "holder-a0-beta1.0-seed1" in capsys.readouterr().err


def test_the_pooling_mass_counts_the_runs_that_logged_a_number_and_names_a_missing_log(tmp_path):
    """A run whose last logged mass is NaN made the alpha table's cell "x ± 0.000" as if two seeds agreed; a run
    without its pooling log was reported as a run missing from the sweep."""
    from applications.multimodal_vae.study import _read_rows, mass_through_training

    folder = tmp_path / "sweep"
    fake_sweep(folder, [("holder-a0.25", "holder", 0.25, 1.0, seed, {"coherence": 0.6}, [(0.4, 0.5), (0.2, mass)])
                        for seed, mass in ((0, 0.3), (1, "nan"))])
    rows = _read_rows(folder)
    steps, series = mass_through_training(folder, rows, "own_cross_mass")
    assert steps == [100, 200] and series[0][2] == 2 and series[-1][0] == 0.3 and series[-1][2] == 1
    assert math.isnan(series[-1][1]) and _show("own_cross_mass", series[-1][:2], series[-1][2]) == "0.300"
    (folder / "holder-a0.25-beta1.0-seed1" / "pooling.csv").unlink()
    with pytest.raises(ValueError, match="holder-a0.25-beta1.0-seed1/pooling.csv is missing"):
        mass_through_training(folder, rows, "own_cross_mass")


def test_the_mass_figure_takes_more_alphas_than_the_colour_cycle(tmp_path):
    """One colour per alpha came from the default cycle of ten: an eleventh alpha raised KeyError."""
    folder = tmp_path / "runs" / "polymnist-cpu-study"
    alphas = [("holder", 0.0)] + [("holder", 1 / n) for n in range(1, 11)]  # (exact pools: 0 or 1/n)
    fake_sweep(folder, [(f"{name}-a{a:.3f}", name, a, 1.0, 0, {"coherence": 0.5}, [(0.4, 0.3), (0.2, 0.1)])
                        for name, a in alphas])
    assert main(["study", "--sweep", str(folder), "--docs", str(tmp_path / "docs")]) == 0
    assert (tmp_path / "docs" / "figures" / "study" / "study_mass.png").stat().st_size > 0
