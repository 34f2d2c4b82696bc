// The kernel's side of write tracking, shared by the tracker's setup and
// fault thread (write_tracker.cc) and its harvests (write_harvest.cc):
// write-protect ioctls, /proc/self/pagemap and /proc/self/maps, bitmaps of
// one bit a page, and the probe that picks async or sync tracking.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/uffd_compat.h"
#include "runtime/write_tracker.h"

namespace pagewire::wtrack {

inline constexpr size_t kBasePage = 4096;
// /proc/self/pagemap: one 64-bit entry per base page
// (Documentation/admin-guide/mm/pagemap.rst).
inline constexpr uint64_t kPagemapPresent = 1ull << 63;
inline constexpr uint64_t kPagemapSwapped = 1ull << 62;
inline constexpr uint64_t kPagemapUffdWp = 1ull << 57;  // pte or pte marker write-protected

inline constexpr uint64_t kEventFeatures = UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP;
inline constexpr uint64_t kAsyncFeatures = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;

// --- bitmaps: one bit a page -------------------------------------------------

inline bool test_bit(const std::vector<uint64_t>& b, size_t i) { return (b[i / 64] >> (i % 64)) & 1; }
inline void set_bit(std::vector<uint64_t>& b, size_t i) { b[i / 64] |= 1ull << (i % 64); }
inline void clear_bit(std::vector<uint64_t>& b, size_t i) { b[i / 64] &= ~(1ull << (i % 64)); }

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
RangeKind describe_range(uintptr_t start, uintptr_t end);
bool is_supported_page_size(size_t page_size);
void register_write_protect(int uffd, void* addr, size_t len);
// 0, or the errno of UFFDIO_WRITEPROTECT. Unprotecting wakes the writers
// parked on the range.
int write_protect(int uffd, uintptr_t addr, size_t len, bool protect);
// Faults each page in writable without changing its contents, for kernels
// whose write-protect skips never-populated anonymous pages.
void touch_pages(std::byte* addr, size_t len);
void populate_writable(std::byte* addr, size_t len);

// --- probing -----------------------------------------------------------------

struct Probe {
  TrackingMode mode = TrackingMode::kSync;
  std::string async_missing;  // why not kAsync, empty when it works
  std::string error;          // why neither, empty when one works
};

// The probe's answer, computed once per process.
const Probe& probe();

}  // namespace pagewire::wtrack
