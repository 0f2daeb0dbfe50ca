#include "runtime/cpu_features.h"

#include <cstdlib>
#include <stdexcept>

namespace flashpage::runtime {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "unknown";
}

Isa parse_isa(const std::string& name) {
  if (name == "scalar") return Isa::kScalar;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "avx512") return Isa::kAvx512;
  throw std::invalid_argument("unknown CPU ISA '" + name + "' (choose scalar, avx2 or avx512)");
}

static bool cpu_supports(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  }
  return false;
#else
  return isa == Isa::kScalar;
#endif
}

static bool compiled_in(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return true;
#ifdef FLASHPAGE_HAS_ISA_avx2
    case Isa::kAvx2: return true;
#endif
#ifdef FLASHPAGE_HAS_ISA_avx512
    case Isa::kAvx512: return true;
#endif
    default: return false;
  }
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> out;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512})
    if (compiled_in(isa) && cpu_supports(isa)) out.push_back(isa);
  return out;
}

Isa best_isa() {
  static const Isa best = supported_isas().back();
  return best;
}

Isa active_isa() {
  static const Isa active = [] {
    const char* env = std::getenv("FLASHPAGE_ISA");
    if (env == nullptr || *env == '\0') return best_isa();
    const Isa wanted = parse_isa(env);
    return static_cast<int>(wanted) <= static_cast<int>(best_isa()) ? wanted : best_isa();
  }();
  return active;
}

}  // namespace flashpage::runtime
