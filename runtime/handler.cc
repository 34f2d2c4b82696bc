// The handler loop: read fault events, take each fault in the page table,
// and queue its read (and the reads ahead of a detected stream).
#include <poll.h>
#include <sched.h>

#include <cstring>
#include <functional>

#include "runtime/fault_engine.h"
#include "runtime/threads.h"
#include "spdlog/spdlog.h"

namespace pagewire {
namespace {

// Reads the kernel's pending events for a handler whose install the kernel
// answered EAGAIN.
class HandlerEvents final : public PendingEvents {
 public:
  HandlerEvents(std::function<void()> read) : read_(std::move(read)) {}
  void read_pending_events() override { read_(); }

 private:
  std::function<void()> read_;
};

}  // namespace

void FaultEngine::run_handler(Worker& w) {
  setup_fault_thread("pw-fault-" + std::to_string(w.index), options_.handler_cpu, options_.handler_nice);
  HandlerEvents pending([this, &w] { read_pending_events(w); });
  set_thread_pending_events(&pending);
  try {
    for (;;) {
      w.result.clear();
      // Do not sleep while the uffd may still hold events we could take,
      // and do not wake for it while there is no slot to take them into.
      const bool can_read = (w.uffd_ready || !w.deferred.empty()) && !w.staging->empty();
      w.channel->pause_watch(kUffdToken, w.staging->empty());
      if (can_read || options_.poll_us == 0 || !poll(w)) w.channel->wait(w.result, can_read ? 0 : -1);
      w.reaped_ns = now_ns();
      for (uint64_t token : w.result.woken_tokens) {
        if (token == kStopToken) return;
        if (token == kUffdToken) w.uffd_ready = true;
      }
      for (const ReadCompletion& c : w.result.completions) complete(w, c);
      if (w.result.channel_error != Errc::kOk) status_.record_failure(w.result.channel_error_text);
      if ((w.uffd_ready || !w.deferred.empty()) && !w.staging->empty()) read_faults(w);
    }
  } catch (const std::exception& e) {
    stop_worker_on_exception(w, e);
  }
}

bool FaultEngine::poll(Worker& w) {
  // Spin on the connection's completions and the userfaultfd, without
  // sleeping, for up to poll_us: a fault or a read that arrives meanwhile
  // costs no wake-up. Then the caller sleeps as usual.
  const uint64_t until = now_ns() + uint64_t{options_.poll_us} * 1000;
  pollfd uffd{uffd_.fd(w.part), POLLIN, 0};
  const bool watch_uffd = !w.staging->empty();
  do {
    w.channel->wait(w.result, 0);
    if (!w.result.completions.empty() || !w.result.woken_tokens.empty() || w.result.channel_error != Errc::kOk) {
      return true;
    }
    if (watch_uffd && ::poll(&uffd, 1, 0) > 0) {
      w.uffd_ready = true;
      return true;
    }
    // On a core of its own this returns at once; on a shared one it lets
    // the faulting thread (or the source) run instead of the spin.
    sched_yield();
  } while (now_ns() < until);
  return false;
}

void FaultEngine::read_faults(Worker& w) {
  w.batch.clear();
  // Faults read while an install waited come first, in the order read.
  size_t done = 0;
  for (; done < w.deferred.size() && !w.staging->empty(); ++done) {
    // A copy: handling it may read more events onto the list.
    const uffd_msg msg = w.deferred[done];
    const auto left = static_cast<uint32_t>(w.deferred.size() - done - 1);
    handle_event(w, msg, now_ns(), std::min<uint32_t>(left, w.staging->available()));
  }
  w.deferred.erase(w.deferred.begin(), w.deferred.begin() + static_cast<std::ptrdiff_t>(done));
  while (w.deferred.empty() && w.uffd_ready && !w.staging->empty()) {
    const size_t want = std::min<size_t>(Worker::kEventBatch, w.staging->available());
    const int n = read_events(w.part, std::span(w.events.data(), want));
    if (n < 0) {
      status_.record_failure(std::string("reading userfaultfd: ") + std::strerror(-n));
      w.uffd_ready = false;
      break;
    }
    const uint64_t t0 = now_ns();
    for (int i = 0; i < n; ++i) {
      handle_event(w, w.events[static_cast<size_t>(i)], t0, static_cast<uint32_t>(n - i - 1));
    }
    if (static_cast<size_t>(n) < want) w.uffd_ready = false;
  }
  if (!w.batch.empty()) post_batch(w);
}

void FaultEngine::handle_event(Worker& w, const uffd_msg& msg, uint64_t read_ns, uint32_t reserved) {
  switch (msg.event) {
    case UFFD_EVENT_PAGEFAULT: handle_fault(w, msg, read_ns, reserved); return;
    case UFFD_EVENT_UNMAP: on_unmapped(*w.counts, msg.arg.remove.start, msg.arg.remove.end); return;
    case UFFD_EVENT_REMOVE: on_removed(*w.counts, msg.arg.remove.start, msg.arg.remove.end); return;
    case UFFD_EVENT_REMAP:
      // The pages moved away are no longer the region's (those present
      // went with their bytes); faults at their new place are answered by
      // on_fault_outside().
      on_unmapped(*w.counts, msg.arg.remap.from, msg.arg.remap.from + msg.arg.remap.len);
      return;
    default: return;
  }
}

void FaultEngine::handle_fault(Worker& w, const uffd_msg& msg, uint64_t read_ns, uint32_t reserved) {
  Metrics::bump(w.metrics.faults);
  const uint64_t address = msg.arg.pagefault.address;
  size_t page = 0;
  const bool inside = backing_.page_of(address, &page);
  if (cache_ && (msg.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) != 0) {
    // A write to a protected page: never refused. Outside the region (a
    // page mremap moved away keeps its protection) it is simply lifted.
    if (inside) {
      cache_->on_write_fault(page, *w.counts);
    } else {
      cache_->lift(address & ~uint64_t{kSmallPage - 1});
    }
    return;
  }
  if (!inside) {
    on_fault_outside(w, address);
    return;
  }
  const Take take = take_fault(w, page);
  if (take == Take::kNothing) {
    Metrics::bump(w.metrics.duplicate_faults);
    return;
  }
  const bool write = (msg.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WRITE) != 0;
  if (cache_) cache_->wait_for_room();  // only while the cache is full
  if (zero(page) || removed(page)) {
    install_zero(w, page, write);
    return;
  }
  // Every message read was sized to a free slot, so this one has one.
  // A 2 MiB page is read from its faulting 4 KiB on (the kernel still
  // maps it whole, so the thread waits for all of it).
  const auto fault_part = static_cast<uint32_t>((address - reinterpret_cast<uint64_t>(page_addr(page))) &
                                                ~uint64_t{kSmallPage - 1});
  if (take == Take::kOvertake) {
    // Out in a pull run, behind up to pull_runs_in_flight runs on the
    // bulk connection: read it again on this one, ahead of them.
    queue_read(w, page, 1, ReadKind::kOvertake, read_ns, 0, fault_part);
    w.demand_out.store(w.demand_out.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    return;
  }
  queue_read(w, page, 1, ReadKind::kDemand, read_ns, 0, fault_part, write);
  w.demand_out.store(w.demand_out.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  // Prefetch must leave a slot for each fault still to handle in this batch.
  if (options_.prefetch) prefetch(w, msg.arg.pagefault.feat.ptid, page, reserved);
}

FaultEngine::Take FaultEngine::take_fault(Worker& w, size_t page) {
  for (;;) {
    if (pages_.claim(page)) return Take::kFetch;
    switch (pages_.get(page)) {
      case PageState::kInFlight:
        // The first fault on a page out in a pull run overtakes it; any
        // other is woken by whichever read installs the page.
        if (pulling_ && pulling_[page].exchange(false, std::memory_order_acq_rel)) return Take::kOvertake;
        return Take::kNothing;
      case PageState::kPresent: {
        const Take t = take_present(w, page);
        if (t != Take::kOvertake) return t;  // kOvertake here: look again
        break;
      }
      case PageState::kRefused:
        uffd_.refuse(page_addr(page), desc_.page_size);  // poisoned or protected already; wakes it into the signal
        return Take::kNothing;
      case PageState::kGone:
        if (take_removed(w, page)) return Take::kFetch;
        on_gone_fault(page);
        return Take::kNothing;
      case PageState::kMissing: break;  // claimed and given back, or reset by the sweep: look again
    }
  }
}

// A fault on a page the table calls present. Returns kOvertake (never a
// real outcome here) when the caller must look at the page again.
FaultEngine::Take FaultEngine::take_present(Worker& w, size_t page) {
  std::byte* addr = page_addr(page);
  if (backing_.shared) {
    // Own the page while looking at it: no other handler may map it or
    // fetch it into the memfd meanwhile.
    if (!pages_.transition(page, PageState::kPresent, PageState::kInFlight)) return Take::kOvertake;
    // Not counted present while owned: an munmap meanwhile counts it gone,
    // and it must never count as both (the region would complete early).
    PageCounts::add(w.counts->present, -1);
    if (residency_.memfd_holds(page)) {
      // Unmapped from the region only (MADV_DONTNEED keeps the page, and
      // the application's writes, in the memfd), or the fault raced with
      // the install: map it again, with no transfer.
      uint64_t retries = 0;
      uint64_t existed = 0;
      if (backing_.foreign()) {
        // As it is in the memfd: a removal that kept it (MADV_DONTNEED of
        // shared memory) kept the process's writes too.
        continue_in_foreign(page, 1, Zeros::kNone, &retries, &existed);
      } else {
        uffd_.map_in_place(addr, desc_.page_size, desc_.page_size, &retries, &existed);
      }
      if (pages_.settle(page, PageState::kPresent)) PageCounts::add(w.counts->present, 1);
      uffd_.wake(addr, desc_.page_size);
      return Take::kNothing;
    }
    // Punched out of the memfd: fetch it again (another process's removed
    // page: a zero page).
    return take_back(w, page);
  }
  if (discarded(w, page)) return take_back(w, page);
  if (pages_.get(page) == PageState::kPresent) {
    uffd_.wake(addr, desc_.page_size);  // the install raced with the fault
    return Take::kNothing;
  }
  return Take::kOvertake;  // reset to missing meanwhile (the completion sweep): look again
}

FaultEngine::Take FaultEngine::take_back(Worker& w, size_t page) {
  if (completion_->fetch_again(page, *w.counts)) return Take::kFetch;
  // The region became plain memory meanwhile. Unregistering wakes the
  // faults already waiting, but the kernel wakes before it clears the
  // registration, so a fault that queued in between (the one read here)
  // waits for this wake: it then finds plain memory.
  uffd_.wake(page_addr(page), desc_.page_size);
  return Take::kNothing;
}

bool FaultEngine::discarded(Worker& w, size_t page) {
  // A page the table calls present faults again only if the application
  // discarded it (MADV_DONTNEED) or the fault raced with its install. The
  // page tables tell which; a discarded page is fetched again, as postcopy
  // expects, rather than woken into a fault loop.
  // Another process's removed page (installed as its removal was read, and
  // zapped after), or one whose residency cannot be read: installed again
  // (zeros for a removed one; a page still there only answers EEXIST).
  const bool look_again = backing_.foreign() && (removed(page) || !residency_.can_tell());
  if (!look_again && residency_.resident(page)) return false;
  if (!pages_.transition(page, PageState::kPresent, PageState::kInFlight)) return false;
  PageCounts::add(w.counts->present, -1);
  return true;
}

uint32_t FaultEngine::claim_run(size_t first, uint32_t max) {
  uint32_t n = 0;
  while (n < max && first + n < pages_.size() && !zero(first + n) && pages_.claim(first + n)) ++n;
  return n;
}

void FaultEngine::prefetch(Worker& w, uint32_t thread_id, size_t page, uint32_t reserved) {
  if (cache_ && cache_->over_high()) return;  // no room to spare for pages nobody asked for yet
  const PrefetchPlan plan = streams_.on_fault(thread_id, page);
  if (plan.used > 0) Metrics::bump(w.metrics.prefetch_used, plan.used);
  if (plan.wasted > 0) Metrics::bump(w.metrics.prefetch_wasted, plan.wasted);
  if (plan.pages == 0) return;
  // Prefetch never takes the slots demand faults need: half stay free, and
  // one for each fault read but not yet handled.
  const auto spare = [&] { return w.staging->available() > std::max<size_t>(w.slots.size() / 2, reserved); };
  uint32_t issued = 0;
  if (plan.stride == 1) {
    // The next pages: one run, one read, one UFFDIO_COPY.
    if (spare()) {
      const uint32_t n = claim_run(page + 1, std::min(plan.pages, w.slot_pages));
      if (n > 0) queue_read(w, page + 1, n, ReadKind::kPrefetch, 0);
      issued = n;
    }
  } else {
    for (uint32_t i = 1; i <= plan.pages && spare(); ++i) {
      const int64_t q = static_cast<int64_t>(page) + plan.stride * static_cast<int64_t>(i);
      if (q < 0 || static_cast<size_t>(q) >= pages_.size()) break;
      if (claim_run(static_cast<size_t>(q), 1) == 1) {
        queue_read(w, static_cast<size_t>(q), 1, ReadKind::kPrefetch, 0);
        ++issued;
      }
    }
  }
  if (issued > 0) {
    streams_.issued(thread_id, issued);
    Metrics::bump(w.metrics.prefetch_issued, issued);
  }
}

}  // namespace pagewire
