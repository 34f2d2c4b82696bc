// The page-fault handler daemon: one thread per connection, each serving
// one process's faults with an engine and a source connection of its own.
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <list>
#include <mutex>
#include <thread>

#include "common/auth.h"
#include "pagewire/error.h"
#include "pagewire/handler.h"
#include "runtime/fault_engine.h"
#include "runtime/handshake.h"
#include "spdlog/spdlog.h"
#include "transport/transport.h"
#include "transport/uri.h"

namespace pagewire {
namespace {

UniqueFd open_pidfd(pid_t pid) {
  const long fd = ::syscall(SYS_pidfd_open, pid, 0);
  if (fd < 0) {
    throw Error(errno == ESRCH ? Errc::kClosed : Errc::kUnsupported,
                "pidfd_open of process " + std::to_string(pid) + ": " + std::strerror(errno));
  }
  return UniqueFd(static_cast<int>(fd));
}

// Waits until the process exits or stop_fd is readable; true: it exited.
bool wait_for_exit(int pidfd, int stop_fd) {
  for (;;) {
    pollfd p[2] = {{pidfd, POLLIN, 0}, {stop_fd, POLLIN, 0}};
    const int n = ::poll(p, stop_fd >= 0 ? 2 : 1, -1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw_errno("poll of the served process");
    if ((p[0].revents & POLLIN) != 0) return true;
    if (stop_fd >= 0 && p[1].revents != 0) return false;
  }
}

ForeignMemory foreign_memory(const std::vector<GuestMapping>& mappings, HandshakeFds fds, pid_t pid, int pidfd) {
  ForeignMemory f;
  f.uffd = std::move(fds.uffd);
  f.memfd = std::move(fds.memfd);
  f.pid = pid;
  f.pidfd = pidfd;
  f.page_size = static_cast<uint32_t>(mappings.front().page_size);
  for (const GuestMapping& g : mappings) {
    f.segments.push_back({static_cast<uintptr_t>(g.base_host_virt_addr), g.offset / g.page_size, g.size / g.page_size});
  }
  return f;
}

uint64_t total_bytes(const std::vector<GuestMapping>& mappings) {
  uint64_t b = 0;
  for (const GuestMapping& g : mappings) b += g.size;
  return b;
}

}  // namespace

HandlerReport serve_handler_connection(int conn_fd, const std::string& source_uri, const HandlerOptions& options,
                                       int stop_fd) {
  UniqueFd conn(conn_fd);
  HandlerReport r;
  try {
    const PeerCredentials peer = peer_credentials(conn.get());
    r.pid = peer.pid;
    r.uid = peer.uid;
    spdlog::info("handler: connection from pid {} (uid {}, gid {})", peer.pid, peer.uid, peer.gid);
    // At once: from here on this names that process, whatever its pid
    // comes to name after it exits (its exit, and any signal sent to it, go
    // through this).
    UniqueFd pidfd = open_pidfd(peer.pid);
    HandshakeFds fds;
    const std::string body = receive_handshake(conn.get(), options, &fds, stop_fd);
    r.mappings = parse_guest_mappings(body);
    if (!fds.uffd) throw Error(Errc::kInvalidArgument, "handshake: no userfaultfd came with it (SCM_RIGHTS)");
    check_userfaultfd(fds.uffd.get());
    check_guest_memory(peer.pid, r.mappings, fds.memfd.get());
    TransportOptions t{options.attach.request_timeout_ms, options.attach.reconnect_timeout_ms, options.attach.io_uring};
    t.key = AuthKey::from_option(options.attach.key_file);
    FaultEngine engine(connect_transport(source_uri, t), options.attach,
                       foreign_memory(r.mappings, std::move(fds), peer.pid, pidfd.get()));
    r.served = true;
    if (options.on_serving) options.on_serving(peer.pid);
    spdlog::info("handler: serving pid {}: {} mappings, {} MiB in {} KiB pages, from {} over {}", peer.pid,
                 r.mappings.size(), total_bytes(r.mappings) >> 20, r.mappings.front().page_size >> 10, source_uri,
                 engine.transport_name());
    const bool exited = wait_for_exit(pidfd.get(), stop_fd);
    r.stats = engine.stats();
    r.complete = r.stats.complete;
    if (engine.failed()) {
      r.error = engine.error();
      r.code = Errc::kIo;
    }
    spdlog::info("handler: pid {} {}: {} faults, {} pages fetched, {} zero pages, {} of {} pages present{}{}", peer.pid,
                 exited ? "exited" : "is no longer served (the handler stops)", r.stats.faults, r.stats.pages_fetched,
                 r.stats.pages_zero, r.stats.pages_present, r.stats.pages_total, r.error.empty() ? "" : "; ", r.error);
  } catch (const Error& e) {
    r.error = e.what();
    r.code = e.code();
    spdlog::error("handler: pid {}: {}{}", r.pid, r.served ? "" : "refused: ", r.error);
  } catch (const std::exception& e) {
    r.error = e.what();
    r.code = Errc::kIo;
    spdlog::error("handler: pid {}: {}{}", r.pid, r.served ? "" : "refused: ", r.error);
  }
  return r;
}

struct HandlerServer::State {
  struct Connection {
    std::thread thread;
    std::atomic<bool> done{false};
  };
  HandlerOptions options;
  std::vector<Listener> listeners;
  std::vector<UniqueFd> sockets;
  UniqueFd stop{::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)};
  std::thread acceptor;
  mutable std::mutex mu;
  std::list<Connection> connections;    // guarded by mu
  std::vector<HandlerReport> finished;  // guarded by mu
  bool stopped = false;

  void accept_loop();
  void reap();
};

namespace {

UniqueFd listen_unix(const std::string& path) {
  sockaddr_un addr{};
  if (path.empty() || path.size() >= sizeof addr.sun_path) {
    throw Error(Errc::kInvalidArgument, "socket path '" + path + "' is empty or longer than " +
                                            std::to_string(sizeof addr.sun_path - 1) + " bytes");
  }
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      throw Error(Errc::kInvalidArgument, "'" + path + "' exists and is not a socket: not replacing it");
    }
    ::unlink(path.c_str());
  }
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) throw_errno("socket(AF_UNIX)");
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size());
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
    throw Error(Errc::kInvalidArgument, "cannot bind '" + path + "': " + std::strerror(errno));
  }
  if (::listen(fd.get(), 64) != 0) throw_errno("listen on '" + path + "'");
  return fd;
}

}  // namespace

HandlerServer::HandlerServer(std::vector<Listener> listeners, HandlerOptions options)
    : state_(std::make_unique<State>()) {
  if (!state_->stop) throw_errno("eventfd");
  if (listeners.empty()) throw Error(Errc::kInvalidArgument, "a handler needs at least one socket to listen on");
  state_->options = std::move(options);
  for (const Listener& l : listeners) {
    parse_region_uri(l.source_uri);  // a bad one is refused now, not at the first connection
    state_->sockets.push_back(listen_unix(l.socket_path));
    spdlog::info("handler: listening on {} for processes to serve from {}", l.socket_path, l.source_uri);
  }
  state_->listeners = std::move(listeners);
  state_->acceptor = std::thread([s = state_.get()] { s->accept_loop(); });
}

HandlerServer::~HandlerServer() { stop(); }

void HandlerServer::stop() {
  {
    std::lock_guard lock(state_->mu);
    if (state_->stopped) return;
    state_->stopped = true;
  }
  uint64_t one = 1;
  [[maybe_unused]] const ssize_t w = ::write(state_->stop.get(), &one, sizeof one);
  if (state_->acceptor.joinable()) state_->acceptor.join();
  // No new connection now: the list only shrinks.
  for (auto& c : state_->connections) {
    if (c.thread.joinable()) c.thread.join();
  }
  std::lock_guard lock(state_->mu);
  state_->connections.clear();
  for (const Listener& l : state_->listeners) ::unlink(l.socket_path.c_str());
}

size_t HandlerServer::active() const {
  std::lock_guard lock(state_->mu);
  size_t n = 0;
  for (const auto& c : state_->connections) n += c.done.load() ? 0 : 1;
  return n;
}

std::vector<HandlerReport> HandlerServer::finished() const {
  std::lock_guard lock(state_->mu);
  return state_->finished;
}

void HandlerServer::State::reap() {
  std::lock_guard lock(mu);
  for (auto it = connections.begin(); it != connections.end();) {
    if (!it->done.load()) {
      ++it;
      continue;
    }
    it->thread.join();
    it = connections.erase(it);
  }
}

void HandlerServer::State::accept_loop() {
  std::vector<pollfd> fds;
  for (const UniqueFd& s : sockets) fds.push_back({s.get(), POLLIN, 0});
  fds.push_back({stop.get(), POLLIN, 0});
  for (;;) {
    // Every second at least, the threads of connections that ended are joined.
    const int n = ::poll(fds.data(), fds.size(), 1000);
    reap();
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      spdlog::error("handler: poll: {}; no longer accepting", std::strerror(errno));
      return;
    }
    if (fds.back().revents != 0) return;
    for (size_t i = 0; i + 1 < fds.size(); ++i) {
      if ((fds[i].revents & POLLIN) == 0) continue;
      const int conn = ::accept4(fds[i].fd, nullptr, nullptr, SOCK_CLOEXEC);
      if (conn < 0) {
        if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED) {
          spdlog::warn("handler: accept on {}: {}", listeners[i].socket_path, std::strerror(errno));
        }
        continue;
      }
      std::lock_guard lock(mu);
      Connection& c = connections.emplace_back();
      try {
        c.thread = std::thread([this, &c, conn, source = listeners[i].source_uri] {
          HandlerReport r = serve_handler_connection(conn, source, options, stop.get());
          std::lock_guard inner(mu);
          // The last 1024 only: a daemon may serve processes for months.
          if (finished.size() == 1024) finished.erase(finished.begin());
          finished.push_back(std::move(r));
          c.done.store(true);
        });
      } catch (const std::exception& e) {
        spdlog::error("handler: no thread for a connection on {}: {}; closed", listeners[i].socket_path, e.what());
        ::close(conn);
        connections.pop_back();
      }
    }
  }
}

}  // namespace pagewire
