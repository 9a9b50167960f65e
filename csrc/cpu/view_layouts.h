// Layout predicates of a FactorView: which of the dense layouts (t contiguous, the A factors; j
// contiguous, the B factors) its client, reference and output views have, which decides the
// covariance and aggregation kernels that can read it and whether it can be prefetched as one block.

#pragma once

#include <cstdint>

#include "align_aggregate.h"

namespace fedrot {

namespace {  // internal linkage: see cpu/align_aggregate_cpu.cpp

// Whether v's client and reference are both t-contiguous (A layout) or both j-contiguous (B).
inline bool t_contiguous_pair(const FactorView& v) { return v.stride_t == 1 && v.ref_stride_t == 1; }
inline bool j_contiguous_pair(const FactorView& v) { return v.stride_j == 1 && v.ref_stride_j == 1; }

// Whether v is dense along t (A) or along j (B) in input and output: the layouts of the tile kernels.
inline bool has_tile_layout(const FactorView& v) {
  return (v.stride_t == 1 && v.out_stride_t == 1) || (v.stride_j == 1 && v.out_stride_j == 1);
}

// Whether a (rows × n) view with these strides is one dense block (A or B layout).
inline bool dense_block(int64_t stride_t, int64_t stride_j, int64_t rows, int n) {
  return (stride_t == 1 && stride_j == rows) || (stride_j == 1 && stride_t == n);
}

}  // namespace

}  // namespace fedrot
