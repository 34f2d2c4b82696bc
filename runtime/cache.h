// A bounded local cache over a region attached from a memory node (far
// memory): which pages were written, which page goes first, and the thread
// that evicts, writing the written ones back to the node before it drops
// them.
//
// Knowing what was written: pages come in write-protected
// (UFFDIO_COPY_MODE_WP) unless the fault that brought them was a write, and
// the first write to a protected page is a write-protect fault, on which a
// handler marks the page written and lifts the protection. That is
// synchronous write-protect, on both kernels here (6.1 and 6.18).
//
// Evicting a written page loses no write:
//  1. own it (PRESENT -> IN_FLIGHT), clear its written mark, protect it,
//     copy it into a registered staging slot, give it back (PRESENT). From
//     here a write to it faults and marks it written again;
//  2. write the copy to the node;
//  3. once the node has acknowledged it, own it again: written meanwhile,
//     keep it (a later lap writes it back again); else drop it
//     (MADV_DONTNEED), MISSING, and wake whoever faulted on it meanwhile,
//     who fetch it again, as the node now has it.
// Until step 3 drops it the page stays resident, so a touch meanwhile reads
// the page itself, never the node's older bytes. A write-protect fault on a
// page owned meanwhile wakes the writer to try again: the owner holds it
// for a copy or a madvise, and a page dropped meanwhile is fetched again by
// the write's missing fault.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "pagewire/region.h"
#include "runtime/completion.h"
#include "runtime/page_table.h"
#include "runtime/region_status.h"
#include "runtime/residency.h"
#include "runtime/staging_pool.h"
#include "runtime/uffd.h"
#include "transport/transport.h"

namespace pagewire {

class Cache {
 public:
  struct Region {
    PageTable& pages;
    Userfaultfd& uffd;
    std::byte* base;
    uint32_t page_size;
    uint64_t length;
    ZeroMap& zero_map;  // a written page is known zero no more
    RegionStatus& status;
    std::string name;
    const Residency& residency;         // whether a page is still mapped here
    PageCounts& counts;                 // the evicting thread's own slot
    std::function<uint64_t()> present;  // pages resident now (all slots summed)
  };

  // Opens the channel that writes go out on; throws as attach does.
  Cache(Region region, Transport& transport, const AttachOptions& options, int stop_fd);
  Cache(const Cache&) = delete;
  Cache& operator=(const Cache&) = delete;
  ~Cache();

  void start();
  // Ends the evicting thread and lets every handler waiting for room go;
  // before the handlers are joined.
  void stop();

  // Handlers. Pages just installed, before they are settled present and
  // their threads woken; `written`: by a write fault (installed writable).
  void installed(size_t first, uint32_t count, bool written);
  // After they are settled: records the most pages resident, nudges eviction.
  void note_resident();
  // A write-protect fault on `page`: the page is marked written, its
  // protection lifted, and the writer woken (`mine`: the handler's counts).
  void on_write_fault(size_t page, PageCounts& mine);
  // A write-protect fault outside the region (a page mremap moved away):
  // the protection is lifted and the writer woken.
  void lift(uint64_t address);
  // Before a missing page is fetched: waits while the cache is full (and
  // eviction can still make room).
  void wait_for_room();
  // Above the high watermark: prefetch stops.
  bool over_high() const { return region_.present() >= high_; }

  FlushReport flush();
  void add_stats(Stats& s) const;

 private:
  enum : uint8_t { kWritten = 1, kInRing = 2, kCredit = 4 };

  void run();
  // Evicts until at most `target` pages are resident; false when it could
  // free nothing (every candidate written and the node failing, say).
  bool evict_down_to(uint64_t target);
  // Takes up to `max` victims off the ring (the CLOCK's hand).
  void pick(std::vector<size_t>& victims, size_t max);
  void requeue(size_t page);
  // Drops a clean page: true when it went.
  bool drop(size_t page);
  // Writes `pages` back (steps 1 to 3); `then_drop` on eviction (counting
  // the pages dropped in *dropped), not on a flush. Returns how many the
  // node acknowledged; `acked`, if given, collects them.
  uint64_t write_back(const std::vector<size_t>& pages, bool then_drop, uint64_t* dropped,
                      std::vector<size_t>* acked = nullptr);
  // A write-back failed: eviction stops, and the first reason is kept.
  void fail(const std::string& why);
  // Step 1 for one page into `slot`: false when it cannot go now.
  bool take_copy(size_t page, std::byte* slot);
  void nudge();
  uint8_t flags(size_t page) const { return flags_[page].load(std::memory_order_acquire); }
  std::byte* addr(size_t page) const { return region_.base + page * region_.page_size; }

  Region region_;
  AttachOptions::Eviction policy_;
  uint64_t capacity_;  // pages
  uint64_t high_;
  uint64_t low_;
  std::unique_ptr<std::atomic<uint8_t>[]> flags_;
  // When each page was last evicted, in evictions (0: never): a page
  // faulted in again within a cache's worth of evictions earns a lap.
  std::unique_ptr<std::atomic<uint32_t>[]> evicted_at_;
  std::atomic<uint32_t> evictions_{0};

  std::mutex ring_mu_;
  std::deque<uint32_t> ring_;  // resident pages, in the order they came in

  // The write channel and its staging; used under io_mu_ (the evicting
  // thread or a flush).
  std::mutex io_mu_;
  std::unique_ptr<Channel> channel_;
  std::unique_ptr<StagingPool> staging_;
  uint32_t depth_ = 1;
  WaitResult result_;

  std::mutex mu_;
  std::condition_variable wake_cv_;  // the evicting thread's
  std::condition_variable room_cv_;  // handlers waiting for room
  bool nudged_ = false;
  bool stopping_ = false;
  std::atomic<bool> stuck_{false};     // the last pass freed nothing
  std::atomic<bool> failed_{false};    // a write-back failed: no more eviction
  std::atomic<bool> flushing_{false};  // faults do not wait for room meanwhile
  std::string error_;                  // under mu_

  std::atomic<uint64_t> pages_evicted_{0};
  std::atomic<uint64_t> pages_written_back_{0};
  std::atomic<uint64_t> write_faults_{0};
  std::atomic<uint64_t> writeback_failures_{0};
  std::atomic<uint64_t> max_resident_{0};
  std::thread thread_;
};

}  // namespace pagewire
