"""Encoders and decoders, one pair per modality type, chosen by the modality's shape (``make_networks``).

Every encoder maps its input to ``(mu, logvar)``, each ``(B, latent_dim)``; every decoder maps ``(..., latent_dim)``
to the likelihood's parameter: the raw image location (Laplace or normal, as in the MoPoE code) or logits over
the vocabulary per text position ``(..., L, V)``.

- PolyMNIST ``(3, 28, 28)``: the convolutional nets of the MoPoE code (conv 3->32->64->128, kernel 3, stride 2,
  padding 1, so 28->14->7->4; flatten 2048 -> linear ``hidden`` -> ReLU -> linear heads), mirrored by transposed
  convolutions. Where they differ from MoPoE's: its encoder's linear layer has the latent size (512 in its runs,
  where ``hidden`` is 512 too; at the CPU presets' latent 32 these encoders are wider), and its decoder maps the
  latent to 2048 in one linear layer where this one has two (latent -> ``hidden`` -> 2048).
- MNIST ``(1, 28, 28)``: MoPoE's fully connected nets (784 -> 400 -> heads; 400 -> 784, then a sigmoid, as its
  MNIST decoder ends).
- SVHN ``(3, 32, 32)``: MoPoE's conv nets (3->32->64->64, kernel 4, stride 2, then a 4x4 conv to 128).
- 64x64 RGB (CelebA, CUB): four stride-2 convolutions 3->32->64->128->256 (64->4), linear 512, mirrored. The
  papers use residual blocks here; these plain nets have the same resolution schedule, not their weights' layout.
- Text ``(L,)``: one-hot characters or words -> a 1x1 convolution to 128 channels -> stride-2 convolutions down
  to length <= 8 -> linear heads; the decoder mirrors it and ends in logits. Not MoPoE's text nets (its
  MNIST-SVHN-Text ones convolve the 8 characters down to 128 features, (4, 2, 1) then (4, 2, 0), about a quarter
  of these parameters; its alphabet has 71 symbols where ``data.text.ALPHABET`` has fewer).
- ``architecture="resnet"`` (PolyMNIST and 64x64 images): the residual nets of the MMVAE+ code, which the HELVAE
  paper uses: a 3x3 convolution to 64 channels, a residual block, then (average pool 3/2, residual block doubling
  the channels up to 256) down to 7x7 (PolyMNIST) or 2x2 (64x64), linear heads; the decoder mirrors it with
  nearest-neighbour upsampling. A residual block is ``shortcut(x) + 0.1 * conv(lrelu(conv(lrelu(x))))`` with
  leaky ReLUs of slope 0.2 and a 1x1 shortcut when the channel count changes.

``activation="leaky_relu"`` swaps every ReLU of every encoder and decoder (image and text nets alike) for a leaky
ReLU of the ResNets' slope (0.2). Why it is there: in HELVAE's mixture regime one encoder carries the reconstruction
first, and the consensus pressure on the others switches their ReLUs off for every input, so they stay dead for
thousands of steps (see the CPU preset). The activation has no parameters: the initialisation is the same either
way.
"""

from __future__ import annotations

import functools
import numbers

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "IMAGE_NETWORKS", "PolyMNISTDecoder", "PolyMNISTEncoder", "ResidualBlock",
           "SeparatePrivateEncoder", "check_activation", "check_hidden", "image64_decoder", "image64_encoder",
           "make_networks", "mnist_decoder", "mnist_encoder", "resnet_decoder", "resnet_encoder", "svhn_decoder",
           "svhn_encoder", "text_decoder", "text_encoder"]


class PolyMNISTEncoder(nn.Module):
    """``(B, 3, 28, 28)`` -> ``(mu, logvar)``, each ``(B, latent_dim)``."""

    def __init__(self, latent_dim: int, hidden: int = 512):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(128 * 4 * 4, hidden), nn.ReLU(),
        )
        self.mean = nn.Linear(hidden, latent_dim)
        self.logvar = nn.Linear(hidden, latent_dim)

    def forward(self, x: torch.Tensor):
        h = self.features(x)
        return self.mean(h), self.logvar(h)


class PolyMNISTDecoder(nn.Module):
    """``(..., latent_dim)`` -> Laplace locations ``(..., 3, 28, 28)`` (raw, unbounded, as in the MoPoE code)."""

    def __init__(self, latent_dim: int, hidden: int = 512):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, 128 * 4 * 4), nn.ReLU())
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1), nn.ReLU(),  # 4 -> 7
            nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),  # 7 -> 14
            nn.ConvTranspose2d(32, 3, 3, stride=2, padding=1, output_padding=1),  # 14 -> 28
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        h = self.project(z.reshape(-1, z.shape[-1])).reshape(-1, 128, 4, 4)
        return self.deconv(h).reshape(lead + (3, 28, 28))


class _Heads(nn.Module):
    """``features`` then linear heads for the mean and the log-variance."""

    def __init__(self, features: nn.Module, width: int, latent_dim: int):
        super().__init__()
        self.features = features
        self.mean = nn.Linear(width, latent_dim)
        self.logvar = nn.Linear(width, latent_dim)

    def forward(self, x: torch.Tensor):
        h = self.features(x)
        return self.mean(h), self.logvar(h)


class _Decoder(nn.Module):
    """``body`` applied to ``(N, latent_dim)`` with the leading axes of ``z`` flattened and restored."""

    def __init__(self, body: nn.Module, output_shape: tuple[int, ...]):
        super().__init__()
        self.body, self.output_shape = body, tuple(output_shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        return self.body(z.reshape(-1, z.shape[-1])).reshape(lead + self.output_shape)


def mnist_encoder(latent_dim: int, hidden: int = 400) -> nn.Module:
    return _Heads(nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU()), hidden, latent_dim)


def mnist_decoder(latent_dim: int, hidden: int = 400) -> nn.Module:
    """MoPoE's MNIST decoder, which ends in a sigmoid (its PolyMNIST and SVHN decoders give raw locations)."""
    return _Decoder(nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, 784), nn.Sigmoid()),
                    (1, 28, 28))


def svhn_encoder(latent_dim: int, hidden: int = 128) -> nn.Module:
    return _Heads(nn.Sequential(
        nn.Conv2d(3, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),  # 32 -> 16 -> 8
        nn.Conv2d(64, 64, 4, 2, 1), nn.ReLU(), nn.Conv2d(64, hidden, 4, 1, 0), nn.ReLU(), nn.Flatten(),  # 4 -> 1
    ), hidden, latent_dim)


def svhn_decoder(latent_dim: int, hidden: int = 128) -> nn.Module:
    return _Decoder(nn.Sequential(
        nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Unflatten(1, (hidden, 1, 1)),
        nn.ConvTranspose2d(hidden, 64, 4, 1, 0), nn.ReLU(), nn.ConvTranspose2d(64, 64, 4, 2, 1), nn.ReLU(),
        nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(32, 3, 4, 2, 1),
    ), (3, 32, 32))


_IMAGE64_CHANNELS = (3, 32, 64, 128, 256)


def image64_encoder(latent_dim: int, hidden: int = 512) -> nn.Module:
    c = _IMAGE64_CHANNELS
    down = [layer for a, b in zip(c, c[1:]) for layer in (nn.Conv2d(a, b, 4, 2, 1), nn.ReLU())]
    return _Heads(nn.Sequential(*down, nn.Flatten(), nn.Linear(256 * 16, hidden), nn.ReLU()), hidden, latent_dim)


def image64_decoder(latent_dim: int, hidden: int = 512) -> nn.Module:
    c = _IMAGE64_CHANNELS
    up = [layer for a, b in zip(c[:0:-1], c[-2::-1]) for layer in (nn.ConvTranspose2d(a, b, 4, 2, 1), nn.ReLU())]
    return _Decoder(nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, 256 * 16), nn.ReLU(),
                                  nn.Unflatten(1, (256, 4, 4)), *up[:-1]), (3, 64, 64))


class _OneHot(nn.Module):
    """Token ids ``(B, L)`` -> one-hot channels ``(B, V, L)`` in the module's float type (rows of an identity matrix
    kept as a buffer, so that ``.double()`` or ``.to(device)`` moves them with the network's weights; not saved)."""

    def __init__(self, vocabulary_size: int):
        super().__init__()
        self.vocabulary_size = vocabulary_size
        self.register_buffer("identity", torch.eye(vocabulary_size), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.identity[ids].transpose(1, 2)


def _halvings(length: int) -> int:
    """Stride-2 steps that bring a sequence of ``length`` to at most 8 positions (while it stays even)."""
    halvings = 0
    while length >> halvings > 8 and (length >> halvings) % 2 == 0:
        halvings += 1
    return halvings


def text_encoder(latent_dim: int, length: int, vocabulary_size: int, channels: int = 128,
                 hidden: int = 512) -> nn.Module:
    halvings = _halvings(length)
    down = [layer for _ in range(halvings) for layer in (nn.Conv1d(channels, channels, 4, 2, 1), nn.ReLU())]
    return _Heads(nn.Sequential(
        _OneHot(vocabulary_size), nn.Conv1d(vocabulary_size, channels, 1), nn.ReLU(), *down, nn.Flatten(),
        nn.Linear(channels * (length >> halvings), hidden), nn.ReLU()), hidden, latent_dim)


def text_decoder(latent_dim: int, length: int, vocabulary_size: int, channels: int = 128,
                 hidden: int = 512) -> nn.Module:
    halvings = _halvings(length)
    short = length >> halvings
    up = [layer for _ in range(halvings) for layer in (nn.ConvTranspose1d(channels, channels, 4, 2, 1), nn.ReLU())]
    return _Decoder(nn.Sequential(
        nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, channels * short), nn.ReLU(),
        nn.Unflatten(1, (channels, short)), *up, nn.Conv1d(channels, vocabulary_size, 1), _Transpose()),
        (length, vocabulary_size))


class _Transpose(nn.Module):
    """``(B, V, L)`` -> ``(B, L, V)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


def _leaky(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.leaky_relu(x, 0.2)


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        hidden = min(in_channels, out_channels)
        self.conv_0 = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.conv_1 = nn.Conv2d(hidden, out_channels, 3, padding=1)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + 0.1 * self.conv_1(_leaky(self.conv_0(_leaky(x))))


class _Leaky(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _leaky(x)


def _resnet_widths(size: int, smallest: int, base: int, widest: int) -> list[int]:
    layers = 0
    while size >> layers > smallest:
        layers += 1
    if size >> layers != smallest or size % (1 << layers):
        raise ValueError(f"size {size} does not halve to {smallest}")
    return [min(base << i, widest) for i in range(layers + 1)]


def resnet_encoder(latent_dim: int, channels: int, size: int, smallest: int, base: int = 64,
                   widest: int = 256) -> nn.Module:
    """The MMVAE+ residual image encoder for ``channels x size x size`` images, downsampled to ``smallest``."""
    width = _resnet_widths(size, smallest, base, widest)
    down = [nn.Conv2d(channels, base, 3, padding=1), ResidualBlock(base, base)]
    for i in range(len(width) - 1):
        down += [nn.AvgPool2d(3, stride=2, padding=1), ResidualBlock(width[i], width[i + 1])]
    return _Heads(nn.Sequential(*down, nn.Flatten()), width[-1] * smallest * smallest, latent_dim)


def resnet_decoder(latent_dim: int, channels: int, size: int, smallest: int, base: int = 64,
                   widest: int = 256) -> nn.Module:
    width = _resnet_widths(size, smallest, base, widest)
    up = [nn.Linear(latent_dim, width[-1] * smallest * smallest), nn.Unflatten(1, (width[-1], smallest, smallest))]
    for i in range(len(width) - 1, 0, -1):
        up += [ResidualBlock(width[i], width[i - 1]), nn.Upsample(scale_factor=2)]
    up += [ResidualBlock(base, base), _Leaky(), nn.Conv2d(base, channels, 3, padding=1)]
    return _Decoder(nn.Sequential(*up), (channels, size, size))


#: architecture -> image shape -> (encoder, decoder) constructors taking the latent size
IMAGE_NETWORKS = {
    "conv": {(3, 28, 28): (PolyMNISTEncoder, PolyMNISTDecoder), (1, 28, 28): (mnist_encoder, mnist_decoder),
             (3, 32, 32): (svhn_encoder, svhn_decoder), (3, 64, 64): (image64_encoder, image64_decoder)},
    "resnet": {shape: (functools.partial(resnet_encoder, channels=3, size=shape[1], smallest=smallest),
                       functools.partial(resnet_decoder, channels=3, size=shape[1], smallest=smallest))
               for shape, smallest in (((3, 28, 28), 7), ((3, 64, 64), 2))},
}


#: architecture -> the activations it can use, its own first
ACTIVATIONS = {"conv": ("relu", "leaky_relu"), "resnet": ("leaky_relu",)}


def check_activation(architecture: str, activation: str | None) -> None:
    """A ``ValueError`` naming ``activation`` unless ``architecture`` (a key of ``IMAGE_NETWORKS``) can use it."""
    if activation is not None and activation not in ACTIVATIONS[architecture]:
        raise ValueError(f"activation must be one of {ACTIVATIONS[architecture]} for {architecture} networks, "
                         f"got {activation!r}")


def check_hidden(architecture: str, hidden: int | None) -> None:
    """A ``ValueError`` naming ``hidden`` unless it is ``None`` or a positive width of ``conv`` nets."""
    if hidden is not None and (architecture != "conv" or isinstance(hidden, bool) or not isinstance(hidden, int)
                               or hidden < 1):
        raise ValueError(f"hidden must be null or a positive integer width of conv networks, got {hidden!r} for "
                         f"{architecture} networks")


class SeparatePrivateEncoder(nn.Module):
    """Two encoders of one input, as the MMVAE+ code's ResNet encoders have: ``shared`` gives the shared latent's
    ``(mu, logvar)``, ``private`` the modality-specific one's, concatenated in that order (the model takes the last
    coordinates as the private latent)."""

    def __init__(self, shared: nn.Module, private: nn.Module):
        super().__init__()
        self.shared, self.private = shared, private

    def forward(self, x: torch.Tensor):
        (mu_z, logvar_z), (mu_w, logvar_w) = self.shared(x), self.private(x)
        return torch.cat([mu_z, mu_w], -1), torch.cat([logvar_z, logvar_w], -1)


def make_networks(modalities, latent_dim: int, architecture: str = "conv", activation: str | None = None,
                  hidden: int | None = None, private_dim: int = 0):
    """``(encoders, decoders)`` as ``nn.ModuleList`` s, one pair per ``data.Modality``; ``architecture`` picks the
    image nets (``"conv"`` or ``"resnet"``), ``activation`` their nonlinearity (``None``: the architecture's own,
    see ``ACTIVATIONS``), ``hidden`` the width of the conv nets' features before the heads and after the decoders'
    first linear layer (``None``: each net's own: 512, 400 for MNIST, 128 for SVHN). ``latent_dim`` counts every
    encoder output, the last ``private_dim`` of them modality-specific latents: the ResNet image encoders give those
    a trunk of their own (``SeparatePrivateEncoder``, as the MMVAE+ code does); the conv and text encoders give
    them heads on their one trunk (as the MoPoE code's encoders with style latents do)."""
    for name, value, least in (("latent_dim", latent_dim, 1), ("private_dim", private_dim, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}")
    if architecture not in IMAGE_NETWORKS:
        raise ValueError(f"architecture must be one of {sorted(IMAGE_NETWORKS)}, got {architecture!r}")
    check_activation(architecture, activation)
    check_hidden(architecture, hidden)
    # the architecture's own, which the text nets take too: the ResNets' leaky ReLUs make theirs leaky
    activation = ACTIVATIONS[architecture][0] if activation is None else activation
    width = {} if hidden is None else {"hidden": hidden}
    known = IMAGE_NETWORKS[architecture]
    constructors = []
    for modality in modalities:
        if modality.is_text:
            text = {"length": modality.shape[0], "vocabulary_size": len(modality.vocabulary)}
            constructors.append((functools.partial(text_encoder, **text), functools.partial(text_decoder, **text)))
        elif tuple(modality.shape) in known:
            constructors.append(known[tuple(modality.shape)])
        else:
            raise ValueError(f"no {architecture} networks for modality {modality.name!r} of shape "
                             f"{tuple(modality.shape)}; image shapes with {architecture} networks: {sorted(known)}")
    # every encoder, then every decoder: the order the random initialisation has always been drawn in, so runs
    # (and the numbers in docs/results.md) reproduce across versions
    if not 0 <= private_dim < latent_dim:
        raise ValueError(f"private_dim must lie in [0, latent_dim = {latent_dim}), got {private_dim!r}")

    def encoder_of(encoder, modality):
        if private_dim and architecture == "resnet" and not modality.is_text:
            return SeparatePrivateEncoder(encoder(latent_dim - private_dim), encoder(private_dim))
        return encoder(latent_dim, **width)

    encoders = nn.ModuleList(encoder_of(encoder, m) for (encoder, _), m in zip(constructors, modalities))
    decoders = nn.ModuleList(decoder(latent_dim, **width) for _, decoder in constructors)
    if activation == "leaky_relu":
        _leaky_relus(encoders)
        _leaky_relus(decoders)
    return encoders, decoders


def _leaky_relus(net: nn.Module) -> None:
    """Swap every ``nn.ReLU`` of ``net`` for a leaky ReLU of slope 0.2, in place."""
    for module in net.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.LeakyReLU(0.2))
