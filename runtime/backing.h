// The memory behind an attached region: private anonymous memory (4 KiB
// pages, or 2 MiB hugetlb pages), or shared memory (a memfd, on shmem or
// hugetlbfs) mapped twice, once for the application and once as the alias
// that reads land in. Or another process's memory (pagewire handler
// serving a VMM): the ranges it mapped, each holding a run of the source's
// pages, never touched here except through that process's userfaultfd.
#pragma once

#include <sys/types.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/unique_fd.h"
#include "pagewire/region.h"

namespace pagewire {

inline constexpr uint32_t kSmallPage = 4096;
inline constexpr uint32_t kHugePage = 2u << 20;

// Where a run of the region's pages is: `pages` pages from `first_page`
// at `addr`, in the address space of the process whose memory it is.
struct Segment {
  uintptr_t addr = 0;
  size_t first_page = 0;
  size_t pages = 0;
};

struct Backing {
  Mapping view;    // what the application touches; registered with the uffd
  Mapping alias;   // shared only: the same pages, for reads to land in
  UniqueFd memfd;  // shared only
  bool shared = false;
  bool huge = false;
  // Another process's memory: its pid (0: this process's own view).
  pid_t foreign_pid = 0;
  // Its pidfd (owned by whoever serves it, open while the backing is): what
  // tells whether it still runs, and what signals it.
  int foreign_pidfd = -1;
  // Where the pages are, by first_page, never overlapping: the view, or
  // the other process's ranges. Pages in none are not the region's.
  std::vector<Segment> segments{};
  uint64_t foreign_bytes = 0;  // the region's size in another process

  uint32_t page_size() const { return huge ? kHugePage : kSmallPage; }
  // `length` rounded up to whole pages.
  uint64_t rounded(uint64_t length) const { return (length + page_size() - 1) / page_size() * page_size(); }
  bool foreign() const { return foreign_pid != 0; }
  // The region's bytes, in whole pages.
  uint64_t bytes() const { return foreign() ? foreign_bytes : view.size(); }
  // Where `page` is (in the process whose memory it is); nullptr for a page
  // in no segment.
  std::byte* addr(size_t page) const {
    if (segments.size() == 1 && !foreign()) return view.data() + page * page_size();
    const Segment* s = segment_of(page);
    return s == nullptr ? nullptr : reinterpret_cast<std::byte*>(s->addr + (page - s->first_page) * page_size());
  }
  // The page at `address`; false when no segment holds it.
  bool page_of(uint64_t address, size_t* page) const {
    for (const Segment& s : segments) {
      if (address >= s.addr && address - s.addr < s.pages * page_size()) {
        *page = s.first_page + (address - s.addr) / page_size();
        return true;
      }
    }
    return false;
  }
  // Calls f(addr, first, count) for each part of [first, first+count) that
  // is contiguous in memory (one call for the region's own view).
  template <typename F>
  void for_each_range(size_t first, size_t count, F f) const {
    for (const Segment& s : segments) {
      const size_t from = std::max(first, s.first_page);
      const size_t to = std::min(first + count, s.first_page + s.pages);
      if (from < to) f(reinterpret_cast<std::byte*>(s.addr + (from - s.first_page) * page_size()), from, to - from);
    }
  }

  // Maps `length` bytes (rounded up to the page size) as the options ask.
  // Throws pagewire::Error: kNoMemory, with how to reserve them, when 2 MiB
  // pages are not reserved; kInvalidArgument for a memfd that cannot back
  // the region.
  static Backing create(uint64_t length, const AttachOptions& options);
  // Another process's memory, `length` bytes of the region in pages of
  // `page_size` (4 KiB or 2 MiB), at `segments` there: anonymous, or with
  // `memfd` (>= 0) shared memory it maps from that memfd, each segment at
  // the memfd offset of its first source page. The memfd is duplicated and
  // mapped here as the alias. Throws kInvalidArgument for segments that
  // overlap or lie past the region, or a memfd that cannot back them.
  static Backing foreign_memory(pid_t pid, int pidfd, std::vector<Segment> segments, uint64_t length,
                                uint32_t page_size, int memfd = -1);
  // Shared memory: allocates every page of the memfd that a segment holds
  // now, through the alias (holes zero-filled, pages the memfd holds kept),
  // so that a fault neither allocates a page nor maps the alias.
  void populate();

 private:
  const Segment* segment_of(size_t page) const {
    auto it = std::upper_bound(segments.begin(), segments.end(), page,
                               [](size_t p, const Segment& s) { return p < s.first_page; });
    if (it == segments.begin()) return nullptr;
    --it;
    return page - it->first_page < it->pages ? &*it : nullptr;
  }
};

// How many 2 MiB pages are reserved and free now (from sysfs; 0 when the
// kernel has none).
struct HugePageCount {
  uint64_t total = 0;
  uint64_t free = 0;
};
HugePageCount huge_pages_2m();

}  // namespace pagewire
