"""Hölder VAE (stratified), Hölder+ and Hölder++ from the command line on the tiny fixture: their CPU presets train,
resume exactly and are evaluated."""

import json
import math

import pytest
from tiny_runs import losses

from applications.multimodal_vae.__main__ import main
from applications.multimodal_vae.train import load_run

pytestmark = pytest.mark.usefixtures("float32_default")


@pytest.mark.slow
@pytest.mark.parametrize("preset, model", [("polymnist-holder-cpu", "holder_stratified"),
                                           ("polymnist-holderplus-cpu", "holderplus"),
                                           ("polymnist-holderplusplus-cpu", "holderplusplus")])
def test_hoelder_models_train_resume_exactly_and_are_evaluated(tiny_root, preset, model):
    private = [] if model == "holder_stratified" else ["model.private_dim=2"]

    def command(name, steps, *extra):
        return ["train", "--preset", preset, "--set", f"data.root={tiny_root / 'data'}", "data.build_offline=false",
                "data.num_modalities=3", "data.drop_rate=0.3", "model.latent_dim=4", "model.hidden=32", *private,
                "train.batch_size=8",
                f"train.max_steps={steps}", "train.device=cpu", "train.num_threads=1", "train.evaluate_at_end=false",
                "train.max_minutes=null", "train.tensorboard=false", f"output_dir={tiny_root / 'runs'}", f"name={name}",
                *extra]

    assert main(command("full", 3)) == 0
    assert main(command("split", 2)) == 0
    assert main([*command("split", 3), "--resume"]) == 0
    full, split = tiny_root / "runs" / "full", tiny_root / "runs" / "split"
    assert losses(split) == losses(full) and [s for s, _ in losses(full)] == [1, 2, 3]
    assert all(math.isfinite(float(v)) for _, v in losses(full))
    config, loaded = load_run(full)
    assert config.model.name == model and loaded.spec.top_down == (model == "holderplusplus")
    assert main(["evaluate", "--run", str(full), "--set", "eval.subsets=single", "eval.probe_examples=10",
                 "eval.likelihood_samples=2", "eval.likelihood_examples=10", "eval.unconditional_samples=20",
                 "eval.test_examples=10"]) == 0
    metrics = json.loads((full / "metrics.json").read_text())
    assert len(metrics["coherence"]["per_subset"]) == 3 and (full / "report.md").exists()
