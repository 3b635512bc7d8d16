"""Evaluation of the multimodal VAE application on models with known answers: a perfect generator gets coherence 1,
a broken modality gets chance, disagreeing decoders get no unconditional coherence; summaries, probes and pooling
diagnostics against hand computations; evaluation is deterministic."""

import math

import pytest
import torch
from torch import nn

from applications.multimodal_vae.data import MultimodalDataset, polymnist_modalities
from applications.multimodal_vae.data import subset_tuples as all_subsets
from applications.multimodal_vae.evaluation import (
    DigitClassifier,
    accuracy,
    coherence,
    cross_coherence,
    latent_probe,
    pooling_diagnostics,
    summarise_coherence,
    unconditional_coherence,
)
from applications.multimodal_vae.models import MultimodalVAE
from applications.multimodal_vae.networks import make_networks

pytestmark = pytest.mark.usefixtures("float32_default")


class PixelCode(nn.Module):
    """Reads the digit written as the brightest of ten pixels of row 0 (a stand-in classifier)."""

    def forward(self, x):
        return x[:, 0, 0, :10] * 10


class CodeEncoder(nn.Module):
    """Posterior mean: the one-hot digit code read from the image (times 10), nearly deterministic; a broken
    encoder always says digit 0."""

    def __init__(self, broken=False):
        super().__init__()
        self.broken = broken
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        code = x[:, 0, 0, :10].clone()
        if self.broken:
            code = torch.zeros_like(code)
            code[:, 0] = 1
        return 10 * code, torch.full_like(code, -30.0)


class CodeDecoder(nn.Module):
    """Writes z / 10 into the ten code pixels, rolled by ``shift`` positions."""

    def __init__(self, shift=0):
        super().__init__()
        self.shift = shift

    def forward(self, z):
        image = torch.zeros(z.shape[:-1] + (3, 28, 28))
        image[..., 0, 0, :10] = torch.roll(z / 10, self.shift, -1)
        return image


def code_model(name="helvae", broken=(), shifts=(0, 0, 0)):
    encoders = nn.ModuleList(CodeEncoder(m in broken) for m in range(3))
    return MultimodalVAE(encoders, nn.ModuleList(CodeDecoder(s) for s in shifts), name)


def coded_data(labels, modalities=3):
    """PolyMNIST-shaped tuples whose images carry their digit as a bright code pixel."""
    images = torch.zeros(modalities, len(labels), 3, 28, 28, dtype=torch.uint8)
    images[:, torch.arange(len(labels)), 0, 0, labels] = 255
    return MultimodalDataset(polymnist_modalities(modalities), images.unbind(0), labels, num_classes=10)


LABELS = torch.arange(100) % 10
CLASSIFIERS = nn.ModuleList(PixelCode() for _ in range(3))


def test_classifier_shape_and_eval_mode_is_deterministic():
    classifier = DigitClassifier()
    x = torch.rand(4, 3, 28, 28)
    assert classifier(x).shape == (4, 10)
    classifier.eval()
    assert torch.equal(classifier(x), classifier(x))  # dropout off
    assert torch.equal(accuracy(CLASSIFIERS, coded_data(LABELS)), torch.ones(3))


@pytest.mark.parametrize("name", ["helvae", "mopoe", "mmvae", "mvae"])
def test_a_perfect_generator_has_coherence_one(name):
    result = coherence(code_model(name), CLASSIFIERS, coded_data(LABELS), batch_size=30)
    assert result["subsets"] == all_subsets(3) and len(result["subsets"]) == 7
    assert torch.equal(result["accuracy"], torch.ones(7, 3))
    summary = summarise_coherence(result, 3)
    assert summary["overall"] == 1 and summary["per_size"] == {1: (1.0, 0.0), 2: (1.0, 0.0)}


def test_a_broken_modality_generates_at_chance_and_summaries_follow():
    result = coherence(code_model("helvae", broken=(1,)), CLASSIFIERS, coded_data(LABELS), batch_size=30)
    matrix = cross_coherence(result, 3)
    assert torch.allclose(matrix[0], torch.ones(3)) and torch.allclose(matrix[2], torch.ones(3))
    assert torch.allclose(matrix[1], torch.full((3,), 0.1))  # the broken source always says 0
    summary = summarise_coherence(result, 3)
    # single inputs: {m0} -> 1, {m1} -> 0.1, {m2} -> 1; pairs {m0,m1} and {m1,m2} pool a wrong expert
    singles = [summary["per_subset"][(s,)] for s in range(3)]
    assert singles == pytest.approx([1, 0.1, 1])
    assert summary["per_size"][1][0] == pytest.approx(0.7)
    assert summary["per_size"][1][1] == pytest.approx(math.sqrt(((0.3) ** 2 * 2 + 0.6**2) / 3))
    pairs = [summary["per_subset"][s] for s in [(0, 1), (0, 2), (1, 2)]]
    outside = [row for s, row in zip(result["subsets"], result["accuracy"].tolist()) if len(s) == 2]
    assert pairs == pytest.approx([outside[0][2], outside[1][1], outside[2][0]])
    assert summary["overall"] == pytest.approx((sum(singles) * 2 + sum(pairs)) / 9)


def test_unconditional_coherence_counts_agreement():
    agreeing = unconditional_coherence(code_model(), CLASSIFIERS, polymnist_modalities(3), latent_dim=10, num_samples=2000)
    assert agreeing == 1.0
    disagreeing = unconditional_coherence(code_model(shifts=(0, 1, 2)), CLASSIFIERS, polymnist_modalities(3),
                                          latent_dim=10, num_samples=2000)
    assert disagreeing < 0.01  # only when every z is negative do all decoders show nothing (p = 2^-10)


def test_evaluation_counts_subsets_and_data_are_checked_before_any_work():
    """A negative batch size gave an unconditional coherence of 0, a negative number of samples -0.0 and none a
    ZeroDivisionError; an empty dataset gave NaN coherences and accuracies; a subset naming a modality the model
    does not have was refused only after a batch was encoded, and a coherence result without the one-input subsets
    gave cross_coherence a KeyError."""
    model, modalities = code_model(), polymnist_modalities(3)
    for name, value in (("batch_size", -5), ("batch_size", 0), ("num_samples", -5), ("num_samples", 0),
                        ("num_samples", 2.5)):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer, got {value}"):
            unconditional_coherence(model, CLASSIFIERS, modalities, latent_dim=10, **{name: value})
    empty = coded_data(LABELS[:0])
    with pytest.raises(ValueError, match="data must hold at least one tuple"):
        coherence(model, CLASSIFIERS, empty)
    with pytest.raises(ValueError, match="data must hold at least one tuple"):
        accuracy(CLASSIFIERS, empty)

    class Untouchable(nn.Module):  # an encoder that must not run
        def forward(self, x):
            raise AssertionError("encoded before the subsets were checked")

    untouchable = code_model()
    untouchable.encoders[0].forward = Untouchable().forward
    with pytest.raises(ValueError, match=r"subset must hold distinct modality indices in \[0, 3\), got \[5\]"):
        coherence(untouchable, CLASSIFIERS, coded_data(LABELS), subsets=[(5,)])
    with pytest.raises(ValueError, match=r"no row for the one-input subsets \[\(1,\), \(2,\)\]"):
        cross_coherence({"subsets": [(0,), (0, 1)], "accuracy": torch.ones(2, 3)}, 3)


def test_training_the_classifiers_leaves_every_random_generator_alone(monkeypatch):
    """``torch.manual_seed`` inside a fork of the CPU generator reseeded every CUDA device too, for good: on a GPU the
    first evaluation that trained its classifiers reset CUDA's random state to seed 0 for the rest of the process.
    Only the CPU generator is seeded now (and restored)."""
    from applications.multimodal_vae.evaluation import train_classifiers

    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    before = torch.get_rng_state()
    first = train_classifiers(coded_data(LABELS[:20], 2), epochs=1, batch_size=10)
    assert seeded == [] and torch.equal(torch.get_rng_state(), before)
    second = train_classifiers(coded_data(LABELS[:20], 2), epochs=1, batch_size=10)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))


class DivergedDecoder(CodeDecoder):
    """A decoder that has diverged off the posterior: NaN wherever |z| is large (prior samples reach it)."""

    def forward(self, z):
        image = super().forward(z)
        return torch.where((z.abs() > 1).any(-1)[..., None, None, None], math.nan, image)


def test_non_finite_generations_raise_instead_of_scoring():
    """A NaN image classifies as label 0 under every classifier: all decoders "agreed", and a diverged model got
    unconditional coherence 1 (and FID scored black images)."""
    model = MultimodalVAE(nn.ModuleList(CodeEncoder() for _ in range(3)),
                          nn.ModuleList(DivergedDecoder() for _ in range(3)), "helvae")
    with pytest.raises(FloatingPointError, match="decoder 0 gave .* non-finite outputs"):
        unconditional_coherence(model, CLASSIFIERS, polymnist_modalities(3), latent_dim=10, num_samples=100)


def test_evaluation_is_deterministic_on_a_real_model():
    torch.manual_seed(0)
    encoders, decoders = make_networks(polymnist_modalities(3), 4)
    model = MultimodalVAE(encoders, decoders, "mohelvae")
    classifiers = nn.ModuleList(DigitClassifier() for _ in range(3))
    images = torch.randint(0, 256, (3, 20, 3, 28, 28), dtype=torch.uint8)
    data = MultimodalDataset(polymnist_modalities(3), images.unbind(0), torch.randint(0, 10, (20,)), num_classes=10)
    first = coherence(model, classifiers, data, batch_size=7, seed=4)
    torch.manual_seed(123)  # the global RNG state does not matter
    second = coherence(model, classifiers, data, batch_size=7, seed=4)
    assert torch.equal(first["accuracy"], second["accuracy"])
    assert model.training and not classifiers.training  # restored / kept in eval mode


def test_latent_probe_reads_the_digit_from_perfect_posteriors():
    train_labels = torch.arange(200) % 10
    scores = latent_probe(code_model("helvae", broken=(1,)), coded_data(train_labels), coded_data(LABELS),
                          [(0,), (1,), (0, 1, 2)], examples=50)
    assert scores[(0,)] == 1.0 and scores[(0, 1, 2)] == 1.0
    assert scores[(1,)] == pytest.approx(0.1)  # a constant representation: one class
    with pytest.raises(ValueError, match="probe examples must be -1 .* got 5"):
        latent_probe(code_model(), coded_data(train_labels), coded_data(LABELS), [(0,)], 5)


def test_pooling_diagnostics_of_identical_and_distant_experts():
    class Fixed(nn.Module):
        def __init__(self, mean, logvar):
            super().__init__()
            self.mean, self.logvar = torch.tensor(mean), torch.tensor(logvar)

        def forward(self, x):
            return self.mean.expand(x.shape[0], -1), self.logvar.expand(x.shape[0], -1)

    x = coded_data(LABELS[:8]).gather(torch.arange(8))
    same = MultimodalVAE(nn.ModuleList(Fixed([0.3, -1.0], [0.2, -0.5]) for _ in range(3)),
                         nn.ModuleList(CodeDecoder() for _ in range(3)), "helvae")
    diagnostics = pooling_diagnostics(same, x)
    assert diagnostics["mean_log_bhattacharyya"] == pytest.approx(0, abs=1e-6)
    assert diagnostics["pairwise_mass"] == pytest.approx(2 / 3, rel=1e-6)  # (M - 1) / M for identical experts
    means = [[0.0, 0.0], [3.0, 0.0], [0.0, -2.0]]
    logvars = [[0.0, 0.0], [0.5, 0.0], [0.0, -0.5]]
    apart = MultimodalVAE(nn.ModuleList(Fixed(m, v) for m, v in zip(means, logvars)),
                          nn.ModuleList(CodeDecoder() for _ in range(3)), "helvae")
    diagnostics = pooling_diagnostics(apart, x)

    def log_bc(m1, v1, m2, v2):  # closed form for diagonal Gaussians
        s1, s2 = torch.tensor(v1).exp(), torch.tensor(v2).exp()
        d = torch.tensor(m1) - torch.tensor(m2)
        return float((-d**2 / (4 * (s1 + s2)) + 0.5 * torch.log(2 * (s1 * s2).sqrt() / (s1 + s2))).sum())

    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = sum(log_bc(means[i], logvars[i], means[j], logvars[j]) for i, j in pairs) / 3
    assert diagnostics["mean_log_bhattacharyya"] == pytest.approx(expected, rel=1e-5)
    bc = [math.exp(log_bc(means[i], logvars[i], means[j], logvars[j])) for i, j in pairs]
    # Hellinger pool with weights 1/3: self terms 1/9 each, ordered pairs 1/9 * BC each
    assert diagnostics["pairwise_mass"] == pytest.approx(2 * sum(bc) / (3 + 2 * sum(bc)), rel=1e-5)


def test_a_perfect_generator_of_images_and_text_has_coherence_one():
    """Heterogeneous modalities: a grey image carrying the digit as a code pixel and the digit's name as characters.
    Generated text is classified from its most likely characters."""
    from applications.multimodal_vae.data import Modality
    from applications.multimodal_vae.data.mnist_svhn_text import DIGIT_NAMES, TEXT_LENGTH
    from applications.multimodal_vae.data.text import ALPHABET, encode_characters

    names = torch.stack([encode_characters(name, TEXT_LENGTH) for name in DIGIT_NAMES])  # (10, 8)

    class TextCode(nn.Module):
        """Encoder: the digit whose name the text spells, as a one-hot code times 10."""

        def forward(self, ids):
            digit = (ids.unsqueeze(1) == names).all(-1).float().argmax(-1)
            code = nn.functional.one_hot(digit, 10).float()
            return 10 * code, torch.full_like(code, -30.0)

    class TextDecoder(nn.Module):
        """Logits that spell the name of the digit in z's code (plus ``shift``)."""

        def __init__(self, shift=0):
            super().__init__()
            self.shift = shift

        def forward(self, z):
            return 20 * nn.functional.one_hot(names[(z.argmax(-1) + self.shift) % 10], len(ALPHABET)).float()

    class TextClassifier(nn.Module):
        def forward(self, ids):
            return (ids.unsqueeze(1) == names).all(-1).float()

    class GreyCode(nn.Module):
        def forward(self, x):
            return 10 * x[:, 0, 0, :10], torch.full_like(x[:, 0, 0, :10], -30.0)

    class GreyDecoder(nn.Module):
        def forward(self, z):
            image = torch.zeros(z.shape[:-1] + (1, 28, 28))
            image[..., 0, 0, :10] = z / 10
            return image

    modalities = [Modality("grey", (1, 28, 28)), Modality("text", (TEXT_LENGTH,), ALPHABET)]
    images = torch.zeros(len(LABELS), 1, 28, 28, dtype=torch.uint8)
    images[torch.arange(len(LABELS)), 0, 0, LABELS] = 255
    data = MultimodalDataset(modalities, [images, names[LABELS]], LABELS, num_classes=10)
    model = MultimodalVAE(nn.ModuleList([GreyCode(), TextCode()]), nn.ModuleList([GreyDecoder(), TextDecoder()]),
                          "mopoe", modalities=modalities)
    classifiers = nn.ModuleList([PixelCode(), TextClassifier()])
    result = coherence(model, classifiers, data, batch_size=30)
    assert torch.equal(result["accuracy"], torch.ones(3, 2))
    # a decoder that spells the next digit's name is always wrong, and only from the text output
    model.decoders[1] = TextDecoder(shift=1)
    result = coherence(model, classifiers, data, batch_size=30)
    assert torch.equal(result["accuracy"], torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]))


def test_hoelder_plus_plus_is_evaluated_with_its_private_posterior_given_z():
    """Reconstructions and the private probe's means use q(w | x, z) through the top-down network, as Hölder++
    trains, not the encoder's statistics alone."""
    from applications.multimodal_vae.evaluation.labelled import private_means

    torch.manual_seed(0)
    encoders, decoders = make_networks(polymnist_modalities(3), 4 + 2)
    model = MultimodalVAE(encoders, decoders, "holderplusplus", private_dim=2, latent_dim=4)
    for net in model.top_down:
        nn.init.normal_(net.net[-1].weight, std=0.5)
    images = torch.randint(0, 256, (3, 6, 3, 28, 28), dtype=torch.uint8)
    data = MultimodalDataset(polymnist_modalities(3), images.unbind(0), torch.randint(0, 10, (6,)), num_classes=10)
    x = [t.float() / 255 for t in images.unbind(0)]
    with torch.no_grad():
        private = model.private_posterior(x)
        z = torch.randn(6, 4)
        given = torch.ones(3, 6, dtype=torch.bool)
        w_mean = model.top_down[1](private[0][1], private[1][1], z)[0]
        expected = model.decoders[1](z, w_mean)
        assert torch.allclose(model.decode(z, 1, given, private, sample=False), expected)
        assert not torch.allclose(expected, model.decoders[1](z, private[0][1]), atol=1e-3)
        joint_mean = model.posterior(x)[0]
        means = private_means(model, data, batch_size=4)
        for m in range(3):
            assert torch.allclose(means[m], model.top_down[m](private[0][m], private[1][m], joint_mean)[0], atol=1e-6)


def test_the_evaluation_conditions_subset_mixtures_on_the_given_modalities_pool():
    """Coherence, subset probes, grids and conditional and joint likelihoods of MoPoE go through
    conditional_posterior (the subset's own pool; for the joint's proposal the full subset's, as the MoPoE code),
    never through the training posterior (pool: the mixture over subsets); the probes in eval mode."""
    from applications.multimodal_vae.evaluation.grids import grid_images
    from applications.multimodal_vae.evaluation.labelled import posterior_means
    from applications.multimodal_vae.evaluation.likelihood import log_likelihood

    torch.manual_seed(0)
    encoders, decoders = make_networks(polymnist_modalities(3), 4)
    model = MultimodalVAE(encoders, decoders, "mopoe")
    images = torch.randint(0, 256, (3, 6, 3, 28, 28), dtype=torch.uint8)
    data = MultimodalDataset(polymnist_modalities(3), images.unbind(0), torch.randint(0, 10, (6,)), num_classes=10)
    x = [t.float() / 255 for t in images.unbind(0)]
    calls = {"pool": 0, "conditional": 0}
    pool, conditional = model.pool, model.conditional_posterior

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    model.pool, model.conditional_posterior = counted("pool", pool), counted("conditional", conditional)
    classifiers = nn.ModuleList(DigitClassifier() for _ in range(3))
    coherence(model, classifiers, data, batch_size=6, seed=0)
    modes, encode = [], model.encode
    model.encode = lambda x: modes.append(model.training) or encode(x)
    posterior_means(model, data, [(0,), (1, 2), (0, 1, 2)])
    assert modes == [False] and model.training  # encoded in eval mode, the mode restored
    model.encode = encode
    grid_images(model, x, data.modalities)
    one = torch.tensor([[True] * 6, [False] * 6, [False] * 6])
    log_likelihood(model, x, condition=one, targets=~one, num_samples=2)
    log_likelihood(model, x, num_samples=2)
    assert calls["pool"] == 0 and calls["conditional"] > 0


def test_evaluation_scores_a_seeded_random_subset_of_a_split_stored_by_class():
    """MNIST-SVHN-Text's pairing files and CUB store their test tuples class by class: the evaluation took the
    first ``test_examples`` in stored order, all of the digit 0 (and FID's real reference with them). It now takes
    them from the split in an order seeded by ``eval.seed``: every class appears, the same seed gives the same
    tuples, and a tuple keeps its modalities together."""
    from types import SimpleNamespace

    from applications.multimodal_vae.evaluation import _evaluated, _shuffled

    labels = torch.arange(10).repeat_interleave(100)  # 1 000 tuples, sorted by class
    images = (labels.view(1, -1, 1, 1, 1) * 20 + torch.arange(2).view(2, 1, 1, 1, 1)).expand(2, -1, 3, 2, 2)
    data = MultimodalDataset(polymnist_modalities(2), images.to(torch.uint8).unbind(0), labels, num_classes=10)
    settings = SimpleNamespace(seed=3, test_examples=50)
    chosen = _evaluated(settings, _shuffled(settings, data))
    assert len(chosen) == 50 and len(chosen.labels.unique()) >= 8  # 50 of the first 100 would be class 0 only
    again = _evaluated(settings, _shuffled(settings, data))
    assert torch.equal(chosen.labels, again.labels)
    other = _evaluated(SimpleNamespace(seed=4, test_examples=50), _shuffled(SimpleNamespace(seed=4), data))
    assert not torch.equal(chosen.labels, other.labels)
    first, second = chosen.gather(torch.arange(50))
    torch.testing.assert_close(first * 255 // 20, chosen.labels.view(-1, 1, 1, 1).expand(-1, 3, 2, 2).float())
    torch.testing.assert_close(second * 255 - first * 255, torch.ones_like(first))
    everything = _evaluated(SimpleNamespace(seed=3, test_examples=None), _shuffled(settings, data))
    assert sorted(everything.labels.tolist()) == labels.tolist()  # all tuples, each once
