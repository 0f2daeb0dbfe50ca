#include "model/json.h"

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>

namespace flashpage::model {

const char* json_type_name(Json::Type t) {
  switch (t) {
    case Json::Type::kNull: return "null";
    case Json::Type::kBool: return "a boolean";
    case Json::Type::kNumber: return "a number";
    case Json::Type::kString: return "a string";
    case Json::Type::kArray: return "an array";
    case Json::Type::kObject: return "an object";
  }
  return "?";
}

class JsonParser {
 public:
  JsonParser(std::string_view text, const std::string& source) : s_(text), source_(source) {}

  Json parse_document() {
    Json v = value(0);
    skip_ws();
    if (pos_ != s_.size()) fail("unexpected text after the JSON value");
    return v;
  }

 private:
  static constexpr int kMaxDepth = 64;

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error(source_ + ": bad JSON at byte " + std::to_string(pos_) + ": " + what);
  }
  void skip_ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' || s_[pos_] == '\t'))
      ++pos_;
  }
  bool consume(std::string_view word) {
    if (s_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }

  Json value(int depth) {
    if (depth > kMaxDepth) fail("nested deeper than " + std::to_string(kMaxDepth) + " levels");
    skip_ws();
    if (pos_ >= s_.size()) fail("unexpected end of input");
    Json v;
    const char c = s_[pos_];
    if (c == '{') {
      v.type_ = Json::Type::kObject;
      ++pos_;
      skip_ws();
      if (pos_ < s_.size() && s_[pos_] == '}') { ++pos_; return v; }
      while (true) {
        skip_ws();
        if (pos_ >= s_.size() || s_[pos_] != '"') fail("expected a string key");
        std::string key = string();
        skip_ws();
        if (pos_ >= s_.size() || s_[pos_] != ':') fail("expected ':' after key \"" + key + "\"");
        ++pos_;
        v.object_.emplace_back(std::move(key), value(depth + 1));
        skip_ws();
        if (pos_ < s_.size() && s_[pos_] == ',') { ++pos_; continue; }
        if (pos_ < s_.size() && s_[pos_] == '}') { ++pos_; return v; }
        fail("expected ',' or '}' in an object");
      }
    }
    if (c == '[') {
      v.type_ = Json::Type::kArray;
      ++pos_;
      skip_ws();
      if (pos_ < s_.size() && s_[pos_] == ']') { ++pos_; return v; }
      while (true) {
        v.array_.push_back(value(depth + 1));
        skip_ws();
        if (pos_ < s_.size() && s_[pos_] == ',') { ++pos_; continue; }
        if (pos_ < s_.size() && s_[pos_] == ']') { ++pos_; return v; }
        fail("expected ',' or ']' in an array");
      }
    }
    if (c == '"') {
      v.type_ = Json::Type::kString;
      v.string_ = string();
      return v;
    }
    if (consume("true")) { v.type_ = Json::Type::kBool; v.bool_ = true; return v; }
    if (consume("false")) { v.type_ = Json::Type::kBool; return v; }
    if (consume("null")) return v;
    // Python's json writes these; configs sometimes carry them.
    if (consume("NaN")) { v.type_ = Json::Type::kNumber; v.number_ = NAN; return v; }
    if (consume("Infinity")) { v.type_ = Json::Type::kNumber; v.number_ = INFINITY; return v; }
    if (consume("-Infinity")) { v.type_ = Json::Type::kNumber; v.number_ = -INFINITY; return v; }
    return number();
  }

  Json number() {
    const size_t start = pos_;
    if (pos_ < s_.size() && s_[pos_] == '-') ++pos_;
    bool digits = false, integral = true;
    while (pos_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[pos_]))) { ++pos_; digits = true; }
    if (pos_ < s_.size() && s_[pos_] == '.') {
      integral = false;
      ++pos_;
      while (pos_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[pos_]))) ++pos_;
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      integral = false;
      ++pos_;
      if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
      while (pos_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[pos_]))) ++pos_;
    }
    if (!digits) {
      pos_ = start;
      fail("expected a value");
    }
    const std::string text(s_.substr(start, pos_ - start));
    Json v;
    v.type_ = Json::Type::kNumber;
    v.number_ = std::strtod(text.c_str(), nullptr);
    if (integral) {  // exact as an integer unless it overflows int64
      errno = 0;
      const long long x = std::strtoll(text.c_str(), nullptr, 10);
      if (errno == 0) {
        v.integral_ = true;
        v.int_ = x;
      }
    }
    return v;
  }

  static void put_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  // The length of the well-formed UTF-8 sequence at pos_ (RFC 3629: no overlong forms, no
  // surrogates, at most U+10FFFF), or 0. Strings reach error messages and Python, which both
  // need valid UTF-8; the safetensors reference parser (serde_json) refuses the same.
  size_t utf8_length() const {
    const auto byte = [&](size_t i) { return pos_ + i < s_.size() ? static_cast<unsigned char>(s_[pos_ + i]) : 0u; };
    const unsigned b0 = byte(0);
    const auto cont = [&](size_t i) { return (byte(i) & 0xC0) == 0x80; };
    if (b0 >= 0xC2 && b0 <= 0xDF) return cont(1) ? 2 : 0;
    if (b0 >= 0xE0 && b0 <= 0xEF) {
      const unsigned b1 = byte(1);
      if ((b0 == 0xE0 && b1 < 0xA0) || (b0 == 0xED && b1 >= 0xA0)) return 0;  // overlong; surrogate
      return cont(1) && cont(2) ? 3 : 0;
    }
    if (b0 >= 0xF0 && b0 <= 0xF4) {
      const unsigned b1 = byte(1);
      if ((b0 == 0xF0 && b1 < 0x90) || (b0 == 0xF4 && b1 >= 0x90)) return 0;  // overlong; > U+10FFFF
      return cont(1) && cont(2) && cont(3) ? 4 : 0;
    }
    return 0;
  }

  uint32_t hex4() {
    if (pos_ + 4 > s_.size()) fail("truncated \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const char h = s_[pos_++];
      v <<= 4;
      if (h >= '0' && h <= '9') v |= h - '0';
      else if (h >= 'a' && h <= 'f') v |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') v |= h - 'A' + 10;
      else fail("bad hex digit in a \\u escape");
    }
    return v;
  }

  std::string string() {
    ++pos_;  // opening quote
    std::string out;
    while (true) {
      if (pos_ >= s_.size()) fail("unterminated string");
      const char c = s_[pos_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in a string");
      if (static_cast<unsigned char>(c) >= 0x80) {  // the whole sequence, validated
        --pos_;
        const size_t n = utf8_length();
        if (n == 0) fail("invalid UTF-8 in a string");
        out.append(s_.substr(pos_, n));
        pos_ += n;
        continue;
      }
      if (c != '\\') {
        out += c;
        continue;
      }
      if (pos_ >= s_.size()) fail("unterminated escape");
      const char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xDC00 && cp < 0xE000) fail("lone low surrogate in a \\u escape");
          if (cp >= 0xD800 && cp < 0xDC00) {  // a surrogate pair
            if (!consume("\\u")) fail("lone high surrogate in a \\u escape");
            const uint32_t lo = hex4();
            if (lo < 0xDC00 || lo >= 0xE000) fail("bad low surrogate in a \\u escape");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          put_utf8(out, cp);
          break;
        }
        default: {
          // Shown printable or as hex: messages must stay valid UTF-8.
          const unsigned char b = static_cast<unsigned char>(e);
          char shown[16];
          if (b > 0x20 && b < 0x7F) std::snprintf(shown, sizeof shown, "\\%c", e);
          else std::snprintf(shown, sizeof shown, "\\ + byte 0x%02X", b);
          fail(std::string("unknown escape ") + shown);
        }
      }
    }
  }

  std::string_view s_;
  const std::string& source_;
  size_t pos_ = 0;
};

Json Json::parse(std::string_view text, const std::string& source) {
  return JsonParser(text, source).parse_document();
}

namespace {
[[noreturn]] void wrong(const std::string& what, const char* want, Json::Type got) {
  throw std::runtime_error(what + " must be " + want + ", got " + json_type_name(got));
}
}  // namespace

bool Json::as_bool(const std::string& what) const {
  if (type_ != Type::kBool) wrong(what, "a boolean", type_);
  return bool_;
}

double Json::as_number(const std::string& what) const {
  if (type_ != Type::kNumber) wrong(what, "a number", type_);
  return number_;
}

int64_t Json::as_int(const std::string& what) const {
  if (type_ != Type::kNumber || !integral_) {
    if (type_ == Type::kNumber)
      throw std::runtime_error(what + " must be an integer, got " + std::to_string(number_));
    wrong(what, "an integer", type_);
  }
  return int_;
}

const std::string& Json::as_string(const std::string& what) const {
  if (type_ != Type::kString) wrong(what, "a string", type_);
  return string_;
}

const std::vector<Json>& Json::as_array(const std::string& what) const {
  if (type_ != Type::kArray) wrong(what, "an array", type_);
  return array_;
}

const std::vector<std::pair<std::string, Json>>& Json::as_object(const std::string& what) const {
  if (type_ != Type::kObject) wrong(what, "an object", type_);
  return object_;
}

const Json* Json::find(std::string_view key) const {
  if (type_ != Type::kObject) return nullptr;
  for (const auto& [k, v] : object_)
    if (k == key) return &v;
  return nullptr;
}

}  // namespace flashpage::model
