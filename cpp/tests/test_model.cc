// The parsers of untrusted model files -- JSON, config.json, safetensors headers, shard indexes --
// on malformed input, including a deterministic mutation loop over valid seeds. Any input must
// be accepted or refused with std::runtime_error / std::invalid_argument naming the file;
// under the sanitizer build (FLASHPAGE_SANITIZE) every path is also checked for memory errors
// and undefined behaviour.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/gguf.h"
#include "model/json.h"
#include "model/safetensors.h"
#include "test_util.h"
#include "test_files.h"

using namespace flashpage;
using model::Json;
using model::ModelConfig;

namespace {

const char* kConfig = R"({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
  "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 100,
  "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
  "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": [2, 3], "torch_dtype": "bfloat16",
  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
  "sliding_window": null, "head_dim": 8, "attention_bias": false, "mlp_bias": false})";

// kConfig with `key_value` in front: find() takes the first of duplicate keys.
std::string with(const std::string& key_value) {
  std::string s = kConfig;
  return "{" + key_value + ", " + s.substr(1);
}

bool refused(const std::string& text, const std::string& needle) {
  try {
    ModelConfig::from_json_text(text, "config.json");
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    if (what.find(needle) != std::string::npos && what.rfind("config.json", 0) == 0) return true;
    std::fprintf(stderr, "  message lacks '%s': %s\n", needle.c_str(), e.what());
    return false;
  }
  std::fprintf(stderr, "  accepted: %s\n", text.substr(0, 80).c_str());
  return false;
}

// The byte-level mutations of a fuzzer (flip, insert a token, delete, duplicate, splice a
// number), deterministic from `rng`.
std::string mutate(std::string s, std::mt19937_64& rng) {
  static const char* kTokens[] = {"\"", "{", "}", "[", "]", ",", ":", "\\", "\\u", "\\ud800", "\\udc00",
                                  "-", "0", "1e999", "-1e999", "NaN", "Infinity", "-Infinity", "null",
                                  "true", "9223372036854775807", "9223372036854775808",
                                  "-9223372036854775808", "4294967296", "1.5", "1e-400", "\x00", "\xff",
                                  "\"shape\": [4611686018427387904, 4]", "\"data_offsets\": [0, 0]",
                                  "\"dtype\": \"F64\"", "\"head_dim\": 0", "\"rope_theta\": 0"};
  const int rounds = 1 + int(rng() % 4);
  for (int r = 0; r < rounds; ++r) {
    const size_t pos = s.empty() ? 0 : rng() % (s.size() + 1);
    switch (rng() % 6) {
      case 0:
        if (!s.empty()) s[pos % s.size()] ^= char(1u << (rng() % 8));
        break;
      case 1: {
        const char* t = kTokens[rng() % (sizeof kTokens / sizeof *kTokens)];
        s.insert(pos, t[0] == '\0' ? std::string(1, '\0') : std::string(t));
        break;
      }
      case 2:
        s.erase(pos, rng() % 16);
        break;
      case 3:
        if (pos < s.size()) s.insert(pos, s.substr(pos, rng() % 32));
        break;
      case 4:
        if (!s.empty()) s[pos % s.size()] = char(rng() % 256);
        break;
      default: {  // replace a run of digits with another number
        size_t b = s.find_first_of("0123456789", pos);
        if (b == std::string::npos) break;
        size_t e = s.find_first_not_of("0123456789.e-", b);
        s.replace(b, (e == std::string::npos ? s.size() : e) - b, std::to_string(int64_t(rng())));
      }
    }
  }
  return s;
}

// Accepted configs must keep the promises the loader makes.
void check_accepted(const ModelConfig& c) {
  CHECK(c.hidden_size > 0 && c.intermediate_size > 0 && c.vocab_size > 0 && c.num_hidden_layers > 0);
  CHECK(c.head_dim > 0 && c.head_dim % 2 == 0 && c.num_attention_heads % c.num_key_value_heads == 0);
  CHECK(std::isfinite(c.rms_norm_eps) && c.rms_norm_eps > 0);
  CHECK(std::isfinite(c.rope_theta) && c.rope_theta > 0);
  for (double x : c.rope_inv_freq()) CHECK(std::isfinite(x) && x > 0);
  for (int64_t e : c.eos_token_ids) CHECK(e >= 0 && e < c.vocab_size);
}

std::string safetensors_blob(const std::string& header, size_t data_bytes) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = char((n >> (8 * i)) & 0xFF);
  return out + header + std::string(data_bytes, '\x01');
}

}  // namespace

TEST(json_parser_refuses_malformed_text_by_offset) {
  CHECK_THROWS(std::runtime_error, Json::parse("", "f"), "f: bad JSON at byte 0");
  CHECK_THROWS(std::runtime_error, Json::parse("{\"a\": 1,}", "f"), "expected a string key");
  CHECK_THROWS(std::runtime_error, Json::parse("\"\\ud800\"", "f"), "lone high surrogate");
  CHECK_THROWS(std::runtime_error, Json::parse("\"\\ud800\\u0041\"", "f"), "bad low surrogate");
  CHECK_THROWS(std::runtime_error, Json::parse("\"\\u12", "f"), "truncated \\u escape");
  // Strings reach error messages and Python: well-formed UTF-8 only.
  CHECK_THROWS(std::runtime_error, Json::parse("\"\\udc00\"", "f"), "lone low surrogate");
  for (const char* bad : {"\"\xff\"", "\"\xc0\xaf\"", "\"\xe0\x80\xaf\"", "\"\xed\xa0\x80\"", "\"\xf4\x90\x80\x80\"",
                          "\"\xe2\x82\"", "\"\xc3"})
    CHECK_THROWS(std::runtime_error, Json::parse(bad, "f"), "invalid UTF-8 in a string");
  const Json utf8 = Json::parse("\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\xf4\x8f\xbf\xbf\"", "f");
  CHECK_EQ(utf8.as_string("s").size(), size_t(2 + 3 + 4 + 4));
  CHECK_THROWS(std::runtime_error, Json::parse("-", "f"), "expected a value");
  CHECK_THROWS(std::runtime_error, Json::parse("1 2", "f"), "unexpected text after");
  CHECK_THROWS(std::runtime_error, Json::parse(std::string(100, '['), "f"), "nested deeper than 64");
  CHECK_THROWS(std::runtime_error, Json::parse(std::string("\"a\0b\"", 5), "f"), "control character");
  const Json big = Json::parse("[9223372036854775807, 9223372036854775808, -9223372036854775808, 1e999]", "f");
  CHECK_EQ(big.as_array("a")[0].as_int("x"), INT64_MAX);
  CHECK_THROWS(std::runtime_error, big.as_array("a")[1].as_int("x"), "must be an integer");
  CHECK_EQ(big.as_array("a")[2].as_int("x"), INT64_MIN);
  CHECK(std::isinf(big.as_array("a")[3].as_number("x")));
  const Json emoji = Json::parse("\"\\ud83d\\ude00\"", "f");
  CHECK_EQ(emoji.as_string("s"), std::string("\xF0\x9F\x98\x80"));
}

TEST(config_refuses_impossible_numbers) {
  ModelConfig c = ModelConfig::from_json_text(kConfig, "config.json");
  check_accepted(c);
  CHECK(refused(with("\"rope_theta\": NaN"), "\"rope_theta\" must be a finite number > 0, got nan"));
  CHECK(refused(with("\"rope_theta\": -1"), "\"rope_theta\" must be a finite number > 0, got -1"));
  CHECK(refused(with("\"rms_norm_eps\": 0"), "\"rms_norm_eps\" must be a finite number > 0, got 0"));
  CHECK(refused(with("\"rms_norm_eps\": Infinity"), "got inf"));
  CHECK(refused(with("\"hidden_size\": 9223372036854775807"), "\"hidden_size\" must be at most"));
  CHECK(refused(with("\"head_dim\": 65538"), "\"head_dim\" must be at most 65536"));
  CHECK(refused(with("\"eos_token_id\": 100"), "holds 100, not a token id"));
  // A theta so small that its powers overflow: finite and positive, but no rotary frequencies.
  CHECK(refused(with("\"rope_scaling\": null, \"head_dim\": 64, \"rope_theta\": 5e-324"), "not finite positive numbers"));
}

TEST(config_mutations_are_refused_or_sound) {
  std::mt19937_64 rng(20240521);
  int accepted = 0, refused_n = 0;
  for (int i = 0; i < 20000; ++i) {
    const std::string text = mutate(kConfig, rng);
    try {
      check_accepted(ModelConfig::from_json_text(text, "config.json"));
      ++accepted;
    } catch (const std::runtime_error& e) {
      ++refused_n;
      if (std::string(e.what()).rfind("config.json", 0) != 0)
        fptest::report(__FILE__, __LINE__, std::string("error without the file name: ") + e.what());
    }
  }
  CHECK(accepted > 100 && refused_n > 100);  // the mutations reach both sides
}

TEST(safetensors_refuses_malformed_headers) {
  test_files::TempDir dir;
  const std::string path = dir.path() + "/model.safetensors";
  auto load = [&](const std::string& blob) {
    test_files::write(path, blob);
    return model::SafetensorsFile(path).tensors().size();
  };
  const std::string ok = R"({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}})";
  CHECK_EQ(load(safetensors_blob(ok, 16)), 1u);
  CHECK_THROWS(std::runtime_error,
               load(safetensors_blob(R"({"w": {"dtype": "F32", "shape": [4, 4611686018427387904], )"
                                     R"("data_offsets": [0, 0]}})", 16)),
               "model.safetensors: tensor 'w' shape [4, 4611686018427387904] is too large");
  CHECK_THROWS(std::runtime_error,
               load(safetensors_blob(R"({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}})", 16)),
               "fall outside the 16-byte data section");
  CHECK_THROWS(std::runtime_error,
               load(safetensors_blob(R"({"w": {"dtype": "F32", "shape": [2, 2], )"
                                     R"("data_offsets": [-9223372036854775808, 16]}})", 16)),
               "fall outside");
  CHECK_THROWS(std::runtime_error, load(safetensors_blob("[]", 0)), "header must be an object");
  CHECK_THROWS(std::runtime_error, load(std::string("\xff\xff\xff\xff\xff\xff\xff\xff{}", 10)),
               "exceeds the 100 MB limit");
  CHECK_THROWS(std::runtime_error, load(std::string(7, '\0')), "truncated: 7 bytes");
}

TEST(safetensors_mutations_are_refused_or_sound) {
  test_files::TempDir dir;
  const std::string path = dir.path() + "/model.safetensors";
  const std::string seed =
      R"({"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},)"
      R"( "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},)"
      R"( "c": {"dtype": "I8", "shape": [], "data_offsets": [32, 33]}})";
  std::mt19937_64 rng(7);
  int accepted = 0;
  for (int i = 0; i < 3000; ++i) {
    std::string blob = safetensors_blob(mutate(seed, rng), 33 + rng() % 3);
    if (rng() % 8 == 0) blob = mutate(blob, rng);  // the length prefix too
    test_files::write(path, blob);
    try {
      model::SafetensorsFile f(path);
      ++accepted;
      for (const auto& [name, t] : f.tensors()) {
        // Every accepted tensor lies inside the file and its bytes match its shape.
        uint64_t want = model::dtype_size(t.dtype);
        for (int64_t d : t.shape) want *= uint64_t(d);
        CHECK_EQ(uint64_t(t.nbytes), want);
        CHECK(t.nbytes <= blob.size());
        volatile char sink = 0;
        for (size_t k = 0; k < t.nbytes; ++k) sink = sink + static_cast<const char*>(t.data)[k];
      }
    } catch (const std::runtime_error& e) {
      if (std::string(e.what()).find("model.safetensors") == std::string::npos)
        fptest::report(__FILE__, __LINE__, std::string("error without the file name: ") + e.what());
    }
  }
  CHECK(accepted > 10);
}

TEST(shard_index_mutations_are_refused_or_sound) {
  test_files::TempDir dir;
  test_files::write(dir.path() + "/s1.safetensors",
                    safetensors_blob(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", 4));
  const std::string seed = R"({"metadata": {"total_size": 4}, "weight_map": {"a": "s1.safetensors"}})";
  CHECK_EQ(([&] {
             test_files::write(dir.path() + "/model.safetensors.index.json", seed);
             return model::WeightStore::open(dir.path()).names().size();
           }()), 1u);
  std::mt19937_64 rng(11);
  for (int i = 0; i < 1000; ++i) {
    test_files::write(dir.path() + "/model.safetensors.index.json", mutate(seed, rng));
    try {
      model::WeightStore ws = model::WeightStore::open(dir.path());
      for (const auto& n : ws.names()) CHECK(ws.get(n).data != nullptr);
    } catch (const std::runtime_error&) {
    }
  }
}

namespace {

// A small GGUF v3 file: three metadata keys, an F32 vector and a Q8_0 matrix.
std::string gguf_blob() {
  std::string b = "GGUF";
  auto u32 = [&](uint32_t v) { b.append(reinterpret_cast<const char*>(&v), 4); };
  auto u64 = [&](uint64_t v) { b.append(reinterpret_cast<const char*>(&v), 8); };
  auto str = [&](const std::string& s) { u64(s.size()); b += s; };
  u32(3);
  u64(2);  // tensors
  u64(3);  // keys
  str("general.architecture"), u32(8), str("llama");
  str("general.alignment"), u32(4), u32(32);
  str("tokenizer.ggml.tokens"), u32(9), u32(8), u64(2), str("a"), str("bc");
  str("t0"), u32(1), u64(32), u32(0), u64(0);
  str("t1"), u32(2), u64(32), u64(2), u32(8), u64(128);
  b.resize((b.size() + 31) / 32 * 32, '\0');
  for (int i = 0; i < 32; ++i) {
    const float v = float(i) * 0.25f;
    b.append(reinterpret_cast<const char*>(&v), 4);
  }
  for (int r = 0; r < 2; ++r) {
    const uint16_t d = 0x3C00;  // fp16 1.0
    b.append(reinterpret_cast<const char*>(&d), 2);
    for (int k = 0; k < 32; ++k) b += char(k - 16);
  }
  return b;
}

}  // namespace

TEST(gguf_reads_metadata_tensors_and_q8_0) {
  test_files::TempDir dir;
  const std::string path = dir.path() + "/m.gguf";
  test_files::write(path, gguf_blob());
  model::GgufFile f(path);
  CHECK_EQ(f.get_string("general.architecture"), std::string("llama"));
  CHECK_EQ(f.get_int("general.alignment"), int64_t(32));
  CHECK_EQ(f.metadata().at("tokenizer.ggml.tokens").array.size(), size_t(2));
  const model::GgufTensor* t1 = f.find_tensor("t1");
  REQUIRE(t1 != nullptr);
  std::vector<float> out(64);
  model::dequantize(model::GgmlType(t1->type), t1->data, out.data(), 64);
  CHECK_EQ(out[0], -16.f);
  CHECK_EQ(out[63], 15.f);
  CHECK_THROWS(std::runtime_error, f.get_int("general.architecture"), "is a string, not an integer");
}

TEST(gguf_mutations_are_refused_or_sound) {
  // Any byte of the file changed, or the file cut short: refused with an error naming the file,
  // or accepted with every tensor inside the mapping (all dequantized: ASan would see a read
  // past it).
  test_files::TempDir dir;
  const std::string path = dir.path() + "/m.gguf";
  const std::string seed = gguf_blob();
  std::mt19937_64 rng(11);
  int accepted = 0;
  for (int i = 0; i < 4000; ++i) {
    std::string blob = seed;
    for (int k = 0, n = 1 + int(rng() % 4); k < n; ++k) blob[rng() % blob.size()] = char(rng());
    if (rng() % 6 == 0) blob.resize(rng() % blob.size());
    test_files::write(path, blob);
    try {
      model::GgufFile f(path);
      ++accepted;
      for (const auto& [name, t] : f.tensors()) {
        CHECK(t.data >= reinterpret_cast<const uint8_t*>(0) && t.nbytes <= blob.size());
        std::vector<float> out(size_t(t.numel()));
        model::dequantize(model::GgmlType(t.type), t.data, out.data(), t.numel());
      }
    } catch (const std::runtime_error& e) {
      if (std::string(e.what()).find("m.gguf") == std::string::npos)
        fptest::report(__FILE__, __LINE__, std::string("error without the file name: ") + e.what());
    }
  }
  CHECK(accepted > 10);
}
