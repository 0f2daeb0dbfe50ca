#include "model/config.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <numbers>
#include <stdexcept>

#include "model/gguf.h"
#include "model/json.h"
#include "model/safetensors.h"

namespace flashpage::model {
namespace {

[[noreturn]] void refuse(const std::string& source, const std::string& what) {
  throw std::runtime_error(source + ": " + what);
}

// Upper bounds on sizes: far above any real model (vocabularies of 256K, hidden sizes of 16K,
// 128 layers, head_dim 256, contexts of 10M tokens), low enough that every product the loader,
// the KV planner and the executor form (rows x cols, layers x heads x head_dim x bytes) fits in
// int64 and the int32 the core uses for positions and token ids.
constexpr int64_t kMaxWidth = int64_t(1) << 24;   // hidden, intermediate, vocab
constexpr int64_t kMaxCount = int64_t(1) << 16;   // layers, heads, head_dim
constexpr int64_t kMaxPositions = INT32_MAX;      // max_position_embeddings

// A positive integer field, at most `max`.
int64_t get_int(const Json& j, const std::string& key, const std::string& source, int64_t fallback,
                bool required, int64_t max) {
  const Json* v = j.find(key);
  if (v == nullptr || v->is_null()) {
    if (required) refuse(source, "missing required field \"" + key + "\"");
    return fallback;
  }
  const int64_t x = v->as_int(source + " field \"" + key + "\"");
  if (x <= 0) refuse(source, "field \"" + key + "\" must be positive, got " + std::to_string(x));
  if (x > max)
    refuse(source, "field \"" + key + "\" must be at most " + std::to_string(max) + ", got " + std::to_string(x));
  return x;
}

std::string num_str(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.17g", x);
  return buf;
}

// A finite number > 0 (rope_theta, rms_norm_eps, scaling factors): NaN, infinities, zero and
// negative values would silently turn the model's activations into NaN or garbage.
double get_positive(const Json& j, const std::string& key, const std::string& source, double fallback) {
  const Json* v = j.find(key);
  if (v == nullptr || v->is_null()) return fallback;
  const double x = v->as_number(source + " field \"" + key + "\"");
  if (!(std::isfinite(x) && x > 0))
    refuse(source, "field \"" + key + "\" must be a finite number > 0, got " + num_str(x));
  return x;
}

// A token id (bos/eos) of the model's vocabulary.
int64_t token_id(const Json& v, const std::string& key, const std::string& source, int64_t vocab_size) {
  const int64_t id = v.as_int(source + " field \"" + key + "\"");
  if (id < 0 || id >= vocab_size)
    refuse(source, "field \"" + key + "\" holds " + std::to_string(id) +
                       ", not a token id of the vocabulary (vocab_size " + std::to_string(vocab_size) + ")");
  return id;
}

bool get_bool(const Json& j, const std::string& key, const std::string& source, bool fallback) {
  const Json* v = j.find(key);
  if (v == nullptr || v->is_null()) return fallback;
  return v->as_bool(source + " field \"" + key + "\"");
}

void parse_rope(const Json& rs, const std::string& what, ModelConfig& c) {
  rs.as_object(what);
  c.rope_theta = get_positive(rs, "rope_theta", what, c.rope_theta);
  const Json* t = rs.find("rope_type");
  if (t == nullptr) t = rs.find("type");
  if (t == nullptr) throw std::runtime_error(what + " lacks \"rope_type\"");
  c.rope_scaling.type = t->as_string(what + " rope_type");
  if (c.rope_scaling.type == "default") {
    c.rope_scaling.type.clear();
  } else if (c.rope_scaling.type == "linear") {
    c.rope_scaling.factor = get_positive(rs, "factor", what, 1.0);
  } else if (c.rope_scaling.type == "llama3") {
    c.rope_scaling.factor = get_positive(rs, "factor", what, 8.0);
    c.rope_scaling.low_freq_factor = get_positive(rs, "low_freq_factor", what, 1.0);
    c.rope_scaling.high_freq_factor = get_positive(rs, "high_freq_factor", what, 4.0);
    c.rope_scaling.original_max_position_embeddings =
        get_int(rs, "original_max_position_embeddings", what, 8192, false, kMaxPositions);
    // The smoothing between the two wavelength bounds divides by their difference.
    if (!(c.rope_scaling.high_freq_factor > c.rope_scaling.low_freq_factor))
      refuse(what, "high_freq_factor (" + num_str(c.rope_scaling.high_freq_factor) +
                       ") must be greater than low_freq_factor (" + num_str(c.rope_scaling.low_freq_factor) + ")");
  } else {
    throw std::runtime_error(what + " type \"" + c.rope_scaling.type +
                             "\" is not supported (supported: linear, llama3)");
  }
}

}  // namespace

ModelConfig ModelConfig::from_json_text(const std::string& text, const std::string& source) {
  const Json j = Json::parse(text, source);
  j.as_object(source);
  ModelConfig c;
  const Json* mt = j.find("model_type");
  if (mt == nullptr) refuse(source, "missing required field \"model_type\"");
  c.model_type = mt->as_string(source + " field \"model_type\"");
  if (c.model_type != "llama" && c.model_type != "mistral" && c.model_type != "qwen2" &&
      c.model_type != "qwen3")
    refuse(source, "model_type \"" + c.model_type +
                       "\" is not supported (supported: llama, mistral, qwen2, qwen3)");
  c.hidden_size = get_int(j, "hidden_size", source, 0, true, kMaxWidth);
  c.intermediate_size = get_int(j, "intermediate_size", source, 0, true, kMaxWidth);
  c.num_hidden_layers = get_int(j, "num_hidden_layers", source, 0, true, kMaxCount);
  c.num_attention_heads = get_int(j, "num_attention_heads", source, 0, true, kMaxCount);
  c.num_key_value_heads = get_int(j, "num_key_value_heads", source, c.num_attention_heads, false, kMaxCount);
  c.vocab_size = get_int(j, "vocab_size", source, 0, true, kMaxWidth);
  c.max_position_embeddings = get_int(j, "max_position_embeddings", source, 2048, false, kMaxPositions);
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    refuse(source, "num_attention_heads (" + std::to_string(c.num_attention_heads) +
                       ") must be a multiple of num_key_value_heads (" +
                       std::to_string(c.num_key_value_heads) + ")");
  const int64_t derived = c.hidden_size / c.num_attention_heads;
  c.head_dim = get_int(j, "head_dim", source, derived, false, kMaxCount);
  const Json* hd = j.find("head_dim");
  if ((hd == nullptr || hd->is_null()) && c.hidden_size % c.num_attention_heads != 0)
    refuse(source, "hidden_size is not a multiple of num_attention_heads and no head_dim is given");
  if (c.head_dim > kMaxCount)
    refuse(source, "head_dim (hidden_size / num_attention_heads) must be at most " + std::to_string(kMaxCount) +
                       ", got " + std::to_string(c.head_dim));
  if (c.head_dim % 2 != 0) refuse(source, "head_dim must be even for rotary embeddings, got " + std::to_string(c.head_dim));
  c.rms_norm_eps = get_positive(j, "rms_norm_eps", source, 1e-6);
  c.rope_theta = get_positive(j, "rope_theta", source, 10000.0);
  c.tie_word_embeddings = get_bool(j, "tie_word_embeddings", source, false);
  c.attention_bias = get_bool(j, "attention_bias", source, c.model_type == "qwen2");
  c.qk_norm = c.model_type == "qwen3";
  if (const Json* hidden_act = j.find("hidden_act")) {
    const std::string& act = hidden_act->as_string(source + " field \"hidden_act\"");
    if (act != "silu") refuse(source, "hidden_act \"" + act + "\" is not supported (only silu)");
  }
  if (get_bool(j, "mlp_bias", source, false)) refuse(source, "mlp_bias=true is not supported");
  // Sliding-window attention is not implemented: refuse configs that would use it.
  if (const Json* sw = j.find("sliding_window"); sw && !sw->is_null()) {
    const bool used = c.model_type == "mistral" || get_bool(j, "use_sliding_window", source, false);
    if (used && sw->as_int(source + " field \"sliding_window\"") < c.max_position_embeddings)
      refuse(source, "sliding_window=" + std::to_string(sw->as_int("sliding_window")) +
                         " is not supported (sliding-window attention)");
  }
  // Quantized checkpoints: flashpage's canonical formats run (see QuantConfig); GPTQ and AWQ
  // convert to them without requantizing (`flashpage quantize`, which LLM(...) runs itself).
  if (const Json* q = j.find("quantization_config"); q && q->is_object()) {
    const Json* m = q->find("quant_method");
    const std::string method = m && m->is_string() ? m->as_string("quant_method") : "?";
    if (method != "flashpage")
      refuse(source, "quantization_config with quant_method \"" + method + "\" is not read directly: convert it with "
                     "`flashpage quantize SRC DST` (GPTQ and AWQ are repacked without requantizing; LLM() does "
                     "this itself into a cache)");
    const Json* f = q->find("format");
    c.quant.format = f && f->is_string() ? f->as_string("format") : "";
    if (c.quant.format != "w4a16" && c.quant.format != "w8a8-int8" && c.quant.format != "fp8")
      refuse(source, "quantization_config format \"" + c.quant.format + "\" is not one of w4a16, w8a8-int8, fp8");
    if (c.quant.format == "w4a16") {
      const Json* g = q->find("group_size");
      c.quant.group_size = g ? g->as_int(source + " quantization_config.group_size") : 128;
      if (c.quant.group_size != -1 && (c.quant.group_size <= 0 || c.quant.group_size % 32 != 0))
        refuse(source, "quantization_config.group_size " + std::to_string(c.quant.group_size) +
                           " is not supported on the CPU (-1 or a multiple of 32)");
      c.quant.symmetric = get_bool(*q, "symmetric", source + " quantization_config", true);
    }
  }
  // Rotary scaling: transformers 4 writes "rope_scaling" (and "rope_theta" beside it),
  // transformers 5 writes "rope_parameters" holding rope_theta and the scaling together.
  const Json* rs = j.find("rope_parameters");
  const char* rope_key = "rope_parameters";
  if (rs == nullptr || rs->is_null()) {
    rs = j.find("rope_scaling");
    rope_key = "rope_scaling";
  }
  if (rs && !rs->is_null()) parse_rope(*rs, source + " " + rope_key, c);
  // Finite, positive inputs can still overflow or underflow: theta = 5e-324 has no finite
  // inverse powers, factor = 1e308 divides them to 0.
  for (double x : c.rope_inv_freq())
    if (!(std::isfinite(x) && x > 0))
      refuse(source, "rope_theta=" + num_str(c.rope_theta) + " with head_dim " + std::to_string(c.head_dim) +
                         " and its rope scaling gives rotary frequencies that are not finite positive numbers");
  if (const Json* dt = j.find("torch_dtype"); dt && dt->is_string()) c.torch_dtype = dt->as_string("torch_dtype");
  if (const Json* dt = j.find("dtype"); c.torch_dtype.empty() && dt && dt->is_string())
    c.torch_dtype = dt->as_string("dtype");
  if (const Json* b = j.find("bos_token_id"); b && b->is_number())
    c.bos_token_id = token_id(*b, "bos_token_id", source, c.vocab_size);
  if (const Json* e = j.find("eos_token_id"); e && !e->is_null()) {
    if (e->is_array()) {
      for (const Json& x : e->as_array(source + " field \"eos_token_id\""))
        c.eos_token_ids.push_back(token_id(x, "eos_token_id", source, c.vocab_size));
    } else {
      c.eos_token_ids.push_back(token_id(*e, "eos_token_id", source, c.vocab_size));
    }
  }
  return c;
}

ModelConfig ModelConfig::from_dir(const std::string& model_dir) {
  const std::string path = model_dir + "/config.json";
  std::string text;
  try {
    text = read_text_file(path);
  } catch (const std::runtime_error&) {
    throw std::runtime_error(path + ": cannot open (is this a Hugging Face model directory?)");
  }
  return from_json_text(text, path);
}

ModelConfig ModelConfig::from_gguf(const GgufFile& f) {
  const std::string arch = f.get_string("general.architecture");
  if (arch != "llama" && arch != "mistral" && arch != "qwen2" && arch != "qwen3")
    refuse(f.path(), "general.architecture \"" + arch + "\" is not supported (supported: llama, mistral, qwen2, qwen3)");
  // The metadata as the config.json transformers would write, checked by from_json_text.
  std::string j = "{\"model_type\": \"" + arch + "\", \"torch_dtype\": \"bfloat16\"";
  auto put = [&](const char* key, const std::string& value) { j += std::string(", \"") + key + "\": " + value; };
  auto int_of = [&](const char* key, const std::string& gguf_key) {
    if (f.has(gguf_key)) put(key, std::to_string(f.get_int(gguf_key)));
  };
  auto float_of = [&](const char* key, const std::string& gguf_key) {
    if (f.has(gguf_key)) put(key, num_str(f.get_float(gguf_key, 0)));
  };
  const std::string a = arch + ".";
  int_of("hidden_size", a + "embedding_length");
  int_of("intermediate_size", a + "feed_forward_length");
  int_of("num_hidden_layers", a + "block_count");
  int_of("num_attention_heads", a + "attention.head_count");
  int_of("num_key_value_heads", a + "attention.head_count_kv");
  int_of("head_dim", a + "attention.key_length");
  int_of("max_position_embeddings", a + "context_length");
  float_of("rms_norm_eps", a + "attention.layer_norm_rms_epsilon");
  float_of("rope_theta", a + "rope.freq_base");
  if (f.has(a + "attention.value_length") && f.has(a + "attention.key_length") &&
      f.get_int(a + "attention.value_length") != f.get_int(a + "attention.key_length"))
    refuse(f.path(), a + "attention.value_length differs from key_length (not supported)");
  // The vocabulary: the declared size, else the embedding table's rows.
  const GgufTensor* embed = f.find_tensor("token_embd.weight");
  if (f.has(a + "vocab_size")) int_of("vocab_size", a + "vocab_size");
  else if (embed && embed->dims.size() == 2) put("vocab_size", std::to_string(embed->dims[1]));
  put("tie_word_embeddings", f.find_tensor("output.weight") ? "false" : "true");
  put("attention_bias", f.find_tensor("blk.0.attn_q.bias") ? "true" : "false");
  if (f.has(a + "rope.scaling.type")) {
    const std::string type = f.get_string(a + "rope.scaling.type");
    if (type == "linear") put("rope_scaling", "{\"rope_type\": \"linear\", \"factor\": " +
                                                  num_str(f.get_float(a + "rope.scaling.factor", 1.0)) + "}");
    else if (type != "none") refuse(f.path(), a + "rope.scaling.type \"" + type + "\" is not supported (linear)");
  }
  if (f.find_tensor("rope_freqs.weight"))
    refuse(f.path(), "tensor \"rope_freqs.weight\" (Llama 3.1 rope scaling factors) is not supported yet");
  if (f.has(a + "attention.sliding_window"))
    refuse(f.path(), a + "attention.sliding_window is set (sliding-window attention is not supported)");
  int_of("bos_token_id", "tokenizer.ggml.bos_token_id");
  std::string eos;
  for (const char* key : {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"})
    if (f.has(key)) {
      const std::string id = std::to_string(f.get_int(key));
      if (eos.find("[" + id + "]") == std::string::npos && eos.find(", " + id + "]") == std::string::npos)
        eos = eos.empty() ? "[" + id + "]" : eos.substr(0, eos.size() - 1) + ", " + id + "]";
    }
  if (!eos.empty()) put("eos_token_id", eos);
  j += "}";
  ModelConfig c = from_json_text(j, f.path());
  return c;
}

std::vector<double> ModelConfig::rope_inv_freq() const {
  const int64_t half = head_dim / 2;
  std::vector<double> inv(half);
  for (int64_t i = 0; i < half; ++i) inv[i] = 1.0 / std::pow(rope_theta, double(2 * i) / double(head_dim));
  if (rope_scaling.type == "linear") {
    for (double& x : inv) x /= rope_scaling.factor;
  } else if (rope_scaling.type == "llama3") {
    // As in Hugging Face's _compute_llama3_parameters.
    const RopeScaling& s = rope_scaling;
    const double old_len = double(s.original_max_position_embeddings);
    const double low_wavelen = old_len / s.low_freq_factor, high_wavelen = old_len / s.high_freq_factor;
    for (double& x : inv) {
      const double wavelen = 2 * std::numbers::pi / x;
      if (wavelen > low_wavelen) {
        x /= s.factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        x = (1 - smooth) * x / s.factor + smooth * x;
      }
    }
  }
  return inv;
}

}  // namespace flashpage::model
