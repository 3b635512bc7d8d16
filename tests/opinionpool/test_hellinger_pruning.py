"""The eager order-1/2 pool leaves out pairs of experts whose components cannot change it
(``opinionpool._hellinger.kept_partners``): results and gradients against the mixture written out pair by pair
(``reference_hellinger``, every pair kept, differentiated by autograd), every pair left out against its exact
Bhattacharyya coefficient, and the cases where nothing may be left out."""

import math

import pytest
import torch

import opinionpool._chunks as chunks_module
import opinionpool._hellinger as hellinger_module
import opinionpool.functional as opf
from tests.opinionpool.test_hellinger_function import reference_hellinger
from tests.opinionpool.test_subset_shared import per_subset


def clustered(dtype=torch.float64, far=60.0, seed=0, batch=3, dim=6):
    """Five experts ``(M, B, D)`` in two clusters: 0, 1 and 3 overlap, 2 and 4 overlap, the clusters ``far`` apart
    (in units of about one standard deviation). The pairs that matter are then (0, 1), (0, 3), (1, 3) and (2, 4):
    expert 0's partners are not a contiguous run (the indexed path)."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.tensor([0.0, 0.0, far, 0.0, far]).view(5, 1, 1)
    mu = (centre + 0.5 * torch.randn(5, batch, dim, generator=g, dtype=torch.float64)).to(dtype)
    logvar = (0.4 * torch.randn(5, batch, dim, generator=g, dtype=torch.float64)).to(dtype)
    weights = (torch.rand(batch, 5, generator=g, dtype=torch.float64) + 0.1).to(dtype)
    return mu, logvar, weights


def log_bhattacharyya(mu, logvar):
    """Exact ``log S_ij`` ``(B, M, M)`` of experts ``(M, B, D)`` in float64, written out."""
    mu, logvar = mu.double(), logvar.double()
    vi, vj = logvar.exp().unsqueeze(1), logvar.exp().unsqueeze(0)
    delta = mu.unsqueeze(1) - mu.unsqueeze(0)
    terms = 0.5 * torch.log(2 * (vi * vj).sqrt() / (vi + vj)) - delta**2 / (4 * (vi + vj))
    return terms.sum(-1).permute(2, 0, 1)


def kept(mu, logvar, log_w):
    return hellinger_module.kept_partners(mu.movedim(0, -2), logvar.movedim(0, -2), log_w)


def test_clusters_keep_exactly_the_overlapping_pairs():
    mu, logvar, weights = clustered()
    assert kept(mu, logvar, weights.log()) == ((1, 3), (3,), (4,), (), ())
    # an expert absent from every sample has no pairs; one absent from some samples keeps them for the others
    log_w = weights.log()
    log_w[:, 4] = -math.inf
    log_w[0, 1] = -math.inf
    assert kept(mu, logvar, log_w) == ((1, 3), (3,), (), (), ())
    # overlapping experts keep every pair: None, the path without index bookkeeping
    assert kept(0.01 * mu, logvar, weights.log()) is None


@pytest.mark.parametrize("case", ["plain", "weights", "mask", "mask-weights-prior"])
def test_values_and_gradients_equal_the_written_out_mixture(case):
    """float64, asymmetric per-sample weights, masks (expert 4 absent in one sample) and the prior expert: values to
    1e-12 and gradients to 1e-10 of the mixture with every pair, whose far pairs weigh about e^-200."""
    mu, logvar, weights = clustered()
    mask = torch.ones(5, 3, dtype=torch.bool)
    mask[4, 1] = False
    kwargs = {}
    if "weights" in case:
        kwargs["weights"] = torch.cat((weights, torch.full((3, 1), 0.3, dtype=torch.float64)), -1) \
            if "prior" in case else weights
    if "mask" in case:
        kwargs["mask"] = mask
    if "prior" in case:
        kwargs["prior_expert"] = True
    inputs = [mu.clone().requires_grad_(True), logvar.clone().requires_grad_(True)]
    if "weights" in kwargs:
        inputs.append(kwargs.pop("weights").clone().requires_grad_(True))
    results = []
    for pool in (opf.hellinger, reference_hellinger):
        for t in inputs:
            t.grad = None
        loc, lv = pool(*inputs[:2], weights=inputs[2] if len(inputs) > 2 else None, **kwargs)
        (loc.sin().sum() + (lv * lv).sum()).backward()
        results.append((loc.detach(), lv.detach(), *(t.grad.clone() for t in inputs)))
    (loc, lv, *grads), (ref_loc, ref_lv, *ref_grads) = results
    torch.testing.assert_close(loc, ref_loc, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lv, ref_lv, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_float32_pruned_pool_is_as_accurate_as_every_pair():
    """float32 against float64: leaving pairs out changes nothing beyond float32's rounding. The two paths sum the
    pairs in different orders, so they need not agree bit for bit (on some CPUs they did, on others the gradients
    differ by 1.3e-6 of their scale); what must hold is that, for every output and gradient, the pruned path is no
    further from the float64 pool with every pair than the float32 path with every pair, give or take a few float32
    steps of the output's scale, and that the moments are within 1e-5 of float64."""
    mu, logvar, weights = clustered(torch.float32, batch=16, dim=32)
    outputs = []
    for dtype, partners in ((torch.float32, kept(mu, logvar, weights.log())), (torch.float32, None),
                            (torch.float64, None)):
        assert partners is None or sum(map(len, partners)) == 4
        inputs = [t.to(dtype).movedim(0, -2).clone().requires_grad_(True) for t in (mu, logvar, weights.log())]
        mean, lv = hellinger_module._HellingerMoments.apply(*inputs, False, partners)[:2]
        (mean.sin().sum() + (lv * lv).sum()).backward()
        outputs.append([t.detach().double() for t in (mean, lv, *(t.grad for t in inputs))])
    for name, pruned, full, exact in zip(("mean", "logvar", "grad mu", "grad logvar", "grad log_w"), *outputs):
        step = torch.finfo(torch.float32).eps * exact.abs().max().item()
        assert (pruned - exact).abs().max() <= (full - exact).abs().max() + 4 * step, name
    ref_loc, ref_lv = reference_hellinger(mu.double(), logvar.double(), weights=weights.log().double().exp())
    torch.testing.assert_close(outputs[0][0], ref_loc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[0][1], ref_lv, rtol=1e-5, atol=1e-5)
    # the float64 path with every pair is the written-out mixture
    torch.testing.assert_close(outputs[2][0], ref_loc, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_pair_left_out_meets_the_bound_with_its_exact_coefficient(dtype):
    """Random experts at many separations, scales and weight spreads: for each pair left out, in every sample,
    ``log S + |log w_i - log w_j| + log(10 P) < 3 log eps`` with the exact (float64) ``log S``; and some pairs are
    left out and some kept across the cases (the check is not vacuous)."""
    eps = torch.finfo(dtype).eps
    left_out = kept_somewhere = 0
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        m, batch, dim = 2 + seed % 4, 4, 1 + seed % 40
        # separations about the threshold: sum_d Delta^2 / (8 v) from 10 to 1000 nats
        target = 10 ** (1 + 2 * torch.rand((), generator=g).item())
        spread = math.sqrt(8 * target / dim)
        scale = 10 ** (6 * torch.rand((), generator=g).item() - 3)
        mu = (spread * torch.randn(m, batch, dim, generator=g, dtype=torch.float64) * scale + 1e3 * scale).to(dtype)
        logvar = (2 * math.log(scale) + torch.randn(m, batch, dim, generator=g, dtype=torch.float64)).to(dtype)
        log_w = (3 * torch.randn(batch, m, generator=g, dtype=torch.float64)).log_softmax(-1).to(dtype)
        partners = kept(mu, logvar, log_w)
        if partners is None:
            kept_somewhere += 1
            continue
        log_s = log_bhattacharyya(mu, logvar)
        lw = log_w.double()
        for i in range(m):
            for j in range(i + 1, m):
                if j in partners[i]:
                    kept_somewhere += 1
                    continue
                left_out += 1
                criterion = log_s[:, i, j] + (lw[:, i] - lw[:, j]).abs() + math.log(10 * m * (m - 1) / 2)
                assert (criterion < 3 * math.log(eps)).all(), (seed, i, j, criterion)
    assert left_out > 20 and kept_somewhere > 20, (left_out, kept_somewhere)


def recorded_choices(monkeypatch, module):
    """Every choice of ``kept_partners`` as ``module`` looks it up, appended to the list returned."""
    seen = []
    original = hellinger_module.kept_partners

    def recording(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(module, "kept_partners", recording)
    return seen


def test_nothing_is_left_out_for_non_finite_inputs_or_under_transforms(monkeypatch):
    mu, logvar, weights = clustered()
    log_w = weights.log()
    # a NaN keeps every pair of its expert (NaN compares false), so the pool propagates it as with every pair
    bad = mu.clone()
    bad[2, 0, 0] = math.nan
    assert kept(bad, logvar, log_w) == ((1, 2, 3), (2, 3), (3, 4), (), ())
    pruned = opf.hellinger(bad, logvar, weights=weights, validate_args=False)
    full = reference_hellinger(bad, logvar, weights=weights)
    for got, want in zip(pruned, full):
        assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
    seen = recorded_choices(monkeypatch, hellinger_module)
    x, lv = mu.movedim(0, -2), logvar.movedim(0, -2)
    moments = hellinger_module.hellinger_moments
    torch.func.vmap(lambda m: moments(m, lv[0], log_w[0])[0])(x)
    torch.func.grad(lambda m: moments(m, lv, log_w)[0].sum())(x)
    moments(x, lv, log_w)
    assert seen == [None, None, ((1, 3), (3,), (4,), (), ())]


def test_pruned_pool_in_slices_of_the_batch_equals_one_pass_and_gradchecks(monkeypatch):
    """The slices of the batch (``CPU_CHUNK_BYTES``) share one choice of pairs; gradcheck on the pruned pool (the
    pairs left out carry gradients far below gradcheck's tolerance)."""
    mu, logvar, weights = clustered(batch=5, dim=3)
    results = []
    for chunk in (1 << 40, 2 * 4 * 3 * 8):  # the whole batch; two rows of (M - 1) pairs of float64
        monkeypatch.setattr(chunks_module, "CPU_CHUNK_BYTES", chunk)
        inputs = [t.clone().requires_grad_(True) for t in (mu, logvar, weights)]
        loc, lv = opf.hellinger(*inputs[:2], weights=inputs[2])
        (loc.sin().sum() + (lv * lv).sum()).backward()
        results.append((loc, lv, *(t.grad for t in inputs)))
    for whole, sliced in zip(*results):
        torch.testing.assert_close(sliced, whole, rtol=1e-13, atol=1e-13)
    inputs = [t.clone().requires_grad_(True) for t in (mu, logvar, weights)]
    assert torch.autograd.gradcheck(lambda a, b, w: opf.hellinger(a, b, weights=w), inputs)


def written_out(mu, logvar, weights=None, prior_expert=False):
    """``reference_hellinger`` of one sample's experts ``(n, D)``."""
    loc, lv = reference_hellinger(mu[:, None], logvar[:, None], weights=None if weights is None else weights[None],
                                  prior_expert=prior_expert)
    return loc[0], lv[0]


@pytest.mark.parametrize("prior_expert", [False, True])
def test_subset_mixtures_leave_out_pairs_and_match_every_subset_written_out(prior_expert, monkeypatch):
    """MoHELVAE's shared components (``subset_mixture(hellinger, ...)``) leave out the same pairs as the pool of all
    experts; every subset's moments and the gradients of a loss over all of them, per-sample weights and a mask,
    against each subset's mixture written out with every pair (autograd through it)."""
    mu, logvar, weights = clustered(batch=3, dim=4)
    mask = torch.ones(5, 3, dtype=torch.bool)
    mask[1, 2] = False
    weights = torch.cat((weights, torch.full((3, 1), 0.4, dtype=torch.float64)), -1)[:, :5 + prior_expert]
    seen = recorded_choices(monkeypatch, opf)
    results = []
    for shared in (True, False):
        inputs = [t.clone().requires_grad_(True) for t in (mu, logvar, weights)]
        if shared:
            mix = opf.subset_mixture(opf.hellinger, inputs[0], inputs[1], mask=mask, weights=inputs[2].unsqueeze(-2),
                                     prior_expert=prior_expert)
            kept, loc, lv = torch.isfinite(mix.log_weights), mix.loc, mix.logvar
        else:
            loc, lv = per_subset(written_out, inputs[0], inputs[1], mask, weights=inputs[2], prior_expert=prior_expert)
            kept = ~loc[..., 0].isnan()
            loc, lv = torch.where(kept.unsqueeze(-1), loc, 0), torch.where(kept.unsqueeze(-1), lv, 0)
        k = kept.unsqueeze(-1)
        ((loc.sin() * k).sum() + (lv * lv * k).sum()).backward()
        results.append((kept, loc.detach(), lv.detach(), *(t.grad for t in inputs)))
    # the prior expert N(0, 1) overlaps the cluster about 0 (experts 0, 1 and 3)
    assert seen == [((1, 3, 5), (3, 5), (4,), (5,), (), ()) if prior_expert else ((1, 3), (3,), (4,), (), ())]
    (kept, *shared), (expected_kept, *expected) = results
    assert torch.equal(kept, expected_kept)
    torch.testing.assert_close(shared[0][kept], expected[0][kept], rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(shared[1][kept], expected[1][kept], rtol=1e-11, atol=1e-11)
    for got, want in zip(shared[2:], expected[2:]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("logvar", [-560.8380179465755, -650.5, -31.7, 0.0, 300.25])
def test_a_pair_just_short_of_the_criterion_is_kept_at_any_scale(logvar):
    """Two experts of equal variance ``e^logvar``, ``log S`` 3e-12 nats short of leaving them out (mpmath): kept.
    The scale ``e^(-(logvar + log 8) / 2)`` once rounded its argument to an ulp of ``|logvar|``, enough at -560 to
    leave such a pair out."""
    import mpmath

    mpmath.mp.dps = 50
    eps = torch.finfo(torch.float64).eps
    limit = -3 * mpmath.log(eps) + mpmath.log(10)  # -log S must exceed this (P = 1, equal weights)
    for gap, left_out in ((-3e-12, False), (1e-9, True)):
        half = float(mpmath.sqrt((limit + gap) * 8 * mpmath.exp(logvar)) / 2)
        mu = torch.tensor([[-half], [half]], dtype=torch.float64)
        exact = -(2 * mpmath.mpf(half)) ** 2 / (8 * mpmath.exp(logvar))  # log S, equal variances
        assert (exact < -limit) == left_out
        partners = hellinger_module.kept_partners(mu, torch.full((2, 1), logvar, dtype=torch.float64),
                                                   torch.zeros(2, dtype=torch.float64))
        assert (partners is not None) == left_out, (gap, partners)


def test_a_broad_prior_expert_does_not_keep_the_pairs_of_narrow_separated_experts():
    """Five narrow experts (sd 0.05) about 2 apart per dimension and the N(0, 1) prior expert, which sets the largest
    variance everywhere: the pairs between the narrow experts are left out (by the bound without each sample's
    widest expert), and the pool equals the mixture written out."""
    g = torch.Generator().manual_seed(0)
    mu = 2.0 * torch.randn(5, 3, 16, generator=g, dtype=torch.float64)
    logvar = torch.full((5, 3, 16), 2 * math.log(0.05), dtype=torch.float64)
    with_prior = (torch.cat((mu, torch.zeros_like(mu[:1]))), torch.cat((logvar, torch.zeros_like(logvar[:1]))))
    partners = kept(*with_prior, torch.zeros(3, 6, dtype=torch.float64))
    assert partners is not None
    assert all(j == 5 for row in partners for j in row), partners  # only pairs with the prior may remain
    loc, lv = opf.hellinger(mu, logvar, prior_expert=True)
    ref_loc, ref_lv = reference_hellinger(mu, logvar, prior_expert=True)
    torch.testing.assert_close(loc, ref_loc, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lv, ref_lv, rtol=1e-12, atol=1e-12)


def test_subset_weights_that_differ_between_subsets_keep_a_pair_any_subset_needs():
    """Weights ``(K, M)`` give each subset its own: experts 0 and 1 (-log S = 120) weigh 1 and e^-150 in subset
    {0, 1} and the other way round in {0, 1, 2}. Subset {0, 1} needs the pair (its weight ratio is e^150); the
    gradients of its mean against the subsets pooled one by one with every pair written out."""
    delta = (8 * 120.0) ** 0.5  # unit variances: -log S_01 = delta^2 / 8
    mu = torch.tensor([[[0.0]], [[delta]], [[0.5]]], dtype=torch.float64)
    logvar = torch.zeros(3, 1, 1, dtype=torch.float64)
    subsets = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    weights = torch.tensor([[1.0, math.exp(-150), 1.0], [math.exp(-150), 1.0, 1.0]], dtype=torch.float64)
    per_subset_log_w = torch.where(subsets, weights.log(), -math.inf).unsqueeze(0)  # (B, K, M)
    x, lv = mu.movedim(0, -2), logvar.movedim(0, -2)
    # each expert's largest weight over the subsets (ratio 1) would leave the pair out; the subsets' own keep it
    assert hellinger_module.kept_partners(x, lv, per_subset_log_w.amax(-2)) == ((2,), (), ())
    assert hellinger_module.kept_partners(x, lv, per_subset_log_w, pools=True) == ((1, 2), (), ())
    inputs = [t.clone().requires_grad_(True) for t in (mu, logvar, weights)]
    mix = opf.subset_mixture(opf.hellinger, *inputs[:2], subsets=subsets, weights=inputs[2])
    mix.loc[0, 0, 0].backward()
    expected = [t.clone().requires_grad_(True) for t in (mu, logvar, weights)]
    loc, _ = written_out(expected[0][:2, 0], expected[1][:2, 0], weights=expected[2][0, :2])
    loc[0].backward()
    torch.testing.assert_close(mix.loc[0, 0, 0], loc[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(inputs[0].grad[:2], expected[0].grad[:2], rtol=1e-10, atol=0)
    torch.testing.assert_close(inputs[2].grad[0, :2], expected[2].grad[0, :2], rtol=1e-10, atol=0)


def test_pair_components_with_left_out_pairs_under_batched_incoming_gradients():
    """``autograd.grad(..., is_grads_batched=True)`` runs the backward pass under vmap with batched incoming
    gradients: the pairs' gradients, with pairs left out (expert 0's partners not contiguous), equal a loop."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(3, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    partners = ((1, 3, 5), (2, 3), (4,), (), (5,), ())
    _, loc, _ = hellinger_module.pair_components(x, logvar, partners)
    incoming = torch.randn((4,) + loc.shape, generator=g, dtype=torch.float64)
    batched = torch.autograd.grad(loc, (x, logvar), incoming, is_grads_batched=True, retain_graph=True)
    for k in range(4):
        one = torch.autograd.grad(loc, (x, logvar), incoming[k], retain_graph=True)
        for got, want in zip(batched, one):
            torch.testing.assert_close(got[k], want, rtol=1e-13, atol=1e-13)


def test_pool_with_left_out_pairs_under_batched_incoming_gradients():
    """The pool's backward pass under ``is_grads_batched`` (vmap over the incoming gradients) of one output, so that
    the other's incoming gradient is an unbatched zero, with pairs left out (expert 0's partners not contiguous, no
    row reaching every expert): gradients equal a loop. The first row used to be summed out of place only when it
    was row 0 in full, and the in-place sums then met batched terms in unbatched tensors."""
    mu, logvar, weights = clustered()
    inputs = [t.movedim(0, -2).clone().requires_grad_(True) for t in (mu, logvar)]
    inputs.append(weights.log().requires_grad_(True))
    assert hellinger_module.kept_partners(*(t.detach() for t in inputs)) == ((1, 3), (3,), (4,), (), ())
    g = torch.Generator().manual_seed(3)
    for output in (0, 1):
        pooled = hellinger_module.hellinger_moments(*inputs)[output]
        incoming = torch.randn((4,) + pooled.shape, generator=g, dtype=torch.float64)
        batched = torch.autograd.grad(pooled, inputs, incoming, is_grads_batched=True, retain_graph=True)
        for k in range(4):
            one = torch.autograd.grad(pooled, inputs, incoming[k], retain_graph=True)
            for got, want in zip(batched, one):
                torch.testing.assert_close(got[k], want, rtol=1e-13, atol=1e-13)


def test_partner_indices_are_made_once_and_outside_inference_mode_and_fake_modes():
    """The passes call ``_partner_index`` once per slice of the batch (on a GPU a host-to-device copy for each new
    index tensor): the same objects come back, for partners given as tuples or lists; one first made under
    ``inference_mode`` can still index tensors that autograd records; none is cached under a fake-tensor mode
    (tracing), whose tensors a later plain call cannot use."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mu, logvar, weights = clustered()
    hellinger_module._partner_index_cached.cache_clear()
    partners = kept(mu, logvar, weights.log())
    x, lv = mu.movedim(0, -2).contiguous(), logvar.movedim(0, -2).contiguous()
    with FakeTensorMode() as mode:
        hellinger_module.pair_components(mode.from_tensor(x), mode.from_tensor(lv), partners)
    assert hellinger_module._partner_index_cached.cache_info().currsize == 0
    with torch.inference_mode():
        opf.hellinger(mu, logvar, weights=weights)
    first = hellinger_module._partner_index(5, partners, mu.device)
    assert isinstance(first[0], torch.Tensor) and first[0].tolist() == [1, 3] and first[1] == slice(3, 4)
    assert hellinger_module._partner_index(5, [list(row) for row in partners], mu.device)[0] is first[0]
    assert not first[0].is_inference()
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    x[first[0]].sum().backward()
    assert x.grad[:, 0].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
