"""Sweeps on the tiny fixture: every run trained and evaluated once, resumable, summarised with plots."""

import csv
import json
import math
import re

import pytest
from omegaconf import OmegaConf

from applications.multimodal_vae import sweep as sweep_module
from applications.multimodal_vae.__main__ import main
from applications.multimodal_vae.config import load_config
from applications.multimodal_vae.sweep import (
    SweepConfig,
    aggregate,
    available_sweeps,
    load_sweep,
    mean_std,
    pareto_front,
    result_row,
    run_sweep,
    table_name,
    write_results,
)

pytestmark = pytest.mark.usefixtures("float32_default")


def tiny_sweep(root):
    overrides = [f"data.root={root / 'data'}", "data.build_offline=false", "data.num_modalities=3",
                 "model.latent_dim=4",
                 "model.architecture=conv", "model.hidden=32", "train.batch_size=8", "train.epochs=1", "train.device=cpu",
                 "train.tensorboard=false", "eval.probe_examples=10", "eval.likelihood_samples=2",
                 "eval.unconditional_samples=20"]
    return SweepConfig(name="tiny", base="polymnist-helvae", overrides=overrides, models=["helvae", "mopoe"],
                       betas=[1.0, 2.5], seeds=[0, 1], output_dir=str(root / "runs"))


def test_a_sweep_trains_evaluates_and_summarises_once(tiny_root, capsys):
    folder = run_sweep(tiny_sweep(tiny_root), show_progress=False)
    with open(folder / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["model"], float(r["beta"]), int(r["seed"])) for r in rows) == sorted(
        (m, b, s) for m in ("helvae", "mopoe") for b in (1.0, 2.5) for s in (0, 1))
    assert all(0 <= float(r["coherence"]) <= 1 and math.isfinite(float(r["log_likelihood"])) for r in rows)
    report = (folder / "report.md").read_text()
    assert "| helvae | 2.5 | 2 |" in report and "Seconds per training batch" in report
    for figure in ("coherence_vs_log_likelihood.png", "metrics_vs_beta.png", "synergy.png"):
        assert (folder / figure).stat().st_size > 0 and f"]({figure})" in report
    assert not (folder / "coherence_vs_fid_unconditional.png").exists()  # FID was not computed
    # a second call skips finished runs; a run without metrics, or without its report (killed between the two),
    # is evaluated again, not retrained
    redo = folder / "mopoe-beta1.0-seed1" / "metrics.json"
    unreported = folder / "helvae-beta2.5-seed0" / "report.md"
    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("*/metrics.json") if p.parent not in (redo.parent,
                                                                                                  unreported.parent)}
    redo.unlink()
    unreported.unlink()
    checkpoints = {p: p.stat().st_mtime_ns for p in folder.glob("*/checkpoint.pt")}
    run_sweep(tiny_sweep(tiny_root), show_progress=False)
    assert len(stamps) == 6 and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert redo.exists() and unreported.exists()
    assert len(checkpoints) == 8 and all(p.stat().st_mtime_ns == t for p, t in checkpoints.items())
    # how far below log p(X) the estimates lie: one run per model (beta 1, seed 0), K = 1 against K = 200
    out = tiny_root / "likelihood_check.md"
    assert main(["likelihood-check", "--sweep", str(folder), "--samples", "200", "1", "--examples", "4",
                 "--out", str(out)]) == 0
    table = {line.split(" | ")[0][2:]: line.strip("| ").split(" | ") for line in out.read_text().splitlines()
             if line.startswith(("| helvae |", "| mopoe |"))}
    assert sorted(table) == ["helvae", "mopoe"] and table["mopoe"][1] == "mopoe-beta1.0-seed0"
    for _, _, at_one, at_many, gap in table.values():
        gap, error = map(float, gap.split(" ± "))
        assert abs(float(at_many) - float(at_one) - gap) <= 0.11 and gap > 3 * error > 0  # K = 1 lies further below
    # the summary's table spliced into a docs page by the sweep command, from a preset file
    preset = tiny_root / "tiny-sweep.yaml"
    OmegaConf.save(OmegaConf.structured(tiny_sweep(tiny_root)), preset)
    page = tiny_root / "page.md"
    page.write_text("# R\n\n<!-- table: sweep_tiny_sweep -->\nSTALE\n<!-- end table: sweep_tiny_sweep -->\nprose\n")
    assert main(["sweep", "--preset", str(preset), "--summarise-only", "--docs", str(page)]) == 0
    text, report = page.read_text(), (folder / "report.md").read_text()
    assert text.startswith("# R\n\n<!-- table: sweep_tiny_sweep -->\nWritten on ") and "STALE" not in text
    assert text.endswith("<!-- end table: sweep_tiny_sweep -->\nprose\n")
    assert f"`python -m applications.multimodal_vae sweep --preset {preset} --summarise-only --docs {page}`" in text
    assert "from the 8 finished run(s) of the preset" in text and "not finished" not in text
    table = [line for line in report.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 4 + 2 + 2 and all(line in text for line in table)  # the report's rows, timing included
    # runs of the grid not trained yet are named; a page without the markers is refused before any work
    assert main(["sweep", "--preset", str(preset), "--summarise-only", "--docs", str(page), "--set", "seeds=[0,5]"]) == 0
    assert "from the 4 finished run(s)" in page.read_text() and "not finished: helvae-beta1.0-seed5, " in page.read_text()
    assert f"--docs {page} --set 'seeds=[0,5]'`" in page.read_text()  # quoted for a shell: it pastes back
    page.write_text("# R\n")
    with pytest.raises(SystemExit):
        main(["sweep", "--preset", str(preset), "--docs", str(page), "--set", "seeds=[5]"])
    assert "--docs" in capsys.readouterr().err and not list(folder.glob("*seed5*")) and page.read_text() == "# R\n"
    underscored = tiny_root / "tiny_sweep.yaml"  # its marker would be tiny-sweep.yaml's: refused, before any work
    underscored.write_text(preset.read_text())
    with pytest.raises(SystemExit):
        main(["sweep", "--preset", str(underscored), "--docs", str(page), "--set", "seeds=[5]"])
    assert "single hyphens" in capsys.readouterr().err and not list(folder.glob("*seed5*"))
    assert main(["likelihood-check", "--sweep", str(folder), "--samples", "2", "1", "--examples", "2"]) == 0
    assert "| mopoe | mopoe-beta1.0-seed0 |" in (folder / "likelihood_check.md").read_text()  # the default page
    with pytest.raises(SystemExit):
        main(["likelihood-check", "--sweep", str(folder), "--samples", "12"])


def test_pareto_front_and_aggregation_by_hand():
    points = [(0.5, 100.0), (0.6, 120.0), (0.4, 90.0), (0.55, 130.0), (0.6, 110.0)]
    assert pareto_front(points, maximise_y=False) == [2, 0, 4]  # FID: lower is better
    assert pareto_front(points, maximise_y=True) == [3, 1]  # higher is better
    base = {f: 0.0 for f in ("coherence", "cross_coherence", "self_coherence", "unconditional_coherence",
                             "log_likelihood",
                             "conditional_log_likelihood", "probe_all", "probe_single", "probe_private",
                             "fid_unconditional", "kid_unconditional", "pairwise_mass", "seconds_per_batch")}
    rows = [{**base, "model": "a", "beta": 1.0, "seed": s, "coherence": c, "coherence_by_inputs": '{"1": %s}' % c,
             "fid_by_inputs": "{}"} for s, c in ((0, 0.2), (1, 0.4))]
    summary = aggregate(rows)[("a", 1.0)]
    assert summary["coherence"] == pytest.approx((0.3, math.sqrt(0.02)))
    assert summary["coherence_by_inputs"][1] == pytest.approx((0.3, math.sqrt(0.02))) and summary["seeds"] == 2


def test_an_infinite_metric_is_summarised_not_a_crash():
    """statistics.stdev raises on infinities (its exact arithmetic): an overflowed metric of one seed crashed the
    whole summary."""
    inf, nan = math.inf, math.nan
    assert mean_std([1.0, None, nan, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    mean, std = mean_std([inf])
    assert mean == inf and math.isnan(std)
    mean, std = mean_std([2.5, nan])  # one seed computed it: its spread is unknown (a zero-width bar said 0)
    assert mean == 2.5 and math.isnan(std)
    mean, std = mean_std([-inf, 2.0])
    assert mean == -inf and math.isnan(std)
    assert all(math.isnan(v) for v in mean_std([inf, -inf])) and all(math.isnan(v) for v in mean_std([None]))


def test_a_presets_docs_table_is_named_after_its_file():
    assert table_name("polymnist-cpu-study-supplement") == "sweep_polymnist_cpu_study_supplement"
    assert table_name("/tmp/my-preset-v2.yaml") == "sweep_my_preset_v2"
    # names that would share a marker with another preset's ("a_b" and "a-b", "A-b" and "a-b") are refused by name
    for preset in ("/tmp/a_b.yaml", "/tmp/A-b.yaml", "/tmp/My.Preset--v2.yaml", "a--b", "-a", "a-"):
        with pytest.raises(ValueError, match="single hyphens"):
            table_name(preset)
    names = [table_name(name) for name in available_sweeps()]
    assert len(set(names)) == len(names)


def test_sweep_presets_and_errors(capsys):
    sweep = load_sweep("polymnist-cpu")
    assert sweep.models == ["helvae", "mopoe", "holder_stratified", "holderplus", "holderplusplus", "mmvm",
                            "mmvm_holder", "wbvae"]
    from applications.multimodal_vae.sweep import run_config

    for model, private in (("holder_stratified", 0), ("holderplus", 32), ("holderplusplus", 32)):
        config = run_config(sweep, model, 1.0, 0).model
        assert (config.name, config.alpha, config.latent_dim, config.private_dim) == (model, 0.5, 32, private)
    with pytest.raises(ValueError, match="unknown sweep preset 'nope'"):
        load_sweep("nope")
    with pytest.raises(ValueError, match="model must be one of"):
        load_sweep("polymnist-cpu", ["models=[helvae,holderplus,holderplusplus,jmvae]"])
    with pytest.raises(SystemExit):
        main(["sweep", "--preset", "polymnist-cpu", "--set", "betas=[]"])
    assert "sweep betas must not be empty" in capsys.readouterr().err
    # what the runs' own settings set last was silently ignored where an override set it
    for given, setting, by in (("extra_overrides=[model.beta=5.0]", "model.beta", "betas"),
                               ("overrides=[train.seed=7]", "train.seed", "seeds"),
                               ("extra_overrides=[output_dir=/elsewhere]", "output_dir", "the sweep"),
                               # extra_overrides' model.name trained every run as that model under its own label;
                               # overrides' lost to the label silently
                               ("extra_overrides=[model.name=mopoe]", "model.name", "the run's label"),
                               ("overrides=[model.name=mopoe]", "model.name", "the run's label")):
        with pytest.raises(ValueError, match=rf"must not set {setting}, which is set by {by}"):
            load_sweep("polymnist-cpu", [given])
    for given, key in (("betas=[1.0,2.5,1]", "betas"), ("seeds=[0,1,0]", "seeds"),
                       ("model_seeds={helvae: [2,2]}", "model_seeds.helvae")):  # one run counted twice
        with pytest.raises(ValueError, match=rf"sweep {key} must not repeat a value, got \["):
            load_sweep("polymnist-cpu", [given])
    # a label's own overrides may name its model (the alpha study's labels do)
    labelled = load_sweep("polymnist-cpu", ["models=[helvae,holderplus,holderplusplus,other]",
                                            "model_overrides={other: [model.name=mopoe]}"])
    assert run_config(labelled, "other", 1.0, 0).model.name == "mopoe"
    assert run_config(load_sweep("polymnist-cpu", ["extra_overrides=[train.num_threads=1]"]), "helvae", 1.0, 0) \
        .train.max_steps == 190  # what --workers' help suggests keeps the preset's own overrides


def test_the_gpu_sweep_gives_mmvae_plus_its_latent_split_and_the_mmvae_code_its_laplace_latents():
    sweep = load_sweep("polymnist-gpu")
    assert "mmvaeplus" in sweep.models
    from applications.multimodal_vae.sweep import run_config

    config = run_config(sweep, "mmvaeplus", 2.5, 0)
    assert (config.model.latent_dim, config.model.private_dim) == (32, 32)
    for name in ("mmvae", "mmvaeplus"):
        model = run_config(sweep, name, 2.5, 0).model
        assert (model.latent_family, model.posterior_scale) == ("laplace", "softmax"), name
    helvae = run_config(sweep, "helvae", 2.5, 0).model
    assert (helvae.private_dim, helvae.latent_family, helvae.posterior_scale) == (0, "normal", "free")
    with pytest.raises(ValueError, match=r"model_overrides name models not in the sweep: \[.*'mmvaeplus'\]"):
        load_sweep("polymnist-gpu", ["models=[helvae]"])


def test_a_sweep_label_can_be_a_variant_of_a_model_with_its_own_seeds(tmp_path, monkeypatch):
    from applications.multimodal_vae import sweep as sweeps
    from applications.multimodal_vae.sweep import grid, run_config

    (tmp_path / "variants.yaml").write_text("base: polymnist-helvae-cpu\nmodels: [helvae, mmvae-k4]\nbetas: [1.0]\n"
                                            "seeds: [0, 1, 2]\nmodel_overrides:\n"
                                            "  mmvae-k4: [model.name=mmvae, model.num_samples=4]\n"
                                            "model_seeds:\n  mmvae-k4: [7]\n")
    monkeypatch.setattr(sweeps, "SWEEPS", tmp_path)
    sweep = load_sweep("variants")
    assert grid(sweep) == [("helvae", 1.0, 0), ("helvae", 1.0, 1), ("helvae", 1.0, 2), ("mmvae-k4", 1.0, 7)]
    config = run_config(sweep, "mmvae-k4", 1.0, 7)
    assert (config.model.name, config.model.num_samples, config.train.seed) == ("mmvae", 4, 7)
    assert config.name == "mmvae-k4-beta1.0-seed7"
    assert run_config(sweep, "helvae", 1.0, 0).model.name == "helvae"
    with pytest.raises(ValueError, match="model must be one of"):  # a label that is no model needs model.name
        load_sweep("variants", ["models=[helvae,mmvae-k4,fast]"])
    with pytest.raises(ValueError, match=r"model_seeds name models not in the sweep: \['other'\]"):
        load_sweep("variants", ["model_seeds={other: [1]}"])
    with pytest.raises(ValueError, match=r"model_seeds must not be empty, got none for \['helvae'\]"):
        load_sweep("variants", ["model_seeds={helvae: []}"])
    with pytest.raises(ValueError, match="must not repeat a label"):
        load_sweep("variants", ["models=[helvae,helvae,mmvae-k4]"])
    for label in ("a|b", "my model", "-x", "a:b"):  # table cells and run folders
        with pytest.raises(ValueError, match=re.escape(f"got [{label!r}]")):
            load_sweep("variants", [f"models=[helvae,'{label}']"])


def fake_run(folder, seed, log_likelihood, conditional, pairwise_mass, fid, seconds, kid_error=None):
    """A run folder as a sweep reads it, for a dataset without class labels (CelebA, CUB): its metrics.json has
    no coherence and no latent probe (and KID's standard error where ``kid_error`` is given)."""
    run = folder / f"helvae-beta1.0-seed{seed}"
    run.mkdir(parents=True)
    metrics = {"test_examples": 10, "modalities": ["image", "text"], "protocol": {"probe_examples": 10},
               "not_computed": "coherence and the latent probe need one class label per tuple shared by the "
                               "modalities; celeba has none",
               "log_likelihood": {"joint": log_likelihood, "joint_std_error": 1.0, "given_one_modality": conditional,
                                  "num_samples": 2, "examples": 10},
               "pooling": {"mean_log_bhattacharyya": -0.25, "pairwise_mass": pairwise_mass},
               "fid": {"unconditional": fid, "kid_unconditional": fid / 4000, "per_size": {"1": fid + 10}}}
    if kid_error is not None:
        metrics["fid"]["kid_unconditional_standard_error"] = kid_error
    (run / "metrics.json").write_text(json.dumps(metrics))
    rows = [{"epoch": 1, "step": s + 1, "loss": 1.0, "reconstruction": 1.0, "kl": 0.0, "seconds": t}
            for s, t in enumerate(seconds)]
    with open(run / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return run


def test_a_sweep_without_coherence_or_probe_is_summarised_with_empty_cells(tmp_path):
    runs = [fake_run(tmp_path, 0, -123.4, -60.5, 0.7, 80.0, [9.0, 0.5, 0.25, 0.75], kid_error=0.002),
            fake_run(tmp_path, 1, -121.4, -58.5, 0.5, 84.0, [9.0, 1.0, 2.0], kid_error=0.0035)]
    rows = [result_row(run, "helvae", 1.0, seed) for seed, run in enumerate(runs)]
    one_seed = result_row(fake_run(tmp_path, 2, -130.0, -61.0, 3e-27, 90.0, [9.0, 1.0]), "mopoe", 1.0, 0)
    missing = ("coherence", "cross_coherence", "self_coherence", "unconditional_coherence", "probe_all",
               "probe_single")
    assert all(rows[0][f] is None for f in missing)
    assert (rows[0]["log_likelihood"], rows[0]["conditional_log_likelihood"], rows[0]["pairwise_mass"],
            rows[0]["fid_unconditional"]) == (-123.4, -60.5, 0.7, 80.0)
    # the first step (compilation, warm-up) is left out of the median
    assert (rows[0]["seconds_per_batch"], rows[1]["seconds_per_batch"]) == (0.5, 1.5)
    assert json.loads(rows[0]["coherence_by_inputs"]) == {} and json.loads(rows[0]["fid_by_inputs"]) == {"1": 90.0}
    write_results(tmp_path, rows + [one_seed])
    with open(tmp_path / "results.csv") as handle:
        saved = list(csv.DictReader(handle))
    assert [r["seed"] for r in saved] == ["0", "1", "0"] and all(r[f] == "" for r in saved for f in missing)
    assert float(saved[1]["fid_unconditional"]) == 84.0
    report = (tmp_path / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| model |"))

    def cells_of(model):
        row = next(line for line in report.splitlines() if line.startswith(f"| {model} |"))
        return dict(zip(*([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in (header, row)),
                        strict=True))

    cells = cells_of("helvae")
    # mean and sample standard deviation over the two seeds, by hand: (-123.4, -121.4) -> -122.4 ± sqrt(2)
    assert cells["log p(X)"] == "-122.4 ± 1.4" and cells["plug-in log p(X_rest \\| x_m)"] == "-59.5 ± 1.4"
    assert cells["FID"] == "82.0 ± 2.8" and cells["pairwise mass"] == "0.600 ± 0.141"
    assert cells["KID x 1000"] == "20.5 ± 0.7"  # 0.020 and 0.021, in thousandths
    assert cells["KID s.e. x 1000"] == "2.8"  # each run's own error: their mean, no spread over seeds
    assert all(cells[c] == "–" for c in ("coherence (all subsets)", "one input", "self (one input)", "unconditional",
                                          "probe (all)"))
    # one seed: the value alone (its spread over seeds is unknown, not 0)
    alone = cells_of("mopoe")
    assert (alone["seeds"], alone["log p(X)"], alone["KID x 1000"]) == ("1", "-130.0", "22.5")
    assert alone["KID s.e. x 1000"] == "–"  # evaluated before the error was computed
    assert "KID s.e.: each run's jackknife standard error" in report
    # a group where only some runs have the error says how many
    assert sweep_module._cell("kid_unconditional_standard_error", (3.1, 0.0), 1, 3) == "3.1 (1 of 3 runs)"
    # a metric two of three seeds computed says so; one whose seeds overflowed to both infinities is no "–"
    assert sweep_module._cell("coherence", (0.5, 0.1), 2, 3) == "0.500 ± 0.100 (2)"
    assert sweep_module._cell("coherence", (0.5, 0.1), 3, 3) == "0.500 ± 0.100"
    assert sweep_module._cell("coherence", (math.nan, math.nan), 3, 3) == "not finite"
    assert sweep_module._cell("coherence", (math.nan, math.nan), 0, 3) == "–"
    assert alone["pairwise mass"] == "3.0e-27"  # a mass that fell to nearly nothing keeps its size, not 0.000
    assert ("Not computed by any run (–): coherence (all subsets), one input, self (one input), unconditional, "
            "probe (all);") in report
    # no coherence, so no coherence-vs-X figure; the metrics and the FID curve are drawn
    assert not list(tmp_path.glob("coherence_vs_*.png"))
    for figure in ("metrics_vs_beta.png", "synergy.png"):
        assert (tmp_path / figure).stat().st_size > 0 and f"]({figure})" in report


def one_run_sweep(root, extra=()):
    """One HELVAE run of three epochs (a sweep of the tiny data)."""
    sweep = tiny_sweep(root)
    sweep.models, sweep.betas, sweep.seeds = ["helvae"], [1.0], [0]
    sweep.overrides = [*sweep.overrides, "train.epochs=3"]
    sweep.extra_overrides = list(extra)
    return sweep


def test_a_sweep_resumes_a_run_evaluated_before_it_finished(tiny_root):
    """A run the wall-clock guard stopped after one step, then evaluated by hand, has every output file; the next
    sweep must still resume it and evaluate it again at its last step."""
    folder = run_sweep(one_run_sweep(tiny_root, ["train.max_minutes=1e-9"]), show_progress=False)
    run = folder / "helvae-beta1.0-seed0"
    assert main(["evaluate", "--run", str(run)]) == 0
    assert json.loads((run / "metrics.json").read_text())["training"]["steps"] == 1
    folder = run_sweep(one_run_sweep(tiny_root), show_progress=False)
    training = json.loads((run / "metrics.json").read_text())["training"]
    assert training["steps"] == training["planned_steps"] > 1 and training["stopped_by"] is None
    with open(folder / "results.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 1


def test_a_reevaluation_killed_before_its_report_or_damaged_metrics_are_evaluated_again(tiny_root, monkeypatch):
    """An evaluation writes metrics.json, then report.md. Killed between them when the run had been evaluated
    before, it left the old report beside the new metrics, and the sweep counted the run as evaluated for good (its
    report showed the old step's numbers); a truncated metrics.json stopped the whole sweep with a JSON error that
    named no file. Both runs are now evaluated again."""
    import applications.multimodal_vae.evaluation as evaluation

    folder = run_sweep(one_run_sweep(tiny_root), show_progress=False)
    run = folder / "helvae-beta1.0-seed0"
    render = evaluation.render_report

    def killed(config, metrics):
        raise KeyboardInterrupt("killed between metrics.json and report.md")

    monkeypatch.setattr(evaluation, "render_report", killed)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(one_run_sweep(tiny_root, ["train.epochs=4"]), show_progress=False)
    assert json.loads((run / "metrics.json").read_text())["training"]["steps"] == 12
    assert not (run / "report.md").exists()  # not the report of step 9
    monkeypatch.setattr(evaluation, "render_report", render)
    run_sweep(one_run_sweep(tiny_root, ["train.epochs=4"]), show_progress=False)
    config = load_config(path=run / "config.yaml")
    assert (run / "report.md").read_text() == render(config, json.loads((run / "metrics.json").read_text()))
    (run / "metrics.json").write_text('{"test_examples": 10, "trunc')
    run_sweep(one_run_sweep(tiny_root, ["train.epochs=4"]), show_progress=False)
    assert json.loads((run / "metrics.json").read_text())["training"]["steps"] == 12
    with open(folder / "results.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 1


def test_a_sweep_refuses_runs_of_another_configuration_before_any_work(tiny_root, capsys):
    """A finished run of other training settings would otherwise be reported as the new sweep's, and an unfinished
    one would stop the sweep half way when it refuses to resume; settings that change no number may differ."""
    folder = run_sweep(one_run_sweep(tiny_root), show_progress=False)
    run = folder / "helvae-beta1.0-seed0"
    files = {p: p.stat().st_mtime_ns for p in run.iterdir()}
    changed = one_run_sweep(tiny_root, ["model.latent_dim=8", "train.lr=0.01"])
    with pytest.raises(ValueError, match=r"holds runs of another configuration than this sweep's: helvae-beta1.0-seed0 "
                                         r"\(model.latent_dim: saved 4, now 8; train.lr: saved 0.0005, now 0.01\)"):
        run_sweep(changed, show_progress=False)
    assert {p: p.stat().st_mtime_ns for p in run.iterdir()} == files
    assert run_sweep(one_run_sweep(tiny_root, ["train.num_threads=1", "train.checkpoint_every=2"]),
                     show_progress=False) == folder
    assert {p: p.stat().st_mtime_ns for p in run.iterdir()} == files  # finished: neither retrained nor evaluated
    # a run trained past the sweep's budget (9 steps of 3 epochs) would be reported as the shorter training's
    for shorter, why in ((["train.max_steps=5"], "trained to step 9, past train.max_steps = 5"),
                         (["train.epochs=2"], "trained for 3 epochs, past train.epochs = 2")):
        with pytest.raises(ValueError, match=rf"another configuration than this sweep's: helvae-beta1.0-seed0 \({why}\)"):
            run_sweep(one_run_sweep(tiny_root, shorter), show_progress=False, summarise_only=True)
    assert {p: p.stat().st_mtime_ns for p in run.iterdir()} == files
    # a run folder without its config.yaml (copied by hand): its checkpoint's configuration is compared instead
    (run / "config.yaml").unlink()
    with pytest.raises(ValueError, match=r"helvae-beta1.0-seed0 \(model.latent_dim: saved 4, now 8; train.lr"):
        run_sweep(changed, show_progress=False)


def test_a_sweep_follows_its_presets_budget_and_eval_settings_and_goes_past_damaged_checkpoints(tiny_root, capsys):
    """A finished run was reused as it stood when the preset raised train.epochs or changed eval settings (the
    summary reported the old results under the new settings); a summary alone never checked the runs'
    configuration; a damaged checkpoint stopped the whole sweep or its summary."""
    folder = run_sweep(one_run_sweep(tiny_root), show_progress=False)
    run = folder / "helvae-beta1.0-seed0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval"]["probe_examples"] == 10 and metrics["training"]["steps"] == 9  # 3 epochs of 3 batches
    checkpoint = (run / "checkpoint.pt").stat().st_mtime_ns
    # other eval settings: evaluated again, not retrained
    run_sweep(one_run_sweep(tiny_root, ["eval.probe_examples=12"]), show_progress=False)
    assert json.loads((run / "metrics.json").read_text())["eval"]["probe_examples"] == 12
    assert (run / "checkpoint.pt").stat().st_mtime_ns == checkpoint
    # more epochs: resumed from its checkpoint to them, then evaluated at the new step
    run_sweep(one_run_sweep(tiny_root, ["eval.probe_examples=12", "train.epochs=4"]), show_progress=False)
    assert json.loads((run / "metrics.json").read_text())["training"]["steps"] == 12
    with open(run / "metrics.csv") as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == list(range(1, 13))  # continued, not restarted
    # a summary alone refuses runs of another configuration, as a sweep does
    with pytest.raises(ValueError, match=r"another configuration.*train.lr: saved 0.0005, now 0.01"):
        run_sweep(one_run_sweep(tiny_root, ["eval.probe_examples=12", "train.epochs=4", "train.lr=0.01"]),
                  show_progress=False, summarise_only=True)
    # a damaged checkpoint, evaluated or not: the other runs are trained and summarised, it is listed as unreadable
    two = one_run_sweep(tiny_root, ["eval.probe_examples=12", "train.epochs=4"])
    two.seeds = [0, 1]
    (run / "checkpoint.pt").write_bytes(b"damaged")
    run_sweep(two, show_progress=False)
    assert (folder / "helvae-beta1.0-seed1" / "metrics.json").exists()
    assert (folder / "unfinished.txt").read_text() == "helvae-beta1.0-seed0 (unreadable checkpoint)\n"
    (run / "metrics.json").unlink()
    two.seeds = [0, 1, 2]
    run_sweep(two, show_progress=False)
    assert (folder / "helvae-beta1.0-seed2" / "metrics.json").exists()
    with open(folder / "results.csv") as handle:
        assert sorted(int(row["seed"]) for row in csv.DictReader(handle)) == [1, 2]
    # the log-likelihoods alone are computed again with other likelihood settings only, and say so in the record
    other = folder / "helvae-beta1.0-seed1"
    assert main(["evaluate", "--run", str(other), "--only", "log_likelihood", "--set", "eval.likelihood_samples=3"]) == 0
    assert json.loads((other / "metrics.json").read_text())["eval"]["likelihood_samples"] == 3
    with pytest.raises(SystemExit):  # other tuples than the rest of the metrics were scored on
        main(["evaluate", "--run", str(other), "--only", "log_likelihood", "--set", "eval.seed=5"])
    assert "evaluate the run in full" in capsys.readouterr().err


def test_the_likelihood_check_scores_the_tuples_the_evaluation_scores(tiny_root, monkeypatch):
    """It took the first test tuples in stored order, the evaluation those of its seeded order: on data stored class
    by class (MNIST-SVHN-Text, CUB) the check's gaps were those of digit 0."""
    import torch

    from applications.multimodal_vae import evaluation
    from applications.multimodal_vae.data import load_dataset
    from applications.multimodal_vae.study import likelihood_convergence
    from applications.multimodal_vae.train import load_run

    folder = run_sweep(one_run_sweep(tiny_root), show_progress=False)
    seen = []
    monkeypatch.setattr(evaluation, "log_likelihood",
                        lambda model, x, num_samples, generator: seen.append(x) or torch.zeros(len(x[0])))
    for bad in ((12.7, 1000), (True, 2), (2, float("inf"))):  # (12.7 ran as 12)
        with pytest.raises(ValueError, match="samples must be whole numbers"):
            likelihood_convergence(folder, samples=bad, examples=4)
    likelihood_convergence(folder, samples=(1, 2), examples=4)
    config, _ = load_run(folder / "helvae-beta1.0-seed0")
    test = load_dataset(config, "test")
    expected = evaluation.scored_tuples(config.eval, test).head(4).gather(torch.arange(4))
    assert len(seen) == 2 and all(torch.equal(a, b) for x in seen for a, b in zip(x, expected))
    assert not all(torch.equal(a, b) for a, b in zip(expected, test.head(4).gather(torch.arange(4))))


def test_the_cost_table_counts_each_runs_steps_from_its_epochs_or_its_cap(tmp_path, monkeypatch):
    """``bench_mvae --sweep``: a run's steps are its epochs of the training tuples or its ``max_steps``, whichever
    is fewer, and ``--set`` reaches the runs' configurations."""
    from pathlib import Path

    from applications.multimodal_vae import sweep as sweeps

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_mvae

    (tmp_path / "cost.yaml").write_text(
        "base: polymnist-helvae-cpu\nmodels: [helvae, mvae]\nbetas: [1.0, 2.5]\nseeds: [0]\n"
        "overrides: [data.num_modalities=3, model.latent_dim=4, model.hidden=16, train.batch_size=8, "
        "train.epochs=3, train.max_steps=null, train.device=cpu, train.num_threads=1]\n"
        "model_overrides:\n  mvae: [train.max_steps=5]\n")
    monkeypatch.setattr(sweeps, "SWEEPS", tmp_path)
    table = bench_mvae.sweep_cost("cost", repeats=1, warmup=0, overrides=["extra_overrides=[train.precision=bf16]"],
                                  train_examples=20)
    assert "batch 8, bf16;" in table and "steps per run for 20 training tuples" in table
    rows = {cells[0]: cells for cells in (line.strip("| ").split(" | ") for line in table.splitlines()
                                          if line.startswith("| helvae") or line.startswith("| mvae"))}
    assert rows["helvae"][1:2] + rows["helvae"][3:4] == ["2", "9"]  # 3 epochs of ceil(20 / 8) = 3 steps
    assert rows["mvae"][1:2] + rows["mvae"][3:4] == ["2", "5"]  # capped
    # a label's own batch size: its steps are counted and timed on it (MVAE was timed on HELVAE's batch of 8)
    seen = []
    monkeypatch.setattr(bench_mvae, "step", lambda model, optimizer, x, *rest: seen.append(len(x)) or 0.5)
    (tmp_path / "cost.yaml").write_text((tmp_path / "cost.yaml").read_text().replace(
        "mvae: [train.max_steps=5]", "mvae: [train.max_steps=null, train.batch_size=4]"))
    table = bench_mvae.sweep_cost("cost", repeats=1, warmup=0, train_examples=20)
    assert "batch 4/8," in table and sorted(set(seen)) == [4, 8] and seen.count(4) == seen.count(8) == 1
    rows = {cells[0]: cells for cells in (line.strip("| ").split(" | ") for line in table.splitlines()
                                          if line.startswith("| helvae") or line.startswith("| mvae"))}
    assert rows["mvae"][3] == "15"  # 3 epochs of 20 / 4 steps
    (tmp_path / "cost.yaml").write_text((tmp_path / "cost.yaml").read_text().replace(
        "train.batch_size=4]", "train.num_threads=2]"))
    with pytest.raises(ValueError, match="the labels' train.num_threads differ"):
        bench_mvae.sweep_cost("cost", repeats=1, warmup=0, train_examples=20)
