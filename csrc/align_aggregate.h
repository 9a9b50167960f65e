// The fused align-and-aggregate op: the tables its CPU and CUDA passes read,
// and the front (align_aggregate.cpp) that each backend registers with its
// own per-bucket runner (cpu/align_aggregate_cpu.cpp, cuda/align_aggregate_cuda.cu).
//
// Multi-tensor design (as in apex's multi_tensor_apply): every factor of every
// layer becomes one FactorView in a flat table, and the work of a pass is a
// flat list of chunks, so one launch covers all layers of a rank bucket
// whatever their shapes. Each view reads its N clients through a table of N
// pointers, so clients are read where they lie: one stacked (N, ...) tensor
// and N separate tensors (state dicts, decoded replies) take the same kernels
// without a copy. Both factors are viewed as N matrices X_i (T × n):
// A_i (n × in) is read transposed (t runs over in_features), B_i (out × n) as
// it is. Then both the cross-covariance (M_i += X_iᵀ Y) and the aggregate
// (out = Σ_i X_i · w_i R_i) have one form for A and for B.
#pragma once

#include <cstdint>
#include <tuple>
#include <vector>

#include <optional>

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include "common/host_device.h"

namespace fedrot {

enum AlignMode : int32_t { kAlignNone = 0, kAlignA = 1, kAlignB = 2, kAlignAB = 3 };

// Bits of the op's status output. The Python front turns each into its own error.
constexpr int32_t kStatusAggregateNonfinite = 1;  // an aggregate came out NaN/Inf
constexpr int32_t kStatusReferenceNonfinite = 2;  // a reference an aligned layer reads holds NaN/Inf

// Rows (the t dimension) per aggregation chunk.
constexpr int64_t kChunkRows = 64;

struct FactorView {
  const void* const* x;   // x[i]: client i's X (every client with the strides below)
  int64_t client_stride;  // elements from client i to i + 1 where they lie evenly in one allocation, else 0
  int64_t stride_t, stride_j;
  const void* ref;  // reference view (T × n) when this factor drives alignment, else null
  int64_t ref_stride_t, ref_stride_j;
  void* out;  // aggregated view (T × n)
  int64_t out_stride_t, out_stride_j;
  int64_t rows;         // T
  int64_t chunk_begin;  // index of this view's first aggregation chunk
  int32_t layer;        // index into the group's LayerInfo table
  int32_t pad_;
};

struct LayerInfo {
  void* rotations;    // (N, n, n) output in the accumulate dtype
  int32_t n;          // rank of this layer
  int32_t align;      // AlignMode of this layer
  int32_t lam_index;  // this layer's entry in GroupParams::lam (its index in the op's lists)
  int32_t pad_;
};

// One launch group: all layers whose rank falls in one bucket R.
struct GroupParams {
  const FactorView* views;  // 2 per layer: [2l] = A, [2l+1] = B
  const LayerInfo* layers;
  const void* weights;  // (N,) normalised, accumulate dtype
  const void* lam;      // (L,) per-layer soft-rotation strength, accumulate dtype, read on the device
  void* coef;           // workspace (num_layers * N * R * R): w_i R_i, zero-padded
  void* cov;            // CUDA workspace: (num_layers * N * cov_splits * R * R) partial M
  int32_t* status;      // kStatus* bits, OR-ed in
  int64_t num_chunks;
  int32_t num_layers, num_clients, cov_splits;
  bool any_aligned;  // some layer of the group aligns: the covariance pass runs
  bool allow_reflection;
};

// The view a chunk belongs to (views are ordered by chunk_begin).
FR_HD int find_view(const FactorView* views, int num_views, int64_t chunk) {
  int lo = 0, hi = num_views - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (views[mid].chunk_begin <= chunk) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Host tables of one rank bucket, built by the front. views[v].x points into
// `clients` (N entries a view).
struct GroupTables {
  std::vector<FactorView> views;
  std::vector<const void*> clients;
  std::vector<LayerInfo> layers;
  int64_t num_chunks = 0, max_rows = 0;
  bool any_aligned = false;
};

// Runs both passes for the layers of one rank bucket (`bucket` = R): moves
// the tables where its kernels read them, allocates its workspaces, fills the
// pointer fields of `params` and launches. `first` is A[0] (dtype, device).
using GroupRunner = void (*)(const GroupTables& tables, GroupParams params, int bucket, const at::Tensor& first,
                             const at::Tensor& weights);

using AlignAggregateResult =
    std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>;

// One factor (A or B) of one layer for all N clients, however the caller holds
// them: a stacked (N, ...) tensor, or N tensors of the same shape. Clients are
// read through `ptrs`; where a client's strides differ from the others', the
// front reads a contiguous copy of it (kept in `copies`).
struct ClientFactor {
  at::Tensor first;               // client 0's (rows, cols) tensor: sizes, dtype, device
  at::Tensor stacked;             // the (N, ...) input, when given stacked
  std::vector<at::Tensor> each;   // the N inputs, when given per client
  std::vector<const void*> ptrs;  // client i's data
  int64_t stride0 = 0, stride1 = 0;  // strides of every client's 2-D view
  int64_t client_stride = 0;          // as FactorView::client_stride
  std::vector<at::Tensor> copies;
  // The (N, rows, cols) stack: the input itself, or a stack of the clients (ranks above the fused buckets).
  at::Tensor as_stack() const;
};

// Optional per-layer references (`Tensor?[]`): empty, or one entry per layer,
// None where the layer's mode does not read that factor.
using RefList = c10::List<std::optional<at::Tensor>>;

inline bool uses_A(int64_t align) { return align == kAlignA || align == kAlignAB; }
inline bool uses_B(int64_t align) { return align == kAlignB || align == kAlignAB; }

// Layer l's reference, or an undefined tensor when its mode does not read it.
at::Tensor ref_of(const RefList& refs, size_t l, bool used);

// Shapes, dtypes, devices and modes of the op's inputs (shared by every op
// that takes them); messages name the argument and say what was expected.
void check_align_aggregate_inputs(at::TensorList A, at::TensorList B, const RefList& ref_A, const RefList& ref_B,
                                  const at::Tensor& weights, at::IntArrayRef align);

// The op for any device: checks, outputs, grouping by rank bucket; compiled
// buckets go to `run_group`, larger ranks to the ATen fallback. align: one
// mode per layer; lam: (L,) in the accumulate dtype (values clamped to [0, 1]).
AlignAggregateResult align_and_aggregate_impl(at::TensorList A, at::TensorList B, const RefList& ref_A,
                                              const RefList& ref_B, const at::Tensor& weights, at::IntArrayRef align,
                                              const at::Tensor& lam, bool allow_reflection, GroupRunner run_group);

// The same op on per-client tensors: A[l * N + i] (r_l, in_l) and B[l * N + i]
// (out_l, r_l) are client i's factors of layer l, N = weights.size(0). Nothing
// is stacked: the kernels read every client tensor in place.
AlignAggregateResult align_and_aggregate_clients_impl(at::TensorList A, at::TensorList B, const RefList& ref_A,
                                                      const RefList& ref_B, const at::Tensor& weights,
                                                      at::IntArrayRef align, const at::Tensor& lam,
                                                      bool allow_reflection, GroupRunner run_group);

}  // namespace fedrot
