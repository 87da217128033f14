// The decode step's elementwise work in one pass each (infer/decode.py), on its transposed activations (features, B):
// in torch, an RMSNorm is seven ops and a rotary embedding seven more, ~5 us each on this CPU, 61 and 60 of them a
// step for SmolLM2. Same math as transformers' Llama modules in float32, up to the order of a sum.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

// weight[h] * (x[h, b] / sqrt(mean_h x[h, b]^2 + eps)): x (H, B) float32 contiguous, weight (H,); a new (H, B).
torch::Tensor rms_t(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && x.is_contiguous() &&
              weight.is_contiguous() && x.dim() == 2 && weight.size(0) == x.size(0), "rms_t: float32 (H, B), (H,)");
  const int64_t H = x.size(0), B = x.size(1);
  auto out = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float *op = out.data_ptr<float>();
  std::vector<float> r(B, 0.f);
  for (int64_t h = 0; h < H; ++h)
#pragma omp simd
    for (int64_t b = 0; b < B; ++b) r[b] += xp[h * B + b] * xp[h * B + b];
  for (int64_t b = 0; b < B; ++b) r[b] = 1.f / std::sqrt(r[b] / static_cast<float>(H) + static_cast<float>(eps));
  for (int64_t h = 0; h < H; ++h) {
    const float w = wp[h];
#pragma omp simd
    for (int64_t b = 0; b < B; ++b) op[h * B + b] = w * (xp[h * B + b] * r[b]);
  }
  return out;
}

// The rotate-half rotary embedding of every head of t (heads·hd, B): out[i] = t[i] cos[i] + t'[i] sin[i] with
// t'[i] = -t[i + hd/2] for i < hd/2, t[i - hd/2] after; cos and sin (hd, B), float32 contiguous; a new (heads·hd, B).
torch::Tensor rotary_t(torch::Tensor t, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
              t.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(), "rotary_t: float32, contiguous");
  const int64_t hd = cos.size(0), B = cos.size(1), heads = t.size(0) / hd, half = hd / 2;
  TORCH_CHECK(t.size(0) == heads * hd && t.size(1) == B && sin.sizes() == cos.sizes() && hd % 2 == 0,
              "rotary_t: t (heads·hd, B), cos and sin (hd, B)");
  auto out = torch::empty_like(t);
  const float *tp = t.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float *op = out.data_ptr<float>();
  for (int64_t head = 0; head < heads; ++head) {
    const float *th = tp + head * hd * B;
    float *oh = op + head * hd * B;
    for (int64_t i = 0; i < hd; ++i) {
      const float *other = th + (i < half ? i + half : i - half) * B;
      const float sign = i < half ? -1.f : 1.f;
#pragma omp simd
      for (int64_t b = 0; b < B; ++b) oh[i * B + b] = th[i * B + b] * cp[i * B + b] + sign * other[b] * sp[i * B + b];
    }
  }
  return out;
}
