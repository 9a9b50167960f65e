// The per-(layer, client) step between the two passes of align_and_aggregate,
// identical on CPU and GPU: M_i -> R_i (soft Procrustes with the layer's own
// mode and λ, or I for align = none), written out as the returned rotation and as the zero-padded
// coefficient w_i R_i that the aggregation pass multiplies X_i by.
#pragma once

#include "align_aggregate.h"
#include "common/polar.h"

namespace fedrot {

// `li` = layer * N + client within the group. M is used as scratch.
template <typename acc_t, int R>
FR_HD void rotation_from_covariance(const GroupParams& p, int64_t li, acc_t* M, acc_t* Rot,
                                    PolarScratch<acc_t, R>& scratch) {
  const int64_t l = li / p.num_clients, i = li % p.num_clients;
  const LayerInfo& layer = p.layers[l];
  const int n = layer.n;
  if (layer.align == kAlignNone) {
    set_identity<acc_t, R>(Rot, n);
  } else {
    const acc_t lam = static_cast<const acc_t*>(p.lam)[layer.lam_index];
    // Clamped for direct torch.ops callers (the Python front checks λ); NaN gives 0.
    soft_procrustes<acc_t, R>(M, Rot, n, lam > acc_t(1) ? acc_t(1) : (lam > acc_t(0) ? lam : acc_t(0)),
                              p.allow_reflection, scratch);
  }
  const acc_t w = static_cast<const acc_t*>(p.weights)[i];
  acc_t* rot_out = static_cast<acc_t*>(p.layers[l].rotations) + i * n * n;
  acc_t* coef = static_cast<acc_t*>(p.coef) + li * R * R;
  for (int a = 0; a < R; ++a)
    for (int b = 0; b < R; ++b) {
      const bool active = a < n && b < n;
      coef[a * R + b] = active ? w * Rot[a * R + b] : acc_t(0);
      if (active) rot_out[a * n + b] = Rot[a * R + b];
    }
}

}  // namespace fedrot
