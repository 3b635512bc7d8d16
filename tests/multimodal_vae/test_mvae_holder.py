"""The Hölder VAE stratified over the exact pool's components, Hölder+ and Hölder++, on tiny linear models in
float64, against computations written here from the Hölder++ paper's formulas: the pool of alpha = 1/2 as the
experts (weight ``c``) and the pairs (mean ``(mu_i s_j + mu_j s_i) / (s_i + s_j)``, variance ``2 s_i s_j /
(s_i + s_j)``, weight ``2 c S_ij`` with ``S_ij`` the Bhattacharyya coefficient), and the per-component rule for
the private latents."""

import copy
import functools
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal

import opinionpool.functional as opf
from applications.multimodal_vae import objectives
from applications.multimodal_vae.models import TopDownPrivate

#: the components of the pool of three experts, in the library's order (checked in tests/opinionpool)
COMPONENTS = [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2)]
BETA = 1.7


def reference_pool(mu, logvar, present):
    """``(pi (C, B), mean (C, B, D), var (C, B, D))`` of the exact Hölder 1/2 pool of the present experts."""
    var = logvar.exp()
    means, variances, unnormalised = [], [], []
    for component in COMPONENTS:
        if len(component) == 1:
            (j,) = component
            means.append(mu[j])
            variances.append(var[j])
            unnormalised.append(torch.where(present[j], 1.0, 0.0))
        else:
            i, j = component
            total = var[i] + var[j]
            means.append((mu[i] * var[j] + mu[j] * var[i]) / total)
            variances.append(2 * var[i] * var[j] / total)
            log_s = (-(mu[i] - mu[j]) ** 2 / (4 * total) + 0.5 * torch.log(2 * (var[i] * var[j]).sqrt() / total)).sum(-1)
            unnormalised.append(torch.where(present[i] & present[j], 2 * log_s.exp(), 0.0))
    unnormalised = torch.stack(unnormalised)
    return unnormalised / unnormalised.sum(0), torch.stack(means), torch.stack(variances)


def reference_log_density(z, pi, mean, var):
    """``log sum_c pi_c N(z; mean_c, var_c)`` for ``z`` ``(..., B, D)`` (components with ``pi = 0`` left out)."""
    log_pi = torch.where(pi > 0, torch.log(torch.where(pi > 0, pi, 1.0)), -math.inf)
    terms = [log_pi[c] + Normal(mean[c], var[c].sqrt()).log_prob(z).sum(-1) for c in range(len(COMPONENTS))]
    return torch.logsumexp(torch.stack(terms), 0)


def likelihood(x, present, z, decoders):
    """Unit-variance normal likelihood of the present modalities (decoders take ``[z, w]`` concatenated)."""
    inputs = z if isinstance(z, list) else [(z,)] * len(decoders)
    total = 0
    for m, decoder in enumerate(decoders):
        log_lik = Normal(decoder(torch.cat(inputs[m], -1)), 1.0).log_prob(x[m]).sum(-1)
        total = total + torch.where(present[m], log_lik, 0.0)
    return total


def tiny(shared=2, private=0, batch=4, seed=0):
    """Linear encoders' outputs (leaves), linear decoders, data and a mask with a missing modality."""
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(batch, 2, generator=g) for _ in range(3)]
    weight = torch.randn(3, 2, shared + private, generator=g) * 0.7
    bias = torch.randn(3, 1, shared + private, generator=g) * 0.3
    mu = (torch.stack(x) @ weight + bias).requires_grad_()
    logvar = (0.5 * torch.stack(x) @ weight.flip(-1) - 0.4).requires_grad_()
    torch.manual_seed(seed)
    decoders = torch.nn.ModuleList(torch.nn.Linear(shared + private, 2) for _ in range(3))
    present = torch.ones(3, batch, dtype=torch.bool)
    present[0, 0] = False
    present[2, 1] = False
    return x, mu, logvar, decoders, present


aggregate = functools.partial(opf.holder_mixture, alpha=0.5, dim=0, validate_args=False)


def test_stratified_hoelder_elbo_and_its_gradient_against_the_papers_formulas():
    x, mu, logvar, decoders, present = tiny()
    torch.manual_seed(5)
    terms = objectives.stratified_mixture_elbo(x, present, mu, logvar, decoders, likelihood, aggregate)
    objective = terms.reconstruction - BETA * terms.kl
    grads = torch.autograd.grad(objective.sum(), (mu, logvar))

    torch.manual_seed(5)
    pi, mean, var = reference_pool(mu, logvar, present)
    z = mean + var.sqrt() * torch.randn(1, *mean.shape)[0]  # one draw per component and sample
    rec, kl = 0, 0
    for c in range(len(COMPONENTS)):
        used = pi[c] > 0
        log_q = reference_log_density(z[c], pi, mean, var)
        log_p = Normal(0.0, 1.0).log_prob(z[c]).sum(-1)
        rec = rec + torch.where(used, pi[c] * likelihood(x, present, z[c], decoders), 0.0)
        kl = kl + torch.where(used, pi[c] * (log_q - log_p), 0.0)
    torch.testing.assert_close(terms.reconstruction, rec)
    torch.testing.assert_close(terms.kl, kl)
    expected = torch.autograd.grad((rec - BETA * kl).sum(), (mu, logvar))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_stratified_gradient_in_the_mixture_weights_is_that_of_the_exact_expectation():
    """With the weights as free parameters (one copy per sample, so each sample's gradient is seen), the mean of
    the stratified estimator's gradients matches the gradient of the expectation enumerated over the components
    and integrated by Gauss-Hermite quadrature (a 1-d latent), within four standard errors."""
    n = 4000
    theta = torch.tensor([0.3, -0.2, 0.1, -0.8, 0.5, -1.5])
    loc = torch.tensor([-1.0, 0.4, 1.3, -0.3, 0.1, 0.8])
    logvar = torch.tensor([-0.5, 0.2, -1.0, -0.9, -0.3, -1.2])
    x = [torch.tensor([[0.7, -0.4]]).expand(n, 2)]
    torch.manual_seed(0)
    decoders = torch.nn.ModuleList([torch.nn.Linear(1, 2)])
    present = torch.ones(1, n, dtype=torch.bool)
    per_sample = theta.expand(n, 6).clone().requires_grad_()

    def fixed_mixture(mu, logvar_, mask):
        return opf.GaussianMixture(torch.log_softmax(per_sample, -1), loc.expand(n, 6)[..., None],
                                   logvar.expand(n, 6)[..., None])

    dummy = torch.zeros(1, n, 1)
    torch.manual_seed(1)
    terms = objectives.stratified_mixture_elbo(x, present, dummy, dummy, decoders, likelihood, fixed_mixture)
    (grads,) = torch.autograd.grad((terms.reconstruction - BETA * terms.kl).sum(), per_sample)

    nodes, gh_weights = (torch.from_numpy(a) for a in np.polynomial.hermite.hermgauss(120))
    exact_theta = theta.clone().requires_grad_()
    log_pi = torch.log_softmax(exact_theta, -1)

    def log_q(z):
        return torch.logsumexp(log_pi + Normal(loc, (0.5 * logvar).exp()).log_prob(z[:, None]), -1)

    expectation = 0
    for c in range(6):
        z = loc[c] + math.sqrt(2) * (0.5 * logvar[c]).exp() * nodes  # E_N(m, s^2) f = sum w f(m + sqrt2 s t)/sqrt(pi)
        f = (Normal(decoders[0](z[:, None]), 1.0).log_prob(x[0][0]).sum(-1)
             - BETA * (log_q(z) - Normal(0.0, 1.0).log_prob(z)))
        expectation = expectation + log_pi[c].exp() * (gh_weights * f).sum() / math.sqrt(math.pi)
    (exact,) = torch.autograd.grad(expectation, exact_theta)
    error = grads.std(0) / math.sqrt(n)
    assert (grads.mean(0) - exact).abs().max() < 4 * error.max() + 1e-6, (grads.mean(0), exact, error)
    assert exact.abs().max() > 10 * error.max()  # a gradient the estimator has to get right, not a zero
    # the one-draw estimator's component choice carries no gradient: only the KL's density reaches the weights
    torch.manual_seed(1)
    one_draw = objectives.mixture_elbo(x, present, dummy, dummy, decoders, likelihood, fixed_mixture)
    (rec_grad,) = torch.autograd.grad(one_draw.reconstruction.sum(), per_sample, allow_unused=True)
    assert rec_grad is None


def private_posterior(net, mu, logvar, z):
    """``q(w | x)`` (``net`` None, Hölder+) or ``q(w | x, z)`` from the encoder's private statistics."""
    if net is None:
        return mu, logvar
    return net(mu.expand(z.shape[:-1] + mu.shape[-1:]), logvar.expand(z.shape[:-1] + mu.shape[-1:]), z)


def hoelder_plus_reference(x, mu, logvar, decoders, present, auxiliary_scale, top_down, num_samples, estimator,
                           shared, private, stop=False):
    """The Hölder+ / Hölder++ objective written out component by component from the sampling rule. With
    ``stop``, a surrogate with DReG's gradient in the encoders' outputs and the top-down nets: ``pi``'s gradient
    times the IWAE value, plus the path gradients (the densities' parameters detached, the draws keeping their
    paths) weighted by ``(1 - beta) w~ + beta w~^2`` (``w~`` the normalised weights; their square at beta = 1)."""
    pi, mean, var = reference_pool(mu[..., :shared], logvar[..., :shared], present)
    k, b = num_samples, mu.shape[1]
    z = mean + var.sqrt() * torch.randn(k, len(COMPONENTS), b, shared)
    noise = [(torch.randn(k, len(COMPONENTS), b, private), torch.randn(k, len(COMPONENTS), b, private))
             for _ in range(3)]
    nets = [None] * 3 if top_down is None else list(top_down)
    scoring = nets
    if stop and top_down is not None:
        frozen = copy.deepcopy(top_down).requires_grad_(False)
        scoring = list(frozen)
    s_mu, s_logvar = (mu.detach(), logvar.detach()) if stop else (mu, logvar)
    d_pi, d_mean, d_var = (t.detach() for t in (pi, mean, var)) if stop else (pi, mean, var)
    total = 0
    for c, component in enumerate(COMPONENTS):
        zc = z[:, c]
        log_q = reference_log_density(zc, d_pi, d_mean, d_var)
        log_p = Normal(0.0, 1.0).log_prob(zc).sum(-1)
        inputs = []
        for n in range(3):
            if n in component:  # self-reconstruction: the posterior's draw, scored by the posterior and the prior
                w_mu, w_logvar = private_posterior(nets[n], mu[n, :, shared:], logvar[n, :, shared:], zc)
                w = w_mu + (0.5 * w_logvar).exp() * noise[n][0][:, c]
                q_mu, q_logvar = private_posterior(scoring[n], s_mu[n, :, shared:], s_logvar[n, :, shared:], zc)
                log_q = log_q + Normal(q_mu, (0.5 * q_logvar).exp()).log_prob(w).sum(-1)
                log_p = log_p + Normal(0.0, 1.0).log_prob(w).sum(-1)
            else:  # cross-reconstruction: the auxiliary r_n
                w = noise[n][1][:, c] * auxiliary_scale[n]
            inputs.append((zc, w))
        log_w = likelihood(x, present, inputs, decoders) + BETA * (log_p - log_q)
        iwae = torch.logsumexp(log_w, 0) - math.log(k)
        if stop:
            normalised = torch.softmax(log_w, 0).detach()
            path_weight = (1 - BETA) * normalised + BETA * normalised ** 2  # DReG at beta: w^2 at beta = 1
            term = pi[c] * iwae.detach() + pi[c].detach() * (path_weight * log_w).sum(0)
        else:
            term = pi[c] * (log_w.mean(0) if estimator == "elbo" else iwae)
        total = total + torch.where(pi[c] > 0, term, 0.0)
    return total


def plus_model(top_down, shared=2, private=1, seed=0):
    x, mu, logvar, decoders, present = tiny(shared, private, seed=seed)
    auxiliary_scale = torch.tensor([[1.2], [0.4], [0.8]], requires_grad=True)
    nets = None
    if top_down:
        torch.manual_seed(seed + 1)
        nets = torch.nn.ModuleList(TopDownPrivate(shared, private, hidden=5) for _ in range(3))
        for net in nets:  # away from the zero start, so that z moves the private posterior
            torch.nn.init.normal_(net.net[-1].weight, std=0.5)
    return x, mu, logvar, decoders, present, auxiliary_scale, nets


def run_plus(model, num_samples, estimator, seed=9, private=1, beta=BETA):
    x, mu, logvar, decoders, present, auxiliary_scale, nets = model
    torch.manual_seed(seed)
    return objectives.holder_plus_objective(
        x, present, mu, logvar, decoders, likelihood, aggregate, beta=beta, num_samples=num_samples,
        estimator=estimator, private_dim=private, auxiliary_scale=auxiliary_scale,
        members=opf.holder_mixture_members(3, 0.5), top_down=nets)


@pytest.mark.parametrize("top_down", [False, True], ids=["hoelderplus", "hoelderplusplus"])
@pytest.mark.parametrize("estimator, num_samples", [("elbo", 1), ("elbo", 3), ("iwae", 3)])
def test_hoelder_plus_objective_follows_the_per_component_sampling_rule(top_down, estimator, num_samples):
    model = plus_model(top_down)
    x, mu, logvar, decoders, present, auxiliary_scale, nets = model
    terms = run_plus(model, num_samples, estimator)
    torch.manual_seed(9)
    expected = hoelder_plus_reference(x, mu, logvar, decoders, present, auxiliary_scale, nets, num_samples,
                                      estimator, 2, 1)
    torch.testing.assert_close(terms.objective, expected)
    parameters = [mu, logvar, auxiliary_scale, *decoders.parameters(), *(nets.parameters() if nets else [])]
    got = torch.autograd.grad(terms.objective.sum(), parameters)
    want = torch.autograd.grad(expected.sum(), parameters)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    if estimator == "elbo" and num_samples == 1:  # one draw: the objective is reconstruction - beta kl
        torch.testing.assert_close(terms.objective, terms.reconstruction - BETA * terms.kl)


@pytest.mark.parametrize("top_down", [False, True], ids=["hoelderplus", "hoelderplusplus"])
def test_hoelder_plus_dreg_gradients(top_down):
    """DReG: the decoders' and the auxiliary scales' gradient is IWAE's; the encoders' outputs and the top-down
    nets get pi's gradient times the IWAE value plus the path gradients weighted by ``(1 - beta) w~ + beta w~^2``
    (each path once, also where Hölder++'s private draws reach z through the top-down nets)."""
    model = plus_model(top_down)
    x, mu, logvar, decoders, present, auxiliary_scale, nets = model
    iwae, dreg = run_plus(model, 4, "iwae"), run_plus(model, 4, "dreg")
    torch.testing.assert_close(dreg.objective, iwae.objective)  # DReG's value is the IWAE bound
    decoder_side = [auxiliary_scale, *decoders.parameters()]
    for g, w in zip(torch.autograd.grad(dreg.objective.sum(), decoder_side, retain_graph=True),
                    torch.autograd.grad(iwae.objective.sum(), decoder_side, retain_graph=True)):
        torch.testing.assert_close(g, w)
    encoder_side = [mu, logvar, *(nets.parameters() if nets else [])]
    got = torch.autograd.grad(dreg.objective.sum(), encoder_side)
    torch.manual_seed(9)
    surrogate = hoelder_plus_reference(x, mu, logvar, decoders, present, auxiliary_scale, nets, 4, "dreg", 2, 1,
                                       stop=True)
    want = torch.autograd.grad(surrogate.sum(), encoder_side)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    iwae_grad = torch.autograd.grad(iwae.objective.sum(), [mu])[0]
    assert not torch.allclose(got[0], iwae_grad)


@pytest.mark.parametrize("top_down", [False, True], ids=["hoelderplus", "hoelderplusplus"])
def test_hoelder_plus_dreg_at_beta_zero_is_the_iwae_gradient(top_down):
    """At beta = 0 (a KL warm-up's start) the log-weights hold no ``log q``, so DReG has no score term to turn into
    path terms: every gradient is IWAE's on the same draws (the squared normalised weights would differ)."""
    model = plus_model(top_down)
    x, mu, logvar, decoders, present, auxiliary_scale, nets = model
    parameters = [mu, logvar, auxiliary_scale, *decoders.parameters(), *(nets.parameters() if nets else [])]
    iwae = torch.autograd.grad(run_plus(model, 4, "iwae", beta=0.0).objective.sum(), parameters)
    for estimator in ("dreg",) if top_down else ("dreg", "dreg_unbiased"):
        dreg = run_plus(model, 4, estimator, beta=0.0)
        for g, w in zip(torch.autograd.grad(dreg.objective.sum(), parameters), iwae):
            torch.testing.assert_close(g, w)


def test_hoelder_plus_unbiased_dreg_has_the_iwae_value_and_decoder_gradient():
    """``dreg_unbiased`` (Hölder+ only) changes the encoders' gradient alone: the value is the IWAE bound, the
    decoders' and the auxiliary scales' gradients are IWAE's (masked modalities included)."""
    model = plus_model(False)
    x, mu, logvar, decoders, present, auxiliary_scale, nets = model
    iwae, unbiased = run_plus(model, 4, "iwae"), run_plus(model, 4, "dreg_unbiased")
    torch.testing.assert_close(unbiased.objective, iwae.objective)
    decoder_side = [auxiliary_scale, *decoders.parameters()]
    for g, w in zip(torch.autograd.grad(unbiased.objective.sum(), decoder_side, retain_graph=True),
                    torch.autograd.grad(iwae.objective.sum(), decoder_side, retain_graph=True)):
        torch.testing.assert_close(g, w)
    got, want = (torch.autograd.grad(t.objective.sum(), [mu, logvar]) for t in (unbiased, iwae))
    assert all(torch.isfinite(g).all() for g in got)
    assert not torch.allclose(got[0], want[0])


def test_top_down_private_starts_as_the_encoders_posterior_and_then_depends_on_z():
    net = TopDownPrivate(3, 2)
    mu, logvar, z = torch.randn(4, 2), torch.randn(4, 2), torch.randn(5, 4, 3)
    out_mu, out_logvar = net(mu, logvar, z)
    assert out_mu.shape == out_logvar.shape == (5, 4, 2)
    assert torch.equal(out_mu, mu.expand(5, 4, 2)) and torch.equal(out_logvar, logvar.expand(5, 4, 2))
    torch.nn.init.normal_(net.net[-1].weight)
    moved = net(mu, logvar, z + 1)[0]
    hidden = torch.nn.functional.leaky_relu(net.net[0](torch.cat([mu.expand(5, 4, 2), logvar.expand(5, 4, 2), z + 1],
                                                                 -1)), 0.2)
    torch.testing.assert_close(moved, mu + hidden @ net.net[-1].weight[:2].T + net.net[-1].bias[:2])


def test_the_component_draw_leaves_the_mixture_weights_without_gradient_and_stratification_gives_it():
    """What the docs say of holder_mixture: with the component's draw detached, the weights' one path is the density
    in log q(z|X), whose expected gradient in them is zero, so they get zero-mean noise; the stratified estimator of
    the same ELBO gives them their gradient. Float64, three experts at alpha = 1/2, 20 batches of 2 000 samples."""
    mu0 = torch.tensor([[-1.0, 0.5], [1.5, 0.0], [0.3, -1.0]], dtype=torch.float64)
    logvar0 = torch.tensor([[0.0, -0.5], [-0.3, 0.2], [0.1, 0.0]], dtype=torch.float64)
    target = torch.tensor([2.0, 1.0], dtype=torch.float64)

    def likelihood(x, present, z, decoders):
        return -3.0 * ((z - target) ** 2).sum(-1)

    batches, n = 20, 2000
    present = torch.ones(3, n, dtype=torch.bool)
    mu, logvar = mu0[:, None].expand(3, n, 2), logvar0[:, None].expand(3, n, 2)
    means = {}
    for objective in (objectives.mixture_elbo, objectives.stratified_mixture_elbo):
        torch.manual_seed(0)
        logits = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)

        def pool(m, lv, mask, logits=logits):
            return opf.holder_mixture(m, lv, 0.5, mask=mask, weights=torch.softmax(logits, 0))

        grads = []
        for _ in range(batches):
            terms = objective(None, present, mu, logvar, None, likelihood, pool)
            grads.append(torch.autograd.grad((terms.reconstruction - terms.kl).mean(), logits)[0])
        grads = torch.stack(grads)
        means[objective.__name__] = (grads.mean(0), grads.std(0) / math.sqrt(batches))
    mean, error = means["mixture_elbo"]
    assert (mean.abs() < 4 * error).all() and (error < 0.02).all()
    mean, error = means["stratified_mixture_elbo"]
    assert (mean.abs() > 1.0).sum() >= 2 and (mean.abs() > 20 * error).sum() >= 2


@pytest.mark.parametrize("top_down", [False, True], ids=["hoelderplus", "hoelderplusplus"])
def test_an_absent_modality_takes_no_part_in_the_hoelder_plus_objective_at_alpha_0(top_down):
    """At alpha = 0 the pool's one component lists every modality, absent ones too: Hölder++ scored an absent
    modality's private draw through its top-down net (not the prior, unlike Hölder+'s N(0, I) stand-in), so that
    sample's KL depended on the absent modality's net and trained it."""
    x, mu, logvar, decoders, present, auxiliary_scale, nets = plus_model(top_down)
    product = functools.partial(opf.holder_mixture, alpha=0.0, dim=0, validate_args=False)
    absent = [(0, 0), (2, 1)]  # (modality, sample) pairs tiny() leaves out

    def objective(nets):
        torch.manual_seed(9)
        return objectives.holder_plus_objective(
            x, present, mu, logvar, decoders, likelihood, product, beta=BETA, num_samples=2, estimator="iwae",
            private_dim=1, auxiliary_scale=auxiliary_scale, members=opf.holder_mixture_members(3, 0.0),
            top_down=nets)

    terms = objective(nets)
    for modality, sample in absent:
        # the absent modality's private mean and log-variance are anything at all: the sample's terms stay
        moved_mu, moved_logvar = mu.detach().clone(), logvar.detach().clone()
        moved_mu[modality, sample, 2:] += 3.0
        moved_logvar[modality, sample, 2:] -= 2.0
        torch.manual_seed(9)
        moved = objectives.holder_plus_objective(
            x, present, moved_mu, moved_logvar, decoders, likelihood, product, beta=BETA, num_samples=2,
            estimator="iwae", private_dim=1, auxiliary_scale=auxiliary_scale,
            members=opf.holder_mixture_members(3, 0.0), top_down=nets)
        for got, want in zip(moved, terms):
            torch.testing.assert_close(got[sample], want[sample].detach())
        if top_down:  # nor its top-down net, in value or gradient
            other = copy.deepcopy(nets)
            with torch.no_grad():
                other[modality].net[-1].bias.add_(2.0)
            changed = objective(other)
            torch.testing.assert_close(changed.kl[sample], terms.kl[sample].detach())
            gradient = torch.autograd.grad(terms.objective[sample], list(nets[modality].parameters()),
                                           retain_graph=True, allow_unused=True)
            assert all(g is None or not g.any() for g in gradient)
