// Every op of the backend interface (backends/backend.h), on every backend present — the CPU
// backend at each ISA level this build and CPU have, with fp32 and bf16 weights, and the CUDA
// backend where libflashpage_cuda loads and sees a GPU — against the reference backend (the
// CPU's scalar kernels), in the spirit of llama.cpp's test-backend-ops. Each failure names the
// backend and the op.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "backends/cpu/cpu_backend.h"
#include "backends/cuda/cuda_backend.h"
#include "kernels/cpu/kernels.h"
#include "runtime/cpu_features.h"
#include "runtime/cuda_loader.h"
#include "test_util.h"

using namespace flashpage;
using backends::Backend;
using backends::DeviceBuffer;

namespace {

struct Subject {
  std::string name;
  std::unique_ptr<Backend> backend, reference;
  bool bf16;
};

// Every backend to test, each with a reference of the same weight dtype.
std::vector<Subject> subjects() {
  std::vector<Subject> out;
  const cpu::KernelTable& ref = cpu::kernels_for(runtime::Isa::kScalar);
  for (bool bf16 : {false, true})
    for (runtime::Isa isa : runtime::supported_isas()) {
      auto b = backends::make_cpu_backend(cpu::kernels_for(isa), bf16);
      const std::string name = b->name() + (bf16 ? " bf16" : " fp32");
      out.push_back({name, std::move(b), backends::make_cpu_backend(ref, bf16), bf16});
    }
  if (runtime::cuda_probe().available) {  // bf16 weights only
    auto b = backends::make_cuda_backend(0);
    const std::string name = b->name();
    out.push_back({name, std::move(b), backends::make_cpu_backend(ref, true), true});
  }
  return out;
}

float bf16_value(float x) {
  const uint32_t bits = uint32_t(cpu::bf16_round(x)) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

std::vector<float> randn(int64_t n, std::mt19937& rng, float scale = 1.f) {
  std::normal_distribution<float> dist;
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = dist(rng) * scale;
  return v;
}

// Activations in and out of a backend's memory, in its activation width.
void write_acts(Backend& be, void* dst, const std::vector<float>& x) {
  if (be.capabilities().activation_bytes == 4) {
    be.copy_to_device(dst, x.data(), x.size() * 4);
  } else {
    std::vector<uint16_t> h(x.size());
    for (size_t i = 0; i < x.size(); ++i) h[i] = cpu::bf16_round(x[i]);
    be.copy_to_device(dst, h.data(), h.size() * 2);
  }
}
DeviceBuffer acts_in(Backend& be, const std::vector<float>& x) {
  DeviceBuffer d = be.allocate(std::max<size_t>(1, x.size() * size_t(be.capabilities().activation_bytes)));
  write_acts(be, d.data, x);
  return d;
}
std::vector<float> acts_out(Backend& be, const void* p, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n));
  if (be.capabilities().activation_bytes == 4) {
    be.copy_to_host(out.data(), p, size_t(n) * 4);
  } else {
    std::vector<uint16_t> h(static_cast<size_t>(n));
    be.copy_to_host(h.data(), p, size_t(n) * 2);
    for (size_t i = 0; i < h.size(); ++i) {
      const uint32_t bits = uint32_t(h[i]) << 16;
      std::memcpy(&out[i], &bits, 4);
    }
  }
  return out;
}
template <class T>
DeviceBuffer raw_in(Backend& be, const std::vector<T>& x) {
  DeviceBuffer d = be.allocate(std::max<size_t>(1, x.size() * sizeof(T)));
  be.copy_to_device(d.data, x.data(), x.size() * sizeof(T));
  return d;
}
template <class T>
std::vector<T> raw_out(Backend& be, const void* p, size_t n) {
  std::vector<T> out(n);
  be.copy_to_host(out.data(), p, n * sizeof(T));
  return out;
}

// |got - want| <= tol * (1 + |want|) everywhere; reports the worst element once.
void expect_close(const std::vector<float>& got, const std::vector<float>& want, float tol, const std::string& what) {
  REQUIRE(got.size() == want.size());
  size_t worst = 0;
  float worst_excess = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const float excess = std::fabs(got[i] - want[i]) - tol * (1 + std::fabs(want[i]));
    if (!(excess <= worst_excess)) {  // NaN counts
      worst_excess = std::isnan(excess) ? INFINITY : excess;
      worst = i;
    }
  }
  if (worst_excess > 0)
    fptest::report(__FILE__, __LINE__, what + ": element " + std::to_string(worst) + " is " +
                                           std::to_string(got[worst]) + ", want " + std::to_string(want[worst]));
}

// Tolerance of results computed from the backend's compute dtype (bf16 inputs: 8 bits).
float tolerance(const Backend& be) { return be.capabilities().compute_dtype == "bfloat16" ? 3e-2f : 2e-4f; }
// Tolerance of an elementwise op's result: its rounding to the backend's activation width.
float elementwise_tolerance(const Backend& be) { return be.capabilities().activation_bytes == 2 ? 1e-2f : 1e-5f; }

// A host weight matrix [N, K] (values bf16-representable when bf16), scaled to keep outputs O(1).
struct HostMatrix {
  std::vector<float> f32;
  std::vector<uint16_t> b16;
  backends::Matrix m;
};
HostMatrix host_matrix(int64_t N, int64_t K, bool bf16, std::mt19937& rng) {
  HostMatrix h{randn(N * K, rng, 1.f / std::sqrt(float(K))), {}, {}};
  if (bf16) {
    h.b16.resize(h.f32.size());
    for (size_t i = 0; i < h.f32.size(); ++i) h.b16[i] = cpu::bf16_round(h.f32[i]);
  }
  h.m = {bf16 ? static_cast<const void*>(h.b16.data()) : h.f32.data(), bf16, N, K, false};
  return h;
}

}  // namespace

TEST(backend_ops_embed_norm_gather) {
  std::mt19937 rng(11);
  for (Subject& s : subjects()) {
    const int64_t V = 50, H = 96, T = 9;
    HostMatrix table = host_matrix(V, H, s.bf16, rng);
    const std::vector<int32_t> ids = {3, 0, 49, 7, 7, 21, 1, 30, 44};
    const std::vector<float> w = randn(H, rng), res0 = randn(T * H, rng);
    std::vector<std::vector<float>> results[2];
    int side = 0;
    for (Backend* be : {s.backend.get(), s.reference.get()}) {
      DeviceBuffer keep;
      const backends::Matrix E = be->load_embedding(table.m, keep);
      DeviceBuffer d_ids = raw_in(*be, ids), x = acts_in(*be, std::vector<float>(T * H)), out = acts_in(*be, std::vector<float>(T * H));
      // Norm weights in the backend's layout, as the model loads them (bf16 on the GPU).
      DeviceBuffer res = acts_in(*be, res0), keep_w, g = acts_in(*be, std::vector<float>(3 * H));
      const void* wd = be->load_vector(w, keep_w);
      be->embed(x.data, E, static_cast<const int32_t*>(d_ids.data), T);
      auto& r = results[side++];
      r.push_back(acts_out(*be, x.data, T * H));
      be->rms_norm(out.data, x.data, res.data, wd, T, H, 1e-5f);
      r.push_back(acts_out(*be, out.data, T * H));
      r.push_back(acts_out(*be, res.data, T * H));
      const std::vector<int32_t> rows = {8, 0, 4};
      DeviceBuffer d_rows = raw_in(*be, rows);
      be->gather_rows(g.data, out.data, static_cast<const int32_t*>(d_rows.data), 3, H);
      r.push_back(acts_out(*be, g.data, 3 * H));
      be->finish_step();
    }
    const char* names[] = {"embed", "rms_norm", "rms_norm residual", "gather_rows"};
    for (size_t i = 0; i < results[0].size(); ++i)
      expect_close(results[0][i], results[1][i], elementwise_tolerance(*s.backend), s.name + " " + names[i]);
    // The reference's gathers against plain indexing.
    std::vector<float> rows_want, emb_want;
    for (int32_t id : ids)
      for (int64_t i = 0; i < H; ++i) emb_want.push_back(s.bf16 ? bf16_value(table.f32[size_t(id * H + i)]) : table.f32[size_t(id * H + i)]);
    for (int32_t row : {8, 0, 4})
      for (int64_t i = 0; i < H; ++i) rows_want.push_back(results[1][1][size_t(row * H + i)]);
    expect_close(results[1][0], emb_want, 0.f, s.name + " reference embed against the table");
    expect_close(results[1][3], rows_want, 0.f, s.name + " reference gather_rows against plain indexing");
  }
}

TEST(backend_ops_linears_and_their_inputs) {
  std::mt19937 rng(12);
  for (Subject& s : subjects()) {
    const int64_t K = 96, N1 = 48, N2 = 24, I = 64;  // 16-byte rows: what GPU GEMMs need
    for (int64_t M : {1, 5, 17, 40, 345}) {  // 345: the inputs made and rounded in parallel, a tile at a time
      HostMatrix w1 = host_matrix(N1, K, s.bf16, rng), w2 = host_matrix(N2, K, s.bf16, rng);
      HostMatrix wd = host_matrix(N2, I, s.bf16, rng), head = host_matrix(N1, K, s.bf16, rng);
      const std::vector<float> x0 = randn(M * K, rng), nw = randn(K, rng), bias = randn(N2, rng);
      const std::vector<float> gu = randn(M * 2 * I, rng);
      std::vector<std::vector<float>> results[2];
      int side = 0;
      for (Backend* be : {s.backend.get(), s.reference.get()}) {
        be->reserve(M, std::max(K, I));
        DeviceBuffer k1, k2, kd, kh, kb;
        const backends::Matrix p1 = be->load_linear(w1.m, k1), p2 = be->load_linear(w2.m, k2);
        const backends::Matrix pd = be->load_linear(wd.m, kd), ph = be->load_linear(head.m, kh);
        const void* b = be->load_vector(bias, kb);
        DeviceBuffer x = acts_in(*be, x0), normed = acts_in(*be, std::vector<float>(M * K)), keep_nw;
        const void* nwd = be->load_vector(nw, keep_nw);
        // Both outputs into one wider buffer (ldy N1 + N2), the way QKV share a pass.
        DeviceBuffer y = acts_in(*be, std::vector<float>(M * (N1 + N2))), g = acts_in(*be, gu);
        DeviceBuffer act = acts_in(*be, std::vector<float>(M * I)), yd = acts_in(*be, std::vector<float>(M * N2));
        DeviceBuffer logits = be->allocate(size_t(M * N1) * 4);
        const int64_t e = be->capabilities().activation_bytes;
        auto& r = results[side++];
        const backends::LinearInput in =
            be->rms_norm_input(normed.data, x.data, nullptr, nwd, M, K, 1e-5f);
        const backends::LinearJob jobs[] = {{y.data, N1 + N2, &p1, nullptr},
                                            {static_cast<char*>(y.data) + N1 * e, N1 + N2, &p2, b}};
        be->linears(in, jobs);
        r.push_back(acts_out(*be, y.data, M * (N1 + N2)));
        const backends::LinearJob down[] = {{yd.data, N2, &pd, nullptr}};
        be->linears(be->silu_and_mul_input(act.data, g.data, M, I), down);
        r.push_back(acts_out(*be, act.data, M * I));
        r.push_back(acts_out(*be, yd.data, M * N2));
        be->logits(static_cast<float*>(logits.data), be->linear_input(x.data, M, K), ph);
        r.push_back(raw_out<float>(*be, logits.data, size_t(M * N1)));
        be->finish_step();
      }
      const char* names[] = {"rms_norm_input + linears (two jobs, bias)", "silu_and_mul_input",
                             "linears after silu_and_mul_input", "logits"};
      for (size_t i = 0; i < results[0].size(); ++i)
        expect_close(results[0][i], results[1][i], i == 1 ? elementwise_tolerance(*s.backend) : tolerance(*s.backend),
                     s.name + " " + names[i] + " M=" + std::to_string(M));
    }
  }
}

TEST(backend_ops_rotary_kv_blocks_attention) {
  // A backend keeps its KV cache in its own layout (the amx level tiles bf16 blocks), so the
  // cache is only written through write_kv and copy_blocks and read through paged_attention.
  std::mt19937 rng(13);
  for (Subject& s : subjects()) {
    const int64_t nq = 8, nkv = 2, D = 64, bs = 16, num_blocks = 24, max_pos = 256;
    // Three sequences: a decode at context 37, a chunk of 20 after 10 computed, a 70-token
    // prompt (more than one 64-row piece of a KV head's rows).
    const std::vector<int32_t> qsl = {0, 1, 21, 91}, ctx = {37, 30, 70};
    const int64_t S = 3, T = qsl.back(), W = 5;
    std::vector<int32_t> blocks(num_blocks);
    std::iota(blocks.begin(), blocks.end(), 0);
    std::shuffle(blocks.begin(), blocks.end(), rng);
    std::vector<int32_t> table(S * W);
    for (int64_t i = 0; i < S * W; ++i) table[size_t(i)] = blocks[size_t(i)];
    // The history (positions before each sequence's query rows) goes in first; the chunked
    // sequence's first block is written to a spare block and copied into place (copy-on-write).
    const int32_t spare = blocks[23];
    const std::vector<BlockCopy> copies = {{spare, table[size_t(W)]}};
    std::vector<int32_t> positions, slots, hist_slots;
    // Where each sequence's K/V at each position come from: (true, history row) or (false, step row).
    std::vector<std::vector<std::pair<bool, int64_t>>> source(S);
    for (int64_t sq = 0; sq < S; ++sq) {
      const int32_t q_len = qsl[sq + 1] - qsl[sq];
      for (int32_t pos = 0; pos < ctx[sq]; ++pos) {
        int32_t block = table[size_t(sq * W + pos / bs)];
        if (pos < ctx[sq] - q_len) {
          if (sq == 1 && pos < bs) block = spare;
          source[sq].push_back({true, int64_t(hist_slots.size())});
          hist_slots.push_back(block * int32_t(bs) + pos % int32_t(bs));
        } else {
          source[sq].push_back({false, int64_t(slots.size())});
          positions.push_back(pos);
          slots.push_back(block * int32_t(bs) + pos % int32_t(bs));
        }
      }
    }
    std::vector<int32_t> pad_slots = slots;
    pad_slots.push_back(-1);  // a padded slot is skipped
    std::vector<float> cos_sin(size_t(max_pos * D));
    for (int64_t p = 0; p < max_pos; ++p)
      for (int64_t i = 0; i < D / 2; ++i) {
        const double a = double(p) * std::pow(10000.0, -2.0 * double(i) / double(D));
        cos_sin[size_t(p * D + i)] = float(std::cos(a));
        cos_sin[size_t(p * D + D / 2 + i)] = float(std::sin(a));
      }
    const int64_t Th = int64_t(hist_slots.size());
    const std::vector<float> hk = randn(Th * nkv * D, rng), hv = randn(Th * nkv * D, rng);
    const std::vector<float> q0 = randn(T * nq * D, rng), k0 = randn((T + 1) * nkv * D, rng);
    const std::vector<float> v0 = randn((T + 1) * nkv * D, rng);
    std::vector<std::vector<float>> results[2];
    int side = 0;
    for (Backend* be : {s.backend.get(), s.reference.get()}) {
      const int64_t cache_elems = num_blocks * nkv * bs * D;
      const size_t kvb = size_t(be->capabilities().kv_bytes), block_bytes = size_t(nkv * bs * D) * kvb;
      DeviceBuffer kv = be->allocate_kv_cache(2, size_t(cache_elems) * kvb, block_bytes);
      void* kc = kv.data;
      void* vc = static_cast<char*>(kv.data) + size_t(cache_elems) * kvb;
      DeviceBuffer q = acts_in(*be, q0), k = acts_in(*be, k0), v = acts_in(*be, v0);
      DeviceBuffer dhk = acts_in(*be, hk), dhv = acts_in(*be, hv), out = acts_in(*be, std::vector<float>(T * nq * D));
      DeviceBuffer d_pos = raw_in(*be, positions), d_slots = raw_in(*be, pad_slots), d_hist = raw_in(*be, hist_slots);
      DeviceBuffer d_cs = raw_in(*be, cos_sin), d_table = raw_in(*be, table), d_qsl = raw_in(*be, qsl);
      DeviceBuffer d_ctx = raw_in(*be, ctx);
      auto& r = results[side++];
      be->write_kv(dhk.data, dhv.data, kc, vc, static_cast<const int32_t*>(d_hist.data), Th, nkv, D, bs);
      void* const caches[] = {kc, vc};
      be->copy_blocks(caches, block_bytes, copies);
      be->rotary(q.data, k.data, static_cast<const int32_t*>(d_pos.data), static_cast<const float*>(d_cs.data), T, nq,
                 nkv, D);
      r.push_back(acts_out(*be, q.data, T * nq * D));
      r.push_back(acts_out(*be, k.data, T * nkv * D));
      be->write_kv(k.data, v.data, kc, vc, static_cast<const int32_t*>(d_slots.data), T + 1, nkv, D, bs);
      backends::AttentionStep st;
      st.block_tables = static_cast<const int32_t*>(d_table.data);
      st.block_table_stride = W;
      st.query_start_loc = static_cast<const int32_t*>(d_qsl.data);
      st.context_lens = static_cast<const int32_t*>(d_ctx.data);
      st.host_query_start_loc = qsl;
      st.host_context_lens = ctx;
      st.num_seqs = S;
      st.num_tokens = T;
      st.max_query_len = 70;
      st.max_context_len = 70;
      be->plan_attention(st, {nq, nkv, D, bs, float(1.0 / std::sqrt(double(D)))});
      be->paged_attention(out.data, q.data, kc, vc);
      r.push_back(acts_out(*be, out.data, T * nq * D));
      be->finish_step();
    }
    const char* names[] = {"rotary q", "rotary k", "write_kv + copy_blocks + paged_attention"};
    // A bf16 cache rounds each backend's own rotary output: a last-bit difference there (allowed
    // above) can round a key to the neighbouring bf16 value, 2^-8 relative, which moves the
    // output by about that (seen on an AVX-512 CPU under the sanitizer build's -O1).
    const float attention_tol = s.backend->capabilities().kv_bytes == 2 ? std::max(tolerance(*s.backend), 4e-3f)
                                                                       : tolerance(*s.backend);
    for (size_t i = 0; i < results[0].size(); ++i)
      expect_close(results[0][i], results[1][i], i == 2 ? attention_tol : elementwise_tolerance(*s.backend),
                   s.name + " " + names[i]);
    // The reference itself against plain attention over the K/V as given (rounded to the
    // cache's bf16), which checks the cache plumbing shared by every CPU level.
    const std::vector<float>&rq = results[1][0], &rk = results[1][1];
    auto kv_value = [&](float x) { return s.bf16 ? bf16_value(x) : x; };
    std::vector<float> want(size_t(T * nq * D));
    for (int64_t sq = 0; sq < S; ++sq) {
      const int64_t q_len = qsl[sq + 1] - qsl[sq];
      for (int64_t j = 0; j < q_len; ++j)
        for (int64_t h = 0; h < nq; ++h) {
          const int64_t pos = ctx[sq] - q_len + j, kvh = h / (nq / nkv);
          const float* qr = rq.data() + ((qsl[sq] + j) * nq + h) * D;
          std::vector<double> score(size_t(pos + 1));
          double mx = -1e300, sum = 0;
          for (int64_t p = 0; p <= pos; ++p) {
            const auto [hist, row] = source[size_t(sq)][size_t(p)];
            const float* kr = (hist ? hk.data() : rk.data()) + (row * nkv + kvh) * D;
            double d = 0;
            for (int64_t c = 0; c < D; ++c) d += double(qr[c]) * double(kv_value(kr[c]));
            score[size_t(p)] = d / std::sqrt(double(D));
            mx = std::max(mx, score[size_t(p)]);
          }
          for (double& x : score) sum += (x = std::exp(x - mx));
          for (int64_t c = 0; c < D; ++c) {
            double o = 0;
            for (int64_t p = 0; p <= pos; ++p) {
              const auto [hist, row] = source[size_t(sq)][size_t(p)];
              o += score[size_t(p)] * double(kv_value((hist ? hv.data() : v0.data())[(row * nkv + kvh) * D + c]));
            }
            want[size_t(((qsl[sq] + j) * nq + h) * D + c)] = float(o / sum);
          }
        }
    }
    expect_close(results[1][2], want, 1e-4f, s.name + " reference paged_attention against plain attention");
  }
}

// Where a backend has graphs: a captured norm + Linears + logits sequence, replayed on new inputs
// written into the same buffers, gives what running it eagerly on those inputs gives.
TEST(backend_graphs_replay_what_they_captured) {
  std::mt19937 rng(14);
  for (Subject& s : subjects()) {
    Backend& be = *s.backend;
    if (!be.capabilities().graphs) continue;
    const int64_t M = 8, K = 96, N = 48;
    HostMatrix w = host_matrix(N, K, s.bf16, rng), head = host_matrix(N, K, s.bf16, rng);
    be.reserve(M, K);
    DeviceBuffer kw, kh, knw;
    const backends::Matrix pw = be.load_linear(w.m, kw), ph = be.load_linear(head.m, kh);
    const void* nw = be.load_vector(randn(K, rng), knw);
    DeviceBuffer x = acts_in(be, randn(M * K, rng)), normed = acts_in(be, std::vector<float>(M * K));
    DeviceBuffer y = acts_in(be, std::vector<float>(M * N)), logits = be.allocate(size_t(M * N) * 4);
    auto run = [&] {
      const backends::LinearJob job[] = {{y.data, N, &pw, nullptr}};
      be.linears(be.rms_norm_input(normed.data, x.data, nullptr, nw, M, K, 1e-5f), job);
      be.logits(static_cast<float*>(logits.data), be.linear_input(y.data, M, N), ph);
    };
    run();  // eagerly first: what a capture cannot allocate
    be.finish_step();
    be.begin_capture();
    run();
    const std::shared_ptr<void> graph = be.end_capture();
    for (int round = 0; round < 2; ++round) {
      write_acts(be, x.data, randn(M * K, rng));
      be.replay(graph.get());
      be.finish_step();
      const std::vector<float> replayed = raw_out<float>(be, logits.data, size_t(M * N));
      run();
      be.finish_step();
      expect_close(replayed, raw_out<float>(be, logits.data, size_t(M * N)), 0.f,
                   s.name + " graph replay, round " + std::to_string(round));
    }
  }
}

TEST(backend_capabilities_are_consistent) {
  for (Subject& s : subjects()) {
    const backends::Capabilities& c = s.backend->capabilities();
    if (c.device == backends::DeviceType::kCuda) {
      CHECK(c.activation_bytes == 2 && c.kv_bytes == 2 && c.compute_dtype == "bfloat16");
      continue;
    }
    CHECK(c.batch_invariant);  // every CPU level: fixed reduction order per row
    CHECK(c.device == backends::DeviceType::kCpu);
    CHECK_EQ(c.kv_bytes, s.bf16 ? int64_t(2) : int64_t(4));
    CHECK(c.compute_dtype == "float32" || (s.bf16 && c.compute_dtype == "bfloat16"));
  }
}
