// flashpage._core.Engine: the C++ engine (model, scheduler, C++ sampler) for the Python layer.
#include <pybind11/stl.h>

#include "bindings.h"
#include "dlpack.h"
#include "flashpage/engine.h"

namespace py = pybind11;

namespace flashpage::bindings {

namespace {

// Engine.execute's result: the logits and the engine that holds them.
struct StepLogits {
  Logits logits;
  py::object owner;
};

py::dict info_dict(const ModelInfo& i) {
  py::dict d;
  d["model_type"] = i.model_type;
  d["dtype"] = i.dtype;
  d["compute_dtype"] = i.compute_dtype;
  d["backend"] = i.backend;
  d["isa"] = i.isa;
  d["vocab_size"] = i.vocab_size;
  d["hidden_size"] = i.hidden_size;
  d["num_layers"] = i.num_layers;
  d["max_model_len"] = i.max_model_len;
  d["eos_token_ids"] = i.eos_token_ids;
  d["bos_token_id"] = i.bos_token_id;
  d["num_kv_blocks"] = i.num_kv_blocks;
  d["weight_bytes_mapped"] = i.weight_bytes_mapped;
  d["weight_bytes_owned"] = i.weight_bytes_owned;
  d["kv_cache_report"] = i.kv_cache_report;
  d["load_seconds"] = i.load_seconds;
  d["max_num_batched_tokens"] = i.max_num_batched_tokens;
  d["cuda_graph_max_batch"] = i.cuda_graph_max_batch;
  d["cuda_graphs"] = i.cuda_graphs;
  d["prefill_tokens_per_second"] = i.prefill_tokens_per_second;
  return d;
}

}  // namespace

void bind_engine(py::module_& m) {
  py::class_<Engine>(m, "Engine", "A model, its KV cache, the scheduler and the C++ sampler.")
      .def(py::init([](const std::string& model, const std::string& dtype, const std::string& load_format,
                       int32_t max_model_len, int32_t block_size, int32_t max_num_seqs,
                       int32_t max_num_batched_tokens, bool enable_prefix_caching, const std::string& policy,
                       int64_t kv_cache_bytes, double kv_cache_memory_fraction,
                       uint64_t seed, bool verbose, const std::string& compute_dtype, const std::string& device,
                       double gpu_memory_utilization, const std::string& quantization,
                       int32_t cuda_graph_max_batch) {
             EngineConfig c;
             c.cuda_graph_max_batch = cuda_graph_max_batch;
             c.quantization = quantization;
             c.model = model;
             c.device = device;
             c.gpu_memory_utilization = gpu_memory_utilization;
             c.dtype = dtype;
             c.load_format = load_format;
             c.max_model_len = max_model_len;
             c.block_size = block_size;
             c.max_num_seqs = max_num_seqs;
             c.max_num_batched_tokens = max_num_batched_tokens;
             c.enable_prefix_caching = enable_prefix_caching;
             c.policy = parse_policy(policy);
             c.kv_cache_bytes = kv_cache_bytes;
             c.kv_cache_memory_fraction = kv_cache_memory_fraction;
             c.seed = seed;
             c.verbose = verbose;
             c.compute_dtype = compute_dtype;
             py::gil_scoped_release release;
             return std::make_unique<Engine>(c);
           }),
           py::arg("model"), py::arg("dtype") = "auto", py::arg("load_format") = "auto",
           py::arg("max_model_len") = 0, py::arg("block_size") = 16, py::arg("max_num_seqs") = 256,
           py::arg("max_num_batched_tokens") = 0, py::arg("enable_prefix_caching") = true,
           py::arg("policy") = "fcfs", py::arg("kv_cache_bytes") = 0,
           py::arg("kv_cache_memory_fraction") = 0.25, py::arg("seed") = 0,
           py::arg("verbose") = false, py::arg("compute_dtype") = "auto", py::arg("device") = "cpu",
           py::arg("gpu_memory_utilization") = 0.9, py::arg("quantization") = "auto",
           py::arg("cuda_graph_max_batch") = 0)
      .def_property_readonly("info", [](const Engine& e) { return info_dict(e.info()); })
      .def("add_request",
           [](Engine& e, IntArray prompt, float temperature, int32_t top_k, float top_p, float min_p,
              int64_t seed, int32_t max_tokens, int32_t min_tokens, std::vector<int32_t> stop_token_ids,
              bool ignore_eos, int32_t priority) {
             SamplingOptions o{temperature, top_k, top_p, min_p, seed, max_tokens, min_tokens,
                               std::move(stop_token_ids), ignore_eos, priority};
             return e.add_request(as_span(prompt), o);
           },
           py::arg("prompt"), py::arg("temperature") = 1.0f, py::arg("top_k") = 0, py::arg("top_p") = 1.0f,
           py::arg("min_p") = 0.0f, py::arg("seed") = -1, py::arg("max_tokens") = 16, py::arg("min_tokens") = 0,
           py::arg("stop_token_ids") = std::vector<int32_t>{}, py::arg("ignore_eos") = false,
           py::arg("priority") = 0, "Queues a request; returns its id.")
      .def("abort_request", &Engine::abort_request, py::arg("request_id"))
      .def_property_readonly("has_unfinished", &Engine::has_unfinished)
      .def("step",
           [](Engine& e) {
             const std::vector<TokenEvent>* ev;
             {
               py::gil_scoped_release release;
               ev = &e.step();
             }
             return events_as_arrays(*ev);
           },
           "Runs one step (schedule, forward, sample, update). Returns (request_ids, tokens, "
           "finish_reasons) for the requests that got a token or finished.")
      .def_property_readonly("scheduler", &Engine::scheduler, py::return_value_policy::reference_internal)
      .def("execute",
           [](py::object self, const std::shared_ptr<SchedulerOutput>& step, IntArray logits_indices) {
             Engine& e = self.cast<Engine&>();
             const auto idx = as_span(logits_indices);
             Logits l;
             {
               py::gil_scoped_release release;
               l = e.execute(*step, idx);
             }
             return StepLogits{l, self};
           },
           py::arg("step"), py::arg("logits_indices") = IntArray(0),
           "Runs the model on a step from scheduler.schedule(). Returns its logits [rows, vocab] "
           "float32 where the backend computed them, for torch.from_dlpack / numpy.from_dlpack "
           "(no copy; valid until the next execute): for the tokens at logits_indices (into the "
           "step's token arrays), or each sequence's last token when it is empty.");
  py::class_<StepLogits>(m, "Logits", "A step's logits in the backend's memory (DLPack; valid until the next execute).")
      .def(
          "__dlpack__",
          [](const StepLogits& s, py::object /*stream*/, py::object /*max_version*/, py::object dl_device,
             py::object copy) {
            // The step has finished when execute returns, so no stream needs to wait on it.
            if (!copy.is_none() && copy.cast<bool>())
              throw py::buffer_error("Logits.__dlpack__: copy=True is not supported (they are exported in place)");
            if (!dl_device.is_none()) {
              const auto d = dl_device.cast<std::pair<int32_t, int32_t>>();
              if (d.first != s.logits.device_type || d.second != s.logits.device_id)
                throw py::buffer_error("Logits.__dlpack__: the logits are on another device");
            }
            return dlpack_matrix(s.logits.data, s.logits.rows, s.logits.vocab, s.logits.device_type,
                                 s.logits.device_id, s.owner);
          },
          py::arg("stream") = py::none(), py::kw_only(), py::arg("max_version") = py::none(),
          py::arg("dl_device") = py::none(), py::arg("copy") = py::none())
      .def("__dlpack_device__",
           [](const StepLogits& s) { return py::make_tuple(s.logits.device_type, s.logits.device_id); })
      .def_property_readonly("shape", [](const StepLogits& s) { return py::make_tuple(s.logits.rows, s.logits.vocab); });
}

}  // namespace flashpage::bindings
