// Front of the fused align-and-aggregate op: argument checks (messages say
// what was expected), output allocation, the per-rank-bucket tables, and the
// hand-off to the backend's runner (each backend registers the op itself).
// The Python wrapper validates values (weights, λ, NaN/Inf clients); the checks
// here keep direct torch.ops callers safe. NaN/Inf references and aggregates
// are reported through the status bits (align_aggregate.h), without a sync.
#include <algorithm>
#include <map>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>

#include "align_aggregate.h"
#include "common/dispatch.h"
#include "large_rank_fallback.h"

namespace fedrot {
namespace {

using at::Tensor;
using at::TensorList;

void check_same(const Tensor& t, const Tensor& first, const char* name, size_t l) {
  TORCH_CHECK_TYPE(t.scalar_type() == first.scalar_type(), name, "[", l, "]: expected dtype ", first.scalar_type(),
                   " (as A[0]), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == first.device(), name, "[", l, "]: expected device ", first.device(),
                    " (as A[0]), got ", t.device());
}

void check_ref(const RefList& refs, const char* name, size_t l, at::IntArrayRef shape, int64_t align,
               const Tensor& first) {
  const Tensor ref = ref_of(refs, l, true);
  TORCH_CHECK_VALUE(ref.defined(), name, "[", l, "]: expected a tensor of shape ", shape, " for align[", l, "]=", align,
                    ", got None");
  TORCH_CHECK_VALUE(ref.sizes() == shape, name, "[", l, "]: expected shape ", shape, ", got ", ref.sizes());
  check_same(ref, first, name, l);
}

void check_ref_count(const RefList& refs, const char* name, size_t layers) {
  TORCH_CHECK_VALUE(refs.size() == layers || refs.size() == 0, name, ": expected ", layers,
                    " entries (None where a layer's mode does not read it) or an empty list, got ", refs.size());
}

struct Outputs {
  std::vector<Tensor> A, B, rotations;
  Tensor status;
};

FactorView make_view(const Tensor& x, int64_t dim_t, int64_t dim_j, const Tensor& ref, const Tensor& out,
                     int64_t chunk_begin, int32_t layer) {
  FactorView v{};
  v.x = x.data_ptr();
  v.client_stride = x.stride(0);
  v.stride_t = x.stride(dim_t);
  v.stride_j = x.stride(dim_j);
  if (ref.defined()) {  // refs and outputs are 2-D: dims shift by one
    v.ref = ref.data_ptr();
    v.ref_stride_t = ref.stride(dim_t - 1);
    v.ref_stride_j = ref.stride(dim_j - 1);
  }
  v.out = out.data_ptr();
  v.out_stride_t = out.stride(dim_t - 1);
  v.out_stride_j = out.stride(dim_j - 1);
  v.rows = x.size(dim_t);
  v.chunk_begin = chunk_begin;
  v.layer = layer;
  return v;
}

// The references these layers' modes read, checked for NaN/Inf by ATen reductions
// (no sync). The fused CPU kernel checks them itself, as it reads them.
void flag_nonfinite_references(const std::vector<size_t>& layer_ids, const RefList& ref_A, const RefList& ref_B,
                               at::IntArrayRef align, Tensor& status) {
  for (size_t l : layer_ids)
    for (const Tensor& ref : {ref_of(ref_A, l, uses_A(align[l])), ref_of(ref_B, l, uses_B(align[l]))})
      if (ref.defined()) status.bitwise_or_(ref.isfinite().all().logical_not().to(at::kInt) * kStatusReferenceNonfinite);
}

GroupTables build_tables(const std::vector<size_t>& layer_ids, TensorList A, TensorList B, const RefList& ref_A,
                         const RefList& ref_B, at::IntArrayRef align, Outputs& out) {
  GroupTables t;
  for (size_t g = 0; g < layer_ids.size(); ++g) {
    const size_t l = layer_ids[g];
    // A_i (n, in): t = dim 2, j = dim 1.  B_i (out, n): t = dim 1, j = dim 2.
    t.views.push_back(make_view(A[l], 2, 1, ref_of(ref_A, l, uses_A(align[l])), out.A[l], t.num_chunks, int32_t(g)));
    t.num_chunks += (A[l].size(2) + kChunkRows - 1) / kChunkRows;
    t.views.push_back(make_view(B[l], 1, 2, ref_of(ref_B, l, uses_B(align[l])), out.B[l], t.num_chunks, int32_t(g)));
    t.num_chunks += (B[l].size(1) + kChunkRows - 1) / kChunkRows;
    t.max_rows = std::max({t.max_rows, A[l].size(2), B[l].size(1)});
    t.layers.push_back(LayerInfo{out.rotations[l].data_ptr(), int32_t(A[l].size(1)), int32_t(align[l]), int32_t(l), 0});
    t.any_aligned = t.any_aligned || align[l] != kAlignNone;
  }
  return t;
}

GroupParams group_params(const GroupTables& t, const Tensor& weights, const Tensor& lam, bool allow_reflection,
                         const Outputs& out) {
  GroupParams p{};
  p.weights = weights.data_ptr();
  p.lam = lam.data_ptr();
  p.status = out.status.data_ptr<int32_t>();
  p.num_chunks = t.num_chunks;
  p.num_layers = int32_t(t.layers.size());
  p.num_clients = int32_t(weights.size(0));
  p.cov_splits = 1;
  p.any_aligned = t.any_aligned;
  p.allow_reflection = allow_reflection;
  return p;
}

}  // namespace

Tensor ref_of(const RefList& refs, size_t l, bool used) {
  if (!used || l >= refs.size()) return Tensor();
  const std::optional<Tensor> ref = refs.get(l);
  return ref.has_value() ? *ref : Tensor();
}

void check_align_aggregate_inputs(TensorList A, TensorList B, const RefList& ref_A, const RefList& ref_B,
                                  const Tensor& weights, at::IntArrayRef align) {
  TORCH_CHECK_VALUE(!A.empty(), "A: expected a non-empty list of layer tensors");
  TORCH_CHECK_VALUE(A.size() == B.size(), "B: expected ", A.size(), " layer tensors to match A, got ", B.size());
  TORCH_CHECK_VALUE(align.size() == A.size(), "align: expected ", A.size(), " modes (one per layer), got ",
                    align.size());
  for (size_t l = 0; l < align.size(); ++l)
    TORCH_CHECK_VALUE(align[l] >= kAlignNone && align[l] <= kAlignAB, "align[", l,
                      "]: expected 0 (none), 1 (A), 2 (B) or 3 (AB), got ", align[l]);
  check_ref_count(ref_A, "ref_A", A.size());
  check_ref_count(ref_B, "ref_B", A.size());
  const Tensor& first = A[0];
  TORCH_CHECK_VALUE(first.dim() == 3 && first.size(0) > 0, "A[0]: expected a 3-D tensor (N, r, in) with N >= 1, got ",
                    first.sizes());
  const int64_t N = first.size(0);
  for (size_t l = 0; l < A.size(); ++l) {
    TORCH_CHECK_VALUE(A[l].dim() == 3 && A[l].size(0) == N && A[l].size(1) > 0 && A[l].size(2) > 0, "A[", l,
                      "]: expected shape (", N, ", r, in) with r, in >= 1, got ", A[l].sizes());
    const int64_t r = A[l].size(1), d_in = A[l].size(2);
    TORCH_CHECK_VALUE(B[l].dim() == 3 && B[l].size(0) == N && B[l].size(1) > 0 && B[l].size(2) == r, "B[", l,
                      "]: expected shape (", N, ", out, ", r, "), got ", B[l].sizes());
    check_same(A[l], first, "A", l);
    check_same(B[l], first, "B", l);
    if (uses_A(align[l])) check_ref(ref_A, "ref_A", l, {r, d_in}, align[l], first);
    if (uses_B(align[l])) check_ref(ref_B, "ref_B", l, {B[l].size(1), r}, align[l], first);
  }
  const auto acc = first.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == N, "weights: expected shape (", N, "), got ",
                    weights.sizes());
  TORCH_CHECK_TYPE(weights.scalar_type() == acc, "weights: expected dtype ", acc, ", got ", weights.scalar_type());
  TORCH_CHECK_VALUE(weights.device() == first.device(), "weights: expected device ", first.device(), ", got ",
                    weights.device());
}

AlignAggregateResult align_and_aggregate_impl(TensorList A, TensorList B, const RefList& ref_A, const RefList& ref_B,
                                              const Tensor& weights, at::IntArrayRef align, const Tensor& lam,
                                              bool allow_reflection, GroupRunner run_group) {
  check_align_aggregate_inputs(A, B, ref_A, ref_B, weights, align);
  TORCH_CHECK_VALUE(lam.dim() == 1 && lam.size(0) == int64_t(A.size()), "lam: expected shape (", A.size(),
                    ") (one value per layer), got ", lam.sizes());
  TORCH_CHECK_TYPE(lam.scalar_type() == weights.scalar_type(), "lam: expected dtype ", weights.scalar_type(),
                   " (as weights), got ", lam.scalar_type());
  TORCH_CHECK_VALUE(lam.device() == weights.device(), "lam: expected device ", weights.device(), ", got ",
                    lam.device());
  const Tensor lam_c = lam.contiguous();
  const Tensor& first = A[0];
  const int64_t N = first.size(0);
  const auto acc_options = weights.options();
  Outputs out;
  out.status = at::zeros({1}, first.options().dtype(at::kInt));
  std::map<int, std::vector<size_t>> buckets;  // rank bucket -> layers; 0 = above kMaxFusedRank
  for (size_t l = 0; l < A.size(); ++l) {
    const int64_t r = A[l].size(1);
    out.A.push_back(at::empty({r, A[l].size(2)}, first.options()));
    out.B.push_back(at::empty({B[l].size(1), r}, first.options()));
    out.rotations.push_back(at::empty({N, r, r}, acc_options));
    buckets[rank_bucket(r)].push_back(l);
  }
  for (const auto& [bucket, layer_ids] : buckets) {
    if (bucket == 0 || !first.is_cpu()) flag_nonfinite_references(layer_ids, ref_A, ref_B, align, out.status);
    if (bucket == 0) {  // ranks above the compiled buckets
      for (size_t l : layer_ids) {
        align_aggregate_layer_aten(A[l], B[l], ref_of(ref_A, l, uses_A(align[l])), ref_of(ref_B, l, uses_B(align[l])),
                                   weights, align[l] == kAlignNone, lam_c[l].clamp(0, 1), allow_reflection, out.A[l],
                                   out.B[l], out.rotations[l], out.status);
      }
      continue;
    }
    const GroupTables tables = build_tables(layer_ids, A, B, ref_A, ref_B, align, out);
    run_group(tables, group_params(tables, weights, lam_c, allow_reflection, out), bucket, first, weights);
  }
  return {out.A, out.B, out.rotations, out.status};
}

}  // namespace fedrot
