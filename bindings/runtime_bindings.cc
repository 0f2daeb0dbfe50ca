#include <pybind11/stl.h>

#include <cstring>

#include "bindings.h"
#include "kernels/cpu/kernels.h"
#include "runtime/aligned.h"
#include "runtime/cpu_features.h"
#include "runtime/cuda_loader.h"
#include "engine/kv_cache_plan.h"
#include "runtime/memory.h"
#include "runtime/thread_pool.h"

namespace py = pybind11;

namespace flashpage::bindings {

namespace {

// The kernel table of an ISA level by name; "ref" is the scalar level (the references).
const cpu::KernelTable& table_for(const std::string& isa) {
  return cpu::kernels_for(isa == "ref" ? runtime::Isa::kScalar : runtime::parse_isa(isa));
}

// rms_norm through the kernel table of `isa` ("ref" = the scalar reference). Returns
// (out, residual_after) — residual is copied, not changed in place.
py::tuple rms_norm(const std::string& isa, FloatArray x, py::object residual, FloatArray weight,
                   float eps) {
  if (x.ndim() != 2) throw std::invalid_argument("rms_norm: x must be 2-D [rows, dim]");
  const int64_t rows = x.shape(0), dim = x.shape(1);
  if (weight.ndim() != 1 || weight.shape(0) != dim)
    throw std::invalid_argument("rms_norm: weight must have shape [" + std::to_string(dim) + "]");
  const auto& table = table_for(isa);
  FloatArray out({rows, dim});
  py::object res_out = py::none();
  float* res_ptr = nullptr;
  if (!residual.is_none()) {
    FloatArray r = FloatArray::ensure(residual);
    if (!r || r.ndim() != 2 || r.shape(0) != rows || r.shape(1) != dim)
      throw std::invalid_argument("rms_norm: residual must have the shape of x");
    FloatArray copy({rows, dim});
    std::copy(r.data(), r.data() + rows * dim, copy.mutable_data());
    res_ptr = copy.mutable_data();
    res_out = copy;
  }
  table.rms_norm(out.mutable_data(), x.data(), res_ptr, weight.data(), rows, dim, eps);
  return py::make_tuple(out, res_out);
}

float bf16_value(uint16_t bits) {
  const uint32_t wide = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &wide, 4);
  return f;
}

// Paged attention with the kernels of one ISA level (or "ref"). k_cache/v_cache: float32, or
// uint16 holding bf16 bits; [num_blocks, num_kv_heads, block_size, head_dim].
FloatArray paged_attention(const std::string& isa, FloatArray q, py::array k_cache,
                           py::array v_cache, IntArray block_tables, IntArray query_start_loc,
                           IntArray context_lens, float scale, std::vector<int64_t> row_splits) {
  if (q.ndim() != 3) throw std::invalid_argument("paged_attention: q must be [tokens, heads, head_dim]");
  if (k_cache.ndim() != 4 || v_cache.ndim() != 4)
    throw std::invalid_argument("paged_attention: caches must be [blocks, kv_heads, block_size, head_dim]");
  const bool bf16 = k_cache.dtype().is(py::dtype("uint16"));
  if (!bf16 && !k_cache.dtype().is(py::dtype("float32")))
    throw std::invalid_argument("paged_attention: caches must be float32 or uint16 (bf16 bits)");
  if (!k_cache.dtype().is(v_cache.dtype()) || !(k_cache.flags() & py::array::c_style) ||
      !(v_cache.flags() & py::array::c_style))
    throw std::invalid_argument("paged_attention: k_cache and v_cache must be contiguous, same dtype");
  if (block_tables.ndim() != 2 || query_start_loc.shape(0) != context_lens.shape(0) + 1)
    throw std::invalid_argument("paged_attention: block_tables must be 2-D and query_start_loc one longer than context_lens");
  if (q.shape(2) != k_cache.shape(3) || q.shape(1) % k_cache.shape(1) != 0)
    throw std::invalid_argument("paged_attention: q [tokens, heads, head_dim] does not fit the caches "
                                "(head_dim must match, heads a multiple of kv_heads)");
  const auto& table = table_for(isa);
  // A level may keep its own cache layout (amx: tiles): the standard-layout caches given here go
  // through that level's own writer first, every slot in order.
  const int64_t blocks = k_cache.shape(0), nkv = k_cache.shape(1), bs = k_cache.shape(2), D = k_cache.shape(3);
  std::vector<float> keys(size_t(blocks * bs * nkv * D)), values(keys.size());
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t h = 0; h < nkv; ++h)
      for (int64_t p = 0; p < bs; ++p)
        for (int64_t d = 0; d < D; ++d) {
          const int64_t src = ((b * nkv + h) * bs + p) * D + d, dst = ((b * bs + p) * nkv + h) * D + d;
          keys[size_t(dst)] = bf16 ? bf16_value(static_cast<const uint16_t*>(k_cache.data())[src])
                                   : static_cast<const float*>(k_cache.data())[src];
          values[size_t(dst)] = bf16 ? bf16_value(static_cast<const uint16_t*>(v_cache.data())[src])
                                     : static_cast<const float*>(v_cache.data())[src];
        }
  std::vector<int32_t> slots(size_t(blocks * bs));
  for (size_t i = 0; i < slots.size(); ++i) slots[i] = int32_t(i);
  const size_t cache_bytes = size_t(k_cache.nbytes());
  runtime::AlignedVector<char> kc(cache_bytes), vc(cache_bytes);
  table.write_kv_cache(keys.data(), values.data(), kc.data(), vc.data(), bf16, slots.data(), blocks * bs, nkv, D, bs);
  FloatArray out({q.shape(0), q.shape(1), q.shape(2)});
  cpu::PagedAttentionArgs a{out.mutable_data(), q.data(), kc.data(), vc.data(), bf16,
                            block_tables.data(), block_tables.shape(1), query_start_loc.data(),
                            context_lens.data(), q.shape(1), k_cache.shape(1), q.shape(2),
                            k_cache.shape(2), scale};
  if (row_splits.empty()) {
    table.paged_attention(a, 0, context_lens.shape(0));
    return out;
  }
  // Each sequence and KV head computed in pieces of rows cut at row_splits (as threads do).
  const int64_t group = q.shape(1) / nkv;
  for (int64_t s = 0; s < context_lens.shape(0); ++s)
    for (int64_t h = 0; h < nkv; ++h) {
      const int64_t rows = (query_start_loc.data()[s + 1] - query_start_loc.data()[s]) * group;
      int64_t begin = 0;
      for (size_t i = 0; i <= row_splits.size(); ++i) {
        const int64_t end = i < row_splits.size() ? std::min(rows, row_splits[i]) : rows;
        if (end <= begin) continue;
        cpu::PagedAttentionArgs ai = a;
        ai.kv_head_begin = h;
        ai.kv_head_end = h + 1;
        ai.row_begin = begin;
        ai.row_end = end;
        table.paged_attention(ai, s, s + 1);
        begin = end;
      }
    }
  return out;
}

// x [M, K] . w[N, K]^T (+ bias) with one ISA level's kernel (or "ref"), split over the global
// thread pool's threads by panels of output columns when parallel; w is packed with the
// level's pack_linear first, as the model does at load. With
// `out` ([M, >= col_offset + N] float32, C-contiguous) the result goes into its columns
// [col_offset, col_offset + N) and the rest is left alone, exercising the kernels' y row stride.
FloatArray linear(const std::string& isa, FloatArray x, py::array w, py::object bias, bool parallel,
                  py::object out, int64_t col_offset) {
  if (x.ndim() != 2 || w.ndim() != 2 || w.shape(1) != x.shape(1))
    throw std::invalid_argument("linear: x must be [M, K] and w [N, K] with the same K");
  const bool bf16 = w.dtype().is(py::dtype("uint16"));
  if ((!bf16 && !w.dtype().is(py::dtype("float32"))) || !(w.flags() & py::array::c_style))
    throw std::invalid_argument("linear: w must be contiguous float32 or uint16 (bf16 bits)");
  const int64_t M = x.shape(0), K = x.shape(1), N = w.shape(0);
  FloatArray b;
  if (!bias.is_none()) {
    b = FloatArray::ensure(bias);
    if (!b || b.ndim() != 1 || b.shape(0) != N) throw std::invalid_argument("linear: bias must be [N]");
  }
  FloatArray y;
  if (out.is_none()) {
    if (col_offset != 0) throw std::invalid_argument("linear: col_offset needs out");
    y = FloatArray({M, N});
  } else {
    // A float32, C-contiguous, writable array is used as is, not copied.
    if (!py::isinstance<FloatArray>(out)) throw std::invalid_argument("linear: out must be a C-contiguous float32 array");
    y = py::reinterpret_borrow<FloatArray>(out);
    if (y.ndim() != 2 || y.shape(0) != M || col_offset < 0 || y.shape(1) < col_offset + N || !y.writeable())
      throw std::invalid_argument("linear: out must be writable [M, >= col_offset + N]");
  }
  const auto& table = table_for(isa);
  float* yp = y.mutable_data() + col_offset;
  const int64_t ldy = y.shape(1);
  const float* xp = x.data();
  const float* bp = bias.is_none() ? nullptr : b.data();
  py::gil_scoped_release release;
  const cpu::PackedLinear packed = cpu::pack_linear_weight(table, w.data(), bf16, N, K);
  runtime::AlignedVector<uint16_t> buf;
  cpu::run_linear(table, packed, yp, ldy, cpu::linear_input_for(table, bf16, xp, M, K, buf), bp, M, parallel);
  return y;
}

// The MLP's gate and up Linears and SiLU.mul as down's bf16 input, with one level's fused
// kernel where it has one for these shapes (w packed first, x rounded as the model does):
// (bf16 bits [M, inter], fused). Where it has none, nothing is computed: (None, False).
py::tuple gate_up_silu(const std::string& isa, FloatArray x, py::array_t<uint16_t, py::array::c_style> gate,
                       py::array_t<uint16_t, py::array::c_style> up) {
  if (x.ndim() != 2 || gate.ndim() != 2 || up.ndim() != 2 || gate.shape(1) != x.shape(1) ||
      up.shape(0) != gate.shape(0) || up.shape(1) != gate.shape(1))
    throw std::invalid_argument("gate_up_silu: x [M, K], gate and up [inter, K] bf16 bits");
  const auto& table = table_for(isa);
  const int64_t M = x.shape(0), K = x.shape(1), I = gate.shape(0);
  if (!cpu::takes_bf16_input(table, true) || !table.gate_up_silu(nullptr, nullptr, nullptr, nullptr, M, K, I, 0, 0))
    return py::make_tuple(py::none(), false);
  py::array_t<uint16_t> out({M, I});
  {
    py::gil_scoped_release release;
    const cpu::PackedLinear g = cpu::pack_linear_weight(table, gate.data(), true, I, K);
    const cpu::PackedLinear u = cpu::pack_linear_weight(table, up.data(), true, I, K);
    runtime::AlignedVector<uint16_t> in, tiled(size_t(cpu::bf16_input_elems(M, I)));
    const void* xin = cpu::linear_input_for(table, true, x.data(), M, K, in);
    runtime::ThreadPool::global().parallel_for(cpu::linear_panels(table.linear_panel(), I), [&](int64_t b, int64_t e) {
      table.gate_up_silu(tiled.data(), xin, g.data.data(), u.data.data(), M, K, I, b, e);
    });
    uint16_t* o = out.mutable_data();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < I; ++i) o[m * I + i] = tiled[size_t(cpu::bf16_input_index(m, i, I))];
  }
  return py::make_tuple(out, true);
}

}  // namespace

void bind_runtime(py::module_& m) {
  m.def("cpu_isa", [] { return std::string(runtime::isa_name(runtime::active_isa())); },
        "The CPU ISA level the kernels run with (FLASHPAGE_ISA may lower it).");
  m.def("cpu_best_isa", [] { return std::string(runtime::isa_name(runtime::best_isa())); });
  m.def("cpu_features", [] {
    const runtime::CpuFeatures& f = runtime::cpu_features();
    py::dict d;
    d["avx2"] = f.avx2 && f.fma && f.f16c && f.os_avx;
    d["avx512"] = f.avx512f && f.avx512bw && f.avx512dq && f.avx512vl && f.os_avx512;
    d["avx512_bf16"] = f.avx512_bf16 && f.os_avx512;
    d["avx512_vnni"] = f.avx512_vnni && f.os_avx512;
    d["avx_vnni"] = f.avx_vnni && f.os_avx;
    d["amx_bf16"] = f.amx_bf16 && f.os_amx;
    d["amx_int8"] = f.amx_int8 && f.os_amx;
    if (!f.amx_denied.empty()) d["amx_unusable"] = f.amx_denied;
    d["vendor"] = f.vendor;
    return d;
  }, "What the CPU has and the OS lets this process use (CPUID, XCR0, Linux's AMX permission).");
  m.def("cpu_supported_isas", [] {
    std::vector<std::string> names;
    for (auto isa : runtime::supported_isas()) names.emplace_back(runtime::isa_name(isa));
    return names;
  });
  m.def("rms_norm", &rms_norm, py::arg("isa"), py::arg("x"), py::arg("residual") = py::none(),
        py::arg("weight"), py::arg("eps") = 1e-6f,
        "RMSNorm (+ fused residual add) with the kernels of one ISA level, or 'ref'.");

  m.def("paged_attention", &paged_attention, py::arg("isa"), py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_tables"), py::arg("query_start_loc"),
        py::arg("context_lens"), py::arg("scale"), py::arg("row_splits") = std::vector<int64_t>{},
        "CPU paged attention over a flattened batch with one ISA level's kernels, or 'ref'; with "
        "row_splits, each sequence's KV heads in pieces of rows (query position x group head) cut there.");

  m.def("linear", &linear, py::arg("isa"), py::arg("x"), py::arg("w"), py::arg("bias") = py::none(),
        py::arg("parallel") = true, py::kw_only(), py::arg("out") = py::none(), py::arg("col_offset") = 0,
        "x . w^T (+ bias) with the CPU kernels of one ISA level (w packed first, as at load); "
        "into out[:, col_offset:col_offset + N] if out is given.");
  m.def("gate_up_silu", &gate_up_silu, py::arg("isa"), py::arg("x"), py::arg("gate"), py::arg("up"),
        "down's bf16 input, silu(x . gate^T) * (x . up^T), by the level's fused kernel: (bits, True), or "
        "(None, False) where it has none for these shapes.");
  m.def("num_threads", [] { return runtime::ThreadPool::global().num_threads(); });
  m.def("silu_and_mul", [](const std::string& isa, FloatArray in) {
    if (in.ndim() != 2 || in.shape(1) % 2 != 0)
      throw std::invalid_argument("silu_and_mul: input must be [tokens, 2 * intermediate]");
    FloatArray out({in.shape(0), in.shape(1) / 2});
    table_for(isa).silu_and_mul(out.mutable_data(), in.data(), in.shape(0), in.shape(1) / 2);
    return out;
  }, py::arg("isa"), py::arg("x"));
  m.def("rotary", [](const std::string& isa, FloatArray x, IntArray positions, FloatArray cos_sin) {
    if (x.ndim() != 3 || positions.ndim() != 1 || positions.shape(0) != x.shape(0) ||
        cos_sin.ndim() != 2 || cos_sin.shape(1) != x.shape(2) || x.shape(2) % 2 != 0)
      throw std::invalid_argument("rotary: x [tokens, heads, head_dim], positions [tokens], cos_sin [positions, head_dim]");
    for (py::ssize_t t = 0; t < positions.shape(0); ++t)
      if (positions.data()[t] < 0 || positions.data()[t] >= cos_sin.shape(0))
        throw std::invalid_argument("rotary: position " + std::to_string(positions.data()[t]) +
                                    " outside the cos/sin table of " + std::to_string(cos_sin.shape(0)));
    FloatArray out({x.shape(0), x.shape(1), x.shape(2)});
    std::copy(x.data(), x.data() + x.size(), out.mutable_data());
    table_for(isa).rotary(out.mutable_data(), positions.data(), cos_sin.data(), x.shape(0), x.shape(1), x.shape(2));
    return out;
  }, py::arg("isa"), py::arg("x"), py::arg("positions"), py::arg("cos_sin"));
  m.def("write_kv_cache", [](const std::string& isa, FloatArray key, FloatArray value, py::array k_cache,
                             py::array v_cache, IntArray slot_mapping) {
    const bool bf16 = k_cache.dtype().is(py::dtype("uint16"));
    if (key.ndim() != 3 || k_cache.ndim() != 4 || !k_cache.dtype().is(v_cache.dtype()) ||
        (!bf16 && !k_cache.dtype().is(py::dtype("float32"))) || key.shape(2) != k_cache.shape(3) ||
        key.shape(1) != k_cache.shape(1) || slot_mapping.shape(0) != key.shape(0) ||
        !(k_cache.flags() & py::array::c_style) || !(v_cache.flags() & py::array::c_style) ||
        !k_cache.writeable() || !v_cache.writeable())
      throw std::invalid_argument("write_kv_cache: key/value [tokens, kv_heads, head_dim] and writable, "
                                  "contiguous float32 or uint16 caches [blocks, kv_heads, block_size, head_dim]");
    const int64_t capacity = k_cache.shape(0) * k_cache.shape(2);
    for (py::ssize_t t = 0; t < slot_mapping.shape(0); ++t)
      if (slot_mapping.data()[t] >= capacity)
        throw std::invalid_argument("write_kv_cache: slot " + std::to_string(slot_mapping.data()[t]) +
                                    " outside a cache of " + std::to_string(capacity) + " slots");
    table_for(isa).write_kv_cache(key.data(), value.data(), k_cache.mutable_data(), v_cache.mutable_data(),
                                  bf16, slot_mapping.data(), key.shape(0), key.shape(1), key.shape(2),
                                  k_cache.shape(2));
  }, py::arg("isa"), py::arg("key"), py::arg("value"), py::arg("k_cache"), py::arg("v_cache"),
     py::arg("slot_mapping"));

  m.def("plan_kv_cache",
        [](int64_t num_layers, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
           int64_t dtype_bytes, int64_t max_model_len, py::object budget_bytes,
           py::object memory_fraction) {
          int64_t budget;
          if (!budget_bytes.is_none()) budget = budget_bytes.cast<int64_t>();
          else if (!memory_fraction.is_none())
            budget = runtime::memory_budget_from_fraction(memory_fraction.cast<double>());
          else throw std::invalid_argument("plan_kv_cache: give budget_bytes or memory_fraction");
          const auto p = engine::plan_kv_cache(
              {num_layers, num_kv_heads, head_dim, block_size, dtype_bytes}, budget, max_model_len);
          py::dict d;
          d["bytes_per_token"] = p.bytes_per_token;
          d["bytes_per_block"] = p.bytes_per_block;
          d["num_blocks"] = p.num_blocks;
          d["budget_bytes"] = p.budget_bytes;
          d["seqs_at_max_len"] = p.seqs_at_max_len;
          d["report"] = p.report();
          return d;
        },
        py::arg("num_layers"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("block_size"),
        py::arg("dtype_bytes"), py::arg("max_model_len"), py::arg("budget_bytes") = py::none(),
        py::arg("memory_fraction") = py::none(),
        "Sizes the paged KV cache from a byte budget or a fraction of available memory.");

  m.def("cuda_info", [] {
    const auto& b = runtime::cuda_probe();
    py::dict d;
    d["available"] = b.available;
    d["driver_found"] = b.driver_found;
    d["library_path"] = b.library_path;
    d["reason"] = b.reason;
    d["device_count"] = b.device_count;
    d["devices"] = b.device_names;
    return d;
  }, "Whether the CUDA backend is loaded, and why not.");
  m.def("cuda_axpy", [](float a, std::vector<float> x, std::vector<float> y) {
    runtime::cuda_axpy(a, x, y);
    return y;
  }, py::arg("a"), py::arg("x"), py::arg("y"), "a * x + y computed on the GPU (a self-test).");
}

}  // namespace flashpage::bindings
