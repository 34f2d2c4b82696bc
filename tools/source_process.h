// A memory server in a child process, exporting pattern-filled memory: the
// demo's and the benchmark's source host. Fork it before starting threads.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "tools/cli_util.h"

namespace pagewire::cli {

// A source whose owner keeps writing: each pattern region gets a writer
// thread, and is exported live (writes tracked, the writer paused at a
// migration's switchover).
// Who may connect to `pagewire serve`, and for how long (ServerOptions).
struct ServeLimits {
  std::string key_file;
  unsigned idle_timeout_ms = 15 * 60 * 1000;
};

struct LiveSource {
  bool live = false;                    // exported live (writes tracked, a pause at switchover)
  double writer_pages_per_second = -1;  // with live: < 0 no writer; 0 as fast as it can
  std::string tracking = "auto";        // auto, async or sync
};

class SourceProcess {
 public:
  // Serves on bind_address (loopback by default); rdma as in ServerOptions.
  explicit SourceProcess(const PatternSpec& spec, const std::string& bind_address = "127.0.0.1",
                         const std::string& rdma = "off", const LiveSource& live = {});
  SourceProcess(const SourceProcess&) = delete;
  SourceProcess& operator=(const SourceProcess&) = delete;
  ~SourceProcess();

  uint16_t port() const { return port_; }
  pid_t pid() const { return pid_; }
  // SCHEME://ADDR:PORT/NAME, where ADDR is how destinations reach it.
  std::string uri(const std::string& scheme = "tcp", const std::string& addr = "127.0.0.1") const;
  void kill_now();

 private:
  PatternSpec spec_;
  pid_t pid_ = -1;
  uint16_t port_ = 0;
};

// Serves every export until SIGINT/SIGTERM; writes the port number to
// ready_fd (if >= 0) once listening. The body of `pagewire serve`.
// rdma: "auto", "on" or "off" (see ServerOptions::rdma). `nodes`: memory
// nodes, fresh zeroed memory destinations may write (MemoryServer::export_node).
// access: who may connect (serving without a key is warned of unless
// quiet_stats).
int serve_forever(const std::string& bind, uint16_t port, const std::string& rdma,
                  const std::vector<std::string>& files, const std::vector<PatternSpec>& patterns, int ready_fd,
                  bool quiet_stats, const LiveSource& live = {}, const std::vector<NodeSpec>& nodes = {},
                  const ServeLimits& access = {});

}  // namespace pagewire::cli
