"""The order-1/2 pool of diagonal Gaussians as one autograd function (``opinionpool._hellinger``): values against
the pool's mixture written out here, analytic gradients against finite differences (gradcheck, float64), the
memory it keeps for the backward pass, and the opt-in compiled path (``torch.compile``, as on a GPU; the CPU
kernel is tested in ``test_hellinger_kernel.py``)."""

import itertools
import warnings

import pytest
import torch

import opinionpool._chunks as chunks_module
import opinionpool._hellinger as hellinger_module
import opinionpool.functional as opf
from tests.opinionpool.test_subset_shared import per_subset


def reference_hellinger(mu, logvar, weights=None, mask=None, prior_expert=False):
    """The pool (sum_j w_j q_j^(1/2))^2 of experts (M, B, D) as its mixture, pair by pair, moment-matched."""
    if prior_expert:
        mu = torch.cat((mu, torch.zeros_like(mu[:1])))
        logvar = torch.cat((logvar, torch.zeros_like(logvar[:1])))
        if mask is not None:
            mask = torch.cat((mask, torch.ones_like(mask[:1])))
    m, batch, _ = mu.shape
    w = torch.ones(batch, m) if weights is None else weights.expand(batch, m)
    if mask is not None:
        w = w * mask.T
    means, variances = [], []
    for b in range(batch):
        weight, loc, var = [], [], []
        for i, j in itertools.product(range(m), repeat=2):
            vi, vj = logvar[i, b].exp(), logvar[j, b].exp()
            log_s = (0.5 * torch.log(2 * (vi * vj).sqrt() / (vi + vj)) - (mu[i, b] - mu[j, b]) ** 2 / (4 * (vi + vj)))
            weight.append(w[b, i] * w[b, j] * log_s.sum().exp())
            loc.append((mu[i, b] * vj + mu[j, b] * vi) / (vi + vj))
            var.append(2 * vi * vj / (vi + vj))
        weight = torch.stack(weight) / sum(weight)
        loc, var = torch.stack(loc), torch.stack(var)
        mean = (weight[:, None] * loc).sum(0)
        means.append(mean)
        variances.append((weight[:, None] * (var + (loc - mean) ** 2)).sum(0))
    return torch.stack(means), torch.stack(variances).log()


def experts(m, batch=3, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(m, batch, dim, generator=g) * 1.5
    logvar = torch.randn(m, batch, dim, generator=g) * 0.7
    weights = torch.rand(batch, m + 1, generator=g) + 0.2
    mask = torch.rand(m, batch, generator=g) > 0.4
    mask[0] = True
    return mu, logvar, weights, mask


CASES = [{}, {"weights": True}, {"mask": True}, {"mask": True, "weights": True},
         {"mask": True, "weights": True, "prior_expert": True}]


def arguments(case, m, weights, mask):
    kwargs = {}
    if case.get("weights"):
        kwargs["weights"] = weights if case.get("prior_expert") else weights[:, :m]
    if case.get("mask"):
        kwargs["mask"] = mask
    if case.get("prior_expert"):
        kwargs["prior_expert"] = True
    return kwargs


@pytest.mark.parametrize("m", [1, 2, 3, 5])
@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(case) or "plain")
def test_values_equal_the_written_out_mixture_and_the_generic_path(m, case):
    mu, logvar, weights, mask = experts(m)
    kwargs = arguments(case, m, weights, mask)
    loc, lv = opf.hellinger(mu, logvar, **kwargs)
    ref_loc, ref_lv = reference_hellinger(mu, logvar, **kwargs)
    torch.testing.assert_close(loc, ref_loc, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lv, ref_lv, rtol=1e-12, atol=1e-12)
    generic_loc, generic_lv = opf.holder_mixture(mu, logvar, 0.5, **kwargs).moments()
    torch.testing.assert_close(loc, generic_loc, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(lv, generic_lv, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("m", [2, 3, 5])
@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(case) or "plain")
def test_gradcheck_with_masks_weights_and_prior(m, case):
    mu, logvar, weights, mask = experts(m, batch=2, dim=3, seed=m)
    kwargs = arguments(case, m, weights, mask)
    given = kwargs.pop("weights", None)
    inputs = [mu.requires_grad_(True), logvar.requires_grad_(True)]
    if given is not None:
        inputs.append(given.clone().requires_grad_(True))

    def pooled(mu, logvar, *maybe_weights):
        return opf.hellinger(mu, logvar, weights=maybe_weights[0] if maybe_weights else None, **kwargs)

    assert torch.autograd.gradcheck(pooled, inputs, fast_mode=m > 2)  # fast mode: a random direction of the vJp


def test_gradients_of_shared_weights_and_of_well_separated_experts():
    """Weights of shape (M,) broadcast over the batch (their gradient sums over it); far-apart sharp experts give
    pair weights that underflow to zero without NaN gradients."""
    mu, logvar, weights, _ = experts(3, batch=2, dim=3)
    w = weights[0, :3].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m, lv, w: opf.hellinger(m, lv, weights=w),
                                    (mu.requires_grad_(True), logvar.requires_grad_(True), w))
    far = torch.tensor([[[0.0, 5.0]], [[40.0, 5.0]]], requires_grad=True)
    sharp = torch.tensor([[[-8.0, -9.0]], [[-8.5, -9.0]]], requires_grad=True)
    loc, lv = opf.hellinger(far, sharp)
    (loc.sum() + lv.sum()).backward()
    assert torch.isfinite(far.grad).all() and torch.isfinite(sharp.grad).all()
    assert torch.autograd.gradcheck(opf.hellinger, (far, sharp))


def saved_bytes(fn, *inputs):
    """Bytes autograd keeps for the backward pass of ``fn(*inputs)`` (each storage counted once)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(*inputs)
    return sum(storages.values())


@pytest.mark.parametrize("m", [3, 5])
def test_saved_memory_is_within_twice_the_product_of_experts(m):
    mu, logvar, _, mask = experts(m, batch=64, dim=128)
    inputs = (mu.float().requires_grad_(True), logvar.float().requires_grad_(True))
    for kwargs in ({}, {"mask": mask}):
        poe = saved_bytes(lambda a, b, kw=kwargs: opf.poe(a, b, **kw), *inputs)
        hellinger = saved_bytes(lambda a, b, kw=kwargs: opf.hellinger(a, b, **kw), *inputs)
        assert hellinger <= 2 * poe, (hellinger, poe)


def compile_path(monkeypatch):
    """``fused=True`` through ``torch.compile`` (the path it takes on a GPU) instead of the CPU kernel."""
    monkeypatch.setattr(hellinger_module, "_fused_path", lambda *tensors: "compile")


def test_fused_falls_back_with_a_warning_when_compilation_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    compile_path(monkeypatch)
    monkeypatch.setattr(hellinger_module, "_COMPILED", {})
    monkeypatch.setattr(hellinger_module, "_COMPILE_FAILED", [])
    monkeypatch.setattr(torch, "compile", broken)
    mu, logvar, weights, mask = experts(3)
    mu.requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        loc, lv = opf.hellinger(mu, logvar, mask=mask, fused=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        loc_again, _ = opf.hellinger(mu, logvar, mask=mask, fused=True)
    ref_loc, ref_lv = reference_hellinger(mu.detach(), logvar, mask=mask)
    torch.testing.assert_close(loc, ref_loc)
    torch.testing.assert_close(lv, ref_lv)
    loc_again.sum().backward()
    assert torch.isfinite(mu.grad).all()


@pytest.mark.slow
@pytest.mark.parametrize("m, unrolled", [(2, True), (5, True), (3, False)])
def test_compiled_path_equals_eager(m, unrolled, monkeypatch):
    """``fused=True`` through torch.compile: values and all three gradients as the eager function (M = 2 included:
    compiling the eager autograd graph once gave a wrong log-variance gradient there), with the unrolled bodies and
    with the row bodies used beyond ``UNROLL_MAX_EXPERTS``."""
    compile_path(monkeypatch)
    if not unrolled:
        monkeypatch.setattr(hellinger_module, "UNROLL_MAX_EXPERTS", 1)
    monkeypatch.setattr(hellinger_module, "_COMPILED", {})
    monkeypatch.setattr(hellinger_module, "_COMPILE_FAILED", [])
    mu, logvar, weights, mask = experts(m, batch=4, dim=8, seed=m)
    results = []
    for fused in (False, True):
        inputs = [t.float().clone().requires_grad_(True) for t in (mu, logvar, weights[:, :m])]
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback would compare eager with eager
            loc, lv = opf.hellinger(*inputs[:2], weights=inputs[2], mask=mask, fused=fused)
        (loc.sin().sum() + (lv * lv).sum()).backward()
        results.append((loc, lv, *(t.grad for t in inputs)))
    assert not hellinger_module._COMPILE_FAILED
    for eager, fused in zip(*results):
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [1, 2, 3, 5])
@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(case) or "plain")
def test_unrolled_bodies_of_the_fused_path_match_and_gradcheck(m, case, monkeypatch):
    """``fused=True`` with compilation failing runs the unrolled bodies (the ones torch.compile fuses) eagerly: their
    values equal the written-out mixture and their analytic gradients pass gradcheck (float64; masks, weights, the
    prior expert, M = 1 and 2 included)."""
    compile_path(monkeypatch)
    monkeypatch.setattr(hellinger_module, "_COMPILED", {})
    monkeypatch.setattr(hellinger_module, "_COMPILE_FAILED", ["compilation disabled by the test"])
    mu, logvar, weights, mask = experts(m, batch=2, dim=3, seed=m + 10)
    kwargs = arguments(case, m, weights, mask)
    loc, lv = opf.hellinger(mu, logvar, fused=True, **kwargs)
    ref_loc, ref_lv = reference_hellinger(mu, logvar, **kwargs)
    torch.testing.assert_close(loc, ref_loc, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lv, ref_lv, rtol=1e-12, atol=1e-12)
    given = kwargs.pop("weights", None)
    inputs = [mu.requires_grad_(True), logvar.requires_grad_(True)]
    if given is not None:
        inputs.append(given.clone().requires_grad_(True))

    def pooled(mu, logvar, *maybe_weights):
        return opf.hellinger(mu, logvar, weights=maybe_weights[0] if maybe_weights else None, fused=True, **kwargs)

    assert torch.autograd.gradcheck(pooled, inputs, fast_mode=m > 2)


@pytest.mark.parametrize("fused", [False, True])
def test_float32_tiny_variances_far_apart_in_standard_deviations(fused, monkeypatch):
    """float32 log-variances near -100 with means many standard deviations apart: the squared deviations, rescaled
    by the largest variance alone, overflowed (NaN log-variance); rescaled by the spread too they do not."""
    monkeypatch.setattr(hellinger_module, "_COMPILED", {})
    monkeypatch.setattr(hellinger_module, "_COMPILE_FAILED", ["compilation disabled by the test"])
    mu = torch.tensor([[[1.0, 2.0]], [[1.0, 2.5]]], dtype=torch.float64)
    logvar = torch.tensor([[[-95.0, -120.0]], [[-90.0, -100.0]]], dtype=torch.float64)
    loc64, lv64 = reference_hellinger(mu, logvar)
    mu32, lv32 = mu.float().requires_grad_(True), logvar.float().requires_grad_(True)
    loc, lv = opf.hellinger(mu32, lv32, fused=fused)
    torch.testing.assert_close(loc.double(), loc64, rtol=1e-6, atol=0)
    torch.testing.assert_close(lv.double(), lv64, rtol=1e-6, atol=0)
    (loc.sum() + lv.sum()).backward()
    assert torch.isfinite(mu32.grad).all() and torch.isfinite(lv32.grad).all()


@pytest.mark.parametrize("m", [2, 4])
def test_eager_pass_in_slices_of_the_batch_equals_one_pass_and_gradchecks(m, monkeypatch):
    """On the CPU the eager function works through the batch in slices (``CPU_CHUNK_BYTES``): with two batch axes,
    per-sample weights and masks, slices of two rows (the last one shorter) give the values and gradients of one
    pass over the whole batch, and pass gradcheck."""
    g = torch.Generator().manual_seed(m)
    mu = torch.randn(m, 3, 3, 4, generator=g, dtype=torch.float64)
    logvar = torch.randn(m, 3, 3, 4, generator=g, dtype=torch.float64)
    weights = (torch.rand(3, 3, m, generator=g, dtype=torch.float64) + 0.2)
    mask = torch.rand(m, 3, 3, generator=g) > 0.3
    mask[0] = True
    results = []
    for chunk in (1 << 40, 2 * (m - 1) * 4 * 8):  # everything at once; two rows of (M - 1) pairs of float64
        monkeypatch.setattr(chunks_module, "CPU_CHUNK_BYTES", chunk)
        inputs = [t.clone().requires_grad_(True) for t in (mu, logvar, weights)]
        loc, lv = opf.hellinger(*inputs[:2], weights=inputs[2], mask=mask)
        (loc.sin().sum() + (lv * lv).sum()).backward()
        results.append((loc, lv, *(t.grad for t in inputs)))
    for whole, sliced in zip(*results):
        torch.testing.assert_close(sliced, whole, rtol=1e-13, atol=1e-13)
    inputs = [t.clone().requires_grad_(True) for t in (mu, logvar, weights)]
    assert torch.autograd.gradcheck(lambda a, b, w: opf.hellinger(a, b, weights=w, mask=mask), inputs)


@pytest.mark.parametrize("batched", ["mu", "logvar", "log_weights"])
def test_vmap_over_one_argument_equals_a_loop(batched):
    """``torch.func.vmap`` with one argument batched and the others shared: the forward and backward bodies must not
    write a batched operand into an unbatched tensor in place."""
    from torch.func import vmap

    g = torch.Generator().manual_seed(1)
    args = {"mu": torch.randn(3, 4, generator=g), "logvar": torch.randn(3, 4, generator=g),
            "log_weights": torch.log(torch.rand(3, generator=g) + 0.2)}
    stack = {"mu": torch.randn(5, 3, 4, generator=g), "logvar": torch.randn(5, 3, 4, generator=g),
             "log_weights": torch.log(torch.rand(5, 3, generator=g) + 0.2)}[batched]
    names = list(args)

    def loss(*values):
        mean, logvar = hellinger_module.hellinger_moments(*values)
        return mean.sin().sum() + (logvar * logvar).sum()

    def value_and_grads(one):
        values = [one if name == batched else args[name] for name in names]
        return torch.func.grad_and_value(loss, argnums=(0, 1, 2))(*values)

    grads, value = vmap(value_and_grads)(stack)
    for k in range(stack.shape[0]):
        grads_k, value_k = value_and_grads(stack[k])
        torch.testing.assert_close(value[k], value_k)
        for got, want in zip(grads, grads_k):
            torch.testing.assert_close(got[k], want)


@pytest.mark.parametrize("output", [0, 1])
def test_jacobians_of_one_output_by_jacrev_equal_autograd(output):
    """``jacrev`` of the pool's mean (or log-variance) alone, and of the pairs' means alone: the other outputs'
    incoming gradients are then unbatched zeros beside batched ones."""
    g = torch.Generator().manual_seed(2)
    mu, logvar = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    log_w = torch.log(torch.rand(3, generator=g) + 0.2)
    pooled = lambda m: hellinger_module.hellinger_moments(m, logvar, log_w)[output]  # noqa: E731
    torch.testing.assert_close(torch.func.jacrev(pooled)(mu), torch.autograd.functional.jacobian(pooled, mu))
    pairs = lambda m: hellinger_module.pair_components(m, logvar)[1 + output]  # noqa: E731
    torch.testing.assert_close(torch.func.jacrev(pairs)(mu), torch.autograd.functional.jacobian(pairs, mu))


def test_float32_gradients_with_a_far_expert_of_negligible_weight():
    """float32, a present expert 1e19 away with weight e^-50: the pool's variance relative to its scale falls below
    e^-88, whose reciprocal overflowed and made every gradient NaN (0 * inf); the float64 gradients are the
    reference, to 1e-4: in this regime the far expert's mixture weight (e^-100) and the variances relative to the
    scale (e^-91) are subnormal float32 numbers with a few digits each."""
    results = []
    for dtype in (torch.float32, torch.float64):
        mu = torch.tensor([[0.0, 0.0], [1e19, 1e19]], dtype=dtype, requires_grad=True)
        logvar = torch.zeros(2, 2, dtype=dtype, requires_grad=True)
        log_w = torch.tensor([0.0, -50.0], dtype=dtype, requires_grad=True)
        mean, lv = hellinger_module.hellinger_moments(mu, logvar, log_w)
        (mean.sum() + lv.sum()).backward()
        results.append((mean, lv, mu.grad, logvar.grad, log_w.grad))
    for low, high in zip(*results):
        assert torch.isfinite(low).all()
        torch.testing.assert_close(low.double(), high, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", ["eager", "fused", "unrolled", "subsets"])
@pytest.mark.parametrize("apart", [1.0, 3.0, 30.0])
def test_float32_close_narrow_experts_far_from_the_reference(path, apart, monkeypatch):
    """float32: experts A and B ``apart`` of their standard deviations (1e-6) from each other, 1 001 from the
    reference C. Their difference was taken from their offsets to C, whose rounding (6e-5 at
    1e3) swallowed it: S_AB came out 1 instead of e^-112 at 30 standard deviations (mean -307 for -470), and the
    gradients were wrong at every separation. Reference: the float64 pool of the same float32 inputs (written out
    by ``reference_hellinger``; the gradients by autograd through it); the subset path (MoHELVAE) against the same
    per subset (its offsets' rounding made the subset of A and B a variance of e^-7 for e^-22 and the subset of B
    alone a mean 30 standard deviations off: such batches now run in float64)."""
    monkeypatch.setattr(hellinger_module, "_COMPILED", {})
    monkeypatch.setattr(hellinger_module, "_COMPILE_FAILED", ["compilation disabled by the test"])
    if path == "unrolled":  # the bodies torch.compile fuses, run eagerly
        compile_path(monkeypatch)
    # float32 values (the float64 reference pools exactly these); C first and of the largest weight: the reference
    # of both the pool and the subsets' shared components
    mu = torch.tensor([[[-1000.0, 500.0]], [[1.0, -2.0]], [[1.0 + apart * 1e-6, -2.0 + apart * 1e-6]]]).float()
    logvar = torch.tensor([[[0.0, 1.0]], [[-27.631, -27.0]], [[-27.631, -28.0]]]).float()
    weights = torch.tensor([[0.45, 0.3, 0.25]]).float()
    results = []
    for dtype in (torch.float32, torch.float64):
        inputs = [t.to(dtype, copy=True).requires_grad_(True) for t in (mu, logvar)]
        if path == "subsets" and dtype == torch.float32:
            mix = opf.subset_mixture(opf.hellinger, *inputs, weights=weights.to(dtype))
            loc, lv = mix.loc, mix.logvar
        elif path == "subsets":
            def pool(mu, logvar, weights, prior_expert):  # one sample's experts (M, D)
                loc, lv = reference_hellinger(mu.unsqueeze(1), logvar.unsqueeze(1), weights=weights,
                                              prior_expert=prior_expert)
                return loc[0], lv[0]

            loc, lv = per_subset(pool, *inputs, torch.ones(3, 1, dtype=torch.bool), weights[0].double())
        elif dtype == torch.float32:
            loc, lv = opf.hellinger(*inputs, weights=weights.to(dtype), fused=path != "eager")
        else:
            loc, lv = reference_hellinger(*inputs, weights=weights.to(dtype))
        (loc.sum() + lv.sum()).backward()
        results.append((loc, lv, *(t.grad for t in inputs)))
    (loc, lv, *grads), (ref_loc, ref_lv, *ref_grads) = results
    # the means to float32's rounding of each (a few ulps), and to a hundredth of the narrowest standard deviation
    torch.testing.assert_close(loc.double(), ref_loc.detach(), rtol=4e-7, atol=1e-8)
    torch.testing.assert_close(lv.double(), ref_lv.detach(), rtol=0, atol=2e-5 * ref_lv.abs().max().item())
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("aggregator", [opf.poe, opf.wasserstein_barycenter])
def test_float32_subsets_of_narrow_experts_far_from_the_reference(aggregator):
    """MoPoE's and MWB-VAE's shared subset sums take offsets from one expert per sample too: a subset of narrow
    experts 1e3 from it had their rounding in its mean. Against each subset pooled on its own in float64."""
    mu = torch.tensor([[[-1000.0, 500.0]], [[1.0, -2.0]], [[1.0 + 3e-6, -2.0 + 3e-6]]]).float()
    logvar = torch.tensor([[[0.0, 1.0]], [[-27.631, -27.0]], [[-27.631, -28.0]]]).float()
    mix = opf.subset_mixture(aggregator, mu, logvar)
    ref_loc, ref_lv = per_subset(lambda m, v, prior_expert: aggregator(m, v, prior_expert=prior_expert), mu.double(),
                                 logvar.double(), torch.ones(3, 1, dtype=torch.bool))
    torch.testing.assert_close(mix.loc.double(), ref_loc, rtol=4e-7, atol=1e-8)
    torch.testing.assert_close(mix.logvar.double(), ref_lv, rtol=1e-6, atol=1e-5)
    assert torch.equal(mix.loc[0, 2], mu[2, 0])  # a subset of one expert is that expert


@pytest.mark.parametrize("level", [-90.0, -100.0])
@pytest.mark.parametrize("how", ["mask", "zero weight", "prior expert of zero weight"])
def test_float32_an_absent_expert_beside_narrow_present_ones(level, how):
    """An absent expert (masked, or of weight zero) stood in as N(0, 1), whose variance relative to present experts
    of log-variance -90 overflows float32: the pool and its gradients were NaN. The pool must be that of the present
    experts alone. The prior expert of weight zero, appended after the stand-ins were chosen, kept its N(0, 1)."""
    mu = torch.tensor([[[0.0, 1e-20]], [[1e-20, 0.0]], [[5.0, 5.0]]], dtype=torch.float32)  # (M, B, D)
    logvar = torch.tensor([[[level, level]], [[level, level]], [[0.0, 0.0]]], dtype=torch.float32)
    loc64, lv64 = reference_hellinger(mu[:2].double(), logvar[:2].double())
    options = {"mask": {"mask": torch.tensor([[True], [True], [False]])},
               "zero weight": {"weights": torch.tensor([1.0, 1.0, 0.0], dtype=torch.float32)},
               "prior expert of zero weight": {"weights": torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float32),
                                               "mask": torch.tensor([[True], [True], [False]]),
                                               "prior_expert": True}}[how]
    mu32, lv32 = mu.clone().requires_grad_(True), logvar.clone().requires_grad_(True)
    loc, lv = opf.hellinger(mu32, lv32, **options)
    torch.testing.assert_close(loc.double(), loc64, rtol=1e-6, atol=1e-30)
    torch.testing.assert_close(lv.double(), lv64, rtol=1e-6, atol=0)
    (loc.sum() + lv.sum()).backward()
    assert torch.isfinite(mu32.grad).all() and torch.isfinite(lv32.grad).all()
    assert not mu32.grad[2].any() and not lv32.grad[2].any()  # no part of the pool


@pytest.mark.parametrize("aggregator", [opf.hellinger, opf.poe, opf.moe])
def test_mixed_dtypes_promote_as_torch_does(aggregator):
    """float32 means with float64 log-variances: poe promoted, hellinger failed deep inside with a dtype error."""
    mu, logvar = torch.randn(3, 2, 4, dtype=torch.float32), torch.randn(3, 2, 4, dtype=torch.float64)
    got, want = aggregator(mu, logvar), aggregator(mu.double(), logvar)
    for a, b in zip(got if isinstance(got, tuple) else (got.loc, got.logvar),
                    want if isinstance(want, tuple) else (want.loc, want.logvar)):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _mpmath_hellinger_moments(means, log_variances, weights):
    """Mean and log-variance of the order-1/2 pool of one-dimensional Gaussians, its mixture written out in
    mpmath at 50 digits (an independent reference)."""
    import mpmath

    with mpmath.workdps(50):
        m = [mpmath.mpf(float(x)) for x in means]
        v = [mpmath.exp(mpmath.mpf(float(x))) for x in log_variances]
        lam = [mpmath.mpf(float(x)) for x in weights]
        parts = []
        for i, j in itertools.product(range(len(m)), repeat=2):
            s = mpmath.sqrt(2 * mpmath.sqrt(v[i] * v[j]) / (v[i] + v[j])) * mpmath.exp(
                -(m[i] - m[j]) ** 2 / (4 * (v[i] + v[j])))
            parts.append((lam[i] * lam[j] * s, (m[i] * v[j] + m[j] * v[i]) / (v[i] + v[j]),
                          2 * v[i] * v[j] / (v[i] + v[j])))
        total = sum(p[0] for p in parts)
        mean = sum(p[0] * p[1] for p in parts) / total
        variance = sum(p[0] * (p[2] + (p[1] - mean) ** 2) for p in parts) / total
        return float(mean), float(mpmath.log(variance))


@pytest.mark.parametrize("dtype, small, huge", [(torch.float64, 1e-300, 1000.0), (torch.float64, 1e-200, 1000.0),
                                                (torch.float64, 1e-100, 1000.0), (torch.float32, 1e-25, 100.0),
                                                (torch.float32, 1e-20, 60.0)])
@pytest.mark.parametrize("fused", [False, True])
def test_an_expert_of_tiny_weight_and_huge_variance_keeps_its_share(dtype, small, huge, fused):
    """An expert whose squared weight relative to the largest underflows (1e-200 squared is 1e-400) set the scale
    of every variance with its own (e^1000) and was then weighed by zero: the pool's variance came out 0 (a
    log-variance of -inf for 79.2) or lost the expert's share to the others' (finite and wrong). Such pools are
    moment-matched from their written-out mixture with the weights in log space; against mpmath, with finite
    gradients, and the same through ``holder_mixture(...).moments()``."""
    mu = torch.tensor([[0.5], [39.8], [-1.0]], dtype=dtype)
    logvar = torch.tensor([[0.3], [huge], [-0.2]], dtype=dtype)
    weights = torch.tensor([0.47, small, 0.48], dtype=dtype)
    want_mean, want_lv = _mpmath_hellinger_moments(mu.flatten(), logvar.flatten(), weights)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    a, b = mu.clone().requires_grad_(True), logvar.clone().requires_grad_(True)
    loc, lv = opf.hellinger(a, b, weights=weights, fused=fused)
    assert abs(loc.item() - want_mean) <= tolerance * (1 + abs(want_mean)), (loc.item(), want_mean)
    assert abs(lv.item() - want_lv) <= tolerance * (1 + abs(want_lv)), (lv.item(), want_lv)
    (loc.sum() + lv.sum()).backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    mixture_mean, mixture_lv = opf.holder_mixture(mu, logvar, 0.5, weights=weights).moments()
    assert abs(mixture_lv.item() - want_lv) <= tolerance * (1 + abs(want_lv)), (mixture_lv.item(), want_lv)
    assert abs(mixture_mean.item() - want_mean) <= tolerance * (1 + abs(want_mean))


def test_the_written_out_route_has_the_fast_paths_gradients():
    """The route taken where weights underflow (``_mixture_moments``) against the fast autograd function on
    ordinary inputs (weights, a masked expert), and gradcheck."""
    g = torch.Generator().manual_seed(11)
    mu = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    logvar = 0.5 * torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    log_w = torch.rand(3, 4, generator=g, dtype=torch.float64).log()
    log_w[1, 2] = -float("inf")
    inputs = (mu.movedim(0, -2), logvar.movedim(0, -2))
    fast = hellinger_module._HellingerMoments.apply(*inputs, log_w, False, None)[:2]
    slow = hellinger_module._mixture_moments(*inputs, log_w)
    for want, got in zip(fast, slow):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: hellinger_module._mixture_moments(a, b, log_w),
                                    tuple(t.clone().requires_grad_(True) for t in inputs))


@pytest.mark.parametrize("small", [1e-200, 1e-100])
def test_subset_mixtures_keep_an_expert_of_tiny_weight_and_huge_variance(small):
    """MoHELVAE's shared components lost the share of an expert whose squared weight underflows as the fast pool
    did: the subset {0, 1} pooled to a log-variance of 0.3 for 80.5. Every subset against mpmath."""
    mu = torch.tensor([[[0.5]], [[39.8]], [[-1.0]]], dtype=torch.float64)
    logvar = torch.tensor([[[0.3]], [[1000.0]], [[-0.2]]], dtype=torch.float64)
    weights = torch.tensor([0.47, small, 0.48], dtype=torch.float64)
    mixture = opf.subset_mixture(opf.hellinger, mu, logvar, weights=weights)
    for k, row in enumerate(opf.all_subsets(3)):
        members = row.nonzero().flatten()
        want_mean, want_lv = _mpmath_hellinger_moments(mu[members].flatten(), logvar[members].flatten(),
                                                      weights[members])
        got_mean, got_lv = mixture.loc[0, k, 0].item(), mixture.logvar[0, k, 0].item()
        assert abs(got_lv - want_lv) <= 1e-12 * (1 + abs(want_lv)), (row.tolist(), got_lv, want_lv)
        assert abs(got_mean - want_mean) <= 1e-12 * (1 + abs(want_mean)), (row.tolist(), got_mean, want_mean)


def test_second_derivatives_through_the_pool_are_right_or_refused():
    """The analytic backward passes are not differentiable, and ``once_differentiable`` alone handed back gradients
    without a graph under ``create_graph=True``: the Hessian of an alpha = 1/2 pool's mean came out zero. The
    alpha = 1/2 pool now differentiates its mixture written out there (against central differences of its first
    gradient; gradgradcheck with weights, a mask, M = 2, eager and fused, weights beyond the float's range); the other
    analytic backward passes raise."""
    from torch.distributions import Normal

    import opinionpool
    from opinionpool.wasserstein import covariance_barycenter

    log_scale, weights = torch.tensor([0.0, -1.0, 0.5]), torch.tensor([0.2, 0.5, 0.3])
    loc = torch.tensor([0.0, 2.0, -1.0])
    for moment in ("mean", "variance"):
        def pooled(at, moment=moment):
            return getattr(opinionpool.holder(Normal(at, log_scale.exp()), alpha=0.5, weights=weights), moment)

        def first(at):
            at = at.clone().requires_grad_(True)
            return torch.autograd.grad(pooled(at), at)[0]

        hessian = torch.autograd.functional.hessian(pooled, loc)
        central = torch.stack([(first(loc + 1e-5 * e) - first(loc - 1e-5 * e)) / 2e-5 for e in torch.eye(3)])
        assert hessian.abs().max() > 0.01
        torch.testing.assert_close(hessian, central, rtol=0, atol=1e-8)
    g = torch.Generator().manual_seed(0)
    mu, logvar = (torch.randn(3, 2, 4, generator=g).requires_grad_(True) for _ in range(2))
    w = (torch.rand(2, 3, generator=g) + 0.2).requires_grad_(True)
    mask = torch.tensor([[True, False], [True, True], [True, True]])
    assert torch.autograd.gradgradcheck(lambda a, b, c: opf.hellinger(a, b, weights=c, mask=mask), (mu, logvar, w))
    assert torch.autograd.gradgradcheck(lambda a, b: opf.hellinger(a[:2], b[:2], fused=True), (mu, logvar))
    assert torch.autograd.gradgradcheck(lambda a, b: opf.hellinger(a[:1], b[:1]), (mu, logvar))
    # one input requiring grad: the other's outputs have no graph (one expert's mean raised "does not require grad")
    assert torch.autograd.gradgradcheck(lambda b: opf.hellinger(mu.detach()[:1], b[:1]), (logvar,))
    assert torch.autograd.gradgradcheck(lambda b: opf.hellinger(mu.detach(), b), (logvar,))
    assert torch.autograd.gradgradcheck(lambda c: opf.hellinger(mu.detach(), logvar.detach(), weights=c), (w,))
    # a weight ratio below the float's range takes the mixture written out with the analytic pair components, whose
    # backward pass raised here; it differentiates the plain pair components now (only mu requiring grad too)
    tiny = torch.tensor([1.0, 0.5, 1e-170])
    assert torch.autograd.gradgradcheck(lambda a, b: opf.hellinger(a, b, weights=tiny), (mu, logvar))
    assert torch.autograd.gradgradcheck(lambda a: opf.hellinger(a, logvar.detach(), weights=tiny), (mu,))
    factor = torch.randn(3, 2, 2, generator=g, dtype=torch.float64)
    covariances = (factor @ factor.transpose(-1, -2) + torch.eye(2)).requires_grad_(True)
    for refused, leaf in ((lambda: opf.subset_mixture(opf.poe, mu, logvar).loc, mu),
                          (lambda: opf.subset_mixture(opf.hellinger, mu, logvar).loc, mu),
                          (lambda: covariance_barycenter(covariances, torch.ones(3) / 3), covariances)):
        with pytest.raises(RuntimeError, match="has no second derivative here"):
            torch.autograd.grad(refused().sum(), leaf, create_graph=True)
    # first derivatives under torch.func take the analytic passes, as before
    grad = torch.func.grad(lambda a: opf.hellinger(a, logvar.detach())[0].sum())(mu.detach())
    torch.testing.assert_close(grad, torch.autograd.grad(opf.hellinger(mu, logvar)[0].sum(), mu)[0])
