// Ed25519 signed update frames (PROTOCOL.md section 12) with OpenSSL 3's EVP interface.
#include "signing.hpp"

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include <stdexcept>

namespace edgefl {

namespace {

constexpr char kMagic[] = "EFS1";  // frame version 1; a new layout gets a new magic
constexpr size_t kSignatureBytes = 64;
constexpr size_t kMaxDeviceIdBytes = 255;

// OpenSSL's most recent error as text, so a failure says more than "it failed".
std::string openssl_error() {
  const unsigned long code = ERR_get_error();
  ERR_clear_error();
  if (code == 0) return "unknown OpenSSL error";
  char buf[256];
  ERR_error_string_n(code, buf, sizeof buf);
  return buf;
}

// The device id travels as UTF-8 (the reference encodes a Python str, which is always valid).
bool valid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    const size_t n = c < 0x80                ? 1
                     : c >= 0xc2 && c <= 0xdf ? 2
                     : c >= 0xe0 && c <= 0xef ? 3
                     : c >= 0xf0 && c <= 0xf4 ? 4
                                              : 0;
    if (n == 0 || i + n > s.size()) return false;
    uint32_t cp = n == 1 ? c : c & (0x7f >> n);
    for (size_t k = 1; k < n; ++k) {
      const auto b = static_cast<unsigned char>(s[i + k]);
      if ((b & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (b & 0x3f);
    }
    const uint32_t min = n == 1 ? 0 : n == 2 ? 0x80 : n == 3 ? 0x800 : 0x10000;
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += n;
  }
  return true;
}

}  // namespace

struct SigningKey::Impl {
  EVP_PKEY* key = nullptr;
  ~Impl() { EVP_PKEY_free(key); }
};

SigningKey SigningKey::from_pem_file(const std::string& path) {
  BIO* bio = BIO_new_file(path.c_str(), "r");
  if (bio == nullptr) throw std::runtime_error("cannot read signing key " + path);
  // A callback that supplies no passphrase: OpenSSL's default would prompt on the terminal
  // for an encrypted key, and a device has nobody to answer it.
  pem_password_cb* no_passphrase = [](char*, int, int, void*) { return 0; };
  EVP_PKEY* key = PEM_read_bio_PrivateKey(bio, nullptr, no_passphrase, nullptr);
  BIO_free(bio);
  if (key == nullptr)
    throw std::runtime_error("signing key " + path + " is no PEM private key: " + openssl_error());
  if (EVP_PKEY_get_id(key) != EVP_PKEY_ED25519) {
    EVP_PKEY_free(key);
    throw std::runtime_error("signing key " + path + " is not an Ed25519 private key");
  }
  SigningKey out;
  out.impl_ = std::make_unique<Impl>();
  out.impl_->key = key;
  return out;
}

std::string SigningKey::sign(const std::string& device_id, const std::string& payload) const {
  if (!impl_) throw std::runtime_error("signing key is empty (moved from)");
  if (device_id.empty() || device_id.size() > kMaxDeviceIdBytes || !valid_utf8(device_id))
    throw std::invalid_argument("device id must be 1..255 bytes of UTF-8");
  std::string frame(kMagic, 4);
  frame += static_cast<char>(device_id.size() >> 8);  // u16, big-endian
  frame += static_cast<char>(device_id.size() & 0xff);
  frame += device_id;
  frame += payload;
  // Pure Ed25519 (RFC 8032) signs the message itself: no digest is named.
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  if (ctx == nullptr) throw std::runtime_error("out of memory");
  unsigned char signature[kSignatureBytes];
  size_t length = sizeof signature;
  const bool ok = EVP_DigestSignInit(ctx, nullptr, nullptr, nullptr, impl_->key) == 1 &&
                  EVP_DigestSign(ctx, signature, &length, reinterpret_cast<const unsigned char*>(frame.data()),
                                 frame.size()) == 1 &&
                  length == kSignatureBytes;
  EVP_MD_CTX_free(ctx);
  if (!ok) throw std::runtime_error("Ed25519 signing failed: " + openssl_error());
  frame.append(reinterpret_cast<const char*>(signature), kSignatureBytes);
  return frame;
}

SigningKey::~SigningKey() = default;
SigningKey::SigningKey(SigningKey&&) noexcept = default;
SigningKey& SigningKey::operator=(SigningKey&&) noexcept = default;

}  // namespace edgefl
