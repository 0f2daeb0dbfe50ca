// The seam between the model and the hardware (DESIGN.md, "backends"): device memory, weights
// in the backend's layout, and the ops one Llama-family forward pass needs. The model
// (model/llama.cc) is written once against this interface; the model runner
// (engine/model_runner.cc) owns the memory; backends/cpu and backends/cuda implement it.
//
// Learned from ggml's backend interface (buffers, a device, what it supports) and vLLM v1's
// split of model runner and attention backends; kept to what the forward pass calls.
//
// Pointers passed to ops are device pointers (for the CPU backend, host memory). Activations
// between ops are capabilities().activation_bytes wide (fp32 on the CPU, 16-bit on a GPU); the
// logits are always fp32. Ops are issued in order; finish_step() waits for them.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>

#include "flashpage/scheduler.h"
#include "backends/matrix.h"

namespace flashpage::backends {

// Memory of a backend (RAII: the owner frees it when the last reference goes).
struct DeviceBuffer {
  void* data = nullptr;
  size_t size = 0;
  std::shared_ptr<void> owner;
};

// DLPack's device types, so that logits can be handed to torch as they are.
enum class DeviceType : int32_t { kCpu = 1, kCuda = 2 };

struct Capabilities {
  DeviceType device = DeviceType::kCpu;
  int32_t device_id = 0;
  // A row's results are bitwise the same whatever else is in the batch (fixed reduction order).
  bool batch_invariant = false;
  // Decode steps can be captured and replayed (CUDA graphs): needs fixed buffer addresses.
  bool graphs = false;
  int64_t activation_bytes = 4;  // element size of activations between ops
  int64_t kv_bytes = 4;          // element size of the KV cache
  std::string compute_dtype;     // inputs of the Linear and attention kernels: "float32" / "bfloat16"
};

// An activation as the Linears take it (the CPU's bf16 kernels want it rounded and tiled), and
// as it was written (what int8 Linears quantize).
struct LinearInput {
  const void* data = nullptr;
  int64_t rows = 0, cols = 0;
  const void* source = nullptr;
};

// y[:, 0:w.rows] = x . w^T (+ bias); y has row stride ldy (it may point into a wider buffer).
struct LinearJob {
  void* y;
  int64_t ldy;
  const Matrix* w;
  const void* bias;  // from load_vector; nullptr: none
};

struct AttentionShape {
  int64_t num_q_heads, num_kv_heads, head_dim, block_size;
  float scale;
};

// One step's attention metadata: device arrays for the kernels and their host copies (the
// backend plans the step's work from them once, for every layer).
struct AttentionStep {
  const int32_t* block_tables;  // [num_seqs, block_table_stride]
  int64_t block_table_stride;
  const int32_t* query_start_loc;  // [num_seqs + 1]
  const int32_t* context_lens;     // [num_seqs]
  std::span<const int32_t> host_query_start_loc, host_context_lens;
  int64_t num_seqs = 0, num_tokens = 0, max_query_len = 0, max_context_len = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;  // e.g. "cpu:avx512_bf16", "cuda:0"
  virtual const Capabilities& capabilities() const = 0;

  // --- memory
  virtual DeviceBuffer allocate(size_t bytes) = 0;  // zero-filled
  // The KV pool: `regions` (layers x K, V) of region_bytes, each blocks of block_bytes; blocks
  // are handed out lowest first, so a backend may make the first ones ready (fault them in).
  virtual DeviceBuffer allocate_kv_cache(int64_t regions, size_t region_bytes, size_t block_bytes) = 0;
  // Bytes the KV pool may take, given the user's fraction: on the CPU that fraction of the memory
  // the OS reports available; on a GPU vLLM's gpu_memory_utilization (that fraction of the
  // device's memory, less what is in use: weights, workspace). Call it after loading both.
  virtual int64_t kv_cache_budget(double fraction) const = 0;
  virtual void copy_to_device(void* dst, const void* src, size_t bytes) = 0;
  virtual void copy_to_host(void* dst, const void* src, size_t bytes) = 0;

  // --- weights: a host matrix (as loaded: fp32, bf16 as raw uint16, or int8 blocks: see
  // Matrix) in the backend's memory and layout; `storage` receives what the result
  // points into (empty: it points into the host matrix, which must then outlive it). Throws
  // std::runtime_error for a format the backend cannot run.
  virtual Matrix load_linear(const Matrix& w, DeviceBuffer& storage) = 0;
  virtual Matrix load_embedding(const Matrix& w, DeviceBuffer& storage) = 0;
  // A vector of parameters (norm weights, biases) in the backend's format for them.
  virtual const void* load_vector(std::span<const float> v, DeviceBuffer& storage) = 0;

  // --- a step
  // Scratch for steps of up to `tokens` rows of Linear inputs of up to `cols` values; called
  // once at start-up (and again only for a larger step), so that steps allocate nothing.
  virtual void reserve(int64_t tokens, int64_t cols) = 0;
  // Throws std::runtime_error, naming the shape, where the backend's attention cannot run a
  // model's heads (called once at load, so that such a model fails then, not at its first step).
  virtual void check_attention(const AttentionShape&) const {}
  virtual void plan_attention(const AttentionStep& step, const AttentionShape& shape) = 0;
  virtual void finish_step() = 0;  // waits for the step's ops; lets worker threads rest

  // --- graphs (capabilities().graphs): the ops issued between begin_capture and end_capture
  // are recorded, not run; replay runs them again, reading whatever the same buffers then hold.
  // The graph (end_capture's, freed with it) holds the addresses it was captured with: every
  // buffer it touches must stay where it was.
  virtual void begin_capture() { throw std::logic_error(name() + " has no graphs"); }
  virtual std::shared_ptr<void> end_capture() { throw std::logic_error(name() + " has no graphs"); }
  virtual void replay(const void* /*graph*/) { throw std::logic_error(name() + " has no graphs"); }

  // --- ops (rows of `dim` activations unless said otherwise)
  // out[t] = table[ids[t]] (ids already checked against the vocabulary).
  virtual void embed(void* out, const Matrix& table, const int32_t* ids, int64_t tokens) = 0;
  // RMSNorm over rows, fused with the residual add when residual is non-null:
  // residual += x; out = residual * rsqrt(mean(residual^2) + eps) * weight. out may be x;
  // weight comes from load_vector (its format is the backend's: bf16 on a GPU).
  virtual void rms_norm(void* out, const void* x, void* residual, const void* weight, int64_t rows,
                        int64_t dim, float eps) = 0;
  // The same, its result (in `out`) made the next Linears' input in one pass.
  virtual LinearInput rms_norm_input(void* out, const void* x, void* residual, const void* weight,
                                     int64_t rows, int64_t dim, float eps) = 0;
  // out[t, i] = silu(gate_up[t, i]) * gate_up[t, inter + i], made the next Linear's input.
  virtual LinearInput silu_and_mul_input(void* out, const void* gate_up, int64_t rows, int64_t inter) = 0;
  // The MLP's gate and up Linears and SiLU.mul: down's input. By default the Linears into
  // gate_up [rows, 2 * inter] (gate | up), then silu_and_mul_input into act; a backend may fuse
  // them where down takes what it makes (the CPU's bf16 kernels: gate_up and act unwritten).
  virtual LinearInput gate_up_silu_input(void* act, void* gate_up, const LinearInput& x, const Matrix& gate,
                                         const Matrix& up, const Matrix& down, int64_t rows, int64_t inter) {
    (void)down;
    void* up_out = static_cast<char*>(gate_up) + inter * capabilities().activation_bytes;
    const LinearJob jobs[] = {{gate_up, 2 * inter, &gate, nullptr}, {up_out, 2 * inter, &up, nullptr}};
    linears(x, jobs);
    return silu_and_mul_input(act, gate_up, rows, inter);
  }
  virtual LinearInput linear_input(const void* x, int64_t rows, int64_t cols) = 0;
  // Every job's Linear over the same input, in one pass (the QKV and gate/up projections).
  virtual void linears(const LinearInput& x, std::span<const LinearJob> jobs) = 0;
  // logits [rows, w.rows] fp32 = x . w^T (the LM head).
  virtual void logits(float* out, const LinearInput& x, const Matrix& w) = 0;
  // Rotate-half RoPE in place on q [tokens, q_heads, head_dim] and k [tokens, kv_heads,
  // head_dim]; cos_sin [positions, head_dim] (cos in the first half, sin in the second).
  virtual void rotary(void* q, void* k, const int32_t* positions, const float* cos_sin, int64_t tokens,
                      int64_t q_heads, int64_t kv_heads, int64_t head_dim) = 0;
  // K/V rows [tokens, kv_heads, head_dim] into the paged caches [num_blocks, kv_heads,
  // block_size, head_dim] at slot_mapping (negative: skip).
  virtual void write_kv(const void* k, const void* v, void* k_cache, void* v_cache, const int32_t* slot_mapping,
                        int64_t tokens, int64_t kv_heads, int64_t head_dim, int64_t block_size) = 0;
  // Copies block src to dst (copy-on-write) in every cache of `caches`.
  virtual void copy_blocks(std::span<void* const> caches, size_t block_bytes, std::span<const BlockCopy> copies) = 0;
  // Causal attention of the planned step's query rows over their paged K/V (written already).
  virtual void paged_attention(void* out, const void* q, const void* k_cache, const void* v_cache) = 0;
  // out[i] = x[indices[i]] for rows of `dim` activations.
  virtual void gather_rows(void* out, const void* x, const int32_t* indices, int64_t n, int64_t dim) = 0;
};

}  // namespace flashpage::backends
