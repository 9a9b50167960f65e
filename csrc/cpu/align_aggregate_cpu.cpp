// CPU path of the fused op: pass 1 is parallel over (layer, client) and
// computes M_i and R_i in one go; pass 2 is parallel over row chunks of all
// layers and writes Σ_i X_i (w_i R_i). With many layers, both passes run layer
// by layer instead, parallel over layers. Each output element is produced by one
// task in a fixed order, so results do not depend on the thread count.
#include <algorithm>
#include <vector>

#include <unistd.h>  // sysconf: the L2 size

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "align_aggregate.h"
#include "common/dispatch.h"
#include "common/rotation_coefficients.h"
#include "cpu/amx.h"
#include "cpu/amx_covariance.h"
#include "cpu/simd.h"
#include "cpu/weighted_sum.h"

namespace fedrot {
namespace {

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

// Byte ranges the tile kernels pull into L2 while they compute, a line per step of their inner loop:
// the factors read next (the next clients of a layer, or the next layer), so that their DRAM reads
// overlap FMAs on factors already in L2 instead of following them.
class Prefetcher {
 public:
  void add(const void* begin, int64_t bytes) {
    if (count_ < kMaxRanges && bytes > 0) ranges_[count_++] = {static_cast<const char*>(begin), bytes};
  }
  void step() {
    if (next_ < end_) {
      __builtin_prefetch(next_, 0, 2);
      next_ += 64;
    } else if (current_ < count_) {
      next_ = ranges_[current_].begin;
      end_ = next_ + ranges_[current_++].bytes;
    }
  }

 private:
  static constexpr int kMaxRanges = 64;  // a range a client where clients lie apart
  struct Range {
    const char* begin;
    int64_t bytes;
  };
  Range ranges_[kMaxRanges];
  int count_ = 0, current_ = 0;
  const char *next_ = nullptr, *end_ = nullptr;
};

// The clients [begin, end) a kernel call sums. With partial set (the layer schedule, a few clients
// a pass), the accumulators start from `partial` unless begin = 0 and go back to it unless end = N:
// the FMAs of every output element are those of one call over all clients, in the same order, so
// the result is bitwise the same; a pass then streams a few clients' rows instead of N·n interleaved
// ones, which the hardware prefetcher follows.
template <typename acc_t>
struct Clients {
  int64_t begin, end;
  acc_t* partial;  // R × T (A: row j at j·T) or T × R (B) accumulators; null for all clients at once
  Prefetcher* prefetch = nullptr;
};

template <typename acc_t>
Clients<acc_t> all_clients(const GroupParams& p, Prefetcher* prefetch = nullptr) {
  return {0, p.num_clients, nullptr, prefetch};
}

// Rows of t per cache block of the covariance kernels: the block of x and y
// (≤ 2 · 64 · 512 · 4 bytes) stays in L2 while all (j, k) tiles reuse it.
constexpr int64_t kCovarianceBlock = 512;

// A factors (t contiguous): M[j][k] = Σ_t x[j][t] y[k][t], 4×4 blocks of
// (j, k) with vector accumulators over t, one cache block of t at a time. The
// 16 accumulators of a block are reduced across lanes in registers
// (sum_lanes_of) and added to the block's 16 partial sums. Rows past n alias
// row 0 and are dropped. Narrow types are widened once per cache block (y rows)
// and per row tile (x rows) into L1/L2 buffers instead of once per tile: a row
// serves NB tiles, and widening in the FMA loop cost twice the time of fp32.
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
// 16 FMAs per 8 loads plus a 16-lane reduction per 4 × 4 block in the dot form (one core,
// 64 × 1024 fp32: 60 vs 108 us). Below that the transpose costs more than it saves.
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

// Whether v's client and reference are both t-contiguous (A layout) or both j-contiguous (B).
inline bool t_contiguous_pair(const FactorView& v) { return v.stride_t == 1 && v.ref_stride_t == 1; }
inline bool j_contiguous_pair(const FactorView& v) { return v.stride_j == 1 && v.ref_stride_j == 1; }

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

// Whether a (rows × n) strided view is free of NaN/Inf, read along its contiguous
// dimension: x - x is 0 for finite x and NaN otherwise.
template <typename scalar_t, typename acc_t>
bool view_is_finite(const scalar_t* x, int64_t stride_t, int64_t stride_j, int64_t rows, int n) {
  using S = Simd<acc_t, kVectorBytes>;
  using V = typename S::type;
  constexpr int L = S::lanes;
  const bool t_inner = stride_t == 1;
  const int64_t outer = t_inner ? n : rows, inner = t_inner ? rows : n;
  const int64_t so = t_inner ? stride_j : stride_t, si = t_inner ? stride_t : stride_j;
  V check = {};
  acc_t tail = 0;
  for (int64_t o = 0; o < outer; ++o) {
    const scalar_t* row = x + o * so;
    int64_t i = 0;
    if (si == 1)
      for (; i + L <= inner; i += L) {
        const V v = load_lanes_widened<V, scalar_t, L>(row + i);
        check += v - v;
      }
    for (; i < inner; ++i) {
      const acc_t v = static_cast<acc_t>(row[i * si]);
      tail += v - v;
    }
  }
  return tail == acc_t(0) && lanes_all_zero<V, L>(check);
}

// Per task range: the references of the layer it is at, paired for the tile covariance (once per
// layer and view: every client's covariance reads them), and one client's paired B factor.
struct CovarianceTiles {
  int64_t layer[2] = {-1, -1};
  std::vector<uint32_t> ref[2], client;
};

// M += X_iᵀ Y for view f of `client` by tile_covariance, where its shapes allow (false: not done).
// A layout: the client's rows are the first operand, the paired reference (pair_rows_t) the second;
// B layout: the reference paired and transposed is the first operand (rows k), the client paired
// the second (columns j), and the tiles hold Mᵀ. The values of t past the last step are added in
// order after the tiles.
template <typename scalar_t, typename acc_t, int R>
bool covariance_on_tiles(const FactorView& v, int f, int64_t client, int n, CovarianceTiles& tiles, acc_t* M) {
#if FEDROT_AMX
  if constexpr (kAmxBucket<scalar_t, R>) {
    const bool by_t = t_contiguous_pair(v), by_j = !by_t && j_contiguous_pair(v);
    if (!(by_t || by_j) || !covariance_tiles_take<R>(n, v.rows)) return false;
    const auto* x = static_cast<const c10::BFloat16*>(v.x[client]);
    const auto* y = static_cast<const c10::BFloat16*>(v.ref);
    const int64_t T = v.rows, steps = T / kTileT, words = paired_words(n, T);
    std::vector<uint32_t>& ref = tiles.ref[f];
    if (tiles.layer[f] != v.layer) {
      ref.resize(std::max(ref.size(), size_t(words)));
      if (by_t) pair_rows_t(y, v.ref_stride_j, T, n, ref.data());
      else pair_rows_j(y, v.ref_stride_t, T, n, /*transpose=*/true, ref.data());
      tiles.layer[f] = v.layer;
    }
    if (by_t) {
      const int64_t row_bytes = v.stride_j * int64_t(sizeof(c10::BFloat16));
      tile_covariance<R>({x, row_bytes, kTileT * int64_t(sizeof(c10::BFloat16)), 16 * row_bytes},
                         word_operand(ref.data(), steps), steps, n, /*transposed=*/false, M);
    } else {
      tiles.client.resize(std::max(tiles.client.size(), size_t(words)));
      pair_rows_j(x, v.stride_t, T, n, /*transpose=*/false, tiles.client.data());
      tile_covariance<R>(word_operand(ref.data(), steps), word_operand(tiles.client.data(), steps), steps, n,
                         /*transposed=*/true, M);
    }
    const int64_t xt = by_t ? 1 : v.stride_t, xj = by_t ? v.stride_j : 1;
    const int64_t yt = by_t ? 1 : v.ref_stride_t, yk = by_t ? v.ref_stride_j : 1;
    for (int j = 0; j < n; ++j)
      for (int k = 0; k < n; ++k)
        for (int64_t u = steps * kTileT; u < T; ++u)
          M[j * R + k] += static_cast<acc_t>(x[u * xt + j * xj]) * static_cast<acc_t>(y[u * yt + k * yk]);
    return true;
  }
#endif
  return false;
}

// M_i and the coefficients w_i R_i of task li = (layer, client).
template <typename scalar_t, typename acc_t, int R>
void rotate_client(const GroupParams& p, int64_t li, acc_t* M, acc_t* Rot, PolarScratch<acc_t, R>& scratch,
                   CovarianceTiles& tiles) {
  const int64_t l = li / p.num_clients, i = li % p.num_clients;
  std::fill(M, M + R * R, acc_t(0));
  for (int f = 0; f < 2; ++f) {  // views with no reference do not align
    const FactorView& v = p.views[2 * l + f];
    if (v.ref == nullptr) continue;
    // Client 0's task checks the reference just before its covariance reads it again, from cache.
    if (i == 0 && !view_is_finite<scalar_t, acc_t>(static_cast<const scalar_t*>(v.ref), v.ref_stride_t,
                                                   v.ref_stride_j, v.rows, p.layers[l].n))
      __atomic_fetch_or(p.status, kStatusReferenceNonfinite, __ATOMIC_RELAXED);
    if (!covariance_on_tiles<scalar_t, acc_t, R>(v, f, i, p.layers[l].n, tiles, M))
      accumulate_covariance<scalar_t, acc_t, R>(v, i, p.layers[l].n, M);
  }
  rotation_from_covariance<acc_t, R>(p, li, M, Rot, scratch);
  if constexpr (kAmxBucket<scalar_t, R>) pack_coef_pairs<R>(client_coef<acc_t, R>(p, l, i), client_coef_pairs<R>(p, l, i));
}

template <typename scalar_t, typename acc_t, int R>
void rotate_clients(const GroupParams& p, int64_t begin, int64_t end, CovarianceTiles& tiles) {
  PolarScratch<acc_t, R> scratch;
  alignas(64) acc_t M[R * R];
  alignas(64) acc_t Rot[R * R];
  for (int64_t li = begin; li < end; ++li) rotate_client<scalar_t, acc_t, R>(p, li, M, Rot, scratch, tiles);
}

template <typename scalar_t, typename acc_t, int R>
void rotations_pass(const GroupParams& p) {
  at::parallel_for(0, int64_t(p.num_layers) * p.num_clients, 1,
                   [&](int64_t begin, int64_t end) {
                     CovarianceTiles tiles;
                     rotate_clients<scalar_t, acc_t, R>(p, begin, end, tiles);
                   });
}

// The largest even divisor of n up to 32: the values of k per tile product (K of one tile pair).
inline int tile_depth(int n) {
  for (int d = 32; d >= 2; d -= 2)
    if (n % d == 0) return d;
  return 0;
}

// Columns of one unit of the A tile kernel at rank n: 4 / ceil(n / 16) blocks of 16.
inline int tile_unit_t(int n) { return 16 * (4 / ((n + 15) / 16)); }

// Whether the AMX tile kernels take any of `rows` rows of v: bf16 coefficient pairs for bucket R,
// the tile state granted, an even rank, v dense along t (A kernel, at least one unit) or along j
// (B kernel, at least one block of 16) in input and output. The one rule of both kernels.
template <typename scalar_t, int R>
bool tiles_take(const FactorView& v, int n, int64_t rows) {
  if (!kAmxBucket<scalar_t, R> || !amx_usable() || tile_depth(n) == 0) return false;
  if (v.stride_t == 1 && v.out_stride_t == 1) return rows >= tile_unit_t(n);
  return v.stride_j == 1 && v.out_stride_j == 1 && rows >= 16;
}

#if FEDROT_AMX

// bf16 A factors (t contiguous, even n) on AMX: out[j][t] in tiles 0..3 of 16 rows j × 16 columns t,
// J = ceil(n / 16) blocks of j by 4 / J blocks of t (a unit of 64, 32 or 16 columns). Per client,
// the unit's x rows are interleaved in pairs along k (words (x[k][t], x[k + 1][t]): the second
// operand of a tile product), then per depth step and output tile: the transposed hi and lo
// coefficient pairs in tiles 4 and 5, the x pairs in tile 6, two products. At R = 16, hi and lo
// fill one tile row (K = 32): one coefficient tile holds both and the x tile the pairs twice, so
// one product per client and output tile (half the products, none waiting on another). Returns the
// columns done (whole units, so that every schedule gives a column the same kernel); the rest is for
// the AVX-512 tiles.
template <int R>
int64_t aggregate_rows_t_amx(const GroupParams& p, const FactorView& v, int n, int64_t t0, int64_t rows,
                             Clients<float> clients, bool& finite) {
  using V = Simd<float, 64>::type;
  if (!tiles_take<c10::BFloat16, R>(v, n, rows)) return 0;
  const int depth = tile_depth(n), unit = tile_unit_t(n);
  const int j_blocks = (n + 15) / 16, t_blocks = unit / 16, tiles = j_blocks * t_blocks;
  constexpr bool kFused = R == 16;  // hi and lo words of a coefficient row in one tile row
  constexpr int kPairRows = kFused ? R : R / 2;
  TileConfig config;
  for (int c = 0; c < 4; ++c) config.set(c, 16, 64);
  config.set(4, 16, kFused ? 64 : 2 * depth);
  config.set(5, 16, kFused ? 64 : 2 * depth);
  config.set(6, kFused ? kPairRows : depth / 2, 64);
  const TileScope scope(config);
  float* partial = clients.partial;
  const int64_t T = v.rows;
  // Words (k / 2, t) of one unit of a client (kFused: again from row R / 2; the rows of k >= n stay
  // zero).
  alignas(64) uint32_t xpairs[kPairRows][64];
  if constexpr (kFused) std::memset(xpairs, 0, sizeof xpairs);
  alignas(64) float block[16][16];
  V check = {};
  auto store_block = [&](int j0, int64_t t) {  // block: out rows j0.., columns t..
    for (int b = 0; b < 16 && j0 + b < n; ++b)
      store_lanes<V, c10::BFloat16, float, 16>(static_cast<c10::BFloat16*>(v.out) + (j0 + b) * v.out_stride_j + t,
                                               load_lanes<V, float, 16>(block[b]), check);
  };
  // Client i's unit at column t into xpairs.
  auto interleave_client = [&](int64_t i, int64_t t) {
    const c10::BFloat16* x = static_cast<const c10::BFloat16*>(v.x[i]) + t;
    for (int k = 0; k < n; k += 2)
      for (int u = 0; u < unit; u += 16) {  // 16 values of rows k and k + 1, interleaved
        if (clients.prefetch) clients.prefetch->step();
        const __m512i words = pair_words(x + k * v.stride_j + u, x + (k + 1) * v.stride_j + u);
        _mm512_storeu_si512(&xpairs[k / 2][u], words);
        if constexpr (kFused) _mm512_storeu_si512(&xpairs[R / 2 + k / 2][u], words);
      }
  };
  int64_t done = 0;
  for (; done + unit <= rows; done += unit) {
    const int64_t t = t0 + done;
    // Output tile c holds j block c / t_blocks, t block c % t_blocks; the coefficient tiles change with
    // the j block only.
#define FR_PLACE(c) (c) / t_blocks * 16, t + (c) % t_blocks * 16
#define FR_PARTIAL(c) (partial + (c) / t_blocks * 16 * T + t + (c) % t_blocks * 16)
#define FR_START(c)                       \
  if (partial && clients.begin > 0) {     \
    _tile_loadd(c, FR_PARTIAL(c), T * 4); \
  } else {                                \
    _tile_zero(c);                        \
  }
#define FR_LOAD_X(c) _tile_loadd(6, &xpairs[k0 / 2][(c) % t_blocks * 16], 256)
#define FR_PRODUCTS(c)                                                         \
  if ((c) % t_blocks == 0) {                                                   \
    _tile_loadd(4, pairs_t + (c) / t_blocks * 16 * R + k0 / 2, R * 4);         \
    _tile_loadd(5, pairs_t + (c) / t_blocks * 16 * R + R / 2 + k0 / 2, R * 4); \
  }                                                                            \
  FR_LOAD_X(c);                                                                \
  _tile_dpbf16ps(c, 4, 6);                                                     \
  _tile_dpbf16ps(c, 5, 6)
#define FR_FUSED(c) \
  FR_LOAD_X(c);     \
  _tile_dpbf16ps(c, 4, 6)
#define FR_TO_PARTIAL(c) _tile_stored(c, FR_PARTIAL(c), T * 4)
#define FR_TO_OUT(c)                 \
  _tile_stored(c, &block[0][0], 64); \
  store_block(FR_PLACE(c))
    FR_FOR_TILES(tiles, FR_START);
    for (int64_t i = clients.begin; i < clients.end; ++i) {
      __asm__ volatile("" ::: "memory");  // the last client's tile loads read xpairs: GCC's _tile_loadd has no memory operand
      interleave_client(i, t);
      __asm__ volatile("" ::: "memory");
      const uint32_t* pairs_t = client_coef_pairs<R>(p, v.layer, i) + R * R;
      if constexpr (kFused) {  // n <= 16: one j block, four t blocks, all of k in one product
        constexpr int k0 = 0;
        _tile_loadd(4, pairs_t, R * 4);
        FR_FOR_TILES(4, FR_FUSED);
      } else {
        for (int k0 = 0; k0 < n; k0 += depth) FR_FOR_TILES(tiles, FR_PRODUCTS);
      }
    }
    if (partial && clients.end < p.num_clients) FR_FOR_TILES(tiles, FR_TO_PARTIAL);  // partial is set when end < N
    else FR_FOR_TILES(tiles, FR_TO_OUT);
#undef FR_PLACE
#undef FR_PARTIAL
#undef FR_START
#undef FR_LOAD_X
#undef FR_PRODUCTS
#undef FR_FUSED
#undef FR_TO_PARTIAL
#undef FR_TO_OUT
  }
  finite = finite && lanes_all_zero<V, 16>(check);
  return done;
}
#endif

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

#if FEDROT_AMX
// bf16 B factors (j contiguous, even n) on AMX: blocks of 16 rows × 16 columns of out in tiles
// 0..3 (up to 4 row blocks per coefficient load); per client and depth step, x rows in tile 4 and the
// hi and lo coefficient pairs in tiles 5 and 6 (two products: C to 2^-17). Returns the rows done
// (whole blocks of 16); the rest is for the AVX-512 tiles.
template <int R>
int64_t aggregate_rows_j_amx(const GroupParams& p, const FactorView& v, int n, int64_t t0, int64_t rows,
                             Clients<float> clients, bool& finite) {
  using V = Simd<float, 64>::type;
  if (!tiles_take<c10::BFloat16, R>(v, n, rows)) return 0;
  const int depth = tile_depth(n);
  TileConfig config;
  for (int c = 0; c < 4; ++c) config.set(c, 16, 64);
  config.set(4, 16, 2 * depth);
  config.set(5, depth / 2, 64);
  config.set(6, depth / 2, 64);
  const TileScope scope(config);
  const int64_t sx = v.stride_t * int64_t(sizeof(c10::BFloat16));
  float* partial = clients.partial;
  V check = {};
  alignas(64) float block[16][16];
  auto store_block = [&](int64_t t, int j0) {  // block: out rows t.., columns j0..
    for (int b = 0; b < 16; ++b) {
      const V sums = load_lanes<V, float, 16>(block[b]);
      store_row<V, c10::BFloat16, float, 16, 1>(static_cast<c10::BFloat16*>(v.out) + (t + b) * v.out_stride_t, &sums,
                                                j0, n, check, finite);
    }
  };
  int64_t done = 0;
  while (done + 16 <= rows) {
    const int blocks = int(std::min<int64_t>(4, (rows - done) / 16));
    const int64_t t = t0 + done;
#define FR_PARTIAL(c) (partial + (t + 16 * (c)) * R + j0)
#define FR_START(c)                       \
  if (partial && clients.begin > 0) {     \
    _tile_loadd(c, FR_PARTIAL(c), R * 4); \
  } else {                                \
    _tile_zero(c);                        \
  }
#define FR_PRODUCTS(c)                                             \
  _tile_loadd(4, x + 16 * (c) * v.stride_t + k0, sx);              \
  _tile_dpbf16ps(c, 4, 5);                                         \
  _tile_dpbf16ps(c, 4, 6)
#define FR_TO_PARTIAL(c) _tile_stored(c, FR_PARTIAL(c), R * 4)
#define FR_TO_OUT(c)                         \
  _tile_stored(c, &block[0][0], 64);         \
  store_block(t + 16 * (c), j0)
    for (int j0 = 0; j0 < n; j0 += 16) {
      FR_FOR_TILES(blocks, FR_START);
      for (int64_t i = clients.begin; i < clients.end; ++i) {
        const c10::BFloat16* x = static_cast<const c10::BFloat16*>(v.x[i]) + t * v.stride_t;
        const uint32_t* pairs = client_coef_pairs<R>(p, v.layer, i) + j0;
        for (int k0 = 0; k0 < n; k0 += depth) {
          if (clients.prefetch) clients.prefetch->step();
          _tile_loadd(5, pairs + k0 / 2 * R, R * 4);
          _tile_loadd(6, pairs + R * R / 2 + k0 / 2 * R, R * 4);
          FR_FOR_TILES(blocks, FR_PRODUCTS);
        }
      }
      if (partial && clients.end < p.num_clients) FR_FOR_TILES(blocks, FR_TO_PARTIAL);  // partial is set when end < N
      else FR_FOR_TILES(blocks, FR_TO_OUT);
    }
#undef FR_PARTIAL
#undef FR_START
#undef FR_PRODUCTS
#undef FR_TO_PARTIAL
#undef FR_TO_OUT
    done += 16 * blocks;
  }
  finite = finite && lanes_all_zero<V, 16>(check);
  return done;
}
#endif

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

// Whether v is dense along t (A) or along j (B) in input and output: the layouts of the tile kernels.
inline bool has_tile_layout(const FactorView& v) {
  return (v.stride_t == 1 && v.out_stride_t == 1) || (v.stride_j == 1 && v.out_stride_j == 1);
}

// The tile kernels of v's layout on rows [t0, t0 + rows) for `clients`; returns the rows they did
// from t0 (A: whole column blocks; B: all; other layouts: none), the rest is for the row kernel.
template <typename scalar_t, typename acc_t, int R>
int64_t aggregate_tiles(const GroupParams& p, const FactorView& v, int n, int64_t t0, int64_t rows,
                        Clients<acc_t> clients, bool& finite) {
  if (v.stride_t == 1 && v.out_stride_t == 1) {
    int64_t done = 0;
#if FEDROT_AMX
    if constexpr (kAmxBucket<scalar_t, R>) done = aggregate_rows_t_amx<R>(p, v, n, t0, rows, clients, finite);
#endif
    return done + aggregate_rows_t_contiguous<scalar_t, acc_t, R>(p, v, n, t0 + done, rows - done, clients, finite);
  }
  if (!has_tile_layout(v)) return 0;
  int64_t done = 0;
#if FEDROT_AMX
  if constexpr (kAmxBucket<scalar_t, R>) done = aggregate_rows_j_amx<R>(p, v, n, t0, rows, clients, finite);
#endif
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

template <typename scalar_t, typename acc_t, int R>
void aggregate_chunks(const GroupParams& p, int64_t begin, int64_t end, Prefetcher* prefetch = nullptr) {
  bool finite = true;
  for (int64_t chunk = begin; chunk < end; ++chunk) {
    const FactorView& v = p.views[find_view(p.views, 2 * p.num_layers, chunk)];
    const int n = p.layers[v.layer].n;
    const int64_t t0 = (chunk - v.chunk_begin) * kChunkRows;
    const int64_t rows = std::min(kChunkRows, v.rows - t0);
    aggregate_chunk<scalar_t, acc_t, R>(p, v, n, t0, rows, finite, prefetch);
  }
  if (!finite) __atomic_fetch_or(p.status, kStatusAggregateNonfinite, __ATOMIC_RELAXED);
}

template <typename scalar_t, typename acc_t, int R>
void aggregate_pass(const GroupParams& p) {
  at::parallel_for(0, p.num_chunks, 1,
                   [&](int64_t begin, int64_t end) { aggregate_chunks<scalar_t, acc_t, R>(p, begin, end); });
}

// One past the last row chunk of layer l (its chunks start at its A view's).
int64_t layer_chunks_end(const GroupParams& p, int64_t l) {
  return l + 1 < p.num_layers ? p.views[2 * l + 2].chunk_begin : p.num_chunks;
}

// Half this core's L2 (1 MiB where the OS does not say): a layer's clients up to this size are
// still in L2 when the aggregation reads them again after the covariance.
int64_t l2_budget_bytes() {
  static const int64_t bytes = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return l2 > 0 ? int64_t(l2) / 2 : int64_t(1) << 20;
  }();
  return bytes;
}

template <typename scalar_t>
int64_t layer_client_bytes(const GroupParams& p, int64_t l) {
  const int64_t n = p.layers[l].n;
  return p.num_clients * n * (p.views[2 * l].rows + p.views[2 * l + 1].rows) * int64_t(sizeof(scalar_t));
}

// Clients summed per pass of the client-at-a-time aggregation: as many as fill the L2 budget (at
// least one). Each pass loads and stores the fp32 partial sums, 2 (bf16) or 1 (fp32) times a
// client's bytes; fewer passes cut that traffic until the group spills L2. Paired runs, Llama-3-8B
// r = 16 bf16 align A, against the 16-rows rule it replaces (one client): 2 clients 0.86x, 4 0.80x,
// 8 0.87x; r = 64 fp32 AB: 2 clients 1.11x. Every group size gives the same bits.
template <typename scalar_t>
int64_t client_group(const GroupParams& p, int64_t l) {
  return std::max<int64_t>(1, l2_budget_bytes() * p.num_clients / layer_client_bytes<scalar_t>(p, l));
}

// Whether a (rows × n) view with these strides is one dense block (A or B layout).
inline bool dense_block(int64_t stride_t, int64_t stride_j, int64_t rows, int n) {
  return (stride_t == 1 && stride_j == rows) || (stride_j == 1 && stride_t == n);
}

// Adds clients [begin, end) of v to `prefetch` where each is one dense block: one range where they
// lie evenly in one allocation (a stacked input), else one range a client.
template <typename scalar_t>
void add_clients(Prefetcher& prefetch, const FactorView& v, int n, int64_t begin, int64_t end) {
  if (!dense_block(v.stride_t, v.stride_j, v.rows, n)) return;
  const int64_t bytes = v.rows * n * int64_t(sizeof(scalar_t));
  if (v.client_stride == v.rows * n) return prefetch.add(v.x[begin], (end - begin) * bytes);
  for (int64_t i = begin; i < end; ++i) prefetch.add(v.x[i], bytes);
}

// Adds what layer l reads first, where dense: its references, and its clients that fit the L2
// budget together (all of both views), or else the first client group of its aligned views (the
// covariances that open it). Prefetched while the previous layer computes, those DRAM reads overlap
// its FMAs; the layer then starts from L2. Paired, cold inputs, against no prefetch: RoBERTa N = 3
// r = 4-16, every align mode, fp32 and bf16 0.78-0.92x; RoBERTa N = 10 r = 16 and Llama-3-8B
// (client groups) 0.97-0.99x; warm inputs 0.98-1.00x.
template <typename scalar_t>
void add_layer_start(Prefetcher& prefetch, const GroupParams& p, int64_t l) {
  const int n = p.layers[l].n;
  const bool whole = layer_client_bytes<scalar_t>(p, l) <= l2_budget_bytes();
  const int64_t clients = whole ? p.num_clients : client_group<scalar_t>(p, l);
  for (int f = 0; f < 2; ++f) {
    const FactorView& v = p.views[2 * l + f];
    if (v.ref != nullptr && dense_block(v.ref_stride_t, v.ref_stride_j, v.rows, n))
      prefetch.add(v.ref, v.rows * n * int64_t(sizeof(scalar_t)));
    if (whole || v.ref != nullptr) add_clients<scalar_t>(prefetch, v, n, 0, clients);
  }
}

// Layer l: its rotations, then its aggregates. When its clients fit the L2 budget, by row chunks
// over all clients, which the covariances left in L2. Else a few clients at a time: their
// rotations, then the tile kernels for those clients (Clients; partial: R × rows sums of both views),
// which read the factors the covariances just brought into L2 instead of from DRAM a second time;
// then the rows the tiles leave (the A tail, other layouts) by row chunks over all clients.
// The last tile kernels of the layer prefetch the start of layer `next` (add_layer_start; -1: none).
template <typename scalar_t, typename acc_t, int R>
void align_and_aggregate_layer(const GroupParams& p, int64_t l, int64_t next, std::vector<acc_t>& partial,
                               CovarianceTiles& tiles) {
  const int64_t first = l * p.num_clients;
  // A plain average reads each client once (weighted_sum_rows), so it needs no client groups.
  if (layer_client_bytes<scalar_t>(p, l) <= l2_budget_bytes() || plain_average_layer<acc_t>(p, l)) {
    rotate_clients<scalar_t, acc_t, R>(p, first, first + p.num_clients, tiles);
    Prefetcher prefetch;
    if (next >= 0) add_layer_start<scalar_t>(prefetch, p, next);
    return aggregate_chunks<scalar_t, acc_t, R>(p, p.views[2 * l].chunk_begin, layer_chunks_end(p, l), &prefetch);
  }
  bool finite = true;
  const int n = p.layers[l].n;
  const int64_t group = client_group<scalar_t>(p, l);
  int64_t done[2] = {0, 0};
  const int64_t rows_a = p.views[2 * l].rows, rows = rows_a + p.views[2 * l + 1].rows;
  if (partial.size() < size_t(R * rows)) partial.resize(size_t(R * rows));
  acc_t* const partials[2] = {partial.data(), partial.data() + R * rows_a};  // per view
  // Where one view aligns, it goes first: the covariances left it in L2. While the tile kernels
  // compute, they prefetch the second view of these clients and the next clients' aligned views.
  const bool b_first = p.views[2 * l].ref == nullptr && p.views[2 * l + 1].ref != nullptr;
  const int order[2] = {b_first ? 1 : 0, b_first ? 0 : 1};
  for (int64_t i = 0; i < p.num_clients; i += group) {
    const int64_t end = std::min<int64_t>(p.num_clients, i + group);
    rotate_clients<scalar_t, acc_t, R>(p, first + i, first + end, tiles);
    Prefetcher prefetch;
    if (p.views[2 * l + order[1]].ref == nullptr) add_clients<scalar_t>(prefetch, p.views[2 * l + order[1]], n, i, end);
    for (int f : order)
      if (p.views[2 * l + f].ref != nullptr)
        add_clients<scalar_t>(prefetch, p.views[2 * l + f], n, end, std::min<int64_t>(p.num_clients, end + group));
    if (end == p.num_clients && next >= 0) add_layer_start<scalar_t>(prefetch, p, next);
    for (int f : order) {
      const FactorView& v = p.views[2 * l + f];
      if (has_tile_layout(v))
        done[f] = aggregate_tiles<scalar_t, acc_t, R>(p, v, n, 0, v.rows, {i, end, partials[f], &prefetch}, finite);
    }
  }
  for (int f = 0; f < 2; ++f) {
    const FactorView& v = p.views[2 * l + f];
    for (int64_t t0 = done[f]; t0 < v.rows; t0 += kChunkRows)
      aggregate_chunk<scalar_t, acc_t, R>(p, v, n, t0, std::min(kChunkRows, v.rows - t0), finite);
  }
  if (!finite) __atomic_fetch_or(p.status, kStatusAggregateNonfinite, __ATOMIC_RELAXED);
}

// Both passes layer by layer, parallel over layers: the aggregation reads a layer's clients again
// from this core's L2 (align_and_aggregate_layer) rather than from L3 or DRAM.
// The same kernels produce every output element, so the result is that of the two-pass split.
template <typename scalar_t, typename acc_t, int R>
void layer_pass(const GroupParams& p) {
  at::parallel_for(0, p.num_layers, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> partial;
    CovarianceTiles tiles;
    for (int64_t l = begin; l < end; ++l)
      align_and_aggregate_layer<scalar_t, acc_t, R>(p, l, l + 1 < end ? l + 1 : -1, partial, tiles);
  });
}

// Parallelism over layers balances as well as over (layer, client) and row chunks when every thread
// gets at least this many layers' worth of rows, the largest layer counting as one.
constexpr int64_t kLayersPerThread = 4;

bool layers_balance(const GroupParams& p) {
  int64_t largest = 0;
  for (int64_t l = 0; l < p.num_layers; ++l)
    largest = std::max(largest, layer_chunks_end(p, l) - p.views[2 * l].chunk_begin);
  return largest * kLayersPerThread * at::get_num_threads() <= p.num_chunks;
}

// Both passes for one rank bucket; the tables stay on the host.
void run_group_cpu(const GroupTables& t, GroupParams p, int bucket, const at::Tensor& first,
                   const at::Tensor& weights) {
  p.views = t.views.data();
  p.layers = t.layers.data();
  dispatch_float_types(first.scalar_type(), [&](auto scalar_tag) {
    using scalar_t = typename decltype(scalar_tag)::type;
    using acc_t = acc_type_t<scalar_t>;
    dispatch_rank_bucket(bucket, [&](auto rank) {
      constexpr int R = decltype(rank)::value;
      const int64_t coefs = int64_t(t.layers.size()) * p.num_clients * R * R * (kAmxBucket<scalar_t, R> ? 3 : 1);
      const at::Tensor coef = at::empty({coefs}, weights.options());  // client_coef, client_coef_pairs
      p.coef = coef.data_ptr();
      if (layers_balance(p)) return layer_pass<scalar_t, acc_t, R>(p);
      rotations_pass<scalar_t, acc_t, R>(p);
      aggregate_pass<scalar_t, acc_t, R>(p);
    });
  });
}

AlignAggregateResult align_and_aggregate_cpu(at::TensorList A, at::TensorList B, const RefList& ref_A,
                                             const RefList& ref_B, const at::Tensor& weights, at::IntArrayRef align,
                                             const at::Tensor& lam, bool allow_reflection) {
  return align_and_aggregate_impl(A, B, ref_A, ref_B, weights, align, lam, allow_reflection, &run_group_cpu);
}

AlignAggregateResult align_and_aggregate_clients_cpu(at::TensorList A, at::TensorList B, const RefList& ref_A,
                                                     const RefList& ref_B, const at::Tensor& weights,
                                                     at::IntArrayRef align, const at::Tensor& lam,
                                                     bool allow_reflection) {
  return align_and_aggregate_clients_impl(A, B, ref_A, ref_B, weights, align, lam, allow_reflection, &run_group_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(fedrot_ext, CPU, m) {
  m.impl("align_and_aggregate", &align_and_aggregate_cpu);
  m.impl("align_and_aggregate_clients", &align_and_aggregate_clients_cpu);
}

}  // namespace fedrot
