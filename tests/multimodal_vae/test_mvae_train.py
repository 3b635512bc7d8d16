"""Training of the multimodal VAE application on a tiny tensor-layout fixture: CLI, exact resume, NaN stop,
and errors before any work starts."""

import csv
import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_runs import losses, tiny_config

from applications.multimodal_vae.__main__ import main
from applications.multimodal_vae.config import available_presets, load_config
from applications.multimodal_vae.data import LayoutError
from applications.multimodal_vae.train import DIVERGED_LOG, TrainingDiverged, load_run, train

pytestmark = pytest.mark.usefixtures("float32_default")


def test_resume_continues_exactly(tiny_root):
    full = train(tiny_config(tiny_root, "full"), show_progress=False)
    first = train(tiny_config(tiny_root, "split", max_steps=4), show_progress=False)  # stops inside epoch 2
    assert [s for s, _ in losses(first)] == [1, 2, 3, 4]
    resumed = train(tiny_config(tiny_root, "split"), resume=True, show_progress=False)
    assert losses(resumed) == losses(full) and len(losses(full)) == 6
    for name in ("checkpoint.pt", "config.yaml", "samples.png"):
        assert (full / name).stat().st_size > 0
    # TensorBoard holds the same losses, once per step across the interruption
    for run in (full, resumed):
        board = EventAccumulator(str(run / "tensorboard"))
        board.Reload()
        scalars = board.Scalars("train/loss")
        assert [e.step for e in scalars] == [s for s, _ in losses(run)]
        assert all(math.isclose(e.value, float(v), rel_tol=1e-6) for e, (_, v) in zip(scalars, losses(run)))
        assert "samples" in board.Tags()["images"]
    with pytest.raises(FileExistsError, match="already holds a run; pass --resume"):
        train(tiny_config(tiny_root, "full"), show_progress=False)
    with pytest.raises(ValueError, match="the configuration differs"):
        train(load_config("polymnist-helvae", [f"data.root={tiny_root / 'data'}", "data.build_offline=false",
                                               "data.num_modalities=3", "model.latent_dim=4",
                                               "model.architecture=conv", "model.hidden=32", "train.batch_size=8",
                                               f"output_dir={tiny_root / 'runs'}", "name=full", "model.beta=1.0"]),
              resume=True, show_progress=False)


def test_a_run_resumed_at_its_max_steps_takes_no_further_step(tiny_root):
    """A sweep's SIGTERM during the last step saves step == max_steps unfinished; resuming took step max_steps + 1
    (and a smaller max_steps two more), so the run no longer matched an uninterrupted one."""
    from applications.multimodal_vae.files import load_checked, save_checked

    first = train(tiny_config(tiny_root, "capped", max_steps=4), show_progress=False)
    state = load_checked(first / "checkpoint.pt", map_location="cpu")
    state["finished"] = False  # as a signal after the last step leaves it
    save_checked(first / "checkpoint.pt", state)
    for max_steps in (4, 2):
        resumed = train(tiny_config(tiny_root, "capped", max_steps=max_steps), resume=True, show_progress=False)
        assert [s for s, _ in losses(resumed)] == [1, 2, 3, 4]
        again = load_checked(resumed / "checkpoint.pt", map_location="cpu")
        assert (again["step"], again["finished"]) == (4, True)


def test_a_run_resumed_with_fewer_epochs_than_it_stands_at_is_finished(tiny_root):
    """Lowering train.epochs to where an interrupted run stands (or below) ends it as lowering max_steps does; it
    returned without a step and left the checkpoint unfinished, so a sweep reported it stopped short forever."""
    from applications.multimodal_vae.files import load_checked, save_checked

    first = train(tiny_config(tiny_root, "shortened", epochs=3), show_progress=False)
    state = load_checked(first / "checkpoint.pt", map_location="cpu")
    assert state["epoch"] == 3
    state["epoch"], state["step"], state["finished"] = 2, 4, False  # as a signal at the end of epoch 2 leaves it
    save_checked(first / "checkpoint.pt", state)
    resumed = train(tiny_config(tiny_root, "shortened", epochs=1), resume=True, show_progress=False)
    again = load_checked(resumed / "checkpoint.pt", map_location="cpu")
    assert (again["epoch"], again["step"], again["finished"]) == (2, 4, True)


def test_resuming_may_change_what_is_logged_and_the_thread_count_which_is_restored_after(tiny_root):
    """A sweep switched to one thread per worker resumes its runs (the thread count was compared with the
    checkpoint's), and train leaves the process's thread count as it found it (it carried over to a sweep's next
    run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # whatever the machine: the run's one thread must differ from it
    try:
        train(tiny_config(tiny_root, "threads", max_steps=2), show_progress=False)
        changed = tiny_config(tiny_root, "threads", num_threads=1, tensorboard=False, checkpoint_every=2,
                              diagnostics_every=1)
        resumed = train(changed, resume=True, show_progress=False)
        assert [s for s, _ in losses(resumed)] == list(range(1, 7)) and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_a_training_subset_larger_than_the_data_is_an_error(tiny_root):
    config = tiny_config(tiny_root, "subset")
    config.data.train_subset = 10**6
    with pytest.raises(ValueError, match=r"data.train_subset=1000000 is more than the \d+ training tuples of polymnist"):
        train(config, show_progress=False)
    assert not (tiny_root / "runs" / "subset").exists()
    # a latent probe larger than the training split was found only by the evaluation after training
    config = tiny_config(tiny_root, "probe")
    config.train.evaluate_at_end, config.eval.probe_examples = True, 500
    with pytest.raises(ValueError, match=r"eval.probe_examples=500 is more than the 24 training tuples of polymnist"):
        train(config, show_progress=False)
    assert not (tiny_root / "runs" / "probe").exists()


def test_subnormals_are_flushed_while_training_on_the_cpu_and_restored_after(tiny_root, monkeypatch):
    """Values below the smallest normal float32 in the backward pass made CPU steps several times slower: training
    flushes subnormals to zero, and gives the process back its gradual underflow (the library's float64 numerics use
    it)."""
    from applications.multimodal_vae import models

    seen = []
    original = models.MultimodalVAE.forward

    def watched(self, x, present=None, kl_weight=1.0):
        seen.append(float(torch.tensor([1e-310], dtype=torch.float64) * 1.0))
        return original(self, x, present, kl_weight)

    monkeypatch.setattr(models.MultimodalVAE, "forward", watched)
    assert float(torch.tensor([1e-310], dtype=torch.float64) * 1.0) > 0
    train(tiny_config(tiny_root, "subnormals", max_steps=2), show_progress=False)
    assert seen and all(value == 0.0 for value in seen)
    assert float(torch.tensor([1e-310], dtype=torch.float64) * 1.0) > 0
    # the evaluation at the end keeps gradual underflow, as `evaluate --run` on the checkpoint has it (it ran
    # flushed, inside the training's mode)
    from applications.multimodal_vae import train as training

    evaluated = []
    monkeypatch.setattr(training, "evaluate_run", lambda *args, **kwargs: evaluated.append(
        float(torch.tensor([1e-310], dtype=torch.float64) * 1.0)) or {})
    monkeypatch.setattr(training, "summary_line", lambda result, run_dir: "")
    config = tiny_config(tiny_root, "subnormals_evaluated", max_steps=2, evaluate_at_end="true")
    config.eval.probe_examples = -1
    train(config, show_progress=False)
    assert evaluated and evaluated[0] > 0


def test_kl_warmup_weights_the_kl_by_step_and_resumes_on_schedule(tiny_root):
    """With ``train.kl_warmup_epochs=1.5`` over 3 batches per epoch, step s logs the loss ``-(reconstruction -
    beta * min(1, s / 4.5) * kl)`` (the logged terms are batch means, and the loss is linear in them); a run
    stopped inside the warm-up resumes it on the same schedule."""
    def warm(name, **train_settings):
        config = tiny_config(tiny_root, name, kl_warmup_epochs=1.5, **train_settings)
        config.model.beta = 200.0  # a KL term far above the float32 rounding of the loss at initialisation
        return config

    full, beta = train(warm("warm"), show_progress=False), 200.0
    with open(full / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]  # 2 epochs of 3 batches
    for row in rows:
        weight = min(1.0, int(row["step"]) / 4.5)
        expected = -(float(row["reconstruction"]) - beta * weight * float(row["kl"]))
        assert float(row["loss"]) == pytest.approx(expected, rel=1e-6)
        if weight < 1:  # the check can tell: without the warm-up the loss would lie beyond 10 tolerances
            unweighted = -(float(row["reconstruction"]) - beta * float(row["kl"]))
            assert abs(unweighted - float(row["loss"])) > 1e-5 * abs(expected)
    train(warm("split", max_steps=2), show_progress=False)
    resumed = train(warm("split"), resume=True, show_progress=False)
    assert losses(resumed) == losses(full)
    changed = warm("split")  # the ramp is part of the objective: a resumed run keeps it
    changed.train.kl_warmup_epochs = 3.0
    with pytest.raises(ValueError, match=r"configuration differs .*train.kl_warmup_epochs: saved 1.5, now 3.0"):
        train(changed, resume=True, show_progress=False)
    with pytest.raises(ValueError, match=r"train.kl_warmup_epochs must be at least 0 and finite, got -1.0"):
        tiny_config(tiny_root, "bad", kl_warmup_epochs=-1.0)


def test_nan_loss_stops_without_writing_weights(tiny_root, monkeypatch):
    from applications.multimodal_vae import models

    calls = {"n": 0}
    original = models.MultimodalVAE.forward

    def poisoned(self, x, present=None, kl_weight=1.0):
        out = original(self, x, present, kl_weight)
        calls["n"] += 1
        if calls["n"] == 5:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(models.MultimodalVAE, "forward", poisoned)
    config = tiny_config(tiny_root, "nan")
    with pytest.raises(TrainingDiverged, match=r"non-finite loss nan at step 5 \(epoch 2, batch 2\); no weights were "
                                               r"written; last good checkpoint: .*checkpoint.pt \(step 3\)"):
        train(config, show_progress=False)
    run = tiny_root / "runs" / "nan"
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 3
    # metrics.csv stays the checkpoint's (a resumed run continues it); the steps into the divergence are kept apart
    assert [s for s, _ in losses(run)] == [1, 2, 3]
    with open(run / DIVERGED_LOG) as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == [1, 2, 3, 4]


def test_errors_before_any_work(tiny_root, capsys):
    with pytest.raises(ValueError, match="unknown preset 'polymnist-nope'; available: .*polymnist-helvae"):
        load_config("polymnist-nope")
    with pytest.raises(ValueError, match="invalid configuration: Key 'nme' not in 'ModelConfig'"):
        load_config("polymnist-helvae", ["model.nme=3"])
    with pytest.raises(ValueError, match="invalid configuration: Value 'abc' .*could not be converted to Integer"):
        load_config("polymnist-helvae", ["train.epochs=abc"])
    with pytest.raises(ValueError, match="model must be one of"):
        load_config("polymnist-helvae", ["model.name=jmvae"])
    with pytest.raises(ValueError, match="invalid model options: likelihood must be one of .* got 'gauss'"):
        load_config("polymnist-helvae", ["model.likelihood=gauss"])
    with pytest.raises(ValueError, match="invalid model options: posterior_scale must be one of .* got 'soft'"):
        load_config("polymnist-mmvaeplus", ["model.posterior_scale=soft"])
    assert load_config("polymnist-mmvaeplus", ["model.posterior_scale=softmax"]).model.posterior_scale == "softmax"
    with pytest.raises(ValueError, match=r"model.private_kl_weights needs one weight per modality "
                                         r"\(data.num_modalities = 2\), got \[1.0, 2.0, 3.0\]"):
        load_config("celeba-mohelvae", ["model.private_kl_weights=[1,2,3]"])
    with pytest.raises(ValueError, match=r"data.num_modalities must be 2 for data.dataset 'cub', got 3"):
        load_config("cub-helvae", ["data.num_modalities=3"])  # refused before the data is read
    assert load_config("polymnist-helvae", ["data.num_modalities=3"]).data.num_modalities == 3  # PolyMNIST: any
    with pytest.raises(ValueError, match=r"private_kl_weights must be finite non-negative numbers, got \[1.0, -2.0\]"):
        load_config("celeba-mohelvae", ["model.private_kl_weights=[1,-2]"])
    with pytest.raises(ValueError, match=r"private_kl_weights go with modality-specific latents .* "
                                         r"model='helvae', private_dim=0"):
        load_config("polymnist-helvae", ["model.private_kl_weights=[1,1,1,1,1]"])
    assert load_config("celeba-mohelvae", ["model.private_kl_weights=[1,2]"]).model.private_kl_weights == [1.0, 2.0]
    with pytest.raises(ValueError, match=r"model.likelihood_scale must be .*, got 0.0"):
        load_config("polymnist-helvae", ["model.likelihood_scale=0"])
    with pytest.raises(ValueError, match=r"model.activation must be one of \('leaky_relu',\) for resnet networks, "
                                         r"got 'relu'"):
        load_config("polymnist-helvae", ["model.activation=relu"])  # the paper preset's ResNets
    config = tiny_config(tiny_root, "layout")
    config.data.root = str(tiny_root / "missing")
    with pytest.raises(LayoutError, match="expected a folder .*missing/train"):
        train(config, show_progress=False)
    config = tiny_config(tiny_root, "count")
    config.data.num_modalities = 5
    with pytest.raises(LayoutError, match=r"train holds 3 modalities but num_modalities is 5"):
        train(config, show_progress=False)
    config = tiny_config(tiny_root, "weights")  # it trained the whole run, then failed naming "weights"
    config.train.evaluate_at_end, config.eval.fid_samples = True, 2
    config.eval.fid_weights = str(tiny_root / "missing-inception.pt")
    with pytest.raises(FileNotFoundError, match="eval.fid_weights: no Inception weights file .* at .*missing-incep"):
        train(config, show_progress=False)
    assert not (tiny_root / "runs").exists()  # nothing was written
    with pytest.raises(SystemExit):
        main(["train", "--preset", "polymnist-helvae", "--set", "train.lr=-1"])
    assert "train.lr must be positive" in capsys.readouterr().err


def test_command_line_trains_and_lists_presets(tiny_root, capsys):
    assert main(["presets"]) == 0
    assert "polymnist-mohelvae" in capsys.readouterr().out
    args = ["train", "--preset", "polymnist-mopoe", "--set", f"data.root={tiny_root / 'data'}",
            "data.build_offline=false", "data.num_modalities=3", "model.latent_dim=4",
            "model.architecture=conv", "model.hidden=32", "train.batch_size=12",
            "train.epochs=1", f"output_dir={tiny_root / 'runs'}", "--set", "train.tensorboard=false"]
    assert main(args) == 0
    run = tiny_root / "runs" / "polymnist-mopoe"
    assert "name: mopoe" in (run / "config.yaml").read_text() and len(losses(run)) == 2
    assert not (run / "tensorboard").exists()


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(p for p in available_presets() if p.startswith("polymnist-")))
def test_every_polymnist_preset_trains_from_the_command_line(tiny_root, preset):
    """Every model's paper preset (ResNets included) takes two steps on the tiny fixture and can be reloaded."""
    args = ["train", "--preset", preset, "--set", f"data.root={tiny_root / 'data'}", "data.build_offline=false",
            "data.num_modalities=3", "model.latent_dim=8", "train.batch_size=4", "train.max_steps=2", "train.device=cpu",
            "train.evaluate_at_end=false", "train.max_minutes=null", "train.tensorboard=false",
            f"output_dir={tiny_root / 'runs'}", "name=run"]
    assert main(args) == 0
    run = tiny_root / "runs" / "run"
    assert [step for step, _ in losses(run)] == [1, 2] and all(math.isfinite(float(v)) for _, v in losses(run))
    config, model = load_run(run)
    assert config.model.name == load_config(preset).model.name and model.num_modalities == 3


def test_mmvae_dreg_in_bf16_from_the_command_line(tiny_root):
    args = ["train", "--preset", "polymnist-mmvae", "--set", f"data.root={tiny_root / 'data'}",
            "data.build_offline=false", "data.num_modalities=3", "model.latent_dim=4",
            "model.architecture=conv", "model.hidden=32", "train.batch_size=12",
            "train.epochs=1", f"output_dir={tiny_root / 'runs'}", "model.num_samples=3", "model.estimator=dreg",
            "train.precision=bf16", "train.device=cpu"]
    assert main(args) == 0
    rows = losses(tiny_root / "runs" / "polymnist-mmvae")
    assert len(rows) == 2 and all(math.isfinite(float(v)) for _, v in rows)
    with pytest.raises(SystemExit):
        main(args[:-2] + ["model.estimator=vimco"])


def test_evaluation_writes_a_report(tiny_root, capsys):
    config = tiny_config(tiny_root, "evaluated", evaluate_at_end="true")
    config.eval.probe_examples, config.eval.likelihood_samples, config.eval.unconditional_samples = 10, 3, 20
    run = train(config, show_progress=False)
    report = (run / "report.md").read_text()
    for section in ("Conditional coherence", "| m2 |", "chance 0.1", "Unconditional coherence", "Log-likelihood",
                    "Latent probe", "Pooling diagnostics", "| {m0,m1,m2} |"):
        assert section in report, section
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["coherence"]["per_subset"]) == 6 and metrics["test_examples"] == 10
    assert list((tiny_root / "data").glob(".digit-classifiers-v3-3m.pt"))  # cached for the next evaluation
    with open(run / "pooling.csv") as handle:  # diagnostics at every checkpoint
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1", "2"]
    (run / "report.md").unlink()
    assert main(["evaluate", "--run", str(run), "--set", "eval.subsets=single", "eval.probe_examples=10",
                 "eval.likelihood_samples=2"]) == 0
    assert "conditional coherence: one input" in capsys.readouterr().out and (run / "report.md").exists()
    assert len(json.loads((run / "metrics.json").read_text())["coherence"]["per_subset"]) == 3
    with pytest.raises(SystemExit):
        main(["evaluate", "--run", str(run), "--set", "train.lr=1"])
    assert "evaluate --set takes eval.* keys only" in capsys.readouterr().err


def test_pooling_rows_name_the_epoch_of_their_step_as_the_loss_rows_do(tiny_root):
    """pooling.csv's rows logged between checkpoints counted the epochs finished (0 in the first), those at a
    checkpoint the epoch just ended: the last step of epoch 1 read 0 or 1 depending on diagnostics_every."""
    run = train(tiny_config(tiny_root, "epochs", diagnostics_every=1, tensorboard="false", evaluate_at_end="false"),
                show_progress=False)
    with open(run / "metrics.csv") as handle:
        losses_by_step = {int(r["step"]): r["epoch"] for r in csv.DictReader(handle)}
    with open(run / "pooling.csv") as handle:
        pooling_by_step = {int(r["step"]): r["epoch"] for r in csv.DictReader(handle)}
    assert pooling_by_step == losses_by_step and sorted(set(losses_by_step.values())) == ["1", "2"]


@pytest.mark.slow
def test_compiled_networks_train_like_eager_ones(tiny_root):
    eager = train(tiny_config(tiny_root, "eager", max_steps=2, tensorboard="false"), show_progress=False)
    compiled = train(tiny_config(tiny_root, "compiled", max_steps=2, tensorboard="false", compile="true"),
                     show_progress=False)
    assert [s for s, _ in losses(compiled)] == [1, 2]
    for (_, a), (_, b) in zip(losses(eager), losses(compiled)):
        assert math.isclose(float(a), float(b), rel_tol=1e-4)
    eager_state = torch.load(eager / "checkpoint.pt", weights_only=True)["model"]
    compiled_state = torch.load(compiled / "checkpoint.pt", weights_only=True)["model"]
    assert eager_state.keys() == compiled_state.keys()  # compiled in place: checkpoints stay interchangeable
