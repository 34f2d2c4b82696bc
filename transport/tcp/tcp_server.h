// The TCP side of the memory server: an accept thread and one thread per
// destination connection. Replies are written with sendmsg straight from
// the region's memory; no copy on the source side.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/auth.h"
#include "common/unique_fd.h"
#include "pagewire/server.h"
#include "transport/export_table.h"
#include "transport/tickets.h"

namespace pagewire {

class TcpServer {
 public:
  // Serves the regions of `exports`, which outlives the server. With a
  // `key`, only to peers that prove they hold it.
  // Tickets for RDMA connects are issued from `tickets`, which outlives it.
  TcpServer(const ServerOptions& options, const ExportTable& exports, std::shared_ptr<const AuthKey> key,
            TicketBook& tickets);
  TcpServer(const TcpServer&) = delete;
  TcpServer& operator=(const TcpServer&) = delete;
  ~TcpServer();

  uint16_t port() const { return port_; }
  ServerStats stats() const;
  void drop_connections();
  void stop();

 private:
  struct Connection {
    std::thread thread;
    int fd = -1;  // owned by the thread; registered here for shutdown
    std::atomic<bool> done{false};
    std::string addr;  // the peer's address, without its port
  };
  // Connections from one address, in the handshake and past it.
  struct PeerLoad {
    unsigned handshakes = 0;
    unsigned established = 0;
  };
  using Clock = std::chrono::steady_clock;

  void accept_loop();
  void serve(Connection* conn, UniqueFd fd, std::string peer);
  // The challenge and response after the hello (see protocol.h): false
  // when the peer went away or, with a key, failed to prove it (then it
  // has been told, and logged).
  bool authenticate(int fd, const std::string& name, uint8_t flags, uint64_t lease, const std::string& peer,
                    Clock::time_point deadline);
  bool prove_peer(int fd, const std::string& name, uint8_t flags, uint64_t lease, const std::string& peer,
                  Clock::time_point deadline);
  // The limits (ServerOptions): whether a connection from `addr` may start
  // its handshake (counted if so), and whether one that finished it may
  // stay (moved from the handshakes to the established if so). Under mu_.
  bool admit_locked(const std::string& addr);
  bool establish(const std::string& addr);
  // Uncounts a connection that ends, in whichever state it was.
  void release(const std::string& addr, bool established);
  // Logs a refusal for a limit, at most once a second (a flood of them
  // must not flood the log).
  void log_refusal_locked(const std::string& peer, const std::string& why);
  // A control connection: questions about a live export, one at a time.
  // Returns false when the peer broke the protocol.
  bool serve_control(int fd, const ExportedRegion& region, const std::string& peer);
  // Reads and writes until the peer closes (false: it broke the protocol and
  // was dropped). `writer`: the connection holds the region's writer lease.
  bool serve_requests(int fd, const ExportedRegion& region, bool writer, const std::string& peer);
  void reap_finished();

  ServerOptions options_;
  const ExportTable& exports_;
  std::shared_ptr<const AuthKey> key_;
  TicketBook& tickets_;
  UniqueFd listen_fd_;
  UniqueFd stop_fd_;
  uint16_t port_ = 0;

  mutable std::mutex mu_;  // guards connections_, stopping_ and the counts below
  std::list<Connection> connections_;
  bool stopping_ = false;
  std::map<std::string, PeerLoad> peers_;  // only addresses with a connection
  unsigned handshakes_ = 0;
  unsigned established_ = 0;
  Clock::time_point last_refusal_log_{};
  uint64_t refusals_unlogged_ = 0;

  std::atomic<uint64_t> accepted_{0};
  std::atomic<uint64_t> active_{0};
  std::atomic<uint64_t> dropped_{0};
  std::atomic<uint64_t> reads_{0};
  std::atomic<uint64_t> bytes_{0};
  std::atomic<uint64_t> refused_{0};
  std::atomic<uint64_t> writes_{0};
  std::atomic<uint64_t> bytes_written_{0};
  std::atomic<uint64_t> writes_refused_{0};
  std::atomic<uint64_t> writers_refused_{0};
  std::atomic<uint64_t> auth_refused_{0};
  std::atomic<uint64_t> limit_refused_{0};
  std::atomic<uint64_t> idle_closed_{0};

  std::thread accept_thread_;  // last: started once everything above exists
};

}  // namespace pagewire
