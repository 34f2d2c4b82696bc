// The destination side's core: the region's mapping, its userfaultfd, the
// page-state table, the handler threads that serve faults, and the
// background puller.
//
// Per fault: a handler reads the event, claims the page in the page table,
// posts a read into one of its staging slots (plus reads ahead of a
// detected stream), and when the read completes installs the page with
// UFFDIO_COPY, which wakes every thread parked on it. Pages known to be
// zero are installed with UFFDIO_ZEROPAGE and never read. The puller
// claims missing pages in runs through the same table, so each page is
// fetched once whoever asks first.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "pagewire/region.h"
#include "runtime/backing.h"
#include "runtime/metrics.h"
#include "runtime/page_table.h"
#include "runtime/prefetch.h"
#include "runtime/uffd.h"
#include "runtime/unique_fd.h"
#include "transport/transport.h"

namespace pagewire {

class FaultEngine {
 public:
  FaultEngine(std::unique_ptr<Transport> transport, const AttachOptions& options);
  FaultEngine(const FaultEngine&) = delete;
  FaultEngine& operator=(const FaultEngine&) = delete;
  ~FaultEngine();

  std::byte* data() const { return backing_.view.data(); }
  size_t size() const { return desc_.length; }
  uint32_t page_size() const { return desc_.page_size; }
  const std::string& name() const { return desc_.name; }
  std::string_view transport_name() const { return transport_->name(); }
  Stats stats() const;
  Progress progress() const;
  bool wait_complete(std::chrono::milliseconds timeout) const;
  bool failed() const { return failed_.load(); }
  std::string error() const;

 private:
  friend class FaultEngineTestPeer;
  // A thread with its own channel and staging slots: a fault handler or
  // the puller. Each slot holds one read: a run of pages.
  struct Worker;
  // kOvertake: a fault's own read of one page that a pull run already has
  // out, which it installs if it gets there first (it owns no page).
  enum class ReadKind : uint8_t { kDemand, kPrefetch, kPull, kOvertake };
  // What a handler does about a fault it read.
  enum class Take : uint8_t { kFetch, kOvertake, kNothing };

  void run_handler(Worker& w);
  void run_puller(Worker& w);
  void read_faults(Worker& w);
  // Claims and queues the pages a prefetch plan names.
  void prefetch(Worker& w, uint32_t thread_id, size_t page, uint32_t reserved);
  // Queues a read of `pages` claimed pages starting at `first`.
  // `owned` marks the pages of the run this read installs (0: all of them).
  // `first_part` (a byte offset into a one-page read) is read first and the
  // rest after: the faulting 4 KiB of a 2 MiB page goes out first.
  void queue_read(Worker& w, size_t first, uint32_t pages, ReadKind kind, uint64_t start_ns, uint64_t owned = 0,
                  uint32_t first_part = 0);
  // Where a read of pages from `first` lands: the slot's staging buffer, or
  // with shared memory the final pages themselves (through the alias).
  std::byte* landing(Worker& w, uint32_t slot, size_t first) const;
  // Installs [page, page+count) from where their read landed; 0 or errno.
  int install(Worker& w, std::byte* src, size_t page, uint32_t count, uint64_t* retries, uint64_t* existed);
  // Anonymous memory: whether the page's first 4 KiB is mapped or swapped
  // out (pagemap; mincore, which calls a swapped page absent, without it).
  bool resident(size_t page) const;
  // Shared memory: whether the memfd still holds the page (rather than a
  // hole punched into it with MADV_REMOVE or fallocate).
  bool memfd_holds(size_t page) const;
  // Whether the page is still there: resident() or memfd_holds().
  bool holds(size_t page) const;
  // Per page: holds(), for the whole region at once. Empty when it cannot
  // be told.
  std::vector<bool> held_pages() const;
  // Claims a run of missing pages from `first` (at most `max` pages).
  uint32_t claim_run(size_t first, uint32_t max);
  // Installs claimed zero pages without a transfer.
  void install_zero(Worker& w, size_t page);
  void complete(Worker& w, const ReadCompletion& c);
  void mark_present(size_t pages);
  // Records installed pages present, counts them, and only then wakes the
  // threads parked on them (installs never wake by themselves).
  void publish(size_t first, uint32_t count);
  void refuse_page(Worker& w, size_t page, Errc why, const std::string& text);
  // kFetch: the handler that read a fault on `page` now owns the page and
  // must fetch it. kOvertake: the page is out in a pull run, which the fault
  // must not wait behind; the handler reads it again on its own channel.
  // kNothing: the fault is a duplicate and has been dealt with (left to the
  // page's owner, woken, or refused).
  Take take_fault(size_t page);
  // Installs what an overtaking read brought, unless the pull got there
  // first, and wakes the faulting threads.
  void finish_overtake(Worker& w, std::byte* src, size_t page);
  // True when a page the table calls present was discarded by the
  // application; it is then claimed again (IN_FLIGHT) for the caller.
  bool discarded(size_t page);
  // For a page just taken back from present (discarded, or punched out of
  // the memfd) to be fetched again: true, unless a completion check that
  // could not see it go has made the region plain memory meanwhile; then
  // the page is given back to plain memory and false returned.
  bool fetch_again(size_t page);
  void record_failure(const std::string& text);
  void stop_worker_on_exception(Worker& w, const std::exception& e);
  bool zero(size_t page) const { return is_zero_page(desc_.zero_map, page); }

  // Members in creation order; destroyed in reverse: workers (joined in
  // the destructor body) before the uffd, the uffd before the mapping.
  AttachOptions options_;
  std::unique_ptr<Transport> transport_;
  Backing backing_;
  RegionDescriptor desc_;  // the source's, in this side's pages (4 KiB or 2 MiB)
  Mapping zero_source_;    // anonymous 2 MiB pages: hugetlb has no UFFDIO_ZEROPAGE
  Userfaultfd uffd_;
  PageTable pages_;
  // Anonymous memory with a pull: per page, whether a pull run has it out
  // and no fault has overtaken it yet (the first fault on it clears this).
  std::unique_ptr<std::atomic<bool>[]> pulling_;
  PrefetchTable streams_;
  UniqueFd stop_fd_;
  std::chrono::steady_clock::time_point started_;
  std::atomic<uint64_t> present_{0};
  std::atomic<bool> complete_{false};
  std::atomic<bool> failed_{false};
  UniqueFd pagemap_;       // /proc/self/pagemap, for anonymous 4 KiB pages
  std::mutex check_mu_;    // one completion check at a time
  std::atomic<bool> closing_{false};  // a completion check is deciding
  mutable std::mutex state_mu_;
  mutable std::condition_variable state_cv_;
  std::string error_;
  std::vector<std::unique_ptr<Worker>> handlers_;
  std::unique_ptr<Worker> puller_;
};

}  // namespace pagewire
