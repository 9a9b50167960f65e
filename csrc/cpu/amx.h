// Whether this build has the Intel AMX kernels: FEDROT_AMX is 1 where the compiler targets
// AMX-TILE and AMX-BF16 (setup.py passes -mamx-tile -mamx-bf16 where the build machine has them),
// and kAmxBuilt says the same to C++ code. Also the parts of those kernels that run no tile
// instruction (the tile shapes, and the loop over tile numbers); every code path that does lives in
// cpu/amx_kernels.h, behind functions that exist in both builds.
#pragma once

#include <cstdint>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define FEDROT_AMX 1
#else
#define FEDROT_AMX 0
#endif

namespace fedrot {

constexpr bool kAmxBuilt = FEDROT_AMX == 1;

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

// BODY(c) for the tiles c < count (at most 4): GCC's _tile_ macros paste the tile number into the
// instruction, so it must be a literal.
#define FR_FOR_TILES(count, BODY)    \
  do {                               \
    { BODY(0); }                     \
    if ((count) > 1) { BODY(1); }    \
    if ((count) > 2) { BODY(2); }    \
    if ((count) > 3) { BODY(3); }    \
  } while (0)

}  // namespace fedrot
