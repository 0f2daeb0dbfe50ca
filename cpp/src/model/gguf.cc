#include "model/gguf.h"

#include <climits>
#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "runtime/half.h"

namespace flashpage::model {
namespace {

using runtime::bf16_to_f32;
using runtime::f16_to_f32;

constexpr uint64_t kMaxCount = uint64_t(1) << 24;  // tensors, keys, array entries: far beyond any model
constexpr uint32_t kMaxDims = 4;                   // GGML_MAX_DIMS

enum ValueType : uint32_t {
  kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7, kString = 8, kArray = 9,
  kU64 = 10, kI64 = 11, kF64 = 12,
};

// Whether s is valid UTF-8 (GGUF's strings are; Python could not take them otherwise).
bool valid_utf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 0 : (c >> 5) == 6 ? 1 : (c >> 4) == 14 ? 2 : (c >> 3) == 30 ? 3 : 9;
    if (n == 9 || i + n >= s.size()) return false;
    uint32_t cp = n == 0 ? c : n == 1 ? (c & 0x1F) : n == 2 ? (c & 0x0F) : (c & 0x07);
    for (size_t k = 1; k <= n; ++k) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d >> 6) != 2) return false;
      cp = (cp << 6) | (d & 0x3F);
    }
    // Overlong forms, surrogates and code points past U+10FFFF.
    if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) || cp > 0x10FFFF ||
        (cp >= 0xD800 && cp <= 0xDFFF))
      return false;
    i += n + 1;
  }
  return true;
}

// Reads the file front to back, every read checked against its end.
class Reader {
 public:
  Reader(const MappedFile& f) : f_(f) {}
  size_t pos() const { return pos_; }
  template <class T>
  T get(const std::string& what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, f_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string string(const std::string& what) {
    const uint64_t n = get<uint64_t>(what);
    need(n, what);
    std::string s(reinterpret_cast<const char*>(f_.data() + pos_), size_t(n));
    if (!valid_utf8(s))
      throw std::runtime_error(f_.path() + ": " + what + " holds a string that is not valid UTF-8 (at offset " +
                               std::to_string(pos_) + ")");
    pos_ += size_t(n);
    return s;
  }
  void need(uint64_t n, const std::string& what) const {
    if (n > f_.size() - pos_)
      throw std::runtime_error(f_.path() + ": truncated: " + what + " needs " + std::to_string(n) +
                               " bytes at offset " + std::to_string(pos_) + " but the file has " +
                               std::to_string(f_.size() - pos_) + " left");
  }

 private:
  const MappedFile& f_;
  size_t pos_ = 0;
};

GgufScalar read_scalar(Reader& r, uint32_t type, const std::string& what, const std::string& file) {
  switch (type) {
    case kU8: return uint64_t(r.get<uint8_t>(what));
    case kI8: return int64_t(r.get<int8_t>(what));
    case kU16: return uint64_t(r.get<uint16_t>(what));
    case kI16: return int64_t(r.get<int16_t>(what));
    case kU32: return uint64_t(r.get<uint32_t>(what));
    case kI32: return int64_t(r.get<int32_t>(what));
    case kF32: return double(r.get<float>(what));
    case kBool: {
      const uint8_t b = r.get<uint8_t>(what);
      if (b > 1) throw std::runtime_error(file + ": " + what + " is a bool of value " + std::to_string(b));
      return b == 1;
    }
    case kString: return r.string(what);
    case kU64: return r.get<uint64_t>(what);
    case kI64: return r.get<int64_t>(what);
    case kF64: return r.get<double>(what);
    default: throw std::runtime_error(file + ": " + what + " has unknown value type " + std::to_string(type));
  }
}

uint16_t u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
float half(const uint8_t* p) { return f16_to_f32(u16(p)); }

// The 6-bit scale and min of sub-block j of a Q4_K / Q5_K block's 12 packed bytes.
void scale_min_k4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = uint8_t((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    *m = uint8_t((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// One block of each type as 32-value sub-blocks of small integers q with a scale and a min
// (value = q * scale + min): every type here but Q6_K has that form, which is what lets
// their weights run as int8 exactly. The 4- and 5-bit types keep q unsigned, in [0, 2^bits)
// (Q4_0's q - 8 and Q5_0's q - 16 put their offset in the min: -8 or -16 x scale, exact), so
// that they can be packed below a byte. Layouts as ggml defines them (ggml-common.h).
struct Sub {
  int8_t q[32];
  float scale, min;
};

void sub_q4_0(const uint8_t* b, Sub* o) {  // f16 d; u8 qs[16]: low nibbles first
  o->scale = half(b);
  o->min = -8.f * o->scale;
  for (int j = 0; j < 16; ++j) {
    o->q[j] = int8_t(b[2 + j] & 0xF);
    o->q[j + 16] = int8_t(b[2 + j] >> 4);
  }
}
void sub_q4_1(const uint8_t* b, Sub* o) {  // f16 d, m; u8 qs[16]
  o->scale = half(b);
  o->min = half(b + 2);
  for (int j = 0; j < 16; ++j) {
    o->q[j] = int8_t(b[4 + j] & 0xF);
    o->q[j + 16] = int8_t(b[4 + j] >> 4);
  }
}
// The fifth bits: bit j of qh for value j, bit j + 16 for value j + 16.
void fifth_bits(const uint8_t* qh_bytes, const uint8_t* qs, int8_t* q) {
  uint32_t qh;
  std::memcpy(&qh, qh_bytes, 4);
  for (int j = 0; j < 16; ++j) {
    q[j] = int8_t((qs[j] & 0xF) | int(((qh >> j) << 4) & 0x10));
    q[j + 16] = int8_t((qs[j] >> 4) | int((qh >> (j + 12)) & 0x10));
  }
}
void sub_q5_0(const uint8_t* b, Sub* o) {  // f16 d; u32 qh; u8 qs[16]
  o->scale = half(b);
  o->min = -16.f * o->scale;
  fifth_bits(b + 2, b + 6, o->q);
}
void sub_q5_1(const uint8_t* b, Sub* o) {  // f16 d, m; u32 qh; u8 qs[16]
  o->scale = half(b);
  o->min = half(b + 2);
  fifth_bits(b + 4, b + 8, o->q);
}
void sub_q8_0(const uint8_t* b, Sub* o) {  // f16 d; i8 qs[32]
  o->scale = half(b);
  o->min = 0.f;
  std::memcpy(o->q, b + 2, 32);
}
// Q4_K / Q5_K: 8 sub-blocks of 32, each with a 6-bit scale and min times the block's d, dmin.
void sub_k(const uint8_t* b, Sub* o, bool five) {  // f16 d, dmin; u8 scales[12]; [u8 qh[32];] u8 qs[128]
  const float d = half(b), dmin = half(b + 2);
  const uint8_t *sc = b + 4, *qh = b + 16, *q = b + (five ? 48 : 16);
  for (int j = 0; j < 4; ++j, q += 32) {
    for (int h = 0; h < 2; ++h) {
      Sub& s = o[2 * j + h];
      uint8_t scale, min;
      scale_min_k4(2 * j + h, sc, &scale, &min);
      s.scale = d * float(scale);
      s.min = -(dmin * float(min));
      const uint8_t bit = uint8_t(1u << (2 * j + h));
      for (int l = 0; l < 32; ++l)
        s.q[l] = int8_t((h ? q[l] >> 4 : q[l] & 0xF) + (five && (qh[l] & bit) ? 16 : 0));
    }
  }
}
void sub_q4_k(const uint8_t* b, Sub* o) { sub_k(b, o, false); }
void sub_q5_k(const uint8_t* b, Sub* o) { sub_k(b, o, true); }

void block_q6_k(const uint8_t* b, float* y) {  // u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d
  const uint8_t *ql = b, *qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = half(b + 208);
  for (int n = 0; n < 256; n += 128, ql += 64, qh += 32, sc += 8) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = int((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32;
      const int q2 = int((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = int((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = int((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[n + l] = d * float(sc[is]) * float(q1);
      y[n + l + 32] = d * float(sc[is + 2]) * float(q2);
      y[n + l + 64] = d * float(sc[is + 4]) * float(q3);
      y[n + l + 96] = d * float(sc[is + 6]) * float(q4);
    }
  }
}

struct TypeInfo {
  GgmlType type;
  const char* name;
  int64_t block_values, block_bytes;
  void (*subs)(const uint8_t*, Sub*);  // the block as 32-value sub-blocks, where it has that form
  int bits;                            // then the width of their q (8: signed int8)
};
constexpr TypeInfo kTypes[] = {
    {GgmlType::kF32, "F32", 1, 4, nullptr, 0},        {GgmlType::kF16, "F16", 1, 2, nullptr, 0},
    {GgmlType::kBF16, "BF16", 1, 2, nullptr, 0},      {GgmlType::kQ8_0, "Q8_0", 32, 34, sub_q8_0, 8},
    {GgmlType::kQ4_0, "Q4_0", 32, 18, sub_q4_0, 4},   {GgmlType::kQ4_1, "Q4_1", 32, 20, sub_q4_1, 4},
    {GgmlType::kQ5_0, "Q5_0", 32, 22, sub_q5_0, 5},   {GgmlType::kQ5_1, "Q5_1", 32, 24, sub_q5_1, 5},
    {GgmlType::kQ4_K, "Q4_K", 256, 144, sub_q4_k, 4}, {GgmlType::kQ5_K, "Q5_K", 256, 176, sub_q5_k, 5},
    {GgmlType::kQ6_K, "Q6_K", 256, 210, nullptr, 0},
};
const TypeInfo* type_info(uint32_t t) {
  for (const TypeInfo& i : kTypes)
    if (uint32_t(i.type) == t) return &i;
  return nullptr;
}

// Names of the types llama.cpp writes that the engine does not take (for the error message).
const char* other_type_name(uint32_t t) {
  switch (t) {
    case 9: return "Q8_1";
    case 10: return "Q2_K";
    case 11: return "Q3_K";
    case 15: return "Q8_K";
    case 16: return "IQ2_XXS";
    case 17: return "IQ2_XS";
    case 18: return "IQ3_XXS";
    case 19: return "IQ1_S";
    case 20: return "IQ4_NL";
    case 21: return "IQ3_S";
    case 22: return "IQ2_S";
    case 23: return "IQ4_XS";
    case 29: return "IQ1_M";
    case 34: return "TQ1_0";
    case 35: return "TQ2_0";
    case 39: return "MXFP4";
    default: return nullptr;
  }
}

const char* scalar_kind(const GgufScalar& v) {
  switch (v.index()) {
    case 0: return "a signed integer";
    case 1: return "an unsigned integer";
    case 2: return "a float";
    case 3: return "a bool";
    default: return "a string";
  }
}

}  // namespace

std::string ggml_type_name(uint32_t type) {
  if (const TypeInfo* i = type_info(type)) return i->name;
  if (const char* n = other_type_name(type)) return n;
  return "type " + std::to_string(type);
}

bool ggml_type_layout(uint32_t type, int64_t* block_values, int64_t* block_bytes) {
  const TypeInfo* i = type_info(type);
  if (!i) return false;
  *block_values = i->block_values;
  *block_bytes = i->block_bytes;
  return true;
}

void dequantize(GgmlType type, const void* src, float* dst, int64_t n) {
  const TypeInfo* info = type_info(uint32_t(type));
  if (!info || n % info->block_values != 0)
    throw std::invalid_argument("dequantize: " + ggml_type_name(uint32_t(type)) + " of " + std::to_string(n) +
                                " values");
  const auto* b = static_cast<const uint8_t*>(src);
  switch (type) {
    case GgmlType::kF32: std::memcpy(dst, src, size_t(n) * 4); return;
    case GgmlType::kF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(u16(b + 2 * i));
      return;
    case GgmlType::kBF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(u16(b + 2 * i));
      return;
    case GgmlType::kQ6_K:
      for (int64_t k = 0; k < n / 256; ++k) block_q6_k(b + k * info->block_bytes, dst + k * 256);
      return;
    default: {
      Sub subs[8];
      const int64_t per = info->block_values / 32;
      for (int64_t k = 0; k < n / info->block_values; ++k) {
        info->subs(b + k * info->block_bytes, subs);
        for (int64_t s = 0; s < per; ++s)
          for (int j = 0; j < 32; ++j)
            dst[k * info->block_values + s * 32 + j] = float(subs[s].q[j]) * subs[s].scale + subs[s].min;
      }
    }
  }
}

int int8_block_bits(GgmlType type) {
  const TypeInfo* info = type_info(uint32_t(type));
  return info && info->subs ? info->bits : 0;
}

bool to_int8_blocks(GgmlType type, const void* src, int64_t n, int8_t* qs, float* scales, float* mins) {
  const TypeInfo* info = type_info(uint32_t(type));
  if (!info || !info->subs || n % info->block_values != 0) return false;
  Sub subs[8];
  const int64_t per = info->block_values / 32;
  for (int64_t k = 0; k < n / info->block_values; ++k) {
    info->subs(static_cast<const uint8_t*>(src) + k * info->block_bytes, subs);
    for (int64_t s = 0; s < per; ++s) {
      const int64_t b = k * per + s;
      std::memcpy(qs + b * 32, subs[s].q, 32);
      scales[b] = subs[s].scale;
      mins[b] = subs[s].min;
    }
  }
  return true;
}

int64_t GgufTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

GgufFile::GgufFile(const std::string& path) : file_(path) {
  Reader r(file_);
  const std::string& p = path;
  if (file_.size() < 4 || std::memcmp(file_.data(), "GGUF", 4) != 0)
    throw std::runtime_error(p + ": not a GGUF file (no \"GGUF\" magic)");
  r.get<uint32_t>("magic");
  version_ = r.get<uint32_t>("version");
  if (version_ != 2 && version_ != 3)
    throw std::runtime_error(p + ": GGUF version " + std::to_string(version_) + " is not supported (2 or 3)");
  const uint64_t n_tensors = r.get<uint64_t>("tensor_count"), n_kv = r.get<uint64_t>("kv_count");
  if (n_tensors > kMaxCount || n_kv > kMaxCount)
    throw std::runtime_error(p + ": tensor_count " + std::to_string(n_tensors) + " / kv_count " +
                             std::to_string(n_kv) + " is beyond any model");
  for (uint64_t i = 0; i < n_kv; ++i) {
    const std::string key = r.string("the key of metadata entry " + std::to_string(i));
    const std::string what = "metadata \"" + key + "\"";
    const uint32_t type = r.get<uint32_t>(what);
    GgufValue v;
    if (type == kArray) {
      v.is_array = true;
      const uint32_t et = r.get<uint32_t>(what);
      const uint64_t count = r.get<uint64_t>(what);
      if (et == kArray) throw std::runtime_error(p + ": " + what + " is an array of arrays");
      if (count > kMaxCount) throw std::runtime_error(p + ": " + what + " has " + std::to_string(count) + " entries");
      r.need(count, what);  // every entry takes at least a byte
      v.array.reserve(size_t(count));
      for (uint64_t k = 0; k < count; ++k) v.array.push_back(read_scalar(r, et, what, p));
    } else {
      v.scalar = read_scalar(r, type, what, p);
    }
    if (!metadata_.emplace(key, std::move(v)).second) throw std::runtime_error(p + ": " + what + " appears twice");
  }
  std::vector<uint64_t> offsets;  // in the table's order, as the names
  std::vector<std::string> names;
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensor t;
    t.name = r.string("the name of tensor " + std::to_string(i));
    const std::string what = "tensor \"" + t.name + "\"";
    const uint32_t n_dims = r.get<uint32_t>(what);
    if (n_dims == 0 || n_dims > kMaxDims)
      throw std::runtime_error(p + ": " + what + " has " + std::to_string(n_dims) + " dimensions (1 to 4)");
    uint64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t dim = r.get<uint64_t>(what);
      if (dim == 0 || dim > (uint64_t(1) << 40) || __builtin_mul_overflow(numel, dim, &numel) ||
          numel > (uint64_t(1) << 40))
        throw std::runtime_error(p + ": " + what + " has an impossible dimension " + std::to_string(dim));
      t.dims.push_back(int64_t(dim));
    }
    t.type = r.get<uint32_t>(what);
    const TypeInfo* info = type_info(t.type);
    if (!info)
      throw std::runtime_error(p + ": " + what + " has type " + ggml_type_name(t.type) +
                               ", which flashpage does not read (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, "
                               "Q4_K, Q5_K, Q6_K)");
    if (t.dims[0] % info->block_values != 0)
      throw std::runtime_error(p + ": " + what + " has rows of " + std::to_string(t.dims[0]) +
                               " values, not a multiple of " + info->name + "'s block of " +
                               std::to_string(info->block_values));
    t.nbytes = size_t(numel / uint64_t(info->block_values) * uint64_t(info->block_bytes));
    offsets.push_back(r.get<uint64_t>(what));
    names.push_back(t.name);
    if (!tensors_.emplace(t.name, std::move(t)).second) throw std::runtime_error(p + ": " + what + " appears twice");
  }
  const int64_t alignment = get_int("general.alignment", 32);
  if (alignment <= 0 || alignment > (1 << 20) || (alignment & (alignment - 1)) != 0)
    throw std::runtime_error(p + ": general.alignment " + std::to_string(alignment) + " is not a power of two");
  const uint64_t data_start = (uint64_t(r.pos()) + uint64_t(alignment) - 1) / uint64_t(alignment) * uint64_t(alignment);
  const uint64_t data_size = data_start <= file_.size() ? file_.size() - data_start : 0;
  for (size_t k = 0; k < names.size(); ++k) {
    GgufTensor& t = tensors_.at(names[k]);
    const uint64_t off = offsets[k];
    if (off % uint64_t(alignment) != 0)
      throw std::runtime_error(p + ": tensor \"" + t.name + "\" starts at offset " + std::to_string(off) +
                               ", not a multiple of the alignment " + std::to_string(alignment));
    if (off > data_size || t.nbytes > data_size - off)
      throw std::runtime_error(p + ": tensor \"" + t.name + "\" (" + std::to_string(t.nbytes) + " bytes at offset " +
                               std::to_string(off) + ") lies beyond the file's " + std::to_string(data_size) +
                               "-byte data section (truncated file?)");
    t.data = file_.data() + data_start + off;
  }
}

int64_t GgufFile::get_int(const std::string& key) const {
  auto it = metadata_.find(key);
  if (it == metadata_.end()) throw std::runtime_error(path() + ": metadata \"" + key + "\" is missing");
  const GgufValue& v = it->second;
  if (!v.is_array) {
    if (const int64_t* i = std::get_if<int64_t>(&v.scalar)) return *i;
    if (const uint64_t* u = std::get_if<uint64_t>(&v.scalar); u && *u <= uint64_t(INT64_MAX)) return int64_t(*u);
  }
  throw std::runtime_error(path() + ": metadata \"" + key + "\" is " +
                           (v.is_array ? std::string("an array") : scalar_kind(v.scalar)) + ", not an integer");
}

int64_t GgufFile::get_int(const std::string& key, int64_t fallback) const {
  return has(key) ? get_int(key) : fallback;
}

double GgufFile::get_float(const std::string& key, double fallback) const {
  auto it = metadata_.find(key);
  if (it == metadata_.end()) return fallback;
  const GgufValue& v = it->second;
  if (!v.is_array) {
    if (const double* d = std::get_if<double>(&v.scalar)) return *d;
    if (const int64_t* i = std::get_if<int64_t>(&v.scalar)) return double(*i);
    if (const uint64_t* u = std::get_if<uint64_t>(&v.scalar)) return double(*u);
  }
  throw std::runtime_error(path() + ": metadata \"" + key + "\" is not a number");
}

std::string GgufFile::get_string(const std::string& key) const {
  auto it = metadata_.find(key);
  if (it == metadata_.end()) throw std::runtime_error(path() + ": metadata \"" + key + "\" is missing");
  if (const std::string* s = std::get_if<std::string>(&it->second.scalar); s && !it->second.is_array) return *s;
  throw std::runtime_error(path() + ": metadata \"" + key + "\" is not a string");
}

const GgufTensor* GgufFile::find_tensor(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

}  // namespace flashpage::model
