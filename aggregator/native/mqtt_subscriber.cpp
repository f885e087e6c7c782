// MQTT 5 (OASIS standard, 2019) packets a QoS 1 subscriber needs: CONNECT/CONNACK,
// SUBSCRIBE/SUBACK, PUBLISH/PUBACK, PINGREQ/PINGRESP and DISCONNECT.
#include "mqtt_subscriber.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cstring>
#include <utility>

namespace edgefl::ingest {
namespace {

constexpr uint8_t kConnect = 0x10, kConnack = 0x20, kPublish = 0x30, kPuback = 0x40,
                  kSubscribe = 0x82, kSuback = 0x90, kPingreq = 0xC0, kDisconnect = 0xE0;
constexpr int kKeepAliveS = 30;  // as the Python transport
constexpr size_t kReadChunk = 1 << 20;
constexpr uint16_t kSubscribeId = 1;

void put_u16(std::string* out, uint16_t v) {
  out->push_back(static_cast<char>(v >> 8));
  out->push_back(static_cast<char>(v & 0xFF));
}

void put_u32(std::string* out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) out->push_back(static_cast<char>((v >> shift) & 0xFF));
}

void put_varint(std::string* out, size_t v) {
  do {
    uint8_t byte = v % 128;
    v /= 128;
    out->push_back(static_cast<char>(v ? byte | 0x80 : byte));
  } while (v);
}

void put_string(std::string* out, const std::string& s) {
  put_u16(out, static_cast<uint16_t>(s.size()));
  *out += s;
}

std::string packet(uint8_t header, const std::string& body) {
  std::string out(1, static_cast<char>(header));
  put_varint(&out, body.size());
  return out + body;
}

// Reads fields of a received packet's body; a short body is a protocol error.
struct Reader {
  const std::string& s;
  size_t at = 0;
  uint8_t u8() {
    need(1);
    return static_cast<uint8_t>(s[at++]);
  }
  uint16_t u16() {
    need(2);
    uint16_t v = static_cast<uint16_t>((static_cast<uint8_t>(s[at]) << 8) | static_cast<uint8_t>(s[at + 1]));
    at += 2;
    return v;
  }
  size_t varint() {
    size_t v = 0;
    for (int i = 0, shift = 0; i < 4; ++i, shift += 7) {
      uint8_t byte = u8();
      v |= static_cast<size_t>(byte & 0x7F) << shift;
      if (!(byte & 0x80)) return v;
    }
    throw MqttError("malformed variable byte integer from the broker");
  }
  std::string bytes(size_t n) {
    need(n);
    std::string v = s.substr(at, n);
    at += n;
    return v;
  }
  void need(size_t n) const {
    if (at + n > s.size()) throw MqttError("truncated packet from the broker");
  }
};

}  // namespace

MqttSubscriber::MqttSubscriber(std::string host, int port, std::string client_id,
                               uint32_t session_expiry_s, uint16_t receive_maximum,
                               std::optional<TlsFiles> tls)
    : host_(std::move(host)), client_id_(std::move(client_id)), port_(port),
      session_expiry_s_(session_expiry_s), receive_maximum_(receive_maximum), tls_(std::move(tls)) {}

MqttSubscriber::~MqttSubscriber() {
  if (ssl_) SSL_free(ssl_);
  if (ctx_) SSL_CTX_free(ctx_);
  if (fd_ >= 0) ::close(fd_);
}

namespace {

std::string ssl_error(const std::string& what) {
  unsigned long code = ERR_get_error();
  char text[256] = "unknown error";
  if (code) ERR_error_string_n(code, text, sizeof text);
  return what + ": " + text;
}

}  // namespace

void MqttSubscriber::start_tls() {
  ctx_ = SSL_CTX_new(TLS_client_method());
  if (!ctx_) throw MqttError(ssl_error("TLS"));
  SSL_CTX_set_verify(ctx_, SSL_VERIFY_PEER, nullptr);
  if (SSL_CTX_load_verify_locations(ctx_, tls_->ca.c_str(), nullptr) != 1)
    throw MqttError(ssl_error("cannot read the CA " + tls_->ca));
  if (!tls_->cert.empty()) {
    if (SSL_CTX_use_certificate_chain_file(ctx_, tls_->cert.c_str()) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx_, tls_->key.c_str(), SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx_) != 1)
      throw MqttError(ssl_error("cannot use the client certificate " + tls_->cert));
  }
  SSL_CTX_set_mode(ctx_, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  ssl_ = SSL_new(ctx_);
  if (!ssl_ || SSL_set_fd(ssl_, fd_) != 1) throw MqttError(ssl_error("TLS"));
  // The broker's certificate must name the host we dialled: an IP address or a DNS name.
  in6_addr ip;
  bool is_ip = inet_pton(AF_INET, host_.c_str(), &ip) == 1 || inet_pton(AF_INET6, host_.c_str(), &ip) == 1;
  if (is_ip) {
    X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl_), host_.c_str());
  } else {
    SSL_set_tlsext_host_name(ssl_, host_.c_str());
    SSL_set1_host(ssl_, host_.c_str());
  }
  if (SSL_connect(ssl_) != 1) {
    long verify = SSL_get_verify_result(ssl_);
    throw MqttError(verify != X509_V_OK
                        ? "TLS: the broker's certificate does not verify: " +
                              std::string(X509_verify_cert_error_string(verify))
                        : ssl_error("TLS handshake with " + host_));
  }
}

void MqttSubscriber::connect() {
  addrinfo hints{}, *found = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  std::string port = std::to_string(port_);
  if (int rc = getaddrinfo(host_.c_str(), port.c_str(), &hints, &found); rc != 0)
    throw MqttError("cannot resolve " + host_ + ": " + gai_strerror(rc));
  std::string why = "no address";
  for (addrinfo* a = found; a != nullptr && fd_ < 0; a = a->ai_next) {
    int fd = ::socket(a->ai_family, a->ai_socktype, a->ai_protocol);
    if (fd < 0) continue;
    if (::connect(fd, a->ai_addr, a->ai_addrlen) == 0) {
      fd_ = fd;
    } else {
      why = std::strerror(errno);
      ::close(fd);
    }
  }
  freeaddrinfo(found);
  if (fd_ < 0) throw MqttError("cannot connect to " + host_ + ":" + port + ": " + why);
  int one = 1;
  setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // PUBACKs are tiny: send now
  if (tls_) start_tls();  // the handshake blocks; from here on the socket does not
  fcntl(fd_, F_SETFL, fcntl(fd_, F_GETFL) | O_NONBLOCK);

  std::string body;
  put_string(&body, "MQTT");
  body.push_back(5);  // protocol level: MQTT 5
  body.push_back(0);  // flags: clean start off, no will, no user name or password
  put_u16(&body, kKeepAliveS);
  std::string props;
  props.push_back(0x11);  // Session Expiry Interval
  put_u32(&props, session_expiry_s_);
  props.push_back(0x21);  // Receive Maximum
  put_u16(&props, receive_maximum_);
  put_varint(&body, props.size());
  body += props;
  put_string(&body, client_id_);
  send_all(packet(kConnect, body));

  auto deadline = Clock::now() + std::chrono::seconds(kKeepAliveS);
  uint8_t header;
  std::string reply;
  await_packet(deadline, "CONNACK", &header, &reply);
  if ((header & 0xF0) != kConnack) throw MqttError("the broker answered CONNECT without CONNACK");
  Reader r{reply};
  r.u8();  // session present
  if (uint8_t code = r.u8(); code != 0)
    throw MqttError("the broker refused the connection (reason code " + std::to_string(code) + ")");
}

void MqttSubscriber::subscribe(const std::string& filter) {
  std::string body;
  put_u16(&body, kSubscribeId);
  body.push_back(0);  // no properties
  put_string(&body, filter);
  body.push_back(1);  // QoS 1
  send_all(packet(kSubscribe, body));
  auto deadline = Clock::now() + std::chrono::seconds(kKeepAliveS);
  while (true) {
    uint8_t header;
    std::string reply;
    await_packet(deadline, "SUBACK", &header, &reply);
    if ((header & 0xF0) == kSuback) {
      Reader r{reply};
      r.u16();
      r.bytes(r.varint());  // properties
      if (uint8_t code = r.u8(); code > 1)
        throw MqttError("the broker refused the subscription to " + filter + " (reason code " +
                        std::to_string(code) + ")");
      return;
    }
    if (auto message = handle(header, reply)) pending_.push_back(std::move(*message));
  }
}

void MqttSubscriber::await_packet(Clock::time_point deadline, const char* awaited, uint8_t* header,
                                  std::string* body) {
  while (!parse_one(header, body)) {
    if (Clock::now() > deadline) throw MqttError(std::string("no ") + awaited + " from the broker");
    read_some(1000);
  }
}

std::optional<Publish> MqttSubscriber::next(int timeout_ms) {
  if (!pending_.empty()) {
    Publish p = std::move(pending_.front());
    pending_.pop_front();
    return p;
  }
  auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  while (true) {
    uint8_t header;
    std::string body;
    while (parse_one(&header, &body)) {
      if (auto message = handle(header, body)) return message;
    }
    keep_alive();
    int left = static_cast<int>(
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
    if (left < 0 || !read_some(left)) return std::nullopt;
  }
}

std::optional<Publish> MqttSubscriber::handle(uint8_t header, const std::string& body) {
  switch (header & 0xF0) {
    case kPublish:
      return parse_publish(header, body);
    case kDisconnect:
      throw MqttError("the broker closed the session");
    default:  // PINGRESP, and anything a subscriber can ignore
      return std::nullopt;
  }
}

Publish MqttSubscriber::parse_publish(uint8_t header, const std::string& body) const {
  int qos = (header >> 1) & 3;
  if (qos > 1) throw MqttError("QoS 2 PUBLISH on a QoS 1 subscription");
  Reader r{body};
  Publish p;
  p.topic = r.bytes(r.u16());
  if (qos == 1) p.packet_id = r.u16();
  r.at += r.varint();  // properties: none that we use (no topic alias: we allowed none)
  r.need(0);
  p.payload = body.substr(r.at);
  return p;
}

void MqttSubscriber::ack(uint16_t packet_id) {
  if (packet_id == 0) return;
  std::string body;
  put_u16(&body, packet_id);
  send_all(packet(kPuback, body));
}

void MqttSubscriber::disconnect() {
  if (fd_ < 0) return;
  try {
    send_all(std::string{static_cast<char>(kDisconnect), 0});
  } catch (const MqttError&) {
  }
  if (ssl_) SSL_shutdown(ssl_);  // our close_notify; the broker's is not waited for
  ::close(fd_);
  fd_ = -1;
}

bool MqttSubscriber::parse_one(uint8_t* header, std::string* body) {
  if (end_ - pos_ < 2) return false;
  size_t length = 0, at = pos_ + 1;
  for (int i = 0, shift = 0;; ++i, shift += 7, ++at) {
    if (i == 4) throw MqttError("malformed packet length from the broker");
    if (at >= end_) return false;
    uint8_t byte = static_cast<uint8_t>(in_[at]);
    length |= static_cast<size_t>(byte & 0x7F) << shift;
    if (!(byte & 0x80)) break;
  }
  ++at;
  if (end_ - at < length) return false;
  *header = static_cast<uint8_t>(in_[pos_]);
  body->assign(in_, at, length);
  pos_ = at + length;
  last_heard_ = Clock::now();
  return true;
}

bool MqttSubscriber::read_some(int timeout_ms) {
  if (!(ssl_ && SSL_pending(ssl_) > 0)) {  // TLS may hold decrypted bytes the socket no longer has
    pollfd p{fd_, POLLIN, 0};
    int ready = ::poll(&p, 1, timeout_ms);
    if (ready < 0 && errno != EINTR) throw MqttError(std::string("poll: ") + std::strerror(errno));
    if (ready <= 0) return false;
  }
  if (in_.size() - end_ < kReadChunk) {  // room for a chunk: move the unparsed bytes forward
    in_.erase(0, pos_);
    end_ -= pos_;
    pos_ = 0;
    if (in_.size() - end_ < kReadChunk) in_.resize(end_ + kReadChunk);
  }
  if (ssl_) {
    int got = SSL_read(ssl_, &in_[end_], static_cast<int>(std::min<size_t>(in_.size() - end_, 1 << 30)));
    if (got > 0) {
      end_ += static_cast<size_t>(got);
      return true;
    }
    int error = SSL_get_error(ssl_, got);
    if (error == SSL_ERROR_WANT_READ || error == SSL_ERROR_WANT_WRITE) return true;  // a part of a record
    if (error == SSL_ERROR_ZERO_RETURN) throw MqttError("the broker closed the connection");
    throw MqttError(ssl_error("TLS read"));
  }
  ssize_t got = ::recv(fd_, &in_[end_], in_.size() - end_, 0);
  if (got == 0) throw MqttError("the broker closed the connection");
  if (got < 0) {
    if (errno == EINTR || errno == EAGAIN) return true;
    throw MqttError(std::string("recv: ") + std::strerror(errno));
  }
  end_ += static_cast<size_t>(got);
  return true;
}

void MqttSubscriber::send_all(const std::string& bytes) {
  size_t sent = 0;
  while (sent < bytes.size()) {
    if (ssl_) {
      int n = SSL_write(ssl_, bytes.data() + sent, static_cast<int>(bytes.size() - sent));
      if (n > 0) {
        sent += static_cast<size_t>(n);
        continue;
      }
      int error = SSL_get_error(ssl_, n);
      if (error == SSL_ERROR_WANT_WRITE || error == SSL_ERROR_WANT_READ) {
        wait_for(error == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN);
        continue;
      }
      throw MqttError(ssl_error("TLS write"));
    }
    ssize_t n = ::send(fd_, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        wait_for(POLLOUT);
        continue;
      }
      throw MqttError(std::string("send: ") + std::strerror(errno));
    }
    sent += static_cast<size_t>(n);
  }
  last_sent_ = Clock::now();
}

void MqttSubscriber::wait_for(short events) {
  pollfd p{fd_, events, 0};
  int ready = ::poll(&p, 1, kKeepAliveS * 1000);
  if (ready == 0) throw MqttError("the broker stopped reading");
  if (ready < 0 && errno != EINTR) throw MqttError(std::string("poll: ") + std::strerror(errno));
}

void MqttSubscriber::keep_alive() {
  auto now = Clock::now();
  if (now - last_heard_ > std::chrono::seconds(kKeepAliveS * 2))
    throw MqttError("the broker went silent");
  if (now - last_sent_ > std::chrono::seconds(kKeepAliveS / 2))
    send_all(std::string{static_cast<char>(kPingreq), 0});
}

}  // namespace edgefl::ingest
