// Explicit SIMD for the CPU kernels through GCC/Clang vector types: the vector
// and register-file sizes the tiles are cut to, and loads and stores that widen
// half-precision inputs to the accumulate type in registers.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace fedrot {

// Compiled to AVX-512, AVX2/FMA or SSE by the host flags in setup.py. The widest
// vector and the register file size the tiles: AVX-512 has 32 registers, AVX2 16.
#if defined(__AVX512F__) && defined(__AVX512VL__)
constexpr int kVectorBytes = 64, kVectorRegisters = 32;
#else
constexpr int kVectorBytes = 32, kVectorRegisters = 16;
#endif
// Accumulators per register tile: the rest of the file holds the operands.
constexpr int kTileAccumulators = kVectorRegisters == 32 ? 24 : 12;

template <typename acc_t, int Bytes>
struct Simd {
  typedef acc_t type __attribute__((vector_size(Bytes)));
  static constexpr int lanes = Bytes / int(sizeof(acc_t));
};

// The vector for rows of R values of acc_t: R lanes, or the widest vector.
template <typename acc_t, int R>
using RowSimd = Simd<acc_t, (R * int(sizeof(acc_t)) < kVectorBytes ? R * int(sizeof(acc_t)) : kVectorBytes)>;

// L lanes from x (one vector load: GCC can turn the lane-by-lane form into L masked broadcasts).
template <typename V, typename scalar_t, int L>
inline V load_lanes(const scalar_t* x) {
  V v;
  if constexpr (std::is_same_v<std::remove_cv_t<std::remove_reference_t<decltype(v[0])>>, scalar_t>) {
    static_assert(sizeof v == L * sizeof(scalar_t), "L lanes fill the vector");
    std::memcpy(&v, x, sizeof v);
  } else {
    for (int q = 0; q < L; ++q) v[q] = x[q];
  }
  return v;
}

// Half-precision inputs widen in registers, L lanes per load, never through an
// fp32 copy: bf16 is the top half of an fp32 (a shift), fp16 goes through F16C.
// L lanes of bf16 bit patterns, and the fp32 bit patterns they widen to.
template <int L>
using Bf16Bits = typename Simd<uint16_t, 2 * L>::type;
template <int L>
using Fp32Bits = typename Simd<uint32_t, 4 * L>::type;

template <typename V, int L>
inline V load_lanes_bf16(const c10::BFloat16* x) {
#if defined(__AVX512F__)
  // One 512-bit zero extension: GCC lowers the generic form below at 16 lanes to two 256-bit ones,
  // an extract and an insert, four shuffle-port operations where this takes one.
  if constexpr (L == 16 && sizeof(V) == 64) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
    V v;
    std::memcpy(&v, &w, sizeof v);
    return v;
  }
#endif
  Bf16Bits<L> h;
  std::memcpy(&h, x, sizeof h);
  const Fp32Bits<L> w = __builtin_convertvector(h, Fp32Bits<L>) << 16;
  V v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

template <typename V, int L>
inline V load_lanes_fp16(const c10::Half* x) {
#if defined(__AVX512F__)
  if constexpr (L == 16 && sizeof(V) == 64) {
    const __m512 w = _mm512_maskz_cvtph_ps(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
    V v;
    std::memcpy(&v, &w, sizeof v);
    return v;
  }
#endif
#if defined(__F16C__)
  if constexpr (L == 8 && sizeof(V) == 32) {
    const __m256 w = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
    V v;
    std::memcpy(&v, &w, sizeof v);
    return v;
  }
#endif
  V v;
  for (int q = 0; q < L; ++q) v[q] = static_cast<float>(x[q]);
  return v;
}

template <typename V, typename scalar_t, int L>
inline V load_lanes_widened(const scalar_t* x) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return load_lanes_bf16<V, L>(x);
  else if constexpr (std::is_same_v<scalar_t, c10::Half>) return load_lanes_fp16<V, L>(x);
  else return load_lanes<V, scalar_t, L>(x);
}

// Which neighbour of x[0] a broadcast may read: a bf16 value is broadcast as one 32-bit load of
// itself and x[1] (kNext: a shift), or of x[-1] and itself (kPrevious: a mask), never past its row;
// kAlone (a row of one value) widens it as a scalar. A scalar bf16 widening costs two port-5
// operations per broadcast (vmovd, vbroadcastss), as many as the FMAs it feeds.
enum class Neighbour { kNext, kPrevious, kAlone };

// Other types return the widened scalar, which the caller's vector product broadcasts (a vector
// V{} + x would cost an add: 0 + x is not x for x = -0).
template <typename V, typename scalar_t, int L, Neighbour kRead>
inline auto broadcast_widened(const scalar_t* x) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && kRead != Neighbour::kAlone) {
    uint32_t pair;
    std::memcpy(&pair, kRead == Neighbour::kNext ? x : x - 1, sizeof pair);
    Fp32Bits<L> bits = Fp32Bits<L>{} + pair;
    // Keeps the shift or mask in the vector unit: GCC would apply it to the scalar and broadcast
    // from a general register, a port-5 operation, instead of broadcasting in the load.
#if defined(__AVX512F__)
    __asm__("" : "+v"(bits));
#else
    __asm__("" : "+x"(bits));
#endif
    bits = kRead == Neighbour::kNext ? bits << 16 : bits & 0xFFFF0000u;
    V v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
  } else {
    return static_cast<decltype(V{}[0] + 0)>(x[0]);
  }
}

// Calls f(std::integral_constant<Neighbour, ...>{}) with the neighbour element k of a row of n may
// read. Only bf16 broadcasts read one: other types get one instantiation of f.
template <typename scalar_t, typename F>
inline void with_neighbour(int64_t k, int64_t n, F&& f) {
  if constexpr (!std::is_same_v<scalar_t, c10::BFloat16>) f(std::integral_constant<Neighbour, Neighbour::kAlone>{});
  else if (k + 1 < n) f(std::integral_constant<Neighbour, Neighbour::kNext>{});
  else if (k > 0) f(std::integral_constant<Neighbour, Neighbour::kPrevious>{});
  else f(std::integral_constant<Neighbour, Neighbour::kAlone>{});
}

// Stores a vector of the accumulate type as it is (v by value: the caller's register is not spilled).
template <typename V, typename acc_t>
inline void store_vector(acc_t* out, const V v) {
  std::memcpy(out, &v, sizeof v);
}

// Widens src[0, len) into dst, L lanes at a time (len a multiple of L): narrow inputs are
// widened once into a buffer that many FMA tiles then read.
template <typename V, typename scalar_t, int L, typename acc_t>
inline void widen_lanes(const scalar_t* src, int64_t len, acc_t* dst) {
  for (int64_t t = 0; t < len; t += L) store_vector<V>(dst + t, load_lanes_widened<V, scalar_t, L>(src + t));
}

// Stores L lanes as scalar_t (round to nearest even) and adds x - x of each lane,
// before and after rounding, to `check`: 0 while every stored value is finite.
template <typename V, typename scalar_t, typename acc_t, int L>
inline void store_lanes(scalar_t* out, const V v, V& check) {
  V stored;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    store_vector<V>(out, v);
    stored = v;
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    Fp32Bits<L> bits;
    std::memcpy(&bits, &v, sizeof v);
    bits = (bits + (0x7FFFu + ((bits >> 16) & 1u))) >> 16;  // NaN may round to anything: `v - v` catches it
    const Bf16Bits<L> h = __builtin_convertvector(bits, Bf16Bits<L>);
    std::memcpy(out, &h, sizeof h);
    stored = load_lanes_bf16<V, L>(out);
  } else {
    for (int q = 0; q < L; ++q) out[q] = static_cast<scalar_t>(v[q]);
    stored = load_lanes_widened<V, scalar_t, L>(out);
  }
  check += (v - v) + (stored - stored);
}

// The integer vector of V's size and lane width: the lane indices of a shuffle.
template <typename V>
using LaneIndex = typename Simd<std::conditional_t<sizeof(V{}[0]) == 8, int64_t, int32_t>, int(sizeof(V))>::type;

// The index vector I {index(0), index(1), ...}: a constant when index is constexpr.
template <typename I, typename F, std::size_t... q>
inline I lane_index(F index, std::index_sequence<q...>) {
  using E = std::remove_cv_t<std::remove_reference_t<decltype(I{}[0])>>;
  return I{E(index(int(q)))...};
}

#if defined(__GNUC__) && !defined(__clang__)
// One stage of transpose_lanes: swaps the off-diagonal S × S blocks of every 2S × 2S block of
// v[0..L), two shuffles per pair of vectors, then the next stage. S is a template argument so that
// the index vectors are compile-time constants (as loop variables, GCC built them lane by lane).
template <typename V, int L, int S>
inline void transpose_stage(V* v) {
  const LaneIndex<V> lo = lane_index<LaneIndex<V>>([](int q) { return (q & S) ? L + q - S : q; }, std::make_index_sequence<L>{});
  const LaneIndex<V> hi = lane_index<LaneIndex<V>>([](int q) { return (q & S) ? L + q : q + S; }, std::make_index_sequence<L>{});
  for (int q = 0; q < L; ++q)
    if (!(q & S)) {
      const V a = v[q], b = v[q | S];
      v[q] = __builtin_shuffle(a, b, lo);
      v[q | S] = __builtin_shuffle(a, b, hi);
    }
  if constexpr (S > 1) transpose_stage<V, L, S / 2>(v);
}

// One stage of sum_lanes_of: 2S vectors of partial sums become S, each adding the two halves of the
// partial sums of a pair (two shuffles and one add), then the next stage.
template <typename V, int L, int S>
inline void sum_lanes_stage(V* sums) {
  const LaneIndex<V> lo = lane_index<LaneIndex<V>>([](int q) { return q / S * 2 * S + q % S; }, std::make_index_sequence<L>{});
  const LaneIndex<V> hi = lane_index<LaneIndex<V>>([](int q) { return q / S * 2 * S + q % S + S; }, std::make_index_sequence<L>{});
  for (int q = 0; q < S; ++q)
    sums[q] = __builtin_shuffle(sums[2 * q], sums[2 * q + 1], lo) + __builtin_shuffle(sums[2 * q], sums[2 * q + 1], hi);
  if constexpr (S > 1) sum_lanes_stage<V, L, S / 2>(sums);
}
#endif

// Transposes the L × L block held in v[0..L) in place (lane p of v[q] <-> lane q of v[p]) in log2 L
// stages (transpose_stage).
template <typename V, int L>
inline void transpose_lanes(V* v) {
#if defined(__GNUC__) && !defined(__clang__)
  transpose_stage<V, L, L / 2>(v);
#else
  for (int q = 0; q < L; ++q)
    for (int p = q + 1; p < L; ++p) {
      const auto a = v[q][p];
      v[q][p] = v[p][q];
      v[p][q] = a;
    }
#endif
}

// Lane q of the result is the sum of the lanes of v[q], for q < L, in log2 L stages
// (sum_lanes_stage), in a fixed order.
template <typename V, int L>
inline V sum_lanes_of(const V* v) {
#if defined(__GNUC__) && !defined(__clang__)
  V sums[L];
  for (int q = 0; q < L; ++q) sums[q] = v[q];
  sum_lanes_stage<V, L, L / 2>(sums);
  return sums[0];
#else
  V out;
  for (int q = 0; q < L; ++q) {
    out[q] = 0;
    for (int p = 0; p < L; ++p) out[q] += v[q][p];
  }
  return out;
#endif
}

template <typename V, int L>
inline bool lanes_all_zero(const V check) {
  decltype(check[0] + 0) sum = 0;
  for (int q = 0; q < L; ++q) sum += check[q];
  return sum == 0;  // NaN in any lane makes the sum NaN
}

}  // namespace fedrot
