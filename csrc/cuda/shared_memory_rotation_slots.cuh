// Shared-memory scratch slots for one-thread-per-matrix rotations: one thread
// solves one r×r problem with the shared header math, and its scratch lives
// in shared memory instead of local memory (which, at r = 64, would make the
// driver reserve tens of GiB of local memory for a full-occupancy launch).
#pragma once

#include <algorithm>

#include <cuda_runtime.h>
#include <c10/cuda/CUDAException.h>

#include "common/polar.h"

namespace fedrot {

template <typename acc_t, int R>
struct RotationSlot {
  PolarScratch<acc_t, R> scratch;
  acc_t M[R * R];
  acc_t Rot[R * R];
};

// Threads (= slots) per block: about 40 KiB of slots, at least one.
template <typename acc_t, int R>
int rotation_slots_per_block() {
  return std::max<int>(1, std::min<int>(64, int(40960 / sizeof(RotationSlot<acc_t, R>))));
}

// Opts the kernel in to more than 48 KiB of dynamic shared memory when needed.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  }
}

}  // namespace fedrot
