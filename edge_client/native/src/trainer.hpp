// Local training through an exported ExecuTorch training program (.pte), with plain SGD.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "codec.hpp"

namespace edgefl {

// What the device needs of manifest.json (protocol/manifest.py), and its SHA-256.
struct FrozenInput {
  std::string kind;  // "base_delta" (exact aggregation) or "logit_bias" (class masks)
  std::string name;
  std::vector<int64_t> shape;
};
struct AdapterSpec {
  std::string name;         // canonical (peft name without the adapter name)
  std::string native_name;  // as in the program
  std::vector<int64_t> shape;
};
struct Manifest {
  std::string workload;
  std::string sha256;  // of manifest.json's bytes as shipped
  int64_t batch_size = 0;
  std::vector<int64_t> input_shape;
  std::string input_dtype;  // "float32" or "int64"
  std::vector<std::string> labels;
  std::vector<AdapterSpec> tensors;
  std::vector<FrozenInput> frozen_inputs;
  std::string executorch_file;  // relative to the artifact folder
  std::string adapter_init_file;

  static Manifest load(const std::string& artifact_dir);  // throws std::runtime_error
  bool is_personal(const std::string& canonical_name) const;  // CoLoRA cores
};

struct StepResult {
  float loss = 0;
  int64_t correct = 0;  // argmax(logits) == label within the batch
};

// A batch exactly as the program takes it: inputs of manifest.input_shape/input_dtype (raw
// little-endian bytes) and batch_size int64 labels.
struct Batch {
  std::vector<uint8_t> inputs;
  std::vector<int64_t> labels;
};

class Trainer {
 public:
  Trainer(const std::string& artifact_dir, double learning_rate);
  ~Trainer();
  const Manifest& manifest() const;

  // Copies the given tensors into the program's parameters by canonical name; tensors not
  // given keep their values. Throws std::invalid_argument on an unknown name or a wrong shape
  // (before changing anything).
  void set_adapter(const TensorMap& adapter);
  TensorMap get_adapter() const;
  void set_learning_rate(double learning_rate);

  StepResult train_step(const Batch& batch);                 // forward/backward + SGD
  float gradients(const Batch& batch, TensorMap* gradients);  // no step (parity checks)
  std::vector<float> logits(const std::vector<uint8_t>& inputs);  // (batch, classes)

  // Frozen inputs: W0 + delta per layer (throws if the program has none), and the logit bias
  // masking every class outside `classes` (empty: no mask).
  void set_base_delta(const TensorMap& deltas);
  void set_class_mask(const std::vector<int64_t>& classes);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace edgefl
