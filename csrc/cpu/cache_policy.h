// Cache and prefetch policy of the layer schedule: how many bytes of a layer's clients stay in
// this core's L2 between its covariances and its aggregation, how many clients to sum per pass when
// a layer is larger than that, and which byte ranges to prefetch (the next clients, the start of
// the next layer) while the tile kernels compute. None of it changes which FMAs run or their order.

#pragma once

#include <algorithm>
#include <cstdint>

#include <unistd.h>  // sysconf: the L2 size

#include "align_aggregate.h"
#include "cpu/client_range.h"
#include "cpu/view_layouts.h"

namespace fedrot {

namespace {  // internal linkage: see cpu/align_aggregate_cpu.cpp

// Half this core's L2 (1 MiB where the OS does not say): a layer's clients up to this size are
// still in L2 when the aggregation reads them again after the covariance.
int64_t l2_budget_bytes() {
  static const int64_t bytes = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return l2 > 0 ? int64_t(l2) / 2 : int64_t(1) << 20;
  }();
  return bytes;
}

template <typename scalar_t>
int64_t layer_client_bytes(const GroupParams& p, int64_t l) {
  const int64_t n = p.layers[l].n;
  return p.num_clients * n * (p.views[2 * l].rows + p.views[2 * l + 1].rows) * int64_t(sizeof(scalar_t));
}

// Clients summed per pass of the client-at-a-time aggregation: as many as fill the L2 budget (at
// least one). Each pass loads and stores the fp32 partial sums, 2 (bf16) or 1 (fp32) times a
// client's bytes; fewer passes cut that traffic until the group spills L2. Every group size gives
// the same bits.
template <typename scalar_t>
int64_t client_group(const GroupParams& p, int64_t l) {
  return std::max<int64_t>(1, l2_budget_bytes() * p.num_clients / layer_client_bytes<scalar_t>(p, l));
}

// Adds clients [begin, end) of v to `prefetch` where each is one dense block: one range where they
// lie evenly in one allocation (a stacked input), else one range a client.
template <typename scalar_t>
void add_clients(Prefetcher& prefetch, const FactorView& v, int n, int64_t begin, int64_t end) {
  if (!dense_block(v.stride_t, v.stride_j, v.rows, n)) return;
  const int64_t bytes = v.rows * n * int64_t(sizeof(scalar_t));
  if (v.client_stride == v.rows * n) return prefetch.add(v.x[begin], (end - begin) * bytes);
  for (int64_t i = begin; i < end; ++i) prefetch.add(v.x[i], bytes);
}

// Adds what layer l reads first, where dense: its references, and its clients that fit the L2
// budget together (all of both views), or else the first client group of its aligned views (the
// covariances that open it). Prefetched while the previous layer computes, those DRAM reads overlap
// its FMAs; the layer then starts from L2.
template <typename scalar_t>
void add_layer_start(Prefetcher& prefetch, const GroupParams& p, int64_t l) {
  const int n = p.layers[l].n;
  const bool whole = layer_client_bytes<scalar_t>(p, l) <= l2_budget_bytes();
  const int64_t clients = whole ? p.num_clients : client_group<scalar_t>(p, l);
  for (int f = 0; f < 2; ++f) {
    const FactorView& v = p.views[2 * l + f];
    if (v.ref != nullptr && dense_block(v.ref_stride_t, v.ref_stride_j, v.rows, n))
      prefetch.add(v.ref, v.rows * n * int64_t(sizeof(scalar_t)));
    if (whole || v.ref != nullptr) add_clients<scalar_t>(prefetch, v, n, 0, clients);
  }
}

}  // namespace

}  // namespace fedrot
