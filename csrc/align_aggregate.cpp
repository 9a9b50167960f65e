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

FactorView make_view(const ClientFactor& x, GroupTables& t, bool by_rows, const Tensor& ref, const Tensor& out,
                     int32_t layer) {
  // A_i (n, in): t = dim 1 of the 2-D view, j = dim 0.  B_i (out, n): t = dim 0, j = dim 1.
  const int64_t dim_t = by_rows ? 0 : 1, dim_j = 1 - dim_t;
  FactorView v{};  // v.x is set once t.clients is whole (build_tables)
  t.clients.insert(t.clients.end(), x.ptrs.begin(), x.ptrs.end());
  v.client_stride = x.client_stride;
  v.stride_t = by_rows ? x.stride0 : x.stride1;
  v.stride_j = by_rows ? x.stride1 : x.stride0;
  if (ref.defined()) {
    v.ref = ref.data_ptr();
    v.ref_stride_t = ref.stride(dim_t);
    v.ref_stride_j = ref.stride(dim_j);
  }
  v.out = out.data_ptr();
  v.out_stride_t = out.stride(dim_t);
  v.out_stride_j = out.stride(dim_j);
  v.rows = x.first.size(dim_t);
  v.chunk_begin = t.num_chunks;
  v.layer = layer;
  t.num_chunks += (v.rows + kChunkRows - 1) / kChunkRows;
  t.max_rows = std::max(t.max_rows, v.rows);
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

GroupTables build_tables(const std::vector<size_t>& layer_ids, const std::vector<ClientFactor>& A,
                         const std::vector<ClientFactor>& B, const RefList& ref_A, const RefList& ref_B,
                         at::IntArrayRef align, Outputs& out) {
  GroupTables t;
  for (size_t g = 0; g < layer_ids.size(); ++g) {
    const size_t l = layer_ids[g];
    t.views.push_back(make_view(A[l], t, /*by_rows=*/false, ref_of(ref_A, l, uses_A(align[l])), out.A[l], int32_t(g)));
    t.views.push_back(make_view(B[l], t, /*by_rows=*/true, ref_of(ref_B, l, uses_B(align[l])), out.B[l], int32_t(g)));
    t.layers.push_back(LayerInfo{out.rotations[l].data_ptr(), int32_t(A[l].first.size(0)), int32_t(align[l]), int32_t(l), 0});
    t.any_aligned = t.any_aligned || align[l] != kAlignNone;
  }
  for (size_t k = 0; k < t.views.size(); ++k) t.views[k].x = t.clients.data() + k * A[0].ptrs.size();
  return t;
}

// Layer tensors given stacked: client i at data + i * stride(0).
ClientFactor stacked_factor(const Tensor& x) {
  ClientFactor f;
  f.stacked = x;
  f.first = x.select(0, 0);
  f.stride0 = x.stride(1);
  f.stride1 = x.stride(2);
  f.client_stride = x.stride(0);
  const char* base = static_cast<const char*>(x.data_ptr());
  for (int64_t i = 0; i < x.size(0); ++i) f.ptrs.push_back(base + i * x.stride(0) * int64_t(x.element_size()));
  return f;
}

// Clients [begin, begin + N) of a per-client list. Where their strides differ, every client is read
// contiguous (a copy of those that are not), so that one pair of strides addresses them all.
ClientFactor client_factor(TensorList x, size_t begin, int64_t N) {
  ClientFactor f;
  f.each.assign(x.begin() + begin, x.begin() + begin + N);
  f.first = f.each[0];
  f.stride0 = f.first.stride(0);
  f.stride1 = f.first.stride(1);
  bool same = true;
  for (const Tensor& c : f.each) same = same && c.stride(0) == f.stride0 && c.stride(1) == f.stride1;
  const int64_t size = f.first.element_size();
  for (const Tensor& c : f.each) {
    if (same) {
      f.ptrs.push_back(c.data_ptr());
      continue;
    }
    f.copies.push_back(c.contiguous());
    f.ptrs.push_back(f.copies.back().data_ptr());
  }
  if (!same) {
    f.stride0 = f.first.size(1);
    f.stride1 = 1;
  }
  // Evenly spaced clients (views of one stack, or N = 1) let the CPU schedule prefetch them as one range.
  const auto at = [&](int64_t i) { return static_cast<const char*>(f.ptrs[size_t(i)]); };
  const int64_t step = N > 1 ? int64_t(at(1) - at(0)) : f.first.numel() * size;
  bool even = step > 0 && step % size == 0;
  for (int64_t i = 2; even && i < N; ++i) even = at(i) - at(i - 1) == step;
  f.client_stride = even ? step / size : 0;
  return f;
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

namespace {

// What both input forms share: the modes, the reference lists' lengths and the weights.
void check_modes_and_weights(size_t layers, const RefList& ref_A, const RefList& ref_B, const Tensor& weights,
                             at::IntArrayRef align, const Tensor& first, int64_t N) {
  TORCH_CHECK_VALUE(align.size() == layers, "align: expected ", layers, " modes (one per layer), got ", align.size());
  for (size_t l = 0; l < align.size(); ++l)
    TORCH_CHECK_VALUE(align[l] >= kAlignNone && align[l] <= kAlignAB, "align[", l,
                      "]: expected 0 (none), 1 (A), 2 (B) or 3 (AB), got ", align[l]);
  check_ref_count(ref_A, "ref_A", layers);
  check_ref_count(ref_B, "ref_B", layers);
  const auto acc = first.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == N, "weights: expected shape (", N, "), got ",
                    weights.sizes());
  TORCH_CHECK_TYPE(weights.scalar_type() == acc, "weights: expected dtype ", acc, ", got ", weights.scalar_type());
  TORCH_CHECK_VALUE(weights.device() == first.device(), "weights: expected device ", first.device(), ", got ",
                    weights.device());
}

// Layer l's references, against its rank r, in_features and out_features.
void check_layer_refs(const RefList& ref_A, const RefList& ref_B, at::IntArrayRef align, size_t l, int64_t r,
                      int64_t d_in, int64_t d_out, const Tensor& first) {
  if (uses_A(align[l])) check_ref(ref_A, "ref_A", l, {r, d_in}, align[l], first);
  if (uses_B(align[l])) check_ref(ref_B, "ref_B", l, {d_out, r}, align[l], first);
}

}  // namespace

void check_align_aggregate_inputs(TensorList A, TensorList B, const RefList& ref_A, const RefList& ref_B,
                                  const Tensor& weights, at::IntArrayRef align) {
  TORCH_CHECK_VALUE(!A.empty(), "A: expected a non-empty list of layer tensors");
  TORCH_CHECK_VALUE(A.size() == B.size(), "B: expected ", A.size(), " layer tensors to match A, got ", B.size());
  const Tensor& first = A[0];
  TORCH_CHECK_VALUE(first.dim() == 3 && first.size(0) > 0, "A[0]: expected a 3-D tensor (N, r, in) with N >= 1, got ",
                    first.sizes());
  const int64_t N = first.size(0);
  check_modes_and_weights(A.size(), ref_A, ref_B, weights, align, first, N);
  for (size_t l = 0; l < A.size(); ++l) {
    TORCH_CHECK_VALUE(A[l].dim() == 3 && A[l].size(0) == N && A[l].size(1) > 0 && A[l].size(2) > 0, "A[", l,
                      "]: expected shape (", N, ", r, in) with r, in >= 1, got ", A[l].sizes());
    const int64_t r = A[l].size(1), d_in = A[l].size(2);
    TORCH_CHECK_VALUE(B[l].dim() == 3 && B[l].size(0) == N && B[l].size(1) > 0 && B[l].size(2) == r, "B[", l,
                      "]: expected shape (", N, ", out, ", r, "), got ", B[l].sizes());
    check_same(A[l], first, "A", l);
    check_same(B[l], first, "B", l);
    check_layer_refs(ref_A, ref_B, align, l, r, d_in, B[l].size(1), first);
  }
}

namespace {

// Checks of the per-client form; returns N.
int64_t check_client_inputs(TensorList A, TensorList B, const RefList& ref_A, const RefList& ref_B,
                            const Tensor& weights, at::IntArrayRef align) {
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) > 0, "weights: expected shape (N,) with N >= 1 clients, got ",
                    weights.sizes());
  const int64_t N = weights.size(0);
  const size_t L = align.size();
  TORCH_CHECK_VALUE(L > 0 && A.size() == L * size_t(N), "A: expected ", L, " layers x ", N,
                    " clients = ", L * size_t(N), " tensors (A[l * N + i]: client i's factor of layer l), got ",
                    A.size());
  TORCH_CHECK_VALUE(B.size() == A.size(), "B: expected ", A.size(), " tensors to match A, got ", B.size());
  const Tensor& first = A[0];
  check_modes_and_weights(L, ref_A, ref_B, weights, align, first, N);
  for (size_t l = 0; l < L; ++l) {
    const Tensor &a0 = A[l * N], &b0 = B[l * N];
    TORCH_CHECK_VALUE(a0.dim() == 2 && a0.size(0) > 0 && a0.size(1) > 0, "A[", l * N,
                      "]: expected a 2-D factor (r, in) with r, in >= 1, got ", a0.sizes());
    const int64_t r = a0.size(0), d_in = a0.size(1);
    TORCH_CHECK_VALUE(b0.dim() == 2 && b0.size(0) > 0 && b0.size(1) == r, "B[", l * N, "]: expected shape (out, ", r,
                      ") to match A[", l * N, "], got ", b0.sizes());
    for (int64_t i = 0; i < N; ++i) {
      const size_t k = l * N + i;
      TORCH_CHECK_VALUE(A[k].sizes() == a0.sizes(), "A[", k, "]: expected shape ", a0.sizes(), " (as A[", l * N,
                        "], the same layer's first client), got ", A[k].sizes());
      TORCH_CHECK_VALUE(B[k].sizes() == b0.sizes(), "B[", k, "]: expected shape ", b0.sizes(), " (as B[", l * N,
                        "], the same layer's first client), got ", B[k].sizes());
      check_same(A[k], first, "A", k);
      check_same(B[k], first, "B", k);
    }
    check_layer_refs(ref_A, ref_B, align, l, r, d_in, b0.size(0), first);
  }
  return N;
}

AlignAggregateResult run_op(const std::vector<ClientFactor>& A, const std::vector<ClientFactor>& B,
                            const RefList& ref_A, const RefList& ref_B, const Tensor& weights, at::IntArrayRef align,
                            const Tensor& lam, bool allow_reflection, GroupRunner run_group) {
  TORCH_CHECK_VALUE(lam.dim() == 1 && lam.size(0) == int64_t(A.size()), "lam: expected shape (", A.size(),
                    ") (one value per layer), got ", lam.sizes());
  TORCH_CHECK_TYPE(lam.scalar_type() == weights.scalar_type(), "lam: expected dtype ", weights.scalar_type(),
                   " (as weights), got ", lam.scalar_type());
  TORCH_CHECK_VALUE(lam.device() == weights.device(), "lam: expected device ", weights.device(), ", got ",
                    lam.device());
  const Tensor lam_c = lam.contiguous();
  const Tensor& first = A[0].first;
  const int64_t N = weights.size(0);
  const auto acc_options = weights.options();
  Outputs out;
  out.status = at::zeros({1}, first.options().dtype(at::kInt));
  std::map<int, std::vector<size_t>> buckets;  // rank bucket -> layers; 0 = above kMaxFusedRank
  for (size_t l = 0; l < A.size(); ++l) {
    const int64_t r = A[l].first.size(0);
    out.A.push_back(at::empty({r, A[l].first.size(1)}, first.options()));
    out.B.push_back(at::empty({B[l].first.size(0), r}, first.options()));
    out.rotations.push_back(at::empty({N, r, r}, acc_options));
    buckets[rank_bucket(r)].push_back(l);
  }
  for (const auto& [bucket, layer_ids] : buckets) {
    if (bucket == 0 || !first.is_cpu()) flag_nonfinite_references(layer_ids, ref_A, ref_B, align, out.status);
    if (bucket == 0) {  // ranks above the compiled buckets
      for (size_t l : layer_ids) {
        align_aggregate_layer_aten(A[l].as_stack(), B[l].as_stack(), ref_of(ref_A, l, uses_A(align[l])),
                                   ref_of(ref_B, l, uses_B(align[l])), weights, align[l] == kAlignNone,
                                   lam_c[l].clamp(0, 1), allow_reflection, out.A[l], out.B[l], out.rotations[l],
                                   out.status);
      }
      continue;
    }
    const GroupTables tables = build_tables(layer_ids, A, B, ref_A, ref_B, align, out);
    run_group(tables, group_params(tables, weights, lam_c, allow_reflection, out), bucket, first, weights);
  }
  return {out.A, out.B, out.rotations, out.status};
}

}  // namespace

Tensor ClientFactor::as_stack() const { return stacked.defined() ? stacked : at::stack(each); }

AlignAggregateResult align_and_aggregate_impl(TensorList A, TensorList B, const RefList& ref_A, const RefList& ref_B,
                                              const Tensor& weights, at::IntArrayRef align, const Tensor& lam,
                                              bool allow_reflection, GroupRunner run_group) {
  check_align_aggregate_inputs(A, B, ref_A, ref_B, weights, align);
  std::vector<ClientFactor> fa, fb;
  for (size_t l = 0; l < A.size(); ++l) {
    fa.push_back(stacked_factor(A[l]));
    fb.push_back(stacked_factor(B[l]));
  }
  return run_op(fa, fb, ref_A, ref_B, weights, align, lam, allow_reflection, run_group);
}

AlignAggregateResult align_and_aggregate_clients_impl(TensorList A, TensorList B, const RefList& ref_A,
                                                      const RefList& ref_B, const Tensor& weights,
                                                      at::IntArrayRef align, const Tensor& lam, bool allow_reflection,
                                                      GroupRunner run_group) {
  const int64_t N = check_client_inputs(A, B, ref_A, ref_B, weights, align);
  std::vector<ClientFactor> fa, fb;
  for (size_t l = 0; l < align.size(); ++l) {
    fa.push_back(client_factor(A, l * N, N));
    fb.push_back(client_factor(B, l * N, N));
  }
  return run_op(fa, fb, ref_A, ref_B, weights, align, lam, allow_reflection, run_group);
}

}  // namespace fedrot
