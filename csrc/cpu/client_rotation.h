// The rotation of one (layer, client) task: the covariance M_i of its aligned views against their
// references (AMX tiles where they run, else the kernel kernel_choice.h picks), the soft Procrustes
// rotation R_i from it, and the coefficients w_i R_i the aggregation multiplies by (and their bf16
// pairs for the AMX kernels). Client 0's task also checks that each reference is finite.

#pragma once

#include <algorithm>
#include <cstdint>

#include "align_aggregate.h"
#include "common/rotation_coefficients.h"
#include "cpu/amx_kernels.h"
#include "cpu/client_coefficients.h"
#include "cpu/kernel_choice.h"
#include "cpu/simd.h"

namespace fedrot {

namespace {  // internal linkage: see cpu/align_aggregate_cpu.cpp

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

}  // namespace

}  // namespace fedrot
