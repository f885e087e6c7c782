// The safetensors container (https://github.com/huggingface/safetensors), raw tensors only.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace edgefl {

struct RawTensor {
  std::string dtype;  // "F32", "F16", "I8", "I32", "I64", ...
  std::vector<int64_t> shape;
  std::string bytes;  // little-endian, row-major
};
using RawTensors = std::map<std::string, RawTensor>;

size_t dtype_size(const std::string& dtype);  // 0 for an unknown dtype

// Parses a whole safetensors file held in memory; metadata gets __metadata__ (string values).
// Throws std::runtime_error naming the broken rule (sizes, offsets, overlap, JSON).
RawTensors parse_safetensors(const std::string& file,
                             std::map<std::string, std::string>* metadata = nullptr);
// Writes tensors in name order with contiguous offsets.
std::string serialize_safetensors(const RawTensors& tensors,
                                  const std::map<std::string, std::string>& metadata = {});

std::string read_file(const std::string& path);                          // throws
void write_file_atomic(const std::string& path, const std::string& data);  // tmp + rename

}  // namespace edgefl
