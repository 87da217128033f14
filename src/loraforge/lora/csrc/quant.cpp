// NF4 unpacking for the packed base (quant/nf4.py) in one pass: w[i] = code[q_i] · absmax[i / 64] in float32, then
// cast to the output's dtype as torch casts (round to nearest even), so the values are the pure-torch path's bit for
// bit; written into a tensor the caller owns (QuantMatmul's reused buffer), so nothing of the weight's size is
// allocated per call.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

namespace {
template <typename T>
void unpack(const uint8_t *q, const float *absmax, const float *code, T *out, int64_t n) {
  constexpr int64_t BLOCK = 64;
  at::parallel_for(0, (n + BLOCK - 1) / BLOCK, 512, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float s = absmax[b];
      const int64_t i0 = b * BLOCK, i1 = std::min(i0 + BLOCK, n);
      if (i1 - i0 == BLOCK) {  // a whole block: 32 bytes, two weights each (the first in the high nibble)
        const uint8_t *qb = q + i0 / 2;
        T *ob = out + i0;
        for (int64_t j = 0; j < BLOCK / 2; ++j) {
          ob[2 * j] = static_cast<T>(code[qb[j] >> 4] * s);
          ob[2 * j + 1] = static_cast<T>(code[qb[j] & 15] * s);
        }
      } else {
        for (int64_t i = i0; i < i1; ++i) {
          const uint8_t byte = q[i / 2];
          out[i] = static_cast<T>(code[(i & 1) ? (byte & 15) : (byte >> 4)] * s);
        }
      }
    }
  });
}
}  // namespace

// out (n weights, float32 / bfloat16 / float16, contiguous) = NF4 codes (uint8, ceil(n / 2)) times their block's
// absmax (float32, ceil(n / 64)); code: the 16 NF4 values (float32).
void nf4_unpack_(torch::Tensor codes, torch::Tensor absmax, torch::Tensor code, torch::Tensor out) {
  const int64_t n = out.numel();
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.numel() >= (n + 1) / 2,
              "nf4_unpack_: codes must be uint8, contiguous, ceil(n / 2) of them");
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous() && absmax.numel() >= (n + 63) / 64,
              "nf4_unpack_: absmax must be float32, contiguous, one per block of 64");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.is_contiguous() && code.numel() == 16,
              "nf4_unpack_: code must be the 16 float32 NF4 values");
  TORCH_CHECK(out.is_contiguous(), "nf4_unpack_: out must be contiguous");
  const uint8_t *q = codes.data_ptr<uint8_t>();
  const float *a = absmax.data_ptr<float>(), *c = code.data_ptr<float>();
  switch (out.scalar_type()) {
    case at::kFloat: unpack(q, a, c, out.data_ptr<float>(), n); break;
    case at::kBFloat16: unpack(q, a, c, out.data_ptr<c10::BFloat16>(), n); break;
    case at::kHalf: unpack(q, a, c, out.data_ptr<c10::Half>(), n); break;
    default: TORCH_CHECK(false, "nf4_unpack_: out must be float32, bfloat16 or float16");
  }
}
