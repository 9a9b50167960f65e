// CPU backend of the fused op: allocates the coefficients of each rank bucket, picks the schedule
// (cpu/schedule.h) and registers the CPU kernels of align_and_aggregate and
// align_and_aggregate_clients. Each output element is produced by one task in a fixed order, so
// results do not depend on the thread count. The kernel and schedule headers it includes are parts
// of this one translation unit and keep internal linkage (unnamed namespaces), so that GCC inlines
// and vectorizes the kernels into their callers as it would in one file: FMA contraction and
// vectorization are decided after inlining, so a change of linkage or inlining can change the last
// bits of the results.

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "align_aggregate.h"
#include "common/dispatch.h"
#include "cpu/client_coefficients.h"
#include "cpu/schedule.h"

namespace fedrot {

namespace {

// Both passes for one rank bucket; the tables stay on the host.
void run_group_cpu(const GroupTables& t, GroupParams p, int bucket, const at::Tensor& first,
                   const at::Tensor& weights) {
  p.views = t.views.data();
  p.layers = t.layers.data();
  dispatch_float_types(first.scalar_type(), [&](auto scalar_tag) {
    using scalar_t = typename decltype(scalar_tag)::type;
    using acc_t = acc_type_t<scalar_t>;
    dispatch_rank_bucket(bucket, [&](auto rank) {
      constexpr int R = decltype(rank)::value;
      const int64_t coefs = int64_t(t.layers.size()) * p.num_clients * R * R * (kAmxBucket<scalar_t, R> ? 3 : 1);
      const at::Tensor coef = at::empty({coefs}, weights.options());  // client_coef, client_coef_pairs
      p.coef = coef.data_ptr();
      if (layers_balance(p)) return layer_pass<scalar_t, acc_t, R>(p);
      rotations_pass<scalar_t, acc_t, R>(p);
      aggregate_pass<scalar_t, acc_t, R>(p);
    });
  });
}

AlignAggregateResult align_and_aggregate_cpu(at::TensorList A, at::TensorList B, const RefList& ref_A,
                                             const RefList& ref_B, const at::Tensor& weights, at::IntArrayRef align,
                                             const at::Tensor& lam, bool allow_reflection) {
  return align_and_aggregate_impl(A, B, ref_A, ref_B, weights, align, lam, allow_reflection, &run_group_cpu);
}

AlignAggregateResult align_and_aggregate_clients_cpu(at::TensorList A, at::TensorList B, const RefList& ref_A,
                                                     const RefList& ref_B, const at::Tensor& weights,
                                                     at::IntArrayRef align, const at::Tensor& lam,
                                                     bool allow_reflection) {
  return align_and_aggregate_clients_impl(A, B, ref_A, ref_B, weights, align, lam, allow_reflection, &run_group_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(fedrot_ext, CPU, m) {
  m.impl("align_and_aggregate", &align_and_aggregate_cpu);
  m.impl("align_and_aggregate_clients", &align_and_aggregate_clients_cpu);
}

}  // namespace fedrot
