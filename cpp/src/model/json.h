// A small JSON reader for model files (config.json, safetensors headers, shard indexes).
// Errors are std::runtime_error naming the source (a file name) and the byte offset.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace flashpage::model {

class Json {
 public:
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };

  static Json parse(std::string_view text, const std::string& source);

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::kNull; }
  bool is_number() const { return type_ == Type::kNumber; }
  bool is_string() const { return type_ == Type::kString; }
  bool is_object() const { return type_ == Type::kObject; }
  bool is_array() const { return type_ == Type::kArray; }

  // Accessors throw std::runtime_error naming `what` when the type does not match.
  bool as_bool(const std::string& what) const;
  double as_number(const std::string& what) const;
  // A number that is an exact integer.
  int64_t as_int(const std::string& what) const;
  const std::string& as_string(const std::string& what) const;
  const std::vector<Json>& as_array(const std::string& what) const;
  const std::vector<std::pair<std::string, Json>>& as_object(const std::string& what) const;

  // Object member, or nullptr when absent (or when this is not an object).
  const Json* find(std::string_view key) const;

 private:
  friend class JsonParser;
  Type type_ = Type::kNull;
  bool bool_ = false;
  double number_ = 0;
  bool integral_ = false;
  int64_t int_ = 0;
  std::string string_;
  std::vector<Json> array_;
  std::vector<std::pair<std::string, Json>> object_;
};

const char* json_type_name(Json::Type t);

}  // namespace flashpage::model
