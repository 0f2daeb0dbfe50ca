// Which x86 vector ISA this CPU runs, chosen once at start-up from CPUID and the OS's
// permission (XCR0 for the AVX-512 and AMX register state; Linux's arch_prctl for AMX tiles).
// FLASHPAGE_ISA=scalar|avx2|avx512|avx512_bf16|amx in the environment forces a lower level (for
// tests and comparisons).
//
// The levels are ordered; each includes the ones below it:
//   avx2         AVX2 + FMA + F16C: fp32 kernels, 8 lanes
//   avx512       AVX-512 F/BW/DQ/VL: fp32 kernels, 16 lanes
//   avx512_bf16  + AVX512-BF16 (vdpbf16ps): bf16 checkpoints compute in bf16 (Zen 4, Cooper Lake)
//   amx          + AMX-TILE/AMX-BF16: bf16 GEMMs and attention on the tile unit (Sapphire Rapids on)
// The int8 dot-product extensions (AVX512-VNNI, AVX-VNNI, AMX-INT8) are detected and reported
// for the quantized kernels; they do not define levels of their own.
#pragma once

#include <string>
#include <vector>

namespace flashpage::runtime {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

// What CPUID says, and what the OS lets this process use.
struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512dq = false, avx512vl = false;
  bool avx512_bf16 = false, avx512_vnni = false, avx_vnni = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
  bool os_avx = false;     // XCR0: YMM state saved by the OS
  bool os_avx512 = false;  // XCR0: opmask and ZMM state
  bool os_amx = false;     // XCR0: tile config and data; and Linux granted this process tiles
  std::string amx_denied;  // why AMX is unusable although the CPU has it ("" if usable or absent)
  std::string vendor;      // CPUID's: "GenuineIntel", "AuthenticAMD", ...
};

// Read once (the AMX permission is requested from the kernel on first use).
const CpuFeatures& cpu_features();

const char* isa_name(Isa isa);
Isa parse_isa(const std::string& name);  // throws std::invalid_argument naming the choices
// The level kernels run by default: the best one compiled in and supported by this CPU, except
// that an Intel CPU with AVX512-BF16 but no AMX (Cooper Lake) stays at avx512: its vdpbf16ps
// runs at a quarter of its FMAs' rate (measured on a Sapphire Rapids core), half their FLOPs,
// where on AMD Zen 4 it matches them (twice the FLOPs). FLASHPAGE_ISA=avx512_bf16 still picks it.
Isa best_isa();
// The level kernels use: best_isa(), or FLASHPAGE_ISA if set (and supported).
Isa active_isa();
// Every level that is compiled in and runs on this CPU, lowest first.
std::vector<Isa> supported_isas();
// Levels whose kernels multiply bf16 by bf16 (with fp32 sums) rather than widening to fp32.
inline bool isa_has_bf16_dot(Isa isa) { return isa >= Isa::kAvx512Bf16; }

}  // namespace flashpage::runtime
