// A minimal MQTT 5 subscriber (TCP or TLS) that acknowledges each QoS 1 message only when told
// to: the native ingest worker acks an update after the SQLite commit that holds it. libmosquitto
// and Paho C acknowledge on receipt (eclipse-mosquitto/mosquitto issue #118), which would lose
// an update received but not yet committed when the worker dies.
#pragma once

#include <chrono>
#include <deque>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

struct ssl_ctx_st;
struct ssl_st;

namespace edgefl::ingest {

// The link failed or the broker refused us; what() is one line.
struct MqttError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Publish {
  std::string topic;
  std::string payload;
  uint16_t packet_id = 0;  // 0: QoS 0, nothing to acknowledge
};

// PEM files of a TLS connection: the CA that signed the broker, and our client identity.
struct TlsFiles {
  std::string ca, cert, key;
};

class MqttSubscriber {
 public:
  // With `tls`, the broker must present a certificate from its CA naming `host` (as the Python
  // transport: peer verification and the host check), and we present cert/key.
  MqttSubscriber(std::string host, int port, std::string client_id, uint32_t session_expiry_s,
                 uint16_t receive_maximum, std::optional<TlsFiles> tls = std::nullopt);
  ~MqttSubscriber();
  MqttSubscriber(const MqttSubscriber&) = delete;
  MqttSubscriber& operator=(const MqttSubscriber&) = delete;

  // TCP connect, CONNECT (clean start off: the session keeps our unacknowledged messages), CONNACK.
  void connect();
  // SUBSCRIBE at QoS 1 and wait for its SUBACK (messages arriving meanwhile are kept).
  void subscribe(const std::string& filter);
  // The next PUBLISH, waiting at most timeout_ms for one; nullopt when none came.
  std::optional<Publish> next(int timeout_ms);
  // PUBACK, in the order the messages came (MQTT's rule for QoS 1).
  void ack(uint16_t packet_id);
  void disconnect();  // DISCONNECT, normal: the session stays on the broker

 private:
  using Clock = std::chrono::steady_clock;
  bool parse_one(uint8_t* header, std::string* body);  // one whole packet buffered?
  // The next packet, whatever it is; MqttError (naming `awaited`) when none came by `deadline`.
  void await_packet(Clock::time_point deadline, const char* awaited, uint8_t* header, std::string* body);
  Publish parse_publish(uint8_t header, const std::string& body) const;
  std::optional<Publish> handle(uint8_t header, const std::string& body);
  bool read_some(int timeout_ms);  // false: timed out
  void send_all(const std::string& bytes);
  void keep_alive();
  void start_tls();
  void wait_for(short events);  // poll until the socket is ready for `events` (or it fails)

  std::string host_, client_id_;
  int port_;
  uint32_t session_expiry_s_;
  uint16_t receive_maximum_;
  std::optional<TlsFiles> tls_;
  ssl_ctx_st* ctx_ = nullptr;  // OpenSSL's SSL_CTX and SSL, when tls_
  ssl_st* ssl_ = nullptr;
  int fd_ = -1;  // non-blocking once connected
  std::string in_;  // received bytes; [pos_, end_) not parsed yet, the rest is free room
  size_t pos_ = 0, end_ = 0;
  std::deque<Publish> pending_;  // PUBLISH packets that came while we waited for a SUBACK
  Clock::time_point last_sent_, last_heard_;
};

}  // namespace edgefl::ingest
