#include "transport/tcp/socket_util.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <vector>

namespace pagewire::tcp {

void set_io_timeout(int fd, unsigned timeout_ms) {
  timeval tv{};
  tv.tv_sec = timeout_ms / 1000;
  tv.tv_usec = static_cast<suseconds_t>(timeout_ms % 1000) * 1000;
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

namespace {

// One address; the error, with no "connect to HOST:PORT: " before it, in *why.
UniqueFd connect_one(const Address& a, unsigned timeout_ms, std::string* why, int cancel_fd) {
  UniqueFd fd(::socket(a.addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) {
    *why = std::string("socket: ") + std::strerror(errno);
    return {};
  }
  int rc = ::connect(fd.get(), reinterpret_cast<const sockaddr*>(&a.addr), a.addr_len);
  if (rc != 0 && errno != EINPROGRESS) {
    *why = std::strerror(errno);
    return {};
  }
  if (rc != 0) {
    pollfd p[2] = {{fd.get(), POLLOUT, 0}, {cancel_fd, POLLIN, 0}};  // poll() skips a -1
    rc = ::poll(p, 2, static_cast<int>(timeout_ms));
    if (rc == 0) {
      *why = "no answer within " + std::to_string(timeout_ms) + " ms";
      return {};
    }
    if (rc > 0 && p[0].revents == 0) {
      *why = "cancelled";
      return {};
    }
    int err = 0;
    socklen_t len = sizeof err;
    ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
    if (rc < 0 || err != 0) {
      *why = std::strerror(rc < 0 ? errno : err);
      return {};
    }
  }
  return fd;
}

}  // namespace

UniqueFd connect_to(const Endpoint& ep, unsigned timeout_ms, std::string* why, int cancel_fd) {
  std::vector<Address> addresses = ep.addresses;
  if (addresses.empty()) addresses.push_back({ep.addr, ep.addr_len});
  UniqueFd fd;
  std::string whys;
  for (const Address& a : addresses) {
    pollfd cancel{cancel_fd, POLLIN, 0};
    if (cancel_fd >= 0 && ::poll(&cancel, 1, 0) > 0) {
      whys = "cancelled";
      break;
    }
    std::string one;
    fd = connect_one(a, timeout_ms, &one, cancel_fd);
    if (fd) break;
    if (whys.find(one) == std::string::npos) whys += (whys.empty() ? "" : "; ") + one;
  }
  if (!fd) {
    *why = "connect to " + ep.text + ": " + whys;
    return {};
  }
  // Back to blocking: the handshake is plain syscalls, the data path io_uring.
  ::fcntl(fd.get(), F_SETFL, ::fcntl(fd.get(), F_GETFL) & ~O_NONBLOCK);
  int one = 1;
  ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}

void watch_liveness(int fd) {
  int on = 1;
  int idle_s = 30;
  int interval_s = 5;
  int probes = 6;
  unsigned user_timeout_ms = 60000;
  ::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle_s, sizeof idle_s);
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval_s, sizeof interval_s);
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &probes, sizeof probes);
  ::setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout_ms, sizeof user_timeout_ms);
}

bool send_all(int fd, const void* buf, size_t n) {
  const auto* p = static_cast<const char*>(buf);
  while (n > 0) {
    ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool recv_all(int fd, void* buf, size_t n) {
  auto* p = static_cast<char*>(buf);
  while (n > 0) {
    ssize_t r = ::recv(fd, p, n, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

namespace {

// Sets the socket's timeouts to what is left until `deadline`; false when
// nothing is.
bool timeout_until(int fd, std::chrono::steady_clock::time_point deadline) {
  const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count();
  if (left <= 0) return false;
  set_io_timeout(fd, static_cast<unsigned>(left));
  return true;
}

}  // namespace

bool recv_before(int fd, void* buf, size_t n, std::chrono::steady_clock::time_point deadline) {
  auto* p = static_cast<char*>(buf);
  while (n > 0) {
    if (!timeout_until(fd, deadline)) return false;
    const ssize_t r = ::recv(fd, p, n, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

void close_gracefully(int fd) {
  ::shutdown(fd, SHUT_WR);
  // At most 200 ms in all, however the peer paces what it sends: a peer
  // that dribbles bytes must not hold the connection (and its place among
  // the handshakes) any longer.
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(200);
  char sink[4096];
  for (size_t drained = 0; drained < (1u << 20) && timeout_until(fd, until);) {
    const ssize_t n = ::recv(fd, sink, sizeof sink, 0);
    if (n <= 0) break;
    drained += static_cast<size_t>(n);
  }
}

namespace {

// The challenge and response (protocol.h): checks the server's proof, sends
// this side's. On return *reply holds a HelloReply the server sent instead
// of a challenge (a refusal: busy, another protocol version), or magic 0.
void prove(int fd, const std::string& name, uint8_t flags, uint64_t lease, const Nonce& mine, const AuthKey* key,
           const std::string& peer, wire::HelloReply* reply) {
  *reply = {};
  uint32_t magic = 0;
  if (!recv_all(fd, &magic, sizeof magic)) {
    throw Error(Errc::kProtocol,
                "no hello reply from " + peer + " (is it a pagewire server, and does it have a connection free?)");
  }
  if (magic == wire::kHelloMagic) {
    reply->magic = magic;
    if (!recv_all(fd, reinterpret_cast<std::byte*>(reply) + sizeof magic, sizeof *reply - sizeof magic)) {
      throw Error(Errc::kProtocol, "server " + peer + " cut its hello reply short");
    }
    // Only a refusal (busy, another version) may come before the challenge:
    // a descriptor sent without one is from a peer that proved nothing.
    if (reply->status == static_cast<uint32_t>(Errc::kOk)) {
      throw Error(key != nullptr ? Errc::kAuth : Errc::kProtocol,
                  "server " + peer + " answered without the challenge: not a pagewire server this side can trust");
    }
    return;
  }
  if (magic != wire::kChallengeMagic) throw Error(Errc::kProtocol, peer + " does not speak the pagewire protocol");
  wire::Challenge c{};
  c.magic = magic;
  if (!recv_all(fd, reinterpret_cast<std::byte*>(&c) + sizeof magic, sizeof c - sizeof magic)) {
    throw Error(Errc::kProtocol, "server " + peer + " cut its challenge short");
  }
  Nonce theirs{};
  std::memcpy(theirs.data(), c.nonce, theirs.size());
  Mac proof{};
  if (key != nullptr) {
    if ((c.flags & wire::kChallengeKeyed) == 0) {
      throw Error(Errc::kAuth, "server " + peer +
                                   " serves without a key, and this destination has one: it cannot prove who it "
                                   "is, so it is not trusted (give the server the key, or connect without one)");
    }
    Mac theirs_proof{};
    std::memcpy(theirs_proof.data(), c.proof, theirs_proof.size());
    if (!AuthKey::same(theirs_proof, wire::server_proof(*key, name, flags, mine, theirs))) {
      throw Error(Errc::kAuth, "server " + peer +
                                   " does not hold this destination's key (another key, or not the "
                                   "server it claims to be)");
    }
    proof = wire::client_proof(*key, name, flags, lease, mine, theirs);
  }
  if (!send_all(fd, proof.data(), proof.size())) {
    throw Error(Errc::kConnectFailed, "sending the key's proof to " + peer + ": " + std::strerror(errno));
  }
}

}  // namespace

RegionDescriptor handshake(int fd, const std::string& name, unsigned timeout_ms, const std::string& peer, uint8_t flags,
                           uint64_t lease, const AuthKey* key) {
  if (name.empty() || name.size() > wire::kMaxNameLength) {
    throw Error(Errc::kBadUri, "region name must be 1.." + std::to_string(wire::kMaxNameLength) + " bytes");
  }
  set_io_timeout(fd, timeout_ms);
  wire::Hello hello{wire::kHelloMagic, wire::kVersion, static_cast<uint8_t>(name.size()), flags};
  const Nonce mine = fresh_nonce();
  const bool sent = send_all(fd, &hello, sizeof hello) && send_all(fd, name.data(), name.size()) &&
                    ((flags & wire::kHelloLease) == 0 || send_all(fd, &lease, sizeof lease)) &&
                    send_all(fd, mine.data(), mine.size());
  const int send_errno = errno;
  wire::HelloReply reply{};
  if (!sent) {
    // A server that refused at once (all connections in use) may have
    // closed before the hello arrived; its reply, if any, says why.
    const bool replied = recv_all(fd, &reply, sizeof reply);
    if (!replied || reply.magic != wire::kHelloMagic || reply.status == 0) {
      throw Error(Errc::kConnectFailed, "sending hello to " + peer + ": " + std::strerror(send_errno));
    }
  } else {
    prove(fd, name, flags, lease, mine, key, peer, &reply);
    if (reply.magic == 0 && !recv_all(fd, &reply, sizeof reply)) {
      throw Error(Errc::kProtocol, "server " + peer + " sent no hello reply after the challenge");
    }
  }
  if (reply.magic != wire::kHelloMagic) {
    throw Error(Errc::kProtocol, peer + " does not speak the pagewire protocol");
  }
  const auto status = static_cast<Errc>(reply.status);
  if (status == Errc::kNotFound) {
    throw Error(Errc::kNotFound, "server " + peer + " exports no region named '" + name + "'");
  }
  if (status == Errc::kProtocol) {
    throw Error(Errc::kProtocol, "server " + peer + " speaks pagewire protocol version " +
                                     std::to_string(reply.server_version) + ", this side " +
                                     std::to_string(wire::kVersion));
  }
  if (status == Errc::kAuth) {
    throw Error(Errc::kAuth, "server " + peer +
                                 (key == nullptr ? " asks for a key, and this destination has none "
                                                   "(--key-file, or PAGEWIRE_KEY_FILE)"
                                                 : " refused this destination's key (another key)"));
  }
  if (status == Errc::kLeased) {
    throw Error(Errc::kLeased, "server " + peer + " refused to let this destination write '" + name +
                                   "': the region has another writer" +
                                   ((flags & wire::kHelloLease) != 0 ? " (this destination's lease is gone: the "
                                                                       "server restarted, or another writer came)"
                                                                     : ""));
  }
  if (status == Errc::kUnsupported && (flags & wire::kHelloWriter) != 0) {
    throw Error(Errc::kUnsupported,
                "server " + peer + " serves '" + name + "' read-only: only memory nodes (serve --memory) take writes");
  }
  if (status != Errc::kOk) {
    throw Error(status, "server " + peer + " refused region '" + name + "': " + std::string(to_string(status)));
  }
  if (reply.length == 0 || reply.page_size == 0 || (reply.page_size & (reply.page_size - 1)) != 0) {
    throw Error(Errc::kProtocol, "server " + peer + " sent an invalid descriptor");
  }
  const uint64_t pages = (reply.length + reply.page_size - 1) / reply.page_size;
  if (reply.zero_map_bytes != 0 && reply.zero_map_bytes != (pages + 63) / 64 * 8) {
    throw Error(Errc::kProtocol, "server " + peer + " sent a zero-page map of the wrong size");
  }
  uint64_t identity = 0;
  uint64_t granted = 0;
  uint64_t ticket = 0;
  if (!recv_all(fd, &identity, sizeof identity) ||
      ((flags & wire::kHelloWriter) != 0 && !recv_all(fd, &granted, sizeof granted)) ||
      ((flags & wire::kHelloTicket) != 0 && !recv_all(fd, &ticket, sizeof ticket))) {
    throw Error(Errc::kProtocol, "server " + peer + " cut its hello reply short");
  }
  if ((flags & wire::kHelloTicket) != 0 && ticket == 0) {
    throw Error(Errc::kBusy, "server " + peer + " issued no ticket for an RDMA connect (too many outstanding)");
  }
  if ((flags & wire::kHelloWriter) != 0 && (granted == 0 || ((flags & wire::kHelloLease) != 0 && granted != lease))) {
    throw Error(Errc::kProtocol, "server " + peer + " granted no valid writer lease for '" + name + "'");
  }
  ZeroMap zero_map(reply.zero_map_bytes / 8);
  if (!zero_map.empty() && !recv_all(fd, zero_map.data(), reply.zero_map_bytes)) {
    throw Error(Errc::kProtocol, "server " + peer + " cut the zero-page map short");
  }
  set_io_timeout(fd, 0);
  RegionDescriptor d;
  d.zero_map = std::move(zero_map);
  d.name = name;
  d.length = reply.length;
  d.page_size = reply.page_size;
  d.key = reply.key;
  d.identity = identity;
  d.lease = granted;
  d.ticket = ticket;
  return d;
}

}  // namespace pagewire::tcp
