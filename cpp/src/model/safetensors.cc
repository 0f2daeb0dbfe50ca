#include "model/safetensors.h"

#include <sys/stat.h>

#include <cstring>
#include <fstream>
#include <stdexcept>

#include "model/json.h"

namespace flashpage::model {
namespace {

constexpr uint64_t kMaxHeader = 100u << 20;  // the format's own limit

struct DTypeName {
  const char* name;
  DType dtype;
  size_t size;
};
constexpr DTypeName kDTypes[] = {
    {"F32", DType::kF32, 4},   {"F16", DType::kF16, 2},   {"BF16", DType::kBF16, 2},
    {"F64", DType::kF64, 8},   {"I64", DType::kI64, 8},   {"I32", DType::kI32, 4},
    {"I16", DType::kI16, 2},   {"I8", DType::kI8, 1},     {"U8", DType::kU8, 1},
    {"BOOL", DType::kBool, 1}, {"F8_E4M3", DType::kF8E4M3, 1}, {"F8_E5M2", DType::kF8E5M2, 1},
};

[[noreturn]] void fail(const std::string& file, const std::string& what) {
  throw std::runtime_error(file + ": " + what);
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

}  // namespace

const char* dtype_name(DType d) {
  for (const auto& x : kDTypes)
    if (x.dtype == d) return x.name;
  return "?";
}

size_t dtype_size(DType d) {
  for (const auto& x : kDTypes)
    if (x.dtype == d) return x.size;
  return 0;
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path), file_(path) {
  const size_t size = file_.size();
  if (size < 8) fail(path, "truncated: " + std::to_string(size) + " bytes, less than the 8-byte header length");
  {
    const uint8_t* bytes = file_.data();
    uint64_t header_len = 0;
    std::memcpy(&header_len, bytes, 8);  // little-endian, as on every supported machine
    if (header_len > kMaxHeader)
      fail(path, "header length " + std::to_string(header_len) + " exceeds the 100 MB limit");
    if (header_len > size - 8)
      fail(path, "truncated: the header says " + std::to_string(header_len) +
                     " bytes but the file has " + std::to_string(size - 8) + " after the length");
    const Json header = Json::parse(
        std::string_view(reinterpret_cast<const char*>(bytes + 8), header_len), path + " header");
    const size_t data_start = 8 + header_len;
    const size_t data_size = size - data_start;
    for (const auto& [name, entry] : header.as_object(path + " header")) {
      if (name == "__metadata__") {
        for (const auto& [k, v] : entry.as_object(path + " __metadata__"))
          metadata_[k] = v.is_string() ? v.as_string(k) : std::string();
        continue;
      }
      const std::string what = path + ": tensor '" + name + "'";
      TensorInfo t;
      t.name = name;
      t.file = path;
      const Json* dt = entry.find("dtype");
      const Json* shape = entry.find("shape");
      const Json* offsets = entry.find("data_offsets");
      if (!dt || !shape || !offsets) fail(path, "tensor '" + name + "' lacks dtype, shape or data_offsets");
      const std::string& dname = dt->as_string(what + " dtype");
      bool known = false;
      for (const auto& x : kDTypes)
        if (dname == x.name) {
          t.dtype = x.dtype;
          known = true;
        }
      if (!known) fail(path, "tensor '" + name + "' has unsupported dtype " + dname);
      for (const Json& d : shape->as_array(what + " shape")) {
        const int64_t v = d.as_int(what + " shape entry");
        if (v < 0) fail(path, "tensor '" + name + "' has a negative dimension");
        t.shape.push_back(v);
      }
      const auto& off = offsets->as_array(what + " data_offsets");
      if (off.size() != 2) fail(path, "tensor '" + name + "' data_offsets must have 2 entries");
      const int64_t begin = off[0].as_int(what + " data_offsets"), end = off[1].as_int(what + " data_offsets");
      if (begin < 0 || end < begin || static_cast<uint64_t>(end) > data_size)
        fail(path, "tensor '" + name + "' data_offsets [" + std::to_string(begin) + ", " +
                       std::to_string(end) + ") fall outside the " + std::to_string(data_size) +
                       "-byte data section (truncated file?)");
      t.nbytes = static_cast<size_t>(end - begin);
      // The byte count the shape needs, refusing products that overflow: a wrapped product
      // could match a short data range and expose a huge shape over a few bytes.
      uint64_t want = dtype_size(t.dtype);
      for (int64_t d : t.shape)
        if (__builtin_mul_overflow(want, static_cast<uint64_t>(d), &want))
          fail(path, "tensor '" + name + "' shape " + shape_str(t.shape) + " is too large");
      if (t.nbytes != want)
        fail(path, "tensor '" + name + "' has " + std::to_string(t.nbytes) + " bytes but " +
                       dname + " " + shape_str(t.shape) + " needs " + std::to_string(want));
      t.data = bytes + data_start + begin;
      tensors_.emplace(name, std::move(t));
    }
  }
}

namespace {

bool exists(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0;
}

}  // namespace

std::string read_text_file(const std::string& p) {
  std::ifstream f(p, std::ios::binary | std::ios::ate);
  if (!f) throw std::runtime_error(p + ": cannot open");
  std::string text(static_cast<size_t>(f.tellg()), '\0');
  f.seekg(0);
  f.read(text.data(), static_cast<std::streamsize>(text.size()));
  if (!f) throw std::runtime_error(p + ": read failed");
  return text;
}

namespace {

}  // namespace

WeightStore WeightStore::open(const std::string& model_dir) {
  WeightStore ws;
  ws.dir_ = model_dir;
  const std::string single = model_dir + "/model.safetensors";
  const std::string index = model_dir + "/model.safetensors.index.json";
  if (exists(index)) {
    const Json j = Json::parse(read_text_file(index), index);
    const Json* map = j.find("weight_map");
    if (map == nullptr) fail(index, "lacks \"weight_map\"");
    std::map<std::string, std::string> wanted;  // tensor -> shard
    for (const auto& [name, file] : map->as_object(index + " weight_map")) {
      const std::string& f = file.as_string(index + " weight_map['" + name + "']");
      if (f.find('/') != std::string::npos) fail(index, "shard name '" + f + "' must be a plain file name");
      wanted[name] = f;
      bool seen = false;
      for (const auto& x : ws.files_) seen |= x == f;
      if (!seen) ws.files_.push_back(f);
    }
    for (const std::string& f : ws.files_) {
      ws.open_.push_back(std::make_unique<SafetensorsFile>(model_dir + "/" + f));
    }
    for (const auto& [name, f] : wanted) {
      for (const auto& file : ws.open_) {
        if (file->path() != model_dir + "/" + f) continue;
        auto it = file->tensors().find(name);
        if (it == file->tensors().end())
          fail(index, "lists tensor '" + name + "' in " + f + ", which does not contain it");
        ws.tensors_[name] = &it->second;
      }
    }
  } else if (exists(single)) {
    ws.files_.push_back("model.safetensors");
    ws.open_.push_back(std::make_unique<SafetensorsFile>(single));
    for (const auto& [name, t] : ws.open_.back()->tensors()) ws.tensors_[name] = &t;
  } else {
    throw std::runtime_error(model_dir + ": no model.safetensors or model.safetensors.index.json");
  }
  return ws;
}

const TensorInfo& WeightStore::get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end())
    throw std::runtime_error(dir_ + ": the checkpoint has no tensor '" + name + "'");
  return *it->second;
}

const TensorInfo& WeightStore::get(const std::string& name, const std::vector<int64_t>& shape) const {
  const TensorInfo& t = get(name);
  if (t.shape != shape)
    throw std::runtime_error(t.file + ": tensor '" + name + "' has shape " + shape_str(t.shape) +
                             ", expected " + shape_str(shape) + " from config.json");
  return t;
}

std::vector<std::string> WeightStore::names() const {
  std::vector<std::string> out;
  for (const auto& [n, _] : tensors_) out.push_back(n);
  return out;
}

}  // namespace flashpage::model
