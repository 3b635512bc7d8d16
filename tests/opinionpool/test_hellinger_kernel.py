"""The CPU kernel behind ``hellinger(..., fused=True)`` (``opinionpool/_hellinger_kernel.cpp``): values and
gradients against the eager autograd function and the mixture written out pair by pair (float64, masks, weights,
the prior expert, M = 1 to 10, latent sizes that are not a multiple of the SIMD width), gradcheck, the float32
regimes of the eager tests, edges (experts far apart, tiny and huge variances), ``torch.func`` transforms (which
run the eager bodies) and the warning when the kernel cannot be built.

The kernel is built once per machine (about a minute); without a C++ compiler or ninja these tests are skipped
with that reason, and the fallback test still runs."""

import math
import shutil
import warnings

import pytest
import torch

import opinionpool._hellinger as hellinger_module
import opinionpool.functional as opf
from tests.opinionpool.test_float32_stability import EPS32, _coinciding_experts
from tests.opinionpool.test_hellinger_function import CASES, arguments, experts, reference_hellinger


def _toolchain_missing():
    from torch.utils import cpp_extension

    if shutil.which(cpp_extension.get_cxx_compiler()) is None:
        return f"no C++ compiler ({cpp_extension.get_cxx_compiler()})"
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return "no ninja"
    return None


@pytest.fixture(scope="module")
def built_kernel():
    """The built kernel's operators; where a compiler and ninja exist, a failed build fails the tests instead of
    skipping them."""
    missing = _toolchain_missing()
    if missing:
        pytest.skip(f"the CPU kernel cannot be built here: {missing}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        built = hellinger_module._cpu_kernel()
    assert built is not None, hellinger_module._KERNEL_FAILED
    return built


class CountingKernel:
    """The kernel's operators, counting their calls: a test of the kernel must see it run, not the eager bodies."""

    def __init__(self, operators):
        self.operators, self.calls = operators, {"forward": 0, "backward": 0}

    def forward(self, *args):
        self.calls["forward"] += 1
        return self.operators.forward(*args)

    def backward(self, *args):
        self.calls["backward"] += 1
        return self.operators.backward(*args)


@pytest.fixture
def kernel(built_kernel, monkeypatch):
    counting = CountingKernel(built_kernel)
    monkeypatch.setattr(hellinger_module, "_KERNEL", [counting])
    return counting


def both_paths(kernel, mu, logvar, inputs_grad, **kwargs):
    """Values and gradients (of a loss using both outputs) of the eager function and of the kernel, which must
    have run once forward and once backward."""
    results = []
    for fused in (False, True):
        inputs = [t.detach().clone().requires_grad_(True) for t in inputs_grad]
        named = dict(zip(("mu", "logvar", "weights"), inputs))
        before = dict(kernel.calls)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            loc, lv = opf.hellinger(named.pop("mu", mu), named.pop("logvar", logvar), fused=fused,
                                    **{**kwargs, **named})
        (loc.sin().sum() + (lv * lv).sum()).backward()
        ran = {name: kernel.calls[name] - before[name] for name in before}
        assert ran == ({"forward": 1, "backward": 1} if fused else {"forward": 0, "backward": 0}), ran
        results.append((loc, lv, *(t.grad for t in inputs)))
    return results


@pytest.mark.parametrize("m", [1, 2, 3, 5, 10])
@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(case) or "plain")
def test_kernel_equals_eager_and_the_written_out_mixture(kernel, m, case):
    mu, logvar, weights, mask = experts(m, batch=3, dim=21, seed=m)  # 21: a partial SIMD vector at the end
    mu, logvar, weights = mu.double(), logvar.double(), weights.double()
    kwargs = arguments(case, m, weights, mask)
    given = kwargs.pop("weights", None)
    inputs = [mu, logvar] + ([given] if given is not None else [])
    eager, fused = both_paths(kernel, mu, logvar, inputs, **kwargs)
    for want, got in zip(eager, fused):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if m <= 5:
        ref_loc, ref_lv = reference_hellinger(mu, logvar, weights=given, **kwargs)
        torch.testing.assert_close(fused[0], ref_loc, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fused[1], ref_lv, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [64, 512])
def test_kernel_with_latents_of_whole_cache_lines(kernel, dtype, dim):
    """Latent sizes whose rows fill an even number of 64-byte cache lines, where the kernel spaces its rows by one
    line more than they hold (the loops still stop at the rows' end): ten overlapping experts (every pair in the
    pool) with masks and weights, against the eager function."""
    mu, logvar, weights, mask = experts(10, batch=3, dim=dim, seed=dim)
    mu, logvar, weights = (mu * 0.02).to(dtype), (logvar * 0.1).to(dtype), weights[:, :10].to(dtype)
    assert (opf.hellinger_pairwise_mass(mu, logvar, weights=weights, mask=mask) > 0.3).all()
    eager, fused = both_paths(kernel, mu, logvar, [mu, logvar, weights], mask=mask)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    for want, got in zip(eager, fused):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("m", [2, 3])
def test_kernel_gradcheck_with_mask_weights_and_prior(kernel, m):
    mu, logvar, weights, mask = experts(m, batch=2, dim=3, seed=m + 20)
    inputs = [t.double().requires_grad_(True) for t in (mu, logvar, weights)]

    def pooled(a, b, w):
        return opf.hellinger(a, b, weights=w, mask=mask, prior_expert=True, fused=True)

    assert torch.autograd.gradcheck(pooled, inputs)
    assert kernel.calls["forward"] > 0 and kernel.calls["backward"] > 0


def test_kernel_with_two_batch_axes(kernel):
    """Two batch axes (flattened for the kernel and restored), float32 against the eager float32 function."""
    g = torch.Generator().manual_seed(5)
    f32 = {"generator": g, "dtype": torch.float32}  # the library tests' default dtype is float64
    mu, logvar = torch.randn(4, 2, 3, 100, **f32), torch.randn(4, 2, 3, 100, **f32) * 2
    weights = torch.rand(2, 3, 4, **f32) + 0.1
    eager, fused = both_paths(kernel, mu, logvar, [mu, logvar, weights])
    assert fused[0].dtype == torch.float32
    for want, got in zip(eager, fused):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    assert fused[0].shape == (2, 3, 100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_running_product_over_long_latents(kernel, dtype):
    """4 100 dimensions: more than 64 SIMD vectors per lane with AVX-512 (and AVX2, and no SIMD), so the running
    product of each pair's Bhattacharyya factors is flushed into the logarithm several times.

    Log-variances 0.15 apart (pairs' -log S from about 6 to 23, so their mixture weights show): the mixture weights
    equal the eager ones. Log-variances about 8 apart (factors near 2): 2^128 overflows float32
    after 128 vectors unless the product is flushed; every output stays finite and equals the eager one."""
    g = torch.Generator().manual_seed(6)
    mu = torch.randn(2, 3, 4100, generator=g, dtype=dtype) * 0.01
    log_w = torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=dtype)).expand(2, 3).contiguous()
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    for spread in (0.15, 8.0):
        logvar = torch.tensor([0.0, spread, -spread], dtype=dtype)[:, None].expand(3, 4100)
        logvar = (logvar + 0.01 * torch.randn(2, 3, 4100, generator=g, dtype=dtype)).contiguous()
        got = kernel.forward(mu, logvar, log_w)
        want = hellinger_module._forward(mu, logvar, log_w)
        for name, a, b in zip(("mean", "logvar", "offset", "pi"), got, want):
            assert torch.isfinite(a).all(), name
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item(), msg=name)
        if spread < 1:
            assert (want[3][:, 3:] > 1e-15).all()  # the pairs' weights are visible


@pytest.mark.parametrize("fused", [False, True])
def test_float32_kernel_on_coinciding_experts_against_float64(kernel, fused):
    """Issue 15's float32 regime (|mu| about 1e3, log-variances across [-30, 30], experts nearly coinciding, 512
    dimensions): the kernel's log-variance within 1e-5 of the float64 pool, its mean within 1e-5 standard
    deviations (or two float32 ulps of the mean), as the eager path."""
    mu64, logvar64 = _coinciding_experts(num_experts=5)
    loc64, lv64 = opf.hellinger(mu64, logvar64)
    loc32, lv32 = opf.hellinger(mu64.float(), logvar64.float(), fused=fused)
    assert kernel.calls["forward"] == int(fused)
    sd64 = (0.5 * lv64).exp()
    assert ((loc32.double() - loc64).abs() <= torch.maximum(1e-5 * sd64, 2 * EPS32 * loc64.abs())).all()
    torch.testing.assert_close(lv32.double(), lv64, rtol=0, atol=1e-5)


def test_kernel_at_the_edges_against_float64_eager(kernel):
    """Experts 1e6 standard deviations apart (their pair weights underflow to zero), variances from e^-80 to e^80
    and an expert of weight e^-60: finite values and gradients equal to the eager function's in float64 (to 1e-12
    of each tensor's largest entry: a gradient with respect to the negligible weight is a difference of terms many
    times its size, which the two paths sum in different orders)."""
    mu = torch.tensor([[[0.0, 1.0, -3.0]], [[1e6, 1.0 + 1e-30, 2.0]], [[0.5, 1.0, 4.0]]], dtype=torch.float64)
    logvar = torch.tensor([[[0.0, -80.0, 80.0]], [[0.0, -79.0, -80.0]], [[5.0, -80.0, 3.0]]], dtype=torch.float64)
    weights = torch.tensor([1.0, math.exp(-60), 0.3], dtype=torch.float64)
    eager, fused = both_paths(kernel, mu, logvar, [mu, logvar, weights])
    for want, got in zip(eager, fused):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * want.abs().max().item())


def test_float32_kernel_with_log_variances_far_below_the_largest(kernel):
    """float32 log-variances from -60 to 60 at each dimension: the variances of two sharp experts relative to the
    broad one underflow (e^-110), so the kernel takes their pair's ratios from expm1 instead; values and gradients
    against the float64 eager pool."""
    g = torch.Generator().manual_seed(8)
    logvar = torch.stack([torch.full((2, 40), 50.0), torch.full((2, 40), -60.0), torch.full((2, 40), -59.0)])
    logvar = (logvar + torch.rand(3, 2, 40, generator=g)).double()
    logvar[:, :, 32:] = torch.rand(3, 2, 8, generator=g).double()  # a SIMD vector whose pairs all take the division
    mu = (torch.randn(3, 2, 40, generator=g) * (0.5 * logvar).exp() * 0.3).float().double()
    results = []
    for dtype, fused in ((torch.float64, False), (torch.float32, True)):
        inputs = [t.to(dtype).clone().requires_grad_(True) for t in (mu, logvar)]
        loc, lv = opf.hellinger(*inputs, fused=fused)
        (lv.sum() + (loc * (-0.5 * lv).exp().detach()).sum()).backward()
        results.append((loc, lv, inputs[0].grad * (0.5 * logvar).exp(), inputs[1].grad))
    assert kernel.calls == {"forward": 1, "backward": 1}
    sd = (0.5 * results[0][1]).exp()
    assert ((results[1][0].double() - results[0][0]).abs() <= 1e-5 * sd).all()
    torch.testing.assert_close(results[1][1].double(), results[0][1], rtol=0, atol=1e-5)
    for low, high in zip(results[1][2:], results[0][2:]):
        assert torch.isfinite(low).all()
        torch.testing.assert_close(low.double(), high, rtol=0, atol=1e-4)


def test_float32_kernel_gradients_with_a_far_expert_of_negligible_weight(kernel):
    """The eager test of the same name, through the kernel: float32 against float64 to 1e-4. (A log-weight of -40,
    not the eager test's -50: from about -43 the squared weight can fall below float32's smallest normal number,
    and such pools are moment-matched from their written-out mixture instead, ``weights_underflow``.)"""
    results = []
    for dtype in (torch.float32, torch.float64):
        mu = torch.tensor([[0.0, 0.0], [1e19, 1e19]], dtype=dtype, requires_grad=True)
        logvar = torch.zeros(2, 2, dtype=dtype, requires_grad=True)
        log_w = torch.tensor([0.0, -40.0], dtype=dtype, requires_grad=True)
        mean, lv = hellinger_module.hellinger_moments(mu, logvar, log_w, fused=True)
        (mean.sum() + lv.sum()).backward()
        results.append((mean, lv, mu.grad, logvar.grad, log_w.grad))
    assert kernel.calls == {"forward": 2, "backward": 2}
    for low, high in zip(*results):
        assert torch.isfinite(low).all()
        torch.testing.assert_close(low.double(), high, rtol=1e-4, atol=1e-4)


def test_torch_func_transforms_give_plain_autograd_results(kernel):
    """``vmap`` and ``jacrev`` with ``fused=True``: the kernel has no batching rule, so the eager bodies run on the
    wrapped tensors (no fallback warning, no attempt to compile) and the results equal plain autograd."""
    g = torch.Generator().manual_seed(4)
    mu, logvar = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g)
    log_w = torch.log(torch.rand(3, generator=g) + 0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        pooled = lambda m: hellinger_module.hellinger_moments(m, logvar.double(), log_w.double(), fused=True)[1]  # noqa: E731
        torch.testing.assert_close(torch.func.jacrev(pooled)(mu), torch.autograd.functional.jacobian(pooled, mu))
        stack = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)
        batched = torch.func.vmap(pooled)(stack)
    torch.testing.assert_close(batched, torch.stack([pooled(s) for s in stack]))


def test_a_kernel_that_cannot_be_built_warns_once_and_runs_eagerly(monkeypatch):
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(hellinger_module, "_KERNEL", [])
    monkeypatch.setattr(hellinger_module, "_KERNEL_FAILED", [])
    monkeypatch.setattr(cpp_extension, "load", broken)
    mu, logvar, weights, mask = experts(3)
    with pytest.warns(RuntimeWarning, match="the CPU kernel could not be built"):
        loc, lv = opf.hellinger(mu, logvar, mask=mask, fused=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        opf.hellinger(mu, logvar, mask=mask, fused=True)
    ref_loc, ref_lv = reference_hellinger(mu, logvar, mask=mask)
    torch.testing.assert_close(loc, ref_loc)
    torch.testing.assert_close(lv, ref_lv)


def test_the_benchmark_labels_a_fused_row_that_ran_eagerly(monkeypatch, capsys):
    """``bench_aggregators --fused`` where the kernel does not build timed the eager code as "hellinger fused" and
    judged it against the fused targets; now the row says it fell back, why, and carries no verdict. On the
    torch.compile path (other devices) a backward body that does not compile is caught before the timing."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_aggregators

    monkeypatch.setattr(hellinger_module, "_KERNEL", [])
    monkeypatch.setattr(hellinger_module, "_KERNEL_FAILED", ["RuntimeError('no compiler here')"])
    mu, logvar = torch.randn(2, 3, 4, dtype=torch.float32), torch.randn(2, 3, 4, dtype=torch.float32)
    assert bench_aggregators.fused_fallback(mu, logvar) == "RuntimeError('no compiler here')"
    assert bench_aggregators.fused_fallback(mu.bfloat16(), logvar.bfloat16()) == "no fused path for torch.bfloat16 on cpu"
    # (at the session's own thread count: the script sets it for the process)
    monkeypatch.setattr(sys, "argv", ["bench_aggregators.py", "--shapes", "256,5,512", "--rounds", "1", "--warmup", "0",
                                      "--fused", "--only", "hellinger fused", "--no-overlapping",
                                      "--threads", str(torch.get_num_threads())])
    bench_aggregators.main()
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("| (256, 5, 512) | hellinger fused"))
    assert "| hellinger fused (fell back to eager) |" in row and row.endswith("|  |")  # no target, no verdict
    assert "hellinger fused (fell back to eager): RuntimeError('no compiler here')" in lines

    def compiled(name, fn):
        if not name.startswith("backward"):
            return fn

        def failing(*args):
            raise RuntimeError("the backward graph did not compile")
        return failing

    monkeypatch.setattr(hellinger_module, "_COMPILE_FAILED", [])
    monkeypatch.setattr(hellinger_module, "_fused_path", lambda *tensors: "compile")
    monkeypatch.setattr(hellinger_module, "_compiled", compiled)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        assert "the backward graph did not compile" in bench_aggregators.fused_fallback(mu, logvar)


@pytest.mark.parametrize("how", ["mask", "weight 1e-18"])
def test_kernel_backward_with_a_component_of_vanishing_weight_far_from_the_pool(kernel, how):
    """Float32 experts of log-variance near -87 beside a broad third one of (nearly) no weight: the kernel formed
    the components' scaled deviations before their weight, so the third one's overflowed and met p = 0 as NaN (in
    every weight's gradient); the eager backward scales by sqrt(p) first. Both must agree with float64."""
    mu = torch.tensor([[[2.0, 2.0]], [[2.0, 2.0]], [[0.0, 0.0]]], dtype=torch.float32)
    logvar = torch.tensor([[[-87.0, -87.0]], [[-86.5, -87.0]], [[0.0, 0.0]]], dtype=torch.float32)
    options = {"mask": torch.tensor([[True], [True], [False]])} if how == "mask" else {}
    weights = torch.tensor([1.0, 2.0, 1.0 if how == "mask" else 1e-18], dtype=torch.float32)
    eager, fused = both_paths(kernel, mu, logvar, [mu, logvar, weights], **options)
    (*_, w64), _ = both_paths(kernel, mu.double(), logvar.double(), [mu.double(), logvar.double(), weights.double()],
                              **options)
    for got in (eager, fused):
        assert all(torch.isfinite(t).all() for t in got)
        torch.testing.assert_close(got[4][:2].double(), w64[:2], rtol=1e-4, atol=0)
    for want, got in zip(eager[:4], fused[:4]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype, offset", [(torch.float32, 1.8e38), (torch.float64, 1e308)])
def test_experts_more_than_half_the_largest_float_apart(kernel, dtype, offset):
    """Two experts of unit variance ``offset`` apart share no mass: the pool is their mixture with weights 1/4 and
    3/4 (``w_j^2`` normalised), of mean ``3/4 offset`` and variance ``1 + 3/16 offset^2``; the scale's ``log(2 *
    spread)`` overflowed to inf above half the largest float, and the log-variance came out NaN on both paths."""
    mu = torch.tensor([[0.0], [offset]], dtype=dtype)
    logvar = torch.zeros(2, 1, dtype=dtype)
    weights = torch.tensor([1.0, math.sqrt(3.0)], dtype=dtype)
    expected_lv = math.log(3 / 16) + 2 * math.log(offset)  # (the 1 is below the rounding)
    for fused in (False, True):
        loc, lv = opf.hellinger(mu, logvar, weights=weights, fused=fused)
        assert math.isclose(float(loc), 0.75 * offset, rel_tol=1e-6), (fused, float(loc))
        assert math.isclose(float(lv), expected_lv, rel_tol=1e-6), (fused, float(lv))
    assert kernel.calls["forward"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_skips_pairs_of_zero_weight_sample_by_sample(kernel, dtype):
    """The kernel leaves out, per sample, the pairs whose mixture weight is exactly zero (experts that share no
    mass at the dtype's range). Five experts in four samples, each sample with its own group of overlapping
    experts and the others 15 standard deviations apart in each of 37 dimensions (their pairs' weights underflow
    to zero in both dtypes), with weights and a mask: values and gradients against the eager function and, in
    float64, the mixture written out pair by pair."""
    mu, logvar, weights, mask = experts(5, batch=4, dim=37, seed=7)
    groups = [(0, 1), (1, 2, 3), (2, 4), (0, 3, 4)]
    far = torch.tensor([[0.0 if k in group else 15.0 * (k + 1) for group in groups] for k in range(5)])
    mu = (0.2 * mu + far.unsqueeze(-1)).to(dtype)
    logvar, weights = (0.3 * logvar).to(dtype), weights[:, :5].to(dtype)
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[3, 0] = False  # an absent expert too
    log_w = (weights.log() + torch.where(mask.T, 0.0, -math.inf).to(dtype)).expand(4, 5)
    pi = hellinger_module._forward(mu.movedim(0, -2), logvar.movedim(0, -2), log_w)[3][:, 5:]
    zero = pi == 0
    assert zero.any(-1).all() and (~zero).any(-1).all(), pi  # every sample has both kinds of pairs
    assert not (zero == zero[:1]).all(), "the samples' zero-weight pairs must differ"
    eager, fused = both_paths(kernel, mu, logvar, [mu, logvar, weights], mask=mask)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    for want, got in zip(eager, fused):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
    if dtype == torch.float64:
        ref_loc, ref_lv = reference_hellinger(mu, logvar, weights=weights, mask=mask)
        torch.testing.assert_close(fused[0], ref_loc, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fused[1], ref_lv, rtol=1e-12, atol=1e-12)


class RecordingKernel(CountingKernel):
    """A counting kernel that also keeps the operands and results of its calls."""

    def __init__(self, operators):
        super().__init__(operators)
        self.seen = {"forward": [], "backward": []}

    def forward(self, *args):
        result = super().forward(*args)
        self.seen["forward"].append((args, result))
        return result

    def backward(self, *args):
        result = super().backward(*args)
        self.seen["backward"].append((args, result))
        return result


@pytest.mark.parametrize("layout", ["experts first", "batch first", "latent strided", "latent of one", "empty batch"])
def test_kernel_reads_and_writes_the_callers_layout(built_kernel, monkeypatch, layout):
    """The kernel reads ``mu`` and ``logvar`` with any batch and expert strides where the latent axis has unit
    stride: the functional API's experts-first ``(M, B, D)`` tensors are not transposed on the way in nor their
    gradients on the way out; a strided latent axis is copied first, and a latent of size one may have any stride.
    Values and gradients as the eager function's in every layout."""
    recording = RecordingKernel(built_kernel)
    monkeypatch.setattr(hellinger_module, "_KERNEL", [recording])
    g = torch.Generator().manual_seed(3)
    m, batch, dim = 4, 0 if layout == "empty batch" else 5, 1 if layout == "latent of one" else 19
    source = torch.randn(2, m, batch, 2 * dim, generator=g, dtype=torch.float64)
    source[1] *= 0.3  # log-variances
    axis = 0
    if layout == "experts first":  # (M, B, D)
        mu, logvar = (t[..., :dim].contiguous() for t in source)
    elif layout == "batch first":  # (B, M, D)
        (mu, logvar), axis = (t[..., :dim].transpose(0, 1).contiguous() for t in source), 1
    elif layout == "latent strided":  # (M, B, D), every other latent
        mu, logvar = source[0, ..., ::2], source[1, ..., ::2]
    elif layout == "empty batch":  # (M, 0, D) with the latent not innermost: contiguous() does not copy it
        mu, logvar = (torch.randn(dim, m, 0, generator=g, dtype=torch.float64).movedim(0, -1) for _ in range(2))
        assert mu.stride(-1) != 1
    else:  # (B, M, 1) whose latent stride is M: a transposed (B, 1, M)
        (mu, logvar), axis = (t[..., :1].permute(1, 2, 0).contiguous().transpose(1, 2) for t in source), 1
        assert mu.stride(-1) == m
    weights = torch.rand(m, generator=g, dtype=torch.float64) + 0.5
    results = []
    for fused in (False, True):
        a, b, w = (t.detach().requires_grad_(True) for t in (mu, logvar, weights))  # views: strides kept
        loc, lv = opf.hellinger(a, b, weights=w, dim=axis, fused=fused)
        (loc.sin().sum() + (lv * lv).sum()).backward()
        results.append((loc, lv, a.grad, b.grad, w.grad))
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert recording.calls == {"forward": 1, "backward": 1}
    (kernel_mu, kernel_lv, *_), _ = recording.seen["forward"][0]
    _, (grad_mu, grad_lv, _) = recording.seen["backward"][0]
    if layout == "experts first":  # no transposed copies: operands and gradients in the caller's (M, B, D) order
        read_as = mu.movedim(0, -2).stride()
        assert kernel_mu.stride() == kernel_lv.stride() == grad_mu.stride() == grad_lv.stride() == read_as
    assert kernel_mu.size(-1) == 1 or kernel_mu.stride(-1) == 1
