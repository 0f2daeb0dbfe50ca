// Which x86 vector ISA this CPU runs, chosen once at start-up; FLASHPAGE_ISA=avx2|avx512|scalar
// in the environment forces a lower level (for tests and comparisons).
#pragma once

#include <string>
#include <vector>

namespace flashpage::runtime {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);
Isa parse_isa(const std::string& name);  // throws std::invalid_argument naming the choices
// The best level both compiled in and supported by this CPU.
Isa best_isa();
// The level kernels use: best_isa(), or FLASHPAGE_ISA if set (and supported).
Isa active_isa();
// Every level that is compiled in and runs on this CPU, lowest first.
std::vector<Isa> supported_isas();

}  // namespace flashpage::runtime
