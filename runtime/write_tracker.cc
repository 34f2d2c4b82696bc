#include "runtime/write_tracker.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

#include "pagewire/error.h"
#include "runtime/uffd_compat.h"
#include "runtime/write_protect.h"
#include "spdlog/spdlog.h"

namespace pagewire {

using wtrack::clear_bit;
using wtrack::describe_range;
using wtrack::for_each_run;
using wtrack::is_supported_page_size;
using wtrack::kAsyncFeatures;
using wtrack::kBasePage;
using wtrack::kEventFeatures;
using wtrack::populate_writable;
using wtrack::Probe;
using wtrack::probe;
using wtrack::RangeKind;
using wtrack::register_write_protect;
using wtrack::set_bit;
using wtrack::test_bit;
using wtrack::write_protect;

// --- construction and teardown -----------------------------------------------

namespace {

size_t checked_pages(std::byte* base, size_t length, size_t page_size) {
  if (base == nullptr) throw Error(Errc::kInvalidArgument, "write tracker: null base address");
  if (!is_supported_page_size(page_size)) {
    throw Error(Errc::kInvalidArgument,
                "write tracker: page size " + std::to_string(page_size) +
                    " is neither 4096 nor a huge page size this kernel has (/sys/kernel/mm/hugepages)");
  }
  if (reinterpret_cast<uintptr_t>(base) % page_size != 0) {
    throw Error(Errc::kInvalidArgument,
                "write tracker: base address is not aligned to the page size " + std::to_string(page_size));
  }
  if (length == 0 || length % page_size != 0) {
    throw Error(Errc::kInvalidArgument, "write tracker: length " + std::to_string(length) +
                                            " is not a positive multiple of the page size " +
                                            std::to_string(page_size));
  }
  return length / page_size;
}

// Whether the range is anonymous private memory; throws when part of it is
// not mapped.
bool checked_anonymous(std::byte* base, size_t length, size_t page_size) {
  const uintptr_t start = reinterpret_cast<uintptr_t>(base);
  const RangeKind kind = describe_range(start, start + length);
  if (!kind.covered) throw Error(Errc::kInvalidArgument, "write tracker: the range is not entirely mapped");
  return kind.anonymous && page_size == kBasePage;
}

TrackingMode checked_mode(TrackingMode mode) {
  if (mode == TrackingMode::kAuto) return probe_tracking();
  if (mode == TrackingMode::kAsync) {
    if (const Probe& p = probe(); !p.async_missing.empty()) {
      throw Error(Errc::kUffdUnavailable, "asynchronous write tracking is not available: " + p.async_missing);
    }
  }
  return mode;
}

Userfaultfd open_tracker_uffd(TrackingMode mode, bool ignore_wp_unpopulated) {
  if (mode == TrackingMode::kAsync) {
    // Asynchronous write-protect covers every range its userfaultfd
    // registers for write-protect, so the tracker has a userfaultfd of its
    // own (one that resolves write faults synchronously cannot share it).
    return Userfaultfd::open(kAsyncFeatures | kEventFeatures | UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
  }
  uint64_t wanted = UFFD_FEATURE_PAGEFAULT_FLAG_WP | kEventFeatures | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
  if (!ignore_wp_unpopulated) wanted |= UFFD_FEATURE_WP_UNPOPULATED;
  Userfaultfd uffd = Userfaultfd::open(wanted);
  if (!uffd.has(UFFD_FEATURE_PAGEFAULT_FLAG_WP)) {
    throw Error(Errc::kUffdUnavailable, "this kernel has no userfaultfd write-protect (Linux 5.7+)");
  }
  return uffd;
}

}  // namespace

WriteTracker::WriteTracker(std::byte* base, size_t length, size_t page_size, TrackingMode mode)
    : base_(base),
      length_(length),
      page_size_(page_size),
      pages_(checked_pages(base, length, page_size)),
      anonymous_(checked_anonymous(base, length, page_size)),
      mode_(checked_mode(mode)),
      uffd_(open_tracker_uffd(mode_, test_ignore_wp_unpopulated_.load())) {
  // The async harvest scans with PAGEMAP_SCAN; the sync one reads pagemap
  // entries of anonymous memory (see harvest_sync_locked()).
  if (mode_ == TrackingMode::kAsync || anonymous_) {
    pagemap_ = UniqueFd(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
    if (!pagemap_) throw_errno("open /proc/self/pagemap");
  }
  if ((uffd_.features() & kEventFeatures) != kEventFeatures) {
    throw Error(Errc::kUffdUnavailable, "this kernel's userfaultfd reports no remove or unmap events");
  }
  if (!anonymous_ && !uffd_.has(UFFD_FEATURE_WP_HUGETLBFS_SHMEM)) {
    throw Error(Errc::kUffdUnavailable, "this kernel cannot write-protect shared or hugetlb memory (Linux 5.19+)");
  }
  // Without WP_UNPOPULATED, write-protect skips pages never populated
  // (their writes would go unseen), so they are populated first.
  populate_before_protect_ = anonymous_ && !uffd_.has(UFFD_FEATURE_WP_UNPOPULATED);

  const size_t words = (pages_ + 63) / 64;
  written_.assign(words, 0);
  discarded_.assign(words, 0);
  discarded_prev_.assign(words, 0);
  gone_.assign(words, 0);
  gone_unreported_.assign(words, 0);

  if (anonymous_) {
    // A discard of a whole transparent huge page is not reported as written
    // on some kernels; 4 KiB pages also keep the report page-exact.
    if (::madvise(base_, length_, MADV_NOHUGEPAGE) != 0) throw_errno("madvise(MADV_NOHUGEPAGE) over the tracked range");
  }
  if (populate_before_protect_) populate_writable(base_, length_);
  register_write_protect(uffd_.fd(), base_, length_);
  stop_ = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!stop_) throw_errno("eventfd");
  {
    std::lock_guard lock(mu_);
    Bitmap all(words, ~0ull);
    if (pages_ % 64 != 0) all.back() = (1ull << (pages_ % 64)) - 1;
    write_protect_locked(all, /*protect=*/true, /*defer_faults=*/false);
  }
  thread_ = std::thread([this] { serve(); });
  spdlog::debug("write tracker: {} pages of {} bytes at {}, {}{}", pages_, page_size_, static_cast<void*>(base_),
                to_string(mode_), populate_before_protect_ ? " (populated first)" : "");
}

WriteTracker::~WriteTracker() {
  try {
    unprotect_and_unregister();
  } catch (const std::exception& e) {
    spdlog::error("write tracker: teardown: {}", e.what());
  }
  const uint64_t one = 1;
  if (::write(stop_.get(), &one, sizeof(one)) != static_cast<ssize_t>(sizeof(one))) {
    spdlog::error("write tracker: cannot stop its thread: {}", std::strerror(errno));
  }
  if (thread_.joinable()) thread_.join();
  // Closing the userfaultfd (member destruction) releases anything left.
}

void WriteTracker::unprotect_and_unregister() {
  std::lock_guard lock(mu_);
  Bitmap all(gone_.size());
  for (size_t w = 0; w < all.size(); ++w) all[w] = ~gone_[w];
  if (pages_ % 64 != 0) all.back() &= (1ull << (pages_ % 64)) - 1;
  // Unprotecting wakes every writer parked on the range; after it no write
  // faults, so none can park between here and the unregistering.
  write_protect_locked(all, /*protect=*/false, /*defer_faults=*/false);
  for (const Run& r : tracked_runs_locked()) {
    uffdio_range range{reinterpret_cast<uint64_t>(base_ + r.first * page_size_), r.count * page_size_};
    if (::ioctl(uffd_.fd(), UFFDIO_UNREGISTER, &range) != 0) {
      spdlog::debug("write tracker: UFFDIO_UNREGISTER: {}", std::strerror(errno));
    }
  }
  resolve_deferred_locked();
}

// --- the thread: write faults (sync) and events (both) -------------------------

void WriteTracker::serve() {
  ::pthread_setname_np(::pthread_self(), "pw-wtrack");
  pollfd fds[2] = {{uffd_.fd(), POLLIN, 0}, {stop_.get(), POLLIN, 0}};
  for (;;) {
    int timeout_ms = -1;
    {
      std::lock_guard lock(mu_);
      // A fault whose resolving met EAGAIN waits on an event not queued yet
      // (munmap queues it after unmapping): retry soon even without a message.
      if (!unresolved_faults_.empty()) timeout_ms = 1;
    }
    if (::poll(fds, 2, timeout_ms) < 0 && errno != EINTR) {
      spdlog::error("write tracker: poll: {}", std::strerror(errno));
      continue;
    }
    if ((fds[1].revents & POLLIN) != 0) return;
    try {
      std::lock_guard lock(mu_);
      drain_locked(/*defer_faults=*/false);
    } catch (const std::exception& e) {
      spdlog::error("write tracker: {}", e.what());
    }
  }
}

void WriteTracker::drain_locked(bool defer_faults) {
  uffd_msg msgs[64];
  for (;;) {
    const int n = uffd_.read_events(msgs);
    if (n < 0) {
      spdlog::error("write tracker: reading the userfaultfd: {}", std::strerror(-n));
      return;
    }
    for (int i = 0; i < n; ++i) handle_locked(msgs[i], defer_faults);
    if (!defer_faults && !unresolved_faults_.empty()) {
      std::vector<size_t> retry;
      retry.swap(unresolved_faults_);
      for (size_t page : retry) resolve_fault_locked(page);
    }
    if (n == 0) return;
  }
}

void WriteTracker::handle_locked(const uffd_msg& msg, bool defer_faults) {
  const uintptr_t base = reinterpret_cast<uintptr_t>(base_);
  // The pages of [start, end) within the range, rounded outwards.
  auto pages_of = [&](uint64_t start, uint64_t end) -> Run {
    const uint64_t lo = std::max<uint64_t>(start, base);
    const uint64_t hi = std::min<uint64_t>(end, base + length_);
    if (lo >= hi) return {0, 0};
    const size_t first = (lo - base) / page_size_;
    return {first, (hi - base + page_size_ - 1) / page_size_ - first};
  };
  switch (msg.event) {
    case UFFD_EVENT_PAGEFAULT: {
      const uint64_t addr = msg.arg.pagefault.address;
      if (addr < base || addr >= base + length_) return;
      const size_t page = (addr - base) / page_size_;
      if (defer_faults) {
        deferred_faults_.push_back(page);
      } else {
        resolve_fault_locked(page);
      }
      return;
    }
    case UFFD_EVENT_REMOVE: {
      // MADV_DONTNEED or MADV_REMOVE: the contents change (zero, or refilled
      // from the file) without a write fault.
      const Run r = pages_of(msg.arg.remove.start, msg.arg.remove.end);
      for (size_t p = r.first; p < r.first + r.count; ++p) {
        if (!test_bit(gone_, p)) set_bit(discarded_, p);
      }
      return;
    }
    case UFFD_EVENT_UNMAP: {
      const Run r = pages_of(msg.arg.remove.start, msg.arg.remove.end);
      mark_gone_locked(r.first, r.count);
      return;
    }
    default: spdlog::debug("write tracker: ignoring userfaultfd event {:#x}", msg.event);
  }
}

void WriteTracker::resolve_fault_locked(size_t page) {
  if (test_bit(gone_, page)) return;
  // The bit is set in the same locked step as the unprotect that follows (a
  // retry after EAGAIN sets it again), so no harvest can clear it between
  // the two and leave the page unprotected with its bit clear.
  set_bit(written_, page);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(base_ + page * page_size_);
  const int err = write_protect(uffd_.fd(), addr, page_size_, /*protect=*/false);
  if (err == 0) return;
  if (err == EAGAIN) {
    unresolved_faults_.push_back(page);
    return;
  }
  // The page left the range (its UNMAP event is on its way): wake the writer,
  // which then faults as on any unmapped page.
  uffdio_range range{addr, page_size_};
  ::ioctl(uffd_.fd(), UFFDIO_WAKE, &range);
  spdlog::debug("write tracker: unprotecting page {}: {}", page, std::strerror(err));
}

void WriteTracker::resolve_deferred_locked() {
  std::vector<size_t> pages;
  pages.swap(deferred_faults_);
  pages.insert(pages.end(), unresolved_faults_.begin(), unresolved_faults_.end());
  unresolved_faults_.clear();
  for (size_t page : pages) resolve_fault_locked(page);
}

void WriteTracker::mark_gone_locked(size_t first, size_t count) {
  for (size_t p = first; p < first + count; ++p) {
    if (test_bit(gone_, p)) continue;
    set_bit(gone_, p);
    set_bit(gone_unreported_, p);
    clear_bit(written_, p);
    clear_bit(discarded_, p);
    clear_bit(discarded_prev_, p);
  }
}

std::vector<WriteTracker::Run> WriteTracker::tracked_runs_locked() const {
  Bitmap tracked(gone_.size());
  for (size_t w = 0; w < tracked.size(); ++w) tracked[w] = ~gone_[w];
  std::vector<Run> runs;
  for_each_run(tracked, pages_, [&](size_t first, size_t count) { runs.push_back({first, count}); });
  return runs;
}

void WriteTracker::write_protect_locked(const Bitmap& pages, bool protect, bool defer_faults) {
  Bitmap todo = pages;
  for (size_t w = 0; w < todo.size(); ++w) todo[w] &= ~gone_[w];
  // Returns 0, or the errno other than EAGAIN that stopped it. EAGAIN means
  // the address space is changing: an event (munmap, madvise) waits to be
  // read, and only this thread can read it while it holds the lock.
  auto apply = [&](size_t first, size_t count) {
    for (;;) {
      const int err = write_protect(uffd_.fd(), reinterpret_cast<uintptr_t>(base_ + first * page_size_),
                                    count * page_size_, protect);
      if (err != EAGAIN) return err;
      drain_locked(defer_faults);
      sched_yield();
    }
  };
  for_each_run(todo, pages_, [&](size_t first, size_t count) {
    if (apply(first, count) == 0) return;
    // Part of the run left the range (ENOENT: no longer registered): find
    // which pages, page by page.
    for (size_t p = first; p < first + count; ++p) {
      if (test_bit(gone_, p)) continue;
      if (const int err = apply(p, 1); err != 0) {
        spdlog::debug("write tracker: page {} left the range ({})", p, std::strerror(err));
        mark_gone_locked(p, 1);
      }
    }
  });
}

}  // namespace pagewire
