#include "transport/tcp/tcp_server.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>

#include "spdlog/spdlog.h"
#include "transport/protocol.h"
#include "transport/tcp/socket_util.h"
#include "transport/transport.h"

namespace pagewire {
namespace {

constexpr size_t kRecvBuffer = 64 * 1024;

// The peer's address alone (what the per-peer limits count by), and with
// its port (what the log names).
std::string peer_address(const sockaddr_storage& a) {
  char host[NI_MAXHOST] = "?";
  ::getnameinfo(reinterpret_cast<const sockaddr*>(&a), sizeof a, host, sizeof host, nullptr, 0, NI_NUMERICHOST);
  return host;
}
std::string peer_name(const sockaddr_storage& a) {
  char host[NI_MAXHOST] = "?";
  char port[NI_MAXSERV] = "?";
  ::getnameinfo(reinterpret_cast<const sockaddr*>(&a), sizeof a, host, sizeof host, port, sizeof port,
                NI_NUMERICHOST | NI_NUMERICSERV);
  return std::string(host) + ":" + port;
}

// Writes the whole iovec array, resuming after partial writes.
bool send_iov(int fd, iovec* iov, size_t count) {
  while (count > 0) {
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = std::min<size_t>(count, IOV_MAX);
    ssize_t n = ::sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return false;
    auto left = static_cast<size_t>(n);
    while (count > 0 && left >= iov->iov_len) {
      left -= iov->iov_len;
      ++iov;
      --count;
    }
    if (count > 0 && left > 0) {
      iov->iov_base = static_cast<char*>(iov->iov_base) + left;
      iov->iov_len -= left;
    }
  }
  return true;
}

// Tells a destination the server is full, without stalling the accept
// thread: the reply fits any socket buffer, and the hello is read only if it
// is there already. Reading it first means the close is a FIN, so the reply
// is not lost to a reset; if the hello comes later, the destination may see
// a reset instead, and its error names a full server as one cause.
void refuse_busy(int fd) {
  wire::HelloReply busy{wire::kHelloMagic, static_cast<uint32_t>(Errc::kBusy), 0, 0, 0, 0, wire::kVersion};
  (void)::send(fd, &busy, sizeof busy, MSG_DONTWAIT | MSG_NOSIGNAL);
  ::shutdown(fd, SHUT_WR);
  char sink[512];
  for (int i = 0; i < 4 && ::recv(fd, sink, sizeof sink, MSG_DONTWAIT) > 0; ++i) {
  }
}

}  // namespace

TcpServer::TcpServer(const ServerOptions& options, const ExportTable& exports, std::shared_ptr<const AuthKey> key,
                     TicketBook& tickets)
    : options_(options), exports_(exports), key_(std::move(key)), tickets_(tickets) {
  tcp::Endpoint ep = tcp::resolve(options.bind_address, options.port);
  listen_fd_.reset(::socket(ep.addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!listen_fd_) throw_errno("socket");
  int one = 1;
  ::setsockopt(listen_fd_.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (::bind(listen_fd_.get(), reinterpret_cast<const sockaddr*>(&ep.addr), ep.addr_len) != 0) {
    throw_errno("bind " + ep.text);
  }
  if (::listen(listen_fd_.get(), 128) != 0) throw_errno("listen " + ep.text);
  sockaddr_storage bound{};
  socklen_t len = sizeof bound;
  ::getsockname(listen_fd_.get(), reinterpret_cast<sockaddr*>(&bound), &len);
  port_ = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                            : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  stop_fd_.reset(::eventfd(0, EFD_CLOEXEC));
  if (!stop_fd_) throw_errno("eventfd");
  accept_thread_ = std::thread([this] { accept_loop(); });
  spdlog::info("server: listening on {}:{}{}", options.bind_address, port_, key_ ? " (peers must prove the key)" : "");
}

TcpServer::~TcpServer() { stop(); }

ServerStats TcpServer::stats() const {
  ServerStats s;
  s.connections_accepted = accepted_.load();
  s.connections_active = active_.load();
  s.connections_dropped = dropped_.load();
  s.reads_served = reads_.load();
  s.bytes_served = bytes_.load();
  s.reads_refused = refused_.load();
  s.writes_applied = writes_.load();
  s.bytes_written = bytes_written_.load();
  s.writes_refused = writes_refused_.load();
  s.writers_refused = writers_refused_.load();
  s.peers_refused_key = auth_refused_.load();
  s.connections_refused = limit_refused_.load();
  s.connections_idle_closed = idle_closed_.load();
  return s;
}

void TcpServer::drop_connections() {
  std::lock_guard lock(mu_);
  for (auto& c : connections_) {
    if (!c.done.load() && c.fd >= 0) ::shutdown(c.fd, SHUT_RDWR);
  }
}

void TcpServer::stop() {
  {
    std::lock_guard lock(mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  uint64_t one = 1;
  [[maybe_unused]] ssize_t w = ::write(stop_fd_.get(), &one, sizeof one);
  if (accept_thread_.joinable()) accept_thread_.join();
  drop_connections();
  std::list<Connection> finished;
  {
    std::lock_guard lock(mu_);
    finished.swap(connections_);
  }
  for (auto& c : finished) {
    if (c.thread.joinable()) c.thread.join();
  }
}

void TcpServer::reap_finished() {
  std::list<Connection> finished;
  {
    std::lock_guard lock(mu_);
    for (auto it = connections_.begin(); it != connections_.end();) {
      auto next = std::next(it);
      if (it->done.load()) finished.splice(finished.end(), connections_, it);
      it = next;
    }
  }
  for (auto& c : finished) {
    if (c.thread.joinable()) c.thread.join();
  }
}

void TcpServer::accept_loop() {
  for (;;) {
    pollfd fds[2] = {{listen_fd_.get(), POLLIN, 0}, {stop_fd_.get(), POLLIN, 0}};
    int rc = ::poll(fds, 2, 1000);
    if (rc < 0 && errno != EINTR) {
      spdlog::error("server: poll: {}", std::strerror(errno));
      return;
    }
    if (fds[1].revents != 0) return;
    reap_finished();
    if (rc <= 0 || (fds[0].revents & POLLIN) == 0) continue;
    sockaddr_storage addr{};
    socklen_t len = sizeof addr;
    UniqueFd fd(::accept4(listen_fd_.get(), reinterpret_cast<sockaddr*>(&addr), &len, SOCK_CLOEXEC));
    if (!fd) {
      if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED) {
        spdlog::warn("server: accept: {}", std::strerror(errno));
      }
      continue;
    }
    ++accepted_;
    std::string peer = peer_name(addr);
    std::string address = peer_address(addr);
    std::lock_guard lock(mu_);
    if (!admit_locked(address)) {
      log_refusal_locked(peer, "connections still in their handshake (" + std::to_string(handshakes_) +
                                   " in all; at most " + std::to_string(options_.max_handshakes) + ", " +
                                   std::to_string(options_.max_handshakes_per_peer) + " from one address)");
      refuse_busy(fd.get());
      continue;
    }
    ++active_;
    Connection& c = connections_.emplace_back();
    c.fd = fd.get();
    c.addr = std::move(address);
    try {
      c.thread = std::thread(
          [this, &c, f = std::move(fd), p = std::move(peer)]() mutable { serve(&c, std::move(f), std::move(p)); });
    } catch (const std::system_error& e) {
      // No thread (a pids limit, say): refuse this one and go on serving.
      spdlog::warn("server: refusing a connection: no thread to serve it: {}", e.what());
      c.fd = -1;
      c.done.store(true);
      --active_;
      PeerLoad& load = peers_[c.addr];
      --load.handshakes;
      --handshakes_;
      if (load.handshakes == 0 && load.established == 0) peers_.erase(c.addr);
    }
  }
}

void TcpServer::serve(Connection* conn, UniqueFd fd, std::string peer) {
  bool established = false;
  auto finish = [&](bool dropped) {
    if (dropped) ++dropped_;
    {
      std::lock_guard lock(mu_);
      conn->fd = -1;  // no shutdown() on a descriptor number that may be reused
    }
    fd.reset();
    release(conn->addr, established);
    --active_;
    conn->done.store(true);
  };
  int one = 1;
  ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  tcp::watch_liveness(fd.get());  // a destination that vanishes does not hold its thread for good

  // Handshake: all of it within the deadline, or the peer is dropped.
  const auto deadline = Clock::now() + std::chrono::milliseconds(options_.handshake_timeout_ms);
  wire::Hello hello{};
  if (!tcp::recv_before(fd.get(), &hello, sizeof hello, deadline)) {
    spdlog::warn("server: {} sent no hello; dropping it", peer);
    return finish(true);
  }
  if (hello.magic != wire::kHelloMagic || hello.name_length == 0 || hello.name_length > wire::kMaxNameLength) {
    spdlog::warn("server: {} sent a malformed hello (magic 0x{:08x}); dropping it", peer, hello.magic);
    return finish(true);
  }
  std::string name(hello.name_length, '\0');
  uint64_t presented_lease = 0;
  if (!tcp::recv_before(fd.get(), name.data(), name.size(), deadline) ||
      ((hello.flags & wire::kHelloLease) != 0 &&
       !tcp::recv_before(fd.get(), &presented_lease, sizeof presented_lease, deadline))) {
    spdlog::warn("server: {} sent a truncated hello; dropping it", peer);
    return finish(true);
  }
  if (hello.version != wire::kVersion) {
    // Say so, rather than leave the destination guessing at a closed socket.
    spdlog::warn("server: {} speaks protocol version {}, this server {}; refusing it", peer, hello.version,
                 wire::kVersion);
    wire::HelloReply no{wire::kHelloMagic, static_cast<uint32_t>(Errc::kProtocol), 0, 0, 0, 0, wire::kVersion};
    tcp::send_all(fd.get(), &no, sizeof no);
    tcp::close_gracefully(fd.get());
    return finish(true);
  }
  // Nothing about the region, not even whether it exists, before the peer
  // has proved the key.
  if (!authenticate(fd.get(), name, hello.flags, presented_lease, peer, deadline)) return finish(true);
  // Proved: the reply (a zero map may be megabytes) goes out at the pace
  // of an established connection, not in what is left of the handshake.
  tcp::set_io_timeout(fd.get(), options_.idle_timeout_ms);
  // Past the handshake: counted against max_connections (and per peer).
  if (!establish(conn->addr)) {
    {
      std::lock_guard lock(mu_);
      log_refusal_locked(peer, "connections open (" + std::to_string(options_.max_connections) + " in all, " +
                                   std::to_string(options_.max_connections_per_peer) + " from one address at most)");
    }
    wire::HelloReply busy{wire::kHelloMagic, static_cast<uint32_t>(Errc::kBusy), 0, 0, 0, 0, wire::kVersion};
    tcp::send_all(fd.get(), &busy, sizeof busy);
    tcp::close_gracefully(fd.get());
    return finish(false);
  }
  established = true;
  const ExportedRegion* region = exports_.find(name);
  wire::HelloReply reply{wire::kHelloMagic, static_cast<uint32_t>(Errc::kOk), 0, 0, 0, 0, 0};
  if (region == nullptr) {
    reply.status = static_cast<uint32_t>(Errc::kNotFound);
    spdlog::info("server: {} asked for unknown region '{}'", peer, name);
    tcp::send_all(fd.get(), &reply, sizeof reply);
    return finish(false);
  }
  const bool ticket_only = (hello.flags & wire::kHelloTicket) != 0;
  if (ticket_only && (hello.flags & wire::kHelloControl) != 0) {
    spdlog::warn("server: {} asked for a ticket together with control; refusing it", peer);
    reply.status = static_cast<uint32_t>(Errc::kInvalidArgument);
    tcp::send_all(fd.get(), &reply, sizeof reply);
    tcp::close_gracefully(fd.get());
    return finish(true);
  }
  const bool writer = (hello.flags & wire::kHelloWriter) != 0;
  uint64_t lease = 0;
  if (writer) {
    Errc refuse = Errc::kOk;
    if (region->writable_base == nullptr) {
      refuse = Errc::kUnsupported;
      spdlog::warn("server: {} asked to write '{}', which is read-only (only memory nodes take writes); refusing it",
                   peer, name);
    } else if ((lease = ticket_only ? region->lease.reserve(presented_lease, tickets_.lifetime())
                                    : region->lease.acquire(presented_lease)) == 0) {
      refuse = Errc::kLeased;
      ++writers_refused_;
      if (presented_lease != 0) {
        spdlog::warn("server: {} asked to write '{}' with a lease this server does not hold for it (it restarted, or "
                     "another writer came since); refusing it",
                     peer, name);
      } else {
        spdlog::warn("server: {} asked to write '{}', but another destination holds its writer lease; refusing it",
                     peer, name);
      }
    }
    if (refuse != Errc::kOk) {
      reply.status = static_cast<uint32_t>(refuse);
      tcp::send_all(fd.get(), &reply, sizeof reply);
      tcp::close_gracefully(fd.get());
      return finish(false);
    }
  }
  // Held until this connection's thread ends, whichever way it ends. A
  // ticket connection ends at once: the lease is only reserved for the
  // RDMA connect its ticket is for, which holds it from then on.
  struct LeaseHold {
    const ExportedRegion* region;
    ~LeaseHold() {
      if (region != nullptr) region->lease.release();
    }
  } hold{writer && !ticket_only ? region : nullptr};
  reply.key = region->key;
  reply.page_size = region->page_size;
  reply.length = region->length;
  // A ticket for an RDMA connect (transport/tickets.h): the descriptor,
  // the ticket, and nothing more on this connection.
  const uint64_t ticket = ticket_only ? tickets_.issue(name, lease) : 0;
  // A node's writer learns which pages were never written (only it writes
  // them from now on); readers of a node get no map at all.
  const ZeroMap zero_map = ticket_only && !writer                 ? ZeroMap{}
                           : writer && region->written != nullptr ? region->unwritten_map()
                                                                  : region->zero_map_snapshot();
  reply.zero_map_bytes = static_cast<uint32_t>(zero_map.size() * 8);
  if (!tcp::send_all(fd.get(), &reply, sizeof reply) ||
      !tcp::send_all(fd.get(), &region->identity, sizeof region->identity) ||
      (writer && !tcp::send_all(fd.get(), &lease, sizeof lease)) ||
      (ticket_only && !tcp::send_all(fd.get(), &ticket, sizeof ticket)) ||
      !tcp::send_all(fd.get(), zero_map.data(), reply.zero_map_bytes)) {
    return finish(false);
  }
  if (ticket_only) {
    spdlog::debug("server: {} was given a ticket for an RDMA connect to '{}'", peer, name);
    tcp::close_gracefully(fd.get());
    return finish(false);
  }
  // From here a connection that sends nothing for idle_timeout_ms is closed,
  // except a writer's: closing all of a writer's connections would free its
  // lease for another destination while it still holds written pages.
  tcp::set_io_timeout(fd.get(), writer ? 0 : options_.idle_timeout_ms);
  if ((hello.flags & wire::kHelloControl) != 0) {
    spdlog::debug("server: {} controls '{}'", peer, name);
    return finish(!serve_control(fd.get(), *region, peer));
  }
  if ((hello.flags & wire::kHelloBulk) != 0) {
    // Background transfer: let the threads answering demand reads run
    // first (a woken nice-0 thread preempts this one at once).
    ::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), 19);
  }
  spdlog::debug("server: {} attached '{}'{}{}", peer, name, (hello.flags & wire::kHelloBulk) != 0 ? " (bulk)" : "",
                writer ? " (writer)" : "");
  return finish(!serve_requests(fd.get(), *region, writer, peer));
}

bool TcpServer::serve_requests(int fd, const ExportedRegion& region, bool writer, const std::string& peer) {
  // Reads and write headers are records of one size; a write's payload
  // follows its header and may span many recvs.
  constexpr size_t kRecord = sizeof(wire::ReadRequest);
  std::vector<std::byte> buf(kRecvBuffer);
  std::vector<wire::ReadReply> replies(kRecvBuffer / kRecord);
  std::vector<iovec> iov(2 * replies.size());
  std::vector<std::byte> payload;  // a write's bytes, whole before any reach the region
  size_t have = 0;
  for (;;) {
    ssize_t n = ::recv(fd, buf.data() + have, buf.size() - have, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && have == 0) {
      ++idle_closed_;
      spdlog::info("server: {} sent nothing for {} ms; closing its connection (it reconnects when it reads again)",
                   peer, options_.idle_timeout_ms);
      return true;
    }
    if (n <= 0) {
      if (have > 0) {
        spdlog::warn("server: {} closed with a truncated request ({} of {} bytes); dropped", peer, have, kRecord);
        return false;
      }
      return true;
    }
    have += static_cast<size_t>(n);
    size_t pos = 0;
    size_t iovs = 0;
    size_t answered = 0;  // replies[] in use
    Errc refuse = Errc::kOk;
    while (refuse == Errc::kOk && have - pos >= kRecord) {
      wire::ReadRequest req;  // a WriteRequest has the same layout
      std::memcpy(&req, buf.data() + pos, sizeof req);
      wire::ReadReply& r = replies[answered++];
      r = {wire::kReplyMagic, static_cast<uint32_t>(Errc::kOk), req.tag, req.length};
      const bool is_write = req.magic == wire::kWriteMagic;
      if (req.magic != wire::kReadMagic && !is_write) {
        refuse = Errc::kProtocol;
      } else if (req.key != region.key) {
        refuse = Errc::kInvalidArgument;
      } else if (!read_in_bounds(region.length, req.offset, req.length) || req.length > wire::kMaxReadBytes) {
        refuse = Errc::kOutOfBounds;
      } else if (is_write && region.writable_base == nullptr) {
        refuse = Errc::kUnsupported;
      } else if (is_write && !writer) {
        refuse = Errc::kLeased;
      }
      if (refuse != Errc::kOk) {
        // Answer what came before, then the refusal, then hang up: after a
        // bad request the stream cannot be trusted.
        ++(is_write ? writes_refused_ : refused_);
        r.status = static_cast<uint32_t>(refuse);
        r.length = 0;
        iov[iovs++] = {&r, sizeof r};
        const char* kind = is_write ? "write" : req.magic == wire::kReadMagic ? "read" : "request";
        const char* why = refuse == Errc::kUnsupported ? " (it is read-only: only memory nodes take writes)"
                          : refuse == Errc::kLeased    ? " (this connection does not hold the writer lease)"
                                                       : "";
        spdlog::warn("server: {} sent a bad {} of '{}' ({}: offset {} length {} magic 0x{:08x}){}; dropping it", peer,
                     kind, region.name, to_string(refuse), req.offset, req.length, req.magic, why);
        break;
      }
      pos += kRecord;
      if (!is_write) {
        iov[iovs++] = {&r, sizeof r};
        iov[iovs++] = {const_cast<std::byte*>(region.base + req.offset), req.length};
        ++reads_;
        bytes_ += req.length;
        continue;
      }
      // The replies queued so far read the region as it was: send them
      // before this write changes it (sendmsg copies them out).
      if (iovs > 0 && !send_iov(fd, iov.data(), iovs)) return true;
      iovs = 0;
      replies[0] = r;
      answered = 1;
      const size_t buffered = std::min<size_t>(have - pos, req.length);
      const std::byte* whole = buf.data() + pos;  // where all of the payload lies once it is in
      if (buffered < req.length) {
        payload.resize(req.length);
        std::memcpy(payload.data(), buf.data() + pos, buffered);
        for (size_t got = buffered; got < req.length;) {
          const ssize_t m = ::recv(fd, payload.data() + got, req.length - got, 0);
          if (m < 0 && errno == EINTR) continue;
          if (m <= 0) {
            spdlog::warn("server: {} closed in the middle of a write to '{}' (offset {}, {} of {} bytes); none of it "
                         "was applied",
                         peer, region.name, req.offset, got, req.length);
            return false;
          }
          got += static_cast<size_t>(m);
        }
        whole = payload.data();
      }
      region.mark_written(req.offset, req.length);  // before the bytes: a map drawn meanwhile calls them written
      std::memcpy(region.writable_base + req.offset, whole, req.length);
      pos += buffered;
      replies[0].length = 0;
      iov[iovs++] = {&replies[0], sizeof replies[0]};
      ++writes_;
      bytes_written_ += req.length;
    }
    if (iovs > 0 && !send_iov(fd, iov.data(), iovs)) return true;
    if (refuse != Errc::kOk) {
      tcp::close_gracefully(fd);
      return false;
    }
    std::memmove(buf.data(), buf.data() + pos, have - pos);
    have -= pos;
  }
}

bool TcpServer::serve_control(int fd, const ExportedRegion& region, const std::string& peer) {
  for (;;) {
    wire::ControlRequest req{};
    errno = 0;  // an orderly close leaves it unset
    if (!tcp::recv_all(fd, &req, sizeof req)) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) ++idle_closed_;  // idle_timeout_ms passed
      return true;                                                  // the peer is done
    }
    if (req.magic != wire::kControlMagic) {
      spdlog::warn("server: {} sent a malformed control request (magic 0x{:08x}); dropping it", peer, req.magic);
      return false;
    }
    wire::ControlReply reply{wire::kControlMagic, static_cast<uint32_t>(Errc::kOk), 0, 0};
    LiveExport::Written written;
    std::string error;
    try {
      if (!region.live) {
        throw Error(Errc::kUnsupported, "'" + region.name + "' is not a live export: its writes are not tracked");
      }
      switch (static_cast<wire::ControlOp>(req.op)) {
        case wire::ControlOp::kWrittenSince:
          written = region.live->written_since(req.epoch);
          reply.epoch = written.epoch;
          break;
        case wire::ControlOp::kPause: reply.epoch = region.live->pause(); break;
        case wire::ControlOp::kResume: region.live->resume(); break;
        default: throw Error(Errc::kInvalidArgument, "unknown control request " + std::to_string(req.op));
      }
    } catch (const Error& e) {
      reply.status = static_cast<uint32_t>(e.code());
      error = e.what();
    } catch (const std::exception& e) {
      reply.status = static_cast<uint32_t>(Errc::kIo);
      error = e.what();
    }
    const void* payload = error.empty() ? static_cast<const void*>(written.pages.data()) : error.data();
    reply.payload_bytes = error.empty() ? written.pages.size() * sizeof(uint64_t) : error.size();
    if (!tcp::send_all(fd, &reply, sizeof reply) ||
        (reply.payload_bytes > 0 && !tcp::send_all(fd, payload, reply.payload_bytes))) {
      return true;
    }
  }
}

}  // namespace pagewire
