// Strict JSON of PROTOCOL.md section 3.1, UTF-8 checks and numbers/strings as Python writes them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace edgefl::detail {

// Deeper than this, a header or status breaks a field rule anyway; the bound keeps the
// recursive parser's stack small.
constexpr int kHeaderDepth = 256;

// A payload breaking a rule (DecodeError); a bad argument to an encoder (std::invalid_argument).
[[noreturn]] void fail(const std::string& message);
[[noreturn]] void refuse(const std::string& message);

// A short, ASCII, one-line rendering of a value for error messages.
std::string show(const std::string& value);

// Length of the well-formed UTF-8 sequence at s[i] (as Python's decoder), or 0; code point to *cp.
size_t utf8_sequence(const std::string& s, size_t i, uint32_t* cp);
bool valid_utf8(const std::string& s);

std::string py_float(double x);               // repr(float) of Python (NaN, Infinity as json)
std::string py_string(const std::string& utf8);  // a JSON string as Python's json.dumps writes it

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

// The strict JSON of `text` (DecodeError naming `what` and the broken rule), nesting <= depth.
Json parse_json(const std::string& text, const std::string& what, int depth = kHeaderDepth);
// JSON text of a parsed value as Python's json.dumps writes it: what the value was read as.
std::string write_json(const Json& v);

}  // namespace edgefl::detail
