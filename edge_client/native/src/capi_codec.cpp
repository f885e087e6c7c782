// C API of the codec: describe payloads as JSON, encode updates from JSON, sign payloads.
#include <charconv>
#include <cmath>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>

#include "capi_util.hpp"
#include "codec.hpp"
#include "frame.hpp"  // detail::frame_kind_and_header
#include "signing.hpp"

namespace edgefl {

namespace {

using nlohmann::json;

// ---- describe -------------------------------------------------------------------------------

// A float32 as the shortest text that reads back as exactly its value (Python's float() and
// json.loads included; NaN and Infinity as Python's json writes them).
void append_float(std::string& out, float f) {
  if (std::isnan(f)) {
    out += "NaN";
  } else if (std::isinf(f)) {
    out += f > 0 ? "Infinity" : "-Infinity";
  } else {
    char buf[32];
    const auto r = std::to_chars(buf, buf + sizeof buf, static_cast<double>(f));
    out.append(buf, r.ptr);
  }
}

// Nested lists of the tensor's values, one level per dimension (a bare number for 0-D).
void append_values(std::string& out, const Tensor& t, size_t dim, size_t& next) {
  if (dim == t.shape.size()) {
    append_float(out, t.data.at(next++));
    return;
  }
  out += '[';
  for (int64_t i = 0; i < t.shape[dim]; ++i) {
    if (i) out += ", ";
    append_values(out, t, dim + 1, next);
  }
  out += ']';
}

std::string tensors_json(const TensorMap& tensors) {
  std::string out = "{";
  for (const auto& [name, t] : tensors) {
    if (out.size() > 1) out += ", ";
    out += json(name).dump() + ": ";
    size_t next = 0;
    append_values(out, t, 0, next);
  }
  return out + "}";
}

std::string describe_frame(const std::string& payload) {
  const auto [kind, header] = detail::frame_kind_and_header(payload);
  std::string out = "{\"kind\": " + json(kind).dump() + ", \"header\": " + header + ", \"tensors\": ";
  if (kind == "global") {
    const GlobalModel m = decode_global(payload);
    out += tensors_json(m.adapter) + ", \"residual_step\": " + tensors_json(m.residual_step) +
           ", \"clusters\": [";
    for (size_t k = 0; k < m.clusters.size(); ++k) out += (k ? ", " : "") + tensors_json(m.clusters[k]);
    out += "]";
  } else if (kind == "update") {
    out += tensors_json(decode_update(payload).adapter);
  } else if (kind == "residual") {
    out += tensors_json(decode_residual(payload).residual);
  } else {
    throw DecodeError("unknown message kind " + json(kind).dump());
  }
  return out + "}";
}

std::string describe_status(const std::string& payload) {
  const Status s = decode_status(payload);
  // The payload passed the strict JSON rules, so it can stand in the answer as it is.
  return "{\"kind\": \"status\", \"header\": " + payload + ", \"tensors\": {}, \"device_id\": " +
         json(s.device_id).dump() + ", \"online\": " + (s.online ? "true" : "false") +
         ", \"problem\": " + (s.problem ? json(*s.problem).dump() : "null") + "}";
}

std::string describe(const std::string& payload) {
  static const std::string magic("\x28\xb5\x2f\xfd", 4);  // zstd: a global, residual or update
  return payload.compare(0, 4, magic) == 0 ? describe_frame(payload) : describe_status(payload);
}

// ---- encode_update --------------------------------------------------------------------------

const json& member(const json& object, const char* key) {
  if (!object.is_object() || !object.contains(key))
    throw std::invalid_argument(std::string("missing '") + key + "'");
  return object.at(key);
}

std::string text_of(const json& v, const char* what) {
  if (!v.is_string()) throw std::invalid_argument(std::string(what) + " must be a string");
  return v.get<std::string>();
}

int64_t integer_of(const json& v, const char* what) {
  if (!v.is_number_integer()) throw std::invalid_argument(std::string(what) + " must be an integer");
  if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX))
    throw std::invalid_argument(std::string(what) + " is out of range");
  return v.get<int64_t>();
}

// A number, or "NaN" / "Infinity" / "-Infinity", which JSON has no literal for.
double number_of(const json& v, const char* what) {
  if (v.is_number()) return v.get<double>();
  if (v.is_string()) {
    const std::string s = v.get<std::string>();
    if (s == "NaN") return std::nan("");
    if (s == "Infinity") return INFINITY;
    if (s == "-Infinity") return -INFINITY;
  }
  throw std::invalid_argument(std::string(what) + " must be a number");
}

// A tensor given as {"shape": [...], "data": [flat values]}, which keeps shapes with a zero
// size (nested lists lose the dimensions after it), or as nested lists, where the first
// element at each level gives that dimension.
Tensor tensor_of(const std::string& name, const json& v) {
  Tensor t;
  if (v.is_object()) {
    for (const json& d : member(v, "shape")) t.shape.push_back(integer_of(d, "a dimension"));
    for (const json& x : member(v, "data"))
      t.data.push_back(static_cast<float>(number_of(x, "a tensor value")));
    return t;
  }
  for (const json* level = &v; level->is_array(); level = &(*level)[0]) {
    t.shape.push_back(static_cast<int64_t>(level->size()));
    if (level->empty()) break;
  }
  const auto fill = [&](const auto& self, const json& node, size_t dim) -> void {
    if (dim == t.shape.size()) {
      t.data.push_back(static_cast<float>(number_of(node, "a tensor value")));
      return;
    }
    if (!node.is_array() || static_cast<int64_t>(node.size()) != t.shape[dim])
      throw std::invalid_argument("tensor " + name + " is not a rectangular nested list");
    for (const json& item : node) self(self, item, dim + 1);
  };
  fill(fill, v, 0);
  return t;
}

std::string encode_update_json(const std::string& text) {
  const json doc = json::parse(text);
  const json& h = member(doc, "header");
  Update u;
  u.federation = text_of(member(h, "federation"), "federation");
  u.round = integer_of(member(h, "round"), "round");
  u.device_id = text_of(member(h, "device_id"), "device_id");
  u.manifest_sha256 = text_of(member(h, "manifest_sha256"), "manifest_sha256");
  u.num_samples = integer_of(member(h, "num_samples"), "num_samples");
  u.update_id = text_of(member(h, "update_id"), "update_id");
  if (h.contains("metrics")) {
    const json& metrics = h.at("metrics");
    if (!metrics.is_object()) throw std::invalid_argument("metrics must be an object");
    for (const auto& [name, value] : metrics.items()) u.metrics[name] = number_of(value, "a metric");
  }
  const json& is_delta = member(h, "is_delta");
  if (!is_delta.is_boolean()) throw std::invalid_argument("is_delta must be a boolean");
  u.is_delta = is_delta.get<bool>();
  if (h.contains("task")) u.task = text_of(h.at("task"), "task");
  const std::string encoding = text_of(member(h, "encoding"), "encoding");
  std::optional<double> topk;
  if (h.contains("topk") && !h.at("topk").is_null()) topk = number_of(h.at("topk"), "topk");
  const json& tensors = member(doc, "tensors");
  if (!tensors.is_object()) throw std::invalid_argument("tensors must be an object");
  for (const auto& [name, value] : tensors.items()) u.adapter[name] = tensor_of(name, value);
  return encode_update(u, encoding, topk);
}

}  // namespace

}  // namespace edgefl

extern "C" {

int edgefl_codec_describe(const uint8_t* payload, size_t size, edgefl_buffer* out) {
  return edgefl::guarded([&] {
    if (payload == nullptr && size != 0) throw std::invalid_argument("payload is NULL");
    const std::string bytes(reinterpret_cast<const char*>(payload), payload ? size : 0);
    return edgefl::to_buffer(edgefl::describe(bytes), out);
  });
}

int edgefl_codec_encode_update(const char* json_text, edgefl_buffer* out) {
  return edgefl::guarded([&] {
    if (json_text == nullptr) throw std::invalid_argument("json is NULL");
    return edgefl::to_buffer(edgefl::encode_update_json(json_text), out);
  });
}

int edgefl_codec_sign(const char* key_pem_path, const char* device_id, const uint8_t* payload, size_t size,
                      edgefl_buffer* out) {
  return edgefl::guarded([&] {
    if (key_pem_path == nullptr || device_id == nullptr)
      throw std::invalid_argument("key path or device id is NULL");
    if (payload == nullptr && size != 0) throw std::invalid_argument("payload is NULL");
    const std::string bytes(reinterpret_cast<const char*>(payload), payload ? size : 0);
    const edgefl::SigningKey key = edgefl::SigningKey::from_pem_file(key_pem_path);
    return edgefl::to_buffer(key.sign(device_id, bytes), out);
  });
}

}  // extern "C"
