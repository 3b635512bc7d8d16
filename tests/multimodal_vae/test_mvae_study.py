"""The study's machinery: breadth-first grids, runs shared between processes through locks, training without
evaluation, a time limit, partial summaries, the study preset, and the pooling diagnostics logged through
training."""

import csv
import dataclasses
import fcntl
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import integrate
from tiny_runs import WHEEL_CACHE

from applications.multimodal_vae.__main__ import main
from applications.multimodal_vae.evaluation.diagnostics import pooling_diagnostics
from applications.multimodal_vae.evaluation.fid import default_weights
from applications.multimodal_vae.sweep import SWEEPS, SweepConfig, grid, load_sweep, run_config, run_sweep, summarise

pytestmark = pytest.mark.usefixtures("float32_default")


def tiny(root, models=("helvae",), seeds=(0, 1), **fields):
    overrides = [f"data.root={root / 'data'}", "data.build_offline=false", "data.num_modalities=3",
                 "model.latent_dim=4", "model.architecture=conv", "model.hidden=32", "train.batch_size=8", "train.epochs=1",
                 "train.device=cpu", "train.tensorboard=false", "eval.probe_examples=10", "eval.likelihood_samples=2",
                 "eval.unconditional_samples=20"]
    return SweepConfig(name="tiny", base="polymnist-helvae", overrides=overrides, models=list(models), betas=[1.0],
                       seeds=list(seeds), output_dir=str(root / "runs"), **fields)


@pytest.fixture
def fake_training(monkeypatch):
    """The sweep's training and evaluation replaced by stubs that write the files it checks (its orchestration is
    under test here; test_mvae_sweep trains and evaluates for real). Returns the calls, in order."""
    from applications.multimodal_vae import sweep as sweeps

    calls = []

    def train(config, resume, show_progress):
        run = Path(config.output_dir) / config.name
        run.mkdir(parents=True, exist_ok=True)
        (run / "checkpoint.pt").write_text("finished")
        (run / "metrics.csv").write_text("epoch,step,loss,reconstruction,kl,seconds\n1,1,1,1,0,0.5\n")
        calls.append(("train", config.name, resume))

    def evaluate_run(run_dir, config, model, progress=None):
        metrics = {"log_likelihood": {"joint": -1.0, "given_one_modality": -2.0}, "pooling": {"pairwise_mass": 0.0}}
        (Path(run_dir) / "metrics.json").write_text(json.dumps(metrics))
        (Path(run_dir) / "report.md").write_text("report")
        calls.append(("evaluate", config.name))

    monkeypatch.setattr(sweeps, "train", train)
    monkeypatch.setattr(sweeps, "evaluate_run", evaluate_run)
    monkeypatch.setattr(sweeps, "load_run", lambda run_dir: (None, None))
    # a stub checkpoint stands at its run's last epoch (one epoch in these tests)
    monkeypatch.setattr(sweeps, "load_checkpoint", lambda path: {"finished": Path(path).read_text() == "finished",
                                                                 "epoch": 1, "step": 1})
    return calls


def test_breadth_first_grids_and_per_label_betas():
    sweep = SweepConfig(models=["a", "b"], betas=[1.0, 2.5], seeds=[0, 1, 2], model_seeds={"b": [5]},
                        model_betas={"b": [1.0]}, breadth_first=True)
    assert grid(sweep) == [("a", 1.0, 0), ("a", 2.5, 0), ("b", 1.0, 5), ("a", 1.0, 1), ("a", 2.5, 1),
                           ("a", 1.0, 2), ("a", 2.5, 2)]
    sweep.breadth_first = False
    assert grid(sweep)[:3] == [("a", 1.0, 0), ("a", 1.0, 1), ("a", 1.0, 2)] and grid(sweep)[-1] == ("b", 1.0, 5)


def test_the_study_preset():
    sweep = load_sweep("polymnist-cpu-study")
    runs = grid(sweep)
    labels = {label for label, _, _ in runs}
    for model in ("helvae", "mohelvae", "mvae", "mmvae", "mopoe", "wbvae", "mwbvae", "mmvaeplus", "holder_stratified",
                  "holderplus", "holderplusplus", "mmvm", "mmvm_holder"):
        assert {(model, beta) for beta in (1.0, 2.5)} <= {(label, beta) for label, beta, _ in runs}
    configs = {run: run_config(sweep, *run) for run in runs}
    # the alpha study: moment-matched and exact mixture at alpha in {0, 1/4, 1/3, 1/2, 1}, 3 seeds, beta 1
    studied = {}
    for (_, beta, _), config in configs.items():
        if config.model.name in ("holder", "holder_mixture", "helvae") and beta == 1.0:
            family = "holder_mixture" if config.model.name == "holder_mixture" else "holder"
            studied.setdefault(family, set()).add(round(config.model.alpha, 6))
    expected = {0.0, 0.25, round(1 / 3, 6), 0.5, 1.0}
    assert studied["holder"] == expected and studied["holder_mixture"] | {0.0} == expected
    assert all(sum(1 for r in runs if r[0] == label) == 3 for label in labels if "-a" in label)
    ablation = configs["holderplus_detached_weights", 1.0, 0].model
    assert (ablation.name, ablation.alpha, ablation.private_dim) == ("holderplus_detached_weights", 0.5, 16)
    k4 = configs["mmvae-k4", 1.0, 0].model
    assert (k4.name, k4.num_samples, k4.estimator) == ("mmvae", 4, "dreg")
    twin = configs["mmvae-k4-unbiased", 1.0, 0]
    assert twin == dataclasses.replace(configs["mmvae-k4", 1.0, 0], name=twin.name,
                                       model=dataclasses.replace(k4, estimator="dreg_unbiased"))
    # every run the same nets, latent size, batch, learning rate and steps
    assert {(c.model.architecture, c.model.activation, c.model.latent_dim + c.model.private_dim, c.train.batch_size,
             c.train.lr, c.train.max_steps) for c in configs.values()} == {("conv", "leaky_relu", 32, 128, 2e-3, 1870)}
    assert runs[0][2] == 0 and {label for label, _, seed in runs[:len(labels) * 2] if seed == 0} == labels


def test_runs_are_shared_through_locks_and_summarised_when_partial(tiny_root, fake_training):
    sweep = tiny(tiny_root)
    folder = tiny_root / "runs" / "tiny"
    folder.mkdir(parents=True)
    held = folder / "helvae-beta1.0-seed0.lock"
    holder = open(held, "w")  # a live process holds seed 0 (its own open file, as another process's would be)
    holder.write(f"{os.getpid()} {os.uname().nodename}\n")
    holder.flush()
    fcntl.flock(holder, fcntl.LOCK_EX)
    run_sweep(sweep, show_progress=False)
    assert not (folder / "helvae-beta1.0-seed0").exists() and (folder / "helvae-beta1.0-seed1" / "report.md").exists()
    assert held.exists()
    report = (folder / "report.md").read_text()
    assert "**Partial**: 1 run(s) of the grid not finished yet" in report and "helvae-beta1.0-seed0" in report
    with open(folder / "results.csv") as handle:
        assert [row["seed"] for row in csv.DictReader(handle)] == ["1"]
    holder.close()  # its process died: the kernel released the lock, and the file left behind is taken over
    run_sweep(sweep, show_progress=False)
    assert (folder / "helvae-beta1.0-seed0" / "report.md").exists() and not held.exists()
    assert "Partial" not in (folder / "report.md").read_text()
    assert [c[:2] for c in fake_training] == [("train", "helvae-beta1.0-seed1"), ("evaluate", "helvae-beta1.0-seed1"),
                                              ("train", "helvae-beta1.0-seed0"), ("evaluate", "helvae-beta1.0-seed0")]


def test_a_lock_is_held_by_one_claimant_and_freed_by_the_kernel(tmp_path):
    """Two claimants of a free lock (a file a dead worker left, empty because it died before writing it): one
    holds it, the other is refused. Before, both could unlink the stale file and claim the run, and an empty file
    was taken for a lock being written, so the run was skipped for ever."""
    from applications.multimodal_vae.files import claim as _claim

    lock = tmp_path / "run.lock"
    lock.write_text("")
    with _claim(lock) as first, _claim(lock) as second:
        assert (first, second) == (True, False)
        assert lock.read_text().split()[0] == str(os.getpid())
    assert not lock.exists()
    with _claim(lock) as again:  # released: free again
        assert again


def test_a_run_the_wall_clock_guard_stopped_is_resumed_not_evaluated(tiny_root, fake_training, monkeypatch):
    """The sweep evaluated a run the train.max_minutes guard had stopped, which marked it done for good (and its
    partial numbers entered the report); now it stays unevaluated and the next sweep resumes it."""
    from applications.multimodal_vae import sweep as sweeps

    sweep = tiny(tiny_root, seeds=(0,))
    guard = {"finished": True, "stopped_by": "train.max_minutes=60.0", "epoch": 1, "step": 1}
    unfinished = {"finished": False, "epoch": 0, "step": 0}
    monkeypatch.setattr(sweeps, "load_checkpoint",
                        lambda path: guard if Path(path).read_text() == "finished" else unfinished)
    run_sweep(sweep, show_progress=False)
    assert [c[0] for c in fake_training] == ["train"]
    run_sweep(sweep, show_progress=False)
    assert fake_training[1] == ("train", "helvae-beta1.0-seed0", True)  # resumed
    guard["stopped_by"] = None  # this time it trained to its steps
    run_sweep(sweep, show_progress=False)
    assert [c[0] for c in fake_training] == ["train", "train", "train", "evaluate"]


def test_a_diverging_run_is_marked_and_the_sweep_goes_on(tiny_root, fake_training, monkeypatch):
    """TrainingDiverged stopped the whole sweep, and a rerun diverged again at the same step, so no later run ever
    started."""
    from applications.multimodal_vae import sweep as sweeps
    from applications.multimodal_vae.train import TrainingDiverged

    stub = sweeps.train

    def train(config, resume, show_progress):
        if config.name.endswith("seed0"):
            (Path(config.output_dir) / config.name).mkdir(parents=True, exist_ok=True)
            fake_training.append(("diverged", config.name))
            raise TrainingDiverged("non-finite parameters after the optimiser step at step 3")
        stub(config, resume, show_progress)

    monkeypatch.setattr(sweeps, "train", train)
    sweep = tiny(tiny_root)
    run_sweep(sweep, show_progress=False)
    run_sweep(sweep, show_progress=False)  # not retried
    assert [c[:2] for c in fake_training] == [("diverged", "helvae-beta1.0-seed0"), ("train", "helvae-beta1.0-seed1"),
                                              ("evaluate", "helvae-beta1.0-seed1")]
    folder = tiny_root / "runs" / "tiny"
    assert "step 3" in (folder / "helvae-beta1.0-seed0" / "diverged.txt").read_text()
    assert "helvae-beta1.0-seed0 (diverged)" in (folder / "report.md").read_text()


def test_a_run_trained_by_hand_meanwhile_is_skipped_not_a_crash(tiny_root, fake_training, monkeypatch):
    """A run folder whose training another process (a train command) holds: the sweep skips it (its training, or
    its evaluation) and goes on, and a later sweep takes it up."""
    from applications.multimodal_vae import sweep as sweeps
    from applications.multimodal_vae.files import claim
    from applications.multimodal_vae.train import RUN_LOCK, RunFolderBusy

    stub, busy = sweeps.train, {"helvae-beta1.0-seed0"}

    def train(config, resume, show_progress):
        if config.name in busy:
            raise RunFolderBusy(f"{config.name} is being trained by another process")
        stub(config, resume, show_progress)

    monkeypatch.setattr(sweeps, "train", train)
    sweep = tiny(tiny_root)
    run_sweep(sweep, show_progress=False)
    assert [c[:2] for c in fake_training] == [("train", "helvae-beta1.0-seed1"), ("evaluate", "helvae-beta1.0-seed1")]
    busy.clear()
    # trained now, but its folder's lock held (a train started by hand just then): not evaluated until it is free
    run = tiny_root / "runs" / "tiny" / "helvae-beta1.0-seed0"
    run.mkdir(parents=True, exist_ok=True)
    with claim(run / RUN_LOCK):
        run_sweep(sweep, show_progress=False)
    assert [c[:2] for c in fake_training[2:]] == [("train", "helvae-beta1.0-seed0")]
    run_sweep(sweep, show_progress=False)
    assert [c[:2] for c in fake_training[3:]] == [("evaluate", "helvae-beta1.0-seed0")]


def test_variants_of_one_study_are_summarised_together(tiny_root, fake_training):
    """Each variant's own sweep summarises its grid; ``summarise`` the union of the variants' grids (what the
    study page reads), and refuses sweeps of different studies."""
    first, second = tiny(tiny_root, seeds=(0,)), tiny(tiny_root, models=("mopoe", "helvae"), seeds=(0, 1))
    folder = tiny_root / "runs" / "tiny"
    run_sweep(first, show_progress=False)
    run_sweep(second, show_progress=False, stop_after_minutes=0)  # its runs not started: none finished of its own

    def summarised():
        with open(folder / "results.csv") as handle:
            return [(row["model"], row["seed"]) for row in csv.DictReader(handle)]

    assert summarised() == [("helvae", "0")]  # the second variant's grid holds helvae seed 0 too
    assert "mopoe-beta1.0-seed0" in (folder / "report.md").read_text()  # listed as not finished
    run_sweep(second, show_progress=False)
    assert summarised() == [("mopoe", "0"), ("mopoe", "1"), ("helvae", "0"), ("helvae", "1")]
    first.models = ["helvae", "wbvae"]
    (folder / "wbvae-beta1.0-seed0").mkdir()  # not finished
    assert summarise(folder, [first, second]) == folder
    assert summarised() == [("helvae", "0"), ("mopoe", "0"), ("mopoe", "1"), ("helvae", "1")]  # the union, in order
    assert "**Partial**: 1 run(s)" in (folder / "report.md").read_text()
    other = tiny(tiny_root)
    other.name = "other"
    with pytest.raises(ValueError, match=r"the names \['other', 'tiny'\]"):
        summarise(folder, [first, other])


def test_a_summary_waits_for_another_and_reads_the_runs_after_it(tiny_root, fake_training):
    """Two sweeps started by hand on one folder may finish together: a summary that read the runs before the other
    sweep's last run finished could write last, without it. A summary now reads and writes under the folder's
    summary lock, so one that waited reads the runs as they are once it holds the lock."""
    import threading

    from applications.multimodal_vae import sweep as sweeps

    sweep = tiny(tiny_root)
    folder = tiny_root / "runs" / "tiny"
    run_sweep(tiny(tiny_root, seeds=(0,)), show_progress=False)
    (folder / "results.csv").unlink()
    with open(folder / "summary.lock", "a") as other:  # another sweep's summary holds the lock
        fcntl.flock(other, fcntl.LOCK_EX)
        waiting = threading.Thread(target=summarise, args=(folder, [sweep]))
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive() and not (folder / "results.csv").exists()
        config = run_config(sweep, "helvae", 1.0, 1)  # the other sweep's last run finishes before it summarises
        sweeps.train(config, False, False)
        sweeps.evaluate_run(folder / config.name, config, None)
    waiting.join(timeout=60)
    assert not waiting.is_alive() and not (folder / "summary.lock").exists()  # removed by its last holder
    with open(folder / "results.csv") as handle:
        assert [row["seed"] for row in csv.DictReader(handle)] == ["0", "1"]


def test_train_only_then_evaluate_and_the_time_limit(tiny_root, fake_training):
    sweep = tiny(tiny_root)
    folder = tiny_root / "runs" / "tiny"
    run_sweep(sweep, show_progress=False, stop_after_minutes=1e-9)  # past the limit before the first run
    assert not list(folder.glob("helvae-*"))
    assert "**Partial**: 2 run(s)" in (folder / "report.md").read_text()
    run_sweep(sweep, show_progress=False, train_only=True)
    assert all((folder / f"helvae-beta1.0-seed{s}" / "checkpoint.pt").exists() for s in (0, 1))
    assert not list(folder.glob("*/metrics.json"))
    checkpoints = {p: p.stat().st_mtime_ns for p in folder.glob("*/checkpoint.pt")}
    run_sweep(sweep, show_progress=False)  # evaluates, does not train again
    assert len(list(folder.glob("*/report.md"))) == 2
    assert all(p.stat().st_mtime_ns == t for p, t in checkpoints.items())
    assert "Partial" not in (folder / "report.md").read_text()
    assert [c[0] for c in fake_training] == ["train", "train", "evaluate", "evaluate"]
    # an interrupted run (a checkpoint, not finished) resumes
    (folder / "helvae-beta1.0-seed1" / "checkpoint.pt").write_text("interrupted")
    (folder / "helvae-beta1.0-seed1" / "report.md").unlink()
    run_sweep(sweep, show_progress=False)
    assert fake_training[-2:] == [("train", "helvae-beta1.0-seed1", True), ("evaluate", "helvae-beta1.0-seed1")]


def test_sweep_command_line_checks(capsys):
    for flags, message in ((["--workers", "0"], "--workers must be a positive integer, got 0"),
                           (["--stop-after", "-1"], "--stop-after must be a positive number of minutes, got -1")):
        with pytest.raises(SystemExit):
            main(["sweep", "--preset", "polymnist-cpu-study", *flags])
        assert message in capsys.readouterr().err


def test_a_failed_worker_reports_the_end_of_its_log(tmp_path, monkeypatch, capsys):
    """A worker that fails says why in the sweep's own error output, not only in its log (CI keeps no logs)."""
    import applications.multimodal_vae.sweep as sweep_module

    sweep = SweepConfig(name="failing", output_dir=str(tmp_path), models=["helvae"], betas=[1.0], seeds=[0])
    script = ("import sys; print('run:  50%|#####     | 1/2 [00:01<00:01]', end='\\r');"
              "print('Traceback (most recent call last):'); print('ValueError: the wheel is half written');"
              "sys.exit(3)")
    monkeypatch.setattr(sweep_module, "load_dataset", lambda config: None)
    monkeypatch.setattr(sweep_module.time, "sleep", lambda seconds: None)
    real_popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda command, **kw: real_popen([sys.executable, "-c", script], **kw))
    assert sweep_module.run_workers(sweep, 2, []) == 3
    error = capsys.readouterr().err
    assert error.count("ValueError: the wheel is half written") == 2 and "50%|" not in error
    assert "worker 0 exited with status 3" in error and "worker 1 exited with status 3" in error


@pytest.mark.slow
def test_two_workers_share_a_two_step_study(tiny_root, tmp_path):
    """The study preset shrunk to two steps on the tiny data, run by two processes at once from the command
    line: every run is trained and evaluated once, and the summary covers them all."""
    import yaml

    study = yaml.safe_load((SWEEPS / "polymnist-cpu-study.yaml").read_text())
    study.update(name="two-step", output_dir=str(tmp_path / "runs"), betas=[1.0], seeds=[0],
                 models=["holder-a0.333", "holder_mixture-a0.25", "holderplusplus"],
                 overrides=study["overrides"] + [
                     f"data.root={tiny_root / 'data'}", "data.build_offline=false", "data.num_modalities=3",
                     "model.hidden=32", "train.max_steps=2", "train.batch_size=8", "train.diagnostics_every=1",
                     "eval.probe_examples=10", "eval.likelihood_samples=2", "eval.likelihood_examples=4",
                     "eval.unconditional_samples=20", "eval.test_examples=10", "eval.fid_samples=4",
                     f"eval.fid_weights={default_weights(WHEEL_CACHE)}"])
    study["model_overrides"] = {k: v for k, v in study["model_overrides"].items() if k in study["models"]}
    study["model_overrides"]["holderplusplus"] = ["model.latent_dim=16", "model.private_dim=16"]
    study["model_betas"] = {k: v for k, v in study["model_betas"].items() if k in study["models"]}
    study["model_seeds"] = {}  # one seed each (the preset gives Hölder++ two)
    preset = tmp_path / "two-step.yaml"
    preset.write_text(yaml.safe_dump(study))
    result = subprocess.run([sys.executable, "-m", "applications.multimodal_vae", "sweep", "--preset", str(preset),
                             "--workers", "2"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    folder = tmp_path / "runs" / "two-step"
    assert len(list(folder.glob("*/report.md"))) == 3 and len(list(folder.glob("worker-*.log"))) == 2
    with open(folder / "results.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 3
    with open(folder / "holder-a0.333-beta1.0-seed0" / "pooling.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2] and all(0 <= float(r["own_cross_mass"]) <= 1 for r in rows)
    assert not list(folder.glob("*.lock"))


def density(z, mean, logvar):
    return math.exp(-0.5 * (z - mean) ** 2 / math.exp(logvar)) / math.sqrt(2 * math.pi * math.exp(logvar))


def test_own_cross_mass_against_quadrature():
    """The mass of the Hölder pool (alpha = 1/3) outside its single-expert components, 1 - sum_j lambda_j^3 / Z with
    Z = int (sum_j lambda_j q_j^(1/3))^3 dz, by quadrature in one latent dimension."""
    from applications.multimodal_vae.models import MultimodalVAE

    class Fixed(torch.nn.Module):
        def __init__(self, mu, logvar):
            super().__init__()
            self.register_buffer("out", torch.tensor([[mu, logvar]]))

        def forward(self, x):
            return self.out.expand(x.shape[0], 2)

    experts = [(-1.0, math.log(0.5)), (0.4, math.log(2.0)), (3.0, math.log(0.1))]
    encoders = torch.nn.ModuleList(Fixed(*e) for e in experts)
    decoders = torch.nn.ModuleList(torch.nn.Linear(1, 2) for _ in experts)
    x = [torch.zeros(2, 2) for _ in experts]
    for name, alpha in (("holder", 1 / 3), ("holder_mixture", 1 / 3), ("holder", 0.5)):
        model = MultimodalVAE(encoders, decoders, name, alpha=alpha)
        model.encode = lambda x: (torch.tensor([[[m]] * 2 for m, _ in experts]),
                                  torch.tensor([[[v]] * 2 for _, v in experts]))
        result = pooling_diagnostics(model, x)
        n = round(1 / alpha)
        z_total = integrate.quad(lambda z, a=alpha, n=n: sum(density(z, m, lv) ** a / 3 for m, lv in experts) ** n,
                                 -30, 30, points=[m for m, _ in experts], limit=200, epsabs=1e-13)[0]
        expected = 1 - 3 * (1 / 3) ** n / z_total
        assert result["own_cross_mass"] == pytest.approx(expected, abs=1e-9)
        if alpha == 0.5:
            assert result["pairwise_mass"] == pytest.approx(expected, abs=1e-9)
    # learned pooling weights (3, 0, 0 as logits): the model's own pool weights its experts by their softmax; the
    # diagnostic used equal weights (0.629 where the model's pool has 0.152 in a case of the review)
    model = MultimodalVAE(encoders, decoders, "holder_mixture", alpha=0.5, learnable_weights=True)
    with torch.no_grad():
        model.pool_logits.copy_(torch.tensor([3.0, 0.0, 0.0]))
    model.encode = lambda x: (torch.tensor([[[m]] * 2 for m, _ in experts]), torch.tensor([[[v]] * 2 for _, v in experts]))
    lam = torch.softmax(torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64), 0).tolist()
    z_total = integrate.quad(lambda z: sum(w * density(z, m, lv) ** 0.5 for w, (m, lv) in zip(lam, experts)) ** 2,
                             -30, 30, points=[m for m, _ in experts], limit=200, epsabs=1e-13)[0]
    expected = 1 - sum(w**2 for w in lam) / z_total
    assert pooling_diagnostics(model, x)["own_cross_mass"] == pytest.approx(expected, abs=1e-9)
    model = MultimodalVAE(encoders, decoders, "mopoe")
    model.encode = lambda x: (torch.zeros(3, 2, 1), torch.zeros(3, 2, 1))
    assert pooling_diagnostics(model, x)["own_cross_mass"] is None
    assert np.isfinite(pooling_diagnostics(model, x)["pairwise_mass"])
    # experts 20 standard deviations apart: Bhattacharyya coefficients s = e^-50 (neighbours) and s^4, so the
    # pairwise mass 2 (2 s + s^4) / (3 + 2 (2 s + s^4)) of equal weights is tiny but positive, not 0 or -0
    model.encode = lambda x: (torch.tensor([0.0, 20.0, 40.0]).reshape(3, 1, 1).expand(3, 2, 1), torch.zeros(3, 2, 1))
    s = math.exp(-50)
    mass = pooling_diagnostics(model, x)["pairwise_mass"]
    assert mass == pytest.approx(2 * (2 * s + s**4) / (3 + 2 * (2 * s + s**4)), rel=1e-9, abs=0)


@pytest.mark.parametrize("variant, runs", [("polymnist-cpu-study-quick", 15), ("polymnist-cpu-study-alpha", 27),
                                           ("polymnist-cpu-study-claims", 7), ("polymnist-cpu-study-beta1", 15),
                                           ("polymnist-cpu-study-wb", 12), ("polymnist-cpu-study-mmvae-beta1", 4),
                                           ("polymnist-cpu-study-mmvae-k4", 1),
                                           ("polymnist-cpu-study-mmvae-k4-unbiased", 1), ("polymnist-cpu-study-private", 8),
                                           ("polymnist-cpu-study-ablation", 1), ("polymnist-cpu-study-rerun", 3),
                                           ("polymnist-cpu-study-supplement", 10)])
def test_a_study_variants_runs_are_the_full_studys(variant, runs):
    full, part = load_sweep("polymnist-cpu-study"), load_sweep(variant)
    assert part.name == full.name and len(grid(part)) == runs
    assert set(grid(part)) <= set(grid(full))
    for run in grid(part):
        assert run_config(part, *run) == run_config(full, *run)


def test_extra_overrides_change_every_run_without_restating_the_presets():
    sweep = load_sweep("polymnist-gpu", ["name=smoke", "seeds=[0]", "betas=[2.5]",
                                         'extra_overrides=["train.epochs=2","eval.fid_sizes=[1]"]'])
    config = run_config(sweep, "mmvaeplus", 2.5, 0)
    assert (config.train.epochs, config.eval.fid_sizes, config.train.device) == (2, [1], "cuda")
    assert (config.data.build_offline, config.model.private_dim) == (False, 32)  # the preset's own stay
    with pytest.raises(ValueError, match="train.epochs"):
        load_sweep("polymnist-gpu", ['extra_overrides=["train.epochs=0"]'])


def test_a_run_the_wall_clock_stopped_is_resumed_and_the_study_has_no_wall_clock(tmp_path, monkeypatch):
    """The CPU preset's 60-minute guard stopped the study's first runs part-way (650 and 1 078 of 1 870 steps on a
    slow machine) and marked them finished: the study presets now train every run to its steps, and a train-only
    sweep resumes a checkpoint the guard stopped (a max_steps stop or the last epoch is trained)."""
    from applications.multimodal_vae import sweep as sweeps

    for name in ("polymnist-cpu-study", "polymnist-cpu-study-quick", "polymnist-cpu-study-alpha",
                 "polymnist-cpu-study-claims", "polymnist-cpu-study-beta1", "polymnist-cpu-study-wb",
                 "polymnist-cpu-study-mmvae-beta1", "polymnist-cpu-study-mmvae-k4",
                 "polymnist-cpu-study-mmvae-k4-unbiased", "polymnist-cpu-study-private",
                 "polymnist-cpu-study-ablation", "polymnist-cpu-study-rerun", "polymnist-cpu-study-supplement"):
        study = load_sweep(name)
        assert {run_config(study, *run).train.max_minutes for run in grid(study)} == {None}
    loads = []

    def settings(epochs=4, max_steps=None):
        return SimpleNamespace(train=SimpleNamespace(epochs=epochs, max_steps=max_steps))

    # (checkpoint, the run's settings now, trained): a run finished at fewer epochs or steps than now asked resumes
    cases = (({"finished": True, "stopped_by": "train.max_minutes=60.0", "epoch": 1, "step": 9}, settings(), False),
             ({"finished": True, "stopped_by": "train.max_steps=2", "epoch": 0, "step": 2}, settings(max_steps=2), True),
             ({"finished": True, "stopped_by": "train.max_steps=2", "epoch": 0, "step": 2}, settings(max_steps=5), False),
             ({"finished": True, "stopped_by": None, "epoch": 4, "step": 40}, settings(), True),
             ({"finished": True, "stopped_by": None, "epoch": 4, "step": 40}, settings(epochs=8), False),
             ({"finished": True, "stopped_by": None, "epoch": 4, "step": 40}, settings(epochs=2), True),
             ({"finished": False, "epoch": 4, "step": 40}, settings(), False))
    for n, (state, config, trained) in enumerate(cases):
        (tmp_path / "checkpoint.pt").write_text("stub" * (n + 1))  # a new checkpoint: its answer is not memoised
        monkeypatch.setattr(sweeps, "load_checkpoint", lambda path, state=state: loads.append(path) or state)
        assert sweeps._trained(tmp_path, config) is trained and sweeps._trained(tmp_path, config) is trained, state
    assert len(loads) == len(cases)  # each checkpoint loaded once, however often it is asked about


def test_a_sigint_to_the_sweep_alone_reaches_its_workers(tmp_path, monkeypatch, capsys):
    """`kill -INT` of the parent (not Ctrl-C, which reaches the whole process group) was swallowed: the workers
    trained the grid to its end and the sweep exited 0. They now get a SIGTERM, and the sweep their status."""
    import signal

    import applications.multimodal_vae.sweep as sweep_module

    sweep = SweepConfig(name="interrupted", output_dir=str(tmp_path), models=["helvae"], betas=[1.0], seeds=[0])
    sent = []

    class Worker:
        def __init__(self, command, **kwargs):
            self.status = None

        def poll(self):
            return self.status

        def send_signal(self, signum):
            sent.append(signum)
            self.status = 128 + signum

        def wait(self):
            return self.status if self.status is not None else 0

    def sleep(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_module, "load_dataset", lambda config: None)
    monkeypatch.setattr(sweep_module.time, "sleep", sleep)
    monkeypatch.setattr(subprocess, "Popen", Worker)
    assert sweep_module.run_workers(sweep, 2, []) == 128 + signal.SIGTERM
    assert sent == [signal.SIGTERM, signal.SIGTERM]


def test_the_progress_monitor_survives_a_damaged_checkpoint(tmp_path):
    """run_workers asks every few seconds whether each run is trained; an unreadable checkpoint raised out of its
    loop, which then waited for every worker before reporting."""
    from applications.multimodal_vae.files import UnreadableFile
    from applications.multimodal_vae.sweep import _done_or_unreadable, _finished, _trained

    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    config = SimpleNamespace(train=SimpleNamespace(epochs=1, max_steps=None))
    with pytest.raises(UnreadableFile):
        _trained(tmp_path, config)
    assert _done_or_unreadable(_trained, tmp_path, config) is False
    assert _done_or_unreadable(_finished, tmp_path, config) is False
