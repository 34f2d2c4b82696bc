// The memory behind an attached region: private anonymous memory (4 KiB
// pages, or 2 MiB hugetlb pages), or shared memory (a memfd, on shmem or
// hugetlbfs) mapped twice, once for the application and once as the alias
// that reads land in.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/unique_fd.h"
#include "pagewire/region.h"

namespace pagewire {

inline constexpr uint32_t kSmallPage = 4096;
inline constexpr uint32_t kHugePage = 2u << 20;

struct Backing {
  Mapping view;    // what the application touches; registered with the uffd
  Mapping alias;   // shared only: the same pages, for reads to land in
  UniqueFd memfd;  // shared only
  bool shared = false;
  bool huge = false;

  uint32_t page_size() const { return huge ? kHugePage : kSmallPage; }
  // `length` rounded up to whole pages.
  uint64_t rounded(uint64_t length) const { return (length + page_size() - 1) / page_size() * page_size(); }

  // Maps `length` bytes (rounded up to the page size) as the options ask.
  // Throws pagewire::Error: kNoMemory, with how to reserve them, when 2 MiB
  // pages are not reserved; kInvalidArgument for a memfd that cannot back
  // the region.
  static Backing create(uint64_t length, const AttachOptions& options);
  // Shared memory: allocates every page of the memfd now, through the alias
  // (holes zero-filled, pages a caller's memfd holds kept), so that a fault
  // neither allocates a page nor maps the alias.
  void populate();
};

// How many 2 MiB pages are reserved and free now (from sysfs; 0 when the
// kernel has none).
struct HugePageCount {
  uint64_t total = 0;
  uint64_t free = 0;
};
HugePageCount huge_pages_2m();

}  // namespace pagewire
