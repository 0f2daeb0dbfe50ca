#include "model/weights.h"

#include <cmath>
#include <cstring>
#include <stdexcept>

#include "kernels/cpu/kernels.h"
#include "runtime/thread_pool.h"

namespace flashpage::model {
namespace {

float bf16_to_f32(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    uint32_t m = man;
    do {
      ++e;
      m <<= 1;
    } while ((m & 0x400) == 0);
    bits = sign | uint32_t(112 - e) << 23 | ((m & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
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

// Collects tensors into the LlamaWeights, mapping in place or converting.
class Loader {
 public:
  Loader(LlamaWeights& w, const WeightStore* store) : w_(w), store_(store) {}

  Matrix matrix(const std::string& name, int64_t rows, int64_t cols) {
    const TensorInfo& t = store_->get(name, {rows, cols});
    check_float(t);
    const bool bf16 = w_.storage == StorageType::kBF16;
    Matrix m{t.data, bf16, rows, cols};
    if ((bf16 && t.dtype == DType::kBF16) || (!bf16 && t.dtype == DType::kF32)) {
      w_.mapped_bytes += int64_t(t.nbytes);
      return m;
    }
    const int64_t n = rows * cols;
    runtime::HostBuffer buf(size_t(n) * (bf16 ? 2 : 4));
    void* dst = buf.data();
    runtime::ThreadPool::global().parallel_for(n, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const float x = element_as_f32(t, i);
        if (bf16) static_cast<uint16_t*>(dst)[i] = cpu::bf16_round(x);
        else static_cast<float*>(dst)[i] = x;
      }
    }, 1 << 16);
    m.data = dst;
    w_.owned_bytes += int64_t(buf.size());
    w_.owned.push_back(std::move(buf));
    return m;
  }

  std::vector<float> vector(const std::string& name, int64_t n) {
    const TensorInfo& t = store_->get(name, {n});
    check_float(t);
    std::vector<float> v(n);
    for (int64_t i = 0; i < n; ++i) v[i] = element_as_f32(t, i);
    return v;
  }

 private:
  LlamaWeights& w_;
  const WeightStore* store_;
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

LlamaWeights load_llama_weights(const ModelConfig& c, std::shared_ptr<WeightStore> store, StorageType storage) {
  LlamaWeights w;
  w.storage = storage;
  w.store = std::move(store);
  Loader ld(w, w.store.get());
  const int64_t H = c.hidden_size, D = c.head_dim, nq = c.num_attention_heads * D;
  const int64_t nkv = c.num_key_value_heads * D, I = c.intermediate_size;
  w.embed = ld.matrix("model.embed_tokens.weight", c.vocab_size, H);
  w.final_norm = ld.vector("model.norm.weight", H);
  w.lm_head = c.tie_word_embeddings ? w.embed : ld.matrix("lm_head.weight", c.vocab_size, H);
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
