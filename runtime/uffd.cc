#include "runtime/uffd.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "pagewire/error.h"
#include "runtime/uffd_compat.h"
#include "spdlog/spdlog.h"

namespace pagewire {
namespace {

UniqueFd open_raw() {
  int flags = O_CLOEXEC | O_NONBLOCK;
  int fd = static_cast<int>(::syscall(SYS_userfaultfd, flags));
  if (fd >= 0) return UniqueFd(fd);
  const int syscall_err = errno;
  // Without CAP_SYS_PTRACE and with vm.unprivileged_userfaultfd=0 the
  // syscall refuses; /dev/userfaultfd grants the same by file permission.
  UniqueFd dev(::open("/dev/userfaultfd", O_RDWR | O_CLOEXEC));
  if (dev) {
    fd = ::ioctl(dev.get(), USERFAULTFD_IOC_NEW, flags);
    if (fd >= 0) return UniqueFd(fd);
  }
  const int dev_err = errno;
  std::string advice;
  if (syscall_err == ENOSYS) {
    advice = "this kernel has no userfaultfd (CONFIG_USERFAULTFD is off)";
  } else {
    advice = std::string("userfaultfd is not permitted (userfaultfd(2): ") + std::strerror(syscall_err) +
             "; /dev/userfaultfd: " + std::strerror(dev_err) +
             "). Run as root or with CAP_SYS_PTRACE, or set `sysctl -w vm.unprivileged_userfaultfd=1`, "
             "or give this user read-write access to /dev/userfaultfd";
  }
  throw Error(Errc::kUffdUnavailable, advice);
}

}  // namespace

uint64_t Userfaultfd::kernel_features() {
  UniqueFd fd = open_raw();
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = 0;
  if (::ioctl(fd.get(), UFFDIO_API, &api) != 0) throw_errno("UFFDIO_API");
  return api.features;
}

Userfaultfd Userfaultfd::adopt(UniqueFd fd, uint64_t assumed) {
  // Read like one of ours: never blocking (the other process may have made
  // it blocking; the flag is its open file's, shared with it, and it only
  // handed the descriptor over).
  const int flags = ::fcntl(fd.get(), F_GETFL);
  if (flags < 0 || ::fcntl(fd.get(), F_SETFL, flags | O_NONBLOCK) != 0)
    throw_errno("fcntl(O_NONBLOCK) of a userfaultfd");
  // What the other process negotiated (UFFDIO_API), as its fdinfo says
  // ("API:\t<api>:<features>:<ioctls>"), and what the kernel has that
  // needs no negotiating (`assumed`).
  uint64_t features = assumed;
  std::ifstream info("/proc/self/fdinfo/" + std::to_string(fd.get()));
  for (std::string line; std::getline(info, line);) {
    unsigned long long api = 0, ioctls = 0;
    unsigned negotiated = 0;
    if (std::sscanf(line.c_str(), "API:\t%llx:%x:%llx", &api, &negotiated, &ioctls) == 3) features |= negotiated;
  }
  Userfaultfd u(std::move(fd), features);
  u.foreign_ = true;
  return u;
}

Userfaultfd Userfaultfd::open(uint64_t wanted_features) {
  // UFFDIO_API can be called once per descriptor, so the offer is read on a
  // throw-away descriptor and the subset asked for on the real one.
  const uint64_t offered = kernel_features();
  UniqueFd fd = open_raw();
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = wanted_features & offered;
  if (::ioctl(fd.get(), UFFDIO_API, &api) != 0) throw_errno("UFFDIO_API");
  return Userfaultfd(std::move(fd), wanted_features & offered);
}

void Userfaultfd::split(void* base, size_t len, unsigned parts, size_t page) {
  const size_t pages = len / page;
  if (pages < 2 || parts < 2) return;
  parts = static_cast<unsigned>(std::min<size_t>(parts, pages));
  const size_t per = (pages + parts - 1) / parts;
  const auto start = reinterpret_cast<uintptr_t>(base);
  for (unsigned i = 0; i < parts && i * per < pages; ++i) {
    int fd = fd_.get();
    if (i > 0) {
      more_.push_back(open(features_).fd_);
      fd = more_.back().get();
    }
    parts_.push_back({start + i * per * page, start + std::min(pages, (i + 1) * per) * page, fd});
  }
}

template <typename F>
int Userfaultfd::each(uintptr_t start, size_t len, F f) const {
  if (parts_.empty()) return f(fd_.get(), start, len);
  const uintptr_t end = start + len;
  uintptr_t at = start;
  // Before the first part and after the last (a range mremap moved out of
  // one): its userfaultfd is whichever part's it came from, so every part's
  // is asked, and one that succeeds is enough (a wake wakes on each).
  const auto outside = [&](uintptr_t from, uintptr_t to) {
    int first_error = 0;
    bool any = false;
    for (const Part& p : parts_) {
      const int rc = f(p.fd, from, to - from);
      any = any || rc == 0;
      if (rc != 0 && first_error == 0) first_error = rc;
    }
    return any ? 0 : first_error;
  };
  if (at < parts_.front().start) {
    const uintptr_t to = std::min(end, parts_.front().start);
    if (const int rc = outside(at, to); rc != 0) return rc;
    at = to;
  }
  for (const Part& p : parts_) {
    if (at >= end) return 0;
    if (at >= p.end) continue;
    const uintptr_t to = std::min(end, p.end);
    if (const int rc = f(p.fd, at, to - at); rc != 0) return rc;
    at = to;
  }
  return at < end ? outside(at, end) : 0;
}

void Userfaultfd::register_range(void* addr, size_t len, bool minor) {
  each(reinterpret_cast<uintptr_t>(addr), len, [&](int fd, uintptr_t at, size_t n) {
    uffdio_register reg{};
    reg.range.start = at;
    reg.range.len = n;
    reg.mode = UFFDIO_REGISTER_MODE_MISSING | (minor ? UFFDIO_REGISTER_MODE_MINOR : 0);
    if (::ioctl(fd, UFFDIO_REGISTER, &reg) != 0) {
      throw_errno(minor ? "UFFDIO_REGISTER (missing and minor faults)" : "UFFDIO_REGISTER");
    }
    const uint64_t needed = minor ? _UFFDIO_CONTINUE : _UFFDIO_COPY;
    if ((reg.ioctls & (1ull << needed)) == 0) {
      throw Error(Errc::kUffdUnavailable,
                  std::string(minor ? "UFFDIO_CONTINUE" : "UFFDIO_COPY") + " is not offered for this range");
    }
    return 0;
  });
}

void Userfaultfd::register_missing_and_wp(void* addr, size_t len) {
  each(reinterpret_cast<uintptr_t>(addr), len, [&](int fd, uintptr_t at, size_t n) {
    uffdio_register reg{};
    reg.range.start = at;
    reg.range.len = n;
    reg.mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP;
    if (::ioctl(fd, UFFDIO_REGISTER, &reg) != 0) throw_errno("UFFDIO_REGISTER (missing and write-protect faults)");
    if ((reg.ioctls & (1ull << _UFFDIO_WRITEPROTECT)) == 0 || (reg.ioctls & (1ull << _UFFDIO_COPY)) == 0) {
      throw Error(Errc::kUffdUnavailable, "UFFDIO_WRITEPROTECT is not offered for this range");
    }
    return 0;
  });
}

void Userfaultfd::unregister(void* addr, size_t len) {
  each(reinterpret_cast<uintptr_t>(addr), len, [&](int fd, uintptr_t at, size_t n) {
    uffdio_range range{at, n};
    if (::ioctl(fd, UFFDIO_UNREGISTER, &range) != 0) throw_errno("UFFDIO_UNREGISTER");
    return 0;
  });
}

int Userfaultfd::read_events(unsigned part, std::span<uffd_msg> msgs) {
  for (;;) {
    ssize_t n = ::read(fd(part), msgs.data(), msgs.size_bytes());
    if (n >= 0) return static_cast<int>(n / static_cast<ssize_t>(sizeof(uffd_msg)));
    if (errno == EINTR) continue;
    if (errno == EAGAIN) return 0;
    return -errno;
  }
}

namespace {

thread_local PendingEvents* tl_pending_events = nullptr;

// The loop UFFDIO_COPY and UFFDIO_ZEROPAGE share. `issue(offset, len)` runs
// the ioctl on [offset, offset+len) and returns 0 or errno, with *done set
// to the bytes it installed before failing.
template <typename Issue>
int install_pages(size_t len, size_t page, uint64_t* retries, uint64_t* existed, Issue issue) {
  size_t at = 0;
  while (at < len) {
    int64_t done = 0;
    const int err = issue(at, len - at, &done);
    if (err == 0) return 0;
    if (err == EEXIST) {
      // This page is present already (its waiters are woken with the rest
      // of the range); the rest of the run still needs installing.
      if (existed != nullptr) ++*existed;
      at += page;
      continue;
    }
    if (err != EAGAIN) return err;
    // The address space is changing under us: retry from where the ioctl
    // got to, reading a pending munmap or mremap event first (until it is
    // read, every install fails so).
    if (retries != nullptr) ++*retries;
    if (done > 0) {
      at += static_cast<size_t>(done);
    } else {
      if (tl_pending_events != nullptr) tl_pending_events->read_pending_events();
      sched_yield();
    }
  }
  return 0;
}

}  // namespace

void set_thread_pending_events(PendingEvents* reader) { tl_pending_events = reader; }

void read_thread_pending_events() {
  if (tl_pending_events != nullptr) tl_pending_events->read_pending_events();
  sched_yield();
}

int Userfaultfd::copy(void* dst, const void* src, size_t len, size_t page, uint64_t* retries, uint64_t* existed,
                      bool protect) {
  const auto base = reinterpret_cast<uintptr_t>(dst);
  return each(base, len, [&](int fd, uintptr_t start, size_t part_len) {
    const uintptr_t from = reinterpret_cast<uintptr_t>(src) + (start - base);
    return install_pages(part_len, page, retries, existed, [&](size_t at, size_t n, int64_t* done) {
      uffdio_copy c{};
      c.dst = start + at;
      c.src = from + at;
      c.len = n;
      c.mode = UFFDIO_COPY_MODE_DONTWAKE | (protect ? UFFDIO_COPY_MODE_WP : 0);
      if (::ioctl(fd, UFFDIO_COPY, &c) == 0) return 0;
      *done = c.copy;
      return errno;
    });
  });
}

int Userfaultfd::zeropage(void* addr, size_t len, size_t page, uint64_t* retries, uint64_t* existed) {
  return each(reinterpret_cast<uintptr_t>(addr), len, [&](int fd, uintptr_t start, size_t part_len) {
    return install_pages(part_len, page, retries, existed, [&](size_t at, size_t n, int64_t* done) {
      uffdio_zeropage z{};
      z.range.start = start + at;
      z.range.len = n;
      z.mode = UFFDIO_ZEROPAGE_MODE_DONTWAKE;
      if (::ioctl(fd, UFFDIO_ZEROPAGE, &z) == 0) return 0;
      *done = z.zeropage;
      return errno;
    });
  });
}

int Userfaultfd::map_in_place(void* addr, size_t len, size_t page, uint64_t* retries, uint64_t* existed) {
  return each(reinterpret_cast<uintptr_t>(addr), len, [&](int fd, uintptr_t start, size_t part_len) {
    return install_pages(part_len, page, retries, existed, [&](size_t at, size_t n, int64_t* done) {
      uffdio_continue c{};
      c.range.start = start + at;
      c.range.len = n;
      c.mode = UFFDIO_CONTINUE_MODE_DONTWAKE;
      if (::ioctl(fd, UFFDIO_CONTINUE, &c) == 0) return 0;
      *done = c.mapped;
      return errno;
    });
  });
}

int Userfaultfd::copy_once(void* dst, const void* src, size_t len, size_t* done) {
  uffdio_copy c{};
  c.dst = reinterpret_cast<uint64_t>(dst);
  c.src = reinterpret_cast<uint64_t>(src);
  c.len = len;
  c.mode = UFFDIO_COPY_MODE_DONTWAKE;
  const int rc = ::ioctl(fd_.get(), UFFDIO_COPY, &c) == 0 ? 0 : errno;
  *done = c.copy > 0 ? static_cast<size_t>(c.copy) : 0;
  return rc;
}

int Userfaultfd::zeropage_once(void* dst, size_t len, size_t* done) {
  uffdio_zeropage z{};
  z.range.start = reinterpret_cast<uint64_t>(dst);
  z.range.len = len;
  z.mode = UFFDIO_ZEROPAGE_MODE_DONTWAKE;
  const int rc = ::ioctl(fd_.get(), UFFDIO_ZEROPAGE, &z) == 0 ? 0 : errno;
  *done = z.zeropage > 0 ? static_cast<size_t>(z.zeropage) : 0;
  return rc;
}

int Userfaultfd::continue_once(void* addr, size_t len, size_t* done) {
  uffdio_continue c{};
  c.range.start = reinterpret_cast<uint64_t>(addr);
  c.range.len = len;
  c.mode = UFFDIO_CONTINUE_MODE_DONTWAKE;
  const int rc = ::ioctl(fd_.get(), UFFDIO_CONTINUE, &c) == 0 ? 0 : errno;
  *done = c.mapped > 0 ? static_cast<size_t>(c.mapped) : 0;
  return rc;
}

int Userfaultfd::wake(void* addr, size_t len) const {
  return each(reinterpret_cast<uintptr_t>(addr), len, [](int fd, uintptr_t start, size_t n) {
    uffdio_range range{start, n};
    return ::ioctl(fd, UFFDIO_WAKE, &range) == 0 ? 0 : errno;
  });
}

int Userfaultfd::write_protect(void* addr, size_t len, bool on) {
  return each(reinterpret_cast<uintptr_t>(addr), len, [&](int fd, uintptr_t start, size_t n) {
    uffdio_writeprotect wp{};
    wp.range.start = start;
    wp.range.len = n;
    // (DONTWAKE is only valid when lifting: protecting wakes nobody.)
    wp.mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
    // EAGAIN: an address-space event is pending. A thread that reads events
    // reads it here; any other gives up after a while (the caller retries
    // later) rather than wait on a reader that may be waiting on it.
    for (int tries = 0;; ++tries) {
      if (::ioctl(fd, UFFDIO_WRITEPROTECT, &wp) == 0) return 0;
      if (errno != EAGAIN || tries == 1000) return errno;
      if (tl_pending_events != nullptr) tl_pending_events->read_pending_events();
      sched_yield();
    }
  });
}

int Userfaultfd::refuse(void* addr, size_t len) {
  if (has(UFFD_FEATURE_POISON)) {
    const int rc = each(reinterpret_cast<uintptr_t>(addr), len, [](int fd, uintptr_t start, size_t n) {
      uffdio_poison p{};
      p.range.start = start;
      p.range.len = n;
      p.mode = 0;
      for (;;) {
        if (::ioctl(fd, UFFDIO_POISON, &p) == 0 || errno == EEXIST) return 0;  // woken below
        if (errno == ENOENT) return ENOENT;                                    // the range is gone
        if (errno == ESRCH) return ESRCH;  // the process whose memory it is has gone
        if (errno != EAGAIN) return -1;    // try the protection below
        if (tl_pending_events != nullptr) tl_pending_events->read_pending_events();
        sched_yield();
      }
    });
    if (rc == 0) return wake(addr, len);
    if (rc > 0) return rc;
  }
  // Another process's memory cannot be protected from here.
  if (foreign_) return ENOTSUP;
  // No UFFDIO_POISON: a page that can never be fetched is made inaccessible
  // so that its waiters fault with SIGSEGV instead of reading zeros.
  if (::mprotect(addr, len, PROT_NONE) != 0) return errno;
  return wake(addr, len);
}

std::string describe_uffd_features(uint64_t f) {
  struct Named {
    uint64_t bit;
    const char* name;
  };
  static constexpr Named kNames[] = {
      {UFFD_FEATURE_PAGEFAULT_FLAG_WP, "pagefault_flag_wp"},
      {UFFD_FEATURE_EVENT_FORK, "event_fork"},
      {UFFD_FEATURE_EVENT_REMAP, "event_remap"},
      {UFFD_FEATURE_EVENT_REMOVE, "event_remove"},
      {UFFD_FEATURE_MISSING_HUGETLBFS, "missing_hugetlbfs"},
      {UFFD_FEATURE_MISSING_SHMEM, "missing_shmem"},
      {UFFD_FEATURE_EVENT_UNMAP, "event_unmap"},
      {UFFD_FEATURE_SIGBUS, "sigbus"},
      {UFFD_FEATURE_THREAD_ID, "thread_id"},
      {UFFD_FEATURE_MINOR_HUGETLBFS, "minor_hugetlbfs"},
      {UFFD_FEATURE_MINOR_SHMEM, "minor_shmem"},
      {UFFD_FEATURE_EXACT_ADDRESS, "exact_address"},
      {UFFD_FEATURE_WP_HUGETLBFS_SHMEM, "wp_hugetlbfs_shmem"},
      {UFFD_FEATURE_WP_UNPOPULATED, "wp_unpopulated"},
      {UFFD_FEATURE_POISON, "poison"},
      {UFFD_FEATURE_WP_ASYNC, "wp_async"},
      {UFFD_FEATURE_MOVE, "move"},
  };
  std::string out;
  for (const auto& n : kNames) {
    if ((f & n.bit) == 0) continue;
    if (!out.empty()) out += ' ';
    out += n.name;
  }
  return out.empty() ? "none" : out;
}

}  // namespace pagewire
