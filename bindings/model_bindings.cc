#include <pybind11/stl.h>

#include "bindings.h"
#include "model/config.h"
#include "model/gguf.h"
#include "model/safetensors.h"

namespace py = pybind11;

namespace flashpage::bindings {

namespace {

py::dict config_dict(const model::ModelConfig& c) {
  py::dict d;
  d["model_type"] = c.model_type;
  d["hidden_size"] = c.hidden_size;
  d["intermediate_size"] = c.intermediate_size;
  d["num_hidden_layers"] = c.num_hidden_layers;
  d["num_attention_heads"] = c.num_attention_heads;
  d["num_key_value_heads"] = c.num_key_value_heads;
  d["head_dim"] = c.head_dim;
  d["vocab_size"] = c.vocab_size;
  d["max_position_embeddings"] = c.max_position_embeddings;
  d["rms_norm_eps"] = c.rms_norm_eps;
  d["rope_theta"] = c.rope_theta;
  d["rope_scaling"] = c.rope_scaling.type;
  d["rope_inv_freq"] = c.rope_inv_freq();
  d["tie_word_embeddings"] = c.tie_word_embeddings;
  d["attention_bias"] = c.attention_bias;
  d["qk_norm"] = c.qk_norm;
  d["torch_dtype"] = c.torch_dtype;
  d["eos_token_ids"] = c.eos_token_ids;
  d["bos_token_id"] = c.bos_token_id;
  return d;
}

// numpy dtype for a safetensors dtype (bf16 and fp8 as raw unsigned integers of their width).
py::dtype numpy_dtype(model::DType d) {
  switch (d) {
    case model::DType::kF32: return py::dtype("float32");
    case model::DType::kF16: return py::dtype("float16");
    case model::DType::kBF16: return py::dtype("uint16");
    case model::DType::kF64: return py::dtype("float64");
    case model::DType::kI64: return py::dtype("int64");
    case model::DType::kI32: return py::dtype("int32");
    case model::DType::kI16: return py::dtype("int16");
    case model::DType::kI8: return py::dtype("int8");
    case model::DType::kBool: return py::dtype("bool");
    default: return py::dtype("uint8");
  }
}

py::object scalar_object(const model::GgufScalar& v) {
  return std::visit([](const auto& x) -> py::object { return py::cast(x); }, v);
}

}  // namespace

void bind_model(py::module_& m) {
  py::class_<model::GgufFile, std::shared_ptr<model::GgufFile>>(
      m, "GgufFile", "A memory-mapped GGUF file: its metadata, tensor table and dequantized tensors.")
      .def(py::init([](const std::string& path) {
             py::gil_scoped_release release;
             return std::make_shared<model::GgufFile>(path);
           }), py::arg("path"))
      .def_property_readonly("version", &model::GgufFile::version)
      .def("metadata", [](const model::GgufFile& f, const std::string& prefix) {
        // Keys starting with `prefix`; arrays as lists (tokenizer.ggml.tokens: the vocabulary).
        py::dict d;
        for (const auto& [k, v] : f.metadata()) {
          if (k.rfind(prefix, 0) != 0) continue;
          if (!v.is_array) {
            d[py::str(k)] = scalar_object(v.scalar);
            continue;
          }
          py::list l(v.array.size());
          for (size_t i = 0; i < v.array.size(); ++i) l[i] = scalar_object(v.array[i]);
          d[py::str(k)] = l;
        }
        return d;
      }, py::arg("prefix") = "", "The metadata whose keys start with prefix, as a dict.")
      .def("tensors", [](const model::GgufFile& f) {
        py::list out;
        for (const auto& [name, t] : f.tensors()) out.append(py::make_tuple(name, model::ggml_type_name(t.type), t.dims));
        return out;
      }, "(name, type, dims innermost first) of every tensor.")
      .def("dequantize", [](const model::GgufFile& f, const std::string& name) {
        const model::GgufTensor* t = f.find_tensor(name);
        if (!t) throw py::key_error(f.path() + ": no tensor \"" + name + "\"");
        std::vector<py::ssize_t> shape(t->dims.rbegin(), t->dims.rend());
        py::array_t<float> out(shape);
        model::dequantize(model::GgmlType(t->type), t->data, out.mutable_data(), t->numel());
        return out;
      }, py::arg("name"), "The tensor as float32, in numpy's dimension order (outermost first).");
  m.def("load_gguf_config", [](const std::string& path) {
          return config_dict(model::ModelConfig::from_gguf(model::GgufFile(path)));
        }, py::arg("path"), "The model config a GGUF file's metadata describes (as a dict).");
  m.def("load_config", [](const std::string& dir) { return config_dict(model::ModelConfig::from_dir(dir)); },
        py::arg("model_dir"), "Parses and validates <model_dir>/config.json (as a dict).");
  m.def("parse_config", [](const std::string& text) {
          return config_dict(model::ModelConfig::from_json_text(text, "config.json"));
        }, py::arg("text"));

  py::class_<model::WeightStore, std::shared_ptr<model::WeightStore>>(
      m, "WeightStore", "Memory-mapped safetensors tensors of a model directory.")
      .def(py::init([](const std::string& dir) {
             return std::make_shared<model::WeightStore>(model::WeightStore::open(dir));
           }), py::arg("model_dir"))
      .def("names", &model::WeightStore::names)
      .def_property_readonly("files", &model::WeightStore::files)
      .def("__contains__", &model::WeightStore::contains)
      .def("info", [](const model::WeightStore& ws, const std::string& name) {
        const auto& t = ws.get(name);
        return py::make_tuple(model::dtype_name(t.dtype), t.shape, t.file);
      })
      .def("check_shape", [](const model::WeightStore& ws, const std::string& name,
                             const std::vector<int64_t>& shape) { ws.get(name, shape); })
      .def("numpy", [](py::object self, const std::string& name) {
        const auto& t = self.cast<const model::WeightStore&>().get(name);
        std::vector<py::ssize_t> shape(t.shape.begin(), t.shape.end());
        py::array a(numpy_dtype(t.dtype), shape, t.data, self);  // zero-copy view of the mapping
        py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
        return a;
      }, py::arg("name"), "A read-only view of the mapped tensor (bf16 as uint16).");
}

}  // namespace flashpage::bindings
