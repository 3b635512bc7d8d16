"""Sweeps on the tiny fixture: every run trained and evaluated once, resumable, summarised with plots."""

import csv
import math

import pytest

from applications.multimodal_vae.__main__ import main
from applications.multimodal_vae.sweep import SweepConfig, aggregate, load_sweep, pareto_front, run_sweep


def tiny_sweep(root):
    overrides = [f"data.root={root / 'data'}", "data.build_offline=false", "data.num_modalities=3",
                 "model.latent_dim=4",
                 "model.architecture=conv", "train.batch_size=8", "train.epochs=1", "train.device=cpu",
                 "train.tensorboard=false", "eval.probe_examples=10", "eval.likelihood_samples=2",
                 "eval.unconditional_samples=20"]
    return SweepConfig(name="tiny", base="polymnist-helvae", overrides=overrides, models=["helvae", "mopoe"],
                       betas=[1.0, 2.5], seeds=[0, 1], output_dir=str(root / "runs"))


def test_a_sweep_trains_evaluates_and_summarises_once(tiny_root):
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


def test_pareto_front_and_aggregation_by_hand():
    points = [(0.5, 100.0), (0.6, 120.0), (0.4, 90.0), (0.55, 130.0), (0.6, 110.0)]
    assert pareto_front(points, maximise_y=False) == [2, 0, 4]  # FID: lower is better
    assert pareto_front(points, maximise_y=True) == [3, 1]  # higher is better
    base = {f: 0.0 for f in ("coherence", "cross_coherence", "unconditional_coherence", "log_likelihood",
                             "conditional_log_likelihood", "probe_all", "probe_single", "fid_unconditional",
                             "pairwise_mass", "seconds_per_batch")}
    rows = [{**base, "model": "a", "beta": 1.0, "seed": s, "coherence": c, "coherence_by_inputs": '{"1": %s}' % c,
             "fid_by_inputs": "{}"} for s, c in ((0, 0.2), (1, 0.4))]
    summary = aggregate(rows)[("a", 1.0)]
    assert summary["coherence"] == pytest.approx((0.3, math.sqrt(0.02)))
    assert summary["coherence_by_inputs"][1] == pytest.approx((0.3, math.sqrt(0.02))) and summary["seeds"] == 2


def test_sweep_presets_and_errors(capsys):
    assert load_sweep("polymnist-cpu").models == ["helvae", "mopoe"]
    with pytest.raises(ValueError, match="unknown sweep preset 'nope'"):
        load_sweep("nope")
    with pytest.raises(ValueError, match="model must be one of"):
        load_sweep("polymnist-cpu", ["models=[helvae,jmvae]"])
    with pytest.raises(SystemExit):
        main(["sweep", "--preset", "polymnist-cpu", "--set", "betas=[]"])
    assert "sweep betas must not be empty" in capsys.readouterr().err


def test_the_gpu_sweep_gives_mmvae_plus_its_latent_split():
    sweep = load_sweep("polymnist-gpu")
    assert "mmvaeplus" in sweep.models
    from applications.multimodal_vae.sweep import run_config

    config = run_config(sweep, "mmvaeplus", 2.5, 0)
    assert (config.model.latent_dim, config.model.private_dim) == (32, 32)
    assert run_config(sweep, "helvae", 2.5, 0).model.private_dim == 0
    with pytest.raises(ValueError, match=r"model_overrides name models not in the sweep: \['mmvaeplus'\]"):
        load_sweep("polymnist-gpu", ["models=[helvae]"])
