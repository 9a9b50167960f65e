#pragma once

#include <c10/core/ScalarType.h>

#include "align_aggregate.h"

namespace fedrot {

// Runs both passes for one rank bucket on host memory (tables on the host).
void align_aggregate_cpu(const GroupParams& params, c10::ScalarType dtype, int bucket);

}  // namespace fedrot
