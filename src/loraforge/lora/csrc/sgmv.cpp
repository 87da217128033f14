// The served layers' matmul for a few rows (the decode step's tokens), each row on its own LoRA adapter or none
// (Punica's SGMV, fused into the base matmul, for x86 and ARM CPUs), used by lora/multi.py:
//
//   y_l[:, j] = W_l x_j + b_l + s_g · B_lg (A_lg x_j)    for each layer l, row j, g the adapter of row j (if any)
//
// x (in, N) is shared by the layers of one call (q, k and v; gate and up), and every row is multiplied by its own
// adapter only: each adapter's A and B are read once per call however many rows use it, where they live (a table of
// addresses, built when the batch's mix changes), so a request joining or leaving copies nothing. A mix of many
// adapters takes `linear_lanes_` instead (below), on a copy of its adapters interleaved by lane.
//
// Two phases, one parallel region:
// 1. h_j = s · A x_j for each row j and its adapter's A (r, in): one row of A read once for all the rows that use it.
// 2. tiles of RB outputs by P = 16 rows: y = W x (with the rows as the short dimension: 1.2-2.9x MKL's sgemm on this
//    machine's AVX2 cores, bench/RESULTS.md; the next tile's W fetched meanwhile), then for each row j of the tile on
//    an adapter, B's RB rows (out, r) dotted with h_j (two rows of one adapter at a time), B's rows for a later tile
//    fetched ahead: the adapters' B are read beside W, and only the rows that use them are multiplied. An adapter
//    with DENSE or more rows in a panel (a prefill) instead multiplies B's rows by that panel of h, as W's rows by x's.
//
// Without W (weights[l] None) a call adds the adapters' part into y_l (a base computed elsewhere: a packed 4-bit
// base, a long prefill); with it, y_l is written whole. x and y_l: float32, any strides (the decode step's transposed
// activations, or a row-major batch seen transposed); W_l (out, in) contiguous; b_l (out,) or None. table_l (4, G)
// int64: per adapter the address of A (r, in) and of B (out, r), float32 contiguous and alive for the call, its rank
// r, and its scaling s as float64 bits. rows_l (n_l,) int64 grouped by adapter, offsets_l (G + 1,) int64.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

#include <algorithm>
#include <type_traits>
#include <cstring>
#include <vector>

namespace {
// rows of y per panel; outputs per tile (12 accumulators); rows per dot of phase one; tiles B is fetched ahead by;
// rows of one adapter in a panel from which B's part is a panel product
constexpr int64_t P = 16, RB = 6, M = 4, PREFETCH = 2, DENSE = 3;

typedef float v8 __attribute__((vector_size(32)));  // GCC/Clang vectors: AVX2 here, two NEON registers on ARM
typedef int32_t vi8 __attribute__((vector_size(32)));  // v8's comparisons: -1 where true, 0 where false

inline v8 load8(const float *p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// out[i] = the sum of p[i]'s 8 lanes, i < 8.
inline void reduce8(const v8 (&p)[8], float *out) {
#ifdef __AVX__
  const __m256 t0 = _mm256_hadd_ps((__m256)p[0], (__m256)p[1]), t1 = _mm256_hadd_ps((__m256)p[2], (__m256)p[3]);
  const __m256 t2 = _mm256_hadd_ps((__m256)p[4], (__m256)p[5]), t3 = _mm256_hadd_ps((__m256)p[6], (__m256)p[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // lanes 0-3 of p[0..3] | 4-7, and p[4..7]
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
#else
  for (int i = 0; i < 8; ++i) {
    float acc = 0.f;
    for (int v = 0; v < 8; ++v) acc += p[i][v];
    out[i] = acc;
  }
#endif
}

// sums[k][i] = b_i · h_k for the R rows b_i = b + i·r of an adapter's B (out, r), R <= RB, and K rows' h_k (K <= 2:
// two rows of one adapter share the loads of B).
template <int R, int K>
inline void row_dots(const float *b, int64_t r, const float *const *h, float (*sums)[8]) {
  v8 part[K][8];
  for (int k = 0; k < K; ++k)
    for (int i = 0; i < 8; ++i) part[k][i] = v8{};
  int64_t q = 0;
  for (; q + 8 <= r; q += 8) {
    v8 hv[K];
    for (int k = 0; k < K; ++k) hv[k] = load8(h[k] + q);
    for (int i = 0; i < R; ++i) {
      const v8 bv = load8(b + i * r + q);
      for (int k = 0; k < K; ++k) part[k][i] += bv * hv[k];
    }
  }
  for (int k = 0; k < K; ++k) {
    reduce8(part[k], sums[k]);
    for (int64_t t = q; t < r; ++t)
      for (int i = 0; i < R; ++i) sums[k][i] += b[i * r + t] * h[k][t];
  }
}

// acc[r] += w[r · ws + k] · xp[k] for R rows of w, step k of a tile.
template <int R>
inline void tile_step(const float *w, int64_t ws, int64_t k, const float *xp, v8 (&acc)[RB][2]) {
  const v8 x0 = load8(xp + k * P), x1 = load8(xp + k * P + 8);
  for (int r = 0; r < R; ++r) {
    const float wv = w[r * ws + k];
    acc[r][0] += wv * x0;
    acc[r][1] += wv * x1;
  }
}

// acc[r] += sum_k w[r · ws + k] · xp[k] for R rows of w and K steps, xp (K, P) contiguous; meanwhile `ahead` bytes
// from `next` (the next tile's rows of W) are fetched, a few lines every 8 steps: each tile reads its W once, from
// memory, and with the hardware prefetcher alone the loop waited on it (a decode step's layers: 32 -> 28 ms).
template <int R>
inline void tile(const float *w, int64_t ws, int64_t K, const float *xp, v8 (&acc)[RB][2], const char *next = nullptr,
                 int64_t ahead = 0) {
  const int64_t per = (ahead / 64 + K / 8 - 1) / std::max<int64_t>(K / 8, 1);  // lines per 8 steps
  int64_t k = 0, line = 0;
  for (; k + 8 <= K; k += 8) {
    for (int64_t c = 0; c < per && line * 64 < ahead; ++c, ++line) __builtin_prefetch(next + line * 64);
    for (int64_t i = k; i < k + 8; ++i) tile_step<R>(w, ws, i, xp, acc);
  }
  for (; k < K; ++k) tile_step<R>(w, ws, k, xp, acc);
}

// res[k] = a · x[k] for the first m of K rows, with V lanes of partial sums per row: 2K (AVX2) independent vector
// chains instead of the one a reduction loop gets, and `a` read once for the K rows.
template <int64_t K, int64_t V>
inline void dots(const float *a, const float *const *x, int64_t n, float *res, int64_t m = K) {
  float part[K][V] = {};
  int64_t i = 0;
  for (; i + V <= n; i += V)
    for (int64_t k = 0; k < K; ++k)
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) part[k][v] += a[i + v] * x[k][i + v];
  for (int64_t k = 0; k < m; ++k) {
    float acc = 0.f;
    for (int64_t v = 0; v < V; ++v) acc += part[k][v];
    for (int64_t r = i; r < n; ++r) acc += a[r] * x[k][r];
    res[k] = acc;
  }
}

// xpk[p][k][c] = x[k, p·P + c] (0 past N) for one k: x (in, N) of any strides packed into panels of P columns.
inline void pack_x(const float *xp, int64_t xs0, int64_t xs1, int64_t k, int64_t in, int64_t N, int64_t NP,
                   float *xpk) {
  for (int64_t p = 0; p < NP; ++p)
    for (int64_t c = 0; c < P; ++c) {
      const int64_t j = p * P + c;
      xpk[(p * in + k) * P + c] = j < N ? xp[k * xs0 + j * xs1] : 0.f;
    }
}

// tile(std::integral_constant<int, R>{}) for the R = min(RB, rows left) outputs of a tile, R a compile-time constant.
template <typename F>
inline void by_rows(int64_t left, F &&tile) {
  switch (std::min(RB, left)) {
    case 6: tile(std::integral_constant<int, 6>{}); break;
    case 5: tile(std::integral_constant<int, 5>{}); break;
    case 4: tile(std::integral_constant<int, 4>{}); break;
    case 3: tile(std::integral_constant<int, 3>{}); break;
    case 2: tile(std::integral_constant<int, 2>{}); break;
    default: tile(std::integral_constant<int, 1>{});
  }
}

template <typename T>
const T *address(int64_t p) { return reinterpret_cast<const T *>(p); }

struct Layer {
  float *y;
  int64_t ys0, ys1, out, G, K2, blocks;
  const float *w, *bias;  // null: add the adapters' part into y
  const int64_t *a, *b, *rank, *rows, *offsets;
  const double *scale;
  std::vector<int64_t> first;  // first[g]: where g's part of an h row starts (the ranks before it summed); first[G] = K2
  std::vector<std::vector<std::pair<int64_t, int64_t>>> panels;  // panels[p]: (adapter g, row j) for the rows in p
  float *h;   // (N, K2): h[j, first[g] + q] = s_g A_g[q] · x_j for row j on adapter g
  float *hp;  // (NP, K2, P): the same in panels of P rows, zero where a row is on another adapter (or none)
};

// One tile: RB (or the last R) outputs from o, panel p, written to (or added into) y.
template <int R>
void run_tile(const Layer &ly, int64_t o, int64_t p, int64_t in, int64_t N, const float *xpk) {
  v8 acc[RB][2];
  for (int r = 0; r < RB; ++r) acc[r][0] = acc[r][1] = v8{};
  if (ly.w != nullptr) {
    // the next RB rows of W, fetched by the first panel's tile (a decode's only one): the thread's next task, or
    // the one after its NP panels of these rows
    const int64_t next = std::min(o + RB, ly.out), ahead = p == 0 ? (std::min(next + RB, ly.out) - next) * in : 0;
    tile<R>(ly.w + o * in, in, in, xpk + p * in * P, acc, reinterpret_cast<const char *>(ly.w + next * in),
            ahead * static_cast<int64_t>(sizeof(float)));
  }
  float few[RB][P] = {};
  const auto &entries = ly.panels[p];  // (adapter g, row j) of the rows of this panel on an adapter, by adapter
  for (size_t e = 0; e < entries.size();) {
    const int64_t g = entries[e].first, r = ly.rank[g];
    size_t end = e;
    while (end < entries.size() && entries[end].first == g) ++end;
    const float *b = address<float>(ly.b[g]) + o * r;
    const int64_t ahead = std::min(o + PREFETCH * RB, ly.out);  // a later tile's B rows, fetched while this computes
    for (const char *at = reinterpret_cast<const char *>(b + (ahead - o) * r),
                    *to = reinterpret_cast<const char *>(b + (std::min(ahead + RB, ly.out) - o) * r); at < to; at += 64)
      __builtin_prefetch(at);
    if (end - e >= DENSE) {  // many rows (a prefill): B's rows times the panel of h, as W's, into acc
      tile<R>(b, r, r, ly.hp + (p * ly.K2 + ly.first[g]) * P, acc);
    } else {  // a few (decode): only those rows, B's R rows dotted with each h_j, two rows at a time
      for (; e < end; e += 2) {
        const int64_t j0 = entries[e].second, j1 = e + 1 < end ? entries[e + 1].second : j0;
        const float *h[2] = {ly.h + j0 * ly.K2 + ly.first[g], ly.h + j1 * ly.K2 + ly.first[g]};
        float sums[2][8];
        if (e + 1 < end) {
          row_dots<R, 2>(b, r, h, sums);
          for (int i = 0; i < R; ++i) few[i][j1 - p * P] += sums[1][i];
        } else {
          row_dots<R, 1>(b, r, h, sums);
        }
        for (int i = 0; i < R; ++i) few[i][j0 - p * P] += sums[0][i];
      }
    }
    e = end;
  }
  float vals[RB][P];
  for (int i = 0; i < R; ++i) {
    std::memcpy(vals[i], &acc[i][0], sizeof(v8));
    std::memcpy(vals[i] + 8, &acc[i][1], sizeof(v8));
    for (int64_t c = 0; c < P; ++c) vals[i][c] += few[i][c];
  }
  const int64_t cols = std::min(P, N - p * P);
  for (int r = 0; r < R; ++r) {
    float *yr = ly.y + (o + r) * ly.ys0 + p * P * ly.ys1;
    if (ly.w != nullptr) {
      const float bias = ly.bias != nullptr ? ly.bias[o + r] : 0.f;
      for (int64_t c = 0; c < cols; ++c) yr[c * ly.ys1] = vals[r][c] + bias;
    } else {
      for (int64_t c = 0; c < cols; ++c) yr[c * ly.ys1] += vals[r][c];
    }
  }
}
}  // namespace

void linear_t_(std::vector<torch::Tensor> ys, torch::Tensor x, std::vector<c10::optional<torch::Tensor>> weights,
               std::vector<c10::optional<torch::Tensor>> biases, std::vector<torch::Tensor> tables,
               std::vector<torch::Tensor> rows, std::vector<torch::Tensor> offsets) {
  const size_t L = ys.size();
  TORCH_CHECK(weights.size() == L && biases.size() == L && tables.size() == L && rows.size() == L &&
              offsets.size() == L, "linear_t_: list lengths differ");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, "linear_t_: x must be float32 (in, N)");
  const int64_t in = x.size(0), N = x.size(1), NP = (N + P - 1) / P, xs0 = x.stride(0), xs1 = x.stride(1);
  const float *xp = x.data_ptr<float>();
  std::vector<Layer> layers(L);
  std::vector<int64_t> tasks1(L + 1, 0), tasks2(L + 1, 0), h_at(L + 1, 0);
  bool any_lora = false;
  for (size_t l = 0; l < L; ++l) {
    const auto &y = ys[l], &t = tables[l], &r = rows[l], &o = offsets[l];
    TORCH_CHECK(y.scalar_type() == at::kFloat && y.dim() == 2 && y.size(1) == N, "linear_t_: y must be float32 (out, N)");
    TORCH_CHECK(t.scalar_type() == at::kLong && r.scalar_type() == at::kLong && o.scalar_type() == at::kLong &&
                t.is_contiguous() && r.is_contiguous() && o.is_contiguous(), "linear_t_: int64 contiguous tables");
    const int64_t G = t.size(1), out = y.size(0);
    TORCH_CHECK(t.size(0) == 4 && o.size(0) == G + 1, "linear_t_: table (4, G) and offsets (G + 1,) expected");
    const float *w = nullptr, *bias = nullptr;
    if (weights[l].has_value()) {
      const auto &wt = *weights[l];
      TORCH_CHECK(wt.scalar_type() == at::kFloat && wt.is_contiguous() && wt.size(0) == out && wt.size(1) == in,
                  "linear_t_: W must be float32 (out, in), contiguous");
      w = wt.data_ptr<float>();
      if (biases[l].has_value()) {
        const auto &bt = *biases[l];
        TORCH_CHECK(bt.scalar_type() == at::kFloat && bt.is_contiguous() && bt.numel() == out,
                    "linear_t_: bias must be float32 (out,)");
        bias = bt.data_ptr<float>();
      }
    }
    Layer &ly = layers[l];
    ly = Layer{y.data_ptr<float>(), y.stride(0), y.stride(1), out, G, 0, (out + RB - 1) / RB, w, bias,
               t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + G, t.data_ptr<int64_t>() + 2 * G,
               r.data_ptr<int64_t>(), o.data_ptr<int64_t>(), reinterpret_cast<const double *>(t.data_ptr<int64_t>() + 3 * G),
               std::vector<int64_t>(G + 1, 0), std::vector<std::vector<std::pair<int64_t, int64_t>>>(NP), nullptr};
    TORCH_CHECK(G == 0 || ly.offsets[G] <= r.size(0), "linear_t_: offsets past the rows");
    for (int64_t g = 0; g < G; ++g) {
      ly.first[g + 1] = ly.first[g] + ly.rank[g];
      for (int64_t j = ly.offsets[g]; j < ly.offsets[g + 1]; ++j) {
        TORCH_CHECK(ly.rows[j] >= 0 && ly.rows[j] < N, "linear_t_: a row index is out of range");
        ly.panels[ly.rows[j] / P].emplace_back(g, ly.rows[j]);
      }
    }
    ly.K2 = ly.first[G];
    any_lora = any_lora || G > 0;
    tasks1[l + 1] = tasks1[l] + ly.K2;
    tasks2[l + 1] = tasks2[l] + (w != nullptr || G > 0 ? ly.blocks * NP : 0);
    h_at[l + 1] = h_at[l] + N * ly.K2 + NP * ly.K2 * P;
  }
  // scratch: x in panels (NP, in, P), zero past N; x row-major (N, in) for phase one; every layer's h
  static thread_local std::vector<float> buffer;
  const bool gather = any_lora && !(xs0 == 1 && xs1 == in);  // x is not already a row-major (N, in) seen transposed
  const int64_t xr_at = NP * in * P, hs_at = xr_at + (gather ? N * in : 0), need = hs_at + h_at[L] + 16;
  if (static_cast<int64_t>(buffer.size()) < need) buffer.resize(need);
  float *xpk = buffer.data();
  const float *xr = gather ? xpk + xr_at : xp;  // every row's input, contiguous
  for (size_t l = 0; l < L; ++l) {
    layers[l].h = buffer.data() + hs_at + h_at[l];
    layers[l].hp = layers[l].h + N * layers[l].K2;
    std::fill(layers[l].hp, layers[l].hp + NP * layers[l].K2 * P, 0.f);
  }
#pragma omp parallel num_threads(at::get_num_threads())
  {
#pragma omp for schedule(static) nowait
    for (int64_t k = 0; k < in; ++k) pack_x(xp, xs0, xs1, k, in, N, NP, xpk);
    if (any_lora) {
      if (gather) {
        float *to = xpk + xr_at;
#pragma omp for schedule(static)
        for (int64_t j = 0; j < N; ++j)
          for (int64_t i = 0; i < in; ++i) to[j * in + i] = xp[i * xs0 + j * xs1];
      } else {
#pragma omp barrier
      }
#pragma omp for schedule(static)
      for (int64_t t = 0; t < tasks1[L]; ++t) {  // h[j, q] = s A_g[q] · x_j: one row of A, read once for its rows
        const size_t l = std::upper_bound(tasks1.begin(), tasks1.end(), t) - tasks1.begin() - 1;
        const Layer &ly = layers[l];
        const int64_t u = t - tasks1[l];
        const int64_t g = std::upper_bound(ly.first.begin(), ly.first.end(), u) - ly.first.begin() - 1;
        const int64_t q = u - ly.first[g];
        const float *arow = address<float>(ly.a[g]) + q * in;
        const float s = static_cast<float>(ly.scale[g]);
        for (int64_t j0 = ly.offsets[g]; j0 < ly.offsets[g + 1]; j0 += M) {
          const int64_t m = std::min(ly.offsets[g + 1] - j0, M);
          const float *xj[M];
          for (int64_t k = 0; k < M; ++k) xj[k] = xr + ly.rows[j0 + std::min(k, m - 1)] * in;
          float res[M];
          if (m == 1) dots<1, 32>(arow, xj, in, res);
          else if (m == 2) dots<2, 16>(arow, xj, in, res);
          else dots<M, 16>(arow, xj, in, res, m);
          for (int64_t k = 0; k < m; ++k) {
            const int64_t j = ly.rows[j0 + k];
            ly.h[j * ly.K2 + ly.first[g] + q] = ly.hp[((j / P) * ly.K2 + ly.first[g] + q) * P + j % P] = s * res[k];
          }
        }
      }
    } else {
#pragma omp barrier
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks2[L]; ++t) {  // one tile: RB outputs of one layer, one panel of rows
      const size_t l = std::upper_bound(tasks2.begin(), tasks2.end(), t) - tasks2.begin() - 1;
      const Layer &ly = layers[l];
      const int64_t u = t - tasks2[l], o = (u / NP) * RB, p = u % NP;
      by_rows(ly.out - o, [&](auto R) { run_tile<decltype(R)::value>(ly, o, p, in, N, xpk); });
    }
  }
}

// ---- A mixed decode batch with its adapters interleaved by lane (`linear_lanes_`) ---------------------------------
//
// The same sums as linear_t_ with W, for a batch whose rows use many adapters (Routing.lanes in lora/multi.py):
// each adapter present holds a lane, and every layer keeps a copy of the batch's adapters interleaved by lane,
//   A (Q/4, in, 4, S): A_j[q, k] at [q / 4, k, q % 4, j];   B (out, Q, S): B_j[o, q] at [o, q, j],
// S lanes in groups of 8, Q the largest rank (a smaller one is zero-padded). With the 16 rows of a panel as the
// vector lanes (as W's tiles have them), one 8-float load gives the 8 lanes of a group and a permute puts each row's
// own lane under it: phase one (h = s · A x for every row) and B's part in W's tiles are then the same broadcast-free
// FMAs as W's, over memory read in one stream, instead of a dot product per adapter row and per B row with its
// horizontal sum. About half the adapters' time in a decode step (bench/RESULTS.md); the price is that copy.
//
// lane_a[l], lane_b[l] as above, float32 contiguous, or None for a layer no adapter holding a lane adapts (its base
// alone); lane_s[l] (S,) float32, each lane's scaling in layer l (0: its adapter does not adapt l, or the lane is
// empty). row_lanes (N,) int32: each row's lane, or -1 for the base alone. A row whose lane has s = 0 in a layer
// (the base's rows too) gets W x + b there, plus exact zeros: its h is selected away, not multiplied by 0.
namespace {
constexpr int64_t LG = 8, QB = 4;  // lanes in a group (one load); rows of A per phase-one task

inline v8 pick(v8 a, const int32_t *idx) {  // a's lanes in the order idx gives (an AVX2 permute)
#ifdef __AVX2__
  return (v8)_mm256_permutevar8x32_ps((__m256)a, _mm256_loadu_si256(reinterpret_cast<const __m256i *>(idx)));
#else
  v8 r;
  for (int i = 0; i < 8; ++i) r[i] = a[idx[i]];
  return r;
#endif
}

struct Lanes {
  int64_t NP, NG;
  std::vector<int32_t> idx;   // (NP, NG, P): the lane within group g of each column of panel p (0 where not in g)
  std::vector<char> used;     // (NP, NG): a row of panel p is in group g
  std::vector<char> identity; // (NP, NG): idx is 0..7, 0..7 (no permute)
};

// acc[i] += perm(B rows o + i, lanes of group g) · h[q] for R outputs, Q ranks, the panel's 16 columns.
template <int R, bool PERM>
inline void lane_part(const float *b, int64_t Q, int64_t S, const float *h, const int32_t *idx, v8 (&acc)[RB][2]) {
  for (int64_t q = 0; q < Q; ++q) {
    const v8 h0 = load8(h + q * P), h1 = load8(h + q * P + 8);
    for (int i = 0; i < R; ++i) {
      const v8 bv = load8(b + (i * Q + q) * S);
      acc[i][0] += (PERM ? pick(bv, idx) : bv) * h0;
      acc[i][1] += (PERM ? pick(bv, idx + 8) : bv) * h1;
    }
  }
}

template <int R>
void lane_tile(const float *w, const float *bias, const float *b, int64_t in, int64_t out, int64_t Q, int64_t S,
               const float *hs, const Lanes &ln, int64_t o, int64_t p, const float *xpk, float *y, int64_t ys0,
               int64_t ys1, int64_t N) {
  v8 acc[RB][2];
  for (int r = 0; r < RB; ++r) acc[r][0] = acc[r][1] = v8{};
  const int64_t next = std::min(o + RB, out), ahead = p == 0 ? (std::min(next + RB, out) - next) * in : 0;
  if (b != nullptr && p == 0) {  // a later tile's rows of B, fetched while this one computes
    const int64_t from = std::min(o + PREFETCH * RB, out), to = std::min(from + RB, out);
    for (const char *at = reinterpret_cast<const char *>(b + from * Q * S), *end = reinterpret_cast<const char *>(
             b + to * Q * S); at < end; at += 64)
      __builtin_prefetch(at);
  }
  tile<R>(w + o * in, in, in, xpk + p * in * P, acc, reinterpret_cast<const char *>(w + next * in),
          ahead * static_cast<int64_t>(sizeof(float)));
  if (b != nullptr)
    for (int64_t g = 0; g < ln.NG; ++g) {
      if (!ln.used[p * ln.NG + g]) continue;
      const float *bg = b + o * Q * S + g * LG, *h = hs + ((p * ln.NG + g) * Q) * P;
      const int32_t *idx = ln.idx.data() + (p * ln.NG + g) * P;
      if (ln.identity[p * ln.NG + g]) lane_part<R, false>(bg, Q, S, h, idx, acc);
      else lane_part<R, true>(bg, Q, S, h, idx, acc);
    }
  const int64_t cols = std::min(P, N - p * P);
  for (int r = 0; r < R; ++r) {
    float vals[P];
    std::memcpy(vals, &acc[r][0], sizeof(v8));
    std::memcpy(vals + 8, &acc[r][1], sizeof(v8));
    const float add = bias != nullptr ? bias[o + r] : 0.f;
    float *yr = y + (o + r) * ys0 + p * P * ys1;
    for (int64_t c = 0; c < cols; ++c) yr[c * ys1] = vals[c] + add;
  }
}
}  // namespace

void linear_lanes_(std::vector<torch::Tensor> ys, torch::Tensor x, std::vector<torch::Tensor> weights,
                   std::vector<c10::optional<torch::Tensor>> biases, std::vector<c10::optional<torch::Tensor>> lane_a,
                   std::vector<c10::optional<torch::Tensor>> lane_b, std::vector<c10::optional<torch::Tensor>> lane_s,
                   torch::Tensor row_lanes) {
  const size_t L = ys.size();
  TORCH_CHECK(weights.size() == L && biases.size() == L && lane_a.size() == L && lane_b.size() == L &&
              lane_s.size() == L, "linear_lanes_: list lengths differ");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.device().is_cpu() && row_lanes.device().is_cpu(),
              "linear_lanes_: x must be float32 (in, N), on the CPU");
  const int64_t in = x.size(0), N = x.size(1), NP = (N + P - 1) / P, xs0 = x.stride(0), xs1 = x.stride(1);
  TORCH_CHECK(row_lanes.scalar_type() == at::kInt && row_lanes.is_contiguous() && row_lanes.numel() == N,
              "linear_lanes_: row_lanes must be int32 (N,)");
  const float *xp = x.data_ptr<float>();
  const int32_t *lane = row_lanes.data_ptr<int32_t>();
  int64_t S = 0;
  std::vector<int64_t> Q(L, 0), tasks1(L + 1, 0), tasks2(L + 1, 0), h_at(L + 1, 0);
  std::vector<const float *> A(L, nullptr), Bp(L, nullptr), W(L), bias(L, nullptr);
  for (size_t l = 0; l < L; ++l) {
    const auto &y = ys[l], &w = weights[l];
    TORCH_CHECK(y.scalar_type() == at::kFloat && y.dim() == 2 && y.size(1) == N,
                "linear_lanes_: y must be float32 (out, N)");
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.size(0) == y.size(0) && w.size(1) == in,
                "linear_lanes_: W must be float32 (out, in), contiguous");
    W[l] = w.data_ptr<float>();
    if (biases[l].has_value()) {
      const auto &bt = *biases[l];
      TORCH_CHECK(bt.scalar_type() == at::kFloat && bt.is_contiguous() && bt.numel() == y.size(0),
                  "linear_lanes_: bias must be float32 (out,)");
      bias[l] = bt.data_ptr<float>();
    }
    if (lane_a[l].has_value()) {
      TORCH_CHECK(lane_b[l].has_value() && lane_s[l].has_value(), "linear_lanes_: a layer's A, B and s go together");
      const auto &a = *lane_a[l], &b = *lane_b[l], &s = *lane_s[l];
      TORCH_CHECK(b.dim() == 3, "linear_lanes_: B must be (out, Q, S)");
      const int64_t lanes = b.size(2);
      TORCH_CHECK(S == 0 || lanes == S, "linear_lanes_: the layers' lane counts differ");
      S = lanes;
      Q[l] = b.size(1);
      TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat &&
                  a.is_contiguous() && b.is_contiguous() && s.is_contiguous() && S % LG == 0 && Q[l] % QB == 0 &&
                  a.dim() == 4 && a.size(0) * QB == Q[l] && a.size(1) == in && a.size(2) == QB && a.size(3) == S &&
                  b.dim() == 3 && b.size(0) == y.size(0) && s.numel() == S,
                  "linear_lanes_: lanes must be float32 A (Q/4, in, 4, S), B (out, Q, S), s (S,), S a multiple of 8");
      A[l] = a.data_ptr<float>();
      Bp[l] = b.data_ptr<float>();
    }
  }
  Lanes ln{NP, S / LG, std::vector<int32_t>(NP * (S / LG) * P, 0), std::vector<char>(NP * (S / LG), 0),
           std::vector<char>(NP * (S / LG), 1)};
  for (int64_t j = 0; j < N; ++j) {
    TORCH_CHECK(lane[j] >= -1 && (lane[j] < S || S == 0), "linear_lanes_: a row's lane is out of range");
    if (lane[j] < 0 || S == 0) continue;
    const int64_t p = j / P, g = lane[j] / LG, at = (p * ln.NG + g);
    ln.used[at] = 1;
    ln.idx[at * P + j % P] = lane[j] % LG;
  }
  for (int64_t at = 0; at < NP * ln.NG; ++at)
    for (int64_t c = 0; c < P; ++c)
      if (ln.idx[at * P + c] != c % LG) ln.identity[at] = 0;
  std::vector<int64_t> groups;  // the groups some row uses, for phase one
  for (int64_t g = 0; g < ln.NG; ++g)
    for (int64_t p = 0; p < NP; ++p)
      if (ln.used[p * ln.NG + g]) { groups.push_back(g); break; }
  const int64_t UG = groups.size();
  for (size_t l = 0; l < L; ++l) {
    tasks1[l + 1] = tasks1[l] + (A[l] != nullptr ? UG * (Q[l] / QB) : 0);
    tasks2[l + 1] = tasks2[l] + (ys[l].size(0) + RB - 1) / RB * NP;
    h_at[l + 1] = h_at[l] + NP * ln.NG * Q[l] * P;
  }
  // each row's scaling in each layer, per group: s of its lane where the row is in the group, else 0
  std::vector<float> scale(L * NP * ln.NG * P, 0.f);
  for (size_t l = 0; l < L; ++l) {
    if (A[l] == nullptr) continue;
    const float *s = lane_s[l]->data_ptr<float>();
    for (int64_t j = 0; j < N; ++j)
      if (lane[j] >= 0 && S > 0) scale[((l * NP + j / P) * ln.NG + lane[j] / LG) * P + j % P] = s[lane[j]];
  }
  static thread_local std::vector<float> buffer2;
  const int64_t need = NP * in * P + h_at[L] + 16;
  if (static_cast<int64_t>(buffer2.size()) < need) buffer2.resize(need);
  float *xpk = buffer2.data(), *hs = xpk + NP * in * P;
#pragma omp parallel num_threads(at::get_num_threads())
  {
#pragma omp for schedule(static)
    for (int64_t k = 0; k < in; ++k) pack_x(xp, xs0, xs1, k, in, N, NP, xpk);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks1[L]; ++t) {  // h = s · A x for QB ranks of one group, each panel that uses it
      const size_t l = std::upper_bound(tasks1.begin(), tasks1.end(), t) - tasks1.begin() - 1;
      const int64_t u = t - tasks1[l], g = groups[u / (Q[l] / QB)], qb = u % (Q[l] / QB);
      const float *a = A[l] + qb * in * QB * S + g * LG;
      for (int64_t p = 0; p < NP; ++p) {
        const int64_t at = p * ln.NG + g;
        if (!ln.used[at]) continue;
        const int32_t *idx = ln.idx.data() + at * P;
        const float *xq = xpk + p * in * P;
        v8 acc[QB][2];
        for (int i = 0; i < QB; ++i) acc[i][0] = acc[i][1] = v8{};
        if (ln.identity[at]) {
          for (int64_t k = 0; k < in; ++k) {
            const v8 x0 = load8(xq + k * P), x1 = load8(xq + k * P + 8);
            for (int i = 0; i < QB; ++i) {
              const v8 av = load8(a + (k * QB + i) * S);
              acc[i][0] += av * x0;
              acc[i][1] += av * x1;
            }
          }
        } else {
          for (int64_t k = 0; k < in; ++k) {
            const v8 x0 = load8(xq + k * P), x1 = load8(xq + k * P + 8);
            for (int i = 0; i < QB; ++i) {
              const v8 av = load8(a + (k * QB + i) * S);
              acc[i][0] += pick(av, idx) * x0;
              acc[i][1] += pick(av, idx + 8) * x1;
            }
          }
        }
        // s where the column's row is on a lane of g that adapts l; there, and only there, h is kept: elsewhere
        // the permute picked some lane of g for a row it is not, and a select (not a product by 0) drops it
        const float *sc = scale.data() + ((l * NP + p) * ln.NG + g) * P;
        const v8 s0 = load8(sc), s1 = load8(sc + 8);
        const vi8 k0 = s0 != v8{}, k1 = s1 != v8{};
        float *h = hs + h_at[l] + (at * Q[l] + qb * QB) * P;
        for (int i = 0; i < QB; ++i) {
          const v8 r0 = (v8)((vi8)(acc[i][0] * s0) & k0), r1 = (v8)((vi8)(acc[i][1] * s1) & k1);
          std::memcpy(h + i * P, &r0, sizeof r0);
          std::memcpy(h + i * P + 8, &r1, sizeof r1);
        }
      }
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks2[L]; ++t) {  // one tile: RB outputs of one layer, one panel of rows
      const size_t l = std::upper_bound(tasks2.begin(), tasks2.end(), t) - tasks2.begin() - 1;
      const int64_t u = t - tasks2[l], o = (u / NP) * RB, p = u % NP, out = ys[l].size(0);
      float *y = ys[l].data_ptr<float>();
      const int64_t ys0 = ys[l].stride(0), ys1 = ys[l].stride(1);
      const float *h = hs + h_at[l];
      by_rows(out - o, [&](auto R) {
        lane_tile<decltype(R)::value>(W[l], bias[l], Bp[l], in, out, Q[l], S, h, ln, o, p, xpk, y, ys0, ys1, N);
      });
    }
  }
}

torch::Tensor rms_t(torch::Tensor x, torch::Tensor weight, double eps);  // decode.cpp
torch::Tensor rotary_t(torch::Tensor t, torch::Tensor cos, torch::Tensor sin);
void nf4_unpack_(torch::Tensor codes, torch::Tensor absmax, torch::Tensor code, torch::Tensor out);  // quant.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_t_", &linear_t_, "y_l = W_l x + b_l + each row's own s B A x (or += the adapters' part), in place");
  m.def("linear_lanes_", &linear_lanes_,
        "y_l = W_l x + b_l + each row's own s B A x, the batch's adapters interleaved by lane");
  m.def("rms_t", &rms_t, "the decode step's RMSNorm over the features of x (H, B)");
  m.def("rotary_t", &rotary_t, "the decode step's rotary embedding of t (heads·hd, B)");
  m.def("nf4_unpack_", &nf4_unpack_, "out = NF4 codes times their block's absmax, cast as torch casts");
}
