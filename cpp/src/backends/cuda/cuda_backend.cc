#include "backends/cuda/cuda_backend.h"

#include <algorithm>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/cpu/kernels.h"
#include "runtime/cuda_loader.h"

namespace flashpage::backends {
namespace {

constexpr int kBf16 = 1;  // the ABI's dtype code

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {
    const runtime::CudaProbe& probe = runtime::cuda_probe();
    if (!probe.available) throw std::runtime_error("device='cuda': the CUDA backend is not available: " + probe.reason);
    ops_ = probe.ops;
    if (ops_->size < offsetof(flashpage_cuda_ops, attention_supported) + sizeof(ops_->attention_supported))
      throw std::runtime_error("device='cuda': " + probe.library_path +
                               " predates the CUDA executor (its ABI table lacks the executor's entries)");
    if (device < 0 || device >= probe.device_count)
      throw std::runtime_error("device='cuda:" + std::to_string(device) + "': there are " +
                               std::to_string(probe.device_count) + " CUDA devices");
    check(ops_->set_device(device, err_, sizeof err_), "set_device");
    check(ops_->num_sms(device, &num_sms_, err_, sizeof err_), "num_sms");
    void* s = nullptr;
    check(ops_->stream_create(&s, err_, sizeof err_), "stream_create");
    stream_ = s;
    caps_.device = DeviceType::kCuda;
    caps_.device_id = device;
    caps_.batch_invariant = false;  // cuBLASLt picks its algorithm (and split) by M
    caps_.graphs = ops_->size >= offsetof(flashpage_cuda_ops, graph_destroy) + sizeof(ops_->graph_destroy);
    caps_.activation_bytes = 2;
    caps_.kv_bytes = 2;
    caps_.compute_dtype = "bfloat16";
    name_ = "cuda:" + std::to_string(device) + " " + probe.device_names[size_t(device)];
  }
  ~CudaBackend() override {
    if (stream_) {
      ops_->stream_synchronize(stream_, err_, sizeof err_);
      ops_->stream_destroy(stream_, err_, sizeof err_);
    }
  }

  std::string name() const override { return name_; }
  const Capabilities& capabilities() const override { return caps_; }

  DeviceBuffer allocate(size_t bytes) override {
    void* p = nullptr;
    check(ops_->device_malloc(&p, bytes, err_, sizeof err_), ("allocating " + std::to_string(bytes) + " bytes").c_str());
    const flashpage_cuda_ops* ops = ops_;
    return {p, bytes, std::shared_ptr<void>(p, [ops](void* q) {
              char e[256];
              if (q) ops->device_free(q, e, sizeof e);
            })};
  }
  DeviceBuffer allocate_kv_cache(int64_t regions, size_t region_bytes, size_t) override {
    return allocate(size_t(regions) * region_bytes);
  }
  int64_t kv_cache_budget(double fraction) const override {
    // vLLM's gpu_memory_utilization: this process may use `fraction` of the device; the pool
    // gets what of that is not in use yet (weights, workspace, the CUDA context).
    if (!(fraction > 0.0 && fraction <= 1.0))
      throw std::invalid_argument("gpu_memory_utilization must be in (0, 1], got " + std::to_string(fraction));
    size_t free_bytes = 0, total = 0;
    char e[256];
    if (ops_->mem_info(&free_bytes, &total, e, sizeof e) != 0) throw std::runtime_error(std::string("mem_info: ") + e);
    const double used = double(total - free_bytes);
    return std::max<int64_t>(0, int64_t(double(total) * fraction - used));
  }
  void copy_to_device(void* dst, const void* src, size_t bytes) override { copy(dst, src, bytes); }
  void copy_to_host(void* dst, const void* src, size_t bytes) override { copy(dst, src, bytes); }

  Matrix load_linear(const Matrix& w, DeviceBuffer& storage) override {
    if (w.int8)
      throw std::runtime_error("the CUDA backend does not run int8 (GGUF-quantized) weights yet: load the model "
                               "with quantization=\"none\" (dequantized to bf16)");
    storage = upload_bf16(w.data, w.bf16, size_t(w.rows * w.cols));
    return {storage.data, true, w.rows, w.cols, true};
  }
  Matrix load_embedding(const Matrix& w, DeviceBuffer& storage) override {
    return load_linear(w, storage);
  }
  const void* load_vector(std::span<const float> v, DeviceBuffer& storage) override {
    storage = upload_bf16(v.data(), false, v.size());
    return storage.data;
  }

  void reserve(int64_t, int64_t) override {}
  void check_attention(const AttentionShape& sh) const override {
    // The prefill kernel runs every step that is not all decodes: a model needs it.
    if (!(supported(sh) & 2))
      throw std::runtime_error("CUDA attention does not support head_dim " + std::to_string(sh.head_dim) +
                               ", block_size " + std::to_string(sh.block_size) + ", " +
                               std::to_string(sh.num_q_heads) + " query heads over " +
                               std::to_string(sh.num_kv_heads) + " KV heads");
  }
  void plan_attention(const AttentionStep& st, const AttentionShape& sh) override {
    const int sup = supported(sh);
    if (!(sup & 2)) check_attention(sh);  // throws, naming the shape
    step_ = st;
    shape_ = sh;
    // Decode rows (one query token) lead a step: the scheduler schedules them before prefill
    // chunks. They run through the split-KV decode kernel and the rest through the prefill
    // kernel, which would read each decode's whole context once per query head and fill a
    // 64-row tile with one row.
    num_decodes_ = 0;
    decode_max_context_ = 0;
    if (sup & 1) {
      const std::span<const int32_t> qsl = st.host_query_start_loc, ctx = st.host_context_lens;
      if (st.max_query_len == 1) {
        num_decodes_ = st.num_seqs;
        decode_max_context_ = st.max_context_len;
      } else if (qsl.size() > size_t(st.num_seqs) && ctx.size() >= size_t(st.num_seqs)) {
        while (num_decodes_ < st.num_seqs && qsl[size_t(num_decodes_) + 1] - qsl[size_t(num_decodes_)] == 1)
          decode_max_context_ = std::max<int64_t>(decode_max_context_, ctx[size_t(num_decodes_++)]);
      }
    }
    if (num_decodes_ > 0) {
      const int64_t floats = ops_->paged_decode_workspace(int(num_decodes_), int(sh.num_q_heads), int(sh.num_kv_heads),
                                                          int(sh.head_dim), int(sh.block_size),
                                                          int(decode_max_context_), num_sms_, 0);
      if (size_t(floats) * 4 > decode_ws_.size) grow(decode_ws_, size_t(floats) * 4);
    }
  }
  void finish_step() override { check(ops_->stream_synchronize(stream_, err_, sizeof err_), "stream_synchronize"); }
  void begin_capture() override { check(ops_->graph_begin(stream_, err_, sizeof err_), "graph_begin"); }
  std::shared_ptr<void> end_capture() override {
    void* g = nullptr;
    check(ops_->graph_end(stream_, &g, err_, sizeof err_), "graph_end");
    const flashpage_cuda_ops* ops = ops_;
    return std::shared_ptr<void>(g, [ops](void* q) {
      char e[256];
      if (q) ops->graph_destroy(q, e, sizeof e);
    });
  }
  void replay(const void* graph) override {
    check(ops_->graph_launch(const_cast<void*>(graph), stream_, err_, sizeof err_), "graph_launch");
  }

  void embed(void* out, const Matrix& table, const int32_t* ids, int64_t tokens) override {
    check(ops_->gather_rows(table.data, ids, out, int(tokens), table.cols * 2, stream_, err_, sizeof err_), "embed");
  }
  void rms_norm(void* out, const void* x, void* residual, const void* w, int64_t rows, int64_t dim,
                float eps) override {
    check(ops_->fused_add_rms_norm(kBf16, out, x, residual, w, int(rows), int(dim), eps, stream_, err_, sizeof err_),
          "rms_norm");
  }
  LinearInput rms_norm_input(void* out, const void* x, void* residual, const void* w, int64_t rows, int64_t dim,
                             float eps) override {
    rms_norm(out, x, residual, w, rows, dim, eps);
    return {out, rows, dim, out};
  }
  LinearInput silu_and_mul_input(void* out, const void* gate_up, int64_t rows, int64_t inter) override {
    check(ops_->silu_and_mul(kBf16, out, gate_up, int(rows), int(inter), stream_, err_, sizeof err_), "silu_and_mul");
    return {out, rows, inter, out};
  }
  LinearInput linear_input(const void* x, int64_t rows, int64_t cols) override { return {x, rows, cols, x}; }
  void linears(const LinearInput& x, std::span<const LinearJob> jobs) override {
    for (const LinearJob& j : jobs)
      check(ops_->linear(kBf16, x.data, j.w->data, j.bias, j.y, int(x.rows), int(j.w->rows), int(x.cols), int(j.ldy),
                         stream_, err_, sizeof err_),
            "linear");
  }
  void logits(float* out, const LinearInput& x, const Matrix& w) override {
    const size_t bytes = size_t(x.rows * w.rows) * 2;
    if (bytes > logits16_.size) grow(logits16_, bytes);  // to the largest step, once
    const LinearJob job{logits16_.data, w.rows, &w, nullptr};
    linears(x, {&job, 1});
    check(ops_->widen_to_float(kBf16, logits16_.data, out, x.rows * w.rows, stream_, err_, sizeof err_), "logits");
  }
  void rotary(void* q, void* k, const int32_t* positions, const float* cos_sin, int64_t tokens, int64_t nq,
              int64_t nkv, int64_t D) override {
    check(ops_->rotary_embedding(kBf16, q, k, positions, cos_sin, int(tokens), int(nq), int(nkv), int(D), stream_, err_,
                                 sizeof err_),
          "rotary");
  }
  void write_kv(const void* k, const void* v, void* kc, void* vc, const int32_t* slots, int64_t tokens, int64_t nkv,
                int64_t D, int64_t block_size) override {
    check(ops_->reshape_and_cache(kBf16, k, v, kc, vc, slots, int(tokens), int(nkv), int(D), int(block_size), stream_,
                                  err_, sizeof err_),
          "write_kv");
  }
  void copy_blocks(std::span<void* const> caches, size_t block_bytes, std::span<const BlockCopy> copies) override {
    for (const BlockCopy& c : copies)
      for (void* cache : caches) {
        char* base = static_cast<char*>(cache);
        check(ops_->memcpy_async(base + size_t(c.dst) * block_bytes, base + size_t(c.src) * block_bytes, block_bytes,
                                 stream_, err_, sizeof err_),
              "copy_blocks");
      }
  }
  void paged_attention(void* out, const void* q, const void* kc, const void* vc) override {
    const AttentionStep& st = step_;
    const AttentionShape& sh = shape_;
    if (num_decodes_ > 0)
      check(ops_->paged_decode(kBf16, q, kc, vc, st.block_tables, st.context_lens, out,
                               static_cast<float*>(decode_ws_.data), int(num_decodes_), int(sh.num_q_heads),
                               int(sh.num_kv_heads), int(sh.head_dim), int(sh.block_size), int(st.block_table_stride),
                               int(decode_max_context_), num_sms_, sh.scale, 0, stream_, err_, sizeof err_),
            "paged_decode");
    if (num_decodes_ == st.num_seqs) return;
    // The rest: query_start_loc holds absolute rows, so q and out stay as they are.
    const int64_t d = num_decodes_;
    check(ops_->paged_prefill(kBf16, q, kc, vc, st.block_tables + d * st.block_table_stride, st.query_start_loc + d,
                              st.context_lens + d, out, int(st.num_seqs - d), int(sh.num_q_heads),
                              int(sh.num_kv_heads), int(sh.head_dim), int(sh.block_size), int(st.block_table_stride),
                              int(st.max_query_len), sh.scale, stream_, err_, sizeof err_),
          "paged_prefill");
  }
  void gather_rows(void* out, const void* x, const int32_t* indices, int64_t n, int64_t dim) override {
    check(ops_->gather_rows(x, indices, out, int(n), dim * 2, stream_, err_, sizeof err_), "gather_rows");
  }

 private:
  // Scratch grows, rarely; the old piece stays allocated, since a captured graph may point into it.
  void grow(DeviceBuffer& b, size_t bytes) {
    if (b.data) retired_.push_back(std::move(b));
    b = allocate(bytes);
  }
  // Bit 0: the decode kernel takes this shape; bit 1: the prefill kernel does.
  int supported(const AttentionShape& sh) const {
    return ops_->attention_supported(int(sh.head_dim), int(sh.block_size), int(sh.num_q_heads), int(sh.num_kv_heads));
  }
  void check(int rc, const char* what) {
    if (rc != 0) throw std::runtime_error(std::string("CUDA ") + what + ": " + err_);
  }
  // Synchronous: the caller may reuse (or free) its host memory as soon as this returns.
  void copy(void* dst, const void* src, size_t bytes) {
    check(ops_->memcpy_async(dst, src, bytes, stream_, err_, sizeof err_), "copy");
    finish_step();
  }
  // Host values (fp32, or bf16 as raw uint16) as bf16 on the device, in chunks through a pinned
  // staging buffer (converted on the host as they go).
  DeviceBuffer upload_bf16(const void* src, bool src_bf16, size_t n) {
    DeviceBuffer dst = allocate(std::max<size_t>(n, 1) * 2);
    constexpr size_t kChunk = size_t(1) << 23;  // values per transfer (16 MiB)
    if (!staging_) {
      void* p = nullptr;
      check(ops_->host_malloc(&p, kChunk * 2, err_, sizeof err_), "pinned staging");
      const flashpage_cuda_ops* ops = ops_;
      staging_ = std::shared_ptr<void>(p, [ops](void* q) {
        char e[256];
        if (q) ops->host_free(q, e, sizeof e);
      });
    }
    auto* stage = static_cast<uint16_t*>(staging_.get());
    for (size_t i = 0; i < n; i += kChunk) {
      const size_t m = std::min(kChunk, n - i);
      if (src_bf16) std::copy_n(static_cast<const uint16_t*>(src) + i, m, stage);
      else
        for (size_t j = 0; j < m; ++j) stage[j] = cpu::bf16_round(static_cast<const float*>(src)[i + j]);
      copy(static_cast<uint16_t*>(dst.data) + i, stage, m * 2);
    }
    return dst;
  }

  int device_;
  const flashpage_cuda_ops* ops_ = nullptr;
  void* stream_ = nullptr;
  int num_sms_ = 0;
  std::string name_;
  Capabilities caps_;
  char err_[512] = {};
  std::shared_ptr<void> staging_;
  DeviceBuffer decode_ws_, logits16_;
  std::vector<DeviceBuffer> retired_;
  AttentionStep step_;
  AttentionShape shape_{};
  int64_t num_decodes_ = 0, decode_max_context_ = 0;  // the step's leading decode rows
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device) { return std::make_unique<CudaBackend>(device); }

}  // namespace flashpage::backends
