"""``subset_mixture`` with ``hellinger``/``holder(alpha=1/2)``, ``poe`` and ``wasserstein_barycenter`` mixes
components shared by all subsets instead of pooling copies of the inputs per subset: the same mixture, values and
gradients, as the per-subset computation, with masks, weights, prior experts; far less memory kept for backward."""

import itertools
import math

import pytest
import torch

import opinionpool._chunks as chunks_module
import opinionpool.functional as opf


def per_subset(aggregator, mu, logvar, mask, weights=None, prior_expert=False, prior_on_full_subset=False):
    """Each subset pooled on its own (present experts only), sample by sample: ``(B, K, D)`` means and log-variances
    (subsets with no present expert left as NaN)."""
    m, b, d = mu.shape
    subsets = [s for r in range(1, m + 1) for s in itertools.combinations(range(m), r)]
    loc = torch.full((b, len(subsets), d), float("nan"))
    lv = torch.full((b, len(subsets), d), float("nan"))
    for sample, (k, s) in itertools.product(range(b), enumerate(subsets)):
        members = [j for j in s if mask[j, sample]]
        # MoPoE's prior joins the full subset where no expert is absent
        extra = prior_expert or (prior_on_full_subset and len(s) == m and bool(mask[:, sample].all()))
        if not members:
            continue
        kwargs = {"prior_expert": extra}
        if weights is not None:
            w = weights[sample] if weights.dim() > 1 else weights
            kwargs["weights"] = w[members + ([m] if prior_expert else [])]
        loc[sample, k], lv[sample, k] = aggregator(mu[members, sample], logvar[members, sample], **kwargs)
    return loc, lv


def generic_hellinger(mu, logvar, **kwargs):
    """The Hellinger pool through its generic mixture components (not recognised as shared)."""
    return opf.holder_mixture(mu, logvar, 0.5, **kwargs).moments()


def explicit_poe(mu, logvar, weights=None, prior_expert=False):
    if prior_expert:
        mu, logvar = torch.cat((mu, torch.zeros_like(mu[:1]))), torch.cat((logvar, torch.zeros_like(logvar[:1])))
    w = torch.ones(mu.shape[0]) if weights is None else weights
    precision = (w[:, None] * (-logvar).exp()).sum(0)
    return (w[:, None] * (-logvar).exp() * mu).sum(0) / precision, -precision.log()


def explicit_barycenter(mu, logvar, weights=None, prior_expert=False):
    if prior_expert:
        mu, logvar = torch.cat((mu, torch.zeros_like(mu[:1]))), torch.cat((logvar, torch.zeros_like(logvar[:1])))
    w = torch.ones(mu.shape[0]) if weights is None else weights
    w = w / w.sum()
    return (w[:, None] * mu).sum(0), 2 * (w[:, None] * (0.5 * logvar).exp()).sum(0).log()


def data(m=4, b=3, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu, logvar = torch.randn(m, b, d, generator=g) * 2, torch.randn(m, b, d, generator=g)
    mask = torch.rand(m, b, generator=g) > 0.35
    mask[:, 0] = True
    mask[0, 1], mask[1:, 1] = True, False  # a sample with one present expert: most of its subsets are empty
    weights = torch.rand(b, m + 1, generator=g) + 0.2
    return mu, logvar, mask, weights


KINDS = [(opf.hellinger, generic_hellinger, {}), (opf.holder, generic_hellinger, {"alpha": 0.5}),
         (opf.poe, explicit_poe, {}), (opf.wasserstein_barycenter, explicit_barycenter, {})]
OPTIONS = [{}, {"weights": "shared"}, {"weights": "per sample"}, {"prior_expert": True},
           {"prior_expert": True, "weights": "per sample"}, {"prior_on_full_subset": True}]


def options(option, weights, m):
    kwargs = dict(option)
    if "weights" in kwargs:
        w = weights if kwargs.get("prior_expert") else weights[:, :m]
        kwargs["weights"] = w[0] if kwargs["weights"] == "shared" else w
    return kwargs


@pytest.mark.parametrize("aggregator,reference,extra", KINDS, ids=["hellinger", "holder", "poe", "barycenter"])
@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_shared_components_equal_the_per_subset_pools(aggregator, reference, extra, option):
    mu, logvar, mask, weights = data()
    kwargs = options(option, weights, mu.shape[0])
    call = dict(kwargs)
    if isinstance(call.get("weights"), torch.Tensor) and call["weights"].dim() > 1:
        call["weights"] = call["weights"].unsqueeze(-2)  # (B, 1, M): broadcast over the subsets, as before
    mix = opf.subset_mixture(aggregator, mu, logvar, mask=mask, **call, **extra)
    expected_loc, expected_lv = per_subset(reference, mu, logvar, mask, **kwargs)
    kept = torch.isfinite(mix.log_weights)
    assert torch.equal(kept, ~expected_loc[..., 0].isnan())
    torch.testing.assert_close(mix.loc[kept], expected_loc[kept], rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(mix.logvar[kept], expected_lv[kept], rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("aggregator", [opf.hellinger, opf.poe, opf.wasserstein_barycenter])
def test_gradients_equal_those_of_the_per_subset_path(aggregator):
    """Wrapped in a lambda the aggregator is no longer recognised and runs per subset: values and gradients for
    the means, log-variances and (learnable) weights must agree."""
    mu, logvar, mask, weights = data(seed=1)
    results = []
    for fn in (aggregator, lambda *args, **kwargs: aggregator(*args, **kwargs)):
        inputs = [t.clone().requires_grad_(True) for t in (mu, logvar, weights[0])]
        mix = opf.subset_mixture(fn, inputs[0], inputs[1], mask=mask, weights=inputs[2], prior_expert=True)
        kept = torch.isfinite(mix.log_weights)
        loss = (mix.loc.sin() * kept.unsqueeze(-1)).sum() + (mix.logvar.cos() * kept.unsqueeze(-1)).sum()
        loss.backward()
        results.append([mix.loc[kept], mix.logvar[kept]] + [t.grad for t in inputs])
    for shared, generic in zip(*results):
        torch.testing.assert_close(shared, generic, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("m,seed,prior_expert", [(3, 2, False), (2, 9, False), (2, 10, True)])
def test_gradcheck_of_the_shared_hellinger_subsets(m, seed, prior_expert):
    """float64 finite differences of means, log-variances and weights, with a mask (empty subsets), M = 2 and the
    prior expert; every output entry, the discarded aggregates of empty subsets included, carries its gradient."""
    mu, logvar, mask, weights = data(m=m, b=3, d=2, seed=seed)
    mask[:, 2] = torch.tensor([False] * (m - 1) + [True])

    def loss(mu, logvar, w):
        mix = opf.subset_mixture(opf.hellinger, mu, logvar, mask=mask, weights=w, prior_expert=prior_expert)
        return mix.loc, mix.logvar

    inputs = [t.clone().requires_grad_(True) for t in (mu, logvar, weights[:, None, :m + prior_expert])]
    assert torch.autograd.gradcheck(loss, inputs)


def saved_bytes(fn):
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def test_memory_kept_for_backward_is_a_few_times_the_output():
    """The per-subset path kept about 150 times its output (B, K, D) for backward; the shared one a few times."""
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(5, 16, 64, generator=g, dtype=torch.float32).requires_grad_(True)
    logvar = torch.randn(5, 16, 64, generator=g, dtype=torch.float32).requires_grad_(True)
    output = 2 * 16 * 31 * 64 * 4
    for aggregator in (opf.hellinger, opf.poe):
        assert saved_bytes(lambda a=aggregator: opf.subset_mixture(a, mu, logvar)) <= 6 * output


def test_float32_shared_hellinger_subsets_against_float64():
    g = torch.Generator().manual_seed(4)
    mu = torch.randn(4, 8, 32, generator=g) * 3 + 100
    logvar = torch.rand(4, 8, 32, generator=g) * 8 - 4
    mu, logvar = mu.float().double(), logvar.float().double()
    exact = opf.subset_mixture(opf.hellinger, mu, logvar)
    approx = opf.subset_mixture(opf.hellinger, mu.float(), logvar.float())
    sd = (0.5 * exact.logvar).exp()
    assert ((approx.loc.double() - exact.loc).abs() <= 1e-5 * sd + 4e-7 * exact.loc.abs()).all()
    torch.testing.assert_close(approx.logvar.double(), exact.logvar, rtol=0, atol=2e-5)


def exact_subset_poe(mu, logvar, weights=None):
    """Every subset's product of experts ``(B, K, D)`` in float64 by log-sum-exp over its members (independent of
    the matrix products and the scaling of ``subset_mixture``)."""
    m = mu.shape[0]
    w = torch.ones(m, dtype=torch.float64) if weights is None else weights.double()
    locs, lvs = [], []
    for s in [s for r in range(1, m + 1) for s in itertools.combinations(range(m), r)]:
        s = list(s)
        log_terms = w[s].log()[:, None, None] - logvar[s].double()
        log_total = log_terms.logsumexp(0)
        locs.append(((log_terms - log_total).exp() * mu[s].double()).sum(0))
        lvs.append(-log_total)
    return torch.stack(locs, 1), torch.stack(lvs, 1)


@pytest.mark.parametrize("weighted", [False, True])
def test_float32_mopoe_over_a_wide_range_of_precisions(weighted):
    """Log-variances from -60 to 60 in the same dimension: scaled by the largest precision alone, the sums of the
    subsets of flat experts (e^-120 of the largest) flush to zero in float32; scaled about the range's midpoint every
    subset keeps its digits."""
    g = torch.Generator().manual_seed(5)
    mu = (torch.randn(4, 3, 8, generator=g) * 2).float()
    logvar = torch.tensor([-60.0, -20.0, 25.0, 60.0])[:, None, None] + torch.randn(4, 3, 8, generator=g)
    weights = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float32) if weighted else None
    assert mu.dtype == torch.float32
    mix = opf.subset_mixture(opf.poe, mu, logvar.float(), weights=weights)
    loc, lv = exact_subset_poe(mu.double(), logvar.float().double(), weights)
    assert torch.isfinite(mix.loc).all() and torch.isfinite(mix.logvar).all()
    torch.testing.assert_close(mix.logvar.double(), lv, rtol=0, atol=1e-5)
    # each mean to 1e-5 of its own subset's standard deviation (the largest, e^30, made one tolerance for all vacuous)
    assert ((mix.loc.double() - loc).abs() <= 1e-5 * (0.5 * lv).exp() + 1e-5 * loc.abs()).all()


@pytest.mark.parametrize("aggregator", [opf.poe, opf.hellinger, opf.wasserstein_barycenter],
                         ids=["poe", "hellinger", "barycenter"])
def test_float64_subsets_beyond_the_float64_range_are_each_subsets_pool(aggregator):
    """Present log-variances more than 2 x 639 nats apart have no wider dtype to go to: the shared paths raised the
    flattest expert's log-precision to a floor (its subset alone got the floor as log-variance, and no gradient) or,
    for the barycenter, gave it a standard deviation of 0 (log-variance -inf, NaN gradients for every expert). Such
    samples now take the aggregator on each subset: every subset is its own pool, gradients included."""
    g = torch.Generator().manual_seed(11)
    logvar = (torch.tensor([-700.0, 0.0, 700.0], dtype=torch.float64)[:, None, None]
              + torch.rand(3, 2, 4, generator=g, dtype=torch.float64)).requires_grad_()
    mu = torch.randn(3, 2, 4, generator=g, dtype=torch.float64).requires_grad_()
    mix = opf.subset_mixture(aggregator, mu, logvar)
    coefficients = torch.randn(2, 7, 4, 2, generator=g, dtype=torch.float64)
    (torch.stack((mix.loc, mix.logvar), -1) * coefficients).sum().backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(logvar.grad).all()
    if aggregator is opf.poe:  # by log-sum-exp over each subset's members, independently of subset_mixture
        loc, lv = exact_subset_poe(mu.detach(), logvar.detach())
        torch.testing.assert_close(mix.logvar, lv, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(mix.loc, loc, rtol=1e-9, atol=1e-9)
    for k, row in enumerate(opf.all_subsets(3).tolist()):
        members = [j for j in range(3) if row[j]]
        mu_k, lv_k = (t.detach()[members] for t in (mu, logvar))
        loc, lv = aggregator(mu_k, lv_k)
        torch.testing.assert_close(mix.loc[:, k], loc, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mix.logvar[:, k], lv, rtol=1e-12, atol=1e-9)
        if len(members) == 1:
            assert (mix.logvar[:, k] == logvar.detach()[members[0]]).all()


@pytest.mark.parametrize("aggregator", [opf.poe, opf.hellinger, opf.wasserstein_barycenter],
                         ids=["poe", "hellinger", "barycenter"])
def test_float32_subsets_both_tiny_and_beyond_the_float64_range_are_each_subsets_pool(aggregator):
    """float32 log-variances below -160 went to float64 before the range was looked at, so a range beyond even
    float64's (here 1 400 nats) still got the floor: the subset of the flattest expert alone 1077.6 for 1200."""
    logvar = torch.tensor([-200.0, 0.0, 1200.0], dtype=torch.float32).reshape(3, 1, 1)
    mix = opf.subset_mixture(aggregator, torch.zeros(3, 1, 1, dtype=torch.float32), logvar)
    exact = opf.subset_mixture(aggregator, torch.zeros(3, 1, 1, dtype=torch.float64), logvar.double())
    assert mix.logvar.dtype == torch.float32 and torch.isfinite(mix.logvar).all()
    torch.testing.assert_close(mix.logvar.double(), exact.logvar, rtol=1e-6, atol=0)
    singles = [k for k, row in enumerate(opf.all_subsets(3).tolist()) if sum(row) == 1]
    assert mix.logvar[0, singles, 0].tolist() == [-200.0, 0.0, 1200.0]


@pytest.mark.parametrize("aggregator", [opf.poe, opf.hellinger], ids=["poe", "hellinger"])
@pytest.mark.parametrize("levels", [(-90.0, 100.0, None), (88.0, -87.0, 0.0)])
def test_float32_subsets_beyond_the_float32_range_are_exact(aggregator, levels):
    """Present log-variances more than 160 nats apart at a (sample, dimension) go through float64: in float32 the
    flattest experts were raised to a floor, so a subset of such an expert alone got the floor (MoPoE -71.7 and
    MoHELVAE 72.7 for experts of log-variance -87 and +88). A one-expert subset's pool is that expert."""
    levels = [level for level in levels if level is not None]
    mu = torch.arange(1.0, len(levels) + 1, dtype=torch.float32).reshape(-1, 1, 1)
    logvar = torch.tensor(levels, dtype=torch.float32).reshape(-1, 1, 1)
    mix = opf.subset_mixture(aggregator, mu, logvar)
    assert mix.logvar.dtype == torch.float32
    assert torch.isfinite(mix.loc).all() and torch.isfinite(mix.logvar).all()
    singles = [k for k, row in enumerate(opf.all_subsets(len(levels)).tolist()) if sum(row) == 1]
    ones = [row.index(True) for row in opf.all_subsets(len(levels)).tolist() if sum(row) == 1]
    torch.testing.assert_close(mix.logvar[0, singles, 0], logvar[ones, 0, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mix.loc[0, singles, 0], mu[ones, 0, 0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("aggregator, reference", [(opf.poe, explicit_poe), (opf.hellinger, generic_hellinger)],
                         ids=["poe", "hellinger"])
@pytest.mark.parametrize("level", [90.0, -90.0, -170.0, 170.0])
@pytest.mark.parametrize("masked", [2, 0], ids=["last masked", "first masked"])
def test_float32_subsets_with_a_masked_expert_far_from_the_present_ones(aggregator, reference, level, masked):
    """A masked expert stands in as N(0, 1) inside; present experts with log-variances near ``level`` put it some
    e^90 away in variance, where float32 overflows: values and gradients must still be the per-subset pools' of the
    present experts (float64), not NaN, nor shifted by the stand-in (also not when the masked expert is the first,
    which used to stand in for the empty subsets' members)."""
    g = torch.Generator().manual_seed(6)
    logvar = (level + torch.rand(3, 2, 4, generator=g)).double()
    mu = (torch.randn(3, 2, 4, generator=g) * (0.5 * logvar).exp()).float().double()
    mask = torch.ones(3, 2, dtype=torch.bool)
    mask[masked, 0] = False
    coefficients = torch.randn(2, 7, 4, 2, generator=g, dtype=torch.float64)

    def pooled(mu, logvar, aggregator):
        mix = opf.subset_mixture(aggregator, mu, logvar, mask=mask)
        kept = torch.isfinite(mix.log_weights)[..., None, None]
        return mix, (torch.where(kept, torch.stack((mix.loc / (0.5 * mix.logvar).exp().detach(), mix.logvar), -1), 0)
                     * coefficients.to(mu.dtype)).sum()

    leaves = [t.float().requires_grad_() for t in (mu, logvar)]
    mix, loss = pooled(*leaves, aggregator)
    grads = torch.autograd.grad(loss, leaves)
    assert all(torch.isfinite(t).all() for t in grads)
    expected_loc, expected_lv = per_subset(reference, mu, logvar.float().double(), mask)
    kept = ~expected_loc[..., 0].isnan()
    assert torch.equal(torch.isfinite(mix.log_weights), kept)
    torch.testing.assert_close(mix.logvar[kept].double(), expected_lv[kept], rtol=0, atol=2e-5)
    sd = (0.5 * expected_lv[kept]).exp()
    assert ((mix.loc[kept].double() - expected_loc[kept]).abs() <= 2e-5 * sd).all()
    wide = [t.detach().double().requires_grad_() for t in leaves]
    expected_grads = torch.autograd.grad(pooled(*wide, aggregator)[1], wide)
    for got, expected in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))


@pytest.mark.parametrize("aggregator", [opf.poe, opf.hellinger], ids=["poe", "hellinger"])
@pytest.mark.parametrize("level", [170.0, -170.0])
def test_float32_subsets_with_an_expert_of_weight_zero_far_from_the_others(aggregator, level):
    """Weight zero is absence in the shared subset paths too (with the prior expert covering a subset whose one
    expert has weight zero): the pools equal the per-subset pools in float64."""
    g = torch.Generator().manual_seed(6)
    mu = torch.randn(3, 2, 4, generator=g, dtype=torch.float32)
    logvar = torch.randn(3, 2, 4, generator=g, dtype=torch.float32) * 0.3
    logvar[2] = level
    weights = torch.tensor([0.3, 0.7, 0.0, 1.0], dtype=torch.float32)
    mix = opf.subset_mixture(aggregator, mu, logvar, weights=weights, prior_expert=True)
    per_subset_path = opf.subset_mixture(lambda m, v, **k: aggregator(m, v, **k), mu.double(), logvar.double(),
                                         weights=weights.double(), prior_expert=True)
    torch.testing.assert_close(mix.log_weights.double(), per_subset_path.log_weights)
    torch.testing.assert_close(mix.logvar.double(), per_subset_path.logvar, rtol=0, atol=1e-5)
    torch.testing.assert_close(mix.loc.double(), per_subset_path.loc, rtol=0, atol=1e-5)


def test_gradcheck_of_the_shared_poe_subsets():
    """float64 finite differences of means, log-variances and weights, with a mask (empty subsets) and M = 2."""
    for m, seed in ((3, 6), (2, 7)):
        mu, logvar, mask, weights = data(m=m, b=3, d=2, seed=seed)
        mask[:, 2] = torch.tensor([False] * (m - 1) + [True])

        def loss(mu, logvar, w, mask=mask):
            mix = opf.subset_mixture(opf.poe, mu, logvar, mask=mask, weights=w)
            kept = torch.isfinite(mix.log_weights).unsqueeze(-1)
            return torch.where(kept, mix.loc, 0), torch.where(kept, mix.logvar, 0)

        inputs = [t.double().requires_grad_(True) for t in (mu, logvar, weights[:, None, :m])]
        assert torch.autograd.gradcheck(loss, inputs)


def exact_subset_hellinger(mu, logvar):
    """Every subset's alpha = 1/2 pool ``(B, K, D)`` in float64 from its components written out by hand (experts of
    weight 1, pairs of weight 2 S_ij), its variance as mean variance plus the spread about its mean (two passes),
    means taken from the subset's first expert: independent of the shared components of ``subset_mixture``."""
    m = mu.shape[0]
    mu, logvar = mu.double(), logvar.double()
    locs, lvs = [], []
    for s in [s for r in range(1, m + 1) for s in itertools.combinations(range(m), r)]:
        x = mu[list(s)] - mu[s[0]]
        v = logvar[list(s)].exp()
        loc, var, log_w = list(x), list(v), [torch.zeros(mu.shape[1], dtype=torch.float64)] * len(s)
        for a, b in itertools.combinations(range(len(s)), 2):
            u = v[a] + v[b]
            log_s = (-(x[b] - x[a]) ** 2 / (4 * u) - 0.5 * torch.log(u / (2 * (v[a] * v[b]).sqrt()))).sum(-1)
            loc.append((x[a] * v[b] + x[b] * v[a]) / u)
            var.append(2 * v[a] * v[b] / u)
            log_w.append(math.log(2) + log_s)
        pi = torch.softmax(torch.stack(log_w), 0)[..., None]
        loc, var = torch.stack(loc), torch.stack(var)
        mean = (pi * loc).sum(0)
        locs.append(mu[s[0]] + mean)
        lvs.append(((pi * var).sum(0) + (pi * (loc - mean) ** 2).sum(0)).log())
    return torch.stack(locs, 1), torch.stack(lvs, 1)


def hard_experts():
    """|mu| ~ 1e3, log-variances across [-30, 30] per sample and dimension; in half the samples the experts nearly
    coincide (a fraction of a standard deviation apart), in the other half they lie 10 to 300 standard deviations
    apart. Rounded to float32."""
    g = torch.Generator().manual_seed(8)
    m, b, d = 4, 6, 16
    base_lv = torch.rand(1, b, d, generator=g) * 60 - 30
    logvar = base_lv + torch.rand(m, b, d, generator=g) - 0.5
    sd = (0.5 * base_lv).exp()
    spread = torch.where(torch.arange(b)[None, :, None] % 2 == 0, 0.3, 10 ** (1 + 1.5 * torch.rand(m, b, d, generator=g)))
    mu = 1e3 * torch.sign(torch.randn(1, b, d, generator=g)) + torch.randn(m, b, d, generator=g) * spread * sd
    return mu.float().double(), logvar.float().double()


def test_float32_shared_hellinger_subsets_in_a_hard_regime():
    """Nearly coinciding and far-apart experts with |mu| ~ 1e3 and log-variances in [-30, 30]: float32 within 1e-5
    of the float64 pools in log-variance. Raw second moments about one expert (as float64 still affords) lose every
    digit there in float32, which the test checks of its own naive float32 computation."""
    mu, logvar = hard_experts()
    loc, lv = exact_subset_hellinger(mu, logvar)
    sd = (0.5 * lv).exp()
    exact = opf.subset_mixture(opf.hellinger, mu, logvar)
    torch.testing.assert_close(exact.logvar, lv, rtol=0, atol=1e-9)
    assert ((exact.loc - loc).abs() <= 1e-9 * sd + 1e-15 * loc.abs()).all()
    approx = opf.subset_mixture(opf.hellinger, mu.float(), logvar.float())
    assert approx.loc.dtype == torch.float32
    torch.testing.assert_close(approx.logvar.double(), lv, rtol=0, atol=1e-5)
    # float32 rounds the means at the scale of the inputs' (|mu| ~ 1e3 or more, up to 1e3 standard deviations)
    assert ((approx.loc.double() - loc).abs() <= 1e-5 * sd + 1.2e-7 * mu.abs().amax(0).unsqueeze(1)).all()
    # the naive float32 path: raw moments of the same mixtures about the first expert
    x = (mu - mu[:1]).float()
    naive = []
    for s in [s for r in range(1, 5) for s in itertools.combinations(range(4), r)]:
        comps = opf.holder_mixture(x[list(s)], logvar[list(s)].float(), 0.5)
        pi = comps.log_weights.exp().unsqueeze(-1)
        mean = (pi * comps.loc).sum(-2)
        second = (pi * (comps.loc**2 + comps.logvar.exp())).sum(-2)
        naive.append((second - mean * mean).log())
    naive = torch.stack(naive, 1).double()
    assert not ((naive - lv).abs() <= 1e-3).all()


@pytest.mark.parametrize("aggregator", [opf.hellinger, opf.poe])
def test_two_batch_axes_give_the_values_and_gradients_of_one(aggregator):
    """Two batch axes, per-sample masks and learnable per-sample weights (..., 1, M + 1) with a prior expert (whose
    check once failed with two batch axes): the same values and gradients as the batch flattened to one axis."""
    g = torch.Generator().manual_seed(3)
    m = 3
    mu, logvar = torch.randn(m, 5, 3, 4, generator=g), torch.randn(m, 5, 3, 4, generator=g)
    mask = torch.rand(m, 5, 3, generator=g) > 0.3
    weights = torch.rand(5, 3, 1, m + 1, generator=g) + 0.2
    results = []
    for flat in (False, True):
        inputs = [t.clone().requires_grad_(True) for t in (mu, logvar, weights)]
        args = [inputs[0].flatten(1, 2), inputs[1].flatten(1, 2)] if flat else inputs[:2]
        w = inputs[2].flatten(0, 1) if flat else inputs[2]
        mix = opf.subset_mixture(aggregator, *args, mask=mask.flatten(1, 2) if flat else mask, weights=w,
                                 prior_expert=True)
        kept = torch.isfinite(mix.log_weights).unsqueeze(-1)
        ((mix.loc.sin() * kept).sum() + (mix.logvar.cos() * kept).sum()).backward()
        results.append([mix.loc.reshape(15, -1), mix.logvar.reshape(15, -1)] + [t.grad for t in inputs])
    for shaped, flat in zip(*results):
        torch.testing.assert_close(shaped, flat, rtol=1e-12, atol=1e-12)


def test_mopoe_in_slices_of_the_batch_equals_one_pass_and_gradchecks(monkeypatch):
    """On the CPU the backward pass of MoPoE's subset sums works through the batch in slices (``CPU_CHUNK_BYTES``
    per (K, D) sum): with two batch axes, per-sample masks, weights and a prior expert, slices of two rows (the last
    one shorter) give the gradients of one pass over the whole batch (the forward pass is one pass either way), and
    pass gradcheck."""
    g = torch.Generator().manual_seed(4)
    m, d = 3, 2
    mu, logvar = torch.randn(m, 5, 3, d, generator=g, dtype=torch.float64), torch.randn(m, 5, 3, d, generator=g,
                                                                                         dtype=torch.float64)
    mask = torch.rand(m, 5, 3, generator=g) > 0.3
    mask[0] = True
    weights = torch.rand(5, 3, 1, m + 1, generator=g, dtype=torch.float64) + 0.2

    def pooled(mu, logvar, weights):
        mix = opf.subset_mixture(opf.poe, mu, logvar, mask=mask, weights=weights, prior_expert=True)
        kept = torch.isfinite(mix.log_weights).unsqueeze(-1)
        return torch.where(kept, mix.loc, 0), torch.where(kept, mix.logvar, 0)

    results = []
    for chunk in (1 << 40, 2 * (2**m - 1) * d * 8):  # everything at once; two rows of K = 7 subset sums of float64
        monkeypatch.setattr(chunks_module, "CPU_CHUNK_BYTES", chunk)
        inputs = [t.clone().requires_grad_(True) for t in (mu, logvar, weights)]
        loc, lv = pooled(*inputs)
        (loc.sin().sum() + (lv * lv).sum()).backward()
        results.append((loc, lv, *(t.grad for t in inputs)))
    for whole, sliced in zip(*results):
        torch.testing.assert_close(sliced, whole, rtol=1e-13, atol=1e-13)
    calls = []
    body = opf._subset_sums_backward
    monkeypatch.setattr(opf, "_subset_sums_backward",
                        lambda *args: calls.append(args[0].shape[0]) or body(*args))
    inputs = [t.clone().requires_grad_(True) for t in (mu, logvar, weights)]
    assert torch.autograd.gradcheck(pooled, inputs)
    assert calls[:8] == [2] * 7 + [1]  # 15 rows in slices of two


def test_per_sample_prior_weight_covers_its_own_sample_only():
    """Per-sample weights (B, 1, M + 1) with a prior expert: sample 0 gives the prior weight zero (its experts
    cover every subset), sample 1 gives expert 0 weight zero (its prior covers subset {0}). Valid: the check once
    broadcast one sample's prior weight against another's subsets and refused it. Sample 1 without its prior's
    weight is refused, naming the subset."""
    mu, logvar = torch.randn(2, 2, 3), torch.randn(2, 2, 3)
    weights = torch.tensor([[[1.0, 1.0, 0.0]], [[0.0, 1.0, 1.0]]])
    mix = opf.subset_mixture(opf.poe, mu, logvar, weights=weights, prior_expert=True)
    assert torch.isfinite(mix.loc).all() and torch.isfinite(mix.logvar).all()
    weights[1, 0, 2] = 0.0
    with pytest.raises(ValueError, match=r"subset \[0\]"):
        opf.subset_mixture(opf.poe, mu, logvar, weights=weights, prior_expert=True)


SHARED = {"poe": (opf.poe, {}), "hellinger": (opf.hellinger, {}), "holder-1/3": (opf.holder, {"alpha": 1 / 3}),
          "wasserstein": (opf.wasserstein_barycenter, {})}


@pytest.mark.parametrize("name", SHARED)
@pytest.mark.parametrize("output", [0, 1])
def test_jacobians_of_one_output_by_jacrev_equal_autograd(name, output):
    """``jacrev`` of the subsets' means (or log-variances) alone, in float64, with weights: the other output's
    incoming gradient is then missing while this one is batched. The in-place updates of the shared paths'
    backward passes once wrote it into unbatched tensors (``RuntimeError``)."""
    aggregator, extra = SHARED[name]
    g = torch.Generator().manual_seed(4)
    mu, logvar = torch.randn(3, 4, dtype=torch.float64, generator=g), torch.randn(3, 4, dtype=torch.float64, generator=g)
    weights = torch.rand(3, dtype=torch.float64, generator=g) + 0.2

    def one_output(m):
        mix = opf.subset_mixture(aggregator, m, logvar, weights=weights, validate_args=False, **extra)
        return (mix.loc, mix.logvar)[output]

    torch.testing.assert_close(torch.func.jacrev(one_output)(mu), torch.autograd.functional.jacobian(one_output, mu))


@pytest.mark.parametrize("name", SHARED)
@pytest.mark.parametrize("batched", ["mu", "logvar", "weights"])
def test_vmap_over_one_argument_equals_a_loop(name, batched):
    """``vmap`` of values and gradients with one argument batched and the others shared equals a loop."""
    aggregator, extra = SHARED[name]
    g = torch.Generator().manual_seed(5)
    shapes = {"mu": (3, 4), "logvar": (3, 4), "weights": (3,)}
    args = {k: torch.randn(*s, dtype=torch.float64, generator=g) for k, s in shapes.items()}
    args["weights"] = args["weights"].abs() + 0.2
    stack = torch.randn(4, *shapes[batched], dtype=torch.float64, generator=g)
    stack = stack.abs() + 0.2 if batched == "weights" else stack

    def loss(mu, logvar, weights):
        mix = opf.subset_mixture(aggregator, mu, logvar, weights=weights, validate_args=False, **extra)
        return mix.loc.sin().sum() + (mix.logvar * mix.logvar).sum()

    def value_and_grads(one):
        return torch.func.grad_and_value(loss, argnums=(0, 1, 2))(*[one if k == batched else v for k, v in args.items()])

    grads, value = torch.func.vmap(value_and_grads)(stack)
    for k in range(stack.shape[0]):
        grads_k, value_k = value_and_grads(stack[k])
        torch.testing.assert_close(value[k], value_k)
        for got, want in zip(grads, grads_k):
            torch.testing.assert_close(got[k], want)


@pytest.mark.parametrize("aggregator", [opf.poe, opf.hellinger], ids=["poe", "hellinger"])
def test_a_sample_without_present_experts(aggregator):
    """With prior_on_full_subset such a sample keeps the full subset, whose pool is the prior, as documented; the
    check had rejected it (and told to pass prior_expert=True, with which the same error came)."""
    g = torch.Generator().manual_seed(3)
    mu, logvar = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    mix = opf.subset_mixture(aggregator, mu, logvar, dim=1, mask=mask, prior_on_full_subset=True)
    full = opf.all_subsets(3).all(-1)
    assert torch.equal(mix.log_weights[1], torch.where(full, 0.0, -torch.inf).to(mix.log_weights.dtype))
    assert not mix.loc[1, full].any() and not mix.logvar[1, full].any()  # N(0, I)
    with pytest.raises(ValueError, match=r"no present expert for the sample at batch index \(1,\); subset_mixture "
                                         r"keeps only the subsets with a present expert: pass prior_on_full_subset"):
        opf.subset_mixture(aggregator, mu, logvar, dim=1, mask=mask, prior_expert=True)


@pytest.mark.parametrize("aggregator", [opf.poe, opf.hellinger, opf.wasserstein_barycenter])
def test_a_sample_whose_present_experts_are_in_no_subset_is_refused(aggregator):
    """Its mixture had no component: NaN weights and moments, without a word (the check asked only whether some
    expert was present, and prior_on_full_subset turned it off even without the full subset)."""
    mu, logvar = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    mask = torch.tensor([[True, True, True], [False, False, True]]).T
    subsets = torch.tensor([[True, False, False], [True, True, False]])
    with pytest.raises(ValueError, match=r"the 2 subsets hold none of the present experts \(mask \[False, False, "
                                         r"True\]\) of the sample at batch index \(1,\)"):
        opf.subset_mixture(aggregator, mu, logvar, mask=mask, subsets=subsets)
    nobody = torch.tensor([[True, True, True], [False, False, False]]).T
    with pytest.raises(ValueError, match=r"the 2 subsets hold none of the present experts"):  # no full subset
        opf.subset_mixture(aggregator, mu, logvar, mask=nobody, subsets=subsets, prior_on_full_subset=True)
    mix = opf.subset_mixture(aggregator, mu, logvar, mask=nobody, prior_on_full_subset=True)  # its prior stands in
    assert torch.isfinite(mix.moments()[0]).all() and torch.isfinite(mix.moments()[1]).all()


@pytest.mark.parametrize("aggregator", [opf.poe, opf.hellinger, opf.wasserstein_barycenter])
def test_the_prior_covers_an_empty_subset_whose_stand_in_has_weight_zero(aggregator):
    """Every present expert of the sample of weight zero, the prior's positive, an expert masked: the empty subset's
    stand-in (an expert of weight zero) was dropped and the prior not added to it, a subset of no member (0 / 0),
    whose NaN reached the mixture's moments and every gradient. The live subsets are the prior alone."""
    mu = torch.randn(2, 1, 2, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(2, 1, 2, dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64, requires_grad=True)
    mix = opf.subset_mixture(aggregator, mu, logvar, mask=torch.tensor([[True], [False]]), weights=weights,
                             prior_expert=True)
    mean, log_variance = mix.moments()
    torch.testing.assert_close(mean, torch.zeros(1, 2, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(log_variance, torch.log(weights[2]).detach().neg().expand(1, 2) if aggregator is opf.poe
                               else torch.zeros(1, 2, dtype=torch.float64), rtol=0, atol=1e-15)
    for gradient in torch.autograd.grad(mean.sum() + log_variance.sum(), (mu, logvar, weights)):
        assert torch.isfinite(gradient).all()


@pytest.mark.parametrize("aggregator", [opf.poe, opf.hellinger, opf.wasserstein_barycenter])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_empty_batch_gives_empty_pools(aggregator, dtype):
    """A batch of no samples: hellinger failed in float32 (amin of no values), the shared subset paths in every
    dtype (aminmax)."""
    mu, logvar = torch.randn(3, 0, 2, dtype=dtype), torch.randn(3, 0, 2, dtype=dtype)
    mask = torch.ones(3, 0, dtype=torch.bool)
    loc, lv = aggregator(mu, logvar, mask=mask)
    assert loc.shape == lv.shape == (0, 2)
    mix = opf.subset_mixture(aggregator, mu, logvar, mask=mask)
    assert mix.loc.shape == (0, 7, 2) and mix.moments()[0].shape == (0, 2)


def test_per_sample_weights_of_shape_b_m_are_refused_where_they_are_not_per_subset():
    """(B, M) weights read as one row per subset: with B not the number of subsets a bare broadcasting error, now
    one naming the shapes; (B, 1, M) are the per-sample weights."""
    mu, logvar = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match=r"weights of shape \(4, 2\) do not broadcast against the 3 subsets' pools .* "
                                         r"per-sample weights are \(B, 1, 2\), per-subset ones \(3, 2\)"):
        opf.subset_mixture(opf.hellinger, mu, logvar, weights=torch.rand(4, 2) + 0.1)
    weights = torch.rand(4, 1, 2) + 0.1
    mix = opf.subset_mixture(opf.hellinger, mu, logvar, weights=weights)
    full = opf.hellinger(mu, logvar, weights=weights[:, 0])
    torch.testing.assert_close((mix.loc[:, 2], mix.logvar[:, 2]), full)  # the full subset: every expert


@pytest.mark.parametrize("aggregator", [opf.hellinger, opf.poe, opf.wasserstein_barycenter])
def test_float32_subsets_of_experts_far_apart_in_the_narrowest_ones_units(aggregator):
    """Experts 4e19 apart of log-variances -79 and 79: the Hellinger subsets' spread, scaled by the midpoint of
    the log-variances, squared an offset of 4e19 (inf in float32); each subset must be its pool (float64)."""
    mu = torch.tensor([[[0.0]], [[300 * math.exp(39.5)]]], dtype=torch.float32)
    logvar = torch.tensor([[[-79.0]], [[79.0]]], dtype=torch.float32)
    mix = opf.subset_mixture(aggregator, mu, logvar)
    assert mix.logvar.dtype == torch.float32
    reference = opf.subset_mixture(aggregator, mu.double(), logvar.double())
    assert torch.isfinite(mix.logvar).all()
    torch.testing.assert_close(mix.logvar.double(), reference.logvar, rtol=1e-6, atol=0)
    # (PoE's mean of both, 1e-49, is below float32's range: within 1e-6 of its standard deviation)
    sd = torch.exp(0.5 * reference.logvar)
    assert ((mix.loc.double() - reference.loc).abs() <= 1e-6 * (reference.loc.abs() + sd)).all()
