// W4A8 linear on the CPU's int8 matrix units with the weight kept at half a byte per value.
//
// The weight stays packed two per byte in memory; each block of 64 output channels is unpacked to
// int8 in cache right before the GEMMs that read it, and the product runs on ATen's u8 x s8 brgemm
// (AMX or AVX512-VNNI) with int32 accumulation:
//   y[m, n] = s_x[m] * s_w[n] * (sum_k c[m, k] w[n, k] - z[m] * sum_k w[n, k]) + b[n]
// c: the input's uint8 codes with zero point z (per row, or one for all), w: the int4 weight.
// Optionally GELU is applied to y and y is written as the next layer's uint8 codes (a transformer MLP's
// linear -> GELU -> linear as one call: the float activations between the two never exist).
//
// The packed weight arrives in the order the brgemm reads it (int4_linear.py makes that copy once
// per weight, also half a byte per value): per block of 64 channels, per group of 4 input channels,
// per channel, the 4 values as 2 bytes (low nibble first). Unpacking is then a straight expansion
// of consecutive bytes into the VNNI layout [K/4][64][4].

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
namespace blas = at::native::cpublas;

constexpr int64_t kChannels = 64;  // output channels per weight block: the brgemm's B block width
constexpr int64_t kRows = 32;      // input rows per brgemm call: the fastest of 16 to 512 tried by hand on the PixArt block
constexpr int64_t kRowsPerTask = 256;  // rows that share one unpacked weight block

// Two's complement 4-bit values, two per byte (low nibble first), into int8.
void unpack(const uint8_t* in, int8_t* out, int64_t bytes) {
  for (int64_t i = 0; i < bytes; ++i) {
    const int b = in[i];
    out[2 * i] = static_cast<int8_t>(((b & 15) ^ 8) - 8);
    out[2 * i + 1] = static_cast<int8_t>(((b >> 4) ^ 8) - 8);
  }
}

enum Gelu : int64_t { kNoGelu = 0, kErf = 1, kTanh = 2 };

// GELU of x[0, 64), exact (erf) or tanh-approximated, as torch's.
void gelu(float* x, int64_t kind) {
  const Vec half(0.5f), one(1.0f), inv_sqrt2(static_cast<float>(M_SQRT1_2)), c(0.7978845608028654f), cube(0.044715f);
  for (int64_t j = 0; j < kChannels; j += Vec::size()) {
    const Vec v = Vec::loadu(x + j);
    const Vec inner = kind == kErf ? (v * inv_sqrt2).erf() : (c * (v + cube * v * v * v)).tanh();
    (half * v * (one + inner)).store(x + j);
  }
}

at::Tensor int4_linear(const at::Tensor& codes, const at::Tensor& blocks, const at::Tensor& weight_scale,
                       const at::Tensor& weight_sum, const at::Tensor& input_scale, const at::Tensor& input_zero_point,
                       const c10::optional<at::Tensor>& bias, int64_t out_features, int64_t gelu_kind,
                       c10::optional<double> output_scale, double output_zero_point, int64_t output_qmin, int64_t output_qmax) {
  // codes uint8 [M, K] (K a multiple of 4); blocks uint8 [ceil(N / 64), K / 4, 64, 2] (the packed weight in
  // brgemm order, channels past N zero); weight_scale float [N]; weight_sum int32 [N]; input_scale and
  // input_zero_point float [M]; bias float [N] or none. gelu_kind: 0 none, 1 erf, 2 tanh. Returns float
  // [M, N], or with output_scale the uint8 codes clamp(round(y / s) + z, qmin, qmax) - qmin.
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.is_contiguous(),
              "int4_linear: codes must be contiguous uint8 [rows, K]");
  const int64_t rows = codes.size(0), k = codes.size(1), n = out_features, n_blocks = (n + kChannels - 1) / kChannels;
  TORCH_CHECK(k % 4 == 0, "int4_linear: K must be a multiple of 4, got ", k);
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.is_contiguous() && blocks.dim() == 4 && blocks.size(0) == n_blocks &&
                  blocks.size(1) == k / 4 && blocks.size(2) == kChannels && blocks.size(3) == 2,
              "int4_linear: the weight blocks do not fit K = ", k, " and N = ", n);
  for (const at::Tensor* t : {&weight_scale, &input_scale, &input_zero_point}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "int4_linear: scales and zero points must be float32");
  }
  TORCH_CHECK(weight_sum.scalar_type() == at::kInt && weight_sum.numel() == n && weight_scale.numel() == n &&
                  input_scale.numel() == rows && input_zero_point.numel() == rows,
              "int4_linear: one weight scale and sum per channel, one input scale and zero point per row");
  const float* bias_data = nullptr;
  at::Tensor bias_float;
  if (bias.has_value() && bias->defined()) {
    bias_float = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias_float.numel() == n, "int4_linear: one bias per channel");
    bias_data = bias_float.data_ptr<float>();
  }
  TORCH_CHECK(gelu_kind >= kNoGelu && gelu_kind <= kTanh, "int4_linear: gelu_kind must be 0, 1 or 2");
  TORCH_CHECK(!output_scale.has_value() || (output_qmin >= 0 && output_qmax - output_qmin <= 255),
              "int4_linear: output codes need a grid of at most 256 levels in [0, ...)");
  const bool codes_out = output_scale.has_value();
  auto out = at::empty({rows, n}, codes.options().dtype(codes_out ? at::kByte : at::kFloat));
  const uint8_t* a = codes.data_ptr<uint8_t>();
  const uint8_t* packed = blocks.data_ptr<uint8_t>();
  const float *ws = weight_scale.data_ptr<float>(), *xs = input_scale.data_ptr<float>(), *xz = input_zero_point.data_ptr<float>();
  const int32_t* wsum = weight_sum.data_ptr<int32_t>();
  float* y = codes_out ? nullptr : out.data_ptr<float>();
  uint8_t* y_codes = codes_out ? out.data_ptr<uint8_t>() : nullptr;
  const float inv_out_scale = codes_out ? static_cast<float>(1.0 / *output_scale) : 0.0f, out_zero = output_zero_point;
  const float out_lo = output_qmin, out_hi = output_qmax;
  const int64_t row_tasks = (rows + kRowsPerTask - 1) / kRowsPerTask, block_bytes = k / 4 * kChannels * 2;

  at::parallel_for(0, n_blocks * row_tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> weight(k * kChannels);
    std::vector<int32_t> acc(kRows * kChannels);
    int64_t unpacked = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task / row_tasks, first_row = (task % row_tasks) * kRowsPerTask;
      if (block != unpacked) {
        unpack(packed + block * block_bytes, weight.data(), block_bytes);
        unpacked = block;
      }
      const int64_t n0 = block * kChannels, width = std::min(kChannels, n - n0);
      float channel_scale[kChannels] = {}, channel_sum[kChannels] = {}, channel_bias[kChannels] = {};
      for (int64_t j = 0; j < width; ++j) {
        channel_scale[j] = ws[n0 + j];
        channel_sum[j] = static_cast<float>(wsum[n0 + j]);
        channel_bias[j] = bias_data ? bias_data[n0 + j] : 0.0f;
      }
      const int64_t last_row = std::min(rows, first_row + kRowsPerTask);
      for (int64_t m0 = first_row; m0 < last_row; m0 += kRows) {
        const int64_t m = std::min(kRows, last_row - m0);
        blas::brgemm(m, kChannels, k, k, kChannels, kChannels, false, a + m0 * k, weight.data(), acc.data());
        for (int64_t r = 0; r < m; ++r) {  // the epilogue, in branch-free loops that vectorize
          const float row_scale = xs[m0 + r], row_zero = xz[m0 + r];
          const int32_t* c = acc.data() + r * kChannels;
          float value[kChannels];
          for (int64_t j = 0; j < kChannels; ++j) {
            value[j] = row_scale * channel_scale[j] * (static_cast<float>(c[j]) - row_zero * channel_sum[j]) + channel_bias[j];
          }
          if (gelu_kind != kNoGelu) gelu(value, gelu_kind);
          if (codes_out) {
            const Vec inv(inv_out_scale), zero(out_zero), lo(out_lo), hi(out_hi);
            for (int64_t j = 0; j < kChannels; j += Vec::size()) {
              (at::vec::clamp((Vec::loadu(value + j) * inv).round() + zero, lo, hi) - lo).store(value + j);
            }
            uint8_t* o = y_codes + (m0 + r) * n + n0;
            for (int64_t j = 0; j < width; ++j) o[j] = static_cast<uint8_t>(value[j]);
          } else {
            std::copy(value, value + width, y + (m0 + r) * n + n0);
          }
        }
      }
    }
    blas::brgemm_release();
  });
  return out;
}

bool has_int8_brgemm() { return blas::could_pack(at::kChar); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit_native, m) {
  m.def("int4_linear(Tensor codes, Tensor blocks, Tensor weight_scale, Tensor weight_sum, Tensor input_scale, "
        "Tensor input_zero_point, Tensor? bias, int out_features, int gelu_kind, float? output_scale, "
        "float output_zero_point, int output_qmin, int output_qmax) -> Tensor");
  m.def("has_int8_brgemm() -> bool");
}

TORCH_LIBRARY_IMPL(lowbit_native, CPU, m) { m.impl("int4_linear", &int4_linear); }

TORCH_LIBRARY_IMPL(lowbit_native, CompositeExplicitAutograd, m) { m.impl("has_int8_brgemm", &has_int8_brgemm); }
