"""Models of the multimodal VAE application: an opinionpool aggregator plus an objective, on tiny inputs."""

import functools
import math

import pytest
import torch

import opinionpool.functional as opf
from applications.multimodal_vae import objectives
from applications.multimodal_vae.data import Modality, polymnist_modalities
from applications.multimodal_vae.models import MODELS, MultimodalVAE
from applications.multimodal_vae.networks import (
    ACTIVATIONS,
    PolyMNISTDecoder,
    PolyMNISTEncoder,
    ResidualBlock,
    make_networks,
)

pytestmark = pytest.mark.usefixtures("float32_default")


def make(model="helvae", modalities=3, latent=8, beta=2.5, **kwargs):
    torch.manual_seed(0)
    if MODELS[model].private:
        kwargs.setdefault("private_dim", 3)
    if MODELS[model].top_down:
        kwargs.setdefault("latent_dim", latent)
    encoders, decoders = make_networks(polymnist_modalities(modalities), latent + kwargs.get("private_dim", 0))
    return MultimodalVAE(encoders, decoders, model, beta=beta, **kwargs)


def batch(n=6, modalities=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, modalities, 3, 28, 28, generator=g)


def loss_and_gradients(model, x, present):
    """The loss and every parameter gradient of one seeded step."""
    model.zero_grad()
    torch.manual_seed(5)
    loss = model(x, present)["loss"]
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def assert_all_equal_and_finite(results):
    (loss, grads), *others = results
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    for other_loss, other_grads in others:
        torch.testing.assert_close(other_loss, loss)
        assert len(other_grads) == len(grads)
        for got, expected in zip(other_grads, grads):
            torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name, private", [(name, False) for name in MODELS]
                         + [(name, True) for name, spec in MODELS.items() if spec.optional_private])
def test_absent_modalities_encoder_outputs_reach_neither_the_loss_nor_its_gradients(name, private):
    """Whatever an absent modality's encoder puts out (an overflow, NaN), every model's loss and every gradient are
    those of a harmless output: the objectives mask absent modalities only after drawing, decoding or scoring."""
    model = make(name, **({"private_dim": 3} if private else {}))
    x = batch()
    present = torch.ones(3, 6, dtype=torch.bool)
    present[0, 1] = present[2, 2] = present[1, 4] = present[2, 4] = False
    encode = model._encode
    results = []
    for absent_mu, absent_logvar in ((0.0, 0.0), (3e38, 200.0), (math.nan, math.nan)):
        def wild(x, absent_mu=absent_mu, absent_logvar=absent_logvar):
            mu, logvar = encode(x)
            return (mu.masked_fill(~present[..., None], absent_mu), logvar.masked_fill(~present[..., None], absent_logvar))

        model._encode = wild
        results.append(loss_and_gradients(model, x, present))
    assert_all_equal_and_finite(results)


@pytest.mark.parametrize("name", ["helvae", "mmvae", "mopoe", "mvae"])
def test_absent_modalities_inputs_reach_no_gradient(name):
    """A NaN or inf placeholder in an absent modality's input gives the loss and gradients of a finite one: the
    encoders ran on it before their outputs were masked, and the weight gradients were NaN beside a finite loss."""
    model = make(name)
    present = torch.ones(3, 6, dtype=torch.bool)
    present[0, 1] = present[2, 3] = False
    results = []
    for placeholder in (0.0, math.nan, math.inf):
        x = batch()
        x[1, 0], x[3, 2] = placeholder, placeholder
        results.append(loss_and_gradients(model, x, present))
    assert_all_equal_and_finite(results)


def test_present_masks_are_checked():
    model, x = make("helvae"), batch()
    present = torch.ones(3, 6, dtype=torch.bool)
    present[:, 4] = False
    with pytest.raises(ValueError, match=r"at least one modality of every sample; samples \[4\] have none"):
        model(x, present)
    with pytest.raises(ValueError, match=r"boolean tensor of shape \(3, 6\).*torch.int64 tensor of shape \(3, 6\)"):
        model(x, torch.ones(3, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"boolean tensor of shape \(3, 6\).*shape \(6, 3\)"):
        model(x, torch.ones(6, 3, dtype=torch.bool))
    for bad in (-0.5, math.nan, math.inf, True):  # (a negative or NaN weight flipped or poisoned beta silently)
        with pytest.raises(ValueError, match=f"kl_weight must be a finite number >= 0, got {bad!r}"):
            model(x, kl_weight=bad)


@pytest.mark.parametrize("option, value", [("beta", math.nan), ("beta", math.inf), ("beta", -1.0), ("beta", 0.0),
                                           ("beta", True), ("likelihood_scale", math.inf),
                                           ("likelihood_scale", True), ("likelihood_scale", math.nan)])
def test_beta_and_likelihood_scale_are_checked(option, value):
    name = "beta" if option == "beta" else "likelihood scale"
    with pytest.raises(ValueError, match=f"{name} must be a positive finite number, got {value!r}"):
        make("helvae", **{option: value})


def test_networks_shapes():
    mu, logvar = PolyMNISTEncoder(16)(torch.rand(5, 3, 28, 28))
    assert mu.shape == logvar.shape == (5, 16)
    assert PolyMNISTDecoder(16)(torch.randn(2, 5, 16)).shape == (2, 5, 3, 28, 28)
    with pytest.raises(ValueError, match=r"no conv networks for modality 'odd' of shape \(3, 30, 30\)"):
        make_networks([Modality("odd", (3, 30, 30))], 8)
    with pytest.raises(ValueError, match=r"no resnet networks for modality 'svhn' of shape \(3, 32, 32\)"):
        make_networks([Modality("svhn", (3, 32, 32))], 8, "resnet")
    with pytest.raises(ValueError, match="architecture must be one of"):
        make_networks(polymnist_modalities(1), 8, "vit")


def test_leaky_relu_conv_networks_keep_the_initialisation_and_pass_negative_inputs():
    modalities = [*polymnist_modalities(1), Modality("text", (16,), tuple("abcdefgh"))]
    torch.manual_seed(0)
    plain = make_networks(modalities, 8)
    torch.manual_seed(0)
    leaky = make_networks(modalities, 8, "conv", "leaky_relu")
    for a, b in zip(plain, leaky):
        for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
            torch.testing.assert_close(p, q, msg=name)
        assert any(isinstance(m, torch.nn.ReLU) for m in a.modules())
        assert not any(isinstance(m, torch.nn.ReLU) for m in b.modules())
    slopes = {m.negative_slope for net in leaky for m in net.modules() if isinstance(m, torch.nn.LeakyReLU)}
    assert slopes == {0.2}
    # the decoders differ exactly where a hidden pre-activation is negative
    z = torch.randn(4, 8)
    decoder, leaky_decoder = plain[1][0], leaky[1][0]
    pre = decoder.project[0](z)
    expected_hidden = torch.where(pre > 0, pre, 0.2 * pre)
    torch.testing.assert_close(leaky_decoder.project[1](leaky_decoder.project[0](z)), expected_hidden)
    assert (pre < 0).any()
    with pytest.raises(ValueError, match=r"activation must be one of \('leaky_relu',\) for resnet networks, "
                                         r"got 'relu'"):
        make_networks(polymnist_modalities(1), 8, "resnet", "relu")
    with pytest.raises(ValueError, match="activation must be one of .* got 'gelu'"):
        make_networks(polymnist_modalities(1), 8, "conv", "gelu")


def test_an_architectures_own_activation_is_the_one_it_names_text_nets_included():
    """activation None is the architecture's own: for the ResNets leaky ReLUs, yet their text nets kept ReLUs
    unless leaky_relu was named (CelebA's and CUB's presets name none)."""
    modalities = [Modality("face", (3, 64, 64)), Modality("text", (16,), tuple("abcdefgh"))]
    for architecture in ("conv", "resnet"):
        torch.manual_seed(0)
        default = make_networks(modalities, 8, architecture)
        torch.manual_seed(0)
        named = make_networks(modalities, 8, architecture, ACTIVATIONS[architecture][0])
        for a, b in zip(default, named):
            assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()], architecture
            for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
                torch.testing.assert_close(p, q, msg=name)
    encoders, decoders = default  # the ResNets'
    assert not any(isinstance(m, torch.nn.ReLU) for net in (encoders, decoders) for m in net.modules())


def test_text_networks_run_in_the_networks_float_type():
    """The one-hot input was made in the default float type: a float64 text encoder refused it."""
    modalities = [*polymnist_modalities(1), Modality("text", (16,), tuple("abcdefgh"))]
    encoders, decoders = make_networks(modalities, 8)
    ids = torch.randint(0, 8, (3, 16))
    for dtype in (torch.float64, torch.float32):
        encoder = encoders[1].to(dtype)
        mu, logvar = encoder(ids)
        assert mu.dtype == logvar.dtype == dtype and decoders[1].to(dtype)(mu).dtype == dtype
        one_hot = next(m for m in encoder.modules() if type(m).__name__ == "_OneHot")(ids)  # (B, V, L)
        assert one_hot.dtype == dtype and torch.equal(one_hot.argmax(1), ids) and one_hot.sum(1).eq(1).all()
    assert not any("identity" in key for key in encoders.state_dict())  # checkpoints unchanged


def test_conv_networks_take_a_hidden_width():
    """``hidden`` sets the width between the conv features and the heads of every conv net (the default, None, is
    each net's own: the parameter count of the MoPoE code's PolyMNIST nets); resnet nets and non-widths are
    refused, naming the value."""
    modalities = [*polymnist_modalities(1), Modality("mnist", (1, 28, 28)), Modality("svhn", (3, 32, 32)),
                  Modality("face", (3, 64, 64)), Modality("text", (16,), tuple("abcdefgh"))]
    torch.manual_seed(0)
    encoders, decoders = make_networks(modalities, 8, "conv", None, 32)
    for modality, encoder, decoder in zip(modalities, encoders, decoders):
        assert encoder.mean.in_features == encoder.logvar.in_features == 32, modality.name
        x = torch.randint(0, 8, (5, 16)) if modality.is_text else torch.rand((5, *modality.shape))
        mu, logvar = encoder(x)
        assert mu.shape == logvar.shape == (5, 8)
        out = decoder(torch.randn(2, 5, 8))
        assert out.shape == ((2, 5, 16, 8) if modality.is_text else (2, 5, *modality.shape)), modality.name
    default = make_networks(polymnist_modalities(1), 8)
    # conv 3-32-64-128 and 2048 -> 512 -> heads; 8 -> 512 -> 2048 and the mirrored transposed convolutions
    conv = (3 * 9 + 1) * 32 + (32 * 9 + 1) * 64 + (64 * 9 + 1) * 128
    deconv = 128 * 64 * 9 + 64 + 64 * 32 * 9 + 32 + 32 * 3 * 9 + 3
    expected = conv + 2049 * 512 + 2 * 513 * 8, 9 * 512 + 513 * 2048 + deconv
    assert tuple(sum(p.numel() for p in nets[0].parameters()) for nets in default) == expected
    for architecture, bad in (("resnet", 32), ("conv", 0), ("conv", 2.5), ("conv", True)):
        with pytest.raises(ValueError, match=f"hidden must be null or a positive integer width of conv networks, "
                                             f"got {bad!r} for {architecture} networks"):
            make_networks(polymnist_modalities(1), 8, architecture, None, bad)


def test_the_mnist_decoder_ends_in_a_sigmoid_as_mopoes_does():
    (_,), (decoder,) = make_networks([Modality("mnist", (1, 28, 28))], 4)
    out = decoder(100 * torch.randn(6, 4))
    assert out.shape == (6, 1, 28, 28) and bool(((out >= 0) & (out <= 1)).all()) and out.std() > 0


def test_resnet_encoders_give_private_latents_a_trunk_of_their_own():
    """The MMVAE+ code's ResNet encoders run two networks, one for the modality-specific latent w and one for the
    shared z (conv_img_w / resnet_w and conv_img_z / resnet_z); the parameter counts are those of its PolyMNIST
    (w 32 + z 32) and CUB image (w 16 + z 48) encoders, counted from its module definitions."""
    (encoder,), _ = make_networks(polymnist_modalities(1), 64, "resnet", private_dim=32)
    assert sum(p.numel() for p in encoder.parameters()) == 2_946_048
    (cub,), _ = make_networks([Modality("image", (3, 64, 64))], 64, "resnet", private_dim=16)
    assert sum(p.numel() for p in cub.parameters()) == 8_552_448
    x = torch.rand(3, 3, 28, 28)
    mu, logvar = encoder(x)
    assert mu.shape == logvar.shape == (3, 64)
    mu[:, :32].sum().backward()  # the shared latent does not depend on the private trunk
    assert all(p.grad is None or not p.grad.any() for p in encoder.private.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.shared.parameters())
    (conv,), _ = make_networks(polymnist_modalities(1), 64, "conv", private_dim=32)
    assert isinstance(conv, PolyMNISTEncoder)  # MoPoE's encoders: one trunk, heads for both
    with pytest.raises(ValueError, match=r"private_dim must lie in \[0, latent_dim = 8\), got 8"):
        make_networks(polymnist_modalities(1), 8, "resnet", private_dim=8)
    # named after the argument that is wrong (latent_dim = 0 was blamed on private_dim), before any work; a bool
    # private_dim read as 1
    for kwargs, name in (({"latent_dim": 0}, "latent_dim"), ({"latent_dim": 2.0}, "latent_dim"),
                         ({"latent_dim": 8, "private_dim": True}, "private_dim"),
                         ({"latent_dim": 8, "private_dim": -1}, "private_dim")):
        with pytest.raises(ValueError, match=f"{name} must be an integer of at least"):
            make_networks(polymnist_modalities(1), **kwargs)


def test_resnet_networks_follow_the_mmvae_plus_layout():
    (encoder,), (decoder,) = make_networks(polymnist_modalities(1), 16, "resnet")
    mu, logvar = encoder(torch.rand(5, 3, 28, 28))
    assert mu.shape == logvar.shape == (5, 16)
    assert decoder(torch.randn(2, 5, 16)).shape == (2, 5, 3, 28, 28)
    assert encoder.mean.in_features == 256 * 7 * 7  # 64 -> 128 -> 256 channels, 28 -> 14 -> 7
    (encoder,), (decoder,) = make_networks([Modality("image", (3, 64, 64))], 16, "resnet")
    assert encoder.mean.in_features == 256 * 2 * 2  # five halvings, at most 256 channels
    assert decoder(torch.randn(3, 16)).shape == (3, 3, 64, 64)
    block = ResidualBlock(4, 4)
    x = torch.randn(2, 4, 5, 5)
    expected = x + 0.1 * block.conv_1(torch.nn.functional.leaky_relu(
        block.conv_0(torch.nn.functional.leaky_relu(x, 0.2)), 0.2))
    torch.testing.assert_close(block(x), expected)


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
    if not (MODELS[name].multi_sample or MODELS[name].posterior == "mixture"):  # a sampled "kl" may be < 0
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


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_kl_weight_scales_beta_in_every_objective(name):
    """``model(x, present, kl_weight=w)`` is the loss of the same model with ``beta * w`` (2.5 * 0.4 = 1), on the
    same draws: in the multi-sample (IWAE) objectives too, where beta is bound when the model is built."""
    alpha = 1 / 3 if name == "holder" else 0.5
    model, reference = make(name, alpha=alpha), make(name, alpha=alpha, beta=1.0)
    reference.load_state_dict(model.state_dict())
    model, reference = model.double(), reference.double()  # the KL is 1e-7 of the loss here: float32 loses it
    x, present = batch().double(), torch.ones(3, 6, dtype=torch.bool)
    present[0, :2] = False
    torch.manual_seed(5)
    weighted = model(x, present, kl_weight=0.4)
    torch.manual_seed(5)
    expected = reference(x, present)
    torch.testing.assert_close(weighted["loss"], expected["loss"], rtol=1e-12, atol=0)
    torch.manual_seed(5)
    full = model(x, present)
    assert not torch.equal(full["loss"], weighted["loss"])
    if not MODELS[name].multi_sample:  # the loss is -(reconstruction - beta * kl)
        torch.testing.assert_close(full["loss"] - weighted["loss"], 1.5 * full["kl"], rtol=1e-6, atol=0)


def test_the_pooling_is_opinionpools():
    model = make("helvae")
    x = batch()
    mu, logvar = model.encode(x)
    joint = model.posterior(x)
    expected = opf.hellinger(mu, logvar, dim=0)
    assert torch.equal(joint[0], expected[0]) and torch.equal(joint[1], expected[1])


def test_kl_to_standard_normal_against_torch_distributions_and_its_series_near_zero():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 6, generator=g, dtype=torch.float64) * 3
    logvar = torch.randn(4, 6, generator=g, dtype=torch.float64) * 4
    posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(posterior, prior).sum(-1)
    assert torch.allclose(objectives.kl_to_standard_normal(mu, logvar), expected, rtol=1e-12)
    # near the prior exp(lv) - 1 - lv cancels (8e-17 instead of 5e-19 at lv = 1e-9 in float64): the series
    # lv^2 / 2 + lv^3 / 6 is the reference there
    lv = torch.tensor([[1e-9, -2e-7, 3e-5]], dtype=torch.float64)
    series = (lv**2 / 4 + lv**3 / 12).sum(-1)  # half the per-dimension KL's lv^2 / 2 + lv^3 / 6
    assert torch.allclose(objectives.kl_to_standard_normal(torch.zeros_like(lv), lv), series, rtol=1e-9, atol=0)


@pytest.mark.parametrize("name, pool", [("mopoe", opf.poe), ("mohelvae", opf.hellinger),
                                        ("mwbvae", opf.wasserstein_barycenter), ("helvae", opf.hellinger)])
def test_the_evaluation_conditions_on_the_given_modalities_pool_as_the_mopoe_code_does(name, pool):
    """q(z | X_S) of a subset-mixture model is its aggregator on S alone (MoPoE: with the prior expert when S holds
    every modality), not the mixture over the subsets of S; per sample, written out with the given experts only."""
    model = make(name)
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    subsets = [(0,), (0, 1), (1, 2), (0, 1, 2)]
    given = torch.tensor([[e in subset for subset in subsets] for e in range(3)])
    posterior = model.conditional_posterior(mu, logvar, given)
    assert posterior.loc.shape == (4, 1, 8)
    for b, subset in enumerate(subsets):
        rows = list(subset)
        prior = name == "mopoe" and len(subset) == 3
        loc, lv = pool(mu[rows, b], logvar[rows, b], dim=0, **({"prior_expert": True} if prior else {}))
        torch.testing.assert_close(posterior.loc[b, 0], loc, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(posterior.logvar[b, 0], lv, rtol=1e-5, atol=1e-5)
    if name != "helvae":  # pool: the training posterior with modalities missing, a mixture over the subsets of S
        assert model.pool(mu, logvar, given).loc.shape[-2] > 1


@pytest.mark.parametrize("name", ["helvae", "mmvaeplus", "holderplusplus"])
def test_encode_with_private_splits_one_pass_of_the_encoders(name):
    """The shared statistics are the encoders' first ``latent`` outputs, the private ones the rest; each encoder
    runs once (evaluation asked for both with two passes)."""
    model, x = make(name), batch()
    calls = []
    for encoder in model.encoders:
        encoder.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        mu, logvar, private = model.encode_with_private(x)
        assert len(calls) == 3
        stats = [encoder(x[:, m]) for m, encoder in enumerate(model.encoders)]
    shared = 8
    torch.testing.assert_close(mu, torch.stack([s[0][:, :shared] for s in stats]), rtol=0, atol=0)
    torch.testing.assert_close(logvar, torch.stack([s[1][:, :shared] for s in stats]), rtol=0, atol=0)
    if name == "helvae":
        assert private is None and mu.shape == (3, 6, 8)
    else:
        torch.testing.assert_close(private[0], torch.stack([s[0][:, shared:] for s in stats]), rtol=0, atol=0)
        torch.testing.assert_close(private[1], torch.stack([s[1][:, shared:] for s in stats]), rtol=0, atol=0)
        assert private[0].shape == (3, 6, 3)


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
    encoders, decoders = make_networks(polymnist_modalities(2), 4)
    with pytest.raises(ValueError, match="model must be one of"):
        MultimodalVAE(encoders, decoders, "jmvae")
    with pytest.raises(ValueError, match=r"alpha = 0 or 1/n .* got alpha=0.3"):
        MultimodalVAE(encoders, decoders, "holder", alpha=0.3)
    for model in ("helvae", "mopoe", "mvae"):  # alpha was accepted and ignored: runs of two alphas, one model
        with pytest.raises(ValueError, match=rf"alpha applies to \('holder', .*\); model='{model}' got alpha=0.3"):
            MultimodalVAE(encoders, decoders, model, alpha=0.3)
    with pytest.raises(ValueError, match="learnable_weights needs one of"):
        MultimodalVAE(encoders, decoders, "mvae", learnable_weights=True)
    with pytest.raises(ValueError, match="2 encoders but 1 decoders"):
        MultimodalVAE(encoders, decoders[:1])
    with pytest.raises(ValueError, match="x has 3 modalities but the model has 2"):
        MultimodalVAE(encoders, decoders)(batch(modalities=3))
    with pytest.raises(ValueError, match=r"num_samples and estimator apply to \('mmvae', 'mmvaeplus'.*\); model='helvae'"):
        MultimodalVAE(encoders, decoders, "helvae", num_samples=4)
    with pytest.raises(ValueError, match="estimator must be one of .* got 'vimco'"):
        MultimodalVAE(encoders, decoders, "mmvae", estimator="vimco")
    with pytest.raises(ValueError, match="num_samples must be a positive integer, got 0"):
        MultimodalVAE(encoders, decoders, "mmvae", num_samples=0)


def mmvae_terms(model, x, present, seed=7):
    torch.manual_seed(seed)
    mu, logvar = model.encode(x)
    return model.objective(list(x.unbind(1)), present, mu, logvar, model.decoders, model.likelihood,
                           model.aggregate)


def present_with_gaps(modalities=3, n=6):
    present = torch.ones(modalities, n, dtype=torch.bool)
    present[0, :2] = False
    present[2, 5] = False
    return present


def test_mmvae_with_one_sample_every_estimator_is_the_elbo():
    x, present = batch(), present_with_gaps()
    values = []
    for estimator in ("elbo", "iwae", "dreg"):
        terms = mmvae_terms(make("mmvae", estimator=estimator), x, present)
        assert torch.allclose(terms.objective, terms.reconstruction - 2.5 * terms.kl, rtol=1e-6)
        values.append(terms.objective)
    assert torch.allclose(values[0], values[1], rtol=1e-6) and torch.allclose(values[0], values[2], rtol=1e-6)


def test_mmvae_iwae_bound_is_above_the_elbo_on_the_same_draws():
    x, present = batch(), present_with_gaps()
    elbo = mmvae_terms(make("mmvae", num_samples=8), x, present).objective
    iwae = mmvae_terms(make("mmvae", num_samples=8, estimator="iwae"), x, present).objective
    # log mean_k w_k >= mean_k log w_k for every sample (Jensen), strictly unless the weights are all equal
    assert (iwae > elbo).all()
    # and log mean exp, computed independently in float64 from the ELBO's own per-draw log-weights
    model = make("mmvae", num_samples=8)
    torch.manual_seed(7)
    mu, logvar = model.encode(x)
    count = present.sum(0).double()
    expected = torch.zeros(6, dtype=torch.float64)
    for m in range(3):
        z = mu[m] + torch.exp(0.5 * logvar[m]) * torch.randn(8, *mu[m].shape)
        log_q = torch.stack([opf.diag_gaussian_log_prob(z, mu[j], logvar[j]) for j in range(3)])
        log_q = torch.where(present[:, None, :], log_q, -torch.inf)
        log_q = torch.logsumexp(log_q.double(), 0) - count.log()
        log_p = -0.5 * (z.double() ** 2 + math.log(2 * math.pi)).sum(-1)
        log_lik = sum(torch.where(present[t], objectives.laplace_log_likelihood(x[:, t], model.decoders[t](z)), 0)
                      for t in range(3)).double()
        log_w = log_lik + 2.5 * (log_p - log_q)
        expected += present[m] * (torch.logsumexp(log_w, 0) - math.log(8)) / count
    assert torch.allclose(iwae.double(), expected, rtol=1e-5)


def gradients_by_estimator(name, num_samples):
    """``{estimator: {parameter: gradient}}`` of the IWAE and both DReG losses on the same draws, in float64 (where
    the decoder-gradient identity holds up to rounding)."""
    x, present = batch().double(), present_with_gaps()
    grads = {}
    for estimator in ("iwae", "dreg", "dreg_unbiased"):
        model = make(name, num_samples=num_samples, estimator=estimator).double()
        torch.manual_seed(3)
        model(x, present)["loss"].backward()
        grads[estimator] = {parameter: p.grad.clone() for parameter, p in model.named_parameters()}
    return grads


@pytest.mark.parametrize("name", ["mmvae", "mmvaeplus"])
def test_dreg_has_the_iwae_decoder_gradient_and_its_own_encoder_gradient(name):
    grads = gradients_by_estimator(name, 5)
    for dreg in ("dreg", "dreg_unbiased"):
        for parameter in grads["iwae"]:
            assert torch.isfinite(grads[dreg][parameter]).all(), (dreg, parameter)
            if parameter.startswith("decoders."):  # sum_k w_k grad log p(X|z_k) in every estimator
                torch.testing.assert_close(grads[dreg][parameter], grads["iwae"][parameter], rtol=1e-9, atol=1e-12,
                                           msg=f"{dreg} {parameter}")
        assert not torch.allclose(grads[dreg]["encoders.1.mean.weight"], grads["iwae"]["encoders.1.mean.weight"])
    assert not torch.allclose(grads["dreg"]["encoders.1.mean.weight"], grads["dreg_unbiased"]["encoders.1.mean.weight"])


@pytest.mark.parametrize("name", ["mmvae", "mmvaeplus"])
def test_dreg_logs_the_iwae_bound_not_its_surrogate(name):
    """The surrogate sum_k w~_k log w_k, DReG's loss before, lies above the IWAE bound by up to log K: the logged
    losses of DReG runs were not comparable with the IWAE runs' (Hölder+ already logged the bound)."""
    x, present = batch().double(), present_with_gaps()
    losses = {}
    for estimator in ("iwae", "dreg", "dreg_unbiased"):
        model = make(name, num_samples=4, estimator=estimator).double()
        torch.manual_seed(3)
        losses[estimator] = model(x, present)["loss"].detach()
    torch.testing.assert_close(losses["dreg"], losses["iwae"], rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(losses["dreg_unbiased"], losses["iwae"], rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("name", ["mmvae", "mmvaeplus"])
def test_dreg_at_kl_weight_zero_is_the_iwae_gradient(name):
    """At ``beta * kl_weight = 0`` (a warm-up's start) the log-weights hold no ``log q``, so there is no score term
    for DReG to turn into path terms: every gradient is the IWAE one on the same draws (a path weighted by the
    squared normalised weights, as at beta = 1, would differ). Hölder+ and Hölder++: test_mvae_holder."""
    x, present = batch().double(), present_with_gaps()
    grads = {}
    for estimator in ("iwae", "dreg", "dreg_unbiased"):
        model = make(name, num_samples=3, estimator=estimator).double()
        torch.manual_seed(3)
        model(x, present, kl_weight=0.0)["loss"].backward()
        grads[estimator] = {parameter: p.grad.clone() for parameter, p in model.named_parameters()}
    for parameter, gradient in grads["iwae"].items():
        for dreg in ("dreg", "dreg_unbiased"):
            torch.testing.assert_close(grads[dreg][parameter], gradient, rtol=1e-9, atol=1e-12, msg=f"{dreg} {parameter}")


def linear_gaussian_log_likelihood(x, present, z, decoders):
    inputs = z if isinstance(z, list) else [(z,)] * len(decoders)
    return sum(torch.where(present[m], -0.5 * (decoder(torch.cat(inputs[m], -1)) - x[m]).pow(2).sum(-1), 0.0)
               for m, decoder in enumerate(decoders))


def test_dreg_gradient_is_unbiased_for_the_beta_weighted_iwae_bound():
    """One modality (q(z | X) = q(z | x), the proposal): the mean of DReG's encoder gradients over 100 000 copies of
    a sample is that of the IWAE gradients at beta = 0.3 (within 4 standard errors; weighting the path by the
    squared normalised weights, right at beta = 1 only, is off by over 30 here), in float64."""
    n, beta = 100_000, 0.3
    torch.manual_seed(0)
    decoders = torch.nn.ModuleList([torch.nn.Linear(1, 2)]).double()
    x = [torch.tensor([[1.5, -2.0]], dtype=torch.float64).expand(n, 2)]
    present = torch.ones(1, n, dtype=torch.bool)
    aggregate = functools.partial(opf.moe, dim=0, validate_args=False)
    means = {}
    for estimator in ("iwae", "dreg"):
        mu = torch.full((1, n, 1), 0.4, dtype=torch.float64, requires_grad=True)
        logvar = torch.full((1, n, 1), -0.6, dtype=torch.float64, requires_grad=True)
        torch.manual_seed(1)
        terms = objectives.mmvae_objective(x, present, mu, logvar, decoders, linear_gaussian_log_likelihood,
                                           aggregate, beta=beta, num_samples=3, estimator=estimator)
        per_sample = torch.cat(torch.autograd.grad(terms.objective.sum(), [mu, logvar]), -1)[0]  # (n, 2)
        means[estimator] = (per_sample.mean(0), per_sample.std(0) / math.sqrt(n))
    (iwae, iwae_error), (dreg, dreg_error) = means["iwae"], means["dreg"]
    assert ((dreg - iwae).abs() < 4 * torch.sqrt(iwae_error**2 + dreg_error**2)).all(), (iwae, dreg)


def mean_encoder_gradients(n, beta, num_samples, private_dim, estimators, family="normal", hoelder_plus=False,
                           modalities=2, present=None, weights=None):
    """``{estimator: (mean, standard error)}`` over ``n`` copies of one sample of the per-copy gradients of the MMVAE
    (``private_dim = 0``) or MMVAE+ bound with respect to the posteriors' parameters (and the pooling ``weights``,
    learnable, where given), in float64; the same draws for every estimator; posteriors and prior of the latent
    ``family``; ``present``: which modalities are (default all). ``hoelder_plus``: Hölder+'s bound instead, its
    draws from the components of the exact alpha = 1/2 pool."""
    torch.manual_seed(0)
    dim = 1 + private_dim
    decoders = torch.nn.ModuleList([torch.nn.Linear(dim, 2) for _ in range(modalities)]).double()
    targets = [[1.5, -2.0], [-0.5, 1.0], [0.3, 0.8]]
    x = [torch.tensor([targets[m]], dtype=torch.float64).expand(n, 2) for m in range(modalities)]
    present = torch.tensor([True] * modalities if present is None else present)[:, None].expand(modalities, n)
    extra = {"private_dim": private_dim,
             "auxiliary_scale": [torch.ones(private_dim, dtype=torch.float64)] * modalities}
    aggregate = functools.partial(opf.moe, dim=0, validate_args=False, family=family)
    objective = objectives.mmvae_plus_objective
    if hoelder_plus:
        aggregate = functools.partial(opf.holder_mixture, alpha=0.5, dim=0, validate_args=False)
        extra["members"] = opf.holder_mixture_members(modalities, 0.5)
        objective = objectives.holder_plus_objective
    else:
        extra["latent"] = objectives.LatentFamily(family)
    locations = [[0.4] + [0.2] * private_dim, [-0.7] + [-0.3] * private_dim, [0.1] + [0.5] * private_dim]
    log_variances = [[-0.6] + [0.1] * private_dim, [0.3] + [-0.2] * private_dim, [-0.2] + [0.2] * private_dim]
    found = {}
    for estimator in estimators:
        mu, logvar = (torch.tensor(t[:modalities], dtype=torch.float64)[:, None, :].expand(modalities, n, dim)
                      .clone().requires_grad_() for t in (locations, log_variances))
        leaves, pool = [mu, logvar], aggregate
        if weights is not None:
            leaves.append(torch.tensor(weights, dtype=torch.float64).expand(n, modalities).clone().requires_grad_())
            pool = functools.partial(aggregate, weights=leaves[-1])
        torch.manual_seed(1)
        terms = objective(x, present, mu, logvar, decoders, linear_gaussian_log_likelihood, pool, beta=beta,
                          num_samples=num_samples, estimator=estimator, **extra)
        grads = torch.autograd.grad(terms.objective.sum(), leaves)
        per_copy = torch.cat([g.transpose(0, 1).reshape(n, -1) if g.dim() == 3 else g for g in grads], -1)
        found[estimator] = (per_copy.mean(0), per_copy.std(0) / math.sqrt(n))
    return found


@pytest.mark.parametrize("beta, num_samples, private_dim, family, hoelder_plus, more",
                         [(1.0, 3, 0, "normal", False, {}), (0.3, 3, 0, "normal", False, {}),
                          (1.0, 3, 1, "normal", False, {}), (2.5, 2, 0, "normal", False, {}),
                          (1.0, 3, 1, "laplace", False, {}), (1.0, 3, 1, "normal", True, {}),
                          (0.3, 2, 1, "normal", True, {}),
                          (1.0, 3, 0, "normal", False, {"modalities": 3, "present": [True, False, True]}),
                          (2.0, 3, 1, "normal", True, {"modalities": 3, "weights": [0.2, 0.5, 0.3]})],
                         ids=["mmvae", "mmvae-beta0.3", "mmvaeplus", "mmvae-beta2.5-K2", "mmvaeplus-laplace",
                              "hoelderplus", "hoelderplus-beta0.3-K2", "mmvae-M3-one-absent",
                              "hoelderplus-M3-learnable-weights-beta2"])
def test_unbiased_dreg_is_the_gradient_of_the_stratified_bound(beta, num_samples, private_dim, family,
                                                                         hoelder_plus, more):
    """Two modalities (or three, one absent; or three with learnable pooling weights), each stratum's K draws from
    its own posterior, the mixture in log q: the mean of ``dreg_unbiased``'s encoder gradients over 100 000 copies
    is the IWAE gradient's (within 4 standard errors, per parameter; an absent modality's are zero in both), while
    the MMVAE code's ``dreg`` (every posterior stopped inside log q) is not (more than 4 standard errors off
    somewhere; at K = 1, below, it is unbiased). Laplace latents: the path copy of a draw that ``rho`` is taken at
    moves with ``exp(logvar / 2)``, to which the Laplace scale is proportional. Hölder+: each draw from one of the
    pool's components (experts and pairs), whose parameters depend on two encoders."""
    found = mean_encoder_gradients(100_000, beta, num_samples, private_dim, ("iwae", "dreg", "dreg_unbiased"),
                                   family, hoelder_plus, **more)
    (iwae, iwae_error) = found["iwae"]
    z = {}
    for name, (mean, error) in found.items():
        spread = torch.sqrt(error**2 + iwae_error**2)
        assert ((spread > 0) | (mean == iwae)).all(), name  # no spread only where both are exactly zero
        z[name] = torch.where(spread > 0, (mean - iwae) / torch.where(spread > 0, spread, 1.0), 0.0)
    assert (z["dreg_unbiased"].abs() < 4).all(), z["dreg_unbiased"]
    assert (z["dreg"].abs() > 4).any(), z["dreg"]


def test_the_mmvae_code_dreg_at_one_draw_per_modality_is_unbiased():
    """At K = 1 the normalised weights are one, and the scores that ``dreg`` leaves out sum, over the strata, to the
    mixture's score under the mixture itself, of mean zero: both DReGs' means are the IWAE (= ELBO) gradient."""
    found = mean_encoder_gradients(100_000, 0.3, 1, 1, ("iwae", "dreg", "dreg_unbiased"))
    (iwae, iwae_error) = found["iwae"]
    for name in ("dreg", "dreg_unbiased"):
        mean, error = found[name]
        assert ((mean - iwae).abs() < 4 * torch.sqrt(error**2 + iwae_error**2)).all(), (name, mean, iwae)


def test_unbiased_dreg_is_not_for_hoelder_plus_plus():
    """Hölder++'s private posteriors depend on the shared draw, which the derivation does not cover."""
    with pytest.raises(ValueError, match="estimator='dreg_unbiased' does not apply to model='holderplusplus'"):
        make("holderplusplus", num_samples=2, estimator="dreg_unbiased")
    with pytest.raises(ValueError, match="estimator='dreg_unbiased' does not apply to Hölder\\+\\+"):
        objectives.holder_plus_objective(None, None, torch.zeros(3, 2, 4), torch.zeros(3, 2, 4), None, None,
                                         opf.holder_mixture, num_samples=2, estimator="dreg_unbiased",
                                         top_down=torch.nn.ModuleList())


def test_hoelder_plus_plus_dreg_is_unbiased_at_one_draw_and_biased_at_three():
    """Hölder++'s ``dreg`` (its only DReG: every posterior stopped inside log q, the private ones depending on the
    shared draw through the top-down nets) against the IWAE gradient, three modalities, one absent, beta 1.5, over
    40 000 copies of one sample: at K = 1 within 4 standard errors per parameter (the left-out scores have mean zero
    as for MMVAE), at K = 3 more than 4 off somewhere, as MMVAE's ``dreg`` is (applications/README.md)."""
    from applications.multimodal_vae.models import TopDownPrivate

    torch.manual_seed(0)
    modalities, shared, private, n = 3, 1, 1, 40_000
    dim = shared + private
    decoders = torch.nn.ModuleList(torch.nn.Linear(dim, 2) for _ in range(modalities)).double()
    top_down = torch.nn.ModuleList(TopDownPrivate(shared, private, hidden=4) for _ in range(modalities)).double()
    for net in top_down:  # (it starts at zero: Hölder+; moved, the private posteriors depend on the shared draw)
        torch.nn.init.normal_(net.net[-1].weight, std=0.5)
    targets = torch.tensor([[1.5, -2.0], [-0.5, 1.0], [0.3, 0.8]], dtype=torch.float64)
    x = [targets[m].expand(n, 2) for m in range(modalities)]
    present = torch.tensor([True, True, False])[:, None].expand(modalities, n)
    locations = torch.tensor([[0.4, 0.2], [-0.7, -0.3], [0.1, 0.5]], dtype=torch.float64)
    log_variances = torch.tensor([[-0.6, 0.1], [0.3, -0.2], [-0.2, 0.2]], dtype=torch.float64)
    pool = functools.partial(opf.holder_mixture, alpha=0.5, dim=0, validate_args=False)
    found = {}
    for estimator, k in (("iwae", 1), ("dreg", 1), ("iwae", 3), ("dreg", 3)):
        mu, logvar = (t[:, None].expand(modalities, n, dim).clone().requires_grad_()
                      for t in (locations, log_variances))
        torch.manual_seed(1)  # the same draws for both estimators
        terms = objectives.holder_plus_objective(
            x, present, mu, logvar, decoders, linear_gaussian_log_likelihood, pool, beta=1.5, num_samples=k,
            estimator=estimator, private_dim=private, auxiliary_scale=[torch.ones(private, dtype=torch.float64)] * 3,
            members=opf.holder_mixture_members(modalities, 0.5), top_down=top_down)
        grads = torch.autograd.grad(terms.objective.sum(), [mu, logvar])
        per_copy = torch.cat([g.transpose(0, 1).reshape(n, -1) for g in grads], -1)
        found[estimator, k] = (per_copy.mean(0), per_copy.std(0) / math.sqrt(n))
    z = {}
    for k in (1, 3):
        (iwae, iwae_error), (dreg, dreg_error) = found["iwae", k], found["dreg", k]
        spread = torch.sqrt(iwae_error**2 + dreg_error**2)
        assert ((spread > 0) | (dreg == iwae)).all()  # no spread only for the absent modality's zeros
        z[k] = torch.where(spread > 0, (dreg - iwae) / torch.where(spread > 0, spread, 1.0), 0.0)
    assert (z[1].abs() < 4).all(), z[1]
    assert (z[3].abs() > 4).any(), z[3]


def test_mmvae_plus_elbo_against_an_independent_computation():
    """One draw per modality, in float64: the shared latent is scored by the mixture of the present unimodal
    posteriors, the private one by its own; the other modalities decode with auxiliary draws."""
    torch.set_default_dtype(torch.float64)
    x, present = batch().double(), present_with_gaps()
    model = make("mmvaeplus").double()
    with torch.no_grad():
        model.auxiliary_logits.copy_(torch.linspace(-0.5, 0.4, 9).reshape(3, 3))
    torch.manual_seed(11)
    terms = model.objective(list(x.unbind(1)), present, *model._encode(x), model.decoders, model.likelihood,
                            model.aggregate, auxiliary_scale=model.auxiliary_scale())
    assert mu_shape(model, x) == (3, 6, 8)
    mu, logvar = model._encode(x)
    normal = torch.distributions.Normal
    torch.manual_seed(11)
    expected = torch.zeros(6)
    count = present.sum(0).double()
    for m in range(3):
        u = mu[m] + torch.exp(0.5 * logvar[m]) * torch.randn(1, *mu[m].shape)
        z, w = u[..., :8], u[..., 8:]
        scale = torch.exp(0.5 * logvar)
        log_q_shared = torch.stack([normal(mu[j, :, :8], scale[j, :, :8]).log_prob(z).sum(-1) for j in range(3)])
        log_q_shared = torch.logsumexp(torch.where(present[:, None, :], log_q_shared, -torch.inf), 0) - count.log()
        log_q = log_q_shared + normal(mu[m, :, 8:], scale[m, :, 8:]).log_prob(w).sum(-1)
        log_p = normal(0.0, 1.0).log_prob(u).sum(-1)
        log_lik = 0
        for d in range(3):
            # the auxiliary scales: softmax of the logits times the private size (3)
            scales = 3 * model.auxiliary_logits[d].exp() / model.auxiliary_logits[d].exp().sum()
            private = w if d == m else torch.randn_like(w) * scales
            loc = model.decoders[d].decoder(torch.cat([z, private], -1))
            term = torch.distributions.Laplace(loc, 0.75).log_prob(x[:, d]).flatten(-3).sum(-1)
            log_lik = log_lik + torch.where(present[d], term, 0)
        expected += present[m] * (log_lik + 2.5 * (log_p - log_q)).mean(0) / count
    # to float64's rounding: float32 accumulators had cost it 1e-8, within assert_close's default tolerance
    assert terms.objective.dtype == torch.float64
    torch.testing.assert_close(terms.objective, expected, rtol=1e-12, atol=1e-9)
    # generation from the shared latent alone draws the private one from its prior
    assert model.decoders[0](torch.randn(4, 8)).shape == (4, 3, 28, 28)
    with pytest.raises(ValueError, match=r"private_dim > 0 .* goes with the models \('mmvaeplus', .*\); model='mmvae'"):
        make("mmvae", private_dim=2)
    with pytest.raises(ValueError, match="model='mmvaeplus' got private_dim=0"):
        make("mmvaeplus", private_dim=0)


def test_mvae_elbo_against_an_independent_computation_decoding_each_unimodal_term_once():
    """In float64: the joint ELBO of the product with a prior expert plus each present modality's ELBO under its own
    posterior times the prior, reconstructing that modality alone; 2M decoder passes, not M + M^2. The joint term
    weighs the modalities' likelihoods, the unimodal ones do not (MoPoE's calc_elbo: rec_weight_mod = 1.0)."""
    torch.set_default_dtype(torch.float64)
    x, present = batch().double(), present_with_gaps()
    model = make("mvae").double()
    weights = torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
    model.likelihood.weights.copy_(weights)
    calls = []
    for m, decoder in enumerate(model.decoders):
        decoder.register_forward_hook(lambda module, args, output, m=m: calls.append(m))
    torch.manual_seed(5)
    terms = model.objective(list(x.unbind(1)), present, *model._encode(x), model.decoders, model.likelihood,
                            model.aggregate)
    assert sorted(calls) == [0, 0, 1, 1, 2, 2]
    mu, logvar = model._encode(x)

    def product_with_prior(members):  # precision-weighted, the prior N(0, I) always a member
        precision = 1 + (members[:, :, None] / logvar.exp()).sum(0)
        mean = (members[:, :, None] * mu / logvar.exp()).sum(0) / precision
        return mean, -precision.log()

    def laplace(d, z):
        loc = model.decoders[d](z)
        return torch.distributions.Laplace(loc, 0.75).log_prob(x[:, d]).flatten(-3).sum(-1)

    def kl(mean, log_var):
        q = torch.distributions.Normal(mean, torch.exp(0.5 * log_var))
        return torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(-1)

    torch.manual_seed(5)
    mean, log_var = product_with_prior(present.double())
    z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
    rec = sum(weights[d] * torch.where(present[d], laplace(d, z), 0) for d in range(3))
    divergence = kl(mean, log_var)
    for m in range(3):
        only = torch.zeros_like(present, dtype=torch.float64)
        only[m] = present[m].double()
        mean, log_var = product_with_prior(only)
        z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
        rec = rec + torch.where(present[m], laplace(m, z), 0)
        divergence = divergence + torch.where(present[m], kl(mean, log_var), 0)
    torch.testing.assert_close(terms.reconstruction, rec)
    torch.testing.assert_close(terms.kl, divergence)


@pytest.mark.parametrize("name", ["mopoe", "mohelvae", "mwbvae"])
def test_subset_models_pool_from_the_components_shared_by_all_subsets(name, monkeypatch):
    """The model hands its aggregator itself to ``subset_mixture`` (not a wrapper), so the library mixes components
    shared by all subsets; the result equals the per-subset pools of the generic path, learnable weights included."""
    import opinionpool.functional as functional

    weighted = MODELS[name].weighted
    model = make(name, learnable_weights=weighted)
    if weighted:
        with torch.no_grad():
            model.pool_logits.copy_(torch.tensor([0.4, -0.3, 0.1]))
    x, present = batch(), present_with_gaps()
    mu, logvar = model._encode(x)
    shared = []
    for kind, compute in functional._SHARED.items():
        monkeypatch.setitem(functional._SHARED, kind, lambda *args, compute=compute, kind=kind: (
            shared.append(kind), compute(*args))[1])
    mixture = model.pool(mu, logvar, present)
    assert len(shared) == 1
    options = {"weights": torch.softmax(model.pool_logits, 0)} if weighted else {}
    aggregator = model._aggregator
    generic = opf.subset_mixture(lambda *args, **kwargs: aggregator(*args, **kwargs), mu, logvar, mask=present,
                                 prior_on_full_subset=MODELS[name].prior_on_full_subset, **options)
    assert len(shared) == 1  # the wrapper took the per-subset path
    for got, expected in zip(mixture, generic):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def mu_shape(model, x):
    return tuple(model.encode(x)[0].shape)


@pytest.mark.parametrize("name", ["mmvaeplus", "holderplus"])
def test_auxiliary_scales_keep_the_prior_mean_scale(name):
    """As in the MMVAE+ code, r_n's scales are learnable only in their shape: their mean over the private
    coordinates is one, the prior's, which the evaluation uses (free scales shrank in training)."""
    model = make(name)
    with torch.no_grad():
        model.auxiliary_logits.copy_(torch.randn(model.auxiliary_logits.shape) * 3 - 2)
    scale = model.auxiliary_scale()
    assert scale.shape == (3, model.private_dim) and (scale > 0).all()
    torch.testing.assert_close(scale.mean(-1), torch.ones(3))
    scale[0, 0].backward()
    assert model.auxiliary_logits.grad[0].abs().sum() > 0 and model.auxiliary_logits.grad[1:].abs().sum() == 0


def test_mmvae_plus_dreg_has_the_iwae_decoder_gradient():
    grads = gradients_by_estimator("mmvaeplus", 4)
    for name in grads["iwae"]:
        assert torch.isfinite(grads["dreg"][name]).all(), name
        if name.startswith("decoders.") or name == "auxiliary_logits":
            assert torch.allclose(grads["dreg"][name], grads["iwae"][name], rtol=1e-9, atol=1e-12), name
    assert not torch.allclose(grads["dreg"]["encoders.1.mean.weight"], grads["iwae"]["encoders.1.mean.weight"])


def test_bf16_autocast_keeps_the_pooling_and_the_objective_in_float32():
    model = make("helvae")
    x, present = batch(), present_with_gaps()
    torch.manual_seed(0)
    full = model(x, present)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mu, logvar = model.encode(x)
        pooled = model.aggregate(mu.bfloat16(), logvar.bfloat16(), mask=present)
        torch.manual_seed(0)
        mixed = model(x, present)
    assert mu.dtype == pooled[0].dtype == pooled[1].dtype == mixed["loss"].dtype == torch.float32
    assert torch.isfinite(mixed["loss"]) and abs(mixed["loss"].item() / full.item() - 1) < 0.02


def test_holder_mixture_samples_the_exact_pool_and_estimates_its_kl():
    model = make("holder_mixture", alpha=0.5)
    x = batch()
    mixture = model.posterior_mixture(x)
    assert mixture.loc.shape == (6, 6, 8)  # 3 experts + 3 pairs for alpha = 1/2
    mu, logvar = model.encode(x)
    reference = opf.holder_mixture(mu, logvar, 0.5, dim=0)
    assert torch.equal(mixture.log_weights, reference.log_weights) and torch.equal(mixture.loc, reference.loc)
    # with one modality present the pool is that expert: the KL estimate averages to its closed form
    present = torch.zeros(3, 6, dtype=torch.bool)
    present[1] = True
    with torch.no_grad():
        estimates = []
        for seed in range(400):
            torch.manual_seed(seed)
            estimates.append(objectives.mixture_elbo(list(x.unbind(1)), present, mu, logvar, model.decoders,
                                                     model.likelihood, model.aggregate).kl)
        estimates = torch.stack(estimates)
    exact = objectives.kl_to_standard_normal(mu[1], logvar[1])
    error = estimates.std(0) / math.sqrt(len(estimates))
    assert ((estimates.mean(0) - exact).abs() < 4 * error + 1e-4).all()


def test_evaluating_restores_the_previous_mode_also_on_errors():
    from applications.multimodal_vae.models import evaluating

    model = make("helvae")
    with pytest.raises(RuntimeError, match="inside"):
        with evaluating(model):
            assert not model.training and not model.encoders[0].training
            raise RuntimeError("inside")
    assert model.training and model.encoders[0].training
    model.eval()
    with evaluating(model):
        pass
    assert not model.training
    # each submodule back in its own mode: a frozen (eval-mode) encoder inside a training model stayed frozen only
    # until the first evaluation, which put it back in training
    model.train()
    model.encoders[0].eval()
    with evaluating(model):
        assert not any(module.training for module in model.modules())
    assert model.training and not model.encoders[0].training and model.encoders[1].training
    assert not any(module.training for module in model.encoders[0].modules())


@pytest.mark.parametrize("weight_gradient", [True, False])
def test_holder_plus_weight_gradient_is_the_gradient_of_the_weights_alone(weight_gradient):
    """With bounds that do not depend on the encoders (a constant likelihood per component, beta = 0) the Hölder+
    objective is sum_c pi_c L_c: its gradient is that of the exact pool's weights (independently from
    ``holder_mixture``), or none when the weights' gradient is stopped (the ablation)."""
    torch.manual_seed(0)
    m, b, shared, private = 3, 4, 2, 2
    mu = torch.randn(m, b, shared + private, dtype=torch.float64, requires_grad=True)
    logvar = (0.3 * torch.randn(m, b, shared + private, dtype=torch.float64)).requires_grad_()
    present = torch.ones(m, b, dtype=torch.bool)
    present[0, 1] = False
    per_component = torch.tensor([3.0, -1.0, 2.0, 5.0, -4.0, 0.5], dtype=torch.float64)  # 3 experts, 3 pairs

    def likelihood(x, present, inputs, decoders):
        k, c, n = inputs[0][0].shape[:-1]
        return per_component.view(1, c, 1).expand(k, c, n)

    def aggregate(mu, logvar, mask):
        return opf.holder_mixture(mu, logvar, 0.5, mask=mask)

    terms = objectives.holder_plus_objective(
        None, present, mu, logvar, None, likelihood, aggregate, beta=0.0, num_samples=2, private_dim=private,
        auxiliary_scale=torch.ones(m, private, dtype=torch.float64), members=opf.holder_mixture_members(m, 0.5),
        weight_gradient=weight_gradient)
    grad_mu, grad_logvar = torch.autograd.grad(terms.objective.sum(), (mu, logvar), allow_unused=True,
                                               materialize_grads=True)
    weights = opf.holder_mixture(mu[..., :shared], logvar[..., :shared], 0.5, mask=present).log_weights.exp()
    expected = (weights * per_component).sum(-1)
    torch.testing.assert_close(terms.objective, expected.detach())
    expected_mu, expected_logvar = torch.autograd.grad(expected.sum(), (mu, logvar))
    assert expected_mu[..., :shared].abs().max() > 0.1  # the weights do depend on the shared means
    if not weight_gradient:
        expected_mu, expected_logvar = torch.zeros_like(mu), torch.zeros_like(logvar)
    torch.testing.assert_close(grad_mu, expected_mu)
    torch.testing.assert_close(grad_logvar, expected_logvar)
