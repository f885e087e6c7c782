// edgefl-ingest: one native worker of `edgefl aggregator --workers N --worker-kind native`.
// It does what aggregator.workers.IngestWorker does, for the partial-sum strategies (fedavg,
// flora, colora): take updates from the share group, check them as Coordinator.validate does
// (the same rejection reasons), fold the accepted ones into a float64 weighted sum, and commit
// each group of them with the sum to the state database before acknowledging any. The leader
// (Python) merges the partial sums and publishes the globals; this process never publishes.
//
//   edgefl-ingest SPEC.json   (written by the leader; see aggregator/native_workers.py)
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "codec.hpp"
#include "mqtt_subscriber.hpp"
#include "safetensors.hpp"
#include "signing_registry.hpp"
#include "state_store.hpp"
#include "worker_spec.hpp"

namespace edgefl::ingest {
namespace {

using nlohmann::json;

constexpr int kPollMs = 200;  // as aggregator.coordinator.POLL_S
const char* const kWeight = "/weight";  // the scalars of a sum snapshot (aggregator/families.py)
const char* const kCount = "/count";

volatile std::sig_atomic_t stopping = 0;

// One message handled in memory, acknowledged after the commit of its group.
struct Handled {
  Publish message;
  bool accepted = false;
  AcceptedRow row;
};

class Worker {
 public:
  explicit Worker(Spec spec)
      : spec_(std::move(spec)), store_(spec_.state_db),
        mqtt_(spec_.host, spec_.port, spec_.client_id, spec_.session_expiry_s, spec_.receive_maximum,
              spec_.tls) {
    if (!spec_.signing_registry.empty()) registry_ = std::make_unique<SigningRegistry>(spec_.signing_registry);
    if (auto saved = store_.rejections(spec_.worker)) {  // a restarted worker goes on counting
      for (const auto& [reason, count] : json::parse(*saved).items()) rejections_[reason] = count;
    }
    follow();
  }

  int run() {
    mqtt_.connect();
    mqtt_.subscribe(spec_.share_filter);
    // Our row says we subscribed: the leader waits for every worker's before round 0 opens.
    store_.record_rejections(spec_.worker, rejections_json());
    shared_ = rejections_;
    while (!stopping && round_ < spec_.rounds) {
      std::optional<Publish> message = mqtt_.next(group_.empty() ? kPollMs : 0);
      if (message) {
        fold(std::move(*message));
        if (group_.size() < spec_.batch_max) continue;
      }
      flush();
      // The round may have moved on: looked at after each commit and each idle wait, not per
      // update (an update of a newer round asks, in validate; a closed round fails the commit).
      catch_up();
    }
    flush();
    mqtt_.disconnect();
    rusage usage{};
    getrusage(RUSAGE_SELF, &usage);
    double user = usage.ru_utime.tv_sec + usage.ru_utime.tv_usec / 1e6;
    double system = usage.ru_stime.tv_sec + usage.ru_stime.tv_usec / 1e6;
    char line[200];
    std::snprintf(line, sizeof line,
                  "stopped: %lld updates accepted in %lld group commits (%.2f s), CPU %.2f s user + "
                  "%.2f s system, peak RSS %.1f MiB",
                  static_cast<long long>(accepted_), static_cast<long long>(commits_), commit_s_, user, system,
                  usage.ru_maxrss / 1024.0);
    log(spec_, Level::kInfo, line);
    return 0;
  }

 private:
  // Follow the leader when it stored a newer global (after committing what we hold).
  void catch_up() {
    if (store_.latest_round() != round_) {
      flush();
      follow();
    }
  }

  // Take the newest global and our partial sum of its round from the store.
  void follow() {
    auto latest = store_.latest_global();
    if (!latest) throw StoreError("the state database holds no global yet");
    if (latest->first != round_) log(spec_, Level::kInfo, "round " + std::to_string(latest->first) + " open");
    round_ = latest->first;
    RawTensors tensors = parse_safetensors(latest->second);
    global_.clear();
    for (const TensorSpec& t : spec_.tensors) {
      auto found = tensors.find(t.name);
      if (found == tensors.end() || found->second.dtype != "F32" || found->second.shape != t.shape)
        throw StoreError("the stored global does not match the manifest at tensor " + t.name);
      std::vector<float>& v = global_[t.name];
      v.resize(found->second.bytes.size() / 4);
      std::memcpy(v.data(), found->second.bytes.data(), found->second.bytes.size());
    }
    sums_.clear();
    weight_ = 0;
    count_ = 0;
    metric_sums_.clear();
    bytes_ = 0;
    reported_.clear();
    group_ids_.clear();
    if (auto saved = store_.partial(round_, spec_.worker)) {
      weight_ = saved->weight;
      bytes_ = saved->bytes;
      for (const auto& [name, value] : json::parse(saved->metric_sums).items()) metric_sums_[name] = value;
      if (!saved->snapshot.empty()) {
        for (auto& [name, raw] : parse_safetensors(saved->snapshot)) {
          if (raw.dtype != "F64") throw StoreError("a partial sum tensor is not float64");
          std::vector<double> v(raw.bytes.size() / 8);
          std::memcpy(v.data(), raw.bytes.data(), raw.bytes.size());
          if (name == kCount) {
            count_ = static_cast<int64_t>(v.at(0));
          } else if (name != kWeight) {
            sums_[name] = std::move(v);
          }
        }
      }
    }
  }

  void fold(Publish message) {
    Handled h{std::move(message), false, {}};
    judge(h);
    group_.push_back(std::move(h));
  }

  // Validate one message and fold it in, or count its rejection; sets h.accepted.
  void judge(Handled& h) {
    h.accepted = false;
    try {
      Update update = validate(h.message);
      add(update, h);
      h.accepted = true;
    } catch (const Rejected& r) {
      reject(h.message.topic, r);
    } catch (const std::exception& e) {  // no message may crash the gateway, whatever it holds
      reject(h.message.topic, {"invalid", e.what()});
    }
  }

  // Coordinator.validate and IngestWorker.validate, check for check, reason for reason.
  Update validate(const Publish& m) {
    std::vector<std::string> parts;
    std::stringstream topic(m.topic);
    for (std::string part; std::getline(topic, part, '/');) parts.push_back(part);
    if (!m.topic.empty() && m.topic.back() == '/') parts.push_back("");  // as Python's split
    if (parts.size() != 5 || parts[0] != "fl" || parts[1] != "v1" || parts[3] != "update")
      throw Rejected{"malformed", "not a device topic: " + m.topic};
    const std::string& federation = parts[2];
    const std::string& device_id = parts[4];
    std::string opened;
    const std::string* payload = &m.payload;
    if (registry_) {
      opened = registry_->open(device_id, m.payload);
      payload = &opened;
    }
    Update u;
    try {
      u = decode_update(*payload);
    } catch (const std::exception& e) {  // DecodeError, or a limit of the decoder
      throw Rejected{"malformed", e.what()};
    }
    if (u.federation != spec_.federation || federation != u.federation)
      throw Rejected{"federation", "update for " + u.federation};
    if (u.device_id != device_id) throw Rejected{"device-mismatch", u.device_id + " sent on " + device_id + "'s topic"};
    if (spec_.has_allowed && !spec_.allowed.count(device_id)) throw Rejected{"unknown-device", device_id};
    if (u.manifest_sha256 != spec_.manifest_sha256) throw Rejected{"manifest", device_id + " trains another model version"};
    if (group_ids_.count(u.update_id) || store_.is_accepted(u.update_id))
      throw Rejected{"duplicate", "update " + u.update_id + " already counted"};
    std::string rounds = "round " + std::to_string(u.round) + " in " + std::to_string(round_);
    if (u.round < round_) throw Rejected{"stale-round", device_id + " sent " + rounds};
    if (u.round > round_ && store_.latest_round() > round_) {
      // The leader opened a newer round: commit the group of ours, then judge this one there.
      catch_up();
      return validate(m);
    }
    if (u.round > round_) throw Rejected{"future-round", device_id + " sent " + rounds};
    if (!u.task.empty()) throw Rejected{"task", device_id + " sent a task slot; this federation trains one adapter per device"};
    if (reported_.count(device_id)) throw Rejected{"duplicate-device", device_id + " already reported round " + std::to_string(round_)};
    check_tensors(u);
    if (store_.slot_reported(round_, device_id))  // counted by another worker
      throw Rejected{"duplicate-device", device_id + " already reported round " + std::to_string(round_)};
    return u;
  }

  // Manifest.check_adapter(shared_only=True), then check_finite.
  void check_tensors(const Update& u) const {
    if (u.adapter.size() != spec_.tensors.size())
      throw Rejected{"tensors", "adapter tensor names differ"};
    for (const TensorSpec& t : spec_.tensors) {
      auto found = u.adapter.find(t.name);
      if (found == u.adapter.end()) throw Rejected{"tensors", "adapter tensor names differ: missing " + t.name};
      if (found->second.shape != t.shape) throw Rejected{"tensors", "tensor " + t.name + " has another shape"};
    }
    for (const auto& [name, tensor] : u.adapter) {
      // NaN and Inf are the floats whose exponent bits are all ones: an integer test that the
      // compiler vectorizes, one branch per tensor rather than per value.
      const uint32_t* bits = reinterpret_cast<const uint32_t*>(tensor.data.data());
      uint32_t bad = 0;
      for (size_t i = 0; i < tensor.data.size(); ++i) bad |= (bits[i] & 0x7F800000u) == 0x7F800000u;
      if (bad) throw Rejected{"tensors", "tensor " + name + " holds NaN or Inf"};
    }
  }

  // Coordinator._contribution, then the streaming family's accumulate (aggregator/strategies.py):
  // sums += float64(adapter) * weight, with the weight the device's samples capped at max_samples.
  void add(const Update& u, Handled& h) {
    double weight = static_cast<double>(std::min(u.num_samples, spec_.max_samples));
    if (!(weight > 0)) throw Rejected{"invalid", "aggregation weight must be positive"};
    bool first = sums_.empty();
    for (const auto& [name, tensor] : u.adapter) {
      const std::vector<float>& start = global_.at(name);
      std::vector<double>& sum = sums_[name];
      if (first) sum.assign(tensor.data.size(), 0.0);
      for (size_t i = 0; i < tensor.data.size(); ++i) {
        float x = u.is_delta ? start[i] + tensor.data[i] : tensor.data[i];  // float32 add, as numpy
        double term = static_cast<double>(x) * weight;
        sum[i] = first ? term : sum[i] + term;
      }
    }
    weight_ += weight;
    count_ += 1;
    bytes_ += static_cast<int64_t>(h.message.payload.size());
    for (const auto& [name, value] : u.metrics) metric_sums_[name] += value * weight;
    reported_.insert(u.device_id);
    group_ids_.insert(u.update_id);
    h.row = {u.update_id, u.device_id, u.num_samples, weight};
  }

  void reject(const std::string& topic, const Rejected& r) {
    rejections_[r.reason] += 1;
    if (r.reason != "duplicate")  // redelivered duplicates are expected with QoS 1
      log(spec_, Level::kWarning, "rejected update on " + topic + ": " + r.reason + ": " + r.detail);
  }

  // Commit the group, then acknowledge its messages in arrival order.
  void flush() {
    if (group_.empty()) return;
    std::vector<Handled> group = std::move(group_);
    group_.clear();
    std::vector<Handled*> pending;
    for (Handled& h : group)
      if (h.accepted) pending.push_back(&h);
    while (!pending.empty()) {
      std::vector<AcceptedRow> rows;
      for (Handled* h : pending) rows.push_back(h->row);
      auto t0 = std::chrono::steady_clock::now();
      Commit done = store_.accept_partial(spec_.worker, round_, rows, partial_row(), rejections_json());
      commit_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (done == Commit::kDone) {
        shared_ = rejections_;
        commits_ += 1;
        accepted_ += static_cast<int64_t>(rows.size());
        for (const AcceptedRow& row : rows)
          log(spec_, Level::kInfo, "round " + std::to_string(round_) + ": accepted " + row.slot + " (" +
                         std::to_string(row.num_samples) + " samples)");
        break;
      }
      // Lost a race with the leader's close or another worker's commit: back to what the
      // store holds, and check the group's updates again (now stale, or duplicates).
      log(spec_, Level::kInfo, std::string(done == Commit::kRoundClosed ? "round closed" : "a slot was taken") +
                     "; handling " + std::to_string(rows.size()) + " updates again");
      follow();
      std::vector<Handled*> again;
      for (Handled* h : pending) {
        judge(*h);
        if (h->accepted) again.push_back(h);
      }
      pending = std::move(again);
    }
    if (rejections_ != shared_) {  // rejections only: store the counts for the status page
      store_.record_rejections(spec_.worker, rejections_json());
      shared_ = rejections_;
    }
    group_ids_.clear();
    for (const Handled& h : group) mqtt_.ack(h.message.packet_id);
  }

  PartialRow partial_row() const {
    PartialRow row;
    row.weight = weight_;
    row.bytes = bytes_;
    row.metric_sums = json(metric_sums_).dump();
    if (!sums_.empty()) {
      RawTensors tensors;
      for (const auto& [name, sum] : sums_) {
        RawTensor& t = tensors[name];
        t.dtype = "F64";
        t.shape = shape_of(name);
        t.bytes.assign(reinterpret_cast<const char*>(sum.data()), sum.size() * sizeof(double));
      }
      for (auto [name, value] : {std::pair{kWeight, weight_}, std::pair{kCount, static_cast<double>(count_)}}) {
        RawTensor& t = tensors[name];
        t.dtype = "F64";
        t.bytes.assign(reinterpret_cast<const char*>(&value), sizeof(double));
      }
      row.snapshot = serialize_safetensors(tensors);
    }
    return row;
  }

  std::vector<int64_t> shape_of(const std::string& name) const {
    for (const TensorSpec& t : spec_.tensors)
      if (t.name == name) return t.shape;
    return {};
  }

  std::string rejections_json() const { return json(rejections_).dump(); }

  Spec spec_;
  StateStore store_;
  MqttSubscriber mqtt_;
  std::unique_ptr<SigningRegistry> registry_;
  int64_t round_ = -1;
  std::map<std::string, std::vector<float>> global_;
  std::map<std::string, std::vector<double>> sums_;
  double weight_ = 0;
  int64_t count_ = 0, bytes_ = 0;
  int64_t accepted_ = 0, commits_ = 0;  // this process's, for its last log line
  double commit_s_ = 0;
  std::map<std::string, double> metric_sums_;
  std::set<std::string> reported_, group_ids_;
  std::map<std::string, int64_t> rejections_, shared_;
  std::vector<Handled> group_;
};

}  // namespace
}  // namespace edgefl::ingest

int main(int argc, char** argv) {
  using namespace edgefl::ingest;
  if (argc != 2) {
    std::fprintf(stderr, "usage: edgefl-ingest SPEC.json (started by edgefl aggregator --workers N "
                         "--worker-kind native)\n");
    return 2;
  }
  std::signal(SIGTERM, [](int) { stopping = 1; });
  std::signal(SIGINT, [](int) { stopping = 1; });
  try {
    Worker worker(read_spec(argv[1]));
    return worker.run();
  } catch (const std::exception& e) {  // the supervisor restarts us; the broker keeps our updates
    std::fprintf(stderr, "edgefl-ingest: %s\n", e.what());
    return 1;
  }
}
