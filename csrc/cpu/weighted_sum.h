// Unaligned layers (align "none": FedIT, and fedrot's round 0) and layers at λ = 0: every client's
// coefficient matrix is w_i I, so the aggregate is the plain weighted sum Σ_i w_i X_i. One FMA per value
// read instead of the n of the general kernels, which keeps these layers at the memory's speed
// at any rank. Each output element is Σ_i w_i x_i accumulated in client order, one rounding per
// client; the general kernels' result for such a layer can differ from it in the last bit.
#pragma once

#include <algorithm>
#include <cstring>

#include "align_aggregate.h"
#include "cpu/simd.h"

namespace fedrot {

// Whether layer l's rotations are all I: no alignment, or λ <= 0 (NaN too), which the rotation
// step clamps to 0 (common/rotation_coefficients.h).
template <typename acc_t>
inline bool plain_average_layer(const GroupParams& p, int64_t l) {
  const LayerInfo& layer = p.layers[l];
  return layer.align == kAlignNone || !(static_cast<const acc_t*>(p.lam)[layer.lam_index] > acc_t(0));
}

// Rows [t0, t0 + rows) of view v: out = Σ_i w_i x_i, read along the contiguous dimension of the
// clients (t for A, j for B), a line ahead prefetched per client; `finite` is cleared if any stored
// value is NaN/Inf.
template <typename scalar_t, typename acc_t>
void weighted_sum_rows(const GroupParams& p, const FactorView& v, int n, int64_t t0, int64_t rows, bool& finite) {
  using S = Simd<acc_t, kVectorBytes>;
  using V = typename S::type;
  constexpr int L = S::lanes;
  constexpr int kMaxInner = 64;  // rows <= kChunkRows and n <= the largest rank bucket
  static_assert(kChunkRows <= kMaxInner, "a chunk's rows fit the accumulator row");
  const acc_t* w = static_cast<const acc_t*>(p.weights);
  const bool t_inner = v.stride_t == 1;
  const int64_t outer = t_inner ? n : rows, inner = t_inner ? rows : n;
  const int64_t so = t_inner ? v.stride_j : v.stride_t, si = t_inner ? v.stride_t : v.stride_j;
  const int64_t oo = t_inner ? v.out_stride_j : v.out_stride_t, oi = t_inner ? v.out_stride_t : v.out_stride_j;
  const int64_t base = t0 * v.stride_t, out_base = t0 * v.out_stride_t;  // the chunk's first row
  alignas(64) acc_t acc[kMaxInner];
  V check = {};
  for (int64_t o = 0; o < outer; ++o) {
    std::fill(acc, acc + inner, acc_t(0));
    for (int64_t i = 0; i < p.num_clients; ++i) {
      const scalar_t* x = static_cast<const scalar_t*>(v.x[i]) + base + o * so;
      const acc_t wi = w[i];
      int64_t e = 0;
      if (si == 1) {
        if (t_inner)  // this row's next chunk: N·n short streams, more than the hardware prefetcher follows
          for (int64_t c = 0; c < inner * int64_t(sizeof(scalar_t)); c += 64)
            __builtin_prefetch(reinterpret_cast<const char*>(x + inner) + c);
        for (; e + L <= inner; e += L) {
          V a;
          std::memcpy(&a, acc + e, sizeof a);
          a += wi * load_lanes_widened<V, scalar_t, L>(x + e);
          std::memcpy(acc + e, &a, sizeof a);
        }
      }
      for (; e < inner; ++e) acc[e] += wi * static_cast<acc_t>(x[e * si]);
    }
    scalar_t* out = static_cast<scalar_t*>(v.out) + out_base + o * oo;
    int64_t e = 0;
    if (oi == 1)
      for (; e + L <= inner; e += L) {
        V a;
        std::memcpy(&a, acc + e, sizeof a);
        store_lanes<V, scalar_t, acc_t, L>(out + e, a, check);
      }
    for (; e < inner; ++e) {
      const scalar_t value = static_cast<scalar_t>(acc[e]);
      finite = finite && fr_isfinite(static_cast<acc_t>(value));
      out[e * oi] = value;
    }
  }
  finite = finite && lanes_all_zero<V, L>(check);
}

}  // namespace fedrot
