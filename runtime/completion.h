// Counting present pages, and the one place that decides the region is
// complete and unregisters it.
//
// Every thread that installs pages, or takes them back, counts them in a
// slot of its own (padded to a cache line, one writer each): nothing shared
// is written on the fault path. One owner, a small thread woken through an
// eventfd (the puller nudges it when it finds nothing left to claim) or
// every few milliseconds, sums the slots. When every page is counted
// present or gone, it checks with the kernel that each is really still
// there (the application may have discarded some), and only then
// unregisters the region, which becomes plain memory.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "common/unique_fd.h"
#include "runtime/backing.h"
#include "runtime/page_table.h"
#include "runtime/region_status.h"
#include "runtime/residency.h"
#include "runtime/uffd.h"
#include "transport/zero_map.h"

namespace pagewire {

// One thread's page counts. Present can go below zero in one slot (a page
// installed by one thread and taken back by another); only sums mean
// anything.
struct alignas(64) PageCounts {
  std::atomic<int64_t> present{0};
  std::atomic<int64_t> gone{0};  // pages whose range the application unmapped

  // Single writer: no locked instruction. Sequentially consistent, so that
  // a page taken back (present lowered, then Completion::closing() read)
  // and the owner's decision (closing set, then the sums read) always see
  // one another: see Completion::fetch_again().
  static void add(std::atomic<int64_t>& c, int64_t by) { c.store(c.load(std::memory_order_relaxed) + by); }
};

class Completion {
 public:
  struct Region {
    PageTable& pages;
    const Residency& residency;
    Userfaultfd& uffd;
    const Backing& backing;  // where each page is
    uint32_t page_size;
    RegionStatus& status;
    std::string name;
    std::chrono::steady_clock::time_point started;
    // Another process's removed pages (UFFD_EVENT_REMOVE; none: nullptr):
    // one punched out of its memfd is gone, never fetched again.
    const ZeroMap* removed = nullptr;
  };

  // `slots` counters: one for each thread that counts, plus the owner's.
  Completion(Region region, unsigned slots);
  Completion(const Completion&) = delete;
  Completion& operator=(const Completion&) = delete;
  ~Completion();

  // Starts the owner thread; it ends when `stop_fd` becomes readable, or
  // once the region has completed or failed.
  void start(int stop_fd);
  void join();
  PageCounts& slot(unsigned i) { return slots_[i]; }
  // Wakes the owner to look now rather than at its next tick.
  void nudge();
  // While held, the region is never declared complete, however many pages
  // are present: precopy rounds take pages back until the switchover.
  void hold(bool held) {
    held_.store(held);
    if (!held) nudge();
  }
  uint64_t pages_present() const;
  uint64_t pages_gone() const;

  // For a page just taken back from present (discarded, or punched out of
  // the memfd) to be fetched again: true, unless the owner, which could not
  // see it go, has made the region plain memory meanwhile; then the page is
  // given back to plain memory (counted present again in `mine`) and false
  // returned.
  bool fetch_again(size_t page, PageCounts& mine);

 private:
  void run(int stop_fd);
  // The decision: every page counted, every page still there, unregister.
  void decide();
  // Pages the table calls present that the kernel no longer holds go back
  // to missing (and are fetched again); returns how many.
  size_t sweep_discarded();
  int64_t settled() const;
  // The page table's word: every page present or gone.
  bool all_settled() const;

  Region r_;
  unsigned count_;
  std::unique_ptr<PageCounts[]> slots_;
  PageCounts& own_;
  UniqueFd wake_fd_;
  std::mutex decide_mu_;              // held by the owner while it decides
  std::atomic<bool> closing_{false};  // the owner is deciding
  std::atomic<bool> held_{false};
  std::thread thread_;
};

}  // namespace pagewire
