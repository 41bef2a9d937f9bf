// The two passes of a softmax over one row of logits that lowbit's attention kernels share, in
// AVX512 intrinsics (the kernels are built for AVX512 hosts only; lowbit/lowering/native.py).

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace lowbit {

constexpr int64_t kLanes = 16;

// The mask of the first n < 16 lanes.
inline __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }

// The largest of row[0, n) (-inf for an empty or fully masked row). Four running maxima: one would
// wait on the previous max's latency at every vector.
inline float row_peak(const float* row, int64_t n) {
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 a = lowest, b = lowest, c = lowest, d = lowest;
  int64_t j = 0;
  for (; j + 4 * kLanes <= n; j += 4 * kLanes) {
    a = _mm512_max_ps(a, _mm512_loadu_ps(row + j));
    b = _mm512_max_ps(b, _mm512_loadu_ps(row + j + kLanes));
    c = _mm512_max_ps(c, _mm512_loadu_ps(row + j + 2 * kLanes));
    d = _mm512_max_ps(d, _mm512_loadu_ps(row + j + 3 * kLanes));
  }
  for (; j + kLanes <= n; j += kLanes) a = _mm512_max_ps(a, _mm512_loadu_ps(row + j));
  if (j < n) a = _mm512_mask_max_ps(a, first_lanes(n - j), a, _mm512_maskz_loadu_ps(first_lanes(n - j), row + j));
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(a, b), _mm512_max_ps(c, d)));
}

// 2^y for y <= 0 (-inf included), within 3e-7 relative: 2^round(y) (vscalefps) times a degree-5
// polynomial of the rest, fitted on [-1/2, 1/2] by least relative squares. Half the instructions of
// ATen's exp_u20, which the softmax passes spent most of their time in. Results below float's
// smallest normal are 0, never subnormal: arithmetic on subnormals takes a microcode assist per
// lane, which made a head with widely spread logits 6x slower (measured at 4096 keys).
inline __m512 exp2_nonpositive(__m512 y) {
  const __m512 lowest = _mm512_set1_ps(-125.0f);  // 2^-125 times p's least value, 2^-1/2, is still normal
  const __mmask16 normal = _mm512_cmp_ps_mask(y, lowest, _CMP_GE_OQ);
  y = _mm512_max_ps(y, lowest);
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, n);
  __m512 p = _mm512_set1_ps(0.001326698f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.009675469f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05550742f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022122f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69314694f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001f));
  return _mm512_maskz_scalef_ps(normal, p, n);
}

// row[j] <- exp((row[j] - peak) * scale) over [0, n), for row[j] <= peak (-inf allowed); returns their sum.
inline float exponentiate(float* row, int64_t n, float peak, float scale) {
  const __m512 shift = _mm512_set1_ps(peak), factor = _mm512_set1_ps(scale * static_cast<float>(M_LOG2E));
  auto exp_at = [&](__m512 x) { return exp2_nonpositive(_mm512_mul_ps(_mm512_sub_ps(x, shift), factor)); };
  __m512 sum = _mm512_setzero_ps(), other = _mm512_setzero_ps();  // two sums: one would wait on each add
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    const __m512 e = exp_at(_mm512_loadu_ps(row + j)), f = exp_at(_mm512_loadu_ps(row + j + kLanes));
    _mm512_storeu_ps(row + j, e);
    _mm512_storeu_ps(row + j + kLanes, f);
    sum = _mm512_add_ps(sum, e);
    other = _mm512_add_ps(other, f);
  }
  sum = _mm512_add_ps(sum, other);
  for (; j + kLanes <= n; j += kLanes) {
    const __m512 e = exp_at(_mm512_loadu_ps(row + j));
    _mm512_storeu_ps(row + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (j < n) {
    const __mmask16 tail = first_lanes(n - j);
    const __m512 e = exp_at(_mm512_maskz_loadu_ps(tail, row + j));
    _mm512_mask_storeu_ps(row + j, tail, e);
    sum = _mm512_mask_add_ps(sum, tail, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

}  // namespace lowbit
