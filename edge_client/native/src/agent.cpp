// The device agent: serves rounds of docs/PROTOCOL.md as edge_client/agent.py does.
#include "agent.hpp"

#include <mosquitto.h>
#include <mqtt_protocol.h>
#include <sys/stat.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>

#include "quant.hpp"  // detail::shape_text
#include "safetensors.hpp"

namespace edgefl {

namespace {

using detail::shape_text;
constexpr int kSessionExpiryS = 3600;  // the broker keeps our subscription and queue this long
constexpr auto kAckTimeout = std::chrono::seconds(30);
constexpr size_t kInboxMax = 16;  // globals supersede each other: the newest few are enough
const char kPendingMagic[] = "EFP2";

std::once_flag lib_init;

Agent* self(void* userdata) { return static_cast<Agent*>(userdata); }

void cb_connect(mosquitto*, void* ud, int rc, int, const mosquitto_property*) { self(ud)->on_connect(rc); }
void cb_disconnect(mosquitto*, void* ud, int rc, const mosquitto_property*) { self(ud)->on_disconnect(rc); }
void cb_publish(mosquitto*, void* ud, int mid, int, const mosquitto_property*) { self(ud)->on_publish(mid); }
void cb_message(mosquitto*, void* ud, const mosquitto_message* m, const mosquitto_property*) {
  self(ud)->on_message(m->topic ? m->topic : "",
                       std::string(static_cast<const char*>(m->payload), m->payloadlen));
}

std::string u64_be(uint64_t v) {
  std::string out(8, '\0');
  for (int i = 7; i >= 0; --i, v >>= 8) out[i] = static_cast<char>(v & 0xff);
  return out;
}

uint64_t read_u64_be(const std::string& s, size_t at) {
  uint64_t v = 0;
  for (size_t i = 0; i < 8; ++i) v = (v << 8) | static_cast<uint8_t>(s[at + i]);
  return v;
}

TensorMap only(const TensorMap& tensors, bool personal, const Manifest& m) {
  TensorMap out;
  for (const auto& [k, v] : tensors)
    if (m.is_personal(k) == personal) out.emplace(k, v);
  return out;
}
}  // namespace

void log_line(const std::string& level, const std::string& device, const std::string& text) {
  char stamp[32];
  std::time_t now = std::time(nullptr);
  std::strftime(stamp, sizeof stamp, "%H:%M:%S", std::localtime(&now));
  std::fprintf(stderr, "%s %s %s: %s\n", stamp, level.c_str(), device.c_str(), text.c_str());
}

#define LOG(level, text) log_line(level, config_.device_id, text)

Agent::Agent(AgentConfig config)
    : Agent(config, std::make_shared<Trainer>(config.artifact_dir, 0.05),
            std::make_shared<std::mutex>()) {}

Agent::Agent(AgentConfig config, std::shared_ptr<Trainer> trainer, std::shared_ptr<std::mutex> lock)
    : config_(std::move(config)), trainer_(std::move(trainer)), train_lock_(std::move(lock)) {
  if (!config_.signing_key_file.empty())
    signing_key_.emplace(SigningKey::from_pem_file(config_.signing_key_file));
  rng_.seed(config_.seed);
  const std::string root = "fl/v1/" + config_.federation;
  global_topic_ = root + "/global";
  residual_topic_ = root + "/residual";
  update_topic_ = root + "/update/" + config_.device_id;
  status_topic_ = root + "/status/" + config_.device_id;
  // The same rule as topic segments on the wire: a bad id is refused before connecting.
  for (const std::string* s : {&config_.device_id, &config_.federation}) {
    if (s->empty() || s->size() > 255 || s->find_first_of(std::string("/+#\0", 4)) != std::string::npos)
      throw std::invalid_argument("device id and federation must be 1-255 bytes without / + # NUL");
  }
  load_state();
  load_pending();
  load_residual();
}

Agent::~Agent() {
  if (mosq_ != nullptr) {
    mosquitto_loop_stop(mosq_, true);
    mosquitto_destroy(mosq_);
  }
}

void Agent::set_tasks(std::vector<LocalTask> tasks) {
  if (tasks.empty()) throw std::invalid_argument("a device needs at least one task of data");
  std::set<std::string> names;
  for (const auto& t : tasks) {
    if (!names.insert(t.name).second) throw std::invalid_argument("task slots need distinct names");
    if (tasks.size() > 1 && t.name.empty()) throw std::invalid_argument("several task slots need names");
    // Checked here, once: data of another model would otherwise fail every round.
    const Manifest& m = trainer_->manifest();
    const std::vector<int64_t> example(m.input_shape.begin() + 1, m.input_shape.end());
    if (t.example_shape != example || t.dtype != m.input_dtype)
      throw std::invalid_argument("the data's examples are " + t.dtype + " of shape " +
                                  shape_text(t.example_shape) + "; the program takes " +
                                  m.input_dtype + " of shape " + shape_text(example));
    for (int64_t label : t.labels)
      if (label < 0 || label >= static_cast<int64_t>(m.labels.size()))
        throw std::invalid_argument("the data has label " + std::to_string(label) +
                                    "; the program has " + std::to_string(m.labels.size()) +
                                    " classes");
  }
  tasks_ = std::move(tasks);
  std::lock_guard<std::mutex> lock(*train_lock_);
  for (const auto& t : tasks_) personal_[t.name] = load_personal(t.name);
}

// ---- connection ------------------------------------------------------------------------

void Agent::connect() {
  std::call_once(lib_init, [] { mosquitto_lib_init(); });
  const std::string client_id = config_.federation + "-" + config_.device_id;
  // clean_session=false: with MQTT 5 that is clean start off, a session that outlives the
  // connection (the broker queues the retained global and our QoS 1 traffic while away).
  mosq_ = mosquitto_new(client_id.c_str(), false, this);
  if (mosq_ == nullptr) throw std::runtime_error("cannot create an MQTT client");
  mosquitto_int_option(mosq_, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V5);
  mosquitto_connect_v5_callback_set(mosq_, cb_connect);
  mosquitto_disconnect_v5_callback_set(mosq_, cb_disconnect);
  mosquitto_publish_v5_callback_set(mosq_, cb_publish);
  mosquitto_message_v5_callback_set(mosq_, cb_message);
  mosquitto_reconnect_delay_set(mosq_, 1, 30, true);
  const std::string will = encode_status(false, config_.device_id);
  if (mosquitto_will_set_v5(mosq_, status_topic_.c_str(), static_cast<int>(will.size()), will.data(),
                            1, true, nullptr) != MOSQ_ERR_SUCCESS)
    throw std::runtime_error("cannot set the MQTT last will");
  if (!config_.ca_file.empty()) {
    const char* cert = config_.cert_file.empty() ? nullptr : config_.cert_file.c_str();
    const char* key = config_.key_file.empty() ? nullptr : config_.key_file.c_str();
    int rc = mosquitto_tls_set(mosq_, config_.ca_file.c_str(), nullptr, cert, key, nullptr);
    if (rc != MOSQ_ERR_SUCCESS)
      throw std::runtime_error(std::string("TLS set-up failed: ") + mosquitto_strerror(rc));
    // Peer verification and the hostname check stay on (mosquitto_tls_insecure_set is false).
    mosquitto_tls_opts_set(mosq_, 1, nullptr, nullptr);
  }
  mosquitto_property* props = nullptr;
  mosquitto_property_add_int32(&props, MQTT_PROP_SESSION_EXPIRY_INTERVAL, kSessionExpiryS);
  int rc = mosquitto_connect_bind_v5(mosq_, config_.host.c_str(), config_.port,
                                           config_.keepalive_s, nullptr, props);
  mosquitto_property_free_all(&props);
  if (rc != MOSQ_ERR_SUCCESS)
    LOG("WARNING", "waiting for the broker at " + config_.host + ":" + std::to_string(config_.port) +
                       ": " + mosquitto_strerror(rc));
  // The network thread reconnects with backoff, also when this first attempt failed.
  rc = mosquitto_loop_start(mosq_);
  if (rc != MOSQ_ERR_SUCCESS)
    throw std::runtime_error(std::string("cannot start the MQTT loop: ") + mosquitto_strerror(rc));
}

void Agent::on_connect(int rc) {
  if (rc != 0) {
    LOG("ERROR", std::string("broker refused the connection: ") + mosquitto_reason_string(rc));
    return;
  }
  // Subscribe on every connect: a broker restarted without persistence forgot our session.
  mosquitto_subscribe(mosq_, nullptr, global_topic_.c_str(), 1);
  std::lock_guard<std::mutex> lock(mutex_);
  if (subscribed_residual_) mosquitto_subscribe(mosq_, nullptr, residual_topic_.c_str(), 1);
  connected_ = true;
  status_published_ = false;  // say we are online again (the will may have said otherwise)
  cv_.notify_all();
}

void Agent::on_disconnect(int rc) {
  std::lock_guard<std::mutex> lock(mutex_);
  connected_ = false;
  cv_.notify_all();
  if (rc != 0 && !stop_) LOG("WARNING", "lost the broker; reconnecting");
}

void Agent::on_publish(int mid) {
  std::lock_guard<std::mutex> lock(mutex_);
  acked_[mid] = true;
  cv_.notify_all();
}

void Agent::on_message(const std::string& topic, const std::string& payload) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (inbox_.size() >= kInboxMax) inbox_.pop_front();
  inbox_.push_back({topic, payload});
  cv_.notify_all();
}

bool Agent::publish(const std::string& topic, const std::string& payload, bool retain,
                    bool during_stop) {
  int mid = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!connected_) return false;
  }
  int rc = mosquitto_publish_v5(mosq_, &mid, topic.c_str(), static_cast<int>(payload.size()),
                                payload.data(), 1, retain, nullptr);
  if (rc != MOSQ_ERR_SUCCESS) {
    LOG("WARNING", "publish to " + topic + " failed: " + mosquitto_strerror(rc));
    return false;
  }
  std::unique_lock<std::mutex> lock(mutex_);
  bool ok = cv_.wait_for(lock, kAckTimeout, [&] { return acked_.count(mid) || (stop_ && !during_stop); });
  ok = ok && acked_.count(mid);
  acked_.erase(mid);
  return ok;
}

void Agent::subscribe(const std::string& topic) { mosquitto_subscribe(mosq_, nullptr, topic.c_str(), 1); }

void Agent::unsubscribe(const std::string& topic) { mosquitto_unsubscribe(mosq_, nullptr, topic.c_str()); }

std::optional<GlobalModel> Agent::latest_global() {
  std::deque<Inbound> batch;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait_for(lock, std::chrono::milliseconds(config_.poll_ms),
                 [&] { return !inbox_.empty() || stop_; });
    batch.swap(inbox_);
  }
  std::optional<GlobalModel> latest;
  for (auto& m : batch) {
    try {
      if (m.topic == residual_topic_) {
        catch_up_ = decode_residual(m.payload);
        continue;
      }
      GlobalModel candidate = decode_global(m.payload);
      if (candidate.federation != config_.federation)
        throw DecodeError("global of federation " + candidate.federation);
      if (!latest || candidate.round >= latest->round) latest = std::move(candidate);
    } catch (const std::exception& exc) {  // hostile or corrupt: log and carry on
      LOG("WARNING", "ignored malformed message on " + m.topic + ": " + exc.what());
    }
  }
  if (!latest && waiting_ && catch_up_ && catch_up_->round == waiting_->round) {
    latest = std::move(waiting_);
    waiting_.reset();
  }
  return latest;
}

// ---- rounds ----------------------------------------------------------------------------

int Agent::run() {
  if (tasks_.empty()) throw std::runtime_error("no data: load a partition before running");
  connect();
  try {
    while (!stop_) {
      publish_status();
      std::optional<GlobalModel> message = latest_global();
      if (!message) {
        flush_pending();  // whatever the broker has not acked yet
        continue;
      }
      if (message->final) {
        clear_pending();  // nothing kept can count any more
        take_final_step(*message);
        LOG("INFO", "federation finished at round " + std::to_string(message->round));
        break;
      }
      if (!check_model(*message)) continue;
      note_round(message->round);
      flush_pending();  // the open round's update again, if we hold one
      try {
        serve(*message);
      } catch (const std::invalid_argument& exc) {
        // A well-formed global that does not fit this program (names, shapes): not ours to
        // train; a later global may be.
        LOG("ERROR", "cannot train round " + std::to_string(message->round) + " (" + exc.what() +
                         "); skipping it");
      }
    }
  } catch (...) {
    publish_offline();
    throw;
  }
  publish_offline();
  return rounds_trained_;
}

void Agent::stop() {
  stop_ = true;
  std::lock_guard<std::mutex> lock(mutex_);
  cv_.notify_all();
}

void Agent::publish_offline() {
  // Clean shutdown: say offline ourselves (the will only fires on a lost connection).
  publish(status_topic_, encode_status(false, config_.device_id), true, /*during_stop=*/true);
  mosquitto_disconnect(mosq_);
  mosquitto_loop_stop(mosq_, false);
}

bool Agent::check_model(const GlobalModel& message) {
  std::optional<std::string> problem;
  if (message.manifest_sha256 != trainer_->manifest().sha256) problem = "manifest";
  if (problem != problem_) {
    if (problem)
      LOG("ERROR", "the global is for another model version (manifest " +
                       message.manifest_sha256.substr(0, 12) + ", ours " +
                       trainer_->manifest().sha256.substr(0, 12) +
                       "): not training until this device gets matching artifacts");
    else
      LOG("WARNING", "the global matches our model version again; training");
    problem_ = problem;
    std::lock_guard<std::mutex> lock(mutex_);
    status_published_ = false;
  }
  publish_status();
  return !problem;
}

void Agent::publish_status() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (status_published_ || !connected_) return;
  }
  if (publish(status_topic_, encode_status(true, config_.device_id, problem_), true)) {
    std::lock_guard<std::mutex> lock(mutex_);
    status_published_ = true;
  }
}

void Agent::serve(const GlobalModel& message) {
  if (message.round <= last_round_) return;
  std::vector<Update> updates;
  {
    // The program's frozen inputs and parameters are set per device: hold it throughout.
    std::lock_guard<std::mutex> lock(*train_lock_);
    if (!prepare(message)) return;
    for (const auto& task : tasks_) {
      std::optional<Update> u = train_task(message, task);
      if (u) updates.push_back(std::move(*u));
    }
  }
  if (updates.empty()) return;
  std::vector<std::string> payloads;
  for (const auto& u : updates) payloads.push_back(encode(u, message.train));
  // On disk before the first send: a crash or outage from here on still delivers this
  // round's work once the device is back, if the round is still open.
  save_pending(message.round, std::move(payloads));
  last_round_ = message.round;
  save_state();
  ++rounds_trained_;
  bool sent = flush_pending();
  std::string losses;
  for (const auto& u : updates) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%s%.3f", losses.empty() ? "" : ", ", u.metrics.at("train_loss"));
    losses += buf;
  }
  LOG("INFO", std::string("(native) ") + (sent ? "sent" : "queued") + " round " +
                  std::to_string(message.round) + " update(s), loss " + losses);
}

bool Agent::prepare(const GlobalModel& message) {
  try {
    if (message.residual) {
      // Exact aggregation: the frozen weights must hold R_t, the cumulative residual.
      if (!sync_residual(message)) return false;
      trainer_->set_base_delta(residual_);
    }
    if (message.task_index) {
      // Continual learning: masking the other classes' logits keeps training on the current
      // task from pushing down the classes learnt before (or still to come).
      trainer_->set_class_mask(message.task_classes);
    }
    trainer_->set_learning_rate(message.train.learning_rate);
  } catch (const std::exception& exc) {
    LOG("ERROR", "cannot set the program up for round " + std::to_string(message.round) + " (" +
                     exc.what() + "); skipping it");
    return false;
  }
  return true;
}

std::optional<Update> Agent::train_task(const GlobalModel& message, const LocalTask& task) {
  LocalTask data = message.task_index ? filter_classes(task, message.task_classes) : task;
  if (data.labels.empty()) {
    LOG("INFO", "no examples for task slot '" + task.name + "'; sitting round " +
                    std::to_string(message.round) + " out");
    return std::nullopt;
  }
  const TensorMap& start = message.start_adapter(config_.device_id, task.name);
  // The global must name every shared tensor of our model and nothing else (as the Python
  // device's check_adapter): a partial adapter would silently train on stale values.
  for (const auto& spec : trainer_->manifest().tensors) {
    if (!trainer_->manifest().is_personal(spec.name) && !start.count(spec.name))
      throw std::invalid_argument("the global lacks adapter tensor " + spec.name);
  }
  for (const auto& [name, tensor] : start) {
    if (trainer_->manifest().is_personal(name))
      throw std::invalid_argument("the global carries personal tensor " + name);
  }
  TensorMap adapter = start;
  for (const auto& [k, v] : personal_[task.name]) adapter[k] = v;
  trainer_->set_adapter(adapter);
  TrainResult result = train_local(*trainer_, data, message.train.local_steps, rng_);
  TensorMap trained = trainer_->get_adapter();
  // Personal tensors (CoLoRA cores) stay here: kept on disk, never uploaded.
  personal_[task.name] = only(trained, true, trainer_->manifest());
  save_personal(task.name);
  TensorMap shared = only(trained, false, trainer_->manifest());
  // Compact encodings quantise what is sent; the change from the global quantises with far
  // less error than the adapter itself, so send that instead.
  bool compact = message.train.update_encoding != "fp32" || message.train.update_topk.has_value();
  if (compact) {
    for (auto& [k, v] : shared) {
      const auto it = start.find(k);
      if (it == start.end()) continue;
      for (size_t i = 0; i < v.data.size() && i < it->second.data.size(); ++i) v.data[i] -= it->second.data[i];
    }
  }
  if (!std::isfinite(result.mean_loss) || !std::isfinite(result.accuracy)) {
    LOG("WARNING", "training of slot '" + task.name + "' diverged; sitting round " +
                       std::to_string(message.round) + " out");
    return std::nullopt;
  }
  Update u;
  u.federation = config_.federation;
  u.round = message.round;
  u.device_id = config_.device_id;
  u.manifest_sha256 = trainer_->manifest().sha256;
  u.num_samples = result.samples;
  u.update_id = new_update_id(config_.device_id, message.round, task.name);
  u.adapter = std::move(shared);
  u.metrics = {{"train_loss", result.mean_loss}, {"train_accuracy", result.accuracy}};
  u.is_delta = compact;
  u.task = task.name;
  return u;
}

std::string Agent::encode(const Update& update, const TrainConfig& train) const {
  std::string payload = encode_update(update, train.update_encoding, train.update_topk);
  return signing_key_ ? signing_key_->sign(config_.device_id, payload) : payload;
}

// ---- the pending update ------------------------------------------------------------------

void Agent::note_round(int64_t round) {
  if (pending_.round < 0) return;
  if (round == pending_.round) {
    // A broker crash loses the updates it had queued; the aggregator republishes the open
    // round's global, so sending again on each copy delivers ours eventually (same
    // update_id: the aggregator drops the copies it already counted).
    sent_ = 0;
  } else if (round > pending_.round) {
    if (sent_ < pending_.payloads.size())
      LOG("WARNING", "dropping the unsent update of round " + std::to_string(pending_.round) +
                         ": round " + std::to_string(round) + " is open");
    clear_pending();
  }
  // An earlier round's global (an old retained copy on a restored broker) changes nothing.
}

bool Agent::flush_pending() {
  while (pending_.round >= 0 && sent_ < pending_.payloads.size()) {
    if (!publish(update_topic_, pending_.payloads[sent_], false)) return false;
    ++sent_;
  }
  return true;
}

void Agent::save_pending(int64_t round, std::vector<std::string> payloads) {
  pending_ = {round, std::move(payloads)};
  sent_ = 0;
  if (config_.state_dir.empty()) return;
  std::string data(kPendingMagic, 4);
  data += u64_be(static_cast<uint64_t>(round));
  for (const auto& p : pending_.payloads) data += u64_be(p.size()) + p;
  write_file_atomic(state_file(".pending"), data);
}

void Agent::load_pending() {
  if (config_.state_dir.empty()) return;
  std::string data;
  try {
    data = read_file(state_file(".pending"));
  } catch (const std::exception&) {
    return;  // none kept
  }
  if (data.size() < 12 || data.compare(0, 4, kPendingMagic) != 0) {
    LOG("WARNING", "ignored an unreadable pending-update file");
    return;
  }
  Pending p;
  p.round = static_cast<int64_t>(read_u64_be(data, 4));
  for (size_t at = 12; at + 8 <= data.size();) {
    uint64_t n = read_u64_be(data, at);
    if (n > data.size() - at - 8) break;
    p.payloads.push_back(data.substr(at + 8, n));
    at += 8 + n;
  }
  pending_ = std::move(p);
  sent_ = 0;
}

void Agent::clear_pending() {
  pending_ = {};
  sent_ = 0;
  if (!config_.state_dir.empty()) std::remove(state_file(".pending").c_str());
}

// ---- exact aggregation ----------------------------------------------------------------------

bool Agent::sync_residual(const GlobalModel& message) {
  const int64_t t = message.round;
  if (residual_round_ == t) return true;
  if (residual_round_ == t - 1) {
    // Level with t - 1: add the global's step (small, exact).
    TensorMap step = dense_residual(message.residual_step);
    for (auto& [layer, s] : step) {
      auto it = residual_.find(layer);
      if (it == residual_.end()) {
        residual_.emplace(layer, s);
      } else {
        if (it->second.data.size() != s.data.size())
          throw std::invalid_argument("residual step of " + layer + " has the wrong shape");
        for (size_t i = 0; i < s.data.size(); ++i) it->second.data[i] += s.data[i];
      }
    }
    set_residual(t, residual_);
    return true;
  }
  if (catch_up_ && catch_up_->round == t) {
    set_residual(t, dense_residual(catch_up_->residual));
    if (catch_up_->truncation_error > 0)
      LOG("WARNING", "the residual of round " + std::to_string(t) + " came truncated");
    if (subscribed_residual_) unsubscribe(residual_topic_);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      subscribed_residual_ = false;
    }
    catch_up_.reset();
    return true;
  }
  // Any other distance: fetch R_t from the residual topic, subscribed only while needed.
  waiting_ = message;
  if (!subscribed_residual_) {
    LOG("INFO", "at residual round " + std::to_string(residual_round_) + ", fetching round " +
                    std::to_string(t) + "'s");
    {
      std::lock_guard<std::mutex> lock(mutex_);
      subscribed_residual_ = true;
    }
    subscribe(residual_topic_);
  }
  return false;
}

void Agent::take_final_step(const GlobalModel& message) {
  // The final global's step, so the kept frozen weights are the final model's.
  if (message.residual && message.manifest_sha256 == trainer_->manifest().sha256 &&
      residual_round_ == message.round - 1) {
    try {
      sync_residual(message);
    } catch (const std::exception& exc) {
      LOG("ERROR", std::string("unusable final residual step: ") + exc.what());
    }
  }
}

void Agent::set_residual(int64_t round, TensorMap residual) {
  residual_round_ = round;
  residual_ = std::move(residual);
  if (config_.state_dir.empty()) return;
  write_safetensors_file(state_file(".residual.safetensors"), residual_, {{"round", std::to_string(round)}});
}

void Agent::load_residual() {
  if (config_.state_dir.empty()) return;
  std::map<std::string, std::string> meta;
  try {
    residual_ = read_safetensors_file(state_file(".residual.safetensors"), &meta);
  } catch (const std::exception&) {
    return;  // a fresh device holds R_0 = 0
  }
  residual_round_ = meta.count("round") ? std::stoll(meta["round"]) : 0;
}

// ---- files ---------------------------------------------------------------------------------

std::string Agent::state_file(const std::string& suffix) const {
  return config_.state_dir + "/" + config_.device_id + suffix;
}

void Agent::load_state() {
  if (config_.state_dir.empty()) return;
  ::mkdir(config_.state_dir.c_str(), 0700);
  try {
    auto j = nlohmann::json::parse(read_file(state_file(".json")));
    last_round_ = j.at("last_round").get<int64_t>();
  } catch (const std::exception&) {
    last_round_ = -1;  // fresh device (or an unreadable file: training again is harmless)
  }
}

void Agent::save_state() const {
  if (config_.state_dir.empty()) return;
  write_file_atomic(state_file(".json"), nlohmann::json{{"last_round", last_round_}}.dump());
}

TensorMap Agent::load_personal(const std::string& task) {
  if (!config_.state_dir.empty()) {
    try {
      return read_safetensors_file(state_file("." + (task.empty() ? "" : task + ".") + "personal.safetensors"));
    } catch (const std::exception&) {
    }
  }
  return only(trainer_->get_adapter(), true, trainer_->manifest());
}

void Agent::save_personal(const std::string& task) {
  if (config_.state_dir.empty() || personal_[task].empty()) return;
  write_safetensors_file(state_file("." + (task.empty() ? "" : task + ".") + "personal.safetensors"),
                         personal_[task]);
}

}  // namespace edgefl
