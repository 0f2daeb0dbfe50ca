// A minimal test harness (no external framework): TEST registers a function, CHECK records a
// failure with file and line and keeps going, REQUIRE stops the test.
#pragma once

#include <cstdio>
#include <functional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace fptest {

struct Case {
  const char* name;
  std::function<void()> fn;
};
std::vector<Case>& registry();
struct Failure {};
extern int failures;

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().push_back({name, std::move(fn)}); }
};

template <class T>
auto show(const T& v) {
  if constexpr (std::is_enum_v<T>) return static_cast<long long>(v);
  else return v;
}

inline void report(const char* file, int line, const std::string& what) {
  ++failures;
  std::fprintf(stderr, "  %s:%d: %s\n", file, line, what.c_str());
}

}  // namespace fptest

#define FP_CAT2(a, b) a##b
#define FP_CAT(a, b) FP_CAT2(a, b)
#define TEST(name)                                                        \
  static void name();                                                     \
  static fptest::Register FP_CAT(reg_, name)(#name, name);                \
  static void name()

#define CHECK(cond) \
  do { if (!(cond)) fptest::report(__FILE__, __LINE__, "CHECK(" #cond ") failed"); } while (0)
#define REQUIRE(cond)                                                           \
  do {                                                                          \
    if (!(cond)) {                                                              \
      fptest::report(__FILE__, __LINE__, "REQUIRE(" #cond ") failed");          \
      throw fptest::Failure{};                                                  \
    }                                                                           \
  } while (0)
#define CHECK_EQ(a, b)                                                                   \
  do {                                                                                   \
    const auto& va_ = (a);                                                               \
    const auto& vb_ = (b);                                                               \
    if (!(va_ == vb_)) {                                                                 \
      std::ostringstream os_;                                                            \
      os_ << "CHECK_EQ(" #a ", " #b ") failed: " << fptest::show(va_) << " != " << fptest::show(vb_);                \
      fptest::report(__FILE__, __LINE__, os_.str());                                     \
    }                                                                                    \
  } while (0)
// Checks that `expr` throws `type` whose message contains `needle`.
#define CHECK_THROWS(type, expr, needle)                                                  \
  do {                                                                                    \
    bool thrown_ = false;                                                                 \
    try { (void)(expr); } catch (const type& e_) {                                       \
      thrown_ = true;                                                                     \
      if (std::string(e_.what()).find(needle) == std::string::npos)                       \
        fptest::report(__FILE__, __LINE__, std::string("message lacks '") + needle +      \
                                               "': " + e_.what());                        \
    }                                                                                     \
    if (!thrown_) fptest::report(__FILE__, __LINE__, #expr " did not throw " #type);      \
  } while (0)
