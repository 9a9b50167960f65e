#pragma once

#include <c10/core/ScalarType.h>

#include "align_aggregate.h"

namespace fedrot {

// Three launches for one rank bucket on the current stream: cross-covariance
// partials, rotations, aggregation. `params` points at device tables.
void align_aggregate_cuda(const GroupParams& params, c10::ScalarType dtype, int bucket);

// Covariance splits along T so that small L·N still fills the GPU; the
// workspace holds num_layers * N * splits * R * R accumulators.
int covariance_splits(int64_t layer_clients, int64_t max_rows);

}  // namespace fedrot
