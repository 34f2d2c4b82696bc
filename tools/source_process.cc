#include "tools/source_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <stdexcept>

#include "common/unique_fd.h"
#include "pagewire/server.h"
#include "spdlog/spdlog.h"
#include "tools/live_writer.h"
#include "tools/pattern.h"

namespace pagewire::cli {

int serve_forever(const std::string& bind, uint16_t port, const std::string& rdma,
                  const std::vector<std::string>& files, const std::vector<PatternSpec>& patterns, int ready_fd,
                  bool quiet_stats, const LiveSource& live, const std::vector<NodeSpec>& nodes,
                  const ServeLimits& access) {
  // Signals are taken synchronously by sigwait below, so block them before
  // the server's threads exist (they inherit the mask).
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  std::vector<Mapping> memory;
  for (const auto& p : patterns) {
    memory.push_back(Mapping::anonymous(p.size));
    fill_pattern(memory.back().data(), 0, p.size, p.seed);
  }
  ServerOptions o;
  o.bind_address = bind;
  o.port = port;
  o.key_file = access.key_file;
  o.idle_timeout_ms = access.idle_timeout_ms;
  if (rdma == "on") {
    o.rdma = RdmaServing::kOn;
  } else if (rdma == "off") {
    o.rdma = RdmaServing::kOff;
  } else if (rdma != "auto") {
    throw std::invalid_argument("--rdma must be auto, on or off");
  }
  // Writers go after the server (declared first): its threads may still
  // ask one to pause until the server has stopped.
  std::vector<std::unique_ptr<LiveWriter>> writers;
  MemoryServer server(o);
  if (!server.keyed() && !quiet_stats) {
    spdlog::warn("serving without a key: anyone who can reach port {} may read every region here{}{}; make one "
                 "with `pagewire keygen FILE` and give --key-file FILE to serve and to every destination",
                 server.port(), nodes.empty() ? "" : ", write its memory nodes",
                 live.live ? ", pause its writers" : "");
  }
  for (size_t i = 0; i < patterns.size(); ++i) {
    if (live.live) {
      // The writer runs from before the export: tracking starts with the
      // export, and what was written before is what destinations fetch.
      LiveWriter* writer = nullptr;
      if (live.writer_pages_per_second >= 0) {
        writers.push_back(std::make_unique<LiveWriter>(memory[i].data(), patterns[i].size, 4096, patterns[i].seed,
                                                       live.writer_pages_per_second, i + 1));
        writer = writers.back().get();
      }
      ExportOptions e;
      e.track_writes = true;
      e.tracking = live.tracking == "sync"    ? WriteTracking::kSync
                   : live.tracking == "async" ? WriteTracking::kAsync
                                              : WriteTracking::kAuto;
      // The server keeps serving while the writer stands still.
      e.pause_writers = [writer] {
        if (writer != nullptr) writer->pause();
      };
      e.resume_writers = [writer] {
        if (writer != nullptr) writer->resume();
      };
      server.export_memory(patterns[i].name, memory[i].data(), patterns[i].size, e);
      continue;
    }
    // The bytes follow from seed and size: a source restarted with the same
    // pattern serves the same region, and one with another does not.
    server.export_memory(patterns[i].name, memory[i].data(), patterns[i].size, 4096,
                         pattern_identity(patterns[i].seed, patterns[i].size));
  }
  for (const auto& f : files) {
    const size_t eq = f.find('=');
    if (eq == std::string::npos || eq == 0) throw std::invalid_argument("--file wants NAME=PATH, got '" + f + "'");
    server.export_file(f.substr(0, eq), f.substr(eq + 1));
  }
  for (const auto& n : nodes) server.export_node(n.name, n.size);
  if (ready_fd >= 0) {
    const std::string text = std::to_string(server.port()) + "\n";
    [[maybe_unused]] ssize_t w = ::write(ready_fd, text.data(), text.size());
    ::close(ready_fd);
  }
  int sig = 0;
  sigwait(&stop_signals, &sig);
  const ServerStats s = server.stats();
  server.stop();
  for (const auto& w : writers) {
    if (w && !quiet_stats)
      std::printf("writer: %llu pages written\n", static_cast<unsigned long long>(w->pages_written()));
  }
  if (!quiet_stats) {
    std::printf("served %llu reads (%s) on %llu connections; %llu refused, %llu connections dropped\n",
                static_cast<unsigned long long>(s.reads_served), format_bytes(s.bytes_served).c_str(),
                static_cast<unsigned long long>(s.connections_accepted),
                static_cast<unsigned long long>(s.reads_refused),
                static_cast<unsigned long long>(s.connections_dropped));
    if (s.peers_refused_key > 0 || s.connections_refused > 0 || s.connections_idle_closed > 0) {
      std::printf("refused %llu peers without the key and %llu connections over a limit; closed %llu idle\n",
                  static_cast<unsigned long long>(s.peers_refused_key),
                  static_cast<unsigned long long>(s.connections_refused),
                  static_cast<unsigned long long>(s.connections_idle_closed));
    }
    if (!nodes.empty()) {
      std::printf("applied %llu writes (%s) to memory nodes; %llu refused, %llu writers refused\n",
                  static_cast<unsigned long long>(s.writes_applied), format_bytes(s.bytes_written).c_str(),
                  static_cast<unsigned long long>(s.writes_refused),
                  static_cast<unsigned long long>(s.writers_refused));
    }
  }
  return 0;
}

SourceProcess::SourceProcess(const PatternSpec& spec, const std::string& bind_address, const std::string& rdma,
                             const LiveSource& live)
    : spec_(spec) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) throw_errno("pipe");
  std::fflush(nullptr);
  pid_ = ::fork();
  if (pid_ < 0) throw_errno("fork");
  if (pid_ == 0) {
    ::close(fds[0]);
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    int rc = 1;
    try {
      rc = serve_forever(bind_address, 0, rdma, {}, {spec}, fds[1], true, live);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "source: %s\n", e.what());
    }
    std::fflush(nullptr);
    ::_exit(rc);
  }
  ::close(fds[1]);
  char buf[16] = {};
  const ssize_t n = ::read(fds[0], buf, sizeof buf - 1);
  ::close(fds[0]);
  if (n <= 0) {
    kill_now();
    throw std::runtime_error("the source process did not start");
  }
  port_ = static_cast<uint16_t>(std::stoi(buf));
}

SourceProcess::~SourceProcess() { kill_now(); }

std::string SourceProcess::uri(const std::string& scheme, const std::string& addr) const {
  return scheme + "://" + addr + ":" + std::to_string(port_) + "/" + spec_.name;
}

void SourceProcess::kill_now() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGTERM);
  int status = 0;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
}

}  // namespace pagewire::cli
