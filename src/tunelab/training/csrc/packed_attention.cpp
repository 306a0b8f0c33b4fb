// Causal attention over packed examples, forward and backward, for CPUs.
//
// Why: run example by example (PyTorch's flash kernel forward, our compiled backward in
// attention.py), a layer's attention spends most of its time outside the matmuls: calls,
// temporaries of L x L scores in memory, one oneDNN primitive per new length. Here one call does a
// whole layer: threads take (example, K/V head) items, and each item walks 64 x 64 tiles of the
// causal score matrix the way flash attention does, with the scores, probabilities and their
// gradients living only in per-thread tile buffers. The tile products are oneDNN brgemm
// micro-kernels, which PyTorch exports as at::native::cpublas::brgemm: AMX for bf16 (B operands
// packed to VNNI), AVX for fp32; on CPUs with AVX512-BF16 and no AMX (AMD Zen 4/5) bf16 tiles go
// to our own dpbf16_mm, as oneDNN's brgemm there falls back to a slow generic GEMM. Every tile has
// the same shape, so the micro-kernels are generated once, not once per length.
// bench/attention_backward.py times it against both PyTorch paths.
//
// Math (one query head h on its K/V head, 1/sqrt(d) folded into `scale`):
//   forward:  P = softmax(scale * Q K^T)  (causal)   O = P V   lse = log-sum-exp of the scaled scores
//   backward: P = exp(scale * Q K^T - lse)   dP = dO V^T   delta = rowsum(dO * O)
//             dS = P * (dP - delta) * scale   dQ = dS K    dK = dS^T Q    dV = P^T dO
// dK and dV add up over the query heads that share a K/V head (grouped-query attention).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

namespace cpublas = at::native::cpublas;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t B = 64;  // tile edge: query rows and keys per tile (64 measured a little faster than 32)

template <typename T>
constexpr bool is_bf16 = std::is_same_v<T, at::BFloat16>;

// B operands of the tile products, from row-major [K, N], in blocks of at most 64 columns. bf16 goes
// to the VNNI layout [K / 2, n, 2] (pairs of rows interleaved, the pair a dot-product instruction
// takes): oneDNN packs it for AMX, pack_pairs where there is no AMX; fp32 stays as it is.
constexpr int64_t NB = 64;

// Whether bf16 tile products run on AMX (oneDNN's brgemm) or on AVX512-BF16 (dpbf16_mm below).
// Python asks for the kernels in bf16 only where one of the two is there (kernels.py).
inline bool bf16_on_amx() {
  static const bool amx = cpublas::could_pack(at::kBFloat16);
  return amx;
}

inline void pack_pairs(int64_t K, int64_t n, int64_t ld_in, const at::BFloat16* in, at::BFloat16* out) {
  for (int64_t k = 0; k < K; k += 2)
    for (int64_t j = 0; j < n; j++) {
      out[k * n + 2 * j] = in[k * ld_in + j];
      out[k * n + 2 * j + 1] = k + 1 < K ? in[(k + 1) * ld_in + j] : at::BFloat16(0.f);
    }
}

template <typename T>
void pack_b(int64_t K, int64_t N, int64_t ld_in, const T* in, T* out) {
  for (int64_t c = 0; c < N; c += NB) {
    const int64_t n = std::min(NB, N - c);
    if constexpr (is_bf16<T>) {
      if (bf16_on_amx())
        cpublas::pack(K, n, ld_in, n, at::kBFloat16, at::kBFloat16, in + c, out + K * c);
      else
        pack_pairs(K, n, ld_in, in + c, out + K * c);
    } else {
      for (int64_t r = 0; r < K; r++) std::memcpy(out + K * c + r * n, in + c + r * ld_in, n * sizeof(T));
    }
  }
}

// C[M, 16 NV] (+)= A[M, K] B[K, 16 NV] with B as pack_pairs left it (K even), for CPUs with
// AVX512-BF16 and no AMX (AMD Zen 4 and 5, Intel Cooper Lake): each instruction multiplies a pair
// of A's values, broadcast, with 16 column pairs of B and adds both products to 16 fp32 sums.
// Rows go RM at a time so that RM x NV sums stay in registers while B streams from L1.
#if defined(CPU_CAPABILITY_AVX512)
template <int NV, int RM>
__attribute__((target("avx512f,avx512bf16"))) inline void dpbf16_rows(int64_t K, const at::BFloat16* A,
                                                                      int64_t lda, const at::BFloat16* Bp,
                                                                      bool add, float* C, int64_t ldc) {
  __m512 acc[RM][NV];
  for (int r = 0; r < RM; r++)
    for (int v = 0; v < NV; v++) acc[r][v] = add ? _mm512_loadu_ps(C + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 2) {
    __m512bh b[NV];
    for (int v = 0; v < NV; v++)
      b[v] = (__m512bh)_mm512_loadu_si512(Bp + k * 16 * NV + 32 * v);
    for (int r = 0; r < RM; r++) {
      int32_t pair;
      std::memcpy(&pair, A + r * lda + k, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < NV; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
  for (int r = 0; r < RM; r++)
    for (int v = 0; v < NV; v++) _mm512_storeu_ps(C + r * ldc + 16 * v, acc[r][v]);
}

template <int NV>
void dpbf16_mm(int64_t M, int64_t K, const at::BFloat16* A, int64_t lda, const at::BFloat16* Bp, bool add,
               float* C, int64_t ldc) {
  int64_t r = 0;
  for (; r + 4 <= M; r += 4) dpbf16_rows<NV, 4>(K, A + r * lda, lda, Bp, add, C + r * ldc, ldc);
  for (; r < M; r++) dpbf16_rows<NV, 1>(K, A + r * lda, lda, Bp, add, C + r * ldc, ldc);
}
#endif

// C[M, n] (+)= A[M, K] B[K, n] for one packed block of n <= 64 columns.
template <typename T>
void block_mm(int64_t M, int64_t n, int64_t K, const T* A, int64_t lda, const T* Bp, int64_t ldc, bool add,
              float* C) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (is_bf16<T>) {
    if (!bf16_on_amx()) {
      switch (n / 16) {  // bf16 blocks are 16, 32, 48 or 64 columns (head_dim % 16 == 0)
        case 1: return dpbf16_mm<1>(M, K, A, lda, Bp, add, C, ldc);
        case 2: return dpbf16_mm<2>(M, K, A, lda, Bp, add, C, ldc);
        case 3: return dpbf16_mm<3>(M, K, A, lda, Bp, add, C, ldc);
        default: return dpbf16_mm<4>(M, K, A, lda, Bp, add, C, ldc);
      }
    }
  }
#endif
  cpublas::brgemm(M, n, K, lda, n, ldc, add, A, Bp, C, is_bf16<T>);
}

// C[M, N] = A[M, K] B[K, N] (+ C if add); A row-major, B as pack_b left it.
template <typename T>
void tile_mm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* Bp, bool add, float* C) {
  for (int64_t c = 0; c < N; c += NB) {
    const int64_t n = std::min(NB, N - c);
    block_mm(M, n, K, A, lda, Bp + K * c, N, add, C + c);
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
  std::vector<T> k_rows, v_rows, kT, vT, kT_packed, vT_packed, k_packed, v_packed;  // one example's K/V head
  std::vector<T> q_rows, do_rows, q_packed, do_packed;                               // one query head
  std::vector<T> p_lo, ds, pT, dsT;                                                  // tiles
  std::vector<float> dk_acc, dv_acc, lse_rows, delta, row_sum, acc, s, dp;

  void reserve(int64_t padded_len, int64_t D) {
    auto grow = [](auto& v, int64_t n) { if (static_cast<int64_t>(v.size()) < n) v.resize(n); };
    for (auto* v : {&k_rows, &v_rows, &kT, &vT, &kT_packed, &vT_packed, &k_packed, &v_packed, &q_rows, &do_rows,
                    &q_packed, &do_packed})
      grow(*v, padded_len * D);
    grow(p_lo, B * padded_len);  // the forward keeps a row of tiles
    for (auto* v : {&ds, &pT, &dsT}) grow(*v, B * B);
    for (auto* v : {&dk_acc, &dv_acc}) grow(*v, padded_len * D);
    for (auto* v : {&lse_rows, &delta}) grow(*v, padded_len);
    grow(row_sum, B);
    grow(acc, B * D);
    grow(s, B * padded_len);
    grow(dp, B * B);
  }
};

template <typename T>
Scratch<T>& thread_scratch() {
  static thread_local Scratch<T> scratch;
  return scratch;
}

// [1, heads, T, D] with a contiguous last dim; T may be strided (transformers passes transposed views).
template <typename T>
struct Heads {
  T* data;
  int64_t head, token;
  explicit Heads(const at::Tensor& t)
      : data(t.data_ptr<std::remove_const_t<T>>()), head(t.stride(1)), token(t.stride(2)) {}
  T* at(int64_t h, int64_t t) const { return data + h * head + t * token; }
};

// Runs item(example, kv_head, scratch) for every (example, K/V head) pair on torch's threads, the
// longest examples first so that the short ones even out the threads at the end.
template <typename T, typename F>
void for_each_item(const std::vector<int64_t>& cuts, int64_t kv_heads, int64_t D, F item) {
  std::vector<std::pair<int64_t, int64_t>> items;
  int64_t longest = 0;
  for (int64_t e = 0; e + 1 < static_cast<int64_t>(cuts.size()); e++) {
    longest = std::max(longest, cuts[e + 1] - cuts[e]);
    for (int64_t h = 0; h < kv_heads; h++) items.emplace_back(e, h);
  }
  auto len = [&](const std::pair<int64_t, int64_t>& it) { return cuts[it.first + 1] - cuts[it.first]; };
  std::stable_sort(items.begin(), items.end(), [&](const auto& x, const auto& y) { return len(x) > len(y); });
  const int64_t longest_padded = (longest + B - 1) / B * B;
  std::atomic<int64_t> next{0};
  const int64_t n_items = static_cast<int64_t>(items.size());
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t begin, int64_t end) {
    Scratch<T>& w = thread_scratch<T>();
    w.reserve(longest_padded, D);
    for (int64_t worker = begin; worker < end; worker++)
      for (int64_t i; (i = next.fetch_add(1)) < n_items;) item(items[i].first, items[i].second, w);
    if constexpr (is_bf16<T>) {
      if (bf16_on_amx()) cpublas::brgemm_release(true);
    }
  });
}

// One example's K and V rows, padded to whole tiles, and K^T in tiles: the B operand of S = Q K^T.
template <typename T>
void load_kv(const Heads<const T>& k, const Heads<const T>& v, int64_t kvh, int64_t a, int64_t L, int64_t Lp,
             int64_t D, Scratch<T>& w) {
  copy_rows(k.at(kvh, a), k.token, L, Lp, D, w.k_rows.data());
  copy_rows(v.at(kvh, a), v.token, L, Lp, D, w.v_rows.data());
  transpose(w.k_rows.data(), D, Lp, D, w.kT.data(), Lp);
  for (int64_t j = 0; j < Lp / B; j++) pack_b(D, B, Lp, w.kT.data() + j * B, w.kT_packed.data() + j * D * B);
}

template <typename Op>
float reduce(const Vec& v, Op op) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float r = lanes[0];
  for (int64_t l = 1; l < Vec::size(); l++) r = op(r, lanes[l]);
  return r;
}

// Scores S -> exp(scale * S - row max) in place, for a row of tiles (query tile i, key tiles 0..i,
// each [B, B] at s + j * B * B); keys after the query and rows past the example's end get 0. Returns
// each row's log-sum-exp in lse and its sum in sum (the caller divides the output by it).
inline void softmax_forward_tiles(float* s, int64_t i, int64_t L, float scale, float* lse, float* sum) {
  const Vec vscale(scale), minus_inf(-std::numeric_limits<float>::infinity()), zero(0.f);
  for (int64_t r = 0; r < B; r++) {
    const int64_t row = i * B + r;
    const int64_t visible = row >= L ? 0 : row + 1;  // keys 0..row
    Vec vmax = minus_inf;
    for (int64_t c = 0; c < visible; c += Vec::size()) {
      const float* p = s + (c / B) * B * B + r * B + c % B;  // c steps within a tile: B is a multiple
      const int64_t n = std::min<int64_t>(Vec::size(), visible - c);
      vmax = at::vec::maximum(vmax, n == Vec::size() ? Vec::loadu(p) : Vec::set(minus_inf, Vec::loadu(p, n), n));
    }
    const float max = reduce(vmax, [](float a, float b) { return std::max(a, b); }) * scale;
    const Vec vrow_max(max);
    Vec vsum = zero;
    for (int64_t c = 0; c < (i + 1) * B; c += Vec::size()) {
      float* p = s + (c / B) * B * B + r * B + c % B;
      const int64_t n = std::clamp<int64_t>(visible - c, 0, Vec::size());
      Vec e = n > 0 ? (Vec::loadu(p) * vscale - vrow_max).exp_u20() : zero;
      if (n > 0 && n < Vec::size()) e = Vec::set(zero, e, n);
      e.store(p);
      vsum = vsum + e;
    }
    sum[r] = reduce(vsum, [](float a, float b) { return a + b; });
    lse[r] = visible > 0 ? max + std::log(sum[r]) : 0.f;
  }
}

template <typename T>
void forward(const at::Tensor& q_t, const at::Tensor& k_t, const at::Tensor& v_t, const std::vector<int64_t>& cuts,
             float scale, const at::Tensor& out_t, const at::Tensor& lse_t) {
  const int64_t H = q_t.size(1), KV = k_t.size(1), D = q_t.size(3), G = H / KV;
  const Heads<const T> q(q_t), k(k_t), v(v_t);
  const Heads<T> out(out_t);
  const Heads<float> lse(lse_t);
  for_each_item<T>(cuts, KV, D, [&](int64_t e, int64_t kvh, Scratch<T>& w) {
    const int64_t a = cuts[e], L = cuts[e + 1] - a, Lp = (L + B - 1) / B * B, tiles = Lp / B;
    load_kv(k, v, kvh, a, L, Lp, D, w);
    for (int64_t j = 0; j < tiles; j++) pack_b(B, D, D, w.v_rows.data() + j * B * D, w.v_packed.data() + j * B * D);
    for (int64_t g = 0; g < G; g++) {
      const int64_t h = kvh * G + g;
      copy_rows(q.at(h, a), q.token, L, Lp, D, w.q_rows.data());
      for (int64_t i = 0; i < tiles; i++) {  // query tile: its scores against key tiles 0..i
        for (int64_t j = 0; j <= i; j++)
          tile_mm(B, B, D, w.q_rows.data() + i * B * D, D, w.kT_packed.data() + j * D * B, false,
                  w.s.data() + j * B * B);
        softmax_forward_tiles(w.s.data(), i, L, scale, w.lse_rows.data(), w.row_sum.data());
        at::vec::convert(w.s.data(), w.p_lo.data(), (i + 1) * B * B);
        for (int64_t j = 0; j <= i; j++)  // O = exp(S - max) V / sum
          tile_mm(B, D, B, w.p_lo.data() + j * B * B, B, w.v_packed.data() + j * B * D, j > 0, w.acc.data());
        const int64_t rows = std::min(B, L - i * B);
        for (int64_t r = 0; r < rows; r++) {
          const Vec inv(1.f / w.row_sum[r]);
          for (int64_t d = 0; d < D; d += Vec::size()) {
            const int64_t n = std::min<int64_t>(Vec::size(), D - d);
            (Vec::loadu(w.acc.data() + r * D + d, n) * inv).store(w.acc.data() + r * D + d, n);
          }
        }
        store_rows(w.acc.data(), rows, D, out.at(h, a + i * B), out.token);
        std::copy(w.lse_rows.data(), w.lse_rows.data() + rows, lse.at(h, a + i * B));
      }
    }
  });
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
    std::fill(dpr + visible, dpr + B, 0.f);
  }
}

template <typename T>
void backward(const at::Tensor& grad_out_t, const at::Tensor& q_t, const at::Tensor& k_t, const at::Tensor& v_t,
              const at::Tensor& out_t, const at::Tensor& lse_t, const std::vector<int64_t>& cuts, float scale,
              const at::Tensor& dq_t, const at::Tensor& dk_t, const at::Tensor& dv_t) {
  const int64_t H = q_t.size(1), KV = k_t.size(1), D = q_t.size(3), G = H / KV;
  const Heads<const T> grad_out(grad_out_t), q(q_t), k(k_t), v(v_t), out(out_t);
  const Heads<const float> lse(lse_t);
  const Heads<T> dq(dq_t), dk(dk_t), dv(dv_t);
  for_each_item<T>(cuts, KV, D, [&](int64_t e, int64_t kvh, Scratch<T>& w) {
    const int64_t a = cuts[e], L = cuts[e + 1] - a, Lp = (L + B - 1) / B * B, tiles = Lp / B;
    load_kv(k, v, kvh, a, L, Lp, D, w);
    transpose(w.v_rows.data(), D, Lp, D, w.vT.data(), Lp);
    for (int64_t j = 0; j < tiles; j++) {
      pack_b(D, B, Lp, w.vT.data() + j * B, w.vT_packed.data() + j * D * B);
      pack_b(B, D, D, w.k_rows.data() + j * B * D, w.k_packed.data() + j * B * D);
    }
    std::fill(w.dk_acc.begin(), w.dk_acc.begin() + Lp * D, 0.f);
    std::fill(w.dv_acc.begin(), w.dv_acc.begin() + Lp * D, 0.f);
    for (int64_t g = 0; g < G; g++) {
      const int64_t h = kvh * G + g;
      copy_rows(q.at(h, a), q.token, L, Lp, D, w.q_rows.data());
      copy_rows(grad_out.at(h, a), grad_out.token, L, Lp, D, w.do_rows.data());
      for (int64_t i = 0; i < tiles; i++) {
        pack_b(B, D, D, w.q_rows.data() + i * B * D, w.q_packed.data() + i * B * D);
        pack_b(B, D, D, w.do_rows.data() + i * B * D, w.do_packed.data() + i * B * D);
      }
      for (int64_t r = 0; r < Lp; r++) {
        w.delta[r] = r < L ? dot(w.do_rows.data() + r * D, out.at(h, a + r), D) : 0.f;
        w.lse_rows[r] = r < L ? *lse.at(h, a + r) : 0.f;
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
          tile_mm(B, D, B, w.ds.data(), B, w.k_packed.data() + j * B * D, j > 0, w.acc.data());
          tile_mm(B, D, B, w.dsT.data(), B, w.q_packed.data() + i * B * D, true, w.dk_acc.data() + j * B * D);
          tile_mm(B, D, B, w.pT.data(), B, w.do_packed.data() + i * B * D, true, w.dv_acc.data() + j * B * D);
        }
        store_rows(w.acc.data(), std::min(B, L - i * B), D, dq.at(h, a + i * B), dq.token);
      }
    }
    store_rows(w.dk_acc.data(), L, D, dk.at(kvh, a), dk.token);
    store_rows(w.dv_acc.data(), L, D, dv.at(kvh, a), dv.token);
  });
}

std::vector<int64_t> boundaries(const at::Tensor& bounds) {
  auto cuts = bounds.to(at::kLong).contiguous();
  return std::vector<int64_t>(cuts.data_ptr<int64_t>(), cuts.data_ptr<int64_t>() + cuts.numel());
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, std::initializer_list<const at::Tensor*> all) {
  TORCH_CHECK(q.dim() == 4 && q.size(0) == 1, "q must be [1, heads, tokens, head_dim]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat, "bf16 or fp32 only");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "query heads must be a multiple of K/V heads");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.size(3) % 16 == 0, "bf16 needs head_dim a multiple of 16");
  for (const at::Tensor* t : all)
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->stride(3) == 1, "same dtype, contiguous head_dim");
}

std::tuple<at::Tensor, at::Tensor> packed_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& bounds,
                                                            double scale) {
  check_inputs(q, k, {&q, &k, &v});
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({1, q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const auto cuts = boundaries(bounds);
  if (q.scalar_type() == at::kBFloat16) {
    forward<at::BFloat16>(q, k, v, cuts, static_cast<float>(scale), out, lse);
  } else {
    forward<float>(q, k, v, cuts, static_cast<float>(scale), out, lse);
  }
  return {out, lse};
}

std::vector<at::Tensor> packed_attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                  const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                                  const at::Tensor& lse, const at::Tensor& bounds, double scale) {
  check_inputs(q, k, {&grad_out, &q, &k, &v, &out});
  auto dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  auto lse_f = lse.to(at::kFloat).contiguous();
  const auto cuts = boundaries(bounds);
  if (q.scalar_type() == at::kBFloat16) {
    backward<at::BFloat16>(grad_out, q, k, v, out, lse_f, cuts, static_cast<float>(scale), dq, dk, dv);
  } else {
    backward<float>(grad_out, q, k, v, out, lse_f, cuts, static_cast<float>(scale), dq, dk, dv);
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY(tunelab_kernels, m) {
  m.def("packed_attention_forward(Tensor q, Tensor k, Tensor v, Tensor bounds, float scale) -> (Tensor, Tensor)");
  m.impl("packed_attention_forward", c10::DispatchKey::CPU, TORCH_FN(packed_attention_forward));
  m.def("packed_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor bounds, float scale) -> Tensor[]");
  m.impl("packed_attention_backward", c10::DispatchKey::CPU, TORCH_FN(packed_attention_backward));
}
