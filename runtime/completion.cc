#include "runtime/completion.h"

#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cstring>

#include "pagewire/error.h"
#include "spdlog/spdlog.h"

namespace pagewire {
namespace {
// How often the owner sums the counts when nobody nudges it.
constexpr int kTickMs = 10;
}  // namespace

Completion::Completion(Region region, unsigned slots)
    : r_(std::move(region)),
      count_(slots + 1),
      slots_(std::make_unique<PageCounts[]>(count_)),
      own_(slots_[slots]),
      wake_fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
  if (!wake_fd_) throw_errno("eventfd");
}

Completion::~Completion() { join(); }

void Completion::start(int stop_fd) {
  thread_ = std::thread([this, stop_fd] { run(stop_fd); });
}

void Completion::join() {
  if (thread_.joinable()) thread_.join();
}

void Completion::nudge() {
  const uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(wake_fd_.get(), &one, sizeof one);
}

uint64_t Completion::pages_present() const {
  int64_t sum = 0;
  for (unsigned i = 0; i < count_; ++i) sum += slots_[i].present.load();
  return sum < 0 ? 0 : static_cast<uint64_t>(sum);
}

uint64_t Completion::pages_gone() const {
  int64_t sum = 0;
  for (unsigned i = 0; i < count_; ++i) sum += slots_[i].gone.load();
  return static_cast<uint64_t>(sum);
}

int64_t Completion::settled() const {
  int64_t sum = 0;
  for (unsigned i = 0; i < count_; ++i) sum += slots_[i].present.load() + slots_[i].gone.load();
  return sum;
}

void Completion::run(int stop_fd) {
  ::pthread_setname_np(::pthread_self(), "pw-complete");
  pollfd fds[2] = {{wake_fd_.get(), POLLIN, 0}, {stop_fd, POLLIN, 0}};
  while (!r_.status.complete() && !r_.status.failed()) {
    if (::poll(fds, 2, kTickMs) < 0 && errno != EINTR) {
      r_.status.record_failure(std::string("completion: poll: ") + std::strerror(errno));
      return;
    }
    if ((fds[1].revents & POLLIN) != 0) return;
    if ((fds[0].revents & POLLIN) != 0) {
      uint64_t v = 0;
      [[maybe_unused]] ssize_t n = ::read(wake_fd_.get(), &v, sizeof v);
    }
    try {
      decide();
    } catch (const std::exception& e) {
      r_.status.record_failure(std::string("completion: ") + e.what());
      return;
    }
  }
}

size_t Completion::sweep_discarded() {
  const std::vector<bool> held = r_.residency.held_pages();
  if (held.empty()) return 0;
  size_t gone = 0;
  for (size_t p = 0; p < r_.pages.size(); ++p) {
    if (held[p] || !r_.pages.transition(p, PageState::kPresent, PageState::kInFlight)) continue;
    // Owned now, so nothing maps or fetches it meanwhile: look again, as
    // the snapshot may predate a fetch that brought it back (and the
    // application's writes since, which a fetch must never overwrite).
    // (A page unmapped meanwhile was counted gone by the munmap event,
    // and is present no more.)
    if (r_.residency.holds(p)) {
      if (!r_.pages.settle(p, PageState::kPresent)) PageCounts::add(own_.present, -1);
    } else if (r_.removed != nullptr && is_zero_page_relaxed(*r_.removed, p)) {
      // Removed and punched out: zeros from its next fault on, not a read.
      if (r_.pages.settle(p, PageState::kGone)) PageCounts::add(own_.gone, 1);
      PageCounts::add(own_.present, -1);
    } else {
      if (r_.pages.settle(p, PageState::kMissing)) ++gone;
      PageCounts::add(own_.present, -1);
    }
    r_.uffd.wake(r_.backing.addr(p), r_.page_size);  // a fault meanwhile looks again
  }
  return gone;
}

bool Completion::all_settled() const {
  for (size_t p = 0; p < r_.pages.size(); ++p) {
    const PageState s = r_.pages.get(p);
    if (s != PageState::kPresent && s != PageState::kGone) return false;
  }
  return true;
}

void Completion::decide() {
  const auto total = static_cast<int64_t>(r_.pages.size());
  if (r_.status.complete() || held_.load() || settled() != total) return;
  // Every page is counted. Before the region becomes plain memory (where a
  // missing page would read as zeros), check that each is still there: a
  // page the application discarded after it arrived is fetched again first.
  std::lock_guard decide(decide_mu_);
  // From here a page taken back for a fetch (discarded, or punched out of
  // the memfd) waits for this decision: see fetch_again().
  closing_.store(true);
  if (const size_t gone = sweep_discarded(); gone > 0) {
    closing_.store(false);
    spdlog::info("region '{}': {} pages were discarded after they arrived; fetching them again", r_.name, gone);
    return;
  }
  // A page taken back for a fetch since the sums were read lowered them
  // again, and its fetch completes the region when it arrives. Any taken
  // back after this load finds closing_ set and leaves the page to plain
  // memory. (Both sides are sequentially consistent: one sees the other.)
  // And the table agrees: every page present or gone, none owned.
  if (settled() != total || !all_settled()) {
    closing_.store(false);
    return;
  }
  // Every page is here: the region becomes plain memory. Only the parts
  // still mapped are unregistered; a range the application unmapped may
  // hold another mapping by now.
  // Another process's ranges stay registered: it registered them, and a
  // range it removes later still faults here (and reads zeros).
  if (!r_.backing.foreign())
    r_.pages.for_each_mapped_stretch([&](size_t first, size_t count) {
      r_.backing.for_each_range(first, count, [&](std::byte* addr, size_t, size_t n) {
        try {
          r_.uffd.unregister(addr, n * r_.page_size);
        } catch (const std::exception& e) {
          spdlog::warn("region '{}': complete, but {}", r_.name, e.what());
        }
      });
    });
  r_.status.set_complete();
  closing_.store(false);
  spdlog::info("region '{}': every page present after {:.2f} s; unregistered, plain memory now", r_.name,
               std::chrono::duration<double>(std::chrono::steady_clock::now() - r_.started).count());
}

bool Completion::fetch_again(size_t page, PageCounts& mine) {
  // Another process's ranges stay registered when complete: fetch it.
  if (r_.backing.foreign()) return true;
  // closing_ is cleared again once the region is complete: look at both.
  if (!closing_.load() && !r_.status.complete()) return true;
  // The owner may not have seen this page go: wait for its decision.
  { const std::lock_guard decide(decide_mu_); }
  if (!r_.status.complete()) return true;  // it saw, or stopped short: fetch
  // The region is plain memory now: the page was discarded as the region
  // completed, and reads as plain memory does (the caller wakes its fault). A read of it now could only fail to
  // install, or, in shared memory, land over what the application wrote since.
  if (r_.pages.settle(page, PageState::kPresent)) PageCounts::add(mine.present, 1);
  return false;
}

}  // namespace pagewire
