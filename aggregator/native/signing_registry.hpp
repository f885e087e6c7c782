// Signed update frames (PROTOCOL.md section 12, protocol/signing.py) as the aggregator opens
// them: the registry file of device public keys, re-read whenever it changes on disk.
#pragma once

#include <openssl/evp.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>

namespace edgefl::ingest {

// An update that fails a check: `reason` is the counter label Coordinator.validate uses.
struct Rejected {
  std::string reason, detail;
};

class SigningRegistry {
 public:
  // Throws std::runtime_error when the file cannot be read at all.
  explicit SigningRegistry(std::string path);
  // The payload inside `frame`, or Rejected with signing.py's reasons (in its order).
  std::string open(const std::string& device_id, const std::string& frame);

 private:
  using Key = std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)>;
  void refresh();  // a file that cannot be parsed keeps the last good keys (and says why)

  std::string path_;
  std::map<std::string, Key> keys_;
  std::pair<int64_t, int64_t> stamp_{};  // mtime (ns) and size of the file last read
  bool loaded_ = false;
};

}  // namespace edgefl::ingest
