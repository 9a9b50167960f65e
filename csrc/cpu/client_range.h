// The clients one call of an aggregation kernel sums (Clients): all of them, or a few at a time
// with partial sums carried between calls, and the Prefetcher that the kernels step in their inner
// loop to pull the factors read next into L2.

#pragma once

#include <cstdint>

#include "align_aggregate.h"

namespace fedrot {

namespace {  // internal linkage: see cpu/align_aggregate_cpu.cpp

// Byte ranges the tile kernels pull into L2 while they compute, a line per step of their inner loop:
// the factors read next (the next clients of a layer, or the next layer), so that their DRAM reads
// overlap FMAs on factors already in L2 instead of following them.
class Prefetcher {
 public:
  void add(const void* begin, int64_t bytes) {
    if (count_ < kMaxRanges && bytes > 0) ranges_[count_++] = {static_cast<const char*>(begin), bytes};
  }
  void step() {
    if (next_ < end_) {
      __builtin_prefetch(next_, 0, 2);
      next_ += 64;
    } else if (current_ < count_) {
      next_ = ranges_[current_].begin;
      end_ = next_ + ranges_[current_++].bytes;
    }
  }

 private:
  static constexpr int kMaxRanges = 64;  // a range a client where clients lie apart
  struct Range {
    const char* begin;
    int64_t bytes;
  };
  Range ranges_[kMaxRanges];
  int count_ = 0, current_ = 0;
  const char *next_ = nullptr, *end_ = nullptr;
};

// The clients [begin, end) a kernel call sums. With partial set (the layer schedule, a few clients
// a pass), the accumulators start from `partial` unless begin = 0 and go back to it unless end = N:
// the FMAs of every output element are those of one call over all clients, in the same order, so
// the result is bitwise the same; a pass then streams a few clients' rows instead of N·n interleaved
// ones, which the hardware prefetcher follows.
template <typename acc_t>
struct Clients {
  int64_t begin, end;
  acc_t* partial;  // R × T (A: row j at j·T) or T × R (B) accumulators; null for all clients at once
  Prefetcher* prefetch = nullptr;
};

template <typename acc_t>
Clients<acc_t> all_clients(const GroupParams& p, Prefetcher* prefetch = nullptr) {
  return {0, p.num_clients, nullptr, prefetch};
}

}  // namespace

}  // namespace fedrot
