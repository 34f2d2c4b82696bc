// Destination side: attach a remote region and use it as ordinary memory.
//
//   auto region = pagewire::attach("tcp://10.0.0.2:7471/guest-ram");
//   std::memcpy(buf, region.data() + off, n);  // missing pages fetched on first touch
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "pagewire/error.h"
#include "pagewire/stats.h"

namespace pagewire {

class Transport;
class FaultEngine;

struct Progress;

// One precopy round, as the destination saw it.
struct PrecopyRound {
  unsigned round = 0;  // 1: every page; then the pages written since
  uint64_t pages = 0;  // pages this round moved
  uint64_t bytes = 0;  // bytes on the wire
  double seconds = 0;
  double written_pages_per_second = 0;  // the source's write rate meanwhile
};

// Live migration: precopy rounds while the source's owner keeps writing,
// a switchover, then postcopy (the background pull and demand faults).
struct PrecopyOptions {
  bool enabled = false;
  // Switch over once the pages written since the last round could move
  // within this time at the bandwidth the rounds measured.
  unsigned max_downtime_ms = 50;
  // Switch over after this many rounds however much is still written.
  unsigned max_rounds = 30;
  // Called after each round, and while a round runs every 200 ms with how
  // many pages are here (both from the attaching thread).
  std::function<void(const PrecopyRound&)> on_round{};
  std::function<void(const Progress&)> on_progress{};
};

// How a precopy migration went (Region::migration()).
struct MigrationReport {
  std::vector<PrecopyRound> rounds;
  // Why the rounds ended: "converged", "round limit", "writer outpaces the pull".
  std::string switched_because;
  uint64_t pages_written_at_switch = 0;  // discarded here at the switchover, left to postcopy
  double downtime_ms = 0;                // from asking the source to pause until attach returned
  double precopy_seconds = 0;            // attach until the switchover began
};

struct AttachOptions {
  // Handler threads, each with its own connection and staging buffers.
  // 0 picks one per online CPU, at most 4.
  unsigned handler_threads = 0;
  // Reads each handler keeps in flight at most.
  unsigned queue_depth = 32;
  // One userfaultfd per handler: the region is registered as that many
  // contiguous parts, each with a userfaultfd of its own that one handler
  // reads, so that faults in different parts never share a kernel wait
  // queue or a handler. Everything else (pull, prefetch, completion,
  // refusal, a bounded cache) works across the parts. See the README's
  // "Scaling" for the measurement behind the default.
  bool uffd_per_handler = false;
  // Polling, for handlers on cores of their own: each handler spins on its
  // userfaultfd and its connection's completions for up to this many
  // microseconds before it sleeps (0: it sleeps at once). It saves the
  // cross-CPU wake-up, about 20 us here, at the cost of a busy core.
  unsigned poll_us = 0;
  // A read not answered within this time counts as a dead connection.
  unsigned request_timeout_ms = 10000;
  // After a connection drops, how long to keep trying to reconnect before
  // the missing pages are refused (faulting threads get SIGBUS, or SIGSEGV
  // where the kernel lacks UFFDIO_POISON).
  unsigned reconnect_timeout_ms = 3000;
  // A file holding the secret this destination proves to the server (and
  // the server to it); empty: the file $PAGEWIRE_KEY_FILE names, if set,
  // else none. See ServerOptions::key_file.
  std::string key_file{};
  // CPU to pin handler threads to; -1 leaves placement to the scheduler.
  int handler_cpu = -1;
  // TCP: drive sockets through io_uring (falls back to plain syscalls by
  // itself where the kernel lacks it, and logs so); false forces syscalls.
  bool io_uring = true;

  // Postcopy: a background puller fetches every page still missing, in
  // runs of up to pull_run_pages (one read and one UFFDIO_COPY per run),
  // with at most pull_runs_in_flight runs outstanding, on a connection of
  // its own that the source serves behind the demand connections. When
  // every page is present the region is unregistered from userfaultfd and
  // is plain memory. Off: pure on-demand paging (far-memory use).
  bool background_pull = true;
  unsigned pull_run_pages = 64;  // at most 64
  unsigned pull_runs_in_flight = 4;
  // Fetch ahead of sequential and strided faulting streams, with a window
  // that doubles while the stream holds (up to prefetch_max_pages) and is
  // dropped when it breaks. Random access pays nothing for it.
  bool prefetch = true;
  unsigned prefetch_max_pages = 32;
  // Scheduling priority (nice) of the handler threads and of the puller.
  // Negative values need CAP_SYS_NICE. Measured here, raising the handlers
  // (-10) cost more in preemptions than it saved when faulting threads and
  // handlers share a CPU, so both default to the application's priority;
  // the source serves the pull's connection at low priority instead.
  // When the CPUs are saturated, a woken handler can wait behind the
  // puller's syscalls (a kernel without in-kernel preemption runs each to
  // its end); puller_nice = 19 usually takes much of that wait out of the
  // demand faults' tail, and the pull then waits behind everything else
  // and takes longer (`bench --suite postcopy` shows both, section 3).
  int handler_nice = 0;
  int puller_nice = 0;

  // The memory behind the region.
  //  kAnonymous: private anonymous memory. Reads land in staging buffers
  //    and pages go in with UFFDIO_COPY (one copy per page).
  //  kShared: shared memory (a memfd), mapped twice: the region the
  //    application touches, registered for minor (and missing) faults, and
  //    an alias that only pagewire writes through. Reads land in the alias,
  //    in the final page, and UFFDIO_CONTINUE maps it: no copy.
  enum class Memory { kAnonymous, kShared };
  Memory memory = Memory::kAnonymous;
  // 2 MiB pages from hugetlbfs (MAP_HUGETLB, or a hugetlbfs memfd when
  // shared). Faults fetch and install whole 2 MiB pages. They must be
  // reserved first (vm.nr_hugepages); attach says how many when they are not.
  bool huge_pages = false;
  // Shared memory only: back the region with this memfd (as a VMM hands over
  // guest RAM) instead of creating one. pagewire duplicates the descriptor;
  // the file must be at least the region's size (rounded up to the page
  // size, open read-write, not sealed against writes; it must not shrink
  // while attached), and a hugetlbfs memfd means 2 MiB pages. -1: create one.
  int memfd = -1;

  // Live migration from a source whose owner keeps writing (a live
  // export): attach returns after the switchover, when the source stands
  // still and every page here is either the source's at the pause or
  // missing (fetched on demand and by the pull). Needs background_pull.
  PrecopyOptions precopy{};

  // Far memory: keep at most this many bytes of the region resident here
  // (0: no limit). The region must come from a memory node, opened for
  // writing (pagewire::attach asks for the node's writer lease), in
  // anonymous 4 KiB pages; the background pull is off. A thread of its
  // own evicts from a high watermark (95% of the cache) down to a low one
  // (90%), off the fault path: a fault waits for it only while the cache
  // is full. Clean pages are dropped and fetched again on their next touch;
  // written pages are written back to the node first, and dropped only once
  // the node has acknowledged them (see Region::flush()).
  size_t cache_bytes = 0;
  // Which resident page goes first.
  //  kClock: a CLOCK over pages in the order they were faulted in, where a
  //    page earns another lap by what the kernel tells of its use: a write
  //    to it (a write-protect fault), or a fault on it soon after it was
  //    evicted (it was evicted too early).
  //  kFifo: the oldest page faulted in goes first.
  enum class Eviction { kClock, kFifo };
  Eviction eviction = Eviction::kClock;
};

// What Region::flush() saved.
struct FlushReport {
  uint64_t pages_written = 0;  // written back, and acknowledged by the node
  uint64_t pages_unsaved = 0;  // written here and not on the node (it failed); still resident
  std::string error;           // why pages are unsaved; empty when none are
  bool ok() const { return pages_unsaved == 0; }
};

// How far a region has arrived.
struct Progress {
  uint64_t pages_present = 0;
  uint64_t pages_total = 0;
  uint64_t bytes_transferred = 0;
  double seconds = 0;        // since attach
  double mb_per_second = 0;  // transferred bytes over that time
  bool complete = false;     // every page present; the region is plain memory
  bool failed = false;
};

// An attached region. Owns the mapping, the userfaultfd and the handler
// threads; destroying it stops the handlers (pending faults never see zeros:
// the region is made inaccessible first) and unmaps the memory.
class Region {
 public:
  Region(Region&&) noexcept;
  Region& operator=(Region&&) noexcept;
  ~Region();

  std::byte* data() const;
  size_t size() const;
  uint32_t page_size() const;
  const std::string& name() const;
  // Which transport serves this region ("tcp", "local", ...).
  std::string_view transport() const;
  Stats stats() const;
  Progress progress() const;
  // Waits until every page is present and the region is plain memory (true)
  // or the region failed or the timeout passed (false).
  bool wait_complete(std::chrono::milliseconds timeout) const;
  // True once a page could not be fetched and was refused; error() says why.
  bool failed() const;
  std::string error() const;
  // A region attached with precopy: its rounds and downtime (empty otherwise).
  const MigrationReport& migration() const;
  // A region with a bounded cache (AttachOptions::cache_bytes): writes
  // back every page written here and not yet on the node, and returns once
  // the node has acknowledged them all, or has failed (the report counts
  // what is not saved; those pages stay resident). Throws Error
  // (kInvalidArgument) for a region without a cache. Safe to call from any
  // thread, while other threads keep touching the region.
  FlushReport flush();

 private:
  friend Region attach(std::unique_ptr<Transport>, const AttachOptions&);
  explicit Region(std::unique_ptr<FaultEngine> engine);
  std::unique_ptr<FaultEngine> engine_;
};

// The handler threads attach starts when AttachOptions::handler_threads is
// 0: one per online CPU, at most 4.
unsigned default_handler_threads();

// Attach by URI: tcp://HOST:PORT/NAME. Throws pagewire::Error.
Region attach(std::string_view uri, const AttachOptions& options = {});
// Attach over an already connected transport (tests, custom transports).
Region attach(std::unique_ptr<Transport> transport, const AttachOptions& options = {});

}  // namespace pagewire
