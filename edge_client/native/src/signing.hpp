// Signed update frames (PROTOCOL.md section 12): Ed25519 over EFS1 | id | payload.
#pragma once

#include <memory>
#include <string>

namespace edgefl {

class SigningKey {
 public:
  // Reads a PEM PKCS#8 Ed25519 private key (as `edgefl gateway init` writes); throws
  // std::runtime_error with a one-line reason.
  static SigningKey from_pem_file(const std::string& path);
  // The signed frame around `payload` for `device_id`.
  std::string sign(const std::string& device_id, const std::string& payload) const;
  ~SigningKey();
  SigningKey(SigningKey&&) noexcept;
  SigningKey& operator=(SigningKey&&) noexcept;

 private:
  SigningKey() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace edgefl
