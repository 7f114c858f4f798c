// Causal sliding-window attention on the CPU, forward and backward, fused per query block.
//
// The Python side (megatron_ext/models/fused_swa.py) documents the contract; in short: q [B, Hq, Tq, D],
// k / v [B, Hkv, Tk, D] (Tk >= Tq, the queries being the last Tq key positions), fp32, any strides with
// the head dimension contiguous (a [T, B, H, D] tensor seen as [B, H, T, D] needs no copy); query i (key
// position p = i + Tk - Tq) of a head whose KV head has window W attends to the keys
// max(0, p - W + 1, key_start[b, i]) .. p, key_start being an optional int64 [B, Tq] tensor (document
// masking: each query's first visible key; empty: 0). Each KV head has its own window (int64 [Hkv]; a
// window <= 0 or >= Tk is full causal attention), so one call runs a layer whose heads mix full and
// sliding-window attention. Outputs and gradients are written in the layout of their inputs
// (empty_like), so the caller's permutes stay views.
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
// Dual mode (inner > 0, smaller than every head's window): each head also attends with the inner
// window, from the same scores. The inner band of a row is the right end of its outer band, so the
// block's S is computed once; its inner columns are copied before the outer softmax overwrites them,
// and each band gets its own softmax, log-sum-exp and P V. In the backward the two score gradients add
// up (dS = dS_outer + dS_inner on the inner columns) before the shared dQ and dK GEMMs. This is ConSA's
// mask-learning layer (every head mixes full and sliding-window attention by its gate): one pass
// instead of two kernels, each computing its own S.
//
// Work is split over (batch, KV head): the query heads of a group run in sequence inside one task,
// so a task owns its slices of dK and dV and no two threads write the same memory. Tasks differ in
// cost when windows differ, so they are spread over the threads by cost (longest first, onto the
// least loaded thread), not in equal counts.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
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
  int64_t batch, q_heads, kv_heads, q_len, kv_len, dim, block;
  std::vector<int64_t> windows;  // per KV head, in [1, kv_len]
  int64_t inner;                 // dual mode: the inner window (below every head's window); 0: single
  int64_t offset() const { return kv_len - q_len; }
  int64_t group() const { return q_heads / kv_heads; }
  bool dual() const { return inner > 0; }
  // Columns of a block's scores under window w (the widest key slice of a block).
  int64_t keys(int64_t w) const { return std::min(kv_len, block + w - 1); }
  int64_t max_window() const { return *std::max_element(windows.begin(), windows.end()); }
  // First key of the slice that the query block starting at s reaches under window w.
  int64_t slice_start(int64_t s, int64_t w) const { return std::max<int64_t>(0, s + offset() - w + 1); }
  // Score pairs that one query head of KV head kvh multiplies (both bands in dual mode): its cost.
  int64_t pairs(int64_t kvh) const {
    int64_t n = 0;
    for (int64_t s = 0; s < q_len; s += block) {
      const int64_t rows = std::min(block, q_len - s), ke = s + rows + offset();
      n += rows * (ke - slice_start(s, windows[kvh]));
      if (dual()) n += rows * (ke - slice_start(s, inner));
    }
    return n;
  }
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

// Band of row r of the block starting at query s under window w, as columns of the block's key slice
// starting at ks; first: the row's document start (its first visible key), null without document masking.
inline void row_band(const Geometry& g, int64_t w, int64_t s, int64_t ks, int64_t r, const int64_t* first,
                     int64_t& lo, int64_t& hi) {
  const int64_t p = s + r + g.offset();
  lo = std::max<int64_t>(p - w + 1, 0);
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

// One query block's scores under window w (rows x L, row stride ld, the key slice starting at ks):
// each row's band becomes exp(S - max), the rest 0; lse[r] (the head's row s + r) and inv[r] = 1 / sum.
inline void block_softmax(const Geometry& g, int64_t w, int64_t s, int64_t ks, int64_t rows, int64_t L,
                          const int64_t* first, float* scores, int64_t ld, float* lse, float* inv) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = scores + r * ld;
    int64_t lo, hi;
    row_band(g, w, s, ks, r, first, lo, hi);
    const float m = row_max(row + lo, hi - lo);
    const float sum = exp_shift_sum(row + lo, hi - lo, m);
    zero_outside(row, lo, hi, L);
    inv[r] = 1.f / sum;
    lse[s + r] = m + std::log(sum);
  }
}

// The same block's probabilities from the saved log-sum-exp: P = exp(S - lse) on each band, 0 elsewhere.
inline void block_probs(const Geometry& g, int64_t w, int64_t s, int64_t ks, int64_t rows, int64_t L,
                        const int64_t* first, float* scores, int64_t ld, const float* lse) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = scores + r * ld;
    int64_t lo, hi;
    row_band(g, w, s, ks, r, first, lo, hi);
    exp_shift_sum(row + lo, hi - lo, lse[s + r]);
    zero_outside(row, lo, hi, L);
  }
}

// dst (rows x n, row stride ld_dst) = the columns [c0, c0 + n) of src (row stride ld_src).
inline void copy_columns(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t c0, int64_t rows,
                         int64_t n) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * ld_dst, src + r * ld_src + c0, n * sizeof(float));
}

// O (rows x D) = P V / sum, row by row: normalizing the D outputs of a row is cheaper than its band.
inline void block_output(const float* probs, int64_t ld, const float* v, int64_t rows, int64_t L, int64_t D,
                         const float* inv, float* out) {
  gemm_rm(false, false, rows, D, L, 1.f, probs, ld, v, D, 0.f, out, D);
  for (int64_t r = 0; r < rows; ++r) {
    const Vec scale(inv[r]);
    at::vec::map([&](Vec x) { return x * scale; }, out + r * D, out + r * D, D);
  }
}

// delta_r = dO_r . O_r for the block's rows.
inline void row_dots(const float* grad, const float* out, int64_t rows, int64_t D, float* delta) {
  for (int64_t r = 0; r < rows; ++r) {
    delta[r] = at::vec::map2_reduce_all<float>([](Vec a, Vec b) { return a * b; },
                                              [](Vec& a, Vec& b) { return a + b; }, grad + r * D, out + r * D, D);
  }
}

// dS = P (dP - delta) for one band, in place of dP (rows x L, row stride ld).
inline void score_grad(float* dprobs, const float* probs, int64_t ld, int64_t rows, int64_t L, const float* delta) {
  for (int64_t r = 0; r < rows; ++r) {
    const Vec d(delta[r]);
    at::vec::map2([&](Vec p, Vec dp) { return p * (dp - d); }, dprobs + r * ld, probs + r * ld, dprobs + r * ld, L);
  }
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

// Runs work(units) on each thread with its share of the (batch, KV head) units: the most expensive
// first, each onto the thread with the least work so far. The assignment is static and each unit's
// arithmetic is the same whichever thread runs it, so results do not depend on the thread count.
template <typename Work>
void for_each_unit(const Geometry& g, const Work& work) {
  const int64_t units = g.batch * g.kv_heads;
  const int64_t slots = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), units));
  std::vector<int64_t> order(units), cost(g.kv_heads);
  for (int64_t h = 0; h < g.kv_heads; ++h) cost[h] = g.pairs(h);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return cost[a % g.kv_heads] > cost[b % g.kv_heads]; });
  std::vector<std::vector<int64_t>> plan(slots);
  std::vector<int64_t> load(slots, 0);
  for (int64_t unit : order) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    plan[t].push_back(unit);
    load[t] += cost[unit % g.kv_heads];
  }
  for (auto& units_of_thread : plan) std::sort(units_of_thread.begin(), units_of_thread.end());
  at::parallel_for(0, slots, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) work(plan[t]);
  });
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.scalar_type() == at::kFloat && t.device().is_cpu(), name,
              " must be a [B, H, T, D] float32 CPU tensor");
  TORCH_CHECK((t.stride(3) == 1 || t.size(3) == 1) && (t.size(2) == 1 || t.stride(2) >= t.size(3)), name,
              " must have a contiguous last dimension and rows at least a row apart");
}

Geometry geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& windows,
                  int64_t inner, int64_t block) {
  check_rows(q, "q");
  check_rows(k, "k");
  check_rows(v, "v");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape");
  Geometry g{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), block, {}, inner};
  TORCH_CHECK(k.size(0) == g.batch && k.size(3) == g.dim, "k / v batch and head dim must match q");
  TORCH_CHECK(g.kv_len >= g.q_len, "k / v must hold at least as many positions as q");
  TORCH_CHECK(g.kv_heads > 0 && g.q_heads % g.kv_heads == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(block >= 1, "block must be >= 1");
  TORCH_CHECK(windows.scalar_type() == at::kLong && windows.dim() == 1 && windows.numel() == g.kv_heads,
              "windows must be an int64 tensor with one window per KV head");
  const auto w = windows.contiguous();
  for (int64_t h = 0; h < g.kv_heads; ++h) {
    const int64_t window = w.data_ptr<int64_t>()[h];
    g.windows.push_back(window <= 0 ? g.kv_len : std::min(window, g.kv_len));
  }
  TORCH_CHECK(inner >= 0, "the inner window must be >= 0 (0: none)");
  if (g.dual()) {
    g.inner = std::min(inner, g.kv_len);
    for (int64_t window : g.windows) TORCH_CHECK(g.inner <= window, "the inner window must not exceed a head's window");
  }
  return g;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> swa_forward(const at::Tensor& q, const at::Tensor& k,
                                                                       const at::Tensor& v, const at::Tensor& windows,
                                                                       int64_t inner, double scale, int64_t block,
                                                                       const at::Tensor& key_start) {
  const Geometry g = geometry(q, k, v, windows, inner, block);
  check_key_start(key_start, g);
  auto out = at::empty_like(q);
  auto out_inner = g.dual() ? at::empty_like(q) : at::empty({0}, q.options());
  check_rows(out, "out");
  if (g.dual()) check_rows(out_inner, "out_inner");
  auto lse = at::empty({g.batch, g.q_heads, g.q_len}, q.options());
  auto lse_inner = at::empty({g.dual() ? g.batch : 0, g.q_heads, g.q_len}, q.options());
  const Heads<const float> Q(q), K(k), V(v);
  const Heads<float> O(out), OI(g.dual() ? out_inner : out);  // OI: read only in dual mode
  float* lp = lse.data_ptr<float>();
  float* lpi = lse_inner.data_ptr<float>();
  const int64_t D = g.dim, ld = g.keys(g.max_window()), ldi = g.dual() ? g.keys(g.inner) : 0;
  for_each_unit(g, [&](const std::vector<int64_t>& units) {
    std::vector<float> scores(g.block * ld), inner_scores(g.block * ldi), inv_sum(g.block), inv_inner(g.block);
    std::vector<float> kbuf, vbuf, qbuf, obuf, oibuf;
    for (int64_t unit : units) {
      const int64_t b = unit / g.kv_heads, kvh = unit % g.kv_heads, w = g.windows[kvh];
      const int64_t* first = document_starts(key_start, g, b);
      const float* kh = stage(K.head(b, kvh), K.ld, g.kv_len, D, kbuf);
      const float* vh = stage(V.head(b, kvh), V.ld, g.kv_len, D, vbuf);
      for (int64_t j = 0; j < g.group(); ++j) {
        const int64_t h = kvh * g.group() + j;
        const float* qh = stage(Q.head(b, h), Q.ld, g.q_len, D, qbuf);
        float* oh = staging(O.head(b, h), O.ld, g.q_len, D, obuf);
        float* oih = g.dual() ? staging(OI.head(b, h), OI.ld, g.q_len, D, oibuf) : nullptr;
        float* lh = lp + (b * g.q_heads + h) * g.q_len;
        float* lhi = g.dual() ? lpi + (b * g.q_heads + h) * g.q_len : nullptr;
        for (int64_t s = 0; s < g.q_len; s += g.block) {
          const int64_t rows = std::min(g.block, g.q_len - s);
          const int64_t ks = g.slice_start(s, w), ke = s + rows + g.offset(), L = ke - ks;
          gemm_rm(false, true, rows, L, D, static_cast<float>(scale), qh + s * D, D, kh + ks * D, D, 0.f,
                  scores.data(), ld);
          const int64_t ksi = g.dual() ? g.slice_start(s, g.inner) : ke, Li = ke - ksi;
          if (g.dual()) copy_columns(inner_scores.data(), ldi, scores.data(), ld, ksi - ks, rows, Li);
          block_softmax(g, w, s, ks, rows, L, first, scores.data(), ld, lh, inv_sum.data());
          block_output(scores.data(), ld, vh + ks * D, rows, L, D, inv_sum.data(), oh + s * D);
          if (g.dual()) {
            block_softmax(g, g.inner, s, ksi, rows, Li, first, inner_scores.data(), ldi, lhi, inv_inner.data());
            block_output(inner_scores.data(), ldi, vh + ksi * D, rows, Li, D, inv_inner.data(), oih + s * D);
          }
        }
        unstage(O.head(b, h), O.ld, oh, g.q_len, D);
        if (g.dual()) unstage(OI.head(b, h), OI.ld, oih, g.q_len, D);
      }
    }
  });
  return {out, lse, out_inner, lse_inner};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> swa_backward(
    const at::Tensor& grad_out, const at::Tensor& grad_inner, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& out_inner,
    const at::Tensor& lse_inner, const at::Tensor& windows, int64_t inner, double scale, int64_t block,
    const at::Tensor& key_start) {
  const Geometry g = geometry(q, k, v, windows, inner, block);
  check_key_start(key_start, g);
  check_rows(grad_out, "grad_out");
  check_rows(out, "out");
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "grad_out and out must be shaped like q");
  TORCH_CHECK(lse.is_contiguous() && lse.numel() == g.batch * g.q_heads * g.q_len, "lse must be [B, Hq, Tq]");
  if (g.dual()) {
    check_rows(grad_inner, "grad_inner");
    check_rows(out_inner, "out_inner");
    TORCH_CHECK(grad_inner.sizes() == q.sizes() && out_inner.sizes() == q.sizes(),
                "grad_inner and out_inner must be shaped like q");
    TORCH_CHECK(lse_inner.is_contiguous() && lse_inner.numel() == lse.numel(), "lse_inner must be [B, Hq, Tq]");
  }
  auto dq = at::empty_like(q);
  auto dk = at::empty_like(k);  // zeroed per (batch, KV head) below, by the thread that accumulates it
  auto dv = at::empty_like(v);
  for (const auto* t : {&dq, &dk, &dv}) check_rows(*t, "a gradient");
  const Heads<const float> Q(q), K(k), V(v), G(grad_out), O(out);
  const Heads<const float> GI(g.dual() ? grad_inner : grad_out), OI(g.dual() ? out_inner : out);
  const Heads<float> DQ(dq), DK(dk), DV(dv);
  const float* lp = lse.data_ptr<float>();
  const float* lpi = g.dual() ? lse_inner.data_ptr<float>() : nullptr;
  const int64_t D = g.dim, ld = g.keys(g.max_window()), ldi = g.dual() ? g.keys(g.inner) : 0;
  const float sc = static_cast<float>(scale);
  for_each_unit(g, [&](const std::vector<int64_t>& units) {
    std::vector<float> probs(g.block * ld), dprobs(g.block * ld), delta(g.block);
    std::vector<float> probs_i(g.block * ldi), dprobs_i(g.block * ldi), delta_i(g.block);
    std::vector<float> kbuf, vbuf, dkbuf, dvbuf, qbuf, gbuf, obuf, gibuf, oibuf, dqbuf;
    for (int64_t unit : units) {
      const int64_t b = unit / g.kv_heads, kvh = unit % g.kv_heads, w = g.windows[kvh];
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
        const float* gih = g.dual() ? stage(GI.head(b, h), GI.ld, g.q_len, D, gibuf) : nullptr;
        const float* oih = g.dual() ? stage(OI.head(b, h), OI.ld, g.q_len, D, oibuf) : nullptr;
        const float* lh = lp + (b * g.q_heads + h) * g.q_len;
        const float* lhi = g.dual() ? lpi + (b * g.q_heads + h) * g.q_len : nullptr;
        float* dqh = staging(DQ.head(b, h), DQ.ld, g.q_len, D, dqbuf);
        for (int64_t s = 0; s < g.q_len; s += g.block) {
          const int64_t rows = std::min(g.block, g.q_len - s);
          const int64_t ks = g.slice_start(s, w), ke = s + rows + g.offset(), L = ke - ks;
          const int64_t ksi = g.dual() ? g.slice_start(s, g.inner) : ke, Li = ke - ksi;
          const float* go = gh + s * D;
          const float* qb = qh + s * D;
          row_dots(go, oh + s * D, rows, D, delta.data());
          // P = exp(scale Q K^T - lse) on each row's band, 0 elsewhere.
          gemm_rm(false, true, rows, L, D, sc, qb, D, kh + ks * D, D, 0.f, probs.data(), ld);
          if (g.dual()) copy_columns(probs_i.data(), ldi, probs.data(), ld, ksi - ks, rows, Li);
          block_probs(g, w, s, ks, rows, L, first, probs.data(), ld, lh);
          gemm_rm(true, false, L, D, rows, 1.f, probs.data(), ld, go, D, 1.f, dvh + ks * D, D);  // dV += P^T dO
          gemm_rm(false, true, rows, L, D, 1.f, go, D, vh + ks * D, D, 0.f, dprobs.data(), ld);  // dP = dO V^T
          score_grad(dprobs.data(), probs.data(), ld, rows, L, delta.data());
          if (g.dual()) {  // the inner band's dS, added onto its columns of the outer one
            const float* gi = gih + s * D;
            row_dots(gi, oih + s * D, rows, D, delta_i.data());
            block_probs(g, g.inner, s, ksi, rows, Li, first, probs_i.data(), ldi, lhi);
            gemm_rm(true, false, Li, D, rows, 1.f, probs_i.data(), ldi, gi, D, 1.f, dvh + ksi * D, D);
            gemm_rm(false, true, rows, Li, D, 1.f, gi, D, vh + ksi * D, D, 0.f, dprobs_i.data(), ldi);
            score_grad(dprobs_i.data(), probs_i.data(), ldi, rows, Li, delta_i.data());
            for (int64_t r = 0; r < rows; ++r) {
              float* row = dprobs.data() + r * ld + (ksi - ks);
              at::vec::map2([](Vec a, Vec b) { return a + b; }, row, row, dprobs_i.data() + r * ldi, Li);
            }
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
  m.def("forward", &swa_forward,
        "causal sliding-window attention with a window per KV head (and an inner window in dual mode), "
        "forward: (out, lse, out_inner, lse_inner)");
  m.def("backward", &swa_backward, "causal sliding-window attention, backward: (dq, dk, dv)");
}
