// Quantized attention on integer codes, one block of query rows at a time, on the CPU's bf16 matrix
// units (AMX / AVX512-BF16, through ATen's brgemm).
//
// q, k and v arrive before their quantizers, with the quantizers' grids; the kernel quantizes them to
// their codes c - z (at most 255 in magnitude, exact in bf16), so both products are integer sums,
// exact in the float32 accumulators of a bf16 GEMM:
//   logits[i, j] = scale * s_q[i] * s_k[j] * sum_d q[i, d] k[j, d]
//   out[i]       = s_v * s_p * sum_j P[i, j] v[j]  (+ the start-token column in full precision)
// where P holds the probability codes: c - z on a uniform grid, 2^-c on a log2 grid (both exact in
// bf16). Per block of query rows the logits, the softmax and the quantizer stay in cache: no L x L
// matrix is written. The arithmetic is lowbit.quantized_attention's (lowbit/ir/ops.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "row_softmax.h"

namespace {

using at::BFloat16;
using Vec = at::vec::Vectorized<float>;
namespace blas = at::native::cpublas;

constexpr int64_t kLogitBytes = 512 * 1024;  // a block of query rows' logits, kept in L2
constexpr int64_t kKeys = 512;    // keys per P V GEMM call
constexpr int64_t kColumns = 64;  // columns per packed block of a B operand, as the brgemm kernels take them
constexpr int64_t kValueColumns = 16;  // value dims are padded to a multiple of this
constexpr int64_t kSkew = 32;     // row padding of the block buffers: a power-of-two row stride thrashes the cache
constexpr float kTiny = 1e-30f;   // lowbit.ir.ops.TINY

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// A (B, H, L, ...) tensor's row `row` of head t = b * H + h, through its strides (broadcast views included).
struct Rows {
  const float* data;
  int64_t heads, batch_stride, head_stride, row_stride;

  explicit Rows(const at::Tensor& x)
      : data(x.data_ptr<float>()), heads(x.size(1)), batch_stride(x.stride(0)), head_stride(x.stride(1)), row_stride(x.stride(2)) {}
  const float* at(int64_t t, int64_t row = 0) const {
    return data + (t / heads) * batch_stride + (t % heads) * head_stride + row * row_stride;
  }
};

// The bf16 bit patterns of values bf16 holds exactly (the codes: integers of at most 256 in magnitude,
// powers of two) in the low halves of 32-bit lanes: their float patterns' high halves, with none of a
// rounding conversion's work.
__m512i bf16_bits(Vec x) { return _mm512_srli_epi32(_mm512_castps_si512(__m512(x)), 16); }

// x's first n lanes, exact in bf16, stored as bf16.
void store_exact(Vec x, BFloat16* out, int64_t n = Vec::size()) {
  _mm512_mask_cvtepi32_storeu_epi16(out, n == Vec::size() ? __mmask16(0xffff) : lowbit::first_lanes(n), bf16_bits(x));
}

// out[j] <- code(row[j]) over [0, n). Whole pairs of vectors pack together into one store (two
// shuffles where two narrowing stores take four).
template <typename Code>
void store_codes(const float* row, BFloat16* out, int64_t n, Code code) {
  const __m512i in_order = _mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0);  // undoes packus's per-lane interleave
  int64_t j = 0;
  for (; j + 2 * Vec::size() <= n; j += 2 * Vec::size()) {
    const __m512i pair = _mm512_packus_epi32(bf16_bits(code(Vec::loadu(row + j))), bf16_bits(code(Vec::loadu(row + j + Vec::size()))));
    _mm512_storeu_si512(out + j, _mm512_permutexvar_epi64(in_order, pair));
  }
  for (; j + Vec::size() <= n; j += Vec::size()) store_exact(code(Vec::loadu(row + j)), out + j);
  if (j < n) store_exact(code(Vec(_mm512_maskz_loadu_ps(lowbit::first_lanes(n - j), row + j))), out + j, n - j);
}

// An operand before its quantizer: values x [B, H, L, D], the scale and zero point of each row [B, H, L], the grid.
struct Operand {
  Rows x, scale, zero_point;
  float qmin, qmax;

  // The codes clamp(round(x / s) + z, qmin, qmax) - z of head t's `rows` rows of `cols` values into the
  // rows of out (row stride ld, the rest of each row zero).
  void codes(int64_t t, int64_t rows, int64_t cols, BFloat16* out, int64_t ld) const {
    const Vec lo(qmin), hi(qmax);
    for (int64_t r = 0; r < rows; ++r) {
      const Vec s(*scale.at(t, r)), z(*zero_point.at(t, r));
      store_codes(x.at(t, r), out + r * ld, cols, [&](Vec v) { return at::vec::clamp((v / s).round() + z, lo, hi) - z; });
      std::fill(out + r * ld + cols, out + (r + 1) * ld, static_cast<BFloat16>(0.0f));
    }
  }
};

// The width of the packed column block starting at column b of n (n a multiple of kValueColumns).
int64_t block_width(int64_t b, int64_t n) { return std::min(kColumns, n - b); }

// A B operand [K, N] (row stride ld) in the VNNI layout brgemm reads: blocks of up to 64 columns one after another.
void pack_columns(const BFloat16* in, BFloat16* out, int64_t k, int64_t n, int64_t ld) {
  for (int64_t b = 0; b < n; b += kColumns) {
    const int64_t width = block_width(b, n);
    blas::pack(k, width, ld, width, at::kBFloat16, at::kBFloat16, in + b, out + b * k);
  }
}

// row[j] <- exp(logit_j - max logit) with logit_j = row[j] * row_factor * cols[j] (one scale per key);
// returns the sum (softmax's denominator).
float exponentials(float* row, const float* cols, float row_factor, int64_t keys) {
  const int64_t whole = keys - keys % Vec::size();
  const Vec factor(row_factor);
  for (int64_t j = 0; j < whole; j += Vec::size()) (Vec::loadu(row + j) * factor * Vec::loadu(cols + j)).store(row + j);
  for (int64_t j = whole; j < keys; ++j) row[j] = row[j] * row_factor * cols[j];
  return lowbit::exponentiate(row, keys, lowbit::row_peak(row, keys), 1.0f);
}

// peaks[r] <- the lane-wise max of peaks[r] and the first `width` (<= 64) values of each row r of a
// block of products just written by a GEMM call, while they are in L1: a separate pass over the
// row would read it from L2, and took a fifth of the softmax's time.
void running_peaks(const float* block, int64_t rows, int64_t ld, int64_t width, __m512* peaks) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = block + r * ld;
    __m512 peak = peaks[r];
    for (int64_t j = 0; j < width; j += lowbit::kLanes) {
      const __mmask16 lanes = j + lowbit::kLanes <= width ? __mmask16(0xffff) : lowbit::first_lanes(width - j);
      peak = _mm512_mask_max_ps(peak, lanes, peak, _mm512_maskz_loadu_ps(lanes, row + j));
    }
    peaks[r] = peak;
  }
}

// The probability grid: uniform codes c - z, or log2 codes as the values 2^-c (s_p is applied after the GEMM).
struct Grid {
  bool log2;
  float scale, zero_point, qmin, qmax;

  // out[j] <- the code of p = row[j] / total, i.e. of p / s_p (the grid's constants held in registers).
  void codes(const float* row, float total, BFloat16* out, int64_t keys) const {
    const Vec inv(1.0f / (total * scale)), zero(zero_point), lo(qmin), hi(qmax), tiny(kTiny), none(0.0f);
    if (log2) {
      store_codes(row, out, keys, [&](Vec x) {
        return at::vec::clamp(at::vec::maximum(x * inv, tiny).log2().neg().round(), none, hi).neg().exp2();
      });
    } else {
      store_codes(row, out, keys, [&](Vec x) { return at::vec::clamp((x * inv).round() + zero, lo, hi) - zero; });
    }
  }
};

at::Tensor integer_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_scale,
                             const at::Tensor& q_zero_point, const at::Tensor& k_scale, const at::Tensor& k_zero_point,
                             const at::Tensor& v_scale, const at::Tensor& v_zero_point, at::IntArrayRef grids, double scale,
                             double probs_scale, double probs_zero_point, bool log2_grid, int64_t probs_qmin,
                             int64_t probs_qmax, int64_t start_token) {
  // q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv] float32 before their quantizers (any strides but the
  // last); their scales and zero points [B, H, L] (broadcast views allowed; v's one value); grids: the
  // (qmin, qmax) of q, k and v. Returns [B, Lq, H, Dv].
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && grids.size() == 6, "integer_attention: bad arguments");
  for (const at::Tensor* x : {&q, &k, &v, &q_scale, &q_zero_point, &k_scale, &k_zero_point, &v_scale, &v_zero_point}) {
    TORCH_CHECK(x->scalar_type() == at::kFloat, "integer_attention takes float32");
  }
  auto last_contiguous = [](const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); };
  auto rows_of = [](const at::Tensor& x) { return Rows(x.unsqueeze(-1)); };  // a view: x keeps its storage alive
  const at::Tensor qx = last_contiguous(q), kx = last_contiguous(k), vx = last_contiguous(v);  // alive while Rows read them
  const Operand qo{Rows(qx), rows_of(q_scale), rows_of(q_zero_point), float(grids[0]), float(grids[1])};
  const Operand ko{Rows(kx), rows_of(k_scale), rows_of(k_zero_point), float(grids[2]), float(grids[3])};
  const Operand vo{Rows(vx), rows_of(v_scale), rows_of(v_zero_point), float(grids[4]), float(grids[5])};
  const int64_t heads = q.size(0) * q.size(1), queries = q.size(2), dim = q.size(3), keys = k.size(2), vdim = v.size(3);
  const int64_t qk_dim = round_up(dim, 2), padded = round_up(keys, kColumns), vdim_padded = round_up(vdim, kValueColumns);
  const bool one_key_scale = k_scale.stride(0) == 0 && k_scale.stride(1) == 0 && k_scale.stride(2) == 0;
  const float v_step = *vo.scale.at(0);
  auto bf16 = q.options().dtype(at::kBFloat16);
  auto q_codes = at::empty({heads, queries, qk_dim}, bf16), k_codes = at::empty({heads, padded, qk_dim}, bf16);
  auto v_codes = at::empty({heads, padded, vdim_padded}, bf16);
  k_codes.narrow(1, keys, padded - keys).zero_();  // keys up to a whole column block; the codes fill the rest
  v_codes.narrow(1, keys, padded - keys).zero_();
  BFloat16 *qc = q_codes.data_ptr<BFloat16>(), *kc = k_codes.data_ptr<BFloat16>(), *vc = v_codes.data_ptr<BFloat16>();
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      qo.codes(t, queries, dim, qc + t * queries * qk_dim, qk_dim);
      ko.codes(t, keys, dim, kc + t * padded * qk_dim, qk_dim);
      vo.codes(t, keys, vdim, vc + t * padded * vdim_padded, vdim_padded);
    }
  });
  auto kT_codes = k_codes.transpose(1, 2).contiguous();  // q kᵀ's B operand [D, Lk]
  auto k_packed = at::empty_like(kT_codes), v_packed = at::empty_like(v_codes);
  BFloat16 *kt = kT_codes.data_ptr<BFloat16>(), *kpp = k_packed.data_ptr<BFloat16>(), *vpp = v_packed.data_ptr<BFloat16>();
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      pack_columns(kt + t * qk_dim * padded, kpp + t * qk_dim * padded, qk_dim, padded, padded);
      for (int64_t c = 0; c < padded; c += kKeys) {
        const int64_t at = (t * padded + c) * vdim_padded;
        pack_columns(vc + at, vpp + at, std::min(kKeys, padded - c), vdim_padded, vdim_padded);
      }
    }
  });
  auto cols = one_key_scale ? at::Tensor() : at::zeros({heads, padded}, q.options());
  if (!one_key_scale) cols.narrow(1, 0, keys).view({q.size(0), q.size(1), keys}).copy_(k_scale.expand({q.size(0), q.size(1), keys}));
  const float* colp = one_key_scale ? nullptr : cols.data_ptr<float>();
  auto out = at::empty({q.size(0), queries, q.size(1), vdim}, q.options());  // tokens before heads: the layout
  float* outp = out.data_ptr<float>();                                         // the output projection reads

  const Grid grid{log2_grid, static_cast<float>(probs_scale), static_cast<float>(probs_zero_point),
                  static_cast<float>(probs_qmin), static_cast<float>(probs_qmax)};
  const float out_scale = v_step * static_cast<float>(probs_scale);
  const int64_t block_rows = std::clamp<int64_t>(kLogitBytes / (padded * 4) / 16 * 16, 16, 128);
  const int64_t blocks = (queries + block_rows - 1) / block_rows;

  at::parallel_for(0, heads * blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t ld = padded + kSkew;
    std::vector<float> logits(block_rows * ld), acc(block_rows * vdim_padded), start_prob(block_rows);
    std::vector<BFloat16> probs(block_rows * ld);
    std::vector<__m512> peaks(block_rows);  // of each row's products, with one key scale
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / blocks, row0 = (task % blocks) * block_rows, rows = std::min(block_rows, queries - row0);
      std::fill(peaks.begin(), peaks.end(), _mm512_set1_ps(-std::numeric_limits<float>::infinity()));
      for (int64_t b = 0; b < padded; b += kColumns) {
        blas::brgemm(rows, kColumns, qk_dim, qk_dim, kColumns, ld, false, qc + (t * queries + row0) * qk_dim,
                     kpp + t * qk_dim * padded + b * qk_dim, logits.data() + b);
        if (one_key_scale) running_peaks(logits.data() + b, rows, ld, std::min(kColumns, keys - b), peaks.data());
      }
      const float key_factor = one_key_scale ? *ko.scale.at(0) : 1.0f;
      for (int64_t r = 0; r < rows; ++r) {
        float* row = logits.data() + r * ld;
        BFloat16* code = probs.data() + r * ld;
        const float row_factor = static_cast<float>(scale) * *qo.scale.at(t, row0 + r) * key_factor;
        // with one key scale, row_factor > 0 turns products into logits, so the largest product gives the peak
        const float total = one_key_scale ? lowbit::exponentiate(row, keys, _mm512_reduce_max_ps(peaks[r]), row_factor)
                                          : exponentials(row, colp + t * padded, row_factor, keys);
        if (start_token >= 0) start_prob[r] = row[start_token] / total;
        grid.codes(row, total, code, keys);
        std::fill(code + keys, code + padded, static_cast<BFloat16>(0.0f));
        if (start_token >= 0) code[start_token] = static_cast<BFloat16>(0.0f);
      }
      for (int64_t c = 0; c < padded; c += kKeys) {
        const int64_t n = std::min(kKeys, padded - c);
        const BFloat16* v_chunk = vpp + (t * padded + c) * vdim_padded;
        for (int64_t b = 0; b < vdim_padded; b += kColumns) {
          const int64_t width = block_width(b, vdim_padded);
          blas::brgemm(rows, width, n, ld, width, vdim_padded, c > 0, probs.data() + c, v_chunk + b * n, acc.data() + b);
        }
      }
      const BFloat16* v_start = vc + (t * padded + std::max<int64_t>(start_token, 0)) * vdim_padded;  // its codes
      for (int64_t r = 0; r < rows; ++r) {
        float* o = outp + (((t / q.size(1)) * queries + row0 + r) * q.size(1) + t % q.size(1)) * vdim;
        for (int64_t d = 0; d < vdim; ++d) {
          const float start = start_token >= 0 ? start_prob[r] * (static_cast<float>(v_start[d]) * v_step) : 0.0f;
          o[d] = acc[r * vdim_padded + d] * out_scale + start;
        }
      }
    }
    blas::brgemm_release();
  });
  return out;
}

bool has_bf16_brgemm() { return blas::could_pack(at::kBFloat16); }

}  // namespace

TORCH_LIBRARY(lowbit_native, m) {
  m.def("integer_attention(Tensor q, Tensor k, Tensor v, Tensor q_scale, Tensor q_zero_point, Tensor k_scale, "
        "Tensor k_zero_point, Tensor v_scale, Tensor v_zero_point, int[] grids, float scale, float probs_scale, "
        "float probs_zero_point, bool log2_grid, int probs_qmin, int probs_qmax, int start_token) -> Tensor");
  m.def("has_bf16_brgemm() -> bool");
}

TORCH_LIBRARY_IMPL(lowbit_native, CPU, m) { m.impl("integer_attention", &integer_attention); }

TORCH_LIBRARY_IMPL(lowbit_native, CompositeExplicitAutograd, m) { m.impl("has_bf16_brgemm", &has_bf16_brgemm); }
