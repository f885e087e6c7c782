// Shared by the C API's files: the per-thread last error and returning bytes to the caller.
#pragma once

#include <cstring>
#include <exception>
#include <string>

#include "edgefl_device.h"

namespace edgefl {

void set_last_error(const std::string& message);  // one line
void clear_last_error();
int to_buffer(const std::string& bytes, edgefl_buffer* out);  // 0, or -1 if out is NULL

// Runs `body` (returning int), turning any exception into -1 and a one-line last error.
template <typename F>
int guarded(F&& body) {
  try {
    clear_last_error();
    return body();
  } catch (const std::exception& exc) {
    set_last_error(exc.what());
  } catch (...) {
    set_last_error("unknown error");
  }
  return -1;
}

}  // namespace edgefl
