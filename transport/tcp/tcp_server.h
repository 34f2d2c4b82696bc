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
#include <unordered_map>
#include <vector>

#include "pagewire/server.h"
#include "runtime/unique_fd.h"
#include "transport/zero_map.h"

namespace pagewire {

struct ExportedRegion {
  std::string name;
  const std::byte* base = nullptr;
  uint64_t length = 0;
  uint32_t page_size = 4096;
  uint32_t key = 0;
  uint64_t identity = 0;  // see MemoryServer::export_memory
  Mapping file_mapping;  // set for file-backed regions
  // Pages known to be zero. Updated in place under zero_map_mu when the
  // owner reports a change (the RDMA server has it registered for reads).
  ZeroMap zero_map;
  mutable std::mutex zero_map_mu;
};

class TcpServer {
 public:
  explicit TcpServer(const ServerOptions& options);
  TcpServer(const TcpServer&) = delete;
  TcpServer& operator=(const TcpServer&) = delete;
  ~TcpServer();

  const ExportedRegion& add(std::unique_ptr<ExportedRegion> region);
  // Takes a region just added out of reach again: no new destination finds
  // it (the memory stays until the server goes).
  void withdraw(const std::string& name);
  ExportedRegion* find_mutable(const std::string& name);
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
  const ExportedRegion* find(const std::string& name) const;
  void reap_finished();

  ServerOptions options_;
  UniqueFd listen_fd_;
  UniqueFd stop_fd_;
  uint16_t port_ = 0;

  mutable std::mutex mu_;
  std::vector<std::unique_ptr<ExportedRegion>> regions_;  // index = key
  std::unordered_map<std::string, uint32_t> by_name_;
  std::list<Connection> connections_;
  bool stopping_ = false;

  std::atomic<uint64_t> accepted_{0};
  std::atomic<uint64_t> active_{0};
  std::atomic<uint64_t> dropped_{0};
  std::atomic<uint64_t> reads_{0};
  std::atomic<uint64_t> bytes_{0};
  std::atomic<uint64_t> refused_{0};

  std::thread accept_thread_;  // last: started once everything above exists
};

}  // namespace pagewire
