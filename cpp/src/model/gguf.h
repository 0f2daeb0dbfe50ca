// GGUF files (llama.cpp's format), memory-mapped: the metadata key/values, the tensor table,
// and the dequantization of every tensor type the engine takes (F32, F16, BF16, Q8_0, Q4_0,
// Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K; any other type is refused by name). Every malformed input
// -- bad magic or version, a truncated file, a string or array longer than the file, an unknown
// value type, a tensor whose type, dimensions or offset do not fit -- raises std::runtime_error
// naming the file and the key or tensor.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include "model/mapped_file.h"

namespace flashpage::model {

// ggml's type codes, as stored in the file.
enum class GgmlType : uint32_t {
  kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8,
  kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kBF16 = 30,
};
// "Q4_K", ... or "type 23" for codes the engine does not take.
std::string ggml_type_name(uint32_t type);
// Values per block and bytes per block of a supported type (F32/F16/BF16: blocks of one value);
// false for any other code.
bool ggml_type_layout(uint32_t type, int64_t* block_values, int64_t* block_bytes);
// n values (a multiple of the type's block) of `type` at src, as fp32 into dst.
void dequantize(GgmlType type, const void* src, float* dst, int64_t n);
// The same as int8 blocks of 32 (value = qs * scale + min, exactly), for the types of that form
// (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K); false for the others.
bool to_int8_blocks(GgmlType type, const void* src, int64_t n, int8_t* qs, float* scales, float* mins);
// The width of to_int8_blocks' q for a type: 4 or 5 (q in [0, 2^bits)), 8 (signed: Q8_0), 0 (no
// such form).
int int8_block_bits(GgmlType type);

// A metadata value: scalars widened (integers to int64 or uint64, floats to double), strings,
// and arrays of one of those.
using GgufScalar = std::variant<int64_t, uint64_t, double, bool, std::string>;
struct GgufValue {
  GgufScalar scalar;
  std::vector<GgufScalar> array;
  bool is_array = false;
};

struct GgufTensor {
  std::string name;
  uint32_t type = 0;
  std::vector<int64_t> dims;  // as stored: dims[0] is the innermost (a matrix [out, in] is {in, out})
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  int64_t numel() const;
};

class GgufFile {
 public:
  explicit GgufFile(const std::string& path);

  const std::string& path() const { return file_.path(); }
  uint32_t version() const { return version_; }
  const std::map<std::string, GgufValue>& metadata() const { return metadata_; }
  const std::map<std::string, GgufTensor>& tensors() const { return tensors_; }

  bool has(const std::string& key) const { return metadata_.count(key) != 0; }
  // Typed reads; each throws naming the file and the key when it is missing or of another type.
  int64_t get_int(const std::string& key) const;
  int64_t get_int(const std::string& key, int64_t fallback) const;
  double get_float(const std::string& key, double fallback) const;
  std::string get_string(const std::string& key) const;
  const GgufTensor* find_tensor(const std::string& name) const;

 private:
  MappedFile file_;
  uint32_t version_ = 0;
  std::map<std::string, GgufValue> metadata_;
  std::map<std::string, GgufTensor> tensors_;
};

}  // namespace flashpage::model
