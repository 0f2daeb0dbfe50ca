// AMX tile configuration for the amx level's kernels (linear_bf16.cc, attention_amx.cc).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <initializer_list>

namespace flashpage::cpu::FLASHPAGE_ISA {

#if defined(__AMX_TILE__)
// The 64-byte LDTILECFG operand (palette 1): bytes per row and rows of each of the 8 tiles.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  // {rows, bytes per row} for tiles 0, 1, ...
  TileConfig(std::initializer_list<std::pair<int, int>> shapes) {
    int t = 0;
    for (auto [r, c] : shapes) rows[t] = uint8_t(r), colsb[t++] = uint16_t(c);
  }
};

// Loads a configuration on this thread for the scope's lifetime; releasing the tiles afterwards
// keeps context switches from saving 8 KB of tile state for a thread that no longer uses them.
class TileScope {
 public:
  explicit TileScope(const TileConfig& cfg) { _tile_loadconfig(&cfg); }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};
#endif

}  // namespace flashpage::cpu::FLASHPAGE_ISA
