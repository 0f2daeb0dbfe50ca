#include "model/llama.h"

#include <cmath>

namespace flashpage::model {

struct LlamaModel::Activations {
  void *residual, *delta, *normed, *q, *k, *v, *attn, *gate_up, *act;
  void *last_residual, *last_delta, *last_normed;
  size_t end;  // bytes from the base
};

LlamaModel::LlamaModel(const ModelConfig& config, LlamaWeights weights, backends::Backend& backend)
    : config_(config), be_(backend), host_(std::move(weights)) {
  LlamaWeights& w = host_;
  auto keep = [&](backends::DeviceBuffer b) {
    w.owned_bytes += int64_t(b.size);
    if (b.owner) device_.push_back(std::move(b));
  };
  // A Linear in the backend's layout; the host original is released unless the embedding
  // table (a tied LM head) still needs it.
  auto linear = [&](const Matrix& m) {
    backends::DeviceBuffer b;
    Matrix d = be_.load_linear(m, b);
    if (m.data != w.embed.data) {
      bool owned = false;
      for (runtime::HostBuffer& h : w.owned)
        if (h.data() == m.data) {
          w.owned_bytes -= int64_t(h.size());
          h = runtime::HostBuffer();
          owned = true;
        }
      if (!owned) w.mapped_bytes -= m.rows * m.cols * (m.bf16 ? 2 : 4);
    }
    keep(std::move(b));
    return d;
  };
  auto vec = [&](const std::vector<float>& v) -> const void* {
    if (v.empty()) return nullptr;
    backends::DeviceBuffer b;
    const void* d = be_.load_vector(v, b);
    keep(std::move(b));
    return d;
  };
  for (const LayerWeights& L : w.layers)
    layers_.push_back({linear(L.q), linear(L.k), linear(L.v), linear(L.o), linear(L.gate), linear(L.up),
                       linear(L.down), vec(L.input_norm), vec(L.post_attention_norm), vec(L.q_norm),
                       vec(L.k_norm), vec(L.q_bias), vec(L.k_bias), vec(L.v_bias)});
  lm_head_ = linear(w.lm_head);
  backends::DeviceBuffer b;
  embed_ = be_.load_embedding(w.embed, b);
  keep(std::move(b));
  final_norm_ = vec(w.final_norm);
}

LlamaModel::Activations LlamaModel::carve(void* base, int64_t T, int64_t S) const {
  const ModelConfig& c = config_;
  const int64_t H = c.hidden_size, D = c.head_dim, e = be_.capabilities().activation_bytes;
  char* p = static_cast<char*>(base);
  size_t off = 0;
  auto take = [&](int64_t elems) -> void* {
    void* r = p ? p + off : nullptr;
    off += (size_t(elems * e) + 255) / 256 * 256;  // each array on its own cache lines
    return r;
  };
  Activations a{};
  a.residual = take(T * H);
  a.delta = take(T * H);
  a.normed = take(T * H);
  a.q = take(T * c.num_attention_heads * D);
  a.k = take(T * c.num_key_value_heads * D);
  a.v = take(T * c.num_key_value_heads * D);
  a.attn = take(T * c.num_attention_heads * D);
  a.gate_up = take(T * 2 * c.intermediate_size);
  a.act = take(T * c.intermediate_size);
  a.last_residual = take(S * H);
  a.last_delta = take(S * H);
  a.last_normed = take(S * H);
  a.end = off;
  return a;
}

size_t LlamaModel::workspace_bytes(int64_t tokens, int64_t logits_rows) const {
  return carve(nullptr, tokens, logits_rows).end;
}

void LlamaModel::forward(const StepInputs& st, void* workspace, const KvCacheView& kv, float* logits) {
  const ModelConfig& c = config_;
  const int64_t T = st.num_tokens, S = st.num_logits;
  if (T == 0) return;
  const int64_t H = c.hidden_size, D = c.head_dim, nqh = c.num_attention_heads, nkvh = c.num_key_value_heads;
  const int64_t I = c.intermediate_size;
  const float eps = float(c.rms_norm_eps);
  const Activations a = carve(workspace, T, S);
  backends::Backend& be = be_;
  be.plan_attention(st.attention, {nqh, nkvh, D, kv.block_size, float(1.0 / std::sqrt(double(D)))});
  be.copy_blocks(kv.caches, kv.block_bytes, st.block_copies);
  be.embed(a.residual, embed_, st.token_ids, T);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const Layer& L = layers_[size_t(l)];
    void *kc = kv.caches[size_t(2 * l)], *vc = kv.caches[size_t(2 * l + 1)];
    // The first layer normalises the embeddings; later ones add the previous sublayer's output
    // (delta) to the residual stream first.
    const backends::LinearInput in = l == 0 ? be.rms_norm_input(a.normed, a.residual, nullptr, L.input_norm, T, H, eps)
                                            : be.rms_norm_input(a.normed, a.delta, a.residual, L.input_norm, T, H, eps);
    const backends::LinearJob qkv[] = {
        {a.q, nqh * D, &L.q, L.q_bias}, {a.k, nkvh * D, &L.k, L.k_bias}, {a.v, nkvh * D, &L.v, L.v_bias}};
    be.linears(in, qkv);
    if (c.qk_norm) {
      be.rms_norm(a.q, a.q, nullptr, L.q_norm, T * nqh, D, eps);
      be.rms_norm(a.k, a.k, nullptr, L.k_norm, T * nkvh, D, eps);
    }
    be.rotary(a.q, a.k, st.positions, st.cos_sin, T, nqh, nkvh, D);
    be.write_kv(a.k, a.v, kc, vc, st.slot_mapping, T, nkvh, D, kv.block_size);
    be.paged_attention(a.attn, a.q, kc, vc);
    const backends::LinearJob o[] = {{a.delta, H, &L.o, nullptr}};
    be.linears(be.linear_input(a.attn, T, nqh * D), o);
    const backends::LinearInput mlp_in =
        be.rms_norm_input(a.normed, a.delta, a.residual, L.post_attention_norm, T, H, eps);
    const backends::LinearJob down[] = {{a.delta, H, &L.down, nullptr}};
    be.linears(be.gate_up_silu_input(a.act, a.gate_up, mlp_in, L.gate, L.up, L.down, T, I), down);
  }
  // The final norm and the LM head only for the rows asked for.
  be.gather_rows(a.last_residual, a.residual, st.logits_indices, S, H);
  be.gather_rows(a.last_delta, a.delta, st.logits_indices, S, H);
  be.logits(logits, be.rms_norm_input(a.last_normed, a.last_delta, a.last_residual, final_norm_, S, H, eps), lm_head_);
}

}  // namespace flashpage::model
