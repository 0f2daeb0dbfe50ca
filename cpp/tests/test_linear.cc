// The CPU Linear kernels (weights packed into each level's panel layout first): against the
// scalar reference, into a y wider than N, and batch invariance (bitwise equal rows whatever M,
// the row order and the n split).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cpu/kernels.h"
#include "runtime/cpu_features.h"
#include "test_util.h"

using namespace flashpage;

namespace {

struct Weights {
  std::vector<float> f32;     // the values (bf16-representable when bf16)
  std::vector<uint16_t> b16;  // their bf16 bits
  bool bf16;
  const void* data() const { return bf16 ? static_cast<const void*>(b16.data()) : f32.data(); }
};

Weights make_weights(int64_t N, int64_t K, bool bf16, std::mt19937& rng) {
  std::normal_distribution<float> dist;
  Weights w{std::vector<float>(N * K), std::vector<uint16_t>(N * K), bf16};
  for (int64_t i = 0; i < N * K; ++i) {
    float v = dist(rng);
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    w.b16[i] = static_cast<uint16_t>(bits >> 16);
    if (bf16) {
      bits &= 0xFFFF0000u;
      std::memcpy(&v, &bits, 4);
    }
    w.f32[i] = v;
  }
  return w;
}

std::vector<float> randn(int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> dist;
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// x rounded to bf16 (what the levels with bf16 dot products multiply).
std::vector<float> rounded(const std::vector<float>& x) {
  std::vector<float> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const uint32_t bits = uint32_t(cpu::bf16_round(x[i])) << 16;
    std::memcpy(&out[i], &bits, 4);
  }
  return out;
}

// y[M, N] through table t with rows of stride `ldy` starting at column `off`, n split at `cuts`
// (rounded down to the table's panel width, as callers must). x goes in as the table takes it
// (rounded to bf16 by linear_input on the bf16 levels).
std::vector<float> call(const cpu::KernelTable& t, const std::vector<float>& x, const Weights& w, const float* bias,
                        int64_t M, int64_t N, int64_t K, std::vector<int64_t> cuts = {}, int64_t ldy = 0,
                        int64_t off = 0) {
  if (ldy == 0) ldy = N;
  const cpu::PackedLinear p = cpu::pack_linear_weight(t, w.data(), w.bf16, N, K);
  runtime::AlignedVector<uint16_t> x16;
  const void* input = cpu::linear_input_for(t, w.bf16, x.data(), M, K, x16);
  std::vector<float> y(M * ldy, -7.f);
  for (auto& c : cuts) c -= c % t.linear_panel();
  cuts.insert(cuts.begin(), 0);
  cuts.push_back(N);
  for (size_t i = 0; i + 1 < cuts.size(); ++i)
    t.linear(y.data() + off, input, p.data.data(), w.bf16, bias, M, ldy, K, cuts[i], std::max(cuts[i], cuts[i + 1]));
  return y;
}

const cpu::KernelTable& ref_table() { return cpu::kernels_for(runtime::Isa::kScalar); }

}  // namespace

TEST(linear_matches_reference) {
  std::mt19937 rng(3);
  for (bool bf16 : {false, true})
    for (auto [M, N, K] : {std::array<int64_t, 3>{1, 1, 1}, {1, 70, 37}, {3, 33, 16}, {7, 45, 100},
                           {8, 64, 64}, {13, 96, 128}, {37, 77, 301}, {70, 130, 5},
                           {70, 100, 2100}}) {  // K in slices (amx: over 64 k blocks)
      const Weights w = make_weights(N, K, bf16, rng);
      const auto x = randn(M * K, rng), bias = randn(N, rng);
      const auto x16 = rounded(x);
      for (const float* b : {static_cast<const float*>(nullptr), bias.data()}) {
        const auto want32 = call(ref_table(), x, w, b, M, N, K), want16 = call(ref_table(), x16, w, b, M, N, K);
        for (auto isa : runtime::supported_isas()) {
          const auto& t = cpu::kernels_for(isa);
          const bool in16 = cpu::takes_bf16_input(t, bf16);
          const auto& want = in16 ? want16 : want32;
          const auto& xs = in16 ? x16 : x;
          {
            // Into columns [5, 5 + N) of rows of N + 12, in three uneven parts.
            const int64_t ldy = N + 12, off = 5;
            const auto got = call(t, x, w, b, M, N, K, {std::min<int64_t>(N, 3), N / 2}, ldy, off);
            int64_t bad = 0;
            for (int64_t m = 0; m < M; ++m)
              for (int64_t j = 0; j < ldy; ++j) {
                const float g = got[m * ldy + j];
                if (j < off || j >= off + N) {
                  bad += g != -7.f;  // outside the written columns: untouched
                  continue;
                }
                double mag = b ? std::fabs(b[j - off]) : 0.0;
                for (int64_t k = 0; k < K; ++k) mag += std::fabs(double(xs[m * K + k]) * w.f32[(j - off) * K + k]);
                bad += !(std::fabs(g - want[m * N + j - off]) <= 1e-6 * (mag + 1) * std::sqrt(double(K)));
              }
            if (bad)
              std::fprintf(stderr, "  %s M=%lld N=%lld K=%lld bf16=%d bias=%d: %lld wrong\n", runtime::isa_name(isa),
                           (long long)M, (long long)N, (long long)K, int(bf16), b != nullptr, (long long)bad);
            CHECK_EQ(bad, 0);
          }
        }
      }
    }
}

TEST(linear_is_batch_invariant) {
  std::mt19937 rng(11);
  const int64_t M = 37;
  for (bool bf16 : {false, true})
    for (auto [N, K] : {std::array<int64_t, 2>{45, 301}, {77, 67}, {33, 5}, {50, 1040}, {40, 2100}}) {
      const Weights w = make_weights(N, K, bf16, rng);
      const auto x = randn(M * K, rng), bias = randn(N, rng);
      std::vector<int64_t> perm(M);
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      std::vector<float> xp(M * K);
      for (int64_t i = 0; i < M; ++i) std::copy_n(&x[perm[i] * K], K, &xp[i * K]);
      for (auto isa : runtime::supported_isas()) {
        const auto& fn = cpu::kernels_for(isa);
        const auto full = call(fn, x, w, bias.data(), M, N, K);
        // Other n splits, and a wider y.
        CHECK(call(fn, x, w, bias.data(), M, N, K, {1, 17, 18, N - 3}) == full);
        const auto wide = call(fn, x, w, bias.data(), M, N, K, {N / 3}, N + 9, 4);
        for (int64_t m = 0; m < M; ++m)
          CHECK(std::memcmp(&wide[m * (N + 9) + 4], &full[m * N], N * sizeof(float)) == 0);
        // Each row alone, and runs of rows of every length up to 24 from various starts.
        for (int64_t i = 0; i < M; ++i) {
          const std::vector<float> xi(x.begin() + i * K, x.begin() + (i + 1) * K);
          CHECK(std::memcmp(call(fn, xi, w, bias.data(), 1, N, K).data(), &full[i * N], N * sizeof(float)) == 0);
        }
        for (int64_t len = 2; len <= 24; ++len) {
          const int64_t start = (len * 7) % (M - len + 1);
          const std::vector<float> xs(x.begin() + start * K, x.begin() + (start + len) * K);
          const auto ys = call(fn, xs, w, bias.data(), len, N, K, {N / 2});
          CHECK(std::memcmp(ys.data(), &full[start * N], len * N * sizeof(float)) == 0);
        }
        // The rows permuted.
        const auto yp = call(fn, xp, w, bias.data(), M, N, K);
        for (int64_t i = 0; i < M; ++i)
          CHECK(std::memcmp(&yp[i * N], &full[perm[i] * N], N * sizeof(float)) == 0);
        // Without a bias: the same sums (no + 0.f that would turn -0 into +0).
        const auto nb = call(fn, x, w, nullptr, M, N, K);
        const auto nb1 = call(fn, std::vector<float>(x.begin(), x.begin() + K), w, nullptr, 1, N, K);
        CHECK(std::memcmp(nb.data(), nb1.data(), N * sizeof(float)) == 0);
      }
    }
}

TEST(linear_invariant_across_packing_passes) {
  // Enough rows for many row tiles and groups of them (the fp32 GEMM), several row passes and
  // K slices (the bf16 levels), with a K tail and a partial last tile: still the rows of
  // single-row calls, bit for bit.
  std::mt19937 rng(5);
  const int64_t M = 400, N = 40, K = 5633;
  for (bool bf16 : {false, true}) {
    const Weights w = make_weights(N, K, bf16, rng);
    const auto x = randn(M * K, rng), bias = randn(N, rng);
    const auto want32 = call(ref_table(), x, w, bias.data(), M, N, K);
    const auto want16 = call(ref_table(), rounded(x), w, bias.data(), M, N, K);
    for (auto isa : runtime::supported_isas()) {
      const auto& t = cpu::kernels_for(isa);
      const auto& want = cpu::takes_bf16_input(t, bf16) ? want16 : want32;
      const auto full = call(t, x, w, bias.data(), M, N, K, {N / 2});
      int64_t differ = 0, far = 0;
      for (int64_t i = 0; i < M; ++i) {
        const std::vector<float> xi(x.begin() + i * K, x.begin() + (i + 1) * K);
        differ += std::memcmp(call(t, xi, w, bias.data(), 1, N, K).data(), &full[i * N], N * sizeof(float)) != 0;
        for (int64_t n = 0; n < N; ++n) far += !(std::fabs(full[i * N + n] - want[i * N + n]) <= 2e-3f);
      }
      CHECK_EQ(differ, 0);
      CHECK_EQ(far, 0);
    }
  }
}

TEST(q8_linear_matches_reference_bit_for_bit_on_every_isa) {
  // The int8 Linear: every level's packing and kernel against the reference's, exactly (the
  // block dot products are exact integers and the accumulation order is fixed), for M that
  // does and does not fill the kernels' row tiles, N that does not fill a panel, a y wider than
  // N and a column split at panel boundaries; the reference against float arithmetic.
  std::mt19937 rng(21);
  std::normal_distribution<float> dist;
  // int8 weights; 4-bit (0..15) and 5-bit (0..31) ones, with fp32 and with fp16 scales
  for (const int variant : {0, 1, 2, 3, 4})
  for (int64_t K : {32, 96, 576})
    for (int64_t N : {16, 40, 72})  // 72: panel pairs, the second one partial
      for (int64_t M : {1, 3, 4, 5, 16, 17, 32, 35}) {
        const bool four = variant > 0, half = variant % 2 == 0 && variant > 0;
        const int bits = variant == 0 ? 8 : variant <= 2 ? 4 : 5;
        std::vector<int8_t> wq(N * K);
        std::vector<float> wd(N * (K / 32)), wm(N * (K / 32)), bias(N), x(M * K);
        std::uniform_int_distribution<int> q(four ? 0 : -127, four ? (1 << bits) - 1 : 127);
        for (auto& v : wq) v = int8_t(q(rng));
        for (auto& v : wd) v = std::fabs(dist(rng)) * 0.01f;
        for (auto& v : wm) v = dist(rng) * 0.05f;
        if (half)  // values an fp16 holds exactly, as Q4_0 / Q4_1 scales are: multiples of 2^-12
          for (auto* a : {&wd, &wm})
            for (auto& v : *a) {
              v = std::round(v * 4096.f) / 4096.f;
              CHECK(cpu::fp16_exact(v));
            }
        for (auto& v : bias) v = dist(rng);
        for (auto& v : x) v = dist(rng);
        std::vector<int8_t> xq(M * K), xq2(M * K);
        std::vector<float> xd(M * (K / 32)), xdu(xd.size());
        std::vector<int32_t> xs(M * (K / 32)), xs2(M * (K / 32));
        cpu::quantize_q8_rows(x.data(), M, K, xq.data(), xd.data(), xs.data(), xq2.data(), xs2.data(), xdu.data());
        for (int64_t i = 0; i < M * K; ++i) {  // within half a step of each level
          CHECK(std::fabs(float(xq[i]) * xd[i / 32] - x[i]) <= 0.5001f * xd[i / 32] + 1e-7f);
          const float two = xd[i / 32] * (float(xq[i]) + float(xq2[i]) * cpu::kQ8Level2);
          CHECK(std::fabs(two - x[i]) <= 0.5001f * xd[i / 32] * cpu::kQ8Level2 + 1e-6f * std::fabs(x[i]) + 1e-7f);
        }
        const cpu::Q8Rows rows{xq.data(), xq2.data(), xd.data(), xs.data(), xs2.data(), xdu.data()};
        // The same activations in 16-row tiles (what the CPU backend passes): the same results.
        std::vector<int8_t> tq((M + 15) / 16 * 16 * K), tq2(tq.size());
        std::vector<float> td(xd.size()), tdu(xd.size());
        std::vector<int32_t> ts(xs.size()), ts2(xs2.size());
        cpu::quantize_q8_rows(x.data(), M, K, tq.data(), td.data(), ts.data(), tq2.data(), ts2.data(), tdu.data(), true);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t k = 0; k < K; ++k) CHECK_EQ(tq[cpu::q8_offset(true, m, k, K)], xq[m * K + k]);
        const cpu::Q8Rows tiled{tq.data(), tq2.data(), td.data(), ts.data(), ts2.data(), tdu.data(), true};
        auto run = [&](const cpu::KernelTable& t, int64_t ldy, const cpu::Q8Rows& rows) {
          runtime::AlignedVector<uint8_t> packed(
              size_t(four ? t.packed_qbits_bytes(N, K, bits, half) : t.packed_q8_bytes(N, K)));
          if (four) t.pack_qbits(packed.data(), wq.data(), wd.data(), wm.data(), N, K, 0, N, bits, half);
          else t.pack_q8(packed.data(), wq.data(), wd.data(), wm.data(), N, K, 0, N);
          std::vector<float> y(M * ldy, -7.f);
          const int64_t cut = std::min(N, t.q8_panel() * ((N / 2 + t.q8_panel() - 1) / t.q8_panel()));
          for (auto [n0, n1] : {std::pair{int64_t(0), cut}, std::pair{cut, N}}) {
            if (four) t.qbits_linear(y.data(), rows, packed.data(), bias.data(), M, ldy, K, n0, n1, bits, half);
            else t.q8_linear(y.data(), rows, packed.data(), bias.data(), M, ldy, K, n0, n1);
          }
          return y;
        };
        const std::vector<float> want = run(ref_table(), N + 3, rows);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < N; ++n) {
            double exact = bias[n];
            for (int64_t k = 0; k < K; ++k)
              exact += (double(xq[m * K + k]) + double(xq2[m * K + k]) / 254.0) * xd[m * (K / 32) + k / 32] *
                       (double(wq[n * K + k]) * wd[n * (K / 32) + k / 32] + wm[n * (K / 32) + k / 32]);
            CHECK(std::fabs(want[m * (N + 3) + n] - exact) <= 2e-4 * (1 + std::fabs(exact)));
            CHECK_EQ(want[m * (N + 3) + N], -7.f);  // beyond N: untouched
          }
        CHECK(run(ref_table(), N + 3, tiled) == want);
        // Each level, with and without its VNNI build (avx2: AVX-VNNI, avx512: AVX512-VNNI).
        for (runtime::Isa isa : runtime::supported_isas())
          for (const bool variant : {true, false})
          for (const cpu::Q8Rows* layout : {&rows, &tiled}) {
            const std::vector<float> got = run(cpu::kernels_for(isa, variant), N + 3, *layout);
            for (size_t i = 0; i < got.size(); ++i)
              if (!(got[i] == want[i]) && !(std::isnan(got[i]) && std::isnan(want[i]))) {
                fptest::report(__FILE__, __LINE__, "q" + std::to_string(bits) + (half ? " (fp16 scales)" : "") + "_linear on " + runtime::isa_name(isa) + (variant ? "" : " (no VNNI build)") + " M=" +
                                                       std::to_string(M) + " N=" + std::to_string(N) + " K=" +
                                                       std::to_string(K) + (layout->tiled ? " tiled" : "") + " differs at " + std::to_string(i));
                break;
              }
          }
      }
}
