r"""The Hölder pool of order 1/2 of diagonal Gaussians, moment-matched, as one autograd function.

The pool :math:`(\sum_j \lambda_j q_j^{1/2})^2` is the mixture of the experts (weights :math:`\lambda_j^2`) and of
one geometric mean per pair :math:`i < j` (weights :math:`2\lambda_i\lambda_j S_{ij}`, :math:`S_{ij}` the
Bhattacharyya coefficient), with, per dimension, :math:`\Delta = \mu_j - \mu_i`, :math:`u = v_i + v_j`:

* :math:`\log S_{ij} = -\sum_d [\Delta^2 / (4u) + \tfrac12 \log\cosh((\log v_i - \log v_j)/2)]`, where
  :math:`\log\cosh(a/2) = a/2 + \operatorname{log1p}(\operatorname{expm1}(-a)/2)` for :math:`a = |\log v_i - \log v_j|`
  keeps its digits as the experts coincide (no terms of the size of the log-variances cancel);
* the pair's mean :math:`(\mu_i v_j + \mu_j v_i)/u` and variance :math:`2 v_i v_j / u`.

Means are taken relative to one present expert before any difference is squared. The forward pass builds the
pair quantities as temporaries and keeps only the inputs, the output moments and the mixture weights; the backward
pass recomputes the pair quantities and applies the analytic derivatives
(:math:`\partial\log S/\partial\mu`, :math:`\partial m/\partial\log v = \Delta r_i r_j`, ...).

``fused=True`` runs other bodies of the same mathematics through ``torch.compile``: the pairs unrolled in Python
(``_forward_unrolled``, ``_backward_unrolled``), each a few ``(..., D)`` operations from per-expert terms, which
the compiler fuses into one loop per body with no ``(..., P, D)`` tensor, up to ``UNROLL_MAX_EXPERTS`` experts
(the unrolled graph grows as M^2: at M = 10 it compiles for many minutes); beyond, it compiles the pair-tensor
bodies of the eager path. One compilation per number of experts, dtype, device and shape: the first call of each
takes tens of seconds; later calls reuse it. Without a working compiler it warns once and runs the same bodies
eagerly.
"""

from __future__ import annotations

import math
import warnings

import torch

__all__ = ["hellinger_moments", "pair_components", "pair_indices"]

_LOG2 = math.log(2.0)


def pair_indices(num_experts: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs ``i < j`` of ``num_experts`` experts as two index tensors, row by row. Made afresh at each call: a
    cached tensor made inside a ``torch.func`` transform would outlive the transform's level."""
    i, j = torch.triu_indices(num_experts, num_experts, 1, device=device)
    return i, j


def _pairs(x, logvar, i, j):
    """Per-pair quantities ``(..., P, D)``: offsets, the log-variance order, Delta^2/(4u) etc."""
    xi, xj = x[..., i, :], x[..., j, :]
    lvi, lvj = logvar[..., i, :], logvar[..., j, :]
    dlv = lvi - lvj
    a = dlv.abs()
    em = torch.expm1(-a)
    big = 1 / (2 + em)  # v_max / u
    # v_i / u (the weight of mu_j in the pair's mean) and v_j / u, each to a few ulps; sigmoid rather than a select
    # from big and 1 - big: torch.where over pair-sized tensors is one of the slowest kernels on CPU
    ri = torch.sigmoid(dlv)
    rj = torch.sigmoid(-dlv)
    delta = xj - xi
    t = torch.exp(-0.5 * torch.maximum(lvi, lvj))
    z = delta * t  # Delta / sqrt(v_max); Delta^2 / (4u) = z^2 big / 4
    quad = 0.25 * z * z * big
    log_cosh = 0.5 * a + torch.log1p(0.5 * em)
    neg_log_s = (quad + 0.5 * log_cosh).sum(-1)
    loc = xi * rj + xj * ri
    lv = 0.5 * (lvi + lvj) - log_cosh  # log(2 v_i v_j / u), without a logarithm per element
    return neg_log_s, loc, lv, (delta, ri, rj, big, t, z, quad)


def _reference(mu, log_w):
    """The offsets ``mu - mu_ref`` from the expert of largest weight (present by construction)."""
    ref = log_w.argmax(-1, keepdim=True).unsqueeze(-1).expand(log_w.shape[:-1] + (1, mu.shape[-1]))
    mu_ref = mu.gather(-2, ref)
    return mu - mu_ref, mu_ref.squeeze(-2)


def _scale(x, logvar, log_w):
    """``(..., D)``: the larger of the largest present log-variance and the log of the squared spread (twice the
    largest present offset), so that variances and squared deviations, rescaled by it, are at most about one: tiny
    variances do not underflow and deviations of many standard deviations do not overflow."""
    absent = torch.zeros_like(log_w).masked_fill(log_w == -math.inf, -math.inf).unsqueeze(-1)
    spread = (x.abs() + absent).amax(-2)
    return torch.maximum((logvar + absent).amax(-2), 2 * torch.log(2 * spread))


def _mix(pi_d, pi_p, diag, pairs):
    """``sum_c pi_c value_c`` over the expert and the pair components: ``(..., D)``."""
    return (pi_d.unsqueeze(-2) @ diag).squeeze(-2) + (pi_p.unsqueeze(-2) @ pairs).squeeze(-2)


def _forward(mu, logvar, log_w, i, j):
    x, mu_ref = _reference(mu, log_w)
    neg_log_s, loc_p, _, pair_terms = _pairs(x, logvar, i, j)
    logits = torch.cat((2 * log_w, _LOG2 + log_w[..., i] + log_w[..., j] - neg_log_s), -1)
    pi = torch.softmax(logits, -1)
    m = log_w.shape[-1]
    pi_d, pi_p = pi[..., :m], pi[..., m:]
    offset = _mix(pi_d, pi_p, x, loc_p)
    scale = _scale(x, logvar, log_w)
    h = torch.exp(-0.5 * scale).unsqueeze(-2)
    dev_d, dev_p = (x - offset.unsqueeze(-2)) * h, (loc_p - offset.unsqueeze(-2)) * h
    # the pairs' variances 2 v_i v_j / u = 2 min(v_i, v_j) v_max / u from the experts': no exponential per pair
    v = torch.exp(logvar - scale.unsqueeze(-2))
    within = _mix(pi_d, pi_p, v, 2 * torch.minimum(v[..., i, :], v[..., j, :]) * pair_terms[3])
    between = _mix(pi_d, pi_p, dev_d * dev_d, dev_p * dev_p)
    logvar_out = scale + torch.log(within + between)
    return mu_ref + offset, logvar_out, offset, pi


def _backward(mu, logvar, log_w, offset, logvar_out, pi, grad_mean, grad_logvar, i, j):
    x, _ = _reference(mu, log_w)
    neg_log_s, loc_p, lv_p, pair_terms = _pairs(x, logvar, i, j)
    m = log_w.shape[-1]
    pi_d, pi_p = pi[..., :m].unsqueeze(-1), pi[..., m:].unsqueeze(-1)
    q = torch.exp(-0.5 * logvar_out).unsqueeze(-2)
    g_m, g_l = grad_mean.unsqueeze(-2), grad_logvar.unsqueeze(-2)
    g_l_total = grad_logvar.sum(-1, keepdim=True)

    def component(pi_c, loc_c, lv_c):
        """d/d(mean_c), d/d(logvar_c) and d/d(logit_c) of the loss through one set of components."""
        dev = loc_c - offset.unsqueeze(-2)
        p_dev = pi_c * dev
        py = p_dev * q  # |py| <= sqrt(pi_c): no overflow where pi_c vanishes
        rho = pi_c * torch.exp(lv_c - logvar_out.unsqueeze(-2))
        d_loc = pi_c * g_m + 2 * g_l * py * q
        d_lv = g_l * rho
        d_logit = (g_m * p_dev + g_l * (rho + py * dev * q)).sum(-1) - pi_c.squeeze(-1) * g_l_total
        return d_loc, d_lv, d_logit

    d_loc_d, d_lv_d, d_logit_d = component(pi_d, x, logvar)
    d_loc_p, d_lv_p, d_logit_p = component(pi_p, loc_p, lv_p)
    grad_log_w = 2 * d_logit_d
    grad_log_w = grad_log_w.index_add(-1, i, d_logit_p).index_add(-1, j, d_logit_p)
    gx_p, glv_p = _pair_backward(x, logvar, i, j, pair_terms, d_loc_p, d_lv_p, -d_logit_p)
    grad_mu = d_loc_d.index_add(-2, i, gx_p[0]).index_add(-2, j, gx_p[1])
    grad_logvar_in = d_lv_d.index_add(-2, i, glv_p[0]).index_add(-2, j, glv_p[1])
    return grad_mu, grad_logvar_in, grad_log_w


def _finite(value):
    """``value`` with infinities clamped to the largest finite number of its dtype, so that a zero factor makes a
    zero product (never ``0 * inf``)."""
    big = torch.finfo(value.dtype).max
    return value.clamp(-big, big)


def _pair_backward(x, logvar, i, j, pair_terms, d_loc, d_lv, d_neg_log_s):
    """Chain rule from the pair quantities (mean ``d_loc``, log-variance ``d_lv``, ``-log S`` ``d_neg_log_s``) to
    each pair's two experts: ``((d x_i, d x_j), (d logvar_i, d logvar_j))``, each ``(..., P, D)``."""
    delta, ri, rj, big, t, z, quad = pair_terms
    d_neg = d_neg_log_s.unsqueeze(-1)
    # Delta / (2u) = d(-log S)/d x_j; both it and Delta^2 / (4u) may overflow only where S, hence d_neg, is zero
    slope = _finite(0.5 * z * t * big)
    quad = _finite(quad)
    cross = d_loc * delta * ri * rj  # through the pair mean's weights: d loc / d logvar_i = Delta r_i r_j
    tanh_half = 0.25 * (ri - rj)  # d(1/2 log cosh((lv_i - lv_j) / 2)) / d lv_i
    gx = (d_loc * rj - d_neg * slope, d_loc * ri + d_neg * slope)
    glv = (cross + d_lv * rj + d_neg * (tanh_half - quad * ri), -cross + d_lv * ri - d_neg * (tanh_half + quad * rj))
    return gx, glv


def _unrolled_components(x, logvar, log_w):
    """Per-expert ``(..., D)`` slices of the offsets ``x``, of ``g = exp(-logvar / 2) / 2`` and of the variances
    relative to ``_scale``, the scale itself, and the pairs ``(i, j)``, ``i < j`` (row by row), each with its
    ``(..., D)`` terms ``(r_i, Delta, z = Delta min(g_i, g_j), v_max / u, log cosh((logvar_i - logvar_j) / 2))``.

    One Python loop over a static number of experts, which the compiler unrolls and fuses into a few loops over
    ``(..., D)`` without any ``(..., P, D)`` tensor; each pair costs two transcendental functions (``expm1``,
    ``log1p``), everything else comes from the per-expert terms."""
    m = x.shape[-2]
    scale = _scale(x, logvar, log_w)
    xs = [x[..., k, :] for k in range(m)]
    g = [0.5 * torch.exp(-0.5 * logvar[..., k, :]) for k in range(m)]
    v = [torch.exp(logvar[..., k, :] - scale) for k in range(m)]
    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
    terms = []
    for i, j in pairs:
        dlv = logvar[..., i, :] - logvar[..., j, :]
        a = dlv.abs()
        em = torch.expm1(-a)
        big = 1 / (2 + em)
        delta = xs[j] - xs[i]
        lc = 0.5 * a + torch.log1p(0.5 * em)
        terms.append((torch.where(dlv >= 0, big, 1 - big), delta, delta * torch.minimum(g[i], g[j]), big, lc))
    return xs, g, v, scale, pairs, terms


def _unrolled_mixture(xs, v, pairs, terms):
    """The components' offsets and variances relative to the scale: the experts', then the pairs'."""
    locs = xs + [xs[i] + ri * delta for (i, _), (ri, delta, *_) in zip(pairs, terms)]
    var = v + [2 * torch.minimum(v[i], v[j]) * big for (i, j), (*_, big, _) in zip(pairs, terms)]
    return locs, var


def _forward_unrolled(mu, logvar, log_w):
    """``_forward`` with the pairs unrolled (the body ``fused=True`` compiles): the same outputs, ``pi`` with the
    pairs in ``pair_indices`` order."""
    x, mu_ref = _reference(mu, log_w)
    xs, g, v, scale, pairs, terms = _unrolled_components(x, logvar, log_w)
    if pairs:
        neg_log_s = torch.stack([(z * z * big + 0.5 * lc).sum(-1) for _, _, z, big, lc in terms], -1)
        i, j = (list(k) for k in zip(*pairs))
        logits = torch.cat((2 * log_w, _LOG2 + log_w[..., i] + log_w[..., j] - neg_log_s), -1)
    else:
        logits = 2 * log_w
    pi = torch.softmax(logits, -1)
    locs, var = _unrolled_mixture(xs, v, pairs, terms)
    weights = [pi[..., c, None] for c in range(len(locs))]
    offset = sum(w * loc for w, loc in zip(weights, locs))
    h = torch.exp(-0.5 * scale)
    spread = sum(w * (var_c + ((loc - offset) * h) ** 2) for w, var_c, loc in zip(weights, var, locs))
    return mu_ref + offset, scale + torch.log(spread), offset, pi


def _backward_unrolled(mu, logvar, log_w, offset, logvar_out, pi, grad_mean, grad_logvar):
    """``_backward`` with the pairs unrolled (the body ``fused=True`` compiles): one reduction over ``D`` for the
    components' logits, then the gradients of every expert accumulated pair by pair (no ``index_add``)."""
    x, _ = _reference(mu, log_w)
    m = x.shape[-2]
    xs, g, v, scale, pairs, terms = _unrolled_components(x, logvar, log_w)
    locs, var = _unrolled_mixture(xs, v, pairs, terms)
    q = torch.exp(-0.5 * logvar_out)
    w = torch.exp(scale - logvar_out)  # variances relative to the scale -> relative to the pool's
    d_loc, d_lv, d_logit = [], [], []
    g_l_total = grad_logvar.sum(-1)
    for c, (loc, var_c) in enumerate(zip(locs, var)):
        p = pi[..., c, None]
        dev = loc - offset
        dev_q = dev * q  # |p dev_q| <= sqrt(p): no overflow where p vanishes
        rho = p * var_c * w  # pi_c v_c / V
        d_loc.append(p * (grad_mean + 2 * grad_logvar * dev_q * q))
        d_lv.append(grad_logvar * rho)
        d_logit.append((p * (dev * grad_mean + grad_logvar * dev_q * dev_q) + grad_logvar * rho).sum(-1)
                       - pi[..., c] * g_l_total)
    grad_x, grad_lv = d_loc[:m], d_lv[:m]
    grad_log_w = [2 * d for d in d_logit[:m]]
    for p, ((i, j), (ri, delta, z, big, _)) in enumerate(zip(pairs, terms)):
        dl, dv, d_logit_p = d_loc[m + p], d_lv[m + p], d_logit[m + p]
        d_neg = -d_logit_p.unsqueeze(-1)
        rj = 1 - ri
        grad_log_w[i] = grad_log_w[i] + d_logit_p
        grad_log_w[j] = grad_log_w[j] + d_logit_p
        t = torch.minimum(g[i], g[j])
        slope = _finite(2 * z * t * big)  # Delta / (2u): as in _pair_backward
        quad = _finite(z * z * big)  # Delta^2 / (4u)
        cross = dl * delta * ri * rj
        tanh_half = 0.25 * (ri - rj)
        grad_x[i] = grad_x[i] + dl * rj - d_neg * slope
        grad_x[j] = grad_x[j] + dl * ri + d_neg * slope
        grad_lv[i] = grad_lv[i] + cross + dv * rj + d_neg * (tanh_half - quad * ri)
        grad_lv[j] = grad_lv[j] - cross + dv * ri - d_neg * (tanh_half + quad * rj)
    return torch.stack(grad_x, -2), torch.stack(grad_lv, -2), torch.stack(grad_log_w, -1)


class _PairComponents(torch.autograd.Function):
    """``(-log S, loc, logvar)`` of the pairs ``i < j`` of experts given as offsets ``x`` and ``logvar``
    ``(..., M, D)``: ``(..., P)``, ``(..., P, D)``, ``(..., P, D)``; saves only its inputs."""

    # forward and backward are plain batched tensor code: torch.func.vmap runs them on its batched tensors
    generate_vmap_rule = True

    @staticmethod
    def forward(x, logvar):
        i, j = pair_indices(x.shape[-2], x.device)
        return _pairs(x, logvar, i, j)[:3]

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_neg_log_s, d_loc, d_lv):
        x, logvar = ctx.saved_tensors
        i, j = pair_indices(x.shape[-2], x.device)
        pair_terms = _pairs(x, logvar, i, j)[3]
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        d_loc = zero if d_loc is None else d_loc
        d_lv = zero if d_lv is None else d_lv
        d_neg_log_s = torch.zeros(x.shape[:-2] + i.shape, dtype=x.dtype, device=x.device) if d_neg_log_s is None \
            else d_neg_log_s
        (gx_i, gx_j), (glv_i, glv_j) = _pair_backward(x, logvar, i, j, pair_terms, d_loc, d_lv, d_neg_log_s)
        grad_x = torch.zeros_like(x).index_add(-2, i, gx_i).index_add(-2, j, gx_j)
        grad_logvar = torch.zeros_like(logvar).index_add(-2, i, glv_i).index_add(-2, j, glv_j)
        return grad_x, grad_logvar


def pair_components(x: torch.Tensor, logvar: torch.Tensor):
    """``(-log S_ij (..., P), loc_ij (..., P, D), logvar_ij (..., P, D))`` of the pairs ``i < j`` (``pair_indices``)
    of diagonal Gaussians with means ``x`` (offsets from a common reference) and log-variances ``logvar``
    ``(..., M, D)``; the backward pass recomputes them instead of saving them."""
    return _PairComponents.apply(x, logvar)


#: ``fused=True`` unrolls the pairs up to this many experts; beyond, the graph (growing as M^2) takes many minutes
#: to compile, and the compiled pair-tensor bodies (``_forward``, ``_backward``) are used instead
UNROLL_MAX_EXPERTS = 6

_COMPILED: dict[str, object] = {}
_COMPILE_FAILED: list[str] = []


def _compiled(name, fn):
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[name]


def _run(name, fn, *args):
    """``fn(*args)`` through ``torch.compile`` where compilation works; else eagerly (with a warning the first time
    compilation fails)."""
    if not _COMPILE_FAILED:
        try:
            return _compiled(name, fn)(*args)
        except Exception as error:  # no compiler, an unsupported backend...: the eager body computes the same
            _COMPILE_FAILED.append(repr(error))
            warnings.warn(f"fused=True: torch.compile failed ({type(error).__name__}: {error}); running the "
                          "Hellinger pool eagerly from now on", RuntimeWarning, stacklevel=4)
    return fn(*args)


class _HellingerMoments(torch.autograd.Function):
    """``(mean, logvar, offset, pi)``: the pool's moments and, for the backward pass only (not differentiable),
    the mean's offset from the reference expert and the mixture weights."""

    generate_vmap_rule = True

    @staticmethod
    def forward(mu, logvar, log_w, fused):
        if fused and mu.shape[-2] <= UNROLL_MAX_EXPERTS:
            return _run("forward", _forward_unrolled, mu, logvar, log_w)
        i, j = pair_indices(mu.shape[-2], mu.device)
        if fused:
            return _run("forward_pairs", _forward, mu, logvar, log_w, i, j)
        return _forward(mu, logvar, log_w, i, j)

    @staticmethod
    def setup_context(ctx, inputs, output):
        mu, logvar, log_w, ctx.fused = inputs
        _, logvar_out, offset, pi = output
        ctx.mark_non_differentiable(offset, pi)
        ctx.save_for_backward(mu, logvar, log_w, offset, logvar_out, pi)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mean, grad_logvar, _grad_offset, _grad_pi):
        mu, logvar, log_w, offset, logvar_out, pi = ctx.saved_tensors
        grad_mean, grad_logvar = grad_mean.contiguous(), grad_logvar.contiguous()
        if ctx.fused and mu.shape[-2] <= UNROLL_MAX_EXPERTS:
            grads = _run("backward", _backward_unrolled, mu, logvar, log_w, offset, logvar_out, pi, grad_mean,
                         grad_logvar)
        else:
            i, j = pair_indices(mu.shape[-2], mu.device)
            arguments = (mu, logvar, log_w, offset, logvar_out, pi, grad_mean, grad_logvar, i, j)
            grads = _run("backward_pairs", _backward, *arguments) if ctx.fused else _backward(*arguments)
        return (*grads, None)


def hellinger_moments(mu: torch.Tensor, logvar: torch.Tensor, log_weights: torch.Tensor, fused: bool = False):
    """Moment-matched ``(mean, logvar)`` ``(..., D)`` of the order-1/2 pool of experts ``(..., M, D)`` with
    log-weights ``(..., M)`` (``-inf`` for absent experts, at least one present; they broadcast)."""
    batch = torch.broadcast_shapes(mu.shape[:-2], log_weights.shape[:-1])
    mu = mu.expand(batch + mu.shape[-2:])
    logvar = logvar.expand(batch + logvar.shape[-2:])
    log_weights = log_weights.expand(batch + log_weights.shape[-1:])
    return _HellingerMoments.apply(mu, logvar, log_weights, bool(fused))[:2]
