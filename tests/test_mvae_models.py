"""Models of the multimodal VAE application: an opinionpool aggregator plus an objective, on tiny inputs."""

import pytest
import torch

import opinionpool.functional as F
from applications.multimodal_vae import objectives
from applications.multimodal_vae.models import MODELS, MultimodalVAE
from applications.multimodal_vae.networks import PolyMNISTDecoder, PolyMNISTEncoder, make_networks


@pytest.fixture(autouse=True)
def _float32():
    torch.set_default_dtype(torch.float32)  # the application trains in float32


def make(model="helvae", modalities=3, latent=8, **kwargs):
    torch.manual_seed(0)
    encoders, decoders = make_networks("polymnist", modalities, latent)
    return MultimodalVAE(encoders, decoders, model, beta=2.5, **kwargs)


def batch(n=6, modalities=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, modalities, 3, 28, 28, generator=g)


def test_networks_shapes():
    mu, logvar = PolyMNISTEncoder(16)(torch.rand(5, 3, 28, 28))
    assert mu.shape == logvar.shape == (5, 16)
    assert PolyMNISTDecoder(16)(torch.randn(2, 5, 16)).shape == (2, 5, 3, 28, 28)
    with pytest.raises(ValueError, match="no networks for dataset 'cub'"):
        make_networks("cub", 2, 8)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_trains_a_step_with_missing_modalities(name):
    model = make(name, alpha=1 / 3 if name == "holder" else 0.5)
    x = batch()
    present = torch.ones(3, 6, dtype=torch.bool)
    present[1, :3] = False
    present[2, 4] = False
    out = model(x, present)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    if name != "mmvae":  # MMVAE's "kl" is a one-sample estimate and may be negative
        assert out["kl"] >= 0
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    # the missing modality's pixels do not enter the loss
    changed = x.clone()
    changed[:3, 1] = torch.rand(3, 3, 28, 28)
    torch.manual_seed(5)
    a = model(x, present)["loss"]
    torch.manual_seed(5)
    b = model(changed, present)["loss"]
    assert torch.equal(a, b)
    mu, logvar = model.posterior(x, present)
    assert mu.shape == logvar.shape == (6, 8) and torch.isfinite(logvar).all()


def test_the_pooling_is_opinionpools():
    model = make("helvae")
    x = batch()
    mu, logvar = model.encode(x)
    joint = model.posterior(x)
    expected = F.hellinger(mu, logvar, dim=0)
    assert torch.equal(joint[0], expected[0]) and torch.equal(joint[1], expected[1])


def test_helvae_with_one_modality_is_that_modalitys_vae():
    model = make("helvae")
    x = batch()
    present = torch.zeros(3, 6, dtype=torch.bool)
    present[2] = True
    torch.manual_seed(3)
    loss = model(x, present)["loss"]
    mu, logvar = model.encoders[2](x[:, 2])
    torch.manual_seed(3)
    z = objectives.reparameterise(mu, logvar)
    rec = objectives.laplace_log_likelihood(x[:, 2], model.decoders[2](z))
    expected = -(rec - 2.5 * objectives.kl_to_standard_normal(mu, logvar)).mean()
    assert torch.allclose(loss, expected, rtol=1e-6)


def test_a_few_steps_reduce_the_loss():
    model = make("helvae", latent=4)
    x = batch(n=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def evaluate():
        torch.manual_seed(0)
        with torch.no_grad():
            return float(model(x)["loss"])

    before = evaluate()
    for _ in range(15):
        loss = model(x)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert evaluate() < 0.9 * before


def test_learnable_weights_receive_gradients():
    model = make("mohelvae", learnable_weights=True)
    model(batch())["loss"].backward()
    assert model.pool_logits.grad is not None and model.pool_logits.grad.abs().sum() > 0


def test_bad_configurations_are_rejected():
    encoders, decoders = make_networks("polymnist", 2, 4)
    with pytest.raises(ValueError, match="model must be one of"):
        MultimodalVAE(encoders, decoders, "jmvae")
    with pytest.raises(ValueError, match=r"alpha = 0 or 1/n .* got alpha=0.3"):
        MultimodalVAE(encoders, decoders, "holder", alpha=0.3)
    with pytest.raises(ValueError, match="learnable_weights needs one of"):
        MultimodalVAE(encoders, decoders, "mvae", learnable_weights=True)
    with pytest.raises(ValueError, match="2 encoders but 1 decoders"):
        MultimodalVAE(encoders, decoders[:1])
    with pytest.raises(ValueError, match="x has 3 modalities but the model has 2"):
        MultimodalVAE(encoders, decoders)(batch(modalities=3))
