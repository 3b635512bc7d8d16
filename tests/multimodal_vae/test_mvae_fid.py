"""FID: the Fréchet distance against independent computations, loud failures, and the real Inception weights."""

import numpy as np
import pytest
import torch
from tiny_runs import WHEEL_CACHE

from applications.multimodal_vae.evaluation.fid import (
    FIDError,
    InceptionFeatures,
    default_weights,
    fid_from_features,
    frechet_distance,
    kid_from_features,
    random_subsets,
    statistics,
)


def random_covariance(rng, d, scale):
    a = rng.normal(size=(d, d)) * scale
    return a @ a.T + 0.1 * np.eye(d)


def test_diagonal_gaussians_match_the_closed_form():
    mean_a, mean_b = np.array([0.0, 1.0, -2.0]), np.array([0.5, -1.0, 3.0])
    var_a, var_b = np.array([0.2, 3.0, 1.5]), np.array([4.0, 0.1, 1.5])
    expected = ((mean_a - mean_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert frechet_distance(mean_a, np.diag(var_a), mean_b, np.diag(var_b)) == pytest.approx(expected, rel=1e-12)


def test_general_covariances_match_the_symmetric_square_root_form():
    rng = np.random.default_rng(0)
    cov_a, cov_b = random_covariance(rng, 6, 1.0), random_covariance(rng, 6, 0.3)
    mean_a, mean_b = rng.normal(size=6), rng.normal(size=6)
    # tr (C_a C_b)^(1/2) = tr (C_a^(1/2) C_b C_a^(1/2))^(1/2), computed with symmetric eigendecompositions only
    w, v = np.linalg.eigh(cov_a)
    half = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(half @ cov_b @ half)
    expected = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(inner).sum()
    assert frechet_distance(mean_a, cov_a, mean_b, cov_b) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mean_b, cov_b, mean_a, cov_a) == pytest.approx(expected, rel=1e-10)


def test_a_set_against_itself_is_zero_within_rounding():
    features = np.random.default_rng(1).normal(size=(500, 20)) @ np.random.default_rng(2).normal(size=(20, 20))
    mean, cov = statistics(features)
    assert frechet_distance(mean, cov, mean, cov) < 1e-9 * np.trace(cov)


def scipy_fid(a, b):
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)) with numpy's covariances and scipy's sqrtm."""
    from scipy import linalg

    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_the_low_rank_shortcut_equals_the_matrix_square_root():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(12, 40)) @ rng.normal(size=(40, 40))
    b = rng.normal(size=(9, 40)) * 2 + 1
    assert fid_from_features(a, b) == pytest.approx(scipy_fid(a, b), rel=1e-6)
    assert fid_from_features(a, a) < 1e-9 * np.trace(statistics(a)[1])
    many_a, many_b = rng.normal(size=(300, 5)), rng.normal(size=(200, 5)) + 0.5  # n > d: the direct path
    assert fid_from_features(many_a, many_b) == pytest.approx(scipy_fid(many_a, many_b), rel=1e-10)
    with pytest.raises(FIDError, match="features_b has non-finite entries"):
        fid_from_features(a, np.full((3, 40), np.inf))


def test_failures_are_loud():
    eye = np.eye(2)
    with pytest.raises(FIDError, match="cov_a has non-finite entries"):
        frechet_distance(np.zeros(2), np.array([[np.nan, 0], [0, 1]]), np.zeros(2), eye)
    with pytest.raises(FIDError, match="imaginary parts"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), eye)  # not a covariance
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(np.zeros(2), eye, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"features must be \(N >= 2, d\)"):
        statistics(np.zeros((1, 4)))


def test_the_real_inception_weights_load_offline_and_are_deterministic():
    weights = default_weights(WHEEL_CACHE)
    with pytest.raises(FileNotFoundError, match="weights: no Inception weights file"):
        InceptionFeatures(weights.with_name("missing.pt"))
    inception = InceptionFeatures(weights, batch_size=2)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 28, 28), dtype=torch.uint8, generator=g)
    features = inception(images)
    assert features.shape == (3, 2048) and features.dtype == np.float64 and np.isfinite(features).all()
    assert (features >= 0).all()  # pool features follow a ReLU
    again = InceptionFeatures(weights, batch_size=3)(images)  # other batching, same features (eval mode)
    np.testing.assert_allclose(again, features, rtol=1e-4, atol=1e-5)
    assert not np.allclose(features[0], features[1])
    floats = images.float() / 255  # float images are quantised to the same bytes
    np.testing.assert_allclose(inception(floats), features, rtol=1e-5, atol=1e-6)
    floats[1, 0, 3, 4] = float("nan")  # was quantised to a black pixel, and the features came out finite
    with pytest.raises(ValueError, match=r"images must be finite, got 1 non-finite pixel\(s\) in a tensor of shape "
                                         r"\(3, 3, 28, 28\)"):
        inception(floats)


def _copying_model_and_data(count=6):
    """Three modalities showing the same images, and a model whose every subset copies them exactly (encoders
    flatten the image with a near-zero variance, decoders unflatten)."""
    from torch import nn

    from applications.multimodal_vae.data import MultimodalDataset, polymnist_modalities
    from applications.multimodal_vae.models import MultimodalVAE

    class Flatten(nn.Module):
        def forward(self, x):
            flat = x.reshape(x.shape[0], -1)
            return flat, torch.full_like(flat, -40.0)

    class Unflatten(nn.Module):
        def forward(self, z):
            return z.reshape(z.shape[:-1] + (3, 28, 28))

    torch.set_default_dtype(torch.float32)
    model = MultimodalVAE(nn.ModuleList(Flatten() for _ in range(3)), nn.ModuleList(Unflatten() for _ in range(3)))
    g = torch.Generator().manual_seed(0)
    one = torch.randint(0, 256, (count, 3, 28, 28), dtype=torch.uint8, generator=g)
    # every modality shows the same image: every subset copies it
    return model, MultimodalDataset(polymnist_modalities(3), [one] * 3, torch.zeros(count, dtype=torch.long))


def test_fid_scores_of_a_copying_generator(tmp_path):
    """Conditional generations that copy the real images exactly have FID 0; prior noise does not."""
    from types import SimpleNamespace

    from applications.multimodal_vae.evaluation.fid import fid_scores

    model, data = _copying_model_and_data()
    settings = SimpleNamespace(fid_samples=6, fid_weights=str(default_weights(WHEEL_CACHE)), seed=0)
    scores = fid_scores(model, data, data, settings, tmp_path)
    assert scores["samples"] == 6 and set(scores["per_size"]) == {1, 2}
    assert scores["per_size"][1] < 1e-3 and scores["per_size"][2] < 1e-3
    assert scores["unconditional"] > 10
    # KID of copies is the unbiased estimate for identical sets: -2 mean_{i != j} k(x_i, x_j) / n + ..., near 0
    assert abs(scores["kid_per_size"][1]) < 0.2 * scores["kid_unconditional"]
    assert scores["kid_unconditional"] > 0
    # the jackknife standard errors over the six tuples: finite, and the noise's KID is not within one of zero
    error = scores["kid_unconditional_standard_error"]
    assert 0 < error < scores["kid_unconditional"] and set(scores["kid_per_size_standard_error"]) == {1, 2}


def test_fid_scores_encode_in_batches_with_the_same_results(tmp_path, monkeypatch):
    """The conditioning tuples are encoded ``ENCODE_BATCH`` at a time (10 000 tuples of five modalities in one pass
    of the papers' ResNets hold several GB per layer): batches of 4 and 1 give the scores of one pass."""
    from types import SimpleNamespace

    from applications.multimodal_vae.evaluation import fid

    model, data = _copying_model_and_data()
    settings = SimpleNamespace(fid_samples=6, fid_weights=str(default_weights(WHEEL_CACHE)), seed=0)
    calls = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda x: calls.append(x[0].shape[0]) or encode(x))
    whole = fid.fid_scores(model, data, data, settings, tmp_path)
    for size, expected in ((4, [4, 2]), (1, [1] * 6)):
        monkeypatch.setattr(fid, "ENCODE_BATCH", size)
        calls.clear()
        assert fid.fid_scores(model, data, data, settings, tmp_path) == whole
        assert calls == expected


class CountingFeatures:
    """A stand-in for ``InceptionFeatures`` that records its calls: the 147 means of 4x4 pixel blocks per channel
    of the 8-bit images (cheap, and equal for equal images). ``real`` counts the calls on uint8 images (the real
    features; generations come as floats)."""

    real = 0
    generated = 0

    def __init__(self, weights, device="cpu", batch_size=100):
        self.weights = weights

    def __call__(self, images):
        if images.is_floating_point():
            CountingFeatures.generated += 1
            images = (images.clamp(0, 1) * 255).round()
        else:
            CountingFeatures.real += 1
        pooled = torch.nn.functional.avg_pool2d(images.double(), 4)
        return pooled.reshape(images.shape[0], -1).numpy()


@pytest.fixture
def counting_inception(monkeypatch, tmp_path):
    """``fid_scores`` with ``CountingFeatures`` and an empty per-process memo; yields a weights file."""
    from applications.multimodal_vae.evaluation import fid

    monkeypatch.setattr(fid, "InceptionFeatures", CountingFeatures)
    monkeypatch.setattr(fid, "_REAL_FEATURES", {})
    CountingFeatures.real = CountingFeatures.generated = 0
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"first weights")
    return weights


def test_fid_sizes_choose_the_conditioning_sizes_scored(counting_inception, tmp_path):
    """Only the requested numbers of inputs are scored (and pay an Inception pass); None scores all 1 .. M-1."""
    from types import SimpleNamespace

    from applications.multimodal_vae.evaluation.fid import fid_scores

    model, data = _copying_model_and_data()
    for sizes, expected in ((None, {1, 2}), ([2], {2}), ([], set())):
        CountingFeatures.generated = 0
        settings = SimpleNamespace(fid_samples=6, fid_weights=str(counting_inception), seed=0, fid_sizes=sizes)
        scores = fid_scores(model, data, data, settings, tmp_path)
        assert set(scores["per_size"]) == expected and set(scores["kid_per_size"]) == expected
        assert CountingFeatures.generated == 3 * (1 + len(expected))  # 3 image targets: unconditional + sizes
        assert all(scores["per_size"][k] < 1e-6 for k in expected)  # copies: the same features
    for bad in ([0], [3], [1, 1]):
        settings = SimpleNamespace(fid_samples=6, fid_weights=str(counting_inception), seed=0, fid_sizes=bad)
        with pytest.raises(ValueError, match="fid_sizes must be distinct integers in \\[1, 2\\]"):
            fid_scores(model, data, data, settings, tmp_path)


def test_real_features_are_stored_once_and_recomputed_when_stale_or_corrupted(counting_inception, tmp_path):
    """The real features go to the feature cache on the first call and are read back on the next (also in a new
    process: the memo is emptied); other n or other weights make other files; a corrupted file or one with
    features of the wrong shape is recomputed, not trusted."""
    from types import SimpleNamespace

    from applications.multimodal_vae.evaluation import fid
    from applications.multimodal_vae.files import save_checked

    model, data = _copying_model_and_data()
    store = tmp_path / "features"

    def run(samples=6, expect_real=0):
        fid._REAL_FEATURES.clear()  # as in a fresh process
        CountingFeatures.real = 0
        settings = SimpleNamespace(fid_samples=samples, fid_weights=str(counting_inception), seed=0, fid_sizes=[])
        scores = fid.fid_scores(model, data, data, settings, tmp_path, feature_cache=store, source="tiny, test")
        assert CountingFeatures.real == expect_real
        return scores

    first = run(expect_real=3)  # one per image target
    files = sorted(store.glob("*.pt"))
    assert len(files) == 3
    assert run(expect_real=0) == first
    run(samples=5, expect_real=3)  # other tuples: other files
    assert len(list(store.glob("*.pt"))) == 6
    counting_inception.write_bytes(b"other weights")
    run(samples=5, expect_real=3)
    assert len(list(store.glob("*.pt"))) == 9
    counting_inception.write_bytes(b"first weights")
    assert run(expect_real=0) == first
    files[0].write_bytes(b"not a tensor file")
    save_checked(files[1], {"features": torch.zeros(5, 147, dtype=torch.float64), "key": {}})
    with pytest.warns(UserWarning, match="computing the real Inception features again"):
        assert run(expect_real=2) == first
    assert run(expect_real=0) == first  # rewritten


def paired_mmd2_by_loops(a, b):
    """Gretton et al.'s MMD_u of paired samples: the mean over i != j of k(a_i, a_j) + k(b_i, b_j) - k(a_i, b_j) -
    k(a_j, b_i), term by term under scikit-learn's polynomial kernel."""
    from sklearn.metrics.pairwise import polynomial_kernel

    k = polynomial_kernel(np.concatenate([a, b]), degree=3, gamma=1 / a.shape[1], coef0=1)
    n = len(a)
    return sum(k[i, j] + k[n + i, n + j] - k[i, n + j] - k[j, n + i]
               for i in range(n) for j in range(n) if i != j) / (n * (n - 1))


def unbiased_mmd2_by_loops(a, b):
    """The unbiased squared MMD under scikit-learn's polynomial kernel (gamma 1/d, coef0 1, degree 3), term by term."""
    from sklearn.metrics.pairwise import polynomial_kernel

    def kernel(x, y):
        return polynomial_kernel(x, y, degree=3, gamma=1 / a.shape[1], coef0=1)

    n, m = len(a), len(b)
    k_aa, k_bb, k_ab = kernel(a, a), kernel(b, b), kernel(a, b)
    within_a = sum(k_aa[i, j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    within_b = sum(k_bb[i, j] for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    return within_a + within_b - 2 * k_ab.mean()


def test_kid_is_the_unbiased_mmd_of_the_cubic_polynomial_kernel():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(30, 7))
    b = 0.8 * rng.normal(size=(30, 7)) + 0.3
    mean, std = kid_from_features(a, b, subsets=3, subset_size=1000)  # subsets of everything: one estimate
    assert mean == pytest.approx(unbiased_mmd2_by_loops(a, b), rel=1e-12) and std == pytest.approx(0, abs=1e-15)
    # averaging over random subsets is unbiased for the full-set estimate: within the error bar of the subset mean
    mean, std = kid_from_features(a, b, subsets=4000, subset_size=10, seed=1)
    assert abs(mean - unbiased_mmd2_by_loops(a, b)) < 4 * std / np.sqrt(4000)


def test_paired_kid_leaves_out_the_dependent_pairs():
    """Generations scored against the real tuples they were drawn for: a_i and b_i dependent, both N(0, I), so the
    squared MMD is 0. The mean of all n^2 cross terms counts the n dependent pairs and came out 0.04 low (over 200
    draws, 200 standard errors); the paired estimator is Gretton et al.'s MMD_u, unbiased."""
    rng = np.random.default_rng(6)
    a = rng.normal(size=(9, 4))
    b = 0.7 * a + rng.normal(size=(9, 4))
    mean, std = kid_from_features(a, b, paired=True)
    assert mean == pytest.approx(paired_mmd2_by_loops(a, b), rel=1e-12) and std == 0
    paired, unpaired = [], []
    for _ in range(200):
        a = rng.normal(size=(200, 32))
        b = 0.7 * a + np.sqrt(1 - 0.49) * rng.normal(size=(200, 32))
        paired.append(kid_from_features(b, a, paired=True)[0])
        unpaired.append(kid_from_features(b, a)[0])
    for estimates, unbiased in ((paired, True), (unpaired, False)):
        z = np.mean(estimates) / (np.std(estimates, ddof=1) / np.sqrt(len(estimates)))
        assert (abs(z) < 4) == unbiased, z
    # subsets of paired sets keep the pairs: the mean over them is unbiased for the whole sets' estimate
    a, b = rng.normal(size=(40, 5)), rng.normal(size=(40, 5))
    b = 0.5 * a + b
    mean, std = kid_from_features(a, b, subsets=3000, subset_size=10, seed=2, paired=True)
    assert abs(mean - paired_mmd2_by_loops(a, b)) < 4 * std / np.sqrt(3000)
    with pytest.raises(ValueError, match="paired KID needs two sets of the same size, got 40 and 39"):
        kid_from_features(a, b[:39], paired=True)


def test_kid_separates_distributions_and_is_near_zero_for_alike_ones():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    alike, spread = kid_from_features(a, b, subsets=50, subset_size=100)
    shifted, _ = kid_from_features(a, b + 0.5, subsets=50, subset_size=100)
    assert abs(alike) < 3 * spread
    assert shifted > 10 * spread


def test_kid_rejects_bad_arguments():
    a = np.zeros((5, 3))
    with pytest.raises(ValueError, match="subsets must be a positive integer, got 0"):
        kid_from_features(a, a, subsets=0)
    with pytest.raises(ValueError, match="subset_size must be a positive integer, got 2.5"):
        kid_from_features(a, a, subset_size=2.5)
    with pytest.raises(ValueError, match="feature dimensions differ: 3 and 4"):
        kid_from_features(a, np.zeros((5, 4)))
    with pytest.raises(FIDError, match="features_b has non-finite entries"):
        kid_from_features(a, np.full((5, 3), np.nan))


def test_random_subsets_exclude_the_target_and_are_uniform():
    mask = random_subsets(5, 40_000, 2, exclude=3, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (5, 40_000) and (mask.sum(0) == 2).all() and not mask[3].any()
    frequency = mask.double().mean(1)  # each of the 4 others is in a 2-subset with probability 1/2
    assert torch.allclose(frequency[[0, 1, 2, 4]], torch.full((4,), 0.5), atol=4 * (0.25 / 40_000) ** 0.5)
    pairs = {tuple(col.nonzero().squeeze(-1).tolist()) for col in mask.T[:500]}
    assert len(pairs) == 6  # all C(4, 2) subsets occur
    # a target outside the modalities left every modality in the draw but drew from M - 1 columns (the last never
    # chosen); a size above M - 1 was cut to M - 1
    for arguments, message in (((5, 10, 2, -1), r"exclude must be an integer in \[0, 4\] for 5 modalities, got -1"),
                               ((5, 10, 2, 5), "exclude .* got 5"), ((5, 10, 7, 0), r"size must .*\[1, 4\].* got 7"),
                               ((5, 10, 0, 0), "size .* got 0"), ((5, 10, 2.0, 0), "size .* got 2.0")):
        with pytest.raises(ValueError, match=message):
            random_subsets(*arguments)


def _pytorch_fid_state_dict(torchscript: torch.jit.ScriptModule) -> dict:
    """The TorchScript file's TensorFlow-named weights renamed into pytorch-fid's (torchvision's) layout, written
    here from the two graphs' block structure, independently of ``inception.py``."""
    stem = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
            "conv_4": "Conv2d_4a_3x3"}
    block_a = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
               "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
               "tower_2.conv": "branch_pool"}
    block_b = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
               "tower.conv_2": "branch3x3dbl_3"}
    block_c = {"conv": "branch1x1", "tower_2.conv": "branch_pool",
               **{f"tower.{c}": f"branch7x7_{i + 1}" for i, c in enumerate(["conv", "conv_1", "conv_2"])},
               **{f"tower_1.{c}": f"branch7x7dbl_{i + 1}"
                  for i, c in enumerate(["conv", "conv_1", "conv_2", "conv_3", "conv_4"])}}
    block_d = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
               **{f"tower_1.{c}": f"branch7x7x3_{i + 1}" for i, c in enumerate(["conv", "conv_1", "conv_2", "conv_3"])}}
    block_e = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
               "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
               "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
               "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
    blocks = dict(zip(["mixed"] + [f"mixed_{i}" for i in range(1, 11)],
                      [("Mixed_5b", block_a), ("Mixed_5c", block_a), ("Mixed_5d", block_a), ("Mixed_6a", block_b),
                       ("Mixed_6b", block_c), ("Mixed_6c", block_c), ("Mixed_6d", block_c), ("Mixed_6e", block_c),
                       ("Mixed_7a", block_d), ("Mixed_7b", block_e), ("Mixed_7c", block_e)]))
    tensors = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}
    state = {}
    for key, value in torchscript.state_dict().items():
        path, tensor = key.removeprefix("net.layers.").rsplit(".", 1)
        block, _, rest = path.partition(".")
        name = stem[path] if path in stem else f"{blocks[block][0]}.{blocks[block][1][rest]}"
        state[f"{name}.{tensors[tensor]}"] = value
        if tensor == "beta":  # TensorFlow's batch norm has no scale
            state[f"{name}.bn.weight"] = torch.ones_like(value)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # pytorch-fid's classifier
    return state


def test_pytorch_fid_weights_give_the_features_of_the_same_network_in_torchscript(tmp_path):
    """The default TorchScript file and pytorch-fid's file hold the same TensorFlow weights: renamed into pytorch-fid's
    layout and run through ``FIDInceptionV3`` they must give the TorchScript's features (same input scaling)."""
    weights = default_weights(WHEEL_CACHE)
    state = _pytorch_fid_state_dict(torch.jit.load(str(weights)))
    pth = tmp_path / "pt_inception-2015-12-05.pth"
    torch.save(state, pth)
    from applications.multimodal_vae.evaluation.fid import is_torchscript
    from applications.multimodal_vae.evaluation.inception import load_pytorch_fid

    assert is_torchscript(weights) and not is_torchscript(pth)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 299, 299, generator=g, dtype=torch.float32) * 2 - 1
    expected = torch.jit.load(str(weights))(x)
    got = load_pytorch_fid(pth)(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    images = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8, generator=g)
    # through InceptionFeatures the two files differ only in the input scaling (127.5 vs 128): close, not equal
    a, b = InceptionFeatures(weights)(images), InceptionFeatures(pth)(images)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max() and not np.array_equal(a, b)

    broken = dict(state)
    del broken["Mixed_7c.branch_pool.bn.running_var"]
    broken["extra.weight"] = torch.zeros(1)
    torch.save(broken, pth)
    with pytest.raises(ValueError, match=r"missing \['Mixed_7c.branch_pool.bn.running_var'\], unknown \['extra.weight'\]"):
        InceptionFeatures(pth)


def test_the_default_file_runs_as_the_folded_network_with_the_features_of_its_torchscript_graph():
    """The fid-helper file is converted to ``FIDInceptionV3`` with its batch norms folded (faster on the CPU); its
    features must be the TorchScript graph's on the same inputs, scaled here by hand."""
    from torch import nn

    from applications.multimodal_vae.evaluation.inception import FIDInceptionV3

    weights = default_weights(WHEEL_CACHE)
    inception = InceptionFeatures(weights)
    assert isinstance(inception.network, FIDInceptionV3)
    assert not any(isinstance(module, nn.BatchNorm2d) for module in inception.network.modules())
    images = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    x = torch.nn.functional.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = torch.jit.load(str(weights))((x - 128) / 128).double().numpy()
    np.testing.assert_allclose(inception(images), expected, rtol=1e-4, atol=1e-4)


def test_other_torchscript_files_are_refused_not_run(tmp_path):
    class ChannelMeans(torch.nn.Module):
        def forward(self, x):
            return x.mean((2, 3)).repeat(1, 683)[:, :2048]

    path = tmp_path / "other.pt"
    torch.jit.save(torch.jit.script(ChannelMeans()), str(path))
    with pytest.raises(ValueError, match=r"weights: .*other\.pt is a TorchScript file without the fid-helper"):
        InceptionFeatures(path)


def test_fid_helper_tensors_of_the_wrong_shape_are_not_that_layout():
    """``from_fid_helper`` returns None for tensors not in the fid-helper layout; with the right names but a tensor
    of another shape it raised load_state_dict's size mismatch (so the weights file got no clear refusal). The
    layout is built from the network's own state under the fid-helper names, which round-trips exactly."""
    from applications.multimodal_vae.evaluation import inception

    state = inception.FIDInceptionV3().float().eval().state_dict()
    names = {ours: theirs for theirs, ours in inception._FID_HELPER_TENSORS.items()}
    tensors = {}
    for path, name in inception._FID_HELPER_STEM.items():
        tensors.update({f"net.layers.{path}.{theirs}": state[f"{name}.{ours}"] for ours, theirs in names.items()})
    for block, (ours_block, layers) in inception._FID_HELPER_BLOCKS.items():
        for layer, branch in layers.items():
            tensors.update({f"net.layers.{block}.{layer}.{theirs}": state[f"{ours_block}.{branch}.{ours}"]
                            for ours, theirs in names.items()})
    network = inception.from_fid_helper(tensors)
    assert network is not None
    assert all(torch.equal(value, network.state_dict()[key]) for key, value in state.items()
               if not key.endswith(("num_batches_tracked", "bn.weight")))
    key = next(k for k in tensors if k.endswith(".weight") and tensors[k].dim() == 4)
    tensors[key] = tensors[key][..., :1, :1].clone()
    assert inception.from_fid_helper(tensors) is None


class _Nested(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.linear = torch.nn.Linear(3, 5).double()
        self.register_buffer("counts", torch.arange(6, dtype=torch.int64).reshape(2, 3))
        self.register_buffer("transposed", torch.randn(4, 3, generator=g).t())  # not contiguous
        self.inner = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))
        self.register_buffer("empty", torch.zeros(0))

    def forward(self, x):
        return self.inner(x)


def test_torchscript_tensors_are_those_torch_loads_without_running_the_file(tmp_path):
    """Names, dtypes, shapes, strides and values against ``torch.jit.load(...).state_dict()``: the default file
    and a module with nested submodules, float64 and int64 tensors, a transposed buffer and an empty one."""
    from applications.multimodal_vae.evaluation.inception import torchscript_tensors

    nested = tmp_path / "nested.pt"
    torch.jit.save(torch.jit.script(_Nested()), str(nested))
    for path in (default_weights(WHEEL_CACHE), nested):
        expected, got = torch.jit.load(str(path)).state_dict(), torchscript_tensors(path)
        assert got.keys() == expected.keys() and len(got) > 5
        for name, value in expected.items():
            assert got[name].dtype == value.dtype and got[name].stride() == value.stride(), name
            torch.testing.assert_close(got[name], value, rtol=0, atol=0)
    assert not torchscript_tensors(nested)["transposed"].is_contiguous()


def _archive(path, payload: bytes):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/constants.pkl", b"")


class _Writes:
    """Unpickles by calling ``exec``: what a crafted weights file could do under ``torch.jit.load`` or pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_a_weights_file_that_would_run_code_is_refused_before_running_it(tmp_path):
    import pickle

    from applications.multimodal_vae.evaluation.inception import torchscript_tensors

    marker, path = tmp_path / "ran.txt", tmp_path / "crafted.pt"
    _archive(path, pickle.dumps({"weight": _Writes(marker)}, protocol=2))
    with pytest.raises(ValueError, match=r"crafted\.pt: not a TorchScript file .*\.exec is not allowed"):
        InceptionFeatures(path)
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Writes(marker)))  # the payload does run when unpickled without restrictions
    assert marker.read_text() == "ran"

    _archive(path, pickle.dumps([1, 2], protocol=2))
    with pytest.raises(ValueError, match="not a TorchScript module"):
        torchscript_tensors(path)
    _archive(path, b"\x80\x02corrupt")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        torchscript_tensors(path)


class _Pickler:
    """Writes ``data.pkl`` payloads by hand: objects of a ``__torch__`` class (as TorchScript's) and tensors rebuilt
    from storage ``"0"`` with any geometry, for files ``torch.jit.save`` would never write."""

    class Module:
        pass

    class Tensor:
        def __init__(self, size, stride):
            self.size, self.stride = size, stride

        def __reduce__(self):
            import collections

            return torch._utils._rebuild_tensor_v2, (_Pickler.storage, 0, self.size, self.stride, False,
                                                     collections.OrderedDict())

    storage = object()

    @classmethod
    def dumps(cls, root, monkeypatch) -> bytes:
        import io
        import pickle
        import types

        module = types.ModuleType("__torch__")
        cls.Module.__module__, cls.Module.__qualname__, module.M = "__torch__", "M", cls.Module
        monkeypatch.setitem(__import__("sys").modules, "__torch__", module)

        class Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                return ("storage", torch.FloatStorage, "0", "cpu", 1) if obj is cls.storage else None

        buffer = io.BytesIO()
        Pickler(buffer, protocol=2).dump(root)
        return buffer.getvalue()


def test_crafted_tensors_and_compressed_members_are_refused_before_they_take_memory(tmp_path, monkeypatch):
    """A stride-0 tensor of 2^40 elements over a one-element storage (a 600-byte file that expanded to any size
    once ``from_fid_helper`` copied it), a deflated storage (which inflates a small file a thousandfold), and an
    attribute not named by a string (a ``TypeError`` before)."""
    import zipfile

    from applications.multimodal_vae.evaluation.inception import torchscript_tensors

    path = tmp_path / "crafted.pt"

    def write(root, compression=zipfile.ZIP_STORED):
        with zipfile.ZipFile(path, "w", compression=compression) as archive:
            archive.writestr("archive/data.pkl", _Pickler.dumps(root, monkeypatch))
            archive.writestr("archive/constants.pkl", b"")
            archive.writestr("archive/data/0", b"\x00\x00\x80\x3f")

    root = _Pickler.Module()
    root.weight = _Pickler.Tensor((2**40,), (0,))
    write(root)
    with pytest.raises(ValueError, match=r"a tensor of shape \(1099511627776,\) on a storage of 1 elements"):
        torchscript_tensors(path)
    root.weight = _Pickler.Tensor((1,), (1,))
    write(root)
    assert torchscript_tensors(path)["weight"].tolist() == [1.0]
    write(root, zipfile.ZIP_DEFLATED)
    with pytest.raises(ValueError, match="data.pkl is compressed"):
        torchscript_tensors(path)
    vars(root)[7] = vars(root).pop("weight")
    write(root)
    with pytest.raises(ValueError, match="an attribute named 7, not by a string"):
        torchscript_tensors(path)


def test_pytorch_fid_weights_saved_on_a_gpu_load_on_a_cpu(tmp_path, monkeypatch):
    """``torch.save`` tags a GPU tensor's storage with its device; the file must load where there is none."""
    from applications.multimodal_vae.evaluation.inception import FIDInceptionV3

    state = {k: v for k, v in FIDInceptionV3().state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "pt_inception.pth"
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, path)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)  # the file is tagged as intended
    network = InceptionFeatures(path, device="cpu").network
    assert next(network.parameters()).device.type == "cpu"


def test_folding_the_batch_norms_keeps_the_function():
    from applications.multimodal_vae.evaluation.inception import FIDInceptionV3, fold_batch_norms

    torch.manual_seed(0)
    network = FIDInceptionV3().float()
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # statistics far from the identity
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 2.0)
            module.bias.data.normal_()
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(network)
    x = torch.rand(1, 3, 107, 107, dtype=torch.float32) * 2 - 1
    with torch.no_grad():
        expected = network.eval()(x)
        got = fold_batch_norms(network)(x)
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in network.modules())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_kid_left_out_and_its_jackknife_error_against_brute_force_and_repeated_draws():
    """Each leave-one-out KID equals the estimate recomputed on the sets without that pair; and the jackknife
    standard error matches the spread of the KID over independent draws of both sets (within 15 %)."""
    from applications.multimodal_vae.evaluation.fid import jackknife_standard_error, kid_leave_one_out

    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(12, 5)), 0.9 * rng.normal(size=(12, 5)) + 0.2
    for paired, reference in ((False, unbiased_mmd2_by_loops), (True, paired_mmd2_by_loops)):
        left_out = kid_leave_one_out(a, b, paired=paired)
        brute = [reference(np.delete(a, i, 0), np.delete(b, i, 0)) for i in range(12)]
        np.testing.assert_allclose(left_out, brute, rtol=1e-11, atol=1e-14)
    with pytest.raises(ValueError, match="same size, at least 3"):
        kid_leave_one_out(a, b[:5])
    estimates, errors = [], []
    for _ in range(400):  # (the spread of 400 draws is known to about 4 %; the jackknife's bias is small at 100)
        a, b = rng.normal(size=(100, 4)), 0.8 * rng.normal(size=(100, 4)) + 0.3
        estimates.append(kid_from_features(a, b)[0])
        errors.append(jackknife_standard_error(kid_leave_one_out(a, b)))
    assert np.mean(errors) == pytest.approx(np.std(estimates, ddof=1), rel=0.15)
