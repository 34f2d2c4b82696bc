// The TCP server's admission: the limits on connections (in their
// handshake, established, per address) and the key's challenge and
// response (protocol.h). The rest of the server is in tcp_server.cc.
#include <algorithm>
#include <cstring>

#include "spdlog/spdlog.h"
#include "transport/protocol.h"
#include "transport/tcp/socket_util.h"
#include "transport/tcp/tcp_server.h"

namespace pagewire {

bool TcpServer::authenticate(int fd, const std::string& name, uint8_t flags, uint64_t lease, const std::string& peer,
                             Clock::time_point deadline) {
  try {
    return prove_peer(fd, name, flags, lease, peer, deadline);
  } catch (const std::exception& e) {  // no random bytes, or no HMAC: refuse, and go on serving
    spdlog::error("server: authenticating {}: {}; dropping it", peer, e.what());
    return false;
  }
}

bool TcpServer::prove_peer(int fd, const std::string& name, uint8_t flags, uint64_t lease, const std::string& peer,
                           Clock::time_point deadline) {
  Nonce theirs{};
  if (!tcp::recv_before(fd, theirs.data(), theirs.size(), deadline)) {
    spdlog::warn("server: {} sent a truncated hello; dropping it", peer);
    return false;
  }
  const Nonce mine = fresh_nonce();
  wire::Challenge c{wire::kChallengeMagic, key_ ? wire::kChallengeKeyed : 0, {}, {}};
  std::memcpy(c.nonce, mine.data(), mine.size());
  if (key_) {
    const Mac proof = wire::server_proof(*key_, name, flags, theirs, mine);
    std::memcpy(c.proof, proof.data(), proof.size());
  }
  Mac answer{};
  if (!tcp::send_all(fd, &c, sizeof c) || !tcp::recv_before(fd, answer.data(), answer.size(), deadline)) {
    spdlog::warn("server: {} closed at the challenge (it may not trust this server's key, or has none); dropping it",
                 peer);
    return false;
  }
  if (!key_ || AuthKey::same(answer, wire::client_proof(*key_, name, flags, lease, theirs, mine))) return true;
  ++auth_refused_;
  const bool none = std::all_of(answer.begin(), answer.end(), [](uint8_t b) { return b == 0; });
  spdlog::warn("server: {} {}; refusing it", peer,
               none ? "holds no key" : "failed to prove the key (another key, or a replayed answer)");
  wire::HelloReply no{wire::kHelloMagic, static_cast<uint32_t>(Errc::kAuth), 0, 0, 0, 0, wire::kVersion};
  tcp::send_all(fd, &no, sizeof no);
  tcp::close_gracefully(fd);
  return false;
}

bool TcpServer::admit_locked(const std::string& addr) {
  PeerLoad& load = peers_[addr];
  if (handshakes_ >= options_.max_handshakes || load.handshakes >= options_.max_handshakes_per_peer) {
    if (load.handshakes == 0 && load.established == 0) peers_.erase(addr);
    ++limit_refused_;
    return false;
  }
  ++load.handshakes;
  ++handshakes_;
  return true;
}

bool TcpServer::establish(const std::string& addr) {
  std::lock_guard lock(mu_);
  PeerLoad& load = peers_[addr];  // there: this connection's handshake is counted
  if (established_ >= options_.max_connections || load.established >= options_.max_connections_per_peer) {
    ++limit_refused_;
    return false;  // still counted as a handshake, until release()
  }
  --load.handshakes;
  --handshakes_;
  ++load.established;
  ++established_;
  return true;
}

void TcpServer::release(const std::string& addr, bool established) {
  std::lock_guard lock(mu_);
  const auto it = peers_.find(addr);
  if (it == peers_.end()) return;  // never counted (cannot happen: admit_locked() counted it)
  if (established) {
    --established_;
    --it->second.established;
  } else {
    --handshakes_;
    --it->second.handshakes;
  }
  if (it->second.handshakes == 0 && it->second.established == 0) peers_.erase(it);
}

void TcpServer::log_refusal_locked(const std::string& peer, const std::string& why) {
  const auto now = Clock::now();
  if (now - last_refusal_log_ < std::chrono::seconds(1)) {
    ++refusals_unlogged_;
    return;
  }
  spdlog::warn("server: refusing {}: too many {}{}", peer, why,
               refusals_unlogged_ > 0 ? " (and " + std::to_string(refusals_unlogged_) +
                                            " more refused since the last "
                                            "such line)"
                                      : "");
  last_refusal_log_ = now;
  refusals_unlogged_ = 0;
}

}  // namespace pagewire
