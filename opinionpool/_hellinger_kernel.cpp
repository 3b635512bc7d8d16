// The moment-matched Hölder pool of order 1/2 of diagonal Gaussians, forward and backward, as one pass per sample
// over its experts' dimensions: the CPU kernel behind hellinger(..., fused=True). The mathematics, the names and
// the order of operations follow _forward and _backward in _hellinger.py (read that file first); here the pairs
// are never materialised as tensors. Per sample and pass, each pair costs a division per dimension (no
// transcendental function, see store_ratios); its ratios r_i = v_i / u and r_j = v_j / u are kept in two buffers
// of P rows for the later loop of the same pass. Pairs of zero mixture weight are skipped once the weights are
// known (Sample::weighed). Where the eager formulas differ:
// - the ratios come from the experts' variances relative to the largest at each dimension (the eager path uses
//   sigmoids of the log-variance differences; this kernel falls back to expm1 where those underflow);
// - sum_d log((1 + e^-a) / 2) is the logarithm of a running product (see forward_sample), whose rounding error is
//   a few float32 ulps per dimension rather than a fraction of one;
// - in the backward pass an expert's share of the pool's variance is p v / V from the variances relative to the
//   scale, not p exp(logvar - logvar_out).
//
// Layout: mu, logvar (N, M, D) with unit stride along D and any strides along N and M (the functional API's
// experts-first (M, N, D) tensors, viewed as (N, M, D), are read and their gradients written in that layout,
// without transposed copies), log_w (N, M) and the other tensors contiguous; pi (N, M + P) with the pairs i < j
// row by row.
// Dimensions run in SIMD vectors (ATen's Vectorized: AVX2 / AVX-512 with SLEEF's transcendental functions when
// built with their flags); rows are padded with zeros, which contribute nothing to any sum over dimensions.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using at::vec::Vectorized;

// The distance between rows, in numbers: at least `width`, an odd number of cache lines and whole vectors. The loops
// over all pairs at one dimension touch a row per pair and buffer; rows a power of two bytes apart (512 float32
// dimensions: 2 KiB) fall into a few sets of the L1 cache and evict each other, an odd number of lines apart they
// spread over all sets.
template <typename T>
int64_t row_stride(int64_t width) {
  constexpr int64_t line = 64 / sizeof(T), vs = Vectorized<T>::size();
  int64_t lines = (width + line - 1) / line;
  if (lines % 2 == 0) ++lines;
  return (lines * line + vs - 1) / vs * vs;
}

template <typename T>
struct Sample {
  // one sample's experts, relative to its reference expert (x) and as given (means: the pairs' differences, which
  // the offsets' rounding would lose for close experts far from the reference), in rows of `width` numbers (the
  // dimensions padded to whole vectors) that start `stride` numbers apart
  int64_t m, d, width, stride, pairs;
  std::vector<T> x, means, lv, g, v, rel, scale, r_first, r_second;
  std::vector<int64_t> first, second, live;
  // work space of the passes, allocated once per call and parallel_for chunk, not per sample (fresh large buffers
  // cost page faults); the backward pass's only where it runs
  std::vector<T> logits, rows_out, d_loc, d_lv;
  std::vector<Vectorized<T>> loc, var, d_logit;

  Sample(int64_t m_, int64_t d_, bool backward)
      : m(m_), d(d_), width((d_ + Vectorized<T>::size() - 1) / Vectorized<T>::size() * Vectorized<T>::size()),
        stride(row_stride<T>(width)), pairs(m_ * (m_ - 1) / 2), x(m_ * stride), means(m_ * stride),
        lv(m_ * stride), g(m_ * stride), v(m_ * stride), rel(m_ * stride), scale(width),
        r_first(pairs * stride), r_second(pairs * stride), logits(m_ + pairs),
        rows_out(backward ? 2 * m_ * stride : 0), d_loc(backward ? pairs * stride : 0),
        d_lv(backward ? pairs * stride : 0), loc(pairs), var(pairs), d_logit(backward ? m_ + pairs : 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = i + 1; j < m; ++j) {
        first.push_back(i);
        second.push_back(j);
      }
  }

  // the pairs of non-zero mixture weight in pi (experts first): the others add exactly zero to the pool's moments
  // and to every gradient (their weight multiplies each of their terms, all finite), so the passes skip them; where
  // experts stopped overlapping, as a trained HELVAE's do, that is every pair (NaN weights are kept)
  const std::vector<int64_t>& weighed(const T* pi) {
    live.clear();
    for (int64_t p = 0; p < pairs; ++p)
      if (pi[m + p] != T(0)) live.push_back(p);
    return live;
  }

  // loads one sample: offsets from the expert of largest weight, the scale of _scale, g = exp(-logvar / 2) / 2,
  // the variances relative to the scale (v) and to the largest of the experts' at each dimension (rel, for the
  // pairs' ratios); returns the reference expert
  int64_t load(const T* mu, int64_t mu_step, const T* logvar, int64_t lv_step, const T* log_w) {
    using V = Vectorized<T>;
    int64_t ref = 0;
    for (int64_t k = 1; k < m; ++k)
      if (log_w[k] > log_w[ref]) ref = k;
    const T inf = std::numeric_limits<T>::infinity();
    for (int64_t c = 0; c < width; c += V::size()) {
      const int64_t count = std::min<int64_t>(V::size(), d - c);  // partial loads fill the padding with zeros
      const V mu_ref = V::loadu(&mu[ref * mu_step + c], count);
      V largest_lv(-inf), spread(-inf);
      for (int64_t k = 0; k < m; ++k) {
        const V muk = V::loadu(&mu[k * mu_step + c], count);
        const V xk = muk - mu_ref;
        const V lvk = V::loadu(&logvar[k * lv_step + c], count);
        muk.store(&means[k * stride + c]);
        xk.store(&x[k * stride + c]);
        lvk.store(&lv[k * stride + c]);
        if (log_w[k] != -inf) {
          largest_lv = at::vec::maximum(largest_lv, lvk);
          spread = at::vec::maximum(spread, xk.abs());
        }
      }
      // log(2 spread) as log(spread) + log 2: 2 spread overflows for offsets above half the largest float
      at::vec::maximum(largest_lv, (spread.log() + V(T(0.69314718055994530942))) * V(2)).store(&scale[c]);
    }
    for (int64_t c = 0; c < width; c += V::size()) {
      V largest(-inf);  // over all experts: every pair's larger variance relative to it is at most one
      for (int64_t k = 0; k < m; ++k) largest = at::vec::maximum(largest, V::loadu(&lv[k * stride + c]));
      for (int64_t k = 0; k < m; ++k) {
        const V l = V::loadu(&lv[k * stride + c]);
        (V(0.5) * (l * V(-0.5)).exp()).store(&g[k * stride + c]);
        (l - V::loadu(&scale[c])).exp().store(&v[k * stride + c]);
        (l - largest).exp().store(&rel[k * stride + c]);
      }
    }
    for (int64_t k = 0; k < m; ++k)
      for (int64_t c = d; c < width; ++c) v[k * stride + c] = 0;  // the padding contributes no variance
    return ref;
  }
};

// vectors per running product: factors of at most 2, so a lane's product of 64 stays finite in float32 (2^128)
constexpr int64_t PRODUCT_TERMS = 64;

template <typename T>
// _finite: infinities to the largest finite number
C10_ALWAYS_INLINE Vectorized<T> finite(const Vectorized<T>& value) {
  const T big = std::numeric_limits<T>::max();
  return at::vec::clamp(value, Vectorized<T>(-big), Vectorized<T>(big));
}

// Stores r_i = v_i / u (the weight of x_j in the pair's mean) and r_j = v_j / u of pair p = (i, j) at dimensions
// c, c + 1, ... for the later loops; sets them in r_i, r_j and returns v_max / u. From the experts' variances
// relative to the largest at each dimension (a division, no transcendental function per pair), unless the larger
// of the two is subnormal or zero there (log-variances more than about 87 below the largest in float32): then
// from em = exp(-|lv_i - lv_j|) - 1, as _rows does.
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> store_ratios(Sample<T>& s, int64_t p, int64_t i, int64_t j, int64_t c,
                                               Vectorized<T>& r_i, Vectorized<T>& r_j) {
  using V = Vectorized<T>;
  const int64_t stride = s.stride;
  const V e_i = V::loadu(&s.rel[i * stride + c]), e_j = V::loadu(&s.rel[j * stride + c]);
  if ((at::vec::maximum(e_i, e_j) < V(std::numeric_limits<T>::min())).zero_mask() == (1 << V::size()) - 1) {
    const V inverse = (e_i + e_j).reciprocal();
    r_i = e_i * inverse;
    r_j = e_j * inverse;
  } else {
    const V dlv = V::loadu(&s.lv[i * stride + c]) - V::loadu(&s.lv[j * stride + c]);
    const V em = dlv.abs().neg().expm1();
    const V big = (em + V(2)).reciprocal(), small = (em + V(1)) * big;
    const V i_larger = dlv >= V(0);
    r_i = V::blendv(small, big, i_larger);
    r_j = V::blendv(big, small, i_larger);
  }
  r_i.store(&s.r_first[p * stride + c]);
  r_j.store(&s.r_second[p * stride + c]);
  return at::vec::maximum(r_i, r_j);
}

// the stored r_i, r_j of pair p at dimensions c, ... and v_max / u
template <typename T>
C10_ALWAYS_INLINE void ratios(const Sample<T>& s, int64_t p, int64_t c, Vectorized<T>& big, Vectorized<T>& r_i,
                              Vectorized<T>& r_j) {
  r_i = Vectorized<T>::loadu(&s.r_first[p * s.stride + c]);
  r_j = Vectorized<T>::loadu(&s.r_second[p * s.stride + c]);
  big = at::vec::maximum(r_i, r_j);
}

// the mean offset x_i + r_i Delta and the variance 2 min(v_i, v_j) v_max / u (relative to the scale) of pair
// (i, j) at dimensions c, ...
// Delta = mu_j - mu_i, from the means as given
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> difference(const Sample<T>& s, int64_t i, int64_t j, int64_t c) {
  return Vectorized<T>::loadu(&s.means[j * s.stride + c]) - Vectorized<T>::loadu(&s.means[i * s.stride + c]);
}

template <typename T>
C10_ALWAYS_INLINE void pair_moments(const Sample<T>& s, int64_t i, int64_t j, int64_t c, const Vectorized<T>& r_i,
                                    const Vectorized<T>& big, Vectorized<T>& loc, Vectorized<T>& var) {
  using V = Vectorized<T>;
  loc = V::loadu(&s.x[i * s.stride + c]) + r_i * difference(s, i, j, c);
  var = at::vec::minimum(V::loadu(&s.v[i * s.stride + c]), V::loadu(&s.v[j * s.stride + c])) * big * V(2);
}

template <typename T>
void forward_sample(Sample<T>& s, const T* mu, int64_t mu_step, const T* logvar, int64_t lv_step, const T* log_w,
                    T* mean, T* logvar_out, T* offset_out, T* pi) {
  using V = Vectorized<T>;
  const int64_t m = s.m, width = s.width, stride = s.stride, vs = V::size();
  const int64_t ref = s.load(mu, mu_step, logvar, lv_step, log_w);
  const T inf = std::numeric_limits<T>::infinity();
  // the logits: experts 2 log w_k, pairs log 2 + log w_i + log w_j - (-log S_ij)
  std::vector<T>& logits = s.logits;
  for (int64_t k = 0; k < m; ++k) logits[k] = 2 * log_w[k];
  for (int64_t p = 0; p < s.pairs; ++p) {
    const int64_t i = s.first[p], j = s.second[p];
    // -log S_ij = sum_d [Delta^2 / (4u) + a / 4 + log((1 + e^-a) / 2) / 2], a = |lv_i - lv_j|, where
    // (1 + e^-a) / 2 = 1 / (2 v_max / u): the last term as minus half the logarithm of a running product of
    // factors 2 v_max / u in [1, 2] per SIMD lane, taken every PRODUCT_TERMS vectors (a logarithm per pair and
    // dimension took the largest share of the pass's time)
    V total(0), product(1);
    int64_t terms = 0;
    for (int64_t c = 0; c < width; c += vs) {
      const V a = (V::loadu(&s.lv[i * stride + c]) - V::loadu(&s.lv[j * stride + c])).abs();
      V r_i, r_j;
      const V big = store_ratios(s, p, i, j, c, r_i, r_j);
      const V delta = difference(s, i, j, c);
      const V z = delta * at::vec::minimum(V::loadu(&s.g[i * stride + c]), V::loadu(&s.g[j * stride + c]));
      total = total + z * z * big + a * V(0.25);
      product = product * (big * V(2));
      if (++terms == PRODUCT_TERMS) {
        total = total - product.log() * V(0.5);
        product = V(1);
        terms = 0;
      }
    }
    total = total - product.log() * V(0.5);
    const T neg_log_s = at::vec::vec_reduce_all<T>([](V& u, V& w) { return u + w; }, total);
    logits[m + p] = std::log(T(2)) + log_w[i] + log_w[j] - neg_log_s;
  }
  T top = -inf;
  for (T l : logits) top = std::max(top, l);
  T sum = 0;
  for (int64_t c = 0; c < m + s.pairs; ++c) sum += (pi[c] = std::exp(logits[c] - top));
  for (int64_t c = 0; c < m + s.pairs; ++c) pi[c] /= sum;

  std::vector<V>& loc = s.loc;
  std::vector<V>& var = s.var;
  const std::vector<int64_t>& live = s.weighed(pi);
  for (int64_t c = 0; c < width; c += vs) {
    V offset(0);
    for (int64_t k = 0; k < m; ++k) offset = offset + V(pi[k]) * V::loadu(&s.x[k * stride + c]);
    for (const int64_t p : live) {
      const int64_t i = s.first[p], j = s.second[p];
      V big, r_i, r_j;
      ratios(s, p, c, big, r_i, r_j);
      pair_moments(s, i, j, c, r_i, big, loc[p], var[p]);
      offset = offset + V(pi[m + p]) * loc[p];
    }
    const V h = (V::loadu(&s.scale[c]) * V(-0.5)).exp();
    V spread(0);
    for (int64_t k = 0; k < m; ++k) {
      const V dev = (V::loadu(&s.x[k * stride + c]) - offset) * h;
      spread = spread + V(pi[k]) * (V::loadu(&s.v[k * stride + c]) + dev * dev);
    }
    for (const int64_t p : live) {
      const V dev = (loc[p] - offset) * h;
      spread = spread + V(pi[m + p]) * (var[p] + dev * dev);
    }
    const int64_t count = std::min(vs, s.d - c);
    (V::loadu(&mu[ref * mu_step + c], count) + offset).store(&mean[c], count);
    (V::loadu(&s.scale[c]) + spread.log()).store(&logvar_out[c], count);
    offset.store(&offset_out[c], count);
  }
}

template <typename T>
void backward_sample(Sample<T>& s, const T* mu, int64_t mu_step, const T* logvar, int64_t lv_step, const T* log_w,
                     const T* offset_in, const T* logvar_out_in, const T* pi, const T* grad_mean_in,
                     const T* grad_logvar_in, T* grad_mu, int64_t grad_mu_step, T* grad_logvar,
                     int64_t grad_lv_step, T* grad_log_w) {
  using V = Vectorized<T>;
  const int64_t m = s.m, width = s.width, stride = s.stride, vs = V::size(), d = s.d, n_comp = m + s.pairs;
  s.load(mu, mu_step, logvar, lv_step, log_w);
  T g_l_total = 0;
  for (int64_t c = 0; c < d; ++c) g_l_total += grad_logvar_in[c];
  // first loop: each component's d/d(mean) and d/d(logvar) (the pairs' kept for the second loop) and the sums
  // over dimensions of its d/d(logit); the experts' terms go straight into their gradients
  T* gx = s.rows_out.data();
  T* glv = gx + m * stride;
  std::vector<V>& d_logit = s.d_logit;
  std::fill(d_logit.begin(), d_logit.end(), V(0));
  const std::vector<int64_t>& live = s.weighed(pi);
  for (int64_t c = 0; c < width; c += vs) {
    const int64_t count = std::min(vs, d - c);  // zeros in the padding: no contribution to any sum
    const V off = V::loadu(&offset_in[c], count), gm = V::loadu(&grad_mean_in[c], count);
    const V gl = V::loadu(&grad_logvar_in[c], count), out = V::loadu(&logvar_out_in[c], count);
    // the pool's variance relative to the scale, at least p_c v_c for every component: dividing by it never
    // overflows, where its reciprocal would once it falls below e^-88 in float32 (as in _backward)
    const V qq = (out * V(-0.5)).exp(), total = (out - V::loadu(&s.scale[c])).exp();
    // its reciprocal where every lane of it is a normal number (a multiplication per component instead of a
    // division)
    const bool normal = (total < V(std::numeric_limits<T>::min())).zero_mask() == (1 << vs) - 1;
    const V inverse = total.reciprocal();
    auto component = [&](T p_scalar, const V& loc, const V& var, T* d_loc_out, T* d_lv_out, V& d_logit_acc) {
      const V p(p_scalar), sqrt_p(std::sqrt(p_scalar));
      const V dev = loc - off;
      // sqrt(p) dev / sqrt(V), at most one in magnitude (p dev^2 <= V): scaled by sqrt(p) first, as in _backward,
      // so that a component of vanishing weight far from the pool overflows nothing (dev / sqrt(V) alone can,
      // and then met p = 0 as inf * 0 = NaN)
      const V s_dev = dev * sqrt_p * qq;
      const V rho = normal ? p * var * inverse : p * var / total;
      (sqrt_p * (gm * sqrt_p + V(2) * gl * s_dev * qq)).store(d_loc_out);
      const V dlv = gl * rho;
      dlv.store(d_lv_out);
      d_logit_acc = d_logit_acc + p * dev * gm + gl * s_dev * s_dev + dlv;
    };
    for (int64_t k = 0; k < m; ++k)
      component(pi[k], V::loadu(&s.x[k * stride + c]), V::loadu(&s.v[k * stride + c]), &gx[k * stride + c],
                &glv[k * stride + c], d_logit[k]);
    for (const int64_t p : live) {
      const int64_t i = s.first[p], j = s.second[p];
      V r_i, r_j;
      const V big = store_ratios(s, p, i, j, c, r_i, r_j);
      V loc, var;
      pair_moments(s, i, j, c, r_i, big, loc, var);
      component(pi[m + p], loc, var, &s.d_loc[p * stride + c], &s.d_lv[p * stride + c], d_logit[m + p]);
    }
  }
  std::vector<T>& logit_grad = s.logits;
  for (int64_t k = 0; k < n_comp; ++k)
    logit_grad[k] = at::vec::vec_reduce_all<T>([](V& u, V& v) { return u + v; }, d_logit[k]) - pi[k] * g_l_total;
  for (int64_t k = 0; k < m; ++k) grad_log_w[k] = 2 * logit_grad[k];
  for (int64_t p = 0; p < s.pairs; ++p) {
    grad_log_w[s.first[p]] += logit_grad[m + p];
    grad_log_w[s.second[p]] += logit_grad[m + p];
  }
  // second loop: through each pair's mean, log-variance and -log S to its two experts (_row_backward)
  for (const int64_t p : live) {
    const int64_t i = s.first[p], j = s.second[p];
    const V d_neg(-logit_grad[m + p]);
    for (int64_t c = 0; c < width; c += vs) {
      V big, r_i, r_j;
      ratios(s, p, c, big, r_i, r_j);
      const V delta = difference(s, i, j, c);
      const V t = at::vec::minimum(V::loadu(&s.g[i * stride + c]), V::loadu(&s.g[j * stride + c]));
      const V z = delta * t;
      const V slope = finite(z * t * big * V(2));  // Delta / (2u)
      const V quad = finite(z * z * big);         // Delta^2 / (4u)
      const V dl = V::loadu(&s.d_loc[p * stride + c]), dv = V::loadu(&s.d_lv[p * stride + c]);
      const V cross = dl * delta * (r_i * r_j);
      const V tanh_half = (r_i - r_j) * V(0.25);
      const V push = d_neg * slope;
      T* gx_i = &gx[i * stride + c];
      T* gx_j = &gx[j * stride + c];
      T* glv_i = &glv[i * stride + c];
      T* glv_j = &glv[j * stride + c];
      (V::loadu(gx_i) + dl * r_j - push).store(gx_i);
      (V::loadu(gx_j) + dl * r_i + push).store(gx_j);
      (V::loadu(glv_i) + cross + dv * r_j + d_neg * (tanh_half - quad * r_i)).store(glv_i);
      (V::loadu(glv_j) - cross + dv * r_i - d_neg * (tanh_half + quad * r_j)).store(glv_j);
    }
  }
  for (int64_t k = 0; k < m; ++k)
    for (int64_t c = 0; c < width; c += vs) {
      const int64_t count = std::min(vs, d - c);
      V::loadu(&gx[k * stride + c]).store(&grad_mu[k * grad_mu_step + c], count);
      V::loadu(&glv[k * stride + c]).store(&grad_logvar[k * grad_lv_step + c], count);
    }
}

void check(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& log_w) {
  TORCH_CHECK(mu.dim() == 3 && logvar.sizes() == mu.sizes(), "mu and logvar must be (N, M, D) of one shape");
  TORCH_CHECK(log_w.dim() == 2 && log_w.size(0) == mu.size(0) && log_w.size(1) == mu.size(1),
              "log_w must be (N, M)");
  TORCH_CHECK((mu.size(2) <= 1 || mu.stride(2) == 1) && (logvar.size(2) <= 1 || logvar.stride(2) == 1) &&
                  log_w.is_contiguous(),
              "mu and logvar must have unit stride along D, log_w must be contiguous");
  TORCH_CHECK(mu.scalar_type() == logvar.scalar_type() && mu.scalar_type() == log_w.scalar_type(),
              "inputs must share one dtype");
  TORCH_CHECK(mu.size(1) >= 1, "at least one expert");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& mu, const at::Tensor& logvar,
                                                                   const at::Tensor& log_w) {
  check(mu, logvar, log_w);
  const int64_t n = mu.size(0), m = mu.size(1), d = mu.size(2);
  auto mean = at::empty({n, d}, mu.options()), logvar_out = at::empty({n, d}, mu.options());
  auto offset = at::empty({n, d}, mu.options()), pi = at::empty({n, m + m * (m - 1) / 2}, mu.options());
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "hellinger_forward", [&] {
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      Sample<scalar_t> s(m, d, false);
      for (int64_t b = begin; b < end; ++b)
        forward_sample(s, mu.data_ptr<scalar_t>() + b * mu.stride(0), mu.stride(1),
                       logvar.data_ptr<scalar_t>() + b * logvar.stride(0), logvar.stride(1),
                       log_w.data_ptr<scalar_t>() + b * m, mean.data_ptr<scalar_t>() + b * d,
                       logvar_out.data_ptr<scalar_t>() + b * d, offset.data_ptr<scalar_t>() + b * d,
                       pi.data_ptr<scalar_t>() + b * pi.size(1));
    });
  });
  return {mean, logvar_out, offset, pi};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& mu, const at::Tensor& logvar,
                                                        const at::Tensor& log_w, const at::Tensor& offset,
                                                        const at::Tensor& logvar_out, const at::Tensor& pi,
                                                        const at::Tensor& grad_mean, const at::Tensor& grad_logvar) {
  check(mu, logvar, log_w);
  for (const auto& t : {offset, logvar_out, pi, grad_mean, grad_logvar})
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == mu.scalar_type() && t.size(0) == mu.size(0),
                "saved tensors and incoming gradients must be contiguous, of the inputs' dtype and batch");
  const int64_t n = mu.size(0), m = mu.size(1), d = mu.size(2);
  // laid out as the inputs where they are dense (a permuted (M, N, D) tensor: its gradient needs no copy either)
  auto grad_mu = at::empty_like(mu), grad_lv = at::empty_like(logvar), grad_log_w = at::empty_like(log_w);
  TORCH_CHECK(d <= 1 || (grad_mu.stride(2) == 1 && grad_lv.stride(2) == 1), "gradients with unit stride along D");
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "hellinger_backward", [&] {
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      Sample<scalar_t> s(m, d, true);
      for (int64_t b = begin; b < end; ++b)
        backward_sample(s, mu.data_ptr<scalar_t>() + b * mu.stride(0), mu.stride(1),
                        logvar.data_ptr<scalar_t>() + b * logvar.stride(0), logvar.stride(1),
                        log_w.data_ptr<scalar_t>() + b * m, offset.data_ptr<scalar_t>() + b * d,
                        logvar_out.data_ptr<scalar_t>() + b * d, pi.data_ptr<scalar_t>() + b * pi.size(1),
                        grad_mean.data_ptr<scalar_t>() + b * d, grad_logvar.data_ptr<scalar_t>() + b * d,
                        grad_mu.data_ptr<scalar_t>() + b * grad_mu.stride(0), grad_mu.stride(1),
                        grad_lv.data_ptr<scalar_t>() + b * grad_lv.stride(0), grad_lv.stride(1),
                        grad_log_w.data_ptr<scalar_t>() + b * m);
    });
  });
  return {grad_mu, grad_lv, grad_log_w};
}

}  // namespace

TORCH_LIBRARY(opinionpool_hellinger, library) {
  library.def("forward(Tensor mu, Tensor logvar, Tensor log_w) -> (Tensor, Tensor, Tensor, Tensor)");
  library.def(
      "backward(Tensor mu, Tensor logvar, Tensor log_w, Tensor offset, Tensor logvar_out, Tensor pi, "
      "Tensor grad_mean, Tensor grad_logvar) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(opinionpool_hellinger, CPU, library) {
  library.impl("forward", &forward);
  library.impl("backward", &backward);
}
