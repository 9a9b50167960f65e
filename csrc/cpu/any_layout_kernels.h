// Staged rows for views in no dense layout (transposed or strided views) and for the rows the tile
// kernels leave: load_block copies kChunkRows rows at a time into a buffer in the accumulate type,
// which the covariance of such views (accumulate_covariance) and aggregate_rows_any then read.

#pragma once

#include <algorithm>
#include <cstdint>

#include "align_aggregate.h"
#include "cpu/client_coefficients.h"

namespace fedrot {

namespace {  // internal linkage: see cpu/align_aggregate_cpu.cpp

// Copies a (rows × n) block of a strided view into buf[t][j] in the
// accumulate type. Columns n..R of buf are left as they are (zero).
template <typename scalar_t, typename acc_t, int R>
void load_block(const scalar_t* x, int64_t stride_t, int64_t stride_j, int64_t rows, int n, acc_t (*buf)[R]) {
  if (stride_t == 1) {  // A factors: read each of the n rows contiguously
    for (int j = 0; j < n; ++j)
      for (int64_t t = 0; t < rows; ++t) buf[t][j] = static_cast<acc_t>(x[j * stride_j + t]);
  } else {
    for (int64_t t = 0; t < rows; ++t)
      for (int j = 0; j < n; ++j) buf[t][j] = static_cast<acc_t>(x[t * stride_t + j * stride_j]);
  }
}

// Any layout (transposed or strided views, and tails): stage X_i rows in a
// buffer, out[t][j] = Σ_i Σ_k x_i[t][k] C_i[k][j].
template <typename scalar_t, typename acc_t, int R>
void aggregate_rows_any(const GroupParams& p, const FactorView& v, int n, int64_t t0, int64_t rows, bool& finite) {
  alignas(64) acc_t xb[kChunkRows][R] = {};
  alignas(64) acc_t acc[kChunkRows][R] = {};
  for (int64_t i = 0; i < p.num_clients; ++i) {
    const scalar_t* x = static_cast<const scalar_t*>(v.x[i]) + t0 * v.stride_t;
    load_block<scalar_t, acc_t, R>(x, v.stride_t, v.stride_j, rows, n, xb);
    const acc_t* C = client_coef<acc_t, R>(p, v.layer, i);
    for (int64_t t = 0; t < rows; ++t)
      for (int k = 0; k < n; ++k) {
        const acc_t xk = xb[t][k];
        for (int j = 0; j < R; ++j) acc[t][j] += xk * C[k * R + j];
      }
  }
  scalar_t* out = static_cast<scalar_t*>(v.out) + t0 * v.out_stride_t;
  for (int64_t t = 0; t < rows; ++t)
    for (int j = 0; j < n; ++j) {
      const scalar_t value = static_cast<scalar_t>(acc[t][j]);
      finite = finite && fr_isfinite(static_cast<acc_t>(value));
      out[t * v.out_stride_t + j * v.out_stride_j] = value;
    }
}

}  // namespace

}  // namespace fedrot
