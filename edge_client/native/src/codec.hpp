// Wire messages of docs/PROTOCOL.md: the zstd/safetensors frame, globals, updates, status.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace edgefl {

// A dense float32 tensor (row-major).
struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> data;
};
using TensorMap = std::map<std::string, Tensor>;

// A payload that breaks a rule of the protocol; what() is one line naming the rule.
struct DecodeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct TrainConfig {
  int64_t local_steps = 20;
  double learning_rate = 0.05;
  std::string update_encoding = "fp32";  // fp32, fp16, int8, int8-channel
  std::optional<double> update_topk;     // (0, 1], absent: dense
};

// Aggregator -> devices: the global adapter opening `round` (section 4 of PROTOCOL.md).
struct GlobalModel {
  std::string federation;
  int64_t round = 0;
  std::string manifest_sha256;
  TensorMap adapter;
  TrainConfig train;
  bool final = false;
  bool residual = false;
  TensorMap residual_step;                  // <layer>.U / <layer>.V factors
  std::vector<TensorMap> clusters;          // FL-TAC
  std::map<std::string, int64_t> assignment;  // slot -> cluster
  std::optional<int64_t> task_index;        // continual learning
  std::vector<int64_t> task_classes;        // empty unless task_index is set

  // The adapter a slot (device id, plus "/<task>") starts from: its cluster's, else adapter.
  const TensorMap& start_adapter(const std::string& device_id, const std::string& task) const;
};

// Aggregator -> devices, on the residual topic: R_t for devices not level with t - 1.
struct ResidualModel {
  std::string federation;
  int64_t round = 0;
  std::string manifest_sha256;
  TensorMap residual;  // <layer>.U / <layer>.V, or <layer>.dense
  double truncation_error = 0.0;
};

// Device -> aggregator (section 5).
struct Update {
  std::string federation;
  int64_t round = 0;
  std::string device_id;
  std::string manifest_sha256;
  int64_t num_samples = 0;
  std::string update_id;
  TensorMap adapter;
  std::map<std::string, double> metrics;
  bool is_delta = false;
  std::string task;  // "" for a device's only slot
};

struct Status {
  std::string device_id;
  bool online = false;
  std::optional<std::string> problem;
};

// Decoders validate every rule of the protocol and throw DecodeError.
GlobalModel decode_global(const std::string& payload);
ResidualModel decode_residual(const std::string& payload);
Update decode_update(const std::string& payload);  // tensors dequantised to dense float32
Status decode_status(const std::string& payload);

// Encoders (as the Python reference: zstd level 3 with content size and checksum).
std::string encode_update(const Update& update, const std::string& encoding,
                          std::optional<double> topk);
std::string encode_global(const GlobalModel& message);
std::string encode_status(bool online, const std::string& device_id,
                          const std::optional<std::string>& problem = std::nullopt);

// A fresh update id, `<device>[-<task>]-<round>-<12 random hex>` (as protocol.messages).
std::string new_update_id(const std::string& device_id, int64_t round, const std::string& task);

// Dense R of residual factors/matrices: {layer: U @ V or dense} (protocol/residual.py).
TensorMap dense_residual(const TensorMap& factors);

// Plain safetensors files (no zstd) for device state and data partitions.
TensorMap read_safetensors_file(const std::string& path,
                                std::map<std::string, std::string>* metadata = nullptr);
void write_safetensors_file(const std::string& path, const TensorMap& tensors,
                            const std::map<std::string, std::string>& metadata = {});

}  // namespace edgefl
