// The rotation-only op: soft orthogonal Procrustes on a batch of r×r matrices
// with the same header math as the fused op (common/polar.h). The front
// (procrustes_rotation.cpp) is shared; each backend registers it with its own
// batch solver (cpu/procrustes_rotation_cpu.cpp, cuda/procrustes_rotation_cuda.cu).
#pragma once

#include <ATen/core/Tensor.h>

namespace fedrot {

// Solves every matrix of M into out: both contiguous (batch, n, n), float or
// double, batch >= 1, n <= bucket (`bucket` = R, a compiled rank bucket).
using BatchRotationRunner = void (*)(const at::Tensor& M, at::Tensor& out, double lam, bool allow_reflection,
                                     int bucket);

// The op for any device: checks, batching, the ATen fallback above the
// compiled buckets, and `run_batch` otherwise.
at::Tensor procrustes_rotation_impl(const at::Tensor& M, double lam, bool allow_reflection,
                                    BatchRotationRunner run_batch);

}  // namespace fedrot
