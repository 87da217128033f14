// Segmented LoRA for a mixed batch of one token per row (Punica's SGMV, for x86/ARM CPUs), used by lora/multi.py.
//
//   y[:, rows[j]] += Bᵀ_g · (A_g · x[:, rows[j]])   for each group g and offsets[g] <= j < offsets[g+1]
//
// Each row is multiplied by its own adapter only, and each adapter's A and B are read once per call however many
// rows use it: the bytes of the adapters present, not G times the FLOPs of a stacked-and-masked matmul.
// y (out, N) and x (in, N): float32, any strides (the decode step's transposed activations, or a row-major batch
// seen transposed); a (G, R, in): float32, contiguous, a smaller rank padded with zeros; bt (C, G, R, W): s·Bᵀ in
// blocks of W = 64 outputs (block c holds outputs c·W ... c·W + W - 1 of every adapter, zero past `out`), so each
// task of the second phase reads one contiguous run (a third faster than (G, R, out) rows, from memory);
// rows (n,) int64 grouped by adapter; offsets (G + 1,) int64.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <vector>

void sgmv_(torch::Tensor y, torch::Tensor x, torch::Tensor a, torch::Tensor bt, torch::Tensor rows,
           torch::Tensor offsets) {
  TORCH_CHECK(y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat &&
              bt.scalar_type() == at::kFloat, "sgmv_: float32 tensors only");
  TORCH_CHECK(a.is_contiguous() && bt.is_contiguous() && rows.is_contiguous() && offsets.is_contiguous(),
              "sgmv_: a, bt, rows and offsets must be contiguous");
  constexpr int64_t W = 64, M = 4;  // outputs per block; rows of one adapter computed together
  const int64_t G = a.size(0), R = a.size(1), in = a.size(2), out = y.size(0), n = rows.size(0);
  const int64_t chunks = (out + W - 1) / W;
  TORCH_CHECK(bt.dim() == 4 && bt.size(0) == chunks && bt.size(1) == G && bt.size(2) == R && bt.size(3) == W &&
              x.size(0) == in && x.size(1) == y.size(1) && offsets.size(0) == G + 1, "sgmv_: shapes do not agree");
  const int64_t *rp = rows.data_ptr<int64_t>(), *op = offsets.data_ptr<int64_t>();
  const float *ap = a.data_ptr<float>(), *bp = bt.data_ptr<float>(), *xp = x.data_ptr<float>();
  float *yp = y.data_ptr<float>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), ys0 = y.stride(0), ys1 = y.stride(1);
  static thread_local std::vector<float> buffer;  // the gathered rows (n, in), then h = A x (n, R)
  if (static_cast<int64_t>(buffer.size()) < n * (in + R)) buffer.resize(n * (in + R));
  float *xr = buffer.data(), *h = xr + n * in;
#pragma omp parallel num_threads(at::get_num_threads())
  {
#pragma omp for schedule(static)
    for (int64_t j = 0; j < n; ++j)  // gather each row's input into contiguous memory
      for (int64_t i = 0; i < in; ++i) xr[j * in + i] = xp[i * xs0 + rp[j] * xs1];
#pragma omp for schedule(static)
    for (int64_t t = 0; t < G * R; ++t) {  // h[j, q] = A_g[q] · x_j: one row of A, read once for all its rows
      const int64_t g = t / R, q = t % R;
      const float *arow = ap + t * in;
      for (int64_t j = op[g]; j < op[g + 1]; ++j) {
        const float *xj = xr + j * in;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < in; ++i) acc += arow[i] * xj[i];
        h[j * R + q] = acc;
      }
    }
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {  // y[o, row_j] += sum_q h[j, q] Bᵀ_g[q, o], for a block of W outputs
      float acc[M][W];
      const int64_t c0 = c * W, w = std::min(out - c0, W);
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t j0 = op[g]; j0 < op[g + 1]; j0 += M) {
          const int64_t m = std::min(op[g + 1] - j0, M);
          for (int64_t k = 0; k < m; ++k)
            for (int64_t o = 0; o < w; ++o) acc[k][o] = 0.f;
          for (int64_t q = 0; q < R; ++q) {
            const float *b = bp + ((c * G + g) * R + q) * W;
            for (int64_t k = 0; k < m; ++k) {
              const float hq = h[(j0 + k) * R + q];
#pragma omp simd
              for (int64_t o = 0; o < w; ++o) acc[k][o] += hq * b[o];
            }
          }
          for (int64_t k = 0; k < m; ++k) {
            float *yj = yp + rp[j0 + k] * ys1 + c0 * ys0;
            for (int64_t o = 0; o < w; ++o) yj[o * ys0] += acc[k][o];
          }
        }
      }
    }
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("sgmv_", &sgmv_, "y[:, rows] += each row's own B_g A_g x (in place)"); }
