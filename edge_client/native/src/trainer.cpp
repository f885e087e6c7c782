// Trainer: the exported ExecuTorch joint forward/backward program, driven in place, plus plain SGD.
#include "trainer.hpp"

#include <malloc.h>
#include <sys/mman.h>

#include <cinttypes>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>

#include <openssl/evp.h>

#include <algorithm>
#include <cstring>
#include <executorch/extension/module/module.h>
#include <executorch/runtime/platform/platform.h>
#include <executorch/extension/tensor/tensor_ptr.h>
#include <map>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "quant.hpp"  // detail::shape_text
#include "safetensors.hpp"

namespace edgefl {

namespace {

using executorch::aten::ScalarType;
using executorch::extension::TensorPtr;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::Method;
using detail::shape_text;

// The training metadata methods exported next to "forward" (extension/training of ExecuTorch).
const char* const kForward = "forward";
const char* const kFqnMethod = "__et_training_fqn_forward";
const char* const kGradientsIndexMethod = "__et_training_gradients_index_forward";
const char* const kParametersIndexMethod = "__et_training_parameters_index_forward";
const char* const kBaseDelta = "base_delta";
const char* const kLogitBias = "logit_bias";
// Logit of a masked class (edge_client/trainer_base.py MASK_LOGIT): exp underflows to 0 in
// float32, yet unlike -inf it never makes NaN.
constexpr float kMaskLogit = -1e4f;

void check_ok(Error error, const std::string& what) {
  if (error != Error::Ok)
    throw std::runtime_error(what + ": executorch error " + executorch::runtime::to_string(error));
}

std::string sha256_hex(const std::string& bytes) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  if (EVP_Digest(bytes.data(), bytes.size(), digest, &length, EVP_sha256(), nullptr) != 1)
    throw std::runtime_error("sha256 failed");
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < length; ++i) {
    out += hex[digest[i] >> 4];
    out += hex[digest[i] & 15];
  }
  return out;
}

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::vector<int64_t> shape_field(const nlohmann::json& value, const std::string& what) {
  std::vector<int64_t> shape = value.get<std::vector<int64_t>>();
  for (int64_t d : shape)
    if (d < 0) throw std::runtime_error("manifest: negative dimension in " + what);
  return shape;
}

// protocol.tensors.canonical_key: drop the wrapper prefixes ("m.", "base_model.model.") and every
// adapter-name segment (".default" or ".modules_to_save.default" followed by a dot).
std::string canonical_key(const std::string& native_name) {
  std::string s = native_name;
  if (s.rfind("m.", 0) == 0) s = s.substr(2);
  if (s.rfind("base_model.model.", 0) == 0) s = s.substr(17);
  static const std::string kSaved = ".modules_to_save.default.";
  static const std::string kDefault = ".default.";
  std::string out;
  for (size_t i = 0; i < s.size();) {
    // The trailing dot is a lookahead in the Python pattern: skip all but it.
    if (s.compare(i, kSaved.size(), kSaved) == 0) {
      i += kSaved.size() - 1;
    } else if (s.compare(i, kDefault.size(), kDefault) == 0) {
      i += kDefault.size() - 1;
    } else {
      out += s[i++];
    }
  }
  return out;
}

std::vector<int64_t> tensor_shape(const executorch::aten::Tensor& t) {
  return std::vector<int64_t>(t.sizes().begin(), t.sizes().end());
}

// Module keeps its loaded methods protected; this subclass reaches "forward"'s Method so the
// trainer can set inputs, run and read outputs in place, without Module::execute's copies.
class ProgramModule : public executorch::extension::Module {
 public:
  using Module::Module;
  Method& method(const std::string& name) {
    check_ok(load_method(name), "loading method " + name);
    return *methods_.at(name).method;
  }
};

}  // namespace

// ---- manifest ----------------------------------------------------------------------------

Manifest Manifest::load(const std::string& artifact_dir) {
  const std::string path = artifact_dir + "/manifest.json";
  std::string bytes;
  try {
    bytes = read_file(path);
  } catch (const std::exception&) {
    throw std::runtime_error("no manifest.json in " + artifact_dir);
  }
  Manifest m;
  m.sha256 = sha256_hex(bytes);
  try {
    const auto j = nlohmann::json::parse(bytes);
    m.workload = j.at("workload").get<std::string>();
    m.batch_size = j.at("batch_size").get<int64_t>();
    m.input_shape = shape_field(j.at("input_shape"), "input_shape");
    m.input_dtype = j.at("input_dtype").get<std::string>();
    m.labels = j.at("labels").get<std::vector<std::string>>();
    for (const auto& t : j.at("tensors")) {
      if (t.value("dtype", "float32") != "float32")
        throw std::runtime_error("manifest: tensor " + t.at("name").get<std::string>() +
                                 " is not float32");
      m.tensors.push_back({t.at("name").get<std::string>(), t.at("native_name").get<std::string>(),
                           shape_field(t.at("shape"), "tensors")});
    }
    for (const auto& f : j.value("frozen_inputs", nlohmann::json::array()))
      m.frozen_inputs.push_back({f.at("kind").get<std::string>(), f.at("name").get<std::string>(),
                                 shape_field(f.at("shape"), "frozen_inputs")});
    const auto files = j.value("files", nlohmann::json::object());
    m.executorch_file = files.value("executorch", "");
    m.adapter_init_file = files.value("adapter_init", "");
  } catch (const nlohmann::json::exception& exc) {
    throw std::runtime_error(std::string("manifest.json: ") + exc.what());
  }
  if (m.batch_size <= 0 || m.input_shape.empty() || m.input_shape[0] != m.batch_size)
    throw std::runtime_error("manifest.json: input_shape does not start with batch_size");
  if (m.input_dtype != "float32" && m.input_dtype != "int64")
    throw std::runtime_error("manifest.json: input_dtype must be float32 or int64");
  if (m.labels.empty()) throw std::runtime_error("manifest.json: no labels");
  return m;
}

bool Manifest::is_personal(const std::string& canonical_name) const {
  // protocol.tensors.PERSONAL_SEGMENTS: CoLoRA's r x r cores never leave the device.
  size_t start = 0;
  while (start <= canonical_name.size()) {
    size_t end = canonical_name.find('.', start);
    if (end == std::string::npos) end = canonical_name.size();
    if (canonical_name.compare(start, end - start, "lora_S") == 0) return true;
    start = end + 1;
  }
  return false;
}

// ---- trainer -----------------------------------------------------------------------------

struct Trainer::Impl {
  // One adapter tensor: where its parameter and gradient sit among forward's outputs.
  struct Slot {
    const AdapterSpec* spec;
    size_t param_output;
    size_t grad_output;
    size_t numel;
  };

  Manifest manifest;
  double learning_rate = 0;
  std::unique_ptr<ProgramModule> module;
  Method* method = nullptr;
  std::vector<Slot> slots;
  std::map<std::string, size_t> slot_index;  // canonical name -> slots index
  size_t num_classes = 0;
  size_t input_bytes = 0;
  // Program inputs: the batch's tensors point at the caller's bytes for the duration of a run;
  // frozen inputs point at buffers owned here (zeros: the model as exported).
  TensorPtr inputs_tensor;
  TensorPtr labels_tensor;
  std::vector<std::vector<float>> frozen;
  std::vector<TensorPtr> frozen_tensors;
  std::vector<uint8_t> zero_inputs;  // the first run's batch
  std::vector<int64_t> zero_labels;  // logits() runs with these

  explicit Impl(const std::string& artifact_dir, double lr);
  std::vector<std::string> read_training_metadata(size_t* grad_start, size_t* param_start);
  void bind_inputs();
  void map_outputs(const std::vector<std::string>& fqns, size_t grad_start, size_t param_start);
  void run(const void* inputs, const int64_t* labels);
  void check_batch(const Batch& batch) const;
  const executorch::aten::Tensor& output(size_t index) const {
    return method->get_output(index).toTensor();
  }
  float loss() const { return output(0).const_data_ptr<float>()[0]; }
  int64_t correct(const int64_t* labels) const;
  void sgd_step();
  size_t frozen_index(const std::string& kind, const std::string& name) const;
};

// The runtime logs at info level (cpuinfo's reads of /sys on every start); a device's log
// keeps its warnings and errors only, unless EDGEFL_NATIVE_VERBOSE is set.
void emit_runtime_log(et_timestamp_t, et_pal_log_level_t level, const char* filename,
                      const char*, size_t line, const char* message, size_t length) {
  if ((level == kDebug || level == kInfo) && std::getenv("EDGEFL_NATIVE_VERBOSE") == nullptr)
    return;
  std::fprintf(stderr, "executorch %c %s:%zu: %.*s\n", static_cast<char>(level), filename, line,
               static_cast<int>(length), message);
}

void quiet_runtime_logs() {
  static std::once_flag once;
  std::call_once(once, [] {
    executorch::runtime::register_pal(
        executorch::runtime::PalImpl::create(emit_runtime_log, __FILE__));
  });
}

// Loading leaves memory the training steps never touch again: the program file's pages that
// XNNPACK read while packing its weights (it trains on the packed copy), and heap that load-time
// temporaries freed. Handing both back keeps a phone's resident set to what training uses.
void release_load_memory(const std::string& program_path) {
  malloc_trim(0);
  char resolved[PATH_MAX];
  if (realpath(program_path.c_str(), resolved) == nullptr) return;
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    const size_t slash = line.find('/');
    if (slash == std::string::npos || line.compare(slash, std::string::npos, resolved) != 0) continue;
    uintptr_t begin = 0, end = 0;
    if (std::sscanf(line.c_str(), "%" SCNxPTR "-%" SCNxPTR, &begin, &end) != 2) continue;
    // MADV_PAGEOUT keeps the contents (clean file pages are simply re-read if touched again);
    // kernels before 5.4 reject it, and then nothing changes.
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_PAGEOUT);
  }
}

Trainer::Impl::Impl(const std::string& artifact_dir, double lr)
    : manifest(Manifest::load(artifact_dir)), learning_rate(lr) {
  if (manifest.executorch_file.empty())
    throw std::runtime_error(artifact_dir + " has no ExecuTorch program");
  num_classes = manifest.labels.size();
  const size_t item = manifest.input_dtype == "float32" ? sizeof(float) : sizeof(int64_t);
  input_bytes = static_cast<size_t>(numel_of(manifest.input_shape)) * item;
  // Mapped without mlock: pages of frozen weights load on demand and stay reclaimable, which
  // keeps the resident set small on a phone.
  quiet_runtime_logs();
  module = std::make_unique<ProgramModule>(artifact_dir + "/" + manifest.executorch_file,
                                           executorch::extension::Module::LoadMode::Mmap);
  check_ok(module->load(), "loading " + manifest.executorch_file);
  size_t grad_start = 0, param_start = 0;
  const auto fqns = read_training_metadata(&grad_start, &param_start);
  method = &module->method(kForward);
  zero_inputs.assign(input_bytes, 0);
  zero_labels.assign(static_cast<size_t>(manifest.batch_size), 0);
  bind_inputs();
  // The outputs alias the program's parameter and gradient memory once forward has run; a
  // zero batch does that without changing the weights (a step is a separate SGD pass).
  run(zero_inputs.data(), zero_labels.data());
  map_outputs(fqns, grad_start, param_start);
  release_load_memory(artifact_dir + "/" + manifest.executorch_file);
}

std::vector<std::string> Trainer::Impl::read_training_metadata(size_t* grad_start,
                                                               size_t* param_start) {
  auto index_of = [&](const char* name) -> size_t {
    auto result = module->execute(name);
    check_ok(result.error(), std::string("running ") + name);
    if (result->empty() || !(*result)[0].isInt() || (*result)[0].toInt() < 0)
      throw std::runtime_error(std::string(name) + " did not return an index");
    return static_cast<size_t>((*result)[0].toInt());
  };
  *grad_start = index_of(kGradientsIndexMethod);
  *param_start = index_of(kParametersIndexMethod);
  auto names = module->execute(kFqnMethod);
  check_ok(names.error(), std::string("running ") + kFqnMethod);
  std::vector<std::string> fqns;
  for (const auto& value : *names) {
    if (!value.isString()) throw std::runtime_error(std::string(kFqnMethod) + " gave a non-string");
    fqns.emplace_back(value.toString());
  }
  // Only forward is needed from here on; the metadata methods' memory can go.
  module->unload_method(kGradientsIndexMethod);
  module->unload_method(kParametersIndexMethod);
  module->unload_method(kFqnMethod);
  return fqns;
}

void Trainer::Impl::bind_inputs() {
  const size_t expected = 2 + manifest.frozen_inputs.size();
  if (method->inputs_size() != expected)
    throw std::runtime_error("the program takes " + std::to_string(method->inputs_size()) +
                             " inputs; the manifest describes " + std::to_string(expected));
  auto sizes = [](const std::vector<int64_t>& shape) {
    return std::vector<executorch::aten::SizesType>(shape.begin(), shape.end());
  };
  // run() points the batch tensors at each batch; zeros until then.
  inputs_tensor = executorch::extension::make_tensor_ptr(
      sizes(manifest.input_shape), zero_inputs.data(),
      manifest.input_dtype == "float32" ? ScalarType::Float : ScalarType::Long);
  labels_tensor = executorch::extension::make_tensor_ptr(
      {static_cast<executorch::aten::SizesType>(manifest.batch_size)}, zero_labels.data(),
      ScalarType::Long);
  frozen.resize(manifest.frozen_inputs.size());
  for (size_t i = 0; i < manifest.frozen_inputs.size(); ++i) {
    const auto& shape = manifest.frozen_inputs[i].shape;
    frozen[i].assign(static_cast<size_t>(numel_of(shape)), 0.0f);
    frozen_tensors.push_back(
        executorch::extension::make_tensor_ptr(sizes(shape), frozen[i].data(), ScalarType::Float));
  }
  auto logit_bias = std::find_if(manifest.frozen_inputs.begin(), manifest.frozen_inputs.end(),
                                 [](const FrozenInput& f) { return f.kind == kLogitBias; });
  if (logit_bias != manifest.frozen_inputs.end() &&
      logit_bias->shape != std::vector<int64_t>{static_cast<int64_t>(num_classes)})
    throw std::runtime_error("the logit_bias input's shape does not match the labels");
}

void Trainer::Impl::map_outputs(const std::vector<std::string>& fqns, size_t grad_start,
                                size_t param_start) {
  const size_t n = fqns.size();
  if (grad_start < 2 || param_start != grad_start + n || method->outputs_size() != param_start + n)
    throw std::runtime_error("the program's outputs are not (loss, logits, gradients, parameters)");
  if (n != manifest.tensors.size())
    throw std::runtime_error("the program trains " + std::to_string(n) +
                             " tensors; the manifest lists " + std::to_string(manifest.tensors.size()));
  const auto& loss_out = method->get_output(0);
  const auto& logits_out = method->get_output(1);
  if (!loss_out.isTensor() || loss_out.toTensor().scalar_type() != ScalarType::Float ||
      loss_out.toTensor().numel() != 1)
    throw std::runtime_error("the program's first output is not a float loss");
  if (!logits_out.isTensor() || logits_out.toTensor().scalar_type() != ScalarType::Float ||
      tensor_shape(logits_out.toTensor()) !=
          std::vector<int64_t>{manifest.batch_size, static_cast<int64_t>(num_classes)})
    throw std::runtime_error("the program's logits are not (batch_size, labels) float32");
  for (size_t i = 0; i < n; ++i) {
    const std::string canonical = canonical_key(fqns[i]);
    auto spec = std::find_if(manifest.tensors.begin(), manifest.tensors.end(),
                             [&](const AdapterSpec& s) {
                               return s.native_name == fqns[i] || s.name == canonical;
                             });
    if (spec == manifest.tensors.end())
      throw std::runtime_error("the program's parameter " + fqns[i] + " is not in the manifest");
    if (slot_index.count(spec->name))
      throw std::runtime_error("two program parameters map to " + spec->name);
    for (size_t out : {param_start + i, grad_start + i}) {
      const auto& value = method->get_output(out);
      if (!value.isTensor() || value.toTensor().scalar_type() != ScalarType::Float ||
          tensor_shape(value.toTensor()) != spec->shape)
        throw std::runtime_error("the program's " + fqns[i] + " is not float32 of shape " +
                                 shape_text(spec->shape));
    }
    slot_index[spec->name] = slots.size();
    slots.push_back({&*spec, param_start + i, grad_start + i,
                     static_cast<size_t>(numel_of(spec->shape))});
  }
}

void Trainer::Impl::run(const void* inputs, const int64_t* labels) {
  // Every input is set again on every run: the runtime copies planned inputs in (and would
  // point unplanned ones at these bytes), so the caller's buffer only has to outlive the call.
  inputs_tensor->unsafeGetTensorImpl()->set_data(const_cast<void*>(inputs));
  labels_tensor->unsafeGetTensorImpl()->set_data(const_cast<int64_t*>(labels));
  check_ok(method->set_input(EValue(*inputs_tensor), 0), "setting the inputs");
  check_ok(method->set_input(EValue(*labels_tensor), 1), "setting the labels");
  for (size_t i = 0; i < frozen_tensors.size(); ++i)
    check_ok(method->set_input(EValue(*frozen_tensors[i]), 2 + i), "setting a frozen input");
  check_ok(method->execute(), "running forward/backward");
}

void Trainer::Impl::check_batch(const Batch& batch) const {
  if (batch.inputs.size() != input_bytes)
    throw std::invalid_argument("inputs have " + std::to_string(batch.inputs.size()) +
                                " bytes; a batch of " + shape_text(manifest.input_shape) + " " +
                                manifest.input_dtype + " has " + std::to_string(input_bytes));
  if (batch.labels.size() != static_cast<size_t>(manifest.batch_size))
    throw std::invalid_argument("a batch needs " + std::to_string(manifest.batch_size) +
                                " labels, got " + std::to_string(batch.labels.size()));
  // The loss kernel indexes by label: an out-of-range id would read past the logits.
  for (int64_t label : batch.labels)
    if (label < 0 || label >= static_cast<int64_t>(num_classes))
      throw std::invalid_argument("label " + std::to_string(label) + " is outside [0, " +
                                  std::to_string(num_classes) + ")");
}

int64_t Trainer::Impl::correct(const int64_t* labels) const {
  const float* logits = output(1).const_data_ptr<float>();
  int64_t hits = 0;
  for (int64_t row = 0; row < manifest.batch_size; ++row) {
    const float* r = logits + row * num_classes;
    // The first maximum, as numpy's argmax picks it.
    const int64_t best = std::max_element(r, r + num_classes) - r;
    hits += best == labels[row];
  }
  return hits;
}

void Trainer::Impl::sgd_step() {
  // Plain SGD, p += g * (-lr) evaluated in double as ExecuTorch's optimizer does, so the
  // adapter matches the Python backend bit for bit.
  const double alpha = -learning_rate;
  for (const Slot& slot : slots) {
    float* p = method->get_output(slot.param_output).toTensor().mutable_data_ptr<float>();
    const float* g = output(slot.grad_output).const_data_ptr<float>();
    for (size_t k = 0; k < slot.numel; ++k) p[k] = static_cast<float>(p[k] + g[k] * alpha);
  }
}

size_t Trainer::Impl::frozen_index(const std::string& kind, const std::string& name) const {
  for (size_t i = 0; i < manifest.frozen_inputs.size(); ++i)
    if (manifest.frozen_inputs[i].kind == kind && manifest.frozen_inputs[i].name == name) return i;
  return manifest.frozen_inputs.size();
}

Trainer::Trainer(const std::string& artifact_dir, double learning_rate)
    : impl_(std::make_unique<Impl>(artifact_dir, learning_rate)) {}

Trainer::~Trainer() = default;

const Manifest& Trainer::manifest() const { return impl_->manifest; }

void Trainer::set_adapter(const TensorMap& adapter) {
  for (const auto& [name, tensor] : adapter) {
    auto it = impl_->slot_index.find(name);
    if (it == impl_->slot_index.end())
      throw std::invalid_argument("unknown adapter tensor " + name);
    const AdapterSpec& spec = *impl_->slots[it->second].spec;
    if (tensor.shape != spec.shape || tensor.data.size() != impl_->slots[it->second].numel)
      throw std::invalid_argument("adapter tensor " + name + " has shape " +
                                  shape_text(tensor.shape) + ", expected " + shape_text(spec.shape));
  }
  for (const auto& [name, tensor] : adapter) {
    const auto& slot = impl_->slots[impl_->slot_index.at(name)];
    float* p = impl_->method->get_output(slot.param_output).toTensor().mutable_data_ptr<float>();
    std::memcpy(p, tensor.data.data(), slot.numel * sizeof(float));
  }
}

TensorMap Trainer::get_adapter() const {
  TensorMap out;
  for (const auto& slot : impl_->slots) {
    const float* p = impl_->output(slot.param_output).const_data_ptr<float>();
    out[slot.spec->name] = Tensor{slot.spec->shape, std::vector<float>(p, p + slot.numel)};
  }
  return out;
}

void Trainer::set_learning_rate(double learning_rate) { impl_->learning_rate = learning_rate; }

StepResult Trainer::train_step(const Batch& batch) {
  impl_->check_batch(batch);
  impl_->run(batch.inputs.data(), batch.labels.data());
  StepResult result{impl_->loss(), impl_->correct(batch.labels.data())};
  impl_->sgd_step();
  return result;
}

float Trainer::gradients(const Batch& batch, TensorMap* gradients) {
  impl_->check_batch(batch);
  impl_->run(batch.inputs.data(), batch.labels.data());
  if (gradients != nullptr) {
    gradients->clear();
    for (const auto& slot : impl_->slots) {
      const float* g = impl_->output(slot.grad_output).const_data_ptr<float>();
      (*gradients)[slot.spec->name] = Tensor{slot.spec->shape, std::vector<float>(g, g + slot.numel)};
    }
  }
  return impl_->loss();
}

std::vector<float> Trainer::logits(const std::vector<uint8_t>& inputs) {
  if (inputs.size() != impl_->input_bytes)
    throw std::invalid_argument("inputs have " + std::to_string(inputs.size()) + " bytes, expected " +
                                std::to_string(impl_->input_bytes));
  impl_->run(inputs.data(), impl_->zero_labels.data());
  const auto& t = impl_->output(1);
  return std::vector<float>(t.const_data_ptr<float>(), t.const_data_ptr<float>() + t.numel());
}

void Trainer::set_base_delta(const TensorMap& deltas) {
  const auto& frozen = impl_->manifest.frozen_inputs;
  if (std::none_of(frozen.begin(), frozen.end(),
                   [](const FrozenInput& f) { return f.kind == kBaseDelta; }))
    throw std::runtime_error("this ExecuTorch program compiles its frozen weights in; "
                             "re-export it for exact aggregation");
  for (const auto& [layer, delta] : deltas) {
    const size_t i = impl_->frozen_index(kBaseDelta, layer);
    if (i == frozen.size()) throw std::invalid_argument("no base_delta input for " + layer);
    if (delta.shape != frozen[i].shape || delta.data.size() != impl_->frozen[i].size())
      throw std::invalid_argument("base_delta for " + layer + " has shape " +
                                  shape_text(delta.shape) + ", expected " +
                                  shape_text(frozen[i].shape));
  }
  for (const auto& [layer, delta] : deltas)
    std::copy(delta.data.begin(), delta.data.end(),
              impl_->frozen[impl_->frozen_index(kBaseDelta, layer)].begin());
}

void Trainer::set_class_mask(const std::vector<int64_t>& classes) {
  const size_t i = impl_->frozen_index(kLogitBias, kLogitBias);
  if (i == impl_->manifest.frozen_inputs.size())
    throw std::runtime_error("this ExecuTorch program of workload " + impl_->manifest.workload +
                             " has no logit-bias input: it cannot mask classes");
  const int64_t n = static_cast<int64_t>(impl_->num_classes);
  for (int64_t c : classes)
    if (c < 0 || c >= n)
      throw std::invalid_argument("class id " + std::to_string(c) + " is outside [0, " +
                                  std::to_string(n) + ")");
  auto& bias = impl_->frozen[i];
  std::fill(bias.begin(), bias.end(), classes.empty() ? 0.0f : kMaskLogit);
  for (int64_t c : classes) bias[static_cast<size_t>(c)] = 0.0f;
}

}  // namespace edgefl
