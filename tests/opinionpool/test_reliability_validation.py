"""Validation holes (issue 13, section 4): each bad input raises a ValueError naming the argument and the value
before any work, instead of a NaN, a wrong axis, a hang or a MemoryError."""

import contextlib
import math
import signal

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal, Normal, Poisson

import opinionpool
import opinionpool.functional as opf
from opinionpool.families import ExponentialFamily, MultivariateNormalFamily, NormalFamily


@contextlib.contextmanager
def deadline(seconds):
    """Turn a hang into a failure: raise TimeoutError in the test after ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def two_normals():
    return [Normal(torch.tensor(0.0), torch.tensor(1.0)), Normal(torch.tensor(1.0), torch.tensor(2.0))]


def latents(m=3, batch=2, d=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(m, batch, d, generator=g), 0.3 * torch.randn(m, batch, d, generator=g)


# ------------------------------------------------------------------ functional: weights, masks, dim
def test_present_experts_all_of_zero_weight_raise():
    mu, logvar = latents()
    mask = torch.tensor([[True, True], [False, True], [True, True]])  # sample 0 lacks expert 1
    for pool in (opf.hellinger, opf.poe, opf.wasserstein_barycenter, lambda *a, **k: opf.moe(*a, **k).loc):
        with pytest.raises(ValueError, match=r"weights \[0, 1, 0\] give zero weight to every present expert "
                                             r"\(mask \[True, False, True\]\) of the sample at batch index \(0,\)"):
            pool(mu, logvar, weights=torch.tensor([0.0, 1.0, 0.0]), mask=mask)
    # a prior expert of zero weight does not help; one of positive weight does
    with pytest.raises(ValueError, match="give zero weight to every present expert"):
        opf.hellinger(mu, logvar, weights=torch.tensor([0.0, 1.0, 0.0, 0.0]), mask=mask, prior_expert=True)
    loc, lv = opf.hellinger(mu, logvar, weights=torch.tensor([0.0, 1.0, 0.0, 1.0]), mask=mask, prior_expert=True)
    assert torch.isfinite(loc).all() and torch.isfinite(lv).all()
    # sample 1 has expert 1 as its only expert of positive weight: the pool is that expert
    loc, lv = opf.hellinger(mu, logvar, weights=torch.tensor([0.0, 1.0, 0.0]), mask=torch.tensor([[True, True]] * 3))
    torch.testing.assert_close(loc, mu[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(lv, logvar[1], rtol=0, atol=1e-12)


def test_dim_out_of_range_is_refused_not_wrapped():
    mu, logvar = latents()  # (3, 2, 4): dim=4 used to wrap round onto dim=1, the batch axis
    for dim in (3, 4, -4, 7):
        with pytest.raises(ValueError, match=rf"dim={dim} is out of range for mu of shape \(3, 2, 4\) "
                                             r"\(dim must lie in \[-3, 2\]\)"):
            opf.hellinger(mu, logvar, dim=dim)
    with pytest.raises(ValueError, match=r"dim=4 is out of range"):
        opf.subset_mixture(opf.poe, mu, logvar, dim=4)
    with pytest.raises(ValueError, match=r"dim must be an integer axis of mu, got 1.0"):
        opf.poe(mu, logvar, dim=1.0)
    with pytest.raises(ValueError, match=r"dim=-1 is the latent \(last\) axis of mu of shape \(3, 2, 4\)"):
        opf.poe(mu, logvar, dim=-1)
    assert opf.hellinger(mu, logvar, dim=-3)[0].shape == (2, 4)


def test_subset_mixture_checks_weights():
    mu, logvar = latents()
    with pytest.raises(ValueError, match=r"weights must be non-negative and finite, got \[-1\]"):
        opf.subset_mixture(opf.hellinger, mu, logvar, weights=torch.tensor([-1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"weights must have 3 entries.*got shape \(2,\)"):
        opf.subset_mixture(opf.hellinger, mu, logvar, weights=torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="weights must be real"):
        opf.subset_mixture(opf.hellinger, mu, logvar, weights=torch.tensor([1.0, 1.0, 1j]))
    # the subset {0} of an expert of weight zero is 0/0
    with pytest.raises(ValueError, match=r"weights \[0, 1, 1\] give zero weight to every present expert of subset \[0\]"):
        opf.subset_mixture(opf.hellinger, mu, logvar, weights=torch.tensor([0.0, 1.0, 1.0]))
    subsets = torch.tensor([[False, True, False], [False, False, True]])
    mask = torch.tensor([[True, True], [False, True], [True, True]])  # sample 0: subset {1} is empty
    mixture = opf.subset_mixture(opf.hellinger, mu, logvar, weights=torch.tensor([0.0, 1.0, 1.0]), subsets=subsets,
                                 mask=mask)
    # sample 0 is expert 2 alone; the empty subset's stand-in must not be expert 0 (weight zero: NaN)
    z = torch.zeros(2, 4)
    expected = Normal(mu[2, 0], torch.exp(0.5 * logvar[2, 0])).log_prob(z[0]).sum()
    torch.testing.assert_close(mixture.log_prob(z)[0], expected, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(mixture.loc).all() and torch.isfinite(mixture.logvar).all()


def test_subset_mixture_caps_the_number_of_subsets():
    mu = torch.zeros(22, 1, 2)
    with deadline(10), pytest.raises(ValueError, match=r"all 2\^22 - 1 subsets of the 22 experts\) gives 4194303 "
                                                        r"subsets, more than max_subsets=65536.*raise max_subsets"):
        opf.subset_mixture(opf.poe, mu, mu)
    mu, logvar = latents()
    with pytest.raises(ValueError, match="gives 7 subsets, more than max_subsets=6"):
        opf.subset_mixture(opf.poe, mu, logvar, max_subsets=6)
    assert opf.subset_mixture(opf.poe, mu, logvar, max_subsets=7).loc.shape == (2, 7, 4)
    with pytest.raises(ValueError, match=r"num_experts=4 \(2\^4 - 1\) gives 15 subsets, more than max_subsets=14"):
        opf.all_subsets(4, max_subsets=14)
    assert opf.all_subsets(4, max_subsets=15).shape == (15, 4)
    with pytest.raises(ValueError, match="max_subsets must be a positive integer, got 0"):
        opf.subset_mixture(opf.poe, mu, logvar, max_subsets=0)


def test_functional_log_bhattacharyya_validates():
    zeros = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"logvar2 must be finite, got non-finite values \[nan, nan\] first at "
                                         r"index \(0, 2\)"):
        opf.log_bhattacharyya(zeros, zeros, zeros, zeros.index_fill(1, torch.tensor([2]), math.nan))
    with pytest.raises(ValueError, match=r"must broadcast together, got mu1 \(2, 3\), logvar1 \(2, 3\), mu2 \(4,\)"):
        opf.log_bhattacharyya(zeros, zeros, torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match=r"mu1 must be a tensor with a latent \(last\) axis, got float"):
        opf.log_bhattacharyya(0.0, zeros, zeros, zeros)
    opf.log_bhattacharyya(zeros, zeros, zeros, torch.full((2, 3), math.nan), validate_args=False)  # checks off
    # closed form for one dimension: BC = sqrt(2 s1 s2 / (s1^2 + s2^2)) exp(-(m1 - m2)^2 / (4 (s1^2 + s2^2)))
    m1, m2, v1, v2 = 0.3, -1.1, 0.5, 2.0
    expected = 0.5 * math.log(2 * math.sqrt(v1 * v2) / (v1 + v2)) - (m1 - m2) ** 2 / (4 * (v1 + v2))
    value = opf.log_bhattacharyya(torch.tensor([m1]), torch.tensor([math.log(v1)]), torch.tensor([m2]),
                                torch.tensor([math.log(v2)]))
    assert abs(float(value) - expected) < 1e-12


# ------------------------------------------------------------------ affinities
def test_affinities_check_the_experts_for_every_order():
    good = Normal(torch.tensor(0.0), torch.tensor(1.0))
    nan_loc = Normal(torch.tensor(math.nan), torch.tensor(1.0), validate_args=False)
    bad_scale = Normal(torch.tensor(0.0), torch.tensor(-1.0), validate_args=False)
    calls = [opinionpool.hellinger_distance, opinionpool.bhattacharyya_coefficient,
             opinionpool.log_bhattacharyya_coefficient, lambda p, q: opinionpool.log_chernoff_coefficient(p, q, 0.3),
             lambda p, q: opinionpool.renyi_divergence(p, q, 0.3),
             lambda p, q: opinionpool.amari_alpha_divergence(p, q, 0.7)]
    for call in calls:
        with pytest.raises(ValueError, match=r"Normal loc must be finite.*nan"):
            call(good, nan_loc)
        with pytest.raises(ValueError, match=r"Normal scale must be positive.*-1"):
            call(bad_scale, good)
    for a in ("0.5", True, 0.5 + 0j, math.nan):
        with pytest.raises(ValueError, match=r"a must be a real number, got"):
            opinionpool.log_chernoff_coefficient(good, good, a)
        with pytest.raises(ValueError, match=r"a must be a real number, got"):
            opinionpool.renyi_divergence(good, good, a)
        with pytest.raises(ValueError, match=r"a must be a real number, got"):
            opinionpool.amari_alpha_divergence(good, good, a)


def test_an_infinite_order_is_refused():
    """An order of +-inf passed the real-number check and came out as NaN from each of the three functions, for
    Normal, full-covariance and Poisson experts alike."""
    pairs = [(Normal(torch.tensor(0.0), torch.tensor(1.0)), Normal(torch.tensor(1.0), torch.tensor(2.0))),
             (MultivariateNormal(torch.zeros(2), torch.eye(2)), MultivariateNormal(torch.ones(2), 2 * torch.eye(2))),
             (Poisson(torch.tensor(2.0)), Poisson(torch.tensor(3.0)))]
    for p, q in pairs:
        for a in (math.inf, -math.inf, torch.tensor(math.inf, requires_grad=True)):
            for call in (opinionpool.log_chernoff_coefficient, opinionpool.renyi_divergence,
                         opinionpool.amari_alpha_divergence):
                with pytest.raises(ValueError, match=r"a must be finite, got -?inf"):
                    call(p, q, a)


# ------------------------------------------------------------------ argument types
def test_alpha_must_be_a_real_number():
    mu, logvar = latents()
    for alpha in ("0.5", True, False, 0.5 + 0j, torch.tensor(0.5 + 0j), torch.tensor(True)):
        pattern = r"alpha must be a real number, got .* of type"
        with pytest.raises(ValueError, match=pattern):
            opinionpool.holder(two_normals(), alpha=alpha)
        with pytest.raises(ValueError, match=pattern):
            opinionpool.HolderPool(two_normals(), alpha=alpha)
        with pytest.raises(ValueError, match=pattern):
            opf.holder(mu, logvar, alpha)
    # real numbers of any kind still work
    assert opinionpool.holder(two_normals(), alpha=torch.tensor(0.5)).alpha == 0.5
    assert opinionpool.holder(two_normals(), alpha=1).alpha == 1.0
    assert opinionpool.holder(two_normals(), alpha=np.array(0.5)).alpha == 0.5
    assert opinionpool.holder(two_normals(), alpha=np.float32(0.25)).alpha == 0.25
    with pytest.raises(ValueError, match=r"alpha must be a real number, got array\(\[0.5, 1. \]\) of type ndarray"):
        opinionpool.holder(two_normals(), alpha=np.array([0.5, 1.0]))


def test_max_components_must_be_a_positive_integer():
    mu, logvar = latents()
    for bad in (-1, 0, 2.5, True):
        pattern = rf"max_components must be a positive integer, got {bad!r}"
        with pytest.raises(ValueError, match=pattern):
            opinionpool.holder(two_normals(), alpha=0.5, max_components=bad)
        with pytest.raises(ValueError, match=pattern):
            opinionpool.HolderPool(two_normals(), alpha=0.5, max_components=bad)
        with pytest.raises(ValueError, match=pattern):
            opinionpool.NumericalHolderPool(two_normals(), alpha=0.3, max_components=bad)
        with pytest.raises(ValueError, match=pattern):
            opf.holder_mixture(mu, logvar, 0.5, max_components=bad)


@pytest.mark.parametrize("weights", ["ab", None, [1.0, "x"], [[1.0], [1.0, 2.0]]])
def test_weights_that_are_no_numbers_are_refused_by_name(weights):
    """A string gave torch's "new(): invalid data type 'str'", None "Could not infer dtype of NoneType": errors
    naming no argument."""
    pattern = r"weights must be real numbers \(a tensor or a sequence of numbers\), got "
    with pytest.raises(TypeError, match=pattern):
        opinionpool.log_multi_chernoff_coefficient(two_normals(), weights)
    if weights is not None:  # (None is the pools' "equal weights")
        with pytest.raises(TypeError, match=pattern):
            opinionpool.holder(two_normals(), alpha=0.5, weights=weights)


def test_weights_of_the_wrong_length_with_a_prior_expert_say_where_its_entry_goes():
    """With ``prior_expert=True`` the weights have one entry more than the experts: the message said only "one per
    expert", so four expected entries for three experts read as a miscount."""
    mu, logvar = latents()
    pattern = r"weights must have 4 entries in its last dimension \(one per expert, then the prior expert's\)"
    with pytest.raises(ValueError, match=pattern):
        opf.holder(mu, logvar, prior_expert=True, weights=torch.ones(3))
    with pytest.raises(ValueError, match=r"weights must have 3 entries in its last dimension \(one per expert\)"):
        opf.holder(mu, logvar, weights=torch.ones(4))


def test_complex_weights_are_refused():
    mu, logvar = latents()
    weights = [1.0, 1.0 + 0.5j]
    pattern = r"weights must be real, got a torch.complex\d+ tensor \[1\+0.5j\]"
    with pytest.raises(ValueError, match=pattern):
        opinionpool.holder(two_normals(), weights=weights)
    with pytest.raises(ValueError, match=pattern):
        opinionpool.poe(two_normals(), weights=weights)
    with pytest.raises(ValueError, match=pattern):
        opinionpool.log_multi_chernoff_coefficient(two_normals(), weights)
    with pytest.raises(ValueError, match=pattern):
        opinionpool.wasserstein_barycenter(two_normals(), weights)
    with pytest.raises(ValueError, match=r"weights must be real, got a torch.complex\d+ tensor"):
        opf.holder(mu, logvar, weights=torch.tensor([1.0, 1.0, 1.0 + 0j]))  # even a zero imaginary part
    with pytest.raises(ValueError, match=pattern):
        opf.poe(mu, logvar, weights=[1.0, 1.0 + 0.5j, 1.0], validate_args=False)  # a type check: always on


def test_barycenter_iteration_arguments():
    covariances = torch.tensor([[[2.0, 0.3], [0.3, 1.0]], [[1.0, -0.2], [-0.2, 0.5]]])
    experts = MultivariateNormal(torch.zeros(2, 2), covariance_matrix=covariances)
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match=rf"max_iter must be a positive integer, got {bad!r}"):
            opinionpool.wasserstein_barycenter(experts, max_iter=bad)
    for bad in (0.0, -1e-8, math.inf, math.nan):
        with pytest.raises(ValueError, match=rf"tol must be a positive finite number, got {bad!r}|tol must be a real"):
            opinionpool.wasserstein_barycenter(experts, tol=bad)
    # one iteration suffices to report non-convergence (it used to be an UnboundLocalError at max_iter=0)
    with pytest.raises(RuntimeError, match="did not converge in 1 iterations"):
        opinionpool.wasserstein_barycenter(experts, max_iter=1, tol=1e-300)


# ------------------------------------------------------------------ huge exact orders
def test_exact_order_past_the_component_cap_fails_fast_with_the_count():
    mu, logvar = latents()
    with deadline(20):
        with pytest.raises(ValueError, match=r"alpha=1e-12 is 1/n with n=1000000000000, whose exact pool of 2 experts "
                                             r"has binom\(n \+ 1, 1\) = 1000000000001 mixture components, more than "
                                             r"max_components=4096"):
            opinionpool.HolderPool(two_normals(), alpha=1e-12)
        # 5e-324 = 2^-1074 exactly: n = 2^1074 ~ 2.02e323 overflows a float
        with pytest.raises(ValueError, match=r"alpha=5e-324 is 1/n with n=about 2.02e\+323, .* = about 2.02e\+323 "
                                             r"mixture components"):
            opinionpool.HolderPool(two_normals(), alpha=5e-324)
        # three experts: binom(10^12 + 2, 2) = (10^12 + 2)(10^12 + 1) / 2 = 5.0000000000015e23
        with pytest.raises(ValueError, match=r"binom\(n \+ 2, 2\) = about 5e\+23 mixture components"):
            opf.holder_mixture(mu, logvar, 1e-12)
        with pytest.raises(ValueError, match=r"n=5000, .* = 5001 mixture components, more than max_components=4096"):
            opinionpool.HolderPool(two_normals(), alpha=1 / 5000)


def test_one_expert_is_its_own_pool_at_any_order():
    expert = [Normal(torch.tensor(0.7), torch.tensor(1.3))]
    mu, logvar = latents(m=1)
    with deadline(20):
        for alpha in (1e-10, 5e-324):
            pool = opinionpool.holder(expert, alpha=alpha)
            assert isinstance(pool, opinionpool.HolderPool) and pool.num_components == 1
            assert float(pool.mean) == 0.7 and abs(float(pool.variance) - 1.69) < 1e-12
            loc, lv = opf.holder(mu, logvar, alpha)
            torch.testing.assert_close(loc, mu[0], rtol=0, atol=1e-12)
            torch.testing.assert_close(lv, logvar[0], rtol=0, atol=1e-12)


def test_tiny_alpha_past_the_cap_uses_the_numerical_engine_without_hanging():
    with deadline(60):
        pool = opinionpool.holder(two_normals(), alpha=1e-12)
        assert isinstance(pool, opinionpool.NumericalHolderPool)  # as for any order past max_components
        # the envelope is the largest exact pool within the cap: n + 1 <= 4096 components for two experts
        assert pool.envelope().description == "M_1e-12 <= M_(1/4095)"
        samples = pool.sample((4000,), seed=0)
    # alpha = 1e-12 is the log-linear pool to O(1e-12): precision 0.5 * 1 + 0.5 / 4, mean 0.5 * (1 / 4) / precision
    variance, mean = 1 / 0.625, 0.125 / 0.625
    assert abs(float(samples.mean()) - mean) < 5 * math.sqrt(variance / len(samples))
    assert abs(float(samples.var()) - variance) < 5 * variance * math.sqrt(2 / len(samples))
    # three experts: the largest n with binom(n + 2, 2) <= 4096, by counting
    three = two_normals() + [Normal(torch.tensor(-1.0), torch.tensor(0.5))]
    largest = max(n for n in range(1, 200) if math.comb(n + 2, 2) <= 4096)
    assert opinionpool.holder(three, alpha=1e-9).envelope().description == f"M_1e-09 <= M_(1/{largest})"


def test_subnormal_alpha_is_refused_by_the_numerical_engine():
    for alpha in (5e-324, -5e-324, 1e-310):
        with deadline(20), pytest.raises(ValueError, match=rf"alpha={alpha!r} is subnormal.*pass alpha=0"):
            opinionpool.holder(two_normals(), alpha=alpha)


# ------------------------------------------------------------------ every error names the argument and the value
def test_error_messages_name_the_argument_and_the_value():
    pool = opinionpool.holder([Normal(torch.tensor(0.0), torch.tensor(1.0))] * 2)
    cases = [
        (lambda: opinionpool.holder([]), r"experts must not be empty, got \[\]"),
        (lambda: opinionpool.HolderPool(two_normals(), 0.5).estimate(["covariance"]),
         r"quantities=\['covariance'\]: a covariance needs multivariate"),
        (lambda: ExponentialFamily.natural_from_mean(NormalFamily(), torch.zeros(2)), r"got init=None"),
        (lambda: opinionpool.holder(MultivariateNormal(torch.zeros(2, 2), scale_tril=torch.eye(2).expand(2, 2, 2)),
                                    weights=[1.0, 1.0 + 1j]), r"weights must be real"),
        (lambda: opinionpool.poe([torch.distributions.Gamma(torch.tensor(0.5), torch.tensor(1.0))] * 2,
                                 weights=[1.0, 1.0]), r"experts: the product of these Gamma experts with weights \[1, 1\]"),
        (lambda: pool.moment_match("laplace"), r"family must be None, 'gaussian' or 'diag_gaussian', got 'laplace'"),
        (lambda: opf.subset_mixture(opf.poe, *latents(), prior_on_full_subset=True, weights=[1.0, 2.0, 3.0]),
         r"prior_on_full_subset does not combine with pooling weights .*got weights \[1, 2, 3\]"),
        (lambda: opinionpool.renyi_divergence(*two_normals(), -0.5), r"the Rényi order a must be positive, got a=-0.5"),
        (lambda: opf.hellinger(*latents(), dim=5), r"dim=5 is out of range"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            call()


def test_non_positive_definite_covariance_names_the_index():
    family = MultivariateNormalFamily(2)
    precision = torch.stack([torch.eye(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]])])  # the second is indefinite
    with pytest.raises(ValueError, match=r"experts: covariance matrices must be symmetric positive definite; "
                                         r"the one at index \(1,\) is not"):
        family.check_params(family.join(torch.zeros(2, 2), precision), "experts")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_the_finite_check_by_a_sum_misses_nothing(dtype):
    """``all_finite`` trusts a finite sum: every non-finite entry (infinities of both signs, whose sum is NaN, and
    NaN) is still caught; finite entries whose sum overflows are not refused; an absent expert may hold NaN."""
    from opinionpool._validation import all_finite

    big = torch.finfo(dtype).max
    for bad in (math.inf, -math.inf, math.nan):
        value = torch.zeros(3, 4, 5, dtype=dtype)
        value[1, 2, 3] = bad
        assert not all_finite(value)
        with pytest.raises(ValueError, match=r"mu must be finite.*first at index \(2, 1, 3\)"):
            opf.poe(value.transpose(0, 1), torch.zeros(4, 3, 5, dtype=dtype), dim=1)
    both = torch.tensor([math.inf, -math.inf, 1.0], dtype=dtype)
    assert both.sum().isnan() and not all_finite(both)
    huge = torch.full((2, 3, 2), big, dtype=dtype)
    assert huge.sum().isinf() and all_finite(huge)
    mu = torch.zeros(2, 3, 2, dtype=dtype)
    mu[1, 0] = math.nan
    mask = torch.tensor([[True, True, True], [False, True, True]])
    loc, _ = opf.poe(mu, torch.zeros_like(mu), mask=mask)
    assert torch.isfinite(loc).all()
    mask[1, 0] = True
    with pytest.raises(ValueError, match="mu must be finite"):
        opf.poe(mu, torch.zeros_like(mu), mask=mask)


def test_empty_experts_and_weights_of_another_batch_are_refused_up_front():
    """A batched distribution of zero experts raised 'math domain error'; weights (5, 3) against experts (4, 3)
    passed the checks and failed later inside torch."""
    from torch.distributions import Poisson

    with pytest.raises(ValueError, match=r"experts must not be empty.*Poisson has size 0"):
        opinionpool.holder(Poisson(torch.ones(0)), alpha=0.5)
    with pytest.raises(ValueError, match="experts must not be empty"):
        opinionpool.wasserstein_barycenter(MultivariateNormal(torch.zeros(0, 2), torch.eye(2).expand(0, 2, 2),
                                                              validate_args=False))
    experts = Normal(torch.zeros(4, 3), torch.ones(4, 3))
    for build in (lambda w: opinionpool.holder(experts, alpha=0.5, weights=w),
                  lambda w: opinionpool.holder(experts, alpha=0.3, weights=w),
                  lambda w: opinionpool.wasserstein_barycenter(experts, weights=w)):
        with pytest.raises(ValueError, match=r"weights with batch shape \(5,\) do not broadcast against the experts' "
                                             r"batch_shape \(4,\)"):
            build(torch.ones(5, 3))
