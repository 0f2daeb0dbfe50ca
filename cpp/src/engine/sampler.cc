#include "engine/sampler.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace flashpage::engine {
namespace {

constexpr float kGreedyBelow = 1e-5f;  // as vLLM: temperatures below this are greedy

[[noreturn]] void bad(const std::string& field, const std::string& rule, double got) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%g", got);
  throw std::invalid_argument(field + " must be " + rule + ", got " + buf);
}

// The first maximum, as std::max_element (a NaN wins only as the first value), in two passes:
// the largest value in 8 lanes (SSE's maxps is x > m ? x : m, lane by lane, which GCC does not
// vectorize from the plain loop), then its first index. std::max_element's compare-and-branch per
// value took ~4 % of a 64-sequence SmolLM2 run.
int64_t first_max(std::span<const float> logits) {
  const float* x = logits.data();
  const int64_t n = int64_t(logits.size());
  if (n == 0 || std::isnan(x[0])) return 0;
  __m128 m0 = _mm_set1_ps(x[0]), m1 = m0;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    m0 = _mm_max_ps(_mm_loadu_ps(x + i), m0);
    m1 = _mm_max_ps(_mm_loadu_ps(x + i + 4), m1);
  }
  alignas(16) float lanes[8];
  _mm_store_ps(lanes, m0);
  _mm_store_ps(lanes + 4, m1);
  float best = x[0];
  for (float v : lanes) best = v > best ? v : best;
  for (; i < n; ++i) best = x[i] > best ? x[i] : best;
  for (i = 0; i < n; ++i)
    if (x[i] == best) return i;
  return 0;  // unreachable: best is one of the values
}

}  // namespace

void Sampler::validate(const SamplingOptions& o) {
  if (!(o.temperature >= 0.f) || !std::isfinite(o.temperature)) bad("temperature", ">= 0", o.temperature);
  if (o.top_k < -1) bad("top_k", "-1 (disabled), 0 (disabled) or positive", o.top_k);
  if (!(o.top_p > 0.f && o.top_p <= 1.f)) bad("top_p", "in (0, 1]", o.top_p);
  if (!(o.min_p >= 0.f && o.min_p <= 1.f)) bad("min_p", "in [0, 1]", o.min_p);
  if (o.max_tokens < 1) bad("max_tokens", ">= 1", o.max_tokens);
  if (o.min_tokens < 0 || o.min_tokens > o.max_tokens) bad("min_tokens", "in [0, max_tokens]", o.min_tokens);
}

int32_t Sampler::sample(std::span<const float> logits, const SamplingOptions& o, std::mt19937_64& rng) {
  const int64_t V = int64_t(logits.size());
  if (o.temperature < kGreedyBelow) {
    return int32_t(first_max(logits));
  }
  const double inv_t = 1.0 / o.temperature;
  const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
  const float mx = *std::max_element(logits.begin(), logits.end());
  const bool top_k = o.top_k > 0 && o.top_k < V;
  if (!top_k && o.top_p >= 1.f && o.min_p <= 0.f) {  // plain softmax: no candidate list
    double sum = 0;
    for (float x : logits) sum += std::exp((double(x) - mx) * inv_t);
    double target = u * sum, acc = 0;
    for (int64_t i = 0; i < V; ++i) {
      acc += std::exp((double(logits[i]) - mx) * inv_t);
      if (acc > target) return int32_t(i);
    }
    return int32_t(V - 1);
  }
  cand_.resize(size_t(V));
  for (int64_t i = 0; i < V; ++i) cand_[i] = {logits[i], int32_t(i)};
  auto desc = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  int64_t n = V;
  if (top_k) {
    std::nth_element(cand_.begin(), cand_.begin() + o.top_k, cand_.end(), desc);
    n = o.top_k;
  }
  std::sort(cand_.begin(), cand_.begin() + n, desc);
  // Probabilities (unnormalised, in place of the logits), then min-p and top-p cut-offs.
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    cand_[i].first = float(std::exp((double(cand_[i].first) - mx) * inv_t));
    sum += cand_[i].first;
  }
  const double floor = double(o.min_p) * cand_[0].first;
  int64_t keep = 0;
  double kept = 0;
  for (; keep < n; ++keep) {
    if (keep > 0 && (cand_[keep].first < floor || kept >= o.top_p * sum)) break;
    kept += cand_[keep].first;
  }
  double target = u * kept, acc = 0;
  for (int64_t i = 0; i < keep; ++i) {
    acc += cand_[i].first;
    if (acc > target) return cand_[i].second;
  }
  return cand_[keep - 1].second;
}

}  // namespace flashpage::engine
