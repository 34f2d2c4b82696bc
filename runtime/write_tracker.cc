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
#include <bit>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "pagewire/error.h"
#include "runtime/uffd_compat.h"
#include "spdlog/spdlog.h"

namespace pagewire {
namespace {

constexpr size_t kBasePage = 4096;
// /proc/self/pagemap: one 64-bit entry per base page
// (Documentation/admin-guide/mm/pagemap.rst).
constexpr uint64_t kPagemapPresent = 1ull << 63;
constexpr uint64_t kPagemapSwapped = 1ull << 62;
constexpr uint64_t kPagemapUffdWp = 1ull << 57;  // pte or pte marker write-protected

constexpr uint64_t kEventFeatures = UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP;
constexpr uint64_t kAsyncFeatures = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;

// --- bitmaps: one bit a page -------------------------------------------------

bool test_bit(const std::vector<uint64_t>& b, size_t i) { return (b[i / 64] >> (i % 64)) & 1; }
void set_bit(std::vector<uint64_t>& b, size_t i) { b[i / 64] |= 1ull << (i % 64); }
void clear_bit(std::vector<uint64_t>& b, size_t i) { b[i / 64] &= ~(1ull << (i % 64)); }

// Calls fn(first, count) for each run of set bits.
template <typename Fn>
void for_each_run(const std::vector<uint64_t>& b, size_t pages, Fn fn) {
  size_t i = 0;
  while (i < pages) {
    if (!test_bit(b, i)) {
      ++i;
      continue;
    }
    size_t end = i + 1;
    while (end < pages && test_bit(b, end)) ++end;
    fn(i, end - i);
    i = end;
  }
}

// --- the range's mappings ----------------------------------------------------

struct RangeKind {
  bool covered = false;    // every byte is mapped
  bool anonymous = false;  // every mapping is anonymous private memory
};

// From /proc/self/maps: a mapping is anonymous private when it is private
// ('p') and has no backing inode; hugetlb, memfd and MAP_SHARED|MAP_ANONYMOUS
// (/dev/zero, shmem) all name an inode.
RangeKind describe_range(uintptr_t start, uintptr_t end) {
  std::ifstream maps("/proc/self/maps");
  RangeKind kind;
  kind.anonymous = true;
  uintptr_t next = start;  // the first byte not yet seen mapped
  std::string line;
  while (next < end && std::getline(maps, line)) {
    uintptr_t lo = 0, hi = 0;
    char perms[8] = {};
    unsigned long long offset = 0, inode = 0;
    char dev[32] = {};
    if (std::sscanf(line.c_str(), "%" SCNxPTR "-%" SCNxPTR " %7s %llx %31s %llu", &lo, &hi, perms, &offset, dev,
                    &inode) != 6) {
      continue;
    }
    if (hi <= next) continue;
    if (lo > next) break;  // a hole
    if (perms[3] != 'p' || inode != 0) kind.anonymous = false;
    next = hi;
  }
  kind.covered = next >= end;
  return kind;
}

bool is_supported_page_size(size_t page_size) {
  if (page_size == kBasePage) return true;
  if (!std::has_single_bit(page_size)) return false;
  std::error_code ec;
  return std::filesystem::exists("/sys/kernel/mm/hugepages/hugepages-" + std::to_string(page_size / 1024) + "kB", ec);
}

void register_write_protect(int uffd, void* addr, size_t len) {
  uffdio_register reg{};
  reg.range.start = reinterpret_cast<uint64_t>(addr);
  reg.range.len = len;
  reg.mode = UFFDIO_REGISTER_MODE_WP;
  if (::ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) throw_errno("UFFDIO_REGISTER (write-protect)");
  if ((reg.ioctls & (1ull << _UFFDIO_WRITEPROTECT)) == 0) {
    throw Error(Errc::kUffdUnavailable, "UFFDIO_WRITEPROTECT is not offered for this range");
  }
}

int write_protect(int uffd, uintptr_t addr, size_t len, bool protect) {
  uffdio_writeprotect wp{};
  wp.range.start = addr;
  wp.range.len = len;
  // Unprotecting without DONTWAKE also wakes the writers parked on the range.
  wp.mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0;
  return ::ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) == 0 ? 0 : errno;
}

// Faults each page in writable without changing its contents, for kernels
// whose write-protect skips never-populated anonymous pages. A locked
// read-modify-write that adds nothing, rather than a read and then a write
// of the same byte: another thread's write between the two would be undone.
void touch_pages(std::byte* addr, size_t len) {
  for (size_t at = 0; at < len; at += kBasePage) {
    __atomic_fetch_add(reinterpret_cast<unsigned char*>(addr + at), 0, __ATOMIC_RELAXED);
  }
}

void populate_writable(std::byte* addr, size_t len) {
  if (::madvise(addr, len, MADV_POPULATE_WRITE) == 0) return;
  if (errno == EINVAL) {
    touch_pages(addr, len);  // before 5.14: no MADV_POPULATE_WRITE
    return;
  }
  throw_errno("madvise(MADV_POPULATE_WRITE) over the tracked range");
}

// --- probing -----------------------------------------------------------------

// Whether asynchronous write-protect and PAGEMAP_SCAN work together here,
// tried on one page of our own; empty when they do, else why not.
std::string try_async() {
  const uint64_t offered = Userfaultfd::kernel_features();
  if ((offered & UFFD_FEATURE_WP_ASYNC) == 0) return "no UFFD_FEATURE_WP_ASYNC (Linux 6.7+)";
  if ((offered & UFFD_FEATURE_WP_UNPOPULATED) == 0) return "no UFFD_FEATURE_WP_UNPOPULATED (Linux 6.4+)";
  Mapping page = Mapping::anonymous(kBasePage);
  Userfaultfd uffd = Userfaultfd::open(kAsyncFeatures);
  try {
    register_write_protect(uffd.fd(), page.data(), kBasePage);
  } catch (const std::exception& e) {
    return e.what();
  }
  if (int err = write_protect(uffd.fd(), reinterpret_cast<uintptr_t>(page.data()), kBasePage, true); err != 0) {
    return std::string("UFFDIO_WRITEPROTECT: ") + std::strerror(err);
  }
  UniqueFd pagemap(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  if (!pagemap) return std::string("/proc/self/pagemap: ") + std::strerror(errno);
  page.data()[0] = std::byte{1};
  page_region region{};
  pm_scan_arg arg{};
  arg.size = sizeof(arg);
  arg.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC;
  arg.start = reinterpret_cast<uint64_t>(page.data());
  arg.end = arg.start + kBasePage;
  arg.vec = reinterpret_cast<uint64_t>(&region);
  arg.vec_len = 1;
  arg.category_mask = PAGE_IS_WRITTEN;
  arg.return_mask = PAGE_IS_WRITTEN;
  const int n = ::ioctl(pagemap.get(), PAGEMAP_SCAN, &arg);
  if (n < 0) return std::string("PAGEMAP_SCAN (Linux 6.7+): ") + std::strerror(errno);
  if (n != 1) return "PAGEMAP_SCAN did not report a page written under asynchronous write-protect";
  return {};
}

// Whether synchronous write-protect of anonymous memory works; empty when it does.
std::string try_sync() {
  const uint64_t offered = Userfaultfd::kernel_features();
  if ((offered & UFFD_FEATURE_PAGEFAULT_FLAG_WP) == 0) return "no UFFD_FEATURE_PAGEFAULT_FLAG_WP (Linux 5.7+)";
  Mapping page = Mapping::anonymous(kBasePage);
  Userfaultfd uffd = Userfaultfd::open(UFFD_FEATURE_PAGEFAULT_FLAG_WP);
  try {
    register_write_protect(uffd.fd(), page.data(), kBasePage);
  } catch (const std::exception& e) {
    return e.what();
  }
  return {};
}

struct Probe {
  TrackingMode mode = TrackingMode::kSync;
  std::string async_missing;  // why not kAsync, empty when it works
  std::string error;          // why neither, empty when one works
};

Probe run_probe() {
  Probe p;
  try {
    p.async_missing = try_async();
    if (p.async_missing.empty()) {
      p.mode = TrackingMode::kAsync;
      spdlog::info("write tracking: asynchronous write-protect with PAGEMAP_SCAN");
      return p;
    }
    if (std::string why = try_sync(); !why.empty()) {
      p.error = "write tracking is not available: " + why + "; and asynchronous: " + p.async_missing;
      return p;
    }
    spdlog::info("write tracking: synchronous write-protect (asynchronous: {})", p.async_missing);
  } catch (const std::exception& e) {
    p.error = std::string("write tracking is not available: ") + e.what();
  }
  return p;
}

const Probe& probe() {
  static const Probe p = run_probe();
  return p;
}

}  // namespace

const char* to_string(TrackingMode m) {
  switch (m) {
    case TrackingMode::kAuto: return "auto";
    case TrackingMode::kAsync: return "async";
    case TrackingMode::kSync: return "sync";
  }
  return "?";
}

TrackingMode probe_tracking() {
  const Probe& p = probe();
  if (!p.error.empty()) throw Error(Errc::kUffdUnavailable, p.error);
  return p.mode;
}

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

// --- harvest -------------------------------------------------------------------

std::vector<bool> WriteTracker::harvest() {
  std::lock_guard lock(mu_);
  return mode_ == TrackingMode::kAsync ? harvest_async_locked() : harvest_sync_locked();
}

std::vector<bool> WriteTracker::harvest_async_locked() {
  drain_locked(/*defer_faults=*/false);
  std::vector<bool> out(pages_, false);
  const uintptr_t base = reinterpret_cast<uintptr_t>(base_);
  std::vector<page_region> regions(256);
  // One walk reports the written pages and re-protects them under the page
  // table lock: a write lands either before (reported now) or after (the page
  // is protected again, the write clears the bit, the next harvest reports it).
  auto scan = [&](uintptr_t start, uintptr_t end) -> int {
    while (start < end) {
      pm_scan_arg arg{};
      arg.size = sizeof(arg);
      arg.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC;
      arg.start = start;
      arg.end = end;
      arg.vec = reinterpret_cast<uint64_t>(regions.data());
      arg.vec_len = regions.size();
      arg.category_mask = PAGE_IS_WRITTEN;
      arg.return_mask = PAGE_IS_WRITTEN;
      const int n = ::ioctl(pagemap_.get(), PAGEMAP_SCAN, &arg);
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno;
      }
      for (int i = 0; i < n; ++i) {
        for (uint64_t a = regions[i].start; a < regions[i].end; a += page_size_) out[(a - base) / page_size_] = true;
      }
      // The walk stops early when the vector is full; it protected only
      // what it reported, and goes on from where it stopped.
      if (arg.walk_end <= start) return EIO;
      start = arg.walk_end;
    }
    return 0;
  };
  for (const Run& r : tracked_runs_locked()) {
    const uintptr_t start = base + r.first * page_size_;
    if (const int err = scan(start, start + r.count * page_size_); err == 0) continue;
    // Some of the run is no longer ours (unmapped, or mapped over by memory
    // not registered here: EPERM). What the failed walk protected before it
    // stopped may not have been returned, so the whole run counts as
    // written; the pages that fail on their own are gone.
    for (size_t p = r.first; p < r.first + r.count; ++p) {
      out[p] = true;
      const uintptr_t a = base + p * page_size_;
      if (const int err = scan(a, a + page_size_); err != 0) {
        spdlog::debug("write tracker: page {} left the range ({})", p, std::strerror(err));
        mark_gone_locked(p, 1);
      }
    }
  }
  for (size_t p = 0; p < pages_; ++p) {
    if (test_bit(discarded_, p) || test_bit(discarded_prev_, p) || test_bit(gone_unreported_, p)) out[p] = true;
  }
  discarded_prev_.swap(discarded_);
  std::fill(discarded_.begin(), discarded_.end(), 0);
  std::fill(gone_unreported_.begin(), gone_unreported_.end(), 0);
  return out;
}

// Invariant between harvests: a tracked page whose written_ bit is clear is
// write-protected, so its next write faults and sets the bit.
//
// Order, all under mu_ (the thread cannot record a fault meanwhile):
//   1. drain queued faults and events;
//   2. S = written_ | discarded pages; re-protect S;
//   3. clear S's bits in written_ and report S.
// A write to p in S before its re-protect is reported now. A write after it
// faults; the fault is put aside (step 2 reads events only to get past
// EAGAIN), and resolved after step 3 by setting p's bit and then
// unprotecting p, so the next harvest reports it. Clearing before
// re-protecting would lose a write between the two (it would not fault);
// resolving a fault between re-protect and clear would leave p unprotected
// with its bit clear.
//
// Anonymous memory has one more way to lose protection: a zap (MADV_DONTNEED,
// reclaim of a discarded MADV_FREE page) drops the pte and its write-protect
// bit with it, and the kernel zaps after it hands us the REMOVE event, so the
// zap can land after the harvest that reported the event re-protected the
// page. Step 1 therefore also reads /proc/self/pagemap and counts as written
// every page that lacks the write-protect bit although its written_ bit is
// clear. Shared and hugetlb memory keep the bit through a zap (a pte marker).
std::vector<bool> WriteTracker::harvest_sync_locked() {
  drain_locked(/*defer_faults=*/false);
  if (anonymous_) mark_unprotected_anonymous_locked();
  Bitmap reported(written_.size());
  for (size_t w = 0; w < reported.size(); ++w) {
    reported[w] = (written_[w] | discarded_[w] | discarded_prev_[w]) & ~gone_[w];
  }
  const Bitmap discarded_now = discarded_;
  if (populate_before_protect_) populate_locked(reported);
  write_protect_locked(reported, /*protect=*/true, /*defer_faults=*/true);
  std::vector<bool> out(pages_, false);
  for (size_t w = 0; w < reported.size(); ++w) {
    written_[w] &= ~reported[w];
    discarded_prev_[w] = discarded_now[w] & ~gone_[w];
    discarded_[w] &= ~discarded_now[w];  // discards read during step 2 stay for the next harvest
    const uint64_t bits = reported[w] | gone_unreported_[w];
    for (uint64_t b = bits; b != 0; b &= b - 1) out[w * 64 + static_cast<size_t>(std::countr_zero(b))] = true;
    gone_unreported_[w] = 0;
  }
  resolve_deferred_locked();
  return out;
}

void WriteTracker::mark_unprotected_anonymous_locked() {
  constexpr size_t kChunk = 4096;  // pagemap entries read at once
  std::vector<uint64_t> entries(kChunk);
  for (const Run& r : tracked_runs_locked()) {
    for (size_t at = r.first; at < r.first + r.count; at += kChunk) {
      const size_t n = std::min(kChunk, r.first + r.count - at);
      const off_t offset = static_cast<off_t>((reinterpret_cast<uintptr_t>(base_) / kBasePage + at) * 8);
      const ssize_t got = ::pread(pagemap_.get(), entries.data(), n * 8, offset);
      if (got != static_cast<ssize_t>(n * 8)) {
        spdlog::warn("write tracker: reading /proc/self/pagemap: {}", got < 0 ? std::strerror(errno) : "short read");
        return;
      }
      for (size_t i = 0; i < n; ++i) {
        if ((entries[i] & kPagemapUffdWp) == 0) set_bit(written_, at + i);
      }
    }
  }
}

// Without WP_UNPOPULATED, a page zapped since it was protected is not
// populated, and protecting it would do nothing: populate those first. Only
// those: populating a protected page would raise a write fault that the
// thread cannot serve while the harvest holds the lock.
void WriteTracker::populate_locked(const Bitmap& pages) {
  std::vector<uint64_t> entry(1);
  for_each_run(pages, pages_, [&](size_t first, size_t count) {
    for (size_t p = first; p < first + count; ++p) {
      const off_t offset = static_cast<off_t>((reinterpret_cast<uintptr_t>(base_) / kBasePage + p) * 8);
      if (::pread(pagemap_.get(), entry.data(), 8, offset) != 8) continue;
      if ((entry[0] & (kPagemapPresent | kPagemapSwapped)) != 0) continue;
      std::byte* addr = base_ + p * page_size_;
      if (::madvise(addr, page_size_, MADV_POPULATE_WRITE) != 0 && errno == EINVAL) touch_pages(addr, page_size_);
    }
  });
}

}  // namespace pagewire
