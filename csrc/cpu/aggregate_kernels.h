// The vector (AVX-512 or AVX2) aggregation tile kernels: out = Σ_i X_i (w_i R_i) over the rows of
// one view for the clients of one call (Clients), A factors (t contiguous) as one small GEMM per
// client summed in registers, B factors (j contiguous) as register tiles of rows × vectors of j.
// They take the rows the AMX kernels (cpu/amx_kernels.h) leave, or all of them where AMX does not
// run; each output element is summed over clients and k in a fixed order.

#pragma once

#include <cstdint>

#include "align_aggregate.h"
#include "cpu/client_coefficients.h"
#include "cpu/client_range.h"
#include "cpu/simd.h"

namespace fedrot {

namespace {  // internal linkage: see cpu/align_aggregate_cpu.cpp

// A factors (t contiguous in input and output): out[j][t] = Σ_i Σ_k C_i[k][j] x_i[k][t],
// one small GEMM per client summed in registers. Register tile: JB rows of out ×
// U vectors of t, accumulated over all clients and k (U loads + JB broadcasts per
// JB·U FMAs); C is zero-padded to R columns, so a tile's rows past n add nothing
// and are not stored. The first row tile prefetches the next block of every
// (client, k) row: N·n short streams are more than the hardware prefetcher tracks.
// Returns the number of rows done; the tail goes to the row kernel.
template <typename scalar_t, typename acc_t, int R>
int64_t aggregate_rows_t_contiguous(const GroupParams& p, const FactorView& v, int n, int64_t t0, int64_t rows,
                                    Clients<acc_t> clients, bool& finite) {
  using S = Simd<acc_t, kVectorBytes>;
  using V = typename S::type;
  constexpr int L = S::lanes, U = kVectorRegisters == 32 ? 4 : 2, JB = 4;  // JB·U accumulators, U loads, 1 broadcast
  constexpr int kBlock = U * L;
  static_assert(R % JB == 0, "rank buckets are multiples of the row tile");
  constexpr int kLinesPerBlock = (kBlock * int(sizeof(scalar_t)) + 63) / 64;
  V check = {};
  int64_t done = 0;
  for (; done + kBlock <= rows; done += kBlock) {
    const int64_t tb = t0 + done;
    scalar_t* out = static_cast<scalar_t*>(v.out) + tb;
    for (int j0 = 0; j0 < n; j0 += JB) {
      V acc[JB][U] = {};
      acc_t* partial = clients.partial ? clients.partial + j0 * v.rows + tb : nullptr;
      if (partial && clients.begin > 0)
#pragma GCC unroll 8
        for (int jb = 0; jb < JB; ++jb)
#pragma GCC unroll 8
          for (int u = 0; u < U; ++u) acc[jb][u] = load_lanes<V, acc_t, L>(partial + jb * v.rows + u * L);
      for (int64_t i = clients.begin; i < clients.end; ++i) {
        const scalar_t* x = static_cast<const scalar_t*>(v.x[i]) + tb;
        const acc_t* C = client_coef<acc_t, R>(p, v.layer, i) + j0;
        for (int k = 0; k < n; ++k) {
          if (clients.prefetch) clients.prefetch->step();
          const scalar_t* xk = x + k * v.stride_j;
          if (j0 == 0)
#pragma GCC unroll 4
            for (int c = 0; c < kLinesPerBlock; ++c) __builtin_prefetch(reinterpret_cast<const char*>(xk + kBlock) + 64 * c);
          V xv[U];
#pragma GCC unroll 8
          for (int u = 0; u < U; ++u) xv[u] = load_lanes_widened<V, scalar_t, L>(xk + u * L);
#pragma GCC unroll 8
          for (int jb = 0; jb < JB; ++jb) {
            const acc_t c = C[k * R + jb];
#pragma GCC unroll 8
            for (int u = 0; u < U; ++u) acc[jb][u] += c * xv[u];
          }
        }
      }
      if (partial && clients.end < p.num_clients) {  // partial is set when end < N; GCC cannot see it
#pragma GCC unroll 8
        for (int jb = 0; jb < JB; ++jb)
#pragma GCC unroll 8
          for (int u = 0; u < U; ++u) store_vector<V>(partial + jb * v.rows + u * L, acc[jb][u]);
        continue;
      }
      for (int jb = 0; jb < JB && j0 + jb < n; ++jb)
        for (int u = 0; u < U; ++u)
          store_lanes<V, scalar_t, acc_t, L>(out + (j0 + jb) * v.out_stride_j + u * L, acc[jb][u], check);
    }
  }
  finite = finite && lanes_all_zero<V, L>(check);
  return done;
}

// Columns [j0, n) of one output row (B factors), at most JV vectors of L sums: whole vectors by
// store_lanes (their finiteness into `check`), the lanes of a rank below its bucket one by one.
template <typename V, typename scalar_t, typename acc_t, int L, int JV>
void store_row(scalar_t* out, const V* sums, int j0, int n, V& check, bool& finite) {
  int j = j0;
  for (int u = 0; u < JV && j + L <= n; ++u, j += L) store_lanes<V, scalar_t, acc_t, L>(out + j, sums[u], check);
  for (; j < n && j < j0 + JV * L; ++j) {
    const scalar_t value = static_cast<scalar_t>(sums[(j - j0) / L][(j - j0) % L]);
    finite = finite && fr_isfinite(static_cast<acc_t>(value));
    out[j] = value;
  }
}

// TB rows of a B factor (j contiguous in input and output), JV vectors of j
// from j0: out[t][j] = Σ_i Σ_k x_i[t][k] C_i[k][j], x read in place. Each C
// vector loaded serves TB rows. ST: the row stride when it is R (dense rows at
// full rank), so the TB row addresses are one base plus constants (a runtime
// stride needs TB base registers, which spill); 0 = v.stride_t. Dense tiles
// prefetch the same client's next tile: N interleaved streams of TB·R values
// are more than the hardware prefetcher follows (the broadcasts stalled on them).
template <typename scalar_t, typename acc_t, int R, int TB, int JV, int ST>
void aggregate_tile_j_contiguous(const GroupParams& p, const FactorView& v, int n, int64_t t, int j0,
                                 Clients<acc_t> clients, bool& finite) {
  using S = RowSimd<acc_t, R>;
  using V = typename S::type;
  constexpr int L = S::lanes;
  constexpr int kNextTileLines = ST ? (TB * ST * int(sizeof(scalar_t)) + 63) / 64 : 0;
  const int64_t stride_t = ST ? int64_t(ST) : v.stride_t;
  V acc[TB][JV] = {};
  acc_t* partial = clients.partial ? clients.partial + t * R + j0 : nullptr;
  if (partial && clients.begin > 0)
#pragma GCC unroll 32
    for (int b = 0; b < TB; ++b)
#pragma GCC unroll 8
      for (int u = 0; u < JV; ++u) acc[b][u] = load_lanes<V, acc_t, L>(partial + b * R + u * L);
  for (int64_t i = clients.begin; i < clients.end; ++i) {
    const scalar_t* x = static_cast<const scalar_t*>(v.x[i]) + t * stride_t;
    const acc_t* C = client_coef<acc_t, R>(p, v.layer, i) + j0;
    if (j0 == 0)
#pragma GCC unroll 32
      for (int c = 0; c < kNextTileLines; ++c) __builtin_prefetch(reinterpret_cast<const char*>(x + TB * ST) + 64 * c);
    for (int k = 0; k < n; ++k) {
      if (clients.prefetch) clients.prefetch->step();
      V cv[JV];
#pragma GCC unroll 8
      for (int u = 0; u < JV; ++u) cv[u] = load_lanes<V, acc_t, L>(C + k * R + u * L);
      with_neighbour<scalar_t>(k, n, [&](auto neighbour) {
#pragma GCC unroll 32
        for (int b = 0; b < TB; ++b) {
          const auto xk = broadcast_widened<V, scalar_t, L, decltype(neighbour)::value>(x + b * stride_t + k);
#pragma GCC unroll 8
          for (int u = 0; u < JV; ++u) acc[b][u] += xk * cv[u];
        }
      });
    }
  }
  if (partial && clients.end < p.num_clients) {  // partial is set when end < N; GCC cannot see it
#pragma GCC unroll 32
    for (int b = 0; b < TB; ++b)
#pragma GCC unroll 8
      for (int u = 0; u < JV; ++u) store_vector<V>(partial + b * R + u * L, acc[b][u]);
    return;
  }
  V check = {};
  for (int b = 0; b < TB; ++b)
    store_row<V, scalar_t, acc_t, L, JV>(static_cast<scalar_t*>(v.out) + (t + b) * v.out_stride_t, acc[b], j0, n, check, finite);
  finite = finite && lanes_all_zero<V, L>(check);
}

// B factors: tiles of TB rows × JV vectors of j (about kTileAccumulators), then
// tiles of 8 and single rows for the tail (a 64-row chunk is 24 + 24 + 8 + 8).
template <typename scalar_t, typename acc_t, int R, int ST>
void aggregate_rows_j_contiguous(const GroupParams& p, const FactorView& v, int n, int64_t t0, int64_t rows,
                                 Clients<acc_t> clients, bool& finite) {
  using S = RowSimd<acc_t, R>;
  constexpr int L = S::lanes;
  constexpr int U = R / L;
  constexpr int JV = U < 4 ? U : 4;
  constexpr int TB = kTileAccumulators / JV;
  constexpr int TB_TAIL = TB > 8 ? 8 : 1;
  int64_t t = t0;
  for (; t + TB <= t0 + rows; t += TB)
    for (int j0 = 0; j0 < n; j0 += JV * L)
      aggregate_tile_j_contiguous<scalar_t, acc_t, R, TB, JV, ST>(p, v, n, t, j0, clients, finite);
  for (; t + TB_TAIL <= t0 + rows; t += TB_TAIL)
    for (int j0 = 0; j0 < n; j0 += JV * L)
      aggregate_tile_j_contiguous<scalar_t, acc_t, R, TB_TAIL, JV, ST>(p, v, n, t, j0, clients, finite);
  for (; t < t0 + rows; ++t)
    for (int j0 = 0; j0 < n; j0 += JV * L)
      aggregate_tile_j_contiguous<scalar_t, acc_t, R, 1, JV, 0>(p, v, n, t, j0, clients, finite);
}

}  // namespace

}  // namespace fedrot
