// The kernel tables: one per ISA level compiled in, and the choice among them for this CPU (or
// FLASHPAGE_ISA) and compute dtype. The kernels are in reference.cc and the per-level files.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "kernels/cpu/kernels.h"

namespace flashpage::cpu {

namespace {
// q8: the namespace whose int8 Linear the level uses.
#define FLASHPAGE_KERNEL_TABLE(level, isa, q8)                                                               \
  KernelTable {                                                                                             \
    isa, &level::rms_norm, &level::paged_attention, &level::linear_panel, &level::packed_linear_elems,      \
        &level::pack_linear, &level::linear, &level::linear_input, &level::silu_and_mul,                    \
        &level::gate_up_silu, &level::rotary,                                                               \
        &level::write_kv_cache, &q8::q8_panel, &q8::packed_q8_bytes, &q8::pack_q8, &q8::q8_linear,          \
        &q8::packed_qbits_bytes, &q8::pack_qbits, &q8::qbits_linear                                                 \
  }
constexpr KernelTable kRef = FLASHPAGE_KERNEL_TABLE(ref, runtime::Isa::kScalar, ref);
#ifdef FLASHPAGE_HAS_ISA_avx2
constexpr KernelTable kAvx2 = FLASHPAGE_KERNEL_TABLE(avx2, runtime::Isa::kAvx2, avx2);
#ifdef FLASHPAGE_HAS_ISA_avx_vnni
constexpr KernelTable kAvx2Vnni = FLASHPAGE_KERNEL_TABLE(avx2, runtime::Isa::kAvx2, avx_vnni);
#endif
#endif
#ifdef FLASHPAGE_HAS_ISA_avx512
constexpr KernelTable kAvx512 = FLASHPAGE_KERNEL_TABLE(avx512, runtime::Isa::kAvx512, avx512);
#ifdef FLASHPAGE_HAS_ISA_avx512_vnni
constexpr KernelTable kAvx512Vnni = FLASHPAGE_KERNEL_TABLE(avx512, runtime::Isa::kAvx512, avx512_vnni);
#endif
#endif
#ifdef FLASHPAGE_HAS_ISA_avx512_bf16
constexpr KernelTable kAvx512Bf16 = FLASHPAGE_KERNEL_TABLE(avx512_bf16, runtime::Isa::kAvx512Bf16, avx512_bf16);
#endif
#ifdef FLASHPAGE_HAS_ISA_amx
constexpr KernelTable kAmx = FLASHPAGE_KERNEL_TABLE(amx, runtime::Isa::kAmx, amx);
#endif
#undef FLASHPAGE_KERNEL_TABLE
}  // namespace

const KernelTable& kernels_for(runtime::Isa isa, bool int8_variants) {
  for (runtime::Isa s : runtime::supported_isas()) {
    if (s != isa) continue;
    switch (isa) {
      case runtime::Isa::kScalar: return kRef;
#ifdef FLASHPAGE_HAS_ISA_avx2
      case runtime::Isa::kAvx2:
#ifdef FLASHPAGE_HAS_ISA_avx_vnni
        if (int8_variants && runtime::cpu_features().avx_vnni) return kAvx2Vnni;  // Alder Lake, Sierra Forest
#endif
        return kAvx2;
#endif
#ifdef FLASHPAGE_HAS_ISA_avx512
      case runtime::Isa::kAvx512:
#ifdef FLASHPAGE_HAS_ISA_avx512_vnni
        if (int8_variants && runtime::cpu_features().avx512_vnni) return kAvx512Vnni;  // Ice Lake, Cooper Lake
#endif
        return kAvx512;
#endif
#ifdef FLASHPAGE_HAS_ISA_avx512_bf16
      case runtime::Isa::kAvx512Bf16: return kAvx512Bf16;
#endif
#ifdef FLASHPAGE_HAS_ISA_amx
      case runtime::Isa::kAmx: return kAmx;
#endif
      default: break;
    }
  }
  throw std::invalid_argument(std::string("CPU kernels for ISA '") + runtime::isa_name(isa) +
                              "' are not available in this build or on this CPU");
}

const KernelTable& kernels_for_compute(const std::string& compute_dtype, bool bf16_weights) {
  const runtime::Isa active = runtime::active_isa();
  if (compute_dtype == "auto") return kernels();
  if (compute_dtype == "float32") return kernels_for(std::min(active, runtime::Isa::kAvx512));
  if (compute_dtype == "bfloat16") {
    if (!bf16_weights)
      throw std::invalid_argument("compute_dtype=bfloat16 needs bf16 weights (dtype \"bfloat16\" or a bf16 checkpoint)");
    if (!runtime::isa_has_bf16_dot(active))
      throw std::invalid_argument(std::string("compute_dtype=bfloat16 needs a CPU with AVX512-BF16 or AMX; the kernels in "
                                              "use are '") + runtime::isa_name(active) + "'");
    return kernels();
  }
  throw std::invalid_argument("compute_dtype \"" + compute_dtype + "\" is not one of auto, bfloat16, float32");
}

const KernelTable& kernels() {
  static const KernelTable& table = kernels_for(runtime::active_isa());
  return table;
}

}  // namespace flashpage::cpu
