// The device agent: docs/PROTOCOL.md over libmosquitto, training through Trainer.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "codec.hpp"
#include "data.hpp"
#include "signing.hpp"
#include "trainer.hpp"

struct mosquitto;

namespace edgefl {

struct AgentConfig {
  std::string device_id;
  std::string federation;
  std::string artifact_dir;
  std::string host = "127.0.0.1";
  int port = 1883;
  std::string state_dir;  // "" : nothing kept across restarts
  std::string ca_file, cert_file, key_file;  // TLS when ca_file is set
  std::string signing_key_file;               // signed updates when set
  uint64_t seed = 0;
  int keepalive_s = 30;
  int poll_ms = 500;  // how often an idle device retries unsent updates
};

// One device. run() blocks until the final global or stop(); it returns the rounds trained.
class Agent {
 public:
  explicit Agent(AgentConfig config);  // loads artifacts and key; throws std::runtime_error
  // A device of a fleet: devices of one process share one program and train one at a time.
  Agent(AgentConfig config, std::shared_ptr<Trainer> trainer, std::shared_ptr<std::mutex> lock);
  ~Agent();
  void set_tasks(std::vector<LocalTask> tasks);  // throws std::invalid_argument
  int run();
  void stop();  // any thread

  // Called from libmosquitto's network thread.
  void on_connect(int rc);
  void on_disconnect(int rc);
  void on_publish(int mid);
  void on_message(const std::string& topic, const std::string& payload);

 private:
  struct Inbound {
    std::string topic;
    std::string payload;
  };
  struct Pending {
    int64_t round = -1;
    std::vector<std::string> payloads;
  };

  // connection
  void connect();
  // QoS 1, waiting for the PUBACK; a stop() ends the wait unless `during_stop`.
  bool publish(const std::string& topic, const std::string& payload, bool retain,
               bool during_stop = false);
  void subscribe(const std::string& topic);
  void unsubscribe(const std::string& topic);
  std::optional<GlobalModel> latest_global();
  // rounds
  bool check_model(const GlobalModel& message);
  void serve(const GlobalModel& message);
  bool prepare(const GlobalModel& message);
  std::optional<Update> train_task(const GlobalModel& message, const LocalTask& task);
  std::string encode(const Update& update, const TrainConfig& train) const;
  // the pending update, kept until its round closes
  void note_round(int64_t round);
  bool flush_pending();
  void save_pending(int64_t round, std::vector<std::string> payloads);
  void load_pending();
  void clear_pending();
  void publish_status();
  void publish_offline();
  // exact aggregation: R_t folded into the frozen weights
  bool sync_residual(const GlobalModel& message);
  void set_residual(int64_t round, TensorMap residual);
  void load_residual();
  void take_final_step(const GlobalModel& message);
  // files
  std::string state_file(const std::string& suffix) const;
  void load_state();
  void save_state() const;
  TensorMap load_personal(const std::string& task);
  void save_personal(const std::string& task);

  AgentConfig config_;
  std::shared_ptr<Trainer> trainer_;
  std::shared_ptr<std::mutex> train_lock_;
  std::optional<SigningKey> signing_key_;
  std::vector<LocalTask> tasks_;
  std::map<std::string, TensorMap> personal_;
  std::mt19937_64 rng_;
  std::string global_topic_, residual_topic_, update_topic_, status_topic_;

  mosquitto* mosq_ = nullptr;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Inbound> inbox_;
  bool connected_ = false;
  bool subscribed_residual_ = false;
  std::map<int, bool> acked_;  // mid -> PUBACK arrived
  std::atomic<bool> stop_{false};

  int64_t last_round_ = -1;
  Pending pending_;
  size_t sent_ = 0;  // pending payloads the broker acked since the last (re)send
  std::optional<std::string> problem_;
  bool status_published_ = false;
  int rounds_trained_ = 0;
  int64_t residual_round_ = 0;
  TensorMap residual_;
  std::optional<ResidualModel> catch_up_;
  std::optional<GlobalModel> waiting_;
};

void log_line(const std::string& level, const std::string& device, const std::string& text);

}  // namespace edgefl
