// The spec file of a native ingest worker, and its log lines.
#include "worker_spec.hpp"

#include <chrono>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>

namespace edgefl::ingest {
namespace {

using nlohmann::json;

Spec spec_of(const json& j);

}  // namespace

Spec read_spec(const std::string& path) {
  std::ifstream file(path);
  if (!file) throw std::runtime_error("cannot read " + path);
  try {
    return spec_of(json::parse(file));
  } catch (const json::exception& e) {
    throw std::runtime_error("spec " + path + " is not one the leader writes: " + e.what());
  }
}

namespace {

Spec spec_of(const json& j) {
  Spec s;
  s.federation = j.at("federation");
  s.worker = j.at("worker");
  s.client_id = j.at("client_id");
  s.share_filter = j.at("share_filter");
  s.host = j.at("host");
  s.port = j.at("port");
  s.state_db = j.at("state_db");
  s.manifest_sha256 = j.at("manifest_sha256");
  s.max_samples = j.at("max_samples");
  s.rounds = j.at("rounds");
  s.batch_max = j.at("batch_max");
  s.session_expiry_s = j.at("session_expiry_s");
  s.receive_maximum = j.at("receive_maximum");
  for (const auto& t : j.at("tensors")) s.tensors.push_back({t.at("name"), t.at("shape")});
  if (!j.at("allowed_devices").is_null()) {
    s.has_allowed = true;
    for (const auto& d : j.at("allowed_devices")) s.allowed.insert(d.get<std::string>());
  }
  if (!j.at("signing_registry").is_null()) s.signing_registry = j.at("signing_registry");
  s.verbose = j.at("verbose");
  if (const json& tls = j.at("tls"); !tls.is_null()) s.tls = TlsFiles{tls.at("ca"), tls.at("cert"), tls.at("key")};
  return s;
}

}  // namespace

void log(const Spec& spec, Level level, const std::string& line) {
  if (level == Level::kInfo && !spec.verbose) return;
  auto now = std::chrono::system_clock::now();
  std::time_t seconds = std::chrono::system_clock::to_time_t(now);
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm local{};
  localtime_r(&seconds, &local);
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M:%S", &local);
  std::fprintf(stderr, "%s,%03lld %s edgefl-ingest %s: %s\n", stamp, static_cast<long long>(ms),
               level == Level::kInfo ? "INFO" : "WARNING", spec.worker.c_str(), line.c_str());
}

}  // namespace edgefl::ingest
