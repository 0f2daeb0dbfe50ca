#include "runtime/cpu_features.h"

#include <cstdlib>
#include <stdexcept>

#if defined(__x86_64__)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace flashpage::runtime {

namespace {

#if defined(__x86_64__)
struct Regs {
  unsigned a = 0, b = 0, c = 0, d = 0;
};

Regs cpuid(unsigned leaf, unsigned sub) {
  Regs r;
  if (!__get_cpuid_count(leaf, sub, &r.a, &r.b, &r.c, &r.d)) return {};
  return r;
}

unsigned long long xgetbv0() {
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

bool bit(unsigned reg, int n) { return (reg >> n) & 1u; }

// Linux (5.16+) hands out the 8 KB tile-data state only to processes that ask for it; the first
// tile instruction of a process that did not ask dies with SIGILL.
std::string request_amx_permission() {
#if defined(__linux__)
  constexpr long kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0)
    return "the kernel refused arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) (Linux >= 5.16 needed)";
  unsigned long long perm = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &perm) != 0 || !((perm >> kXfeatureXtiledata) & 1))
    return "arch_prctl granted no tile-data permission";
  return "";
#else
  return "AMX needs Linux's arch_prctl permission";
#endif
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__)
  const Regs l0 = cpuid(0, 0), l1 = cpuid(1, 0), l7 = cpuid(7, 0), l71 = cpuid(7, 1);
  char vendor[13] = {};
  __builtin_memcpy(vendor, &l0.b, 4);
  __builtin_memcpy(vendor + 4, &l0.d, 4);
  __builtin_memcpy(vendor + 8, &l0.c, 4);
  f.vendor = vendor;
  const bool osxsave = bit(l1.c, 27);
  const unsigned long long xcr0 = osxsave ? xgetbv0() : 0;
  f.os_avx = (xcr0 & 0x6) == 0x6;                     // SSE + YMM state
  f.os_avx512 = f.os_avx && (xcr0 & 0xE0) == 0xE0;     // opmask, ZMM_Hi256, Hi16_ZMM
  const bool xcr0_amx = (xcr0 & 0x60000) == 0x60000;  // XTILECFG + XTILEDATA
  f.fma = bit(l1.c, 12);
  f.f16c = bit(l1.c, 29);
  f.avx2 = bit(l7.b, 5);
  f.avx512f = bit(l7.b, 16);
  f.avx512dq = bit(l7.b, 17);
  f.avx512bw = bit(l7.b, 30);
  f.avx512vl = bit(l7.b, 31);
  f.avx512_vnni = bit(l7.c, 11);
  f.amx_bf16 = bit(l7.d, 22);
  f.amx_tile = bit(l7.d, 24);
  f.amx_int8 = bit(l7.d, 25);
  f.avx_vnni = bit(l71.a, 4);
  f.avx512_bf16 = bit(l71.a, 5);
  if (f.amx_tile) {
    if (!xcr0_amx) f.amx_denied = "the OS does not enable the tile state (XCR0)";
    else f.amx_denied = request_amx_permission();
    f.os_amx = f.amx_denied.empty();
  }
#endif
  return f;
}

bool cpu_supports(Isa isa) {
  const CpuFeatures& f = cpu_features();
  const bool avx2 = f.os_avx && f.avx2 && f.fma && f.f16c;
  const bool avx512 = avx2 && f.os_avx512 && f.avx512f && f.avx512bw && f.avx512dq && f.avx512vl;
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2: return avx2;
    case Isa::kAvx512: return avx512;
    case Isa::kAvx512Bf16: return avx512 && f.avx512_bf16;
    case Isa::kAmx: return avx512 && f.avx512_bf16 && f.amx_tile && f.amx_bf16 && f.os_amx;
  }
  return false;
}

bool compiled_in(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return true;
#ifdef FLASHPAGE_HAS_ISA_avx2
    case Isa::kAvx2: return true;
#endif
#ifdef FLASHPAGE_HAS_ISA_avx512
    case Isa::kAvx512: return true;
#endif
#ifdef FLASHPAGE_HAS_ISA_avx512_bf16
    case Isa::kAvx512Bf16: return true;
#endif
#ifdef FLASHPAGE_HAS_ISA_amx
    case Isa::kAmx: return true;
#endif
    default: return false;
  }
}

constexpr Isa kAllIsas[] = {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16, Isa::kAmx};

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAmx: return "amx";
  }
  return "unknown";
}

Isa parse_isa(const std::string& name) {
  for (Isa isa : kAllIsas)
    if (name == isa_name(isa)) return isa;
  throw std::invalid_argument("unknown CPU ISA '" + name + "' (choose scalar, avx2, avx512, avx512_bf16 or amx)");
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> out;
  for (Isa isa : kAllIsas)
    if (compiled_in(isa) && cpu_supports(isa)) out.push_back(isa);
  return out;
}

Isa best_isa() {
  static const Isa best = [] {
    const Isa top = supported_isas().back();
    return top == Isa::kAvx512Bf16 && cpu_features().vendor == "GenuineIntel" ? Isa::kAvx512 : top;
  }();
  return best;
}

Isa active_isa() {
  static const Isa active = [] {
    const char* env = std::getenv("FLASHPAGE_ISA");
    if (env == nullptr || *env == '\0') return best_isa();
    const Isa wanted = parse_isa(env);
    const Isa top = supported_isas().back();
    return static_cast<int>(wanted) <= static_cast<int>(top) ? wanted : top;
  }();
  return active;
}

}  // namespace flashpage::runtime
