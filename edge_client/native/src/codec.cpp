// Wire messages of docs/PROTOCOL.md: header field rules, and the decoders/encoders of codec.hpp.
#include "codec.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <utility>

#include "frame.hpp"
#include "json_strict.hpp"
#include "quant.hpp"
#include "safetensors.hpp"

namespace edgefl {

using namespace detail;

namespace {

// Limits of PROTOCOL.md section 8 and protocol/messages.py.
constexpr size_t kMaxStatusBytes = 4096;
constexpr size_t kMaxSegmentBytes = 255;
constexpr size_t kMaxMetrics = 16;
constexpr double kMaxMetricAbs = 1e15;
constexpr size_t kMaxShapeRank = 8;
constexpr double kLargestFloat = std::numeric_limits<double>::max();
const std::string kResidualPrefix = "residual_step/";
const std::string kClusterPrefix = "cluster/";

// ---- field rules (protocol/messages.py) -----------------------------------------------------

bool is_token_char(char c, bool colon) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' ||
         c == '.' || c == '-' || (colon && c == ':');
}

bool matches(const std::string& s, size_t max_len, bool colon) {
  if (s.empty() || s.size() > max_len) return false;
  return std::all_of(s.begin(), s.end(), [&](char c) { return is_token_char(c, colon); });
}

bool is_token(const std::string& s) { return matches(s, 64, true); }         // [A-Za-z0-9_.:-]{1,64}
bool is_metric_name(const std::string& s) { return matches(s, 64, false); }  // [A-Za-z0-9_.-]{1,64}
bool is_task_name(const std::string& s) { return matches(s, 32, false); }    // [A-Za-z0-9_.-]{1,32}

// Why a federation or device id is no topic segment, "" when it is one.
std::string segment_problem(const std::string& s) {
  if (!valid_utf8(s)) return "is not valid UTF-8";
  if (s.empty() || s.find_first_of(std::string("/+#\0", 4)) != std::string::npos)
    return "must be non-empty and free of '/', '+', '#', NUL";
  if (s.size() > kMaxSegmentBytes) return "is over 255 bytes of UTF-8";
  return "";
}

std::string slot_problem(const std::string& slot) {
  const size_t sep = slot.find('/');
  const std::string problem = segment_problem(slot.substr(0, sep));
  if (!problem.empty()) return "device id " + problem;
  if (sep == std::string::npos) return "";
  const std::string task = slot.substr(sep + 1);
  if (task.empty()) return "has an empty task name";
  if (!is_task_name(task)) return "task must be 1-32 characters of [A-Za-z0-9_.-]";
  return "";
}

std::string encoding_problem(const std::string& encoding) {
  if (encoding == "fp32" || encoding == "fp16" || encoding == "int8" || encoding == "int8-channel")
    return "";
  return "unknown encoding " + show(encoding) + "; valid encodings are fp32, fp16, int8, int8-channel";
}

bool valid_topk(double topk) { return topk > 0 && topk <= 1; }

// Metric checks shared by the decoder (on JSON) and the encoder (on doubles).
std::string metric_value_problem(const std::string& name, double value) {
  if (!std::isfinite(value) || std::fabs(value) > kMaxMetricAbs)
    return "metric " + name + " must be finite with |value| <= 1e+15";
  return "";
}

// Field accessors on a parsed header: each throws DecodeError naming the field.
const Json& field(const Json& header, const std::string& name) {
  const Json* v = header.get(name);
  if (v == nullptr) fail("header field '" + name + "' is missing");
  return *v;
}

int64_t int_value(const Json& v, const std::string& what, int64_t low, int64_t high = kMaxInt32) {
  if (!v.is(Kind::Int)) fail(what + " must be an integer, got " + show(v.text));
  if (!v.fits || v.integer < low || v.integer > high)
    fail(what + " must be in " + std::to_string(low) + ".." + std::to_string(high) + ", got " +
         show(v.text));
  return v.integer;
}

bool bool_value(const Json& v, const std::string& what) {
  if (!v.is(Kind::Bool)) fail(what + " must be a boolean");
  return v.boolean;
}

const std::string& string_value(const Json& v, const std::string& what) {
  if (!v.is(Kind::String)) fail(what + " must be a string");
  return v.text;
}

// A JSON number (integer or not, never a boolean) as float(); a huge integer overflows it.
double number_value(const Json& v, const std::string& what) {
  if (!v.is(Kind::Int) && !v.is(Kind::Float)) fail(what + " must be a number");
  if (!std::isfinite(v.number)) fail(what + " is out of range: " + show(v.text));
  return v.number;
}

std::string segment_value(const Json& v, const std::string& what) {
  const std::string& s = string_value(v, what);
  const std::string problem = segment_problem(s);
  if (!problem.empty()) fail(what + " " + show(s) + " " + problem);
  return s;
}

std::string token_value(const Json& v, const std::string& what) {
  if (!v.is(Kind::String) || !is_token(v.text))
    fail(what + " must be 1-64 characters of [A-Za-z0-9_.:-], got " + show(v.text));
  return v.text;
}

std::optional<double> topk_value(const Json& v, const std::string& what) {
  if (v.is(Kind::Null)) return std::nullopt;
  const double topk = number_value(v, what);
  if (!valid_topk(topk)) fail(what + " must be in (0, 1], got " + show(v.text));
  return topk;
}

std::string encoding_value(const Json& v, const std::string& what) {
  const std::string& encoding = string_value(v, what);
  const std::string problem = encoding_problem(encoding);
  if (!problem.empty()) fail(problem);
  return encoding;
}

std::map<std::string, double> metrics_value(const Json& v) {
  if (!v.is(Kind::Object)) fail("header field 'metrics' must be an object");
  if (v.members.size() > kMaxMetrics)
    fail("header field 'metrics': " + std::to_string(v.members.size()) + " metrics, over the limit of 16");
  std::map<std::string, double> metrics;
  for (const auto& [name, value] : v.members) {
    if (!is_metric_name(name)) fail("header field 'metrics': metric name " + show(name) + " is invalid");
    if (!value.is(Kind::Int) && !value.is(Kind::Float))
      fail("header field 'metrics': metric " + name + " must be a number");
    // An integer compares exactly, so one past int64 is simply too large.
    const bool too_big = value.is(Kind::Int)
                             ? !value.fits || value.integer > 1000000000000000LL ||
                                   value.integer < -1000000000000000LL
                             : !metric_value_problem(name, value.number).empty();
    if (too_big) fail("header field 'metrics': metric " + name + " must be finite with |value| <= 1e+15");
    metrics[name] = value.number;
  }
  return metrics;
}

void check_keys(const Json& header, const std::set<std::string>& required,
                const std::set<std::string>& optional, const std::string& what = "header") {
  for (const auto& key : required)
    if (header.get(key) == nullptr) fail(what + " field '" + key + "' is missing");
  for (const auto& [key, value] : header.members)
    if (!required.count(key) && !optional.count(key)) fail("unknown " + what + " field " + show(key));
}

std::optional<std::map<std::string, std::vector<int64_t>>> shapes_value(const Json& header, bool sparse) {
  const Json* raw = header.get("shapes");
  if (!sparse) {
    if (raw != nullptr) fail("header field 'shapes' is only valid with topk");
    return std::nullopt;
  }
  if (raw == nullptr || !raw->is(Kind::Object))
    fail("header field 'shapes' must map tensor names to lists of sizes >= 0");
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& [name, shape] : raw->members) {
    const std::string what = "header field 'shapes' of " + show(name);
    if (!shape.is(Kind::Array) || shape.items.size() > kMaxShapeRank)
      fail(what + " must be a list of at most 8 sizes");
    std::vector<int64_t> dims;
    for (const Json& d : shape.items) dims.push_back(int_value(d, what + " size", 0));
    shapes[name] = dims;
  }
  return shapes;
}

// ---- headers written by the encoders --------------------------------------------------------

// A JSON object written as Python's json.dumps does (", " and ": ", keys in insertion order).
class ObjectWriter {
 public:
  ObjectWriter& raw(const std::string& key, const std::string& json) {
    text_ += (text_.size() > 1 ? ", " : "") + py_string(key) + ": " + json;
    return *this;
  }
  ObjectWriter& str(const std::string& key, const std::string& value) { return raw(key, py_string(value)); }
  ObjectWriter& num(const std::string& key, double value) { return raw(key, py_float(value)); }
  ObjectWriter& integer(const std::string& key, int64_t value) { return raw(key, std::to_string(value)); }
  ObjectWriter& boolean(const std::string& key, bool value) { return raw(key, value ? "true" : "false"); }
  std::string done() const { return text_ + "}"; }

 private:
  std::string text_ = "{";
};

std::string int_list(const std::vector<int64_t>& values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + std::to_string(values[i]);
  return out + "]";
}

std::string pack(const std::string& kind, const std::string& header, const RawTensors& tensors) {
  return compress_frame(serialize_safetensors(tensors, {{"schema", "1"}, {"kind", kind}, {"header", header}}));
}

void require(bool ok, const std::string& message) {
  if (!ok) refuse(message);
}

void check_segment_arg(const std::string& value, const std::string& what) {
  const std::string problem = segment_problem(value);
  require(problem.empty(), what + " " + show(value) + " " + problem);
}

void check_update(const Update& u, const std::string& encoding, std::optional<double> topk) {
  check_segment_arg(u.federation, "federation");
  check_segment_arg(u.device_id, "device_id");
  require(u.round >= 0 && u.round <= kMaxInt32, "round must be in 0..2147483647");
  require(is_token(u.manifest_sha256), "manifest_sha256 must be 1-64 characters of [A-Za-z0-9_.:-]");
  require(u.num_samples >= 1 && u.num_samples <= kMaxInt32, "num_samples must be in 1..2147483647");
  require(is_token(u.update_id), "update_id must be 1-64 characters of [A-Za-z0-9_.:-]");
  require(u.metrics.size() <= kMaxMetrics, "more than 16 metrics");
  for (const auto& [name, value] : u.metrics) {
    require(is_metric_name(name), "metric name " + show(name) + " must be 1-64 characters of [A-Za-z0-9_.-]");
    const std::string problem = metric_value_problem(name, value);
    require(problem.empty(), problem);
  }
  require(u.task.empty() || is_task_name(u.task),
          "task slot " + show(u.task) + " must be 1-32 characters of [A-Za-z0-9_.-]");
  require(encoding_problem(encoding).empty(), encoding_problem(encoding));
  require(!topk || valid_topk(*topk), "topk must be in (0, 1]");
}

// ---- globals --------------------------------------------------------------------------------

std::map<std::string, int64_t> assignment_value(const Json& header) {
  std::map<std::string, int64_t> assignment;
  const Json* raw = header.get("assignment");
  if (raw == nullptr) return assignment;
  if (!raw->is(Kind::Object)) fail("header field 'assignment' must map slot names to integers");
  for (const auto& [slot, cluster] : raw->members) {
    const std::string problem = slot_problem(slot);
    if (!problem.empty()) fail("header field 'assignment': slot " + show(slot) + " " + problem);
    assignment[slot] = int_value(cluster, "header field 'assignment' of " + show(slot), 0);
  }
  return assignment;
}

void task_value(const Json& header, GlobalModel& m) {
  if (header.get("task_classes") == nullptr && header.get("task_index") == nullptr) return;
  const Json* classes = header.get("task_classes");
  if (classes == nullptr || !classes->is(Kind::Array) || classes->items.empty())
    fail("header field 'task_classes' must be a non-empty list of integers");
  for (const Json& c : classes->items)
    m.task_classes.push_back(int_value(c, "header field 'task_classes' entry", 0));
  const Json* index = header.get("task_index");
  if (index == nullptr) fail("header field 'task_index' must be an integer, got None");
  m.task_index = int_value(*index, "header field 'task_index'", 0);
}

// Names of the residual layers, checked as protocol/residual.py residual_layers.
std::vector<std::string> residual_layers(const TensorMap& tensors) {
  std::map<std::string, std::set<std::string>> layers;
  for (const auto& [name, t] : tensors) {
    std::string suffix;
    for (const char* s : {".U", ".V", ".dense"}) {
      const size_t n = std::strlen(s);
      if (name.size() >= n && name.compare(name.size() - n, n, s) == 0) {
        suffix = s;
        break;
      }
    }
    if (suffix.empty()) fail("residual tensor " + show(name) + " ends in none of .U, .V, .dense");
    layers[name.substr(0, name.size() - suffix.size())].insert(suffix);
  }
  std::vector<std::string> out;
  for (const auto& [layer, parts] : layers) {
    if (parts != std::set<std::string>{".U", ".V"} && parts != std::set<std::string>{".dense"})
      fail("residual layer " + show(layer) + ": need U and V, or dense");
    out.push_back(layer);
  }
  return out;
}

// Splits a global's tensors into adapter, residual step and clusters 0..K-1.
void split_global_tensors(const RawTensors& tensors, GlobalModel& m) {
  std::map<int64_t, TensorMap> found;
  for (const auto& [name, raw] : tensors) {
    if (name.compare(0, kResidualPrefix.size(), kResidualPrefix) == 0) {
      m.residual_step[name.substr(kResidualPrefix.size())] = dense_f32(name, raw);
    } else if (name.compare(0, kClusterPrefix.size(), kClusterPrefix) == 0) {
      const std::string rest = name.substr(kClusterPrefix.size());
      const size_t slash = rest.find('/');
      const std::string index = rest.substr(0, slash);
      // Canonical decimal: no sign, no leading zero, at most 9 digits.
      const bool canonical = !index.empty() && index.size() <= 9 &&
                             index.find_first_not_of("0123456789") == std::string::npos &&
                             (index == "0" || index[0] != '0');
      if (!canonical || slash == std::string::npos || slash + 1 == rest.size())
        fail("malformed cluster tensor name " + show(name));
      found[std::stoll(index)][rest.substr(slash + 1)] = dense_f32(name, raw);
    } else {
      m.adapter[name] = dense_f32(name, raw);
    }
  }
  int64_t expected = 0;
  for (auto& [index, cluster] : found) {
    if (index != expected++) fail("cluster indices are not 0..K-1");
    m.clusters.push_back(std::move(cluster));
  }
}

void check_global(const GlobalModel& m) {
  if (!m.residual_step.empty() && !m.residual) fail("a residual step needs residual = true");
  for (const auto& [slot, cluster] : m.assignment)
    if (cluster >= static_cast<int64_t>(m.clusters.size()))
      fail("assignment names clusters that do not exist: " + show(slot));
}

}  // namespace

// ---- public API -------------------------------------------------------------------------------

const TensorMap& GlobalModel::start_adapter(const std::string& device_id, const std::string& task) const {
  const auto it = assignment.find(task.empty() ? device_id : device_id + "/" + task);
  if (it == assignment.end() || it->second < 0 || it->second >= static_cast<int64_t>(clusters.size()))
    return adapter;
  return clusters[static_cast<size_t>(it->second)];
}

GlobalModel decode_global(const std::string& payload) {
  const Frame frame = unpack(payload, "global");
  const Json& h = frame.header;
  check_keys(h, {"federation", "round", "manifest_sha256", "local_steps", "learning_rate", "update_encoding",
                 "update_topk", "final"},
             {"assignment", "task_index", "task_classes", "residual"});
  GlobalModel m;
  m.federation = segment_value(field(h, "federation"), "header field 'federation'");
  m.round = int_value(field(h, "round"), "header field 'round'", 0);
  m.manifest_sha256 = token_value(field(h, "manifest_sha256"), "header field 'manifest_sha256'");
  m.train.local_steps = int_value(field(h, "local_steps"), "header field 'local_steps'", 1);
  m.final = bool_value(field(h, "final"), "header field 'final'");
  m.train.learning_rate = number_value(field(h, "learning_rate"), "header field 'learning_rate'");
  if (!(m.train.learning_rate > 0 && m.train.learning_rate <= kLargestFloat))
    fail("learning_rate must be a positive finite number");
  m.train.update_encoding = encoding_value(field(h, "update_encoding"), "header field 'update_encoding'");
  m.train.update_topk = topk_value(field(h, "update_topk"), "header field 'update_topk'");
  m.assignment = assignment_value(h);
  task_value(h, m);
  if (const Json* residual = h.get("residual")) {
    if (!bool_value(*residual, "header field 'residual'"))
      fail("header field 'residual' is written only as true");
    m.residual = true;
  }
  split_global_tensors(frame.tensors, m);
  if (!m.residual_step.empty()) residual_layers(m.residual_step);
  check_global(m);
  return m;
}

ResidualModel decode_residual(const std::string& payload) {
  const Frame frame = unpack(payload, "residual");
  const Json& h = frame.header;
  check_keys(h, {"federation", "round", "manifest_sha256", "truncation_error"}, {});
  ResidualModel m;
  for (const auto& [name, raw] : frame.tensors) m.residual[name] = dense_f32(name, raw);
  residual_layers(m.residual);
  m.federation = segment_value(field(h, "federation"), "header field 'federation'");
  m.round = int_value(field(h, "round"), "header field 'round'", 0);
  m.manifest_sha256 = token_value(field(h, "manifest_sha256"), "header field 'manifest_sha256'");
  m.truncation_error = number_value(field(h, "truncation_error"), "header field 'truncation_error'");
  if (!(m.truncation_error >= 0.0 && m.truncation_error <= 1.0))
    fail("truncation_error must be a number in [0, 1], got " + show(field(h, "truncation_error").text));
  return m;
}

Update decode_update(const std::string& payload) {
  const Frame frame = unpack(payload, "update");
  const Json& h = frame.header;
  check_keys(h, {"federation", "round", "device_id", "manifest_sha256", "num_samples", "update_id", "is_delta",
                 "encoding", "topk"},
             {"metrics", "task", "shapes"});
  Update u;
  u.federation = segment_value(field(h, "federation"), "header field 'federation'");
  u.round = int_value(field(h, "round"), "header field 'round'", 0);
  u.device_id = segment_value(field(h, "device_id"), "header field 'device_id'");
  u.manifest_sha256 = token_value(field(h, "manifest_sha256"), "header field 'manifest_sha256'");
  u.num_samples = int_value(field(h, "num_samples"), "header field 'num_samples'", 1);
  u.update_id = token_value(field(h, "update_id"), "header field 'update_id'");
  if (const Json* metrics = h.get("metrics")) u.metrics = metrics_value(*metrics);
  u.is_delta = bool_value(field(h, "is_delta"), "header field 'is_delta'");
  if (const Json* task = h.get("task")) {
    if (!task->is(Kind::String) || task->text.empty()) fail("header field 'task' must be a non-empty string");
    if (!is_task_name(task->text))
      fail("header field 'task': task slot " + show(task->text) + " must be 1-32 characters of [A-Za-z0-9_.-]");
    u.task = task->text;
  }
  const std::string encoding = encoding_value(field(h, "encoding"), "header field 'encoding'");
  const std::optional<double> topk = topk_value(field(h, "topk"), "header field 'topk'");
  const auto shapes = shapes_value(h, topk.has_value());
  u.adapter = Decoder{frame.tensors, encoding, topk.has_value()}.decode(shapes);
  return u;
}

Status decode_status(const std::string& payload) {
  if (payload.size() > kMaxStatusBytes)
    fail("status of " + std::to_string(payload.size()) + " bytes exceeds the 4096 limit");
  const Json raw = parse_json(payload, "status");
  if (!raw.is(Kind::Object)) fail("status is not a JSON object");
  check_keys(raw, {"schema", "device_id", "online"}, {"problem"}, "status");
  const Json& schema = *raw.get("schema");
  if (!schema.is(Kind::Int) || !schema.fits || schema.integer != 1)
    fail("status schema " + show(schema.text) + " is not supported (expected 1)");
  Status status;
  if (const Json* problem = raw.get("problem")) {
    if (!problem->is(Kind::String)) fail("status field 'problem' must be a string");
    if (problem->text != "manifest")
      fail("status field problem must be one of ['manifest'], got " + show(problem->text));
    status.problem = problem->text;
  }
  status.device_id = segment_value(*raw.get("device_id"), "status field device_id");
  status.online = bool_value(*raw.get("online"), "status field online");
  return status;
}

std::string encode_update(const Update& update, const std::string& encoding, std::optional<double> topk) {
  check_update(update, encoding, topk);
  const RawTensors wire = Encoder{encoding, topk}.encode(update.adapter);
  ObjectWriter metrics;
  for (const auto& [name, value] : update.metrics) metrics.num(name, value);
  ObjectWriter header;
  header.str("federation", update.federation)
      .integer("round", update.round)
      .str("device_id", update.device_id)
      .str("manifest_sha256", update.manifest_sha256)
      .integer("num_samples", update.num_samples)
      .str("update_id", update.update_id)
      .raw("metrics", metrics.done())
      .boolean("is_delta", update.is_delta)
      .str("encoding", encoding)
      .raw("topk", topk ? py_float(*topk) : "null");
  if (!update.task.empty()) header.str("task", update.task);  // absent for a device's only slot
  if (topk) {  // sparse tensors no longer carry their shapes
    ObjectWriter shapes;
    for (const auto& [name, t] : update.adapter) shapes.raw(name, int_list(t.shape));
    header.raw("shapes", shapes.done());
  }
  return pack("update", header.done(), wire);
}

std::string encode_global(const GlobalModel& m) {
  check_segment_arg(m.federation, "federation");
  require(m.round >= 0 && m.round <= kMaxInt32, "round must be in 0..2147483647");
  require(is_token(m.manifest_sha256), "manifest_sha256 must be 1-64 characters of [A-Za-z0-9_.:-]");
  require(m.train.local_steps >= 1 && m.train.local_steps <= kMaxInt32, "local_steps must be in 1..2147483647");
  require(m.train.learning_rate > 0 && m.train.learning_rate <= kLargestFloat,
          "learning_rate must be positive and finite");
  require(encoding_problem(m.train.update_encoding).empty(), encoding_problem(m.train.update_encoding));
  require(!m.train.update_topk || valid_topk(*m.train.update_topk), "update_topk must be in (0, 1]");
  require(m.residual || m.residual_step.empty(), "a residual step needs residual = true");
  require(m.task_index.has_value() == !m.task_classes.empty(), "task_index and task_classes come together");
  ObjectWriter header;
  header.str("federation", m.federation)
      .integer("round", m.round)
      .str("manifest_sha256", m.manifest_sha256)
      .integer("local_steps", m.train.local_steps)
      .num("learning_rate", m.train.learning_rate)
      .str("update_encoding", m.train.update_encoding)
      .raw("update_topk", m.train.update_topk ? py_float(*m.train.update_topk) : "null")
      .boolean("final", m.final);
  if (!m.assignment.empty()) {  // optional fields only when used: plain globals keep v1 bytes
    ObjectWriter assignment;
    for (const auto& [slot, cluster] : m.assignment) {
      require(slot_problem(slot).empty(), "assignment slot " + show(slot) + " " + slot_problem(slot));
      require(cluster >= 0 && cluster < static_cast<int64_t>(m.clusters.size()),
              "assignment names a missing cluster");
      assignment.integer(slot, cluster);
    }
    header.raw("assignment", assignment.done());
  }
  if (m.task_index) {
    require(*m.task_index >= 0 && *m.task_index <= kMaxInt32, "task_index must be in 0..2147483647");
    for (int64_t c : m.task_classes) require(c >= 0 && c <= kMaxInt32, "task classes must be in 0..2147483647");
    header.integer("task_index", *m.task_index).raw("task_classes", int_list(m.task_classes));
  }
  if (m.residual) header.boolean("residual", true);
  RawTensors tensors;
  const auto add = [&](const std::string& name, const Tensor& t) {
    require(element_count(t.shape) == t.data.size(),
            "tensor " + show(name) + " has the wrong number of values");
    tensors[name] = f32_tensor(t.shape, t.data);
  };
  for (const auto& [name, t] : m.adapter) add(name, t);
  for (const auto& [name, t] : m.residual_step) add(kResidualPrefix + name, t);
  for (size_t k = 0; k < m.clusters.size(); ++k)
    for (const auto& [name, t] : m.clusters[k]) add(kClusterPrefix + std::to_string(k) + "/" + name, t);
  std::string payload = pack("global", header.done(), tensors);
  require(payload.size() <= kMaxPayloadBytes,
          "global of round " + std::to_string(m.round) + " encodes to " + std::to_string(payload.size()) +
              " bytes, over the 8388608-byte limit");
  return payload;
}

std::string encode_status(bool online, const std::string& device_id,
                          const std::optional<std::string>& problem) {
  check_segment_arg(device_id, "device_id");
  require(!problem || *problem == "manifest", "status problem must be one of ['manifest']");
  ObjectWriter status;
  status.integer("schema", 1).str("device_id", device_id).boolean("online", online);
  if (problem) status.str("problem", *problem);
  return status.done();
}

std::string new_update_id(const std::string& device_id, int64_t round, const std::string& task) {
  const std::string slot = task.empty() ? device_id : device_id + "-" + task;
  // One "_" per character (not byte) outside [A-Za-z0-9_.-], then the first 32 characters.
  std::string prefix;
  uint32_t cp;
  for (size_t i = 0; i < slot.size() && prefix.size() < 32;) {
    const size_t n = utf8_sequence(slot, i, &cp);
    prefix += n == 1 && is_token_char(slot[i], false) ? slot[i] : '_';
    i += n == 0 ? 1 : n;
  }
  std::random_device random;
  std::string hex;
  static const char digits[] = "0123456789abcdef";
  while (hex.size() < 12) {
    uint32_t bits = random();
    for (int k = 0; k < 8 && hex.size() < 12; ++k, bits >>= 4) hex += digits[bits & 0xf];
  }
  return prefix + "-" + std::to_string(round) + "-" + hex;
}

TensorMap dense_residual(const TensorMap& factors) {
  TensorMap out;
  for (const std::string& layer : residual_layers(factors)) {
    const auto dense = factors.find(layer + ".dense");
    if (dense != factors.end()) {
      out[layer] = dense->second;
      continue;
    }
    const Tensor& u = factors.at(layer + ".U");
    const Tensor& v = factors.at(layer + ".V");
    if (u.shape.size() != 2 || v.shape.size() != 2 || u.shape[1] != v.shape[0])
      fail("residual factors of " + show(layer) + " have shapes " + shape_text(u.shape) + " and " +
           shape_text(v.shape));
    const auto rows = static_cast<size_t>(u.shape[0]), inner = static_cast<size_t>(u.shape[1]),
               cols = static_cast<size_t>(v.shape[1]);
    // Summed in float64 and rounded once, as the reference's float64 matmul.
    std::vector<double> acc(rows * cols, 0.0);
    for (size_t i = 0; i < rows; ++i)
      for (size_t k = 0; k < inner; ++k) {
        const double a = u.data[i * inner + k];
        for (size_t j = 0; j < cols; ++j) acc[i * cols + j] += a * static_cast<double>(v.data[k * cols + j]);
      }
    Tensor r{{u.shape[0], v.shape[1]}, std::vector<float>(acc.size())};
    for (size_t i = 0; i < acc.size(); ++i) r.data[i] = static_cast<float>(acc[i]);
    out[layer] = std::move(r);
  }
  return out;
}

TensorMap read_safetensors_file(const std::string& path, std::map<std::string, std::string>* metadata) {
  const RawTensors raw = parse_safetensors(read_file(path), metadata);
  TensorMap out;
  for (const auto& [name, t] : raw) {
    if (t.dtype != "F32") throw std::runtime_error(path + ": tensor " + name + " is " + t.dtype + ", not F32");
    out[name] = Tensor{t.shape, to_floats(t)};
  }
  return out;
}

void write_safetensors_file(const std::string& path, const TensorMap& tensors,
                            const std::map<std::string, std::string>& metadata) {
  RawTensors raw;
  for (const auto& [name, t] : tensors) {
    if (element_count(t.shape) != t.data.size())
      throw std::invalid_argument("tensor " + name + " has the wrong number of values for its shape");
    raw[name] = f32_tensor(t.shape, t.data);
  }
  write_file_atomic(path, serialize_safetensors(raw, metadata));
}

}  // namespace edgefl
