// The C++ sampler of the Engine: greedy, temperature, top-k, top-p, min-p, with one random
// generator per request so a seeded request samples the same tokens whatever shares its batch.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <utility>
#include <vector>

#include "flashpage/engine.h"

namespace flashpage::engine {

class Sampler {
 public:
  // Throws std::invalid_argument naming the field and its allowed range.
  static void validate(const SamplingOptions& o);
  // One token from one row of logits. Greedy (temperature 0) takes the first maximum.
  int32_t sample(std::span<const float> logits, const SamplingOptions& o, std::mt19937_64& rng);

 private:
  std::vector<std::pair<float, int32_t>> cand_;  // scratch, reused across calls
};

}  // namespace flashpage::engine
