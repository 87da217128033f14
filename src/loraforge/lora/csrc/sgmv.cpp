// Segmented LoRA for a mixed batch of one token per row (Punica's SGMV, for x86/ARM CPUs), used by lora/multi.py.
//
//   y_l[:, rows_l[j]] += Bᵀ_lg · (A_lg · x[:, rows_l[j]])   for each layer l, group g, offsets_l[g] <= j < offsets_l[g+1]
//
// Each row is multiplied by its own adapter only, and each adapter's A and B are read once per call however many
// rows use it: the bytes of the adapters present, not G times the FLOPs of a stacked-and-masked matmul. The layers
// of one call share their input x (q, k and v; gate and up), so one parallel region serves them all.
// x (in, N) and each y_l (out_l, N): float32, any strides (the decode step's transposed activations, or a row-major
// batch seen transposed); a_l (G, R, in): float32, contiguous, a smaller rank padded with zeros; bt_l (C, G, R, W):
// s·Bᵀ in blocks of W = 64 outputs (block c holds outputs c·W ... c·W + W - 1 of every adapter, zero past out_l), so
// each task of the second phase reads one contiguous run (a third faster than (G, R, out) rows, from memory);
// rows_l (n_l,) int64 grouped by adapter; offsets_l (G + 1,) int64.
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
  const float *a, *bt;
  const int64_t *rows, *offsets;
  float *h;  // (n, R): h[j] = A_g x_{rows[j]}
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
}  // namespace

void sgmv_(std::vector<torch::Tensor> ys, torch::Tensor x, std::vector<torch::Tensor> as,
           std::vector<torch::Tensor> bts, std::vector<torch::Tensor> rows, std::vector<torch::Tensor> offsets) {
  const size_t L = ys.size();
  TORCH_CHECK(as.size() == L && bts.size() == L && rows.size() == L && offsets.size() == L, "sgmv_: list lengths");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "sgmv_: float32 tensors only");
  const int64_t in = x.size(0), N = x.size(1), xs0 = x.stride(0), xs1 = x.stride(1);
  const float *xp = x.data_ptr<float>();
  std::vector<Layer> layers(L);
  std::vector<int64_t> tasks1(L + 1, 0), tasks2(L + 1, 0), h_at(L + 1, 0);
  for (size_t l = 0; l < L; ++l) {
    const auto &y = ys[l], &a = as[l], &bt = bts[l], &r = rows[l], &o = offsets[l];
    TORCH_CHECK(y.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat && bt.scalar_type() == at::kFloat,
                "sgmv_: float32 tensors only");
    TORCH_CHECK(a.is_contiguous() && bt.is_contiguous() && r.is_contiguous() && o.is_contiguous(),
                "sgmv_: a, bt, rows and offsets must be contiguous");
    const int64_t G = a.size(0), R = a.size(1), out = y.size(0), chunks = (out + W - 1) / W;
    TORCH_CHECK(a.size(2) == in && y.size(1) == N && bt.dim() == 4 && bt.size(0) == chunks && bt.size(1) == G &&
                bt.size(2) == R && bt.size(3) == W && o.size(0) == G + 1, "sgmv_: shapes do not agree");
    layers[l] = Layer{y.data_ptr<float>(), y.stride(0), y.stride(1), out, G, R, chunks, a.data_ptr<float>(),
                      bt.data_ptr<float>(), r.data_ptr<int64_t>(), o.data_ptr<int64_t>(), nullptr};
    tasks1[l + 1] = tasks1[l] + G * R;
    tasks2[l + 1] = tasks2[l] + chunks;
    h_at[l + 1] = h_at[l] + r.size(0) * R;
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
      const int64_t u = t - tasks1[l], g = u / ly.R, q = u % ly.R;
      const float *arow = ly.a + u * in;
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
        for (int64_t j0 = ly.offsets[g]; j0 < ly.offsets[g + 1]; j0 += M) {
          const int64_t m = std::min(ly.offsets[g + 1] - j0, M);
          for (int64_t k = 0; k < m; ++k)
            for (int64_t o = 0; o < W; ++o) acc[k][o] = 0.f;
          for (int64_t q = 0; q < ly.R; ++q) {
            const float *b = ly.bt + ((c * ly.G + g) * ly.R + q) * W;
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sgmv_", &sgmv_, "y_l[:, rows] += each row's own B_g A_g x, for layers l sharing x (in place)");
}
