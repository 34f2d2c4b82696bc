#include "runtime/refusal.h"

#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "spdlog/spdlog.h"

namespace pagewire {

bool Refusal::mapped(size_t page) const {
  if (backing_.foreign()) return true;  // its unmaps arrive as events, if it asked for them
  // mincore answers ENOMEM for a range with no mapping.
  std::vector<unsigned char> v(page_size_ / 4096);
  return ::mincore(backing_.addr(page), page_size_, v.data()) == 0 || errno != ENOMEM;
}

void Refusal::mark_gone(size_t page, PageCounts& mine) {
  // Owned by the caller, unless the munmap event was read first and made
  // it gone already (and counted it).
  if (pages_.settle(page, PageState::kGone)) PageCounts::add(mine.gone, 1);
  uffd_.wake(backing_.addr(page), page_size_);
}

bool Refusal::refuse(size_t page, const std::string& why, PageCounts& mine) {
  std::byte* addr = backing_.addr(page);
  // Owned by the caller, unless an munmap took it meanwhile: then there is
  // nothing to refuse (nor a failure to record), only waiters to wake.
  if (!pages_.settle(page, PageState::kRefused)) {
    uffd_.wake(addr, page_size_);
    return false;
  }
  status_.record_failure("page " + std::to_string(page) + " could not be fetched: " + why);
  const int rc = uffd_.refuse(addr, page_size_);
  if (rc == 0) return true;
  if (backing_.foreign()) {
    if (rc == ENOENT || rc == ESRCH) {
      // Unmapped there (its event unread), or the process is gone: nothing
      // to refuse, only waiters to wake.
      if (pages_.transition(page, PageState::kRefused, PageState::kGone)) PageCounts::add(mine.gone, 1);
      uffd_.wake(addr, page_size_);
      return false;
    }
    kill_foreign("page " + std::to_string(page) + " could not be refused: " + std::strerror(rc));
    return true;
  }
  // POISON answers ENOENT, and mprotect ENOMEM, where the range is gone.
  if (!mapped(page)) {
    if (pages_.transition(page, PageState::kRefused, PageState::kGone)) PageCounts::add(mine.gone, 1);
    uffd_.wake(addr, page_size_);
    return false;
  }
  // Without UFFDIO_POISON every refused page is a PROT_NONE mapping of its
  // own, and past vm.max_map_count mprotect fails (ENOMEM): its waiters
  // would stay parked for good. The region has failed, so all of it is
  // made inaccessible instead (whole mappings: no new one is needed) and
  // every waiter is woken into SIGSEGV. Pages already here go with it.
  spdlog::error("region '{}': refusing page {} failed: {}; making the whole region inaccessible instead (raise "
                "vm.max_map_count, or run a kernel with UFFDIO_POISON)",
                name_, page, std::strerror(rc));
  make_inaccessible();
  return true;
}

bool Refusal::foreign_exited() const {
  // A pidfd reads as readable once its process has exited.
  pollfd p{backing_.foreign_pidfd, POLLIN, 0};
  return backing_.foreign_pidfd < 0 || ::poll(&p, 1, 0) != 0;
}

void Refusal::kill_foreign(const std::string& why) {
  if (foreign_exited()) return;  // gone already: nobody is left to read zeros
  spdlog::error("region '{}': process {} would read zeros where pages cannot be fetched ({}), and its pages "
                "cannot be poisoned (UFFDIO_POISON): killing it",
                name_, backing_.foreign_pid, why);
  // Through its pidfd: never another process that took its pid since.
  ::syscall(SYS_pidfd_send_signal, backing_.foreign_pidfd, SIGKILL, nullptr, 0);
}

void Refusal::refuse_foreign_or_kill(const std::string& why) {
  if (foreign_exited()) return;
  int failed = 0;
  bool exited = false;  // its memory is gone (ESRCH): nothing to refuse
  pages_.for_each_mapped_stretch([&](size_t first, size_t count) {
    for (size_t p = first; p < first + count && failed == 0 && !exited; ++p) {
      if (pages_.get(p) == PageState::kPresent) continue;
      const int rc = uffd_.refuse(backing_.addr(p), page_size_);
      exited = rc == ESRCH;
      if (rc != 0 && rc != ENOENT && rc != ESRCH) failed = rc;
    }
  });
  if (failed != 0) kill_foreign(why + ": " + std::strerror(failed));
}

void Refusal::make_inaccessible() {
  if (backing_.foreign()) {
    refuse_foreign_or_kill("the handler stopped before every page arrived");
    return;
  }
  // Only the parts still mapped: a range the application unmapped may hold
  // another mapping by now, and an mprotect across a hole stops there.
  pages_.for_each_mapped_stretch([&](size_t first, size_t count) {
    std::byte* addr = backing_.addr(first);
    const size_t len = count * page_size_;
    if (::mprotect(addr, len, PROT_NONE) != 0) {
      // A hole the table has not heard of yet (its munmap event unread)
      // stops mprotect there: page by page, past it.
      size_t failed = 0;
      for (size_t p = 0; p < count; ++p) failed += ::mprotect(addr + p * page_size_, page_size_, PROT_NONE) != 0;
      if (failed > 0)
        spdlog::warn("region '{}': {} pages of {}..{} could not be protected (unmapped)", name_, failed, first,
                     first + count - 1);
    }
    uffd_.wake(addr, len);
  });
}

}  // namespace pagewire
