"""Typed configuration (OmegaConf structured configs): presets are YAML files in ``presets/``, overridden with
``--set key=value``. Unknown presets and keys, and values of the wrong type, are errors before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

PRESETS = Path(__file__).resolve().parent / "presets"


@dataclass
class DataConfig:
    #: "polymnist", "mnist_svhn_text", "celeba" or "cub" (see data.DATASETS)
    dataset: str = "polymnist"
    root: str = "data/polymnist"
    #: build the offline PolyMNIST at ``root`` if nothing is there
    build_offline: bool = True
    num_modalities: int = 5
    #: probability of dropping each modality per training sample (at least one is kept)
    drop_rate: float = 0.0
    #: use only the first N training tuples (None: all)
    train_subset: int | None = None


@dataclass
class ModelConfig:
    name: str = "helvae"
    #: image networks: "conv" (the MoPoE code's) or "resnet" (the MMVAE+ code's, used by the HELVAE paper)
    architecture: str = "conv"
    #: the nets' nonlinearity: None (the architecture's own: ReLU for conv, leaky ReLU for resnet) or, for conv,
    #: "relu" or "leaky_relu" (slope 0.2)
    activation: str | None = None
    latent_dim: int = 512
    beta: float = 2.5
    alpha: float = 0.5
    learnable_weights: bool = False
    #: the decoders' fixed-scale likelihood: "laplace" (the papers') or "normal" (learns digits faster)
    likelihood: str = "laplace"
    likelihood_scale: float = 0.75
    #: MMVAE, MMVAE+: importance samples per modality and the bound ("elbo", "iwae" or "dreg")
    num_samples: int = 1
    estimator: str = "elbo"
    #: MMVAE+: size of each modality-specific latent (latent_dim is the shared one)
    private_dim: int = 0


@dataclass
class TrainConfig:
    epochs: int = 300
    batch_size: int = 256
    lr: float = 5e-4
    seed: int = 0
    #: "auto" (CUDA when available), "cpu" or "cuda"
    device: str = "auto"
    #: stop after this many optimiser steps or minutes (None: no limit), checkpointing first
    max_steps: int | None = None
    max_minutes: float | None = None
    checkpoint_every: int = 1
    num_threads: int | None = None
    #: "fp32", or "bf16" for autocast of the networks (aggregation, KL and likelihoods stay in float32)
    precision: str = "fp32"
    #: compile the encoders and decoders with torch.compile
    compile: bool = False
    #: write TensorBoard event files in the run folder
    tensorboard: bool = True
    #: measure conditional coherence on the test split when training ends, and write report.md
    evaluate_at_end: bool = False


@dataclass
class EvalConfig:
    #: evaluate on the first N test tuples (None: the whole test split)
    test_examples: int | None = None
    #: conditioning subsets for coherence and probes: "all" non-empty subsets, or "single" (each modality
    #: alone, and all of them)
    subsets: str = "all"
    unconditional_samples: int = 1000
    #: importance samples K and test tuples for the log-likelihoods
    likelihood_samples: int = 12
    likelihood_examples: int = 1000
    #: training tuples for the latent probe (-1: the whole training split)
    probe_examples: int = 500
    #: generated samples per FID (0: skip FID); an Inception file, TorchScript or pytorch-fid's .pth
    #: (empty: the checked default)
    fid_samples: int = 0
    fid_weights: str = ""
    seed: int = 0


@dataclass
class Config:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs"


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load_config(preset: str | None = None, overrides=(), path: str | Path | None = None) -> Config:
    """The preset (or a YAML file ``path``) merged over the defaults, then the ``key=value`` overrides."""
    schema = OmegaConf.structured(Config)
    layers = [schema]
    if preset is not None:
        file = PRESETS / f"{preset}.yaml"
        if not file.is_file():
            raise ValueError(f"unknown preset {preset!r}; available: {', '.join(available_presets())}")
        layers.append(OmegaConf.load(file))
    if path is not None:
        layers.append(OmegaConf.load(path))
    try:
        config = OmegaConf.merge(*layers, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as error:
        raise ValueError(f"invalid configuration: {error}".split("\n    full_key")[0]) from None
    _check(config)
    return OmegaConf.to_object(config)


def _check(config) -> None:
    from .data import DATASETS
    from .models import check_options
    from .networks import check_activation

    if config.data.dataset not in DATASETS:
        raise ValueError(f"data.dataset must be one of {sorted(DATASETS)}, got {config.data.dataset!r}")
    model = config.model
    try:
        check_options(model.name, model.alpha, model.learnable_weights, model.num_samples, model.estimator,
                      model.likelihood, model.likelihood_scale, model.private_dim)
    except ValueError as error:
        raise ValueError(f"invalid model options: {error}") from None
    if model.architecture not in ("conv", "resnet"):
        raise ValueError(f"model.architecture must be 'conv' or 'resnet', got {model.architecture!r}")
    try:
        check_activation(model.architecture, model.activation)
    except ValueError as error:
        raise ValueError(f"model.{error}") from None
    for key in ("epochs", "batch_size", "checkpoint_every"):
        if getattr(config.train, key) < 1:
            raise ValueError(f"train.{key} must be a positive integer, got {getattr(config.train, key)}")
    if config.train.lr <= 0:
        raise ValueError(f"train.lr must be positive, got {config.train.lr}")
    if config.train.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device must be 'auto', 'cpu' or 'cuda', got {config.train.device!r}")
    if config.train.precision not in ("fp32", "bf16"):
        raise ValueError(f"train.precision must be 'fp32' or 'bf16', got {config.train.precision!r}")
    if config.eval.subsets not in ("all", "single"):
        raise ValueError(f"eval.subsets must be 'all' or 'single', got {config.eval.subsets!r}")
    for key in ("unconditional_samples", "likelihood_samples", "likelihood_examples"):
        if getattr(config.eval, key) < 1:
            raise ValueError(f"eval.{key} must be a positive integer, got {getattr(config.eval, key)}")
    if config.eval.fid_samples < 0 or config.eval.fid_samples == 1:
        raise ValueError(f"eval.fid_samples must be 0 (skip) or at least 2, got {config.eval.fid_samples}")
    if config.eval.probe_examples != -1 and config.eval.probe_examples < 10:
        raise ValueError(f"eval.probe_examples must be -1 (all) or at least 10, got {config.eval.probe_examples}")
    if not 0 <= config.data.drop_rate < 1:
        raise ValueError(f"data.drop_rate must lie in [0, 1), got {config.data.drop_rate}")


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
