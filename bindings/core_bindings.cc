#include <pybind11/stl.h>

#include "bindings.h"
#include "flashpage/block_manager.h"
#include "flashpage/scheduler.h"

namespace py = pybind11;

namespace flashpage::bindings {

namespace {

py::dict cache_stats(const BlockManagerStats& s) {
  py::dict d;
  d["num_blocks"] = s.num_blocks;
  d["used_blocks"] = s.used_blocks;
  d["free_blocks"] = s.free_blocks;
  d["cached_blocks"] = s.cached_blocks;
  d["cached_free_blocks"] = s.cached_free_blocks;
  d["prefix_queries"] = s.prefix_queries;
  d["prefix_hits"] = s.prefix_hits;
  d["waste_tokens"] = s.waste_tokens;
  return d;
}

FinishReason parse_reason(const std::string& s) {
  if (s == "stop") return FinishReason::kStop;
  if (s == "length") return FinishReason::kLength;
  if (s == "abort") return FinishReason::kAbort;
  throw std::invalid_argument("finish reason must be 'stop', 'length' or 'abort', got '" + s + "'");
}

py::list take_kv_events(BlockManager& bm) {
  static constexpr const char* kNames[] = {"BlockStored", "BlockRemoved", "AllBlocksCleared"};
  const KvEventLog& log = bm.kv_events();
  py::list out(log.events.size());
  for (size_t i = 0; i < log.events.size(); ++i) {
    const KvEvent& e = log.events[i];
    const auto hashes = log.hashes_of(e);
    const auto tokens = log.tokens_of(e, bm.block_size());
    py::object parent = py::none();
    if (e.parent_hash != 0) parent = py::int_(e.parent_hash);
    out[i] = py::make_tuple(kNames[static_cast<int>(e.type)],
                            std::vector<uint64_t>(hashes.begin(), hashes.end()), parent,
                            std::vector<int32_t>(tokens.begin(), tokens.end()), e.extra_key);
  }
  bm.clear_kv_events();
  return out;
}

using Output = std::shared_ptr<SchedulerOutput>;

// A property of SchedulerOutput exposed as a zero-copy numpy view that keeps the step alive.
template <class T>
void view_property(py::class_<SchedulerOutput, Output>& cls, const char* name,
                   std::vector<T> SchedulerOutput::*field) {
  cls.def_property_readonly(name, [field](py::object self) {
    const SchedulerOutput& o = self.cast<const SchedulerOutput&>();
    const auto& v = o.*field;
    return readonly_view<T>(v.data(), {static_cast<py::ssize_t>(v.size())}, self);
  });
}

void bind_step_output(py::module_& m) {
  py::class_<SchedulerOutput, Output> cls(m, "SchedulerOutput",
      "One engine step as flat arrays (zero-copy, read-only views; see scheduler.h).");
  view_property(cls, "request_ids", &SchedulerOutput::request_ids);
  view_property(cls, "query_start_loc", &SchedulerOutput::query_start_loc);
  view_property(cls, "num_computed", &SchedulerOutput::num_computed);
  view_property(cls, "context_lens", &SchedulerOutput::context_lens);
  view_property(cls, "do_sample", &SchedulerOutput::do_sample);
  view_property(cls, "token_ids", &SchedulerOutput::token_ids);
  view_property(cls, "positions", &SchedulerOutput::positions);
  view_property(cls, "slot_mapping", &SchedulerOutput::slot_mapping);
  view_property(cls, "logits_indices", &SchedulerOutput::logits_indices);
  view_property(cls, "preempted_ids", &SchedulerOutput::preempted_ids);
  view_property(cls, "finished_ids", &SchedulerOutput::finished_ids);
  cls.def_property_readonly("block_tables", [](py::object self) {
    const SchedulerOutput& o = self.cast<const SchedulerOutput&>();
    return readonly_view<int32_t>(o.block_tables.data(), {o.num_seqs(), o.block_table_width}, self);
  });
  cls.def_property_readonly("block_copies", [](py::object self) {
    const SchedulerOutput& o = self.cast<const SchedulerOutput&>();
    static_assert(sizeof(BlockCopy) == 2 * sizeof(int32_t));
    return readonly_view<int32_t>(reinterpret_cast<const int32_t*>(o.block_copies.data()),
                                  {static_cast<py::ssize_t>(o.block_copies.size()), 2}, self);
  });
  cls.def_property_readonly("num_seqs", &SchedulerOutput::num_seqs);
  cls.def_property_readonly("num_tokens", &SchedulerOutput::num_tokens);
  cls.def_readonly("num_prefill_tokens", &SchedulerOutput::num_prefill_tokens);
  cls.def_readonly("num_decode_seqs", &SchedulerOutput::num_decode_seqs);
  cls.def("__len__", &SchedulerOutput::num_seqs);
}

void bind_block_manager(py::module_& m) {
  py::class_<BlockTable>(m, "BlockTable", "The blocks one sequence holds (owned by the caller).")
      .def(py::init<>())
      .def_property_readonly("blocks", [](const BlockTable& t) {
        return std::vector<int32_t>(t.blocks().begin(), t.blocks().end());
      })
      .def_property_readonly("num_cached_tokens", &BlockTable::num_cached_tokens)
      .def("__len__", &BlockTable::num_blocks);

  py::class_<BlockManager>(m, "BlockManager", "The paged KV-cache block pool with prefix caching.")
      .def(py::init([](int32_t num_blocks, int32_t block_size, bool enable_prefix_caching) {
             return std::make_unique<BlockManager>(
                 BlockManagerConfig{num_blocks, block_size, enable_prefix_caching});
           }),
           py::arg("num_blocks"), py::arg("block_size") = 16, py::arg("enable_prefix_caching") = true)
      .def_property_readonly("block_size", &BlockManager::block_size)
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("num_free_blocks", &BlockManager::num_free_blocks)
      .def("allocate_prefix", [](BlockManager& bm, BlockTable& t, IntArray tokens, uint64_t key) {
             return bm.allocate_prefix(t, as_span(tokens), key);
           }, py::arg("table"), py::arg("tokens"), py::arg("extra_key") = 0)
      .def("blocks_needed", &BlockManager::blocks_needed, py::arg("table"),
           py::arg("num_computed"), py::arg("num_new"))
      .def("allocate_slots", &BlockManager::allocate_slots, py::arg("table"),
           py::arg("num_computed"), py::arg("num_new"))
      .def("cache_blocks", [](BlockManager& bm, BlockTable& t, IntArray tokens, int32_t n) {
             bm.cache_blocks(t, as_span(tokens), n);
           }, py::arg("table"), py::arg("tokens"), py::arg("num_computed"))
      .def("fork", &BlockManager::fork, py::arg("parent"), py::arg("child"))
      .def("free", &BlockManager::free, py::arg("table"))
      .def("take_copies", [](BlockManager& bm) {
             std::vector<std::pair<int32_t, int32_t>> out;
             for (const BlockCopy& c : bm.pending_copies()) out.emplace_back(c.src, c.dst);
             bm.clear_copies();
             return out;
           }, "Copy-on-write (src, dst) block copies queued since the last call.")
      .def("reset_prefix_cache", &BlockManager::reset_prefix_cache,
           "Forgets every cached block; False (nothing changes) while any block is held.")
      .def_property("kv_events_enabled", &BlockManager::kv_events_enabled,
                    &BlockManager::set_kv_events_enabled,
                    "Record prefix-cache changes for take_kv_events (off by default).")
      .def("take_kv_events", &take_kv_events,
           "The prefix-cache events since the last call, oldest first, and clears them: tuples "
           "(type, block_hashes, parent_block_hash or None, token_ids, extra_key) with type "
           "'BlockStored', 'BlockRemoved' or 'AllBlocksCleared'.")
      .def("ref_count", &BlockManager::ref_count, py::arg("block"))
      .def("is_cached", &BlockManager::is_cached, py::arg("block"))
      .def("block_hash", &BlockManager::block_hash, py::arg("block"))
      .def("stats", [](const BlockManager& bm) { return cache_stats(bm.stats()); });
}

void bind_scheduler(py::module_& m) {
  py::class_<SchedulerConfig>(m, "SchedulerConfig")
      .def(py::init([](int32_t num_blocks, int32_t block_size, int32_t max_num_batched_tokens,
                       int32_t max_num_seqs, int32_t max_model_len, const std::string& policy,
                       bool enable_prefix_caching) {
             SchedulerConfig c;
             c.cache = BlockManagerConfig{num_blocks, block_size, enable_prefix_caching};
             c.max_num_batched_tokens = max_num_batched_tokens;
             c.max_num_seqs = max_num_seqs;
             c.max_model_len = max_model_len;
             c.policy = parse_policy(policy);
             return c;
           }),
           py::arg("num_blocks"), py::arg("block_size") = 16,
           py::arg("max_num_batched_tokens") = 2048, py::arg("max_num_seqs") = 256,
           py::arg("max_model_len") = 4096, py::arg("policy") = "fcfs",
           py::arg("enable_prefix_caching") = true)
      .def_readonly("max_num_batched_tokens", &SchedulerConfig::max_num_batched_tokens)
      .def_readonly("max_num_seqs", &SchedulerConfig::max_num_seqs)
      .def_readonly("max_model_len", &SchedulerConfig::max_model_len)
      .def_property_readonly("num_blocks", [](const SchedulerConfig& c) { return c.cache.num_blocks; })
      .def_property_readonly("block_size", [](const SchedulerConfig& c) { return c.cache.block_size; })
      .def_property_readonly("policy", [](const SchedulerConfig& c) {
        return c.policy == SchedulingPolicy::kPriority ? "priority" : "fcfs";
      });

  py::class_<Scheduler>(m, "Scheduler", "Continuous-batching scheduler over a paged KV cache.")
      .def(py::init<const SchedulerConfig&>(), py::arg("config"))
      .def_property_readonly("config", &Scheduler::config)
      .def_property_readonly("block_manager",
                             py::overload_cast<>(&Scheduler::block_manager, py::const_),
                             py::return_value_policy::reference_internal)
      .def("add_request",
           [](Scheduler& s, int64_t id, IntArray prompt, int32_t max_tokens, int32_t min_tokens,
              std::vector<int32_t> stop_token_ids, std::vector<int32_t> eos_token_ids,
              bool ignore_eos, int32_t priority, uint64_t cache_key) {
             RequestSpec spec;
             spec.request_id = id;
             const auto p = as_span(prompt);
             spec.prompt.assign(p.begin(), p.end());
             spec.stop = StopParams{max_tokens, min_tokens, std::move(stop_token_ids),
                                    std::move(eos_token_ids), ignore_eos};
             spec.priority = priority;
             spec.cache_key = cache_key;
             s.add_request(std::move(spec));
           },
           py::arg("request_id"), py::arg("prompt"), py::arg("max_tokens") = 16,
           py::arg("min_tokens") = 0, py::arg("stop_token_ids") = std::vector<int32_t>{},
           py::arg("eos_token_ids") = std::vector<int32_t>{}, py::arg("ignore_eos") = false,
           py::arg("priority") = 0, py::arg("cache_key") = 0)
      .def("abort_request", &Scheduler::abort_request, py::arg("request_id"))
      .def("finish_request", [](Scheduler& s, int64_t id, const std::string& reason) {
             return s.finish_request(id, parse_reason(reason));
           }, py::arg("request_id"), py::arg("reason") = "stop")
      .def("fork_request", &Scheduler::fork_request, py::arg("parent_id"), py::arg("child_id"))
      .def("schedule", [](Scheduler& s) { return std::const_pointer_cast<SchedulerOutput>(s.schedule()); })
      .def("update",
           [](Scheduler& s, IntArray sampled, IntArray fork_tokens) {
             return events_as_arrays(s.update(as_span(sampled), as_span(fork_tokens)));
           },
           py::arg("sampled"), py::arg("fork_tokens") = IntArray(0),
           "Feeds the sampled tokens (one per row of the last step). Returns (request_ids, "
           "tokens, finish_reasons) for the requests that got a token; a reason is None while "
           "the request goes on, else 'stop' or 'length'.")
      .def_property_readonly("has_unfinished", &Scheduler::has_unfinished)
      .def_property_readonly("num_waiting", &Scheduler::num_waiting)
      .def_property_readonly("num_running", &Scheduler::num_running)
      .def("__contains__", &Scheduler::contains)
      .def("status", [](const Scheduler& s, int64_t id) {
        switch (s.status(id)) {
          case RequestStatus::kWaiting: return "waiting";
          case RequestStatus::kRunning: return "running";
          default: return "finished";
        }
      })
      .def("tokens", [](Scheduler& s, int64_t id) {
        auto t = s.tokens(id);
        return std::vector<int32_t>(t.begin(), t.end());
      })
      .def("num_prompt_tokens", &Scheduler::num_prompt_tokens)
      .def("num_computed_tokens", &Scheduler::num_computed_tokens)
      .def("block_table", [](const Scheduler& s, int64_t id) {
        auto t = s.block_table(id);
        return std::vector<int32_t>(t.begin(), t.end());
      })
      .def("running_ids", &Scheduler::running_ids)
      .def("waiting_ids", &Scheduler::waiting_ids)
      .def("stats", [](const Scheduler& s) {
        const SchedulerStats st = s.stats();
        py::dict d = cache_stats(st.cache);
        d["num_waiting"] = st.num_waiting;
        d["num_running"] = st.num_running;
        d["num_preemptions"] = st.num_preemptions;
        d["num_steps"] = st.num_steps;
        return d;
      });
}

}  // namespace

void bind_core(py::module_& m) {
  bind_step_output(m);
  bind_block_manager(m);
  bind_scheduler(m);
}

}  // namespace flashpage::bindings
