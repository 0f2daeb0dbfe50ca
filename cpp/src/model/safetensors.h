// Memory-mapped safetensors checkpoints, single-file or sharded
// (model.safetensors.index.json). Every malformed input -- a missing or truncated file, a bad
// header, a tensor whose offsets, dtype or shape do not add up -- raises std::runtime_error
// naming the file, the tensor and the problem.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "model/mapped_file.h"

namespace flashpage::model {

enum class DType { kF32, kF16, kBF16, kF64, kI64, kI32, kI16, kI8, kU8, kBool, kF8E4M3, kF8E5M2 };

// The whole file as a string; throws naming the file when it cannot be read.
std::string read_text_file(const std::string& path);

const char* dtype_name(DType d);  // as safetensors writes it: "F32", "BF16", ...
size_t dtype_size(DType d);

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const void* data = nullptr;  // inside the mapping; valid while the file is open
  size_t nbytes = 0;
  std::string file;

  int64_t numel() const;
};

// One mapped .safetensors file (RAII: unmapped on destruction).
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  std::string path_;
  MappedFile file_;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a checkpoint directory: model.safetensors, or the shards listed by
// model.safetensors.index.json.
class WeightStore {
 public:
  static WeightStore open(const std::string& model_dir);

  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  // The tensor, checked against an expected shape and dtype set when given; throws naming the
  // tensor, its file and the mismatch.
  const TensorInfo& get(const std::string& name) const;
  const TensorInfo& get(const std::string& name, const std::vector<int64_t>& shape) const;
  std::vector<std::string> names() const;
  const std::vector<std::string>& files() const { return files_; }

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> open_;
  std::map<std::string, const TensorInfo*> tensors_;
  std::vector<std::string> files_;
  std::string dir_;
};

}  // namespace flashpage::model
