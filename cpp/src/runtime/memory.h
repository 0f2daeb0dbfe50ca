// What memory the machine has left.
#pragma once

#include <cstdint>

namespace flashpage::runtime {

// Bytes for a fraction (0, 1] of the memory the OS reports available (MemAvailable); throws
// std::invalid_argument for another fraction, std::runtime_error where the OS does not say.
int64_t memory_budget_from_fraction(double fraction);

}  // namespace flashpage::runtime
