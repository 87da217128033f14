// Segmented LoRA for a mixed batch (Punica's SGMV, for x86/ARM CPUs), used by lora/multi.py.
//
//   y_l[:, rows_l[j]] += Bᵀ_lg · (A_lg · x[:, rows_l[j]])   for each layer l, group g, offsets_l[g] <= j < offsets_l[g+1]
//
// Each row (a token) is multiplied by its own adapter only, and each adapter's A and B are read once per call however
// many rows use it: the bytes of the adapters present, not G times the FLOPs of a stacked-and-masked matmul. The
// layers of one call share their input x (q, k and v; gate and up), so one parallel region serves them all. The
// adapters are read where they live (a table of pointers, built when the batch's mix changes): nothing is copied
// into stacks when a request joins or leaves.
//
// x (in, N) and each y_l (out_l, N): float32, any strides (the decode step's transposed activations, or a row-major
// batch seen transposed). table_l (3, G) int64: per group, the address of A (r, in), the address of s·Bᵀ in blocks of
// W = 64 outputs (C, r, W) (block c holds outputs c·W ... c·W + W - 1, zero past out_l, so each task of the second
// phase reads contiguous runs: a third faster than (r, out) rows, from memory), and the rank r; all float32,
// contiguous, alive for the call. rows_l (n_l,) int64 grouped by adapter; offsets_l (G + 1,) int64.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <vector>

namespace {
constexpr int64_t W = 64, M = 4;  // outputs per block; rows of one adapter computed together

struct Layer {
  float *y;
  int64_t ys0, ys1, out, G, R, chunks;
  const int64_t *a, *bt, *rank, *rows, *offsets;  // a and bt: addresses of float32 arrays
  std::vector<int64_t> first;  // first[g]: the first phase-one task of group g (its ranks summed before it)
  float *h;  // (n, R): h[j, :r_g] = A_g x_{rows[j]}
};

// h[k · stride] = a · x_k for the first `m` of K rows, with V lanes of partial sums per row: 2K (AVX2) independent
// vector chains instead of the one a reduction loop gets, and `a` read once for the K rows.
template <int64_t K, int64_t V>
inline void dots(const float *a, const float *const *x, int64_t n, float *h, int64_t stride, int64_t m = K) {
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
    h[k * stride] = acc;
  }
}

template <typename T>
const T *address(int64_t p) { return reinterpret_cast<const T *>(p); }
}  // namespace

void sgmv_(std::vector<torch::Tensor> ys, torch::Tensor x, std::vector<torch::Tensor> tables,
           std::vector<torch::Tensor> rows, std::vector<torch::Tensor> offsets) {
  const size_t L = ys.size();
  TORCH_CHECK(tables.size() == L && rows.size() == L && offsets.size() == L, "sgmv_: list lengths differ");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "sgmv_: float32 tensors only");
  const int64_t in = x.size(0), N = x.size(1), xs0 = x.stride(0), xs1 = x.stride(1);
  const float *xp = x.data_ptr<float>();
  std::vector<Layer> layers(L);
  std::vector<int64_t> tasks1(L + 1, 0), tasks2(L + 1, 0), h_at(L + 1, 0);
  for (size_t l = 0; l < L; ++l) {
    const auto &y = ys[l], &t = tables[l], &r = rows[l], &o = offsets[l];
    TORCH_CHECK(y.scalar_type() == at::kFloat && y.size(1) == N, "sgmv_: y must be float32 (out, N)");
    TORCH_CHECK(t.scalar_type() == at::kLong && r.scalar_type() == at::kLong && o.scalar_type() == at::kLong &&
                t.is_contiguous() && r.is_contiguous() && o.is_contiguous(), "sgmv_: int64 contiguous tables");
    const int64_t G = t.size(1), out = y.size(0);
    TORCH_CHECK(t.size(0) == 3 && o.size(0) == G + 1, "sgmv_: table (3, G) and offsets (G + 1,) expected");
    Layer &ly = layers[l];
    ly = Layer{y.data_ptr<float>(), y.stride(0), y.stride(1), out, G, 0, (out + W - 1) / W,
               t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + G, t.data_ptr<int64_t>() + 2 * G,
               r.data_ptr<int64_t>(), o.data_ptr<int64_t>(), std::vector<int64_t>(G + 1, 0), nullptr};
    for (int64_t g = 0; g < G; ++g) {
      ly.first[g + 1] = ly.first[g] + ly.rank[g];
      ly.R = std::max(ly.R, ly.rank[g]);
    }
    TORCH_CHECK(G == 0 || ly.offsets[G] <= r.size(0), "sgmv_: offsets past the rows");
    tasks1[l + 1] = tasks1[l] + ly.first[G];
    tasks2[l + 1] = tasks2[l] + ly.chunks;
    h_at[l + 1] = h_at[l] + r.size(0) * ly.R;
  }
  static thread_local std::vector<float> buffer;  // x gathered row-major (N, in), then every layer's h
  if (static_cast<int64_t>(buffer.size()) < N * in + h_at[L]) buffer.resize(N * in + h_at[L]);
  float *xr = buffer.data();
  for (size_t l = 0; l < L; ++l) layers[l].h = xr + N * in + h_at[l];
#pragma omp parallel num_threads(at::get_num_threads())
  {
#pragma omp for schedule(static)
    for (int64_t j = 0; j < N; ++j)  // every row's input, contiguous
      for (int64_t i = 0; i < in; ++i) xr[j * in + i] = xp[i * xs0 + j * xs1];
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks1[L]; ++t) {  // h[j, q] = A_g[q] · x_j: one row of A, read once for all its rows
      const size_t l = std::upper_bound(tasks1.begin(), tasks1.end(), t) - tasks1.begin() - 1;
      const Layer &ly = layers[l];
      const int64_t u = t - tasks1[l];
      const int64_t g = std::upper_bound(ly.first.begin(), ly.first.end(), u) - ly.first.begin() - 1;
      const int64_t q = u - ly.first[g];
      const float *arow = address<float>(ly.a[g]) + q * in;
      for (int64_t j0 = ly.offsets[g]; j0 < ly.offsets[g + 1]; j0 += M) {
        const int64_t m = std::min(ly.offsets[g + 1] - j0, M);
        const float *xj[M];
        for (int64_t k = 0; k < M; ++k) xj[k] = xr + ly.rows[j0 + std::min(k, m - 1)] * in;
        float *hj = ly.h + j0 * ly.R + q;
        if (m == 1) dots<1, 32>(arow, xj, in, hj, ly.R);
        else if (m == 2) dots<2, 16>(arow, xj, in, hj, ly.R);
        else dots<M, 16>(arow, xj, in, hj, ly.R, m);
      }
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks2[L]; ++t) {  // y[o, row_j] += sum_q h[j, q] Bᵀ_g[q, o], for a block of W outputs
      const size_t l = std::upper_bound(tasks2.begin(), tasks2.end(), t) - tasks2.begin() - 1;
      const Layer &ly = layers[l];
      const int64_t c = t - tasks2[l], c0 = c * W, w = std::min(ly.out - c0, W);
      float acc[M][W];
      for (int64_t g = 0; g < ly.G; ++g) {
        const int64_t r = ly.rank[g];
        const float *block = address<float>(ly.bt[g]) + c * r * W;  // (r, W): block c of this adapter's s·Bᵀ
        for (int64_t j0 = ly.offsets[g]; j0 < ly.offsets[g + 1]; j0 += M) {
          const int64_t m = std::min(ly.offsets[g + 1] - j0, M);
          for (int64_t k = 0; k < m; ++k)
            for (int64_t o = 0; o < W; ++o) acc[k][o] = 0.f;
          for (int64_t q = 0; q < r; ++q) {
            const float *b = block + q * W;
            for (int64_t k = 0; k < m; ++k) {
              const float hq = ly.h[(j0 + k) * ly.R + q];
#pragma omp simd
              for (int64_t o = 0; o < W; ++o) acc[k][o] += hq * b[o];
            }
          }
          for (int64_t k = 0; k < m; ++k) {
            float *yj = ly.y + ly.rows[j0 + k] * ly.ys1 + c0 * ly.ys0;
            for (int64_t o = 0; o < w; ++o) yj[o * ly.ys0] += acc[k][o];
          }
        }
      }
    }
  }
}

torch::Tensor rms_t(torch::Tensor x, torch::Tensor weight, double eps);  // decode.cpp
torch::Tensor rotary_t(torch::Tensor t, torch::Tensor cos, torch::Tensor sin);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sgmv_", &sgmv_, "y_l[:, rows] += each row's own B_g A_g x, for layers l sharing x (in place)");
  m.def("rms_t", &rms_t, "the decode step's RMSNorm over the features of x (H, B)");
  m.def("rotary_t", &rotary_t, "the decode step's rotary embedding of t (heads·hd, B)");
}
