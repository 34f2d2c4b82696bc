// pagewire as another process's page-fault handler. A VMM (Firecracker
// restoring a snapshot, say) creates the userfaultfd for its guest memory
// itself, registers the memory, and hands the userfaultfd over a Unix
// socket together with a JSON array of its guest memory mappings (the
// handshake). pagewire then serves that process's faults from a source,
// with the same engine as an attached region: handlers, prefetch, the pull,
// zero pages, refusal instead of zeros. The memory stays the other
// process's: pages go in through its userfaultfd.
//
// The handshake, one message on a connected SOCK_STREAM Unix socket:
//   [{"base_host_virt_addr": 140001234567168, "size": 268435456,
//     "offset": 0, "page_size": 4096, "page_size_kib": 4096}, ...]
// with the userfaultfd as SCM_RIGHTS. `offset` is where the mapping's
// bytes start in the source region; `page_size_kib`, deprecated, holds
// bytes despite its name and is taken when `page_size` is absent.
//
// Shared memory: a second descriptor in the same message, the memfd the
// mappings map (MAP_SHARED, each at memfd offset `offset`, untouched yet),
// sealed against shrinking and registered for minor and missing faults.
// Reads land in the memfd (mapped here too) and UFFDIO_CONTINUE maps them
// there, with no copy. Mappings are checked against the process's own
// (/proc/PID/smaps) before anything is served; where those cannot be read,
// anonymous memory is served on the handshake's word and shared memory is
// refused.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "pagewire/error.h"
#include "pagewire/region.h"
#include "pagewire/stats.h"

namespace pagewire {

struct GuestMapping {
  uint64_t base_host_virt_addr = 0;
  uint64_t size = 0;
  uint64_t offset = 0;     // in the source region
  uint64_t page_size = 0;  // bytes: 4096 or 2 MiB
};

// Parses and checks the handshake's JSON: a non-empty array of mappings,
// each aligned to its page size, all of one page size, none overlapping
// another in memory or in the source. Throws Error(kInvalidArgument)
// naming what is wrong.
std::vector<GuestMapping> parse_guest_mappings(std::string_view json);

struct HandlerOptions {
  // How the faults are served (handler threads, prefetch, the pull, queue
  // depth, timeouts, key_file). Memory is the other process's, as it
  // mapped it (anonymous, or shared from the memfd it sent; `memory` must be
  // left kAnonymous), with no bounded cache and no precopy.
  AttachOptions attach{};
  // How long a connection may take to send its handshake.
  unsigned handshake_timeout_ms = 5000;
  // The most a handshake may hold (a guard against a peer that never ends
  // one, far above any real VMM's: 64 bytes of JSON per mapping or so).
  size_t max_handshake_bytes = 16u << 20;
  // Called with the process's pid once its faults are being served.
  std::function<void(pid_t)> on_serving{};
};

// One connection's end.
struct HandlerReport {
  pid_t pid = 0;  // the peer (SO_PEERCRED)
  uid_t uid = 0;
  std::vector<GuestMapping> mappings{};
  bool served = false;    // the handshake was taken and faults served
  bool complete = false;  // every page arrived
  std::string error{};    // why the handshake was refused, or what failed
  Errc code = Errc::kOk;  // and its code
  Stats stats{};
};

// Serves one connection (the per-connection entry point): receives the
// handshake, connects to `source_uri` for this process alone, serves its
// faults, and returns once the process has exited or `stop_fd` (an eventfd
// or pipe; -1: none) becomes readable. Pages not yet served when it stops
// early are refused (poisoned; where the kernel cannot poison another
// process's pages, the process is killed rather than let read zeros).
// Never throws: what went wrong is in the report, and logged. Closes
// `conn_fd`.
HandlerReport serve_handler_connection(int conn_fd, const std::string& source_uri, const HandlerOptions& options,
                                       int stop_fd = -1);

// The daemon: listens on Unix sockets, each with the source its
// connections are served from, and serves every connection on a thread of
// its own, so that one daemon serves several VMs at once, each with its own
// connection to its source, and one that exits or fails disturbs none of
// the others.
class HandlerServer {
 public:
  struct Listener {
    std::string socket_path;  // an existing socket file there is replaced
    std::string source_uri;
  };
  // Throws Error when a socket cannot be bound.
  HandlerServer(std::vector<Listener> listeners, HandlerOptions options);
  HandlerServer(const HandlerServer&) = delete;
  HandlerServer& operator=(const HandlerServer&) = delete;
  // stop(), then waits for every connection's handler.
  ~HandlerServer();

  // Ends every connection (see serve_handler_connection) and stops
  // accepting; the socket files are removed.
  void stop();
  size_t active() const;
  // Reports of the connections that have ended, oldest first.
  std::vector<HandlerReport> finished() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace pagewire
