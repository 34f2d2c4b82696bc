// The background pull: claims what is still missing in runs, reads each
// run on a bulk channel that the source serves behind demand reads, and
// installs it. A fault on a page out in a run overtakes it: its handler
// reads the page again on its own channel (anonymous memory).
#include <linux/capability.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "runtime/fault_engine.h"
#include "runtime/threads.h"
#include "spdlog/spdlog.h"

namespace pagewire {
namespace {

// Whether this thread may set its nice back to `nice` after raising it to
// 19: CAP_SYS_NICE, or an RLIMIT_NICE that allows it.
bool may_raise_priority_to(int nice) {
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[2]{};
  if (::syscall(SYS_capget, &header, data) == 0 &&
      ((data[CAP_SYS_NICE / 32].effective >> (CAP_SYS_NICE % 32)) & 1) != 0) {
    return true;
  }
  rlimit limit{};
  return ::getrlimit(RLIMIT_NICE, &limit) == 0 && 20 - static_cast<int>(limit.rlim_cur) <= nice;
}

}  // namespace

void FaultEngine::run_puller(Worker& w) {
  setup_fault_thread("pw-pull", options_.handler_cpu, options_.puller_nice);
  // Going back from nice 19 needs CAP_SYS_NICE or RLIMIT_NICE: without
  // either the pull keeps its priority and does not give way.
  errno = 0;
  w.own_nice = ::getpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()));
  w.can_give_way = errno == 0 && w.own_nice < 19 && may_raise_priority_to(w.own_nice);
  const size_t total = pages_.size();
  size_t cursor = 0;
  try {
    // A refused page never arrives, so a failed region never completes:
    // the pull then claims nothing more, but still installs (or refuses)
    // every run it has in flight, whose pages nobody else would. So does a
    // complete region: a run whose pages were unmapped while it was out
    // leaves them gone, the region may complete without them, and the
    // threads that faulted there wait for this run to find its range gone
    // and wake them.
    while ((!status_.complete() && !status_.failed()) || w.in_flight > 0) {
      w.batch.clear();
      // Demand faults go ahead of the pull on their own connections, which
      // the source serves first. Holding the pull to one run while demand
      // reads were in flight was measured: it slowed the pull (so the
      // threads faulted more) and left demand p99 no better. What helps
      // is the CPU: while a fault waits, the pull runs at nice 19.
      give_way(w);
      const bool held = pull_held_.load(std::memory_order_relaxed);
      while (!held && !status_.failed() && !status_.complete() && !w.staging->empty() && cursor < total) {
        cursor = queue_pull_run(w, cursor);
      }
      if (!w.batch.empty()) post_batch(w);
      int timeout = -1;
      if (held) {
        timeout = 1;
      } else if (w.in_flight == 0) {
        // Nothing of ours in flight: what is missing is in flight for a
        // handler, or was discarded since; look again shortly, and let the
        // completion owner look now.
        if (cursor >= total) {
          cursor = 0;
          completion_->nudge();
        }
        timeout = 2;
      }
      w.result.clear();
      w.channel->wait(w.result, timeout);
      w.reaped_ns = now_ns();
      for (uint64_t token : w.result.woken_tokens) {
        if (token == kStopToken) return;
      }
      for (const ReadCompletion& c : w.result.completions) {
        complete(w, c);
        give_way(w);
      }
      if (w.result.channel_error != Errc::kOk) {
        // A dead channel has failed every read it held (refused above).
        status_.record_failure(w.result.channel_error_text);
        return;
      }
    }
  } catch (const std::exception& e) {
    stop_worker_on_exception(w, e);
  }
}

namespace {
// The userfaultfds demand_waiting() looks at, at most.
constexpr unsigned kMaxParts = 64;
}  // namespace

bool FaultEngine::demand_waiting() const {
  for (const auto& h : handlers_) {
    if (h->demand_out.load(std::memory_order_relaxed) != 0) return true;
  }
  // A fault no handler has read yet (its handler is waiting for a CPU).
  pollfd p[kMaxParts];
  const unsigned n = std::min(uffd_.parts(), kMaxParts);
  for (unsigned i = 0; i < n; ++i) p[i] = {uffd_.fd(i), POLLIN, 0};
  if (::poll(p, n, 0) <= 0) return false;
  for (unsigned i = 0; i < n; ++i) {
    if ((p[i].revents & POLLIN) != 0) return true;
  }
  return false;
}

void FaultEngine::give_way(Worker& w) {
  // A fixed low priority slowed the pull by half on a busy machine; this
  // one holds only while a demand fault is in the handlers' hands. Each
  // change is one setpriority, at most once per completion reaped.
  if (!w.can_give_way) return;
  const bool demand = demand_waiting();
  if (demand == w.giving_way) return;
  if (::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), demand ? 19 : w.own_nice) != 0) {
    // Never stay low for good: stop giving way, at whatever priority the
    // kernel left.
    spdlog::warn("region '{}': the puller stops giving way to demand faults: setpriority: {}", desc_.name,
                 std::strerror(errno));
    w.can_give_way = false;
    return;
  }
  w.giving_way = demand;
}

size_t FaultEngine::queue_pull_run(Worker& w, size_t cursor) {
  const size_t total = pages_.size();
  if (pages_.get(cursor) != PageState::kMissing) return cursor + 1;
  if (zero(cursor)) {
    if (pages_.claim(cursor)) install_zero(w, cursor, false);
    return cursor + 1;
  }
  // A span from this missing page: claim what is missing in the next
  // slot_pages pages and take them as one run, gaps (pages that came by
  // demand meanwhile) included, rather than breaking the run at every page
  // a fault took. Zero pages end the span. Each owned stretch is read
  // (queue_read), at most max_parts of them: into staging for anonymous
  // memory, in place for shared memory.
  uint64_t owned_mask = 0;
  uint32_t span = 0;
  uint32_t stretches = 0;
  for (uint32_t i = 0; i < w.slot_pages && cursor + i < total && !zero(cursor + i); ++i) {
    const bool starts_stretch = i == 0 || ((owned_mask >> (i - 1)) & 1) == 0;
    if (starts_stretch && stretches == w.max_parts) break;
    if (pages_.get(cursor + i) == PageState::kMissing && pages_.claim(cursor + i)) {
      if (pulling_) pulling_[cursor + i].store(true, std::memory_order_relaxed);
      owned_mask |= uint64_t{1} << i;
      span = i + 1;
      if (starts_stretch) ++stretches;
    }
  }
  if (owned_mask != 0) queue_read(w, cursor, span, ReadKind::kPull, 0, owned_mask);
  return cursor + std::max<uint32_t>(span, 1);
}

void FaultEngine::finish_overtake(Worker& w, std::byte* src, size_t page) {
  const uint64_t offset = uint64_t{page} * desc_.page_size;
  const uint64_t len = std::min<uint64_t>(desc_.page_size, desc_.length - offset);
  if (len < desc_.page_size) std::memset(src + len, 0, desc_.page_size - len);
  Metrics::bump(w.metrics.bytes_fetched, len);
  std::byte* dst = page_addr(page);
  uint64_t retries = 0;
  uint64_t existed = 0;
  // The page table still says in flight: the pull run that owns the page
  // publishes it, finding it here already (EEXIST) and leaving it as the
  // application may have written it since.
  const int rc = backing_.foreign() ? copy_in_foreign(src, dst, page, 1, &retries, &existed)
                                    : uffd_.copy(dst, src, desc_.page_size, desc_.page_size, &retries, &existed);
  if (retries > 0) Metrics::bump(w.metrics.copy_retries, retries);
  if (rc != 0) {
    // The run installs or refuses it (or finds it gone), and wakes its threads.
    spdlog::debug("region '{}': overtaking read of page {}: UFFDIO_COPY: {}", desc_.name, page, std::strerror(rc));
    return;
  }
  if (existed == 0) {
    Metrics::bump(w.metrics.bytes_copied, desc_.page_size);
    Metrics::bump(w.metrics.faults_overtaken);
  } else {
    Metrics::bump(w.metrics.copy_eexist, existed);  // the pull run got there first
  }
  uffd_.wake(dst, desc_.page_size);
}

}  // namespace pagewire
