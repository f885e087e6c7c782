// Ed25519 signature checks of update frames against the gateway's registry file (OpenSSL).
#include "signing_registry.hpp"

#include <sys/stat.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "json_strict.hpp"

namespace edgefl::ingest {
namespace {

using nlohmann::json;

constexpr size_t kSignatureBytes = 64, kMaxDeviceIdBytes = 255;  // protocol/signing.py
constexpr char kMagic[] = "EFS1";

std::string hex_bytes(const std::string& hex) {
  if (hex.size() % 2) throw std::runtime_error("odd-length hex");
  std::string out;
  for (size_t i = 0; i < hex.size(); i += 2) out.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  return out;
}

}  // namespace

SigningRegistry::SigningRegistry(std::string path) : path_(std::move(path)) {
  refresh();
  if (!loaded_) throw std::runtime_error("cannot read the signing registry " + path_);
}

std::string SigningRegistry::open(const std::string& device_id, const std::string& frame) {
  if (frame.compare(0, 4, kMagic) != 0) throw Rejected{"signature-unsigned", "payload carries no signature frame"};
  if (frame.size() < 4 + 2 + 1 + kSignatureBytes) throw Rejected{"signature-malformed-frame", "too short for a frame"};
  size_t length = (static_cast<uint8_t>(frame[4]) << 8) | static_cast<uint8_t>(frame[5]);
  if (length == 0 || length > kMaxDeviceIdBytes || 6 + length + kSignatureBytes > frame.size())
    throw Rejected{"signature-malformed-frame", "device id length does not fit"};
  std::string claimed = frame.substr(6, length);
  if (!detail::valid_utf8(claimed)) throw Rejected{"signature-malformed-frame", "device id is not UTF-8"};
  refresh();
  auto key = keys_.find(device_id);
  if (key == keys_.end()) throw Rejected{"signature-unknown-device", "no public key registered for " + device_id};
  if (claimed != device_id) throw Rejected{"signature-device-mismatch", "frame of " + claimed + " sent as " + device_id};
  size_t signed_bytes = frame.size() - kSignatureBytes;
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  bool ok = ctx && EVP_DigestVerifyInit(ctx.get(), nullptr, nullptr, nullptr, key->second.get()) == 1 &&
            EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char*>(frame.data() + signed_bytes),
                             kSignatureBytes, reinterpret_cast<const unsigned char*>(frame.data()),
                             signed_bytes) == 1;
  if (!ok) throw Rejected{"signature-bad-signature", "signature of " + device_id + " does not verify"};
  return frame.substr(6 + length, signed_bytes - 6 - length);
}

void SigningRegistry::refresh() {
  struct stat info{};
  if (::stat(path_.c_str(), &info) != 0) return;  // keep the last good registry
  std::pair<int64_t, int64_t> stamp{info.st_mtim.tv_sec * 1000000000LL + info.st_mtim.tv_nsec, info.st_size};
  if (loaded_ && stamp == stamp_) return;
  try {
    std::ifstream file(path_);
    json j = json::parse(file);
    if (j.at("schema") != 1 || j.at("algorithm") != "ed25519") throw std::runtime_error("not an ed25519 registry of schema 1");
    std::map<std::string, Key> keys;
    for (const auto& [device, hex] : j.at("devices").items()) {
      std::string raw = hex_bytes(hex.get<std::string>());
      if (raw.size() != 32) throw std::runtime_error("a public key is not 32 bytes");
      EVP_PKEY* k = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr,
                                                reinterpret_cast<const unsigned char*>(raw.data()), 32);
      if (!k) throw std::runtime_error("an invalid public key");
      keys.emplace(device, Key(k, EVP_PKEY_free));
    }
    keys_ = std::move(keys);
    stamp_ = stamp;
    loaded_ = true;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "edgefl-ingest: signing registry %s unreadable, keeping the previous one: %s\n",
                 path_.c_str(), e.what());
  }
}

}  // namespace edgefl::ingest
