// The vector (AVX-512 or AVX2) covariance kernels of the rotation pass: M += X_iᵀ Y for one client
// and its reference over all rows of a view, one kernel per dense layout (A factors, t contiguous:
// a dot form and a transposed form; B factors, j contiguous: full rank and below). Each output
// element is summed in a fixed order, independent of the thread count.

#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/simd.h"

namespace fedrot {

namespace {  // internal linkage: see cpu/align_aggregate_cpu.cpp

// Rows of t per cache block of the covariance kernels: the block of x and y
// (≤ 2 · 64 · 512 · 4 bytes) stays in L2 while all (j, k) tiles reuse it.
constexpr int64_t kCovarianceBlock = 512;

// A factors (t contiguous): M[j][k] = Σ_t x[j][t] y[k][t], 4×4 blocks of
// (j, k) with vector accumulators over t, one cache block of t at a time. The
// 16 accumulators of a block are reduced across lanes in registers
// (sum_lanes_of) and added to the block's 16 partial sums. Rows past n alias
// row 0 and are dropped. Narrow types are widened once per cache block (y rows)
// and per row tile (x rows) into L1/L2 buffers instead of once per tile: a row
// serves NB tiles, and widening inside the FMA loop would redo it for each of them.
// The FMAs and their order are the same either way.
template <typename scalar_t, typename acc_t, int R>
void covariance_t_contiguous(const scalar_t* x, int64_t sx, const scalar_t* y, int64_t sy, int64_t T, int n, acc_t* M) {
  using S = Simd<acc_t, kVectorBytes>;
  using V = typename S::type;
  constexpr int L = S::lanes, JB = 4, NB = R / JB;
  constexpr bool kWiden = !std::is_same_v<scalar_t, acc_t>;
  constexpr int64_t kWidened = kWiden ? kCovarianceBlock : 1;
  static_assert(JB * JB % L == 0, "a block's accumulators reduce L at a time");
  static_assert(kCovarianceBlock % L == 0, "blocks hold whole vectors");
  alignas(64) acc_t part[NB * NB][JB * JB] = {};
  alignas(64) acc_t ywide[kWiden ? R : 1][kWidened];
  alignas(64) acc_t xwide[kWiden ? JB : 1][kWidened];
  const int64_t T_vec = T - T % L;
  for (int64_t tb = 0; tb < T_vec; tb += kCovarianceBlock) {
    const int64_t len = std::min(T_vec, tb + kCovarianceBlock) - tb;
    if constexpr (kWiden)
      for (int k = 0; k < n; ++k) widen_lanes<V, scalar_t, L>(y + k * sy + tb, len, ywide[k]);
    for (int j0 = 0; j0 < n; j0 += JB) {
      if constexpr (kWiden)
        for (int b = 0; b < JB; ++b) widen_lanes<V, scalar_t, L>(x + (j0 + b < n ? j0 + b : 0) * sx + tb, len, xwide[b]);
      for (int k0 = 0; k0 < n; k0 += JB) {
        const acc_t *xr[JB], *yr[JB];
        for (int b = 0; b < JB; ++b) {
          const int j = j0 + b < n ? j0 + b : 0, k = k0 + b < n ? k0 + b : 0;
          if constexpr (kWiden) {
            xr[b] = xwide[b];
            yr[b] = ywide[k];
          } else {
            xr[b] = x + j * sx + tb;
            yr[b] = y + k * sy + tb;
          }
        }
        // Prefetch the x rows read next (the next tile row, or the first of the next block), a row
        // per k0 tile and a line per step: the first k0 tile of a row otherwise waits on DRAM.
        const bool last_row = j0 + JB >= n;
        const scalar_t* next = x + ((last_row ? 0 : j0 + JB) + k0 / JB % JB) * sx + tb + (last_row ? len : 0);
        V acc[JB * JB] = {};
        for (int64_t t = 0; t < len; t += L) {
          __builtin_prefetch(next + t, 0, 3);
          V xv[JB], yv[JB];
#pragma GCC unroll 4
          for (int b = 0; b < JB; ++b) {
            xv[b] = load_lanes<V, acc_t, L>(xr[b] + t);
            yv[b] = load_lanes<V, acc_t, L>(yr[b] + t);
          }
#pragma GCC unroll 4
          for (int a = 0; a < JB; ++a)
#pragma GCC unroll 4
            for (int b = 0; b < JB; ++b) acc[a * JB + b] += xv[a] * yv[b];
        }
        acc_t* sums = part[j0 / JB * NB + k0 / JB];
        for (int g = 0; g < JB * JB; g += L)
          store_vector<V>(sums + g, load_lanes<V, acc_t, L>(sums + g) + sum_lanes_of<V, L>(acc + g));
      }
    }
  }
  for (int j = 0; j < n; ++j)
    for (int k = 0; k < n; ++k) {
      acc_t sum = part[j / JB * NB + k / JB][j % JB * JB + k % JB];
      for (int64_t u = T_vec; u < T; ++u) sum += static_cast<acc_t>(x[j * sx + u]) * static_cast<acc_t>(y[k * sy + u]);
      M[j * R + k] += sum;
    }
}

// Rows of t per block of the transposed reference: (rows × R) values of acc_t in 32 KB, which stay in L1.
template <typename acc_t, int R>
constexpr int64_t kTransposedRows = 32768 / (R * int64_t(sizeof(acc_t)));

// Whether A factors of bucket R take covariance_t_transposed: with 4 vectors per row of M, a
// broadcast tile of 6 rows × 4 vectors does 24 FMAs per 10 loads with no lane reductions, against
// 16 FMAs per 8 loads plus a 16-lane reduction per 4 × 4 block in the dot form. Below that the
// transpose costs more than it saves.
template <typename acc_t, int R>
constexpr bool kTransposedCovariance = kVectorRegisters == 32 && R / Simd<acc_t, kVectorBytes>::lanes >= 4;

// A factors (t contiguous) for kTransposedCovariance: each block of t of y is transposed into a
// (t, k) buffer (transpose_lanes, L × L at a time; rows k >= n are zero), then tiles of JB rows ×
// JV vectors of M take one broadcast x[j][t] per row and one buffer vector per JV per t. Rows past
// n alias row 0 and are dropped; columns past n get zero sums and are reset to zero.
template <typename scalar_t, typename acc_t, int R>
void covariance_t_transposed(const scalar_t* x, int64_t sx, const scalar_t* y, int64_t sy, int64_t T, int n, acc_t* M) {
  using S = Simd<acc_t, kVectorBytes>;
  using V = typename S::type;
  constexpr int L = S::lanes, JV = 4, JB = kTileAccumulators / JV;
  constexpr int64_t TB = kTransposedRows<acc_t, R>;
  static_assert(TB % L == 0 && R % (JV * L) == 0, "whole lane blocks of t and of k");
  constexpr int64_t kLinesPerRow = TB * int64_t(sizeof(scalar_t)) / 64;
  alignas(64) acc_t yt[TB][R];
  const int64_t T_vec = T - T % L;
  for (int64_t tb = 0; tb < T_vec; tb += TB) {
    const int64_t rows = std::min(T_vec - tb, TB);
    for (int64_t t = 0; t < rows; t += L)
      for (int k0 = 0; k0 < R; k0 += L) {
        V v[L];
        for (int q = 0; q < L; ++q) {
          const scalar_t* yq = y + (k0 + q < n ? k0 + q : 0) * sy + tb + t;
          __builtin_prefetch(yq + TB);
          v[q] = k0 + q < n ? load_lanes_widened<V, scalar_t, L>(yq) : V{};
        }
        transpose_lanes<V, L>(v);
        for (int q = 0; q < L; ++q) store_vector<V>(&yt[t + q][k0], v[q]);
      }
    for (int j0 = 0; j0 < n; j0 += JB)
      for (int k0 = 0; k0 < R; k0 += JV * L) {
        const scalar_t* xr[JB];
        for (int a = 0; a < JB; ++a) xr[a] = x + (j0 + a < n ? j0 + a : 0) * sx + tb;
        if (k0 == 0)  // the next block of these rows: 64+ short streams are more than the prefetcher follows
          for (int a = 0; a < JB; ++a)
            for (int64_t c = 0; c < kLinesPerRow; ++c)
              __builtin_prefetch(reinterpret_cast<const char*>(xr[a] + TB) + 64 * c, 0, 2);
        V acc[JB][JV] = {};
        for (int64_t t = 0; t < rows; ++t) {
          V yv[JV];
#pragma GCC unroll 4
          for (int u = 0; u < JV; ++u) yv[u] = load_lanes<V, acc_t, L>(&yt[t][k0 + u * L]);
          with_neighbour<scalar_t>(tb + t, T, [&](auto neighbour) {
#pragma GCC unroll 8
            for (int a = 0; a < JB; ++a) {
              const auto xa = broadcast_widened<V, scalar_t, L, decltype(neighbour)::value>(xr[a] + t);
#pragma GCC unroll 4
              for (int u = 0; u < JV; ++u) acc[a][u] += xa * yv[u];
            }
          });
        }
        for (int a = 0; a < JB && j0 + a < n; ++a)
          for (int u = 0; u < JV; ++u) {
            acc_t* m = M + (j0 + a) * R + k0 + u * L;
            store_vector<V>(m, load_lanes<V, acc_t, L>(m) + acc[a][u]);
          }
      }
  }
  for (int j = 0; j < n; ++j) {
    for (int k = 0; k < n; ++k)
      for (int64_t u = T_vec; u < T; ++u)
        M[j * R + k] += static_cast<acc_t>(x[j * sx + u]) * static_cast<acc_t>(y[k * sy + u]);
    std::fill(M + j * R + n, M + (j + 1) * R, acc_t(0));
  }
}

// B factors (j contiguous) at full rank n = R: M[j][k] = Σ_t x[t][j] y[t][k],
// tiles of JB rows × JV vectors of M (kTileAccumulators) over one cache block of t.
// fp32 is read in place; narrow types are widened once per cache block into stack
// buffers (≤ 2 · 512 · R · 4 bytes, in L2): in place, each x[t][j] broadcast would
// cost a shift beside its FMAs, and each y row would be widened R / JB times.
template <typename scalar_t, typename acc_t, int R>
void covariance_j_contiguous_full(const scalar_t* x, int64_t sx, const scalar_t* y, int64_t sy, int64_t T, acc_t* M) {
  using S = RowSimd<acc_t, R>;
  using V = typename S::type;
  constexpr int L = S::lanes, U = R / L, JV = U < 4 ? U : 4, JB = kTileAccumulators / JV < R ? kTileAccumulators / JV : R;
  constexpr bool kWiden = !std::is_same_v<scalar_t, acc_t>;
  constexpr int64_t kWidened = kWiden ? kCovarianceBlock : 1;
  alignas(64) acc_t xwide[kWidened][kWiden ? R : 1];
  alignas(64) acc_t ywide[kWidened][kWiden ? R : 1];
  constexpr int kLastRows = R % JB == 0 ? JB : R % JB;  // rows of the last row tile
  // M's tiles over rows [0, len) of xb and yb (acc_t, row strides sxb and syb); the rows of a tile
  // are a compile-time constant, so that its loops unroll.
  const auto tiles = [&](const acc_t* xb, int64_t sxb, const acc_t* yb, int64_t syb, int64_t len) {
    const auto tile = [&](auto rows, int j0, int k0) {
      constexpr int JR = decltype(rows)::value;
      V acc[JR][JV] = {};
      for (int64_t t = 0; t < len; ++t) {
        V yv[JV];
        for (int u = 0; u < JV; ++u) yv[u] = load_lanes<V, acc_t, L>(yb + t * syb + k0 + u * L);
        for (int a = 0; a < JR; ++a) {
          const acc_t xa = xb[t * sxb + j0 + a];
          for (int u = 0; u < JV; ++u) acc[a][u] += xa * yv[u];
        }
      }
      for (int a = 0; a < JR; ++a)
        for (int u = 0; u < JV; ++u)
          for (int q = 0; q < L; ++q) M[(j0 + a) * R + k0 + u * L + q] += acc[a][u][q];
    };
    for (int j0 = 0; j0 < R; j0 += JB)
      for (int k0 = 0; k0 < R; k0 += JV * L) {
        if (j0 + JB <= R) tile(std::integral_constant<int, JB>{}, j0, k0);
        else tile(std::integral_constant<int, kLastRows>{}, j0, k0);
      }
  };
  for (int64_t tb = 0; tb < T; tb += kCovarianceBlock) {
    const int64_t len = std::min(T, tb + kCovarianceBlock) - tb;
    if constexpr (kWiden) {
      for (int64_t t = 0; t < len; ++t) {
        widen_lanes<V, scalar_t, L>(x + (tb + t) * sx, R, xwide[t]);
        widen_lanes<V, scalar_t, L>(y + (tb + t) * sy, R, ywide[t]);
      }
      tiles(xwide[0], R, ywide[0], R, len);
    } else {
      tiles(x + tb * sx, sx, y + tb * sy, sy, len);
    }
  }
}

// B factors (j contiguous): M[j][k] = Σ_t x[t][j] y[t][k], JB rows of M held in
// registers while streaming t.
template <typename scalar_t, typename acc_t, int R>
void covariance_j_contiguous(const scalar_t* x, int64_t sx, const scalar_t* y, int64_t sy, int64_t T, int n, acc_t* M) {
  using S = RowSimd<acc_t, R>;
  using V = typename S::type;
  constexpr int L = S::lanes, U = R / L, JB = U >= 8 ? 1 : 8 / U < 4 ? 8 / U : 4;
  alignas(64) acc_t yrow[R] = {};
  for (int j0 = 0; j0 < n; j0 += JB) {
    V acc[JB][U] = {};
    for (int64_t t = 0; t < T; ++t) {
      for (int k = 0; k < n; ++k) yrow[k] = static_cast<acc_t>(y[t * sy + k]);
      V yv[U];
      for (int u = 0; u < U; ++u) yv[u] = load_lanes<V, acc_t, L>(yrow + u * L);
      for (int a = 0; a < JB; ++a) {
        const acc_t xa = j0 + a < n ? static_cast<acc_t>(x[t * sx + j0 + a]) : acc_t(0);
        for (int u = 0; u < U; ++u) acc[a][u] += xa * yv[u];
      }
    }
    for (int a = 0; a < JB && j0 + a < n; ++a)
      for (int k = 0; k < n; ++k) M[(j0 + a) * R + k] += acc[a][k / L][k % L];
  }
}

}  // namespace

}  // namespace fedrot
