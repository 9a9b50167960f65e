// CUDA path of the fused op: for one rank bucket R, exactly three kernels on
// the current stream, whatever the number of layers and clients, with no
// host synchronisation:
//   1. cross_covariance_kernel: partial M for each (layer, client, split)
//   2. rotation_kernel: sums the splits in a fixed order (deterministic) and
//      solves the soft Procrustes problem with the shared header math
//   3. aggregate_kernel: one block per row chunk of any layer's factor
#include <algorithm>
#include <cstring>

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "align_aggregate.h"
#include "common/dispatch.h"
#include "common/rotation_coefficients.h"
#include "cuda/shared_memory_rotation_slots.cuh"

namespace fedrot {
namespace {

constexpr int kThreads = 256;
constexpr int kCovRows = 32;  // rows of X and Y staged per step

template <typename scalar_t, typename acc_t, int R>
__device__ void stage_block(const scalar_t* x, int64_t stride_t, int64_t stride_j, int64_t rows_left, int n,
                            int rows, acc_t (*buf)[R + 1]) {
  for (int e = threadIdx.x; e < rows * R; e += blockDim.x) {
    // Let consecutive threads read consecutive addresses.
    const int t = stride_t == 1 ? e % rows : e / R;
    const int j = stride_t == 1 ? e / rows : e % R;
    buf[t][j] = (t < rows_left && j < n) ? static_cast<acc_t>(x[t * stride_t + j * stride_j]) : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t, int R>
__global__ void __launch_bounds__(kThreads) cross_covariance_kernel(GroupParams p) {
  __shared__ acc_t xs[kCovRows][R + 1];
  __shared__ acc_t ys[kCovRows][R + 1];
  constexpr int kPerThread = (R * R + kThreads - 1) / kThreads;
  const int64_t task = blockIdx.x;
  const int64_t li = task / p.cov_splits, split = task % p.cov_splits;
  const int64_t l = li / p.num_clients, i = li % p.num_clients;
  const int n = p.layers[l].n;
  acc_t acc[kPerThread];
#pragma unroll
  for (int m = 0; m < kPerThread; ++m) acc[m] = acc_t(0);
  for (int f = 0; f < 2; ++f) {
    const FactorView& v = p.views[2 * l + f];
    if (v.ref == nullptr) continue;
    const int64_t span = (v.rows + p.cov_splits - 1) / p.cov_splits;
    const int64_t t_begin = split * span, t_end = min(v.rows, t_begin + span);
    const scalar_t* x = static_cast<const scalar_t*>(v.x[i]);
    const scalar_t* y = static_cast<const scalar_t*>(v.ref);
    for (int64_t t0 = t_begin; t0 < t_end; t0 += kCovRows) {
      stage_block<scalar_t, acc_t, R>(x + t0 * v.stride_t, v.stride_t, v.stride_j, t_end - t0, n, kCovRows, xs);
      stage_block<scalar_t, acc_t, R>(y + t0 * v.ref_stride_t, v.ref_stride_t, v.ref_stride_j, t_end - t0, n,
                                      kCovRows, ys);
      __syncthreads();
#pragma unroll
      for (int m = 0; m < kPerThread; ++m) {
        const int e = threadIdx.x + m * kThreads;
        if (e < R * R) {
          const int j = e / R, k = e % R;
          for (int t = 0; t < kCovRows; ++t) acc[m] += xs[t][j] * ys[t][k];
        }
      }
      __syncthreads();
    }
  }
  acc_t* out = static_cast<acc_t*>(p.cov) + task * R * R;
#pragma unroll
  for (int m = 0; m < kPerThread; ++m) {
    const int e = threadIdx.x + m * kThreads;
    if (e < R * R) out[e] = acc[m];
  }
}

template <typename acc_t, int R>
__global__ void rotation_kernel(GroupParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  auto& slot = reinterpret_cast<RotationSlot<acc_t, R>*>(smem)[threadIdx.x];
  const int64_t li = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (li >= int64_t(p.num_layers) * p.num_clients) return;
  if (p.any_aligned) {  // pass 1 did not run otherwise
    const acc_t* partial = static_cast<const acc_t*>(p.cov) + li * p.cov_splits * R * R;
    for (int e = 0; e < R * R; ++e) {
      acc_t sum = 0;
      for (int s = 0; s < p.cov_splits; ++s) sum += partial[s * R * R + e];  // fixed order
      slot.M[e] = sum;
    }
  }
  rotation_from_covariance<acc_t, R>(p, li, slot.M, slot.Rot, slot.scratch);
}

template <typename scalar_t, typename acc_t, int R>
__global__ void __launch_bounds__(kThreads) aggregate_kernel(GroupParams p) {
  __shared__ acc_t xs[kChunkRows][R + 1];
  constexpr int kPerThread = (int(kChunkRows) * R + kThreads - 1) / kThreads;
  const int64_t chunk = blockIdx.x;
  const FactorView& v = p.views[find_view(p.views, 2 * p.num_layers, chunk)];
  const int n = p.layers[v.layer].n;
  const int64_t t0 = (chunk - v.chunk_begin) * kChunkRows;
  const int64_t rows_left = v.rows - t0;
  // Output-coalesced ownership: t fastest when the output is t-contiguous (A).
  const bool t_fast = v.out_stride_t == 1;
  acc_t acc[kPerThread];
#pragma unroll
  for (int m = 0; m < kPerThread; ++m) acc[m] = acc_t(0);
  for (int64_t i = 0; i < p.num_clients; ++i) {
    const scalar_t* x = static_cast<const scalar_t*>(v.x[i]) + t0 * v.stride_t;
    stage_block<scalar_t, acc_t, R>(x, v.stride_t, v.stride_j, rows_left, n, int(kChunkRows), xs);
    __syncthreads();
    const acc_t* C = static_cast<const acc_t*>(p.coef) + (int64_t(v.layer) * p.num_clients + i) * R * R;
#pragma unroll
    for (int m = 0; m < kPerThread; ++m) {
      const int e = threadIdx.x + m * kThreads;
      const int t = t_fast ? e % int(kChunkRows) : e / R;
      const int j = t_fast ? e / int(kChunkRows) : e % R;
      if (e < kChunkRows * R && j < n)
        for (int k = 0; k < n; ++k) acc[m] += xs[t][k] * C[k * R + j];
    }
    __syncthreads();
  }
  scalar_t* out = static_cast<scalar_t*>(v.out) + t0 * v.out_stride_t;
  bool finite = true;
#pragma unroll
  for (int m = 0; m < kPerThread; ++m) {
    const int e = threadIdx.x + m * kThreads;
    const int t = t_fast ? e % int(kChunkRows) : e / R;
    const int j = t_fast ? e / int(kChunkRows) : e % R;
    if (e < kChunkRows * R && j < n && t < rows_left) {
      const scalar_t value = static_cast<scalar_t>(acc[m]);
      finite = finite && fr_isfinite(static_cast<acc_t>(value));
      out[t * v.out_stride_t + j * v.out_stride_j] = value;
    }
  }
  if (!finite) atomicOr(p.status, kStatusAggregateNonfinite);
}

// Covariance splits along T so that small L·N still fills the GPU; the
// workspace holds num_layers * N * splits * R * R accumulators.
int covariance_splits(int64_t layer_clients, int64_t max_rows) {
  // Aim for >= ~2048 blocks in pass 1, each covering >= 256 rows.
  const int64_t want = (2048 + layer_clients - 1) / layer_clients;
  const int64_t most = std::max<int64_t>(1, max_rows / 256);
  return int(std::max<int64_t>(1, std::min(want, most)));
}

// Three launches for one rank bucket on the current stream: cross-covariance
// partials, rotations, aggregation. `p` points at device tables.
void launch_group(const GroupParams& p, c10::ScalarType dtype, int bucket) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t layer_clients = int64_t(p.num_layers) * p.num_clients;
  dispatch_float_types(dtype, [&](auto scalar_tag) {
    using scalar_t = typename decltype(scalar_tag)::type;
    using acc_t = acc_type_t<scalar_t>;
    dispatch_rank_bucket(bucket, [&](auto rank) {
      constexpr int R = decltype(rank)::value;
      if (p.any_aligned) {
        cross_covariance_kernel<scalar_t, acc_t, R><<<layer_clients * p.cov_splits, kThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      const int slots = rotation_slots_per_block<acc_t, R>();
      const size_t smem = slots * sizeof(RotationSlot<acc_t, R>);
      allow_dynamic_smem(rotation_kernel<acc_t, R>, smem);
      rotation_kernel<acc_t, R><<<(layer_clients + slots - 1) / slots, slots, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      aggregate_kernel<scalar_t, acc_t, R><<<p.num_chunks, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// Tables go to the device through pinned memory and an async copy on the
// current stream: no host synchronisation. The views' client pointers are
// rewritten to the device copy of the pointer table before the upload.
void run_group_cuda(const GroupTables& t, GroupParams p, int bucket, const at::Tensor& first,
                    const at::Tensor& weights) {
  const c10::cuda::CUDAGuard guard(first.device());
  const size_t view_bytes = t.views.size() * sizeof(FactorView), layer_bytes = t.layers.size() * sizeof(LayerInfo);
  const size_t client_bytes = t.clients.size() * sizeof(const void*);
  static_assert(sizeof(FactorView) % alignof(const void*) == 0 && sizeof(LayerInfo) % alignof(const void*) == 0,
                "the pointer table follows the views and layers aligned");
  const int64_t bytes = int64_t(view_bytes + layer_bytes + client_bytes);
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  at::Tensor table = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(first.device()));
  char* h = static_cast<char*>(host.data_ptr());
  const auto* device_clients = reinterpret_cast<const void* const*>(static_cast<char*>(table.data_ptr()) + view_bytes +
                                                                     layer_bytes);
  auto* views = reinterpret_cast<FactorView*>(h);
  std::memcpy(views, t.views.data(), view_bytes);
  for (size_t k = 0; k < t.views.size(); ++k) views[k].x = device_clients + (t.views[k].x - t.clients.data());
  std::memcpy(h + view_bytes, t.layers.data(), layer_bytes);
  std::memcpy(h + view_bytes + layer_bytes, t.clients.data(), client_bytes);
  table.copy_(host, /*non_blocking=*/true);
  const int64_t R = bucket, layer_clients = int64_t(t.layers.size()) * p.num_clients;
  p.cov_splits = covariance_splits(layer_clients, t.max_rows);
  const at::Tensor coef = at::empty({layer_clients * R * R}, weights.options());
  const at::Tensor cov =
      at::empty({!p.any_aligned ? 0 : layer_clients * p.cov_splits * R * R}, weights.options());
  p.views = reinterpret_cast<const FactorView*>(table.data_ptr());
  p.layers = reinterpret_cast<const LayerInfo*>(static_cast<const char*>(table.data_ptr()) + view_bytes);
  p.coef = coef.data_ptr();
  p.cov = cov.data_ptr();
  launch_group(p, first.scalar_type(), bucket);
}

AlignAggregateResult align_and_aggregate_clients_cuda(at::TensorList A, at::TensorList B, const RefList& ref_A,
                                                      const RefList& ref_B, const at::Tensor& weights,
                                                      at::IntArrayRef align, const at::Tensor& lam,
                                                      bool allow_reflection) {
  return align_and_aggregate_clients_impl(A, B, ref_A, ref_B, weights, align, lam, allow_reflection, &run_group_cuda);
}

AlignAggregateResult align_and_aggregate_cuda(at::TensorList A, at::TensorList B, const RefList& ref_A,
                                              const RefList& ref_B, const at::Tensor& weights, at::IntArrayRef align,
                                              const at::Tensor& lam, bool allow_reflection) {
  return align_and_aggregate_impl(A, B, ref_A, ref_B, weights, align, lam, allow_reflection, &run_group_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(fedrot_ext, CUDA, m) {
  m.impl("align_and_aggregate", &align_and_aggregate_cuda);
  m.impl("align_and_aggregate_clients", &align_and_aggregate_clients_cuda);
}

}  // namespace fedrot
