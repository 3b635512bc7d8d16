"""The application on a CUDA device: every paper preset trains there in float32 and bf16, a GPU checkpoint loads on
the CPU, every model's posteriors equal the CPU's, and a run resumes and is evaluated there. Skipped without CUDA."""

import json
import math

import pytest
import torch
from tiny_runs import losses, tiny_config

from applications.multimodal_vae.__main__ import main
from applications.multimodal_vae.config import available_presets, load_config
from applications.multimodal_vae.data import polymnist_modalities
from applications.multimodal_vae.models import MODELS, MultimodalVAE
from applications.multimodal_vae.networks import make_networks
from applications.multimodal_vae.train import load_run, train

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("float32_default")]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("preset", sorted(p for p in available_presets() if p.startswith("polymnist-")))
def test_every_polymnist_preset_trains_on_cuda(tiny_root, preset, precision):
    """Two steps of each paper preset (ResNets included) on the GPU; the checkpoint, written from GPU tensors,
    loads on the CPU with finite weights."""
    args = ["train", "--preset", preset, "--set", f"data.root={tiny_root / 'data'}", "data.build_offline=false",
            "data.num_modalities=3", "model.latent_dim=8", "train.batch_size=4", "train.max_steps=2",
            "train.device=cuda", f"train.precision={precision}", "train.evaluate_at_end=false",
            "train.max_minutes=null", "train.tensorboard=false", f"output_dir={tiny_root / 'runs'}", "name=run"]
    assert main(args) == 0
    run = tiny_root / "runs" / "run"
    assert [step for step, _ in losses(run)] == [1, 2] and all(math.isfinite(float(v)) for _, v in losses(run))
    config, model = load_run(run)
    assert config.model.name == load_config(preset).model.name and model.device.type == "cpu"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _model(name):
    """A small conv model ``name`` of 3 PolyMNIST modalities, with unequal learnable pooling weights where it pools
    with weights, and 4 modality-specific latents where it needs them."""
    spec = MODELS[name]
    private = 4 if spec.private else 0
    torch.manual_seed(0)
    encoders, decoders = make_networks(polymnist_modalities(3), 8 + private, "conv", hidden=32, private_dim=private)
    model = MultimodalVAE(encoders, decoders, name, learnable_weights=spec.weighted, private_dim=private, latent_dim=8)
    if spec.weighted:
        with torch.no_grad():
            model.pool_logits.copy_(torch.tensor([0.3, -0.2, 0.5]))
    return model.eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_posteriors_on_cuda_equal_the_cpu(name, monkeypatch):
    """The same weights give the same conditional posteriors on both devices, with modalities missing per sample
    (the pooling on the GPU: masks, weights, subset mixtures); TF32 convolutions off, so that the encoders agree to
    float32's digits."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cpu, gpu = _model(name), _model(name).cuda()
    x = torch.rand(6, 3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    present = torch.tensor([[1, 1, 0, 1, 0, 1], [1, 0, 1, 1, 0, 0], [1, 1, 1, 0, 1, 0]], dtype=torch.bool)
    for given in (None, present):
        expected = cpu.posterior(x, given)
        got = gpu.posterior(x.cuda(), None if given is None else given.cuda())
        assert all(t.device.type == "cuda" for t in got)
        for a, b in zip(expected, got):
            torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)


def test_a_run_resumes_on_cuda_and_is_evaluated(tiny_root):
    first = train(tiny_config(tiny_root, "split", device="cuda", max_steps=4), show_progress=False)
    assert [s for s, _ in losses(first)] == [1, 2, 3, 4]
    config = tiny_config(tiny_root, "split", device="cuda", evaluate_at_end="true")
    config.eval.probe_examples, config.eval.likelihood_samples, config.eval.unconditional_samples = 10, 3, 20
    run = train(config, resume=True, show_progress=False)
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5, 6]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["training"]["steps"] == 6 and len(metrics["coherence"]["per_subset"]) == 6
    assert all(0 <= value <= 1 for value in metrics["coherence"]["per_subset"].values())
    assert math.isfinite(metrics["log_likelihood"]["joint"])


def test_the_likelihood_check_runs_on_a_cuda_run(tiny_root):
    """It seeded a CPU generator for a model on CUDA, which the GPU's samplers refuse."""
    from applications.multimodal_vae.study import likelihood_convergence

    folder = tiny_root / "runs"
    train(tiny_config(tiny_root, "helvae-beta1.0-seed0", device="cuda", max_steps=2), show_progress=False)
    (folder / "results.csv").write_text("model,beta,seed\nhelvae,1.0,0\n")
    result, = likelihood_convergence(folder, samples=(2, 8), examples=3)
    assert result["run"] == "helvae-beta1.0-seed0" and all(math.isfinite(v) for v in result["estimates"].values())


def test_finiteness_checks_tensors_on_several_devices():
    """Adam keeps its step counts on the CPU beside CUDA moments; the check before a step and before a checkpoint
    reads both (it failed on the first CUDA step with "Expected all tensors to be on the same device")."""
    from applications.multimodal_vae.train import _all_finite

    finite = [torch.ones(3, device="cuda"), torch.tensor(2.0), torch.arange(3)]
    assert _all_finite(finite).item() and _all_finite(finite).device.type == "cuda"
    for bad in (torch.tensor(float("nan")), torch.tensor([1.0, float("inf")], device="cuda")):
        assert not _all_finite([*finite, bad]).item()
    assert _all_finite([]).item()
