// Tensor bytes, int8 scales and the update encodings: protocol/quant.py encode/decode_tensors.
#include "quant.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>
#include <stdexcept>

#include "frame.hpp"
#include "json_strict.hpp"

namespace edgefl::detail {

namespace {

// Limit of PROTOCOL.md section 8: decoded tensors take no more than a frame decompresses to.
constexpr uint64_t kMaxDenseBytes = kMaxDecompressedBytes;
const std::string kScale = "#scale", kIndices = "#indices", kValues = "#values";
constexpr int kInt8Levels = 127;
constexpr int kScaleBits = 17;
constexpr int kTiniestFloatExponent = -149;
constexpr float kFp16Max = 65504.0f;

}  // namespace

// ---- tensor bytes ---------------------------------------------------------------------------

namespace {

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

}  // namespace

uint64_t element_count(const std::vector<int64_t>& shape) {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

namespace {

// L of PROTOCOL.md section 6.1: entries per output row, at least 1.
uint64_t row_length_of(const std::vector<int64_t>& shape) {
  uint64_t n = 1;
  for (size_t d = 1; d < shape.size(); ++d) n *= static_cast<uint64_t>(shape[d]);
  return std::max<uint64_t>(1, n);
}

}  // namespace

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

namespace {

std::vector<int32_t> to_int32(const RawTensor& t) {
  std::vector<int32_t> out(t.bytes.size() / 4);
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<int32_t>(load_u32(t.bytes, 4 * i));
  return out;
}

}  // namespace

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

namespace {

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

}  // namespace

// ---- encoding (protocol/quant.py encode_tensors) -------------------------------------------

void Encoder::check_input(const std::string& name, const Tensor& x) const {
  if (name.find('#') != std::string::npos)
    refuse("tensor name " + show(name) + " must not contain '#' (reserved for wire roles)");
  if (element_count(x.shape) != x.data.size())
    refuse("tensor " + show(name) + " has " + std::to_string(x.data.size()) + " values for its shape");
  if (encoding == "fp32" && !topk) return;  // NaN passes: the receiver names the tensor
  for (float v : x.data)
    if (!std::isfinite(v))
      refuse("tensor " + show(name) + " holds NaN or Inf, which " + encoding + " cannot carry");
}

void Encoder::check_fp16_range(const std::string& name, const std::vector<float>& values) {
  for (float v : values)
    if (std::fabs(v) > kFp16Max) refuse("tensor " + show(name) + " is beyond float16's range (65504)");
}

RawTensor Encoder::f16_tensor(const std::vector<int64_t>& shape, const std::vector<float>& values) {
  RawTensor t{"F16", shape, {}};
  for (float v : values) {
    const uint16_t h = float_to_half(v);
    t.bytes += static_cast<char>(h & 0xff);
    t.bytes += static_cast<char>(h >> 8);
  }
  return t;
}

// q of every value against the scale of its row (rows[i] indexes scales).
RawTensor Encoder::i8_tensor(const std::vector<int64_t>& shape, const std::vector<float>& values,
                             const std::vector<float>& scales, const std::vector<uint64_t>& rows) {
  RawTensor t{"I8", shape, std::string(values.size(), '\0')};
  for (size_t i = 0; i < values.size(); ++i)
    t.bytes[i] = static_cast<char>(quantize(values[i], scales[rows[i]]));
  return t;
}

// Per-row maxima of |values| (float32) and their scales.
std::vector<float> Encoder::row_scales(const std::vector<float>& values, const std::vector<uint64_t>& rows,
                                       size_t n_rows) {
  std::vector<float> peak(n_rows, 0.0f);
  for (size_t i = 0; i < values.size(); ++i) peak[rows[i]] = std::max(peak[rows[i]], std::fabs(values[i]));
  std::vector<float> scales(n_rows);
  for (size_t r = 0; r < n_rows; ++r) scales[r] = scale_for(peak[r]);
  return scales;
}

// The int8 value tensor and its scale: per tensor, or per output row (int8-channel, >= 2-D),
// over the given values only (for top-k, the kept ones at flat positions `where`).
void Encoder::add_int8(RawTensors& wire, const std::string& name, const std::vector<int64_t>& shape,
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

void Encoder::add_dense(RawTensors& wire, const std::string& name, const Tensor& x) const {
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
std::vector<uint64_t> Encoder::top_indices(const std::vector<float>& flat, double fraction) {
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

void Encoder::add_sparse(RawTensors& wire, const std::string& name, const Tensor& x) const {
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

RawTensors Encoder::encode(const TensorMap& tensors) const {
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

// ---- decoding (protocol/quant.py decode_tensors) -------------------------------------------

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + (shape.size() == 1 ? ",)" : ")");
}

std::string Decoder::value_dtype() const {
  if (encoding == "fp32") return "F32";
  if (encoding == "fp16") return "F16";
  return "I8";
}

const RawTensor& Decoder::expect(const std::string& name, const std::string& dtype) const {
  const RawTensor& t = wire.at(name);
  if (t.dtype != dtype) fail("wire tensor " + show(name) + " has dtype " + t.dtype + ", expected " + dtype);
  return t;
}

// Exactly the tensors the encoding names, no more, no fewer.
void Decoder::check_names(const std::vector<std::string>& names) const {
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

std::vector<float> Decoder::scales(const std::string& name, const std::vector<int64_t>& shape) const {
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

Tensor Decoder::dense(const std::string& name) const {
  const RawTensor& t = expect(name, value_dtype());
  Tensor out{t.shape, to_floats(t)};
  if (encoding == "fp32" || encoding == "fp16") return out;
  const std::vector<float> s = scales(name, t.shape);
  if (out.data.empty()) return out;
  const size_t row_length = out.data.size() / s.size();
  for (size_t i = 0; i < out.data.size(); ++i) out.data[i] *= s[s.size() == 1 ? 0 : i / row_length];
  return out;
}

Tensor Decoder::sparse_tensor(const std::string& name, const std::vector<int64_t>& shape) const {
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

TensorMap Decoder::decode(const std::optional<std::map<std::string, std::vector<int64_t>>>& shapes) const {
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

}  // namespace edgefl::detail
