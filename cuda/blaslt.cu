// cuBLASLt through dlopen (see blaslt.h). The few types, constants and entry points used are
// declared here from cuBLASLt's documented C ABI (stable within a major version, append-only
// across them), so the build needs no cuBLAS headers; where cublasLt.h is on the include path
// the declarations are checked against it at compile time.
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "abi.h"
#include "blaslt.h"

namespace flashpage::cuda {

namespace lt {

using Status = int;  // cublasStatus_t
using Handle = struct Context*;
using MatmulDesc = void*;
using Layout = void*;
using Preference = void*;
struct Algo {
  uint64_t data[8];
};
struct HeuristicResult {
  Algo algo;
  size_t workspace_size;
  Status state;
  float waves_count;
  int reserved[4];
};

constexpr Status kSuccess = 0;
constexpr int kCompute32F = 68, kCompute32I = 72;  // CUBLAS_COMPUTE_32F, _32I
constexpr int kOpN = 0, kOpT = 1;
// cublasLtMatmulDescAttributes_t
constexpr int kDescTransA = 3, kDescTransB = 4, kDescAScalePointer = 17, kDescBScalePointer = 18,
              kDescFastAccum = 25, kDescAScaleMode = 31, kDescBScaleMode = 32;
constexpr int kScaleOuterVec32F = 3;  // CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F
constexpr int kPrefMaxWorkspaceBytes = 1;

struct Api {
  void* lib = nullptr;
  std::string error;  // why it could not be loaded
  Status (*create)(Handle*) = nullptr;
  Status (*desc_create)(MatmulDesc*, int compute, cudaDataType_t scale) = nullptr;
  Status (*desc_destroy)(MatmulDesc) = nullptr;
  Status (*desc_set)(MatmulDesc, int attr, const void* buf, size_t size) = nullptr;
  Status (*layout_create)(Layout*, cudaDataType_t, uint64_t rows, uint64_t cols, int64_t ld) = nullptr;
  Status (*layout_destroy)(Layout) = nullptr;
  Status (*pref_create)(Preference*) = nullptr;
  Status (*pref_destroy)(Preference) = nullptr;
  Status (*pref_set)(Preference, int attr, const void* buf, size_t size) = nullptr;
  Status (*heuristic)(Handle, MatmulDesc, Layout, Layout, Layout, Layout, Preference, int requested,
                      HeuristicResult* results, int* returned) = nullptr;
  Status (*matmul)(Handle, MatmulDesc, const void* alpha, const void* A, Layout, const void* B, Layout,
                   const void* beta, const void* C, Layout, void* D, Layout, const Algo*, void* workspace,
                   size_t workspace_size, cudaStream_t) = nullptr;
  const char* (*status_name)(Status) = nullptr;
};

template <typename F>
bool bind(void* lib, const char* name, F& fn, std::string& error) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  if (fn == nullptr) error = std::string("cuBLASLt has no symbol ") + name;
  return fn != nullptr;
}

const Api& api() {
  static const Api loaded = [] {
    Api a;
    const char* env = std::getenv("FLASHPAGE_CUBLASLT");
    const char* names[] = {env, "libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"};
    for (const char* name : names) {
      if (name == nullptr || *name == '\0') continue;
      a.lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (a.lib != nullptr) break;
      const char* why = dlerror();
      a.error += std::string(a.error.empty() ? "" : "; ") + (why != nullptr ? why : name);
    }
    if (a.lib == nullptr) {
      a.error = "cuBLASLt could not be loaded (" + a.error + "); set FLASHPAGE_CUBLASLT to libcublasLt.so's path";
      return a;
    }
    a.error.clear();
    const bool ok = bind(a.lib, "cublasLtCreate", a.create, a.error) &&
                    bind(a.lib, "cublasLtMatmulDescCreate", a.desc_create, a.error) &&
                    bind(a.lib, "cublasLtMatmulDescDestroy", a.desc_destroy, a.error) &&
                    bind(a.lib, "cublasLtMatmulDescSetAttribute", a.desc_set, a.error) &&
                    bind(a.lib, "cublasLtMatrixLayoutCreate", a.layout_create, a.error) &&
                    bind(a.lib, "cublasLtMatrixLayoutDestroy", a.layout_destroy, a.error) &&
                    bind(a.lib, "cublasLtMatmulPreferenceCreate", a.pref_create, a.error) &&
                    bind(a.lib, "cublasLtMatmulPreferenceDestroy", a.pref_destroy, a.error) &&
                    bind(a.lib, "cublasLtMatmulPreferenceSetAttribute", a.pref_set, a.error) &&
                    bind(a.lib, "cublasLtMatmulAlgoGetHeuristic", a.heuristic, a.error) &&
                    bind(a.lib, "cublasLtMatmul", a.matmul, a.error) &&
                    bind(a.lib, "cublasLtGetStatusName", a.status_name, a.error);
    if (!ok) a.lib = nullptr;  // kept mapped: a partially bound library is never called
    return a;
  }();
  return loaded;
}

}  // namespace lt

#if __has_include(<cublasLt.h>)
#include <cublasLt.h>
static_assert(lt::kCompute32F == CUBLAS_COMPUTE_32F && lt::kCompute32I == CUBLAS_COMPUTE_32I &&
              lt::kOpT == CUBLAS_OP_T);
static_assert(lt::kDescTransA == CUBLASLT_MATMUL_DESC_TRANSA && lt::kDescTransB == CUBLASLT_MATMUL_DESC_TRANSB);
static_assert(lt::kDescAScalePointer == CUBLASLT_MATMUL_DESC_A_SCALE_POINTER &&
              lt::kDescBScalePointer == CUBLASLT_MATMUL_DESC_B_SCALE_POINTER);
static_assert(lt::kDescFastAccum == CUBLASLT_MATMUL_DESC_FAST_ACCUM);
static_assert(lt::kDescAScaleMode == CUBLASLT_MATMUL_DESC_A_SCALE_MODE &&
              lt::kDescBScaleMode == CUBLASLT_MATMUL_DESC_B_SCALE_MODE);
static_assert(lt::kScaleOuterVec32F == CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F);
static_assert(lt::kPrefMaxWorkspaceBytes == CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES);
static_assert(sizeof(lt::Algo) == sizeof(cublasLtMatmulAlgo_t) &&
              sizeof(lt::HeuristicResult) == sizeof(cublasLtMatmulHeuristicResult_t));
#endif

namespace {

constexpr size_t kWorkspaceBytes = size_t(32) << 20;  // what cuBLAS recommends on Hopper

// One GEMM shape's descriptors and chosen algorithm, made on first use and kept.
struct Plan {
  lt::MatmulDesc desc = nullptr;
  lt::Layout a = nullptr, b = nullptr, d = nullptr;
  lt::Algo algo{};
  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    const lt::Api& api = lt::api();
    if (desc != nullptr) api.desc_destroy(desc);
    for (lt::Layout l : {a, b, d})
      if (l != nullptr) api.layout_destroy(l);
  }
};

using PlanKey = std::tuple<int, int, int, int, int, int, int, bool>;  // device, input, out, M, N, K, ldo, fast

// The process's cuBLASLt state: a handle per device, a workspace per stream, the plans. Kept for
// the process's life (the handles are never destroyed, as torch does).
struct State {
  std::mutex mu;
  std::map<int, lt::Handle> handles;
  std::map<std::pair<int, cudaStream_t>, void*> workspaces;
  std::map<PlanKey, Plan> plans;
};

State& state() {
  static State s;
  return s;
}

int lt_fail(lt::Status s, const char* what, char* err, size_t err_len) {
  if (err != nullptr && err_len > 0)
    std::snprintf(err, err_len, "cuBLASLt %s failed: %s (%d)", what, lt::api().status_name(s), s);
  return -1;
}

#define LT_CHECK(call, what)                                             \
  do {                                                                   \
    const lt::Status s_ = (call);                                        \
    if (s_ != lt::kSuccess) return lt_fail(s_, what, err, err_len);      \
  } while (0)

cudaDataType_t input_type(flashpage::cuda::GemmInput t) {
  switch (t) {
    case flashpage::cuda::GemmInput::kFloat16: return CUDA_R_16F;
    case flashpage::cuda::GemmInput::kBFloat16: return CUDA_R_16BF;
    case flashpage::cuda::GemmInput::kInt8: return CUDA_R_8I;
    default: return CUDA_R_8F_E4M3;
  }
}

}  // namespace

bool lt_available(char* why, size_t why_len) {
  const lt::Api& api = lt::api();
  if (api.lib == nullptr && why != nullptr && why_len > 0) std::snprintf(why, why_len, "%s", api.error.c_str());
  return api.lib != nullptr;
}

namespace {

// Builds the plan of p (cuBLAS is column-major: out^T [N, M] = w [N, K] . x^T, i.e. A = w
// transposed ("T"), B = x ("N") -- the TN form FP8 needs on Hopper).
int make_plan(const LtGemmParams& p, lt::Handle handle, Plan& plan, char* err, size_t err_len) {
  const lt::Api& api = lt::api();
  const bool fp8 = p.input == GemmInput::kFp8E4M3, int8 = p.input == GemmInput::kInt8;
  const cudaDataType_t in = input_type(p.input);
  const cudaDataType_t out = int8 ? CUDA_R_32I : p.out_dtype == DType::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
  LT_CHECK(api.desc_create(&plan.desc, int8 ? lt::kCompute32I : lt::kCompute32F, int8 ? CUDA_R_32I : CUDA_R_32F),
           "MatmulDescCreate");
  const int32_t ta = lt::kOpT, tb = lt::kOpN;
  LT_CHECK(api.desc_set(plan.desc, lt::kDescTransA, &ta, sizeof ta), "set TRANSA");
  LT_CHECK(api.desc_set(plan.desc, lt::kDescTransB, &tb, sizeof tb), "set TRANSB");
  if (fp8) {
    const int32_t mode = lt::kScaleOuterVec32F;
    const int8_t fast = p.fast_accum ? 1 : 0;
    LT_CHECK(api.desc_set(plan.desc, lt::kDescAScaleMode, &mode, sizeof mode), "set A_SCALE_MODE (outer vector)");
    LT_CHECK(api.desc_set(plan.desc, lt::kDescBScaleMode, &mode, sizeof mode), "set B_SCALE_MODE (outer vector)");
    LT_CHECK(api.desc_set(plan.desc, lt::kDescFastAccum, &fast, sizeof fast), "set FAST_ACCUM");
    // The heuristic wants the scale pointers set; the real ones are set per call.
    LT_CHECK(api.desc_set(plan.desc, lt::kDescAScalePointer, &p.w_scales, sizeof(void*)), "set A_SCALE_POINTER");
    LT_CHECK(api.desc_set(plan.desc, lt::kDescBScalePointer, &p.x_scales, sizeof(void*)), "set B_SCALE_POINTER");
  }
  LT_CHECK(api.layout_create(&plan.a, in, p.K, p.N, p.K), "MatrixLayoutCreate (w)");
  LT_CHECK(api.layout_create(&plan.b, in, p.K, p.M, p.K), "MatrixLayoutCreate (x)");
  LT_CHECK(api.layout_create(&plan.d, out, p.N, p.M, p.ldo), "MatrixLayoutCreate (out)");
  lt::Preference pref = nullptr;
  LT_CHECK(api.pref_create(&pref), "MatmulPreferenceCreate");
  const uint64_t ws = kWorkspaceBytes;
  lt::HeuristicResult result{};
  int found = 0;
  lt::Status s = api.pref_set(pref, lt::kPrefMaxWorkspaceBytes, &ws, sizeof ws);
  if (s == lt::kSuccess) s = api.heuristic(handle, plan.desc, plan.a, plan.b, plan.d, plan.d, pref, 1, &result, &found);
  api.pref_destroy(pref);
  if (s != lt::kSuccess || found == 0) {
    if (err != nullptr && err_len > 0)
      std::snprintf(err, err_len,
                    "cuBLASLt has no algorithm for a %s GEMM of M=%d N=%d K=%d on this device (%s)%s",
                    fp8 ? "fp8 e4m3 (per-token x per-channel scales)" : int8 ? "int8" : "16-bit", p.M, p.N,
                    p.K,
                    s != lt::kSuccess ? api.status_name(s) : "none returned",
                    fp8 ? "; FP8 needs sm_89+ and outer-vector scales need cuBLAS 12.9+" : "");
    return -1;
  }
  plan.algo = result.algo;
  return 0;
}

}  // namespace

int lt_gemm(const LtGemmParams& p, cudaStream_t stream, char* err, size_t err_len) {
  const lt::Api& api = lt::api();
  if (api.lib == nullptr) return invalid(api.error.c_str(), err, err_len);
  if (p.M < 0 || p.N < 0 || p.K <= 0 || p.ldo < p.N)
    return invalid("lt_gemm: bad shape (M, N >= 0, K > 0, ldo >= N)", err, err_len);
  const bool fp8 = p.input == GemmInput::kFp8E4M3, int8 = p.input == GemmInput::kInt8;
  if (fp8 && (p.K % 16 != 0 || p.x_scales == nullptr || p.w_scales == nullptr))
    return invalid("lt_gemm: fp8 needs K % 16 == 0 and both scale vectors", err, err_len);
  if (int8 && p.K % 4 != 0) return invalid("lt_gemm: int8 needs K % 4 == 0", err, err_len);
  if (p.M == 0 || p.N == 0) return 0;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return invalid("lt_gemm: cudaGetDevice failed", err, err_len);

  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);  // plans' scale pointers and the workspaces are shared
  lt::Handle& handle = st.handles[device];
  if (handle == nullptr) LT_CHECK(api.create(&handle), "Create");
  void*& workspace = st.workspaces[{device, stream}];
  if (workspace == nullptr) {
    const cudaError_t e = cudaMalloc(&workspace, kWorkspaceBytes);
    if (e != cudaSuccess) {
      workspace = nullptr;
      return report(e, "cuBLASLt workspace: cudaMalloc", err, err_len);
    }
  }
  const PlanKey key{device, int(p.input), int(p.out_dtype), p.M, p.N, p.K, p.ldo, fp8 && p.fast_accum};
  auto it = st.plans.find(key);
  if (it == st.plans.end()) {
    it = st.plans.try_emplace(key).first;
    if (make_plan(p, handle, it->second, err, err_len) != 0) {
      st.plans.erase(it);
      return -1;
    }
  }
  Plan& plan = it->second;
  if (fp8) {
    LT_CHECK(api.desc_set(plan.desc, lt::kDescAScalePointer, &p.w_scales, sizeof(void*)), "set A_SCALE_POINTER");
    LT_CHECK(api.desc_set(plan.desc, lt::kDescBScalePointer, &p.x_scales, sizeof(void*)), "set B_SCALE_POINTER");
  }
  const float alpha = 1.f, beta = 0.f;  // int8: alpha and beta are int32 1 and 0
  const int32_t ialpha = 1, ibeta = 0;
  const void* a_ptr = int8 ? static_cast<const void*>(&ialpha) : &alpha;
  const void* b_ptr = int8 ? static_cast<const void*>(&ibeta) : &beta;
  LT_CHECK(api.matmul(handle, plan.desc, a_ptr, p.w, plan.a, p.x, plan.b, b_ptr, p.out, plan.d, p.out, plan.d,
                      &plan.algo, workspace, kWorkspaceBytes, stream),
           "Matmul");
  return 0;
}

}  // namespace flashpage::cuda
