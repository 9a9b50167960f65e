// Intel AMX for the CPU kernels: tile registers and bf16 tile products (16 × 16 fp32 sums of
// 16 × K by K × 16 bf16, K <= 32 pairs of values per word). Compiled where the build machine has
// AMX-BF16; used where Linux grants the process the tile state (5.16+), else the AVX-512 kernels run.
#pragma once

#include <cstdint>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define FEDROT_AMX 1
#else
#define FEDROT_AMX 0
#endif

namespace fedrot {

#if FEDROT_AMX
constexpr bool kAmxBuilt = true;

// Asks Linux once per process for the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA).
inline bool amx_usable() {
  static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return granted;
}

// Palette-1 tile shapes: rows and bytes per row of each of the 8 tiles.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes[16] = {};
  uint8_t rows[16] = {};
  void set(int tile, int tile_rows, int row_bytes) {
    rows[tile] = uint8_t(tile_rows);
    bytes[tile] = uint16_t(row_bytes);
  }
};

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

// BODY(c) for the tiles c < count (at most 4): GCC's _tile_ macros paste the tile number into the
// instruction, so it must be a literal.
#define FR_FOR_TILES(count, BODY)    \
  do {                               \
    { BODY(0); }                     \
    if ((count) > 1) { BODY(1); }    \
    if ((count) > 2) { BODY(2); }    \
    if ((count) > 3) { BODY(3); }    \
  } while (0)
#else
constexpr bool kAmxBuilt = false;
inline bool amx_usable() { return false; }
#endif

}  // namespace fedrot
