// CUDA backend of the rotation-only op: one thread per matrix, its scratch in
// a shared-memory slot, on the current stream.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/dispatch.h"
#include "cuda/shared_memory_rotation_slots.cuh"
#include "procrustes_rotation.h"

namespace fedrot {
namespace {

template <typename T, int R>
__global__ void procrustes_rotation_kernel(const T* M, T* out, int64_t batch, int n, T lam, bool allow_reflection) {
  extern __shared__ __align__(16) unsigned char smem[];
  auto& slot = reinterpret_cast<RotationSlot<T, R>*>(smem)[threadIdx.x];
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  for (int a = 0; a < n; ++a)
    for (int c = 0; c < n; ++c) slot.M[a * R + c] = M[(b * n + a) * n + c];
  soft_procrustes<T, R>(slot.M, slot.Rot, n, lam, allow_reflection, slot.scratch);
  for (int a = 0; a < n; ++a)
    for (int c = 0; c < n; ++c) out[(b * n + a) * n + c] = slot.Rot[a * R + c];
}

void rotate_batch_cuda(const at::Tensor& M, at::Tensor& out, double lam, bool allow_reflection, int bucket) {
  const c10::cuda::CUDAGuard guard(M.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t batch = M.size(0);
  const int n = int(M.size(-1));
  dispatch_acc_types(M.scalar_type(), [&](auto acc_tag) {
    using T = typename decltype(acc_tag)::type;
    dispatch_rank_bucket(bucket, [&](auto rank) {
      constexpr int R = decltype(rank)::value;
      const int slots = rotation_slots_per_block<T, R>();
      const size_t smem = slots * sizeof(RotationSlot<T, R>);
      allow_dynamic_smem(procrustes_rotation_kernel<T, R>, smem);
      procrustes_rotation_kernel<T, R><<<(batch + slots - 1) / slots, slots, smem, stream>>>(
          M.data_ptr<T>(), out.data_ptr<T>(), batch, n, T(lam), allow_reflection);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor procrustes_rotation_cuda(const at::Tensor& M, double lam, bool allow_reflection) {
  return procrustes_rotation_impl(M, lam, allow_reflection, &rotate_batch_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(fedrot_ext, CUDA, m) { m.impl("procrustes_rotation", &procrustes_rotation_cuda); }

}  // namespace fedrot
