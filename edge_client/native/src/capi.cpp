// C API: errors, buffers and the device (the codec and trainer parts are in capi_*.cpp).
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>

#include "agent.hpp"
#include "capi_util.hpp"
#include "data.hpp"

namespace edgefl {

namespace {
thread_local std::string last_error;
}

void set_last_error(const std::string& message) {
  // One line: a newline in a nested library's message would break the caller's log format.
  last_error = message;
  for (char& c : last_error) {
    if (c == '\n' || c == '\r') c = ' ';
  }
}

void clear_last_error() { last_error.clear(); }

int to_buffer(const std::string& bytes, edgefl_buffer* out) {
  if (out == nullptr) {
    set_last_error("no output buffer given");
    return -1;
  }
  out->data = static_cast<uint8_t*>(std::malloc(bytes.size() ? bytes.size() : 1));
  if (out->data == nullptr) {
    set_last_error("out of memory");
    return -1;
  }
  std::memcpy(out->data, bytes.data(), bytes.size());
  out->size = bytes.size();
  return 0;
}

}  // namespace edgefl

extern "C" {

const char* edgefl_last_error(void) { return edgefl::last_error.c_str(); }

const char* edgefl_version(void) { return "edgefl-native 1 (protocol v1)"; }

void edgefl_buffer_free(edgefl_buffer* buffer) {
  if (buffer == nullptr) return;
  std::free(buffer->data);
  buffer->data = nullptr;
  buffer->size = 0;
}

}  // extern "C"

// ---- device ------------------------------------------------------------------------------


struct edgefl_device {
  std::unique_ptr<edgefl::Agent> agent;
};

namespace {
std::string text(const char* s) { return s == nullptr ? std::string() : std::string(s); }
}  // namespace

extern "C" {

edgefl_device* edgefl_device_create(const edgefl_device_config* config) {
  edgefl_device* device = nullptr;
  edgefl::guarded([&] {
    if (config == nullptr) throw std::invalid_argument("no device configuration given");
    edgefl::AgentConfig c;
    c.device_id = text(config->device_id);
    c.federation = text(config->federation);
    c.artifact_dir = text(config->artifact_dir);
    c.host = config->host ? config->host : "127.0.0.1";
    c.port = config->port > 0 ? config->port : 1883;
    c.state_dir = text(config->state_dir);
    c.ca_file = text(config->ca_file);
    c.cert_file = text(config->cert_file);
    c.key_file = text(config->key_file);
    c.signing_key_file = text(config->signing_key_file);
    c.seed = config->seed;
    c.keepalive_s = config->keepalive_s > 0 ? config->keepalive_s : 30;
    auto agent = std::make_unique<edgefl::Agent>(std::move(c));
    device = new edgefl_device{std::move(agent)};
    return 0;
  });
  return device;
}

int edgefl_device_load_data(edgefl_device* device, const char* partition_path) {
  return edgefl::guarded([&] {
    if (device == nullptr || partition_path == nullptr) throw std::invalid_argument("no device or path");
    device->agent->set_tasks(edgefl::read_partition(partition_path));
    return 0;
  });
}

int edgefl_device_run(edgefl_device* device) {
  int rounds = -1;
  int rc = edgefl::guarded([&] {
    if (device == nullptr) throw std::invalid_argument("no device");
    rounds = device->agent->run();
    return 0;
  });
  return rc == 0 ? rounds : -1;
}

void edgefl_device_stop(edgefl_device* device) {
  if (device != nullptr) device->agent->stop();
}

void edgefl_device_destroy(edgefl_device* device) { delete device; }

}  // extern "C"
