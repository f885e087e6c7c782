// A device's local data: partition files, class filters and the local training loop.
#include "data.hpp"

#include <algorithm>
#include <cstring>
#include <map>
#include <set>
#include <stdexcept>

#include "safetensors.hpp"

namespace edgefl {

namespace {

size_t item_size(const std::string& dtype) { return dtype == "float32" ? 4 : 8; }

// The tensors of one slot as the file holds them, before their shapes are checked.
struct SlotTensors {
  const RawTensor* inputs = nullptr;
  const RawTensor* labels = nullptr;
};

LocalTask make_task(const std::string& name, const SlotTensors& slot) {
  const std::string where = name.empty() ? "partition" : "partition slot " + name;
  if (slot.inputs == nullptr || slot.labels == nullptr)
    throw std::runtime_error(where + " needs both inputs and labels");
  const RawTensor& x = *slot.inputs;
  const RawTensor& y = *slot.labels;
  if (y.dtype != "I64" || y.shape.size() != 1 || y.shape[0] < 0 ||
      y.bytes.size() != static_cast<size_t>(y.shape[0]) * sizeof(int64_t))
    throw std::runtime_error(where + ": labels must be a 1-d I64 tensor");
  if (x.dtype != "F32" && x.dtype != "I64")
    throw std::runtime_error(where + ": inputs must be F32 or I64, not " + x.dtype);
  if (x.shape.empty() || x.shape[0] != y.shape[0])
    throw std::runtime_error(where + ": inputs and labels hold different numbers of examples");
  LocalTask task;
  task.name = name;
  task.dtype = x.dtype == "F32" ? "float32" : "int64";
  task.example_shape.assign(x.shape.begin() + 1, x.shape.end());
  task.inputs.assign(x.bytes.begin(), x.bytes.end());
  task.labels.resize(static_cast<size_t>(y.shape[0]));
  std::memcpy(task.labels.data(), y.bytes.data(), task.labels.size() * sizeof(int64_t));
  if (task.inputs.size() != task.labels.size() * task.example_bytes())
    throw std::runtime_error(where + ": inputs size does not match their shape");
  return task;
}

// An unbiased index in [0, bound): std::uniform_int_distribution differs between standard
// libraries, and a device should draw the same batches for a seed on Android and iOS alike.
uint64_t draw_below(uint64_t bound, std::mt19937_64& rng) {
  const uint64_t limit = UINT64_MAX - UINT64_MAX % bound;
  uint64_t r;
  do {
    r = rng();
  } while (r >= limit);
  return r % bound;
}

// A fresh permutation of `order`'s positions (Fisher-Yates, same reason as draw_below).
void permute(std::vector<size_t>& order, std::mt19937_64& rng) {
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[draw_below(i, rng)]);
}

}  // namespace

size_t LocalTask::example_bytes() const {
  size_t n = item_size(dtype);
  for (int64_t d : example_shape) n *= static_cast<size_t>(d);
  return n;
}

std::vector<LocalTask> read_partition(const std::string& path) {
  const RawTensors tensors = parse_safetensors(read_file(path));
  std::map<std::string, SlotTensors> slots;  // slot name ("" for a single task) -> tensors
  for (const auto& [key, tensor] : tensors) {
    const size_t slash = key.rfind('/');
    const std::string slot = slash == std::string::npos ? "" : key.substr(0, slash);
    const std::string field = slash == std::string::npos ? key : key.substr(slash + 1);
    if ((slash != std::string::npos && slot.empty()) || (field != "inputs" && field != "labels"))
      throw std::runtime_error("partition: unexpected tensor " + key +
                               " (want inputs/labels or <slot>/inputs, <slot>/labels)");
    (field == "inputs" ? slots[slot].inputs : slots[slot].labels) = &tensor;
  }
  if (slots.empty()) throw std::runtime_error("partition: no tensors in " + path);
  if (slots.count("") && slots.size() > 1)
    throw std::runtime_error("partition: mixes an unnamed task with named slots");
  std::vector<LocalTask> tasks;
  for (const auto& [name, slot] : slots) tasks.push_back(make_task(name, slot));
  return tasks;
}

LocalTask filter_classes(const LocalTask& task, const std::vector<int64_t>& classes) {
  const std::set<int64_t> keep(classes.begin(), classes.end());
  LocalTask out;
  out.name = task.name;
  out.example_shape = task.example_shape;
  out.dtype = task.dtype;
  const size_t bytes = task.example_bytes();
  for (size_t i = 0; i < task.labels.size(); ++i) {
    if (!keep.count(task.labels[i])) continue;
    out.labels.push_back(task.labels[i]);
    const auto* start = task.inputs.data() + i * bytes;
    out.inputs.insert(out.inputs.end(), start, start + bytes);
  }
  return out;
}

TrainResult train_local(Trainer& trainer, const LocalTask& task, int64_t steps,
                        std::mt19937_64& rng) {
  const Manifest& manifest = trainer.manifest();
  const size_t batch = static_cast<size_t>(manifest.batch_size);
  const std::vector<int64_t> example(manifest.input_shape.begin() + 1, manifest.input_shape.end());
  if (task.labels.empty()) throw std::invalid_argument("a device with no local examples cannot train");
  if (steps <= 0) throw std::invalid_argument("local training needs at least one step");
  if (task.dtype != manifest.input_dtype || task.example_shape != example)
    throw std::invalid_argument("the task's examples do not have the program's input shape/dtype");
  // Programs have a static batch size: a device with fewer examples than a batch fills the
  // batch by sampling its examples with replacement, then trains on that sample.
  std::vector<size_t> pool(task.labels.size());
  for (size_t i = 0; i < pool.size(); ++i) pool[i] = i;
  if (pool.size() < batch) {
    std::vector<size_t> sample(batch);
    for (size_t& s : sample) s = draw_below(task.labels.size(), rng);
    pool = std::move(sample);
  }
  std::vector<size_t> order(pool.size());
  permute(order, rng);
  const size_t bytes = task.example_bytes();
  Batch b;
  b.inputs.resize(batch * bytes);
  b.labels.resize(batch);
  size_t cursor = 0;
  double loss_sum = 0;
  int64_t correct = 0;
  for (int64_t step = 0; step < steps; ++step) {
    if (cursor + batch > order.size()) {  // a new pass, reshuffled
      permute(order, rng);
      cursor = 0;
    }
    for (size_t j = 0; j < batch; ++j) {
      const size_t example_index = pool[order[cursor + j]];
      std::memcpy(b.inputs.data() + j * bytes, task.inputs.data() + example_index * bytes, bytes);
      b.labels[j] = task.labels[example_index];
    }
    cursor += batch;
    const StepResult r = trainer.train_step(b);
    loss_sum += r.loss;
    correct += r.correct;
  }
  TrainResult result;
  result.steps = steps;
  result.samples = static_cast<int64_t>(task.labels.size());
  result.mean_loss = loss_sum / static_cast<double>(steps);
  result.accuracy = static_cast<double>(correct) / static_cast<double>(steps * manifest.batch_size);
  return result;
}

}  // namespace edgefl
