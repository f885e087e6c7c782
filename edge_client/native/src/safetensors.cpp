// The safetensors container: u64 LE header size | JSON header | byte buffer.
#include "safetensors.hpp"

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <algorithm>
#include <stdexcept>

namespace edgefl {

namespace {
// A header larger than this is not a file we wrote or would accept (safetensors caps 100 MB).
constexpr uint64_t kMaxHeaderBytes = 100u << 20;

uint64_t read_u64_le(const std::string& s) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(s[i]);
  return v;
}
}  // namespace

size_t dtype_size(const std::string& dtype) {
  if (dtype == "F64" || dtype == "I64" || dtype == "U64") return 8;
  if (dtype == "F32" || dtype == "I32" || dtype == "U32") return 4;
  if (dtype == "F16" || dtype == "BF16" || dtype == "I16" || dtype == "U16") return 2;
  if (dtype == "I8" || dtype == "U8" || dtype == "BOOL") return 1;
  return 0;
}

RawTensors parse_safetensors(const std::string& file, std::map<std::string, std::string>* metadata) {
  if (file.size() < 8) throw std::runtime_error("safetensors: shorter than its 8-byte header size");
  const uint64_t n = read_u64_le(file);
  if (n > kMaxHeaderBytes || n > file.size() - 8)
    throw std::runtime_error("safetensors: header size runs past the end of the file");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(file.begin() + 8, file.begin() + 8 + static_cast<long>(n));
  } catch (const nlohmann::json::exception&) {
    throw std::runtime_error("safetensors: header is not valid JSON");
  }
  if (!header.is_object()) throw std::runtime_error("safetensors: header is not a JSON object");
  const size_t base = 8 + n;
  const uint64_t buffer_size = file.size() - base;
  RawTensors out;
  std::vector<std::pair<uint64_t, uint64_t>> spans;
  for (auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) throw std::runtime_error("safetensors: __metadata__ is not an object");
      for (auto& [k, v] : entry.items()) {
        if (!v.is_string()) throw std::runtime_error("safetensors: metadata value is not a string");
        if (metadata) (*metadata)[k] = v.get<std::string>();
      }
      continue;
    }
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") ||
        !entry.contains("data_offsets") || entry.size() != 3)
      throw std::runtime_error("safetensors: tensor " + name + " needs dtype, shape, data_offsets");
    RawTensor t;
    if (!entry["dtype"].is_string()) throw std::runtime_error("safetensors: bad dtype of " + name);
    t.dtype = entry["dtype"].get<std::string>();
    const size_t item = dtype_size(t.dtype);
    if (item == 0) throw std::runtime_error("safetensors: unknown dtype " + t.dtype + " of " + name);
    if (!entry["shape"].is_array() || entry["shape"].size() > 8)
      throw std::runtime_error("safetensors: bad shape of " + name);
    uint64_t count = 1;
    for (auto& d : entry["shape"]) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() > (1ull << 31))
        throw std::runtime_error("safetensors: bad shape of " + name);
      t.shape.push_back(d.get<int64_t>());
      count *= d.get<uint64_t>();
      if (count > buffer_size) throw std::runtime_error("safetensors: " + name + " is larger than the file");
    }
    auto& off = entry["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
        !off[1].is_number_unsigned())
      throw std::runtime_error("safetensors: bad data_offsets of " + name);
    const uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
    if (begin > end || end > buffer_size || end - begin != count * item)
      throw std::runtime_error("safetensors: data_offsets of " + name + " do not match its shape");
    t.bytes = file.substr(base + begin, end - begin);
    spans.emplace_back(begin, end);
    out.emplace(name, std::move(t));
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i].first < spans[i - 1].second) throw std::runtime_error("safetensors: tensors overlap");
  return out;
}

std::string serialize_safetensors(const RawTensors& tensors,
                                  const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    header[name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string json = header.dump();
  while ((8 + json.size()) % 8 != 0) json.push_back(' ');  // aligned buffer, as the reference
  std::string out(8, '\0');
  uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  out += json;
  for (const auto& [name, t] : tensors) out += t.bytes;
  return out;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_file_atomic(const std::string& path, const std::string& data) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw std::runtime_error("cannot write " + tmp);
    out.write(data.data(), static_cast<std::streamsize>(data.size()));
    out.flush();
    if (!out) throw std::runtime_error("cannot write " + tmp);
  }
  // rename() is atomic on POSIX: a crash leaves the old file or the new one, never half.
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("cannot replace " + path);
}

}  // namespace edgefl
