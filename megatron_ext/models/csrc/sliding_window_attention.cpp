// Causal sliding-window attention on the CPU, forward and backward, fused per query block.
//
// The Python side (megatron_ext/models/fused_swa.py) documents the contract; in short: q [B, Hq, Tq, D],
// k / v [B, Hkv, Tk, D] (Tk >= Tq, the queries being the last Tq key positions), fp32, any strides with
// the head dimension contiguous (a [T, B, H, D] tensor seen as [B, H, T, D] needs no copy); query i (key
// position p = i + Tk - Tq) attends to the keys max(0, p - W + 1, key_start[b, i]) .. p, key_start being
// an optional int64 [B, Tq] tensor (document masking: each query's first visible key; empty: 0).
// Outputs and gradients are written in the layout of their inputs (empty_like), so the caller's
// permutes stay views.
//
// Per query block [s, e) the keys it can reach are one contiguous slice [ks, ke) of K and V, so a
// block is two GEMMs over that slice (S = scale Q K^T, O = P V) with the row softmax between them,
// computed in one pass over each row's band only while S is still in cache; the columns outside a
// row's band are set to zero. The forward saves the log-sum-exp of each row; the backward recomputes
// P = exp(S - lse) block by block (FlashAttention-2's recurrences, without the online rescaling, since
// a block sees all its keys at once):
//
//   dV_win += P^T dO      dP = dO V_win^T      dS = P * (dP - delta),  delta_i = dO_i . O_i
//   dQ_blk  = scale dS K_win                   dK_win += scale dS^T Q_blk
//
// Work is split over (batch, KV head): the query heads of a group run in sequence inside one task,
// so a task owns its slices of dK and dV and no two threads write the same memory.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

// The BLAS of the torch build (MKL on x86-64 wheels), Fortran interface, column-major.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

using Vec = at::vec::Vectorized<float>;

// Row-major C[m, n] = alpha * op(A) op(B) + beta * C through the column-major BLAS:
// C^T = op(B)^T op(A)^T. lda / ldb / ldc are row strides of the row-major matrices as stored.
inline void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                    int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int m_ = static_cast<int>(n), n_ = static_cast<int>(m), k_ = static_cast<int>(k);
  const int lda_ = static_cast<int>(ldb), ldb_ = static_cast<int>(lda), ldc_ = static_cast<int>(ldc);
  sgemm_(&ta, &tb, &m_, &n_, &k_, &alpha, b, &lda_, a, &ldb_, &beta, c, &ldc_);
}

struct Geometry {
  int64_t batch, q_heads, kv_heads, q_len, kv_len, dim, window, block;
  int64_t offset() const { return kv_len - q_len; }
  int64_t group() const { return q_heads / kv_heads; }
  int64_t max_keys() const { return std::min(kv_len, block + window - 1); }
};

// A [B, H, T, D] float tensor with a contiguous last dimension: head (b, h) starts at head(b, h), its
// rows are ld apart (the row stride is the GEMMs' leading dimension).
template <typename T>
struct Heads {
  T* data;
  int64_t batch_stride, head_stride, ld;
  explicit Heads(const at::Tensor& t)
      : data(const_cast<T*>(t.data_ptr<float>())), batch_stride(t.stride(0)), head_stride(t.stride(1)),
        ld(t.size(2) > 1 ? t.stride(2) : t.size(3)) {}
  T* head(int64_t b, int64_t h) const { return data + b * batch_stride + h * head_stride; }
};

// Band of row r of the block starting at query s, as columns of the block's key slice [ks, ke); first:
// the row's document start (its first visible key), null without document masking.
inline void row_band(const Geometry& g, int64_t s, int64_t ks, int64_t r, const int64_t* first, int64_t& lo,
                     int64_t& hi) {
  const int64_t p = s + r + g.offset();
  lo = std::max<int64_t>(p - g.window + 1, 0);
  if (first != nullptr) lo = std::max<int64_t>(lo, first[s + r]);
  lo -= ks;
  hi = p - ks + 1;
}

// Row pointer of key_start for batch b (null when there is no document masking).
const int64_t* document_starts(const at::Tensor& key_start, const Geometry& g, int64_t b) {
  if (key_start.numel() == 0) return nullptr;
  return key_start.data_ptr<int64_t>() + b * g.q_len;
}

void check_key_start(const at::Tensor& key_start, const Geometry& g) {
  if (key_start.numel() == 0) return;
  TORCH_CHECK(key_start.scalar_type() == at::kLong && key_start.is_contiguous() && key_start.dim() == 2 &&
                  key_start.size(0) == g.batch && key_start.size(1) == g.q_len,
              "key_start must be a contiguous int64 [B, Tq] tensor");
}

inline float row_max(const float* x, int64_t n) {
  return at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x, n);
}

// x[i] = exp(x[i] - shift) for i < n; returns the sum.
inline float exp_shift_sum(float* x, int64_t n, float shift) {
  const Vec vshift(shift);
  Vec vsum(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec e = (Vec::loadu(x + i) - vshift).exp_u20();
    e.store(x + i);
    vsum = vsum + e;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

inline void zero_outside(float* row, int64_t lo, int64_t hi, int64_t n) {
  if (lo > 0) std::fill(row, row + lo, 0.f);
  if (hi < n) std::fill(row + hi, row + n, 0.f);
}

// One head's rows as a contiguous [rows, D] matrix: its own memory when the rows are D apart, else a
// copy into buf. Strided heads (a [T, B, H, D] tensor seen as [B, H, T, D] has rows B * H * D apart)
// are copied once per head: GEMMs that read them in place run about 20 % slower.
inline const float* stage(const float* src, int64_t ld, int64_t rows, int64_t D, std::vector<float>& buf) {
  if (ld == D) return src;
  buf.resize(rows * D);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(buf.data() + r * D, src + r * ld, D * sizeof(float));
  return buf.data();
}

// Where a head's [rows, D] result is computed: in place when its rows are D apart, else in buf (then
// unstage copies it out).
inline float* staging(float* dst, int64_t ld, int64_t rows, int64_t D, std::vector<float>& buf) {
  if (ld == D) return dst;
  buf.resize(rows * D);
  return buf.data();
}

inline void unstage(float* dst, int64_t ld, const float* src, int64_t rows, int64_t D) {
  if (dst == src) return;
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * ld, src + r * D, D * sizeof(float));
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.scalar_type() == at::kFloat && t.device().is_cpu(), name,
              " must be a [B, H, T, D] float32 CPU tensor");
  TORCH_CHECK((t.stride(3) == 1 || t.size(3) == 1) && (t.size(2) == 1 || t.stride(2) >= t.size(3)), name,
              " must have a contiguous last dimension and rows at least a row apart");
}

Geometry geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window, int64_t block) {
  check_rows(q, "q");
  check_rows(k, "k");
  check_rows(v, "v");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape");
  Geometry g{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), window, block};
  TORCH_CHECK(k.size(0) == g.batch && k.size(3) == g.dim, "k / v batch and head dim must match q");
  TORCH_CHECK(g.kv_len >= g.q_len, "k / v must hold at least as many positions as q");
  TORCH_CHECK(g.kv_heads > 0 && g.q_heads % g.kv_heads == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(window >= 1 && block >= 1, "window and block must be >= 1");
  return g;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> swa_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               int64_t window, double scale, int64_t block,
                                               const at::Tensor& key_start) {
  const Geometry g = geometry(q, k, v, window, block);
  check_key_start(key_start, g);
  auto out = at::empty_like(q);
  check_rows(out, "out");
  auto lse = at::empty({g.batch, g.q_heads, g.q_len}, q.options());
  const Heads<const float> Q(q), K(k), V(v);
  const Heads<float> O(out);
  float* lp = lse.data_ptr<float>();
  const int64_t D = g.dim, ld = g.max_keys();
  at::parallel_for(0, g.batch * g.kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(g.block * ld), inv_sum(g.block), kbuf, vbuf, qbuf, obuf;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / g.kv_heads, kvh = unit % g.kv_heads;
      const int64_t* first = document_starts(key_start, g, b);
      const float* kh = stage(K.head(b, kvh), K.ld, g.kv_len, D, kbuf);
      const float* vh = stage(V.head(b, kvh), V.ld, g.kv_len, D, vbuf);
      for (int64_t j = 0; j < g.group(); ++j) {
        const int64_t h = kvh * g.group() + j;
        const float* qh = stage(Q.head(b, h), Q.ld, g.q_len, D, qbuf);
        float* oh = staging(O.head(b, h), O.ld, g.q_len, D, obuf);
        float* lh = lp + (b * g.q_heads + h) * g.q_len;
        for (int64_t s = 0; s < g.q_len; s += g.block) {
          const int64_t rows = std::min(g.block, g.q_len - s);
          const int64_t ks = std::max<int64_t>(0, s + g.offset() - g.window + 1), ke = s + rows + g.offset();
          const int64_t L = ke - ks;
          gemm_rm(false, true, rows, L, D, static_cast<float>(scale), qh + s * D, D, kh + ks * D, D, 0.f,
                  scores.data(), ld);
          for (int64_t r = 0; r < rows; ++r) {
            float* row = scores.data() + r * ld;
            int64_t lo, hi;
            row_band(g, s, ks, r, first, lo, hi);
            const float m = row_max(row + lo, hi - lo);
            const float sum = exp_shift_sum(row + lo, hi - lo, m);
            zero_outside(row, lo, hi, L);
            inv_sum[r] = 1.f / sum;
            lh[s + r] = m + std::log(sum);
          }
          // O = (exp(S - m) V) / sum: normalizing the D outputs of a row is cheaper than its band.
          float* ob = oh + s * D;
          gemm_rm(false, false, rows, D, L, 1.f, scores.data(), ld, vh + ks * D, D, 0.f, ob, D);
          for (int64_t r = 0; r < rows; ++r) {
            const Vec inv(inv_sum[r]);
            at::vec::map([&](Vec x) { return x * inv; }, ob + r * D, ob + r * D, D);
          }
        }
        unstage(O.head(b, h), O.ld, oh, g.q_len, D);
      }
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> swa_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                            const at::Tensor& k, const at::Tensor& v,
                                                            const at::Tensor& out, const at::Tensor& lse,
                                                            int64_t window, double scale, int64_t block,
                                                            const at::Tensor& key_start) {
  const Geometry g = geometry(q, k, v, window, block);
  check_key_start(key_start, g);
  check_rows(grad_out, "grad_out");
  check_rows(out, "out");
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "grad_out and out must be shaped like q");
  TORCH_CHECK(lse.is_contiguous() && lse.numel() == g.batch * g.q_heads * g.q_len, "lse must be [B, Hq, Tq]");
  auto dq = at::empty_like(q);
  auto dk = at::empty_like(k);  // zeroed per (batch, KV head) below, by the thread that accumulates it
  auto dv = at::empty_like(v);
  for (const auto* t : {&dq, &dk, &dv}) check_rows(*t, "a gradient");
  const Heads<const float> Q(q), K(k), V(v), G(grad_out), O(out);
  const Heads<float> DQ(dq), DK(dk), DV(dv);
  const float* lp = lse.data_ptr<float>();
  const int64_t D = g.dim, ld = g.max_keys();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, g.batch * g.kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> probs(g.block * ld), dprobs(g.block * ld), delta(g.block);
    std::vector<float> kbuf, vbuf, dkbuf, dvbuf, qbuf, gbuf, obuf, dqbuf;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / g.kv_heads, kvh = unit % g.kv_heads;
      const int64_t* first = document_starts(key_start, g, b);
      const float* kh = stage(K.head(b, kvh), K.ld, g.kv_len, D, kbuf);
      const float* vh = stage(V.head(b, kvh), V.ld, g.kv_len, D, vbuf);
      float* dkh = staging(DK.head(b, kvh), DK.ld, g.kv_len, D, dkbuf);
      float* dvh = staging(DV.head(b, kvh), DV.ld, g.kv_len, D, dvbuf);
      std::fill(dkh, dkh + g.kv_len * D, 0.f);
      std::fill(dvh, dvh + g.kv_len * D, 0.f);
      for (int64_t j = 0; j < g.group(); ++j) {
        const int64_t h = kvh * g.group() + j;
        const float* qh = stage(Q.head(b, h), Q.ld, g.q_len, D, qbuf);
        const float* gh = stage(G.head(b, h), G.ld, g.q_len, D, gbuf);
        const float* oh = stage(O.head(b, h), O.ld, g.q_len, D, obuf);
        const float* lh = lp + (b * g.q_heads + h) * g.q_len;
        float* dqh = staging(DQ.head(b, h), DQ.ld, g.q_len, D, dqbuf);
        for (int64_t s = 0; s < g.q_len; s += g.block) {
          const int64_t rows = std::min(g.block, g.q_len - s);
          const int64_t ks = std::max<int64_t>(0, s + g.offset() - g.window + 1), ke = s + rows + g.offset();
          const int64_t L = ke - ks;
          const float* go = gh + s * D;
          const float* qb = qh + s * D;
          for (int64_t r = 0; r < rows; ++r) {
            delta[r] = at::vec::map2_reduce_all<float>([](Vec a, Vec b) { return a * b; },
                                                      [](Vec& a, Vec& b) { return a + b; }, go + r * D,
                                                      oh + (s + r) * D, D);
          }
          // P = exp(scale Q K^T - lse) on each row's band, 0 elsewhere.
          gemm_rm(false, true, rows, L, D, sc, qb, D, kh + ks * D, D, 0.f, probs.data(), ld);
          for (int64_t r = 0; r < rows; ++r) {
            float* row = probs.data() + r * ld;
            int64_t lo, hi;
            row_band(g, s, ks, r, first, lo, hi);
            exp_shift_sum(row + lo, hi - lo, lh[s + r]);
            zero_outside(row, lo, hi, L);
          }
          gemm_rm(true, false, L, D, rows, 1.f, probs.data(), ld, go, D, 1.f, dvh + ks * D, D);  // dV += P^T dO
          gemm_rm(false, true, rows, L, D, 1.f, go, D, vh + ks * D, D, 0.f, dprobs.data(), ld);  // dP = dO V^T
          for (int64_t r = 0; r < rows; ++r) {  // dS = P (dP - delta), in place of dP
            const Vec d(delta[r]);
            at::vec::map2([&](Vec p, Vec dp) { return p * (dp - d); }, dprobs.data() + r * ld,
                          probs.data() + r * ld, dprobs.data() + r * ld, L);
          }
          gemm_rm(false, false, rows, D, L, sc, dprobs.data(), ld, kh + ks * D, D, 0.f, dqh + s * D, D);  // dQ
          gemm_rm(true, false, L, D, rows, sc, dprobs.data(), ld, qb, D, 1.f, dkh + ks * D, D);  // dK += scale dS^T Q
        }
        unstage(DQ.head(b, h), DQ.ld, dqh, g.q_len, D);
      }
      unstage(DK.head(b, kvh), DK.ld, dkh, g.kv_len, D);
      unstage(DV.head(b, kvh), DV.ld, dvh, g.kv_len, D);
    }
  });
  return {dq, dk, dv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &swa_forward, "causal sliding-window attention, forward: (out, lse)");
  m.def("backward", &swa_backward, "causal sliding-window attention, backward: (dq, dk, dv)");
}
