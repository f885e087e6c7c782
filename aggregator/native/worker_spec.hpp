// What the leader tells a native ingest worker (aggregator/native_workers.py writes it as JSON),
// and the worker's log lines.
#pragma once

#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "mqtt_subscriber.hpp"

namespace edgefl::ingest {

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
};

// What the leader tells the worker (aggregator/native_workers.py writes it).
struct Spec {
  std::string federation, worker, client_id, share_filter, host, state_db, manifest_sha256;
  int port = 1883;
  std::vector<TensorSpec> tensors;  // the shared tensors of the manifest, all float32
  int64_t max_samples = 0, rounds = 0;
  size_t batch_max = 128;
  uint32_t session_expiry_s = 3600;
  uint16_t receive_maximum = 65535;
  bool has_allowed = false;
  std::set<std::string> allowed;
  std::string signing_registry;  // "": updates are not signed
  std::optional<TlsFiles> tls;   // absent: plain TCP
  bool verbose = false;          // INFO lines too (each accepted update, rounds, the summary)
};

// The spec file the leader wrote, or std::runtime_error with a one-line reason.
Spec read_spec(const std::string& path);

enum class Level { kInfo, kWarning };

// One line on stderr in the Python aggregator's logging format; INFO only with spec.verbose
// (the leader's `-v`), as the Python workers' INFO lines.
void log(const Spec& spec, Level level, const std::string& line);

}  // namespace edgefl::ingest
