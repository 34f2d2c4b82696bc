#include "runtime/fault_engine.h"

#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cstring>

#include "runtime/staging_pool.h"
#include "runtime/uffd_compat.h"
#include "spdlog/spdlog.h"

namespace pagewire {
namespace {

constexpr uint64_t kUffdToken = 1;
constexpr uint64_t kStopToken = 2;
constexpr size_t kEventBatch = 64;

uint64_t now_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

// Reads own at most 64 pages, one bit each.
constexpr uint32_t kMaxRunPages = 64;
uint64_t all_pages(uint32_t pages) { return pages >= 64 ? ~uint64_t{0} : (uint64_t{1} << pages) - 1; }

// Calls f(first, count) for each stretch of set bits among the low `pages`
// bits of `mask`, in order.
template <typename F>
void for_each_stretch(uint64_t mask, uint32_t pages, F f) {
  for (uint32_t i = 0; i < pages;) {
    if (((mask >> i) & 1) == 0) {
      ++i;
      continue;
    }
    uint32_t j = i;
    while (j < pages && ((mask >> j) & 1) != 0) ++j;
    f(i, j - i);
    i = j;
  }
}

// The source's descriptor in this side's pages: a 2 MiB page is known zero
// when every 4 KiB source page in it is.
RegionDescriptor local_descriptor(const RegionDescriptor& remote, uint32_t page_size) {
  RegionDescriptor d = remote;
  d.page_size = page_size;
  if (page_size == remote.page_size || remote.page_size == 0) return d;
  const uint64_t per = page_size / remote.page_size;
  const uint64_t source_pages = (remote.length + remote.page_size - 1) / remote.page_size;
  const uint64_t pages = (remote.length + page_size - 1) / page_size;
  d.zero_map.assign((pages + 63) / 64, 0);
  for (uint64_t p = 0; p < pages; ++p) {
    bool all_zero = true;
    for (uint64_t s = p * per; s < std::min(source_pages, (p + 1) * per) && all_zero; ++s) {
      all_zero = is_zero_page(remote.zero_map, s);
    }
    if (all_zero) d.zero_map[p / 64] |= uint64_t{1} << (p % 64);
  }
  return d;
}

uint64_t minor_features(const Backing& b) {
  if (!b.shared) return 0;
  return b.huge ? UFFD_FEATURE_MINOR_HUGETLBFS : UFFD_FEATURE_MINOR_SHMEM;
}

// The prefetch window in this side's pages: given in 4 KiB pages, and two
// 2 MiB pages at most.
uint32_t prefetch_window(const AttachOptions& o, uint32_t page_size) {
  const uint32_t pages = std::max(1u, o.prefetch_max_pages);
  return page_size == kSmallPage ? pages : std::min(pages, 2u);
}

void pin_to(int cpu) {
  if (cpu < 0) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  ::pthread_setaffinity_np(::pthread_self(), sizeof set, &set);
}

// Demand faults first, on the CPU too: a handler woken by a fault's reply
// should preempt the puller and the application. Raising priority needs
// CAP_SYS_NICE; without it the thread stays at its default, and says so.
void set_nice(int nice) {
  if (nice == 0) return;
  if (::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), nice) != 0) {
    static std::once_flag once;
    std::call_once(once, [nice] { spdlog::info("fault threads: cannot set nice {} (needs CAP_SYS_NICE)", nice); });
  }
}

}  // namespace

struct FaultEngine::Worker {
  struct Slot {
    size_t first = 0;  // first page of the run read
    uint32_t pages = 0;
    // Which pages of the run this read owns (claimed). A pull run may span
    // pages that arrived another way; those are not installed (nor, in
    // shared memory, read).
    uint64_t owned = 0;
    ReadKind kind = ReadKind::kDemand;
    uint64_t start_ns = 0;
    bool busy = false;
    // Reads still to complete: a split 2 MiB page has two, and a shared-
    // memory pull run one per stretch of pages it owns.
    uint8_t parts = 1;
    Errc status = Errc::kOk;
  };

  unsigned index = 0;
  uint32_t slot_pages = 1;
  // Shared memory: how many separate reads one pull run may go out as
  // (all of a worker's reads must fit in what its channel keeps in flight).
  uint32_t max_parts = 1;
  // The staging memory outlives the channel, which drains the reads still
  // landing in it when it is destroyed.
  std::unique_ptr<StagingPool> staging;
  std::unique_ptr<Channel> channel;
  std::vector<Slot> slots;
  uint32_t in_flight = 0;
  std::vector<ReadOp> batch;
  std::vector<uffd_msg> events = std::vector<uffd_msg>(kEventBatch);
  WaitResult result;
  bool uffd_ready = true;  // read the uffd until it says EAGAIN
  Metrics metrics;
  std::thread thread;  // last: starts once the rest exists
};

FaultEngine::FaultEngine(std::unique_ptr<Transport> transport, const AttachOptions& options)
    : options_(options),
      transport_(std::move(transport)),
      backing_(Backing::create(transport_->region().length, options)),
      desc_(local_descriptor(transport_->region(), backing_.page_size())),
      uffd_(Userfaultfd::open(UFFD_FEATURE_POISON | UFFD_FEATURE_THREAD_ID | minor_features(backing_) |
                              (backing_.huge ? UFFD_FEATURE_EXACT_ADDRESS : 0))),
      pages_(backing_.view.size() / desc_.page_size),
      streams_(prefetch_window(options, desc_.page_size)),
      stop_fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)),
      started_(std::chrono::steady_clock::now()) {
  if (!stop_fd_) throw_errno("eventfd");
  if (!backing_.shared && !backing_.huge) pagemap_ = UniqueFd(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  if (transport_->region().page_size != kSmallPage) {
    throw Error(Errc::kInvalidArgument, "source page size " + std::to_string(transport_->region().page_size) +
                                            " is not supported (4096 only)");
  }
  static std::once_flag features_logged;
  std::call_once(features_logged, [this] {
    spdlog::info("uffd: kernel offers [{}]; refusing unfetchable pages with {}",
                 describe_uffd_features(Userfaultfd::kernel_features()),
                 uffd_.has(UFFD_FEATURE_POISON) ? "UFFDIO_POISON (SIGBUS)" : "PROT_NONE (SIGSEGV)");
  });
  if (backing_.shared && !uffd_.has(minor_features(backing_))) {
    throw Error(Errc::kUffdUnavailable,
                std::string("this kernel has no minor faults on ") + (backing_.huge ? "hugetlbfs" : "shared memory") +
                    " (UFFD_FEATURE_MINOR_" + (backing_.huge ? "HUGETLBFS" : "SHMEM") +
                    "): attach with anonymous memory instead");
  }
  // A child forked later would see zero-filled memory where pages were
  // still missing (its copy is not registered): keep the region out of it.
  if (::madvise(backing_.view.data(), backing_.view.size(), MADV_DONTFORK) != 0) throw_errno("madvise(MADV_DONTFORK)");
  if (backing_.shared && ::madvise(backing_.alias.data(), backing_.alias.size(), MADV_DONTFORK) != 0) {
    throw_errno("madvise(MADV_DONTFORK)");
  }
  // Shared memory: minor faults for pages already in the memfd, missing
  // faults for holes; both are resolved by filling the page through the
  // alias and mapping it with UFFDIO_CONTINUE.
  uffd_.register_range(backing_.view.data(), backing_.view.size(), backing_.shared);
  backing_.populate();
  if (backing_.huge && !backing_.shared) zero_source_ = Mapping::anonymous(desc_.page_size, PROT_READ);

  const unsigned n = options_.handler_threads != 0 ? options_.handler_threads : default_handler_threads();
  const TransportCapabilities caps = transport_->capabilities();
  if (caps.max_read_bytes < desc_.page_size) {
    throw Error(Errc::kInvalidArgument, "this transport reads at most " + std::to_string(caps.max_read_bytes) +
                                            " bytes at once: too little for " +
                                            std::to_string(desc_.page_size >> 10) + " KiB pages");
  }
  // Staging for 2 MiB pages is kept to a few pages a worker, and a demand
  // read of one may go out as two (its faulting 4 KiB first).
  const uint32_t max_depth = backing_.huge ? (backing_.shared ? std::max(1u, caps.max_outstanding_reads / 2) : 8)
                                           : caps.max_outstanding_reads;
  const uint32_t depth = std::clamp<uint32_t>(options_.queue_depth, 1, max_depth);
  const uint32_t max_run = std::clamp<uint32_t>(caps.max_read_bytes / desc_.page_size, 1, kMaxRunPages);
  // Runs and prefetch windows are given in 4 KiB pages; in 2 MiB pages
  // they come to one page (a run) and two (a window).
  const uint32_t small_per_page = desc_.page_size / kSmallPage;
  // Channels are opened here so that a connection failure surfaces from
  // attach() as an exception rather than inside a thread.
  auto make_worker = [&](unsigned index, uint32_t slots, uint32_t slot_pages, ChannelUse use) {
    auto w = std::make_unique<Worker>();
    w->index = index;
    w->slot_pages = std::min(slot_pages, max_run);
    w->channel = transport_->open_channel(use);
    // Shared memory: reads land in the final pages, through the alias.
    if (backing_.shared) w->channel->register_buffer(backing_.alias.data(), backing_.alias.size());
    w->staging = std::make_unique<StagingPool>(*w->channel, slots,
                                               backing_.shared ? 0 : w->slot_pages * desc_.page_size);
    w->slots.resize(slots);
    w->batch.reserve(slots);
    w->channel->watch(stop_fd_.get(), kStopToken);
    return w;
  };
  for (unsigned i = 0; i < n; ++i) {
    auto h = make_worker(i, depth, options_.prefetch ? prefetch_window(options_, desc_.page_size) : 1,
                         ChannelUse::kDemand);
    h->channel->watch(uffd_.fd(), kUffdToken);
    handlers_.push_back(std::move(h));
  }
  if (options_.background_pull) {
    const uint32_t runs = std::clamp<uint32_t>(options_.pull_runs_in_flight, 1, caps.max_outstanding_reads);
    puller_ = make_worker(n, runs, std::max(1u, options_.pull_run_pages / small_per_page), ChannelUse::kBulk);
    puller_->max_parts = std::clamp<uint32_t>(caps.max_outstanding_reads / runs, 1, 32);
    // Shared memory reads land in the final pages, where a second read of
    // the same page could land after the application has written to it:
    // there a fault waits for its pull run.
    if (!backing_.shared) pulling_ = std::make_unique<std::atomic<bool>[]>(pages_.size());
  }
  for (auto& h : handlers_) {
    Worker* raw = h.get();
    raw->thread = std::thread([this, raw] { run_handler(*raw); });
  }
  if (puller_) puller_->thread = std::thread([this] { run_puller(*puller_); });
  spdlog::info("attach: '{}' over {}: {} MiB in {} KiB pages of {} ({} zero pages known), {} handler threads, {} "
               "reads in flight each, pull {}, prefetch {}",
               desc_.name, transport_->name(), desc_.length >> 20, desc_.page_size >> 10,
               backing_.shared ? (backing_.huge ? "hugetlbfs shared memory, installed in place"
                                                : "shared memory, installed in place")
                               : (backing_.huge ? "anonymous hugetlb memory" : "anonymous memory"),
               count_zero_pages(desc_.zero_map), n, depth,
               puller_ ? "on" : "off", options_.prefetch ? "on" : "off");
}

FaultEngine::~FaultEngine() {
  uint64_t one = 1;
  [[maybe_unused]] ssize_t w = ::write(stop_fd_.get(), &one, sizeof one);
  if (puller_ && puller_->thread.joinable()) puller_->thread.join();
  for (auto& h : handlers_) {
    if (h->thread.joinable()) h->thread.join();
  }
  // Threads may still be parked on pages that never arrived (or that were
  // discarded after they arrived, though the table calls them present).
  // Closing the uffd would let them in to zero-filled memory, so the region
  // is made inaccessible first and they are woken into SIGSEGV instead.
  if (!complete_.load()) {
    ::mprotect(backing_.view.data(), backing_.view.size(), PROT_NONE);
    uffd_.wake(backing_.view.data(), backing_.view.size());
  }
  puller_.reset();
  handlers_.clear();  // channels drain their in-flight reads before staging memory goes
}

Stats FaultEngine::stats() const {
  std::vector<const Metrics*> parts;
  for (const auto& h : handlers_) parts.push_back(&h->metrics);
  if (puller_) parts.push_back(&puller_->metrics);
  Stats s = merge_metrics(parts);
  s.pages_total = pages_.size();
  s.pages_present = present_.load();
  s.complete = complete_.load();
  for (const auto& h : handlers_) s.reconnects += h->channel->reconnects();
  if (puller_) s.reconnects += puller_->channel->reconnects();
  return s;
}

Progress FaultEngine::progress() const {
  Progress p;
  const Stats s = stats();
  p.pages_present = s.pages_present;
  p.pages_total = s.pages_total;
  p.bytes_transferred = s.bytes_fetched;
  p.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
  p.mb_per_second = p.seconds > 0 ? static_cast<double>(p.bytes_transferred) / 1e6 / p.seconds : 0;
  p.complete = s.complete;
  p.failed = failed_.load();
  return p;
}

bool FaultEngine::wait_complete(std::chrono::milliseconds timeout) const {
  std::unique_lock lock(state_mu_);
  state_cv_.wait_for(lock, timeout, [this] { return complete_.load() || failed_.load(); });
  return complete_.load();
}

std::string FaultEngine::error() const {
  std::lock_guard lock(state_mu_);
  return error_;
}

void FaultEngine::record_failure(const std::string& text) {
  {
    std::lock_guard lock(state_mu_);
    if (error_.empty()) {
      error_ = text;
      spdlog::error("region '{}': {}", desc_.name, text);
    }
    failed_.store(true);
  }
  state_cv_.notify_all();
}

void FaultEngine::mark_present(size_t pages) {
  if (present_.fetch_add(pages) + pages != pages_.size()) return;
  // Every page is counted. Before the region becomes plain memory (where a
  // missing page would read as zeros), check that each is still there: a
  // page the application discarded after it arrived is fetched again first.
  // One check at a time, and only while the count still stands.
  std::lock_guard check(check_mu_);
  if (complete_.load() || present_.load() != pages_.size()) return;
  // From here a page taken back for a fetch (discarded, or punched out of
  // the memfd) waits for this check's outcome: see fetch_again().
  closing_.store(true);
  const std::vector<bool> held = held_pages();
  if (!held.empty()) {
    size_t gone = 0;
    for (size_t p = 0; p < pages_.size(); ++p) {
      if (held[p] || !pages_.transition(p, PageState::kPresent, PageState::kInFlight)) continue;
      // Owned now, so nothing maps or fetches it meanwhile: look again, as
      // the snapshot may predate a fetch that brought it back (and the
      // application's writes since, which a fetch must never overwrite).
      if (holds(p)) {
        pages_.set(p, PageState::kPresent);
      } else {
        pages_.set(p, PageState::kMissing);
        present_.fetch_sub(1);
        ++gone;
      }
      uffd_.wake(backing_.view.data() + p * desc_.page_size, desc_.page_size);  // a fault meanwhile looks again
    }
    if (gone > 0) {
      closing_.store(false);
      spdlog::info("region '{}': {} pages were discarded after they arrived; fetching them again", desc_.name, gone);
      return;
    }
  }
  // A page taken back for a fetch since the count was read lowered it
  // again, and its fetch completes the region when it arrives. Any taken
  // back after this load finds closing_ set and leaves the page to plain
  // memory. (Both sides are sequentially consistent: one sees the other.)
  if (present_.load() != pages_.size()) {
    closing_.store(false);
    return;
  }
  // Every page is here: the region becomes plain memory.
  try {
    uffd_.unregister(backing_.view.data(), backing_.view.size());
  } catch (const std::exception& e) {
    spdlog::warn("region '{}': complete, but {}", desc_.name, e.what());
  }
  {
    std::lock_guard lock(state_mu_);
    complete_.store(true);
  }
  closing_.store(false);
  state_cv_.notify_all();
  spdlog::info("region '{}': every page present after {:.2f} s; unregistered, plain memory now", desc_.name,
               std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count());
}

void FaultEngine::stop_worker_on_exception(Worker& w, const std::exception& e) {
  // Nothing may escape a thread; the region is marked failed instead, and
  // the pages this worker owned are refused: nobody else would ever
  // install them, and their waiters would stay parked.
  const std::string why = std::string("a fault worker stopped: ") + e.what();
  record_failure(why);
  for (auto& slot : w.slots) {
    if (!slot.busy) continue;
    slot.busy = false;
    if (slot.kind == ReadKind::kOvertake) continue;  // its page is a pull run's
    for (uint32_t i = 0; i < slot.pages; ++i) {
      if (((slot.owned >> i) & 1) != 0) refuse_page(w, slot.first + i, Errc::kIo, why);
    }
  }
}

void FaultEngine::run_handler(Worker& w) {
  const std::string thread_name = "pw-fault-" + std::to_string(w.index);
  ::pthread_setname_np(::pthread_self(), thread_name.c_str());
  pin_to(options_.handler_cpu);
  set_nice(options_.handler_nice);
  try {
    for (;;) {
      w.result.clear();
      // Do not sleep while the uffd may still hold events we could take,
      // and do not wake for it while there is no slot to take them into.
      const bool can_read = w.uffd_ready && !w.staging->empty();
      w.channel->pause_watch(kUffdToken, w.staging->empty());
      w.channel->wait(w.result, can_read ? 0 : -1);
      for (uint64_t token : w.result.woken_tokens) {
        if (token == kStopToken) return;
        if (token == kUffdToken) w.uffd_ready = true;
      }
      for (const ReadCompletion& c : w.result.completions) complete(w, c);
      if (w.result.channel_error != Errc::kOk) record_failure(w.result.channel_error_text);
      if (w.uffd_ready && !w.staging->empty()) read_faults(w);
    }
  } catch (const std::exception& e) {
    stop_worker_on_exception(w, e);
  }
}

uint32_t FaultEngine::claim_run(size_t first, uint32_t max) {
  uint32_t n = 0;
  while (n < max && first + n < pages_.size() && !zero(first + n) && pages_.claim(first + n)) ++n;
  return n;
}

std::byte* FaultEngine::landing(Worker& w, uint32_t slot, size_t first) const {
  return backing_.shared ? backing_.alias.data() + first * desc_.page_size : w.staging->at(slot);
}

void FaultEngine::queue_read(Worker& w, size_t first, uint32_t pages, ReadKind kind, uint64_t start_ns,
                             uint64_t owned, uint32_t first_part) {
  const uint32_t slot = w.staging->acquire();
  // The last page of a region whose length is not page aligned is read
  // short; the rest of it lies past the end of the source and reads zero.
  const uint64_t offset = uint64_t{first} * desc_.page_size;
  const uint64_t len = std::min<uint64_t>(uint64_t{pages} * desc_.page_size, desc_.length - offset);
  std::byte* dst = landing(w, slot, first);
  const bool split = pages == 1 && first_part > 0 && first_part < len;
  const uint64_t mask = owned != 0 ? owned : all_pages(pages);
  uint8_t parts = 0;
  auto read = [&](uint64_t at, uint64_t bytes) {
    w.batch.push_back({offset + at, static_cast<uint32_t>(bytes), dst + at, slot});
    ++parts;
  };
  if (split) {
    // The part from the faulting 4 KiB to the end first, then the head.
    read(first_part, len - first_part);
    read(0, first_part);
  } else if (backing_.shared && mask != all_pages(pages)) {
    // Reads land in the final pages: read only the stretches this run owns,
    // never over a page that arrived another way.
    for_each_stretch(mask, pages, [&](uint32_t i, uint32_t n) {
      const uint64_t at = uint64_t{i} * desc_.page_size;
      read(at, std::min<uint64_t>(uint64_t{n} * desc_.page_size, len - at));
    });
  } else {
    read(0, len);
  }
  w.slots[slot] = {first, pages, mask, kind, start_ns, true, parts, Errc::kOk};
  ++w.in_flight;
}

int FaultEngine::install(Worker& w, std::byte* src, size_t page, uint32_t count, uint64_t* retries,
                         uint64_t* existed) {
  std::byte* dst = backing_.view.data() + page * desc_.page_size;
  const uint64_t bytes = uint64_t{count} * desc_.page_size;
  // Counted before the waiters are woken (the caller wakes them), as
  // stats() readers expect.
  if (backing_.shared) {
    // The read landed in these very pages (through the alias): map them.
    const int rc = uffd_.map_in_place(dst, bytes, desc_.page_size, retries, existed);
    if (rc == 0) Metrics::bump(w.metrics.pages_continued, count);
    return rc;
  }
  const int rc = uffd_.copy(dst, src, bytes, desc_.page_size, retries, existed);
  if (rc == 0) Metrics::bump(w.metrics.bytes_copied, bytes);
  return rc;
}

void FaultEngine::install_zero(Worker& w, size_t page) {
  uint64_t retries = 0;
  uint64_t existed = 0;
  std::byte* dst = backing_.view.data() + page * desc_.page_size;
  int rc = 0;
  const char* how = "UFFDIO_ZEROPAGE: ";
  if (backing_.shared) {
    // A memfd handed in may hold old bytes there: zero the page itself.
    std::memset(backing_.alias.data() + page * desc_.page_size, 0, desc_.page_size);
    rc = uffd_.map_in_place(dst, desc_.page_size, desc_.page_size, &retries, &existed);
    how = "UFFDIO_CONTINUE: ";
  } else if (backing_.huge) {
    rc = uffd_.copy(dst, zero_source_.data(), desc_.page_size, desc_.page_size, &retries, &existed);
    how = "UFFDIO_COPY: ";
  } else {
    rc = uffd_.zeropage(dst, desc_.page_size, desc_.page_size, &retries, &existed);
  }
  if (rc != 0) {
    Metrics::bump(w.metrics.install_failures);
    refuse_page(w, page, Errc::kIo, how + std::string(std::strerror(rc)));
    return;
  }
  if (retries > 0) Metrics::bump(w.metrics.copy_retries, retries);
  Metrics::bump(w.metrics.pages_zero);
  publish(page, 1);
}

void FaultEngine::publish(size_t first, uint32_t count) {
  // Present in the table before anyone waiting on these pages runs: a woken
  // thread that discards its page and faults again must find it present.
  for (uint32_t k = 0; k < count; ++k) pages_.set(first + k, PageState::kPresent);
  mark_present(count);
  uffd_.wake(backing_.view.data() + first * desc_.page_size, uint64_t{count} * desc_.page_size);
}

void FaultEngine::read_faults(Worker& w) {
  w.batch.clear();
  while (!w.staging->empty()) {
    const size_t want = std::min<size_t>(kEventBatch, w.staging->available());
    const int n = uffd_.read_events(std::span(w.events.data(), want));
    if (n < 0) {
      record_failure(std::string("reading userfaultfd: ") + std::strerror(-n));
      w.uffd_ready = false;
      break;
    }
    const uint64_t t0 = now_ns();
    for (int i = 0; i < n; ++i) {
      const uffd_msg& msg = w.events[static_cast<size_t>(i)];
      if (msg.event != UFFD_EVENT_PAGEFAULT) continue;
      Metrics::bump(w.metrics.faults);
      const uint64_t at = msg.arg.pagefault.address - reinterpret_cast<uint64_t>(backing_.view.data());
      const size_t page = at / desc_.page_size;
      const Take take = take_fault(page);
      if (take == Take::kNothing) {
        Metrics::bump(w.metrics.duplicate_faults);
        continue;
      }
      if (zero(page)) {
        install_zero(w, page);
        continue;
      }
      // Every message read was sized to a free slot, so this one has one.
      // A 2 MiB page is read from its faulting 4 KiB on (the kernel still
      // maps it whole, so the thread waits for all of it).
      const auto fault_part = static_cast<uint32_t>(at % desc_.page_size & ~uint64_t{kSmallPage - 1});
      if (take == Take::kOvertake) {
        // Out in a pull run, behind up to pull_runs_in_flight runs on the
        // bulk connection: read it again on this one, ahead of them.
        queue_read(w, page, 1, ReadKind::kOvertake, t0, 0, fault_part);
        continue;
      }
      queue_read(w, page, 1, ReadKind::kDemand, t0, 0, fault_part);
      // Prefetch must leave a slot for each fault still to handle in this batch.
      if (options_.prefetch) prefetch(w, msg.arg.pagefault.feat.ptid, page, static_cast<uint32_t>(n - i - 1));
    }
    if (static_cast<size_t>(n) < want) {
      w.uffd_ready = false;
      break;
    }
  }
  if (!w.batch.empty()) w.channel->post(w.batch);
}

void FaultEngine::prefetch(Worker& w, uint32_t thread_id, size_t page, uint32_t reserved) {
  const PrefetchPlan plan = streams_.on_fault(thread_id, page);
  if (plan.used > 0) Metrics::bump(w.metrics.prefetch_used, plan.used);
  if (plan.wasted > 0) Metrics::bump(w.metrics.prefetch_wasted, plan.wasted);
  if (plan.pages == 0) return;
  // Prefetch never takes the slots demand faults need: half stay free, and
  // one for each fault read but not yet handled.
  const auto spare = [&] {
    return w.staging->available() > std::max<size_t>(w.slots.size() / 2, reserved);
  };
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

void FaultEngine::complete(Worker& w, const ReadCompletion& c) {
  const auto slot = static_cast<uint32_t>(c.cookie);
  Worker::Slot& live = w.slots[slot];
  if (c.status != Errc::kOk && live.status == Errc::kOk) live.status = c.status;
  if (--live.parts > 0) return;  // the other part of a split read is still coming
  const Worker::Slot s = live;
  live.busy = false;
  --w.in_flight;
  const auto owned = [&](uint32_t i) { return ((s.owned >> i) & 1) != 0; };
  if (s.kind == ReadKind::kOvertake) {
    // It owns no page: if it failed, the pull run still installs or
    // refuses the page (and wakes its threads).
    if (s.status == Errc::kOk) {
      finish_overtake(w, w.staging->at(slot), s.first);
      w.metrics.fault_latency.record(now_ns() - s.start_ns);
    }
    w.staging->release(slot);
    return;
  }
  if (pulling_ && s.kind == ReadKind::kPull) {
    for (uint32_t i = 0; i < s.pages; ++i) {
      if (owned(i)) pulling_[s.first + i].store(false, std::memory_order_relaxed);
    }
  }
  if (s.status != Errc::kOk) {
    w.staging->release(slot);
    for (uint32_t i = 0; i < s.pages; ++i) {
      if (!owned(i)) continue;
      // A fault that overtook the run may have installed the page: it is
      // the source's, the application may be using it, and it stays.
      if (s.kind == ReadKind::kPull && pulling_ && resident(s.first + i)) {
        publish(s.first + i, 1);
      } else {
        refuse_page(w, s.first + i, s.status, w.result.channel_error_text);
      }
    }
    return;
  }
  std::byte* src = landing(w, slot, s.first);
  const uint64_t offset = uint64_t{s.first} * desc_.page_size;
  const uint64_t run_bytes = uint64_t{s.pages} * desc_.page_size;
  const uint64_t len = std::min<uint64_t>(run_bytes, desc_.length - offset);
  if (len < run_bytes) std::memset(src + len, 0, run_bytes - len);
  const auto installed = static_cast<uint32_t>(std::popcount(s.owned));
  // Counted before the copy: the copy wakes the faulting threads, and what
  // they read in stats() afterwards must include their page.
  Metrics::bump(s.kind == ReadKind::kPull ? w.metrics.pages_pulled : w.metrics.pages_fetched, installed);
  // What crossed the wire: the whole span, except that a shared-memory run
  // reads only the stretches it owns (its last page is always one of them).
  const uint64_t skipped = backing_.shared ? uint64_t{s.pages - installed} * desc_.page_size : 0;
  Metrics::bump(w.metrics.bytes_fetched, len - skipped);
  if (s.kind == ReadKind::kPull) Metrics::bump(w.metrics.pull_runs);
  // One install per stretch of owned pages (the whole run, normally). A
  // stretch that fails is refused and the others still go in: a page left
  // in flight would park its threads for good.
  bool all_installed = true;
  for_each_stretch(s.owned, s.pages, [&](uint32_t i, uint32_t n) {
    uint64_t retries = 0;
    uint64_t existed = 0;
    const int rc = install(w, src + uint64_t{i} * desc_.page_size, s.first + i, n, &retries, &existed);
    // Counted before publish() wakes the threads (and may complete the region).
    if (retries > 0) Metrics::bump(w.metrics.copy_retries, retries);
    if (existed > 0) Metrics::bump(w.metrics.copy_eexist, existed);
    if (rc == 0) {
      publish(s.first + i, n);
      return;
    }
    all_installed = false;
    Metrics::bump(w.metrics.install_failures, n);
    for (uint32_t k = i; k < i + n; ++k) {
      refuse_page(w, s.first + k, Errc::kIo,
                  backing_.shared && rc == EFAULT
                      ? std::string("UFFDIO_CONTINUE: the page is no longer in the memfd (a hole was punched "
                                    "into it while attached; over RDMA the memory region still pins the old "
                                    "page, so it cannot be fetched again)")
                      : std::string(backing_.shared ? "UFFDIO_CONTINUE: " : "UFFDIO_COPY: ") + std::strerror(rc));
    }
  });
  w.staging->release(slot);
  if (s.kind == ReadKind::kDemand && all_installed) w.metrics.fault_latency.record(now_ns() - s.start_ns);
}

void FaultEngine::finish_overtake(Worker& w, std::byte* src, size_t page) {
  const uint64_t offset = uint64_t{page} * desc_.page_size;
  const uint64_t len = std::min<uint64_t>(desc_.page_size, desc_.length - offset);
  if (len < desc_.page_size) std::memset(src + len, 0, desc_.page_size - len);
  Metrics::bump(w.metrics.bytes_fetched, len);
  std::byte* dst = backing_.view.data() + offset;
  uint64_t retries = 0;
  uint64_t existed = 0;
  // The page table still says in flight: the pull run that owns the page
  // publishes it, finding it here already (EEXIST) and leaving it as the
  // application may have written it since.
  const int rc = uffd_.copy(dst, src, desc_.page_size, desc_.page_size, &retries, &existed);
  if (retries > 0) Metrics::bump(w.metrics.copy_retries, retries);
  if (rc != 0) {
    // The run installs or refuses it, and wakes its threads.
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

void FaultEngine::run_puller(Worker& w) {
  ::pthread_setname_np(::pthread_self(), "pw-pull");
  pin_to(options_.handler_cpu);
  set_nice(options_.puller_nice);
  const size_t total = pages_.size();
  size_t cursor = 0;
  try {
    // A refused page never arrives, so a failed region never completes:
    // the pull then claims nothing more, but still installs (or refuses)
    // every run it has in flight, whose pages nobody else would.
    while (!complete_.load() && (!failed_.load() || w.in_flight > 0)) {
      w.batch.clear();
      // Demand faults go ahead of the pull on their own connections, which
      // the source serves first. Holding the pull to one run while demand
      // reads were in flight was measured: it slowed the pull (so the
      // threads faulted more) and left demand p99 no better.
      while (!failed_.load() && !w.staging->empty() && cursor < total) {
        const PageState state = pages_.get(cursor);
        if (state != PageState::kMissing) {
          ++cursor;
          continue;
        }
        if (zero(cursor)) {
          if (pages_.claim(cursor)) install_zero(w, cursor);
          ++cursor;
          continue;
        }
        // A span from this missing page: claim what is missing in the next
        // slot_pages pages and take them as one run, gaps (pages that came
        // by demand meanwhile) included, rather than breaking the run at
        // every page a fault took. Zero pages end the span. Anonymous
        // memory reads the whole span into staging in one go; shared memory
        // reads each owned stretch in place (queue_read), at most
        // max_parts of them.
        uint64_t owned_mask = 0;
        uint32_t span = 0;
        uint32_t stretches = 0;
        for (uint32_t i = 0; i < w.slot_pages && cursor + i < total && !zero(cursor + i); ++i) {
          const bool starts_stretch = i == 0 || ((owned_mask >> (i - 1)) & 1) == 0;
          if (backing_.shared && starts_stretch && stretches == w.max_parts) break;
          if (pages_.get(cursor + i) == PageState::kMissing && pages_.claim(cursor + i)) {
            if (pulling_) pulling_[cursor + i].store(true, std::memory_order_relaxed);
            owned_mask |= uint64_t{1} << i;
            span = i + 1;
            if (starts_stretch) ++stretches;
          }
        }
        if (owned_mask != 0) queue_read(w, cursor, span, ReadKind::kPull, 0, owned_mask);
        cursor += std::max<uint32_t>(span, 1);
      }
      if (!w.batch.empty()) w.channel->post(w.batch);
      int timeout = -1;
      if (w.in_flight == 0) {
        // Nothing of ours in flight: what is missing is in flight for a
        // handler, or was discarded since; look again shortly.
        if (cursor >= total) cursor = 0;
        timeout = 2;
      }
      w.result.clear();
      w.channel->wait(w.result, timeout);
      for (uint64_t token : w.result.woken_tokens) {
        if (token == kStopToken) return;
      }
      for (const ReadCompletion& c : w.result.completions) complete(w, c);
      if (w.result.channel_error != Errc::kOk) {
        // A dead channel has failed every read it held (refused above).
        record_failure(w.result.channel_error_text);
        return;
      }
    }
  } catch (const std::exception& e) {
    stop_worker_on_exception(w, e);
  }
}

FaultEngine::Take FaultEngine::take_fault(size_t page) {
  std::byte* addr = backing_.view.data() + page * desc_.page_size;
  for (;;) {
    if (pages_.claim(page)) return Take::kFetch;
    switch (pages_.get(page)) {
      case PageState::kInFlight:
        // The first fault on a page out in a pull run overtakes it; any
        // other is woken by whichever read installs the page.
        if (pulling_ && pulling_[page].exchange(false, std::memory_order_acq_rel)) return Take::kOvertake;
        return Take::kNothing;
      case PageState::kPresent:
        if (backing_.shared) {
          // Own the page while looking at it: no other handler may map it
          // or fetch it into the memfd meanwhile.
          if (!pages_.transition(page, PageState::kPresent, PageState::kInFlight)) break;  // look again
          if (memfd_holds(page)) {
            // Unmapped from the region only (MADV_DONTNEED keeps the page,
            // and the application's writes, in the memfd), or the fault
            // raced with the install: map it again, with no transfer.
            uint64_t retries = 0;
            uint64_t existed = 0;
            uffd_.map_in_place(addr, desc_.page_size, desc_.page_size, &retries, &existed);
            pages_.set(page, PageState::kPresent);
            uffd_.wake(addr, desc_.page_size);
            return Take::kNothing;
          }
          present_.fetch_sub(1);  // punched out of the memfd: fetch it again
          return fetch_again(page) ? Take::kFetch : Take::kNothing;
        }
        if (discarded(page)) return fetch_again(page) ? Take::kFetch : Take::kNothing;
        if (pages_.get(page) == PageState::kPresent) {
          uffd_.wake(addr, desc_.page_size);  // the install raced with the fault
          return Take::kNothing;
        }
        break;  // reset to missing meanwhile (the completion sweep): look again
      case PageState::kRefused:
        uffd_.refuse(addr, desc_.page_size);  // poisoned or protected already; wakes it into the signal
        return Take::kNothing;
      case PageState::kMissing:
        break;  // claimed and given back, or reset by the sweep: look again
    }
  }
}

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

bool FaultEngine::resident(size_t page) const {
  std::byte* addr = backing_.view.data() + page * desc_.page_size;
  uint64_t entry = 0;
  if (pagemap_ && read_pagemap(pagemap_.get(), addr, &entry, 1)) {
    return (entry & (kPagemapPresent | kPagemapSwapped)) != 0;
  }
  unsigned char r = 0;
  return ::mincore(addr, kSmallPage, &r) != 0 || (r & 1) != 0;
}

bool FaultEngine::memfd_holds(size_t page) const {
  const auto off = static_cast<off_t>(page * desc_.page_size);
  if (!backing_.huge) return ::lseek(backing_.memfd.get(), off, SEEK_DATA) == off;  // swapped pages count
  unsigned char r = 1;
  return ::mincore(backing_.alias.data() + off, kSmallPage, &r) != 0 || (r & 1) != 0;
}

bool FaultEngine::holds(size_t page) const { return backing_.shared ? memfd_holds(page) : resident(page); }

std::vector<bool> FaultEngine::held_pages() const {
  const size_t pages = pages_.size();
  std::vector<bool> held(pages, true);
  if (backing_.shared && !backing_.huge) {
    // shmem: the holes in the memfd (SEEK_HOLE / SEEK_DATA; swapped pages
    // are data).
    const auto end = static_cast<off_t>(backing_.view.size());
    for (off_t hole = ::lseek(backing_.memfd.get(), 0, SEEK_HOLE); hole >= 0 && hole < end;) {
      off_t data = ::lseek(backing_.memfd.get(), hole, SEEK_DATA);
      if (data < 0) data = end;
      for (auto p = static_cast<size_t>(hole) / desc_.page_size; p * desc_.page_size < static_cast<size_t>(data) && p < pages;
           ++p) {
        held[p] = false;
      }
      hole = data < end ? ::lseek(backing_.memfd.get(), data, SEEK_HOLE) : end;
    }
    return held;
  }
  if (pagemap_) {
    // Anonymous 4 KiB pages: mapped or swapped out (mincore would call a
    // swapped page absent, and the region would never complete). Read in
    // chunks of 512 KiB of entries.
    std::vector<uint64_t> e(std::min<size_t>(pages, 65536));
    size_t p = 0;
    for (; p < pages; p += e.size()) {
      const size_t n = std::min(e.size(), pages - p);
      if (!read_pagemap(pagemap_.get(), backing_.view.data() + p * kSmallPage, e.data(), n)) break;
      for (size_t i = 0; i < n; ++i) held[p + i] = (e[i] & (kPagemapPresent | kPagemapSwapped)) != 0;
    }
    if (p >= pages) return held;
  }
  // Anonymous memory without pagemap: the region's page tables. hugetlbfs
  // (never swapped): the alias's for shared memory (the region's may be
  // unmapped while the memfd keeps the page). One byte per 4 KiB either way.
  const Mapping& m = backing_.shared ? backing_.alias : backing_.view;
  std::vector<unsigned char> r(m.size() / kSmallPage);
  if (::mincore(m.data(), m.size(), r.data()) != 0) return {};
  const size_t per_page = desc_.page_size / kSmallPage;
  for (size_t p = 0; p < pages; ++p) held[p] = (r[p * per_page] & 1) != 0;
  return held;
}

bool FaultEngine::discarded(size_t page) {
  // A page the table calls present faults again only if the application
  // discarded it (MADV_DONTNEED) or the fault raced with its install. The
  // page tables tell which; a discarded page is fetched again, as postcopy
  // expects, rather than woken into a fault loop.
  if (resident(page)) return false;
  if (!pages_.transition(page, PageState::kPresent, PageState::kInFlight)) return false;
  present_.fetch_sub(1);
  return true;
}

bool FaultEngine::fetch_again(size_t page) {
  if (!closing_.load()) return true;
  // A completion check may not have seen this page go: wait for it.
  { const std::lock_guard check(check_mu_); }
  if (!complete_.load()) return true;  // it saw, or stopped short: fetch
  // The region is plain memory now (unregistering woke the fault): the
  // page was discarded as the region completed, and reads as plain memory
  // does. A read of it now could only fail to install, or, in shared
  // memory, land over what the application wrote since.
  pages_.set(page, PageState::kPresent);
  present_.fetch_add(1);
  return false;
}

void FaultEngine::refuse_page(Worker& w, size_t page, Errc why, const std::string& text) {
  // Never zero-fill: the waiters are woken into SIGBUS (or SIGSEGV).
  Metrics::bump(w.metrics.transport_errors);
  Metrics::bump(w.metrics.pages_refused);
  pages_.set(page, PageState::kRefused);
  // Recorded before the waiters wake, so that they find the region failed.
  record_failure("page " + std::to_string(page) + " could not be fetched: " + std::string(to_string(why)) +
                 (text.empty() ? "" : " (" + text + ")"));
  std::byte* addr = backing_.view.data() + page * desc_.page_size;
  const int rc = uffd_.refuse(addr, desc_.page_size);
  if (rc == 0) return;
  // Without UFFDIO_POISON every refused page is a PROT_NONE mapping of its
  // own, and past vm.max_map_count mprotect fails (ENOMEM): its waiters
  // would stay parked for good. The region has failed, so all of it is made
  // inaccessible instead (whole mappings: no new one is needed) and every
  // waiter is woken into SIGSEGV. Pages already here go with it.
  spdlog::error("region '{}': refusing page {} failed: {}; making the whole region inaccessible instead (raise "
                "vm.max_map_count, or run a kernel with UFFDIO_POISON)",
                desc_.name, page, std::strerror(rc));
  if (::mprotect(backing_.view.data(), backing_.view.size(), PROT_NONE) != 0) {
    spdlog::error("region '{}': mprotect of the whole region failed too: {}", desc_.name, std::strerror(errno));
    return;
  }
  uffd_.wake(backing_.view.data(), backing_.view.size());
}

}  // namespace pagewire
