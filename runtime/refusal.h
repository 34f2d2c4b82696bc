// Refusing a page that cannot be fetched: never zero-fill it. Its waiters
// are woken into SIGBUS (UFFDIO_POISON) or, on kernels without it, into
// SIGSEGV (the page made PROT_NONE). A page whose range the application
// unmapped meanwhile is not refused but marked gone, and its waiters woken
// to fault again as on any unmapped address.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "runtime/backing.h"
#include "runtime/completion.h"
#include "runtime/page_table.h"
#include "runtime/region_status.h"
#include "runtime/uffd.h"

namespace pagewire {

class Refusal {
 public:
  Refusal(Userfaultfd& uffd, PageTable& pages, RegionStatus& status, const Backing& backing, uint32_t page_size,
          std::string name)
      : uffd_(uffd), pages_(pages), status_(status), backing_(backing), page_size_(page_size), name_(std::move(name)) {}

  // Refuses `page` (recording why as the region's failure first, so that
  // its waiters find the region failed); false when its range turned out
  // to be gone, which `mine` then counts.
  bool refuse(size_t page, const std::string& why, PageCounts& mine);
  // An owned page whose install found its range unmapped (ENOENT): gone,
  // counted in `mine` (unless the munmap event counted it first), its
  // waiters woken.
  void mark_gone(size_t page, PageCounts& mine);
  // Every part of the region still mapped made inaccessible, and every
  // waiter woken into SIGSEGV: for a failed region without UFFDIO_POISON,
  // and for one destroyed before it completed.
  void make_inaccessible();
  // Another process's memory where a fault can be neither served nor
  // refused: that process is killed (SIGKILL), with a log line, rather
  // than left parked or given zeros.
  void kill_foreign(const std::string& why);
  // Whether another process whose memory this is has exited (its pidfd).
  bool foreign_exited() const;

 private:
  bool mapped(size_t page) const;

  Userfaultfd& uffd_;
  PageTable& pages_;
  RegionStatus& status_;
  // Another process's memory, which cannot be protected from here: the
  // pages not present are poisoned, or, where the kernel cannot, the
  // process is killed (SIGKILL) rather than let read zeros.
  void refuse_foreign_or_kill(const std::string& why);

  const Backing& backing_;
  uint32_t page_size_;
  std::string name_;
};

}  // namespace pagewire
