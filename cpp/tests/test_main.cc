#include <cstring>
#include <exception>

#include "test_util.h"

namespace fptest {
std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}
int failures = 0;
}  // namespace fptest

int main(int argc, char** argv) {
  const char* filter = argc > 1 ? argv[1] : nullptr;
  int passed = 0, failed = 0;
  for (const auto& c : fptest::registry()) {
    if (filter && std::strstr(c.name, filter) == nullptr) continue;
    const int before = fptest::failures;
    try {
      c.fn();
    } catch (const fptest::Failure&) {
    } catch (const std::exception& e) {
      fptest::report(__FILE__, __LINE__, std::string("unexpected exception: ") + e.what());
    }
    const bool ok = fptest::failures == before;
    std::printf("%s %s\n", ok ? "PASS" : "FAIL", c.name);
    (ok ? passed : failed)++;
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 && passed > 0 ? 0 : 1;
}
