// Fused multi-head softmax attention for XLA's CPU backend (an XLA FFI custom call).
//
// Why: on a CPU the encoders' attention is bound by memory traffic and by per-product
// overhead, not arithmetic. XLA writes each head's S x T logits and weights to memory
// between separate kernels and hands its 4-wide heads to a batched-matmul library as
// thousands of tiny products. Here one head at a time stays in L1: logits, masked
// softmax, dropout scale and value product (forward), and the whole gradient
// (backward, recomputing the weights from the saved row maxima and sums).
//
// Layouts (B = all leading dims flattened, H heads, C head width, S queries, T keys):
//   q f32[..., S, H, C], k f32[..., T, H, C], v f32[..., T, H, C] (as Dense layers emit
//   them; "..." is B entries in row-major order), key_mask f32[..., T] (1: attend,
//   0: ignore), drop f32[..., H, S, T] (optional: keep scale of dropout on the weights,
//   applied after the softmax)
//   out f32[..., S, H, C]; row_max, row_sum f32[..., H, S] (residuals for the gradient)
// Semantics match caasl_jax.agents.networks._attention_forward: logits q.k / sqrt(C),
// masked keys set to the lowest float (a row with every key masked attends uniformly).

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vf splat(float x) { return vf{} + x; }

// exp on a vector: 2^n * p(r) with n = round(x / ln 2), |r| <= ln 2 / 2, p a degree-6
// polynomial (Cephes expf coefficients, about 1 ulp); exp(x) = 0 below -87.3 (XLA's
// CPU exp flushes those denormal results to zero too).
inline vf vexp(vf x) {
  const vf hi = splat(88.3762626647949f), lo = splat(-87.3365478515625f);
  vf xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf t = xc * splat(1.44269504088896341f) + magic;
  vf n = t - magic;
  vf r = xc - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vf p = splat(1.9875691500E-4f);
  p = p * r + splat(1.3981999507E-3f);
  p = p * r + splat(8.3334519073E-3f);
  p = p * r + splat(4.1665795894E-2f);
  p = p * r + splat(1.6666665459E-1f);
  p = p * r + splat(5.0000001201E-1f);
  p = p * (r * r) + r + splat(1.0f);
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  vf result = p * scale;
  return x < lo ? splat(0.0f) : result;
}

// Sum of the lanes, as a tree (4 shuffles and adds instead of 15 dependent adds).
// GCC spells a constant lane shuffle __builtin_shuffle(x, mask), clang
// __builtin_shufflevector(x, x, indices...).
#if defined(__clang__)
#define CAASL_SHUFFLE(x, ...) __builtin_shufflevector(x, x, __VA_ARGS__)
#else
#define CAASL_SHUFFLE(x, ...) __builtin_shuffle(x, vi{__VA_ARGS__})
#endif
inline float hsum(vf x) {
  x += CAASL_SHUFFLE(x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  x += CAASL_SHUFFLE(x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  x += CAASL_SHUFFLE(x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  x += CAASL_SHUFFLE(x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return x[0];
}

struct Dims {
  int64_t B, S, T, H, C;
};

// One head's working set. Vectors hold kLanes consecutive QUERIES, so that the max,
// the sum over keys and the value product are lane-wise operations: no horizontal
// reduction per query row. Only the key and value gradients, sums over queries,
// reduce across lanes, once per head.
struct HeadScratch {
  std::vector<float> k, v;          // [T * C] this head's keys and values
  std::vector<int32_t> keys;        // the keys attended (all T when every key is masked)
  std::vector<vf> q, g, acc, dq;    // [C] per query block
  std::vector<vf> w, drop;          // [T] weights and dropout scales of a query block
  std::vector<vf> dk, dv;           // [T * C] gradient accumulators
  explicit HeadScratch(const Dims& d)
      : k(d.T * d.C), v(d.T * d.C), q(d.C), g(d.C), acc(d.C), dq(d.C), w(d.T),
        drop(d.T), dk(d.T * d.C), dv(d.T * d.C) {
    keys.reserve(d.T);
  }
};

// Copies head h of batch entry b's keys and values; lists the attended keys.
// Returns true when every key is masked (the row then attends uniformly to all T).
bool load_head(const Dims& d, int64_t b, int64_t h, const float* k, const float* v,
               const float* key_mask, HeadScratch& s) {
  const int64_t row = d.H * d.C;
  s.keys.clear();
  for (int64_t t = 0; t < d.T; ++t) {
    const float* kr = k + (b * d.T + t) * row + h * d.C;
    const float* vr = v + (b * d.T + t) * row + h * d.C;
    for (int64_t c = 0; c < d.C; ++c) {
      s.k[t * d.C + c] = kr[c];
      s.v[t * d.C + c] = vr[c];
    }
    if (key_mask[b * d.T + t] > 0.0f) s.keys.push_back(static_cast<int32_t>(t));
  }
  const bool all_masked = s.keys.empty();
  if (all_masked)
    for (int64_t t = 0; t < d.T; ++t) s.keys.push_back(static_cast<int32_t>(t));
  return all_masked;
}

// Lane i of a block holds query s0 + i; lanes past S are zero and never written back.
inline int64_t lanes_in_block(const Dims& d, int64_t s0) {
  return std::min<int64_t>(kLanes, d.S - s0);
}

// Gathers a [S, H, C]-strided per-query operand into [C] vectors of the block.
void gather_queries(const Dims& d, const float* x, int64_t b, int64_t h, int64_t s0,
                    std::vector<vf>& out) {
  const int64_t n = lanes_in_block(d, s0), row = d.H * d.C;
  for (int64_t c = 0; c < d.C; ++c) out[c] = splat(0.0f);
  for (int64_t i = 0; i < n; ++i) {
    const float* xr = x + (b * d.S + s0 + i) * row + h * d.C;
    for (int64_t c = 0; c < d.C; ++c) out[c][i] = xr[c];
  }
}

// Transposed dropout scales of the block: s.drop[t][i] = drop[b, h, s0 + i, t].
void gather_drop(const Dims& d, const float* drop, int64_t b, int64_t h, int64_t s0,
                 HeadScratch& s) {
  const int64_t n = lanes_in_block(d, s0);
  for (int64_t t = 0; t < d.T; ++t) s.drop[t] = splat(0.0f);
  for (int64_t i = 0; i < n; ++i) {
    const float* dr = drop + ((b * d.H + h) * d.S + s0 + i) * d.T;
    for (int64_t t = 0; t < d.T; ++t) s.drop[t][i] = dr[t];
  }
}

// Scaled logits of the block's queries against key t.
inline vf logit(const Dims& d, const HeadScratch& s, int64_t t, float scale) {
  vf acc = splat(0.0f);
  const float* kt = &s.k[t * d.C];
  for (int64_t c = 0; c < d.C; ++c) acc += s.q[c] * kt[c];
  return acc * scale;
}

template <bool kDrop>
void forward_head(const Dims& d, int64_t b, int64_t h, const float* q, const float* k,
                  const float* v, const float* key_mask, const float* drop, float* out,
                  float* row_max, float* row_sum, HeadScratch& s) {
  const bool all_masked = load_head(d, b, h, k, v, key_mask, s);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.C));
  const int64_t row = d.H * d.C;
  for (int64_t s0 = 0; s0 < d.S; s0 += kLanes) {
    gather_queries(d, q, b, h, s0, s.q);
    vf mx = splat(-FLT_MAX), sum = splat(0.0f);
    if (all_masked) {  // every logit is the lowest float: exp(0) = 1 for all keys
      for (int32_t t : s.keys) s.w[t] = splat(1.0f);
      sum = splat(static_cast<float>(d.T));
    } else {
      for (int32_t t : s.keys) {
        s.w[t] = logit(d, s, t, scale);
        mx = s.w[t] > mx ? s.w[t] : mx;
      }
      for (int32_t t : s.keys) {
        s.w[t] = vexp(s.w[t] - mx);
        sum += s.w[t];
      }
    }
    if (kDrop) gather_drop(d, drop, b, h, s0, s);
    for (int64_t c = 0; c < d.C; ++c) s.acc[c] = splat(0.0f);
    for (int32_t t : s.keys) {
      const vf w = kDrop ? s.w[t] * s.drop[t] : s.w[t];
      const float* vt = &s.v[t * d.C];
      for (int64_t c = 0; c < d.C; ++c) s.acc[c] += w * vt[c];
    }
    const int64_t n = lanes_in_block(d, s0);
    for (int64_t i = 0; i < n; ++i) {
      float* o = out + (b * d.S + s0 + i) * row + h * d.C;
      for (int64_t c = 0; c < d.C; ++c) o[c] = s.acc[c][i] / sum[i];
      row_max[(b * d.H + h) * d.S + s0 + i] = mx[i];
      row_sum[(b * d.H + h) * d.S + s0 + i] = sum[i];
    }
  }
}

template <bool kDrop>
void backward_head(const Dims& d, int64_t b, int64_t h, const float* q, const float* k,
                   const float* v, const float* key_mask, const float* drop, const float* out,
                   const float* row_max, const float* row_sum, const float* g, float* dq,
                   float* dk, float* dv, HeadScratch& s) {
  const bool all_masked = load_head(d, b, h, k, v, key_mask, s);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.C));
  const int64_t row = d.H * d.C;
  std::fill(s.dk.begin(), s.dk.end(), splat(0.0f));
  std::fill(s.dv.begin(), s.dv.end(), splat(0.0f));
  for (int64_t s0 = 0; s0 < d.S; s0 += kLanes) {
    const int64_t n = lanes_in_block(d, s0);
    gather_queries(d, q, b, h, s0, s.q);
    gather_queries(d, g, b, h, s0, s.g);
    gather_queries(d, out, b, h, s0, s.acc);
    vf mx = splat(0.0f), inv_sum = splat(0.0f);
    for (int64_t i = 0; i < n; ++i) {
      mx[i] = row_max[(b * d.H + h) * d.S + s0 + i];
      inv_sum[i] = 1.0f / row_sum[(b * d.H + h) * d.S + s0 + i];
    }
    // gs = g / row sum (the gradient of the unnormalised value product); d_sum: the
    // row sum's gradient times the row sum. Lanes past S have g = 0: they add nothing.
    vf d_sum = splat(0.0f);
    for (int64_t c = 0; c < d.C; ++c) {
      s.g[c] *= inv_sum;
      d_sum -= s.g[c] * s.acc[c];
      s.dq[c] = splat(0.0f);
    }
    if (kDrop) gather_drop(d, drop, b, h, s0, s);
    for (int32_t t : s.keys) {
      const vf w = all_masked ? splat(1.0f) : vexp(logit(d, s, t, scale) - mx);
      const float* kt = &s.k[t * d.C];
      const float* vt = &s.v[t * d.C];
      vf* dkt = &s.dk[t * d.C];
      vf* dvt = &s.dv[t * d.C];
      const vf wd = kDrop ? w * s.drop[t] : w;
      vf d_wd = splat(0.0f);
      for (int64_t c = 0; c < d.C; ++c) {
        d_wd += s.g[c] * vt[c];
        dvt[c] += wd * s.g[c];
      }
      if (all_masked) continue;  // the logits are constants: no gradient to q or k
      const vf d_w = kDrop ? d_wd * s.drop[t] : d_wd;
      const vf d_logit = (d_w + d_sum) * w * scale;
      for (int64_t c = 0; c < d.C; ++c) {
        s.dq[c] += d_logit * kt[c];
        dkt[c] += d_logit * s.q[c];
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      float* dqr = dq + (b * d.S + s0 + i) * row + h * d.C;
      for (int64_t c = 0; c < d.C; ++c) dqr[c] = s.dq[c][i];
    }
  }
  for (int64_t t = 0; t < d.T; ++t) {
    float* dkr = dk + (b * d.T + t) * row + h * d.C;
    float* dvr = dv + (b * d.T + t) * row + h * d.C;
    for (int64_t c = 0; c < d.C; ++c) {
      dkr[c] = hsum(s.dk[t * d.C + c]);
      dvr[c] = hsum(s.dv[t * d.C + c]);
    }
  }
}

// Runs fn(first, last, scratch) over the B * H heads in chunks, shared between the
// calling thread and XLA's intra-op thread pool. The caller takes chunks too and waits
// only for chunks another thread has started, so a busy pool costs no idle waiting.
template <typename Fn>
void for_heads(ffi::ThreadPool pool, const Dims& d, const Fn& fn) {
  const int64_t heads = d.B * d.H;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunk = std::max<int64_t>(16, heads / (4 * threads));
  const int64_t chunks = (heads + chunk - 1) / chunk;
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, &d, &fn, heads, chunk, chunks] {
    std::unique_ptr<HeadScratch> scratch;
    for (int64_t c; (c = shared->next.fetch_add(1)) < chunks;) {
      if (!scratch) scratch = std::make_unique<HeadScratch>(d);
      fn(c * chunk, std::min(heads, (c + 1) * chunk), *scratch);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < std::min(threads, chunks); ++t) pool.Schedule([work] { work(); });
  work();
  while (shared->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// Reads the sizes from q [..., S, H, C] and k [..., T, H, C] and checks every other
// operand's element count, so that a mismatched call fails instead of reading past a
// buffer. uses_drop: whether the drop operand is read (else a 1-element placeholder).
ffi::Error dims_of(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                   const ffi::Buffer<ffi::F32>& v, const ffi::Buffer<ffi::F32>& key_mask,
                   const ffi::Buffer<ffi::F32>& drop, bool uses_drop, Dims* d) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  const size_t rank = qd.size();
  if (rank < 3 || kd.size() != rank)
    return ffi::Error::InvalidArgument("caasl attention: q and k must both be [..., L, H, C]");
  d->B = 1;
  for (size_t i = 0; i + 3 < rank; ++i) {
    if (qd[i] != kd[i])
      return ffi::Error::InvalidArgument("caasl attention: q and k leading dims differ");
    d->B *= qd[i];
  }
  d->S = qd[rank - 3];
  d->H = qd[rank - 2];
  d->C = qd[rank - 1];
  d->T = kd[rank - 3];
  if (kd[rank - 2] != d->H || kd[rank - 1] != d->C)
    return ffi::Error::InvalidArgument("caasl attention: q and k heads or widths differ");
  if (v.element_count() != k.element_count() ||
      key_mask.element_count() != static_cast<size_t>(d->B * d->T) ||
      (uses_drop && drop.element_count() != static_cast<size_t>(d->B * d->H * d->S * d->T)))
    return ffi::Error::InvalidArgument("caasl attention: v, key_mask or drop has a wrong size");
  return ffi::Error::Success();
}

template <bool kDrop>
ffi::Error forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> key_mask,
                   ffi::Buffer<ffi::F32> drop, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> row_max, ffi::ResultBuffer<ffi::F32> row_sum) {
  Dims d;
  if (auto e = dims_of(q, k, v, key_mask, drop, kDrop, &d); e.failure()) return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *mp = key_mask.typed_data(), *dp = drop.typed_data();
  float *op = out->typed_data(), *mx = row_max->typed_data(), *sm = row_sum->typed_data();
  for_heads(pool, d, [&](int64_t first, int64_t last, HeadScratch& s) {
    for (int64_t bh = first; bh < last; ++bh)
      forward_head<kDrop>(d, bh / d.H, bh % d.H, qp, kp, vp, mp, dp, op, mx, sm, s);
  });
  return ffi::Error::Success();
}

template <bool kDrop>
ffi::Error backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> key_mask,
                    ffi::Buffer<ffi::F32> drop, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> row_max, ffi::Buffer<ffi::F32> row_sum,
                    ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  Dims d;
  if (auto e = dims_of(q, k, v, key_mask, drop, kDrop, &d); e.failure()) return e;
  if (out.element_count() != q.element_count() || g.element_count() != q.element_count() ||
      row_max.element_count() != static_cast<size_t>(d.B * d.H * d.S) ||
      row_sum.element_count() != row_max.element_count())
    return ffi::Error::InvalidArgument("caasl attention: out, g or row statistics wrong size");
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *mp = key_mask.typed_data(), *dp = drop.typed_data(), *op = out.typed_data();
  const float *mx = row_max.typed_data(), *sm = row_sum.typed_data(), *gp = g.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  // dk and dv are written head by head: heads of one b never share an entry
  for_heads(pool, d, [&](int64_t first, int64_t last, HeadScratch& s) {
    for (int64_t bh = first; bh < last; ++bh)
      backward_head<kDrop>(d, bh / d.H, bh % d.H, qp, kp, vp, mp, dp, op, mx, sm, gp, dqp,
                           dkp, dvp, s);
  });
  return ffi::Error::Success();
}

}  // namespace

#define CAASL_F32 ffi::Buffer<ffi::F32>
#define CAASL_ONE_ARG .Arg<CAASL_F32>()
// Forward operands: q, k, v, key_mask, drop; backward adds out, row_max, row_sum, g.
#define CAASL_FORWARD_ARGS CAASL_ONE_ARG CAASL_ONE_ARG CAASL_ONE_ARG CAASL_ONE_ARG CAASL_ONE_ARG
#define CAASL_BACKWARD_ARGS CAASL_FORWARD_ARGS CAASL_ONE_ARG CAASL_ONE_ARG CAASL_ONE_ARG CAASL_ONE_ARG
// Both return three float buffers: (out, row_max, row_sum) or (dq, dk, dv).
#define CAASL_HANDLER(NAME, IMPL, ARGS)                                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, IMPL, ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() ARGS \
                                                .Ret<CAASL_F32>()                        \
                                                .Ret<CAASL_F32>()                        \
                                                .Ret<CAASL_F32>())

// The drop argument of the plain variants is a 1-element placeholder (never read).
CAASL_HANDLER(CaaslAttentionForward, forward<false>, CAASL_FORWARD_ARGS);
CAASL_HANDLER(CaaslAttentionForwardDrop, forward<true>, CAASL_FORWARD_ARGS);
CAASL_HANDLER(CaaslAttentionBackward, backward<false>, CAASL_BACKWARD_ARGS);
CAASL_HANDLER(CaaslAttentionBackwardDrop, backward<true>, CAASL_BACKWARD_ARGS);
