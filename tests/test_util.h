// Helpers shared by the test suites.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/auth.h"
#include "common/unique_fd.h"
#include "pagewire/pagewire.h"
#include "tools/signals.h"
#include "transport/protocol.h"

namespace pagewire::testing {

inline constexpr uint64_t kSeed = 0x5eed;

// Pure demand paging (no background pull, no prefetch): what tests that
// count fetches exactly attach with.
inline AttachOptions on_demand(unsigned handlers = 0) {
  AttachOptions o;
  o.handler_threads = handlers;
  o.background_pull = false;
  o.prefetch = false;
  return o;
}

// A memory backing a parameterised test runs on, with the pull on or off.
struct BackingMode {
  const char* name;
  AttachOptions::Memory memory;
  bool huge;
  bool pull;
  // `o` with this backing and pull setting.
  AttachOptions apply(AttachOptions o) const {
    o.memory = memory;
    o.huge_pages = huge;
    o.background_pull = pull;
    return o;
  }
};

using cli::run_catching_signals;

// Reads one byte of each page through a volatile pointer: a real first touch.
inline uint8_t touch(const std::byte* p) {
  return static_cast<uint8_t>(*reinterpret_cast<const volatile std::byte*>(p));
}

// Each of `threads` threads checks its share of `pages` (page numbers, in
// visiting order) byte for byte; returns how many pages differ.
size_t verify_pages(const Region& r, const std::vector<size_t>& pages, int threads);

// `threads` threads, released together, each read a different part of
// page `page`: one fault storm on one page. Returns the parts that read wrong.
size_t stampede(const Region& r, size_t page, int threads);

// The code of the pagewire::Error that attaching `uri` throws (kOk when it
// attaches), with its message in *what.
Errc attach_error(const std::string& uri, std::string* what = nullptr, unsigned reconnect_timeout_ms = 500);

// Faulting threads walk random pages, verifying each, until a signal stops
// them (the source died) or they have made as many touches as there are
// pages.
struct Walk {
  std::vector<int> signals;  // per thread: SIGBUS, SIGSEGV, or 0
  size_t wrong = 0;
  size_t good = 0;
};
Walk walk_until_stopped(const Region& r, int threads);

// A server on a free loopback TCP port, RDMA off; and the URI of one of
// its exports.
ServerOptions loopback_tcp();
std::string loopback_uri(const MemoryServer& server, const std::string& name);

// Makes sure `pages` 2 MiB huge pages are free and not claimed by another
// mapping, reserving more as root (vm.nr_hugepages); returns why not when
// it cannot, for GTEST_SKIP.
std::string reserve_huge_pages(uint64_t pages);

// In the guest's binary (pagewire_rdma_tests), where an RDMA device is
// bound to PAGEWIRE_RDMA_ADDR: that address; "" on the host, where the
// suites that use it run over loopback TCP instead.
std::string guest_rdma_addr();

// Memory filled with the pattern, served by an in-process MemoryServer on a
// free loopback port.
class PatternServer {
 public:
  PatternServer(const std::string& name, size_t length, uint64_t seed = kSeed);
  PatternServer(const std::string& name, size_t length, uint64_t seed, const ServerOptions& options);
  std::string uri() const;
  MemoryServer& server() { return *server_; }
  const std::byte* source() const { return memory_.data(); }

 private:
  std::string name_;
  Mapping memory_;
  std::unique_ptr<MemoryServer> server_;
};

// `pagewire serve` run as a separate process, so it can be killed.
class ChildServer {
 public:
  // port 0 picks a free one; another takes the port a killed source had.
  explicit ChildServer(const std::vector<std::string>& args, const std::string& bind = "127.0.0.1", uint16_t port = 0);
  ~ChildServer();
  uint16_t port() const { return port_; }
  void kill_now();  // SIGKILL, and reap

 private:
  pid_t pid_ = -1;
  uint16_t port_ = 0;
};

// After connections were cut while `walk` ran: no wrong page, no refused
// one, at least one reconnect, and every byte of r right.
void expect_reconnected_losing_nothing(const Region& r, const Walk& walk);

// After the source was restarted with other bytes: nothing wrong was read,
// the region failed and says why, and the threads were refused.
void expect_refused_as_another_region(const Region& r, const Walk& walk);

// A `pagewire serve` child (serve_args) is killed once `kill_after_pages`
// pages have arrived, and another (successor_args) is started on its port,
// while two threads fault; check then sees the region and what the threads
// saw.
void restart_source(const std::vector<std::string>& serve_args, const std::vector<std::string>& successor_args,
                    const std::string& bind, const std::function<std::string(uint16_t)>& uri_of, AttachOptions o,
                    uint64_t kill_after_pages, const std::function<void(const Region&, const Walk&)>& check);

// A listener that accepts, answers the hello for one region, and then
// never answers a read: a peer that went silent.
// A hello by hand, for tests that speak the wire protocol themselves:
// sends the hello (with `lease` after the name when flags has
// wire::kHelloLease) and this side's nonce, answers the challenge (proving
// `key` when given, else with zeros) and reads the HelloReply into *reply.
// False when the server went away before it replied.
bool raw_hello(int fd, const std::string& name, uint8_t flags, wire::HelloReply* reply, const AuthKey* key = nullptr,
               uint64_t lease = 0);

// A key file (ServerOptions::key_file) in a fresh directory of its own,
// mode 0600 unless told; removed at the end.
class KeyFile {
 public:
  explicit KeyFile(const std::string& contents, mode_t mode = 0600);
  ~KeyFile();
  KeyFile(const KeyFile&) = delete;
  KeyFile& operator=(const KeyFile&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string dir_;
  std::string path_;
};

// Whether the peer of a socket closed it: a read finds the end, or a
// reset; a signal is no answer (the read goes on), nor is the timeout.
bool closed_by_peer(int fd);

class SilentServer {
 public:
  SilentServer(const std::string& name, uint64_t length);
  ~SilentServer();
  uint16_t port() const { return port_; }

 private:
  UniqueFd listen_fd_;
  UniqueFd stop_fd_;
  uint16_t port_ = 0;
  std::string name_;
  uint64_t length_;
  std::vector<int> accepted_;
  std::unique_ptr<std::thread> thread_;
};

}  // namespace pagewire::testing
