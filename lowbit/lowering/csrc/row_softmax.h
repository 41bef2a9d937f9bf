// The two passes of a softmax over one row of logits that lowbit's attention kernels share, vectorized
// with ATen's types at the width the kernels are built for.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace lowbit {

using Vec = at::vec::Vectorized<float>;

// The largest of row[0, n) (-inf for an empty or fully masked row).
inline float row_peak(const float* row, int64_t n) {
  const int64_t whole = n - n % Vec::size();
  Vec peak_vec(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < whole; j += Vec::size()) peak_vec = at::vec::maximum(peak_vec, Vec::loadu(row + j));
  float peak = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, peak_vec);
  for (int64_t j = whole; j < n; ++j) peak = std::max(peak, row[j]);
  return peak;
}

// row[j] <- exp((row[j] - peak) * scale) over [0, n); returns their sum.
inline float exponentiate(float* row, int64_t n, float peak, float scale) {
  const int64_t whole = n - n % Vec::size();
  const Vec shift(peak), scaled(scale);
  Vec sum_vec(0.0f);
  for (int64_t j = 0; j < whole; j += Vec::size()) {
    const Vec e = ((Vec::loadu(row + j) - shift) * scaled).exp_u20();
    e.store(row + j);
    sum_vec = sum_vec + e;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sum_vec);
  for (int64_t j = whole; j < n; ++j) {
    row[j] = std::exp((row[j] - peak) * scale);
    sum += row[j];
  }
  return sum;
}

}  // namespace lowbit
