// Harvests: the pages written since the last one, re-armed (see
// WriteTracker::harvest). Async: one PAGEMAP_SCAN walk. Sync: the fault
// thread's bits, with the pages re-protected before their bits clear.
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>

#include "runtime/write_protect.h"
#include "runtime/write_tracker.h"
#include "spdlog/spdlog.h"

namespace pagewire {

using wtrack::for_each_run;
using wtrack::kBasePage;
using wtrack::kPagemapPresent;
using wtrack::kPagemapSwapped;
using wtrack::kPagemapUffdWp;
using wtrack::set_bit;
using wtrack::test_bit;
using wtrack::touch_pages;
using wtrack::write_protect;

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
