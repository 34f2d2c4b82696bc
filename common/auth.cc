#include "common/auth.h"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/unique_fd.h"
#include "pagewire/error.h"

namespace pagewire {
namespace {

[[noreturn]] void refuse_key(const std::string& path, const std::string& why) {
  throw Error(Errc::kInvalidArgument, "key file " + path + ": " + why);
}

}  // namespace

Nonce fresh_nonce() {
  Nonce n{};
  if (RAND_bytes(n.data(), static_cast<int>(n.size())) != 1) {
    throw Error(Errc::kIo, "no random bytes for a nonce (OpenSSL RAND_bytes failed)");
  }
  return n;
}

std::shared_ptr<const AuthKey> AuthKey::load(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY));
  if (!fd) refuse_key(path, std::strerror(errno));
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) refuse_key(path, std::strerror(errno));
  if (!S_ISREG(st.st_mode)) refuse_key(path, "not a regular file");
  if ((st.st_mode & 077) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    refuse_key(path, std::string("others may read it (mode ") + mode + "); chmod 600 " + path);
  }
  if (st.st_size > static_cast<off_t>(kMaxBytes) + 64) {
    refuse_key(path, "longer than " + std::to_string(kMaxBytes) + " bytes: not a key");
  }
  std::string secret(static_cast<size_t>(st.st_size), '\0');
  size_t got = 0;
  while (got < secret.size()) {
    const ssize_t n = ::read(fd.get(), secret.data() + got, secret.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) refuse_key(path, std::strerror(errno));
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  secret.resize(got);
  while (!secret.empty() &&
         (secret.back() == '\n' || secret.back() == '\r' || secret.back() == ' ' || secret.back() == '\t')) {
    secret.pop_back();
  }
  if (secret.size() < kMinBytes) {
    refuse_key(path, "holds " + std::to_string(secret.size()) + " bytes; a key needs at least " +
                         std::to_string(kMinBytes) + " (pagewire keygen " + path + " makes one)");
  }
  if (secret.size() > kMaxBytes) refuse_key(path, "longer than " + std::to_string(kMaxBytes) + " bytes: not a key");
  return std::shared_ptr<const AuthKey>(new AuthKey(std::move(secret)));
}

std::shared_ptr<const AuthKey> AuthKey::from_option(const std::string& key_file) {
  if (!key_file.empty()) return load(key_file);
  const char* env = std::getenv("PAGEWIRE_KEY_FILE");
  if (env != nullptr && *env != '\0') return load(env);
  return nullptr;
}

std::shared_ptr<const AuthKey> AuthKey::from_bytes(std::string_view secret) {
  if (secret.size() < kMinBytes || secret.size() > kMaxBytes) {
    throw Error(Errc::kInvalidArgument, "a key must hold " + std::to_string(kMinBytes) + ".." +
                                            std::to_string(kMaxBytes) + " bytes, not " + std::to_string(secret.size()));
  }
  return std::shared_ptr<const AuthKey>(new AuthKey(std::string(secret)));
}

Mac AuthKey::mac(std::string_view label, std::initializer_list<std::span<const uint8_t>> parts) const {
  std::vector<uint8_t> message;
  const auto append = [&](std::span<const uint8_t> p) {
    const uint64_t n = p.size();
    message.insert(message.end(), reinterpret_cast<const uint8_t*>(&n), reinterpret_cast<const uint8_t*>(&n) + 8);
    message.insert(message.end(), p.begin(), p.end());
  };
  append(bytes_of(label));
  for (const auto& p : parts) append(p);
  Mac out{};
  unsigned len = 0;
  if (HMAC(EVP_sha256(), secret_.data(), static_cast<int>(secret_.size()), message.data(), message.size(), out.data(),
           &len) == nullptr ||
      len != out.size()) {
    throw Error(Errc::kIo, "HMAC-SHA-256 failed (OpenSSL)");
  }
  return out;
}

bool AuthKey::same(const Mac& a, const Mac& b) { return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0; }

std::string AuthKey::generate_hex() {
  const Nonce n = fresh_nonce();
  static constexpr char kHex[] = "0123456789abcdef";
  std::string s;
  for (uint8_t b : n) {
    s += kHex[b >> 4];
    s += kHex[b & 15];
  }
  return s;
}

}  // namespace pagewire
