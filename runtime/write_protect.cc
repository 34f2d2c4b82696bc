#include "runtime/write_protect.h"

#include <fcntl.h>
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
#include "spdlog/spdlog.h"

namespace pagewire::wtrack {

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

namespace {

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

}  // namespace

const Probe& probe() {
  static const Probe p = run_probe();
  return p;
}

}  // namespace pagewire::wtrack

namespace pagewire {

const char* to_string(TrackingMode m) {
  switch (m) {
    case TrackingMode::kAuto: return "auto";
    case TrackingMode::kAsync: return "async";
    case TrackingMode::kSync: return "sync";
  }
  return "?";
}

TrackingMode probe_tracking() {
  const wtrack::Probe& p = wtrack::probe();
  if (!p.error.empty()) throw Error(Errc::kUffdUnavailable, p.error);
  return p.mode;
}

}  // namespace pagewire
