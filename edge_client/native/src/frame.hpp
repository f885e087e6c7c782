// The frame of PROTOCOL.md section 3: one zstd frame around safetensors carrying the header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <utility>

#include "json_strict.hpp"
#include "safetensors.hpp"

namespace edgefl::detail {

// Limits of PROTOCOL.md section 8 and protocol/messages.py: a payload, and what it decompresses to.
constexpr size_t kMaxPayloadBytes = 8u << 20;
constexpr size_t kMaxDecompressedBytes = 64u << 20;

// raw in one zstd frame: level 3, with content size and checksum, as the Python reference.
std::string compress_frame(const std::string& raw);

struct Frame {
  std::map<std::string, std::string> metadata;
  std::string header_text;  // metadata["header"]
  Json header;              // parsed, an object
  RawTensors tensors;
};

// Decompresses and parses a frame of any kind: metadata, header (a JSON object) and tensors.
Frame unpack_frame(const std::string& payload);
// unpack_frame, checking that the frame is a `kind` message.
Frame unpack(const std::string& payload, const std::string& kind);

// For the C API (capi_codec.cpp): the kind of a frame that passes the frame rules, and its
// header as parsed (JSON).
std::pair<std::string, std::string> frame_kind_and_header(const std::string& payload);

// a * b into *out, false when that overflows 64 bits (no __int128: 32-bit ARM lacks it).
bool multiply(uint64_t a, uint64_t b, uint64_t* out);

}  // namespace edgefl::detail
