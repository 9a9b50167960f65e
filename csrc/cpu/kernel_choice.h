// Which kernel computes what, by layout, dtype and rank: for a covariance, the vector kernel of the
// view's dense layout, or staged rows (load_block) for any other layout (the rotation tries the AMX
// tiles before, covariance_on_tiles); for the rows of an aggregate, the plain weighted sum where
// every rotation is I, else the AMX tiles where they run, then the vector tiles, then
// aggregate_rows_any for what the tiles leave.

#pragma once

#include <algorithm>
#include <cstdint>

#include "align_aggregate.h"
#include "cpu/aggregate_kernels.h"
#include "cpu/amx_kernels.h"
#include "cpu/any_layout_kernels.h"
#include "cpu/client_range.h"
#include "cpu/covariance_kernels.h"
#include "cpu/view_layouts.h"
#include "cpu/weighted_sum.h"

namespace fedrot {

namespace {  // internal linkage: see cpu/align_aggregate_cpu.cpp

// M += X_iᵀ Y over all rows of one view (M is R × R, zero-padded).
template <typename scalar_t, typename acc_t, int R>
void accumulate_covariance(const FactorView& v, int64_t client, int n, acc_t* M) {
  const scalar_t* x = static_cast<const scalar_t*>(v.x[client]);
  const scalar_t* y = static_cast<const scalar_t*>(v.ref);
  if (t_contiguous_pair(v)) {
    if constexpr (kTransposedCovariance<acc_t, R>)
      return covariance_t_transposed<scalar_t, acc_t, R>(x, v.stride_j, y, v.ref_stride_j, v.rows, n, M);
    else
      return covariance_t_contiguous<scalar_t, acc_t, R>(x, v.stride_j, y, v.ref_stride_j, v.rows, n, M);
  }
  if (j_contiguous_pair(v) && n == R)
    return covariance_j_contiguous_full<scalar_t, acc_t, R>(x, v.stride_t, y, v.ref_stride_t, v.rows, M);
  if (j_contiguous_pair(v))
    return covariance_j_contiguous<scalar_t, acc_t, R>(x, v.stride_t, y, v.ref_stride_t, v.rows, n, M);
  alignas(64) acc_t xb[kChunkRows][R] = {};
  alignas(64) acc_t yb[kChunkRows][R] = {};
  for (int64_t t0 = 0; t0 < v.rows; t0 += kChunkRows) {
    const int64_t rows = std::min(kChunkRows, v.rows - t0);
    load_block<scalar_t, acc_t, R>(x + t0 * v.stride_t, v.stride_t, v.stride_j, rows, n, xb);
    load_block<scalar_t, acc_t, R>(y + t0 * v.ref_stride_t, v.ref_stride_t, v.ref_stride_j, rows, n, yb);
    for (int64_t t = 0; t < rows; ++t)
      for (int j = 0; j < n; ++j) {
        const acc_t xv = xb[t][j];
        for (int k = 0; k < R; ++k) M[j * R + k] += xv * yb[t][k];
      }
  }
}

// The tile kernels of v's layout on rows [t0, t0 + rows) for `clients`; returns the rows they did
// from t0 (A: whole column blocks; B: all; other layouts: none), the rest is for the row kernel.
template <typename scalar_t, typename acc_t, int R>
int64_t aggregate_tiles(const GroupParams& p, const FactorView& v, int n, int64_t t0, int64_t rows,
                        Clients<acc_t> clients, bool& finite) {
  if (v.stride_t == 1 && v.out_stride_t == 1) {
    int64_t done = 0;
    if constexpr (kAmxBucket<scalar_t, R>) done = aggregate_rows_t_amx<R>(p, v, n, t0, rows, clients, finite);
    return done + aggregate_rows_t_contiguous<scalar_t, acc_t, R>(p, v, n, t0 + done, rows - done, clients, finite);
  }
  if (!has_tile_layout(v)) return 0;
  int64_t done = 0;
  if constexpr (kAmxBucket<scalar_t, R>) done = aggregate_rows_j_amx<R>(p, v, n, t0, rows, clients, finite);
  if (v.stride_t == R) aggregate_rows_j_contiguous<scalar_t, acc_t, R, R>(p, v, n, t0 + done, rows - done, clients, finite);
  else aggregate_rows_j_contiguous<scalar_t, acc_t, R, 0>(p, v, n, t0 + done, rows - done, clients, finite);
  return rows;
}

template <typename scalar_t, typename acc_t, int R>
void aggregate_chunk(const GroupParams& p, const FactorView& v, int n, int64_t t0, int64_t rows, bool& finite,
                     Prefetcher* prefetch = nullptr) {
  if (plain_average_layer<acc_t>(p, v.layer)) return weighted_sum_rows<scalar_t, acc_t>(p, v, n, t0, rows, finite);
  const int64_t done = aggregate_tiles<scalar_t, acc_t, R>(p, v, n, t0, rows, all_clients<acc_t>(p, prefetch), finite);
  if (done < rows) aggregate_rows_any<scalar_t, acc_t, R>(p, v, n, t0 + done, rows - done, finite);
}

}  // namespace

}  // namespace fedrot
