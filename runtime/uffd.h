// One userfaultfd: opening it (syscall, else /dev/userfaultfd), negotiating
// features with UFFDIO_API, registering ranges, and the resolving ioctls.
// The resolving calls return errno values rather than throwing: EEXIST and
// EAGAIN are ordinary outcomes on the fault path, not errors.
#pragma once

#include <linux/userfaultfd.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "common/unique_fd.h"

namespace pagewire {

// An install that the kernel answers EAGAIN with nothing done means the
// address space is changing. With non-cooperative events enabled (munmap,
// mremap), every install on the userfaultfd fails so until the event is
// read, and the task that unmaps waits until it is. A thread that installs
// names here what reads pending events; the install calls it before each
// retry, so that a handler never waits on an event only it would read.
class PendingEvents {
 public:
  virtual void read_pending_events() = 0;

 protected:
  ~PendingEvents() = default;
};
// For the calling thread (nullptr: none, it only yields before retrying).
void set_thread_pending_events(PendingEvents* reader);
// What an install does before it retries after EAGAIN: the calling
// thread's reader reads pending events, or (none) the thread yields.
void read_thread_pending_events();

class Userfaultfd {
 public:
  // Opens a non-blocking userfaultfd and enables the subset of `wanted`
  // features that the kernel offers. Throws pagewire::Error(kUffdUnavailable)
  // with advice when userfaultfd is missing or not permitted.
  static Userfaultfd open(uint64_t wanted_features);
  // Takes a userfaultfd another process made and registered (a VMM handing
  // over its guest memory's). Its features were negotiated there: they are
  // read from its fdinfo, and `assumed` adds those this side may try anyway
  // (UFFDIO_POISON needs no negotiating). The memory is that process's, so
  // refuse() never falls back to mprotect.
  static Userfaultfd adopt(UniqueFd fd, uint64_t assumed);
  // Every feature bit this kernel's UFFDIO_API reports.
  static uint64_t kernel_features();

  int fd() const { return fd_.get(); }
  // One userfaultfd per handler: splits [base, base+len) into `parts`
  // contiguous parts of whole `page`-byte pages, each with a userfaultfd of
  // its own (part 0 is this one's; the others are opened with the same
  // features), so that faults in different parts never share a kernel wait
  // queue. Before any range is registered. Every call below then goes to
  // the userfaultfd of the part its address is in (a range across parts,
  // part by part); addresses outside them go to part 0's.
  void split(void* base, size_t len, unsigned parts, size_t page);
  unsigned parts() const { return parts_.empty() ? 1 : static_cast<unsigned>(parts_.size()); }
  int fd(unsigned part) const { return parts_.empty() ? fd_.get() : parts_[part].fd; }
  // Part `part`'s range (the whole address space when not split).
  std::pair<uintptr_t, uintptr_t> part_range(unsigned part) const {
    return parts_.empty() ? std::pair<uintptr_t, uintptr_t>{0, UINTPTR_MAX}
                          : std::pair<uintptr_t, uintptr_t>{parts_[part].start, parts_[part].end};
  }
  // Closes the userfaultfd: every range is unregistered, and a missing page
  // reads zeros from then on (make them inaccessible first).
  void close() {
    fd_.reset();
    more_.clear();
    parts_.clear();
  }
  uint64_t features() const { return features_; }
  bool has(uint64_t feature) const { return (features_ & feature) != 0; }

  // Registers [addr, addr+len) for MISSING faults, and with `minor` for
  // MINOR faults too (shared memory: a page in the page cache but not
  // mapped here); throws on failure, or when the range does not offer the
  // ioctl that resolves them (UFFDIO_COPY, or UFFDIO_CONTINUE for minor).
  void register_range(void* addr, size_t len, bool minor);
  // Registers [addr, addr+len) for MISSING and write-protect faults
  // (anonymous memory with a bounded cache: a write to a protected page
  // raises a fault with UFFD_PAGEFAULT_FLAG_WP). Throws on failure.
  void register_missing_and_wp(void* addr, size_t len);
  void unregister(void* addr, size_t len);

  // Reads up to msgs.size() events (of part `part`); returns how many (0
  // when none queued). Returns -errno on a real error.
  int read_events(std::span<uffd_msg> msgs) { return read_events(0, msgs); }
  int read_events(unsigned part, std::span<uffd_msg> msgs);

  // Installs [src, src+len) at dst, page by page of `page` bytes, without
  // waking the waiters: the caller records the pages as present first and
  // then calls wake(), so that no woken thread can fault on a page (after
  // discarding it, say) while the page table still calls it in flight. A
  // page found present already (EEXIST) is skipped (counted in *existed);
  // EAGAIN is retried here (counted in *retries). Returns 0 or the errno
  // that stopped it.
  // `protect`: the pages go in write-protected (UFFDIO_COPY_MODE_WP; the
  // range must be registered for write-protect faults).
  int copy(void* dst, const void* src, size_t len, size_t page, uint64_t* retries, uint64_t* existed,
           bool protect = false);
  // Installs zero pages over [addr, addr+len), with the same outcomes.
  int zeropage(void* addr, size_t len, size_t page, uint64_t* retries, uint64_t* existed);
  // Maps the page-cache pages already behind [addr, addr+len) (UFFDIO_CONTINUE),
  // with the same outcomes and without waking.
  int map_in_place(void* addr, size_t len, size_t page, uint64_t* retries, uint64_t* existed);
  // One UFFDIO_COPY or UFFDIO_ZEROPAGE of [dst, dst+len) without waking
  // and without retrying: 0 or the errno (EAGAIN and EEXIST included) that
  // stopped it, with *done set to the bytes installed before. Not split.
  int copy_once(void* dst, const void* src, size_t len, size_t* done);
  int zeropage_once(void* dst, size_t len, size_t* done);
  // One UFFDIO_CONTINUE of [addr, addr+len), the same way.
  int continue_once(void* addr, size_t len, size_t* done);
  int wake(void* addr, size_t len) const;
  // Write-protects [addr, addr+len), or removes the protection, without
  // waking (UFFDIO_WRITEPROTECT; EAGAIN retried a while). Returns 0 or errno.
  int write_protect(void* addr, size_t len, bool on);
  // Makes the range raise SIGBUS on access (UFFDIO_POISON) where the kernel
  // has it, else PROT_NONE (SIGSEGV); then wakes the waiters either way.
  // An adopted userfaultfd without UFFDIO_POISON answers ENOTSUP, having
  // done nothing.
  int refuse(void* addr, size_t len);

 private:
  Userfaultfd(UniqueFd fd, uint64_t features) : fd_(std::move(fd)), features_(features) {}
  // Calls f(fd, start, len) for each part of [start, start+len), in
  // order, until one returns nonzero (which it returns).
  template <typename F>
  int each(uintptr_t start, size_t len, F f) const;

  struct Part {
    uintptr_t start = 0;
    uintptr_t end = 0;
    int fd = -1;
  };
  UniqueFd fd_;
  uint64_t features_ = 0;
  bool foreign_ = false;
  std::vector<UniqueFd> more_{};  // parts 1.. (split)
  std::vector<Part> parts_{};
};

// Names of the feature bits that are set, for the log.
std::string describe_uffd_features(uint64_t features);

}  // namespace pagewire
