// The TCP side of the memory server: an accept thread and one thread per
// destination connection. Replies are written with sendmsg straight from
// the region's memory; no copy on the source side.
#pragma once

#include <atomic>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/unique_fd.h"
#include "pagewire/server.h"
#include "transport/export_table.h"

namespace pagewire {

class TcpServer {
 public:
  // Serves the regions of `exports`, which outlives the server.
  TcpServer(const ServerOptions& options, const ExportTable& exports);
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
  };

  void accept_loop();
  void serve(Connection* conn, UniqueFd fd, std::string peer);
  // A control connection: questions about a live export, one at a time.
  // Returns false when the peer broke the protocol.
  bool serve_control(int fd, const ExportedRegion& region, const std::string& peer);
  // Reads and writes until the peer closes (false: it broke the protocol and
  // was dropped). `writer`: the connection holds the region's writer lease.
  bool serve_requests(int fd, const ExportedRegion& region, bool writer, const std::string& peer);
  void reap_finished();

  ServerOptions options_;
  const ExportTable& exports_;
  UniqueFd listen_fd_;
  UniqueFd stop_fd_;
  uint16_t port_ = 0;

  mutable std::mutex mu_;  // guards connections_ and stopping_
  std::list<Connection> connections_;
  bool stopping_ = false;

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

  std::thread accept_thread_;  // last: started once everything above exists
};

}  // namespace pagewire
