// CPU path of the fused op: pass 1 is parallel over (layer, client) and
// computes M_i and R_i in one go; pass 2 is parallel over row chunks of all
// layers and writes Σ_i X_i (w_i R_i). Each output element is produced by one
// task in a fixed order, so results do not depend on the thread count.
#include <algorithm>

#include <ATen/Parallel.h>

#include "align_aggregate_cpu.h"
#include "dispatch.h"
#include "rotation_stage.h"

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

// M += X_iᵀ Y over all rows of one view (M is R × R, zero-padded).
template <typename scalar_t, typename acc_t, int R>
void accumulate_covariance(const FactorView& v, int64_t client, int n, acc_t* M) {
  alignas(64) acc_t xb[kChunkRows][R] = {};
  alignas(64) acc_t yb[kChunkRows][R] = {};
  const scalar_t* x = static_cast<const scalar_t*>(v.x) + client * v.client_stride;
  const scalar_t* y = static_cast<const scalar_t*>(v.ref);
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

template <typename scalar_t, typename acc_t, int R>
void rotations_pass(const GroupParams& p) {
  const int64_t tasks = int64_t(p.num_layers) * p.num_clients;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    PolarScratch<acc_t, R> scratch;
    alignas(64) acc_t M[R * R];
    alignas(64) acc_t Rot[R * R];
    for (int64_t li = begin; li < end; ++li) {
      const int64_t l = li / p.num_clients, i = li % p.num_clients;
      std::fill(M, M + R * R, acc_t(0));
      for (int f = 0; f < 2 && p.align != kAlignNone; ++f) {
        const FactorView& v = p.views[2 * l + f];
        if (v.ref != nullptr) accumulate_covariance<scalar_t, acc_t, R>(v, i, p.layers[l].n, M);
      }
      rotation_from_covariance<acc_t, R>(p, li, M, Rot, scratch);
    }
  });
}

template <typename scalar_t, typename acc_t, int R>
void aggregate_pass(const GroupParams& p) {
  const int num_views = 2 * p.num_layers;
  at::parallel_for(0, p.num_chunks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t xb[kChunkRows][R] = {};
    alignas(64) acc_t acc[kChunkRows][R];
    bool finite = true;
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const FactorView& v = p.views[find_view(p.views, num_views, chunk)];
      const int n = p.layers[v.layer].n;
      const int64_t t0 = (chunk - v.chunk_begin) * kChunkRows;
      const int64_t rows = std::min(kChunkRows, v.rows - t0);
      std::fill(&acc[0][0], &acc[0][0] + kChunkRows * R, acc_t(0));
      for (int64_t i = 0; i < p.num_clients; ++i) {
        const scalar_t* x = static_cast<const scalar_t*>(v.x) + i * v.client_stride + t0 * v.stride_t;
        load_block<scalar_t, acc_t, R>(x, v.stride_t, v.stride_j, rows, n, xb);
        const acc_t* C = static_cast<const acc_t*>(p.coef) + (int64_t(v.layer) * p.num_clients + i) * R * R;
        for (int64_t t = 0; t < rows; ++t)
          for (int k = 0; k < n; ++k) {
            const acc_t xv = xb[t][k];
            for (int j = 0; j < R; ++j) acc[t][j] += xv * C[k * R + j];
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
    if (!finite) __atomic_store_n(p.status, 1, __ATOMIC_RELAXED);
  });
}

}  // namespace

void align_aggregate_cpu(const GroupParams& params, c10::ScalarType dtype, int bucket) {
  dispatch_float_types(dtype, [&](auto scalar_tag) {
    using scalar_t = typename decltype(scalar_tag)::type;
    using acc_t = acc_type_t<scalar_t>;
    dispatch_rank_bucket(bucket, [&](auto rank) {
      rotations_pass<scalar_t, acc_t, decltype(rank)::value>(params);
      aggregate_pass<scalar_t, acc_t, decltype(rank)::value>(params);
    });
  });
}

}  // namespace fedrot
