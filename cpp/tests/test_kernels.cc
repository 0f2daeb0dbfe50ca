#include <cmath>
#include <random>

#include "kernels/cpu/kernels.h"
#include "runtime/cpu_features.h"
#include "test_util.h"

using namespace flashpage;

TEST(rms_norm_matches_reference_on_every_isa) {
  std::mt19937 rng(7);
  std::normal_distribution<float> dist;
  for (int64_t dim : {1, 7, 8, 16, 64, 100, 576, 4096}) {
    const int64_t rows = 3;
    std::vector<float> x(rows * dim), w(dim), res(rows * dim);
    for (auto& v : x) v = dist(rng);
    for (auto& v : w) v = dist(rng);
    for (auto& v : res) v = dist(rng);
    std::vector<float> want(rows * dim), want_res = res;
    cpu::ref::rms_norm(want.data(), x.data(), want_res.data(), w.data(), rows, dim, 1e-5f);
    for (auto isa : runtime::supported_isas()) {
      std::vector<float> got(rows * dim), got_res = res;
      cpu::kernels_for(isa).rms_norm(got.data(), x.data(), got_res.data(), w.data(), rows, dim, 1e-5f);
      for (int64_t i = 0; i < rows * dim; ++i) {
        // fp32 accumulation order differs from the double-accumulating reference.
        CHECK(std::fabs(got[i] - want[i]) <= 1e-5f * (1 + std::fabs(want[i])));
        CHECK_EQ(got_res[i], want_res[i]);
      }
    }
  }
}

TEST(isa_dispatch_picks_a_supported_level) {
  const auto isas = runtime::supported_isas();
  REQUIRE(!isas.empty());
  CHECK(isas.front() == runtime::Isa::kScalar);
  const bool intel_bf16_only = isas.back() == runtime::Isa::kAvx512Bf16 && runtime::cpu_features().vendor == "GenuineIntel";
  CHECK(runtime::best_isa() == (intel_bf16_only ? runtime::Isa::kAvx512 : isas.back()));
  CHECK(cpu::kernels().isa == runtime::active_isa());
  CHECK_THROWS(std::invalid_argument, runtime::parse_isa("sse9"), "sse9");
}
