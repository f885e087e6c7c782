// C API: errors, buffers and the device (the codec and trainer parts are in capi_*.cpp).
#include <cstdlib>
#include <string>

#include "capi_util.hpp"

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
