// Wire codec of docs/PROTOCOL.md: zstd frame around safetensors, strict header JSON, encodings.
#define ZSTD_STATIC_LINKING_ONLY  // ZSTD_getFrameHeader: the checksum flag of a frame
#include "codec.hpp"

#include <zstd.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <set>
#include <utility>

#include "safetensors.hpp"

namespace edgefl {

namespace {

// Limits of PROTOCOL.md section 8 and protocol/messages.py.
constexpr size_t kMaxPayloadBytes = 8u << 20;
constexpr size_t kMaxDecompressedBytes = 64u << 20;
constexpr uint64_t kMaxDenseBytes = kMaxDecompressedBytes;
constexpr size_t kMaxStatusBytes = 4096;
constexpr int kZstdLevel = 3;
constexpr int64_t kMaxInt32 = 2147483647;
constexpr size_t kMaxSegmentBytes = 255;
constexpr size_t kMaxMetrics = 16;
constexpr double kMaxMetricAbs = 1e15;
constexpr size_t kMaxShapeRank = 8;
constexpr double kLargestFloat = std::numeric_limits<double>::max();
// Python refuses to turn more decimal digits than this into an int (sys.int_info), so the
// reference rejects such a JSON integer anywhere in a message.
constexpr size_t kMaxIntDigits = 4300;
// The reference reads the safetensors JSON twice: Python's json, then safetensors' serde_json,
// whose recursion limit (127 open containers) is the stricter one.
constexpr int kSafetensorsDepth = 127;
// Deeper than this, a header or status breaks a field rule anyway; the bound keeps the
// recursive parser's stack small.
constexpr int kHeaderDepth = 256;
// Values in one JSON document: far above any real message (a global of 10^5 tensors), and it
// bounds the parser's memory (about 100 bytes a value) where the reference has no bound.
constexpr size_t kMaxJsonValues = 1000000;
constexpr size_t kNumpyMaxDims = 64;  // numpy 2 refuses arrays of more dimensions
constexpr uint64_t kMaxIntp = uint64_t(std::numeric_limits<int64_t>::max());
const std::string kZstdMagic("\x28\xb5\x2f\xfd", 4);
const std::string kResidualPrefix = "residual_step/";
const std::string kClusterPrefix = "cluster/";
const std::string kScale = "#scale", kIndices = "#indices", kValues = "#values";
constexpr int kInt8Levels = 127;
constexpr int kScaleBits = 17;
constexpr int kTiniestFloatExponent = -149;
constexpr float kFp16Max = 65504.0f;

[[noreturn]] void fail(const std::string& message) { throw DecodeError(message); }
[[noreturn]] void refuse(const std::string& message) { throw std::invalid_argument(message); }

// A short, ASCII, one-line rendering of a value for error messages.
std::string show(const std::string& value) {
  std::string out = "'";
  for (unsigned char c : value) {
    if (c >= 0x20 && c < 0x7f && c != '\'' && c != '\\') {
      out += static_cast<char>(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
    if (out.size() > 40) return out.substr(0, 37) + "...";
  }
  return out + "'";
}

// ---- UTF-8 ---------------------------------------------------------------------------------

// Length of the well-formed UTF-8 sequence at s[i] (no overlong form, surrogate or code point
// past U+10FFFF, as Python's decoder), or 0; its code point goes to *cp.
size_t utf8_sequence(const std::string& s, size_t i, uint32_t* cp) {
  const auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = byte(i);
  if (c < 0x80) {
    *cp = c;
    return 1;
  }
  size_t n;
  uint32_t min;
  if (c >= 0xc2 && c <= 0xdf) {
    n = 2, min = 0x80, *cp = c & 0x1f;
  } else if (c >= 0xe0 && c <= 0xef) {
    n = 3, min = 0x800, *cp = c & 0x0f;
  } else if (c >= 0xf0 && c <= 0xf4) {
    n = 4, min = 0x10000, *cp = c & 0x07;
  } else {
    return 0;
  }
  if (i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k) {
    if ((byte(i + k) & 0xc0) != 0x80) return 0;
    *cp = (*cp << 6) | (byte(i + k) & 0x3f);
  }
  if (*cp < min || *cp > 0x10ffff || (*cp >= 0xd800 && *cp <= 0xdfff)) return 0;
  return n;
}

bool valid_utf8(const std::string& s) {
  uint32_t cp;
  for (size_t i = 0; i < s.size();) {
    const size_t n = utf8_sequence(s, i, &cp);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xc0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xe0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else {
    out += static_cast<char>(0xf0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  }
}

// ---- numbers as text -----------------------------------------------------------------------

// float(literal) as Python computes it (correctly rounded; +-inf past the float64 range),
// independent of the C locale. The literal follows the JSON number grammar.
double parse_double(const std::string& literal) {
  double value = 0;
  const char* first = literal.data();
  const char* last = first + literal.size();
  const auto result = std::from_chars(first, last, value);
  if (result.ec == std::errc() && result.ptr == last) return value;
  if (result.ec != std::errc::result_out_of_range) fail("number " + show(literal) + " is malformed");
  // Out of range: overflow when the first significant digit stands at 10^0 or above.
  const bool negative = literal[0] == '-';
  const size_t e_pos = literal.find_first_of("eE");
  const std::string mantissa = literal.substr(negative ? 1 : 0, e_pos == std::string::npos
                                                                     ? std::string::npos
                                                                     : e_pos - (negative ? 1 : 0));
  int64_t exponent = 0;
  if (e_pos != std::string::npos) {
    size_t k = e_pos + 1;
    const bool exp_negative = literal[k] == '-';
    if (literal[k] == '-' || literal[k] == '+') ++k;
    for (; k < literal.size(); ++k) exponent = std::min<int64_t>(exponent * 10 + (literal[k] - '0'), 1LL << 40);
    if (exp_negative) exponent = -exponent;
  }
  const size_t dot = mantissa.find('.');
  const std::string whole = mantissa.substr(0, dot);
  int64_t order;
  if (whole != "0") {
    order = static_cast<int64_t>(whole.size()) - 1 + exponent;
  } else {
    const std::string frac = dot == std::string::npos ? "" : mantissa.substr(dot + 1);
    const size_t nz = frac.find_first_not_of('0');
    order = -static_cast<int64_t>(nz == std::string::npos ? 0 : nz + 1) + exponent;
  }
  const double magnitude = order >= 0 ? std::numeric_limits<double>::infinity() : 0.0;
  return negative ? -magnitude : magnitude;
}

// repr(float) of Python: the shortest digits that read back exactly, in fixed notation for
// decimal exponents -4..15 (with ".0" when integral) and d.ddde+XX otherwise.
std::string py_float(double x) {
  if (std::isnan(x)) return "NaN";
  if (std::isinf(x)) return x > 0 ? "Infinity" : "-Infinity";
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, x, std::chars_format::scientific);
  std::string sci(buf, r.ptr);  // [-]d[.ddd]e[+-]XX
  std::string sign;
  if (sci[0] == '-') sign = "-", sci.erase(0, 1);
  const size_t e = sci.find('e');
  const int exponent = std::stoi(sci.substr(e + 1));
  std::string digits = sci.substr(0, e);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  if (exponent < -4 || exponent >= 16) {
    std::string out = sign + digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char exp_buf[16];
    std::snprintf(exp_buf, sizeof exp_buf, "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
    return out + exp_buf;
  }
  if (exponent < 0) return sign + "0." + std::string(static_cast<size_t>(-exponent - 1), '0') + digits;
  const size_t point = static_cast<size_t>(exponent) + 1;
  if (digits.size() <= point) return sign + digits + std::string(point - digits.size(), '0') + ".0";
  return sign + digits.substr(0, point) + "." + digits.substr(point);
}

// A JSON string as Python's json.dumps writes it (ensure_ascii): \uXXXX beyond printable ASCII.
std::string py_string(const std::string& utf8) {
  std::string out = "\"";
  char buf[16];
  uint32_t cp;
  for (size_t i = 0; i < utf8.size();) {
    const size_t n = utf8_sequence(utf8, i, &cp);
    if (n == 0) refuse("string " + show(utf8) + " is not valid UTF-8");
    i += n;
    switch (cp) {
      case '"': out += "\\\""; continue;
      case '\\': out += "\\\\"; continue;
      case '\n': out += "\\n"; continue;
      case '\r': out += "\\r"; continue;
      case '\t': out += "\\t"; continue;
      case '\b': out += "\\b"; continue;
      case '\f': out += "\\f"; continue;
      default: break;
    }
    if (cp >= 0x20 && cp < 0x7f) {
      out += static_cast<char>(cp);
    } else if (cp < 0x10000) {
      std::snprintf(buf, sizeof buf, "\\u%04x", cp);
      out += buf;
    } else {
      const uint32_t v = cp - 0x10000;
      std::snprintf(buf, sizeof buf, "\\u%04x\\u%04x", 0xd800 + (v >> 10), 0xdc00 + (v & 0x3ff));
      out += buf;
    }
  }
  return out + "\"";
}

// ---- strict JSON (PROTOCOL.md section 3.1, as protocol.codec.strict_json) ------------------

struct Json {
  enum class Kind { Null, Bool, Int, Float, String, Array, Object };
  Kind kind = Kind::Null;
  bool boolean = false;
  std::string text;       // a string's UTF-8 value, or a number's literal
  double number = 0;      // a number as Python's float() of it (+-inf when that overflows)
  bool fits = false;      // an integer within int64
  int64_t integer = 0;    // its value, when it fits
  std::vector<Json> items;                             // array
  std::vector<std::pair<std::string, Json>> members;   // object, in order

  bool is(Kind k) const { return kind == k; }
  const Json* get(const std::string& key) const {
    for (const auto& [k, v] : members)
      if (k == key) return &v;
    return nullptr;
  }
};
using Kind = Json::Kind;

// A recursive-descent parser of RFC 8259 JSON that refuses what the reference refuses: invalid
// UTF-8, NaN/Infinity, numbers beyond float64, duplicate keys, lone surrogate escapes, integers
// of more than 4,300 digits, and nesting past max_depth.
class JsonParser {
 public:
  JsonParser(const std::string& text, std::string what, int max_depth)
      : s_(text), what_(std::move(what)), max_depth_(max_depth) {}

  Json parse() {
    if (!valid_utf8(s_)) fail(what_ + " is not valid UTF-8");
    skip_space();
    Json value = parse_value(0);
    skip_space();
    if (pos_ != s_.size()) error("extra data");
    return value;
  }

 private:
  [[noreturn]] void error(const std::string& why) const {
    fail(what_ + " is not valid JSON: " + why + " at byte " + std::to_string(pos_));
  }
  bool at_end() const { return pos_ >= s_.size(); }
  char peek() const { return at_end() ? '\0' : s_[pos_]; }
  void skip_space() {
    while (!at_end() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r'))
      ++pos_;
  }
  void expect(char c) {
    if (peek() != c || at_end()) error(std::string("expected '") + c + "'");
    ++pos_;
  }

  Json parse_value(int depth) {
    if (at_end()) error("expected a value");
    if (++values_ > kMaxJsonValues) error("more than 1000000 values");
    const char c = s_[pos_];
    if (c == '{') return parse_object(depth + 1);
    if (c == '[') return parse_array(depth + 1);
    if (c == '"') {
      Json v;
      v.kind = Kind::String;
      v.text = parse_string();
      return v;
    }
    if (c == '-' || (c >= '0' && c <= '9')) return parse_number();
    Json v;
    if (literal("true")) {
      v.kind = Kind::Bool, v.boolean = true;
    } else if (literal("false")) {
      v.kind = Kind::Bool;
    } else if (literal("null")) {
      v.kind = Kind::Null;
    } else if (c == 'N' || c == 'I') {
      fail(what_ + ": NaN and Infinity are not allowed");
    } else {
      error("expected a value");
    }
    return v;
  }

  bool literal(const char* word) {
    const size_t n = std::strlen(word);
    if (s_.compare(pos_, n, word) != 0) return false;
    pos_ += n;
    return true;
  }

  Json parse_object(int depth) {
    if (depth > max_depth_) error("nested too deeply");
    ++pos_;
    Json v;
    v.kind = Kind::Object;
    std::set<std::string> seen;
    skip_space();
    if (peek() == '}' && !at_end()) {
      ++pos_;
      return v;
    }
    for (;;) {
      skip_space();
      if (peek() != '"' || at_end()) error("expected a key");
      std::string key = parse_string();
      if (!seen.insert(key).second) fail(what_ + ": duplicate key " + show(key));
      skip_space();
      expect(':');
      skip_space();
      v.members.emplace_back(std::move(key), parse_value(depth));
      skip_space();
      if (peek() == ',' && !at_end()) {
        ++pos_;
        continue;
      }
      expect('}');
      return v;
    }
  }

  Json parse_array(int depth) {
    if (depth > max_depth_) error("nested too deeply");
    ++pos_;
    Json v;
    v.kind = Kind::Array;
    skip_space();
    if (peek() == ']' && !at_end()) {
      ++pos_;
      return v;
    }
    for (;;) {
      skip_space();
      v.items.push_back(parse_value(depth));
      skip_space();
      if (peek() == ',' && !at_end()) {
        ++pos_;
        continue;
      }
      expect(']');
      return v;
    }
  }

  uint32_t hex4() {
    if (pos_ + 4 > s_.size()) error("truncated \\u escape");
    uint32_t cp = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = s_[pos_++];
      cp <<= 4;
      if (c >= '0' && c <= '9') cp |= c - '0';
      else if (c >= 'a' && c <= 'f') cp |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') cp |= c - 'A' + 10;
      else error("invalid \\u escape");
    }
    return cp;
  }

  std::string parse_string() {
    ++pos_;  // the opening quote
    std::string out;
    for (;;) {
      if (at_end()) error("unterminated string");
      const char c = s_[pos_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) error("control character in a string");
      if (c != '\\') {
        out += c;  // part of a UTF-8 sequence already checked as a whole
        continue;
      }
      if (at_end()) error("unterminated string");
      const char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': append_utf8(out, escaped_code_point()); break;
        default: error("invalid escape");
      }
    }
  }

  // A \u escape; a surrogate must be a high one followed by an escaped low one, since a lone
  // surrogate is no character UTF-8 can encode.
  uint32_t escaped_code_point() {
    const uint32_t cp = hex4();
    if (cp >= 0xdc00 && cp <= 0xdfff) fail(what_ + ": lone surrogate in a string");
    if (cp < 0xd800 || cp > 0xdbff) return cp;
    if (s_.compare(pos_, 2, "\\u") != 0) fail(what_ + ": lone surrogate in a string");
    pos_ += 2;
    const uint32_t low = hex4();
    if (low < 0xdc00 || low > 0xdfff) fail(what_ + ": lone surrogate in a string");
    return 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
  }

  Json parse_number() {
    const size_t start = pos_;
    const auto digits = [&] {
      const size_t from = pos_;
      while (!at_end() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
      return pos_ - from;
    };
    if (peek() == '-') ++pos_;
    if (peek() == '0' && !at_end()) {
      ++pos_;
    } else if (digits() == 0) {
      error("invalid number");
    }
    bool is_float = false;
    if (peek() == '.' && pos_ + 1 < s_.size() && s_[pos_ + 1] >= '0' && s_[pos_ + 1] <= '9') {
      ++pos_, digits(), is_float = true;
    }
    if ((peek() == 'e' || peek() == 'E') && !at_end()) {
      size_t k = pos_ + 1;
      if (k < s_.size() && (s_[k] == '+' || s_[k] == '-')) ++k;
      if (k < s_.size() && s_[k] >= '0' && s_[k] <= '9') {
        pos_ = k, digits(), is_float = true;
      }
    }
    Json v;
    v.text = s_.substr(start, pos_ - start);
    if (is_float) {
      v.kind = Kind::Float;
      v.number = parse_double(v.text);
      if (!std::isfinite(v.number)) fail(what_ + ": number " + show(v.text) + " is out of range");
      return v;
    }
    v.kind = Kind::Int;
    const bool negative = v.text[0] == '-';
    const std::string magnitude = v.text.substr(negative ? 1 : 0);
    if (magnitude.size() > kMaxIntDigits)
      fail(what_ + ": integer of " + std::to_string(magnitude.size()) + " digits");
    // Same-length digit strings compare as numbers.
    const char* limit = negative ? "9223372036854775808" : "9223372036854775807";
    v.fits = magnitude.size() < 19 || (magnitude.size() == 19 && magnitude <= limit);
    if (v.fits) {
      v.integer = magnitude == "9223372036854775808" ? std::numeric_limits<int64_t>::min() : std::stoll(v.text);
      v.number = static_cast<double>(v.integer);
    } else {
      v.number = parse_double(v.text);  // float(int): +-inf where Python's overflows
    }
    return v;
  }

  const std::string& s_;
  std::string what_;
  int max_depth_;
  size_t pos_ = 0;
  size_t values_ = 0;
};

// JSON text of a parsed value as Python's json.dumps writes it: what the value was read as.
std::string write_json(const Json& v) {
  switch (v.kind) {
    case Kind::Null: return "null";
    case Kind::Bool: return v.boolean ? "true" : "false";
    case Kind::Int: return v.fits ? std::to_string(v.integer) : v.text;
    case Kind::Float: return py_float(v.number);
    case Kind::String: return py_string(v.text);
    case Kind::Array: {
      std::string out = "[";
      for (size_t i = 0; i < v.items.size(); ++i) out += (i ? ", " : "") + write_json(v.items[i]);
      return out + "]";
    }
    case Kind::Object: {
      std::string out = "{";
      for (size_t i = 0; i < v.members.size(); ++i)
        out += (i ? ", " : "") + py_string(v.members[i].first) + ": " + write_json(v.members[i].second);
      return out + "}";
    }
  }
  return "null";
}

Json parse_json(const std::string& text, const std::string& what, int depth = kHeaderDepth) {
  return JsonParser(text, what, depth).parse();
}

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
  std::unique_ptr<ZSTD_DCtx, size_t (*)(ZSTD_DCtx*)> dctx(ZSTD_createDCtx(), ZSTD_freeDCtx);
  if (!dctx) throw std::runtime_error("zstd: cannot create a decompression context");
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

// ---- safetensors inside a frame -------------------------------------------------------------

// Element sizes of the dtypes that numpy (and so the reference) can load from safetensors.
size_t numpy_dtype_size(const std::string& dtype) {
  static const std::map<std::string, size_t> sizes = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"I64", 8}, {"U64", 8}, {"I32", 4}, {"U32", 4},
      {"I16", 2}, {"U16", 2}, {"I8", 1},  {"U8", 1},  {"BOOL", 1}, {"C64", 8}};
  const auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

struct Frame {
  std::map<std::string, std::string> metadata;
  std::string header_text;  // metadata["header"]
  Json header;              // parsed, an object
  RawTensors tensors;
};

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

// a * b into *out, false when that overflows 64 bits (no __int128: 32-bit ARM lacks it).
bool multiply(uint64_t a, uint64_t b, uint64_t* out) {
  if (a != 0 && b > std::numeric_limits<uint64_t>::max() / a) return false;
  *out = a * b;
  return true;
}

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

// ---- tensor bytes ---------------------------------------------------------------------------

uint32_t load_u32(const std::string& b, size_t i) {
  return uint32_t(uint8_t(b[i])) | uint32_t(uint8_t(b[i + 1])) << 8 | uint32_t(uint8_t(b[i + 2])) << 16 |
         uint32_t(uint8_t(b[i + 3])) << 24;
}

void store_u32(std::string& b, uint32_t v) {
  for (int k = 0; k < 4; ++k) b += static_cast<char>((v >> (8 * k)) & 0xff);
}

float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// IEEE binary16 to binary32: exact.
float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  const uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000 | (mantissa << 13));
  if (exponent != 0) return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
  const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // subnormal or zero
  return sign ? -magnitude : magnitude;
}

// binary32 to binary16 with round-to-nearest-even, as numpy's astype(float16).
uint16_t float_to_half(float f) {
  const uint32_t x = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  const uint32_t a = x & 0x7fffffff;
  if (a >= 0x7f800000) return sign | 0x7c00 | (a > 0x7f800000 ? 0x200 : 0);
  if (a >= 0x477ff000) return sign | 0x7c00;  // 65520 and up round to infinity
  const int exponent = static_cast<int>(a >> 23) - 127;
  if (exponent >= -14) {  // a normal half
    uint32_t h = (uint32_t(exponent + 15) << 10) | ((a & 0x7fffff) >> 13);
    const uint32_t rest = a & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;  // a carry into the exponent is right
    return sign | static_cast<uint16_t>(h);
  }
  if (exponent < -25) return sign;  // below half the smallest subnormal
  const uint32_t m = (a & 0x7fffff) | 0x800000;
  const int shift = -exponent - 1;  // units of 2^-24
  uint32_t h = m >> shift;
  const uint32_t rest = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
  if (rest > halfway || (rest == halfway && (h & 1))) ++h;
  return sign | static_cast<uint16_t>(h);
}

uint64_t element_count(const std::vector<int64_t>& shape) {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

// L of PROTOCOL.md section 6.1: entries per output row, at least 1.
uint64_t row_length_of(const std::vector<int64_t>& shape) {
  uint64_t n = 1;
  for (size_t d = 1; d < shape.size(); ++d) n *= static_cast<uint64_t>(shape[d]);
  return std::max<uint64_t>(1, n);
}

// A tensor's values as float32, from any of the wire's value dtypes.
std::vector<float> to_floats(const RawTensor& t) {
  std::vector<float> out;
  if (t.dtype == "F32") {
    out.resize(t.bytes.size() / 4);
    for (size_t i = 0; i < out.size(); ++i) out[i] = bits_to_float(load_u32(t.bytes, 4 * i));
  } else if (t.dtype == "F16") {
    out.resize(t.bytes.size() / 2);
    for (size_t i = 0; i < out.size(); ++i)
      out[i] = half_to_float(static_cast<uint16_t>(uint8_t(t.bytes[2 * i]) | uint8_t(t.bytes[2 * i + 1]) << 8));
  } else if (t.dtype == "I8") {
    out.resize(t.bytes.size());
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(static_cast<int8_t>(t.bytes[i]));
  } else {
    throw std::logic_error("to_floats: unexpected dtype " + t.dtype);
  }
  return out;
}

std::vector<int32_t> to_int32(const RawTensor& t) {
  std::vector<int32_t> out(t.bytes.size() / 4);
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<int32_t>(load_u32(t.bytes, 4 * i));
  return out;
}

RawTensor f32_tensor(const std::vector<int64_t>& shape, const std::vector<float>& values) {
  RawTensor t{"F32", shape, {}};
  t.bytes.reserve(values.size() * 4);
  for (float v : values) store_u32(t.bytes, float_to_bits(v));
  return t;
}

// A dense float32 tensor of a global or residual (always F32 on the wire).
Tensor dense_f32(const std::string& name, const RawTensor& t) {
  if (t.dtype != "F32") fail("tensor " + show(name) + " has dtype " + t.dtype + ", expected F32");
  return Tensor{t.shape, to_floats(t)};
}

// ---- int8 scales (PROTOCOL.md section 6.3) --------------------------------------------------

// max|x| / 127 rounded up to 17 significant bits, in float64 as protocol/quant.py.
double round_up_scale(double exact) {
  int exponent = 0;
  std::frexp(exact, &exponent);
  const double quantum = std::ldexp(1.0, std::max(exponent - kScaleBits, kTiniestFloatExponent));
  return std::ceil(exact / quantum) * quantum;
}

// The largest 17-bit scale whose 127 * scale stays finite in float32.
double largest_scale() {
  const double exact = static_cast<double>(std::numeric_limits<float>::max()) / kInt8Levels;
  int exponent = 0;
  std::frexp(exact, &exponent);
  const double quantum = std::ldexp(1.0, exponent - kScaleBits);
  return std::floor(exact / quantum) * quantum;
}

float scale_for(float max_abs) {
  static const double cap = largest_scale();
  return static_cast<float>(std::min(round_up_scale(static_cast<double>(max_abs) / kInt8Levels), cap));
}

// round_half_even(x / scale) in float64, clipped to [-127, 127]; a zero scale gives 0.
int8_t quantize(float x, float scale) {
  const double safe = scale > 0 ? static_cast<double>(scale) : 1.0;
  const double q = std::nearbyint(static_cast<double>(x) / safe);
  return static_cast<int8_t>(std::clamp(q, -127.0, 127.0));
}

// ---- encoding (protocol/quant.py encode_tensors) -------------------------------------------

struct Encoder {
  std::string encoding;
  std::optional<double> topk;

  void check_input(const std::string& name, const Tensor& x) const {
    if (name.find('#') != std::string::npos)
      refuse("tensor name " + show(name) + " must not contain '#' (reserved for wire roles)");
    if (element_count(x.shape) != x.data.size())
      refuse("tensor " + show(name) + " has " + std::to_string(x.data.size()) + " values for its shape");
    if (encoding == "fp32" && !topk) return;  // NaN passes: the receiver names the tensor
    for (float v : x.data)
      if (!std::isfinite(v))
        refuse("tensor " + show(name) + " holds NaN or Inf, which " + encoding + " cannot carry");
  }

  static void check_fp16_range(const std::string& name, const std::vector<float>& values) {
    for (float v : values)
      if (std::fabs(v) > kFp16Max) refuse("tensor " + show(name) + " is beyond float16's range (65504)");
  }

  static RawTensor f16_tensor(const std::vector<int64_t>& shape, const std::vector<float>& values) {
    RawTensor t{"F16", shape, {}};
    for (float v : values) {
      const uint16_t h = float_to_half(v);
      t.bytes += static_cast<char>(h & 0xff);
      t.bytes += static_cast<char>(h >> 8);
    }
    return t;
  }

  // q of every value against the scale of its row (rows[i] indexes scales).
  static RawTensor i8_tensor(const std::vector<int64_t>& shape, const std::vector<float>& values,
                             const std::vector<float>& scales, const std::vector<uint64_t>& rows) {
    RawTensor t{"I8", shape, std::string(values.size(), '\0')};
    for (size_t i = 0; i < values.size(); ++i)
      t.bytes[i] = static_cast<char>(quantize(values[i], scales[rows[i]]));
    return t;
  }

  // Per-row maxima of |values| (float32) and their scales.
  static std::vector<float> row_scales(const std::vector<float>& values, const std::vector<uint64_t>& rows,
                                       size_t n_rows) {
    std::vector<float> peak(n_rows, 0.0f);
    for (size_t i = 0; i < values.size(); ++i) peak[rows[i]] = std::max(peak[rows[i]], std::fabs(values[i]));
    std::vector<float> scales(n_rows);
    for (size_t r = 0; r < n_rows; ++r) scales[r] = scale_for(peak[r]);
    return scales;
  }

  // The int8 value tensor and its scale: per tensor, or per output row (int8-channel, >= 2-D),
  // over the given values only (for top-k, the kept ones at flat positions `where`).
  void add_int8(RawTensors& wire, const std::string& name, const std::vector<int64_t>& shape,
                const std::vector<int64_t>& value_shape, const std::vector<float>& values,
                const std::vector<uint64_t>& where) const {
    const bool per_row = encoding == "int8-channel" && shape.size() >= 2;
    const size_t n_rows = per_row ? static_cast<size_t>(shape[0]) : 1;
    const uint64_t row_length = row_length_of(shape);
    std::vector<uint64_t> rows(values.size(), 0);
    if (per_row)
      for (size_t i = 0; i < values.size(); ++i) rows[i] = where[i] / row_length;
    const std::vector<float> scales = row_scales(values, rows, n_rows);
    wire[name + (topk ? kValues : "")] = i8_tensor(value_shape, values, scales, rows);
    wire[name + kScale] = f32_tensor({static_cast<int64_t>(n_rows)}, scales);
  }

  void add_dense(RawTensors& wire, const std::string& name, const Tensor& x) const {
    if (encoding == "fp32") {
      wire[name] = f32_tensor(x.shape, x.data);
    } else if (encoding == "fp16") {
      check_fp16_range(name, x.data);
      wire[name] = f16_tensor(x.shape, x.data);
    } else {
      std::vector<uint64_t> where(x.data.size());
      for (size_t i = 0; i < where.size(); ++i) where[i] = i;
      add_int8(wire, name, x.shape, x.shape, x.data, where);
    }
  }

  // The k largest |x| (ties: the lower flat index), in increasing index order.
  static std::vector<uint64_t> top_indices(const std::vector<float>& flat, double fraction) {
    const uint64_t n = flat.size();
    if (n == 0) return {};
    const auto wanted = static_cast<uint64_t>(std::ceil(fraction * static_cast<double>(n)));
    const uint64_t k = std::min<uint64_t>(n, std::max<uint64_t>(1, wanted));
    std::vector<uint64_t> order(n);
    for (uint64_t i = 0; i < n; ++i) order[i] = i;
    const auto before = [&](uint64_t a, uint64_t b) {
      const float fa = std::fabs(flat[a]), fb = std::fabs(flat[b]);
      return fa != fb ? fa > fb : a < b;
    };
    std::nth_element(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(k - 1), order.end(), before);
    order.resize(k);
    std::sort(order.begin(), order.end());
    return order;
  }

  void add_sparse(RawTensors& wire, const std::string& name, const Tensor& x) const {
    if (x.data.size() > static_cast<size_t>(kMaxInt32))
      refuse("a tensor of " + std::to_string(x.data.size()) + " entries cannot be indexed with int32");
    const std::vector<uint64_t> kept = top_indices(x.data, *topk);
    RawTensor indices{"I32", {static_cast<int64_t>(kept.size())}, {}};
    std::vector<float> values;
    for (uint64_t i : kept) {
      store_u32(indices.bytes, static_cast<uint32_t>(i));
      values.push_back(x.data[i]);
    }
    wire[name + kIndices] = std::move(indices);
    const std::vector<int64_t> value_shape{static_cast<int64_t>(kept.size())};
    if (encoding == "fp32") {
      wire[name + kValues] = f32_tensor(value_shape, values);
    } else if (encoding == "fp16") {
      check_fp16_range(name, values);
      wire[name + kValues] = f16_tensor(value_shape, values);
    } else {
      add_int8(wire, name, x.shape, value_shape, values, kept);
    }
  }

  RawTensors encode(const TensorMap& tensors) const {
    RawTensors wire;
    for (const auto& [name, x] : tensors) {
      check_input(name, x);
      if (topk) {
        add_sparse(wire, name, x);
      } else {
        add_dense(wire, name, x);
      }
    }
    return wire;
  }
};

// ---- decoding (protocol/quant.py decode_tensors) -------------------------------------------

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + (shape.size() == 1 ? ",)" : ")");
}

struct Decoder {
  const RawTensors& wire;
  std::string encoding;
  bool sparse;

  std::string value_dtype() const {
    if (encoding == "fp32") return "F32";
    if (encoding == "fp16") return "F16";
    return "I8";
  }

  const RawTensor& expect(const std::string& name, const std::string& dtype) const {
    const RawTensor& t = wire.at(name);
    if (t.dtype != dtype) fail("wire tensor " + show(name) + " has dtype " + t.dtype + ", expected " + dtype);
    return t;
  }

  // Exactly the tensors the encoding names, no more, no fewer.
  void check_names(const std::vector<std::string>& names) const {
    std::set<std::string> expected;
    for (const auto& name : names) {
      if (name.find('#') != std::string::npos) fail("tensor name " + show(name) + " must not contain '#'");
      if (sparse) {
        expected.insert(name + kIndices), expected.insert(name + kValues);
      } else {
        expected.insert(name);
      }
      if (encoding != "fp32" && encoding != "fp16") expected.insert(name + kScale);
    }
    for (const auto& name : expected)
      if (!wire.count(name)) fail("wire tensors do not fit encoding '" + encoding + "': missing " + show(name));
    for (const auto& [name, t] : wire)
      if (!expected.count(name))
        fail("wire tensors do not fit encoding '" + encoding + "': unexpected " + show(name));
  }

  std::vector<float> scales(const std::string& name, const std::vector<int64_t>& shape) const {
    const RawTensor& t = expect(name + kScale, "F32");
    const std::vector<int64_t> want{encoding == "int8-channel" && shape.size() >= 2 ? shape[0] : 1};
    if (t.shape != want)
      fail("wire tensor " + show(name + kScale) + " has shape " + shape_text(t.shape) + ", expected " +
           shape_text(want));
    std::vector<float> s = to_floats(t);
    for (float v : s)
      if (!std::isfinite(v) || v < 0)
        fail("wire tensor " + show(name + kScale) + " must be finite and non-negative");
    return s;
  }

  Tensor dense(const std::string& name) const {
    const RawTensor& t = expect(name, value_dtype());
    Tensor out{t.shape, to_floats(t)};
    if (encoding == "fp32" || encoding == "fp16") return out;
    const std::vector<float> s = scales(name, t.shape);
    if (out.data.empty()) return out;
    const size_t row_length = out.data.size() / s.size();
    for (size_t i = 0; i < out.data.size(); ++i) out.data[i] *= s[s.size() == 1 ? 0 : i / row_length];
    return out;
  }

  Tensor sparse_tensor(const std::string& name, const std::vector<int64_t>& shape) const {
    const RawTensor& idx = expect(name + kIndices, "I32");
    const RawTensor& val = expect(name + kValues, value_dtype());
    if (idx.shape.size() != 1 || val.shape != idx.shape)
      fail("tensor " + show(name) + ": indices " + shape_text(idx.shape) + " and values " +
           shape_text(val.shape) + " must be 1-D of the same length");
    const std::vector<int32_t> indices = to_int32(idx);
    const uint64_t size = element_count(shape);
    if (!indices.empty() && (indices.front() < 0 || static_cast<uint64_t>(indices.back()) >= size))
      fail("tensor " + show(name) + ": indices out of range for shape " + shape_text(shape));
    for (size_t i = 1; i < indices.size(); ++i)
      if (indices[i] <= indices[i - 1]) fail("tensor " + show(name) + ": indices must be strictly increasing");
    std::vector<float> values = to_floats(val);
    if (encoding != "fp32" && encoding != "fp16") {
      const std::vector<float> s = scales(name, shape);
      const uint64_t row_length = row_length_of(shape);
      for (size_t i = 0; i < values.size(); ++i)
        values[i] *= s[s.size() == 1 ? 0 : static_cast<uint64_t>(indices[i]) / row_length];
    }
    Tensor out{shape, std::vector<float>(size, 0.0f)};
    for (size_t i = 0; i < indices.size(); ++i) out.data[static_cast<size_t>(indices[i])] = values[i];
    return out;
  }

  TensorMap decode(const std::optional<std::map<std::string, std::vector<int64_t>>>& shapes) const {
    std::vector<std::string> names;
    // Entries, saturated far above the limit: declared shapes can multiply past 64 bits.
    constexpr uint64_t kHuge = uint64_t(1) << 62;
    uint64_t total = 0;
    if (shapes) {
      for (const auto& [name, shape] : *shapes) {
        names.push_back(name);
        uint64_t n = 1;
        for (int64_t d : shape)
          if (!multiply(n, static_cast<uint64_t>(d), &n) || n > kHuge) n = kHuge;
        total = std::min(total + n, kHuge);
      }
    } else {
      for (const auto& [name, t] : wire) {
        if (name.find('#') != std::string::npos) continue;
        names.push_back(name);
        total = std::min(total + element_count(t.shape), kHuge);
      }
    }
    check_names(names);
    if (total > kMaxDenseBytes / 4) fail("decoded tensors would take more than 67108864 bytes");
    TensorMap out;
    for (const auto& name : names) out[name] = shapes ? sparse_tensor(name, shapes->at(name)) : dense(name);
    return out;
  }
};

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

// Used by the C API (capi_codec.cpp) to describe a frame before decoding it by its kind: the
// header is written back from what the parser read, so a test can compare it with Python's.
namespace detail {
std::pair<std::string, std::string> frame_kind_and_header(const std::string& payload) {
  const Frame frame = unpack_frame(payload);
  return {frame.metadata.at("kind"), write_json(frame.header)};
}
}  // namespace detail

}  // namespace edgefl
