// Fused backward of causal attention over packed examples, for CPUs.
//
// Why: the per-example backward in attention.py (five matmuls and a compiled softmax kernel per
// example, per layer) spends most of its time outside the matmuls: calls, temporaries of L x L
// scores in memory, one oneDNN primitive per new length. Here one call does a whole layer: threads
// take (example, K/V head) items, and each item walks 64 x 64 tiles of the causal score matrix the
// way flash attention's backward does, with the scores, probabilities and their gradients living
// only in per-thread tile buffers. The tile products are oneDNN brgemm micro-kernels, which PyTorch
// exports as at::native::cpublas::brgemm: AMX for bf16 (B operands packed to VNNI), AVX for fp32.
// Every tile has the same shape, so the micro-kernels are generated once, not once per length.
//
// Math (one query head h on its K/V head, 1/sqrt(d) folded into `scale`; lse from the forward):
//   P = exp(scale * Q K^T - lse)  (causal)      dP = dO V^T          delta = rowsum(dO * O)
//   dS = P * (dP - delta) * scale               dQ = dS K    dK = dS^T Q    dV = P^T dO
// dK and dV add up over the query heads that share a K/V head (grouped-query attention).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

namespace cpublas = at::native::cpublas;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t B = 64;  // tile edge: query rows and keys per tile (64 measured a little faster than 32)

template <typename T>
constexpr bool is_bf16 = std::is_same_v<T, at::BFloat16>;

// B operands of the tile products, from row-major [K, N]: bf16 goes to oneDNN's VNNI layout for AMX,
// in blocks of at most 64 columns (its packed leading dimension is 16, 32, 48 or 64); fp32 stays.
constexpr int64_t NB = 64;

template <typename T>
void pack_b(int64_t K, int64_t N, int64_t ld_in, const T* in, T* out) {
  for (int64_t c = 0; c < N; c += NB) {
    const int64_t n = std::min(NB, N - c);
    if constexpr (is_bf16<T>) {
      cpublas::pack(K, n, ld_in, n, at::kBFloat16, at::kBFloat16, in + c, out + K * c);
    } else {
      for (int64_t r = 0; r < K; r++) std::memcpy(out + K * c + r * n, in + c + r * ld_in, n * sizeof(T));
    }
  }
}

// C[M, N] = A[M, K] B[K, N] (+ C if add); A row-major, B as pack_b left it.
template <typename T>
void tile_mm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* Bp, bool add, float* C) {
  for (int64_t c = 0; c < N; c += NB) {
    const int64_t n = std::min(NB, N - c);
    cpublas::brgemm(M, n, K, lda, n, N, add, A, Bp + K * c, C + c, is_bf16<T>);
  }
}

// dst = src^T for a [rows, cols] block, in 32 x 32 pieces.
template <typename T>
void transpose(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst, int64_t ld_dst) {
  for (int64_t i = 0; i < rows; i += 32)
    for (int64_t j = 0; j < cols; j += 32)
      at::vec::transpose_mxn<T>(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst,
                                static_cast<int>(std::min<int64_t>(32, rows - i)),
                                static_cast<int>(std::min<int64_t>(32, cols - j)));
}

// `rows` rows of D values at stride `ld` into a dense [rows_padded, D] block, zeros below.
template <typename T>
void copy_rows(const T* src, int64_t ld, int64_t rows, int64_t rows_padded, int64_t D, T* dst) {
  for (int64_t i = 0; i < rows; i++) std::memcpy(dst + i * D, src + i * ld, D * sizeof(T));
  std::fill(dst + rows * D, dst + rows_padded * D, T(0));
}

template <typename T>
void store_rows(const float* src, int64_t rows, int64_t D, T* dst, int64_t ld) {
  for (int64_t i = 0; i < rows; i++) at::vec::convert(src + i * D, dst + i * ld, D);
}

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
float dot(const T* a, const T* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; i++) acc += to_float(a[i]) * to_float(b[i]);
  return acc;
}

// Per-thread working memory, kept between calls: allocating it per call costs page faults.
template <typename T>
struct Scratch {
  std::vector<T> k_rows, v_rows, kT, vT, kT_packed, vT_packed, k_packed;  // one example's K/V head
  std::vector<T> q_rows, do_rows, q_packed, do_packed;                     // one query head
  std::vector<T> p_lo, ds, pT, dsT;                                        // one tile
  std::vector<float> dk_acc, dv_acc, lse_rows, delta, dq_acc, s, dp;

  void reserve(int64_t padded_len, int64_t D) {
    auto grow = [](auto& v, int64_t n) { if (static_cast<int64_t>(v.size()) < n) v.resize(n); };
    for (auto* v : {&k_rows, &v_rows, &kT, &vT, &kT_packed, &vT_packed, &k_packed, &q_rows, &do_rows, &q_packed,
                    &do_packed})
      grow(*v, padded_len * D);
    for (auto* v : {&p_lo, &ds, &pT, &dsT}) grow(*v, B * B);
    for (auto* v : {&dk_acc, &dv_acc}) grow(*v, padded_len * D);
    for (auto* v : {&lse_rows, &delta}) grow(*v, padded_len);
    grow(dq_acc, B * D);
    grow(s, B * B);
    grow(dp, B * B);
  }
};

template <typename T>
Scratch<T>& thread_scratch() {
  static thread_local Scratch<T> scratch;
  return scratch;
}

// Turn the tile's scores S into P and its dP into dS, in place, for tile rows starting at `row0`:
// keys past the diagonal (same tile) and rows past the example's end get zeros.
inline void softmax_backward_tile(float* s, float* dp, int64_t row0, int64_t L, bool diagonal, float scale,
                                  const float* lse, const float* delta) {
  const Vec vscale(scale);
  for (int64_t r = 0; r < B; r++) {
    const int64_t row = row0 + r;
    const int64_t visible = row >= L ? 0 : (diagonal ? r + 1 : B);
    float* sr = s + r * B;
    float* dpr = dp + r * B;
    if (visible > 0) {
      const Vec vlse(lse[row]), vdelta(delta[row]);
      for (int64_t c = 0; c < B; c += Vec::size()) {
        const Vec p = (Vec::loadu(sr + c) * vscale - vlse).exp_u20();
        const Vec ds = p * (Vec::loadu(dpr + c) - vdelta) * vscale;
        p.store(sr + c);
        ds.store(dpr + c);
      }
    }
    std::fill(sr + visible, sr + B, 0.f);
    std::fill(dp + r * B + visible, dp + r * B + B, 0.f);
  }
}

template <typename T>
void backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, const std::vector<int64_t>& cuts, float scale,
              const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  const int64_t H = q.size(1), KV = k.size(1), D = q.size(3), G = H / KV;
  const int64_t n_examples = static_cast<int64_t>(cuts.size()) - 1;
  std::vector<std::pair<int64_t, int64_t>> items;  // (example, K/V head); longest first, to balance threads
  int64_t longest = 0;
  for (int64_t e = 0; e < n_examples; e++) {
    longest = std::max(longest, cuts[e + 1] - cuts[e]);
    for (int64_t h = 0; h < KV; h++) items.emplace_back(e, h);
  }
  auto len = [&](const std::pair<int64_t, int64_t>& it) { return cuts[it.first + 1] - cuts[it.first]; };
  std::stable_sort(items.begin(), items.end(), [&](const auto& x, const auto& y) { return len(x) > len(y); });
  const int64_t longest_padded = (longest + B - 1) / B * B;

  // [1, heads, T, D] tensors with a contiguous last dim; T may be strided (transposed views)
  const T *q_p = q.data_ptr<T>(), *k_p = k.data_ptr<T>(), *v_p = v.data_ptr<T>();
  const T *do_p = grad_out.data_ptr<T>(), *o_p = out.data_ptr<T>();
  const float* lse_p = lse.data_ptr<float>();
  T *dq_p = dq.data_ptr<T>(), *dk_p = dk.data_ptr<T>(), *dv_p = dv.data_ptr<T>();
  const int64_t q_h = q.stride(1), q_t = q.stride(2), k_h = k.stride(1), k_t = k.stride(2);
  const int64_t v_h = v.stride(1), v_t = v.stride(2), do_h = grad_out.stride(1), do_t = grad_out.stride(2);
  const int64_t o_h = out.stride(1), o_t = out.stride(2), lse_h = lse.stride(1);
  const int64_t dq_h = dq.stride(1), dq_t = dq.stride(2), dk_h = dk.stride(1), dk_t = dk.stride(2);
  const int64_t dv_h = dv.stride(1), dv_t = dv.stride(2);

  std::atomic<int64_t> next_item{0};
  const int64_t n_items = static_cast<int64_t>(items.size());
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t begin, int64_t end) {
    Scratch<T>& w = thread_scratch<T>();
    w.reserve(longest_padded, D);
    for (int64_t worker = begin; worker < end; worker++) {
      for (int64_t it; (it = next_item.fetch_add(1)) < n_items;) {
        const auto [e, kvh] = items[it];
        const int64_t a = cuts[e], L = cuts[e + 1] - a, Lp = (L + B - 1) / B * B, tiles = Lp / B;
        copy_rows(k_p + kvh * k_h + a * k_t, k_t, L, Lp, D, w.k_rows.data());
        copy_rows(v_p + kvh * v_h + a * v_t, v_t, L, Lp, D, w.v_rows.data());
        transpose(w.k_rows.data(), D, Lp, D, w.kT.data(), Lp);
        transpose(w.v_rows.data(), D, Lp, D, w.vT.data(), Lp);
        for (int64_t j = 0; j < tiles; j++) {
          pack_b(D, B, Lp, w.kT.data() + j * B, w.kT_packed.data() + j * D * B);
          pack_b(D, B, Lp, w.vT.data() + j * B, w.vT_packed.data() + j * D * B);
          pack_b(B, D, D, w.k_rows.data() + j * B * D, w.k_packed.data() + j * B * D);
        }
        std::fill(w.dk_acc.begin(), w.dk_acc.begin() + Lp * D, 0.f);
        std::fill(w.dv_acc.begin(), w.dv_acc.begin() + Lp * D, 0.f);
        for (int64_t g = 0; g < G; g++) {
          const int64_t h = kvh * G + g;
          copy_rows(q_p + h * q_h + a * q_t, q_t, L, Lp, D, w.q_rows.data());
          copy_rows(do_p + h * do_h + a * do_t, do_t, L, Lp, D, w.do_rows.data());
          for (int64_t i = 0; i < tiles; i++) {
            pack_b(B, D, D, w.q_rows.data() + i * B * D, w.q_packed.data() + i * B * D);
            pack_b(B, D, D, w.do_rows.data() + i * B * D, w.do_packed.data() + i * B * D);
          }
          for (int64_t r = 0; r < Lp; r++) {
            w.delta[r] = r < L ? dot(w.do_rows.data() + r * D, o_p + h * o_h + (a + r) * o_t, D) : 0.f;
            w.lse_rows[r] = r < L ? lse_p[h * lse_h + a + r] : 0.f;
          }
          for (int64_t i = 0; i < tiles; i++) {  // query tile
            const T* q_i = w.q_rows.data() + i * B * D;
            const T* do_i = w.do_rows.data() + i * B * D;
            for (int64_t j = 0; j <= i; j++) {  // key tile, causal
              tile_mm(B, B, D, q_i, D, w.kT_packed.data() + j * D * B, false, w.s.data());
              tile_mm(B, B, D, do_i, D, w.vT_packed.data() + j * D * B, false, w.dp.data());
              softmax_backward_tile(w.s.data(), w.dp.data(), i * B, L, i == j, scale, w.lse_rows.data(),
                                    w.delta.data());
              at::vec::convert(w.s.data(), w.p_lo.data(), B * B);
              at::vec::convert(w.dp.data(), w.ds.data(), B * B);
              transpose(w.p_lo.data(), B, B, B, w.pT.data(), B);
              transpose(w.ds.data(), B, B, B, w.dsT.data(), B);
              tile_mm(B, D, B, w.ds.data(), B, w.k_packed.data() + j * B * D, j > 0, w.dq_acc.data());
              tile_mm(B, D, B, w.dsT.data(), B, w.q_packed.data() + i * B * D, true, w.dk_acc.data() + j * B * D);
              tile_mm(B, D, B, w.pT.data(), B, w.do_packed.data() + i * B * D, true, w.dv_acc.data() + j * B * D);
            }
            store_rows(w.dq_acc.data(), std::min(B, L - i * B), D, dq_p + h * dq_h + (a + i * B) * dq_t, dq_t);
          }
        }
        store_rows(w.dk_acc.data(), L, D, dk_p + kvh * dk_h + a * dk_t, dk_t);
        store_rows(w.dv_acc.data(), L, D, dv_p + kvh * dv_h + a * dv_t, dv_t);
      }
    }
    if constexpr (is_bf16<T>) cpublas::brgemm_release(true);
  });
}

std::vector<at::Tensor> packed_attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                  const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                                  const at::Tensor& lse, const at::Tensor& bounds, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(0) == 1, "q must be [1, heads, tokens, head_dim]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat, "bf16 or fp32 only");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "query heads must be a multiple of K/V heads");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.size(3) % 16 == 0, "bf16 needs head_dim a multiple of 16");
  for (const at::Tensor* t : {&grad_out, &q, &k, &v, &out}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->stride(3) == 1, "same dtype, contiguous head_dim");
  }
  auto cuts_t = bounds.to(at::kLong).contiguous();
  std::vector<int64_t> cuts(cuts_t.data_ptr<int64_t>(), cuts_t.data_ptr<int64_t>() + cuts_t.numel());
  auto dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  auto lse_f = lse.to(at::kFloat).contiguous();
  const float s = static_cast<float>(scale);
  if (q.scalar_type() == at::kBFloat16) {
    backward<at::BFloat16>(grad_out, q, k, v, out, lse_f, cuts, s, dq, dk, dv);
  } else {
    backward<float>(grad_out, q, k, v, out, lse_f, cuts, s, dq, dk, dv);
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY(tunelab_kernels, m) {
  m.def("packed_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor bounds, float scale) -> Tensor[]");
  m.impl("packed_attention_backward", c10::DispatchKey::CPU, TORCH_FN(packed_attention_backward));
}
