// C API: the trainer alone (local training and parity checks), adapters as safetensors bytes.
#include <cstring>
#include <stdexcept>
#include <string>

#include "capi_util.hpp"
#include "data.hpp"
#include "safetensors.hpp"
#include "trainer.hpp"

struct edgefl_trainer {
  explicit edgefl_trainer(const char* dir, double lr) : trainer(dir, lr) {}
  edgefl::Trainer trainer;
};

namespace {

using edgefl::Batch;
using edgefl::TensorMap;

edgefl::Trainer& need(edgefl_trainer* handle) {
  if (handle == nullptr) throw std::invalid_argument("no trainer given");
  return handle->trainer;
}

// Adapter tensors from a safetensors file in memory: F32 only, by canonical name.
TensorMap parse_tensors(const uint8_t* bytes, size_t size) {
  if (bytes == nullptr && size != 0) throw std::invalid_argument("no tensors given");
  const auto raw = edgefl::parse_safetensors(
      std::string(reinterpret_cast<const char*>(bytes), bytes ? size : 0));
  TensorMap out;
  for (const auto& [name, tensor] : raw) {
    if (tensor.dtype != "F32")
      throw std::invalid_argument("tensor " + name + " is " + tensor.dtype + ", not F32");
    edgefl::Tensor t;
    t.shape = tensor.shape;
    t.data.resize(tensor.bytes.size() / sizeof(float));
    std::memcpy(t.data.data(), tensor.bytes.data(), t.data.size() * sizeof(float));
    out[name] = std::move(t);
  }
  return out;
}

std::string serialize_tensors(const TensorMap& tensors) {
  edgefl::RawTensors raw;
  for (const auto& [name, tensor] : tensors) {
    edgefl::RawTensor& r = raw[name];
    r.dtype = "F32";
    r.shape = tensor.shape;
    r.bytes.assign(reinterpret_cast<const char*>(tensor.data.data()),
                   tensor.data.size() * sizeof(float));
  }
  return edgefl::serialize_safetensors(raw);
}

// A batch from the caller's pointers, its size checked against the program's.
Batch make_batch(const edgefl::Trainer& trainer, const void* inputs, size_t inputs_size,
                 const int64_t* labels) {
  const auto& m = trainer.manifest();
  size_t expected = m.input_dtype == "float32" ? sizeof(float) : sizeof(int64_t);
  for (int64_t d : m.input_shape) expected *= static_cast<size_t>(d);
  if (inputs == nullptr || labels == nullptr) throw std::invalid_argument("no inputs or labels given");
  if (inputs_size != expected)
    throw std::invalid_argument("inputs have " + std::to_string(inputs_size) + " bytes, expected " +
                                std::to_string(expected) + " (" + m.input_dtype + " batch)");
  Batch batch;
  const auto* bytes = static_cast<const uint8_t*>(inputs);
  batch.inputs.assign(bytes, bytes + inputs_size);
  batch.labels.assign(labels, labels + m.batch_size);
  return batch;
}

}  // namespace

extern "C" {

edgefl_trainer* edgefl_trainer_create(const char* artifact_dir, double learning_rate) {
  edgefl_trainer* handle = nullptr;
  edgefl::guarded([&] {
    if (artifact_dir == nullptr) throw std::invalid_argument("no artifact folder given");
    handle = new edgefl_trainer(artifact_dir, learning_rate);
    return 0;
  });
  return handle;
}

void edgefl_trainer_destroy(edgefl_trainer* trainer) { delete trainer; }

int edgefl_trainer_set_adapter(edgefl_trainer* trainer, const uint8_t* safetensors, size_t size) {
  return edgefl::guarded([&] {
    auto& t = need(trainer);
    t.set_adapter(parse_tensors(safetensors, size));
    return 0;
  });
}

int edgefl_trainer_get_adapter(edgefl_trainer* trainer, edgefl_buffer* out) {
  return edgefl::guarded([&] { return edgefl::to_buffer(serialize_tensors(need(trainer).get_adapter()), out); });
}

int edgefl_trainer_step(edgefl_trainer* trainer, const void* inputs, size_t inputs_size,
                        const int64_t* labels, float* loss) {
  return edgefl::guarded([&] {
    auto& t = need(trainer);
    const auto result = t.train_step(make_batch(t, inputs, inputs_size, labels));
    if (loss != nullptr) *loss = result.loss;
    return 0;
  });
}

int edgefl_trainer_gradients(edgefl_trainer* trainer, const void* inputs, size_t inputs_size,
                             const int64_t* labels, float* loss, edgefl_buffer* gradients) {
  return edgefl::guarded([&] {
    auto& t = need(trainer);
    if (gradients == nullptr) throw std::invalid_argument("no output buffer given");
    TensorMap grads;
    const float value = t.gradients(make_batch(t, inputs, inputs_size, labels), &grads);
    if (loss != nullptr) *loss = value;
    return edgefl::to_buffer(serialize_tensors(grads), gradients);
  });
}

int edgefl_trainer_set_class_mask(edgefl_trainer* trainer, const int64_t* classes, size_t count) {
  return edgefl::guarded([&] {
    auto& t = need(trainer);
    if (classes == nullptr && count != 0) throw std::invalid_argument("no classes given");
    t.set_class_mask(count ? std::vector<int64_t>(classes, classes + count)
                           : std::vector<int64_t>{});
    return 0;
  });
}

int edgefl_trainer_set_base_delta(edgefl_trainer* trainer, const uint8_t* safetensors,
                                  size_t size) {
  return edgefl::guarded([&] {
    auto& t = need(trainer);
    t.set_base_delta(parse_tensors(safetensors, size));
    return 0;
  });
}

int edgefl_trainer_train_partition(edgefl_trainer* trainer, const char* partition_path,
                                   const char* task, int64_t steps, uint64_t seed,
                                   double* mean_loss, double* accuracy) {
  return edgefl::guarded([&] {
    auto& t = need(trainer);
    if (partition_path == nullptr) throw std::invalid_argument("no partition file given");
    const auto tasks = edgefl::read_partition(partition_path);
    const edgefl::LocalTask* chosen = nullptr;
    for (const auto& candidate : tasks)
      if (task == nullptr ? tasks.size() == 1 : candidate.name == task) chosen = &candidate;
    if (chosen == nullptr)
      throw std::invalid_argument(task ? "the partition has no task slot " + std::string(task)
                                       : "the partition has several task slots; name one");
    std::mt19937_64 rng(seed);
    const auto result = edgefl::train_local(t, *chosen, steps, rng);
    if (mean_loss != nullptr) *mean_loss = result.mean_loss;
    if (accuracy != nullptr) *accuracy = result.accuracy;
    return 0;
  });
}

}  // extern "C"
