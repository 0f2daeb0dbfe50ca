#include "model/weights.h"

#include <cmath>
#include <cstring>
#include <stdexcept>

#include "kernels/cpu/kernels.h"
#include "model/gguf.h"
#include "runtime/half.h"
#include "runtime/thread_pool.h"

namespace flashpage::model {
namespace {

using runtime::bf16_to_f32;
using runtime::f16_to_f32;

// fp8 e4m3 (finite only: 0x7F / 0xFF are NaN) to fp32, exactly.
float fp8_e4m3_to_f32(uint8_t v) {
  const int sign = v >> 7, exp = (v >> 3) & 0xF, man = v & 7;
  if (exp == 0xF && man == 7) return std::nanf("");
  const float mag = exp == 0 ? std::ldexp(float(man), -9) : std::ldexp(float(8 + man), exp - 10);
  return sign ? -mag : mag;
}

float element_as_f32(const TensorInfo& t, int64_t i) {
  switch (t.dtype) {
    case DType::kF32: return static_cast<const float*>(t.data)[i];
    case DType::kBF16: return bf16_to_f32(static_cast<const uint16_t*>(t.data)[i]);
    case DType::kF16: return f16_to_f32(static_cast<const uint16_t*>(t.data)[i]);
    default: return 0.f;  // rejected by check_float
  }
}

void check_float(const TensorInfo& t) {
  if (t.dtype != DType::kF32 && t.dtype != DType::kBF16 && t.dtype != DType::kF16)
    throw std::runtime_error(t.file + ": tensor \"" + t.name + "\" has dtype " + dtype_name(t.dtype) +
                             "; expected F32, F16 or BF16");
}

// The GGUF name of a Hugging Face tensor name (llama.cpp's naming), or "" for none.
std::string gguf_name(const std::string& hf) {
  static const std::pair<const char*, const char*> kTop[] = {
      {"model.embed_tokens.weight", "token_embd.weight"}, {"model.norm.weight", "output_norm.weight"},
      {"lm_head.weight", "output.weight"}};
  static const std::pair<const char*, const char*> kLayer[] = {
      {"input_layernorm", "attn_norm"}, {"post_attention_layernorm", "ffn_norm"}, {"self_attn.q_proj", "attn_q"},
      {"self_attn.k_proj", "attn_k"},   {"self_attn.v_proj", "attn_v"},          {"self_attn.o_proj", "attn_output"},
      {"self_attn.q_norm", "attn_q_norm"}, {"self_attn.k_norm", "attn_k_norm"},  {"mlp.gate_proj", "ffn_gate"},
      {"mlp.up_proj", "ffn_up"},        {"mlp.down_proj", "ffn_down"}};
  for (const auto& [h, g] : kTop)
    if (hf == h) return g;
  const std::string prefix = "model.layers.";
  if (hf.rfind(prefix, 0) != 0) return "";
  const size_t dot = hf.find('.', prefix.size());
  const std::string layer = hf.substr(prefix.size(), dot - prefix.size());
  const std::string rest = hf.substr(dot + 1), part = rest.substr(0, rest.rfind('.')), suffix = rest.substr(rest.rfind('.'));
  for (const auto& [h, g] : kLayer)
    if (part == h) return "blk." + layer + "." + g + suffix;
  return "";
}

// Collects tensors into the LlamaWeights, from safetensors (mapping in place or converting) or
// from GGUF (dequantized row by row).
class Loader {
 public:
  Loader(LlamaWeights& w, const WeightStore* store, const GgufFile* gguf, const ModelConfig& c, bool quantized)
      : w_(w), store_(store), gguf_(gguf), config_(c), quantized_(quantized) {}

  // Whether Linear weights may come as int8 (a quantized GGUF, loaded quantized).
  bool keeps_int8() const { return gguf_ && quantized_; }

  // A matrix; `linear`: one a Linear multiplies by (int8 allowed), not a table rows are
  // gathered from.
  Matrix matrix(const std::string& name, int64_t rows, int64_t cols, bool linear = true) {
    if (gguf_) return gguf_matrix(name, rows, cols, linear && quantized_);
    const std::string prefix = name.substr(0, name.size() - std::string(".weight").size());
    if (linear && !config_.quant.format.empty() && store_->contains(prefix + ".qweight"))
      return quantized_matrix(prefix, rows, cols);
    const TensorInfo& t = store_->get(name, {rows, cols});
    check_float(t);
    const bool bf16 = w_.storage == StorageType::kBF16;
    Matrix m{t.data, bf16, rows, cols};
    if ((bf16 && t.dtype == DType::kBF16) || (!bf16 && t.dtype == DType::kF32)) {
      w_.mapped_bytes += int64_t(t.nbytes);
      return m;
    }
    return owned(rows, cols, [&](int64_t r, float* row) {
      for (int64_t i = 0; i < cols; ++i) row[i] = element_as_f32(t, r * cols + i);
    });
  }

  std::vector<float> vector(const std::string& name, int64_t n) {
    std::vector<float> v(n);
    if (gguf_) {
      const GgufTensor& t = gguf_tensor(name, {n});
      dequantize(GgmlType(t.type), t.data, v.data(), n);
      return v;
    }
    const TensorInfo& t = store_->get(name, {n});
    check_float(t);
    for (int64_t i = 0; i < n; ++i) v[i] = element_as_f32(t, i);
    return v;
  }

 private:
  // A [rows, cols] matrix in the storage type, its rows made by row(r, fp32 out), in parallel.
  template <class Row>
  Matrix owned(int64_t rows, int64_t cols, Row&& row) {
    const bool bf16 = w_.storage == StorageType::kBF16;
    runtime::HostBuffer buf(size_t(rows * cols) * (bf16 ? 2 : 4));
    void* dst = buf.data();
    runtime::ThreadPool::global().parallel_for(rows, [&](int64_t b, int64_t e) {
      std::vector<float> tmp(static_cast<size_t>(cols));
      for (int64_t r = b; r < e; ++r) {
        row(r, tmp.data());
        for (int64_t i = 0; i < cols; ++i) {
          if (bf16) static_cast<uint16_t*>(dst)[r * cols + i] = cpu::bf16_round(tmp[size_t(i)]);
          else static_cast<float*>(dst)[r * cols + i] = tmp[size_t(i)];
        }
      }
    }, std::max<int64_t>(1, (int64_t(1) << 16) / cols));
    keep(std::move(buf));
    return {dst, bf16, rows, cols};
  }

  // The int8 blocks of a [rows, cols] Linear (Matrix::int8's layout: q, then the blocks' scales,
  // then their mins), owned by the weights, for the caller to fill.
  struct Int8Blocks {
    Matrix m;
    int8_t* qs;
    float *scales, *mins;
  };
  Int8Blocks int8_blocks(int64_t rows, int64_t cols, int bits) {
    const int64_t B = cols / 32;
    runtime::HostBuffer buf(size_t(rows * cols) + size_t(rows * B) * 8);
    auto* qs = static_cast<int8_t*>(buf.data());
    auto* scales = reinterpret_cast<float*>(qs + rows * cols);
    Matrix m{buf.data(), false, rows, cols};
    m.int8 = true;
    m.bits = bits;
    keep(std::move(buf));
    return {m, qs, scales, scales + rows * B};
  }

  void keep(runtime::HostBuffer buf) {
    w_.owned_bytes += int64_t(buf.size());
    w_.owned.push_back(std::move(buf));
  }

  // A Linear of flashpage's canonical quantized formats (python/flashpage/quantization.py) as
  // int8 / 4-bit blocks of 32, exactly: w8a8-int8's per-row scale on every block; w4a16's group
  // scale with min = -zero x scale (zero 8 when symmetric). fp8 is dequantized to the storage
  // type (the CPU has no fp8 arithmetic).
  Matrix quantized_matrix(const std::string& prefix, int64_t rows, int64_t cols) {
    const QuantConfig& q = config_.quant;
    const int64_t B = cols / 32;
    const TensorInfo& scales_t = store_->get(prefix + ".scales");
    auto scale_of = [&](int64_t i) { return element_as_f32(scales_t, i); };
    if (q.format == "fp8") {
      const TensorInfo& w = store_->get(prefix + ".qweight", {rows, cols});
      if (w.dtype != DType::kF8E4M3) throw std::runtime_error(w.file + ": " + w.name + " must be F8_E4M3");
      const bool per_row = scales_t.numel() == rows;
      return owned(rows, cols, [&](int64_t r, float* row) {
        const float s = scale_of(per_row ? r : 0);
        for (int64_t k = 0; k < cols; ++k) row[k] = fp8_e4m3_to_f32(static_cast<const uint8_t*>(w.data)[r * cols + k]) * s;
      });
    }
    if (cols % 32 != 0)
      throw std::runtime_error(prefix + ": K=" + std::to_string(cols) + " is not a multiple of 32 (the CPU's int8 blocks)");
    const Int8Blocks out = int8_blocks(rows, cols, q.format == "w4a16" ? 4 : 8);
    int8_t* qs = out.qs;
    float *scales = out.scales, *mins = out.mins;
    if (q.format == "w8a8-int8") {
      const TensorInfo& w = store_->get(prefix + ".qweight", {rows, cols});
      if (w.dtype != DType::kI8) throw std::runtime_error(w.file + ": " + w.name + " must be I8 in format w8a8-int8");
      if (scales_t.numel() != rows && scales_t.numel() != 1)
        throw std::runtime_error(scales_t.file + ": " + scales_t.name + " must hold one scale per row or one in all");
      std::memcpy(qs, w.data, size_t(rows * cols));
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t b = 0; b < B; ++b) {
          scales[r * B + b] = scale_of(scales_t.numel() == rows ? r : 0);
          mins[r * B + b] = 0.f;
        }
    } else {  // w4a16
      const int64_t gs = q.group_size == -1 ? cols : q.group_size, G = cols / gs;
      if (cols % gs != 0) throw std::runtime_error(prefix + ": K=" + std::to_string(cols) + " is not a multiple of group_size");
      const TensorInfo& w = store_->get(prefix + ".qweight", {rows, cols / 2});
      store_->get(prefix + ".scales", {rows, G});
      const TensorInfo* zeros = store_->contains(prefix + ".qzeros") ? &store_->get(prefix + ".qzeros", {rows, G}) : nullptr;
      if (!zeros && !q.symmetric) throw std::runtime_error(prefix + ".qzeros is missing from an asymmetric checkpoint");
      const auto* packed = static_cast<const uint8_t*>(w.data);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t k = 0; k < cols; ++k) qs[r * cols + k] = int8_t((packed[r * cols / 2 + k / 2] >> (4 * (k % 2))) & 0xF);
        for (int64_t b = 0; b < B; ++b) {
          const int64_t g = b * 32 / gs;
          const float s = scale_of(r * G + g);
          const float z = zeros ? float(static_cast<const uint8_t*>(zeros->data)[r * G + g]) : 8.f;
          scales[r * B + b] = s;
          mins[r * B + b] = -(z * s);
        }
      }
    }
    return out.m;
  }

  const GgufTensor& gguf_tensor(const std::string& hf, const std::vector<int64_t>& shape) {
    const std::string name = gguf_name(hf);
    const GgufTensor* t = name.empty() ? nullptr : gguf_->find_tensor(name);
    if (!t) throw std::runtime_error(gguf_->path() + ": tensor \"" + name + "\" (" + hf + ") is missing");
    const std::vector<int64_t> want(shape.rbegin(), shape.rend());  // GGUF lists the innermost first
    if (t->dims != want) {
      std::string got, need;
      for (int64_t d : t->dims) got += (got.empty() ? "" : ", ") + std::to_string(d);
      for (int64_t d : want) need += (need.empty() ? "" : ", ") + std::to_string(d);
      throw std::runtime_error(gguf_->path() + ": tensor \"" + name + "\" has dims [" + got + "], expected [" + need +
                               "]");
    }
    return *t;
  }

  Matrix gguf_matrix(const std::string& hf, int64_t rows, int64_t cols, bool int8) {
    const GgufTensor& t = gguf_tensor(hf, {rows, cols});
    int64_t block_values = 1, block_bytes = 1;
    ggml_type_layout(t.type, &block_values, &block_bytes);
    const size_t row_bytes = size_t(cols / block_values * block_bytes);
    const bool float_type = t.type == uint32_t(GgmlType::kF32) || t.type == uint32_t(GgmlType::kF16) ||
                            t.type == uint32_t(GgmlType::kBF16);
    int8 = int8 && !float_type && cols % 32 == 0;
    // llama.cpp's converter interleaves the two rotary halves of each head's q and k rows (for
    // llama / mistral): row 2i + j of a head in the file is row j * head_dim / 2 + i here.
    int64_t heads = 0;
    if (config_.model_type == "llama" || config_.model_type == "mistral") {
      if (hf.ends_with("self_attn.q_proj.weight")) heads = config_.num_attention_heads;
      if (hf.ends_with("self_attn.k_proj.weight")) heads = config_.num_key_value_heads;
    }
    const int64_t D = heads ? rows / heads : 1, half = D / 2;
    auto source_row = [&](int64_t r) {
      if (!heads) return r;
      const int64_t h = r / D, j = (r % D) / half, i = r % half;
      return h * D + 2 * i + j;
    };
    if (int8) return int8_matrix(t, rows, cols, row_bytes, source_row);
    return owned(rows, cols, [&](int64_t r, float* row) {
      dequantize(GgmlType(t.type), t.data + size_t(source_row(r)) * row_bytes, row, cols);
    });
  }

  // Int8 blocks of 32 (Matrix::int8): exact for the types of that form (gguf.h,
  // to_int8_blocks, which keeps 4- and 5-bit q unsigned), others (Q6_K) dequantized and
  // requantized per block as activations are.
  template <class SourceRow>
  Matrix int8_matrix(const GgufTensor& t, int64_t rows, int64_t cols, size_t row_bytes, SourceRow&& source_row) {
    const int64_t B = cols / 32;
    const GgmlType type = GgmlType(t.type);
    const int bits = int8_block_bits(type);
    const Int8Blocks out = int8_blocks(rows, cols, bits ? bits : 8);  // requantized: signed int8
    runtime::ThreadPool::global().parallel_for(rows, [&](int64_t b, int64_t e) {
      std::vector<float> tmp(static_cast<size_t>(cols));
      std::vector<int32_t> sums(static_cast<size_t>(B));
      for (int64_t r = b; r < e; ++r) {
        const uint8_t* src = t.data + size_t(source_row(r)) * row_bytes;
        if (to_int8_blocks(type, src, cols, out.qs + r * cols, out.scales + r * B, out.mins + r * B)) continue;
        dequantize(type, src, tmp.data(), cols);
        cpu::quantize_q8_rows(tmp.data(), 1, cols, out.qs + r * cols, out.scales + r * B, sums.data());
        std::fill(out.mins + r * B, out.mins + (r + 1) * B, 0.f);
      }
    }, std::max<int64_t>(1, (int64_t(1) << 16) / cols));
    return out.m;
  }

  LlamaWeights& w_;
  const WeightStore* store_;
  const GgufFile* gguf_;
  const ModelConfig& config_;
  bool quantized_ = false;
};

// A cheap counter-based generator: the value of element i depends only on (seed, i), so the
// parallel fill is reproducible whatever the thread count.
float hash_uniform(uint64_t seed, uint64_t i) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (i + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return float(z >> 40) * (1.0f / float(1 << 24)) * 2.f - 1.f;  // [-1, 1)
}

}  // namespace

const char* storage_name(StorageType s) { return s == StorageType::kBF16 ? "bfloat16" : "float32"; }

StorageType resolve_storage(const std::string& dtype, const ModelConfig& config, const WeightStore* store) {
  std::string d = dtype;
  if (d == "auto") {
    d = config.torch_dtype;
    if (d.empty() && store && store->contains("model.embed_tokens.weight")) {
      const DType t = store->get("model.embed_tokens.weight").dtype;
      d = t == DType::kBF16 ? "bfloat16" : "float32";
    }
    if (d.empty()) d = "bfloat16";
  }
  if (d == "bfloat16" || d == "bf16") return StorageType::kBF16;
  if (d == "float32" || d == "fp32" || d == "float" || d == "float16" || d == "half" || d == "fp16")
    return StorageType::kF32;
  throw std::invalid_argument("dtype \"" + dtype + "\" is not supported (auto, bfloat16, float32)");
}

namespace {

void load_tensors(const ModelConfig& c, LlamaWeights& w, Loader& ld) {
  const int64_t H = c.hidden_size, D = c.head_dim, nq = c.num_attention_heads * D;
  const int64_t nkv = c.num_key_value_heads * D, I = c.intermediate_size;
  w.embed = ld.matrix("model.embed_tokens.weight", c.vocab_size, H, /*linear=*/false);
  w.final_norm = ld.vector("model.norm.weight", H);
  // A tied head is the embedding table itself, unless the Linears run int8: then the head gets
  // its own int8 copy (the table stays float, for gathering rows).
  w.lm_head = !c.tie_word_embeddings ? ld.matrix("lm_head.weight", c.vocab_size, H)
              : ld.keeps_int8()      ? ld.matrix("model.embed_tokens.weight", c.vocab_size, H)
                                     : w.embed;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerWeights L;
    L.input_norm = ld.vector(p + "input_layernorm.weight", H);
    L.post_attention_norm = ld.vector(p + "post_attention_layernorm.weight", H);
    L.q = ld.matrix(p + "self_attn.q_proj.weight", nq, H);
    L.k = ld.matrix(p + "self_attn.k_proj.weight", nkv, H);
    L.v = ld.matrix(p + "self_attn.v_proj.weight", nkv, H);
    L.o = ld.matrix(p + "self_attn.o_proj.weight", H, nq);
    if (c.attention_bias) {
      L.q_bias = ld.vector(p + "self_attn.q_proj.bias", nq);
      L.k_bias = ld.vector(p + "self_attn.k_proj.bias", nkv);
      L.v_bias = ld.vector(p + "self_attn.v_proj.bias", nkv);
    }
    if (c.qk_norm) {
      L.q_norm = ld.vector(p + "self_attn.q_norm.weight", D);
      L.k_norm = ld.vector(p + "self_attn.k_norm.weight", D);
    }
    L.gate = ld.matrix(p + "mlp.gate_proj.weight", I, H);
    L.up = ld.matrix(p + "mlp.up_proj.weight", I, H);
    L.down = ld.matrix(p + "mlp.down_proj.weight", H, I);
    w.layers.push_back(std::move(L));
  }
}

}  // namespace

LlamaWeights load_llama_weights(const ModelConfig& c, std::shared_ptr<WeightStore> store, StorageType storage) {
  LlamaWeights w;
  w.storage = storage;
  w.store = std::move(store);
  Loader ld(w, w.store.get(), nullptr, c, false);
  load_tensors(c, w, ld);
  return w;
}

LlamaWeights load_llama_weights(const ModelConfig& c, std::shared_ptr<GgufFile> gguf, StorageType storage,
                                bool quantized) {
  LlamaWeights w;
  w.storage = storage;
  w.gguf = std::move(gguf);
  Loader ld(w, nullptr, w.gguf.get(), c, quantized);
  load_tensors(c, w, ld);
  return w;
}

LlamaWeights dummy_llama_weights(const ModelConfig& c, StorageType storage, uint64_t seed) {
  LlamaWeights w;
  w.storage = storage;
  const bool bf16 = storage == StorageType::kBF16;
  uint64_t stream = seed * 0x100000001B3ull;
  auto matrix = [&](int64_t rows, int64_t cols) {
    runtime::HostBuffer buf(size_t(rows * cols) * (bf16 ? 2 : 4));
    void* dst = buf.data();
    const float scale = 1.f / std::sqrt(float(cols));  // keeps activations O(1)
    const uint64_t s = ++stream * 0x9E3779B97F4A7C15ull;
    runtime::ThreadPool::global().parallel_for(rows * cols, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const float x = hash_uniform(s, uint64_t(i)) * scale;
        if (bf16) static_cast<uint16_t*>(dst)[i] = cpu::bf16_round(x);
        else static_cast<float*>(dst)[i] = x;
      }
    }, 1 << 16);
    w.owned_bytes += int64_t(buf.size());
    w.owned.push_back(std::move(buf));
    return Matrix{dst, bf16, rows, cols};
  };
  const int64_t H = c.hidden_size, D = c.head_dim, nq = c.num_attention_heads * D;
  const int64_t nkv = c.num_key_value_heads * D, I = c.intermediate_size;
  w.embed = matrix(c.vocab_size, H);
  w.lm_head = c.tie_word_embeddings ? w.embed : matrix(c.vocab_size, H);
  w.final_norm.assign(H, 1.f);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    LayerWeights L;
    L.input_norm.assign(H, 1.f);
    L.post_attention_norm.assign(H, 1.f);
    L.q = matrix(nq, H);
    L.k = matrix(nkv, H);
    L.v = matrix(nkv, H);
    L.o = matrix(H, nq);
    if (c.attention_bias) {
      L.q_bias.assign(nq, 0.f);
      L.k_bias.assign(nkv, 0.f);
      L.v_bias.assign(nkv, 0.f);
    }
    if (c.qk_norm) {
      L.q_norm.assign(D, 1.f);
      L.k_norm.assign(D, 1.f);
    }
    L.gate = matrix(I, H);
    L.up = matrix(I, H);
    L.down = matrix(H, I);
    w.layers.push_back(std::move(L));
  }
  return w;
}

}  // namespace flashpage::model
