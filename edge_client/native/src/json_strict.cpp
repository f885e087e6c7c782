// Strict JSON (PROTOCOL.md section 3.1): UTF-8, Python's numbers and strings, parser, writer.
#include "json_strict.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <set>
#include <stdexcept>

#include "codec.hpp"

namespace edgefl::detail {

namespace {

// Python refuses to turn more decimal digits than this into an int (sys.int_info), so the
// reference rejects such a JSON integer anywhere in a message.
constexpr size_t kMaxIntDigits = 4300;
// Values in one JSON document: far above any real message (a global of 10^5 tensors), and it
// bounds the parser's memory (about 100 bytes a value) where the reference has no bound.
constexpr size_t kMaxJsonValues = 1000000;

}  // namespace

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

namespace {

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

}  // namespace

// ---- numbers as text -----------------------------------------------------------------------

namespace {

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

}  // namespace

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

namespace {

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

}  // namespace

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

Json parse_json(const std::string& text, const std::string& what, int depth) {
  return JsonParser(text, what, depth).parse();
}

}  // namespace edgefl::detail
