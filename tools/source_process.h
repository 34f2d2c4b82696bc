// A memory server in a child process, exporting pattern-filled memory: the
// demo's and the benchmark's source host. Fork it before starting threads.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "tools/cli_util.h"

namespace pagewire::cli {

class SourceProcess {
 public:
  explicit SourceProcess(const PatternSpec& spec);
  SourceProcess(const SourceProcess&) = delete;
  SourceProcess& operator=(const SourceProcess&) = delete;
  ~SourceProcess();

  uint16_t port() const { return port_; }
  pid_t pid() const { return pid_; }
  std::string uri() const;
  void kill_now();

 private:
  PatternSpec spec_;
  pid_t pid_ = -1;
  uint16_t port_ = 0;
};

// Serves every export until SIGINT/SIGTERM; writes the port number to
// ready_fd (if >= 0) once listening. The body of `pagewire serve`.
int serve_forever(const std::string& bind, uint16_t port, const std::vector<std::string>& files,
                  const std::vector<PatternSpec>& patterns, int ready_fd, bool quiet_stats);

}  // namespace pagewire::cli
