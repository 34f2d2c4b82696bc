// Residency probes: whether a page of the region is still there, asked of
// the kernel rather than of the page table (the application may have
// discarded a page the table calls present).
//  - anonymous 4 KiB pages: /proc/self/pagemap (present or swapped out);
//    mincore, which calls a swapped page absent, where pagemap is missing;
//  - shared memory on shmem: the memfd's data and holes (SEEK_DATA/HOLE);
//  - hugetlb (never swapped): mincore, of the alias for shared memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/unique_fd.h"
#include "runtime/backing.h"

namespace pagewire {

class Residency {
 public:
  Residency(const Backing& backing, uint32_t page_size, size_t pages);

  // Anonymous memory: the page's first 4 KiB is mapped or swapped out.
  bool resident(size_t page) const;
  // Whether resident() can tell at all (false: another process's memory
  // whose pagemap cannot be read here; every page then counts as held).
  bool can_tell() const { return !backing_.foreign() || static_cast<bool>(pagemap_); }
  // Shared memory: the memfd still holds the page (no hole punched there).
  bool memfd_holds(size_t page) const;
  // Whichever of the two the backing asks.
  bool holds(size_t page) const { return backing_.shared ? memfd_holds(page) : resident(page); }
  // holds() for every page at once; empty when it cannot be told.
  std::vector<bool> held_pages() const;

 private:
  std::vector<bool> shmem_held() const;
  bool pagemap_held(std::vector<bool>& held) const;

  const Backing& backing_;
  uint32_t page_size_;
  size_t pages_;
  UniqueFd pagemap_;  // /proc/self/pagemap, for anonymous 4 KiB pages
};

}  // namespace pagewire
