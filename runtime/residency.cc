#include "runtime/residency.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <string>

namespace pagewire {
namespace {

// /proc/self/pagemap: one 64-bit entry per 4 KiB of virtual memory; bit 63
// says present, bit 62 swapped out.
constexpr uint64_t kPagemapPresent = uint64_t{1} << 63;
constexpr uint64_t kPagemapSwapped = uint64_t{1} << 62;

// The pagemap entries of `count` 4 KiB pages from `addr` (false when they
// cannot be read).
bool read_pagemap(int fd, const std::byte* addr, uint64_t* entries, size_t count) {
  const size_t bytes = count * sizeof(uint64_t);
  const auto at = static_cast<off_t>(reinterpret_cast<uintptr_t>(addr) / kSmallPage * sizeof(uint64_t));
  auto* out = reinterpret_cast<char*>(entries);
  for (size_t done = 0; done < bytes;) {
    const ssize_t n = ::pread(fd, out + done, bytes - done, at + static_cast<off_t>(done));
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

}  // namespace

Residency::Residency(const Backing& backing, uint32_t page_size, size_t pages)
    : backing_(backing), page_size_(page_size), pages_(pages) {
  if (backing_.foreign()) {
    // Another process's pages: its pagemap (root, or the same user where
    // ptrace is allowed). Where it cannot be read, every page counts as
    // held: a fault on a page already installed is only woken.
    const std::string path = "/proc/" + std::to_string(backing_.foreign_pid) + "/pagemap";
    pagemap_ = UniqueFd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    return;
  }
  if (!backing_.shared && !backing_.huge) pagemap_ = UniqueFd(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
}

bool Residency::resident(size_t page) const {
  std::byte* addr = backing_.addr(page);
  uint64_t entry = 0;
  if (pagemap_ && read_pagemap(pagemap_.get(), addr, &entry, 1)) {
    return (entry & (kPagemapPresent | kPagemapSwapped)) != 0;
  }
  if (backing_.foreign()) return true;
  unsigned char r = 0;
  return ::mincore(addr, kSmallPage, &r) != 0 || (r & 1) != 0;
}

bool Residency::memfd_holds(size_t page) const {
  const auto off = static_cast<off_t>(page * page_size_);
  if (!backing_.huge) return ::lseek(backing_.memfd.get(), off, SEEK_DATA) == off;  // swapped pages count
  unsigned char r = 1;
  return ::mincore(backing_.alias.data() + off, kSmallPage, &r) != 0 || (r & 1) != 0;
}

std::vector<bool> Residency::shmem_held() const {
  // The holes in the memfd (SEEK_HOLE / SEEK_DATA; swapped pages are data).
  std::vector<bool> held(pages_, true);
  const int fd = backing_.memfd.get();
  const auto end = static_cast<off_t>(backing_.foreign() ? backing_.alias.size() : backing_.view.size());
  for (off_t hole = ::lseek(fd, 0, SEEK_HOLE); hole >= 0 && hole < end;) {
    off_t data = ::lseek(fd, hole, SEEK_DATA);
    if (data < 0) data = end;
    for (auto p = static_cast<size_t>(hole) / page_size_; p * page_size_ < static_cast<size_t>(data) && p < pages_;
         ++p) {
      held[p] = false;
    }
    hole = data < end ? ::lseek(fd, data, SEEK_HOLE) : end;
  }
  return held;
}

bool Residency::pagemap_held(std::vector<bool>& held) const {
  // Anonymous 4 KiB pages: mapped or swapped out (mincore would call a
  // swapped page absent, and the region would never complete). Read in
  // chunks of 512 KiB of entries.
  // A 2 MiB page (another process's hugetlb memory) by its first 4 KiB.
  const size_t per = page_size_ / kSmallPage;
  std::vector<uint64_t> e(std::min<size_t>(pages_ * per, 65536));
  bool ok = true;
  backing_.for_each_range(0, pages_, [&](std::byte* addr, size_t first, size_t count) {
    for (size_t p = 0; p < count && ok; p += e.size() / per) {
      const size_t n = std::min(e.size() / per, count - p);
      ok = read_pagemap(pagemap_.get(), addr + p * page_size_, e.data(), n * per);
      for (size_t i = 0; i < n && ok; ++i)
        held[first + p + i] = (e[i * per] & (kPagemapPresent | kPagemapSwapped)) != 0;
    }
  });
  return ok;
}

std::vector<bool> Residency::held_pages() const {
  if (backing_.shared && !backing_.huge) return shmem_held();
  std::vector<bool> held(pages_, true);
  if (pagemap_ && pagemap_held(held)) return held;
  if (backing_.foreign()) return {};
  // Anonymous memory without pagemap: the region's page tables. hugetlbfs
  // (never swapped): the alias's for shared memory (the region's may be
  // unmapped while the memfd keeps the page). One byte per 4 KiB either
  // way; a range the application unmapped counts as not held (ENOMEM).
  const Mapping& m = backing_.shared ? backing_.alias : backing_.view;
  const size_t per_page = page_size_ / kSmallPage;
  std::vector<unsigned char> r(per_page);
  for (size_t p = 0; p < pages_; ++p) {
    held[p] = ::mincore(m.data() + p * page_size_, page_size_, r.data()) == 0 && (r[0] & 1) != 0;
  }
  return held;
}

}  // namespace pagewire
