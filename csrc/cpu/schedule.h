// How the work of one rank bucket is split into parallel tasks, apart from the kernels: either
// two passes (the rotations, parallel over (layer, client); then the aggregation, parallel over
// row chunks of all layers), or, with many layers, both passes layer by layer, parallel over
// layers, so that the aggregation reads a layer's clients again from L2 (client groups and
// prefetch from cache_policy.h). Each output element is produced by one task with the same kernel
// and in the same order under every schedule, so results do not depend on it or on the thread
// count.

#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/Parallel.h>

#include "align_aggregate.h"
#include "cpu/amx_kernels.h"
#include "cpu/cache_policy.h"
#include "cpu/client_range.h"
#include "cpu/client_rotation.h"
#include "cpu/kernel_choice.h"
#include "cpu/view_layouts.h"
#include "cpu/weighted_sum.h"

namespace fedrot {

namespace {  // internal linkage: see cpu/align_aggregate_cpu.cpp

template <typename scalar_t, typename acc_t, int R>
void rotations_pass(const GroupParams& p) {
  at::parallel_for(0, int64_t(p.num_layers) * p.num_clients, 1,
                   [&](int64_t begin, int64_t end) {
                     CovarianceTiles tiles;
                     rotate_clients<scalar_t, acc_t, R>(p, begin, end, tiles);
                   });
}

template <typename scalar_t, typename acc_t, int R>
void aggregate_chunks(const GroupParams& p, int64_t begin, int64_t end, Prefetcher* prefetch = nullptr) {
  bool finite = true;
  for (int64_t chunk = begin; chunk < end; ++chunk) {
    const FactorView& v = p.views[find_view(p.views, 2 * p.num_layers, chunk)];
    const int n = p.layers[v.layer].n;
    const int64_t t0 = (chunk - v.chunk_begin) * kChunkRows;
    const int64_t rows = std::min(kChunkRows, v.rows - t0);
    aggregate_chunk<scalar_t, acc_t, R>(p, v, n, t0, rows, finite, prefetch);
  }
  if (!finite) __atomic_fetch_or(p.status, kStatusAggregateNonfinite, __ATOMIC_RELAXED);
}

template <typename scalar_t, typename acc_t, int R>
void aggregate_pass(const GroupParams& p) {
  at::parallel_for(0, p.num_chunks, 1,
                   [&](int64_t begin, int64_t end) { aggregate_chunks<scalar_t, acc_t, R>(p, begin, end); });
}

// One past the last row chunk of layer l (its chunks start at its A view's).
int64_t layer_chunks_end(const GroupParams& p, int64_t l) {
  return l + 1 < p.num_layers ? p.views[2 * l + 2].chunk_begin : p.num_chunks;
}

// Layer l: its rotations, then its aggregates. When its clients fit the L2 budget, by row chunks
// over all clients, which the covariances left in L2. Else a few clients at a time: their
// rotations, then the tile kernels for those clients (Clients; partial: R × rows sums of both views),
// which read the factors the covariances just brought into L2 instead of from DRAM a second time;
// then the rows the tiles leave (the A tail, other layouts) by row chunks over all clients.
// The last tile kernels of the layer prefetch the start of layer `next` (add_layer_start; -1: none).
template <typename scalar_t, typename acc_t, int R>
void align_and_aggregate_layer(const GroupParams& p, int64_t l, int64_t next, std::vector<acc_t>& partial,
                               CovarianceTiles& tiles) {
  const int64_t first = l * p.num_clients;
  // A plain average reads each client once (weighted_sum_rows), so it needs no client groups.
  if (layer_client_bytes<scalar_t>(p, l) <= l2_budget_bytes() || plain_average_layer<acc_t>(p, l)) {
    rotate_clients<scalar_t, acc_t, R>(p, first, first + p.num_clients, tiles);
    Prefetcher prefetch;
    if (next >= 0) add_layer_start<scalar_t>(prefetch, p, next);
    return aggregate_chunks<scalar_t, acc_t, R>(p, p.views[2 * l].chunk_begin, layer_chunks_end(p, l), &prefetch);
  }
  bool finite = true;
  const int n = p.layers[l].n;
  const int64_t group = client_group<scalar_t>(p, l);
  int64_t done[2] = {0, 0};
  const int64_t rows_a = p.views[2 * l].rows, rows = rows_a + p.views[2 * l + 1].rows;
  if (partial.size() < size_t(R * rows)) partial.resize(size_t(R * rows));
  acc_t* const partials[2] = {partial.data(), partial.data() + R * rows_a};  // per view
  // Where one view aligns, it goes first: the covariances left it in L2. While the tile kernels
  // compute, they prefetch the second view of these clients and the next clients' aligned views.
  const bool b_first = p.views[2 * l].ref == nullptr && p.views[2 * l + 1].ref != nullptr;
  const int order[2] = {b_first ? 1 : 0, b_first ? 0 : 1};
  for (int64_t i = 0; i < p.num_clients; i += group) {
    const int64_t end = std::min<int64_t>(p.num_clients, i + group);
    rotate_clients<scalar_t, acc_t, R>(p, first + i, first + end, tiles);
    Prefetcher prefetch;
    if (p.views[2 * l + order[1]].ref == nullptr) add_clients<scalar_t>(prefetch, p.views[2 * l + order[1]], n, i, end);
    for (int f : order)
      if (p.views[2 * l + f].ref != nullptr)
        add_clients<scalar_t>(prefetch, p.views[2 * l + f], n, end, std::min<int64_t>(p.num_clients, end + group));
    if (end == p.num_clients && next >= 0) add_layer_start<scalar_t>(prefetch, p, next);
    for (int f : order) {
      const FactorView& v = p.views[2 * l + f];
      if (has_tile_layout(v))
        done[f] = aggregate_tiles<scalar_t, acc_t, R>(p, v, n, 0, v.rows, {i, end, partials[f], &prefetch}, finite);
    }
  }
  for (int f = 0; f < 2; ++f) {
    const FactorView& v = p.views[2 * l + f];
    for (int64_t t0 = done[f]; t0 < v.rows; t0 += kChunkRows)
      aggregate_chunk<scalar_t, acc_t, R>(p, v, n, t0, std::min(kChunkRows, v.rows - t0), finite);
  }
  if (!finite) __atomic_fetch_or(p.status, kStatusAggregateNonfinite, __ATOMIC_RELAXED);
}

// Both passes layer by layer, parallel over layers: the aggregation reads a layer's clients again
// from this core's L2 (align_and_aggregate_layer) rather than from L3 or DRAM.
// The same kernels produce every output element, so the result is that of the two-pass split.
template <typename scalar_t, typename acc_t, int R>
void layer_pass(const GroupParams& p) {
  at::parallel_for(0, p.num_layers, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> partial;
    CovarianceTiles tiles;
    for (int64_t l = begin; l < end; ++l)
      align_and_aggregate_layer<scalar_t, acc_t, R>(p, l, l + 1 < end ? l + 1 : -1, partial, tiles);
  });
}

// Parallelism over layers balances as well as over (layer, client) and row chunks when every thread
// gets at least this many layers' worth of rows, the largest layer counting as one.
constexpr int64_t kLayersPerThread = 4;

bool layers_balance(const GroupParams& p) {
  int64_t largest = 0;
  for (int64_t l = 0; l < p.num_layers; ++l)
    largest = std::max(largest, layer_chunks_end(p, l) - p.views[2 * l].chunk_begin);
  return largest * kLayersPerThread * at::get_num_threads() <= p.num_chunks;
}

}  // namespace

}  // namespace fedrot
