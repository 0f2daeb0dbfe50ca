#include "runtime/memory.h"

#include <cstdio>
#include <stdexcept>
#include <string>

namespace flashpage::runtime {

int64_t memory_budget_from_fraction(double fraction) {
  if (!(fraction > 0.0 && fraction <= 1.0))
    throw std::invalid_argument("memory fraction must be in (0, 1], got " + std::to_string(fraction));
  if (std::FILE* f = std::fopen("/proc/meminfo", "r")) {
    char line[256];
    long long kb = -1;
    while (std::fgets(line, sizeof line, f))
      if (std::sscanf(line, "MemAvailable: %lld kB", &kb) == 1) break;
    std::fclose(f);
    if (kb >= 0) return static_cast<int64_t>(double(kb) * 1024 * fraction);
  }
  throw std::runtime_error("/proc/meminfo: no MemAvailable line; give the KV cache a size in bytes");
}

}  // namespace flashpage::runtime
