// The zstd frame of PROTOCOL.md section 3 and the safetensors inside it, as the reference loads them.
#define ZSTD_STATIC_LINKING_ONLY  // ZSTD_getFrameHeader: the checksum flag of a frame
#include "frame.hpp"

#include <zstd.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <stdexcept>
#include <vector>

namespace edgefl::detail {

namespace {

constexpr int kZstdLevel = 3;
// The reference reads the safetensors JSON twice: Python's json, then safetensors' serde_json,
// whose recursion limit (127 open containers) is the stricter one.
constexpr int kSafetensorsDepth = 127;
constexpr size_t kNumpyMaxDims = 64;  // numpy 2 refuses arrays of more dimensions
constexpr uint64_t kMaxIntp = uint64_t(std::numeric_limits<int64_t>::max());
const std::string kZstdMagic("\x28\xb5\x2f\xfd", 4);

}  // namespace

// ---- zstd frame (PROTOCOL.md section 3) -----------------------------------------------------

std::string compress_frame(const std::string& raw) {
  std::unique_ptr<ZSTD_CCtx, size_t (*)(ZSTD_CCtx*)> cctx(ZSTD_createCCtx(), ZSTD_freeCCtx);
  if (!cctx) throw std::runtime_error("zstd: cannot create a compression context");
  for (auto [param, value] : {std::pair{ZSTD_c_compressionLevel, kZstdLevel},
                              std::pair{ZSTD_c_checksumFlag, 1}, std::pair{ZSTD_c_contentSizeFlag, 1}}) {
    if (ZSTD_isError(ZSTD_CCtx_setParameter(cctx.get(), param, value)))
      throw std::runtime_error("zstd: cannot set a compression parameter");
  }
  std::string out(ZSTD_compressBound(raw.size()), '\0');
  const size_t n = ZSTD_compress2(cctx.get(), out.data(), out.size(), raw.data(), raw.size());
  if (ZSTD_isError(n)) throw std::runtime_error(std::string("zstd: ") + ZSTD_getErrorName(n));
  out.resize(n);
  return out;
}

namespace {

// The content of exactly one checksummed zstd frame, verified, with nothing after it, as
// protocol.codec._decompress_frame; output is capped even when the frame declares no size.
std::string decompress_frame(const std::string& data) {
  if (data.size() > kMaxPayloadBytes)
    fail("payload of " + std::to_string(data.size()) + " bytes exceeds the 8388608 limit");
  if (data.compare(0, 4, kZstdMagic) != 0 || data.size() < 4)
    fail("payload does not start with the zstd frame magic number");
  ZSTD_frameHeader params;
  const size_t header = ZSTD_getFrameHeader(&params, data.data(), data.size());
  if (ZSTD_isError(header) || header != 0) fail("not a zstd frame: truncated or invalid frame header");
  if (!params.checksumFlag) fail("zstd frame has no content checksum");
  const bool known = params.frameContentSize != ZSTD_CONTENTSIZE_UNKNOWN;
  if (known && params.frameContentSize > kMaxDecompressedBytes)
    fail("payload declares " + std::to_string(params.frameContentSize) +
         " bytes decompressed, over the 67108864 limit");
  // The reference returns nothing for a frame declaring no content, which no message is.
  if (known && params.frameContentSize == 0) fail("truncated safetensors header");
  // One context per thread, reset per frame: creating one costs more than a small frame's
  // decompression (the native ingest worker decodes thousands per second).
  thread_local std::unique_ptr<ZSTD_DCtx, size_t (*)(ZSTD_DCtx*)> dctx(ZSTD_createDCtx(), ZSTD_freeDCtx);
  if (!dctx) throw std::runtime_error("zstd: cannot create a decompression context");
  ZSTD_DCtx_reset(dctx.get(), ZSTD_reset_session_only);  // a failed frame leaves none of its state
  const size_t cap = known ? static_cast<size_t>(params.frameContentSize) : kMaxDecompressedBytes;
  std::string out(known ? cap : std::min<size_t>(cap, 1u << 20), '\0');
  ZSTD_inBuffer in{data.data(), data.size(), 0};
  size_t produced = 0;
  bool last_try = false;
  for (;;) {
    const size_t in_before = in.pos;
    ZSTD_outBuffer dst{out.data() + produced, out.size() - produced, 0};
    const size_t ret = ZSTD_decompressStream(dctx.get(), &dst, &in);  // verifies the checksum
    if (ZSTD_isError(ret)) fail(std::string("invalid zstd frame: ") + ZSTD_getErrorName(ret));
    produced += dst.pos;
    if (ret == 0) break;  // the frame is complete, checksum included
    if (last_try) fail("invalid zstd frame: decompresses past its size limit");
    if (produced == out.size()) {
      if (out.size() >= cap) {
        last_try = true;  // no room left, but zstd may still have the checksum to read
      } else {
        out.resize(std::min(cap, out.size() * 2));
      }
    } else if (in.pos == in.size || (dst.pos == 0 && in.pos == in_before)) {
      fail("invalid zstd frame: did not decompress the full frame");
    }
  }
  if (known && produced != cap) fail("invalid zstd frame: content size does not match");
  if (in.pos != in.size)
    fail("invalid zstd frame: " + std::to_string(in.size - in.pos) + " bytes after the frame");
  out.resize(produced);
  return out;
}

}  // namespace

// ---- safetensors inside a frame -------------------------------------------------------------

namespace {

// Element sizes of the dtypes that numpy (and so the reference) can load from safetensors.
size_t numpy_dtype_size(const std::string& dtype) {
  static const std::map<std::string, size_t> sizes = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"I64", 8}, {"U64", 8}, {"I32", 4}, {"U32", 4},
      {"I16", 2}, {"U16", 2}, {"I8", 1},  {"U8", 1},  {"BOOL", 1}, {"C64", 8}};
  const auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

// serde's usize: a non-negative JSON integer up to 2^64 - 1 ("-0" is a float to serde).
uint64_t usize_value(const Json& v, const std::string& what) {
  if (!v.is(Kind::Int) || v.text[0] == '-') fail("malformed message body: " + what + " is not a size");
  if (v.text.size() > 20 || (v.text.size() == 20 && v.text > "18446744073709551615"))
    fail("malformed message body: " + what + " is not a size");
  return std::stoull(v.text);
}

// A dtype as serde reads safetensors' Dtype enum: "F32", or {"F32": null}.
std::string dtype_value(const Json& v, const std::string& name) {
  if (v.is(Kind::String)) return v.text;
  if (v.is(Kind::Object) && v.members.size() == 1 && v.members[0].second.is(Kind::Null))
    return v.members[0].first;
  fail("malformed message body: dtype of " + show(name));
}

struct TensorEntry {
  std::string dtype;
  std::vector<uint64_t> shape;
  uint64_t begin = 0, end = 0;
};

// One tensor's info as safetensors (serde) reads it: an object with dtype, shape and
// data_offsets (other keys ignored), or the same three as an array.
TensorEntry tensor_entry(const std::string& name, const Json& v) {
  const Json *dtype = nullptr, *shape = nullptr, *offsets = nullptr;
  if (v.is(Kind::Object)) {
    dtype = v.get("dtype"), shape = v.get("shape"), offsets = v.get("data_offsets");
  } else if (v.is(Kind::Array) && v.items.size() == 3) {
    dtype = &v.items[0], shape = &v.items[1], offsets = &v.items[2];
  }
  if (!dtype || !shape || !offsets) fail("malformed message body: bad tensor info of " + show(name));
  TensorEntry e;
  e.dtype = dtype_value(*dtype, name);
  if (!shape->is(Kind::Array)) fail("malformed message body: shape of " + show(name));
  for (const Json& d : shape->items) e.shape.push_back(usize_value(d, "shape of " + show(name)));
  if (!offsets->is(Kind::Array) || offsets->items.size() != 2)
    fail("malformed message body: data_offsets of " + show(name));
  e.begin = usize_value(offsets->items[0], "data_offsets of " + show(name));
  e.end = usize_value(offsets->items[1], "data_offsets of " + show(name));
  return e;
}

}  // namespace

// a * b into *out, false when that overflows 64 bits (no __int128: 32-bit ARM lacks it).
bool multiply(uint64_t a, uint64_t b, uint64_t* out) {
  if (a != 0 && b > std::numeric_limits<uint64_t>::max() / a) return false;
  *out = a * b;
  return true;
}

namespace {

// What numpy accepts as the shape of an array read from the buffer.
void check_numpy_shape(const std::string& name, const TensorEntry& e, size_t item) {
  if (e.shape.size() > kNumpyMaxDims)
    fail("malformed message body: " + show(name) + " has too many dimensions");
  uint64_t bytes = item;  // item size times every non-zero dimension
  for (uint64_t d : e.shape) {
    if (d > kMaxIntp) fail("malformed message body: dimension of " + show(name) + " too large");
    if (d != 0 && (!multiply(bytes, d, &bytes) || bytes > kMaxIntp))
      fail("malformed message body: " + show(name) + " is too big");
  }
}

// The tensors of a safetensors file as the reference's loader checks them: every tensor's
// bytes exactly its shape's, offsets contiguous from 0 and covering the whole buffer.
RawTensors read_tensors(const std::string& raw, const Json& header, size_t buffer_begin) {
  std::vector<std::pair<const std::string*, TensorEntry>> entries;
  for (const auto& [name, value] : header.members) {
    if (name == "__metadata__") continue;
    entries.emplace_back(&name, tensor_entry(name, value));
  }
  std::stable_sort(entries.begin(), entries.end(), [](const auto& a, const auto& b) {
    return std::pair(a.second.begin, a.second.end) < std::pair(b.second.begin, b.second.end);
  });
  RawTensors tensors;
  uint64_t start = 0;
  for (const auto& [name, e] : entries) {
    const size_t item = numpy_dtype_size(e.dtype);
    if (item == 0) fail("malformed message body: unsupported dtype " + show(e.dtype) + " of " + show(*name));
    if (e.begin != start || e.end < e.begin)
      fail("malformed message body: invalid offset for tensor " + show(*name));
    start = e.end;
    uint64_t count = 1;
    for (uint64_t d : e.shape)  // serde's checked_mul, dimension by dimension
      if (!multiply(count, d, &count)) fail("malformed message body: shape of " + show(*name) + " overflows");
    uint64_t bytes = 0;
    if (!multiply(count, item, &bytes) || e.end - e.begin != bytes)
      fail("malformed message body: data_offsets of " + show(*name) + " do not match its shape");
    check_numpy_shape(*name, e, item);
    RawTensor t;
    t.dtype = e.dtype;
    for (uint64_t d : e.shape) t.shape.push_back(static_cast<int64_t>(d));
    tensors[*name] = std::move(t);
  }
  if (start != raw.size() - buffer_begin) fail("malformed message body: file not fully covered by tensors");
  for (const auto& [name, e] : entries)
    tensors[*name].bytes = raw.substr(buffer_begin + e.begin, e.end - e.begin);
  return tensors;
}

}  // namespace

// Decompresses and parses a frame of any kind: metadata, header (a JSON object) and tensors.
Frame unpack_frame(const std::string& payload) {
  const std::string raw = decompress_frame(payload);
  if (raw.size() < 8) fail("truncated safetensors header");
  uint64_t length = 0;
  for (int i = 7; i >= 0; --i) length = (length << 8) | static_cast<unsigned char>(raw[i]);
  if (length > raw.size() - 8) fail("safetensors header length exceeds the payload");
  const Json top = parse_json(raw.substr(8, length), "safetensors header", kSafetensorsDepth);
  if (!top.is(Kind::Object)) fail("safetensors header is not a JSON object");
  const Json* meta = top.get("__metadata__");
  if (meta == nullptr || !meta->is(Kind::Object)) fail("safetensors metadata is missing or not an object");
  Frame frame;
  for (const auto& [key, value] : meta->members) {
    if (!value.is(Kind::String)) fail("safetensors metadata values must be strings");
    frame.metadata[key] = value.text;
  }
  if (frame.metadata.size() != 3 || !frame.metadata.count("schema") || !frame.metadata.count("kind") ||
      !frame.metadata.count("header"))
    fail("safetensors metadata must hold exactly the strings ['header', 'kind', 'schema']");
  if (frame.metadata["schema"] != "1")
    fail("schema version " + show(frame.metadata["schema"]) + " is not supported (expected 1)");
  frame.header_text = frame.metadata["header"];
  frame.header = parse_json(frame.header_text, "header");
  if (!frame.header.is(Kind::Object)) fail("header is not a JSON object");
  frame.tensors = read_tensors(raw, top, 8 + length);
  return frame;
}

Frame unpack(const std::string& payload, const std::string& kind) {
  Frame frame = unpack_frame(payload);
  if (frame.metadata["kind"] != kind)
    fail("expected a '" + kind + "' message, got " + show(frame.metadata["kind"]));
  return frame;
}

// Used by the C API (capi_codec.cpp) to describe a frame before decoding it by its kind: the
// header is written back from what the parser read, so a test can compare it with Python's.
std::pair<std::string, std::string> frame_kind_and_header(const std::string& payload) {
  const Frame frame = unpack_frame(payload);
  return {frame.metadata.at("kind"), write_json(frame.header)};
}

}  // namespace edgefl::detail
