// MDWA's windowed attention on the CPU with the skipped tiles never computed: an online-softmax
// (flash) loop over, per block of query rows, only the key tiles a window touches.
//
// The windows arrive as two things the Python side derives from them (lowbit/lowering/windowed_attention.py):
//   tiles [H, Lq/T, Lk/T]: per head and T x T tile, 0 (outside every window: skipped), 1 (a window edge
//     crosses it: masked entry by entry), 2 (inside: computed unmasked);
//   row_lo, row_hi, col_lo, col_hi [H, Lk]: per key, the query rows and columns (of the queries' grid,
//     q_cols wide) that keep it — window_keep's arithmetic, evaluated only on edge tiles.
// Both products run through ATen's float32 brgemm; per block of query rows the logits stay in cache.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "row_softmax.h"

namespace {

namespace blas = at::native::cpublas;

constexpr int64_t kRunKeys = 512;  // keys per q kᵀ / P V call: a run of consecutive tiles of one kind
constexpr float kMinusInf = -std::numeric_limits<float>::infinity();

// A row stride of at least n floats that is not a multiple of 4 KiB (a power-of-two stride makes
// the rows of a block alias in cache: 3x per GEMM call measured in integer_attention.cpp).
int64_t unaliased_stride(int64_t n) {
  const int64_t stride = (n + 15) / 16 * 16;
  return stride % 1024 == 0 ? stride + 16 : stride;
}

// The keys of one head that a window edge may drop: a query (row r, column c of its grid) keeps key j
// iff row_lo[j] <= r <= row_hi[j] and col_lo[j] <= c <= col_hi[j].
struct KeepIntervals {
  const int32_t *row_lo, *row_hi, *col_lo, *col_hi;

  // logits[x] of keys k0 + x, x < n, that query (r, c) does not keep become -inf.
  void mask(float* logits, int64_t k0, int64_t n, int32_t r, int32_t c) const {
    const int32_t *rl = row_lo + k0, *rh = row_hi + k0, *cl = col_lo + k0, *ch = col_hi + k0;
    for (int64_t x = 0; x < n; ++x) {
      const bool keep = (rl[x] <= r) & (r <= rh[x]) & (cl[x] <= c) & (c <= ch[x]);
      logits[x] = keep ? logits[x] : kMinusInf;
    }
  }
};

// One query row's running softmax: its peak logit (unscaled) and the sum of exponentials so far.
struct RunningRow {
  float peak = kMinusInf, total = 0.0f;

  // logits[0, n) (unscaled) become exp((logit - new peak) * scale); returns the factor that rescales
  // what was accumulated under the old peak.
  float absorb(float* logits, int64_t n, float scale) {
    const float new_peak = std::max(peak, lowbit::row_peak(logits, n));
    if (new_peak == kMinusInf) {  // nothing kept yet in this row
      std::fill(logits, logits + n, 0.0f);
      return 1.0f;
    }
    const float sum = lowbit::exponentiate(logits, n, new_peak, scale);
    const float rescale = std::exp((peak - new_peak) * scale);  // 0 while peak is -inf
    total = total * rescale + sum;
    peak = new_peak;
    return rescale;
  }
};

at::Tensor windowed_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                              const at::Tensor& tiles, const at::Tensor& row_lo, const at::Tensor& row_hi,
                              const at::Tensor& col_lo, const at::Tensor& col_hi, int64_t q_cols, int64_t tile) {
  // q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv] float32 (any strides but the last); tiles int8
  // [H, ceil(Lq / tile), ceil(Lk / tile)]; the keep intervals int32 [H, Lk]. Returns [B, H, Lq, Dv].
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "windowed_attention takes (batch, heads, tokens, dim)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "windowed_attention takes float32");
  const int64_t batch = q.size(0), heads = q.size(1), queries = q.size(2), dim = q.size(3), keys = k.size(2),
                vdim = v.size(3);
  TORCH_CHECK(tile > 0 && tile <= kRunKeys, "windowed_attention: tile must lie in [1, ", kRunKeys, "], got ", tile);
  const int64_t q_tiles = (queries + tile - 1) / tile, k_tiles = (keys + tile - 1) / tile;
  TORCH_CHECK(tiles.scalar_type() == at::kChar && tiles.dim() == 3 && tiles.size(0) == heads && tiles.size(1) == q_tiles &&
                  tiles.size(2) == k_tiles, "windowed_attention: tiles must be int8 [heads, query tiles, key tiles]");
  for (const at::Tensor* t : {&row_lo, &row_hi, &col_lo, &col_hi}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == 2 && t->size(0) == heads && t->size(1) == keys,
                "windowed_attention: keep intervals must be int32 [heads, keys]");
  }
  auto last_contiguous = [](const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); };
  const at::Tensor qx = last_contiguous(q), kx = last_contiguous(k), vx = last_contiguous(v);
  const at::Tensor tile_kinds = tiles.contiguous(), rl = row_lo.contiguous(), rh = row_hi.contiguous(),
                   cl = col_lo.contiguous(), ch = col_hi.contiguous();
  auto out = at::empty({batch, heads, queries, vdim}, q.options());
  const float* qp = qx.data_ptr<float>();
  const float* kp = kx.data_ptr<float>();
  const float* vp = vx.data_ptr<float>();
  const int8_t* kinds = tile_kinds.data_ptr<int8_t>();
  float* op = out.data_ptr<float>();
  const int64_t k_ld = unaliased_stride(keys), logit_ld = unaliased_stride(kRunKeys);
  const float softmax_scale = static_cast<float>(scale);

  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> k_t(dim * k_ld), logits(tile * logit_ld), acc(tile * vdim);
    std::vector<RunningRow> running(tile);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const float* qh = qp + b * qx.stride(0) + h * qx.stride(1);
      const float* kh = kp + b * kx.stride(0) + h * kx.stride(1);
      const float* vh = vp + b * vx.stride(0) + h * vx.stride(1);
      for (int64_t j = 0; j < keys; ++j) {  // kᵀ [D, Lk]: q kᵀ's B operand
        for (int64_t d = 0; d < dim; ++d) k_t[d * k_ld + j] = kh[j * kx.stride(2) + d];
      }
      const KeepIntervals keep{rl.data_ptr<int32_t>() + h * keys, rh.data_ptr<int32_t>() + h * keys,
                               cl.data_ptr<int32_t>() + h * keys, ch.data_ptr<int32_t>() + h * keys};
      for (int64_t qt = 0; qt < q_tiles; ++qt) {
        const int64_t row0 = qt * tile, rows = std::min(tile, queries - row0);
        const int8_t* kind = kinds + (h * q_tiles + qt) * k_tiles;
        std::fill(acc.begin(), acc.end(), 0.0f);
        std::fill(running.begin(), running.end(), RunningRow{});
        for (int64_t first = 0; first < k_tiles;) {
          if (kind[first] == 0) {
            ++first;
            continue;
          }
          int64_t last = first + 1;  // a run: consecutive tiles of one kind, at most kRunKeys keys
          while (last < k_tiles && kind[last] == kind[first] && (last - first + 1) * tile <= kRunKeys) ++last;
          const int64_t k0 = first * tile, n = std::min(last * tile, keys) - k0;
          const bool edge = kind[first] == 1;
          first = last;
          blas::brgemm(rows, n, dim, qx.stride(2), k_ld, logit_ld, false, qh + row0 * qx.stride(2), k_t.data() + k0,
                       logits.data(), false);
          for (int64_t r = 0; r < rows; ++r) {
            float* row = logits.data() + r * logit_ld;
            const int64_t query = row0 + r;
            if (edge) keep.mask(row, k0, n, static_cast<int32_t>(query / q_cols), static_cast<int32_t>(query % q_cols));
            const float rescale = running[r].absorb(row, n, softmax_scale);
            float* a = acc.data() + r * vdim;
            for (int64_t d = 0; d < vdim; ++d) a[d] *= rescale;
          }
          blas::brgemm(rows, vdim, n, logit_ld, vx.stride(2), vdim, true, logits.data(), vh + k0 * vx.stride(2),
                       acc.data(), false);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const float total = running[r].total;
          const float inv = total > 0.0f ? 1.0f / total : 0.0f;  // a row no window keeps anything of: zeros
          float* o = op + ((b * heads + h) * queries + row0 + r) * vdim;
          for (int64_t d = 0; d < vdim; ++d) o[d] = acc[r * vdim + d] * inv;
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit_native, m) {
  m.def("windowed_attention(Tensor q, Tensor k, Tensor v, float scale, Tensor tiles, Tensor row_lo, Tensor row_hi, "
        "Tensor col_lo, Tensor col_hi, int q_cols, int tile) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit_native, CPU, m) { m.impl("windowed_attention", &windowed_attention); }
