// A shared secret that proves each peer of a connection, in a challenge
// and response: each side sends a fresh nonce, and each answers with an
// HMAC-SHA-256, under the secret, over both nonces and what the connection
// asks for. The secret never crosses the wire, and an answer taken from
// one connection is worth nothing on another (its nonces are not those).
//
// This proves who is at the other end when the connection opens; it does
// not encrypt or sign what follows (see the README: run pagewire on a
// fabric you trust, or under IPsec/WireGuard, against anyone who can
// rewrite packets in flight).
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

namespace pagewire {

using Nonce = std::array<uint8_t, 32>;
using Mac = std::array<uint8_t, 32>;

// A fresh random nonce (the kernel's CSPRNG, through OpenSSL).
Nonce fresh_nonce();

class AuthKey {
 public:
  // Shortest secret accepted, in bytes.
  static constexpr size_t kMinBytes = 16;
  static constexpr size_t kMaxBytes = 4096;

  // Reads the secret from `path`: the file's bytes, trailing whitespace
  // dropped. Throws Error(kInvalidArgument) saying why for a file that is
  // missing, too short or too long, or that others may read (mode 0600,
  // as ssh asks of its keys).
  static std::shared_ptr<const AuthKey> load(const std::string& path);
  // `key_file` when not empty, else the file $PAGEWIRE_KEY_FILE names,
  // else none (nullptr).
  static std::shared_ptr<const AuthKey> from_option(const std::string& key_file);
  // A secret given as bytes (tests, programs that keep it elsewhere).
  static std::shared_ptr<const AuthKey> from_bytes(std::string_view secret);

  // HMAC-SHA-256 under the secret over `label`, then each part in turn,
  // each preceded by its length (so that no two messages read alike).
  Mac mac(std::string_view label, std::initializer_list<std::span<const uint8_t>> parts) const;
  // Whether two MACs are the same, in constant time.
  static bool same(const Mac& a, const Mac& b);

  // A new random secret as 64 hex digits (pagewire keygen).
  static std::string generate_hex();

 private:
  explicit AuthKey(std::string secret) : secret_(std::move(secret)) {}
  std::string secret_;
};

// Bytes of a trivially copyable value, for AuthKey::mac's parts.
template <typename T>
std::span<const uint8_t> bytes_of(const T& v) {
  return {reinterpret_cast<const uint8_t*>(&v), sizeof v};
}
inline std::span<const uint8_t> bytes_of(std::string_view s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}
// Not the object's bytes (a pointer among them): its text, through
// string_view.
std::span<const uint8_t> bytes_of(const std::string&) = delete;

}  // namespace pagewire
