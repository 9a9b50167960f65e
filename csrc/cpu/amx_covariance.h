// bf16 covariances M = Σ_t x_t y_tᵀ on AMX: 16 × 16 fp32 tiles of bf16 products, 32 values of t
// per product, against 16 × 16 widened FMAs per value of t on AVX-512. Tile products take their
// second operand as words (v[t], v[t + 1]) along its rows: the reference, which every client of a
// layer shares, is laid out once per layer; a client's A factor (t contiguous) is the first operand
// as it lies in memory, a client's B factor (j contiguous) is paired once (one shuffle per two rows).
#pragma once

#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>

#include "cpu/amx.h"
#include "cpu/simd.h"

namespace fedrot {

// Values of t per tile product (K of one tile pair), and the 32-bit words of one 16-row tile.
constexpr int kTileT = 32;
constexpr int64_t kTileWords = 16 * 16;

// Whether the tile covariance takes rank n of bucket R over T values of t: one 16 × 16 block at
// R = 16, 2 × 2 blocks of 16 above (n a multiple of 32), and at least one product.
template <int R>
bool covariance_tiles_take(int n, int64_t T) {
  return amx_usable() && T >= kTileT && (R == 16 ? n == 16 : n % 32 == 0);
}

// Words of a paired operand of n rows or columns over T values of t.
inline int64_t paired_words(int n, int64_t T) { return int64_t(n) * (T - T % kTileT) / 2; }

#if FEDROT_AMX
// 16 words (a[q], b[q]): the bf16 values of two rows at the same 16 positions, paired for the
// second operand of a tile product.
inline __m512i pair_words(const c10::BFloat16* a, const c10::BFloat16* b) {
  using Words = Simd<int16_t, 64>::type;
  const Words interleave = lane_index<Words>([](int q) { return q % 2 ? 32 + q / 2 : q / 2; }, std::make_index_sequence<32>{});
  return _mm512_permutex2var_epi16(_mm512_maskz_loadu_epi16(0xFFFF, a), (__m512i)interleave, _mm512_maskz_loadu_epi16(0xFFFF, b));
}

// A 16-row operand of the tile products: the tile of row block `block` at step s (values of t
// [32 s, 32 s + 32)) starts at base + block · block_bytes + s · step_bytes, rows row_bytes apart.
struct TileOperand {
  const void* base;
  int64_t row_bytes, step_bytes, block_bytes;
  const void* tile(int block, int64_t s) const {
    return static_cast<const char*>(base) + block * block_bytes + s * step_bytes;
  }
};

// The operand of words laid out [block][step][16 rows][16 words] (pair_rows_t, pair_rows_j).
inline TileOperand word_operand(const uint32_t* words, int64_t steps) {
  return {words, 64, kTileWords * 4, steps * kTileWords * 4};
}

// Rows k < n of t-contiguous y (row stride sy) as words (y[k][t], y[k][t + 1]) for t < T - T % 32
// at [k / 16][t / 32][t % 32 / 2][k % 16]: one 16 × 16 word transpose per 16 rows and step.
inline void pair_rows_t(const c10::BFloat16* y, int64_t sy, int64_t T, int n, uint32_t* words) {
  using W = Simd<uint32_t, 64>::type;
  const int64_t steps = T / kTileT;
  for (int kb = 0; kb < n / 16; ++kb)
    for (int64_t s = 0; s < steps; ++s) {
      W rows[16];
      for (int k = 0; k < 16; ++k) std::memcpy(&rows[k], y + (kb * 16 + k) * sy + s * kTileT, sizeof(W));
      transpose_lanes<W, 16>(rows);
      std::memcpy(words + (kb * steps + s) * kTileWords, rows, sizeof rows);
    }
}

// Columns j < n of j-contiguous x (rows t, stride sx) as words (x[t][j], x[t + 1][j]) for
// t < T - T % 32 at [j / 16][t / 32][t % 32 / 2][j % 16]; with `transpose`, each 16 × 16 block of
// words transposed ([j / 16][t / 32][j % 16][t % 32 / 2]: the first operand, rows j).
inline void pair_rows_j(const c10::BFloat16* x, int64_t sx, int64_t T, int n, bool transpose, uint32_t* words) {
  using W = Simd<uint32_t, 64>::type;
  const int64_t steps = T / kTileT;
  for (int64_t s = 0; s < steps; ++s)
    for (int jb = 0; jb < n / 16; ++jb) {
      W rows[16];
      for (int q = 0; q < 16; ++q) {
        const c10::BFloat16* row = x + (s * kTileT + 2 * q) * sx + jb * 16;
        rows[q] = (W)pair_words(row, row + sx);
      }
      if (transpose) transpose_lanes<W, 16>(rows);
      std::memcpy(words + (jb * steps + s) * kTileWords, rows, sizeof rows);
    }
}

// M += C or Cᵀ (transposed) for C[a][b] = Σ_s a-tile(a / 16, s) · b-tile(b / 16, s), a, b < n,
// over `steps` steps, where covariance_tiles_take<R>(n, 32 · steps). Four accumulator tiles, so
// that no product waits on the one before: at R = 16 the sums over every fourth step, added at the
// end; above, a 2 × 2 block of 16 × 16 blocks of C per pass over the steps.
template <int R>
void tile_covariance(const TileOperand& a, const TileOperand& b, int64_t steps, int n, bool transposed, float* M) {
  TileConfig config;
  for (int c = 0; c < 8; ++c) config.set(c, 16, 64);
  const TileScope scope(config);
  alignas(64) float block[16][16];
  auto add_block = [&](int a0, int b0) {
    for (int i = 0; i < 16; ++i)
      for (int q = 0; q < 16; ++q) M[transposed ? (b0 + q) * R + a0 + i : (a0 + i) * R + b0 + q] += block[i][q];
  };
#define FR_PRODUCT(c, ta, tb, ab, bb, s)                \
  _tile_loadd(ta, a.tile(ab, s), a.row_bytes);          \
  _tile_loadd(tb, b.tile(bb, s), b.row_bytes);          \
  _tile_dpbf16ps(c, ta, tb)
#define FR_ADD(c, a0, b0)                                                                 \
  _tile_stored(c, &block[0][0], 64);                                                     \
  __asm__ volatile("" ::: "memory"); /* GCC's _tile_stored names no memory operand */ \
  add_block(a0, b0)
  if constexpr (R == 16) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    int64_t s = 0;
    for (; s + 4 <= steps; s += 4) {
      FR_PRODUCT(0, 4, 6, 0, 0, s);
      FR_PRODUCT(1, 5, 7, 0, 0, s + 1);
      FR_PRODUCT(2, 4, 6, 0, 0, s + 2);
      FR_PRODUCT(3, 5, 7, 0, 0, s + 3);
    }
    for (; s < steps; ++s) {
      FR_PRODUCT(0, 4, 6, 0, 0, s);
    }
    FR_ADD(0, 0, 0);
    FR_ADD(1, 0, 0);
    FR_ADD(2, 0, 0);
    FR_ADD(3, 0, 0);
  } else {
    for (int a0 = 0; a0 < n; a0 += 32)
      for (int b0 = 0; b0 < n; b0 += 32) {
        const int ab = a0 / 16, bb = b0 / 16;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t s = 0; s < steps; ++s) {
          _tile_loadd(4, a.tile(ab, s), a.row_bytes);
          _tile_loadd(5, a.tile(ab + 1, s), a.row_bytes);
          _tile_loadd(6, b.tile(bb, s), b.row_bytes);
          _tile_loadd(7, b.tile(bb + 1, s), b.row_bytes);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        FR_ADD(0, a0, b0);
        FR_ADD(1, a0, b0 + 16);
        FR_ADD(2, a0 + 16, b0);
        FR_ADD(3, a0 + 16, b0 + 16);
      }
  }
#undef FR_PRODUCT
#undef FR_ADD
}
#endif

}  // namespace fedrot
