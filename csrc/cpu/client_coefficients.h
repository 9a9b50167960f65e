// Where the rotation pass leaves the coefficients w_i R_i that the aggregation multiplies each
// client's factor by (GroupParams::coef): R × R zero-padded matrices per (layer, client), and, for
// the buckets that run the AMX tile kernels, the same matrices again as bf16 hi/lo pairs laid out
// for tile products.

#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>

#include "align_aggregate.h"
#include "cpu/amx.h"

namespace fedrot {

namespace {  // internal linkage: see cpu/align_aggregate_cpu.cpp

// w_i R_i of one client of one layer (R × R, zero-padded).
template <typename acc_t, int R>
const acc_t* client_coef(const GroupParams& p, int32_t layer, int64_t client) {
  return static_cast<const acc_t*>(p.coef) + (int64_t(layer) * p.num_clients + client) * R * R;
}

// Whether layers of bucket R in scalar_t run the AMX tile kernels where their shapes allow: the
// aggregations, with the coefficients as bf16 pairs (aggregate_rows_t_amx, aggregate_rows_j_amx),
// and the covariances (tile_covariance).
template <typename scalar_t, int R>
constexpr bool kAmxBucket = kAmxBuilt && std::is_same_v<scalar_t, c10::BFloat16> && R >= 16;

// w_i R_i of one client of one layer as bf16 pairs along k for tile products, after all the R × R
// coefficients of the group (p.coef holds three times their size then). Four R²/2-word blocks:
// hi = bf16(C) and lo = bf16(C - hi) (hi + lo is C to about 2^-17 of C), each as word (k / 2, j)
// holding C[k][j] in its low half and C[k + 1][j] in its high half (the B aggregation's tiles),
// then both transposed, row j holding hi words k / 2 then lo words k / 2 (the A aggregation's: at
// R = 16 a row is one 64-byte tile row, so that one product takes hi and lo together).
template <int R>
uint32_t* client_coef_pairs(const GroupParams& p, int32_t layer, int64_t client) {
  uint32_t* pairs = reinterpret_cast<uint32_t*>(static_cast<float*>(p.coef) + int64_t(p.num_layers) * p.num_clients * R * R);
  return pairs + (int64_t(layer) * p.num_clients + client) * 2 * R * R;
}

template <int R>
void pack_coef_pairs(const float* C, uint32_t* pairs) {
  for (int k = 0; k < R; k += 2)
    for (int j = 0; j < R; ++j) {
      uint32_t hi[2], lo[2];
      for (int h = 0; h < 2; ++h) {
        const float c = C[(k + h) * R + j];
        const c10::BFloat16 rounded(c);
        hi[h] = rounded.x;
        lo[h] = c10::BFloat16(c - static_cast<float>(rounded)).x;
      }
      const uint32_t high = hi[0] | hi[1] << 16, low = lo[0] | lo[1] << 16;
      pairs[k / 2 * R + j] = high;
      pairs[R * R / 2 + k / 2 * R + j] = low;
      pairs[R * R + j * R + k / 2] = high;
      pairs[R * R + j * R + R / 2 + k / 2] = low;
    }
}

}  // namespace

}  // namespace fedrot
