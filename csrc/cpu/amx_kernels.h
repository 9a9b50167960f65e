// Every code path that needs the Intel AMX tile instructions (bf16 tile products: 16 × 16 fp32 sums
// of 16 × K by K × 16 bf16, K <= 32 pairs per word), built where cpu/amx.h says so and run where
// Linux grants the process the tile state (5.16+): the bf16 covariances of the rotation pass and the
// bf16 aggregation kernels of both layouts. Tile products take their second operand as words
// (v[t], v[t + 1]) along its rows: the reference is paired once per layer, a client's A factor is
// read as it lies, its B factor is paired once. Callers use covariance_on_tiles,
// aggregate_rows_t_amx and aggregate_rows_j_amx, which exist in both builds and do nothing (false,
// 0 rows) where the tiles do not run.

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <c10/util/BFloat16.h>

#include "align_aggregate.h"
#include "cpu/aggregate_kernels.h"  // store_row
#include "cpu/amx.h"
#include "cpu/client_coefficients.h"
#include "cpu/client_range.h"
#include "cpu/simd.h"
#include "cpu/view_layouts.h"

#if FEDROT_AMX
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fedrot {

#if FEDROT_AMX
// Asks Linux once per process for the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA).
inline bool amx_usable() {
  static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return granted;
}

// The tile shapes for one scope; the tile state is released after it (cheaper context switches).
class TileScope {
 public:
  // The barrier: GCC's _tile_loadd asm names no memory operand, so stores before the scope (the
  // coefficient pairs, partial sums) could otherwise sink below the tile loads that read them.
  explicit TileScope(const TileConfig& config) {
    _tile_loadconfig(&config);
    __asm__ volatile("" ::: "memory");
  }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};
#else
inline bool amx_usable() { return false; }
#endif

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
#endif  // FEDROT_AMX

namespace {  // internal linkage: see cpu/align_aggregate_cpu.cpp

// The largest even divisor of n up to 32: the values of k per tile product (K of one tile pair).
inline int tile_depth(int n) {
  for (int d = 32; d >= 2; d -= 2)
    if (n % d == 0) return d;
  return 0;
}

// Columns of one unit of the A tile kernel at rank n: 4 / ceil(n / 16) blocks of 16.
inline int tile_unit_t(int n) { return 16 * (4 / ((n + 15) / 16)); }

// Whether the AMX tile kernels take any of `rows` rows of v: bf16 coefficient pairs for bucket R,
// the tile state granted, an even rank, v dense along t (A kernel, at least one unit) or along j
// (B kernel, at least one block of 16) in input and output. The one rule of both kernels.
template <typename scalar_t, int R>
bool tiles_take(const FactorView& v, int n, int64_t rows) {
  if (!kAmxBucket<scalar_t, R> || !amx_usable() || tile_depth(n) == 0) return false;
  if (v.stride_t == 1 && v.out_stride_t == 1) return rows >= tile_unit_t(n);
  return v.stride_j == 1 && v.out_stride_j == 1 && rows >= 16;
}

// Per task range: the references of the layer it is at, paired for the tile covariance (once per
// layer and view: every client's covariance reads them), and one client's paired B factor.
struct CovarianceTiles {
  int64_t layer[2] = {-1, -1};
  std::vector<uint32_t> ref[2], client;
};

#if FEDROT_AMX
// bf16 A factors (t contiguous, even n) on AMX: out[j][t] in tiles 0..3 of 16 rows j × 16 columns t,
// J = ceil(n / 16) blocks of j by 4 / J blocks of t (a unit of 64, 32 or 16 columns). Per client,
// the unit's x rows are interleaved in pairs along k (words (x[k][t], x[k + 1][t]): the second
// operand of a tile product), then per depth step and output tile: the transposed hi and lo
// coefficient pairs in tiles 4 and 5, the x pairs in tile 6, two products. At R = 16, hi and lo
// fill one tile row (K = 32): one coefficient tile holds both and the x tile the pairs twice, so
// one product per client and output tile (half the products, none waiting on another). Returns the
// columns done (whole units, so that every schedule gives a column the same kernel); the rest is for
// the AVX-512 tiles.
template <int R>
int64_t aggregate_rows_t_amx(const GroupParams& p, const FactorView& v, int n, int64_t t0, int64_t rows,
                             Clients<float> clients, bool& finite) {
  using V = Simd<float, 64>::type;
  if (!tiles_take<c10::BFloat16, R>(v, n, rows)) return 0;
  const int depth = tile_depth(n), unit = tile_unit_t(n);
  const int j_blocks = (n + 15) / 16, t_blocks = unit / 16, tiles = j_blocks * t_blocks;
  constexpr bool kFused = R == 16;  // hi and lo words of a coefficient row in one tile row
  constexpr int kPairRows = kFused ? R : R / 2;
  TileConfig config;
  for (int c = 0; c < 4; ++c) config.set(c, 16, 64);
  config.set(4, 16, kFused ? 64 : 2 * depth);
  config.set(5, 16, kFused ? 64 : 2 * depth);
  config.set(6, kFused ? kPairRows : depth / 2, 64);
  const TileScope scope(config);
  float* partial = clients.partial;
  const int64_t T = v.rows;
  // Words (k / 2, t) of one unit of a client (kFused: again from row R / 2; the rows of k >= n stay
  // zero).
  alignas(64) uint32_t xpairs[kPairRows][64];
  if constexpr (kFused) std::memset(xpairs, 0, sizeof xpairs);
  alignas(64) float block[16][16];
  V check = {};
  auto store_block = [&](int j0, int64_t t) {  // block: out rows j0.., columns t..
    for (int b = 0; b < 16 && j0 + b < n; ++b)
      store_lanes<V, c10::BFloat16, float, 16>(static_cast<c10::BFloat16*>(v.out) + (j0 + b) * v.out_stride_j + t,
                                               load_lanes<V, float, 16>(block[b]), check);
  };
  // Client i's unit at column t into xpairs.
  auto interleave_client = [&](int64_t i, int64_t t) {
    const c10::BFloat16* x = static_cast<const c10::BFloat16*>(v.x[i]) + t;
    for (int k = 0; k < n; k += 2)
      for (int u = 0; u < unit; u += 16) {  // 16 values of rows k and k + 1, interleaved
        if (clients.prefetch) clients.prefetch->step();
        const __m512i words = pair_words(x + k * v.stride_j + u, x + (k + 1) * v.stride_j + u);
        _mm512_storeu_si512(&xpairs[k / 2][u], words);
        if constexpr (kFused) _mm512_storeu_si512(&xpairs[R / 2 + k / 2][u], words);
      }
  };
  int64_t done = 0;
  for (; done + unit <= rows; done += unit) {
    const int64_t t = t0 + done;
    // Output tile c holds j block c / t_blocks, t block c % t_blocks; the coefficient tiles change with
    // the j block only.
#define FR_PLACE(c) (c) / t_blocks * 16, t + (c) % t_blocks * 16
#define FR_PARTIAL(c) (partial + (c) / t_blocks * 16 * T + t + (c) % t_blocks * 16)
#define FR_START(c)                       \
  if (partial && clients.begin > 0) {     \
    _tile_loadd(c, FR_PARTIAL(c), T * 4); \
  } else {                                \
    _tile_zero(c);                        \
  }
#define FR_LOAD_X(c) _tile_loadd(6, &xpairs[k0 / 2][(c) % t_blocks * 16], 256)
#define FR_PRODUCTS(c)                                                         \
  if ((c) % t_blocks == 0) {                                                   \
    _tile_loadd(4, pairs_t + (c) / t_blocks * 16 * R + k0 / 2, R * 4);         \
    _tile_loadd(5, pairs_t + (c) / t_blocks * 16 * R + R / 2 + k0 / 2, R * 4); \
  }                                                                            \
  FR_LOAD_X(c);                                                                \
  _tile_dpbf16ps(c, 4, 6);                                                     \
  _tile_dpbf16ps(c, 5, 6)
#define FR_FUSED(c) \
  FR_LOAD_X(c);     \
  _tile_dpbf16ps(c, 4, 6)
#define FR_TO_PARTIAL(c) _tile_stored(c, FR_PARTIAL(c), T * 4)
#define FR_TO_OUT(c)                 \
  _tile_stored(c, &block[0][0], 64); \
  store_block(FR_PLACE(c))
    FR_FOR_TILES(tiles, FR_START);
    for (int64_t i = clients.begin; i < clients.end; ++i) {
      __asm__ volatile("" ::: "memory");  // the last client's tile loads read xpairs: GCC's _tile_loadd has no memory operand
      interleave_client(i, t);
      __asm__ volatile("" ::: "memory");
      const uint32_t* pairs_t = client_coef_pairs<R>(p, v.layer, i) + R * R;
      if constexpr (kFused) {  // n <= 16: one j block, four t blocks, all of k in one product
        constexpr int k0 = 0;
        _tile_loadd(4, pairs_t, R * 4);
        FR_FOR_TILES(4, FR_FUSED);
      } else {
        for (int k0 = 0; k0 < n; k0 += depth) FR_FOR_TILES(tiles, FR_PRODUCTS);
      }
    }
    if (partial && clients.end < p.num_clients) FR_FOR_TILES(tiles, FR_TO_PARTIAL);  // partial is set when end < N
    else FR_FOR_TILES(tiles, FR_TO_OUT);
#undef FR_PLACE
#undef FR_PARTIAL
#undef FR_START
#undef FR_LOAD_X
#undef FR_PRODUCTS
#undef FR_FUSED
#undef FR_TO_PARTIAL
#undef FR_TO_OUT
  }
  finite = finite && lanes_all_zero<V, 16>(check);
  return done;
}

// bf16 B factors (j contiguous, even n) on AMX: blocks of 16 rows × 16 columns of out in tiles
// 0..3 (up to 4 row blocks per coefficient load); per client and depth step, x rows in tile 4 and the
// hi and lo coefficient pairs in tiles 5 and 6 (two products: C to 2^-17). Returns the rows done
// (whole blocks of 16); the rest is for the AVX-512 tiles.
template <int R>
int64_t aggregate_rows_j_amx(const GroupParams& p, const FactorView& v, int n, int64_t t0, int64_t rows,
                             Clients<float> clients, bool& finite) {
  using V = Simd<float, 64>::type;
  if (!tiles_take<c10::BFloat16, R>(v, n, rows)) return 0;
  const int depth = tile_depth(n);
  TileConfig config;
  for (int c = 0; c < 4; ++c) config.set(c, 16, 64);
  config.set(4, 16, 2 * depth);
  config.set(5, depth / 2, 64);
  config.set(6, depth / 2, 64);
  const TileScope scope(config);
  const int64_t sx = v.stride_t * int64_t(sizeof(c10::BFloat16));
  float* partial = clients.partial;
  V check = {};
  alignas(64) float block[16][16];
  auto store_block = [&](int64_t t, int j0) {  // block: out rows t.., columns j0..
    for (int b = 0; b < 16; ++b) {
      const V sums = load_lanes<V, float, 16>(block[b]);
      store_row<V, c10::BFloat16, float, 16, 1>(static_cast<c10::BFloat16*>(v.out) + (t + b) * v.out_stride_t, &sums,
                                                j0, n, check, finite);
    }
  };
  int64_t done = 0;
  while (done + 16 <= rows) {
    const int blocks = int(std::min<int64_t>(4, (rows - done) / 16));
    const int64_t t = t0 + done;
#define FR_PARTIAL(c) (partial + (t + 16 * (c)) * R + j0)
#define FR_START(c)                       \
  if (partial && clients.begin > 0) {     \
    _tile_loadd(c, FR_PARTIAL(c), R * 4); \
  } else {                                \
    _tile_zero(c);                        \
  }
#define FR_PRODUCTS(c)                                             \
  _tile_loadd(4, x + 16 * (c) * v.stride_t + k0, sx);              \
  _tile_dpbf16ps(c, 4, 5);                                         \
  _tile_dpbf16ps(c, 4, 6)
#define FR_TO_PARTIAL(c) _tile_stored(c, FR_PARTIAL(c), R * 4)
#define FR_TO_OUT(c)                         \
  _tile_stored(c, &block[0][0], 64);         \
  store_block(t + 16 * (c), j0)
    for (int j0 = 0; j0 < n; j0 += 16) {
      FR_FOR_TILES(blocks, FR_START);
      for (int64_t i = clients.begin; i < clients.end; ++i) {
        const c10::BFloat16* x = static_cast<const c10::BFloat16*>(v.x[i]) + t * v.stride_t;
        const uint32_t* pairs = client_coef_pairs<R>(p, v.layer, i) + j0;
        for (int k0 = 0; k0 < n; k0 += depth) {
          if (clients.prefetch) clients.prefetch->step();
          _tile_loadd(5, pairs + k0 / 2 * R, R * 4);
          _tile_loadd(6, pairs + R * R / 2 + k0 / 2 * R, R * 4);
          FR_FOR_TILES(blocks, FR_PRODUCTS);
        }
      }
      if (partial && clients.end < p.num_clients) FR_FOR_TILES(blocks, FR_TO_PARTIAL);  // partial is set when end < N
      else FR_FOR_TILES(blocks, FR_TO_OUT);
    }
#undef FR_PARTIAL
#undef FR_START
#undef FR_PRODUCTS
#undef FR_TO_PARTIAL
#undef FR_TO_OUT
    done += 16 * blocks;
  }
  finite = finite && lanes_all_zero<V, 16>(check);
  return done;
}
#else
// Without AMX the aggregation kernels do nothing (0 rows done); callers reach them only where
// kAmxBucket holds, which it never does in this build.
template <int R>
int64_t aggregate_rows_t_amx(const GroupParams&, const FactorView&, int, int64_t, int64_t, Clients<float>, bool&) {
  return 0;
}

template <int R>
int64_t aggregate_rows_j_amx(const GroupParams&, const FactorView&, int, int64_t, int64_t, Clients<float>, bool&) {
  return 0;
}
#endif  // FEDROT_AMX

// M += X_iᵀ Y for view f of `client` by tile_covariance, where its shapes allow (false: not done).
// A layout: the client's rows are the first operand, the paired reference (pair_rows_t) the second;
// B layout: the reference paired and transposed is the first operand (rows k), the client paired
// the second (columns j), and the tiles hold Mᵀ. The values of t past the last step are added in
// order after the tiles.
template <typename scalar_t, typename acc_t, int R>
bool covariance_on_tiles(const FactorView& v, int f, int64_t client, int n, CovarianceTiles& tiles, acc_t* M) {
#if FEDROT_AMX
  if constexpr (kAmxBucket<scalar_t, R>) {
    const bool by_t = t_contiguous_pair(v), by_j = !by_t && j_contiguous_pair(v);
    if (!(by_t || by_j) || !covariance_tiles_take<R>(n, v.rows)) return false;
    const auto* x = static_cast<const c10::BFloat16*>(v.x[client]);
    const auto* y = static_cast<const c10::BFloat16*>(v.ref);
    const int64_t T = v.rows, steps = T / kTileT, words = paired_words(n, T);
    std::vector<uint32_t>& ref = tiles.ref[f];
    if (tiles.layer[f] != v.layer) {
      ref.resize(std::max(ref.size(), size_t(words)));
      if (by_t) pair_rows_t(y, v.ref_stride_j, T, n, ref.data());
      else pair_rows_j(y, v.ref_stride_t, T, n, /*transpose=*/true, ref.data());
      tiles.layer[f] = v.layer;
    }
    if (by_t) {
      const int64_t row_bytes = v.stride_j * int64_t(sizeof(c10::BFloat16));
      tile_covariance<R>({x, row_bytes, kTileT * int64_t(sizeof(c10::BFloat16)), 16 * row_bytes},
                         word_operand(ref.data(), steps), steps, n, /*transposed=*/false, M);
    } else {
      tiles.client.resize(std::max(tiles.client.size(), size_t(words)));
      pair_rows_j(x, v.stride_t, T, n, /*transpose=*/false, tiles.client.data());
      tile_covariance<R>(word_operand(ref.data(), steps), word_operand(tiles.client.data(), steps), steps, n,
                         /*transposed=*/true, M);
    }
    const int64_t xt = by_t ? 1 : v.stride_t, xj = by_t ? v.stride_j : 1;
    const int64_t yt = by_t ? 1 : v.ref_stride_t, yk = by_t ? v.ref_stride_j : 1;
    for (int j = 0; j < n; ++j)
      for (int k = 0; k < n; ++k)
        for (int64_t u = steps * kTileT; u < T; ++u)
          M[j * R + k] += static_cast<acc_t>(x[u * xt + j * xj]) * static_cast<acc_t>(y[u * yt + k * yk]);
    return true;
  }
#endif
  return false;
}

}  // namespace

}  // namespace fedrot
