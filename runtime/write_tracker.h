// Write tracking: which pages of a range the process wrote since the last
// look. Two kernel mechanisms, one interface:
//  - kAsync (6.7+): userfaultfd asynchronous write-protect. A write to a
//    protected page is resolved by the kernel itself, which only clears the
//    page's write-protect bit; harvest() reads and re-sets those bits in one
//    PAGEMAP_SCAN walk. No fault reaches user space.
//  - kSync (5.7+, the Debian 6.1 guest): userfaultfd synchronous
//    write-protect. A write to a protected page parks the writer; the
//    tracker's thread records the page and unprotects it.
// Both keep a thread that reads the userfaultfd's events: MADV_DONTNEED and
// MADV_REMOVE over the range (UFFD_EVENT_REMOVE) change its contents
// without a write fault, and munmap (UFFD_EVENT_UNMAP) takes pages out of it.
// The kernel parks the discarding or unmapping thread until the event is
// read, so the events cannot wait for the next harvest().
//
// What is seen is what happens through this mapping: a write to a shared
// file or memfd through another mapping, write(2) or fallocate(2) on its
// descriptor is not reported.
#pragma once

#include <linux/userfaultfd.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "common/unique_fd.h"
#include "runtime/uffd.h"

namespace pagewire {

enum class TrackingMode { kAuto, kAsync, kSync };
const char* to_string(TrackingMode m);  // "auto", "async", "sync"

// What this kernel offers: kAsync when UFFD_FEATURE_WP_ASYNC,
// UFFD_FEATURE_WP_UNPOPULATED and PAGEMAP_SCAN all work, else kSync when
// synchronous write-protect of anonymous memory works, else throws
// Error(kUffdUnavailable) saying why. Probed once; the answer is logged once.
TrackingMode probe_tracking();

// Tracks writes to [base, base+length) of memory the calling process owns:
// anonymous private, shared memfd/shmem, or hugetlb. page_size is 4096, or
// the hugetlb page size for hugetlb memory. Construction protects every
// page: the first harvest() reports the pages written since construction.
//
// For anonymous private memory the constructor sets MADV_NOHUGEPAGE over
// the range (a discard of a whole transparent huge page is not reported as
// written on some kernels), and where the kernel lacks
// UFFD_FEATURE_WP_UNPOPULATED it populates the range first, because
// write-protect skips never-populated anonymous pages there.
class WriteTracker {
 public:
  // Throws pagewire::Error(kInvalidArgument) for a bad range or page size
  // (changing nothing), Error(kUffdUnavailable) when the mode asked for is
  // not offered here, std::system_error for a failing system call.
  WriteTracker(std::byte* base, size_t length, size_t page_size, TrackingMode mode = TrackingMode::kAuto);
  // Removes all write-protection, stops the thread and unregisters; a writer
  // parked on a protected page is woken, none is left blocked.
  ~WriteTracker();
  WriteTracker(const WriteTracker&) = delete;
  WriteTracker& operator=(const WriteTracker&) = delete;
  WriteTracker(WriteTracker&&) = delete;
  WriteTracker& operator=(WriteTracker&&) = delete;

  TrackingMode mode() const { return mode_; }  // kAsync or kSync: what runs
  size_t pages() const { return pages_; }

  // The pages written since the last harvest (bit i = page i), re-protected
  // atomically: a write racing with the harvest is reported by this harvest
  // or the next one, never lost. Pages discarded through the mapping
  // (MADV_DONTNEED, MADV_REMOVE) count as written, and are reported by the
  // harvest after too (the kernel discards after it reports the event).
  // Pages unmapped while tracked are reported as written once and not
  // tracked afterwards. Callable from any thread; harvests are serialized.
  std::vector<bool> harvest();

 private:
  friend class WriteTrackerTestPeer;
  using Bitmap = std::vector<uint64_t>;
  struct Run {
    size_t first;
    size_t count;
  };

  void serve();
  // Reads and handles every queued message. Write faults that arrive while
  // a harvest re-protects are put aside (defer_faults) and resolved after it
  // clears the bits it reports: see harvest_sync().
  void drain_locked(bool defer_faults);
  void handle_locked(const uffd_msg& msg, bool defer_faults);
  void resolve_fault_locked(size_t page);
  void resolve_deferred_locked();
  void mark_gone_locked(size_t first, size_t count);
  // Sets (protect) or clears write-protection over the given pages, in runs;
  // retries while the address space is changing (reading the events that
  // hold it so). A run that fails because its pages left the range is
  // redone page by page, and the pages that fail are marked gone.
  void write_protect_locked(const Bitmap& pages, bool protect, bool defer_faults);
  std::vector<Run> tracked_runs_locked() const;
  std::vector<bool> harvest_async_locked();
  std::vector<bool> harvest_sync_locked();
  // Anonymous pages whose write-protection a zap removed: see harvest_sync().
  void mark_unprotected_anonymous_locked();
  void populate_locked(const Bitmap& pages);
  void unprotect_and_unregister();

  std::byte* const base_;
  const size_t length_;
  const size_t page_size_;
  const size_t pages_;
  const bool anonymous_;  // anonymous private memory (zaps drop protection)
  const TrackingMode mode_;
  bool populate_before_protect_ = false;  // sync without UFFD_FEATURE_WP_UNPOPULATED

  // Members in creation order; destroyed in reverse, the thread first (the
  // destructor has stopped it already), the userfaultfd last.
  UniqueFd pagemap_;  // /proc/self/pagemap
  Userfaultfd uffd_;
  UniqueFd stop_;  // eventfd that stops the thread

  // One lock orders fault handling against harvest: recording a write and
  // unprotecting its page must not fall between a harvest's re-protect and
  // its clearing of the bits (see harvest_sync()).
  std::mutex mu_;
  Bitmap written_;         // sync: written (faulted) since last re-protected
  Bitmap discarded_;       // discarded since the last harvest
  Bitmap discarded_prev_;  // discarded before the last harvest: reported once more
  Bitmap gone_;            // unmapped: no longer tracked
  Bitmap gone_unreported_;
  std::vector<size_t> deferred_faults_;
  std::vector<size_t> unresolved_faults_;  // resolving met EAGAIN: retried after the next read
  std::thread thread_;

  static inline std::atomic<bool> test_ignore_wp_unpopulated_{false};
};

}  // namespace pagewire
