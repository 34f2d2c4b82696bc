#include "runtime/backing.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <linux/memfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <string>

#include "pagewire/error.h"

namespace pagewire {
namespace {

#ifndef MAP_HUGE_2MB
#define MAP_HUGE_2MB (21 << MAP_HUGE_SHIFT)
#endif

uint64_t read_count(const char* path) {
  std::ifstream in(path);
  uint64_t v = 0;
  in >> v;
  return v;
}

[[noreturn]] void throw_no_huge_pages(uint64_t length, int err) {
  const HugePageCount have = huge_pages_2m();
  const uint64_t need = (length + kHugePage - 1) / kHugePage;
  const uint64_t want = have.total + (need > have.free ? need - have.free : 0);
  throw Error(Errc::kNoMemory,
              "cannot map " + std::to_string(need) + " 2 MiB huge pages (" + std::strerror(err) +
                  "): " + std::to_string(have.free) + " free of " + std::to_string(have.total) +
                  " reserved. Reserve them as root with `sysctl vm.nr_hugepages=" + std::to_string(want) +
                  "` (or echo " + std::to_string(want) +
                  " > /proc/sys/vm/nr_hugepages; hugepages=N on the kernel command line reserves them at boot)");
}

Mapping map_shared(int fd, size_t length, bool huge) {
  void* p = ::mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    if (huge && errno == ENOMEM) throw_no_huge_pages(length, errno);
    throw_errno("mmap of the region's memfd (" + std::to_string(length) + " bytes)");
  }
  return Mapping(p, length);
}

// Checks a memfd handed in to back shared memory and returns a duplicate of
// it; *huge says whether it is on hugetlbfs (2 MiB pages).
UniqueFd adopt_memfd(int memfd, uint64_t length, bool want_huge, bool* huge) {
  struct statfs fs {};
  struct stat st {};
  if (::fstatfs(memfd, &fs) != 0 || ::fstat(memfd, &st) != 0) {
    throw Error(Errc::kInvalidArgument, std::string("the memfd given cannot be examined: ") + std::strerror(errno));
  }
  const bool hugetlbfs = static_cast<uint64_t>(fs.f_type) == HUGETLBFS_MAGIC;
  if (!hugetlbfs && static_cast<uint64_t>(fs.f_type) != TMPFS_MAGIC) {
    throw Error(Errc::kInvalidArgument,
                "the memfd given is neither shared memory (memfd_create, tmpfs) nor hugetlbfs: minor faults "
                "need one of those");
  }
  if (want_huge && !hugetlbfs) {
    throw Error(Errc::kInvalidArgument,
                "huge pages were asked for, but the memfd given is on shmem (4 KiB pages): create it with "
                "MFD_HUGETLB | MFD_HUGE_2MB");
  }
  if (hugetlbfs && fs.f_bsize != kHugePage) {
    throw Error(Errc::kInvalidArgument, "the memfd given is on hugetlbfs with " + std::to_string(fs.f_bsize >> 10) +
                                            " KiB pages; pagewire uses 2 MiB pages (MFD_HUGE_2MB)");
  }
  const int mode = ::fcntl(memfd, F_GETFL);
  if (mode < 0 || (mode & O_ACCMODE) != O_RDWR) {
    throw Error(Errc::kInvalidArgument, "the memfd given is not open for reading and writing");
  }
  const int seals = ::fcntl(memfd, F_GET_SEALS);
  if (seals > 0 && (seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE)) != 0) {
    throw Error(Errc::kInvalidArgument, "the memfd given is sealed against writes (F_SEAL_WRITE or "
                                        "F_SEAL_FUTURE_WRITE): pagewire writes the source's pages into it");
  }
  *huge = hugetlbfs;
  const uint64_t page = hugetlbfs ? kHugePage : kSmallPage;
  const uint64_t need = (length + page - 1) / page * page;
  if (static_cast<uint64_t>(st.st_size) < need) {
    throw Error(Errc::kInvalidArgument, "the memfd given holds " + std::to_string(st.st_size) +
                                            " bytes; the region needs " + std::to_string(need));
  }
  const int fd = ::fcntl(memfd, F_DUPFD_CLOEXEC, 0);
  if (fd < 0) throw_errno("dup of the memfd given");
  return UniqueFd(fd);
}

}  // namespace

HugePageCount huge_pages_2m() {
  return {read_count("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"),
          read_count("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")};
}

Backing Backing::create(uint64_t length, const AttachOptions& options) {
  Backing b;
  b.shared = options.memory == AttachOptions::Memory::kShared;
  b.huge = options.huge_pages;
  if (!b.shared && options.memfd >= 0) {
    throw Error(Errc::kInvalidArgument, "a memfd backs shared memory only: set memory to kShared");
  }
  if (b.shared && options.memfd >= 0) b.memfd = adopt_memfd(options.memfd, length, b.huge, &b.huge);
  const size_t size = b.rounded(length);
  if (!b.shared) {
    if (!b.huge) {
      b.view = Mapping::anonymous(size);
      b.segments = {{reinterpret_cast<uintptr_t>(b.view.data()), 0, size / b.page_size()}};
      return b;
    }
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_HUGE_2MB,
                     -1, 0);
    if (p == MAP_FAILED) {
      if (errno == ENOMEM) throw_no_huge_pages(size, errno);
      throw_errno("mmap of " + std::to_string(size) + " bytes of 2 MiB hugetlb pages");
    }
    b.view = Mapping(p, size);
    b.segments = {{reinterpret_cast<uintptr_t>(b.view.data()), 0, size / b.page_size()}};
    return b;
  }
  if (!b.memfd) {
    const unsigned flags = MFD_CLOEXEC | (b.huge ? MFD_HUGETLB | MFD_HUGE_2MB : 0u);
    const int fd = ::memfd_create("pagewire", flags);
    if (fd < 0) throw_errno("memfd_create");
    b.memfd = UniqueFd(fd);
    if (::ftruncate(b.memfd.get(), static_cast<off_t>(size)) != 0) throw_errno("ftruncate of the memfd");
  }
  b.view = map_shared(b.memfd.get(), size, b.huge);
  b.alias = map_shared(b.memfd.get(), size, b.huge);
  b.segments = {{reinterpret_cast<uintptr_t>(b.view.data()), 0, size / b.page_size()}};
  return b;
}

Backing Backing::foreign_memory(pid_t pid, int pidfd, std::vector<Segment> segments, uint64_t length,
                                uint32_t page_size, int memfd) {
  Backing b;
  b.foreign_pid = pid;
  b.foreign_pidfd = pidfd;
  b.huge = page_size == kHugePage;
  if (page_size != kSmallPage && page_size != kHugePage) {
    throw Error(Errc::kInvalidArgument, "page size " + std::to_string(page_size) + " is not 4096 or 2097152");
  }
  b.foreign_bytes = b.rounded(length);
  const size_t pages = b.foreign_bytes / page_size;
  std::sort(segments.begin(), segments.end(),
            [](const Segment& x, const Segment& y) { return x.first_page < y.first_page; });
  for (size_t i = 0; i < segments.size(); ++i) {
    const Segment& s = segments[i];
    if (s.pages == 0 || s.addr % page_size != 0) {
      throw Error(Errc::kInvalidArgument, "a mapping at " + std::to_string(s.addr) + " is empty or not aligned to " +
                                              std::to_string(page_size) + " bytes");
    }
    if (s.first_page + s.pages > pages || s.first_page + s.pages < s.first_page) {
      throw Error(Errc::kInvalidArgument, "a mapping of " + std::to_string(s.pages) + " pages at source page " +
                                              std::to_string(s.first_page) + " lies past the source's " +
                                              std::to_string(pages) + " pages");
    }
    if (i > 0 && segments[i - 1].first_page + segments[i - 1].pages > s.first_page) {
      throw Error(Errc::kInvalidArgument,
                  "two mappings hold the same source pages (from page " + std::to_string(s.first_page) + ")");
    }
    for (size_t j = 0; j < i; ++j) {
      const Segment& o = segments[j];
      const uint64_t a_end = s.addr + s.pages * page_size;
      const uint64_t o_end = o.addr + o.pages * page_size;
      if (s.addr < o_end && o.addr < a_end) {
        throw Error(Errc::kInvalidArgument, "two mappings overlap in memory (at " + std::to_string(s.addr) + ")");
      }
    }
  }
  b.segments = std::move(segments);
  if (memfd >= 0) {
    // Reads land in the memfd, through the alias, at the source offset:
    // mapped up to the end of the last segment.
    b.shared = true;
    const Segment& last = b.segments.back();
    const uint64_t need = (last.first_page + last.pages) * uint64_t{page_size};
    bool huge = false;
    b.memfd = adopt_memfd(memfd, need, b.huge, &huge);
    if (huge != b.huge) {
      throw Error(Errc::kInvalidArgument, "the memfd sent is on hugetlbfs (2 MiB pages), but the mappings say " +
                                              std::to_string(page_size) + "-byte pages");
    }
    // Sealed against shrinking: a memfd the process truncated under the
    // alias would make the handler's own writes fault (SIGBUS here, in
    // the daemon that serves every other process too).
    const int seals = ::fcntl(b.memfd.get(), F_GET_SEALS);
    if (seals < 0 || (seals & F_SEAL_SHRINK) == 0) {
      throw Error(Errc::kInvalidArgument,
                  "the memfd sent is not sealed against shrinking: create it with MFD_ALLOW_SEALING and add "
                  "F_SEAL_SHRINK (fcntl F_ADD_SEALS) before handing it over");
    }
    b.alias = map_shared(b.memfd.get(), need, b.huge);
  }
  return b;
}

void Backing::populate() {
  if (!shared) return;
  // Allocate the memory now, through the alias (holes are zero-filled,
  // pages a caller's memfd holds already are kept): a fault then neither
  // allocates a page nor maps the alias, and measured here that is what
  // kept shared memory from matching UFFDIO_COPY (p50 +24% without it,
  // +4% with it, all threads on one CPU).
  for (const Segment& s : segments) {
    std::byte* at = alias.data() + s.first_page * page_size();
    if (::madvise(at, s.pages * page_size(), MADV_POPULATE_WRITE) != 0) {
      if (huge && errno == ENOMEM) throw_no_huge_pages(s.pages * page_size(), errno);
      throw_errno("madvise(MADV_POPULATE_WRITE) of the region's memfd");
    }
  }
}

}  // namespace pagewire
