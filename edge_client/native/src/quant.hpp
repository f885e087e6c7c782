// The update encodings of PROTOCOL.md section 6 (fp32, fp16, int8, int8-channel, top-k), and tensor bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "codec.hpp"
#include "safetensors.hpp"

namespace edgefl::detail {

// Limit of PROTOCOL.md section 8 and protocol/messages.py: int32 header fields and top-k indices.
constexpr int64_t kMaxInt32 = 2147483647;

uint64_t element_count(const std::vector<int64_t>& shape);
// A tensor's values as float32, from any of the wire's value dtypes.
std::vector<float> to_floats(const RawTensor& t);
RawTensor f32_tensor(const std::vector<int64_t>& shape, const std::vector<float>& values);
// A dense float32 tensor of a global or residual (always F32 on the wire).
Tensor dense_f32(const std::string& name, const RawTensor& t);
std::string shape_text(const std::vector<int64_t>& shape);  // as Python prints a shape tuple

// protocol/quant.py encode_tensors: an update's tensors as the wire tensors of an encoding.
struct Encoder {
  std::string encoding;
  std::optional<double> topk;

  RawTensors encode(const TensorMap& tensors) const;

 private:
  void check_input(const std::string& name, const Tensor& x) const;
  static void check_fp16_range(const std::string& name, const std::vector<float>& values);
  static RawTensor f16_tensor(const std::vector<int64_t>& shape, const std::vector<float>& values);
  static RawTensor i8_tensor(const std::vector<int64_t>& shape, const std::vector<float>& values,
                             const std::vector<float>& scales, const std::vector<uint64_t>& rows);
  static std::vector<float> row_scales(const std::vector<float>& values, const std::vector<uint64_t>& rows,
                                       size_t n_rows);
  void add_int8(RawTensors& wire, const std::string& name, const std::vector<int64_t>& shape,
                const std::vector<int64_t>& value_shape, const std::vector<float>& values,
                const std::vector<uint64_t>& where) const;
  void add_dense(RawTensors& wire, const std::string& name, const Tensor& x) const;
  static std::vector<uint64_t> top_indices(const std::vector<float>& flat, double fraction);
  void add_sparse(RawTensors& wire, const std::string& name, const Tensor& x) const;
};

// protocol/quant.py decode_tensors: the wire tensors of an encoding as dense float32 tensors;
// shapes (from the header) for top-k, std::nullopt for dense.
struct Decoder {
  const RawTensors& wire;
  std::string encoding;
  bool sparse;

  TensorMap decode(const std::optional<std::map<std::string, std::vector<int64_t>>>& shapes) const;

 private:
  std::string value_dtype() const;
  const RawTensor& expect(const std::string& name, const std::string& dtype) const;
  void check_names(const std::vector<std::string>& names) const;
  std::vector<float> scales(const std::string& name, const std::vector<int64_t>& shape) const;
  Tensor dense(const std::string& name) const;
  Tensor sparse_tensor(const std::string& name, const std::vector<int64_t>& shape) const;
};

}  // namespace edgefl::detail
