#pragma once

#include <ATen/core/Tensor.h>

namespace fedrot {

// M and out: contiguous (batch, n, n), float or double, n <= bucket.
void procrustes_rotation_cpu(const at::Tensor& M, at::Tensor& out, double lam, bool allow_reflection, int bucket);
#ifdef FEDROT_WITH_CUDA
void procrustes_rotation_cuda(const at::Tensor& M, at::Tensor& out, double lam, bool allow_reflection, int bucket);
#endif

}  // namespace fedrot
