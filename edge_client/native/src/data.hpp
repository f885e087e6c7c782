// A device's local data: the partition file the Python side writes (docs/DEVICES.md).
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "trainer.hpp"

namespace edgefl {

// One task slot's examples: inputs (n x example shape) as raw bytes, and int64 labels.
struct LocalTask {
  std::string name;  // "" for a device's only task
  std::vector<int64_t> example_shape;
  std::string dtype;  // "float32" or "int64"
  std::vector<uint8_t> inputs;
  std::vector<int64_t> labels;
  size_t example_bytes() const;
};

// Reads a partition file: safetensors with `inputs` and `labels` (one task), or
// `<slot>/inputs` and `<slot>/labels` per task slot. Throws std::runtime_error.
std::vector<LocalTask> read_partition(const std::string& path);

// The examples of `task` whose label is in `classes` (continual learning).
LocalTask filter_classes(const LocalTask& task, const std::vector<int64_t>& classes);

struct TrainResult {
  int64_t steps = 0;
  int64_t samples = 0;
  double mean_loss = 0;
  double accuracy = 0;
};

// `steps` SGD steps on batches drawn without replacement, reshuffled per pass; a task with
// fewer examples than a batch is resampled with replacement (edge_client/trainer.py).
TrainResult train_local(Trainer& trainer, const LocalTask& task, int64_t steps,
                        std::mt19937_64& rng);

}  // namespace edgefl
